//! Dedicated threads that run units, as many as the cores the peer donates.
//!
//! WebAssembly runs synchronously; giving it its own threads keeps it away from the async
//! runtime and lets each thread have the stack headroom host frames need beyond the wasm stack.
//! Each thread owns one [`UnitRunner`]: the in-process [`Sandbox`] or a [`UnitHost`] process.
//! The queue in front of the threads is bounded: a full queue is reported, never grown.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::host::{HostedModule, UnitHost, UnitHostCommand};
use super::{PreparedModule, Sandbox, SandboxError, UnitError, UnitReport, UnitRequest};

/// Stack of a unit thread: the 512 KiB wasm stack plus generous room for host frames.
const THREAD_STACK: usize = 8 << 20;

/// Something a unit thread runs units with.
pub trait UnitRunner: Send + 'static {
    /// The module form this runner takes.
    type Module: Send + 'static;
    /// Runs one unit to its end.
    fn run_unit(&mut self, module: &Self::Module, request: UnitRequest) -> UnitReport;
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

/// A bounded pool of unit threads, each with its own runner.
pub struct Executor<R: UnitRunner = Sandbox> {
    queue: Option<SyncSender<Task<R::Module>>>,
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
    /// started from `command` on first use.
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
}

impl<R: UnitRunner> Executor<R> {
    /// One unit thread per runner.
    pub fn with_runners(runners: Vec<R>, queue_depth: usize) -> Result<Self, SandboxError> {
        let (queue, receiver) = sync_channel::<Task<R::Module>>(queue_depth);
        let receiver = Arc::new(Mutex::new(receiver));
        let mut handles = Vec::with_capacity(runners.len());
        for (index, runner) in runners.into_iter().enumerate() {
            let receiver = receiver.clone();
            let handle = std::thread::Builder::new()
                .name(format!("cf-unit-{index}"))
                .stack_size(THREAD_STACK)
                .spawn(move || serve(runner, &receiver))
                .map_err(SandboxError::Thread)?;
            handles.push(handle);
        }
        Ok(Self {
            queue: Some(queue),
            threads: handles,
        })
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
        let Some(queue) = &self.queue else {
            return Err(ExecutorBusy);
        };
        match queue.try_send(task) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(ExecutorBusy),
        }
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
        let Some(queue) = &self.queue else {
            return stopped();
        };
        if queue.send(task).is_err() {
            return stopped();
        }
        receive.recv().unwrap_or_else(|_| stopped())
    }
}

impl<R: UnitRunner> Drop for Executor<R> {
    fn drop(&mut self) {
        // Closing the queue lets every thread finish its unit and exit.
        self.queue = None;
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn serve<R: UnitRunner>(mut runner: R, receiver: &Mutex<Receiver<Task<R::Module>>>) {
    loop {
        let task = {
            let receiver = receiver.lock().unwrap_or_else(|p| p.into_inner());
            match receiver.recv() {
                Ok(task) => task,
                Err(_) => return,
            }
        };
        let Task {
            module,
            request,
            reply,
        } = task;
        // A bug in host code must cost one unit, not the thread.
        let report = catch_unwind(AssertUnwindSafe(|| runner.run_unit(&module, request)))
            .unwrap_or_else(|panic| {
                let detail = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a host panic".into());
                UnitReport::refused(UnitError::Host { detail })
            });
        reply(report);
    }
}
