//! One run at a time: an exclusive `flock` on a file in the state folder.
//!
//! flock is released by the kernel when the process dies, so a run killed with -9 never
//! leaves a stale lock behind; the pid written inside is only there to name the holder.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use crate::error::{Error, Result};

/// Held for the whole run; released on drop (or by the kernel if we die).
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    pub fn acquire(path: &Path, what: &str) -> Result<RunLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::config(
                    dir,
                    format!("cannot create the state folder: {e}; check state.dir and permissions"),
                )
            })?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Never through a link: the file is truncated once locked.
            .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
            .open(path)
            .map_err(|e| {
                let why = if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                    "it is a symlink, which datavault never writes through; remove it".to_string()
                } else {
                    format!("{e}; check state.dir and permissions")
                };
                Error::config(path, format!("cannot open the lock file: {why}"))
            })?;
        if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
            return Err(Error::config(path, "the lock file is not a regular file; remove it"));
        }
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "unknown process".to_string() } else { holder.to_string() };
            return Err(Error::Locked { path: path.to_path_buf(), holder });
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "pid {} ({what})", std::process::id());
        let _ = file.flush();
        Ok(RunLock { _file: file, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Is the lock held right now (by anyone)? For `status` and `doctor`.
pub fn holder(path: &Path) -> Option<String> {
    let mut file = OpenOptions::new().read(true).open(path).ok()?;
    if flock(&file, FlockOperation::NonBlockingLockShared).is_ok() {
        let _ = flock(&file, FlockOperation::Unlock);
        return None;
    }
    let mut s = String::new();
    let _ = file.read_to_string(&mut s);
    Some(s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_fails_with_exit_75_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("datavault.lock");
        let first = RunLock::acquire(&p, "backup").unwrap();
        let e = RunLock::acquire(&p, "drill").err().expect("second run must be refused");
        assert_eq!(e.exit_code(), crate::error::exit::LOCKED);
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(holder(&p).is_some());
        drop(first);
        assert!(holder(&p).is_none());
        RunLock::acquire(&p, "drill").unwrap();
    }
}
