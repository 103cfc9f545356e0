//! Making a snapshot: the primitives the backup's walker calls, in walk order.
//!
//! The caller's thread reads, cuts chunks, hashes them (keyed BLAKE3), asks the cache whether
//! each is stored already and writes the tree. Sealer threads (`compression.threads`; by
//! default one per core, at most four) each keep a pack of their own open: they compress each
//! new chunk and encrypt it into a blob under that pack's age file key (blob.rs: one X25519
//! wrap per pack and recipient, not per chunk), and write it straight to the pack's temporary
//! file on the drive, hashing as they go; a full pack goes to the indexer thread, which makes
//! it durable under its SHA-256 while the sealer fills its next one, and writes an index file
//! after every 32 packs. Memory is fixed and small: at most 1 MiB of new chunks queued for
//! the sealers, or one bigger chunk alone ([`QUEUE_BYTES`]), and per sealer a batch, its
//! compressed form, a 256 KiB write buffer and the compressor's context, and the indexer's
//! entries for one index file (56 bytes a chunk, at most `format::MAX_INDEX_BLOBS`); no pack
//! is held in memory. What grows with the source is 32 bytes per chunk id referenced
//! (`refs`, `db_refs`).
//!
//! Durability order, the whole crash-safety argument: packs (each fsynced and renamed from
//! its temporary name by the backend, on the indexer's thread) -> the index file naming them -> the tree -> the refs -> the manifest. A
//! kill before the manifest leaves no snapshot, only unreferenced packs, index files and a
//! tree without manifest, which `gc` removes; nothing that existed before is touched.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use chrono::{DateTime, Utc};
use sha2::Digest;

use super::blob::{PackKey, Sealer};
use super::cache::{parse_index, Cache, FileStat, ParsedIndex};
use super::chunker::{read_full, CdcChunker};
use super::format::{
    self, IndexBlob, IndexFile, IndexPack, ObjectRef, SnapshotManifest, TreeEntry, TreeKind, TreeLine,
};
use super::key::{ChunkId, ChunkKey};
use super::order::TreeOrder;
use super::{write_error, Store};
use crate::error::{Error, Result};
use crate::manifest::{
    escape_path, CompressionInfo, DatabaseInfo, EncryptionInfo, Skipped, SourceInfo, TreeInfo,
};
use crate::progress::Progress;
use crate::retention::ArchiveKind;
use crate::store::backend::{Backend, NewObject};

/// A new index file after this many packs: a killed backup loses at most this much work
/// for deduplication (its packs are then unindexed garbage).
const PACKS_PER_INDEX: usize = 32;

/// The metadata of an entry: the walker's and the extractor's type (one definition).
pub use crate::tree::EntryMeta;

/// What the writer needs besides the store.
pub struct WriterOptions {
    pub kind: ArchiveKind,
    pub created: DateTime<Utc>,
    pub recipients: Vec<age::x25519::Recipient>,
    pub chunk_key: ChunkKey,
    /// zstd level (1-19).
    pub level: i32,
    pub progress: Arc<dyn Progress>,
    /// Files changed less than this long before the run began are read again next time
    /// rather than trusted by their timestamps (see `trust_before_ns`); [`RACY_WINDOW_MS`].
    pub racy_window_ms: u64,
    /// Sealer threads (compression, encryption, pack hashing and writes), >= 1.
    pub workers: usize,
}

/// A second: far more than any filesystem clock tick (ext4's coarse clock: 1-10 ms).
pub const RACY_WINDOW_MS: u64 = 1000;

/// The secret-free facts only the caller knows, for the manifest.
#[derive(Debug, Clone)]
pub struct SnapshotMeta {
    pub host: String,
    pub user: String,
    pub trigger: String,
    pub comment: Option<String>,
    pub source: SourceInfo,
    pub uploads: Option<TreeInfo>,
    pub changed_during_backup: Vec<String>,
    pub skipped: Vec<Skipped>,
}

/// What became of a file handed to [`SnapshotWriter::add_file`].
#[derive(Debug)]
pub enum FileOutcome {
    /// In the snapshot. `changed`: it did not end at the expected size (it grew or shrank
    /// while read); what was read is stored.
    Added { size: u64, changed: bool },
    /// A read error: the file is not in the snapshot (the caller lists it as skipped).
    Unreadable(io::Error),
}

enum ToSealer {
    /// New chunks, in order. Small ones (the database's) travel in batches of about
    /// [`SEAL_BATCH`] bytes: one hand-off per chunk kept the caller's thread waiting on the
    /// sealer, and the sealer on the caller, for a third of a second backup's database pass.
    Chunks(Vec<(ChunkId, Vec<u8>)>),
    Finish,
}

/// Bytes of new chunks the caller gathers before handing them to a sealer. A files' chunk
/// (at least 256 KiB) goes alone.
const SEAL_BATCH: usize = 256 << 10;

/// Bytes of new chunks that may wait for a sealer, counted in bytes rather than messages: a
/// queue of one message left a sealer that finished a batch waiting for the caller to cut
/// the next one (and the caller, woken, waiting for a core): 340-380 ms of the two cores idle
/// in a 1.4 s first backup of the bench's medium profile, 235-255 ms with this queue. 2 MiB
/// idled a little less (205-225 ms) for a peak RSS 1 MiB higher. A message bigger than this
/// (a files' chunk can be 2 MiB) waits for an empty queue and goes alone, so memory stays
/// bounded by this, the batch being gathered and each sealer's current batch.
const QUEUE_BYTES: usize = 1 << 20;

/// The bytes in the sealers' queue, shared by the caller (which waits for room before it
/// sends) and the sealers (which make room as they take). `closed` once any sealer has
/// stopped: the caller then stops waiting and finds the sealer's error.
struct QueueRoom {
    state: std::sync::Mutex<(usize, bool)>,
    changed: std::sync::Condvar,
}

impl QueueRoom {
    fn new() -> QueueRoom {
        QueueRoom { state: std::sync::Mutex::new((0, false)), changed: std::sync::Condvar::new() }
    }

