//! `datavault status`: is everything fine, and if not, what to do next. Reads only: it never
//! takes the lock, so it answers even while a backup runs.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::catalog::{Catalog, Event, RunRecord, RunStatus};
use crate::error::Result;
use crate::ops::{now, Env};
use crate::target::TargetState;

/// A backup older than this is overdue (the timer runs daily; two hours of slack).
pub const MAX_AGE_HOURS: i64 = 26;

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub healthy: bool,
    pub last_backup: Option<RunRecord>,
    pub last_successful_backup: Option<DateTime<Utc>>,
    pub newest_archive: Option<String>,
    pub archives: usize,
    pub incomplete_archives: usize,
    pub last_drill: Option<DrillSummary>,
    pub target: TargetState,
    pub target_problems: Vec<String>,
    pub running: Option<String>,
    pub next_steps: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillSummary {
    pub at: DateTime<Utc>,
    pub passed: bool,
    pub archive: Option<String>,
    pub detail: String,
}

pub fn run(env: &Env) -> Result<Status> {
    let s = &env.settings;
    let target = crate::target::inspect(&s.target, &env.system_root)?;
    let target_problems = target.problems(&s.target);
    let catalog = Catalog::open(&s.state.catalog_path())?;
    let listings = if target.exists {
        crate::store::Store::open_local(&s.target.path).and_then(|st| st.scan()).unwrap_or_default()
    } else {
        Vec::new()
    };
    let complete: Vec<_> = listings.iter().filter(|l| l.is_complete()).collect();
    let last_backup = catalog.last_run("backup", None)?;
    let last_ok = catalog.last_run("backup", Some(RunStatus::Success))?;
    let newest = complete
        .iter()
        .filter(|l| l.manifest.as_ref().map(|m| m.kind) == Some(crate::manifest::ArchiveKind::Backup))
        .max_by_key(|l| l.created());
    let last_successful_backup =
        newest.and_then(|l| l.created()).or(last_ok.as_ref().and_then(|r| r.ended_at));
    let last_drill = catalog.last_event(&[Event::DrillPassed, Event::DrillFailed])?.map(|e| DrillSummary {
        at: e.at,
        passed: e.event == Event::DrillPassed,
        archive: e.archive,
        detail: e.detail,
    });
    let running = crate::lock::holder(&s.state.lock_path());

    let mut next = Vec::new();
    for p in &target_problems {
        next.push(format!("target {}: {p}", s.target.path.display()));
    }
    match (&last_backup, last_successful_backup) {
        (_, None) => next.push("no backup yet: run `datavault backup`".into()),
        (_, Some(t)) if (now() - t).num_hours() >= MAX_AGE_HOURS => next.push(format!(
            "the last good backup is {} hours old: check `systemctl status datavault-backup.timer`, then run `datavault backup`",
            (now() - t).num_hours()
        )),
        _ => {}
    }
    if let Some(r) = &last_backup {
        if r.status == RunStatus::Failed {
            next.push(format!("the last backup failed: {}", r.error.clone().unwrap_or_default()));
        }
    }
    match &last_drill {
        None if !complete.is_empty() => {
            next.push("no drill yet: run `datavault drill` to prove the backups restore".into())
        }
        Some(d) if !d.passed => {
            next.push(format!("the last drill FAILED ({}): run `datavault verify --all --deep`", d.detail))
        }
        _ => {}
    }
    if let Some(archive) = interrupted_restore(&s.state.restore_journal_path()) {
        next.push(format!(
            "an interrupted restore of {archive} was found: the next datavault run that takes the lock (backup, drill, prune, restore) finishes or undoes it; run `datavault backup` now"
        ));
    }
    let incomplete = listings.len() - complete.len();
    if incomplete > 0 {
        next.push(format!("{incomplete} archive(s) are incomplete or damaged: see `datavault list`; `datavault prune` removes them"));
    }
    Ok(Status {
        healthy: next.is_empty(),
        last_backup,
        last_successful_backup,
        newest_archive: newest.map(|l| l.name.clone()),
        archives: complete.len(),
        incomplete_archives: incomplete,
        last_drill,
        target,
        target_problems,
        running,
        next_steps: next,
    })
}

/// The archive named by a restore journal left behind, if there is one.
pub fn interrupted_restore(journal: &std::path::Path) -> Option<String> {
    let bytes = crate::fsutil::read_regular(journal, 1 << 20).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    Some(v["archive"].as_str().unwrap_or("an unknown archive").to_string())
}
