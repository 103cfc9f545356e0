//! The state of the backups, decided in one place: `status`, `doctor`, the agent's LED and
//! the metrics all read it from here, so "overdue" or "the last good backup" can never mean
//! two things (issue #12).
//!
//! Reading never fails and never takes the lock: what cannot be read (a missing drive, a
//! catalog being rebuilt) is simply unknown, and says so.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::catalog::{Catalog, Event, RunRecord, RunStatus};
use crate::manifest::ArchiveKind;
use crate::ops::{now, Env};
use crate::target::TargetState;

/// The one rule: a backup is overdue when there is none, or the last good one is older than
/// `max_age` (`agent.max_age_hours`; the timer runs daily, the default leaves two hours of
/// slack).
pub fn overdue(last_good: Option<DateTime<Utc>>, now: DateTime<Utc>, max_age: Duration) -> bool {
    last_good.is_none_or(|t| now - t > max_age)
}

/// The one offsite rule (#10): the offsite copy is behind when a good backup on the drive
/// has waited more than `max_behind` (`offsite.max_behind_hours`) to be pushed. A backup
/// waits from when it was made until a push that started after it succeeds: the oldest
/// backup made after the start of the last successful push (any, when none ever
/// succeeded) is the one that counts. A link down for an hour is not behind; pushes failing
/// for a day while backups go on are, and so is a first push still running after a day.
pub fn offsite_behind(
    oldest_waiting: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    max_behind: Duration,
) -> bool {
    oldest_waiting.is_some_and(|t| now - t > max_behind)
}

/// The offsite copy as status, doctor, the LED and the metrics see it (no network: the
/// state the last push recorded, and the backups on the drive or in the catalog).
#[derive(Debug, Clone, Serialize)]
pub struct OffsiteHealth {
    pub location: String,
    pub last_attempt: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    /// The last push's error (one line, no secret), if it failed.
    pub last_error: Option<String>,
    /// Backups made after the last successful push started: not known to be offsite.
    pub backups_waiting: usize,
    /// When the oldest of them was made.
    pub waiting_since: Option<DateTime<Utc>>,
    /// What the bucket still lacked when the last push ended (backups, snapshots, bytes).
    pub behind_at_last_push: crate::offsite::push::Behind,
    pub max_behind_hours: u32,
    /// By the one rule, [`offsite_behind`].
    pub behind: bool,
}

impl OffsiteHealth {
    /// `local_backups`: when each good backup on the drive was made.
    pub fn assess(
        settings: &crate::config::OffsiteSettings,
        state: Option<crate::offsite::OffsiteState>,
        local_backups: &[DateTime<Utc>],
        now: DateTime<Utc>,
    ) -> OffsiteHealth {
        let state = state.unwrap_or_default();
        // Files written by a push before this field existed: its end is the best we know.
        let pushed_from = state.last_success_started.or(state.last_success);
        let waiting: Vec<DateTime<Utc>> =
            local_backups.iter().copied().filter(|c| pushed_from.is_none_or(|p| *c >= p)).collect();
        let waiting_since = waiting.iter().min().copied();
        let max = settings.max_behind_hours;
        OffsiteHealth {
            location: settings.url.clone(),
            last_attempt: state.last_attempt,
            last_success: state.last_success,
            last_error: state.last_error,
            backups_waiting: waiting.len(),
            waiting_since,
            behind_at_last_push: state.behind,
            max_behind_hours: max,
            behind: offsite_behind(waiting_since, now, Duration::hours(max as i64)),
        }
    }

    /// When `[offsite]` is configured, from the state the last push recorded.
    fn read(
        s: &crate::config::Settings,
        local_backups: Vec<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Option<OffsiteHealth> {
        let o = s.offsite.as_ref()?;
        Some(OffsiteHealth::assess(o, crate::offsite::OffsiteState::load(&s.state.dir), &local_backups, now))
    }
}

/// When each active backup the catalog knows was made (none dated in the future).
fn catalog_backups(c: &Catalog, now: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    c.archives()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.status == crate::catalog::ArchiveStatus::Active && a.kind == ArchiveKind::Backup)
        .map(|a| a.created_at)
        .filter(|c| !crate::ops::is_in_future(*c, now))
        .collect()
}

