//! The worker's side of leasing: offers from several submitters queue here and run on this
//! peer's slots, taken from the submitters in turn, so that a submitter with a huge job
//! cannot starve one with a small job. Answers go back in batches.
//!
//! Like the scheduler, the intake does no IO: the driver feeds it offers, revocations and the
//! ends of local runs, starts what [`IntakeCommand::Run`] names, and sends the reports.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::{Lease, LeaseId, LeaseResult};
use crate::digest::Digest;
use crate::peer_id::PeerId;
use crate::validate::Outcome;

/// Limits of an intake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntakeConfig {
    /// Units run at once (the cores donated). Default 1.
    pub slots: u32,
    /// How many queued leases per submitter the intake asks for. Default 8.
    pub prefetch: u32,
    /// Most queued leases per submitter; offers beyond it are declined. Default 64.
    pub max_queued_per_submitter: usize,
    /// Most submitters served at once; offers from others are declined. Default 256.
    pub max_submitters: usize,
    /// Answers per report. Default 64.
    pub result_batch: usize,
    /// Longest an answer waits for others to share its report. Default 5 ms.
    pub flush_delay: Duration,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        Self {
            slots: 1,
            prefetch: 8,
            max_queued_per_submitter: 64,
            max_submitters: 256,
            result_batch: 64,
            flush_delay: Duration::from_millis(5),
        }
    }
}

/// One lease to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    pub submitter: PeerId,
    pub job: Digest,
    pub lease: Lease,
}

/// What the driver tells the intake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntakeEvent {
    /// `from` offers leases of `job`.
    Offer {
        from: PeerId,
        job: Digest,
        leases: Vec<Lease>,
    },
    /// `from` no longer wants these leases.
    Revoke {
        from: PeerId,
        job: Digest,
        leases: Vec<LeaseId>,
    },
    /// A local run ended.
    Done {
        submitter: PeerId,
        job: Digest,
        lease: LeaseId,
        outcome: Outcome,
    },
    /// A submitter left: drop its work.
    SubmitterGone { peer: PeerId },
    /// The slots donated changed.
    SlotsChanged(u32),
}

/// What the intake asks of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntakeCommand {
    /// Start this lease on a free slot; answer with [`IntakeEvent::Done`].
    Run(Task),
    /// Stop a run; no `Done` is needed for it.
    Abort {
        submitter: PeerId,
        job: Digest,
        lease: LeaseId,
    },
    /// Send answers to `to`, together with how many more leases this peer takes from it.
    Report {
        to: PeerId,
        job: Digest,
        results: Vec<LeaseResult>,
        want: u32,
    },
    /// Tell `to` these leases were refused and never ran.
    Decline {
        to: PeerId,
        job: Digest,
        leases: Vec<LeaseId>,
    },
}

/// Counters for status output and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntakeStats {
    pub offered: u64,
    pub started: u64,
    pub declined: u64,
    pub duplicates: u64,
    /// Queued leases dropped because their deadline passed before a slot was free.
    pub expired: u64,
    pub revoked: u64,
    pub aborted: u64,
    /// `Done` for a run the intake does not know (aborted, or never started).
    pub unknown_done: u64,
}

type Key = (PeerId, Digest, LeaseId);

#[derive(Debug, Default)]
struct Queue {
    tasks: VecDeque<Task>,
    running: u32,
}

/// A worker's queue of leases from several submitters.
#[derive(Debug)]
pub struct Intake {
    config: IntakeConfig,
    queues: BTreeMap<PeerId, Queue>,
    /// Submitters with queued work, in the order they get the next free slot.
    turn: VecDeque<PeerId>,
    running: BTreeSet<Key>,
    pending: BTreeMap<(PeerId, Digest), Vec<LeaseResult>>,
    flush_at: Option<Instant>,
    out: VecDeque<IntakeCommand>,
    stats: IntakeStats,
    /// The volunteer took the machine back: nothing starts and no lease is asked for.
    suspended: bool,
}

impl Intake {
    pub fn new(config: IntakeConfig) -> Self {
        Self {
            config,
            queues: BTreeMap::new(),
            turn: VecDeque::new(),
            running: BTreeSet::new(),
            pending: BTreeMap::new(),
            flush_at: None,
            out: VecDeque::new(),
            stats: IntakeStats::default(),
            suspended: false,
        }
    }

    /// Suspends the intake (nothing starts, [`Intake::want`] is 0) or resumes it, starting
    /// what is queued.
    pub fn set_suspended(&mut self, suspended: bool, now: Instant) {
        self.suspended = suspended;
        self.start(now);
    }

