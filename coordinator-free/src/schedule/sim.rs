//! A deterministic many-peer simulation of scheduling and validation.
//!
//! Hundreds of peers, each with an [`Intake`], run the jobs of a few submitting peers (which
//! also work, for their own jobs too) on an in-memory network with a virtual clock. Messages
//! are delayed, duplicated and lost at random; some peers crash for good mid-lease and are
//! reported gone a few seconds later, as membership would; some are slower than the lease
//! deadline; some cheat, each with its own wrong digest or, when colluding, all with the same
//! one, and also send answers for leases they never held. Every draw comes from one seeded
//! [`Rng`], so a failing seed replays exactly.

use crate::sim_queue::EventQueue;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::*;
use crate::host::Placement;
use crate::validate::trust::{Trust, TrustConfig};
use crate::validate::{FailReason, Reputation, Verdict};

#[derive(Debug, Clone)]
struct SimConfig {
    peers: usize,
    jobs: usize,
    units: u32,
    policy: Policy,
    /// Share of the peers that cheat, drawn among those that do not submit: submitters are
    /// honest and do not crash (their own durability is another test).
    cheaters: f64,
    /// Chance a cheater lies on a unit it runs (1: on every one).
    cheat_rate: f64,
    /// Share of the workers (not cheaters) that are sleepers: honest for their first results
    /// (a count drawn per sleeper from `sleeper_after`), then lying on `sleeper_rate` of units.
    sleepers: f64,
    sleeper_after: (u32, u32),
    sleeper_rate: f64,
    /// Adaptive replication: each job's submitter keeps a trust table under this config.
    trust: Option<TrustConfig>,
    /// Trust tables the submitters start from (a warm-up run's), by job.
    initial_trust: Vec<Trust>,
    /// Units each peer ran before (a warm-up run's): a sleeper's patience counts its whole
    /// life, not one job.
    initial_runs: Vec<u32>,
    collude: bool,
    /// Colluders share this many hosts (their keys spread evenly over them); 0 puts each
    /// cheater on a host of its own. Honest peers are each a host of their own.
    colluder_hosts: usize,
    /// The jobs' placement rule.
    placement: Placement,
    /// Fraction of peers that crash for good at a random time in the first `crash_window`.
    crashers: f64,
    crash_window: Duration,
    /// Fraction of peers `slow_factor` times slower than the others.
    slow: f64,
    slow_factor: u32,
    /// Chance an honest run ends in a host failure.
    host_failure: f64,
    loss: f64,
    /// Chance a message is delivered twice.
    duplicate: f64,
    min_delay: Duration,
    max_delay: Duration,
    unit_cost: (Duration, Duration),
    slots: u32,
    lease_timeout: Duration,
    advert_interval: Duration,
    /// How long after a crash the submitters hear of it.
    gone_after: Duration,
    time_limit: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            peers: 200,
            jobs: 2,
            units: 300,
            policy: Policy::new(2, 2, 6),
            cheaters: 0.15,
            cheat_rate: 1.0,
            sleepers: 0.0,
            sleeper_after: (50, 200),
            sleeper_rate: 0.05,
            trust: None,
            initial_trust: Vec::new(),
            initial_runs: Vec::new(),
            collude: false,
            colluder_hosts: 0,
            placement: Placement::Host,
            crashers: 0.05,
            crash_window: Duration::from_secs(20),
            slow: 0.05,
            slow_factor: 30,
            host_failure: 0.01,
            loss: 0.02,
            duplicate: 0.01,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(40),
            unit_cost: (Duration::from_millis(100), Duration::from_millis(300)),
            slots: 2,
            lease_timeout: Duration::from_secs(4),
            advert_interval: Duration::from_secs(2),
            gone_after: Duration::from_secs(6),
            // A unit takes at most max_attempts votes and max_host_failures failures, 12 with
            // the policy above, one after another in the worst case. Each costs at most a
            // lease timeout (4 s) plus the wait for an advert from a peer with room (2.5 s),
            // and the units themselves are small next to the peers' slots: 12 × 6.5 s = 78 s,
            // rounded up to 120 s.
            time_limit: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone)]
enum SimEvent {
    SchedulerTimer {
        job: usize,
    },
    IntakeTimer {
        node: usize,
    },
    Offer {
        node: usize,
        job: usize,
        leases: Vec<Lease>,
    },
    Revoke {
        node: usize,
        job: usize,
        leases: Vec<LeaseId>,
    },
    Report {
        job: usize,
        node: usize,
        results: Vec<LeaseResult>,
        want: u32,
    },
    Declined {
        job: usize,
        node: usize,
        leases: Vec<LeaseId>,
    },
    Advert {
        node: usize,
    },
    RunDone {
        node: usize,
        job: usize,
        lease: LeaseId,
        outcome: Outcome,
    },
    Crash {
        node: usize,
    },
    Gone {
        job: usize,
        node: usize,
    },
}

#[derive(Debug)]
struct Node {
    id: PeerId,
    /// The host the submitters see it on.
    host: Host,
    intake: Intake,
    alive: bool,
    cheater: bool,
    /// A sleeper: honest for this many results, then lying now and then.
    sleeper: Option<u32>,
    /// Units it has run.
    runs: u32,
    /// Wrong answers it returned on purpose.
    lies: u32,
    slow: bool,
    timer: Option<Instant>,
    /// Runs started and not aborted.
    running: BTreeSet<(usize, LeaseId)>,
}

impl Node {
    /// Whether it ever answers wrongly on purpose.
    fn liar(&self) -> bool {
        self.cheater || self.sleeper.is_some()
    }
}

#[derive(Debug)]
struct Job {
    digest: Digest,
    submitter: usize,
    scheduler: Scheduler,
    reputation: Reputation,
    timer: Option<Instant>,
    /// Who holds each lease issued, and for which unit.
    leases: BTreeMap<LeaseId, (usize, u32)>,
    /// Step at which each unit was decided.
    decided_at: BTreeMap<u32, u64>,
    verdicts: BTreeMap<u32, Verdict>,
    validations: BTreeMap<u32, Validation>,
    /// Units accepted with a wrong result at some point (corrected later or not).
    ever_wrong: BTreeSet<u32>,
    /// Wrong results each liar got accepted on its word alone.
    wrong_alone: BTreeMap<usize, u64>,
    /// (unit, node, step) of every wrong answer from a cheater that reached the submitter.
    wrong_delivered: Vec<(u32, usize, u64)>,
    finished_at: Option<Duration>,
    self_leases: u64,
}

