//! Running a whole job on this machine alone: the submitting peer is the only worker.
//!
//! A single machine cannot provide distinct peers, so each replica runs as a distinct
//! *execution* on one of several local slots, and every slot carries its own fixed simulated
//! [`PeerId`] so that the [`Scheduler`] keeps its rule "never two executions of one unit on one
//! peer". These executions are redundant, not independent: they share the machine, the binary
//! and the engine, so they catch nondeterminism and host failures but not a lying peer. The
//! summary and [`LocalSummary::simulated_peers`] say so.
//!
//! Every decided unit is journaled in the [`JobStore`] (batched: one transaction per
//! [`COMMIT_BATCH`] units or [`COMMIT_INTERVAL`]) before its line is appended to
//! `results.jsonl`, so the results file never names a unit the journal lacks. On start the
//! journal's units are restored into the scheduler and never run again, and `results.jsonl` is
//! rewritten from the journal.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::job::manifest::{JobManifest, UnitInput};
use crate::job::results::{ResultLine, Status, output_value};
use crate::peer_id::PeerId;
use crate::sandbox::{Executor, OutcomeClass, PROFILE, UnitError, UnitRequest, UnitRunner};
use crate::schedule::{Command, Config, Event, LeaseId, LeaseResult, Scheduler};
use crate::store::{JobRecord, JobStore, StoreError};
use crate::validate::{Outcome, Policy, Verdict, Vote};

/// Most decided units journaled in one transaction.
pub const COMMIT_BATCH: usize = 64;
/// Longest a decided unit waits for its transaction.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// How often the progress callback is called while the job runs.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// Most simulated peers: enough for every attempt and host failure the manifest caps allow.
const MAX_SLOTS: u32 = 160;
/// Added to the unit timeout to form the lease deadline: compiling the module is not the unit's
/// time, and a lease only expires when the executor failed to answer at all.
const LEASE_MARGIN: Duration = Duration::from_secs(120);

/// Why a local job could not run.
#[derive(Debug, thiserror::Error)]
pub enum LocalJobError {
    /// The job has more units than the scheduler indexes.
    #[error("the job has {0} units, more than a local job can index")]
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
}

impl UnitRecord {
    /// Whether the unit produced an accepted output (not an agreed error, not a failure).
    pub fn succeeded(&self) -> bool {
        self.verdict.is_accepted() && matches!(self.result, Some(Ok(_)))
    }
}

/// Where a job stands, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalProgress {
    /// Units in the job.
    pub units: u32,
    /// Units with an accepted output (restored ones included).
    pub accepted: u32,
    /// Units that failed (restored ones included).
    pub failed: u32,
    /// Executions under way now.
    pub running: u32,
    /// Units decided in this run.
    pub decided_now: u32,
    /// Units taken from the journal.
    pub restored: u32,
    /// Time since this run started.
    pub elapsed: Duration,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSummary {
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
    /// Executions in this run (replicas and retries included).
    pub executions: u64,
    /// Executions whose result disagreed with the accepted one.
    pub dissents: u64,
    /// Executions that ended in a host failure (timeout, crash).
    pub host_failures: u64,
    /// The simulated peer ids of the local slots, in slot order.
    pub simulated_peers: Vec<PeerId>,
    /// The results file.
    pub results: PathBuf,
    /// Wall-clock time of this run.
    pub elapsed: Duration,
}

impl LocalSummary {
    /// Whether every unit was accepted.
    pub fn succeeded(&self) -> bool {
        self.failed == 0 && self.accepted == self.units
    }
}

/// The content address of a job: its module and, in order, every unit's input bytes, the limits
/// and the redundancy. The same manifest over the same files always names the same job, so
/// running it again resumes it.
pub fn job_id(module: &Digest, manifest: &JobManifest, units: &[UnitInput]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"coordinator-free/job/v1\0");
    h.update(&module.0);
    h.update(&(units.len() as u64).to_le_bytes());
    for unit in units {
        h.update(&unit.index.to_le_bytes());
        h.update(&(unit.bytes.len() as u64).to_le_bytes());
        h.update(&unit.bytes);
    }
    let l = manifest.limits;
    h.update(&l.memory_mb.to_le_bytes());
    h.update(&l.timeout.as_nanos().to_le_bytes());
    h.update(&l.fuel.map_or([0xff; 9], |f| {
        let mut b = [0; 9];
        b[1..].copy_from_slice(&f.to_le_bytes());
        b
    }));
    let r = manifest.redundancy;
    for v in [r.replicas, r.quorum, r.max_attempts] {
        h.update(&v.to_le_bytes());
    }
    Digest(*h.finalize().as_bytes())
}

