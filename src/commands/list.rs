//! `datavault list`.

use std::collections::HashMap;

use datavault::error::{exit, Result};
use datavault::manifest::format_time;
use datavault::ops::{self, Env};
use datavault::store::Listing;
use datavault::target::human_bytes;

use crate::commands::kind_name;
use crate::ui::{json, out, Ui};

#[derive(serde::Serialize)]
struct ListRow<'a> {
    name: &'a str,
    complete: bool,
    problem: Option<&'a str>,
    kind: Option<&'static str>,
    created: Option<String>,
    trigger: Option<&'a str>,
    comment: Option<&'a str>,
    size: Option<u64>,
    files: Option<u64>,
    sha256: Option<&'a str>,
    /// `archive` (one `.tar.zst.age` file) or `snapshot` (deduplicated, under `store/`, #9).
    format: &'static str,
    /// What the last failed drill or `verify` of it said, when no check as thorough passed
    /// since; retention then counts it as damaged.
    failed_check: Option<&'a str>,
}

fn row<'a>(l: &'a Listing, failed: &'a HashMap<String, String>) -> ListRow<'a> {
    let m = l.manifest.as_ref();
    ListRow {
        name: &l.name,
        complete: l.is_complete(),
        problem: l.problem.as_deref(),
        kind: m.map(|m| kind_name(m.kind)),
        created: m.map(|m| format_time(m.created)),
        trigger: m.map(|m| m.trigger.as_str()),
        comment: m.and_then(|m| m.comment.as_deref()),
        size: m.map(|m| m.archive_size),
        files: m.map(|m| m.files),
        sha256: m.map(|m| m.archive_sha256.as_str()),
        format: if l.snapshot { "snapshot" } else { "archive" },
        failed_check: failed.get(&l.name).map(String::as_str),
    }
}

pub fn run(env: &Env, ui: &Ui) -> Result<u8> {
    let (listings, failed) = ops::list::run(env)?;
    if ui.json {
        json(&listings.iter().map(|l| row(l, &failed)).collect::<Vec<_>>())?;
        return Ok(exit::SUCCESS);
    }
    if listings.is_empty() {
        let place = match (env.offsite, &env.settings.offsite) {
            (true, Some(o)) => o.url.clone(),
            _ => env.settings.target.path.display().to_string(),
        };
        out(&format!("no archives in {place}\n"))?;
        return Ok(exit::SUCCESS);
    }
    let mut s = format!(
        "{:<21} {:<11} {:<7} {:>10} {:>6}  {:<10} {}\n",
        "CREATED (UTC)", "KIND", "TRIGGER", "SIZE", "FILES", "STATUS", "NAME"
    );
    for l in &listings {
        let r = row(l, &failed);
        let status = match (r.complete, r.failed_check) {
            (false, _) => "INCOMPLETE",
            (true, Some(_)) => "FAILED",
            (true, None) => "ok",
        };
        let note = match (&l.problem, r.failed_check) {
            (Some(p), _) => format!("  ({p})"),
            (None, Some(f)) => format!("  (failed its last check: {f})"),
            (None, None) => String::new(),
        };
        s += &format!(
            "{:<21} {:<11} {:<7} {:>10} {:>6}  {:<10} {}{}\n",
            r.created.unwrap_or_else(|| "?".into()).replace('T', " ").trim_end_matches('Z'),
            r.kind.unwrap_or("?"),
            r.trigger.unwrap_or("?"),
            r.size.map(human_bytes).unwrap_or_else(|| "?".into()),
            r.files.map(|f| f.to_string()).unwrap_or_else(|| "?".into()),
            status,
            l.name,
            note
        );
    }
    out(&s)?;
    Ok(exit::SUCCESS)
}
