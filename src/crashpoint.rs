//! Crash points: named places in the steps that must survive a power cut, where a test can
//! cut the run the way a power failure would (zincati's fault injection, for the disaster
//! path).
//!
//! `DATAVAULT_CRASH_AFTER=N` makes the process SIGKILL itself at the N-th crash point it
//! reaches: no destructor runs, nothing more is written, exactly as if the power went. The
//! fault suite tries every N until a run gets through, so each step of an in-place restore
//! and of its rollback is cut once, and the next run must repair it (tests/restore_hazards.rs).
//! Unset, a crash point costs one relaxed atomic load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

static REACHED: AtomicUsize = AtomicUsize::new(0);
static TARGET: OnceLock<Option<usize>> = OnceLock::new();

/// Mark a point where a power cut must be survivable.
pub fn crash_point(name: &str) {
    let target =
        *TARGET.get_or_init(|| std::env::var("DATAVAULT_CRASH_AFTER").ok().and_then(|v| v.parse().ok()));
    let Some(target) = target else { return };
    let n = REACHED.fetch_add(1, Ordering::Relaxed) + 1;
    log::debug!("crash point {n}: {name}");
    if n == target {
        eprintln!("datavault: crash point {n} ({name}) reached: killing this process as a power cut would");
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort();
    }
}
