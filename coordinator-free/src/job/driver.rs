//! The submitter's job loop, shared by every way of running a job's executions.
//!
//! [`run_job`] owns the sans-IO [`Scheduler`], the journal and the results file. Where the
//! executions happen is the [`Workers`] behind it: unit host processes on this machine
//! ([`super::local`]) or peers over the network ([`crate::node`]). Workers hand the scheduler
//! their capacity, carry out its offers and revocations, and report answers, declines and lost
//! peers as [`WorkerEvent`]s.
//!
//! Every decided unit is journaled in the [`JobStore`] (batched: one transaction per
//! [`COMMIT_BATCH`] units or [`COMMIT_INTERVAL`]) before its line is appended to
//! `results.jsonl`, so the results file never names a unit the journal lacks. On start the
//! journal's units are restored into the scheduler and never run again, and `results.jsonl` is
//! rewritten from the journal. Real peers' reputations are updated in the store as units are
//! decided.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bitset::BitSet;
use crate::digest::Digest;
use crate::host::Host;
use crate::job::inputs::{InputError, UnitSource};
use crate::job::manifest::JobManifest;
use crate::job::results::{ResultLine, Status, output_value};
use crate::peer_id::PeerId;
use crate::sandbox::{Limits, OutcomeClass, PROFILE, UnitError};
use crate::schedule::{
    Command, Config, Culprit, Event, Lease, LeaseId, LeaseResult, Penalty, Scheduler, TrustStats,
    Validation,
};
use crate::store::{
    JobRecord, JobStore, JobTimes, MAX_REPUTATIONS, Reputation, StoreError, UNIT_BATCH,
};
use crate::validate::trust::TrustConfig;
use crate::validate::{Outcome, Policy, Verdict, Vote};

/// Most decided units journaled in one transaction.
pub const COMMIT_BATCH: usize = 1024;
/// Longest a decided unit waits for its transaction.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// How often the progress callback is called while the job runs.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// Distinct error messages kept per unit as evidence.
const MAX_ERRORS_PER_UNIT: usize = 8;

/// Why a job could not run.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job has more units than the scheduler indexes.
    #[error("the job has {0} units, more than a job can index")]
    TooManyUnits(usize),
    /// The journal failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A journaled unit does not belong to this job as loaded now.
    #[error("the journal holds unit {index}, which this job does not have")]
    Journal {
        /// The unit's index.
        index: u64,
    },
    /// The results file could not be written.
    #[error("cannot write {path}: {source}")]
    Results {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The unit threads could not take work.
    #[error("the executor stopped taking units")]
    Executor,
    /// The network side of the job stopped.
    #[error("the peer running the job stopped")]
    NodeStopped,
    /// The journal holds this job under another engine profile: its results were computed
    /// by another engine and cannot be mixed with this one's.
    #[error(
        "the journal holds this job under engine profile {stored}, but this worker runs {current}; \
         run it with a worker of that profile, or use another data directory"
    )]
    Profile {
        /// The journal's profile.
        stored: String,
        /// This worker's.
        current: &'static str,
    },
    /// A unit's input could not be read, or its file changed since the job started.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The manifest's `trusted` file could not be read.
    #[error(transparent)]
    Trusted(crate::job::manifest::ManifestError),
    /// Open units remain but none can be handed out and none is running: a bug, reported
    /// rather than waited on forever.
    #[error("the job stalled with {open} units open and nothing running")]
    Stalled {
        /// Units neither accepted nor failed.
        open: u32,
    },
}

/// How a decided unit is journaled: its verdict and, when the accepted digest is known here,
/// what it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    /// The validator's verdict.
    pub verdict: Verdict,
    /// The accepted output bytes, or the message of the deterministic error a quorum agreed on.
    pub result: Option<Result<Vec<u8>, String>>,
    /// Error messages seen among the executions, for the evidence of a failed unit.
    pub errors: Vec<String>,
    /// How the verdict was reached: a quorum, or one trusted peer's word.
    pub validation: Validation,
}

/// The record as journals made before adaptive replication hold it: every verdict a quorum's.
#[derive(Deserialize)]
struct UnitRecordV1 {
    verdict: Verdict,
    result: Option<Result<Vec<u8>, String>>,
    errors: Vec<String>,
}

impl UnitRecord {
    /// Reads a journaled record, of this format or the one before it.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        postcard::from_bytes::<Self>(bytes).or_else(|_| {
            let old: UnitRecordV1 =
                postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
                    what: "unit record",
                    detail: e.to_string(),
                })?;
            Ok(Self {
                verdict: old.verdict,
                result: old.result,
                errors: old.errors,
                validation: Validation::Quorum,
            })
        })
    }

    /// Whether the unit produced an accepted output (not an agreed error, not a failure).
    pub fn succeeded(&self) -> bool {
        self.verdict.is_accepted() && matches!(self.result, Some(Ok(_)))
    }
}

/// Where a job stands, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobProgress {
    /// Units in the job.
    pub units: u32,
    /// Units with an accepted output (restored ones included).
    pub accepted: u32,
    /// Units that failed (restored ones included).
    pub failed: u32,
    /// Executions under way now.
    pub running: u32,
    /// Peers that answered at least one execution in this run.
    pub peers: u32,
    /// Units decided in this run.
    pub decided_now: u32,
    /// Units taken from the journal.
    pub restored: u32,
    /// Time since this run started.
    pub elapsed: Duration,
    /// Distinct hosts (as placement counts them) that have offered room in this run.
    pub hosts: u32,
    /// Distinct hosts a unit needs to be accepted.
    pub quorum: u32,
    /// Executions each unit starts with.
    pub replicas: u32,
}

