//! `datavault audit`.

use datavault::error::{exit, Result};
use datavault::manifest::format_time;
use datavault::ops::{self, Env};
use datavault::target::human_bytes;

use crate::ui::{json, out, Ui};

pub fn run(env: &Env, limit: usize, ui: &Ui) -> Result<u8> {
    let a = ops::audit::run(env, limit)?;
    if ui.json {
        json(&a)?;
        return Ok(exit::SUCCESS);
    }
    let mut s = String::from("RUNS\n");
    for r in &a.runs {
        s += &format!(
            "  #{:<5} {} {:<8} {:<7} {:<8} {}{}\n",
            r.id,
            format_time(r.started_at),
            r.command,
            r.trigger,
            r.status.to_string(),
            r.user,
            r.error.as_ref().map(|e| format!("  error: {e}")).unwrap_or_default()
        );
    }
    s += "EVENTS\n";
    for e in &a.events {
        s += &format!(
            "  {} {:<20} {} {}\n",
            format_time(e.at),
            e.event.to_string(),
            e.archive.as_deref().unwrap_or("-"),
            e.detail
        );
    }
    s += "ARCHIVES\n";
    for r in &a.archives {
        s += &format!(
            "  {} {:<8} {:>10} {} {} expires {}\n",
            r.name,
            r.status.to_string(),
            human_bytes(r.size),
            r.user,
            &r.sha256[..r.sha256.len().min(16)],
            r.expires_at.map(format_time).unwrap_or_else(|| "-".into())
        );
    }
    out(&s)?;
    Ok(exit::SUCCESS)
}
