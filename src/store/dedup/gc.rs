//! Retention for snapshots: forget (delete a snapshot's files), then garbage collection
//! (delete what no remaining snapshot needs), as a plan that `--dry-run` prints and
//! `execute` carries out. No key is needed: liveness comes from the secret-free refs files,
//! and repacking copies ciphertext ranges (each blob is a whole age file).
//!
//! Crash safety, batch by batch: new packs are written first, then new index files naming
//! them and every surviving pack of the index files being replaced, then the old index
//! files are deleted, then the old packs. A kill between any two steps leaves every live
//! chunk in at least one indexed pack: at worst duplicate index entries (harmless) or packs
//! no index names (removed by the next GC). Runs hold the exclusive run lock; no backup
//! writes meanwhile (a backup's packs are unindexed until its index file is written).
//!
//! When any snapshot's manifest or refs, or any index file, cannot be read, no indexed pack
//! is deleted or repacked (their chunks might be live): only clearly dead leftovers go.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::cache::{list_index_names, list_packs, parse_index, Cache, ParsedIndex, ParsedPack};
use super::format::{self, IndexBlob, IndexFile, IndexPack};
use super::write::put;
use super::{read_error, write_error, Store};
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Delete a snapshot: its manifest first (then it no longer exists), then refs and tree.
pub fn forget(store: &Store, name: &str) -> Result<()> {
    if !format::is_snapshot_stem(name) {
        return Err(Error::integrity(name, "is not a snapshot name"));
    }
    let loc = store.location();
    for p in [format::manifest_path(name), format::refs_path(name), format::tree_path(name)] {
        store.backend().remove(&p).map_err(|e| write_error(&loc, e))?;
    }
    Ok(())
}

/// Cache meta key: the complete snapshots the store held when a collection last left it
/// clean, one name per line.
const CLEAN_SNAPSHOTS: &str = "gc_clean_snapshots";

/// Whether a collection could free anything, decided from listings and the cache instead
/// of every snapshot's refs and every index entry (what [`plan`] reads): a backup's own
/// prune skips the collection when this says no, which is most nights' whole prune cost
/// while retention forgets nothing. No when:
/// * the cache has no record of a clean store (a new or rebuilt cache), or was told of
///   something it did not write itself ([`Cache::note_unclean`]: index files of a killed
///   or failed backup, a killed collection's);
/// * a snapshot the record names is gone (forgotten by a prune, deleted by hand) or any
///   snapshot is damaged;
/// * a pack no index file names, an orphan tree or refs, or a `.partial` is on the drive.
///
/// The cache is synced with the drive first.
pub fn is_clean(store: &Store, cache: &mut Cache) -> Result<bool> {
    let report = cache.sync(store)?;
    if !report.bad_index_files.is_empty()
        || report.unindexed_packs > 0
        || report.pack_partials > 0
        || cache.unclean()?
    {
        return Ok(false);
    }
    let Some(recorded) = cache.meta(CLEAN_SNAPSHOTS)? else { return Ok(false) };
    let listed = store.list_snapshots()?;
    if listed.iter().any(|l| l.problem.as_deref().is_some_and(|p| !p.starts_with("incomplete"))) {
        return Ok(false);
    }
    let complete: std::collections::HashSet<&str> =
        listed.iter().filter(|l| l.is_complete()).map(|l| l.name.as_str()).collect();
    if recorded.lines().any(|n| !complete.contains(n)) {
        return Ok(false);
    }
    // The pack folders were scanned by the sync.
    let mut debris = GcPlan::default();
    leftover_files(store, &mut debris, false)?;
    Ok(debris.leftovers.is_empty())
}

/// Record that the store is clean now (after a collection with nothing left undone, or
/// after [`is_clean`] said so and only new snapshots were added).
pub fn record_clean(store: &Store, cache: &Cache) -> Result<()> {
    let mut names: Vec<String> =
        store.list_snapshots()?.into_iter().filter(|l| l.is_complete()).map(|l| l.name).collect();
    names.sort();
    cache.set_meta(CLEAN_SNAPSHOTS, &names.join("\n"))?;
    cache.clear_unclean()
}

