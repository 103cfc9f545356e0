//! `datavault doctor`: a self-test with a checklist. Every check is read-only. The exit code
//! is non-zero when something would make tonight's backup fail (the class of the first such
//! problem: 2 config, 3 target, 5 source); warnings (no identity, overdue, clock) do not.

use std::path::Path;

use serde::Serialize;

use crate::catalog::RunStatus;
use crate::config::Settings;
use crate::error::exit;
use crate::ops::health::Health;
use crate::ops::{now, Env};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    /// The exit code this problem maps to, for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn exit_code(&self) -> u8 {
        self.checks.iter().find_map(|c| c.exit_code).unwrap_or(exit::SUCCESS)
    }
}

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, level: Level::Ok, detail: detail.into(), exit_code: None }
}
fn warn(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, level: Level::Warn, detail: detail.into(), exit_code: None }
}
fn fail(name: &'static str, detail: impl Into<String>, code: u8) -> Check {
    Check { name, level: Level::Fail, detail: detail.into(), exit_code: Some(code) }
}

/// `probe_gpio` opens the configured LED and button to see that they work (the agent must
/// not be running, or the pins are busy).
pub fn run(config_path: &Path, probe_gpio: &dyn Fn(&Settings) -> Vec<Check>) -> Report {
    let settings = match Settings::load(config_path) {
        Ok(s) => s,
        Err(e) => return Report { ok: false, checks: vec![fail("config", e.to_string(), e.exit_code())] },
    };
    let env = Env::new(settings, std::sync::Arc::new(crate::progress::NoProgress));
    let s = &env.settings;
    let mut checks = vec![ok("config", format!("{} is valid", config_path.display()))];
    checks.extend(layout_checks(&env));
    checks.push(database_check(s));
    if let Some(u) = &s.source.uploads {
        checks.push(match std::fs::read_dir(u) {
            Ok(rd) => ok("uploads", format!("{} readable ({} entries at the top)", u.display(), rd.count())),
            Err(e) => fail("uploads", format!("{}: {e}; check source.uploads", u.display()), exit::SOURCE),
        });
    }
    let listings =
        crate::store::Store::open_local(&s.target.path).and_then(|st| st.scan()).unwrap_or_default();
    checks.extend(target_checks(&env, &listings));
    checks.extend(key_checks(s));
    let newest = listings.iter().filter_map(|l| l.created()).max();
    checks.push(match crate::retention::check_clock(now(), newest, crate::ops::build_time()) {
        crate::retention::ClockCheck::Sane => ok("clock", crate::manifest::format_time(now())),
        crate::retention::ClockCheck::Suspicious(why) => {
            warn("clock", format!("{why}; backups still run, pruning waits"))
        }
    });
    checks.extend(probe_gpio(s));
    checks.extend(run_state_checks(&env));
    let ok_all = checks.iter().all(|c| c.level != Level::Fail);
    Report { ok: ok_all, checks }
}

fn database_check(s: &Settings) -> Check {
    let db = &s.source.database;
    let info = crate::snapshot::open(db).and_then(|conn| {
        let info = crate::snapshot::begin(&conn, db);
        crate::snapshot::end(&conn);
        info
    });
    match info {
        Err(e) => fail("database", e.to_string(), e.exit_code()),
        Ok(info) => {
            let what = format!(
                "{} readable, {} pages of {} bytes, schema version {}",
                db.display(),
                info.page_count,
                info.page_size,
                info.schema_version
            );
            if info.journal_mode == "wal" {
                ok("database", format!("{what}, WAL mode"))
            } else {
                warn(
                    "database",
                    format!(
                        "{what}, but journal mode {}: the app's writers wait during each backup; switch the app to WAL",
                        info.journal_mode
                    ),
                )
            }
        }
    }
}

