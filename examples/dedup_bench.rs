//! Measures the snapshot engine (#9) before it is wired into the commands; used by
//! `bench/peers/datavault-engine.sh` (the second-day scenario) and for the chunking choice.
//!
//! ```text
//! dedup_bench backup  WORKDIR OUTDIR STATE    snapshot WORKDIR/app.db + uploads/ (JSON on stdout)
//! dedup_bench restore OUTDIR  DEST   STATE    newest snapshot -> DEST/app.db + DEST/uploads
//! dedup_bench prune   OUTDIR  STATE           keep the newest snapshot, GC (JSON on stdout)
//! dedup_bench dbchunks DB_DAY1 DB_DAY2        bytes day two adds under each chunking of the DB
//! ```
//! Keys: `BENCH_AGE_RECIPIENT`, `BENCH_AGE_IDENTITY` (restore). Chunk key and cache in STATE.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use datavault::error::Result;
use datavault::manifest::{SourceInfo, TreeInfo};
use datavault::progress::NoProgress;
use datavault::retention::ArchiveKind;
use datavault::store::backend::LocalBackend;
use datavault::store::dedup::cache::FileStat;
use datavault::store::dedup::format::TreeKind;
use datavault::store::dedup::gc::{self, GcOptions};
use datavault::store::dedup::read::{content_error, SnapshotReader};
use datavault::store::dedup::write::{
    EntryMeta, FileOutcome, SnapshotMeta, SnapshotWriter, WriterOptions, RACY_WINDOW_MS,
};
use datavault::store::dedup::{load_or_create_chunk_key, verify, Cache, ChunkKey, ChunkerParams, Store};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["backup", work, out, state] => backup(Path::new(work), Path::new(out), Path::new(state)),
        ["restore", out, dest, state] => restore(Path::new(out), Path::new(dest), Path::new(state)),
        ["prune", out, state] => prune(Path::new(out), Path::new(state)),
        ["dbchunks", a, b] => dbchunks(Path::new(a), Path::new(b)),
        _ => {
            eprintln!("usage: see the header of examples/dedup_bench.rs");
            std::process::exit(2)
        }
    };
    if let Err(e) = res {
        eprintln!("dedup_bench: {e}");
        std::process::exit(e.exit_code() as i32);
    }
}

fn peak_rss_kib() -> u64 {
    let s = fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn open_store(out: &Path) -> Result<Store> {
    fs::create_dir_all(out).map_err(|e| datavault::error::Error::io("outdir", e))?;
    let backend = Arc::new(LocalBackend::open(out).map_err(|e| datavault::error::Error::io("outdir", e))?);
    let params = match std::env::var("DV_DB_CHUNK") {
        Ok(v) => {
            ChunkerParams { database_fixed: v.parse().expect("DV_DB_CHUNK: bytes"), ..Default::default() }
        }
        Err(_) => ChunkerParams::default(),
    };
    Store::open_or_create(backend, params)
}

fn backup(work: &Path, out: &Path, state: &Path) -> Result<()> {
    let t0 = Instant::now();
    let store = open_store(out)?;
    let mut cache = Cache::open(&state.join("dedup-cache.db"))?;
    let key = load_or_create_chunk_key(&state.join("chunk.key"))?;
    let recipient: age::x25519::Recipient = std::env::var("BENCH_AGE_RECIPIENT")
        .expect("BENCH_AGE_RECIPIENT")
        .parse()
        .expect("an age1 recipient");
    let created = chrono::Utc::now();
    let opts = WriterOptions {
        kind: ArchiveKind::Backup,
        created,
        recipients: vec![recipient],
        chunk_key: key,
        level: std::env::var("BENCH_ZSTD_LEVEL").ok().and_then(|l| l.parse().ok()).unwrap_or(3),
        progress: Arc::new(NoProgress),
        racy_window_ms: RACY_WINDOW_MS,
        workers: std::env::var("BENCH_WORKERS")
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get().min(4)).unwrap_or(1)),
    };
    let mut w = SnapshotWriter::begin(&store, &mut cache, opts)?;
    let db = work.join("app.db");
    let t_db = Instant::now();
    let conn = datavault::snapshot::open(&db)?;
    let info = datavault::snapshot::begin(&conn, &db)?;
    let res = w.add_database(&conn, &db, &info, created);
    datavault::snapshot::end(&conn);
    res?;
    let db_s = t_db.elapsed().as_secs_f64();
    let (mut reused, mut read, mut tree) = (0u64, 0u64, TreeInfo::default());
    walk(&mut w, &work.join("uploads"), &mut reused, &mut read, &mut tree)?;
    let meta = SnapshotMeta {
        host: "bench".into(),
        user: "bench".into(),
        trigger: "manual".into(),
        comment: Some("bench".into()),
        source: SourceInfo {
            database: db.display().to_string(),
            uploads: Some(work.join("uploads").display().to_string()),
        },
        uploads: Some(tree),
        changed_during_backup: vec![],
        skipped: vec![],
    };
    let m = w.finish(meta)?;
    let (chunks, packs, files) = cache.counts()?;
    let cache_bytes = fs::metadata(state.join("dedup-cache.db")).map(|m| m.len()).unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "snapshot": m.snapshot, "wall_s": t0.elapsed().as_secs_f64(), "db_s": db_s,
            "added_bytes": m.added_bytes, "added_chunks": m.added_chunks, "stored_bytes": m.stored_bytes,
            "plain_bytes": m.plain_bytes, "chunks": m.chunks, "files_reused": reused, "files_read": read,
            "peak_rss_kib": peak_rss_kib(), "cache_chunks": chunks, "cache_packs": packs, "cache_files": files,
            "cache_bytes": cache_bytes, "tree_bytes": m.tree.size,
        })
    );
    Ok(())
}

