//! The audit catalog: a small SQLite database on the Pi (`<state dir>/catalog.db`) that records
//! every run, every archive and every notable event.
//!
//! It is an audit trail and a cache, **not** the source of truth. The truth is on the USB drive:
//! each archive sits next to its JSON manifest, and everything the catalog knows about an
//! archive can be rebuilt from those. That is why [`Catalog::sync_with_target`] exists: a fresh
//! Pi with only the USB drive imports the manifests, and an archive deleted by hand is marked
//! `MISSING` instead of being believed. Losing `catalog.db` loses history, never a backup.
//!
//! Times are stored as RFC 3339 UTC text with milliseconds (`2026-11-20T02:00:00.000Z`) so the
//! file reads well in the `sqlite3` shell and sorts as text. "Newest first" for runs and events
//! means *most recently recorded* (row id), not latest timestamp: a Pi without a battery-backed
//! clock may stamp a run in the past until NTP answers, and the audit trail must still show
//! the order in which things really happened.
//!
//! Nothing secret is stored here: only what callers pass (commands, user and host names, file
//! names, hashes, error messages). Callers must not pass key material.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use crate::error::{Context, Error, Result};
use crate::retention::ArchiveKind;

/// The schema this code reads and writes, kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 3;

/// How long a writer waits for another connection's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Version 1. Never edit once released: add a migration step and bump [`SCHEMA_VERSION`].
const SCHEMA_V1: &str = r#"
CREATE TABLE runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    command     TEXT NOT NULL,
    "trigger"   TEXT NOT NULL,
    user        TEXT NOT NULL,
    host        TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    ended_at    TEXT,
    status      TEXT NOT NULL CHECK (status IN ('RUNNING', 'SUCCESS', 'WARNING', 'FAILED')),
    error       TEXT,
    error_kind  TEXT,
    archive     TEXT
);
CREATE INDEX runs_by_command ON runs (command, id);
CREATE INDEX runs_running ON runs (status) WHERE status = 'RUNNING';

CREATE TABLE archives (
    name        TEXT NOT NULL PRIMARY KEY,
    path        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('BACKUP', 'PRE_RESTORE')),
    size        INTEGER NOT NULL CHECK (size >= 0),
    created_at  TEXT NOT NULL,
    user        TEXT NOT NULL,
    "trigger"   TEXT NOT NULL,
    comment     TEXT,
    sha256      TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('ACTIVE', 'PRUNED', 'MISSING')),
    expires_at  TEXT,
    files       INTEGER NOT NULL CHECK (files >= 0)
);
CREATE INDEX archives_by_created ON archives (created_at);
CREATE INDEX archives_by_status ON archives (status);

CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          TEXT NOT NULL,
    run_id      INTEGER REFERENCES runs (id),
    event       TEXT NOT NULL CHECK (event IN ('BACKUP_CREATED', 'SYSTEM_RESTORED', 'DRILL_PASSED',
                    'DRILL_FAILED', 'PRUNED', 'RESTORE_ROLLED_BACK', 'ARCHIVE_MISSING')),
    archive     TEXT,
    detail      TEXT NOT NULL
);
CREATE INDEX events_by_event ON events (event, id);
CREATE INDEX events_by_run ON events (run_id);
CREATE INDEX events_by_archive ON events (archive);
"#;

/// Version 2 (#15): what the owner was last told about each condition, the notifications
/// (one row per state change or backup run) and their delivery on each channel. The restore
/// condition starts at the newest restore already recorded, so upgrading announces no old one.
const SCHEMA_V2: &str = r#"
CREATE TABLE notify_state (
    condition   TEXT NOT NULL PRIMARY KEY,
    state       TEXT NOT NULL,
    since       TEXT NOT NULL,
    detail      TEXT NOT NULL
);
INSERT INTO notify_state (condition, state, since, detail)
    SELECT 'RESTORE_DONE', CAST(COALESCE(MAX(id), 0) AS TEXT), strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ''
    FROM events WHERE event IN ('SYSTEM_RESTORED', 'RESTORE_ROLLED_BACK');

CREATE TABLE notifications (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at  TEXT NOT NULL,
    event       TEXT NOT NULL,
    state       TEXT NOT NULL,
    severity    TEXT NOT NULL CHECK (severity IN ('INFO', 'WARNING', 'CRITICAL')),
    title       TEXT NOT NULL,
    body        TEXT NOT NULL
);

