//! `datavault verify`: check archives against their manifests. Shallow: the archive file's
//! size and SHA-256 (no key needed). Deep: also decrypt and read every entry against the
//! inner manifest (needs the identity); nothing is written anywhere. With `--offsite`, the
//! same on the bucket, except that the shallow check compares the upload ledger's records
//! with the manifests instead of downloading the archives.

use serde::Serialize;

use crate::catalog::{Catalog, Event, VERIFY_DEEP, VERIFY_SHALLOW};
use crate::error::{Error, Result};
use crate::ops::{now, Env};
use crate::store::{Listing, Store};

#[derive(Debug, Clone, Serialize)]
pub struct VerifyResult {
    pub archive: String,
    pub ok: bool,
    pub deep: bool,
    pub message: String,
    pub exit_code: u8,
}

pub fn run(env: &Env, which: Option<&str>, all: bool, deep: bool) -> Result<Vec<VerifyResult>> {
    let (store, listings) = crate::ops::listings(env)?;
    let chosen: Vec<&Listing> = if all {
        listings.iter().collect()
    } else {
        vec![crate::ops::select(&listings, which, crate::ops::Pick::Newest)?]
    };
    if chosen.is_empty() {
        return Err(Error::Usage(format!("there are no archives in {} to verify", store.location())));
    }
    let identities = if deep {
        Some(std::sync::Arc::new(crate::keys::load_identities(env.settings.encryption.identity.as_deref())?))
    } else {
        None
    };
    // Offsite and shallow: nothing is downloaded; the ledger the pushes wrote says what
    // each object was when it was sent.
    let ledger = match (&identities, store.is_remote()) {
        (None, true) => Some(crate::offsite::ledger::Ledger::load(store.backend()).map_err(|e| {
            store.failure(e, "reading the upload ledger", |e| Error::io("reading the upload ledger", e))
        })?),
        _ => None,
    };
    let mut out = Vec::new();
    let mut found = Vec::new();
    for l in chosen {
        let res = match (&identities, &ledger) {
            (None, _) if l.snapshot => shallow_snapshot(&store, l),
            (None, Some(ledger)) => shallow_remote(&store, ledger, l),
            (None, None) => shallow(&store, l),
            (Some(ids), _) => {
                let path = env.settings.encryption.identity.as_deref().unwrap_or(std::path::Path::new("?"));
                crate::archive::read::read_archive(&store, l, ids, path, None, &*env.progress).map(|r| {
                    format!(
                        "{} entries, {} files, {} bytes of content verified",
                        r.entries, r.files, r.plain_bytes
                    )
                })
            }
        };
        found.push(match &res {
            Ok(message) => Some((Event::VerifyPassed, message.clone())),
            // Only what the archive is to blame for: a missing or wrong key, or a read error
            // on the drive, says nothing about whether it restores.
            Err(e @ Error::Integrity { .. }) if !e.is_wrong_key() => {
                Some((Event::VerifyFailed, e.to_string()))
            }
            Err(_) => None,
        });
        out.push(match res {
            Ok(message) => VerifyResult { archive: l.name.clone(), ok: true, deep, message, exit_code: 0 },
            Err(e) => VerifyResult {
                archive: l.name.clone(),
                ok: false,
                deep,
                message: match &e {
                    Error::Integrity { message, .. } => message.clone(),
                    other => other.to_string(),
                },
                exit_code: e.exit_code(),
            },
        });
    }
    if !store.is_remote() {
        record(env, deep, out.iter().zip(found));
    }
    Ok(out)
}

/// Into the catalog, for retention (an archive that failed is not "good") and the audit trail.
/// Best effort: `verify` needs no run lock and may be run by a user who cannot write the
/// state folder; what it printed stands either way.
fn record<'a>(
    env: &Env,
    deep: bool,
    results: impl Iterator<Item = (&'a VerifyResult, Option<(Event, String)>)>,
) {
    let path = env.settings.state.catalog_path();
    let catalog = match Catalog::open(&path) {
        Ok(c) => c,
        Err(e) => {
            log::debug!("verify results not recorded: {e}");
            return;
        }
    };
    let how = if deep { VERIFY_DEEP } else { VERIFY_SHALLOW };
    for (r, found) in results {
        let Some((event, detail)) = found else { continue };
        if let Err(e) = catalog.record_event(None, now(), event, Some(&r.archive), &format!("{how}{detail}"))
        {
            log::debug!("verify result not recorded: {e}");
        }
    }
}

