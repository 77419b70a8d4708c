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
//! * a unit never runs twice on one peer, counting every peer that ever held a lease on it,
//!   answered or not, and never on two peers of one [`Host`] (BOINC's
//!   `one_result_per_host_per_wu`) — the host a peer is on is the one its connection comes
//!   from, as the driver observed it. A host whose execution ended in a host failure may take
//!   the unit again on another peer, since that execution never voted;
//! * a host holds at most `max_leases_per_host` leases whatever number of keys it has;
//! * a peer holds at most `max_leases_per_peer` leases, and one offer carries at most
//!   `max_batch`, so tiny units share a round trip without one peer hoarding the job; a peer
//!   that lets a lease expire has its own limit halved, and earns it back one answer at a
//!   time, so slow or flaky peers stop soaking up units they will not finish in time;
//! * a lease unanswered at its deadline, answered with a host failure, or held by a peer that
//!   left, counts as a host failure and its unit is offered elsewhere; an answer that comes
//!   after the deadline still votes while the unit is open and is dropped otherwise;
//! * failures are charged to whoever caused them: each halves the lease limit of the peer and
//!   of its host, and `backoff_after` failures in a row with no answer between them give the
//!   peer, and the host, no leases at all for `backoff` (doubling with each further round, up
//!   to `max_backoff`), so a host of fresh keys that takes leases only to fail them soon gets
//!   nothing; [`Scheduler::penalties`] names them;
//! * units already started (waiting for further replicas or a retry) go out before fresh
//!   ones, and fresh units stop going out while `max_backlog` started units wait, so a peer
//!   that cannot take the waiting units (it ran them already) does not start ever more units
//!   nobody can finish;
//! * each peer is given fresh units drawn at random from a window at the front of the queue,
//!   so peers that ask at the same moment (or pick their ids to sort together) do not receive
//!   the same units; further replicas are drawn at random among *all* started units whose
//!   executions so far sit on other hosts, and only from a pool several times larger than the
//!   peer takes while fresh units remain, so a requester that asks right after a colluder
//!   cannot steer the colluder's units to itself;
//! * a dispatch round considers only the peers that reported room since the last one, unless
//!   units became ready again, so its cost does not grow with every idle peer;
//! * every answer that matches no lease of its sender is dropped and counted in [`Stats`].
//!
//! The submitter runs units for its own job like any other peer: it sends `Available` for
//! itself and carries out offers addressed to itself locally.

mod adaptive;
mod intake;
#[cfg(test)]
mod sim;
mod units;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use adaptive::{TrustStats, Validation};
pub use intake::{Intake, IntakeCommand, IntakeConfig, IntakeEvent, IntakeStats, Task};

use crate::digest::Digest;
use crate::host::{Host, Placement};
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
    /// Whether replicas go to distinct hosts or only to distinct peers. Default by host.
    pub placement: Placement,
    /// Most leases all the peers of one host hold at once. Default 64.
    pub max_leases_per_host: u32,
    /// Failures in a row (host failures, expiries, a lost link) after which a peer or a host
    /// gets no leases for a while; 0 never backs off. Default 3.
    pub backoff_after: u32,
    /// The first back-off; each further one in a row doubles it. Default 30 s.
    pub backoff: Duration,
    /// The longest back-off. Default 10 min.
    pub max_backoff: Duration,
    /// While fresh units remain, draw further replicas only from a pool several times what
    /// the peer takes, so colluders asking in turn cannot count on each other's units.
    /// Default on; off for a machine's own execution slots, where nobody colludes.
    pub mix_replicas: bool,
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
            placement: Placement::Host,
            max_leases_per_host: 64,
            backoff_after: 3,
            backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(600),
            mix_replicas: true,
        }
    }
}

/// What the driver tells the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `peer` will take up to `slots` more leases of this job now (its advert or its request
    /// for work). Replaces what it said before. `host` is where the connection that carries
    /// its leases comes from; a peer seen from another host from now on is placed there.
    Available {
        peer: PeerId,
        slots: u32,
        host: Host,
    },
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
    /// [`Reputation`](crate::validate::Reputation). A unit accepted on a trusted peer's word
    /// and run again after that peer was caught is decided a second time; the later verdict
    /// replaces the earlier.
    Decided {
        unit: u32,
        verdict: Verdict,
        validation: Validation,
    },
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
    /// Back-offs imposed on peers and on hosts.
    pub backoffs: u64,
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
    /// Distinct hosts among the peers that reported room.
    pub hosts: u32,
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

/// One lease of a unit, past or present.
#[derive(Debug, Clone, Copy)]
struct Try {
    peer: PeerId,
    host: Host,
    /// It ended in a host failure: the host may take the unit again on another peer.
    failed: bool,
}

#[derive(Debug, Clone)]
struct UnitState {
    tally: Tally,
    /// How it is being validated (adaptive replication).
    mode: adaptive::Mode,
    /// Every lease ever issued on this unit, with its peer and host.
    tried: Vec<Try>,
    /// Leases out now.
    active: Vec<LeaseId>,
    issued: u32,
}

