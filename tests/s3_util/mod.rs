//! A real S3 server for the offsite tests: `rclone serve s3` (it checks SigV4 signatures;
//! each top-level folder of its directory is a bucket) on 127.0.0.1 with an ephemeral port,
//! plus backend wrappers that record, fail or refuse on purpose.
//!
//! rclone comes from `DATAVAULT_TEST_RCLONE`, else `target/test-tools/rclone` (put there by
//! `scripts/get-rclone.sh`, which .ci/run runs, and which this helper runs once if the binary
//! is missing), else an `rclone` on PATH that has `serve s3`. Without one the tests print why
//! and skip; CI always has one.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use datavault::store::backend::{Backend, NewObject, ObjectInfo};

/// Long enough for rclone (it refuses very short access keys).
pub const ACCESS_KEY: &str = "datavault-test-access-key";
pub const SECRET_KEY: &str = "datavault-test-secret-Zq8pW2xK5vN9";
pub const BUCKET: &str = "dvbucket";

fn serves_s3(bin: &Path) -> bool {
    Command::new(bin)
        .args(["serve", "s3", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The rclone to use, or why there is none.
pub fn rclone() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if crate::util::emulated() {
                return Err("skipped under emulation (ran natively): rclone is an x86_64 binary".into());
            }
            // The year-ahead run (scripts/ci-faults.sh) shifts the tests' clock with
            // libfaketime; rclone (static Go, reading the clock through the vDSO) keeps the real
            // one, and S3 refuses signatures more than 15 minutes off, as it should (datavault
            // then says the clock is wrong: tests/offsite.rs checks it in the normal run).
            if std::env::var_os("FAKETIME").is_some_and(|v| !v.is_empty()) {
                return Err("FAKETIME shifts this clock but not the S3 server's (run without it)".into());
            }
            if let Some(p) = std::env::var_os("DATAVAULT_TEST_RCLONE") {
                let p = PathBuf::from(p);
                return if serves_s3(&p) { Ok(p) } else { Err(format!("{} has no `serve s3`", p.display())) };
            }
            let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
            let local = repo.join("target/test-tools/rclone");
            if serves_s3(&local) {
                return Ok(local);
            }
            if let Ok(out) = Command::new("bash").arg(repo.join("scripts/get-rclone.sh")).output() {
                if serves_s3(&local) {
                    return Ok(local);
                }
                eprintln!("get-rclone.sh: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            if serves_s3(Path::new("rclone")) {
                return Ok(PathBuf::from("rclone"));
            }
            Err("no rclone with `serve s3` (run scripts/get-rclone.sh; Debian's rclone 1.60 lacks it)".into())
        })
        .clone()
}

/// A port nothing listens on right now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    /// The served folder: `<dir>/<bucket>/<key>`.
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl S3Server {
    /// Serve `dir` (creating the bucket folder) on a fresh port.
    pub fn start(dir: &Path) -> S3Server {
        Self::start_on(dir, free_port())
    }

    pub fn start_on(dir: &Path, port: u16) -> S3Server {
        std::fs::create_dir_all(dir.join(BUCKET)).unwrap();
        let log = dir.with_extension(format!("rclone-{port}.log"));
        let bin = rclone().expect("checked by the caller");
        let child = Command::new(bin)
            .args(["serve", "s3", "--addr", &format!("127.0.0.1:{port}")])
            .args(["--auth-key", &format!("{ACCESS_KEY},{SECRET_KEY}")])
            .arg(dir)
            .env("RCLONE_CONFIG", "/dev/null")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = S3Server { child: Some(child), port, dir: dir.to_path_buf(), log };
        s.wait_ready();
        s
    }

    /// Until the port accepts connections (or rclone exits, or 30 s pass).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("rclone exited ({st}): {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "rclone did not listen on {} within 30 s", self.port);
            std::thread::yield_now();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A stored object's bytes, straight from the served folder.
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(BUCKET).join(key)).ok()
    }

    /// Every stored file under `prefix`, relative to the bucket, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let root = self.dir.join(BUCKET);
        let mut v: Vec<String> = walkdir::WalkDir::new(root.join(prefix))
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.path().strip_prefix(&root).unwrap().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `[offsite]` section for a server, plus `extra` lines.
pub fn offsite_section(endpoint: &str, prefix: &str, credentials: &Path, extra: &str) -> String {
    format!(
        "\n[offsite]\nurl = \"s3://{BUCKET}/{prefix}\"\nendpoint = \"{endpoint}\"\npath_style = true\n\
         credentials = {:?}\npart_size_mib = 5\n{extra}\n",
        credentials.display().to_string()
    )
}

