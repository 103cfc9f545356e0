//! The disaster path under attack and under carelessness (issue #11): every way a hostile
//! review found for an in-place restore, or the runs around it, to lose or expose data.
//!
//! Each test names the review's item. They drive the real binary against a sample app, as an
//! owner would; the ones that need mounts or another user run as root (CI) and say so when
//! skipped.

mod util;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
use util::{emulated, is_root, skip, Fixture, Tmpfs};

const LIMIT: Duration = Duration::from_secs(120);

fn python() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import sqlite3"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A small stand-in for the application: a python script the service commands run.
fn app_script(f: &Fixture, name: &str, body: &str) -> PathBuf {
    let p = f.path().join(name);
    fs::write(
        &p,
        format!(
            "import os, sqlite3, sys\nDB = {:?}\nUPLOADS = {:?}\n{body}\n",
            f.app.database, f.app.uploads
        ),
    )
    .unwrap();
    p
}

fn integrity(db: &Path) -> String {
    Connection::open(db).unwrap().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap()
}

fn newest_pre_restore(f: &Fixture) -> String {
    let mut names: Vec<String> = f
        .all_target_files()
        .into_iter()
        .filter(|n| n.starts_with("pre-restore-") && n.ends_with(".tar.zst.age"))
        .collect();
    names.sort();
    names.pop().expect("a pre-restore archive")
}

// ---- 1. a filesystem mounted below uploads --------------------------------------------------

#[test]
fn item01_a_target_state_or_scratch_inside_uploads_is_refused_by_the_config() {
    let f = Fixture::new();
    let inside = f.app.uploads.join("usb");
    for (key, value) in [
        ("target.path", inside.clone()),
        ("state.dir", f.app.uploads.join("state")),
        ("drill.scratch_dir", f.app.uploads.join("scratch")),
        ("target.path", f.app.database.clone()),
        ("state.dir", PathBuf::from(format!("{}-wal", f.app.database.display()))),
        // `..` and NUL bytes must not get past the check.
        ("target.path", f.app.uploads.join("x/../usb")),
    ] {
        let g = Fixture::new();
        let value = value.to_str().unwrap().replace(f.path().to_str().unwrap(), g.path().to_str().unwrap());
        g.set(key, value.as_str());
        let r = g.expect(&["backup"], 2);
        assert!(r.stderr.contains(key), "{key} = {value}: {}", r.stderr);
    }
    let g = Fixture::new();
    g.set("target.path", "/mnt/usb\0/x");
    let r = g.expect(&["backup"], 2);
    assert!(r.stderr.contains("target.path"), "{}", r.stderr);
}

#[test]
fn item01_a_restore_never_moves_or_empties_a_filesystem_mounted_below_uploads() {
    if !is_root() || emulated() {
        return skip("needs root and a real kernel to mount a tmpfs");
    }
    let f = Fixture::new();
    f.backup();
    // The owner mounted something inside uploads (a cache disk, or the backup drive itself).
    let mnt = Tmpfs::mount(&f.app.uploads.join("cache"), "8m");
    fs::write(mnt.path.join("precious.bin"), b"on another filesystem").unwrap();
    f.backup();
    let oldest = f.archive_files().first().unwrap().file_name().unwrap().to_str().unwrap().to_string();
    let before = f.fingerprint();
    let r = f.expect(&["restore", &oldest, "--yes"], 2);
    assert!(r.stderr.contains("mount point") && r.stderr.contains("cache"), "{}", r.stderr);
    assert_eq!(f.fingerprint(), before, "nothing changed");
    assert_eq!(fs::read(mnt.path.join("precious.bin")).unwrap(), b"on another filesystem");
    assert!(!f.path().join("service.log").exists(), "refused before the app was stopped");
    assert!(
        !f.all_target_files().iter().any(|n| n.starts_with("pre-restore-")),
        "refused before a safety archive was written"
    );
    f.assert_no_restore_leftovers();
}

#[test]
fn item01_the_backup_drive_mounted_inside_uploads_is_refused_before_anything_is_written() {
    if !is_root() || emulated() {
        return skip("needs root and a real kernel to mount a tmpfs");
    }
    let f = Fixture::new();
    let usb = Tmpfs::mount(&f.app.uploads.join("usb"), "16m");
    f.set("target.path", usb.path.to_str().unwrap());
    f.set("target.require_mountpoint", true);
    let r = f.expect(&["backup"], 2);
    assert!(r.stderr.contains("target.path") && r.stderr.contains("uploads"), "{}", r.stderr);
    assert_eq!(fs::read_dir(&usb.path).unwrap().count(), 0);
}

// ---- 2. the restored database's WAL beside the old database -----------------------------------

