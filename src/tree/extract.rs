//! Writing a backup's entries into staging folders (drill, `restore --to`, the in-place
//! restore), or only checking them (`verify --deep`): the one place that decides whether an
//! entry is safe, for every backup format.
//!
//! The rules: a path is relative plain components under a known top folder
//! ([`crate::archive::entry_path`]); no path twice; every ancestor is a folder of this
//! backup (never below a symlink or a file); a top-level entry is a folder; symlinks only in
//! `uploads`; `db/` holds only `db/<file>`; the content never exceeds what the manifest says
//! the whole backup holds (`budget`: a decompression bomb cannot fill the disk beside the
//! live data), and the destination has room for that much before a byte is written (a
//! drill, which deletes each file once it is written, checks instead that each file fits
//! beside what is still on the disk: [`AfterWrite::Discard`]).
//!
//! How it writes: each route's root is opened once with `O_NOFOLLOW`; below it, folders are
//! created and opened one component at a time relative to their parent's descriptor, files
//! created `O_CREAT|O_EXCL|O_NOFOLLOW` relative to their folder, and owners, modes and times
//! set on descriptors (`fchown`, `fchmod`, `futimens`) or with `AT_SYMLINK_NOFOLLOW`. The
//! staging folders sit in the app's folders, where the app could rename and replace them
//! while root writes: nothing here ever resolves a path through them again.
//!
//! setuid and setgid bits are never restored (a crafted backup could otherwise plant a
//! setuid-root program in the app's folders); the sticky bit on folders is.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, Timestamps};
use sha2::{Digest, Sha256};

use super::{open_dir, EntryMeta, DIR};
use crate::error::{is_disk_full, Error, Result};
use crate::manifest::{escape_path, EntryKind};
use crate::progress::Progress;

/// Where extracted entries go: each top-level folder (`db`, `uploads`, `raw`) to a root
/// folder under which the entry's whole path is created.
#[derive(Debug, Clone)]
pub struct ExtractPlan {
    pub routes: Vec<(String, PathBuf)>,
    /// Restore owners (only possible, and only wanted, as root).
    pub set_owner: bool,
    /// Owners to give instead of the archived ones, per top folder (see [`LiveOwner`]).
    pub live_owners: Vec<LiveOwner>,
    /// Flush everything to disk once extraction is complete (one `syncfs` per filesystem,
    /// not one fsync per file). A restore needs it before the swap; a drill's scratch,
    /// deleted right after, does not.
    pub durable: bool,
    /// What to tell the operator when there is not enough room.
    pub room_hint: &'static str,
    /// Told the path of each file under `db/` as soon as it is written, so that the database
    /// can be checked while the rest is still being extracted (`ops::drill::read_and_check`).
    pub database_written: Option<std::sync::mpsc::Sender<PathBuf>>,
    /// Handed each file but the database once it is written (content, mode, owner, times):
    /// see [`settle_as_written`].
    pub settle: Option<Settler>,
    /// `restore --to --skip-damaged`, snapshots only: a file no copy of whose content can be
    /// read is left out (and named), the others are restored.
    pub skip_damaged: bool,
}

/// What becomes of each written file but the database, on a thread of its own. Nothing reads
/// an upload back from the disk (an archive's hashes are taken on the way in and compared
/// from memory, a snapshot's chunks checked as they are read), so the writing thread, the
/// one a restore or a drill waits for, hands it over and goes on to the next file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterWrite {
    /// A restore: start writing it out to the disk and drop it from the page cache (the
    /// final `syncfs` then has little left to do, and a small Pi keeps its page cache for
    /// the app), then close it. That took 15 % of the writing thread's time in a medium
    /// restore, with the other core half idle.
    WriteOut,
    /// A drill: close and delete it, while the next files extract, instead of all of them
    /// at the end (5,500 entries took 0.15 s of a medium drill's 1.4 s). The scratch folder
    /// never holds the whole backup at once, so it needs room only for the database and the
    /// files not deleted yet: checked file by file, waiting for the deletions to catch up
    /// before refusing one. Folders, links and the database go with the scratch folder at
    /// the end.
    Discard,
}

/// The sending end of [`settle_as_written`]'s thread, in an [`ExtractPlan`].
#[derive(Debug, Clone)]
pub struct Settler {
    what: AfterWrite,
    tx: std::sync::mpsc::SyncSender<ToSettle>,
    /// Bytes of files handed over to be discarded and not deleted yet.
    waiting: Arc<AtomicU64>,
}

impl Settler {
    /// Wait until every file handed over so far is settled (if the thread runs).
    fn flush(&self) {
        let (done, settled) = std::sync::mpsc::channel();
        if self.tx.send(ToSettle::Flush(done)).is_ok() {
            let _ = settled.recv();
        }
    }
}

