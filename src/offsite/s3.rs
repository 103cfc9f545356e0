//! [`S3Backend`]: the [`Backend`] trait over an S3-compatible bucket (AWS S3, Backblaze B2,
//! Wasabi, Cloudflare R2, Garage, SeaweedFS, Ceph RGW, MinIO, `rclone serve s3`), through the
//! blocking `rust-s3` client (attohttpc + rustls; no async runtime).
//!
//! What the store needs, and how each is done here:
//! - **Streaming reads** of whole archives ([`Backend::open`]): ranged GETs of one part size
//!   at a time, so memory stays at one chunk and a slow link never hits the per-request
//!   timeout (one GET of a 400 MB archive would).
//! - **Range reads** of snapshot packs ([`Backend::read_range`]): one ranged GET, length
//!   checked.
//! - **Create-then-commit** ([`Backend::create`]): bytes are buffered up to one part; a file
//!   smaller than a part is one PUT at commit, a larger one a multipart upload with
//!   `parts_in_flight` parts sent by worker threads while the next part fills. Nothing is
//!   visible before `commit` (S3 makes an object visible only when its PUT or
//!   CompleteMultipartUpload succeeds); a writer dropped uncommitted aborts its upload.
//! - **Never overwrite.** An object is immutable once written: a single PUT carries
//!   `If-None-Match: *` (the server refuses to replace an existing key: AWS, R2, MinIO,
//!   Garage), and a multipart upload checks with HEAD before it starts and before it
//!   completes. A put-only credential (no DeleteObject) is therefore enough to push.
//! - A multipart part carries Content-MD5 and the payload's SHA-256 in its signature (rust-s3's
//!   way); a single PUT goes through a presigned URL with an unsigned payload, which spares
//!   three hashing passes per object ([`put_once`] says why that loses no integrity).
//!
//! Memory: `2 * part_size` for uploads with one part in flight (the default: the part and
//! rust-s3's copy of it while it is sent, on the calling thread); with more, about
//! `part_size * (2 * parts_in_flight + 1)` plus the allocator's per-thread arenas. One part
//! size for reads.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use s3::creds::Credentials;
use s3::error::S3Error;
use s3::serde_types::Part;
use s3::{Bucket, Region};

use super::credentials::OffsiteCredentials;
use super::remote_error::{remote, s3_code_and_message, RemoteClass};
use crate::config::OffsiteSettings;
use crate::store::backend::{check_path, Backend, NewObject, ObjectInfo};

const CONTENT_TYPE: &str = "application/octet-stream";

/// An S3 bucket and prefix seen as a backup store.
#[derive(Clone)]
pub struct S3Backend {
    inner: Arc<Inner>,
}

struct Inner {
    bucket: Box<Bucket>,
    /// `""` or `"some/prefix/"`.
    prefix: String,
    location: String,
    endpoint: String,
    region: String,
    timeout: Duration,
    part_size: usize,
    parts_in_flight: usize,
    limiter: Option<RateLimiter>,
    /// Where each multipart upload's id is noted when it starts (`offsite-uploads` in the
    /// state folder), so the next push can abort what a killed one left even on servers
    /// whose ListMultipartUploads is missing or broken (rclone's reply lacks IsTruncated).
    journal: Option<std::path::PathBuf>,
    /// Cleared when the server answers a conditional PUT with 501 NotImplemented (older
    /// Ceph, SeaweedFS): we then rely on the check before writing alone.
    conditional_put: AtomicBool,
}

/// An in-progress multipart upload found on the server.
#[derive(Debug, Clone)]
pub struct PendingUpload {
    /// Path relative to the store (prefix removed).
    pub path: String,
    pub upload_id: String,
    pub initiated: String,
}

