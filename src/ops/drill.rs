//! `datavault drill`: prove that an archive really restores, without touching live data.
//!
//! Decrypt and extract into a scratch folder, run `PRAGMA integrity_check` on the restored
//! database (while the uploads are still being extracted: [`read_and_check`]), check every
//! byte on the way (each file against the inner manifest in an archive, each chunk against
//! its keyed hash in a snapshot), run the configured SQL checks,
//! time it all (that is the recovery time to expect), and clean up: each upload as soon as it
//! is written ([`AfterWrite::Discard`]), the rest at the end.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use crate::archive::read::{read_archive, ExtractPlan, ReadReport};
use crate::catalog::{Event, RunStatus, FROM_OFFSITE};
use crate::error::{Error, Result};
use crate::fsutil::remove_tree;
use crate::ops::{now, Env, Run, RunError, Trigger};
use crate::tree::extract::{settle_as_written, AfterWrite};

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub archive: String,
    pub passed: bool,
    /// Set when a boot drill found nothing to drill: no archive on the drive and none ever
    /// recorded in the catalog (a fresh install, before the first backup). Neither a pass nor
    /// a failure: the run is recorded as WARNING, the command exits 0 (the failure hook must
    /// not fire on every fresh install) and `status` says "no backup yet" (issue #13).
    /// Also set, with `archive` named, when the weekly drill finds the newest backup passed a
    /// drill in the last 24 hours: the run is a SUCCESS that records no drill event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nothing_to_drill: Option<String>,
    pub checks: Vec<Check>,
    pub files: u64,
    pub bytes: u64,
    /// Wall time of the whole drill: what a real restore of this archive costs.
    pub recovery_seconds: f64,
}

impl DrillReport {
    /// A boot drill's report before the first backup (see `nothing_to_drill`).
    fn nothing_yet(seconds: f64) -> DrillReport {
        DrillReport {
            archive: String::new(),
            passed: false,
            nothing_to_drill: Some(NO_BACKUP_YET.into()),
            checks: Vec::new(),
            files: 0,
            bytes: 0,
            recovery_seconds: seconds,
        }
    }
}

pub fn run(env: &Env, which: Option<&str>, trigger: Trigger) -> Result<DrillReport> {
    crate::ops::run_in_background_priority();
    let run = Run::start(env, "drill", trigger, true)?;
    let result = drill_in_run(&run, which, trigger);
    match &result {
        // No backup yet deserves a look; the newest backup drilled already does not.
        Ok(r) if r.nothing_to_drill.is_some() && r.archive.is_empty() => {
            run.end(&result, RunStatus::Warning, None)
        }
        Ok(r) if r.nothing_to_drill.is_some() => run.end(&result, RunStatus::Success, None),
        // A drill that ran to the end but failed a check is a failed run in the catalog,
        // yet its report is still what the operator needs to see.
        Ok(r) if !r.passed => {
            let failed: Vec<_> =
                r.checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
            let why = RunError { kind: "integrity", message: format!("DRILL FAILED: {}", failed.join("; ")) };
            run.end_as(RunStatus::Failed, Some(why), Some(&r.archive));
        }
        Ok(r) => run.end_as(RunStatus::Success, None, Some(&r.archive)),
        Err(_) => run.end(&result, RunStatus::Success, None),
    }
    result
}

/// The archives to drill. The boot drill is often the first run after a power cut: it clears
/// what a cut-off run left on the drive, so that status and `verify --all` are clean again.
/// The bucket (`--offsite`) is neither cleaned (the Pi's key may not delete) nor synced into
/// the drive's catalog.
fn clean_and_list(run: &Run) -> Result<(crate::store::Store, Vec<crate::store::Listing>)> {
    let env = run.env;
    let (store, mut listings) = crate::ops::listings(env)?;
    if !env.offsite && !store.clean(&run.catalog.interrupted_archives().unwrap_or_default()).is_empty() {
        listings = store.scan()?;
    }
    crate::ops::sync_catalog_if_local(env, &run.catalog, &listings);
    Ok((store, listings))
}

