//! Reading an archive back: decrypt, decompress, check every entry, and either only hash it
//! (`verify --deep`) or write it into a staging folder (drill, restore).
//!
//! Two facts shape this code (docs/facts.md):
//! * age releases plaintext before the end of the stream is authenticated, so nothing read
//!   here is trusted until the whole stream was consumed, the archive's SHA-256 matched its
//!   manifest and every entry matched the inner manifest. Extraction therefore only ever goes
//!   into a fresh staging folder; callers swap it in afterwards.
//! * the tar crate silently skips `..` entries, strips leading `/`, and `Entry::unpack`
//!   checks nothing. So we never use its unpack: every entry goes through
//!   [`crate::tree::extract::Extractor`], which checks its path and type and writes it
//!   relative to descriptors of folders it created (the same for every backup format).

use std::io::{self, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use tar::EntryType;

use crate::archive::entry_path;
use crate::error::{Error, Result};
use crate::fsutil::{SharedHash, SharedHashingReader};
use crate::keys::Identities;
use crate::manifest::{escape_path, EntryKind, EntryRecord, InnerManifest, Manifest, INNER_MANIFEST};
use crate::progress::Progress;
use crate::store::{Listing, Store};
pub use crate::tree::extract::ExtractPlan;
use crate::tree::extract::{damaged, Extractor};
use crate::tree::EntryMeta;

/// The inner manifest is small (a record per file); anything bigger is hostile.
const MAX_INNER_MANIFEST: u64 = 512 << 20;

/// What a successful read proved.
#[derive(Debug, Clone)]
pub struct ReadReport {
    pub inner: InnerManifest,
    pub archive_sha256: String,
    pub archive_bytes: u64,
    pub entries: u64,
    pub files: u64,
    pub plain_bytes: u64,
    /// How the content was proven: archives by each file's SHA-256 in the inner manifest,
    /// snapshots by each chunk's keyed hash (and the database's SHA-256).
    pub format: crate::config::StoreFormat,
    /// Files left out because no copy of their content could be read (escaped path, why):
    /// only with `ExtractPlan::skip_damaged`, else any such file fails the read.
    pub damaged_files: Vec<(String, String)>,
}

/// Read the whole archive described by `listing`; extract it when `plan` is given.
pub fn read_archive(
    store: &Store,
    listing: &Listing,
    identities: &Arc<Identities>,
    identity_path: &Path,
    plan: Option<&ExtractPlan>,
    progress: &dyn Progress,
) -> Result<ReadReport> {
    if listing.snapshot {
        return read_snapshot(store, listing, identities, plan, progress);
    }
    let name = listing.name.clone();
    let manifest = match (&listing.manifest, &listing.problem) {
        (Some(m), None) => m,
        (_, Some(p)) => return Err(Error::integrity(&name, p.clone())),
        (None, None) => return Err(Error::integrity(&name, "has no manifest")),
    };
    let extractor = Extractor::new(&name, plan, manifest.plain_bytes)?;
    let reading = format!("reading {name}");
    let (file, len) = store.open_archive(listing).map_err(|e| {
        store.failure(e, &reading, |e| Error::integrity(&name, format!("cannot open the archive file: {e}")))
    })?;
    // A remote store's failure half-way (the server gone, a timeout) surfaces through age,
    // zstd and tar as a damaged stream: kept here, it is reported for what it is (exit 3).
    let remote_failure = RemoteFailure::default();
    let file: Box<dyn Read + Send> = if store.is_remote() {
        Box::new(RemoteFailureReader { inner: file, seen: remote_failure.clone() })
    } else {
        file
    };
    let hash = SharedHash::default();
    let mut reader =
        Reader { name: &name, manifest, progress, extractor, records: Vec::new(), files: 0, plain_bytes: 0 };
    progress.start("reading", manifest.plain_bytes);
    let result = reader.run(file, hash.clone(), identities, identity_path);
    progress.finish();
    let inner = match result {
        Ok(inner) => inner,
        Err(e) => {
            if let Some(re) = remote_failure.take() {
                return Err(store.failure(re, &reading, |_| e));
            }
            return Err(explain_with_checksum(store, listing, len, manifest, &hash, e));
        }
    };
    // The archive file's own checksum, over every byte of it.
    finish_hash(store, listing, len, &hash).map_err(|e| {
        store.failure(e, &reading, |e| Error::integrity(&name, format!("cannot read the archive file: {e}")))
    })?;
    if hash.hex() != manifest.archive_sha256 {
        return Err(Error::integrity(
            &name,
            "SHA-256 of the archive file differs from its manifest: the file is damaged or was replaced; use another archive",
        ));
    }
    reader.compare(&inner)?;
    let Reader { records, files, plain_bytes, extractor, .. } = reader;
    extractor.finish()?;
    Ok(ReadReport {
        entries: records.len() as u64,
        files,
        plain_bytes,
        inner,
        archive_sha256: hash.hex(),
        archive_bytes: len,
        format: crate::config::StoreFormat::Archives,
        damaged_files: Vec::new(),
    })
}

/// When decryption or decompression fails half-way, tell the operator whether the file
/// itself is damaged (checksum mismatch) or was made unreadable some other way.
fn explain_with_checksum(
    store: &Store,
    listing: &Listing,
    len: u64,
    manifest: &Manifest,
    hash: &SharedHash,
    e: Error,
) -> Error {
    let Error::Integrity { archive, message } = e else { return e };
    if message.contains("unsafe") {
        return Error::Integrity { archive, message };
    }
    // A flipped byte in the age header's recipient lines reads as "wrong key" to age: the
    // checksum tells damage from a really wrong key (tests/hostile_archives.rs).
    let cause = if message.contains("wrong key") {
        "its age header opens with no identity given"
    } else {
        message.trim_end_matches("; use another archive")
    };
    match finish_hash(store, listing, len, hash) {
        Ok(()) if hash.hex() != manifest.archive_sha256 => Error::Integrity {
            archive,
            message: format!("damaged: its SHA-256 differs from the manifest ({cause}); use another archive"),
        },
        _ => Error::Integrity { archive, message },
    }
}

/// Hash whatever part of the file the decryption stack did not read (trailing bytes).
fn finish_hash(store: &Store, listing: &Listing, len: u64, hash: &SharedHash) -> io::Result<()> {
    while hash.bytes() < len {
        let n = (len - hash.bytes()).min(1 << 20);
        let chunk = store.read_archive_range(listing, hash.bytes(), n)?;
        hash.update(&chunk);
    }
    Ok(())
}

/// The first classified failure of a remote store seen while reading (see [`read_archive`]).
#[derive(Clone, Default)]
struct RemoteFailure(std::sync::Arc<std::sync::Mutex<Option<io::Error>>>);

impl RemoteFailure {
    fn take(&self) -> Option<io::Error> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

struct RemoteFailureReader {
    inner: Box<dyn Read + Send>,
    seen: RemoteFailure,
}

impl Read for RemoteFailureReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Err(e) if crate::offsite::remote_error::class_of(&e).is_some() => {
                let copy = io::Error::new(e.kind(), e.to_string());
                let mut seen = self.seen.0.lock().unwrap_or_else(|p| p.into_inner());
                seen.get_or_insert(e);
                Err(copy)
            }
            other => other,
        }
    }
}

