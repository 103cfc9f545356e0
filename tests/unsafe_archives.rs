//! Hostile archives: validly encrypted to our key, with a correct outer manifest, but with a
//! crafted tar stream inside. Every one must be refused with exit code 4 before anything is
//! written outside the scratch or staging folder, and live data must stay untouched.

mod util;

use std::fs;
use std::path::Path;

use util::Fixture;

struct Raw {
    name: Vec<u8>,
    kind: u8,
    data: Vec<u8>,
    declared: Option<u64>,
    link: Vec<u8>,
}

fn file(name: &[u8], data: &[u8]) -> Raw {
    Raw { name: name.to_vec(), kind: b'0', data: data.to_vec(), declared: None, link: Vec::new() }
}
fn dir(name: &[u8]) -> Raw {
    Raw { name: name.to_vec(), kind: b'5', data: Vec::new(), declared: None, link: Vec::new() }
}
fn link(name: &[u8], kind: u8, target: &[u8]) -> Raw {
    Raw { name: name.to_vec(), kind, data: Vec::new(), declared: None, link: target.to_vec() }
}

/// A tar stream written byte by byte: the tar crate's own builder refuses `..` and friends.
fn tar_bytes(entries: &[Raw]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = [0u8; 512];
        h[..e.name.len()].copy_from_slice(&e.name);
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        let size = e.declared.unwrap_or(e.data.len() as u64);
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = e.kind;
        h[157..157 + e.link.len()].copy_from_slice(&e.link);
        h[257..265].copy_from_slice(b"ustar  \0");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Encrypt `entries` to the fixture's key and publish it with a correct manifest, copied from
/// a real backup so everything but the content is genuine.
fn publish(f: &Fixture, entries: &[Raw], with_database: bool) -> String {
    let real = f.backup();
    let mut m = real["manifest"].clone();
    let tar = tar_bytes(entries);
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    let recipient: age::x25519::Recipient = f.recipient.parse().unwrap();
    let mut enc = Vec::new();
    let mut w = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
        .unwrap()
        .wrap_output(&mut enc)
        .unwrap();
    std::io::Write::write_all(&mut w, &zst).unwrap();
    w.finish().unwrap();
    let stem = "backup-29990101T000000.000Z";
    let name = format!("{stem}.tar.zst.age");
    fs::write(f.target.join(&name), &enc).unwrap();
    use sha2::Digest;
    m["archive"] = name.clone().into();
    m["archive_size"] = (enc.len() as u64).into();
    m["archive_sha256"] = hex::encode(sha2::Sha256::digest(&enc)).into();
    m["created"] = "2999-01-01T00:00:00Z".into();
    m["plain_bytes"] = (1u64 << 20).into();
    if !with_database {
        m["database"] = serde_json::Value::Null;
    }
    fs::write(f.target.join(format!("{stem}.json")), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    name
}

fn nothing_named(root: &Path, needle: &str) -> bool {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().contains(needle))
}

/// Drill, restore --to and restore in place all refuse with exit 4 and touch nothing live.
fn refused(entries: Vec<Raw>, expect_in_message: &str, check: impl Fn(&Fixture)) {
    let f = Fixture::new();
    let name = publish(&f, &entries, true);
    let live = f.fingerprint();
    let r = f.expect(&["drill", &name], 4);
    assert!(
        r.stderr.contains("unsafe content refused") && r.stderr.contains(expect_in_message),
        "{}",
        r.stderr
    );
    let to = f.path().join("restore-to");
    let r = f.expect(&["restore", &name, "--to", to.to_str().unwrap()], 4);
    assert!(r.stderr.contains(expect_in_message), "{}", r.stderr);
    f.expect(&["restore", &name, "--yes"], 4);
    assert_eq!(f.fingerprint(), live, "live data untouched");
    assert!(!f.path().join("service.log").exists(), "the app was never stopped");
    check(&f);
}

#[test]
fn a_crafted_but_harmless_archive_is_accepted_so_the_harness_is_sound() {
    let f = Fixture::new();
    let inner = serde_json::json!({"format": 1, "created": "2999-01-01T00:00:00Z", "entries": [
        {"path": "uploads", "kind": "dir"},
        {"path": "uploads/a.txt", "kind": "file", "size": 5, "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
    ]});
    let name = publish(
        &f,
        &[
            dir(b"uploads/"),
            file(b"uploads/a.txt", b"hello"),
            file(b"MANIFEST.json", inner.to_string().as_bytes()),
        ],
        false,
    );
    let to = f.path().join("out");
    f.expect(&["restore", &name, "--to", to.to_str().unwrap()], 0);
    assert_eq!(fs::read(to.join("uploads/a.txt")).unwrap(), b"hello");
}

#[test]
fn dot_dot_paths_are_refused() {
    refused(vec![dir(b"uploads/"), file(b"uploads/../../dv-escape-dotdot", b"x")], "..", |f| {
        assert!(nothing_named(f.path(), "dv-escape-dotdot"))
    });
}

#[test]
fn absolute_paths_are_refused() {
    let marker = format!("/tmp/dv-escape-abs-{}", std::process::id());
    refused(vec![file(marker.as_bytes(), b"x")], "absolute path", |_| assert!(!Path::new(&marker).exists()));
}

#[test]
fn writing_through_a_symlink_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().as_bytes().to_vec();
    refused(
        vec![dir(b"uploads/"), link(b"uploads/evil", b'2', &target), file(b"uploads/evil/pwned", b"x")],
        "symlink",
        |_| assert!(!outside.path().join("pwned").exists()),
    );
}

#[test]
fn hard_links_are_refused() {
    refused(vec![dir(b"uploads/"), link(b"uploads/passwd", b'1', b"/etc/passwd")], "hard link", |_| {});
}

#[test]
fn device_nodes_and_fifos_are_refused() {
    refused(vec![dir(b"uploads/"), link(b"uploads/null", b'3', b"")], "device node", |_| {});
    refused(vec![dir(b"uploads/"), link(b"uploads/pipe", b'6', b"")], "fifo", |_| {});
}

#[test]
fn a_path_that_is_a_file_then_a_folder_is_refused() {
    refused(
        vec![dir(b"uploads/"), file(b"uploads/a", b"x"), file(b"uploads/a/b", b"y")],
        "below the file",
        |_| {},
    );
}

#[test]
fn duplicate_entries_are_refused() {
    refused(vec![dir(b"uploads/"), file(b"uploads/a", b"x"), file(b"uploads/a", b"y")], "twice", |_| {});
}

#[test]
fn unknown_top_level_entries_are_refused() {
    refused(vec![file(b"etc/cron.d/evil", b"x")], "unexpected top-level", |f| {
        assert!(nothing_named(f.path(), "cron.d"))
    });
}

#[test]
fn huge_declared_sizes_are_refused_before_writing() {
    let mut huge = file(b"uploads/huge", b"tiny");
    huge.declared = Some(1 << 32);
    refused(vec![dir(b"uploads/"), huge], "declares", |f| assert!(nothing_named(f.path(), "huge")));
}

// ---- issue #11: the hostile review ---------------------------------------------------------------

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// The inner manifest for `entries`, so that everything but the chosen flaw is genuine.
fn inner_for(entries: &[Raw]) -> Raw {
    let records: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let path = String::from_utf8_lossy(&e.name).trim_end_matches('/').to_string();
            match e.kind {
                b'5' => serde_json::json!({"path": path, "kind": "dir"}),
                b'2' => serde_json::json!({"path": path, "kind": "symlink", "target": String::from_utf8_lossy(&e.link)}),
                _ if e.data.is_empty() => serde_json::json!({"path": path, "kind": "file"}),
                _ => serde_json::json!({"path": path, "kind": "file", "size": e.data.len(), "sha256": sha256_hex(&e.data)}),
            }
        })
        .collect();
    let inner = serde_json::json!({"format": 1, "created": "2999-01-01T00:00:00Z", "entries": records});
    file(b"MANIFEST.json", inner.to_string().as_bytes())
}

