//! A consistent, non-blocking snapshot of the live SQLite database.
//!
//! We read every page of the database through the `sqlite_dbpage` virtual table inside one
//! read transaction on our own read-only connection. In WAL mode a reader sees exactly the
//! state of the last transaction committed before it started, and never blocks the writer
//! (docs/facts.md: a measured 91 us worst writer latency against 14.5 ms for the backup
//! API, which also restarts on every write and never finishes under 200 tx/s).
//!
//! Why not checkpoint and copy the file, as the old script did: a checkpoint does not stop the
//! next write, and a file copy racing a checkpoint can tear. Why no temporary copy: the pages
//! stream straight into the archive, so no plaintext copy of the database is ever written.
//!
//! Keep the read transaction short: while it is open the WAL cannot be checkpointed past it
//! and grows. We never force RESTART/TRUNCATE checkpoints.
//!
//! **The catch-up checkpoint.** Whatever the application committed while our read
//! transaction pinned the WAL piles up there (a 1 GB database read in 4 s at 200 tx/s: tens of
//! MB). The first checkpoint after we let go copies all of it, and SQLite runs that checkpoint
//! inside the application's next commit (its auto-checkpoint): measured here, a 116 ms commit
//! against 16 ms idle. So we run that checkpoint ourselves, PASSIVE (it never waits for and
//! never blocks a reader or a writer), from a connection of our own on a thread beside the
//! rest of the backup. While it holds the checkpoint lock, the application's auto-checkpoint
//! gets SQLITE_BUSY, which SQLite ignores, and its commits stay short.
//!
//! **And its fsync.** SQLite syncs the database file at the end of a checkpoint only if that
//! checkpoint reached the end of the WAL; the application commits during ours, so ours never
//! does, and the tens of MB it wrote stay dirty in the page cache until the application's next
//! auto-checkpoint reaches the end and syncs them inside one of its commits (measured: 43 ms,
//! 102 ms under strace, against 8 ms idle). So before checkpointing we pin the WAL with a read
//! transaction on a second connection, at the frame the checkpoint will reach; while it is
//! held the application's auto-checkpoints find nothing left to copy below it and return
//! without syncing; we sync the database file ourselves, then let go. The application's next
//! checkpoint copies and syncs only what it committed meanwhile.

use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, Result};

/// What the snapshot is of: the figures that go into the manifest.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub page_size: u64,
    pub page_count: u64,
    pub schema_version: i64,
    pub user_version: i64,
    pub journal_mode: String,
}

impl SnapshotInfo {
    pub fn size(&self) -> u64 {
        self.page_size * self.page_count
    }
}

/// Open the application's database for a snapshot: read-only, never creating it.
pub fn open(path: &Path) -> Result<Connection> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::source(path, "database not found; check source.database in the config"))
        }
        Err(e) => return Err(Error::source(path, format!("cannot read the database: {e}"))),
        Ok(m) if !m.is_file() => {
            return Err(Error::source(
                path,
                "is not a regular file; source.database must name the SQLite file",
            ))
        }
        Ok(_) => {}
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| {
        Error::source(
            path,
            format!(
                "cannot open the database: {e}; reading a WAL database needs write access to its folder \
                     (for the -shm file): check permissions, and under systemd the folder's ReadWritePaths \
                     (docs/appliance.md)"
            ),
        )
    })?;
    // A writer holding the WAL write lock does not block us; this only covers the brief
    // moments of recovery or a rollback-journal database in the middle of a commit.
    conn.busy_timeout(Duration::from_secs(30))
        .map_err(|e| Error::source(path, format!("cannot configure the connection: {e}")))?;
    Ok(conn)
}