CREATE TABLE deliveries (
    notification_id INTEGER NOT NULL REFERENCES notifications (id),
    channel     TEXT NOT NULL CHECK (channel IN ('PING', 'NTFY', 'EMAIL')),
    status      TEXT NOT NULL CHECK (status IN ('PENDING', 'SENT', 'GAVE_UP', 'SUPERSEDED')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    sent_at     TEXT,
    last_error  TEXT,
    PRIMARY KEY (notification_id, channel)
);
CREATE INDEX deliveries_pending ON deliveries (status) WHERE status = 'PENDING';
"#;

/// Version 3: `verify` records what it found (VERIFY_PASSED, VERIFY_FAILED), and a backup a
/// live database that failed its quick_check (DATABASE_DAMAGED), so retention knows an
/// archive that failed a check (red team 2026-12-07, findings 3 and 7). SQLite cannot change a
/// CHECK constraint in place: the events table is copied into a new one, ids kept, and its
/// AUTOINCREMENT high-water mark moved over (an id once used is never given again).
const SCHEMA_V3: &str = r#"
CREATE TABLE events_v3 (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          TEXT NOT NULL,
    run_id      INTEGER REFERENCES runs (id),
    event       TEXT NOT NULL CHECK (event IN ('BACKUP_CREATED', 'SYSTEM_RESTORED', 'DRILL_PASSED',
                    'DRILL_FAILED', 'PRUNED', 'RESTORE_ROLLED_BACK', 'ARCHIVE_MISSING',
                    'VERIFY_PASSED', 'VERIFY_FAILED', 'DATABASE_DAMAGED')),
    archive     TEXT,
    detail      TEXT NOT NULL
);
INSERT INTO events_v3 (id, at, run_id, event, archive, detail)
    SELECT id, at, run_id, event, archive, detail FROM events ORDER BY id;
DELETE FROM sqlite_sequence WHERE name = 'events_v3';
UPDATE sqlite_sequence SET name = 'events_v3' WHERE name = 'events';
DROP TABLE events;
ALTER TABLE events_v3 RENAME TO events;
CREATE INDEX events_by_event ON events (event, id);
CREATE INDEX events_by_run ON events (run_id);
CREATE INDEX events_by_archive ON events (archive);
"#;

/// Gives an enum its stored text form (`as_str`, `parse`, `Display`, `ALL`).
macro_rules! stored_as_text {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// Every variant.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The text stored in the catalog (and used in `--json` output).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }

            /// Inverse of `as_str`.
            pub fn parse(s: &str) -> Option<$ty> {
                match s {
                    $($text => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// How a run ended (or that it has not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    Running,
    Success,
    Warning,
    Failed,
}

stored_as_text!(RunStatus { Running => "RUNNING", Success => "SUCCESS", Warning => "WARNING", Failed => "FAILED" });

/// Whether an archive the catalog knows of is on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ArchiveStatus {
    /// On the target, as far as the last sync or write knows.
    Active,
    /// Deleted by retention.
    Pruned,
    /// Gone from the target without datavault deleting it.
    Missing,
}

stored_as_text!(ArchiveStatus { Active => "ACTIVE", Pruned => "PRUNED", Missing => "MISSING" });

/// Things worth finding again in the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Event {
    BackupCreated,
    SystemRestored,
    DrillPassed,
    DrillFailed,
    Pruned,
    RestoreRolledBack,
    ArchiveMissing,
    /// `datavault verify` passed an archive; the detail starts with `deep:` or `shallow:`.
    VerifyPassed,
    /// `datavault verify` found an archive damaged; the detail starts with `deep:` or `shallow:`.
    VerifyFailed,
    /// The live database failed `PRAGMA quick_check` when this archive was made: it holds a
    /// faithful copy of a damaged database.
    DatabaseDamaged,
}

stored_as_text!(Event {
    BackupCreated => "BACKUP_CREATED",
    SystemRestored => "SYSTEM_RESTORED",
    DrillPassed => "DRILL_PASSED",
    DrillFailed => "DRILL_FAILED",
    Pruned => "PRUNED",
    RestoreRolledBack => "RESTORE_ROLLED_BACK",
    ArchiveMissing => "ARCHIVE_MISSING",
    VerifyPassed => "VERIFY_PASSED",
    VerifyFailed => "VERIFY_FAILED",
    DatabaseDamaged => "DATABASE_DAMAGED",
});

/// In a drill event's detail: the drill read the offsite copy, which proves nothing about the
/// drive's.
pub const FROM_OFFSITE: &str = ", from the offsite copy ";

/// In a failure's detail: the identity given opens none of the archive's recipients, which
/// says nothing about the archive ([`crate::error::Error::is_wrong_key`]).
pub const WRONG_KEY: &str = "wrong key: ";

/// How a verify event's detail starts: `verify --deep` (decrypted and hashed every file) or
/// plain `verify` (the archive file's SHA-256, or a snapshot's packs).
pub const VERIFY_DEEP: &str = "deep: ";
pub const VERIFY_SHALLOW: &str = "shallow: ";

/// One invocation of a datavault command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub command: String,
    pub trigger: String,
    pub user: String,
    pub host: String,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub status: RunStatus,
    pub error: Option<String>,
    /// [`Error::kind`] of the error that ended the run, or `"interrupted"`.
    pub error_kind: Option<String>,
    pub archive: Option<String>,
}

/// One archive, as its manifest describes it plus what the catalog knows about its fate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ArchiveRecord {
    /// File name on the target; the key.
    pub name: String,
    /// Full path when last seen.
    pub path: String,
    pub kind: ArchiveKind,
    pub size: u64,
    pub created_at: DateTime<Utc>,
    pub user: String,
    pub trigger: String,
    pub comment: Option<String>,
    pub sha256: String,
    pub status: ArchiveStatus,
    /// Retention's estimate (see [`crate::retention::Decision::expires_at`]).
    pub expires_at: Option<DateTime<Utc>>,
    pub files: u64,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventRecord {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub run_id: Option<i64>,
    pub event: Event,
    pub archive: Option<String>,
    pub detail: String,
}

/// The error text and kind given to runs found still `RUNNING` by [`Catalog::close_interrupted_runs`].
pub const INTERRUPTED: &str = "interrupted";

const RUN_COLUMNS: &str =
    r#"id, command, "trigger", user, host, started_at, ended_at, status, error, error_kind, archive"#;
const ARCHIVE_COLUMNS: &str =
    r#"name, path, kind, size, created_at, user, "trigger", comment, sha256, status, expires_at, files"#;
const EVENT_COLUMNS: &str = "id, at, run_id, event, archive, detail";

/// An open catalog. One per process; datavault's run lock keeps writers to one at a time,
/// and the busy timeout covers a concurrent reader such as `datavault status`.
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Catalog {
    /// Open the catalog at `path`, creating its directory (mode 0700) and the schema if needed.
    ///
    /// Refuses a database written by a newer datavault (higher `user_version`) and any SQLite
    /// file that has tables but no schema version: a mistyped state dir must not lead us to
    /// write into the application's own database.
    pub fn open(path: &Path) -> Result<Catalog> {
        let at = || format!("catalog {}", path.display());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)
                .context(|| format!("{}: cannot create its directory {}", at(), dir.display()))?;
        }
        let mut conn = Connection::open(path).context(|| format!("{}: cannot open it", at()))?;
        conn.busy_timeout(BUSY_TIMEOUT).context(|| format!("{}: setting the busy timeout", at()))?;
        // WAL lets `datavault status` read while a backup writes. Durability stays at the
        // default synchronous=FULL: a Pi loses power often, and an audit trail that forgets
        // the last run is worse than one that is a few milliseconds slower.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .context(|| format!("{}: cannot switch it to WAL (is it a SQLite database?)", at()))?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!("{}: journal mode is {mode}, not WAL; readers may wait for writers", at());
        }
        conn.pragma_update(None, "foreign_keys", true)
            .context(|| format!("{}: enabling foreign keys", at()))?;
        migrate(&mut conn, path)?;
        Ok(Catalog { conn, path: path.to_path_buf() })
    }

    /// Open the catalog, and if its file is damaged (a failing SD card: the very disaster the
    /// drive is there for), move it aside with a warning and start a new one. The manifests
    /// on the drive are the source of truth: the next scan imports every archive again; only
    /// the history of runs starts over (the damaged file is kept for inspection).
    pub fn open_or_rebuild(path: &Path) -> Result<Catalog> {
        let damage = match Catalog::open(path) {
            // A full or failing SD card is exactly when a backup to the USB drive matters
            // most: run with a catalog in memory, and say that this run goes unrecorded.
            Err(Error::Sqlite { source, .. }) if is_unwritable(&source) => {
                log::warn!(
                    "catalog {}: cannot be written ({source}): this run is not recorded in the catalog; free space on the SD card (the state folder's disk)",
                    path.display()
                );
                return Catalog::in_memory(path);
            }
            Ok(c) => match c.conn.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)) {
                Ok(ok) if ok == "ok" => return Ok(c),
                Ok(problem) => problem,
                Err(e) if is_damage(&e) => e.to_string(),
                Err(e) => return Err(Error::sqlite(c.what("checking it"), e)),
            },
            Err(Error::Sqlite { source, .. }) if is_damage(&source) => source.to_string(),
            Err(e) => return Err(e),
        };
        let aside = format!("{}.damaged-{}", path.display(), Utc::now().format("%Y%m%dT%H%M%SZ"));
        for suffix in ["", "-wal", "-shm"] {
            let from = format!("{}{suffix}", path.display());
            if std::path::Path::new(&from).exists() {
                std::fs::rename(&from, format!("{aside}{suffix}"))
                    .context(|| format!("catalog {}: cannot move the damaged file aside", path.display()))?;
            }
        }
        log::warn!(
            "catalog {} is damaged ({damage}); moved aside to {aside}: a new one is rebuilt from the manifests on the drive",
            path.display()
        );
        Catalog::open(path)
    }

    /// A catalog in memory, standing in for the one at `path` for a single run.
    fn in_memory(path: &Path) -> Result<Catalog> {
        let mut conn = Connection::open_in_memory().context(|| "opening a catalog in memory".into())?;
        migrate(&mut conn, path)?;
        Ok(Catalog { conn, path: path.to_path_buf() })
    }

    /// Where this catalog lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn what(&self, doing: impl std::fmt::Display) -> String {
        format!("catalog {}: {doing}", self.path.display())
    }

    /// Record the start of a run; returns its id for [`Catalog::end_run`].
    pub fn begin_run(
        &self,
        command: &str,
        trigger: &str,
        user: &str,
        host: &str,
        at: DateTime<Utc>,
    ) -> Result<i64> {
        self.conn
            .execute(
                r#"INSERT INTO runs (command, "trigger", user, host, started_at, status)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6)"#,
                params![command, trigger, user, host, ts(at), RunStatus::Running.as_str()],
            )
            .context(|| self.what(format!("recording the start of `{command}`")))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Record how a run ended: the error's message ([`Error`]'s `Display`) and [`Error::kind`].
    pub fn end_run(
        &self,
        id: i64,
        at: DateTime<Utc>,
        status: RunStatus,
        error: Option<&crate::ops::RunError>,
        archive: Option<&str>,
    ) -> Result<()> {
        let changed = self
            .conn
            .execute(
                "UPDATE runs SET ended_at = ?2, status = ?3, error = ?4, error_kind = ?5, archive = ?6
                 WHERE id = ?1",
                params![
                    id,
                    ts(at),
                    status.as_str(),
                    error.map(|e| e.message.as_str()),
                    error.map(|e| e.kind),
                    archive
                ],
            )
            .context(|| self.what(format!("recording the end of run {id}")))?;
        if changed == 0 {
            return Err(Error::Catalog(self.what(format!("no run with id {id} to end"))));
        }
        Ok(())
    }

    /// A run left RUNNING by a killed process is marked FAILED ("interrupted") next time;
    /// returns how many. Call it only while holding the run lock: otherwise a run that is
    /// really in progress in another process would be closed too.
    pub fn close_interrupted_runs(&self, at: DateTime<Utc>) -> Result<usize> {
        self.conn
            .execute(
                "UPDATE runs SET status = ?1, ended_at = ?2, error = ?3, error_kind = ?3 WHERE status = ?4",
                params![RunStatus::Failed.as_str(), ts(at), INTERRUPTED, RunStatus::Running.as_str()],
            )
            .context(|| self.what("closing interrupted runs"))
    }

    /// Name the archive a run is about to write, before its first byte: if the run is cut
    /// off, the next run knows the orphan it left is its own (see [`Catalog::interrupted_archives`]).
    pub fn set_run_archive(&self, id: i64, archive: &str) -> Result<()> {
        self.conn
            .execute("UPDATE runs SET archive = ?2 WHERE id = ?1", params![id, archive])
            .context(|| self.what(format!("recording the archive of run {id}")))?;
        Ok(())
    }

    /// Archives named by runs that were cut off: the only orphans (an archive without its
    /// manifest) datavault may delete. Any other orphan was not made by an interrupted run
    /// of this catalog (a manifest deleted by hand, another machine's drive): it is kept.
    pub fn interrupted_archives(&self) -> Result<std::collections::HashSet<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT archive FROM runs WHERE error_kind = ?1 AND archive IS NOT NULL")
            .context(|| self.what("reading interrupted runs"))?;
        let rows = stmt
            .query_map(params![INTERRUPTED], |r| r.get::<_, String>(0))
            .context(|| self.what("reading interrupted runs"))?;
        rows.collect::<std::result::Result<_, _>>().context(|| self.what("reading interrupted runs"))
    }

    /// Append an event to the audit trail.
    pub fn record_event(
        &self,
        run_id: Option<i64>,
        at: DateTime<Utc>,
        event: Event,
        archive: Option<&str>,
        detail: &str,
    ) -> Result<()> {
        insert_event(&self.conn, run_id, at, event, archive, detail)
            .context(|| self.what(format!("recording event {event}")))
    }

    /// Insert or replace (every field) the archive named `rec.name`.
    pub fn upsert_archive(&self, rec: &ArchiveRecord) -> Result<()> {
        upsert_archive(&self.conn, rec).context(|| self.what(format!("recording archive {}", rec.name)))
    }

    pub fn set_archive_status(&self, name: &str, status: ArchiveStatus) -> Result<()> {
        let changed = self
            .conn
            .execute("UPDATE archives SET status = ?2 WHERE name = ?1", params![name, status.as_str()])
            .context(|| self.what(format!("marking archive {name} {status}")))?;
        self.one_archive(name, changed)
    }

    pub fn set_expiry(&self, name: &str, expires_at: Option<DateTime<Utc>>) -> Result<()> {
        let changed = self
            .conn
            .execute("UPDATE archives SET expires_at = ?2 WHERE name = ?1", params![name, expires_at.map(ts)])
            .context(|| self.what(format!("setting the expiry of archive {name}")))?;
        self.one_archive(name, changed)
    }

    fn one_archive(&self, name: &str, changed: usize) -> Result<()> {
        if changed == 0 {
            return Err(Error::Catalog(
                self.what(format!("no archive named {name}; sync the catalog with the target first")),
            ));
        }
        Ok(())
    }

    /// Reconcile with what is really on the target (`present`, read from the manifests there).
    ///
    /// - present but unknown: inserted as ACTIVE (a fresh Pi with only the USB drive);
    /// - present and MISSING or PRUNED: ACTIVE again (the drive is the truth), path refreshed;
    /// - known ACTIVE but not present: MISSING, with an `ARCHIVE_MISSING` event.
    ///
    /// Other fields of known archives are left as they are. Returns (imported, missing).
    /// All or nothing: one transaction.
    pub fn sync_with_target(&self, present: &[ArchiveRecord], at: DateTime<Utc>) -> Result<(usize, usize)> {
        let doing = || self.what("syncing with the archives on the target");
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).context(doing)?;
        let known: Vec<(String, String, ArchiveStatus)> = {
            let mut stmt = tx
                .prepare("SELECT name, path, status FROM archives ORDER BY created_at DESC, name DESC")
                .context(doing)?;
            let rows =
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, text_col(r, 2, ArchiveStatus::parse)?)));
            rows.and_then(|rows| rows.collect::<rusqlite::Result<_>>()).context(doing)?
        };
        let status_of: std::collections::HashMap<&str, ArchiveStatus> =
            known.iter().map(|(name, _, status)| (name.as_str(), *status)).collect();

        let mut imported = 0;
        let mut seen = HashSet::new();
        for rec in present {
            if !seen.insert(rec.name.as_str()) {
                continue;
            }
            match status_of.get(rec.name.as_str()) {
                None => {
                    upsert_archive(&tx, &ArchiveRecord { status: ArchiveStatus::Active, ..rec.clone() })
                        .context(|| self.what(format!("importing archive {}", rec.name)))?;
                    imported += 1;
                }
                Some(_) => {
                    tx.execute(
                        "UPDATE archives SET status = ?2, path = ?3 WHERE name = ?1",
                        params![rec.name, ArchiveStatus::Active.as_str(), rec.path],
                    )
                    .context(doing)?;
                }
            }
        }

        let mut missing = 0;
        for (name, path, status) in &known {
            if *status != ArchiveStatus::Active || seen.contains(name.as_str()) {
                continue;
            }
            tx.execute(
                "UPDATE archives SET status = ?2 WHERE name = ?1",
                params![name, ArchiveStatus::Missing.as_str()],
            )
            .context(doing)?;
            let detail = format!("not on the target any more; it was at {path}");
            insert_event(&tx, None, at, Event::ArchiveMissing, Some(name), &detail).context(doing)?;
            missing += 1;
        }
        tx.commit().context(doing)?;
        Ok((imported, missing))
    }

    /// The `limit` most recently started runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY id DESC LIMIT ?1");
        self.query(&sql, params![sql_limit(limit)], run_from_row).context(|| self.what("reading runs"))
    }

    /// Every archive the catalog knows of, whatever its status, newest first.
    pub fn archives(&self) -> Result<Vec<ArchiveRecord>> {
        let sql = format!("SELECT {ARCHIVE_COLUMNS} FROM archives ORDER BY created_at DESC, name DESC");
        self.query(&sql, [], archive_from_row).context(|| self.what("reading archives"))
    }

    /// The `limit` most recently recorded events, newest first.
    pub fn events(&self, limit: usize) -> Result<Vec<EventRecord>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events ORDER BY id DESC LIMIT ?1");
        self.query(&sql, params![sql_limit(limit)], event_from_row).context(|| self.what("reading events"))
    }

    /// The most recent run of `command`, optionally only one that ended with `status`.
    pub fn last_run(&self, command: &str, status: Option<RunStatus>) -> Result<Option<RunRecord>> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE command = ?1 AND (?2 IS NULL OR status = ?2)
             ORDER BY id DESC LIMIT 1"
        );
        self.conn
            .query_row(&sql, params![command, status.map(RunStatus::as_str)], run_from_row)
            .optional()
            .context(|| self.what(format!("reading the last `{command}` run")))
    }

    /// The archives on the drive that a drill or `verify` failed (or whose database was
    /// damaged when they were made) and no check at least as thorough passed since, each
    /// with what the last such failure said. Thoroughness: a drill (restores and checks the
    /// database), then `verify --deep` (decrypts and hashes every file), then `verify` (the
    /// archive file's SHA-256). A drill of the offsite copy says nothing about the drive's,
    /// nor one with the wrong key about the archive: neither is counted.
    pub fn failed_checks(&self) -> Result<std::collections::HashMap<String, String>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE archive IS NOT NULL AND event IN (?1, ?2, ?3, ?4, ?5) ORDER BY id"
        );
        let kinds = [
            Event::DrillPassed,
            Event::DrillFailed,
            Event::VerifyPassed,
            Event::VerifyFailed,
            Event::DatabaseDamaged,
        ];
        let events = self
            .query(&sql, rusqlite::params_from_iter(kinds.iter().map(|e| e.as_str())), event_from_row)
            .context(|| self.what("reading the drill and verify results"))?;
        // Per archive: the failures not yet answered by a pass as thorough, (depth, detail).
        let mut open: std::collections::HashMap<String, Vec<(u8, String)>> = Default::default();
        for e in events {
            if e.detail.contains(FROM_OFFSITE) || e.detail.contains(WRONG_KEY) {
                continue;
            }
            let depth = match e.event {
                Event::DrillPassed | Event::DrillFailed | Event::DatabaseDamaged => 3,
                _ if e.detail.starts_with(VERIFY_DEEP) => 2,
                _ => 1,
            };
            let failures = open.entry(e.archive.unwrap_or_default()).or_default();
            if matches!(e.event, Event::DrillFailed | Event::VerifyFailed | Event::DatabaseDamaged) {
                failures.push((depth, e.detail));
            } else {
                failures.retain(|(d, _)| *d > depth);
            }
        }
        Ok(open.into_iter().filter_map(|(name, f)| Some((name, f.last()?.1.clone()))).collect())
    }

    /// The archives whose last drill (of the drive's copy) passed.
    pub fn drilled(&self) -> Result<HashSet<String>> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE archive IS NOT NULL AND event IN (?1, ?2) ORDER BY id"
        );
        let events = self
            .query(&sql, params![Event::DrillPassed.as_str(), Event::DrillFailed.as_str()], event_from_row)
            .context(|| self.what("reading the drill results"))?;
        let mut passed = HashSet::new();
        for e in
            events.into_iter().filter(|e| !e.detail.contains(FROM_OFFSITE) && !e.detail.contains(WRONG_KEY))
        {
            let name = e.archive.unwrap_or_default();
            if e.event == Event::DrillPassed {
                passed.insert(name);
            } else {
                passed.remove(&name);
            }
        }
        Ok(passed)
    }

    /// The most recent event of any of the given kinds; `None` for an empty list.
    pub fn last_event(&self, events: &[Event]) -> Result<Option<EventRecord>> {
        if events.is_empty() {
            return Ok(None);
        }
        let placeholders = vec!["?"; events.len()].join(", ");
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE event IN ({placeholders}) ORDER BY id DESC LIMIT 1"
        );
        self.conn
            .query_row(&sql, rusqlite::params_from_iter(events.iter().map(|e| e.as_str())), event_from_row)
            .optional()
            .context(|| self.what("reading the last event"))
    }

    /// When the first backup was made (any archive the catalog ever knew, pruned ones too):
    /// the clock of "drill overdue" starts there when no drill has run yet (#15).
    pub fn first_backup_at(&self) -> Result<Option<DateTime<Utc>>> {
        self.conn
            .query_row("SELECT MIN(created_at) FROM archives WHERE kind = 'BACKUP'", [], |r| {
                opt_time_col(r, 0)
            })
            .context(|| self.what("reading the first backup's time"))
    }

    /// Bytes of the archives that were on the drive at `at`: made by then, and neither pruned
    /// nor found missing by then. Two of these a week apart give the drive's growth (#15).
    pub fn stored_bytes_at(&self, at: DateTime<Utc>) -> Result<u64> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT COALESCE(SUM(a.size), 0) FROM archives a WHERE a.created_at <= ?1 AND NOT EXISTS (
                     SELECT 1 FROM events e WHERE e.archive = a.name AND e.at <= ?1
                     AND e.event IN ('PRUNED', 'ARCHIVE_MISSING'))",
                params![ts(at)],
                |r| r.get(0),
            )
            .context(|| self.what("adding up the archives' sizes"))?;
        Ok(n.max(0) as u64)
    }

    /// The connection, for the notification outbox (`crate::alerts::outbox`), which keeps its
    /// own tables in this file.
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    fn query<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        f: fn(&Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Vec<T>> {
        let mut stmt = self.conn.prepare(sql)?;
        let rows = stmt.query_map(params, f)?;
        rows.collect()
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let doing = || format!("catalog {}: creating or checking the schema", path.display());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).context(doing)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).context(doing)?;
    match version {
        0 => {
            let tables: i64 = tx
                .query_row("SELECT count(*) FROM sqlite_schema WHERE type = 'table'", [], |r| r.get(0))
                .context(doing)?;
            if tables > 0 {
                return Err(Error::Catalog(format!(
                    "catalog {}: this SQLite file has tables but is not a datavault catalog; \
                     check state.dir in the config",
                    path.display()
                )));
            }
            tx.execute_batch(SCHEMA_V1).context(doing)?;
            tx.execute_batch(SCHEMA_V2).context(doing)?;
            tx.execute_batch(SCHEMA_V3).context(doing)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION).context(doing)?;
        }
        1 | 2 => {
            if version == 1 {
                tx.execute_batch(SCHEMA_V2).context(doing)?;
            }
            tx.execute_batch(SCHEMA_V3).context(doing)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION).context(doing)?;
        }
        SCHEMA_VERSION => {}
        v => {
            return Err(Error::Catalog(format!(
                "catalog {}: schema version {v} is not one this datavault understands ({SCHEMA_VERSION}); \
                 run the datavault that wrote it, or move the file aside: a new catalog is rebuilt \
                 from the manifests on the USB drive",
                path.display()
            )))
        }
    }
    tx.commit().context(doing)
}

