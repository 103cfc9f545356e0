//! `datavault restore`: put an archive's data back.
//!
//! `--to DIR` extracts into an empty folder and touches nothing else. In place (the disaster
//! case) the order is what keeps data safe:
//!
//! 1. plan and preflight ([`plan`]): refuse up front what would make the swap fail half-way
//!    or move what it must not (a mount point as uploads or inside it, a symlinked database);
//! 2. extract into staging folders beside the live paths (same filesystem, so the swap is a
//!    rename) and verify everything: archive checksum, every file hash, `integrity_check`, the
//!    drill's SQL checks. A bad archive stops here; nothing live was touched;
//! 3. journal `stopping`, run the stop command (with a timeout), then take the PRE-RESTORE
//!    safety archive: after the stop, so what the app wrote while stopping is in it;
//! 4. journal `swapping` with every rename, then swap ([`swap`]);
//! 5. journal `swapped`, run the start command; if it fails: journal `rolling_back`, stop,
//!    put the previous data back, start again.
//!
//! Each journal phase is durable before the renames it guards ([`journal`]), so the next
//! locked run after a power cut finishes or undoes the restore: the live data is always
//! exactly the old state or exactly the restored one.

mod journal;
mod plan;
mod swap;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::archive::read::{read_archive, ReadReport};
use crate::catalog::{Event, RunStatus};
use crate::crashpoint::crash_point;
use crate::error::{Error, Result};
use crate::fsutil::{fsync_dir, remove_tree};
use crate::manifest::{unescape_path, ArchiveKind, Manifest};
use crate::ops::backup::{create_archive, BackupOptions};
use crate::ops::drill::{read_and_check, Check};
use crate::ops::service::{self, Which};
use crate::ops::{now, Env, Run, Trigger};
use crate::store::{Listing, Store};
use crate::tree::extract::{settle_as_written, AfterWrite, ExtractPlan, LiveOwner};
use journal::{Journal, Phase};
pub use plan::RestorePlan;
use plan::{STAGED_DB, STAGE_PREFIX};
use swap::{Dirs, Undo};

#[derive(Debug, Clone, Serialize)]
pub struct RestoreOutcome {
    pub archive: String,
    pub in_place: bool,
    pub destination: Vec<PathBuf>,
    pub pre_restore_archive: Option<String>,
    /// `--no-safety-copy`: the replaced data was not saved.
    pub safety_copy_skipped: bool,
    /// Where the archive was read: the drive's folder, or `s3://bucket/prefix`.
    pub from: String,
    pub files: u64,
    pub bytes: u64,
    pub checks: Vec<Check>,
    pub seconds: f64,
}

/// The archive an in-place restore brings back when none is named: the newest complete
/// backup no check failed ([`crate::ops::select_for_restore`]). The operator confirms this name and it is passed down unchanged, so a backup
/// finishing meanwhile cannot change what is restored.
pub fn choose(env: &Env, which: Option<&str>) -> Result<Listing> {
    let (_, listings) = crate::ops::listings(env)?;
    let catalog = crate::catalog::Catalog::open(&env.settings.state.catalog_path()).ok();
    let failed = crate::ops::failed_checks(catalog.as_ref(), &listings);
    crate::ops::select_for_restore(&listings, which, &failed).cloned()
}

/// `restore --to DIR`: into an empty folder; needs no lock, changes nothing else. With
/// `skip_damaged` (snapshots), a file none of whose copies reads is left out and named, and
/// every other file is restored: the run still fails (exit 4), after writing them.
pub fn to_dir(env: &Env, which: Option<&str>, dir: &Path, skip_damaged: bool) -> Result<RestoreOutcome> {
    let run = Run::start(env, "restore", Trigger::Manual, false)?;
    let result = to_dir_in_run(&run, which, dir, skip_damaged);
    run.end(&result, RunStatus::Success, result.as_ref().ok().map(|o| o.archive.as_str()));
    result
}

