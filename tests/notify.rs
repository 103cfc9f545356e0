//! Notifications (#15) end to end: the real binary, a local HTTP server standing in for
//! healthchecks and ntfy, a fake `sendmail` capturing the mail. Checks method, path, body and
//! headers, that nothing secret is in them, the once-per-state-change rule, and that a
//! notification that cannot be sent never changes a backup's exit code.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use util::http::{closed_port, silent_port, Server};
use util::Fixture;

const UUID: &str = "5f1e0c2a-secret-check-uuid";
const TOPIC: &str = "secret-topic-4b1d";
const TOKEN: &str = "tk_secrettoken0123456789";

/// A fixture whose pings and ntfy posts go to `server`.
fn with_server(server: &Server) -> Fixture {
    let f = Fixture::new();
    let token = f.path().join("ntfy.token");
    fs::write(&token, format!("{TOKEN}\n")).unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    f.set("notify.ping_url", server.url(&format!("/ping/{UUID}")));
    f.set("notify.ntfy_url", server.url(&format!("/{TOPIC}")));
    f.set("notify.ntfy_token_file", token.to_str().unwrap());
    f
}

/// Titles of the ntfy posts among `reqs`.
fn ntfy_titles(reqs: &[util::http::Request]) -> Vec<String> {
    reqs.iter()
        .filter(|r| r.path == format!("/{TOPIC}"))
        .map(|r| r.header("title").unwrap_or("").to_string())
        .collect()
}

#[test]
fn pings_and_ntfy_posts_reach_the_server_once_per_change_of_state() {
    let server = Server::start(200);
    let f = with_server(&server);
    let identity = fs::read_to_string(&f.identity).unwrap();

    // A good backup: the success ping, nothing to tell on ntfy.
    f.backup();
    f.expect(&["notify"], 0);
    let reqs = server.drain();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let ping = &reqs[0];
    assert_eq!((ping.method.as_str(), ping.path.as_str()), ("POST", format!("/ping/{UUID}").as_str()));
    assert!(ping.body.starts_with("backup backup-") && ping.body.ends_with("exit code: 0"), "{}", ping.body);

    // The drive goes away: the failure ping (exit code 3 in the body), and on ntfy "backup
    // failed" and "drive missing", urgent, with the token.
    let usb = f.target.clone();
    let away = f.path().join("usb-away");
    fs::rename(&usb, &away).unwrap();
    f.expect(&["backup"], 3);
    f.expect(&["notify"], 0);
    let reqs = server.drain();
    let fail = reqs.iter().find(|r| r.path.starts_with("/ping/")).expect("a failure ping");
    assert_eq!(fail.path, format!("/ping/{UUID}/fail"));
    assert!(fail.body.ends_with("exit code: 3"), "{}", fail.body);
    let mut titles = ntfy_titles(&reqs);
    titles.sort();
    assert_eq!(titles.len(), 2, "{titles:?}");
    assert!(
        titles[0].ends_with("backup drive missing") && titles[1].ends_with("backup failed"),
        "{titles:?}"
    );
    for r in reqs.iter().filter(|r| r.path == format!("/{TOPIC}")) {
        assert_eq!(r.method, "POST");
        assert_eq!(r.header("priority"), Some("5"));
        assert_eq!(r.header("authorization"), Some(format!("Bearer {TOKEN}").as_str()));
        assert!(r.body.contains("sudo datavault status"), "{}", r.body);
    }
    for r in &reqs {
        let text = format!("{}{}", r.body, r.header("title").unwrap_or(""));
        for secret in [UUID, TOPIC, TOKEN, identity.trim()] {
            assert!(!text.contains(secret), "a secret is in a message: {}", r.all_text());
        }
    }

    // The timer retries and fails again: only the ping, no second ntfy storm.
    f.expect(&["backup"], 3);
    f.expect(&["notify"], 0);
    f.expect(&["notify"], 0);
    let reqs = server.drain();
    assert_eq!(ntfy_titles(&reqs), Vec::<String>::new(), "told once per change: {reqs:?}");
    assert_eq!(reqs.len(), 1);

    // Back: both problems end, one message each, and the success ping.
    fs::rename(&away, &usb).unwrap();
    f.expect(&["backup"], 0);
    f.expect(&["notify"], 0);
    let reqs = server.drain();
    let mut titles = ntfy_titles(&reqs);
    titles.sort();
    assert!(
        titles.len() == 2 && titles.iter().all(|t| t.contains("again") || t.contains("is back")),
        "{titles:?}"
    );
    assert!(reqs.iter().filter(|r| r.path == format!("/{TOPIC}")).all(|r| r.header("priority") == Some("2")));

    // A restore is told once.
    f.expect(&["restore", "--yes"], 0);
    f.expect(&["notify"], 0);
    f.expect(&["notify"], 0);
    let titles = ntfy_titles(&server.drain());
    assert_eq!(titles.len(), 1, "{titles:?}");
    assert!(titles[0].contains("was restored"), "{titles:?}");

    // Everything recorded in the catalog, every delivery sent.
    let list = f.expect(&["--json", "notify", "--list"], 0);
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert!(rows.len() >= 8 && rows.iter().all(|r| r["status"] == "SENT"), "{v:#}");
    let status: serde_json::Value = serde_json::from_str(&f.expect(&["--json", "status"], 0).stdout).unwrap();
    assert_eq!(status["notifications_pending"], 0);
}