/// The catalog's disk cannot take writes (full, read-only, failing).
fn is_unwritable(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DiskFull)
            | Some(rusqlite::ErrorCode::SystemIoFailure)
            | Some(rusqlite::ErrorCode::ReadOnly)
            | Some(rusqlite::ErrorCode::CannotOpen)
    )
}

/// SQLite's way of saying the file is not (or no longer) a database.
fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase) | Some(rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn insert_event(
    conn: &Connection,
    run_id: Option<i64>,
    at: DateTime<Utc>,
    event: Event,
    archive: Option<&str>,
    detail: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO events (at, run_id, event, archive, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![ts(at), run_id, event.as_str(), archive, detail],
    )?;
    Ok(())
}

fn upsert_archive(conn: &Connection, rec: &ArchiveRecord) -> rusqlite::Result<()> {
    conn.execute(
        r#"INSERT INTO archives (name, path, kind, size, created_at, user, "trigger", comment, sha256,
                                 status, expires_at, files)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
           ON CONFLICT (name) DO UPDATE SET
               path = excluded.path, kind = excluded.kind, size = excluded.size,
               created_at = excluded.created_at, user = excluded.user, "trigger" = excluded."trigger",
               comment = excluded.comment, sha256 = excluded.sha256, status = excluded.status,
               expires_at = excluded.expires_at, files = excluded.files"#,
        params![
            rec.name,
            rec.path,
            rec.kind.as_str(),
            to_i64(rec.size)?,
            ts(rec.created_at),
            rec.user,
            rec.trigger,
            rec.comment,
            rec.sha256,
            rec.status.as_str(),
            rec.expires_at.map(ts),
            to_i64(rec.files)?,
        ],
    )?;
    Ok(())
}

