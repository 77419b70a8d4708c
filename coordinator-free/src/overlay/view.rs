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
}

impl PassiveEntry {
    /// Orders entries by how much history they carry: verified ones first, then the oldest.
    fn history(&self) -> (bool, std::cmp::Reverse<Instant>) {
        (self.verified, std::cmp::Reverse(self.first_seen))
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
    /// dropping an entry drawn from `prefer_drop` if there is one (the peers just sent away in
    /// a shuffle, as the paper does), otherwise the one with less history of two drawn at
    /// random; a newcomer never displaces an entry with more history than itself.
    /// Returns whether the entry is now in the view.
    pub fn insert(
        &mut self,
        entry: PassiveEntry,
        cap: usize,
        per_host: usize,
        prefer_drop: &[PeerId],
        rng: &mut Rng,
    ) -> bool {
        if let Some(known) = self.entries.iter_mut().find(|e| e.info.id == entry.info.id) {
            known.verified |= entry.verified;
            if entry.verified {
                // A confirmed address replaces a hearsay one.
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
            .position(|e| prefer_drop.contains(&e.info.id))
            .or_else(|| {
                let a = rng.index(self.entries.len());
                let b = rng.index(self.entries.len());
                let weaker = if self.entries[a].history() <= self.entries[b].history() {
                    a
                } else {
                    b
                };
                (self.entries[weaker].history() <= entry.history()).then_some(weaker)
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

    /// A candidate for a new outbound neighbour: of two entries drawn among those `usable`
    /// accepts, the one with more history, so fresh identities rarely win against peers this
    /// one has known for long, while the choice stays spread over the whole view.
    pub fn pick(&self, rng: &mut Rng, usable: impl Fn(&PassiveEntry) -> bool) -> Option<PeerInfo> {
        let candidates: Vec<&PassiveEntry> = self.entries.iter().filter(|e| usable(e)).collect();
        if candidates.is_empty() {
            return None;
        }
        let a = candidates[rng.index(candidates.len())];
        let b = candidates[rng.index(candidates.len())];
        Some(if a.history() >= b.history() { a } else { b }.info)
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
            info: PeerInfo {
                id: PeerId::from_bytes([n; 32]),
                addr: SocketAddr::from((ip, 4000)),
            },
            host: Host::of(ip.into()),
            first_seen: base + Duration::from_secs(1000 - age_s),
            verified,
            asked: None,
        }
    }

    #[test]
    fn passive_caps_per_host_and_in_total() {
        let base = Instant::now();
        let mut rng = Rng::seed_from_u64(1);
        let mut view = PassiveView::default();
        assert!(view.insert(entry(1, 7, 5, base, false), 4, 2, &[], &mut rng));
        assert!(view.insert(entry(2, 7, 5, base, false), 4, 2, &[], &mut rng));
        // A third identity from the same /24 is refused.
        assert!(!view.insert(entry(3, 7, 5, base, false), 4, 2, &[], &mut rng));
        assert!(view.insert(entry(4, 8, 5, base, false), 4, 2, &[], &mut rng));
        assert!(view.insert(entry(5, 9, 5, base, false), 4, 2, &[], &mut rng));
        assert_eq!(view.len(), 4);
        // Re-inserting a known peer neither grows the view nor counts against the caps.
        assert!(view.insert(entry(5, 9, 5, base, true), 4, 2, &[], &mut rng));
        assert_eq!(view.len(), 4);
    }

    #[test]
    fn a_fresh_identity_never_displaces_an_older_or_verified_entry() {
        let base = Instant::now();
        let mut rng = Rng::seed_from_u64(2);
        let mut view = PassiveView::default();
        for n in 0..8 {
            assert!(view.insert(entry(n, n, 500, base, n % 2 == 0), 8, 1, &[], &mut rng));
        }
        for n in 100..200 {
            assert!(!view.insert(entry(n, n, 1, base, false), 8, 1, &[], &mut rng));
        }
        assert!((0..8).all(|n| view.contains(&PeerId::from_bytes([n; 32]))));
        // Entries named to drop (those sent away in a shuffle) go first.
        let sent = [PeerId::from_bytes([3; 32])];
        assert!(view.insert(entry(150, 150, 1, base, false), 8, 1, &sent, &mut rng));
        assert!(!view.contains(&sent[0]));
    }

    #[test]
    fn inbound_victims_spare_outbound_and_established_neighbours() {
        let base = Instant::now();
        let mk = |n: u8, outbound: bool, at: u64| ActiveEntry {
            info: PeerInfo {
                id: PeerId::from_bytes([n; 32]),
                addr: SocketAddr::from((Ipv4Addr::new(1, 1, n, 1), 1)),
            },
            host: Host::of(Ipv4Addr::new(1, 1, n, 1).into()),
            outbound,
            since: base + Duration::from_secs(at),
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