fn walk(
    w: &mut SnapshotWriter<'_>,
    root: &Path,
    reused: &mut u64,
    read: &mut u64,
    tree: &mut TreeInfo,
) -> Result<()> {
    for item in walkdir::WalkDir::new(root).follow_links(false).sort_by_file_name() {
        let item = item.map_err(|e| datavault::error::Error::source(root, e.to_string()))?;
        let mut rel = b"uploads".to_vec();
        let tail = item.path().strip_prefix(root).expect("below the root");
        if !tail.as_os_str().is_empty() {
            rel.push(b'/');
            rel.extend_from_slice(tail.as_os_str().as_bytes());
        }
        let m = fs::symlink_metadata(item.path())
            .map_err(|e| datavault::error::Error::source(item.path(), e.to_string()))?;
        let meta = EntryMeta::from_metadata(&m);
        if m.is_dir() {
            w.add_dir(&rel, &meta)?;
            tree.dirs += 1;
        } else if m.file_type().is_symlink() {
            let t = fs::read_link(item.path())
                .map_err(|e| datavault::error::Error::source(item.path(), e.to_string()))?;
            w.add_symlink(&rel, &meta, t.as_os_str().as_bytes())?;
            tree.symlinks += 1;
        } else if m.is_file() {
            let stat = FileStat::from_metadata(&m);
            tree.files += 1;
            tree.bytes += m.len();
            if w.reuse_unchanged(&rel, &meta, &stat)?.is_some() {
                *reused += 1;
                continue;
            }
            *read += 1;
            let flags = (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32;
            let mut f = fs::OpenOptions::new()
                .read(true)
                .custom_flags(flags)
                .open(item.path())
                .map_err(|e| datavault::error::Error::source(item.path(), e.to_string()))?;
            if let FileOutcome::Unreadable(e) = w.add_file(&rel, &meta, Some(&stat), &mut f, m.len())? {
                eprintln!("{}: unreadable: {e}", item.path().display());
            }
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        }
    }
    Ok(())
}

fn restore(out: &Path, dest: &Path, state: &Path) -> Result<()> {
    let t0 = Instant::now();
    let store = open_store(out)?;
    let mut cache = Cache::open(&state.join("dedup-cache.db"))?;
    let ids = Arc::new(datavault::keys::load_identities(
        std::env::var("BENCH_AGE_IDENTITY").ok().as_deref().map(Path::new),
    )?);
    let newest = store.list_snapshots()?.into_iter().find(|l| l.is_complete()).expect("a complete snapshot");
    let mut r = SnapshotReader::open(&store, &mut cache, &newest.name, ids, &NoProgress)?;
    let mut bytes = 0u64;
    while let Some(e) = r.next_entry()? {
        let mut p = dest.to_path_buf();
        // db/<name> -> app.db at the top: the bench's layout.
        if e.parts[0] == b"db" {
            p.push("app.db");
        } else {
            for c in &e.parts {
                p.push(std::ffi::OsStr::from_bytes(c));
            }
        }
        let io_err = |e: io::Error| datavault::error::Error::io("restore", e);
        match e.kind {
            TreeKind::Dir => fs::create_dir_all(&p).map_err(io_err)?,
            TreeKind::Symlink => std::os::unix::fs::symlink(
                std::ffi::OsStr::from_bytes(e.target.as_deref().unwrap_or(b"?")),
                &p,
            )
            .map_err(io_err)?,
            TreeKind::File => {
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).map_err(io_err)?;
                }
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)
                    .map_err(io_err)?;
                // io::copy reads straight into a BufWriter's buffer: 256 KiB writes, not 8 KiB.
                let mut f = io::BufWriter::with_capacity(256 << 10, f);
                bytes +=
                    io::copy(&mut r.content(), &mut f).map_err(|err| content_error(&newest.name, err))?;
                f.into_inner().map_err(|e| io_err(e.into_error()))?;
            }
        }
    }
    let f = fs::File::open(dest).map_err(|e| datavault::error::Error::io("dest", e))?;
    let _ = rustix::fs::syncfs(&f);
    println!(
        "{}",
        serde_json::json!({"snapshot": newest.name, "wall_s": t0.elapsed().as_secs_f64(), "bytes": bytes, "peak_rss_kib": peak_rss_kib()})
    );
    Ok(())
}