/// A snapshot without the key (#9): its tree and refs against the manifest, every chunk it
/// needs in the index, and every pack holding one hashed against its name.
fn shallow_snapshot(store: &Store, l: &Listing) -> Result<String> {
    if let Some(p) = &l.problem {
        return Err(Error::integrity(&l.name, p.clone()));
    }
    let ds = store.snapshots()?.ok_or_else(|| Error::integrity(&l.name, "the snapshot store is missing"))?;
    let mut cache = crate::store::dedup::Cache::open_private()?;
    let c =
        crate::store::dedup::verify::verify_snapshot(&ds, &mut cache, &l.name, &crate::progress::NoProgress)?;
    Ok(format!(
        "tree and refs match the manifest; {} chunks indexed; {} packs ({} bytes) match their SHA-256",
        c.chunks, c.packs, c.pack_bytes
    ))
}

/// `verify --offsite` without `--deep`: the object's size as listed (checked against the
/// manifest by the scan) and the size and SHA-256 the push recorded while it streamed the
/// file, against the manifest. Keyless, and nothing but the manifests and the ledger is
/// downloaded; bit rot inside an object of the right size is `--deep`'s to find.
fn shallow_remote(store: &Store, ledger: &crate::offsite::ledger::Ledger, l: &Listing) -> Result<String> {
    use crate::offsite::ledger::Shallow;
    let (Some(m), None) = (&l.manifest, &l.problem) else {
        return Err(Error::integrity(&l.name, l.problem.clone().unwrap_or_else(|| "has no manifest".into())));
    };
    let manifest_name = l.manifest_name();
    let manifest_size = store
        .backend()
        .size(&manifest_name)
        .map_err(|e| store.failure(e, &format!("checking {manifest_name}"), |e| Error::io("checking", e)))?
        .unwrap_or(0);
    match ledger.check(&manifest_name, manifest_size, None) {
        Shallow::SizeDiffers { recorded, remote } => {
            return Err(Error::integrity(
                &l.name,
                format!("its manifest in the bucket is {remote} bytes, {recorded} were uploaded: it was changed after the push"),
            ))
        }
        Shallow::Ok | Shallow::NotRecorded | Shallow::HashDiffers { .. } => {}
    }
    match ledger.check(&l.name, m.archive_size, Some(&m.archive_sha256)) {
        Shallow::Ok => Ok(format!(
            "size and the SHA-256 recorded at upload match the manifest ({} bytes; not downloaded)",
            m.archive_size
        )),
        Shallow::NotRecorded => {
            log::warn!(
                "{}: not in the upload ledger (a push cut off before recording it; the next push adopts it): only its size was checked; --deep reads it",
                l.name
            );
            Ok(format!("size matches the manifest ({} bytes); not in the upload ledger", m.archive_size))
        }
        Shallow::SizeDiffers { recorded, remote } => Err(Error::integrity(
            &l.name,
            format!("is {remote} bytes in the bucket, {recorded} were uploaded: truncated or replaced"),
        )),
        Shallow::HashDiffers { recorded } => Err(Error::integrity(
            &l.name,
            format!("the SHA-256 recorded at upload ({recorded}) differs from its manifest: the object is not the backup that was sent"),
        )),
    }
}

fn shallow(store: &Store, l: &Listing) -> Result<String> {
    let (Some(m), None) = (&l.manifest, &l.problem) else {
        return Err(Error::integrity(&l.name, l.problem.clone().unwrap_or_else(|| "has no manifest".into())));
    };
    let (sha, len) = store
        .open_archive(l)
        .and_then(|(r, _)| {
            let mut h = crate::fsutil::HashingReader::new(r);
            std::io::copy(&mut h, &mut std::io::sink())?;
            Ok(h.finish())
        })
        .map_err(|e| Error::integrity(&l.name, format!("cannot read the archive file: {e}")))?;
    if len != m.archive_size {
        return Err(Error::integrity(
            &l.name,
            format!("is {len} bytes, its manifest says {}: truncated or damaged", m.archive_size),
        ));
    }
    if sha != m.archive_sha256 {
        return Err(Error::integrity(
            &l.name,
            "SHA-256 differs from its manifest: the file is damaged or was replaced",
        ));
    }
    Ok(format!("SHA-256 matches the manifest ({len} bytes)"))
}
