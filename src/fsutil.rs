//! Crash-safe file writing and the small I/O adapters the pipelines are built from.
//!
//! Power can be cut at any instruction on a Pi. Everything we publish is written under a
//! `*.partial` name, fsynced, renamed into place and then the directory is fsynced, so a
//! reader sees either the old state or the complete new file, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::error::{Context, Result};

/// Suffix of every file being written. A file with this suffix is never complete.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// fsync a directory, so that a rename or an unlink inside it survives a power cut. An empty
/// path is the current directory (the parent of a relative file name).
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    File::open(dir).and_then(|d| d.sync_all()).context(|| format!("cannot fsync directory {}", dir.display()))
}

/// `p` with `suffix` appended to its last component, as SQLite names a database's `-wal`,
/// `-shm` and `-journal` (bytes, not `Path::join`).
pub fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Open a file we are told to read (config, identity, marker): following a symlink is the
/// admin's choice, but it must lead to a regular file. `O_NONBLOCK` so a FIFO put there
/// cannot hang us: it is refused by the check instead.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file =
        OpenOptions::new().read(true).custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
    }
    Ok(file)
}

/// Read a small regular file whole, refusing one bigger than `max` bytes (a link to
/// `/dev/zero` or a runaway file must not eat the Pi's memory).
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let mut buf = Vec::new();
    file.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bigger than the {max} bytes allowed"),
        ));
    }
    Ok(buf)
}

/// The parent folder and the folder itself, opened for [`remove_tree`]; None when there is
/// nothing (more) to do: missing, a link or a file (unlinked here), a mount point (kept).
fn open_for_removal(path: &Path) -> Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let name = path.file_name()?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent_fd = rustix::fs::open(parent, DIR_FLAGS.difference(OFlags::NOFOLLOW), Mode::empty()).ok()?;
    let root = match rustix::fs::openat(&parent_fd, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return None,
        Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::NOTDIR) => {
            // A symlink or a file where our folder should be: remove the name only.
            if let Err(e) = rustix::fs::unlinkat(&parent_fd, name, AtFlags::empty()) {
                log::warn!("cannot remove {}: {e}", path.display());
            }
            return None;
        }
        Err(e) => {
            log::warn!("cannot remove {}: {e}", path.display());
            return None;
        }
    };
    let dev = |fd: &std::os::fd::OwnedFd| rustix::fs::fstat(fd).map(|st| st.st_dev).ok();
    if dev(&parent_fd) != dev(&root) {
        log::warn!("{} is a mount point: left alone, with what is mounted there", path.display());
        return None;
    }
    Some((parent_fd, root))
}

const DIR_FLAGS: rustix::fs::OFlags = rustix::fs::OFlags::RDONLY
    .union(rustix::fs::OFlags::DIRECTORY)
    .union(rustix::fs::OFlags::NOFOLLOW)
    .union(rustix::fs::OFlags::CLOEXEC);

