//! E-mail through the system's `sendmail` interface (msmtp, ssmtp, postfix and exim all
//! provide `/usr/sbin/sendmail`): we write a complete RFC 5322 message and pipe it to
//! `sendmail -t -i`, which takes the recipients from the headers. No SMTP client of our own:
//! the Pi's mail setup (relay, credentials, TLS) stays where the admin already keeps it.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::send::MailSender;

pub struct Mail<'a> {
    pub from: &'a str,
    pub to: &'a [String],
    pub subject: &'a str,
    pub date: DateTime<Utc>,
    /// `<unique@host>`: the same for every retry of one notification, so a mail system that
    /// got it twice can tell.
    pub message_id: &'a str,
    pub body: &'a str,
}

/// The message text: headers (addresses were validated by the config: no CR, LF, `<`, `,`),
/// a blank line, the body as UTF-8 text with LF line ends (sendmail's local convention).
pub fn compose(m: &Mail) -> String {
    let mut s = String::new();
    s += &format!("From: DataVault <{}>\n", m.from);
    s += &format!("To: {}\n", m.to.join(", "));
    s += &format!("Subject: {}\n", encode_header(m.subject));
    s += &format!("Date: {}\n", m.date.to_rfc2822());
    s += &format!("Message-ID: {}\n", m.message_id);
    s += "MIME-Version: 1.0\n";
    s += "Content-Type: text/plain; charset=utf-8\n";
    s += "Content-Transfer-Encoding: 8bit\n";
    // RFC 3834: no vacation replies to a machine.
    s += "Auto-Submitted: auto-generated\n\n";
    for line in m.body.lines() {
        // A lone "." ends the message for `sendmail` without -i; -i is passed, but be safe,
        // and keep lines under RFC 5322's 998 octets.
        let line: String = line.chars().take(900).collect();
        s += if line == "." { ".." } else { &line };
        s += "\n";
    }
    s
}

/// RFC 2047 for a header that is not plain ASCII (a host name or archive name may not be).
fn encode_header(text: &str) -> String {
    let clean: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if clean.is_ascii() {
        return clean;
    }
    format!("=?UTF-8?B?{}?=", base64(clean.as_bytes()))
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `sendmail -t -i`, killed if it takes longer than the timeout.
pub struct Sendmail {
    pub path: PathBuf,
    pub timeout: Duration,
}

impl MailSender for Sendmail {
    fn send(&self, message: &str) -> Result<(), String> {
        let name = self.path.display().to_string();
        // Checked first: a failed exec is not reported the same way everywhere (under
        // qemu-user the spawn itself may succeed and the child exit 127).
        if !self.path.is_file() {
            return Err(format!(
                "{name} does not exist; install msmtp-mta (or another MTA) or set notify.sendmail"
            ));
        }
        let mut child = Command::new(&self.path)
            .args(["-t", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!("cannot run {name}: {e}; install msmtp-mta (or another MTA) or set notify.sendmail")
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        let text = message.to_string();
        let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
        let pid = rustix::process::Pid::from_child(&child);
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let out = child.wait_with_output();
            let _ = tx.send(());
            out
        });
        if rx.recv_timeout(self.timeout).is_err() {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let _ = waiter.join();
            return Err(format!("{name} did not finish within {} s; killed", self.timeout.as_secs()));
        }
        let out = waiter
            .join()
            .map_err(|_| format!("{name}: waiting for it failed"))?
            .map_err(|e| format!("{name}: {e}"))?;
        let _ = writer.join();
        if out.status.success() {
            return Ok(());
        }
        let why = String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("").trim().to_string();
        Err(format!(
            "{name} exited with {}: {why}",
            out.status.code().map_or("a signal".into(), |c| c.to_string())
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_has_the_headers_a_mail_system_expects() {
        let to = vec!["owner@example.com".to_string(), "second@example.com".to_string()];
        let text = compose(&Mail {
            from: "datavault@pi",
            to: &to,
            subject: "DataVault on pi: backup failed",
            date: "2026-12-04T04:10:00Z".parse().unwrap(),
            message_id: "<datavault.7.1@pi>",
            body: "line one\n.\nline three",
        });
        let (head, body) = text.split_once("\n\n").unwrap();
        assert!(head.contains("From: DataVault <datavault@pi>\nTo: owner@example.com, second@example.com\n"));
        assert!(head.contains("Date: Fri, 4 Dec 2026 04:10:00 +0000"), "{head}");
        assert!(head.contains("Message-ID: <datavault.7.1@pi>"));
        assert!(head.contains("MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8"));
        assert_eq!(body, "line one\n..\nline three\n");
    }

    #[test]
    fn non_ascii_subjects_are_encoded() {
        assert_eq!(encode_header("plain"), "plain");
        assert_eq!(encode_header("café"), "=?UTF-8?B?Y2Fmw6k=?=");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"M"), "TQ==");
    }

    #[test]
    fn a_failing_sendmail_is_named_with_its_exit_code() {
        let s = Sendmail { path: "/bin/false".into(), timeout: Duration::from_secs(5) };
        let e = s.send("x").unwrap_err();
        assert!(e.contains("/bin/false exited with 1"), "{e}");
        let s = Sendmail { path: "/nonexistent/sendmail".into(), timeout: Duration::from_secs(5) };
        let e = s.send("x").unwrap_err();
        assert!(e.contains("/nonexistent/sendmail") && e.contains("notify.sendmail"), "{e}");
    }
}
