//! Reading a snapshot back: entries in order, each checked before it is handed out, and for
//! files a `Read` of verified bytes.
//!
//! Before the first entry: the manifest is parsed, the tree's and the refs' SHA-256 and
//! sizes match it, every chunk the refs name is in the index (the cache, synced with the
//! drive) within its pack. The tree is then decrypted as a stream; each line is bounded in
//! size, each path goes through `archive::entry_path` and the tree order rules
//! ([`super::order`]: sorted, no duplicates, ancestors are folders), every count and size
//! is bounded by the manifest. Each chunk is read from its pack, its length checked,
//! decrypted, decompressed with its declared size as a hard cap, and its keyed hash compared
//! with its id before a byte of it is returned. `next_entry` returning `None` is the proof
//! that the whole snapshot was consistent: the end line, the manifest's counts, every ref
//! used, the database's SHA-256.
//!
//! age releases plaintext before its last chunk is authenticated: callers extract only into
//! staging and trust nothing until `None` (the same rule as `archive::read`).
//!
//! Speed: decrypting, decompressing and hashing chunks is most of a restore's work, so it is
//! done ahead on worker threads ([`ReadAhead`]: one per core, at most four). The reader
//! parses tree lines a little ahead (at most [`LOOKAHEAD_BYTES`] of them), hands the chunk
//! ids they name to the workers in tree order, and takes the results back in that order;
//! at most [`AHEAD_BYTES`] of blobs and chunks are in flight. Every check above stays on the
//! reader's thread, on the chunk it is about to hand out: read-ahead only ever saves time
//! (a chunk it did not fetch, or fetched for an id that turns out different, is fetched or
//! refused there as before). Blobs share their pack's file key ([`super::blob`]), and the
//! workers share one [`KeyCache`]: a restore does one X25519 agreement per pack.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::Digest;

use super::blob::{BlobError, KeyCache, Opener};
use super::cache::{BlobLoc, Cache};
use super::format::{self, SnapshotManifest, TreeEntry, TreeKind, TreeLine};
use super::key::{ChunkId, ChunkKey};
use super::order::TreeOrder;
use super::write::EntryMeta;
use super::{read_error, Identities, Store};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::store::backend::RangeFile;

/// One checked entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The path's bytes (`uploads/a/b.jpg`) and its components, as `archive::entry_path` gives.
    pub path: Vec<u8>,
    pub parts: Vec<Vec<u8>>,
    pub kind: TreeKind,
    pub meta: EntryMeta,
    /// Files: content length (what [`SnapshotReader::content`] yields).
    pub size: u64,
    /// Symlinks: the target's bytes.
    pub target: Option<Vec<u8>>,
}

/// The error inside an `io::Error` from [`Content`]: the store's verdict.
#[derive(Debug)]
pub struct ContentError(pub Error);

impl std::fmt::Display for ContentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for ContentError {}

/// Turn an error from [`Content::read`] back into the store's error (integrity, cancelled...).
pub fn content_error(snapshot: &str, e: io::Error) -> Error {
    let is_ours = e.get_ref().is_some_and(|r| r.is::<ContentError>());
    if is_ours {
        let inner = e.into_inner().expect("checked").downcast::<ContentError>().expect("checked");
        return inner.0;
    }
    Error::integrity(snapshot, format!("cannot read its content ({e})"))
}

struct FileState {
    /// The entry's path (for the files given up, see `skip_rest_of_file`).
    path: Vec<u8>,
    /// Chunk ids still to read from the entry line (then `more` lines).
    ids: std::vec::IntoIter<String>,
    chunks_left: u64,
    bytes_left: u64,
    buf: Arc<Vec<u8>>,
    pos: usize,
    /// The database entry's SHA-256, compared with the manifest at the end.
    sha: Option<DbHash>,
}

/// The database's SHA-256, on a thread of its own: on the reader's thread, which also writes
/// every restored file, it was 8 % of a drill's busiest thread. Chunks go to it as shared
/// buffers (no copy), at most [`DbHash::QUEUE`] of them waiting; the digest comes back when
/// the file ends. If the thread cannot start, the hashing is done in place.
enum DbHash {
    Thread(SyncSender<Arc<Vec<u8>>>, JoinHandle<String>),
    Here(sha2::Sha256),
}

impl DbHash {
    /// 64 database chunks of 8 KiB, or a few files' chunks: bounded memory.
    const QUEUE: usize = 64;

    fn start() -> DbHash {
        let (tx, rx) = sync_channel::<Arc<Vec<u8>>>(DbHash::QUEUE);
        let spawned = std::thread::Builder::new().name("datavault-sha".into()).spawn(move || {
            let mut sha = sha2::Sha256::new();
            for chunk in rx {
                sha.update(&chunk[..]);
            }
            hex::encode(sha.finalize())
        });
        match spawned {
            Ok(handle) => DbHash::Thread(tx, handle),
            Err(_) => DbHash::Here(sha2::Sha256::new()),
        }
    }

