//! Progress reporting, injected by the binary so the library never prints.

/// Receives progress of long operations. Every method has a do-nothing default.
pub trait Progress: Send + Sync {
    /// A new phase starts; `total_bytes` is 0 when unknown.
    fn start(&self, _what: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
    /// Polled while data flows: true makes the operation stop with [`Cancelled`], removing
    /// what it had written (the agent sets it on SIGTERM).
    fn cancelled(&self) -> bool {
        false
    }
}

/// The error a cancelled operation stops with, carried through `io::Error`.
#[derive(Debug)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped on request (SIGTERM); nothing was written")
    }
}

impl std::error::Error for Cancelled {}

/// For daemons, tests and `--quiet`.
pub struct NoProgress;

impl Progress for NoProgress {}

/// A reader that advances `progress` by what it reads and stops with [`Cancelled`] once the
/// run is cancelled: the archive writer and the snapshot writer read files through it.
pub struct ProgressReader<'p, R> {
    pub inner: R,
    pub progress: &'p dyn Progress,
}

impl<R: std::io::Read> std::io::Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.progress.cancelled() {
            return Err(std::io::Error::other(Cancelled));
        }
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}