fn to_dir_in_run(run: &Run, which: Option<&str>, dir: &Path, skip_damaged: bool) -> Result<RestoreOutcome> {
    let env = run.env;
    let started = Instant::now();
    let (store, listings) = crate::ops::listings(env)?;
    let failed = crate::ops::failed_checks(Some(&run.catalog), &listings);
    let listing = crate::ops::select_for_restore(&listings, which, &failed)?;
    if skip_damaged && !listing.snapshot {
        return Err(Error::Usage(format!(
            "--skip-damaged needs a snapshot; {} is an archive, one encrypted stream that cannot be read past its damage",
            listing.name
        )));
    }
    prepare_empty_dir(dir)?;
    let stage = dir.join(format!("{STAGE_PREFIX}{}", run.id));
    let plan = ExtractPlan { skip_damaged, ..ExtractPlan::into_dir(&stage) };
    let read = |plan: &ExtractPlan| read_into(env, &store, listing, plan);
    // The database is checked in the staging folder, while the uploads are written (a WAL
    // database's -wal and -shm are gone once its checks close it, before anything moves).
    // No manifest (or a damaged one): the read says what is wrong.
    let read = settle_as_written(plan, AfterWrite::WriteOut, |plan| {
        match listing.manifest.as_ref().and_then(|m| m.database.as_ref()) {
            Some(db) => entry_path(&listing.name, &db.entry)
                .and_then(|entry| read_and_check(plan, &stage.join(entry), &[], read)),
            None => read(&plan).map(|r| (r, Vec::new())),
        }
    });
    let (report, checks) = match read {
        Ok(r) => r,
        Err(e) => {
            remove_tree(&stage);
            return Err(e);
        }
    };
    // Verified: move the content up into the folder.
    let mut destination = Vec::new();
    for e in std::fs::read_dir(&stage).map_err(|e| Error::io("cannot read the staging folder", e))?.flatten()
    {
        let to = dir.join(e.file_name());
        std::fs::rename(e.path(), &to)
            .map_err(|e| Error::io(format!("cannot move into {}", to.display()), e))?;
        destination.push(to);
    }
    remove_tree(&stage);
    fsync_dir(dir)?;
    if let Some((first, why)) = report.damaged_files.first() {
        let n = report.damaged_files.len();
        return Err(Error::integrity(
            &listing.name,
            format!(
                "{n} file(s) could not be restored (damaged on the drive, no other copy), first {first}: {why}; every other file is restored in {}. The log above names each one left out; an older backup may hold them (`datavault list`)",
                dir.display()
            ),
        ));
    }
    if let Some(bad) = checks.iter().find(|c| !c.ok) {
        return Err(Error::integrity(
            &listing.name,
            format!(
                "restored into {}, but the database fails {}: {}; the files are there for inspection; try an older archive",
                dir.display(),
                bad.name,
                bad.detail
            ),
        ));
    }
    Ok(RestoreOutcome {
        archive: listing.name.clone(),
        in_place: false,
        destination,
        pre_restore_archive: None,
        safety_copy_skipped: false,
        from: store.location(),
        files: report.files,
        bytes: report.plain_bytes,
        checks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The folder `restore --to` fills: new (created private, 0700: the restored data is as
/// secret as the app's), or empty and ours alone. A folder another user owns or may write in
/// is refused: they could rename what root puts there while it is being written.
fn prepare_empty_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::Usage(format!("cannot create {}: {e}", dir.display())));
        }
        Err(e) => return Err(Error::Usage(format!("cannot use {}: {e}", dir.display()))),
        // A link is not followed (it could be moved while root writes below it): said as
        // such, with the folder it names, rather than "not a folder" (red team 2026-12-07).
        Ok(m) if m.file_type().is_symlink() => {
            let to = std::fs::read_link(dir).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into());
            return Err(Error::Usage(format!(
                "{} is a symbolic link (to {to}), which restore --to does not follow; give the folder itself or a new path",
                dir.display()
            )));
        }
        Ok(m) if !m.is_dir() => {
            return Err(Error::Usage(format!(
                "{} is not a folder; restore --to needs an empty or new folder",
                dir.display()
            )))
        }
        Ok(m) => {
            let me = rustix::process::geteuid().as_raw();
            if m.uid() != me || m.mode() & 0o022 != 0 {
                return Err(Error::Usage(format!(
                    "{} belongs to another user or others may write in it; restore --to a new folder (datavault creates it private)",
                    dir.display()
                )));
            }
        }
    }
    match std::fs::read_dir(dir).map(|mut rd| rd.next().is_none()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::Usage(format!(
            "{} is not empty; restore --to needs an empty or new folder",
            dir.display()
        ))),
        Err(e) => Err(Error::Usage(format!("cannot use {}: {e}", dir.display()))),
    }
}

