//! Deduplicated snapshots (#9): a backup costs what changed, and the Pi still holds only age
//! *public* keys.
//!
//! Layout under the target (all through [`Backend`], paths relative; docs/format.md is the
//! reference, `scripts/emergency-restore` reads it without datavault):
//!
//! ```text
//! store/config.json                 format, store id, chunker parameters (written once)
//! store/packs/ab/ab12...            packs: concatenated blobs, named by their SHA-256
//! store/index/<sha256>.json         secret-free: pack -> [chunk id, offset, length, plain length]
//! store/snapshots/<stem>.tree       age(zstd(JSON lines)): path -> metadata + chunk ids
//! store/snapshots/<stem>.refs       secret-free: the sorted chunk ids the snapshot needs
//! store/snapshots/<stem>.json       secret-free manifest, written LAST: the snapshot exists
//! ```
//!
//! A blob is `age(zstd(chunk))`, a complete age file whose file key is shared by the blobs
//! of its pack, each with its own random nonce ([`blob`]: one X25519 wrap per pack, not per
//! chunk); a chunk id is the keyed BLAKE3 of the chunk ([`key`]). Packs and index files are durable before the tree, refs and manifest that
//! need them; a kill at any moment leaves at worst unreferenced packs (garbage for [`gc`]).
//!
//! # The API, and where the lead wires it in
//!
//! * **Open**: [`Store::open`] (`None` when the drive has no `store/` yet: only archives) or
//!   [`Store::open_or_create`] (backup). [`Cache::open`] on a file in the state folder
//!   (`<state>/dedup-cache.db`); it only ever saves time, and is rebuilt from the drive when
//!   missing or in doubt. [`load_or_create_chunk_key`] on `<config dir>/chunk.key`.
//! * **backup**: [`write::SnapshotWriter::begin`], then in walk order (sorted, the order
//!   `walkdir::sort_by_file_name` gives: `db/...` < `raw/...` < `uploads/...`):
//!   [`write::SnapshotWriter::add_database`] (inside `snapshot::begin`/`end`, like today),
//!   `add_dir`, `add_symlink`, and for each regular file first
//!   [`write::SnapshotWriter::reuse_unchanged`] (the file cache: no read at all when size,
//!   mtime, ctime and inode match and every chunk is still in the index), else open it
//!   `O_NOFOLLOW|O_NONBLOCK` and call [`write::SnapshotWriter::add_file`] (which reports
//!   `Unreadable` instead of failing, so the walker lists it under `skipped`).
//!   [`write::SnapshotWriter::finish`] takes the secret-free facts only the caller knows
//!   ([`write::SnapshotMeta`]) and returns the [`SnapshotManifest`]. Dropped unfinished, the
//!   writer leaves nothing that looks complete. `WriterOptions::racy_window_ms` is
//!   [`write::RACY_WINDOW_MS`] in production (files changed within a second of the run are
//!   not trusted by their timestamps next time); errors from `add_*` are already classed
//!   (drive full or gone: 3; database unreadable: 5; cancelled: `Failed`).
//! * **list / status / catalog / metrics**: [`Store::list_snapshots`] gives a
//!   [`SnapshotListing`] per stem (manifest or the problem), like `manifest::scan_target`.
//!   Stems are today's (`manifest::archive_stem`), so retention sees archives and snapshots
//!   alike. Sizes for the metrics: `stored_bytes` (what the snapshot needs), `added_bytes`
//!   (what it added), [`verify::StoreTotals`] for the drive.
//! * **verify** (no key): [`verify::verify_snapshot`] (its tree, refs, every chunk it needs
//!   indexed and in range, and every pack holding them hashed) or [`verify::verify_store`]
//!   (`--all`: every pack, index and snapshot).
//! * **verify --deep, drill, restore --to, in-place restore**: [`read::SnapshotReader::open`]
//!   with the identities in an `Arc` (`Arc::new(keys::load_identities(..)?)`: the reader's
//!   read-ahead threads decrypt with them; pass `&*ids` where the archive reader wants
//!   `&Identities`), then `next_entry()` until `None`: each [`read::Entry`] is checked
//!   (path via `archive::entry_path`, order, ancestors are folders, counts) and carries
//!   `parts` (for `archive::join` onto the staging root), `kind`, `meta` (mode, uid, gid,
//!   mtime with nanoseconds), `size`, `target`; for a file, `reader.content()` is a `Read`
//!   of verified bytes (every chunk decrypted, decompressed with a cap, hashed against its
//!   id); map its `io::Error`s with [`read::content_error`] (integrity, or cancelled). The
//!   extractor keeps doing the writing as for archives (`O_EXCL|O_NOFOLLOW`, room checks
//!   with `size`, folder modes last, one `syncfs`); `verify --deep` drains into
//!   `io::sink()`. Only the end of the stream (`None`) proves the whole snapshot: counts,
//!   sizes, refs and the database's SHA-256 against the manifest; until then, staging only.
//!   The pre-restore safety copy is a snapshot like any other (`ArchiveKind::PreRestore`).
//! * **prune**: [`gc::forget`] each snapshot retention drops (manifest first), then
//!   [`gc::plan`] + [`gc::GcPlan::execute`] (`--dry-run` prints the plan: bytes freed,
//!   extra space needed). Only under the run lock, with no writer running.
//!
//! Threads: a writer runs one sealer per core (at most four) and an indexer; a reader runs
//! one read-ahead worker per core (at most four). Both stop when finished or dropped. A new
//! [`Backend`] (S3...) must implement `NewObject::commit_as` (packs are streamed under a
//! temporary name and named by their SHA-256 at the end).
//!
//! Errors are `crate::error::Error`: damaged or hostile store content is `Integrity` (4),
//! a full or vanished drive `TargetNotReady` (3), key files `Key` (2).

