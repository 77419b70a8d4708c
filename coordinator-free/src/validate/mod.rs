//! Redundant validation: when a unit's replicas agree, and what the submitter learns about the
//! peers that ran them.
//!
//! A [`Tally`] is the vote of one unit. Every execution the scheduler starts is counted in
//! flight until its peer answers; an answer is an [`Outcome`]: either the digest of what the
//! unit produced (its output bytes, or the canonical encoding of a deterministic guest error,
//! so that a unit that always traps can be accepted as failed), or a host failure, which says
//! something about the machine and is never voted on.
//!
//! The rules, after BOINC's transitioner:
//!
//! * the unit is accepted as soon as `quorum` distinct hosts returned byte-identical digests;
//!   every vote comes from a peer *and* the [`Host`] its connection came from, and a second
//!   vote from either is refused, so a host with many keys is still one witness; every other
//!   vote is a dissent and its peer is named;
//! * while no quorum is reachable with the executions in flight, one more execution is wanted,
//!   up to `max_attempts` votes in all;
//! * when even `max_attempts` votes cannot reach a quorum, the unit fails with its evidence
//!   (every peer and what it returned);
//! * host failures free their execution for a retry elsewhere and do not count toward
//!   `max_attempts`, but host failures on more than `max_host_failures` distinct hosts fail
//!   the unit, so a unit that crashes every machine it lands on cannot loop forever, while one
//!   host with many keys can fail it only once. Such a verdict is not final: it says the
//!   machines failed, not the unit, and a resumed job runs the unit again.
//!
//! [`Reputation`] keeps, per peer, the run of consecutive results that agreed with an accepted
//! quorum; a dissent or a host failure resets it, as BOINC's adaptive replication does.

use std::collections::BTreeMap;

pub mod trust;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::host::Host;
use crate::peer_id::PeerId;

/// How many executions run and how many must agree. Mirrors the manifest's redundancy section,
/// plus the cap on host failures the manifest leaves implicit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Executions started at once on distinct peers.
    pub replicas: u32,
    /// Byte-identical results that accept the unit.
    pub quorum: u32,
    /// Most votes (answered executions) one unit may collect.
    pub max_attempts: u32,
    /// Most host failures (crash, timeout, lost peer) one unit may suffer before it fails.
    pub max_host_failures: u32,
}

impl Policy {
    /// A policy with `max_host_failures = max_attempts`. Nonsensical combinations are repaired
    /// rather than refused (quorum at least 1, replicas at least quorum, attempts at least
    /// replicas), so no input can make a unit wait for a quorum it can never reach.
    pub fn new(replicas: u32, quorum: u32, max_attempts: u32) -> Self {
        Self {
            replicas,
            quorum,
            max_attempts,
            max_host_failures: max_attempts,
        }
        .repaired()
    }

    fn repaired(mut self) -> Self {
        self.quorum = self.quorum.max(1);
        self.replicas = self.replicas.max(self.quorum);
        self.max_attempts = self.max_attempts.max(self.replicas);
        self
    }
}

impl Default for Policy {
    /// Two replicas that must agree, up to four votes: the manifest's defaults.
    fn default() -> Self {
        Self::new(2, 2, 4)
    }
}

/// What one execution of a unit ended in, as far as voting is concerned.
///
/// A successful run is `Output(Digest::of(output bytes))`. The sandbox's `UnitError` maps
/// onto it by its class: a deterministic error becomes
/// [`Outcome::deterministic_error`]`(canonical encoding of the error)`, a host failure
/// becomes `HostFailure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// The digest of the output bytes, or of a deterministic failure's canonical encoding.
    Output(Digest),
    /// Timeout, stack overflow, host out of memory, crash, lost peer: retry elsewhere.
    HostFailure,
}

/// Prefix of the bytes hashed for a deterministic error, so that no output can share its
/// digest with an error whose encoding happens to equal that output.
const ERROR_DOMAIN: &[u8] = b"coordinator-free/unit-error/v1\0";