    fn update(&mut self, chunk: &Arc<Vec<u8>>) {
        match self {
            // A send fails only if the thread died; `finish` then reports no digest.
            DbHash::Thread(tx, _) => drop(tx.send(Arc::clone(chunk))),
            DbHash::Here(sha) => sha.update(&chunk[..]),
        }
    }

    /// The digest in hex; `None` if the thread died (which fails the comparison).
    fn finish(self) -> Option<String> {
        match self {
            DbHash::Thread(tx, handle) => {
                drop(tx);
                handle.join().ok()
            }
            DbHash::Here(sha) => Some(hex::encode(sha.finalize())),
        }
    }
}

pub struct SnapshotReader<'a> {
    store: Store,
    /// Give up a file whose content no copy gives back, and go on (`restore --skip-damaged`).
    skip_damaged: bool,
    /// The files given up so far: escaped path, why.
    damaged: Vec<(String, String)>,
    /// Where to find another copy of a chunk whose first copy is damaged, and to say so.
    cache: &'a mut Cache,
    /// Where each ref is, found once at open: no cache query per chunk.
    locs: Locations,
    keys: Arc<KeyCache>,
    packs: Arc<OpenPacks>,
    /// For chunks read-ahead did not fetch.
    opener: Option<Opener>,
    progress: &'a dyn Progress,
    manifest: SnapshotManifest,
    name: String,
    lines: BufReader<Box<dyn Read + Send + 'a>>,
    line: Vec<u8>,
    key: ChunkKey,
    refs: Vec<ChunkId>,
    used: Vec<bool>,
    order: TreeOrder,
    file: Option<FileState>,
    entries: u64,
    files: u64,
    bytes: u64,
    chunk_refs: u64,
    db_seen: bool,
    done: bool,
    /// Tree lines parsed ahead of the entry being handed out (for read-ahead), with their
    /// raw length; an error reading ahead is kept in its place.
    lookahead: VecDeque<(Result<TreeLine>, usize)>,
    lookahead_bytes: usize,
    /// The end line (or an error) is among the lines read ahead: read no further.
    tree_ended: bool,
    ahead: ReadAhead,
}

/// Tree lines parsed ahead of the reader, at most this many bytes of them (at least one).
pub const LOOKAHEAD_BYTES: usize = 2 << 20;
/// Blobs being fetched and chunks decrypted ahead, at most this many bytes (at least one).
/// 4 MiB: one files' chunk of 2 MiB (its blob and its plain bytes) or many database chunks.
/// At 8 MiB a large-profile restore peaked at 58-62 MiB RSS, at 4 MiB at 54-57 MiB, in the
/// same time (2026-12-05).
pub const AHEAD_BYTES: u64 = 4 << 20;
/// ... and at most this many chunks.
const AHEAD_CHUNKS: usize = 256;

