//! The offsite copy (#10): the USB drive's backups replicated to S3-compatible object
//! storage, so that a theft, a fire or a surge that takes the Pi and its drive together
//! does not take the backups.
//!
//! - [`s3::S3Backend`] is the bucket behind the storage-neutral
//!   [`Backend`](crate::store::backend::Backend) trait: `list`, `verify`, `drill` and
//!   `restore` read it exactly as they read the drive.
//! - [`push::push`] copies whatever the remote lacks, generic over two backends.
//! - [`ledger`] records each uploaded object's size and SHA-256, in the bucket.
//! - [`remote_error`] sorts server trouble into exit codes (3 not ready, 2 credentials,
//!   4 integrity).
//! - [`credentials`] loads the key from a 0600 file or the environment.
//!
//! [`push`] and [`prune`] here are the commands' operations: locks, catalog, state file.
//! Pushing needs only a put-only credential; pruning the remote runs elsewhere, with a
//! delete-capable one (docs/offsite.md).

pub mod check;
pub mod collect;
pub mod credentials;
pub mod ledger;
pub mod locks;
pub mod push;
pub mod remote_error;
pub mod s3;

use std::path::{Path, PathBuf};

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog::RunStatus;
use crate::config::{OffsiteSettings, Settings};
use crate::error::{Error, Result};
use crate::lock::RunLock;
use crate::manifest::Manifest;
use crate::ops::{now, Env, Run};
use crate::retention::{Candidate, Decision, Health};
use crate::store::backend::{join, Backend, LocalBackend};
use crate::store::{ARCHIVE_SUFFIX, MANIFEST_SUFFIX};
use remote_error::{to_error, Blame};
use s3::S3Backend;

/// The small secret-free record of the last push, in the state folder, for `status`,
/// `doctor`, the metrics and the agent's LED (they must not need the network).
pub const STATE_FILE: &str = "offsite-state.json";
/// Pushes and remote prunes take this lock, not the backup's: a long upload must never make
/// the nightly backup or a button press wait.
pub const LOCK_FILE: &str = "offsite.lock";
/// Multipart uploads started by pushes, so the next one can abort what a killed one left.
pub const UPLOAD_JOURNAL: &str = "offsite-uploads";
/// An unfinished upload or an archive without its manifest younger than this may belong to
/// a push in progress: prune leaves it alone.
const GRACE_HOURS: i64 = 24;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsiteState {
    pub location: String,
    pub last_attempt: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    /// When the last successful push started: every backup visible on the drive then is in
    /// the bucket (what `ops::health::offsite_behind` counts from).
    #[serde(default)]
    pub last_success_started: Option<DateTime<Utc>>,
    /// The last push's error (one line, no secret) and its class (`offsite`, `key`, ...).
    pub last_error: Option<String>,
    pub last_error_kind: Option<String>,
    /// What the remote lacked after the last push that got as far as comparing.
    pub behind: push::Behind,
    pub last_uploaded_files: usize,
    pub last_uploaded_bytes: u64,
}