impl JobProgress {
    /// Whether units are open but fewer distinct hosts have come forward than a unit needs,
    /// so they cannot be accepted until more do.
    pub fn short_of_hosts(&self) -> bool {
        self.accepted + self.failed < self.units && self.hosts < self.quorum
    }

    /// Whether enough hosts take part to accept units, but fewer than the replicas each unit
    /// starts with: a unit then runs on as many hosts as there are.
    pub fn short_of_replicas(&self) -> bool {
        self.accepted + self.failed < self.units
            && self.hosts >= self.quorum
            && self.hosts < self.replicas
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSummary {
    /// The job id (content address of the module, inputs, limits and redundancy).
    pub job: Digest,
    /// Units in the job.
    pub units: u32,
    /// Units with an accepted output.
    pub accepted: u32,
    /// Units that failed, including those whose executions agreed on an error.
    pub failed: u32,
    /// Units taken from the journal and not run again.
    pub restored: u32,
    /// Distinct units executed at least once in this run.
    pub units_run: u32,
    /// Executions answered in this run (replicas and retries included).
    pub executions: u64,
    /// Executions whose result disagreed with the accepted one.
    pub dissents: u64,
    /// Executions that ended in a host failure (timeout, crash, lost peer).
    pub host_failures: u64,
    /// Answers per peer in this run, the submitter's own executions included.
    pub peers: BTreeMap<PeerId, u64>,
    /// Peers that returned a result other than an accepted quorum's, with how often.
    pub dissenters: BTreeMap<PeerId, u64>,
    /// Peers and hosts charged with failures (host failures, expired leases, lost links), and
    /// whether they were given no leases for a while.
    pub penalties: Vec<(Culprit, Penalty)>,
    /// Units journaled as failed by host failures or cancellation that this run took up again.
    pub retried: u32,
    /// Units decided in this run by how they were validated (a unit decided twice, as it was
    /// decided last): `quorum`, `trusted`, `spot-checked`, `vouched`, `re-validated`.
    pub validated: BTreeMap<&'static str, u64>,
    /// Units accepted on a trusted peer's word and run again because that peer (or another key
    /// of its host) was caught lying: in this run, or journaled earlier and caught since.
    pub revalidated: u32,
    /// Peers caught lying while trusted, whose alone results were run again.
    pub caught: std::collections::BTreeSet<PeerId>,
    /// Adaptive replication's counters for this run (all zero when it is off).
    pub trust: TrustStats,
    /// Other jobs in the journal with units accepted on the word of a peer caught in this run:
    /// their name, id and how many such units. Resuming them runs those units again.
    pub suspect_jobs: Vec<(String, Digest, u64)>,
    /// Whether the peers are simulated ids of local execution slots rather than real peers.
    pub simulated_peers: bool,
    /// The results file.
    pub results: PathBuf,
    /// Wall-clock time of this run.
    pub elapsed: Duration,
    /// The first failed units, by index, with their errors (at most [`FIRST_FAILED`]).
    pub first_failed: Vec<(u64, String)>,
    /// Units whose result was taken from an earlier job's unit of the same content.
    pub reused: u32,
}

impl JobSummary {
    /// Whether every unit was accepted.
    pub fn succeeded(&self) -> bool {
        self.failed == 0 && self.accepted == self.units
    }
}

/// The parts of a job its workers need: the id, the module, the inputs and the limits.
#[derive(Debug)]
pub struct JobData {
    /// The job id.
    pub id: Digest,
    /// The manifest's name, which workers show their volunteers.
    pub name: String,
    /// The module's digest.
    pub module: Digest,
    /// Where each unit's input comes from, read when the unit needs it.
    pub source: std::sync::Arc<UnitSource>,
    /// Every unit's limits.
    pub limits: Limits,
}

impl JobData {
    /// The job of `manifest` over the inputs of `source`, whose module has digest `module`;
    /// its id is [`job_id`](crate::job::local::job_id).
    pub fn new(manifest: &JobManifest, source: UnitSource, module: Digest) -> Self {
        Self {
            id: crate::job::local::job_id(&module, manifest, &source),
            name: manifest.name.clone(),
            module,
            source: std::sync::Arc::new(source),
            limits: manifest.unit_limits(),
        }
    }

    /// How many units the job has.
    pub fn count(&self) -> u64 {
        self.source.len()
    }

    /// Unit `unit`'s input bytes.
    pub fn input(&self, unit: u32) -> Result<Vec<u8>, JobError> {
        Ok(self.source.input(u64::from(unit))?)
    }
}

/// Carries out the scheduler's queued commands: offers go to `workers`, everything else to
/// `other`. What [`Workers::refill`] implementations call after handing out capacity.
pub fn route_commands<W: Workers>(
    workers: &mut W,
    scheduler: &mut Scheduler,
    job: &JobData,
    other: &mut dyn FnMut(Command),
) -> Result<(), JobError> {
    while let Some(command) = scheduler.poll_command() {
        match command {
            Command::Offer { to, leases, .. } => workers.offer(to, leases, job)?,
            command => other(command),
        }
    }
    Ok(())
}

/// What workers report to the job loop.
#[derive(Debug)]
pub enum WorkerEvent {
    /// An execution ended. `result` is the output or the error the executing peer reported.
    Answer {
        peer: PeerId,
        lease: LeaseId,
        result: Result<Vec<u8>, UnitError>,
    },
    /// `peer` takes up to `slots` more leases now; its connection comes from `host`.
    Available {
        peer: PeerId,
        slots: u32,
        host: Host,
    },
    /// `peer` refused leases without running them.
    Declined { peer: PeerId, leases: Vec<LeaseId> },
    /// `peer` is gone; its leases are lost.
    Gone { peer: PeerId },
}

/// Where a job's executions run.
pub trait Workers {
    /// Gives the scheduler the capacity free now and carries out the offers it makes; passes
    /// every other command to `other`. Called once per turn of the loop.
    fn refill(
        &mut self,
        scheduler: &mut Scheduler,
        job: &JobData,
        now: Instant,
        other: &mut dyn FnMut(Command),
    ) -> Result<(), JobError>;
    /// Starts `leases` on `to`.
    fn offer(&mut self, to: PeerId, leases: Vec<Lease>, job: &JobData) -> Result<(), JobError>;
    /// Tells `to` these leases are no longer wanted.
    fn revoke(&mut self, to: PeerId, leases: Vec<LeaseId>, job: &JobData);
    /// Waits until `until` or until something happened, and returns what happened.
    fn wait(&mut self, until: Instant) -> Result<Vec<WorkerEvent>, JobError>;
    /// Executions handed out and not yet answered.
    fn running(&self) -> u32;
    /// Whether a job with open units and nothing running can still make progress (peers may
    /// still arrive), or has stalled.
    fn may_progress(&self) -> bool;
    /// Whether peer ids are simulated local slots (no reputation is kept for them).
    fn simulated(&self) -> bool;
    /// The peers the submitting node admits alone (its `--allow` list), if it has one.
    fn allowed(&self) -> Vec<PeerId> {
        Vec::new()
    }
    /// Tells `to` the verdict reached on `unit`, which it answered: its answer was `accepted`
    /// or found wrong. For the volunteer's own record; nothing depends on its arrival.
    fn judge(&mut self, _to: PeerId, _unit: u32, _accepted: bool) {}
}

/// What an execution said, kept until its unit is decided.
enum Said {
    Output(Vec<u8>),
    Error(String),
}

/// The scheduler configuration and seed of a job.
pub fn scheduler_for(job: &JobData, policy: Policy, config: Config, count: u32) -> Scheduler {
    let seed = u64::from_le_bytes(job.id.0[..8].try_into().unwrap_or([0; 8]));
    Scheduler::new(job.id, count, policy, config, seed)
}

/// Runs the job to its end, resuming from the journal; `progress` is called a few times a
/// second and once at the end.
pub fn run_job<W: Workers>(
    manifest: &JobManifest,
    job: &JobData,
    config: Config,
    workers: &mut W,
    store: &JobStore,
    out_dir: &std::path::Path,
    mut progress: impl FnMut(&JobProgress),
) -> Result<JobSummary, JobError> {
    let started = Instant::now();
    let count = u32::try_from(job.count())
        .map_err(|_| JobError::TooManyUnits(usize::try_from(job.count()).unwrap_or(usize::MAX)))?;
    let policy = Policy::from(manifest.redundancy);
    let config = Config {
        placement: manifest.redundancy.placement,
        ..config
    };
    if let Some(stored) = store.job(&job.id)?
        && stored.profile != PROFILE
    {
        return Err(JobError::Profile {
            stored: stored.profile,
            current: PROFILE,
        });
    }
    store.put_job(
        &job.id,
        &JobRecord {
            name: manifest.name.clone(),
            module: job.module,
            units: u64::from(count),
            replicas: policy.replicas,
            quorum: policy.quorum,
            max_attempts: policy.max_attempts,
            profile: PROFILE.to_owned(),
        },
    )?;
    // First submitted when; a run starting now has not finished, and resumes a cancelled job.
    let times = match store.times(&job.id)? {
        Some(t) => JobTimes {
            finished_ms: None,
            cancelled: false,
            ..t
        },
        None => JobTimes {
            started_ms: unix_ms(),
            finished_ms: None,
            cancelled: false,
        },
    };
    store.put_times(&job.id, &times)?;
    // Adaptive replication needs real peers: a machine's own slots have no trust to earn.
    let trust = if manifest.redundancy.adaptive && !workers.simulated() {
        let mut trust = store.trust(TrustConfig::default())?;
        trust.vouch(manifest.trusted_peers().map_err(JobError::Trusted)?);
        if manifest.redundancy.trust_allow_list {
            trust.vouch(workers.allowed());
        }
        Some(trust)
    } else {
        None
    };
    let mut scheduler = scheduler_for(job, policy, config, count).with_trust(trust);

    // Resume: restore every journaled unit and rewrite the results file from the journal.
    let results_path = out_dir.join("results.jsonl");
    let results_err = |source| JobError::Results {
        path: results_path.clone(),
        source,
    };
    std::fs::create_dir_all(out_dir).map_err(results_err)?;
    let mut state = State::new(count);
    state.context = content_context(job, workers.simulated());
    let restored_from = Restore {
        job,
        policy,
        adaptive: manifest.redundancy.adaptive,
    };
    let tmp = out_dir.join("results.jsonl.tmp");
    let (restored, retried, reused) = {
        let mut file = BufWriter::new(File::create(&tmp).map_err(results_err)?);
        let counts = restored_from
            .run(store, &mut scheduler, &mut state, &mut file)
            .map_err(|e| match e {
                RewriteError::Store(e) => JobError::Store(e),
                RewriteError::Input(e) => JobError::Input(e),
                RewriteError::Io(source) => results_err(source),
            })?;
        file.flush().map_err(results_err)?;
        file.get_ref().sync_all().map_err(results_err)?;
        counts
    };
    std::fs::rename(&tmp, &results_path).map_err(results_err)?;
    let mut results = BufWriter::new(
        std::fs::OpenOptions::new()
            .append(true)
            .open(&results_path)
            .map_err(results_err)?,
    );

    let mut ran = BitSet::new(count);
    let mut last_progress = Instant::now();
    state.finished = scheduler.is_finished();
    let snapshot = |state: &State, workers: &W, scheduler: &Scheduler| JobProgress {
        hosts: scheduler.progress().hosts,
        quorum: policy.quorum,
        replicas: policy.replicas,
        units: count,
        accepted: state.accepted,
        failed: state.failed,
        running: workers.running(),
        peers: u32::try_from(state.answers.len()).unwrap_or(u32::MAX),
        decided_now: state.decided_now,
        restored,
        elapsed: started.elapsed(),
    };
    progress(&snapshot(&state, workers, &scheduler));

    while !state.finished || !state.pending.is_empty() {
        if !state.finished {
            let mut deferred = Vec::new();
            workers.refill(&mut scheduler, job, Instant::now(), &mut |c| {
                deferred.push(c)
            })?;
            for command in deferred {
                state.on_command(command, workers, job)?;
            }
        }

        if workers.running() == 0 && !state.finished && !workers.may_progress() {
            let p = scheduler.progress();
            return Err(JobError::Stalled {
                open: p.units.saturating_sub(p.accepted + p.failed),
            });
        }

        // Journal, then append: the results file never runs ahead of the journal.
        let due = state
            .pending_since
            .is_some_and(|t| t.elapsed() >= COMMIT_INTERVAL);
        if state.pending.len() >= COMMIT_BATCH
            || (due || state.finished) && !state.pending.is_empty()
        {
            state.commit(store, job, &mut results, workers.simulated(), &results_path)?;
            results.flush().map_err(results_err)?;
            if let Some(trust) = scheduler.trust_mut() {
                store.put_trust(&trust.take_changes())?;
            }
        }
        if state.finished && state.pending.is_empty() {
            break;
        }

        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = Instant::now();
            progress(&snapshot(&state, workers, &scheduler));
        }

        // Wait for an answer, the next lease deadline, the commit interval or the next
        // progress report, whichever comes first.
        let mut wake = Instant::now() + PROGRESS_INTERVAL;
        if let Some(at) = scheduler.poll_timeout() {
            wake = wake.min(at);
        }
        if let Some(since) = state.pending_since {
            wake = wake.min(since + COMMIT_INTERVAL);
        }
        let events = workers.wait(wake)?;
        let now = Instant::now();
        let mut by_peer: BTreeMap<PeerId, Vec<LeaseResult>> = BTreeMap::new();
        for event in events {
            match event {
                WorkerEvent::Answer {
                    peer,
                    lease,
                    result,
                } => {
                    let unit = scheduler.lease_unit(lease, &peer);
                    if let Some(unit) = unit {
                        ran.insert(unit);
                    }
                    let outcome = state.answer(&scheduler, peer, unit, result);
                    by_peer
                        .entry(peer)
                        .or_default()
                        .push(LeaseResult { lease, outcome });
                }
                WorkerEvent::Available { peer, slots, host } => {
                    scheduler.handle(Event::Available { peer, slots, host }, now);
                }
                WorkerEvent::Declined { peer, leases } => {
                    scheduler.handle(Event::Declined { from: peer, leases }, now);
                }
                WorkerEvent::Gone { peer } => scheduler.handle(Event::PeerGone { peer }, now),
            }
            // Route whatever the event asked for at once: offers and revocations go out, and
            // decided units join the journal's next batch.
            while let Some(command) = scheduler.poll_command() {
                state.on_command(command, workers, job)?;
            }
        }
        for (from, results) in by_peer {
            scheduler.handle(Event::Results { from, results }, now);
            while let Some(command) = scheduler.poll_command() {
                state.on_command(command, workers, job)?;
            }
        }
        scheduler.handle_timeout(now);
        while let Some(command) = scheduler.poll_command() {
            state.on_command(command, workers, job)?;
        }
    }
    results.flush().map_err(results_err)?;
    results.get_ref().sync_all().map_err(results_err)?;
    drop(results);
    if let Some(trust) = scheduler.trust_mut() {
        store.put_trust(&trust.take_changes())?;
    }
    let suspect_jobs = if state.caught.is_empty() {
        Vec::new()
    } else {
        suspect_jobs(store, job.id, scheduler.trust())?
    };
    // Lines were appended in completion order, and a unit decided twice has two: the file is
    // rewritten from the journal, one line per unit, in unit order.
    let first_failed = rewrite_results(store, job, &results_path).map_err(|e| match e {
        RewriteError::Store(e) => JobError::Store(e),
        RewriteError::Input(e) => JobError::Input(e),
        RewriteError::Io(source) => JobError::Results {
            path: results_path.clone(),
            source,
        },
    })?;
    if state.accepted + state.failed >= count {
        let mut times = store.times(&job.id)?.unwrap_or_default();
        times.finished_ms = Some(unix_ms());
        store.put_times(&job.id, &times)?;
    }
    progress(&snapshot(&state, workers, &scheduler));
    Ok(JobSummary {
        job: job.id,
        units: count,
        accepted: state.accepted,
        failed: state.failed,
        restored,
        units_run: ran.count(),
        executions: state.executions,
        dissents: state.dissenters.values().sum(),
        host_failures: state.host_failures,
        peers: state.answers,
        dissenters: state.dissenters,
        penalties: scheduler.penalties(Instant::now()),
        retried,
        validated: state.validations,
        revalidated: u32::try_from(scheduler.trust_stats().revalidated).unwrap_or(u32::MAX),
        caught: state.caught,
        trust: *scheduler.trust_stats(),
        suspect_jobs,
        simulated_peers: workers.simulated(),
        results: results_path,
        elapsed: started.elapsed(),
        first_failed,
        reused,
    })
}

/// The job loop's bookkeeping between scheduler, journal and results file. What it keeps per
/// unit of the job is bits; per unit under way, what its executions said.
#[derive(Default)]
struct State {
    said: BTreeMap<u32, BTreeMap<Digest, Said>>,
    errors: BTreeMap<u32, Vec<String>>,
    pending: Vec<(u64, UnitRecord)>,
    pending_since: Option<Instant>,
    finished: bool,
    accepted: u32,
    failed: u32,
    decided_now: u32,
    executions: u64,
    host_failures: u64,
    answers: BTreeMap<PeerId, u64>,
    dissenters: BTreeMap<PeerId, u64>,
    /// Reputations changed since the last commit.
    reputations: BTreeMap<PeerId, Reputation>,
    /// Every unit decided so far (restored or in this run) ...
    decided_units: BitSet,
    /// ... and of those, the ones that succeeded.
    succeeded: BitSet,
    /// Units decided in this run by how they were validated last.
    validations: BTreeMap<&'static str, u64>,
    /// How units decided in this run on one peer's word were validated, the only ones that
    /// can be decided again (run anew after that peer was caught).
    provisional: std::collections::HashMap<u32, &'static str>,
    /// Units decided a second time in this run.
    redecided: u32,
    /// Peers whose alone results were run again in this run.
    caught: std::collections::BTreeSet<PeerId>,
    /// What determines the result of every unit of the job besides its input.
    context: Digest,
}

impl State {
    fn new(count: u32) -> Self {
        Self {
            decided_units: BitSet::new(count),
            succeeded: BitSet::new(count),
            ..Self::default()
        }
    }