impl S3Backend {
    pub fn new(settings: &OffsiteSettings, creds: &OffsiteCredentials) -> io::Result<S3Backend> {
        let region = Region::Custom { region: settings.region.clone(), endpoint: settings.endpoint.clone() };
        let credentials = Credentials::new(
            Some(&creds.access_key_id),
            Some(creds.secret_access_key.expose()),
            None,
            None,
            None,
        )
        .map_err(|e| io::Error::other(format!("cannot use the credentials: {e}")))?;
        let mut bucket = Bucket::new(&settings.bucket, region, credentials).map_err(|e| {
            remote(
                RemoteClass::Config,
                io::ErrorKind::InvalidInput,
                format!("cannot set up bucket {}: {e}", settings.bucket),
            )
        })?;
        if settings.path_style {
            bucket.set_path_style();
        }
        bucket.set_request_timeout(Some(settings.timeout));
        // Our own loop decides what is worth retrying (a whole push resumes anyway); the
        // library's one retry with a 1 s pause only for idempotent requests stays.
        s3::set_retries(1);
        let prefix = if settings.prefix.is_empty() { String::new() } else { format!("{}/", settings.prefix) };
        Ok(S3Backend {
            inner: Arc::new(Inner {
                bucket,
                prefix,
                location: format!("s3://{}/{}", settings.bucket, settings.prefix)
                    .trim_end_matches('/')
                    .to_string(),
                endpoint: settings.endpoint.clone(),
                region: settings.region.clone(),
                timeout: settings.timeout,
                part_size: settings.part_size,
                parts_in_flight: settings.parts_in_flight.max(1),
                limiter: settings.max_rate.map(RateLimiter::new),
                journal: None,
                conditional_put: AtomicBool::new(true),
            }),
        })
    }

    /// Note every multipart upload this backend starts in `path` (see [`Self::journaled_uploads`]).
    pub fn with_upload_journal(mut self, path: std::path::PathBuf) -> S3Backend {
        if let Some(i) = Arc::get_mut(&mut self.inner) {
            i.journal = Some(path);
        }
        self
    }

    /// Multipart uploads started by earlier runs of this backend (noted in the journal),
    /// finished or not: aborting a finished one is a harmless "no such upload".
    pub fn journaled_uploads(&self) -> Vec<PendingUpload> {
        let Some(j) = &self.inner.journal else { return Vec::new() };
        let text = std::fs::read_to_string(j).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let (key, id, at) = (f.next()?, f.next()?, f.next().unwrap_or(""));
                let path = key.strip_prefix(&self.inner.prefix)?.to_string();
                check_path(&path).ok()?;
                Some(PendingUpload { path, upload_id: id.to_string(), initiated: at.to_string() })
            })
            .collect()
    }

    /// Forget the journal (after its uploads were aborted).
    pub fn clear_upload_journal(&self) {
        if let Some(j) = &self.inner.journal {
            let _ = std::fs::remove_file(j);
        }
    }

    /// One cheap request that proves the endpoint, the bucket, the credentials and the clock
    /// (a listing of at most one key). Its errors are the clearest a push can give.
    pub fn check(&self) -> io::Result<()> {
        let i = &self.inner;
        i.bucket
            .list_page(i.prefix.clone(), Some("/".into()), None, None, Some(1))
            .map(|_| ())
            .map_err(|e| i.classify(e, "listing", ""))
    }

    /// Multipart uploads left unfinished under our prefix (a push killed mid-file).
    pub fn pending_uploads(&self) -> io::Result<Vec<PendingUpload>> {
        let i = &self.inner;
        let pages = i
            .bucket
            .list_multiparts_uploads(Some(&i.prefix), None)
            .map_err(|e| i.classify(e, "listing unfinished uploads", ""))?;
        Ok(pages
            .into_iter()
            .flat_map(|p| p.uploads)
            .filter_map(|u| {
                let path = u.key.strip_prefix(&i.prefix)?.to_string();
                Some(PendingUpload { path, upload_id: u.id, initiated: u.initiated })
            })
            .collect())
    }

    /// Abort an unfinished multipart upload, freeing its parts on the server. `false`: there
    /// was no such upload (finished, or already gone).
    pub fn abort_upload(&self, upload: &PendingUpload) -> io::Result<bool> {
        let i = &self.inner;
        let key = i.key(&upload.path)?;
        match i.bucket.abort_upload(&key, &upload.upload_id) {
            Ok(()) => Ok(true),
            Err(S3Error::HttpFailWithBody(404, _)) => Ok(false),
            Err(e) => Err(i.classify(e, "aborting an unfinished upload of", &upload.path)),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }
}