pub mod blob;
pub mod cache;
pub mod chunker;
pub mod format;
pub mod gc;
pub mod key;
pub mod order;
pub mod read;
pub mod verify;
pub mod write;

use std::io;
use std::sync::Arc;

use crate::error::{is_disk_full, Error, Result};
use crate::store::backend::{is_drive_gone, Backend};

pub use cache::Cache;
pub use format::{ChunkerParams, SnapshotManifest, StoreConfig};
pub use key::{load_or_create_chunk_key, ChunkId, ChunkKey};

pub type Identities = crate::keys::Identities;

/// An opened store: the backend and its (checked) config.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    config: StoreConfig,
}

/// A snapshot found on the drive, complete or not (like `manifest::Listing`).
#[derive(Debug, Clone)]
pub struct SnapshotListing {
    /// The stem: `backup-20261123T042501.123Z`.
    pub name: String,
    pub manifest: Option<SnapshotManifest>,
    /// Why it cannot be used, if it cannot.
    pub problem: Option<String>,
}

impl SnapshotListing {
    pub fn is_complete(&self) -> bool {
        self.manifest.is_some() && self.problem.is_none()
    }
    pub fn created(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.manifest.as_ref().map(|m| m.created)
    }
}

impl Store {
    /// The store on this drive, or `None` if there is none (a drive with only archives).
    pub fn open(backend: Arc<dyn Backend>) -> Result<Option<Store>> {
        let loc = backend.location();
        let bytes = match backend.read_small(format::CONFIG_PATH, format::MAX_CONFIG) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_error(&loc, format::CONFIG_PATH, &e)),
        };
        let config: StoreConfig = serde_json::from_slice(&bytes).map_err(|e| {
            Error::integrity(
                format::CONFIG_PATH,
                format!("is not valid ({e}); the store on {loc} is damaged"),
            )
        })?;
        check_config(&config).map_err(|m| Error::integrity(format::CONFIG_PATH, m))?;
        Ok(Some(Store { backend, config }))
    }

    /// Open the store, creating `store/config.json` on a drive that has none.
    pub fn open_or_create(backend: Arc<dyn Backend>, chunker: ChunkerParams) -> Result<Store> {
        Store::open_or_create_with(backend, chunker, DEFAULT_PACK_TARGET)
    }

    /// Like [`Store::open_or_create`] with another pack size (tests, benchmarks).
    pub fn open_or_create_with(
        backend: Arc<dyn Backend>,
        chunker: ChunkerParams,
        pack_target: u64,
    ) -> Result<Store> {
        if let Some(s) = Store::open(backend.clone())? {
            return Ok(s);
        }
        chunker.check().map_err(Error::Failed)?;
        let mut id = [0u8; 16];
        key::getrandom_bytes(&mut id);
        let config = StoreConfig {
            format: format::STORE_FORMAT,
            store_id: hex::encode(id),
            created: chrono::Utc::now(),
            chunker,
            pack_target,
        };
        check_config(&config).map_err(Error::Failed)?;
        let mut bytes = serde_json::to_vec_pretty(&config).expect("config serializes");
        bytes.push(b'\n');
        let loc = backend.location();
        let mut obj = backend.create(format::CONFIG_PATH).map_err(|e| write_error(&loc, e))?;
        obj.write_all(&bytes).map_err(|e| write_error(&loc, e))?;
        obj.commit().map_err(|e| write_error(&loc, e))?;
        Ok(Store { backend, config })
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }
    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// Every snapshot, newest first. Reads only manifests and sizes (no key).
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotListing>> {
        let loc = self.location();
        let files = self
            .backend
            .list(format::SNAPSHOTS_DIR)
            .map_err(|e| read_error(&loc, format::SNAPSHOTS_DIR, &e))?;
        let sizes: std::collections::HashMap<&str, u64> =
            files.iter().map(|o| (o.name.as_str(), o.size)).collect();
        let mut stems: Vec<&str> = files
            .iter()
            .filter_map(|o| {
                let n = o.name.as_str();
                n.strip_suffix(format::MANIFEST_SUFFIX).or_else(|| n.strip_suffix(format::TREE_SUFFIX))
            })
            .filter(|s| format::is_snapshot_stem(s))
            .collect();
        stems.sort_unstable();
        stems.dedup();
        let mut out: Vec<SnapshotListing> =
            stems.into_iter().map(|stem| self.listing(stem, &sizes)).collect();
        out.sort_by(|a, b| b.created().cmp(&a.created()).then_with(|| b.name.cmp(&a.name)));
        Ok(out)
    }

    fn listing(&self, stem: &str, sizes: &std::collections::HashMap<&str, u64>) -> SnapshotListing {
        let mut l = SnapshotListing { name: stem.to_string(), manifest: None, problem: None };
        if !sizes.contains_key(format!("{stem}{}", format::MANIFEST_SUFFIX).as_str()) {
            l.problem = Some("incomplete: no manifest (the run that wrote it was interrupted)".into());
            return l;
        }
        let m = match self.read_manifest(stem) {
            Ok(m) => m,
            Err(e) => {
                l.problem = Some(integrity_message(&e));
                return l;
            }
        };
        for (suffix, want) in [(format::TREE_SUFFIX, m.tree.size), (format::REFS_SUFFIX, m.refs.size)] {
            match sizes.get(format!("{stem}{suffix}").as_str()) {
                None => l.problem = Some(format!("its {suffix} file is missing")),
                Some(&got) if got != want => {
                    l.problem = Some(format!(
                        "its {suffix} file is {got} bytes, the manifest says {want} (truncated or damaged)"
                    ))
                }
                Some(_) => {}
            }
        }
        l.manifest = Some(m);
        l
    }

    /// Read and check one snapshot's manifest.
    pub fn read_manifest(&self, stem: &str) -> Result<SnapshotManifest> {
        if !format::is_snapshot_stem(stem) {
            return Err(Error::integrity(stem, "is not a snapshot name"));
        }
        let path = format::manifest_path(stem);
        let bytes = self
            .backend
            .read_small(&path, format::MAX_MANIFEST)
            .map_err(|e| read_error(&self.location(), &path, &e))?;
        let m: SnapshotManifest = serde_json::from_slice(&bytes).map_err(|e| {
            Error::integrity(stem, format!("manifest is not valid ({e}); the file is damaged"))
        })?;
        if m.format > format::STORE_FORMAT {
            return Err(Error::integrity(
                stem,
                format!(
                    "manifest format {} is newer than this datavault understands; upgrade datavault",
                    m.format
                ),
            ));
        }
        if m.snapshot != stem {
            return Err(Error::integrity(
                stem,
                format!("manifest describes another snapshot ({})", m.snapshot),
            ));
        }
        if m.store_id != self.config.store_id {
            return Err(Error::integrity(stem, "manifest belongs to another store (store_id differs)"));
        }
        if !format::is_hex64(&m.tree.sha256) || !format::is_hex64(&m.refs.sha256) {
            return Err(Error::integrity(stem, "manifest has no valid tree/refs SHA-256"));
        }
        let refs_len = 8 + 32 * m.chunks;
        if m.chunks > format::MAX_REFS || m.refs.size != refs_len || m.chunk_refs < m.chunks {
            return Err(Error::integrity(stem, "manifest's chunk counts do not add up"));
        }
        Ok(m)
    }
}