#[derive(Debug, Clone, Copy)]
struct Active {
    peer: PeerId,
    host: Host,
    unit: u32,
    deadline: Instant,
}

/// How a peer or a host has been doing: its lease limit, lowered by failures, and its
/// back-off.
#[derive(Debug, Clone, Copy)]
struct Record {
    limit: u32,
    /// Failures since the last answer.
    failures_in_row: u32,
    /// Back-offs in a row (each doubles the next).
    rounds: u32,
    /// No leases before this.
    backoff_until: Option<Instant>,
    /// Failures charged in all, and back-offs imposed, for the summary.
    failures: u64,
    backoffs: u64,
}

impl Record {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            failures_in_row: 0,
            rounds: 0,
            backoff_until: None,
            failures: 0,
            backoffs: 0,
        }
    }

    fn backed_off(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|t| t > now)
    }

    fn succeeded(&mut self, max: u32) {
        self.limit = (self.limit + 1).min(max);
        self.failures_in_row = 0;
        self.rounds = 0;
    }

    /// Charges one failure; returns the end of a back-off it starts.
    fn failed(&mut self, config: &Config, now: Instant) -> Option<Instant> {
        self.limit = (self.limit / 2).max(1);
        self.failures += 1;
        if self.backed_off(now) {
            // Failures of leases it took before its back-off: one round is enough.
            return None;
        }
        self.failures_in_row += 1;
        if config.backoff_after == 0 || self.failures_in_row < config.backoff_after {
            return None;
        }
        self.failures_in_row = 0;
        let factor = 1u32.checked_shl(self.rounds.min(16)).unwrap_or(u32::MAX);
        let length = config
            .backoff
            .saturating_mul(factor)
            .min(config.max_backoff);
        self.rounds = self.rounds.saturating_add(1);
        self.backoffs += 1;
        let until = later(now, length);
        self.backoff_until = Some(until);
        Some(until)
    }
}

#[derive(Debug, Clone)]
struct PeerState {
    free: u32,
    host: Host,
    record: Record,
    leases: BTreeSet<LeaseId>,
}

#[derive(Debug, Clone)]
struct HostState {
    record: Record,
    leases: u32,
    /// Peers placed on this host now.
    peers: u32,
}

/// A peer or a host that failed leases, for the job's summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Penalty {
    /// Failures charged: host failures, expired leases, leases lost with a link.
    pub failures: u64,
    /// Times it was given no leases for a while.
    pub backoffs: u64,
    /// Whether it is backed off now.
    pub backed_off: bool,
}

/// Who is charged with failures: a peer, or a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Culprit {
    Peer(PeerId),
    Host(Host),
}

/// The scheduler of one job on its submitting peer.
pub struct Scheduler {
    config: Config,
    job: Digest,
    /// The job's policy, for units that run replicated again after running alone.
    policy: Policy,
    /// The submitter's trust table, when the job may run units alone on trusted peers.
    trust: Option<crate::validate::trust::Trust>,
    trust_stats: TrustStats,
    /// Units whose remaining votes closed them when they were reopened, to decide next.
    settled: Vec<(u32, Verdict)>,
    rng: Rng,
    units: units::UnitTable,
    /// Open units never leased, in unit order.
    fresh: units::FreshSet,
    /// Units accepted on a trusted peer's word, by that peer's host, for a catch to run again.
    trusted_alone: BTreeMap<Host, Vec<u32>>,
    /// The latest results accepted alone on a trusted peer's word, for a catch to look back
    /// at (at most the trust table's `look_back_span`, 120 bytes each).
    recent_alone: VecDeque<adaptive::Recent>,
    /// Units a catch sent to spot checks, not yet among the started ones (see
    /// [`Scheduler::release_checks`]).
    checks_waiting: VecDeque<u32>,
    /// A host came or went since spot checks' checkers were last looked at.
    hosts_changed: bool,
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
    expired: BTreeMap<LeaseId, (PeerId, Host, u32)>,
    expired_order: VecDeque<LeaseId>,
    peers: BTreeMap<PeerId, PeerState>,
    hosts: BTreeMap<Host, HostState>,
    /// Penalties of peers that left, kept for the summary.
    gone: BTreeMap<PeerId, Record>,
    /// The earliest end of a back-off, when dispatch must look at every peer again.
    next_release: Option<Instant>,
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
            policy,
            trust: None,
            trust_stats: TrustStats::default(),
            settled: Vec::new(),
            units: units::UnitTable::new(
                units,
                UnitState {
                    tally,
                    mode: adaptive::Mode::default(),
                    tried: Vec::new(),
                    active: Vec::new(),
                    issued: 0,
                },
            ),
            fresh: units::FreshSet::full(units),
            trusted_alone: BTreeMap::new(),
            recent_alone: VecDeque::new(),
            checks_waiting: VecDeque::new(),
            hosts_changed: false,
            started: BTreeSet::new(),
            pending: BTreeSet::new(),
            rescan: false,
            starved: false,
            leases: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            expired: BTreeMap::new(),
            expired_order: VecDeque::new(),
            peers: BTreeMap::new(),
            hosts: BTreeMap::new(),
            gone: BTreeMap::new(),
            next_release: None,
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

