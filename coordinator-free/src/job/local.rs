//! Running a whole job on this machine alone: the submitting peer is the only worker.
//!
//! A single machine cannot provide distinct peers, so each replica runs as a distinct
//! *execution* on one of several local slots, and every slot carries its own fixed simulated
//! [`PeerId`] so that the [`Scheduler`] keeps its rule "never two executions of one unit on one
//! peer". These executions are redundant, not independent: they share the machine, the binary
//! and the engine, so they catch nondeterminism and host failures but not a lying peer. The
//! summary ([`JobSummary::simulated_peers`]) says so.
//!
//! The job loop itself (journal, results file, resume) is [`super::driver::run_job`].

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use crate::digest::Digest;
use crate::host::{Host, Placement};
use crate::job::driver::{
    JobData, JobError, JobProgress, JobSummary, WorkerEvent, Workers, route_commands, run_job,
};
use crate::job::inputs::UnitSource;
use crate::job::manifest::JobManifest;
use crate::peer_id::PeerId;
use crate::sandbox::{Executor, PROFILE, UnitError, UnitRequest, UnitRunner};
use crate::schedule::{Command, Config, Event, Lease, LeaseId, Scheduler};
use crate::store::JobStore;
use crate::validate::Policy;

pub use crate::job::driver::{COMMIT_BATCH, COMMIT_INTERVAL, UnitRecord, result_line};

/// The job loop's error, under its older name.
pub type LocalJobError = JobError;
/// A job's progress, under its older name.
pub type LocalProgress = JobProgress;
/// A job's summary, under its older name.
pub type LocalSummary = JobSummary;

/// Most simulated peers: enough for every attempt and host failure the manifest caps allow.
const MAX_SLOTS: u32 = 160;
/// Added to the unit timeout to form the lease deadline: compiling the module is not the unit's
/// time, and a lease only expires when the executor failed to answer at all.
pub const LEASE_MARGIN: Duration = Duration::from_secs(120);

/// The job id: the BLAKE3 hash of everything that decides a unit's accepted bytes and how
/// they are validated — the engine profile, the module, what the inputs are (a sweep's parameters, the digests of the input files, the bytes of a JSON-lines file: [`UnitSource::digest`]), the limits every
/// replica runs under (the output cap included) and the redundancy with its placement — and
/// nothing else (not the name), so re-running the same command finds the same journal, and a
/// change to any of these starts afresh.
pub fn job_id(module: &Digest, manifest: &JobManifest, source: &UnitSource) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"coordinator-free/job/v3\0");
    h.update(&(PROFILE.len() as u64).to_le_bytes());
    h.update(PROFILE.as_bytes());
    h.update(&module.0);
    h.update(&source.len().to_le_bytes());
    h.update(&source.digest().0);
    let l = manifest.unit_limits();
    for v in [
        l.memory_bytes,
        l.input_bytes,
        l.output_bytes,
        l.checkpoint_bytes,
        l.log_bytes,
        l.log_line_bytes,
    ] {
        h.update(&v.to_le_bytes());
    }
    h.update(&l.timeout.as_nanos().to_le_bytes());
    h.update(&l.fuel.map_or([0xff; 9], |f| {
        let mut b = [0; 9];
        b[1..].copy_from_slice(&f.to_le_bytes());
        b
    }));
    // A program's arguments and environment, each string with its length.
    let program = postcard::to_stdvec(&l.program).unwrap_or_default();
    h.update(&(program.len() as u64).to_le_bytes());
    h.update(&program);
    let r = manifest.redundancy;
    for v in [r.replicas, r.quorum, r.max_attempts] {
        h.update(&v.to_le_bytes());
    }
    h.update(&[match r.placement {
        Placement::Host => 0,
        Placement::Peer => 1,
    }]);
    Digest(*h.finalize().as_bytes())
}

