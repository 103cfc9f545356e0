//! Which archives to keep: keep_last / daily / weekly / monthly, with restic's `forget` semantics.
//!
//! This module only *decides*; it never deletes. The caller prunes what [`RetentionPolicy::apply`]
//! marks `keep: false`, and `--dry-run` shows the very same decisions. Whatever the policy says,
//! these guarantees hold, because an over-eager prune on a drive that is the only copy is the one
//! mistake a backup tool cannot undo:
//!
//! - the newest *good* backup is always kept, even when every `keep_*` is 0. Good means
//!   complete on the drive and not failed by its last drill or verify ([`Health`]): a newer
//!   backup that failed its drill never makes the last intact one "old";
//! - so is the newest good backup a drill proved ([`Candidate::drilled`]), until a newer one
//!   is proven: damage no check at backup time sees (an index `quick_check` passes) must not
//!   let `keep_last = 1` delete the last backup known to restore;
//! - when there is no good backup at all, nothing is deleted: a damaged archive may still give
//!   back part of the data, an empty drive gives back nothing;
//! - a damaged archive (incomplete, or failed its last check) takes no good archive's slot,
//!   and is kept as long as the rules would keep it were it intact: it may be a renamed or
//!   truncated copy that still gives back most of the data, a snapshot whose small refs file
//!   was lost, or the faithful copy of a live database that was damaged already. It goes when
//!   the policy has moved past it, not at the next backup;
//! - a pre-restore archive (taken automatically before a restore overwrites the live data) is
//!   kept for [`PRE_RESTORE_GRACE`] whatever the count: three retried restores in one morning
//!   must not push out the only copy of what the first one replaced.
//!
//! Buckets are UTC calendar days, ISO weeks and calendar months, so a Pi whose time zone
//! changes does not reshuffle them. Pre-restore archives are counted apart and never use up a
//! backup rule's slot.
//!
//! [`check_clock`] exists because a Pi has no battery-backed clock: until NTP answers it may
//! believe it is years in the past, and a "newest" archive stamped then would upset every rule.

use chrono::{DateTime, Datelike, SecondsFormat, TimeDelta, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_pre_restore: u32,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy { keep_last: 7, keep_daily: 7, keep_weekly: 4, keep_monthly: 6, keep_pre_restore: 3 }
    }
}

/// What an archive was made for. Stored (catalog) and serialized as `BACKUP` / `PRE_RESTORE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ArchiveKind {
    /// A scheduled or manual backup; the `keep_*` rules apply.
    Backup,
    /// Taken automatically before a restore replaced the live data; `keep_pre_restore` applies.
    PreRestore,
}

impl ArchiveKind {
    /// The stable text form: `BACKUP` or `PRE_RESTORE`.
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveKind::Backup => "BACKUP",
            ArchiveKind::PreRestore => "PRE_RESTORE",
        }
    }

    /// Inverse of [`ArchiveKind::as_str`].
    pub fn parse(s: &str) -> Option<ArchiveKind> {
        match s {
            "BACKUP" => Some(ArchiveKind::Backup),
            "PRE_RESTORE" => Some(ArchiveKind::PreRestore),
            _ => None,
        }
    }
}

impl std::fmt::Display for ArchiveKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long a pre-restore archive is kept whatever `keep_pre_restore` says: the time an owner
/// may take to notice that a restore put back the wrong backup.
pub const PRE_RESTORE_GRACE: TimeDelta = TimeDelta::days(7);

/// What the drive and the catalog know of an archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Complete on the drive; no drill or verify has failed it since it last passed one.
    Good,
    /// Complete, but its last drill or verify failed: it may not restore, or it restores a
    /// database that was already damaged when it was backed up.
    FailedCheck,
    /// Its manifest does not describe what is on the drive: the archive is missing, has the
    /// wrong size, or a snapshot's refs or tree cannot be read.
    Incomplete,
}

impl Health {
    /// From what the listing and the catalog say.
    pub fn of(complete: bool, failed_check: bool) -> Health {
        match (complete, failed_check) {
            (false, _) => Health::Incomplete,
            (true, true) => Health::FailedCheck,
            (true, false) => Health::Good,
        }
    }

    fn why_not_good(self) -> &'static str {
        match self {
            Health::Good => "good",
            Health::FailedCheck => "failed a drill, verify or quick_check",
            Health::Incomplete => "incomplete or damaged on the drive",
        }
    }
}

/// An archive found on the target, as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub kind: ArchiveKind,
    pub created: DateTime<Utc>,
    pub health: Health,
    /// Its last drill passed: proven to restore. The newest such good backup is kept until
    /// a newer one is proven.
    pub drilled: bool,
}

impl Candidate {
    pub fn is_good(&self) -> bool {
        self.health == Health::Good
    }
}

