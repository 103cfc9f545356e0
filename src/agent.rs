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

use chrono::{DateTime, Utc};

use crate::catalog::{Catalog, Event as CatalogEvent, RunStatus};
use crate::config::Settings;
use crate::error::{exit, Error, Result};
use crate::hardware::{self, Blinker, LedPattern, Press, PressDetector};
use crate::ops::{self, backup::BackupOptions, Env};
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
    Start(Job, &'static str),
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
        Event::BackupRequested => start(state, Job::Backup, "manual"),
        Event::Button(Press::Short) => start(state, Job::Backup, "button"),
        Event::Button(Press::Long) => start(state, Job::Drill, "button"),
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

fn start(state: &mut State, job: Job, trigger: &'static str) -> Vec<Action> {
    state.running = Some(job);
    vec![Action::Start(job, trigger), Action::ShowWorking]
}

/// What the catalog and the target say, reduced to what the LED shows.
#[derive(Debug, Clone)]
pub struct HealthInputs {
    pub now: DateTime<Utc>,
    pub target_ready: bool,
    pub last_backup_failed: bool,
    pub last_success: Option<DateTime<Utc>>,
    pub last_drill_failed: bool,
    pub max_age_hours: u32,
}

/// Most urgent first: a missing drive will make tonight fail; a failed drill means the
/// backups may not restore; a failed or overdue backup means the data is at risk.
pub fn health(h: &HealthInputs) -> LedPattern {
    let overdue = match h.last_success {
        None => true,
        Some(t) => h.now - t > chrono::Duration::hours(h.max_age_hours as i64),
    };
    if !h.target_ready {
        LedPattern::TargetMissing
    } else if h.last_drill_failed {
        LedPattern::DrillFailed
    } else if h.last_backup_failed || overdue {
        LedPattern::Failed
    } else {
        LedPattern::Healthy
    }
}

fn read_health(env: &Env) -> LedPattern {
    let s = &env.settings;
    let target_ready = crate::target::inspect(&s.target, &env.system_root)
        .map(|t| t.problems(&s.target).is_empty())
        .unwrap_or(false);
    let (last_backup_failed, last_success, last_drill_failed) = match Catalog::open(&s.state.catalog_path()) {
        Ok(c) => (
            c.last_run("backup", None).ok().flatten().map(|r| r.status == RunStatus::Failed).unwrap_or(false),
            c.last_run("backup", Some(RunStatus::Success)).ok().flatten().and_then(|r| r.ended_at),
            c.last_event(&[CatalogEvent::DrillPassed, CatalogEvent::DrillFailed])
                .ok()
                .flatten()
                .map(|e| e.event == CatalogEvent::DrillFailed)
                .unwrap_or(false),
        ),
        Err(e) => {
            log::warn!("cannot read the catalog for the LED: {e}");
            (true, None, false)
        }
    };
    health(&HealthInputs {
        now: ops::now(),
        target_ready,
        last_backup_failed,
        last_success,
        last_drill_failed,
        max_age_hours: s.agent.max_age_hours,
    })
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
    let mut settings = Settings::load(config_path)?;
    let g = settings.gpio.clone();
    let sys_root = crate::target::SystemRoot::from_env().0;
    let led = match hardware::open_led(g.led_pin, g.act_led, &sys_root) {
        Ok(l) => l,
        Err(e) => {
            log::warn!("{e}; running without a status LED");
            Box::new(hardware::NullLed)
        }
    };
    if g.led_pin.is_none() && !g.act_led && g.button_pin.is_none() {
        log::info!("no LED or button configured ([gpio]); the agent runs on signals and its timer only");
    }
    let blinker = Blinker::start(led);
    let (tx, rx) = mpsc::channel::<Event>();
    let signals_handle = spawn_signals(tx.clone())?;
    let button_stop = Arc::new(AtomicBool::new(false));
    let button_thread = match g.button_pin {
        None => None,
        Some(pin) => match hardware::open_button(Some(pin), g.debounce) {
            Ok(b) => Some(spawn_button(b, g.clone(), tx.clone(), button_stop.clone())),
            Err(e) => {
                log::warn!("{e}; running without the button");
                None
            }
        },
    };

    let mut state = State::default();
    let cancel = Arc::new(AtomicBool::new(false));
    let mut job_thread: Option<thread::JoinHandle<()>> = None;
    let watchdog = crate::notify::watchdog_interval();
    let mut last_health = Instant::now() - HEALTH_EVERY;
    let mut last_watchdog = Instant::now();
    blinker.show(read_health(&env_for(&settings, &cancel)));
    crate::notify::notify("READY=1\nSTATUS=idle");
    log::info!("agent started (pid {})", std::process::id());

    loop {
        let event = match rx.recv_timeout(TICK) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => Event::Tick,
            Err(RecvTimeoutError::Disconnected) => Event::Terminate,
        };
        if let Some(w) = watchdog {
            if last_watchdog.elapsed() >= w {
                crate::notify::notify("WATCHDOG=1");
                last_watchdog = Instant::now();
            }
        }
        if let Event::JobDone(job, outcome) = &event {
            if let Some(h) = job_thread.take() {
                let _ = h.join();
            }
            match outcome {
                Outcome::Done => log::info!("{job:?} finished"),
                Outcome::Busy => log::info!("{job:?} not started: another run holds the lock"),
                Outcome::Failed(e) => log::error!("{job:?} failed: {e}"),
            }
        }
        let is_tick = event == Event::Tick;
        for action in decide(&mut state, event) {
            match action {
                Action::Start(job, trigger) => {
                    log::info!("starting {job:?} (trigger {trigger})");
                    crate::notify::notify(&format!("STATUS=running {job:?}"));
                    cancel.store(false, Ordering::Relaxed);
                    job_thread = Some(spawn_job(job, trigger, settings.clone(), cancel.clone(), tx.clone()));
                }
                Action::Acknowledge => blinker.show(LedPattern::Acknowledge),
                Action::ShowWorking => blinker.show(LedPattern::Working),
                Action::RefreshHealth => {
                    if !is_tick || last_health.elapsed() >= HEALTH_EVERY {
                        blinker.show(read_health(&env_for(&settings, &cancel)));
                        last_health = Instant::now();
                        crate::notify::notify("STATUS=idle");
                    }
                }
                Action::ReloadConfig => match Settings::load(config_path) {
                    Ok(new) => {
                        if new.gpio != settings.gpio {
                            log::warn!("[gpio] changed: restart the agent to apply it");
                        }
                        settings = new;
                        log::info!("configuration reloaded from {}", config_path.display());
                        last_health = Instant::now() - HEALTH_EVERY;
                    }
                    Err(e) => log::error!("reload refused, keeping the previous configuration: {e}"),
                },
                Action::CancelJob => {
                    log::info!("stopping: cancelling the running job (it removes what it was writing)");
                    crate::notify::notify("STOPPING=1");
                    cancel.store(true, Ordering::Relaxed);
                }
                Action::Exit => {
                    crate::notify::notify("STOPPING=1");
                    button_stop.store(true, Ordering::Relaxed);
                    signals_handle.close();
                    if let Some(h) = button_thread {
                        let _ = h.join();
                    }
                    if let Err(e) = blinker.stop() {
                        log::warn!("status LED: {e}");
                    }
                    log::info!("agent stopped");
                    return Ok(());
                }
            }
        }
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
    trigger: &'static str,
    settings: Settings,
    cancel: Arc<AtomicBool>,
    tx: Sender<Event>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let env = env_for(&settings, &cancel);
        let result = match job {
            Job::Backup => ops::backup::run(
                &env,
                &BackupOptions {
                    kind: crate::manifest::ArchiveKind::Backup,
                    trigger: trigger.into(),
                    comment: None,
                },
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
        assert_eq!(t[0], vec![Start(Job::Backup, "button"), ShowWorking]);
        assert_eq!(t[1], vec![RefreshHealth]);
        assert_eq!(t[2], vec![Start(Job::Drill, "button"), ShowWorking]);
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
        assert_eq!(t[0], vec![Start(Job::Backup, "manual"), ShowWorking]);
        assert_eq!(t[1], vec![Acknowledge]);
        assert_eq!(t[2], vec![Acknowledge]);
        assert_eq!(t[3], vec![Acknowledge]);
        assert_eq!(t[4], vec![], "no health refresh while working");
        assert_eq!(t[6], vec![Start(Job::Backup, "button"), ShowWorking]);
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

    #[test]
    fn health_picks_the_most_urgent_pattern() {
        let now: DateTime<Utc> = "2026-11-23T12:00:00Z".parse().unwrap();
        let good = HealthInputs {
            now,
            target_ready: true,
            last_backup_failed: false,
            last_success: Some(now - chrono::Duration::hours(3)),
            last_drill_failed: false,
            max_age_hours: 26,
        };
        assert_eq!(health(&good), LedPattern::Healthy);
        assert_eq!(
            health(&HealthInputs { last_success: Some(now - chrono::Duration::hours(27)), ..good.clone() }),
            LedPattern::Failed
        );
        assert_eq!(health(&HealthInputs { last_success: None, ..good.clone() }), LedPattern::Failed);
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