impl Inner {
    fn key(&self, path: &str) -> io::Result<String> {
        check_path(path)?;
        Ok(format!("{}{path}", self.prefix))
    }

    /// One line that names the thing and the fix, inside an io::Error of the right class.
    fn classify(&self, e: S3Error, doing: &str, path: &str) -> io::Error {
        use io::ErrorKind as K;
        use RemoteClass as C;
        let what = if path.is_empty() { doing.to_string() } else { format!("{doing} {path}") };
        let ep = &self.endpoint;
        match e {
            S3Error::HttpFailWithBody(status, body) => {
                let (code, msg) = s3_code_and_message(&body);
                let code = code.unwrap_or_default();
                let detail = msg.map(|m| format!(": {m}")).unwrap_or_default();
                let (class, kind, text) = match (status, code.as_str()) {
                    (404, "NoSuchKey") | (404, "") if !path.is_empty() => {
                        return io::Error::new(K::NotFound, format!("{what}: no such object"))
                    }
                    (_, "NoSuchBucket") | (404, _) => (
                        C::NotReady,
                        K::NotFound,
                        format!("{what}: the bucket does not exist at {ep} (NoSuchBucket): create it, or fix offsite.url"),
                    ),
                    (_, "RequestTimeTooSkewed") => (
                        C::NotReady,
                        K::Other,
                        format!(
                            "{what}: the server says this machine's clock is wrong (RequestTimeTooSkewed; it reads {}): a Pi without a real-time clock must have NTP synced first (`timedatectl` shows 'System clock synchronized: yes'); the offsite timer retries",
                            crate::manifest::format_time(chrono::Utc::now())
                        ),
                    ),
                    (_, "SignatureDoesNotMatch") => (
                        C::Credentials,
                        K::PermissionDenied,
                        format!("{what}: the server rejected the request signature (SignatureDoesNotMatch): the secret_access_key is wrong for this access_key_id (or offsite.region {:?} is not the bucket's)", self.region),
                    ),
                    (_, "InvalidAccessKeyId") => (
                        C::Credentials,
                        K::PermissionDenied,
                        format!("{what}: the server does not know this access_key_id (InvalidAccessKeyId): fix the credentials"),
                    ),
                    (_, "AuthorizationHeaderMalformed") | (_, "IllegalLocationConstraintException") | (301, _) => (
                        C::Config,
                        K::InvalidInput,
                        format!("{what}: the server refused region {:?} or the addressing style ({code}{detail}): fix offsite.region or offsite.path_style", self.region),
                    ),
                    (_, "AccessDenied") | (403, _) => (
                        C::Credentials,
                        K::PermissionDenied,
                        format!("{what}: access denied (HTTP {status} {code}{detail}): the credential lacks this permission (a put-only credential cannot delete: prune runs elsewhere), or the key or the clock is wrong"),
                    ),
                    (412, _) | (_, "PreconditionFailed") => {
                        return io::Error::new(K::AlreadyExists, format!("{what}: the object already exists; objects are never overwritten"))
                    }
                    (416, _) | (_, "InvalidRange") => {
                        return io::Error::new(K::UnexpectedEof, format!("{what}: the range is beyond the object's end"))
                    }
                    (_, c) if c.contains("Quota") || c.contains("quota") || c.contains("Cap") || status == 507 => (
                        C::NotReady,
                        K::QuotaExceeded,
                        format!("{what}: the bucket is full (HTTP {status} {code}{detail}): prune the remote (`datavault offsite prune` elsewhere) or raise its quota"),
                    ),
                    (_, "EntityTooLarge") => (
                        C::NotReady,
                        K::QuotaExceeded,
                        format!("{what}: the server refused the size (EntityTooLarge{detail}): raise offsite.part_size_mib or the server's limit"),
                    ),
                    (s, _) if s >= 500 || code == "SlowDown" => (
                        C::NotReady,
                        K::Other,
                        format!("{what}: the server failed (HTTP {s} {code}{detail}); try again later (the offsite timer retries)"),
                    ),
                    (s, _) => (C::NotReady, K::Other, format!("{what}: HTTP {s} {code}{detail} from {ep}")),
                };
                remote(class, kind, text)
            }
            S3Error::Atto(e) => self.transport(&what, e.kind()),
            S3Error::Io(e) => self.io_transport(&what, &e),
            other => remote(C::NotReady, K::Other, format!("{what}: {other} (from {ep})")),
        }
    }

