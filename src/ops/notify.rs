//! `datavault notify` and the recording every run does on its way out (#15).
//!
//! [`record_after_run`] runs inside the sandboxed backup and drill units, which have no
//! network: it only writes the outbox. [`run`] (the `datavault-notify` unit, with network)
//! records what time alone changed (an overdue backup) and sends what is pending. Neither
//! ever changes a run's outcome: their errors are logged.

use chrono::Utc;
use serde::Serialize;

use crate::alerts::email::Sendmail;
use crate::alerts::outbox::{self, Channel};
use crate::alerts::send::{self, Http, HttpPoster, MailSender, SendReport, Senders};
use crate::alerts::{Message, Severity};
use crate::catalog::{Catalog, RunStatus};
use crate::error::Result;
use crate::lock::RunLock;
use crate::ops::health::Health;
use crate::ops::{host, Env, RunError};

/// Called by [`crate::ops::Run::end_as`]: record the state changes this run caused, and a
/// backup's ping. Never fails the run.
pub fn record_after_run(
    env: &Env,
    catalog: &Catalog,
    command: &str,
    status: RunStatus,
    error: Option<&RunError>,
    archive: Option<&str>,
) {
    let n = &env.settings.notify;
    let host = host();
    if command == "backup" && n.ping.any() {
        let (summary, code) = match (status, error) {
            (RunStatus::Failed, Some(e)) => (e.message.clone(), e.exit_code()),
            (RunStatus::Failed, None) => ("backup failed".to_string(), crate::error::exit::FAILURE),
            _ => (format!("backup {} created", archive.unwrap_or("")), 0),
        };
        if let Err(e) = outbox::record_ping(catalog, n, Utc::now(), &summary, code, &host) {
            log::warn!("cannot record the backup's ping: {e}");
        }
    }
    let health = Health::read(env, false);
    if let Err(e) = outbox::record(catalog, &health, n, &host) {
        log::warn!("cannot record notifications: {e}");
    }
}

#[derive(Debug, Serialize)]
pub struct NotifyOutcome {
    /// Notifications recorded by this run (state changes seen now).
    pub recorded: usize,
    #[serde(flatten)]
    pub sent: SendReport,
    /// Another `datavault notify` was sending: this one did nothing.
    pub busy: bool,
}

/// Record what changed, then send everything pending. Takes its own small lock (never the
/// backups' run lock, so a notification never makes a button press wait).
pub fn run(env: &Env) -> Result<NotifyOutcome> {
    run_with(env, &Http, &Sendmail { path: sendmail_path(env), timeout: env.settings.notify.timeout })
}

fn sendmail_path(env: &Env) -> std::path::PathBuf {
    env.settings.notify.email.as_ref().map(|e| e.sendmail.clone()).unwrap_or_default()
}

pub fn run_with(env: &Env, http: &dyn HttpPoster, mail: &dyn MailSender) -> Result<NotifyOutcome> {
    let s = &env.settings;
    crate::config::check_state_dir(&s.state.dir)?;
    let _lock = match RunLock::acquire(&s.state.dir.join("notify.lock"), "notify") {
        Ok(l) => l,
        Err(e) if e.exit_code() == crate::error::exit::LOCKED => {
            log::info!("another `datavault notify` is sending; nothing to do");
            return Ok(NotifyOutcome { recorded: 0, sent: SendReport::default(), busy: true });
        }
        Err(e) => return Err(e),
    };
    let catalog = Catalog::open_or_rebuild(&s.state.catalog_path())?;
    let host = host();
    let health = Health::read(env, false);
    let recorded = outbox::record(&catalog, &health, &s.notify, &host)?;
    let senders = Senders { http, mail, host };
    let sent = send::deliver_pending(&catalog, &s.notify, &senders, Utc::now())?;
    // Read again: the outbox changed.
    if let Err(e) = crate::metrics::write(&s.state.metrics_path(), &catalog, &Health::read(env, false)) {
        log::warn!("cannot write metrics: {e}");
    }
    Ok(NotifyOutcome { recorded, sent, busy: false })
}

/// `datavault notify --test`: one message through every configured channel (pings
/// excepted: a test must not count as a backup), sent now.
pub fn test(env: &Env) -> Result<NotifyOutcome> {
    let s = &env.settings;
    let channels = outbox::message_channels(&s.notify);
    if channels.is_empty() {
        return Err(crate::error::Error::Usage(
            "no notification channel is configured: set notify.ntfy_url or notify.email_to in the config"
                .into(),
        ));
    }
    let catalog = Catalog::open_or_rebuild(&s.state.catalog_path())?;
    let host = host();
    let m = Message {
        event: "TEST".into(),
        state: "DONE".into(),
        severity: Severity::Info,
        title: format!("DataVault on {host}: test notification"),
        body: format!("DataVault on {host}: this is a test (datavault notify --test). Notifications work."),
    };
    outbox::insert_message(&catalog, Utc::now(), &m, &channels)?;
    run(env)
}

/// `datavault notify --start`: the healthchecks start ping, sent at once. Never fails: the
/// backup it announces must run whatever happens here.
pub fn start_ping(env: &Env) -> std::result::Result<bool, String> {
    start_ping_with(env, &Http)
}

pub fn start_ping_with(env: &Env, http: &dyn HttpPoster) -> std::result::Result<bool, String> {
    send::ping_start(&env.settings.notify, http, &format!("backup starting on {}", host()))
}

/// Channels that would carry a state change now (for `doctor`).
pub fn channels(env: &Env) -> Vec<Channel> {
    let mut v = outbox::message_channels(&env.settings.notify);
    if env.settings.notify.ping.any() {
        v.insert(0, Channel::Ping);
    }
    v
}