/// The verdict on one candidate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub name: String,
    pub keep: bool,
    /// Why it is kept (`"last 3"`, `"daily 2026-11-20"`, `"weekly 2026-W47"`, `"monthly 2026-11"`,
    /// `"newest good archive"`, `"pre-restore 1"`, `"pre-restore made within 7 days (beyond the
    /// newest 3)"`,
    /// `"no good backup: keeping everything"`, `"failed a drill, verify or quick_check; kept
    /// as if intact: last 2"`) or why not (`"no rule keeps it"`, `"pre-restore beyond the newest N"`,
    /// `"incomplete or damaged on the drive; no rule would keep it even intact"`).
    /// Never empty.
    pub reasons: Vec<String>,
    /// An **estimate** of when the archive will stop being kept, assuming one backup a day from
    /// now on: the latest of `created` + `keep_last` days, + `keep_daily` days, + `keep_weekly`
    /// weeks and + `keep_monthly` x 31 days, over the rules that keep it. `None` when it is not
    /// kept, when only "newest good archive" keeps it, for damaged archives (they go when the
    /// good ones as old go) and for pre-restore archives (they go when newer restores push them
    /// out, after [`PRE_RESTORE_GRACE`]).
    pub expires_at: Option<DateTime<Utc>>,
}

const NO_RULE: &str = "no rule keeps it";
const NEWEST_GOOD: &str = "newest good archive";
const NEWEST_DRILLED: &str = "newest backup a drill proved";
const NO_GOOD_BACKUP: &str = "no good backup: keeping everything";
const NOT_KEPT_EVEN_INTACT: &str = "no rule would keep it even intact";

impl RetentionPolicy {
    /// Decide for every candidate (any order in, newest-first out, one decision per candidate).
    /// `now` only dates the pre-restore grace ([`PRE_RESTORE_GRACE`]).
    ///
    /// Good archives are decided among themselves, as if the damaged ones were not there:
    /// they are walked newest first; `keep_last` keeps the N newest, and each of `keep_daily`
    /// / `keep_weekly` / `keep_monthly` keeps the newest archive of each of the N most recent
    /// days / ISO weeks / months that have one (restic: a period counts only when it yields a
    /// kept archive, so gaps in the schedule do not eat the budget). An archive is kept when
    /// any rule keeps it. A damaged archive is then kept when the same rules would keep it
    /// were every archive intact: it takes no good archive's slot, and goes when the policy
    /// moves past it (the module's comment says why).
    pub fn apply(&self, candidates: &[Candidate], now: DateTime<Utc>) -> Vec<Decision> {
        let mut order: Vec<&Candidate> = candidates.iter().collect();
        order.sort_by(|a, b| newest_first(a, b));

        if !order.iter().any(|c| c.is_good() && c.kind == ArchiveKind::Backup) {
            return order
                .into_iter()
                .map(|c| Decision {
                    name: c.name.clone(),
                    keep: true,
                    reasons: vec![NO_GOOD_BACKUP.to_string()],
                    expires_at: None,
                })
                .collect();
        }

        let good: Vec<&Candidate> = order.iter().copied().filter(|c| c.is_good()).collect();
        let mut good_decisions = self.rules(&good, now).into_iter();
        let mut as_if_intact = self.rules(&order, now).into_iter();
        order
            .iter()
            .map(|c| {
                let if_intact = as_if_intact.next().expect("one decision per candidate");
                if c.is_good() {
                    return good_decisions.next().expect("one decision per good candidate");
                }
                let why = c.health.why_not_good();
                let reason = if if_intact.keep {
                    let rules: Vec<&str> = if_intact
                        .reasons
                        .iter()
                        .map(|r| if r == NEWEST_GOOD { "newest backup" } else { r.as_str() })
                        .collect();
                    format!("{why}; kept as if intact: {}", rules.join(", "))
                } else {
                    format!("{why}; {NOT_KEPT_EVEN_INTACT}")
                };
                Decision {
                    name: c.name.clone(),
                    keep: if_intact.keep,
                    reasons: vec![reason],
                    expires_at: None,
                }
            })
            .collect()
    }