/// Mounted, LUKS, marker; and room for tonight's backup, judged by the last archive's size.
fn target_checks(env: &Env, listings: &[crate::store::Listing]) -> Vec<Check> {
    let s = &env.settings;
    let t = match crate::target::inspect(&s.target, &env.system_root) {
        Err(e) => return vec![fail("target", e.to_string(), e.exit_code())],
        Ok(t) => t,
    };
    let mut checks = Vec::new();
    match t.problems(&s.target).first() {
        Some(p) => {
            checks.push(fail("target", format!("{}: {p}", s.target.path.display()), exit::TARGET_NOT_READY))
        }
        None => {
            let mut what =
                vec![if t.is_mountpoint { "mounted".to_string() } else { "a plain folder".into() }];
            if t.luks.is_some() {
                what.push("LUKS".into());
            }
            if let Some(m) = &t.marker_id {
                what.push(format!("marker {m}"));
            }
            checks.push(ok("target", format!("{}: {}", s.target.path.display(), what.join(", "))));
        }
    }
    let last_size = listings.iter().find_map(|l| l.manifest.as_ref().map(|m| m.archive_size));
    let free = crate::target::human_bytes(t.free_bytes);
    checks.push(match last_size {
        _ if !t.exists => warn("free space", "unknown: the target is not there"),
        None => ok("free space", format!("{free} free; no archive yet to compare with")),
        Some(n) if t.free_bytes < n + n / 10 => fail(
            "free space",
            format!(
                "{free} free, the last archive was {}: tonight's backup will not fit; run `datavault prune` or use a bigger drive",
                crate::target::human_bytes(n)
            ),
            exit::TARGET_NOT_READY,
        ),
        Some(n) if t.free_bytes < 3 * n => {
            warn("free space", format!("{free} free, room for fewer than 3 archives of {}", crate::target::human_bytes(n)))
        }
        Some(n) => ok("free space", format!("{free} free, the last archive was {}", crate::target::human_bytes(n))),
    });
    checks
}

fn key_checks(s: &Settings) -> Vec<Check> {
    let recipients: Vec<String> = s.encryption.recipients.iter().map(|r| r.to_string()).collect();
    let identity = match &s.encryption.identity {
        None => warn("identity", "encryption.identity is not set: drills and restores need the private key"),
        Some(p) => match crate::keys::load_identities(Some(p)) {
            Err(e) => warn("identity", format!("{e} (drills and restores need it)")),
            Ok(_) => {
                let matches = crate::fsutil::read_regular(p, 1 << 20)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .map(|t| {
                        t.lines()
                            .filter_map(crate::keys::recipient_of_identity_line)
                            .any(|r| recipients.contains(&r))
                    })
                    .unwrap_or(false);
                if matches {
                    ok(
                        "identity",
                        format!("{} is private (0600) and opens the configured recipients", p.display()),
                    )
                } else {
                    warn(
                        "identity",
                        format!(
                            "{} does not match any configured recipient: drills would fail with \"wrong key\"",
                            p.display()
                        ),
                    )
                }
            }
        },
    };
    vec![ok("recipients", format!("{} valid age public key(s)", recipients.len())), identity]
}

/// The lock, an interrupted restore, and the last backup and drill, from [`Health`].
fn run_state_checks(env: &Env) -> Vec<Check> {
    let h = Health::read(env, true);
    let mut checks = vec![match &h.running {
        Some(holder) => ok("lock", format!("a run is in progress: {holder}")),
        None => ok("lock", "free (flock: a killed run never leaves it stale)"),
    }];
    if let Some(a) = &h.interrupted_restore {
        checks.push(warn(
            "restore",
            format!("an interrupted restore of {a} was found; the next run finishes or undoes it"),
        ));
    }
    if let Some(p) = &h.catalog_problem {
        checks.push(fail("catalog", p.clone(), exit::FAILURE));
    }
    if let Some(p) = &h.store_problem {
        checks.push(fail("snapshot store", p.clone(), exit::INTEGRITY));
    }
    checks.push(match (&h.last_backup_run, h.last_good_backup) {
        (Some(r), _) if r.status == RunStatus::Failed => warn(
            "last backup",
            format!("the last backup run failed: {}", r.error.clone().unwrap_or_default()),
        ),
        (_, None) => warn("last backup", "no successful backup yet: run `datavault backup`"),
        (_, Some(at)) if h.overdue => warn(
            "last backup",
            format!(
                "{} hours old: overdue (agent.max_age_hours = {})",
                (h.now - at).num_hours(),
                h.max_age_hours
            ),
        ),
        (_, Some(at)) => ok(
            "last backup",
            format!("{} ({} hours ago)", crate::manifest::format_time(at), (h.now - at).num_hours()),
        ),
    });
    if let Some(o) = &h.offsite {
        let last = o.last_success.map(crate::manifest::format_time).unwrap_or_else(|| "never".into());
        checks.push(if o.behind {
            warn(
                "offsite",
                format!(
                    "BEHIND: {} backup(s) not pushed, the oldest {} hours old (offsite.max_behind_hours = {}); last good push {last}{}",
                    o.backups_waiting,
                    o.waiting_since.map(|w| (h.now - w).num_hours()).unwrap_or_default(),
                    o.max_behind_hours,
                    o.last_error.as_ref().map(|e| format!("; the last push failed: {e}")).unwrap_or_default()
                ),
            )
        } else {
            ok("offsite", format!("{}: last good push {last}, {} backup(s) waiting", o.location, o.backups_waiting))
        });
    }
    checks.push(match &h.last_drill {
        None => warn("last drill", "no drill yet: run `datavault drill`"),
        Some(d) if !d.passed => {
            warn("last drill", format!("FAILED at {}: {}", crate::manifest::format_time(d.at), d.detail))
        }
        Some(d) => {
            ok("last drill", format!("passed at {} ({})", crate::manifest::format_time(d.at), d.detail))
        }
    });
    checks.extend(notify_checks(env, &h));
    checks
}

