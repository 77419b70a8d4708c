//! Adaptive replication inside the scheduler: units run alone on peers this submitter trusts,
//! spot checks of what they returned, and the re-run of everything a peer ran alone once it
//! is caught. The trust table and its rule are in [`crate::validate::trust`]; this file decides,
//! per unit, what the table allows.
//!
//! A unit's [`Mode`] says how it is being validated:
//!
//! * `Replicated` — the job's policy, as without trust;
//! * `Alone` — its one execution runs on a trusted peer under a quorum of one;
//! * `Spot` — that execution answered and a second host must agree before it is accepted;
//! * `Trusted` — accepted on the peer's word (provisional under [`TrustRule::Checked`]);
//! * `Revalidating` — accepted alone once, run again under the job's policy because its
//!   peer's host was caught.
//!
//! [`TrustRule::Checked`]: crate::validate::trust::TrustRule::Checked

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::Scheduler;
use crate::host::Host;
use crate::peer_id::PeerId;
use crate::validate::trust::{Standing, Trust, TrustRule};
use crate::validate::{Outcome, Policy, Tally, Verdict, Witness};

/// How a decided unit's result was validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Validation {
    /// `quorum` distinct hosts returned it (the verdict's `agreeing`).
    Quorum,
    /// Run alone on a trusted peer and accepted on its word. `standing` is what the peer and
    /// its host had then: a later catch (a higher `caught`) makes the result suspect.
    Trusted {
        peer: PeerId,
        host: Host,
        streak: u32,
        standing: (Standing, Standing),
    },
    /// Run alone on a trusted peer, then confirmed by another host.
    SpotChecked { peer: PeerId, streak: u32 },
    /// Run alone on a peer the operator vouches for (a lab's own machine), unchecked.
    Vouched { peer: PeerId },
    /// Accepted on a peer's word once, then run again under the job's policy because
    /// `caught` (that peer, or another key of its host) was caught lying.
    Revalidated { caught: PeerId },
}

impl Validation {
    /// Whether the result rests on one peer's word alone.
    pub fn is_provisional(&self) -> bool {
        matches!(self, Self::Trusted { .. })
    }
}

/// How one unit is being validated now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Mode {
    #[default]
    Replicated,
    Alone {
        peer: PeerId,
        host: Host,
        streak: u32,
    },
    Spot {
        peer: PeerId,
        host: Host,
        streak: u32,
        /// The host the submitter drew to check it: only its peers may take the check while
        /// fresh units remain (see [`Scheduler::spot_for`]).
        checker: Option<Host>,
    },
    Trusted {
        peer: PeerId,
        host: Host,
    },
    Revalidating {
        caught: PeerId,
    },
}

/// The tally of a spot check: the alone answer stays as the first vote, and a second host must
/// agree.
fn spot_tally(policy: Policy, peer: PeerId, host: Host, digest: crate::digest::Digest) -> Tally {
    let mut tally = Tally::new(policy);
    if tally.start().is_ok() {
        let _ = tally.record(peer, host, Outcome::Output(digest));
    }
    tally
}

/// A result accepted alone on a trusted peer's word, remembered while it is among the latest
/// ones so that a catch can send it to a spot check after all.
#[derive(Debug, Clone, Copy)]
pub(super) struct Recent {
    unit: u32,
    peer: PeerId,
    host: Host,
    streak: u32,
    digest: crate::digest::Digest,
    /// The chance of a spot check it was judged under.
    checked: f64,
}

/// Counters of adaptive replication, for the summary and the simulation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrustStats {
    /// Units whose first execution went alone to a trusted peer.
    pub alone: u64,
    /// Units accepted on a trusted peer's word.
    pub trusted: u64,
    /// Alone results sent to a second host.
    pub spot_checks: u64,
    /// Spot checks that agreed.
    pub spot_confirmed: u64,
    /// Trusted peers caught disagreeing with a quorum.
    pub caught: u64,
    /// Disputes against a trusted peer that called for one more agreeing host.
    pub disputes: u64,
    /// Units accepted alone, then run again because their peer's host was caught.
    pub revalidated: u64,
    /// Units accepted alone on another host's word, sent to a spot check after all when a
    /// catch looked back at them.
    pub looked_back: u64,
}