/// What one run produced.
#[derive(Debug, Clone, Default, PartialEq)]
struct Outcomes {
    /// Cheating peers among the peers.
    cheaters: u64,
    units: u64,
    accepted_right: u64,
    accepted_wrong: u64,
    failed: u64,
    /// Failed because too many executions ended in host failures.
    failed_host: u64,
    failed_without_evidence: u64,
    lost: u64,
    /// Delivered wrong answers from before their unit's decision that the verdict omits.
    unnamed_dissents: u64,
    /// Honest peers named as dissenters.
    honest_named: u64,
    /// Cheaters named at least once / cheaters with a wrong answer counted before a decision.
    cheaters_named: u64,
    /// Honest peers the submitters' reputation tables hold a dissent against.
    honest_with_dissents: u64,
    executions: u64,
    /// Executions answered by cheaters.
    cheater_executions: u64,
    /// Units accepted wrongly at some point, corrected later or not.
    accepted_wrong_ever: u64,
    /// Units whose final result rests on one trusted peer's word.
    provisional: u64,
    /// Wrong results left at the end whose peer a later job caught: resuming this job runs
    /// them again (see [`simulate_warm`]).
    corrected_on_resume: u64,
    /// Adaptive replication's counters, summed over the jobs.
    trust: TrustStats,
    /// Wrong results the most successful liar got accepted on its word alone (corrected
    /// later or not), and the liars caught.
    worst_liar_alone: u64,
    sleepers: u64,
    /// Sleepers some submitter caught at least once (by the end of this run, counting what
    /// its trust table carried in).
    sleepers_caught: u64,
    self_leases: u64,
    finish: Duration,
    /// Answers the schedulers dropped: unknown lease, another peer's lease, duplicates.
    junk_dropped: u64,
    all_finished: bool,
    events: u64,
    trace: u64,
}

struct Sim {
    config: SimConfig,
    rng: Rng,
    base: Instant,
    now: Duration,
    step: u64,
    queue: EventQueue<SimEvent>,
    nodes: Vec<Node>,
    jobs: Vec<Job>,
    by_digest: BTreeMap<Digest, usize>,
    executions: u64,
    cheater_executions: u64,
    trace: u64,
}

fn mix(trace: u64, value: u64) -> u64 {
    (trace ^ value).wrapping_mul(0x0100_0000_01b3)
}

