//! `datavault doctor`: a self-test with a checklist. Every check is read-only. The exit code
//! is non-zero when something would make tonight's backup fail (the class of the first such
//! problem: 2 config, 3 target, 5 source); warnings (no identity, overdue, clock) do not.

use std::path::Path;

use serde::Serialize;

use crate::catalog::{Catalog, Event, RunStatus};
use crate::config::Settings;
use crate::error::exit;
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
    let mut checks = Vec::new();
    let settings = match Settings::load(config_path) {
        Ok(s) => {
            checks.push(ok("config", format!("{} is valid", config_path.display())));
            s
        }
        Err(e) => {
            checks.push(fail("config", e.to_string(), e.exit_code()));
            return Report { ok: false, checks };
        }
    };
    let env = Env::new(settings, std::sync::Arc::new(crate::progress::NoProgress));
    let s = &env.settings;
    checks.extend(layout_checks(&env));

    // Source.
    checks.push(match crate::snapshot::open(&s.source.database) {
        Err(e) => fail("database", e.to_string(), e.exit_code()),
        Ok(conn) => match crate::snapshot::begin(&conn, &s.source.database) {
            Err(e) => fail("database", e.to_string(), e.exit_code()),
            Ok(info) => {
                crate::snapshot::end(&conn);
                let what = format!(
                    "{} readable, {} pages of {} bytes, schema version {}",
                    s.source.database.display(),
                    info.page_count,
                    info.page_size,
                    info.schema_version
                );
                if info.journal_mode == "wal" {
                    ok("database", format!("{what}, WAL mode"))
                } else {
                    warn(
                        "database",
                        format!("{what}, but journal mode {}: the app's writers wait during each backup; switch the app to WAL", info.journal_mode),
                    )
                }
            }
        },
    });
    if let Some(u) = &s.source.uploads {
        checks.push(match std::fs::read_dir(u) {
            Ok(rd) => ok("uploads", format!("{} readable ({} entries at the top)", u.display(), rd.count())),
            Err(e) => fail("uploads", format!("{}: {e}; check source.uploads", u.display()), exit::SOURCE),
        });
    }

    // Target.
    let listings =
        crate::store::Store::open_local(&s.target.path).and_then(|st| st.scan()).unwrap_or_default();
    let last_size = listings.iter().find_map(|l| l.manifest.as_ref().map(|m| m.archive_size));
    match crate::target::inspect(&s.target, &env.system_root) {
        Err(e) => checks.push(fail("target", e.to_string(), e.exit_code())),
        Ok(t) => {
            let problems = t.problems(&s.target);
            if let Some(p) = problems.first() {
                checks.push(fail(
                    "target",
                    format!("{}: {p}", s.target.path.display()),
                    exit::TARGET_NOT_READY,
                ));
            } else {
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
            let free = crate::target::human_bytes(t.free_bytes);
            checks.push(match last_size {
                _ if !t.exists => warn("free space", "unknown: the target is not there"),
                None => ok("free space", format!("{free} free; no archive yet to compare with")),
                Some(n) if t.free_bytes < n + n / 10 => fail(
                    "free space",
                    format!("{free} free, the last archive was {}: tonight's backup will not fit; run `datavault prune` or use a bigger drive", crate::target::human_bytes(n)),
                    exit::TARGET_NOT_READY,
                ),
                Some(n) if t.free_bytes < 3 * n => {
                    warn("free space", format!("{free} free, room for fewer than 3 archives of {}", crate::target::human_bytes(n)))
                }
                Some(n) => ok("free space", format!("{free} free, the last archive was {}", crate::target::human_bytes(n))),
            });
        }
    }

    // Keys.
    let recipients: Vec<String> = s.encryption.recipients.iter().map(|r| r.to_string()).collect();
    checks.push(ok("recipients", format!("{} valid age public key(s)", recipients.len())));
    checks.push(match &s.encryption.identity {
        None => warn("identity", "encryption.identity is not set: drills and restores need the private key"),
        Some(p) => match crate::keys::load_identities(Some(p)) {
            Err(e) => warn("identity", format!("{e} (drills and restores need it)")),
            Ok(_) => {
                let matches = std::fs::read_to_string(p)
                    .ok()
                    .map(|t| t.lines().filter_map(crate::keys::recipient_of_identity_line).any(|r| recipients.contains(&r)))
                    .unwrap_or(false);
                if matches {
                    ok("identity", format!("{} is private (0600) and opens the configured recipients", p.display()))
                } else {
                    warn("identity", format!("{} does not match any configured recipient: drills would fail with \"wrong key\"", p.display()))
                }
            }
        },
    });

    // Clock.
    let newest = listings.iter().filter_map(|l| l.created()).max();
    checks.push(match crate::retention::check_clock(now(), newest, crate::ops::build_time()) {
        crate::retention::ClockCheck::Sane => ok("clock", crate::manifest::format_time(now())),
        crate::retention::ClockCheck::Suspicious(why) => {
            warn("clock", format!("{why}; backups still run, pruning waits"))
        }
    });

    checks.extend(probe_gpio(s));

    // Run state.
    checks.push(match crate::lock::holder(&s.state.lock_path()) {
        Some(h) => ok("lock", format!("a run is in progress: {h}")),
        None => ok("lock", "free (flock: a killed run never leaves it stale)"),
    });
    if let Some(a) = crate::ops::status::interrupted_restore(&s.state.restore_journal_path()) {
        checks.push(warn(
            "restore",
            format!("an interrupted restore of {a} was found; the next run finishes or undoes it"),
        ));
    }
    match Catalog::open(&s.state.catalog_path()) {
        Err(e) => checks.push(fail("catalog", e.to_string(), e.exit_code())),
        Ok(c) => {
            let last_ok = c.last_run("backup", Some(RunStatus::Success)).ok().flatten();
            let last_any = c.last_run("backup", None).ok().flatten();
            let max_age = chrono::Duration::hours(s.agent.max_age_hours as i64);
            checks.push(match (&last_ok, &last_any) {
                (_, Some(r)) if r.status == RunStatus::Failed => warn(
                    "last backup",
                    format!("the last backup run failed: {}", r.error.clone().unwrap_or_default()),
                ),
                (None, _) => warn("last backup", "no successful backup yet: run `datavault backup`"),
                (Some(r), _) => {
                    let at = r.ended_at.unwrap_or(r.started_at);
                    let age = now() - at;
                    if age > max_age {
                        warn(
                            "last backup",
                            format!(
                                "{} hours old: overdue (agent.max_age_hours = {})",
                                age.num_hours(),
                                s.agent.max_age_hours
                            ),
                        )
                    } else {
                        ok(
                            "last backup",
                            format!("{} ({} hours ago)", crate::manifest::format_time(at), age.num_hours()),
                        )
                    }
                }
            });
            checks.push(match c.last_event(&[Event::DrillPassed, Event::DrillFailed]).ok().flatten() {
                None => warn("last drill", "no drill yet: run `datavault drill`"),
                Some(e) if e.event == Event::DrillFailed => warn(
                    "last drill",
                    format!("FAILED at {}: {}", crate::manifest::format_time(e.at), e.detail),
                ),
                Some(e) => ok(
                    "last drill",
                    format!("passed at {} ({})", crate::manifest::format_time(e.at), e.detail),
                ),
            });
        }
    }
    let ok_all = checks.iter().all(|c| c.level != Level::Fail);
    Report { ok: ok_all, checks }
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
    if let Ok(plan) = crate::ops::restore::RestorePlan::new(s, "-", 0, true) {
        checks.push(match plan.preflight(&env.system_root, s) {
            Ok(()) => ok("restore in place", "the live paths can be swapped atomically"),
            Err(e) => warn("restore in place", format!("would be refused: {e}")),
        });
    }
    checks
}
