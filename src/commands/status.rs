//! `datavault status`: the library says what is known and what needs doing; this words it.

use datavault::error::{exit, Result};
use datavault::manifest::format_time;
use datavault::ops::health::Advice;
use datavault::ops::{self, Env};
use datavault::target::human_bytes;

use crate::ui::{json, out, Ui};

/// One sentence per piece of advice: what is wrong and the command that fixes it.
pub fn advice_text(a: &Advice, target: &std::path::Path) -> String {
    match a {
        Advice::TargetNotReady { problem } => format!("target {}: {problem}", target.display()),
        Advice::NoBackupYet => "no backup yet: run `datavault backup`".into(),
        Advice::BackupOverdue { hours, max_age_hours } => format!(
            "the last good backup is {hours} hours old (more than agent.max_age_hours = {max_age_hours}): check `systemctl status datavault-backup.timer`, then run `datavault backup`"
        ),
        Advice::DrillOverdue { days, max_age_days } => format!(
            "restore drills are overdue ({}; drill.max_age_days = {max_age_days}): run `datavault drill`, and check `systemctl status datavault-drill-weekly.timer`",
            days.map(|d| format!("the last one ran {d} days ago")).unwrap_or_else(|| "none since the first backup".into())
        ),
        Advice::DriveNearlyFull { used_percent, free_bytes, days_to_full } => format!(
            "the backup drive is nearly full ({used_percent:.0}% used, {} free{}): lower [retention] or use a bigger drive",
            human_bytes(*free_bytes),
            days_to_full.map(|d| format!(", full in ~{d:.0} days at the current growth")).unwrap_or_default()
        ),
        Advice::NotificationsPending { count, error } => format!(
            "{count} notification(s) not delivered yet{}: check the network and [notify], then `datavault notify`",
            error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
        ),
        Advice::LastBackupFailed { error } => format!("the last backup failed: {error}"),
        Advice::NoDrillYet => "no drill yet: run `datavault drill` to prove the backups restore".into(),
        Advice::DrillFailed { detail } => {
            format!("the last drill FAILED ({detail}): run `datavault verify --all --deep`")
        }
        Advice::IncompleteArchives { count } => format!(
            "{count} archive(s) are incomplete or damaged: see `datavault list`; retention keeps them as long as it would keep them intact (they may still give back part of the data), and a snapshot without its refs file stops the drive's garbage collection until the file is back"
        ),
        Advice::InterruptedRestore { archive } => format!(
            "an interrupted restore of {archive} was found: the next datavault run that takes the lock (backup, drill, prune, restore) finishes or undoes it; run `datavault backup` now"
        ),
        Advice::CatalogUnreadable { problem } => format!("the catalog cannot be read ({problem}); run `datavault doctor`"),
        Advice::SnapshotStoreDamaged { problem } => format!(
            "the snapshot store on the drive cannot be opened ({problem}): its snapshots are not listed and backups to it fail; the archives still restore (`datavault list`)"
        ),
        Advice::OffsiteBehind { hours, backups, max_behind_hours, last_error } => format!(
            "the offsite copy is behind: {backups} backup(s) not pushed, the oldest made {hours} hours ago (more than offsite.max_behind_hours = {max_behind_hours}){}: check `systemctl status datavault-offsite.timer`, then run `datavault offsite push`",
            last_error.as_ref().map(|e| format!("; the last push failed: {e}")).unwrap_or_default()
        ),
        Advice::ArchivesInFuture { names } => format!(
            "{} dated in the future (made while the clock was wrong): never taken as the newest, and pruning waits until the clock passes {}; if `date` is right now, delete {} by hand",
            names.join(", "),
            if names.len() == 1 { "its date" } else { "their dates" },
            if names.len() == 1 { "it" } else { "them" }
        ),
    }
}

pub fn run(env: &Env, ui: &Ui) -> Result<u8> {
    let st = ops::status::run(env)?;
    let target = &env.settings.target.path;
    let next: Vec<String> = st.advice.iter().map(|a| advice_text(a, target)).collect();
    if ui.json {
        let mut v = serde_json::to_value(&st).expect("status serializes");
        v["next_steps"] = next.into();
        json(&v)?;
        return Ok(exit::SUCCESS);
    }
    let h = &st.health;
    let mut s = format!("{}\n", if st.healthy { "status: OK" } else { "status: NEEDS ATTENTION" });
    s += &format!(
        "  last good backup: {}\n",
        h.last_good_backup.map(format_time).unwrap_or_else(|| "never".into())
    );
    if let Some(r) = &h.last_backup_run {
        s += &format!("  last backup run:  {} {:?}\n", format_time(r.started_at), r.status);
    }
    s += &match &h.last_drill {
        Some(d) => format!(
            "  last drill:       {} {}\n",
            format_time(d.at),
            if d.passed { "PASSED" } else { "FAILED" }
        ),
        None => "  last drill:       never\n".into(),
    };
    if h.drill_overdue {
        s += &format!("  drills:           OVERDUE (none for more than {} days)\n", h.drill_max_age_days);
    }
    if let Some(t) = &h.target {
        s += &format!(
            "  target:           {} ({}{}, {} free of {})\n",
            t.path.display(),
            if t.is_mountpoint { "mounted" } else { "NOT mounted" },
            if t.luks.is_some() { ", LUKS" } else { "" },
            human_bytes(t.free_bytes),
            human_bytes(t.total_bytes)
        );
    }
    if let Some(d) = &h.drive {
        s += &format!("  drive:            {}\n", datavault::alerts::fill_detail(d));
    }
    if let (Some(n), Some(bad)) = (h.archives, h.incomplete_archives) {
        s += &format!("  archives:         {n} complete, {bad} incomplete\n");
    }
    if let Some(o) = &h.offsite {
        s += &format!(
            "  offsite:          {} (last push {}{}; {} backup(s) waiting{})\n",
            o.location,
            o.last_success.map(format_time).map(|t| format!("OK {t}")).unwrap_or_else(|| "never OK".into()),
            if o.last_error.is_some() { ", the last attempt FAILED" } else { "" },
            o.backups_waiting,
            if o.behind { ": BEHIND" } else { "" }
        );
    }
    if let Some(r) = &h.running {
        s += &format!("  running now:      {r}\n");
    }
    if !next.is_empty() {
        s += "next steps:\n";
        for n in &next {
            s += &format!("  - {n}\n");
        }
    }
    out(&s)?;
    Ok(exit::SUCCESS)
}
