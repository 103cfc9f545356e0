//! The operations behind the commands. Each takes an [`Env`] and returns a plain result the
//! binary renders; none of them prints.
//!
//! A [`Run`] is one locked, catalogued execution: it holds the run lock, records the run in
//! the audit catalog, first repairs what an interrupted earlier run left behind (partial
//! files, a half-done restore), and on the way out writes the metrics file.

pub mod audit;
pub mod backup;
pub mod doctor;
pub mod drill;
pub mod health;
pub mod list;
pub mod notify;
pub mod prune;
pub mod restore;
pub mod service;
pub mod status;
pub mod verify;

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};

use crate::catalog::{ArchiveRecord, ArchiveStatus, Catalog, RunStatus};
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::lock::RunLock;
use crate::manifest;
use crate::progress::Progress;
use crate::store::{self, Listing, Store};
use crate::target::SystemRoot;

/// What started a run: recorded in the catalog and the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// Someone at a terminal.
    Manual,
    /// The daily systemd timer.
    Timer,
    /// The push button (or SIGUSR1 to the agent).
    Button,
    /// The drill at boot.
    Boot,
    /// The safety copy an in-place restore takes first.
    Restore,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Timer => "timer",
            Trigger::Button => "button",
            Trigger::Boot => "boot",
            Trigger::Restore => "restore",
        }
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What every operation needs from the outside world.
pub struct Env {
    pub settings: Settings,
    pub system_root: SystemRoot,
    pub progress: Arc<dyn Progress>,
    /// `--offsite`: `list`, `verify`, `drill` and `restore` read the archives from the bucket
    /// (`[offsite]`) instead of the USB drive (#10). Writing (a backup, the safety copy of an
    /// in-place restore) always goes to the drive.
    pub offsite: bool,
}

impl Env {
    pub fn new(settings: Settings, progress: Arc<dyn Progress>) -> Env {
        Env { settings, system_root: SystemRoot::from_env(), progress, offsite: false }
    }

    /// The same, reading archives from the offsite copy when `offsite` is set.
    pub fn with_offsite(self, offsite: bool) -> Env {
        Env { offsite, ..self }
    }

    /// The archives to read: on the USB drive, once the drive is known to be there and
    /// readable; or, with `--offsite`, in the bucket, once one request proved it answers.
    pub fn store_for_reading(&self) -> Result<Store> {
        if self.offsite {
            return crate::offsite::open_store(&self.settings);
        }
        crate::target::require_readable(&self.settings.target, &self.system_root)?;
        Store::open_local(&self.settings.target.path)
    }

    /// The USB drive, once it is known to be the right, mounted drive with `needed` bytes free.
    pub fn store_for_writing(&self, needed: u64) -> Result<Store> {
        crate::target::require_writable(&self.settings.target, &self.system_root, needed)?;
        Store::open_local(&self.settings.target.path)
    }
}

pub fn now() -> DateTime<Utc> {
    Utc::now()
}

/// When this datavault's source was committed: the clock cannot be earlier than that.
pub fn build_time() -> DateTime<Utc> {
    let epoch: i64 = env!("DATAVAULT_BUILD_EPOCH").parse().unwrap_or(0);
    Utc.timestamp_opt(epoch, 0).single().unwrap_or_default()
}

/// Who runs this: the catalog's "user" column.
pub fn user() -> String {
    for var in ["SUDO_USER", "USER", "LOGNAME"] {
        if let Ok(v) = std::env::var(var) {
            if !v.is_empty() {
                return v;
            }
        }
    }
    format!("uid {}", rustix::process::geteuid().as_raw())
}

pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Backups and drills yield the CPU to the application they protect: on a 2-core machine,
/// at nice 0 the app's transactions waited up to 40 ms for a core during a backup (3.3x
/// their worst without one; bench/results/medium.md). Linux sets nice per thread, so this
/// is called on the thread that runs the job, before it starts its pipeline thread.
/// Restores run at full speed: the app is stopped and someone is waiting.
pub const BACKGROUND_NICE: i32 = 10;