impl Scheduler {
    /// Runs the units this job's trust allows alone on trusted peers (`None`: every unit
    /// replicated). The table is the submitter's, carried from job to job.
    pub fn with_trust(mut self, trust: Option<Trust>) -> Self {
        self.trust = trust;
        self
    }

    /// The trust table, with what this job taught it.
    pub fn trust(&self) -> Option<&Trust> {
        self.trust.as_ref()
    }

    pub fn trust_mut(&mut self) -> Option<&mut Trust> {
        self.trust.as_mut()
    }

    pub fn trust_stats(&self) -> &TrustStats {
        &self.trust_stats
    }

    /// Whether `unit`, about to be leased to `peer` on `host` for the first time, runs there
    /// alone; if so its tally becomes a quorum of one.
    pub(super) fn maybe_alone(&mut self, unit: u32, peer: PeerId, host: Host) {
        let Some(trust) = &self.trust else {
            return;
        };
        let chance = trust.alone_chance(&peer, &host);
        let streak = trust.streak(&peer, &host);
        let Some(state) = self.units.get(unit) else {
            return;
        };
        if chance <= 0.0
            || state.mode != Mode::Replicated
            || !state.tried.is_empty()
            || state.tally.in_flight() > 0
            || !state.tally.votes().is_empty()
            || !self.rng.chance(chance)
        {
            return;
        }
        if let Some(state) = self.units.get_mut(unit) {
            state.tally = Tally::new(Policy::new(1, 1, 1));
            state.mode = Mode::Alone { peer, host, streak };
            self.trust_stats.alone += 1;
        }
    }

    /// An alone unit whose execution failed goes back to the job's policy: nobody else is
    /// trusted with it just because its trusted peer could not run it.
    pub(super) fn settle_alone(&mut self, unit: u32) {
        let policy = self.policy;
        if self
            .units
            .get(unit)
            .is_some_and(|s| matches!(s.mode, Mode::Alone { .. }))
            && let Some(state) = self.units.get_mut(unit)
            && matches!(state.mode, Mode::Alone { .. })
            && state.tally.is_open()
            && state.tally.in_flight() == 0
        {
            state.tally = Tally::new(policy);
            state.mode = Mode::Replicated;
        }
    }

    /// Judges a closed tally: what the trust table learns from it, and how its result was
    /// validated. `None` when the unit is not decided after all: its alone result goes to a
    /// spot check, or its peer was caught while it ran.
    pub(super) fn judge(&mut self, unit: u32, verdict: &Verdict) -> Option<Validation> {
        let mode = self.units.get(unit).map(|u| u.mode)?;
        if self.trust.is_none() {
            return Some(Validation::Quorum);
        }
        if let (
            Mode::Alone { peer, host, streak },
            Verdict::Accepted {
                digest,
                host_failed,
                ..
            },
        ) = (mode, verdict)
        {
            self.learn_failures(host_failed);
            return self.judge_alone(unit, peer, host, streak, *digest);
        }
        if self.disputed(unit, verdict) {
            return None;
        }
        self.learn(verdict);
        match (mode, verdict) {
            (Mode::Spot { peer, streak, .. }, Verdict::Accepted { agreeing, .. })
                if agreeing.iter().any(|w| w.peer == peer) =>
            {
                self.trust_stats.spot_confirmed += 1;
                Some(Validation::SpotChecked { peer, streak })
            }
            (Mode::Revalidating { caught }, _) => Some(Validation::Revalidated { caught }),
            _ => Some(Validation::Quorum),
        }
    }

