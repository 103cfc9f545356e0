//! Sending what the outbox holds: pings and ntfy posts over HTTP(S), e-mail through the
//! system's sendmail. Small on purpose: the network sits behind [`HttpPoster`] and the mail
//! behind [`MailSender`], so the delivery rules are tested without either, and the
//! integration tests point the real ones at a local server and a fake sendmail.
//!
//! Every request has a short timeout; a channel that fails once is not tried again in the
//! same run (an offline Pi must not spend a minute per pending message). Secrets (the URLs,
//! which carry healthchecks UUIDs and ntfy topics, and the ntfy token) go into the request
//! only: errors are [`redact`]ed before they are logged or stored.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::outbox::{self, Channel, Fate, Pending};
use crate::catalog::Catalog;
use crate::config::{NotifySettings, SecretUrl};
use crate::error::{Error, Result};

/// One HTTP POST. Returns the status code, or why no answer came.
pub trait HttpPoster {
    fn post(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: &str,
        timeout: Duration,
    ) -> std::result::Result<u16, String>;
}

/// The real client: attohttpc (blocking, rustls with the system's CA certificates), the HTTP
/// client the offsite copy uses too.
pub struct Http;

impl HttpPoster for Http {
    fn post(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: &str,
        timeout: Duration,
    ) -> std::result::Result<u16, String> {
        let mut req = attohttpc::post(url)
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .timeout(timeout)
            .follow_redirects(false);
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let resp = req.text(body).send().map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    }
}

/// Hands a finished RFC 5322 message to the mail system.
pub trait MailSender {
    fn send(&self, message: &str) -> std::result::Result<(), String>;
}

/// Everything a delivery needs from the outside world.
pub struct Senders<'a> {
    pub http: &'a dyn HttpPoster,
    pub mail: &'a dyn MailSender,
    pub host: String,
}

/// Messages older than this are not sent any more: a week-old alarm misleads more than it helps.
pub const GIVE_UP_AFTER_DAYS: i64 = 7;

/// What one `send` pass did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SendReport {
    pub sent: usize,
    pub failed: usize,
    pub given_up: usize,
    pub superseded: usize,
    /// Still pending afterwards (failed now or skipped after a failure on their channel).
    pub pending: usize,
    /// One redacted line per failure.
    pub errors: Vec<String>,
}

/// Try every pending delivery once, oldest first, and record each outcome.
pub fn deliver_pending(
    catalog: &Catalog,
    n: &NotifySettings,
    s: &Senders,
    now: DateTime<Utc>,
) -> Result<SendReport> {
    let pending = outbox::pending(catalog)?;
    let mut report = SendReport::default();
    let mut broken: Vec<Channel> = Vec::new();
    // Only the newest backup ping matters: healthchecks cares that a run happened, not how
    // many the Pi could not report while it was offline.
    let newest_ping = pending.iter().filter(|p| p.channel == Channel::Ping).map(|p| p.id).max();
    for p in &pending {
        let (fate, error) = if !configured(n, p) {
            (Fate::GaveUp, Some(format!("{} is no longer configured", channel_name(p.channel))))
        } else if now - p.created_at > chrono::Duration::days(GIVE_UP_AFTER_DAYS) {
            (Fate::GaveUp, Some(format!("not sent within {GIVE_UP_AFTER_DAYS} days")))
        } else if p.channel == Channel::Ping && Some(p.id) != newest_ping {
            (Fate::Superseded, None)
        } else if broken.contains(&p.channel) {
            report.pending += 1;
            continue;
        } else {
            match deliver(n, s, p) {
                Ok(()) => (Fate::Sent, None),
                Err(e) => {
                    let e = redact(&e, n);
                    log::warn!(
                        "notification {} via {}: {e}; retried at the next run",
                        p.id,
                        channel_name(p.channel)
                    );
                    report.errors.push(format!("{}: {e}", channel_name(p.channel)));
                    broken.push(p.channel);
                    (Fate::Failed, Some(e))
                }
            }
        };
        match fate {
            Fate::Sent => report.sent += 1,
            Fate::Failed => {
                report.failed += 1;
                report.pending += 1
            }
            Fate::GaveUp => report.given_up += 1,
            Fate::Superseded => report.superseded += 1,
        }
        outbox::mark(catalog, p, fate, error.as_deref(), now)?;
    }
    Ok(report)
}

fn configured(n: &NotifySettings, p: &Pending) -> bool {
    match p.channel {
        Channel::Ping => ping_url(n, p).is_some(),
        Channel::Ntfy => n.ntfy.is_some(),
        Channel::Email => n.email.is_some(),
    }
}