/// How recent a passed drill of the newest backup must be for the weekly drill to skip it.
/// The case it is for: a Pi that was off on Sunday boots, and the weekly timer's catch-up
/// (`Persistent=`) starts right after the boot drill (its unit is ordered after it) with
/// nothing new to prove.
const DRILLED_RECENTLY: chrono::Duration = chrono::Duration::hours(24);

/// `Some(why)` when the last drill recorded passed on `archive` (on the drive, not the
/// offsite copy) less than [`DRILLED_RECENTLY`] ago. A failed drill since, or a newer
/// backup, and the weekly drill runs.
fn drilled_recently(run: &Run, archive: &str) -> Result<Option<String>> {
    let last = run.catalog.last_event(&[Event::DrillPassed, Event::DrillFailed])?;
    Ok(last.filter(|e| {
        e.event == Event::DrillPassed
            && e.archive.as_deref() == Some(archive)
            && !e.detail.contains(FROM_OFFSITE)
            && now() - e.at < DRILLED_RECENTLY
            && e.at <= now()
    })
    .map(|e| {
        format!(
            "{archive} passed a drill at {} (less than 24 h ago): nothing new to prove, the weekly drill is skipped",
            e.at.format("%Y-%m-%d %H:%M UTC")
        )
    }))
}

/// What a boot drill says before the first backup (see [`DrillReport::nothing_to_drill`]).
pub const NO_BACKUP_YET: &str = "no backup yet: nothing to drill; run `datavault backup`";

fn drill_in_run(run: &Run, which: Option<&str>, trigger: Trigger) -> Result<DrillReport> {
    let env = run.env;
    let started = Instant::now();
    let (store, listings) = clean_and_list(run)?;
    // Snapshots on the drive are read through the state folder's cache (under the run lock).
    let store = if store.is_remote() {
        store
    } else {
        store.with_dedup_cache(crate::ops::backup::dedup_cache_path(&env.settings))
    };
    // Only the boot drill, only when nothing was ever there: archives that vanished (the
    // catalog knows them, now MISSING) or a damaged one still fail loudly below.
    if which.is_none()
        && trigger == Trigger::Boot
        && listings.is_empty()
        && run.catalog.archives()?.is_empty()
    {
        log::warn!("{NO_BACKUP_YET}");
        return Ok(DrillReport::nothing_yet(started.elapsed().as_secs_f64()));
    }
    let listing = crate::ops::select(&listings, which, crate::ops::Pick::Newest)?;
    let name = listing.name.clone();
    if which.is_none() && trigger == Trigger::Timer && !env.offsite {
        if let Some(why) = drilled_recently(run, &name)? {
            log::info!("{why}");
            let mut r = DrillReport::nothing_yet(started.elapsed().as_secs_f64());
            (r.archive, r.nothing_to_drill) = (name, Some(why));
            return Ok(r);
        }
    }
    let identities =
        std::sync::Arc::new(crate::keys::load_identities(env.settings.encryption.identity.as_deref())?);
    let identity_path = env.settings.encryption.identity.clone().unwrap_or_default();

    let scratch = prepare_scratch(env, run.id)?;
    let _cleanup = Cleanup(scratch.clone());

    let plan = ExtractPlan {
        durable: false,
        room_hint: "set drill.scratch_dir to a folder with more room (the drill extracts there)",
        ..ExtractPlan::into_dir(&scratch)
    };
    let read = |plan: &ExtractPlan| {
        read_archive(&store, listing, &identities, &identity_path, Some(plan), &*env.progress)
    };
    // No manifest (or a damaged one): the read says what is wrong.
    let db_path = match listing.manifest.as_ref().and_then(|m| m.database.as_ref()) {
        Some(db) => {
            let entry = crate::manifest::unescape_path(&db.entry).map_err(|e| Error::integrity(&name, e))?;
            Some(scratch.join(std::ffi::OsStr::from_bytes(&entry)))
        }
        None => None,
    };
    let read = settle_as_written(plan, AfterWrite::Discard, |plan| match &db_path {
        Some(db_path) => {
            read_and_check(plan, db_path, &env.settings.drill.checks, read).map(|(r, c)| (r, Some(c)))
        }
        None => read(&plan).map(|r| (r, None)),
    });
    let (report, db_checks) = read.inspect_err(|e| {
        // Only what the archive is to blame for fails the drill: no room for the scratch
        // folder or a cancelled run says nothing about whether the backup restores.
        // A wrong key too: the owner must hear that this drill failed (the catalog's
        // failed_checks does not count it against the archive).
        if let Error::Integrity { .. } = e {
            // Marked, so that retention does not take a damaged offsite copy for the drive's.
            let from =
                if env.offsite { format!("{FROM_OFFSITE}{}", store.location()) } else { String::new() };
            let _ = run.catalog.record_event(
                Some(run.id),
                now(),
                Event::DrillFailed,
                Some(&name),
                &format!("{e}{from}"),
            );
        }
    })?;
    let checks = checks_after_extraction(&report, db_checks);

    let passed = checks.iter().all(|c| c.ok);
    let secs = started.elapsed().as_secs_f64();
    // A failure says which check and what it found (list, status and audit show this).
    let failed: Vec<String> =
        checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect();
    let detail = format!(
        "{}{} checks, recovery time {secs:.1} s{}",
        if failed.is_empty() { String::new() } else { format!("failed {}; ", failed.join("; ")) },
        checks.len(),
        if env.offsite { format!("{FROM_OFFSITE}{}", store.location()) } else { String::new() }
    );
    let event = if passed { Event::DrillPassed } else { Event::DrillFailed };
    let _ = run.catalog.record_event(Some(run.id), now(), event, Some(&name), &detail);
    Ok(DrillReport {
        archive: name,
        passed,
        nothing_to_drill: None,
        checks,
        files: report.files,
        bytes: report.plain_bytes,
        recovery_seconds: secs,
    })
}

