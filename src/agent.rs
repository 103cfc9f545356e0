//! `datavault agent`: the long-running appliance mode. It owns the status LED and the push
//! button, runs backups and drills when the button is pressed or SIGUSR1 arrives, and keeps
//! the LED showing the health read from the catalog.
//!
//! Shaped like zincati: signal handlers, the button thread, job threads and the clock only
//! *send events* to one channel; one pure function, [`decide`], turns (state, event) into
//! actions; [`run`] performs them. The tests feed [`decide`] synthetic timelines.
//!
//! Jobs take the same run lock as the CLI, so a button press during the nightly timer run is
//! answered by a blink ("busy") and never starts a second run.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::config::Settings;
use crate::error::{exit, Error, Result};
use crate::hardware::{self, Blinker, LedPattern, Press, PressDetector};
use crate::ops::health::Health;
use crate::ops::{self, backup::BackupOptions, Env, Trigger};
use crate::progress::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Backup,
    Drill,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Another run held the lock.
    Busy,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM or SIGINT.
    Terminate,
    /// SIGHUP.
    Reload,
    /// SIGUSR1.
    BackupRequested,
    Button(Press),
    /// Time passes (health refresh, watchdog).
    Tick,
    JobDone(Job, Outcome),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start(Job, Trigger),
    /// Blink to say "heard you" (a press while busy, or a run refused by the lock).
    Acknowledge,
    ShowWorking,
    RefreshHealth,
    ReloadConfig,
    CancelJob,
    Exit,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct State {
    pub running: Option<Job>,
    pub stopping: bool,
}

/// The one place that decides what the agent does.
pub fn decide(state: &mut State, event: Event) -> Vec<Action> {
    use Action::*;
    match event {
        Event::Terminate if state.stopping => vec![Exit],
        Event::Terminate => {
            state.stopping = true;
            if state.running.is_some() {
                vec![CancelJob]
            } else {
                vec![Exit]
            }
        }
        Event::Reload => vec![ReloadConfig],
        Event::BackupRequested | Event::Button(_) if state.running.is_some() || state.stopping => {
            vec![Acknowledge]
        }
        Event::BackupRequested => start(state, Job::Backup, Trigger::Manual),
        Event::Button(Press::Short) => start(state, Job::Backup, Trigger::Button),
        Event::Button(Press::Long) => start(state, Job::Drill, Trigger::Button),
        Event::Tick if state.running.is_none() && !state.stopping => vec![RefreshHealth],
        Event::Tick => vec![],
        Event::JobDone(..) if state.stopping => {
            state.running = None;
            vec![Exit]
        }
        Event::JobDone(_, outcome) => {
            state.running = None;
            match outcome {
                Outcome::Busy => vec![Acknowledge, RefreshHealth],
                _ => vec![RefreshHealth],
            }
        }
    }
}

fn start(state: &mut State, job: Job, trigger: Trigger) -> Vec<Action> {
    state.running = Some(job);
    vec![Action::Start(job, trigger), Action::ShowWorking]
}

/// What [`Health`] says, reduced to what the LED shows.
#[derive(Debug, Clone)]
pub struct HealthInputs {
    pub target_ready: bool,
    pub last_backup_failed: bool,
    /// By the one rule, [`crate::ops::health::overdue`].
    pub overdue: bool,
    pub last_drill_failed: bool,
    /// By the one offsite rule, [`crate::ops::health::offsite_behind`].
    pub offsite_behind: bool,
    /// By the drill rule, [`crate::ops::health::drill_overdue`] (#15).
    pub drill_overdue: bool,
    pub drive_nearly_full: bool,
}

impl From<&Health> for HealthInputs {
    fn from(h: &Health) -> HealthInputs {
        HealthInputs {
            target_ready: h.target_problems.is_empty(),
            last_backup_failed: h.last_backup_failed() || h.catalog_problem.is_some(),
            overdue: h.overdue,
            last_drill_failed: h.last_drill_failed(),
            offsite_behind: h.offsite_behind(),
            drill_overdue: h.drill_overdue,
            drive_nearly_full: h.drive.as_ref().is_some_and(|d| d.nearly_full),
        }
    }
}

