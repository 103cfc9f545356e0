//! Power cuts at every step of a backup and of a GC, at engine level: a Backend wrapper
//! that dies at its Nth mutating operation (create, write, commit, remove), looped over
//! every N. After each cut: every snapshot that existed reads back complete, nothing that
//! looks complete is bad, keyless verify finds no damage, and the next GC and backup work.

mod dedup_util;

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datavault::progress::NoProgress;
use datavault::store::backend::{Backend, MemoryBackend, NewObject, ObjectInfo};
use datavault::store::dedup::gc::{self, GcOptions};
use datavault::store::dedup::{verify, Cache, ChunkKey, Store};
use dedup_util::*;

/// Dies (every later call fails) at its `fail_at`-th mutating operation; counts them.
#[derive(Clone)]
struct Faulty {
    inner: MemoryBackend,
    ops: Arc<AtomicU64>,
    fail_at: u64,
}

impl Faulty {
    fn step(&self) -> io::Result<()> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.fail_at {
            return Err(io::Error::other(format!("power cut at operation {}", self.fail_at)));
        }
        Ok(())
    }
    fn alive(&self) -> io::Result<()> {
        if self.ops.load(Ordering::SeqCst) >= self.fail_at {
            return Err(io::Error::other("the machine is off"));
        }
        Ok(())
    }
}

struct FaultyObject {
    inner: Box<dyn NewObject>,
    owner: Faulty,
}