struct Reader<'a> {
    name: &'a str,
    manifest: &'a Manifest,
    progress: &'a dyn Progress,
    /// Checks every entry and, with a plan, writes it.
    extractor: Extractor<'a>,
    /// What was read, entry by entry, to compare with the inner manifest.
    records: Vec<EntryRecord>,
    files: u64,
    plain_bytes: u64,
}

fn unsafe_entry(name: &str, why: impl std::fmt::Display) -> Error {
    Error::integrity(name, format!("unsafe content refused: {why}; nothing was restored from it"))
}

impl Reader<'_> {
    fn run(
        &mut self,
        file: Box<dyn Read + Send>,
        hash: SharedHash,
        identities: &Identities,
        identity_path: &Path,
    ) -> Result<InnerManifest> {
        let name = self.name;
        let input = BufReader::with_capacity(1 << 20, SharedHashingReader { inner: file, hash });
        let decryptor = age::Decryptor::new_buffered(input).map_err(|e| self.age_error(e, identity_path))?;
        let plain = decryptor
            .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .map_err(|e| self.age_error(e, identity_path))?;
        // Decryption (and the archive's SHA-256) on a second thread; decompression, tar,
        // the files' SHA-256 and the writes on this one.
        let plain = crate::pipe::PipeReader::new(plain, 1 << 20, 3);
        let zstd = zstd::stream::read::Decoder::new(plain).map_err(|e| damaged(name, &e))?;
        let mut tar = tar::Archive::new(zstd);
        let mut inner: Option<InnerManifest> = None;
        {
            let entries = tar.entries().map_err(|e| damaged(name, &e))?;
            for entry in entries {
                let mut entry = entry.map_err(|e| damaged(name, &e))?;
                if inner.is_some() {
                    return Err(unsafe_entry(name, "entries after the inner manifest"));
                }
                let raw_path = entry.path_bytes().into_owned();
                let parts = entry_path(&raw_path).map_err(|why| unsafe_entry(name, why))?;
                let shown = escape_path(&raw_path);
                let etype = entry.header().entry_type();
                if parts.len() == 1 && parts[0] == INNER_MANIFEST.as_bytes() {
                    if !etype.is_file() {
                        return Err(unsafe_entry(name, "inner manifest is not a regular file"));
                    }
                    inner = Some(self.read_inner(&mut entry)?);
                    continue;
                }
                match etype {
                    EntryType::Directory => self.dir(&parts, &entry)?,
                    EntryType::Symlink => self.symlink(&parts, &shown, &entry)?,
                    t if t.is_file() => self.file(&parts, &mut entry)?,
                    EntryType::Link => return Err(unsafe_entry(name, format!("hard link {shown}"))),
                    EntryType::Char | EntryType::Block => {
                        return Err(unsafe_entry(name, format!("device node {shown}")))
                    }
                    EntryType::Fifo => return Err(unsafe_entry(name, format!("fifo {shown}"))),
                    other => return Err(unsafe_entry(name, format!("entry of type {other:?} {shown}"))),
                }
            }
        }
        // Read to the very end: the last age chunk is authenticated, and zstd's frame
        // checksum checked, only when the stream is consumed.
        let mut rest = tar.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| damaged(name, &e))?;
        inner.ok_or_else(|| {
            Error::integrity(name, "has no inner manifest: truncated or not a DataVault archive")
        })
    }

    fn age_error(&self, e: age::DecryptError, identity_path: &Path) -> Error {
        use age::DecryptError as D;
        let msg = match e {
            D::NoMatchingKeys => format!(
                "wrong key: it was encrypted to {} and the identity {} opens none of them; use the matching identity file",
                self.manifest.encryption.recipients.join(", "),
                identity_path.display()
            ),
            D::InvalidHeader | D::UnknownFormat => "damaged: not a readable age file; use another archive".into(),
            D::InvalidMac => "damaged: the age header failed authentication; use another archive".into(),
            D::Io(io) => return damaged(self.name, &io),
            other => format!("cannot decrypt ({other}); use another archive"),
        };
        Error::integrity(self.name, msg)
    }

    fn read_inner<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<InnerManifest> {
        let size = entry.size();
        if size > MAX_INNER_MANIFEST {
            return Err(unsafe_entry(self.name, format!("inner manifest declares {size} bytes")));
        }
        let mut buf = Vec::with_capacity(size as usize);
        entry.take(MAX_INNER_MANIFEST).read_to_end(&mut buf).map_err(|e| damaged(self.name, &e))?;
        serde_json::from_slice(&buf).map_err(|e| {
            Error::integrity(self.name, format!("inner manifest is not valid ({e}); the archive is damaged"))
        })
    }

    fn dir<R: Read>(&mut self, parts: &[Vec<u8>], entry: &tar::Entry<R>) -> Result<()> {
        self.extractor.dir(parts, &meta_of(entry))?;
        self.records.push(EntryRecord {
            path: escape_path(&parts.join(&b'/')),
            kind: EntryKind::Dir,
            size: 0,
            sha256: None,
            target: None,
        });
        Ok(())
    }

    fn symlink<R: Read>(&mut self, parts: &[Vec<u8>], shown: &str, entry: &tar::Entry<R>) -> Result<()> {
        let target = entry
            .link_name_bytes()
            .ok_or_else(|| unsafe_entry(self.name, format!("symlink without a target {shown}")))?
            .into_owned();
        self.extractor.symlink(parts, &meta_of(entry), &target)?;
        self.files += 1;
        self.records.push(EntryRecord {
            path: escape_path(&parts.join(&b'/')),
            kind: EntryKind::Symlink,
            size: 0,
            sha256: None,
            target: Some(escape_path(&target)),
        });
        Ok(())
    }

    fn file<R: Read>(&mut self, parts: &[Vec<u8>], entry: &mut tar::Entry<R>) -> Result<()> {
        // `entry.size()`, not the header's: a PAX record may override the ustar size field,
        // and that is the size the tar reader will actually hand out.
        let size = entry.size();
        let meta = meta_of(entry);
        let mut entry = std::io::BufReader::with_capacity(256 << 10, entry);
        let (sha256, n) = self.extractor.file(parts, &meta, size, &mut entry, true, self.progress)?;
        self.files += 1;
        self.plain_bytes += n;
        self.records.push(EntryRecord {
            path: escape_path(&parts.join(&b'/')),
            kind: EntryKind::File,
            size: n,
            sha256,
            target: None,
        });
        Ok(())
    }

    /// Every entry must be exactly what the inner manifest lists, in order.
    fn compare(&self, inner: &InnerManifest) -> Result<()> {
        let name = self.name;
        if inner.entries.len() != self.records.len() {
            return Err(Error::integrity(
                name,
                format!(
                    "holds {} entries but its inner manifest lists {}",
                    self.records.len(),
                    inner.entries.len()
                ),
            ));
        }
        for (got, want) in self.records.iter().zip(&inner.entries) {
            if got != want {
                return Err(Error::integrity(
                    name,
                    format!("{} does not match the inner manifest", got.path),
                ));
            }
        }
        if let Some(db) = &self.manifest.database {
            let found = self.records.iter().find(|r| r.path == db.entry);
            if found.and_then(|r| r.sha256.as_deref()) != Some(db.sha256.as_str()) {
                return Err(Error::integrity(
                    name,
                    format!("database {} does not match the manifest", db.entry),
                ));
            }
        }
        Ok(())
    }
}

