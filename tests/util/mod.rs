//! A small harness: a sample app, a key pair and a config in a temp folder, and the real
//! `datavault` binary run against them.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use datavault::demo::{create_sample_app, fingerprint, SampleApp};

pub mod http;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub app: SampleApp,
    pub config: PathBuf,
    pub target: PathBuf,
    pub state: PathBuf,
    pub identity: PathBuf,
    pub recipient: String,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with(|_| {})
    }

    /// `edit` may change the config text before it is written.
    pub fn with(edit: impl FnOnce(&mut String)) -> Fixture {
        let dir = tempfile::Builder::new().prefix("dv-test-").tempdir().unwrap();
        let app = create_sample_app(&dir.path().join("app")).unwrap();
        let identity = dir.path().join("keys/identity.txt");
        let recipient = datavault::keys::generate_identity_file(&identity).unwrap();
        let target = dir.path().join("usb");
        fs::create_dir_all(&target).unwrap();
        let state = dir.path().join("state");
        let mut text = format!(
            "[source]\ndatabase = {:?}\nuploads = {:?}\n[target]\npath = {:?}\nrequire_mountpoint = false\nrequire_luks = false\n\
             [encryption]\nrecipients = [{:?}]\nidentity = {:?}\n[compression]\nlevel = 3\nthreads = 2\n\
             [service]\nstop_command = \"echo stopped >> {}/service.log\"\nstart_command = \"echo started >> {}/service.log\"\n\
             [drill]\nchecks = [\"SELECT count(*) = 300 FROM users\"]\n[state]\ndir = {:?}\n\
             [notify]\nfull_above_percent = 100\nfull_within_days = 0\n",
            app.database.display().to_string(),
            app.uploads.display().to_string(),
            target.display().to_string(),
            recipient,
            identity.display().to_string(),
            dir.path().display(),
            dir.path().display(),
            state.display().to_string(),
        );
        // The test machine's own disk stands in for the USB drive: however full it is, it
        // must not make the drive "nearly full" (#15); tests that want it set these lower.
        edit(&mut text);
        let config = dir.path().join("datavault.toml");
        fs::write(&config, text).unwrap();
        Fixture { dir, app, config, target, state, identity, recipient }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Change one config value, by its dotted key (`service.stop_command`), through the TOML
    /// structure rather than by replacing text: a key that moved fails here, loudly.
    pub fn set(&self, key: &str, value: impl Into<toml::Value>) {
        self.edit_config(|t| {
            let (sections, last) = split_key(key);
            let mut table = t;
            for s in sections {
                table = table
                    .entry(s.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .unwrap_or_else(|| panic!("{s} in {key} is not a table"));
            }
            table.insert(last.to_string(), value.into());
        });
    }

    /// Remove one config value (or a whole `[section]`), by its dotted key.
    pub fn unset(&self, key: &str) {
        self.edit_config(|t| {
            let (sections, last) = split_key(key);
            let mut table = t;
            for s in sections {
                table = table
                    .get_mut(s)
                    .and_then(|v| v.as_table_mut())
                    .unwrap_or_else(|| panic!("no {s} in {key}"));
            }
            assert!(table.remove(last).is_some(), "the config has no {key} to remove");
        });
    }

    fn edit_config(&self, f: impl FnOnce(&mut toml::Table)) {
        let text = fs::read_to_string(&self.config).unwrap();
        let mut table: toml::Table = text.parse().unwrap();
        f(&mut table);
        fs::write(&self.config, toml::to_string(&table).unwrap()).unwrap();
    }

    /// Run, but fail the test (instead of hanging it) if datavault does not finish in time.
    #[track_caller]
    pub fn run_within(&self, limit: std::time::Duration, args: &[&str]) -> Run {
        run_within(self.command(args), limit)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_datavault"));
        c.arg("--config").arg(&self.config).args(args).stdin(Stdio::null());
        c.env_remove("DATAVAULT_CONFIG");
        // Under libfaketime (the year-ahead run of scripts/ci-faults.sh) every process that
        // inherits FAKETIME_SHARED takes one shared semaphore around each stat(): a child
        // killed -9 while holding it would hang every other one. Each child gets its own.
        c.env_remove("FAKETIME_SHARED");
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let out: Output = self.command(args).output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run and insist on an exit code; returns the run for further checks.
    #[track_caller]
    pub fn expect(&self, args: &[&str], code: i32) -> Run {
        let r = self.run(args);
        assert_eq!(
            r.code, code,
            "datavault {args:?} exited {} (wanted {code})\n--- stdout\n{}\n--- stderr\n{}",
            r.code, r.stdout, r.stderr
        );
        r
    }

    /// Archives (complete or not) in the target, sorted by name.
    pub fn archive_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<_> = fs::read_dir(&self.target)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".tar.zst.age"))
            .collect();
        v.sort();
        v
    }

    pub fn all_target_files(&self) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(&self.target)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Every file below the target, as paths relative to it: a snapshot store keeps its
    /// files in folders (`store/packs/..`, `store/snapshots/..`).
    pub fn files_below_target(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![self.target.clone()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    todo.push(e.path());
                } else {
                    out.push(e.path().strip_prefix(&self.target).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.app.database, Some(&self.app.uploads)).unwrap()
    }

    /// No staging (`.datavault-restore-*`) or aside (`.datavault-old-*`) folder beside the
    /// live data. (`.datavault-undone-*` folders, where a rollback keeps what the app may have
    /// written, are the owner's to delete: see `undone_folders`.)
    #[track_caller]
    pub fn assert_no_restore_leftovers(&self) {
        for dir in [self.app.database.parent().unwrap(), self.app.uploads.parent().unwrap()] {
            for e in fs::read_dir(dir).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                assert!(
                    !name.starts_with(".datavault-") || name.starts_with(".datavault-undone-"),
                    "left behind: {:?}",
                    e.path()
                );
            }
        }
    }

    /// The `.datavault-undone-*` folders beside the live data.
    pub fn undone_folders(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = [self.app.database.parent().unwrap(), self.app.uploads.parent().unwrap()]
            .iter()
            .flat_map(|d| fs::read_dir(d).unwrap().flatten().map(|e| e.path()))
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".datavault-undone-"))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// A database writer holding its lock pauses a backup at a known point, with the
    /// `.partial` archive (or a snapshot's `.partial` tree) already created: no sleeps needed
    /// to hit "mid-run". Commit the returned connection's transaction to let the backup go on.
    pub fn pause_backup_mid_run(&self) -> (rusqlite::Connection, std::process::Child) {
        let c = rusqlite::Connection::open(&self.app.database).unwrap();
        c.execute_batch("PRAGMA journal_mode=DELETE; BEGIN EXCLUSIVE;").unwrap();
        let child = self.command(&["backup"]).stderr(Stdio::piped()).spawn().unwrap();
        while !self.files_below_target().iter().any(|n| n.ends_with(".partial")) {
            std::thread::yield_now();
        }
        (c, child)
    }

    /// `restore NAME --to` a new folder `dir` below the fixture; what came back, as
    /// [`Fixture::fingerprint`] gives it for the live data.
    #[track_caller]
    pub fn restored(&self, name: &str, dir: impl AsRef<Path>) -> String {
        let out = self.path().join(dir);
        self.expect(&["restore", name, "--to", out.to_str().unwrap()], 0);
        fingerprint(&out.join("db/app.db"), Some(&out.join("uploads"))).unwrap()
    }

    pub fn backup(&self) -> serde_json::Value {
        let r = self.expect(&["--json", "backup"], 0);
        serde_json::from_str(&r.stdout).unwrap()
    }
}

