//! The status LED: what it must show ([`LedPattern`]) and the things that can show it
//! ([`StatusLed`]: nothing, a GPIO pin, or the Pi's onboard ACT LED).
//!
//! An appliance has no screen: the LED is how its owner learns that the last backup failed
//! or that the USB drive is gone, so every pattern must be told apart at a glance from across
//! the room (`describe` is the legend printed by the README and `doctor`). Patterns are data,
//! pure on/off timelines, so they are tested without a thread or a clock; the
//! [`Blinker`](super::Blinker) plays them.
//!
//! The onboard LED belongs to the kernel (its `mmc0` trigger shows SD card activity). We take
//! it by writing `none` to its trigger and give it back on [`StatusLed::release`] (and on
//! drop), so a stopped agent leaves the Pi as it found it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{gpio_error, HardwareError, ACT_LED_KEY, LED_PIN_KEY};

/// What the LED must show; the agent sets it, a [`Blinker`](super::Blinker) thread renders it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LedPattern {
    Off,
    /// Slow heartbeat: 100 ms on every 2 s.
    Healthy,
    /// Fast blink at 5 Hz: a backup or drill the agent started (button, SIGUSR1) is running.
    Working,
    /// Three quick flashes, then back to the previous pattern: "button press seen".
    Acknowledge,
    /// Steady on: no backup yet, the last run failed, or the backup is overdue.
    Failed,
    /// SOS in Morse, repeating: a restore drill failed, the backups may not restore.
    DrillFailed,
    /// Double blink every 2 s: the USB backup drive is missing.
    TargetMissing,
    /// Slow blink, 1 s on and 1 s off: needs attention soon, nothing failed yet (a drill is
    /// overdue, the drive is nearly full) (#15), or the offsite copy is behind (#10).
    Attention,
}

// Morse timing for SOS: a dot is one unit, a dash three, one unit between the signals of a
// letter, three between letters and seven between words (here: between repeats).
const U: u32 = 150;
const SOS: [(bool, u32); 18] = [
    (true, U),
    (false, U),
    (true, U),
    (false, U),
    (true, U),
    (false, 3 * U),
    (true, 3 * U),
    (false, U),
    (true, 3 * U),
    (false, U),
    (true, 3 * U),
    (false, 3 * U),
    (true, U),
    (false, U),
    (true, U),
    (false, U),
    (true, U),
    (false, 7 * U),
];

impl LedPattern {
    pub const ALL: [LedPattern; 8] = [
        LedPattern::Off,
        LedPattern::Healthy,
        LedPattern::Working,
        LedPattern::Acknowledge,
        LedPattern::Failed,
        LedPattern::DrillFailed,
        LedPattern::TargetMissing,
        LedPattern::Attention,
    ];

    /// The on/off timeline of one period, in ms, starting at the period's beginning.
    ///
    /// Consecutive steps alternate between on and off, and no step is empty. Steady patterns
    /// are one step long; their duration only says how long the player may sleep.
    /// `Acknowledge` is played once (the [`Blinker`](super::Blinker) then resumes the previous
    /// pattern); its leading dark gap sets the flashes apart from a steady-on `Failed`.
    pub fn timeline(self) -> &'static [(bool, u32)] {
        match self {
            LedPattern::Off => &[(false, 1000)],
            LedPattern::Healthy => &[(true, 100), (false, 1900)],
            LedPattern::Working => &[(true, 100), (false, 100)],
            LedPattern::Acknowledge => {
                &[(false, 200), (true, 80), (false, 80), (true, 80), (false, 80), (true, 80), (false, 300)]
            }
            LedPattern::Failed => &[(true, 1000)],
            LedPattern::DrillFailed => &SOS,
            LedPattern::TargetMissing => &[(true, 100), (false, 150), (true, 100), (false, 1650)],
            LedPattern::Attention => &[(true, 1000), (false, 1000)],
        }
    }

    /// One line, as in the README's legend (a test keeps the two in step).
    pub fn describe(self) -> &'static str {
        match self {
            LedPattern::Off => "off: the agent is not running",
            LedPattern::Healthy => "short blink every 2 s: healthy, the last backup is recent",
            LedPattern::Working => "fast blinking: a backup or drill the agent started is running",
            LedPattern::Acknowledge => "three quick flashes: button press seen",
            LedPattern::Failed => "steady on: no backup yet, the last run failed, or the backup is overdue",
            LedPattern::DrillFailed => "SOS (... --- ...): a restore drill failed",
            LedPattern::TargetMissing => "double blink every 2 s: the USB backup drive is missing",
            LedPattern::Attention => {
                "slow blink (1 s on, 1 s off): a restore drill is overdue or the drive is nearly full"
            }
        }
    }

    /// Played once, then the previous pattern comes back.
    pub fn is_transient(self) -> bool {
        self == LedPattern::Acknowledge
    }
}

