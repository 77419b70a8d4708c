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

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, sync_channel};
use std::sync::{Arc, Mutex};
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

/// Prepared modules a host keeps.
const HOST_MODULES: usize = 64;

#[derive(Serialize, Deserialize)]
enum ToHost {
    Run {
        digest: Digest,
        /// The module's bytes, sent when the host may not have it yet.
        module: Option<Vec<u8>>,
        metering: Metering,
        input: Vec<u8>,
        checkpoint: Option<Vec<u8>>,
        limits: Limits,
    },
}

#[derive(Serialize, Deserialize)]
enum FromHost {
    /// The host does not hold the module; send the run again with its bytes.
    NeedModule,
    /// The module is prepared and the unit's clock starts now.
    Started,
    Log(LogLine),
    Progress(u64, u64),
    Checkpoint(Vec<u8>),
    Done(Box<Finished>),
}

#[derive(Serialize, Deserialize)]
struct Finished {
    result: Result<Vec<u8>, UnitError>,
    logs_dropped: u64,
    fuel_consumed: Option<u64>,
    elapsed: Duration,
}

fn write_frame(out: &mut impl Write, message: &impl Serialize) -> std::io::Result<()> {
    let bytes = postcard::to_stdvec(message).map_err(std::io::Error::other)?;
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other("frame over the cap"))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&bytes)?;
    out.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
fn read_frame<T: for<'de> Deserialize<'de>>(input: &mut impl Read) -> std::io::Result<Option<T>> {
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
    let mut bytes = vec![0u8; len as usize];
    input.read_exact(&mut bytes)?;
    postcard::from_bytes(&bytes)
        .map(Some)
        .map_err(|e| std::io::Error::other(format!("malformed frame: {e}")))
}

/// The host's side: serves runs from stdin until it closes. Epoch checks are compiled out; the
/// parent enforces deadlines by killing this process.
pub fn serve_unit_host(mut config: SandboxConfig) -> Result<(), SandboxError> {
    config.epoch_deadlines = false;
    config.max_concurrent_units = 1;
    let sandbox = Sandbox::new(config)?;
    let mut modules: HashMap<(Digest, Metering), Arc<PreparedModule>> = HashMap::new();
    let mut order: VecDeque<(Digest, Metering)> = VecDeque::new();
    let out = Arc::new(Mutex::new(BufWriter::new(std::io::stdout())));
    let mut input = BufReader::new(std::io::stdin().lock());
    let io_error = |e: std::io::Error| SandboxError::Engine(format!("unit host i/o: {e}"));
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
    loop {
        let request = match read_frame(&mut input) {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(()),
            Err(e) if parent_gone(&e) => return Ok(()),
            Err(e) => return Err(io_error(e)),
        };
        let ToHost::Run {
            digest,
            module,
            metering,
            input: unit_input,
            checkpoint,
            limits,
        } = request;
        let key = (digest, metering);
        let prepared = match (modules.get(&key), module) {
            (Some(prepared), _) => Ok(prepared.clone()),
            (None, None) => {
                if !send(&FromHost::NeedModule)? {
                    return Ok(());
                }
                continue;
            }
            (None, Some(bytes)) => sandbox.prepare(&bytes, metering).inspect(|prepared| {
                modules.insert(key, prepared.clone());
                order.push_back(key);
                if order.len() > HOST_MODULES
                    && let Some(old) = order.pop_front()
                {
                    modules.remove(&old);
                }
            }),
        };
        let finished = match prepared {
            Err(error) => Finished {
                result: Err(error),
                logs_dropped: 0,
                fuel_consumed: None,
                elapsed: Duration::ZERO,
            },
            Ok(prepared) => {
                if !send(&FromHost::Started)? {
                    return Ok(());
                }
                let observer = Arc::new(Forward { out: out.clone() });
                let report = sandbox.run(
                    &prepared,
                    UnitRequest {
                        input: unit_input.into(),
                        checkpoint,
                        limits,
                        observer: Some(observer),
                    },
                );
                Finished {
                    result: report.result,
                    logs_dropped: report.logs_dropped,
                    fuel_consumed: report.fuel_consumed,
                    elapsed: report.elapsed,
                }
            }
        };
        if !send(&FromHost::Done(Box::new(finished)))? {
            return Ok(());
        }
    }
}

/// Streams a running unit's logs, progress and checkpoints to the parent.
struct Forward {
    out: Arc<Mutex<BufWriter<std::io::Stdout>>>,
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
}

struct Running {
    child: Child,
    stdin: BufWriter<ChildStdin>,
    events: Receiver<std::io::Result<Option<FromHost>>>,
}

/// The parent's handle on one unit host process, started on first use and restarted after a
/// kill or a crash. Runs one unit at a time.
#[derive(Debug)]
pub struct UnitHost {
    command: UnitHostCommand,
    running: Option<Running>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
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

impl UnitHost {
    /// A handle that starts `command` when the first unit arrives.
    pub fn new(command: UnitHostCommand) -> Self {
        Self {
            command,
            running: None,
        }
    }

