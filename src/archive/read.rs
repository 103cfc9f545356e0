//! Reading an archive back: decrypt, decompress, check every entry, and either only hash it
//! (`verify --deep`) or write it into a staging folder (drill, restore).
//!
//! Two facts shape this code (docs/facts.md):
//! * age releases plaintext before the end of the stream is authenticated, so nothing read
//!   here is trusted until the whole stream was consumed, the archive's SHA-256 matched its
//!   manifest and every entry matched the inner manifest. Extraction therefore only ever goes
//!   into a fresh staging folder; callers swap it in afterwards.
//! * the tar crate silently skips `..` entries, strips leading `/`, and `Entry::unpack`
//!   checks nothing. So we never use its unpack: every entry's path and type is checked here
//!   and files are created by us, with `O_EXCL|O_NOFOLLOW`, below folders we created.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tar::EntryType;

use crate::archive::{entry_path, join};
use crate::error::{is_disk_full, Error, Result};
use crate::fsutil::{HashingReader, SharedHash, SharedHashingReader};
use crate::keys::Identities;
use crate::manifest::{escape_path, EntryKind, EntryRecord, InnerManifest, Manifest, INNER_MANIFEST};
use crate::progress::Progress;
use crate::store::{Listing, Store};

/// The inner manifest is small (a record per file); anything bigger is hostile.
const MAX_INNER_MANIFEST: u64 = 512 << 20;

/// Where extracted entries go: each top-level folder (`db`, `uploads`, `raw`) to a root
/// folder under which the entry's whole path is created.
#[derive(Debug, Clone)]
pub struct ExtractPlan {
    pub routes: Vec<(String, PathBuf)>,
    /// Restore owners from the archive (only possible, and only wanted, as root).
    pub set_owner: bool,
    /// Flush everything to disk once extraction is complete (one `syncfs` per filesystem,
    /// not one fsync per file). A restore needs it before the swap; a drill's scratch,
    /// deleted right after, does not.
    pub durable: bool,
}

impl ExtractPlan {
    /// Everything under one folder (drill, `restore --to`).
    pub fn into_dir(root: &Path) -> ExtractPlan {
        let routes = [crate::archive::TOP_DB, crate::archive::TOP_UPLOADS, crate::archive::TOP_RAW]
            .iter()
            .map(|t| (t.to_string(), root.to_path_buf()))
            .collect();
        ExtractPlan { routes, set_owner: rustix::process::geteuid().is_root(), durable: true }
    }

    fn root_for(&self, top: &[u8]) -> Option<&Path> {
        self.routes.iter().find(|(t, _)| t.as_bytes() == top).map(|(_, p)| p.as_path())
    }