    /// A trusted peer outvoted by a bare quorum is not convicted yet: colluders that hold a
    /// quorum between them could make any honest trusted peer look like a liar and have
    /// everything it ran alone run again. The unit wants one more agreeing host first;
    /// returns whether it was reopened for it.
    fn disputed(&mut self, unit: u32, verdict: &Verdict) -> bool {
        let (
            Some(trust),
            Verdict::Accepted {
                agreeing,
                dissenters,
                ..
            },
        ) = (&self.trust, verdict)
        else {
            return false;
        };
        if trust.config().rule != TrustRule::Checked {
            return false;
        }
        let quorum = self.policy.quorum;
        let voted = agreeing.len() + dissenters.len();
        if self.hosts.len() <= voted {
            // No host left to ask: the bare quorum stands.
            return false;
        }
        let trusted_dissent = dissenters
            .iter()
            .any(|v| trust.is_trusted(&v.peer, &v.host));
        if !trusted_dissent || agreeing.len() as u64 > u64::from(quorum) {
            return false;
        }
        let stricter = Policy {
            quorum: quorum + 1,
            replicas: self.policy.replicas.max(quorum + 1),
            ..self.policy
        };
        let Some(state) = self.units.get_mut(unit) else {
            return false;
        };
        if !state.tally.extend(stricter) {
            return false;
        }
        self.trust_stats.disputes += 1;
        self.refresh(unit);
        self.rescan = true;
        true
    }

    fn judge_alone(
        &mut self,
        unit: u32,
        peer: PeerId,
        host: Host,
        streak: u32,
        digest: crate::digest::Digest,
    ) -> Option<Validation> {
        let trust = self.trust.as_ref()?;
        let policy = self.policy;
        if !trust.is_trusted(&peer, &host) {
            // Caught while the unit ran: its word is worth nothing now.
            self.reopen(unit, Mode::Revalidating { caught: peer }, host);
            return None;
        }
        let vouched = trust.is_vouched(&peer);
        let spot = if vouched {
            0.0
        } else {
            trust.spot_chance(streak)
        };
        let standing = (trust.peer(&peer), trust.host(&host));
        if !vouched && let Some(trust) = self.trust.as_mut() {
            trust.spend_alert();
        }
        if self.rng.chance(spot) {
            let checker = self.draw_checker(host);
            let state = self.units.get_mut(unit)?;
            state.tally = spot_tally(policy, peer, host, digest);
            state.mode = Mode::Spot {
                peer,
                host,
                streak,
                checker,
            };
            self.trust_stats.spot_checks += 1;
            self.refresh(unit);
            self.rescan = true;
            return None;
        }
        let state = self.units.get_mut(unit)?;
        state.mode = Mode::Trusted { peer, host };
        self.trust_stats.trusted += 1;
        if vouched {
            return Some(Validation::Vouched { peer });
        }
        let span = self.trust.as_ref().map_or(0, |t| t.config().look_back_span) as usize;
        if span > 0 {
            if self.recent_alone.len() >= span {
                self.recent_alone.pop_front();
            }
            self.recent_alone.push_back(Recent {
                unit,
                peer,
                host,
                streak,
                digest,
                checked: spot,
            });
        }
        Some(Validation::Trusted {
            peer,
            host,
            streak,
            standing,
        })
    }

    /// A host other than `alone`, drawn uniformly among the hosts with peers in this job, to
    /// check a result `alone` returned. The submitter draws it, not the order of requests: a
    /// check handed to whoever asks first could be steered to a colluder that asks all the
    /// time, and one held back until many units wait (as further replicas are) comes late,
    /// after the liar ran many more units alone.
    fn draw_checker(&mut self, alone: Host) -> Option<Host> {
        self.draw_host(&[alone])
    }

    /// A host with peers in this job, none of `excluded`, drawn uniformly.
    fn draw_host(&mut self, excluded: &[Host]) -> Option<Host> {
        let hosts: Vec<Host> = self
            .hosts
            .iter()
            .filter(|(h, s)| !excluded.contains(h) && s.peers > 0)
            .map(|(h, _)| *h)
            .collect();
        self.rng.choose(&hosts).copied()
    }

    /// Spot checks whose checker has run them (a disagreement asks for a further host) or
    /// has left get a checker drawn anew among the hosts that have not run them, so a dispute
    /// over a trusted peer's result is settled as soon as the one it accuses is, not when the
    /// job runs out of fresh units. Every started unit is looked at only when hosts came or
    /// went; a unit's own checker is looked at whenever the unit changes
    /// ([`Scheduler::redraw_checker`]).
    pub(super) fn redraw_checkers(&mut self) {
        if !std::mem::take(&mut self.hosts_changed) {
            return;
        }
        let started: Vec<u32> = self.started.iter().copied().collect();
        for unit in started {
            self.redraw_checker(unit);
        }
    }

