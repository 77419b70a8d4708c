//! Units in a separate *unit host* process.
//!
//! The in-process sandbox bounds a unit's wall-clock time with epoch checks compiled into every
//! loop, which cost up to 2.4× on tight integer loops (see `BENCHMARKS.md`). A unit host runs
//! units with those checks compiled out, and its parent bounds the time from outside: a unit
//! past its deadline gets its host process killed. A timeout is a host failure, never a result,
//! so killing loses nothing peers could vote on; it also keeps an engine crash away from the
//! volunteer's peer process. The parent restarts the host on the next unit.
//!
//! The parent and the host speak length-prefixed postcard frames over the host's stdin and
//! stdout. The host is any program that calls [`serve_unit_host`] when started with the
//! arguments given in [`UnitHostCommand`] (`worker unit-host` does).
//!
//! One frame to the host carries a *batch*: one or more units of one module, run in order.
//! Small units cost mostly the round trip, so sending several at once saves a write, a wake-up
//! of the host and a frame per unit. The host answers each unit with its own frame the moment
//! it ends, because that frame also tells the parent when the next unit's clock starts: every
//! unit keeps its own deadline, and only the unit that passes it is a timeout.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{
    Limits, LogLine, Metering, PreparedModule, Sandbox, SandboxConfig, SandboxError, UnitError,
    UnitObserver, UnitReport, UnitRequest,
};
use crate::digest::Digest;

/// Largest frame either side accepts: a module, an input or an output at their caps fit.
const MAX_FRAME: u32 = 128 << 20;

/// Time the host may take to compile a module before the unit's own clock starts.
const PREPARE_DEADLINE: Duration = Duration::from_secs(300);
/// How often the watchdog looks at a running unit's stop flag: how long a revoked unit may
/// go on using its core.
const ABORT_POLL: Duration = Duration::from_millis(20);

/// Prepared modules a host keeps.
const HOST_MODULES: usize = 64;

/// Input and checkpoint bytes one frame carries beyond its first unit. Batching pays off for
/// small units; large ones already dwarf the round trip, and keeping frames small keeps the
/// time the host spends reading one short.
const BATCH_BYTES: usize = 1 << 20;

/// Above this many payload bytes a frame asks the host to say when it has read it, so that
/// moving a large input through the pipe does not count as the unit's time.
const REPORT_START_ABOVE: usize = 64 << 10;

/// Bytes a pipe to or from a unit host holds: a 10 MiB input crosses in ten writes rather
/// than 160 of the default 64 KiB, each a wake-up of the other side.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// Asks the kernel for a pipe of [`PIPE_BYTES`]; where it allows less (an unprivileged
/// process is held to `/proc/sys/fs/pipe-max-size`, 1 MiB by default) the pipe keeps its size,
/// which is only slower.
fn widen_pipe(fd: std::os::fd::RawFd) {
    #[cfg(target_os = "linux")]
    // SAFETY: `fd` is an open pipe this process owns; F_SETPIPE_SZ reads no memory of ours and
    // fails without effect on a descriptor that is not a pipe.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_BYTES);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = fd;
}

/// A deadline far enough away to mean "never", for timeouts too large to add to an instant.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parent to host: units of one module, to run in order. The parent's side borrows the bytes;
/// the host reads the same fields into [`ReceivedBatch`].
#[derive(Serialize)]
pub(crate) struct Batch<'a> {
    pub(crate) digest: Digest,
    /// The module's bytes, sent when the host may not have it yet.
    #[serde(with = "serde_bytes")]
    pub(crate) module: Option<&'a [u8]>,
    pub(crate) metering: Metering,
    /// Send [`FromHost::Started`] once the module is ready. Without it the first unit's clock
    /// runs from when the parent sent the frame, which is right for a host that is idle and
    /// holds the module: it starts the unit as soon as it has read the frame.
    pub(crate) report_start: bool,
    pub(crate) units: Vec<BatchUnit<'a>>,
}

#[derive(Serialize)]
pub(crate) struct BatchUnit<'a> {
    /// In the frame as its length only: the bytes follow the frame (see [`write_batch`]).
    #[serde(serialize_with = "length_of")]
    pub(crate) input: &'a [u8],
    #[serde(with = "serde_bytes")]
    pub(crate) checkpoint: Option<&'a [u8]>,
    pub(crate) limits: &'a Limits,
}

fn length_of<S: serde::Serializer>(bytes: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(bytes.len() as u64)
}

/// [`Batch`]'s frame as the host reads it: the same fields in the same order, owned.
#[derive(Deserialize)]
struct BatchHead {
    digest: Digest,
    #[serde(with = "serde_bytes")]
    module: Option<Vec<u8>>,
    metering: Metering,
    report_start: bool,
    units: Vec<UnitHead>,
}

#[derive(Deserialize)]
struct UnitHead {
    input_len: u64,
    #[serde(with = "serde_bytes")]
    checkpoint: Option<Vec<u8>>,
    limits: Limits,
}

/// Input buffers of units that ended, kept for later inputs of the same length: each is
/// overwritten whole by the next input read into it, where a fresh buffer is zeroed first (or
/// faulted in page by page): on 10 MiB inputs the zeroing took about half as long as reading
/// the input from the pipe. Sweeps over a dataset cut into equal files reuse every one.
#[derive(Default)]
pub(crate) struct SpareInputs {
    /// Oldest first.
    buffers: VecDeque<Arc<[u8]>>,
}

/// Most bytes of spare input buffers a unit host keeps.
const SPARE_INPUT_BYTES: usize = 64 << 20;
/// Inputs shorter than this are not worth keeping: their zeroing is cheap.
const SPARE_AT_LEAST: usize = 64 << 10;

impl SpareInputs {
    /// A spare buffer of exactly `len` bytes, if one is kept.
    fn take(&mut self, len: usize) -> Option<Arc<[u8]>> {
        let at = self.buffers.iter().position(|b| b.len() == len)?;
        self.buffers.remove(at)
    }