    fn transport(&self, what: &str, kind: &attohttpc::ErrorKind) -> io::Error {
        use attohttpc::ErrorKind as A;
        let ep = &self.endpoint;
        match kind {
            A::Io(e) => self.io_transport(what, e),
            A::Tls(e) => remote(
                RemoteClass::NotReady,
                io::ErrorKind::Other,
                format!("{what}: TLS with {ep} failed ({e}): check offsite.endpoint, that the server's certificate is valid (a private CA goes in /etc/ssl/certs) and the clock (a Pi without RTC needs NTP synced first)"),
            ),
            A::InvalidDNSName(n) => remote(
                RemoteClass::Config,
                io::ErrorKind::InvalidInput,
                format!("{what}: {n:?} is not a valid host name for TLS: fix offsite.endpoint"),
            ),
            A::InvalidBaseUrl | A::InvalidUrlHost | A::InvalidUrlPort => remote(
                RemoteClass::Config,
                io::ErrorKind::InvalidInput,
                format!("{what}: {ep} is not a usable URL: fix offsite.endpoint"),
            ),
            other => remote(RemoteClass::NotReady, io::ErrorKind::Other, format!("{what}: talking to {ep}: {other:?}")),
        }
    }

    fn io_transport(&self, what: &str, e: &io::Error) -> io::Error {
        use io::ErrorKind as K;
        let ep = &self.endpoint;
        let text = e.to_string();
        let (kind, msg) = match e.kind() {
            K::ConnectionRefused => (K::ConnectionRefused, format!("cannot connect to {ep} (connection refused): is the server up? check offsite.endpoint")),
            K::TimedOut | K::WouldBlock => (
                K::TimedOut,
                format!("no answer from {ep} within {} s (timeout: the connection stalled or the link is too slow); check the network, or raise offsite.timeout_secs", self.timeout.as_secs()),
            ),
            K::NetworkUnreachable | K::HostUnreachable | K::AddrNotAvailable => {
                (e.kind(), format!("cannot reach {ep} ({text}): check the network"))
            }
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                (e.kind(), format!("the connection to {ep} dropped ({text}); the next push resumes"))
            }
            _ if ep.starts_with("https://")
                && ["certificate", "corrupt message", "handshake", "alert", "tls", "TLS"].iter().any(|w| text.contains(w)) =>
            {
                (
                    K::InvalidData,
                    format!("TLS with {ep} failed ({text}): check offsite.endpoint (is it really https?), that the server's certificate is valid (a private CA goes in /etc/ssl/certs) and the clock (a Pi without RTC needs NTP synced first)"),
                )
            }
            _ if text.contains("lookup") || text.contains("resolve") || text.contains("Name or service") => (
                K::NotFound,
                format!("cannot resolve the host of {ep} (DNS: {text}): check offsite.endpoint and the network's DNS"),
            ),
            _ => (e.kind(), format!("talking to {ep}: {text}")),
        };
        remote(RemoteClass::NotReady, kind, format!("{what}: {msg}"))
    }

    fn range(&self, key: &str, path: &str, offset: u64, len: u64) -> io::Result<(Vec<u8>, Option<u64>)> {
        let r = self
            .bucket
            .get_object_range(key, offset, Some(offset.saturating_add(len.max(1) - 1)))
            .map_err(|e| self.classify(e, "reading", path))?;
        // `Content-Range: bytes a-b/TOTAL` says how big the object is now.
        let total = r
            .headers()
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-range"))
            .and_then(|(_, v)| v.rsplit('/').next()?.trim().parse::<u64>().ok());
        // The body as received, not a copy of it (a 5 MiB chunk twice is RSS for nothing).
        Ok((Vec::from(r.into_bytes()), total))
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.inner.location.clone()
    }

    fn list(&self, dir: &str) -> io::Result<Vec<ObjectInfo>> {
        let i = &self.inner;
        let prefix = if dir.is_empty() {
            i.prefix.clone()
        } else {
            check_path(dir)?;
            format!("{}{dir}/", i.prefix)
        };
        let pages =
            i.bucket.list(prefix.clone(), Some("/".into())).map_err(|e| i.classify(e, "listing", dir))?;
        Ok(pages
            .into_iter()
            .flat_map(|p| p.contents)
            .filter_map(|o| {
                let name = o.key.strip_prefix(&prefix)?;
                // Folder markers ("dir/") and anything we would not have written are ignored.
                (!name.is_empty() && !name.contains('/') && check_path(name).is_ok())
                    .then(|| ObjectInfo { name: name.to_string(), size: o.size })
            })
            .collect())
    }

    fn size(&self, path: &str) -> io::Result<Option<u64>> {
        let i = &self.inner;
        let key = i.key(path)?;
        match i.bucket.head_object(&key) {
            Ok((head, 200)) => Ok(Some(head.content_length.unwrap_or(0).max(0) as u64)),
            Ok((_, 404)) | Err(S3Error::HttpFailWithBody(404, _)) => Ok(None),
            Ok((_, status)) => {
                Err(i.classify(S3Error::HttpFailWithBody(status, String::new()), "checking", path))
            }
            Err(e) => Err(i.classify(e, "checking", path)),
        }
    }

    fn read_small(&self, path: &str, max: u64) -> io::Result<Vec<u8>> {
        let i = &self.inner;
        let key = i.key(path)?;
        // One ranged GET of max + 1 bytes: a hostile huge object is never downloaded whole.
        match i.range(&key, path, 0, max.saturating_add(1)) {
            Ok((bytes, _)) if bytes.len() as u64 > max => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{path} in {} is more than the {max} bytes allowed", i.location),
            )),
            Ok((bytes, _)) => Ok(bytes),
            // A range of an empty object is "not satisfiable".
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => match self.size(path)? {
                Some(0) => Ok(Vec::new()),
                Some(_) => Err(e),
                None => Err(io::Error::new(io::ErrorKind::NotFound, format!("{path}: no such object"))),
            },
            Err(e) => Err(e),
        }
    }

    fn open(&self, path: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let key = self.inner.key(path)?;
        let size = self.size(path)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{path} is not in {}", self.inner.location))
        })?;
        let chunk = self.inner.part_size as u64;
        Ok((
            Box::new(RangeReader {
                inner: self.inner.clone(),
                key,
                path: path.to_string(),
                size,
                pos: 0,
                chunk,
                buf: Vec::new(),
                at: 0,
            }),
            size,
        ))
    }

    fn read_range(&self, path: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let i = &self.inner;
        let key = i.key(path)?;
        if len == 0 {
            let size = self.size(path)?.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            return if offset <= size {
                Ok(Vec::new())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{path}: offset {offset} is beyond its end"),
                ))
            };
        }
        let (bytes, _) = i.range(&key, path, offset, len)?;
        if bytes.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path} in {}: {len} bytes at offset {offset} are beyond its end", i.location),
            ));
        }
        Ok(bytes)
    }

    fn create(&self, path: &str) -> io::Result<Box<dyn NewObject>> {
        let key = self.inner.key(path)?;
        Ok(Box::new(Upload {
            inner: self.inner.clone(),
            key,
            path: path.to_string(),
            buf: Vec::new(),
            upload_id: None,
            next_part: 1,
            in_flight: Vec::new(),
            parts: Vec::new(),
            spare: Vec::new(),
            failed: None,
        }))
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        let i = &self.inner;
        let key = i.key(path)?;
        match i.bucket.delete_object(&key) {
            Ok(_) | Err(S3Error::HttpFailWithBody(404, _)) => Ok(()),
            Err(e) => Err(i.classify(e, "deleting", path)),
        }
    }
}

