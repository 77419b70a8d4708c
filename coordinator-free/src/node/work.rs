//! The worker side of jobs: leases from submitters run here.
//!
//! One task owns the [`Intake`] (which shares this peer's slots among submitters), the job
//! links submitters opened to this peer, the blobs being fetched and the executor's answers.
//! An offer's leases wait until the job's module and every input they name are here (fetched
//! from the submitter in chunks and checked against their digests), then join the intake; what
//! the intake starts runs on the executor's unit threads, and answers go back to the submitter
//! in batched reports that carry the output bytes.
//!
//! Everything a submitter sends is bounded: jobs per peer, leases waiting for blobs, blobs in
//! flight and blob bytes cached, results waiting for their report. What does not fit is
//! declined, never queued without bound.
//!
//! The task also owns the peer's [`Suspension`]: while any reason holds, the unit hosts are
//! stopped (SIGSTOP, their deadlines frozen), nothing starts, offers are declined, no
//! submitter is pulled, the reports ask for no lease and the advert shows no free core. A
//! held lease whose slack the suspension has used up is handed back (declined, its stopped
//! unit killed) so its submitter re-issues it at once: see [`Work::hand_back`].

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use quinn::VarInt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

mod resize;

use super::modules::{ModuleCache, ModuleKey};
use super::outbox::{Outbox, OutboxError, write_loop};
use crate::conditions::DutyCycle;
use crate::control::PauseChange;
use crate::digest::Digest;
use crate::host::Host;
use crate::job::proto::{InputRef, JobFrame, JobSpec, Offer, SEND_CHUNK, WireLease, WireResult};
use crate::ledger::{Ledger, today};
use crate::net::{LinkKind, PeerLink, close};
use crate::peer_id::PeerId;
use crate::relay::RelayRef;
use crate::sandbox::{
    Abort, Executor, HostSwitch, HostedModule, Metering, OutcomeClass, PROFILE, PreparedModule,
    Sandbox, SandboxConfig, SandboxError, UnitError, UnitHost, UnitHostCommand, UnitRequest,
};
use crate::schedule::{Intake, IntakeCommand, IntakeConfig, IntakeEvent, Lease, LeaseId};
use crate::suspend::{Pause, Reason, Suspension, Transition};
use crate::validate::Outcome;
use crate::wire;

/// Inputs queued for the work task from all job links and unit threads together.
const INPUT_QUEUE: usize = 1024;
/// Frames queued for one job link's writer.
const OUTBOX: usize = 256;
/// Bytes queued for one job link's writer (reports carry outputs of up to 4 MiB).
const OUTBOX_BYTES: u32 = 16 << 20;
/// Frames and bytes queued for a blob link's writer: a fetcher that stops reading pins this
/// much, and the link closes once a write stalls for the write timeout.
const BLOB_OUTBOX: usize = 4;
const BLOB_OUTBOX_BYTES: u32 = 4 << 20;
/// Blob links served at once, in all and per fetching host: holding blobs for others is a
/// favour, and a fetcher needs one link at a time.
const MAX_BLOB_LINKS: usize = 8;
const MAX_BLOB_LINKS_PER_HOST: usize = 2;
/// Most jobs known at once (across submitters).
const MAX_JOBS: usize = 64;
/// Most jobs one submitter may have here at once, and all the submitters of one host.
const MAX_JOBS_PER_SUBMITTER: usize = 8;
const MAX_JOBS_PER_HOST: usize = 16;
/// Most leases of one job waiting for blobs.
const MAX_WAITING_PER_JOB: usize = 1024;
/// Most leases held here at once, waiting for blobs or queued for a slot. With inline inputs
/// of at most 16 KiB this bounds the memory submitters can make a worker hold.
const MAX_HELD_LEASES: usize = 8192;
/// Most leases the submitters of one host hold here: a host with many keys gets a quarter of
/// the worker at most, and honest submitters elsewhere still find room.
const MAX_HELD_PER_HOST: usize = MAX_HELD_LEASES / 4;
/// A blob fetch that has made no progress (no chunk arrived) in this time is given up, so a
/// submitter that never answers cannot hold a fetch slot forever, while a large blob over a
/// slow path may take as long as it keeps arriving.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Most blobs fetched at once, in all, for one submitter, and for the submitters of one host:
/// a submitter that never answers stalls its own fetches, not everyone's.
const MAX_FETCHES: usize = 16;
const MAX_FETCHES_PER_SUBMITTER: usize = 2;
const MAX_FETCHES_PER_HOST: usize = 4;
/// Input blob bytes kept after use.
const BLOB_CACHE_BYTES: usize = 128 << 20;
/// Modules kept ready (each under the metering its jobs need), and most of them made for one
/// submitter while others wait: a submitter cycling through modules evicts its own first.
const MODULE_CACHE: usize = 16;
const MODULE_SHARE: usize = 4;
/// How long a finished execution's answer waits for its report before it is dropped.
const ANSWER_TTL: Duration = Duration::from_secs(120);
/// Longest a unit may run (the longest timeout a job may ask for).
const MAX_UNIT_TIME: Duration = Duration::from_millis(crate::job::proto::MAX_TIMEOUT_MS);
/// How often stale state is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Report frames carry at most this many output bytes; larger reports are split.
const REPORT_BYTES: usize = 6 << 20;
/// Work queued per slot that the prefetch aims at: enough to cover a round trip to the
/// submitter many times over, little enough that a slow peer does not sit on units others
/// could run.
const QUEUE_TARGET: Duration = Duration::from_millis(50);
/// Most leases queued per slot and submitter (units of a few microseconds).
const MAX_PREFETCH_PER_SLOT: u32 = 256;
/// Leases queued per slot before any unit's running time is known.
const FIRST_PREFETCH_PER_SLOT: u32 = 2;
/// How often an idle worker looks for submitters that have not reached it.
const PULL_EVERY: Duration = Duration::from_secs(1);
/// How long a submitter advertises its job before an idle worker it has not reached dials it:
/// a submitter dials the workers it can reach within a fraction of this.
const PULL_DELAY: Duration = Duration::from_millis(1500);
/// How long before a worker dials the same submitter again.
const PULL_RETRY: Duration = Duration::from_secs(10);
/// Most submitters dialed in one pass.
const PULLS_PER_PASS: usize = 4;
/// Memory per slot when the peer does not say: what `worker run` offers per donated core.
pub const DEFAULT_MEMORY_PER_SLOT: u64 = 512 << 20;
/// Longest unit accepted when the peer does not say: a day.
pub const DEFAULT_MAX_UNIT_TIME: Duration = Duration::from_secs(86_400);
/// Units shorter than this are started several per slot at once, so the executor can hand
/// them to a unit host in batches (one round trip to the host per batch instead of per unit).
const SHORT_UNIT: Duration = Duration::from_millis(1);
/// How many units per slot are started at once when units are short.
const SHORT_UNITS_PER_SLOT: u32 = 16;
/// How often a suspended worker looks for held leases whose slack is used up.
const HAND_BACK_EVERY: Duration = Duration::from_millis(500);

/// How this peer runs units.
#[derive(Debug, Clone)]
pub enum WorkRunner {
    /// Unit host processes (the production path), one per slot.
    UnitHosts(UnitHostCommand),
    /// Threads in this process with epoch deadlines (tests and embedded use).
    InProcess(SandboxConfig),
}

/// A peer's offer to run other peers' units.
#[derive(Debug, Clone)]
pub struct WorkConfig {
    pub runner: WorkRunner,
    /// Units run at once: the cores donated.
    pub slots: u32,
    /// Most leases queued per submitter beyond the running ones. The queue asked for is sized
    /// from the units' running time up to this cap, so tiny units are not starved by round
    /// trips.
    pub prefetch: u32,
    /// Most linear memory one unit may have here, in bytes: the memory the peer offers divided
    /// by its slots. Jobs that ask for more are declined, so a submitter cannot make the
    /// volunteer's machine swap.
    pub memory_per_slot: u64,
    /// Longest wall-clock limit a unit may ask for here. Jobs whose units may run longer are
    /// declined, so the submitter offers them elsewhere: a volunteer decides how long one unit
    /// may hold a core.
    pub max_unit_time: Duration,
    /// Test hook: every output this peer reports is altered, as a lying peer would.
    #[doc(hidden)]
    pub tamper: bool,
    /// Test hook: outputs are altered while this is set, so a test can make an honest peer
    /// turn liar once it has earned trust.
    #[doc(hidden)]
    pub tamper_switch: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The data directory: its pause file (`suspend::PAUSE_FILE`) records the user's pause
    /// (read at start, written on every pause and resume) and its ledger what this peer gave
    /// (`ledger::LEDGER_FILE`). `None`: pauses last until the peer stops, and nothing is kept.
    pub data_dir: Option<PathBuf>,
}

impl WorkConfig {
    /// `slots` unit hosts started by `command`, with a prefetch of a few batches.
    pub fn new(runner: WorkRunner, slots: u32) -> Self {
        let slots = slots.max(1);
        Self {
            runner,
            slots,
            prefetch: MAX_PREFETCH_PER_SLOT * slots,
            memory_per_slot: DEFAULT_MEMORY_PER_SLOT,
            max_unit_time: DEFAULT_MAX_UNIT_TIME,
            tamper: false,
            tamper_switch: None,
            data_dir: None,
        }
    }
}

/// Suspends and resumes a peer's donated work for one [`Reason`] at a time: what watches the
/// machine (idle, battery, time windows, load, heat) holds one and says when its condition
/// starts and stops. The work resumes once no reason holds.
#[derive(Debug, Clone)]
pub struct SuspendSwitch {
    work: mpsc::Sender<WorkInput>,
}

