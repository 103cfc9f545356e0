//! What can go wrong with the LED and the button, in one line each that names the thing and
//! the fix.
//!
//! None of these may stop a backup: the agent falls back to the null backends and logs the
//! error once. That is why [`From<HardwareError>`] maps every variant to
//! [`Error::Failed`](crate::error::Error::Failed) (exit 1) rather than to `Error::Config`
//! (exit 2): a hardware error carries no config file path to name, and the only runs it can
//! end are one-shot commands (an LED or button test) where "it did not work" is the honest
//! class. The daemon never exits because of one, so it cannot make systemd restart-loop.

use std::path::PathBuf;

/// The config keys our messages point at, kept in one place so that a renamed key is
/// renamed in every message.
pub(crate) const LED_PIN_KEY: &str = "gpio.led_pin";
pub(crate) const BUTTON_PIN_KEY: &str = "gpio.button_pin";
pub(crate) const ACT_LED_KEY: &str = "gpio.act_led";

#[derive(Debug, thiserror::Error)]
pub enum HardwareError {
    /// GPIO was configured on a machine that is not a Raspberry Pi (or whose model rppal
    /// does not know).
    #[error("{0}")]
    NotAPi(String),

    /// An LED under /sys/class/leds is missing, unreadable or not writable.
    #[error("{}: {message}", path.display())]
    Sysfs { path: PathBuf, message: String },

    /// A GPIO pin exists on this Pi but cannot be used: taken, out of range, no permission.
    #[error("{0}")]
    Gpio(String),
}

impl From<HardwareError> for crate::error::Error {
    fn from(e: HardwareError) -> Self {
        crate::error::Error::Failed(e.to_string())
    }
}

/// Turns an rppal error met while opening pin `pin` (used for `what`, configured by `key`)
/// into one actionable line.
pub(crate) fn gpio_error(e: rppal::gpio::Error, what: &str, pin: u8, key: &str) -> HardwareError {
    use rppal::gpio::Error as E;
    match e {
        // rppal identifies the board from /proc/device-tree and /proc/cpuinfo before it
        // touches any device: this is what every non-Pi machine (and qemu) answers.
        E::UnknownModel => HardwareError::NotAPi(format!(
            "GPIO is not available (rppal: {e}); is this a Raspberry Pi? set {key} only on a Pi"
        )),
        E::PermissionDenied(ref path) => HardwareError::Gpio(format!(
            "GPIO {pin} ({what}): permission denied on {path}; run datavault as root or add its \
             user to the gpio group"
        )),
        E::PinNotAvailable(_) => HardwareError::Gpio(format!(
            "GPIO {pin} ({what}) does not exist on this Pi; {key} takes a BCM GPIO number \
             (2-27 on the 40-pin header), not a physical pin number"
        )),
        E::PinUsed(_) => HardwareError::Gpio(format!(
            "GPIO {pin} ({what}) is already in use by datavault; give the LED and the button \
             different pins"
        )),
        E::Io(ref io) if io.raw_os_error() == Some(16) => HardwareError::Gpio(format!(
            "GPIO {pin} ({what}) is held by another program (EBUSY); stop it or choose \
             another pin for {key}"
        )),
        _ => HardwareError::Gpio(format!("GPIO {pin} ({what}): {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit;

    #[test]
    fn hardware_errors_exit_1_and_keep_their_message() {
        let e = HardwareError::Sysfs {
            path: PathBuf::from("/sys/class/leds/ACT/trigger"),
            message: "cannot write".into(),
        };
        let err: crate::error::Error = e.into();
        assert_eq!(err.exit_code(), exit::FAILURE);
        assert_eq!(err.to_string(), "/sys/class/leds/ACT/trigger: cannot write");
    }

    #[test]
    fn unknown_model_says_raspberry_pi_and_names_the_key() {
        let e = gpio_error(rppal::gpio::Error::UnknownModel, "LED", 17, LED_PIN_KEY);
        assert!(matches!(e, HardwareError::NotAPi(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("Raspberry Pi") && msg.contains("gpio.led_pin"), "{msg}");
    }

    #[test]
    fn a_missing_pin_explains_bcm_numbering() {
        let e = gpio_error(rppal::gpio::Error::PinNotAvailable(40), "button", 40, BUTTON_PIN_KEY);
        let msg = e.to_string();
        assert!(msg.contains("GPIO 40") && msg.contains("BCM"), "{msg}");
    }
}
