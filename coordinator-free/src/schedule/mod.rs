//! Handing a job's units to peers: a sans-IO scheduler on the submitting peer, and the worker's
//! [`Intake`] that shares its cores among submitters.
//!
//! The [`Scheduler`] owns one job of `units` units, each validated by its own
//! [`Tally`](crate::validate::Tally). It learns which peers have room
//! ([`Event::Available`]), leaves ([`Event::PeerGone`]) and answers ([`Event::Results`]),
//! and asks the driver to send batched [`Lease`]s ([`Command::Offer`]), to revoke leases of
//! decided units, and reports each unit's [`Verdict`] and the end of the job.
//!
//! Rules it keeps:
//!
//! * a unit never runs twice on one peer (BOINC's `one_result_per_host_per_wu`), counting
//!   every peer that ever held a lease on it, answered or not;
//! * a peer holds at most `max_leases_per_peer` leases, and one offer carries at most
//!   `max_batch`, so tiny units share a round trip without one peer hoarding the job; a peer
//!   that lets a lease expire has its own limit halved, and earns it back one answer at a
//!   time, so slow or flaky peers stop soaking up units they will not finish in time;
//! * a lease unanswered at its deadline, or held by a peer that left, counts as a host failure
//!   and its unit is offered elsewhere; an answer that comes after the deadline still votes
//!   while the unit is open and is dropped otherwise;
//! * units already started (waiting for further replicas or a retry) go out before fresh
//!   ones, and fresh units stop going out while `max_backlog` started units wait, so a peer
//!   that cannot take the waiting units (it ran them already) does not start ever more units
//!   nobody can finish;
//! * each peer is given units drawn at random from a window at the front of the queues, so
//!   peers that ask at the same moment (or pick their ids to sort together) do not receive
//!   the same units;
//! * a dispatch round considers only the peers that reported room since the last one, unless
//!   units became ready again, so its cost does not grow with every idle peer;
//! * every answer that matches no lease of its sender is dropped and counted in [`Stats`].
//!
//! The submitter runs units for its own job like any other peer: it sends `Available` for
//! itself and carries out offers addressed to itself locally.

mod intake;
#[cfg(test)]
mod sim;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use intake::{Intake, IntakeCommand, IntakeConfig, IntakeEvent, IntakeStats, Task};

use crate::digest::Digest;
use crate::peer_id::PeerId;
use crate::rng::Rng;
use crate::validate::{Outcome, Policy, Tally, ValidateError, Verdict};

/// Names one lease of one job; unique within the job's scheduler and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lease-{}", self.0)
    }
}

/// The right to run one execution of one unit until a deadline.
///
/// `deadline` is in the holder's clock: the wire carries the time left and the receiving
/// driver turns it back into an `Instant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub unit: u32,
    /// 1 for the unit's first execution, 2 for the second, and so on.
    pub attempt: u32,
    pub deadline: Instant,
}

/// One answered lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseResult {
    pub lease: LeaseId,
    pub outcome: Outcome,
}

/// Timers and limits of a scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How long a peer has to answer a lease. Set it from the job's per-unit timeout plus
    /// the time to fetch the inputs. Default 60 s.
    pub lease_timeout: Duration,
    /// Most leases one peer holds at once. Default 32.
    pub max_leases_per_peer: u32,
    /// Most leases in one offer. Default 64.
    pub max_batch: usize,
    /// How many ready units a peer's units are drawn from, as a multiple of what it takes.
    /// Default 4.
    pub spread: usize,
    /// Most started units waiting for further executions before no fresh unit goes out.
    /// Default 1024.
    pub max_backlog: usize,
    /// Most expired leases remembered so that their late answers still vote. Default 4096.
    pub max_expired: usize,
    /// Most peers tracked. Default 4096.
    pub max_peers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lease_timeout: Duration::from_secs(60),
            max_leases_per_peer: 32,
            max_batch: 64,
            spread: 4,
            max_backlog: 1024,
            max_expired: 4096,
            max_peers: 4096,
        }
    }
}

/// What the driver tells the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `peer` will take up to `slots` more leases of this job now (its advert or its request
    /// for work). Replaces what it said before.
    Available { peer: PeerId, slots: u32 },
    /// `peer` left the network; its leases are given up.
    PeerGone { peer: PeerId },
    /// A batch of answers from `from`.
    Results {
        from: PeerId,
        results: Vec<LeaseResult>,
    },
    /// `from` refused leases it was offered (its queue was full); they were never run.
    Declined { from: PeerId, leases: Vec<LeaseId> },
    /// The submitter gave the job up: every open unit fails as abandoned.
    Cancel,
}

/// What the scheduler asks of the driver, plus notifications for the store and the UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send these leases to `to` in one message.
    Offer {
        to: PeerId,
        job: Digest,
        leases: Vec<Lease>,
    },
    /// Tell `to` that these leases are no longer wanted (their units are decided).
    Revoke {
        to: PeerId,
        job: Digest,
        leases: Vec<LeaseId>,
    },
    /// A unit is decided. Journal it, and feed it to the submitter's
    /// [`Reputation`](crate::validate::Reputation).
    Decided { unit: u32, verdict: Verdict },
    /// Every unit is decided; sent once.
    Finished { accepted: u32, failed: u32 },
}