/// The second rule (#15): drills are overdue when the last one (passed or failed: a failed
/// one is its own alarm) is older than `max_age` (`drill.max_age_days`), counting from the
/// first backup while none has run. With no backup at all there is nothing to drill.
pub fn drill_overdue(
    last_drill: Option<DateTime<Utc>>,
    first_backup: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    max_age: Duration,
) -> bool {
    last_drill.or(first_backup).is_some_and(|t| now - t > max_age)
}

/// How full the drive is, and when it will be full at the growth of the last week (#15).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriveForecast {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub used_percent: f64,
    /// Net growth of the archives (new ones minus pruned ones) per day; None: too little
    /// history to tell.
    pub growth_bytes_per_day: Option<f64>,
    /// None: not growing, or unknown.
    pub days_to_full: Option<f64>,
    /// The third rule: used above `notify.full_above_percent`, or full within
    /// `notify.full_within_days` at the current growth.
    pub nearly_full: bool,
}

/// The window the growth is measured over: long enough to cover a weekly pattern.
pub const GROWTH_WINDOW_DAYS: i64 = 7;

/// `stored_then` bytes were on the drive `window_days` ago, `stored_now` are now.
pub fn forecast(
    total: u64,
    free: u64,
    growth: Option<(u64, u64, f64)>,
    full_within_days: u32,
    full_above_percent: u32,
) -> DriveForecast {
    let used_percent =
        if total == 0 { 0.0 } else { 100.0 * (total.saturating_sub(free)) as f64 / total as f64 };
    let growth_bytes_per_day =
        growth.filter(|&(_, _, days)| days >= 1.0).map(|(then, now, days)| (now as f64 - then as f64) / days);
    let days_to_full = growth_bytes_per_day.filter(|&g| g > 0.0).map(|g| free as f64 / g);
    let nearly_full = used_percent >= full_above_percent as f64
        || days_to_full.is_some_and(|d| d < full_within_days as f64);
    DriveForecast {
        total_bytes: total,
        free_bytes: free,
        used_percent,
        growth_bytes_per_day,
        days_to_full,
        nearly_full,
    }
}

/// The newest in-place restore (done or rolled back), for "a restore done" (#15).
#[derive(Debug, Clone, Serialize)]
pub struct RestoreSummary {
    /// The catalog event's id: what the notifications remember having announced.
    pub event_id: i64,
    pub at: DateTime<Utc>,
    pub archive: Option<String>,
    pub rolled_back: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillSummary {
    pub at: DateTime<Utc>,
    pub passed: bool,
    pub archive: Option<String>,
    pub detail: String,
}

/// What is known about the backups right now.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub now: DateTime<Utc>,
    /// None if the target could not even be inspected.
    pub target: Option<TargetState>,
    /// Why the target cannot be written to now (empty: it can).
    pub target_problems: Vec<String>,
    pub last_backup_run: Option<RunRecord>,
    /// When the newest good backup was made: the newest complete backup on the drive when
    /// the drive was read, else the end of the last successful backup run in the catalog.
    pub last_good_backup: Option<DateTime<Utc>>,
    pub newest_archive: Option<String>,
    /// Complete and incomplete archives on the drive (None: the drive was not read).
    pub archives: Option<usize>,
    pub incomplete_archives: Option<usize>,
    pub last_drill: Option<DrillSummary>,
    pub max_age_hours: u32,
    pub overdue: bool,
    /// `drill.max_age_days` and the rule [`drill_overdue`] (#15).
    pub drill_max_age_days: u32,
    pub drill_overdue: bool,
    /// The drive's fill level and forecast, when it is there to be measured.
    pub drive: Option<DriveForecast>,
    pub last_restore: Option<RestoreSummary>,
    /// Notifications waiting to be sent, and why the last attempt failed.
    pub notifications_pending: usize,
    pub notification_error: Option<String>,
    /// The archive an interrupted in-place restore was bringing back, if one was cut off.
    pub interrupted_restore: Option<String>,
    /// Who holds the run lock now.
    pub running: Option<String>,
    /// The catalog could not be read: what is known comes from the drive alone.
    pub catalog_problem: Option<String>,
    /// The drive's snapshot store (#9) could not be opened (a damaged `store/config.json`):
    /// its snapshots are then missing from every list, and backups to it fail.
    pub store_problem: Option<String>,
    /// Archives dated in the future (made while the clock was wrong).
    pub archives_in_future: Vec<String>,
    /// The offsite copy, when `[offsite]` is configured.
    pub offsite: Option<OffsiteHealth>,
}

