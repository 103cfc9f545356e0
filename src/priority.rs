//! CPU priorities: jobs that yield to the app, and bulk workers that yield to their feeder.

/// Backups and drills yield the CPU to the application they protect: on a 2-core machine,
/// at nice 0 the app's transactions waited up to 40 ms for a core during a backup (3.3x
/// their worst without one; bench/results/medium.md). Linux sets nice per thread, so this
/// is called on the thread that runs the job, before it starts its pipeline thread.
/// Restores run at full speed: the app is stopped and someone is waiting.
pub const BACKGROUND_NICE: i32 = 10;

pub fn run_in_background_priority() {
    let current = rustix::process::getpriority_process(None).unwrap_or(0);
    if current < BACKGROUND_NICE {
        if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_NICE) {
            log::debug!("cannot lower the priority to nice {BACKGROUND_NICE}: {e}");
        }
    }
}

/// The nice value of [`lowest_for_this_thread`].
pub const LOWEST_NICE: i32 = 19;

/// Lower the calling thread to the lowest CPU priority: for the snapshot writer's sealers
/// (#14), which do two thirds of a backup's CPU work (compression, encryption, pack hashing)
/// and are all fed by one thread, the caller's, which reads, cuts, hashes and looks up every
/// chunk in order. At the same priority, that thread, woken to hand over the next batch,
/// often found every core taken by a sealer and waited for a scheduler slice while the
/// one-batch queue between them ran dry; then a core idled. Medium first backup here, two
/// sealers, 4 alternating pairs: 1.36-1.52 s with everything at nice 10, 1.31-1.33 s with the
/// sealers at 19; `perf sched` counted 374 and 925 ms of idle CPU in two runs of the first,
/// 222 and 234 ms in two of the second (most of that now the start and the end, where one
/// thread works alone). Sealers above their feeder (nice 0 under a nice-10 caller) took
/// 1.50-1.66 s.
///
/// Nice only matters when threads compete for a core: on an idle Pi the sealers still get
/// every cycle. They give way to their feeder, to the app and to the kernel's threads
/// (writeback; dm-crypt on the LUKS drive). Not for a restore's or a drill's readers, which
/// feed the writing thread in the same way: a restore's readers at 19 fell behind the
/// kernel's writeback of what the restore keeps (1.21 s -> 1.36 s), and a drill gained
/// nothing (1.008 s against 1.003 s, 6 alternating pairs).
///
/// Linux keeps a nice value per thread, and `setpriority(PRIO_PROCESS, 0, …)` names the
/// calling thread only. Lowering one's own priority needs no privilege; a failure would only
/// change the speed, so it is logged, not returned.
pub fn lowest_for_this_thread() {
    if let Err(e) = rustix::process::setpriority_process(None, LOWEST_NICE) {
        log::debug!("cannot lower a worker thread's priority to nice {LOWEST_NICE}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of the calling thread, as the kernel reports it. (Not from
    /// `/proc/thread-self/stat`: qemu's user-mode emulation, which runs the aarch64 tests,
    /// makes up most of that file's fields.)
    fn nice_of_this_thread() -> i32 {
        rustix::process::getpriority_process(None).unwrap()
    }

    #[test]
    fn a_worker_lowers_itself_and_not_the_thread_that_started_it() {
        let before = nice_of_this_thread();
        let worker = std::thread::spawn(|| {
            lowest_for_this_thread();
            nice_of_this_thread()
        });
        assert_eq!(worker.join().unwrap(), LOWEST_NICE);
        assert_eq!(nice_of_this_thread(), before);
        let sibling = std::thread::spawn(nice_of_this_thread).join().unwrap();
        assert_eq!(sibling, before, "a thread started afterwards inherits the starter's, not the worker's");
    }
}