/// Something that can be switched on and off. Implementations do one write per call: timing
/// belongs to the [`Blinker`](super::Blinker).
pub trait StatusLed: Send {
    fn set(&mut self, on: bool) -> Result<(), HardwareError>;
    /// For logs and `doctor`: "GPIO 17", "/sys/class/leds/ACT", "none".
    fn name(&self) -> String;
    /// Restore what we changed (e.g. the ACT LED's trigger). Called once, after the last `set`.
    fn release(&mut self) -> Result<(), HardwareError>;
}

/// No LED configured: every call succeeds and does nothing.
#[derive(Debug, Default)]
pub struct NullLed;

impl StatusLed for NullLed {
    fn set(&mut self, _on: bool) -> Result<(), HardwareError> {
        Ok(())
    }
    fn name(&self) -> String {
        "none".to_string()
    }
    fn release(&mut self) -> Result<(), HardwareError> {
        Ok(())
    }
}

/// An LED (with its resistor) between a GPIO pin and ground: high is on.
#[derive(Debug)]
pub struct GpioLed {
    pin: rppal::gpio::OutputPin,
    number: u8,
}

impl GpioLed {
    /// Claims BCM pin `bcm_pin` as an output, driven low. Off a Pi this fails with
    /// [`HardwareError::NotAPi`].
    pub fn open(bcm_pin: u8) -> Result<Self, HardwareError> {
        let err = |e| gpio_error(e, "LED", bcm_pin, LED_PIN_KEY);
        let gpio = rppal::gpio::Gpio::new().map_err(err)?;
        let pin = gpio.get(bcm_pin).map_err(err)?.into_output_low();
        Ok(GpioLed { pin, number: bcm_pin })
    }
}

impl StatusLed for GpioLed {
    fn set(&mut self, on: bool) -> Result<(), HardwareError> {
        if on {
            self.pin.set_high();
        } else {
            self.pin.set_low();
        }
        Ok(())
    }
    fn name(&self) -> String {
        format!("GPIO {}", self.number)
    }
    fn release(&mut self) -> Result<(), HardwareError> {
        // rppal puts the pin back in its previous mode when `pin` is dropped.
        self.pin.set_low();
        Ok(())
    }
}

/// The Pi's onboard LED, driven through the kernel's LED class in sysfs.
#[derive(Debug)]
pub struct SysfsLed {
    dir: PathBuf,
    original_trigger: String,
    /// What `brightness` gets for "on": `max_brightness` when the LED has one.
    on_value: String,
    released: bool,
}

/// The onboard LED's name: `ACT` on current Raspberry Pi OS, `led0` on older kernels.
const ACT_LED_NAMES: [&str; 2] = ["ACT", "led0"];