/// What should be done about it, most urgent first. The binary words it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Advice {
    TargetNotReady { problem: String },
    NoBackupYet,
    BackupOverdue { hours: i64, max_age_hours: u32 },
    DrillOverdue { days: Option<i64>, max_age_days: u32 },
    DriveNearlyFull { used_percent: f64, free_bytes: u64, days_to_full: Option<f64> },
    NotificationsPending { count: usize, error: Option<String> },
    LastBackupFailed { error: String },
    NoDrillYet,
    DrillFailed { detail: String },
    IncompleteArchives { count: usize },
    InterruptedRestore { archive: String },
    CatalogUnreadable { problem: String },
    SnapshotStoreDamaged { problem: String },
    ArchivesInFuture { names: Vec<String> },
    OffsiteBehind { hours: i64, backups: usize, max_behind_hours: u32, last_error: Option<String> },
}

/// The archives and snapshots on the drive, and what is wrong with its snapshot store
/// (a damaged `store/config.json`), if anything.
fn scan_drive_of(s: &crate::config::Settings) -> (Option<Vec<crate::store::Listing>>, Option<String>) {
    match crate::store::Store::open_local(&s.target.path) {
        Ok(st) => (st.scan().ok(), st.snapshots().err().map(|e| e.to_string())),
        Err(_) => (None, None),
    }
}