    /// Wait until `bytes` more fit (or the queue is empty), then count them. False: a
    /// sealer stopped.
    fn reserve(&self, bytes: usize) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !st.1 && st.0 > 0 && st.0 + bytes > QUEUE_BYTES {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.0 += bytes;
        !st.1
    }

    fn release(&self, bytes: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(bytes);
        self.changed.notify_one();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.changed.notify_all();
    }

    #[cfg(test)]
    fn queued(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

/// Closes the queue's room when its sealer thread ends, however it ends.
struct CloseOnExit(Arc<QueueRoom>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.0.close();
    }
}

enum ToIndexer {
    /// A pack a sealer has finished writing under its temporary name: the indexer makes it
    /// durable under its own (fsync, rename, the folder's fsync), then lists it.
    Pack(Box<dyn crate::store::backend::NewObject>, IndexPack),
    /// A sealer saw `Finish` and closed its last pack: when all have, the indexer writes
    /// the last index file.
    Done,
}

/// An index file the indexer wrote (durably), for the cache.
struct IndexWritten {
    name: String,
    parsed: ParsedIndex,
}

#[derive(Default)]
struct Totals {
    bytes: u64,
    chunks: u64,
}

pub struct SnapshotWriter<'c> {
    store: Store,
    cache: &'c mut Cache,
    key: ChunkKey,
    stem: String,
    kind: ArchiveKind,
    created: DateTime<Utc>,
    progress: Arc<dyn Progress>,
    level: i32,
    recipients: Vec<String>,
    tree: Option<TreeStream>,
    to_sealers: Option<SyncSender<ToSealer>>,
    room: Arc<QueueRoom>,
    /// New chunks not yet handed to a sealer, and their bytes (see [`SEAL_BATCH`]).
    batch: Vec<(ChunkId, Vec<u8>)>,
    batch_bytes: usize,
    from_indexer: Receiver<IndexWritten>,
    sealers: Vec<JoinHandle<io::Result<()>>>,
    indexer: Option<JoinHandle<io::Result<Totals>>>,
    order: TreeOrder,
    /// Every chunk id the uploads reference, repeats included until `finish` sorts them: 32
    /// bytes a chunk (the medium bench: ~2k chunks, 64 KB).
    refs: Vec<ChunkId>,
    /// The database's chunk ids, kept apart from `refs` because they are most of a snapshot's
    /// (a 1 GB database: 131,072 ids, 4 MiB): moved here whole rather than copied, and never
    /// grown, so that the uploads pass does not hold a second copy or a doubled vector
    /// (8 MiB of the large bench's peak heap when they shared `refs`).
    db_refs: Vec<ChunkId>,
    run: i64,
    started: Instant,
    /// Files modified less than a second before the run began are not remembered as
    /// unchanged: their next change could keep the same timestamp (racily clean, as git says).
    trust_before_ns: i64,
    entries: u64,
    files: u64,
    plain_bytes: u64,
    chunk_refs: u64,
    database: Option<DatabaseInfo>,
    in_transaction: bool,
    /// One chunker buffer (the max chunk size) for every file of the run.
    chunker: Option<CdcChunker>,
    /// One tree line, serialised before it goes to the compressor.
    line_buf: Vec<u8>,
}

/// The tree as it is written: JSON lines -> zstd -> age -> SHA-256 -> the store.
type TreeStream = zstd::stream::write::Encoder<
    'static,
    age::stream::StreamWriter<crate::fsutil::HashingWriter<Box<dyn NewObject>>>,
>;

