//! Crowded hosts: public /24s (or /48s) that this peer has heard many distinct identities
//! from. Keys are free and hosts are not, so a flood of identities shows as a few hosts each
//! naming many of them, while volunteers are mostly one identity per host. A crowded host's
//! identities still count, but as one witness: at most `crowded_active_max` neighbours from
//! crowded hosts, the last rank in the passive view and in picks, and no displacing anyone.
//!
//! The memory is a short vector of the hosts heard of recently, each with up to
//! `CROWDED_IDS_MAX` short fingerprints of the identities heard from it and how often it was
//! named. When it is full, the half named with the fewest identities, then the least often,
//! goes (honest hosts are mostly named with one identity, now and then), so its size never
//! grows and a crowded host stays known while it keeps being named.

use super::*;

/// Hosts remembered.
pub const CROWD_HOSTS: usize = 64;
/// Fingerprints remembered per host: enough to tell a crowded host.
const CROWDED_IDS_MAX: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Seen {
    host: Host,
    ids: [u32; CROWDED_IDS_MAX],
    len: u8,
    /// How often the host was named, any identity: a flood's hosts are named over and over,
    /// most honest ones once in a while, so this decides what the memory keeps.
    hits: u16,
}

#[derive(Debug, Clone)]
pub struct Crowd {
    seen: Vec<Seen>,
    /// Distinct identities after which a host is crowded; above `CROWDED_IDS_MAX` never.
    threshold: usize,
}

/// A short fingerprint of an identity: collisions only make a host look less crowded.
fn fingerprint(id: &PeerId) -> u32 {
    let b = id.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) ^ u32::from_le_bytes([b[28], b[29], b[30], b[31]])
}

impl Crowd {
    /// A host becomes crowded once `threshold` distinct identities were heard from it; 0, or
    /// more than this memory keeps per host, turns crowding off.
    pub fn new(threshold: usize) -> Self {
        Self {
            seen: Vec::new(),
            threshold,
        }
    }

    fn counts(host: &Host) -> bool {
        // Loopback, private and link-local addresses are a lab's or a test's, where the host
        // caps are raised anyway; a peer that is its own host has nothing to count.
        matches!(host, Host::V4Block(_) | Host::V6Block(_))
    }

    fn enabled(&self) -> bool {
        (1..=CROWDED_IDS_MAX).contains(&self.threshold)
    }

    /// Records that `info` was named with an address on `host`. Returns whether the host has
    /// just become crowded.
    pub fn hear(&mut self, host: Host, info: &PeerInfo) -> bool {
        if !self.enabled() || !Self::counts(&host) {
            return false;
        }
        let print = fingerprint(&info.id);
        if let Some(s) = self.seen.iter_mut().find(|s| s.host == host) {
            s.hits = s.hits.saturating_add(1);
            let len = usize::from(s.len);
            if len >= self.threshold || s.ids[..len].contains(&print) {
                return false;
            }
            s.ids[len] = print;
            s.len += 1;
            return usize::from(s.len) == self.threshold;
        }
        if self.seen.len() >= CROWD_HOSTS {
            // Keep the half named with the most identities, then the most often; the sort is
            // stable, so among equals the longest known stay.
            self.seen
                .sort_by_key(|s| std::cmp::Reverse((s.len, s.hits)));
            self.seen.truncate(CROWD_HOSTS / 2);
            for s in &mut self.seen {
                // Old hits fade, so a host named often long ago does not stay forever.
                s.hits /= 2;
            }
        }
        let mut ids = [0; CROWDED_IDS_MAX];
        ids[0] = print;
        self.seen.push(Seen {
            host,
            ids,
            len: 1,
            hits: 1,
        });
        self.threshold == 1
    }

    pub fn is_crowded(&self, host: &Host) -> bool {
        self.enabled()
            && self
                .seen
                .iter()
                .any(|s| s.host == *host && usize::from(s.len) >= self.threshold)
    }
}

impl Overlay {
    /// Counts `info` towards its host's identities; when the host becomes crowded, its
    /// passive entries drop to the last rank and its neighbours are thinned out.
    pub(super) fn hear(&mut self, host: Host, info: &PeerInfo) {
        if self.crowd.hear(host, info) {
            for e in self.passive.entries.iter_mut().filter(|e| e.host == host) {
                e.crowded = true;
            }
            self.crowd_changed = true;
        }
    }

    /// Neighbours whose host is crowded.
    pub(super) fn crowded_neighbors(&self) -> usize {
        self.active
            .entries
            .iter()
            .filter(|e| self.crowd.is_crowded(&e.host))
            .count()
    }

    /// Whether one more neighbour from a crowded host would be over `crowded_active_max`.
    pub(super) fn crowd_full(&self) -> bool {
        self.crowded_neighbors() >= self.config.crowded_active_max
    }