impl Sim {
    fn new(seed: u64, config: SimConfig) -> Self {
        let mut rng = Rng::seed_from_u64(seed);
        let base = Instant::now();
        let submitters = config.jobs.min(config.peers);
        // Exactly the asked share of the peers cheats, drawn among the workers.
        let mut workers: Vec<usize> = (submitters..config.peers).collect();
        rng.shuffle(&mut workers);
        let cheating =
            ((config.peers as f64 * config.cheaters).round() as usize).min(workers.len());
        let cheaters: BTreeSet<usize> = workers[..cheating].iter().copied().collect();
        let sleeping = ((config.peers as f64 * config.sleepers).round() as usize)
            .min(workers.len() - cheating);
        let sleepers: BTreeMap<usize, u32> = workers[cheating..cheating + sleeping]
            .iter()
            .map(|n| {
                let (low, high) = config.sleeper_after;
                let after = low + rng.below(u64::from(high.saturating_sub(low)) + 1) as u32;
                (*n, after)
            })
            .collect();
        let mut nodes = Vec::with_capacity(config.peers);
        let cheater_list: Vec<usize> = cheaters.iter().copied().collect();
        for n in 0..config.peers {
            let own = Host::Local(std::net::IpAddr::from([
                10,
                (n >> 16) as u8,
                (n >> 8) as u8,
                n as u8,
            ]));
            let host = match cheater_list.iter().position(|c| *c == n) {
                Some(i) if config.colluder_hosts > 0 => Host::Local(std::net::IpAddr::from([
                    192,
                    168,
                    0,
                    (i % config.colluder_hosts) as u8,
                ])),
                _ => own,
            };
            let mut bytes = [0u8; 32];
            for chunk in bytes.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            nodes.push(Node {
                id: PeerId::from_bytes(bytes),
                host,
                intake: Intake::new(IntakeConfig {
                    slots: config.slots,
                    prefetch: config.slots * 2,
                    ..IntakeConfig::default()
                }),
                alive: true,
                cheater: cheaters.contains(&n),
                sleeper: sleepers.get(&n).copied(),
                runs: config.initial_runs.get(n).copied().unwrap_or(0),
                lies: 0,
                slow: rng.chance(config.slow),
                timer: None,
                running: BTreeSet::new(),
            });
        }
        let mut jobs = Vec::new();
        let mut by_digest = BTreeMap::new();
        for j in 0..submitters {
            let digest = Digest::of(format!("job {j} of seed {seed}").as_bytes());
            by_digest.insert(digest, j);
            let scheduler = Scheduler::new(
                digest,
                config.units,
                config.policy,
                Config {
                    lease_timeout: config.lease_timeout,
                    max_leases_per_peer: config.slots * 4,
                    placement: config.placement,
                    ..Config::default()
                },
                rng.next_u64(),
            )
            .with_trust(config.trust.map(|c| {
                config
                    .initial_trust
                    .get(j)
                    .cloned()
                    .unwrap_or_else(|| Trust::new(c))
            }));
            jobs.push(Job {
                digest,
                submitter: j,
                scheduler,
                reputation: Reputation::default(),
                timer: None,
                leases: BTreeMap::new(),
                decided_at: BTreeMap::new(),
                verdicts: BTreeMap::new(),
                validations: BTreeMap::new(),
                ever_wrong: BTreeSet::new(),
                wrong_alone: BTreeMap::new(),
                wrong_delivered: Vec::new(),
                finished_at: None,
                self_leases: 0,
            });
        }
        let mut sim = Self {
            config,
            rng,
            base,
            now: Duration::ZERO,
            step: 0,
            queue: EventQueue::new(),
            nodes,
            jobs,
            by_digest,
            executions: 0,
            cheater_executions: 0,
            trace: 0xcbf2_9ce4_8422_2325,
        };
        for node in 0..sim.nodes.len() {
            // Submitters offer their own slots first, so that they surely run units too.
            let first = if node < submitters {
                Duration::ZERO
            } else {
                sim.rng
                    .duration_between(Duration::from_millis(1), Duration::from_millis(500))
            };
            sim.schedule(first, SimEvent::Advert { node });
            if node >= submitters && sim.rng.chance(sim.config.crashers) {
                let at = sim
                    .rng
                    .duration_between(Duration::ZERO, sim.config.crash_window);
                sim.schedule(at, SimEvent::Crash { node });
            }
        }
        sim
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn schedule(&mut self, after: Duration, event: SimEvent) {
        self.queue.push(self.now + after, event);
    }

    /// A message between two peers: delayed, and lost at random unless it stays on one peer.
    fn send(&mut self, from: usize, to: usize, event: SimEvent) {
        if from == to {
            self.schedule(Duration::ZERO, event);
            return;
        }
        if self.rng.chance(self.config.loss) {
            return;
        }
        if self.rng.chance(self.config.duplicate) {
            let delay = self
                .rng
                .duration_between(self.config.min_delay, self.config.max_delay);
            self.schedule(delay, event.clone());
        }
        let delay = self
            .rng
            .duration_between(self.config.min_delay, self.config.max_delay);
        self.schedule(delay, event);
    }

    fn truth(&self, job: usize, unit: u32) -> Digest {
        // Every tenth unit fails deterministically: honest peers agree on the error's digest.
        if unit % 10 == 3 {
            Digest::of(format!("error of job {job} unit {unit}").as_bytes())
        } else {
            Digest::of(format!("output of job {job} unit {unit}").as_bytes())
        }
    }

    fn run(&mut self) -> Outcomes {
        let limit = self.config.time_limit;
        let mut events = 0u64;
        while let Some(next) = self.queue.pop() {
            if next.at > limit || self.jobs.iter().all(|j| j.finished_at.is_some()) {
                break;
            }
            self.now = next.at;
            self.step += 1;
            events += 1;
            self.process(next.event);
        }
        self.outcomes(events)
    }

    fn process(&mut self, event: SimEvent) {
        let now = self.instant();
        match event {
            SimEvent::SchedulerTimer { job } => {
                self.jobs[job].timer = None;
                self.jobs[job].scheduler.handle_timeout(now);
                self.drive_scheduler(job);
            }
            SimEvent::IntakeTimer { node } => {
                if !self.nodes[node].alive {
                    return;
                }
                self.nodes[node].timer = None;
                self.nodes[node].intake.handle_timeout(now);
                self.drive_intake(node);
            }
            SimEvent::Offer { node, job, leases } => {
                if !self.nodes[node].alive {
                    return;
                }
                let from = self.nodes[self.jobs[job].submitter].id;
                let digest = self.jobs[job].digest;
                self.nodes[node].intake.handle(
                    IntakeEvent::Offer {
                        from,
                        job: digest,
                        leases,
                    },
                    now,
                );
                self.drive_intake(node);
            }
            SimEvent::Revoke { node, job, leases } => {
                if !self.nodes[node].alive {
                    return;
                }
                let from = self.nodes[self.jobs[job].submitter].id;
                let digest = self.jobs[job].digest;
                self.nodes[node].intake.handle(
                    IntakeEvent::Revoke {
                        from,
                        job: digest,
                        leases,
                    },
                    now,
                );
                self.drive_intake(node);
            }
            SimEvent::Report {
                job,
                node,
                results,
                want,
            } => {
                let from = self.nodes[node].id;
                for r in &results {
                    let held = self.jobs[job].leases.get(&r.lease).copied();
                    if let (Some((holder, unit)), Outcome::Output(d)) = (held, r.outcome)
                        && holder == node
                        && self.nodes[node].liar()
                        && d != self.truth(job, unit)
                    {
                        self.jobs[job].wrong_delivered.push((unit, node, self.step));
                    }
                }
                let s = &mut self.jobs[job].scheduler;
                s.handle(Event::Results { from, results }, now);
                s.handle(
                    Event::Available {
                        peer: from,
                        slots: want,
                        host: self.nodes[node].host,
                    },
                    now,
                );
                self.drive_scheduler(job);
            }
            SimEvent::Declined { job, node, leases } => {
                let from = self.nodes[node].id;
                self.jobs[job]
                    .scheduler
                    .handle(Event::Declined { from, leases }, now);
                self.drive_scheduler(job);
            }
            SimEvent::Advert { node } => {
                if !self.nodes[node].alive {
                    return;
                }
                for job in 0..self.jobs.len() {
                    if self.jobs[job].finished_at.is_some() {
                        continue;
                    }
                    let submitter = self.jobs[job].submitter;
                    let want = self.nodes[node].intake.want(&self.nodes[submitter].id);
                    self.send(
                        node,
                        submitter,
                        SimEvent::Report {
                            job,
                            node,
                            results: Vec::new(),
                            want,
                        },
                    );
                }
                let interval = self.config.advert_interval;
                let next = self
                    .rng
                    .duration_between(interval * 3 / 4, interval * 5 / 4);
                self.schedule(next, SimEvent::Advert { node });
            }
            SimEvent::RunDone {
                node,
                job,
                lease,
                outcome,
            } => {
                let n = &mut self.nodes[node];
                if !n.alive || !n.running.remove(&(job, lease)) {
                    return;
                }
                let submitter = self.nodes[self.jobs[job].submitter].id;
                let digest = self.jobs[job].digest;
                self.nodes[node].intake.handle(
                    IntakeEvent::Done {
                        submitter,
                        job: digest,
                        lease,
                        outcome,
                    },
                    now,
                );
                self.drive_intake(node);
            }
            SimEvent::Crash { node } => {
                self.nodes[node].alive = false;
                self.nodes[node].running.clear();
                self.trace = mix(self.trace, node as u64);
                for job in 0..self.jobs.len() {
                    let after = self.config.gone_after;
                    self.schedule(after, SimEvent::Gone { job, node });
                }
            }
            SimEvent::Gone { job, node } => {
                let peer = self.nodes[node].id;
                self.jobs[job]
                    .scheduler
                    .handle(Event::PeerGone { peer }, now);
                self.drive_scheduler(job);
            }
        }
    }

    fn drive_scheduler(&mut self, job: usize) {
        let submitter = self.jobs[job].submitter;
        while let Some(command) = self.jobs[job].scheduler.poll_command() {
            match command {
                Command::Offer { to, leases, .. } => {
                    let Some(node) = self.node_of(&to) else {
                        continue;
                    };
                    for l in &leases {
                        self.jobs[job].leases.insert(l.id, (node, l.unit));
                        self.trace = mix(self.trace, l.id.0 ^ ((node as u64) << 32));
                    }
                    if node == submitter {
                        self.jobs[job].self_leases += leases.len() as u64;
                    }
                    self.send(submitter, node, SimEvent::Offer { node, job, leases });
                }
                Command::Revoke { to, leases, .. } => {
                    if let Some(node) = self.node_of(&to) {
                        self.send(submitter, node, SimEvent::Revoke { node, job, leases });
                    }
                }
                Command::Decided {
                    unit,
                    verdict,
                    validation,
                } => {
                    let truth = self.truth(job, unit);
                    let wrong = verdict.digest().is_some_and(|d| d != truth);
                    if let (true, Validation::Trusted { peer, .. }) = (wrong, validation)
                        && let Some(n) = self.node_of(&peer)
                    {
                        *self.jobs[job].wrong_alone.entry(n).or_default() += 1;
                    }
                    let j = &mut self.jobs[job];
                    if wrong {
                        j.ever_wrong.insert(unit);
                    }
                    j.validations.insert(unit, validation);
                    j.reputation.record(&verdict);
                    j.decided_at.insert(unit, self.step);
                    if let Some(d) = verdict.digest() {
                        self.trace = mix(
                            self.trace,
                            u64::from_le_bytes([
                                d.0[0], d.0[1], d.0[2], d.0[3], d.0[4], d.0[5], d.0[6], d.0[7],
                            ]),
                        );
                    }
                    j.verdicts.insert(unit, verdict);
                }
                Command::Finished { .. } => {
                    self.jobs[job].finished_at = Some(self.now);
                    self.trace = mix(self.trace, self.now.as_nanos() as u64);
                }
            }
        }
        let next = self.jobs[job].scheduler.poll_timeout();
        if next.is_some() && next != self.jobs[job].timer {
            self.jobs[job].timer = next;
            let after = next
                .unwrap_or(self.instant())
                .saturating_duration_since(self.instant());
            self.schedule(after, SimEvent::SchedulerTimer { job });
        }
    }

    fn drive_intake(&mut self, node: usize) {
        while let Some(command) = self.nodes[node].intake.poll_command() {
            match command {
                IntakeCommand::Run(task) => {
                    let Some(&job) = self.by_digest.get(&task.job) else {
                        continue;
                    };
                    self.executions += 1;
                    if self.nodes[node].cheater {
                        self.cheater_executions += 1;
                    }
                    let lies = {
                        let n = &self.nodes[node];
                        let (cheater, sleeper, runs) = (n.cheater, n.sleeper, n.runs);
                        if cheater {
                            self.rng.chance(self.config.cheat_rate)
                        } else if let Some(after) = sleeper {
                            runs >= after && self.rng.chance(self.config.sleeper_rate)
                        } else {
                            false
                        }
                    };
                    self.nodes[node].runs += 1;
                    self.nodes[node].lies += u32::from(lies);
                    let (low, high) = self.config.unit_cost;
                    let mut cost = self.rng.duration_between(low, high);
                    if self.nodes[node].slow {
                        cost *= self.config.slow_factor;
                    }
                    let unit = task.lease.unit;
                    let outcome = if lies {
                        let wrong = if self.config.collude && self.nodes[node].cheater {
                            format!("colluded answer for job {job} unit {unit}")
                        } else {
                            format!("answer of cheater {node} for job {job} unit {unit}")
                        };
                        Outcome::Output(Digest::of(wrong.as_bytes()))
                    } else if self.rng.chance(self.config.host_failure) {
                        Outcome::HostFailure
                    } else {
                        Outcome::Output(self.truth(job, unit))
                    };
                    self.nodes[node].running.insert((job, task.lease.id));
                    self.schedule(
                        cost,
                        SimEvent::RunDone {
                            node,
                            job,
                            lease: task.lease.id,
                            outcome,
                        },
                    );
                }
                IntakeCommand::Abort { job, lease, .. } => {
                    if let Some(&j) = self.by_digest.get(&job) {
                        self.nodes[node].running.remove(&(j, lease));
                    }
                }
                IntakeCommand::Report {
                    job,
                    mut results,
                    want,
                    ..
                } => {
                    if let Some(&j) = self.by_digest.get(&job) {
                        let to = self.jobs[j].submitter;
                        if self.nodes[node].cheater {
                            // Cheaters also answer leases they were never given.
                            let issued = self.jobs[j].leases.len() as u64;
                            let lease = LeaseId(self.rng.below(issued + 10));
                            let forged = Digest::of(format!("forged by {node}").as_bytes());
                            results.push(LeaseResult {
                                lease,
                                outcome: Outcome::Output(forged),
                            });
                        }
                        self.send(
                            node,
                            to,
                            SimEvent::Report {
                                job: j,
                                node,
                                results,
                                want,
                            },
                        );
                    }
                }
                IntakeCommand::Decline { job, leases, .. } => {
                    if let Some(&j) = self.by_digest.get(&job) {
                        let to = self.jobs[j].submitter;
                        self.send(
                            node,
                            to,
                            SimEvent::Declined {
                                job: j,
                                node,
                                leases,
                            },
                        );
                    }
                }
            }
        }
        let next = self.nodes[node].intake.poll_timeout();
        if next.is_some() && next != self.nodes[node].timer {
            self.nodes[node].timer = next;
            let after = next
                .unwrap_or(self.instant())
                .saturating_duration_since(self.instant());
            self.schedule(after, SimEvent::IntakeTimer { node });
        }
    }

    fn node_of(&self, id: &PeerId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == *id)
    }

