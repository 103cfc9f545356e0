//! `datavault restore`: put an archive's data back.
//!
//! `--to DIR` extracts into an empty folder and touches nothing else. In place (the disaster
//! case) the order is what keeps data safe:
//!
//! 1. extract into staging folders beside the live paths (same filesystem, so the swap is a
//!    rename) and verify everything: archive checksum, every file hash, `integrity_check`,
//!    the drill's SQL checks. A bad archive stops here; live data was not touched.
//! 2. take a PRE-RESTORE safety archive of the current state onto the target;
//! 3. run the stop command;
//! 4. swap: move the live database (and its stale -wal/-shm) and uploads aside, rename the
//!    staged ones in. Each step is recorded first in a journal in the state folder;
//! 5. run the start command; if it fails, put the previous state back and start again.
//!
//! If power is cut during step 4, the next datavault run finds the journal and rolls the swap
//! back, so the live data is always exactly the old state or exactly the restored one.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::archive::read::{read_archive, remove_staging, ExtractPlan};
use crate::catalog::{Event, RunStatus};
use crate::error::{Error, Result};
use crate::fsutil::{fsync_dir, write_atomic};
use crate::manifest::ArchiveKind;
use crate::ops::backup::{create_archive, BackupOptions};
use crate::ops::drill::{check_database, Check};
use crate::ops::{now, Env, Run};

const STAGE_PREFIX: &str = ".datavault-restore-";
const ASIDE_PREFIX: &str = ".datavault-old-";

#[derive(Debug, Clone, Serialize)]
pub struct RestoreOutcome {
    pub archive: String,
    pub in_place: bool,
    pub destination: Vec<PathBuf>,
    pub pre_restore_archive: Option<String>,
    pub files: u64,
    pub bytes: u64,
    pub checks: Vec<Check>,
    pub seconds: f64,
}

/// `restore --to DIR`: into an empty folder; needs no lock, changes nothing else.
pub fn to_dir(env: &Env, which: Option<&str>, dir: &Path) -> Result<RestoreOutcome> {
    let run = Run::start(env, "restore", "manual", false)?;
    let result = to_dir_in_run(&run, which, dir);
    run.end(&result, RunStatus::Success, result.as_ref().ok().map(|o| o.archive.as_str()));
    result
}