/// Write a 0600 credentials file.
pub fn write_credentials(path: &Path, access: &str, secret: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("access_key_id = \"{access}\"\nsecret_access_key = \"{secret}\"\n"))
        .unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Wraps a backend: records every committed path in order, can fail every commit after
/// the first `fail_after` (a dropped connection), and can refuse like a put-only
/// credential (no delete, no overwrite).
#[derive(Clone)]
pub struct Wrapped<B: Backend + Clone + 'static> {
    pub inner: B,
    pub committed: Arc<Mutex<Vec<String>>>,
    pub fail_after: Option<usize>,
    pub put_only: bool,
    commits: Arc<AtomicUsize>,
}

impl<B: Backend + Clone + 'static> Wrapped<B> {
    pub fn new(inner: B) -> Self {
        Wrapped {
            inner,
            committed: Default::default(),
            fail_after: None,
            put_only: false,
            commits: Default::default(),
        }
    }
    pub fn order(&self) -> Vec<String> {
        self.committed.lock().unwrap().clone()
    }
}

impl<B: Backend + Clone + 'static> Backend for Wrapped<B> {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn list(&self, dir: &str) -> io::Result<Vec<ObjectInfo>> {
        self.inner.list(dir)
    }
    fn size(&self, path: &str) -> io::Result<Option<u64>> {
        self.inner.size(path)
    }
    fn read_small(&self, path: &str, max: u64) -> io::Result<Vec<u8>> {
        self.inner.read_small(path, max)
    }
    fn open(&self, path: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        self.inner.open(path)
    }
    fn read_range(&self, path: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        self.inner.read_range(path, offset, len)
    }
    fn create(&self, path: &str) -> io::Result<Box<dyn NewObject>> {
        if self.put_only && self.inner.size(path)?.is_some() {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("put-only: {path} exists")));
        }
        Ok(Box::new(WrappedObject {
            inner: self.inner.create(path)?,
            path: path.into(),
            w: self.clone_dyn(),
        }))
    }
    fn remove(&self, path: &str) -> io::Result<()> {
        if self.put_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("put-only: cannot delete {path}"),
            ));
        }
        self.inner.remove(path)
    }
}

/// Called at each commit: records it, or fails it on purpose.
type OnCommit = Arc<dyn Fn(&str) -> io::Result<()> + Send + Sync>;

impl<B: Backend + Clone + 'static> Wrapped<B> {
    fn clone_dyn(&self) -> OnCommit {
        let (committed, commits, fail_after) =
            (self.committed.clone(), self.commits.clone(), self.fail_after);
        Arc::new(move |path: &str| {
            let n = commits.fetch_add(1, Ordering::SeqCst);
            if fail_after.is_some_and(|f| n >= f) {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "connection reset (injected)"));
            }
            committed.lock().unwrap().push(path.to_string());
            Ok(())
        })
    }
}

struct WrappedObject {
    inner: Box<dyn NewObject>,
    path: String,
    w: OnCommit,
}

impl Write for WrappedObject {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl NewObject for WrappedObject {
    fn commit(self: Box<Self>) -> io::Result<()> {
        (self.w)(&self.path)?;
        self.inner.commit()
    }
    fn commit_as(self: Box<Self>, path: &str) -> io::Result<()> {
        (self.w)(path)?;
        self.inner.commit_as(path)
    }
}

/// Peak resident memory (VmHWM) of a running child, sampled until it exits.
pub fn run_sampling_rss(mut cmd: Command) -> (std::process::Output, u64) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        // Sampling, not synchronisation: VmHWM is a high-water mark, so a late sample
        // still sees the peak.
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = std::process::Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() };
    (out, peak_kib * 1024)
}