    /// Bytes kept (at most `SPARE_INPUT_BYTES / SPARE_AT_LEAST` buffers to add up).
    fn bytes(&self) -> usize {
        self.buffers.iter().map(|b| b.len()).sum()
    }

    /// Keeps `buffer` if nothing else holds it and it fits the cap, letting the oldest go.
    fn keep(&mut self, buffer: Arc<[u8]>) {
        if buffer.len() < SPARE_AT_LEAST
            || buffer.len() > SPARE_INPUT_BYTES
            || Arc::strong_count(&buffer) != 1
        {
            return;
        }
        let mut kept = self.bytes();
        while kept + buffer.len() > SPARE_INPUT_BYTES {
            kept -= self.buffers.pop_front().map_or(kept, |old| old.len());
        }
        self.buffers.push_back(buffer);
    }
}

/// A whole batch as the host reads it: its frame, and the inputs that follow it.
pub(crate) struct ReceivedBatch {
    digest: Digest,
    module: Option<Vec<u8>>,
    metering: Metering,
    report_start: bool,
    units: Vec<ReceivedUnit>,
}

pub(crate) struct ReceivedUnit {
    input: Arc<[u8]>,
    checkpoint: Option<Vec<u8>>,
    limits: Limits,
}

/// Inputs at least this long are written to the pipe from where they lie; shorter ones join
/// the frame's buffer, so a batch of small units is still one write.
const DIRECT_WRITE: usize = 64 << 10;

/// Where a batch is written: the host's stdin, or a buffer in tests.
pub(crate) trait BatchOut: Write {
    /// Writes `bytes`, which stay unchanged and alive until the host has read the batch.
    fn write_large(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes)
    }
}

impl BatchOut for Vec<u8> {}

impl BatchOut for ChildStdin {
    /// On Linux the pages themselves go into the pipe (`vmsplice`): the host's read is then the
    /// only copy of a large input, where a write would copy it into the pipe first.
    #[cfg(target_os = "linux")]
    fn write_large(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.as_raw_fd();
        let mut left = bytes;
        while !left.is_empty() {
            let iov = libc::iovec {
                iov_base: left.as_ptr().cast_mut().cast(),
                iov_len: left.len(),
            };
            // SAFETY: `iov` names `left`, memory we borrow for the call, and vmsplice only reads
            // it (without SPLICE_F_GIFT the pages stay ours). The pipe then holds references to
            // those pages until the host reads them, so they must not change or be reused
            // before: the caller's bytes are an input blob, never written once complete, and
            // the caller keeps it alive for the whole round, while the host reads every input
            // of a batch before it runs the first unit. If the host dies first, nobody reads
            // what is left in the pipe.
            let n = unsafe { libc::vmsplice(fd, &iov, 1, 0) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    // Not a pipe after all: an ordinary write.
                    _ if left.len() == bytes.len()
                        && matches!(err.raw_os_error(), Some(libc::EINVAL | libc::EBADF)) =>
                    {
                        return self.write_all(bytes);
                    }
                    _ => return Err(err),
                }
            }
            let n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            left = left.get(n..).unwrap_or_default();
        }
        Ok(())
    }
}

/// Writes a batch: its frame, then every unit's input bytes in order. A large input goes to the
/// pipe straight from the worker's copy of it, not through a frame buffer.
pub(crate) fn write_batch(out: &mut impl BatchOut, batch: &Batch<'_>) -> std::io::Result<()> {
    let mut bytes = frame_bytes(batch)?;
    for unit in &batch.units {
        if unit.input.len() >= DIRECT_WRITE {
            out.write_all(&bytes)?;
            bytes.clear();
            out.write_large(unit.input)?;
        } else {
            bytes.extend_from_slice(unit.input);
        }
    }
    if !bytes.is_empty() {
        out.write_all(&bytes)?;
    }
    out.flush()
}

/// Reads a batch [`write_batch`] wrote; `Ok(None)` at a clean end of stream. Each input is read
/// straight into the shared buffer the unit runs from, and the inputs of one batch together are
/// held to the frame cap.
pub(crate) fn read_batch(
    input: &mut impl Read,
    spare: &mut SpareInputs,
) -> std::io::Result<Option<ReceivedBatch>> {
    let Some(head) = read_frame::<BatchHead>(input)? else {
        return Ok(None);
    };
    let mut left = u64::from(MAX_FRAME);
    let mut units = Vec::with_capacity(head.units.len());
    for unit in head.units {
        left = left
            .checked_sub(unit.input_len)
            .ok_or_else(|| std::io::Error::other("a batch's inputs are over the cap"))?;
        // Within the cap, so it fits a usize.
        let len = usize::try_from(unit.input_len).map_err(std::io::Error::other)?;
        let mut bytes = spare.take(len).unwrap_or_else(|| crate::bytes::zeroed(len));
        let buffer = Arc::get_mut(&mut bytes).ok_or_else(|| std::io::Error::other("shared"))?;
        input.read_exact(buffer)?;
        units.push(ReceivedUnit {
            input: bytes,
            checkpoint: unit.checkpoint,
            limits: unit.limits,
        });
    }
    Ok(Some(ReceivedBatch {
        digest: head.digest,
        module: head.module,
        metering: head.metering,
        report_start: head.report_start,
        units,
    }))
}

impl ReceivedBatch {
    /// Hands the batch's input buffers to `spare` for later batches.
    pub(crate) fn recycle(self, spare: &mut SpareInputs) {
        for unit in self.units {
            spare.keep(unit.input);
        }
    }

