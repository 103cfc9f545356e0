//! The push button: raw edges in, [`Press`]es out.
//!
//! A mechanical button bounces: one press is a burst of edges a few milliseconds apart, and a
//! loose wire adds lone glitches. [`PressDetector`] turns raw edges into short and long
//! presses and is pure (no pin, no clock: time comes in with every call), so each scenario is
//! a synthetic timeline in a unit test. The kernel's own debounce (rppal's `set_interrupt`)
//! filters too; running ours on top is harmless and keeps the behaviour the same on every
//! backend.
//!
//! A long press is reported the moment it is reached, while the finger is still down, so the
//! LED can acknowledge it and the user knows when to let go. That needs [`PressDetector::tick`]
//! to be called while nothing happens on the pin; [`PressDetector::next_deadline`] says when.

use std::time::Duration;

use super::error::{gpio_error, HardwareError, BUTTON_PIN_KEY};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ButtonConfig {
    /// How long a level must hold before it counts.
    pub debounce: Duration,
    /// How long the button must be held for a [`Press::Long`].
    pub long_press: Duration,
}

impl Default for ButtonConfig {
    fn default() -> Self {
        ButtonConfig { debounce: Duration::from_millis(50), long_press: Duration::from_secs(3) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Press {
    Short,
    Long,
}

/// Debouncing and press classification, fed with raw edges and ticks.
///
/// A level counts once it has held for `debounce`; the press then dates from its first edge
/// of that stable run (the finger going down), not from the moment it was confirmed.
#[derive(Debug, Clone)]
pub struct PressDetector {
    cfg: ButtonConfig,
    /// The last raw level seen, and since when.
    raw: bool,
    raw_since: Duration,
    /// The debounced level.
    stable: bool,
    /// When the current stable press began.
    press_start: Duration,
    long_reported: bool,
}

impl PressDetector {
    /// Starts released: a button held down at start counts only from its release and next press.
    pub fn new(cfg: ButtonConfig) -> Self {
        PressDetector {
            cfg,
            raw: false,
            raw_since: Duration::ZERO,
            stable: false,
            press_start: Duration::ZERO,
            long_reported: false,
        }
    }

    /// Feeds a raw level change (`pressed` = true: the active-low pin went low) seen at `at`, a
    /// monotonic time since any fixed epoch. Returns a press when one completes.
    pub fn edge(&mut self, pressed: bool, at: Duration) -> Option<Press> {
        let press = self.settle(at).or_else(|| self.check_long(at));
        // A repeated level (an edge we missed in between) changes nothing.
        if pressed != self.raw {
            self.raw = pressed;
            self.raw_since = at;
        }
        press
    }

    /// Called while no edge comes: confirms a level that has now held for `debounce`, and
    /// reports [`Press::Long`] once, as soon as the button has been held for `long_press`.
    pub fn tick(&mut self, at: Duration) -> Option<Press> {
        self.settle(at).or_else(|| self.check_long(at))
    }

    /// The next time at which a `tick` could report something, if any: when the pending level
    /// becomes stable, or when the held button becomes a long press.
    pub fn next_deadline(&self) -> Option<Duration> {
        if self.raw != self.stable {
            Some(self.raw_since + self.cfg.debounce)
        } else if self.stable && !self.long_reported {
            Some(self.press_start + self.cfg.long_press)
        } else {
            None
        }
    }

    /// True while the debounced level is "pressed".
    pub fn is_pressed(&self) -> bool {
        self.stable
    }

    /// Commits the pending raw level if it has held for `debounce` by `at`.
    fn settle(&mut self, at: Duration) -> Option<Press> {
        if self.raw == self.stable || at.saturating_sub(self.raw_since) < self.cfg.debounce {
            return None;
        }
        self.stable = self.raw;
        if self.stable {
            self.press_start = self.raw_since;
            self.long_reported = false;
            return None;
        }
        // Released: the press lasted until the first edge of the stable release.
        if self.long_reported {
            None
        } else if self.raw_since.saturating_sub(self.press_start) >= self.cfg.long_press {
            Some(Press::Long)
        } else {
            Some(Press::Short)
        }
    }

    /// A button still down (stable and raw) for `long_press` by `at` is a long press, once.
    fn check_long(&mut self, at: Duration) -> Option<Press> {
        if self.stable
            && self.raw
            && !self.long_reported
            && at.saturating_sub(self.press_start) >= self.cfg.long_press
        {
            self.long_reported = true;
            Some(Press::Long)
        } else {
            None
        }
    }
}

/// A source of raw button edges.
pub trait ButtonInput: Send {
    /// Blocks up to `timeout` for the next raw edge: `Some(true)` when the button went down,
    /// `Some(false)` when it came up, `None` on timeout.
    fn wait_edge(&mut self, timeout: Duration) -> Result<Option<bool>, HardwareError>;
    /// For logs and `doctor`: "GPIO 27", "none".
    fn name(&self) -> String;
}

/// A button between a GPIO pin and ground, using the Pi's internal pull-up: active low.
#[derive(Debug)]
pub struct GpioButton {
    pin: rppal::gpio::InputPin,
    number: u8,
}

impl GpioButton {
    /// Claims BCM pin `bcm_pin` as an input with pull-up and asks the kernel for both edges,
    /// debounced by `debounce`. Off a Pi this fails with [`HardwareError::NotAPi`].
    pub fn open(bcm_pin: u8, debounce: Duration) -> Result<Self, HardwareError> {
        let err = |e| gpio_error(e, "button", bcm_pin, BUTTON_PIN_KEY);
        let gpio = rppal::gpio::Gpio::new().map_err(err)?;
        let mut pin = gpio.get(bcm_pin).map_err(err)?.into_input_pullup();
        pin.set_interrupt(rppal::gpio::Trigger::Both, Some(debounce)).map_err(err)?;
        Ok(GpioButton { pin, number: bcm_pin })
    }

    /// The level now, for a button already held when the agent starts.
    pub fn is_pressed(&self) -> bool {
        self.pin.is_low()
    }
}

impl ButtonInput for GpioButton {
    fn wait_edge(&mut self, timeout: Duration) -> Result<Option<bool>, HardwareError> {
        // reset = false: with true, rppal reopens the line request on every call and drops the
        // edges queued while the agent was busy, and a lost release reads as a held button.
        let event = self
            .pin
            .poll_interrupt(false, Some(timeout))
            .map_err(|e| gpio_error(e, "button", self.number, BUTTON_PIN_KEY))?;
        Ok(event.map(|e| e.trigger == rppal::gpio::Trigger::FallingEdge))
    }
    fn name(&self) -> String {
        format!("GPIO {}", self.number)
    }
}

/// No button configured: never any edge.
#[derive(Debug, Default)]
pub struct NoButton;

impl ButtonInput for NoButton {
    fn wait_edge(&mut self, timeout: Duration) -> Result<Option<bool>, HardwareError> {
        // Blocking like a real button keeps the caller's loop identical for both backends.
        std::thread::sleep(timeout);
        Ok(None)
    }
    fn name(&self) -> String {
        "none".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// One raw input at a time, in ms: an edge (`Some(level)`) or a tick (`None`).
    type Input = (u64, Option<bool>);

    /// Feeds a timeline to a detector with the default config and returns what it reported,
    /// with the time of each report.
    fn run(timeline: &[Input]) -> Vec<(u64, Press)> {
        let mut d = PressDetector::new(ButtonConfig::default());
        timeline
            .iter()
            .filter_map(|&(t, input)| {
                let press = match input {
                    Some(level) => d.edge(level, ms(t)),
                    None => d.tick(ms(t)),
                };
                press.map(|p| (t, p))
            })
            .collect()
    }

    /// Edges alternating from `first`, at the given times.
    fn burst(first: bool, times: &[u64]) -> Vec<Input> {
        times.iter().enumerate().map(|(i, &t)| (t, Some(first ^ (i % 2 == 1)))).collect()
    }

    /// Ticks every 10 ms over [from, to].
    fn ticks(from: u64, to: u64) -> Vec<Input> {
        (from..=to).step_by(10).map(|t| (t, None)).collect()
    }

    fn timeline(parts: &[Vec<Input>]) -> Vec<Input> {
        let mut all: Vec<Input> = parts.concat();
        all.sort_by_key(|i| i.0);
        all
    }

    #[test]
    fn clean_short_press() {
        let got = run(&timeline(&[burst(true, &[100, 300]), ticks(0, 1000)]));
        // Reported once the release has held for debounce.
        assert_eq!(got, [(350, Press::Short)]);
    }

    #[test]
    fn short_press_with_bounce_at_press_and_release() {
        let press = burst(true, &[100, 105, 110, 115, 120]);
        let release = burst(false, &[400, 405, 410, 415, 420]);
        let got = run(&timeline(&[press, release, ticks(0, 1000)]));
        assert_eq!(got, [(470, Press::Short)]);
    }

    #[test]
    fn a_glitch_shorter_than_debounce_is_nothing() {
        assert_eq!(run(&timeline(&[burst(true, &[100, 130]), ticks(0, 5000)])), []);
        // Even without ticks in between, the next edge does not make it count.
        assert_eq!(run(&burst(true, &[100, 130, 5000, 5020])), []);
    }

    #[test]
    fn a_press_shorter_than_debounce_is_nothing() {
        assert_eq!(run(&timeline(&[burst(true, &[100, 149]), ticks(0, 1000)])), []);
    }

    #[test]
    fn long_press_is_reported_by_tick_while_still_held() {
        let got = run(&timeline(&[burst(true, &[100, 5000]), ticks(0, 6000)]));
        assert_eq!(got, [(3100, Press::Long)], "at the threshold, not at release");
    }

    #[test]
    fn long_press_with_bounce_is_reported_once() {
        let press = burst(true, &[90, 94, 100, 105, 110]);
        let release = burst(false, &[4000, 4004, 4009, 4012, 4016]);
        let got = run(&timeline(&[press, release, ticks(0, 8000)]));
        assert_eq!(got, [(3110, Press::Long)]);
    }

    #[test]
    fn long_press_without_ticks_is_reported_at_the_next_edge_and_not_again() {
        let got = run(&[(100, Some(true)), (4000, Some(false)), (9000, Some(true)), (9010, Some(false))]);
        assert_eq!(got, [(4000, Press::Long)]);
    }

    #[test]
    fn a_release_glitch_during_a_hold_does_not_split_it() {
        let got = run(&timeline(&[burst(true, &[100, 1000, 1010, 5000]), ticks(0, 6000)]));
        assert_eq!(got, [(3100, Press::Long)]);
    }

    #[test]
    fn a_release_just_before_the_threshold_is_short() {
        let got = run(&timeline(&[burst(true, &[100, 3099]), ticks(0, 4000)]));
        assert_eq!(got, [(3150, Press::Short)], "held 2999 ms");
    }

    #[test]
    fn two_presses_in_a_row() {
        let first = burst(true, &[100, 102, 104, 250]);
        let second = burst(true, &[600, 604, 606, 800, 803, 806]);
        let got = run(&timeline(&[first, second, ticks(0, 2000)]));
        assert_eq!(got, [(300, Press::Short), (860, Press::Short)]);
    }

    #[test]
    fn a_long_press_then_a_short_one() {
        let got = run(&timeline(&[burst(true, &[0, 3500, 4000, 4200]), ticks(0, 5000)]));
        assert_eq!(got, [(3000, Press::Long), (4250, Press::Short)]);
    }

    #[test]
    fn a_repeated_level_changes_nothing() {
        let got = run(&timeline(&[
            vec![(100, Some(true)), (120, Some(true)), (300, Some(false)), (330, Some(false))],
            ticks(0, 1000),
        ]));
        assert_eq!(got, [(350, Press::Short)]);
    }

    #[test]
    fn next_deadline_says_when_to_tick() {
        let mut d = PressDetector::new(ButtonConfig::default());
        assert_eq!(d.next_deadline(), None);
        d.edge(true, ms(100));
        assert_eq!(d.next_deadline(), Some(ms(150)), "confirm the press");
        d.tick(ms(150));
        assert!(d.is_pressed());
        assert_eq!(d.next_deadline(), Some(ms(3100)), "the long-press threshold");
        assert_eq!(d.tick(ms(3100)), Some(Press::Long));
        assert_eq!(d.next_deadline(), None, "nothing until the release");
        d.edge(false, ms(3500));
        assert_eq!(d.next_deadline(), Some(ms(3550)));
        assert_eq!(d.tick(ms(3550)), None, "the long press was already reported");
        assert!(!d.is_pressed());
        assert_eq!(d.next_deadline(), None);
    }

    #[test]
    fn gpio_button_off_a_pi_says_so() {
        if crate::hardware::tests::is_raspberry_pi() {
            return;
        }
        let err = GpioButton::open(27, ms(50)).unwrap_err();
        assert!(matches!(err, HardwareError::NotAPi(_)), "{err:?}");
        assert!(err.to_string().contains("Raspberry Pi"), "{err}");
        assert!(err.to_string().contains("gpio.button_pin"), "{err}");
    }

    #[test]
    fn no_button_times_out_without_an_edge() {
        assert_eq!(NoButton.wait_edge(Duration::ZERO).unwrap(), None);
        assert_eq!(NoButton.name(), "none");
    }
}
