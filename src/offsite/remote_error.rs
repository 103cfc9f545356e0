//! What can go wrong talking to an S3 server, sorted into the classes an operator acts on.
//!
//! [`S3Backend`](super::s3::S3Backend) implements the storage-neutral
//! [`Backend`](crate::store::backend::Backend) trait, whose methods return `io::Error`. The
//! class travels inside that error as a [`RemoteError`] payload (like
//! [`DriveGone`](crate::store::backend::DriveGone) for the USB drive), so code written
//! against the trait still gets the right exit code through [`to_error`]:
//!
//! | class | exit | examples |
//! |---|---|---|
//! | [`RemoteClass::NotReady`] | 3 | unreachable, DNS, TLS, timeout, bucket missing, quota full, 5xx, clock skew |
//! | [`RemoteClass::Credentials`] | 2 | SignatureDoesNotMatch, InvalidAccessKeyId, AccessDenied |
//! | [`RemoteClass::Config`] | 2 | wrong region, bad endpoint URL |
//! | [`RemoteClass::Integrity`] | 4 | an object whose bytes or size are not what was recorded |
//!
//! Messages never carry a secret: server error bodies (which echo the string to sign and the
//! access key id) are reduced to their `<Code>` and `<Message>`.

use std::io;

use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteClass {
    /// Try again later, or fix the network/server: exit 3.
    NotReady,
    /// The credentials are wrong or lack a permission: exit 2.
    Credentials,
    /// A config value is wrong (region, endpoint): exit 2.
    Config,
    /// Remote bytes are not what they should be: exit 4.
    Integrity,
}

/// The payload carried inside an `io::Error` by the S3 backend.
#[derive(Debug)]
pub struct RemoteError {
    pub class: RemoteClass,
    /// One line naming the thing and the fix; no location prefix (added by [`to_error`]).
    pub message: String,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RemoteError {}

pub fn remote(class: RemoteClass, kind: io::ErrorKind, message: impl Into<String>) -> io::Error {
    io::Error::new(kind, RemoteError { class, message: message.into() })
}

/// The class of a backend error, if it came from a remote backend.
pub fn class_of(e: &io::Error) -> Option<RemoteClass> {
    e.get_ref().and_then(|r| r.downcast_ref::<RemoteError>()).map(|r| r.class)
}

/// Who to blame for a credentials error: the file, or the environment variables.
#[derive(Debug, Clone)]
pub struct Blame {
    /// `s3://bucket/prefix`
    pub location: String,
    /// The credentials file, or `AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (environment)`.
    pub credentials: std::path::PathBuf,
    /// The config file.
    pub config: std::path::PathBuf,
}

/// Turn a backend error into the datavault error (and so the exit code) it stands for.
/// `doing` says what was being done (`"uploading backup-....tar.zst.age"`).
pub fn to_error(e: io::Error, doing: &str, blame: &Blame) -> Error {
    let Some(class) = class_of(&e) else {
        return Error::io(format!("offsite {}: {doing}", blame.location), e);
    };
    let message = e.get_ref().map(|r| r.to_string()).unwrap_or_default();
    match class {
        RemoteClass::NotReady => Error::OffsiteNotReady {
            location: blame.location.clone(),
            message: format!("{doing}: {message}"),
        },
        RemoteClass::Credentials => {
            Error::key(&blame.credentials, format!("offsite {}: {doing}: {message}", blame.location))
        }
        RemoteClass::Config => {
            Error::config(&blame.config, format!("offsite {}: {doing}: {message}", blame.location))
        }
        RemoteClass::Integrity => Error::integrity(blame.location.clone(), format!("{doing}: {message}")),
    }
}

/// `<Code>` and `<Message>` of an S3 XML error body, never the rest of it (AWS echoes the
/// canonical request, the string to sign and the access key id in SignatureDoesNotMatch).
pub fn s3_code_and_message(body: &str) -> (Option<String>, Option<String>) {
    let tag = |name: &str| -> Option<String> {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&close)? + start;
        let text: String = body[start..end].chars().filter(|c| !c.is_control()).take(200).collect();
        Some(text.trim().to_string()).filter(|t| !t.is_empty())
    };
    (tag("Code"), tag("Message"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_code_and_message_are_taken_from_a_server_reply() {
        let body = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match</Message>\
                    <AWSAccessKeyId>AKIDEXAMPLE</AWSAccessKeyId><StringToSign>AWS4-HMAC-SHA256\n2026</StringToSign></Error>";
        let (c, m) = s3_code_and_message(body);
        assert_eq!(c.as_deref(), Some("SignatureDoesNotMatch"));
        assert!(m.unwrap().starts_with("The request signature"));
        assert_eq!(s3_code_and_message("not xml"), (None, None));
    }

    #[test]
    fn classes_map_to_exit_codes() {
        let blame =
            Blame { location: "s3://b/p".into(), credentials: "/etc/c".into(), config: "/etc/d.toml".into() };
        let cases = [
            (RemoteClass::NotReady, 3),
            (RemoteClass::Credentials, 2),
            (RemoteClass::Config, 2),
            (RemoteClass::Integrity, 4),
        ];
        for (class, code) in cases {
            let e = to_error(remote(class, io::ErrorKind::Other, "why; fix"), "listing", &blame);
            assert_eq!(e.exit_code(), code, "{e}");
            assert!(e.to_string().contains("s3://b/p") && e.to_string().contains("why; fix"), "{e}");
        }
        assert_eq!(to_error(io::Error::other("x"), "listing", &blame).exit_code(), 1);
    }
}