/// The simulated peer id of local slot `slot` (fixed, so a resumed job sees the same ids).
pub fn slot_peer(slot: u32) -> PeerId {
    let mut h = blake3::Hasher::new();
    h.update(b"coordinator-free/local-slot/v1\0");
    h.update(&slot.to_le_bytes());
    PeerId::from_bytes(*h.finalize().as_bytes())
}

/// One execution's answer, from a unit thread back to the driver.
struct Answer {
    peer: PeerId,
    lease: LeaseId,
    unit: u32,
    result: Result<Vec<u8>, UnitError>,
}

/// What an execution said, kept until its unit is decided.
enum Said {
    Output(Vec<u8>),
    Error(String),
}

impl<R: UnitRunner> std::fmt::Debug for LocalJob<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalJob")
            .field("id", &self.id)
            .field("units", &self.units.len())
            .finish_non_exhaustive()
    }
}

/// A job run on this machine alone.
pub struct LocalJob<'a, R: UnitRunner> {
    manifest: &'a JobManifest,
    units: Vec<UnitInput>,
    id: Digest,
    module_digest: Digest,
    module: R::Module,
    executor: Executor<R>,
    /// Executions in flight at most: the unit threads plus the executor's queue.
    capacity: u32,
    store: &'a JobStore,
    out_dir: PathBuf,
}

