//! `datavault demo`: the whole job on a built-in sample app, in a temporary folder, with no
//! Pi and no setup. It runs the same library code as the real commands.

use std::path::Path;
use std::sync::Arc;

use datavault::config::Settings;
use datavault::error::{exit, Error, Result};
use datavault::ops::{self, backup::BackupOptions, Env};
use datavault::retention::ArchiveKind;
use datavault::target::human_bytes;

use crate::cli::Ui;
use crate::commands::out;

pub fn demo(keep: bool, ui: &Ui) -> Result<u8> {
    let tmp = tempfile::Builder::new()
        .prefix("datavault-demo-")
        .tempdir()
        .map_err(|e| Error::io("cannot create a temporary folder", e))?;
    let root = tmp.path().to_path_buf();
    let result = run_demo(&root, ui);
    if keep {
        let kept = tmp.keep();
        out(&format!(
            "\nthe demo folder is kept: {} (config: {}/datavault.toml)\n",
            kept.display(),
            kept.display()
        ));
    }
    result
}

fn step(n: u32, title: &str) {
    out(&format!("\n== {n}. {title}\n"));
}

fn run_demo(root: &Path, ui: &Ui) -> Result<u8> {
    out(&format!("DataVault demo in {}\n", root.display()));
    step(1, "a sample app: a live SQLite database in WAL mode and an uploads folder");
    let app = datavault::demo::create_sample_app(&root.join("app"))?;
    let before = datavault::demo::fingerprint(&app.database, Some(&app.uploads))?;
    out(&format!("  database {}\n  uploads  {}\n", app.database.display(), app.uploads.display()));

    step(2, "a key pair and a config (the target is a plain folder here; on a Pi it is the LUKS USB drive)");
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
    out(&format!("  public key {recipient}\n  config     {}\n", config_path.display()));
    let env = Env::new(Settings::load(&config_path)?, crate::cli::progress(ui));
    let quiet_env = Env {
        progress: Arc::new(datavault::progress::NoProgress),
        ..Env::new(Settings::load(&config_path)?, crate::cli::progress(ui))
    };

    step(3, "datavault backup: snapshot -> tar -> zstd -> age -> SHA-256, onto the target");
    let b = ops::backup::run(
        &env,
        &BackupOptions { kind: ArchiveKind::Backup, trigger: "manual".into(), comment: Some("demo".into()) },
    )?;
    out(&format!(
        "  {}\n  {} archive, {} files, {} of data, {} ms\n",
        b.archive.display(),
        human_bytes(b.manifest.archive_size),
        b.manifest.files,
        human_bytes(b.manifest.plain_bytes),
        b.manifest.duration_ms
    ));

    step(4, "datavault list");
    crate::commands::list(&quiet_env, ui)?;

    step(5, "datavault drill: decrypt into scratch, integrity_check, hash every file, SQL checks");
    let code = crate::commands::drill(&quiet_env, None, "manual", ui)?;
    if code != exit::SUCCESS {
        return Ok(code);
    }

    step(6, "disaster: the database is deleted and an upload is lost");
    std::fs::remove_file(&app.database).map_err(|e| Error::io("demo", e))?;
    let _ = std::fs::remove_file(app.database.with_extension("db-wal"));
    let _ = std::fs::remove_file(app.database.with_extension("db-shm"));
    std::fs::remove_file(app.uploads.join("candidates/2026/11/cv-001.txt"))
        .map_err(|e| Error::io("demo", e))?;
    out("  app.db and cv-001.txt are gone\n");

    step(7, "datavault restore --yes: verify, PRE-RESTORE safety copy, stop, swap, start");
    crate::commands::restore(&quiet_env, None, None, true, ui)?;

    step(8, "check: the restored data is exactly what was backed up");
    let after = datavault::demo::fingerprint(&app.database, Some(&app.uploads))?;
    if after != before {
        return Err(Error::Failed("demo: the restored data differs from the original".into()));
    }
    out(&format!("  every row and every file is identical (fingerprint {})\n", &after[..16]));
    out("\nDEMO OK: backup -> list -> drill -> restore all worked.\n");
    Ok(exit::SUCCESS)
}
