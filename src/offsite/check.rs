//! The shallow check of a remote copy, for `verify --offsite` without `--deep`: every object
//! a backup or snapshot needs is listed at the size the ledger recorded, and the recorded
//! SHA-256 is what the object must hash to (the manifest's for an archive, the name for a
//! pack). Nothing is downloaded but the manifests and the ledger; bit rot inside an object of
//! the right size is `--deep`'s job (download, decrypt, check everything).

use std::collections::HashMap;
use std::io;

use serde::Serialize;

use super::ledger::{Ledger, Shallow};
use crate::manifest::Manifest;
use crate::store::backend::{join, Backend};
use crate::store::{ARCHIVE_SUFFIX, MANIFEST_SUFFIX};

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub path: String,
    #[serde(flatten)]
    pub result: Shallow,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ShallowReport {
    pub location: String,
    /// Objects whose size and recorded hash check out.
    pub ok: usize,
    /// Everything else: not recorded, size or hash differs, manifest unreadable.
    pub problems: Vec<Finding>,
    /// Archives whose manifest is missing (a push in progress, or an interrupted one).
    pub incomplete: Vec<String>,
}

impl ShallowReport {
    /// No object differs from its record (unrecorded objects are reported, not failures:
    /// a push killed before it wrote its ledger leaves some until the next push adopts them).
    pub fn clean(&self) -> bool {
        self.problems.iter().all(|f| f.result == Shallow::NotRecorded)
    }
}

/// Check every archive (and the store's packs) on `remote` against its ledger.
pub fn shallow(remote: &dyn Backend) -> io::Result<ShallowReport> {
    let ledger = Ledger::load(remote)?;
    let mut r = ShallowReport { location: remote.location(), ..Default::default() };
    let top: HashMap<String, u64> = remote.list("")?.into_iter().map(|o| (o.name, o.size)).collect();
    let mut names: Vec<&String> = top.keys().collect();
    names.sort();
    let note = |r: &mut ShallowReport, path: String, result: Shallow| {
        if result == Shallow::Ok {
            r.ok += 1;
        } else {
            r.problems.push(Finding { path, result });
        }
    };
    for name in names {
        let Some(stem) = name.strip_suffix(ARCHIVE_SUFFIX) else { continue };
        let manifest = format!("{stem}{MANIFEST_SUFFIX}");
        let Some(&msize) = top.get(&manifest) else {
            r.incomplete.push(name.clone());
            continue;
        };
        let expected = match remote.read_small(&manifest, 16 << 20).map(|b| Manifest::parse(name, &b)) {
            Ok(Ok(m)) => Some(m.archive_sha256),
            Ok(Err(_)) => None,
            Err(e) if super::remote_error::class_of(&e).is_some() => return Err(e),
            Err(_) => None,
        };
        if expected.is_none() {
            r.problems.push(Finding {
                path: manifest.clone(),
                result: Shallow::HashDiffers { recorded: "manifest unreadable".into() },
            });
        }
        note(&mut r, name.clone(), ledger.check(name, top[name], expected.as_deref()));
        note(&mut r, manifest.clone(), ledger.check(&manifest, msize, None));
    }
    if remote.size("store/config.json")?.is_some() {
        for dir in crate::store::dedup::format::pack_dirs() {
            for o in remote.list(&dir)? {
                let path = join(&dir, &o.name);
                let result = ledger.check(&path, o.size, Some(&o.name));
                note(&mut r, path, result);
            }
        }
    }
    Ok(r)
}