impl<'a, R: UnitRunner> LocalJob<'a, R>
where
    R::Module: Clone,
{
    /// A job over `units` (from [`JobManifest::units`]) of `manifest`, whose module has digest
    /// `module_digest` and runs as `module` on `executor`, which holds at most `capacity`
    /// executions at once (its threads plus its queue). Results go to `out_dir`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        manifest: &'a JobManifest,
        units: Vec<UnitInput>,
        module_digest: Digest,
        module: R::Module,
        executor: Executor<R>,
        capacity: u32,
        store: &'a JobStore,
        out_dir: PathBuf,
    ) -> Self {
        let id = job_id(&module_digest, manifest, &units);
        Self {
            manifest,
            units,
            id,
            module_digest,
            module,
            executor,
            capacity: capacity.max(1),
            store,
            out_dir,
        }
    }

    /// The job id.
    pub fn id(&self) -> Digest {
        self.id
    }

    /// Runs the job to its end, resuming from the journal; `progress` is called a few times a
    /// second and once at the end.
    pub fn run(
        self,
        mut progress: impl FnMut(&LocalProgress),
    ) -> Result<LocalSummary, LocalJobError> {
        let started = Instant::now();
        let count = u32::try_from(self.units.len())
            .map_err(|_| LocalJobError::TooManyUnits(self.units.len()))?;
        let r = self.manifest.redundancy;
        let policy = Policy::from(r);
        self.store.put_job(
            &self.id,
            &JobRecord {
                name: self.manifest.name.clone(),
                module: self.module_digest,
                units: u64::from(count),
                replicas: policy.replicas,
                quorum: policy.quorum,
                max_attempts: policy.max_attempts,
                profile: PROFILE.to_owned(),
            },
        )?;

        // Every execution of a unit needs a peer of its own, host failures included.
        let slots = policy
            .max_attempts
            .saturating_add(policy.max_host_failures)
            .clamp(1, MAX_SLOTS);
        let peers: Vec<PeerId> = (0..slots).map(slot_peer).collect();
        let config = Config {
            lease_timeout: self.manifest.limits.timeout.saturating_add(LEASE_MARGIN),
            max_peers: peers.len(),
            ..Config::default()
        };
        let seed = u64::from_le_bytes(self.id.0[..8].try_into().unwrap_or([0; 8]));
        let mut scheduler = Scheduler::new(self.id, count, policy, config, seed);

        // Resume: restore every journaled unit and rewrite the results file from the journal.
        let results_path = self.out_dir.join("results.jsonl");
        let results_err = |source| LocalJobError::Results {
            path: results_path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.out_dir).map_err(results_err)?;
        let mut accepted = 0u32;
        let mut failed = 0u32;
        let journal = self.store.units(&self.id)?;
        let restored = u32::try_from(journal.len()).unwrap_or(u32::MAX);
        let tmp = self.out_dir.join("results.jsonl.tmp");
        {
            let mut file = BufWriter::new(File::create(&tmp).map_err(results_err)?);
            for (index, bytes) in &journal {
                let record: UnitRecord =
                    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
                        what: "unit record",
                        detail: e.to_string(),
                    })?;
                let unit = u32::try_from(*index)
                    .ok()
                    .filter(|u| *u < count)
                    .ok_or(LocalJobError::Journal { index: *index })?;
                scheduler
                    .restore(unit, record.verdict.clone())
                    .map_err(|_| LocalJobError::Journal { index: *index })?;
                if record.succeeded() {
                    accepted += 1;
                } else {
                    failed += 1;
                }
                write_line(&mut file, &self.units[unit as usize], &record).map_err(results_err)?;
            }
            file.flush().map_err(results_err)?;
            file.get_ref().sync_all().map_err(results_err)?;
        }
        std::fs::rename(&tmp, &results_path).map_err(results_err)?;
        let mut results = BufWriter::new(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&results_path)
                .map_err(results_err)?,
        );

        // Answers come back through a channel as deep as the executions in flight, so a unit
        // thread never blocks on it.
        let (tx, rx): (SyncSender<Answer>, Receiver<Answer>) = sync_channel(self.capacity as usize);
        let mut said: BTreeMap<u32, BTreeMap<Digest, Said>> = BTreeMap::new();
        let mut errors: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        let mut ran = vec![false; self.units.len()];
        let mut in_flight = 0u32;
        let mut executions = 0u64;
        let mut host_failures = 0u64;
        let mut dissents = 0u64;
        let mut decided_now = 0u32;
        let mut pending: Vec<(u64, UnitRecord)> = Vec::new();
        let mut pending_since: Option<Instant> = None;
        let mut next_slot = 0u32;
        let mut last_progress = Instant::now();
        let mut finished = scheduler.is_finished();

        let snapshot = |accepted, failed, running, decided_now| LocalProgress {
            units: count,
            accepted,
            failed,
            running,
            decided_now,
            restored,
            elapsed: started.elapsed(),
        };
        progress(&snapshot(accepted, failed, 0, 0));

        while !finished || !pending.is_empty() {
            let now = Instant::now();
            // Offer the free capacity slot by slot; each slot is closed again after its turn,
            // so a later re-dispatch never hands out more than the machine can run.
            let mut free = self.capacity.saturating_sub(in_flight);
            let mut turns = 0;
            while free > 0 && !finished && turns < slots {
                let peer = peers[(next_slot % slots) as usize];
                next_slot = next_slot.wrapping_add(1);
                turns += 1;
                scheduler.handle(Event::Available { peer, slots: free }, now);
                scheduler.handle(Event::Available { peer, slots: 0 }, now);
                while let Some(command) = scheduler.poll_command() {
                    match command {
                        Command::Offer { to, leases, .. } => {
                            for lease in leases {
                                let unit = lease.unit;
                                let input = &self.units[unit as usize].bytes;
                                let mut request = UnitRequest::new(input.clone());
                                request.limits = self.manifest.limits.to_limits();
                                let tx = tx.clone();
                                let (peer, id) = (to, lease.id);
                                self.executor
                                    .try_submit(self.module.clone(), request, move |report| {
                                        let _ = tx.send(Answer {
                                            peer,
                                            lease: id,
                                            unit,
                                            result: report.result,
                                        });
                                    })
                                    .map_err(|_| LocalJobError::Executor)?;
                                in_flight += 1;
                                free = free.saturating_sub(1);
                                executions += 1;
                                ran[unit as usize] = true;
                            }
                        }
                        other => self.on_command(
                            other,
                            &mut said,
                            &mut errors,
                            &mut pending,
                            &mut pending_since,
                            &mut finished,
                            &mut dissents,
                        ),
                    }
                }
            }

            if in_flight == 0 && !finished {
                let p = scheduler.progress();
                return Err(LocalJobError::Stalled {
                    open: p.units.saturating_sub(p.accepted + p.failed),
                });
            }

            // Journal, then append: the results file never runs ahead of the journal.
            let due = pending_since.is_some_and(|t| t.elapsed() >= COMMIT_INTERVAL);
            if pending.len() >= COMMIT_BATCH || (due || finished) && !pending.is_empty() {
                let batch: Vec<(u64, Vec<u8>)> = pending
                    .iter()
                    .map(|(i, rec)| {
                        postcard::to_stdvec(rec)
                            .map(|b| (*i, b))
                            .map_err(|e| StoreError::Database(e.to_string()))
                    })
                    .collect::<Result<_, _>>()?;
                self.store.put_units(&self.id, &batch)?;
                for (index, record) in pending.drain(..) {
                    if record.succeeded() {
                        accepted += 1;
                    } else {
                        failed += 1;
                    }
                    decided_now += 1;
                    write_line(&mut results, &self.units[index as usize], &record)
                        .map_err(results_err)?;
                }
                results.flush().map_err(results_err)?;
                pending_since = None;
            }
            if finished && pending.is_empty() {
                break;
            }

            if last_progress.elapsed() >= PROGRESS_INTERVAL {
                last_progress = Instant::now();
                progress(&snapshot(accepted, failed, in_flight, decided_now));
            }

            // Wait for an answer, the next lease deadline, the commit interval or the next
            // progress report, whichever comes first.
            let mut wake = Instant::now() + PROGRESS_INTERVAL;
            if let Some(at) = scheduler.poll_timeout() {
                wake = wake.min(at);
            }
            if let Some(since) = pending_since {
                wake = wake.min(since + COMMIT_INTERVAL);
            }
            let wait = wake.saturating_duration_since(Instant::now());
            let mut answers = Vec::new();
            if in_flight > 0 {
                if let Ok(a) = rx.recv_timeout(wait) {
                    answers.push(a);
                }
            } else if !finished {
                std::thread::sleep(wait.min(Duration::from_millis(10)));
            }
            while let Ok(a) = rx.try_recv() {
                answers.push(a);
            }
            let now = Instant::now();
            let mut by_peer: BTreeMap<PeerId, Vec<LeaseResult>> = BTreeMap::new();
            for answer in answers {
                in_flight = in_flight.saturating_sub(1);
                // Answers for decided units (revoked executions) keep nothing.
                let open = scheduler.unit(answer.unit).is_some_and(|t| t.is_open());
                let outcome = match answer.result {
                    Ok(bytes) => {
                        let digest = Digest::of(&bytes);
                        if open {
                            said.entry(answer.unit)
                                .or_default()
                                .insert(digest, Said::Output(bytes));
                        }
                        Outcome::Output(digest)
                    }
                    Err(error) => {
                        let message = error.to_string();
                        if open {
                            let entry = errors.entry(answer.unit).or_default();
                            if !entry.contains(&message) && entry.len() < 8 {
                                entry.push(message.clone());
                            }
                        }
                        match error.class() {
                            OutcomeClass::Deterministic => {
                                let encoded = postcard::to_stdvec(&error).unwrap_or_default();
                                let outcome = Outcome::deterministic_error(&encoded);
                                if let (true, Outcome::Output(digest)) = (open, outcome) {
                                    said.entry(answer.unit)
                                        .or_default()
                                        .insert(digest, Said::Error(message));
                                }
                                outcome
                            }
                            OutcomeClass::HostFailure => {
                                host_failures += 1;
                                Outcome::HostFailure
                            }
                        }
                    }
                };
                by_peer.entry(answer.peer).or_default().push(LeaseResult {
                    lease: answer.lease,
                    outcome,
                });
            }
            for (from, results) in by_peer {
                scheduler.handle(Event::Results { from, results }, now);
            }
            scheduler.handle_timeout(now);
            while let Some(command) = scheduler.poll_command() {
                self.on_command(
                    command,
                    &mut said,
                    &mut errors,
                    &mut pending,
                    &mut pending_since,
                    &mut finished,
                    &mut dissents,
                );
            }
        }
        results.flush().map_err(results_err)?;
        results.get_ref().sync_all().map_err(results_err)?;
        progress(&snapshot(accepted, failed, 0, decided_now));
        Ok(LocalSummary {
            job: self.id,
            units: count,
            accepted,
            failed,
            restored,
            units_run: u32::try_from(ran.iter().filter(|r| **r).count()).unwrap_or(u32::MAX),
            executions,
            dissents,
            host_failures,
            simulated_peers: peers,
            results: results_path,
            elapsed: started.elapsed(),
        })
    }

    /// Files a scheduler command other than an offer.
    #[allow(clippy::too_many_arguments)]
    fn on_command(
        &self,
        command: Command,
        said: &mut BTreeMap<u32, BTreeMap<Digest, Said>>,
        errors: &mut BTreeMap<u32, Vec<String>>,
        pending: &mut Vec<(u64, UnitRecord)>,
        pending_since: &mut Option<Instant>,
        finished: &mut bool,
        dissents: &mut u64,
    ) {
        match command {
            Command::Decided { unit, verdict } => {
                let mut seen = said.remove(&unit).unwrap_or_default();
                let errors = errors.remove(&unit).unwrap_or_default();
                let result = verdict
                    .digest()
                    .and_then(|d| seen.remove(&d))
                    .map(|s| match s {
                        Said::Output(bytes) => Ok(bytes),
                        Said::Error(message) => Err(message),
                    });
                if let Verdict::Accepted { dissenters, .. } = &verdict {
                    *dissents += dissenters.len() as u64;
                }
                pending.push((
                    u64::from(unit),
                    UnitRecord {
                        verdict,
                        result,
                        errors,
                    },
                ));
                pending_since.get_or_insert_with(Instant::now);
            }
            Command::Finished { .. } => *finished = true,
            // Local executions cannot be called back; a revoked one finishes and its late
            // answer is dropped by the scheduler as closed.
            Command::Revoke { .. } | Command::Offer { .. } => {}
        }
    }
}

