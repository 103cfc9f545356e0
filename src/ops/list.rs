//! `datavault list`: the archives on the drive, newest first, complete or not; the catalog
//! is brought in line with them on the way (the drive is the source of truth). With
//! `--offsite`, the archives in the bucket (the catalog is left alone).

use std::collections::HashMap;

use crate::catalog::Catalog;
use crate::error::Result;
use crate::ops::Env;
use crate::store::Listing;

/// The archives, and those a drill or `verify` failed since they last passed a check as
/// thorough (name -> what the failure said; see [`Catalog::failed_checks`]).
pub fn run(env: &Env) -> Result<(Vec<Listing>, HashMap<String, String>)> {
    let (_, listings) = crate::ops::listings(env)?;
    // The catalog describes the drive: what the bucket holds is not synced into it.
    if env.offsite {
        return Ok((listings, HashMap::new()));
    }
    let failed = match Catalog::open(&env.settings.state.catalog_path()) {
        Ok(c) => {
            crate::ops::sync_catalog(&c, &listings);
            crate::ops::failed_checks(Some(&c), &listings)
        }
        Err(e) => {
            log::warn!("the catalog was not updated: {e}");
            crate::ops::failed_checks(None, &listings)
        }
    };
    Ok((listings, failed))
}
