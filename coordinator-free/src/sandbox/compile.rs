//! Compile threads, bounded across every process that shares a cache directory.
//!
//! A peer donating `n` cores runs `n` unit hosts, and when a new job arrives they may each meet
//! a different module at once. Were every host to compile on `n` threads, the machine would run
//! `n²` compiler threads. Instead the cache directory holds `n` *compile slots*, the lock files
//! `compile-slot-K.lock`: a compile waits until it holds at least one slot, takes every other
//! slot that is free at that moment, and compiles on exactly as many threads as it holds slots.
//! So at most `n` compiler threads run at once on the peer's behalf, a lone compile still gets
//! every core, and the kernel drops the slots of a host that dies. Slots are advisory locks
//! (`flock`), which conflict between open files, so threads of one process share them as
//! processes do.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Where compile slots live and how many there are.
#[derive(Debug)]
pub(crate) struct CompileSlots {
    /// The shared directory; `None` bounds only this compile (nothing to share with).
    dir: Option<PathBuf>,
    count: usize,
}

impl CompileSlots {
    pub(crate) fn new(dir: Option<&Path>, count: u32) -> Self {
        Self {
            dir: dir.map(Path::to_owned),
            count: usize::try_from(count).unwrap_or(usize::MAX).max(1),
        }
    }

    /// Runs `compile` on a thread pool of its own, sized by the slots taken. The pool's threads
    /// are joined before this returns, and only then are the slots given back, so a slot never
    /// stands for more than one live thread.
    pub(crate) fn run<T: Send>(&self, compile: impl FnOnce() -> T + Send) -> T {
        let held = self.take();
        let threads = match &self.dir {
            Some(_) => held.len().max(1),
            None => self.count,
        };
        let mut compile = Some(compile);
        let mut result = None;
        let pooled = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cf-compile-{i}"))
            .build_scoped(
                |thread| {
                    let _live = census::enter();
                    thread.run();
                },
                |pool| {
                    if let Some(compile) = compile.take() {
                        result = Some(pool.install(compile));
                    }
                },
            );
        if let Err(e) = pooled {
            tracing::warn!("cannot start compile threads: {e}; compiling on the unit's thread");
        }
        match (result, compile) {
            (Some(result), _) => result,
            // No threads to be had: compile on this one, which holds a slot or waited for one.
            (None, Some(compile)) => compile(),
            (None, None) => unreachable!("a pool that took the compile returned its result"),
        }
    }

    /// Takes every free slot, waiting for one if none is. Slot files that cannot be opened are
    /// skipped; when none can, the compile runs on one thread without a slot.
    fn take(&self) -> Vec<File> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let mut busy = Vec::new();
        let mut held = Vec::new();
        for k in 0..self.count {
            let Ok(file) = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("compile-slot-{k}.lock")))
            else {
                continue;
            };
            match file.try_lock() {
                Ok(()) => held.push(file),
                Err(_) => busy.push(file),
            }
        }
        if held.is_empty() && !busy.is_empty() {
            // Hosts wait on different slots, so one slot coming free does not wake them all.
            let first = std::process::id() as usize % busy.len();
            let slot = busy.swap_remove(first);
            if slot.lock().is_ok() {
                held.push(slot);
            }
            // Others may have come free while this one waited.
            held.extend(busy.into_iter().filter(|f| f.try_lock().is_ok()));
        }
        held
    }
}

/// Counts compile threads in tests, to check the bound.
#[cfg(test)]
pub(crate) mod census {
    use std::sync::atomic::{AtomicUsize, Ordering};

    static LIVE: AtomicUsize = AtomicUsize::new(0);
    static MOST: AtomicUsize = AtomicUsize::new(0);
    static STARTED: AtomicUsize = AtomicUsize::new(0);

    pub(crate) struct Live;

    pub(crate) fn enter() -> Live {
        STARTED.fetch_add(1, Ordering::SeqCst);
        let now = LIVE.fetch_add(1, Ordering::SeqCst) + 1;
        MOST.fetch_max(now, Ordering::SeqCst);
        Live
    }

    impl Drop for Live {
        fn drop(&mut self) {
            LIVE.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Compile threads started since the last call, and the most alive at once; starts a new
    /// count.
    pub(crate) fn since_last() -> (usize, usize) {
        (
            STARTED.swap(0, Ordering::SeqCst),
            MOST.swap(LIVE.load(Ordering::SeqCst), Ordering::SeqCst),
        )
    }
}

#[cfg(not(test))]
mod census {
    pub(super) struct Live;

    pub(super) fn enter() -> Live {
        Live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{Metering, Sandbox, SandboxConfig};

    /// A module of many functions, so its compile spreads over every thread it has.
    fn module(seed: u32) -> Vec<u8> {
        let funcs: String = (0..40)
            .map(|f| {
                format!(
                    "(func (param i32) (result i32) local.get 0 i32.const {} i32.mul i32.const {f} i32.add)",
                    seed * 100 + f + 1
                )
            })
            .collect();
        wat::parse_str(format!(
            "(module (memory (export \"memory\") 1) {funcs} (func (export \"run\") (result i32) i32.const 0))"
        ))
        .unwrap()
    }

    fn hold(dir: &Path, k: usize) -> File {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("compile-slot-{k}.lock")))
            .unwrap();
        file.lock().unwrap();
        file
    }

    // One test, since the census counts every compile thread of this process.
    #[test]
    fn compiles_never_run_more_threads_than_there_are_slots() {
        let dir = tempfile::tempdir().unwrap();
        let slots = CompileSlots::new(Some(dir.path()), 2);
        let work = || {
            use rayon::prelude::*;
            (0..256u64).into_par_iter().map(|i| i * i).sum::<u64>()
        };

        // Both slots free: the compile takes both.
        census::since_last();
        slots.run(work);
        assert_eq!(census::since_last().0, 2);

        // Another host holds one: this compile gets the other only.
        let other = hold(dir.path(), 1);
        slots.run(work);
        assert_eq!(census::since_last(), (1, 1));
        drop(other);

        // Without a shared directory, the count bounds this compile alone.
        CompileSlots::new(None, 3).run(work);
        assert_eq!(census::since_last().0, 3);

        // Four sandboxes sharing the directory (as a peer's unit hosts do) each meet a module
        // of their own at once, each allowed every slot: together they never pass two threads.
        census::since_last();
        let prepared: Vec<u64> = std::thread::scope(|s| {
            let hosts: Vec<_> = (0..4)
                .map(|i| {
                    let dir = dir.path().to_owned();
                    s.spawn(move || {
                        let sandbox = Sandbox::new(SandboxConfig {
                            cache_dir: Some(dir),
                            compile_threads: Some(2),
                            ..SandboxConfig::default()
                        })
                        .unwrap();
                        sandbox.prepare(&module(i), Metering::Off).unwrap();
                        sandbox.cache_stats().compiled
                    })
                })
                .collect();
            hosts.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(prepared, [1, 1, 1, 1], "every host compiled its module");
        let (started, most) = census::since_last();
        assert!(
            (4..=8).contains(&started),
            "{started} compile threads in all"
        );
        assert!((1..=2).contains(&most), "{most} compile threads at once");
    }
}
