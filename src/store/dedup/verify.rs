//! Verification without any key: what the Pi can prove about the drive on its own.
//!
//! Every pack's SHA-256 equals its name, every index file's SHA-256 its name and its blob
//! ranges lie inside packs of the size it says, every snapshot's tree and refs match its
//! manifest, and every chunk a snapshot's refs name is in the index. What it cannot prove
//! without the identity (that each chunk decrypts to its id, that the tree is what the refs
//! say) is `verify --deep`: reading the snapshot with [`super::read::SnapshotReader`].

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};

use serde::Serialize;

use super::cache::{list_index_names, list_packs, parse_index, Cache};
use super::format;
use super::{read_error, Store};
use crate::error::{Error, Result};
use crate::progress::Progress;

/// What a keyless check of one snapshot covered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotCheck {
    pub chunks: u64,
    pub packs: u64,
    pub pack_bytes: u64,
}

/// Something wrong on the drive: the object (a store path or a snapshot) and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub object: String,
    pub message: String,
}

/// `verify --all`: everything on the drive.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreCheck {
    pub packs: u64,
    pub pack_bytes: u64,
    pub index_files: u64,
    pub snapshots: u64,
    /// Packs no index names: left by an interrupted backup or GC; `prune` removes them.
    pub unindexed_packs: u64,
    pub problems: Vec<Problem>,
}

/// Sizes for status and metrics, from listings only (cheap).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreTotals {
    pub packs: u64,
    pub pack_bytes: u64,
    pub index_files: u64,
    pub index_bytes: u64,
    pub snapshot_files_bytes: u64,
}

impl StoreTotals {
    pub fn bytes(&self) -> u64 {
        self.pack_bytes + self.index_bytes + self.snapshot_files_bytes
    }
}

pub fn totals(store: &Store) -> Result<StoreTotals> {
    let mut t = StoreTotals::default();
    for size in list_packs(store)?.values() {
        t.packs += 1;
        t.pack_bytes += size;
    }
    let loc = store.location();
    for (dir, is_index) in [(format::INDEX_DIR, true), (format::SNAPSHOTS_DIR, false)] {
        for o in store.backend().list(dir).map_err(|e| read_error(&loc, dir, &e))? {
            if is_index {
                t.index_files += 1;
                t.index_bytes += o.size;
            } else {
                t.snapshot_files_bytes += o.size;
            }
        }
    }
    Ok(t)
}

/// Hash a pack and compare with its name and expected size.
pub(crate) fn check_pack(
    store: &Store,
    hash_hex: &str,
    size: u64,
    progress: &dyn Progress,
) -> std::result::Result<(), String> {
    let path = format::pack_path(hash_hex);
    let (r, len) = store.backend().open(&path).map_err(|e| format!("cannot be read ({e})"))?;
    if len != size {
        return Err(format!("is {len} bytes, the index says {size}"));
    }
    let mut h = crate::fsutil::HashingReader::new(r.take(size + 1));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match h.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot be read ({e})")),
        };
        progress.advance(n as u64);
        if progress.cancelled() {
            return Err(crate::progress::Cancelled.to_string());
        }
    }
    let (sha, n) = h.finish();
    if n != size || sha != hash_hex {
        return Err("its SHA-256 differs from its name: damaged".into());
    }
    Ok(())
}

/// `verify SNAPSHOT` without a key: its manifest, tree and refs, every chunk it needs in
/// the index, and every pack holding them hashed. `Err` (integrity, exit 4) names the first
/// problem.
pub fn verify_snapshot(
    store: &Store,
    cache: &mut Cache,
    name: &str,
    progress: &dyn Progress,
) -> Result<SnapshotCheck> {
    let m = store.read_manifest(name)?;
    check_tree_sha(store, name, &m)?;
    let refs = super::read::read_refs(store, name, &m)?;
    cache.sync(store)?;
    let mut packs: HashMap<[u8; 32], u64> = HashMap::new();
    for id in &refs {
        let loc = cache.locate(id)?.ok_or_else(|| {
            Error::integrity(
                name,
                format!("needs chunk {} which no index on the drive holds", hex::encode(id)),
            )
        })?;
        packs.entry(loc.pack).or_insert(0);
    }
    let sizes = list_packs(store)?;
    let mut check = SnapshotCheck { chunks: refs.len() as u64, ..Default::default() };
    progress.start("verifying", packs.keys().filter_map(|p| sizes.get(p)).sum());
    for pack in packs.keys() {
        let hex_name = hex::encode(pack);
        let size =
            *sizes.get(pack).ok_or_else(|| Error::integrity(name, format!("pack {hex_name} is missing")))?;
        // Keyless, this cannot tell which chunk of the pack is damaged, nor see that a later
        // backup stored a damaged one again: `verify --deep` and the drill read the chunks.
        check_pack(store, &hex_name, size, progress).map_err(|why| {
            Error::integrity(
                name,
                format!("pack {hex_name} {why}; `datavault verify --deep {name}` (with the key) tells whether the snapshot still restores, else use another snapshot"),
            )
        })?;
        check.packs += 1;
        check.pack_bytes += size;
    }
    progress.finish();
    Ok(check)
}