impl Outcome {
    /// The vote for a deterministic guest error, from a canonical encoding of it (the
    /// postcard bytes of the sandbox's `UnitError`, say). Every honest peer encodes the same
    /// error to the same bytes, so errors reach quorum like outputs.
    pub fn deterministic_error(encoded: &[u8]) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(ERROR_DOMAIN);
        hasher.update(encoded);
        Self::Output(Digest(*hasher.finalize().as_bytes()))
    }
}

/// One peer's vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub peer: PeerId,
    /// The host the vote came from.
    pub host: Host,
    pub digest: Digest,
}

/// A peer, and the host it answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Witness {
    pub peer: PeerId,
    pub host: Host,
}

/// Why a unit was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailReason {
    /// Even with every remaining attempt agreeing, no digest could reach the quorum.
    NoQuorum,
    /// Host failures on more than `max_host_failures` distinct hosts.
    HostFailures,
    /// The scheduler gave the unit up (the job was cancelled).
    Abandoned,
}

/// How a unit ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Accepted {
        digest: Digest,
        /// The peers whose result is the accepted one, each on a host of its own, in the
        /// order they answered.
        agreeing: Vec<Witness>,
        /// Every peer that answered something else, and what.
        dissenters: Vec<Vote>,
        /// Peers whose execution ended in a host failure.
        host_failed: Vec<Witness>,
    },
    Failed {
        reason: FailReason,
        /// Every vote, in the order they arrived.
        evidence: Vec<Vote>,
        host_failed: Vec<Witness>,
    },
}

impl Verdict {
    pub fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted { .. })
    }

    /// Whether the verdict stands for good. A unit given up because the machines it ran on
    /// failed, or because the job was cancelled, says nothing about the unit: a resumed job
    /// runs it again.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Self::Failed {
                reason: FailReason::HostFailures | FailReason::Abandoned,
                ..
            }
        )
    }

    /// The accepted digest, if any.
    pub fn digest(&self) -> Option<Digest> {
        match self {
            Self::Accepted { digest, .. } => Some(*digest),
            Self::Failed { .. } => None,
        }
    }
}

/// A call the tally's state does not allow; the caller drops the input and counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ValidateError {
    #[error("the unit is already decided")]
    Closed,
    #[error("peer {peer}, or another peer of its host, already voted on this unit")]
    DuplicateVote { peer: PeerId },
    #[error("no execution of this unit is in flight")]
    NothingInFlight,
    #[error("all {max_attempts} attempts of this unit are taken")]
    AttemptsExhausted { max_attempts: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Open,
    Closed(Verdict),
}

/// The votes on one unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    policy: Policy,
    votes: Vec<Vote>,
    host_failed: Vec<Witness>,
    in_flight: u32,
    state: State,
}

impl Tally {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy: policy.repaired(),
            votes: Vec::new(),
            host_failed: Vec::new(),
            in_flight: 0,
            state: State::Open,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    pub fn verdict(&self) -> Option<&Verdict> {
        match &self.state {
            State::Open => None,
            State::Closed(v) => Some(v),
        }
    }

