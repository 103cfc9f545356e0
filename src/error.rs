//! The errors a user can meet, each with the one exit code that names its class.
//!
//! Every variant's message is written for a stressed operator reading one line in a terminal
//! or in the journal: it names the thing (a path, a key, an archive) and says how to fix it.
//! The exit codes are a contract for scripts and systemd units (README, "Exit codes"):
//! a permanent misconfiguration (2) must be told apart from a missing USB drive (3) and
//! from a damaged archive (4), and a second run bumping into the lock (75, EX_TEMPFAIL)
//! is not a failure at all.

use std::path::{Path, PathBuf};

/// Exit codes, documented in the README and in `datavault --help`.
pub mod exit {
    pub const SUCCESS: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const TARGET_NOT_READY: u8 = 3;
    pub const INTEGRITY: u8 = 4;
    pub const SOURCE: u8 = 5;
    pub const LOCKED: u8 = 75;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line use.
    #[error("{0}")]
    Usage(String),

    /// The configuration file is missing, unparsable or names an impossible value.
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },

    /// A key file (identity or recipient) is missing, unreadable, badly protected or invalid.
    #[error("key {path}: {message}")]
    Key { path: PathBuf, message: String },

    /// The backup target cannot be written safely: missing, not mounted, not LUKS, full.
    #[error("target {path}: {message}")]
    TargetNotReady { path: PathBuf, message: String },

    /// An archive or manifest is damaged, truncated, tampered with, encrypted to another key
    /// or carries unsafe content; or a drill failed.
    #[error("archive {archive}: {message}")]
    Integrity { archive: String, message: String },

    /// A disk other than the target filled up or lacks room (the app's disk, while a restore
    /// stages beside the live data).
    #[error("disk {path}: {message}")]
    DiskFull { path: PathBuf, message: String },

    /// The database or the uploads folder cannot be read.
    #[error("source {path}: {message}")]
    Source { path: PathBuf, message: String },

    /// The offsite copy (S3) cannot be reached or used now: server unreachable, DNS, TLS,
    /// timeout, bucket missing, quota full, clock skew (#10). Same exit code as a missing drive.
    #[error("offsite {location}: {message}")]
    OffsiteNotReady { location: String, message: String },

    /// Another datavault run holds the lock.
    #[error(
        "another datavault run is in progress ({holder}); lock {path}. Wait for it to finish, then try again"
    )]
    Locked { path: PathBuf, holder: String },

    /// Anything else: an I/O or SQLite failure we did not foresee. Carries what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },

    /// The application's stop or start command failed, hung, or an in-place restore had to
    /// be undone: the message says what state the data is in.
    #[error("{0}")]
    Restore(String),

    /// The run was cancelled (SIGTERM to the agent); what it was writing was removed.
    #[error("{0} stopped on request (SIGTERM); what it was writing was removed")]
    Cancelled(String),

    /// The system clock cannot be trusted for what was asked (pruning by age).
    #[error("{0}")]
    Clock(String),

    /// The audit catalog could not record something it must (not a damaged file: that one
    /// is rebuilt).
    #[error("{0}")]
    Catalog(String),

    /// Anything else that failed: an internal step, the hardware, the demo.
    #[error("{0}")]
    Failed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Config { .. } | Error::Key { .. } => exit::USAGE,
            Error::TargetNotReady { .. } | Error::DiskFull { .. } | Error::OffsiteNotReady { .. } => {
                exit::TARGET_NOT_READY
            }
            Error::Integrity { .. } => exit::INTEGRITY,
            Error::Source { .. } => exit::SOURCE,
            Error::Locked { .. } => exit::LOCKED,
            Error::Io { .. }
            | Error::Sqlite { .. }
            | Error::Restore(_)
            | Error::Cancelled(_)
            | Error::Clock(_)
            | Error::Catalog(_)
            | Error::Failed(_) => exit::FAILURE,
        }
    }

    /// Short machine-readable class, used in the catalog and in `--json` output.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Usage(_) => "usage",
            Error::Config { .. } => "config",
            Error::Key { .. } => "key",
            Error::TargetNotReady { .. } => "target",
            Error::DiskFull { .. } => "disk-full",
            Error::OffsiteNotReady { .. } => "offsite",
            Error::Integrity { .. } => "integrity",
            Error::Source { .. } => "source",
            Error::Locked { .. } => "locked",
            Error::Restore(_) => "restore",
            Error::Cancelled(_) => "cancelled",
            Error::Clock(_) => "clock",
            Error::Catalog(_) => "catalog",
            Error::Io { .. } | Error::Sqlite { .. } | Error::Failed(_) => "failure",
        }
    }

    /// The same error, same class and exit code, with a note appended to its message (what
    /// was being done, what it means for the data): one way to add context, not a rebuild of
    /// each variant at every call site.
    pub fn note(self, note: impl std::fmt::Display) -> Error {
        let add = |m: String| format!("{m} ({note})");
        match self {
            Error::Usage(m) => Error::Usage(add(m)),
            Error::Config { path, message } => Error::Config { path, message: add(message) },
            Error::Key { path, message } => Error::Key { path, message: add(message) },
            Error::TargetNotReady { path, message } => Error::TargetNotReady { path, message: add(message) },
            Error::DiskFull { path, message } => Error::DiskFull { path, message: add(message) },
            Error::OffsiteNotReady { location, message } => {
                Error::OffsiteNotReady { location, message: add(message) }
            }
            Error::Integrity { archive, message } => Error::Integrity { archive, message: add(message) },
            Error::Source { path, message } => Error::Source { path, message: add(message) },
            Error::Locked { path, holder } => Error::Locked { path, holder: add(holder) },
            Error::Io { context, source } => Error::Io { context: add(context), source },
            Error::Sqlite { context, source } => Error::Sqlite { context: add(context), source },
            Error::Restore(m) => Error::Restore(add(m)),
            Error::Cancelled(m) => Error::Cancelled(add(m)),
            Error::Clock(m) => Error::Clock(add(m)),
            Error::Catalog(m) => Error::Catalog(add(m)),
            Error::Failed(m) => Error::Failed(add(m)),
        }
    }

    /// The identity given opens none of the archive's recipients: the key's fault, not the
    /// archive's (a drill or verify with it says nothing about the archive).
    pub fn is_wrong_key(&self) -> bool {
        matches!(self, Error::Integrity { message, .. } if message.starts_with(crate::catalog::WRONG_KEY))
    }

    /// A closed pipe on stdout (`datavault list | head -1`): not an error, the reader has
    /// what it wanted. `main` exits 0 on it.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }

    pub fn config(path: &Path, message: impl Into<String>) -> Self {
        Error::Config { path: path.to_path_buf(), message: message.into() }
    }
    pub fn key(path: &Path, message: impl Into<String>) -> Self {
        Error::Key { path: path.to_path_buf(), message: message.into() }
    }
    pub fn target(path: &Path, message: impl Into<String>) -> Self {
        Error::TargetNotReady { path: path.to_path_buf(), message: message.into() }
    }
    pub fn integrity(archive: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Integrity { archive: archive.into(), message: message.into() }
    }
    pub fn disk_full(path: &Path, message: impl Into<String>) -> Self {
        Error::DiskFull { path: path.to_path_buf(), message: message.into() }
    }
    pub fn source(path: &Path, message: impl Into<String>) -> Self {
        Error::Source { path: path.to_path_buf(), message: message.into() }
    }
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
    pub fn sqlite(context: impl Into<String>, source: rusqlite::Error) -> Self {
        Error::Sqlite { context: context.into(), source }
    }
}

