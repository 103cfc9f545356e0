//! No secret ever reaches a log line, the catalog, the metrics or the drive: every command
//! that loads the identity runs at the most verbose level, and everything it leaves behind
//! is searched for the private key.

mod util;

use std::fs;

use util::Fixture;

#[test]
fn the_identity_never_appears_in_output_logs_catalog_metrics_or_on_the_drive() {
    let f = Fixture::new();
    let text = fs::read_to_string(&f.identity).unwrap();
    let secret = text.lines().find(|l| l.starts_with("AGE-SECRET-KEY-1")).unwrap().to_string();
    // The key body too, in any case (bech32 is case-insensitive).
    let body = secret["AGE-SECRET-KEY-1".len()..].to_ascii_lowercase();
    let mut seen = String::new();
    let out = f.path().join("restored");
    let runs: Vec<Vec<&str>> = vec![
        vec!["-vv", "backup"],
        vec!["-vv", "--json", "backup"],
        vec!["-vv", "verify", "--deep"],
        vec!["-vv", "drill"],
        vec!["-vv", "--json", "drill"],
        vec!["-vv", "restore", "--to", out.to_str().unwrap()],
        vec!["-vv", "restore", "--yes"],
        vec!["-vv", "--json", "status"],
        vec!["-vv", "--json", "audit"],
        vec!["-vv", "doctor"],
        vec!["-vv", "list"],
    ];
    for args in &runs {
        let r = f.run(args);
        assert!(r.code == 0, "datavault {args:?} exited {}: {}", r.code, r.stderr);
        seen.push_str(&r.stdout);
        seen.push_str(&r.stderr);
    }
    // A failing drill (wrong key) and a broken identity: error paths log too.
    let other = f.path().join("keys/other.txt");
    datavault::keys::generate_identity_file(&other).unwrap();
    f.set("encryption.identity", other.to_str().unwrap());
    let r = f.run(&["-vv", "drill"]);
    assert_eq!(r.code, 4);
    seen.push_str(&r.stderr);
    f.set("encryption.identity", f.identity.to_str().unwrap());
    assert!(seen.len() > 1000, "the runs said something");
    let mut files = 0;
    for root in [&f.state, &f.target] {
        for e in walkdir::WalkDir::new(root).into_iter().flatten().filter(|e| e.file_type().is_file()) {
            let bytes = fs::read(e.path()).unwrap();
            let lossy = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
            assert!(!lossy.contains(&body), "the private key is in {}", e.path().display());
            files += 1;
        }
    }
    assert!(
        !seen.contains(&secret) && !seen.to_ascii_lowercase().contains(&body),
        "the private key was printed"
    );
    assert!(f.state.join("catalog.db").exists() && f.state.join("datavault.prom").exists());
    notification_secrets_stay_in_the_config(&f);
    eprintln!(
        "secrets: {} runs ({} bytes of output) and {files} files in the state folder and on the drive searched",
        runs.len() + 1,
        seen.len()
    );
}

mod s3_util;

