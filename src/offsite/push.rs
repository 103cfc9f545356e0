//! The push engine: copy from one [`Backend`] (the USB drive) to another (the bucket)
//! whatever the destination lacks, in visibility order, resumably, in bounded memory.
//! It knows the store's layout but nothing of S3: tests run it between memory backends.
//!
//! **Order.** Whatever makes a backup visible goes last, so a push cut at any point leaves
//! nothing half-visible on the remote:
//! 1. archives, newest first, each `<stem>.tar.zst.age` then its `<stem>.json`;
//! 2. the snapshot store: `store/config.json`, then for the snapshots the bucket keeps and
//!    lacks, the index files and packs holding the chunks the bucket has not, their trees and
//!    refs, and last their `store/snapshots/*.json`.
//!
//! The bucket's store is not a mirror of the drive's: it keeps the snapshots its own
//! retention keeps, and `offsite prune` collects packs no snapshot there needs. So for each
//! snapshot it makes visible, the push reads the snapshot's refs (secret-free) and sends the
//! packs that hold the chunks the bucket's index lacks, found through the drive's index, each
//! with an index file that names it and *before* it: a reader ignores an index entry for a
//! pack that is not there, while a pack no index names would be a leftover for the
//! collection. The two indexes live in SQLite caches in the state folder, so memory does not
//! grow with the store. A push and a prune on two machines keep apart through markers
//! ([`super::locks`]). A snapshot manifest goes only if every store file listed before it
//! reached the remote.
//!
//! **Resume.** Files are never appended to: a file is on the remote complete or not at all.
//! A push killed mid-file leaves an unfinished multipart upload, which the next push aborts
//! (the S3 layer's job, before the engine runs), then sends the file again; everything
//! already there is skipped after one listing per folder.
//!
//! **Never overwrite, never propagate damage.** A remote object of the same name but another
//! size is a conflict: reported (exit 4), not touched, and the backup or snapshot it belongs
//! to is not made visible. Each file is hashed while it streams; an archive whose bytes do not
//! match its manifest's SHA-256, or a pack whose bytes do not match its name, is not
//! committed (the upload is abandoned before it becomes visible).
//!
//! **What is not sent.** `*.partial`, anything whose name datavault would not write, an
//! archive without its manifest (a backup in progress), and archives the remote retention
//! policy would not keep (so `offsite prune` elsewhere is not undone by the next push).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ledger::{Ledger, LedgerWriter, Record, FLUSH_EVERY};
use crate::manifest::Manifest;
use crate::progress::Progress;
use crate::retention::{ArchiveKind, Candidate, Health, RetentionPolicy};
use crate::store::backend::{join, Backend};
use crate::store::dedup::{self, format as store_format, Cache};
use crate::store::{ARCHIVE_SUFFIX, MANIFEST_SUFFIX};

/// Files at least this big get their ledger record written as soon as they are sent.
const BIG_FILE: u64 = 16 << 20;

/// What one push did, and what the remote still lacks afterwards.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushReport {
    pub source: String,
    pub destination: String,
    pub dry_run: bool,
    /// Files sent (or, with `dry_run`, that would be).
    pub uploaded: Vec<Sent>,
    pub uploaded_bytes: u64,
    /// Files already on the remote.
    pub already_there: usize,
    /// Files on the remote that no ledger recorded (a killed push), read back, matched and
    /// recorded now.
    pub adopted: Vec<String>,
    /// Archives the remote's retention policy does not keep: not sent.
    pub not_kept_remotely: Vec<String>,
    /// Remote objects that differ from the local file: left alone, exit 4.
    pub conflicts: Vec<Problem>,
    /// Local files whose bytes do not match their manifest or name: not sent, exit 4.
    pub damaged_locally: Vec<Problem>,
    /// Listed, then gone before they were read (a local prune ran meanwhile).
    pub vanished: Vec<String>,
    /// Why no snapshot data was sent this time (a prune of the bucket is running): the next
    /// push sends it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots_deferred: Option<String>,
    /// After this push.
    pub behind: Behind,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sent {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub path: String,
    pub why: String,
}