    /// Restores a decided unit from the journal before the job resumes. Returns whether it
    /// was restored: a verdict that is not [final](Verdict::is_final) leaves the unit open, to
    /// run again.
    pub fn restore(&mut self, unit: u32, verdict: Verdict) -> Result<bool, ScheduleError> {
        let units = self.unit_count();
        if unit >= units {
            return Err(ScheduleError::NoSuchUnit { unit, units });
        }
        if !self.units.get(unit).is_some_and(|s| s.tally.is_open()) {
            return Err(ScheduleError::Validate {
                unit,
                source: ValidateError::Closed,
            });
        }
        if !verdict.is_final() {
            return Ok(false);
        }
        if verdict.is_accepted() {
            self.accepted += 1;
        } else {
            self.failed += 1;
        }
        // A final verdict: the unit is closed without replaying its votes.
        self.units.close(unit);
        self.fresh.remove(unit);
        self.started.remove(&unit);
        self.check_finished();
        Ok(true)
    }

    /// [`Self::restore`] for a unit journaled with how it was validated. A result accepted on
    /// the word of a peer caught since (in this job or another, as the trust table knows) is
    /// not restored: the unit runs again, never on that peer's host.
    pub fn restore_with(
        &mut self,
        unit: u32,
        verdict: Verdict,
        validation: Validation,
    ) -> Result<bool, ScheduleError> {
        if verdict.is_accepted()
            && let Some((peer, host)) = self.suspect(&validation)
        {
            let units = self.unit_count();
            if unit >= units {
                return Err(ScheduleError::NoSuchUnit { unit, units });
            }
            self.revalidate_restored(unit, peer, host);
            return Ok(false);
        }
        let restored = self.restore(unit, verdict)?;
        if restored {
            self.restore_mode(unit, &validation);
        }
        Ok(restored)
    }

    pub fn job(&self) -> Digest {
        self.job
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn unit_count(&self) -> u32 {
        self.units.count()
    }

    /// Units holding a record now: those leased, or reopened, and not decided since. Never
    /// leased units and decided ones hold none, so this is what the job's memory grows with.
    pub fn units_held(&self) -> usize {
        self.units.live_count()
    }

    /// The tally of one unit.
    pub fn unit(&self, unit: u32) -> Option<&Tally> {
        self.units.get(unit).map(|u| &u.tally)
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
                .filter(|(holder, _, _)| holder == peer)
                .map(|(_, _, unit)| *unit),
        }
    }

    /// The host `peer` is placed on now.
    pub fn host_of(&self, peer: &PeerId) -> Option<Host> {
        self.peers.get(peer).map(|p| p.host)
    }