impl<'c> SnapshotWriter<'c> {
    /// Start a snapshot named after `opts.created` (`backup-...`, `-2` if taken).
    pub fn begin(store: &Store, cache: &'c mut Cache, opts: WriterOptions) -> Result<SnapshotWriter<'c>> {
        let loc = store.location();
        cache.sync(store)?;
        let run = cache.begin_run(&opts.chunk_key.fingerprint())?;
        let stem = unique_stem(store, opts.kind, opts.created)?;
        let tree = open_tree(store.backend(), &store.config().store_id, &stem, &opts)?;
        let room = Arc::new(QueueRoom::new());
        let (to_sealers, sealers, from_indexer, handle) =
            start_threads(store, &opts, &room).map_err(|e| write_error(&loc, e))?;
        cache.conn.execute_batch("BEGIN").map_err(|e| Error::sqlite("cache", e))?;
        let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        Ok(SnapshotWriter {
            store: store.clone(),
            cache,
            key: opts.chunk_key,
            stem,
            kind: opts.kind,
            created: opts.created,
            progress: opts.progress,
            level: opts.level,
            recipients: opts.recipients.iter().map(|r| r.to_string()).collect(),
            tree: Some(tree),
            to_sealers: Some(to_sealers),
            room,
            batch: Vec::new(),
            batch_bytes: 0,
            from_indexer,
            sealers,
            indexer: Some(handle),
            order: TreeOrder::default(),
            refs: Vec::new(),
            db_refs: Vec::new(),
            run,
            started: Instant::now(),
            trust_before_ns: now_ns.saturating_sub(opts.racy_window_ms.saturating_mul(1_000_000) as i64),
            entries: 0,
            files: 0,
            plain_bytes: 0,
            chunk_refs: 0,
            database: None,
            in_transaction: true,
            chunker: None,
            line_buf: Vec::new(),
        })
    }

    /// The snapshot's name (stem).
    pub fn name(&self) -> &str {
        &self.stem
    }

    pub fn add_dir(&mut self, rel: &[u8], meta: &EntryMeta) -> Result<()> {
        let parts = self.place(rel, TreeKind::Dir)?;
        self.entry_line(&parts, TreeKind::Dir, meta, 0, None, &[])
    }

    pub fn add_symlink(&mut self, rel: &[u8], meta: &EntryMeta, target: &[u8]) -> Result<()> {
        if target.is_empty() || target.contains(&0) {
            return Err(Error::Failed(format!("symlink {} has an invalid target", escape_path(rel))));
        }
        let parts = self.place(rel, TreeKind::Symlink)?;
        self.files += 1;
        self.entry_line(&parts, TreeKind::Symlink, meta, 0, Some(target), &[])
    }

    /// The file cache: if `rel` is known with this exact `stat` and all its chunks are
    /// still stored, add it without reading it and return its size. `None`: read it with
    /// [`SnapshotWriter::add_file`].
    pub fn reuse_unchanged(&mut self, rel: &[u8], meta: &EntryMeta, stat: &FileStat) -> Result<Option<u64>> {
        let Some(ids) = self.cache.unchanged_file(rel, stat)? else { return Ok(None) };
        let size = stat.size;
        // Every chunk still stored, and their sizes add up to the file's.
        let mut sum = 0u64;
        for id in &ids {
            sum = sum.saturating_add(self.cache.locate(id)?.map_or(u64::MAX, |l| l.plain));
        }
        if sum != size {
            return Ok(None);
        }
        let parts = self.place(rel, TreeKind::File)?;
        self.cache.touch_file(rel, self.run)?;
        self.progress.advance(size);
        self.chunk_refs += ids.len() as u64;
        self.refs.extend_from_slice(&ids);
        self.files += 1;
        self.plain_bytes += size;
        self.entry_line(&parts, TreeKind::File, meta, size, None, &ids)?;
        Ok(Some(size))
    }

    /// Read `reader` (at most `expected_size` bytes, then one more to see whether it grew),
    /// chunk it, store new chunks and add the file. With `stat` (taken before reading), an
    /// unchanged read is remembered in the file cache.
    pub fn add_file(
        &mut self,
        rel: &[u8],
        meta: &EntryMeta,
        stat: Option<&FileStat>,
        reader: &mut dyn Read,
        expected_size: u64,
    ) -> Result<FileOutcome> {
        let parts = self.place_check(rel, TreeKind::File)?;
        let progress = self.progress.clone();
        let mut limited = crate::progress::ProgressReader {
            inner: (&mut *reader).take(expected_size),
            progress: &*progress,
        };
        let read = if expected_size <= u64::from(self.store.config().chunker.files_min) {
            self.store_whole(&mut limited, expected_size)?
        } else {
            self.store_streamed(&mut limited)?
        };
        let (size, ids) = match read {
            Ok(read) => read,
            Err(e) if is_cancel(&e) => return Err(write_error(&self.store.location(), e)),
            Err(e) => return Ok(FileOutcome::Unreadable(e)),
        };
        let grew = match reader.read(&mut [0u8; 1]) {
            Ok(n) => n > 0,
            Err(_) => false,
        };
        let changed = grew || size != expected_size;
        self.order
            .next(&parts, TreeKind::File)
            .map_err(|e| Error::Failed(format!("snapshot writer: {e}")))?;
        self.chunk_refs += ids.len() as u64;
        self.refs.extend_from_slice(&ids);
        self.files += 1;
        self.plain_bytes += size;
        self.entry_line(&parts, TreeKind::File, meta, size, None, &ids)?;
        if let Some(st) = stat.filter(|s| !changed && s.size == size) {
            if st.mtime_ns.max(st.ctime_ns) < self.trust_before_ns {
                self.cache.record_file(rel, st, &ids, self.run)?;
            }
        }
        Ok(FileOutcome::Added { size, changed })
    }

    /// A file no bigger than the smallest chunk (`files_min`), read straight into a buffer of
    /// its own size: it is one chunk, and goes to a sealer as it is, where the chunker's
    /// buffer needed a copy (copies were the caller's thread's costliest step; on the medium
    /// bench 2,589 of the 3,000 uploads, 40 % of their bytes). Read whole up to `files_max`,
    /// the files cut in two held a second buffer while cut: peak RSS +2 MiB, for no more
    /// gain. Outer error: the store's; inner: the file's (it is then skipped). Returns the
    /// bytes read and the chunks' ids.
    fn store_whole(
        &mut self,
        r: &mut dyn Read,
        expected_size: u64,
    ) -> Result<io::Result<(u64, Vec<ChunkId>)>> {
        let mut data = Vec::with_capacity(expected_size as usize);
        if let Err(e) = r.read_to_end(&mut data) {
            return Ok(Err(e));
        }
        // No bigger than the smallest chunk: the chunker would cut it whole (its test).
        let size = data.len() as u64;
        let mut ids = Vec::with_capacity(1);
        if !data.is_empty() {
            let id = self.key.id(&data);
            ids.push(id);
            if !self.is_known(&id)? {
                self.send_new(id, data)?;
            }
        }
        Ok(Ok((size, ids)))
    }

    /// A bigger file, through the chunker's one buffer (the largest chunk's size) for every
    /// file of the run. Errors as for [`SnapshotWriter::store_whole`].
    fn store_streamed(&mut self, r: &mut dyn Read) -> Result<io::Result<(u64, Vec<ChunkId>)>> {
        let mut chunker =
            self.chunker.take().unwrap_or_else(|| CdcChunker::new(&self.store.config().chunker));
        chunker.reset();
        let (mut size, mut ids) = (0u64, Vec::new());
        let res = loop {
            let chunk = match chunker.next_chunk(r) {
                Ok(Some(c)) => c,
                Ok(None) => break Ok(Ok((size, ids))),
                Err(e) => break Ok(Err(e)),
            };
            size += chunk.len() as u64;
            let id = self.key.id(chunk);
            ids.push(id);
            if let Err(e) = self.store_chunk_ref(id, chunk) {
                break Err(e);
            }
        };
        self.chunker = Some(chunker);
        res
    }

    /// Stream the snapshot begun by `snapshot::begin` into `db/<file name>`, cut in fixed
    /// page-aligned chunks. Call it first (the read transaction is then shortest).
    pub fn add_database(
        &mut self,
        conn: &rusqlite::Connection,
        db_path: &Path,
        info: &crate::snapshot::SnapshotInfo,
        taken_at: DateTime<Utc>,
    ) -> Result<DatabaseInfo> {
        use std::os::unix::ffi::OsStrExt;
        let name = db_path.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_else(|| b"app.db".to_vec());
        let mut rel = b"db/".to_vec();
        rel.extend_from_slice(&name);
        let fs_meta = std::fs::metadata(db_path)
            .map_err(|e| Error::source(db_path, format!("cannot read the database: {e}")))?;
        let mut meta = EntryMeta::from_metadata(&fs_meta);
        meta.mtime = taken_at.timestamp();
        meta.mtime_ns = taken_at.timestamp_subsec_nanos().min(999_999_999);
        let parts = self.place_check(&rel, TreeKind::File)?;
        let chunk_size = self.store.config().chunker.database_fixed as usize;
        let progress = self.progress.clone();
        // Sized once: a vector grown by doubling to 4 MiB leaves its smaller copies behind as
        // holes in the heap.
        let mut ids =
            Vec::with_capacity(usize::try_from(info.size() / chunk_size.max(1) as u64).unwrap_or(0) + 1);
        let mut sha = BackgroundSha::start();
        let mut size = 0u64;
        // One buffer for every chunk: most are stored already (a second backup), and a new
        // one is copied when it is queued for the sealers.
        let mut buf = vec![0u8; chunk_size];
        crate::snapshot::stream_pages(conn, db_path, info, |pages| {
            loop {
                let n = read_full(pages, &mut buf).map_err(|e| page_error(db_path, e))?;
                if n == 0 {
                    break;
                }
                let chunk = &buf[..n];
                if progress.cancelled() {
                    return Err(Error::Failed(format!("backup {}", crate::progress::Cancelled)));
                }
                progress.advance(n as u64);
                sha.update(chunk);
                size += n as u64;
                let id = self.key.id(chunk);
                ids.push(id);
                self.store_chunk_ref(id, chunk)?;
            }
            Ok(())
        })?;
        let db_sha = sha.finish()?;
        if size != info.size() {
            return Err(Error::source(
                db_path,
                format!("snapshot gave {size} bytes, expected {}", info.size()),
            ));
        }
        self.order
            .next(&parts, TreeKind::File)
            .map_err(|e| Error::Failed(format!("snapshot writer: {e}")))?;
        self.chunk_refs += ids.len() as u64;
        self.files += 1;
        self.plain_bytes += size;
        self.entry_line(&parts, TreeKind::File, &meta, size, None, &ids)?;
        if self.db_refs.is_empty() {
            self.db_refs = ids;
        } else {
            self.db_refs.extend_from_slice(&ids);
        }
        let db = DatabaseInfo {
            entry: escape_path(&rel),
            size,
            sha256: db_sha,
            page_size: info.page_size,
            page_count: info.page_count,
            schema_version: info.schema_version,
            user_version: info.user_version,
            journal_mode: info.journal_mode.clone(),
            method: "dbpage".into(),
            damaged: None,
        };
        self.database = Some(db.clone());
        Ok(db)
    }

    /// The database just added failed `PRAGMA quick_check`: said in the manifest
    /// ([`DatabaseInfo::damaged`]).
    pub fn note_database_damage(&mut self, why: &str) {
        if let Some(d) = self.database.as_mut() {
            d.damaged = Some(why.to_string());
        }
    }

    /// Check a path, add the folders it needs that the walker did not give, and take its
    /// place in the order.
    fn place(&mut self, rel: &[u8], kind: TreeKind) -> Result<Vec<Vec<u8>>> {
        let parts = self.place_check(rel, kind)?;
        self.order.next(&parts, kind).map_err(|e| Error::Failed(format!("snapshot writer: {e}")))?;
        Ok(parts)
    }

    /// Like `place` for entries whose line is written after their content: the order is
    /// taken once the content is in (a file that turns out unreadable takes no place).
    fn place_check(&mut self, rel: &[u8], kind: TreeKind) -> Result<Vec<Vec<u8>>> {
        let parts = crate::archive::entry_path(rel)
            .map_err(|e| Error::Failed(format!("snapshot writer: refused path: {e}")))?;
        for anc in self.order.missing_ancestors(&parts) {
            log::warn!("{}: folder not given by the walk; recorded as 0700", escape_path(&anc.join(&b'/')));
            let meta = EntryMeta { mode: 0o700, uid: 0, gid: 0, mtime: 0, mtime_ns: 0 };
            self.order
                .next(&anc, TreeKind::Dir)
                .map_err(|e| Error::Failed(format!("snapshot writer: {e}")))?;
            self.entry_line(&anc, TreeKind::Dir, &meta, 0, None, &[])?;
        }
        // Check without taking the place yet: a probe on a copy (a path and a few folders).
        self.order.clone().next(&parts, kind).map_err(|e| Error::Failed(format!("snapshot writer: {e}")))?;
        Ok(parts)
    }

    /// Queue a chunk for the sealers unless the store (or this run) has it already; it is
    /// copied only when it is new.
    fn store_chunk_ref(&mut self, id: ChunkId, data: &[u8]) -> Result<()> {
        if self.is_known(&id)? {
            return Ok(());
        }
        self.send_new(id, data.to_vec())
    }

    fn is_known(&mut self, id: &ChunkId) -> Result<bool> {
        self.drain_index_messages()?;
        Ok(self.cache.is_stored(id)? || self.cache.is_pending(id)?)
    }

    fn send_new(&mut self, id: ChunkId, data: Vec<u8>) -> Result<()> {
        self.cache.add_pending(&id)?;
        self.batch_bytes += data.len();
        self.batch.push((id, data));
        if self.batch_bytes >= SEAL_BATCH {
            self.flush_batch()?;
        }
        Ok(())
    }

    /// Hand the gathered new chunks to a sealer.
    fn flush_batch(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let bytes = std::mem::take(&mut self.batch_bytes);
        let sent = self.room.reserve(bytes)
            && self.to_sealers.as_ref().is_some_and(|tx| tx.send(ToSealer::Chunks(batch)).is_ok());
        if !sent {
            return Err(self.thread_error());
        }
        Ok(())
    }

    fn drain_index_messages(&mut self) -> Result<()> {
        loop {
            match self.from_indexer.try_recv() {
                Ok(w) => self.take_index(w)?,
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return Ok(()),
            }
        }
    }

    fn take_index(&mut self, w: IndexWritten) -> Result<()> {
        self.cache.load_index(&w.name, &w.parsed, None)
    }

    /// A sealer or the indexer stopped: the first error says why.
    fn thread_error(&mut self) -> Error {
        self.to_sealers = None;
        let loc = self.store.location();
        for h in self.sealers.drain(..) {
            match h.join() {
                Ok(Err(e)) if !is_indexer_stopped(&e) => return write_error(&loc, e),
                Err(_) => return Error::Failed("a sealer thread panicked".into()),
                Ok(_) => {}
            }
        }
        match self.indexer.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => write_error(&loc, e),
            Some(Err(_)) => Error::Failed("the indexer thread panicked".into()),
            _ => Error::Failed("the indexer thread stopped".into()),
        }
    }