fn ping_url<'n>(n: &'n NotifySettings, p: &Pending) -> Option<&'n SecretUrl> {
    if p.state == "SUCCESS" {
        n.ping.success.as_ref()
    } else {
        n.ping.failure.as_ref()
    }
}

pub fn channel_name(c: Channel) -> &'static str {
    match c {
        Channel::Ping => "ping",
        Channel::Ntfy => "ntfy",
        Channel::Email => "e-mail",
    }
}

/// Send one delivery.
fn deliver(n: &NotifySettings, s: &Senders, p: &Pending) -> std::result::Result<(), String> {
    match p.channel {
        Channel::Ping => {
            let url = ping_url(n, p).ok_or("no ping URL")?;
            post_ok(s.http, url, &[], &p.body, n.timeout)
        }
        Channel::Ntfy => {
            let ntfy = n.ntfy.as_ref().ok_or("ntfy is not configured")?;
            let mut headers = vec![
                ("Title", header_value(&p.title)),
                ("Priority", if p.state == "RESOLVED" { 2 } else { p.severity.ntfy_priority() }.to_string()),
                (
                    "Tags",
                    if p.state == "RESOLVED" || p.state == "DONE" { "white_check_mark" } else { "warning" }
                        .into(),
                ),
            ];
            if let Some(f) = &ntfy.token_file {
                headers
                    .push(("Authorization", format!("Bearer {}", read_token(f).map_err(|e| e.to_string())?)));
            }
            post_ok(s.http, &ntfy.url, &headers, &p.body, n.timeout)
        }
        Channel::Email => {
            let e = n.email.as_ref().ok_or("e-mail is not configured")?;
            let from = e.from.clone().unwrap_or_else(|| format!("datavault@{}", s.host));
            let message_id = format!("<datavault.{}.{}@{}>", p.id, p.created_at.timestamp(), s.host);
            let text = super::email::compose(&super::email::Mail {
                from: &from,
                to: &e.to,
                subject: &p.title,
                date: Utc::now(),
                message_id: &message_id,
                body: &p.body,
            });
            s.mail.send(&text)
        }
    }
}

fn post_ok(
    http: &dyn HttpPoster,
    url: &SecretUrl,
    headers: &[(&'static str, String)],
    body: &str,
    timeout: Duration,
) -> std::result::Result<(), String> {
    match http.post(url.expose(), headers, body, timeout) {
        Ok(code) if (200..300).contains(&code) => Ok(()),
        Ok(code) => Err(format!("{} answered HTTP {code}", url.redacted())),
        Err(e) => Err(format!("{}: {e}", url.redacted())),
    }
}

/// Header values are one line of ASCII: anything else becomes `?`.
fn header_value(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii() && !c.is_ascii_control() { c } else { '?' }).collect()
}

/// The ntfy access token: a file of its own, readable by its owner only (like the identity).
pub fn read_token(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let name = || format!("ntfy token file {}", path.display());
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Failed(format!("{}: {e}; check notify.ntfy_token_file", name())))?;
    if meta.mode() & 0o077 != 0 {
        return Err(Error::Failed(format!(
            "{} is readable by others (mode {:o}); run `chmod 600 {}`",
            name(),
            meta.mode() & 0o777,
            path.display()
        )));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(Error::Failed(format!(
            "{} belongs to another user; chown it to the user running datavault",
            name()
        )));
    }
    let bytes =
        crate::fsutil::read_regular(path, 4096).map_err(|e| Error::Failed(format!("{}: {e}", name())))?;
    let token = String::from_utf8_lossy(&bytes).trim().to_string();
    if token.is_empty() || token.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(Error::Failed(format!("{} must hold one token (tk_...) on one line", name())));
    }
    Ok(token)
}

/// Remove every secret the settings hold from a text (an error message may quote a URL).
pub fn redact(text: &str, n: &NotifySettings) -> String {
    let mut out = text.to_string();
    let urls = [
        n.ping.start.as_ref(),
        n.ping.success.as_ref(),
        n.ping.failure.as_ref(),
        n.ntfy.as_ref().map(|t| &t.url),
    ];
    for u in urls.into_iter().flatten() {
        out = out.replace(u.expose(), &u.redacted());
        // The part after the host alone (a UUID, a topic) is a secret too.
        if let Some(path) = u.expose().split_once("://").and_then(|(_, r)| r.split_once('/')).map(|(_, p)| p)
        {
            if path.len() >= 4 {
                out = out.replace(path, "...");
            }
        }
    }
    if let Some(token) =
        n.ntfy.as_ref().and_then(|t| t.token_file.as_deref()).and_then(|f| read_token(f).ok())
    {
        out = out.replace(&token, "...");
    }
    out
}