impl<'a> SnapshotReader<'a> {
    /// Open snapshot `name` (its stem). Fails, naming what, if anything about it is off.
    /// The identities are shared with the read-ahead threads (hence the `Arc`).
    pub fn open(
        store: &Store,
        cache: &'a mut Cache,
        name: &str,
        identities: Arc<Identities>,
        progress: &'a dyn Progress,
    ) -> Result<SnapshotReader<'a>> {
        let manifest = store.read_manifest(name)?;
        check_tree_file(store, name, &manifest)?;
        let refs = read_refs(store, name, &manifest)?;
        cache.sync(store)?;
        let locs = Locations::find(cache, name, &refs)?;
        let keys = Arc::new(KeyCache::new(identities));
        let (lines, key) = open_tree(store, name, &manifest, &keys)?;
        let used = vec![false; refs.len()];
        let packs = Arc::new(OpenPacks::new(store));
        let ahead = ReadAhead::start(&packs, &keys, &key);
        Ok(SnapshotReader {
            store: store.clone(),
            skip_damaged: false,
            damaged: Vec::new(),
            cache,
            locs,
            keys,
            packs,
            opener: Opener::new().ok(),
            progress,
            name: name.to_string(),
            manifest,
            lines,
            line: Vec::new(),
            key,
            refs,
            used,
            order: TreeOrder::default(),
            file: None,
            entries: 0,
            files: 0,
            bytes: 0,
            chunk_refs: 0,
            db_seen: false,
            done: false,
            lookahead: VecDeque::new(),
            lookahead_bytes: 0,
            tree_ended: false,
            ahead,
        })
    }

    pub fn manifest(&self) -> &SnapshotManifest {
        &self.manifest
    }

    /// From now on, a file whose content no copy gives back is left out (its content read
    /// ends with an error, see [`SnapshotReader::damaged_files`]) and the next entries are
    /// still read, every check but that file's own still made. Only for `restore --to`:
    /// what is restored in place must be whole.
    pub fn skip_damaged_files(&mut self) {
        self.skip_damaged = true;
    }

    /// The files left out so far (escaped path, why), with [`SnapshotReader::skip_damaged_files`].
    pub fn damaged_files(&self) -> &[(String, String)] {
        &self.damaged
    }

    fn bad(&self, why: impl std::fmt::Display) -> Error {
        Error::integrity(
            &self.name,
            format!("unsafe or damaged snapshot refused: {why}; nothing was restored from it"),
        )
    }

    /// The next entry, or `None` once the whole snapshot has been checked. Unread content
    /// of the previous file is read (and verified) first.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        if self.done {
            return Ok(None);
        }
        if self.file.is_some() {
            let mut sink = io::sink();
            io::copy(&mut self.content(), &mut sink).map_err(|e| content_error(&self.name, e))?;
            self.end_file()?;
        }
        match self.read_line()? {
            TreeLine::Entry(e) => self.entry(e).map(Some),
            TreeLine::End { entries, chunk_refs, bytes } => {
                self.finish(entries, chunk_refs, bytes)?;
                Ok(None)
            }
            TreeLine::Header { .. } => Err(self.bad("a second tree header")),
            TreeLine::More { .. } => Err(self.bad("chunk ids without a file")),
        }
    }

    /// The content of the file entry just returned: verified bytes, `size` of them.
    pub fn content(&mut self) -> Content<'_, 'a> {
        Content { reader: self }
    }

    /// The next tree line: one read ahead, or from the tree.
    fn read_line(&mut self) -> Result<TreeLine> {
        if let Some((line, raw)) = self.lookahead.pop_front() {
            self.lookahead_bytes -= raw;
            return line;
        }
        self.next_line().0
    }

    /// Parse the tree's next line and queue the chunk ids it names for read-ahead. Every
    /// line goes through here, in order, so the ids queued are the ids the reader will ask
    /// for, in the order it will (as long as the tree is sound).
    fn next_line(&mut self) -> (Result<TreeLine>, usize) {
        let (line, raw) = self.parse_line();
        match &line {
            Ok(TreeLine::Entry(e)) => self.ahead.queue(&e.chunks),
            Ok(TreeLine::More { chunks }) => self.ahead.queue(chunks),
            Ok(TreeLine::Header { .. }) => {}
            Ok(TreeLine::End { .. }) | Err(_) => self.tree_ended = true,
        }
        (line, raw)
    }

    /// Read and parse one line from the tree, and its raw length.
    fn parse_line(&mut self) -> (Result<TreeLine>, usize) {
        match self.raw_line() {
            Ok(()) => {
                let line = serde_json::from_slice(&self.line)
                    .map_err(|e| self.bad(format!("a tree line is not valid ({e})")));
                (line, self.line.len())
            }
            Err(e) => (Err(e), 0),
        }
    }

    fn raw_line(&mut self) -> Result<()> {
        self.line.clear();
        let n = (&mut self.lines)
            .take(format::MAX_TREE_LINE as u64 + 1)
            .read_until(b'\n', &mut self.line)
            .map_err(|e| tree_error(&self.name, &e))?;
        if n == 0 {
            return Err(self.bad("the tree ends without its end line (truncated)"));
        }
        if self.line.last() != Some(&b'\n') {
            return Err(self.bad("a tree line is too long"));
        }
        Ok(())
    }

    /// Keep the read-ahead workers busy: hand them the next chunk ids in tree order, parsing
    /// tree lines ahead as needed, within the bounds. Nothing here is trusted yet: each line
    /// and chunk is checked when the reader reaches it.
    fn fill_ahead(&mut self) {
        while self.ahead.has_room() {
            if let Some(id) = self.ahead.pending.pop_front() {
                match self.refs.binary_search(&id) {
                    Ok(slot) => self.ahead.submit(id, self.locs.get(slot)),
                    // The reader will say what is wrong when it gets there.
                    Err(_) => self.ahead.stop(),
                }
                continue;
            }
            if self.tree_ended || (self.lookahead_bytes >= LOOKAHEAD_BYTES && !self.lookahead.is_empty()) {
                return;
            }
            let (line, raw) = self.next_line();
            self.lookahead_bytes += raw;
            self.lookahead.push_back((line, raw));
        }
    }

    fn entry(&mut self, e: TreeEntry) -> Result<Entry> {
        self.entries += 1;
        if self.entries > self.manifest.entries {
            return Err(self.bad("more entries than the manifest lists"));
        }
        let path = format::unescape_path(&e.path)
            .ok_or_else(|| self.bad(format!("badly escaped path {:?}", e.path)))?;
        let parts = crate::archive::entry_path(&path).map_err(|why| self.bad(why))?;
        self.order.next(&parts, e.kind).map_err(|why| self.bad(why))?;
        let shown = &e.path;
        if e.mode > 0o7777 || e.mtime_ns > 999_999_999 {
            return Err(self.bad(format!("{shown} has an impossible mode or time")));
        }
        let target = match (&e.kind, &e.target) {
            (TreeKind::Symlink, Some(t)) => {
                let t = format::unescape_path(t)
                    .ok_or_else(|| self.bad(format!("{shown}: badly escaped target")))?;
                if t.is_empty() || t.contains(&0) {
                    return Err(self.bad(format!("symlink with an invalid target {shown}")));
                }
                Some(t)
            }
            (TreeKind::Symlink, None) => return Err(self.bad(format!("symlink without a target {shown}"))),
            (_, Some(_)) => return Err(self.bad(format!("{shown} is no symlink but has a target"))),
            (_, None) => None,
        };
        if e.kind != TreeKind::File && (e.size != 0 || e.nchunks != 0 || !e.chunks.is_empty()) {
            return Err(self.bad(format!("{shown} is no file but has content")));
        }
        if e.kind != TreeKind::Dir {
            self.files += 1;
        }
        if e.kind == TreeKind::File {
            self.start_file(&e, &path)?;
        }
        let meta = EntryMeta { mode: e.mode, uid: e.uid, gid: e.gid, mtime: e.mtime, mtime_ns: e.mtime_ns };
        Ok(Entry { path, parts, kind: e.kind, meta, size: e.size, target })
    }

    fn start_file(&mut self, e: &TreeEntry, path: &[u8]) -> Result<()> {
        let shown = &e.path;
        let bytes_room = self.manifest.plain_bytes - self.bytes.min(self.manifest.plain_bytes);
        let refs_room = self.manifest.chunk_refs - self.chunk_refs.min(self.manifest.chunk_refs);
        if e.size > bytes_room {
            return Err(self.bad(format!("{shown} declares {} bytes, more than the snapshot holds", e.size)));
        }
        if e.nchunks > refs_room
            || (e.chunks.len() as u64) > e.nchunks
            || e.chunks.len() > format::MAX_LINE_CHUNKS
        {
            return Err(self.bad(format!("{shown} declares more chunks than the snapshot holds")));
        }
        if (e.size == 0) != (e.nchunks == 0) || e.nchunks > e.size {
            return Err(self.bad(format!("{shown}: its size and chunk count disagree")));
        }
        self.bytes += e.size;
        self.chunk_refs += e.nchunks;
        let db_entry = self.manifest.database.as_ref().map(|d| d.entry.as_str());
        let is_db = db_entry == Some(e.path.as_str());
        if is_db {
            self.db_seen = true;
            if self.manifest.database.as_ref().map(|d| d.size) != Some(e.size) {
                return Err(self.bad(format!("database {shown} is not the size the manifest says")));
            }
        }
        self.file = Some(FileState {
            path: path.to_vec(),
            ids: e.chunks.clone().into_iter(),
            chunks_left: e.nchunks,
            bytes_left: e.size,
            buf: Arc::new(Vec::new()),
            pos: 0,
            sha: is_db.then(DbHash::start),
        });
        Ok(())
    }

    /// The next chunk id of the current file, checked against the refs and the file's size:
    /// the id, its hex form and where it is; `None` at the file's end.
    fn next_ref(&mut self) -> Result<Option<(ChunkId, String, BlobLoc)>> {
        let Some(f) = self.file.as_mut() else { return Ok(None) };
        if f.chunks_left == 0 {
            return Ok(None);
        }
        let hex_id = match f.ids.next() {
            Some(h) => h,
            None => match self.read_line()? {
                TreeLine::More { chunks }
                    if !chunks.is_empty() && chunks.len() <= format::MAX_LINE_CHUNKS =>
                {
                    let f = self.file.as_mut().expect("checked");
                    if chunks.len() as u64 > f.chunks_left {
                        return Err(self.bad("more chunk ids than the file declares"));
                    }
                    f.ids = chunks.into_iter();
                    f.ids.next().expect("not empty")
                }
                _ => return Err(self.bad("a file's chunk list ends early")),
            },
        };
        let id = format::parse_hex32(&hex_id).ok_or_else(|| self.bad("an invalid chunk id"))?;
        let Ok(slot) = self.refs.binary_search(&id) else {
            return Err(self.bad(format!("chunk {hex_id} is not in the snapshot's refs")));
        };
        self.used[slot] = true;
        let loc = self.locs.get(slot);
        let f = self.file.as_mut().expect("checked");
        if loc.plain == 0 || loc.plain > f.bytes_left || (f.chunks_left == 1 && loc.plain != f.bytes_left) {
            return Err(self.bad(format!("chunk {hex_id}: its length does not fit the file's size")));
        }
        Ok(Some((id, hex_id, loc)))
    }

    /// The next chunk of the current file, verified; `None` at its end.
    fn next_chunk(&mut self) -> Result<Option<Arc<Vec<u8>>>> {
        let Some((id, hex_id, loc)) = self.next_ref()? else { return Ok(None) };
        self.fill_ahead();
        let fetched = match self.ahead.take(&id) {
            Some(f) => f,
            None => match self.opener.as_mut() {
                Some(o) => fetch(&self.packs, &self.keys, o, &self.key, &id, &loc),
                None => Fetched::Blob(BlobError::Damaged("no zstd decompressor".into())),
            },
        };
        self.fill_ahead();
        let plain = match fetched {
            Fetched::Plain(p) => p,
            failed => match self.read_another_copy(&id, &hex_id, &loc, failed) {
                Ok(p) => p,
                Err(e @ Error::Integrity { .. }) if self.skip_damaged => {
                    return Err(self.skip_rest_of_file(&loc, e)?)
                }
                Err(e) => return Err(e),
            },
        };
        let f = self.file.as_mut().expect("checked");
        f.chunks_left -= 1;
        f.bytes_left -= plain.len() as u64;
        let plain = Arc::new(plain);
        if let Some(sha) = f.sha.as_mut() {
            sha.update(&plain);
        }
        Ok(Some(plain))
    }

    /// With [`SnapshotReader::skip_damaged_files`]: the file whose chunk at `loc` no copy
    /// gives back is given up. Its remaining chunk ids are still read and checked (the tree
    /// and the counts at its end must still add up), none is fetched, and the file is
    /// recorded; the error returned makes the caller drop what it wrote of it.
    fn skip_rest_of_file(&mut self, loc: &BlobLoc, why: Error) -> Result<Error> {
        let f = self.file.as_mut().expect("in a file");
        f.chunks_left -= 1;
        f.bytes_left -= loc.plain;
        // A database given up is not compared with its SHA-256: it is not restored.
        f.sha = None;
        let path = f.path.clone();
        while let Some((id, _, loc)) = self.next_ref()? {
            let _ = self.ahead.take(&id);
            let f = self.file.as_mut().expect("in a file");
            f.chunks_left -= 1;
            f.bytes_left -= loc.plain;
        }
        let shown = crate::manifest::escape_path(&path);
        let what = match &why {
            Error::Integrity { message, .. } => {
                message.trim_end_matches("; use another snapshot").to_string()
            }
            other => other.to_string(),
        };
        log::error!("{shown}: {what}; left out, the other files are restored");
        self.damaged.push((shown, what));
        Ok(why)
    }

    /// The first copy of a chunk could not be read: if it is damaged, mark it (the next
    /// backup stores the chunk again), then read the chunk from another copy if the indexes
    /// know one. Else the first copy's error.
    fn read_another_copy(
        &mut self,
        id: &ChunkId,
        hex_id: &str,
        loc: &BlobLoc,
        failed: Fetched,
    ) -> Result<Vec<u8>> {
        let pack = hex::encode(loc.pack);
        let (error, damaged) = match failed {
            Fetched::Plain(p) => return Ok(p),
            Fetched::Read(e) => {
                let e = read_error(&self.store.location(), &format::pack_path(&pack), &e);
                (Error::integrity(&self.name, format!("chunk {hex_id}: {e}")), false)
            }
            // A flipped byte in a blob's age header reads as "no matching key": the pack's
            // SHA-256 tells damage from a really wrong key.
            Fetched::Blob(BlobError::WrongKey) => self.wrong_key_or_damage(&pack),
            Fetched::Blob(BlobError::Damaged(m)) => (
                Error::integrity(
                    &self.name,
                    format!("damaged: chunk {hex_id} in pack {pack} {m}; use another snapshot"),
                ),
                true,
            ),
        };
        if damaged {
            if let Err(e) = self.cache.mark_damaged(loc) {
                log::warn!("chunk {hex_id}: its damaged copy could not be recorded: {e}");
            }
        }
        for other in self.cache.locate_all(id)?.into_iter().filter(|l| l != loc) {
            let Some(opener) = self.opener.as_mut() else { break };
            if let Fetched::Plain(p) = fetch(&self.packs, &self.keys, opener, &self.key, id, &other) {
                if p.len() as u64 == loc.plain {
                    log::warn!(
                        "chunk {hex_id}: its copy in pack {pack} could not be read ({error}); read from its copy in pack {}",
                        hex::encode(other.pack)
                    );
                    return Ok(p);
                }
            }
        }
        Err(error)
    }

    /// The error for a blob no identity opens, and whether that is damage.
    fn wrong_key_or_damage(&self, pack: &str) -> (Error, bool) {
        let size = self.store.backend().size(&format::pack_path(pack)).ok().flatten().unwrap_or(0);
        match super::verify::check_pack(&self.store, pack, size, &crate::progress::NoProgress) {
            Err(why) => (
                Error::integrity(&self.name, format!("damaged: pack {pack} {why}; use another snapshot")),
                true,
            ),
            Ok(()) => (Error::integrity(&self.name, wrong_key(&self.manifest)), false),
        }
    }

    fn end_file(&mut self) -> Result<()> {
        let Some(f) = self.file.take() else { return Ok(()) };
        if f.chunks_left != 0 || f.bytes_left != 0 || f.ids.len() != 0 {
            return Err(self.bad("a file's content does not add up to its size"));
        }
        if let Some(sha) = f.sha {
            let want = self.manifest.database.as_ref().map(|d| d.sha256.as_str()).unwrap_or("");
            if sha.finish().as_deref() != Some(want) {
                return Err(self.bad("the database's SHA-256 differs from the manifest"));
            }
        }
        Ok(())
    }

    fn finish(&mut self, entries: u64, chunk_refs: u64, bytes: u64) -> Result<()> {
        let m = &self.manifest;
        let agree = entries == self.entries
            && chunk_refs == self.chunk_refs
            && bytes == self.bytes
            && m.entries == self.entries
            && m.chunk_refs == self.chunk_refs
            && m.plain_bytes == self.bytes
            && m.files == self.files;
        if !agree {
            return Err(self.bad("its counts differ from its end line or its manifest (entries missing?)"));
        }
        if m.database.is_some() && !self.db_seen {
            return Err(self.bad("the database the manifest names is not in the tree"));
        }
        if self.used.iter().any(|u| !u) {
            return Err(self.bad("its refs list chunks the tree does not use"));
        }
        // The very end: age authenticates its last chunk and zstd checks its frame only here.
        let mut rest = Vec::new();
        (&mut self.lines).take(1).read_to_end(&mut rest).map_err(|e| tree_error(&self.name, &e))?;
        if !rest.is_empty() {
            return Err(self.bad("data after the tree's end line"));
        }
        self.done = true;
        Ok(())
    }
}