/// Remove a folder datavault made (staging, scratch, set-aside data), however hostile what
/// lies there now.
///
/// Root runs this beside the app's data, where others may write. So: a symlink (or a file)
/// at `path` is unlinked, never followed; folders are opened one level at a time with
/// `O_NOFOLLOW` from their parent's descriptor, so nothing renamed under us redirects the
/// walk; and a folder on another filesystem (a mount point inside) is never entered nor
/// removed: what is mounted there is someone's data. Folders we cannot empty are left with a
/// warning. Iterative, so a hostile depth cannot overflow the stack.
pub fn remove_tree(path: &Path) {
    use rustix::fs::{AtFlags, Mode};
    let Some((parent_fd, root)) = open_for_removal(path) else { return };
    let Some(name) = path.file_name() else { return };
    let Ok(root_dev) = rustix::fs::fstat(&root).map(|st| st.st_dev) else { return };
    // One frame per folder being emptied, from the root down: its entries, its descriptor
    // (to unlink entries in it) and its name in the frame above. A hostile depth runs out of
    // descriptors long before memory: the rest is then left, with a warning.
    struct Frame {
        entries: rustix::fs::Dir,
        fd: std::os::fd::OwnedFd,
        name: std::ffi::CString,
        shown: PathBuf,
    }
    let frame = |fd: std::os::fd::OwnedFd, name: std::ffi::CString, shown: PathBuf| {
        // Writable, so that the entries of an extracted read-only folder can go.
        let _ = rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700));
        rustix::fs::Dir::read_from(&fd).ok().map(|entries| Frame { entries, fd, name, shown })
    };
    let root_name = std::ffi::CString::new(name.as_bytes()).unwrap_or_default();
    let mut kept = false;
    let mut stack: Vec<Frame> = match frame(root, root_name, path.to_path_buf()) {
        Some(f) => vec![f],
        None => {
            log::warn!("cannot read {}; check it and delete it by hand", path.display());
            return;
        }
    };
    while let Some(top) = stack.last_mut() {
        match top.entries.next() {
            Some(Ok(entry)) => {
                let n = entry.file_name();
                if n.to_bytes() == b"." || n.to_bytes() == b".." {
                    continue;
                }
                if !is_folder(&top.fd, &entry) {
                    kept |= rustix::fs::unlinkat(&top.fd, n, AtFlags::empty()).is_err();
                    continue;
                }
                let shown = top.shown.join(std::ffi::OsStr::from_bytes(n.to_bytes()));
                match rustix::fs::openat(&top.fd, n, DIR_FLAGS, Mode::empty()) {
                    Ok(sub) if rustix::fs::fstat(&sub).map(|st| st.st_dev).ok() == Some(root_dev) => {
                        match frame(sub, n.to_owned(), shown) {
                            Some(f) => stack.push(f),
                            None => kept = true,
                        }
                    }
                    Ok(_) => {
                        log::warn!(
                            "{} is a mount point: left alone, with what is mounted there",
                            shown.display()
                        );
                        kept = true;
                    }
                    Err(_) => kept = true,
                }
            }
            Some(Err(_)) | None => {
                // This folder is as empty as it will get: remove it from the one above.
                let done = stack.pop().expect("a frame is on the stack");
                drop(done.entries);
                drop(done.fd);
                let parent = stack.last().map(|f| &f.fd).unwrap_or(&parent_fd);
                kept |= rustix::fs::unlinkat(parent, done.name.as_c_str(), AtFlags::REMOVEDIR).is_err();
            }
        }
    }
    if kept {
        log::warn!("could not remove everything in {}; check it and delete it by hand", path.display());
    }
}

/// Whether a directory entry is a folder (not a link to one), asking the filesystem when
/// the entry does not say (some filesystems report `DT_UNKNOWN`).
fn is_folder(dir: &std::os::fd::OwnedFd, entry: &rustix::fs::DirEntry) -> bool {
    use rustix::fs::FileType;
    match entry.file_type() {
        FileType::Directory => true,
        FileType::Unknown => {
            rustix::fs::statat(dir, entry.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
                .unwrap_or(false)
        }
        _ => false,
    }
}

/// A file being written under `<final>.partial`; removed on drop unless [`commit`]ted.
///
/// [`commit`]: PartialFile::commit
pub struct PartialFile {
    partial: PathBuf,
    target: PathBuf,
    file: Option<File>,
}

impl PartialFile {
    pub fn create(target: &Path, mode: u32) -> Result<PartialFile> {
        let mut partial = target.as_os_str().to_owned();
        partial.push(PARTIAL_SUFFIX);
        let partial = PathBuf::from(partial);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&partial)
            .context(|| format!("cannot create {}", partial.display()))?;
        Ok(PartialFile { partial, target: target.to_path_buf(), file: Some(file) })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file present until commit")
    }

    pub fn take_file(&mut self) -> File {
        self.file.take().expect("file present until commit")
    }

    pub fn put_file(&mut self, f: File) {
        self.file = Some(f);
    }

    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// fsync the data, rename into place, fsync the directory.
    pub fn commit(mut self) -> Result<PathBuf> {
        if let Some(f) = self.file.take() {
            f.sync_all().context(|| format!("cannot fsync {}", self.partial.display()))?;
        }
        fs::rename(&self.partial, &self.target)
            .context(|| format!("cannot rename {} into place", self.partial.display()))?;
        if let Some(dir) = self.target.parent() {
            fsync_dir(dir)?;
        }
        // Nothing left to clean up.
        self.partial = PathBuf::new();
        Ok(self.target.clone())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.partial.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.partial);
        }
    }
}