impl Health {
    /// Read the target, the catalog and (if `scan_drive`) the manifests on the drive. The
    /// agent does not scan every 30 s: it would keep a USB disk from ever spinning down.
    pub fn read(env: &Env, scan_drive: bool) -> Health {
        let s = &env.settings;
        let t = now();
        let target = crate::target::inspect(&s.target, &env.system_root).ok();
        let target_problems = match &target {
            Some(t) => t.problems(&s.target),
            None => vec!["cannot be inspected".into()],
        };
        let (listings, store_problem) = if scan_drive && target.as_ref().is_some_and(|t| t.exists) {
            scan_drive_of(s)
        } else {
            (None, None)
        };
        let facts = read_catalog(env);
        let (last_backup_run, last_ok_run, last_drill, catalog_problem) =
            (facts.last_backup_run, facts.last_ok_run, facts.last_drill, facts.problem);
        let backups: Option<Vec<_>> = listings.as_ref().map(|ls| {
            ls.iter()
                .filter(|l| l.is_complete())
                .filter(|l| l.manifest.as_ref().map(|m| m.kind) == Some(ArchiveKind::Backup))
                .filter(|l| !l.created().is_some_and(|c| crate::ops::is_in_future(c, t)))
                .collect()
        });
        let future: Vec<String> = listings
            .iter()
            .flatten()
            .filter(|l| l.created().is_some_and(|c| crate::ops::is_in_future(c, t)))
            .map(|l| l.name.clone())
            .collect();
        let newest = backups.as_ref().and_then(|b| b.iter().max_by_key(|l| l.created()).copied());
        let last_good_backup = match &backups {
            Some(_) => newest.and_then(|l| l.created()),
            // Without a scan: the last successful run, or (a catalog rebuilt from the drive
            // knows no run yet) the newest backup it imported: "overdue" right after a new
            // SD card was a false alarm (red team 2026-12-07).
            None => last_ok_run.and_then(|r| r.ended_at).or(facts.backups.iter().max().copied()),
        };
        let max_age = Duration::hours(s.agent.max_age_hours as i64);
        let drive = match &target {
            Some(ts) if target_problems.is_empty() => Some(forecast(
                ts.total_bytes,
                ts.free_bytes,
                facts.growth,
                s.notify.full_within_days,
                s.notify.full_above_percent,
            )),
            _ => None,
        };
        let drill_overdue = drill_overdue(
            last_drill.as_ref().map(|d| d.at),
            facts.first_backup.or(last_good_backup),
            t,
            Duration::days(s.drill.max_age_days as i64),
        );
        Health {
            now: t,
            target,
            target_problems,
            last_backup_run,
            last_good_backup,
            newest_archive: newest.map(|l| l.name.clone()),
            archives: listings.as_ref().map(|ls| ls.iter().filter(|l| l.is_complete()).count()),
            incomplete_archives: listings.as_ref().map(|ls| ls.iter().filter(|l| !l.is_complete()).count()),
            last_drill,
            max_age_hours: s.agent.max_age_hours,
            overdue: overdue(last_good_backup, t, max_age),
            drill_max_age_days: s.drill.max_age_days,
            drill_overdue,
            drive,
            last_restore: facts.last_restore,
            notifications_pending: facts.pending.0,
            notification_error: facts.pending.1,
            interrupted_restore: interrupted_restore(&s.state.restore_journal_path()),
            running: crate::lock::holder(&s.state.lock_path()),
            catalog_problem,
            store_problem,
            archives_in_future: future,
            offsite: OffsiteHealth::read(
                s,
                backups.map(|b| b.iter().filter_map(|l| l.created()).collect()).unwrap_or(facts.backups),
                t,
            ),
        }
    }

    pub fn offsite_behind(&self) -> bool {
        self.offsite.as_ref().is_some_and(|o| o.behind)
    }

    pub fn last_backup_failed(&self) -> bool {
        self.last_backup_run.as_ref().is_some_and(|r| r.status == RunStatus::Failed)
    }

    pub fn last_drill_failed(&self) -> bool {
        self.last_drill.as_ref().is_some_and(|d| !d.passed)
    }

    /// Everything that needs doing, most urgent first; empty when all is well.
    pub fn advice(&self) -> Vec<Advice> {
        let mut v: Vec<Advice> =
            self.target_problems.iter().map(|p| Advice::TargetNotReady { problem: p.clone() }).collect();
        if let Some(a) = &self.interrupted_restore {
            v.push(Advice::InterruptedRestore { archive: a.clone() });
        }
        match self.last_good_backup {
            None => v.push(Advice::NoBackupYet),
            Some(t) if self.overdue => v.push(Advice::BackupOverdue {
                hours: (self.now - t).num_hours(),
                max_age_hours: self.max_age_hours,
            }),
            Some(_) => {}
        }
        if let Some(r) = self.last_backup_run.as_ref().filter(|r| r.status == RunStatus::Failed) {
            v.push(Advice::LastBackupFailed { error: r.error.clone().unwrap_or_default() });
        }
        if let Some(o) = self.offsite.as_ref().filter(|o| o.behind) {
            v.push(Advice::OffsiteBehind {
                hours: o.waiting_since.map(|w| (self.now - w).num_hours()).unwrap_or_default(),
                backups: o.backups_waiting,
                max_behind_hours: o.max_behind_hours,
                last_error: o.last_error.clone(),
            });
        }
        match &self.last_drill {
            None if self.last_good_backup.is_some() => v.push(Advice::NoDrillYet),
            Some(d) if !d.passed => v.push(Advice::DrillFailed { detail: d.detail.clone() }),
            _ => {}
        }
        if self.drill_overdue {
            v.push(Advice::DrillOverdue {
                days: self.last_drill.as_ref().map(|d| (self.now - d.at).num_days()),
                max_age_days: self.drill_max_age_days,
            });
        }
        if let Some(d) = self.drive.as_ref().filter(|d| d.nearly_full) {
            v.push(Advice::DriveNearlyFull {
                used_percent: d.used_percent,
                free_bytes: d.free_bytes,
                days_to_full: d.days_to_full,
            });
        }
        if self.notifications_pending > 0 {
            v.push(Advice::NotificationsPending {
                count: self.notifications_pending,
                error: self.notification_error.clone(),
            });
        }
        if let Some(n) = self.incomplete_archives.filter(|&n| n > 0) {
            v.push(Advice::IncompleteArchives { count: n });
        }
        if let Some(p) = &self.catalog_problem {
            v.push(Advice::CatalogUnreadable { problem: p.clone() });
        }
        if let Some(p) = &self.store_problem {
            v.push(Advice::SnapshotStoreDamaged { problem: p.clone() });
        }
        if !self.archives_in_future.is_empty() {
            v.push(Advice::ArchivesInFuture { names: self.archives_in_future.clone() });
        }
        v
    }
}

