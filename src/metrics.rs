//! Machine-readable metrics: a Prometheus textfile (`datavault.prom` in the state folder),
//! rewritten atomically after every run so node_exporter's textfile collector never reads a
//! half-written file.

use std::fmt::Write as _;
use std::path::Path;

use crate::catalog::{Catalog, Event, RunStatus};
use crate::error::Result;
use crate::fsutil::write_atomic;
use crate::ops::health::Health;

/// Everything the file shows is derived from the catalog, so a failed run never erases the
/// figures of the last good one.
pub fn write(path: &Path, catalog: &Catalog, health: &Health) -> Result<()> {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP datavault_{name} {help}\n# TYPE datavault_{name} gauge\ndatavault_{name} {value}"
        );
    };
    let last_backup = catalog.last_run("backup", Some(RunStatus::Success))?;
    let last_any = catalog.last_run("backup", None)?;
    let ts = |t: chrono::DateTime<chrono::Utc>| t.timestamp_millis() as f64 / 1000.0;
    if let Some(r) = &last_backup {
        gauge(
            "last_success_timestamp_seconds",
            "End of the last successful backup (Unix time).",
            ts(r.ended_at.unwrap_or(r.started_at)),
        );
        if let Some(end) = r.ended_at {
            gauge(
                "last_success_duration_seconds",
                "Duration of the last successful backup.",
                (end - r.started_at).num_milliseconds() as f64 / 1000.0,
            );
        }
    }
    // The rules are ops::health's, read once for status, doctor, the LED and these lines.
    gauge(
        "backup_overdue",
        "1 if no backup succeeded within agent.max_age_hours (the rule status, doctor and the LED use).",
        if health.overdue { 1.0 } else { 0.0 },
    );
    if let Some(r) = &last_any {
        gauge(
            "last_run_success",
            "1 if the last backup run succeeded, 0 if it failed.",
            if r.status == RunStatus::Success { 1.0 } else { 0.0 },
        );
        gauge("last_run_timestamp_seconds", "Start of the last backup run (Unix time).", ts(r.started_at));
    }
    let archives = catalog.archives()?;
    let active: Vec<_> =
        archives.iter().filter(|a| a.status == crate::catalog::ArchiveStatus::Active).collect();
    if let Some(a) = active.iter().find(|a| a.kind == crate::manifest::ArchiveKind::Backup) {
        gauge("last_archive_bytes", "Size of the newest archive file.", a.size as f64);
        gauge("last_archive_files", "Files in the newest archive.", a.files as f64);
    }
    gauge("archives", "Archives present on the target.", active.len() as f64);
    gauge(
        "archives_bytes",
        "Total size of the archives on the target.",
        active.iter().map(|a| a.size as f64).sum(),
    );
    if let Some(e) = catalog.last_event(&[Event::DrillPassed, Event::DrillFailed])? {
        gauge(
            "last_drill_success",
            "1 if the last drill passed, 0 if it failed.",
            if e.event == Event::DrillPassed { 1.0 } else { 0.0 },
        );
        gauge("last_drill_timestamp_seconds", "Time of the last drill (Unix time).", ts(e.at));
    }
    offsite_gauges(&mut gauge, health);
    gauge(
        "drill_overdue",
        "1 if no restore drill ran within drill.max_age_days (the rule status, doctor and the LED use).",
        if health.drill_overdue { 1.0 } else { 0.0 },
    );
    gauge(
        "notifications_pending",
        "Notifications not yet delivered (retried at the next notify run).",
        health.notifications_pending as f64,
    );
    write_atomic(path, out.as_bytes(), 0o644)
}

/// The offsite copy (#10): what the last push recorded (`offsite-state.json`), and the one
/// offsite rule of `ops::health`. Nothing without `[offsite]`.
fn offsite_gauges(gauge: &mut impl FnMut(&str, &str, f64), health: &Health) {
    let Some(o) = &health.offsite else { return };
    let ts = |t: chrono::DateTime<chrono::Utc>| t.timestamp_millis() as f64 / 1000.0;
    if let Some(t) = o.last_success {
        gauge(
            "offsite_last_success_timestamp_seconds",
            "End of the last successful offsite push (Unix time).",
            ts(t),
        );
    }
    if let Some(t) = o.last_attempt {
        gauge(
            "offsite_last_run_success",
            "1 if the last offsite push succeeded, 0 if it failed.",
            if o.last_error.is_none() { 1.0 } else { 0.0 },
        );
        gauge("offsite_last_run_timestamp_seconds", "Start of the last offsite push (Unix time).", ts(t));
    }
    let behind = &o.behind_at_last_push;
    gauge(
        "offsite_backups_behind",
        "Backups on the drive not yet visible in the bucket (at the last push).",
        behind.backups as f64,
    );
    gauge(
        "offsite_snapshots_behind",
        "Snapshots on the drive not yet visible in the bucket (at the last push).",
        behind.snapshots as f64,
    );
    gauge("offsite_bytes_behind", "Bytes the bucket lacked after the last push.", behind.bytes as f64);
    gauge(
        "offsite_backups_waiting",
        "Backups on the drive made since the last successful offsite push started (not known to be offsite).",
        o.backups_waiting as f64,
    );
    gauge(
        "offsite_behind",
        "1 if a backup waited more than offsite.max_behind_hours to be pushed (the rule status, doctor and the LED use).",
        if o.behind { 1.0 } else { 0.0 },
    );
}