fn prune(out: &Path, state: &Path) -> Result<()> {
    let t0 = Instant::now();
    let store = open_store(out)?;
    let mut cache = Cache::open(&state.join("dedup-cache.db"))?;
    let before = verify::totals(&store)?.bytes();
    let snaps = store.list_snapshots()?;
    for l in snaps.iter().skip(1) {
        gc::forget(&store, &l.name)?;
    }
    let opts = GcOptions::default();
    let plan = gc::plan(&store, &mut cache, &opts)?;
    let t_plan = t0.elapsed().as_secs_f64();
    let outcome = plan.execute(&store, &mut cache, &opts, &NoProgress)?;
    let after = verify::totals(&store)?.bytes();
    println!(
        "{}",
        serde_json::json!({
            "wall_s": t0.elapsed().as_secs_f64(), "plan_s": t_plan, "planned_free": plan.bytes_freed,
            "freed": before - after, "before": before, "after": after, "repacked": outcome.packs_repacked,
            "deleted": outcome.packs_deleted, "extra_space": plan.extra_space, "peak_rss_kib": peak_rss_kib(),
        })
    );
    Ok(())
}

/// Bytes that day two adds to the drive under each chunking of the database.
fn dbchunks(day1: &Path, day2: &Path) -> Result<()> {
    let a = db_bytes(day1)?;
    let b = db_bytes(day2)?;
    let key = ChunkKey::random();
    println!("strategy\tchunks_day1\tnew_chunks\tnew_raw_bytes\tnew_stored_bytes\tstored_day1");
    let fixed = [4096usize, 8192, 16384, 32768, 65536];
    let cdc = [(2048usize, 8192usize, 32768usize), (4096, 16384, 65536), (16384, 65536, 262144)];
    // (strategy, day one's chunks, day two's chunks)
    type Cuts = Vec<Vec<u8>>;
    let mut rows: Vec<(String, Cuts, Cuts)> = Vec::new();
    for f in fixed {
        rows.push((
            format!("fixed {} KiB", f >> 10),
            a.chunks(f).map(<[u8]>::to_vec).collect(),
            b.chunks(f).map(<[u8]>::to_vec).collect(),
        ));
    }
    for (mn, av, mx) in cdc {
        let cut = |d: &[u8]| -> Vec<Vec<u8>> {
            fastcdc::v2020::FastCDC::new(d, mn, av, mx)
                .map(|c| d[c.offset..c.offset + c.length].to_vec())
                .collect()
        };
        rows.push((format!("fastcdc {}/{}/{} KiB", mn >> 10, av >> 10, mx >> 10), cut(&a), cut(&b)));
    }
    for (name, ca, cb) in rows {
        let seen: HashSet<[u8; 32]> = ca.iter().map(|c| key.id(c)).collect();
        let mut new_ids = HashSet::new();
        let (mut raw, mut stored) = (0u64, 0u64);
        for c in &cb {
            let id = key.id(c);
            if !seen.contains(&id) && new_ids.insert(id) {
                raw += c.len() as u64;
                // zstd 3 plus age's ~200-byte header per blob: what the drive gets.
                stored += zstd::bulk::compress(c, 3).map(|z| z.len()).unwrap_or(c.len()) as u64 + 200;
            }
        }
        let stored1: u64 =
            ca.iter().map(|c| zstd::bulk::compress(c, 3).map(|z| z.len()).unwrap_or(0) as u64 + 200).sum();
        println!("{name}\t{}\t{}\t{raw}\t{stored}\t{stored1}", ca.len(), new_ids.len());
    }
    Ok(())
}

fn db_bytes(db: &Path) -> Result<Vec<u8>> {
    let conn = datavault::snapshot::open(db)?;
    let info = datavault::snapshot::begin(&conn, db)?;
    let mut out = Vec::new();
    datavault::snapshot::stream_pages(&conn, db, &info, |r| {
        r.read_to_end(&mut out).map_err(|e| datavault::error::Error::io("db", e))
    })?;
    datavault::snapshot::end(&conn);
    Ok(out)
}