/// Begin the read transaction the whole snapshot is taken in, and read its shape.
pub fn begin(conn: &Connection, path: &Path) -> Result<SnapshotInfo> {
    let src = |e: rusqlite::Error| classify(path, e);
    conn.execute_batch("BEGIN").map_err(src)?;
    // The first read starts the transaction: everything after sees the same committed state.
    let page_count: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0)).map_err(src)?;
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(src)?;
    let schema_version: i64 = conn.query_row("PRAGMA schema_version", [], |r| r.get(0)).map_err(src)?;
    let user_version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(src)?;
    let journal_mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).map_err(src)?;
    if journal_mode != "wal" {
        log::warn!(
            "{}: journal mode is {journal_mode}, not wal: the application's writers wait while the snapshot is read; \
             set `PRAGMA journal_mode=WAL` in the application",
            path.display()
        );
    }
    Ok(SnapshotInfo {
        page_size: page_size as u64,
        page_count: page_count as u64,
        schema_version,
        user_version,
        journal_mode,
    })
}

/// `PRAGMA quick_check` of the database as the snapshot sees it (call it between [`begin`]
/// and [`end`]): `None` when it is sound, else what SQLite found (its first lines). It reads
/// every page once: about 1 s per GB from the page cache, a full read of the file when the
/// database is bigger than the memory (which the copy then reads again). No writer waits.
pub fn quick_check(conn: &Connection, path: &Path) -> Result<Option<String>> {
    let mut st = conn.prepare("PRAGMA quick_check(5)").map_err(|e| classify(path, e))?;
    let lines = st
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>());
    match lines {
        Ok(l) if l.len() == 1 && l[0] == "ok" => Ok(None),
        Ok(l) => {
            // One line for the log and the error: the first problems, not SQLite's banner.
            let problems: Vec<&str> =
                l.iter().flat_map(|r| r.lines()).filter(|p| !p.starts_with("*** in database")).collect();
            let more = if problems.len() > 2 { ", ..." } else { "" };
            Ok(Some(format!("{}{more}", problems.iter().take(2).copied().collect::<Vec<_>>().join("; "))))
        }
        // SQLITE_CORRUPT and the like while walking the b-trees: that is the finding.
        Err(rusqlite::Error::SqliteFailure(e, msg)) if e.code == rusqlite::ErrorCode::DatabaseCorrupt => {
            Ok(Some(msg.unwrap_or_else(|| e.to_string())))
        }
        Err(e) => Err(classify(path, e)),
    }
}

/// End the read transaction (it only read, so this cannot lose anything).
pub fn end(conn: &Connection) {
    let _ = conn.execute_batch("COMMIT");
}

/// The catch-up checkpoint running on its thread; dropping it waits for the checkpoint.
pub struct CatchUp(Option<std::thread::JoinHandle<()>>);

impl Drop for CatchUp {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            let _ = t.join();
        }
    }
}

/// End the read transaction, then start the catch-up checkpoint (see the module's notes)
/// beside the rest of the backup. The connection it runs on is opened before the read
/// transaction ends: the app commits every few milliseconds, and its auto-checkpoint must not
/// get to the piled-up WAL first while ours is still opening a file.
/// Best effort: a database we may not write (its folder read-only to us), or one not in WAL
/// mode, is left as it is, with a debug line.
pub fn end_with_catch_up(conn: &Connection, path: &Path) -> CatchUp {
    // The pin only reads: the snapshot's own read-only opener.
    let prepared = checkpoint_connection(path).and_then(|c| Ok((c, open(path).map_err(|e| e.to_string())?)));
    end(conn);
    let path = path.to_path_buf();
    CatchUp(Some(std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        match prepared.and_then(|(c, pin)| catch_up(&c, &pin, &path, &mut |_| {})) {
            Ok((log, done)) => log::debug!(
                "catch-up checkpoint of {}: {done} of {log} WAL frames, synced, in {:?}",
                path.display(),
                t0.elapsed()
            ),
            Err(e) => log::debug!("catch-up checkpoint of {} not run: {e}", path.display()),
        }
    })))
}

/// Where [`catch_up`] is, for a test to act as the application in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Pinned,
    Checkpointed,
}

