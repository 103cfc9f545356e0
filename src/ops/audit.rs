//! `datavault audit`: what the catalog remembers: recent runs, events and every archive.

use serde::Serialize;

use crate::catalog::{ArchiveRecord, Catalog, EventRecord, RunRecord};
use crate::error::Result;
use crate::ops::Env;

#[derive(Debug, Clone, Serialize)]
pub struct Audit {
    pub runs: Vec<RunRecord>,
    pub events: Vec<EventRecord>,
    pub archives: Vec<ArchiveRecord>,
}

pub fn run(env: &Env, limit: usize) -> Result<Audit> {
    let c = Catalog::open_or_rebuild(&env.settings.state.catalog_path())?;
    Ok(Audit { runs: c.runs(limit)?, events: c.events(limit)?, archives: c.archives()? })
}
