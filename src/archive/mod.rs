//! The archive format: a tar stream, compressed with zstd, encrypted with age.
//!
//! Layout inside the tar: `db/<name>` (the database snapshot), `uploads/...` (the uploads tree,
//! symlinks kept as links), `raw/...` (only in a pre-restore safety copy of a database SQLite
//! could not read), and `MANIFEST.json` last (every entry's size and SHA-256).
//!
//! [`write`] builds archives in one streaming pass; [`read`] verifies and extracts them
//! through [`crate::tree::extract`], the one place that decides whether an entry is safe to
//! write (its paths through [`entry_path`]).

pub mod read;
pub mod write;

use std::path::PathBuf;

/// Top-level folders an archive may contain.
pub const TOP_DB: &str = "db";
pub const TOP_UPLOADS: &str = "uploads";
pub const TOP_RAW: &str = "raw";

/// Check an entry path from a tar stream and split it into components.
///
/// Accepted: relative paths of plain components under one of the known top-level folders,
/// or exactly `MANIFEST.json`. Refused: absolute paths, `..`, `.`, empty components
/// (`a//b`), NUL bytes. The tar crate silently skips `..` entries and strips leading `/`
/// (docs/facts.md), so we decide here, before anything is written.
pub fn entry_path(raw: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let shown = crate::manifest::escape_path(raw);
    if raw.is_empty() {
        return Err("empty path".into());
    }
    if raw[0] == b'/' {
        return Err(format!("absolute path {shown}"));
    }
    if raw.contains(&0) {
        return Err(format!("path with a NUL byte {shown}"));
    }
    let trimmed = raw.strip_suffix(b"/").unwrap_or(raw);
    let mut parts = Vec::new();
    for c in trimmed.split(|&b| b == b'/') {
        match c {
            b"" => return Err(format!("path with an empty component {shown}")),
            b"." => return Err(format!("path with a '.' component {shown}")),
            b".." => return Err(format!("path escaping the destination with '..' {shown}")),
            _ => parts.push(c.to_vec()),
        }
    }
    let top = parts[0].as_slice();
    let known = top == TOP_DB.as_bytes() || top == TOP_UPLOADS.as_bytes() || top == TOP_RAW.as_bytes();
    let manifest = parts.len() == 1 && top == crate::manifest::INNER_MANIFEST.as_bytes();
    if !known && !manifest {
        return Err(format!("unexpected top-level entry {shown}"));
    }
    Ok(parts)
}

/// Join checked components onto a destination folder.
pub fn join(root: &std::path::Path, parts: &[Vec<u8>]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut p = root.to_path_buf();
    for c in parts {
        p.push(std::ffi::OsStr::from_bytes(c));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in [
            &b"/etc/passwd"[..],
            b"../x",
            b"uploads/../../x",
            b"uploads/./x",
            b"uploads//x",
            b"etc/passwd",
            b"",
            b"uploads/a\0b",
        ] {
            assert!(entry_path(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn archive_paths_are_accepted() {
        assert_eq!(entry_path(b"db/app.db").unwrap().len(), 2);
        assert_eq!(entry_path(b"uploads/").unwrap().len(), 1);
        assert_eq!(entry_path(b"uploads/a b/\xff.jpg").unwrap().len(), 3);
        assert_eq!(entry_path(b"MANIFEST.json").unwrap().len(), 1);
        assert!(entry_path(b"MANIFEST.json/x").is_err());
    }
}