    pub fn votes(&self) -> &[Vote] {
        &self.votes
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Distinct hosts on which an execution of this unit ended in a host failure.
    pub fn host_failures(&self) -> u32 {
        let mut hosts: Vec<Host> = self.host_failed.iter().map(|w| w.host).collect();
        hosts.sort_unstable();
        hosts.dedup();
        u32::try_from(hosts.len()).unwrap_or(u32::MAX)
    }

    /// Whether `host` voted on this unit.
    pub fn voted_from(&self, host: &Host) -> bool {
        self.votes.iter().any(|v| v.host == *host)
    }

    fn vote_count(&self) -> u32 {
        u32::try_from(self.votes.len()).unwrap_or(u32::MAX)
    }

    /// The most votes any one digest has.
    fn best(&self) -> u32 {
        let mut counts: BTreeMap<Digest, u32> = BTreeMap::new();
        let mut best = 0;
        for v in &self.votes {
            let c = counts.entry(v.digest).or_insert(0);
            *c += 1;
            best = best.max(*c);
        }
        best
    }

    /// How many more executions should start now: enough to fill the initial replicas, or,
    /// after a disagreement, enough that the executions in flight could still complete a
    /// quorum; never more than the attempts left.
    pub fn wanted(&self) -> u32 {
        if !self.is_open() {
            return 0;
        }
        let taken = self.vote_count().saturating_add(self.in_flight);
        let fill = self.policy.replicas.saturating_sub(taken);
        let missing = self
            .policy
            .quorum
            .saturating_sub(self.best())
            .saturating_sub(self.in_flight);
        let left = self.policy.max_attempts.saturating_sub(taken);
        fill.max(missing).min(left)
    }

    /// An execution was handed to a peer.
    pub fn start(&mut self) -> Result<(), ValidateError> {
        if !self.is_open() {
            return Err(ValidateError::Closed);
        }
        let taken = self.vote_count().saturating_add(self.in_flight);
        if taken >= self.policy.max_attempts {
            return Err(ValidateError::AttemptsExhausted {
                max_attempts: self.policy.max_attempts,
            });
        }
        self.in_flight += 1;
        Ok(())
    }

    /// An execution in flight was answered (or, as `HostFailure`, given up: its lease expired
    /// or its peer left). Returns the verdict if this closed the unit.
    pub fn record(
        &mut self,
        peer: PeerId,
        host: Host,
        outcome: Outcome,
    ) -> Result<Option<Verdict>, ValidateError> {
        if self.in_flight == 0 {
            return Err(if self.is_open() {
                ValidateError::NothingInFlight
            } else {
                ValidateError::Closed
            });
        }
        // The execution is over whatever its answer is worth: a refused vote frees its
        // place for another execution.
        self.in_flight -= 1;
        if let Outcome::Output(_) = outcome {
            self.check_vote(peer, host)?;
        } else if !self.is_open() {
            return Err(ValidateError::Closed);
        }
        Ok(self.count(Witness { peer, host }, outcome))
    }

    /// An answer to an execution that was already given up as a host failure (its lease
    /// expired). It still counts as a vote while the unit is open; a late host failure adds
    /// nothing.
    pub fn record_late(
        &mut self,
        peer: PeerId,
        host: Host,
        outcome: Outcome,
    ) -> Result<Option<Verdict>, ValidateError> {
        if !self.is_open() {
            return Err(ValidateError::Closed);
        }
        match outcome {
            Outcome::HostFailure => Ok(None),
            Outcome::Output(_) => {
                self.check_vote(peer, host)?;
                Ok(self.count(Witness { peer, host }, outcome))
            }
        }
    }

    /// Takes back a started execution that never ran (its peer declined the lease).
    pub fn withdraw(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Closes the unit with a verdict reached earlier (read back from a journal).
    pub fn restore(&mut self, verdict: Verdict) {
        self.in_flight = 0;
        self.state = State::Closed(verdict);
    }

    /// Opens a decided unit again under a stricter `policy`, its votes kept: a dispute that
    /// needs more witnesses before it is settled. Returns whether it was reopened (not if it
    /// failed, or if the policy allows no vote more).
    pub fn extend(&mut self, policy: Policy) -> bool {
        let policy = policy.repaired();
        if !matches!(self.state, State::Closed(Verdict::Accepted { .. }))
            || self.vote_count() >= policy.max_attempts
        {
            return false;
        }
        self.policy = policy;
        self.state = State::Open;
        true
    }

    /// Gives the unit up whatever its votes say.
    pub fn abandon(&mut self) -> Option<Verdict> {
        if !self.is_open() {
            return None;
        }
        Some(self.fail(FailReason::Abandoned))
    }

    fn check_vote(&self, peer: PeerId, host: Host) -> Result<(), ValidateError> {
        if !self.is_open() {
            return Err(ValidateError::Closed);
        }
        if self.votes.iter().any(|v| v.peer == peer || v.host == host) {
            return Err(ValidateError::DuplicateVote { peer });
        }
        Ok(())
    }

    fn count(&mut self, witness: Witness, outcome: Outcome) -> Option<Verdict> {
        match outcome {
            Outcome::HostFailure => {
                self.host_failed.push(witness);
                if self.host_failures() > self.policy.max_host_failures {
                    return Some(self.fail(FailReason::HostFailures));
                }
            }
            Outcome::Output(digest) => {
                let Witness { peer, host } = witness;
                self.votes.push(Vote { peer, host, digest });
                // One vote per host (`check_vote`): agreeing votes are distinct hosts.
                let agreeing: Vec<Witness> = self
                    .votes
                    .iter()
                    .filter(|v| v.digest == digest)
                    .map(|v| Witness {
                        peer: v.peer,
                        host: v.host,
                    })
                    .collect();
                if u32::try_from(agreeing.len()).unwrap_or(u32::MAX) >= self.policy.quorum {
                    let verdict = Verdict::Accepted {
                        digest,
                        agreeing,
                        dissenters: self
                            .votes
                            .iter()
                            .filter(|v| v.digest != digest)
                            .copied()
                            .collect(),
                        host_failed: self.host_failed.clone(),
                    };
                    self.state = State::Closed(verdict.clone());
                    return Some(verdict);
                }
            }
        }
        let votes_left = self.policy.max_attempts.saturating_sub(self.vote_count());
        if self.best().saturating_add(votes_left) < self.policy.quorum {
            return Some(self.fail(FailReason::NoQuorum));
        }
        None
    }

    fn fail(&mut self, reason: FailReason) -> Verdict {
        let verdict = Verdict::Failed {
            reason,
            evidence: self.votes.clone(),
            host_failed: self.host_failed.clone(),
        };
        self.state = State::Closed(verdict.clone());
        verdict
    }
}

/// What the submitter knows of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    /// Consecutive results that agreed with an accepted quorum.
    pub streak: u32,
    /// All results that agreed with an accepted quorum.
    pub agreed: u64,
    /// Results that disagreed with an accepted quorum.
    pub dissents: u64,
    /// Executions that ended in a host failure.
    pub host_failures: u64,
}

/// Per-peer standing kept by a submitter across its jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reputation {
    peers: BTreeMap<PeerId, Standing>,
    max_peers: usize,
    /// Updates dropped because the table was full.
    dropped: u64,
}