/// Most urgent first: a missing drive will make tonight fail; a failed drill means the
/// backups may not restore; a failed or overdue backup means the data is at risk; an overdue
/// drill or a filling drive only needs attention soon.
pub fn health(h: &HealthInputs) -> LedPattern {
    if !h.target_ready {
        LedPattern::TargetMissing
    } else if h.last_drill_failed {
        LedPattern::DrillFailed
    } else if h.last_backup_failed || h.overdue {
        LedPattern::Failed
    } else if h.drill_overdue || h.drive_nearly_full || h.offsite_behind {
        LedPattern::Attention
    } else {
        LedPattern::Healthy
    }
}

fn read_health(env: &Env) -> LedPattern {
    let h = Health::read(env, false);
    if let Some(p) = &h.catalog_problem {
        log::warn!("cannot read the catalog for the LED: {p}");
    }
    health(&HealthInputs::from(&h))
}

/// Progress for agent jobs: nothing shown, but cancellable on SIGTERM.
struct CancelFlag(Arc<AtomicBool>);

impl Progress for CancelFlag {
    fn cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

const TICK: Duration = Duration::from_secs(1);
const HEALTH_EVERY: Duration = Duration::from_secs(30);

/// Run the agent until SIGTERM/SIGINT. `config_path` is re-read on SIGHUP.
pub fn run(config_path: &Path) -> Result<()> {
    let settings = Settings::load(config_path)?;
    let (tx, rx) = mpsc::channel::<Event>();
    let mut agent = Agent::start(config_path, settings, tx)?;
    let watchdog = crate::notify::watchdog_interval();
    let mut last_watchdog = Instant::now();
    loop {
        let event = match rx.recv_timeout(TICK) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => Event::Tick,
            Err(RecvTimeoutError::Disconnected) => Event::Terminate,
        };
        if watchdog.is_some_and(|w| last_watchdog.elapsed() >= w) {
            crate::notify::notify("WATCHDOG=1");
            last_watchdog = Instant::now();
        }
        agent.job_done(&event);
        let is_tick = event == Event::Tick;
        for action in decide(&mut agent.state, event) {
            if agent.perform(action, is_tick) {
                return Ok(());
            }
        }
    }
}

/// The agent's resources; [`decide`] says what to do with them, [`Agent::perform`] does it.
struct Agent<'c> {
    config_path: &'c Path,
    settings: Settings,
    state: State,
    tx: Sender<Event>,
    /// Taken only when the agent stops.
    blinker: Option<Blinker>,
    signals: signal_hook::iterator::Handle,
    button: Option<(thread::JoinHandle<()>, Arc<AtomicBool>)>,
    cancel: Arc<AtomicBool>,
    job: Option<thread::JoinHandle<()>>,
    last_health: Instant,
}

