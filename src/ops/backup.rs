//! `datavault backup`: snapshot the database and the uploads into a new archive on the target,
//! then apply the retention policy.

use std::io::BufWriter;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::archive::write::{ArchiveWriter, WriteError};
use crate::catalog::{Event, RunStatus};
use crate::error::{is_disk_full, Error, Result};
use crate::fsutil::{write_atomic, PartialFile, SteadyWriter};

/// Flush the archive to disk every 16 MiB as it is written (see `SteadyWriter`).
const FLUSH_EVERY: u64 = 16 << 20;
use crate::manifest::{
    self, ArchiveKind, CompressionInfo, EncryptionInfo, Manifest, SourceInfo, ARCHIVE_SUFFIX, MANIFEST_SUFFIX,
};
use crate::ops::{now, prune, Env, Run};
use crate::snapshot;

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub kind: ArchiveKind,
    pub trigger: String,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupOutcome {
    pub archive: PathBuf,
    pub manifest: Manifest,
    pub pruned: Vec<String>,
    /// Why pruning was skipped, if it was.
    pub prune_skipped: Option<String>,
    pub cleaned: Vec<String>,
}

/// The whole `backup` command: lock, archive, prune, catalog.
pub fn run(env: &Env, opts: &BackupOptions) -> Result<BackupOutcome> {
    crate::ops::run_in_background_priority();
    let run = Run::start(env, "backup", &opts.trigger, true)?;
    let result = backup_in_run(&run, opts);
    let (status, archive) = match &result {
        Ok(o) if !o.manifest.skipped.is_empty() => (RunStatus::Warning, Some(o.manifest.archive.clone())),
        Ok(o) => (RunStatus::Success, Some(o.manifest.archive.clone())),
        Err(_) => (RunStatus::Failed, None),
    };
    run.end(&result, status, archive.as_deref());
    let outcome = result?;
    let unreadable: Vec<_> =
        outcome.manifest.skipped.iter().filter(|s| s.reason.starts_with("unreadable")).collect();
    if let (Some(first), Some(uploads)) = (unreadable.first(), &env.settings.source.uploads) {
        return Err(Error::source(
            uploads,
            format!(
                "{} file(s) could not be read and are NOT in {} (listed in its manifest), first: {} ({}); fix their permissions",
                unreadable.len(),
                outcome.manifest.archive,
                first.path,
                first.reason
            ),
        ));
    }
    Ok(outcome)
}

fn backup_in_run(run: &Run, opts: &BackupOptions) -> Result<BackupOutcome> {
    let env = run.env;
    let previous_newest = crate::ops::listings(env)
        .ok()
        .and_then(|ls| ls.iter().filter(|l| l.is_complete()).filter_map(|l| l.created()).max());
    let mut outcome = create_archive(run, opts, false)?.expect("a backup always has a database");
    outcome.cleaned = Vec::new();

    // Retention runs only once the new archive is complete, and never on a suspicious clock.
    match crate::retention::check_clock(now(), previous_newest, crate::ops::build_time()) {
        crate::retention::ClockCheck::Sane => match prune::prune_in_run(run, false) {
            Ok(p) => outcome.pruned = p.deleted,
            Err(e) => {
                log::warn!("backup done, but pruning failed: {e}");
                outcome.prune_skipped = Some(format!("pruning failed: {e}"));
            }
        },
        crate::retention::ClockCheck::Suspicious(why) => {
            log::warn!("clock looks wrong ({why}): backed up, but nothing was pruned; set the time (NTP) and run `datavault prune`");
            outcome.prune_skipped = Some(format!("clock looks wrong: {why}"));
        }
    }
    Ok(outcome)
}

