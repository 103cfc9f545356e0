//! `datavault list`: the archives on the drive, newest first, complete or not; the catalog
//! is brought in line with them on the way (the drive is the source of truth). With
//! `--offsite`, the archives in the bucket (the catalog is left alone).

use crate::catalog::Catalog;
use crate::error::Result;
use crate::ops::Env;
use crate::store::Listing;

pub fn run(env: &Env) -> Result<Vec<Listing>> {
    let (_, listings) = crate::ops::listings(env)?;
    // The catalog describes the drive: what the bucket holds is not synced into it.
    if env.offsite {
        return Ok(listings);
    }
    match Catalog::open(&env.settings.state.catalog_path()) {
        Ok(c) => crate::ops::sync_catalog(&c, &listings),
        Err(e) => log::warn!("the catalog was not updated: {e}"),
    }
    Ok(listings)
}
