//! Building an archive in one streaming pass: tar -> zstd -> age -> SHA-256 -> file.
//!
//! Memory does not depend on the size of the data: every stage is a `Write` adapter with a
//! fixed buffer. Only the inner manifest (one small record per file) grows, with the number
//! of files. Each stage that needs finishing is finished in [`ArchiveWriter::finish`], inside
//! out; forgetting age's `finish()` would drop the last chunk and make the archive unreadable.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use tar::{EntryType, Header};

use crate::config::CompressionSettings;
use crate::error::Error;
use crate::fsutil::{drop_from_page_cache, HashingReader, HashingWriter};
use crate::manifest::{escape_path, DatabaseInfo, EntryKind, EntryRecord, Skipped, TreeInfo};
use crate::pipe::PipeWriter;
use crate::progress::Progress;
use crate::snapshot::{self, SnapshotInfo};
use crate::tree::walk::{walk, Item, WalkError};

/// tar -> zstd on the caller's thread; age -> SHA-256 -> file on a second one (see `pipe`).
type Stack<W> = tar::Builder<
    zstd::stream::write::Encoder<'static, PipeWriter<age::stream::StreamWriter<HashingWriter<W>>>>,
>;

/// Chunks handed to the encryption thread, and how many may wait: 4 MiB in flight at most.
const PIPE_CHUNK: usize = 1 << 20;
const PIPE_DEPTH: usize = 3;
/// Source files are read in large chunks (one syscall per 256 KiB, not per 8 KiB).
const READ_CHUNK: usize = 256 << 10;

/// Where an error came from, so that a full target disk is told apart from a bad source.
#[derive(Debug)]
pub enum WriteError {
    /// Writing the archive failed (disk full, USB drive gone...).
    Output(io::Error),
    /// Anything else (reading the source, bad input).
    Other(Error),
}

impl From<Error> for WriteError {
    fn from(e: Error) -> Self {
        WriteError::Other(e)
    }
}

pub type WResult<T> = std::result::Result<T, WriteError>;

pub struct ArchiveWriter<W: Write + Send + 'static> {
    tar: Stack<W>,
    /// One compact record per entry, for the inner manifest written at the end (the only
    /// memory that grows: with the number of files, ~100 bytes each, not with their size).
    entries: Vec<Rec>,
    changed: Vec<String>,
    skipped: Vec<Skipped>,
    files: u64,
    plain_bytes: u64,
    progress: Arc<dyn Progress>,
}

/// What [`ArchiveWriter::finish`] returns.
pub struct Finished<W> {
    pub output: W,
    pub sha256: String,
    pub size: u64,
    pub files: u64,
    pub plain_bytes: u64,
    pub changed: Vec<String>,
    pub skipped: Vec<Skipped>,
}