    /// Records that `unit` is decided, and whether it succeeded; returns how it was decided
    /// before, if it was.
    fn mark_decided(&mut self, unit: u32, succeeded: bool) -> Option<bool> {
        let earlier = self
            .decided_units
            .contains(unit)
            .then(|| self.succeeded.contains(unit));
        self.decided_units.insert(unit);
        if succeeded {
            self.succeeded.insert(unit);
        } else {
            self.succeeded.remove(unit);
        }
        earlier
    }

    /// `unit`'s content key.
    fn content_key(&self, job: &JobData, unit: u32) -> Result<[u8; 64], InputError> {
        let input = match job.source.known(u64::from(unit)) {
            Some((_, digest)) => digest,
            None => Digest::of(&job.source.input(u64::from(unit))?),
        };
        Ok(content_key(&self.context, &input))
    }
}

/// What determines a unit's result besides its input: the engine profile, the module, the
/// unit's limits, and whether its replicas ran on real peers or on this machine's own slots
/// (whose agreement proves less). With the input's digest it makes a unit's content key: two
/// units with the same key produce the same bytes on every honest peer, whatever job they
/// belong to.
pub fn content_context(job: &JobData, simulated: bool) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"coordinator-free/unit-result/v2\0");
    h.update(&(PROFILE.len() as u64).to_le_bytes());
    h.update(PROFILE.as_bytes());
    h.update(&job.module.0);
    let limits = postcard::to_stdvec(&job.limits).unwrap_or_default();
    h.update(&(limits.len() as u64).to_le_bytes());
    h.update(&limits);
    h.update(&[u8::from(simulated)]);
    Digest(*h.finalize().as_bytes())
}

