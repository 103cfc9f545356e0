//! Faults: kill -9 at random moments (backup, prune, in-place restore) under a concurrent
//! writer, the target vanishing mid-run, source trouble, the clock, concurrent triggers.
//!
//! Every randomised test uses a fixed seed (override: `DATAVAULT_FAULT_SEED`) and prints its
//! trial counts; `DATAVAULT_FAULT_TRIALS=N` runs N trials per kill test. What each fault must
//! lead to is written down in docs/faults.md.

mod fault_util;
mod util;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fault_util::{complete_archives, leftovers, list, trials, Rng};
use rusqlite::Connection;
use util::{emulated, is_root, skip, Fixture, Run, Tmpfs};

// ---- a concurrent writer ----------------------------------------------------------------------

/// The application, committing small transactions all the time. It holds `gate` while it has
/// the database open, so a test can take the gate to "stop the app" (an in-place restore
/// swaps the database file; a real app is stopped by the stop command then).
struct Writer {
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    gate: Arc<Mutex<()>>,
    handle: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Writer {
    fn start(db: &Path) -> Writer {
        Connection::open(db)
            .unwrap()
            .execute_batch("CREATE TABLE IF NOT EXISTS ledger(id INTEGER PRIMARY KEY, v INTEGER, pad BLOB)")
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(Mutex::new(()));
        let handle = {
            let (db, stop, commits, gate) = (db.to_path_buf(), stop.clone(), commits.clone(), gate.clone());
            std::thread::spawn(move || -> Result<(), String> {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(_held) = gate.lock() else { return Ok(()) };
                    let c = Connection::open(&db).map_err(|e| e.to_string())?;
                    c.busy_timeout(Duration::from_secs(10)).unwrap();
                    for _ in 0..20 {
                        let n = commits.load(Ordering::Relaxed);
                        c.execute_batch(&format!(
                            "BEGIN IMMEDIATE; INSERT INTO ledger(v, pad) VALUES ({n}, zeroblob(200)); COMMIT;"
                        ))
                        .map_err(|e| format!("writer commit {n} failed: {e}"))?;
                        commits.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                Ok(())
            })
        };
        Writer { stop, commits, gate, handle: Some(handle) }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap().expect("the writer never fails");
        self.commits.load(Ordering::Relaxed)
    }
}

// ---- helpers ----------------------------------------------------------------------------------

const BACKUP_RETENTION: &str =
    "[retention]\nkeep_last = 6\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nkeep_pre_restore = 2\n";

fn fixture() -> Fixture {
    Fixture::with(|c| c.push_str(BACKUP_RETENTION))
}

/// What the kill tests write: the archives of the test fixture, or the deduplicated snapshot
/// store of the config template (#9).
#[derive(Clone, Copy, Debug)]
enum Format {
    Archives,
    Snapshots,
}

impl Format {
    fn fixture(self) -> Fixture {
        match self {
            Format::Archives => fixture(),
            Format::Snapshots => Fixture::with(|c| {
                c.push_str(BACKUP_RETENTION);
                c.push_str("[store]\nformat = \"snapshots\"\n");
            }),
        }
    }

    /// Trials for a kill test, by default `archives` or `snapshots` (issue #9 asks at least
    /// 100 kills of snapshot backups and prunes under a writer; the cut points inside the
    /// store are also swept step by step in tests/dedup_faults.rs).
    fn trials(self, archives: usize, snapshots: usize) -> usize {
        match self {
            Format::Archives => trials(archives),
            Format::Snapshots => trials(snapshots),
        }
    }
}

/// A second config for the same setup with a tighter policy, so prune has work to do.
fn prune_config(f: &Fixture, keep_last: u32) -> PathBuf {
    let mut t: toml::Table = fs::read_to_string(&f.config).unwrap().parse().unwrap();
    t["retention"]["keep_last"] = toml::Value::Integer(keep_last.into());
    let p = f.path().join("prune.toml");
    fs::write(&p, toml::to_string(&t).unwrap()).unwrap();
    p
}

fn spawn(f: &Fixture, config: &Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_datavault"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("DATAVAULT_CONFIG")
        // Killed -9 at random moments: its own libfaketime semaphore (see util::command).
        .env_remove("FAKETIME_SHARED")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir(f.path())
        .spawn()
        .unwrap()
}

/// Run to completion, return how long it took.
/// How long an uninterrupted run takes: the median of three, so that one slow outlier (a
/// busy CI machine) does not stretch the kill window past the run and make most kills land
/// after it has finished.
fn timed(f: &Fixture, config: &Path, args: &[&str]) -> Duration {
    let mut runs: Vec<Duration> = (0..3)
        .map(|_| {
            let t = Instant::now();
            let st = spawn(f, config, args).wait().unwrap();
            assert!(st.success(), "datavault {args:?} failed while timing it: {st}");
            t.elapsed()
        })
        .collect();
    runs.sort();
    runs[1]
}

/// Kill -9 after a random delay in 0..=`span`. True if it was still running when killed.
fn kill_after(rng: &mut Rng, child: std::process::Child, span: Duration) -> bool {
    kill_between(rng, child, Duration::ZERO, span)
}

fn kill_between(rng: &mut Rng, mut child: std::process::Child, lo: Duration, hi: Duration) -> bool {
    let delay = lo + Duration::from_micros(rng.below((hi - lo).as_micros() as u64 + 1));
    std::thread::sleep(delay);
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    running
}

struct Invariants {
    known: BTreeMap<String, String>,
    drills: usize,
}

impl Invariants {
    fn new() -> Invariants {
        Invariants { known: BTreeMap::new(), drills: 0 }
    }

    /// After a kill: every complete archive verifies, every archive seen complete before is
    /// byte-identical (or gone, when `may_delete`), the newest complete backup is still there.
    #[track_caller]
    fn check(&mut self, f: &Fixture, what: &str, may_delete: bool, drill: bool) {
        let rows = list(&f.expect(&["--json", "list"], 0).stdout);
        let now = complete_archives(&f.target, &rows);
        for (name, sha) in &self.known {
            match now.get(name) {
                Some(s) => assert_eq!(s, sha, "{what}: {name} changed on disk"),
                None => assert!(may_delete, "{what}: {name} disappeared or became incomplete"),
            }
        }
        let newest_before = self.known.keys().filter(|n| n.starts_with("backup-")).max().cloned();
        if let Some(n) = newest_before {
            assert!(now.contains_key(&n), "{what}: the newest good backup {n} was deleted");
        }
        if !now.is_empty() {
            let r = f.run(&["--json", "verify", "--all"]);
            let results: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
            for res in results.as_array().unwrap() {
                let name = res["archive"].as_str().unwrap();
                if now.contains_key(name) {
                    assert_eq!(res["ok"], true, "{what}: complete archive {name} fails verify: {res}");
                }
            }
        }
        if drill {
            if let Some(name) = now.keys().filter(|n| n.starts_with("backup-")).max() {
                f.expect(&["drill", name], 0);
                self.drills += 1;
            }
        }
        self.known = now;
    }
}

/// The next locked run repairs everything: no partial, orphan, staging or aside folder, no
/// restore journal.
#[track_caller]
fn recovered_by_next_run(f: &Fixture, args: &[&str]) -> Run {
    let r = f.expect(args, 0);
    assert_eq!(leftovers(&f.target), Vec::<String>::new(), "target after recovery");
    for dir in [f.app.database.parent().unwrap(), f.app.uploads.parent().unwrap()] {
        assert_eq!(leftovers(dir), Vec::<String>::new(), "{} after recovery", dir.display());
    }
    assert!(!f.state.join("restore-journal.json").exists(), "restore journal left");
    r
}

// ---- 1. kill at any point ---------------------------------------------------------------------

#[test]
fn a_backup_killed_at_any_moment_never_leaves_a_bad_complete_archive() {
    kill_backups(Format::Archives);
}

#[test]
fn a_snapshot_backup_killed_at_any_moment_never_leaves_a_bad_complete_snapshot() {
    kill_backups(Format::Snapshots);
}

fn kill_backups(format: Format) {
    let n = format.trials(120, 100);
    let mut rng = Rng::new("kill backup", 0x0b5e_55ed_0001);
    let f = format.fixture();
    let writer = Writer::start(&f.app.database);
    let span = timed(&f, &f.config, &["backup"]).mul_f64(1.3);
    let mut inv = Invariants::new();
    inv.check(&f, "start", false, false);
    let (mut killed, started) = (0, Instant::now());
    for i in 0..n {
        let child = spawn(&f, &f.config, &["backup"]);
        killed += kill_after(&mut rng, child, span) as usize;
        // A backup may prune (keep_last = 6): deletions are allowed, changes are not.
        inv.check(&f, &format!("backup trial {i}"), true, i % 25 == 24);
        if i % 4 == 3 {
            recovered_by_next_run(&f, &["prune"]);
            inv.check(&f, &format!("after recovery {i}"), true, false);
        }
    }
    recovered_by_next_run(&f, &["backup"]);
    inv.check(&f, "end", true, true);
    let commits = writer.finish();
    eprintln!(
        "kill backup ({format:?}): {n} trials, {killed} killed mid-run, {} drills, {commits} writer commits, {:.1} s",
        inv.drills,
        started.elapsed().as_secs_f64()
    );
    // Timing varies run to run; a quarter of the kills landing mid-run is already dozens of
    // cuts at random points (typically 40-60 %), and fewer would mean the test tests little.
    assert!(killed * 4 >= n, "too few kills landed mid-run ({killed}/{n}): the delay span is off");
}

#[test]
fn a_prune_killed_at_any_moment_deletes_only_what_the_policy_says() {
    kill_prunes(Format::Archives);
}

#[test]
fn a_snapshot_prune_killed_at_any_moment_deletes_only_what_the_policy_says() {
    kill_prunes(Format::Snapshots);
}

fn kill_prunes(format: Format) {
    let n = format.trials(60, 100);
    let mut rng = Rng::new("kill prune", 0x0b5e_55ed_0002);
    let f = format.fixture();
    let writer = Writer::start(&f.app.database);
    let tight = prune_config(&f, 2);
    for _ in 0..4 {
        f.backup();
    }
    let span = timed(&f, &tight, &["prune"]).mul_f64(1.3);
    let mut inv = Invariants::new();
    inv.check(&f, "start", false, false);
    let (mut killed, started) = (0, Instant::now());
    for i in 0..n {
        // Something to prune: at least 4 complete backups.
        while inv.known.keys().filter(|k| k.starts_with("backup-")).count() < 4 {
            f.backup();
            inv.check(&f, "top up", true, false);
        }
        let before = inv.known.keys().filter(|k| k.starts_with("backup-")).count();
        let child = spawn(&f, &tight, &["prune"]);
        killed += kill_after(&mut rng, child, span) as usize;
        inv.check(&f, &format!("prune trial {i}"), true, i % 25 == 24);
        let after = inv.known.keys().filter(|k| k.starts_with("backup-")).count();
        assert!(after >= before.min(2), "prune trial {i}: {after} backups left of {before}, policy keeps 2");
        // The newest two are the ones kept.
        if i % 3 == 2 {
            recovered_by_next_run(&f, &["backup"]);
            inv.check(&f, "after recovery", true, false);
        }
    }
    recovered_by_next_run(&f, &["prune"]);
    inv.check(&f, "end", true, true);
    let commits = writer.finish();
    eprintln!(
        "kill prune ({format:?}): {n} trials, {killed} killed mid-run, {} drills, {commits} writer commits, {:.1} s",
        inv.drills,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn an_in_place_restore_killed_at_any_moment_leaves_exactly_the_old_or_the_new_state() {
    kill_restores(Format::Archives);
}

#[test]
fn an_in_place_restore_of_a_snapshot_killed_at_any_moment_leaves_exactly_the_old_or_the_new_state() {
    kill_restores(Format::Snapshots);
}

fn kill_restores(format: Format) {
    let n = format.trials(80, 40);
    let mut rng = Rng::new("kill restore", 0x0b5e_55ed_0003);
    let f = format.fixture();
    let writer = Writer::start(&f.app.database);
    let mut inv = Invariants::new();
    let (mut killed, mut old, mut new, mut journaled, started) = (0, 0, 0, 0, Instant::now());
    let mut span = None;
    for i in 0..n {
        // The writer commits between trials; during a restore the app is stopped (here: the
        // writer closes the database and waits), as the stop command would do.
        let gate = writer.gate.clone();
        let _stopped = gate.lock().unwrap();
        let b = f.backup();
        let name = b["manifest"]["archive"].as_str().unwrap().to_string();
        let new_fp = f.fingerprint();
        // Make the live state differ from the archive in rows and files.
        Connection::open(&f.app.database)
            .unwrap()
            .execute("UPDATE users SET name = ?1 WHERE id = 7", [format!("trial {i}")])
            .unwrap();
        fs::write(f.app.uploads.join(format!("after-backup-{i}.txt")), b"new file").unwrap();
        let old_fp = f.fingerprint();
        inv.check(&f, &format!("restore trial {i} before"), true, false);

        match span {
            // The first restore runs to the end: its duration is the span kills land in.
            None => span = Some(timed(&f, &f.config, &["restore", &name, "--yes"]).mul_f64(1.1)),
            Some(span) => {
                let child = spawn(&f, &f.config, &["restore", &name, "--yes"]);
                // Half the kills aim at the end, where the stop, swap and start happen.
                let lo = if rng.below(2) == 0 { Duration::ZERO } else { span.mul_f64(0.75) };
                killed += kill_between(&mut rng, child, lo, span) as usize;
            }
        }
        inv.check(&f, &format!("restore trial {i}"), false, false);
        if f.state.join("restore-journal.json").exists() {
            journaled += 1;
        } else {
            // No journal: the swap has not begun or is over.
            let fp = f.fingerprint();
            assert!(fp == old_fp || fp == new_fp, "restore trial {i}: a mix of states before recovery");
        }
        recovered_by_next_run(&f, &["backup"]);
        let fp = f.fingerprint();
        if fp == old_fp {
            old += 1;
        } else {
            assert_eq!(fp, new_fp, "restore trial {i}: neither the old nor the restored state");
            new += 1;
        }
        // The app was started again whenever it was stopped.
        let log = fs::read_to_string(f.path().join("service.log")).unwrap_or_default();
        // (A start may run twice: killed after its start command, the next run starts again.)
        assert!(
            log.is_empty() || log.ends_with("started\n"),
            "restore trial {i}: the app was left stopped: {log}"
        );
        inv.check(&f, &format!("restore trial {i} after recovery"), true, i % 10 == 9);
    }
    let commits = writer.finish();
    eprintln!(
        "kill restore ({format:?}): {n} trials, {killed} killed mid-run, {journaled} left a journal; after recovery {old} old state, {new} restored state; {} drills, {commits} writer commits, {:.1} s",
        inv.drills,
        started.elapsed().as_secs_f64()
    );
}

// ---- 2. the target vanishes -------------------------------------------------------------------

#[test]
fn a_target_unmounted_mid_run_exits_3_and_nothing_lands_on_the_folder_underneath() {
    target_unmounted_mid_run(Format::Archives);
}

#[test]
fn a_snapshot_whose_drive_is_unmounted_mid_run_exits_3_and_nothing_lands_underneath() {
    // Snapshots make each pack durable on the indexer's thread: the drive found gone there
    // must still be the error the operator reads, with its exit code.
    target_unmounted_mid_run(Format::Snapshots);
}

fn target_unmounted_mid_run(format: Format) {
    if !is_root() || emulated() {
        return skip("needs root and a real kernel for mounts (ran natively in CI)");
    }
    let f = format.fixture();
    f.set("target.require_mountpoint", true);
    let _m = Tmpfs::mount(&f.target, "64m");
    f.backup();
    let (c, child) = f.pause_backup_mid_run();
    let st = Command::new("umount").arg("-l").arg(&f.target).status().unwrap();
    assert!(st.success());
    c.execute_batch("COMMIT").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{format:?}: {stderr}");
    assert!(stderr.contains("unmounted"), "{format:?}: {stderr}");
    assert_eq!(f.files_below_target(), Vec::<String>::new(), "{format:?}: written to the SD card underneath");
}

// ---- 3. source trouble ------------------------------------------------------------------------

fn restore_to(f: &Fixture, name: &str) -> PathBuf {
    let to = f.path().join(format!("out-{}", name.len() + fs::read_dir(f.path()).unwrap().count()));
    f.expect(&["restore", name, "--to", to.to_str().unwrap()], 0);
    to
}

fn manifest_of(b: &serde_json::Value) -> &serde_json::Value {
    &b["manifest"]
}

#[test]
fn a_long_write_transaction_in_wal_mode_does_not_block_and_is_not_in_the_archive() {
    let f = Fixture::new();
    let c = Connection::open(&f.app.database).unwrap();
    c.execute_batch("BEGIN IMMEDIATE; INSERT INTO users(id, name) VALUES (1000, 'uncommitted');").unwrap();
    let b = f.backup();
    c.execute_batch("COMMIT").unwrap();
    let to = restore_to(&f, manifest_of(&b)["archive"].as_str().unwrap());
    let r = Connection::open(to.join("db/app.db")).unwrap();
    let n: i64 = r.query_row("SELECT count(*) FROM users", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 300, "the archive holds the last committed state");
}

#[test]
fn a_rollback_journal_database_is_backed_up_with_a_warning() {
    let f = Fixture::new();
    Connection::open(&f.app.database).unwrap().execute_batch("PRAGMA journal_mode=DELETE").unwrap();
    let r = f.expect(&["--json", "backup"], 0);
    assert!(r.stderr.contains("not wal") && r.stderr.contains("journal_mode=WAL"), "{}", r.stderr);
    let b: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(b["manifest"]["database"]["journal_mode"], "delete");
    f.expect(&["drill"], 0);
}

#[test]
fn a_missing_or_corrupt_database_exits_5_and_writes_nothing() {
    let f = Fixture::new();
    let db = f.app.database.clone();
    let good = fs::read(&db).unwrap();
    let mut bad = good.clone();
    bad[..16].copy_from_slice(b"not a database!\0");
    fs::write(&db, &bad).unwrap();
    let r = f.expect(&["backup"], 5);
    assert!(r.stderr.contains(&db.display().to_string()), "names the database: {}", r.stderr);
    assert!(f.all_target_files().is_empty());
    // Zeroed pages in the middle (the header is fine): also refused, or consistent.
    let mut holes = good.clone();
    let page = 4096;
    for b in &mut holes[page..page * 3] {
        *b = 0xff;
    }
    fs::write(&db, &holes).unwrap();
    let r = f.run(&["backup"]);
    assert!(r.code == 5 || r.code == 0, "exit {}: {}", r.code, r.stderr);
    if r.code == 0 {
        // Archived as read: the drill's integrity_check must then say so.
        let d = f.run(&["drill"]);
        assert_eq!(d.code, 4, "a damaged database backed up silently: {}", d.stdout);
    }
    fs::remove_file(&db).unwrap();
    let r = f.expect(&["backup"], 5);
    assert!(r.stderr.contains("database not found"), "{}", r.stderr);
}

#[test]
fn an_unreadable_upload_is_skipped_listed_and_exits_5_after_the_archive_is_written() {
    if !is_root() {
        return skip("needs root to run datavault as nobody (as root every file is readable)");
    }
    let f = Fixture::new();
    let nobody = |p: &Path| {
        assert!(Command::new("chown").args(["-R", "nobody:nogroup"]).arg(p).status().unwrap().success())
    };
    fs::create_dir_all(&f.state).unwrap();
    nobody(f.path());
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(f.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let secret = f.app.uploads.join("candidates/2026/11/cv-005.txt");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_datavault"))
        .arg("--config")
        .arg(&f.config)
        .args(["--json", "backup"])
        .env("USER", "nobody")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("cv-005.txt") && stderr.contains("NOT in"), "{stderr}");
    let rows = list(&f.expect(&["--json", "list"], 0).stdout);
    assert_eq!(rows.len(), 1, "the archive was written");
    let name = rows[0]["name"].as_str().unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(f.target.join(name.replace(".tar.zst.age", ".json"))).unwrap())
            .unwrap();
    let skipped = m["skipped"].to_string();
    assert!(skipped.contains("cv-005.txt") && skipped.contains("unreadable"), "{skipped}");
    // (The identity now belongs to nobody: as root, only the shallow check.)
    f.expect(&["verify"], 0);
}

#[test]
fn files_that_change_or_vanish_during_the_walk_are_listed_in_the_manifest() {
    change_during_the_walk(Fixture::new());
}

/// Snapshots reuse unchanged files from the file cache and read the others: the same
/// outcomes, in the walk's order, with the cache in play from the second backup on.
#[test]
fn files_that_change_or_vanish_during_a_snapshot_are_listed_in_its_manifest() {
    change_during_the_walk(Fixture::with(|c| c.push_str("[store]\nformat = \"snapshots\"\n")));
}

fn change_during_the_walk(f: Fixture) {
    let hot = f.app.uploads.join("hot");
    fs::create_dir_all(&hot).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // A churner: a big file growing and shrinking, small files appearing and vanishing.
    let churn = {
        let (hot, stop) = (hot.clone(), stop.clone());
        std::thread::spawn(move || {
            let big = vec![0x42u8; 4 << 20];
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let grow = i & 1 == 0;
                let len = if grow { big.len() } else { big.len() / 3 };
                let _ = fs::write(hot.join("growing.bin"), &big[..len]);
                for k in 0..20 {
                    let p = hot.join(format!("blink-{k:02}"));
                    if grow {
                        let _ = fs::write(&p, b"now you see me");
                    } else {
                        let _ = fs::remove_file(&p);
                    }
                }
            }
        })
    };
    let (mut changed, mut skipped, mut runs) = (0, 0, 0);
    while runs < 30 && (changed == 0 || skipped == 0) {
        runs += 1;
        let b = f.backup();
        let m = manifest_of(&b);
        changed += m["changed_during_backup"].as_array().unwrap().len();
        skipped += m["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["reason"].as_str().unwrap().contains("vanished"))
            .count();
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    eprintln!("churn: {runs} backups, {changed} changed entries, {skipped} vanished entries");
    assert!(changed > 0, "no backup in {runs} recorded a changed file");
    // Every archive is still whole and its inner manifest matches what was archived.
    f.expect(&["verify", "--all", "--deep"], 0);
    f.expect(&["drill"], 0);
}

/// A file rewritten in place while it is read (same size): what a backup stores may mix two
/// versions that never existed on disk. Red team, 2026-12-07: snapshots stored such a file
/// and listed nothing (archives did). A writer stamps a generation into the first 8 bytes,
/// then into the last 8, over and over: on disk the first is never behind the last, so a
/// restored copy whose first is behind was torn, and must be listed as changed.
#[test]
fn a_file_rewritten_in_place_while_read_is_listed_whenever_it_comes_back_torn() {
    for format in ["snapshots", "archives"] {
        let f = Fixture::new();
        f.set("store.format", format);
        let video = f.app.uploads.join("video.bin");
        const LEN: u64 = 8 << 20;
        fs::write(&video, vec![0u8; LEN as usize]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (video, stop) = (video.clone(), stop.clone());
            std::thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                let file = fs::OpenOptions::new().write(true).open(&video).unwrap();
                let mut g = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    g += 1;
                    file.write_all_at(&g.to_le_bytes(), 0).unwrap();
                    file.write_all_at(&g.to_le_bytes(), LEN - 8).unwrap();
                }
            })
        };
        let generation = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
        let (mut torn, mut listed, mut runs) = (0, 0, 0);
        while runs < 30 && torn == 0 {
            runs += 1;
            let b = f.backup();
            let name = b["manifest"]["archive"].as_str().unwrap().to_string();
            let is_listed = manifest_of(&b)["changed_during_backup"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p.as_str().unwrap().ends_with("video.bin"));
            listed += usize::from(is_listed);
            let out = f.path().join(format!("out-{runs}"));
            f.expect(&["restore", &name, "--to", out.to_str().unwrap()], 0);
            let back = fs::read(out.join("uploads/video.bin")).unwrap();
            let (first, last) = (generation(&back[..8]), generation(&back[back.len() - 8..]));
            if first < last {
                torn += 1;
                assert!(
                    is_listed,
                    "{format}: run {runs} stored video.bin torn ({first} < {last}) and listed nothing"
                );
            }
            fs::remove_dir_all(&out).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        eprintln!("{format}: {runs} backups, {torn} torn copies, {listed} listed as changed");
        assert!(listed > 0, "{format}: no backup in {runs} saw the file change while it was read");
    }
}

#[test]
fn symlink_loops_special_files_and_odd_names_have_defined_outcomes() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::symlink;
    let f = Fixture::new();
    let u = &f.app.uploads;
    symlink("loop-b", u.join("loop-a")).unwrap();
    symlink("loop-a", u.join("loop-b")).unwrap();
    symlink(".", u.join("self")).unwrap();
    symlink("/nonexistent/target", u.join("dangling")).unwrap();
    assert!(Command::new("mkfifo").arg(u.join("pipe")).status().unwrap().success());
    let _sock = std::os::unix::net::UnixListener::bind(u.join("sock")).unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"odd-\xff\xfe-\x01-new\nline.txt");
    fs::write(u.join(odd), b"odd name").unwrap();