fn run_from_row(r: &Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: r.get(0)?,
        command: r.get(1)?,
        trigger: r.get(2)?,
        user: r.get(3)?,
        host: r.get(4)?,
        started_at: time_col(r, 5)?,
        ended_at: opt_time_col(r, 6)?,
        status: text_col(r, 7, RunStatus::parse)?,
        error: r.get(8)?,
        error_kind: r.get(9)?,
        archive: r.get(10)?,
    })
}

fn archive_from_row(r: &Row<'_>) -> rusqlite::Result<ArchiveRecord> {
    Ok(ArchiveRecord {
        name: r.get(0)?,
        path: r.get(1)?,
        kind: text_col(r, 2, ArchiveKind::parse)?,
        size: u64_col(r, 3)?,
        created_at: time_col(r, 4)?,
        user: r.get(5)?,
        trigger: r.get(6)?,
        comment: r.get(7)?,
        sha256: r.get(8)?,
        status: text_col(r, 9, ArchiveStatus::parse)?,
        expires_at: opt_time_col(r, 10)?,
        files: u64_col(r, 11)?,
    })
}

fn event_from_row(r: &Row<'_>) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        id: r.get(0)?,
        at: time_col(r, 1)?,
        run_id: r.get(2)?,
        event: text_col(r, 3, Event::parse)?,
        archive: r.get(4)?,
        detail: r.get(5)?,
    })
}