    /// The rules applied to `order` (newest first), every archive in it taken as good.
    fn rules(&self, order: &[&Candidate], now: DateTime<Utc>) -> Vec<Decision> {
        let mut last = 0u32;
        let mut daily = Bucket::new(self.keep_daily);
        let mut weekly = Bucket::new(self.keep_weekly);
        let mut monthly = Bucket::new(self.keep_monthly);
        let mut pre_restore = 0u32;
        let mut seen_backup = false;
        let mut seen_drilled = false;

        let mut decisions = Vec::with_capacity(order.len());
        for c in order {
            let mut reasons = Vec::new();
            let mut expires_at = None;
            let keep = match c.kind {
                ArchiveKind::PreRestore => {
                    let grace = PRE_RESTORE_GRACE.num_days();
                    if pre_restore < self.keep_pre_restore {
                        pre_restore += 1;
                        reasons.push(format!("pre-restore {pre_restore}"));
                        true
                    } else if now - c.created < PRE_RESTORE_GRACE {
                        reasons.push(format!(
                            "pre-restore made within {grace} days (beyond the newest {})",
                            self.keep_pre_restore
                        ));
                        expires_at = c.created.checked_add_signed(PRE_RESTORE_GRACE);
                        true
                    } else {
                        reasons.push(format!("pre-restore beyond the newest {}", self.keep_pre_restore));
                        false
                    }
                }
                ArchiveKind::Backup => {
                    let created = c.created;
                    // Counts beyond chrono's range (~262,000 years) saturate rather than vanish.
                    let mut extend = |span: Option<TimeDelta>| {
                        let until = span
                            .and_then(|d| created.checked_add_signed(d))
                            .unwrap_or(DateTime::<Utc>::MAX_UTC);
                        expires_at = expires_at.max(Some(until));
                    };
                    if last < self.keep_last {
                        last += 1;
                        reasons.push(format!("last {last}"));
                        extend(TimeDelta::try_days(i64::from(self.keep_last)));
                    }
                    let day = created.date_naive();
                    if daily.offer(day) {
                        reasons.push(format!("daily {}", day.format("%Y-%m-%d")));
                        extend(TimeDelta::try_days(i64::from(self.keep_daily)));
                    }
                    let week = day.iso_week();
                    if weekly.offer((week.year(), week.week())) {
                        reasons.push(format!("weekly {:04}-W{:02}", week.year(), week.week()));
                        extend(TimeDelta::try_weeks(i64::from(self.keep_weekly)));
                    }
                    if monthly.offer((day.year(), day.month())) {
                        reasons.push(format!("monthly {:04}-{:02}", day.year(), day.month()));
                        extend(TimeDelta::try_days(i64::from(self.keep_monthly) * 31));
                    }
                    if !seen_backup {
                        seen_backup = true;
                        reasons.push(NEWEST_GOOD.to_string());
                    }
                    if c.drilled && !seen_drilled {
                        seen_drilled = true;
                        reasons.push(NEWEST_DRILLED.to_string());
                    }
                    if reasons.is_empty() {
                        reasons.push(NO_RULE.to_string());
                        false
                    } else {
                        true
                    }
                }
            };
            decisions.push(Decision { name: c.name.clone(), keep, reasons, expires_at });
        }
        decisions
    }
}

/// Newest first; ties broken by name (then the rest) so that input order never matters.
fn newest_first(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.created
        .cmp(&a.created)
        .then_with(|| b.name.cmp(&a.name))
        .then_with(|| b.is_good().cmp(&a.is_good()))
        .then_with(|| (a.kind as u8).cmp(&(b.kind as u8)))
}

/// One periodic rule: how many periods may still be kept and which period was seen last.
/// Candidates arrive newest first, so a key different from the last one is a new period.
struct Bucket<K> {
    remaining: u32,
    last: Option<K>,
}

impl<K: PartialEq> Bucket<K> {
    fn new(count: u32) -> Self {
        Bucket { remaining: count, last: None }
    }

    fn offer(&mut self, key: K) -> bool {
        if self.remaining == 0 || self.last.as_ref() == Some(&key) {
            return false;
        }
        self.remaining -= 1;
        self.last = Some(key);
        true
    }
}

/// Whether the system clock can be trusted for stamping a new archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClockCheck {
    Sane,
    /// What looks wrong and how to fix it, for the operator.
    Suspicious(String),
}