/// Like `publish`, with the outer manifest's database record made to describe `db_entry`.
fn publish_with_db(f: &Fixture, entries: &[Raw], db_entry: &str, db_bytes: &[u8]) -> String {
    let name = publish(f, entries, true);
    let stem = name.strip_suffix(".tar.zst.age").unwrap();
    let mp = f.target.join(format!("{stem}.json"));
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&mp).unwrap()).unwrap();
    m["database"]["entry"] = db_entry.into();
    m["database"]["sha256"] = sha256_hex(db_bytes).into();
    m["database"]["size"] = db_bytes.len().into();
    fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    name
}

#[test]
fn item05_a_top_level_uploads_that_is_a_symlink_or_a_file_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().as_bytes().to_vec();
    let entries = vec![link(b"uploads", b'2', &target)];
    let inner = inner_for(&entries);
    refused(entries.into_iter().chain([inner]).collect(), "uploads", |_| {});
    let entries = vec![file(b"uploads", b"not a folder")];
    let inner = inner_for(&entries);
    refused(entries.into_iter().chain([inner]).collect(), "uploads", |_| {});
}

/// A PAX extended header (type `x`) for the entry that follows it.
fn pax(records: &[(&str, String)]) -> Raw {
    let mut data = Vec::new();
    for (k, v) in records {
        let body = format!(" {k}={v}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        data.extend_from_slice(format!("{len}{body}").as_bytes());
    }
    Raw { name: b"././@PaxHeader".to_vec(), kind: b'x', data, declared: None, link: Vec::new() }
}

#[test]
fn item10_a_pax_size_beyond_the_manifest_is_refused_before_it_fills_the_disk() {
    let f = Fixture::new();
    // The ustar header says 512 bytes; the PAX record says 48 MiB of zeros (a few KiB once
    // compressed); the outer manifest says the whole archive holds 1 MiB.
    let big = 48usize << 20;
    let mut bomb = file(b"uploads/bomb", &vec![0u8; big]);
    bomb.declared = Some(512);
    let mut entries = vec![dir(b"uploads/"), pax(&[("size", big.to_string())]), bomb];
    entries.push(inner_for(&[dir(b"uploads/")]));
    let name = publish(&f, &entries, false);
    let to = f.path().join("restore-to");
    let mnt = (util::is_root() && !util::emulated()).then(|| util::Tmpfs::mount(&to, "8m"));
    let r = f.expect(&["restore", &name, "--to", to.to_str().unwrap()], 4);
    assert!(r.stderr.contains("unsafe content refused") && r.stderr.contains("more"), "{}", r.stderr);
    let r = f.expect(&["drill", &name], 4);
    assert!(r.stderr.contains("more"), "{}", r.stderr);
    drop(mnt);
}

#[test]
fn item13_restore_to_fails_when_the_database_fails_integrity_check() {
    let f = Fixture::new();
    let db = b"this is not a SQLite database".to_vec();
    let mut entries = vec![dir(b"db/"), file(b"db/app.db", &db)];
    entries.push(inner_for(&[file(b"db/app.db", &db)]));
    // The db/ folder entry is not in the inner manifest of a real archive either.
    entries.remove(0);
    let name = publish_with_db(&f, &entries, "db/app.db", &db);
    let to = f.path().join("restore-to");
    let r = f.expect(&["restore", &name, "--to", to.to_str().unwrap()], 4);
    assert!(r.stderr.contains("integrity_check") || r.stderr.contains("not a database"), "{}", r.stderr);
    assert!(to.join("db/app.db").exists(), "the files stay there for inspection");
    let audit = f.expect(&["--json", "audit"], 0);
    let v: serde_json::Value = serde_json::from_str(&audit.stdout).unwrap();
    let run = v["runs"].as_array().unwrap().iter().find(|r| r["command"] == "restore").unwrap().clone();
    assert_eq!(run["status"], "FAILED", "{run}");
}

#[test]
fn item17f_raw_entries_in_an_in_place_restore_exit_4() {
    let f = Fixture::new();
    let db = fs::read(&f.app.database).unwrap();
    let entries = vec![file(b"db/app.db", &db), file(b"raw/app.db", b"raw bytes")];
    let inner = inner_for(&entries);
    let name = publish_with_db(&f, &entries.into_iter().chain([inner]).collect::<Vec<_>>(), "db/app.db", &db);
    let live = f.fingerprint();
    let r = f.expect(&["restore", &name, "--yes"], 4);
    assert!(r.stderr.contains("raw"), "{}", r.stderr);
    assert_eq!(f.fingerprint(), live);
}

#[test]
fn item17g_a_database_entry_pointing_into_uploads_fails_the_drill() {
    let f = Fixture::new();
    let db = fs::read(&f.app.database).unwrap();
    let entries = vec![dir(b"uploads/"), file(b"uploads/x.db", &db)];
    let inner = inner_for(&entries);
    let name =
        publish_with_db(&f, &entries.into_iter().chain([inner]).collect::<Vec<_>>(), "uploads/x.db", &db);
    let r = f.expect(&["drill", &name], 4);
    assert!(r.stderr.contains("db/"), "{}", r.stderr);
}