/// Attach "what we were doing" to io and sqlite results.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

impl<T> Context<T> for std::result::Result<T, rusqlite::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::sqlite(what(), e))
    }
}

/// True when an I/O error means "the disk is full" (ENOSPC or EDQUOT).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28) | Some(122))
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_its_own_exit_code() {
        let p = Path::new("/x");
        let cases = [
            (Error::config(p, "m"), exit::USAGE),
            (Error::target(p, "m"), exit::TARGET_NOT_READY),
            (Error::integrity("a", "m"), exit::INTEGRITY),
            (
                Error::OffsiteNotReady { location: "s3://b".into(), message: "m".into() },
                exit::TARGET_NOT_READY,
            ),
            (Error::source(p, "m"), exit::SOURCE),
            (Error::Locked { path: p.into(), holder: "pid 1".into() }, exit::LOCKED),
            (Error::Failed("m".into()), exit::FAILURE),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e}");
        }
    }

    #[test]
    fn a_note_keeps_the_class() {
        let e = Error::target(Path::new("/mnt"), "full").note("nothing was changed");
        assert_eq!(e.exit_code(), exit::TARGET_NOT_READY);
        assert_eq!(e.to_string(), "target /mnt: full (nothing was changed)");
    }

    #[test]
    fn enospc_is_disk_full() {
        assert!(is_disk_full(&std::io::Error::from_raw_os_error(28)));
        assert!(!is_disk_full(&std::io::Error::from_raw_os_error(2)));
    }
}