/// Write a small file atomically (manifests, metrics, journals).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut p = PartialFile::create(path, mode)?;
    p.file().write_all(bytes).context(|| format!("cannot write {}", p.partial_path().display()))?;
    p.commit()?;
    Ok(())
}

pub fn hex_digest(h: Sha256) -> String {
    hex::encode(h.finalize())
}

/// A `Write` adapter that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), bytes: 0 }
    }
    /// Returns the inner writer, the hex SHA-256 and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex_digest(self.hasher), self.bytes)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A `Read` adapter that hashes and counts what is read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), bytes: 0 }
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn inner_ref(&self) -> &R {
        &self.inner
    }
    pub fn inner_mut(&mut self) -> &mut R {
        &mut self.inner
    }
    pub fn finish(self) -> (String, u64) {
        (hex_digest(self.hasher), self.bytes)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Hash state shared with a reader that is buried inside a decryption stack (running on
/// another thread), so the archive file's SHA-256 can be read after the stack is consumed.
#[derive(Clone, Default)]
pub struct SharedHash(Arc<Mutex<(Sha256, u64)>>);

impl SharedHash {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Sha256, u64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn bytes(&self) -> u64 {
        self.lock().1
    }
    pub fn hex(&self) -> String {
        hex::encode(self.lock().0.clone().finalize())
    }
    pub fn update(&self, buf: &[u8]) {
        let mut s = self.lock();
        s.0.update(buf);
        s.1 += buf.len() as u64;
    }
}

pub struct SharedHashingReader<R> {
    pub inner: R,
    pub hash: SharedHash,
}

impl<R: Read> Read for SharedHashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A file writer that pushes its data to disk every `every` bytes (fdatasync) and then drops
/// those pages from the page cache.
///
/// Why: written all at once and fsynced at the end, a 400 MB archive becomes one long burst
/// of writeback, and the application's own commit fsyncs queue behind it (its worst
/// transaction went from 12 to 30-40 ms in bench/results/medium.md). Flushing as we go
/// keeps the dirty data small, and dropping the written pages keeps a 512 MB Pi's page cache
/// for the application. It runs on the pipeline's writer thread, so compression goes on
/// meanwhile.
pub struct SteadyWriter {
    file: File,
    every: u64,
    pending: u64,
    flushed: u64,
}

impl SteadyWriter {
    pub fn new(file: File, every: u64) -> Self {
        SteadyWriter { file, every, pending: 0, flushed: 0 }
    }
    pub fn into_inner(self) -> File {
        self.file
    }
}

impl Write for SteadyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.pending += n as u64;
        if self.pending >= self.every {
            self.file.sync_data()?;
            let len = std::num::NonZeroU64::new(self.pending);
            let _ = rustix::fs::fadvise(&self.file, self.flushed, len, rustix::fs::Advice::DontNeed);
            self.flushed += self.pending;
            self.pending = 0;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// SHA-256 of a whole file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let f = File::open(path)?;
    let mut r = HashingReader::new(f);
    io::copy(&mut r, &mut io::sink())?;
    Ok(r.finish())
}

/// Tell the kernel we will not read this file's pages again, so a multi-gigabyte backup does
/// not push the application's working set out of a 512 MB Pi's page cache.
pub fn drop_from_page_cache(f: &File) {
    let _ = rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_file_is_removed_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.bin");
        {
            let mut p = PartialFile::create(&target, 0o600).unwrap();
            p.file().write_all(b"half").unwrap();
            assert!(dir.path().join("a.bin.partial").exists());
        }
        assert!(!dir.path().join("a.bin.partial").exists());
        assert!(!target.exists());

        let mut p = PartialFile::create(&target, 0o600).unwrap();
        p.file().write_all(b"whole").unwrap();
        p.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"whole");
        assert!(!dir.path().join("a.bin.partial").exists());
    }

    fn outside_tree() -> (tempfile::TempDir, Vec<(PathBuf, u32)>) {
        use std::os::unix::fs::PermissionsExt;
        let outside = tempfile::tempdir().unwrap();
        fs::create_dir(outside.path().join("sub")).unwrap();
        fs::write(outside.path().join("sub/file"), b"keep").unwrap();
        fs::set_permissions(outside.path().join("sub"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(outside.path().join("sub/file"), fs::Permissions::from_mode(0o644)).unwrap();
        let modes = [outside.path().join("sub"), outside.path().join("sub/file")]
            .into_iter()
            .map(|p| {
                let m = fs::symlink_metadata(&p).unwrap().permissions().mode();
                (p, m)
            })
            .collect();
        (outside, modes)
    }

    fn unchanged(modes: &[(PathBuf, u32)]) {
        use std::os::unix::fs::PermissionsExt;
        for (p, m) in modes {
            assert_eq!(fs::symlink_metadata(p).unwrap().permissions().mode(), *m, "{}", p.display());
        }
    }

    #[test]
    fn remove_tree_removes_deep_read_only_trees_and_never_follows_links() {
        use std::os::unix::fs::PermissionsExt;
        let (outside, modes) = outside_tree();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("stage");
        let mut deep = root.clone();
        for i in 0..50 {
            deep.push(format!("d{i}"));
        }
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("f"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link-to-outside")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("sub"), deep.join("link2")).unwrap();
        fs::set_permissions(root.join("d0"), fs::Permissions::from_mode(0o500)).unwrap();
        remove_tree(&root);
        assert!(!root.exists(), "removed");
        unchanged(&modes);
        assert_eq!(fs::read(outside.path().join("sub/file")).unwrap(), b"keep");

        // The folder itself replaced by a link (or a file): only the name goes.
        std::os::unix::fs::symlink(outside.path(), &root).unwrap();
        remove_tree(&root);
        assert!(fs::symlink_metadata(&root).is_err());
        unchanged(&modes);
        fs::write(&root, b"f").unwrap();
        remove_tree(&root);
        assert!(!root.exists());
        remove_tree(&root); // missing: nothing to do
    }

    #[test]
    fn remove_tree_never_enters_a_mount_point() {
        if !rustix::process::geteuid().is_root() || std::env::var_os("DATAVAULT_TEST_EMULATED").is_some() {
            eprintln!("skipped: needs root and a real kernel to mount a tmpfs");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("aside");
        let mnt = root.join("uploads/usb");
        fs::create_dir_all(&mnt).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        fs::write(mnt.join("archive"), b"a backup").unwrap();
        fs::write(root.join("uploads/other"), b"x").unwrap();
        remove_tree(&root);
        let kept = fs::read(mnt.join("archive"));
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        assert_eq!(kept.unwrap(), b"a backup", "what is mounted inside is never removed");
        assert!(!root.join("uploads/other").exists(), "the rest is removed");
        // And a mount point given as the folder itself is left alone.
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        fs::write(mnt.join("archive"), b"a backup").unwrap();
        remove_tree(&mnt);
        let kept = fs::read(mnt.join("archive"));
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        assert_eq!(kept.unwrap(), b"a backup");
    }

    #[test]
    fn read_regular_refuses_fifos_devices_and_big_files() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(read_regular(&fifo, 10).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(read_regular(Path::new("/dev/zero"), 10).unwrap_err().kind(), io::ErrorKind::InvalidData);
        let big = dir.path().join("big");
        fs::write(&big, vec![0u8; 11]).unwrap();
        assert!(read_regular(&big, 10).is_err());
        assert_eq!(read_regular(&big, 11).unwrap().len(), 11);
    }

    #[test]
    fn hashing_adapters_agree_with_sha256() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"abc").unwrap();
        let (_, hex, n) = w.finish();
        assert_eq!(n, 3);
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let mut r = HashingReader::new(&b"abc"[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert_eq!(r.finish().0, hex);
    }
}
