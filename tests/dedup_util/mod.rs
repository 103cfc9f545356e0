//! Helpers for the snapshot-engine tests: keys, a source tree, a walker and an extractor
//! that use the engine the way the commands do (a reference for wiring it in).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use datavault::error::Result;
use datavault::manifest::{SourceInfo, TreeInfo};
use datavault::progress::NoProgress;
use datavault::retention::ArchiveKind;
use datavault::store::backend::{Backend, MemoryBackend};
use datavault::store::dedup::cache::FileStat;
use datavault::store::dedup::read::{content_error, SnapshotReader};
use datavault::store::dedup::write::{EntryMeta, FileOutcome, SnapshotMeta, SnapshotWriter, WriterOptions};
use datavault::store::dedup::{Cache, ChunkKey, ChunkerParams, Identities, SnapshotManifest, Store};

pub struct Keys {
    pub identity: age::x25519::Identity,
    pub recipient: age::x25519::Recipient,
}

impl Keys {
    pub fn new() -> Keys {
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public();
        Keys { identity, recipient }
    }
    /// Shared: the reader's read-ahead threads use them too.
    pub fn ids(&self) -> std::sync::Arc<Identities> {
        std::sync::Arc::new(vec![Box::new(self.identity.clone())])
    }
}

/// Small chunks so that test files span several, and small packs so that GC has work.
pub fn test_params() -> ChunkerParams {
    ChunkerParams { files_min: 4 << 10, files_avg: 16 << 10, files_max: 64 << 10, database_fixed: 4096 }
}

pub fn mem_store() -> (MemoryBackend, Store) {
    let mem = MemoryBackend::new();
    let store = Store::open_or_create_with(Arc::new(mem.clone()), test_params(), 256 << 10).unwrap();
    (mem, store)
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// An app folder: `app.db` (WAL, some rows) and `uploads/` with nested folders, an empty
/// file, a non-UTF-8 name, a symlink, a multi-chunk file and a compressible one.
pub fn make_source(dir: &Path) -> PathBuf {
    let up = dir.join("uploads");
    fs::create_dir_all(up.join("a/b")).unwrap();
    fs::create_dir_all(up.join("c")).unwrap();
    fs::write(up.join("a/b/big.bin"), noise(1, 300_000)).unwrap();
    fs::write(up.join("a/text.txt"), b"bonjour le monde\n".repeat(5000)).unwrap();
    fs::write(up.join("c/empty"), b"").unwrap();
    fs::write(up.join(std::ffi::OsStr::from_bytes(b"c/caf\xe9 \\x.jpg")), noise(2, 20_000)).unwrap();
    fs::write(up.join("top.pdf"), noise(3, 70_000)).unwrap();
    std::os::unix::fs::symlink("a/text.txt", up.join("link")).unwrap();
    fs::set_permissions(up.join("top.pdf"), fs::Permissions::from_mode(0o640)).unwrap();
    let db = dir.join("app.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 3000)
         INSERT INTO t(v) SELECT printf('row %d %s', i, hex(randomblob(40))) FROM n;",
    )
    .unwrap();
    db
}

pub fn options(key: &ChunkKey, keys: &Keys, created: DateTime<Utc>) -> WriterOptions {
    WriterOptions {
        kind: ArchiveKind::Backup,
        created,
        recipients: vec![keys.recipient.clone()],
        chunk_key: key.clone(),
        level: 3,
        progress: Arc::new(NoProgress),
        racy_window_ms: 0,
        workers: 2,
    }
}

pub fn meta() -> SnapshotMeta {
    SnapshotMeta {
        host: "test".into(),
        user: "root".into(),
        trigger: "manual".into(),
        comment: None,
        source: SourceInfo { database: "app.db".into(), uploads: Some("uploads".into()) },
        uploads: Some(TreeInfo::default()),
        changed_during_backup: vec![],
        skipped: vec![],
    }
}

#[derive(Debug, Default)]
pub struct WalkStats {
    pub reused: u64,
    pub read: u64,
}

/// What the backup command does: the database first, then the uploads in walk order.
pub fn backup(
    store: &Store,
    cache: &mut Cache,
    key: &ChunkKey,
    keys: &Keys,
    src: &Path,
    created: DateTime<Utc>,
) -> Result<(SnapshotManifest, WalkStats)> {
    let mut w = SnapshotWriter::begin(store, cache, options(key, keys, created))?;
    let db = src.join("app.db");
    if db.exists() {
        let conn = datavault::snapshot::open(&db)?;
        let info = datavault::snapshot::begin(&conn, &db)?;
        let res = w.add_database(&conn, &db, &info, created);
        datavault::snapshot::end(&conn);
        res?;
    }
    let mut stats = WalkStats::default();
    let up = src.join("uploads");
    if up.exists() {
        walk(&mut w, &up, &mut stats)?;
    }
    Ok((w.finish(meta())?, stats))
}

pub fn walk(w: &mut SnapshotWriter<'_>, root: &Path, stats: &mut WalkStats) -> Result<()> {
    for item in walkdir::WalkDir::new(root).follow_links(false).sort_by_file_name() {
        let item = item.unwrap();
        let mut rel = b"uploads".to_vec();
        let tail = item.path().strip_prefix(root).unwrap();
        if !tail.as_os_str().is_empty() {
            rel.push(b'/');
            rel.extend_from_slice(tail.as_os_str().as_bytes());
        }
        let m = fs::symlink_metadata(item.path()).unwrap();
        let meta = EntryMeta::from_metadata(&m);
        if m.is_dir() {
            w.add_dir(&rel, &meta)?;
        } else if m.file_type().is_symlink() {
            let t = fs::read_link(item.path()).unwrap();
            w.add_symlink(&rel, &meta, t.as_os_str().as_bytes())?;
        } else if m.is_file() {
            let stat = FileStat::from_metadata(&m);
            if w.reuse_unchanged(&rel, &meta, &stat)?.is_some() {
                stats.reused += 1;
                continue;
            }
            stats.read += 1;
            let mut f = fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(item.path())
                .unwrap();
            match w.add_file(&rel, &meta, Some(&stat), &mut f, m.len())? {
                FileOutcome::Added { .. } => {}
                FileOutcome::Unreadable(e) => panic!("{}: {e}", item.path().display()),
            }
        }
    }
    Ok(())
}

/// What a restore into staging does (simplified: the lead's extractor adds room checks,
/// owners, folder modes last and the journal).
pub fn restore(
    store: &Store,
    cache: &mut Cache,
    name: &str,
    ids: &std::sync::Arc<Identities>,
    dest: &Path,
) -> Result<u64> {
    let mut r = SnapshotReader::open(store, cache, name, ids.clone(), &NoProgress)?;
    let mut n = 0;
    while let Some(e) = r.next_entry()? {
        let mut p = dest.to_path_buf();
        for c in &e.parts {
            p.push(std::ffi::OsStr::from_bytes(c));
        }
        n += 1;
        match e.kind {
            datavault::store::dedup::format::TreeKind::Dir => fs::create_dir_all(&p).unwrap(),
            datavault::store::dedup::format::TreeKind::Symlink => {
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(e.target.as_ref().unwrap()), &p)
                    .unwrap()
            }
            datavault::store::dedup::format::TreeKind::File => {
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                let mut f =
                    fs::OpenOptions::new().write(true).create_new(true).mode(e.meta.mode).open(&p).unwrap();
                io::copy(&mut r.content(), &mut f).map_err(|err| content_error(name, err))?;
                f.flush().unwrap();
            }
        }
    }
    Ok(n)
}

