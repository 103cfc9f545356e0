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