/// The archive's database entry as a path (entries are stored escaped).
fn entry_path(archive: &str, entry: &str) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let raw = unescape_path(entry).map_err(|e| Error::integrity(archive, format!("manifest: {e}")))?;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&raw)))
}

fn read_into(env: &Env, store: &Store, listing: &Listing, plan: &ExtractPlan) -> Result<ReadReport> {
    let identities =
        std::sync::Arc::new(crate::keys::load_identities(env.settings.encryption.identity.as_deref())?);
    let identity_path = env.settings.encryption.identity.clone().unwrap_or_default();
    read_archive(store, listing, &identities, &identity_path, Some(plan), &*env.progress)
}

/// Whether an in-place restore saves the live data first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SafetyCopy {
    /// The PRE-RESTORE archive, on the drive (the default, and the only choice from the drive).
    Required,
    /// `restore --offsite --no-safety-copy`: the drive is gone and the operator said the live
    /// data may be replaced without a copy.
    Skip,
}

impl SafetyCopy {
    /// Why an in-place restore saved nothing first.
    fn none_because(self) -> &'static str {
        match self {
            SafetyCopy::Skip => "none (--no-safety-copy)",
            SafetyCopy::Required => "none (no live data)",
        }
    }
}

/// In place: the disaster case. `which` is the archive the operator confirmed (see [`choose`]).
///
/// From the offsite copy (`env.offsite`) it is the same journaled restore; the safety copy
/// still goes to the drive. Without a drive it is taken only if there is no live data at
/// all (a new Pi); otherwise the restore is refused up front, nothing stopped or changed,
/// unless `safety` is [`SafetyCopy::Skip`].
pub fn in_place(env: &Env, which: Option<&str>, safety: SafetyCopy) -> Result<RestoreOutcome> {
    let run = Run::start(env, "restore", Trigger::Manual, true)?;
    let result = in_place_in_run(&run, which, safety);
    run.end(&result, RunStatus::Success, result.as_ref().ok().map(|o| o.archive.as_str()));
    result
}