    /// Draws `unit`'s checker anew if it is a spot check whose checker has run it or is gone.
    pub(super) fn redraw_checker(&mut self, unit: u32) {
        let Some(state) = self.units.get(unit) else {
            return;
        };
        let Mode::Spot { checker, .. } = state.mode else {
            return;
        };
        let present = checker.is_some_and(|c| {
            self.hosts.get(&c).is_some_and(|h| h.peers > 0)
                && !state.tried.iter().any(|t| t.host == c)
        });
        if present {
            return;
        }
        let tried: Vec<Host> = state.tried.iter().map(|t| t.host).collect();
        let drawn = self.draw_host(&tried);
        if let Some(state) = self.units.get_mut(unit)
            && let Mode::Spot { checker, .. } = &mut state.mode
        {
            *checker = drawn;
        }
    }

    /// How `peer`'s request may take started `unit`: `Some(true)` a spot check drawn for its
    /// host (it goes first, whatever the pool), `Some(false)` a spot check drawn for another
    /// host that is still here (not while fresh units remain), `None` any other unit.
    pub(super) fn spot_for(&self, state: &super::UnitState, host: Host) -> Option<bool> {
        match state.mode {
            Mode::Spot {
                checker: Some(checker),
                ..
            } if self.hosts.get(&checker).is_some_and(|h| h.peers > 0)
                && !state.tried.iter().any(|t| t.host == checker) =>
            {
                Some(checker == host)
            }
            _ => None,
        }
    }

    /// Feeds a replicated verdict to the trust table; a trusted peer among its dissenters is
    /// caught, and everything its host ran alone here is run again.
    fn learn(&mut self, verdict: &Verdict) {
        let Some(trust) = &mut self.trust else {
            return;
        };
        let mut caught = Vec::new();
        match verdict {
            Verdict::Accepted {
                agreeing,
                dissenters,
                host_failed,
                ..
            } => {
                for w in agreeing {
                    trust.agreed(w.peer, w.host);
                }
                for v in dissenters {
                    if trust.dissented(v.peer, v.host) {
                        caught.push((v.peer, v.host));
                    }
                }
                self.learn_failures(host_failed);
            }
            Verdict::Failed { host_failed, .. } => self.learn_failures(host_failed),
        }
        for (peer, host) in caught {
            self.caught(peer, host);
        }
    }

    /// Host failures and expired leases cost the streak, as BOINC has it, but prove no lie.
    fn learn_failures(&mut self, failed: &[Witness]) {
        let Some(trust) = &mut self.trust else {
            return;
        };
        for w in failed {
            trust.erred(w.peer, w.host);
        }
    }

    /// `peer` on `host` was caught: every unit a key of that host ran alone is run again.
    fn caught(&mut self, peer: PeerId, host: Host) {
        self.trust_stats.caught += 1;
        if self
            .trust
            .as_ref()
            .is_some_and(|t| t.config().rule != TrustRule::Checked)
        {
            // BOINC's rule never goes back over what a peer got accepted.
            return;
        }
        tracing::info!(job = %self.job, %peer, %host, "a trusted peer disagreed with a quorum; its alone results are run again");
        // Spot checks still waiting (the one whose verdict caught the peer is decided by that
        // verdict), then every result accepted on the word of a key of this host.
        let mut suspects: Vec<(u32, bool)> = self
            .units
            .live()
            .filter(|(_, u)| {
                matches!(u.mode, Mode::Spot { host: h, .. } if h == host) && u.tally.is_open()
            })
            .map(|(i, _)| (i, false))
            .collect();
        suspects.sort_unstable();
        for unit in self.trusted_alone.remove(&host).unwrap_or_default() {
            if self.units.is_closed(unit) {
                suspects.push((unit, true));
            }
        }
        for (unit, was_accepted) in suspects {
            if was_accepted {
                self.accepted = self.accepted.saturating_sub(1);
                self.trust_stats.revalidated += 1;
                // Its one execution ran on the caught host, which may not run it again.
                let mut state = self.units.blank();
                state.tried.push(super::Try {
                    peer,
                    host,
                    failed: false,
                });
                self.units.reopen(unit, state);
            }
            self.reopen(unit, Mode::Revalidating { caught: peer }, host);
        }
        self.look_back(host);
    }

