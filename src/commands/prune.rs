//! `datavault prune`.

use datavault::error::{exit, Result};
use datavault::ops::{self, Env};

use crate::ui::{json, out, Ui};

pub fn run(env: &Env, dry_run: bool, ui: &Ui) -> Result<u8> {
    let o = ops::prune::run(env, dry_run)?;
    if ui.json {
        json(&o)?;
        return Ok(exit::SUCCESS);
    }
    let mut s = String::new();
    for d in &o.decisions {
        let verb = match (d.keep, dry_run) {
            (true, _) => "keep  ",
            (false, true) => "WOULD DELETE",
            (false, false) => "deleted",
        };
        s += &format!("{verb} {}  ({})\n", d.name, d.reasons.join(", "));
    }
    let n = o.decisions.iter().filter(|d| !d.keep).count();
    s += &if dry_run {
        format!("{n} archive(s) would be deleted (dry run)\n")
    } else {
        format!("{n} archive(s) deleted\n")
    };
    if let Some(gc) = &o.gc {
        let (verb, freed) = if dry_run { ("would free", "about ") } else { ("freed", "") };
        s += &format!(
            "snapshot store: {verb} {freed}{} ({} pack(s) deleted, {} repacked, {} leftover file(s))\n",
            datavault::target::human_bytes(gc.bytes_freed),
            gc.packs_deleted,
            gc.packs_repacked,
            gc.leftovers_deleted
        );
    }
    out(&s)?;
    Ok(exit::SUCCESS)
}