/// Run a command, but fail the test (instead of hanging it) if it does not finish in time.
#[track_caller]
pub fn run_within(mut cmd: Command, limit: std::time::Duration) -> Run {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = rustix::process::Pid::from_child(&child);
    // The child's pipes are drained on threads so that a chatty run cannot block on them.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).ok();
        s
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait().unwrap()));
    let status = match rx.recv_timeout(limit) {
        Ok(st) => st,
        Err(_) => {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            panic!("{cmd:?} did not finish within {limit:?}: it hangs");
        }
    };
    Run { code: status.code().unwrap_or(-1), stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() }
}

fn split_key(key: &str) -> (Vec<&str>, &str) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap();
    (parts, last)
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Under qemu user-mode emulation mounts cannot be made; those tests ran natively first.
pub fn emulated() -> bool {
    std::env::var_os("DATAVAULT_TEST_EMULATED").is_some()
}

/// A tmpfs mounted for the life of the value.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs failed");
        Tmpfs { path: path.to_path_buf() }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Print why a test did not run its body, so the output says so.
pub fn skip(why: &str) {
    eprintln!("skipped: {why}");
}

/// Wait until `done()` holds, checking every millisecond; panic naming `what` if it has not
/// after `limit` (a bound on a hang, never a timing assumption: the condition is the
/// synchronisation). `done` may itself panic, e.g. when the process it waits on has exited.
pub fn wait_until(what: &str, limit: std::time::Duration, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "gave up after {limit:?} waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Panic with `child`'s stderr if it has exited: a wait on something it should do next
/// would otherwise never end.
pub fn assert_still_running(child: &mut std::process::Child, what: &str) {
    if let Some(status) = child.try_wait().unwrap() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        panic!("{what} exited ({status}) before the moment the test waits for: {err}");
    }
}
