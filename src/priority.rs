//! The CPU priority of bulk worker threads (#14).
//!
//! A snapshot backup's sealers (compression, encryption, pack hashing) and a drill's readers
//! (decryption, decompression, chunk checks) do most of the CPU work, and each set of them is
//! fed by, or feeds, one thread that must go in order: the backup's caller thread (reads,
//! cuts, hashes, looks up the cache), the drill's writing thread. With as many workers as
//! cores, that one thread, woken to hand over the next batch, found every core taken by a
//! worker and waited for a scheduler slice (up to 3-5 ms measured) while the one-batch queue
//! between them ran dry and a core went idle. `perf sched` on a medium backup here: 650 ms of
//! idle CPU in a 1.6 s run with the sealers at the caller's priority, 240 ms with them at the
//! lowest (the rest is the start and the end, where one thread works alone).
//!
//! Nice only matters when threads compete for a core: the workers still get every cycle no
//! one else wants, so an idle Pi backs up as fast. What they give way to is the ordered
//! thread, the app (the backup unit already runs at `Nice=10`), and the kernel's own threads:
//! writeback, and dm-crypt on a LUKS drive.
//!
//! Not for a restore's readers: a restore keeps everything it writes, so the kernel has a
//! restore's worth of writeback to do on the same cores, and readers at the lowest priority
//! fell behind it (medium restore 1.21 s -> 1.36 s here). A drill deletes each file before
//! much of it reaches the disk.

/// The priority a set of worker threads runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerPriority {
    /// The same as the thread that started them.
    Inherited,
    /// The lowest there is (nice 19): see the module documentation.
    Lowest,
}

/// The nice value of [`WorkerPriority::Lowest`].
const LOWEST_NICE: i32 = 19;

/// Give the calling thread `priority`. On Linux the nice value belongs to each thread, and
/// `setpriority(PRIO_PROCESS, 0, …)` names the calling thread only. A failure changes only
/// the speed of the run (and lowering one's own priority needs no privilege), so it is logged,
/// not returned.
pub fn apply_to_this_thread(priority: WorkerPriority) {
    if priority == WorkerPriority::Lowest {
        if let Err(e) = rustix::process::setpriority_process(None, LOWEST_NICE) {
            log::debug!("could not lower a worker thread's CPU priority: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of the calling thread, read from the kernel's own account of it.
    fn nice_of_this_thread() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the command name (which may hold spaces, hence the last ')'): state is
        // field 3, nice field 19.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(19 - 3).unwrap().parse().unwrap()
    }

    #[test]
    fn the_lowest_priority_lowers_the_calling_thread_only() {
        let before = nice_of_this_thread();
        let (worker, inherited) = std::thread::scope(|s| {
            let worker = s.spawn(|| {
                apply_to_this_thread(WorkerPriority::Lowest);
                nice_of_this_thread()
            });
            let inherited = s.spawn(|| {
                apply_to_this_thread(WorkerPriority::Inherited);
                nice_of_this_thread()
            });
            (worker.join().unwrap(), inherited.join().unwrap())
        });
        assert_eq!(worker, LOWEST_NICE);
        assert_eq!(inherited, before);
        assert_eq!(nice_of_this_thread(), before, "the thread that started them keeps its priority");
    }
}
