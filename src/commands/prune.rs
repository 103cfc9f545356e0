//! `datavault prune`.

use datavault::error::{exit, Result};
use datavault::ops::{self, Env};
use datavault::retention::Decision;
use datavault::store::dedup::gc::GcOutcome;
use datavault::target::human_bytes;

use crate::ui::{json, out, Ui};

pub fn run(env: &Env, dry_run: bool, ui: &Ui) -> Result<u8> {
    let o = ops::prune::run(env, dry_run)?;
    if ui.json {
        json(&o)?;
        return Ok(exit::SUCCESS);
    }
    let mut s = decision_lines(&o.decisions, dry_run, ("WOULD DELETE", "deleted"), "");
    let n = o.decisions.iter().filter(|d| !d.keep).count();
    s += &if dry_run {
        format!("{n} archive(s) would be deleted (dry run)\n")
    } else {
        format!("{n} archive(s) deleted\n")
    };
    if let Some(gc) = &o.gc {
        s += &gc_line(gc, dry_run);
    }
    out(&s)?;
    Ok(exit::SUCCESS)
}

/// One line per retention decision: kept, or `done` (with `dry_run`: `would`) to it. `what`
/// goes before the name (`"snapshot "` for the bucket's store).
pub(crate) fn decision_lines(
    decisions: &[Decision],
    dry_run: bool,
    (would, done): (&str, &str),
    what: &str,
) -> String {
    let mut s = String::new();
    for d in decisions {
        let verb = match (d.keep, dry_run) {
            (true, _) => "keep  ",
            (false, true) => would,
            (false, false) => done,
        };
        s += &format!("{verb} {what}{}  ({})\n", d.name, d.reasons.join(", "));
    }
    s
}

/// What a snapshot store's garbage collection freed (or, with `dry_run`, would free).
pub(crate) fn gc_line(gc: &GcOutcome, dry_run: bool) -> String {
    let (verb, freed) = if dry_run { ("would free", "about ") } else { ("freed", "") };
    format!(
        "snapshot store: {verb} {freed}{} ({} pack(s) deleted, {} repacked, {} leftover file(s))\n",
        human_bytes(gc.bytes_freed),
        gc.packs_deleted,
        gc.packs_repacked,
        gc.leftovers_deleted
    )
}
