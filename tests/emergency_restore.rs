//! `scripts/emergency-restore` (Python's standard library + the `age` and `zstd` commands)
//! restores a snapshot made by the engine, byte for byte, without datavault.

mod dedup_util;

use std::fs;
use std::process::Command;
use std::sync::Arc;

use datavault::store::backend::{Backend, LocalBackend};
use datavault::store::dedup::{Cache, ChunkKey, ChunkerParams, Store};
use dedup_util::*;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn the_emergency_script_restores_a_snapshot_without_datavault() {
    let missing: Vec<_> = ["age", "zstd", "python3"].into_iter().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        eprintln!("SKIPPED: the emergency-restore test needs {missing:?} (apt install age zstd python3)");
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let db = make_source(src.path());
    checkpoint(&db);
    let drive = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(drive.path()).unwrap());
    // The production chunk sizes for files, small DB chunks: several chunks and `more` lines.
    let params = ChunkerParams { database_fixed: 4096, ..ChunkerParams::default() };
    let store = Store::open_or_create_with(backend, params, 256 << 10).unwrap();
    let mut cache = Cache::open_private().unwrap();
    let keys = Keys::new();
    let key = ChunkKey::random();
    let t = time("2026-11-23T04:00:00.000Z");
    let (m, _) = backup(&store, &mut cache, &key, &keys, src.path(), t).unwrap();
    // A second snapshot that shares chunks with the first: the script takes the newest.
    fs::write(src.path().join("uploads/new.txt"), b"day two").unwrap();
    let (m2, _) =
        backup(&store, &mut cache, &key, &keys, src.path(), time("2026-11-24T04:00:00.000Z")).unwrap();
    assert!(m2.added_chunks < m.added_chunks);

    let key_dir = tempfile::tempdir().unwrap();
    let id_file = key_dir.path().join("identity.txt");
    use age::secrecy::ExposeSecret;
    fs::write(&id_file, format!("{}\n", keys.identity.to_string().expose_secret())).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/emergency-restore");
    let dest = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .arg(script)
        .arg("--identity")
        .arg(&id_file)
        .arg(drive.path())
        .arg(dest.path().join("r"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = dest.path().join("r");
    assert_eq!(digest(&r.join("uploads")), digest(&src.path().join("uploads")));
    assert_eq!(fs::read(r.join("db/app.db")).unwrap(), fs::read(&db).unwrap());

    // The older one by name; and a damaged pack is refused.
    let out = Command::new("python3")
        .args([script, "--identity"])
        .arg(&id_file)
        .args(["--snapshot", &m.snapshot])
        .arg(drive.path())
        .arg(dest.path().join("old"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dest.path().join("old/uploads/new.txt").exists());
    let pack = walkdir::WalkDir::new(drive.path().join("store/packs"))
        .into_iter()
        .filter_map(|e| e.ok())
        .find(|e| e.file_type().is_file())
        .unwrap();
    let mut bytes = fs::read(pack.path()).unwrap();
    bytes[10] ^= 1;
    fs::write(pack.path(), bytes).unwrap();
    let out = Command::new("python3")
        .args([script, "--identity"])
        .arg(&id_file)
        .arg(drive.path())
        .arg(dest.path().join("bad"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
}
