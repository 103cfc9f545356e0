//! The swap and its undoing: the only code that renames live data.
//!
//! Every rename is done with `renameat` between descriptors of folders opened once
//! ([`Dirs`]): the live data's parent folders (the admin's config), and datavault's own
//! staging, aside and undone folders inside them, opened with `O_NOFOLLOW`. The app may
//! rename and replace things in its own folders while this runs: what it puts in place of
//! datavault's folders is never followed, and the restored data comes from the staging
//! folder datavault filled, not from whatever now bears its name.
//!
//! [`swap`] moves each live path aside, then its staged replacement in, one rename at a time.
//! [`rollback`] is written to be safe from *any* state a swap, a start or an earlier rollback
//! can be cut in: it looks at what is on disk, not at how far anything got, so running it
//! again after a power cut converges on exactly the previous data. What stands at a live
//! path and is not the previous data is never deleted once the app may have written to it:
//! [`Undo::Keep`] moves it to the `.datavault-undone-*` folder beside it, which datavault
//! never removes (the owner is told).

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode};

use super::journal::{Journal, Move};
use crate::crashpoint::crash_point;

/// The folders a restore renames between, each opened once.
pub struct Dirs {
    open: Vec<(PathBuf, OwnedFd)>,
}

impl Dirs {
    /// Open every folder the journal's renames touch. `held`: folders this process created
    /// and still holds open (the staging folders), used as they are.
    pub fn open(j: &Journal, held: &[(PathBuf, OwnedFd)]) -> std::io::Result<Dirs> {
        let mut open: Vec<(PathBuf, OwnedFd)> = Vec::new();
        for (p, fd) in held {
            open.push((p.clone(), fd.try_clone()?));
        }
        for m in &j.moves {
            if let Some(parent) = m.live.parent() {
                if !open.iter().any(|(p, _)| p == parent) {
                    // The live data's folder: the admin's path, symlinks and all.
                    let fd = rustix::fs::open(
                        parent,
                        crate::tree::DIR.difference(rustix::fs::OFlags::NOFOLLOW),
                        Mode::empty(),
                    )?;
                    open.push((parent.to_path_buf(), fd));
                }
            }
        }
        let kept = j.moves.iter().filter_map(|m| m.kept.parent().map(Path::to_path_buf));
        let ours: Vec<PathBuf> = j.stages.iter().chain(&j.asides).cloned().chain(kept).collect();
        for p in ours {
            if open.iter().any(|(q, _)| *q == p) {
                continue;
            }
            let (parent, name) = split(&p)?;
            let Some((_, pfd)) = open.iter().find(|(q, _)| q == parent) else { continue };
            match crate::tree::open_dir(pfd, &name) {
                Ok(fd) => open.push((p, fd)),
                // Not there (yet): created on demand (kept folders), or nothing to do.
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Dirs { open })
    }

    /// The folder holding `p` and `p`'s name in it.
    fn at(&self, p: &Path) -> std::io::Result<(&OwnedFd, CString)> {
        let (parent, name) = split(p)?;
        let (_, fd) = self.open.iter().find(|(q, _)| q == parent).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{} is not open", parent.display()))
        })?;
        Ok((fd, name))
    }

    fn exists(&self, p: &Path) -> bool {
        self.at(p)
            .map(|(fd, n)| rustix::fs::statat(fd, &n, AtFlags::SYMLINK_NOFOLLOW).is_ok())
            .unwrap_or(false)
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        let (ffd, fname) = self.at(from)?;
        let (tfd, tname) = self.at(to)?;
        rustix::fs::renameat(ffd, &fname, tfd, &tname).map_err(Into::into)
    }

    /// Create (or find) one of our folders beside the live data, private, never a link.
    fn ensure(&mut self, p: &Path) -> std::io::Result<()> {
        if self.open.iter().any(|(q, _)| q == p) {
            return Ok(());
        }
        let (pfd, name) = self.at(p)?;
        match rustix::fs::mkdirat(pfd, &name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = crate::tree::open_dir(pfd, &name)?;
        let _ = rustix::fs::fsync(pfd);
        self.open.push((p.to_path_buf(), fd));
        Ok(())
    }

    /// fsync every folder renamed in or out of, so the renames survive a power cut.
    pub fn sync(&self) {
        for (_, fd) in &self.open {
            let _ = rustix::fs::fsync(fd);
        }
    }
}

fn split(p: &Path) -> std::io::Result<(&Path, CString)> {
    let bad =
        || std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} has no folder", p.display()));
    let parent = p.parent().ok_or_else(bad)?;
    let name = p.file_name().ok_or_else(bad)?;
    Ok((parent, CString::new(name.as_bytes()).map_err(|_| bad())?))
}

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