/// Appends one unit's line to the results file.
fn write_line(out: &mut impl Write, unit: &UnitInput, record: &UnitRecord) -> std::io::Result<()> {
    let line = result_line(unit, record);
    let mut text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
    text.push('\n');
    out.write_all(text.as_bytes())
}

/// The results line of a decided unit.
pub fn result_line(unit: &UnitInput, record: &UnitRecord) -> ResultLine {
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
                // Accepted without its bytes here: only a digest from elsewhere; never happens
                // for local executions, and reported as failed rather than as an empty output.
                None => (
                    Status::Failed,
                    None,
                    Some("the accepted output was not kept".to_owned()),
                ),
            };
            let mut evidence = Vec::new();
            if status == Status::Failed {
                evidence.extend(agreeing.iter().map(|p| (*p, *digest)));
                evidence.extend(votes(dissenters));
            }
            ResultLine {
                index: unit.index,
                status,
                input: unit.origin.clone(),
                output,
                digest: Some(*digest),
                agreed: agreeing.clone(),
                dissented: dissenters.iter().map(|v| v.peer).collect(),
                attempts,
                evidence,
                error: error.or_else(|| {
                    (status == Status::Failed)
                        .then(|| record.errors.first().cloned())
                        .flatten()
                }),
            }
        }
        Verdict::Failed {
            reason,
            evidence,
            host_failed,
        } => ResultLine {
            index: unit.index,
            status: Status::Failed,
            input: unit.origin.clone(),
            output: None,
            digest: None,
            agreed: Vec::new(),
            dissented: Vec::new(),
            attempts: (evidence.len() + host_failed.len()) as u32,
            evidence: votes(evidence),
            error: Some(match record.errors.first() {
                Some(e) => format!("{reason:?}: {e}"),
                None => format!("{reason:?}"),
            }),
        },
    }
}