    /// Drops neighbours from crowded hosts beyond `crowded_active_max`, the most recent first:
    /// a flood's identities take free slots in the first seconds, before their hosts are
    /// known to be crowded.
    pub(super) fn thin_crowd(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.crowd_changed = false;
        while self.crowded_neighbors() > self.config.crowded_active_max {
            let Some(victim) = self
                .active
                .entries
                .iter()
                .filter(|e| self.crowd.is_crowded(&e.host))
                .max_by_key(|e| (e.since, e.info.id))
                .map(|e| e.info.id)
            else {
                break;
            };
            self.drop_neighbor(victim, now, out);
            self.next_repair = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;

    fn on(n: u32, a: u8, b: u8) -> (Host, PeerInfo) {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&n.to_le_bytes());
        let ip = Ipv4Addr::new(a, b, 7, (n % 250 + 1) as u8);
        let info = PeerInfo::new(PeerId::from_bytes(bytes), SocketAddr::from((ip, 4000)), 1);
        (Host::of(ip.into()), info)
    }

    #[test]
    fn a_host_naming_many_identities_is_crowded_and_stays_known() {
        let mut crowd = Crowd::new(3);
        let (flood, _) = on(0, 203, 0);
        // The same identity heard again and again is one.
        for _ in 0..10 {
            let (host, info) = on(1, 203, 0);
            assert!(!crowd.hear(host, &info));
        }
        assert!(!crowd.is_crowded(&flood));
        let (host, info) = on(2, 203, 0);
        assert!(!crowd.hear(host, &info));
        let (host, info) = on(3, 203, 0);
        assert!(crowd.hear(host, &info));
        assert!(crowd.is_crowded(&flood));
        // Hundreds of honest hosts, one identity each, pass through the bounded memory
        // without pushing the crowded host out, and none of them is crowded.
        for n in 0..500u32 {
            let (host, info) = on(1000 + n, 11 + (n / 250) as u8, (n % 250) as u8);
            crowd.hear(host, &info);
            let (again, again_info) = on(4 + n % 3, 203, 0);
            crowd.hear(again, &again_info);
            assert!(crowd.seen.len() <= CROWD_HOSTS);
        }
        assert!(crowd.is_crowded(&flood));
        let (honest, _) = on(1000, 11, 0);
        assert!(!crowd.is_crowded(&honest));
    }

    #[test]
    fn local_addresses_and_a_threshold_of_zero_count_nothing() {
        let mut crowd = Crowd::new(2);
        let local = Host::of(Ipv4Addr::LOCALHOST.into());
        for n in 0..10 {
            let (_, info) = on(n, 127, 0);
            assert!(!crowd.hear(local, &info));
        }
        assert!(!crowd.is_crowded(&local));
        let mut off = Crowd::new(0);
        for n in 0..10 {
            let (host, info) = on(n, 203, 0);
            assert!(!off.hear(host, &info));
            assert!(!off.is_crowded(&host));
        }
    }
}

#[cfg(test)]
mod rules {
    use std::time::Instant;

    use super::super::tests::*;
    use super::*;

    #[test]
    fn one_neighbour_from_crowded_hosts_and_they_rank_last() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        for n in 1..=2 {
            assert!(accepted(&ask(&mut ov, info(n), Priority::Low, now), id(n)));
        }
        // Three identities named on each of two /24s make both crowded.
        let flood: Vec<PeerInfo> = (0..6).map(|k| on_block(100 + k, 900 + k % 2)).collect();
        let mut out = Vec::new();
        ov.handle(
            Event::Message {
                from: id(1),
                msg: OverlayMessage::Refresh {
                    info: info(1),
                    peers: PeerList(flood[..4].to_vec()),
                },
            },
            now,
            &mut out,
        );
        ov.handle(
            Event::Message {
                from: id(2),
                msg: OverlayMessage::Refresh {
                    info: info(2),
                    peers: PeerList(flood[2..].to_vec()),
                },
            },
            now,
            &mut out,
        );
        let block = |b: u32| Host::of(on_block(0, b).addr.ip());
        assert!(ov.crowd.is_crowded(&block(900)) && ov.crowd.is_crowded(&block(901)));
        assert!(ov.passive.entries.iter().all(|e| e.crowded));
        // The first identity from a crowded host gets a free slot, the next one none.
        assert!(accepted(
            &ask(&mut ov, on_block(110, 900), Priority::High, now),
            id(110)
        ));
        assert!(!accepted(
            &ask(&mut ov, on_block(111, 901), Priority::High, now),
            id(111)
        ));
        assert_eq!(ov.crowded_neighbors(), 1);
        // Honest peers still get the free slots, and a passive peer on an uncrowded host is
        // picked before any crowded one.
        assert!(accepted(&ask(&mut ov, info(3), Priority::Low, now), id(3)));
        ov.keep_passive(info(50), Host::of(info(50).addr.ip()), false, now, &[]);
        let (pick, _) = ov.candidate(now).unwrap();
        assert_eq!(pick.id, id(50));
    }

    #[test]
    fn neighbours_taken_before_their_host_was_crowded_are_thinned_out() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        for k in 0..3 {
            let peer = on_block(200 + k, 950 + k);
            assert!(accepted(&ask(&mut ov, peer, Priority::Low, now), peer.id));
        }
        assert_eq!(ov.crowded_neighbors(), 0);
        // Then the three hosts each turn out to name many identities.
        let named: Vec<PeerInfo> = (0..3)
            .flat_map(|k| (1..3).map(move |j| on_block(300 + 10 * k + j, 950 + k)))
            .collect();
        let mut out = Vec::new();
        ov.handle(
            Event::Message {
                from: id(200),
                msg: OverlayMessage::Refresh {
                    info: on_block(200, 950),
                    peers: PeerList(named[..4].to_vec()),
                },
            },
            now,
            &mut out,
        );
        ov.handle(
            Event::Message {
                from: id(200),
                msg: OverlayMessage::Refresh {
                    info: on_block(200, 950),
                    peers: PeerList(named[4..].to_vec()),
                },
            },
            now,
            &mut out,
        );
        assert_eq!(ov.crowded_neighbors(), 1);
        assert_eq!(ov.active_len(), 1);
        assert_eq!(
            out.iter()
                .filter(|c| matches!(c, Command::NeighborDown(_)))
                .count(),
            2
        );
    }
}