    fn outcomes(&self, events: u64) -> Outcomes {
        let mut o = Outcomes {
            cheaters: self.nodes.iter().filter(|n| n.cheater).count() as u64,
            executions: self.executions,
            cheater_executions: self.cheater_executions,
            sleepers: self.nodes.iter().filter(|n| n.sleeper.is_some()).count() as u64,
            sleepers_caught: self
                .nodes
                .iter()
                .filter(|n| {
                    n.sleeper.is_some()
                        && self.jobs.iter().any(|j| {
                            j.scheduler
                                .trust()
                                .is_some_and(|t| t.peer(&n.id).caught > 0)
                        })
                })
                .count() as u64,
            events,
            all_finished: self.jobs.iter().all(|j| j.finished_at.is_some()),
            finish: self
                .jobs
                .iter()
                .filter_map(|j| j.finished_at)
                .max()
                .unwrap_or(self.now),
            trace: self.trace,
            ..Outcomes::default()
        };
        let mut named: BTreeSet<usize> = BTreeSet::new();
        let mut should_be_named: BTreeSet<usize> = BTreeSet::new();
        for (j, job) in self.jobs.iter().enumerate() {
            o.units += u64::from(job.scheduler.unit_count());
            o.self_leases += job.self_leases;
            o.accepted_wrong_ever += job.ever_wrong.len() as u64;
            o.provisional += job
                .validations
                .values()
                .filter(|v| v.is_provisional())
                .count() as u64;
            let t = job.scheduler.trust_stats();
            o.trust.alone += t.alone;
            o.trust.trusted += t.trusted;
            o.trust.spot_checks += t.spot_checks;
            o.trust.spot_confirmed += t.spot_confirmed;
            o.trust.caught += t.caught;
            o.trust.revalidated += t.revalidated;
            o.trust.looked_back += t.looked_back;
            o.worst_liar_alone = o
                .worst_liar_alone
                .max(job.wrong_alone.values().copied().max().unwrap_or(0));
            let st = job.scheduler.stats();
            o.junk_dropped += st.results_unknown + st.results_wrong_peer + st.results_duplicate;
            for unit in 0..job.scheduler.unit_count() {
                match job.verdicts.get(&unit) {
                    None => o.lost += 1,
                    Some(Verdict::Accepted {
                        digest, dissenters, ..
                    }) => {
                        if *digest == self.truth(j, unit) {
                            o.accepted_right += 1;
                        } else {
                            o.accepted_wrong += 1;
                        }
                        for v in dissenters {
                            if let Some(n) = self.node_of(&v.peer) {
                                if self.nodes[n].liar() {
                                    named.insert(n);
                                } else if *digest == self.truth(j, unit) {
                                    o.honest_named += 1;
                                }
                            }
                        }
                    }
                    Some(Verdict::Failed {
                        evidence,
                        host_failed,
                        reason,
                    }) => {
                        o.failed += 1;
                        if *reason == FailReason::HostFailures {
                            o.failed_host += 1;
                        }
                        if evidence.is_empty() && host_failed.is_empty() {
                            o.failed_without_evidence += 1;
                        }
                    }
                }
            }
            for &(unit, node, step) in &job.wrong_delivered {
                let Some(&decided) = job.decided_at.get(&unit) else {
                    continue;
                };
                let Some(Verdict::Accepted {
                    digest, dissenters, ..
                }) = job.verdicts.get(&unit)
                else {
                    continue;
                };
                if step < decided && *digest == self.truth(j, unit) {
                    should_be_named.insert(node);
                    let peer = self.nodes[node].id;
                    if !dissenters.iter().any(|v| v.peer == peer) {
                        o.unnamed_dissents += 1;
                    }
                }
            }
            for (peer, _) in job.reputation.dissenters() {
                if self.node_of(peer).is_some_and(|n| !self.nodes[n].liar()) {
                    o.honest_with_dissents += 1;
                }
            }
        }
        o.cheaters_named = named.len() as u64;
        // Under adaptive replication a caught peer's vote is dropped from the units it ran
        // alone before they run again: it is named by the catch, not by those verdicts.
        assert!(
            self.config.trust.is_some() || should_be_named.is_subset(&named),
            "cheaters outvoted but never named: {:?}",
            should_be_named.difference(&named).collect::<Vec<_>>()
        );
        o
    }
}

