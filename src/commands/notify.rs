//! `datavault notify`: send what is pending, `--start` the start ping, `--test` a test
//! message, `--list` what was sent.

use datavault::alerts::outbox;
use datavault::catalog::Catalog;
use datavault::error::{exit, Result};
use datavault::manifest::format_time;
use datavault::ops::{self, Env};

use crate::ui::{json, out, Ui};

pub fn run(env: &Env, start: bool, test: bool, list: bool, ui: &Ui) -> Result<u8> {
    if start {
        // The backup this announces runs whatever happens here: never a failing exit.
        match ops::notify::start_ping(env) {
            Ok(true) => ui.text("start ping sent\n")?,
            Ok(false) => ui.text("no start ping configured (notify.ping_url or notify.ping_start_url)\n")?,
            Err(e) => log::warn!("start ping not sent: {e}"),
        }
        return Ok(exit::SUCCESS);
    }
    if list {
        let catalog = Catalog::open_or_rebuild(&env.settings.state.catalog_path())?;
        let records = outbox::recent(&catalog, 30)?;
        if ui.json {
            json(&records)?;
            return Ok(exit::SUCCESS);
        }
        let mut s = String::new();
        for r in &records {
            s += &format!(
                "{}  {:<17} {:<11} {:<6} {:<10} {}{}\n",
                format_time(r.created_at),
                r.event,
                r.state,
                r.channel.as_deref().unwrap_or("-"),
                r.status.as_deref().unwrap_or("(no channel)"),
                r.title,
                r.last_error.as_deref().map(|e| format!(" [{e}]")).unwrap_or_default()
            );
        }
        out(if s.is_empty() { "no notifications yet\n" } else { &s })?;
        return Ok(exit::SUCCESS);
    }
    let o = if test { ops::notify::test(env)? } else { ops::notify::run(env)? };
    if ui.json {
        json(&o)?;
    } else if o.busy {
        out("another `datavault notify` is sending; nothing done\n")?;
    } else {
        let r = &o.sent;
        let mut s = format!(
            "notify: {} new, {} sent, {} pending, {} given up\n",
            o.recorded, r.sent, r.pending, r.given_up
        );
        for e in &r.errors {
            s += &format!("  not sent: {e} (retried at the next run)\n");
        }
        out(&s)?;
    }
    // A message that could not go out is retried; the unit does not fail for it (the status
    // and the metrics show it), except a test, whose whole point is to see it arrive.
    Ok(if test && o.sent.failed > 0 { exit::FAILURE } else { exit::SUCCESS })
}