fn to_dir_in_run(run: &Run, which: Option<&str>, dir: &Path) -> Result<RestoreOutcome> {
    let env = run.env;
    let started = Instant::now();
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(Error::Usage(format!(
                    "{} is not empty; restore --to needs an empty or new folder",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dir)
            .map_err(|e| Error::Usage(format!("cannot create {}: {e}", dir.display())))?,
        Err(e) => return Err(Error::Usage(format!("cannot use {}: {e}", dir.display()))),
    }
    let listings = crate::ops::listings(env)?;
    let listing = crate::ops::select(&listings, which, crate::ops::Pick::NewestComplete)?;
    let identities = crate::keys::load_identities(env.settings.encryption.identity.as_deref())?;
    let identity_path = env.settings.encryption.identity.clone().unwrap_or_default();
    let stage = dir.join(format!("{STAGE_PREFIX}{}", run.id));
    let report = read_archive(
        listing,
        &identities,
        &identity_path,
        Some(&ExtractPlan::into_dir(&stage)),
        &*env.progress,
    );
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            remove_staging(&stage);
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
    remove_staging(&stage);
    fsync_dir(dir)?;
    let manifest = listing.manifest.as_ref().expect("complete");
    let checks = match &manifest.database {
        Some(db) => check_database(&dir.join(&db.entry), &[]),
        None => Vec::new(),
    };
    Ok(RestoreOutcome {
        archive: listing.name.clone(),
        in_place: false,
        destination,
        pre_restore_archive: None,
        files: report.files,
        bytes: report.plain_bytes,
        checks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One rename of the swap. `staged` is None for files that are only moved aside (-wal, -shm).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Move {
    live: PathBuf,
    aside: PathBuf,
    staged: Option<PathBuf>,
    had_live: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    Swapping,
    Swapped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    archive: String,
    phase: Phase,
    moves: Vec<Move>,
    stages: Vec<PathBuf>,
    asides: Vec<PathBuf>,
}

/// In place: the disaster case. The caller has confirmed with the operator.
pub fn in_place(env: &Env, which: Option<&str>) -> Result<RestoreOutcome> {
    let run = Run::start(env, "restore", "manual", true)?;
    let result = in_place_in_run(&run, which);
    run.end(&result, RunStatus::Success, result.as_ref().ok().map(|o| o.archive.as_str()));
    result
}

fn in_place_in_run(run: &Run, which: Option<&str>) -> Result<RestoreOutcome> {
    let env = run.env;
    let s = &env.settings;
    let started = Instant::now();
    let listings = crate::ops::listings(env)?;
    crate::ops::sync_catalog(&run.catalog, &listings);
    let listing = crate::ops::select(&listings, which, crate::ops::Pick::NewestComplete)?;
    let name = listing.name.clone();
    let manifest = listing.manifest.clone().ok_or_else(|| Error::integrity(&name, "has no manifest"))?;
    let Some(db_info) = &manifest.database else {
        return Err(Error::Usage(format!(
            "{name} holds no database snapshot (a raw safety copy); restore it with --to DIR and copy the files by hand"
        )));
    };
    let identities = crate::keys::load_identities(s.encryption.identity.as_deref())?;
    let identity_path = s.encryption.identity.clone().unwrap_or_default();

    let db_live = s.source.database.clone();
    let db_parent = parent_of(&db_live)?;
    let uploads_live = s.source.uploads.clone().filter(|_| manifest.uploads.is_some());
    let uploads_parent = uploads_live.as_deref().map(parent_of).transpose()?;
    let tag = format!("{}", run.id);
    let db_stage = db_parent.join(format!("{STAGE_PREFIX}{tag}"));
    let uploads_stage = uploads_parent.as_ref().map(|p| p.join(format!("{STAGE_PREFIX}{tag}")));
    let mut stages = vec![db_stage.clone()];
    if let Some(u) = &uploads_stage {
        if u != &db_stage {
            stages.push(u.clone());
        }
    }
    let cleanup = StageCleanup(stages.clone());

    // 1. Extract and verify everything before touching anything live.
    let mut routes = vec![(crate::archive::TOP_DB.to_string(), db_stage.clone())];
    if let Some(u) = &uploads_stage {
        routes.push((crate::archive::TOP_UPLOADS.to_string(), u.clone()));
    } else if manifest.uploads.is_some() {
        log::warn!("{name} holds uploads but source.uploads is not configured: they are not restored");
        routes.push((crate::archive::TOP_UPLOADS.to_string(), db_stage.join("ignored")));
    }
    let plan = ExtractPlan { routes, set_owner: rustix::process::geteuid().is_root(), durable: true };
    for st in &stages {
        std::fs::create_dir(st)
            .map_err(|e| Error::io(format!("cannot create staging folder {}", st.display()), e))?;
    }
    log::info!("verifying and staging {name}");
    let report = read_archive(listing, &identities, &identity_path, Some(&plan), &*env.progress)?;
    let staged_db = db_stage.join(&db_info.entry);
    let checks = check_database(&staged_db, &s.drill.checks);
    if let Some(bad) = checks.iter().find(|c| !c.ok) {
        return Err(Error::integrity(
            &name,
            format!("the restored database fails {}: {}; live data was not touched", bad.name, bad.detail),
        ));
    }
    let staged_db_final = db_stage.join("restored.db");
    // A WAL-mode copy we opened for the checks may have grown -wal/-shm: fold them in.
    checkpoint_and_close(&staged_db)?;
    std::fs::rename(&staged_db, &staged_db_final)
        .map_err(|e| Error::io("cannot prepare the staged database", e))?;

    // 2. Safety copy of what is live now.
    log::info!("taking a PRE-RESTORE safety backup of the current data");
    let opts = BackupOptions {
        kind: ArchiveKind::PreRestore,
        trigger: "restore".into(),
        comment: Some(format!("before restoring {name}")),
    };
    let pre = create_archive(run, &opts, true).map_err(|e| match e {
        Error::TargetNotReady { path, message } => Error::TargetNotReady {
            path,
            message: format!(
                "{message} (the PRE-RESTORE safety backup could not be written; nothing was changed)"
            ),
        },
        Error::Source { path, message } => Error::Source {
            path,
            message: format!("{message} (during the PRE-RESTORE safety backup; nothing was changed)"),
        },
        other => Error::Failed(format!("the PRE-RESTORE safety backup failed, nothing was changed: {other}")),
    })?;
    let pre_name = pre.as_ref().map(|p| p.manifest.archive.clone());
    if pre_name.is_none() {
        log::warn!("no live data found: nothing to save before restoring");
    }

    // 3. Stop the application. The journal is written first, with no moves yet: a run cut
    // off from here on is repaired by the next run, which removes the staging and aside
    // folders and starts the application again (tests/faults.rs found both left behind).
    let db_aside = db_parent.join(format!("{ASIDE_PREFIX}{tag}"));
    let uploads_aside = uploads_parent.as_ref().map(|p| p.join(format!("{ASIDE_PREFIX}{tag}")));
    let mut asides = vec![db_aside.clone()];
    if let Some(u) = &uploads_aside {
        if u != &db_aside {
            asides.push(u.clone());
        }
    }
    let mut journal = Journal {
        archive: name.clone(),
        phase: Phase::Swapping,
        moves: Vec::new(),
        stages: stages.clone(),
        asides,
    };
    let journal_path = s.state.restore_journal_path();
    save_journal(&journal_path, &journal)?;
    for a in &journal.asides {
        std::fs::create_dir_all(a).map_err(|e| Error::io(format!("cannot create {}", a.display()), e))?;
    }
    if let Some(svc) = &s.service {
        if let Err(e) = run_command("stop", &svc.stop_command) {
            finish_journal(&journal_path, &journal);
            return Err(Error::Failed(format!("{e}; nothing was changed")));
        }
    }

    // 4. Swap, journaled. What exists is looked at only now: a stopped app may have removed
    // its -wal and -shm.
    let mut moves = Vec::new();
    for suffix in ["-wal", "-shm", "-journal"] {
        let live = with_suffix(&db_live, suffix);
        moves.push(Move {
            aside: db_aside.join(live.file_name().unwrap()),
            had_live: exists(&live),
            live,
            staged: None,
        });
    }
    moves.push(Move {
        aside: db_aside.join(db_live.file_name().unwrap()),
        had_live: exists(&db_live),
        live: db_live.clone(),
        staged: Some(staged_db_final.clone()),
    });
    if let (Some(live), Some(stage), Some(aside)) = (&uploads_live, &uploads_stage, &uploads_aside) {
        moves.push(Move {
            aside: aside.join("uploads"),
            had_live: exists(live),
            live: live.clone(),
            staged: Some(stage.join(crate::archive::TOP_UPLOADS)),
        });
    }
    journal.moves = moves;
    save_journal(&journal_path, &journal)?;
    log::info!("swapping in the restored data");
    if let Err(e) = swap(&journal) {
        log::error!("swap failed ({e}); putting the previous data back");
        rollback(&journal);
        finish_journal(&journal_path, &journal);
        start_after_rollback(run, &name);
        return Err(Error::Failed(format!(
            "restore failed while swapping ({e}); the previous data was put back"
        )));
    }
    journal.phase = Phase::Swapped;
    save_journal(&journal_path, &journal)?;

    // 5. Start the application; undo everything if it will not start.
    if let Some(svc) = &s.service {
        if let Err(e) = run_command("start", &svc.start_command) {
            log::error!("{e}; putting the previous data back");
            let _ = run_command("stop", &svc.stop_command);
            journal.phase = Phase::Swapping;
            rollback(&journal);
            finish_journal(&journal_path, &journal);
            start_after_rollback(run, &name);
            return Err(Error::Failed(format!(
                "{e} after the restore; the previous data was put back and the application started again"
            )));
        }
    }
    finish_journal(&journal_path, &journal);
    drop(cleanup);
    let detail = format!(
        "restored {} files, {} bytes; safety copy {}",
        report.files,
        report.plain_bytes,
        pre_name.as_deref().unwrap_or("none (no live data)")
    );
    let _ = run.catalog.record_event(Some(run.id), now(), Event::SystemRestored, Some(&name), &detail);
    Ok(RestoreOutcome {
        archive: name,
        in_place: true,
        destination: std::iter::once(db_live).chain(uploads_live).collect(),
        pre_restore_archive: pre_name,
        files: report.files,
        bytes: report.plain_bytes,
        checks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Called at the start of every locked run: finish or undo a restore that was cut off.
pub fn recover_interrupted(run: &Run) -> Result<()> {
    let path = run.env.settings.state.restore_journal_path();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            remove_stale_stages(run);
            return Ok(());
        }
        Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
    };
    let journal: Journal = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Failed(format!(
            "the restore journal {} is unreadable ({e}); inspect the .datavault-old-* folders beside the live data by hand",
            path.display()
        ))
    })?;
    // The first run after a power cut is usually a sandboxed unit (the boot drill), which may
    // see the app's folders read-only. Half a repair, journal then removed, would leave a mix
    // of old and restored data for good (seen on the Pi VM, #13): check first, change nothing.
    if let Some(dir) = unwritable_folder(&journal) {
        return Err(Error::Failed(format!(
            "an interrupted restore of {} must be finished, but {} is read-only for this run (a datavault \
             unit without it in ReadWritePaths=, see datavault-paths.conf); nothing was changed: run \
             `sudo datavault drill` from a shell to finish it",
            journal.archive,
            dir.display()
        )));
    }
    // The app's own unit may have started at boot on the half-swapped data: stop it before
    // moving files under it (it is started again below).
    if let Some(svc) = &run.env.settings.service {
        if let Err(e) = run_command("stop", &svc.stop_command) {
            log::warn!("{e}; repairing the interrupted restore anyway");
        }
    }
    match journal.phase {
        Phase::Swapping => {
            log::warn!(
                "an interrupted restore of {} was found: putting the previous data back",
                journal.archive
            );
            rollback(&journal);
            let _ = run.catalog.record_event(
                Some(run.id),
                now(),
                Event::RestoreRolledBack,
                Some(&journal.archive),
                "interrupted restore rolled back at the next run",
            );
        }
        Phase::Swapped => log::warn!("an interrupted restore of {} was found: finishing it", journal.archive),
    }
    finish_journal(&path, &journal);
    if let Some(svc) = &run.env.settings.service {
        // The application was stopped by the interrupted restore.
        if let Err(e) = run_command("start", &svc.start_command) {
            log::error!("{e}");
        }
    }
    Ok(())
}

/// A folder the repair of `j` would rename or delete in that this process cannot write.
fn unwritable_folder(j: &Journal) -> Option<PathBuf> {
    let mut dirs: Vec<&Path> = j.moves.iter().filter_map(|m| m.live.parent()).collect();
    dirs.extend(j.stages.iter().chain(&j.asides).filter_map(|d| d.parent()));
    dirs.into_iter()
        .find(|d| d.exists() && rustix::fs::access(*d, rustix::fs::Access::WRITE_OK).is_err())
        .map(Path::to_path_buf)
}

/// Staging folders of a restore killed before its swap began: plaintext, never live data.
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
                remove_staging(&e.path());
            } else if name.starts_with(ASIDE_PREFIX) {
                log::warn!(
                    "{} holds data set aside by an earlier restore; check it and delete it by hand",
                    e.path().display()
                );
            }
        }
    }
}