/// Pin the WAL at its current end with a read transaction on `pin`, checkpoint up to there
/// from `c`, sync the database file, unpin (the module's notes say why). Returns the WAL's
/// frames and those checkpointed.
fn catch_up(
    c: &Connection,
    pin: &Connection,
    path: &Path,
    at: &mut dyn FnMut(Step),
) -> std::result::Result<(i64, i64), String> {
    let e = |e: rusqlite::Error| e.to_string();
    pin.execute_batch("BEGIN").map_err(e)?;
    // The read transaction (and its mark in the WAL) starts at the first read.
    pin.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())).map_err(e)?;
    at(Step::Pinned);
    let done = c
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
        .map_err(e);
    at(Step::Checkpointed);
    let synced = done.as_ref().map_err(String::clone).and_then(|_| {
        std::fs::File::open(path)
            .and_then(|f| f.sync_data())
            .map_err(|e| format!("syncing the database: {e}"))
    });
    end(pin);
    synced?;
    done
}

/// A read-write connection that never creates the file (a read-only one cannot checkpoint),
/// for a database in WAL mode.
fn checkpoint_connection(path: &Path) -> std::result::Result<Connection, String> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| e.to_string())?;
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).map_err(|e| e.to_string())?;
    if mode != "wal" {
        return Err(format!("journal mode {mode}, not wal"));
    }
    Ok(conn)
}

fn classify(path: &Path, e: rusqlite::Error) -> Error {
    let msg = e.to_string();
    let hint = if msg.contains("not a database") || msg.contains("malformed") {
        "the database file is damaged; restore it with `datavault restore`"
    } else if msg.contains("no such table: sqlite_dbpage") {
        "this datavault build lacks SQLITE_ENABLE_DBPAGE_VTAB (see .cargo/config.toml)"
    } else if msg.contains("readonly database") && journal_exists(path) {
        // A hot rollback journal: the app died mid-transaction in rollback-journal mode, and
        // only a connection that may write can roll it back.
        "a hot rollback journal (the -journal file beside it) is waiting to be rolled back: start the app once (or open the database with sqlite3) so SQLite recovers it, then back up again"
    } else if msg.contains("locked") || msg.contains("busy") {
        "the database stayed locked for 30 s; is a long write transaction or a non-WAL writer running?"
    } else {
        "check that datavault may read the database and its -wal/-shm files"
    };
    Error::source(path, format!("{msg}; {hint}"))
}

fn journal_exists(db: &Path) -> bool {
    crate::fsutil::with_suffix(db, "-journal").exists()
}

/// A failure reading the database (not writing the archive), carried through `io::Error`
/// so the archive writer can tell a bad source from a full disk.
#[derive(Debug)]
pub struct PageReadError(pub String);

impl std::fmt::Display for PageReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reading database pages: {}", self.0)
    }
}

impl std::error::Error for PageReadError {}

fn page_err(msg: impl Into<String>) -> io::Error {
    io::Error::other(PageReadError(msg.into()))
}

/// Streams the database pages, in order, as one byte stream. Built by [`stream_pages`].
pub struct PageReader<'stmt> {
    rows: rusqlite::Rows<'stmt>,
    page: Vec<u8>,
    pos: usize,
    next_pgno: i64,
    info: SnapshotInfo,
}

