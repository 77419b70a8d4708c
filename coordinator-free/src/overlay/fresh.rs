//! Freshness of peer info: this peer's own copy re-issued and sent to its neighbours,
//! others' copies checked for age and signature, and old passive entries dropped.

use super::*;

impl Overlay {
    /// Wall-clock milliseconds at `now`, counted from the issue time `new` was given.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.born).as_millis();
        self.unix_at_birth
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    /// Whether a copy of a peer's info may be kept or passed on: signed by its peer, not
    /// older than `max_age` and not from the future.
    pub(super) fn acceptable(&self, info: &PeerInfo, now: Instant) -> bool {
        let unix = self.unix_ms(now);
        let max_age = u64::try_from(self.config.max_age.as_millis()).unwrap_or(u64::MAX);
        info.issued <= unix.saturating_add(MAX_CLOCK_AHEAD_MS)
            && info.issued.saturating_add(max_age) >= unix
            && self.seal.verify(info)
    }

    /// When the passive entry issued at `issued` expires, as an instant.
    pub(super) fn expiry(&self, issued: u64) -> Instant {
        let max_age = u64::try_from(self.config.max_age.as_millis()).unwrap_or(u64::MAX);
        let at = issued
            .saturating_add(max_age)
            .saturating_sub(self.unix_at_birth);
        self.born + Duration::from_millis(at.saturating_add(1))
    }

    /// Re-issues our own info when due, sends it to the neighbours when due, and drops
    /// passive entries whose copy has grown too old: a dead peer issues no more, so its
    /// address leaves every passive view within `max_age` of its last issue.
    pub(super) fn freshen(&mut self, now: Instant, out: &mut Vec<Command>) {
        let unix = self.unix_ms(now);
        let reissue = u64::try_from(self.config.reissue_interval.as_millis()).unwrap_or(u64::MAX);
        if unix >= self.me.issued.saturating_add(reissue) {
            self.me.issued = unix;
            self.me.signature = self.seal.sign(&self.me);
        }
        if now >= self.next_refresh {
            self.next_refresh = now + self.jittered(self.config.refresh_interval);
            for n in &self.active.entries {
                let peers = self
                    .active
                    .entries
                    .iter()
                    .filter(|o| o.info.id != n.info.id)
                    .map(|o| o.info)
                    .take(MAX_LIST_PEERS)
                    .collect();
                out.push(Command::Send {
                    to: n.info.id,
                    msg: OverlayMessage::Refresh {
                        info: self.me,
                        peers: PeerList(peers),
                    },
                });
            }
        }
        let max_age = u64::try_from(self.config.max_age.as_millis()).unwrap_or(u64::MAX);
        self.passive
            .entries
            .retain(|e| e.info.issued.saturating_add(max_age) >= unix);
    }

    pub(super) fn on_refresh(
        &mut self,
        from: PeerId,
        info: PeerInfo,
        peers: PeerList,
        now: Instant,
    ) {
        if info.id != from || !self.active.contains(&from) || !self.acceptable(&info, now) {
            self.stats.unsolicited += 1;
            return;
        }
        self.refresh_neighbor(info);
        // A neighbour has at most `active_view - 1` others to name; a longer list is a flood.
        let take = self.config.active_view.saturating_sub(1);
        self.merge(peers.0.into_iter().take(take), &[], now);
    }

