//! Dedicated threads that run units, as many as the cores the peer donates.
//!
//! WebAssembly runs synchronously; giving it its own threads keeps it away from the async
//! runtime and lets each thread have the stack headroom host frames need beyond the wasm stack.
//! Each thread owns one [`UnitRunner`]: the in-process [`Sandbox`] or a [`UnitHost`] process.
//! The queue in front of the threads is bounded: a full queue is reported, never grown.
//!
//! A thread that finds several queued units of one module may take them as a batch, when its
//! runner can run batches ([`UnitRunner::batches_with`]): a unit host then gets them in one
//! frame, which spreads the round trip over the batch. Batches are kept short in time (by the
//! thread's recent time per unit), and a thread leaves a share of the queue to idle threads, so
//! batching never trades parallelism for less overhead.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::host::{HostedModule, UnitHost, UnitHostCommand};
use super::{PreparedModule, Sandbox, SandboxError, UnitError, UnitReport, UnitRequest};

/// Stack of a unit thread: the 512 KiB wasm stack plus generous room for host frames.
const THREAD_STACK: usize = 8 << 20;

/// Most units one batch takes.
const MAX_BATCH: usize = 64;

/// About how long one batch may take, judged by the thread's recent time per unit. Units queued
/// behind a batch wait for all of it, so only units much shorter than this are batched.
const BATCH_TIME: Duration = Duration::from_millis(2);

/// Something a unit thread runs units with.
pub trait UnitRunner: Send + 'static {
    /// The module form this runner takes.
    type Module: Send + 'static;

    /// Runs one unit to its end.
    fn run_unit(&mut self, module: &Self::Module, request: UnitRequest) -> UnitReport;

    /// Whether units of `a` and units of `b` may share one [`run_batch`](Self::run_batch) call
    /// (which then gets `a`). Nothing batches by default.
    fn batches_with(_a: &Self::Module, _b: &Self::Module) -> bool {
        false
    }

    /// Runs units of one module in order and hands each report to `report`, with the unit's
    /// index in `requests`, as soon as it is known. Every unit must be reported exactly once.
    /// By default the units run one by one through [`run_unit`](Self::run_unit).
    fn run_batch(
        &mut self,
        module: &Self::Module,
        requests: Vec<UnitRequest>,
        report: &mut dyn FnMut(usize, UnitReport),
    ) {
        for (index, request) in requests.into_iter().enumerate() {
            report(index, self.run_unit(module, request));
        }
    }
}

impl UnitRunner for Sandbox {
    type Module = Arc<PreparedModule>;

    fn run_unit(&mut self, module: &Self::Module, request: UnitRequest) -> UnitReport {
        self.run(module, request)
    }
}

impl UnitRunner for UnitHost {
    type Module = Arc<HostedModule>;

    fn run_unit(&mut self, module: &Self::Module, request: UnitRequest) -> UnitReport {
        self.run(module, request)
    }

    fn batches_with(a: &Self::Module, b: &Self::Module) -> bool {
        a.same_as(b)
    }

    fn run_batch(
        &mut self,
        module: &Self::Module,
        requests: Vec<UnitRequest>,
        report: &mut dyn FnMut(usize, UnitReport),
    ) {
        UnitHost::run_batch(self, module, requests, report);
    }
}

type Reply = Box<dyn FnOnce(UnitReport) + Send>;

struct Task<M> {
    module: M,
    request: UnitRequest,
    reply: Reply,
}

/// The queue was full; the caller keeps the unit and may retry later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("all unit threads are busy and the queue is full")]
pub struct ExecutorBusy;

/// The bounded queue between callers and unit threads. A hand-written queue rather than a
/// channel, because a thread taking a batch picks the queued units of its module.
struct Queue<M> {
    state: Mutex<Waiting<M>>,
    /// Signalled when a task arrives or the queue closes.
    ready: Condvar,
    /// Signalled when room frees up, for callers of [`Executor::run`].
    room: Condvar,
    depth: usize,
}

struct Waiting<M> {
    tasks: VecDeque<Task<M>>,
    /// Threads waiting for a task. A waiting thread takes a task at once, so the queue holds
    /// `depth` tasks beyond those (a depth of 0 hands units only to idle threads).
    idle: usize,
    /// Callers of [`Executor::run`] waiting for room.
    blocked: usize,
    closed: bool,
}

