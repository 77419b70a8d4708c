//! Trust a submitter earns for the peers it has checked, for adaptive replication.
//!
//! A peer's *streak* is its run of consecutive results that agreed with a quorum of other
//! hosts — replicated results, never the ones it ran alone, which nobody compared. Any
//! disagreement, host failure or expired lease resets it. The same is kept per host, fed by
//! every key of the host, and a peer counts as trusted only as far as both go: its standing is
//! `min(peer streak, host streak)`. So a fresh key on a trusted host starts from nothing, and a
//! host cannot multiply its trust with keys — one lying key resets every key of its host.
//!
//! From a standing `s` at or above the threshold (10, as BOINC has it), a fresh unit runs
//! alone on that peer with probability `1 − 1/s`. Under our rule a peer or host that was caught
//! `k` times needs `threshold × 4^k` agreements in a row before it is trusted again: a liar
//! that lies now and then rebuilds a short streak easily (ten in a row at a 5 % lie rate happen
//! six times in ten), forty only one time in eight and 160 almost never, while an honest
//! host-mate of a caught key pays once, with forty replicated results. What happens to a unit run alone depends on
//! the [`TrustRule`]:
//!
//! * [`TrustRule::Boinc`] — BOINC's adaptive replication: the result is accepted on the
//!   peer's word, and never looked at again.
//! * [`TrustRule::Checked`] — ours: the result is *provisional*. With probability
//!   `max(1/s, floor)` another host re-runs it before the job ends (a spot check); an agreeing
//!   spot check counts to the streak like any replicated result. A peer caught — by a spot
//!   check, or by losing any quorum — loses its trust and its host's, and every unit it (or
//!   another key of its host) ran alone is run again, replicated, so a lie accepted on trust
//!   does not survive its author being caught. A catch is also evidence that liars are about,
//!   and the submitter stops taking anyone's word alone on both sides of it: the last
//!   `look_back_span` results accepted alone before it (any other host's) are spot-checked
//!   after all (`look_back_rate`), and so are the next `alert_span` units run alone
//!   (`alert_rate`).
//!   A liar that behaved until now is caught at its first lie near a catch, and with it every
//!   unit it ran alone is run again. Among honest peers nothing is ever caught, and neither
//!   costs anything.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::host::Host;
use crate::peer_id::PeerId;

/// What becomes of a unit run alone on a trusted peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrustRule {
    /// Accepted on the peer's word for good (BOINC's adaptive replication).
    Boinc,
    /// Provisional: spot-checked with probability `max(1/s, floor)`, and run again
    /// replicated when its peer or host is caught.
    Checked,
}

/// How trust is earned and spent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrustConfig {
    pub rule: TrustRule,
    /// Agreeing replicated results in a row before a peer may run units alone.
    pub threshold: u32,
    /// The least probability of a spot check of a unit run alone ([`TrustRule::Checked`]).
    pub spot_floor: f64,
    /// Each time a peer or host was caught multiplies the streak it needs by this
    /// ([`TrustRule::Checked`]; 1 keeps the threshold flat, as BOINC does).
    pub catch_factor: u32,
    /// Whether a host failure or an expired lease resets the streak, as BOINC has it. Ours
    /// leaves it: a crash proves nothing about honesty, and the scheduler already gives an
    /// unreliable peer fewer leases.
    pub reset_on_error: bool,
    /// After a catch, every unit run alone is spot-checked with at least this probability
    /// ([`TrustRule::Checked`]) ...
    pub alert_rate: f64,
    /// ... for this many alone results judged after the latest catch.
    pub alert_span: u32,
    /// A catch also looks back: each of the last `look_back_span` results accepted alone on
    /// another host's word in this job is sent to a spot check, so that it has been checked
    /// with at least this probability in all ([`TrustRule::Checked`]; 0 never looks back).
    pub look_back_rate: f64,
    /// How many of the latest results accepted alone a catch looks back at.
    pub look_back_span: u32,
}

impl TrustConfig {
    /// BOINC's adaptive replication.
    pub fn boinc() -> Self {
        Self {
            rule: TrustRule::Boinc,
            reset_on_error: true,
            alert_rate: 0.0,
            alert_span: 0,
            look_back_rate: 0.0,
            look_back_span: 0,
            ..Self::default()
        }
    }
}

impl Default for TrustConfig {
    fn default() -> Self {
        Self {
            rule: TrustRule::Checked,
            threshold: 10,
            spot_floor: 0.05,
            catch_factor: 4,
            reset_on_error: false,
            alert_rate: 1.0,
            alert_span: 2_000,
            look_back_rate: 1.0,
            look_back_span: 100_000,
        }
    }
}