impl<'c> Agent<'c> {
    /// Open the LED and the button (working without either if they fail), start the signal
    /// thread, show the health, and tell systemd we are ready.
    fn start(config_path: &'c Path, settings: Settings, tx: Sender<Event>) -> Result<Agent<'c>> {
        let g = settings.gpio.clone();
        let sys_root = crate::target::SystemRoot::from_env().0;
        let led = hardware::open_led(g.led_pin, g.act_led, &sys_root).unwrap_or_else(|e| {
            log::warn!("{e}; running without a status LED");
            Box::new(hardware::NullLed)
        });
        if g.led_pin.is_none() && !g.act_led && g.button_pin.is_none() {
            log::info!("no LED or button configured ([gpio]); the agent runs on signals and its timer only");
        }
        let signals = spawn_signals(tx.clone())?;
        let button = g.button_pin.and_then(|pin| match hardware::open_button(Some(pin), g.debounce) {
            Ok(b) => {
                let stop = Arc::new(AtomicBool::new(false));
                Some((spawn_button(b, g.clone(), tx.clone(), stop.clone()), stop))
            }
            Err(e) => {
                log::warn!("{e}; running without the button");
                None
            }
        });
        let agent = Agent {
            config_path,
            settings,
            state: State::default(),
            tx,
            blinker: Some(Blinker::start(led)),
            signals,
            button,
            cancel: Arc::new(AtomicBool::new(false)),
            job: None,
            last_health: Instant::now(),
        };
        agent.show(read_health(&env_for(&agent.settings, &agent.cancel)));
        crate::notify::notify("READY=1\nSTATUS=idle");
        log::info!("agent started (pid {})", std::process::id());
        Ok(agent)
    }

    /// Reap a finished job's thread and log how it ended.
    fn job_done(&mut self, event: &Event) {
        let Event::JobDone(job, outcome) = event else { return };
        if let Some(h) = self.job.take() {
            let _ = h.join();
        }
        match outcome {
            Outcome::Done => log::info!("{job:?} finished"),
            Outcome::Busy => log::info!("{job:?} not started: another run holds the lock"),
            Outcome::Failed(e) => log::error!("{job:?} failed: {e}"),
        }
    }

    /// Carry out one action; true when the agent must exit.
    fn perform(&mut self, action: Action, is_tick: bool) -> bool {
        match action {
            Action::Start(job, trigger) => {
                log::info!("starting {job:?} (trigger {trigger})");
                crate::notify::notify(&format!("STATUS=running {job:?}"));
                self.cancel.store(false, Ordering::Relaxed);
                self.job = Some(spawn_job(
                    job,
                    trigger,
                    self.settings.clone(),
                    self.cancel.clone(),
                    self.tx.clone(),
                ));
            }
            Action::Acknowledge => self.show(LedPattern::Acknowledge),
            Action::ShowWorking => self.show(LedPattern::Working),
            Action::RefreshHealth => {
                if !is_tick || self.last_health.elapsed() >= HEALTH_EVERY {
                    self.show(read_health(&env_for(&self.settings, &self.cancel)));
                    self.last_health = Instant::now();
                    crate::notify::notify("STATUS=idle");
                }
            }
            Action::ReloadConfig => self.reload(),
            Action::CancelJob => {
                log::info!("stopping: cancelling the running job (it removes what it was writing)");
                crate::notify::notify("STOPPING=1");
                self.cancel.store(true, Ordering::Relaxed);
            }
            Action::Exit => {
                self.stop();
                return true;
            }
        }
        false
    }

    fn show(&self, pattern: LedPattern) {
        if let Some(b) = &self.blinker {
            b.show(pattern);
        }
    }

    fn reload(&mut self) {
        match Settings::load(self.config_path) {
            Ok(new) => {
                if new.gpio != self.settings.gpio {
                    log::warn!("[gpio] changed: restart the agent to apply it");
                }
                self.settings = new;
                log::info!("configuration reloaded from {}", self.config_path.display());
                // Show the health under the new config at the next tick.
                self.last_health = Instant::now() - HEALTH_EVERY;
            }
            Err(e) => log::error!("reload refused, keeping the previous configuration: {e}"),
        }
    }

    fn stop(&mut self) {
        crate::notify::notify("STOPPING=1");
        self.signals.close();
        if let Some((h, stop)) = self.button.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = h.join();
        }
        if let Some(Err(e)) = self.blinker.take().map(Blinker::stop) {
            log::warn!("status LED: {e}");
        }
        log::info!("agent stopped");
    }
}

fn env_for(settings: &Settings, cancel: &Arc<AtomicBool>) -> Env {
    Env {
        progress: Arc::new(CancelFlag(cancel.clone())),
        ..Env::new(settings.clone(), Arc::new(crate::progress::NoProgress))
    }
}

fn spawn_job(
    job: Job,
    trigger: Trigger,
    settings: Settings,
    cancel: Arc<AtomicBool>,
    tx: Sender<Event>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let env = env_for(&settings, &cancel);
        let result = match job {
            Job::Backup => ops::backup::run(
                &env,
                &BackupOptions { kind: crate::manifest::ArchiveKind::Backup, trigger, comment: None },
            )
            .map(|_| ()),
            Job::Drill => ops::drill::run(&env, None, trigger).and_then(|r| {
                if r.passed {
                    Ok(())
                } else {
                    Err(Error::integrity(&r.archive, "DRILL FAILED"))
                }
            }),
        };
        let outcome = match result {
            Ok(()) => Outcome::Done,
            Err(e) if e.exit_code() == exit::LOCKED => Outcome::Busy,
            Err(e) => Outcome::Failed(e.to_string()),
        };
        let _ = tx.send(Event::JobDone(job, outcome));
    })
}

