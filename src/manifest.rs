//! The two manifests of an archive and how archives are named on the target.
//!
//! * The **outer manifest** (`<archive>.json`, beside the archive on the USB drive) is the
//!   source of truth about what exists: it is written last, so an archive without one is
//!   incomplete. It records the archive file's SHA-256, so damage is found without a key.
//! * The **inner manifest** (`MANIFEST.json`, the last entry inside the encrypted tar)
//!   records every file's size and SHA-256, so a drill or restore proves each restored byte.

use std::fs;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const FORMAT_VERSION: u32 = 1;

pub use crate::retention::ArchiveKind;
pub const ARCHIVE_SUFFIX: &str = ".tar.zst.age";
pub const MANIFEST_SUFFIX: &str = ".json";
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
        Ok(m)
    }
}

/// `backup-20261123T042501.123Z` style stem for a new archive. Millisecond precision, and the
/// caller adds `-2`, `-3`... if the name is taken (two runs in the same millisecond).
pub fn archive_stem(kind: ArchiveKind, created: DateTime<Utc>) -> String {
    let prefix = match kind {
        ArchiveKind::Backup => "backup",
        ArchiveKind::PreRestore => "pre-restore",
    };
    format!("{prefix}-{}", created.format("%Y%m%dT%H%M%S%.3fZ"))
}

pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// One archive found on the target, complete or not.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The archive file name (`....tar.zst.age`).
    pub name: String,
    pub archive_path: PathBuf,
    pub manifest_path: PathBuf,
    pub manifest: Option<Manifest>,
    /// Why this archive is not usable, if it is not.
    pub problem: Option<String>,
}

impl Listing {
    pub fn is_complete(&self) -> bool {
        self.manifest.is_some() && self.problem.is_none()
    }
    pub fn created(&self) -> Option<DateTime<Utc>> {
        self.manifest.as_ref().map(|m| m.created)
    }
}

/// Every archive on the target, newest first. Only manifests and file sizes are read.
/// Archives without a manifest (a run cut off between the two renames) are listed as
/// incomplete; `*.partial` files are not listed at all.
pub fn scan_target(dir: &Path) -> Result<Vec<Listing>> {
    let rd = fs::read_dir(dir).map_err(|e| Error::target(dir, format!("cannot list archives: {e}")))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::target(dir, format!("cannot list archives: {e}")))?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else { continue };
        if !(name.starts_with("backup-") || name.starts_with("pre-restore-")) {
            continue;
        }
        if let Some(stem) = name.strip_suffix(MANIFEST_SUFFIX) {
            if stem.ends_with(ARCHIVE_SUFFIX) {
                continue; // never: manifests are <stem>.json, archives <stem>.tar.zst.age
            }
            out.push(read_listing(dir, stem));
        } else if let Some(stem) = name.strip_suffix(ARCHIVE_SUFFIX) {
            if !dir.join(format!("{stem}{MANIFEST_SUFFIX}")).exists() {
                out.push(Listing {
                    name: name.to_string(),
                    archive_path: dir.join(name),
                    manifest_path: dir.join(format!("{stem}{MANIFEST_SUFFIX}")),
                    manifest: None,
                    problem: Some("incomplete: no manifest (the run that wrote it was interrupted)".into()),
                });
            }
        }
    }
    out.sort_by(|a, b| b.created().cmp(&a.created()).then_with(|| b.name.cmp(&a.name)));
    Ok(out)
}

fn read_listing(dir: &Path, stem: &str) -> Listing {
    let name = format!("{stem}{ARCHIVE_SUFFIX}");
    let manifest_path = dir.join(format!("{stem}{MANIFEST_SUFFIX}"));
    let archive_path = dir.join(&name);
    let mut listing = Listing {
        name: name.clone(),
        archive_path,
        manifest_path: manifest_path.clone(),
        manifest: None,
        problem: None,
    };
    let bytes = match fs::read(&manifest_path) {
        Ok(b) => b,
        Err(e) => {
            listing.problem = Some(format!("cannot read manifest: {e}"));
            return listing;
        }
    };
    match Manifest::parse(&name, &bytes) {
        Err(e) => listing.problem = Some(strip_archive_prefix(&e)),
        Ok(m) => {
            if m.archive != name {
                listing.problem = Some(format!("manifest describes another archive ({})", m.archive));
            } else {
                match fs::metadata(&listing.archive_path) {
                    Err(_) => listing.problem = Some("archive file is missing".into()),
                    Ok(meta) if meta.len() != m.archive_size => {
                        listing.problem = Some(format!(
                            "archive is {} bytes, manifest says {} (truncated or damaged)",
                            meta.len(),
                            m.archive_size
                        ))
                    }
                    Ok(_) => {}
                }
            }
            listing.manifest = Some(m);
        }
    }
    listing
}

fn strip_archive_prefix(e: &Error) -> String {
    match e {
        Error::Integrity { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Find an archive by name (with or without suffix, with or without the folder), or by path.
pub fn find<'a>(listings: &'a [Listing], wanted: &str) -> Option<&'a Listing> {
    let base = Path::new(wanted).file_name().and_then(|n| n.to_str()).unwrap_or(wanted);
    let base = base.strip_suffix(MANIFEST_SUFFIX).unwrap_or(base);
    let stem = base.strip_suffix(ARCHIVE_SUFFIX).unwrap_or(base);
    listings.iter().find(|l| l.name.strip_suffix(ARCHIVE_SUFFIX) == Some(stem))
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
    }

    #[test]
    fn stems_sort_in_time_order() {
        let a = archive_stem(ArchiveKind::Backup, "2026-11-23T04:00:00.005Z".parse().unwrap());
        let b = archive_stem(ArchiveKind::Backup, "2026-11-23T04:00:00.010Z".parse().unwrap());
        assert_eq!(a, "backup-20261123T040000.005Z");
        assert!(a < b);
        assert!(archive_stem(ArchiveKind::PreRestore, Utc::now()).starts_with("pre-restore-"));
    }

    #[test]
    fn find_accepts_names_paths_and_stems() {
        let l = Listing {
            name: "backup-1.tar.zst.age".into(),
            archive_path: "/t/backup-1.tar.zst.age".into(),
            manifest_path: "/t/backup-1.json".into(),
            manifest: None,
            problem: None,
        };
        let ls = vec![l];
        for w in ["backup-1", "backup-1.tar.zst.age", "backup-1.json", "/mnt/x/backup-1.tar.zst.age"] {
            assert!(find(&ls, w).is_some(), "{w}");
        }
        assert!(find(&ls, "backup-2").is_none());
    }
}
