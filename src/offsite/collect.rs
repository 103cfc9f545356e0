//! `offsite prune` on the bucket's snapshot store (#9, #10): forget the snapshots the remote
//! retention does not keep (each manifest first, then its refs and tree), then collect what no
//! remaining snapshot needs with the drive's own garbage collection (no key needed: liveness
//! comes from the secret-free refs files, repacking copies ciphertext). The collection waits
//! while a push is under way ([`super::locks`]): it could delete a pack the push counts on, or
//! the tree and refs of a snapshot not visible yet. Forgetting does not wait: a push never
//! depends on a snapshot being there.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::locks;
use super::push::stem_time;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::retention::{Candidate, Decision, Health, RetentionPolicy};
use crate::store::backend::Backend;
use crate::store::dedup::gc::{self, GcOptions, GcOutcome};
use crate::store::dedup::{self, Cache};

#[derive(Debug, Clone, Default, Serialize)]
pub struct StorePrune {
    pub decisions: Vec<Decision>,
    /// Snapshots forgotten (with `dry_run`: that would be).
    pub forgotten: Vec<String>,
    /// What the collection freed (with `dry_run`: would free).
    pub gc: Option<GcOutcome>,
    /// Why no pack was collected this time (a push under way): the next prune does it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc_deferred: Option<String>,
    /// Lock markers removed (finished or long-dead runs, and this one's).
    pub markers_removed: usize,
}

/// The newest complete snapshot in the bucket (for the clock check before pruning).
pub fn newest(remote: &Arc<dyn Backend>) -> Result<Option<DateTime<Utc>>> {
    let Some(ds) = dedup::Store::open(remote.clone())? else { return Ok(None) };
    Ok(ds.list_snapshots()?.iter().filter(|l| l.is_complete()).filter_map(|l| l.created()).max())
}

/// Forget, then collect. `None` when the bucket has no snapshot store.
pub fn prune_store(
    remote: Arc<dyn Backend>,
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
    dry_run: bool,
    progress: &dyn Progress,
) -> Result<Option<StorePrune>> {
    let Some(ds) = dedup::Store::open(remote.clone())? else { return Ok(None) };
    let loc = ds.location();
    let io = |doing: &'static str| {
        let loc = loc.clone();
        move |e: std::io::Error| Error::Failed(format!("{doing} {loc}: {e}"))
    };
    let snaps = ds.list_snapshots()?;
    let candidates: Vec<Candidate> = snaps
        .iter()
        .filter(|l| l.manifest.is_some())
        .filter_map(|l| {
            let (kind, created) = stem_time(&l.name)?;
            Some(Candidate {
                name: l.name.clone(),
                kind,
                created,
                health: Health::of(l.is_complete(), false),
                drilled: false,
            })
        })
        .collect();
    let mut out =
        StorePrune { decisions: policy.apply(&candidates, crate::ops::now()), ..Default::default() };
    out.forgotten = out.decisions.iter().filter(|d| !d.keep).map(|d| d.name.clone()).collect();
    if dry_run {
        let mut scratch = Cache::open_private()?;
        let plan = gc::plan_without(&ds, &mut scratch, &GcOptions::default(), &out.forgotten)?;
        out.gc = Some(plan.preview());
        return Ok(Some(out));
    }
    for name in &out.forgotten {
        gc::forget(&ds, name)?;
        log::info!("forgot snapshot {name} in {}", ds.location());
    }

    let mine = locks::write(&*remote, "prune", now).map_err(io("writing a lock marker in"))?;
    let seen = locks::list(&*remote).map_err(io("listing the lock markers of"))?;
    if let Some(t) = locks::push_running(&seen, now) {
        out.gc_deferred = Some(format!(
            "a push started at {} has not finished: packs are collected by the next prune",
            t.format("%Y-%m-%d %H:%M UTC")
        ));
    } else {
        // The bucket's index is read into a cache of its own for this run (on the machine
        // that prunes, not the Pi).
        let mut cache = Cache::open_private()?;
        let opts = GcOptions::default();
        let plan = gc::plan(&ds, &mut cache, &opts)?;
        if !plan.blocked_by.is_empty() {
            log::warn!("garbage collection left some packs alone: {}", plan.blocked_by.join("; "));
        }
        if !plan.is_empty() {
            out.gc = Some(plan.execute(&ds, &mut cache, &opts, progress)?);
        }
    }
    for p in locks::no_longer_needed(&seen, now, &mine) {
        match remote.remove(&p) {
            Ok(()) => out.markers_removed += 1,
            Err(e) => log::warn!("{p}: cannot remove this lock marker ({e})"),
        }
    }
    Ok(Some(out))
}

/// Every object of the bucket's snapshot store (paths from the bucket's root): what the
/// ledger may keep records of after a prune. Lock markers are not recorded, so not listed.
pub fn store_objects(remote: &dyn Backend) -> std::io::Result<std::collections::HashSet<String>> {
    use crate::store::backend::join;
    use crate::store::dedup::format;
    let mut dirs =
        vec!["store".to_string(), format::INDEX_DIR.to_string(), format::SNAPSHOTS_DIR.to_string()];
    dirs.extend(format::pack_dirs());
    let mut out = std::collections::HashSet::new();
    for d in dirs {
        out.extend(remote.list(&d)?.into_iter().map(|o| join(&d, &o.name)));
    }
    Ok(out)
}