/// The stored form of a time: RFC 3339, UTC, milliseconds (finer precision is dropped).
pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn time_col(r: &Row<'_>, idx: usize) -> rusqlite::Result<DateTime<Utc>> {
    let text: String = r.get(idx)?;
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
}

pub(crate) fn opt_time_col(r: &Row<'_>, idx: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    match r.get_ref(idx)? {
        rusqlite::types::ValueRef::Null => Ok(None),
        _ => time_col(r, idx).map(Some),
    }
}

fn text_col<T>(r: &Row<'_>, idx: usize, parse: fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    let text: String = r.get(idx)?;
    parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, format!("unknown value {text:?}").into())
    })
}

fn u64_col(r: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(idx)?;
    u64::try_from(v).map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Integer, Box::new(e)))
}

fn to_i64(v: u64) -> rusqlite::Result<i64> {
    i64::try_from(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, d, h, 0, 0).unwrap()
    }

    fn open_in(dir: &tempfile::TempDir) -> (Catalog, PathBuf) {
        let path = dir.path().join("state").join("catalog.db");
        (Catalog::open(&path).unwrap(), path)
    }

    fn archive(name: &str, created: DateTime<Utc>) -> ArchiveRecord {
        ArchiveRecord {
            name: name.into(),
            path: format!("/mnt/datavault/{name}"),
            kind: ArchiveKind::Backup,
            size: 12_345,
            created_at: created,
            user: "root".into(),
            trigger: "timer".into(),
            comment: None,
            sha256: "ab".repeat(32),
            status: ArchiveStatus::Active,
            expires_at: None,
            files: 42,
        }
    }

    #[test]
    fn open_creates_a_private_directory_and_a_versioned_wal_database() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, path) = open_in(&dir);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        let version: i64 = cat.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let mode: String = cat.conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let busy: i64 = cat.conn.query_row("PRAGMA busy_timeout", [], |r| r.get(0)).unwrap();
        assert_eq!(busy, 5_000);
        assert_eq!(cat.path(), path);
    }

    #[test]
    fn a_run_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = open_in(&dir);
        let ok = cat.begin_run("backup", "timer", "root", "pi", at(20, 2)).unwrap();
        let started = cat.last_run("backup", None).unwrap().unwrap();
        assert_eq!(started.status, RunStatus::Running);
        assert_eq!(started.ended_at, None);

        cat.end_run(ok, at(20, 3), RunStatus::Success, None, Some("a1.age")).unwrap();
        let bad = cat.begin_run("backup", "manual", "alice", "pi", at(21, 2)).unwrap();
        let err = Error::target(Path::new("/mnt/datavault"), "not mounted; plug in the USB drive");
        cat.end_run(bad, at(21, 2), RunStatus::Failed, Some(&crate::ops::RunError::of(&err)), None).unwrap();

        let runs = cat.runs(10).unwrap();
        assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), [bad, ok]);
        assert_eq!(
            runs[1],
            RunRecord {
                id: ok,
                command: "backup".into(),
                trigger: "timer".into(),
                user: "root".into(),
                host: "pi".into(),
                started_at: at(20, 2),
                ended_at: Some(at(20, 3)),
                status: RunStatus::Success,
                error: None,
                error_kind: None,
                archive: Some("a1.age".into()),
            }
        );
        assert_eq!(
            runs[0].error.as_deref(),
            Some("target /mnt/datavault: not mounted; plug in the USB drive")
        );
        assert_eq!(runs[0].error_kind.as_deref(), Some("target"));
        assert_eq!(cat.runs(1).unwrap().len(), 1);

        assert_eq!(cat.last_run("backup", Some(RunStatus::Success)).unwrap().unwrap().id, ok);
        assert_eq!(cat.last_run("backup", None).unwrap().unwrap().id, bad);
        assert!(cat.last_run("drill", None).unwrap().is_none());
        assert!(cat.end_run(9_999, at(21, 3), RunStatus::Success, None, None).is_err());
    }

    #[test]
    fn newest_first_follows_recording_order_not_a_wrong_clock() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = open_in(&dir);
        let first = cat.begin_run("backup", "timer", "root", "pi", at(20, 2)).unwrap();
        // The Pi rebooted without network and believes it is 1970.
        let second = cat.begin_run("backup", "timer", "root", "pi", DateTime::<Utc>::UNIX_EPOCH).unwrap();
        assert_eq!(cat.runs(5).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), [second, first]);
        assert_eq!(cat.last_run("backup", None).unwrap().unwrap().id, second);
    }

    #[test]
    fn interrupted_runs_are_closed_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = open_in(&dir);
        let done = cat.begin_run("backup", "timer", "root", "pi", at(20, 2)).unwrap();
        cat.end_run(done, at(20, 3), RunStatus::Warning, None, None).unwrap();
        let killed = cat.begin_run("backup", "timer", "root", "pi", at(21, 2)).unwrap();
        cat.begin_run("drill", "timer", "root", "pi", at(21, 4)).unwrap();

        assert_eq!(cat.close_interrupted_runs(at(22, 2)).unwrap(), 2);
        assert_eq!(cat.close_interrupted_runs(at(22, 2)).unwrap(), 0);
        let run = cat.runs(10).unwrap().into_iter().find(|r| r.id == killed).unwrap();
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(run.ended_at, Some(at(22, 2)));
        assert_eq!(run.error.as_deref(), Some("interrupted"));
        assert_eq!(run.error_kind.as_deref(), Some("interrupted"));
        assert_eq!(cat.last_run("backup", Some(RunStatus::Warning)).unwrap().unwrap().id, done);
    }

    #[test]
    fn events_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = open_in(&dir);
        let run = cat.begin_run("drill", "timer", "root", "pi", at(20, 2)).unwrap();
        for (i, event) in Event::ALL.iter().enumerate() {
            cat.record_event(Some(run), at(20, 3 + i as u32), *event, Some("a1.age"), &format!("detail {i}"))
                .unwrap();
        }
        cat.record_event(None, at(20, 12), Event::DrillPassed, None, "no archive").unwrap();

        let events = cat.events(100).unwrap();
        assert_eq!(events.len(), Event::ALL.len() + 1);
        assert_eq!(events[0].event, Event::DrillPassed);
        assert_eq!((events[0].run_id, events[0].archive.as_deref()), (None, None));
        let oldest = events.last().unwrap();
        assert_eq!(
            (oldest.at, oldest.run_id, oldest.event, oldest.archive.as_deref(), oldest.detail.as_str()),
            (at(20, 3), Some(run), Event::BackupCreated, Some("a1.age"), "detail 0")
        );
        assert_eq!(cat.events(2).unwrap().len(), 2);

        let last = cat.last_event(&[Event::DrillFailed, Event::BackupCreated]).unwrap().unwrap();
        assert_eq!(last.event, Event::DrillFailed);
        assert!(cat.last_event(&[]).unwrap().is_none());
        assert_eq!(cat.last_event(&[Event::DrillPassed]).unwrap().unwrap().detail, "no archive");

        // An event must belong to a run that exists.
        assert!(cat.record_event(Some(run + 100), at(20, 13), Event::Pruned, None, "").is_err());
    }

    #[test]
    fn archives_round_trip_and_update() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = open_in(&dir);
        let mut a1 = archive("a1.age", at(19, 2));
        a1.comment = Some("before the upgrade".into());
        a1.kind = ArchiveKind::PreRestore;
        a1.size = u64::try_from(i64::MAX).unwrap();
        let a2 = archive("a2.age", at(20, 2));
        cat.upsert_archive(&a1).unwrap();
        cat.upsert_archive(&a2).unwrap();
        assert_eq!(cat.archives().unwrap(), [a2.clone(), a1.clone()]);

        a1.files = 7;
        a1.comment = None;
        cat.upsert_archive(&a1).unwrap();
        let expiry =
            Utc.with_ymd_and_hms(2027, 5, 25, 2, 0, 0).unwrap() + chrono::TimeDelta::milliseconds(250);
        cat.set_expiry("a1.age", Some(expiry)).unwrap();
        cat.set_archive_status("a2.age", ArchiveStatus::Pruned).unwrap();
        let got = cat.archives().unwrap();
        assert_eq!(got[1], ArchiveRecord { expires_at: Some(expiry), ..a1.clone() });
        assert_eq!(got[0].status, ArchiveStatus::Pruned);
        cat.set_expiry("a1.age", None).unwrap();
        assert_eq!(cat.archives().unwrap()[1].expires_at, None);

        assert!(cat.set_archive_status("nope.age", ArchiveStatus::Pruned).is_err());
        assert!(cat.set_expiry("nope.age", None).is_err());
        a1.size = u64::MAX;
        assert!(cat.upsert_archive(&a1).is_err(), "sizes beyond i64 are refused, not wrapped");
    }

    #[test]
    fn times_are_stored_as_readable_utc_text_with_milliseconds() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = open_in(&dir);
        cat.upsert_archive(&archive("a1.age", at(20, 2))).unwrap();
        let run = cat.begin_run("backup", "timer", "root", "pi", at(20, 2)).unwrap();
        let (started, created): (String, String) = cat
            .conn
            .query_row(
                "SELECT r.started_at, a.created_at FROM runs r, archives a WHERE r.id = ?1",
                [run],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(started, "2026-11-20T02:00:00.000Z");
        assert_eq!(created, "2026-11-20T02:00:00.000Z");
    }

    #[test]
    fn status_columns_refuse_unknown_values() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = open_in(&dir);
        let run = cat.begin_run("backup", "timer", "root", "pi", at(20, 2)).unwrap();
        assert!(cat.conn.execute("UPDATE runs SET status = 'DONE' WHERE id = ?1", [run]).is_err());
        cat.upsert_archive(&archive("a1.age", at(20, 2))).unwrap();
        assert!(cat.conn.execute("UPDATE archives SET status = 'GONE'", []).is_err());
        assert!(cat.conn.execute("UPDATE archives SET kind = 'FULL'", []).is_err());
        assert!(cat
            .conn
            .execute(
                "INSERT INTO events (at, event, detail) VALUES ('2026-11-20T02:00:00.000Z', 'OOPS', '')",
                []
            )
            .is_err());
        // Every value the code writes passes the CHECKs.
        for s in RunStatus::ALL {
            cat.end_run(run, at(20, 3), *s, None, None).unwrap();
        }
        for s in ArchiveStatus::ALL {
            cat.set_archive_status("a1.age", *s).unwrap();
        }
    }

    #[test]
    fn text_forms_match_serde_and_parse_back() {
        fn check<T: serde::Serialize + Copy + PartialEq + std::fmt::Debug>(
            all: &[T],
            as_str: fn(T) -> &'static str,
            parse: fn(&str) -> Option<T>,
        ) {
            for v in all {
                assert_eq!(serde_json::to_string(v).unwrap(), format!("\"{}\"", as_str(*v)));
                assert_eq!(parse(as_str(*v)), Some(*v));
            }
        }
        check(RunStatus::ALL, RunStatus::as_str, RunStatus::parse);
        check(ArchiveStatus::ALL, ArchiveStatus::as_str, ArchiveStatus::parse);
        check(Event::ALL, Event::as_str, Event::parse);
        assert_eq!(Event::RestoreRolledBack.to_string(), "RESTORE_ROLLED_BACK");
    }

    #[test]
    fn sync_imports_marks_missing_and_reactivates() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = open_in(&dir);
        let (a1, a2, a3) =
            (archive("a1.age", at(18, 2)), archive("a2.age", at(19, 2)), archive("a3.age", at(20, 2)));

        // A fresh Pi with only the USB drive: everything is imported, as ACTIVE.
        let mut from_manifest = a1.clone();
        from_manifest.status = ArchiveStatus::Missing;
        assert_eq!(cat.sync_with_target(&[from_manifest, a2.clone()], at(20, 1)).unwrap(), (2, 0));
        assert_eq!(cat.archives().unwrap(), [a2.clone(), a1.clone()]);
        assert!(cat.events(10).unwrap().is_empty());

        // a3 is written, a1 is deleted by hand, a2 was pruned by us.
        cat.upsert_archive(&a3).unwrap();
        cat.set_archive_status("a2.age", ArchiveStatus::Pruned).unwrap();
        assert_eq!(cat.sync_with_target(std::slice::from_ref(&a3), at(20, 5)).unwrap(), (0, 1));
        let status =
            |name: &str| cat.archives().unwrap().into_iter().find(|a| a.name == name).unwrap().status;
        assert_eq!(status("a1.age"), ArchiveStatus::Missing);
        assert_eq!(status("a2.age"), ArchiveStatus::Pruned, "pruned archives are expected to be gone");
        assert_eq!(status("a3.age"), ArchiveStatus::Active);
        let event = cat.last_event(&[Event::ArchiveMissing]).unwrap().unwrap();
        assert_eq!((event.archive.as_deref(), event.at, event.run_id), (Some("a1.age"), at(20, 5), None));
        assert!(event.detail.contains("/mnt/datavault/a1.age"), "{}", event.detail);

        // Missing stays missing without a second event.
        assert_eq!(cat.sync_with_target(std::slice::from_ref(&a3), at(20, 6)).unwrap(), (0, 0));
        assert_eq!(cat.events(10).unwrap().len(), 1);

        // The drive comes back (mounted elsewhere): a1 is ACTIVE again with its new path.
        let mut moved = a1.clone();
        moved.path = "/media/usb/a1.age".into();
        assert_eq!(cat.sync_with_target(&[moved, a3.clone(), a3.clone()], at(20, 7)).unwrap(), (0, 0));
        let a1_now = cat.archives().unwrap().into_iter().find(|a| a.name == "a1.age").unwrap();
        assert_eq!((a1_now.status, a1_now.path.as_str()), (ArchiveStatus::Active, "/media/usb/a1.age"));
    }

    #[test]
    fn reopening_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, path) = open_in(&dir);
        let run = cat.begin_run("backup", "timer", "root", "pi", at(20, 2)).unwrap();
        cat.upsert_archive(&archive("a1.age", at(20, 2))).unwrap();
        cat.record_event(Some(run), at(20, 3), Event::BackupCreated, Some("a1.age"), "12 KB").unwrap();
        drop(cat);

        let cat = Catalog::open(&path).unwrap();
        assert_eq!(cat.runs(10).unwrap().len(), 1);
        assert_eq!(cat.archives().unwrap().len(), 1);
        assert_eq!(cat.events(10).unwrap()[0].run_id, Some(run));
        let next = cat.begin_run("backup", "timer", "root", "pi", at(21, 2)).unwrap();
        assert!(next > run);
    }

    #[test]
    fn a_catalog_from_a_newer_datavault_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, path) = open_in(&dir);
        cat.conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        drop(cat);
        let err = Catalog::open(&path).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string())
                && err.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
            "{err}"
        );
    }

    #[test]
    fn a_version_1_catalog_is_migrated_and_no_old_restore_is_announced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            insert_event(&conn, None, at(1, 2), Event::SystemRestored, Some("backup-a"), "old").unwrap();
        }
        let cat = Catalog::open(&path).unwrap();
        let v: i64 = cat.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let told: String = cat
            .conn
            .query_row("SELECT state FROM notify_state WHERE condition = 'RESTORE_DONE'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(told, "1", "the restore made before the upgrade counts as told");
        assert_eq!(cat.events(10).unwrap().len(), 1, "the old data is kept");
    }

    #[test]
    fn a_version_2_catalog_keeps_its_events_and_their_ids_and_takes_verify_results() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(SCHEMA_V2).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            for (i, e) in [Event::BackupCreated, Event::DrillFailed, Event::Pruned].into_iter().enumerate() {
                insert_event(&conn, None, at(1, 2 + i as u32), e, Some("backup-a"), "old").unwrap();
            }
            conn.execute("DELETE FROM events WHERE event = 'PRUNED'", []).unwrap();
            let refused = insert_event(&conn, None, at(2, 0), Event::VerifyFailed, Some("backup-a"), "x");
            assert!(refused.is_err(), "version 2 refuses the new events");
        }
        let cat = Catalog::open(&path).unwrap();
        let v: i64 = cat.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let ids: Vec<i64> = cat.events(10).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(ids, [2, 1], "events and their ids are kept");
        cat.record_event(None, at(3, 0), Event::VerifyFailed, Some("backup-a"), "deep: damaged").unwrap();
        let newest = &cat.events(1).unwrap()[0];
        assert_eq!((newest.id, newest.event), (4, Event::VerifyFailed), "ids are never reused");
        let indexes: i64 = cat
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'events'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 3);
    }

    #[test]
    fn a_failed_check_stands_until_one_as_thorough_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = open_in(&dir);
        let mut t = 0;
        let mut ev = |e: Event, name: &str, detail: &str| {
            t += 1;
            cat.record_event(None, at(1, t), e, Some(name), detail).unwrap();
        };
        // a: failed its drill; a shallow and a deep verify pass after do not clear that.
        ev(Event::DrillFailed, "a", "integrity_check: page 3 is never used");
        ev(Event::VerifyPassed, "a", "shallow: SHA-256 matches");
        ev(Event::VerifyPassed, "a", "deep: 3 files");
        // b: a deep verify failed, then a drill passed.
        ev(Event::VerifyFailed, "b", "deep: file x differs");
        ev(Event::DrillPassed, "b", "5 checks");
        // c: a shallow verify failed and passed again (the file was put back).
        ev(Event::VerifyFailed, "c", "shallow: truncated");
        ev(Event::VerifyPassed, "c", "shallow: SHA-256 matches");
        // d: passed its drill, then a shallow verify failed.
        ev(Event::DrillPassed, "d", "5 checks");
        ev(Event::VerifyFailed, "d", "shallow: SHA-256 differs");
        // e: only the offsite copy failed its drill.
        ev(Event::DrillFailed, "e", &format!("damaged{FROM_OFFSITE}s3://b/p"));
        // g: a drill with the wrong identity (the key's fault, not the archive's).
        ev(Event::DrillPassed, "g", "5 checks");
        ev(Event::DrillFailed, "g", "archive g: wrong key: it was encrypted to age1...");
        let failed = cat.failed_checks().unwrap();
        let mut names: Vec<&str> = failed.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["a", "d"]);
        assert_eq!(failed["a"], "integrity_check: page 3 is never used");
        assert_eq!(failed["d"], "shallow: SHA-256 differs");
        let drilled = cat.drilled().unwrap();
        assert!(drilled.contains("b") && drilled.contains("g") && !drilled.contains("a"), "{drilled:?}");
    }

    #[test]
    fn stored_bytes_follow_creation_and_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let (cat, _) = open_in(&dir);
        let mut a = archive("backup-a", at(1, 2));
        a.size = 100;
        let mut b = archive("backup-b", at(3, 2));
        b.size = 50;
        cat.upsert_archive(&a).unwrap();
        cat.upsert_archive(&b).unwrap();
        cat.record_event(None, at(4, 2), Event::Pruned, Some("backup-a"), "old").unwrap();
        assert_eq!(cat.stored_bytes_at(at(1, 1)).unwrap(), 0);
        assert_eq!(cat.stored_bytes_at(at(2, 0)).unwrap(), 100);
        assert_eq!(cat.stored_bytes_at(at(3, 3)).unwrap(), 150);
        assert_eq!(cat.stored_bytes_at(at(5, 0)).unwrap(), 50);
        assert_eq!(cat.first_backup_at().unwrap(), Some(at(1, 2)), "pruned ones still count");
    }

    #[test]
    fn a_foreign_database_is_not_touched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY)").unwrap();
        drop(app);
        let err = Catalog::open(&path).unwrap_err().to_string();
        assert!(err.contains("app.db") && err.contains("not a datavault catalog"), "{err}");
        let app = Connection::open(&path).unwrap();
        let runs: i64 = app
            .query_row("SELECT count(*) FROM sqlite_schema WHERE name = 'runs'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(runs, 0);
    }

    #[test]
    fn errors_name_the_catalog_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        std::fs::write(&path, b"this is not a database, just some text that is long enough......").unwrap();
        let err = Catalog::open(&path).unwrap_err();
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        assert_eq!(err.kind(), "failure");

        let blocked = dir.path().join("file").join("catalog.db");
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let err = Catalog::open(&blocked).unwrap_err().to_string();
        assert!(err.contains(&blocked.display().to_string()) && err.contains("directory"), "{err}");
    }
}