/// The renames of the swap, in order: each live path aside, then its staged one in.
fn swap_steps(j: &Journal) -> Vec<(&Path, &Path)> {
    let mut steps = Vec::new();
    for m in &j.moves {
        if m.had_live {
            steps.push((m.live.as_path(), m.aside.as_path()));
        }
        if let Some(staged) = &m.staged {
            steps.push((staged.as_path(), m.live.as_path()));
        }
    }
    steps
}

fn swap(j: &Journal) -> std::io::Result<()> {
    for (from, to) in swap_steps(j) {
        std::fs::rename(from, to)?;
    }
    sync_parents(j);
    Ok(())
}

/// Undo whatever part of the swap happened; safe to run on any state the swap can be cut in.
fn rollback(j: &Journal) {
    for m in j.moves.iter().rev() {
        let live_is_new = if exists(&m.aside) {
            true
        } else {
            !m.had_live && exists(&m.live) && m.staged.as_ref().map(|s| !exists(s)).unwrap_or(false)
        };
        if live_is_new && exists(&m.live) {
            let res = match &m.staged {
                Some(s) => std::fs::rename(&m.live, s),
                None => std::fs::remove_file(&m.live),
            };
            if let Err(e) = res {
                log::error!("cannot move {} out of the way: {e}", m.live.display());
                continue;
            }
        }
        if exists(&m.aside) {
            if let Err(e) = std::fs::rename(&m.aside, &m.live) {
                log::error!("cannot put {} back from {}: {e}", m.live.display(), m.aside.display());
            }
        }
    }
    sync_parents(j);
}