    /// Refuse, before a byte is written, an archive whose content cannot fit where it goes
    /// with room to spare. With the running total checked against the same figure during
    /// extraction, no archive can fill a disk: an in-place restore stages beside the live
    /// data while the app still runs, and must never starve it.
    pub fn check_room(&self, plain_bytes: u64) -> Result<()> {
        let mut seen = Vec::new();
        for (_, root) in &self.routes {
            let dir = root.ancestors().find(|a| a.is_dir()).unwrap_or(root);
            let Ok(st) = rustix::fs::statvfs(dir) else { continue };
            if seen.contains(&st.f_fsid) {
                continue;
            }
            seen.push(st.f_fsid);
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let size = st.f_blocks.saturating_mul(st.f_frsize);
            // Leave the larger of 64 MiB and 2 % of the filesystem to whoever else uses it.
            let reserve = (64u64 << 20).max(size / 50).min(size / 4);
            if plain_bytes.saturating_add(reserve) > free {
                return Err(Error::target(
                    dir,
                    format!(
                        "not enough space: the archive holds {} and {} are free (keeping {} for the system); free space or restore with --to onto a bigger disk",
                        crate::target::human_bytes(plain_bytes),
                        crate::target::human_bytes(free),
                        crate::target::human_bytes(reserve)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What a successful read proved.
#[derive(Debug, Clone)]
pub struct ReadReport {
    pub inner: InnerManifest,
    pub archive_sha256: String,
    pub archive_bytes: u64,
    pub entries: u64,
    pub files: u64,
    pub plain_bytes: u64,
}

/// Read the whole archive described by `listing`; extract it when `plan` is given.
pub fn read_archive(
    store: &Store,
    listing: &Listing,
    identities: &Identities,
    identity_path: &Path,
    plan: Option<&ExtractPlan>,
    progress: &dyn Progress,
) -> Result<ReadReport> {
    let name = listing.name.clone();
    let manifest = match (&listing.manifest, &listing.problem) {
        (Some(m), None) => m,
        (_, Some(p)) => return Err(Error::integrity(&name, p.clone())),
        (None, None) => return Err(Error::integrity(&name, "has no manifest")),
    };
    if let Some(plan) = plan {
        plan.check_room(manifest.plain_bytes)?;
    }
    let (file, len) = store
        .open_archive(listing)
        .map_err(|e| Error::integrity(&name, format!("cannot open the archive file: {e}")))?;
    let hash = SharedHash::default();
    let mut reader = Reader {
        name: &name,
        manifest,
        plan,
        progress,
        records: Vec::new(),
        seen: HashMap::new(),
        dirs: Vec::new(),
        files: 0,
        plain_bytes: 0,
    };
    progress.start("reading", manifest.plain_bytes);
    let result = reader.run(file, hash.clone(), identities, identity_path);
    progress.finish();
    let inner = match result {
        Ok(inner) => inner,
        Err(e) => return Err(explain_with_checksum(store, listing, len, manifest, &hash, e)),
    };
    // The archive file's own checksum, over every byte of it.
    finish_hash(store, listing, len, &hash)
        .map_err(|e| Error::integrity(&name, format!("cannot read the archive file: {e}")))?;
    if hash.hex() != manifest.archive_sha256 {
        return Err(Error::integrity(
            &name,
            "SHA-256 of the archive file differs from its manifest: the file is damaged or was replaced; use another archive",
        ));
    }
    reader.compare(&inner)?;
    if let Some(plan) = plan {
        reader.apply_dir_metadata(plan);
        if plan.durable {
            for (_, root) in &plan.routes {
                let synced =
                    File::open(root).and_then(|d| rustix::fs::syncfs(&d).map_err(std::io::Error::from));
                synced.map_err(|e| write_error(root, e))?;
            }
        }
    }
    Ok(ReadReport {
        entries: reader.records.len() as u64,
        files: reader.files,
        plain_bytes: reader.plain_bytes,
        inner,
        archive_sha256: hash.hex(),
        archive_bytes: len,
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
    let cause =
        if message.contains("wrong key") { "its age header opens with no identity given" } else { &message };
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

/// A folder's mode, mtime and owner, applied once its content is written.
type DirMeta = (PathBuf, u32, u64, Option<(u32, u32)>);

struct Reader<'a> {
    name: &'a str,
    manifest: &'a Manifest,
    plan: Option<&'a ExtractPlan>,
    progress: &'a dyn Progress,
    records: Vec<EntryRecord>,
    /// Every path seen so far and whether it is a folder, to refuse duplicates and
    /// "file, then the same path as a folder" tricks.
    seen: HashMap<Vec<u8>, EntryKind>,
    dirs: Vec<DirMeta>,
    files: u64,
    plain_bytes: u64,
}

fn unsafe_entry(name: &str, why: impl std::fmt::Display) -> Error {
    Error::integrity(name, format!("unsafe content refused: {why}; nothing was restored from it"))
}

fn damaged(name: &str, e: &io::Error) -> Error {
    let what = match e.kind() {
        io::ErrorKind::UnexpectedEof => "truncated (the data ends early)".to_string(),
        io::ErrorKind::InvalidData => format!("damaged ({e})"),
        _ => format!("unreadable ({e})"),
    };
    Error::integrity(name, format!("{what}; use another archive"))
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
                self.check_tree(&parts, &shown, etype)?;
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

    /// Path-level rules that apply whatever the entry type.
    fn check_tree(&mut self, parts: &[Vec<u8>], shown: &str, etype: EntryType) -> Result<()> {
        let name = self.name;
        if self.seen.contains_key(&parts.join(&b'/')) {
            return Err(unsafe_entry(name, format!("{shown} appears twice")));
        }
        // Every ancestor must be a folder this archive created: never a symlink (writing
        // through it would land outside), never a file.
        for i in 1..parts.len() {
            let anc = parts[..i].join(&b'/');
            match self.seen.get(&anc) {
                Some(EntryKind::Dir) | None => {}
                Some(EntryKind::Symlink) => {
                    return Err(unsafe_entry(
                        name,
                        format!("{shown} lies below the symlink {}", escape_path(&anc)),
                    ))
                }
                Some(EntryKind::File) => {
                    return Err(unsafe_entry(
                        name,
                        format!("{shown} lies below the file {}", escape_path(&anc)),
                    ))
                }
            }
        }
        let top = parts[0].as_slice();
        if parts.len() == 1 && etype != EntryType::Directory {
            // A top-level `uploads` that is a symlink or a file would be swapped in as the
            // live uploads folder: a link leading out of it, or a file where a folder must be.
            return Err(unsafe_entry(name, format!("top-level {shown} is not a folder")));
        }
        if etype == EntryType::Symlink && top != crate::archive::TOP_UPLOADS.as_bytes() {
            return Err(unsafe_entry(name, format!("symlink outside uploads {shown}")));
        }
        if top == crate::archive::TOP_DB.as_bytes() && !(parts.len() == 2 && etype.is_file()) {
            return Err(unsafe_entry(name, format!("unexpected database entry {shown}")));
        }
        Ok(())
    }

    fn dest(&self, parts: &[Vec<u8>]) -> Result<Option<PathBuf>> {
        let Some(plan) = self.plan else { return Ok(None) };
        match plan.root_for(&parts[0]) {
            Some(root) => Ok(Some(join(root, parts))),
            None => Err(Error::integrity(
                self.name,
                format!(
                    "holds {}/ entries, which an in-place restore cannot place (only a safety copy of a damaged database has them); restore it with --to DIR",
                    escape_path(&parts[0])
                ),
            )),
        }
    }

    fn dir<R: Read>(&mut self, parts: &[Vec<u8>], entry: &tar::Entry<R>) -> Result<()> {
        let key = parts.join(&b'/');
        if let Some(dest) = self.dest(parts)? {
            create_dir_checked(&dest)?;
            let h = entry.header();
            let owner = h.uid().ok().zip(h.gid().ok()).map(|(u, g)| (u as u32, g as u32));
            self.dirs.push((dest, h.mode().unwrap_or(0o755), h.mtime().unwrap_or(0), owner));
        }
        self.records.push(EntryRecord {
            path: escape_path(&key),
            kind: EntryKind::Dir,
            size: 0,
            sha256: None,
            target: None,
        });
        self.seen.insert(key, EntryKind::Dir);
        Ok(())
    }

    fn symlink<R: Read>(&mut self, parts: &[Vec<u8>], shown: &str, entry: &tar::Entry<R>) -> Result<()> {
        let key = parts.join(&b'/');
        let target = entry
            .link_name_bytes()
            .ok_or_else(|| unsafe_entry(self.name, format!("symlink without a target {shown}")))?
            .into_owned();
        if target.is_empty() || target.contains(&0) {
            return Err(unsafe_entry(self.name, format!("symlink with an invalid target {shown}")));
        }
        if let Some(dest) = self.dest(parts)? {
            ensure_parent(&dest)?;
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &dest)
                .map_err(|e| write_error(&dest, e))?;
            if self.plan.map(|p| p.set_owner).unwrap_or(false) {
                let h = entry.header();
                let _ = std::os::unix::fs::lchown(
                    &dest,
                    h.uid().ok().map(|u| u as u32),
                    h.gid().ok().map(|g| g as u32),
                );
            }
        }
        self.files += 1;
        self.records.push(EntryRecord {
            path: escape_path(&key),
            kind: EntryKind::Symlink,
            size: 0,
            sha256: None,
            target: Some(escape_path(&target)),
        });
        self.seen.insert(key, EntryKind::Symlink);
        Ok(())
    }

    fn file<R: Read>(&mut self, parts: &[Vec<u8>], entry: &mut tar::Entry<R>) -> Result<()> {
        let key = parts.join(&b'/');
        // `entry.size()`, not the header's: a PAX record may override the ustar size field,
        // and that is the size the tar reader will actually hand out.
        let size = entry.size();
        let mode = entry.header().mode().unwrap_or(0o600) & 0o777;
        let mtime = entry.header().mtime().unwrap_or(0);
        let owner = (entry.header().uid().ok(), entry.header().gid().ok());
        let budget = self.manifest.plain_bytes.saturating_sub(self.plain_bytes);
        if size > budget {
            return Err(unsafe_entry(
                self.name,
                format!(
                    "{} declares {size} bytes, more than what is left of the {} bytes its manifest says the whole archive holds",
                    escape_path(&key),
                    self.manifest.plain_bytes
                ),
            ));
        }
        let mut out = match self.dest(parts)? {
            None => None,
            Some(dest) => {
                ensure_parent(&dest)?;
                Some((create_file(&dest)?, dest))
            }
        };
        let mut hashed = HashingReader::new(entry);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match hashed.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(damaged(self.name, &e)),
            };
            self.progress.advance(n as u64);
            if self.progress.cancelled() {
                return Err(Error::Cancelled(format!("reading {}", self.name)));
            }
            if let Some((f, dest)) = out.as_mut() {
                f.write_all(&buf[..n]).map_err(|e| write_error(dest, e))?;
            }
        }
        let (sha256, n) = hashed.finish();
        if n != size {
            return Err(damaged(self.name, &io::Error::from(io::ErrorKind::UnexpectedEof)));
        }
        if let Some((f, dest)) = out {
            f.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| write_error(&dest, e))?;
            if self.plan.map(|p| p.set_owner).unwrap_or(false) {
                let _ = std::os::unix::fs::fchown(&f, owner.0.map(|u| u as u32), owner.1.map(|g| g as u32));
            }
            let _ = f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime));
        }
        self.files += 1;
        self.plain_bytes += n;
        self.records.push(EntryRecord {
            path: escape_path(&key),
            kind: EntryKind::File,
            size: n,
            sha256: Some(sha256),
            target: None,
        });
        self.seen.insert(key, EntryKind::File);
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

    /// Folder modes and times last: a read-only folder must not stop us writing its files,
    /// and writing a file changes its folder's mtime.
    fn apply_dir_metadata(&self, plan: &ExtractPlan) {
        for (dir, mode, mtime, owner) in self.dirs.iter().rev() {
            if plan.set_owner {
                if let Some((u, g)) = owner {
                    let _ = std::os::unix::fs::chown(dir, Some(*u), Some(*g));
                }
            }
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o7777 & !0o6000));
            if let Ok(f) = File::open(dir) {
                let _ = f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(*mtime));
            }
        }
    }
}

fn write_error(dest: &Path, e: io::Error) -> Error {
    if is_disk_full(&e) {
        Error::target(
            dest,
            "the disk is full while restoring; free space or choose a folder on a bigger disk",
        )
    } else {
        Error::io(format!("cannot write {}", dest.display()), e)
    }
}

fn create_dir_checked(dest: &Path) -> Result<()> {
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::io(
            format!("cannot create folder {}", dest.display()),
            io::ErrorKind::AlreadyExists.into(),
        )),
        Err(_) => {
            ensure_parent(dest)?;
            fs::create_dir(dest).map_err(|e| write_error(dest, e))?;
            // Owner-only until the archive's mode is applied at the end.
            let _ = fs::set_permissions(dest, fs::Permissions::from_mode(0o700));
            Ok(())
        }
    }
}

/// Create missing parent folders. The caller has already checked that no ancestor in the
/// archive is a symlink or a file, and the staging root is new and empty, so every folder
/// here is one we create.
fn ensure_parent(dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        if !parent.is_dir() {
            fs::create_dir_all(parent).map_err(|e| write_error(parent, e))?;
        }
    }
    Ok(())
}

fn create_file(dest: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(dest)
        .map_err(|e| write_error(dest, e))
}