    /// The host's process id, while one runs.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.child.id())
    }

    fn start(&mut self) -> std::io::Result<&mut Running> {
        if self.running.is_none() {
            let mut child = Command::new(&self.command.program)
                .args(&self.command.args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| std::io::Error::other("no stdin"))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| std::io::Error::other("no stdout"))?;
            let (send, events) = sync_channel(64);
            std::thread::Builder::new()
                .name("cf-unit-host-reader".into())
                .spawn(move || {
                    let mut stdout = BufReader::new(stdout);
                    loop {
                        let frame = read_frame::<FromHost>(&mut stdout);
                        let end = !matches!(frame, Ok(Some(_)));
                        if send.send(frame).is_err() || end {
                            return;
                        }
                    }
                })?;
            self.running = Some(Running {
                child,
                stdin: BufWriter::new(stdin),
                events,
            });
        }
        self.running
            .as_mut()
            .ok_or_else(|| std::io::Error::other("unit host did not start"))
    }

    /// Kills the host process, if one runs.
    pub fn stop(&mut self) {
        if let Some(mut running) = self.running.take() {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }

    /// The host died or broke the protocol: collect its exit status for the report.
    fn lost(&mut self, what: &str) -> UnitError {
        let status = self.running.take().map(|mut r| {
            let _ = r.child.kill();
            r.child.wait()
        });
        match status {
            Some(Ok(status)) => host_failure(format!("the unit host {what} ({status})")),
            _ => host_failure(format!("the unit host {what}")),
        }
    }

    /// Runs one unit in the host, killing the host if the unit passes its deadline.
    pub fn run(&mut self, module: &HostedModule, request: UnitRequest) -> UnitReport {
        let UnitRequest {
            input,
            checkpoint,
            limits,
            observer,
        } = request;
        // Filled in as the host's events arrive; the result is always set before returning.
        let mut report = UnitReport::refused(host_failure("the unit host sent no result"));
        let timeout = limits.timeout;
        let started = Instant::now();
        let mut message = ToHost::Run {
            digest: module.digest,
            module: None,
            metering: module.metering,
            input: input.to_vec(),
            checkpoint,
            limits,
        };
        // Until the host says the module is prepared, compile time is not the unit's time.
        let mut deadline = started + PREPARE_DEADLINE;
        let mut unit_started = None;
        loop {
            let running = match self.start() {
                Ok(r) => r,
                Err(e) => {
                    report.result = Err(host_failure(format!("cannot start a unit host: {e}")));
                    return report;
                }
            };
            if let Err(e) = write_frame(&mut running.stdin, &message) {
                report.result = Err(self.lost(&format!("stopped taking units: {e}")));
                return report;
            }
            let event = loop {
                let now = Instant::now();
                let Some(left) = deadline.checked_duration_since(now) else {
                    self.stop();
                    report.result = Err(match unit_started {
                        Some(_) => UnitError::Timeout { limit: timeout },
                        None => host_failure("the unit host took too long to prepare the module"),
                    });
                    report.elapsed = started.elapsed();
                    return report;
                };
                let Some(running) = self.running.as_mut() else {
                    report.result = Err(host_failure("the unit host is gone"));
                    return report;
                };
                match running.events.recv_timeout(left) {
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) | Ok(Ok(None)) => {
                        report.result = Err(self.lost("exited"));
                        return report;
                    }
                    Ok(Err(e)) => {
                        report.result = Err(self.lost(&format!("broke the protocol: {e}")));
                        return report;
                    }
                    Ok(Ok(Some(FromHost::Started))) => {
                        let now = Instant::now();
                        unit_started = Some(now);
                        deadline = now + timeout;
                    }
                    Ok(Ok(Some(FromHost::Log(line)))) => {
                        if let Some(o) = &observer {
                            o.log(&line);
                        }
                        report.logs.push(line);
                    }
                    Ok(Ok(Some(FromHost::Progress(done, total)))) => {
                        if let Some(o) = &observer {
                            o.progress(done, total);
                        }
                        report.progress = Some((done, total));
                    }
                    Ok(Ok(Some(FromHost::Checkpoint(bytes)))) => {
                        if let Some(o) = &observer {
                            o.checkpoint(&bytes);
                        }
                        report.checkpoint = Some(bytes);
                    }
                    Ok(Ok(Some(other @ (FromHost::NeedModule | FromHost::Done(_))))) => {
                        break other;
                    }
                }
            };
            match event {
                FromHost::Done(finished) => {
                    report.result = finished.result;
                    report.logs_dropped = finished.logs_dropped;
                    report.fuel_consumed = finished.fuel_consumed;
                    report.elapsed = finished.elapsed;
                    return report;
                }
                _ => {
                    // The host lacks the module: send the same run with its bytes.
                    let ToHost::Run { module: m, .. } = &mut message;
                    if m.is_some() {
                        report.result = Err(self.lost("asked twice for a module it was sent"));
                        return report;
                    }
                    *m = Some(module.bytes.to_vec());
                }
            }
        }
    }
}
