//! `datavault demo`: the whole job on a built-in sample app, in a temporary folder, with no
//! Pi and no setup. It runs the same library code as the real commands. With `--json` it
//! prints one JSON document (every step's result) and nothing else on stdout.

use std::path::Path;
use std::sync::Arc;

use datavault::config::Settings;
use datavault::error::{exit, Error, Result};
use datavault::ops::{self, backup::BackupOptions, Env, Trigger};
use datavault::retention::ArchiveKind;
use datavault::target::human_bytes;

use crate::ui::{json, Ui};

pub fn run(keep: bool, ui: &Ui) -> Result<u8> {
    let tmp = tempfile::Builder::new()
        .prefix("datavault-demo-")
        .tempdir()
        .map_err(|e| Error::io("cannot create a temporary folder", e))?;
    let root = tmp.path().to_path_buf();
    // The temporary folder (with the demo's private key) is removed when `tmp` drops, on
    // every way out of here, a closed stdout included.
    let result = demo(&root, ui);
    if keep {
        let kept = tmp.keep();
        eprintln!("the demo folder is kept: {} (config: {}/datavault.toml)", kept.display(), kept.display());
    }
    result
}

fn step(ui: &Ui, n: u32, title: &str) -> Result<()> {
    ui.text(&format!("\n== {n}. {title}\n"))
}

fn demo(root: &Path, ui: &Ui) -> Result<u8> {
    ui.text(&format!("DataVault demo in {}\n", root.display()))?;
    step(ui, 1, "a sample app: a live SQLite database in WAL mode and an uploads folder")?;
    let app = datavault::demo::create_sample_app(&root.join("app"))?;
    let before = datavault::demo::fingerprint(&app.database, Some(&app.uploads))?;
    ui.text(&format!("  database {}\n  uploads  {}\n", app.database.display(), app.uploads.display()))?;

    step(
        ui,
        2,
        "a key pair and a config (the target is a plain folder here; on a Pi it is the LUKS USB drive)",
    )?;
    let config_path = write_config(root, &app)?;
    ui.text(&format!("  config     {}\n", config_path.display()))?;
    let env = Env::new(Settings::load(&config_path)?, ui.progress());
    let quiet_env = Env {
        progress: Arc::new(datavault::progress::NoProgress),
        ..Env::new(Settings::load(&config_path)?, ui.progress())
    };

    step(ui, 3, "datavault backup: snapshot -> tar -> zstd -> age -> SHA-256, onto the target")?;
    let opts =
        BackupOptions { kind: ArchiveKind::Backup, trigger: Trigger::Manual, comment: Some("demo".into()) };
    let b = ops::backup::run(&env, &opts)?;
    ui.text(&format!(
        "  {}\n  {} archive, {} files, {} of data, {} ms\n",
        b.archive.display(),
        human_bytes(b.manifest.archive_size),
        b.manifest.files,
        human_bytes(b.manifest.plain_bytes),
        b.manifest.duration_ms
    ))?;

    step(ui, 4, "datavault list")?;
    let (listings, _) = ops::list::run(&quiet_env)?;
    if !ui.json {
        crate::commands::list::run(&quiet_env, ui)?;
    }

    step(ui, 5, "datavault drill: decrypt into scratch, integrity_check, hash every file, SQL checks")?;
    let drill = ops::drill::run(&quiet_env, None, Trigger::Manual)?;
    for c in &drill.checks {
        ui.text(&format!("  [{}] {}: {}\n", if c.ok { " ok " } else { "FAIL" }, c.name, c.detail))?;
    }
    if !drill.passed {
        return Err(Error::integrity(&drill.archive, "DRILL FAILED in the demo"));
    }
    ui.text(&format!("  DRILL PASSED: recovery time {:.1} s\n", drill.recovery_seconds))?;

    step(ui, 6, "disaster: the database is deleted and an upload is lost")?;
    simulate_disaster(&app)?;
    ui.text("  app.db and cv-001.txt are gone\n")?;

    step(ui, 7, "datavault restore --yes: verify, stop, PRE-RESTORE safety copy, swap, start")?;
    let chosen = ops::restore::choose(&quiet_env, None)?;
    let restored =
        ops::restore::in_place(&quiet_env, Some(&chosen.name), ops::restore::SafetyCopy::Required)?;
    ui.text(&format!("  restored {} ({} files)\n", restored.archive, restored.files))?;

    step(ui, 8, "check: the restored data is exactly what was backed up")?;
    let after = datavault::demo::fingerprint(&app.database, Some(&app.uploads))?;
    let identical = after == before;
    if ui.json {
        json(&serde_json::json!({
            "folder": root,
            "backup": b,
            "archives": listings.iter().map(|l| &l.name).collect::<Vec<_>>(),
            "drill": drill,
            "restore": restored,
            "identical": identical,
        }))?;
    }
    if !identical {
        return Err(Error::Failed("demo: the restored data differs from the original".into()));
    }
    ui.text(&format!("  every row and every file is identical (fingerprint {})\n", &after[..16]))?;
    ui.text("\nDEMO OK: backup -> list -> drill -> restore all worked.\n")?;
    Ok(exit::SUCCESS)
}

/// What the demo restores from: the database (and its WAL) and one upload deleted.
fn simulate_disaster(app: &datavault::demo::SampleApp) -> Result<()> {
    std::fs::remove_file(&app.database).map_err(|e| Error::io("demo", e))?;
    let _ = std::fs::remove_file(app.database.with_extension("db-wal"));
    let _ = std::fs::remove_file(app.database.with_extension("db-shm"));
    std::fs::remove_file(app.uploads.join("candidates/2026/11/cv-001.txt")).map_err(|e| Error::io("demo", e))
}

/// A key pair and a config for the sample app, in the demo folder.
fn write_config(root: &Path, app: &datavault::demo::SampleApp) -> Result<std::path::PathBuf> {
    let identity = root.join("identity.txt");
    let recipient = datavault::keys::generate_identity_file(&identity)?;
    let target = root.join("usb");
    std::fs::create_dir_all(&target).map_err(|e| Error::io("cannot create the demo target", e))?;
    let config = format!(
        "[source]\ndatabase = {:?}\nuploads = {:?}\n\n[target]\npath = {:?}\nrequire_mountpoint = false\nrequire_luks = false\n\n\
         [encryption]\nrecipients = [{:?}]\nidentity = {:?}\n\n[service]\nstop_command = \"echo '  (demo app stopped)' >&2\"\n\
         start_command = \"echo '  (demo app started)' >&2\"\n\n[drill]\nchecks = [\"SELECT count(*) = 300 FROM users\", \"SELECT count(*) > 0 FROM documents\"]\n\n\
         [state]\ndir = {:?}\n",
        app.database.display().to_string(),
        app.uploads.display().to_string(),
        target.display().to_string(),
        recipient,
        identity.display().to_string(),
        root.join("state").display().to_string(),
    );
    let config_path = root.join("datavault.toml");
    std::fs::write(&config_path, &config).map_err(|e| Error::io("cannot write the demo config", e))?;
    Ok(config_path)
}