    let r = f.expect(&["--json", "backup"], 0);
    let b: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let skipped = b["manifest"]["skipped"].to_string();
    for special in ["uploads/pipe", "uploads/sock"] {
        assert!(skipped.contains(special), "{special} not listed as skipped: {skipped}");
    }
    let to = restore_to(&f, b["manifest"]["archive"].as_str().unwrap());
    let ru = to.join("uploads");
    for (link, target) in
        [("loop-a", "loop-b"), ("loop-b", "loop-a"), ("self", "."), ("dangling", "/nonexistent/target")]
    {
        assert_eq!(fs::read_link(ru.join(link)).unwrap().to_str().unwrap(), target, "{link} kept as a link");
    }
    assert!(!ru.join("pipe").exists() && !ru.join("sock").exists());
    assert_eq!(fs::read(ru.join(odd)).unwrap(), b"odd name", "non-UTF-8 name round-trips");
    // The fingerprint covers every name: without the specials the trees are equal.
    fs::remove_file(u.join("pipe")).unwrap();
    fs::remove_file(u.join("sock")).unwrap();
    assert_eq!(datavault::demo::fingerprint(&to.join("db/app.db"), Some(&ru)).unwrap(), f.fingerprint());
}

// ---- 7. the clock -----------------------------------------------------------------------------

