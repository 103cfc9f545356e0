//! What an in-place restore will do, decided before anything is touched: which live paths are
//! replaced, where the archive is staged (beside them, on the same filesystem, so that the
//! swap is a rename), where the replaced data is set aside, and the checks that must pass
//! first. The plan is what tests assert and what a refusal explains.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::journal::{Journal, Move, Phase};
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::target::SystemRoot;

pub const STAGE_PREFIX: &str = ".datavault-restore-";
pub const ASIDE_PREFIX: &str = ".datavault-old-";
/// What a rollback moved out of a live path after the app may have written to it: kept,
/// never deleted by datavault.
pub const KEPT_PREFIX: &str = ".datavault-undone-";

/// The part of our folders' names after the prefix: the run id and a random suffix, so
/// that a leftover (or planted) folder never collides with a new restore's, even after the
/// catalog (and its run ids) was rebuilt.
pub fn new_tag(run_id: i64) -> String {
    let mut r = [0u8; 4];
    let _ = rustix::rand::getrandom(&mut r, rustix::rand::GetRandomFlags::empty());
    format!("{run_id}-{}", hex::encode(r))
}

pub fn is_tag(t: &str) -> bool {
    let mut parts = t.splitn(2, '-');
    let id = parts.next().unwrap_or("");
    let rand = parts.next().unwrap_or("0");
    !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_digit())
        && !rand.is_empty()
        && rand.bytes().all(|b| b.is_ascii_hexdigit())
}
/// Name of the database inside its staging folder once verified and checkpointed.
pub const STAGED_DB: &str = "restored.db";

/// One live path (the database, or the uploads folder) and its helper folders.
#[derive(Debug, Clone, Serialize)]
pub struct Slot {
    pub live: PathBuf,
    /// Where the archive's content for it is extracted and verified.
    pub stage: PathBuf,
    /// Where the replaced data goes until the restore is over.
    pub aside: PathBuf,
    /// Where a rollback keeps what it moves out of the live path (created only if needed).
    pub kept: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestorePlan {
    pub archive: String,
    pub database: Slot,
    /// None if the archive has no uploads or the config has none.
    pub uploads: Option<Slot>,
}

impl RestorePlan {
    pub fn new(
        settings: &Settings,
        archive: &str,
        tag: &str,
        archive_has_uploads: bool,
    ) -> Result<RestorePlan> {
        let slot = |live: &Path| -> Result<Slot> {
            let parent = parent_of(live)?;
            Ok(Slot {
                live: live.to_path_buf(),
                stage: parent.join(format!("{STAGE_PREFIX}{tag}")),
                aside: parent.join(format!("{ASIDE_PREFIX}{tag}")),
                kept: parent.join(format!("{KEPT_PREFIX}{tag}")),
            })
        };
        let uploads = match &settings.source.uploads {
            Some(u) if archive_has_uploads => Some(slot(u)?),
            _ => None,
        };
        Ok(RestorePlan { archive: archive.to_string(), database: slot(&settings.source.database)?, uploads })
    }

    /// The staging folders (one per filesystem folder; the same when db and uploads share a parent).
    pub fn stages(&self) -> Vec<PathBuf> {
        let mut v = vec![self.database.stage.clone()];
        if let Some(u) = &self.uploads {
            if u.stage != self.database.stage {
                v.push(u.stage.clone());
            }
        }
        v
    }

    pub fn asides(&self) -> Vec<PathBuf> {
        let mut v = vec![self.database.aside.clone()];
        if let Some(u) = &self.uploads {
            if u.aside != self.database.aside {
                v.push(u.aside.clone());
            }
        }
        v
    }

    /// Refuse what would make the swap fail half-way or move what it must not, before the app
    /// is stopped and before a safety archive is written.
    pub fn preflight(&self, root: &SystemRoot, settings: &Settings) -> Result<()> {
        let config = |m: String| Error::config(&settings.path, m);
        // A mount point cannot be renamed (EBUSY): the swap could never happen.
        for (key, live) in std::iter::once(("source.database", &self.database.live))
            .chain(self.uploads.as_ref().map(|u| ("source.uploads", &u.live)))
        {
            if is_mount_point(live) {
                return Err(config(format!(
                    "{key} {} is a mount point: an in-place restore swaps it with a rename, which a mount point refuses; \
                     mount the filesystem one folder up (and point {key} inside it), or restore with --to DIR and copy the files back",
                    live.display()
                )));
            }
        }
        // A filesystem mounted inside uploads would move aside with the old uploads and be
        // deleted with them: the backup drive itself, sometimes.
        if let Some(u) = &self.uploads {
            let real = std::fs::canonicalize(&u.live).unwrap_or_else(|_| u.live.clone());
            let mounts = crate::target::read_mounts(root)?;
            if let Some(inside) =
                mounts.iter().map(|m| &m.mount_point).find(|mp| mp.starts_with(&real) && **mp != real)
            {
                return Err(config(format!(
                    "{} is a mount point inside source.uploads ({}): a restore would move it away with the old uploads; unmount it (and mount it outside the app's data) first",
                    inside.display(),
                    u.live.display()
                )));
            }
        }
        Ok(())
    }

    /// The journal of this restore, before anything is moved.
    pub fn journal(&self) -> Journal {
        Journal {
            archive: self.archive.clone(),
            phase: Phase::Stopping,
            moves: Vec::new(),
            stages: self.stages(),
            asides: self.asides(),
        }
    }

    /// The renames of the swap, decided once the app is stopped: what exists is looked at
    /// only then (a stopped app may have removed its -wal and -shm).
    pub fn moves(&self, uploads_staged: Option<PathBuf>) -> Vec<Move> {
        let db = &self.database;
        let exists = |p: &Path| std::fs::symlink_metadata(p).is_ok();
        let mut moves = Vec::new();
        for suffix in ["-wal", "-shm", "-journal"] {
            let live = crate::fsutil::with_suffix(&db.live, suffix);
            let name = live.file_name().expect("a file name").to_owned();
            moves.push(Move {
                aside: db.aside.join(&name),
                had_live: exists(&live),
                kept: db.kept.join(&name),
                live,
                staged: None,
            });
        }
        let name = db.live.file_name().expect("a file name").to_owned();
        moves.push(Move {
            aside: db.aside.join(&name),
            had_live: exists(&db.live),
            kept: db.kept.join(&name),
            live: db.live.clone(),
            staged: Some(db.stage.join(STAGED_DB)),
        });
        if let (Some(u), Some(staged)) = (&self.uploads, uploads_staged) {
            let name = u.live.file_name().map(|n| n.to_owned()).unwrap_or_else(|| "uploads".into());
            moves.push(Move {
                aside: u.aside.join(&name),
                had_live: exists(&u.live),
                kept: u.kept.join(&name),
                live: u.live.clone(),
                staged: Some(staged),
            });
        }
        moves
    }
}

/// Is `p` on another filesystem than its parent folder?
fn is_mount_point(p: &Path) -> bool {
    let (Ok(m), Some(parent)) = (std::fs::symlink_metadata(p), p.parent()) else { return false };
    std::fs::metadata(parent).map(|pm| pm.dev() != m.dev()).unwrap_or(false)
}

fn parent_of(p: &Path) -> Result<PathBuf> {
    p.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Usage(format!("{} has no parent folder", p.display())))
}
