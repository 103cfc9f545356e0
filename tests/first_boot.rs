//! The first boot after an install (issue #13): the boot drill runs before any backup exists.
//! It must not fail (a failed datavault-drill.service fires the OnFailure= hook on every fresh
//! install), must say plainly that there is no backup yet, and must not hide a drive whose
//! archives have gone missing or a manual drill asked of an empty drive.

mod util;

use std::fs;

use util::Fixture;

fn audit(f: &Fixture) -> serde_json::Value {
    serde_json::from_str(&f.expect(&["--json", "audit"], 0).stdout).unwrap()
}

#[test]
fn a_boot_drill_before_the_first_backup_exits_0_and_says_no_backup_yet() {
    let f = Fixture::new();
    let r = f.expect(&["drill", "--trigger", "boot"], 0);
    assert!(r.stdout.contains("no backup yet"), "{}", r.stdout);
    assert!(!r.stdout.contains("DRILL PASSED"), "nothing was drilled: {}", r.stdout);

    let j = f.expect(&["--json", "drill", "--trigger", "boot"], 0);
    let d: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    assert_eq!(d["passed"], false, "{d}");
    assert!(d["nothing_to_drill"].as_str().unwrap().contains("no backup yet"), "{d}");

    // Recorded: a WARNING drill run, and no drill event (status and metrics know no drill).
    let a = audit(&f);
    let run = &a["runs"][0];
    assert_eq!((run["command"].as_str(), run["trigger"].as_str()), (Some("drill"), Some("boot")), "{a}");
    assert_eq!(run["status"], "WARNING", "{a}");
    assert!(a["events"].as_array().unwrap().is_empty(), "{a}");
    let s: serde_json::Value = serde_json::from_str(&f.expect(&["--json", "status"], 0).stdout).unwrap();
    assert!(s["last_drill"].is_null(), "{s}");
    assert!(
        s["next_steps"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().contains("no backup yet")),
        "{s}"
    );
    assert!(f.all_target_files().iter().all(|n| n.starts_with('.')), "{:?}", f.all_target_files());
}

#[test]
fn a_manual_drill_of_an_empty_drive_is_still_a_usage_error() {
    let f = Fixture::new();
    let r = f.expect(&["drill"], 2);
    assert!(r.stderr.contains("no complete backup"), "{}", r.stderr);
}

#[test]
fn a_boot_drill_fails_when_the_archives_it_knew_are_gone() {
    let f = Fixture::new();
    f.backup();
    f.expect(&["drill", "--trigger", "boot"], 0);
    // Someone empties the drive (or it is swapped for a blank one with the same marker).
    for p in f.all_target_files() {
        let p = f.target.join(p);
        if p.is_file() {
            fs::remove_file(p).unwrap();
        }
    }
    let r = f.run(&["drill", "--trigger", "boot"]);
    assert_ne!(r.code, 0, "a vanished backup must alarm\n{}\n{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("no backup yet"), "{}", r.stdout);
}

#[test]
fn a_boot_drill_after_the_first_backup_drills_it() {
    let f = Fixture::new();
    f.backup();
    let r = f.expect(&["drill", "--trigger", "boot"], 0);
    assert!(r.stdout.contains("DRILL PASSED"), "{}", r.stdout);
}

/// A Pi that was off on Sunday boots: the weekly timer's catch-up (`Persistent=`) starts right
/// after the boot drill. It must not drill the same backup again (on a big Pi that is another
/// full restore at boot), nor race the boot drill: a newer backup makes it drill again.
#[test]
fn the_weekly_drill_right_after_the_boot_drill_skips_the_backup_it_just_proved() {
    let f = Fixture::new();
    let first = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    f.expect(&["drill", "--trigger", "boot"], 0);
    let events_before = audit(&f)["events"].as_array().unwrap().len();

    let r = f.expect(&["--json", "drill", "--trigger", "timer"], 0);
    let d: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(d["archive"], first.as_str(), "{d}");
    assert!(d["nothing_to_drill"].as_str().unwrap().contains("nothing new to prove"), "{d}");
    assert!(d["checks"].as_array().unwrap().is_empty(), "nothing was drilled: {d}");
    // A SUCCESS run that records no drill: the boot drill's pass stays the last drill.
    let a = audit(&f);
    assert_eq!(
        (a["runs"][0]["command"].as_str(), a["runs"][0]["trigger"].as_str()),
        (Some("drill"), Some("timer"))
    );
    assert_eq!(a["runs"][0]["status"], "SUCCESS", "{a}");
    assert_eq!(a["events"].as_array().unwrap().len(), events_before, "{a}");

    // A manual drill is never skipped, nor is the weekly drill of a newer backup.
    assert!(f.expect(&["drill"], 0).stdout.contains("DRILL PASSED"));
    let second = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    let r = f.expect(&["drill", "--trigger", "timer"], 0);
    assert!(
        r.stdout.contains(&format!("drill of {second}")) && r.stdout.contains("DRILL PASSED"),
        "{}",
        r.stdout
    );
}