    fn entry_line(
        &mut self,
        parts: &[Vec<u8>],
        kind: TreeKind,
        meta: &EntryMeta,
        size: u64,
        target: Option<&[u8]>,
        ids: &[ChunkId],
    ) -> Result<()> {
        let entry = TreeEntry {
            path: escape_path(&parts.join(&b'/')),
            kind,
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime,
            mtime_ns: meta.mtime_ns,
            size,
            target: target.map(escape_path),
            chunks: ids.iter().take(format::MAX_LINE_CHUNKS).map(hex::encode).collect(),
            nchunks: ids.len() as u64,
        };
        self.entries += 1;
        self.tree_line(&TreeLine::Entry(entry))?;
        for more in ids.chunks(format::MAX_LINE_CHUNKS).skip(1) {
            self.tree_line(&TreeLine::More { chunks: more.iter().map(hex::encode).collect() })?;
        }
        Ok(())
    }

    fn tree_line(&mut self, line: &TreeLine) -> Result<()> {
        let loc = self.store.location();
        // Whole lines into zstd: serde_json writes token by token, and each small write was
        // a trip through the compressor (15 % of a second backup's caller thread).
        let mut buf = std::mem::take(&mut self.line_buf);
        buf.clear();
        serde_json::to_writer(&mut buf, line).map_err(|e| write_error(&loc, e.into()))?;
        buf.push(b'\n');
        let tree = self.tree.as_mut().expect("open until finish");
        let written = tree.write_all(&buf);
        self.line_buf = buf;
        written.map_err(|e| write_error(&loc, e))
    }

