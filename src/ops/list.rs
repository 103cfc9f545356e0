//! `datavault list`: the archives on the drive, newest first, complete or not; the catalog
//! is brought in line with them on the way (the drive is the source of truth).

use crate::catalog::Catalog;
use crate::error::Result;
use crate::ops::Env;
use crate::store::Listing;

pub fn run(env: &Env) -> Result<Vec<Listing>> {
    let (_, listings) = crate::ops::listings(env)?;
    match Catalog::open(&env.settings.state.catalog_path()) {
        Ok(c) => crate::ops::sync_catalog(&c, &listings),
        Err(e) => log::warn!("the catalog was not updated: {e}"),
    }
    Ok(listings)
}