impl OffsiteState {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    /// The recorded state; `None` when no push ever ran (or the file is unreadable).
    pub fn load(state_dir: &Path) -> Option<OffsiteState> {
        let bytes = std::fs::read(Self::path(state_dir)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn save(&self, state_dir: &Path) {
        let mut bytes = serde_json::to_vec_pretty(self).expect("serializes");
        bytes.push(b'\n');
        if let Err(e) = crate::fsutil::write_atomic(&Self::path(state_dir), &bytes, 0o600) {
            log::warn!("cannot record the offsite state: {e}");
        }
    }
}

/// The `[offsite]` settings, or a config error saying how to add them.
pub fn settings(s: &Settings) -> Result<&OffsiteSettings> {
    s.offsite.as_ref().ok_or_else(|| {
        Error::config(
            &s.path,
            "has no [offsite] section; add url, endpoint and credentials (docs/offsite.md)",
        )
    })
}

/// Who to blame in messages for this config.
pub fn blame(s: &Settings) -> Result<Blame> {
    let o = settings(s)?;
    Ok(Blame {
        location: o.url.trim_end_matches('/').to_string(),
        credentials: o.credentials.clone().unwrap_or_else(|| credentials::ENV_SOURCE.into()),
        config: s.path.clone(),
    })
}

/// The bucket as a [`Backend`]: what `list/verify/drill/restore --offsite` read. Makes no
/// request; [`S3Backend::check`] is the one that proves the server answers.
pub fn connect(s: &Settings) -> Result<(S3Backend, Blame)> {
    let o = settings(s)?;
    let creds = credentials::load(o)?;
    let mut blame = blame(s)?;
    blame.credentials = creds.source.clone();
    let backend = S3Backend::new(o, &creds).map_err(|e| to_error(e, "setting up", &blame))?;
    Ok((backend, blame))
}

/// The bucket as the [`Store`](crate::store::Store) `list/verify/drill/restore --offsite`
/// read, after one cheap request proved the endpoint, the bucket, the key and the clock.
/// Needs nothing local: no drive, no state (a new Pi with the identity, the config and the
/// credentials).
pub fn open_store(s: &Settings) -> Result<crate::store::Store> {
    let (remote, blame) = connect(s)?;
    remote.check().map_err(|e| to_error(e, "checking the bucket", &blame))?;
    Ok(crate::store::Store::remote(std::sync::Arc::new(remote), blame))
}

#[derive(Debug, Clone, Serialize)]
pub struct PushOutcome {
    #[serde(flatten)]
    pub report: push::PushReport,
    /// Unfinished multipart uploads (a push killed mid-file) that were aborted first.
    pub aborted_uploads: Vec<String>,
}

/// `datavault offsite push`.
pub fn run_push(env: &Env, trigger: crate::ops::Trigger, dry_run: bool) -> Result<PushOutcome> {
    let s = &env.settings;
    let _lock = RunLock::acquire(&s.state.dir.join(LOCK_FILE), "offsite push")?;
    let run = Run::start(env, "offsite-push", trigger, false)?;
    // Uploading is background work: hashing and TLS must not slow the app on a 2-core Pi.
    crate::ops::run_in_background_priority();
    let started = now();
    let result = push_in_run(env, dry_run);
    let mut state = OffsiteState::load(&s.state.dir).unwrap_or_default();
    state.location = s.offsite.as_ref().map(|o| o.url.clone()).unwrap_or_default();
    state.last_attempt = Some(started);
    let recorded: Result<()> = match &result {
        Ok(o) if o.report.clean() => {
            state.last_success = Some(now());
            state.last_success_started = Some(started);
            state.last_error = None;
            state.last_error_kind = None;
            Ok(())
        }
        Ok(o) => Err(Error::integrity(
            state.location.clone(),
            format!(
                "{} conflict(s), {} damaged local file(s); see `datavault offsite push`",
                o.report.conflicts.len(),
                o.report.damaged_locally.len()
            ),
        )),
        Err(e) => Err(Error::Failed(e.to_string())),
    };
    if let Ok(o) = &result {
        if !dry_run {
            state.behind = o.report.behind.clone();
            state.last_uploaded_files = o.report.uploaded.len();
            state.last_uploaded_bytes = o.report.uploaded_bytes;
        }
    }
    if let Err(e) = &recorded {
        state.last_error = Some(e.to_string());
        state.last_error_kind = Some(match &result {
            Err(e) => e.kind().to_string(),
            Ok(_) => "integrity".into(),
        });
    }
    if !dry_run {
        state.save(&s.state.dir);
    }
    run.end(&recorded, RunStatus::Success, None);
    result
}

fn push_in_run(env: &Env, dry_run: bool) -> Result<PushOutcome> {
    let s = &env.settings;
    let (remote, blame) = connect(s)?;
    let remote = remote.with_upload_journal(s.state.dir.join(UPLOAD_JOURNAL));
    crate::target::require_readable(&s.target, &env.system_root)?;
    let local = LocalBackend::open(&s.target.path)
        .map_err(|e| Error::target(&s.target.path, format!("cannot open the drive: {e}")))?;
    remote.check().map_err(|e| to_error(e, "checking the bucket", &blame))?;
    // A push killed mid-file left an unfinished upload: abort it (its parts cost storage and
    // are invisible anyway); the file is sent again below. We hold the offsite lock, so no
    // other push of ours is under way. Found through our journal and, where the server
    // lists them, ListMultipartUploads. A credential without AbortMultipartUpload only warns:
    // a bucket lifecycle rule can clean up instead.
    let mut pending = remote.journaled_uploads();
    match remote.pending_uploads() {
        Ok(ups) => pending.extend(ups),
        Err(e) => {
            log::debug!("{}", to_error(e, "listing unfinished uploads (the journal is used instead)", &blame))
        }
    }
    let mut seen = std::collections::HashSet::new();
    pending.retain(|u| seen.insert(u.upload_id.clone()));
    let mut aborted = Vec::new();
    let mut all_aborted = true;
    for u in pending {
        if dry_run {
            continue;
        }
        match remote.abort_upload(&u) {
            Ok(true) => {
                log::info!("aborted an unfinished upload of {} (started {})", u.path, u.initiated);
                aborted.push(u.path);
            }
            Ok(false) => {}
            Err(e) => {
                all_aborted = false;
                log::warn!("{}", to_error(e, "cleaning up", &blame));
            }
        }
    }
    if all_aborted && !dry_run {
        remote.clear_upload_journal();
    }
    let o = settings(s)?;
    let opts = push::PushOptions {
        retention: o.retention,
        dry_run,
        now: now(),
        cache_dir: Some(s.state.dir.clone()),
    };
    let report = push::push(Arc::new(local), Arc::new(remote), &opts, &*env.progress).map_err(|e| {
        if crate::store::backend::is_drive_gone(&e)
            || remote_error::class_of(&e).is_none() && e.raw_os_error().is_some()
        {
            Error::target(&s.target.path, format!("reading the drive failed: {e}"))
        } else {
            to_error(e, "pushing", &blame)
        }
    })?;
    for p in report.conflicts.iter().chain(&report.damaged_locally) {
        log::error!("{}: {}", p.path, p.why);
    }
    Ok(PushOutcome { report, aborted_uploads: aborted })
}

#[derive(Debug, Clone, Serialize)]
pub struct RemotePruneOutcome {
    pub location: String,
    pub dry_run: bool,
    pub decisions: Vec<Decision>,
    pub deleted: Vec<String>,
    /// Archives without a manifest older than a day, and manifests without an archive.
    pub orphans_deleted: Vec<String>,
    pub aborted_uploads: Vec<String>,
    /// Ledger objects merged into one.
    pub ledger_merged: usize,
    /// The snapshot store (#9): snapshots forgotten, packs collected; `None` without one.
    pub store: Option<collect::StorePrune>,
}

/// `datavault offsite prune`: the remote retention policy, run on a machine with a
/// delete-capable credential (a put-only one gets AccessDenied: exit 2, said plainly).
pub fn run_prune(env: &Env, dry_run: bool) -> Result<RemotePruneOutcome> {
    let s = &env.settings;
    let _lock = RunLock::acquire(&s.state.dir.join(LOCK_FILE), "offsite prune")?;
    let run = Run::start(env, "offsite-prune", crate::ops::Trigger::Manual, false)?;
    let result = prune_in_run(s, dry_run, &*env.progress);
    run.end(&result, RunStatus::Success, None);
    result
}

/// The bucket's backups as retention sees them (a manifest that does not describe its
/// archive is not good), and the orphans to delete: manifests without their archive, and
/// archives without a manifest older than the grace period (a push may be sending them).
fn remote_candidates(
    remote: &dyn Backend,
    top: &std::collections::HashMap<String, u64>,
    t: DateTime<Utc>,
) -> (Vec<Candidate>, Vec<String>) {
    let mut candidates = Vec::new();
    let mut orphans = Vec::new();
    for name in top.keys() {
        if let Some(stem) = name.strip_suffix(MANIFEST_SUFFIX) {
            let Some((kind, created)) = push::stem_time(stem) else { continue };
            let archive = format!("{stem}{ARCHIVE_SUFFIX}");
            let good = match top.get(&archive) {
                None => false,
                Some(&size) => remote
                    .read_small(name, 16 << 20)
                    .ok()
                    .and_then(|b| Manifest::parse(&archive, &b).ok())
                    .is_some_and(|m| m.archive == archive && m.archive_size == size),
            };
            if top.contains_key(&archive) {
                candidates.push(Candidate {
                    name: stem.to_string(),
                    kind,
                    created,
                    health: Health::of(good, false),
                    // The bucket keeps no drill results of its own.
                    drilled: false,
                });
            } else {
                orphans.push(name.clone());
            }
        } else if let Some(stem) = name.strip_suffix(ARCHIVE_SUFFIX) {
            let old = push::stem_time(stem).is_some_and(|(_, c)| t - c > Duration::hours(GRACE_HOURS));
            if old && !top.contains_key(&format!("{stem}{MANIFEST_SUFFIX}")) {
                orphans.push(name.clone());
            }
        }
    }
    (candidates, orphans)
}

/// The ledger objects merged into one, without the records of what is gone: written first,
/// the old ones deleted after, so a cut loses no record. Returns how many were merged.
fn merge_ledger(remote: &dyn Backend, gone: &[String], t: DateTime<Utc>) -> std::io::Result<usize> {
    let ledger = ledger::Ledger::load(remote)?;
    if ledger.files.is_empty() || (ledger.files.len() == 1 && gone.is_empty()) {
        return Ok(0);
    }
    let mut records: Vec<ledger::Record> =
        ledger.records.values().filter(|r| !gone.contains(&r.path)).cloned().collect();
    records.sort_by(|a, b| a.path.cmp(&b.path));
    let name = join(ledger::LEDGER_DIR, &format!("{}-merged.json", t.format("%Y%m%dT%H%M%S%.3fZ")));
    ledger::write_ledger(remote, &name, &records)?;
    for f in &ledger.files {
        remote.remove(&join(ledger::LEDGER_DIR, f))?;
    }
    Ok(ledger.files.len())
}

fn prune_in_run(
    s: &Settings,
    dry_run: bool,
    progress: &dyn crate::progress::Progress,
) -> Result<RemotePruneOutcome> {
    let (remote, blame) = connect(s)?;
    let remote = Arc::new(remote);
    let o = settings(s)?;
    let err = |doing: &str| {
        let blame = blame.clone();
        let doing = doing.to_string();
        move |e| to_error(e, &doing, &blame)
    };
    remote.check().map_err(err("checking the bucket"))?;
    let t = now();
    let top: std::collections::HashMap<String, u64> =
        remote.list("").map_err(err("listing"))?.into_iter().map(|o| (o.name, o.size)).collect();
    let (candidates, orphans) = remote_candidates(&*remote, &top, t);
    let dyn_remote: Arc<dyn Backend> = remote.clone();
    let newest_snapshot = collect::newest(&dyn_remote)?;
    let newest = candidates.iter().filter(|c| c.is_good()).map(|c| c.created).chain(newest_snapshot).max();
    if let crate::retention::ClockCheck::Suspicious(why) =
        crate::retention::check_clock(t, newest, crate::ops::build_time())
    {
        return Err(Error::Failed(format!("refusing to prune the offsite copy: {why}")));
    }
    let decisions = o.retention.apply(&candidates, t);
    let mut deleted = Vec::new();
    let mut gone: Vec<String> = Vec::new();
    for d in decisions.iter().filter(|d| !d.keep) {
        let archive = format!("{}{ARCHIVE_SUFFIX}", d.name);
        if !dry_run {
            // Manifest first: a cut between the two leaves an orphan archive, never a
            // manifest pointing at nothing.
            for p in [format!("{}{MANIFEST_SUFFIX}", d.name), archive.clone()] {
                remote.remove(&p).map_err(err("deleting"))?;
                gone.push(p);
            }
            log::info!("pruned {archive} from {} ({})", blame.location, d.reasons.join("; "));
        }
        deleted.push(archive);
    }
    if !dry_run {
        for p in &orphans {
            remote.remove(p).map_err(err("deleting"))?;
            gone.push(p.clone());
        }
    }
    let mut aborted = Vec::new();
    let pending = remote.pending_uploads().unwrap_or_else(|e| {
        log::warn!(
            "{}; a bucket lifecycle rule (AbortIncompleteMultipartUpload) can clean them up",
            to_error(e, "listing unfinished uploads", &blame)
        );
        Vec::new()
    });
    for u in pending {
        let started = DateTime::parse_from_rfc3339(&u.initiated).map(|d| d.with_timezone(&Utc)).ok();
        if started.is_some_and(|st| t - st > Duration::hours(GRACE_HOURS)) {
            if !dry_run {
                remote.abort_upload(&u).map_err(err("aborting"))?;
            }
            aborted.push(u.path);
        }
    }
    let store = collect::prune_store(dyn_remote.clone(), &o.retention, t, dry_run, progress)?;
    if store.is_some() && !dry_run {
        // What the store's forgetting and collection deleted leaves the ledger too.
        let present = collect::store_objects(&*dyn_remote).map_err(err("listing the snapshot store"))?;
        let records = ledger::Ledger::load(&*remote).map_err(err("reading the upload ledger"))?;
        gone.extend(
            records.records.keys().filter(|p| p.starts_with("store/") && !present.contains(*p)).cloned(),
        );
    }
    let merged = if dry_run {
        0
    } else {
        merge_ledger(&*remote, &gone, t).map_err(err("merging the upload ledger"))?
    };
    Ok(RemotePruneOutcome {
        location: blame.location.clone(),
        dry_run,
        decisions,
        deleted,
        orphans_deleted: if dry_run {
            orphans
        } else {
            gone.into_iter().filter(|g| orphans.contains(g)).collect()
        },
        aborted_uploads: aborted,
        ledger_merged: merged,
        store,
    })
}