    /// Make everything durable in order (packs, index, tree, refs) and then the manifest,
    /// which makes the snapshot exist.
    pub fn finish(mut self, meta: SnapshotMeta) -> Result<SnapshotManifest> {
        let loc = self.store.location();
        let totals = self.stop_threads()?;
        self.tree_line(&TreeLine::End {
            entries: self.entries,
            chunk_refs: self.chunk_refs,
            bytes: self.plain_bytes,
        })?;
        let tree = self.tree.take().expect("open until finish");
        let (tree_obj, tree_sha, tree_size) = finish_tree(tree).map_err(|e| write_error(&loc, e))?;
        tree_obj.commit().map_err(|e| write_error(&loc, e))?;
        let mut refs = std::mem::take(&mut self.db_refs);
        // Exactly: the uploads' ids once, not a doubling of the database's 4 MiB.
        refs.reserve_exact(self.refs.len());
        refs.extend_from_slice(&std::mem::take(&mut self.refs));
        refs.sort_unstable();
        refs.dedup();
        let stored_bytes = self.cache.stored_length(&refs)?.map_err(|id| {
            Error::Failed(format!(
                "snapshot writer: chunk {} was never stored (internal error)",
                hex::encode(id)
            ))
        })?;
        let refs_bytes = format::encode_refs(&refs);
        put(self.store.backend(), &format::refs_path(&self.stem), &refs_bytes)
            .map_err(|e| write_error(&loc, e))?;
        let manifest = SnapshotManifest {
            format: format::STORE_FORMAT,
            tool: "datavault".into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            kind: self.kind,
            snapshot: self.stem.clone(),
            store_id: self.store.config().store_id.clone(),
            created: self.created,
            host: meta.host,
            user: meta.user,
            trigger: meta.trigger,
            comment: meta.comment,
            source: meta.source,
            database: self.database.take(),
            uploads: meta.uploads,
            files: self.files,
            plain_bytes: self.plain_bytes,
            entries: self.entries,
            chunk_refs: self.chunk_refs,
            chunks: refs.len() as u64,
            stored_bytes,
            added_bytes: totals.bytes + tree_size + refs_bytes.len() as u64,
            added_chunks: totals.chunks,
            tree: ObjectRef { size: tree_size, sha256: tree_sha },
            refs: ObjectRef { size: refs_bytes.len() as u64, sha256: super::sha256_hex(&refs_bytes) },
            compression: CompressionInfo { algorithm: "zstd".into(), level: self.level },
            encryption: EncryptionInfo {
                algorithm: "age-x25519".into(),
                recipients: self.recipients.clone(),
            },
            duration_ms: self.started.elapsed().as_millis() as u64,
            changed_during_backup: meta.changed_during_backup,
            skipped: meta.skipped,
        };
        put(self.store.backend(), &format::manifest_path(&self.stem), &manifest.to_json())
            .map_err(|e| write_error(&loc, e))?;
        self.cache.end_run(self.run)?;
        self.in_transaction = false;
        self.cache.conn.execute_batch("COMMIT").map_err(|e| Error::sqlite("cache", e))?;
        Ok(manifest)
    }