/// Remove staging and aside folders, then the journal: the restore is over either way.
fn finish_journal(path: &Path, j: &Journal) {
    for d in j.stages.iter().chain(&j.asides) {
        remove_staging(d);
    }
    sync_parents(j);
    let _ = std::fs::remove_file(path);
    if let Some(p) = path.parent() {
        let _ = fsync_dir(p);
    }
}

fn start_after_rollback(run: &Run, name: &str) {
    let _ =
        run.catalog.record_event(Some(run.id), now(), Event::RestoreRolledBack, Some(name), "restore undone");
    if let Some(svc) = &run.env.settings.service {
        if let Err(e) = run_command("start", &svc.start_command) {
            log::error!("{e}: start the application by hand");
        }
    }
}

fn sync_parents(j: &Journal) {
    for m in &j.moves {
        if let Some(p) = m.live.parent() {
            let _ = fsync_dir(p);
        }
    }
}

fn save_journal(path: &Path, j: &Journal) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| Error::io(format!("cannot create {}", p.display()), e))?;
    }
    write_atomic(path, &serde_json::to_vec_pretty(j).expect("journal serializes"), 0o600)
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn parent_of(p: &Path) -> Result<PathBuf> {
    let parent = p
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| Error::Usage(format!("{} has no parent folder", p.display())))?;
    if !parent.is_dir() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::source(parent, format!("cannot create the folder to restore into: {e}")))?;
    }
    Ok(parent.to_path_buf())
}

