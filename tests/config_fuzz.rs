//! A table of broken configurations: each must exit 2 with one line that names the key, and
//! nothing may be written to the target. Plus broken identity files for the commands that
//! need the private key.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use util::Fixture;

/// Replace the whole line that starts with `key = ` (the first one) by `line`.
fn set(text: &str, key: &str, line: &str) -> String {
    let mut done = false;
    text.lines()
        .map(|l| {
            if !done && l.starts_with(&format!("{key} = ")) {
                done = true;
                line.to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn add(text: &str, section: &str, line: &str) -> String {
    if text.contains(&format!("[{section}]\n")) {
        text.replacen(&format!("[{section}]\n"), &format!("[{section}]\n{line}\n"), 1)
    } else {
        format!("{text}[{section}]\n{line}\n")
    }
}

type Case = (&'static str, Box<dyn Fn(&str) -> String>, &'static str);

fn cases() -> Vec<Case> {
    vec![
        ("database not a string", Box::new(|t| set(t, "database", "database = 42")), "database"),
        ("database relative", Box::new(|t| set(t, "database", "database = \"data/app.db\"")), "database"),
        ("uploads relative", Box::new(|t| set(t, "uploads", "uploads = \"uploads\"")), "uploads"),
        ("target path a bool", Box::new(|t| set(t, "path", "path = true")), "path"),
        ("target path relative", Box::new(|t| set(t, "path", "path = \"usb\"")), "path"),
        ("target path empty", Box::new(|t| set(t, "path", "path = \"\"")), "path"),
        (
            "require_luks a string",
            Box::new(|t| set(t, "require_luks", "require_luks = \"yes\"")),
            "require_luks",
        ),
        ("unknown key", Box::new(|t| add(t, "target", "require_lusk = true")), "require_lusk"),
        ("unknown section", Box::new(|t| add(t, "bogus", "x = 1")), "bogus"),
        ("recipients empty", Box::new(|t| set(t, "recipients", "recipients = []")), "recipients"),
        (
            "recipients not a key",
            Box::new(|t| set(t, "recipients", "recipients = [\"age1notakey\"]")),
            "recipients",
        ),
        (
            "recipients a secret key",
            Box::new(|t| {
                set(
                    t,
                    "recipients",
                    "recipients = [\"AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\"]",
                )
            }),
            "recipients",
        ),
        ("recipients a string", Box::new(|t| set(t, "recipients", "recipients = \"age1x\"")), "recipients"),
        ("identity relative", Box::new(|t| set(t, "identity", "identity = \"identity.txt\"")), "identity"),
        ("level 0", Box::new(|t| set(t, "level", "level = 0")), "level"),
        ("level 20", Box::new(|t| set(t, "level", "level = 20")), "level"),
        ("level a string", Box::new(|t| set(t, "level", "level = \"3\"")), "level"),
        ("threads negative", Box::new(|t| add(t, "compression", "threads = -1")), "threads"),
        ("threads huge", Box::new(|t| add(t, "compression", "threads = 100000")), "threads"),
        ("keep_last negative", Box::new(|t| add(t, "retention", "keep_last = -1")), "keep_last"),
        ("keep_daily a float", Box::new(|t| add(t, "retention", "keep_daily = 1.5")), "keep_daily"),
        (
            "keep_monthly huge",
            Box::new(|t| add(t, "retention", "keep_monthly = 99999999999")),
            "keep_monthly",
        ),
        (
            "keep_pre_restore negative",
            Box::new(|t| add(t, "retention", "keep_pre_restore = -3")),
            "keep_pre_restore",
        ),
        ("state dir relative", Box::new(|t| set(t, "dir", "dir = \"state\"")), "dir"),
        ("scratch_dir relative", Box::new(|t| add(t, "drill", "scratch_dir = \"scratch\"")), "scratch_dir"),
        ("checks not a list", Box::new(|t| set(t, "checks", "checks = \"SELECT 1\"")), "checks"),
        ("service half", Box::new(|t| set(t, "start_command", "")), "start_command"),
        ("led_pin out of range", Box::new(|t| add(t, "gpio", "led_pin = 99")), "led_pin"),
        ("button_pin negative", Box::new(|t| add(t, "gpio", "button_pin = -1")), "button_pin"),
        ("debounce negative", Box::new(|t| add(t, "gpio", "debounce_ms = -5")), "debounce_ms"),
        ("max_age_hours zero", Box::new(|t| add(t, "agent", "max_age_hours = 0")), "max_age_hours"),
        ("marker_id empty", Box::new(|t| add(t, "target", "marker_id = \"\"")), "marker_id"),
        ("no [source]", Box::new(|t| t.replace("[source]", "[sauce]")), "sauce"),
        ("duplicate key", Box::new(|t| add(t, "compression", "level = 5")), "level"),
        ("broken TOML", Box::new(|t| format!("{t}[retention\n")), "line"),
        ("database as table", Box::new(|t| set(t, "database", "database = { path = \"/x\" }")), "database"),
    ]
}

#[test]
fn a_table_of_broken_configs_exits_2_naming_the_key() {
    let f = Fixture::new();
    let good = fs::read_to_string(&f.config).unwrap();
    let mut failures = Vec::new();
    let table = cases();
    for (name, edit, key) in &table {
        let text = edit(&good);
        assert_ne!(text, good, "{name}: the edit changed nothing");
        fs::write(&f.config, &text).unwrap();
        let r = f.run(&["backup"]);
        let ok = r.code == 2 && r.stderr.contains(key) && r.stderr.trim().lines().count() == 1;
        if !ok {
            failures.push(format!("{name}: exit {} (want 2 naming {key:?}): {}", r.code, r.stderr.trim()));
        }
        // A private key pasted where a public one goes is never echoed (stderr goes to the
        // journal), not by the backup, not by doctor.
        let doctor = f.run(&["doctor"]);
        for (what, text) in [("backup", &r.stderr), ("doctor", &doctor.stdout)] {
            if text.contains("QQQQQQQQ") {
                failures.push(format!("{name}: {what} echoes the secret key: {text}"));
            }
        }
        if !f.all_target_files().is_empty() {
            failures.push(format!("{name}: accepted, a backup was written"));
            for p in f.all_target_files() {
                let _ = fs::remove_file(f.target.join(p));
            }
        }
    }
    fs::write(&f.config, &good).unwrap();
    eprintln!("broken configs: {} cases, {} not refused as they should be", table.len(), failures.len());
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn broken_identity_files_exit_2_naming_the_identity() {
    let f = Fixture::new();
    f.backup();
    let good = fs::read(&f.identity).unwrap();
    let id = f.identity.display().to_string();
    let secret = String::from_utf8_lossy(&good)
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .expect("an identity line")
        .to_string();
    let cases: Vec<(&str, Vec<u8>, u32, &str)> = vec![
        ("world-readable", good.clone(), 0o644, "chmod 600"),
        ("group-readable", good.clone(), 0o640, "chmod 600"),
        ("garbage", b"this is not a key\n".to_vec(), 0o600, &id),
        ("empty", Vec::new(), 0o600, &id),
        ("a public key", format!("{}\n", f.recipient).into_bytes(), 0o600, &id),
        (
            "a broken secret key",
            b"AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\n".to_vec(),
            0o600,
            &id,
        ),
    ];
    for (name, bytes, mode, needle) in &cases {
        fs::write(&f.identity, bytes).unwrap();
        fs::set_permissions(&f.identity, fs::Permissions::from_mode(*mode)).unwrap();
        for cmd in [&["drill"][..], &["restore", "--yes"], &["verify", "--deep"]] {
            let r = f.run(cmd);
            assert_eq!(r.code, 2, "{name}: {cmd:?} exited {}: {}", r.code, r.stderr);
            assert!(r.stderr.contains(needle), "{name}: {cmd:?}: {}", r.stderr);
            assert!(
                !r.stderr.contains(&secret) && !r.stderr.contains("QQQQQQQQ"),
                "{name}: the key is echoed: {}",
                r.stderr
            );
        }
    }
    fs::remove_file(&f.identity).unwrap();
    let r = f.expect(&["drill"], 2);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    eprintln!("broken identities: {} cases x 3 commands, + missing", cases.len());
}
