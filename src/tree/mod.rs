//! The app's file tree, read for a backup ([`walk`]) and written back for a drill or a restore
//! ([`extract`]), by every backup format alike.
//!
//! Root does both inside folders the app (or whoever has its user) can write to, while the
//! app may be running. So neither ever resolves a path twice: every folder is opened once,
//! relative to its parent's descriptor, with `O_NOFOLLOW`, and everything inside it is
//! done relative to that descriptor. A folder swapped for a symlink half-way through is then
//! found (`ELOOP`), never followed: the backup cannot be made to read a root-only folder for
//! the app, and a restore cannot be made to create, chown or chmod anything outside staging.
//! Path lengths no longer matter either: only each name must fit `NAME_MAX`.

pub mod extract;
pub mod walk;

use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{Mode, OFlags};

/// What a backup records about an entry besides its content, and a restore puts back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntryMeta {
    /// Permission bits (`& 0o7777`; setuid/setgid are never restored, see [`extract`]).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time: seconds since the epoch, and nanoseconds.
    pub mtime: i64,
    pub mtime_ns: u32,
}

impl EntryMeta {
    // The field types of `stat` differ between architectures: the casts are needed on some.
    #[allow(clippy::unnecessary_cast)]
    pub fn from_stat(st: &rustix::fs::Stat) -> EntryMeta {
        EntryMeta {
            mode: st.st_mode as u32 & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: st.st_mtime as i64,
            mtime_ns: st.st_mtime_nsec as u32,
        }
    }

    pub fn from_metadata(m: &std::fs::Metadata) -> EntryMeta {
        use std::os::unix::fs::MetadataExt;
        EntryMeta {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime(),
            mtime_ns: m.mtime_nsec() as u32,
        }
    }
}

/// What tells an unchanged file from a changed one without reading it (a snapshot's file
/// cache): a change of content changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
}

impl FileStat {
    #[allow(clippy::unnecessary_cast)]
    pub fn from_stat(st: &rustix::fs::Stat) -> FileStat {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        FileStat {
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime_ns: ns(st.st_ctime as i64, st.st_ctime_nsec as i64),
            inode: st.st_ino as u64,
        }
    }

    pub fn from_metadata(m: &std::fs::Metadata) -> FileStat {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        FileStat {
            size: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
            inode: m.ino(),
        }
    }
}

/// Flags for opening a folder we will work inside: never through a link.
pub(crate) const DIR: OFlags =
    OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// Open `name` in `dir` as a folder, never following a link.
pub(crate) fn open_dir(dir: impl AsFd, name: &std::ffi::CStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, DIR, Mode::empty())
}
