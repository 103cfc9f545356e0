//! Where backups live, reduced to the few operations the store needs: list, read, create
//! (visible only once committed), remove. The USB drive's folder is a [`LocalBackend`]; an
//! S3 bucket is another implementation of the same [`Backend`] trait; [`MemoryBackend`]
//! lets tests build hostile stores by hand.
//!
//! Paths are relative, `/`-separated and made by datavault (`backup-...json`,
//! `packs/ab/ab12...`); [`check_path`] refuses anything else, so a name read from a
//! manifest can never point outside the store.
//!
//! The one thing to know about [`LocalBackend`]: it never follows a symlink and never opens
//! anything but a regular file. Root runs it on a drive that anyone with the drive in their
//! hands could have prepared: a FIFO named like a manifest would hang a plain `open`, a
//! symlink to `/dev/zero` would never end, a symlinked folder would make root write or
//! delete outside the drive. Every path is resolved one component at a time from a
//! descriptor of the store's root with `O_NOFOLLOW`, and files are opened `O_NONBLOCK` and
//! checked with `fstat` before a byte is read.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::fsutil::{SteadyWriter, PARTIAL_SUFFIX};

/// A regular file (object) in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Name relative to the listed folder.
    pub name: String,
    pub size: u64,
}

/// The storage a store lives on. Implementations must be safe to call from several threads.
pub trait Backend: Send + Sync {
    /// For messages: `/mnt/datavault`, `s3://bucket/prefix`.
    fn location(&self) -> String;

    /// Regular files directly in `dir` (`""` is the top), in no particular order. Folders,
    /// symlinks and special files are not listed; a missing folder lists as empty.
    fn list(&self, dir: &str) -> io::Result<Vec<ObjectInfo>>;

    /// Size of a regular file, `None` if there is none by that name.
    fn size(&self, path: &str) -> io::Result<Option<u64>>;

    /// A whole small file; refused (`InvalidData`) if it is bigger than `max` bytes.
    fn read_small(&self, path: &str, max: u64) -> io::Result<Vec<u8>>;

    /// A streaming read of a whole file, and its size when opened.
    fn open(&self, path: &str) -> io::Result<(Box<dyn Read + Send>, u64)>;

    /// Exactly `len` bytes at `offset` (`UnexpectedEof` if the file is shorter).
    fn read_range(&self, path: &str, offset: u64, len: u64) -> io::Result<Vec<u8>>;

    /// A file opened once for many range reads: a restore takes a pack's blobs one by one, in
    /// increasing order. Each `read_range` resolves the path from the root and opens the file
    /// anew (five `openat`s and an `fstat`, for a 3 KB database chunk); one open file per
    /// pack saves those and lets the kernel see the reads as sequential. The default reads
    /// the whole file into memory: right for small test backends, wrong for real ones.
    fn open_ranges(&self, path: &str) -> io::Result<Arc<dyn RangeFile>> {
        let (mut r, len) = self.open(path)?;
        let mut bytes = Vec::with_capacity(len.min(1 << 30) as usize);
        r.read_to_end(&mut bytes)?;
        Ok(Arc::new(BytesFile(bytes)))
    }

    /// A new file at `path`, invisible until [`NewObject::commit`]; dropped uncommitted,
    /// it leaves nothing that looks complete. Missing folders are created.
    fn create(&self, path: &str) -> io::Result<Box<dyn NewObject>>;

    /// Remove a file, durably. Removing a missing file is not an error.
    fn remove(&self, path: &str) -> io::Result<()>;
}

/// A file open for range reads ([`Backend::open_ranges`]); shareable between threads.
pub trait RangeFile: Send + Sync {
    /// Exactly `len` bytes at `offset` (`UnexpectedEof` if the file is shorter).
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>>;
}

/// A whole file in memory.
struct BytesFile(Vec<u8>);

impl RangeFile for BytesFile {
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let end = offset.checked_add(len).filter(|&e| e <= self.0.len() as u64).ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "range beyond the end of the file")
        })?;
        Ok(self.0[offset as usize..end as usize].to_vec())
    }
}

/// A file being written. `commit` makes it visible under its final name, durably.
pub trait NewObject: Write + Send {
    fn commit(self: Box<Self>) -> io::Result<()>;