    fn stop_threads(&mut self) -> Result<Totals> {
        self.flush_batch()?;
        let mut sent = true;
        if let Some(tx) = self.to_sealers.as_ref() {
            for _ in 0..self.sealers.len() {
                sent &= tx.send(ToSealer::Finish).is_ok();
            }
        }
        if !sent {
            return Err(self.thread_error());
        }
        self.to_sealers = None;
        let loc = self.store.location();
        for h in self.sealers.drain(..) {
            match h.join() {
                Ok(Ok(())) => {}
                // The indexer's own error, below, says why it stopped.
                Ok(Err(e)) if is_indexer_stopped(&e) => {}
                Ok(Err(e)) => return Err(write_error(&loc, e)),
                Err(_) => return Err(Error::Failed("a sealer thread panicked".into())),
            }
        }
        let joined = self.indexer.take().map(|h| h.join());
        let totals = match joined {
            Some(Ok(Ok(t))) => t,
            Some(Ok(Err(e))) => return Err(write_error(&loc, e)),
            Some(Err(_)) => return Err(Error::Failed("the indexer thread panicked".into())),
            _ => return Err(Error::Failed("the indexer thread stopped".into())),
        };
        while let Ok(w) = self.from_indexer.try_recv() {
            self.take_index(w)?;
        }
        Ok(totals)
    }
}

impl Drop for SnapshotWriter<'_> {
    fn drop(&mut self) {
        // Unfinished: the sealers drop their open packs, the indexer writes no more index, the tree's partial
        // file goes, and the cache forgets this run's pending chunks.
        self.to_sealers = None;
        for h in self.sealers.drain(..) {
            let _ = h.join();
        }
        if let Some(h) = self.indexer.take() {
            let _ = h.join();
        }
        if self.in_transaction {
            let _ = self.cache.conn.execute_batch("ROLLBACK");
        }
    }
}

/// The database's SHA-256 (for the manifest) on a thread of its own, fed in 1 MiB batches:
/// on the caller's thread it was the costliest step of a second backup (which reads the
/// whole database but stores little of it). At most three batches exist; without a thread,
/// it hashes inline.
struct BackgroundSha {
    batch: Vec<u8>,
    worker: Option<ShaWorker>,
    inline: Option<sha2::Sha256>,
}

/// The hashing thread: full batches go out on `tx`, emptied ones come back on `back`.
struct ShaWorker {
    tx: SyncSender<Vec<u8>>,
    back: Receiver<Vec<u8>>,
    handle: JoinHandle<sha2::Sha256>,
}

const SHA_BATCH: usize = 1 << 20;

impl BackgroundSha {
    fn start() -> BackgroundSha {
        let (tx, rx) = sync_channel::<Vec<u8>>(1);
        let (back_tx, back) = sync_channel::<Vec<u8>>(2);
        let spawned = std::thread::Builder::new().name("datavault-sha".into()).spawn(move || {
            let mut sha = sha2::Sha256::new();
            for mut batch in rx {
                sha.update(&batch);
                batch.clear();
                let _ = back_tx.try_send(batch);
            }
            sha
        });
        match spawned {
            Ok(h) => BackgroundSha {
                batch: Vec::with_capacity(SHA_BATCH),
                worker: Some(ShaWorker { tx, back, handle: h }),
                inline: None,
            },
            Err(_) => BackgroundSha { batch: Vec::new(), worker: None, inline: Some(sha2::Sha256::new()) },
        }
    }

    fn update(&mut self, data: &[u8]) {
        if let Some(sha) = self.inline.as_mut() {
            return sha.update(data);
        }
        self.batch.extend_from_slice(data);
        if self.batch.len() < SHA_BATCH {
            return;
        }
        let Some(ShaWorker { tx, back, .. }) = self.worker.as_ref() else { return };
        let fresh = back.try_recv().unwrap_or_else(|_| Vec::with_capacity(SHA_BATCH));
        let full = std::mem::replace(&mut self.batch, fresh);
        // A thread gone (it cannot fail) is found by `finish`.
        let _ = tx.send(full);
    }

    fn finish(mut self) -> Result<String> {
        if let Some(sha) = self.inline.take() {
            return Ok(hex::encode(sha.finalize()));
        }
        let ShaWorker { tx, handle, .. } = self.worker.take().expect("a thread or inline");
        let sent = tx.send(std::mem::take(&mut self.batch)).is_ok();
        drop(tx);
        match handle.join() {
            // Every batch went to the thread (a send fails only once it is gone).
            Ok(sha) if sent => Ok(hex::encode(sha.finalize())),
            _ => Err(Error::Failed("the database's hashing thread stopped".into())),
        }
    }
}

fn is_cancel(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<crate::progress::Cancelled>())
}

fn page_error(db_path: &Path, e: io::Error) -> Error {
    match e.get_ref().and_then(|r| r.downcast_ref::<crate::snapshot::PageReadError>()) {
        Some(p) => Error::source(db_path, p.to_string()),
        None => Error::source(db_path, format!("reading the database: {e}")),
    }
}

