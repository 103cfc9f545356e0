//! `datavault verify`: check archives against their manifests. Shallow: the archive file's
//! size and SHA-256 (no key needed). Deep: also decrypt and read every entry against the
//! inner manifest (needs the identity); nothing is written anywhere.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::ops::Env;
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
        return Err(Error::Usage("there are no archives on the target to verify".into()));
    }
    let identities = if deep {
        Some(std::sync::Arc::new(crate::keys::load_identities(env.settings.encryption.identity.as_deref())?))
    } else {
        None
    };
    let mut out = Vec::new();
    for l in chosen {
        let res = match &identities {
            None if l.snapshot => shallow_snapshot(&store, l),
            None => shallow(&store, l),
            Some(ids) => {
                let path = env.settings.encryption.identity.as_deref().unwrap_or(std::path::Path::new("?"));
                crate::archive::read::read_archive(&store, l, ids, path, None, &*env.progress).map(|r| {
                    format!(
                        "{} entries, {} files, {} bytes of content verified",
                        r.entries, r.files, r.plain_bytes
                    )
                })
            }
        };
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
    Ok(out)
}

/// A snapshot without the key (#9): its tree and refs against the manifest, every chunk it
/// needs in the index, and every pack holding one hashed against its name.
fn shallow_snapshot(store: &Store, l: &Listing) -> Result<String> {
    if let Some(p) = &l.problem {
        return Err(Error::integrity(&l.name, p.clone()));
    }
    let ds = store.snapshots()?.ok_or_else(|| Error::integrity(&l.name, "the snapshot store is missing"))?;
    let mut cache = crate::store::dedup::Cache::open_in_memory()?;
    let c =
        crate::store::dedup::verify::verify_snapshot(&ds, &mut cache, &l.name, &crate::progress::NoProgress)?;
    Ok(format!(
        "tree and refs match the manifest; {} chunks indexed; {} packs ({} bytes) match their SHA-256",
        c.chunks, c.packs, c.pack_bytes
    ))
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
