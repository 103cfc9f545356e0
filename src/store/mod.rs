//! The backup store: everything datavault keeps on the drive (or in a bucket), and the one
//! module that knows how it is laid out: names, the scan, write-then-commit, cleanup and
//! deletion.
//!
//! [`backend`] is the storage itself, reduced to list/read/create/remove so that the USB
//! drive, an S3 bucket and an in-memory test store are interchangeable. [`dedup`] is the
//! deduplicated snapshot store built on it (#9). On top of it, an
//! archive is two files: `<stem>.tar.zst.age` and its manifest `<stem>.json`, written last:
//! the manifest is what makes an archive exist. Only names datavault makes (`backup-...`,
//! `pre-restore-...`, valid UTF-8) are ever listed, cleaned or deleted.

pub mod backend;
pub mod dedup;

use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::error::{is_disk_full, Error, Result};
use crate::fsutil::PARTIAL_SUFFIX;
use crate::manifest::{ArchiveKind, Manifest};
use crate::offsite::remote_error::{class_of, to_error, Blame};
use backend::{Backend, LocalBackend, NewObject};

pub const ARCHIVE_SUFFIX: &str = ".tar.zst.age";
pub const MANIFEST_SUFFIX: &str = ".json";
/// A manifest lists changed and skipped files, so it can be big; never this big.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// `backup-20261123T042501.123Z` style stem for a new archive. Millisecond precision; the
/// store adds `-2`, `-3`... if the name is taken (two runs in the same millisecond).
pub fn archive_stem(kind: ArchiveKind, created: DateTime<Utc>) -> String {
    let prefix = match kind {
        ArchiveKind::Backup => "backup",
        ArchiveKind::PreRestore => "pre-restore",
    };
    format!("{prefix}-{}", created.format("%Y%m%dT%H%M%S%.3fZ"))
}

/// Is this one of the names datavault gives archives and manifests?
fn is_ours(name: &str) -> bool {
    name.starts_with("backup-") || name.starts_with("pre-restore-")
}

/// One archive found in the store, complete or not.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The archive file name (`....tar.zst.age`).
    pub name: String,
    /// Where the store is, for messages and the catalog (`/mnt/datavault`).
    pub location: String,
    pub manifest: Option<Manifest>,
    /// Why this archive is not usable, if it is not.
    pub problem: Option<String>,
    /// A deduplicated snapshot under `store/` (#9) rather than an archive file: `name` is
    /// then its stem, and `manifest` the archive-shaped view of its
    /// [`dedup::SnapshotManifest`] (size: the bytes it references in packs; SHA-256: its tree's).
    pub snapshot: bool,
}

impl Listing {
    pub fn is_complete(&self) -> bool {
        self.manifest.is_some() && self.problem.is_none()
    }
    pub fn created(&self) -> Option<DateTime<Utc>> {
        self.manifest.as_ref().map(|m| m.created)
    }
    pub fn stem(&self) -> &str {
        self.name.strip_suffix(ARCHIVE_SUFFIX).unwrap_or(&self.name)
    }
    pub fn manifest_name(&self) -> String {
        format!("{}{MANIFEST_SUFFIX}", self.stem())
    }
    /// For messages and the catalog: where the archive file is (a snapshot's manifest).
    pub fn archive_path(&self) -> String {
        if self.snapshot {
            return format!(
                "{}/{}",
                self.location.trim_end_matches('/'),
                dedup::format::manifest_path(&self.name)
            );
        }
        format!("{}/{}", self.location.trim_end_matches('/'), self.name)
    }

    /// A snapshot's listing, in the shape every command knows.
    pub fn of_snapshot(location: String, s: &dedup::SnapshotListing) -> Listing {
        let manifest = s.manifest.as_ref().map(|m| Manifest {
            format: m.format,
            tool: m.tool.clone(),
            tool_version: m.tool_version.clone(),
            kind: m.kind,
            archive: m.snapshot.clone(),
            archive_size: m.stored_bytes,
            archive_sha256: m.tree.sha256.clone(),
            created: m.created,
            host: m.host.clone(),
            user: m.user.clone(),
            trigger: m.trigger.clone(),
            comment: m.comment.clone(),
            source: m.source.clone(),
            database: m.database.clone(),
            uploads: m.uploads.clone(),
            files: m.files,
            plain_bytes: m.plain_bytes,
            compression: m.compression.clone(),
            encryption: m.encryption.clone(),
            duration_ms: m.duration_ms,
            changed_during_backup: m.changed_during_backup.clone(),
            skipped: m.skipped.clone(),
        });
        let problem = match (&manifest, &s.problem) {
            (Some(m), None) if m.archive != s.name => {
                Some(format!("manifest describes another snapshot ({})", m.archive))
            }
            (_, p) => p.clone(),
        };
        Listing { name: s.name.clone(), location, manifest, problem, snapshot: true }
    }
}