/// What the catalog says; every field is best effort (the catalog may be damaged).
#[derive(Default)]
struct CatalogFacts {
    last_backup_run: Option<RunRecord>,
    last_ok_run: Option<RunRecord>,
    last_drill: Option<DrillSummary>,
    first_backup: Option<DateTime<Utc>>,
    /// (bytes stored a window ago, bytes stored now, window in days).
    growth: Option<(u64, u64, f64)>,
    last_restore: Option<RestoreSummary>,
    pending: (usize, Option<String>),
    problem: Option<String>,
    /// When each active backup the catalog knows was made (the offsite rule without a scan).
    backups: Vec<DateTime<Utc>>,
}

fn read_catalog(env: &Env) -> CatalogFacts {
    let c = match Catalog::open(&env.settings.state.catalog_path()) {
        Ok(c) => c,
        Err(e) => return CatalogFacts { problem: Some(e.to_string()), ..CatalogFacts::default() },
    };
    let drill = c.last_event(&[Event::DrillPassed, Event::DrillFailed]).ok().flatten().map(|e| {
        DrillSummary { at: e.at, passed: e.event == Event::DrillPassed, archive: e.archive, detail: e.detail }
    });
    let last_restore =
        c.last_event(&[Event::SystemRestored, Event::RestoreRolledBack]).ok().flatten().map(|e| {
            RestoreSummary {
                event_id: e.id,
                at: e.at,
                rolled_back: e.event == Event::RestoreRolledBack,
                archive: e.archive,
                detail: e.detail,
            }
        });
    let first_backup = c.first_backup_at().ok().flatten();
    let t = now();
    let growth = first_backup.and_then(|first| {
        let days = (t - first).num_seconds() as f64 / 86_400.0;
        let window = days.min(GROWTH_WINDOW_DAYS as f64);
        let then = t - Duration::seconds((window * 86_400.0) as i64);
        Some((c.stored_bytes_at(then).ok()?, c.stored_bytes_at(t).ok()?, window))
    });
    CatalogFacts {
        last_backup_run: c.last_run("backup", None).ok().flatten(),
        last_ok_run: c.last_run("backup", Some(RunStatus::Success)).ok().flatten(),
        last_drill: drill,
        first_backup,
        growth,
        last_restore,
        pending: crate::alerts::outbox::pending_summary(&c).unwrap_or_default(),
        problem: None,
        backups: catalog_backups(&c, t),
    }
}