impl SysfsLed {
    /// `sys_root` is "/" normally; tests pass a fixture directory. Takes the LED from its
    /// kernel trigger and switches it off; [`release`](StatusLed::release) gives it back.
    pub fn open(sys_root: &Path) -> Result<Self, HardwareError> {
        let leds = sys_root.join("sys/class/leds");
        let dir = ACT_LED_NAMES.iter().map(|name| leds.join(name)).find(|d| d.is_dir()).ok_or_else(|| {
            HardwareError::Sysfs {
                path: leds.join(ACT_LED_NAMES[0]),
                message: format!(
                    "no onboard LED here (looked for {}); is this a Raspberry Pi? set {ACT_LED_KEY} \
                     only on a Pi",
                    ACT_LED_NAMES.join(" and ")
                ),
            }
        })?;

        let trigger_path = dir.join("trigger");
        let triggers =
            fs::read_to_string(&trigger_path).map_err(|e| sysfs_error(&trigger_path, "read", &e))?;
        let original_trigger = active_trigger(&triggers).ok_or_else(|| HardwareError::Sysfs {
            path: trigger_path.clone(),
            message: format!("no active [trigger] in {:?}; is this an LED class directory?", triggers.trim()),
        })?;

        // Absent or unreadable max_brightness: "1" is on for every LED.
        let on_value = fs::read_to_string(dir.join("max_brightness"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|&max| max > 0)
            .map_or_else(|| "1".to_string(), |max| max.to_string());

        let mut led = SysfsLed { dir, original_trigger, on_value, released: true };
        write_attribute(&trigger_path, "none")?;
        led.released = false;
        // Proves brightness is writable now rather than at the first blink, and gives the
        // trigger back if it is not.
        if let Err(e) = led.set(false) {
            let _ = led.release();
            return Err(e);
        }
        Ok(led)
    }

    /// The trigger that was active before we took the LED (e.g. `mmc0`).
    pub fn original_trigger(&self) -> &str {
        &self.original_trigger
    }
}

impl StatusLed for SysfsLed {
    fn set(&mut self, on: bool) -> Result<(), HardwareError> {
        write_attribute(&self.dir.join("brightness"), if on { &self.on_value } else { "0" })
    }
    fn name(&self) -> String {
        self.dir.display().to_string()
    }
    fn release(&mut self) -> Result<(), HardwareError> {
        if self.released {
            return Ok(());
        }
        write_attribute(&self.dir.join("trigger"), &self.original_trigger)?;
        self.released = true;
        Ok(())
    }
}

impl Drop for SysfsLed {
    /// A SysfsLed dropped without `release` still gives the LED back to the kernel: otherwise
    /// the SD card activity light would stay dead until reboot.
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            log::warn!("could not restore the LED trigger: {e}");
        }
    }
}

/// The active trigger in a sysfs `trigger` listing: "none [mmc0] timer heartbeat" -> "mmc0".
fn active_trigger(listing: &str) -> Option<String> {
    listing
        .split_whitespace()
        .find_map(|t| t.strip_prefix('[').and_then(|t| t.strip_suffix(']')))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

/// Writes one sysfs attribute in one `write`, as `echo value > attr` does. The file must
/// exist: we never create files under /sys.
fn write_attribute(path: &Path, value: &str) -> Result<(), HardwareError> {
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| sysfs_error(path, "write", &e))
}