#[test]
fn item02_a_failed_start_never_leaves_the_restored_wal_beside_the_old_database() {
    if !python() {
        return skip("python3 with sqlite3 is needed to play the application");
    }
    let f = Fixture::new();
    f.backup();
    Connection::open(&f.app.database)
        .unwrap()
        .execute("UPDATE users SET name = 'after the backup'", [])
        .unwrap();
    // The app runs (a marker says so). A clean stop checkpoints and removes its -wal and
    // -shm; stopping an app that is not running does nothing, like `systemctl stop`.
    let running = f.path().join("app.running");
    fs::write(&running, b"").unwrap();
    let stop = app_script(
        &f,
        "stop.py",
        &format!(
            "if os.path.exists({running:?}):\n\
             \x20   c = sqlite3.connect(DB); c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.close()\n\
             \x20   for s in ('-wal', '-shm'):\n\
             \x20       os.path.exists(DB + s) and os.remove(DB + s)\n\
             \x20   os.remove({running:?})"
        ),
    );
    // A start that, on the restored data only, writes to the database, leaves its WAL and
    // dies (on the previous data it starts fine).
    let start = app_script(
        &f,
        "start.py",
        &format!(
            "c = sqlite3.connect(DB); c.execute('PRAGMA journal_mode=WAL')\n\
             if c.execute(\"SELECT count(*) FROM users WHERE name = 'after the backup'\").fetchone()[0] == 0:\n\
             \x20   c.execute(\"INSERT INTO users(name) VALUES ('written by the failed start')\"); c.commit()\n\
             \x20   os._exit(1)\n\
             open({running:?}, 'w').close()"
        ),
    );
    f.set("service.stop_command", format!("python3 {}", stop.display()));
    f.set("service.start_command", format!("python3 {}", start.display()));
    let before = f.fingerprint();
    let r = f.expect(&["restore", "--yes"], 1);
    assert!(r.stderr.contains("put back"), "{}", r.stderr);
    assert_eq!(integrity(&f.app.database), "ok", "the old database is whole");
    assert_eq!(f.fingerprint(), before, "exactly the previous data");
    f.assert_no_restore_leftovers();
    // What the app wrote while it failed to start is not thrown away: it is kept, with the
    // restored database it wrote to, and the message says where.
    let undone = f.undone_folders();
    let db_folder =
        undone.iter().find(|u| u.parent() == f.app.database.parent()).expect("the database's undone folder");
    assert!(r.stderr.contains(&db_folder.display().to_string()), "{}", r.stderr);
    let kept = db_folder.join("app.db");
    let n: i64 = Connection::open(&kept)
        .unwrap()
        .query_row("SELECT count(*) FROM users WHERE name = 'written by the failed start'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1, "the row the app wrote is in the kept database");
}

/// A power cut in the middle of the swap, then the machine reboots and the app comes up on
/// whatever is live before datavault repairs the restore: what the app writes then is never
/// deleted by the repair (red team #3).
#[test]
fn item04_writes_made_after_a_power_cut_mid_swap_survive_the_repair() {
    let f = Fixture::new();
    f.backup();
    let mut n = 1;
    loop {
        let out =
            f.command(&["restore", "--yes"]).env("DATAVAULT_CRASH_AFTER", n.to_string()).output().unwrap();
        if out.status.code().is_some() {
            break;
        }
        // "After the reboot" the app opens its database (creating it if the cut left none)
        // and writes a row.
        let c = Connection::open(&f.app.database).unwrap();
        c.execute_batch("CREATE TABLE IF NOT EXISTS after_reboot(x TEXT)").unwrap();
        c.execute("INSERT INTO after_reboot VALUES (?1)", [format!("cut {n}")]).unwrap();
        drop(c);
        let r = f.run(&["prune", "--dry-run"]);
        assert_eq!(r.code, 0, "cut {n}: the repair failed: {}", r.stderr);
        assert_eq!(integrity(&f.app.database), "ok", "cut {n}");
        let mut dbs = vec![f.app.database.clone()];
        for u in f.undone_folders() {
            dbs.extend(
                fs::read_dir(&u)
                    .unwrap()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().ends_with("app.db")),
            );
        }
        let found = dbs.iter().any(|db| {
            Connection::open(db)
                .and_then(|c| {
                    c.query_row("SELECT count(*) FROM after_reboot WHERE x = ?1", [format!("cut {n}")], |r| {
                        r.get::<_, i64>(0)
                    })
                })
                .map(|k| k == 1)
                .unwrap_or(false)
        });
        assert!(found, "cut {n}: the row written after the cut is lost (looked in {dbs:?})");
        n += 1;
    }
    assert!(n > 8, "the crash points covered the swap ({n})");
}

// ---- 3. the safety copy is taken once the app is stopped ----------------------------------------

