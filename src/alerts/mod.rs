//! Telling the owner (#15): which conditions are worth a message, the one rule that decides
//! when (once per change of state, never again while it lasts), and the channels that carry
//! it (healthchecks-style pings, ntfy, e-mail through sendmail).
//!
//! The work is split by privilege. Backups and drills run without network: at the end of
//! every run they only *record* ([`outbox::record`]): the conditions read from [`Health`] are
//! compared with what the owner was last told, and each change becomes a notification row
//! with one delivery per configured channel, in the catalog. `datavault notify` (its own
//! unit, with network) records too (time alone makes a backup overdue) and then *sends* what
//! is pending ([`send::deliver_pending`]); what cannot be sent stays pending for the next run.
//!
//! Adding a condition (say "offsite copy behind", once that work lands) is one variant of
//! [`Condition`] and one line in [`observe`]: the state rule, the outbox and the channels do
//! not change.

pub mod email;
pub mod outbox;
pub mod send;

use serde::Serialize;

use crate::ops::health::Health;
use crate::target::human_bytes;

/// Something that is either wrong or fine, and whose change the owner hears about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Condition {
    BackupFailed,
    BackupOverdue,
    DrillFailed,
    DrillOverdue,
    DriveMissing,
    DriveNearlyFull,
    /// The offsite copy is behind (#10): [`crate::ops::health::offsite_behind`].
    OffsiteBehind,
}

impl Condition {
    pub const ALL: [Condition; 7] = [
        Condition::BackupFailed,
        Condition::BackupOverdue,
        Condition::DrillFailed,
        Condition::DrillOverdue,
        Condition::DriveMissing,
        Condition::DriveNearlyFull,
        Condition::OffsiteBehind,
    ];

    /// The catalog's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::BackupFailed => "BACKUP_FAILED",
            Condition::BackupOverdue => "BACKUP_OVERDUE",
            Condition::DrillFailed => "DRILL_FAILED",
            Condition::DrillOverdue => "DRILL_OVERDUE",
            Condition::DriveMissing => "DRIVE_MISSING",
            Condition::DriveNearlyFull => "DRIVE_NEARLY_FULL",
            Condition::OffsiteBehind => "OFFSITE_BEHIND",
        }
    }

    pub fn parse(s: &str) -> Option<Condition> {
        Condition::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// How loud the message is while the problem lasts (ntfy's priority, the mail subject).
    pub fn severity(self) -> Severity {
        match self {
            Condition::BackupFailed | Condition::DrillFailed | Condition::DriveMissing => Severity::Critical,
            Condition::BackupOverdue
            | Condition::DrillOverdue
            | Condition::DriveNearlyFull
            | Condition::OffsiteBehind => Severity::Warning,
        }
    }

    fn problem_title(self) -> &'static str {
        match self {
            Condition::BackupFailed => "backup failed",
            Condition::BackupOverdue => "backup overdue",
            Condition::DrillFailed => "restore drill failed",
            Condition::DrillOverdue => "restore drill overdue",
            Condition::DriveMissing => "backup drive missing",
            Condition::DriveNearlyFull => "backup drive nearly full",
            Condition::OffsiteBehind => "offsite copy behind",
        }
    }

    fn resolved_title(self) -> &'static str {
        match self {
            Condition::BackupFailed => "backups work again",
            Condition::BackupOverdue => "backups are up to date again",
            Condition::DrillFailed => "restore drill passes again",
            Condition::DrillOverdue => "restore drills are up to date again",
            Condition::DriveMissing => "backup drive is back",
            Condition::DriveNearlyFull => "backup drive has room again",
            Condition::OffsiteBehind => "offsite copy is up to date again",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "INFO",
            Severity::Warning => "WARNING",
            Severity::Critical => "CRITICAL",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        [Severity::Info, Severity::Warning, Severity::Critical].into_iter().find(|v| v.as_str() == s)
    }

    /// ntfy's priority: 5 urgent, 4 high, 3 default; good news is 2 (low).
    pub fn ntfy_priority(self) -> u8 {
        match self {
            Severity::Critical => 5,
            Severity::Warning => 4,
            Severity::Info => 3,
        }
    }
}

/// One condition as [`Health`] shows it now. `problem: None` means it cannot be told now
/// (no catalog, the drive unreadable): the last known state stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub condition: Condition,
    pub problem: Option<bool>,
    pub detail: String,
}

