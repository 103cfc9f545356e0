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