impl<W: Write + Send + 'static> ArchiveWriter<W> {
    pub fn new(
        output: W,
        recipients: &[age::x25519::Recipient],
        compression: CompressionSettings,
        progress: Arc<dyn Progress>,
    ) -> WResult<Self> {
        let hashed = HashingWriter::new(output);
        let encryptor = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| WriteError::Other(Error::Failed(format!("cannot set up encryption: {e}"))))?;
        let encrypted = encryptor.wrap_output(hashed).map_err(WriteError::Output)?;
        let piped = PipeWriter::new(encrypted, PIPE_CHUNK, PIPE_DEPTH);
        let mut zstd =
            zstd::stream::write::Encoder::new(piped, compression.level).map_err(WriteError::Output)?;
        // Without the frame checksum a flipped byte decompresses silently (docs/facts.md).
        zstd.include_checksum(true).map_err(WriteError::Output)?;
        if compression.threads > 1 {
            zstd.multithread(compression.threads).map_err(WriteError::Output)?;
        }
        let mut tar = tar::Builder::new(zstd);
        tar.mode(tar::HeaderMode::Complete);
        Ok(ArchiveWriter {
            tar,
            entries: Vec::new(),
            changed: Vec::new(),
            skipped: Vec::new(),
            files: 0,
            plain_bytes: 0,
            progress,
        })
    }

    /// Stream the snapshot begun by [`snapshot::begin`] into `db/<file name>`.
    pub fn add_database(
        &mut self,
        conn: &Connection,
        db_path: &Path,
        info: &SnapshotInfo,
        taken_at: DateTime<Utc>,
    ) -> WResult<DatabaseInfo> {
        let name = db_path.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_else(|| b"app.db".to_vec());
        let mut entry = b"db/".to_vec();
        entry.extend_from_slice(&name);
        let meta = std::fs::metadata(db_path)
            .map_err(|e| Error::source(db_path, format!("cannot read the database: {e}")))?;
        let mut header = Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        header.set_entry_type(EntryType::Regular);
        header.set_size(info.size());
        header.set_mtime(taken_at.timestamp().max(0) as u64);
        let progress = self.progress.clone();
        let mut append_error = None;
        let (sha256, n) = snapshot::stream_pages(conn, db_path, info, |pages| {
            let mut hashed =
                HashingReader::new(crate::progress::ProgressReader { inner: pages, progress: &*progress });
            let res = self.tar.append_data(
                &mut header,
                Path::new(std::ffi::OsStr::from_bytes(&entry)),
                &mut hashed,
            );
            if let Err(e) = res {
                append_error = Some(classify_append(e, db_path));
                return Ok((String::new(), 0));
            }
            Ok(hashed.finish())
        })?;
        if let Some(e) = append_error {
            return Err(e);
        }
        if n != info.size() {
            return Err(WriteError::Other(Error::source(
                db_path,
                format!("snapshot gave {n} bytes, expected {}", info.size()),
            )));
        }
        self.files += 1;
        self.plain_bytes += n;
        let entry_s = escape_path(&entry);
        self.entries.push(Rec::new(&entry_s, EntryKind::File, n, Some(&sha256), None));
        Ok(DatabaseInfo {
            entry: entry_s,
            size: n,
            sha256,
            page_size: info.page_size,
            page_count: info.page_count,
            schema_version: info.schema_version,
            user_version: info.user_version,
            journal_mode: info.journal_mode.clone(),
            method: "dbpage".into(),
            damaged: None,
        })
    }

    /// Archive a directory tree under `prefix` (`uploads`): regular files, folders and
    /// symlinks (as links, never followed), walked with [`crate::tree::walk`]. Unreadable
    /// and special files are skipped and listed; files that change while read are archived
    /// as read and listed.
    pub fn add_tree(&mut self, root: &Path, prefix: &str) -> WResult<TreeInfo> {
        let mut info = TreeInfo::default();
        let walked = walk(root, prefix, |item| self.add_item(root, item, &mut info));
        match walked {
            Ok(()) => Ok(info),
            Err(WalkError::Visit(e)) => Err(e),
            Err(WalkError::Root(e)) => Err(WriteError::Other(Error::source(
                root,
                if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
                    || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error())
                {
                    "is not a folder (a symlink or a file); check source.uploads".to_string()
                } else {
                    format!("cannot read the uploads folder: {e}; check source.uploads")
                },
            ))),
        }
    }

    fn add_item(&mut self, root: &Path, item: Item, info: &mut TreeInfo) -> WResult<()> {
        let skip = |w: &mut Self, rel: &[u8], reason: String| {
            w.skipped.push(Skipped { path: escape_path(rel), reason });
        };
        match item {
            Item::Dir { rel, meta } => {
                let mut dir = rel.clone();
                dir.push(b'/');
                let mut h = header(&meta, EntryType::Directory, 0);
                self.append(&mut h, &dir, io::empty(), root)?;
                self.entries.push(Rec::new(&escape_path(&rel), EntryKind::Dir, 0, None, None));
                info.dirs += 1;
            }
            Item::Symlink { rel, meta, target } => {
                let mut h = header(&meta, EntryType::Symlink, 0);
                self.tar
                    .append_link(&mut h, Path::new(OsStr::from_bytes(&rel)), OsStr::from_bytes(&target))
                    .map_err(|e| classify_append(e, root))?;
                let t = escape_path(&target);
                self.entries.push(Rec::new(&escape_path(&rel), EntryKind::Symlink, 0, None, Some(&t)));
                info.symlinks += 1;
                self.files += 1;
            }
            Item::File { rel, meta, stat, file } => {
                let n =
                    self.add_open_file(&file, &rel, &meta, stat.size, &root.join(OsStr::from_bytes(&rel)))?;
                info.files += 1;
                info.bytes += n;
            }
            Item::Special { rel } => {
                log::warn!("{}: special file (fifo, socket or device), not backed up", escape_path(&rel));
                skip(self, &rel, "special file (fifo, socket or device)".into());
            }
            Item::Vanished { rel } => {
                self.changed.push(escape_path(&rel));
                skip(self, &rel, "vanished during the backup".into());
            }
            Item::Replaced { rel } => {
                self.changed.push(escape_path(&rel));
                skip(self, &rel, "replaced by something else (a link?) during the backup".into());
            }
            Item::Unreadable { rel, error } => {
                log::warn!("{}: cannot read, skipped: {error}", escape_path(&rel));
                skip(self, &rel, format!("unreadable: {error}"));
            }
        }
        Ok(())
    }

    /// Add one regular file by path (a pre-restore copy of a damaged database's files, as
    /// found); `None` if it was skipped (vanished, unreadable, replaced).
    pub fn add_file(&mut self, path: &Path, rel: &[u8]) -> WResult<Option<u64>> {
        let shown = escape_path(rel);
        // O_NOFOLLOW: if the file was swapped for a symlink, we refuse rather than archive
        // whatever it points to. O_NONBLOCK: same for a swapped-in fifo.
        let flags = (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32;
        let file = match OpenOptions::new().read(true).custom_flags(flags).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.changed.push(shown.clone());
                self.skipped.push(Skipped { path: shown, reason: "vanished during the backup".into() });
                return Ok(None);
            }
            Err(e) => {
                log::warn!("{}: cannot read, skipped: {e}", path.display());
                self.skipped.push(Skipped { path: shown, reason: format!("unreadable: {e}") });
                return Ok(None);
            }
        };
        let before = file.metadata().map_err(|e| Error::source(path, format!("cannot stat: {e}")))?;
        if !before.is_file() {
            self.skipped
                .push(Skipped { path: shown, reason: "replaced by a non-file during the backup".into() });
            return Ok(None);
        }
        let meta = crate::tree::EntryMeta::from_metadata(&before);
        self.add_open_file(&file, rel, &meta, before.len(), path).map(Some)
    }

    /// Stream an open regular file into the archive. Its size is fixed in the tar header
    /// first: a file that shrinks or grows while read is archived as read (padded or cut)
    /// and listed under `changed_during_backup`.
    fn add_open_file(
        &mut self,
        file: &std::fs::File,
        rel: &[u8],
        meta: &crate::tree::EntryMeta,
        size: u64,
        source: &Path,
    ) -> WResult<u64> {
        let shown = escape_path(rel);
        let mut h = header(meta, EntryType::Regular, size);
        let progress = self.progress.clone();
        let mut reader = HashingReader::new(ExactSize {
            inner: crate::progress::ProgressReader { inner: file, progress: &*progress },
            remaining: size,
            short: false,
            error: None,
        });
        self.append(&mut h, rel, std::io::BufReader::with_capacity(READ_CHUNK, &mut reader), source)?;
        let (sha256, n) = {
            let short = reader_short(&reader);
            if let Some(e) = reader_error(&mut reader) {
                // A read error in the middle of a file (I/O error on the SD card): the tar
                // entry was padded; keep the archive consistent and report the file.
                log::warn!("{shown}: read error, archived padded with zeros: {e}");
                self.changed.push(shown.clone());
            } else if short {
                self.changed.push(shown.clone());
            }
            reader.finish()
        };
        drop_from_page_cache(file);
        let after = file.metadata().ok();
        let changed = match after {
            Some(a) => a.len() != size || a.mtime() != meta.mtime || a.mtime_nsec() as u32 != meta.mtime_ns,
            None => true,
        };
        if changed && self.changed.last() != Some(&shown) {
            log::warn!("{shown}: changed while it was read; archived as read and listed in the manifest");
            self.changed.push(shown.clone());
        }
        self.files += 1;
        self.plain_bytes += n;
        self.entries.push(Rec::new(&shown, EntryKind::File, n, Some(&sha256), None));
        Ok(n)
    }

    fn append(&mut self, h: &mut Header, rel: &[u8], data: impl Read, source: &Path) -> WResult<()> {
        self.tar
            .append_data(h, Path::new(std::ffi::OsStr::from_bytes(rel)), data)
            .map_err(|e| classify_append(e, source))
    }

    /// Write the inner manifest, finish every stage inside out, and return the output.
    pub fn finish(mut self, created: DateTime<Utc>) -> WResult<Finished<W>> {
        // Streamed, not built in memory: its length is counted in a first pass, then the tar
        // header and the JSON go straight into the compressor.
        let mut counter = CountingSink(0);
        write_inner_manifest(&mut counter, created, &self.entries).map_err(WriteError::Output)?;
        let len = counter.0;
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o600);
        h.set_mtime(created.timestamp().max(0) as u64);
        h.set_size(len);
        h.set_path(crate::manifest::INNER_MANIFEST).map_err(WriteError::Output)?;
        h.set_cksum();
        let out = self.tar.get_mut();
        out.write_all(h.as_bytes()).map_err(WriteError::Output)?;
        write_inner_manifest(out, created, &self.entries).map_err(WriteError::Output)?;
        let pad = (512 - (len % 512) as usize) % 512;
        out.write_all(&[0u8; 512][..pad]).map_err(WriteError::Output)?;
        let zstd = self.tar.into_inner().map_err(WriteError::Output)?;
        let piped = zstd.finish().map_err(WriteError::Output)?;
        let age = piped.finish().map_err(WriteError::Output)?;
        let hashed = age.finish().map_err(WriteError::Output)?;
        let (mut output, sha256, size) = hashed.finish();
        output.flush().map_err(WriteError::Output)?;
        Ok(Finished {
            output,
            sha256,
            size,
            files: self.files,
            plain_bytes: self.plain_bytes,
            changed: self.changed,
            skipped: self.skipped,
        })
    }
}