/// Counters of what happened to leases and answers, for status output and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub leases_issued: u64,
    pub leases_expired: u64,
    /// Given up because their peer left.
    pub leases_lost: u64,
    pub leases_declined: u64,
    pub leases_revoked: u64,
    /// Answers counted by the unit's tally (votes and host failures).
    pub results_counted: u64,
    /// Answers after the deadline that still voted.
    pub results_late: u64,
    /// Answers for units already decided.
    pub results_closed: u64,
    /// Answers naming a lease this scheduler never issued or has forgotten.
    pub results_unknown: u64,
    /// Answers for a lease held by another peer.
    pub results_wrong_peer: u64,
    /// Second answers from one peer for one unit.
    pub results_duplicate: u64,
    /// `Available` from new peers while the peer table was full.
    pub peers_refused: u64,
}

/// How far the job has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub units: u32,
    pub accepted: u32,
    pub failed: u32,
    /// Leases out now.
    pub running: u32,
    /// Peers that hold a lease now.
    pub peers: u32,
}

/// A call the scheduler refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("no unit {unit}: the job has {units} units")]
    NoSuchUnit { unit: u32, units: u32 },
    #[error("unit {unit}: {source}")]
    Validate {
        unit: u32,
        #[source]
        source: ValidateError,
    },
}

#[derive(Debug, Clone)]
struct UnitState {
    tally: Tally,
    /// Every peer that ever held a lease on this unit.
    tried: Vec<PeerId>,
    /// Leases out now.
    active: Vec<LeaseId>,
    issued: u32,
}

#[derive(Debug, Clone, Copy)]
struct Active {
    peer: PeerId,
    unit: u32,
    deadline: Instant,
}

#[derive(Debug, Clone)]
struct PeerState {
    free: u32,
    /// Most leases this peer may hold now: `max_leases_per_peer`, lowered by expiries.
    limit: u32,
    leases: BTreeSet<LeaseId>,
}

/// The scheduler of one job on its submitting peer.
pub struct Scheduler {
    config: Config,
    job: Digest,
    rng: Rng,
    units: Vec<UnitState>,
    /// Open units never leased, in unit order.
    fresh: BTreeSet<u32>,
    /// Open units leased before that want more executions, in unit order.
    started: BTreeSet<u32>,
    /// Peers that reported room since the last dispatch.
    pending: BTreeSet<PeerId>,
    /// Units became ready again: every peer with room is worth a look.
    rescan: bool,
    /// A peer with room got nothing because of the backlog cap.
    starved: bool,
    leases: BTreeMap<LeaseId, Active>,
    deadlines: BTreeSet<(Instant, LeaseId)>,
    expired: BTreeMap<LeaseId, (PeerId, u32)>,
    expired_order: VecDeque<LeaseId>,
    peers: BTreeMap<PeerId, PeerState>,
    next_lease: u64,
    accepted: u32,
    failed: u32,
    finished: bool,
    out: VecDeque<Command>,
    stats: Stats,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("job", &self.job)
            .field("progress", &self.progress())
            .field("fresh", &self.fresh.len())
            .field("started", &self.started.len())
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler for `units` units of `job`, each validated under `policy`. `seed` feeds the
    /// draw of units per peer.
    pub fn new(job: Digest, units: u32, policy: Policy, config: Config, seed: u64) -> Self {
        let tally = Tally::new(policy);
        let mut this = Self {
            job,
            rng: Rng::seed_from_u64(seed),
            units: (0..units)
                .map(|_| UnitState {
                    tally: tally.clone(),
                    tried: Vec::new(),
                    active: Vec::new(),
                    issued: 0,
                })
                .collect(),
            fresh: (0..units).collect(),
            started: BTreeSet::new(),
            pending: BTreeSet::new(),
            rescan: false,
            starved: false,
            leases: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            expired: BTreeMap::new(),
            expired_order: VecDeque::new(),
            peers: BTreeMap::new(),
            next_lease: 0,
            accepted: 0,
            failed: 0,
            finished: false,
            out: VecDeque::new(),
            stats: Stats::default(),
            config,
        };
        this.check_finished();
        this
    }

    /// Restores a decided unit from the journal before the job resumes.
    pub fn restore(&mut self, unit: u32, verdict: Verdict) -> Result<(), ScheduleError> {
        let units = self.unit_count();
        let state = self
            .units
            .get_mut(unit as usize)
            .ok_or(ScheduleError::NoSuchUnit { unit, units })?;
        if !state.tally.is_open() {
            return Err(ScheduleError::Validate {
                unit,
                source: ValidateError::Closed,
            });
        }
        if verdict.is_accepted() {
            self.accepted += 1;
        } else {
            self.failed += 1;
        }
        // A journaled verdict is final: close the tally without replaying its votes.
        state.tally.restore(verdict);
        self.fresh.remove(&unit);
        self.started.remove(&unit);
        self.check_finished();
        Ok(())
    }