fn simulate(seed: u64, config: SimConfig) -> Outcomes {
    Sim::new(seed, config).run()
}

/// Runs `config` once to let the submitters earn trust, then again from the trust they
/// ended with (the same seed places the same peers on the same hosts; each peer goes on
/// counting the units it ran, so a sleeper's patience spans both jobs). The warm-up's
/// `corrected_on_resume` counts its wrong results that rest on the word of a peer the second
/// job caught: resuming the warm-up job runs those again, replicated.
fn simulate_warm(seed: u64, config: SimConfig) -> (Outcomes, Outcomes) {
    let mut sim = Sim::new(seed, config.clone());
    let mut warm_up = sim.run();
    let trust = sim
        .jobs
        .iter()
        .filter_map(|j| j.scheduler.trust().cloned())
        .collect();
    let runs = sim.nodes.iter().map(|n| n.runs).collect();
    let mut again = Sim::new(
        seed,
        SimConfig {
            initial_trust: trust,
            initial_runs: runs,
            ..config
        },
    );
    let measured = again.run();
    for (j, job) in sim.jobs.iter().enumerate() {
        let Some(later) = again.jobs.get(j) else {
            continue;
        };
        for (unit, verdict) in &job.verdicts {
            let wrong = verdict.digest().is_some_and(|d| d != sim.truth(j, *unit));
            let suspect = job
                .validations
                .get(unit)
                .is_some_and(|v| later.scheduler.suspect(v).is_some());
            let goes_back = config_rule_checked(&later.scheduler);
            if wrong && suspect && goes_back {
                warm_up.corrected_on_resume += 1;
            }
        }
    }
    (warm_up, measured)
}

/// Whether the scheduler's trust rule goes back over what a caught peer ran alone (BOINC's
/// never does).
fn config_rule_checked(scheduler: &Scheduler) -> bool {
    scheduler
        .trust()
        .is_some_and(|t| t.config().rule == crate::validate::trust::TrustRule::Checked)
}

fn assert_honest_outcome(seed: u64, o: &Outcomes, config: &SimConfig) {
    let ctx = format!("seed {seed}: {o:?}");
    assert!(o.all_finished, "{ctx}");
    assert_eq!(o.lost, 0, "{ctx}");
    assert_eq!(o.accepted_wrong, 0, "{ctx}");
    assert_eq!(o.accepted_right + o.failed, o.units, "{ctx}");
    assert_eq!(o.failed_without_evidence, 0, "{ctx}");
    assert_eq!(o.unnamed_dissents, 0, "{ctx}");
    assert_eq!(o.honest_named, 0, "{ctx}");
    assert_eq!(o.honest_with_dissents, 0, "{ctx}");
    assert!(o.finish <= config.time_limit, "{ctx}");
    assert!(o.self_leases > 0, "the submitters ran units too: {ctx}");
    assert!(o.junk_dropped > 0, "forged answers were dropped: {ctx}");
}

#[test]
fn non_colluding_cheaters_are_outvoted_and_named() {
    for (seed, cheaters) in [(1u64, 0.10), (2, 0.20), (3, 0.15), (4, 0.20), (5, 0.10)] {
        let config = SimConfig {
            cheaters,
            ..SimConfig::default()
        };
        let o = simulate(seed, config.clone());
        println!(
            "sim seed {seed}: {} peers, {} cheaters ({:.0} % asked): {} units, {} accepted, {} failed, \
             {} executions ({:.2} per unit), {} cheaters named, finished at {:.1} s virtual, \
             {} events",
            config.peers,
            o.cheaters,
            cheaters * 100.0,
            o.units,
            o.accepted_right,
            o.failed,
            o.executions,
            o.executions as f64 / o.units as f64,
            o.cheaters_named,
            o.finish.as_secs_f64(),
            o.events,
        );
        assert_honest_outcome(seed, &o, &config);
        assert!(o.cheaters_named > 0, "seed {seed}: {o:?}");
    }
}

#[test]
fn seed_sweep_over_sizes_and_policies() {
    // The manifest's defaults (2/2 with 4 attempts, 3/2 with 6) over more seeds and sizes.
    let mut totals = (0u64, 0u64, 0u64);
    for seed in 20..36u64 {
        let mut rng = Rng::seed_from_u64(seed);
        let (replicas, quorum, attempts) = *rng
            .choose(&[(2, 2, 4), (3, 2, 6), (1, 1, 3)])
            .unwrap_or(&(2, 2, 4));
        let config = SimConfig {
            peers: 200 + rng.index(301),
            jobs: 1 + rng.index(3),
            units: 100 + rng.below(300) as u32,
            policy: Policy::new(replicas, quorum, attempts),
            // One-replica jobs cannot catch anyone: run them with honest peers only.
            cheaters: if replicas == 1 {
                0.0
            } else {
                0.10 + 0.10 * (rng.below(3) as f64) / 2.0
            },
            ..SimConfig::default()
        };
        let o = simulate(seed, config.clone());
        assert_honest_outcome(seed, &o, &config);
        totals.0 += o.units;
        totals.1 += o.failed;
        totals.2 += o.executions;
    }
    println!(
        "seed sweep: {} units, {} failed with evidence, {:.2} executions per unit",
        totals.0,
        totals.1,
        totals.2 as f64 / totals.0 as f64
    );
}

#[test]
fn heavy_crashes_slow_peers_and_loss_still_finish() {
    let config = SimConfig {
        peers: 250,
        jobs: 3,
        units: 200,
        policy: Policy::new(3, 2, 6),
        crashers: 0.2,
        slow: 0.15,
        loss: 0.1,
        host_failure: 0.05,
        ..SimConfig::default()
    };
    let o = simulate(7, config.clone());
    println!(
        "heavy sim: {} units, {} accepted, {} failed ({} by host failures), {} executions, \
         finished at {:.1} s",
        o.units,
        o.accepted_right,
        o.failed,
        o.failed_host,
        o.executions,
        o.finish.as_secs_f64()
    );
    assert_honest_outcome(7, &o, &config);
}

#[test]
fn a_run_replays_exactly_from_its_seed() {
    let config = SimConfig {
        units: 100,
        ..SimConfig::default()
    };
    let a = simulate(11, config.clone());
    let b = simulate(11, config.clone());
    let c = simulate(12, config);
    assert_eq!(a, b);
    assert_ne!(a.trace, c.trace);
}