#[test]
fn the_start_ping_goes_to_url_start() {
    let server = Server::start(200);
    let f = with_server(&server);
    let r = f.expect(&["notify", "--start"], 0);
    assert!(r.stdout.contains("start ping sent"), "{}", r.stdout);
    let req = server.next("the start ping");
    assert_eq!((req.method.as_str(), req.path.clone()), ("POST", format!("/ping/{UUID}/start")));
    assert!(req.body.starts_with("backup starting on "), "{}", req.body);
}

#[test]
fn an_unreachable_or_hung_server_never_changes_a_backup_and_is_retried() {
    let f = Fixture::new();
    let (_hung, hung_port) = silent_port();
    f.set("notify.ping_url", format!("http://127.0.0.1:{}/ping/{UUID}", closed_port()));
    f.set("notify.ntfy_url", format!("http://127.0.0.1:{hung_port}/{TOPIC}"));
    f.set("notify.timeout_seconds", 1);
    // No network at all for the start ping: the backup's unit goes on regardless.
    f.expect(&["notify", "--start"], 0);
    f.expect(&["backup"], 0);
    fs::rename(&f.target, f.path().join("away")).unwrap();
    f.expect(&["backup"], 3);
    let t = Instant::now();
    let r = f.expect(&["notify"], 0);
    assert!(t.elapsed() < Duration::from_secs(20), "the timeouts bound the run: {:?}", t.elapsed());
    assert!(r.stdout.contains("not sent") && r.stdout.contains("retried"), "{}", r.stdout);
    for secret in [UUID, TOPIC] {
        assert!(!r.stdout.contains(secret) && !r.stderr.contains(secret), "{}\n{}", r.stdout, r.stderr);
    }
    let status: serde_json::Value = serde_json::from_str(&f.expect(&["--json", "status"], 0).stdout).unwrap();
    assert!(status["notifications_pending"].as_u64().unwrap() >= 3, "{status:#}");
    let prom = fs::read_to_string(f.state.join("datavault.prom")).unwrap();
    assert!(
        prom.lines().any(|l| l.starts_with("datavault_notifications_pending ") && !l.ends_with(" 0")),
        "{prom}"
    );

    // The server comes back: the pending messages go out; only the newest ping is sent.
    let server = Server::start(200);
    f.set("notify.ping_url", server.url(&format!("/ping/{UUID}")));
    f.set("notify.ntfy_url", server.url(&format!("/{TOPIC}")));
    f.expect(&["notify"], 0);
    let reqs = server.drain();
    let pings: Vec<_> = reqs.iter().filter(|r| r.path.starts_with("/ping/")).collect();
    assert_eq!(pings.len(), 1, "only the newest ping: {reqs:?}");
    assert_eq!(pings[0].path, format!("/ping/{UUID}/fail"));
    assert_eq!(ntfy_titles(&reqs).len(), 2, "{reqs:?}");
    let status: serde_json::Value = serde_json::from_str(&f.expect(&["--json", "status"], 0).stdout).unwrap();
    assert_eq!(status["notifications_pending"], 0);
}