/// The verified content of one file.
pub struct Content<'r, 'a> {
    reader: &'r mut SnapshotReader<'a>,
}

impl BufRead for Content<'_, '_> {
    /// The rest of the current chunk, the next one (verified) once it is used up; empty at
    /// the end of the file.
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        let r = &mut *self.reader;
        if r.progress.cancelled() {
            return Err(io::Error::other(ContentError(Error::Failed(format!(
                "reading {}: {}",
                r.name,
                crate::progress::Cancelled
            )))));
        }
        loop {
            let Some(f) = r.file.as_mut() else { return Ok(&[]) };
            if f.pos < f.buf.len() {
                break;
            }
            match r.next_chunk() {
                Ok(Some(chunk)) => {
                    let f = r.file.as_mut().expect("in a file");
                    f.buf = chunk;
                    f.pos = 0;
                }
                Ok(None) => return Ok(&[]),
                Err(e) => return Err(io::Error::other(ContentError(e))),
            }
        }
        let f = r.file.as_ref().expect("in a file");
        Ok(&f.buf[f.pos..])
    }

    fn consume(&mut self, n: usize) {
        let r = &mut *self.reader;
        if let Some(f) = r.file.as_mut() {
            let n = n.min(f.buf.len() - f.pos);
            f.pos += n;
            r.progress.advance(n as u64);
        }
    }
}