impl SuspendSwitch {
    pub(super) fn new(work: mpsc::Sender<WorkInput>) -> Self {
        Self { work }
    }

    /// `reason` holds (`on`) or no longer does. Waits for room in the work task's queue, so
    /// no change is lost and changes apply in the order made.
    pub async fn set(&self, reason: Reason, on: bool) -> Result<(), super::NodeError> {
        self.work
            .send(WorkInput::SetSuspended { reason, on })
            .await
            .map_err(|_| super::NodeError::Stopped)
    }

    /// Holds the unit hosts to `percent` of the CPU time (under 100), or lets them run (`None`).
    pub async fn set_cpu_cap(&self, percent: Option<u8>) -> Result<(), super::NodeError> {
        self.work
            .send(WorkInput::CpuCap(percent))
            .await
            .map_err(|_| super::NodeError::Stopped)
    }

    /// Where whatever watches the machine reads its idle time from (`worker status` says).
    pub async fn set_idle_source(&self, source: &'static str) -> Result<(), super::NodeError> {
        self.work
            .send(WorkInput::IdleSource(source))
            .await
            .map_err(|_| super::NodeError::Stopped)
    }
}

/// What the node's other tasks tell the work task.
#[derive(Debug)]
pub(super) enum WorkInput {
    /// A submitter opened a job link to us.
    Link(PeerLink),
    Frame {
        conn: u64,
        peer: PeerId,
        frame: JobFrame,
    },
    Closed {
        conn: u64,
        peer: PeerId,
    },
    Done(Done),
    /// Another worker opened a blob link to fetch a blob we hold.
    BlobLink(PeerLink),
    /// A blob link's reader asks for a blob's bytes.
    BlobWanted {
        digest: Digest,
        reply: tokio::sync::oneshot::Sender<Option<Arc<[u8]>>>,
    },
    /// A fetch from a holder, for `submitter`'s job, ended: the bytes, or `None` (then the
    /// submitter is asked).
    Fetched {
        submitter: PeerId,
        digest: Digest,
        bytes: Option<Arc<[u8]>>,
    },
    /// The membership table, for pulling work from submitters that have not reached us.
    Peers(Vec<crate::control::PeerStatus>),
    /// A submitter's advert, heard through the overlay, with this peer's own estimate of the
    /// network's size (0 without one).
    Advert(crate::job_advert::JobAdvert, u64),
    /// Asks what the donated cores are doing.
    Status(tokio::sync::oneshot::Sender<crate::control::WorkStatus>),
    /// The peer donates this from now on.
    Donate(super::Donation),
    /// Where the machine's idle time is read from, for status.
    IdleSource(&'static str),
    /// Run the unit hosts this share of the time (a percentage under 100), or always (`None`).
    CpuCap(Option<u8>),
    /// A reason to suspend the work holds now, or no longer does.
    SetSuspended {
        reason: Reason,
        on: bool,
    },
    /// The user pauses or resumes; the answer says whether the pause was recorded.
    Pause {
        change: PauseChange,
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

#[derive(Debug)]
pub(super) struct Done {
    submitter: PeerId,
    job: Digest,
    lease: LeaseId,
    result: Result<Vec<u8>, UnitError>,
}

#[derive(Clone)]
enum Module {
    Hosted(Arc<HostedModule>),
    Prepared(Arc<PreparedModule>),
    /// The module was refused; every unit of it ends with this error.
    Refused(UnitError),
}

enum Exec {
    Hosts(Executor<UnitHost>),
    InProcess(Executor<Sandbox>, Sandbox),
}

impl Exec {
    fn start(config: &WorkConfig, switch: &HostSwitch) -> Result<Self, SandboxError> {
        // Room for the short units started several per slot.
        let depth = (config.slots * SHORT_UNITS_PER_SLOT) as usize + 2;
        Ok(match &config.runner {
            WorkRunner::UnitHosts(command) => Exec::Hosts(Executor::unit_hosts_with_switch(
                command,
                config.slots as usize,
                depth,
                switch,
            )?),
            WorkRunner::InProcess(sandbox) => {
                let mut sandbox_config = sandbox.clone();
                sandbox_config.max_concurrent_units =
                    sandbox_config.max_concurrent_units.max(config.slots);
                let sandbox = Sandbox::new(sandbox_config)?;
                Exec::InProcess(
                    Executor::new(sandbox.clone(), config.slots as usize, depth)?,
                    sandbox,
                )
            }
        })
    }

    fn module(&self, bytes: Arc<[u8]>, metering: Metering) -> Module {
        match self {
            Exec::Hosts(_) => Module::Hosted(Arc::new(HostedModule::new(bytes, metering))),
            Exec::InProcess(_, sandbox) => match sandbox.prepare(&bytes, metering) {
                Ok(prepared) => Module::Prepared(prepared),
                Err(err) => Module::Refused(err),
            },
        }
    }

    fn submit(
        &self,
        module: &Module,
        request: UnitRequest,
        reply: impl FnOnce(Result<Vec<u8>, UnitError>) + Send + 'static,
    ) -> Result<(), UnitError> {
        let busy = |_| UnitError::Host {
            detail: "the unit threads are busy".into(),
        };
        match (self, module) {
            (_, Module::Refused(err)) => {
                reply(Err(err.clone()));
                Ok(())
            }
            (Exec::Hosts(e), Module::Hosted(m)) => e
                .try_submit(m.clone(), request, move |r| reply(r.result))
                .map_err(busy),
            (Exec::InProcess(e, _), Module::Prepared(m)) => e
                .try_submit(m.clone(), request, move |r| reply(r.result))
                .map_err(busy),
            _ => Err(UnitError::Host {
                detail: "module prepared for another runner".into(),
            }),
        }
    }
}

type Key = (PeerId, Digest);

fn metering_of(spec: &JobSpec) -> Metering {
    if spec.fuel.is_some() {
        Metering::Fuel
    } else {
        Metering::Off
    }
}
/// A lease of a job of a submitter.
type LeaseKey = (PeerId, Digest, LeaseId);
/// An execution's answer and when it ended.
type Answer = (Result<Vec<u8>, UnitError>, Instant);

/// The last progress a running unit reported, as its observer hears it on the unit's thread.
#[derive(Debug, Default)]
struct UnitProgress(std::sync::Mutex<Option<(u64, u64)>>);

impl UnitProgress {
    fn get(&self) -> Option<(u64, u64)> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl crate::sandbox::UnitObserver for UnitProgress {
    fn progress(&self, done: u64, total: u64) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((done, total));
    }
}

struct JobState {
    /// The name its submitter gave it, for the volunteer's eyes only.
    name: String,
    spec: JobSpec,
    /// Leases waiting for the module or their input, in arrival order, each with when it was
    /// received (its time left counts from then).
    waiting: VecDeque<(WireLease, Instant)>,
}

struct Fetch {
    since: Instant,
    total: u64,
    bytes: BlobBuffer,
}

/// A blob being received, written chunk by chunk into the shared buffer the cache and the unit
/// hosts then use as it is: its bytes are copied once on arrival, never again to grow or to
/// change hands.
#[derive(Default)]
struct BlobBuffer {
    bytes: Option<Arc<[u8]>>,
    filled: usize,
}

impl BlobBuffer {
    /// Appends the chunk at `offset` of a blob of `total` bytes; false for a chunk out of
    /// order or past the end (`total` is checked against the blob cap by the frame's decoder).
    fn push(&mut self, total: u64, offset: u64, chunk: &[u8]) -> bool {
        let Ok(total) = usize::try_from(total) else {
            return false;
        };
        let end = self.filled.saturating_add(chunk.len());
        if offset != self.filled as u64 || end > total {
            return false;
        }
        // Zeroed memory comes straight from the system, untouched: a submitter claiming a
        // large blob and sending little makes us commit only what it sent.
        let bytes = self
            .bytes
            .get_or_insert_with(|| crate::bytes::zeroed(total));
        let Some(buffer) = Arc::get_mut(bytes) else {
            return false;
        };
        let Some(to) = buffer.get_mut(self.filled..end) else {
            return false;
        };
        to.copy_from_slice(chunk);
        self.filled = end;
        true
    }

    fn len(&self) -> usize {
        self.filled
    }

    fn clear(&mut self) {
        *self = Self::default();
    }

    /// The blob, once every byte has arrived.
    fn complete(self, total: u64) -> Option<Arc<[u8]>> {
        if self.filled as u64 != total {
            return None;
        }
        Some(self.bytes.unwrap_or_else(|| Arc::from(&[][..])))
    }
}

struct Link {
    conn: u64,
    quic: quinn::Connection,
    outbox: Outbox,
    /// The submitter's host, from the address its link comes from.
    host: Host,
    /// The job this link carries (one per link), from its first offer: reports that are not
    /// answers, as when work is suspended or resumes, name it.
    job: Option<Digest>,
}

/// Inputs of leases handed to the intake, until they start.
struct Ready {
    input: Arc<[u8]>,
    deadline: Instant,
}

struct Work {
    dialer: super::JobDialer,
    /// When each submitter was first seen advertising a job.
    pull_seen: HashMap<PeerId, Instant>,
    /// When each submitter was last dialed for work.
    pull_tried: HashMap<PeerId, Instant>,
    next_pull: Instant,
    /// Submitters' adverts heard through the overlay, pulled from while slots are idle.
    adverts: crate::job_advert::AdvertBook,
    /// Draws whether to pull from an advert that wants fewer workers than the network has.
    rng: crate::rng::Rng,
    /// This peer's own estimate of the network's size, from the last advert handed over.
    network_size: u64,
    tamper: bool,
    tamper_switch: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// How unit hosts are started, kept to start more of them when the slots change.
    unit_host: Option<UnitHostCommand>,
    memory_per_slot: u64,
    max_unit_time: Duration,
    /// Units the intake starts at once: the slots, or more when units are short.
    at_once: u32,
    completed: u64,
    slots: u32,
    max_prefetch: u32,
    /// Running time of recent units (moving average), which sizes the prefetch.
    unit_time: Option<Duration>,
    /// When each running lease started, its deadline, and the progress its unit reported.
    started: HashMap<LeaseKey, (Instant, Instant, Arc<UnitProgress>)>,
    intake: Intake,
    exec: Option<Exec>,
    links: HashMap<PeerId, Link>,
    next_conn: u64,
    jobs: HashMap<Key, JobState>,
    modules: ModuleCache<Module>,
    blobs: HashMap<Digest, Arc<[u8]>>,
    blob_order: VecDeque<Digest>,
    blob_bytes: usize,
    /// Blobs on their way, by the submitter whose job needs them.
    fetches: HashMap<(PeerId, Digest), Fetch>,
    ready: HashMap<LeaseKey, Ready>,
    /// Stop flags of the leases started and not yet done; a lease missing here when its run
    /// ends was revoked, and its answer is dropped.
    aborts: HashMap<LeaseKey, Abort>,
    answers: HashMap<LeaseKey, Answer>,
    inputs_tx: mpsc::Sender<WorkInput>,
    tasks: JoinSet<()>,
    next_sweep: Instant,
    /// Blob links being served, by the host they come from.
    blob_links: HashMap<Host, Arc<()>>,
    /// Why the donated cores are not working now, if they are not.
    suspension: Suspension,
    /// The user's pause, while one holds: what it was asked as, and when it ends here.
    pause: Option<(Pause, Option<Instant>)>,
    data_dir: Option<PathBuf>,
    /// Stops and continues the unit hosts.
    host_switch: HostSwitch,
    /// Tells the node's actor whether the work is suspended, for the advert.
    suspended_tx: tokio::sync::watch::Sender<bool>,
    /// Leases handed back because a suspension outlasted their slack.
    handed_back: u64,
    next_hand_back: Instant,
    /// Where idle time is read from, once the machine is watched.
    idle_source: Option<&'static str>,
    /// A CPU cap under 100 %: the rhythm, when it began, whether it has the hosts stopped
    /// now, and when its phase changes next.
    duty: Option<Duty>,
    /// What this peer gave, kept in the data directory.
    ledger: Option<Ledger>,
    /// The local date the ledger counts under, read again at every sweep rather than for
    /// every unit.
    today: String,
    /// The unit of each running lease, so its answer can be judged later.
    unit_of: HashMap<LeaseKey, u32>,
    /// Units answered per submitter and job, and not yet judged: what a submitter's verdicts
    /// may count. Bounded, oldest forgotten first.
    answered: HashMap<Key, (std::collections::HashSet<u32>, VecDeque<u32>)>,
}

/// A CPU cap's state in the work task.
struct Duty {
    cycle: DutyCycle,
    began: Instant,
    off: bool,
    next: Instant,
}

/// Most answered units remembered per job for their verdicts.
const MAX_ANSWERED_PER_JOB: usize = 4096;

fn given(t: &crate::ledger::Totals) -> crate::control::Given {
    crate::control::Given {
        unit_secs: t.unit_secs as u64,
        units_run: t.units_run,
        accepted: t.accepted,
        rejected: t.rejected,
    }
}

/// Starts the work task in `tasks`; returns the sender job links are handed to.
pub(super) fn spawn(
    config: WorkConfig,
    dialer: super::JobDialer,
    suspended_tx: tokio::sync::watch::Sender<bool>,
    tasks: &mut JoinSet<()>,
) -> Result<mpsc::Sender<WorkInput>, SandboxError> {
    let host_switch = HostSwitch::new();
    let exec = Exec::start(&config, &host_switch)?;
    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let intake = Intake::new(IntakeConfig {
        slots: config.slots,
        prefetch: (FIRST_PREFETCH_PER_SLOT * config.slots).min(config.prefetch.max(1)),
        max_queued_per_submitter: (config.prefetch as usize).max(64),
        ..IntakeConfig::default()
    });
    let mut work = Work {
        dialer,
        pull_seen: HashMap::new(),
        pull_tried: HashMap::new(),
        next_pull: Instant::now() + PULL_EVERY,
        adverts: crate::job_advert::AdvertBook::default(),
        rng: crate::rng::Rng::seed_from_u64(super::random_seed()),
        network_size: 0,
        tamper: config.tamper,
        tamper_switch: config.tamper_switch.clone(),
        unit_host: match &config.runner {
            WorkRunner::UnitHosts(command) => Some(command.clone()),
            WorkRunner::InProcess(_) => None,
        },
        memory_per_slot: config.memory_per_slot,
        max_unit_time: config.max_unit_time,
        at_once: config.slots,
        completed: 0,
        slots: config.slots,
        max_prefetch: config.prefetch.max(1),
        unit_time: None,
        started: HashMap::new(),
        intake,
        exec: Some(exec),
        links: HashMap::new(),
        next_conn: 0,
        jobs: HashMap::new(),
        modules: ModuleCache::new(MODULE_CACHE, MODULE_SHARE),
        blobs: HashMap::new(),
        blob_order: VecDeque::new(),
        blob_bytes: 0,
        fetches: HashMap::new(),
        ready: HashMap::new(),
        aborts: HashMap::new(),
        answers: HashMap::new(),
        inputs_tx: tx.clone(),
        tasks: JoinSet::new(),
        next_sweep: Instant::now() + SWEEP_EVERY,
        blob_links: HashMap::new(),
        suspension: Suspension::new(),
        pause: None,
        data_dir: config.data_dir.clone(),
        host_switch,
        suspended_tx,
        handed_back: 0,
        next_hand_back: Instant::now(),
        idle_source: None,
        duty: None,
        ledger: config.data_dir.as_deref().map(Ledger::open),
        today: today(),
        unit_of: HashMap::new(),
        answered: HashMap::new(),
    };
    work.restore_pause();
    tasks.spawn(work.run(rx).instrument(tracing::debug_span!("work")));
    Ok(tx)
}

impl Drop for Work {
    /// A work task aborted with the node (not ended by its queue closing) still continues its
    /// stopped hosts and lets go of the unit threads off the runtime.
    fn drop(&mut self) {
        self.stop();
    }
}

impl Work {
    async fn run(mut self, mut inputs: mpsc::Receiver<WorkInput>) {
        loop {
            let mut wake = self.next_sweep.min(self.next_pull);
            if let Some(at) = self.intake.poll_timeout() {
                wake = wake.min(at);
            }
            if let Some((_, Some(ends))) = self.pause {
                wake = wake.min(ends);
            }
            if self.suspension.is_suspended() {
                wake = wake.min(self.next_hand_back);
            }
            if let Some(duty) = &self.duty {
                wake = wake.min(duty.next);
            }
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(input) => self.on_input(input),
                    None => break,
                },
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                    let now = Instant::now();
                    self.intake.handle_timeout(now);
                    if now >= self.next_sweep {
                        self.sweep(now);
                    }
                    if now >= self.next_pull {
                        self.look_for_submitters(now);
                    }
                    if self.pause.is_some_and(|(_, ends)| ends.is_some_and(|at| at <= now)) {
                        tracing::info!("the pause has ended");
                        self.pause = None;
                        self.forget_pause();
                        self.set_suspended(Reason::PausedByUser, false, now);
                    }
                    if self.suspension.is_suspended() && now >= self.next_hand_back {
                        self.hand_back(now);
                    }
                    if self.duty.as_ref().is_some_and(|d| now >= d.next) {
                        self.duty_step(now);
                    }
                }
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
            self.flush();
        }
        self.stop();
    }

    /// Stops the unit threads off the async runtime: a running unit may take a while.
    fn stop(&mut self) {
        self.save_ledger();
        // Stopped hosts would not see their pipes close; they are killed as the threads end.
        self.host_switch.set_stopped(false);
        if let Some(exec) = self.exec.take() {
            let _ = std::thread::Builder::new()
                .name("cf-work-stop".into())
                .spawn(move || drop(exec));
        }
    }

    fn on_input(&mut self, input: WorkInput) {
        let now = Instant::now();
        match input {
            WorkInput::Link(link) => self.on_link(link),
            WorkInput::Frame { conn, peer, frame } => {
                if self.links.get(&peer).is_some_and(|l| l.conn == conn) {
                    self.on_frame(peer, frame, now);
                }
            }
            WorkInput::Closed { conn, peer } => {
                if self.links.get(&peer).is_some_and(|l| l.conn == conn) {
                    self.links.remove(&peer);
                    self.submitter_gone(peer, now);
                }
            }
            WorkInput::Done(done) => self.on_done(done, now),
            WorkInput::Peers(peers) => self.pull(peers, now),
            WorkInput::Advert(advert, size) => {
                self.network_size = size;
                self.on_advert(advert, now);
            }
            WorkInput::BlobLink(link) => self.serve_blobs(link),
            WorkInput::BlobWanted { digest, reply } => {
                let _ = reply.send(self.blobs.get(&digest).cloned());
            }
            WorkInput::Fetched {
                submitter: from,
                digest,
                bytes,
            } => {
                let Some(fetch) = self.fetches.get_mut(&(from, digest)) else {
                    return;
                };
                match bytes {
                    Some(bytes) => {
                        self.fetches.remove(&(from, digest));
                        self.blob_arrived(from, digest, bytes, now);
                    }
                    None => {
                        // The holder failed us: the submitter serves it itself when asked again.
                        fetch.bytes.clear();
                        fetch.since = now;
                        self.send(&from, JobFrame::BlobGet { digest });
                    }
                }
            }
            WorkInput::Status(reply) => {
                let _ = reply.send(self.status(now));
            }
            WorkInput::Donate(donation) => self.resize(donation, now),
            WorkInput::SetSuspended { reason, on } => self.set_suspended(reason, on, now),
            WorkInput::IdleSource(source) => self.idle_source = Some(source),
            WorkInput::CpuCap(percent) => self.set_cpu_cap(percent, now),
            WorkInput::Pause { change, reply } => {
                let _ = reply.send(self.change_pause(change, now));
            }
        }
    }

    fn status(&self, now: Instant) -> crate::control::WorkStatus {
        let wall = SystemTime::now();
        crate::control::WorkStatus {
            slots: self.slots,
            running: u32::try_from(self.intake.running()).unwrap_or(u32::MAX),
            queued: u32::try_from(self.intake.queued()).unwrap_or(u32::MAX),
            completed: self.completed,
            submitters: u32::try_from(self.links.len()).unwrap_or(u32::MAX),
            jobs: u32::try_from(self.jobs.len()).unwrap_or(u32::MAX),
            suspended: self.suspension.reasons(),
            suspended_since_ms: self.suspension.since().map(|since| {
                let ago = now.saturating_duration_since(since);
                crate::suspend::unix_ms(wall.checked_sub(ago).unwrap_or(wall))
            }),
            pause_until_ms: self.pause.and_then(|(pause, _)| pause.until_ms()),
            handed_back: self.handed_back,
            idle_source: self.idle_source.map(str::to_string),
            given_today: self
                .ledger
                .as_ref()
                .map(|l| given(&l.on(&self.today)))
                .unwrap_or_default(),
            given_total: self
                .ledger
                .as_ref()
                .map(|l| given(&l.total()))
                .unwrap_or_default(),
            units: self.running_units(now),
        }
    }

    /// A reason to suspend holds now or no longer does; the first to hold stops the work, the
    /// last to go continues it.
    fn set_suspended(&mut self, reason: Reason, on: bool, now: Instant) {
        match self.suspension.set(reason, on, now) {
            Transition::Suspended => {
                tracing::info!(%reason, "work suspended");
                // The advert first: whoever sees the hosts stopped sees no free core either.
                self.suspended_tx.send_replace(true);
                self.host_switch.set_stopped(true);
                self.intake.set_suspended(true, now);
                self.next_hand_back = now;
                self.tell_submitters();
            }
            Transition::Resumed => {
                tracing::info!(%reason, "work resumed");
                self.host_switch
                    .set_stopped(self.duty.as_ref().is_some_and(|d| d.off));
                self.intake.set_suspended(false, now);
                self.suspended_tx.send_replace(false);
                self.tell_submitters();
            }
            Transition::Unchanged => {
                tracing::debug!(%reason, on, reasons = ?self.suspension.reasons(), "suspension reasons changed");
            }
        }
    }

    /// Tells every linked submitter how many leases this peer takes now (none while
    /// suspended), in a report without answers.
    fn tell_submitters(&mut self) {
        let links: Vec<(PeerId, Digest)> = self
            .links
            .iter()
            .filter_map(|(peer, link)| link.job.map(|job| (*peer, job)))
            .collect();
        for (peer, job) in links {
            let want = self.intake.want(&peer);
            self.send(
                &peer,
                JobFrame::Report {
                    job,
                    results: Vec::new(),
                    want,
                },
            );
        }
    }

    /// Applies the pause recorded in the data directory when the peer starts. A pause file
    /// that cannot be read keeps the peer paused: the volunteer asked for a pause, and only
    /// `worker resume` (which replaces the file) should end it.
    fn restore_pause(&mut self) {
        let Some(dir) = self.data_dir.clone() else {
            return;
        };
        let now = Instant::now();
        let pause = match crate::suspend::read_pause(&dir) {
            Ok(None) => return,
            Ok(Some(pause)) if pause.is_over(SystemTime::now()) => {
                self.forget_pause();
                return;
            }
            Ok(Some(pause)) => pause,
            Err(err) => {
                tracing::warn!(
                    err = %super::error_chain(&err),
                    "the recorded pause cannot be read; staying paused until `worker resume`"
                );
                Pause::Indefinite
            }
        };
        tracing::info!(?pause, "paused by the user before this start");
        self.pause = Some((pause, ends_at(pause, now)));
        self.set_suspended(Reason::PausedByUser, true, now);
    }

    /// The user's pause or resume: recorded in the data directory first, so a pause the peer
    /// takes is one it still has after a restart.
    fn change_pause(&mut self, change: PauseChange, now: Instant) -> Result<(), String> {
        match change {
            PauseChange::Pause(length) => {
                let pause = Pause::lasting(length, SystemTime::now()).map_err(|e| e.to_string())?;
                if let Some(dir) = &self.data_dir {
                    // A small file written and renamed on this task: pauses are rare, and
                    // writing here keeps a quick pause-resume-pause in order.
                    crate::suspend::write_pause(dir, pause).map_err(|e| super::error_chain(&e))?;
                }
                self.pause = Some((pause, ends_at(pause, now)));
                self.set_suspended(Reason::PausedByUser, true, now);
            }
            PauseChange::Resume => {
                if let Some(dir) = &self.data_dir {
                    crate::suspend::clear_pause(dir).map_err(|e| super::error_chain(&e))?;
                }
                self.pause = None;
                self.set_suspended(Reason::PausedByUser, false, now);
            }
        }
        Ok(())
    }

    /// Removes the pause file of a pause that has ended by itself.
    fn forget_pause(&self) {
        if let Some(dir) = &self.data_dir
            && let Err(err) = crate::suspend::clear_pause(dir)
        {
            tracing::warn!(err = %super::error_chain(&err), "cannot remove the ended pause");
        }
    }

    /// Hands back every held lease whose slack the suspension has used up, so its submitter
    /// re-issues it at once instead of waiting for its deadline.
    ///
    /// The rule: a lease goes back once the time left to its deadline is less than the most
    /// its unit may still need — its whole timeout while it waits (for blobs or a slot), its
    /// timeout less what it ran before it was stopped while it runs. Past that point even a
    /// resume now could not promise the result in time; until then a short suspension (the
    /// user typing a few minutes) costs the job nothing. Over the network a lease's slack is
    /// about `NET_LEASE_MARGIN` (a minute), less what it waited here.
    fn hand_back(&mut self, now: Instant) {
        self.next_hand_back = now + HAND_BACK_EVERY;
        let since = self.suspension.since().unwrap_or(now);
        let timeout = |jobs: &HashMap<Key, JobState>, key: &Key| {
            jobs.get(key)
                .map_or(MAX_UNIT_TIME, |j| Duration::from_millis(j.spec.timeout_ms))
        };
        let late =
            |deadline: Instant, need: Duration| deadline.saturating_duration_since(now) < need;
        let mut back: HashMap<Key, Vec<LeaseId>> = HashMap::new();
        for (key, state) in &mut self.jobs {
            let need = Duration::from_millis(state.spec.timeout_ms);
            state.waiting.retain(|(lease, at)| {
                let keep = !late(*at + Duration::from_millis(lease.ttl_ms), need);
                if !keep {
                    back.entry(*key).or_default().push(lease.id);
                }
                keep
            });
        }
        let mut revoke: HashMap<Key, Vec<LeaseId>> = HashMap::new();
        for (key, ready) in &self.ready {
            let job = (key.0, key.1);
            if late(ready.deadline, timeout(&self.jobs, &job)) {
                revoke.entry(job).or_default().push(key.2);
            }
        }
        for (key, (at, deadline, _)) in &self.started {
            let job = (key.0, key.1);
            let ran = since.saturating_duration_since(*at);
            if late(*deadline, timeout(&self.jobs, &job).saturating_sub(ran)) {
                revoke.entry(job).or_default().push(key.2);
            }
        }
        for ((from, job), leases) in revoke {
            for id in &leases {
                self.ready.remove(&(from, job, *id));
            }
            // The intake forgets them and asks for running ones to be aborted: their stopped
            // unit hosts are killed.
            self.intake.handle(
                IntakeEvent::Revoke {
                    from,
                    job,
                    leases: leases.clone(),
                },
                now,
            );
            back.entry((from, job)).or_default().extend(leases);
        }
        for ((to, job), leases) in back {
            tracing::info!(peer = %to, %job, leases = leases.len(), "suspended past the leases' slack; handed back");
            self.handed_back += leases.len() as u64;
            self.decline(to, job, leases);
        }
    }

    /// Whether some slot has nothing to run and the work is not suspended.
    fn idle(&self) -> bool {
        self.intake.running() < self.at_once as usize
            && self.intake.queued() == 0
            && !self.suspension.is_suspended()
    }

    /// When slots are idle, pulls from the adverts heard and reads the membership table (on a
    /// task of its own: the node's actor may be waiting for this task at the same moment).
    fn look_for_submitters(&mut self, now: Instant) {
        self.next_pull = now + PULL_EVERY;
        if !self.idle() {
            return;
        }
        self.pull_from_adverts(now);
        let dialer = self.dialer.clone();
        let inputs = self.inputs_tx.clone();
        self.tasks.spawn(async move {
            if let Ok(status) = dialer.status().await {
                let _ = inputs.send(WorkInput::Peers(status.peers)).await;
            }
        });
    }

    /// An advert heard through the overlay: kept when this peer could run its units, and pulled
    /// from at once when slots are idle.
    fn on_advert(&mut self, advert: crate::job_advert::JobAdvert, now: Instant) {
        let submitter = advert.submitter;
        // Another job, or the submitter started again elsewhere: the last try (perhaps at an
        // address nobody answers at any more) must not hold the new offer back.
        let changed = self.adverts.get(&submitter).is_some_and(|known| {
            (known.job, &known.addrs, known.relay) != (advert.job, &advert.addrs, advert.relay)
        });
        // A withdrawal is kept (it shadows the offer it ends) whatever the worker could run.
        if !advert.withdrawn()
            && (advert.profile != crate::sandbox::PROFILE_VERSION
                || advert.memory_bytes > self.memory_per_slot
                || (advert.addrs.is_empty() && advert.relay.is_none()))
        {
            return;
        }
        if self.adverts.admit(advert, super::wall_clock_ms()).is_err() {
            return;
        }
        if changed {
            self.pull_tried.remove(&submitter);
        }
        if self.idle() {
            self.pull_from_adverts(now);
        }
    }

    /// Dials submitters whose adverts were heard and that are not linked to us, each with the
    /// probability its advert asks for (drawn again after [`PULL_RETRY`]).
    fn pull_from_adverts(&mut self, now: Instant) {
        let now_ms = super::wall_clock_ms();
        self.adverts.expire(now_ms);
        self.pull_tried
            .retain(|_, at| now.duration_since(*at) < PULL_RETRY);
        type Candidate = (PeerId, Option<std::net::SocketAddr>, Option<RelayRef>, f64);
        let candidates: Vec<Candidate> = self
            .adverts
            .current(now_ms)
            .into_iter()
            .filter(|a| !self.links.contains_key(&a.submitter))
            .filter(|a| !self.pull_tried.contains_key(&a.submitter))
            .filter(|a| !a.addrs.is_empty() || a.relay.is_some())
            .map(|a| {
                let chance = a.pull_probability(self.network_size);
                (a.submitter, a.addrs.first().copied(), a.relay, chance)
            })
            .take(PULLS_PER_PASS)
            .collect();
        for (peer, addr, relay, chance) in candidates {
            self.pull_tried.insert(peer, now);
            if self.rng.chance(chance) {
                self.dial_submitter(peer, addr, relay);
            }
        }
    }

    /// Dials submitters that have advertised a job for a while without reaching us: we may not
    /// be dialable (behind NAT), but we can dial them.
    fn pull(&mut self, peers: Vec<crate::control::PeerStatus>, now: Instant) {
        let advertising: std::collections::HashSet<PeerId> = peers
            .iter()
            .filter(|p| p.job.is_some())
            .map(|p| p.id)
            .collect();
        self.pull_seen.retain(|p, _| advertising.contains(p));
        self.pull_tried
            .retain(|_, at| now.duration_since(*at) < PULL_RETRY);
        let mut dialed = 0;
        for p in peers.iter().filter(|p| p.job.is_some()) {
            let first = *self.pull_seen.entry(p.id).or_insert(now);
            if self.links.contains_key(&p.id)
                || self.pull_tried.contains_key(&p.id)
                || now.duration_since(first) < PULL_DELAY
                || dialed >= PULLS_PER_PASS
            {
                continue;
            }
            // Port 0 names a submitter behind NAT, reached only through its advert's relay.
            let Some(addr) = p.addrs.iter().find(|a| a.port() != 0).copied() else {
                continue;
            };
            self.pull_tried.insert(p.id, now);
            dialed += 1;
            self.dial_submitter(p.id, Some(addr), None);
        }
    }

    /// Opens a pull link to a submitter; the link joins the others once up. A submitter behind
    /// NAT (`relay` named) is first asked, through its relay, to open its NAT to us; the link
    /// is then dialed directly to the address the relay sees it at, and never without an
    /// introduction (an unasked packet spoils the NAT's next hole, see `Node::start`).
    fn dial_submitter(
        &mut self,
        peer: PeerId,
        addr: Option<std::net::SocketAddr>,
        relay: Option<RelayRef>,
    ) {
        let d = self.dialer.clone();
        let inputs = self.inputs_tx.clone();
        tracing::info!(%peer, ?addr, "asking a submitter for work");
        self.tasks.spawn(async move {
            let link = match (relay, addr) {
                (Some(relay), _) => {
                    match super::relay::dial_behind_nat(&d, relay, peer, LinkKind::Pull).await {
                        Ok((link, super::relay::Path::Direct)) => {
                            tracing::info!(%peer, addr = %link.addr, "direct path through NAT to the submitter opened");
                            link
                        }
                        Ok((link, super::relay::Path::Relayed)) => {
                            tracing::info!(%peer, relay = %relay.addr, "relayed path to the submitter opened");
                            link
                        }
                        Err(err) => {
                            tracing::info!(%peer, relay = %relay.addr, err = %super::error_chain(&err), "no path to the submitter behind NAT");
                            return;
                        }
                    }
                }
                (None, Some(addr)) if addr.port() != 0 => {
                    match d.dial(addr, peer, LinkKind::Pull).await {
                        Ok(link) => link,
                        Err(err) => {
                            tracing::debug!(%peer, err = %super::error_chain(&err), "pull dial failed");
                            return;
                        }
                    }
                }
                (None, _) => return,
            };
            let _ = inputs.send(WorkInput::Link(link)).await;
        });
    }

    fn on_link(&mut self, link: PeerLink) {
        let peer = link.peer;
        let conn = self.next_conn;
        self.next_conn += 1;
        if let Some(old) = self.links.remove(&peer) {
            // A submitter that reconnects replaces its old link; its leases stay queued.
            old.quic
                .close(VarInt::from_u32(close::DUPLICATE), b"replaced");
        }
        let span = tracing::debug_span!("job-link", %peer, conn);
        let (outbox, rx) = Outbox::new(OUTBOX, OUTBOX_BYTES);
        self.tasks
            .spawn(write_loop(link.conn.clone(), link.send, rx).instrument(span.clone()));
        let inputs = self.inputs_tx.clone();
        let quic = link.conn.clone();
        let mut recv = link.recv;
        self.tasks.spawn(
            async move {
                loop {
                    match wire::read::<JobFrame, _>(&mut recv).await {
                        Ok(Some(frame)) => {
                            if inputs
                                .send(WorkInput::Frame { conn, peer, frame })
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(err) => {
                            super::end_of_reading(err, &quic);
                            break;
                        }
                    }
                }
                let _ = inputs.send(WorkInput::Closed { conn, peer }).await;
            }
            .instrument(span),
        );
        let host = Host::of(link.conn.remote_address().ip());
        self.links.insert(
            peer,
            Link {
                conn,
                quic: link.conn,
                outbox,
                host,
                job: None,
            },
        );
    }

    fn send(&self, to: &PeerId, frame: JobFrame) {
        if let Some(link) = self.links.get(to)
            && let Err(OutboxError::Full) = link.outbox.try_send(&frame)
        {
            // The submitter re-issues what it does not hear about when the lease expires.
            tracing::debug!(peer = %to, "job link outbox full; frame dropped");
        }
    }

    fn on_frame(&mut self, from: PeerId, frame: JobFrame, now: Instant) {
        match frame {
            JobFrame::Offer(offer) => self.on_offer(from, offer, now),
            JobFrame::Revoke { job, leases } => {
                for id in &leases {
                    self.ready.remove(&(from, job, *id));
                }
                if let Some(state) = self.jobs.get_mut(&(from, job)) {
                    state.waiting.retain(|(l, _)| !leases.contains(&l.id));
                }
                self.intake
                    .handle(IntakeEvent::Revoke { from, job, leases }, now);
            }
            JobFrame::BlobChunk {
                digest,
                total,
                offset,
                bytes,
            } => self.on_chunk(from, digest, total, offset, bytes, now),
            JobFrame::BlobMissing { digest } => {
                if self.fetches.remove(&(from, digest)).is_some() {
                    self.blob_failed(from, digest, now);
                }
            }
            JobFrame::BlobAt { digest, peer } => {
                let Some(fetch) = self.fetches.get_mut(&(from, digest)) else {
                    return;
                };
                // Only where we have seen the holder ourselves: the submitter's word would let
                // it aim our dials at any address.
                match self.dialer.confirmed(&peer) {
                    Some(addr) if peer != self.dialer.id() => {
                        self.fetch_from_holder(from, digest, peer, addr);
                    }
                    _ => {
                        fetch.bytes.clear();
                        fetch.since = now;
                        self.send(&from, JobFrame::BlobGet { digest });
                    }
                }
            }
            JobFrame::Judged {
                job,
                accepted,
                rejected,
            } => self.on_judged(from, job, accepted, rejected),
            JobFrame::Report { .. }
            | JobFrame::Decline { .. }
            | JobFrame::BlobGet { .. }
            | JobFrame::BlobHeld { .. } => {
                tracing::debug!(peer = %from, "submitter-bound frame on an inbound job link; ignored");
            }
        }
    }

    fn on_offer(&mut self, from: PeerId, offer: Offer, now: Instant) {
        let Offer {
            job,
            name,
            spec,
            leases,
        } = offer;
        let key = (from, job);
        if let Some(link) = self.links.get_mut(&from) {
            link.job = Some(job);
        }
        if self.suspension.is_suspended() {
            tracing::debug!(peer = %from, leases = leases.len(), "offer declined: work is suspended");
            self.decline(from, job, leases.iter().map(|l| l.id).collect());
            // And no more until this peer says it takes leases again.
            self.send(
                &from,
                JobFrame::Report {
                    job,
                    results: Vec::new(),
                    want: 0,
                },
            );
            return;
        }
        if spec.profile != PROFILE {
            tracing::info!(peer = %from, profile = %spec.profile, "job for another engine profile declined");
            self.decline(from, job, leases.iter().map(|l| l.id).collect());
            return;
        }
        if spec.memory_bytes > self.memory_per_slot {
            tracing::info!(
                peer = %from,
                asked_mb = spec.memory_bytes >> 20,
                offered_mb = self.memory_per_slot >> 20,
                "job asks for more memory per unit than this peer offers; declined"
            );
            self.decline(from, job, leases.iter().map(|l| l.id).collect());
            return;
        }
        if u128::from(spec.timeout_ms) > self.max_unit_time.as_millis() {
            tracing::info!(
                peer = %from,
                asked_secs = spec.timeout_ms / 1000,
                offered_secs = self.max_unit_time.as_secs(),
                "job's units may run longer than this peer allows; declined"
            );
            self.decline(from, job, leases.iter().map(|l| l.id).collect());
            return;
        }
        if leases.is_empty() {
            // An offer of nothing holds nothing: no job is made for it.
            return;
        }
        let host = self.links.get(&from).map(|l| l.host);
        if !self.jobs.contains_key(&key) {
            self.drop_idle_jobs();
            let theirs = self.jobs.keys().filter(|k| k.0 == from).count();
            let of_host = self
                .jobs
                .keys()
                .filter(|k| self.host_of(&k.0) == host)
                .count();
            if self.jobs.len() >= MAX_JOBS
                || theirs >= MAX_JOBS_PER_SUBMITTER
                || of_host >= MAX_JOBS_PER_HOST
            {
                tracing::debug!(peer = %from, "job declined: too many jobs here");
                self.decline(from, job, leases.iter().map(|l| l.id).collect());
                return;
            }
            self.jobs.insert(
                key,
                JobState {
                    name: crate::text::escape_controls(&name).into_owned(),
                    spec: spec.clone(),
                    waiting: VecDeque::new(),
                },
            );
        }
        let held = self.ready.len()
            + self.started.len()
            + self.jobs.values().map(|j| j.waiting.len()).sum::<usize>();
        let mut room = MAX_HELD_LEASES.saturating_sub(held);
        if held >= MAX_HELD_PER_HOST {
            // Only then can one host be at its share: count what its submitters hold.
            let of_host = self.held_by_host(host);
            room = room.min(MAX_HELD_PER_HOST.saturating_sub(of_host));
        }
        let Some(state) = self.jobs.get_mut(&key) else {
            return;
        };
        if state.spec != spec {
            // One job, one spec: a submitter changing it mid-job is refused.
            self.decline(from, job, leases.iter().map(|l| l.id).collect());
            return;
        }
        let mut declined = Vec::new();
        for (i, lease) in leases.into_iter().enumerate() {
            if state.waiting.len() >= MAX_WAITING_PER_JOB || i >= room {
                declined.push(lease.id);
            } else {
                state.waiting.push_back((lease, now));
            }
        }
        self.decline(from, job, declined);
        self.advance(key, now);
    }

    fn host_of(&self, peer: &PeerId) -> Option<Host> {
        self.links.get(peer).map(|l| l.host)
    }

    /// Leases held here (waiting for blobs, queued or running) for submitters on `host`.
    fn held_by_host(&self, host: Option<Host>) -> usize {
        let on_host = |p: &PeerId| self.host_of(p) == host;
        let waiting: usize = self
            .jobs
            .iter()
            .filter(|(k, _)| on_host(&k.0))
            .map(|(_, j)| j.waiting.len())
            .sum();
        let ready = self.ready.keys().filter(|k| on_host(&k.0)).count();
        let running = self.started.keys().filter(|k| on_host(&k.0)).count();
        waiting + ready + running
    }

    /// Forgets jobs that hold no lease here: a submitter's link alone keeps nothing, so empty
    /// offers cannot fill the job table.
    fn drop_idle_jobs(&mut self) {
        let busy: std::collections::HashSet<Key> = self
            .ready
            .keys()
            .chain(self.started.keys())
            .map(|k| (k.0, k.1))
            .collect();
        self.jobs
            .retain(|k, j| !j.waiting.is_empty() || busy.contains(k));
    }

    fn decline(&mut self, to: PeerId, job: Digest, leases: Vec<LeaseId>) {
        if !leases.is_empty() {
            self.send(&to, JobFrame::Decline { job, leases });
        }
    }

    /// Moves the leases of a job whose blobs are here into the intake, and asks for missing
    /// blobs.
    fn advance(&mut self, key: (PeerId, Digest), now: Instant) {
        let (from, job) = key;
        let Some(state) = self.jobs.get_mut(&key) else {
            return;
        };
        let module = state.spec.module;
        let module_key = (module, metering_of(&state.spec));
        let mut wanted = Vec::new();
        if !self.modules.contains(&module_key) {
            match (self.blobs.get(&module).cloned(), &self.exec) {
                // Here already, for another metering or evicted: prepared again from the bytes.
                (Some(bytes), Some(exec)) => {
                    let prepared = exec.module(bytes, module_key.1);
                    self.insert_module(module_key, prepared, from);
                }
                _ => wanted.push((module, state.spec.module_len)),
            }
        }
        let Some(state) = self.jobs.get_mut(&key) else {
            return;
        };
        let mut ready = Vec::new();
        if wanted.is_empty() {
            let mut keep = VecDeque::new();
            while let Some((lease, at)) = state.waiting.pop_front() {
                let input = match &lease.input {
                    InputRef::Inline(bytes) => Some(Arc::<[u8]>::from(bytes.as_slice())),
                    InputRef::Blob { digest, len } => {
                        let found = self.blobs.get(digest).cloned();
                        if found.is_none() && !wanted.iter().any(|(d, _)| d == digest) {
                            wanted.push((*digest, *len));
                        }
                        found
                    }
                };
                match input {
                    Some(input) => {
                        let deadline = at + Duration::from_millis(lease.ttl_ms);
                        ready.push((lease, input, deadline));
                    }
                    None => keep.push_back((lease, at)),
                }
            }
            state.waiting = keep;
        }
        for (digest, len) in wanted {
            self.fetch(from, digest, len);
        }
        if ready.is_empty() {
            return;
        }
        let mut leases = Vec::with_capacity(ready.len());
        for (lease, input, deadline) in ready {
            self.ready
                .insert((from, job, lease.id), Ready { input, deadline });
            leases.push(Lease {
                id: lease.id,
                unit: lease.unit,
                attempt: lease.attempt,
                deadline,
            });
        }
        self.intake
            .handle(IntakeEvent::Offer { from, job, leases }, now);
    }

    fn fetch(&mut self, from: PeerId, digest: Digest, len: u64) {
        let host = self.host_of(&from);
        let theirs = self.fetches.keys().filter(|k| k.0 == from).count();
        let of_host = self
            .fetches
            .keys()
            .filter(|k| self.host_of(&k.0) == host)
            .count();
        if self.fetches.contains_key(&(from, digest))
            || self.fetches.len() >= MAX_FETCHES
            || theirs >= MAX_FETCHES_PER_SUBMITTER
            || of_host >= MAX_FETCHES_PER_HOST
        {
            // Already on its way, or asked for again when a fetch slot frees up.
            return;
        }
        self.fetches.insert(
            (from, digest),
            Fetch {
                since: Instant::now(),
                total: len,
                bytes: BlobBuffer::default(),
            },
        );
        self.send(&from, JobFrame::BlobGet { digest });
    }

    fn on_chunk(
        &mut self,
        from: PeerId,
        digest: Digest,
        total: u64,
        offset: u64,
        bytes: Bytes,
        now: Instant,
    ) {
        let Some(fetch) = self.fetches.get_mut(&(from, digest)) else {
            return;
        };
        self.dialer.traffic().blob_payload(0, bytes.len() as u64);
        if total != fetch.total || !fetch.bytes.push(total, offset, &bytes) {
            tracing::warn!(peer = %from, %digest, "blob chunk out of order or of the wrong size");
            self.fetches.remove(&(from, digest));
            self.blob_failed(from, digest, now);
            return;
        }
        fetch.since = now;
        if (fetch.bytes.len() as u64) < fetch.total {
            return;
        }
        let Some(fetch) = self.fetches.remove(&(from, digest)) else {
            return;
        };
        let Some(bytes) = fetch.bytes.complete(total) else {
            return;
        };
        self.blob_arrived(from, digest, bytes, now);
    }

    /// A fetched blob is complete: checked against its digest, then cached and put to use.
    fn blob_arrived(&mut self, from: PeerId, digest: Digest, bytes: Arc<[u8]>, now: Instant) {
        if Digest::of(&bytes) != digest {
            tracing::warn!(peer = %from, %digest, "blob does not match its digest");
            self.blob_failed(from, digest, now);
            return;
        }
        // Kept (modules too) so other workers can fetch it from here; jobs waiting for it as
        // their module prepare it as they advance. The submitter learns we hold it only now
        // that it is checked, so it never sends fetchers to a copy still on its way.
        self.insert_blob(digest, bytes);
        self.send(&from, JobFrame::BlobHeld { digest });
        self.advance_all(now);
    }

    /// Fetches a blob from another worker that holds it, as the submitter suggested; the answer
    /// comes back as [`WorkInput::Fetched`].
    fn fetch_from_holder(
        &mut self,
        submitter: PeerId,
        digest: Digest,
        peer: PeerId,
        addr: std::net::SocketAddr,
    ) {
        let Some(total) = self.fetches.get(&(submitter, digest)).map(|f| f.total) else {
            return;
        };
        let d = self.dialer.clone();
        let inputs = self.inputs_tx.clone();
        self.tasks.spawn(async move {
            let fetched = tokio::time::timeout(FETCH_TIMEOUT / 2, async {
                let mut link = d.dial(addr, peer, crate::net::LinkKind::Blob).await.ok()?;
                wire::write(&mut link.send, &JobFrame::BlobGet { digest })
                    .await
                    .ok()?;
                let mut bytes = BlobBuffer::default();
                while (bytes.len() as u64) < total {
                    match wire::read::<JobFrame, _>(&mut link.recv).await.ok()?? {
                        JobFrame::BlobChunk {
                            digest: d,
                            total: t,
                            offset,
                            bytes: chunk,
                        } if d == digest && t == total && bytes.push(total, offset, &chunk) => {}
                        _ => return None,
                    }
                }
                link.conn.close(VarInt::from_u32(close::NORMAL), b"thanks");
                bytes.complete(total)
            })
            .await
            .ok()
            .flatten();
            if fetched.is_none() {
                tracing::debug!(%peer, %digest, "fetch from a holder failed");
            }
            let _ = inputs
                .send(WorkInput::Fetched {
                    submitter,
                    digest,
                    bytes: fetched,
                })
                .await;
        });
    }

    /// Serves blobs we hold to another worker on a blob link it opened: one `BlobGet` at a
    /// time, answered from the cache in chunks.
    fn serve_blobs(&mut self, link: PeerLink) {
        // Each link task holds a clone of its host's token while it runs: the count of clones
        // is the count of live links.
        self.blob_links
            .retain(|_, token| Arc::strong_count(token) > 1);
        let host = Host::of(link.conn.remote_address().ip());
        let total: usize = self
            .blob_links
            .values()
            .map(|t| Arc::strong_count(t) - 1)
            .sum();
        let token = self.blob_links.entry(host).or_default();
        if total >= MAX_BLOB_LINKS || Arc::strong_count(token) > MAX_BLOB_LINKS_PER_HOST {
            tracing::debug!(peer = %link.peer, %host, "blob link refused: too many open");
            link.conn
                .close(VarInt::from_u32(close::NORMAL), b"too many blob links");
            return;
        }
        let token = Arc::clone(token);
        let inputs = self.inputs_tx.clone();
        let peer = link.peer;
        self.tasks.spawn(
            async move {
                let _token = token;
                let (outbox, rx) = Outbox::new(BLOB_OUTBOX, BLOB_OUTBOX_BYTES);
                let writer = tokio::spawn(write_loop(link.conn.clone(), link.send, rx));
                let mut recv = link.recv;
                // A few requests per link at most: a fetcher asks for one blob.
                for _ in 0..4 {
                    let digest = match wire::read::<JobFrame, _>(&mut recv).await {
                        Ok(Some(JobFrame::BlobGet { digest })) => digest,
                        Ok(None) => break,
                        Ok(Some(_)) => {
                            link.conn
                                .close(VarInt::from_u32(close::PROTOCOL), b"unexpected frame");
                            break;
                        }
                        Err(err) => {
                            super::end_of_reading(err, &link.conn);
                            break;
                        }
                    };
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if inputs
                        .send(WorkInput::BlobWanted { digest, reply: tx })
                        .await
                        .is_err()
                    {
                        break;
                    }
                    let bytes = rx.await.ok().flatten().map(Bytes::from_owner);
                    if !send_blob(&outbox, digest, bytes).await {
                        break;
                    }
                }
                drop(outbox);
                let _ = writer.await;
            }
            .instrument(tracing::debug_span!("blob-link", %peer)),
        );
    }

    /// Caches a prepared module made for `owner`'s job; what leases held here still need is
    /// never evicted.
    fn insert_module(&mut self, key: ModuleKey, module: Module, owner: PeerId) {
        let in_use: std::collections::HashSet<ModuleKey> = self
            .jobs
            .iter()
            .filter(|(k, j)| !j.waiting.is_empty() || self.ready.keys().any(|r| (r.0, r.1) == **k))
            .map(|(_, j)| (j.spec.module, metering_of(&j.spec)))
            .collect();
        self.modules.insert(key, module, owner, &in_use);
    }

    fn insert_blob(&mut self, digest: Digest, bytes: Arc<[u8]>) {
        while self.blob_bytes + bytes.len() > BLOB_CACHE_BYTES {
            let Some(old) = self.blob_order.pop_front() else {
                break;
            };
            if let Some(b) = self.blobs.remove(&old) {
                self.blob_bytes -= b.len();
            }
        }
        self.blob_bytes += bytes.len();
        self.blobs.insert(digest, bytes);
        self.blob_order.push_back(digest);
    }

    /// A blob could not be had from `from`: every lease waiting for it is declined, so the
    /// submitter offers it elsewhere.
    fn blob_failed(&mut self, from: PeerId, digest: Digest, now: Instant) {
        let keys: Vec<Key> = self.jobs.keys().filter(|k| k.0 == from).copied().collect();
        for key in keys {
            let Some(state) = self.jobs.get_mut(&key) else {
                continue;
            };
            let needs = |l: &WireLease| {
                state.spec.module == digest
                    || matches!(&l.input, InputRef::Blob { digest: d, .. } if *d == digest)
            };
            let (drop, keep): (Vec<_>, Vec<_>) =
                state.waiting.drain(..).partition(|(l, _)| needs(l));
            state.waiting = keep.into();
            let ids = drop.iter().map(|(l, _)| l.id).collect();
            self.decline(key.0, key.1, ids);
        }
        self.advance_all(now);
    }

    fn advance_all(&mut self, now: Instant) {
        let keys: Vec<Key> = self
            .jobs
            .iter()
            .filter(|(_, j)| !j.waiting.is_empty())
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.advance(key, now);
        }
    }

    fn on_done(&mut self, done: Done, now: Instant) {
        let Done {
            submitter,
            job,
            lease,
            mut result,
        } = done;
        let key = (submitter, job, lease);
        let unit = self.unit_of.remove(&key);
        if self.aborts.remove(&key).is_none() {
            // Revoked: the intake forgot it, and nobody wants its answer.
            self.started.remove(&key);
            return;
        }
        self.completed += 1;
        let mut ran_for = Duration::ZERO;
        if let Some((at, ..)) = self.started.remove(&key) {
            let took = now.saturating_duration_since(at);
            ran_for = took;
            let avg = self.unit_time.map_or(took, |avg| (avg * 7 + took) / 8);
            self.unit_time = Some(avg);
            let per_slot = (QUEUE_TARGET.as_nanos() / avg.as_nanos().max(1))
                .clamp(1, u128::from(MAX_PREFETCH_PER_SLOT)) as u32;
            self.intake
                .set_prefetch((per_slot * self.slots).min(self.max_prefetch));
            let at_once = if avg < SHORT_UNIT {
                self.slots * SHORT_UNITS_PER_SLOT
            } else {
                self.slots
            };
            if at_once != self.at_once {
                self.at_once = at_once;
                self.intake.handle(IntakeEvent::SlotsChanged(at_once), now);
            }
        }
        let switched = self
            .tamper_switch
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed));
        if (self.tamper || switched)
            && let Ok(bytes) = &mut result
        {
            bytes.extend_from_slice(b" (altered)");
        }
        let outcome = match &result {
            Ok(bytes) => Outcome::Output(Digest::of(bytes)),
            Err(e) if e.class() == OutcomeClass::HostFailure => Outcome::HostFailure,
            Err(e) => Outcome::deterministic_error(&postcard::to_stdvec(e).unwrap_or_default()),
        };
        if !matches!(outcome, Outcome::HostFailure) {
            if let Some(ledger) = &mut self.ledger {
                ledger.ran(&self.today, ran_for);
            }
            if let Some(unit) = unit {
                self.remember_answered((submitter, job), unit);
            }
        }
        self.answers.insert((submitter, job, lease), (result, now));
        self.intake.handle(
            IntakeEvent::Done {
                submitter,
                job,
                lease,
                outcome,
            },
            now,
        );
    }

    /// Holds the unit hosts to `percent` of the time: stopped and continued on the rhythm of a
    /// [`DutyCycle`] (the stops freeze the units' deadlines as a suspension's do). `None` or 100
    /// lets them run.
    fn set_cpu_cap(&mut self, percent: Option<u8>, now: Instant) {
        let cycle = percent.filter(|p| *p < 100).map(DutyCycle::new);
        if cycle == self.duty.as_ref().map(|d| d.cycle) {
            return;
        }
        if let Some(old) = self.duty.take()
            && old.off
            && !self.suspension.is_suspended()
        {
            self.host_switch.set_stopped(false);
        }
        if let Some(cycle) = cycle {
            tracing::info!(
                percent = cycle.percent(),
                "unit hosts held to a share of the CPU"
            );
            self.duty = Some(Duty {
                cycle,
                began: now,
                off: false,
                next: now,
            });
            self.duty_step(now);
        }
    }

    /// The duty cycle's phase changed: stop or continue the hosts, unless a suspension holds
    /// them stopped anyway.
    fn duty_step(&mut self, now: Instant) {
        let suspended = self.suspension.is_suspended();
        let Some(duty) = &mut self.duty else {
            return;
        };
        let (on, left) = duty.cycle.phase(now.saturating_duration_since(duty.began));
        duty.next = now + left.unwrap_or(Duration::from_secs(1));
        if duty.off != on {
            return;
        }
        duty.off = !on;
        if !suspended {
            self.host_switch.set_stopped(!on);
        }
    }

    /// The units running now, longest running first.
    fn running_units(&self, now: Instant) -> Vec<crate::control::RunningUnit> {
        let mut units: Vec<crate::control::RunningUnit> = self
            .started
            .iter()
            .filter_map(|(key, (at, _, progress))| {
                let (submitter, job, _) = *key;
                let state = self.jobs.get(&(submitter, job))?;
                Some(crate::control::RunningUnit {
                    submitter,
                    job,
                    job_name: state.name.clone(),
                    unit: *self.unit_of.get(key)?,
                    module: state.spec.module,
                    progress: progress.get(),
                    running_ms: u64::try_from(now.saturating_duration_since(*at).as_millis())
                        .unwrap_or(u64::MAX),
                })
            })
            .collect();
        units.sort_by_key(|u| std::cmp::Reverse(u.running_ms));
        units.truncate(crate::control::MAX_LISTED_UNITS);
        units
    }

    /// Keeps `unit` as answered for `key`'s submitter, to count its verdict when it comes.
    fn remember_answered(&mut self, key: Key, unit: u32) {
        let (set, order) = self.answered.entry(key).or_default();
        if set.insert(unit) {
            order.push_back(unit);
        }
        while order.len() > MAX_ANSWERED_PER_JOB {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
    }

    /// A submitter's verdicts on our answers: each counted once, and only for a unit we
    /// answered for it, so a submitter cannot inflate the record.
    fn on_judged(&mut self, from: PeerId, job: Digest, accepted: Vec<u32>, rejected: Vec<u32>) {
        let Some((set, _)) = self.answered.get_mut(&(from, job)) else {
            return;
        };
        for (units, ok) in [(accepted, true), (rejected, false)] {
            for unit in units {
                if set.remove(&unit)
                    && let Some(ledger) = &mut self.ledger
                {
                    ledger.judged(&self.today, ok);
                }
            }
        }
    }

    fn save_ledger(&mut self) {
        if let Some(ledger) = &mut self.ledger
            && let Err(err) = ledger.save()
        {
            tracing::warn!(err = %super::error_chain(&err), "cannot keep the record of what this peer gave");
        }
    }

    fn submitter_gone(&mut self, peer: PeerId, now: Instant) {
        self.intake.handle(IntakeEvent::SubmitterGone { peer }, now);
        self.jobs.retain(|k, _| k.0 != peer);
        self.ready.retain(|k, _| k.0 != peer);
        self.answers.retain(|k, _| k.0 != peer);
        self.started.retain(|k, _| k.0 != peer);
        self.fetches.retain(|k, _| k.0 != peer);
    }

    /// Drops what outlived its purpose: inputs of leases past their deadline that never
    /// started, answers whose report never came, jobs with nothing left.
    fn sweep(&mut self, now: Instant) {
        self.next_sweep = now + SWEEP_EVERY;
        self.today = today();
        self.save_ledger();
        let (started, aborts) = (&self.started, &self.aborts);
        self.unit_of
            .retain(|key, _| started.contains_key(key) || aborts.contains_key(key));
        let jobs = &self.jobs;
        self.answered.retain(|key, _| jobs.contains_key(key));
        self.ready.retain(|_, r| r.deadline > now);
        let stale: Vec<(PeerId, Digest)> = self
            .fetches
            .iter()
            .filter(|(_, f)| now.duration_since(f.since) >= FETCH_TIMEOUT)
            .map(|(k, _)| *k)
            .collect();
        for (from, digest) in stale {
            tracing::info!(peer = %from, %digest, "blob fetch made no progress; given up");
            self.fetches.remove(&(from, digest));
            self.blob_failed(from, digest, now);
        }
        self.answers
            .retain(|_, (_, at)| now.duration_since(*at) < ANSWER_TTL);
        self.started
            .retain(|_, (at, ..)| now.duration_since(*at) < ANSWER_TTL + MAX_UNIT_TIME);
        self.drop_idle_jobs();
    }

    /// Carries out what the intake asks.
    fn flush(&mut self) {
        while let Some(command) = self.intake.poll_command() {
            match command {
                IntakeCommand::Run(task) => self.start(task),
                IntakeCommand::Abort {
                    submitter,
                    job,
                    lease,
                } => {
                    // Revoked while it runs: its unit host is killed (a queued unit is dropped)
                    // and whatever it ends with is not kept.
                    if let Some(abort) = self.aborts.remove(&(submitter, job, lease)) {
                        abort.abort();
                    }
                }
                IntakeCommand::Report {
                    to,
                    job,
                    results,
                    want,
                } => self.report(to, job, results, want),
                IntakeCommand::Decline { to, job, leases } => {
                    for id in &leases {
                        self.ready.remove(&(to, job, *id));
                    }
                    self.decline(to, job, leases);
                }
            }
        }
    }

    fn start(&mut self, task: crate::schedule::Task) {
        let key = (task.submitter, task.job, task.lease.id);
        let ready = self.ready.remove(&key);
        let module = self
            .jobs
            .get(&(task.submitter, task.job))
            .and_then(|state| {
                let module = self
                    .modules
                    .get(&(state.spec.module, metering_of(&state.spec)))?;
                Some((state.spec.limits(), module))
            });
        let (Some(ready), Some((limits, module)), Some(exec)) = (ready, module, self.exec.as_ref())
        else {
            self.fail_now(key, "the lease's input or module is gone".into());
            return;
        };
        let mut request = UnitRequest::new(ready.input);
        request.limits = limits;
        let abort = Abort::new();
        request.abort = Some(abort.clone());
        let progress = Arc::new(UnitProgress::default());
        request.observer = Some(progress.clone());
        self.aborts.insert(key, abort);
        self.started
            .insert(key, (Instant::now(), ready.deadline, progress));
        self.unit_of.insert(key, task.lease.unit);
        let tx = self.inputs_tx.clone();
        let (submitter, job, lease) = key;
        let submitted = exec.submit(module, request, move |result| {
            // On a unit thread: waiting for room is the backpressure on the unit threads.
            let _ = tx.blocking_send(WorkInput::Done(Done {
                submitter,
                job,
                lease,
                result,
            }));
        });
        if let Err(err) = submitted {
            self.aborts.remove(&key);
            self.fail_now(key, err.to_string());
        }
    }

    /// Ends a lease that could not start as a host failure.
    fn fail_now(&mut self, key: LeaseKey, detail: String) {
        let now = Instant::now();
        self.answers
            .insert(key, (Err(UnitError::Host { detail }), now));
        let (submitter, job, lease) = key;
        self.intake.handle(
            IntakeEvent::Done {
                submitter,
                job,
                lease,
                outcome: Outcome::HostFailure,
            },
            now,
        );
    }

    fn report(
        &mut self,
        to: PeerId,
        job: Digest,
        results: Vec<crate::schedule::LeaseResult>,
        want: u32,
    ) {
        let mut frame = Vec::new();
        let mut bytes = 0usize;
        for r in results {
            let Some((result, _)) = self.answers.remove(&(to, job, r.lease)) else {
                continue;
            };
            let size = result.as_ref().map_or(256, Vec::len);
            if !frame.is_empty() && bytes + size > REPORT_BYTES {
                let results = std::mem::take(&mut frame);
                self.send(
                    &to,
                    JobFrame::Report {
                        job,
                        results,
                        want: 0,
                    },
                );
                bytes = 0;
            }
            bytes += size;
            frame.push(WireResult {
                lease: r.lease,
                result,
            });
        }
        self.send(
            &to,
            JobFrame::Report {
                job,
                results: frame,
                want,
            },
        );
    }
}