/// Read a whole snapshot, writing nothing (verify --deep).
pub fn read_all(
    store: &Store,
    cache: &mut Cache,
    name: &str,
    ids: &std::sync::Arc<Identities>,
) -> Result<u64> {
    let mut r = SnapshotReader::open(store, cache, name, ids.clone(), &NoProgress)?;
    let mut bytes = 0;
    while let Some(_e) = r.next_entry()? {
        bytes += io::copy(&mut r.content(), &mut io::sink()).map_err(|err| content_error(name, err))?;
    }
    Ok(bytes)
}

/// Every path under `dir` with what it is: file content, link target or folder.
pub fn digest(dir: &Path) -> BTreeMap<Vec<u8>, (String, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for item in walkdir::WalkDir::new(dir).follow_links(false).sort_by_file_name() {
        let item = item.unwrap();
        let rel = item.path().strip_prefix(dir).unwrap().as_os_str().as_bytes().to_vec();
        let m = fs::symlink_metadata(item.path()).unwrap();
        let v = if m.is_dir() {
            ("dir".to_string(), vec![])
        } else if m.file_type().is_symlink() {
            ("link".to_string(), fs::read_link(item.path()).unwrap().as_os_str().as_bytes().to_vec())
        } else {
            (format!("file {:o}", m.permissions().mode() & 0o777), fs::read(item.path()).unwrap())
        };
        out.insert(rel, v);
    }
    out
}

pub fn time(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

/// Fold the WAL into the database file, so its bytes are the committed state.
pub fn checkpoint(db: &Path) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
}

pub fn backend_files(b: &dyn Backend, dir: &str) -> Vec<String> {
    let mut v: Vec<String> = b.list(dir).unwrap().into_iter().map(|o| o.name).collect();
    v.sort();
    v
}