/// The start ping, sent at once (a tiny unit ordered before the backup runs it).
pub fn ping_start(
    n: &NotifySettings,
    http: &dyn HttpPoster,
    body: &str,
) -> std::result::Result<bool, String> {
    let Some(url) = &n.ping.start else { return Ok(false) };
    post_ok(http, url, &[], body, n.timeout).map(|_| true).map_err(|e| redact(&e, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// (url, headers, body) of one request.
    type Seen = (String, Vec<(&'static str, String)>, String);

    /// Records requests and answers with the given result.
    struct FakeHttp {
        answer: std::result::Result<u16, String>,
        seen: RefCell<Vec<Seen>>,
    }

    impl HttpPoster for FakeHttp {
        fn post(
            &self,
            url: &str,
            headers: &[(&'static str, String)],
            body: &str,
            _t: Duration,
        ) -> std::result::Result<u16, String> {
            self.seen.borrow_mut().push((url.into(), headers.to_vec(), body.into()));
            self.answer.clone()
        }
    }

    struct NoMail;
    impl MailSender for NoMail {
        fn send(&self, _m: &str) -> std::result::Result<(), String> {
            Err("no mail here".into())
        }
    }

    fn settings() -> NotifySettings {
        let mut n = NotifySettings::default();
        n.ping.success = Some(SecretUrl::new("https://hc.example/0d5a-secret-uuid"));
        n.ping.failure = Some(SecretUrl::new("https://hc.example/0d5a-secret-uuid/fail"));
        n.ntfy = Some(crate::config::NtfySettings {
            url: SecretUrl::new("https://ntfy.example/secret-topic"),
            token_file: None,
        });
        n
    }

    fn catalog() -> (tempfile::TempDir, Catalog) {
        let d = tempfile::tempdir().unwrap();
        let c = Catalog::open(&d.path().join("catalog.db")).unwrap();
        (d, c)
    }

    #[test]
    fn only_the_newest_ping_is_sent_and_a_failing_channel_is_tried_once() {
        let (_d, cat) = catalog();
        let n = settings();
        let t: DateTime<Utc> = "2026-12-04T04:00:00Z".parse().unwrap();
        for code in [0, 3, 0] {
            outbox::record_ping(&cat, &n, t, "summary", code, "pi").unwrap();
        }
        let down = FakeHttp {
            answer: Err("connection refused to https://hc.example/0d5a-secret-uuid".into()),
            seen: RefCell::new(vec![]),
        };
        let s = Senders { http: &down, mail: &NoMail, host: "pi".into() };
        let r = deliver_pending(&cat, &n, &s, t).unwrap();
        assert_eq!((r.sent, r.failed, r.superseded, r.pending), (0, 1, 2, 1));
        assert!(!r.errors[0].contains("secret-uuid"), "redacted: {:?}", r.errors);
        let stored = outbox::pending_summary(&cat).unwrap().1.unwrap();
        assert!(!stored.contains("secret-uuid"), "{stored}");

        let up = FakeHttp { answer: Ok(200), seen: RefCell::new(vec![]) };
        let s = Senders { http: &up, mail: &NoMail, host: "pi".into() };
        let r = deliver_pending(&cat, &n, &s, t).unwrap();
        assert_eq!((r.sent, r.pending), (1, 0));
        let seen = up.seen.borrow();
        assert_eq!(seen[0].0, "https://hc.example/0d5a-secret-uuid");
        assert_eq!(seen[0].2, "summary\nexit code: 0");
    }

    #[test]
    fn old_messages_and_removed_channels_are_given_up() {
        let (_d, cat) = catalog();
        let mut n = settings();
        let t: DateTime<Utc> = "2026-12-04T04:00:00Z".parse().unwrap();
        outbox::record_ping(&cat, &n, t, "summary", 0, "pi").unwrap();
        n.ping = Default::default();
        let up = FakeHttp { answer: Ok(200), seen: RefCell::new(vec![]) };
        let s = Senders { http: &up, mail: &NoMail, host: "pi".into() };
        let r = deliver_pending(&cat, &n, &s, t + chrono::Duration::days(8)).unwrap();
        assert_eq!((r.given_up, r.sent), (1, 0));
        assert!(up.seen.borrow().is_empty());
    }

    #[test]
    fn an_http_error_status_is_a_failure() {
        let n = settings();
        let e = post_ok(
            &FakeHttp { answer: Ok(404), seen: RefCell::new(vec![]) },
            n.ping.success.as_ref().unwrap(),
            &[],
            "",
            Duration::from_secs(1),
        );
        assert_eq!(e.unwrap_err(), "https://hc.example/... answered HTTP 404");
    }

    #[test]
    fn header_values_stay_one_ascii_line() {
        assert_eq!(header_value("a\r\nb é"), "a??b ?");
    }
}