/// Default cap on peers tracked by a [`Reputation`].
pub const MAX_REPUTATION_PEERS: usize = 65_536;

impl Default for Reputation {
    fn default() -> Self {
        Self::new(MAX_REPUTATION_PEERS)
    }
}

impl Reputation {
    pub fn new(max_peers: usize) -> Self {
        Self {
            peers: BTreeMap::new(),
            max_peers,
            dropped: 0,
        }
    }

    pub fn standing(&self, peer: &PeerId) -> Standing {
        self.peers.get(peer).copied().unwrap_or_default()
    }

    /// Peers that ever dissented, with their standing.
    pub fn dissenters(&self) -> impl Iterator<Item = (&PeerId, &Standing)> {
        self.peers.iter().filter(|(_, s)| s.dissents > 0)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PeerId, &Standing)> {
        self.peers.iter()
    }

    /// How many updates were dropped because the table was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Restores a persisted entry.
    pub fn restore(&mut self, peer: PeerId, standing: Standing) {
        if let Some(s) = self.entry(peer) {
            *s = standing;
        }
    }

    /// Learns from a closed unit. A failed unit has no accepted answer to measure votes
    /// against, so only its host failures count.
    pub fn record(&mut self, verdict: &Verdict) {
        let host_failed = match verdict {
            Verdict::Accepted {
                agreeing,
                dissenters,
                host_failed,
                ..
            } => {
                for w in agreeing {
                    if let Some(s) = self.entry(w.peer) {
                        s.streak = s.streak.saturating_add(1);
                        s.agreed = s.agreed.saturating_add(1);
                    }
                }
                for vote in dissenters {
                    if let Some(s) = self.entry(vote.peer) {
                        s.streak = 0;
                        s.dissents = s.dissents.saturating_add(1);
                    }
                }
                host_failed
            }
            Verdict::Failed { host_failed, .. } => host_failed,
        };
        for w in host_failed {
            if let Some(s) = self.entry(w.peer) {
                s.streak = 0;
                s.host_failures = s.host_failures.saturating_add(1);
            }
        }
    }