    /// Like `commit`, but under another path, for a file whose name is known only once its
    /// content is (a pack is named by its SHA-256 and written as it is made, not buffered).
    /// The new path's missing folders are created.
    fn commit_as(self: Box<Self>, path: &str) -> io::Result<()>;
}

/// Carried inside an `io::Error` when the drive was unmounted or replaced while we wrote to
/// it: the data went to a detached filesystem (or would land on the SD card underneath).
#[derive(Debug)]
pub struct DriveGone;

impl std::fmt::Display for DriveGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the drive was unmounted or replaced while it was being written")
    }
}

impl std::error::Error for DriveGone {}

/// Did the drive stop answering (an unplugged USB drive)? EIO, ENODEV, ENXIO, ENOENT; EROFS:
/// ext4 remounts itself read-only after such errors (the run after an unplug met it, #13).
/// Both the archive writer and the snapshot store class it as "target not ready" (3).
pub fn drive_stopped_answering(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(5) | Some(19) | Some(6) | Some(2) | Some(30))
}

/// Is this error a [`DriveGone`]?
pub fn is_drive_gone(e: &io::Error) -> bool {
    e.get_ref().map(|r| r.is::<DriveGone>()).unwrap_or(false)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Split a store path into its components, refusing anything datavault would not make:
/// empty, absolute, `.`/`..` or empty components, NUL bytes, backslashes.
pub fn check_path(path: &str) -> io::Result<Vec<&str>> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path.contains('\\')
        || path.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(invalid(format!("{path:?} is not a valid path in a backup store")));
    }
    Ok(path.split('/').collect())
}

/// `dir/name`, or `name` at the top.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

// ---- the USB drive ---------------------------------------------------------------------------

/// A folder on a local filesystem (the mounted USB drive).
pub struct LocalBackend {
    root: PathBuf,
    root_fd: OwnedFd,
    /// Device and inode of the root when opened: if the path later leads elsewhere, the drive
    /// was unmounted (or another one mounted) under us.
    root_id: (u64, u64),
    /// Written data is pushed to disk and dropped from the page cache every this many bytes
    /// (see [`SteadyWriter`]).
    flush_every: u64,
}

const READ_FLAGS: OFlags =
    OFlags::RDONLY.union(OFlags::NOFOLLOW).union(OFlags::NONBLOCK).union(OFlags::CLOEXEC);
const DIR_FLAGS: OFlags =
    OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