    /// A catch proves that liars are among the peers, and the results accepted alone just
    /// before it were judged while nobody knew: each of the latest ones, of any other host, is
    /// sent to a spot check with the chance that makes it checked with `look_back_rate` in
    /// all. Its alone answer stays its first vote, as a spot check's does.
    fn look_back(&mut self, caught: Host) {
        let recent = std::mem::take(&mut self.recent_alone);
        let Some(rate) = self.trust.as_ref().map(|t| t.config().look_back_rate) else {
            return;
        };
        if rate <= 0.0 {
            return;
        }
        let mut checked: BTreeMap<Host, BTreeSet<u32>> = BTreeMap::new();
        for r in recent {
            if r.host == caught || !self.units.is_closed(r.unit) || r.checked >= 1.0 {
                continue;
            }
            let more = ((rate - r.checked) / (1.0 - r.checked)).clamp(0.0, 1.0);
            if !self.rng.chance(more) {
                continue;
            }
            let mut state = self.units.blank();
            state.tally = spot_tally(self.policy, r.peer, r.host, r.digest);
            state.tried.push(super::Try {
                peer: r.peer,
                host: r.host,
                failed: false,
            });
            state.mode = Mode::Spot {
                peer: r.peer,
                host: r.host,
                streak: r.streak,
                checker: None,
            };
            self.units.reopen(r.unit, state);
            self.accepted = self.accepted.saturating_sub(1);
            self.trust_stats.spot_checks += 1;
            self.trust_stats.looked_back += 1;
            let checker = self.draw_checker(r.host);
            if let Some(state) = self.units.get_mut(r.unit)
                && let Mode::Spot { checker: c, .. } = &mut state.mode
            {
                *c = checker;
            }
            checked.entry(r.host).or_default().insert(r.unit);
            self.checks_waiting.push_back(r.unit);
        }
        // Sent to a check, they no longer rest on their peer's word alone.
        for (host, units) in checked {
            if let Some(list) = self.trusted_alone.get_mut(&host) {
                list.retain(|u| !units.contains(u));
            }
        }
        self.rescan = true;
    }

    /// Lets units a catch sent to spot checks join the started ones while fewer than half the
    /// backlog wait there: a dispatch looks at every started unit for every peer with room, so
    /// the thousands of checks one catch may send must not all wait there at once.
    pub(super) fn release_checks(&mut self) {
        let cap = (self.config.max_backlog / 2).max(1);
        while self.started.len() < cap {
            let Some(unit) = self.checks_waiting.pop_front() else {
                break;
            };
            self.refresh(unit);
            self.rescan = true;
        }
    }

    /// Opens `unit` again under the job's policy with the votes of `caught`'s host dropped;
    /// the other votes stand, the peers that ran it stay excluded from it, and executions still
    /// running go on counting.
    fn reopen(&mut self, unit: u32, mode: Mode, caught: Host) {
        let policy = self.policy;
        if let Some(state) = self.units.get_mut(unit) {
            let mut tally = Tally::new(policy);
            let mut settled = None;
            for v in state.tally.votes().iter().filter(|v| v.host != caught) {
                if tally.start().is_ok()
                    && let Ok(Some(verdict)) =
                        tally.record(v.peer, v.host, Outcome::Output(v.digest))
                {
                    // The votes that stand are a quorum already.
                    settled = Some(verdict);
                }
            }
            if let Some(verdict) = settled {
                self.settled.push((unit, verdict));
            }
            for _ in 0..state.active.len() {
                let _ = tally.start();
            }
            state.tally = tally;
            state.mode = mode;
        }
        self.refresh(unit);
        self.rescan = true;
    }

