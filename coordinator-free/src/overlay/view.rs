//! The two views and the rules that keep them diverse: a cap per host in each, and eviction
//! that keeps the peers with the longest history.
//!
//! Both views are short vectors (tens of entries), so a linear scan beats any index.

use std::time::Instant;

use super::message::PeerInfo;
use crate::host::Host;
use crate::peer_id::PeerId;
use crate::rng::Rng;

/// A neighbour: a peer with an open connection that both sides count as active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveEntry {
    pub info: PeerInfo,
    /// From the connection's remote address, not from anything the peer said.
    pub host: Host,
    /// Whether this peer chose the neighbour itself (from its passive view or its contact),
    /// rather than being asked by it or handed it by someone's random walk.
    pub outbound: bool,
    /// When the neighbour entered the view.
    pub since: Instant,
    /// When this peer first heard of the neighbour (as a passive entry, or when it asked).
    pub known_since: Instant,
}

impl ActiveEntry {
    /// An identity first heard of after `settled`: one of a flood's, or a newcomer's.
    pub fn is_young(&self, settled: Instant) -> bool {
        self.known_since > settled
    }
}

/// A peer known by address only, kept for repairs and shuffles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveEntry {
    pub info: PeerInfo,
    /// From the address it was advertised with; confirmed only once a connection is made.
    pub host: Host,
    pub first_seen: Instant,
    /// Whether this peer once held a connection with it (it was a neighbour).
    pub verified: bool,
    /// When this peer last asked it to be a neighbour.
    pub asked: Option<Instant>,
    /// Whether its host is crowded (`crowd.rs`): such entries rank last.
    pub crowded: bool,
}

impl PassiveEntry {
    /// Orders entries by how much history they carry: those first heard of before `settled`
    /// first, and among them those that were neighbours. Having been a neighbour counts only
    /// for a settled identity: a flood's identities get inbound slots and are sent back to
    /// the passive view all the time. Within a rank all are alike, so picks spread over the
    /// view instead of all peers asking the same longest-known few. An entry from a crowded
    /// host ranks below all others, whatever its history.
    fn history(&self, settled: Instant) -> (bool, bool, bool) {
        let old = self.first_seen <= settled;
        (!self.crowded, old, old && self.verified)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ActiveView {
    pub entries: Vec<ActiveEntry>,
}

impl ActiveView {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, id: &PeerId) -> bool {
        self.entries.iter().any(|e| e.info.id == *id)
    }

    #[cfg(test)]
    pub fn get(&self, id: &PeerId) -> Option<&ActiveEntry> {
        self.entries.iter().find(|e| e.info.id == *id)
    }

    pub fn remove(&mut self, id: &PeerId) -> Option<ActiveEntry> {
        let at = self.entries.iter().position(|e| e.info.id == *id)?;
        Some(self.entries.swap_remove(at))
    }

    pub fn per_host(&self, host: &Host) -> usize {
        self.entries.iter().filter(|e| e.host == *host).count()
    }

    pub fn outbound(&self) -> usize {
        self.entries.iter().filter(|e| e.outbound).count()
    }

    /// Inbound neighbours whose identity is young.
    pub fn young_inbound(&self, settled: Instant) -> usize {
        self.entries
            .iter()
            .filter(|e| !e.outbound && e.is_young(settled))
            .count()
    }

    /// A young inbound neighbour drawn at random: the only kind a young identity may displace.
    pub fn young_victim(&self, rng: &mut Rng, settled: Instant) -> Option<PeerId> {
        let young: Vec<PeerId> = self
            .entries
            .iter()
            .filter(|e| !e.outbound && e.is_young(settled))
            .map(|e| e.info.id)
            .collect();
        rng.choose(&young).copied()
    }

    /// The inbound neighbour to give up for a newcomer: one drawn among those that joined after
    /// `established_since`, so a burst of new identities mostly displaces itself; with
    /// `or_established`, one drawn among all inbound neighbours when no such one is left.
    /// Outbound neighbours never go.
    pub fn inbound_victim(
        &self,
        rng: &mut Rng,
        established_since: Instant,
        or_established: bool,
    ) -> Option<PeerId> {
        let young = |e: &&ActiveEntry| !e.outbound && e.since > established_since;
        let count = self.entries.iter().filter(young).count();
        if count > 0 {
            return self
                .entries
                .iter()
                .filter(young)
                .nth(rng.index(count))
                .map(|e| e.info.id);
        }
        if !or_established {
            return None;
        }
        let inbound = self.entries.iter().filter(|e| !e.outbound).count();
        self.entries
            .iter()
            .filter(|e| !e.outbound)
            .nth(rng.index(inbound))
            .map(|e| e.info.id)
    }

    /// A uniformly drawn neighbour other than `except`.
    pub fn random_except(&self, rng: &mut Rng, except: Option<&PeerId>) -> Option<PeerInfo> {
        let n = self.entries.len() - usize::from(except.is_some_and(|x| self.contains(x)));
        let mut k = rng.index(n);
        for e in &self.entries {
            if Some(&e.info.id) == except {
                continue;
            }
            if k == 0 {
                return Some(e.info);
            }
            k -= 1;
        }
        None
    }
}

#[derive(Debug, Clone, Default)]
pub struct PassiveView {
    pub entries: Vec<PassiveEntry>,
}

impl PassiveView {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn contains(&self, id: &PeerId) -> bool {
        self.entries.iter().any(|e| e.info.id == *id)
    }