/// Where a job's results go by default: `./<name>-results`.
pub fn default_out_dir(manifest: &JobManifest) -> PathBuf {
    Path::new(".").join(format!("{}-results", manifest.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::UnitReport;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A runner that doubles `{"x": n}`; unit `flaky` answers differently every time, and the
    /// first execution of unit `crash` is a host failure.
    struct Fake {
        calls: Arc<AtomicU64>,
        flaky: u64,
        crash: u64,
    }

    impl UnitRunner for Fake {
        type Module = ();

        fn run_unit(&mut self, _: &(), request: UnitRequest) -> UnitReport {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            let input: serde_json::Value = serde_json::from_slice(&request.input).unwrap();
            let x = input["x"].as_u64().unwrap();
            let result = if x == self.flaky {
                Ok(format!("{{\"y\":{call}}}").into_bytes())
            } else if x == self.crash && CRASHED.swap(false, Ordering::SeqCst) {
                Err(UnitError::Host {
                    detail: "simulated crash".into(),
                })
            } else {
                Ok(format!("{{\"y\":{}}}", x * 2).into_bytes())
            };
            UnitReport {
                result,
                logs: Vec::new(),
                logs_dropped: 0,
                progress: None,
                checkpoint: None,
                fuel_consumed: None,
                elapsed: Duration::ZERO,
                profile: PROFILE,
            }
        }
    }

    static CRASHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

    fn manifest(units: u64) -> JobManifest {
        let text = format!(
            "name = \"fake\"\nmodule = \"m.wasm\"\n[inputs.sweep]\nx = {{ start = 0, stop = {}, step = 1 }}\n[redundancy]\nreplicas = 2\n",
            units - 1
        );
        JobManifest::parse(&text, Path::new("job.toml"), Path::new(".")).unwrap()
    }

    fn run(
        manifest: &JobManifest,
        store: &JobStore,
        out: &Path,
        flaky: u64,
        crash: u64,
    ) -> (LocalSummary, u64) {
        let calls = Arc::new(AtomicU64::new(0));
        let runners = (0..2)
            .map(|_| Fake {
                calls: calls.clone(),
                flaky,
                crash,
            })
            .collect();
        let executor = Executor::with_runners(runners, 4).unwrap();
        let units = manifest.units(Path::new("job.toml")).unwrap();
        let job = LocalJob::new(
            manifest,
            units,
            Digest::of(b"module"),
            (),
            executor,
            4,
            store,
            out.to_owned(),
        );
        let summary = job.run(|_| {}).unwrap();
        (summary, calls.load(Ordering::SeqCst))
    }

    fn lines(out: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join("results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn runs_every_unit_then_resumes_without_running_any() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("s.redb")).unwrap();
        let m = manifest(100);
        let out = dir.path().join("out");
        let (first, calls) = run(&m, &store, &out, u64::MAX, u64::MAX);
        assert!(first.succeeded(), "{first:?}");
        assert_eq!(
            (first.accepted, first.units_run, first.restored),
            (100, 100, 0)
        );
        assert_eq!(calls, 200, "two replicas per unit");
        let before = lines(&out);
        assert_eq!(before.len(), 100);
        for line in &before {
            let x = line["input"]["params"]["x"].as_u64().unwrap();
            assert_eq!(line["output"]["y"].as_u64(), Some(x * 2), "{line}");
        }

        let (second, calls) = run(&m, &store, &out, u64::MAX, u64::MAX);
        assert_eq!(
            (second.accepted, second.units_run, second.restored),
            (100, 0, 100)
        );
        assert_eq!(calls, 0);
        let mut after = lines(&out);
        let mut before = before;
        let key = |v: &serde_json::Value| v["index"].as_u64();
        before.sort_by_key(key);
        after.sort_by_key(key);
        assert_eq!(before, after, "the rewritten results match the first run's");
    }

    #[test]
    fn disagreement_fails_with_evidence_and_a_crash_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("s.redb")).unwrap();
        let m = manifest(10);
        let out = dir.path().join("out");
        let (summary, _) = run(&m, &store, &out, 3, 5);
        assert!(!summary.succeeded());
        assert_eq!((summary.accepted, summary.failed), (9, 1), "{summary:?}");
        assert_eq!(summary.host_failures, 1);
        let lines = lines(&out);
        let failed = lines.iter().find(|l| l["index"] == 3).unwrap();
        assert_eq!(failed["status"], "failed", "{failed}");
        assert_eq!(
            failed["evidence"].as_array().unwrap().len() as u32,
            m.redundancy.max_attempts,
            "every attempt's digest is evidence: {failed}"
        );
        let crashed = lines.iter().find(|l| l["index"] == 5).unwrap();
        assert_eq!(crashed["status"], "accepted", "{crashed}");
        assert_eq!(crashed["attempts"], 3, "{crashed}");
    }
}