/// Write one archive of the current live state. For a pre-restore safety copy
/// (`tolerate_missing`), a missing database or uploads folder is skipped rather than an
/// error, a database SQLite cannot read is copied raw, and `None` means there was nothing
/// at all to save.
pub fn create_archive(
    run: &Run,
    opts: &BackupOptions,
    tolerate_missing: bool,
) -> Result<Option<BackupOutcome>> {
    let env = run.env;
    let s = &env.settings;
    let started = Instant::now();
    let db_path = &s.source.database;
    let db_exists = db_path.exists();
    let uploads = s.source.uploads.as_ref().filter(|u| !tolerate_missing || u.exists());
    if !db_exists && tolerate_missing && uploads.is_none() {
        return Ok(None);
    }

    // Open the source first: a missing database is a source error (5), even if the USB
    // drive is missing too, because that is the thing to fix first.
    let conn = if db_exists || !tolerate_missing { Some(snapshot::open(db_path)) } else { None };
    let conn = match conn {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) if !tolerate_missing => return Err(e),
        Some(Err(e)) => {
            log::warn!("{e}; the safety copy will hold its files as they are");
            None
        }
        None => None,
    };

    let needed = estimate_size(db_path, uploads.map(|p| p.as_path()));
    crate::target::require_writable(&s.target, &env.system_root, needed)?;
    let target_dir = &s.target.path;
    let cleaned = crate::ops::clean_target(target_dir);

    let created = now();
    let stem = unique_stem(target_dir, opts.kind, created);
    let archive_name = format!("{stem}{ARCHIVE_SUFFIX}");
    let archive_path = target_dir.join(&archive_name);
    let mut partial =
        PartialFile::create(&archive_path, 0o600).map_err(|e| output_error_ctx(target_dir, e))?;
    let out = BufWriter::with_capacity(1 << 20, SteadyWriter::new(partial.take_file(), FLUSH_EVERY));
    let mut writer = ArchiveWriter::new(out, &s.encryption.recipients, s.compression, env.progress.clone())
        .map_err(|e| write_error(target_dir, e))?;
    env.progress.start("backing up", needed);

    let mut database = None;
    if let Some(conn) = &conn {
        let info = snapshot::begin(conn, db_path);
        let info = match info {
            Ok(i) => Some(i),
            Err(e) if tolerate_missing => {
                log::warn!("{e}; the safety copy will hold its files as they are");
                None
            }
            Err(e) => return Err(e),
        };
        if let Some(info) = info {
            // The database goes first and alone: the read transaction ends as soon as its
            // pages are in, so the WAL is pinned for as short a time as possible.
            let res = writer.add_database(conn, db_path, &info, created);
            snapshot::end(conn);
            database = Some(res.map_err(|e| write_error(target_dir, e))?);
        }
    }
    if database.is_none() && db_exists {
        // Pre-restore of a database SQLite cannot read: keep its bytes, all of them.
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = db_path.as_os_str().to_owned();
            p.push(suffix);
            let p = PathBuf::from(p);
            if p.exists() {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let rel = format!("raw/{name}");
                writer.add_file(&p, rel.as_bytes()).map_err(|e| write_error(target_dir, e))?;
            }
        }
    }
    let tree = match uploads {
        Some(u) => {
            Some(writer.add_tree(u, crate::archive::TOP_UPLOADS).map_err(|e| write_error(target_dir, e))?)
        }
        None => None,
    };
    let finished = writer.finish(created).map_err(|e| write_error(target_dir, e))?;
    env.progress.finish();
    let file =
        finished.output.into_inner().map_err(|e| output_error(target_dir, e.into_error()))?.into_inner();

    // If the drive was unmounted under us, the rename below would land in the folder on the
    // SD card underneath. The open file still lives on the old device: compare.
    let file_dev = file.metadata().map(|m| m.dev()).ok();
    let dir_dev = std::fs::metadata(target_dir).map(|m| m.dev()).ok();
    if file_dev.is_none() || file_dev != dir_dev {
        return Err(Error::target(target_dir, "the drive was unmounted during the backup; nothing was written; mount it and run the backup again"));
    }
    partial.put_file(file);
    partial.commit().map_err(|e| output_error_ctx(target_dir, e))?;

    let manifest = Manifest {
        format: manifest::FORMAT_VERSION,
        tool: "datavault".into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        kind: opts.kind,
        archive: archive_name.clone(),
        archive_size: finished.size,
        archive_sha256: finished.sha256.clone(),
        created,
        host: crate::ops::host(),
        user: crate::ops::user(),
        trigger: opts.trigger.clone(),
        comment: opts.comment.clone(),
        source: SourceInfo {
            database: db_path.display().to_string(),
            uploads: s.source.uploads.as_ref().map(|p| p.display().to_string()),
        },
        database,
        uploads: tree,
        files: finished.files,
        plain_bytes: finished.plain_bytes,
        compression: CompressionInfo { algorithm: "zstd".into(), level: s.compression.level },
        encryption: EncryptionInfo {
            algorithm: "age-x25519".into(),
            recipients: s.encryption.recipients.iter().map(|r| r.to_string()).collect(),
        },
        duration_ms: started.elapsed().as_millis() as u64,
        changed_during_backup: finished.changed,
        skipped: finished.skipped,
    };
    // The manifest is written last: it is what makes the archive complete.
    let manifest_path = target_dir.join(format!("{stem}{MANIFEST_SUFFIX}"));
    write_atomic(&manifest_path, &manifest.to_json(), 0o600).map_err(|e| output_error_ctx(target_dir, e))?;

    let listing = manifest::Listing {
        name: archive_name.clone(),
        archive_path: archive_path.clone(),
        manifest_path,
        manifest: Some(manifest.clone()),
        problem: None,
    };
    if let Some(rec) = crate::ops::archive_record(&listing) {
        if let Err(e) = run.catalog.upsert_archive(&rec) {
            log::warn!("cannot record the archive in the catalog: {e}");
        }
    }
    let detail = format!(
        "{} bytes, {} files, sha256 {}, {} ms",
        manifest.archive_size, manifest.files, manifest.archive_sha256, manifest.duration_ms
    );
    let _ = run.catalog.record_event(Some(run.id), now(), Event::BackupCreated, Some(&archive_name), &detail);
    log::info!(
        "archive written: {} ({})",
        archive_path.display(),
        crate::target::human_bytes(manifest.archive_size)
    );
    Ok(Some(BackupOutcome {
        archive: archive_path,
        manifest,
        pruned: Vec::new(),
        prune_skipped: None,
        cleaned,
    }))
}