#[test]
fn colluding_cheaters_wrong_acceptance_rate() {
    // With colluders a unit is accepted wrongly only when two of the peers that run it
    // collude. For 2/2 that is both first replicas (f²) or a disagreement settled by a
    // colluder (2 f (1 - f) f); for 3/2 it is two colluders among the three replicas. Both
    // come to 3 f² - 2 f³ with f the share of colluders among the peers that run units.
    // Crashes and expiries add a few draws per unit, but rarely more than four, so the rate
    // stays under C(4, 2) f² = 6 f², the bound asserted.
    let mut lines = Vec::new();
    for (replicas, quorum) in [(2u32, 2u32), (3, 2)] {
        for cheaters in [0.10, 0.20] {
            let config = SimConfig {
                jobs: 2,
                units: 1000,
                policy: Policy::new(replicas, quorum, replicas * 2 + 2),
                cheaters,
                collude: true,
                ..SimConfig::default()
            };
            let seed = 100 + (cheaters * 100.0) as u64 + u64::from(replicas);
            let o = simulate(seed, config.clone());
            assert!(o.all_finished && o.lost == 0, "{o:?}");
            let rate = o.accepted_wrong as f64 / o.units as f64;
            let f = o.cheaters as f64 / config.peers as f64;
            lines.push(format!(
                "collusion replicas={replicas} quorum={quorum} cheaters={:.0} % ({} of {} \
                 peers): {} of {} units accepted wrongly ({:.2} %, model 3f²-2f³ = {:.2} %), \
                 {:.2} executions per unit",
                cheaters * 100.0,
                o.cheaters,
                config.peers,
                o.accepted_wrong,
                o.units,
                rate * 100.0,
                (3.0 * f * f - 2.0 * f * f * f) * 100.0,
                o.executions as f64 / o.units as f64
            ));
            assert!(rate <= 6.0 * cheaters * cheaters, "{}", lines.join("\n"));
        }
    }
    println!("{}", lines.join("\n"));
}

#[test]
fn colluders_concentrated_on_few_hosts_by_placement() {
    // Colluding keys packed on one or three hosts. Placed by peer, their keys count as
    // independent witnesses and their share of the work is their share of the keys; placed by
    // host, two keys of one host never hold one unit and a host's lease cap bounds its share,
    // so a forgery needs two colluding *hosts* on one unit: none with one host, about s² with
    // s the colluding hosts' share of the executions.
    let mut lines = Vec::new();
    for cheaters in [0.10, 0.20] {
        for hosts in [1usize, 3] {
            let mut rates = Vec::new();
            for placement in [Placement::Host, Placement::Peer] {
                let config = SimConfig {
                    jobs: 2,
                    units: 1000,
                    policy: Policy::new(2, 2, 6),
                    cheaters,
                    collude: true,
                    colluder_hosts: hosts,
                    placement,
                    ..SimConfig::default()
                };
                let seed = 300 + (cheaters * 100.0) as u64 + hosts as u64;
                let o = simulate(seed, config.clone());
                assert!(o.all_finished && o.lost == 0, "{o:?}");
                let rate = o.accepted_wrong as f64 / o.units as f64;
                let share = o.cheater_executions as f64 / o.executions as f64;
                lines.push(format!(
                    "colluding keys {:.0} % ({} of {} peers) on {hosts} host(s), placement \
                     {placement:?}: {} of {} units accepted wrongly ({:.2} %); colluders ran \
                     {:.1} % of {} executions ({:.2} per unit)",
                    cheaters * 100.0,
                    o.cheaters,
                    config.peers,
                    o.accepted_wrong,
                    o.units,
                    rate * 100.0,
                    share * 100.0,
                    o.executions,
                    o.executions as f64 / o.units as f64
                ));
                if placement == Placement::Host && hosts == 1 {
                    assert_eq!(o.accepted_wrong, 0, "{}", lines.join("\n"));
                }
                if placement == Placement::Host {
                    assert!(rate <= 6.0 * share * share + 0.002, "{}", lines.join("\n"));
                }
                rates.push(rate);
            }
            assert!(rates[0] < rates[1], "{}", lines.join("\n"));
        }
    }
    println!("{}", lines.join("\n"));
}

/// Wrong results left at the end of both jobs once the warm-up job is resumed after the
/// measured job's catches.
fn wrong_left(o: &Outcomes, warm: &Outcomes) -> u64 {
    (o.accepted_wrong + warm.accepted_wrong).saturating_sub(warm.corrected_on_resume)
}

/// A scenario of the adaptive tables as run: `units` units over `peers` peers, policy 2/2 with
/// 6 attempts, under `trust`.
fn adaptive_config(
    base: &SimConfig,
    units: u32,
    peers: usize,
    trust: Option<TrustConfig>,
) -> SimConfig {
    SimConfig {
        peers,
        jobs: 1,
        units,
        policy: Policy::new(2, 2, 6),
        trust,
        time_limit: Duration::from_secs(3600),
        ..base.clone()
    }
}

/// One row of the adaptive-replication table.
fn adaptive_row(name: &str, rule: &str, o: &Outcomes, warm: &Outcomes) -> String {
    format!(
        "| {name} | {rule} | {:.3} ({:.3}) | {:.1} % | {} | {} | {} | {} | {} | {} | {} |",
        o.executions as f64 / o.units as f64,
        warm.executions as f64 / warm.units as f64,
        o.trust.alone as f64 * 100.0 / o.units as f64,
        o.trust.spot_checks,
        o.accepted_wrong_ever + warm.accepted_wrong_ever,
        o.accepted_wrong + warm.accepted_wrong,
        wrong_left(o, warm),
        o.trust.caught + warm.trust.caught,
        o.trust.revalidated + warm.trust.revalidated,
        o.worst_liar_alone.max(warm.worst_liar_alone),
    )
}

/// The scenarios of adaptive replication: honest peers, cheaters, sleepers and colluders.
fn adaptive_scenarios() -> Vec<(&'static str, SimConfig)> {
    vec![
        (
            "honest",
            SimConfig {
                cheaters: 0.0,
                ..SimConfig::default()
            },
        ),
        (
            "10 % cheaters lying on 20 % of units",
            SimConfig {
                cheaters: 0.10,
                cheat_rate: 0.2,
                ..SimConfig::default()
            },
        ),
        (
            "20 % cheaters lying on 20 % of units",
            SimConfig {
                cheaters: 0.20,
                cheat_rate: 0.2,
                ..SimConfig::default()
            },
        ),
        (
            "10 % sleepers (honest 50–200 results, then 5 %)",
            SimConfig {
                cheaters: 0.0,
                sleepers: 0.10,
                ..SimConfig::default()
            },
        ),
        (
            "20 % colluding keys on 3 hosts",
            SimConfig {
                cheaters: 0.20,
                collude: true,
                colluder_hosts: 3,
                ..SimConfig::default()
            },
        ),
    ]
}