/// Fold a staged WAL database's -wal into the main file, so the file we rename in is whole.
fn checkpoint_and_close(db: &Path) -> Result<()> {
    let conn =
        rusqlite::Connection::open(db).map_err(|e| Error::sqlite("cannot open the staged database", e))?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(|e| Error::sqlite("cannot checkpoint the staged database", e))?;
    drop(conn);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(with_suffix(db, suffix));
    }
    Ok(())
}

/// Run a configured service command through `sh -c`, its output going to our stderr so
/// `--json` output on stdout stays clean.
pub fn run_command(what: &str, cmd: &str) -> std::result::Result<(), String> {
    log::info!("running the {what} command: {cmd}");
    let stdout =
        std::io::stderr().as_fd().try_clone_to_owned().map(Stdio::from).unwrap_or_else(|_| Stdio::null());
    match Command::new("sh").arg("-c").arg(cmd).stdin(Stdio::null()).stdout(stdout).status() {
        Ok(st) if st.success() => Ok(()),
        Ok(st) => Err(format!("the {what} command `{cmd}` failed ({st})")),
        Err(e) => Err(format!("the {what} command `{cmd}` could not run: {e}")),
    }
}

/// Removes staging folders however the restore ends (they hold plaintext).
struct StageCleanup(Vec<PathBuf>);