/// What the writing thread sends the [`Settler`]'s thread.
enum ToSettle {
    File(Written),
    /// Answered once everything sent before it is settled.
    Flush(std::sync::mpsc::Sender<()>),
}

/// A written file on its way to the [`Settler`]'s thread; to discard, with its folder's
/// descriptor and its name.
struct Written {
    file: std::fs::File,
    at: Option<(OwnedFd, CString)>,
    bytes: u64,
}

/// How many written files may wait for the thread (each holds its descriptor, a discarded
/// one its folder's as well): enough to ride out a slow unlink or writeback, few enough for
/// any fd limit.
const SETTLE_QUEUE: usize = 64;

/// Run `f` with `plan` changed so that each file but the database is settled (`what`) on a
/// thread of its own as soon as the extraction has written it. The thread is joined before
/// this returns. If it cannot start, every hand-over fails at once and the writing thread
/// does it itself ([`AfterWrite::Discard`]: the files wait for the scratch folder's removal).
pub fn settle_as_written<T>(mut plan: ExtractPlan, what: AfterWrite, f: impl FnOnce(ExtractPlan) -> T) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel::<ToSettle>(SETTLE_QUEUE);
    let waiting = Arc::new(AtomicU64::new(0));
    plan.settle = Some(Settler { what, tx, waiting: waiting.clone() });
    std::thread::scope(|scope| {
        let name = match what {
            AfterWrite::WriteOut => "datavault-writeout",
            AfterWrite::Discard => "datavault-discard",
        };
        let _ = std::thread::Builder::new().name(name.into()).spawn_scoped(scope, move || {
            for m in rx {
                match m {
                    ToSettle::File(w) => {
                        let n = w.bytes;
                        // A file that could not be deleted stays counted: it is still there.
                        if settle(what, w) {
                            waiting.fetch_sub(n, Ordering::Relaxed);
                        }
                    }
                    ToSettle::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        // `f` drops the plan, and its sender, when it is done: the thread then stops.
        f(plan)
    })
}

/// Whether the file is gone from the disk.
fn settle(what: AfterWrite, w: Written) -> bool {
    match what {
        AfterWrite::WriteOut => {
            crate::fsutil::drop_from_page_cache(&w.file);
            false
        }
        AfterWrite::Discard => {
            drop(w.file);
            let Some((dir, name)) = w.at else { return false };
            rustix::fs::unlinkat(&dir, name.as_c_str(), AtFlags::empty()).is_ok()
        }
    }
}

/// An in-place restore gives the restored entries the owner the live data has now: on a new
/// Pi the app's user may have another uid than on the old one. Entries archived with the
/// same owner as their top entry (the `uploads` folder, the database file) get `uid:gid`;
/// others keep their archived owner.
#[derive(Debug, Clone, Copy)]
pub struct LiveOwner {
    pub top: &'static str,
    pub uid: u32,
    pub gid: u32,
}

impl ExtractPlan {
    /// Everything under one folder (drill, `restore --to`).
    pub fn into_dir(root: &Path) -> ExtractPlan {
        let routes = [crate::archive::TOP_DB, crate::archive::TOP_UPLOADS, crate::archive::TOP_RAW]
            .iter()
            .map(|t| (t.to_string(), root.to_path_buf()))
            .collect();
        ExtractPlan {
            routes,
            set_owner: rustix::process::geteuid().is_root(),
            live_owners: Vec::new(),
            durable: true,
            room_hint: "free space or restore with --to onto a bigger disk",
            database_written: None,
            settle: None,
            skip_damaged: false,
        }
    }

    /// Refuse, before a byte is written, a backup whose content cannot fit where it goes
    /// with room to spare. With the running total checked against the same figure during
    /// extraction, no backup can fill a disk: an in-place restore stages beside the live
    /// data while the app still runs, and must never starve it.
    pub fn check_room(&self, plain_bytes: u64) -> Result<()> {
        for room in self.rooms() {
            if plain_bytes.saturating_add(room.reserve) > room.free {
                return Err(Error::disk_full(
                    &room.dir,
                    format!(
                        "not enough space: the backup holds {} and {} are free (keeping {} for the system); {}",
                        crate::target::human_bytes(plain_bytes),
                        crate::target::human_bytes(room.free),
                        crate::target::human_bytes(room.reserve),
                        self.room_hint
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The room on each filesystem the routes lead to.
    fn rooms(&self) -> Vec<Room> {
        let mut seen = Vec::new();
        let mut rooms = Vec::new();
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
            rooms.push(Room { dir: dir.to_path_buf(), free, reserve });
        }
        rooms
    }

    fn discards(&self) -> Option<&Settler> {
        self.settle.as_ref().filter(|s| s.what == AfterWrite::Discard)
    }
}

/// Free space where extraction writes, and what of it to leave to others.
struct Room {
    dir: PathBuf,
    free: u64,
    reserve: u64,
}

fn unsafe_entry(archive: &str, why: impl std::fmt::Display) -> Error {
    Error::integrity(archive, format!("unsafe content refused: {why}; nothing was restored from it"))
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

fn cstr(bytes: &[u8]) -> CString {
    CString::new(bytes).expect("entry_path refuses NUL bytes")
}

/// Checks entries and, with a plan, writes them. Feed it entries in the backup's order.
pub struct Extractor<'a> {
    archive: &'a str,
    plan: Option<&'a ExtractPlan>,
    /// Each top folder's root, opened once.
    roots: Vec<(String, PathBuf, OwnedFd)>,
    /// What is left of the content the manifest declares.
    budget: u64,
    /// Every path seen so far and its kind: duplicates, and "file, then the same path as a
    /// folder" tricks, are refused.
    seen: HashMap<Vec<u8>, EntryKind>,
    /// Folders' metadata, applied at the end (a read-only folder must not stop us writing
    /// its files, and writing a file changes its folder's mtime).
    dirs: Vec<(Vec<Vec<u8>>, EntryMeta)>,
    /// The archived owner of each top entry, once seen (for [`LiveOwner`]).
    top_owner: HashMap<String, (u32, u32)>,
    /// The folder of the last entry written, kept open: entries come folder by folder.
    cached: Option<(Vec<Vec<u8>>, OwnedFd)>,
    /// When files are discarded as written (a drill), the room is checked file by file
    /// against what is on the disk at that moment rather than once for the whole backup:
    /// the smallest room found at the start, and the bytes written that are not discarded
    /// (the database).
    room: Option<Room>,
    kept: u64,
}

impl<'a> Extractor<'a> {
    /// `budget`: the bytes of content the manifest says the whole backup holds.
    pub fn new(archive: &'a str, plan: Option<&'a ExtractPlan>, budget: u64) -> Result<Extractor<'a>> {
        let mut roots = Vec::new();
        let mut room = None;
        if let Some(plan) = plan {
            if plan.discards().is_some() {
                room = plan.rooms().into_iter().min_by_key(|r| r.free.saturating_sub(r.reserve));
            } else {
                plan.check_room(budget)?;
            }
            for (top, path) in &plan.routes {
                roots.push((top.clone(), path.clone(), open_root(path)?));
            }
        }
        Ok(Extractor {
            archive,
            plan,
            roots,
            budget,
            seen: HashMap::new(),
            dirs: Vec::new(),
            top_owner: HashMap::new(),
            cached: None,
            room,
            kept: 0,
        })
    }

    /// Path-level rules that apply whatever the entry is.
    pub fn check(&mut self, parts: &[Vec<u8>], kind: EntryKind) -> Result<()> {
        let name = self.archive;
        let key = parts.join(&b'/');
        let shown = escape_path(&key);
        if self.seen.contains_key(&key) {
            return Err(unsafe_entry(name, format!("{shown} appears twice")));
        }
        // Every ancestor must be a folder this backup created: never a symlink (writing
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
        if parts.len() == 1 && kind != EntryKind::Dir {
            // A top-level `uploads` that is a symlink or a file would be swapped in as the
            // live uploads folder: a link leading out of it, or a file where a folder must be.
            return Err(unsafe_entry(name, format!("top-level {shown} is not a folder")));
        }
        if kind == EntryKind::Symlink && top != crate::archive::TOP_UPLOADS.as_bytes() {
            return Err(unsafe_entry(name, format!("symlink outside uploads {shown}")));
        }
        if top == crate::archive::TOP_DB.as_bytes() && !(parts.len() == 2 && kind == EntryKind::File) {
            return Err(unsafe_entry(name, format!("unexpected database entry {shown}")));
        }
        Ok(())
    }

    /// A file [`Extractor::file`] failed on, given up (`ExtractPlan::skip_damaged`): what
    /// was written of it is removed; its path stays taken.
    pub fn discard_file(&mut self, parts: &[Vec<u8>], meta: &EntryMeta) -> Result<()> {
        if self.plan.is_some() {
            let (parent, name) = self.parent(parts)?;
            match rustix::fs::unlinkat(&parent, name.as_c_str(), rustix::fs::AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(write_error(&self.shown(parts), e.into())),
            }
        }
        self.done(parts, EntryKind::File, meta);
        Ok(())
    }

    fn done(&mut self, parts: &[Vec<u8>], kind: EntryKind, meta: &EntryMeta) {
        if let Ok(top) = std::str::from_utf8(&parts[0]) {
            self.top_owner.entry(top.to_string()).or_insert((meta.uid, meta.gid));
        }
        self.seen.insert(parts.join(&b'/'), kind);
    }

    pub fn dir(&mut self, parts: &[Vec<u8>], meta: &EntryMeta) -> Result<()> {
        self.check(parts, EntryKind::Dir)?;
        if self.plan.is_some() {
            let (parent, name) = self.parent(parts)?;
            let dest = self.shown(parts);
            match rustix::fs::mkdirat(&parent, name.as_c_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(write_error(&dest, e.into())),
            }
            // It must be a folder we can enter without following anything.
            open_dir(&parent, name.as_c_str()).map_err(|e| self.tampered(&dest, e))?;
            self.dirs.push((parts.to_vec(), *meta));
        }
        self.done(parts, EntryKind::Dir, meta);
        Ok(())
    }

    pub fn symlink(&mut self, parts: &[Vec<u8>], meta: &EntryMeta, target: &[u8]) -> Result<()> {
        self.check(parts, EntryKind::Symlink)?;
        let shown = escape_path(&parts.join(&b'/'));
        if target.is_empty() || target.contains(&0) {
            return Err(unsafe_entry(self.archive, format!("symlink with an invalid target {shown}")));
        }
        if self.plan.is_some() {
            let (parent, name) = self.parent(parts)?;
            let dest = self.shown(parts);
            rustix::fs::symlinkat(OsStr::from_bytes(target), &parent, name.as_c_str())
                .map_err(|e| write_error(&dest, e.into()))?;
            if let Some((uid, gid)) = self.owner_for(parts, meta) {
                let _ = rustix::fs::chownat(
                    &parent,
                    name.as_c_str(),
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                );
            }
            let _ = rustix::fs::utimensat(&parent, name.as_c_str(), &times(meta), AtFlags::SYMLINK_NOFOLLOW);
        }
        self.done(parts, EntryKind::Symlink, meta);
        Ok(())
    }

    /// Check (and with a plan, write) a file of `declared` bytes from `content`; returns its
    /// length and, if `hash`, its SHA-256 (hex). `content` ending early or running long is
    /// damage. An archive asks for the hash (its inner manifest lists one per file); a
    /// snapshot's reader has already checked every byte against its chunk's keyed hash and
    /// the database against the manifest's SHA-256, so a third pass would prove nothing more.
    pub fn file(
        &mut self,
        parts: &[Vec<u8>],
        meta: &EntryMeta,
        declared: u64,
        content: &mut dyn BufRead,
        hash: bool,
        progress: &dyn Progress,
    ) -> Result<(Option<String>, u64)> {
        self.check(parts, EntryKind::File)?;
        let shown = escape_path(&parts.join(&b'/'));
        if declared > self.budget {
            return Err(unsafe_entry(
                self.archive,
                format!("{shown} declares {declared} bytes, more than what is left of what its manifest says the whole backup holds"),
            ));
        }
        self.make_room(&shown, declared)?;
        let mut out = match self.plan {
            None => None,
            Some(_) => {
                let (parent, name) = self.parent(parts)?;
                let dest = self.shown(parts);
                let fd = rustix::fs::openat(
                    &parent,
                    name.as_c_str(),
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| write_error(&dest, e.into()))?;
                Some((std::fs::File::from(fd), dest, parent, name))
            }
        };
        let mut sha = hash.then(Sha256::new);
        let mut n_read = 0u64;
        // Written straight from the reader's buffer (a snapshot chunk, or an archive's
        // BufReader): no copy in between.
        let mut content = content.take(declared);
        loop {
            let piece = match content.fill_buf() {
                Ok([]) => break,
                Ok(piece) => piece,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A snapshot's reader says itself what went wrong (damage, a cancel).
                Err(e) if e.get_ref().is_some_and(|r| r.is::<crate::store::dedup::read::ContentError>()) => {
                    return Err(crate::store::dedup::read::content_error(self.archive, e))
                }
                Err(e) => return Err(damaged(self.archive, &e)),
            };
            let n = piece.len();
            if let Some(h) = sha.as_mut() {
                h.update(piece);
            }
            if let Some((f, dest, ..)) = out.as_mut() {
                f.write_all(piece).map_err(|e| write_error(dest, e))?;
            }
            content.consume(n);
            n_read += n as u64;
            progress.advance(n as u64);
            if progress.cancelled() {
                return Err(Error::Cancelled(format!("reading {}", self.archive)));
            }
        }
        let (sha256, n) = (sha.map(crate::fsutil::hex_digest), n_read);
        if n != declared {
            return Err(damaged(self.archive, &io::Error::from(io::ErrorKind::UnexpectedEof)));
        }
        self.budget -= n;
        if let Some((f, dest, parent, name)) = out {
            rustix::fs::fchmod(&f, Mode::from_raw_mode(meta.mode & 0o777))
                .map_err(|e| write_error(&dest, e.into()))?;
            if let Some((uid, gid)) = self.owner_for(parts, meta) {
                let _ = rustix::fs::fchown(
                    &f,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                );
            }
            let _ = rustix::fs::futimens(&f, &times(meta));
            let is_db = parts[0] == crate::archive::TOP_DB.as_bytes();
            if is_db {
                // Not settled: its checks are about to read it.
                self.kept += n;
                drop(f);
                if let Some(tx) = self.plan.and_then(|p| p.database_written.as_ref()) {
                    // Nobody listening any more is not our concern.
                    let _ = tx.send(dest);
                }
            } else if let Some(s) = self.plan.and_then(|p| p.settle.as_ref()) {
                let at = (s.what == AfterWrite::Discard).then_some((parent, name));
                if at.is_some() {
                    // Counted before it is sent, so the thread never takes away more than
                    // was added; a file it never gets stays counted, as it stays on disk.
                    s.waiting.fetch_add(n, Ordering::Relaxed);
                }
                let w = Written { file: f, at, bytes: n };
                if let Err(std::sync::mpsc::SendError(ToSettle::File(w))) = s.tx.send(ToSettle::File(w)) {
                    // No thread: a discarded file waits for the scratch folder's removal.
                    if s.what == AfterWrite::WriteOut {
                        let _ = settle(s.what, w);
                    }
                }
            } else if self.plan.is_some_and(|p| p.durable) {
                // Start writing it out now, while the next files are extracted, rather than
                // all at once in the final syncfs.
                crate::fsutil::drop_from_page_cache(&f);
            }
        }
        self.done(parts, EntryKind::File, meta);
        Ok((sha256, n))
    }

    /// When files are discarded as written: refuse a file that cannot fit beside what is on
    /// the disk now (the database, and the files not deleted yet), after waiting for the
    /// deletions to catch up. Without this a drill would need room for the whole backup,
    /// though it never holds more than the database and a few files at once.
    fn make_room(&self, shown: &str, declared: u64) -> Result<()> {
        let (Some(room), Some(settler)) = (&self.room, self.plan.and_then(|p| p.discards())) else {
            return Ok(());
        };
        let allowed = room.free.saturating_sub(room.reserve);
        let held = || self.kept + settler.waiting.load(Ordering::Relaxed);
        if held().saturating_add(declared) <= allowed {
            return Ok(());
        }
        settler.flush();
        let held = held();
        if held.saturating_add(declared) <= allowed {
            return Ok(());
        }
        let hint = self.plan.map(|p| p.room_hint).unwrap_or_default();
        Err(Error::disk_full(
            &room.dir,
            format!(
                "not enough space for {shown} ({}): {} were free when extraction began, {} of it taken by what is extracted so far, {} kept for the system; {hint}",
                crate::target::human_bytes(declared),
                crate::target::human_bytes(room.free),
                crate::target::human_bytes(held),
                crate::target::human_bytes(room.reserve),
            ),
        ))
    }

    /// Folder modes, owners and times, deepest first (not when files are discarded: a
    /// drill's); then everything to disk if asked.
    pub fn finish(mut self) -> Result<()> {
        let Some(plan) = self.plan else { return Ok(()) };
        self.cached = None;
        // A drill's folders are deleted next: their modes and times would prove nothing
        // (setting them never fails the run), and took 2,500 opens at the end of a drill.
        let dirs = if plan.discards().is_some() { Vec::new() } else { std::mem::take(&mut self.dirs) };
        for (parts, meta) in dirs.iter().rev() {
            let Ok((parent, name)) = self.parent(parts) else { continue };
            let Ok(fd) = open_dir(&parent, name.as_c_str()) else {
                log::warn!(
                    "{}: changed while restoring; its mode and times were not set",
                    self.shown(parts).display()
                );
                continue;
            };
            if let Some((uid, gid)) = self.owner_for(parts, meta) {
                let _ = rustix::fs::fchown(
                    &fd,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                );
            }
            let _ = rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode & 0o1777));
            let _ = rustix::fs::futimens(&fd, &times(meta));
        }
        if plan.durable {
            for (_, path, fd) in &self.roots {
                rustix::fs::syncfs(fd).map_err(|e| write_error(path, e.into()))?;
            }
        }
        Ok(())
    }

    /// The owner to give an entry: none unless root; the live owner where the plan maps it.
    fn owner_for(&self, parts: &[Vec<u8>], meta: &EntryMeta) -> Option<(u32, u32)> {
        let plan = self.plan.filter(|p| p.set_owner)?;
        let top = std::str::from_utf8(&parts[0]).ok()?;
        if let Some(live) = plan.live_owners.iter().find(|l| l.top == top) {
            let archived = self.top_owner.get(top).copied().unwrap_or((meta.uid, meta.gid));
            if (meta.uid, meta.gid) == archived {
                return Some((live.uid, live.gid));
            }
        }
        Some((meta.uid, meta.gid))
    }

    /// The folder an entry goes in (opened, created if missing) and the entry's own name.
    fn parent(&mut self, parts: &[Vec<u8>]) -> Result<(OwnedFd, CString)> {
        let (name, dirs) = parts.split_last().expect("entry_path gives at least one component");
        let name = cstr(name);
        if let Some((cached, fd)) = &self.cached {
            if cached.as_slice() == dirs {
                let fd = fd.try_clone().map_err(|e| Error::io("cannot duplicate a descriptor", e))?;
                return Ok((fd, name));
            }
        }
        let root_fd = match self.roots.iter().find(|(t, _, _)| t.as_bytes() == parts[0].as_slice()) {
            Some((_, _, fd)) => fd,
            None => {
                return Err(Error::integrity(
                    self.archive,
                    format!(
                        "holds {}/ entries, which an in-place restore cannot place (only a safety copy of a damaged database has them); restore it with --to DIR",
                        escape_path(&parts[0])
                    ),
                ))
            }
        };
        let mut fd = root_fd.try_clone().map_err(|e| Error::io("cannot duplicate a descriptor", e))?;
        // parts[0] is the route's top: its root folder holds it (`<root>/uploads/...`).
        for (i, c) in dirs.iter().enumerate() {
            let c = cstr(c);
            let next = match open_dir(&fd, c.as_c_str()) {
                Err(rustix::io::Errno::NOENT) => {
                    match rustix::fs::mkdirat(&fd, c.as_c_str(), Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(write_error(&self.shown(&parts[..=i]), e.into())),
                    }
                    open_dir(&fd, c.as_c_str())
                }
                other => other,
            };
            fd = next.map_err(|e| self.tampered(&self.shown(&parts[..=i]), e))?;
        }
        let keep = fd.try_clone().map_err(|e| Error::io("cannot duplicate a descriptor", e))?;
        self.cached = Some((dirs.to_vec(), keep));
        Ok((fd, name))
    }

    /// A folder we made is not one now (a link or a file put in its place meanwhile).
    fn tampered(&self, dest: &Path, e: rustix::io::Errno) -> Error {
        match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => Error::integrity(
                self.archive,
                format!("{} was replaced while restoring (by a link or a file): refused, nothing outside staging was touched", dest.display()),
            ),
            e => write_error(dest, e.into()),
        }
    }

    /// Where an entry lands, for messages.
    fn shown(&self, parts: &[Vec<u8>]) -> PathBuf {
        let root = self
            .roots
            .iter()
            .find(|(t, _, _)| t.as_bytes() == parts[0].as_slice())
            .map(|(_, p, _)| p.clone())
            .unwrap_or_default();
        crate::archive::join(&root, parts)
    }
}

/// A route's root folder: created private if missing, never a link.
fn open_root(path: &Path) -> Result<OwnedFd> {
    match rustix::fs::mkdir(path, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(write_error(path, e.into())),
    }
    rustix::fs::open(path, DIR, Mode::empty()).map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => Error::Restore(format!(
            "{} is a link or a file where datavault's staging folder should be; remove it and try again",
            path.display()
        )),
        e => write_error(path, e.into()),
    })
}

fn times(meta: &EntryMeta) -> Timestamps {
    let t = rustix::fs::Timespec { tv_sec: meta.mtime, tv_nsec: meta.mtime_ns.min(999_999_999) as _ };
    Timestamps { last_access: t, last_modification: t }
}

/// Damage found while reading a backup's content.
pub fn damaged(archive: &str, e: &io::Error) -> Error {
    let what = match e.kind() {
        io::ErrorKind::UnexpectedEof => "truncated (the data ends early)".to_string(),
        io::ErrorKind::InvalidData => format!("damaged ({e})"),
        _ => format!("unreadable ({e})"),
    };
    Error::integrity(archive, format!("{what}; use another archive"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> EntryMeta {
        EntryMeta { mode: 0o4755, uid: 0, gid: 0, mtime: 1_700_000_000, mtime_ns: 0 }
    }

    fn parts(p: &str) -> Vec<Vec<u8>> {
        crate::archive::entry_path(p.as_bytes()).unwrap()
    }

    #[test]
    fn writes_below_its_roots_never_through_a_planted_link() {
        let d = tempfile::tempdir().unwrap();
        let stage = d.path().join("stage");
        let outside = tempfile::tempdir().unwrap();
        let plan = ExtractPlan { durable: false, ..ExtractPlan::into_dir(&stage) };
        let mut x = Extractor::new("a", Some(&plan), 1 << 20).unwrap();
        x.dir(&parts("uploads"), &meta()).unwrap();
        x.dir(&parts("uploads/sub"), &meta()).unwrap();
        let (sha, n) = x
            .file(&parts("uploads/sub/f"), &meta(), 3, &mut &b"abc"[..], true, &crate::progress::NoProgress)
            .unwrap();
        assert_eq!(n, 3);
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha.as_deref(), Some(abc), "the SHA-256 of what was written");
        let (sha, n) = x
            .file(&parts("uploads/sub/e"), &meta(), 2, &mut &b"ab"[..], false, &crate::progress::NoProgress)
            .unwrap();
        assert_eq!((sha, n), (None, 2), "no hash unless asked");
        assert_eq!(std::fs::read(stage.join("uploads/sub/e")).unwrap(), b"ab");
        // The app swaps the folder being written for a link to somewhere else.
        std::fs::rename(stage.join("uploads/sub"), d.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(outside.path(), stage.join("uploads/sub")).unwrap();
        // The cached descriptor still points at the real folder (now moved): the file lands
        // there; and a folder reached anew through the link is refused.
        x.file(&parts("uploads/sub/g"), &meta(), 3, &mut &b"xyz"[..], true, &crate::progress::NoProgress)
            .unwrap();
        assert!(d.path().join("moved/g").exists());
        let e = x.dir(&parts("uploads/sub/deeper"), &meta());
        assert!(e.is_err() || !outside.path().join("deeper").exists());
        x.dir(&parts("uploads/other"), &meta()).unwrap();
        let e =
            x.file(&parts("uploads/sub/h"), &meta(), 3, &mut &b"xyz"[..], true, &crate::progress::NoProgress);
        assert!(e.is_err(), "a link in place of a folder we made is refused once the cache moved on");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "nothing written through the link");
    }

    #[test]
    fn the_plan_hears_of_each_database_file_once_it_is_written_and_of_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let stage = d.path().join("stage");
        let (tx, rx) = std::sync::mpsc::channel();
        let plan = ExtractPlan { database_written: Some(tx), ..ExtractPlan::into_dir(&stage) };
        let mut x = Extractor::new("a", Some(&plan), 1 << 20).unwrap();
        x.file(&parts("db/app.db"), &meta(), 3, &mut &b"abc"[..], false, &crate::progress::NoProgress)
            .unwrap();
        let told = rx.try_recv().expect("told as soon as the file is complete");
        assert_eq!(told, stage.join("db/app.db"));
        assert_eq!(std::fs::read(&told).unwrap(), b"abc", "all of it is there when told");
        x.dir(&parts("uploads"), &meta()).unwrap();
        x.file(&parts("uploads/f"), &meta(), 2, &mut &b"xy"[..], false, &crate::progress::NoProgress)
            .unwrap();
        x.finish().unwrap();
        assert!(rx.try_recv().is_err(), "uploads are not announced");
        assert_eq!(std::fs::read(stage.join("uploads/f")).unwrap(), b"xy", "nor lost to the early writeback");
    }

    /// Extract a database, a folder of 200 files and a link with `what`; the closure's answer
    /// comes back once the settling thread is joined.
    fn settled(what: AfterWrite, root: &Path) {
        let m = EntryMeta { mode: 0o750, ..meta() };
        let no = &crate::progress::NoProgress;
        let plan = ExtractPlan { durable: what == AfterWrite::WriteOut, ..ExtractPlan::into_dir(root) };
        let n = settle_as_written(plan, what, |plan| {
            let mut x = Extractor::new("a", Some(&plan), 1 << 20).unwrap();
            x.file(&parts("db/app.db"), &m, 3, &mut &b"abc"[..], false, no).unwrap();
            x.dir(&parts("uploads"), &m).unwrap();
            x.dir(&parts("uploads/sub"), &m).unwrap();
            for i in 0..200 {
                let name = format!("uploads/sub/f{i}");
                x.file(&parts(&name), &m, 2, &mut &b"xy"[..], false, no).unwrap();
            }
            x.symlink(&parts("uploads/link"), &m, b"sub/f1").unwrap();
            x.finish().unwrap();
            200
        });
        assert_eq!(n, 200, "the closure's answer comes back");
    }

    #[test]
    fn a_drill_s_uploads_go_as_soon_as_written_a_restore_s_are_all_kept_the_database_always() {
        use std::os::unix::fs::PermissionsExt;
        let drill = tempfile::tempdir().unwrap();
        settled(AfterWrite::Discard, drill.path());
        // The scope joined the thread: every upload it was handed is gone.
        assert_eq!(std::fs::read_dir(drill.path().join("uploads/sub")).unwrap().count(), 0);
        assert_eq!(std::fs::read(drill.path().join("db/app.db")).unwrap(), b"abc", "the database stays");
        assert!(
            drill.path().join("uploads/link").symlink_metadata().is_ok(),
            "links go with the scratch folder"
        );

        let restore = tempfile::tempdir().unwrap();
        settled(AfterWrite::WriteOut, restore.path());
        let sub = restore.path().join("uploads/sub");
        assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 200);
        for i in 0..200 {
            let f = sub.join(format!("f{i}"));
            assert_eq!(std::fs::read(&f).unwrap(), b"xy");
            assert_eq!(f.metadata().unwrap().permissions().mode() & 0o7777, 0o750);
        }
        assert_eq!(std::fs::read(restore.path().join("db/app.db")).unwrap(), b"abc");
        // Folders get their modes at the end of a restore, not of a drill.
        assert_eq!(sub.metadata().unwrap().permissions().mode() & 0o7777, 0o750);
        assert_ne!(drill.path().join("uploads/sub").metadata().unwrap().permissions().mode() & 0o7777, 0o750);
    }

    #[test]
    fn a_discarding_extraction_needs_room_for_what_it_keeps_and_one_file_not_for_everything() {
        let d = tempfile::tempdir().unwrap();
        let m = EntryMeta { mode: 0o750, ..meta() };
        let no = &crate::progress::NoProgress;
        let plan = ExtractPlan { durable: false, ..ExtractPlan::into_dir(d.path()) };
        settle_as_written(plan, AfterWrite::Discard, |plan| {
            let mut x = Extractor::new("a", Some(&plan), 1 << 20).unwrap();
            // 1,000 bytes of room, whatever this machine's disk has.
            x.room = Some(Room { dir: d.path().to_path_buf(), free: 1_100, reserve: 100 });
            x.file(&parts("db/app.db"), &m, 300, &mut &[1u8; 300][..], false, no).unwrap();
            x.dir(&parts("uploads"), &m).unwrap();
            // Each fits beside the database once the one before it is deleted, and 20 of
            // them are 14 times the room: the extraction waits for the deletions.
            for i in 0..20 {
                let name = format!("uploads/f{i}");
                x.file(&parts(&name), &m, 700, &mut &[2u8; 700][..], false, no).unwrap();
            }
            // The database stays: 300 + 701 does not fit.
            let e = x.file(&parts("uploads/big"), &m, 701, &mut &[3u8; 701][..], false, no).unwrap_err();
            assert!(matches!(e, Error::DiskFull { .. }), "{e:?}");
            assert!(
                e.to_string().contains("uploads/big") && e.to_string().contains("not enough space"),
                "{e}"
            );
            assert!(!d.path().join("uploads/big").exists(), "refused before it was created");
        });
        assert_eq!(std::fs::read_dir(d.path().join("uploads")).unwrap().count(), 0);
    }

    #[test]
    fn setuid_bits_are_never_restored_and_budgets_hold() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let stage = d.path().join("stage");
        let plan = ExtractPlan { durable: false, ..ExtractPlan::into_dir(&stage) };
        let mut x = Extractor::new("a", Some(&plan), 4).unwrap();
        x.dir(&parts("uploads"), &meta()).unwrap();
        x.file(&parts("uploads/f"), &meta(), 3, &mut &b"abc"[..], true, &crate::progress::NoProgress)
            .unwrap();
        let e = x
            .file(&parts("uploads/g"), &meta(), 3, &mut &b"abc"[..], true, &crate::progress::NoProgress)
            .unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        x.finish().unwrap();
        let mode = std::fs::metadata(stage.join("uploads/f")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755, "no setuid");
        let mode = std::fs::metadata(stage.join("uploads")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
    }

    #[test]
    fn the_rules_refuse_what_a_restore_must_never_write() {
        let mut x = Extractor::new("a", None, 1 << 20).unwrap();
        let m = meta();
        assert!(x.symlink(&parts("uploads"), &m, b"/etc").is_err(), "top-level link");
        x.dir(&parts("uploads"), &m).unwrap();
        x.symlink(&parts("uploads/l"), &m, b"/etc").unwrap();
        assert!(x
            .file(&parts("uploads/l/x"), &m, 0, &mut &b""[..], true, &crate::progress::NoProgress)
            .is_err());
        assert!(x.dir(&parts("uploads"), &m).is_err(), "twice");
        assert!(x.symlink(&parts("db/x"), &m, b"y").is_err(), "link in db");
        assert!(x.dir(&parts("db/x"), &m).is_err(), "folder in db");
    }
}
