//! A small sample application (a WAL database plus an uploads folder) for `datavault demo`
//! and for the tests: the same shape as the reference deployment, a few hundred KiB.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use rusqlite::Connection;
use sha2::{Digest, Sha256};

use crate::error::{Context, Result};

pub struct SampleApp {
    pub root: PathBuf,
    pub database: PathBuf,
    pub uploads: PathBuf,
}

/// Create `root/data/app.db` (WAL) and `root/storage/uploads/` with nested folders, text and
/// binary files, an empty file, a non-UTF-8 name and a symlink.
pub fn create_sample_app(root: &Path) -> Result<SampleApp> {
    let data = root.join("data");
    let uploads = root.join("storage/uploads");
    fs::create_dir_all(&data).context(|| format!("cannot create {}", data.display()))?;
    fs::create_dir_all(uploads.join("candidates/2026/11")).context(|| "cannot create uploads".into())?;
    fs::create_dir_all(uploads.join("avatars")).context(|| "cannot create uploads".into())?;
    let database = data.join("app.db");
    let conn = Connection::open(&database).context(|| "cannot create the sample database".into())?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT UNIQUE, created TEXT);
         CREATE TABLE documents(id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users(id), path TEXT, sha256 TEXT, notes TEXT);
         CREATE INDEX documents_user ON documents(user_id);
         PRAGMA user_version = 3;",
    )
    .context(|| "cannot create the sample schema".into())?;
    let mut seed: u64 = 20260206;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let tx = conn.unchecked_transaction().context(|| "sample data".into())?;
    for i in 1..=300 {
        tx.execute(
            "INSERT INTO users(id, name, email, created) VALUES (?1, ?2, ?3, '2026-11-0' || (?1 % 9 + 1))",
            rusqlite::params![i, format!("User {i}"), format!("user{i}@example.org")],
        )
        .context(|| "sample data".into())?;
    }
    for i in 1..=40u64 {
        let name = format!("candidates/2026/11/cv-{i:03}.{}", if i % 3 == 0 { "pdf" } else { "txt" });
        let content: Vec<u8> = if i % 3 == 0 {
            (0..(2048 + (next() % 60000) as usize)).map(|_| next() as u8).collect()
        } else {
            format!("Curriculum vitae {i}\n").repeat(50 + (next() % 400) as usize).into_bytes()
        };
        fs::write(uploads.join(&name), &content).context(|| format!("cannot write {name}"))?;
        tx.execute(
            "INSERT INTO documents(user_id, path, sha256, notes) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![
                i as i64 % 300 + 1,
                name,
                hex::encode(Sha256::digest(&content)),
                "x".repeat((next() % 3000) as usize)
            ],
        )
        .context(|| "sample data".into())?;
    }
    tx.commit().context(|| "sample data".into())?;
    fs::write(uploads.join("avatars/empty.png"), b"").context(|| "uploads".into())?;
    fs::write(uploads.join("avatars/caf\u{e9} \u{1f600}.txt"), b"unicode name\n")
        .context(|| "uploads".into())?;
    {
        use std::os::unix::ffi::OsStrExt;
        let odd = uploads.join(std::ffi::OsStr::from_bytes(b"avatars/latin1-\xe9t\xe9.txt"));
        fs::write(odd, b"a name that is not UTF-8\n").context(|| "uploads".into())?;
    }
    symlink("candidates/2026/11/cv-001.txt", uploads.join("latest-cv.txt")).context(|| "uploads".into())?;
    drop(conn);
    Ok(SampleApp { root: root.to_path_buf(), database, uploads })
}

/// A logical fingerprint of the app's state: every table's rows in order, and every upload's
/// path, type, content and link target. Two states are equal iff fingerprints are equal.
pub fn fingerprint(database: &Path, uploads: Option<&Path>) -> Result<String> {
    let mut h = Sha256::new();
    let conn = Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .context(|| format!("cannot open {}", database.display()))?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .context(|| "cannot list tables".into())?;
    for t in tables {
        h.update(t.as_bytes());
        let mut stmt =
            conn.prepare(&format!("SELECT * FROM \"{t}\" ORDER BY rowid")).context(|| "read".into())?;
        let n = stmt.column_count();
        let mut rows = stmt.query([]).context(|| "read".into())?;
        while let Some(r) = rows.next().context(|| "read".into())? {
            for i in 0..n {
                h.update(format!("{:?}|", r.get_ref(i).context(|| "read".into())?).as_bytes());
            }
        }
    }
    if let Some(u) = uploads {
        use std::os::unix::ffi::OsStrExt;
        for e in walkdir::WalkDir::new(u).sort_by_file_name() {
            let e = e.map_err(|e| crate::error::Error::Failed(e.to_string()))?;
            h.update(e.path().strip_prefix(u).unwrap().as_os_str().as_bytes());
            if e.file_type().is_symlink() {
                h.update(fs::read_link(e.path()).context(|| "link".into())?.as_os_str().as_bytes());
            } else if e.file_type().is_file() {
                h.update(fs::read(e.path()).context(|| "read".into())?);
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}