    /// The batch as the parent would send it again.
    pub(crate) fn as_sent(&self) -> Batch<'_> {
        Batch {
            digest: self.digest,
            module: self.module.as_deref(),
            metering: self.metering,
            report_start: self.report_start,
            units: self
                .units
                .iter()
                .map(|unit| BatchUnit {
                    input: &unit.input,
                    checkpoint: unit.checkpoint.as_deref(),
                    limits: &unit.limits,
                })
                .collect(),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(crate) enum FromHost {
    /// The host does not hold the module and ran none of the batch; send it again with the
    /// module's bytes.
    NeedModule,
    /// The module is ready (the batch asked to be told) and the first unit's clock starts now.
    Started,
    /// The running unit logged a line.
    Log(LogLine),
    /// The running unit reported progress.
    Progress(u64, u64),
    /// The running unit saved a checkpoint.
    Checkpoint(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The running unit ended; the next unit of the batch, if any, starts now.
    Done(Box<Finished>),
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Finished {
    #[serde(with = "crate::bytes::result")]
    pub(crate) result: Result<Vec<u8>, UnitError>,
    /// The last progress the unit reported (the parent hears of it at most every
    /// [`PROGRESS_INTERVAL`](super::PROGRESS_INTERVAL) while the unit runs).
    pub(crate) progress: Option<(u64, u64)>,
    pub(crate) logs_dropped: u64,
    pub(crate) fuel_consumed: Option<u64>,
    pub(crate) elapsed: Duration,
}

/// Writes one frame with a single `write_all`: the length prefix and the body share one buffer,
/// so an unbuffered pipe sees one write per frame.
pub(crate) fn write_frame(out: &mut impl Write, message: &impl Serialize) -> std::io::Result<()> {
    out.write_all(&frame_bytes(message)?)?;
    out.flush()
}

/// A frame's bytes: the length, then the message.
fn frame_bytes(message: &impl Serialize) -> std::io::Result<Vec<u8>> {
    let mut bytes = postcard::to_extend(message, vec![0u8; 4]).map_err(std::io::Error::other)?;
    let len = u32::try_from(bytes.len() - 4)
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other("frame over the cap"))?;
    bytes[..4].copy_from_slice(&len.to_le_bytes());
    Ok(bytes)
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub(crate) fn read_frame<T: for<'de> Deserialize<'de>>(
    input: &mut impl Read,
) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes is over the cap"
        )));
    }
    // Read into spare capacity rather than a zeroed buffer: a 10 MiB input is written once.
    let mut bytes = Vec::with_capacity(len as usize);
    input.take(u64::from(len)).read_to_end(&mut bytes)?;
    if bytes.len() != len as usize {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    postcard::from_bytes(&bytes)
        .map(Some)
        .map_err(|e| std::io::Error::other(format!("malformed frame: {e}")))
}

/// The host's standard output without the standard library's line buffering, which would
/// split a frame into two writes at any newline byte in it.
#[cfg(unix)]
fn raw_stdout() -> std::io::Result<std::fs::File> {
    use std::os::fd::AsFd;
    Ok(std::io::stdout().as_fd().try_clone_to_owned()?.into())
}

/// The host's standard output without the standard library's line buffering, which would
/// split a frame into two writes at any newline byte in it.
#[cfg(windows)]
fn raw_stdout() -> std::io::Result<std::fs::File> {
    use std::os::windows::io::AsHandle;
    Ok(std::io::stdout().as_handle().try_clone_to_owned()?.into())
}

/// The host's standard output.
#[cfg(not(any(unix, windows)))]
fn raw_stdout() -> std::io::Result<std::io::Stdout> {
    Ok(std::io::stdout())
}

#[cfg(any(unix, windows))]
type HostOut = BufWriter<std::fs::File>;
#[cfg(not(any(unix, windows)))]
type HostOut = BufWriter<std::io::Stdout>;

/// The host's side: serves batches from stdin until it closes. Epoch checks are compiled out;
/// the parent enforces deadlines by killing this process.
pub fn serve_unit_host(mut config: SandboxConfig) -> Result<(), SandboxError> {
    config.epoch_deadlines = false;
    config.max_concurrent_units = 1;
    let sandbox = Sandbox::new(config)?;
    let mut modules: HashMap<(Digest, Metering), Arc<PreparedModule>> = HashMap::new();
    let mut order: VecDeque<(Digest, Metering)> = VecDeque::new();
    let io_error = |e: std::io::Error| SandboxError::Engine(format!("unit host i/o: {e}"));
    let out: Arc<Mutex<HostOut>> =
        Arc::new(Mutex::new(BufWriter::new(raw_stdout().map_err(io_error)?)));
    // Standard input is buffered already; a batch of small units arrives in one read.
    let mut input = std::io::stdin().lock();
    // The parent going away (it was killed, or it killed us mid-write) ends the host quietly:
    // there is nobody left to report to.
    let parent_gone = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::UnexpectedEof
        )
    };
    let send = |message: &FromHost| -> Result<bool, SandboxError> {
        let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
        match write_frame(&mut *out, message) {
            Ok(()) => Ok(true),
            Err(e) if parent_gone(&e) => Ok(false),
            Err(e) => Err(io_error(e)),
        }
    };
    let observer: Arc<dyn UnitObserver> = Arc::new(Forward { out: out.clone() });
    let mut spare = SpareInputs::default();
    loop {
        let batch = match read_batch(&mut input, &mut spare) {
            Ok(Some(batch)) => batch,
            Ok(None) => return Ok(()),
            Err(e) if parent_gone(&e) => return Ok(()),
            Err(e) => return Err(io_error(e)),
        };
        let key = (batch.digest, batch.metering);
        let prepared = match (modules.get(&key), batch.module) {
            (Some(prepared), _) => Ok(prepared.clone()),
            (None, None) => {
                if !send(&FromHost::NeedModule)? {
                    return Ok(());
                }
                continue;
            }
            (None, Some(bytes)) => sandbox.prepare(&bytes, batch.metering).inspect(|prepared| {
                modules.insert(key, prepared.clone());
                order.push_back(key);
                if order.len() > HOST_MODULES
                    && let Some(old) = order.pop_front()
                {
                    modules.remove(&old);
                }
            }),
        };
        if batch.report_start && !send(&FromHost::Started)? {
            return Ok(());
        }
        for unit in batch.units {
            let finished = match &prepared {
                // A refused module is every unit's outcome.
                Err(error) => Finished {
                    result: Err(error.clone()),
                    progress: None,
                    logs_dropped: 0,
                    fuel_consumed: None,
                    elapsed: Duration::ZERO,
                },
                Ok(prepared) => {
                    let report = sandbox.run(
                        prepared,
                        UnitRequest {
                            input: Arc::clone(&unit.input),
                            checkpoint: unit.checkpoint,
                            limits: unit.limits,
                            observer: Some(observer.clone()),
                            abort: None,
                        },
                    );
                    spare.keep(unit.input);
                    Finished {
                        result: report.result,
                        progress: report.progress,
                        logs_dropped: report.logs_dropped,
                        fuel_consumed: report.fuel_consumed,
                        elapsed: report.elapsed,
                    }
                }
            };
            // Sent (and flushed) at once, not at the end of the batch: the parent starts the
            // next unit's clock when it reads this.
            if !send(&FromHost::Done(Box::new(finished)))? {
                return Ok(());
            }
        }
    }
}

