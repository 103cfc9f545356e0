//! `datavault backup`: snapshot the database and the uploads into a new archive on the target,
//! then apply the retention policy.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::archive::write::{ArchiveWriter, WriteError};
use crate::catalog::{Event, RunStatus};
use crate::error::{is_disk_full, Error, Result};
use crate::manifest::{self, ArchiveKind, CompressionInfo, EncryptionInfo, Manifest, SourceInfo};
use crate::ops::{now, prune, Env, Run, RunError, Trigger};
use crate::snapshot;
use crate::store::ARCHIVE_SUFFIX;

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub kind: ArchiveKind,
    pub trigger: Trigger,
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
    /// A snapshot (#9): what this backup added to the drive (new packs, index, tree, refs);
    /// `manifest.archive_size` is then what the snapshot references in packs.
    pub added_bytes: Option<u64>,
    /// What `PRAGMA quick_check` found wrong in the live database (`source.check_database`):
    /// the backup holds a faithful copy of a damaged database.
    pub database_damage: Option<String>,
}

/// The whole `backup` command: lock, archive, prune, catalog.
pub fn run(env: &Env, opts: &BackupOptions) -> Result<BackupOutcome> {
    crate::ops::run_in_background_priority();
    let run = Run::start(env, "backup", opts.trigger, true)?;
    let result = backup_in_run(&run, opts);
    // A damaged live database: the archive is made (a faithful copy may be the best there
    // is), but the run failed its purpose, and says so like a failed backup (alerts too).
    if let Ok(o) = &result {
        if let Some(e) = damaged_database(env, o) {
            run.end_as(RunStatus::Failed, Some(RunError::of(&e)), Some(&o.manifest.archive));
            return Err(e);
        }
    }
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

/// The error a backup of a damaged live database ends with (exit 5, the source's fault).
fn damaged_database(env: &Env, o: &BackupOutcome) -> Option<Error> {
    let why = o.database_damage.as_ref()?;
    Some(Error::source(
        &env.settings.source.database,
        format!(
            "is damaged (PRAGMA quick_check: {why}); {} holds it as it is. Restore a backup made \
             before the damage (`datavault list`, then `datavault drill NAME` proves one) or repair the \
             database (`sqlite3 app.db .recover`)",
            o.manifest.archive
        ),
    ))
}

fn backup_in_run(run: &Run, opts: &BackupOptions) -> Result<BackupOutcome> {
    let env = run.env;
    let previous_newest = crate::ops::listings(env)
        .ok()
        .and_then(|(_, ls)| ls.iter().filter(|l| l.is_complete()).filter_map(|l| l.created()).max());
    let mut outcome = create_archive(run, opts)?.expect("a backup always has a database");
    outcome.cleaned = Vec::new();
    if let Some(why) = &outcome.database_damage {
        // Before retention runs: this backup is not a good one (it takes no good one's slot).
        let detail = format!("the live database failed quick_check when it was backed up: {why}");
        if let Err(e) = run.catalog.record_event(
            Some(run.id),
            now(),
            Event::DatabaseDamaged,
            Some(&outcome.manifest.archive),
            &detail,
        ) {
            log::warn!("{e}");
        }
    }

    // Retention runs only once the new archive is complete, and never on a suspicious clock.
    match crate::retention::check_clock(now(), previous_newest, crate::ops::build_time()) {
        crate::retention::ClockCheck::Sane => {
            match prune::prune_in_run(run, false, prune::Collect::WhenNeeded) {
                Ok(p) => outcome.pruned = p.deleted,
                Err(e) => {
                    log::warn!("backup done, but pruning failed: {e}");
                    outcome.prune_skipped = Some(format!("pruning failed: {e}"));
                }
            }
        }
        crate::retention::ClockCheck::Suspicious(why) => {
            log::warn!("clock looks wrong ({why}): backed up, but nothing was pruned; set the time (NTP) and run `datavault prune`");
            outcome.prune_skipped = Some(format!("clock looks wrong: {why}"));
        }
    }
    Ok(outcome)
}

/// What an archive will hold, decided before the drive is touched.
///
/// A regular backup needs everything and fails on what is missing (exit 5). A pre-restore
/// safety copy saves whatever is there: a missing database or uploads folder is left out,
/// and a database SQLite cannot open or read is copied raw, byte for byte; `None` from
/// [`Sources::plan`] means there was nothing at all to save.
struct Sources {
    database: DbSource,
    uploads: Option<PathBuf>,
    /// A safety copy (tolerant) rather than a backup (strict).
    safety_copy: bool,
    /// `source.check_database`.
    check_database: bool,
}

enum DbSource {
    /// Opened: snapshot it (a safety copy falls back to raw if the snapshot fails).
    Live(rusqlite::Connection),
    /// Copy these files as found (`raw/`).
    Raw,
    Missing,
}

impl Sources {
    fn plan(s: &crate::config::Settings, kind: ArchiveKind) -> Result<Option<Sources>> {
        let safety_copy = kind == ArchiveKind::PreRestore;
        let db = &s.source.database;
        let uploads = s.source.uploads.clone().filter(|u| !safety_copy || u.exists());
        // Open the source first: a missing database is a source error (5), even if the USB
        // drive is missing too, because that is the thing to fix first.
        let database = match snapshot::open(db) {
            Ok(c) => DbSource::Live(c),
            Err(e) if !safety_copy => return Err(e),
            // The database file gone but its WAL or journal still there (deleted by hand, the
            // very disaster a restore is for): those hold the newest commits, and the restore
            // moves them away, so the safety copy keeps them.
            Err(_) if !db.exists() => {
                let found = companions(db);
                if found.is_empty() {
                    DbSource::Missing
                } else {
                    log::warn!(
                        "{} is missing but its {} is there: the safety copy keeps it as it is",
                        db.display(),
                        found.join(" and ")
                    );
                    DbSource::Raw
                }
            }
            Err(e) => {
                log::warn!("{e}; the safety copy will hold its files as they are");
                DbSource::Raw
            }
        };
        if matches!(database, DbSource::Missing) && uploads.is_none() {
            return Ok(None);
        }
        Ok(Some(Sources { database, uploads, safety_copy, check_database: s.source.check_database }))
    }

    /// Stream everything into the archive: the database first and alone, so its read
    /// transaction (which pins the WAL) ends as soon as its pages are in.
    fn write<W: std::io::Write + Send + 'static>(
        &self,
        writer: &mut ArchiveWriter<W>,
        db: &Path,
        created: chrono::DateTime<chrono::Utc>,
        target_dir: &Path,
    ) -> Result<(Option<crate::manifest::DatabaseInfo>, Option<crate::manifest::TreeInfo>, Option<String>)>
    {
        let mut database = None;
        let mut damage = None;
        let mut raw = matches!(self.database, DbSource::Raw);
        let mut _catch_up = None; // waited for when it goes out of scope (a binding, not `_`)
        if let DbSource::Live(conn) = &self.database {
            match snapshot::begin(conn, db) {
                Ok(info) => {
                    damage = self.check(conn, db)?;
                    let res = writer.add_database(conn, db, &info, created);
                    _catch_up = Some(snapshot::end_with_catch_up(conn, db));
                    let mut info = res.map_err(|e| write_error(target_dir, e))?;
                    // In the manifest too: the catalog may be lost with the SD card.
                    info.damaged = damage.clone();
                    database = Some(info);
                }
                Err(e) if self.safety_copy => {
                    log::warn!("{e}; the safety copy will hold its files as they are");
                    raw = true;
                }
                Err(e) => return Err(e),
            }
        }
        if raw {
            // A database SQLite cannot read: keep its bytes, all of them.
            for suffix in DB_FILES {
                let p = crate::fsutil::with_suffix(db, suffix);
                if p.exists() {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    writer
                        .add_file(&p, format!("raw/{name}").as_bytes())
                        .map_err(|e| write_error(target_dir, e))?;
                }
            }
        }
        let tree = match &self.uploads {
            Some(u) => Some(
                writer.add_tree(u, crate::archive::TOP_UPLOADS).map_err(|e| write_error(target_dir, e))?,
            ),
            None => None,
        };
        Ok((database, tree, damage))
    }

    /// `PRAGMA quick_check` in the snapshot's read transaction, for a backup when
    /// `source.check_database` (red team 2026-12-07, finding 7: a damaged database was backed
    /// up with exit 0 and only the next drill said so). A safety copy saves what is there,
    /// damaged or not, without the extra read.
    fn check(&self, conn: &rusqlite::Connection, db: &Path) -> Result<Option<String>> {
        if self.safety_copy || !self.check_database {
            return Ok(None);
        }
        let found = snapshot::quick_check(conn, db)?;
        if let Some(why) = &found {
            log::error!(
                "{}: the live database is damaged (quick_check: {why}); backing it up as it is",
                db.display()
            );
        }
        Ok(found)
    }
}

