//! The snapshot engine (#9) end to end on a MemoryBackend: round trip, deduplication, the
//! file cache, keyless and deep verification, forget + GC.

mod dedup_util;

use std::fs;
use std::sync::Arc;

use datavault::progress::NoProgress;
use datavault::store::backend::{Backend, LocalBackend, MemoryBackend};
use datavault::store::dedup::gc::{self, GcOptions};
use datavault::store::dedup::{verify, Cache, ChunkKey, Store};
use dedup_util::*;

#[test]
fn a_snapshot_restores_byte_for_byte() {
    let src = tempfile::tempdir().unwrap();
    let db = make_source(src.path());
    checkpoint(&db);
    let (_mem, store) = mem_store();
    let mut cache = Cache::open_private().unwrap();
    let (key, keys) = (ChunkKey::random(), Keys::new());
    let (m, _) =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-23T04:00:00.000Z")).unwrap();
    assert_eq!(m.snapshot, "backup-20261123T040000.000Z");
    assert_eq!(m.files, 7, "db, 5 files, 1 symlink");
    let listed = store.list_snapshots().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].is_complete(), "{:?}", listed[0].problem);

    // A fresh cache (a new Pi) restores from the drive alone.
    let mut fresh = Cache::open_private().unwrap();
    let out = tempfile::tempdir().unwrap();
    restore(&store, &mut fresh, &m.snapshot, &keys.ids(), out.path()).unwrap();
    assert_eq!(digest(&out.path().join("uploads")), digest(&src.path().join("uploads")));
    assert_eq!(fs::read(out.path().join("db/app.db")).unwrap(), fs::read(&db).unwrap());
    let c = rusqlite::Connection::open(out.path().join("db/app.db")).unwrap();
    let ok: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");

    verify::verify_snapshot(&store, &mut fresh, &m.snapshot, &NoProgress).unwrap();
    let all = verify::verify_store(&store, &mut fresh, &NoProgress).unwrap();
    assert!(all.problems.is_empty(), "{:?}", all.problems);
    assert_eq!(all.snapshots, 1);
    assert_eq!(all.unindexed_packs, 0);
}

#[test]
fn the_same_store_works_on_the_local_drive() {
    let src = tempfile::tempdir().unwrap();
    make_source(src.path());
    let drive = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(drive.path()).unwrap());
    let store = Store::open_or_create_with(backend.clone(), test_params(), 256 << 10).unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut cache = Cache::open(&state.path().join("cache.db")).unwrap();
    let (key, keys) = (ChunkKey::random(), Keys::new());
    let (m, _) =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-23T04:00:00.000Z")).unwrap();
    drop(cache);
    // The cache file itself is damaged: rebuilt from the drive.
    fs::write(state.path().join("cache.db"), b"garbage, not SQLite").unwrap();
    let mut cache = Cache::open(&state.path().join("cache.db")).unwrap();
    let out = tempfile::tempdir().unwrap();
    restore(&store, &mut cache, &m.snapshot, &keys.ids(), out.path()).unwrap();
    assert_eq!(digest(&out.path().join("uploads")), digest(&src.path().join("uploads")));
    let partials: Vec<_> = walkdir::WalkDir::new(drive.path())
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
    let reopened = Store::open(backend).unwrap().unwrap();
    assert_eq!(reopened.config(), store.config());
}

#[test]
fn a_second_snapshot_costs_what_changed() {
    let src = tempfile::tempdir().unwrap();
    let db = make_source(src.path());
    let (_mem, store) = mem_store();
    let mut cache = Cache::open_private().unwrap();
    let (key, keys) = (ChunkKey::random(), Keys::new());
    let (first, s1) =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-23T04:00:00.000Z")).unwrap();
    assert_eq!(s1.reused, 0);

    // Day two: a few rows, one byte in the middle of the big file, one new file, one gone.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "UPDATE t SET v = 'changed' WHERE id IN (10, 1500); INSERT INTO t(v) VALUES ('new row');",
    )
    .unwrap();
    drop(c);
    let big = src.path().join("uploads/a/b/big.bin");
    let mut bytes = fs::read(&big).unwrap();
    bytes[150_000] ^= 0xff;
    fs::write(&big, &bytes).unwrap();
    fs::write(src.path().join("uploads/c/new.txt"), noise(9, 5000)).unwrap();
    fs::remove_file(src.path().join("uploads/top.pdf")).unwrap();

    let (second, s2) =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-24T04:00:00.000Z")).unwrap();
    assert_eq!(s2.read, 2, "only the changed and the new file are read: {s2:?}");
    assert_eq!(s2.reused, 3);
    // First: ~0.9 MB of content. Second: 2-3 DB pages, one 16 KiB-ish chunk of the big file,
    // the new file, plus tree, refs and index: far under 10 % of the first.
    assert!(
        second.added_bytes * 10 < first.added_bytes,
        "second added {} bytes, first {}",
        second.added_bytes,
        first.added_bytes
    );
    assert!(second.added_chunks <= 8, "{} new chunks", second.added_chunks);

    // Both restore exactly.
    let out = tempfile::tempdir().unwrap();
    restore(&store, &mut cache, &second.snapshot, &keys.ids(), out.path()).unwrap();
    assert_eq!(digest(&out.path().join("uploads")), digest(&src.path().join("uploads")));
    read_all(&store, &mut cache, &first.snapshot, &keys.ids()).unwrap();

    // A lost chunk key (a new one) only costs deduplication: the store still works.
    let (third, s3) =
        backup(&store, &mut cache, &ChunkKey::random(), &keys, src.path(), time("2026-11-25T04:00:00.000Z"))
            .unwrap();
    assert_eq!(s3.reused, 0, "file cache entries made with the old key are not trusted");
    assert!(third.added_bytes > second.added_bytes * 5);
    read_all(&store, &mut cache, &third.snapshot, &keys.ids()).unwrap();
}