fn in_place_in_run(run: &Run, which: Option<&str>, safety: SafetyCopy) -> Result<RestoreOutcome> {
    let env = run.env;
    let s = &env.settings;
    let started = Instant::now();
    safety_copy_possible(env, safety)?;
    let (store, listings) = crate::ops::listings(env)?;
    let store = if store.is_remote() {
        store
    } else {
        store.with_dedup_cache(crate::ops::backup::dedup_cache_path(s))
    };
    crate::ops::sync_catalog_if_local(env, &run.catalog, &listings);
    let (listing, manifest) = restorable_in_place(s, &listings, which)?;
    let name = listing.name.clone();
    let plan = RestorePlan::new(s, &name, &plan::new_tag(run.id), manifest.uploads.is_some())?;
    plan.preflight(&env.system_root, s)?;

    let staged = Staged::create(&plan)?;
    let (report, checks) = stage_and_verify(env, &store, listing, &manifest, &plan)?;

    let journal_path = s.state.restore_journal_path();
    let mut journal = plan.journal();
    journal.enter(Phase::Stopping, &journal_path)?;
    for a in &journal.asides {
        // Listed in the journal first, so a cut from here on is cleaned up by the next run.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(a)
            .map_err(|e| Error::io(format!("cannot create {}", a.display()), e))?;
    }
    let pre_name = match stop_and_save(run, &name, safety) {
        Ok(p) => p,
        Err(e) => {
            finish(&journal_path, &journal, Ending::NothingMoved, &[]);
            return Err(e);
        }
    };

    journal.moves = plan.moves(plan.uploads.as_ref().map(|u| u.stage.join(crate::archive::TOP_UPLOADS)));
    journal.enter(Phase::Swapping, &journal_path)?;
    log::info!("swapping in the restored data");
    let mut dirs = Dirs::open(&journal, &staged.held()).map_err(|e| {
        finish(&journal_path, &journal, Ending::NothingMoved, &[]);
        let _ = restart(run);
        Error::Restore(format!("cannot open the folders of the swap ({e}); nothing was changed"))
    })?;
    if let Err(e) = swap::swap(&journal, &dirs) {
        log::error!("swap failed ({e}); putting the previous data back");
        // The app is stopped and never saw the restored data: nothing of it to keep.
        let what = format!("restore failed while swapping ({e})");
        return Err(undo(run, &mut journal, &journal_path, &mut dirs, Undo::Discard, &what));
    }
    journal.enter(Phase::Swapped, &journal_path)?;
    start_or_undo(run, &mut journal, &journal_path, &mut dirs)?;
    drop(staged);
    let detail = format!(
        "restored {} files, {} bytes; safety copy {}",
        report.files,
        report.plain_bytes,
        pre_name.as_deref().unwrap_or(safety.none_because())
    );
    let _ = run.catalog.record_event(Some(run.id), now(), Event::SystemRestored, Some(&name), &detail);
    Ok(RestoreOutcome {
        archive: name,
        in_place: true,
        destination: std::iter::once(plan.database.live.clone())
            .chain(plan.uploads.map(|u| u.live))
            .collect(),
        pre_restore_archive: pre_name,
        safety_copy_skipped: safety == SafetyCopy::Skip,
        from: store.location(),
        files: report.files,
        bytes: report.plain_bytes,
        checks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The archive to put in place of the live data: complete, and holding a database.
fn restorable_in_place<'a>(
    s: &crate::config::Settings,
    listings: &'a [crate::store::Listing],
    which: Option<&str>,
) -> Result<(&'a crate::store::Listing, crate::manifest::Manifest)> {
    let listing = crate::ops::select(listings, which, crate::ops::Pick::NewestComplete)?;
    let name = &listing.name;
    let manifest = listing.manifest.clone().ok_or_else(|| Error::integrity(name, "has no manifest"))?;
    if manifest.database.is_none() {
        return Err(Error::Usage(format!(
            "{name} holds no database snapshot (a raw safety copy); restore it with --to DIR and copy the files by hand"
        )));
    }
    if manifest.uploads.is_some() && s.source.uploads.is_none() {
        log::warn!("{name} holds uploads but source.uploads is not configured: they are not restored");
    }
    Ok((listing, manifest))
}

/// Step 2: extract into the staging folders and prove it all before anything live moves.
fn stage_and_verify(
    env: &Env,
    store: &Store,
    listing: &Listing,
    manifest: &Manifest,
    plan: &RestorePlan,
) -> Result<(ReadReport, Vec<Check>)> {
    let name = &listing.name;
    let mut routes = vec![(crate::archive::TOP_DB.to_string(), plan.database.stage.clone())];
    match &plan.uploads {
        Some(u) => routes.push((crate::archive::TOP_UPLOADS.to_string(), u.stage.clone())),
        // Verified all the same, into a folder deleted with the staging.
        None if manifest.uploads.is_some() => {
            routes.push((crate::archive::TOP_UPLOADS.to_string(), plan.database.stage.join("ignored")))
        }
        None => {}
    }
    // The restored data gets the owner the live data has now (a new Pi's app user may have
    // another uid than the old one's).
    let mut live_owners = Vec::new();
    for (top, live) in [
        (crate::archive::TOP_DB, Some(&plan.database.live)),
        (crate::archive::TOP_UPLOADS, plan.uploads.as_ref().map(|u| &u.live)),
    ] {
        if let Some(m) = live.and_then(|l| std::fs::symlink_metadata(l).ok()) {
            use std::os::unix::fs::MetadataExt;
            live_owners.push(LiveOwner { top, uid: m.uid(), gid: m.gid() });
        }
    }
    let extract = ExtractPlan {
        routes,
        set_owner: rustix::process::geteuid().is_root(),
        live_owners,
        durable: true,
        room_hint: "free space beside the app's data (the restore is staged there before the swap)",
        database_written: None,
        settle: None,
        // In place, the data is put back whole or not at all.
        skip_damaged: false,
    };
    log::info!("verifying and staging {name}");
    let db = manifest.database.as_ref().expect("checked by the caller");
    let staged_db = plan.database.stage.join(entry_path(name, &db.entry)?);
    let (report, checks) = settle_as_written(extract, AfterWrite::WriteOut, |extract| {
        read_and_check(extract, &staged_db, &env.settings.drill.checks, |extract| {
            read_into(env, store, listing, extract)
        })
    })?;
    if let Some(bad) = checks.iter().find(|c| !c.ok) {
        return Err(Error::integrity(
            name,
            format!("the restored database fails {}: {}; live data was not touched", bad.name, bad.detail),
        ));
    }
    if let Some(u) = &plan.uploads {
        let staged = u.stage.join(crate::archive::TOP_UPLOADS);
        if !std::fs::symlink_metadata(&staged).map(|m| m.is_dir()).unwrap_or(false) {
            return Err(Error::integrity(name, "its uploads are not a folder; live data was not touched"));
        }
    }
    // A WAL-mode copy we opened for the checks may have grown -wal/-shm: fold them in.
    checkpoint_and_close(&staged_db)?;
    std::fs::rename(&staged_db, plan.database.stage.join(STAGED_DB))
        .map_err(|e| Error::io("cannot prepare the staged database", e))?;
    Ok((report, checks))
}

/// From the offsite copy, the safety copy still goes to the drive: checked before anything
/// is downloaded or stopped. Without the drive, only a Pi with no live data, or the
/// operator's `--no-safety-copy`, goes on.
fn safety_copy_possible(env: &Env, safety: SafetyCopy) -> Result<()> {
    let s = &env.settings;
    if safety == SafetyCopy::Skip && !env.offsite {
        return Err(Error::Usage(
            "--no-safety-copy is only for a restore --offsite without the drive".into(),
        ));
    }
    if env.offsite && safety == SafetyCopy::Required && has_live_data(s) {
        crate::target::require_writable(&s.target, &env.system_root, 0).map_err(|e| {
            e.note("the live data must be saved on the drive before it is replaced: plug the drive in, or restore with --to DIR, or pass --no-safety-copy to replace the live data without a copy")
        })?;
    }
    Ok(())
}

/// Is there anything live a safety copy would save (see `Sources::plan`)?
fn has_live_data(s: &crate::config::Settings) -> bool {
    s.source.database.exists() || s.source.uploads.as_ref().is_some_and(|u| u.exists())
}

/// Step 3: stop the app, then save what is live now. On failure the app is started again.
fn stop_and_save(run: &Run, name: &str, safety: SafetyCopy) -> Result<Option<String>> {
    let s = &run.env.settings;
    if let Some(svc) = &s.service {
        if let Err(e) = service::run(svc, Which::Stop) {
            // A stop that failed or hung may have half-stopped the app: bring it back.
            let _ = restart(run);
            return Err(Error::Restore(format!("{e}; nothing was changed")));
        }
    }
    // An app still holding its database would go on writing to the old file once it is
    // renamed aside: every write lost, silently.
    let db = &s.source.database;
    let users = run.env.system_root.processes_using(&[db.clone(), crate::fsutil::with_suffix(db, "-wal")]);
    if !users.is_empty() {
        let _ = restart(run);
        let why = match &s.service {
            Some(_) => "the stop command ran, but the app still has it open: fix the stop command",
            None => "stop the app first, or configure [service] so that datavault stops and starts it",
        };
        return Err(Error::Restore(format!(
            "{} is open by {}: {why}; nothing was changed",
            db.display(),
            users.join(", ")
        )));
    }
    crash_point("restore: app stopped");
    if safety == SafetyCopy::Skip {
        log::warn!("--no-safety-copy: the live data is replaced without a PRE-RESTORE copy");
        return Ok(None);
    }
    log::info!("taking a PRE-RESTORE safety backup of the current data");
    let opts = BackupOptions {
        kind: ArchiveKind::PreRestore,
        trigger: Trigger::Restore,
        comment: Some(format!("before restoring {name}")),
    };
    let pre = create_archive(run, &opts).map_err(|e| {
        let _ = restart(run);
        // The message says what went wrong and its fix (room on the drive, the mount, the
        // live data): "make room" was said whatever the cause (red team 2026-12-07).
        e.note("the PRE-RESTORE safety backup could not be written, so nothing was changed; fix that and run the restore again, or restore with --to DIR and copy the files back")
    })?;
    crash_point("restore: safety copy written");
    let pre_name = pre.map(|p| p.manifest.archive);
    if pre_name.is_none() {
        log::warn!("no live data found: nothing to save before restoring");
    }
    Ok(pre_name)
}

/// The swap is done: start the app on the restored data and finish, or, if it will not
/// start, put the previous data back.
fn start_or_undo(run: &Run, journal: &mut Journal, journal_path: &Path, dirs: &mut Dirs) -> Result<()> {
    if let Some(svc) = &run.env.settings.service {
        if let Err(e) = service::run(svc, Which::Start) {
            log::error!("{e}; putting the previous data back");
            // The app ran on the restored data: what it wrote is kept, not deleted.
            return Err(undo(
                run,
                journal,
                journal_path,
                dirs,
                Undo::Keep,
                &format!("{e} after the restore"),
            ));
        }
        crash_point("restore: app started");
    }
    finish(journal_path, journal, Ending::Restored, &[]);
    Ok(())
}

/// Put the previous data back after a failed swap or start; returns the error to report.
fn undo(
    run: &Run,
    journal: &mut Journal,
    journal_path: &Path,
    dirs: &mut Dirs,
    mode: Undo,
    what_failed: &str,
) -> Error {
    if let Err(e) = journal.enter(Phase::RollingBack, journal_path) {
        // Without a durable journal a cut now could not be repaired: stop here, change nothing.
        return Error::Restore(format!(
            "{what_failed}; and the restore journal cannot be written ({e}): the restored data is live, the previous data is in {}",
            list(&journal.asides)
        ));
    }
    if let Some(svc) = &run.env.settings.service {
        if let Err(e) = service::run(svc, Which::Stop) {
            log::warn!("{e}");
        }
    }
    let (problems, kept) = swap::rollback(journal, dirs, mode);
    let ending = if problems.is_empty() { Ending::RolledBack } else { Ending::RollbackIncomplete };
    finish(journal_path, journal, ending, &kept);
    let _ = run.catalog.record_event(
        Some(run.id),
        now(),
        Event::RestoreRolledBack,
        Some(&journal.archive),
        "restore undone",
    );
    if !problems.is_empty() {
        return Error::Restore(format!(
            "{what_failed}; putting the previous data back failed ({}): it is in {}; put it back by hand",
            problems.join("; "),
            list(&journal.asides)
        ));
    }
    let kept_note = if kept.is_empty() {
        String::new()
    } else {
        format!("; the restored data, as the app left it, is kept in {}", list(&kept))
    };
    match restart(run) {
        Ok(()) => Error::Restore(format!(
            "{what_failed}; the previous data was put back and the application started again{kept_note}"
        )),
        Err(e) => Error::Restore(format!(
            "{what_failed}; the previous data was put back, but the application did not start again ({e}): start it by hand{kept_note}"
        )),
    }
}

fn list(paths: &[PathBuf]) -> String {
    paths.iter().map(|a| a.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Run the start command, if there is one.
fn restart(run: &Run) -> std::result::Result<(), String> {
    match &run.env.settings.service {
        Some(svc) => {
            service::run(svc, Which::Start).inspect_err(|e| log::error!("{e}: start the application by hand"))
        }
        None => Ok(()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Stopped before any rename: staging goes, the (empty) aside folders go.
    NothingMoved,
    /// The restored data is live; the replaced data is in the safety archive: everything goes.
    Restored,
    /// The previous data is back: staging (with the undone restored data) goes, and the aside
    /// folders, now empty.
    RolledBack,
    /// Something could not be put back: the aside folders stay, with it.
    RollbackIncomplete,
}

/// The restore is over, one way or the other: clean up, then remove the journal. `kept`:
/// folders a rollback kept data in; never removed, the owner is told.
fn finish(journal_path: &Path, j: &Journal, ending: Ending, kept: &[PathBuf]) {
    for d in &j.stages {
        remove_tree(d);
    }
    for d in &j.asides {
        match ending {
            Ending::Restored => remove_tree(d),
            Ending::RollbackIncomplete => {
                log::warn!("{} holds data that could not be put back; check it by hand", d.display())
            }
            // Never remove_tree here: if anything is still inside, it is the previous data.
            Ending::NothingMoved | Ending::RolledBack => {
                if let Err(e) = std::fs::remove_dir(d) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        log::warn!("{} is not empty ({e}); check it and delete it by hand", d.display());
                    }
                }
            }
        }
    }
    for k in kept {
        log::warn!(
            "{} keeps what was live when the restore was undone (the restored data as the app left it): check it, and delete it when you no longer need it",
            k.display()
        );
    }
    for d in j.stages.iter().chain(&j.asides) {
        if let Some(p) = d.parent() {
            let _ = fsync_dir(p);
        }
    }
    if ending != Ending::RollbackIncomplete {
        let _ = std::fs::remove_file(journal_path);
        if let Some(p) = journal_path.parent() {
            let _ = fsync_dir(p);
        }
    }
    crash_point("restore: finished");
}

/// Called at the start of every locked run: finish or undo a restore that was cut off.
pub fn recover_interrupted(run: &Run) -> Result<()> {
    let s = &run.env.settings;
    let path = s.state.restore_journal_path();
    let Some(mut journal) = Journal::load(&path, s)? else {
        remove_stale_stages(run);
        return Ok(());
    };
    // The first run after a power cut is usually a sandboxed unit (the boot drill), which may
    // see the app's folders read-only. Half a repair, journal then removed, would leave a mix
    // of old and restored data for good (seen on the Pi VM, #13): check first, change nothing.
    if let Some(dir) = unwritable_folder(&journal) {
        return Err(Error::Restore(format!(
            "an interrupted restore of {} must be finished, but {} is read-only for this run (a datavault unit \
             without it in ReadWritePaths=, see datavault-paths.conf); nothing was changed: run `sudo datavault drill` \
             from a shell to finish it",
            journal.archive,
            dir.display()
        )));
    }
    // The app's own unit may have started at boot on the half-swapped data: stop it before
    // moving files under it (it is started again at the end).
    if journal.phase != Phase::Stopping {
        if let Some(svc) = &s.service {
            if let Err(e) = service::run(svc, Which::Stop) {
                log::warn!("{e}; repairing the interrupted restore anyway");
            }
        }
    }
    // After a power cut the machine may have rebooted and the app come up on whatever was
    // live: what a rollback moves out of the way is kept, never deleted.
    let mut dirs = Dirs::open(&journal, &[]).map_err(|e| {
        Error::Restore(format!(
            "an interrupted restore of {} cannot be repaired: its folders cannot be opened ({e}); the previous data is in {}",
            journal.archive,
            list(&journal.asides)
        ))
    })?;
    let (ending, kept) = match journal.phase {
        Phase::Stopping => {
            log::warn!(
                "a restore of {} was interrupted before it changed anything: cleaning up",
                journal.archive
            );
            (Ending::NothingMoved, Vec::new())
        }
        Phase::Swapping | Phase::RollingBack => roll_back_interrupted(run, &mut journal, &path, &mut dirs)?,
        Phase::Swapped => {
            // The restored data is live; whether the app started on it is not known: start
            // it, and if it will not start, undo the restore as the interrupted run would have.
            log::warn!("an interrupted restore of {} was found: finishing it", journal.archive);
            return start_or_undo(run, &mut journal, &path, &mut dirs).or_else(|e| {
                log::error!("{e}");
                Ok(())
            });
        }
    };
    finish(&path, &journal, ending, &kept);
    if ending == Ending::RollbackIncomplete {
        return Err(Error::Restore(format!(
            "an interrupted restore of {} could not be fully undone; the previous data is in {}: put it back by hand, then delete {}",
            journal.archive,
            list(&journal.asides),
            path.display()
        )));
    }
    // The application was stopped by the interrupted restore.
    let _ = restart(run);
    Ok(())
}

/// The previous data put back after a restore cut off mid-swap (or mid-rollback): the
/// rollback phase is durable before the first rename, and what the rollback moves out of
/// the way is kept.
fn roll_back_interrupted(
    run: &Run,
    journal: &mut Journal,
    path: &Path,
    dirs: &mut Dirs,
) -> Result<(Ending, Vec<PathBuf>)> {
    log::warn!("an interrupted restore of {} was found: putting the previous data back", journal.archive);
    if journal.phase == Phase::Swapping {
        journal.enter(Phase::RollingBack, path)?;
    }
    let (problems, kept) = swap::rollback(journal, dirs, Undo::Keep);
    let _ = run.catalog.record_event(
        Some(run.id),
        now(),
        Event::RestoreRolledBack,
        Some(&journal.archive),
        "interrupted restore rolled back at the next run",
    );
    Ok((if problems.is_empty() { Ending::RolledBack } else { Ending::RollbackIncomplete }, kept))
}

/// A folder the repair of `j` would rename or delete in that this process cannot write.
fn unwritable_folder(j: &Journal) -> Option<PathBuf> {
    let mut dirs: Vec<&Path> = j.moves.iter().filter_map(|m| m.live.parent()).collect();
    dirs.extend(j.stages.iter().chain(&j.asides).filter_map(|d| d.parent()));
    dirs.into_iter()
        .find(|d| d.exists() && rustix::fs::access(*d, rustix::fs::Access::WRITE_OK).is_err())
        .map(Path::to_path_buf)
}

/// Staging folders of a restore killed before its journal was written: plaintext, never
/// live data. Only our own names, never through a link (see [`remove_tree`]).
fn remove_stale_stages(run: &Run) {
    let src = &run.env.settings.source;
    let parents =
        std::iter::once(src.database.parent()).chain(src.uploads.as_deref().map(|u| u.parent())).flatten();
    for parent in parents {
        let Ok(rd) = std::fs::read_dir(parent) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(STAGE_PREFIX) {
                log::info!("removing {}, left by an interrupted restore", e.path().display());
                remove_tree(&e.path());
            } else if name.starts_with(plan::ASIDE_PREFIX) || name.starts_with(plan::KEPT_PREFIX) {
                log::warn!(
                    "{} holds data set aside by an earlier restore; check it and delete it by hand",
                    e.path().display()
                );
            }
        }
    }
}

/// Fold a staged WAL database's -wal into the main file, so the file we rename in is whole.
fn checkpoint_and_close(db: &Path) -> Result<()> {
    let conn =
        rusqlite::Connection::open(db).map_err(|e| Error::sqlite("cannot open the staged database", e))?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(|e| Error::sqlite("cannot checkpoint the staged database", e))?;
    drop(conn);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(crate::fsutil::with_suffix(db, suffix));
    }
    Ok(())
}

/// The staging folders, created private and held open (the swap takes the restored data
/// from these very folders, whatever is put in their place meanwhile); removed however the
/// restore ends (plaintext).
struct Staged(Vec<(PathBuf, std::os::fd::OwnedFd)>);

impl Staged {
    fn create(plan: &RestorePlan) -> Result<Staged> {
        let mut staged = Staged(Vec::new());
        for st in plan.stages() {
            if let Some(parent) = st.parent().filter(|p| !p.is_dir()) {
                // A fresh Pi: the app's folders may not exist yet.
                std::fs::create_dir_all(parent).map_err(|e| {
                    Error::source(parent, format!("cannot create the folder to restore into: {e}"))
                })?;
            }
            let made = rustix::fs::mkdir(&st, rustix::fs::Mode::from_raw_mode(0o700))
                .and_then(|_| rustix::fs::open(&st, crate::tree::DIR, rustix::fs::Mode::empty()));
            let fd = made
                .map_err(|e| Error::io(format!("cannot create staging folder {}", st.display()), e.into()))?;
            staged.0.push((st, fd));
        }
        Ok(staged)
    }

    fn held(&self) -> Vec<(PathBuf, std::os::fd::OwnedFd)> {
        self.0.iter().filter_map(|(p, fd)| fd.try_clone().ok().map(|fd| (p.clone(), fd))).collect()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (d, _) in &self.0 {
            remove_tree(d);
        }
    }
}