pub fn run_in_background_priority() {
    let current = rustix::process::getpriority_process(None).unwrap_or(0);
    if current < BACKGROUND_NICE {
        if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_NICE) {
            log::debug!("cannot lower the priority to nice {BACKGROUND_NICE}: {e}");
        }
    }
}

/// One locked, catalogued execution of a command.
pub struct Run<'e> {
    pub env: &'e Env,
    pub catalog: Catalog,
    pub id: i64,
    command: String,
    /// The snapshot store's chunk cache, left open by a backup for its own prune: opening
    /// it again (its integrity check) and closing it twice cost more than the rest of a
    /// nightly prune. Declared before the lock: closed before the lock is let go.
    chunk_cache: std::cell::RefCell<Option<crate::store::dedup::Cache>>,
    _lock: Option<RunLock>,
}

impl<'e> Run<'e> {
    /// Keep the chunk cache open for a later step of this run ([`Run::take_chunk_cache`]).
    pub fn keep_chunk_cache(&self, cache: crate::store::dedup::Cache) {
        *self.chunk_cache.borrow_mut() = Some(cache);
    }

    /// The chunk cache an earlier step of this run kept open, if any.
    pub fn take_chunk_cache(&self) -> Option<crate::store::dedup::Cache> {
        self.chunk_cache.borrow_mut().take()
    }