/// One peer's or one host's record with this submitter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    /// Consecutive replicated results that agreed with a quorum of other hosts.
    pub streak: u32,
    /// Times it was caught: a disagreement while it was trusted.
    pub caught: u32,
}

/// Most peers (and, separately, hosts) a trust table holds; past it, new ones start untrusted
/// and are not remembered.
pub const MAX_TRUSTED: usize = 65_536;

/// The trust table of one submitter: per peer and per host.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    config: TrustConfig,
    peers: BTreeMap<PeerId, Standing>,
    hosts: BTreeMap<Host, Standing>,
    /// Entries changed since the last [`Trust::take_changes`], to be persisted.
    changed_peers: BTreeSet<PeerId>,
    changed_hosts: BTreeSet<Host>,
    /// Peers the operator vouches for (a lab's own machines): they run units alone without
    /// spot checks, whatever their streak.
    vouched: BTreeSet<PeerId>,
    /// Alone results still to judge at the raised spot-check rate since the latest catch.
    alert: u32,
    alert_changed: bool,
}

/// Entries of a trust table that changed, to persist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustChanges {
    pub peers: Vec<(PeerId, Standing)>,
    pub hosts: Vec<(Host, Standing)>,
    /// The alert left, when it changed.
    pub alert: Option<u32>,
}

impl TrustChanges {
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty() && self.hosts.is_empty() && self.alert.is_none()
    }
}

