//! The notification outbox in the catalog (schema version 2): `notify_state` (what the owner
//! was last told about each condition), `notifications` (one row per state change, restore
//! or backup ping) and `deliveries` (one row per channel: pending, sent, given up, with the
//! attempts and the last error). Recording needs no network; sending reads and marks rows.
//!
//! Only titles and bodies written by [`super`] go in: never a URL, a topic or a token (the
//! errors stored in `last_error` are passed through [`super::send::redact`] first).

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use serde::Serialize;

use super::{changes, ping_message, restore_message, Condition, Message, Severity, Told};
use crate::catalog::{opt_time_col, time_col, ts, Catalog};
use crate::config::NotifySettings;
use crate::error::{Context, Result};
use crate::ops::health::Health;

/// How a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Channel {
    Ping,
    Ntfy,
    Email,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Ping => "PING",
            Channel::Ntfy => "NTFY",
            Channel::Email => "EMAIL",
        }
    }

    pub fn parse(s: &str) -> Option<Channel> {
        [Channel::Ping, Channel::Ntfy, Channel::Email].into_iter().find(|c| c.as_str() == s)
    }
}

/// The channels that carry state changes and restores (pings carry backup runs only).
pub fn message_channels(n: &NotifySettings) -> Vec<Channel> {
    let mut v = Vec::new();
    if n.ntfy.is_some() {
        v.push(Channel::Ntfy);
    }
    if n.email.is_some() {
        v.push(Channel::Email);
    }
    v
}

/// A delivery waiting to be made.
#[derive(Debug, Clone, Serialize)]
pub struct Pending {
    pub id: i64,
    pub channel: Channel,
    pub created_at: DateTime<Utc>,
    pub event: String,
    pub state: String,
    pub severity: Severity,
    pub title: String,
    pub body: String,
    pub attempts: i64,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Sent,
    /// Still pending: retried at the next run.
    Failed,
    /// Not retried: the channel was removed from the config, or the message is too old to
    /// matter.
    GaveUp,
    /// A newer ping of the same kind replaces it.
    Superseded,
}

const RESTORE_KEY: &str = "RESTORE_DONE";

/// Compare what [`Health`] shows with what the owner was last told, and record every change
/// (and a new restore) as a notification, with a pending delivery on each configured
/// channel. One transaction: two processes recording at once cannot both tell the same
/// change. Returns how many notifications were recorded.
pub fn record(catalog: &Catalog, health: &Health, n: &NotifySettings, host: &str) -> Result<usize> {
    let what = || format!("catalog {}: recording notifications", catalog.path().display());
    let tx = Transaction::new_unchecked(catalog.conn(), TransactionBehavior::Immediate).context(what)?;
    let told: Vec<(String, String)> = {
        let mut st = tx.prepare("SELECT condition, state FROM notify_state").context(what)?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).context(what)?;
        rows.collect::<rusqlite::Result<_>>().context(what)?
    };
    let lookup = |c: Condition| {
        told.iter().find(|(k, _)| k == c.as_str()).map(|(_, v)| {
            if v == "PROBLEM" {
                Told::Problem
            } else {
                Told::Fine
            }
        })
    };
    let (mut messages, states) = changes(&lookup, &super::observe(health), host);
    let at = ts(health.now);
    for (c, state, detail) in states {
        let text = if state == Told::Problem { "PROBLEM" } else { "FINE" };
        tx.execute(
            "INSERT INTO notify_state (condition, state, since, detail) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (condition) DO UPDATE SET state = ?2, since = ?3, detail = ?4",
            params![c.as_str(), text, at, detail],
        )
        .context(what)?;
    }
    let restored: i64 =
        told.iter().find(|(k, _)| k == RESTORE_KEY).and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    if let Some((m, id)) = restore_message(health, restored, host) {
        tx.execute(
            "INSERT INTO notify_state (condition, state, since, detail) VALUES (?1, ?2, ?3, '')
             ON CONFLICT (condition) DO UPDATE SET state = ?2, since = ?3",
            params![RESTORE_KEY, id.to_string(), at],
        )
        .context(what)?;
        messages.push(m);
    }
    let channels = message_channels(n);
    for m in &messages {
        log::info!("notification: {} ({})", m.title, m.state);
        insert(&tx, health.now, m, &channels).context(what)?;
    }
    tx.commit().context(what)?;
    Ok(messages.len())
}