#[test]
fn gc_frees_dead_packs_and_keeps_every_live_chunk() {
    let src = tempfile::tempdir().unwrap();
    make_source(src.path());
    let (mem, store) = mem_store();
    let mut cache = Cache::open_private().unwrap();
    let (key, keys) = (ChunkKey::random(), Keys::new());
    let mut names = Vec::new();
    for day in 0..4u64 {
        // Each day replaces most of the content: old packs become dead or mostly dead.
        fs::write(src.path().join("uploads/a/b/big.bin"), noise(100 + day, 300_000)).unwrap();
        fs::write(src.path().join("uploads/top.pdf"), noise(200 + day, 70_000)).unwrap();
        let t = time(&format!("2026-11-2{}T04:00:00.000Z", day + 1));
        names.push(backup(&store, &mut cache, &key, &keys, src.path(), t).unwrap().0.snapshot);
    }
    let before = verify::totals(&store).unwrap().bytes();
    for n in &names[..3] {
        gc::forget(&store, n).unwrap();
    }
    let opts = GcOptions { max_extra_bytes: 300 << 10, ..Default::default() };
    let plan = gc::plan(&store, &mut cache, &opts).unwrap();
    assert!(plan.blocked_by.is_empty(), "{:?}", plan.blocked_by);
    assert!(!plan.delete.is_empty() || !plan.repack.is_empty(), "{plan:?}");
    assert_eq!(plan.missing_chunks, 0);
    let out = plan.execute(&store, &mut cache, &opts, &NoProgress).unwrap();
    let after = verify::totals(&store).unwrap().bytes();
    assert!(after < before, "{after} >= {before}");
    assert!(out.bytes_freed > 0 && out.damaged_packs.is_empty(), "{out:?}");
    // Close to what the plan said (index files are rewritten, so not exactly).
    let diff = (out.bytes_freed as i64 - plan.bytes_freed as i64).unsigned_abs();
    assert!(
        diff < plan.bytes_freed / 5 + (32 << 10),
        "planned {} freed {}",
        plan.bytes_freed,
        out.bytes_freed
    );
    // What is left is about one snapshot's worth.
    let kept = store.read_manifest(&names[3]).unwrap();
    assert!(after <= kept.stored_bytes * 13 / 10 + (64 << 10), "{after} vs {}", kept.stored_bytes);
    // Everything kept still reads back, from the cache and from the drive alone.
    let out_dir = tempfile::tempdir().unwrap();
    let mut fresh = Cache::open_private().unwrap();
    restore(&store, &mut fresh, &names[3], &keys.ids(), out_dir.path()).unwrap();
    assert_eq!(digest(&out_dir.path().join("uploads")), digest(&src.path().join("uploads")));
    let check = verify::verify_store(&store, &mut cache, &NoProgress).unwrap();
    assert!(check.problems.is_empty() && check.unindexed_packs == 0, "{check:?}");
    // A second GC finds nothing to do; a backup after GC deduplicates against the repacked chunks.
    assert!(gc::plan(&store, &mut cache, &opts).unwrap().is_empty());
    let (m, _) =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-29T04:00:00.000Z")).unwrap();
    assert_eq!(m.added_chunks, 0, "nothing new: every chunk is still found after repacking");
    assert!(mem.snapshot().keys().all(|k| !k.ends_with(".partial")));
}