impl LocalBackend {
    /// Open the store's root folder (it must exist; the target checks come before this).
    pub fn open(root: &Path) -> io::Result<LocalBackend> {
        // The root itself is the admin's configured path: following a symlink there is theirs
        // to decide. Below it, nothing is followed.
        let root_fd =
            rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let st = rustix::fs::fstat(&root_fd)?;
        Ok(LocalBackend {
            root: root.to_path_buf(),
            root_fd,
            root_id: (st.st_dev as u64, st.st_ino as u64),
            flush_every: 16 << 20,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Open the folder holding `path`'s last component, creating missing folders if asked.
    fn parent_fd<'p>(&self, path: &'p str, create: bool) -> io::Result<(OwnedFd, &'p str)> {
        parent_fd(&self.root_fd, &self.root, path, create)
    }

    /// Open a regular file for reading, never following a link or blocking on a FIFO.
    fn open_regular(&self, path: &str) -> io::Result<File> {
        let (dir, name) = self.parent_fd(path, false)?;
        let fd = rustix::fs::openat(&dir, name, READ_FLAGS, Mode::empty()).map_err(|e| match e {
            rustix::io::Errno::LOOP => {
                invalid(format!("{} is a symlink; refusing to follow it", self.show(path)))
            }
            e => e.into(),
        })?;
        let file = File::from(fd);
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(invalid(format!("{} is not a regular file", self.show(path))));
        }
        Ok(file)
    }

    fn show(&self, path: &str) -> String {
        self.root.join(path).display().to_string()
    }

    fn open_local(&self, path: &str) -> io::Result<LocalFile> {
        let file = self.open_regular(path)?;
        // Packs never change once named: the size when opened is the size.
        let size = file.metadata()?.len();
        Ok(LocalFile { file, size, shown: self.show(path) })
    }

    /// Is the configured path still the folder we opened?
    pub fn still_mounted(&self) -> bool {
        same_folder(&self.root, self.root_id)
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn list(&self, dir: &str) -> io::Result<Vec<ObjectInfo>> {
        let fd = if dir.is_empty() {
            rustix::fs::openat(&self.root_fd, ".", DIR_FLAGS, Mode::empty())?
        } else {
            match self.parent_fd(&join(dir, "x"), false) {
                Ok((fd, _)) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        };
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&fd)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().to_str() else {
                log::debug!("{}: a name that is not UTF-8 is no store file; ignored", self.location());
                continue;
            };
            if name == "." || name == ".." {
                continue;
            }
            let name = name.to_string();
            match rustix::fs::statat(&fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st)
                    if rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::RegularFile =>
                {
                    out.push(ObjectInfo { name, size: st.st_size as u64 })
                }
                Ok(_) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    fn size(&self, path: &str) -> io::Result<Option<u64>> {
        let (dir, name) = match self.parent_fd(path, false) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st)
                if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile =>
            {
                Ok(Some(st.st_size as u64))
            }
            Ok(_) | Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn read_small(&self, path: &str, max: u64) -> io::Result<Vec<u8>> {
        let file = self.open_regular(path)?;
        let len = file.metadata()?.len();
        if len > max {
            return Err(invalid(format!("{} is {len} bytes, more than the {max} allowed", self.show(path))));
        }
        let mut buf = Vec::with_capacity(len as usize);
        // The size may change under us: never read more than the cap.
        (&file).take(max + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > max {
            return Err(invalid(format!("{} grew beyond the {max} bytes allowed", self.show(path))));
        }
        Ok(buf)
    }

    fn open(&self, path: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let file = self.open_regular(path)?;
        let len = file.metadata()?.len();
        Ok((Box::new(file), len))
    }

    fn read_range(&self, path: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        self.open_local(path)?.read_range(offset, len)
    }

    fn open_ranges(&self, path: &str) -> io::Result<Arc<dyn RangeFile>> {
        Ok(Arc::new(self.open_local(path)?))
    }

    fn create(&self, path: &str) -> io::Result<Box<dyn NewObject>> {
        let (dir, name) = self.parent_fd(path, true)?;
        let partial = format!("{name}{PARTIAL_SUFFIX}");
        // A partial left by a killed run is ours to replace; never write through a link.
        let _ = rustix::fs::unlinkat(&dir, partial.as_str(), AtFlags::empty());
        let fd = rustix::fs::openat(
            &dir,
            partial.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        Ok(Box::new(LocalObject {
            backend_root: self.root.clone(),
            root_id: self.root_id,
            root_fd: self.root_fd.try_clone()?,
            dir,
            name: name.to_string(),
            partial,
            writer: Some(SteadyWriter::new(File::from(fd), self.flush_every)),
        }))
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        let (dir, name) = match self.parent_fd(path, false) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) => rustix::fs::fsync(&dir).map_err(Into::into),
            Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Open the folder holding `path`'s last component below `root_fd`, one component at a time
/// and never through a link, creating missing folders if asked.
fn parent_fd<'p>(
    root_fd: &OwnedFd,
    root: &Path,
    path: &'p str,
    create: bool,
) -> io::Result<(OwnedFd, &'p str)> {
    let parts = check_path(path)?;
    let (name, dirs) = parts.split_last().expect("check_path gives at least one component");
    let mut fd = rustix::fs::openat(root_fd, ".", DIR_FLAGS, Mode::empty())?;
    for d in dirs {
        let next = match rustix::fs::openat(&fd, *d, DIR_FLAGS, Mode::empty()) {
            Err(rustix::io::Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&fd, *d, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                // The new folder's name must survive a power cut before anything in it.
                rustix::fs::fsync(&fd)?;
                rustix::fs::openat(&fd, *d, DIR_FLAGS, Mode::empty())
            }
            other => other,
        };
        fd = next.map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => invalid(format!(
                "{} is a symlink or not a folder; refusing to follow it",
                root.join(path).display()
            )),
            e => e.into(),
        })?;
    }
    Ok((fd, name))
}

fn same_folder(path: &Path, id: (u64, u64)) -> bool {
    std::fs::metadata(path).map(|m| (m.dev(), m.ino()) == id).unwrap_or(false)
}

/// A regular file of the drive, open for range reads.
struct LocalFile {
    file: File,
    size: u64,
    shown: String,
}

impl RangeFile for LocalFile {
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} is {} bytes; {len} bytes at offset {offset} are beyond its end",
                    self.shown, self.size
                ),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// A file being written on the local drive under `<name>.partial`.
struct LocalObject {
    backend_root: PathBuf,
    root_id: (u64, u64),
    /// For `commit_as`: the new path is resolved from the root like any other.
    root_fd: OwnedFd,
    dir: OwnedFd,
    name: String,
    partial: String,
    writer: Option<SteadyWriter>,
}

impl Write for LocalObject {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.as_mut().expect("open until commit").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.as_mut().expect("open until commit").flush()
    }
}

impl LocalObject {
    /// The data on disk, and the drive still the one we opened.
    fn sync_checked(&mut self) -> io::Result<()> {
        let file = self.writer.take().expect("open until commit").into_inner();
        file.sync_all()?;
        // If the drive was unmounted under us, our descriptors still lead to the detached
        // filesystem: the rename would succeed and the file be lost with it. Say so instead.
        let same_fs = file.metadata().map(|m| m.dev()).ok() == Some(self.root_id.0);
        if !same_fs || !same_folder(&self.backend_root, self.root_id) {
            return Err(io::Error::other(DriveGone));
        }
        Ok(())
    }
}

impl NewObject for LocalObject {
    fn commit(mut self: Box<Self>) -> io::Result<()> {
        self.sync_checked()?;
        rustix::fs::renameat(&self.dir, self.partial.as_str(), &self.dir, self.name.as_str())?;
        rustix::fs::fsync(&self.dir)?;
        self.partial.clear();
        Ok(())
    }