pub fn swap(j: &Journal, dirs: &Dirs) -> std::io::Result<()> {
    for (from, to) in swap_steps(j) {
        dirs.rename(from, to)?;
        crash_point("swap: one rename");
    }
    dirs.sync();
    Ok(())
}

/// What a rollback does with what stands at a live path and is not the previous data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undo {
    /// The app never ran on the restored data (a swap that failed under a stopped app):
    /// the staged data goes back to staging, to be deleted with it.
    Discard,
    /// The app may have written to it (it was started, or the machine rebooted after a
    /// power cut and the app came up): it is kept in `.datavault-undone-*`.
    Keep,
}

/// Undo whatever part of the swap happened. Returns what could not be put back, and the
/// folders where it kept what it moved out of the way.
pub fn rollback(j: &Journal, dirs: &mut Dirs, mode: Undo) -> (Vec<String>, Vec<PathBuf>) {
    let mut problems = Vec::new();
    let mut kept = Vec::new();
    for m in j.moves.iter().rev() {
        match undo(m, dirs, mode) {
            Ok(Some(k)) => kept.push(k),
            Ok(None) => {}
            Err(e) => {
                log::error!("{e}");
                problems.push(e);
            }
        }
    }
    dirs.sync();
    kept.sort();
    kept.dedup();
    (problems, kept)
}

fn undo(m: &Move, dirs: &mut Dirs, mode: Undo) -> Result<Option<PathBuf>, String> {
    let moved_aside = dirs.exists(&m.aside);
    let mut kept = None;
    // Where the live path holds something that is not the previous data, it must go first.
    if (moved_aside || !m.had_live) && dirs.exists(&m.live) {
        let to = match &m.staged {
            Some(s) if mode == Undo::Discard && !dirs.exists(s) => s.clone(),
            _ => {
                let folder = m.kept.parent().expect("a kept path has a folder");
                dirs.ensure(folder).map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
                kept = Some(folder.to_path_buf());
                free_name(dirs, &m.kept)
            }
        };
        dirs.rename(&m.live, &to)
            .map_err(|e| format!("cannot move {} out of the way: {e}", m.live.display()))?;
        crash_point("rollback: restored data moved out");
    }
    if moved_aside {
        dirs.rename(&m.aside, &m.live)
            .map_err(|e| format!("cannot put {} back from {}: {e}", m.live.display(), m.aside.display()))?;
        crash_point("rollback: previous data put back");
    }
    Ok(kept)
}