/// Sequential ranged GETs, one chunk in memory at a time.
struct RangeReader {
    inner: Arc<Inner>,
    key: String,
    path: String,
    size: u64,
    pos: u64,
    chunk: u64,
    buf: Vec<u8>,
    at: usize,
}

impl Read for RangeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.buf.len() {
            if self.pos >= self.size {
                return Ok(0);
            }
            let len = self.chunk.min(self.size - self.pos);
            // The spent chunk goes before the next one arrives: one chunk in memory, not two.
            self.buf = Vec::new();
            self.at = 0;
            let (bytes, total) = self.inner.range(&self.key, &self.path, self.pos, len)?;
            if bytes.len() as u64 != len || total.is_some_and(|t| t != self.size) {
                return Err(remote(
                    RemoteClass::Integrity,
                    io::ErrorKind::InvalidData,
                    format!("{} changed size while it was read ({} bytes when opened)", self.path, self.size),
                ));
            }
            self.pos += len;
            self.buf = bytes;
            self.at = 0;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A part being sent by a worker: its number and ETag, and the buffer back for reuse.
type PartWorker = JoinHandle<io::Result<(Part, Vec<u8>)>>;

/// An object being uploaded: one PUT if it fits in a part, else a multipart upload.
struct Upload {
    inner: Arc<Inner>,
    key: String,
    path: String,
    buf: Vec<u8>,
    upload_id: Option<String>,
    next_part: u32,
    in_flight: Vec<PartWorker>,
    parts: Vec<Part>,
    /// Part buffers back from their workers, reused: the same few allocations for the whole
    /// file keep the allocator from scattering (measured: +10 MiB RSS with fresh ones).
    spare: Vec<Vec<u8>>,
    failed: Option<io::ErrorKind>,
}

impl Upload {
    /// S3 allows at most 10,000 parts, each but the last at least 5 MiB; they need not be
    /// equal. Doubling every 2,000 parts keeps memory at the minimum for every file a Pi
    /// makes and still reaches 31 x 2,000 parts of the base size (~300 GB at 5 MiB).
    fn part_size(&self) -> usize {
        self.inner.part_size << ((self.next_part - 1) / 2000).min(4)
    }

