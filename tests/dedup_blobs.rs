//! Blobs on the drive, one by one (#9): every blob of a store is a standard age file that the
//! plain `age` crate and the `age` command open alone; blobs of a pack share its header (one
//! file key per pack) and never a nonce; a store made for two recipients restores with each.

mod dedup_util;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::process::{Command, Stdio};

use datavault::store::backend::MemoryBackend;
use datavault::store::dedup::format::IndexFile;
use datavault::store::dedup::write::SnapshotWriter;
use datavault::store::dedup::{Cache, ChunkKey, Store};
use dedup_util::*;

/// Every blob of the store: (pack, chunk id, blob bytes, plaintext length).
fn blobs(mem: &MemoryBackend) -> Vec<(String, String, Vec<u8>, u64)> {
    let files = mem.snapshot();
    let mut out = Vec::new();
    for (path, bytes) in files.iter().filter(|(p, _)| p.starts_with("store/index/")) {
        let index: IndexFile = serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
        for p in index.packs {
            let pack = &files[&format!("store/packs/{}/{}", &p.pack[..2], p.pack)];
            for b in p.blobs {
                out.push((
                    p.pack.clone(),
                    hex::encode(b.0),
                    pack[b.1 as usize..(b.1 + b.2) as usize].to_vec(),
                    b.3,
                ));
            }
        }
    }
    out
}

/// The age header's length: up to and including the `--- MAC` line.
fn header_len(blob: &[u8]) -> usize {
    let at = blob.windows(4).position(|w| w == b"\n---").expect("a MAC line") + 1;
    at + blob[at..].iter().position(|&b| b == b'\n').unwrap() + 1
}

fn age_cli(blob: &[u8], identity_file: &std::path::Path) -> Vec<u8> {
    let mut child = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = blob.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "age -d: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn have_age() -> bool {
    Command::new("age").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

#[test]
fn every_blob_is_an_age_file_of_its_own_with_its_packs_header_and_a_fresh_nonce() {
    let src = tempfile::tempdir().unwrap();
    let db = make_source(src.path());
    checkpoint(&db);
    let (mem, store) = mem_store();
    let mut cache = Cache::open_private().unwrap();
    let (key, keys) = (ChunkKey::random(), Keys::new());
    backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-23T04:00:00.000Z")).unwrap();
    std::fs::write(src.path().join("uploads/new.bin"), noise(9, 300_000)).unwrap();
    backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-24T04:00:00.000Z")).unwrap();

    let all = blobs(&mem);
    let packs: HashSet<&str> = all.iter().map(|b| b.0.as_str()).collect();
    assert!(all.len() > 20 && packs.len() > 2, "{} blobs in {} packs", all.len(), packs.len());
    let cli = have_age();
    if !cli {
        eprintln!("SKIPPED the age command's part: `age` is not installed (apt install age)");
    }
    let key_dir = tempfile::tempdir().unwrap();
    let id_file = key_dir.path().join("identity.txt");
    use age::secrecy::ExposeSecret;
    std::fs::write(&id_file, format!("{}\n", keys.identity.to_string().expose_secret())).unwrap();

    let mut headers: HashMap<&str, Vec<u8>> = HashMap::new();
    let mut nonces = HashSet::new();
    for (pack, id, blob, plain_len) in &all {
        let h = header_len(blob);
        // One header (one file key) per pack, a different one for each pack.
        let header = headers.entry(pack.as_str()).or_insert_with(|| blob[..h].to_vec());
        assert_eq!(&blob[..h], &header[..], "blobs of pack {pack} differ in their header");
        assert!(nonces.insert(blob[h..h + 16].to_vec()), "a nonce is used twice (chunk {id})");
        // The plain age crate, no cache, no datavault code.
        let d = age::Decryptor::new(&blob[..]).unwrap();
        let mut r = d.decrypt(std::iter::once(&keys.identity as &dyn age::Identity)).unwrap();
        let mut z = Vec::new();
        r.read_to_end(&mut z).unwrap();
        let chunk = zstd::bulk::decompress(&z, *plain_len as usize).unwrap();
        assert_eq!(hex::encode(key.id(&chunk)), *id);
        if cli {
            assert_eq!(age_cli(blob, &id_file), z, "age -d of chunk {id}");
        }
    }
    let distinct: HashSet<&Vec<u8>> = headers.values().collect();
    assert_eq!(distinct.len(), headers.len(), "two packs share a file key");
}

#[test]
fn a_store_for_two_recipients_restores_with_each_identity() {
    let src = tempfile::tempdir().unwrap();
    let db = make_source(src.path());
    checkpoint(&db);
    let (mem, store) = mem_store();
    let mut cache = Cache::open_private().unwrap();
    let (key, a, b) = (ChunkKey::random(), Keys::new(), Keys::new());
    let mut opts = options(&key, &a, time("2026-11-23T04:00:00.000Z"));
    opts.recipients.push(b.recipient.clone());
    let mut w = SnapshotWriter::begin(&store, &mut cache, opts).unwrap();
    walk(&mut w, &src.path().join("uploads"), &mut WalkStats::default()).unwrap();
    let m = w.finish(meta()).unwrap();
    for (pack, _, blob, _) in blobs(&mem) {
        let h = header_len(&blob);
        let stanzas = blob[..h].windows(10).filter(|w| w == b"\n-> X25519").count();
        assert_eq!(stanzas, 2, "pack {pack}: one stanza per recipient");
    }
    for keys in [&a, &b] {
        let mut fresh = Cache::open_private().unwrap();
        let out = tempfile::tempdir().unwrap();
        let store = Store::open(std::sync::Arc::new(mem.clone())).unwrap().unwrap();
        restore(&store, &mut fresh, &m.snapshot, &keys.ids(), out.path()).unwrap();
        assert_eq!(digest(&out.path().join("uploads")), digest(&src.path().join("uploads")));
    }
}