impl Read for Content<'_, '_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let piece = self.fill_buf()?;
        let n = out.len().min(piece.len());
        out[..n].copy_from_slice(&piece[..n]);
        self.consume(n);
        Ok(n)
    }
}

fn wrong_key(m: &SnapshotManifest) -> String {
    format!(
        "wrong key: it was encrypted to {} and none of the identities given opens it; use the matching identity file",
        m.encryption.recipients.join(", ")
    )
}

fn tree_error(name: &str, e: &io::Error) -> Error {
    Error::integrity(name, format!("its tree is damaged ({e}); use another snapshot"))
}

/// The tree file's size and SHA-256 against the manifest, before anything of it is used.
fn check_tree_file(store: &Store, name: &str, m: &SnapshotManifest) -> Result<()> {
    let path = format::tree_path(name);
    let (mut r, len) = store.backend().open(&path).map_err(|e| read_error(&store.location(), &path, &e))?;
    if len != m.tree.size {
        return Err(Error::integrity(
            name,
            format!("its tree is {len} bytes, the manifest says {} (damaged)", m.tree.size),
        ));
    }
    let mut h = crate::fsutil::HashingReader::new((&mut r).take(m.tree.size));
    io::copy(&mut h, &mut io::sink()).map_err(|e| read_error(&store.location(), &path, &e))?;
    if h.finish().0 != m.tree.sha256 {
        return Err(Error::integrity(
            name,
            "its tree's SHA-256 differs from the manifest: damaged or replaced; use another snapshot",
        ));
    }
    Ok(())
}