    pub fn is_suspended(&self) -> bool {
        self.suspended
    }

    pub fn config(&self) -> &IntakeConfig {
        &self.config
    }

    pub fn stats(&self) -> &IntakeStats {
        &self.stats
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Changes how many queued leases per submitter the intake asks for: the driver sizes it
    /// to the units' running time, so short units keep the slots busy between round trips
    /// and long ones are not hoarded by one peer.
    pub fn set_prefetch(&mut self, prefetch: u32) {
        self.config.prefetch = prefetch;
    }

    pub fn queued(&self) -> usize {
        self.queues.values().map(|q| q.tasks.len()).sum()
    }

    /// How many more leases this peer takes from `submitter` now: what it needs to keep
    /// `prefetch` queued for it.
    pub fn want(&self, submitter: &PeerId) -> u32 {
        if self.suspended {
            return 0;
        }
        let queued = self.queues.get(submitter).map_or(0, |q| q.tasks.len());
        if !self.queues.contains_key(submitter) && self.queues.len() >= self.config.max_submitters {
            return 0;
        }
        let limit = self
            .config
            .max_queued_per_submitter
            .min(self.config.prefetch as usize);
        u32::try_from(limit.saturating_sub(queued)).unwrap_or(u32::MAX)
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.flush_at
    }

    pub fn poll_command(&mut self) -> Option<IntakeCommand> {
        self.out.pop_front()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.flush_at.is_some_and(|at| at <= now) {
            self.flush_all();
        }
        self.start(now);
    }

    pub fn handle(&mut self, event: IntakeEvent, now: Instant) {
        match event {
            IntakeEvent::Offer { from, job, leases } => self.offer(from, job, leases),
            IntakeEvent::Revoke { from, job, leases } => {
                let gone: BTreeSet<LeaseId> = leases.into_iter().collect();
                if let Some(q) = self.queues.get_mut(&from) {
                    let before = q.tasks.len();
                    q.tasks
                        .retain(|t| !(t.job == job && gone.contains(&t.lease.id)));
                    self.stats.revoked += (before - q.tasks.len()) as u64;
                }
                for id in gone {
                    if self.running.remove(&(from, job, id)) {
                        self.stats.aborted += 1;
                        if let Some(q) = self.queues.get_mut(&from) {
                            q.running = q.running.saturating_sub(1);
                        }
                        self.out.push_back(IntakeCommand::Abort {
                            submitter: from,
                            job,
                            lease: id,
                        });
                    }
                }
                self.tidy(from);
            }
            IntakeEvent::Done {
                submitter,
                job,
                lease,
                outcome,
            } => {
                if !self.running.remove(&(submitter, job, lease)) {
                    self.stats.unknown_done += 1;
                } else {
                    if let Some(q) = self.queues.get_mut(&submitter) {
                        q.running = q.running.saturating_sub(1);
                    }
                    let batch = self.pending.entry((submitter, job)).or_default();
                    batch.push(LeaseResult { lease, outcome });
                    if batch.len() >= self.config.result_batch.max(1)
                        || self.config.flush_delay.is_zero()
                    {
                        self.flush(submitter, job);
                    } else if self.flush_at.is_none() {
                        self.flush_at = Some(super::later(now, self.config.flush_delay));
                    }
                    self.tidy(submitter);
                }
            }
            IntakeEvent::SubmitterGone { peer } => {
                let running: Vec<Key> = self
                    .running
                    .iter()
                    .filter(|k| k.0 == peer)
                    .copied()
                    .collect();
                for key in running {
                    self.running.remove(&key);
                    self.stats.aborted += 1;
                    self.out.push_back(IntakeCommand::Abort {
                        submitter: key.0,
                        job: key.1,
                        lease: key.2,
                    });
                }
                self.queues.remove(&peer);
                self.turn.retain(|p| *p != peer);
                self.pending.retain(|k, _| k.0 != peer);
            }
            IntakeEvent::SlotsChanged(slots) => self.config.slots = slots,
        }
        self.start(now);
    }

    fn offer(&mut self, from: PeerId, job: Digest, leases: Vec<Lease>) {
        self.stats.offered += leases.len() as u64;
        if !self.queues.contains_key(&from) && self.queues.len() >= self.config.max_submitters {
            self.decline(from, job, leases.iter().map(|l| l.id).collect());
            return;
        }
        let mut declined = Vec::new();
        let queue = self.queues.entry(from).or_default();
        for lease in leases {
            let known = self.running.contains(&(from, job, lease.id))
                || queue
                    .tasks
                    .iter()
                    .any(|t| t.job == job && t.lease.id == lease.id);
            if known {
                self.stats.duplicates += 1;
            } else if queue.tasks.len() >= self.config.max_queued_per_submitter {
                declined.push(lease.id);
            } else {
                queue.tasks.push_back(Task {
                    submitter: from,
                    job,
                    lease,
                });
            }
        }
        if !queue.tasks.is_empty() && !self.turn.contains(&from) {
            self.turn.push_back(from);
        }
        self.decline(from, job, declined);
        self.tidy(from);
    }

    fn decline(&mut self, to: PeerId, job: Digest, leases: Vec<LeaseId>) {
        if leases.is_empty() {
            return;
        }
        self.stats.declined += leases.len() as u64;
        self.out
            .push_back(IntakeCommand::Decline { to, job, leases });
    }

    /// Forgets a submitter with nothing queued, running or pending.
    fn tidy(&mut self, submitter: PeerId) {
        let idle = self
            .queues
            .get(&submitter)
            .is_some_and(|q| q.tasks.is_empty() && q.running == 0);
        if idle && !self.pending.keys().any(|k| k.0 == submitter) {
            self.queues.remove(&submitter);
            self.turn.retain(|p| *p != submitter);
        }
    }

    /// Fills free slots, one submitter at a time in turn.
    fn start(&mut self, now: Instant) {
        while !self.suspended && self.running.len() < self.config.slots as usize {
            let Some(submitter) = self.turn.pop_front() else {
                break;
            };
            let Some(queue) = self.queues.get_mut(&submitter) else {
                continue;
            };
            let mut next = None;
            while let Some(task) = queue.tasks.pop_front() {
                if task.lease.deadline <= now {
                    // The submitter has already offered it elsewhere.
                    self.stats.expired += 1;
                    continue;
                }
                next = Some(task);
                break;
            }
            if !queue.tasks.is_empty() {
                self.turn.push_back(submitter);
            }
            if let Some(task) = next {
                queue.running += 1;
                self.running
                    .insert((task.submitter, task.job, task.lease.id));
                self.stats.started += 1;
                self.out.push_back(IntakeCommand::Run(task));
            } else {
                self.tidy(submitter);
            }
        }
    }

    fn flush(&mut self, to: PeerId, job: Digest) {
        if let Some(results) = self.pending.remove(&(to, job)) {
            let want = self.want(&to);
            self.out.push_back(IntakeCommand::Report {
                to,
                job,
                results,
                want,
            });
        }
        if self.pending.is_empty() {
            self.flush_at = None;
        }
    }

    fn flush_all(&mut self) {
        let keys: Vec<(PeerId, Digest)> = self.pending.keys().copied().collect();
        for (to, job) in keys {
            self.flush(to, job);
            self.tidy(to);
        }
        self.flush_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    fn leases(from: u64, n: u64, deadline: Instant) -> Vec<Lease> {
        (from..from + n)
            .map(|i| Lease {
                id: LeaseId(i),
                unit: i as u32,
                attempt: 1,
                deadline,
            })
            .collect()
    }

    fn drain(intake: &mut Intake) -> Vec<IntakeCommand> {
        std::iter::from_fn(|| intake.poll_command()).collect()
    }

    /// Runs every started task to completion, oldest first, and counts runs per submitter.
    fn run(intake: &mut Intake, now: Instant, steps: usize) -> BTreeMap<PeerId, usize> {
        let mut counts = BTreeMap::new();
        let mut running = VecDeque::new();
        for _ in 0..steps {
            for c in drain(intake) {
                if let IntakeCommand::Run(t) = c {
                    running.push_back(t);
                }
            }
            let Some(task) = running.pop_front() else {
                break;
            };
            *counts.entry(task.submitter).or_insert(0) += 1;
            intake.handle(
                IntakeEvent::Done {
                    submitter: task.submitter,
                    job: task.job,
                    lease: task.lease.id,
                    outcome: Outcome::HostFailure,
                },
                now,
            );
        }
        counts
    }

    #[test]
    fn two_submitters_share_slots_in_turn() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let job = Digest::of(b"job");
        let mut intake = Intake::new(IntakeConfig {
            slots: 2,
            max_queued_per_submitter: 1000,
            ..IntakeConfig::default()
        });
        // A big submitter floods the queue first; a small one arrives afterwards.
        intake.handle(
            IntakeEvent::Offer {
                from: peer(1),
                job,
                leases: leases(0, 600, deadline),
            },
            now,
        );
        intake.handle(
            IntakeEvent::Offer {
                from: peer(2),
                job,
                leases: leases(0, 20, deadline),
            },
            now,
        );
        let counts = run(&mut intake, now, 42);
        // 42 runs: the small submitter's 20 are all done, not stuck behind 600.
        assert_eq!(counts.get(&peer(2)), Some(&20), "{counts:?}");
        assert_eq!(counts.get(&peer(1)), Some(&22), "{counts:?}");
    }

    #[test]
    fn fairness_holds_with_three_submitters_under_constant_load() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let job = Digest::of(b"job");
        let mut intake = Intake::new(IntakeConfig {
            slots: 3,
            max_queued_per_submitter: 10_000,
            ..IntakeConfig::default()
        });
        for (n, size) in [(1u8, 5000u64), (2, 3000), (3, 1000)] {
            intake.handle(
                IntakeEvent::Offer {
                    from: peer(n),
                    job,
                    leases: leases(0, size, deadline),
                },
                now,
            );
        }
        let counts = run(&mut intake, now, 900);
        // The first submitter had the slots to itself until the others' offers arrived.
        for n in 1..=3 {
            let c = counts.get(&peer(n)).copied().unwrap_or(0);
            assert!((297..=303).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn overflow_is_declined_and_revocation_aborts() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let job = Digest::of(b"job");
        let mut intake = Intake::new(IntakeConfig {
            slots: 1,
            max_queued_per_submitter: 4,
            ..IntakeConfig::default()
        });
        intake.handle(
            IntakeEvent::Offer {
                from: peer(1),
                job,
                leases: leases(0, 7, deadline),
            },
            now,
        );
        let cmds = drain(&mut intake);
        // Offers are queued before anything starts: four fit, three are declined, then one
        // starts.
        assert!(cmds.contains(&IntakeCommand::Decline {
            to: peer(1),
            job,
            leases: vec![LeaseId(4), LeaseId(5), LeaseId(6)],
        }));
        assert_eq!(intake.running(), 1);
        assert_eq!(intake.queued(), 3);
        intake.handle(
            IntakeEvent::Revoke {
                from: peer(1),
                job,
                leases: vec![LeaseId(0), LeaseId(2), LeaseId(99)],
            },
            now,
        );
        let cmds = drain(&mut intake);
        assert!(cmds.contains(&IntakeCommand::Abort {
            submitter: peer(1),
            job,
            lease: LeaseId(0),
        }));
        assert_eq!(intake.running(), 1);
        assert_eq!(intake.queued(), 1);
        // A Done for the aborted run is ignored and counted.
        intake.handle(
            IntakeEvent::Done {
                submitter: peer(1),
                job,
                lease: LeaseId(0),
                outcome: Outcome::HostFailure,
            },
            now,
        );
        assert_eq!(intake.stats().unknown_done, 1);
    }

    #[test]
    fn results_are_batched_until_the_flush_delay() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let job = Digest::of(b"job");
        let mut intake = Intake::new(IntakeConfig {
            slots: 4,
            ..IntakeConfig::default()
        });
        intake.handle(
            IntakeEvent::Offer {
                from: peer(1),
                job,
                leases: leases(0, 4, deadline),
            },
            now,
        );
        drain(&mut intake);
        for i in 0..4 {
            intake.handle(
                IntakeEvent::Done {
                    submitter: peer(1),
                    job,
                    lease: LeaseId(i),
                    outcome: Outcome::Output(Digest::of(b"x")),
                },
                now,
            );
        }
        assert!(drain(&mut intake).is_empty());
        let at = intake.poll_timeout().expect("a flush is due");
        intake.handle_timeout(at);
        let cmds = drain(&mut intake);
        assert_eq!(cmds.len(), 1);
        assert!(matches!(
            &cmds[0],
            IntakeCommand::Report { results, want: 8, .. } if results.len() == 4
        ));
        assert_eq!(intake.poll_timeout(), None);
    }

    #[test]
    fn stale_queued_leases_are_skipped() {
        let now = Instant::now();
        let job = Digest::of(b"job");
        let mut intake = Intake::new(IntakeConfig::default());
        intake.handle(
            IntakeEvent::Offer {
                from: peer(1),
                job,
                leases: leases(0, 3, now + Duration::from_secs(1)),
            },
            now,
        );
        drain(&mut intake);
        let later = now + Duration::from_secs(2);
        intake.handle(
            IntakeEvent::Done {
                submitter: peer(1),
                job,
                lease: LeaseId(0),
                outcome: Outcome::HostFailure,
            },
            later,
        );
        assert_eq!(intake.stats().expired, 2);
        assert_eq!(intake.running(), 0);
    }

    #[test]
    fn a_departed_submitter_leaves_nothing_behind() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let job = Digest::of(b"job");
        let mut intake = Intake::new(IntakeConfig {
            slots: 2,
            max_submitters: 1,
            ..IntakeConfig::default()
        });
        intake.handle(
            IntakeEvent::Offer {
                from: peer(1),
                job,
                leases: leases(0, 5, deadline),
            },
            now,
        );
        // A second submitter does not fit.
        assert_eq!(intake.want(&peer(2)), 0);
        intake.handle(
            IntakeEvent::Offer {
                from: peer(2),
                job,
                leases: leases(0, 2, deadline),
            },
            now,
        );
        let cmds = drain(&mut intake);
        assert!(cmds.contains(&IntakeCommand::Decline {
            to: peer(2),
            job,
            leases: vec![LeaseId(0), LeaseId(1)],
        }));
        intake.handle(IntakeEvent::SubmitterGone { peer: peer(1) }, now);
        let aborts = drain(&mut intake)
            .into_iter()
            .filter(|c| matches!(c, IntakeCommand::Abort { .. }))
            .count();
        assert_eq!(aborts, 2);
        assert_eq!((intake.running(), intake.queued()), (0, 0));
        assert_eq!(intake.want(&peer(2)), 8);
    }