/// Write one archive of the current live state: a backup, or (`opts.kind` PreRestore) the
/// safety copy an in-place restore takes first; `None` means there was nothing to save.
pub fn create_archive(run: &Run, opts: &BackupOptions) -> Result<Option<BackupOutcome>> {
    if run.env.settings.store_format == crate::config::StoreFormat::Snapshots {
        return create_snapshot(run, opts);
    }
    let env = run.env;
    let s = &env.settings;
    let started = Instant::now();
    let Some(sources) = Sources::plan(s, opts.kind)? else { return Ok(None) };
    let needed =
        estimate_size(&s.source.database, sources.uploads.as_deref(), s.compression.snapshot_workers);
    let store = env.store_for_writing(needed)?;
    let target_dir = &s.target.path;
    let cleaned = store.clean(&run.catalog.interrupted_archives().unwrap_or_default());

    let created = now();
    let stem = store.new_stem(opts.kind, created)?;
    // Named in the catalog before the first byte: a run cut off here leaves an orphan the
    // next run knows is its own to remove.
    if let Err(e) = run.catalog.set_run_archive(run.id, &format!("{stem}{ARCHIVE_SUFFIX}")) {
        log::warn!("{e}");
    }
    let object = store.create_archive(&stem).map_err(|e| output_error(target_dir, e))?;
    let out = BufWriter::with_capacity(1 << 20, object);
    let mut writer = ArchiveWriter::new(out, &s.encryption.recipients, s.compression, env.progress.clone())
        .map_err(|e| write_error(target_dir, e))?;
    env.progress.start("backing up", needed);
    let (database, tree, database_damage) =
        sources.write(&mut writer, &s.source.database, created, target_dir)?;
    let finished = writer.finish(created).map_err(|e| write_error(target_dir, e))?;
    env.progress.finish();
    let object = finished.output.into_inner().map_err(|e| output_error(target_dir, e.into_error()))?;
    // Durable, and still on the drive we started on (see `LocalBackend`): only then named.
    object.commit().map_err(|e| output_error(target_dir, e))?;

    let manifest = Manifest {
        format: manifest::FORMAT_VERSION,
        tool: "datavault".into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        kind: opts.kind,
        archive: format!("{stem}{ARCHIVE_SUFFIX}"),
        archive_size: finished.size,
        archive_sha256: finished.sha256.clone(),
        created,
        host: crate::ops::host(),
        user: crate::ops::user(),
        trigger: opts.trigger.as_str().into(),
        comment: opts.comment.clone(),
        source: SourceInfo::of(s),
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
    let listing = store.publish_manifest(&manifest).map_err(|e| output_error(target_dir, e))?;
    record(run, &listing, &manifest);
    let archive = target_dir.join(&manifest.archive);
    log::info!(
        "archive written: {} ({})",
        archive.display(),
        crate::target::human_bytes(manifest.archive_size)
    );
    Ok(Some(BackupOutcome {
        archive,
        manifest,
        pruned: Vec::new(),
        prune_skipped: None,
        cleaned,
        added_bytes: None,
        database_damage,
    }))
}

/// The new archive into the catalog: its record and a BACKUP_CREATED event.
fn record(run: &Run, listing: &crate::store::Listing, m: &Manifest) {
    if let Some(rec) = crate::ops::archive_record(listing) {
        if let Err(e) = run.catalog.upsert_archive(&rec) {
            log::warn!("cannot record the archive in the catalog: {e}");
        }
    }
    let detail = format!(
        "{} bytes, {} files, sha256 {}, {} ms",
        m.archive_size, m.files, m.archive_sha256, m.duration_ms
    );
    let _ = run.catalog.record_event(Some(run.id), now(), Event::BackupCreated, Some(&m.archive), &detail);
}

/// Upper bound of the archive's size: the data itself (uploads are mostly incompressible)
/// plus a little for tar headers. Only metadata is read.
pub fn estimate_size(db: &Path, uploads: Option<&Path>, threads: usize) -> u64 {
    let mut total = 0u64;
    for suffix in ["", "-wal"] {
        total += std::fs::metadata(crate::fsutil::with_suffix(db, suffix)).map(|m| m.len()).unwrap_or(0);
    }
    if let Some(u) = uploads {
        // A first backup waits for this before it starts: the workers it may use help.
        total += crate::tree::walk::occupied_bytes(u, 1024, threads);
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
    if crate::store::backend::is_drive_gone(&e) {
        Error::target(target_dir, "the drive was unmounted during the backup; nothing was written; mount it and run the backup again")
    } else if is_disk_full(&e) {
        Error::target(target_dir, "the drive filled up during the backup; the partial archive was removed; run `datavault prune` or use a bigger drive")
    } else if crate::store::backend::drive_stopped_answering(&e) {
        Error::target(target_dir, format!("the drive stopped answering during the backup ({e}); check the USB cable and mount, then back up again"))
    } else {
        Error::io(format!("cannot write the archive to {}", target_dir.display()), e)
    }
}

/// Where the snapshot store's local cache lives (it only ever saves time: rebuilt from the
/// drive when missing or in doubt).
pub fn dedup_cache_path(s: &crate::config::Settings) -> PathBuf {
    s.state.dir.join("dedup-cache.db")
}

/// The chunk key (#9): beside the config, 0600. It decrypts nothing; losing it only costs
/// deduplication against older snapshots.
pub fn chunk_key_path(s: &crate::config::Settings) -> PathBuf {
    s.path.parent().unwrap_or(Path::new("/etc/datavault")).join("chunk.key")
}

/// The suffixes of a database's files: itself, then what SQLite keeps beside it, in byte
/// order (a snapshot's tree takes its entries sorted, and refuses them otherwise).
const DB_FILES: [&str; 4] = ["", "-journal", "-shm", "-wal"];

/// The WAL and rollback journal beside `db` that exist (even with `db` gone).
fn companions(db: &Path) -> Vec<&'static str> {
    ["-wal", "-journal"]
        .into_iter()
        .filter(|suffix| crate::fsutil::with_suffix(db, suffix).symlink_metadata().is_ok())
        .collect()
}

/// A database that could not be snapshotted (the safety copy of a broken one): its files
/// as they are, under `raw/`. Only regular files: a FIFO or device put at a database path
/// is opened without blocking, refused and named in `skipped` (opening a FIFO to read waits
/// for a writer forever, with the app already stopped).
fn add_raw_database(
    w: &mut crate::store::dedup::write::SnapshotWriter<'_>,
    db: &Path,
    skipped: &mut Vec<crate::manifest::Skipped>,
) -> Result<()> {
    use crate::store::dedup::write::FileOutcome;
    for suffix in DB_FILES {
        let p = crate::fsutil::with_suffix(db, suffix);
        if p.symlink_metadata().is_err() {
            continue;
        }
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let rel = format!("raw/{name}");
        let opened = crate::fsutil::open_regular(&p).and_then(|f| Ok((f.metadata()?, f)));
        let (m, mut f) = match opened {
            Ok(ok) => ok,
            Err(e) => {
                skipped.push(crate::manifest::Skipped { path: rel, reason: format!("not copied: {e}") });
                continue;
            }
        };
        let meta = crate::tree::EntryMeta::from_metadata(&m);
        if let FileOutcome::Unreadable(e) = w.add_file(rel.as_bytes(), &meta, None, &mut f, m.len())? {
            skipped.push(crate::manifest::Skipped { path: rel, reason: format!("unreadable: {e}") });
        }
    }
    Ok(())
}

/// The uploads folder into the snapshot, by the shared walker; files unchanged since the
/// last snapshot (size, times, inode) are not read again.
fn add_uploads(
    w: &mut crate::store::dedup::write::SnapshotWriter<'_>,
    root: &Path,
    changed: &mut Vec<String>,
    skipped: &mut Vec<crate::manifest::Skipped>,
) -> Result<crate::manifest::TreeInfo> {
    use crate::store::dedup::write::FileOutcome;
    let mut info = crate::manifest::TreeInfo::default();
    let walked = crate::tree::walk::walk_ahead(root, crate::archive::TOP_UPLOADS, |item| -> Result<()> {
        use crate::tree::walk::Item;
        let skip = |skipped: &mut Vec<crate::manifest::Skipped>, rel: &[u8], reason: String| {
            skipped.push(crate::manifest::Skipped { path: manifest::escape_path(rel), reason })
        };
        match item {
            Item::Dir { rel, meta } => {
                w.add_dir(&rel, &meta)?;
                info.dirs += 1;
            }
            Item::Symlink { rel, meta, target } => {
                w.add_symlink(&rel, &meta, &target)?;
                info.symlinks += 1;
            }
            Item::File { rel, meta, stat, mut file } => {
                if let Some(n) = w.reuse_unchanged(&rel, &meta, &stat)? {
                    info.files += 1;
                    info.bytes += n;
                    return Ok(());
                }
                match w.add_file(&rel, &meta, Some(&stat), &mut file, stat.size)? {
                    FileOutcome::Added { size, changed: c } => {
                        // Rewritten in place while read (same size): what was stored may be
                        // a mix of two versions that never existed on disk. The writer's own
                        // check sees only a size change; the times tell the rest, as for
                        // archives.
                        let after =
                            rustix::fs::fstat(&file).ok().map(|st| crate::tree::FileStat::from_stat(&st));
                        let rewritten =
                            after.is_none_or(|a| a.size != stat.size || a.mtime_ns != stat.mtime_ns);
                        if c || rewritten {
                            log::warn!(
                                "{}: changed while it was read; stored as read and listed in the manifest",
                                manifest::escape_path(&rel)
                            );
                            changed.push(manifest::escape_path(&rel));
                        }
                        info.files += 1;
                        info.bytes += size;
                    }
                    FileOutcome::Unreadable(e) => {
                        log::warn!("{}: cannot read, skipped: {e}", manifest::escape_path(&rel));
                        skip(skipped, &rel, format!("unreadable: {e}"));
                    }
                }
            }
            Item::Special { rel } => {
                log::warn!(
                    "{}: special file (fifo, socket or device), not backed up",
                    manifest::escape_path(&rel)
                );
                skip(skipped, &rel, "special file (fifo, socket or device)".into());
            }
            Item::Vanished { rel } => {
                changed.push(manifest::escape_path(&rel));
                skip(skipped, &rel, "vanished during the backup".into());
            }
            Item::Replaced { rel } => {
                changed.push(manifest::escape_path(&rel));
                skip(skipped, &rel, "replaced by something else (a link?) during the backup".into());
            }
            Item::Unreadable { rel, error } => {
                log::warn!("{}: cannot read, skipped: {error}", manifest::escape_path(&rel));
                skip(skipped, &rel, format!("unreadable: {error}"));
            }
        }
        Ok(())
    });
    match walked {
        Ok(()) => Ok(info),
        Err(crate::tree::walk::WalkError::Visit(e)) => Err(e),
        Err(crate::tree::walk::WalkError::Root(e)) => {
            Err(Error::source(root, format!("cannot read the uploads folder: {e}; check source.uploads")))
        }
    }
}

/// Like [`create_archive`], into the deduplicated snapshot store (#9): the same sources,
/// the same database snapshot and the same walker; only what changed is written.
// Long on purpose (#12): the steps of one backup in their order (room, writer, database,
// raw files, uploads, finish, record); each is a call, the rest is the values they share.
fn create_snapshot(run: &Run, opts: &BackupOptions) -> Result<Option<BackupOutcome>> {
    use crate::store::dedup::write::{SnapshotMeta, SnapshotWriter, WriterOptions};
    use crate::store::dedup::Cache;
    let env = run.env;
    let s = &env.settings;
    let Some(sources) = Sources::plan(s, opts.kind)? else { return Ok(None) };
    // A first snapshot needs room for everything; later ones for what changed (a drive
    // that fills up mid-run is reported as such, exit 3). A later one is sized from the
    // newest snapshot, for the progress bar: walking every upload a second time each night
    // to estimate would cost more than the estimate is worth.
    let previous = env.store_for_reading().ok().and_then(|st| st.snapshots().ok().flatten());
    let first = previous.is_none();
    let newest_size = previous.and_then(|ds| ds.list_snapshots().ok()).and_then(|ls| {
        ls.iter().filter_map(|l| l.manifest.as_ref()).max_by_key(|m| m.created).map(|m| m.plain_bytes)
    });
    let estimate = newest_size.unwrap_or_else(|| {
        estimate_size(&s.source.database, sources.uploads.as_deref(), s.compression.snapshot_workers)
    });
    let needed = if first { estimate } else { estimate.min(64 << 20) };
    let store = env.store_for_writing(needed)?;
    let cleaned = store.clean(&run.catalog.interrupted_archives().unwrap_or_default());
    let new_store = store.snapshots()?.is_none();
    let ds = store.snapshots_or_create()?;
    let key = crate::store::dedup::load_or_create_chunk_key(&chunk_key_path(s))?;
    let mut cache = Cache::open(&dedup_cache_path(s))?;
    if new_store {
        // A store made just now holds nothing a collection could free. Recorded as clean,
        // this backup's own prune skips planning a full collection (every index entry and
        // the refs) only to find that out: 40 ms of a 1.4 s first backup here. A run cut
        // off before the end leaves index files this cache never recorded, which makes the
        // next prune collect in full, as on any other night.
        cache.sync(&ds)?;
        crate::store::dedup::gc::record_clean(&ds, &cache)?;
    }
    let created = now();
    let mut w = SnapshotWriter::begin(
        &ds,
        &mut cache,
        WriterOptions {
            kind: opts.kind,
            created,
            recipients: s.encryption.recipients.clone(),
            chunk_key: key,
            level: s.compression.level,
            progress: env.progress.clone(),
            racy_window_ms: crate::store::dedup::write::RACY_WINDOW_MS,
            workers: s.compression.snapshot_workers,
        },
    )?;
    let stem = w.name().to_string();
    if let Err(e) = run.catalog.set_run_archive(run.id, &stem) {
        log::warn!("{e}");
    }
    env.progress.start("backing up", estimate);
    let db = &s.source.database;
    let mut raw = matches!(sources.database, DbSource::Raw);
    let mut database_damage = None;
    let mut _catch_up = None; // waited for when it goes out of scope (a binding, not `_`)
    if let DbSource::Live(conn) = &sources.database {
        match snapshot::begin(conn, db) {
            Ok(info) => {
                database_damage = sources.check(conn, db)?;
                let res = w.add_database(conn, db, &info, created);
                _catch_up = Some(snapshot::end_with_catch_up(conn, db));
                res?;
                if let Some(why) = &database_damage {
                    w.note_database_damage(why);
                }
            }
            Err(e) if sources.safety_copy => {
                log::warn!("{e}; the safety copy will hold its files as they are");
                raw = true;
            }
            Err(e) => return Err(e),
        }
    }
    let mut changed = Vec::new();
    let mut skipped = Vec::new();
    if raw {
        add_raw_database(&mut w, db, &mut skipped)?;
    }
    let tree_info = match &sources.uploads {
        Some(root) => Some(add_uploads(&mut w, root, &mut changed, &mut skipped)?),
        None => None,
    };
    let m = w.finish(SnapshotMeta {
        host: crate::ops::host(),
        user: crate::ops::user(),
        trigger: opts.trigger.as_str().into(),
        comment: opts.comment.clone(),
        source: SourceInfo::of(s),
        uploads: tree_info,
        changed_during_backup: changed,
        skipped,
    })?;
    env.progress.finish();
    let listing = crate::store::Listing::of_snapshot(
        store.location(),
        &crate::store::dedup::SnapshotListing {
            name: m.snapshot.clone(),
            manifest: Some(m.clone()),
            problem: None,
        },
    );
    let manifest = listing.manifest.clone().expect("just written");
    record(run, &listing, &manifest);
    if opts.kind != ArchiveKind::PreRestore {
        // For this backup's own prune. Not a restore's safety copy: the restore may read
        // snapshots through the cache again, and the open one holds its exclusive lock.
        run.keep_chunk_cache(cache);
    }
    log::info!(
        "snapshot written: {} ({} referenced, {} added)",
        m.snapshot,
        crate::target::human_bytes(m.stored_bytes),
        crate::target::human_bytes(m.added_bytes)
    );
    Ok(Some(BackupOutcome {
        archive: PathBuf::from(listing.archive_path()),
        manifest,
        pruned: Vec::new(),
        prune_skipped: None,
        cleaned,
        added_bytes: Some(m.added_bytes),
        database_damage,
    }))
}