/// The refs file, checked against the manifest.
pub(crate) fn read_refs(store: &Store, name: &str, m: &SnapshotManifest) -> Result<Vec<ChunkId>> {
    let path = format::refs_path(name);
    let bytes = store
        .backend()
        .read_small(&path, m.refs.size)
        .map_err(|e| read_error(&store.location(), &path, &e))?;
    if bytes.len() as u64 != m.refs.size || super::sha256_hex(&bytes) != m.refs.sha256 {
        return Err(Error::integrity(
            name,
            "its refs file's SHA-256 differs from the manifest: damaged; use another snapshot",
        ));
    }
    let refs = format::decode_refs(&bytes)
        .map_err(|e| Error::integrity(name, format!("its refs file is not valid: {e}")))?;
    if refs.len() as u64 != m.chunks {
        return Err(Error::integrity(
            name,
            "its refs file does not hold the number of chunks the manifest says",
        ));
    }
    Ok(refs)
}

type Lines<'a> = BufReader<Box<dyn Read + Send + 'a>>;

/// Decrypt the tree and read its header: the chunk key comes from there.
fn open_tree<'a>(
    store: &Store,
    name: &str,
    m: &SnapshotManifest,
    identity: &KeyCache,
) -> Result<(Lines<'a>, ChunkKey)> {
    let path = format::tree_path(name);
    let (r, _) = store.backend().open(&path).map_err(|e| read_error(&store.location(), &path, &e))?;
    let dec = age::Decryptor::new_buffered(BufReader::new(r.take(m.tree.size)))
        .map_err(|e| age_error(name, m, e))?;
    let plain =
        dec.decrypt(std::iter::once(identity as &dyn age::Identity)).map_err(|e| age_error(name, m, e))?;
    let zstd = zstd::stream::read::Decoder::new(plain).map_err(|e| tree_error(name, &e))?;
    let mut lines: Lines<'a> = BufReader::with_capacity(64 << 10, Box::new(zstd));
    let mut first = Vec::new();
    (&mut lines)
        .take(format::MAX_TREE_LINE as u64 + 1)
        .read_until(b'\n', &mut first)
        .map_err(|e| tree_error(name, &e))?;
    let bad = |why: &str| Error::integrity(name, format!("unsafe or damaged snapshot refused: {why}"));
    let header: TreeLine = serde_json::from_slice(&first).map_err(|_| bad("its tree has no valid header"))?;
    let TreeLine::Header { format: f, snapshot, store_id, chunk_key } = header else {
        return Err(bad("its tree does not start with a header"));
    };
    if f > format::STORE_FORMAT {
        return Err(bad("its tree's format is newer than this datavault understands; upgrade datavault"));
    }
    if snapshot != name || store_id != store.config().store_id {
        return Err(bad("its tree belongs to another snapshot or store"));
    }
    let key = ChunkKey::from_hex(&chunk_key).ok_or_else(|| bad("its tree holds no valid chunk key"))?;
    Ok((lines, key))
}