impl Write for FaultyObject {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.owner.step()?;
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl NewObject for FaultyObject {
    fn commit(self: Box<Self>) -> io::Result<()> {
        self.owner.step()?;
        self.inner.commit()
    }
    fn commit_as(self: Box<Self>, path: &str) -> io::Result<()> {
        self.owner.step()?;
        self.inner.commit_as(path)
    }
}

impl Backend for Faulty {
    fn location(&self) -> String {
        "faulty".into()
    }
    fn list(&self, dir: &str) -> io::Result<Vec<ObjectInfo>> {
        self.alive()?;
        self.inner.list(dir)
    }
    fn size(&self, path: &str) -> io::Result<Option<u64>> {
        self.alive()?;
        self.inner.size(path)
    }
    fn read_small(&self, path: &str, max: u64) -> io::Result<Vec<u8>> {
        self.alive()?;
        self.inner.read_small(path, max)
    }
    fn open(&self, path: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        self.alive()?;
        self.inner.open(path)
    }
    fn read_range(&self, path: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        self.alive()?;
        self.inner.read_range(path, offset, len)
    }
    fn create(&self, path: &str) -> io::Result<Box<dyn NewObject>> {
        self.step()?;
        Ok(Box::new(FaultyObject { inner: self.inner.create(path)?, owner: self.clone() }))
    }
    fn remove(&self, path: &str) -> io::Result<()> {
        self.step()?;
        self.inner.remove(path)
    }
}

fn copy_of(m: &MemoryBackend) -> MemoryBackend {
    let c = MemoryBackend::new();
    for (k, v) in m.snapshot() {
        c.put(&k, v);
    }
    c
}

/// After a cut: every complete snapshot reads back, `must` ones are complete, the keyless
/// check is clean, and GC then a backup succeed.
fn check_after_cut(
    mem: &MemoryBackend,
    must: &[String],
    keys: &Keys,
    key: &ChunkKey,
    src: &std::path::Path,
    what: &str,
) {
    let store = Store::open(Arc::new(mem.clone())).unwrap().unwrap();
    let mut cache = Cache::open_private().unwrap();
    let listed = store.list_snapshots().unwrap();
    for name in must {
        let l = listed.iter().find(|l| &l.name == name).unwrap_or_else(|| panic!("{what}: {name} vanished"));
        assert!(l.is_complete(), "{what}: {name}: {:?}", l.problem);
    }
    for l in listed.iter().filter(|l| l.is_complete()) {
        read_all(&store, &mut cache, &l.name, &keys.ids())
            .unwrap_or_else(|e| panic!("{what}: {} looks complete: {e}", l.name));
    }
    let check = verify::verify_store(&store, &mut cache, &NoProgress).unwrap();
    assert!(check.problems.is_empty(), "{what}: {:?}", check.problems);
    let opts = GcOptions::default();
    let plan = gc::plan(&store, &mut cache, &opts).unwrap();
    assert!(plan.blocked_by.is_empty() && plan.missing_chunks == 0, "{what}: {plan:?}");
    plan.execute(&store, &mut cache, &opts, &NoProgress).unwrap();
    let (m, _) = backup(&store, &mut cache, key, keys, src, time("2026-12-01T04:00:00.000Z")).unwrap();
    read_all(&store, &mut cache, &m.snapshot, &keys.ids()).unwrap();
    for name in must {
        read_all(&store, &mut cache, name, &keys.ids())
            .unwrap_or_else(|e| panic!("{what}: after recovery {name}: {e}"));
    }
    assert!(mem.snapshot().keys().all(|k| !k.ends_with(".partial")), "{what}: partials left after GC");
}

#[test]
fn a_backup_cut_at_any_step_harms_nothing() {
    let src = tempfile::tempdir().unwrap();
    let db = make_source(src.path());
    let (base, store) = mem_store();
    let (key, keys) = (ChunkKey::random(), Keys::new());
    let mut cache = Cache::open_private().unwrap();
    let (a, _) =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-23T04:00:00.000Z")).unwrap();
    // Day two's changes: some new chunks to pack.
    std::fs::write(src.path().join("uploads/a/b/big.bin"), noise(77, 300_000)).unwrap();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("UPDATE t SET v = 'x' WHERE id % 97 = 0;")
        .unwrap();

    let mut n = 1;
    loop {
        let mem = copy_of(&base);
        let faulty = Faulty { inner: mem.clone(), ops: Arc::new(AtomicU64::new(0)), fail_at: n };
        let store = Store::open(Arc::new(faulty.clone())).unwrap().unwrap();
        let mut cache = Cache::open_private().unwrap();
        let res = backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-24T04:00:00.000Z"));
        let what = format!("backup cut at operation {n}");
        match res {
            Ok(_) => {
                assert!(n > 3, "the backup needs some writes");
                check_after_cut(
                    &mem,
                    &[a.snapshot.clone(), "backup-20261124T040000.000Z".into()],
                    &keys,
                    &key,
                    src.path(),
                    &what,
                );
                break;
            }
            Err(e) => {
                assert_ne!(e.exit_code(), 4, "{what}: a write failure is not an integrity failure: {e}");
                // Cut before the manifest: B must not exist (or exist complete, if the cut hit after it).
                check_after_cut(&mem, std::slice::from_ref(&a.snapshot), &keys, &key, src.path(), &what);
            }
        }
        n += 1;
        assert!(n < 500, "a backup should not need 500 operations");
    }
    eprintln!("backup: cut at each of {n} operations");
}

#[test]
fn a_prune_cut_at_any_step_loses_nothing_still_referenced() {
    let src = tempfile::tempdir().unwrap();
    make_source(src.path());
    let (base, store) = mem_store();
    let (key, keys) = (ChunkKey::random(), Keys::new());
    let mut cache = Cache::open_private().unwrap();
    let mut names = Vec::new();
    for day in 0..3u64 {
        std::fs::write(src.path().join("uploads/a/b/big.bin"), noise(300 + day, 300_000)).unwrap();
        let t = time(&format!("2026-11-2{}T04:00:00.000Z", day + 1));
        names.push(backup(&store, &mut cache, &key, &keys, src.path(), t).unwrap().0.snapshot);
    }
    // A killed backup's leftovers too: an unindexed pack and a tree without manifest.
    let junk = vec![1u8; 10];
    let junk_name = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&junk))
    };
    base.put(&format!("store/packs/{}/{junk_name}", &junk_name[..2]), junk);
    base.put("store/snapshots/backup-20261126T040000.000Z.tree", vec![2; 10]);

    let opts = GcOptions { max_extra_bytes: 128 << 10, ..Default::default() };
    let mut n = 1;
    loop {
        let mem = copy_of(&base);
        let faulty = Faulty { inner: mem.clone(), ops: Arc::new(AtomicU64::new(0)), fail_at: n };
        let store = Store::open(Arc::new(faulty.clone())).unwrap().unwrap();
        let mut cache = Cache::open_private().unwrap();
        let what = format!("prune cut at operation {n}");
        let res = (|| {
            gc::forget(&store, &names[0])?;
            gc::forget(&store, &names[1])?;
            let plan = gc::plan(&store, &mut cache, &opts)?;
            assert!(!plan.repack.is_empty() || !plan.delete.is_empty(), "{plan:?}");
            plan.execute(&store, &mut cache, &opts, &NoProgress)
        })();
        let done = res.is_ok();
        check_after_cut(&mem, std::slice::from_ref(&names[2]), &keys, &key, src.path(), &what);
        if done {
            break;
        }
        n += 1;
        assert!(n < 500, "a prune should not need 500 operations");
    }
    eprintln!("prune: cut at each of {n} operations");
}