/// The archive named by a restore journal left behind, if there is one.
pub fn interrupted_restore(journal: &std::path::Path) -> Option<String> {
    let bytes = crate::fsutil::read_regular(journal, 1 << 20).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    Some(v["archive"].as_str().unwrap_or("an unknown archive").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forecast_says_when_the_drive_fills_at_the_last_weeks_growth() {
        const G: u64 = 1_000_000_000;
        // 100 GB drive, 20 GB free, archives grew from 10 to 24 GB in 7 days: 2 GB a day.
        let f = forecast(100 * G, 20 * G, Some((10 * G, 24 * G, 7.0)), 14, 90);
        assert_eq!(f.growth_bytes_per_day, Some(2.0 * G as f64));
        assert_eq!(f.days_to_full, Some(10.0));
        assert!(f.nearly_full, "full within 14 days");
        assert_eq!(
            crate::alerts::fill_detail(&f),
            "80% used, 18.6 GiB free: full in ~10 days at the current growth"
        );
        let steady = forecast(100 * G, 20 * G, Some((24 * G, 24 * G, 7.0)), 14, 90);
        assert!(!steady.nearly_full && steady.days_to_full.is_none(), "retention keeps it flat");
        assert!(forecast(100 * G, 5 * G, None, 14, 90).nearly_full, "95% used");
        assert_eq!(
            forecast(100 * G, 50 * G, Some((0, G, 0.5)), 14, 90).growth_bytes_per_day,
            None,
            "half a day says nothing"
        );
    }

    #[test]
    fn overdue_is_strictly_older_than_the_limit() {
        let t: DateTime<Utc> = "2026-12-04T04:00:00Z".parse().unwrap();
        let max = Duration::hours(26);
        assert!(overdue(None, t, max), "no backup at all is overdue");
        assert!(!overdue(Some(t - Duration::hours(26)), t, max), "exactly the limit is not");
        assert!(overdue(Some(t - Duration::hours(26) - Duration::seconds(1)), t, max));
        assert!(!overdue(Some(t + Duration::hours(1)), t, max), "a clock behind the backup is not overdue");
    }

    #[test]
    fn offsite_is_behind_when_a_backup_waits_longer_than_the_limit() {
        let t: DateTime<Utc> = "2026-12-04T04:00:00Z".parse().unwrap();
        let h = |n: i64| t - Duration::hours(n);
        let o = crate::config::OffsiteSettings {
            url: "s3://b/p".into(),
            bucket: "b".into(),
            prefix: "p".into(),
            endpoint: "https://s3.example.com".into(),
            region: "us-east-1".into(),
            path_style: false,
            credentials: None,
            max_rate: None,
            part_size: 5 << 20,
            parts_in_flight: 1,
            timeout: std::time::Duration::from_secs(120),
            retention: Default::default(),
            max_behind_hours: 24,
        };
        let state = |started: i64| crate::offsite::OffsiteState {
            last_success: Some(h(started) + Duration::minutes(5)),
            last_success_started: Some(h(started)),
            ..Default::default()
        };
        let daily = [h(1), h(25), h(49)];
        // Never pushed: the oldest backup waits 49 h.
        let a = OffsiteHealth::assess(&o, None, &daily, t);
        assert!(a.behind && a.backups_waiting == 3 && a.waiting_since == Some(h(49)), "{a:?}");
        // Pushed 2 h ago: only the newest waits, 1 h: fine.
        let a = OffsiteHealth::assess(&o, Some(state(2)), &daily, t);
        assert!(!a.behind && a.backups_waiting == 1, "{a:?}");
        // The last good push started 30 h ago, backups went on daily: the one of 25 h waits.
        let a = OffsiteHealth::assess(&o, Some(state(30)), &daily, t);
        assert!(a.behind && a.backups_waiting == 2 && a.waiting_since == Some(h(25)), "{a:?}");
        // No backup at all: nothing waits (the backup rule says "no backup yet").
        assert!(!OffsiteHealth::assess(&o, None, &[], t).behind);
        assert!(!offsite_behind(Some(h(24)), t, Duration::hours(24)), "exactly the limit is not behind");
    }
}
