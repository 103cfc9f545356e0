//! age keys: recipients (public, on the Pi) and identities (private, needed only to read
//! archives back).
//!
//! The Pi needs no secret to back up. The identity file is checked before use: it must be
//! owned by the user running datavault and readable by nobody else, because whoever reads it
//! can read every archive on the USB drive.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use age::secrecy::ExposeSecret;

use crate::error::{Error, Result};

pub type Identities = Vec<Box<dyn age::Identity + Send + Sync>>;

/// A new x25519 identity, written to `path` (mode 0600, refusing to overwrite).
/// Returns the public recipient (age1...).
pub fn generate_identity_file(path: &Path) -> Result<String> {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let text = format!(
        "# created: {created}\n# public key: {recipient}\n# DataVault identity: keep a copy OFF the Pi; without it no archive can be restored.\n{}\n",
        identity.to_string().expose_secret()
    );
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            fs::create_dir_all(parent)
                .map_err(|e| Error::key(path, format!("cannot create its folder: {e}")))?;
        }
    }
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::key(path, "already exists; refusing to overwrite a key (choose another --output)")
        } else {
            Error::key(path, format!("cannot create it: {e}"))
        }
    })?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::key(path, format!("cannot write it: {e}")))?;
    if let Some(parent) = path.parent() {
        let _ = crate::fsutil::fsync_dir(parent);
    }
    Ok(recipient)
}

/// Load the identities from an identity file after checking who may read it.
pub fn load_identities(path: Option<&Path>) -> Result<Identities> {
    let Some(path) = path else {
        return Err(Error::Config {
            path: "encryption.identity".into(),
            message: "is not set; restore, drill and verify --deep need the private key: set encryption.identity to the identity file".into(),
        });
    };
    let meta = fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::key(path, "identity file not found; copy your DataVault private key there (mode 0600) or fix encryption.identity")
        } else {
            Error::key(path, format!("cannot read it: {e}"))
        }
    })?;
    if !meta.is_file() {
        return Err(Error::key(
            path,
            "is not a regular file; copy your DataVault private key there (mode 0600)",
        ));
    }
    check_identity_permissions(path, &meta)?;
    // Opened non-blocking and checked again: a FIFO swapped in meanwhile cannot hang us.
    let bytes = crate::fsutil::read_regular(path, 1 << 20)
        .map_err(|e| Error::key(path, format!("cannot read it: {e}")))?;
    let file = age::IdentityFile::from_buffer(std::io::BufReader::new(&bytes[..])).map_err(|e| {
        Error::key(
            path,
            format!("not a valid age identity file ({e}); it should contain a line AGE-SECRET-KEY-1..."),
        )
    })?;
    let ids = file
        .into_identities()
        .map_err(|e| Error::key(path, format!("cannot use the identities in it: {e}")))?;
    if ids.is_empty() {
        return Err(Error::key(path, "contains no identity; it should contain a line AGE-SECRET-KEY-1..."));
    }
    Ok(ids)
}

fn check_identity_permissions(path: &Path, meta: &fs::Metadata) -> Result<()> {
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::key(
            path,
            format!("is readable by others (mode {mode:04o}); anyone who reads it can read every archive: run `chmod 600 {}`", path.display()),
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(Error::key(
            path,
            format!(
                "is owned by uid {} but datavault runs as uid {me}; run `chown {me} {}`",
                meta.uid(),
                path.display()
            ),
        ));
    }
    Ok(())
}

/// The recipients that can open an identity file, for `doctor`-style cross-checks.
pub fn recipient_of_identity_line(line: &str) -> Option<String> {
    use std::str::FromStr;
    age::x25519::Identity::from_str(line.trim()).ok().map(|i| i.to_public().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_identity_is_private_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.txt");
        let recipient = generate_identity_file(&path).unwrap();
        assert!(recipient.starts_with("age1"));
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_identities(Some(&path)).unwrap().len(), 1);
        let secret_line = fs::read_to_string(&path).unwrap().lines().last().unwrap().to_string();
        assert_eq!(recipient_of_identity_line(&secret_line).unwrap(), recipient);
        // Never overwritten.
        assert!(generate_identity_file(&path).unwrap_err().to_string().contains("already exists"));
    }

    #[test]
    fn world_readable_identity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.txt");
        generate_identity_file(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_identities(Some(&path)).err().expect("must refuse");
        assert_eq!(e.exit_code(), crate::error::exit::USAGE);
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn missing_and_garbage_identities_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.txt");
        assert!(load_identities(Some(&missing)).err().unwrap().to_string().contains("not found"));
        let garbage = dir.path().join("garbage.txt");
        fs::write(&garbage, "hello\n").unwrap();
        fs::set_permissions(&garbage, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_identities(Some(&garbage)).err().unwrap().to_string().contains("AGE-SECRET-KEY"));
    }
}