/// A unit's content key: its job's [`content_context`] followed by its input's digest.
pub fn content_key(context: &Digest, input: &Digest) -> [u8; 64] {
    let mut key = [0; 64];
    key[..32].copy_from_slice(&context.0);
    key[32..].copy_from_slice(&input.0);
    key
}

/// Whether a journaled record may stand for a unit of a job asking `quorum` agreeing hosts:
/// an accepted result agreed by at least that many, or, for an adaptive job, one accepted on a
/// trusted or vouched peer's word (provisional as it was, and re-validated like it if its peer
/// is caught).
fn reusable(record: &UnitRecord, quorum: u32, adaptive: bool) -> bool {
    let Verdict::Accepted { agreeing, .. } = &record.verdict else {
        return false;
    };
    if record.result.is_none() {
        return false;
    }
    match record.validation {
        Validation::Trusted { .. } | Validation::Vouched { .. } => adaptive,
        Validation::Quorum | Validation::SpotChecked { .. } | Validation::Revalidated { .. } => {
            agreeing.len() as u64 >= u64::from(quorum)
        }
    }
}

/// The other jobs of the journal holding units accepted alone by a peer, or a host, caught
/// since they were accepted.
fn suspect_jobs(
    store: &JobStore,
    this: Digest,
    trust: Option<&crate::validate::trust::Trust>,
) -> Result<Vec<(String, Digest, u64)>, JobError> {
    let Some(trust) = trust else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (id, record) in store.jobs()? {
        if id == this {
            continue;
        }
        let mut suspect = 0u64;
        store.each_unit(&id, |_, bytes| {
            suspect += u64::from(suspect_record(trust, bytes));
            Ok::<_, StoreError>(())
        })?;
        if suspect > 0 {
            out.push((record.name, id, suspect));
        }
    }
    Ok(out)
}