/// Run `f` with a reader over every page of the snapshot begun by [`begin`].
pub fn stream_pages<T>(
    conn: &Connection,
    path: &Path,
    info: &SnapshotInfo,
    f: impl FnOnce(&mut PageReader<'_>) -> Result<T>,
) -> Result<T> {
    // No ORDER BY: sqlite_dbpage yields pages in page order, and asking SQLite to sort would
    // make it materialise the whole database in a temporary b-tree. The reader checks order.
    let mut stmt =
        conn.prepare("SELECT pgno, data FROM sqlite_dbpage('main')").map_err(|e| classify(path, e))?;
    let rows = stmt.query([]).map_err(|e| classify(path, e))?;
    let mut reader = PageReader { rows, page: Vec::new(), pos: 0, next_pgno: 1, info: info.clone() };
    f(&mut reader)
}

impl Read for PageReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.page.len() {
            let row = self.rows.next().map_err(|e| page_err(e.to_string()))?;
            let Some(row) = row else {
                if (self.next_pgno - 1) as u64 != self.info.page_count {
                    return Err(page_err(format!(
                        "database snapshot ended at page {} of {}",
                        self.next_pgno - 1,
                        self.info.page_count
                    )));
                }
                return Ok(0);
            };
            let pgno: i64 = row.get(0).map_err(|e| page_err(e.to_string()))?;
            if pgno != self.next_pgno {
                return Err(page_err(format!(
                    "database pages out of order: {pgno} after {}",
                    self.next_pgno - 1
                )));
            }
            self.next_pgno += 1;
            let page_size = self.info.page_size as usize;
            // The lock-byte page (at 1 GiB) comes back as NULL/empty: it holds no data.
            let data = match row.get_ref(1).map_err(|e| page_err(e.to_string()))? {
                rusqlite::types::ValueRef::Blob(b) => b,
                _ => &[],
            };
            if data.len() > page_size {
                return Err(page_err(format!("page {pgno} is {} bytes, not {page_size}", data.len())));
            }
            // A whole page fits: straight into the caller's buffer, one copy fewer (the
            // database is most of a second backup's bytes).
            if buf.len() >= page_size {
                buf[..data.len()].copy_from_slice(data);
                buf[data.len()..page_size].fill(0);
                return Ok(page_size);
            }
            self.page.clear();
            self.page.extend_from_slice(data);
            self.page.resize(page_size, 0);
            self.pos = 0;
        }
        let n = buf.len().min(self.page.len() - self.pos);
        buf[..n].copy_from_slice(&self.page[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catch_up_checkpoints_to_its_pin_so_the_apps_checkpoint_neither_copies_nor_syncs_until_it_lets_go()
    {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let app = Connection::open(&db).unwrap();
        app.execute_batch("PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x BLOB);")
            .unwrap();
        let commit = |n: usize| {
            for _ in 0..n {
                app.execute("INSERT INTO t VALUES (randomblob(8000))", []).unwrap();
            }
        };
        commit(40); // what piled up during the backup's read transaction
        let app_checkpoint = || -> (i64, i64) {
            app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(1)?, r.get(2)?))).unwrap()
        };
        let (c, pin) = (checkpoint_connection(&db).unwrap(), open(&db).unwrap());
        let mut seen = Vec::new();
        let (log, done) = catch_up(&c, &pin, &db, &mut |step| {
            match step {
                // The app commits while the catch-up runs...
                Step::Pinned => commit(5),
                // ...and its auto-checkpoint fires before the catch-up let go: nothing to copy
                // below the pin, so it stops short of the WAL's end and SQLite does not make it
                // sync the database file (our writes) inside the app's commit.
                Step::Checkpointed => seen.push(app_checkpoint()),
            }
        })
        .unwrap();
        assert!(done > 40 * 2 && done < log, "checkpointed to the pin, not past it: {done} of {log}");
        let (app_log, app_done) = seen[0];
        assert_eq!((app_log, app_done), (log, done), "the app's checkpoint copied nothing while pinned");
        // Let go: the app's next checkpoint takes the rest, to the end of the WAL.
        let (log2, done2) = app_checkpoint();
        assert_eq!(done2, log2, "unpinned: the app's checkpoint reaches the end");
        let n: i64 = app.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 45);
    }

    #[test]
    fn snapshot_bytes_are_a_valid_copy_of_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let w = Connection::open(&db).unwrap();
        w.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t SELECT value FROM generate_series(1, 5000);",
        )
        .unwrap_or_else(|_| {
            w.execute_batch("CREATE TABLE IF NOT EXISTS t(x);").unwrap();
            for i in 0..5000 {
                w.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
            }
        });
        let conn = open(&db).unwrap();
        let info = begin(&conn, &db).unwrap();
        assert_eq!(info.journal_mode, "wal");
        let mut bytes = Vec::new();
        stream_pages(&conn, &db, &info, |r| Ok(io::copy(r, &mut bytes).unwrap())).unwrap();
        end(&conn);
        assert_eq!(bytes.len() as u64, info.size());
        let copy = dir.path().join("copy.db");
        std::fs::write(&copy, &bytes).unwrap();
        let c = Connection::open(&copy).unwrap();
        let ok: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
        let n: i64 = c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 5000);
    }

    #[test]
    fn missing_database_is_a_source_error() {
        let e = open(Path::new("/nonexistent/app.db")).err().unwrap();
        assert_eq!(e.exit_code(), crate::error::exit::SOURCE);
    }
}
