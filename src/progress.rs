//! Progress reporting, injected by the binary so the library never prints.

/// Receives progress of long operations. Every method has a do-nothing default.
pub trait Progress: Send + Sync {
    /// A new phase starts; `total_bytes` is 0 when unknown.
    fn start(&self, _what: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// For daemons, tests and `--quiet`.
pub struct NoProgress;

impl Progress for NoProgress {}
