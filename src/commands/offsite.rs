//! `datavault offsite push` and `datavault offsite prune`: rendering (the work is in
//! `datavault::offsite`).

use datavault::error::{exit, Result};
use datavault::offsite;
use datavault::ops::{Env, Trigger};
use datavault::target::human_bytes;

use super::prune::{decision_lines, gc_line};
use crate::ui::{json, out, Ui};

pub fn push(env: &Env, trigger: Trigger, dry_run: bool, ui: &Ui) -> Result<u8> {
    let o = offsite::run_push(env, trigger, dry_run)?;
    let code = if o.report.clean() { exit::SUCCESS } else { exit::INTEGRITY };
    if ui.json {
        json(&o)?;
        return Ok(code);
    }
    let r = &o.report;
    let verb = if dry_run { "would upload" } else { "uploaded" };
    let mut s = format!("offsite push {} -> {}\n", r.source, r.destination);
    if !o.aborted_uploads.is_empty() {
        s += &format!(
            "  {} unfinished upload(s) left by an interrupted push {}: {}\n",
            o.aborted_uploads.len(),
            if dry_run { "would be aborted" } else { "aborted" },
            o.aborted_uploads.join(", ")
        );
    }
    s += &format!("  {verb} {} file(s), {}\n", r.uploaded.len(), human_bytes(r.uploaded_bytes));
    s += &format!("  already there: {} file(s)\n", r.already_there);
    if !r.adopted.is_empty() {
        s += &format!(
            "  recorded {} file(s) an interrupted push had sent (read back, identical)\n",
            r.adopted.len()
        );
    }
    if !r.not_kept_remotely.is_empty() {
        s += &format!(
            "  not sent ([offsite.retention] does not keep them): {}\n",
            r.not_kept_remotely.join(", ")
        );
    }
    for p in &r.conflicts {
        s += &format!("  CONFLICT {}: {}\n", p.path, p.why);
    }
    for p in &r.damaged_locally {
        s += &format!("  DAMAGED ON THE DRIVE {}: {}\n", p.path, p.why);
    }
    for v in &r.vanished {
        s += &format!("  gone from the drive meanwhile (pruned?): {v}\n");
    }
    if let Some(why) = &r.snapshots_deferred {
        s += &format!("  snapshots not sent: {why}\n");
    }
    if !dry_run {
        let b = &r.behind;
        s += &if b.files == 0 {
            "  the offsite copy is up to date\n".to_string()
        } else {
            format!(
                "  still behind: {} backup(s), {} snapshot(s), {} file(s), {}\n",
                b.backups,
                b.snapshots,
                b.files,
                human_bytes(b.bytes)
            )
        };
        if let Some(n) = &b.newest_remote_backup {
            s += &format!("  newest backup offsite: {n}\n");
        }
    }
    if code != exit::SUCCESS {
        s += "  some objects conflict or are damaged: nothing was overwritten; see docs/offsite.md\n";
    }
    out(&s)?;
    Ok(code)
}

pub fn prune(env: &Env, dry_run: bool, ui: &Ui) -> Result<u8> {
    let o = offsite::run_prune(env, dry_run)?;
    if ui.json {
        json(&o)?;
        return Ok(exit::SUCCESS);
    }
    let mut s = format!("offsite prune {}\n", o.location);
    s += &decision_lines(&o.decisions, dry_run, ("WOULD DELETE", "deleted"), "");
    for p in &o.orphans_deleted {
        s += &format!("{} {p} (incomplete)\n", if dry_run { "WOULD DELETE" } else { "deleted" });
    }
    if !o.aborted_uploads.is_empty() {
        s += &format!("aborted {} unfinished upload(s) older than a day\n", o.aborted_uploads.len());
    }
    if o.ledger_merged > 0 {
        s += &format!("merged {} ledger object(s) into one\n", o.ledger_merged);
    }
    s += &format!(
        "{} archive(s) {}\n",
        o.deleted.len(),
        if dry_run { "would be deleted (dry run)" } else { "deleted" }
    );
    if let Some(st) = &o.store {
        s += &decision_lines(&st.decisions, dry_run, ("WOULD FORGET", "forgot"), "snapshot ");
        if let Some(why) = &st.gc_deferred {
            s += &format!("packs not collected: {why}\n");
        }
        if let Some(g) = &st.gc {
            s += &gc_line(g, dry_run);
        }
        s += &format!(
            "{} snapshot(s) {}\n",
            st.forgotten.len(),
            if dry_run { "would be forgotten (dry run)" } else { "forgotten" }
        );
    }
    out(&s)?;
    Ok(exit::SUCCESS)
}