/// Whether a journaled record was accepted on the word of a peer, or a host, caught since.
fn suspect_record(trust: &crate::validate::trust::Trust, bytes: &[u8]) -> bool {
    matches!(
        UnitRecord::decode(bytes),
        Ok(UnitRecord {
            validation:
                Validation::Trusted {
                    peer,
                    host,
                    standing,
                    ..
                },
            ..
        }) if trust.peer(&peer).caught > standing.0.caught
            || trust.host(&host).caught > standing.1.caught
    )
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

enum RewriteError {
    Store(StoreError),
    Io(std::io::Error),
    Input(InputError),
}

impl From<StoreError> for RewriteError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// How a job takes up what the journal holds before it runs anything: its own decided
/// units, then units of earlier jobs with the same content.
struct Restore<'a> {
    job: &'a JobData,
    policy: Policy,
    adaptive: bool,
}

impl Restore<'_> {
    /// Restores the journal's units into the scheduler and writes their lines to `file`, a
    /// batch at a time; then looks for results to reuse by content. Returns how many units
    /// were restored, how many journaled failures run again, and how many were reused.
    fn run(
        &self,
        store: &JobStore,
        scheduler: &mut Scheduler,
        state: &mut State,
        file: &mut impl Write,
    ) -> Result<(u32, u32, u32), RewriteError> {
        let count = scheduler.unit_count();
        let mut journaled = BitSet::new(count);
        let mut restored = 0u32;
        let mut retried = 0u32;
        store.each_unit(&self.job.id, |index, bytes| {
            let unit =
                u32::try_from(index)
                    .ok()
                    .filter(|u| *u < count)
                    .ok_or(RewriteError::Store(StoreError::Corrupt {
                        what: "unit index",
                        detail: format!("unit {index} of a job of {count}"),
                    }))?;
            journaled.insert(unit);
            match self.restore_one(scheduler, state, unit, bytes, file)? {
                Some(true) => restored += 1,
                Some(false) => retried += 1,
                None => {}
            }
            Ok::<_, RewriteError>(())
        })?;
        let reused = self.reuse(store, scheduler, state, &journaled, file)?;
        Ok((restored + reused, retried, reused))
    }

    /// Restores one journaled record: `Some(true)` kept, `Some(false)` a failure run again,
    /// `None` accepted on the word of a peer caught since (run again, counted as
    /// re-validated by the scheduler).
    fn restore_one(
        &self,
        scheduler: &mut Scheduler,
        state: &mut State,
        unit: u32,
        bytes: &[u8],
        file: &mut impl Write,
    ) -> Result<Option<bool>, RewriteError> {
        let record = UnitRecord::decode(bytes).map_err(RewriteError::Store)?;
        let kept = scheduler
            .restore_with(unit, record.verdict.clone(), record.validation)
            .map_err(|e| {
                RewriteError::Store(StoreError::Corrupt {
                    what: "journaled unit",
                    detail: e.to_string(),
                })
            })?;
        if !kept {
            // Failed by the machines, not by the unit, or accepted on the word of a peer
            // caught lying since: it runs again and its line is written when it is decided
            // anew.
            return Ok((!record.verdict.is_accepted()).then_some(false));
        }
        state.mark_decided(unit, record.succeeded());
        if record.succeeded() {
            state.accepted += 1;
        } else {
            state.failed += 1;
        }
        let origin = self
            .job
            .source
            .origin(u64::from(unit))
            .map_err(RewriteError::Input)?;
        write_line(file, u64::from(unit), origin, &record).map_err(RewriteError::Io)?;
        Ok(Some(true))
    }

    /// Results reused by content: a unit this job has not journaled whose module, input,
    /// limits and engine profile some earlier job's unit had is taken from that unit's
    /// record, when its validation is as strong as this job asks, and journaled as this job's
    /// own. Looked for only when some result of this module and these limits was ever
    /// journaled, so a new module costs nothing here.
    fn reuse(
        &self,
        store: &JobStore,
        scheduler: &mut Scheduler,
        state: &mut State,
        journaled: &BitSet,
        file: &mut impl Write,
    ) -> Result<u32, RewriteError> {
        if !store
            .has_content(&state.context)
            .map_err(RewriteError::Store)?
        {
            return Ok(0);
        }
        let (quorum, adaptive) = (self.policy.quorum, self.adaptive);
        let count = scheduler.unit_count();
        let mut reused = 0u32;
        let mut unit = 0u32;
        while unit < count {
            let end = unit.saturating_add(UNIT_BATCH as u32).min(count);
            let mut wanted = Vec::new();
            for u in (unit..end).filter(|u| !journaled.contains(*u)) {
                let key = state
                    .content_key(self.job, u)
                    .map_err(RewriteError::Input)?;
                wanted.push((u64::from(u), key));
            }
            unit = end;
            let found = store
                .reusable(&wanted, |bytes| {
                    UnitRecord::decode(bytes).is_ok_and(|r| reusable(&r, quorum, adaptive))
                })
                .map_err(RewriteError::Store)?;
            if found.is_empty() {
                continue;
            }
            store
                .put_units(&self.job.id, &found)
                .map_err(RewriteError::Store)?;
            for (index, bytes) in &found {
                let u = u32::try_from(*index).unwrap_or(u32::MAX);
                if self.restore_one(scheduler, state, u, bytes, file)? == Some(true) {
                    reused += 1;
                }
            }
        }
        Ok(reused)
    }
}

