//! The S3 credential: an access key id and a secret, from a TOML file guarded like the age
//! identity (mode 0600, owned by the user running datavault) or from the standard
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` environment variables.
//!
//! The secret never reaches a log, a message, the catalog or the metrics: [`Secret`] has no
//! `Display` and a redacting `Debug`, and parse errors are reported without the line's text.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::OffsiteSettings;
use crate::error::{Error, Result};

/// What `offsite.credentials` blames when the environment supplied the key.
pub const ENV_SOURCE: &str = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (environment)";

/// A string that must not be printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone)]
pub struct OffsiteCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    /// The file it came from, or [`ENV_SOURCE`]: what messages tell the operator to fix.
    pub source: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    access_key_id: String,
    secret_access_key: String,
}

/// The configured file if `offsite.credentials` is set, else the environment.
pub fn load(settings: &OffsiteSettings) -> Result<OffsiteCredentials> {
    match &settings.credentials {
        Some(path) => load_file(path),
        None => from_env().ok_or_else(|| Error::Config {
            path: "offsite.credentials".into(),
            message: "is not set and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are not in the environment; \
                      write /etc/datavault/offsite.credentials (mode 0600, see docs/offsite.md) and set offsite.credentials to it"
                .into(),
        }),
    }
}

fn from_env() -> Option<OffsiteCredentials> {
    let id = std::env::var("AWS_ACCESS_KEY_ID").ok().filter(|v| !v.trim().is_empty())?;
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").ok().filter(|v| !v.trim().is_empty())?;
    Some(OffsiteCredentials {
        access_key_id: id.trim().to_string(),
        secret_access_key: Secret(secret.trim().to_string()),
        source: PathBuf::from(ENV_SOURCE),
    })
}

pub fn load_file(path: &Path) -> Result<OffsiteCredentials> {
    let meta = fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::key(path, "offsite credentials file not found; create it (mode 0600) with access_key_id and secret_access_key, see docs/offsite.md")
        } else {
            Error::key(path, format!("cannot read it: {e}"))
        }
    })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::key(
            path,
            format!("is readable by others (mode {mode:04o}); whoever reads it can write to the offsite bucket: run `chmod 600 {}`", path.display()),
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
    let text = fs::read_to_string(path).map_err(|e| Error::key(path, format!("cannot read it: {e}")))?;
    let raw: RawCredentials = toml::from_str(&text).map_err(|e| {
        // toml's Display quotes the offending line, which may be the secret: only the line
        // number and the message (with any quoted value blanked) are shown.
        let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let msg = blank_quoted(e.message());
        Error::key(
            path,
            format!(
                "{}{msg}; it must hold exactly access_key_id = \"...\" and secret_access_key = \"...\"",
                line.map(|l| format!("line {l}: ")).unwrap_or_default()
            ),
        )
    })?;
    if raw.access_key_id.trim().is_empty() || raw.secret_access_key.trim().is_empty() {
        return Err(Error::key(path, "access_key_id or secret_access_key is empty"));
    }
    Ok(OffsiteCredentials {
        access_key_id: raw.access_key_id.trim().to_string(),
        secret_access_key: Secret(raw.secret_access_key.trim().to_string()),
        source: path.to_path_buf(),
    })
}

fn blank_quoted(msg: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in msg.chars() {
        if c == '`' {
            inside = !inside;
            out.push_str(if inside { "`..." } else { "`" });
        } else if !inside {
            out.push(c);
        }
    }
    out.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join("offsite.credentials");
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_private_file_loads_and_debug_hides_the_secret() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "access_key_id = \"AK\"\nsecret_access_key = \"s3cr3t-value\"\n", 0o600);
        let c = load_file(&p).unwrap();
        assert_eq!((c.access_key_id.as_str(), c.secret_access_key.expose()), ("AK", "s3cr3t-value"));
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_readable_file_is_refused_and_errors_never_quote_the_secret() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "access_key_id = \"AK\"\nsecret_access_key = \"s3cr3t-value\"\n", 0o644);
        let e = load_file(&p).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("chmod 600"), "{e}");
        for bad in [
            "access_key_id = \"AK\"\nsecret_access_key = s3cr3t-value\n",
            "access_key_id = \"AK\"\nsecret_access_key = \"s3cr3t-value\"\nsecret_access_key = \"s3cr3t-value\"\n",
            "access_key_id = \"AK\"\nsecret = \"s3cr3t-value\"\n",
            "access_key_id = \"AK\"\nsecret_access_key = \"s3cr3t-value\" junk\n",
        ] {
            let p = write(d.path(), bad, 0o600);
            let m = load_file(&p).unwrap_err().to_string();
            assert!(!m.contains("s3cr3t"), "{m}");
            assert!(m.contains("access_key_id"), "{m}");
        }
        assert!(load_file(&d.path().join("nope")).unwrap_err().to_string().contains("not found"));
    }
}
