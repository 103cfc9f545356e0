//! The two manifests of an archive and how archives are named on the target.
//!
//! * The **outer manifest** (`<archive>.json`, beside the archive on the USB drive) is the
//!   source of truth about what exists: it is written last, so an archive without one is
//!   incomplete. It records the archive file's SHA-256, so damage is found without a key.
//! * The **inner manifest** (`MANIFEST.json`, the last entry inside the encrypted tar)
//!   records every file's size and SHA-256, so a drill or restore proves each restored byte.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const FORMAT_VERSION: u32 = 1;

pub use crate::retention::ArchiveKind;
use crate::store::ARCHIVE_SUFFIX;
/// Name of the inner manifest entry inside the tar stream.
pub const INNER_MANIFEST: &str = "MANIFEST.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub tool: String,
    pub tool_version: String,
    pub kind: ArchiveKind,
    /// File name of the archive this manifest describes (not a path: the drive may be
    /// mounted elsewhere on the machine that restores).
    pub archive: String,
    pub archive_size: u64,
    pub archive_sha256: String,
    pub created: DateTime<Utc>,
    pub host: String,
    pub user: String,
    pub trigger: String,
    pub comment: Option<String>,
    pub source: SourceInfo,
    pub database: Option<DatabaseInfo>,
    pub uploads: Option<TreeInfo>,
    /// Number of regular files and symlinks in the archive (database included).
    pub files: u64,
    /// Bytes of file content before compression.
    pub plain_bytes: u64,
    pub compression: CompressionInfo,
    pub encryption: EncryptionInfo,
    pub duration_ms: u64,
    /// Upload files that changed while they were read: archived as read, listed here.
    pub changed_during_backup: Vec<String>,
    /// Things that were not archived, with why (unreadable file, special file...).
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    pub database: String,
    pub uploads: Option<String>,
}

impl SourceInfo {
    /// The configured sources, as every manifest (archive or snapshot) records them.
    pub fn of(s: &crate::config::Settings) -> SourceInfo {
        SourceInfo {
            database: s.source.database.display().to_string(),
            uploads: s.source.uploads.as_ref().map(|p| p.display().to_string()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatabaseInfo {
    /// Path inside the archive (`db/<name>`).
    pub entry: String,
    pub size: u64,
    pub sha256: String,
    pub page_size: u64,
    pub page_count: u64,
    pub schema_version: i64,
    pub user_version: i64,
    pub journal_mode: String,
    /// "dbpage" (a consistent SQLite snapshot) or "raw" (the files as found: only for a
    /// pre-restore safety copy of a database SQLite could not read).
    pub method: String,
    /// What `PRAGMA quick_check` found wrong in the live database when it was backed up
    /// (`source.check_database`): this is a faithful copy of a damaged database. On the drive,
    /// beside the archive, so that a new Pi (or a rebuilt catalog) still knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TreeInfo {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompressionInfo {
    pub algorithm: String,
    pub level: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EncryptionInfo {
    pub algorithm: String,
    pub recipients: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// The inner manifest: one record per tar entry, in tar order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InnerManifest {
    pub format: u32,
    pub created: DateTime<Utc>,
    pub entries: Vec<EntryRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntryRecord {
    /// Path inside the archive, escaped with [`escape_path`] (names need not be UTF-8).
    pub path: String,
    pub kind: EntryKind,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Reversible text form of a byte path: UTF-8 stays as is, `\` becomes `\\`, and any byte
/// that is not part of valid UTF-8 becomes `\xNN`.
pub fn escape_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The inverse of [`escape_path`]: the path's bytes. Refuses text `escape_path` never makes.
pub fn unescape_path(text: &str) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(b'x') => {
                let hex = text.get(i + 2..i + 4).ok_or_else(|| format!("bad escape in {text:?}"))?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape in {text:?}"))?);
                i += 4;
            }
            _ => return Err(format!("bad escape in {text:?}")),
        }
    }
    Ok(out)
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }

    pub fn parse(name: &str, bytes: &[u8]) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| {
            Error::integrity(name, format!("manifest is not valid ({e}); the file is damaged"))
        })?;
        if m.format > FORMAT_VERSION {
            return Err(Error::integrity(
                name,
                format!("manifest format {} is newer than this datavault understands ({FORMAT_VERSION}); upgrade datavault", m.format),
            ));
        }
        if m.archive.contains('/') || !m.archive.ends_with(ARCHIVE_SUFFIX) {
            return Err(Error::integrity(
                name,
                format!("manifest names an invalid archive file {:?}", m.archive),
            ));
        }
        if m.archive_sha256.len() != 64 || !m.archive_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::integrity(name, "manifest has no valid archive_sha256"));
        }
        if let Some(db) = &m.database {
            // The drill and the restore open this entry as the database: it must be the one
            // file in `db/`, never something elsewhere in the archive (an upload).
            let parts = unescape_path(&db.entry)
                .ok()
                .and_then(|raw| crate::archive::entry_path(&raw).ok())
                .filter(|p| p.len() == 2 && p[0] == crate::archive::TOP_DB.as_bytes());
            if parts.is_none() {
                return Err(Error::integrity(
                    name,
                    format!("manifest names the database entry {:?}; it must be db/<file name>: the manifest was tampered with", db.entry),
                ));
            }
        }
        Ok(m)
    }
}

pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_escape_reversibly_and_uniquely() {
        assert_eq!(escape_path(b"uploads/a b/c.txt"), "uploads/a b/c.txt");
        assert_eq!(escape_path(b"caf\xc3\xa9"), "café");
        assert_eq!(escape_path(b"bad\xff\\x"), "bad\\xff\\\\x");
        assert_ne!(escape_path(b"\\xff"), escape_path(b"\xff"));
        for raw in [&b"uploads/a b/c.txt"[..], b"caf\xc3\xa9", b"bad\xff\\x", b"\\xff", b"db/a\\b.db"] {
            assert_eq!(unescape_path(&escape_path(raw)).unwrap(), raw);
        }
        assert!(unescape_path("a\\q").is_err());
        assert!(unescape_path("a\\x4").is_err());
    }
}