    pub fn remove(&mut self, id: &PeerId) -> Option<PassiveEntry> {
        let at = self.entries.iter().position(|e| e.info.id == *id)?;
        Some(self.entries.swap_remove(at))
    }

    /// Adds `entry` under the view's cap and the per-host cap. A full view makes room by
    /// dropping an entry drawn from `prefer_drop` if there is one with no more history than
    /// the newcomer (the peers just sent away in a shuffle, as the paper does; settled ones
    /// stay, or shuffles would turn the whole view over in minutes), otherwise the one with less history of two drawn at
    /// random; a newcomer never displaces an entry with more history than itself.
    /// Returns whether the entry is now in the view.
    pub fn insert(
        &mut self,
        entry: PassiveEntry,
        cap: usize,
        per_host: usize,
        prefer_drop: &[PeerId],
        settled: Instant,
        rng: &mut Rng,
    ) -> bool {
        if let Some(known) = self.entries.iter_mut().find(|e| e.info.id == entry.info.id) {
            known.verified |= entry.verified;
            // The fresher copy wins, never an older one: a replay cannot roll an entry back.
            if entry.info.issued > known.info.issued {
                known.info = entry.info;
                known.host = entry.host;
            }
            return true;
        }
        if cap == 0 || self.entries.iter().filter(|e| e.host == entry.host).count() >= per_host {
            return false;
        }
        if self.entries.len() < cap {
            self.entries.push(entry);
            return true;
        }
        let victim = self
            .entries
            .iter()
            .position(|e| {
                prefer_drop.contains(&e.info.id) && e.history(settled) <= entry.history(settled)
            })
            .or_else(|| {
                let a = rng.index(self.entries.len());
                let b = rng.index(self.entries.len());
                let weaker = if self.entries[a].history(settled) <= self.entries[b].history(settled)
                {
                    a
                } else {
                    b
                };
                (self.entries[weaker].history(settled) <= entry.history(settled)).then_some(weaker)
            });
        match victim {
            Some(at) => {
                self.entries[at] = entry;
                true
            }
            None => false,
        }
    }

    /// Up to `n` distinct entries drawn at random.
    pub fn sample(&self, rng: &mut Rng, n: usize) -> Vec<PeerInfo> {
        let mut picks: Vec<usize> = (0..self.entries.len()).collect();
        let n = n.min(picks.len());
        for i in 0..n {
            let j = i + rng.index(picks.len() - i);
            picks.swap(i, j);
        }
        picks[..n].iter().map(|&i| self.entries[i].info).collect()
    }

    /// A candidate for a new outbound neighbour: drawn among those `usable` accepts with the
    /// most history, so fresh identities never win against peers this one has known for
    /// long, while the choice stays spread over the entries of that rank.
    pub fn pick(
        &self,
        rng: &mut Rng,
        settled: Instant,
        usable: impl Fn(&PassiveEntry) -> bool,
    ) -> Option<PeerInfo> {
        let best = self
            .entries
            .iter()
            .filter(|e| usable(e))
            .map(|e| e.history(settled))
            .max()?;
        let candidates: Vec<&PassiveEntry> = self
            .entries
            .iter()
            .filter(|e| usable(e) && e.history(settled) == best)
            .collect();
        rng.choose(&candidates).map(|e| e.info)
    }

    /// Up to `n` distinct entries drawn at random, settled ones first: what a contact hands a
    /// newcomer, who takes them as settled too.
    pub fn sample_settled(&self, rng: &mut Rng, n: usize, settled: Instant) -> Vec<PeerInfo> {
        let mut old: Vec<PeerInfo> = Vec::new();
        let mut young: Vec<PeerInfo> = Vec::new();
        for e in &self.entries {
            if e.first_seen <= settled {
                old.push(e.info);
            } else {
                young.push(e.info);
            }
        }
        rng.shuffle(&mut old);
        rng.shuffle(&mut young);
        old.extend(young);
        old.truncate(n);
        old
    }

