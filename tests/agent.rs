//! `datavault agent` driven for real: signals in, log lines out (read from its stderr pipe,
//! which is also how the tests wait: no sleeps).

mod util;

use std::fs;
use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStderr, Stdio};

use util::Fixture;

struct Agent {
    child: Child,
    lines: Lines<BufReader<ChildStderr>>,
    seen: Vec<String>,
}

impl Agent {
    fn start(f: &Fixture, envs: &[(&str, &str)]) -> Agent {
        let mut cmd = f.command(&["agent"]);
        cmd.stderr(Stdio::piped()).stdout(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut a = Agent { child, lines, seen: Vec::new() };
        a.wait_for("agent started");
        a
    }

    /// Read the agent's log until a line contains `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the agent exited before logging {needle:?}; its log:\n{}", self.seen.join("\n"));
    }

    /// Panic with what it logged if the agent has exited.
    fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("the agent exited ({st}); its log so far:\n{}", self.seen.join("\n"));
        }
    }

    fn signal(&self, sig: &str) {
        let st =
            std::process::Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(st.success());
    }

    fn exit_code(mut self) -> i32 {
        for line in self.lines.by_ref() {
            self.seen.push(line.unwrap());
        }
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

#[test]
fn sigusr1_backs_up_sighup_reloads_and_sigterm_stops() {
    let f = Fixture::new();
    let mut a = Agent::start(&f, &[]);
    a.signal("-USR1");
    a.wait_for("Backup finished");
    assert_eq!(f.archive_files().len(), 1);

    // A broken config is refused and the old one kept: the next backup still works.
    let good = fs::read_to_string(&f.config).unwrap();
    fs::write(&f.config, good.replace("[target]", "[targett]")).unwrap();
    a.signal("-HUP");
    a.wait_for("reload refused");
    a.signal("-USR1");
    a.wait_for("Backup finished");
    assert_eq!(f.archive_files().len(), 2);
    fs::write(&f.config, &good).unwrap();
    a.signal("-HUP");
    a.wait_for("configuration reloaded");

    a.signal("-TERM");
    assert_eq!(a.exit_code(), 0);
    let audit = f.expect(&["--json", "audit"], 0);
    assert!(audit.stdout.contains("\"trigger\": \"manual\""), "{}", audit.stdout);
}

#[test]
fn sigterm_during_a_backup_cancels_it_and_leaves_no_partial_file() {
    let f = Fixture::new();
    f.backup();
    let before = f.all_target_files();
    let mut a = Agent::start(&f, &[]);
    // Hold the database so the backup pauses with its .partial file created.
    let db = rusqlite::Connection::open(&f.app.database).unwrap();
    db.execute_batch("PRAGMA journal_mode=DELETE; BEGIN EXCLUSIVE;").unwrap();
    a.signal("-USR1");
    a.wait_for("starting Backup");
    util::wait_until("the backup's .partial file", std::time::Duration::from_secs(300), || {
        a.assert_running();
        f.all_target_files().iter().any(|n| n.ends_with(".partial"))
    });
    a.signal("-TERM");
    a.wait_for("cancelling the running job");
    db.execute_batch("COMMIT").unwrap();
    a.wait_for("Backup failed");
    assert_eq!(a.exit_code(), 0);
    assert_eq!(f.all_target_files(), before, "no partial left, nothing new");
}

#[test]
fn the_onboard_led_trigger_is_taken_and_given_back() {
    let f = Fixture::with(|c| c.push_str("[gpio]\nact_led = true\n"));
    let sys = f.path().join("sysroot");
    let led = sys.join("sys/class/leds/ACT");
    fs::create_dir_all(&led).unwrap();
    fs::write(led.join("trigger"), "none [mmc0] timer heartbeat\n").unwrap();
    fs::write(led.join("brightness"), "0\n").unwrap();
    let a = Agent::start(&f, &[("DATAVAULT_SYSTEM_ROOT", sys.to_str().unwrap())]);
    assert_eq!(fs::read_to_string(led.join("trigger")).unwrap().trim(), "none", "the agent drives the LED");
    a.signal("-TERM");
    assert_eq!(a.exit_code(), 0);
    assert_eq!(
        fs::read_to_string(led.join("trigger")).unwrap().trim(),
        "mmc0",
        "the original trigger is back"
    );
}

#[test]
fn off_pi_gpio_is_reported_once_and_the_agent_still_runs() {
    let f = Fixture::with(|c| c.push_str("[gpio]\nled_pin = 17\nbutton_pin = 27\n"));
    let mut a = Agent::start(&f, &[]);
    let gpio_lines = a.seen.iter().filter(|l| l.contains("Raspberry Pi")).count();
    assert_eq!(gpio_lines, 2, "one line each for the LED and the button: {:?}", a.seen);
    a.signal("-USR1");
    a.wait_for("Backup finished");
    a.signal("-INT");
    assert_eq!(a.exit_code(), 0);
}

#[test]
fn systemd_is_told_when_the_agent_is_ready() {
    let f = Fixture::new();
    let sock_path = f.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    let a = Agent::start(&f, &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    a.signal("-TERM");
    let n = sock.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert_eq!(a.exit_code(), 0);
}