/// `p`, or `p.2`, `p.3`... if an earlier interrupted rollback already kept something there:
/// nothing kept is ever overwritten.
fn free_name(dirs: &Dirs, p: &Path) -> PathBuf {
    let mut candidate = p.to_path_buf();
    let mut n = 1;
    while dirs.exists(&candidate) {
        n += 1;
        let mut name = p.file_name().unwrap_or_default().to_owned();
        name.push(format!(".{n}"));
        candidate = p.with_file_name(name);
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::super::journal::Phase;
    use super::*;
    use crate::fsutil::with_suffix;

    fn exists(p: &Path) -> bool {
        std::fs::symlink_metadata(p).is_ok()
    }

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

    fn kept(root: &Path) -> Vec<(String, String)> {
        let mut v: Vec<_> = walkdir::WalkDir::new(root)
            .sort_by_file_name()
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file() && e.path().to_string_lossy().contains(".datavault-undone-"))
            .map(|e| {
                (
                    e.path().strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
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
        let mut moves: Vec<Move> = ["-wal", "-shm", "-journal"]
            .iter()
            .map(|sfx| {
                let live = with_suffix(&live_db, sfx);
                let name = live.file_name().unwrap().to_str().unwrap().to_string();
                Move {
                    aside: p.join("data/.datavault-old-1").join(&name),
                    had_live: exists(&live),
                    kept: p.join("data/.datavault-undone-1").join(&name),
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
            kept: p.join("data/.datavault-undone-1/app.db"),
        });
        moves.push(Move {
            live: p.join("uploads"),
            aside: p.join(".datavault-old-1/uploads"),
            staged: Some(p.join(".datavault-restore-1/uploads")),
            had_live: true,
            kept: p.join(".datavault-undone-1/uploads"),
        });
        let j = Journal {
            archive: "a".into(),
            phase: Phase::Swapping,
            moves,
            stages: vec![p.join("data/.datavault-restore-1"), p.join(".datavault-restore-1")],
            asides: vec![p.join("data/.datavault-old-1"), p.join(".datavault-old-1")],
        };
        (dir, j)
    }

    fn dirs(j: &Journal) -> Dirs {
        Dirs::open(j, &[]).unwrap()
    }

    /// Cut the swap after every possible rename: rollback always gives exactly the old state.
    #[test]
    fn rollback_restores_the_old_state_after_a_cut_at_any_step_of_the_swap() {
        for mode in [Undo::Discard, Undo::Keep] {
            for had_wal in [true, false] {
                let steps = {
                    let (_d, j) = setup(had_wal);
                    swap_steps(&j).len()
                };
                for cut in 0..=steps {
                    let (dir, j) = setup(had_wal);
                    let before = state(dir.path());
                    let d = dirs(&j);
                    for (from, to) in swap_steps(&j).into_iter().take(cut) {
                        d.rename(from, to).unwrap();
                    }
                    let (problems, _) = rollback(&j, &mut dirs(&j), mode);
                    assert!(problems.is_empty(), "{problems:?}");
                    assert_eq!(
                        state(dir.path()),
                        before,
                        "cut after {cut} of {steps} renames (wal: {had_wal}, {mode:?})"
                    );
                    if mode == Undo::Keep {
                        continue;
                    }
                    assert!(kept(dir.path()).is_empty(), "nothing kept when the app never ran");
                    // Discarded back into staging: the complete swap gives exactly the new state.
                    swap(&j, &dirs(&j)).unwrap();
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
    }

    /// The app started on the restored data (making a -wal and -shm where there were none),
    /// then failed: the rollback, cut at each of its own renames and run again, always ends
    /// with exactly the old state, never a -wal beside the old database, and what the app
    /// wrote kept in the undone folder.
    #[test]
    fn rollback_after_a_failed_start_converges_from_any_cut_and_keeps_what_the_app_wrote() {
        for had_wal in [true, false] {
            let total = {
                let (dir, j) = setup(had_wal);
                swap(&j, &dirs(&j)).unwrap();
                std::fs::write(dir.path().join("data/app.db-wal"), "new wal").unwrap();
                count_renames(&j, &dirs(&j))
            };
            for cut in 0..=total {
                let (dir, j) = setup(had_wal);
                let before = state(dir.path());
                swap(&j, &dirs(&j)).unwrap();
                std::fs::write(dir.path().join("data/app.db-wal"), "new wal").unwrap();
                partial_rollback(&j, &mut dirs(&j), cut);
                let (problems, _) = rollback(&j, &mut dirs(&j), Undo::Keep);
                assert!(problems.is_empty(), "{problems:?}");
                assert_eq!(state(dir.path()), before, "rollback cut after {cut} renames (wal: {had_wal})");
                let k = kept(dir.path());
                assert!(k.iter().any(|(p, t)| p.ends_with("app.db-wal") && t == "new wal"), "{k:?}");
                assert!(k.iter().any(|(p, t)| p.ends_with("app.db") && t == "new db"), "{k:?}");
            }
        }
    }

    /// How many renames a full Keep rollback makes from the current state.
    fn count_renames(j: &Journal, d: &Dirs) -> usize {
        j.moves
            .iter()
            .map(|m| {
                let aside = d.exists(&m.aside);
                usize::from((aside || !m.had_live) && d.exists(&m.live)) + usize::from(aside)
            })
            .sum()
    }

    /// Do the first `cut` renames of a Keep rollback, as a power cut would leave them.
    fn partial_rollback(j: &Journal, d: &mut Dirs, cut: usize) {
        let mut done = 0;
        for m in j.moves.iter().rev() {
            let aside = d.exists(&m.aside);
            if (aside || !m.had_live) && d.exists(&m.live) {
                if done == cut {
                    return;
                }
                d.ensure(m.kept.parent().unwrap()).unwrap();
                d.rename(&m.live, &m.kept).unwrap();
                done += 1;
            }
            if aside {
                if done == cut {
                    return;
                }
                d.rename(&m.aside, &m.live).unwrap();
                done += 1;
            }
        }
    }

    #[test]
    fn a_staging_folder_replaced_by_a_link_is_never_followed() {
        let (dir, j) = setup(false);
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(outside.path().join("uploads")).unwrap();
        std::fs::write(outside.path().join("uploads/evil"), "evil").unwrap();
        let stage = dir.path().join(".datavault-restore-1");
        // Opened before the app swaps the folder for a link.
        let held = vec![(stage.clone(), rustix::fs::open(&stage, crate::tree::DIR, Mode::empty()).unwrap())];
        std::fs::rename(&stage, dir.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(outside.path(), &stage).unwrap();
        swap(&j, &Dirs::open(&j, &held).unwrap()).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("uploads/b.txt")).unwrap(), "new upload");
        assert!(outside.path().join("uploads/evil").exists(), "the link's target was not touched");
    }
}