    /// When this peer first heard of `id`, if it is in the view.
    pub fn first_seen(&self, id: &PeerId) -> Option<Instant> {
        self.entries
            .iter()
            .find(|e| e.info.id == *id)
            .map(|e| e.first_seen)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use super::*;

    fn entry(n: u8, block: u8, age_s: u64, base: Instant, verified: bool) -> PassiveEntry {
        let ip = Ipv4Addr::new(1, 2, block, n);
        PassiveEntry {
            info: PeerInfo::new(PeerId::from_bytes([n; 32]), SocketAddr::from((ip, 4000)), 1),
            host: Host::of(ip.into()),
            first_seen: base + Duration::from_secs(1000 - age_s),
            verified,
            asked: None,
            crowded: false,
        }
    }

    #[test]
    fn passive_caps_per_host_and_in_total() {
        let base = Instant::now();
        let settled = base;
        let mut rng = Rng::seed_from_u64(1);
        let mut view = PassiveView::default();
        assert!(view.insert(entry(1, 7, 5, base, false), 4, 2, &[], settled, &mut rng));
        assert!(view.insert(entry(2, 7, 5, base, false), 4, 2, &[], settled, &mut rng));
        // A third identity from the same /24 is refused.
        assert!(!view.insert(entry(3, 7, 5, base, false), 4, 2, &[], settled, &mut rng));
        assert!(view.insert(entry(4, 8, 5, base, false), 4, 2, &[], settled, &mut rng));
        assert!(view.insert(entry(5, 9, 5, base, false), 4, 2, &[], settled, &mut rng));
        assert_eq!(view.len(), 4);
        // Re-inserting a known peer neither grows the view nor counts against the caps.
        assert!(view.insert(entry(5, 9, 5, base, true), 4, 2, &[], settled, &mut rng));
        assert_eq!(view.len(), 4);
    }

    #[test]
    fn a_fresh_identity_never_displaces_an_older_or_verified_entry() {
        let base = Instant::now();
        // Entries first seen 500 s before the end are settled, those of 1 s are not.
        let settled = base + Duration::from_secs(1000 - 300);
        let mut rng = Rng::seed_from_u64(2);
        let mut view = PassiveView::default();
        for n in 0..8 {
            assert!(view.insert(
                entry(n, n, 500, base, n % 2 == 0),
                8,
                1,
                &[],
                settled,
                &mut rng
            ));
        }
        for n in 100..200 {
            assert!(!view.insert(entry(n, n, 1, base, false), 8, 1, &[], settled, &mut rng));
        }
        assert!((0..8).all(|n| view.contains(&PeerId::from_bytes([n; 32]))));
        // Entries named to drop (those sent away in a shuffle) go first, but a settled one
        // only for a settled newcomer.
        let sent = [PeerId::from_bytes([3; 32])];
        assert!(!view.insert(
            entry(150, 150, 1, base, false),
            8,
            1,
            &sent,
            settled,
            &mut rng
        ));
        assert!(view.contains(&sent[0]));
        assert!(view.insert(
            entry(151, 151, 500, base, false),
            8,
            1,
            &sent,
            settled,
            &mut rng
        ));
        assert!(!view.contains(&sent[0]));
        // A fresher copy of a known entry replaces it; an older one never does.
        let mut newer = entry(151, 151, 500, base, false);
        newer.info.issued = 5;
        assert!(view.insert(newer, 8, 1, &[], settled, &mut rng));
        let mut older = newer;
        older.info.issued = 2;
        assert!(view.insert(older, 8, 1, &[], settled, &mut rng));
        let kept = view.entries.iter().find(|e| e.info.id == newer.info.id);
        assert_eq!(kept.map(|e| e.info.issued), Some(5));
    }

    #[test]
    fn inbound_victims_spare_outbound_and_established_neighbours() {
        let base = Instant::now();
        let mk = |n: u8, outbound: bool, at: u64| ActiveEntry {
            info: PeerInfo::new(
                PeerId::from_bytes([n; 32]),
                SocketAddr::from((Ipv4Addr::new(1, 1, n, 1), 1)),
                1,
            ),
            host: Host::of(Ipv4Addr::new(1, 1, n, 1).into()),
            outbound,
            since: base + Duration::from_secs(at),
            known_since: base,
        };
        let view = ActiveView {
            entries: vec![mk(1, true, 90), mk(2, false, 10), mk(3, false, 50)],
        };
        let mut rng = Rng::seed_from_u64(3);
        let cut = base + Duration::from_secs(30);
        for _ in 0..50 {
            assert_eq!(
                view.inbound_victim(&mut rng, cut, true),
                Some(PeerId::from_bytes([3; 32]))
            );
        }
        let late = base + Duration::from_secs(60);
        assert_eq!(view.inbound_victim(&mut rng, late, false), None);
        for _ in 0..50 {
            let v = view.inbound_victim(&mut rng, late, true).unwrap();
            assert_ne!(v, PeerId::from_bytes([1; 32]));
        }
        for _ in 0..50 {
            let pick = view
                .random_except(&mut rng, Some(&PeerId::from_bytes([2; 32])))
                .unwrap();
            assert_ne!(pick.id, PeerId::from_bytes([2; 32]));
        }
    }
}