/// The conditions, read from [`Health`]: one line each, nothing decided elsewhere.
pub fn observe(h: &Health) -> Vec<Observation> {
    let known = h.catalog_problem.is_none();
    let o = |condition, problem: Option<bool>, detail: String| Observation { condition, problem, detail };
    let backup_error = h.last_backup_run.as_ref().and_then(|r| r.error.clone()).unwrap_or_default();
    let drive = h.drive.as_ref();
    vec![
        o(Condition::BackupFailed, known.then(|| h.last_backup_failed()), backup_error),
        o(Condition::BackupOverdue, known.then_some(h.overdue), overdue_detail(h)),
        o(
            Condition::DrillFailed,
            known.then(|| h.last_drill_failed()),
            h.last_drill.as_ref().map(|d| d.detail.clone()).unwrap_or_default(),
        ),
        o(Condition::DrillOverdue, known.then_some(h.drill_overdue), drill_overdue_detail(h)),
        o(Condition::DriveMissing, Some(!h.target_problems.is_empty()), h.target_problems.join("; ")),
        // Unknown while the drive is away: "missing" says it all then.
        o(
            Condition::DriveNearlyFull,
            drive.map(|d| d.nearly_full),
            drive.map(fill_detail).unwrap_or_default(),
        ),
        // Without [offsite], never known: nothing is ever said about it.
        o(
            Condition::OffsiteBehind,
            h.offsite.as_ref().map(|o| o.behind),
            h.offsite.as_ref().map(|o| offsite_detail(h, o)).unwrap_or_default(),
        ),
    ]
}

fn offsite_detail(h: &Health, o: &crate::ops::health::OffsiteHealth) -> String {
    let mut s = format!(
        "{} backup(s) not pushed to {}, the oldest {} hours old (offsite.max_behind_hours = {})",
        o.backups_waiting,
        o.location,
        o.waiting_since.map(|w| (h.now - w).num_hours()).unwrap_or_default(),
        o.max_behind_hours
    );
    if let Some(e) = &o.last_error {
        s += &format!("; the last push failed: {e}");
    }
    s
}

fn overdue_detail(h: &Health) -> String {
    match h.last_good_backup {
        None => "there is no good backup yet".into(),
        Some(t) => format!(
            "the last good backup is {} hours old (agent.max_age_hours = {})",
            (h.now - t).num_hours(),
            h.max_age_hours
        ),
    }
}

fn drill_overdue_detail(h: &Health) -> String {
    match &h.last_drill {
        None => format!(
            "no restore drill has run since the first backup (drill.max_age_days = {})",
            h.drill_max_age_days
        ),
        Some(d) => format!(
            "the last restore drill ran {} days ago (drill.max_age_days = {})",
            (h.now - d.at).num_days(),
            h.drill_max_age_days
        ),
    }
}

/// "92% used, 3.1 GB free: full in ~9 days at the current growth".
pub fn fill_detail(d: &crate::ops::health::DriveForecast) -> String {
    let mut s = format!("{:.0}% used, {} free", d.used_percent, human_bytes(d.free_bytes));
    if let Some(days) = d.days_to_full {
        s += &format!(": full in ~{days:.0} days at the current growth");
    }
    s
}

/// What the owner was last told about a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Told {
    Fine,
    Problem,
}

/// One message to send: a condition that started or ended, a restore, a backup run's ping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `BACKUP_FAILED`, `RESTORE_DONE`, `BACKUP_RUN`...
    pub event: String,
    /// `PROBLEM`, `RESOLVED`, `DONE`, `SUCCESS`, `FAILURE`.
    pub state: String,
    pub severity: Severity,
    /// One line.
    pub title: String,
    pub body: String,
}

/// The state rule, pure: from what was last told and what is observed now, the messages to
/// send and the new states to remember. A condition never told before counts as fine, so a
/// problem present at the first look is told once; an unknown observation changes nothing.
pub fn changes(
    told: &dyn Fn(Condition) -> Option<Told>,
    observed: &[Observation],
    host: &str,
) -> (Vec<Message>, Vec<(Condition, Told, String)>) {
    let mut messages = Vec::new();
    let mut states = Vec::new();
    for o in observed {
        let Some(problem) = o.problem else { continue };
        let now = if problem { Told::Problem } else { Told::Fine };
        let before = told(o.condition).unwrap_or(Told::Fine);
        if told(o.condition) != Some(now) {
            states.push((o.condition, now, o.detail.clone()));
        }
        if before == now {
            continue;
        }
        let (state, severity, title) = match now {
            Told::Problem => ("PROBLEM", o.condition.severity(), o.condition.problem_title()),
            Told::Fine => ("RESOLVED", Severity::Info, o.condition.resolved_title()),
        };
        let mut body = format!("DataVault on {host}: {title}.");
        if !o.detail.is_empty() && now == Told::Problem {
            body += &format!("\n{}", o.detail);
        }
        body += "\nSee: sudo datavault status";
        messages.push(Message {
            event: o.condition.as_str().into(),
            state: state.into(),
            severity,
            title: format!("DataVault on {host}: {title}"),
            body,
        });
    }
    (messages, states)
}