/// A compact [`EntryRecord`]: the binary hash and boxed strings save half the memory.
struct Rec {
    path: Box<str>,
    kind: EntryKind,
    size: u64,
    sha256: Option<[u8; 32]>,
    target: Option<Box<str>>,
}

impl Rec {
    fn new(path: &str, kind: EntryKind, size: u64, sha256_hex: Option<&str>, target: Option<&str>) -> Rec {
        let sha256 = sha256_hex.map(|h| {
            let mut b = [0u8; 32];
            hex::decode_to_slice(h, &mut b).expect("our own hex digest");
            b
        });
        Rec { path: path.into(), kind, size, sha256, target: target.map(Into::into) }
    }

    fn to_record(&self) -> EntryRecord {
        EntryRecord {
            path: self.path.to_string(),
            kind: self.kind.clone(),
            size: self.size,
            sha256: self.sha256.map(hex::encode),
            target: self.target.as_deref().map(str::to_string),
        }
    }
}

/// The inner manifest's JSON, the same document `InnerManifest` serializes to, written one
/// entry at a time.
fn write_inner_manifest(w: &mut impl Write, created: DateTime<Utc>, recs: &[Rec]) -> io::Result<()> {
    write!(w, "{{\"format\":{},\"created\":", crate::manifest::FORMAT_VERSION)?;
    serde_json::to_writer(&mut *w, &created)?;
    w.write_all(b",\"entries\":[")?;
    for (i, r) in recs.iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        serde_json::to_writer(&mut *w, &r.to_record())?;
    }
    w.write_all(b"]}")
}

struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The tar builder mixes errors from reading the source and writing the output; a source
/// read error reaches us through our own readers as `Other` kind with a message, everything
/// else is the output.
fn classify_append(e: io::Error, source: &Path) -> WriteError {
    if e.get_ref().map(|r| r.is::<crate::progress::Cancelled>()).unwrap_or(false) {
        return WriteError::Other(Error::Cancelled("backup".into()));
    }
    if let Some(p) = e.get_ref().and_then(|r| r.downcast_ref::<snapshot::PageReadError>()) {
        return WriteError::Other(Error::source(source, p.to_string()));
    }
    WriteError::Output(e)
}

/// A tar header for an entry, from what the walk recorded (GNU format: long names and
/// big sizes fit).
fn header(meta: &crate::tree::EntryMeta, kind: EntryType, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode);
    h.set_uid(meta.uid as u64);
    h.set_gid(meta.gid as u64);
    h.set_mtime(meta.mtime.max(0) as u64);
    h.set_size(size);
    h
}

/// Yields exactly `remaining` bytes: the size written in the tar header. A file that shrank
/// while read is padded with zeros (and reported), one that grew is cut; a read error is
/// remembered and padded over, so one bad sector does not sink the whole backup.
struct ExactSize<R> {
    inner: R,
    remaining: u64,
    short: bool,
    error: Option<io::Error>,
}