/// The clock looks wrong if `now` is earlier than the newest archive's creation or than
/// `build_time` (a Pi has no RTC and boots in the past until NTP corrects it).
pub fn check_clock(
    now: DateTime<Utc>,
    newest_archive: Option<DateTime<Utc>>,
    build_time: DateTime<Utc>,
) -> ClockCheck {
    let fmt = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
    let fix = "a Raspberry Pi has no battery-backed clock; wait for NTP to set it \
               (`timedatectl status` shows \"System clock synchronized: yes\") or set it by hand";
    if let Some(newest) = newest_archive {
        if now < newest {
            return ClockCheck::Suspicious(format!(
                "the system clock says {}, earlier than the newest archive ({}): either the clock is wrong now ({fix}), or that archive was made while it was wrong (then delete it by hand: `datavault list` shows it)",
                fmt(now),
                fmt(newest)
            ));
        }
    }
    if now < build_time {
        return ClockCheck::Suspicious(format!(
            "the system clock says {}, earlier than the time this datavault was built ({}); {fix}",
            fmt(now),
            fmt(build_time)
        ));
    }
    ClockCheck::Sane
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone};
    use std::collections::{BTreeSet, HashMap};

    /// "Now" for the tests that do not test the pre-restore grace: long after every archive.
    const NOW: DateTime<Utc> = DateTime::<Utc>::MAX_UTC;

    fn at(y: i32, mo: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, 0, 0).unwrap()
    }

    fn backup(t: DateTime<Utc>) -> Candidate {
        Candidate {
            name: format!("backup-{}", t.format("%Y%m%dT%H%M%S")),
            kind: ArchiveKind::Backup,
            created: t,
            health: Health::Good,
            drilled: false,
        }
    }

    fn pre_restore(t: DateTime<Utc>) -> Candidate {
        Candidate {
            name: format!("pre-restore-{}", t.format("%Y%m%dT%H%M%S")),
            kind: ArchiveKind::PreRestore,
            created: t,
            health: Health::Good,
            drilled: false,
        }
    }

    fn policy(last: u32, daily: u32, weekly: u32, monthly: u32, pre: u32) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: last,
            keep_daily: daily,
            keep_weekly: weekly,
            keep_monthly: monthly,
            keep_pre_restore: pre,
        }
    }

    fn kept(decisions: &[Decision]) -> BTreeSet<String> {
        decisions.iter().filter(|d| d.keep).map(|d| d.name.clone()).collect()
    }

    fn decision_of<'a>(decisions: &'a [Decision], name: &str) -> &'a Decision {
        decisions.iter().find(|d| d.name == name).unwrap()
    }

    fn reasons_of<'a>(decisions: &'a [Decision], name: &str) -> &'a [String] {
        &decision_of(decisions, name).reasons
    }

    /// One backup a day at 02:00, `days` days ending on 2026-11-20 (a Friday, ISO week 47).
    fn daily_backups(days: i64) -> Vec<Candidate> {
        let newest = at(2026, 11, 20, 2);
        (0..days).map(|i| backup(newest - TimeDelta::days(i))).collect()
    }

    #[test]
    fn daily_backups_over_400_days_keep_what_restic_keeps() {
        let decisions = policy(7, 7, 4, 6, 3).apply(&daily_backups(400), NOW);
        assert_eq!(decisions.len(), 400);
        let names: BTreeSet<String> = [
            // last 7 and daily 7: 14..20 November
            "20261120", "20261119", "20261118", "20261117", "20261116", "20261115", "20261114",
            // weekly: the Sundays closing weeks 46 (15th, above), 45 and 44
            "20261108", "20261101",
            // monthly: the last day of November (the newest) and of the 5 months before
            "20261031", "20260930", "20260831", "20260731", "20260630",
        ]
        .iter()
        .map(|d| format!("backup-{d}T020000"))
        .collect();
        assert_eq!(kept(&decisions), names);

        let count = |prefix: &str| {
            decisions.iter().flat_map(|d| &d.reasons).filter(|r| r.starts_with(prefix)).count()
        };
        assert_eq!((count("last "), count("daily "), count("weekly "), count("monthly ")), (7, 7, 4, 6));
        assert_eq!(
            reasons_of(&decisions, "backup-20261120T020000"),
            ["last 1", "daily 2026-11-20", "weekly 2026-W47", "monthly 2026-11", "newest good archive"]
        );
        assert_eq!(
            reasons_of(&decisions, "backup-20261115T020000"),
            ["last 6", "daily 2026-11-15", "weekly 2026-W46"]
        );
        assert_eq!(reasons_of(&decisions, "backup-20260630T020000"), ["monthly 2026-06"]);
        assert_eq!(reasons_of(&decisions, "backup-20260629T020000"), ["no rule keeps it"]);
    }

    #[test]
    fn output_is_newest_first() {
        let mut input = daily_backups(30);
        input.reverse();
        let decisions = RetentionPolicy::default().apply(&input, NOW);
        let mut names: Vec<_> = decisions.iter().map(|d| d.name.clone()).collect();
        assert_eq!(names[0], "backup-20261120T020000");
        let sorted = {
            names.sort_by(|a, b| b.cmp(a));
            names
        };
        assert_eq!(decisions.iter().map(|d| d.name.clone()).collect::<Vec<_>>(), sorted);
    }

    #[test]
    fn two_backups_on_one_day_the_newer_takes_the_daily_slot() {
        let input = vec![
            backup(at(2026, 11, 20, 2)),
            backup(at(2026, 11, 20, 14)),
            backup(at(2026, 11, 19, 2)),
            backup(at(2026, 11, 18, 2)),
        ];
        let decisions = policy(0, 2, 0, 0, 0).apply(&input, NOW);
        assert_eq!(
            kept(&decisions),
            ["backup-20261120T140000", "backup-20261119T020000"].map(String::from).into()
        );
        assert_eq!(
            reasons_of(&decisions, "backup-20261120T140000"),
            ["daily 2026-11-20", "newest good archive"]
        );
        assert!(!decisions.iter().find(|d| d.name == "backup-20261120T020000").unwrap().keep);
    }

    #[test]
    fn all_zero_keeps_only_the_newest() {
        let decisions = policy(0, 0, 0, 0, 0).apply(&daily_backups(10), NOW);
        assert_eq!(kept(&decisions), ["backup-20261120T020000".to_string()].into());
        assert_eq!(decisions[0].reasons, ["newest good archive"]);
        assert_eq!(decisions[0].expires_at, None, "an estimate needs a rule");
    }

    #[test]
    fn a_damaged_newest_is_kept_beside_the_newest_good_one_and_takes_no_slot() {
        for health in [Health::Incomplete, Health::FailedCheck] {
            let mut input = daily_backups(3);
            input[0].health = health;
            let decisions = policy(0, 0, 0, 0, 0).apply(&input, NOW);
            assert_eq!(decisions[0].name, "backup-20261120T020000");
            assert!(decisions[0].keep, "{decisions:?}");
            let why = health.why_not_good();
            assert_eq!(decisions[0].reasons, [format!("{why}; kept as if intact: newest backup")]);
            assert_eq!(
                kept(&decisions),
                ["backup-20261120T020000", "backup-20261119T020000"].map(String::from).into()
            );
            assert_eq!(reasons_of(&decisions, "backup-20261119T020000"), ["newest good archive"]);

            // A damaged archive does not use up a slot either.
            let decisions = policy(2, 0, 0, 0, 0).apply(&input, NOW);
            assert_eq!(
                kept(&decisions),
                ["backup-20261120T020000", "backup-20261119T020000", "backup-20261118T020000"]
                    .map(String::from)
                    .into()
            );
        }
    }

    /// Red team 2026-12-07, finding 3: the newest backup failed its drill (and verify); prune
    /// kept it as "newest good" and deleted the only intact one.
    #[test]
    fn a_backup_that_failed_its_drill_never_makes_the_intact_one_before_it_go() {
        let mut input = daily_backups(2);
        input[0].health = Health::FailedCheck;
        let decisions = policy(1, 0, 0, 0, 0).apply(&input, NOW);
        assert_eq!(reasons_of(&decisions, "backup-20261119T020000"), ["last 1", "newest good archive"]);
        assert!(decisions.iter().all(|d| d.keep), "{decisions:?}");
    }

    /// Red team 2026-12-07, second pass (F7): damage quick_check does not see made the next
    /// backup "good", and keep_last = 1 deleted the last backup a drill had proven.
    #[test]
    fn the_newest_backup_a_drill_proved_is_kept_until_a_newer_one_is_proven() {
        let mut input = daily_backups(4);
        input[2].drilled = true;
        input[3].drilled = true;
        let decisions = policy(1, 0, 0, 0, 0).apply(&input, NOW);
        assert_eq!(
            kept(&decisions),
            ["backup-20261120T020000", "backup-20261118T020000"].map(String::from).into()
        );
        assert_eq!(reasons_of(&decisions, "backup-20261118T020000"), ["newest backup a drill proved"]);
        // Proven again, newer: the older proof goes.
        input[0].drilled = true;
        let decisions = policy(1, 0, 0, 0, 0).apply(&input, NOW);
        assert_eq!(kept(&decisions), ["backup-20261120T020000".to_string()].into());
    }

    #[test]
    fn a_damaged_archive_goes_once_the_policy_has_moved_past_it() {
        let mut input = daily_backups(10);
        input[5].health = Health::Incomplete; // 15 November
        input[8].health = Health::FailedCheck; // 12 November
        let decisions = policy(7, 0, 0, 0, 0).apply(&input, NOW);
        // The 7 good ones: 20..16, 14, 13; were all intact, the last 7 would be 20..14.
        assert!(!kept(&decisions).contains("backup-20261112T020000"));
        assert_eq!(
            reasons_of(&decisions, "backup-20261112T020000"),
            ["failed a drill, verify or quick_check; no rule would keep it even intact"]
        );
        assert!(kept(&decisions).contains("backup-20261115T020000"));
        assert_eq!(kept(&decisions).len(), 8);
    }

    #[test]
    fn without_any_good_backup_everything_is_kept() {
        let mut input = daily_backups(5);
        for c in &mut input {
            c.health = Health::Incomplete;
        }
        input.push(pre_restore(at(2026, 10, 1, 3)));
        input.push(pre_restore(at(2026, 10, 2, 3)));
        let decisions = policy(0, 0, 0, 0, 0).apply(&input, NOW);
        assert_eq!(decisions.len(), 7);
        assert!(decisions.iter().all(|d| d.keep && d.reasons == ["no good backup: keeping everything"]));
        assert!(decisions.iter().all(|d| d.expires_at.is_none()));
        assert!(policy(0, 0, 0, 0, 0).apply(&[], NOW).is_empty());
    }

    #[test]
    fn pre_restore_archives_are_counted_apart() {
        let mut input = daily_backups(5);
        for d in 1..=4 {
            input.push(pre_restore(at(2026, 11, 20 - d, 12)));
        }
        let mut damaged = pre_restore(at(2026, 11, 20, 12));
        damaged.health = Health::Incomplete;
        input.push(damaged);
        let mut old_damaged = pre_restore(at(2026, 11, 1, 12));
        old_damaged.health = Health::FailedCheck;
        input.push(old_damaged);

        let decisions = policy(2, 0, 0, 0, 2).apply(&input, NOW);
        assert_eq!(
            kept(&decisions),
            [
                "backup-20261120T020000",
                "backup-20261119T020000",
                "pre-restore-20261120T120000",
                "pre-restore-20261119T120000",
                "pre-restore-20261118T120000"
            ]
            .map(String::from)
            .into()
        );
        assert_eq!(reasons_of(&decisions, "pre-restore-20261119T120000"), ["pre-restore 1"]);
        assert_eq!(
            reasons_of(&decisions, "pre-restore-20261117T120000"),
            ["pre-restore beyond the newest 2"]
        );
        assert_eq!(
            reasons_of(&decisions, "pre-restore-20261120T120000"),
            ["incomplete or damaged on the drive; kept as if intact: pre-restore 1"]
        );
        assert_eq!(
            reasons_of(&decisions, "pre-restore-20261101T120000"),
            ["failed a drill, verify or quick_check; no rule would keep it even intact"]
        );
        assert!(decisions.iter().filter(|d| d.name.starts_with("pre-")).all(|d| d.expires_at.is_none()));

        // Pre-restore archives neither take nor give backup slots.
        let backups_only = policy(2, 0, 0, 0, 2).apply(&daily_backups(5), NOW);
        let backup_kept: BTreeSet<_> =
            kept(&decisions).into_iter().filter(|n| n.starts_with("backup-")).collect();
        assert_eq!(backup_kept, kept(&backups_only));
        // A newer pre-restore archive is not "the newest good archive".
        let decisions = policy(0, 0, 0, 0, 0).apply(&input, NOW);
        assert_eq!(kept(&decisions), ["backup-20261120T020000".to_string()].into());
    }

    /// Red team 2026-12-07, finding 5: three retried restores of one backup pushed the only
    /// safety copy of what the first restore replaced out of the newest 3.
    #[test]
    fn retried_restores_never_push_out_a_pre_restore_archive_within_the_grace() {
        let mut input = daily_backups(2);
        let first = at(2026, 11, 20, 9);
        for m in 0..5 {
            input.push(pre_restore(first + TimeDelta::minutes(10 * m)));
        }
        let the_first = "pre-restore-20261120T090000";
        let same_day = policy(7, 0, 0, 0, 3).apply(&input, first + TimeDelta::hours(1));
        assert!(same_day.iter().all(|d| d.keep), "{same_day:?}");
        assert_eq!(
            reasons_of(&same_day, the_first),
            ["pre-restore made within 7 days (beyond the newest 3)"]
        );
        assert_eq!(decision_of(&same_day, the_first).expires_at, Some(first + PRE_RESTORE_GRACE));

        // A week later, the count applies again: the two oldest go.
        let later = policy(7, 0, 0, 0, 3).apply(&input, first + PRE_RESTORE_GRACE + TimeDelta::hours(1));
        assert_eq!(reasons_of(&later, the_first), ["pre-restore beyond the newest 3"]);
        assert_eq!(later.iter().filter(|d| !d.keep).count(), 2);
    }

    #[test]
    fn input_order_does_not_matter() {
        let mut input = daily_backups(60);
        input.push(pre_restore(at(2026, 11, 1, 5)));
        input.push(backup(at(2026, 11, 20, 2))); // duplicate time, distinct name below
        input.last_mut().unwrap().name = "backup-20261120T020000-b".into();
        let p = policy(3, 5, 3, 2, 1);
        let expected = p.apply(&input, NOW);
        let mut rng = XorShift(7);
        for _ in 0..20 {
            rng.shuffle(&mut input);
            assert_eq!(p.apply(&input, NOW), expected);
        }
    }

    #[test]
    fn expiry_is_the_latest_of_the_rules_that_keep() {
        let decisions = policy(7, 7, 4, 6, 3).apply(&daily_backups(400), NOW);
        let expiry: HashMap<_, _> = decisions.iter().map(|d| (d.name.as_str(), d.expires_at)).collect();
        // Kept by last, daily, weekly and monthly: monthly (6 x 31 days) wins.
        assert_eq!(expiry["backup-20261120T020000"], Some(at(2026, 11, 20, 2) + TimeDelta::days(186)));
        // Kept by last, daily and weekly (W46): four weeks.
        assert_eq!(expiry["backup-20261115T020000"], Some(at(2026, 11, 15, 2) + TimeDelta::weeks(4)));
        // Kept by last and daily only.
        assert_eq!(expiry["backup-20261114T020000"], Some(at(2026, 11, 14, 2) + TimeDelta::days(7)));
        assert_eq!(expiry["backup-20261108T020000"], Some(at(2026, 11, 8, 2) + TimeDelta::weeks(4)));
        assert_eq!(expiry["backup-20260629T020000"], None);
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let decisions =
            policy(u32::MAX, u32::MAX, u32::MAX, u32::MAX, u32::MAX).apply(&daily_backups(3), NOW);
        assert!(decisions.iter().all(|d| d.keep && d.expires_at.is_some()));
    }

    #[test]
    fn archive_kind_text_round_trips() {
        for k in [ArchiveKind::Backup, ArchiveKind::PreRestore] {
            assert_eq!(ArchiveKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{}\"", k.as_str()));
        }
        assert_eq!(ArchiveKind::parse("backup"), None);
    }

    // ---- invariants over random archive sets (a seeded loop: no proptest dependency) --------

    /// xorshift64: small, deterministic, good enough to spread test cases.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i as u64 + 1) as usize);
            }
        }
    }

    fn random_case(rng: &mut XorShift) -> (RetentionPolicy, Vec<Candidate>, DateTime<Utc>) {
        let p = policy(
            rng.below(6) as u32,
            rng.below(6) as u32,
            rng.below(5) as u32,
            rng.below(5) as u32,
            rng.below(4) as u32,
        );
        let n = rng.below(50);
        // Within ~3 years, often clustered so that days, weeks and months repeat.
        let span = [3_600 * 48, 86_400 * 40, 86_400 * 1_100][rng.below(3) as usize];
        let base = at(2026, 1, 1, 0);
        let candidates = (0..n)
            .map(|i| {
                let created = base + TimeDelta::seconds(rng.below(span) as i64);
                let kind = if rng.below(5) == 0 { ArchiveKind::PreRestore } else { ArchiveKind::Backup };
                let health = match rng.below(12) {
                    0 => Health::Incomplete,
                    1 => Health::FailedCheck,
                    _ => Health::Good,
                };
                Candidate { name: format!("a{i:03}"), kind, created, health, drilled: rng.below(4) == 0 }
            })
            .collect();
        // Now: within the archives' span (the pre-restore grace matters) or long after.
        let now = base + TimeDelta::seconds(rng.below(span * 2) as i64);
        (p, candidates, now)
    }

    fn check_invariants(
        p: &RetentionPolicy,
        input: &[Candidate],
        now: DateTime<Utc>,
        decisions: &[Decision],
    ) {
        let by_name: HashMap<&str, &Candidate> = input.iter().map(|c| (c.name.as_str(), c)).collect();
        let ctx = || format!("{p:?} now {now}\n{input:#?}\n{decisions:#?}");

        // Every candidate decided exactly once, newest first.
        assert_eq!(decisions.len(), input.len(), "{}", ctx());
        let names: BTreeSet<&str> = decisions.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, by_name.keys().copied().collect(), "{}", ctx());
        assert!(decisions.windows(2).all(|w| by_name[&*w[0].name].created >= by_name[&*w[1].name].created));

        for d in decisions {
            assert!(!d.reasons.is_empty(), "{}", ctx());
            // Kept exactly when no reason is one that prunes.
            let prunes = |r: &String| {
                r == NO_RULE || r.starts_with("pre-restore beyond") || r.ends_with(NOT_KEPT_EVEN_INTACT)
            };
            assert_eq!(d.keep, !d.reasons.iter().any(prunes), "{}", ctx());
            if let Some(expiry) = d.expires_at {
                assert!(d.keep && expiry >= by_name[&*d.name].created, "{}", ctx());
            }
        }

        let good = |kind: ArchiveKind| {
            let mut v: Vec<&Candidate> = input.iter().filter(|c| c.is_good() && c.kind == kind).collect();
            v.sort_by(|a, b| newest_first(a, b));
            v
        };
        let good_backups = good(ArchiveKind::Backup);
        let decision = |name: &str| decisions.iter().find(|d| d.name == name).unwrap();
        if good_backups.is_empty() {
            assert!(decisions.iter().all(|d| d.keep), "{}", ctx());
            return;
        }
        // The newest good backup, the newest good one a drill proved, and the keep_last newest
        // good backups are kept.
        assert!(decision(&good_backups[0].name).keep, "{}", ctx());
        if let Some(d) = good_backups.iter().find(|c| c.drilled) {
            assert!(decision(&d.name).keep, "{}", ctx());
        }
        for c in good_backups.iter().take(p.keep_last as usize) {
            assert!(decision(&c.name).keep, "{}", ctx());
        }
        // Damaged archives take no good one's slot: the good ones are decided as if alone...
        let good_only: Vec<Candidate> = input.iter().filter(|c| c.is_good()).cloned().collect();
        for d in p.apply(&good_only, now) {
            assert_eq!(decision(&d.name), &d, "{}", ctx());
        }
        // ...and a damaged one is kept exactly when it would be were every archive intact.
        let all_intact: Vec<Candidate> =
            input.iter().map(|c| Candidate { health: Health::Good, ..c.clone() }).collect();
        let intact = p.apply(&all_intact, now);
        for c in input.iter().filter(|c| !c.is_good()) {
            let if_intact = intact.iter().find(|d| d.name == c.name).unwrap();
            assert_eq!(decision(&c.name).keep, if_intact.keep, "{} {}", c.name, ctx());
            assert_eq!(decision(&c.name).reasons.len(), 1, "{}", ctx());
        }
        // Each periodic rule keeps one archive per period, for min(N, periods present) periods.
        let periods = |f: &dyn Fn(NaiveDate) -> String| {
            good_backups.iter().map(|c| f(c.created.date_naive())).collect::<BTreeSet<_>>().len()
        };
        let count = |prefix: &str| {
            decisions.iter().flat_map(|d| &d.reasons).filter(|r| r.starts_with(prefix)).count()
        };
        let iso = |d: NaiveDate| format!("{:?}", d.iso_week());
        let month = |d: NaiveDate| format!("{}-{}", d.year(), d.month());
        assert_eq!(count("daily "), periods(&|d| d.to_string()).min(p.keep_daily as usize), "{}", ctx());
        assert_eq!(count("weekly "), periods(&iso).min(p.keep_weekly as usize), "{}", ctx());
        assert_eq!(count("monthly "), periods(&month).min(p.keep_monthly as usize), "{}", ctx());
        assert_eq!(count("last "), good_backups.len().min(p.keep_last as usize), "{}", ctx());
        // Good pre-restore archives: the newest keep_pre_restore, and any within the grace.
        let grace = |c: &Candidate| now - c.created < PRE_RESTORE_GRACE;
        for (i, c) in good(ArchiveKind::PreRestore).iter().enumerate() {
            let expected = i < p.keep_pre_restore as usize || grace(c);
            assert_eq!(decision(&c.name).keep, expected, "{} {}", c.name, ctx());
        }
    }

    #[test]
    fn invariants_hold_for_random_archive_sets() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..3_000 {
            let (p, mut input, now) = random_case(&mut rng);
            let decisions = p.apply(&input, now);
            check_invariants(&p, &input, now, &decisions);

            // Input order never matters.
            rng.shuffle(&mut input);
            assert_eq!(p.apply(&input, now), decisions);

            // Pruning is a fixed point: running it again on what was kept deletes nothing more.
            let survivors: Vec<Candidate> = input
                .iter()
                .filter(|c| decisions.iter().any(|d| d.keep && d.name == c.name))
                .cloned()
                .collect();
            let again = p.apply(&survivors, now);
            assert!(again.iter().all(|d| d.keep), "{p:?}\n{survivors:#?}\n{again:#?}");
        }
    }

    // ---- clock -------------------------------------------------------------------------------

    #[test]
    fn a_clock_behind_the_newest_archive_is_suspicious() {
        let build = at(2026, 6, 1, 0);
        match check_clock(at(2026, 11, 19, 0), Some(at(2026, 11, 20, 2)), build) {
            ClockCheck::Suspicious(m) => assert!(m.contains("newest archive") && m.contains("NTP"), "{m}"),
            ClockCheck::Sane => panic!("clock behind the newest archive passed"),
        }
    }

    #[test]
    fn a_clock_behind_the_build_is_suspicious() {
        // A Pi that booted without network thinks it is 1970.
        let now = DateTime::<Utc>::UNIX_EPOCH;
        match check_clock(now, None, at(2026, 6, 1, 0)) {
            ClockCheck::Suspicious(m) => assert!(m.contains("1970-01-01") && m.contains("built"), "{m}"),
            ClockCheck::Sane => panic!("1970 passed"),
        }
    }

    #[test]
    fn a_clock_at_or_after_both_is_sane() {
        let t = at(2026, 11, 20, 2);
        assert_eq!(check_clock(t, Some(t), at(2026, 6, 1, 0)), ClockCheck::Sane);
        assert_eq!(check_clock(t + TimeDelta::days(1), Some(t), t), ClockCheck::Sane);
        assert_eq!(check_clock(t, None, t), ClockCheck::Sane);
    }
}