/// "A restore done": told once per restore (the catalog event's id is the state).
pub fn restore_message(h: &Health, last_told_id: i64, host: &str) -> Option<(Message, i64)> {
    let r = h.last_restore.as_ref().filter(|r| r.event_id > last_told_id)?;
    let archive = r.archive.as_deref().unwrap_or("an archive");
    let (title, severity) = if r.rolled_back {
        (format!("DataVault on {host}: restore of {archive} failed and was undone"), Severity::Critical)
    } else {
        (format!("DataVault on {host}: {archive} was restored"), Severity::Info)
    };
    let body = format!("{title}.\n{}\nSee: sudo datavault audit", r.detail);
    let state = if r.rolled_back { "ROLLED_BACK" } else { "DONE" };
    Some((Message { event: "RESTORE_DONE".into(), state: state.into(), severity, title, body }, r.event_id))
}

/// A backup run's ping: the dead-man's switch. `exit_code` 0 is success.
pub fn ping_message(summary: &str, exit_code: u8, host: &str) -> Message {
    let (state, severity) =
        if exit_code == 0 { ("SUCCESS", Severity::Info) } else { ("FAILURE", Severity::Critical) };
    Message {
        event: "BACKUP_RUN".into(),
        state: state.into(),
        severity,
        title: format!("DataVault on {host}: backup {}", if exit_code == 0 { "done" } else { "failed" }),
        body: format!("{summary}\nexit code: {exit_code}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn obs(c: Condition, problem: Option<bool>) -> Observation {
        Observation { condition: c, problem, detail: format!("{c:?} detail") }
    }

    /// Feeds observations through the rule like successive runs would, remembering states.
    fn timeline(steps: Vec<Vec<Observation>>) -> Vec<Vec<(String, String)>> {
        let mut told: HashMap<Condition, Told> = HashMap::new();
        steps
            .into_iter()
            .map(|observed| {
                let snapshot = told.clone();
                let (messages, states) = changes(&|c| snapshot.get(&c).copied(), &observed, "pi");
                for (c, t, _) in states {
                    told.insert(c, t);
                }
                messages.into_iter().map(|m| (m.event, m.state)).collect()
            })
            .collect()
    }

    #[test]
    fn a_problem_is_told_once_while_it_lasts_and_once_when_it_ends() {
        use Condition::*;
        let t = timeline(vec![
            vec![obs(BackupFailed, Some(false))],
            vec![obs(BackupFailed, Some(true))],
            vec![obs(BackupFailed, Some(true))], // the timer retries: no storm
            vec![obs(BackupFailed, Some(true))],
            vec![obs(BackupFailed, Some(false))],
            vec![obs(BackupFailed, Some(false))],
        ]);
        assert_eq!(t[0], vec![], "fine at first sight: nothing to say");
        assert_eq!(t[1], vec![("BACKUP_FAILED".into(), "PROBLEM".into())]);
        assert!(t[2].is_empty() && t[3].is_empty());
        assert_eq!(t[4], vec![("BACKUP_FAILED".into(), "RESOLVED".into())]);
        assert!(t[5].is_empty());
    }

    #[test]
    fn unknown_changes_nothing_and_a_first_look_at_a_problem_is_told() {
        use Condition::*;
        let t = timeline(vec![
            vec![obs(DriveMissing, Some(true)), obs(DriveNearlyFull, None)],
            vec![obs(DriveMissing, Some(true)), obs(DriveNearlyFull, None)],
            vec![obs(DriveMissing, Some(false)), obs(DriveNearlyFull, Some(true))],
            vec![obs(DriveMissing, Some(true)), obs(DriveNearlyFull, None)],
        ]);
        assert_eq!(t[0], vec![("DRIVE_MISSING".into(), "PROBLEM".into())]);
        assert!(t[1].is_empty());
        assert_eq!(
            t[2],
            vec![("DRIVE_MISSING".into(), "RESOLVED".into()), ("DRIVE_NEARLY_FULL".into(), "PROBLEM".into())]
        );
        assert_eq!(t[3], vec![("DRIVE_MISSING".into(), "PROBLEM".into())], "nearly full stays as last known");
    }

    #[test]
    fn conditions_are_independent_and_severities_match() {
        use Condition::*;
        let t = timeline(vec![vec![obs(BackupOverdue, Some(true)), obs(DrillOverdue, Some(true))]]);
        assert_eq!(t[0].len(), 2);
        assert_eq!(DrillOverdue.severity(), Severity::Warning);
        assert_eq!(DrillFailed.severity(), Severity::Critical);
        for c in Condition::ALL {
            assert_eq!(Condition::parse(c.as_str()), Some(c));
        }
    }

    #[test]
    fn pings_carry_the_summary_and_the_exit_code() {
        let m = ping_message("backup created: backup-x (3 MB)", 0, "pi");
        assert_eq!(
            (m.state.as_str(), m.body.as_str()),
            ("SUCCESS", "backup created: backup-x (3 MB)\nexit code: 0")
        );
        assert_eq!(ping_message("target not mounted", 3, "pi").state, "FAILURE");
    }
}