    pub fn job(&self) -> Digest {
        self.job
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn unit_count(&self) -> u32 {
        u32::try_from(self.units.len()).unwrap_or(u32::MAX)
    }

    /// The tally of one unit.
    pub fn unit(&self, unit: u32) -> Option<&Tally> {
        self.units.get(unit as usize).map(|u| &u.tally)
    }

    /// The unit of a lease `peer` holds now, or held until it expired (and whose late answer
    /// may still vote); `None` for any other lease.
    pub fn lease_unit(&self, lease: LeaseId, peer: &PeerId) -> Option<u32> {
        match self.leases.get(&lease) {
            Some(active) if active.peer == *peer => Some(active.unit),
            Some(_) => None,
            None => self
                .expired
                .get(&lease)
                .filter(|(holder, _)| holder == peer)
                .map(|(_, unit)| *unit),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn progress(&self) -> Progress {
        Progress {
            units: self.unit_count(),
            accepted: self.accepted,
            failed: self.failed,
            running: u32::try_from(self.leases.len()).unwrap_or(u32::MAX),
            peers: u32::try_from(self.peers.values().filter(|p| !p.leases.is_empty()).count())
                .unwrap_or(u32::MAX),
        }
    }

    /// The next instant at which [`Self::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(active) = self.leases.get(&id).copied() else {
                continue;
            };
            tracing::debug!(
                job = %self.job,
                unit = active.unit,
                lease = %id,
                peer = ?active.peer,
                "lease expired"
            );
            self.stats.leases_expired += 1;
            if let Some(peer) = self.peers.get_mut(&active.peer) {
                peer.limit = (peer.limit / 2).max(1);
            }
            self.give_up(id, active);
            self.remember_expired(id, active);
        }
        self.dispatch(now);
    }