impl<M> Queue<M> {
    fn lock(&self) -> MutexGuard<'_, Waiting<M>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `task`, waiting for room if `wait`. A task that cannot be queued is dropped (the
    /// caller learns from the error; its reply is never called).
    fn push(&self, task: Task<M>, wait: bool) -> Result<(), ExecutorBusy> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return Err(ExecutorBusy);
            }
            if state.tasks.len() < self.depth.saturating_add(state.idle) {
                state.tasks.push_back(task);
                let wake = state.idle > 0;
                drop(state);
                // Waking costs a system call; only a waiting thread needs it.
                if wake {
                    self.ready.notify_one();
                }
                return Ok(());
            }
            if !wait {
                return Err(ExecutorBusy);
            }
            state.blocked += 1;
            state = self.room.wait(state).unwrap_or_else(|p| p.into_inner());
            state.blocked -= 1;
        }
    }

    /// Takes the next task and, when `batches_with` allows, more queued tasks of its module, up
    /// to `limit(module)` in all; `None` once the queue is closed and empty.
    fn pop(
        &self,
        limit: impl Fn(&M) -> usize,
        batches_with: impl Fn(&M, &M) -> bool,
    ) -> Option<Vec<Task<M>>> {
        let mut state = self.lock();
        loop {
            if let Some(first) = state.tasks.pop_front() {
                // Leave idle threads their share: they were woken for these tasks.
                let share = (state.tasks.len() + 1).div_ceil(state.idle + 1);
                let limit = limit(&first.module).min(share).max(1);
                let mut batch = vec![first];
                let mut at = 0;
                while batch.len() < limit && at < state.tasks.len() {
                    if batches_with(&batch[0].module, &state.tasks[at].module) {
                        batch.extend(state.tasks.remove(at));
                    } else {
                        at += 1;
                    }
                }
                let wake = state.blocked > 0;
                drop(state);
                if wake {
                    self.room.notify_all();
                }
                return Some(batch);
            }
            if state.closed {
                return None;
            }
            state.idle += 1;
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
            state.idle -= 1;
        }
    }

    /// Refuses new tasks; the threads finish those queued and exit.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        self.room.notify_all();
    }
}

/// A bounded pool of unit threads, each with its own runner.
pub struct Executor<R: UnitRunner = Sandbox> {
    queue: Arc<Queue<R::Module>>,
    threads: Vec<JoinHandle<()>>,
}

impl<R: UnitRunner> std::fmt::Debug for Executor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl Executor<Sandbox> {
    /// Starts `threads` in-process unit threads (at least one, at most the sandbox's
    /// concurrent-unit slots) with room for `queue_depth` waiting units.
    pub fn new(sandbox: Sandbox, threads: usize, queue_depth: usize) -> Result<Self, SandboxError> {
        let slots = sandbox.config().max_concurrent_units.max(1) as usize;
        let runners = (0..threads.clamp(1, slots))
            .map(|_| sandbox.clone())
            .collect();
        Self::with_runners(runners, queue_depth)
    }
}

impl Executor<UnitHost> {
    /// Starts `threads` unit threads (at least one), each driving its own unit host process
    /// started from `command` on first use. Queued units of one module are handed to a host
    /// in batches.
    pub fn unit_hosts(
        command: &UnitHostCommand,
        threads: usize,
        queue_depth: usize,
    ) -> Result<Self, SandboxError> {
        let runners = (0..threads.max(1))
            .map(|_| UnitHost::new(command.clone()))
            .collect();
        Self::with_runners(runners, queue_depth)
    }

    /// Like [`Executor::unit_hosts`], every host stopped and continued by `switch`.
    pub fn unit_hosts_with_switch(
        command: &UnitHostCommand,
        threads: usize,
        queue_depth: usize,
        switch: &super::HostSwitch,
    ) -> Result<Self, SandboxError> {
        let runners = (0..threads.max(1))
            .map(|_| UnitHost::with_switch(command.clone(), switch.clone()))
            .collect();
        Self::with_runners(runners, queue_depth)
    }
}