    fn commit_as(mut self: Box<Self>, path: &str) -> io::Result<()> {
        let (new_dir, new_name) = parent_fd(&self.root_fd, &self.backend_root, path, true)?;
        self.sync_checked()?;
        rustix::fs::renameat(&self.dir, self.partial.as_str(), &new_dir, new_name)?;
        // The new name first (what makes the file exist), then the old folder's entry gone.
        rustix::fs::fsync(&new_dir)?;
        self.partial.clear();
        rustix::fs::fsync(&self.dir)?;
        Ok(())
    }
}

impl Drop for LocalObject {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            let _ = rustix::fs::unlinkat(self.dir.as_fd(), self.partial.as_str(), AtFlags::empty());
        }
    }
}

// ---- in memory, for tests ----------------------------------------------------------------------

/// A store held in memory: for tests that build hostile stores byte by byte.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl MemoryBackend {
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    fn files(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every file, for tests to inspect or tamper with.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        self.files().clone()
    }

    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.files().insert(path.to_string(), bytes);
    }
}

impl Backend for MemoryBackend {
    fn location(&self) -> String {
        "memory".into()
    }

    fn list(&self, dir: &str) -> io::Result<Vec<ObjectInfo>> {
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        Ok(self
            .files()
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(&prefix)?;
                (!rest.contains('/')).then(|| ObjectInfo { name: rest.to_string(), size: v.len() as u64 })
            })
            .collect())
    }

    fn size(&self, path: &str) -> io::Result<Option<u64>> {
        check_path(path)?;
        Ok(self.files().get(path).map(|v| v.len() as u64))
    }

    fn read_small(&self, path: &str, max: u64) -> io::Result<Vec<u8>> {
        let (mut r, len) = self.open(path)?;
        if len > max {
            return Err(invalid(format!("{path} is {len} bytes, more than the {max} allowed")));
        }
        let mut v = Vec::new();
        r.read_to_end(&mut v)?;
        Ok(v)
    }

    fn open(&self, path: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        check_path(path)?;
        let bytes =
            self.files().get(path).cloned().ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let len = bytes.len() as u64;
        Ok((Box::new(io::Cursor::new(bytes)), len))
    }

    fn read_range(&self, path: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let (_, size) = self.open(path)?;
        let end = offset.checked_add(len).filter(|&e| e <= size).ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("{path}: range beyond the end"))
        })?;
        Ok(self.files()[path][offset as usize..end as usize].to_vec())
    }

    fn create(&self, path: &str) -> io::Result<Box<dyn NewObject>> {
        check_path(path)?;
        Ok(Box::new(MemoryObject { backend: self.clone(), path: path.to_string(), bytes: Vec::new() }))
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        check_path(path)?;
        self.files().remove(path);
        Ok(())
    }
}

struct MemoryObject {
    backend: MemoryBackend,
    path: String,
    bytes: Vec<u8>,
}