    /// Keeps the fresher of a neighbour's copies. Its address stays the one it connected
    /// with: the connection, not the copy, is what the host caps count.
    pub(super) fn refresh_neighbor(&mut self, info: PeerInfo) {
        if let Some(e) = self
            .active
            .entries
            .iter_mut()
            .find(|e| e.info.id == info.id)
            && info.issued > e.info.issued
        {
            e.info = info;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::tests::*;
    use super::*;

    #[test]
    fn old_copies_expire_and_a_replay_never_brings_a_dead_peer_back() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        ask(&mut ov, info(1), Priority::Low, start);
        let max_age = ov.config().max_age;
        let at = |secs: u64| PeerInfo {
            issued: T0 + secs * 1000,
            ..info(5)
        };
        let shuffle = |ov: &mut Overlay, peer: PeerInfo, now: Instant| {
            let mut out = Vec::new();
            ov.handle(
                Event::Message {
                    from: id(1),
                    msg: OverlayMessage::Shuffle {
                        nonce: 9,
                        origin: info(1),
                        ttl: 0,
                        peers: PeerList(vec![peer]),
                    },
                },
                now,
                &mut out,
            );
        };
        // Peer 5 issued a copy at 30 s; it is kept, and a fresher one replaces it.
        let now = start + Duration::from_secs(40);
        shuffle(&mut ov, at(30), now);
        assert!(ov.passive.contains(&id(5)));
        shuffle(&mut ov, at(35), now);
        shuffle(&mut ov, at(10), now);
        let held = ov.passive.entries.iter().find(|e| e.info.id == id(5));
        assert_eq!(held.map(|e| e.info.issued), Some(T0 + 35_000));
        // Peer 5 dies: it issues nothing more, and its entry goes once its copy is too old;
        // the timer asks to be woken for it.
        let expires = start + Duration::from_secs(35) + max_age + Duration::from_millis(1);
        assert!(ov.poll_timeout() <= expires);
        let mut out = Vec::new();
        ov.handle(Event::Timer, expires - Duration::from_secs(1), &mut out);
        assert!(ov.passive.contains(&id(5)));
        ov.handle(Event::Timer, expires, &mut out);
        assert!(!ov.passive.contains(&id(5)));
        // A replay of its last copy, or of any older one, is refused.
        shuffle(&mut ov, at(35), expires);
        shuffle(&mut ov, at(0), expires);
        assert!(!ov.passive.contains(&id(5)));
        // A copy from too far ahead of our clock is refused too.
        let ahead = expires + Duration::from_secs(1);
        shuffle(&mut ov, at(10_000), ahead);
        assert!(!ov.passive.contains(&id(5)));
    }

    #[test]
    fn a_peer_reissues_its_info_and_sends_it_to_its_neighbours() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        ask(&mut ov, info(1), Priority::Low, start);
        ask(&mut ov, info(2), Priority::Low, start);
        assert_eq!(ov.me().issued, T0);
        let later = start + Duration::from_secs(45);
        let mut out = Vec::new();
        ov.handle(Event::Timer, later, &mut out);
        assert_eq!(ov.unix_ms(later), T0 + 45_000);
        assert_eq!(ov.me().issued, T0 + 45_000);
        // Each neighbour gets our fresh copy and the other neighbour's.
        let refreshes: Vec<(PeerId, PeerInfo, Vec<PeerId>)> = out
            .iter()
            .filter_map(|c| match c {
                Command::Send {
                    to,
                    msg: OverlayMessage::Refresh { info, peers },
                } => Some((*to, *info, peers.0.iter().map(|p| p.id).collect())),
                _ => None,
            })
            .collect();
        assert_eq!(refreshes.len(), 2, "{out:?}");
        for (to, info, peers) in refreshes {
            assert_eq!(info, ov.me());
            let other = if to == id(1) { id(2) } else { id(1) };
            assert_eq!(peers, vec![other]);
        }
        // A neighbour's fresh copy replaces the one we hold; a stranger's is ignored.
        let fresh = PeerInfo {
            issued: T0 + 44_000,
            ..info(1)
        };
        let mut out = Vec::new();
        for from in [id(1), id(7)] {
            ov.handle(
                Event::Message {
                    from,
                    msg: OverlayMessage::Refresh {
                        info: PeerInfo { id: from, ..fresh },
                        peers: PeerList::default(),
                    },
                },
                later,
                &mut out,
            );
        }
        let held = ov.active.entries.iter().find(|e| e.info.id == id(1));
        assert_eq!(held.map(|e| e.info.issued), Some(T0 + 44_000));
        assert_eq!(ov.stats().unsolicited, 1);
    }
}