    pub fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Available { peer, slots } => {
                if !self.peers.contains_key(&peer) && self.peers.len() >= self.config.max_peers {
                    self.stats.peers_refused += 1;
                } else {
                    let limit = self.config.max_leases_per_peer;
                    self.peers
                        .entry(peer)
                        .or_insert_with(|| PeerState {
                            free: 0,
                            limit,
                            leases: BTreeSet::new(),
                        })
                        .free = slots;
                    self.pending.insert(peer);
                }
            }
            Event::PeerGone { peer } => {
                if let Some(state) = self.peers.remove(&peer) {
                    for id in state.leases {
                        if let Some(active) = self.leases.get(&id).copied() {
                            self.stats.leases_lost += 1;
                            self.give_up(id, active);
                            self.remember_expired(id, active);
                        }
                    }
                }
            }
            Event::Results { from, results } => {
                for result in results {
                    self.on_result(from, result);
                }
            }
            Event::Declined { from, leases } => {
                for id in leases {
                    match self.leases.get(&id).copied() {
                        Some(active) if active.peer == from => {
                            self.stats.leases_declined += 1;
                            self.forget_lease(id, active);
                            let unit = active.unit;
                            if let Some(state) = self.units.get_mut(unit as usize) {
                                // Never run there: the peer may take the unit again later, and
                                // the execution is taken back rather than counted as failed.
                                state.tried.retain(|p| *p != from);
                                state.issued = state.issued.saturating_sub(1);
                                state.tally.withdraw();
                            }
                            self.refresh(unit);
                        }
                        Some(_) => self.stats.results_wrong_peer += 1,
                        None => self.stats.results_unknown += 1,
                    }
                }
            }
            Event::Cancel => self.cancel(),
        }
        self.dispatch(now);
    }

    fn on_result(&mut self, from: PeerId, result: LeaseResult) {
        if let Some(active) = self.leases.get(&result.lease).copied() {
            if active.peer != from {
                self.stats.results_wrong_peer += 1;
                return;
            }
            self.forget_lease(result.lease, active);
            if let Some(peer) = self.peers.get_mut(&from) {
                if let Outcome::Output(_) = result.outcome {
                    peer.limit = (peer.limit + 1).min(self.config.max_leases_per_peer);
                }
                self.pending.insert(from);
            }
            let Some(state) = self.units.get_mut(active.unit as usize) else {
                return;
            };
            let recorded = state.tally.record(from, result.outcome);
            self.after_record(active.unit, recorded, false);
        } else if let Some(&(peer, unit)) = self.expired.get(&result.lease) {
            if peer != from {
                self.stats.results_wrong_peer += 1;
                return;
            }
            // One late answer per lease; a late host failure was already counted at expiry.
            self.expired.remove(&result.lease);
            if result.outcome == Outcome::HostFailure {
                return;
            }
            let Some(state) = self.units.get_mut(unit as usize) else {
                return;
            };
            let recorded = state.tally.record_late(from, result.outcome);
            self.after_record(unit, recorded, true);
        } else {
            self.stats.results_unknown += 1;
        }
    }

    fn after_record(
        &mut self,
        unit: u32,
        recorded: Result<Option<Verdict>, ValidateError>,
        late: bool,
    ) {
        match recorded {
            Ok(verdict) => {
                self.stats.results_counted += 1;
                if late {
                    self.stats.results_late += 1;
                }
                match verdict {
                    Some(verdict) => self.decide(unit, verdict),
                    None => self.refresh(unit),
                }
            }
            Err(ValidateError::DuplicateVote { .. }) => {
                self.stats.results_duplicate += 1;
                self.refresh(unit);
            }
            Err(_) => self.stats.results_closed += 1,
        }
    }

    /// A lease ends unanswered: its execution is a host failure.
    fn give_up(&mut self, id: LeaseId, active: Active) {
        self.forget_lease(id, active);
        let Some(state) = self.units.get_mut(active.unit as usize) else {
            return;
        };
        match state.tally.record(active.peer, Outcome::HostFailure) {
            Ok(Some(verdict)) => self.decide(active.unit, verdict),
            Ok(None) => self.refresh(active.unit),
            Err(_) => {}
        }
    }

    fn remember_expired(&mut self, id: LeaseId, active: Active) {
        if self.config.max_expired == 0 {
            return;
        }
        while self.expired_order.len() >= self.config.max_expired {
            if let Some(old) = self.expired_order.pop_front() {
                self.expired.remove(&old);
            }
        }
        self.expired.insert(id, (active.peer, active.unit));
        self.expired_order.push_back(id);
    }

    fn forget_lease(&mut self, id: LeaseId, active: Active) {
        self.leases.remove(&id);
        self.deadlines.remove(&(active.deadline, id));
        if let Some(peer) = self.peers.get_mut(&active.peer) {
            peer.leases.remove(&id);
        }
        if let Some(state) = self.units.get_mut(active.unit as usize) {
            state.active.retain(|l| *l != id);
        }
    }

    /// Files the unit under fresh, started or neither. A unit that becomes ready again other
    /// than by being leased calls for a look at every peer.
    fn refresh(&mut self, unit: u32) {
        let (wants, fresh) = self.units.get(unit as usize).map_or((false, false), |u| {
            (u.tally.wanted() > 0, u.tried.is_empty())
        });
        let was_ready = self.fresh.remove(&unit) | self.started.remove(&unit);
        if wants {
            if fresh {
                self.fresh.insert(unit);
            } else {
                self.started.insert(unit);
            }
            self.rescan |= !was_ready;
        }
    }

    fn decide(&mut self, unit: u32, verdict: Verdict) {
        self.fresh.remove(&unit);
        self.started.remove(&unit);
        if self.starved {
            self.starved = false;
            self.rescan = true;
        }
        let active = self
            .units
            .get_mut(unit as usize)
            .map(|u| std::mem::take(&mut u.active))
            .unwrap_or_default();
        let mut revoked: BTreeMap<PeerId, Vec<LeaseId>> = BTreeMap::new();
        for id in active {
            if let Some(lease) = self.leases.get(&id).copied() {
                self.forget_lease(id, lease);
                self.stats.leases_revoked += 1;
                revoked.entry(lease.peer).or_default().push(id);
            }
        }
        for (to, leases) in revoked {
            self.out.push_back(Command::Revoke {
                to,
                job: self.job,
                leases,
            });
        }
        if verdict.is_accepted() {
            self.accepted += 1;
        } else {
            self.failed += 1;
        }
        tracing::debug!(job = %self.job, unit, accepted = verdict.is_accepted(), "unit decided");
        self.out.push_back(Command::Decided { unit, verdict });
        self.check_finished();
    }

    fn check_finished(&mut self) {
        if !self.finished && self.accepted.saturating_add(self.failed) >= self.unit_count() {
            self.finished = true;
            self.out.push_back(Command::Finished {
                accepted: self.accepted,
                failed: self.failed,
            });
        }
    }

    fn cancel(&mut self) {
        for unit in 0..self.unit_count() {
            let verdict = self
                .units
                .get_mut(unit as usize)
                .and_then(|u| u.tally.abandon());
            if let Some(verdict) = verdict {
                self.decide(unit, verdict);
            }
        }
    }

    /// Hands ready units to peers with room, in a random peer order.
    fn dispatch(&mut self, now: Instant) {
        let pending = std::mem::take(&mut self.pending);
        let rescan = std::mem::take(&mut self.rescan);
        if self.fresh.is_empty() && self.started.is_empty() {
            return;
        }
        let has_room = |p: &PeerState| p.free > 0 && p.leases.len() < p.limit as usize;
        let mut candidates: Vec<PeerId> = if rescan {
            self.peers
                .iter()
                .filter(|(_, p)| has_room(p))
                .map(|(id, _)| *id)
                .collect()
        } else {
            pending
                .into_iter()
                .filter(|id| self.peers.get(id).is_some_and(has_room))
                .collect()
        };
        self.rng.shuffle(&mut candidates);
        for peer in candidates {
            if self.fresh.is_empty() && self.started.is_empty() {
                break;
            }
            let Some(state) = self.peers.get(&peer) else {
                continue;
            };
            let room = (state.free as usize)
                .min((state.limit as usize).saturating_sub(state.leases.len()))
                .min(self.config.max_batch);
            if room == 0 {
                continue;
            }
            let window = room.saturating_mul(self.config.spread.max(1));
            let mut units = self.draw(peer, room, window);
            if units.len() < room {
                if self.started.len() < self.config.max_backlog {
                    let fresh: Vec<u32> = self.fresh.iter().copied().take(window).collect();
                    let more = self.sample(fresh, room - units.len());
                    units.extend(more);
                } else if !self.fresh.is_empty() {
                    self.starved = true;
                }
            }
            units.sort_unstable();
            let mut leases = Vec::with_capacity(units.len());
            for unit in units {
                if let Some(lease) = self.issue(peer, unit, now) {
                    leases.push(lease);
                }
            }
            if !leases.is_empty() {
                self.out.push_back(Command::Offer {
                    to: peer,
                    job: self.job,
                    leases,
                });
            }
        }
    }

    /// Up to `room` started units `peer` has not run, drawn from the first `window` of them.
    fn draw(&mut self, peer: PeerId, room: usize, window: usize) -> Vec<u32> {
        let pool: Vec<u32> = self
            .started
            .iter()
            .copied()
            .filter(|u| {
                self.units
                    .get(*u as usize)
                    .is_some_and(|s| !s.tried.contains(&peer))
            })
            .take(window)
            .collect();
        self.sample(pool, room)
    }

    /// `k` random elements of `pool`.
    fn sample(&mut self, mut pool: Vec<u32>, k: usize) -> Vec<u32> {
        let take = k.min(pool.len());
        for i in 0..take {
            let j = i + self.rng.index(pool.len() - i);
            pool.swap(i, j);
        }
        pool.truncate(take);
        pool
    }

    fn issue(&mut self, peer: PeerId, unit: u32, now: Instant) -> Option<Lease> {
        let state = self.units.get_mut(unit as usize)?;
        state.tally.start().ok()?;
        let id = LeaseId(self.next_lease);
        self.next_lease += 1;
        state.tried.push(peer);
        state.active.push(id);
        state.issued += 1;
        let lease = Lease {
            id,
            unit,
            attempt: state.issued,
            deadline: later(now, self.config.lease_timeout),
        };
        self.leases.insert(
            id,
            Active {
                peer,
                unit,
                deadline: lease.deadline,
            },
        );
        self.deadlines.insert((lease.deadline, id));
        if let Some(p) = self.peers.get_mut(&peer) {
            p.free = p.free.saturating_sub(1);
            p.leases.insert(id);
        }
        self.stats.leases_issued += 1;
        // Leasing moves a unit from fresh to started; that needs no rescan.
        let rescan = self.rescan;
        self.refresh(unit);
        self.rescan = rescan;
        Some(lease)
    }
}

