//! The commands that run an operation and render its result.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use datavault::catalog::Catalog;
use datavault::error::{exit, Error, Result};
use datavault::manifest::{format_time, Listing};
use datavault::ops::{self, backup::BackupOptions, Env};
use datavault::retention::ArchiveKind;
use datavault::target::human_bytes;

use crate::cli::Ui;
use crate::commands::{json, out};

fn kind_name(k: ArchiveKind) -> &'static str {
    match k {
        ArchiveKind::Backup => "backup",
        ArchiveKind::PreRestore => "pre-restore",
    }
}

pub fn backup(env: &Env, trigger: &str, comment: Option<String>, ui: &Ui) -> Result<u8> {
    let opts = BackupOptions { kind: ArchiveKind::Backup, trigger: trigger.into(), comment };
    let o = ops::backup::run(env, &opts)?;
    if ui.json {
        json(&o);
        return Ok(exit::SUCCESS);
    }
    let m = &o.manifest;
    let mut s = format!("backup created: {}\n", o.archive.display());
    s += &format!(
        "  {} archive, {} files, {} of data, took {:.1} s\n",
        human_bytes(m.archive_size),
        m.files,
        human_bytes(m.plain_bytes),
        m.duration_ms as f64 / 1000.0
    );
    if let Some(db) = &m.database {
        s += &format!(
            "  database {} ({} pages, schema version {})\n",
            human_bytes(db.size),
            db.page_count,
            db.schema_version
        );
    }
    s += &format!("  sha256 {}\n", m.archive_sha256);
    if !m.changed_during_backup.is_empty() {
        s += &format!(
            "  {} file(s) changed while being read (listed in the manifest)\n",
            m.changed_during_backup.len()
        );
    }
    if !m.skipped.is_empty() {
        s += &format!("  {} item(s) skipped (listed in the manifest)\n", m.skipped.len());
    }
    if !o.pruned.is_empty() {
        s += &format!("  pruned {} old archive(s): {}\n", o.pruned.len(), o.pruned.join(", "));
    }
    if let Some(why) = &o.prune_skipped {
        s += &format!("  pruning skipped: {why}\n");
    }
    out(&s);
    Ok(exit::SUCCESS)
}

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
}

fn row(l: &Listing) -> ListRow<'_> {
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
    }
}

pub fn list(env: &Env, ui: &Ui) -> Result<u8> {
    let listings = ops::listings(env)?;
    if let Ok(c) = Catalog::open(&env.settings.state.catalog_path()) {
        ops::sync_catalog(&c, &listings);
    }
    if ui.json {
        json(&listings.iter().map(row).collect::<Vec<_>>());
        return Ok(exit::SUCCESS);
    }
    if listings.is_empty() {
        out(&format!("no archives in {}\n", env.settings.target.path.display()));
        return Ok(exit::SUCCESS);
    }
    let mut s = format!(
        "{:<21} {:<11} {:<7} {:>10} {:>6}  {:<10} {}\n",
        "CREATED (UTC)", "KIND", "TRIGGER", "SIZE", "FILES", "STATUS", "NAME"
    );
    for l in &listings {
        let r = row(l);
        let status = if r.complete { "ok".to_string() } else { "INCOMPLETE".to_string() };
        s += &format!(
            "{:<21} {:<11} {:<7} {:>10} {:>6}  {:<10} {}{}\n",
            r.created.unwrap_or_else(|| "?".into()).replace('T', " ").trim_end_matches('Z'),
            r.kind.unwrap_or("?"),
            r.trigger.unwrap_or("?"),
            r.size.map(human_bytes).unwrap_or_else(|| "?".into()),
            r.files.map(|f| f.to_string()).unwrap_or_else(|| "?".into()),
            status,
            l.name,
            l.problem.as_ref().map(|p| format!("  ({p})")).unwrap_or_default()
        );
    }
    out(&s);
    Ok(exit::SUCCESS)
}

pub fn verify(env: &Env, archive: Option<&str>, all: bool, deep: bool, ui: &Ui) -> Result<u8> {
    let results = ops::verify::run(env, archive, all, deep)?;
    let code = results.iter().map(|r| r.exit_code).max().unwrap_or(0);
    if ui.json {
        json(&results);
    } else {
        let mut s = String::new();
        for r in &results {
            s += &format!("{} {}: {}\n", if r.ok { "OK  " } else { "FAIL" }, r.archive, r.message);
        }
        let bad = results.iter().filter(|r| !r.ok).count();
        s += &format!(
            "{} archive(s) verified{}, {} failed\n",
            results.len(),
            if deep { " deeply (decrypted, every file hashed)" } else { " (checksums)" },
            bad
        );
        out(&s);
    }
    if code != 0 {
        let first = results.iter().find(|r| !r.ok).expect("a failure exists");
        eprintln!("datavault: error: archive {}: {}", first.archive, first.message);
    }
    Ok(code)
}