/// What the remote lacks: backups and snapshots not visible there, and the files and bytes
/// that would have to travel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Behind {
    pub backups: usize,
    pub snapshots: usize,
    pub files: usize,
    pub bytes: u64,
    /// Newest backup (archive name) that is visible on the remote.
    pub newest_remote_backup: Option<String>,
}

impl PushReport {
    /// Nothing is wrong with any object (conflicts and damage make `offsite push` exit 4).
    pub fn clean(&self) -> bool {
        self.conflicts.is_empty() && self.damaged_locally.is_empty()
    }
}

pub struct PushOptions {
    /// What the remote keeps (`[offsite.retention]`).
    pub retention: RetentionPolicy,
    pub dry_run: bool,
    pub now: DateTime<Utc>,
    /// Where the chunk-index caches of the drive and of the bucket live (the state folder);
    /// `None`: in memory (tests).
    pub cache_dir: Option<PathBuf>,
}

/// The caches' file names in [`PushOptions::cache_dir`].
pub const LOCAL_CACHE: &str = "offsite-drive-index.db";
pub const REMOTE_CACHE: &str = "offsite-bucket-index.db";

/// One file to send.
#[derive(Debug, Clone)]
struct Item {
    path: String,
    size: u64,
    /// What its bytes must hash to, when the layout says (manifest, pack name).
    expect: Option<String>,
    /// The backup or snapshot this file belongs to; for store data, `None` (shared).
    unit: Option<Unit>,
    /// This file makes its unit visible.
    visible: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Unit {
    Backup(String),
    Snapshot(String),
}

/// Copy whatever `dst` lacks from `src`. I/O errors (the server unreachable, the drive
/// gone) end the push with an error, after the ledger of what was sent is written; a
/// conflict or a damaged local file is reported and the rest goes on.
// Long on purpose (#12): one loop over the plan whose outcomes per file share the blocked
// units, the ledger writer and the report; split, each step would carry all three.
pub fn push(
    src_store: Arc<dyn Backend>,
    dst_store: Arc<dyn Backend>,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> io::Result<PushReport> {
    let (src, dst) = (&*src_store, &*dst_store);
    let mut report = PushReport {
        source: src.location(),
        destination: dst.location(),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    // What the remote has and what it lacks. Looked at again once the push's marker is in
    // the bucket (super::locks): a prune that ran before it is then seen in full.
    let survey = |report: &mut PushReport| -> io::Result<(Vec<Item>, HashMap<String, u64>)> {
        let top_remote: HashMap<String, u64> = dst.list("")?.into_iter().map(|o| (o.name, o.size)).collect();
        let mut items = plan(src, &top_remote, opts, report)?;
        store_items(&src_store, &dst_store, opts, &mut items, report)?;
        let mut remote = top_remote;
        let dirs: BTreeSet<&str> =
            items.iter().filter_map(|i| i.path.rsplit_once('/').map(|(d, _)| d)).collect();
        for d in dirs {
            for o in dst.list(d)? {
                remote.insert(join(d, &o.name), o.size);
            }
        }
        Ok((items, remote))
    };
    let blank = report.clone();
    let (mut items, mut remote) = survey(&mut report)?;
    let mut marker = None;
    if !opts.dry_run && items.iter().any(|i| i.path.starts_with("store/") && !remote.contains_key(&i.path)) {
        marker = Some(super::locks::write(dst, "push", opts.now)?);
        match super::locks::prune_running(&super::locks::list(dst)?, opts.now, None) {
            Some(t) => {
                report.snapshots_deferred = Some(format!(
                    "a prune of the bucket started at {} is running; the snapshots go with the next push",
                    t.format("%Y-%m-%d %H:%M UTC")
                ))
            }
            None => {
                report = blank;
                (items, remote) = survey(&mut report)?;
            }
        }
    }
    let ledger = Ledger::load(dst)?;
    let mut writer = LedgerWriter::new(opts.now);
    let mut blocked: HashSet<Unit> = HashSet::new();
    // A problem with any shared store file blocks every snapshot manifest of this push.
    let mut store_blocked = false;

    let all_items = items.clone();
    if report.snapshots_deferred.is_some() {
        items.retain(|i| !i.path.starts_with("store/"));
    }
    let todo: u64 = items.iter().filter(|i| !remote.contains_key(&i.path)).map(|i| i.size).sum();
    progress.start("offsite", todo);
    let result = (|| -> io::Result<()> {
        for item in &items {
            let unit_blocked = item.unit.as_ref().is_some_and(|u| blocked.contains(u))
                || (store_blocked && matches!(item.unit, Some(Unit::Snapshot(_))) && item.visible);
            if unit_blocked && item.visible {
                continue;
            }
            let block = |blocked: &mut HashSet<Unit>, store_blocked: &mut bool| match &item.unit {
                Some(u) => {
                    blocked.insert(u.clone());
                }
                None => *store_blocked = true,
            };
            match remote.get(&item.path) {
                Some(&size) if size == item.size => {
                    report.already_there += 1;
                    if ledger.get(&item.path).is_none_or(|r| r.size != size) && !opts.dry_run {
                        match adopt(src, dst, item)? {
                            Ok(record) => {
                                writer.add(record);
                                report.adopted.push(item.path.clone());
                            }
                            Err(why) => {
                                report.conflicts.push(Problem { path: item.path.clone(), why });
                                block(&mut blocked, &mut store_blocked);
                            }
                        }
                    }
                }
                Some(&size) => {
                    report.conflicts.push(Problem {
                        path: item.path.clone(),
                        why: format!(
                            "the remote object is {size} bytes, the local file {}: not overwritten",
                            item.size
                        ),
                    });
                    block(&mut blocked, &mut store_blocked);
                }
                None if opts.dry_run => {
                    report.uploaded.push(Sent { path: item.path.clone(), size: item.size });
                    report.uploaded_bytes += item.size;
                }
                None => match copy(src, dst, item, progress)? {
                    Copied::Done(record) => {
                        report.uploaded.push(Sent { path: item.path.clone(), size: record.size });
                        report.uploaded_bytes += record.size;
                        remote.insert(item.path.clone(), record.size);
                        writer.add(record);
                        // Recorded at once after a visible file, a big one (so a kill never
                        // makes the next push read a large archive back to adopt it), or a batch.
                        if item.visible || item.size >= BIG_FILE || writer.pending() >= FLUSH_EVERY {
                            writer.flush(dst)?;
                        }
                    }
                    Copied::Vanished => {
                        report.vanished.push(item.path.clone());
                        block(&mut blocked, &mut store_blocked);
                    }
                    Copied::Damaged(why) => {
                        report.damaged_locally.push(Problem { path: item.path.clone(), why });
                        block(&mut blocked, &mut store_blocked);
                    }
                    Copied::Exists(why) => {
                        report.conflicts.push(Problem { path: item.path.clone(), why });
                        block(&mut blocked, &mut store_blocked);
                    }
                },
            }
        }
        Ok(())
    })();
    progress.finish();
    // What was sent is recorded even when the push failed half-way.
    let flushed = if opts.dry_run { Ok(()) } else { writer.flush(dst) };
    // Over, whichever way: the collection need not wait for this push any more.
    let finished = marker.map_or(Ok(()), |m| super::locks::finish_push(dst, &m));
    result?;
    flushed?;
    finished?;
    report.behind = behind(&all_items, &remote);
    Ok(report)
}

/// The names the remote retention keeps among both sides' archives (name, kind, created;
/// a name on both sides counts once): a push sends nothing the bucket's prune would drop.
/// Every one is taken as good: the bucket keeps no drill results of its own.
fn kept_by_retention(
    retention: &RetentionPolicy,
    archives: impl Iterator<Item = (String, ArchiveKind, DateTime<Utc>)>,
) -> HashSet<String> {
    let mut seen = HashSet::new();
    let candidates: Vec<Candidate> = archives
        .filter(|(name, ..)| seen.insert(name.clone()))
        .map(|(name, kind, created)| Candidate { name, kind, created, health: Health::Good, drilled: false })
        .collect();
    retention.apply(&candidates, crate::ops::now()).into_iter().filter(|d| d.keep).map(|d| d.name).collect()
}

/// The files to send, in order. Reads the local manifests (archives: the SHA-256 to expect).
fn plan(
    src: &dyn Backend,
    top_remote: &HashMap<String, u64>,
    opts: &PushOptions,
    report: &mut PushReport,
) -> io::Result<Vec<Item>> {
    let top: HashMap<String, u64> = src.list("")?.into_iter().map(|o| (o.name, o.size)).collect();
    let local_pairs: Vec<(String, DateTime<Utc>, ArchiveKind)> = pairs(&top);
    let remote_pairs = pairs(top_remote);
    // Retention over everything either side has, so an archive pruned remotely (and still
    // kept locally) is not sent again.
    let keep = kept_by_retention(
        &opts.retention,
        local_pairs
            .iter()
            .chain(remote_pairs.iter())
            .map(|(stem, created, kind)| (stem.clone(), *kind, *created)),
    );

    let mut items = Vec::new();
    let mut by_age = local_pairs;
    by_age.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    for (stem, _, _) in by_age {
        let archive = format!("{stem}{ARCHIVE_SUFFIX}");
        let manifest = format!("{stem}{MANIFEST_SUFFIX}");
        if !keep.contains(&stem) {
            if !top_remote.contains_key(&manifest) {
                report.not_kept_remotely.push(archive);
            }
            continue;
        }
        let m = match src.read_small(&manifest, 16 << 20) {
            Ok(bytes) => Manifest::parse(&archive, &bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                report.vanished.push(manifest);
                continue;
            }
            Err(e) => return Err(e),
        };
        let m = match m {
            Ok(m) if m.archive == archive && m.archive_size == top[&archive] => m,
            Ok(m) => {
                report.damaged_locally.push(Problem {
                    path: archive,
                    why: format!(
                        "the manifest describes {} of {} bytes, the file is {} bytes: not sent",
                        m.archive,
                        m.archive_size,
                        top[&format!("{stem}{ARCHIVE_SUFFIX}")]
                    ),
                });
                continue;
            }
            Err(e) => {
                report.damaged_locally.push(Problem { path: manifest, why: format!("{e}: not sent") });
                continue;
            }
        };
        let unit = Some(Unit::Backup(stem.clone()));
        items.push(Item {
            path: archive,
            size: m.archive_size,
            expect: Some(m.archive_sha256),
            unit: unit.clone(),
            visible: false,
        });
        items.push(Item { path: manifest.clone(), size: top[&manifest], expect: None, unit, visible: true });
    }

    Ok(items)
}

/// The snapshot store's files (#9), when the drive has one: its config; for each snapshot
/// the remote keeps and lacks, the index files and packs holding the chunks the remote's
/// index has not (index files before packs); then each such snapshot's tree and refs; and
/// last their manifests. Snapshots the remote shows already are listed too (tree, refs,
/// manifest), so that they count as there.
fn store_items(
    src: &Arc<dyn Backend>,
    dst: &Arc<dyn Backend>,
    opts: &PushOptions,
    items: &mut Vec<Item>,
    report: &mut PushReport,
) -> io::Result<()> {
    let Some(config_size) = src.size(store_format::CONFIG_PATH)? else { return Ok(()) };
    let damaged = |report: &mut PushReport, path: &str, why: String| {
        report.damaged_locally.push(Problem { path: path.to_string(), why })
    };
    let local = match dedup::Store::open(src.clone()) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(()),
        Err(e) => {
            damaged(report, store_format::CONFIG_PATH, format!("{e}: no snapshot sent"));
            return Ok(());
        }
    };
    let remote = match dedup::Store::open(dst.clone()) {
        Ok(Some(r)) if r.config().store_id != local.config().store_id => {
            report.conflicts.push(Problem {
                path: store_format::CONFIG_PATH.into(),
                why:
                    "the bucket holds another drive's snapshot store (a new drive?): no snapshot sent; \
                      give [offsite] url another prefix, or delete the bucket's store/ from a trusted machine"
                        .into(),
            });
            return Ok(());
        }
        Ok(r) => r,
        Err(e) => {
            report.conflicts.push(Problem {
                path: store_format::CONFIG_PATH.into(),
                why: format!("the bucket's copy: {e}; no snapshot sent"),
            });
            return Ok(());
        }
    };
    let store_item = |path: String, size: u64, expect: Option<String>| Item {
        path,
        size,
        expect,
        unit: None,
        visible: false,
    };
    items.push(store_item(store_format::CONFIG_PATH.into(), config_size, None));

    let snaps = local.list_snapshots().map_err(other)?;
    let on_remote: HashSet<String> = match &remote {
        Some(r) => r
            .list_snapshots()
            .map_err(other)?
            .into_iter()
            .filter(|l| l.manifest.is_some())
            .map(|l| l.name)
            .collect(),
        None => HashSet::new(),
    };
    // Retention over both sides, so a snapshot the bucket's prune forgot is not sent again.
    let keep = kept_by_retention(
        &opts.retention,
        snaps
            .iter()
            .filter(|l| l.is_complete())
            .map(|l| l.name.clone())
            .chain(on_remote.iter().cloned())
            .filter_map(|n| stem_time(&n).map(|(kind, created)| (n, kind, created))),
    );

    let open_cache = |name: &str| match &opts.cache_dir {
        Some(dir) => Cache::open(&dir.join(name)),
        None => Cache::open_private(),
    };
    let mut local_index = open_cache(LOCAL_CACHE).map_err(other)?;
    local_index.sync(&local).map_err(other)?;
    // The bucket's cache follows what the bucket lists (packs and index files gone from it
    // leave the cache); a bucket with no store yet (a new one, another prefix) has nothing.
    let remote_index = match &remote {
        Some(r) => {
            let mut c = open_cache(REMOTE_CACHE).map_err(other)?;
            c.sync(r).map_err(other)?;
            c
        }
        None => Cache::open_private().map_err(other)?,
    };

    let (mut index_files, mut packs) = (Vec::new(), Vec::new());
    let (mut planned_index, mut planned_packs) = (HashSet::new(), HashSet::new());
    let mut sending = Vec::new();
    for l in snaps.iter().filter(|l| l.is_complete()) {
        let m = l.manifest.as_ref().expect("complete");
        let manifest_path = store_format::manifest_path(&l.name);
        if !keep.contains(&l.name) {
            if !on_remote.contains(&l.name) {
                report.not_kept_remotely.push(manifest_path);
            }
            continue;
        }
        if !on_remote.contains(&l.name) {
            let needed = match needed_packs(&local, &local_index, &remote_index, &l.name, m, &planned_packs) {
                Ok(Ok(n)) => n,
                Ok(Err(why)) => {
                    damaged(report, &store_format::refs_path(&l.name), format!("{why}: snapshot not sent"));
                    continue;
                }
                Err(e) => return Err(other(e)),
            };
            // Each pack and the index file naming it must still be on the drive (a local
            // prune may have just collected them); else the snapshot waits for the next push.
            let mut found = Vec::new();
            let mut gone = None;
            for (pack, index) in needed {
                let (path, ipath) =
                    (store_format::pack_path(&hex::encode(pack)), store_format::index_path(&index));
                match (src.size(&path)?, src.size(&ipath)?) {
                    (Some(size), Some(isize)) => found.push((
                        pack,
                        store_item(path, size, Some(hex::encode(pack))),
                        store_item(ipath, isize, Some(index)),
                    )),
                    (None, _) => gone = Some(path),
                    (_, None) => gone = Some(ipath),
                }
                if gone.is_some() {
                    break;
                }
            }
            if let Some(g) = gone {
                report.vanished.push(g);
                continue;
            }
            for (pack, p, i) in found {
                planned_packs.insert(pack);
                if planned_index.insert(i.path.clone()) {
                    index_files.push(i);
                }
                packs.push(p);
            }
        }
        sending.push((l.name.clone(), m.tree.size, m.refs.size));
    }
    items.extend(index_files);
    items.extend(packs);
    let snapshot_item = |path: String, size: u64, stem: &str, visible: bool| Item {
        path,
        size,
        expect: None,
        unit: Some(Unit::Snapshot(stem.to_string())),
        visible,
    };
    for (stem, tree, refs) in &sending {
        items.push(snapshot_item(store_format::tree_path(stem), *tree, stem, false));
        items.push(snapshot_item(store_format::refs_path(stem), *refs, stem, false));
    }
    for (stem, ..) in &sending {
        let path = store_format::manifest_path(stem);
        match src.size(&path)? {
            Some(size) => items.push(snapshot_item(path, size, stem, true)),
            None => report.vanished.push(path),
        }
    }
    Ok(())
}

/// A pack's hash and the name of an index file that names it.
type PackToSend = ([u8; 32], String);

/// The packs (and, for each, an index file naming it) holding the chunks of snapshot `name`
/// that the remote's index lacks and no pack in `planned` holds. `Err` inside: the drive's
/// store cannot give them (a refs file or an index entry is missing or damaged).
fn needed_packs(
    local: &dedup::Store,
    local_index: &Cache,
    remote_index: &Cache,
    name: &str,
    m: &dedup::SnapshotManifest,
    planned: &HashSet<[u8; 32]>,
) -> crate::error::Result<std::result::Result<Vec<PackToSend>, String>> {
    let refs = match dedup::read::read_refs(local, name, m) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let mut mine = HashSet::new();
    let mut out = Vec::new();
    for id in refs {
        if remote_index.is_stored(&id)? {
            continue;
        }
        match local_index.locate_indexed(&id)? {
            Some((loc, _)) if planned.contains(&loc.pack) || mine.contains(&loc.pack) => {}
            Some((loc, index)) => {
                mine.insert(loc.pack);
                out.push((loc.pack, index));
            }
            None => {
                return Ok(Err(format!("chunk {} is in no indexed pack on the drive", hex::encode(&id[..8]))))
            }
        }
    }
    Ok(Ok(out))
}

fn other(e: crate::error::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// Complete archive/manifest pairs among top-level names: (stem, time, kind).
fn pairs(top: &HashMap<String, u64>) -> Vec<(String, DateTime<Utc>, ArchiveKind)> {
    top.keys()
        .filter_map(|n| n.strip_suffix(MANIFEST_SUFFIX))
        .filter(|stem| top.contains_key(&format!("{stem}{ARCHIVE_SUFFIX}")))
        .filter_map(|stem| {
            let (kind, t) = stem_time(stem)?;
            Some((stem.to_string(), t, kind))
        })
        .collect()
}

/// `backup-20261123T042501.123Z` (maybe `-2`): its kind and time.
pub fn stem_time(stem: &str) -> Option<(ArchiveKind, DateTime<Utc>)> {
    let (kind, rest) = if let Some(r) = stem.strip_prefix("backup-") {
        (ArchiveKind::Backup, r)
    } else {
        (ArchiveKind::PreRestore, stem.strip_prefix("pre-restore-")?)
    };
    let ts = match rest.split_once('Z') {
        Some((ts, "")) => ts,
        Some((ts, n))
            if n.strip_prefix('-')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            ts
        }
        _ => return None,
    };
    let t = NaiveDateTime::parse_from_str(ts, "%Y%m%dT%H%M%S%.3f").ok()?;
    Some((kind, t.and_utc()))
}

enum Copied {
    Done(Record),
    Vanished,
    Damaged(String),
    Exists(String),
}

/// Stream one file, hashing it; commit only if it is whole and hashes as expected.
fn copy(src: &dyn Backend, dst: &dyn Backend, item: &Item, progress: &dyn Progress) -> io::Result<Copied> {
    let (mut r, len) = match src.open(&item.path) {
        Ok(x) => x,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Copied::Vanished),
        Err(e) => return Err(e),
    };
    if len != item.size {
        return Ok(Copied::Damaged(format!("listed as {} bytes, {len} bytes when opened", item.size)));
    }
    let mut out = match dst.create(&item.path) {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Copied::Exists(e.to_string())),
        Err(e) => return Err(e),
    };
    let mut hasher = crate::fsutil::HashingReader::new(&mut r);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = hasher.read(&mut buf)?;
        if n == 0 {
            break;
        }
        match out.write_all(&buf[..n]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(Copied::Exists(e.to_string())),
            Err(e) => return Err(e),
        }
        progress.advance(n as u64);
    }
    let (sha, n) = hasher.finish();
    if n != item.size {
        // Dropping `out` uncommitted leaves nothing visible.
        return Ok(Copied::Damaged(format!("read {n} bytes, expected {}: not sent", item.size)));
    }
    if let Some(expect) = &item.expect {
        if !expect.eq_ignore_ascii_case(&sha) {
            return Ok(Copied::Damaged(format!(
                "its SHA-256 is {sha}, it should be {expect}: damaged on the drive, not sent"
            )));
        }
    }
    match out.commit() {
        Ok(()) => Ok(Copied::Done(Record { path: item.path.clone(), size: n, sha256: sha })),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Copied::Exists(e.to_string())),
        Err(e) => Err(e),
    }
}