/// The scenarios of adaptive replication, each under plain `replicas = 2`, BOINC's rule and
/// ours, run twice: a warm-up job that lets the submitter earn trust, then the measured job
/// from the trust it ended with. Returns the table's rows and the targets missed: no wrong
/// result left under our rule with non-colluding cheaters, at most `max_per_unit` executions
/// per unit among honest peers (the median over the seeds), no sleeper's lie left once the
/// warm-up job is resumed, and colluders no better off than under `replicas = 2`.
fn adaptive_table(
    units: u32,
    peers: usize,
    seeds: &[u64],
    max_per_unit: f64,
) -> (Vec<String>, Vec<String>) {
    let scenarios = adaptive_scenarios();
    let rules: [(&str, Option<TrustConfig>); 3] = [
        ("replicas = 2", None),
        ("BOINC", Some(TrustConfig::boinc())),
        ("checked", Some(TrustConfig::default())),
    ];
    let mut rows = Vec::new();
    let mut missed = Vec::new();
    for (name, base) in &scenarios {
        let mut left_by_rule = [0u64; 3];
        let mut per_unit_checked = Vec::new();
        for &seed in seeds {
            for (r, (rule, trust)) in rules.iter().enumerate() {
                let config = adaptive_config(base, units, peers, *trust);
                let (warm, o) = simulate_warm(seed, config);
                assert!(o.all_finished && o.lost == 0, "{name} {rule}: {o:?}");
                assert!(
                    warm.all_finished && warm.lost == 0,
                    "{name} {rule}: {warm:?}"
                );
                left_by_rule[r] += wrong_left(&o, &warm);
                rows.push(adaptive_row(name, rule, &o, &warm));
                let collude = base.collude;
                let sleepers = base.sleepers > 0.0;
                if *rule == "checked"
                    && !collude
                    && !sleepers
                    && o.accepted_wrong + warm.accepted_wrong > 0
                {
                    missed.push(format!("{name}, seed {seed}: wrong results left"));
                }
                // A sleeper's lie may still stand when its job ends, caught later: resuming
                // the job runs it again.
                if *rule == "checked" && sleepers && wrong_left(&o, &warm) > 0 {
                    missed.push(format!("{name}, seed {seed}: wrong results left"));
                }
                if *rule == "checked" && base.cheaters == 0.0 && !sleepers {
                    per_unit_checked.push(o.executions as f64 / o.units as f64);
                }
            }
        }
        per_unit_checked.sort_by(f64::total_cmp);
        if let Some(median) = per_unit_checked.get(per_unit_checked.len() / 2)
            && *median > max_per_unit
        {
            missed.push(format!("{name}: {median:.3} executions per unit (median)"));
        }
        if base.collude && left_by_rule[2] > left_by_rule[0] {
            missed.push(format!(
                "{name}: adaptive left {} wrong, replicas = 2 left {}",
                left_by_rule[2], left_by_rule[0]
            ));
        }
    }
    (rows, missed)
}

const ADAPTIVE_HEADER: &str = "| scenario | rule | executions per unit (warm-up job) | run alone | spot checks | wrong accepted at some point | wrong left when its job ended | wrong left after resuming | trusted peers caught | re-validated units | most wrong results one liar got accepted alone |\n|---|---|---|---|---|---|---|---|---|---|---|";

/// Adaptive replication against every scenario. A short run (two jobs of 2,000 units, 60
/// peers, one seed) in every test run, with a looser bound on executions, since two short jobs
/// do not reach the full table's steady state; with `ADAPTIVE_FULL=1` it prints the table of
/// `BENCHMARKS.md` (10,000 units per job, 100 peers, seeds 1–3; about six minutes in a debug
/// build, so it is not part of every run):
/// `ADAPTIVE_FULL=1 cargo test --release -p coordinator-free --lib adaptive_replication_keeps_no_wrong_result -- --nocapture`.
#[test]
fn adaptive_replication_keeps_no_wrong_result() {
    let (rows, missed) = if std::env::var_os("ADAPTIVE_FULL").is_some() {
        adaptive_table(10_000, 100, &[1, 2, 3], 1.15)
    } else {
        adaptive_table(2_000, 60, &[1], 1.25)
    };
    println!("{ADAPTIVE_HEADER}\n{}", rows.join("\n"));
    assert!(missed.is_empty(), "{missed:#?}");
}

/// How the spot-check floor trades executions for sleepers caught: the sleeper scenario under
/// floors from 5 % to 50 %. A short run (2,000 units, 60 peers) in every test run asserts that
/// a higher floor costs honest peers more executions; with `SPOT_FLOOR_FULL=1` it prints the
/// table of `BENCHMARKS.md` (the adaptive table's 10,000 units and 100 peers, seeds 1–3) and
/// asserts as well that the highest floor catches no fewer sleepers:
/// `SPOT_FLOOR_FULL=1 cargo test --release -p coordinator-free --lib sleepers_by_spot_floor -- --nocapture`.
#[test]
fn sleepers_by_spot_floor() {
    let full = std::env::var_os("SPOT_FLOOR_FULL").is_some();
    let (units, peers, seeds): (u32, usize, &[u64]) = if full {
        (10_000, 100, &[1, 2, 3])
    } else {
        (2_000, 60, &[1])
    };
    println!(
        "| spot floor | executions per unit (honest peers) | executions per unit (sleepers) | wrong at some point | wrong left at the end | sleepers caught (of 30) |\n|---|---|---|---|---|---|"
    );
    let mut rows = Vec::new();
    for floor in [0.05, 0.10, 0.20, 0.50] {
        let trust = Some(TrustConfig {
            spot_floor: floor,
            ..TrustConfig::default()
        });
        let (mut honest, mut sleepy) = (Vec::new(), Vec::new());
        let (mut ever, mut left, mut caught) = (0, 0, 0);
        for &seed in seeds {
            let no_cheaters = SimConfig {
                cheaters: 0.0,
                ..SimConfig::default()
            };
            let base = adaptive_config(&no_cheaters, units, peers, trust);
            let (_, o) = simulate_warm(seed, base.clone());
            honest.push(o.executions as f64 / o.units as f64);
            let (warm, o) = simulate_warm(
                seed,
                SimConfig {
                    sleepers: 0.10,
                    ..base
                },
            );
            sleepy.push(o.executions as f64 / o.units as f64);
            ever += o.accepted_wrong_ever + warm.accepted_wrong_ever;
            left += wrong_left(&o, &warm);
            caught += o.sleepers_caught;
        }
        honest.sort_by(f64::total_cmp);
        sleepy.sort_by(f64::total_cmp);
        let (honest, sleepy) = (honest[honest.len() / 2], sleepy[sleepy.len() / 2]);
        rows.push((honest, caught, left));
        println!(
            "| {:.0} % | {honest:.3} | {sleepy:.3} | {ever} | {left} | {caught} |",
            floor * 100.0,
        );
    }
    for pair in rows.windows(2) {
        assert!(
            pair[1].0 > pair[0].0,
            "a higher floor costs more executions: {rows:?}"
        );
    }
    // Thirty sleepers over three seeds: the count caught moves by a few between neighbouring
    // floors, so only the ends are compared, and only over the full table's seeds.
    assert!(
        !full || rows[3].1 >= rows[0].1,
        "the highest floor catches no fewer sleepers than the lowest: {rows:?}"
    );
}

