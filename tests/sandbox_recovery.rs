//! Found on the Pi VM (issue #13): after a power cut in the middle of an in-place restore, the
//! first datavault run at the next boot is the boot drill, inside its systemd sandbox, where
//! the uploads' folder was read-only (ProtectSystem=strict; the paths drop-in opened only the
//! database's folder). The repair then did what it could, removed the journal, and left the
//! restore's staging and set-aside folders behind for good (and, cut earlier in the swap, it
//! could leave the database rolled back but not the uploads). Now a run that cannot write a
//! folder the repair needs changes nothing and says who can finish it; the next run that can
//! (a shell, or a unit with the right ReadWritePaths=) stops the app, repairs, starts it.
//!
//! The read-only folder is made as systemd makes it: a bind mount of the folder onto itself,
//! remounted read-only. Needs root (skipped otherwise, and under emulation).

mod util;

use std::fs;
use std::path::Path;
use std::process::Command;

use rusqlite::Connection;
use util::{emulated, is_root, skip, Fixture};

struct ReadOnlyBind<'a>(&'a Path);

impl<'a> ReadOnlyBind<'a> {
    fn new(dir: &'a Path) -> ReadOnlyBind<'a> {
        let bind = Command::new("mount").arg("--bind").arg(dir).arg(dir).status().unwrap();
        assert!(bind.success(), "mount --bind");
        let ro = Command::new("mount").args(["-o", "remount,bind,ro"]).arg(dir).status().unwrap();
        assert!(ro.success(), "remount ro");
        ReadOnlyBind(dir)
    }
}

impl Drop for ReadOnlyBind<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn a_restore_cut_off_is_repaired_only_by_a_run_that_can_write_every_folder_it_touches() {
    if !is_root() || emulated() {
        return skip("needs root for a read-only bind mount (ran natively as root in CI)");
    }
    let f = Fixture::new();
    // The start command kills datavault the first time: the swap is done and journaled.
    let marker = f.path().join("kill-once");
    let cfg = fs::read_to_string(&f.config).unwrap().replace(
        "start_command = \"echo ",
        &format!(
            "start_command = \"if [ -e {m} ]; then rm {m}; kill -9 $PPID; fi; echo ",
            m = marker.display()
        ),
    );
    fs::write(&f.config, cfg).unwrap();
    let restored = f.fingerprint();
    f.backup();
    Connection::open(&f.app.database).unwrap().execute("UPDATE users SET name = 'changed'", []).unwrap();
    fs::write(&marker, b"").unwrap();
    assert_ne!(f.run(&["restore", "--yes"]).code, 0);
    let journal = f.state.join("restore-journal.json");
    assert!(journal.exists(), "the swap was journaled");

    let storage = f.app.uploads.parent().unwrap().to_path_buf();
    {
        let _ro = ReadOnlyBind::new(&storage);
        let r = f.expect(&["backup"], 1);
        assert!(r.stderr.contains("must be finished") && r.stderr.contains("read-only"), "{}", r.stderr);
        assert!(journal.exists(), "the journal stays for a run that can repair");
        assert_eq!(f.fingerprint(), restored, "nothing moved");
        let a: serde_json::Value = serde_json::from_str(&f.expect(&["--json", "audit"], 0).stdout).unwrap();
        let run = &a["runs"][0];
        assert_eq!(run["status"], "FAILED", "{a}");
        assert!(
            run["error"].as_str().unwrap().contains("must be finished"),
            "recorded, not left RUNNING: {a}"
        );
    }

    f.backup();
    assert!(!journal.exists());
    assert_eq!(f.fingerprint(), restored);
    f.assert_no_restore_leftovers();
    let log = fs::read_to_string(f.path().join("service.log")).unwrap();
    // The restore: stopped, started (its start command killed datavault, then echoed); the
    // repair: stopped again before moving anything, then started.
    assert_eq!(log, "stopped\nstarted\nstopped\nstarted\n", "the repair stops the app first, then starts it");
}