/// The drill's checks once the backup is extracted (decryption, every byte and the sizes
/// were checked on the way), then the database's (`integrity_check` and the configured SQL
/// checks, `None` when the backup holds no database).
fn checks_after_extraction(report: &ReadReport, db_checks: Option<Vec<Check>>) -> Vec<Check> {
    use crate::config::StoreFormat;
    let (read, content) = match report.format {
        StoreFormat::Archives => {
            ("archive SHA-256 matches its manifest", "match the inner manifest (SHA-256 of each file)")
        }
        StoreFormat::Snapshots => (
            "tree and refs match the manifest",
            "match their chunks' keyed hashes; the database its SHA-256 in the manifest",
        ),
    };
    let mut checks = vec![
        Check {
            name: "decrypt and extract".into(),
            ok: true,
            detail: format!("{} entries; {read}", report.entries),
        },
        Check {
            name: "file hashes".into(),
            ok: true,
            detail: format!("{} files, {} bytes {content}", report.files, report.plain_bytes),
        },
    ];
    match db_checks {
        Some(c) => checks.extend(c),
        None => checks.push(Check {
            name: "database".into(),
            ok: false,
            detail: "the archive holds no database snapshot".into(),
        }),
    }
    checks
}

/// Prefix of the folders drills extract into, inside the scratch folder.
const RUN_PREFIX: &str = "datavault-drill-";