/// `backup-<time>`, or `backup-<time>-2`... if two archives are made in the same millisecond.
fn unique_stem(dir: &Path, kind: ArchiveKind, created: chrono::DateTime<chrono::Utc>) -> String {
    let base = manifest::archive_stem(kind, created);
    let mut stem = base.clone();
    let mut n = 1;
    while dir.join(format!("{stem}{ARCHIVE_SUFFIX}")).exists()
        || dir.join(format!("{stem}{MANIFEST_SUFFIX}")).exists()
        || dir.join(format!("{stem}{ARCHIVE_SUFFIX}{}", crate::fsutil::PARTIAL_SUFFIX)).exists()
    {
        n += 1;
        stem = format!("{base}-{n}");
    }
    stem
}

/// Upper bound of the archive's size: the data itself (uploads are mostly incompressible)
/// plus a little for tar headers. Only metadata is read.
pub fn estimate_size(db: &Path, uploads: Option<&Path>) -> u64 {
    let mut total = 0u64;
    for suffix in ["", "-wal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        total += std::fs::metadata(PathBuf::from(p)).map(|m| m.len()).unwrap_or(0);
    }
    if let Some(u) = uploads {
        for e in walkdir::WalkDir::new(u).follow_links(false).into_iter().flatten() {
            if let Ok(m) = e.metadata() {
                if m.is_file() {
                    total += m.len() + 1024;
                }
            }
        }
    }
    total + (1 << 20)
}

fn write_error(target_dir: &Path, e: WriteError) -> Error {
    match e {
        WriteError::Output(io) => output_error(target_dir, io),
        WriteError::Other(e) => e,
    }
}

fn output_error(target_dir: &Path, e: std::io::Error) -> Error {
    if is_disk_full(&e) {
        Error::target(target_dir, "the drive filled up during the backup; the partial archive was removed; run `datavault prune` or use a bigger drive")
    } else if matches!(e.raw_os_error(), Some(5) | Some(19) | Some(6) | Some(2) | Some(30)) {
        // EIO, ENODEV, ENXIO, ENOENT: the USB drive went away. EROFS: ext4 made itself
        // read-only after such errors (the next run after an unplug met it: exit 1, #13).
        Error::target(target_dir, format!("the drive stopped answering during the backup ({e}); check the USB cable and mount, then back up again"))
    } else {
        Error::io(format!("cannot write the archive to {}", target_dir.display()), e)
    }
}

fn output_error_ctx(target_dir: &Path, e: Error) -> Error {
    match e {
        Error::Io { source, .. } => output_error(target_dir, source),
        other => other,
    }
}