impl Trust {
    pub fn new(config: TrustConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    pub fn config(&self) -> &TrustConfig {
        &self.config
    }

    /// Vouches for `peers`: a lab's own machines, named by the operator.
    pub fn vouch(&mut self, peers: impl IntoIterator<Item = PeerId>) {
        self.vouched.extend(peers);
    }

    pub fn is_vouched(&self, peer: &PeerId) -> bool {
        self.vouched.contains(peer)
    }

    /// Restores a persisted peer entry.
    pub fn restore_peer(&mut self, peer: PeerId, standing: Standing) {
        if self.peers.len() < MAX_TRUSTED || self.peers.contains_key(&peer) {
            self.peers.insert(peer, standing);
        }
    }

    /// Restores a persisted host entry.
    pub fn restore_host(&mut self, host: Host, standing: Standing) {
        if self.hosts.len() < MAX_TRUSTED || self.hosts.contains_key(&host) {
            self.hosts.insert(host, standing);
        }
    }

    pub fn peer(&self, peer: &PeerId) -> Standing {
        self.peers.get(peer).copied().unwrap_or_default()
    }

    pub fn host(&self, host: &Host) -> Standing {
        self.hosts.get(host).copied().unwrap_or_default()
    }

    /// What `peer` on `host` may be trusted with: the lesser of the two streaks.
    pub fn streak(&self, peer: &PeerId, host: &Host) -> u32 {
        self.peer(peer).streak.min(self.host(host).streak)
    }

    /// The streak a record caught `caught` times needs before it is trusted.
    pub fn required(&self, caught: u32) -> u32 {
        let threshold = self.config.threshold.max(1);
        match self.config.rule {
            TrustRule::Boinc => threshold,
            TrustRule::Checked => {
                threshold.saturating_mul(self.config.catch_factor.max(1).saturating_pow(caught))
            }
        }
    }

    /// Whether `peer` on `host` has earned the right to run units alone: both streaks reach
    /// what their own record of catches asks.
    pub fn is_trusted(&self, peer: &PeerId, host: &Host) -> bool {
        if self.is_vouched(peer) {
            return true;
        }
        let (p, h) = (self.peer(peer), self.host(host));
        p.streak >= self.required(p.caught) && h.streak >= self.required(h.caught)
    }

    /// The probability that a fresh unit offered to `peer` runs there alone: `1 − 1/s` for a
    /// trusted standing `s`, else 0.
    pub fn alone_chance(&self, peer: &PeerId, host: &Host) -> f64 {
        if self.is_vouched(peer) {
            return 1.0;
        }
        if !self.is_trusted(peer, host) {
            return 0.0;
        }
        1.0 - 1.0 / f64::from(self.streak(peer, host))
    }

    /// The probability that a unit run alone at standing `streak` is spot-checked: the
    /// larger of `1/streak` and the floor, and of the alert rate while a recent catch raised it.
    pub fn spot_chance(&self, streak: u32) -> f64 {
        match self.config.rule {
            TrustRule::Boinc => 0.0,
            TrustRule::Checked => {
                let alert = if self.alert > 0 {
                    self.config.alert_rate
                } else {
                    0.0
                };
                (1.0 / f64::from(streak.max(1)))
                    .max(self.config.spot_floor)
                    .max(alert)
            }
        }
    }

    /// Alone results still to judge at the raised rate.
    pub fn alert(&self) -> u32 {
        self.alert
    }

    /// Restores a persisted alert.
    pub fn restore_alert(&mut self, alert: u32) {
        self.alert = alert.min(self.config.alert_span);
    }

    /// An alone result was judged: one less to go at the raised rate.
    pub fn spend_alert(&mut self) {
        if self.alert > 0 {
            self.alert -= 1;
            self.alert_changed = true;
        }
    }

    /// A replicated result of `peer` on `host` agreed with the accepted quorum.
    pub fn agreed(&mut self, peer: PeerId, host: Host) {
        self.update_peer(peer, |s| s.streak = s.streak.saturating_add(1));
        self.update_host(host, |s| s.streak = s.streak.saturating_add(1));
    }

    /// An execution of `peer` on `host` ended in a host failure or an expired lease: the
    /// streak starts over, but nothing was proved against it.
    pub fn erred(&mut self, peer: PeerId, host: Host) {
        if !self.config.reset_on_error {
            return;
        }
        self.update_peer(peer, |s| s.streak = 0);
        self.update_host(host, |s| s.streak = 0);
    }

    /// `peer` on `host` answered something the accepted quorum did not. Returns whether it
    /// was trusted until now: caught.
    pub fn dissented(&mut self, peer: PeerId, host: Host) -> bool {
        let caught = self.is_trusted(&peer, &host);
        self.update_peer(peer, |s| {
            s.streak = 0;
            if caught {
                s.caught = s.caught.saturating_add(1);
            }
        });
        self.update_host(host, |s| {
            s.streak = 0;
            if caught {
                s.caught = s.caught.saturating_add(1);
            }
        });
        if caught && self.config.rule == TrustRule::Checked && self.config.alert_span > 0 {
            self.alert = self.config.alert_span;
            self.alert_changed = true;
        }
        caught
    }

    /// The entries changed since the last call.
    pub fn take_changes(&mut self) -> TrustChanges {
        let peers = std::mem::take(&mut self.changed_peers)
            .into_iter()
            .map(|p| (p, self.peer(&p)))
            .collect();
        let hosts = std::mem::take(&mut self.changed_hosts)
            .into_iter()
            .map(|h| (h, self.host(&h)))
            .collect();
        let alert = std::mem::take(&mut self.alert_changed).then_some(self.alert);
        TrustChanges {
            peers,
            hosts,
            alert,
        }
    }

    fn update_peer(&mut self, peer: PeerId, change: impl FnOnce(&mut Standing)) {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_TRUSTED {
            return;
        }
        change(self.peers.entry(peer).or_default());
        self.changed_peers.insert(peer);
    }

    fn update_host(&mut self, host: Host, change: impl FnOnce(&mut Standing)) {
        if !self.hosts.contains_key(&host) && self.hosts.len() >= MAX_TRUSTED {
            return;
        }
        change(self.hosts.entry(host).or_default());
        self.changed_hosts.insert(host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    fn host(n: u8) -> Host {
        Host::Local(std::net::IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn trust_needs_ten_agreements_in_a_row_on_the_peer_and_its_host() {
        let mut trust = Trust::new(TrustConfig::default());
        for i in 0..9 {
            trust.agreed(peer(1), host(1));
            assert!(!trust.is_trusted(&peer(1), &host(1)), "after {}", i + 1);
        }
        trust.agreed(peer(1), host(1));
        assert!(trust.is_trusted(&peer(1), &host(1)));
        assert!((trust.alone_chance(&peer(1), &host(1)) - 0.9).abs() < 1e-9);
        // A fresh key on the trusted host inherits nothing.
        assert!(!trust.is_trusted(&peer(2), &host(1)));
        assert_eq!(trust.alone_chance(&peer(2), &host(1)), 0.0);
        // The trusted key seen from another host has that host's standing.
        assert!(!trust.is_trusted(&peer(1), &host(2)));
    }

    #[test]
    fn one_failing_key_resets_its_whole_host() {
        let mut trust = Trust::new(TrustConfig::default());
        for _ in 0..20 {
            trust.agreed(peer(1), host(1));
            trust.agreed(peer(2), host(1));
        }
        assert!(trust.is_trusted(&peer(1), &host(1)));
        assert!(trust.is_trusted(&peer(2), &host(1)));
        assert!(trust.dissented(peer(2), host(1)), "caught while trusted");
        assert!(!trust.is_trusted(&peer(1), &host(1)), "its host mate too");
        assert_eq!(trust.peer(&peer(2)).caught, 1);
        assert_eq!(trust.host(&host(1)).caught, 1);
        // Failing again while untrusted is not being caught.
        assert!(!trust.dissented(peer(2), host(1)));
        assert_eq!(trust.peer(&peer(2)).caught, 1);
    }

    #[test]
    fn each_catch_quadruples_the_streak_trust_needs_again() {
        let mut trust = Trust::new(TrustConfig::default());
        let mut boinc = Trust::new(TrustConfig::boinc());
        for t in [&mut trust, &mut boinc] {
            for _ in 0..10 {
                t.agreed(peer(1), host(1));
            }
            assert!(t.dissented(peer(1), host(1)), "caught while trusted");
            for _ in 0..39 {
                t.agreed(peer(1), host(1));
            }
        }
        assert!(!trust.is_trusted(&peer(1), &host(1)), "39 of the 40 asked");
        assert!(boinc.is_trusted(&peer(1), &host(1)), "BOINC asks ten again");
        trust.agreed(peer(1), host(1));
        assert!(trust.is_trusted(&peer(1), &host(1)));
        // The alone chance still follows the streak itself.
        assert!((trust.alone_chance(&peer(1), &host(1)) - (1.0 - 1.0 / 40.0)).abs() < 1e-9);
        // Caught again: 160.
        assert!(trust.dissented(peer(1), host(1)));
        for _ in 0..159 {
            trust.agreed(peer(1), host(1));
        }
        assert!(!trust.is_trusted(&peer(1), &host(1)));
        trust.agreed(peer(1), host(1));
        assert!(trust.is_trusted(&peer(1), &host(1)));
        assert_eq!(trust.required(40), u32::MAX, "no overflow");
    }

    #[test]
    fn spot_checks_follow_the_rule() {
        let checked = Trust::new(TrustConfig::default());
        assert!((checked.spot_chance(10) - 0.1).abs() < 1e-9);
        assert!((checked.spot_chance(1000) - 0.05).abs() < 1e-9, "the floor");
        let boinc = Trust::new(TrustConfig::boinc());
        assert_eq!(boinc.spot_chance(10), 0.0);
    }

    #[test]
    fn errors_reset_the_streak_under_boincs_rule_only() {
        let mut boinc = Trust::new(TrustConfig::boinc());
        let mut ours = Trust::new(TrustConfig::default());
        for _ in 0..12 {
            boinc.agreed(peer(1), host(1));
            ours.agreed(peer(1), host(1));
        }
        boinc.erred(peer(1), host(1));
        ours.erred(peer(1), host(1));
        assert_eq!(boinc.streak(&peer(1), &host(1)), 0);
        assert_eq!(ours.streak(&peer(1), &host(1)), 12);
    }

    #[test]
    fn a_catch_raises_every_spot_check_for_a_span() {
        let config = TrustConfig {
            alert_rate: 0.5,
            alert_span: 3,
            ..TrustConfig::default()
        };
        let mut trust = Trust::new(config);
        assert_eq!(trust.spot_chance(1_000), 0.05);
        // An untrusted peer's disagreement is no catch: nothing is raised.
        assert!(!trust.dissented(peer(2), host(2)));
        assert_eq!(trust.spot_chance(1_000), 0.05);
        for _ in 0..10 {
            trust.agreed(peer(1), host(1));
        }
        assert!(trust.dissented(peer(1), host(1)));
        assert_eq!(trust.take_changes().alert, Some(3));
        for left in [2, 1, 0] {
            assert_eq!(trust.spot_chance(1_000), 0.5);
            trust.spend_alert();
            assert_eq!(trust.alert(), left);
        }
        assert_eq!(trust.spot_chance(1_000), 0.05);
        assert_eq!(trust.take_changes().alert, Some(0));
        trust.spend_alert();
        assert_eq!(trust.take_changes(), TrustChanges::default());
        // BOINC's rule has no spot checks to raise.
        let mut boinc = Trust::new(TrustConfig::boinc());
        for _ in 0..10 {
            boinc.agreed(peer(1), host(1));
        }
        assert!(boinc.dissented(peer(1), host(1)));
        assert_eq!(boinc.alert(), 0);
        assert_eq!(boinc.spot_chance(1), 0.0);
    }

    #[test]
    fn changes_are_handed_over_once() {
        let mut trust = Trust::new(TrustConfig::default());
        trust.agreed(peer(1), host(1));
        let changes = trust.take_changes();
        assert_eq!(
            changes.peers,
            vec![(
                peer(1),
                Standing {
                    streak: 1,
                    caught: 0
                }
            )]
        );
        assert_eq!(
            changes.hosts,
            vec![(
                host(1),
                Standing {
                    streak: 1,
                    caught: 0
                }
            )]
        );
        assert_eq!(trust.take_changes(), TrustChanges::default());
    }
}