/// A fresh private folder for this drill in the scratch folder, after removing what killed
/// drills left there (plaintext: never left lying around). Only our own names are removed:
/// scratch_dir may be a shared folder such as /var/tmp. The default scratch folder is on
/// the drive, where anyone with the drive could have put a link: it must be a real folder.
fn prepare_scratch(env: &Env, run_id: i64) -> Result<PathBuf> {
    let settings = &env.settings;
    let root = scratch_root(env);
    let default = settings.drill.scratch_dir.is_none();
    if default && std::fs::symlink_metadata(&root).is_ok_and(|m| !m.is_dir()) {
        return Err(Error::target(
            &root,
            "the drill scratch folder on the drive is a link or a file, not a folder; remove it (datavault never extracts through a link)",
        ));
    }
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            // `run-*`: what datavault 0.1 named them, only in its own default folder.
            if n.starts_with(RUN_PREFIX) || (default && n.starts_with("run-")) {
                remove_tree(&e.path());
            }
        }
    }
    std::fs::create_dir_all(&root).map_err(|e| {
        Error::target(&root, format!("cannot create the drill scratch folder: {e}; set drill.scratch_dir"))
    })?;
    let scratch = root.join(format!("{RUN_PREFIX}{run_id}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&scratch)
        .map_err(|e| Error::target(&scratch, format!("cannot create the drill scratch folder: {e}")))?;
    Ok(scratch)
}

/// Where a drill extracts: `drill.scratch_dir`, else the drive. A drill `--offsite` without
/// the drive (a new Pi, the drive lost) extracts into `drill-scratch` in the state folder:
/// it needs room for one restored copy there.
fn scratch_root(env: &Env) -> PathBuf {
    let s = &env.settings;
    if env.offsite
        && s.drill.scratch_dir.is_none()
        && crate::target::require_readable(&s.target, &env.system_root).is_err()
    {
        return s.state.dir.join("drill-scratch");
    }
    s.drill.scratch_dir(&s.target)
}

/// Read a backup with `plan` (`read`: `read_archive` with its arguments) and check the
/// database that lands at `database`, on a thread of its own that starts as soon as the
/// extraction has written that file. A backup holds its database first (`db/` sorts before
/// `uploads/`), so `integrity_check` and the SQL checks run while the uploads are still being
/// written rather than after them: on a backup of 105 MB of database and 420 MB of uploads
/// that took 0.3 s off a 1.6 s drill. Nothing is concluded before `read` has succeeded (the
/// checks' result is only looked at then); if the file never came, they run afterwards.
pub fn read_and_check(
    mut plan: ExtractPlan,
    database: &Path,
    sql_checks: &[String],
    read: impl FnOnce(&ExtractPlan) -> Result<ReadReport>,
) -> Result<(ReadReport, Vec<Check>)> {
    let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
    plan.database_written = Some(tx);
    std::thread::scope(|scope| {
        // A crafted backup may hold other files under db/: only the one the manifest names.
        let early =
            std::thread::Builder::new().name("datavault-check".into()).spawn_scoped(scope, move || {
                rx.iter().find(|p| p == database).map(|p| check_database(&p, sql_checks))
            });
        let report = read(&plan);
        drop(plan); // hangs up: a checker still waiting stops
        let early = early.ok().and_then(|h| h.join().ok().flatten());
        let report = report?;
        let checks = early.unwrap_or_else(|| check_database(database, sql_checks));
        Ok((report, checks))
    })
}

/// `integrity_check` plus the configured SQL checks, on a restored database copy.
pub fn check_database(db_path: &Path, sql_checks: &[String]) -> Vec<Check> {
    let mut checks = Vec::new();
    // Read-write only so that SQLite may open a WAL database without its -shm; query_only
    // makes every check read-only: a check that writes (a DELETE ... RETURNING 1) must not
    // change the database an in-place restore is about to swap in (red team #7).
    let conn = Connection::open_with_flags(db_path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .and_then(|c| c.pragma_update(None, "query_only", true).map(|_| c));
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            checks.push(Check { name: "open database".into(), ok: false, detail: e.to_string() });
            return checks;
        }
    };
    let integrity: std::result::Result<Vec<String>, _> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect());
    checks.push(match integrity {
        Ok(rows) if rows == ["ok"] => Check { name: "integrity_check".into(), ok: true, detail: "ok".into() },
        Ok(rows) => Check {
            name: "integrity_check".into(),
            ok: false,
            detail: rows.into_iter().take(5).collect::<Vec<_>>().join("; "),
        },
        Err(e) => Check { name: "integrity_check".into(), ok: false, detail: e.to_string() },
    });
    for sql in sql_checks {
        let res = conn.query_row(sql, [], |r| r.get::<_, rusqlite::types::Value>(0));
        checks.push(match res {
            Ok(v) => {
                let ok = truthy(&v);
                Check {
                    name: sql.clone(),
                    ok,
                    detail: if ok { "true".into() } else { format!("returned {v:?}") },
                }
            }
            Err(e) => Check { name: sql.clone(), ok: false, detail: e.to_string() },
        });
    }
    checks
}