/// Streams a running unit's logs, progress and checkpoints to the parent.
struct Forward {
    out: Arc<Mutex<HostOut>>,
}

impl Forward {
    fn send(&self, message: &FromHost) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // A parent that stopped listening will kill this process; nothing to do here.
        let _ = write_frame(&mut *out, message);
    }
}

impl UnitObserver for Forward {
    fn log(&self, line: &LogLine) {
        self.send(&FromHost::Log(line.clone()));
    }

    fn progress(&self, done: u64, total: u64) {
        self.send(&FromHost::Progress(done, total));
    }

    fn checkpoint(&self, bytes: &[u8]) {
        self.send(&FromHost::Checkpoint(bytes.to_vec()));
    }
}

/// How to start a unit host: a program and the arguments that make it call
/// [`serve_unit_host`].
#[derive(Debug, Clone)]
pub struct UnitHostCommand {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

/// A module to run in a unit host: its bytes travel to the host once.
#[derive(Debug, Clone)]
pub struct HostedModule {
    digest: Digest,
    bytes: Arc<[u8]>,
    metering: Metering,
}

impl HostedModule {
    /// Wraps module bytes. They are checked by the host, which reports a refused module as the
    /// unit's outcome.
    pub fn new(bytes: impl Into<Arc<[u8]>>, metering: Metering) -> Self {
        let bytes = bytes.into();
        Self {
            digest: Digest::of(&bytes),
            bytes,
            metering,
        }
    }

    /// The module's content hash.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Whether `other` is the same module prepared the same way, so units of both can share a
    /// batch.
    pub(crate) fn same_as(&self, other: &HostedModule) -> bool {
        self.digest == other.digest && self.metering == other.metering
    }