/// A finished backup run's ping (success or failure), if a ping URL is configured.
pub fn record_ping(
    catalog: &Catalog,
    n: &NotifySettings,
    at: DateTime<Utc>,
    summary: &str,
    exit_code: u8,
    host: &str,
) -> Result<()> {
    let wanted = if exit_code == 0 { n.ping.success.is_some() } else { n.ping.failure.is_some() };
    if !wanted {
        return Ok(());
    }
    let what = || format!("catalog {}: recording the backup's ping", catalog.path().display());
    insert(catalog.conn(), at, &ping_message(summary, exit_code, host), &[Channel::Ping]).context(what)
}

/// A message recorded by hand (`datavault notify --test`).
pub fn insert_message(catalog: &Catalog, at: DateTime<Utc>, m: &Message, channels: &[Channel]) -> Result<()> {
    insert(catalog.conn(), at, m, channels)
        .context(|| format!("catalog {}: recording a notification", catalog.path().display()))
}

fn insert(
    conn: &rusqlite::Connection,
    at: DateTime<Utc>,
    m: &Message,
    channels: &[Channel],
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO notifications (created_at, event, state, severity, title, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![ts(at), m.event, m.state, m.severity.as_str(), m.title, m.body],
    )?;
    let id = conn.last_insert_rowid();
    for c in channels {
        conn.execute(
            "INSERT INTO deliveries (notification_id, channel, status) VALUES (?1, ?2, 'PENDING')",
            params![id, c.as_str()],
        )?;
    }
    Ok(())
}

/// Every pending delivery, oldest first.
pub fn pending(catalog: &Catalog) -> Result<Vec<Pending>> {
    let what = || format!("catalog {}: reading pending notifications", catalog.path().display());
    let mut st = catalog
        .conn()
        .prepare(
            "SELECT n.id, d.channel, n.created_at, n.event, n.state, n.severity, n.title, n.body, d.attempts
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE d.status = 'PENDING' ORDER BY n.id, d.channel",
        )
        .context(what)?;
    let rows = st
        .query_map([], |r| {
            let text = |i: usize| -> rusqlite::Result<String> { r.get(i) };
            Ok(Pending {
                id: r.get(0)?,
                channel: Channel::parse(&text(1)?).unwrap_or(Channel::Ping),
                created_at: time_col(r, 2)?,
                event: text(3)?,
                state: text(4)?,
                severity: Severity::parse(&text(5)?).unwrap_or(Severity::Info),
                title: text(6)?,
                body: text(7)?,
                attempts: r.get(8)?,
            })
        })
        .context(what)?;
    rows.collect::<rusqlite::Result<_>>().context(what)
}

/// Record what became of a delivery. `error` must already be redacted.
pub fn mark(
    catalog: &Catalog,
    p: &Pending,
    fate: Fate,
    error: Option<&str>,
    at: DateTime<Utc>,
) -> Result<()> {
    let (status, attempt) = match fate {
        Fate::Sent => ("SENT", 1),
        Fate::Failed => ("PENDING", 1),
        Fate::GaveUp => ("GAVE_UP", 0),
        Fate::Superseded => ("SUPERSEDED", 0),
    };
    catalog
        .conn()
        .execute(
            "UPDATE deliveries SET status = ?3, attempts = attempts + ?4, last_error = COALESCE(?5, last_error),
                    sent_at = CASE WHEN ?3 = 'SENT' THEN ?6 ELSE sent_at END
             WHERE notification_id = ?1 AND channel = ?2",
            params![p.id, p.channel.as_str(), status, attempt, error, ts(at)],
        )
        .context(|| format!("catalog {}: recording a delivery", catalog.path().display()))?;
    Ok(())
}