    /// Every peer and host charged with failures in this run, with its penalty.
    pub fn penalties(&self, now: Instant) -> Vec<(Culprit, Penalty)> {
        let penalty = |r: &Record| Penalty {
            failures: r.failures,
            backoffs: r.backoffs,
            backed_off: r.backed_off(now),
        };
        let peers = self
            .peers
            .iter()
            .map(|(id, p)| (*id, &p.record))
            .chain(self.gone.iter().map(|(id, r)| (*id, r)))
            .filter(|(_, r)| r.failures > 0)
            .map(|(id, r)| (Culprit::Peer(id), penalty(r)));
        let hosts = self
            .hosts
            .iter()
            .filter(|(_, h)| h.record.failures > 0)
            .map(|(host, h)| (Culprit::Host(*host), penalty(&h.record)));
        let mut all: Vec<(Culprit, Penalty)> = peers.chain(hosts).collect();
        all.sort_by_key(|(c, _)| *c);
        all.dedup_by_key(|(c, _)| *c);
        all
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
            hosts: u32::try_from(self.hosts.len()).unwrap_or(u32::MAX),
        }
    }

    /// The next instant at which [`Self::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deadline = self.deadlines.first().map(|(at, _)| *at);
        match (deadline, self.next_release) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
            self.charge(active.peer, active.host, now);
            self.give_up(id, active);
            self.remember_expired(id, active);
        }
        if self.next_release.is_some_and(|at| at <= now) {
            self.release(now);
        }
        self.dispatch(now);
    }

    /// Back-offs that ended: every peer with room is worth a look again.
    fn release(&mut self, now: Instant) {
        self.rescan = true;
        let ends = self
            .peers
            .values()
            .map(|p| &p.record)
            .chain(self.hosts.values().map(|h| &h.record))
            .filter_map(|r| r.backoff_until)
            .filter(|t| *t > now);
        self.next_release = ends.min();
    }

    /// Charges a failure to `peer` and to `host`.
    fn charge(&mut self, peer: PeerId, host: Host, now: Instant) {
        let mut ends = Vec::new();
        if let Some(p) = self.peers.get_mut(&peer) {
            ends.extend(p.record.failed(&self.config, now));
        }
        if let Some(h) = self.hosts.get_mut(&host) {
            ends.extend(h.record.failed(&self.config, now));
        }
        for until in ends {
            self.stats.backoffs += 1;
            tracing::debug!(job = %self.job, %peer, %host, "backing off after failures");
            self.next_release = Some(self.next_release.map_or(until, |t| t.min(until)));
        }
    }

    /// A peer left `host`: a host with no peer, no lease and nothing charged is forgotten, so
    /// the table and the count of hosts follow the peers that are here.
    fn leave_host(&mut self, host: Host) {
        if let Some(h) = self.hosts.get_mut(&host) {
            h.peers = h.peers.saturating_sub(1);
            self.hosts_changed |= h.peers == 0;
            if h.peers == 0 && h.leases == 0 && h.record.failures == 0 {
                self.hosts.remove(&host);
            }
        }
    }

    /// Places `peer` on `host`, moving it if it was seen elsewhere.
    fn place(&mut self, peer: PeerId, host: Host) {
        let limit = self.config.max_leases_per_host;
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let old = std::mem::replace(&mut state.host, host);
        if old == host && self.hosts.contains_key(&host) {
            return;
        }
        if old != host {
            self.leave_host(old);
        }
        let state = self.hosts.entry(host).or_insert_with(|| HostState {
            record: Record::new(limit),
            leases: 0,
            peers: 0,
        });
        self.hosts_changed |= state.peers == 0;
        state.peers += 1;
    }

    pub fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Available { peer, slots, host } => {
                let host = self.config.placement.witness(peer, host);
                if !self.peers.contains_key(&peer) && self.peers.len() >= self.config.max_peers {
                    self.stats.peers_refused += 1;
                } else {
                    // A peer that left and came back keeps the record it left with.
                    let record = self.gone.remove(&peer);
                    let limit = self.config.max_leases_per_peer;
                    let state = self.peers.entry(peer).or_insert_with(|| PeerState {
                        free: 0,
                        host,
                        record: record.unwrap_or_else(|| Record::new(limit)),
                        leases: BTreeSet::new(),
                    });
                    state.free = slots;
                    self.place(peer, host);
                    self.pending.insert(peer);
                }
            }
            Event::PeerGone { peer } => {
                if let Some(state) = self.peers.get(&peer) {
                    let (host, leases) = (state.host, state.leases.clone());
                    // Leaving with leases is one failure of the peer and its host, whatever
                    // their number; each lease is a host failure of its unit.
                    if !leases.is_empty() {
                        self.charge(peer, host, now);
                    }
                    for id in leases {
                        if let Some(active) = self.leases.get(&id).copied() {
                            self.stats.leases_lost += 1;
                            self.give_up(id, active);
                            self.remember_expired(id, active);
                        }
                    }
                }
                if let Some(state) = self.peers.remove(&peer) {
                    self.leave_host(state.host);
                    if state.record.failures > 0 && self.gone.len() < self.config.max_peers {
                        self.gone.insert(peer, state.record);
                    }
                }
            }
            Event::Results { from, results } => {
                for result in results {
                    self.on_result(from, result, now);
                }
            }
            Event::Declined { from, leases } => {
                for id in leases {
                    match self.leases.get(&id).copied() {
                        Some(active) if active.peer == from => {
                            self.stats.leases_declined += 1;
                            self.forget_lease(id, active);
                            let unit = active.unit;
                            if let Some(state) = self.units.get_mut(unit) {
                                // Never run there: the peer may take the unit again later, and
                                // the execution is taken back rather than counted as failed.
                                state.tried.retain(|t| t.peer != from);
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

    fn on_result(&mut self, from: PeerId, result: LeaseResult, now: Instant) {
        if let Some(active) = self.leases.get(&result.lease).copied() {
            if active.peer != from {
                self.stats.results_wrong_peer += 1;
                return;
            }
            self.forget_lease(result.lease, active);
            match result.outcome {
                Outcome::Output(_) => {
                    let (peer_max, host_max) = (
                        self.config.max_leases_per_peer,
                        self.config.max_leases_per_host,
                    );
                    if let Some(p) = self.peers.get_mut(&from) {
                        p.record.succeeded(peer_max);
                    }
                    if let Some(h) = self.hosts.get_mut(&active.host) {
                        h.record.succeeded(host_max);
                    }
                }
                Outcome::HostFailure => {
                    self.charge(from, active.host, now);
                    self.mark_failed(active.unit, from);
                }
            }
            if self.peers.contains_key(&from) {
                self.pending.insert(from);
            }
            let Some(state) = self.units.get_mut(active.unit) else {
                return;
            };
            let recorded = state.tally.record(from, active.host, result.outcome);
            self.after_record(active.unit, recorded, false);
        } else if let Some(&(peer, host, unit)) = self.expired.get(&result.lease) {
            if peer != from {
                self.stats.results_wrong_peer += 1;
                return;
            }
            // One late answer per lease; a late host failure was already counted at expiry.
            self.expired.remove(&result.lease);
            if result.outcome == Outcome::HostFailure {
                return;
            }
            let Some(state) = self.units.get_mut(unit) else {
                self.stats.results_closed += 1;
                return;
            };
            let recorded = state.tally.record_late(from, host, result.outcome);
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

    /// The execution of `unit` on `peer` ended in a host failure: its host may run the unit
    /// again on another peer.
    fn mark_failed(&mut self, unit: u32, peer: PeerId) {
        if let Some(state) = self.units.get_mut(unit) {
            for t in state.tried.iter_mut().filter(|t| t.peer == peer) {
                t.failed = true;
            }
        }
    }

    /// A lease ends unanswered: its execution is a host failure.
    fn give_up(&mut self, id: LeaseId, active: Active) {
        self.forget_lease(id, active);
        self.mark_failed(active.unit, active.peer);
        let Some(state) = self.units.get_mut(active.unit) else {
            return;
        };
        match state
            .tally
            .record(active.peer, active.host, Outcome::HostFailure)
        {
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
        self.expired
            .insert(id, (active.peer, active.host, active.unit));
        self.expired_order.push_back(id);
    }

    fn forget_lease(&mut self, id: LeaseId, active: Active) {
        self.leases.remove(&id);
        self.deadlines.remove(&(active.deadline, id));
        if let Some(peer) = self.peers.get_mut(&active.peer) {
            peer.leases.remove(&id);
        }
        if let Some(host) = self.hosts.get_mut(&active.host) {
            host.leases = host.leases.saturating_sub(1);
        }
        if let Some(state) = self.units.get_mut(active.unit) {
            state.active.retain(|l| *l != id);
        }
    }

    /// Files the unit under fresh, started or neither. A unit that becomes ready again other
    /// than by being leased calls for a look at every peer.
    fn refresh(&mut self, unit: u32) {
        self.settle_alone(unit);
        let (wants, fresh) = self.units.get(unit).map_or((false, false), |u| {
            (u.tally.wanted() > 0, u.tried.is_empty())
        });
        let was_ready = self.fresh.remove(unit) | self.started.remove(&unit);
        if wants {
            if fresh {
                self.fresh.insert(unit);
            } else {
                self.started.insert(unit);
                // A spot check that wants another host: its checker, if it ran it or left,
                // is drawn anew now.
                self.redraw_checker(unit);
            }
            self.rescan |= !was_ready;
        }
    }

    fn decide(&mut self, unit: u32, verdict: Verdict) {
        self.decide_one(unit, verdict);
        while let Some((unit, verdict)) = self.settled.pop() {
            self.decide_one(unit, verdict);
        }
    }

    fn decide_one(&mut self, unit: u32, verdict: Verdict) {
        let Some(validation) = self.judge(unit, &verdict) else {
            // Not decided after all: a spot check, or a re-run, is wanted first.
            return;
        };
        self.fresh.remove(unit);
        self.started.remove(&unit);
        if self.starved {
            self.starved = false;
            self.rescan = true;
        }
        let active = self
            .units
            .get_mut(unit)
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
        // Its state goes: a result accepted on one trusted peer's word is remembered by that
        // peer's host, which is all a catch needs to run it again.
        if let Some(adaptive::Mode::Trusted { host, .. }) = self.units.get(unit).map(|s| s.mode) {
            self.trusted_alone.entry(host).or_default().push(unit);
        }
        self.units.close(unit);
        self.out.push_back(Command::Decided {
            unit,
            verdict,
            validation,
        });
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
            // A unit never leased is abandoned from the blank state, without making it a record.
            let verdict = self.units.get(unit).and_then(|u| u.tally.clone().abandon());
            if let Some(verdict) = verdict {
                self.decide(unit, verdict);
            }
        }
    }

    /// How many more leases `peer` may take now: what it has room for, within its own limit
    /// and its host's, and none while either is backed off.
    fn room(&self, peer: &PeerId, now: Instant) -> usize {
        let Some(p) = self.peers.get(peer) else {
            return 0;
        };
        let Some(h) = self.hosts.get(&p.host) else {
            return 0;
        };
        if p.record.backed_off(now) || h.record.backed_off(now) {
            return 0;
        }
        let own = (p.record.limit as usize).saturating_sub(p.leases.len());
        let host = h.record.limit.saturating_sub(h.leases) as usize;
        (p.free as usize).min(own).min(host)
    }

    /// Hands ready units to peers with room, in a random peer order.
    fn dispatch(&mut self, now: Instant) {
        self.release_checks();
        let pending = std::mem::take(&mut self.pending);
        let rescan = std::mem::take(&mut self.rescan);
        if self.fresh.is_empty() && self.started.is_empty() {
            return;
        }
        let mut candidates: Vec<PeerId> = if rescan {
            self.peers.keys().copied().collect()
        } else {
            pending.into_iter().collect()
        };
        candidates.retain(|id| self.room(id, now) > 0);
        if self.trust.is_some() {
            self.redraw_checkers();
        }
        self.rng.shuffle(&mut candidates);
        for peer in candidates {
            if self.fresh.is_empty() && self.started.is_empty() {
                break;
            }
            let room = self.room(&peer, now).min(self.config.max_batch);
            let Some(host) = self.peers.get(&peer).map(|p| p.host) else {
                continue;
            };
            if room == 0 {
                continue;
            }
            let window = room.saturating_mul(self.config.spread.max(1));
            let may_start = self.started.len() < self.config.max_backlog;
            // While fresh units remain, further replicas come only from a pool several times
            // larger than the peer takes, so whoever asks right after another peer cannot count
            // on receiving that peer's units.
            let min_pool = if self.config.mix_replicas && may_start && !self.fresh.is_empty() {
                window
            } else {
                0
            };
            let mut units = self.draw(peer, host, room, min_pool);
            if units.len() < room {
                if may_start {
                    let fresh = self.fresh.first(window);
                    let more = self.sample(fresh, room - units.len());
                    units.extend(more);
                } else if !self.fresh.is_empty() {
                    self.starved = true;
                }
            }
            units.sort_unstable();
            let mut leases = Vec::with_capacity(units.len());
            for unit in units {
                if let Some(lease) = self.issue(peer, host, unit, now) {
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

    /// Up to `room` started units that `peer`, on `host`, may run: drawn at random among all
    /// of them, and none when fewer than `min_pool` are eligible.
    ///
    /// A spot check drawn for `host` goes first and counts on no pool: the submitter chose its
    /// checker. One drawn for another host is left to that host while fresh units remain.
    fn draw(&mut self, peer: PeerId, host: Host, room: usize, min_pool: usize) -> Vec<u32> {
        let tail = self.fresh.is_empty();
        let mut checks = Vec::new();
        let mut pool = Vec::new();
        for &u in &self.started {
            let Some(state) = self.units.get(u) else {
                continue;
            };
            if !eligible(&state.tried, peer, host) {
                continue;
            }
            match self.spot_for(state, host) {
                Some(true) => checks.push(u),
                Some(false) if !tail => {}
                _ => pool.push(u),
            }
        }
        let mut units = self.sample(checks, room);
        if pool.len() >= min_pool.max(1) {
            let more = self.sample(pool, room - units.len());
            units.extend(more);
        }
        units
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

    fn issue(&mut self, peer: PeerId, host: Host, unit: u32, now: Instant) -> Option<Lease> {
        self.maybe_alone(unit, peer, host);
        let state = self.units.get_mut(unit)?;
        state.tally.start().ok()?;
        let id = LeaseId(self.next_lease);
        self.next_lease += 1;
        state.tried.push(Try {
            peer,
            host,
            failed: false,
        });
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
                host,
                unit,
                deadline: lease.deadline,
            },
        );
        self.deadlines.insert((lease.deadline, id));
        if let Some(p) = self.peers.get_mut(&peer) {
            p.free = p.free.saturating_sub(1);
            p.leases.insert(id);
        }
        if let Some(h) = self.hosts.get_mut(&host) {
            h.leases += 1;
        }
        self.stats.leases_issued += 1;
        // Leasing moves a unit from fresh to started; that needs no rescan.
        let rescan = self.rescan;
        self.refresh(unit);
        self.rescan = rescan;
        Some(lease)
    }
}

/// Whether a unit with these leases may go to `peer` on `host`: never twice to one peer, and
/// never to a host that holds or answered a lease of it (a host failure frees its host).
fn eligible(tried: &[Try], peer: PeerId, host: Host) -> bool {
    tried
        .iter()
        .all(|t| t.peer != peer && (t.host != host || t.failed))
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

    fn on(n: u8) -> Host {
        Host::Local(std::net::IpAddr::from([127, 0, 0, n]))
    }

    fn avail(s: &mut Scheduler, p: PeerId, slots: u32, host: Host, now: Instant) {
        s.handle(
            Event::Available {
                peer: p,
                slots,
                host,
            },
            now,
        );
    }

    fn fail(s: &mut Scheduler, from: PeerId, leases: &[Lease], now: Instant) {
        let results = leases
            .iter()
            .map(|l| LeaseResult {
                lease: l.id,
                outcome: Outcome::HostFailure,
            })
            .collect();
        s.handle(Event::Results { from, results }, now);
    }

    #[test]
    fn two_keys_of_one_host_never_hold_one_unit() {
        let now = Instant::now();
        let mut s = Scheduler::new(job(), 40, Policy::new(2, 2, 4), Config::default(), 3);
        // A colluder takes units, and its second key asks right after it: it gets none of
        // them, only fresh units.
        avail(&mut s, peer(1), 10, on(2), now);
        let a = offers(&drain(&mut s)).remove(&peer(1)).unwrap_or_default();
        avail(&mut s, peer(2), 10, on(2), now);
        let b = offers(&drain(&mut s)).remove(&peer(2)).unwrap_or_default();
        assert_eq!((a.len(), b.len()), (10, 10));
        let a_units: BTreeSet<u32> = a.iter().map(|l| l.unit).collect();
        assert!(b.iter().all(|l| !a_units.contains(&l.unit)), "{a:?} {b:?}");
        // Both answer the same forged bytes: nothing is accepted on their word.
        answer(&mut s, peer(1), &a, b"forged", now);
        answer(&mut s, peer(2), &b, b"forged", now);
        assert!(
            !drain(&mut s)
                .iter()
                .any(|c| matches!(c, Command::Decided { .. }))
        );
        assert_eq!(s.progress().accepted, 0);
        // An honest peer on another host supplies the second replicas; the forged ones lose.
        for _ in 0..10 {
            avail(&mut s, peer(9), 40, on(3), now);
            let h = offers(&drain(&mut s)).remove(&peer(9)).unwrap_or_default();
            answer(&mut s, peer(9), &h, b"true", now);
        }
        assert_eq!(
            s.progress().accepted,
            0,
            "two hosts disagree: no quorum yet"
        );
    }

    #[test]
    fn placement_by_peer_lets_keys_of_one_host_agree() {
        let now = Instant::now();
        let config = Config {
            placement: Placement::Peer,
            ..Config::default()
        };
        let mut s = Scheduler::new(job(), 4, Policy::new(2, 2, 4), config, 3);
        avail(&mut s, peer(1), 4, on(1), now);
        let a = offers(&drain(&mut s)).remove(&peer(1)).unwrap_or_default();
        avail(&mut s, peer(2), 4, on(1), now);
        let b = offers(&drain(&mut s)).remove(&peer(2)).unwrap_or_default();
        answer(&mut s, peer(1), &a, b"x", now);
        answer(&mut s, peer(2), &b, b"x", now);
        assert_eq!(s.progress().accepted, 4);
    }

    #[test]
    fn a_host_with_many_keys_holds_at_most_its_cap() {
        let now = Instant::now();
        let config = Config {
            max_leases_per_host: 12,
            ..Config::default()
        };
        let mut s = Scheduler::new(job(), 1000, Policy::new(2, 2, 4), config, 4);
        for n in 0..50u8 {
            avail(&mut s, peer(n), 100, on(7), now);
        }
        assert_eq!(s.progress().running, 12);
        avail(&mut s, peer(200), 100, on(8), now);
        assert_eq!(s.progress().running, 24, "another host is not held back");
    }

    #[test]
    fn repeated_host_failures_back_off_the_peer_and_its_host() {
        let now = Instant::now();
        let config = Config {
            backoff_after: 3,
            backoff: Duration::from_secs(30),
            ..Config::default()
        };
        let mut s = Scheduler::new(job(), 500, Policy::new(2, 2, 4), config, 5);
        // A griefer takes leases and answers each with a host failure.
        avail(&mut s, peer(1), 8, on(5), now);
        let a = offers(&drain(&mut s)).remove(&peer(1)).unwrap_or_default();
        assert_eq!(a.len(), 8);
        fail(&mut s, peer(1), &a, now);
        avail(&mut s, peer(1), 8, on(5), now);
        assert!(offers(&drain(&mut s)).is_empty(), "backed off");
        // A fresh key on the same host inherits the host's back-off.
        avail(&mut s, peer(2), 8, on(5), now);
        assert!(offers(&drain(&mut s)).is_empty(), "its host is backed off");
        // Another host is served, and the failed units are not failed for good.
        avail(&mut s, peer(3), 8, on(6), now);
        assert_eq!(offers(&drain(&mut s))[&peer(3)].len(), 8);
        assert_eq!(s.progress().failed, 0);
        let named: Vec<Culprit> = s.penalties(now).into_iter().map(|(c, _)| c).collect();
        assert!(named.contains(&Culprit::Peer(peer(1))), "{named:?}");
        assert!(named.contains(&Culprit::Host(on(5))), "{named:?}");
        // After the back-off the host gets leases again, few at first.
        let after = now + Duration::from_secs(31);
        assert!(s.poll_timeout().is_some_and(|t| t <= after));
        s.handle_timeout(after);
        avail(&mut s, peer(2), 8, on(5), after);
        let o = offers(&drain(&mut s));
        let again: usize = [peer(1), peer(2)]
            .iter()
            .filter_map(|p| o.get(p))
            .map(Vec::len)
            .sum();
        assert!(again > 0 && again < 8, "{again}");
    }

    #[test]
    fn a_host_that_failed_a_unit_may_run_it_again() {
        let now = Instant::now();
        let mut s = Scheduler::new(job(), 1, Policy::new(2, 2, 6), Config::default(), 6);
        avail(&mut s, peer(1), 1, on(1), now);
        let a = offers(&drain(&mut s)).remove(&peer(1)).unwrap_or_default();
        avail(&mut s, peer(2), 1, on(2), now);
        let b = offers(&drain(&mut s)).remove(&peer(2)).unwrap_or_default();
        fail(&mut s, peer(1), &a, now);
        answer(&mut s, peer(2), &b, b"x", now);
        // Only hosts 1 and 2 exist: host 1 failed, so another of its peers may take the unit.
        avail(&mut s, peer(3), 1, on(1), now);
        let c = offers(&drain(&mut s)).remove(&peer(3)).unwrap_or_default();
        assert_eq!(c.len(), 1);
        answer(&mut s, peer(3), &c, b"x", now);
        assert_eq!(s.progress().accepted, 1);
    }

    #[test]
    fn host_failure_verdicts_are_not_final_on_restore() {
        let mut s = Scheduler::new(job(), 2, Policy::new(1, 1, 1), Config::default(), 7);
        let w = crate::validate::Witness {
            peer: peer(1),
            host: on(1),
        };
        let failed = |reason| Verdict::Failed {
            reason,
            evidence: Vec::new(),
            host_failed: vec![w],
        };
        assert_eq!(
            s.restore(0, failed(crate::validate::FailReason::HostFailures)),
            Ok(false)
        );
        assert_eq!(
            s.restore(1, failed(crate::validate::FailReason::NoQuorum)),
            Ok(true)
        );
        let now = Instant::now();
        avail(&mut s, peer(2), 4, on(2), now);
        let o = offers(&drain(&mut s)).remove(&peer(2)).unwrap_or_default();
        assert_eq!(o.iter().map(|l| l.unit).collect::<Vec<_>>(), vec![0]);
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
                host: Host::Peer(peer(1)),
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
                host: Host::Peer(peer(1)),
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
                host: Host::Peer(alone),
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
                host: Host::Peer(alone),
            },
            now,
        );
        assert!(offers(&drain(&mut s)).is_empty());
        s.handle(
            Event::Available {
                peer: peer(2),
                slots: 100,
                host: Host::Peer(peer(2)),
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
                    host: Host::Peer(peer(n)),
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
                host: Host::Peer(peer(3)),
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
            Command::Decided { unit: 0, verdict: Verdict::Accepted { agreeing, .. }, .. }
                if agreeing.iter().map(|w| w.peer).collect::<Vec<_>>() == vec![peer(2), peer(1)]
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
                host: Host::Peer(peer(1)),
            },
            now,
        );
        assert_eq!(offers(&drain(&mut s))[&peer(1)].len(), 4);
        s.handle(
            Event::Available {
                peer: peer(2),
                slots: 4,
                host: Host::Peer(peer(2)),
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
                host: Host::Peer(peer(1)),
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
                host: Host::Peer(peer(1)),
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
                host: Host::Peer(peer(1)),
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
                agreeing: vec![crate::validate::Witness {
                    peer: peer(1),
                    host: Host::Peer(peer(1)),
                }],
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
                    host: Host::Peer(peer(1)),
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
                host: Host::Peer(peer(2)),
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
                    host: Host::Peer(*p),
                },
                now,
            );
        }
        let submitter = peer(0);
        let mut rounds = 0;
        let mut most_held = 0;
        while !s.is_finished() && rounds < 100_000 {
            rounds += 1;
            most_held = most_held.max(s.units_held());
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
                                    host: Host::Peer(peers[i]),
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
        // Records are held by units under way only: three peers of two slots and 64 leases
        // of prefetch each hold a few hundred at most, never the job.
        assert!(most_held <= 1_000, "{most_held} unit records held at once");
        assert_eq!(s.units_held(), 0);
        println!(
            "scheduler core: {units} units x 2 replicas over 3 peers in {:.0} ms ({:.0} units/s, \
             {} dispatch rounds)",
            elapsed.as_secs_f64() * 1e3,
            f64::from(units) / elapsed.as_secs_f64(),
            rounds
        );
    }

    /// A job of a hundred million units costs bits until its units are leased: the scheduler
    /// is made, hands out and decides units, and holds records only for those under way.
    #[test]
    fn a_hundred_million_units_cost_bits_not_records() {
        let now = Instant::now();
        let units = 100_000_000;
        let mut s = Scheduler::new(job(), units, Policy::new(1, 1, 3), Config::default(), 3);
        for n in 1..=3u8 {
            s.handle(
                Event::Available {
                    peer: peer(n),
                    slots: 64,
                    host: Host::Peer(peer(n)),
                },
                now,
            );
        }
        let mut decided = 0u32;
        for _ in 0..50 {
            let mut answers: BTreeMap<PeerId, Vec<LeaseResult>> = BTreeMap::new();
            while let Some(c) = s.poll_command() {
                match c {
                    Command::Offer { to, leases, .. } => {
                        answers
                            .entry(to)
                            .or_default()
                            .extend(leases.iter().map(|l| LeaseResult {
                                lease: l.id,
                                outcome: Outcome::Output(Digest::of(&l.unit.to_le_bytes())),
                            }))
                    }
                    Command::Decided { .. } => decided += 1,
                    _ => {}
                }
            }
            assert!(s.units_held() <= 3 * 64, "{} records", s.units_held());
            for (from, results) in answers {
                let slots = results.len() as u32;
                s.handle(Event::Results { from, results }, now);
                s.handle(
                    Event::Available {
                        peer: from,
                        slots,
                        host: Host::Peer(from),
                    },
                    now,
                );
            }
        }
        while let Some(c) = s.poll_command() {
            decided += u32::from(matches!(c, Command::Decided { .. }));
        }
        assert!(decided >= 4_000, "{decided} decided");
        assert_eq!(s.progress().accepted, decided);
        assert!(!s.is_finished());
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
                        host: Host::Peer(p),
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