    fn entry(&mut self, peer: PeerId) -> Option<&mut Standing> {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            self.dropped += 1;
            return None;
        }
        Some(self.peers.entry(peer).or_default())
    }
}

#[cfg(test)]
mod tests {
    //! Rule tests driven by `testdata/*.txt`, in the manner of raft-rs's quorum tests.
    //!
    //! A case starts with `case NAME` and runs its lines in order against one [`Tally`] and a
    //! [`Reputation`] shared by the whole file. Peers and digests are short names; a digest
    //! `X` stands for `Digest::of(b"X")`.
    //!
    //! ```text
    //! policy R Q M [H]      new tally (H = max_host_failures, default M)
    //! start N               N executions start (must be allowed)
    //! start! N              starting N executions must fail with AttemptsExhausted
    //! vote PEER D           an execution in flight answers with digest D
    //!                       (PEER is `name` for a peer that is its own host, or `name@host`)
    //! host PEER             an execution in flight ends in a host failure
    //! late PEER D           an answer after its lease expired
    //! want N                wanted() is N
    //! open                  no verdict yet
    //! error KIND            the previous input was refused (closed|duplicate|idle)
    //! accepted D agree=P,.. dissent=P:D,..|-     the verdict
    //! failed REASON evidence=P:D,..|- host=P,..|-
    //! streak PEER N / dissents PEER N           reputation after the verdicts so far
    //! ```
    use super::*;

    fn peer(name: &str) -> PeerId {
        let name = name.split_once('@').map_or(name, |(p, _)| p);
        PeerId::from_bytes(Digest::of(name.as_bytes()).0)
    }

    /// The host of `name@host`: a loopback address per host name; a plain `name` is its own.
    fn host(name: &str) -> Host {
        match name.split_once('@') {
            Some((_, h)) => {
                let n = Digest::of(h.as_bytes()).0;
                Host::Local(std::net::IpAddr::from([127, n[0], n[1], n[2]]))
            }
            None => Host::Peer(peer(name)),
        }
    }

    fn digest(name: &str) -> Digest {
        Digest::of(name.as_bytes())
    }