#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Repack a pack once at least this share of its bytes is dead.
    pub repack_dead_share: f64,
    /// Then keep repacking the most-dead packs until dead bytes are at most this share of
    /// all pack bytes (what "the drive holds about one backup" needs).
    pub max_dead_share: f64,
    /// New packs written before old ones are deleted: the extra space a GC may use at once.
    pub max_extra_bytes: u64,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions { repack_dead_share: 0.5, max_dead_share: 0.05, max_extra_bytes: 64 << 20 }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PackPlan {
    pub pack: String,
    pub size: u64,
    pub live_bytes: u64,
    pub live_chunks: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcPlan {
    /// Packs with no live chunk.
    pub delete: Vec<PackPlan>,
    /// Mostly-dead packs whose live chunks are copied to new packs.
    pub repack: Vec<PackPlan>,
    /// Files nothing refers to: packs no index names, a killed run's tree/refs, `.partial`s.
    pub leftovers: Vec<String>,
    pub leftover_bytes: u64,
    pub bytes_freed: u64,
    /// The most the GC writes before it deletes (bounded by `max_extra_bytes`, or one pack).
    pub extra_space: u64,
    pub live_chunks: u64,
    pub live_bytes: u64,
    pub pack_bytes: u64,
    /// Live chunks no pack holds: the store is damaged (verify says which snapshot).
    pub missing_chunks: u64,
    /// Why indexed packs were left alone, if they were (a damaged manifest, refs or index).
    pub blocked_by: Vec<String>,
    #[serde(skip)]
    packs_index: HashMap<[u8; 32], Vec<String>>,
}

/// Stats of one pack while planning.
#[derive(Default)]
struct PackStat {
    size: u64,
    live_bytes: u64,
    live_chunks: u64,
    index_files: Vec<String>,
}

/// Decide what to delete and repack. Fills the cache's `live` table (used by `execute`).
pub fn plan(store: &Store, cache: &mut Cache, opts: &GcOptions) -> Result<GcPlan> {
    plan_without(store, cache, opts, &[])
}

/// [`plan`] as if the snapshots named in `forgotten` were already gone: what `prune
/// --dry-run` shows before it forgets anything.
pub fn plan_without(
    store: &Store,
    cache: &mut Cache,
    opts: &GcOptions,
    forgotten: &[String],
) -> Result<GcPlan> {
    let mut plan = GcPlan::default();
    mark_live(store, cache, &mut plan, forgotten)?;
    let on_drive = list_packs(store)?;
    let mut stats: HashMap<[u8; 32], PackStat> = HashMap::new();
    // One transaction for the per-chunk marks below: without it each is a commit of its own.
    let tx = cache.conn.unchecked_transaction().map_err(|e| Error::sqlite("cache", e))?;
    for name in list_index_names(store)? {
        let path = format::index_path(&name);
        let parsed = store
            .backend()
            .read_small(&path, format::MAX_INDEX_FILE)
            .map_err(|e| e.to_string())
            .and_then(|b| parse_index(&name, &b));
        let parsed = match parsed {
            Ok(p) => p,
            Err(why) => {
                plan.blocked_by.push(format!("{path}: {why}"));
                continue;
            }
        };
        for p in &parsed.packs {
            let s = stats.entry(p.hash).or_default();
            s.index_files.push(name.clone());
            if s.index_files.len() == 1 {
                s.size = p.size;
                s.live_bytes = 0;
                s.live_chunks = 0;
                for (id, _, len, _) in &p.blobs {
                    if is_live(cache, id)? {
                        s.live_bytes += len;
                        s.live_chunks += 1;
                        let on_the_drive = on_drive.get(&p.hash) == Some(&p.size);
                        set_found(cache, id, if on_the_drive { FOUND } else { INDEXED })?;
                    }
                }
            }
        }
    }
    tx.commit().map_err(|e| Error::sqlite("cache", e))?;
    plan.missing_chunks = count_missing(cache, FOUND)?;
    // Chunks a kept snapshot needs that no index file names: a lost or damaged index file
    // (an interrupted backup's packs are never needed by a snapshot). A pack no index names
    // may hold them, so none is taken for a leftover. (Chunks whose indexed pack is gone are
    // missing too, but no leftover can hold them: those do not stop the collection.)
    let unindexed = count_missing(cache, INDEXED)?;
    if unindexed > 0 {
        log::warn!(
            "{unindexed} chunks that kept snapshots need are in no index file (one was lost?): packs no \
             index names are kept; `datavault verify --all --deep` names the snapshots concerned"
        );
    }
    for (hash, size) in &on_drive {
        plan.pack_bytes += size;
        if !stats.contains_key(hash) && plan.blocked_by.is_empty() && unindexed == 0 {
            plan.leftovers.push(format::pack_path(&hex::encode(hash)));
            plan.leftover_bytes += size;
        }
    }
    leftover_files(store, &mut plan, true)?;
    if plan.blocked_by.is_empty() {
        choose_packs(&mut plan, &stats, &on_drive, opts);
    }
    plan.packs_index = stats.into_iter().map(|(h, s)| (h, s.index_files)).collect();
    Ok(plan)
}

fn mark_live(store: &Store, cache: &mut Cache, plan: &mut GcPlan, forgotten: &[String]) -> Result<()> {
    let ctx = |e| Error::sqlite("cache", e);
    cache.conn.execute_batch("DROP TABLE IF EXISTS live; CREATE TABLE live(id BLOB PRIMARY KEY, found INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;").map_err(ctx)?;
    let tx = cache.conn.unchecked_transaction().map_err(ctx)?;
    for l in store.list_snapshots()?.into_iter().filter(|l| !forgotten.contains(&l.name)) {
        let Some(m) = &l.manifest else {
            if l.problem.as_deref().is_some_and(|p| !p.starts_with("incomplete")) {
                plan.blocked_by.push(format!(
                    "snapshot {}: {}",
                    l.name,
                    l.problem.clone().unwrap_or_default()
                ));
            }
            continue;
        };
        match super::read::read_refs(store, &l.name, m) {
            Ok(refs) => {
                let mut st =
                    cache.conn.prepare_cached("INSERT OR IGNORE INTO live(id) VALUES (?1)").map_err(ctx)?;
                for id in refs {
                    st.execute([&id[..]]).map_err(ctx)?;
                }
            }
            Err(e) => plan.blocked_by.push(format!("snapshot {}: {e}", l.name)),
        }
    }
    tx.commit().map_err(ctx)?;
    let n: i64 = cache.conn.query_row("SELECT count(*) FROM live", [], |r| r.get(0)).map_err(ctx)?;
    plan.live_chunks = n as u64;
    Ok(())
}

fn is_live(cache: &Cache, id: &[u8; 32]) -> Result<bool> {
    let mut st =
        cache.conn.prepare_cached("SELECT 1 FROM live WHERE id=?1").map_err(|e| Error::sqlite("cache", e))?;
    st.exists([&id[..]]).map_err(|e| Error::sqlite("cache", e))
}

/// `live.found`: 0 = no index names the chunk, [`INDEXED`] = an index does but not in a pack
/// on the drive, [`FOUND`] = in an indexed pack on the drive.
const INDEXED: i64 = 1;
const FOUND: i64 = 2;

fn set_found(cache: &Cache, id: &[u8; 32], level: i64) -> Result<()> {
    let mut st = cache
        .conn
        .prepare_cached("UPDATE live SET found=max(found, ?2) WHERE id=?1")
        .map_err(|e| Error::sqlite("cache", e))?;
    st.execute(rusqlite::params![&id[..], level]).map(|_| ()).map_err(|e| Error::sqlite("cache", e))
}

/// Live chunks below `level`.
fn count_missing(cache: &Cache, level: i64) -> Result<u64> {
    cache
        .conn
        .query_row("SELECT count(*) FROM live WHERE found<?1", [level], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
        .map_err(|e| Error::sqlite("cache", e))
}

/// Trees and refs without a manifest (a killed backup), and `.partial` files anywhere in
/// the store (a killed write); the 256 pack folders are listed only with `pack_dirs`.
fn leftover_files(store: &Store, plan: &mut GcPlan, pack_dirs: bool) -> Result<()> {
    let loc = store.location();
    let files = store
        .backend()
        .list(format::SNAPSHOTS_DIR)
        .map_err(|e| read_error(&loc, format::SNAPSHOTS_DIR, &e))?;
    let manifests: std::collections::HashSet<&str> =
        files.iter().filter_map(|o| o.name.strip_suffix(format::MANIFEST_SUFFIX)).collect();
    for o in &files {
        let stem =
            o.name.strip_suffix(format::TREE_SUFFIX).or_else(|| o.name.strip_suffix(format::REFS_SUFFIX));
        let orphan = stem.is_some_and(|s| !manifests.contains(s));
        if orphan || o.name.ends_with(crate::fsutil::PARTIAL_SUFFIX) {
            plan.leftovers.push(format!("{}/{}", format::SNAPSHOTS_DIR, o.name));
            plan.leftover_bytes += o.size;
        }
    }
    let mut dirs = vec!["store".to_string(), format::INDEX_DIR.to_string(), format::PACKS_DIR.to_string()];
    if pack_dirs {
        dirs.extend(format::pack_dirs());
    }
    for dir in dirs {
        for o in store.backend().list(&dir).map_err(|e| read_error(&loc, &dir, &e))? {
            if o.name.ends_with(crate::fsutil::PARTIAL_SUFFIX) {
                plan.leftovers.push(format!("{dir}/{}", o.name));
                plan.leftover_bytes += o.size;
            }
        }
    }
    Ok(())
}

fn choose_packs(
    plan: &mut GcPlan,
    stats: &HashMap<[u8; 32], PackStat>,
    on_drive: &HashMap<[u8; 32], u64>,
    opts: &GcOptions,
) {
    let mut candidates: Vec<(&[u8; 32], &PackStat)> = Vec::new();
    let mut dead_kept = 0u64;
    for (hash, s) in stats {
        let present = on_drive.get(hash) == Some(&s.size);
        plan.live_bytes += s.live_bytes;
        let entry = || PackPlan {
            pack: hex::encode(hash),
            size: s.size,
            live_bytes: s.live_bytes,
            live_chunks: s.live_chunks,
        };
        if s.live_chunks == 0 {
            plan.delete.push(entry());
            plan.bytes_freed += if present { s.size } else { 0 };
        } else if present {
            let dead = s.size.saturating_sub(s.live_bytes);
            if dead as f64 >= opts.repack_dead_share * s.size as f64 {
                plan.repack.push(entry());
            } else {
                dead_kept += dead;
                if dead > 0 {
                    candidates.push((hash, s));
                }
            }
        }
    }
    // Keep repacking the deadest packs while the drive holds too much dead data.
    candidates.sort_by(|a, b| {
        let share = |s: &PackStat| s.size.saturating_sub(s.live_bytes) as f64 / s.size.max(1) as f64;
        share(b.1).total_cmp(&share(a.1)).then_with(|| a.0.cmp(b.0))
    });
    let total: u64 = plan.live_bytes + dead_kept;
    for (hash, s) in candidates {
        if dead_kept as f64 <= opts.max_dead_share * total as f64 {
            break;
        }
        dead_kept -= s.size - s.live_bytes;
        plan.repack.push(PackPlan {
            pack: hex::encode(hash),
            size: s.size,
            live_bytes: s.live_bytes,
            live_chunks: s.live_chunks,
        });
    }
    plan.repack.sort_by(|a, b| a.pack.cmp(&b.pack));
    plan.delete.sort_by(|a, b| a.pack.cmp(&b.pack));
    plan.bytes_freed += plan.repack.iter().map(|p| p.size - p.live_bytes).sum::<u64>() + plan.leftover_bytes;
    let biggest = plan.repack.iter().map(|p| p.live_bytes).max().unwrap_or(0);
    let all: u64 = plan.repack.iter().map(|p| p.live_bytes).sum();
    plan.extra_space = all.min(opts.max_extra_bytes.max(biggest));
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcOutcome {
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub packs_written: u64,
    pub index_files_written: u64,
    pub index_files_deleted: u64,
    pub leftovers_deleted: u64,
    pub bytes_freed: u64,
    /// Packs left alone because they did not match their name when read for repacking.
    pub damaged_packs: Vec<String>,
}

impl GcPlan {
    /// What executing this plan would report (`prune --dry-run`); `bytes_freed` is the
    /// plan's estimate (the run measures it).
    pub fn preview(&self) -> GcOutcome {
        GcOutcome {
            packs_deleted: self.delete.len() as u64,
            packs_repacked: self.repack.len() as u64,
            leftovers_deleted: self.leftovers.len() as u64,
            bytes_freed: self.bytes_freed,
            ..Default::default()
        }
    }

    /// Does this plan change anything?
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.repack.is_empty() && self.leftovers.is_empty()
    }

    /// Carry the plan out (under the run lock, right after [`plan`] with the same cache).
    pub fn execute(
        &self,
        store: &Store,
        cache: &mut Cache,
        opts: &GcOptions,
        progress: &dyn Progress,
    ) -> Result<GcOutcome> {
        let loc = store.location();
        let mut out = GcOutcome::default();
        let before = super::verify::totals(store)?.bytes();
        for path in &self.leftovers {
            store.backend().remove(path).map_err(|e| write_error(&loc, e))?;
            out.leftovers_deleted += 1;
        }
        let mut index_of = self.packs_index.clone();
        let mut batches: Vec<(Vec<&PackPlan>, Vec<&PackPlan>)> = Vec::new();
        let mut current: (Vec<&PackPlan>, Vec<&PackPlan>) = (self.delete.iter().collect(), Vec::new());
        let mut room = 0u64;
        for p in &self.repack {
            if !current.1.is_empty() && room + p.live_bytes > opts.max_extra_bytes {
                batches.push(std::mem::take(&mut current));
                room = 0;
            }
            room += p.live_bytes;
            current.1.push(p);
        }
        batches.push(current);
        progress.start("collecting garbage", self.repack.iter().map(|p| p.size).sum());
        for (delete, repack) in batches {
            if progress.cancelled() {
                break;
            }
            run_batch(store, cache, &delete, &repack, &mut index_of, &mut out, progress)?;
        }
        progress.finish();
        cache.sync(store)?;
        out.bytes_freed = before.saturating_sub(super::verify::totals(store)?.bytes());
        Ok(out)
    }
}

/// One bounded step: copy the live chunks of `repack`, write the index files that replace
/// every index naming a pack of the batch, delete those index files, then the packs.
fn run_batch(
    store: &Store,
    cache: &mut Cache,
    delete: &[&PackPlan],
    repack: &[&PackPlan],
    index_of: &mut HashMap<[u8; 32], Vec<String>>,
    out: &mut GcOutcome,
    progress: &dyn Progress,
) -> Result<()> {
    let loc = store.location();
    let mut gone: Vec<[u8; 32]> = delete.iter().filter_map(|p| format::parse_hex32(&p.pack)).collect();
    let mut new_packs: Vec<IndexPack> = Vec::new();
    let mut writer = PackCopier::new(store.config().pack_target);
    for p in repack {
        let Some(hash) = format::parse_hex32(&p.pack) else { continue };
        match copy_live(store, cache, &hash, p, index_of, &mut writer, &mut new_packs) {
            Ok(()) => {
                gone.push(hash);
                out.packs_repacked += 1;
            }
            Err(CopyError::Damaged(why)) => {
                log::warn!("pack {}: {why}; left in place (run `datavault verify --all`)", p.pack);
                out.damaged_packs.push(p.pack.clone());
            }
            Err(CopyError::Store(e)) => return Err(e),
        }
        progress.advance(p.size);
    }
    if let Some(last) = writer.flush(store).map_err(|e| write_error(&loc, e))? {
        new_packs.push(last);
    }
    out.packs_written += new_packs.len() as u64;
    // The index files that name a pack going away are rewritten without it.
    let gone_set: std::collections::HashSet<[u8; 32]> = gone.iter().copied().collect();
    let mut affected: BTreeMap<String, ()> = BTreeMap::new();
    for h in &gone {
        for name in index_of.get(h).into_iter().flatten() {
            affected.insert(name.clone(), ());
        }
    }
    let mut keep: Vec<IndexPack> = new_packs;
    for name in affected.keys() {
        let path = format::index_path(name);
        let bytes = store
            .backend()
            .read_small(&path, format::MAX_INDEX_FILE)
            .map_err(|e| read_error(&loc, &path, &e))?;
        let parsed = parse_index(name, &bytes).map_err(|why| Error::integrity(&path, why))?;
        keep.extend(surviving(&parsed, &gone_set));
    }
    let written = write_index_files(store, cache, keep, index_of)?;
    out.index_files_written += written.len() as u64;
    for name in affected.keys() {
        store.backend().remove(&format::index_path(name)).map_err(|e| write_error(&loc, e))?;
        cache.forget_index(name)?;
        out.index_files_deleted += 1;
        for files in index_of.values_mut() {
            files.retain(|f| f != name);
        }
    }
    for h in &gone {
        store.backend().remove(&format::pack_path(&hex::encode(h))).map_err(|e| write_error(&loc, e))?;
        index_of.remove(h);
        out.packs_deleted += 1;
    }
    Ok(())
}

/// Packs of an index file that stay, as index entries.
fn surviving(parsed: &ParsedIndex, gone: &std::collections::HashSet<[u8; 32]>) -> Vec<IndexPack> {
    parsed
        .packs
        .iter()
        .filter(|p| !gone.contains(&p.hash))
        .map(|p: &ParsedPack| IndexPack {
            pack: hex::encode(p.hash),
            size: p.size,
            blobs: p.blobs.iter().map(|(id, off, len, plain)| IndexBlob(*id, *off, *len, *plain)).collect(),
        })
        .collect()
}

/// Write index entries as files of bounded size; returns their names.
fn write_index_files(
    store: &Store,
    cache: &mut Cache,
    packs: Vec<IndexPack>,
    index_of: &mut HashMap<[u8; 32], Vec<String>>,
) -> Result<Vec<String>> {
    let loc = store.location();
    let mut names = Vec::new();
    let mut batch: Vec<IndexPack> = Vec::new();
    let mut blobs = 0usize;
    let mut packs = packs.into_iter().peekable();
    while let Some(p) = packs.next() {
        blobs += p.blobs.len();
        batch.push(p);
        let next_fits = packs.peek().is_some_and(|n| blobs + n.blobs.len() <= format::MAX_INDEX_BLOBS / 2);
        if next_fits {
            continue;
        }
        let file = IndexFile { format: format::STORE_FORMAT, packs: std::mem::take(&mut batch) };
        blobs = 0;
        let bytes = serde_json::to_vec(&file).map_err(|e| Error::Failed(e.to_string()))?;
        let name = super::sha256_hex(&bytes);
        put(store.backend(), &format::index_path(&name), &bytes).map_err(|e| write_error(&loc, e))?;
        let parsed = parse_index(&name, &bytes).map_err(Error::Failed)?;
        cache.load_index(&name, &parsed, None)?;
        for p in &parsed.packs {
            index_of.entry(p.hash).or_default().push(name.clone());
        }
        names.push(name);
    }
    Ok(names)
}

enum CopyError {
    Damaged(String),
    Store(Error),
}

/// Read a whole pack, check it against its name, and copy its live blobs.
fn copy_live(
    store: &Store,
    cache: &Cache,
    hash: &[u8; 32],
    p: &PackPlan,
    index_of: &HashMap<[u8; 32], Vec<String>>,
    writer: &mut PackCopier,
    new_packs: &mut Vec<IndexPack>,
) -> std::result::Result<(), CopyError> {
    let loc = store.location();
    let hex_name = hex::encode(hash);
    let bytes = store
        .backend()
        .read_range(&format::pack_path(&hex_name), 0, p.size)
        .map_err(|e| CopyError::Damaged(format!("cannot be read ({e})")))?;
    if super::sha256_hex(&bytes) != hex_name {
        return Err(CopyError::Damaged("its SHA-256 differs from its name".into()));
    }
    let name =
        index_of.get(hash).and_then(|v| v.first()).ok_or(CopyError::Damaged("no index names it".into()))?;
    let path = format::index_path(name);
    let ib = store
        .backend()
        .read_small(&path, format::MAX_INDEX_FILE)
        .map_err(|e| CopyError::Store(read_error(&loc, &path, &e)))?;
    let parsed = parse_index(name, &ib).map_err(|why| CopyError::Store(Error::integrity(&path, why)))?;
    let pack = parsed
        .packs
        .iter()
        .find(|x| &x.hash == hash)
        .ok_or(CopyError::Damaged("its index lost it".into()))?;
    for (id, off, len, plain) in &pack.blobs {
        if !is_live(cache, id).map_err(CopyError::Store)? {
            continue;
        }
        let blob = &bytes[*off as usize..(*off + *len) as usize];
        if let Some(done) =
            writer.add(store, id, blob, *plain).map_err(|e| CopyError::Store(write_error(&loc, e)))?
        {
            new_packs.push(done);
        }
    }
    Ok(())
}

/// New packs made of copied blobs.
struct PackCopier {
    target: u64,
    buf: Vec<u8>,
    blobs: Vec<IndexBlob>,
}

impl PackCopier {
    fn new(target: u64) -> PackCopier {
        PackCopier { target, buf: Vec::new(), blobs: Vec::new() }
    }

    fn add(
        &mut self,
        store: &Store,
        id: &[u8; 32],
        blob: &[u8],
        plain: u64,
    ) -> std::io::Result<Option<IndexPack>> {
        self.blobs.push(IndexBlob(*id, self.buf.len() as u64, blob.len() as u64, plain));
        self.buf.extend_from_slice(blob);
        if self.buf.len() as u64 >= self.target {
            return self.flush(store);
        }
        Ok(None)
    }

    fn flush(&mut self, store: &Store) -> std::io::Result<Option<IndexPack>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let name = super::sha256_hex(&self.buf);
        put(store.backend(), &format::pack_path(&name), &self.buf)?;
        let entry =
            IndexPack { pack: name, size: self.buf.len() as u64, blobs: std::mem::take(&mut self.blobs) };
        self.buf.clear();
        Ok(Some(entry))
    }
}