    #[test]
    fn fewer_slots_stop_no_running_unit_and_start_none_until_under_the_cap() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let job = Digest::of(b"job");
        let mut intake = Intake::new(IntakeConfig {
            slots: 3,
            max_queued_per_submitter: 100,
            ..IntakeConfig::default()
        });
        intake.handle(
            IntakeEvent::Offer {
                from: peer(1),
                job,
                leases: leases(0, 10, deadline),
            },
            now,
        );
        let runs = |commands: &[IntakeCommand]| -> Vec<LeaseId> {
            commands
                .iter()
                .filter_map(|c| match c {
                    IntakeCommand::Run(t) => Some(t.lease.id),
                    _ => None,
                })
                .collect()
        };
        let started = runs(&drain(&mut intake));
        assert_eq!(started.len(), 3);
        intake.handle(IntakeEvent::SlotsChanged(1), now);
        let after_shrink = drain(&mut intake);
        assert!(
            !after_shrink
                .iter()
                .any(|c| matches!(c, IntakeCommand::Abort { .. } | IntakeCommand::Run(_))),
            "{after_shrink:?}"
        );
        let done = |intake: &mut Intake, lease: LeaseId| {
            intake.handle(
                IntakeEvent::Done {
                    submitter: peer(1),
                    job,
                    lease,
                    outcome: Outcome::HostFailure,
                },
                now,
            );
            runs(&drain(intake)).len()
        };
        // Three run where one fits: the first two to end start nothing, the third one does.
        assert_eq!(done(&mut intake, started[0]), 0);
        assert_eq!(done(&mut intake, started[1]), 0);
        assert_eq!(done(&mut intake, started[2]), 1);
        assert_eq!(intake.running(), 1);
        intake.handle(IntakeEvent::SlotsChanged(3), now);
        assert_eq!(runs(&drain(&mut intake)).len(), 2);
        assert_eq!(intake.running(), 3);
    }

    #[test]
    fn a_suspended_intake_starts_nothing_and_wants_nothing() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let job = Digest::of(b"job");
        let mut intake = Intake::new(IntakeConfig {
            slots: 2,
            ..IntakeConfig::default()
        });
        intake.set_suspended(true, now);
        assert!(intake.is_suspended());
        assert_eq!(intake.want(&peer(1)), 0);
        intake.handle(
            IntakeEvent::Offer {
                from: peer(1),
                job,
                leases: leases(0, 3, deadline),
            },
            now,
        );
        assert!(
            !drain(&mut intake)
                .iter()
                .any(|c| matches!(c, IntakeCommand::Run(_)))
        );
        assert_eq!((intake.running(), intake.queued()), (0, 3));
        // Resumed, it fills its slots with what waited.
        intake.set_suspended(false, now);
        let started = drain(&mut intake)
            .iter()
            .filter(|c| matches!(c, IntakeCommand::Run(_)))
            .count();
        assert_eq!(started, 2);
        assert_eq!(intake.want(&peer(1)), 7);
    }
}