impl<R: Read> Read for ExactSize<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.remaining.min(usize::MAX as u64) as usize);
        let n = if self.short || self.error.is_some() {
            0
        } else {
            match self.inner.read(&mut buf[..want]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
                Err(e) if e.get_ref().map(|r| r.is::<crate::progress::Cancelled>()).unwrap_or(false) => {
                    return Err(e)
                }
                Err(e) => {
                    self.error = Some(e);
                    0
                }
            }
        };
        if n == 0 {
            self.short = true;
            buf[..want].fill(0);
            self.remaining -= want as u64;
            return Ok(want);
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn reader_short<R>(r: &HashingReader<ExactSize<R>>) -> bool
where
    R: Read,
{
    r.inner_ref().short
}

fn reader_error<R: Read>(r: &mut HashingReader<ExactSize<R>>) -> Option<io::Error> {
    r.inner_mut().error.take()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streamed_inner_manifest_is_the_documented_json() {
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let recs = vec![
            Rec::new("uploads", EntryKind::Dir, 0, None, None),
            Rec::new("uploads/a\\\\b \\xff.txt", EntryKind::File, 3, Some(sha), None),
            Rec::new("uploads/l", EntryKind::Symlink, 0, None, Some("a b")),
        ];
        let created: DateTime<Utc> = "2026-11-23T04:00:00.123Z".parse().unwrap();
        let mut out = Vec::new();
        write_inner_manifest(&mut out, created, &recs).unwrap();
        let parsed: crate::manifest::InnerManifest = serde_json::from_slice(&out).unwrap();
        let expected = crate::manifest::InnerManifest {
            format: crate::manifest::FORMAT_VERSION,
            created,
            entries: recs.iter().map(Rec::to_record).collect(),
        };
        assert_eq!(parsed, expected);
        assert_eq!(parsed.entries[1].sha256.as_deref(), Some(sha));
        let mut count = CountingSink(0);
        write_inner_manifest(&mut count, created, &recs).unwrap();
        assert_eq!(count.0, out.len() as u64);
    }
}