/// The simulated peer id of local slot `slot` (fixed, so a resumed job sees the same ids).
pub fn slot_peer(slot: u32) -> PeerId {
    let mut h = blake3::Hasher::new();
    h.update(b"coordinator-free/local-slot/v1\0");
    h.update(&slot.to_le_bytes());
    PeerId::from_bytes(*h.finalize().as_bytes())
}

/// The number of simulated peers a job needs: one per execution a unit may see.
pub fn slots_for(policy: &Policy) -> u32 {
    policy
        .max_attempts
        .saturating_add(policy.max_host_failures)
        .clamp(1, MAX_SLOTS)
}

/// One execution's answer, from a unit thread back to the job loop.
struct Answer {
    peer: PeerId,
    lease: LeaseId,
    result: Result<Vec<u8>, UnitError>,
}

/// This machine's executor, seen by the job loop as a set of simulated peers.
struct LocalWorkers<R: UnitRunner> {
    executor: Executor<R>,
    module: R::Module,
    peers: Vec<PeerId>,
    next_slot: u32,
    capacity: u32,
    in_flight: u32,
    tx: SyncSender<Answer>,
    rx: Receiver<Answer>,
}

impl<R: UnitRunner> Workers for LocalWorkers<R>
where
    R::Module: Clone,
{
    fn refill(
        &mut self,
        scheduler: &mut Scheduler,
        job: &JobData,
        now: Instant,
        other: &mut dyn FnMut(Command),
    ) -> Result<(), JobError> {
        // Offer the free capacity slot by slot; each slot is closed again after its turn, so a
        // later re-dispatch never hands out more than the machine can run.
        let slots = self.peers.len() as u32;
        let mut turns = 0;
        while self.in_flight < self.capacity && turns < slots {
            let free = self.capacity - self.in_flight;
            let peer = self.peers[(self.next_slot % slots) as usize];
            self.next_slot = self.next_slot.wrapping_add(1);
            turns += 1;
            // Each slot is a host of its own: the executions are distinct, not independent,
            // and the summary says so.
            let host = Host::Peer(peer);
            scheduler.handle(
                Event::Available {
                    peer,
                    slots: free,
                    host,
                },
                now,
            );
            scheduler.handle(
                Event::Available {
                    peer,
                    slots: 0,
                    host,
                },
                now,
            );
            route_commands(self, scheduler, job, other)?;
        }
        Ok(())
    }

    fn offer(&mut self, to: PeerId, leases: Vec<Lease>, job: &JobData) -> Result<(), JobError> {
        for lease in leases {
            let mut request = UnitRequest::new(job.input(lease.unit)?);
            request.limits = job.limits.clone();
            let tx = self.tx.clone();
            let id = lease.id;
            self.executor
                .try_submit(self.module.clone(), request, move |report| {
                    let _ = tx.send(Answer {
                        peer: to,
                        lease: id,
                        result: report.result,
                    });
                })
                .map_err(|_| JobError::Executor)?;
            self.in_flight += 1;
        }
        Ok(())
    }

    // Local executions cannot be called back; a revoked one finishes and its late answer is
    // dropped by the scheduler as closed.
    fn revoke(&mut self, _to: PeerId, _leases: Vec<LeaseId>, _job: &JobData) {}

    fn wait(&mut self, until: Instant) -> Result<Vec<WorkerEvent>, JobError> {
        let mut answers = Vec::new();
        let wait = until.saturating_duration_since(Instant::now());
        if self.in_flight > 0 {
            match self.rx.recv_timeout(wait) {
                Ok(a) => answers.push(a),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(JobError::Executor),
            }
        } else {
            std::thread::sleep(wait.min(Duration::from_millis(10)));
        }
        while let Ok(a) = self.rx.try_recv() {
            answers.push(a);
        }
        self.in_flight = self.in_flight.saturating_sub(answers.len() as u32);
        Ok(answers
            .into_iter()
            .map(|a| WorkerEvent::Answer {
                peer: a.peer,
                lease: a.lease,
                result: a.result,
            })
            .collect())
    }

    fn running(&self) -> u32 {
        self.in_flight
    }

    fn may_progress(&self) -> bool {
        false
    }

    fn simulated(&self) -> bool {
        true
    }
}