    /// The peer and host of a result accepted alone that have been caught since it was
    /// accepted (in this job or another): such a result is suspect.
    pub(super) fn suspect(&self, validation: &Validation) -> Option<(PeerId, Host)> {
        let Validation::Trusted {
            peer,
            host,
            standing,
            ..
        } = *validation
        else {
            return None;
        };
        let trust = self.trust.as_ref()?;
        let since = trust.peer(&peer).caught > standing.0.caught
            || trust.host(&host).caught > standing.1.caught;
        since.then_some((peer, host))
    }

    /// A unit read back from the journal as accepted on the word of `peer`, since caught: it
    /// runs again, never on that peer's host.
    pub(super) fn revalidate_restored(&mut self, unit: u32, peer: PeerId, host: Host) {
        if let Some(state) = self.units.get_mut(unit) {
            state.tried.push(super::Try {
                peer,
                host,
                failed: false,
            });
        }
        self.trust_stats.revalidated += 1;
        self.reopen(unit, Mode::Revalidating { caught: peer }, host);
    }

    /// A unit read back from the journal as accepted alone, still trusted: a catch later in
    /// this job runs it again.
    pub(super) fn restore_mode(&mut self, unit: u32, validation: &Validation) {
        if let Validation::Trusted { host, .. } = validation {
            self.trusted_alone.entry(*host).or_default().push(unit);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Instant;

    use super::*;
    use crate::digest::Digest;
    use crate::schedule::{Command, Config, Event, LeaseResult};
    use crate::validate::trust::TrustConfig;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    fn host(n: u8) -> Host {
        Host::Local(std::net::IpAddr::from([10, 0, 0, n]))
    }

    fn out(unit: u32) -> Outcome {
        Outcome::Output(Digest::of(&unit.to_le_bytes()))
    }

    /// A trust table in which peers 1..=n, each on host n, have `streak` agreements.
    fn trusted(n: u8, streak: u32) -> Trust {
        let mut trust = Trust::new(TrustConfig {
            spot_floor: 0.0,
            ..TrustConfig::default()
        });
        for p in 1..=n {
            for _ in 0..streak {
                trust.agreed(peer(p), host(p));
            }
        }
        trust
    }

    fn scheduler(units: u32, trust: Trust) -> Scheduler {
        Scheduler::new(
            Digest::of(b"adaptive"),
            units,
            Policy::new(2, 2, 6),
            Config::default(),
            7,
        )
        .with_trust(Some(trust))
    }

    /// Answers every lease offered to `p` with the right output (or `lie` for unit 0 when
    /// given); returns the commands that were not offers.
    fn answer_all(s: &mut Scheduler, now: Instant, lie: Option<(PeerId, Outcome)>) -> Vec<Command> {
        let mut other = Vec::new();
        for _ in 0..100 {
            let commands: Vec<Command> = std::iter::from_fn(|| s.poll_command()).collect();
            if commands.is_empty() {
                break;
            }
            for c in commands {
                match c {
                    Command::Offer { to, leases, .. } => {
                        let results = leases
                            .iter()
                            .map(|l| LeaseResult {
                                lease: l.id,
                                outcome: match lie {
                                    Some((liar, wrong)) if liar == to => wrong,
                                    _ => out(l.unit),
                                },
                            })
                            .collect();
                        s.handle(Event::Results { from: to, results }, now);
                    }
                    other_command => other.push(other_command),
                }
            }
        }
        other
    }

    fn available(s: &mut Scheduler, p: u8, slots: u32, now: Instant) {
        s.handle(
            Event::Available {
                peer: peer(p),
                slots,
                host: host(p),
            },
            now,
        );
    }

    #[test]
    fn a_trusted_peer_runs_units_alone_and_a_fresh_key_on_its_host_does_not() {
        let now = Instant::now();
        let mut s = scheduler(200, trusted(1, 1000));
        available(&mut s, 1, 200, now);
        let decided = answer_all(&mut s, now, None);
        let alone = decided
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Decided {
                        validation: Validation::Trusted { .. },
                        ..
                    }
                )
            })
            .count();
        assert!(alone >= 190, "{alone} of 200 accepted on the peer's word");