    fn key(&self) -> (Digest, Metering) {
        (self.digest, self.metering)
    }
}

/// `from + after`, or a time far away when that does not fit in an instant.
fn deadline(from: Instant, after: Duration) -> Instant {
    from.checked_add(after)
        .or_else(|| from.checked_add(FAR_FUTURE))
        .unwrap_or(from)
}

/// What the watchdog thread is waiting for.
#[derive(Clone, Copy)]
enum Sleep {
    /// It is not waiting: it looks at the deadline before it waits again.
    Awake,
    /// Until this instant, or until woken.
    Until(Instant),
    /// Until woken: no deadline was armed.
    Forever,
}

/// Kills the host when the unit it runs passes its deadline. The parent's unit thread blocks
/// reading the host's output, and killing the host ends that read; so no reader thread sits
/// between the pipe and the unit thread, and a frame costs one wake-up instead of two.
struct Watchdog {
    state: Mutex<Watch>,
    wake: Condvar,
}

struct Watch {
    child: Child,
    /// When to kill the host; `None` while it is idle.
    deadline: Option<Instant>,
    /// The running unit's stop flag, looked at every [`ABORT_POLL`].
    abort: Option<super::Abort>,
    sleep: Sleep,
    /// The watchdog killed the host because the deadline passed.
    expired: bool,
    /// The watchdog killed the host because the running unit was no longer wanted.
    aborted: bool,
    /// The parent let go of the host; the watchdog thread ends.
    closed: bool,
    /// The host was stopped (SIGSTOP) at this instant and has not been continued: the time
    /// until `deadline` does not run meanwhile.
    stopped_at: Option<Instant>,
}

impl Watchdog {
    fn lock(&self) -> MutexGuard<'_, Watch> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The watchdog thread's loop.
    fn watch(&self) {
        let mut watch = self.lock();
        loop {
            watch.sleep = Sleep::Awake;
            if watch.closed {
                return;
            }
            if watch.stopped_at.is_some() {
                // A stopped unit's clock does not run; only a revocation ends it (a stopped
                // process dies of SIGKILL all the same).
                if watch.deadline.is_some()
                    && watch.abort.as_ref().is_some_and(super::Abort::is_aborted)
                {
                    let _ = watch.child.kill();
                    watch.aborted = true;
                    watch.deadline = None;
                    continue;
                }
                if watch.abort.is_some() && watch.deadline.is_some() {
                    let until = Instant::now() + ABORT_POLL;
                    watch.sleep = Sleep::Until(until);
                    watch = self
                        .wake
                        .wait_timeout(watch, ABORT_POLL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                } else {
                    watch.sleep = Sleep::Forever;
                    watch = self.wake.wait(watch).unwrap_or_else(|p| p.into_inner());
                }
                continue;
            }
            match watch.deadline {
                Some(deadline) => {
                    let now = Instant::now();
                    if watch.abort.as_ref().is_some_and(super::Abort::is_aborted) {
                        let _ = watch.child.kill();
                        watch.aborted = true;
                        watch.deadline = None;
                        continue;
                    }
                    if now >= deadline {
                        let _ = watch.child.kill();
                        watch.expired = true;
                        watch.deadline = None;
                        continue;
                    }
                    let mut wait = deadline - now;
                    if watch.abort.is_some() {
                        wait = wait.min(ABORT_POLL);
                    }
                    watch.sleep = Sleep::Until(now + wait);
                    watch = self
                        .wake
                        .wait_timeout(watch, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                None => {
                    watch.sleep = Sleep::Forever;
                    watch = self.wake.wait(watch).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    /// Sets the running unit's deadline; `false` if the host was already killed for passing an
    /// earlier one. The thread is woken only when it sleeps past the new deadline, so moving
    /// the deadline later from unit to unit costs a lock, not a wake-up.
    fn arm(&self, deadline: Instant, abort: Option<&super::Abort>) -> bool {
        let mut watch = self.lock();
        if watch.expired || watch.aborted || watch.closed {
            return false;
        }
        // Armed while stopped: continuing adds the whole stop to the deadline, so the part of
        // it before now is taken off here.
        let deadline = match watch.stopped_at {
            Some(at) => deadline.checked_sub(at.elapsed()).unwrap_or(deadline),
            None => deadline,
        };
        watch.deadline = Some(deadline);
        watch.abort = abort.cloned();
        let wake = match watch.sleep {
            Sleep::Awake => false,
            Sleep::Until(until) => deadline < until,
            Sleep::Forever => true,
        };
        drop(watch);
        if wake {
            self.wake.notify_one();
        }
        true
    }

    /// The host is idle; `false` if it was killed for passing the last deadline.
    fn disarm(&self) -> bool {
        let mut watch = self.lock();
        watch.deadline = None;
        watch.abort = None;
        !watch.expired && !watch.aborted && !watch.closed
    }

    fn expired(&self) -> bool {
        self.lock().expired
    }

    /// Stops the host (SIGSTOP) or continues it (SIGCONT). The running unit's deadline moves
    /// later by the time it was stopped: time the volunteer took back is not the unit's.
    fn set_stopped(&self, stop: bool) {
        let mut watch = self.lock();
        if watch.closed {
            return;
        }
        let now = Instant::now();
        match (stop, watch.stopped_at) {
            (true, None) => {
                signal(watch.child.id(), libc::SIGSTOP);
                watch.stopped_at = Some(now);
            }
            (false, Some(at)) => {
                signal(watch.child.id(), libc::SIGCONT);
                let stopped = now.saturating_duration_since(at);
                watch.deadline = watch.deadline.map(|d| deadline(d, stopped));
                watch.stopped_at = None;
            }
            _ => return,
        }
        drop(watch);
        self.wake.notify_one();
    }

    fn aborted(&self) -> bool {
        self.lock().aborted
    }

    /// Kills the host, collects its exit status and ends the watchdog thread. Only the first
    /// call has a status to return.
    fn close(&self) -> Option<ExitStatus> {
        let mut watch = self.lock();
        if watch.closed {
            return None;
        }
        watch.closed = true;
        let _ = watch.child.kill();
        let status = watch.child.wait().ok();
        drop(watch);
        self.wake.notify_one();
        status
    }
}

/// Sends `signal` to the unit host `pid`. Only called under the watchdog's lock before the
/// child is reaped, so the id cannot name another process.
fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) reads no memory of ours; `pid` is our own unreaped child.
    if unsafe { libc::kill(pid, signal) } != 0 {
        tracing::debug!(pid, signal, err = %std::io::Error::last_os_error(), "cannot signal a unit host");
    }
}

/// Makes the host die (SIGKILL) when the thread that started it ends, as it does when the peer
/// is killed outright: a host stopped by a suspension would not notice its pipes closing and
/// would stay behind, stopped, for good. Set in the child before it runs the program, so no
/// moment is left in which the host could be stopped without it.
fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the child between fork and exec; prctl is one system call,
        // safe to make there, and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

/// Stops and continues together every unit host started under it: a volunteer's machine is
/// taken back at once (SIGSTOP), and the units continue where they were (SIGCONT), their
/// deadlines moved by the time they were stopped. A host started while the switch is off is
/// stopped as soon as it starts.
#[derive(Debug, Clone, Default)]
pub struct HostSwitch(Arc<Mutex<Switch>>);

#[derive(Debug, Default)]
struct Switch {
    stopped: bool,
    hosts: Vec<std::sync::Weak<Watchdog>>,
}

impl HostSwitch {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Switch> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops (`true`) or continues (`false`) every live unit host under this switch.
    pub fn set_stopped(&self, stop: bool) {
        let mut switch = self.lock();
        switch.stopped = stop;
        switch.hosts.retain(|h| h.strong_count() > 0);
        for host in switch.hosts.iter().filter_map(std::sync::Weak::upgrade) {
            host.set_stopped(stop);
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    fn register(&self, host: &Arc<Watchdog>) {
        let mut switch = self.lock();
        switch.hosts.retain(|h| h.strong_count() > 0);
        switch.hosts.push(Arc::downgrade(host));
        if switch.stopped {
            host.set_stopped(true);
        }
    }
}

struct Running {
    pid: u32,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    watchdog: Arc<Watchdog>,
    /// Modules whose bytes this host was sent, oldest first, as many as it keeps: units of
    /// these go without the bytes (the host asks if it dropped one); units of others go with
    /// them, which saves a round trip.
    sent: VecDeque<(Digest, Metering)>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.watchdog.close();
    }
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// The parent's handle on one unit host process, started on first use and restarted after a
/// kill or a crash. Runs one unit at a time, and can hand it several units of one module at
/// once ([`UnitHost::run_batch`]).
#[derive(Debug)]
pub struct UnitHost {
    command: UnitHostCommand,
    running: Option<Running>,
    /// A batch is under way. Still set when the next one begins means the last was abandoned
    /// half-way (a report callback panicked), and the host's pending frames belong to nobody.
    in_batch: bool,
    /// Stops and continues this host with the others of its peer.
    switch: Option<HostSwitch>,
}

impl Drop for UnitHost {
    fn drop(&mut self) {
        self.stop();
    }
}

fn host_failure(detail: impl Into<String>) -> UnitError {
    UnitError::Host {
        detail: detail.into(),
    }
}

/// Input and checkpoint bytes a unit adds to a frame.
fn payload(request: &UnitRequest) -> usize {
    request.input.len() + request.checkpoint.as_ref().map_or(0, Vec::len)
}

/// How one frame's worth of units ended.
enum RoundEnd {
    /// Every unit was reported.
    Finished,
    /// The host lacked the module and ran nothing: send the units again with its bytes.
    Resend,
    /// The host died or broke the protocol while running the unit at `at`; the units before it
    /// were reported.
    Lost {
        at: usize,
        /// When that unit's clock started; `None` while the module was being prepared.
        clock: Option<Instant>,
        /// What it said before the host went.
        partial: Box<UnitReport>,
        why: String,
    },
    /// The host was killed at the last unit's deadline right after the unit at `at - 1` ended;
    /// the units from `at` on have not run to an end and go to a fresh host.
    KilledBetween { at: usize },
}

impl UnitHost {
    /// A handle that starts `command` when the first unit arrives.
    pub fn new(command: UnitHostCommand) -> Self {
        Self {
            command,
            running: None,
            in_batch: false,
            switch: None,
        }
    }

    /// A handle like [`UnitHost::new`] whose host processes `switch` stops and continues.
    pub fn with_switch(command: UnitHostCommand, switch: HostSwitch) -> Self {
        let mut host = Self::new(command);
        host.switch = Some(switch);
        host
    }

    /// The host's process id, while one runs.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.pid)
    }

    fn start(&mut self) -> std::io::Result<&mut Running> {
        if self.running.is_none() {
            let mut command = Command::new(&self.command.program);
            command
                .args(&self.command.args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            die_with_parent(&mut command);
            let mut child = command.spawn()?;
            let pid = child.id();
            let stdin = child.stdin.take();
            let stdout = child.stdout.take();
            for fd in [
                stdin.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
                stdout.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
            ]
            .into_iter()
            .flatten()
            {
                widen_pipe(fd);
            }
            let watchdog = Arc::new(Watchdog {
                state: Mutex::new(Watch {
                    child,
                    deadline: None,
                    abort: None,
                    sleep: Sleep::Awake,
                    expired: false,
                    aborted: false,
                    closed: false,
                    stopped_at: None,
                }),
                wake: Condvar::new(),
            });
            let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
                watchdog.close();
                return Err(std::io::Error::other("the unit host has no pipes"));
            };
            let watching = watchdog.clone();
            if let Err(e) = std::thread::Builder::new()
                .name("cf-unit-host-watchdog".into())
                .spawn(move || watching.watch())
            {
                watchdog.close();
                return Err(e);
            }
            if let Some(switch) = &self.switch {
                switch.register(&watchdog);
            }
            self.running = Some(Running {
                pid,
                stdin,
                stdout: BufReader::new(stdout),
                watchdog,
                sent: VecDeque::new(),
            });
        }
        self.running
            .as_mut()
            .ok_or_else(|| std::io::Error::other("unit host did not start"))
    }

    /// Kills the host process, if one runs.
    pub fn stop(&mut self) {
        // Dropping the handle kills the process and ends its watchdog.
        self.running = None;
    }

    /// Runs one unit in the host, killing the host if the unit passes its deadline.
    pub fn run(&mut self, module: &HostedModule, request: UnitRequest) -> UnitReport {
        let mut report = None;
        self.run_batch(module, vec![request], |_, r| report = Some(r));
        report.unwrap_or_else(|| UnitReport::refused(host_failure("the unit host sent no result")))
    }

    /// Runs units of one module in order, sending them to the host in as few frames as their
    /// sizes allow, and hands each report to `report` with the unit's index in `requests` as
    /// soon as the unit ends.
    ///
    /// Every unit keeps its own deadline, counted from when the host starts it. A unit past its
    /// deadline gets the host killed and is reported as a timeout; the units after it have not
    /// run and go to a fresh host. A host that dies otherwise costs the unit it was running.
    pub fn run_batch(
        &mut self,
        module: &HostedModule,
        requests: Vec<UnitRequest>,
        mut report: impl FnMut(usize, UnitReport),
    ) {
        if self.in_batch {
            self.stop();
        }
        self.in_batch = true;
        let mut pending: VecDeque<(usize, UnitRequest)> =
            requests.into_iter().enumerate().collect();
        while !pending.is_empty() {
            let mut round = Vec::new();
            let mut bytes = 0;
            while let Some((_, next)) = pending.front() {
                let size = payload(next);
                if !round.is_empty() && bytes + size > BATCH_BYTES {
                    break;
                }
                bytes += size;
                round.extend(pending.pop_front());
            }
            // Every round reports at least one unit, or resends once with the module's bytes,
            // or moves to a fresh host; so this loop ends.
            let retry = self.run_round(module, round, &mut report);
            for unit in retry.into_iter().rev() {
                pending.push_front(unit);
            }
        }
        self.in_batch = false;
    }

    /// Sends one frame of units and collects their reports; returns the units to run again.
    fn run_round(
        &mut self,
        module: &HostedModule,
        mut round: Vec<(usize, UnitRequest)>,
        report: &mut impl FnMut(usize, UnitReport),
    ) -> Vec<(usize, UnitRequest)> {
        let running = match self.start() {
            Ok(running) => running,
            Err(e) => {
                for (index, _) in round {
                    report(
                        index,
                        UnitReport::refused(host_failure(format!("cannot start a unit host: {e}"))),
                    );
                }
                return Vec::new();
            }
        };
        match drive(running, module, &round, report) {
            RoundEnd::Finished => Vec::new(),
            RoundEnd::Resend => round,
            RoundEnd::KilledBetween { at } => {
                self.stop();
                round.split_off(at)
            }
            RoundEnd::Lost {
                at,
                clock,
                mut partial,
                why,
            } => {
                let expired = self.running.as_ref().is_some_and(|r| r.watchdog.expired());
                let aborted = self.running.as_ref().is_some_and(|r| r.watchdog.aborted());
                let status = self.running.take().and_then(|r| r.watchdog.close());
                let rest = round.split_off(at + 1);
                let Some((index, request)) = round.pop() else {
                    return rest;
                };
                partial.result = Err(match (expired, clock) {
                    _ if aborted => super::aborted_error(),
                    (true, Some(_)) => UnitError::Timeout {
                        limit: request.limits.timeout,
                    },
                    (true, None) => {
                        host_failure("the unit host took too long to prepare the module")
                    }
                    (false, _) => match status {
                        Some(status) => host_failure(format!("the unit host {why} ({status})")),
                        None => host_failure(format!("the unit host {why}")),
                    },
                });
                if let Some(clock) = clock {
                    partial.elapsed = clock.elapsed();
                }
                report(index, *partial);
                rest
            }
        }
    }
}

/// Runs one frame of units on a started host: writes the frame, then reads the host's frames
/// until every unit has ended or the host is gone.
fn drive(
    running: &mut Running,
    module: &HostedModule,
    round: &[(usize, UnitRequest)],
    report: &mut impl FnMut(usize, UnitReport),
) -> RoundEnd {
    let key = module.key();
    let send_module = !running.sent.contains(&key);
    let bytes = round.iter().map(|(_, r)| payload(r)).sum::<usize>()
        + if send_module { module.bytes.len() } else { 0 };
    let report_start = send_module || bytes > REPORT_START_ABOVE;
    let fresh = || UnitReport::refused(host_failure("the unit host sent no result"));
    let lost = |at, clock, partial, why: String| RoundEnd::Lost {
        at,
        clock,
        partial: Box::new(partial),
        why,
    };
    let Some((_, first)) = round.first() else {
        return RoundEnd::Finished;
    };
    let now = Instant::now();
    // Until the host says the module is ready, compile time is not the unit's time.
    let mut clock = (!report_start).then_some(now);
    let first_deadline = match clock {
        Some(now) => deadline(now, first.limits.timeout),
        None => deadline(now, PREPARE_DEADLINE),
    };
    if !running.watchdog.arm(first_deadline, first.abort.as_ref()) {
        // Killed after the last frame was read: nothing of this round ran.
        return RoundEnd::KilledBetween { at: 0 };
    }
    if send_module {
        running.sent.push_back(key);
        if running.sent.len() > HOST_MODULES {
            running.sent.pop_front();
        }
    }
    let frame = Batch {
        digest: module.digest,
        module: send_module.then_some(&module.bytes[..]),
        metering: module.metering,
        report_start,
        units: round
            .iter()
            .map(|(_, r)| BatchUnit {
                input: &r.input[..],
                checkpoint: r.checkpoint.as_deref(),
                limits: &r.limits,
            })
            .collect(),
    };
    if let Err(e) = write_batch(&mut running.stdin, &frame) {
        return lost(0, clock, fresh(), format!("stopped taking units: {e}"));
    }
    drop(frame);
    let mut at = 0;
    // The host began on the batch, so it holds the module.
    let mut started = false;
    let mut current = fresh();
    loop {
        let Some((index, request)) = round.get(at) else {
            return RoundEnd::Finished;
        };
        let event = match read_frame::<FromHost>(&mut running.stdout) {
            Ok(Some(event)) => event,
            Ok(None) => return lost(at, clock, current, "exited".into()),
            Err(e) => return lost(at, clock, current, format!("broke the protocol: {e}")),
        };
        match event {
            FromHost::NeedModule if at == 0 && !started && !send_module => {
                // The host dropped the module since it was sent: forget that it has it.
                running.sent.retain(|k| *k != key);
                if !running.watchdog.disarm() {
                    return RoundEnd::KilledBetween { at: 0 };
                }
                return RoundEnd::Resend;
            }
            FromHost::Started if at == 0 && clock.is_none() => {
                let now = Instant::now();
                if !running.watchdog.arm(
                    deadline(now, request.limits.timeout),
                    request.abort.as_ref(),
                ) {
                    // Killed at the preparation deadline as the start came in.
                    return lost(at, None, current, "was killed".into());
                }
                clock = Some(now);
                started = true;
            }
            FromHost::Log(mut line) => {
                line.text = crate::text::escape_controls(&line.text).into_owned();
                if let Some(o) = &request.observer {
                    o.log(&line);
                }
                current.logs.push(line);
            }
            FromHost::Progress(done, total) => {
                if let Some(o) = &request.observer {
                    o.progress(done, total);
                }
                current.progress = Some((done, total));
            }
            FromHost::Checkpoint(bytes) => {
                if let Some(o) = &request.observer {
                    o.checkpoint(&bytes);
                }
                current.checkpoint = Some(bytes);
            }
            FromHost::Done(finished) => {
                let Finished {
                    result,
                    progress,
                    logs_dropped,
                    fuel_consumed,
                    elapsed,
                } = *finished;
                let mut ended = std::mem::replace(&mut current, fresh());
                // The host is our own process, but a module may have crashed into it.
                ended.result = result.map_err(UnitError::bounded);
                ended.progress = progress.or(ended.progress);
                ended.logs_dropped = logs_dropped;
                ended.fuel_consumed = fuel_consumed;
                ended.elapsed = elapsed;
                let index = *index;
                at += 1;
                started = true;
                // The next unit's clock starts now: the host went on to it as it sent this.
                let alive = match round.get(at) {
                    Some((_, next)) => {
                        let now = Instant::now();
                        clock = Some(now);
                        running
                            .watchdog
                            .arm(deadline(now, next.limits.timeout), next.abort.as_ref())
                    }
                    None => running.watchdog.disarm(),
                };
                report(index, ended);
                if !alive {
                    return RoundEnd::KilledBetween { at };
                }
            }
            FromHost::NeedModule => {
                return lost(at, clock, current, "asked for a module it was sent".into());
            }
            FromHost::Started => {
                return lost(
                    at,
                    clock,
                    current,
                    "broke the protocol: an unexpected start".into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_reads_back_as_the_host_expects() {
        let limits = Limits {
            timeout: Duration::from_millis(250),
            ..Limits::default()
        };
        let batch = Batch {
            digest: Digest::of(b"module"),
            module: Some(b"\0asm"),
            metering: Metering::Fuel,
            report_start: true,
            units: vec![
                BatchUnit {
                    input: b"first",
                    checkpoint: None,
                    limits: &limits,
                },
                BatchUnit {
                    input: b"",
                    checkpoint: Some(b"saved"),
                    limits: &limits,
                },
            ],
        };
        let mut wire = Vec::new();
        write_batch(&mut wire, &batch).unwrap();
        let read = read_batch(&mut &wire[..], &mut SpareInputs::default())
            .unwrap()
            .unwrap();
        assert_eq!(read.digest, batch.digest);
        assert_eq!(read.module.as_deref(), Some(&b"\0asm"[..]));
        assert_eq!(read.metering, Metering::Fuel);
        assert!(read.report_start);
        assert_eq!(read.units.len(), 2);
        assert_eq!(&read.units[0].input[..], b"first");
        assert_eq!(read.units[0].checkpoint, None);
        assert_eq!(read.units[1].checkpoint.as_deref(), Some(&b"saved"[..]));
        assert_eq!(read.units[1].limits, limits);
    }

    #[test]
    fn a_spare_buffer_is_reused_only_for_an_input_of_its_length_and_overwritten_whole() {
        let limits = Limits::default();
        let wire_of = |inputs: &[&[u8]]| {
            let batch = Batch {
                digest: Digest::of(b"module"),
                module: None,
                metering: Metering::Off,
                report_start: false,
                units: inputs
                    .iter()
                    .map(|input| BatchUnit {
                        input,
                        checkpoint: None,
                        limits: &limits,
                    })
                    .collect(),
            };
            let mut wire = Vec::new();
            write_batch(&mut wire, &batch).unwrap();
            wire
        };
        let (a, b, c) = (
            vec![1u8; SPARE_AT_LEAST],
            vec![2u8; SPARE_AT_LEAST],
            vec![3u8; SPARE_AT_LEAST + 1],
        );
        let mut spare = SpareInputs::default();
        let first = read_batch(&mut &wire_of(&[&a])[..], &mut spare)
            .unwrap()
            .unwrap();
        let at = Arc::as_ptr(&first.units[0].input).cast::<u8>();
        // Still held elsewhere (a unit's state could outlive it): not kept.
        let held = Arc::clone(&first.units[0].input);
        first.recycle(&mut spare);
        assert_eq!(spare.buffers.len(), 0);
        spare.keep(held);
        assert_eq!(spare.buffers.len(), 1);
        // Another length gets a buffer of its own; the same length gets the kept one, with
        // every byte the new input's.
        let longer = read_batch(&mut &wire_of(&[&c])[..], &mut spare)
            .unwrap()
            .unwrap();
        assert_ne!(Arc::as_ptr(&longer.units[0].input).cast::<u8>(), at);
        assert_eq!(&longer.units[0].input[..], &c[..]);
        let second = read_batch(&mut &wire_of(&[&b])[..], &mut spare)
            .unwrap()
            .unwrap();
        assert_eq!(Arc::as_ptr(&second.units[0].input).cast::<u8>(), at);
        assert_eq!(&second.units[0].input[..], &b[..]);
        assert!(spare.buffers.is_empty());
        // Kept bytes stay under the cap, the oldest let go first.
        let oldest = crate::bytes::zeroed(SPARE_AT_LEAST);
        let oldest_at = Arc::as_ptr(&oldest).cast::<u8>();
        spare.keep(oldest);
        for _ in 0..SPARE_INPUT_BYTES / SPARE_AT_LEAST {
            spare.keep(crate::bytes::zeroed(SPARE_AT_LEAST));
        }
        assert_eq!(spare.bytes(), SPARE_INPUT_BYTES);
        // (The oldest is freed by the last keep, after every allocation: its address is not
        // reused by one of the others.)
        assert!(
            spare
                .buffers
                .iter()
                .all(|b| Arc::as_ptr(b).cast::<u8>() != oldest_at)
        );
        // Small inputs are not kept.
        spare.keep(crate::bytes::zeroed(16));
        assert!(spare.buffers.iter().all(|b| b.len() == SPARE_AT_LEAST));
    }

    #[test]
    fn frames_over_the_cap_or_cut_short_are_refused() {
        let mut wire = (MAX_FRAME + 1).to_le_bytes().to_vec();
        wire.extend_from_slice(&[0; 16]);
        assert!(read_frame::<FromHost>(&mut &wire[..]).is_err());
        let mut short = Vec::new();
        write_frame(&mut short, &FromHost::Progress(1, 2)).unwrap();
        short.pop();
        assert!(read_frame::<FromHost>(&mut &short[..]).is_err());
        assert!(read_frame::<FromHost>(&mut &[][..]).unwrap().is_none());
    }

    #[test]
    fn huge_timeouts_do_not_overflow_the_deadline() {
        let now = Instant::now();
        assert!(deadline(now, Duration::MAX) > now);
        assert_eq!(
            deadline(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }
}