    /// Take the lock (unless `locked` is false: read-only commands), open the catalog, record
    /// the run, and clean up after any interrupted run.
    pub fn start(env: &'e Env, command: &str, trigger: Trigger, locked: bool) -> Result<Run<'e>> {
        let state = &env.settings.state;
        if locked {
            // Root deletes and renames what the state folder's journal names, and writes
            // through its lock file: nobody else may write there.
            crate::config::check_state_dir(&state.dir)?;
            crate::config::check_layout(&env.settings)?;
        }
        let lock = if locked { Some(RunLock::acquire(&state.lock_path(), command)?) } else { None };
        if locked {
            // A run killed while writing the journal or the metrics leaves a `.partial`.
            for e in std::fs::read_dir(&state.dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().ends_with(crate::fsutil::PARTIAL_SUFFIX) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let catalog = Catalog::open_or_rebuild(&state.catalog_path())?;
        let t = now();
        if locked {
            let n = catalog.close_interrupted_runs(t)?;
            if n > 0 {
                log::warn!("{n} earlier run(s) were interrupted (power cut or kill); cleaning up after them");
            }
        }
        let id = catalog.begin_run(command, trigger.as_str(), &user(), &host(), t)?;
        let run = Run {
            env,
            catalog,
            id,
            command: command.to_string(),
            chunk_cache: Default::default(),
            _lock: lock,
        };
        if locked {
            if let Err(e) = restore::recover_interrupted(&run) {
                // Recorded as this run's failure, not left RUNNING for the next run to call
                // "interrupted".
                let failed: Result<Run<'e>> = Err(e);
                run.end(&failed, RunStatus::Failed, None);
                return failed;
            }
        }
        Ok(run)
    }

    /// Record how the run ended (success, or its error) and refresh the metrics file.
    pub fn end<T>(self, result: &Result<T>, status_on_ok: RunStatus, archive: Option<&str>) {
        match result {
            Ok(_) => self.end_as(status_on_ok, None, archive),
            Err(e) => self.end_as(RunStatus::Failed, Some(RunError::of(e)), archive),
        }
    }

    /// Record an explicit ending: a run that completed but failed its purpose (a drill whose
    /// checks failed) is `Failed` with its reason, without an `Error` to show for it.
    pub fn end_as(self, status: RunStatus, error: Option<RunError>, archive: Option<&str>) {
        if let Err(e) = self.catalog.end_run(self.id, now(), status, error.as_ref(), archive) {
            log::warn!("cannot record the run in the catalog: {e}");
        }
        // Only recorded here (no network in the backup and drill units); sent by `notify` (#15).
        notify::record_after_run(self.env, &self.catalog, &self.command, status, error.as_ref(), archive);
        let s = &self.env.settings;
        let health = health::Health::read(self.env, false);
        if let Err(e) = crate::metrics::write(&s.state.metrics_path(), &self.catalog, &health) {
            log::warn!("cannot write metrics: {e}");
        }
    }
}

/// Why a run failed, as the catalog records it.
#[derive(Debug, Clone)]
pub struct RunError {
    /// The error's class ([`Error::kind`]).
    pub kind: &'static str,
    pub message: String,
}

impl RunError {
    pub fn of(e: &Error) -> RunError {
        RunError { kind: e.kind(), message: e.to_string() }
    }

    /// The exit code the command ended with (its class, [`Error::exit_code`]): what a
    /// healthchecks failure ping reports.
    pub fn exit_code(&self) -> u8 {
        use crate::error::exit;
        match self.kind {
            "usage" | "config" | "key" => exit::USAGE,
            "target" => exit::TARGET_NOT_READY,
            "integrity" => exit::INTEGRITY,
            "source" => exit::SOURCE,
            "locked" => exit::LOCKED,
            _ => exit::FAILURE,
        }
    }
}

/// The drive's store and its archives (newest first), after checking the drive can be read.
pub fn listings(env: &Env) -> Result<(Store, Vec<Listing>)> {
    let store = env.store_for_reading()?;
    let listings = store.scan()?;
    Ok((store, listings))
}

/// Which archive a command works on when none is named.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The newest regular backup, even if damaged: verify and drill must report damage on
    /// the newest archive rather than quietly check an older one.
    Newest,
    /// The newest regular backup that is complete: what restore should bring back.
    NewestComplete,
}

/// What a restore brings back when no archive is named: the newest complete backup that no
/// drill, verify or quick_check failed (the README's "newest ok backup"); if every complete
/// one failed, the newest complete one. Each one passed over is named, with why.
pub fn select_for_restore<'l>(
    listings: &'l [Listing],
    wanted: Option<&str>,
    failed: &std::collections::HashMap<String, String>,
) -> Result<&'l Listing> {
    let newest = select(listings, wanted, Pick::NewestComplete)?;
    if wanted.is_some() || !failed.contains_key(&newest.name) {
        return Ok(newest);
    }
    let t = now();
    let sound = listings.iter().find(|l| {
        l.manifest.as_ref().map(|m| m.kind) == Some(manifest::ArchiveKind::Backup)
            && l.is_complete()
            && !l.created().is_some_and(|c| is_in_future(c, t))
            && !failed.contains_key(&l.name)
    });
    let Some(sound) = sound else {
        log::warn!("every complete backup failed a check; the newest, {}, is taken", newest.name);
        return Ok(newest);
    };
    for l in listings.iter().take_while(|l| l.name != sound.name).filter(|l| failed.contains_key(&l.name)) {
        log::warn!("skipping {}: {}; name it to restore it anyway", l.name, failed[&l.name]);
    }
    Ok(sound)
}

