//! `init` and `keygen`.

use std::path::Path;

use datavault::config::TEMPLATE;
use datavault::error::{exit, Error, Result};
use datavault::fsutil::write_atomic;

use crate::ui::{json, out, Ui};

pub fn keygen(output: &Path, ui: &Ui) -> Result<u8> {
    let recipient = datavault::keys::generate_identity_file(output)?;
    if ui.json {
        json(&serde_json::json!({ "identity": output, "recipient": recipient }))?;
    } else {
        out(&format!(
            "{recipient}\n\nIdentity (private key) written to {} (mode 0600).\n\
             Put the line above in encryption.recipients. Keep a copy of the identity OFF the Pi:\n\
             without it no archive can ever be restored.\n",
            output.display()
        ))?;
    }
    Ok(exit::SUCCESS)
}

pub fn init(config: &Path, keygen: bool, ui: &Ui) -> Result<u8> {
    if config.exists() {
        return Err(Error::config(
            config,
            "already exists; refusing to overwrite it (edit it, or pass --config NEW_PATH)",
        ));
    }
    let dir = config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::config(config, format!("cannot create its folder: {e}")))?;
    // The config only takes absolute paths: the identity beside it is named by its real path.
    let dir = &std::fs::canonicalize(dir)
        .map_err(|e| Error::config(config, format!("cannot resolve its folder: {e}")))?;
    let mut text = TEMPLATE.to_string();
    let mut recipient = None;
    if keygen {
        let identity = dir.join("identity.txt");
        let r = datavault::keys::generate_identity_file(&identity)?;
        text = text.replace("age1-replace-with-your-public-key", &r).replace(
            "identity = \"/etc/datavault/identity.txt\"",
            &format!("identity = {:?}", identity.display().to_string()),
        );
        recipient = Some((r, identity));
    }
    // 0600: the config may come to hold secrets (notification URLs and tokens, [notify]).
    write_atomic(config, text.as_bytes(), 0o600)?;
    if ui.json {
        json(&serde_json::json!({
            "config": config,
            "recipient": recipient.as_ref().map(|r| &r.0),
            "identity": recipient.as_ref().map(|r| &r.1),
        }))?;
        return Ok(exit::SUCCESS);
    }
    out(&format!("Config template written to {}.\n", config.display()))?;
    match recipient {
        Some((r, id)) => out(&format!(
            "New key pair: public key {r} is in the config; the private key is {} (mode 0600).\n\
             Copy that identity file somewhere safe OFF the Pi now: without it no archive can be restored.\n",
            id.display()
        )),
        None => out("Next: `datavault keygen --output /etc/datavault/identity.txt` and put the printed age1... key in encryption.recipients.\n"),
    }?;
    out("Then edit source.database, source.uploads, target.path and the service commands, and run `datavault status`.\n")?;
    Ok(exit::SUCCESS)
}