fn age_error(name: &str, m: &SnapshotManifest, e: age::DecryptError) -> Error {
    use age::DecryptError as D;
    let msg = match e {
        D::NoMatchingKeys => wrong_key(m),
        D::InvalidHeader | D::UnknownFormat => {
            "damaged: its tree is not a readable age file; use another snapshot".into()
        }
        D::InvalidMac => "damaged: its tree's age header failed authentication; use another snapshot".into(),
        other => format!("cannot decrypt its tree ({other}); use another snapshot"),
    };
    Error::integrity(name, msg)
}

// ---- read-ahead ----------------------------------------------------------------------------------

/// What became of one chunk: its verified plaintext, or why not.
enum Fetched {
    Plain(Vec<u8>),
    Blob(BlobError),
    Read(io::Error),
}

/// Read one blob from its pack and open it (decrypt, decompress with its length as a cap,
/// keyed hash against `id`): on a read-ahead worker or, when read-ahead missed, the reader.
fn fetch(
    packs: &OpenPacks,
    keys: &KeyCache,
    opener: &mut Opener,
    key: &ChunkKey,
    id: &ChunkId,
    loc: &BlobLoc,
) -> Fetched {
    match packs.read(loc) {
        Ok(blob) => match opener.open(&blob, id, loc.plain, key, keys) {
            Ok(p) => Fetched::Plain(p),
            Err(e) => Fetched::Blob(e),
        },
        Err(e) => Fetched::Read(e),
    }
}

/// Where a snapshot's chunks are, in the order of its refs: a pack number, offset, stored
/// length and plain length, 16 bytes a chunk (plus 32 a pack).
struct Locations {
    packs: Vec<[u8; 32]>,
    at: Vec<[u32; 4]>,
}

impl Locations {
    /// Look every ref up in the cache; one missing or out of range refuses the snapshot.
    /// `refs` is sorted (the reader binary-searches it), so one pass over the cache does.
    fn find(cache: &Cache, name: &str, refs: &[ChunkId]) -> Result<Locations> {
        let mut numbers: std::collections::HashMap<[u8; 32], u32> = Default::default();
        let mut locs = Locations { packs: Vec::new(), at: Vec::with_capacity(refs.len()) };
        cache.locate_sorted(refs, |i, loc| {
            let loc = loc.ok_or_else(|| {
                Error::integrity(
                    name,
                    format!(
                        "needs chunk {} which no index on the drive holds (a pack or index file is missing)",
                        hex::encode(refs[i])
                    ),
                )
            })?;
            let pack = *numbers.entry(loc.pack).or_insert_with(|| {
                locs.packs.push(loc.pack);
                locs.packs.len() as u32 - 1
            });
            // Packs are at most format::MAX_PACK (< 4 GiB) long: all of it fits 32 bits.
            let fit = |v: u64| {
                u32::try_from(v).map_err(|_| Error::integrity(name, "an index entry is out of range"))
            };
            locs.at.push([pack, fit(loc.offset)?, fit(loc.length)?, fit(loc.plain)?]);
            Ok(())
        })?;
        Ok(locs)
    }