impl<R: UnitRunner> std::fmt::Debug for LocalJob<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalJob")
            .field("id", &self.job.id)
            .field("units", &self.job.count())
            .finish_non_exhaustive()
    }
}

/// A job run on this machine alone.
pub struct LocalJob<'a, R: UnitRunner> {
    manifest: &'a JobManifest,
    job: JobData,
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
    /// A job over the inputs of `source` of `manifest`, whose module has digest
    /// `module_digest` and runs as `module` on `executor`, which holds at most `capacity`
    /// executions at once (its threads plus its queue). Results go to `out_dir`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        manifest: &'a JobManifest,
        source: UnitSource,
        module_digest: Digest,
        module: R::Module,
        executor: Executor<R>,
        capacity: u32,
        store: &'a JobStore,
        out_dir: PathBuf,
    ) -> Self {
        Self {
            manifest,
            job: JobData::new(manifest, source, module_digest),
            module,
            executor,
            capacity: capacity.max(1),
            store,
            out_dir,
        }
    }

    /// The job id.
    pub fn id(&self) -> Digest {
        self.job.id
    }

    /// Runs the job to its end, resuming from the journal; `progress` is called a few times a
    /// second and once at the end.
    pub fn run(self, progress: impl FnMut(&JobProgress)) -> Result<JobSummary, JobError> {
        let policy = Policy::from(self.manifest.redundancy);
        let peers: Vec<PeerId> = (0..slots_for(&policy)).map(slot_peer).collect();
        let config = Config {
            lease_timeout: self.manifest.limits.timeout.saturating_add(LEASE_MARGIN),
            max_peers: peers.len(),
            // The slots are this machine's own: a unit that crashes its host is the unit's
            // doing, and backing a slot off would only stall the job.
            backoff_after: 0,
            // Nobody colludes among them: a second replica may start as soon as a slot frees.
            mix_replicas: false,
            ..Config::default()
        };
        // Answers come back through a channel as deep as the executions in flight, so a unit
        // thread never blocks on it.
        let (tx, rx) = sync_channel(self.capacity as usize);
        let mut workers = LocalWorkers {
            executor: self.executor,
            module: self.module,
            peers,
            next_slot: 0,
            capacity: self.capacity,
            in_flight: 0,
            tx,
            rx,
        };
        run_job(
            self.manifest,
            &self.job,
            config,
            &mut workers,
            self.store,
            &self.out_dir,
            progress,
        )
    }
}

/// Where a job's results go by default: `./<name>-results`.
pub fn default_out_dir(manifest: &JobManifest) -> PathBuf {
    Path::new(".").join(format!("{}-results", manifest.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{PROFILE, UnitReport};
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
        let units = UnitSource::open(manifest, Path::new("job.toml")).unwrap();
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

    /// The id covers what decides a unit's bytes, a program's arguments and environment
    /// included, and not the name.
    #[test]
    fn the_job_id_covers_the_programs_arguments_and_not_the_name() {
        let base = manifest(4);
        let source = UnitSource::open(&base, Path::new("job.toml")).unwrap();
        let module = Digest::of(b"module");
        let id = job_id(&module, &base, &source);
        let mut renamed = base.clone();
        renamed.name = "another".into();
        assert_eq!(job_id(&module, &renamed, &source), id);
        let mut with_args = base.clone();
        with_args.program.args = vec!["--fast".into()];
        assert_ne!(job_id(&module, &with_args, &source), id);
        let mut with_env = base.clone();
        with_env.program.env = vec![("K".into(), "v".into())];
        assert_ne!(job_id(&module, &with_env, &source), id);
        assert_ne!(job_id(&Digest::of(b"other"), &base, &source), id);
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