/// Find an archive by name (with or without suffix, with or without the folder), or by path.
pub fn find<'a>(listings: &'a [Listing], wanted: &str) -> Option<&'a Listing> {
    let base = Path::new(wanted).file_name().and_then(|n| n.to_str()).unwrap_or(wanted);
    let base = base.strip_suffix(MANIFEST_SUFFIX).unwrap_or(base);
    let stem = base.strip_suffix(ARCHIVE_SUFFIX).unwrap_or(base);
    listings.iter().find(|l| l.stem() == stem)
}

/// The archives on one backend.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    /// The snapshot store's local cache (#9), for runs that hold the run lock; reads without
    /// it use a cache of their own in memory (a backup may be using the shared one).
    dedup_cache: Option<std::path::PathBuf>,
    /// Set for a remote store (the offsite bucket): who to blame for its failures, which
    /// then keep their class (exit 3 not ready, 2 credentials, 4 damaged) instead of being
    /// taken for a damaged archive.
    remote: Option<Arc<Blame>>,
}

impl Store {
    pub fn new(backend: Arc<dyn Backend>) -> Store {
        Store { backend, remote: None, dedup_cache: None }
    }

    /// A store on a remote backend (the offsite bucket).
    pub fn remote(backend: Arc<dyn Backend>, blame: Blame) -> Store {
        Store { backend, remote: Some(Arc::new(blame)), dedup_cache: None }
    }

    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// A backend failure as the error it stands for: a remote store's failures by their
    /// class ([`to_error`]); anything else as `otherwise` says.
    pub fn failure(&self, e: io::Error, doing: &str, otherwise: impl FnOnce(io::Error) -> Error) -> Error {
        match &self.remote {
            Some(b) if class_of(&e).is_some() => to_error(e, doing, b),
            _ => otherwise(e),
        }
    }