/// A pack lost from the drive leaves chunks of a kept snapshot missing, but no leftover pack
/// can hold them (an index names them elsewhere): the collection still frees dead packs and
/// leftovers. Only chunks no index names at all keep leftover packs (tests/snapshots.rs,
/// `a_lost_index_file_...`).
#[test]
fn a_lost_pack_does_not_stop_the_collection_of_dead_ones() {
    let src = tempfile::tempdir().unwrap();
    make_source(src.path());
    let (mem, store) = mem_store();
    let mut cache = Cache::open_private().unwrap();
    let (key, keys) = (ChunkKey::random(), Keys::new());
    let packs = |mem: &MemoryBackend| -> Vec<String> {
        mem.snapshot().into_keys().filter(|k| k.starts_with("store/packs/")).collect()
    };
    fs::write(src.path().join("uploads/a/b/big.bin"), noise(300, 300_000)).unwrap();
    let first =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-21T04:00:00.000Z")).unwrap();
    let packs_before = packs(&mem);
    fs::write(src.path().join("uploads/a/b/big.bin"), noise(301, 300_000)).unwrap();
    let second =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-22T04:00:00.000Z")).unwrap();
    let new_pack =
        packs(&mem).into_iter().find(|p| !packs_before.contains(p)).expect("the second backup wrote a pack");
    mem.remove(&new_pack).unwrap();
    gc::forget(&store, &first.0.snapshot).unwrap();
    // A leftover of a killed backup: a pack no index names.
    let leftover = format!("store/packs/ab/ab{}", "0".repeat(62));
    mem.put(&leftover, vec![7u8; 1000]);

    let plan = gc::plan(&store, &mut cache, &GcOptions::default()).unwrap();
    assert!(plan.missing_chunks > 0, "the lost pack's chunks are missing: {plan:?}");
    assert!(plan.blocked_by.is_empty(), "{:?}", plan.blocked_by);
    assert!(plan.leftovers.contains(&leftover), "{:?}", plan.leftovers);
    assert!(
        !plan.delete.is_empty() || !plan.repack.is_empty(),
        "the first snapshot's dead packs go: {plan:?}"
    );
    assert!(second.0.snapshot != first.0.snapshot);
}

#[test]
fn keyless_verify_finds_a_flipped_byte_in_a_pack() {
    let src = tempfile::tempdir().unwrap();
    make_source(src.path());
    let (mem, store) = mem_store();
    let mut cache = Cache::open_private().unwrap();
    let (key, keys) = (ChunkKey::random(), Keys::new());
    let (m, _) =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-23T04:00:00.000Z")).unwrap();
    let pack = mem.snapshot().keys().find(|k| k.starts_with("store/packs/")).unwrap().clone();
    let mut bytes = mem.snapshot()[&pack].clone();
    bytes[100] ^= 1;
    mem.put(&pack, bytes);
    let e = verify::verify_snapshot(&store, &mut cache, &m.snapshot, &NoProgress).unwrap_err();
    assert_eq!(e.exit_code(), 4, "{e}");
    let all = verify::verify_store(&store, &mut cache, &NoProgress).unwrap();
    assert!(all.problems.iter().any(|p| p.object == pack), "{:?}", all.problems);
}

/// Red team 2026-12-07, finding 2, at the engine: a reader marks the damaged copy of a chunk
/// it meets; the next backup then stores that chunk again instead of deduplicating against
/// it; every snapshot reads the new copy; and a reader whose cache knows no mark (a fresh
/// Pi) that meets the damaged copy first reads the other one.
#[test]
fn a_damaged_chunk_is_stored_again_and_read_from_its_other_copy() {
    let src = tempfile::tempdir().unwrap();
    make_source(src.path());
    let (mem, store) = mem_store();
    let mut cache = Cache::open_private().unwrap();
    let (key, keys) = (ChunkKey::random(), Keys::new());
    let ids = keys.ids();
    let (a, _) =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-23T04:00:00.000Z")).unwrap();
    let whole = read_all(&store, &mut cache, &a.snapshot, &ids).unwrap();
    // The last byte of the biggest pack: the last blob's authentication tag.
    let files = mem.snapshot();
    let pack =
        files.keys().filter(|k| k.starts_with("store/packs/")).max_by_key(|k| files[*k].len()).unwrap();
    let mut bytes = files[pack].clone();
    *bytes.last_mut().unwrap() ^= 1;
    mem.put(pack, bytes);
    let pack_hash = pack.rsplit('/').next().unwrap().to_string();

    let e = read_all(&store, &mut cache, &a.snapshot, &ids).unwrap_err().to_string();
    let at = e.find("chunk ").unwrap_or_else(|| panic!("names the chunk: {e}")) + "chunk ".len();
    let chunk: [u8; 32] = hex::decode(&e[at..at + 64]).unwrap().try_into().unwrap();
    assert_eq!(cache.locate(&chunk).unwrap(), None, "the damaged copy is marked: not stored any more");

    let (b, _) =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-24T04:00:00.000Z")).unwrap();
    let copies = cache.locate_all(&chunk).unwrap();
    assert_eq!(copies.len(), 2, "stored again: {copies:?}");
    assert_eq!(read_all(&store, &mut cache, &b.snapshot, &ids).unwrap(), whole);
    assert_eq!(read_all(&store, &mut cache, &a.snapshot, &ids).unwrap(), whole, "the older snapshot too");

    // A fresh cache: no marks. Make it meet the damaged copy first (by marking the good one,
    // which only orders the lookup): the reader still gets the chunk, from the good copy.
    let mut fresh = Cache::open_private().unwrap();
    fresh.sync(&store).unwrap();
    let good = copies.iter().find(|l| hex::encode(l.pack) != pack_hash).unwrap();
    fresh.mark_damaged(good).unwrap();
    assert_eq!(read_all(&store, &mut fresh, &a.snapshot, &ids).unwrap(), whole);
}
