//! Crash-safe file writing and the small I/O adapters the pipelines are built from.
//!
//! Power can be cut at any instruction on a Pi. Everything we publish is written under a
//! `*.partial` name, fsynced, renamed into place and then the directory is fsynced, so a
//! reader sees either the old state or the complete new file, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::error::{Context, Result};

/// Suffix of every file being written. A file with this suffix is never complete.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// fsync a directory, so that a rename or an unlink inside it survives a power cut.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).context(|| format!("cannot fsync directory {}", dir.display()))
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