fn spawn_signals(tx: Sender<Event>) -> Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
        .map_err(|e| Error::io("cannot install signal handlers", e))?;
    let handle = signals.handle();
    thread::spawn(move || {
        for sig in signals.forever() {
            let event = match sig {
                SIGHUP => Event::Reload,
                SIGUSR1 => Event::BackupRequested,
                _ => Event::Terminate,
            };
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    Ok(handle)
}

fn spawn_button(
    mut button: Box<dyn hardware::ButtonInput>,
    g: crate::config::GpioSettings,
    tx: Sender<Event>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let epoch = Instant::now();
        let mut detector =
            PressDetector::new(hardware::ButtonConfig { debounce: g.debounce, long_press: g.long_press });
        while !stop.load(Ordering::Relaxed) {
            // Wake for the detector's next deadline (debounce end, long-press threshold), and
            // at least every 100 ms to notice shutdown.
            let max_wait = Duration::from_millis(100);
            let wait = detector
                .next_deadline()
                .map_or(max_wait, |d| d.saturating_sub(epoch.elapsed()).min(max_wait));
            let press = match button.wait_edge(wait) {
                Ok(Some(pressed)) => detector.edge(pressed, epoch.elapsed()),
                Ok(None) => detector.tick(epoch.elapsed()),
                Err(e) => {
                    log::error!("button: {e}; the button is ignored from now on");
                    return;
                }
            };
            if let Some(p) = press {
                if tx.send(Event::Button(p)).is_err() {
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    fn timeline(events: Vec<Event>) -> Vec<Vec<Action>> {
        let mut s = State::default();
        events.into_iter().map(|e| decide(&mut s, e)).collect()
    }

    #[test]
    fn a_short_press_backs_up_and_a_long_press_drills() {
        let t = timeline(vec![
            Event::Button(Press::Short),
            Event::JobDone(Job::Backup, Outcome::Done),
            Event::Button(Press::Long),
            Event::JobDone(Job::Drill, Outcome::Done),
        ]);
        assert_eq!(t[0], vec![Start(Job::Backup, Trigger::Button), ShowWorking]);
        assert_eq!(t[1], vec![RefreshHealth]);
        assert_eq!(t[2], vec![Start(Job::Drill, Trigger::Button), ShowWorking]);
    }

    #[test]
    fn presses_and_signals_during_a_run_are_acknowledged_not_started() {
        let t = timeline(vec![
            Event::BackupRequested,
            Event::Button(Press::Short),
            Event::Button(Press::Long),
            Event::BackupRequested,
            Event::Tick,
            Event::JobDone(Job::Backup, Outcome::Done),
            Event::Button(Press::Short),
        ]);
        assert_eq!(t[0], vec![Start(Job::Backup, Trigger::Manual), ShowWorking]);
        assert_eq!(t[1], vec![Acknowledge]);
        assert_eq!(t[2], vec![Acknowledge]);
        assert_eq!(t[3], vec![Acknowledge]);
        assert_eq!(t[4], vec![], "no health refresh while working");
        assert_eq!(t[6], vec![Start(Job::Backup, Trigger::Button), ShowWorking]);
    }

    #[test]
    fn a_run_refused_by_the_lock_is_acknowledged() {
        let t = timeline(vec![Event::Button(Press::Short), Event::JobDone(Job::Backup, Outcome::Busy)]);
        assert_eq!(t[1], vec![Acknowledge, RefreshHealth]);
    }

    #[test]
    fn terminate_cancels_a_running_job_then_exits_when_it_is_done() {
        let t = timeline(vec![
            Event::Button(Press::Short),
            Event::Terminate,
            Event::Button(Press::Short),
            Event::JobDone(Job::Backup, Outcome::Failed("cancelled".into())),
        ]);
        assert_eq!(t[1], vec![CancelJob]);
        assert_eq!(t[2], vec![Acknowledge], "nothing new starts while stopping");
        assert_eq!(t[3], vec![Exit]);
    }

    #[test]
    fn terminate_when_idle_exits_and_a_second_terminate_forces_exit() {
        assert_eq!(timeline(vec![Event::Terminate]), vec![vec![Exit]]);
        let t = timeline(vec![Event::BackupRequested, Event::Terminate, Event::Terminate]);
        assert_eq!(t[2], vec![Exit]);
    }

    #[test]
    fn reload_is_accepted_even_while_working() {
        let t = timeline(vec![Event::BackupRequested, Event::Reload]);
        assert_eq!(t[1], vec![ReloadConfig]);
    }

    /// Weeks in the life of a Pi that never reboots (#15): nightly backups, weekly drills, then
    /// the drill timer stops. The LED follows the drill rule day by day.
    #[test]
    fn a_drill_that_stops_happening_shows_on_the_led_after_max_age_days() {
        use crate::ops::health::drill_overdue;
        use chrono::{DateTime, Duration, Utc};
        let start: DateTime<Utc> = "2026-11-01T04:00:00Z".parse().unwrap();
        let max = Duration::days(crate::config::DEFAULT_DRILL_MAX_AGE_DAYS as i64);
        let mut last_drill: Option<DateTime<Utc>> = None;
        let mut seen = Vec::new();
        for day in 0..40 {
            let now = start + Duration::days(day) + Duration::hours(2);
            // Sundays' drill runs for the first three weeks only.
            if day % 7 == 0 && day < 21 {
                last_drill = Some(now);
            }
            let inputs = HealthInputs {
                target_ready: true,
                last_backup_failed: false,
                overdue: false,
                last_drill_failed: false,
                drill_overdue: drill_overdue(last_drill, Some(start), now, max),
                drive_nearly_full: false,
                offsite_behind: false,
            };
            seen.push((day, health(&inputs)));
        }
        let first_attention = seen.iter().find(|(_, p)| *p == LedPattern::Attention).map(|(d, _)| *d);
        // Last drill on day 14; overdue once more than 8 days have passed: day 23.
        assert_eq!(first_attention, Some(23));
        assert!(seen[..23].iter().all(|(_, p)| *p == LedPattern::Healthy));
        assert!(seen[23..].iter().all(|(_, p)| *p == LedPattern::Attention));
        // No drill ever, but backups for 9 days: overdue from the first backup's clock.
        assert!(drill_overdue(None, Some(start), start + Duration::days(9), max));
        assert!(!drill_overdue(None, None, start + Duration::days(90), max), "nothing to drill yet");
    }

    #[test]
    fn health_picks_the_most_urgent_pattern() {
        let good = HealthInputs {
            target_ready: true,
            last_backup_failed: false,
            overdue: false,
            last_drill_failed: false,
            offsite_behind: false,
            drill_overdue: false,
            drive_nearly_full: false,
        };
        assert_eq!(health(&good), LedPattern::Healthy);
        assert_eq!(health(&HealthInputs { offsite_behind: true, ..good.clone() }), LedPattern::Attention);
        assert_eq!(health(&HealthInputs { drill_overdue: true, ..good.clone() }), LedPattern::Attention);
        assert_eq!(health(&HealthInputs { drive_nearly_full: true, ..good.clone() }), LedPattern::Attention);
        assert_eq!(
            health(&HealthInputs { drill_overdue: true, overdue: true, ..good.clone() }),
            LedPattern::Failed,
            "a backup at risk outranks a drill that is late"
        );
        assert_eq!(health(&HealthInputs { overdue: true, ..good.clone() }), LedPattern::Failed);
        assert_eq!(health(&HealthInputs { last_backup_failed: true, ..good.clone() }), LedPattern::Failed);
        assert_eq!(
            health(&HealthInputs { last_drill_failed: true, last_backup_failed: true, ..good.clone() }),
            LedPattern::DrillFailed
        );
        assert_eq!(
            health(&HealthInputs { target_ready: false, last_drill_failed: true, ..good }),
            LedPattern::TargetMissing
        );
    }
}