fn check_tree_sha(store: &Store, name: &str, m: &format::SnapshotManifest) -> Result<()> {
    let path = format::tree_path(name);
    let (r, len) = store.backend().open(&path).map_err(|e| read_error(&store.location(), &path, &e))?;
    let mut h = crate::fsutil::HashingReader::new(r.take(m.tree.size + 1));
    io::copy(&mut h, &mut io::sink()).map_err(|e| read_error(&store.location(), &path, &e))?;
    let (sha, n) = h.finish();
    if len != m.tree.size || n != m.tree.size || sha != m.tree.sha256 {
        return Err(Error::integrity(
            name,
            "its tree's size or SHA-256 differs from the manifest: damaged; use another snapshot",
        ));
    }
    Ok(())
}

/// `verify --all` without a key: every pack, every index file, every snapshot. Problems are
/// collected, not fatal, so one report lists them all.
pub fn verify_store(store: &Store, cache: &mut Cache, progress: &dyn Progress) -> Result<StoreCheck> {
    let mut out = StoreCheck::default();
    let packs = list_packs(store)?;
    progress.start("verifying", packs.values().sum());
    for (hash, size) in &packs {
        let hex_name = hex::encode(hash);
        if let Err(why) = check_pack(store, &hex_name, *size, progress) {
            out.problems.push(Problem { object: format::pack_path(&hex_name), message: why });
        }
        out.packs += 1;
        out.pack_bytes += size;
    }
    progress.finish();
    let mut indexed: HashSet<[u8; 32]> = HashSet::new();
    for name in list_index_names(store)? {
        out.index_files += 1;
        let path = format::index_path(&name);
        let parsed = store
            .backend()
            .read_small(&path, format::MAX_INDEX_FILE)
            .map_err(|e| e.to_string())
            .and_then(|b| parse_index(&name, &b));
        let parsed = match parsed {
            Ok(p) => p,
            Err(why) => {
                out.problems.push(Problem { object: path, message: why });
                continue;
            }
        };
        for p in &parsed.packs {
            indexed.insert(p.hash);
            match packs.get(&p.hash) {
                Some(s) if *s == p.size => {}
                Some(s) => out.problems.push(Problem {
                    object: path.clone(),
                    message: format!("pack {} is {s} bytes, this index says {}", hex::encode(p.hash), p.size),
                }),
                None => out.problems.push(Problem {
                    object: path.clone(),
                    message: format!("names pack {} which is missing", hex::encode(p.hash)),
                }),
            }
        }
    }
    out.unindexed_packs = packs.keys().filter(|h| !indexed.contains(*h)).count() as u64;
    cache.sync(store)?;
    for l in store.list_snapshots()? {
        if l.manifest.is_none() && l.problem.as_deref().is_some_and(|p| p.starts_with("incomplete")) {
            continue; // an interrupted run's tree: not a snapshot, `prune` removes it
        }
        out.snapshots += 1;
        if let Some(p) = &l.problem {
            out.problems.push(Problem { object: l.name.clone(), message: p.clone() });
            continue;
        }
        if let Err(e) = check_snapshot_refs(store, cache, &l.name) {
            out.problems.push(Problem { object: l.name.clone(), message: integrity_text(&e) });
        }
    }
    Ok(out)
}

fn check_snapshot_refs(store: &Store, cache: &Cache, name: &str) -> Result<()> {
    let m = store.read_manifest(name)?;
    check_tree_sha(store, name, &m)?;
    for id in super::read::read_refs(store, name, &m)? {
        if cache.locate(&id)?.is_none() {
            return Err(Error::integrity(
                name,
                format!("needs chunk {} which no index holds", hex::encode(id)),
            ));
        }
    }
    Ok(())
}

fn integrity_text(e: &Error) -> String {
    match e {
        Error::Integrity { message, .. } => message.clone(),
        other => other.to_string(),
    }
}