impl<R: UnitRunner> Executor<R> {
    /// One unit thread per runner, with room for `queue_depth` waiting units.
    pub fn with_runners(runners: Vec<R>, queue_depth: usize) -> Result<Self, SandboxError> {
        let queue = Arc::new(Queue {
            state: Mutex::new(Waiting {
                tasks: VecDeque::new(),
                idle: 0,
                blocked: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            room: Condvar::new(),
            depth: queue_depth,
        });
        let mut executor = Self {
            queue: queue.clone(),
            threads: Vec::with_capacity(runners.len()),
        };
        for (index, runner) in runners.into_iter().enumerate() {
            let queue = queue.clone();
            // On an error, dropping `executor` stops the threads already started.
            let handle = std::thread::Builder::new()
                .name(format!("cf-unit-{index}"))
                .stack_size(THREAD_STACK)
                .spawn(move || serve(runner, &queue))
                .map_err(SandboxError::Thread)?;
            executor.threads.push(handle);
        }
        Ok(executor)
    }

    /// Queues a unit; `reply` is called on a unit thread with its report.
    pub fn try_submit(
        &self,
        module: R::Module,
        request: UnitRequest,
        reply: impl FnOnce(UnitReport) + Send + 'static,
    ) -> Result<(), ExecutorBusy> {
        let task = Task {
            module,
            request,
            reply: Box::new(reply),
        };
        self.queue.push(task, false)
    }

    /// Runs a unit on a unit thread and waits for its report.
    pub fn run(&self, module: R::Module, request: UnitRequest) -> UnitReport {
        let (send, receive) = sync_channel(1);
        let task = Task {
            module,
            request,
            reply: Box::new(move |report| {
                let _ = send.send(report);
            }),
        };
        let stopped = || {
            UnitReport::refused(UnitError::Host {
                detail: "the unit threads have stopped".into(),
            })
        };
        if self.queue.push(task, true).is_err() {
            return stopped();
        }
        receive.recv().unwrap_or_else(|_| stopped())
    }
}

impl<R: UnitRunner> Drop for Executor<R> {
    fn drop(&mut self) {
        // Closing the queue lets every thread finish the queued units and exit.
        self.queue.close();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// What a panic carried, as a unit's host failure.
fn panic_report(panic: &(dyn std::any::Any + Send)) -> UnitReport {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a host panic".into());
    UnitReport::refused(UnitError::Host { detail })
}

/// Modules whose time per unit a thread remembers.
const REMEMBERED_MODULES: usize = 8;

/// How many units the next batch may take, given the module's recent time per unit: one until
/// that time is known, then as many as fit in [`BATCH_TIME`].
fn batch_limit(per_unit: Option<Duration>) -> usize {
    match per_unit {
        None => 1,
        Some(per_unit) => {
            let fit = BATCH_TIME.as_nanos() / per_unit.as_nanos().max(1);
            usize::try_from(fit)
                .unwrap_or(MAX_BATCH)
                .clamp(1, MAX_BATCH)
        }
    }
}

fn serve<R: UnitRunner>(mut runner: R, queue: &Queue<R::Module>) {
    // Recent time per unit of each module this thread ran, most recent first. It is the units'
    // own run time as their reports give it, so a host's start-up and a module's compilation,
    // paid once, do not keep the units after them from being batched.
    let mut timings: VecDeque<(R::Module, Duration)> = VecDeque::new();
    let timing = |timings: &VecDeque<(R::Module, Duration)>, module: &R::Module| {
        timings
            .iter()
            .position(|(known, _)| R::batches_with(known, module))
    };
    loop {
        let limit =
            |module: &R::Module| batch_limit(timing(&timings, module).map(|at| timings[at].1));
        let Some(batch) = queue.pop(limit, R::batches_with) else {
            return;
        };
        let mut module = None;
        let mut requests = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for task in batch {
            module.get_or_insert(task.module);
            if task.request.aborted() {
                // No longer wanted while it waited: it never runs.
                let report = UnitReport::refused(super::aborted_error());
                let _ = catch_unwind(AssertUnwindSafe(|| (task.reply)(report)));
                continue;
            }
            requests.push(task.request);
            replies.push(Some(task.reply));
        }
        let count = requests.len();
        let Some(module) = module.filter(|_| count > 0) else {
            continue;
        };
        let mut ran_for = Duration::ZERO;
        // A bug in host code must cost its units, not the thread; nor may a reply that panics
        // cost the units after it.
        let ran = catch_unwind(AssertUnwindSafe(|| {
            runner.run_batch(&module, requests, &mut |index, report| {
                ran_for = ran_for.saturating_add(report.elapsed);
                if let Some(reply) = replies.get_mut(index).and_then(Option::take) {
                    let _ = catch_unwind(AssertUnwindSafe(|| reply(report)));
                }
            });
        }));
        let unreported = match &ran {
            Err(panic) => panic_report(&**panic),
            Ok(()) => UnitReport::refused(UnitError::Host {
                detail: "the runner gave no report for the unit".into(),
            }),
        };
        for reply in replies.into_iter().flatten() {
            let report = unreported.clone();
            let _ = catch_unwind(AssertUnwindSafe(|| reply(report)));
        }
        if !R::batches_with(&module, &module) {
            continue;
        }
        let per_unit = ran_for / u32::try_from(count).unwrap_or(u32::MAX);
        let before = timing(&timings, &module).and_then(|at| timings.remove(at));
        // Smoothed, so one odd unit does not swing the batch size.
        let smoothed = match before {
            None => per_unit,
            Some((_, before)) => before.saturating_mul(3).saturating_add(per_unit) / 4,
        };
        timings.push_front((module, smoothed));
        timings.truncate(REMEMBERED_MODULES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::channel;

    /// Answers every unit with its input, reversed; records the size of each batch it ran.
    struct Reverser {
        batches: Batches,
        /// Held by the test to keep the thread busy while it queues units.
        gate: Arc<Mutex<()>>,
        panic_on: Option<u8>,
    }

    impl UnitRunner for Reverser {
        type Module = u32;

        fn run_unit(&mut self, module: &u32, request: UnitRequest) -> UnitReport {
            let mut out = request.input.to_vec();
            out.reverse();
            out.push(*module as u8);
            let mut report = UnitReport::refused(UnitError::Host {
                detail: String::new(),
            });
            report.result = Ok(out);
            report.elapsed = Duration::from_micros(1);
            report
        }

        fn batches_with(a: &u32, b: &u32) -> bool {
            a == b
        }

        fn run_batch(
            &mut self,
            module: &u32,
            requests: Vec<UnitRequest>,
            report: &mut dyn FnMut(usize, UnitReport),
        ) {
            drop(self.gate.lock().unwrap_or_else(|p| p.into_inner()));
            self.batches.lock().unwrap().push(requests.len());
            // Reported last to first: the executor must still match each to its reply.
            let reports: Vec<_> = requests
                .into_iter()
                .map(|r| {
                    let panics = self.panic_on.is_some_and(|p| r.input.first() == Some(&p));
                    (panics, self.run_unit(module, r))
                })
                .collect();
            for (index, (panics, r)) in reports.into_iter().enumerate().rev() {
                if panics {
                    panic!("runner bug");
                }
                report(index, r);
            }
        }
    }

    /// Sizes of the batches a runner ran.
    type Batches = Arc<Mutex<Vec<usize>>>;

    fn reverser(panic_on: Option<u8>) -> (Reverser, Batches, Arc<Mutex<()>>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Mutex::new(()));
        let runner = Reverser {
            batches: batches.clone(),
            gate: gate.clone(),
            panic_on,
        };
        (runner, batches, gate)
    }

    #[test]
    fn queued_units_of_one_module_run_as_a_batch_and_reach_their_own_replies() {
        let (runner, batches, gate) = reverser(None);
        let executor = Executor::with_runners(vec![runner], 32).unwrap();
        // A first unit teaches the thread that units are short.
        assert_eq!(
            executor.run(7, UnitRequest::new(b"ab".to_vec())).result,
            Ok(b"ba\x07".to_vec())
        );
        let held = gate.lock().unwrap();
        let (send, receive) = channel();
        // The thread takes the first unit and waits at the gate; the rest queue up behind it,
        // two modules interleaved.
        for i in 0..21u8 {
            let send = send.clone();
            let module = if i % 3 == 2 { 9 } else { 7 };
            executor
                .try_submit(module, UnitRequest::new(vec![i, 100]), move |r| {
                    send.send((i, module, r.result)).unwrap();
                })
                .unwrap();
        }
        drop(send);
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
        let mut seen = 0;
        for (i, module, result) in receive.iter() {
            assert_eq!(result, Ok(vec![100, i, module as u8]), "unit {i}");
            seen += 1;
        }
        assert_eq!(seen, 21);
        let batches = batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 22);
        assert!(
            batches.iter().any(|&n| n > 1),
            "queued units were batched: {batches:?}"
        );
    }

    #[test]
    fn a_panicking_runner_costs_the_units_it_did_not_report_and_not_the_thread() {
        let (runner, _, gate) = reverser(Some(3));
        let executor = Executor::with_runners(vec![runner], 16).unwrap();
        assert!(executor.run(1, UnitRequest::new(vec![0])).result.is_ok());
        let held = gate.lock().unwrap();
        let (send, receive) = channel();
        for i in 0..6u8 {
            let send = send.clone();
            executor
                .try_submit(1, UnitRequest::new(vec![i]), move |r| {
                    send.send((i, r.result)).unwrap();
                })
                .unwrap();
        }
        drop(send);
        drop(held);
        let mut results: Vec<_> = receive.iter().collect();
        results.sort_by_key(|(i, _)| *i);
        assert_eq!(results.len(), 6);
        // Units reported before the panic keep their results; unit 3 and those the runner had
        // not reported yet are host failures with the panic's message.
        assert!(results[3].1.is_err(), "the unit the runner choked on");
        for (i, result) in results {
            match result {
                Ok(out) => assert_eq!(out, vec![i, 1]),
                Err(UnitError::Host { detail }) => assert_eq!(detail, "runner bug", "unit {i}"),
                Err(other) => panic!("unit {i}: {other:?}"),
            }
        }
        // The thread survived.
        assert_eq!(
            executor.run(1, UnitRequest::new(vec![5])).result,
            Ok(vec![5, 1])
        );
    }

    #[test]
    fn a_panicking_reply_does_not_cost_other_units() {
        let (runner, _, gate) = reverser(None);
        let executor = Executor::with_runners(vec![runner], 16).unwrap();
        assert!(executor.run(1, UnitRequest::new(vec![0])).result.is_ok());
        let held = gate.lock().unwrap();
        let (send, receive) = channel();
        let replied = Arc::new(AtomicBool::new(false));
        for i in 0..4u8 {
            let send = send.clone();
            let replied = replied.clone();
            executor
                .try_submit(1, UnitRequest::new(vec![i]), move |r| {
                    if i == 1 {
                        replied.store(true, Ordering::SeqCst);
                        panic!("reply bug");
                    }
                    send.send((i, r.result)).unwrap();
                })
                .unwrap();
        }
        drop(send);
        drop(held);
        let mut results: Vec<_> = receive.iter().collect();
        results.sort_by_key(|(i, _)| *i);
        assert_eq!(
            results,
            vec![
                (0, Ok(vec![0, 1])),
                (2, Ok(vec![2, 1])),
                (3, Ok(vec![3, 1]))
            ]
        );
        assert!(replied.load(Ordering::SeqCst));
    }

    #[test]
    fn the_queue_stays_bounded() {
        let (runner, _, gate) = reverser(None);
        let executor = Executor::with_runners(vec![runner], 2).unwrap();
        let held = gate.lock().unwrap();
        let (send, receive) = channel();
        let submit = |i: u8| {
            let send = send.clone();
            executor.try_submit(1, UnitRequest::new(vec![i]), move |r| {
                let _ = send.send(r.result);
            })
        };
        // One unit goes to the idle thread, two wait; the fourth finds the queue full.
        let mut accepted = 0;
        for i in 0..4u8 {
            if submit(i).is_ok() {
                accepted += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(accepted, 3);
        assert_eq!(submit(9), Err(ExecutorBusy));
        drop(held);
        for _ in 0..3 {
            assert!(
                receive
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap()
                    .is_ok()
            );
        }
    }

    #[test]
    fn batch_limits_follow_the_time_per_unit() {
        assert_eq!(batch_limit(None), 1);
        assert_eq!(batch_limit(Some(Duration::from_millis(50))), 1);
        assert_eq!(batch_limit(Some(Duration::from_micros(500))), 4);
        assert_eq!(batch_limit(Some(Duration::from_micros(5))), MAX_BATCH);
        assert_eq!(batch_limit(Some(Duration::ZERO)), MAX_BATCH);
    }
}