/// `backup-<time>`, or `-2`, `-3`... when a snapshot (or an archive) already has that name.
fn unique_stem(store: &Store, kind: ArchiveKind, created: DateTime<Utc>) -> Result<String> {
    let base = crate::store::archive_stem(kind, created);
    let loc = store.location();
    let taken = |stem: &str| -> Result<bool> {
        for p in [
            format::manifest_path(stem),
            format::tree_path(stem),
            format!("{stem}{}", crate::store::MANIFEST_SUFFIX),
        ] {
            if store.backend().size(&p).map_err(|e| super::read_error(&loc, &p, &e))?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if !taken(&base)? {
        return Ok(base);
    }
    for n in 2..1000 {
        let s = format!("{base}-{n}");
        if !taken(&s)? {
            return Ok(s);
        }
    }
    Err(Error::Failed(format!("no free snapshot name near {base}")))
}

/// The tree's zstd level, whatever the configured one: a tree is mostly hex chunk ids,
/// which compress to their entropy at any level; level 1 does it fastest (measured on a
/// 1.7 MB tree: 608 KB at 408 MB/s, against 639 KB at 176 MB/s for level 3), and the tree
/// is written on the caller's thread, the one a second backup waits for.
const TREE_LEVEL: i32 = 1;

fn open_tree(backend: &dyn Backend, store_id: &str, stem: &str, opts: &WriterOptions) -> Result<TreeStream> {
    let loc = backend.location();
    let obj = backend.create(&format::tree_path(stem)).map_err(|e| write_error(&loc, e))?;
    let hashed = crate::fsutil::HashingWriter::new(obj);
    let enc = age::Encryptor::with_recipients(opts.recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| Error::Failed(format!("cannot set up encryption: {e}")))?;
    let age_w = enc.wrap_output(hashed).map_err(|e| write_error(&loc, e))?;
    let mut tree = zstd::stream::write::Encoder::new(age_w, TREE_LEVEL).map_err(|e| write_error(&loc, e))?;
    tree.include_checksum(true).map_err(|e| write_error(&loc, e))?;
    let header = TreeLine::Header {
        format: format::STORE_FORMAT,
        snapshot: stem.to_string(),
        store_id: store_id.to_string(),
        chunk_key: opts.chunk_key.to_hex(),
    };
    serde_json::to_writer(&mut tree, &header).map_err(|e| write_error(&loc, e.into()))?;
    tree.write_all(b"\n").map_err(|e| write_error(&loc, e))?;
    Ok(tree)
}

fn finish_tree(tree: TreeStream) -> io::Result<(Box<dyn NewObject>, String, u64)> {
    let age_w = tree.finish()?;
    let hashed = age_w.finish()?;
    Ok(hashed.finish())
}

/// Write a small file and commit it.
pub(crate) fn put(backend: &dyn Backend, path: &str, bytes: &[u8]) -> io::Result<()> {
    let mut obj = backend.create(path)?;
    obj.write_all(bytes)?;
    obj.commit()
}

// ---- the sealer and indexer threads ------------------------------------------------------------

type Threads = (
    SyncSender<ToSealer>,
    Vec<JoinHandle<io::Result<()>>>,
    Receiver<IndexWritten>,
    JoinHandle<io::Result<Totals>>,
);

/// `opts.workers` sealers (by default one per core, at most four: beyond that the caller's
/// thread, which reads, cuts and hashes, is the limit), each with a pack of its own, and
/// the indexer.
fn start_threads(store: &Store, opts: &WriterOptions, room: &Arc<QueueRoom>) -> io::Result<Threads> {
    let workers = opts.workers.max(1);
    // Room for every batch the byte budget lets in, and the `Finish` of each sealer.
    let (to_sealers, rx) = sync_channel::<ToSealer>(QUEUE_BYTES / SEAL_BATCH + workers);
    let rx = Arc::new(std::sync::Mutex::new(rx));
    let (packs_tx, packs_rx) = sync_channel::<ToIndexer>(PACKS_AWAITING_COMMIT);
    let mut sealers = Vec::with_capacity(workers);
    for i in 0..workers {
        let worker = PackSealer {
            store: store.clone(),
            recipients: opts.recipients.clone(),
            target: store.config().pack_target,
            sealer: Sealer::new(opts.level)?,
            open: None,
            to_indexer: packs_tx.clone(),
        };
        let rx = rx.clone();
        let room = room.clone();
        sealers.push(std::thread::Builder::new().name(format!("datavault-sealer-{i}")).spawn(move || {
            let _close = CloseOnExit(room.clone());
            worker.run(&rx, &room)
        })?);
    }
    drop(packs_tx);
    let (index_tx, from_indexer) = sync_channel::<IndexWritten>(64);
    let indexer = Indexer { store: store.clone(), index_tx };
    let handle = std::thread::Builder::new()
        .name("datavault-indexer".into())
        .spawn(move || indexer.run(packs_rx, workers))?;
    Ok((to_sealers, sealers, from_indexer, handle))
}

/// A pack being written: straight to the drive under a temporary name, hashed on the way
/// (its SHA-256 is its name, known only at the end), so no pack is ever held in memory.
struct OpenPack {
    key: PackKey,
    out: crate::fsutil::HashingWriter<io::BufWriter<Box<dyn NewObject>>>,
    len: u64,
    blobs: Vec<IndexBlob>,
}

/// A sealer thread: compresses and encrypts chunks into blobs of its own open pack, under
/// that pack's file key (one X25519 wrap per recipient and pack: blob.rs), and closes the
/// pack at the target size. Packs fill in parallel, so their blobs are in no global order.
struct PackSealer {
    store: Store,
    recipients: Vec<age::x25519::Recipient>,
    target: u64,
    sealer: Sealer,
    open: Option<OpenPack>,
    to_indexer: SyncSender<ToIndexer>,
}

/// A pack closes before it holds this many blobs, so an index file never needs more than
/// [`format::MAX_INDEX_BLOBS`] for [`PACKS_PER_INDEX`] packs... or closes early (indexer).
const MAX_PACK_BLOBS: usize = format::MAX_INDEX_BLOBS / 4;

impl PackSealer {
    fn run(mut self, rx: &std::sync::Mutex<Receiver<ToSealer>>, room: &QueueRoom) -> io::Result<()> {
        loop {
            let msg = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
            match msg {
                Ok(ToSealer::Chunks(batch)) => {
                    room.release(batch.iter().map(|(_, d)| d.len()).sum());
                    for (id, data) in batch {
                        self.add(&id, &data)?;
                        drop(data);
                        let full = self
                            .open
                            .as_ref()
                            .is_some_and(|p| p.len >= self.target || p.blobs.len() >= MAX_PACK_BLOBS);
                        if full {
                            self.close_pack()?;
                        }
                    }
                }
                Ok(ToSealer::Finish) => {
                    self.close_pack()?;
                    let _ = self.to_indexer.send(ToIndexer::Done);
                    return Ok(());
                }
                // The writer was dropped unfinished: the open pack's partial file goes.
                Err(_) => return Ok(()),
            }
        }
    }

    fn add(&mut self, id: &ChunkId, data: &[u8]) -> io::Result<()> {
        if self.open.is_none() {
            let mut tmp = [0u8; 16];
            super::key::getrandom_bytes(&mut tmp);
            let obj = self.store.backend().create(&format::pack_tmp_path(&hex::encode(tmp)))?;
            self.open = Some(OpenPack {
                key: PackKey::new(&self.recipients)?,
                out: crate::fsutil::HashingWriter::new(io::BufWriter::with_capacity(PACK_WRITE_BUF, obj)),
                len: 0,
                blobs: Vec::new(),
            });
        }
        let p = self.open.as_mut().expect("opened above");
        let len = self.sealer.seal_into(&p.key, data, &mut p.out)?;
        p.blobs.push(IndexBlob(*id, p.len, len, data.len() as u64));
        p.len += len;
        Ok(())
    }

    /// Hand the open pack to the indexer, which makes it durable under its name while this
    /// sealer fills its next one: on a drive where a pack's fsync takes a while, a sealer
    /// that waited for it sat idle (2026-12-05: two sealers kept 0.85 of the two cores busy
    /// during the uploads, where the data compresses least and packs fill fastest).
    fn close_pack(&mut self) -> io::Result<()> {
        let Some(p) = self.open.take() else { return Ok(()) };
        let (buffered, name, size) = p.out.finish();
        debug_assert_eq!(size, p.len);
        let obj = buffered.into_inner().map_err(|e| e.into_error())?;
        let pack = IndexPack { pack: name, size, blobs: p.blobs };
        // No indexer: it failed (and has the error) or the writer was dropped. The pack's
        // temporary file goes with the message.
        self.to_indexer.send(ToIndexer::Pack(obj, pack)).map_err(|_| io::Error::other(IndexerStopped))
    }
}

/// Writes go to the drive in pieces this big (the backend's own writes are unbuffered).
const PACK_WRITE_BUF: usize = 256 << 10;

/// A sealer's error when the indexer is gone: the indexer's own error says why.
#[derive(Debug)]
struct IndexerStopped;

impl std::fmt::Display for IndexerStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the indexer stopped")
    }
}
impl std::error::Error for IndexerStopped {}