        // A new key on host 1 has no streak of its own: it gets nothing alone.
        let mut s = scheduler(50, trusted(1, 1000));
        s.handle(
            Event::Available {
                peer: peer(9),
                slots: 50,
                host: host(1),
            },
            now,
        );
        let decided = answer_all(&mut s, now, None);
        assert!(
            decided
                .iter()
                .all(|c| !matches!(c, Command::Decided { .. }))
        );
        assert_eq!(s.trust_stats().alone, 0);
    }

    #[test]
    fn a_spot_check_goes_to_the_host_the_submitter_drew() {
        let now = Instant::now();
        let mut trust = Trust::new(TrustConfig {
            spot_floor: 1.0,
            ..TrustConfig::default()
        });
        for _ in 0..1000 {
            trust.agreed(peer(1), host(1));
        }
        let mut s = scheduler(400, trust);
        // Hosts 2–5 are in the job but busy; peer 1 runs twenty units alone, each checked.
        for p in 2..=5 {
            available(&mut s, p, 0, now);
        }
        available(&mut s, 1, 20, now);
        let _ = answer_all(&mut s, now, None);
        let checker_of = |s: &Scheduler, unit: u32| match s.units.get(unit).map(|u| u.mode) {
            Some(Mode::Spot { checker, .. }) => checker,
            _ => None,
        };
        let spots: Vec<(u32, Host)> = (0..400)
            .filter_map(|u| checker_of(&s, u).map(|c| (u, c)))
            .collect();
        assert!(spots.len() >= 15, "{} spot checks", spots.len());
        let drawn: BTreeSet<Host> = spots.iter().map(|(_, c)| *c).collect();
        assert!(
            drawn.len() >= 3,
            "checkers spread over the hosts: {drawn:?}"
        );
        assert!(!drawn.contains(&host(1)), "never the peer's own host");
        // Host 2 asks for work while hundreds of fresh units remain: it gets its own checks
        // at once, and none of the others'.
        available(&mut s, 2, 20, now);
        let mut offered = Vec::new();
        while let Some(c) = s.poll_command() {
            if let Command::Offer { to, leases, .. } = c {
                assert_eq!(to, peer(2));
                offered.extend(leases.iter().map(|l| l.unit));
            }
        }
        for (unit, checker) in &spots {
            assert_eq!(
                offered.contains(unit),
                *checker == host(2),
                "unit {unit} drawn for {checker:?}"
            );
        }
    }

    #[test]
    fn a_catch_sends_what_other_hosts_just_ran_alone_to_spot_checks() {
        let now = Instant::now();
        // Peers 1–4 just trusted (streak 10), peer 5 long trusted (spot chance 1/1000).
        let mut trust = trusted(4, 10);
        for _ in 0..1000 {
            trust.agreed(peer(5), host(5));
        }
        let mut s = scheduler(60, trust);
        available(&mut s, 5, 20, now);
        let first = answer_all(&mut s, now, None);
        let alone_5: BTreeSet<u32> = first
            .iter()
            .filter_map(|c| match c {
                Command::Decided {
                    unit,
                    validation: Validation::Trusted { peer: p, .. },
                    ..
                } if *p == peer(5) => Some(*unit),
                _ => None,
            })
            .collect();
        assert!(
            alone_5.len() >= 18,
            "{} accepted on peer 5's word",
            alone_5.len()
        );
        // Peer 1 lies on everything and is caught by peers 2–4: peer 5's results, accepted
        // alone just before, are checked by another host after all, and stand.
        let lie = Outcome::Output(Digest::of(b"a lie"));
        available(&mut s, 1, 40, now);
        let _ = answer_all(&mut s, now, Some((peer(1), lie)));
        let mut after = Vec::new();
        for p in [2, 3, 4, 5] {
            available(&mut s, p, 40, now);
            after.extend(answer_all(&mut s, now, Some((peer(1), lie))));
        }
        assert!(s.trust_stats().caught >= 1, "{:?}", s.trust_stats());
        assert_eq!(s.trust_stats().looked_back, alone_5.len() as u64);
        let checked: BTreeSet<u32> = after
            .iter()
            .filter_map(|c| match c {
                Command::Decided {
                    unit,
                    validation: Validation::SpotChecked { peer: p, .. },
                    verdict,
                } if *p == peer(5) => {
                    assert_eq!(verdict.digest(), Some(Digest::of(&unit.to_le_bytes())));
                    Some(*unit)
                }
                _ => None,
            })
            .collect();
        assert_eq!(checked, alone_5);
        assert!(s.trust().unwrap().is_trusted(&peer(5), &host(5)));
        assert!(s.is_finished(), "{:?} {:?}", s.trust_stats(), s.progress());
        assert_eq!(s.progress().accepted, 60);
    }

    #[test]
    fn a_caught_peer_has_everything_it_ran_alone_run_again() {
        let now = Instant::now();
        // Four peers just trusted (streak 10): nine units in ten run alone.
        let mut s = scheduler(40, trusted(4, 10));
        // Peer 1 takes every unit and lies on all of them: those it runs alone are accepted on
        // its word for now.
        let lie = Outcome::Output(Digest::of(b"a lie"));
        available(&mut s, 1, 40, now);
        let first = answer_all(&mut s, now, Some((peer(1), lie)));
        let trusted_units: Vec<u32> = first
            .iter()
            .filter_map(|c| match c {
                Command::Decided {
                    unit,
                    validation: Validation::Trusted { .. },
                    ..
                } => Some(*unit),
                _ => None,
            })
            .collect();
        assert!(
            (20..40).contains(&trusted_units.len()),
            "{} accepted alone",
            trusted_units.len()
        );
        // The others settle the units it did not run alone and catch it: every unit it ran
        // alone is run again by them and decided a second time.
        for p in [2, 3, 4] {
            available(&mut s, p, 40, now);
        }
        let after = answer_all(&mut s, now, Some((peer(1), lie)));
        assert!(s.trust_stats().caught >= 1, "{:?}", s.trust_stats());
        assert!(
            s.trust_stats().disputes >= 1,
            "conviction took a fourth host"
        );
        let mut second: Vec<u32> = after
            .iter()
            .filter_map(|c| match c {
                Command::Decided {
                    unit,
                    validation: Validation::Revalidated { caught },
                    verdict,
                } if *caught == peer(1) => {
                    assert_eq!(verdict.digest(), Some(Digest::of(&unit.to_le_bytes())));
                    Some(*unit)
                }
                _ => None,
            })
            .collect();
        second.sort_unstable();
        for u in &trusted_units {
            assert!(second.contains(u), "unit {u} was not run again");
        }
        assert!(!s.trust().unwrap().is_trusted(&peer(1), &host(1)));
        assert!(s.is_finished(), "{:?} {:?}", s.trust_stats(), s.progress());
        assert_eq!(s.progress().accepted, 40);
    }

    #[test]
    fn a_journaled_result_of_a_peer_caught_since_is_run_again() {
        let now = Instant::now();
        let mut trust = trusted(1, 1000);
        let standing = (trust.peer(&peer(1)), trust.host(&host(1)));
        let accepted = Verdict::Accepted {
            digest: Digest::of(b"x"),
            agreeing: vec![Witness {
                peer: peer(1),
                host: host(1),
            }],
            dissenters: Vec::new(),
            host_failed: Vec::new(),
        };
        let validation = Validation::Trusted {
            peer: peer(1),
            host: host(1),
            streak: 1000,
            standing,
        };
        // Still trusted: restored.
        let mut s = scheduler(2, trust.clone());
        assert!(s.restore_with(0, accepted.clone(), validation).unwrap());
        // Caught since (in another job): the unit runs again, never on host 1.
        assert!(trust.dissented(peer(1), host(1)));
        let mut s = scheduler(2, trust);
        assert!(!s.restore_with(0, accepted, validation).unwrap());
        assert_eq!(s.trust_stats().revalidated, 1);
        available(&mut s, 1, 10, now);
        for c in std::iter::from_fn(|| s.poll_command()) {
            if let Command::Offer { leases, .. } = c {
                assert!(
                    leases.iter().all(|l| l.unit != 0),
                    "unit 0 went back to host 1"
                );
            }
        }
    }
}