    fn get(&self, slot: usize) -> BlobLoc {
        let [pack, offset, length, plain] = self.at[slot];
        BlobLoc {
            pack: self.packs[pack as usize],
            offset: offset.into(),
            length: length.into(),
            plain: plain.into(),
        }
    }
}

/// The packs last read from, kept open (shared by the reader and its workers): one open and
/// sequential reads per pack rather than an open per blob (see `Backend::open_ranges`).
struct OpenPacks {
    store: Store,
    open: Mutex<VecDeque<OpenPack>>,
}

type OpenPack = ([u8; 32], Arc<dyn RangeFile>);

/// Packs kept open: the sealers fill one pack each at a time, so a snapshot's chunks come
/// from a few packs at once.
const OPEN_PACKS: usize = 8;

impl OpenPacks {
    fn new(store: &Store) -> OpenPacks {
        OpenPacks { store: store.clone(), open: Mutex::new(VecDeque::new()) }
    }

    fn read(&self, loc: &BlobLoc) -> io::Result<Vec<u8>> {
        let lock = || self.open.lock().unwrap_or_else(|p| p.into_inner());
        let known = lock().iter().find(|(h, _)| *h == loc.pack).map(|(_, f)| f.clone());
        let file = match known {
            Some(f) => f,
            None => {
                let f = self.store.backend().open_ranges(&format::pack_path(&hex::encode(loc.pack)))?;
                let mut open = lock();
                open.push_back((loc.pack, f.clone()));
                if open.len() > OPEN_PACKS {
                    open.pop_front();
                }
                f
            }
        };
        file.read_range(loc.offset, loc.length)
    }
}

struct Job {
    id: ChunkId,
    loc: BlobLoc,
    reply: std::sync::mpsc::SyncSender<Fetched>,
}

/// Worker threads that fetch and open chunks ahead of the reader; results come back in the
/// order asked (one reply channel per chunk, kept in a queue).
struct ReadAhead {
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    inflight: VecDeque<(ChunkId, u64, Receiver<Fetched>)>,
    inflight_bytes: u64,
    /// Ids from lines read ahead, not yet handed to a worker.
    pending: VecDeque<ChunkId>,
}

impl ReadAhead {
    fn start(packs: &Arc<OpenPacks>, keys: &Arc<KeyCache>, key: &ChunkKey) -> ReadAhead {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4);
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (packs, keys, key, rx) = (packs.clone(), keys.clone(), key.clone(), rx.clone());
            let Ok(mut opener) = Opener::new() else { break };
            let spawned =
                std::thread::Builder::new().name(format!("datavault-reader-{i}")).spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(job) = job else { return };
                    let _ = job.reply.send(fetch(&packs, &keys, &mut opener, &key, &job.id, &job.loc));
                });
            // No thread: fewer workers, or none (the reader then fetches every chunk itself).
            if let Ok(h) = spawned {
                workers.push(h);
            }
        }
        let jobs = (!workers.is_empty()).then_some(tx);
        ReadAhead { jobs, workers, inflight: VecDeque::new(), inflight_bytes: 0, pending: VecDeque::new() }
    }

    fn has_room(&self) -> bool {
        self.jobs.is_some()
            && (self.inflight.is_empty()
                || (self.inflight_bytes < AHEAD_BYTES && self.inflight.len() < AHEAD_CHUNKS))
    }

    /// Queue the ids of a line read ahead; an invalid one ends read-ahead (the reader will
    /// refuse it when it gets there).
    fn queue(&mut self, ids: &[String]) {
        if self.jobs.is_none() {
            return;
        }
        for h in ids {
            match format::parse_hex32(h) {
                Some(id) => self.pending.push_back(id),
                None => return self.stop(),
            }
        }
    }

    fn submit(&mut self, id: ChunkId, loc: BlobLoc) {
        let Some(jobs) = self.jobs.as_ref() else { return };
        let (reply, rx) = sync_channel(1);
        let cost = loc.length.saturating_add(loc.plain);
        if jobs.send(Job { id, loc, reply }).is_err() {
            return self.stop();
        }
        self.inflight_bytes = self.inflight_bytes.saturating_add(cost);
        self.inflight.push_back((id, cost, rx));
    }

    /// The result for `id` if it is the next one fetched ahead (`None`: the reader fetches
    /// it itself). The reader asking for another id than the next one queued means it left
    /// the path read ahead (it is about to refuse the snapshot): stop.
    fn take(&mut self, id: &ChunkId) -> Option<Fetched> {
        self.jobs.as_ref()?;
        if let Some((next, cost, rx)) = self.inflight.pop_front() {
            self.inflight_bytes -= cost;
            if next == *id {
                return rx.recv().ok();
            }
        } else if self.pending.front() == Some(id) {
            self.pending.pop_front();
            return None;
        }
        self.stop();
        None
    }

    /// No more read-ahead for this reader.
    fn stop(&mut self) {
        self.jobs = None;
        self.pending.clear();
        self.inflight.clear();
        self.inflight_bytes = 0;
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Workers finish the job in hand (its reply goes nowhere) and see the channel closed.
        self.stop();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
