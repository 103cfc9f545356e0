//! Plays [`LedPattern`]s on a [`StatusLed`] from a background thread, so the agent only says
//! *what* to show and never sleeps for an LED.
//!
//! The thread waits on its command channel with `recv_timeout` until the next step is due:
//! no busy loop, and a new pattern shows at once. Which level comes next is decided by
//! [`PatternPlayer`], a pure state machine tested without threads or clocks. Two rules a
//! caller relies on: showing the pattern already on display does not restart it (the agent
//! may re-assert `Healthy` every tick without freezing the heartbeat), and `Acknowledge`
//! plays once to its end, then the pattern that was showing, or the last one asked for
//! meanwhile, comes back.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::error::HardwareError;
use super::led::{LedPattern, StatusLed};

/// Where in which pattern the LED is. Pure: feed it `show` and `advance`, it says what to
/// light and for how long.
#[derive(Debug, Clone)]
pub struct PatternPlayer {
    pattern: LedPattern,
    /// What comes back once a transient pattern (`Acknowledge`) has played.
    resume: LedPattern,
    next_step: usize,
}

impl PatternPlayer {
    pub fn new(pattern: LedPattern) -> Self {
        let resume = if pattern.is_transient() { LedPattern::Off } else { pattern };
        PatternPlayer { pattern, resume, next_step: 0 }
    }

    /// The pattern on display now.
    pub fn pattern(&self) -> LedPattern {
        self.pattern
    }

    /// Asks for `pattern`. Returns true when the display must change now (the caller cuts
    /// the current step short); false when nothing changes yet: the pattern is already
    /// showing, or an `Acknowledge` is playing and `pattern` will follow it.
    pub fn show(&mut self, pattern: LedPattern) -> bool {
        if pattern.is_transient() {
            if !self.pattern.is_transient() {
                self.resume = self.pattern;
            }
            self.pattern = pattern;
            self.next_step = 0;
            true
        } else if self.pattern.is_transient() {
            self.resume = pattern;
            false
        } else if pattern == self.pattern {
            false
        } else {
            self.pattern = pattern;
            self.next_step = 0;
            true
        }
    }

    /// The next step: the level to show from now, and for how long.
    pub fn advance(&mut self) -> (bool, Duration) {
        if self.next_step >= self.pattern.timeline().len() {
            if self.pattern.is_transient() {
                self.pattern = self.resume;
            }
            self.next_step = 0;
        }
        let (on, ms) = self.pattern.timeline()[self.next_step];
        self.next_step += 1;
        (on, Duration::from_millis(u64::from(ms)))
    }
}

/// Renders patterns on a [`StatusLed`] in a background thread. Starts with
/// [`LedPattern::Off`]. [`stop`](Blinker::stop) (or drop) turns the LED off and releases it.
#[derive(Debug)]
pub struct Blinker {
    commands: Option<mpsc::Sender<LedPattern>>,
    thread: Option<JoinHandle<Result<(), HardwareError>>>,
    led_name: String,
}

impl Blinker {
    /// Spawns the thread that owns `led`.
    ///
    /// # Panics
    /// If the OS cannot create a thread, as `std::thread::spawn` does.
    pub fn start(led: Box<dyn StatusLed>) -> Blinker {
        let led_name = led.name();
        let (commands, inbox) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("datavault-led".into())
            .spawn(move || play(led, &inbox))
            .expect("cannot start the LED thread");
        Blinker { commands: Some(commands), thread: Some(thread), led_name }
    }

    /// Shows `pattern` from now on (see the module docs for `Acknowledge` and repeats).
    /// Never blocks.
    pub fn show(&self, pattern: LedPattern) {
        if let Some(commands) = &self.commands {
            // The thread only ends through `stop`: a failed send means it panicked, and
            // `stop` reports that.
            let _ = commands.send(pattern);
        }
    }

    /// The LED being driven, for logs and `doctor`.
    pub fn led_name(&self) -> &str {
        &self.led_name
    }

    /// Turns the LED off, releases it (e.g. gives the ACT LED back to the kernel) and joins
    /// the thread. Patterns already sent are shown first; an `Acknowledge` is cut short.
    pub fn stop(mut self) -> Result<(), HardwareError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), HardwareError> {
        // Closing the channel is the stop signal: the thread sees it after the queued patterns.
        self.commands = None;
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => {
                log::error!("the LED thread panicked; {} may be left as it was", self.led_name);
                Ok(())
            }
        }
    }
}