pub fn drill(env: &Env, archive: Option<&str>, trigger: &str, ui: &Ui) -> Result<u8> {
    let r = ops::drill::run(env, archive, trigger)?;
    if let Some(why) = &r.nothing_to_drill {
        if ui.json {
            json(&r);
        } else {
            out(&format!("{why}\n"));
        }
        return Ok(exit::SUCCESS);
    }
    if ui.json {
        json(&r);
    } else {
        let mut s = format!("drill of {}\n", r.archive);
        for c in &r.checks {
            s += &format!("  [{}] {}: {}\n", if c.ok { " ok " } else { "FAIL" }, c.name, c.detail);
        }
        s += &format!(
            "  recovery time: {:.1} s for {} files, {}\n",
            r.recovery_seconds,
            r.files,
            human_bytes(r.bytes)
        );
        s += if r.passed { "DRILL PASSED\n" } else { "DRILL FAILED\n" };
        out(&s);
    }
    if r.passed {
        Ok(exit::SUCCESS)
    } else {
        eprintln!("datavault: error: archive {}: DRILL FAILED; run `datavault verify --all --deep` and check the newest archives", r.archive);
        Ok(exit::INTEGRITY)
    }
}

pub fn restore(env: &Env, archive: Option<&str>, to: Option<&Path>, yes: bool, ui: &Ui) -> Result<u8> {
    let o = match to {
        Some(dir) => ops::restore::to_dir(env, archive, dir)?,
        None => {
            if !yes {
                confirm(env, archive)?;
            }
            ops::restore::in_place(env, archive)?
        }
    };
    if ui.json {
        json(&o);
        return Ok(exit::SUCCESS);
    }
    let mut s = format!(
        "restored {} ({} files, {}) in {:.1} s\n",
        o.archive,
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
            None => s += "  there was no live data to save first\n",
        }
    }
    out(&s);
    Ok(exit::SUCCESS)
}

/// In-place restore replaces live data: ask on a terminal, refuse elsewhere.
fn confirm(env: &Env, archive: Option<&str>) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::Usage(
            "restore in place replaces the live data: run it on a terminal to confirm, or pass --yes".into(),
        ));
    }
    let listings = ops::listings(env)?;
    let l = ops::select(&listings, archive, ops::Pick::NewestComplete)?;
    let created = l.created().map(format_time).unwrap_or_default();
    eprint!(
        "This replaces the live data ({}{}) with {} (created {created}).\n\
         The current data is saved first as a PRE-RESTORE archive. Type 'restore' to go on: ",
        env.settings.source.database.display(),
        env.settings.source.uploads.as_ref().map(|u| format!(", {}", u.display())).unwrap_or_default(),
        l.name,
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).map_err(|e| Error::Usage(format!("no answer: {e}")))?;
    if answer.trim() != "restore" {
        return Err(Error::Usage("restore cancelled; nothing was changed".into()));
    }
    Ok(())
}

pub fn prune(env: &Env, dry_run: bool, ui: &Ui) -> Result<u8> {
    let o = ops::prune::run(env, dry_run)?;
    if ui.json {
        json(&o);
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
    out(&s);
    Ok(exit::SUCCESS)
}

pub fn status(env: &Env, ui: &Ui) -> Result<u8> {
    let st = ops::status::run(env)?;
    if ui.json {
        json(&st);
        return Ok(exit::SUCCESS);
    }
    let mut s = format!("{}\n", if st.healthy { "status: OK" } else { "status: NEEDS ATTENTION" });
    s += &format!(
        "  last good backup: {}\n",
        st.last_successful_backup.map(format_time).unwrap_or_else(|| "never".into())
    );
    if let Some(r) = &st.last_backup {
        s += &format!("  last backup run:  {} {:?}\n", format_time(r.started_at), r.status);
    }
    s += &match &st.last_drill {
        Some(d) => format!(
            "  last drill:       {} {}\n",
            format_time(d.at),
            if d.passed { "PASSED" } else { "FAILED" }
        ),
        None => "  last drill:       never\n".into(),
    };
    s += &format!(
        "  target:           {} ({}{}, {} free of {})\n",
        st.target.path.display(),
        if st.target.is_mountpoint { "mounted" } else { "NOT mounted" },
        if st.target.luks.is_some() { ", LUKS" } else { "" },
        human_bytes(st.target.free_bytes),
        human_bytes(st.target.total_bytes)
    );
    s += &format!("  archives:         {} complete, {} incomplete\n", st.archives, st.incomplete_archives);
    if let Some(r) = &st.running {
        s += &format!("  running now:      {r}\n");
    }
    if !st.next_steps.is_empty() {
        s += "next steps:\n";
        for n in &st.next_steps {
            s += &format!("  - {n}\n");
        }
    }
    out(&s);
    Ok(exit::SUCCESS)
}

pub fn audit(env: &Env, limit: usize, ui: &Ui) -> Result<u8> {
    let c = Catalog::open(&env.settings.state.catalog_path())?;
    let runs = c.runs(limit)?;
    let events = c.events(limit)?;
    let archives = c.archives()?;
    if ui.json {
        json(&serde_json::json!({ "runs": runs, "events": events, "archives": archives }));
        return Ok(exit::SUCCESS);
    }
    let mut s = String::from("RUNS\n");
    for r in &runs {
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
    for e in &events {
        s += &format!(
            "  {} {:<20} {} {}\n",
            format_time(e.at),
            e.event.to_string(),
            e.archive.as_deref().unwrap_or("-"),
            e.detail
        );
    }
    s += "ARCHIVES\n";
    for a in &archives {
        s += &format!(
            "  {} {:<8} {:>10} {} {} expires {}\n",
            a.name,
            a.status.to_string(),
            human_bytes(a.size),
            a.user,
            &a.sha256[..a.sha256.len().min(16)],
            a.expires_at.map(format_time).unwrap_or_else(|| "-".into())
        );
    }
    out(&s);
    Ok(exit::SUCCESS)
}
