//! The offsite copy (#10) against a real S3 server (`rclone serve s3` on 127.0.0.1, which
//! checks signatures), and the push engine between in-memory backends.
//!
//! What rclone cannot express is said where it matters: it has no per-key permissions, so
//! the put-only credential is exercised through a wrapper backend that refuses deletes and
//! overwrites exactly as such a credential makes S3 refuse them (docs/offsite.md gives the
//! real policies).

mod s3_util;
mod util;

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use datavault::config::Settings;
use datavault::offsite::ledger::{Ledger, Shallow};
use datavault::offsite::push::{push, PushOptions};
use datavault::offsite::s3::S3Backend;
use datavault::offsite::{collect, locks};
use datavault::progress::NoProgress;
use datavault::retention::RetentionPolicy;
use datavault::store::backend::{Backend, LocalBackend, MemoryBackend};
use datavault::store::dedup;
use s3_util::{offsite_section, write_credentials, S3Server, Wrapped, ACCESS_KEY, BUCKET, SECRET_KEY};
use sha2::{Digest, Sha256};
use util::{assert_still_running, skip, wait_until, Fixture};

/// How long a wait on a running push may take before the test calls it hung.
const LONG_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// A fixture whose config has an `[offsite]` section for `endpoint`.
fn with_offsite(f: &Fixture, endpoint: &str, prefix: &str, extra: &str) {
    let creds = f.path().join("offsite.credentials");
    if !creds.exists() {
        write_credentials(&creds, ACCESS_KEY, SECRET_KEY);
    }
    let mut cfg = fs::read_to_string(&f.config).unwrap();
    if let Some(i) = cfg.find("\n[offsite]") {
        cfg.truncate(i);
    }
    cfg.push_str(&offsite_section(endpoint, prefix, &creds, extra));
    fs::write(&f.config, cfg).unwrap();
}

fn settings(f: &Fixture) -> Settings {
    Settings::load(&f.config).unwrap()
}

fn s3(f: &Fixture) -> S3Backend {
    let (b, _) = datavault::offsite::connect(&settings(f)).unwrap();
    b
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn server_or_skip(dir: &Path) -> Option<S3Server> {
    match s3_util::rclone() {
        Ok(_) => Some(S3Server::start(dir)),
        Err(why) => {
            skip(&why);
            None
        }
    }
}

/// A random (incompressible) upload file, so the archive is at least `mib` MiB.
fn big_upload(f: &Fixture, name: &str, mib: usize) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ mib as u64;
    let mut buf = vec![0u8; mib << 20];
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    fs::write(f.app.uploads.join(name), buf).unwrap();
}