fn is_indexer_stopped(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<IndexerStopped>())
}

/// Packs written but not yet durable, waiting for the indexer: few, so that the drive's
/// dirty data (and the app's commits queued behind its writeback) stays small.
const PACKS_AWAITING_COMMIT: usize = 2;

/// Makes each pack the sealers finished durable under its name, writes an index file after
/// every [`PACKS_PER_INDEX`] of them (never naming a pack before it is durable), and one for
/// the rest when every sealer is done.
struct Indexer {
    store: Store,
    index_tx: SyncSender<IndexWritten>,
}

impl Indexer {
    fn run(self, rx: Receiver<ToIndexer>, sealers: usize) -> io::Result<Totals> {
        let mut totals = Totals::default();
        let mut index: Vec<IndexPack> = Vec::new();
        let mut blobs = 0usize;
        let mut done = 0;
        loop {
            match rx.recv() {
                Ok(ToIndexer::Pack(obj, p)) => {
                    obj.commit_as(&format::pack_path(&p.pack))?;
                    if blobs + p.blobs.len() > format::MAX_INDEX_BLOBS {
                        self.write_index(&mut index, &mut totals)?;
                        blobs = 0;
                    }
                    totals.bytes += p.size;
                    totals.chunks += p.blobs.len() as u64;
                    blobs += p.blobs.len();
                    index.push(p);
                    if index.len() >= PACKS_PER_INDEX {
                        self.write_index(&mut index, &mut totals)?;
                        blobs = 0;
                    }
                }
                Ok(ToIndexer::Done) => {
                    done += 1;
                    if done < sealers {
                        continue;
                    }
                    if !index.is_empty() {
                        self.write_index(&mut index, &mut totals)?;
                    }
                    return Ok(totals);
                }
                // The writer was dropped unfinished (or a sealer failed): write nothing more.
                Err(_) => return Err(io::Error::other("the snapshot was abandoned")),
            }
        }
    }

    fn write_index(&self, index: &mut Vec<IndexPack>, totals: &mut Totals) -> io::Result<()> {
        let file = IndexFile { format: format::STORE_FORMAT, packs: std::mem::take(index) };
        let bytes = serde_json::to_vec(&file).map_err(io::Error::other)?;
        let name = super::sha256_hex(&bytes);
        put(self.store.backend(), &format::index_path(&name), &bytes)?;
        totals.bytes += bytes.len() as u64;
        let parsed = parse_index(&name, &bytes).map_err(io::Error::other)?;
        // The writer loads it into the cache; if it is gone, it failed and will say so.
        let _ = self.index_tx.send(IndexWritten { name, parsed });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sealers_queue_never_holds_more_than_its_bytes_unless_one_message_alone() {
        let room = Arc::new(QueueRoom::new());
        let (tx, rx) = sync_channel::<usize>(64);
        let consumer = {
            let room = room.clone();
            std::thread::spawn(move || {
                let mut taken = 0;
                for n in rx {
                    room.release(n);
                    taken += n;
                }
                taken
            })
        };
        let mut most = 0;
        let mut sent = 0;
        // Batches of the sizes the caller sends (a few KiB to a largest chunk), and one
        // message bigger than the whole budget.
        for i in 0..2000usize {
            let n = if i == 1000 { 3 * QUEUE_BYTES } else { 4096 + (i * 7919) % (QUEUE_BYTES / 2) };
            assert!(room.reserve(n));
            let queued = room.queued();
            if n <= QUEUE_BYTES {
                assert!(queued <= QUEUE_BYTES, "{queued} bytes queued after a message of {n}");
            } else {
                assert_eq!(queued, n, "a message bigger than the budget goes alone");
            }
            most = most.max(queued);
            tx.send(n).unwrap();
            sent += n;
        }
        drop(tx);
        assert_eq!(consumer.join().unwrap(), sent);
        assert_eq!(room.queued(), 0);
        assert!(most > 0);
    }

    #[test]
    fn a_stopped_sealer_frees_a_caller_waiting_for_room() {
        let room = Arc::new(QueueRoom::new());
        assert!(room.reserve(QUEUE_BYTES));
        let caller = {
            let room = room.clone();
            // Waits: the queue is full and nobody takes from it.
            std::thread::spawn(move || room.reserve(1))
        };
        drop(CloseOnExit(room.clone()));
        assert!(!caller.join().unwrap(), "the caller must learn that a sealer stopped");
        assert!(!room.reserve(1), "and so must every later reserve");
    }
}