/// A scenario, the catch factor it ran under, wrong results accepted at some point and wrong
/// results left when its job ended.
type CatchSums = (&'static str, u32, u64, u64);

/// The catch rule against a flat threshold: each cheater, sleeper and colluder scenario under
/// both, summed over `seeds`. Returns the rows of the table and, per scenario and rule, (wrong
/// accepted at some point, wrong left when its job ended).
fn catch_rule_table(
    units: u32,
    peers: usize,
    seeds: std::ops::RangeInclusive<u64>,
) -> (Vec<String>, Vec<CatchSums>) {
    let runs = seeds.clone().count() as f64;
    let mut rows = Vec::new();
    let mut sums = Vec::new();
    // Honest peers are never caught: the rule makes no difference there.
    let scenarios = adaptive_scenarios()
        .into_iter()
        .filter(|(name, _)| *name != "honest");
    for (name, base) in scenarios {
        for (rule, factor) in [("10 × 4^k", 4), ("10 (flat)", 1)] {
            let (mut per_unit, mut ever, mut ended, mut left, mut rerun) = (0.0, 0, 0, 0, 0);
            for seed in seeds.clone() {
                let trust = TrustConfig {
                    catch_factor: factor,
                    ..TrustConfig::default()
                };
                let config = adaptive_config(&base, units, peers, Some(trust));
                let (warm, o) = simulate_warm(seed, config);
                per_unit += o.executions as f64 / o.units as f64 / runs;
                ever += o.accepted_wrong_ever + warm.accepted_wrong_ever;
                ended += o.accepted_wrong + warm.accepted_wrong;
                left += wrong_left(&o, &warm);
                rerun += o.trust.revalidated + warm.trust.revalidated;
            }
            rows.push(format!(
                "| {name} | {rule} | {per_unit:.3} | {ever} | {ended} | {left} | {rerun} |"
            ));
            sums.push((name, factor, ever, ended));
        }
    }
    (rows, sums)
}

const CATCH_RULE_HEADER: &str = "| scenario | streak needed after k catches | executions per unit (mean) | wrong accepted at some point | wrong left when its job ended | wrong left after resuming | units re-validated |\n|---|---|---|---|---|---|---|";

/// A short run of the catch-rule comparison: against cheaters the quadrupled streak leaves no
/// wrong result when a job ends and lets no more wrong results be accepted along the way than
/// a flat threshold. With `CATCH_RULE_FULL=1` it runs the table of `BENCHMARKS.md` instead (ten
/// seeds of 2 × 10,000 units, about a minute in a release build):
/// `CATCH_RULE_FULL=1 cargo test --release -p coordinator-free --lib catch_rule -- --nocapture`.
#[test]
fn catch_rule_against_a_flat_threshold() {
    let full = std::env::var_os("CATCH_RULE_FULL").is_some();
    let (rows, sums) = if full {
        catch_rule_table(10_000, 100, 1..=10)
    } else {
        catch_rule_table(2_000, 60, 1..=2)
    };
    println!("{CATCH_RULE_HEADER}\n{}", rows.join("\n"));
    for pair in sums.chunks(2) {
        let [(name, 4, ever, ended), (_, 1, flat_ever, _)] = pair else {
            panic!("rows in pairs, catch rule first: {sums:?}");
        };
        if name.contains("cheaters") {
            assert_eq!(*ended, 0, "{name}: {}", rows.join("\n"));
            assert!(ever <= flat_ever, "{name}: {}", rows.join("\n"));
        }
    }
}

/// One row of the alert comparison: scenario, whether the alert was on, executions per unit
/// (median over the seeds), wrong accepted at some point, wrong left when its job ended, wrong
/// left after resuming.
type AlertRow = (&'static str, bool, f64, u64, u64, u64);

/// The alert after a catch against none: every adaptive scenario under our rule with the
/// default alert and with it switched off, summed over `seeds`.
fn alert_table(units: u32, peers: usize, seeds: std::ops::RangeInclusive<u64>) -> Vec<AlertRow> {
    let mut rows = Vec::new();
    for (name, base) in adaptive_scenarios() {
        for alert in [true, false] {
            let on = TrustConfig::default();
            let trust = TrustConfig {
                alert_span: if alert { on.alert_span } else { 0 },
                look_back_span: if alert { on.look_back_span } else { 0 },
                ..on
            };
            let (mut per_unit, mut ever, mut ended, mut left) = (Vec::new(), 0, 0, 0);
            for seed in seeds.clone() {
                let config = adaptive_config(&base, units, peers, Some(trust));
                let (warm, o) = simulate_warm(seed, config);
                assert!(o.all_finished && o.lost == 0, "{name}: {o:?}");
                per_unit.push(o.executions as f64 / o.units as f64);
                ever += o.accepted_wrong_ever + warm.accepted_wrong_ever;
                ended += o.accepted_wrong + warm.accepted_wrong;
                left += wrong_left(&o, &warm);
            }
            per_unit.sort_by(f64::total_cmp);
            rows.push((name, alert, per_unit[per_unit.len() / 2], ever, ended, left));
        }
    }
    rows
}

/// The alert after a catch, against none. A short run in every test run: among honest peers
/// nothing is caught, so the alert changes nothing at all; against cheaters no wrong result is
/// left; against sleepers no more wrong results are accepted along the way than without it, and
/// none is left once the warm-up job is resumed. With `ALERT_FULL=1` it prints the ten-seed table of `BENCHMARKS.md` (2 × 10,000 units per
/// run, a few minutes in a release build):
/// `ALERT_FULL=1 cargo test --release -p coordinator-free --lib alert_after_a_catch -- --nocapture`.
#[test]
fn alert_after_a_catch_against_none() {
    let full = std::env::var_os("ALERT_FULL").is_some();
    let rows = if full {
        // `ALERT_SEEDS=11-30` runs other seeds.
        let seeds = std::env::var("ALERT_SEEDS")
            .ok()
            .and_then(|s| {
                let (a, b) = s.split_once('-')?;
                Some(a.parse().ok()?..=b.parse().ok()?)
            })
            .unwrap_or(1..=10);
        alert_table(10_000, 100, seeds)
    } else {
        alert_table(2_000, 60, 1..=2)
    };
    println!(
        "| scenario | alert after a catch | executions per unit (median) | wrong accepted at some point | wrong left when its job ended | wrong left after resuming |\n|---|---|---|---|---|---|"
    );
    for (name, alert, per_unit, ever, ended, left) in &rows {
        let alert = if *alert {
            "looks back, checks the next 2,000"
        } else {
            "none"
        };
        println!("| {name} | {alert} | {per_unit:.3} | {ever} | {ended} | {left} |");
    }
    for pair in rows.chunks(2) {
        let [on, off] = pair else {
            panic!("rows in pairs: {rows:?}");
        };
        let name = on.0;
        if name == "honest" {
            assert_eq!(on.2, off.2, "{rows:?}");
        }
        if name.contains("cheaters") {
            assert_eq!(on.4, 0, "{rows:?}");
        }
        if name.contains("sleepers") {
            assert!(on.3 <= off.3, "{rows:?}");
            assert_eq!(on.5, 0, "{rows:?}");
        }
    }
}