/// Packs close at 4 MiB: few files on the drive (about 100 for the medium bench's first backup,
/// so about 100 X25519 wraps per recipient), each streamed to the drive as it is made.
pub const DEFAULT_PACK_TARGET: u64 = 4 << 20;

fn check_config(c: &StoreConfig) -> std::result::Result<(), String> {
    if c.format > format::STORE_FORMAT {
        return Err(format!(
            "store format {} is newer than this datavault understands; upgrade datavault",
            c.format
        ));
    }
    if c.store_id.len() != 32 || !c.store_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("has no valid store_id".into());
    }
    if !(64 << 10..=64 << 20).contains(&c.pack_target) {
        return Err(format!("pack_target {} is out of range", c.pack_target));
    }
    c.chunker.check()
}

fn integrity_message(e: &Error) -> String {
    match e {
        Error::Integrity { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// An error writing to the store: a full or vanished drive is "target not ready" (3).
pub(crate) fn write_error(location: &str, e: io::Error) -> Error {
    let path = std::path::Path::new(location);
    if is_drive_gone(&e) {
        Error::target(
            path,
            "the drive was unmounted during the run; nothing was made visible; mount it and try again",
        )
    } else if is_disk_full(&e) {
        Error::target(path, "the drive is full; prune old backups or use a bigger drive")
    } else if e.get_ref().is_some_and(|r| r.is::<crate::progress::Cancelled>()) {
        Error::Failed(format!("backup {}", crate::progress::Cancelled))
    } else if crate::store::backend::drive_stopped_answering(&e) {
        Error::target(
            path,
            format!("the drive stopped answering during the run ({e}); nothing was made visible; check the USB cable and mount, then try again"),
        )
    } else {
        Error::io(format!("cannot write the backup store on {location}"), e)
    }
}

/// An error reading a store file: missing, damaged or hostile content is an integrity
/// failure (4) naming the file.
pub(crate) fn read_error(location: &str, path: &str, e: &io::Error) -> Error {
    let what = match e.kind() {
        io::ErrorKind::NotFound => "is missing".to_string(),
        io::ErrorKind::UnexpectedEof => "is truncated".to_string(),
        io::ErrorKind::InvalidData => format!("is damaged or unsafe ({e})"),
        _ => format!("is unreadable ({e})"),
    };
    Error::integrity(path, format!("{what} (store on {location})"))
}

/// SHA-256 in hex of a byte slice.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

use std::io::Write as _;

#[cfg(test)]
mod tests {
    use super::write_error;
    use std::io;

    #[test]
    fn a_drive_that_stops_answering_is_target_not_ready_like_for_archives() {
        // An unplugged USB drive: EIO mid-write, then ENODEV, or EROFS once ext4 gave up
        // (seen on the emulated Pi, #13): exit 3 as for an archive, not 1.
        for errno in [5, 19, 30] {
            let e = write_error("/mnt/datavault", io::Error::from_raw_os_error(errno));
            assert_eq!(e.exit_code(), 3, "errno {errno}: {e}");
        }
        let e = write_error("/mnt/datavault", io::Error::from_raw_os_error(13));
        assert_ne!(e.exit_code(), 3, "EACCES is not a missing drive: {e}");
    }
}