fn sysfs_error(path: &Path, verb: &str, e: &std::io::Error) -> HardwareError {
    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
        "; the onboard LED needs root or a udev rule that lets datavault's user write its \
         trigger and brightness"
    } else {
        ""
    };
    HardwareError::Sysfs { path: path.to_path_buf(), message: format!("cannot {verb} it: {e}{hint}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn period_ms(p: LedPattern) -> u32 {
        p.timeline().iter().map(|&(_, ms)| ms).sum()
    }

    #[test]
    fn timelines_alternate_and_have_no_empty_step() {
        for p in LedPattern::ALL {
            let t = p.timeline();
            assert!(!t.is_empty(), "{p:?}");
            assert!(t.iter().all(|&(_, ms)| ms > 0), "{p:?} has an empty step");
            assert!(t.windows(2).all(|w| w[0].0 != w[1].0), "{p:?} repeats a level");
        }
    }

    #[test]
    fn timelines_match_their_documented_rhythm() {
        assert_eq!(LedPattern::Healthy.timeline(), &[(true, 100), (false, 1900)]);
        assert_eq!(period_ms(LedPattern::Working), 200, "5 Hz");
        assert_eq!(period_ms(LedPattern::TargetMissing), 2000);
        assert_eq!(LedPattern::TargetMissing.timeline().iter().filter(|s| s.0).count(), 2);
        assert_eq!(LedPattern::Acknowledge.timeline().iter().filter(|s| s.0).count(), 3);
        assert_eq!(LedPattern::Failed.timeline(), &[(true, 1000)]);
        assert!(LedPattern::Off.timeline().iter().all(|s| !s.0));
    }

    #[test]
    fn drill_failed_spells_sos() {
        let morse: String = LedPattern::DrillFailed
            .timeline()
            .iter()
            .filter(|s| s.0)
            .map(|&(_, ms)| {
                if ms == U {
                    '.'
                } else if ms == 3 * U {
                    '-'
                } else {
                    '?'
                }
            })
            .collect();
        assert_eq!(morse, "...---...");
        assert_eq!(LedPattern::DrillFailed.timeline().last(), Some(&(false, 7 * U)), "word gap");
    }

    #[test]
    fn every_pattern_looks_different_and_is_described() {
        for (i, a) in LedPattern::ALL.iter().enumerate() {
            assert!(!a.describe().is_empty());
            for b in &LedPattern::ALL[i + 1..] {
                assert_ne!(a.timeline(), b.timeline(), "{a:?} and {b:?} look the same");
                assert_ne!(a.describe(), b.describe());
            }
        }
    }

    #[test]
    fn patterns_serialize_in_snake_case() {
        assert_eq!(serde_json::to_string(&LedPattern::TargetMissing).unwrap(), "\"target_missing\"");
    }

    #[test]
    fn active_trigger_is_the_bracketed_one() {
        assert_eq!(active_trigger("none [mmc0] timer heartbeat\n").as_deref(), Some("mmc0"));
        assert_eq!(active_trigger("[none] mmc0").as_deref(), Some("none"));
        assert_eq!(active_trigger("none mmc0"), None);
    }

    // ---- SysfsLed against a fixture tree ----

    fn fixture(name: &str, max_brightness: Option<&str>) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("sys/class/leds").join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("trigger"), "none rc-feedback kbd-scrolllock [mmc0] timer oneshot heartbeat\n")
            .unwrap();
        fs::write(dir.join("brightness"), "0\n").unwrap();
        if let Some(max) = max_brightness {
            fs::write(dir.join("max_brightness"), max).unwrap();
        }
        root
    }

    fn read(root: &Path, led: &str, attr: &str) -> String {
        fs::read_to_string(root.join("sys/class/leds").join(led).join(attr)).unwrap()
    }

    #[test]
    fn sysfs_led_takes_the_act_led_drives_it_and_gives_it_back() {
        let root = fixture("ACT", None);
        let mut led = SysfsLed::open(root.path()).unwrap();
        assert_eq!(led.original_trigger(), "mmc0");
        assert_eq!(read(root.path(), "ACT", "trigger"), "none");
        assert_eq!(read(root.path(), "ACT", "brightness"), "0");
        assert!(led.name().ends_with("sys/class/leds/ACT"), "{}", led.name());

        led.set(true).unwrap();
        assert_eq!(read(root.path(), "ACT", "brightness"), "1");
        led.set(false).unwrap();
        assert_eq!(read(root.path(), "ACT", "brightness"), "0");

        led.release().unwrap();
        assert_eq!(read(root.path(), "ACT", "trigger"), "mmc0");
    }

    #[test]
    fn sysfs_led_uses_max_brightness_for_on() {
        let root = fixture("ACT", Some("255\n"));
        let mut led = SysfsLed::open(root.path()).unwrap();
        led.set(true).unwrap();
        assert_eq!(read(root.path(), "ACT", "brightness"), "255");
    }

    #[test]
    fn sysfs_led_falls_back_to_led0_on_older_kernels() {
        let root = fixture("led0", None);
        let mut led = SysfsLed::open(root.path()).unwrap();
        assert!(led.name().ends_with("led0"));
        led.set(true).unwrap();
        assert_eq!(read(root.path(), "led0", "brightness"), "1");
    }

    #[test]
    fn dropping_a_sysfs_led_restores_its_trigger() {
        let root = fixture("ACT", None);
        let led = SysfsLed::open(root.path()).unwrap();
        assert_eq!(read(root.path(), "ACT", "trigger"), "none");
        drop(led);
        assert_eq!(read(root.path(), "ACT", "trigger"), "mmc0");
    }

    #[test]
    fn release_twice_writes_once() {
        let root = fixture("ACT", None);
        let mut led = SysfsLed::open(root.path()).unwrap();
        led.release().unwrap();
        fs::write(root.path().join("sys/class/leds/ACT/trigger"), "changed by someone else").unwrap();
        led.release().unwrap();
        drop(led);
        assert_eq!(read(root.path(), "ACT", "trigger"), "changed by someone else");
    }

    #[test]
    fn a_missing_led_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let err = SysfsLed::open(root.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, HardwareError::Sysfs { .. }));
        assert!(msg.contains("sys/class/leds/ACT") && msg.contains("led0"), "{msg}");
        assert!(msg.contains("Raspberry Pi"), "{msg}");
    }

    #[test]
    fn unwritable_brightness_fails_open_and_restores_the_trigger() {
        let root = fixture("ACT", None);
        // A directory in place of the attribute makes the write fail, even for root.
        let brightness = root.path().join("sys/class/leds/ACT/brightness");
        fs::remove_file(&brightness).unwrap();
        fs::create_dir(&brightness).unwrap();
        let err = SysfsLed::open(root.path()).unwrap_err();
        assert!(err.to_string().contains("ACT/brightness: cannot write it"), "{err}");
        assert_eq!(read(root.path(), "ACT", "trigger"), "mmc0");
    }

    #[test]
    fn gpio_led_off_a_pi_says_so() {
        // This test machine is no Raspberry Pi. (On a Pi it would claim BCM 17: skip there.)
        if crate::hardware::tests::is_raspberry_pi() {
            return;
        }
        let err = GpioLed::open(17).unwrap_err();
        assert!(matches!(err, HardwareError::NotAPi(_)), "{err:?}");
        assert!(err.to_string().contains("Raspberry Pi"), "{err}");
        assert!(err.to_string().contains("gpio.led_pin"), "{err}");
    }
}

#[cfg(test)]
mod readme_tests {
    use super::*;

    /// The README's LED table is what an owner reads at night: it must match the patterns.
    #[test]
    fn the_readme_describes_every_pattern() {
        let readme = include_str!("../../README.md");
        for (pattern, words) in [
            (LedPattern::Healthy, "short blink every 2 s"),
            (LedPattern::Working, "fast blinking"),
            (LedPattern::Acknowledge, "three quick flashes"),
            (LedPattern::Failed, "steady on"),
            (LedPattern::DrillFailed, "SOS"),
            (LedPattern::TargetMissing, "double blink every 2 s"),
            (LedPattern::Attention, "slow blink (1 s on, 1 s off)"),
        ] {
            assert!(pattern.describe().contains(words), "{pattern:?}: {}", pattern.describe());
            assert!(readme.contains(&format!("| {words}")), "README lacks the {pattern:?} row");
        }
    }
}