impl Drop for Blinker {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::warn!("could not switch off the status LED: {e}");
        }
    }
}

/// The thread's body: plays until the channel closes, then switches off and releases.
fn play(mut led: Box<dyn StatusLed>, inbox: &mpsc::Receiver<LedPattern>) -> Result<(), HardwareError> {
    let mut player = PatternPlayer::new(LedPattern::Off);
    let mut writer = LevelWriter::default();
    let mut due = Instant::now();
    loop {
        let now = Instant::now();
        if now >= due {
            let (on, hold) = player.advance();
            writer.write(led.as_mut(), on);
            due = now + hold;
        }
        match inbox.recv_timeout(due.saturating_duration_since(Instant::now())) {
            Ok(pattern) => {
                if player.show(pattern) {
                    due = Instant::now();
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let off = led.set(false);
    let released = led.release();
    off.and(released)
}

/// Writes only level changes (a steady pattern costs no I/O), and logs a failing LED once
/// rather than ten times a second.
#[derive(Debug, Default)]
struct LevelWriter {
    last: Option<bool>,
    failing: bool,
}

impl LevelWriter {
    fn write(&mut self, led: &mut dyn StatusLed, on: bool) {
        if self.last == Some(on) {
            return;
        }
        match led.set(on) {
            Ok(()) => {
                self.last = Some(on);
                self.failing = false;
            }
            Err(e) => {
                if !self.failing {
                    log::warn!("status LED {}: {e}", led.name());
                }
                self.failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LedPattern::*;

    // ---- PatternPlayer: pure ----

    fn steps(player: &mut PatternPlayer, n: usize) -> Vec<bool> {
        (0..n).map(|_| player.advance().0).collect()
    }

    #[test]
    fn a_pattern_repeats_its_timeline() {
        let mut p = PatternPlayer::new(Healthy);
        let got: Vec<_> = (0..4).map(|_| p.advance()).collect();
        let ms = Duration::from_millis;
        assert_eq!(got, [(true, ms(100)), (false, ms(1900)), (true, ms(100)), (false, ms(1900))]);
    }

    #[test]
    fn acknowledge_plays_once_then_resumes_the_previous_pattern() {
        let mut p = PatternPlayer::new(Failed);
        p.advance();
        assert!(p.show(Acknowledge));
        let ack = Acknowledge.timeline().len();
        assert_eq!(steps(&mut p, ack), Acknowledge.timeline().iter().map(|s| s.0).collect::<Vec<_>>());
        assert_eq!(p.pattern(), Acknowledge);
        assert!(p.advance().0, "Failed is back");
        assert_eq!(p.pattern(), Failed);
    }

    #[test]
    fn a_pattern_asked_for_during_acknowledge_follows_it() {
        let mut p = PatternPlayer::new(Healthy);
        p.show(Acknowledge);
        p.advance();
        assert!(!p.show(Working), "the acknowledgement is not cut short");
        assert_eq!(p.pattern(), Acknowledge);
        steps(&mut p, Acknowledge.timeline().len() - 1);
        assert_eq!(p.advance(), (true, Duration::from_millis(100)));
        assert_eq!(p.pattern(), Working);
    }

    #[test]
    fn acknowledge_during_acknowledge_restarts_it_and_still_resumes_the_original() {
        let mut p = PatternPlayer::new(TargetMissing);
        p.show(Acknowledge);
        steps(&mut p, 3);
        assert!(p.show(Acknowledge));
        steps(&mut p, Acknowledge.timeline().len());
        assert_eq!(p.pattern(), Acknowledge, "restarted from its first step");
        p.advance();
        assert_eq!(p.pattern(), TargetMissing);
    }

    #[test]
    fn showing_the_current_pattern_does_not_restart_it() {
        let mut p = PatternPlayer::new(Healthy);
        assert!(p.advance().0);
        assert!(!p.show(Healthy));
        assert!(!p.advance().0, "still in the same period");
        assert!(p.show(Failed));
        assert!(p.advance().0);
        assert!(p.show(Off));
        assert!(!p.advance().0);
    }

    #[test]
    fn an_initial_acknowledge_resumes_off() {
        let mut p = PatternPlayer::new(Acknowledge);
        steps(&mut p, Acknowledge.timeline().len());
        p.advance();
        assert_eq!(p.pattern(), Off);
    }

    // ---- Blinker: the thread, with a recording LED ----

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Call {
        Set(bool),
        Release,
    }

    struct RecordingLed {
        calls: mpsc::Sender<(Call, Instant)>,
        fail_sets: bool,
    }

    impl StatusLed for RecordingLed {
        fn set(&mut self, on: bool) -> Result<(), HardwareError> {
            let _ = self.calls.send((Call::Set(on), Instant::now()));
            if self.fail_sets {
                return Err(HardwareError::Gpio("broken".into()));
            }
            Ok(())
        }
        fn name(&self) -> String {
            "recording".into()
        }
        fn release(&mut self) -> Result<(), HardwareError> {
            let _ = self.calls.send((Call::Release, Instant::now()));
            Ok(())
        }
    }

    fn recording(fail_sets: bool) -> (Blinker, mpsc::Receiver<(Call, Instant)>) {
        let (tx, rx) = mpsc::channel();
        (Blinker::start(Box::new(RecordingLed { calls: tx, fail_sets })), rx)
    }

    /// Waits for the next `n` calls. The timeout only turns a hang into a failure.
    fn next_calls(rx: &mpsc::Receiver<(Call, Instant)>, n: usize) -> Vec<Call> {
        (0..n)
            .map(|i| rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|e| panic!("call {i}: {e}")).0)
            .collect()
    }

    /// Everything recorded after the thread has ended (the LED is dropped with it).
    fn rest(rx: &mpsc::Receiver<(Call, Instant)>) -> Vec<(Call, Instant)> {
        rx.iter().collect()
    }

    #[test]
    fn blinker_shows_acknowledge_then_the_previous_pattern() {
        let (blinker, rx) = recording(false);
        assert_eq!(blinker.led_name(), "recording");
        blinker.show(Failed);
        blinker.show(Acknowledge);
        use Call::Set;
        assert_eq!(
            next_calls(&rx, 10),
            [
                Set(false), // Off, at start
                Set(true),  // Failed
                Set(false), // Acknowledge: dark gap, then three flashes
                Set(true),
                Set(false),
                Set(true),
                Set(false),
                Set(true),
                Set(false),
                Set(true), // Failed again
            ]
        );
        blinker.stop().unwrap();
        let calls: Vec<Call> = rest(&rx).into_iter().map(|c| c.0).collect();
        assert_eq!(calls, [Set(false), Call::Release], "a steady pattern writes nothing more");
    }

    #[test]
    fn blinker_plays_a_blinking_pattern_until_told_otherwise() {
        let (blinker, rx) = recording(false);
        blinker.show(Working);
        assert_eq!(
            next_calls(&rx, 5),
            [Call::Set(false), Call::Set(true), Call::Set(false), Call::Set(true), Call::Set(false)]
        );
        blinker.show(Failed);
        blinker.stop().unwrap();

        let calls = rest(&rx);
        let levels: Vec<Call> = calls.iter().map(|c| c.0).collect();
        // Patterns queued before stop are shown: Failed's steady light is the last level.
        assert_eq!(levels[levels.len() - 3..], [Call::Set(true), Call::Set(false), Call::Release]);
        assert!(levels.windows(2).all(|w| w[0] != w[1]), "only changes are written: {levels:?}");
        assert!(calls.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn dropping_the_blinker_switches_off_and_releases() {
        let (blinker, rx) = recording(false);
        blinker.show(Failed);
        drop(blinker);
        let calls: Vec<Call> = rest(&rx).into_iter().map(|c| c.0).collect();
        assert_eq!(calls, [Call::Set(false), Call::Set(true), Call::Set(false), Call::Release]);
    }

    #[test]
    fn a_failing_led_keeps_the_blinker_alive_and_is_still_released() {
        let (blinker, rx) = recording(true);
        blinker.show(Working);
        // Failed writes are retried at every step: the thread keeps running.
        assert_eq!(next_calls(&rx, 3), [Call::Set(false), Call::Set(true), Call::Set(false)]);
        let err = blinker.stop().unwrap_err();
        assert_eq!(err.to_string(), "broken");
        assert_eq!(rest(&rx).last().map(|c| c.0), Some(Call::Release));
    }
}
