//! The application's stop and start commands (`[service]`), run around an in-place restore.
//!
//! Each runs with `sh -c` in its own process group, its output on our stderr (so `--json` on
//! stdout stays clean), and is killed, with everything it started, once `timeout` has passed:
//! a hung `systemctl stop` must not hold the run lock and the app's data for hours.

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::config::ServiceSettings;

/// How long a command killed with SIGTERM gets before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Stop,
    Start,
}

impl Which {
    fn as_str(self) -> &'static str {
        match self {
            Which::Stop => "stop",
            Which::Start => "start",
        }
    }
}

/// Run the stop or start command; `Err` is a one-line reason naming the command.
pub fn run(svc: &ServiceSettings, which: Which) -> std::result::Result<(), String> {
    let (what, cmd) = match which {
        Which::Stop => (which.as_str(), &svc.stop_command),
        Which::Start => (which.as_str(), &svc.start_command),
    };
    run_command(what, cmd, svc.timeout)
}

fn run_command(what: &str, cmd: &str, timeout: Duration) -> std::result::Result<(), String> {
    use std::os::unix::process::CommandExt;
    log::info!("running the {what} command: {cmd}");
    let stdout =
        std::io::stderr().as_fd().try_clone_to_owned().map(Stdio::from).unwrap_or_else(|_| Stdio::null());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(stdout)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("the {what} command `{cmd}` could not run: {e}"))?;
    let pid = rustix::process::Pid::from_child(&child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(st) => st,
        Err(_) => {
            log::error!("the {what} command did not finish within {} s: stopping it", timeout.as_secs());
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::TERM);
            // The shell may die on TERM while what it started ignores it: whatever is left of
            // the group after the grace period is killed, leader gone or not.
            let _ = rx.recv_timeout(GRACE);
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            return Err(format!(
                "the {what} command `{cmd}` did not finish within {} s and was killed; fix it, or raise service.timeout_seconds",
                timeout.as_secs()
            ));
        }
    };
    match status {
        Ok(st) if st.success() => Ok(()),
        Ok(st) => Err(format!("the {what} command `{cmd}` failed ({st})")),
        Err(e) => Err(format!("the {what} command `{cmd}` could not be waited for: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alive and not a zombie waiting for its parent.
    fn alive(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().map(|r| !r.trim_start().starts_with('Z')).unwrap_or(false))
            .unwrap_or(false)
    }

    #[test]
    fn a_command_that_hangs_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        // The shell starts a child of its own, then hangs.
        let cmd = format!("sleep 600 & echo $! > {}; sleep 600", pidfile.display());
        let started = std::time::Instant::now();
        let e = run_command("stop", &cmd, Duration::from_millis(500)).unwrap_err();
        assert!(e.contains("did not finish within"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(30));
        // The whole group went, the command's own child included. Signal delivery is
        // immediate but death is not: wait for it, within a bound.
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive(&pid) && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(!alive(&pid), "the command's child {pid} survived the kill");
    }

    #[test]
    fn a_command_that_ignores_sigterm_is_killed_all_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // The script ignores TERM; the shell that runs it does not (it dies at once).
        let script = dir.path().join("stop.sh");
        std::fs::write(&script, format!("trap '' TERM\necho $$ > {}\nsleep 600\n", pidfile.display()))
            .unwrap();
        let cmd = format!("sh {}", script.display());
        let e = run_command("stop", &cmd, Duration::from_millis(500)).unwrap_err();
        assert!(e.contains("did not finish within"), "{e}");
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive(&pid) && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(!alive(&pid), "the command {pid} survived");
    }

    #[test]
    fn failures_name_the_command() {
        let e = run_command("start", "exit 3", Duration::from_secs(10)).unwrap_err();
        assert!(e.contains("start command `exit 3` failed"), "{e}");
        run_command("start", "true", Duration::from_secs(10)).unwrap();
    }
}