/// A remote object no ledger records: read it back and compare with the local file.
fn adopt(src: &dyn Backend, dst: &dyn Backend, item: &Item) -> io::Result<Result<Record, String>> {
    let hash = |b: &dyn Backend| -> io::Result<Option<(String, u64)>> {
        let (r, _) = match b.open(&item.path) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut h = crate::fsutil::HashingReader::new(r);
        io::copy(&mut h, &mut io::sink())?;
        Ok(Some(h.finish()))
    };
    let Some((remote_sha, n)) = hash(dst)? else {
        return Ok(Err("listed on the remote, then gone".into()));
    };
    let local_sha = match &item.expect {
        Some(e) => Some(e.to_ascii_lowercase()),
        None => hash(src)?.map(|(s, _)| s),
    };
    match local_sha {
        Some(l) if l == remote_sha && n == item.size => {
            Ok(Ok(Record { path: item.path.clone(), size: n, sha256: remote_sha }))
        }
        Some(_) => Ok(Err(format!(
            "the remote object's SHA-256 is {remote_sha}, not the local file's: not overwritten"
        ))),
        None => Ok(Err("gone locally before it could be compared".into())),
    }
}

fn behind(items: &[Item], remote: &HashMap<String, u64>) -> Behind {
    let mut b = Behind::default();
    let mut units: HashSet<&Unit> = HashSet::new();
    let mut newest: Option<(DateTime<Utc>, String)> = None;
    for i in items {
        let there = remote.get(&i.path) == Some(&i.size);
        if !there {
            b.files += 1;
            b.bytes += i.size;
            if let Some(u) = &i.unit {
                units.insert(u);
            }
        } else if i.visible {
            if let Some(Unit::Backup(stem)) = &i.unit {
                if let Some((ArchiveKind::Backup, t)) = stem_time(stem) {
                    if newest.as_ref().is_none_or(|(n, _)| t > *n) {
                        newest = Some((t, format!("{stem}{ARCHIVE_SUFFIX}")));
                    }
                }
            }
        }
    }
    b.backups = units.iter().filter(|u| matches!(u, Unit::Backup(_))).count();
    b.snapshots = units.iter().filter(|u| matches!(u, Unit::Snapshot(_))).count();
    b.newest_remote_backup = newest.map(|(_, n)| n);
    b
}