#[test]
fn a_push_reads_back_identically_through_the_backend_and_restores_with_nothing_but_the_bucket() {
    let f = Fixture::new();
    let Some(server) = server_or_skip(&f.path().join("s3")) else { return };
    with_offsite(&f, &server.endpoint(), "pi/kitchen", "");
    big_upload(&f, "photo.bin", 6); // > one 5 MiB part: the archive goes multipart
    f.backup();
    let fingerprint = f.fingerprint();
    f.backup();
    let r = f.expect(&["--json", "offsite", "push"], 0);
    let out: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(out["uploaded"].as_array().unwrap().len(), 4, "{}", r.stdout);
    assert_eq!(out["behind"]["files"], 0);

    // Every pushed file, read back through the Backend trait, is the local file.
    let remote = s3(&f);
    let local = LocalBackend::open(&f.target).unwrap();
    let ledger = Ledger::load(&remote).unwrap();
    let mut names: Vec<_> = local.list("").unwrap().into_iter().map(|o| o.name).collect();
    names.sort();
    assert_eq!(names.len(), 4);
    for name in &names {
        let want = fs::read(f.target.join(name)).unwrap();
        let (mut rd, size) = remote.open(name).unwrap();
        let mut got = Vec::new();
        rd.read_to_end(&mut got).unwrap();
        assert_eq!((size, sha(&got)), (want.len() as u64, sha(&want)), "{name}");
        assert_eq!(remote.size(name).unwrap(), Some(want.len() as u64));
        let mid = want.len() as u64 / 2;
        let len = (want.len() as u64 - mid).min(100_000);
        assert_eq!(remote.read_range(name, mid, len).unwrap(), want[mid as usize..(mid + len) as usize]);
        let expected = name.ends_with(".age").then(|| sha(&want));
        assert_eq!(ledger.check(name, want.len() as u64, expected.as_deref()), Shallow::Ok, "{name}");
    }
    let manifest = names.iter().find(|n| n.ends_with(".json")).unwrap();
    assert_eq!(remote.read_small(manifest, 1 << 20).unwrap(), fs::read(f.target.join(manifest)).unwrap());
    // The bytes on the server's disk are the drive's bytes.
    assert_eq!(
        server.object(&format!("pi/kitchen/{}", names[0])).unwrap(),
        fs::read(f.target.join(&names[0])).unwrap()
    );

    // The shallow check (verify --offsite without --deep): all recorded; a truncated object
    // on the server is caught without downloading anything.
    let report = datavault::offsite::check::shallow(&remote).unwrap();
    assert!(report.clean() && report.problems.is_empty() && report.ok == 4, "{report:?}");
    let victim = server.dir.join(BUCKET).join("pi/kitchen").join(&names[1]);
    let original = fs::read(&victim).unwrap();
    fs::write(&victim, &original[..original.len() - 1]).unwrap();
    let report = datavault::offsite::check::shallow(&remote).unwrap();
    assert!(!report.clean() && report.problems[0].path == names[1], "{report:?}");
    fs::write(&victim, &original).unwrap();

    // Nothing left to send the second time.
    let r = f.expect(&["--json", "offsite", "push"], 0);
    let out: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!((out["uploaded"].as_array().unwrap().len(), out["already_there"].as_u64()), (0, Some(4)));

    // A new Pi: no drive, only the identity, a config and the credentials. The bucket is
    // pulled (the same engine, reversed) into an empty folder, and restored from there.
    let newpi = f.path().join("newpi");
    fs::create_dir(&newpi).unwrap();
    let pulled =
        push(Arc::new(remote), Arc::new(LocalBackend::open(&newpi).unwrap()), &opts(), &NoProgress).unwrap();
    assert_eq!(pulled.uploaded.len(), 4);
    let cfg = fs::read_to_string(&f.config)
        .unwrap()
        .replace(&f.target.display().to_string(), &newpi.display().to_string());
    let newcfg = f.path().join("newpi.toml");
    fs::write(&newcfg, cfg).unwrap();
    let to = f.path().join("restored");
    let oldest = names.iter().find(|n| n.ends_with(".age")).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_datavault"))
        .args(["--config", newcfg.to_str().unwrap(), "restore", oldest, "--to", to.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = datavault::demo::fingerprint(&to.join("db/app.db"), Some(&to.join("uploads"))).unwrap();
    assert_eq!(got, fingerprint, "restored from the bucket alone equals the source at backup time");
}

#[test]
fn the_s3_backend_behaves_like_the_drive() {
    let f = Fixture::new();
    let Some(server) = server_or_skip(&f.path().join("s3")) else { return };
    with_offsite(&f, &server.endpoint(), "exercise", "");
    let b = s3(&f);
    let write = |path: &str, bytes: &[u8]| {
        let mut o = b.create(path).unwrap();
        o.write_all(bytes).unwrap();
        o.commit().unwrap();
    };
    write("a.json", b"{}");
    write("packs/ab/abcd", b"0123456789");
    write("empty", b"");
    let mut top: Vec<_> = b.list("").unwrap().into_iter().map(|o| o.name).collect();
    top.sort();
    assert_eq!(top, ["a.json", "empty"], "folders are not listed as files");
    assert_eq!(b.list("packs/ab").unwrap().len(), 1);
    assert!(b.list("packs/zz").unwrap().is_empty());
    assert_eq!(b.read_range("packs/ab/abcd", 2, 3).unwrap(), b"234");
    assert_eq!(b.read_range("packs/ab/abcd", 8, 3).unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    assert_eq!(b.read_small("a.json", 2).unwrap(), b"{}");
    assert_eq!(b.read_small("a.json", 1).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(b.read_small("empty", 10).unwrap(), b"");
    assert_eq!(b.read_small("nope", 10).unwrap_err().kind(), std::io::ErrorKind::NotFound);
    assert_eq!(b.size("a.json").unwrap(), Some(2));
    assert_eq!(b.size("nope").unwrap(), None);
    // Uncommitted, small or multipart: nothing visible, nothing left behind on disk.
    {
        let mut o = b.create("b.json").unwrap();
        o.write_all(b"half").unwrap();
    }
    {
        let mut o = b.create("big.bin").unwrap();
        o.write_all(&vec![7u8; 11 << 20]).unwrap();
    }
    assert_eq!(b.size("b.json").unwrap(), None);
    assert_eq!(b.size("big.bin").unwrap(), None);
    // Objects are never overwritten.
    let mut o = b.create("a.json").unwrap();
    o.write_all(b"{\"x\":1}").unwrap();
    assert!(o.commit().is_err(), "an existing object is not replaced");
    assert_eq!(server.object("exercise/a.json").unwrap(), b"{}");
    b.remove("a.json").unwrap();
    b.remove("a.json").unwrap();
    assert_eq!(b.size("a.json").unwrap(), None);
    for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\\b"] {
        assert!(b.read_small(bad, 10).is_err(), "{bad:?}");
        assert!(b.create(bad).is_err(), "{bad:?}");
    }
    assert!(server.keys("").iter().all(|k| k.starts_with("exercise/")), "{:?}", server.keys(""));
}

#[test]
fn a_push_cut_by_the_server_dying_resumes_and_never_shows_half_a_backup() {
    let f = Fixture::new();
    let Some(mut server) = server_or_skip(&f.path().join("s3")) else { return };
    // Throttled, so the push is still running when the server goes (2 MiB/s, 5 MiB parts).
    with_offsite(&f, &server.endpoint(), "p", "max_rate = 2097152");
    big_upload(&f, "a.bin", 7);
    f.backup();
    fs::remove_file(f.app.uploads.join("a.bin")).unwrap();
    big_upload(&f, "b.bin", 8);
    f.backup();
    let mut child =
        f.command(&["offsite", "push"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The first backup is complete (its ledger object written): kill the server mid-push.
    wait_until("the first backup's ledger object", LONG_WAIT, || {
        assert_still_running(&mut child, "the push");
        !server.keys("p/offsite-ledger").is_empty()
    });
    server.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(err.lines().filter(|l| l.contains("error:")).count(), 1, "one line: {err}");
    // Whatever is visible is whole: every manifest's archive is there at its full size.
    let visible = |server: &S3Server| -> Vec<String> {
        let keys = server.keys("p");
        for k in keys.iter().filter(|k| k.ends_with(".json") && !k.contains("ledger")) {
            let archive = k.replace(".json", ".tar.zst.age");
            let local = fs::read(f.target.join(archive.trim_start_matches("p/"))).unwrap();
            assert_eq!(
                server.object(&archive).as_deref(),
                Some(&local[..]),
                "{k} visible without its whole archive"
            );
        }
        keys
    };
    let before = visible(&server);
    assert!(
        before.iter().filter(|k| k.ends_with(".json") && !k.contains("ledger")).count() < 2,
        "{before:?}"
    );
    let st: serde_json::Value =
        serde_json::from_slice(&fs::read(f.state.join("offsite-state.json")).unwrap()).unwrap();
    assert_eq!(st["last_error_kind"], "offsite", "{st}");

    let server = S3Server::start_on(&server.dir, server.port);
    let r = f.expect(&["--json", "offsite", "push"], 0);
    let out: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(out["behind"]["files"], 0, "{}", r.stdout);
    let keys = visible(&server);
    assert_eq!(keys.iter().filter(|k| !k.contains("ledger")).count(), 4, "{keys:?}");
    let st: serde_json::Value =
        serde_json::from_slice(&fs::read(f.state.join("offsite-state.json")).unwrap()).unwrap();
    assert!(st["last_error"].is_null() && st["last_success"].is_string(), "{st}");
}

#[test]
fn a_push_killed_mid_upload_is_aborted_and_resent_by_the_next_and_memory_stays_bounded() {
    let f = Fixture::new();
    let Some(server) = server_or_skip(&f.path().join("s3")) else { return };
    with_offsite(&f, &server.endpoint(), "k", "max_rate = 4194304");
    big_upload(&f, "video.bin", 40);
    f.backup();
    let mut child =
        f.command(&["offsite", "push"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // The multipart upload has started when its id is in the journal (a whole line: the file
    // exists a moment before its line is written).
    wait_until("the multipart upload's journal line", LONG_WAIT, || {
        assert_still_running(&mut child, "the push");
        fs::read_to_string(f.state.join("offsite-uploads")).is_ok_and(|t| t.ends_with('\n'))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        server.keys("k").iter().all(|k| !k.ends_with(".age") && !k.ends_with(".json")),
        "{:?}",
        server.keys("k")
    );

    // The next push aborts the leftover upload, then sends everything; 40 MiB through
    // 5 MiB parts, two in flight, measured from outside.
    with_offsite(&f, &server.endpoint(), "k", "");
    let (out, peak) = s3_util::run_sampling_rss({
        let mut c = f.command(&["--json", "offsite", "push"]);
        c.stdin(Stdio::null());
        c
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["aborted_uploads"].as_array().unwrap().len(), 1, "{j}");
    assert_eq!(j["uploaded"].as_array().unwrap().len(), 2);
    assert!(!f.state.join("offsite-uploads").exists(), "the journal is cleared once aborted");
    let archive = f.archive_files()[0].clone();
    let name = archive.file_name().unwrap().to_str().unwrap();
    assert_eq!(server.object(&format!("k/{name}")).unwrap(), fs::read(&archive).unwrap());
    let mib = peak as f64 / 1048576.0;
    eprintln!(
        "peak RSS pushing a {:.0} MiB archive: {mib:.1} MiB",
        fs::metadata(&archive).unwrap().len() as f64 / 1048576.0
    );
    assert!(mib < 40.0, "peak RSS {mib:.1} MiB");

    // Reading it back streams too: verify --offsite --deep downloads, decrypts and checks
    // the 40 MiB archive in ranged GETs of one part.
    let (out, peak) = s3_util::run_sampling_rss({
        let mut c = f.command(&["verify", "--offsite", "--deep"]);
        c.stdin(Stdio::null());
        c
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mib = peak as f64 / 1048576.0;
    eprintln!("peak RSS of verify --offsite --deep: {mib:.1} MiB");
    assert!(mib < 40.0, "peak RSS {mib:.1} MiB");
}

#[test]
fn never_overwrites_a_remote_object_and_does_not_make_its_backup_visible() {
    let f = Fixture::new();
    let Some(server) = server_or_skip(&f.path().join("s3")) else { return };
    with_offsite(&f, &server.endpoint(), "c", "");
    f.backup();
    f.backup();
    let archives = f.archive_files();
    let older = archives[0].file_name().unwrap().to_str().unwrap().to_string();
    // Someone else's object under the same name.
    let b = s3(&f);
    let mut o = b.create(&older).unwrap();
    o.write_all(b"not the archive").unwrap();
    o.commit().unwrap();
    let r = f.expect(&["offsite", "push"], 4);
    assert!(r.stdout.contains("CONFLICT") && r.stdout.contains(&older), "{}", r.stdout);
    assert_eq!(server.object(&format!("c/{older}")).unwrap(), b"not the archive");
    let manifest = older.replace(".tar.zst.age", ".json");
    assert!(server.object(&format!("c/{manifest}")).is_none(), "its manifest is not pushed");
    let newer = archives[1].file_name().unwrap().to_str().unwrap();
    assert!(server.object(&format!("c/{newer}")).is_some(), "the other backup still travels");
}

#[test]
fn every_offsite_failure_is_one_line_with_its_exit_code_and_the_local_backup_is_untouched() {
    let f = Fixture::new();
    let Some(server) = server_or_skip(&f.path().join("s3")) else { return };
    f.backup();
    let before = f.all_target_files();
    let one_line = |args: &[&str], code: i32, needles: &[&str]| {
        let r = f.expect(args, code);
        let errs: Vec<_> = r.stderr.lines().filter(|l| l.contains("error:")).collect();
        assert_eq!(errs.len(), 1, "{}", r.stderr);
        for n in needles {
            assert!(errs[0].contains(n), "{n:?} not in {}", errs[0]);
        }
        assert!(!r.stderr.contains(SECRET_KEY) && !r.stdout.contains(SECRET_KEY));
    };
    // Wrong secret.
    with_offsite(&f, &server.endpoint(), "x", "");
    write_credentials(&f.path().join("offsite.credentials"), ACCESS_KEY, "wrong-secret-0000000000");
    one_line(&["offsite", "push"], 2, &["SignatureDoesNotMatch", "offsite.credentials"]);
    write_credentials(&f.path().join("offsite.credentials"), "unknown-access-key-id", SECRET_KEY);
    one_line(&["offsite", "push"], 2, &["InvalidAccessKeyId"]);
    write_credentials(&f.path().join("offsite.credentials"), ACCESS_KEY, SECRET_KEY);
    // Unprotected credentials file.
    {
        use std::os::unix::fs::PermissionsExt;
        let p = f.path().join("offsite.credentials");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        one_line(&["offsite", "push"], 2, &["chmod 600"]);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    }
    // Bucket missing.
    let cfg = fs::read_to_string(&f.config).unwrap();
    fs::write(&f.config, cfg.replace(&format!("s3://{BUCKET}/x"), "s3://no-such-bucket/x")).unwrap();
    one_line(&["offsite", "push"], 3, &["NoSuchBucket", "offsite.url"]);
    // Clock skew: a Pi without RTC before NTP.
    with_offsite(&f, &server.endpoint(), "x", "");
    let faketime = Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1");
    if faketime.exists() {
        let o = f
            .command(&["offsite", "push"])
            .env("LD_PRELOAD", faketime)
            .env("FAKETIME", "+2h")
            .env("DONT_FAKE_MONOTONIC", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{err}");
        assert!(err.contains("RequestTimeTooSkewed") && err.contains("NTP"), "{err}");
    } else {
        skip("faketime not installed (apt-get install faketime): the clock-skew case");
    }
    // Nothing listening.
    let port = s3_util::free_port();
    with_offsite(&f, &format!("http://127.0.0.1:{port}"), "x", "");
    one_line(&["offsite", "push"], 3, &["connection refused", &port.to_string()]);
    // A stalled connection: accepts, never answers.
    let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stall.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for _ in 0..2 {
            conns.push(stall.accept().unwrap());
        }
        conns
    });
    with_offsite(&f, &format!("http://127.0.0.1:{port}"), "x", "timeout_secs = 1");
    one_line(&["offsite", "push"], 3, &["timeout", "offsite.timeout_secs"]);
    drop(held);
    // DNS failure (.invalid never resolves).
    with_offsite(&f, "https://datavault-test.invalid", "x", "");
    one_line(&["offsite", "push"], 3, &["DNS"]);
    // Plain http to anything but loopback is a config error.
    with_offsite(&f, "http://s3.example.com", "x", "");
    one_line(&["offsite", "push"], 2, &["offsite.endpoint", "https"]);
    // No [offsite] at all.
    let cfg = fs::read_to_string(&f.config).unwrap();
    fs::write(&f.config, &cfg[..cfg.find("\n[offsite]").unwrap()]).unwrap();
    one_line(&["offsite", "push"], 2, &["[offsite]"]);

    assert_eq!(f.all_target_files(), before, "the drive is never touched by a push");
    f.expect(&["verify"], 0);
    let st: serde_json::Value =
        serde_json::from_slice(&fs::read(f.state.join("offsite-state.json")).unwrap()).unwrap();
    assert!(st["last_success"].is_null() && st["last_error"].is_string(), "{st}");
    let state_text = fs::read_to_string(f.state.join("offsite-state.json")).unwrap();
    assert!(!state_text.contains(SECRET_KEY));
}

// ---- the engine alone, between in-memory and local backends (no server needed) ----------

fn opts() -> PushOptions {
    PushOptions {
        retention: RetentionPolicy::default(),
        dry_run: false,
        now: chrono::Utc::now(),
        cache_dir: None,
    }
}

/// The engine takes shared backends; the tests keep a handle to look inside.
fn arc<B: Backend + 'static>(b: &Arc<B>) -> Arc<dyn Backend> {
    b.clone()
}

#[test]
fn the_engine_sends_data_before_visibility_resumes_after_a_drop_and_works_with_a_put_only_remote() {
    let f = Fixture::new();
    f.backup();
    f.backup();
    // Then a deduplicated snapshot store beside the archives, and a file of the store's
    // shape that is not one of its files.
    f.set("store.format", "snapshots");
    let snap = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    let t = &f.target;
    for (p, bytes) in [
        (format!("store/snapshots/{snap}.json.partial"), b"x".to_vec()),
        ("stray.txt".into(), b"not ours".to_vec()),
    ] {
        fs::write(t.join(&p), bytes).unwrap();
    }
    let local: Arc<dyn Backend> = Arc::new(LocalBackend::open(t).unwrap());
    let mut dropping = Wrapped::new(MemoryBackend::new());
    dropping.fail_after = Some(4);
    let dropping = Arc::new(dropping);
    let e = push(local.clone(), arc(&dropping), &opts(), &NoProgress).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    let order = dropping.order();
    // The push's marker first (there is snapshot data to send), then the data.
    assert!(order[0].starts_with("store/locks/push-"), "{order:?}");
    let first: Vec<&String> = order.iter().filter(|o| !o.starts_with("store/locks/")).collect();
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(
        first[0].ends_with(".tar.zst.age")
            && first[1].ends_with(".json")
            && first[2].starts_with("offsite-ledger/"),
        "{first:?}"
    );

    // Resume with a put-only remote: nothing is sent twice, nothing deleted or overwritten.
    let mut put_only = Wrapped::new(dropping.inner.clone());
    put_only.put_only = true;
    let put_only = Arc::new(put_only);
    let r = push(local.clone(), arc(&put_only), &opts(), &NoProgress).unwrap();
    assert!(r.clean(), "{r:?}");
    assert_eq!(r.already_there, 2);
    let order = put_only.order();
    let pos =
        |p: &str| order.iter().position(|o| o == p).unwrap_or_else(|| panic!("{p} not sent: {order:?}"));
    let data: Vec<_> = order
        .iter()
        .filter(|o| !o.starts_with("offsite-ledger/") && !o.starts_with("store/locks/"))
        .cloned()
        .collect();
    assert!(data[0].ends_with(".tar.zst.age") && data[1].ends_with(".json"), "{data:?}");
    let packs: Vec<&String> = data.iter().filter(|d| d.starts_with("store/packs/")).collect();
    let index: Vec<&String> = data.iter().filter(|d| d.starts_with("store/index/")).collect();
    assert!(!packs.is_empty() && !index.is_empty(), "{data:?}");
    assert!(pos("store/config.json") < pos(index[0]));
    // Every index file before any pack: a pack is never on the remote unindexed.
    assert!(pos(index.last().unwrap()) < pos(packs[0]), "{data:?}");
    assert!(pos(packs.last().unwrap()) < pos(&format!("store/snapshots/{snap}.tree")));
    assert_eq!(
        data.last().unwrap(),
        &format!("store/snapshots/{snap}.json"),
        "the snapshot manifest goes last"
    );
    assert!(!order.iter().any(|o| o.contains("partial") || o.contains("stray")));
    // The push marked its start and its end (a prune elsewhere waits for neither then).
    let locks: Vec<&String> = order.iter().filter(|o| o.starts_with("store/locks/")).collect();
    assert!(locks.len() == 2 && locks[0].ends_with(".json") && locks[1].ends_with(".done"), "{locks:?}");
    assert_eq!(r.behind.files, 0);
    let again = push(local.clone(), arc(&put_only), &opts(), &NoProgress).unwrap();
    assert_eq!(again.uploaded.len(), 0, "{again:?}");
    // 4 archive files; the store's config, and the snapshot's tree, refs and manifest (a
    // snapshot the remote shows is not looked into again).
    assert_eq!(again.already_there, 8, "{again:?}");

    // A damaged pack is not sent, and no snapshot manifest goes while it is missing.
    let remote = Arc::new(MemoryBackend::new());
    let pack = t.join(packs[0]);
    let mut bytes = fs::read(&pack).unwrap();
    bytes[40] ^= 1;
    fs::write(&pack, bytes).unwrap();
    let r = push(local, arc(&remote), &opts(), &NoProgress).unwrap();
    assert!(!r.clean() && r.damaged_locally.len() == 1, "{r:?}");
    assert!(remote.size(&format!("store/snapshots/{snap}.json")).unwrap().is_none());
    assert!(remote.size(&format!("store/snapshots/{snap}.tree")).unwrap().is_some());
    assert_eq!(r.behind.snapshots, 1);
}

#[test]
fn the_engine_does_not_resend_what_the_remote_retention_dropped_nor_a_damaged_archive() {
    let f = Fixture::new();
    f.backup();
    f.backup();
    f.backup();
    let local: Arc<dyn Backend> = Arc::new(LocalBackend::open(&f.target).unwrap());
    let remote = Arc::new(MemoryBackend::new());
    let keep_one =
        RetentionPolicy { keep_last: 1, keep_daily: 0, keep_weekly: 0, keep_monthly: 0, keep_pre_restore: 0 };
    let r = push(local.clone(), arc(&remote), &PushOptions { retention: keep_one, ..opts() }, &NoProgress)
        .unwrap();
    assert_eq!((r.uploaded.len(), r.not_kept_remotely.len()), (2, 2), "{r:?}");
    // A flipped byte on the drive: hashed while streaming, refused before it becomes visible.
    let archives = f.archive_files();
    let newest = archives.last().unwrap();
    let mut bytes = fs::read(newest).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    fs::write(newest, bytes).unwrap();
    let remote = Arc::new(MemoryBackend::new());
    let r = push(local, arc(&remote), &opts(), &NoProgress).unwrap();
    assert_eq!(r.damaged_locally.len(), 1, "{r:?}");
    assert!(r.damaged_locally[0].why.contains("SHA-256"));
    let name = newest.file_name().unwrap().to_str().unwrap();
    assert!(
        remote.size(name).unwrap().is_none()
            && remote.size(&name.replace(".tar.zst.age", ".json")).unwrap().is_none()
    );
    assert_eq!(r.uploaded.len(), 4, "the two good backups travel");
}

fn keep_one() -> RetentionPolicy {
    RetentionPolicy { keep_last: 1, keep_daily: 0, keep_weekly: 0, keep_monthly: 0, keep_pre_restore: 0 }
}

fn snapshot_fixture() -> Fixture {
    Fixture::with(|c| c.push_str("[store]\nformat = \"snapshots\"\n"))
}

fn pack_bytes(b: &MemoryBackend) -> u64 {
    b.snapshot().iter().filter(|(k, _)| k.starts_with("store/packs/")).map(|(_, v)| v.len() as u64).sum()
}

fn remote_store(b: &Arc<MemoryBackend>) -> dedup::Store {
    dedup::Store::open(arc(b)).unwrap().expect("the bucket has a snapshot store")
}

/// Keyless (every chunk indexed, every pack it needs hashed), then decrypted to the end.
#[track_caller]
fn restorable_from(b: &Arc<MemoryBackend>, f: &Fixture, name: &str) {
    let store = remote_store(b);
    let mut cache = dedup::Cache::open_private().unwrap();
    dedup::verify::verify_snapshot(&store, &mut cache, name, &NoProgress).unwrap();
    let ids = Arc::new(datavault::keys::load_identities(Some(&f.identity)).unwrap());
    let mut r = dedup::read::SnapshotReader::open(&store, &mut cache, name, ids, &NoProgress).unwrap();
    let mut files = 0;
    while r.next_entry().unwrap().is_some() {
        std::io::copy(&mut r.content(), &mut std::io::sink()).unwrap();
        files += 1;
    }
    assert!(files > 3, "{name}: {files} entries");
}

/// Day one: a snapshot with old.bin (2 MiB) pushed to an in-memory bucket.
struct DayOne {
    f: Fixture,
    b1: String,
    local: Arc<dyn Backend>,
    remote: Arc<MemoryBackend>,
}

fn day_one() -> DayOne {
    let f = snapshot_fixture();
    big_upload(&f, "old.bin", 2);
    let b1 = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    let local: Arc<dyn Backend> = Arc::new(LocalBackend::open(&f.target).unwrap());
    let remote = Arc::new(MemoryBackend::new());
    assert!(push(local.clone(), arc(&remote), &opts(), &NoProgress).unwrap().clean());
    DayOne { f, b1, local, remote }
}

#[test]
fn the_bucket_forgets_and_collects_what_its_retention_drops_and_a_push_resends_a_chunk_it_collected() {
    let DayOne { f, b1, local, remote } = day_one();
    let old = fs::read(f.app.uploads.join("old.bin")).unwrap();
    fs::remove_file(f.app.uploads.join("old.bin")).unwrap();
    big_upload(&f, "new.bin", 1);
    let b2 = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    let r = push(local.clone(), arc(&remote), &opts(), &NoProgress).unwrap();
    assert!(r.clean() && r.behind.snapshots == 0, "{r:?}");
    // Only what b2 added travelled: about the 1 MiB file, not the 2 MiB one again.
    assert!(r.uploaded_bytes < (3 << 19), "{} bytes for the second snapshot", r.uploaded_bytes);
    let before = pack_bytes(&remote);

    // The bucket keeps one snapshot: b1 is forgotten and old.bin's chunks collected.
    let dry = collect::prune_store(arc(&remote), &keep_one(), chrono::Utc::now(), true, &NoProgress)
        .unwrap()
        .unwrap();
    assert_eq!(dry.forgotten, vec![b1.clone()]);
    assert_eq!(pack_bytes(&remote), before, "a dry run deletes nothing");
    let out = collect::prune_store(arc(&remote), &keep_one(), chrono::Utc::now(), false, &NoProgress)
        .unwrap()
        .unwrap();
    assert_eq!(out.forgotten, vec![b1.clone()]);
    let gc = out.gc.expect("collected");
    assert!(gc.bytes_freed >= 2 << 20, "{gc:?}");
    assert!(pack_bytes(&remote) + (2 << 20) <= before, "{} of {before} bytes left", pack_bytes(&remote));
    let left: Vec<String> = remote.snapshot().keys().cloned().collect();
    assert!(!left.iter().any(|k| k.contains(&b1)), "{left:?}");
    assert!(!left.iter().any(|k| k.starts_with("store/locks/")), "markers cleaned up: {left:?}");
    restorable_from(&remote, &f, &b2);

    // old.bin comes back: its chunks are on the drive (which keeps b1) and no longer in the
    // bucket. The push finds them through the bucket's own index and sends their pack again.
    fs::write(f.app.uploads.join("old.bin"), &old).unwrap();
    let b3 = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    let keep = PushOptions { retention: keep_one(), ..opts() };
    let r = push(local.clone(), arc(&remote), &keep, &NoProgress).unwrap();
    assert!(r.clean(), "{r:?}");
    assert!(r.uploaded.iter().any(|u| u.path.starts_with("store/packs/")), "{r:?}");
    assert!(r.uploaded_bytes >= 2 << 20, "old.bin's pack travelled again: {r:?}");
    restorable_from(&remote, &f, &b3);
    // Nothing more to send; b1 and b2 (kept on the drive, not in the bucket) stay home.
    let r = push(local, arc(&remote), &keep, &NoProgress).unwrap();
    assert_eq!(r.uploaded.len(), 0, "{r:?}");
    assert!(remote.size(&format!("store/snapshots/{b1}.json")).unwrap().is_none());
}

/// The index caches persist in the state folder between pushes: they must follow the bucket,
/// not trust themselves. Another bucket (or prefix) gets everything, and so does a bucket
/// whose packs someone deleted.
#[test]
fn the_bucket_index_cache_follows_the_bucket_another_bucket_or_lost_packs_get_everything() {
    let f = snapshot_fixture();
    big_upload(&f, "photo.bin", 1);
    let b1 = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    let local: Arc<dyn Backend> = Arc::new(LocalBackend::open(&f.target).unwrap());
    let cached = PushOptions { cache_dir: Some(f.state.clone()), ..opts() };
    let first = Arc::new(MemoryBackend::new());
    assert!(push(local.clone(), arc(&first), &cached, &NoProgress).unwrap().clean());
    // Again: the bucket has a store now, so its cache is filled and kept on disk.
    assert_eq!(push(local.clone(), arc(&first), &cached, &NoProgress).unwrap().uploaded.len(), 0);
    assert!(f.state.join(datavault::offsite::push::REMOTE_CACHE).exists());
    let second = Arc::new(MemoryBackend::new());
    assert!(push(local.clone(), arc(&second), &cached, &NoProgress).unwrap().clean());
    restorable_from(&second, &f, &b1);
    assert_eq!(pack_bytes(&second), pack_bytes(&first));

    // Packs lost from the first bucket (and the snapshot with them): all sent again.
    for k in
        first.snapshot().keys().filter(|k| k.starts_with("store/packs/") || k.starts_with("store/snapshots/"))
    {
        first.remove(k).unwrap();
    }
    let r = push(local, arc(&first), &cached, &NoProgress).unwrap();
    assert!(r.clean() && r.uploaded.iter().any(|u| u.path.starts_with("store/packs/")), "{r:?}");
    restorable_from(&first, &f, &b1);
}

/// A pack gone from the drive (collected by a prune meanwhile, or lost): the snapshot that
/// needs it is not sent, and an older snapshot sharing its other packs still gets them all
/// (the packs planned for a snapshot that fails half-way are not counted as sent).
#[test]
fn a_pack_gone_from_the_drive_holds_back_only_its_snapshot() {
    let f = snapshot_fixture();
    big_upload(&f, "photo.bin", 1);
    let b1 = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    let before: std::collections::BTreeSet<_> = walk_packs(&f.target);
    big_upload(&f, "extra.bin", 2);
    let b2 = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    let added: Vec<_> = walk_packs(&f.target).difference(&before).cloned().collect();
    assert!(!added.is_empty());
    for p in &added {
        fs::remove_file(f.target.join(p)).unwrap();
    }
    let local: Arc<dyn Backend> = Arc::new(LocalBackend::open(&f.target).unwrap());
    let remote = Arc::new(MemoryBackend::new());
    let r = push(local, arc(&remote), &opts(), &NoProgress).unwrap();
    // The drive's index no longer finds those chunks: the snapshot is damaged there (exit 4).
    assert!(
        r.damaged_locally.iter().any(|d| d.path.contains(&b2) && d.why.contains("no indexed pack")),
        "{r:?}"
    );
    assert!(remote.size(&format!("store/snapshots/{b2}.json")).unwrap().is_none());
    restorable_from(&remote, &f, &b1);
}

fn walk_packs(target: &Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for d in fs::read_dir(target.join("store/packs")).unwrap().flatten() {
        for p in fs::read_dir(d.path()).unwrap().flatten() {
            out.insert(format!(
                "store/packs/{}/{}",
                d.file_name().to_string_lossy(),
                p.file_name().to_string_lossy()
            ));
        }
    }
    out
}

#[test]
fn a_push_and_a_prune_of_the_bucket_keep_apart_through_their_markers() {
    let DayOne { f, b1, local, remote } = day_one();
    fs::remove_file(f.app.uploads.join("old.bin")).unwrap();
    big_upload(&f, "new.bin", 1);
    let b2 = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();

    // A prune is running elsewhere: the push sends its archives (none here) but no snapshot.
    let now = chrono::Utc::now();
    let prune = locks::write(&*remote, "prune", now).unwrap();
    let r = push(local.clone(), arc(&remote), &opts(), &NoProgress).unwrap();
    assert!(r.snapshots_deferred.as_deref().is_some_and(|w| w.contains("prune")), "{r:?}");
    assert!(
        r.uploaded.iter().all(|u| u.path.starts_with("store/locks/") || !u.path.starts_with("store/")),
        "{r:?}"
    );
    assert_eq!(r.behind.snapshots, 1, "{r:?}");
    assert!(remote.size(&format!("store/snapshots/{b2}.json")).unwrap().is_none());
    remote.remove(&format!("store/locks/{}.json", prune.stem)).unwrap();

    // A push died mid-way (its marker has no `.done`): the prune forgets, but collects
    // nothing (it could delete what that push counts on).
    let r = push(local.clone(), arc(&remote), &opts(), &NoProgress).unwrap();
    assert!(r.snapshots_deferred.is_none() && r.behind.snapshots == 0, "{r:?}");
    locks::write(&*remote, "push", now).unwrap();
    let out = collect::prune_store(arc(&remote), &keep_one(), now, false, &NoProgress).unwrap().unwrap();
    assert_eq!(out.forgotten, vec![b1.clone()]);
    assert!(out.gc.is_none(), "{out:?}");
    assert!(out.gc_deferred.as_deref().is_some_and(|w| w.contains("push")), "{out:?}");
    // A day later that marker is stale: collected then.
    let out = collect::prune_store(
        arc(&remote),
        &keep_one(),
        now + chrono::Duration::hours(25),
        false,
        &NoProgress,
    )
    .unwrap()
    .unwrap();
    assert!(
        out.gc_deferred.is_none() && out.gc.as_ref().is_some_and(|g| g.bytes_freed >= 2 << 20),
        "{out:?}"
    );
    restorable_from(&remote, &f, &b2);
}

#[test]
fn a_remote_prune_deletes_manifest_first_merges_the_ledger_and_the_next_push_does_not_undo_it() {
    let f = Fixture::new();
    let Some(server) = server_or_skip(&f.path().join("s3")) else { return };
    with_offsite(&f, &server.endpoint(), "pr", "");
    for _ in 0..3 {
        f.backup();
    }
    f.expect(&["offsite", "push"], 0);
    assert!(server.keys("pr/offsite-ledger").len() > 1);
    // The pruning machine's policy: keep only the newest backup remotely.
    let keep_one = "[offsite.retention]\nkeep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0";
    with_offsite(&f, &server.endpoint(), "pr", keep_one);
    let r = f.expect(&["--json", "offsite", "prune", "--dry-run"], 0);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["deleted"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(
        server.keys("pr").iter().filter(|k| k.ends_with(".age")).count(),
        3,
        "a dry run deletes nothing"
    );
    f.expect(&["offsite", "prune"], 0);
    let keys = server.keys("pr");
    assert_eq!(keys.iter().filter(|k| k.ends_with(".age")).count(), 1, "{keys:?}");
    assert_eq!(keys.iter().filter(|k| k.contains("offsite-ledger")).count(), 1, "ledger merged: {keys:?}");
    // The Pi still has all three locally; its next push (same policy) sends nothing back.
    let r = f.expect(&["--json", "offsite", "push"], 0);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["uploaded"].as_array().unwrap().len(), 0, "{j}");
    assert_eq!(j["not_kept_remotely"].as_array().unwrap().len(), 2, "{j}");
    let remote = s3(&f);
    let report = datavault::offsite::check::shallow(&remote).unwrap();
    assert!(
        report.clean() && report.ok == 2,
        "records of deleted objects dropped, the rest kept: {report:?}"
    );
}

// ---- reading the offsite copy: list, verify, drill, restore --offsite -----------------------

/// A config for "a new Pi": the same identity, credentials and `[offsite]`, but its drive
/// path leads nowhere and its state folder is fresh (the old Pi and its drive are gone).
fn new_pi_config(f: &Fixture) -> std::path::PathBuf {
    let cfg = fs::read_to_string(&f.config)
        .unwrap()
        .replace(&f.target.display().to_string(), &f.path().join("no-drive-here").display().to_string())
        .replace(&f.state.display().to_string(), &f.path().join("newpi-state").display().to_string());
    let path = f.path().join("newpi.toml");
    fs::write(&path, cfg).unwrap();
    path
}

#[track_caller]
fn with_config(_f: &Fixture, config: &Path, args: &[&str], code: i32) -> util::Run {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_datavault"));
    c.arg("--config").arg(config).args(args).stdin(Stdio::null()).env_remove("DATAVAULT_CONFIG");
    let r = util::run_within(c, std::time::Duration::from_secs(300));
    assert_eq!(
        r.code, code,
        "datavault {args:?} exited {}\n--- stdout\n{}\n--- stderr\n{}",
        r.code, r.stdout, r.stderr
    );
    r
}

#[test]
fn list_verify_drill_and_restore_to_read_the_bucket_and_need_no_drive() {
    let f = Fixture::new();
    let Some(mut server) = server_or_skip(&f.path().join("s3")) else { return };
    with_offsite(&f, &server.endpoint(), "pi", "");
    big_upload(&f, "photo.bin", 6); // multipart upload, several ranged reads back
    f.backup();
    let fingerprint = f.fingerprint();
    f.expect(&["offsite", "push"], 0);

    // list / verify / verify --deep / drill --offsite, from this Pi.
    let r = f.expect(&["--json", "list", "--offsite"], 0);
    let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{}", r.stdout);
    assert_eq!(rows[0]["complete"], true);
    let archive = rows[0]["name"].as_str().unwrap().to_string();
    let r = f.expect(&["verify", "--offsite"], 0);
    assert!(r.stdout.contains("recorded at upload"), "{}", r.stdout);
    let r = f.expect(&["verify", "--offsite", "--deep", "--all"], 0);
    assert!(r.stdout.contains("deeply"), "{}", r.stdout);
    let r = f.expect(&["drill", "--offsite"], 0);
    assert!(r.stdout.contains("DRILL PASSED"), "{}", r.stdout);
    // The bucket's copy passing proves nothing about the drive's: the weekly drill still runs.
    let r = f.expect(&["drill", "--trigger", "timer"], 0);
    assert!(r.stdout.contains("DRILL PASSED"), "{}", r.stdout);

    // A new Pi: no drive at all, a fresh state folder; the identity, the config, the
    // credentials. It lists, drills and restores from the bucket alone.
    let newpi = new_pi_config(&f);
    let r = with_config(&f, &newpi, &["list", "--offsite"], 0);
    assert!(r.stdout.contains(&archive), "{}", r.stdout);
    with_config(&f, &newpi, &["list"], 3); // and the drive is really not there
    let r = with_config(&f, &newpi, &["drill", "--offsite"], 0);
    assert!(r.stdout.contains("DRILL PASSED"), "{}", r.stdout);
    let to = f.path().join("restored");
    let r = with_config(&f, &newpi, &["restore", "--offsite", "--to", to.to_str().unwrap()], 0);
    assert!(r.stdout.contains("s3://"), "{}", r.stdout);
    let got = datavault::demo::fingerprint(&to.join("db/app.db"), Some(&to.join("uploads"))).unwrap();
    assert_eq!(got, fingerprint, "restored from the bucket alone equals the source at backup time");
    assert!(!f.path().join("no-drive-here").exists(), "nothing was created where the drive would be");

    // Damage on the server. A flipped byte keeps the size: the keyless check (nothing
    // downloaded) cannot see it, --deep does (exit 4). A truncated object: both do.
    let victim = server.dir.join(BUCKET).join("pi").join(&archive);
    let original = fs::read(&victim).unwrap();
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    fs::write(&victim, &flipped).unwrap();
    f.expect(&["verify", "--offsite"], 0);
    let r = f.expect(&["verify", "--offsite", "--deep"], 4);
    assert!(r.stderr.contains(&archive) && r.stderr.contains("SHA-256"), "{}", r.stderr);
    f.expect(&["drill", "--offsite"], 4);
    let r =
        with_config(&f, &newpi, &["restore", "--offsite", "--to", f.path().join("r2").to_str().unwrap()], 4);
    assert!(r.stderr.contains(&archive), "{}", r.stderr);
    fs::write(&victim, &original[..original.len() - 10]).unwrap();
    let r = f.expect(&["verify", "--offsite"], 4);
    assert!(r.stderr.contains("truncated"), "{}", r.stderr);
    fs::write(&victim, &original).unwrap();
    f.expect(&["verify", "--offsite", "--deep"], 0);

    // The server gone: one line, exit 3 (not "damaged"); wrong secret: exit 2.
    server.kill();
    for args in [&["list", "--offsite"][..], &["verify", "--offsite", "--deep"], &["drill", "--offsite"]] {
        let r = f.expect(args, 3);
        let errs: Vec<_> = r.stderr.lines().filter(|l| l.contains("error:")).collect();
        assert_eq!(errs.len(), 1, "{}", r.stderr);
        assert!(errs[0].contains("connection refused"), "{}", errs[0]);
    }
    let server = S3Server::start_on(&f.path().join("s3"), server.port);
    write_credentials(&f.path().join("offsite.credentials"), ACCESS_KEY, "wrong-secret-0000000000");
    let r = f.expect(&["list", "--offsite"], 2);
    assert!(r.stderr.contains("SignatureDoesNotMatch") && !r.stderr.contains(SECRET_KEY), "{}", r.stderr);
    drop(server);
}

#[test]
fn restore_offsite_in_place_is_the_journaled_restore_and_without_a_drive_needs_no_live_data_or_an_explicit_flag(
) {
    let f = Fixture::new();
    let Some(server) = server_or_skip(&f.path().join("s3")) else { return };
    with_offsite(&f, &server.endpoint(), "pi", "");
    f.backup();
    let fingerprint = f.fingerprint();
    f.expect(&["offsite", "push"], 0);
    let change = || fs::write(f.app.uploads.join("written-after.txt"), b"later").unwrap();

    // With the drive: the same journaled restore, the safety copy on the drive.
    change();
    let r = f.expect(&["--json", "restore", "--offsite", "--yes"], 0);
    let o: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(f.fingerprint(), fingerprint);
    let pre = o["pre_restore_archive"].as_str().expect("a safety copy was taken").to_string();
    assert!(f.target.join(&pre).exists(), "the safety copy is on the drive: {pre}");
    assert!(o["from"].as_str().unwrap().starts_with("s3://"), "{o}");
    f.assert_no_restore_leftovers();

    // Without the drive, live data there: refused before anything is stopped or changed.
    let newpi = new_pi_config(&f);
    change();
    let changed = f.fingerprint();
    let log_before = fs::read_to_string(f.path().join("service.log")).unwrap_or_default();
    let r = with_config(&f, &newpi, &["restore", "--offsite", "--yes"], 3);
    assert!(r.stderr.contains("--no-safety-copy"), "{}", r.stderr);
    assert_eq!(f.fingerprint(), changed, "live data untouched");
    assert_eq!(
        fs::read_to_string(f.path().join("service.log")).unwrap_or_default(),
        log_before,
        "app not stopped"
    );
    // ... unless the operator says so.
    let r = with_config(&f, &newpi, &["restore", "--offsite", "--yes", "--no-safety-copy"], 0);
    assert!(r.stdout.contains("NOT saved"), "{}", r.stdout);
    assert_eq!(f.fingerprint(), fingerprint);
    f.assert_no_restore_leftovers();
    // --no-safety-copy is only for --offsite.
    f.expect(&["restore", "--yes", "--no-safety-copy"], 2);

    // A new Pi with the app installed but no data yet: nothing to save, no drive needed.
    fs::remove_dir_all(f.app.database.parent().unwrap()).unwrap();
    fs::remove_dir_all(&f.app.uploads).unwrap();
    let r = with_config(&f, &newpi, &["restore", "--offsite", "--yes"], 0);
    assert!(r.stdout.contains("no live data"), "{}", r.stdout);
    assert_eq!(f.fingerprint(), fingerprint);
    assert!(!f.path().join("no-drive-here").exists());
}

#[test]
fn status_doctor_and_the_metrics_show_an_offsite_copy_that_falls_behind() {
    let f = Fixture::new();
    let Some(server) = server_or_skip(&f.path().join("s3")) else { return };
    with_offsite(&f, &server.endpoint(), "pi", "max_behind_hours = 1");
    f.backup();
    let status = |fake: Option<&str>| -> serde_json::Value {
        let mut c = f.command(&["--json", "status"]);
        if let Some(offset) = fake {
            c.env("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
                .env("FAKETIME", offset)
                .env("DONT_FAKE_MONOTONIC", "1");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let metrics = || fs::read_to_string(f.state.join("datavault.prom")).unwrap();
    // Never pushed: the backup waits, but not yet for an hour.
    let st = status(None);
    assert_eq!(st["offsite"]["backups_waiting"], 1, "{st}");
    assert_eq!(st["offsite"]["behind"], false);
    assert!(metrics().contains("datavault_offsite_backups_waiting 1"), "{}", metrics());
    assert!(metrics().contains("datavault_offsite_behind 0"));

    let faketime = Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1").exists();
    if faketime {
        // Two hours later, still not pushed: behind, in status and doctor.
        let st = status(Some("+2h"));
        assert_eq!(st["offsite"]["behind"], true, "{st}");
        assert_eq!(st["healthy"], false);
        let next = st["next_steps"].as_array().unwrap();
        assert!(next.iter().any(|n| n.as_str().unwrap().contains("offsite copy is behind")), "{st}");
        let o = f
            .command(&["doctor"])
            .env("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
            .env("FAKETIME", "+2h")
            .env("DONT_FAKE_MONOTONIC", "1")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("offsite") && out.contains("BEHIND"), "{out}");
    } else {
        skip("faketime not installed (apt-get install faketime): status two hours later");
    }

    // Pushed: nothing waits, the metrics have the push's time.
    f.expect(&["offsite", "push"], 0);
    let st = status(None);
    assert_eq!(
        (st["offsite"]["backups_waiting"].as_u64(), st["offsite"]["behind"].as_bool()),
        (Some(0), Some(false))
    );
    assert!(st["offsite"]["last_success"].is_string(), "{st}");
    let m = metrics();
    assert!(m.contains("datavault_offsite_last_success_timestamp_seconds "), "{m}");
    assert!(
        m.contains("datavault_offsite_behind 0") && m.contains("datavault_offsite_backups_waiting 0"),
        "{m}"
    );
    if faketime {
        assert_eq!(status(Some("+2h"))["offsite"]["behind"], false, "pushed backups never make it behind");
    }
    // The next backup, its push failing (the server gone): behind once it waited too long.
    f.backup();
    drop(server);
    f.expect(&["offsite", "push"], 3);
    let st = status(None);
    assert_eq!(st["offsite"]["backups_waiting"], 1, "{st}");
    assert!(st["offsite"]["last_error"].is_string(), "{st}");
    if faketime {
        let st = status(Some("+2h"));
        assert_eq!(st["offsite"]["behind"], true, "{st}");
        let text = st["next_steps"].to_string();
        assert!(text.contains("the last push failed"), "{text}");
    }
}

/// A remote backend whose archive reads drop half-way, as a connection to S3 does.
struct DropsMidRead(LocalBackend);

struct Dropping {
    inner: Box<dyn Read + Send>,
    left: u64,
}

impl Read for Dropping {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(datavault::offsite::remote_error::remote(
                datavault::offsite::remote_error::RemoteClass::NotReady,
                std::io::ErrorKind::ConnectionReset,
                "reading: the connection to http://127.0.0.1:9 dropped (connection reset); the next push resumes",
            ));
        }
        let n = buf.len().min(self.left as usize);
        let got = self.inner.read(&mut buf[..n])?;
        self.left -= got as u64;
        Ok(got)
    }
}

impl Backend for DropsMidRead {
    fn location(&self) -> String {
        "s3://dvbucket/dropping".into()
    }
    fn list(&self, dir: &str) -> std::io::Result<Vec<datavault::store::backend::ObjectInfo>> {
        self.0.list(dir)
    }
    fn size(&self, path: &str) -> std::io::Result<Option<u64>> {
        self.0.size(path)
    }
    fn read_small(&self, path: &str, max: u64) -> std::io::Result<Vec<u8>> {
        self.0.read_small(path, max)
    }
    fn open(&self, path: &str) -> std::io::Result<(Box<dyn Read + Send>, u64)> {
        let (inner, size) = self.0.open(path)?;
        Ok((Box::new(Dropping { inner, left: size / 2 }), size))
    }
    fn read_range(&self, path: &str, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        self.0.read_range(path, offset, len)
    }
    fn create(&self, path: &str) -> std::io::Result<Box<dyn datavault::store::backend::NewObject>> {
        self.0.create(path)
    }
    fn remove(&self, path: &str) -> std::io::Result<()> {
        self.0.remove(path)
    }
}

#[test]
fn a_connection_dropped_mid_download_is_not_ready_never_damaged() {
    let f = Fixture::new();
    big_upload(&f, "photo.bin", 2);
    f.backup();
    let backend = DropsMidRead(LocalBackend::open(&f.target).unwrap());
    let blame = datavault::offsite::remote_error::Blame {
        location: "s3://dvbucket/dropping".into(),
        credentials: f.path().join("offsite.credentials"),
        config: f.config.clone(),
    };
    let store = datavault::store::Store::remote(std::sync::Arc::new(backend), blame);
    let listings = store.scan().unwrap();
    let ids = std::sync::Arc::new(datavault::keys::load_identities(Some(&f.identity)).unwrap());
    let e =
        datavault::archive::read::read_archive(&store, &listings[0], &ids, &f.identity, None, &NoProgress)
            .unwrap_err();
    assert_eq!(e.exit_code(), 3, "{e}");
    assert!(e.to_string().contains("connection reset") && e.to_string().contains(&listings[0].name), "{e}");
    // The same bytes from the drive read whole: the archive itself is fine.
    let local = datavault::store::Store::open_local(&f.target).unwrap();
    let local_listings = local.scan().unwrap();
    datavault::archive::read::read_archive(&local, &local_listings[0], &ids, &f.identity, None, &NoProgress)
        .unwrap();
}

/// Snapshots (#9) travel too: a snapshot backup pushed, then listed, verified (keyless and
/// deep) and restored from the bucket alone on a Pi without the drive.
#[test]
fn snapshots_are_pushed_listed_verified_and_restored_from_the_bucket() {
    let f = Fixture::with(|c| c.push_str("[store]\nformat = \"snapshots\"\n"));
    let Some(server) = server_or_skip(&f.path().join("s3")) else { return };
    with_offsite(&f, &server.endpoint(), "pi", "");
    big_upload(&f, "photo.bin", 2);
    let name = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    let fingerprint = f.fingerprint();
    f.expect(&["offsite", "push"], 0);
    let r = f.expect(&["--json", "list", "--offsite"], 0);
    let rows: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let row = rows.as_array().unwrap().iter().find(|r| r["name"] == name.as_str()).expect("listed");
    assert_eq!(row["complete"], true, "{}", r.stdout);
    assert_eq!(row["format"], "snapshot", "{}", r.stdout);
    f.expect(&["verify", "--offsite"], 0);
    f.expect(&["verify", "--offsite", "--deep"], 0);
    let newpi = new_pi_config(&f);
    let to = f.path().join("restored");
    with_config(&f, &newpi, &["restore", "--offsite", "--to", to.to_str().unwrap()], 0);
    let got = datavault::demo::fingerprint(&to.join("db/app.db"), Some(&to.join("uploads"))).unwrap();
    assert_eq!(got, fingerprint);
    drop(server);
}

fn bucket_pack_bytes(b: &S3Backend) -> u64 {
    dedup::format::pack_dirs().flat_map(|d| b.list(&d).unwrap()).map(|o| o.size).sum()
}

#[test]
fn offsite_prune_forgets_and_collects_snapshots_in_a_real_bucket_which_still_restores() {
    let f = snapshot_fixture();
    let Some(server) = server_or_skip(&f.path().join("s3")) else { return };
    with_offsite(&f, &server.endpoint(), "pi", "");
    big_upload(&f, "old.bin", 2);
    let b1 = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    f.expect(&["offsite", "push"], 0);
    let old = fs::read(f.app.uploads.join("old.bin")).unwrap();
    fs::remove_file(f.app.uploads.join("old.bin")).unwrap();
    big_upload(&f, "new.bin", 1);
    let b2 = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    f.expect(&["offsite", "push"], 0);
    let before = bucket_pack_bytes(&s3(&f));

    // The pruning machine keeps one snapshot in the bucket.
    let keep_one = "[offsite.retention]\nkeep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0";
    with_offsite(&f, &server.endpoint(), "pi", keep_one);
    let r = f.expect(&["offsite", "prune", "--dry-run"], 0);
    assert!(r.stdout.contains(&format!("WOULD FORGET snapshot {b1}")), "{}", r.stdout);
    assert_eq!(bucket_pack_bytes(&s3(&f)), before, "a dry run deletes nothing");
    let r = f.expect(&["--json", "offsite", "prune"], 0);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["store"]["forgotten"], serde_json::json!([b1]), "{j}");
    assert!(j["store"]["gc"]["bytes_freed"].as_u64().unwrap() >= 2 << 20, "{j}");
    assert!(bucket_pack_bytes(&s3(&f)) + (2 << 20) <= before);
    assert!(
        !server.keys("pi").iter().any(|k| k.contains(&b1) || k.contains("store/locks/")),
        "{:?}",
        server.keys("pi")
    );
    let rows: serde_json::Value =
        serde_json::from_str(&f.expect(&["--json", "list", "--offsite"], 0).stdout).unwrap();
    let names: Vec<&str> = rows.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec![b2.as_str()]);
    f.expect(&["verify", "--offsite"], 0);
    f.expect(&["verify", "--offsite", "--deep"], 0);

    // The Pi keeps both; its next push sends nothing back. Then old.bin returns: its pack,
    // collected from the bucket, travels again, and a new Pi restores from the bucket alone.
    let r = f.expect(&["--json", "offsite", "push"], 0);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["uploaded"].as_array().unwrap().len(), 0, "{j}");
    fs::write(f.app.uploads.join("old.bin"), &old).unwrap();
    f.backup();
    let fingerprint = f.fingerprint();
    let r = f.expect(&["--json", "offsite", "push"], 0);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(j["uploaded_bytes"].as_u64().unwrap() >= 2 << 20, "{j}");
    f.expect(&["verify", "--offsite", "--deep"], 0);
    let to = f.path().join("restored");
    with_config(&f, &new_pi_config(&f), &["restore", "--offsite", "--to", to.to_str().unwrap()], 0);
    let got = datavault::demo::fingerprint(&to.join("db/app.db"), Some(&to.join("uploads"))).unwrap();
    assert_eq!(got, fingerprint);
    drop(server);
}
