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