/// Pick an archive by name, or by the default rule.
pub fn select<'l>(listings: &'l [Listing], wanted: Option<&str>, pick: Pick) -> Result<&'l Listing> {
    if let Some(w) = wanted {
        return store::find(listings, w).ok_or_else(|| {
            Error::Usage(format!("no archive named {w:?} on the target; `datavault list` shows them"))
        });
    }
    // An archive dated in the future was made while the clock was wrong: "newest" by its
    // date, it may well be older than the others. It is only ever used by name (red team #6).
    let t = now();
    let in_future = |l: &Listing| l.created().is_some_and(|c| is_in_future(c, t));
    for l in listings.iter().filter(|l| in_future(l)) {
        log::warn!(
            "{} is dated {}, in the future: it was made while the clock was wrong, so it is not taken as the newest; name it to use it",
            l.name,
            l.created().map(manifest::format_time).unwrap_or_default()
        );
    }
    let is_backup = |l: &&Listing| {
        l.manifest.as_ref().map(|m| m.kind) == Some(manifest::ArchiveKind::Backup) && !in_future(l)
    };
    let found = match pick {
        Pick::Newest => listings.iter().find(is_backup),
        Pick::NewestComplete => {
            let found = listings.iter().filter(is_backup).find(|l| l.is_complete());
            if let Some(f) = found {
                for skipped in listings.iter().filter(is_backup).take_while(|l| l.name != f.name) {
                    log::warn!(
                        "skipping {}: {}",
                        skipped.name,
                        skipped.problem.as_deref().unwrap_or("incomplete")
                    );
                }
            }
            found
        }
    };
    if let (None, Some(newest)) = (found, listings.iter().find(is_backup)) {
        return Err(Error::integrity(
            &newest.name,
            format!(
                "{}, and no other backup on the target is complete; try `datavault list` and a pre-restore archive",
                newest.problem.as_deref().unwrap_or("incomplete")
            ),
        ));
    }
    found.ok_or_else(|| {
        Error::Usage("there is no complete backup on the target; run `datavault backup` first".into())
    })
}

/// Dated more than a day after `now`: made while the clock was wrong (or the clock is wrong
/// now; either way not to be trusted as "the newest").
pub fn is_in_future(created: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    created > now + chrono::Duration::days(1)
}

/// The catalog's view of a listing.
pub fn archive_record(l: &Listing) -> Option<ArchiveRecord> {
    let m = l.manifest.as_ref()?;
    Some(ArchiveRecord {
        name: l.name.clone(),
        path: l.archive_path(),
        kind: m.kind,
        size: m.archive_size,
        created_at: m.created,
        user: m.user.clone(),
        trigger: m.trigger.clone(),
        comment: m.comment.clone(),
        sha256: m.archive_sha256.clone(),
        status: ArchiveStatus::Active,
        expires_at: None,
        files: m.files,
    })
}

/// [`sync_catalog`] for listings read from the drive; those of the bucket (`--offsite`) are
/// not the drive's and leave the catalog alone.
pub fn sync_catalog_if_local(env: &Env, catalog: &Catalog, listings: &[Listing]) {
    if !env.offsite {
        sync_catalog(catalog, listings);
    }
}

/// The archives known to be damaged or to hold a damaged database, with why: what drills
/// and verifies found (the catalog, [`Catalog::failed_checks`]) and what a backup's
/// quick_check wrote into the manifest (which survives the catalog: red team 2026-12-07).
/// A catalog that cannot be read leaves only the manifests' word, with a warning.
pub fn failed_checks(
    catalog: Option<&Catalog>,
    listings: &[Listing],
) -> std::collections::HashMap<String, String> {
    let mut failed = match catalog.map(Catalog::failed_checks) {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            log::warn!("{e}: only the manifests say which archives are damaged");
            Default::default()
        }
        None => Default::default(),
    };
    for l in listings {
        if let Some(why) =
            l.manifest.as_ref().and_then(|m| m.database.as_ref()).and_then(|d| d.damaged.as_ref())
        {
            failed.insert(
                l.name.clone(),
                format!("the live database failed quick_check when it was backed up: {why}"),
            );
        }
    }
    failed
}

/// Bring the catalog in line with the manifests on the drive (the source of truth).
pub fn sync_catalog(catalog: &Catalog, listings: &[Listing]) {
    let present: Vec<_> = listings.iter().filter(|l| l.is_complete()).filter_map(archive_record).collect();
    match catalog.sync_with_target(&present, now()) {
        Ok((imported, missing)) => {
            if imported > 0 {
                log::info!("catalog: {imported} archive(s) found on the drive were added");
            }
            if missing > 0 {
                log::warn!("catalog: {missing} archive(s) are no longer on the drive, or no longer complete (see `datavault list`)");
            }
        }
        Err(e) => log::warn!("cannot update the catalog: {e}"),
    }
}