impl Write for MemoryObject {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl NewObject for MemoryObject {
    fn commit(self: Box<Self>) -> io::Result<()> {
        let MemoryObject { backend, path, bytes } = *self;
        backend.put(&path, bytes);
        Ok(())
    }

    fn commit_as(self: Box<Self>, path: &str) -> io::Result<()> {
        check_path(path)?;
        let MemoryObject { backend, bytes, .. } = *self;
        backend.put(path, bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(b: &dyn Backend, path: &str, bytes: &[u8]) {
        let mut o = b.create(path).unwrap();
        o.write_all(bytes).unwrap();
        o.commit().unwrap();
    }

    fn exercise(b: &dyn Backend) {
        write(b, "a.json", b"{}");
        write(b, "packs/ab/abcd", b"0123456789");
        let mut top: Vec<_> = b.list("").unwrap().into_iter().map(|o| o.name).collect();
        top.sort();
        assert_eq!(top, ["a.json"]);
        assert_eq!(b.list("packs/ab").unwrap(), [ObjectInfo { name: "abcd".into(), size: 10 }]);
        assert!(b.list("packs/zz").unwrap().is_empty());
        assert_eq!(b.read_range("packs/ab/abcd", 2, 3).unwrap(), b"234");
        assert_eq!(b.read_range("packs/ab/abcd", 8, 3).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(b.read_small("a.json", 2).unwrap(), b"{}");
        assert_eq!(b.read_small("a.json", 1).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(b.size("a.json").unwrap(), Some(2));
        assert_eq!(b.size("nope").unwrap(), None);
        // Uncommitted: nothing visible.
        {
            let mut o = b.create("b.json").unwrap();
            o.write_all(b"half").unwrap();
        }
        assert_eq!(b.size("b.json").unwrap(), None);
        // Committed under another name, in a folder that did not exist: only that name.
        let mut o = b.create("packs/tmp-1").unwrap();
        o.write_all(b"named later").unwrap();
        o.commit_as("packs/cd/cdef").unwrap();
        assert_eq!(b.read_small("packs/cd/cdef", 100).unwrap(), b"named later");
        assert_eq!(b.list("packs").unwrap(), []);
        assert!(b.create("packs/tmp-2").unwrap().commit_as("../x").is_err());
        assert_eq!(b.list("packs").unwrap(), []);
        b.remove("a.json").unwrap();
        b.remove("a.json").unwrap();
        assert_eq!(b.size("a.json").unwrap(), None);
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\\b", "a\0b"] {
            assert!(b.read_small(bad, 10).is_err(), "{bad:?}");
            assert!(b.create(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn memory_and_local_backends_behave_alike() {
        exercise(&MemoryBackend::new());
        let dir = tempfile::tempdir().unwrap();
        let local = LocalBackend::open(dir.path()).unwrap();
        exercise(&local);
        assert!(!dir.path().join("b.json.partial").exists(), "an uncommitted file leaves no partial");
    }

    #[test]
    fn the_local_backend_never_follows_links_nor_blocks_on_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"outside").unwrap();
        let b = LocalBackend::open(dir.path()).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link.json")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero.json")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("packs")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo.json"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        for p in ["link.json", "zero.json", "fifo.json", "packs/secret"] {
            let e = b.read_small(p, 1 << 20).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{p}: {e}");
            assert!(b.open(p).is_err(), "{p}");
            assert!(b.read_range(p, 0, 1).is_err(), "{p}");
        }
        assert!(b.list("").unwrap().is_empty(), "only regular files are listed");
        assert!(b.list("packs").is_err(), "a symlinked folder is refused");
        assert!(b.create("packs/new").is_err(), "never written through a symlinked folder");
        assert!(b.remove("packs/secret").is_err());
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"outside");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_replaced_root_fails_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("usb");
        std::fs::create_dir(&root).unwrap();
        let b = LocalBackend::open(&root).unwrap();
        let mut o = b.create("x").unwrap();
        o.write_all(b"data").unwrap();
        // The drive "goes away" and an empty folder (the SD card's mount point) is there instead.
        std::fs::rename(&root, dir.path().join("gone")).unwrap();
        std::fs::create_dir(&root).unwrap();
        let e = o.commit().unwrap_err();
        assert!(is_drive_gone(&e), "{e}");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0, "nothing written on the SD card");
        assert!(!b.still_mounted());
    }
}