/// Drill overdue, the drive's forecast and the notification channels (#15). Warnings only:
/// none of them stops the next backup.
fn notify_checks(env: &Env, h: &Health) -> Vec<Check> {
    let mut checks = Vec::new();
    if h.drill_overdue {
        checks.push(warn(
            "drills",
            format!(
                "overdue: no restore drill for more than {} days (drill.max_age_days); run `datavault drill`, and enable datavault-drill-weekly.timer",
                h.drill_max_age_days
            ),
        ));
    }
    if let Some(d) = &h.drive {
        let text = crate::alerts::fill_detail(d);
        checks.push(if d.nearly_full {
            warn("drive space", format!("nearly full: {text}"))
        } else {
            ok("drive space", text)
        });
    }
    let n = &env.settings.notify;
    let channels: Vec<&str> =
        crate::ops::notify::channels(env).into_iter().map(crate::alerts::send::channel_name).collect();
    checks.push(if channels.is_empty() {
        warn("notify", "no channel configured: nobody hears of a failure ([notify] in the config)")
    } else {
        ok("notify", format!("channels: {}", channels.join(", ")))
    });
    if let Some(f) = n.ntfy.as_ref().and_then(|t| t.token_file.as_deref()) {
        if let Err(e) = crate::alerts::send::read_token(f) {
            checks.push(warn("ntfy token", e.to_string()));
        }
    }
    if let Some(e) = &n.email {
        if !e.sendmail.exists() {
            checks.push(warn(
                "e-mail",
                format!(
                    "{} not found: install msmtp-mta (or another MTA) or set notify.sendmail",
                    e.sendmail.display()
                ),
            ));
        }
    }
    if h.notifications_pending > 0 {
        checks.push(warn(
            "notify",
            format!(
                "{} notification(s) not delivered yet{}",
                h.notifications_pending,
                h.notification_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
            ),
        ));
    }
    checks
}

/// Where things are: paths that overlap, a symlinked database, a state folder others can
/// write, and what would stop an in-place restore (a mount point as or inside uploads).
fn layout_checks(env: &Env) -> Vec<Check> {
    let s = &env.settings;
    let mut checks = Vec::new();
    checks.push(match crate::config::check_layout(s) {
        Ok(()) => ok("layout", "database, uploads, target, state and scratch stay out of each other's way"),
        Err(e) => fail("layout", e.to_string(), e.exit_code()),
    });
    checks.push(match crate::config::state_dir_problem(&s.state.dir) {
        None => ok("state folder", format!("{} is datavault's alone", s.state.dir.display())),
        Some(p) => fail("state folder", p, exit::USAGE),
    });
    if let Ok(plan) = crate::ops::restore::RestorePlan::new(s, "-", "0-0", true) {
        checks.push(match plan.preflight(&env.system_root, s) {
            Ok(()) => ok("restore in place", "the live paths can be swapped atomically"),
            Err(e) => warn("restore in place", format!("would be refused: {e}")),
        });
    }
    checks
}
