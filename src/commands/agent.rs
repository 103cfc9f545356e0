//! `datavault agent`: the appliance daemon runs in the library; it returns when stopped.

use std::path::Path;

use datavault::error::{exit, Result};

pub fn run(config: &Path) -> Result<u8> {
    datavault::agent::run(config)?;
    Ok(exit::SUCCESS)
}