#[test]
fn item03_what_the_app_writes_while_stopping_is_in_the_safety_copy() {
    if !python() {
        return skip("python3 with sqlite3 is needed to play the application");
    }
    let f = Fixture::new();
    f.backup();
    let stop = app_script(
        &f,
        "stop.py",
        "c = sqlite3.connect(DB); c.execute(\"INSERT INTO users(name) VALUES ('last words')\"); c.commit(); c.close()\n\
         open(os.path.join(UPLOADS, 'last-upload.txt'), 'w').write('saved while stopping')",
    );
    f.set("service.stop_command", format!("python3 {}", stop.display()));
    f.expect(&["restore", "--yes"], 0);
    let pre = newest_pre_restore(&f);
    let out = f.path().join("safety");
    f.expect(&["restore", &pre, "--to", out.to_str().unwrap()], 0);
    let n: i64 = Connection::open(out.join("db/app.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM users WHERE name = 'last words'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1, "the row written while stopping is in the safety copy");
    assert_eq!(fs::read(out.join("uploads/last-upload.txt")).unwrap(), b"saved while stopping");
}

// ---- 4. a power cut at every step of a restore, its rollback included ----------------------------

/// `DATAVAULT_CRASH_AFTER=N` makes datavault kill itself (SIGKILL, like a power cut for the
/// process) at the N-th crash point it reaches. Every N is tried until a run gets through.
fn cut_at_every_step(f: &Fixture, old: &str, new: &str, must_be_old: bool) -> usize {
    let mut n = 1;
    loop {
        let out =
            f.command(&["restore", "--yes"]).env("DATAVAULT_CRASH_AFTER", n.to_string()).output().unwrap();
        let crashed = out.status.code().is_none();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // The next locked run repairs whatever the cut left.
        let r = f.run(&["--json", "prune", "--dry-run"]);
        assert_eq!(r.code, 0, "cut {n}: the next run failed: {}", r.stderr);
        assert!(!f.state.join("restore-journal.json").exists(), "cut {n}: journal left");
        f.assert_no_restore_leftovers();
        assert_eq!(integrity(&f.app.database), "ok", "cut {n}");
        let now = f.fingerprint();
        if must_be_old {
            assert_eq!(now, old, "cut {n}: the failed restore must leave exactly the old state\n{stderr}");
        } else {
            assert!(now == old || now == new, "cut {n}: neither the old nor the new state\n{stderr}");
        }
        if !crashed {
            return n;
        }
        // Back to the old state for the next cut.
        if now != old {
            let pre = newest_pre_restore(f);
            f.expect(&["restore", &pre, "--yes"], 0);
            assert_eq!(f.fingerprint(), old);
        }
        n += 1;
    }
}

#[test]
fn item04_a_cut_at_any_step_of_a_restore_leaves_exactly_the_old_or_the_new_state() {
    let f = Fixture::new();
    let new = f.fingerprint();
    f.backup();
    Connection::open(&f.app.database).unwrap().execute("UPDATE users SET name = 'changed'", []).unwrap();
    let old = f.fingerprint();
    let steps = cut_at_every_step(&f, &old, &new, false);
    eprintln!("restore: {} crash points, each cut then recovered", steps - 1);
    assert!(steps > 8, "the crash points cover the swap ({steps})");
}

#[test]
fn item04_a_cut_at_any_step_of_the_rollback_after_a_failed_start_leaves_the_old_state() {
    let f = Fixture::new();
    let new = f.fingerprint();
    f.backup();
    Connection::open(&f.app.database).unwrap().execute("UPDATE users SET name = 'changed'", []).unwrap();
    let old = f.fingerprint();
    // The start command fails whenever the restored data is live (the app's own check).
    f.set(
        "service.start_command",
        format!(
            "echo started >> {log}; test \"$(python3 -c \"import sqlite3;print(sqlite3.connect('{db}').execute('select count(*) from users where name=\\'changed\\'').fetchone()[0])\")\" != 0",
            log = f.path().join("service.log").display(),
            db = f.app.database.display()
        ),
    );
    if !python() {
        return skip("python3 with sqlite3 is needed to play the application");
    }
    let steps = cut_at_every_step(&f, &old, &new, true);
    eprintln!("restore with a failing start: {} crash points, each cut then recovered", steps - 1);
}

// ---- 5. a crafted top-level uploads ------------------------------------------------------------
// (tests/unsafe_archives.rs: `a_top_level_uploads_that_is_a_symlink_or_a_file_is_refused`)

// ---- 6. a symlinked database path ----------------------------------------------------------------

#[test]
fn item06_a_symlinked_database_path_is_refused_with_the_real_path_named() {
    let f = Fixture::new();
    f.backup();
    let real = f.path().join("real.db");
    fs::rename(&f.app.database, &real).unwrap();
    for s in ["-wal", "-shm"] {
        let _ = fs::rename(format!("{}{s}", f.app.database.display()), format!("{}{s}", real.display()));
    }
    std::os::unix::fs::symlink(&real, &f.app.database).unwrap();
    let r = f.expect(&["backup"], 2);
    assert!(r.stderr.contains("symlink") && r.stderr.contains("real.db"), "{}", r.stderr);
    let r = f.expect(&["restore", "--yes"], 2);
    assert!(r.stderr.contains("symlink"), "{}", r.stderr);
    assert!(fs::symlink_metadata(&f.app.database).unwrap().file_type().is_symlink(), "the link is untouched");
    assert!(!f.path().join("service.log").exists());
    let r = f.run(&["doctor"]);
    assert!(r.stdout.contains("symlink"), "doctor says so: {}", r.stdout);

    // The same for uploads: doctor fails (red team #16), backup names the real folder.
    let g = Fixture::new();
    let real = g.path().join("real-uploads");
    fs::rename(&g.app.uploads, &real).unwrap();
    std::os::unix::fs::symlink(&real, &g.app.uploads).unwrap();
    let r = g.expect(&["backup"], 2);
    assert!(r.stderr.contains("symlink") && r.stderr.contains("real-uploads"), "{}", r.stderr);
    let r = g.run(&["doctor"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stdout.contains("real-uploads"), "{}", r.stdout);
}

// ---- 7. links planted where datavault cleans up -------------------------------------------------

#[test]
fn item07_cleanup_never_follows_a_planted_link() {
    let f = Fixture::new();
    let victim = f.path().join("victim");
    fs::create_dir_all(victim.join("sub")).unwrap();
    fs::write(victim.join("sub/file"), b"keep me").unwrap();
    fs::set_permissions(victim.join("sub"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(victim.join("sub/file"), fs::Permissions::from_mode(0o644)).unwrap();
    let parent = f.app.database.parent().unwrap();
    std::os::unix::fs::symlink(&victim, parent.join(".datavault-restore-99")).unwrap();
    let scratch = f.target.join(".datavault-drill");
    fs::create_dir_all(&scratch).unwrap();
    std::os::unix::fs::symlink(&victim, scratch.join("run-99")).unwrap();
    f.backup();
    f.expect(&["drill"], 0);
    assert_eq!(fs::read(victim.join("sub/file")).unwrap(), b"keep me");
    assert_eq!(fs::metadata(victim.join("sub")).unwrap().permissions().mode() & 0o777, 0o755);
    assert_eq!(fs::metadata(victim.join("sub/file")).unwrap().permissions().mode() & 0o777, 0o644);
}

// ---- 8. the state folder is checked, not trusted --------------------------------------------------

#[test]
fn item08_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched() {
    let f = Fixture::new();
    fs::create_dir_all(&f.state).unwrap();
    fs::set_permissions(&f.state, fs::Permissions::from_mode(0o700)).unwrap();
    let victim = f.path().join("victim.txt");
    fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, f.state.join("datavault.lock")).unwrap();
    let r = f.expect(&["backup"], 2);
    assert!(r.stderr.contains("datavault.lock"), "{}", r.stderr);
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn item08_a_state_folder_others_can_write_is_refused() {
    let f = Fixture::new();
    fs::create_dir_all(&f.state).unwrap();
    fs::set_permissions(&f.state, fs::Permissions::from_mode(0o777)).unwrap();
    let r = f.expect(&["backup"], 2);
    assert!(r.stderr.contains("state") && r.stderr.contains("chmod"), "{}", r.stderr);
    let r = f.run(&["doctor"]);
    assert!(r.stdout.contains("chmod"), "{}", r.stdout);
}

#[test]
fn item08_a_restore_journal_naming_foreign_paths_is_refused() {
    let f = Fixture::new();
    f.backup();
    let victim = f.path().join("victim");
    fs::create_dir_all(&victim).unwrap();
    fs::write(victim.join("file"), b"keep me").unwrap();
    let journal = serde_json::json!({
        "archive": "backup-x.tar.zst.age",
        "phase": "swapped",
        "moves": [],
        "stages": [victim],
        "asides": [victim],
    });
    fs::write(f.state.join("restore-journal.json"), journal.to_string()).unwrap();
    fs::set_permissions(f.state.join("restore-journal.json"), fs::Permissions::from_mode(0o600)).unwrap();
    let r = f.run(&["backup"]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("restore journal"), "{}", r.stderr);
    assert_eq!(fs::read(victim.join("file")).unwrap(), b"keep me");
}

#[test]
fn item08_a_restore_journal_owned_by_another_user_is_refused() {
    if !is_root() {
        return skip("needs root to give a file to another user");
    }
    let f = Fixture::new();
    f.backup();
    let journal =
        serde_json::json!({"archive": "a", "phase": "swapped", "moves": [], "stages": [], "asides": []});
    let p = f.state.join("restore-journal.json");
    fs::write(&p, journal.to_string()).unwrap();
    std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
    let r = f.run(&["backup"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("restore journal") && r.stderr.contains("owned"), "{}", r.stderr);
}

// ---- 9. FIFOs and devices where files are expected ----------------------------------------------

fn mkfifo(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

#[test]
fn item09_fifos_and_device_links_on_the_drive_never_hang_a_command() {
    let f = Fixture::new();
    let b = f.backup();
    let name = b["manifest"]["archive"].as_str().unwrap().to_string();
    mkfifo(&f.target.join("backup-20300101T000000.000Z.json"));
    std::os::unix::fs::symlink("/dev/zero", f.target.join("backup-20300102T000000.000Z.json")).unwrap();
    for args in [&["list"][..], &["status"], &["verify", "--all"], &["backup"], &["prune"]] {
        let r = f.run_within(LIMIT, args);
        assert!(r.code == 0 || r.code == 4, "{args:?}: {} {}", r.code, r.stderr);
    }
    // The archive itself replaced by a FIFO, then by a link to /dev/zero.
    let stem = name.strip_suffix(".tar.zst.age").unwrap();
    let newest = f
        .archive_files()
        .into_iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .max()
        .unwrap();
    let archive = f.target.join(&newest);
    fs::remove_file(&archive).unwrap();
    mkfifo(&archive);
    for args in [
        &["verify", &newest][..],
        &["verify", "--deep", &newest],
        &["drill", &newest],
        &["restore", &newest, "--yes"],
    ] {
        let r = f.run_within(LIMIT, args);
        assert_eq!(r.code, 4, "{args:?}: {}", r.stderr);
    }
    fs::remove_file(&archive).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &archive).unwrap();
    for args in [&["verify", &newest][..], &["drill", &newest]] {
        let r = f.run_within(LIMIT, args);
        assert_eq!(r.code, 4, "{args:?}: {}", r.stderr);
    }
    assert!(stem.starts_with("backup-"));
}

#[test]
fn item09_a_fifo_identity_or_config_fails_fast() {
    let f = Fixture::new();
    f.backup();
    fs::remove_file(&f.identity).unwrap();
    mkfifo(&f.identity);
    let r = f.run_within(LIMIT, &["verify", "--deep"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("regular file"), "{}", r.stderr);
    let cfg = f.path().join("fifo.toml");
    mkfifo(&cfg);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_datavault"));
    cmd.arg("--config").arg(&cfg).arg("list").stdin(std::process::Stdio::null());
    let r = util::run_within(cmd, LIMIT);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

// ---- 10. decompression bombs: tests/unsafe_archives.rs `a_pax_size_...` -----------------------

// ---- 11. a damaged catalog ----------------------------------------------------------------------

#[test]
fn item11_a_damaged_catalog_is_set_aside_and_rebuilt_from_the_drive() {
    let f = Fixture::new();
    f.backup();
    f.backup();
    for s in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(f.state.join(format!("catalog.db{s}")));
    }
    fs::write(f.state.join("catalog.db"), vec![0xA5u8; 8192]).unwrap();
    let r = f.expect(&["backup"], 0);
    assert!(r.stderr.contains("catalog") && r.stderr.contains("damaged"), "{}", r.stderr);
    let aside: Vec<_> = fs::read_dir(&f.state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("catalog.db.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept for inspection");
    f.expect(&["drill"], 0);
    let audit = f.expect(&["--json", "audit"], 0);
    let v: serde_json::Value = serde_json::from_str(&audit.stdout).unwrap();
    assert_eq!(v["archives"].as_array().unwrap().len(), 3, "every archive on the drive is back: {v}");
}

// ---- 12. a database name with a backslash -----------------------------------------------------

#[test]
fn item12_a_database_name_with_a_backslash_drills_and_restores_in_place() {
    let f = Fixture::new();
    let odd = f.app.database.with_file_name("app\\prod.db");
    fs::rename(&f.app.database, &odd).unwrap();
    f.set("source.database", odd.to_str().unwrap());
    let db = odd.clone();
    let fp = || datavault::demo::fingerprint(&db, Some(&f.app.uploads)).unwrap();
    let original = fp();
    f.backup();
    f.expect(&["drill"], 0);
    Connection::open(&odd).unwrap().execute("UPDATE users SET name = 'lost'", []).unwrap();
    f.expect(&["restore", "--yes"], 0);
    assert_eq!(fp(), original);
}

// ---- 13. restore --to with a database that fails integrity_check --------------------------------
// (tests/unsafe_archives.rs: `restore_to_fails_when_the_database_fails_integrity_check`)

// ---- 14, 15. service commands that fail twice or hang ----------------------------------------------

#[test]
fn item14_a_start_that_fails_again_after_the_rollback_is_not_called_a_success() {
    let f = Fixture::new();
    f.backup();
    f.set("service.start_command", "exit 3");
    let before = f.fingerprint();
    let r = f.expect(&["restore", "--yes"], 1);
    assert!(r.stderr.contains("put back"), "{}", r.stderr);
    assert!(!r.stderr.contains("started again"), "{}", r.stderr);
    assert!(r.stderr.contains("start it by hand"), "{}", r.stderr);
    assert_eq!(f.fingerprint(), before);
}

#[test]
fn item15_a_stop_command_that_hangs_times_out_and_changes_nothing() {
    let f = Fixture::new();
    f.backup();
    f.set("service.stop_command", "sleep 600");
    f.set("service.timeout_seconds", 2);
    let before = f.fingerprint();
    let started = std::time::Instant::now();
    let r = f.run_within(LIMIT, &["restore", "--yes"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("did not finish within 2 s"), "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(f.fingerprint(), before);
    f.assert_no_restore_leftovers();
    // The lock was released: the next run goes.
    f.expect(&["list"], 0);
    f.backup();
}

// ---- 16. uploads as its own mount point ---------------------------------------------------------

#[test]
fn item16_uploads_as_its_own_mount_point_is_explained_before_anything_happens() {
    if !is_root() || emulated() {
        return skip("needs root and a real kernel to mount a tmpfs");
    }
    let f = Fixture::new();
    let before_files: Vec<_> = fs::read_dir(&f.app.uploads).unwrap().flatten().map(|e| e.path()).collect();
    let stash = f.path().join("stash");
    fs::create_dir(&stash).unwrap();
    for p in &before_files {
        fs::rename(p, stash.join(p.file_name().unwrap())).unwrap();
    }
    let mnt = Tmpfs::mount(&f.app.uploads, "16m");
    for p in fs::read_dir(&stash).unwrap().flatten() {
        let _ = std::process::Command::new("cp").arg("-a").arg(p.path()).arg(&mnt.path).status();
    }
    f.backup();
    let r = f.run(&["doctor"]);
    assert!(r.stdout.contains("mount point"), "doctor explains it: {}", r.stdout);
    let r = f.expect(&["restore", "--yes"], 2);
    assert!(r.stderr.contains("mount point"), "{}", r.stderr);
    assert!(!f.all_target_files().iter().any(|n| n.starts_with("pre-restore-")), "no safety archive written");
    assert!(!f.path().join("service.log").exists());
}

// ---- 17. smaller defects ---------------------------------------------------------------------------

#[test]
fn item17a_a_non_utf8_named_archive_and_its_manifest_are_never_deleted() {
    use std::os::unix::ffi::OsStrExt;
    let f = Fixture::new();
    let b = f.backup();
    let name = b["manifest"]["archive"].as_str().unwrap();
    let stem = name.strip_suffix(".tar.zst.age").unwrap();
    let odd_stem = format!("{stem}-\u{1}");
    let odd = |suffix: &str| {
        let mut bytes = odd_stem.as_bytes().to_vec();
        bytes.push(0xff);
        bytes.extend_from_slice(suffix.as_bytes());
        f.target.join(std::ffi::OsStr::from_bytes(&bytes))
    };
    fs::copy(f.target.join(name), odd(".tar.zst.age")).unwrap();
    fs::copy(f.target.join(format!("{stem}.json")), odd(".json")).unwrap();
    f.backup();
    f.expect(&["prune"], 0);
    assert!(odd(".tar.zst.age").exists() && odd(".json").exists(), "not ours to delete");
}

#[test]
fn item17b_init_with_a_relative_config_path_works() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_datavault"))
        .args(["--config", "rel.toml", "init", "--keygen"])
        .current_dir(dir.path())
        .env_remove("DATAVAULT_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.path().join("rel.toml").exists());
}

#[test]
fn item17c_terminal_escapes_in_manifests_never_reach_the_terminal() {
    let f = Fixture::new();
    let b = f.expect(&["--json", "backup", "--comment", "\u{1b}]0;pwned\u{7}\u{1b}[31mred"], 0);
    let b: serde_json::Value = serde_json::from_str(&b.stdout).unwrap();
    // A manifest edited on the drive, and a file whose very name is an escape sequence.
    let name = b["manifest"]["archive"].as_str().unwrap();
    let mp = f.target.join(name.replace(".tar.zst.age", ".json"));
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&mp).unwrap()).unwrap();
    m["trigger"] = "\u{1b}[2J\u{1b}]0;owned\u{7}".into();
    m["user"] = "\u{1b}[31mroot".into();
    fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
    fs::write(f.target.join("backup-\u{1b}[2Jx.json"), "{\"format\": \"\u{1b}[5m\"}").unwrap();
    for args in [&["list"][..], &["audit"], &["status"], &["verify", "--all"]] {
        let r = f.run(args);
        for (what, text) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
            assert!(!text.contains('\u{1b}') && !text.contains('\u{7}'), "{args:?} {what}: {text:?}");
        }
    }
}

#[test]
fn item17d_marker_messages_have_no_runs_of_spaces() {
    let f = Fixture::new();
    f.set("target.marker_id", "abc123");
    let r = f.expect(&["backup"], 3);
    assert!(r.stderr.contains("marker") && !r.stderr.contains("  "), "{}", r.stderr);
    fs::write(f.target.join(".datavault-target"), "id = \"zzz\"\n").unwrap();
    let r = f.expect(&["backup"], 3);
    assert!(r.stderr.contains("marker") && !r.stderr.contains("  "), "{}", r.stderr);
}

#[test]
fn item17e_status_shows_an_interrupted_restore() {
    let f = Fixture::new();
    f.backup();
    let journal = serde_json::json!({"archive": "backup-x.tar.zst.age", "phase": "swapping", "moves": [], "stages": [], "asides": []});
    fs::write(f.state.join("restore-journal.json"), journal.to_string()).unwrap();
    let r = f.run(&["status"]);
    assert!(r.stdout.contains("interrupted restore"), "{}", r.stdout);
}

#[test]
fn item17_state_files_keep_their_owner_and_mode() {
    let f = Fixture::new();
    f.backup();
    let m = fs::metadata(&f.state).unwrap();
    assert_eq!(m.mode() & 0o077, 0, "state folder is private");
    assert_eq!(m.uid(), rustix::process::geteuid().as_raw());
}

// ---- the red team's findings on the #11 build (each names its number) ------------------------

#[test]
fn rt04_a_symlinked_drill_scratch_on_the_drive_is_refused_and_nothing_there_deleted() {
    let f = Fixture::new();
    f.backup();
    let sd = f.path().join("sd-card-projects");
    fs::create_dir_all(sd.join("run-2024")).unwrap();
    fs::write(sd.join("run-2024/notes"), b"not datavault's").unwrap();
    std::os::unix::fs::symlink(&sd, f.target.join(".datavault-drill")).unwrap();
    let r = f.expect(&["drill"], 3);
    assert!(r.stderr.contains("link"), "{}", r.stderr);
    assert_eq!(fs::read(sd.join("run-2024/notes")).unwrap(), b"not datavault's");
    assert_eq!(fs::read_dir(&sd).unwrap().count(), 1, "nothing extracted onto the SD card");
}

#[test]
fn rt05_an_archive_whose_manifest_was_deleted_is_kept_not_cleaned() {
    let f = Fixture::new();
    let b = f.backup();
    let name = b["manifest"]["archive"].as_str().unwrap().to_string();
    fs::remove_file(f.target.join(name.replace(".tar.zst.age", ".json"))).unwrap();
    f.backup();
    f.expect(&["prune"], 0);
    assert!(f.target.join(&name).exists(), "a whole archive is never deleted for lack of a manifest");
    let r = f.expect(&["list"], 0);
    assert!(r.stdout.contains("no manifest"), "{}", r.stdout);
}

#[test]
fn rt06_an_archive_dated_in_the_future_is_never_taken_as_the_newest() {
    let f = Fixture::new();
    let old = f.backup()["manifest"]["archive"].as_str().unwrap().to_string();
    // A backup made while the clock ran years ahead: rename it as such, with its manifest.
    let b = f.backup();
    let name = b["manifest"]["archive"].as_str().unwrap().to_string();
    let stem = name.strip_suffix(".tar.zst.age").unwrap();
    let future = "backup-20310101T000000.000Z";
    let mut m: serde_json::Value =
        serde_json::from_slice(&fs::read(f.target.join(format!("{stem}.json"))).unwrap()).unwrap();
    m["archive"] = format!("{future}.tar.zst.age").into();
    m["created"] = "2031-01-01T00:00:00Z".into();
    fs::rename(f.target.join(&name), f.target.join(format!("{future}.tar.zst.age"))).unwrap();
    fs::remove_file(f.target.join(format!("{stem}.json"))).unwrap();
    fs::write(f.target.join(format!("{future}.json")), serde_json::to_vec(&m).unwrap()).unwrap();
    let r = f.expect(&["--json", "restore", "--yes"], 0);
    let o: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(o["archive"], old.as_str(), "the newest real backup, not the one from 2031");
    assert!(r.stderr.contains("in the future"), "{}", r.stderr);
    let r = f.expect(&["status"], 0);
    assert!(r.stdout.contains("in the future"), "{}", r.stdout);
}

#[test]
fn rt07_a_drill_check_that_writes_changes_nothing_and_fails() {
    let f = Fixture::new();
    f.backup();
    f.set("drill.checks", vec!["DELETE FROM users WHERE id > 10 RETURNING 1"]);
    let live = f.fingerprint();
    let r = f.expect(&["restore", "--yes"], 4);
    assert!(r.stderr.contains("readonly") || r.stderr.contains("read-only"), "{}", r.stderr);
    assert_eq!(f.fingerprint(), live);
    f.expect(&["drill"], 4);
}

#[test]
fn rt08_a_restore_while_the_app_still_has_its_database_open_is_refused() {
    let f = Fixture::new();
    f.backup();
    // The app runs (this process holds the database) and there is no [service] to stop it.
    f.unset("service");
    let app = Connection::open(&f.app.database).unwrap();
    app.execute("UPDATE users SET name = 'live' WHERE id = 1", []).unwrap();
    let live = f.fingerprint();
    let r = f.expect(&["restore", "--yes"], 1);
    assert!(r.stderr.contains("is open by") && r.stderr.contains("[service]"), "{}", r.stderr);
    assert_eq!(f.fingerprint(), live, "nothing changed");
    drop(app);
    f.expect(&["restore", "--yes"], 0);
}

#[test]
fn rt10_restore_to_makes_its_folder_private_and_refuses_a_foreign_one() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    f.backup();
    let to = f.path().join("restored");
    f.expect(&["restore", "--to", to.to_str().unwrap()], 0);
    assert_eq!(fs::metadata(&to).unwrap().permissions().mode() & 0o777, 0o700);
    let shared = f.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let r = f.expect(&["restore", "--to", shared.to_str().unwrap()], 2);
    assert!(r.stderr.contains("others may write"), "{}", r.stderr);
    // A link to an empty folder is not followed, and is called what it is.
    let empty = f.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let link = f.path().join("link");
    std::os::unix::fs::symlink(&empty, &link).unwrap();
    let r = f.expect(&["restore", "--to", link.to_str().unwrap()], 2);
    assert!(
        r.stderr.contains("is a symbolic link (to ") && r.stderr.contains("give the folder itself"),
        "{}",
        r.stderr
    );
    assert_eq!(fs::read_dir(&empty).unwrap().count(), 0);
}

#[test]
fn rt11_a_sparse_upload_does_not_stop_the_backup() {
    if !is_root() || emulated() {
        return skip("needs root and a real kernel to mount a tmpfs");
    }
    let f = Fixture::new();
    let usb = Tmpfs::mount(&f.target, "16m");
    // 256 MiB of holes: sixteen times what the drive holds, and nothing on disk; an app user
    // could otherwise turn every backup off this way.
    let big = fs::File::create(f.app.uploads.join("sparse.img")).unwrap();
    big.set_len(256 << 20).unwrap();
    drop(big);
    f.expect(&["backup"], 0);
    drop(usb);
}

#[test]
fn rt13_a_full_state_disk_does_not_stop_the_backup_to_the_drive() {
    if !is_root() || emulated() {
        return skip("needs root and a real kernel to mount a tmpfs");
    }
    let f = Fixture::new();
    fs::create_dir_all(&f.state).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs"])
        .arg(&f.state)
        .status()
        .unwrap();
    assert!(st.success());
    let mnt = Tmpfs { path: f.state.clone() };
    // Fill it to the last byte.
    let mut filler = fs::File::create(f.state.join("filler")).unwrap();
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut filler, &chunk).is_ok() {}
    drop(filler);
    let r = f.run(&["backup"]);
    drop(mnt);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("not recorded"), "{}", r.stderr);
    assert_eq!(f.archive_files().len(), 1);
}

#[test]
fn rt17_a_drill_without_room_for_its_scratch_is_no_failed_drill() {
    if !is_root() || emulated() {
        return skip("needs root and a real kernel to mount a tmpfs");
    }
    let f = Fixture::new();
    // A drill deletes each upload once written, so what must fit is the database and one
    // upload at a time: this one cannot.
    fs::write(f.app.uploads.join("big-scan.pdf"), vec![b'%'; 2 << 20]).unwrap();
    f.backup();
    let small = Tmpfs::mount(&f.path().join("small"), "512k");
    f.set("drill.scratch_dir", small.path.to_str().unwrap());
    let r = f.expect(&["drill"], 3);
    assert!(r.stderr.contains("drill.scratch_dir") && r.stderr.contains("big-scan.pdf"), "{}", r.stderr);
    let audit = f.expect(&["audit"], 0);
    assert!(!audit.stdout.contains("DRILL_FAILED"), "{}", audit.stdout);
    assert_eq!(fs::read_dir(&small.path).unwrap().count(), 0, "the scratch folder is cleaned up");
}

#[test]
fn rt17_a_drill_needs_room_for_the_database_and_the_uploads_in_flight_not_the_whole_backup() {
    if !is_root() || emulated() {
        return skip("needs root and a real kernel to mount a tmpfs");
    }
    let f = Fixture::new();
    for i in 0..12u8 {
        fs::write(f.app.uploads.join(format!("photo-{i:02}.jpg")), vec![b'a' + i; 1 << 20]).unwrap();
    }
    f.backup();
    // 8 MiB, of which a quarter is kept for the system: 6 MiB for a backup of over 12 MiB.
    let small = Tmpfs::mount(&f.path().join("small"), "8m");
    f.set("drill.scratch_dir", small.path.to_str().unwrap());
    let r = f.expect(&["drill"], 0);
    assert!(r.stdout.contains("DRILL PASSED"), "{}", r.stdout);
    assert!(r.stdout.contains("57 files"), "every file was written and checked: {}", r.stdout);
    assert_eq!(fs::read_dir(&small.path).unwrap().count(), 0, "the scratch folder is cleaned up");
}

// ---- the red team's findings of 2026-12-07 (black box: the binary and the README) ---------------

/// The newest PRE-RESTORE safety copy's name, in either format.
fn newest_safety_copy(f: &Fixture) -> String {
    let list: serde_json::Value = serde_json::from_str(&f.expect(&["list", "--json"], 0).stdout).unwrap();
    let mut names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["name"].as_str())
        .filter(|n| n.starts_with("pre-restore-"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.pop().expect("a pre-restore safety copy")
}

#[test]
fn rt2026_a_fifo_at_the_database_path_never_hangs_an_in_place_restore() {
    // Opening a FIFO to read waits for a writer forever: with the app already stopped, the
    // restore hung there and held the run lock, so every later timer run failed too.
    for format in ["snapshots", "archives"] {
        let f = Fixture::new();
        f.set("store.format", format);
        f.backup();
        for suffix in ["", "-wal", "-shm"] {
            let _ = fs::remove_file(format!("{}{suffix}", f.app.database.display()));
        }
        mkfifo(&f.app.database);
        let r = f.run_within(LIMIT, &["restore", "--yes"]);
        assert_eq!(r.code, 0, "{format}: {}", r.stderr);
        assert!(fs::symlink_metadata(&f.app.database).unwrap().is_file(), "{format}: the database is back");
        assert_eq!(integrity(&f.app.database), "ok", "{format}");
        let log = fs::read_to_string(f.path().join("service.log")).unwrap();
        assert!(log.ends_with("started\n"), "{format}: the app was started again: {log}");
    }
}

#[test]
fn rt2026_a_deleted_database_s_wal_is_kept_in_the_safety_copy() {
    // The disaster a restore is for: app.db deleted by hand, its -wal (the commits since the
    // last checkpoint) still beside it. The restore moves the -wal away; it must be in the
    // safety copy, byte for byte, or those commits are gone.
    for format in ["snapshots", "archives"] {
        let f = Fixture::new();
        f.set("store.format", format);
        f.backup();
        let wal_path = PathBuf::from(format!("{}-wal", f.app.database.display()));
        let wal = {
            let c = Connection::open(&f.app.database).unwrap();
            let _: String = c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).unwrap();
            c.execute_batch("PRAGMA wal_autocheckpoint=0").unwrap();
            for i in 0..30 {
                c.execute("INSERT INTO users(name) VALUES (?1)", [format!("after the backup {i}")]).unwrap();
            }
            // The WAL as a crashed app leaves it (closing would checkpoint it into app.db).
            fs::read(&wal_path).unwrap()
        };
        assert!(wal.len() > 32, "{format}: the WAL holds the new commits");
        fs::remove_file(&f.app.database).unwrap();
        fs::write(&wal_path, &wal).unwrap();

        let r = f.expect(&["restore", "--yes"], 0);
        assert!(r.stderr.contains("-wal"), "{format}: the operator is told: {}", r.stderr);
        let out = f.path().join("safety");
        f.expect(&["restore", &newest_safety_copy(&f), "--to", out.to_str().unwrap()], 0);
        assert_eq!(fs::read(out.join("raw/app.db-wal")).unwrap(), wal, "{format}: the WAL, byte for byte");

        // And it is worth keeping: beside the restored database, it brings the 30 commits back.
        let proof = f.path().join("proof.db");
        fs::copy(&f.app.database, &proof).unwrap();
        fs::write(f.path().join("proof.db-wal"), &wal).unwrap();
        let n: i64 = Connection::open(&proof)
            .unwrap()
            .query_row("SELECT count(*) FROM users WHERE name LIKE 'after the backup %'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 30, "{format}");
    }
}