/// How many deliveries wait, and the last error among them (for `status` and the metrics).
pub fn pending_summary(catalog: &Catalog) -> Result<(usize, Option<String>)> {
    let what = || format!("catalog {}: counting pending notifications", catalog.path().display());
    let n: i64 = catalog
        .conn()
        .query_row("SELECT count(*) FROM deliveries WHERE status = 'PENDING'", [], |r| r.get(0))
        .context(what)?;
    let err: Option<String> = catalog
        .conn()
        .query_row(
            "SELECT last_error FROM deliveries WHERE status = 'PENDING' AND last_error IS NOT NULL
             ORDER BY notification_id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()
        .context(what)?;
    Ok((n as usize, err))
}

/// One notification with its deliveries, for `datavault notify --list` and `audit`.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub id: i64,
    pub created_at: DateTime<Utc>,
    pub event: String,
    pub state: String,
    pub severity: String,
    pub title: String,
    pub channel: Option<String>,
    pub status: Option<String>,
    pub attempts: i64,
    pub sent_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// The newest `limit` notifications (one line per delivery; none if no channel was set).
pub fn recent(catalog: &Catalog, limit: usize) -> Result<Vec<Record>> {
    let what = || format!("catalog {}: reading notifications", catalog.path().display());
    let mut st = catalog
        .conn()
        .prepare(
            "SELECT n.id, n.created_at, n.event, n.state, n.severity, n.title, d.channel, d.status,
                    COALESCE(d.attempts, 0), d.sent_at, d.last_error
             FROM notifications n LEFT JOIN deliveries d ON d.notification_id = n.id
             WHERE n.id IN (SELECT id FROM notifications ORDER BY id DESC LIMIT ?1)
             ORDER BY n.id DESC, d.channel",
        )
        .context(what)?;
    let rows = st
        .query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok(Record {
                id: r.get(0)?,
                created_at: time_col(r, 1)?,
                event: r.get(2)?,
                state: r.get(3)?,
                severity: r.get(4)?,
                title: r.get(5)?,
                channel: r.get(6)?,
                status: r.get(7)?,
                attempts: r.get(8)?,
                sent_at: opt_time_col(r, 9)?,
                last_error: r.get(10)?,
            })
        })
        .context(what)?;
    rows.collect::<rusqlite::Result<_>>().context(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_move_from_pending_to_sent_or_stay_with_their_error() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let mut n = NotifySettings::default();
        n.ping.success = Some(crate::config::SecretUrl::new("http://127.0.0.1:1/ping"));
        let t: DateTime<Utc> = "2026-12-04T04:00:00Z".parse().unwrap();
        record_ping(&cat, &n, t, "backup created", 0, "pi").unwrap();
        record_ping(&cat, &n, t, "target not mounted", 3, "pi").unwrap(); // no failure URL: nothing
        let p = pending(&cat).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].channel, p[0].state.as_str()), (Channel::Ping, "SUCCESS"));
        mark(&cat, &p[0], Fate::Failed, Some("connection refused"), t).unwrap();
        assert_eq!(pending_summary(&cat).unwrap(), (1, Some("connection refused".into())));
        let p = pending(&cat).unwrap();
        assert_eq!(p[0].attempts, 1);
        mark(&cat, &p[0], Fate::Sent, None, t).unwrap();
        assert_eq!(pending_summary(&cat).unwrap().0, 0);
        let r = recent(&cat, 10).unwrap();
        assert_eq!((r[0].status.as_deref(), r[0].attempts, r[0].sent_at), (Some("SENT"), 2, Some(t)));
    }
}