    fn must_not_exist(&self) -> io::Result<()> {
        let i = &self.inner;
        match i.bucket.head_object(&self.key) {
            Ok((_, 404)) | Err(S3Error::HttpFailWithBody(404, _)) => Ok(()),
            Ok((_, 200)) => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists in {}; objects are never overwritten", self.path, i.location),
            )),
            Ok((_, s)) => {
                Err(i.classify(S3Error::HttpFailWithBody(s, String::new()), "checking", &self.path))
            }
            Err(e) => Err(i.classify(e, "checking", &self.path)),
        }
    }

    /// Hand the full buffer to a worker, waiting for the oldest if enough are in flight.
    fn send_part(&mut self) -> io::Result<()> {
        if self.upload_id.is_none() {
            self.must_not_exist()?;
            let r = self
                .inner
                .bucket
                .initiate_multipart_upload(&self.key, CONTENT_TYPE)
                .map_err(|e| self.inner.classify(e, "starting the upload of", &self.path))?;
            if let Some(j) = &self.inner.journal {
                note_upload(j, &self.key, &r.upload_id);
            }
            self.upload_id = Some(r.upload_id);
        }
        if self.inner.parts_in_flight == 1 {
            // One part at a time, on this thread: one buffer, reused, plus rust-s3's copy of
            // it while it is sent. Worker threads each get a malloc arena of their own, which
            // kept freed 5-8 MiB copies resident: ~10 MiB more at the same parts in flight.
            let number = self.next_part;
            self.next_part += 1;
            let id = self.upload_id.clone().expect("set above");
            if let Some(l) = &self.inner.limiter {
                l.take(self.buf.len() as u64);
            }
            let part = self
                .inner
                .bucket
                .put_multipart_chunk(&self.buf, &self.key, number, &id, CONTENT_TYPE)
                .map_err(|e| self.inner.classify(e, &format!("uploading part {number} of"), &self.path))?;
            self.parts.push(part);
            self.buf.clear();
            return Ok(());
        }
        while self.in_flight.len() >= self.inner.parts_in_flight {
            self.join_oldest()?;
        }
        let body = std::mem::replace(&mut self.buf, self.spare.pop().unwrap_or_default());
        self.buf.clear();
        let (inner, key, path) = (self.inner.clone(), self.key.clone(), self.path.clone());
        let id = self.upload_id.clone().expect("set above");
        let number = self.next_part;
        self.next_part += 1;
        self.in_flight.push(std::thread::spawn(move || {
            if let Some(l) = &inner.limiter {
                l.take(body.len() as u64);
            }
            inner
                .bucket
                .put_multipart_chunk(&body, &key, number, &id, CONTENT_TYPE)
                .map(|part| (part, body))
                .map_err(|e| inner.classify(e, &format!("uploading part {number} of"), &path))
        }));
        Ok(())
    }

    fn join_oldest(&mut self) -> io::Result<()> {
        let h = self.in_flight.remove(0);
        let (part, buf) = h.join().map_err(|_| io::Error::other("an upload thread panicked"))??;
        self.parts.push(part);
        self.spare.push(buf);
        Ok(())
    }

    fn fail<T>(&mut self, e: io::Error) -> io::Result<T> {
        self.failed = Some(e.kind());
        Err(e)
    }
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(kind) = self.failed {
            return Err(io::Error::new(kind, format!("the upload of {} already failed", self.path)));
        }
        let part = self.part_size();
        if self.buf.capacity() < part {
            self.buf.reserve_exact(part - self.buf.len());
        }
        let n = data.len().min(part - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == part {
            if let Err(e) = self.send_part() {
                return self.fail(e);
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl NewObject for Upload {
    fn commit(mut self: Box<Self>) -> io::Result<()> {
        if let Some(kind) = self.failed {
            return Err(io::Error::new(kind, format!("the upload of {} failed", self.path)));
        }
        let i = self.inner.clone();
        if self.upload_id.is_none() {
            let body = std::mem::take(&mut self.buf);
            if let Some(l) = &i.limiter {
                l.take(body.len() as u64);
            }
            return put_once(&i, &self.key, &self.path, &body);
        }
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        while !self.in_flight.is_empty() {
            self.join_oldest()?;
        }
        // Someone else may have written the key meanwhile (another machine on the same
        // prefix): completing would replace it.
        self.must_not_exist()?;
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.part_number);
        let id = self.upload_id.clone().expect("multipart");
        i.bucket
            .complete_multipart_upload(&self.key, &id, parts)
            .map_err(|e| i.classify(e, "completing the upload of", &self.path))?;
        self.upload_id = None; // committed: nothing to abort
        if let Some(j) = &i.journal {
            forget_upload(j, &id);
        }
        Ok(())
    }

    /// An object's key is chosen when its upload starts (multipart uploads cannot be
    /// renamed): the snapshot store (#9), which names packs once written, is not pushed
    /// offsite. Dropped, the upload is aborted.
    fn commit_as(self: Box<Self>, path: &str) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("an offsite upload cannot be renamed ({} to {path})", self.path),
        ))
    }
}