/// libfaketime (Debian package `faketime`) shifts the clock of the binary only.
fn faketime_lib() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

fn at(f: &Fixture, lib: &Path, offset: &str, args: &[&str]) -> Run {
    let out = f
        .command(args)
        .env("LD_PRELOAD", lib)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn a_clock_years_back_prunes_nothing_and_years_forward_prunes_only_by_the_policy() {
    let Some(lib) = faketime_lib() else {
        return skip("libfaketime is not installed (apt-get install faketime; scripts/ci-faults.sh does)");
    };
    if emulated() {
        return skip("LD_PRELOAD of the host's libfaketime does not apply under qemu");
    }
    // Archives on four different days, a week apart, made "in the past" of the real clock
    // (relative offsets: libfaketime's "-Nd" shifts from now), under a policy that keeps
    // them all. Whether each backup may prune depends on where "N days ago" falls against
    // the build's commit time, that is on the day the test runs (issue #11): with this
    // policy the answer does not matter.
    let f = Fixture::new();
    for (key, n) in [("keep_last", 10), ("keep_daily", 0), ("keep_weekly", 0), ("keep_monthly", 0)] {
        f.set(&format!("retention.{key}"), n);
    }
    for days in [28, 21, 14, 7] {
        let r = at(&f, &lib, &format!("-{days}d"), &["--json", "backup"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let made = f.archive_files();
    assert_eq!(made.len(), 4, "keep_last 10 keeps all four");
    f.set("retention.keep_last", 2);
    f.set("retention.keep_daily", 3);
    // Days between the first and the last archive, from their names: 21 if faketime reached
    // the binary (whatever the test's own clock says: CI runs the suite a year ahead too).
    let day = |p: &PathBuf| {
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        chrono::NaiveDate::parse_from_str(&n["backup-".len().."backup-".len() + 8], "%Y%m%d").unwrap()
    };
    assert_eq!((day(&made[3]) - day(&made[0])).num_days(), 21, "faketime did not reach the binary: {made:?}");
    let recent: Vec<_> = made.iter().map(day).collect();

    // Years back: a Pi without an RTC. Backed up, nothing pruned, a warning.
    let r = at(&f, &lib, "-3y", &["--json", "backup"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("clock"), "warning printed: {}", r.stderr);
    let b: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(b["prune_skipped"].as_str().unwrap().contains("clock"), "{b}");
    assert_eq!(f.archive_files().len(), 5, "nothing pruned");
    let r = at(&f, &lib, "-3y", &["prune"]);
    assert_ne!(r.code, 0, "prune refuses on a clock in the past");
    assert_eq!(f.archive_files().len(), 5);
    // The archive from "3 years ago" sorts oldest and confuses nothing: remove it by hand.
    let past: Vec<_> = f.archive_files().into_iter().filter(|p| !recent.contains(&day(p))).collect();
    assert_eq!(past.len(), 1, "{past:?}");
    fs::remove_file(&past[0]).unwrap();
    fs::remove_file(past[0].to_string_lossy().replace(".tar.zst.age", ".json")).unwrap();

    // Years forward: the policy applies as written. keep_last 2 keeps the newest two;
    // keep_daily 3 keeps the newest of each of the last three *days with archives*, which
    // covers the other two: nothing older than the policy allows survives, nothing it keeps
    // is lost.
    let r = at(&f, &lib, "+3y", &["--json", "prune", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = at(&f, &lib, "+3y", &["--json", "prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let o: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let kept: Vec<_> = o["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == true)
        .map(|d| d["name"].clone())
        .collect();
    eprintln!("clock +3y: kept {kept:?}, deleted {}", o["deleted"]);
    // With keep_daily 3 and archives on 4 distinct days, exactly the oldest goes.
    assert_eq!(o["deleted"].as_array().unwrap().len(), 1, "{o}");
    let oldest = made[0].file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(o["deleted"][0], oldest.as_str());
    f.expect(&["verify", "--all"], 0);
}

// ---- 8. concurrency ---------------------------------------------------------------------------

#[test]
fn two_backups_and_a_sigusr1_at_once_run_one_at_a_time() {
    use std::io::{BufRead, BufReader};
    let f = Fixture::with(|c| c.push_str("[retention]\nkeep_last = 1000\n"));
    let mut agent =
        f.command(&["agent"]).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("agent starts");
    // The agent's log, line by line, through a channel: waits time out instead of hanging.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = agent.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let wait_for = |needles: &[&str]| -> String {
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if needles.iter().any(|n| l.contains(n)) => return l,
                Ok(_) => {}
                Err(e) => panic!("the agent never logged any of {needles:?}: {e}"),
            }
        }
    };
    wait_for(&["agent started"]);
    let mut rng = Rng::new("concurrency", 0x0b5e_55ed_0008);
    let rounds = trials(10).min(50);
    let (mut ran, mut locked_out, mut agent_ran, mut agent_busy) = (0, 0, 0, 0);
    for _ in 0..rounds {
        let usr1 = || {
            assert!(Command::new("kill").args(["-USR1", &agent.id().to_string()]).status().unwrap().success())
        };
        // Who comes first varies: the agent's SIGUSR1 or the timer's backup.
        let agent_first = rng.below(2) == 0;
        if agent_first {
            usr1();
        }
        let a = f.command(&["backup", "--trigger", "timer"]).stderr(Stdio::piped()).spawn().unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        let b = f.command(&["backup", "--trigger", "button"]).stderr(Stdio::piped()).spawn().unwrap();
        if !agent_first {
            usr1();
        }
        for c in [a, b] {
            let out = c.wait_with_output().unwrap();
            match out.status.code() {
                Some(0) => ran += 1,
                Some(75) => locked_out += 1,
                other => panic!("backup exited {other:?}: {}", String::from_utf8_lossy(&out.stderr)),
            }
        }
        // The agent's own run: finished, or acknowledged and not started (lock held).
        let l = wait_for(&["Backup finished", "Backup not started", "Backup failed"]);
        if l.contains("finished") {
            agent_ran += 1;
        } else {
            assert!(l.contains("not started"), "the agent's backup failed: {l}");
            agent_busy += 1;
        }
    }
    assert!(Command::new("kill").args(["-TERM", &agent.id().to_string()]).status().unwrap().success());
    assert_eq!(agent.wait().unwrap().code(), Some(0));
    eprintln!(
        "concurrency: {rounds} rounds, {ran} CLI backups ran, {locked_out} exited 75; agent: {agent_ran} ran, {agent_busy} not started (busy)"
    );
    assert!(locked_out + agent_busy > 0, "no collision in {rounds} rounds: the test did not test");
    let rows = list(&f.expect(&["--json", "list"], 0).stdout);
    assert_eq!(rows.len(), ran + agent_ran, "one archive per run that ran");
    assert!(rows.iter().all(|r| r["complete"] == true), "{rows:?}");
    assert_eq!(leftovers(&f.target), Vec::<String>::new());
    f.expect(&["verify", "--all"], 0);
    f.expect(&["verify", "--deep"], 0);
}