/// Failed units a summary names.
pub const FIRST_FAILED: usize = 5;

/// Writes `path` anew from the journal: one line per decided unit, in unit order. Returns the
/// first failed units (at most [`FIRST_FAILED`]) with their errors.
fn rewrite_results(
    store: &JobStore,
    job: &JobData,
    path: &std::path::Path,
) -> Result<Vec<(u64, String)>, RewriteError> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut file = BufWriter::new(File::create(&tmp).map_err(RewriteError::Io)?);
    let mut first_failed = Vec::new();
    store.each_unit(&job.id, |index, bytes| {
        if index >= job.count() {
            return Ok(());
        }
        let record = UnitRecord::decode(bytes).map_err(RewriteError::Store)?;
        let origin = job.source.origin(index).map_err(RewriteError::Input)?;
        let line = result_line(index, origin, &record);
        if line.status == Status::Failed && first_failed.len() < FIRST_FAILED {
            first_failed.push((
                index,
                line.error
                    .clone()
                    .unwrap_or_else(|| "no error reported".into()),
            ));
        }
        write_result(&mut file, &line).map_err(RewriteError::Io)
    })?;
    file.flush().map_err(RewriteError::Io)?;
    file.get_ref().sync_all().map_err(RewriteError::Io)?;
    std::fs::rename(&tmp, path).map_err(RewriteError::Io)?;
    Ok(first_failed)
}