    fn number(word: Option<&str>, line: usize) -> u32 {
        word.and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("line {line}: expected a number"))
    }

    fn peers(list: &str) -> Vec<PeerId> {
        if list == "-" {
            return Vec::new();
        }
        list.split(',').map(peer).collect()
    }

    fn votes(list: &str) -> Vec<Vote> {
        if list == "-" {
            return Vec::new();
        }
        list.split(',')
            .map(|pair| {
                let (p, d) = pair.split_once(':').expect("PEER:DIGEST");
                Vote {
                    peer: peer(p),
                    host: host(p),
                    digest: digest(d),
                }
            })
            .collect()
    }

    fn field<'a>(word: Option<&'a str>, key: &str, line: usize) -> &'a str {
        word.and_then(|w| w.strip_prefix(key))
            .and_then(|w| w.strip_prefix('='))
            .unwrap_or_else(|| panic!("line {line}: expected {key}=..."))
    }

    fn run_file(name: &str, text: &str) -> usize {
        let mut tally = Tally::new(Policy::default());
        let mut reputation = Reputation::default();
        let mut case = String::new();
        let mut last: Result<Option<Verdict>, ValidateError> = Ok(None);
        let mut cases = 0;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            let mut words = content.split_whitespace();
            let Some(op) = words.next() else { continue };
            let at = format!("{name}:{line} ({case})");
            let mut apply = |result: Result<Option<Verdict>, ValidateError>| {
                if let Ok(Some(v)) = &result {
                    reputation.record(v);
                }
                result
            };
            match op {
                "case" => {
                    case = words.collect::<Vec<_>>().join(" ");
                    cases += 1;
                }
                "policy" => {
                    let r = number(words.next(), line);
                    let q = number(words.next(), line);
                    let m = number(words.next(), line);
                    let mut policy = Policy::new(r, q, m);
                    if let Some(h) = words.next() {
                        policy.max_host_failures = number(Some(h), line);
                    }
                    tally = Tally::new(policy);
                    last = Ok(None);
                }
                "start" => {
                    for _ in 0..number(words.next(), line) {
                        tally.start().unwrap_or_else(|e| panic!("{at}: {e}"));
                    }
                }
                "start!" => {
                    for _ in 0..number(words.next(), line) {
                        assert!(
                            matches!(tally.start(), Err(ValidateError::AttemptsExhausted { .. })),
                            "{at}: start should be refused"
                        );
                    }
                }
                "vote" | "late" => {
                    let name = words.next().expect("peer");
                    let (p, h) = (peer(name), host(name));
                    let d = Outcome::Output(digest(words.next().expect("digest")));
                    last = apply(if op == "vote" {
                        tally.record(p, h, d)
                    } else {
                        tally.record_late(p, h, d)
                    });
                }
                "host" => {
                    let name = words.next().expect("peer");
                    last = apply(tally.record(peer(name), host(name), Outcome::HostFailure));
                }
                "want" => assert_eq!(tally.wanted(), number(words.next(), line), "{at}"),
                "open" => {
                    assert!(tally.is_open(), "{at}: closed with {:?}", tally.verdict());
                    assert!(matches!(last, Ok(None)), "{at}: {last:?}");
                }
                "error" => {
                    let kind = words.next().expect("kind");
                    let ok = match kind {
                        "closed" => matches!(last, Err(ValidateError::Closed)),
                        "duplicate" => matches!(last, Err(ValidateError::DuplicateVote { .. })),
                        "idle" => matches!(last, Err(ValidateError::NothingInFlight)),
                        _ => panic!("{at}: unknown error kind {kind}"),
                    };
                    assert!(ok, "{at}: expected {kind}, got {last:?}");
                }
                "accepted" => {
                    let d = digest(words.next().expect("digest"));
                    let agree = peers(field(words.next(), "agree", line));
                    let dissent = votes(field(words.next(), "dissent", line));
                    match tally.verdict() {
                        Some(Verdict::Accepted {
                            digest: got,
                            agreeing,
                            dissenters,
                            ..
                        }) => {
                            assert_eq!(*got, d, "{at}");
                            let agreeing: Vec<PeerId> = agreeing.iter().map(|w| w.peer).collect();
                            assert_eq!(agreeing, agree, "{at}");
                            assert_eq!(*dissenters, dissent, "{at}");
                        }
                        other => panic!("{at}: expected accepted, got {other:?}"),
                    }
                }
                "failed" => {
                    let reason = match words.next() {
                        Some("no-quorum") => FailReason::NoQuorum,
                        Some("host-failures") => FailReason::HostFailures,
                        Some("abandoned") => FailReason::Abandoned,
                        other => panic!("{at}: unknown reason {other:?}"),
                    };
                    let expect_votes = votes(field(words.next(), "evidence", line));
                    let expect_host = peers(field(words.next(), "host", line));
                    match tally.verdict() {
                        Some(Verdict::Failed {
                            reason: got,
                            evidence,
                            host_failed,
                        }) => {
                            assert_eq!(*got, reason, "{at}");
                            assert_eq!(*evidence, expect_votes, "{at}");
                            let host_failed: Vec<PeerId> =
                                host_failed.iter().map(|w| w.peer).collect();
                            assert_eq!(host_failed, expect_host, "{at}");
                        }
                        other => panic!("{at}: expected failed, got {other:?}"),
                    }
                }
                "abandon" => {
                    if let Some(v) = tally.abandon() {
                        reputation.record(&v);
                    }
                }
                "streak" | "dissents" => {
                    let s = reputation.standing(&peer(words.next().expect("peer")));
                    let n = u64::from(number(words.next(), line));
                    let got = if op == "streak" {
                        u64::from(s.streak)
                    } else {
                        s.dissents
                    };
                    assert_eq!(got, n, "{at}: {op}");
                }
                other => panic!("{at}: unknown directive {other}"),
            }
        }
        cases
    }

    #[test]
    fn quorum_rules() {
        let cases = run_file("quorum.txt", include_str!("testdata/quorum.txt"));
        assert!(cases >= 10, "{cases}");
    }

    #[test]
    fn reputation_rules() {
        let cases = run_file("reputation.txt", include_str!("testdata/reputation.txt"));
        assert!(cases >= 3, "{cases}");
    }

    #[test]
    fn errors_never_share_a_digest_with_outputs() {
        let bytes = b"trap: unreachable";
        assert_ne!(
            Outcome::deterministic_error(bytes),
            Outcome::Output(Digest::of(bytes))
        );
        assert_eq!(
            Outcome::deterministic_error(bytes),
            Outcome::deterministic_error(bytes)
        );
    }

    #[test]
    fn policy_is_repaired() {
        let p = Policy::new(1, 0, 0);
        assert_eq!((p.replicas, p.quorum, p.max_attempts), (1, 1, 1));
        let p = Policy::new(1, 3, 2);
        assert_eq!((p.replicas, p.quorum, p.max_attempts), (3, 3, 3));
    }

    #[test]
    fn reputation_table_is_bounded() {
        let mut r = Reputation::new(2);
        let verdict = Verdict::Accepted {
            digest: digest("x"),
            agreeing: ["a", "b", "c"]
                .map(|p| Witness {
                    peer: peer(p),
                    host: host(p),
                })
                .to_vec(),
            dissenters: Vec::new(),
            host_failed: Vec::new(),
        };
        r.record(&verdict);
        assert_eq!(r.iter().count(), 2);
        assert_eq!(r.dropped(), 1);
        assert_eq!(r.standing(&peer("a")).streak, 1);
    }

    #[test]
    fn wanted_never_exceeds_attempts_whatever_the_order() {
        // Every interleaving of a small alphabet of inputs keeps the invariants.
        let inputs = ["s", "va", "vb", "hc", "la"];
        for policy in [
            Policy::new(2, 2, 3),
            Policy::new(3, 2, 5),
            Policy::new(1, 1, 1),
        ] {
            for code in 0..5u32.pow(6) {
                let mut t = Tally::new(policy);
                let mut n = code;
                for step in 0..6u8 {
                    // Six peers on three hosts.
                    let name = format!("p{step}@h{}", step % 3);
                    let (who, at) = (peer(&name), host(&name));
                    let r = match inputs[(n % 5) as usize] {
                        "s" => t.start().map(|()| None),
                        "va" => t.record(who, at, Outcome::Output(digest("a"))),
                        "vb" => t.record(who, at, Outcome::Output(digest("b"))),
                        "hc" => t.record(who, at, Outcome::HostFailure),
                        _ => t.record_late(who, at, Outcome::Output(digest("a"))),
                    };
                    n /= 5;
                    let _ = r;
                    let taken = t.votes().len() as u32 + t.in_flight();
                    assert!(t.wanted() + taken <= policy.max_attempts.max(taken));
                    if let Some(Verdict::Accepted { agreeing, .. }) = t.verdict() {
                        assert!(agreeing.len() as u32 >= policy.quorum);
                        let mut hosts: Vec<Host> = agreeing.iter().map(|w| w.host).collect();
                        hosts.sort_unstable();
                        hosts.dedup();
                        assert_eq!(hosts.len(), agreeing.len(), "one witness per host");
                    }
                }
            }
        }
    }
}