fn note_upload(journal: &std::path::Path, key: &str, id: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let line = format!("{key}\t{id}\t{}\n", chrono::Utc::now().to_rfc3339());
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(journal)
        .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|_| f.sync_data()));
    if let Err(e) = written {
        log::debug!("cannot note the upload in {}: {e}", journal.display());
    }
}

/// Drop a finished upload from the journal (the file goes when it is empty).
fn forget_upload(journal: &std::path::Path, id: &str) {
    let Ok(text) = std::fs::read_to_string(journal) else { return };
    let rest: String =
        text.lines().filter(|l| l.split('\t').nth(1) != Some(id)).map(|l| format!("{l}\n")).collect();
    let done = if rest.is_empty() {
        std::fs::remove_file(journal)
    } else {
        crate::fsutil::write_atomic(journal, rest.as_bytes(), 0o600).map_err(io::Error::other)
    };
    if let Err(e) = done {
        log::debug!("cannot update {}: {e}", journal.display());
    }
}

/// How long a single PUT's presigned URL stays valid: far longer than any PUT of one part
/// takes, short enough that a URL seen in transit is soon worthless.
const PRESIGN_SECS: u32 = 3600;

/// One object up to a part in size, in one PUT.
///
/// Sent through a presigned URL (`UNSIGNED-PAYLOAD`) rather than rust-s3's signed-payload
/// PUT, which hashes the body twice with SHA-256 for the signature, once with MD5 for
/// Content-MD5, and copies it twice: on the push of a snapshot store, a PUT per 4 MiB pack,
/// that was most of the push's CPU (#10). Integrity does not depend on those hashes: the
/// push has already hashed the bytes against the manifest or the pack's name before it
/// commits, TLS authenticates every byte in transit, and `verify --offsite` checks what the
/// bucket holds against the ledger.
fn put_once(i: &Inner, key: &str, path: &str, body: &[u8]) -> io::Result<()> {
    // Checked first on every server (rclone, older Ceph and SeaweedFS ignore or refuse the
    // condition below); the condition then closes the race where the server honours it.
    match i.bucket.head_object(key) {
        Ok((_, 200)) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{path} already exists in {}; objects are never overwritten", i.location),
            ))
        }
        Ok(_) | Err(S3Error::HttpFailWithBody(404, _)) => {}
        Err(e) => return Err(i.classify(e, "checking", path)),
    }
    if i.conditional_put.load(Ordering::Relaxed) {
        match presigned_put(i, key, body, true) {
            Err(S3Error::HttpFailWithBody(501, _)) => {
                log::debug!(
                    "{}: conditional PUT not implemented by the server; checking before writing only",
                    i.location
                );
                i.conditional_put.store(false, Ordering::Relaxed);
            }
            done => return done.map_err(|e| i.classify(e, "uploading", path)),
        }
    }
    presigned_put(i, key, body, false).map_err(|e| i.classify(e, "uploading", path))
}