/// When a pause started at `now` ends, on this clock; `None` for one until resumed.
fn ends_at(pause: Pause, now: Instant) -> Option<Instant> {
    match pause {
        Pause::Indefinite => None,
        Pause::Until(until) => {
            let left = until
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            Some(
                now.checked_add(left)
                    .unwrap_or(now + crate::suspend::MAX_PAUSE),
            )
        }
    }
}

/// Serves a blob to a worker in chunks on `outbox`, each a slice of `bytes`; `None` answers
/// that it is missing.
pub(crate) async fn send_blob(outbox: &Outbox, digest: Digest, bytes: Option<Bytes>) -> bool {
    let Some(bytes) = bytes else {
        return outbox.send(&JobFrame::BlobMissing { digest }).await.is_ok();
    };
    let total = bytes.len() as u64;
    let mut offset = 0usize;
    loop {
        let end = (offset + SEND_CHUNK).min(bytes.len());
        let Ok(frame) =
            JobFrame::chunk_frame(digest, total, offset as u64, bytes.slice(offset..end))
        else {
            return false;
        };
        if outbox.send_frame(frame).await.is_err() {
            return false;
        }
        offset = end;
        if offset >= bytes.len() {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_received_in_order_into_one_buffer() {
        let mut blob = BlobBuffer::default();
        assert!(blob.push(10, 0, b"abcd"));
        // Out of order, again, or past the end: refused, and what arrived is kept.
        assert!(!blob.push(10, 0, b"abcd"));
        assert!(!blob.push(10, 6, b"gh"));
        assert!(!blob.push(10, 4, b"efghijk"));
        assert_eq!(blob.len(), 4);
        assert!(blob.push(10, 4, b"efghij"));
        let bytes = blob.complete(10).expect("every byte arrived");
        assert_eq!(&bytes[..], b"abcdefghij");

        let mut short = BlobBuffer::default();
        assert!(short.push(10, 0, b"abc"));
        assert!(short.complete(10).is_none());
        let empty = BlobBuffer::default();
        assert_eq!(empty.complete(0).as_deref(), Some(&[][..]));
    }
}