/// The summary's name for how a unit was validated.
fn validation_kind(v: &Validation) -> &'static str {
    match v {
        Validation::Quorum => "quorum",
        Validation::Trusted { .. } => "trusted",
        Validation::SpotChecked { .. } => "spot-checked",
        Validation::Vouched { .. } => "vouched",
        Validation::Revalidated { .. } => "re-validated",
    }
}

impl State {
    /// Turns one execution's answer into its vote, keeping what it said while its unit is open.
    fn answer(
        &mut self,
        scheduler: &Scheduler,
        peer: PeerId,
        unit: Option<u32>,
        result: Result<Vec<u8>, UnitError>,
    ) -> Outcome {
        self.executions += 1;
        *self.answers.entry(peer).or_default() += 1;
        // Answers for decided or unknown units keep nothing; the scheduler counts them.
        let open = unit.filter(|u| scheduler.unit(*u).is_some_and(|t| t.is_open()));
        match result {
            Ok(bytes) => {
                let digest = Digest::of(&bytes);
                if let Some(unit) = open {
                    self.said
                        .entry(unit)
                        .or_default()
                        .insert(digest, Said::Output(bytes));
                }
                Outcome::Output(digest)
            }
            Err(error) => {
                let message = error.to_string();
                if let Some(unit) = open {
                    let entry = self.errors.entry(unit).or_default();
                    if !entry.contains(&message) && entry.len() < MAX_ERRORS_PER_UNIT {
                        entry.push(message.clone());
                    }
                }
                match error.class() {
                    OutcomeClass::Deterministic => {
                        let encoded = postcard::to_stdvec(&error).unwrap_or_default();
                        let outcome = Outcome::deterministic_error(&encoded);
                        if let (Some(unit), Outcome::Output(digest)) = (open, outcome) {
                            self.said
                                .entry(unit)
                                .or_default()
                                .insert(digest, Said::Error(message));
                        }
                        outcome
                    }
                    OutcomeClass::HostFailure => {
                        self.host_failures += 1;
                        Outcome::HostFailure
                    }
                }
            }
        }
    }

    /// Carries out a scheduler command.
    fn on_command<W: Workers>(
        &mut self,
        command: Command,
        workers: &mut W,
        job: &JobData,
    ) -> Result<(), JobError> {
        match command {
            Command::Offer { to, leases, .. } => workers.offer(to, leases, job)?,
            Command::Revoke { to, leases, .. } => workers.revoke(to, leases, job),
            Command::Decided {
                unit,
                verdict,
                validation,
            } => {
                if let Verdict::Accepted {
                    agreeing,
                    dissenters,
                    ..
                } = &verdict
                {
                    for w in agreeing {
                        workers.judge(w.peer, unit, true);
                    }
                    for vote in dissenters {
                        workers.judge(vote.peer, unit, false);
                    }
                }
                self.decided(unit, verdict, validation)
            }
            Command::Finished { .. } => self.finished = true,
        }
        Ok(())
    }

