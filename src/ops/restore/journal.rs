//! The restore journal: what an in-place restore is doing, on the Pi's disk, so that the next
//! run can finish or undo a restore that a power cut interrupted.
//!
//! Rule: every phase change is durable (written to a temporary name, fsynced, renamed, the
//! folder fsynced) *before* the renames it guards. Root acts on the paths a journal names,
//! so a journal is only trusted when datavault could have written it: a regular file owned
//! by us in the state folder (itself checked), naming only the live paths of the config and
//! the staging and aside folders datavault puts beside them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::plan::{ASIDE_PREFIX, KEPT_PREFIX, STAGE_PREFIX};
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;

/// One rename of the swap. `staged` is None for files that are only moved aside (-wal, -shm,
/// -journal). What a rollback finds at `live` that is not the previous data, once the app may
/// have written to it, goes to `kept` (in a `.datavault-undone-*` folder beside it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub live: PathBuf,
    pub aside: PathBuf,
    pub staged: Option<PathBuf>,
    pub had_live: bool,
    pub kept: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The app is being stopped and the safety copy taken: nothing live was moved yet.
    Stopping,
    /// Live data is being moved aside and the restored data in.
    Swapping,
    /// The swap is complete; the app is being started.
    Swapped,
    /// The start failed: the previous data is being put back.
    RollingBack,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    pub archive: String,
    pub phase: Phase,
    pub moves: Vec<Move>,
    pub stages: Vec<PathBuf>,
    pub asides: Vec<PathBuf>,
}

impl Journal {
    /// Make the journal, in its current phase, durable.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &serde_json::to_vec_pretty(self).expect("journal serializes"), 0o600)
    }

    /// Enter a new phase: durably, before anything it guards happens.
    pub fn enter(&mut self, phase: Phase, path: &Path) -> Result<()> {
        self.phase = phase;
        self.save(path)?;
        crate::crashpoint::crash_point(match phase {
            Phase::Stopping => "journal: stopping",
            Phase::Swapping => "journal: swapping",
            Phase::Swapped => "journal: swapped",
            Phase::RollingBack => "journal: rolling back",
        });
        Ok(())
    }

    /// Read the journal an interrupted restore left, if any, and check that datavault could
    /// have written it for this config.
    pub fn load(path: &Path, settings: &Settings) -> Result<Option<Journal>> {
        use std::os::unix::fs::MetadataExt;
        let refuse = |why: String| {
            Error::config(
                path,
                format!("restore journal refused: {why}; it was not written by this datavault for this config: inspect it and the .datavault-old-* folders by hand, then delete it"),
            )
        };
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        if !meta.file_type().is_file() {
            return Err(refuse("it is not a regular file".into()));
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(refuse(format!(
                "it is owned by uid {}, not by uid {me} who runs datavault",
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(refuse("others may write it".into()));
        }
        let bytes = crate::fsutil::read_regular(path, 1 << 20)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        let journal: Journal =
            serde_json::from_slice(&bytes).map_err(|e| refuse(format!("it is unreadable ({e})")))?;
        journal.check_paths(settings).map_err(refuse)?;
        Ok(Some(journal))
    }

    /// Every path must be one datavault would have used for this config.
    fn check_paths(&self, s: &Settings) -> std::result::Result<(), String> {
        let parents: Vec<PathBuf> = std::iter::once(s.source.database.parent())
            .chain(s.source.uploads.as_deref().map(Path::parent))
            .flatten()
            .map(Path::to_path_buf)
            .collect();
        let ours = |p: &Path, prefix: &str| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let tagged = name.strip_prefix(prefix).is_some_and(super::plan::is_tag);
            tagged && p.parent().is_some_and(|parent| parents.iter().any(|q| q == parent))
        };
        for p in &self.stages {
            if !ours(p, STAGE_PREFIX) {
                return Err(format!("it names {} as a staging folder", p.display()));
            }
        }
        for p in &self.asides {
            if !ours(p, ASIDE_PREFIX) {
                return Err(format!("it names {} as a folder for the replaced data", p.display()));
            }
        }
        let mut live: Vec<PathBuf> = ["", "-wal", "-shm", "-journal"]
            .iter()
            .map(|sfx| crate::fsutil::with_suffix(&s.source.database, sfx))
            .collect();
        live.extend(s.source.uploads.iter().cloned());
        let below = |p: &Path, dirs: &[PathBuf]| dirs.iter().any(|d| p.parent() == Some(d.as_path()));
        for m in &self.moves {
            if !live.contains(&m.live) {
                return Err(format!(
                    "it would replace {}, which is not a path of this config",
                    m.live.display()
                ));
            }
            let kept_ok =
                m.kept.parent().is_some_and(|k| ours(k, KEPT_PREFIX) && k.parent() == m.live.parent());
            if !below(&m.aside, &self.asides) || !kept_ok {
                return Err(format!("it moves {} somewhere datavault never would", m.live.display()));
            }
            if m.staged.as_deref().is_some_and(|st| !below(st, &self.stages)) {
                return Err(format!(
                    "it would swap in {} from outside its staging folders",
                    m.live.display()
                ));
            }
        }
        Ok(())
    }
}
