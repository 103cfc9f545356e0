//! `datavault restore`: into a folder, or in place after the operator confirmed which archive.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use datavault::error::{exit, Error, Result};
use datavault::manifest::format_time;
use datavault::ops::{self, Env};
use datavault::store::Listing;
use datavault::target::human_bytes;

use crate::ui::{json, out, printable, Ui};

pub fn run(
    env: &Env,
    archive: Option<&str>,
    to: Option<&Path>,
    yes: bool,
    safety: ops::restore::SafetyCopy,
    skip_damaged: bool,
    ui: &Ui,
) -> Result<u8> {
    let o = match to {
        Some(dir) => ops::restore::to_dir(env, archive, dir, skip_damaged)?,
        None => {
            // Decided once: what the operator confirms is what is restored, even if a backup
            // finishes in between.
            let chosen = ops::restore::choose(env, archive)?;
            if !yes {
                confirm(env, &chosen, safety)?;
            }
            ops::restore::in_place(env, Some(&chosen.name), safety)?
        }
    };
    if ui.json {
        json(&o)?;
        return Ok(exit::SUCCESS);
    }
    let mut s = format!(
        "restored {} from {} ({} files, {}) in {:.1} s\n",
        o.archive,
        o.from,
        o.files,
        human_bytes(o.bytes),
        o.seconds
    );
    for d in &o.destination {
        s += &format!("  -> {}\n", d.display());
    }
    for c in &o.checks {
        s += &format!("  [{}] {}: {}\n", if c.ok { " ok " } else { "FAIL" }, c.name, c.detail);
    }
    if o.in_place {
        match &o.pre_restore_archive {
            Some(p) => s += &format!("  the data it replaced is saved in {p} (restore that to undo)\n"),
            None if o.safety_copy_skipped => s += "  the data it replaced was NOT saved (--no-safety-copy)\n",
            None => s += "  there was no live data to save first\n",
        }
    }
    out(&s)?;
    Ok(exit::SUCCESS)
}

/// In-place restore replaces live data: ask on a terminal, refuse elsewhere.
fn confirm(env: &Env, l: &Listing, safety: ops::restore::SafetyCopy) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::Usage(
            "restore in place replaces the live data: run it on a terminal to confirm, or pass --yes".into(),
        ));
    }
    let created = l.created().map(format_time).unwrap_or_default();
    let prompt = format!(
        "This replaces the live data ({}{}) with {} (created {created}).\n\
         {} Type 'restore' to go on: ",
        env.settings.source.database.display(),
        env.settings.source.uploads.as_ref().map(|u| format!(", {}", u.display())).unwrap_or_default(),
        l.name,
        match safety {
            ops::restore::SafetyCopy::Required => "The current data is saved first as a PRE-RESTORE archive.",
            ops::restore::SafetyCopy::Skip => "The current data is NOT saved first (--no-safety-copy).",
        },
    );
    eprint!("{}", printable(&prompt));
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).map_err(|e| Error::Usage(format!("no answer: {e}")))?;
    if answer.trim() != "restore" {
        return Err(Error::Usage("restore cancelled; nothing was changed".into()));
    }
    Ok(())
}