    fn decided(&mut self, unit: u32, verdict: Verdict, validation: Validation) {
        let kind = validation_kind(&validation);
        // A unit decided again (run anew after its trusted peer was caught) counts once, as
        // it was decided last.
        let earlier = self.provisional.remove(&unit);
        if matches!(
            validation,
            Validation::Trusted { .. } | Validation::Vouched { .. }
        ) {
            self.provisional.insert(unit, kind);
        }
        if let Some(earlier) = earlier
            && let Some(n) = self.validations.get_mut(earlier)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.validations.remove(earlier);
            }
        }
        *self.validations.entry(kind).or_default() += 1;
        if let Validation::Revalidated { caught } = validation {
            self.caught.insert(caught);
        }
        let mut seen = self.said.remove(&unit).unwrap_or_default();
        let errors = self.errors.remove(&unit).unwrap_or_default();
        let result = verdict
            .digest()
            .and_then(|d| seen.remove(&d))
            .map(|s| match s {
                Said::Output(bytes) => Ok(bytes),
                Said::Error(message) => Err(message),
            });
        if let Verdict::Accepted {
            agreeing,
            dissenters,
            ..
        } = &verdict
        {
            for w in agreeing {
                let r = self.reputations.entry(w.peer).or_default();
                r.host = Some(w.host);
                r.agreements += 1;
                r.consecutive_agreements += 1;
            }
            for vote in dissenters {
                *self.dissenters.entry(vote.peer).or_default() += 1;
                let r = self.reputations.entry(vote.peer).or_default();
                r.host = Some(vote.host);
                r.disagreements += 1;
                r.consecutive_agreements = 0;
            }
        }
        self.pending.push((
            u64::from(unit),
            UnitRecord {
                verdict,
                result,
                errors,
                validation,
            },
        ));
        self.pending_since.get_or_insert_with(Instant::now);
    }

    /// Journals the pending units, then appends their lines; updates real peers'
    /// reputations.
    fn commit(
        &mut self,
        store: &JobStore,
        job: &JobData,
        results: &mut impl Write,
        simulated: bool,
        results_path: &std::path::Path,
    ) -> Result<(), JobError> {
        let batch: Vec<(u64, Vec<u8>)> = self
            .pending
            .iter()
            .map(|(i, rec)| {
                postcard::to_stdvec(rec)
                    .map(|b| (*i, b))
                    .map_err(|e| StoreError::Database(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        // The units and what they taught us about their peers, in one transaction (simulated
        // local slots teach nothing).
        let changed: Vec<(PeerId, Reputation)> = std::mem::take(&mut self.reputations)
            .into_iter()
            .filter(|_| !simulated)
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Accepted results are findable by content, for later jobs to reuse.
        let mut content = Vec::new();
        for (index, _) in self
            .pending
            .iter()
            .filter(|(_, rec)| matches!(rec.verdict, Verdict::Accepted { .. }))
        {
            let unit = u32::try_from(*index).unwrap_or(u32::MAX);
            content.push((self.content_key(job, unit)?, *index));
        }
        store.commit_with_content(&job.id, &batch, &content, &changed, now, MAX_REPUTATIONS)?;
        for (index, record) in std::mem::take(&mut self.pending) {
            // A unit decided again (run anew after its trusted peer was caught) replaces its
            // earlier outcome in the counts.
            let unit = u32::try_from(index).unwrap_or(u32::MAX);
            let earlier = self.mark_decided(unit, record.succeeded());
            match earlier {
                Some(true) => self.accepted = self.accepted.saturating_sub(1),
                Some(false) => self.failed = self.failed.saturating_sub(1),
                None => {}
            }
            if earlier.is_some() {
                self.redecided += 1;
            }
            if record.succeeded() {
                self.accepted += 1;
            } else {
                self.failed += 1;
            }
            self.decided_now += 1;
            let origin = job.source.origin(index)?;
            write_line(results, index, origin, &record).map_err(|source| JobError::Results {
                path: results_path.to_owned(),
                source,
            })?;
        }
        self.pending_since = None;
        Ok(())
    }
}

/// Appends one unit's line to the results file.
fn write_line(
    out: &mut impl Write,
    index: u64,
    origin: serde_json::Value,
    record: &UnitRecord,
) -> std::io::Result<()> {
    write_result(out, &result_line(index, origin, record))
}

/// Appends a results line.
fn write_result(out: &mut impl Write, line: &ResultLine) -> std::io::Result<()> {
    let mut text = serde_json::to_string(line).map_err(std::io::Error::other)?;
    text.push('\n');
    out.write_all(text.as_bytes())
}

/// The results line of a decided unit.
/// `origin` is where the unit's input came from ([`UnitSource::origin`]).
pub fn result_line(index: u64, origin: serde_json::Value, record: &UnitRecord) -> ResultLine {
    let votes = |v: &[Vote]| v.iter().map(|v| (v.peer, v.digest)).collect::<Vec<_>>();
    match &record.verdict {
        Verdict::Accepted {
            digest,
            agreeing,
            dissenters,
            host_failed,
        } => {
            let attempts = (agreeing.len() + dissenters.len() + host_failed.len()) as u32;
            let (status, output, error) = match &record.result {
                Some(Ok(bytes)) => (Status::Accepted, Some(output_value(bytes)), None),
                Some(Err(message)) => (Status::Failed, None, Some(message.clone())),
                // Accepted without its bytes here: only possible if the bytes were lost, and
                // reported as failed rather than as an empty output.
                None => (
                    Status::Failed,
                    None,
                    Some("the accepted output was not kept".to_owned()),
                ),
            };
            let mut evidence = Vec::new();
            if status == Status::Failed {
                evidence.extend(agreeing.iter().map(|w| (w.peer, *digest)));
                evidence.extend(votes(dissenters));
            }
            ResultLine {
                index,
                status,
                input: origin,
                output,
                digest: Some(*digest),
                agreed: agreeing.iter().map(|w| w.peer).collect(),
                hosts: agreeing.iter().map(|w| w.host.to_string()).collect(),
                dissented: dissenters.iter().map(|v| v.peer).collect(),
                attempts,
                evidence,
                error: error.or_else(|| {
                    (status == Status::Failed)
                        .then(|| record.errors.first().cloned())
                        .flatten()
                }),
                validated: Some(record.validation.into()),
            }
        }
        Verdict::Failed {
            reason,
            evidence,
            host_failed,
        } => ResultLine {
            index,
            status: Status::Failed,
            input: origin,
            output: None,
            digest: None,
            agreed: Vec::new(),
            hosts: Vec::new(),
            dissented: Vec::new(),
            attempts: (evidence.len() + host_failed.len()) as u32,
            evidence: votes(evidence),
            error: Some(match record.errors.first() {
                Some(e) => format!("{reason:?}: {e}"),
                None => format!("{reason:?}"),
            }),
            validated: None,
        },
    }
}
