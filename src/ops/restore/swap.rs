//! The swap and its undoing: the only code that renames live data.
//!
//! [`swap`] moves each live path aside, then its staged replacement in, one rename at a time.
//! [`rollback`] is written to be safe from *any* state a swap, a start or an earlier rollback
//! can be cut in: it looks at what is on disk, not at how far anything got, so running it
//! again after a power cut converges on exactly the previous data. Whatever stands at a live
//! path and is not the previous data (the restored file, or a -wal the app made while it
//! failed to start on the restored database) goes to the move's quarantine in the staging
//! folder, never stays beside the old database.

use std::path::Path;

use super::journal::{Journal, Move};
use crate::crashpoint::crash_point;
use crate::fsutil::fsync_dir;

/// The renames of the swap, in order: each live path aside, then its staged one in.
pub fn swap_steps(j: &Journal) -> Vec<(&Path, &Path)> {
    let mut steps = Vec::new();
    for m in &j.moves {
        if m.had_live {
            steps.push((m.live.as_path(), m.aside.as_path()));
        }
        if let Some(staged) = &m.staged {
            steps.push((staged.as_path(), m.live.as_path()));
        }
    }
    steps
}

pub fn swap(j: &Journal) -> std::io::Result<()> {
    for (from, to) in swap_steps(j) {
        std::fs::rename(from, to)?;
        crash_point("swap: one rename");
    }
    sync_parents(j);
    Ok(())
}

/// Undo whatever part of the swap happened. Returns the paths it could not put back.
pub fn rollback(j: &Journal) -> Vec<String> {
    let mut problems = Vec::new();
    for m in j.moves.iter().rev() {
        if let Err(e) = undo(m) {
            log::error!("{e}");
            problems.push(e);
        }
    }
    sync_parents(j);
    problems
}

fn undo(m: &Move) -> Result<(), String> {
    let moved_aside = exists(&m.aside);
    // Where the live path holds something that is not the previous data, it must go first.
    if (moved_aside || !m.had_live) && exists(&m.live) {
        let to = match &m.staged {
            Some(s) if !exists(s) => s.as_path(),
            _ => m.quarantine.as_path(),
        };
        clear(to);
        std::fs::rename(&m.live, to)
            .map_err(|e| format!("cannot move {} out of the way: {e}", m.live.display()))?;
        crash_point("rollback: restored data moved out");
    }
    if moved_aside {
        std::fs::rename(&m.aside, &m.live)
            .map_err(|e| format!("cannot put {} back from {}: {e}", m.live.display(), m.aside.display()))?;
        crash_point("rollback: previous data put back");
    }
    Ok(())
}

/// A quarantine left by an earlier, interrupted rollback is replaced: what it held was never
/// the previous data.
fn clear(p: &Path) {
    if exists(p) {
        crate::fsutil::remove_tree(p);
    }
}

pub fn sync_parents(j: &Journal) {
    for m in &j.moves {
        if let Some(p) = m.live.parent() {
            let _ = fsync_dir(p);
        }
    }
}

pub fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

#[cfg(test)]
mod tests {
    use super::super::journal::Phase;
    use super::super::plan::with_suffix;
    use super::*;
    use std::path::PathBuf;