impl Drop for StageCleanup {
    fn drop(&mut self) {
        for d in &self.0 {
            remove_staging(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(root: &Path) -> Vec<(String, String)> {
        let mut v: Vec<_> = walkdir::WalkDir::new(root)
            .sort_by_file_name()
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                (rel, std::fs::read_to_string(e.path()).unwrap())
            })
            .collect();
        v.retain(|(p, _)| !p.starts_with(".datavault-"));
        v
    }

    /// Cut the swap after every possible rename: rollback always gives exactly the old state.
    #[test]
    fn rollback_restores_the_old_state_after_a_cut_at_any_step() {
        for had_wal in [true, false] {
            let steps = {
                let (_d, j) = setup(had_wal);
                swap_steps(&j).len()
            };
            for cut in 0..=steps {
                let (dir, j) = setup(had_wal);
                let before = state(dir.path());
                for (from, to) in swap_steps(&j).into_iter().take(cut) {
                    std::fs::rename(from, to).unwrap();
                }
                rollback(&j);
                assert_eq!(state(dir.path()), before, "cut after {cut} of {steps} renames (wal: {had_wal})");
                // And the complete swap gives exactly the new state.
                swap(&j).unwrap();
                let after = state(dir.path());
                assert!(after.contains(&("data/app.db".into(), "new db".into())), "{after:?}");
                assert!(
                    !after.iter().any(|(p, _)| p == "data/app.db-wal"),
                    "stale WAL moved away: {after:?}"
                );
                assert!(after.contains(&("uploads/b.txt".into(), "new upload".into())), "{after:?}");
            }
        }
    }

    fn setup(had_wal: bool) -> (tempfile::TempDir, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let w = |rel: &str, text: &str| {
            let path = p.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        w("data/app.db", "old db");
        if had_wal {
            w("data/app.db-wal", "old wal");
        }
        w("uploads/a.txt", "old upload");
        w("data/.datavault-restore-1/restored.db", "new db");
        w(".datavault-restore-1/uploads/b.txt", "new upload");
        std::fs::create_dir_all(p.join("data/.datavault-old-1")).unwrap();
        std::fs::create_dir_all(p.join(".datavault-old-1")).unwrap();
        let live_db = p.join("data/app.db");
        let mut moves: Vec<Move> = ["-wal", "-shm", "-journal"]
            .iter()
            .map(|sfx| {
                let live = with_suffix(&live_db, sfx);
                Move {
                    aside: p.join("data/.datavault-old-1").join(live.file_name().unwrap()),
                    had_live: exists(&live),
                    live,
                    staged: None,
                }
            })
            .collect();
        moves.push(Move {
            live: live_db.clone(),
            aside: p.join("data/.datavault-old-1/app.db"),
            staged: Some(p.join("data/.datavault-restore-1/restored.db")),
            had_live: true,
        });
        moves.push(Move {
            live: p.join("uploads"),
            aside: p.join(".datavault-old-1/uploads"),
            staged: Some(p.join(".datavault-restore-1/uploads")),
            had_live: true,
        });
        let j =
            Journal { archive: "a".into(), phase: Phase::Swapping, moves, stages: vec![], asides: vec![] };
        (dir, j)
    }
}