    /// The USB drive's folder (the target checks come first: mounted, LUKS, marker).
    pub fn open_local(dir: &Path) -> Result<Store> {
        let b = LocalBackend::open(dir)
            .map_err(|e| Error::target(dir, format!("cannot open the target: {e}")))?;
        Ok(Store::new(Arc::new(b)))
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub fn location(&self) -> String {
        self.backend.location()
    }

    fn not_ready(&self, doing: &str, e: io::Error) -> Error {
        Error::target(Path::new(&self.location()), format!("cannot {doing}: {e}"))
    }

    /// Every archive in the store, newest first. Only manifests and sizes are read.
    /// Archives without a manifest (a run cut off between the two renames) are listed as
    /// incomplete; `*.partial` files are not listed at all.
    pub fn scan(&self) -> Result<Vec<Listing>> {
        let objects = self
            .backend
            .list("")
            .map_err(|e| self.failure(e, "listing archives", |e| self.not_ready("list archives", e)))?;
        let sizes: std::collections::HashMap<&str, u64> =
            objects.iter().map(|o| (o.name.as_str(), o.size)).collect();
        let mut out = Vec::new();
        for o in &objects {
            let name = o.name.as_str();
            if !is_ours(name) {
                continue;
            }
            if let Some(stem) = name.strip_suffix(MANIFEST_SUFFIX) {
                if !stem.ends_with(ARCHIVE_SUFFIX) {
                    out.push(self.read_listing(
                        stem,
                        sizes.get(format!("{stem}{ARCHIVE_SUFFIX}").as_str()).copied(),
                    )?);
                }
            } else if let Some(stem) = name.strip_suffix(ARCHIVE_SUFFIX) {
                if !sizes.contains_key(format!("{stem}{MANIFEST_SUFFIX}").as_str()) {
                    out.push(Listing {
                        name: name.to_string(),
                        location: self.location(),
                        manifest: None,
                        problem: Some(
                            "incomplete: no manifest (the run that wrote it was interrupted)".into(),
                        ),
                        snapshot: false,
                    });
                }
            }
        }
        // Snapshots (#9) beside the archives: one list, one retention policy.
        match dedup::Store::open(self.backend.clone()) {
            Ok(None) => {}
            Ok(Some(ds)) => {
                for sl in ds.list_snapshots()? {
                    out.push(Listing::of_snapshot(self.location(), &sl));
                }
            }
            Err(e) => log::warn!("the snapshots on {} cannot be listed: {e}", self.location()),
        }
        out.sort_by(|a, b| b.created().cmp(&a.created()).then_with(|| b.name.cmp(&a.name)));
        Ok(out)
    }

    /// Read snapshots through the cache at `path` (only under the run lock).
    pub fn with_dedup_cache(mut self, path: std::path::PathBuf) -> Store {
        self.dedup_cache = Some(path);
        self
    }

    /// A cache for reading snapshots: the shared one under the run lock, else a private one.
    pub fn dedup_cache(&self) -> Result<dedup::Cache> {
        match &self.dedup_cache {
            Some(p) => dedup::Cache::open(p),
            None => dedup::Cache::open_private(),
        }
    }

    /// The snapshot store on this drive, if there is one (#9).
    pub fn snapshots(&self) -> Result<Option<dedup::Store>> {
        dedup::Store::open(self.backend.clone())
    }

    /// The snapshot store, created on first use (a snapshot backup).
    pub fn snapshots_or_create(&self) -> Result<dedup::Store> {
        dedup::Store::open_or_create(self.backend.clone(), dedup::ChunkerParams::default())
    }

    fn read_listing(&self, stem: &str, archive_size: Option<u64>) -> Result<Listing> {
        let name = format!("{stem}{ARCHIVE_SUFFIX}");
        let mut listing = Listing {
            name: name.clone(),
            location: self.location(),
            manifest: None,
            problem: None,
            snapshot: false,
        };
        let manifest_name = format!("{stem}{MANIFEST_SUFFIX}");
        let bytes = match self.backend.read_small(&manifest_name, MAX_MANIFEST_BYTES) {
            Ok(b) => b,
            // The server failing is not a damaged manifest.
            Err(e) if self.remote.is_some() && class_of(&e).is_some() => {
                return Err(self.failure(e, &format!("reading {manifest_name}"), |e| Error::io("", e)))
            }
            Err(e) => {
                listing.problem = Some(format!("cannot read its manifest: {e}"));
                return Ok(listing);
            }
        };
        match Manifest::parse(&name, &bytes) {
            Err(Error::Integrity { message, .. }) => listing.problem = Some(message),
            Err(other) => listing.problem = Some(other.to_string()),
            Ok(m) => {
                listing.problem = if m.archive != name {
                    Some(format!("manifest describes another archive ({})", m.archive))
                } else {
                    match archive_size {
                        None => Some("archive file is missing (or is not a regular file)".into()),
                        Some(n) if n != m.archive_size => Some(format!(
                            "archive is {n} bytes, manifest says {} (truncated or damaged)",
                            m.archive_size
                        )),
                        Some(_) => None,
                    }
                };
                listing.manifest = Some(m);
            }
        }
        Ok(listing)
    }

    /// Remove what interrupted runs left: `*.partial` files, and an archive whose manifest is
    /// missing *if* `interrupted` names it (the catalog's runs that were cut off: a backup
    /// names its archive before writing it, a prune each archive before deleting it).
    /// Another archive without its manifest is kept and listed as incomplete: its manifest may
    /// have been deleted by hand, and the archive is still whole. Only names we create are
    /// touched.
    pub fn clean(&self, interrupted: &std::collections::HashSet<String>) -> Vec<String> {
        let Ok(objects) = self.backend.list("") else { return Vec::new() };
        let names: std::collections::HashSet<&str> = objects.iter().map(|o| o.name.as_str()).collect();
        let mut removed = Vec::new();
        for name in &names {
            if !is_ours(name) {
                continue;
            }
            let orphan = interrupted.contains(*name)
                && name
                    .strip_suffix(ARCHIVE_SUFFIX)
                    .is_some_and(|stem| !names.contains(format!("{stem}{MANIFEST_SUFFIX}").as_str()));
            if (name.ends_with(PARTIAL_SUFFIX) || orphan) && self.backend.remove(name).is_ok() {
                log::info!("removed {name}, left by an interrupted run");
                removed.push(name.to_string());
            }
        }
        removed.sort();
        removed
    }

    /// A stem no archive, manifest or partial file uses yet.
    pub fn new_stem(&self, kind: ArchiveKind, created: DateTime<Utc>) -> Result<String> {
        let base = archive_stem(kind, created);
        let taken = |stem: &str| -> Result<bool> {
            for name in [
                format!("{stem}{ARCHIVE_SUFFIX}"),
                format!("{stem}{MANIFEST_SUFFIX}"),
                format!("{stem}{ARCHIVE_SUFFIX}{PARTIAL_SUFFIX}"),
            ] {
                if self.backend.size(&name).map_err(|e| self.not_ready("look at the target", e))?.is_some() {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        let mut stem = base.clone();
        let mut n = 1;
        while taken(&stem)? {
            n += 1;
            stem = format!("{base}-{n}");
        }
        Ok(stem)
    }

    /// The archive file of a new backup, invisible until committed.
    pub fn create_archive(&self, stem: &str) -> io::Result<Box<dyn NewObject>> {
        self.backend.create(&format!("{stem}{ARCHIVE_SUFFIX}"))
    }

    /// Write the manifest: the last step, which makes the archive exist.
    pub fn publish_manifest(&self, m: &Manifest) -> io::Result<Listing> {
        let stem = m.archive.strip_suffix(ARCHIVE_SUFFIX).unwrap_or(&m.archive);
        let mut o = self.backend.create(&format!("{stem}{MANIFEST_SUFFIX}"))?;
        std::io::Write::write_all(&mut o, &m.to_json())?;
        o.commit()?;
        Ok(Listing {
            name: m.archive.clone(),
            location: self.location(),
            manifest: Some(m.clone()),
            problem: None,
            snapshot: false,
        })
    }

    /// Read an archive file from the start.
    pub fn open_archive(&self, l: &Listing) -> io::Result<(Box<dyn Read + Send>, u64)> {
        self.backend.open(&l.name)
    }

    /// Part of an archive file (what the decryption did not need to read).
    pub fn read_archive_range(&self, l: &Listing, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        self.backend.read_range(&l.name, offset, len)
    }

    /// Delete an archive: the manifest first (it is then no longer offered for restore),
    /// then the file. A cut in between leaves an orphan that [`Store::clean`] removes if the
    /// caller named it in the catalog first (see `Catalog::set_run_archive`).
    pub fn delete(&self, l: &Listing) -> Result<()> {
        if l.snapshot {
            // Its manifest first, then refs and tree; its chunks go with the next GC.
            let ds =
                self.snapshots()?.ok_or_else(|| Error::integrity(&l.name, "the snapshot store is gone"))?;
            return dedup::gc::forget(&ds, &l.name);
        }
        for name in [l.manifest_name(), l.name.clone()] {
            self.backend.remove(&name).map_err(|e| {
                if is_disk_full(&e) {
                    self.not_ready(&format!("delete {name}"), e)
                } else {
                    Error::io(format!("cannot delete {}/{name}", self.location()), e)
                }
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backend::MemoryBackend;

    #[test]
    fn stems_sort_in_time_order() {
        let a = archive_stem(ArchiveKind::Backup, "2026-11-23T04:00:00.005Z".parse().unwrap());
        let b = archive_stem(ArchiveKind::Backup, "2026-11-23T04:00:00.010Z".parse().unwrap());
        assert_eq!(a, "backup-20261123T040000.005Z");
        assert!(a < b);
        assert!(archive_stem(ArchiveKind::PreRestore, Utc::now()).starts_with("pre-restore-"));
    }

    #[test]
    fn find_accepts_names_paths_and_stems() {
        let l = Listing {
            name: "backup-1.tar.zst.age".into(),
            location: "/t".into(),
            manifest: None,
            problem: None,
            snapshot: false,
        };
        let ls = vec![l];
        for w in ["backup-1", "backup-1.tar.zst.age", "backup-1.json", "/mnt/x/backup-1.tar.zst.age"] {
            assert!(find(&ls, w).is_some(), "{w}");
        }
        assert!(find(&ls, "backup-2").is_none());
    }

    #[test]
    fn clean_removes_only_our_partials_and_the_orphans_of_interrupted_runs() {
        let m = MemoryBackend::new();
        for n in [
            "backup-1.tar.zst.age",
            "backup-1.json",
            "backup-2.tar.zst.age",
            "backup-3.tar.zst.age.partial",
            "backup-4.tar.zst.age",
            "backup-5.json",
            "notes.txt",
            "other.tar.zst.age",
        ] {
            m.put(n, b"x".to_vec());
        }
        let s = Store::new(Arc::new(m.clone()));
        let interrupted = ["backup-2.tar.zst.age".to_string()].into_iter().collect();
        assert_eq!(s.clean(&interrupted), ["backup-2.tar.zst.age", "backup-3.tar.zst.age.partial"]);
        let left: Vec<_> = m.snapshot().into_keys().collect();
        assert_eq!(
            left,
            [
                "backup-1.json",
                "backup-1.tar.zst.age",
                "backup-4.tar.zst.age",
                "backup-5.json",
                "notes.txt",
                "other.tar.zst.age"
            ],
            "an orphan no interrupted run named is kept, and so is a manifest alone"
        );
    }

    #[test]
    fn new_stems_never_reuse_a_name() {
        let m = MemoryBackend::new();
        let t: DateTime<Utc> = "2026-11-23T04:00:00.005Z".parse().unwrap();
        let s = Store::new(Arc::new(m.clone()));
        let a = s.new_stem(ArchiveKind::Backup, t).unwrap();
        m.put(&format!("{a}.tar.zst.age.partial"), vec![]);
        let b = s.new_stem(ArchiveKind::Backup, t).unwrap();
        assert_eq!(b, format!("{a}-2"));
    }
}