/// PUT `body` at `key` through a URL signed for it (with `If-None-Match: *` when
/// `conditional`); an answer other than 2xx comes back as the S3 error it carries.
fn presigned_put(i: &Inner, key: &str, body: &[u8], conditional: bool) -> Result<(), S3Error> {
    let mut signed = http::HeaderMap::new();
    if conditional {
        signed.insert(http::header::IF_NONE_MATCH, http::HeaderValue::from_static("*"));
    }
    let url = i.bucket.presign_put(key, PRESIGN_SECS, Some(signed.clone()), None)?;
    // The headers sent are the headers signed (a signed header missing is a bad signature).
    let mut req = attohttpc::put(url).timeout(i.timeout).header("content-type", CONTENT_TYPE);
    for (name, value) in &signed {
        req = req.header(name, value);
    }
    let resp = req.bytes(body).send()?;
    if resp.is_success() {
        return Ok(());
    }
    let status = resp.status().as_u16();
    // The error document names the failure (SignatureDoesNotMatch, RequestTimeTooSkewed...).
    Err(S3Error::HttpFailWithBody(status, resp.text().unwrap_or_default()))
}

impl Drop for Upload {
    fn drop(&mut self) {
        for h in self.in_flight.drain(..) {
            let _ = h.join();
        }
        if let Some(id) = self.upload_id.take() {
            // Dropped uncommitted: free the parts. Best effort; the next push aborts what is
            // left (PendingUpload), and a bucket lifecycle rule can too.
            if let Err(e) = self.inner.bucket.abort_upload(&self.key, &id) {
                log::debug!("cannot abort the unfinished upload of {}: {e}", self.path);
            }
        }
    }
}

/// Average upload rate cap, shared by the part workers. Each part still goes at the link's
/// speed (rust-s3 sends a part from memory in one go): the cap holds on average over a few
/// parts, which is what keeps a home uplink usable.
struct RateLimiter {
    rate: u64,
    state: Mutex<(Instant, u64)>,
}

impl RateLimiter {
    fn new(rate: u64) -> RateLimiter {
        RateLimiter { rate: rate.max(1), state: Mutex::new((Instant::now(), 0)) }
    }

    /// Account `bytes` about to be sent; sleep until sending them keeps the average at the cap.
    fn take(&self, bytes: u64) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let due = s.0 + Duration::from_secs_f64(s.1 as f64 / self.rate as f64);
            s.1 += bytes;
            due.saturating_duration_since(Instant::now())
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limiter_holds_the_average() {
        let l = RateLimiter::new(1_000_000);
        let t = Instant::now();
        for _ in 0..4 {
            l.take(100_000);
        }
        // 300 kB were due before the 4th take: at 1 MB/s that is 0.3 s.
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(290) && e < Duration::from_secs(2), "{e:?}");
    }
}