fn truthy(v: &rusqlite::types::Value) -> bool {
    use rusqlite::types::Value;
    match v {
        Value::Null => false,
        Value::Integer(i) => *i != 0,
        Value::Real(f) => *f != 0.0,
        Value::Text(t) => !t.is_empty() && t != "0",
        Value::Blob(b) => !b.is_empty(),
    }
}

/// Scratch is plaintext: removed however the drill ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_tree(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::Sender;

    fn report() -> ReadReport {
        ReadReport {
            inner: crate::manifest::InnerManifest {
                format: crate::manifest::FORMAT_VERSION,
                created: chrono::Utc::now(),
                entries: Vec::new(),
            },
            archive_sha256: String::new(),
            archive_bytes: 0,
            entries: 0,
            files: 0,
            plain_bytes: 0,
            format: crate::config::StoreFormat::Snapshots,
            damaged_files: Vec::new(),
        }
    }

    fn database(path: &Path, rows: i64) {
        let c = Connection::open(path).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x);").unwrap();
        for i in 0..rows {
            c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
    }

    fn tell(plan: &ExtractPlan) -> &Sender<PathBuf> {
        plan.database_written.as_ref().expect("read_and_check listens")
    }

    #[test]
    fn the_database_named_is_checked_as_soon_as_it_is_written_and_a_decoy_is_not() {
        let d = tempfile::tempdir().unwrap();
        let (db, decoy) = (d.path().join("db/app.db"), d.path().join("db/other.db"));
        std::fs::create_dir(d.path().join("db")).unwrap();
        let checks = vec!["SELECT count(*) = 3 FROM t".to_string()];
        let (_, got) = read_and_check(ExtractPlan::into_dir(d.path()), &db, &checks, |plan| {
            // A crafted backup's other db/ file comes first: not the one the manifest names.
            std::fs::write(&decoy, b"not a database").unwrap();
            tell(plan).send(decoy.clone()).unwrap();
            database(&db, 3);
            tell(plan).send(db.clone()).unwrap();
            Ok(report())
        })
        .unwrap();
        let names: Vec<_> = got.iter().map(|c| (c.name.as_str(), c.ok)).collect();
        assert_eq!(names, [("integrity_check", true), (checks[0].as_str(), true)], "{got:?}");
    }

    #[test]
    fn a_failed_read_is_the_answer_and_a_database_never_announced_is_checked_afterwards() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("app.db");
        let e = read_and_check(ExtractPlan::into_dir(d.path()), &db, &[], |plan| {
            database(&db, 1);
            tell(plan).send(db.clone()).unwrap();
            Err(Error::integrity("b", "damaged halfway"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("damaged halfway"), "{e}");
        // Written without a word (or the checker could not start): checked once read returns.
        std::fs::remove_file(&db).unwrap();
        let (_, got) = read_and_check(ExtractPlan::into_dir(d.path()), &db, &[], |_| {
            database(&db, 2);
            Ok(report())
        })
        .unwrap();
        assert!(got.iter().all(|c| c.ok) && got[0].name == "integrity_check", "{got:?}");
        // And a database that is not one fails its check, early or late.
        let bad = d.path().join("bad.db");
        let (_, got) = read_and_check(ExtractPlan::into_dir(d.path()), &bad, &[], |plan| {
            std::fs::write(&bad, vec![7u8; 8192]).unwrap();
            tell(plan).send(bad.clone()).unwrap();
            Ok(report())
        })
        .unwrap();
        assert!(got.iter().any(|c| !c.ok), "{got:?}");
    }
}