/// The S3 secret (#10): pushes at the most verbose level, a failing push, a dry run and a
/// remote prune, then every file in the state folder (catalog, metrics, offsite-state.json,
/// the upload journal) and on the drive is searched for it.
#[test]
fn the_offsite_secret_never_appears_in_output_logs_catalog_metrics_or_state() {
    let f = Fixture::new();
    let server = match s3_util::rclone() {
        Ok(_) => s3_util::S3Server::start(&f.path().join("s3")),
        Err(why) => return util::skip(&why),
    };
    let creds = f.path().join("offsite.credentials");
    s3_util::write_credentials(&creds, s3_util::ACCESS_KEY, s3_util::SECRET_KEY);
    let mut cfg = fs::read_to_string(&f.config).unwrap();
    cfg.push_str(&s3_util::offsite_section(&server.endpoint(), "sec", &creds, ""));
    fs::write(&f.config, &cfg).unwrap();
    f.backup();
    let mut seen = String::new();
    for (args, code) in [
        (vec!["-vv", "offsite", "push", "--dry-run"], 0),
        (vec!["-vv", "offsite", "push"], 0),
        (vec!["-vv", "--json", "offsite", "push"], 0),
        (vec!["-vv", "offsite", "prune", "--dry-run"], 0),
        (vec!["-vv", "--json", "status"], 0),
    ] {
        let r = f.run(&args);
        assert_eq!(r.code, code, "datavault {args:?}: {}", r.stderr);
        seen.push_str(&r.stdout);
        seen.push_str(&r.stderr);
    }
    // A wrong secret makes the server's reply echo the string to sign: still no secret.
    s3_util::write_credentials(&creds, s3_util::ACCESS_KEY, "another-secret-value-123456");
    let r = f.run(&["-vv", "offsite", "push"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    seen.push_str(&r.stderr);
    assert!(!seen.contains("another-secret-value"), "the wrong secret was printed");
    assert!(!seen.contains(s3_util::SECRET_KEY), "the secret was printed");
    let mut files = 0;
    for root in [&f.state, &f.target] {
        for e in walkdir::WalkDir::new(root).into_iter().flatten().filter(|e| e.file_type().is_file()) {
            let bytes = fs::read(e.path()).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(s3_util::SECRET_KEY), "the secret is in {}", e.path().display());
            files += 1;
        }
    }
    assert!(f.state.join("offsite-state.json").exists());
    // The ledger in the bucket too.
    for k in server.keys("sec") {
        assert!(!String::from_utf8_lossy(&server.object(&k).unwrap()).contains(s3_util::SECRET_KEY), "{k}");
    }
    eprintln!("offsite secrets: {} bytes of output and {files} files searched", seen.len());
}

/// #15: ping URLs (a healthchecks UUID), the ntfy topic and its token are secrets too: not in
/// any output (including the errors of a server that cannot be reached), not in the catalog,
/// the metrics, the state folder or on the drive.
fn notification_secrets_stay_in_the_config(f: &Fixture) {
    use std::os::unix::fs::PermissionsExt;
    let uuid = "0d5a7c1e-9f3b-secret-ping-uuid";
    let topic = "topic-secret-8e1f2a";
    let token = "tk_secretntfytoken0123456789";
    let token_file = f.path().join("ntfy.token");
    fs::write(&token_file, token).unwrap();
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();
    let refused = util::http::closed_port();
    let server = util::http::Server::start(500);
    f.set("notify.ping_url", format!("http://127.0.0.1:{refused}/{uuid}"));
    f.set("notify.ntfy_url", server.url(&format!("/{topic}")));
    f.set("notify.ntfy_token_file", token_file.to_str().unwrap());
    let mut seen = String::new();
    for args in [
        vec!["-vv", "notify", "--start"],
        vec!["-vv", "backup"],
        vec!["-vv", "--json", "notify"],
        vec!["-vv", "notify", "--test"],
        vec!["-vv", "notify", "--list"],
        vec!["-vv", "--json", "status"],
        vec!["-vv", "doctor"],
    ] {
        let r = f.run(&args);
        seen.push_str(&r.stdout);
        seen.push_str(&r.stderr);
    }
    fs::rename(&f.target, f.path().join("usb-away")).unwrap();
    let r = f.run(&["-vv", "backup"]);
    assert_eq!(r.code, 3);
    seen.push_str(&r.stderr);
    let r = f.run(&["-vv", "notify"]);
    seen.push_str(&r.stdout);
    seen.push_str(&r.stderr);
    fs::rename(f.path().join("usb-away"), &f.target).unwrap();
    assert!(seen.contains("answered HTTP 500"), "the server was reached and refused: {seen}");
    for secret in [uuid, topic, token] {
        assert!(!seen.contains(secret), "{secret} was printed:\n{seen}");
        for root in [&f.state, &f.target] {
            for e in walkdir::WalkDir::new(root).into_iter().flatten().filter(|e| e.file_type().is_file()) {
                let bytes = fs::read(e.path()).unwrap();
                assert!(
                    !String::from_utf8_lossy(&bytes).contains(secret),
                    "{secret} is in {}",
                    e.path().display()
                );
            }
        }
    }
}
