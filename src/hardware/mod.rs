//! The appliance's only user interface: one status LED and one push button (issue #4).
//!
//! Everything the agent decides is pure and tested here without a Pi: which on/off timeline a
//! [`LedPattern`] is, which level comes next ([`PatternPlayer`]), and which raw edges make a
//! short or a long press ([`PressDetector`]). The hardware sits behind two small traits,
//! [`StatusLed`] and [`ButtonInput`], with a null backend each. The real backends (rppal
//! for GPIO, sysfs for the onboard LED) compile on every machine and fail at run time off a
//! Pi with [`HardwareError::NotAPi`] or a [`HardwareError::Sysfs`] naming the path; the agent
//! then falls back to the null backends and logs it once, because a missing LED must never
//! stop a backup. rppal is in maintenance mode upstream: nothing outside this module names it.

mod blinker;
mod button;
mod error;
mod led;

use std::path::Path;
use std::time::Duration;

pub use blinker::{Blinker, PatternPlayer};
pub use button::{ButtonConfig, ButtonInput, GpioButton, NoButton, Press, PressDetector};
pub use error::HardwareError;
pub use led::{GpioLed, LedPattern, NullLed, StatusLed, SysfsLed};

/// Opens the configured LED: an LED on BCM pin `led_pin`, else the onboard ACT LED when
/// `act_led`, else [`NullLed`]. The config refuses both at once; if a caller passes both,
/// `led_pin` wins. `sys_root` is "/" except in tests.
pub fn open_led(
    led_pin: Option<u8>,
    act_led: bool,
    sys_root: &Path,
) -> Result<Box<dyn StatusLed>, HardwareError> {
    Ok(match (led_pin, act_led) {
        (Some(pin), _) => Box::new(GpioLed::open(pin)?),
        (None, true) => Box::new(SysfsLed::open(sys_root)?),
        (None, false) => Box::new(NullLed),
    })
}

/// Opens the configured button on BCM pin `button_pin` (active low, internal pull-up, kernel
/// debounce of `debounce`), else [`NoButton`].
pub fn open_button(
    button_pin: Option<u8>,
    debounce: Duration,
) -> Result<Box<dyn ButtonInput>, HardwareError> {
    Ok(match button_pin {
        Some(pin) => Box::new(GpioButton::open(pin, debounce)?),
        None => Box::new(NoButton),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Tests that expect rppal to fail skip themselves on a real Pi.
    pub(crate) fn is_raspberry_pi() -> bool {
        std::fs::read_to_string("/proc/device-tree/compatible").is_ok_and(|s| s.contains("raspberrypi"))
    }

    #[test]
    fn nothing_configured_opens_the_null_backends() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(open_led(None, false, root.path()).unwrap().name(), "none");
        assert_eq!(open_button(None, Duration::from_millis(50)).unwrap().name(), "none");
    }

    #[test]
    fn act_led_opens_the_sysfs_led() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("sys/class/leds/ACT");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("trigger"), "none [mmc0] heartbeat").unwrap();
        std::fs::write(dir.join("brightness"), "0").unwrap();
        let led = open_led(None, true, root.path()).unwrap();
        assert!(led.name().ends_with("leds/ACT"), "{}", led.name());
    }

    #[test]
    fn gpio_off_a_pi_is_not_a_pi() {
        if is_raspberry_pi() {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let led = open_led(Some(17), true, root.path()).err().expect("GPIO off a Pi");
        assert!(matches!(led, HardwareError::NotAPi(_)), "led_pin wins over act_led: {led:?}");
        let button = open_button(Some(27), Duration::from_millis(50)).err().expect("GPIO off a Pi");
        assert!(button.to_string().contains("Raspberry Pi"), "{button}");
    }
}