/// `now + after`, saturating far in the future instead of overflowing.
fn later(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(u64::from(u32::MAX))))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    fn job() -> Digest {
        Digest::of(b"job")
    }

    fn drain(s: &mut Scheduler) -> Vec<Command> {
        std::iter::from_fn(|| s.poll_command()).collect()
    }

    fn offers(cmds: &[Command]) -> BTreeMap<PeerId, Vec<Lease>> {
        let mut out: BTreeMap<PeerId, Vec<Lease>> = BTreeMap::new();
        for c in cmds {
            if let Command::Offer { to, leases, .. } = c {
                out.entry(*to).or_default().extend(leases.iter().copied());
            }
        }
        out
    }

    fn answer(s: &mut Scheduler, from: PeerId, leases: &[Lease], d: &[u8], now: Instant) {
        let results = leases
            .iter()
            .map(|l| LeaseResult {
                lease: l.id,
                outcome: Outcome::Output(Digest::of(d)),
            })
            .collect();
        s.handle(Event::Results { from, results }, now);
    }

    #[test]
    fn leases_are_batched_capped_and_distinct() {
        let now = Instant::now();
        let config = Config {
            max_leases_per_peer: 32,
            max_batch: 20,
            ..Config::default()
        };
        let mut s = Scheduler::new(job(), 100, Policy::new(2, 2, 4), config, 1);
        s.handle(
            Event::Available {
                peer: peer(1),
                slots: 50,
            },
            now,
        );
        let cmds = drain(&mut s);
        assert_eq!(cmds.len(), 1, "one offer per dispatch: {cmds:?}");
        let o = offers(&cmds);
        let leases = &o[&peer(1)];
        assert_eq!(leases.len(), 20);
        let units: BTreeSet<u32> = leases.iter().map(|l| l.unit).collect();
        assert_eq!(units.len(), 20);
        assert!(leases.iter().all(|l| l.attempt == 1));
        // The next request tops the peer up to its cap, never past it.
        s.handle(
            Event::Available {
                peer: peer(1),
                slots: 50,
            },
            now,
        );
        let more = offers(&drain(&mut s));
        assert_eq!(more[&peer(1)].len(), 12);
        assert_eq!(s.progress().running, 32);
    }

    #[test]
    fn a_unit_never_runs_twice_on_one_peer() {
        let now = Instant::now();
        let mut s = Scheduler::new(job(), 10, Policy::new(2, 2, 4), Config::default(), 2);
        let alone = peer(1);
        s.handle(
            Event::Available {
                peer: alone,
                slots: 100,
            },
            now,
        );
        let first = offers(&drain(&mut s)).remove(&alone).unwrap_or_default();
        assert_eq!(first.len(), 10);
        answer(&mut s, alone, &first, b"x", now);
        s.handle(
            Event::Available {
                peer: alone,
                slots: 100,
            },
            now,
        );
        assert!(offers(&drain(&mut s)).is_empty());
        s.handle(
            Event::Available {
                peer: peer(2),
                slots: 100,
            },
            now,
        );
        let second = offers(&drain(&mut s)).remove(&peer(2)).unwrap_or_default();
        assert_eq!(second.len(), 10);
        assert!(second.iter().all(|l| l.attempt == 2));
        answer(&mut s, peer(2), &second, b"x", now);
        let cmds = drain(&mut s);
        assert!(cmds.contains(&Command::Finished {
            accepted: 10,
            failed: 0
        }));
    }

    #[test]
    fn expired_lease_is_reissued_and_its_late_answer_still_votes() {
        let now = Instant::now();
        let config = Config::default();
        let timeout = config.lease_timeout;
        let mut s = Scheduler::new(job(), 1, Policy::new(2, 2, 4), config, 3);
        for n in [1, 2] {
            s.handle(
                Event::Available {
                    peer: peer(n),
                    slots: 1,
                },
                now,
            );
        }
        let o = offers(&drain(&mut s));
        assert_eq!(o.len(), 2);
        answer(&mut s, peer(2), &o[&peer(2)], b"x", now);
        assert_eq!(s.poll_timeout(), Some(now + timeout));
        s.handle(
            Event::Available {
                peer: peer(3),
                slots: 1,
            },
            now,
        );
        assert!(
            drain(&mut s).is_empty(),
            "nothing to do before the deadline"
        );
        let later = now + timeout;
        s.handle_timeout(later);
        let o3 = offers(&drain(&mut s));
        assert_eq!(o3[&peer(3)].len(), 1, "re-issued elsewhere");
        assert_eq!(s.stats().leases_expired, 1);
        // The slow peer answers after all: its vote completes the quorum and peer 3's lease
        // is revoked.
        answer(&mut s, peer(1), &o[&peer(1)], b"x", later);
        let cmds = drain(&mut s);
        assert!(cmds.iter().any(|c| matches!(
            c,
            Command::Decided { unit: 0, verdict: Verdict::Accepted { agreeing, .. } }
                if *agreeing == vec![peer(2), peer(1)]
        )));
        assert!(
            cmds.iter()
                .any(|c| matches!(c, Command::Revoke { to, .. } if *to == peer(3)))
        );
        assert_eq!(s.stats().results_late, 1);
        // Peer 3's answer for its revoked lease is ignored.
        answer(&mut s, peer(3), &o3[&peer(3)], b"x", later);
        assert_eq!(s.stats().results_unknown, 1);
        assert!(s.is_finished());
    }

    #[test]
    fn a_lost_peer_leases_go_elsewhere() {
        let now = Instant::now();
        let mut s = Scheduler::new(job(), 4, Policy::new(1, 1, 2), Config::default(), 4);
        s.handle(
            Event::Available {
                peer: peer(1),
                slots: 4,
            },
            now,
        );
        assert_eq!(offers(&drain(&mut s))[&peer(1)].len(), 4);
        s.handle(
            Event::Available {
                peer: peer(2),
                slots: 4,
            },
            now,
        );
        assert!(drain(&mut s).is_empty());
        s.handle(Event::PeerGone { peer: peer(1) }, now);
        let o = offers(&drain(&mut s));
        assert_eq!(o[&peer(2)].len(), 4);
        assert_eq!(s.stats().leases_lost, 4);
    }

    #[test]
    fn junk_answers_are_ignored_and_counted() {
        let now = Instant::now();
        let mut s = Scheduler::new(job(), 2, Policy::new(2, 2, 4), Config::default(), 5);
        s.handle(
            Event::Available {
                peer: peer(1),
                slots: 2,
            },
            now,
        );
        let mine = offers(&drain(&mut s)).remove(&peer(1)).unwrap_or_default();
        let result = |lease| LeaseResult {
            lease,
            outcome: Outcome::Output(Digest::of(b"x")),
        };
        // A stranger answers peer 1's lease, and a lease nobody issued.
        s.handle(
            Event::Results {
                from: peer(9),
                results: vec![result(mine[0].id), result(LeaseId(1_000))],
            },
            now,
        );
        // Peer 1 answers twice.
        s.handle(
            Event::Results {
                from: peer(1),
                results: vec![result(mine[0].id), result(mine[0].id)],
            },
            now,
        );
        s.handle(
            Event::Declined {
                from: peer(9),
                leases: vec![mine[1].id, LeaseId(7)],
            },
            now,
        );
        let st = s.stats();
        assert_eq!(st.results_wrong_peer, 2);
        // The unissued lease, peer 1's second answer (its lease is spent) and the unissued
        // decline.
        assert_eq!(st.results_unknown, 3);
        assert_eq!(st.results_counted, 1);
        assert_eq!(s.progress().running, 1);
        assert!(s.unit(99).is_none());
    }

    #[test]
    fn declined_leases_may_return_to_the_same_peer() {
        let now = Instant::now();
        let mut s = Scheduler::new(job(), 1, Policy::new(1, 1, 1), Config::default(), 6);
        s.handle(
            Event::Available {
                peer: peer(1),
                slots: 1,
            },
            now,
        );
        let l = offers(&drain(&mut s)).remove(&peer(1)).unwrap_or_default();
        s.handle(
            Event::Declined {
                from: peer(1),
                leases: vec![l[0].id],
            },
            now,
        );
        assert!(drain(&mut s).is_empty());
        s.handle(
            Event::Available {
                peer: peer(1),
                slots: 1,
            },
            now,
        );
        let again = offers(&drain(&mut s)).remove(&peer(1)).unwrap_or_default();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempt, 1);
    }

    #[test]
    fn cancel_fails_every_open_unit_and_finishes() {
        let now = Instant::now();
        let mut s = Scheduler::new(job(), 3, Policy::new(1, 1, 1), Config::default(), 7);
        s.restore(
            1,
            Verdict::Accepted {
                digest: Digest::of(b"x"),
                agreeing: vec![peer(1)],
                dissenters: Vec::new(),
                host_failed: Vec::new(),
            },
        )
        .expect("unit 1 is open");
        assert!(
            s.restore(
                1,
                Verdict::Failed {
                    reason: crate::validate::FailReason::Abandoned,
                    evidence: Vec::new(),
                    host_failed: Vec::new(),
                }
            )
            .is_err()
        );
        s.handle(Event::Cancel, now);
        let cmds = drain(&mut s);
        assert_eq!(
            cmds.iter()
                .filter(|c| matches!(c, Command::Decided { .. }))
                .count(),
            2
        );
        assert_eq!(
            cmds.last(),
            Some(&Command::Finished {
                accepted: 1,
                failed: 2
            })
        );
        let empty = Scheduler::new(job(), 0, Policy::default(), Config::default(), 8);
        assert!(empty.is_finished());
    }

    #[test]
    fn a_lone_peer_does_not_start_more_than_the_backlog() {
        let now = Instant::now();
        let config = Config {
            max_backlog: 40,
            max_leases_per_peer: 1000,
            max_batch: 1000,
            ..Config::default()
        };
        let mut s = Scheduler::new(job(), 5000, Policy::new(2, 2, 4), config, 9);
        let mut started = 0;
        for _ in 0..20 {
            s.handle(
                Event::Available {
                    peer: peer(1),
                    slots: 30,
                },
                now,
            );
            let leases = offers(&drain(&mut s)).remove(&peer(1)).unwrap_or_default();
            started += leases.len();
            answer(&mut s, peer(1), &leases, b"x", now);
        }
        // Two rounds of 30 went out; after that 60 started units wait for a second peer.
        assert_eq!(started, 60);
        // A second peer finishes them, and the first gets fresh units again.
        s.handle(
            Event::Available {
                peer: peer(2),
                slots: 100,
            },
            now,
        );
        let second = offers(&drain(&mut s)).remove(&peer(2)).unwrap_or_default();
        assert_eq!(second.len(), 60);
        assert!(second.iter().all(|l| l.attempt == 2));
        answer(&mut s, peer(2), &second, b"x", now);
        assert_eq!(s.progress().accepted, 60);
        // Peer 1 still had room from its last request, so it gets fresh units without asking.
        let fresh = offers(&drain(&mut s));
        assert_eq!(fresh[&peer(1)].len(), 30);
        assert!(fresh[&peer(1)].iter().all(|l| l.attempt == 1));
    }

    /// The scheduler and three intakes with units that take no time: what the core costs per
    /// unit, without any IO.
    #[test]
    fn ten_thousand_tiny_units_over_three_peers() {
        let start = std::time::Instant::now();
        let now = Instant::now();
        let units = 10_000;
        let mut s = Scheduler::new(job(), units, Policy::new(2, 2, 4), Config::default(), 10);
        let peers = [peer(1), peer(2), peer(3)];
        let mut intakes: Vec<Intake> = peers
            .iter()
            .map(|_| {
                Intake::new(IntakeConfig {
                    slots: 2,
                    prefetch: 64,
                    flush_delay: Duration::ZERO,
                    result_batch: 32,
                    ..IntakeConfig::default()
                })
            })
            .collect();
        for (i, p) in peers.iter().enumerate() {
            s.handle(
                Event::Available {
                    peer: *p,
                    slots: intakes[i].want(&peer(0)),
                },
                now,
            );
        }
        let submitter = peer(0);
        let mut rounds = 0;
        while !s.is_finished() && rounds < 100_000 {
            rounds += 1;
            let mut idle = true;
            while let Some(c) = s.poll_command() {
                idle = false;
                let (to, event) = match c {
                    Command::Offer { to, job, leases } => (
                        to,
                        IntakeEvent::Offer {
                            from: submitter,
                            job,
                            leases,
                        },
                    ),
                    Command::Revoke { to, job, leases } => (
                        to,
                        IntakeEvent::Revoke {
                            from: submitter,
                            job,
                            leases,
                        },
                    ),
                    _ => continue,
                };
                if let Some(i) = peers.iter().position(|p| *p == to) {
                    intakes[i].handle(event, now);
                }
            }
            for (i, intake) in intakes.iter_mut().enumerate() {
                while let Some(c) = intake.poll_command() {
                    idle = false;
                    match c {
                        IntakeCommand::Run(task) => intake.handle(
                            IntakeEvent::Done {
                                submitter,
                                job: task.job,
                                lease: task.lease.id,
                                outcome: Outcome::Output(Digest::of(
                                    &task.lease.unit.to_le_bytes(),
                                )),
                            },
                            now,
                        ),
                        IntakeCommand::Report { results, want, .. } => {
                            s.handle(
                                Event::Results {
                                    from: peers[i],
                                    results,
                                },
                                now,
                            );
                            s.handle(
                                Event::Available {
                                    peer: peers[i],
                                    slots: want,
                                },
                                now,
                            );
                        }
                        _ => {}
                    }
                }
            }
            assert!(!idle || s.is_finished(), "stalled: {s:?}");
        }
        let elapsed = start.elapsed();
        let p = s.progress();
        assert_eq!(p.accepted, units);
        assert_eq!(s.stats().leases_issued, u64::from(units) * 2);
        println!(
            "scheduler core: {units} units x 2 replicas over 3 peers in {:.0} ms ({:.0} units/s, \
             {} dispatch rounds)",
            elapsed.as_secs_f64() * 1e3,
            f64::from(units) / elapsed.as_secs_f64(),
            rounds
        );
    }

    /// Random events from a handful of peers, honest or not, in any order: nothing panics, no
    /// unit goes twice to one peer, caps hold, and the job's books balance.
    #[test]
    fn random_inputs_never_panic_and_keep_the_books() {
        for seed in 0..40u64 {
            let mut rng = Rng::seed_from_u64(seed);
            let start = Instant::now();
            let mut now = start;
            let config = Config {
                lease_timeout: Duration::from_secs(5),
                max_leases_per_peer: 4,
                max_batch: 3,
                ..Config::default()
            };
            let units = 1 + rng.below(30) as u32;
            let policy = Policy::new(1 + rng.below(3) as u32, 1 + rng.below(3) as u32, 6);
            let mut s = Scheduler::new(job(), units, policy, config, seed);
            let mut given: BTreeSet<(PeerId, u32)> = BTreeSet::new();
            let mut held: Vec<(PeerId, Lease)> = Vec::new();
            let mut decided = BTreeSet::new();
            for _ in 0..400 {
                let p = peer(1 + rng.below(6) as u8);
                let event = match rng.below(8) {
                    0 | 1 => Event::Available {
                        peer: p,
                        slots: rng.below(6) as u32,
                    },
                    2 => Event::PeerGone { peer: p },
                    3 => Event::Declined {
                        from: p,
                        leases: vec![LeaseId(rng.below(200))],
                    },
                    4 if !held.is_empty() => {
                        // Someone answers a lease, maybe not its holder, maybe twice.
                        let (holder, lease) = held[rng.index(held.len())];
                        let from = if rng.chance(0.8) { holder } else { p };
                        let outcome = match rng.below(4) {
                            0 => Outcome::HostFailure,
                            1 => Outcome::Output(Digest::of(b"wrong")),
                            _ => Outcome::Output(Digest::of(b"right")),
                        };
                        Event::Results {
                            from,
                            results: vec![LeaseResult {
                                lease: lease.id,
                                outcome,
                            }],
                        }
                    }
                    5 => Event::Results {
                        from: p,
                        results: vec![LeaseResult {
                            lease: LeaseId(rng.below(200)),
                            outcome: Outcome::Output(Digest::of(b"junk")),
                        }],
                    },
                    _ => {
                        now += Duration::from_millis(rng.below(3000));
                        s.handle_timeout(now);
                        continue;
                    }
                };
                if let Event::Declined { from, leases } = &event {
                    for id in leases {
                        if let Some((_, l)) = held.iter().find(|(h, l)| h == from && l.id == *id) {
                            given.remove(&(*from, l.unit));
                        }
                    }
                }
                s.handle(event, now);
                while let Some(c) = s.poll_command() {
                    match c {
                        Command::Offer { to, leases, .. } => {
                            assert!(leases.len() <= 3);
                            for l in leases {
                                assert!(l.unit < units);
                                assert!(given.insert((to, l.unit)), "seed {seed}: twice");
                                held.push((to, l));
                            }
                        }
                        Command::Decided { unit, .. } => assert!(decided.insert(unit)),
                        Command::Finished { accepted, failed } => {
                            assert_eq!(accepted + failed, units);
                        }
                        Command::Revoke { .. } => {}
                    }
                }
                for state in s.peers.values() {
                    assert!(state.leases.len() <= 4, "seed {seed}");
                }
                let p = s.progress();
                assert_eq!(p.accepted + p.failed, decided.len() as u32);
                assert_eq!(s.is_finished(), decided.len() as u32 == units);
            }
        }
    }
}