#[test]
fn e_mail_goes_to_sendmail_as_an_rfc_5322_message() {
    let f = Fixture::new();
    let out = f.path().join("mail");
    fs::create_dir(&out).unwrap();
    let sendmail = f.path().join("sendmail");
    fs::write(&sendmail, format!("#!/bin/sh\necho \"$@\" > {0}/args\ncat > {0}/message\n", out.display()))
        .unwrap();
    fs::set_permissions(&sendmail, fs::Permissions::from_mode(0o755)).unwrap();
    f.set("notify.email_to", toml::Value::Array(vec!["owner@example.com".into()]));
    f.set("notify.email_from", "vault@example.com");
    f.set("notify.sendmail", sendmail.to_str().unwrap());
    f.backup(); // so that the test message is the only one to send

    f.expect(&["notify", "--test"], 0);
    assert_eq!(fs::read_to_string(out.join("args")).unwrap().trim(), "-t -i");
    let msg = fs::read_to_string(out.join("message")).unwrap();
    let (head, body) = msg.split_once("\n\n").expect("headers, a blank line, the body");
    for h in [
        "From: DataVault <vault@example.com>\n",
        "To: owner@example.com\n",
        "Subject: DataVault on ",
        "MIME-Version: 1.0\n",
        "Content-Type: text/plain; charset=utf-8\n",
    ] {
        assert!(head.contains(h), "{h:?} missing in:\n{head}");
    }
    let date = head.lines().find_map(|l| l.strip_prefix("Date: ")).expect("a Date header");
    chrono::DateTime::parse_from_rfc2822(date).expect("Date in RFC 2822 form");
    let host = datavault::ops::host();
    let id = head.lines().find_map(|l| l.strip_prefix("Message-ID: ")).expect("a Message-ID");
    assert!(id.starts_with('<') && id.ends_with(&format!("@{host}>")), "{id}");
    assert!(body.contains("this is a test"), "{body}");

    // A drill that fails (the wrong key) is mailed; a sendmail that fails keeps it pending.
    let other = f.path().join("keys/other.txt");
    datavault::keys::generate_identity_file(&other).unwrap();
    f.set("encryption.identity", other.to_str().unwrap());
    f.expect(&["drill"], 4);
    f.set("notify.sendmail", "/bin/false");
    let r = f.expect(&["notify"], 0);
    assert!(r.stdout.contains("/bin/false exited with 1"), "{}", r.stdout);
    f.set("notify.sendmail", sendmail.to_str().unwrap());
    f.expect(&["notify"], 0);
    let msg = fs::read_to_string(out.join("message")).unwrap();
    assert!(msg.contains("restore drill failed"), "{msg}");
}

#[test]
fn completions_and_the_man_page_come_from_the_command_line_definition() {
    let f = Fixture::new();
    let bash = f.expect(&["completions", "bash"], 0).stdout;
    assert!(bash.contains("_datavault()") && bash.contains("notify"), "bash");
    assert!(f.expect(&["completions", "zsh"], 0).stdout.starts_with("#compdef datavault"));
    assert!(f.expect(&["completions", "fish"], 0).stdout.contains("complete -c datavault"));
    let man = f.expect(&["man"], 0).stdout;
    assert!(man.contains(".TH datavault 1") && man.contains("notify"), "{}", &man[..200.min(man.len())]);
    assert!(!f.expect(&["--help"], 0).stdout.contains("\n  man "), "man stays hidden");
    f.expect(&["completions", "tcsh"], 2);
}

#[test]
fn a_nearly_full_drive_is_told_with_its_fill_level() {
    let server = Server::start(200);
    let f = with_server(&server);
    f.backup();
    f.set("notify.full_above_percent", 1);
    f.expect(&["notify"], 0);
    let reqs = server.drain();
    let full: Vec<_> =
        reqs.iter().filter(|r| r.header("title").is_some_and(|t| t.ends_with("nearly full"))).collect();
    assert_eq!(full.len(), 1, "{reqs:?}");
    assert!(full[0].body.contains("% used, ") && full[0].body.contains(" free"), "{}", full[0].body);
    assert_eq!(full[0].header("priority"), Some("4"));
    let status = f.expect(&["status"], 0).stdout;
    assert!(status.contains("the backup drive is nearly full"), "{status}");
}
