//! `datavault backup`.

use datavault::error::{exit, Result};
use datavault::ops::{self, backup::BackupOptions, Env, Trigger};
use datavault::retention::ArchiveKind;
use datavault::target::human_bytes;

use crate::ui::{json, out, Ui};

pub fn run(env: &Env, trigger: Trigger, comment: Option<String>, ui: &Ui) -> Result<u8> {
    let opts = BackupOptions { kind: ArchiveKind::Backup, trigger, comment };
    let o = ops::backup::run(env, &opts)?;
    if ui.json {
        json(&o)?;
        return Ok(exit::SUCCESS);
    }
    let m = &o.manifest;
    let mut s = format!("backup created: {}\n", o.archive.display());
    match o.added_bytes {
        // A deduplicated snapshot (#9): what it added is what this backup cost the drive.
        Some(added) => {
            s += &format!(
                "  snapshot: {} added to the drive ({} referenced), {} files, {} of data, took {:.1} s\n",
                human_bytes(added),
                human_bytes(m.archive_size),
                m.files,
                human_bytes(m.plain_bytes),
                m.duration_ms as f64 / 1000.0
            )
        }
        None => {
            s += &format!(
                "  {} archive, {} files, {} of data, took {:.1} s\n",
                human_bytes(m.archive_size),
                m.files,
                human_bytes(m.plain_bytes),
                m.duration_ms as f64 / 1000.0
            )
        }
    }
    if let Some(db) = &m.database {
        s += &format!(
            "  database {} ({} pages, schema version {})\n",
            human_bytes(db.size),
            db.page_count,
            db.schema_version
        );
    }
    let what = if o.added_bytes.is_some() { "tree sha256" } else { "sha256" };
    s += &format!("  {what} {}\n", m.archive_sha256);
    if !m.changed_during_backup.is_empty() {
        s += &format!(
            "  {} file(s) changed while being read (listed in the manifest)\n",
            m.changed_during_backup.len()
        );
    }
    if !m.skipped.is_empty() {
        s += &format!("  {} item(s) skipped (listed in the manifest)\n", m.skipped.len());
    }
    if !o.pruned.is_empty() {
        s += &format!("  pruned {} old archive(s): {}\n", o.pruned.len(), o.pruned.join(", "));
    }
    if let Some(why) = &o.prune_skipped {
        s += &format!("  pruning skipped: {why}\n");
    }
    out(&s)?;
    Ok(exit::SUCCESS)
}