/// The owner, mode and time a tar header records.
fn meta_of<R: Read>(entry: &tar::Entry<R>) -> EntryMeta {
    let h = entry.header();
    EntryMeta {
        mode: h.mode().unwrap_or(0o600) & 0o7777,
        uid: h.uid().unwrap_or(0) as u32,
        gid: h.gid().unwrap_or(0) as u32,
        mtime: h.mtime().unwrap_or(0) as i64,
        mtime_ns: 0,
    }
}

/// A snapshot (#9) read through the same [`Extractor`] as an archive: every entry checked
/// and written by it; every chunk decrypted, decompressed with a cap and checked against its
/// id by the snapshot reader; only the end of the tree (counts, sizes, refs and the
/// database's SHA-256 against the manifest) proves the whole.
// Long on purpose (#12): one loop over the snapshot's entries, each checked and handed to
// the shared extractor, with the counts the end of the stream proves against the manifest.
fn read_snapshot(
    store: &Store,
    listing: &Listing,
    identities: &Arc<Identities>,
    plan: Option<&ExtractPlan>,
    progress: &dyn Progress,
) -> Result<ReadReport> {
    use crate::store::dedup::{format::TreeKind, read::SnapshotReader};
    let name = listing.name.clone();
    let manifest = match (&listing.manifest, &listing.problem) {
        (Some(m), None) => m,
        (_, Some(p)) => return Err(Error::integrity(&name, p.clone())),
        (None, None) => return Err(Error::integrity(&name, "has no manifest")),
    };
    let ds = store.snapshots()?.ok_or_else(|| Error::integrity(&name, "the snapshot store is missing"))?;
    let mut extractor = Extractor::new(&name, plan, manifest.plain_bytes)?;
    let mut cache = store.dedup_cache()?;
    let mut reader = SnapshotReader::open(&ds, &mut cache, &name, identities.clone(), progress)?;
    if plan.is_some_and(|p| p.skip_damaged) {
        reader.skip_damaged_files();
    }
    let mut records = Vec::new();
    let (mut files, mut plain_bytes) = (0u64, 0u64);
    progress.start("reading", manifest.plain_bytes);
    let result = (|| -> Result<()> {
        while let Some(e) = reader.next_entry()? {
            let meta = EntryMeta {
                mode: e.meta.mode,
                uid: e.meta.uid,
                gid: e.meta.gid,
                mtime: e.meta.mtime,
                mtime_ns: e.meta.mtime_ns,
            };
            let path = escape_path(&e.parts.join(&b'/'));
            match e.kind {
                TreeKind::Dir => {
                    extractor.dir(&e.parts, &meta)?;
                    records.push(EntryRecord {
                        path,
                        kind: EntryKind::Dir,
                        size: 0,
                        sha256: None,
                        target: None,
                    });
                }
                TreeKind::Symlink => {
                    let target = e.target.clone().unwrap_or_default();
                    extractor.symlink(&e.parts, &meta, &target)?;
                    files += 1;
                    records.push(EntryRecord {
                        path,
                        kind: EntryKind::Symlink,
                        size: 0,
                        sha256: None,
                        target: Some(escape_path(&target)),
                    });
                }
                TreeKind::File => {
                    let given_up = reader.damaged_files().len();
                    let written = extractor.file(
                        &e.parts,
                        &meta,
                        e.size,
                        &mut reader.content(),
                        // The reader checked every byte (module doc of `SnapshotReader`).
                        false,
                        // The reader reports progress and watches for a cancel itself.
                        &crate::progress::NoProgress,
                    );
                    let (sha256, n) = match written {
                        Ok(w) => w,
                        // The reader gave this file up (skip_damaged): on to the next.
                        Err(_) if reader.damaged_files().len() > given_up => {
                            extractor.discard_file(&e.parts, &meta)?;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    files += 1;
                    plain_bytes += n;
                    records.push(EntryRecord { path, kind: EntryKind::File, size: n, sha256, target: None });
                }
            }
        }
        Ok(())
    })();
    progress.finish();
    // `next_entry` gave `None`: every chunk matched its id, and the database its SHA-256
    // (but for the files given up, which are named).
    result?;
    let reader_damaged = reader.damaged_files().to_vec();
    extractor.finish()?;
    Ok(ReadReport {
        entries: records.len() as u64,
        files,
        plain_bytes,
        inner: InnerManifest {
            format: crate::manifest::FORMAT_VERSION,
            created: manifest.created,
            entries: records,
        },
        archive_sha256: manifest.archive_sha256.clone(),
        archive_bytes: manifest.archive_size,
        format: crate::config::StoreFormat::Snapshots,
        damaged_files: reader_damaged,
    })
}