    fn state(root: &Path) -> Vec<(String, String)> {
        let mut v: Vec<_> = walkdir::WalkDir::new(root)
            .sort_by_file_name()
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                (rel, std::fs::read_to_string(e.path()).unwrap())
            })
            .collect();
        v.retain(|(p, _)| !p.contains(".datavault-"));
        v
    }

    fn setup(had_wal: bool) -> (tempfile::TempDir, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let w = |rel: &str, text: &str| {
            let path = p.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        w("data/app.db", "old db");
        if had_wal {
            w("data/app.db-wal", "old wal");
        }
        w("uploads/a.txt", "old upload");
        w("data/.datavault-restore-1/restored.db", "new db");
        w(".datavault-restore-1/uploads/b.txt", "new upload");
        std::fs::create_dir_all(p.join("data/.datavault-old-1")).unwrap();
        std::fs::create_dir_all(p.join(".datavault-old-1")).unwrap();
        let live_db = p.join("data/app.db");
        let quarantine = |name: &str| p.join("data/.datavault-restore-1").join(format!("rolled-back-{name}"));
        let mut moves: Vec<Move> = ["-wal", "-shm", "-journal"]
            .iter()
            .map(|sfx| {
                let live = with_suffix(&live_db, sfx);
                let name = live.file_name().unwrap().to_str().unwrap().to_string();
                Move {
                    aside: p.join("data/.datavault-old-1").join(&name),
                    had_live: exists(&live),
                    quarantine: quarantine(&name),
                    live,
                    staged: None,
                }
            })
            .collect();
        moves.push(Move {
            live: live_db.clone(),
            aside: p.join("data/.datavault-old-1/app.db"),
            staged: Some(p.join("data/.datavault-restore-1/restored.db")),
            had_live: true,
            quarantine: quarantine("app.db"),
        });
        moves.push(Move {
            live: p.join("uploads"),
            aside: p.join(".datavault-old-1/uploads"),
            staged: Some(p.join(".datavault-restore-1/uploads")),
            had_live: true,
            quarantine: p.join(".datavault-restore-1/rolled-back-uploads"),
        });
        let j = Journal {
            archive: "a".into(),
            phase: Phase::Swapping,
            moves,
            stages: vec![p.join("data/.datavault-restore-1"), p.join(".datavault-restore-1")],
            asides: vec![],
        };
        (dir, j)
    }

    /// Cut the swap after every possible rename: rollback always gives exactly the old state.
    #[test]
    fn rollback_restores_the_old_state_after_a_cut_at_any_step_of_the_swap() {
        for had_wal in [true, false] {
            let steps = {
                let (_d, j) = setup(had_wal);
                swap_steps(&j).len()
            };
            for cut in 0..=steps {
                let (dir, j) = setup(had_wal);
                let before = state(dir.path());
                for (from, to) in swap_steps(&j).into_iter().take(cut) {
                    std::fs::rename(from, to).unwrap();
                }
                assert!(rollback(&j).is_empty());
                assert_eq!(state(dir.path()), before, "cut after {cut} of {steps} renames (wal: {had_wal})");
                swap(&j).unwrap();
                let after = state(dir.path());
                assert!(after.contains(&("data/app.db".into(), "new db".into())), "{after:?}");
                assert!(
                    !after.iter().any(|(p, _)| p == "data/app.db-wal"),
                    "stale WAL moved away: {after:?}"
                );
                assert!(after.contains(&("uploads/b.txt".into(), "new upload".into())), "{after:?}");
            }
        }
    }

    /// The app started on the restored data (making a -wal and -shm where there were none),
    /// then failed: the rollback, cut at each of its own renames and run again, always ends
    /// with exactly the old state and never a -wal beside the old database.
    #[test]
    fn rollback_after_a_failed_start_converges_from_any_cut() {
        for had_wal in [true, false] {
            let rollback_steps = {
                let (dir, j) = setup(had_wal);
                swap(&j).unwrap();
                std::fs::write(dir.path().join("data/app.db-wal"), "new wal").unwrap();
                std::fs::write(dir.path().join("data/app.db-shm"), "new shm").unwrap();
                count_rollback_renames(&j)
            };
            for cut in 0..=rollback_steps {
                let (dir, j) = setup(had_wal);
                let before = state(dir.path());
                swap(&j).unwrap();
                std::fs::write(dir.path().join("data/app.db-wal"), "new wal").unwrap();
                std::fs::write(dir.path().join("data/app.db-shm"), "new shm").unwrap();
                partial_rollback(&j, cut);
                assert!(rollback(&j).is_empty());
                assert_eq!(state(dir.path()), before, "rollback cut after {cut} renames (wal: {had_wal})");
            }
        }
    }

    /// The renames a full rollback makes, by replaying it on a copy of the moves.
    fn count_rollback_renames(j: &Journal) -> usize {
        let mut n = 0;
        for m in j.moves.iter().rev() {
            let moved_aside = exists(&m.aside);
            if (moved_aside || !m.had_live) && exists(&m.live) {
                n += 1;
            }
            if moved_aside {
                n += 1;
            }
        }
        n
    }

    /// Do the first `cut` renames of a rollback, as a power cut would leave them.
    fn partial_rollback(j: &Journal, cut: usize) {
        let mut done = 0;
        for m in j.moves.iter().rev() {
            let moved_aside = exists(&m.aside);
            if (moved_aside || !m.had_live) && exists(&m.live) {
                if done == cut {
                    return;
                }
                let to: PathBuf = match &m.staged {
                    Some(s) if !exists(s) => s.clone(),
                    _ => m.quarantine.clone(),
                };
                std::fs::rename(&m.live, to).unwrap();
                done += 1;
            }
            if moved_aside {
                if done == cut {
                    return;
                }
                std::fs::rename(&m.aside, &m.live).unwrap();
                done += 1;
            }
        }
    }
}
