//! Shuffles and the passive view: what is sent, what is kept, and the occasional shuffle
//! through a bootstrap contact.

use super::*;

impl Overlay {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_shuffle(
        &mut self,
        from: PeerId,
        nonce: u64,
        origin: PeerInfo,
        ttl: u8,
        peers: PeerList,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        // A neighbour's walk, or a stranger's own shuffle (sent to it as a contact).
        let taken =
            self.active.contains(&from) || origin.id == from && self.take_stranger_shuffle(now);
        if !taken {
            self.stats.unsolicited += 1;
            return;
        }
        if origin.id == self.me.id || !self.acceptable(&origin, now) {
            return;
        }
        let ttl = ttl.min(self.config.shuffle_walk);
        if ttl > 0 && self.active.len() > 1 {
            if let Some(next) = self.active.random_except(&mut self.rng, Some(&from)) {
                out.push(Command::Send {
                    to: next.id,
                    msg: OverlayMessage::Shuffle {
                        nonce,
                        origin,
                        ttl: ttl - 1,
                        peers,
                    },
                });
            }
            return;
        }
        // What a peer of our configuration sends is all we take, and all we answer with.
        let mut peers = peers;
        peers.0.truncate(self.shuffle_len());
        let answer = self.passive.sample(&mut self.rng, peers.0.len());
        let sent: Vec<PeerId> = answer.iter().map(|p| p.id).collect();
        let msg = OverlayMessage::ShuffleReply {
            nonce,
            peers: PeerList(answer),
        };
        out.push(if self.active.contains(&origin.id) {
            Command::Send { to: origin.id, msg }
        } else {
            Command::SendOnce { to: origin, msg }
        });
        self.merge(std::iter::once(origin).chain(peers.0), &sent, now);
    }

    pub(super) fn on_shuffle_reply(&mut self, nonce: u64, peers: PeerList, now: Instant) {
        match self.shuffle.take() {
            Some(s) if s.nonce == nonce => {
                let take = self.shuffle_len();
                self.merge(peers.0.into_iter().take(take), &s.sent, now);
            }
            other => {
                self.shuffle = other;
                self.stats.unsolicited += 1;
            }
        }
    }

    pub(super) fn merge(
        &mut self,
        peers: impl Iterator<Item = PeerInfo>,
        prefer_drop: &[PeerId],
        now: Instant,
    ) {
        for info in peers.take(MAX_LIST_PEERS + 1) {
            if info.id == self.me.id || self.active.contains(&info.id) {
                continue;
            }
            let host = Host::of(info.addr.ip());
            self.keep_passive(info, host, false, now, prefer_drop);
        }
    }

    /// A neighbour going back to the passive view keeps how long we have known it.
    pub(super) fn keep_former_neighbor(&mut self, entry: &ActiveEntry, now: Instant) {
        self.keep_passive(entry.info, entry.host, true, now, &[]);
        if let Some(e) = self
            .passive
            .entries
            .iter_mut()
            .find(|e| e.info.id == entry.info.id)
        {
            e.first_seen = e.first_seen.min(entry.known_since);
        }
    }

    pub(super) fn keep_passive(
        &mut self,
        info: PeerInfo,
        host: Host,
        verified: bool,
        now: Instant,
        prefer_drop: &[PeerId],
    ) {
        if info.id == self.me.id || self.active.contains(&info.id) || !self.acceptable(&info, now) {
            return;
        }
        self.hear(host, &info);
        self.passive.insert(
            PassiveEntry {
                info,
                host,
                first_seen: now,
                verified,
                asked: None,
                crowded: self.crowd.is_crowded(&host),
            },
            self.config.passive_view,
            self.config.passive_per_host,
            prefer_drop,
            self.settled(now),
            &mut self.rng,
        );
    }

    /// Peers in a shuffle of our configuration: the sender, neighbours and passive peers.
    pub(super) fn shuffle_len(&self) -> usize {
        1 + self.config.shuffle_active + self.config.shuffle_passive
    }

    pub(super) fn start_shuffle(&mut self, now: Instant, out: &mut Vec<Command>) {
        let jitter = self.config.shuffle_interval / 4;
        self.next_shuffle = now
            + self.rng.duration_between(
                self.config.shuffle_interval - jitter,
                self.config.shuffle_interval + jitter,
            );
        let Some(target) = self.active.random_except(&mut self.rng, None) else {
            return;
        };
        let msg = self.shuffle_request(&target.id, now);
        out.push(Command::Send { to: target.id, msg });
    }

    /// A shuffle of our sample to walk from `target`, now outstanding.
    pub(super) fn shuffle_request(&mut self, target: &PeerId, now: Instant) -> OverlayMessage {
        let mut peers = vec![self.me];
        let mut neighbors: Vec<PeerInfo> = self
            .active
            .entries
            .iter()
            .map(|e| e.info)
            .filter(|i| i.id != *target)
            .collect();
        self.rng.shuffle(&mut neighbors);
        peers.extend(neighbors.into_iter().take(self.config.shuffle_active));
        let passive = self
            .passive
            .sample(&mut self.rng, self.config.shuffle_passive);
        let sent = passive.iter().map(|p| p.id).collect();
        peers.extend(passive);
        let nonce = self.rng.next_u64();
        self.shuffle = Some(OutstandingShuffle {
            nonce,
            sent,
            deadline: now + self.config.request_timeout * 2,
        });
        OverlayMessage::Shuffle {
            nonce,
            origin: self.me,
            ttl: self.config.shuffle_walk,
            peers: PeerList(peers),
        }
    }

    /// Now and then a shuffle starts at a bootstrap contact, over a short-lived connection, and
    /// walks its neighbours: the only way a group that split off from the rest, whose own
    /// shuffles walk inside it, learns of the rest again.
    pub(super) fn contact_shuffle(&mut self, now: Instant, out: &mut Vec<Command>) {
        // The pace as the network's size is known now: a peer that learned since its last
        // contact shuffle that the network is large waits longer for the next.
        let pace = self.contact_pace();
        if now < self.last_contact_shuffle + pace.mul_f64(0.75) {
            self.next_contact_shuffle = self.last_contact_shuffle + self.jittered(pace);
            return;
        }
        self.last_contact_shuffle = now;
        self.next_contact_shuffle = now + self.jittered(pace);
        if self.contacts.is_empty() || self.shuffle.is_some() {
            return;
        }
        let contact = self.contacts[self.rng.index(self.contacts.len())];
        let msg = self.shuffle_request(&contact.id, now);
        out.push(if self.active.contains(&contact.id) {
            Command::Send {
                to: contact.id,
                msg,
            }
        } else {
            Command::SendOnce { to: contact, msg }
        });
    }

    /// Whether a shuffle from a non-neighbour may be taken now.
    pub(super) fn take_stranger_shuffle(&mut self, now: Instant) -> bool {
        let (since, count) = &mut self.stranger_shuffles;
        if *since + Duration::from_secs(1) <= now {
            *since = now;
            *count = 0;
        }
        *count += 1;
        *count <= MAX_STRANGER_SHUFFLES
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    use super::super::tests::*;
    use super::*;

    /// Contact shuffles keep their pace in a small network and slow with the network's size
    /// in a large one, so a contact's load from all peers stays about `contact_load_per_hour`.
    #[test]
    fn contact_shuffles_slow_down_as_the_network_grows() {
        let now = Instant::now();
        let mut node = Overlay::new(Config::default(), info(0), 1, now);
        node.handle(Event::Contact(info(1)), now, &mut Vec::new());
        assert_eq!(node.contacts.len(), 1);
        let base = Config::default().contact_shuffle_interval;
        assert_eq!(node.contact_pace(), base, "size unknown");
        node.set_network_size(20);
        assert_eq!(node.contact_pace(), base, "a lab: the configured pace");
        for peers in [200u64, 10_000, 50_000] {
            node.set_network_size(peers);
            let load = peers as f64 / node.contact_pace().as_secs_f64() * 3600.0;
            assert!(
                (load - f64::from(Config::default().contact_load_per_hour)).abs() < 1e-6,
                "{peers} peers ask one contact {load} times an hour"
            );
        }
        node.set_network_size(u64::MAX);
        assert_eq!(node.contact_pace(), Duration::from_secs(7 * 86_400));

        // A peer that learns the network is large before its contact shuffle is due waits
        // for the slower pace instead of shuffling.
        node.set_network_size(10_000);
        let due = node.next_contact_shuffle;
        let mut out = Vec::new();
        node.handle(Event::Timer, due, &mut out);
        let contact = info(1).id;
        let shuffled = |out: &[Command]| {
            out.iter().any(|c| {
                matches!(c, Command::SendOnce { to, .. } if to.id == contact)
                    || matches!(c, Command::Send { to, msg: OverlayMessage::Shuffle { .. } } if *to == contact)
            })
        };
        assert!(!shuffled(&out), "{out:?}");
        let pace = node.contact_pace();
        assert!(node.next_contact_shuffle >= node.last_contact_shuffle + pace.mul_f64(0.75));
        assert!(node.next_contact_shuffle > due + Duration::from_secs(3600));
        // Once that is due, it shuffles.
        let later = node.next_contact_shuffle;
        out.clear();
        node.handle(Event::Timer, later, &mut out);
        assert!(shuffled(&out), "{out:?}");
    }

    #[test]
    fn a_shuffle_swaps_samples_between_both_ends() {
        let mut net = Net::new(2);
        // One neighbour each, so neither tries the made-up passive peers below.
        let config = Config {
            active_view: 1,
            ..long_lived()
        };
        for n in 0..2 {
            let node = Overlay::new(config.clone(), info(n), u64::from(n), net.now);
            net.nodes.insert(id(n), node);
        }
        let (a, b) = (id(0), id(1));
        net.queue.push_back((b, Event::Contact(info(0))));
        net.pump();
        assert!(net.nodes[&a].active.contains(&b));
        let now = net.now;
        for n in 10..14 {
            let node = net.nodes.get_mut(&a).unwrap();
            node.keep_passive(info(n), Host::of(info(n).addr.ip()), false, now, &[]);
        }
        for n in 20..24 {
            let node = net.nodes.get_mut(&b).unwrap();
            node.keep_passive(info(n), Host::of(info(n).addr.ip()), false, now, &[]);
        }
        // Whoever shuffles first, both end up knowing the other's passive peers.
        net.tick(Duration::from_secs(120));
        let a_knows: BTreeSet<PeerId> = net.nodes[&a].passive().collect();
        let b_knows: BTreeSet<PeerId> = net.nodes[&b].passive().collect();
        assert!((20..24).all(|n| a_knows.contains(&id(n))), "{a_knows:?}");
        assert!((10..14).all(|n| b_knows.contains(&id(n))), "{b_knows:?}");
        assert!(net.nodes[&a].shuffle.is_none() || net.nodes[&b].shuffle.is_none());
    }

    #[test]
    fn a_shuffle_goes_through_a_contact_now_and_then_and_strangers_are_rationed() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        ask(&mut ov, info(1), Priority::Low, now);
        let mut out = Vec::new();
        ov.handle(Event::Contact(info(7)), now, &mut out);
        let at = ov.next_contact_shuffle.max(now);
        ov.next_shuffle = at + Duration::from_secs(1000);
        ov.next_rewire = at + Duration::from_secs(1000);
        out.clear();
        ov.handle(Event::Timer, at, &mut out);
        assert!(
            out.iter().any(|c| matches!(
                c,
                Command::SendOnce {
                    to,
                    msg: OverlayMessage::Shuffle { origin, .. },
                } if to.id == id(7) && origin.id == id(0)
            )),
            "{out:?}"
        );
        // A stranger's own shuffle is taken (it walks on, or is answered), a few a second.
        let mut ov = overlay(0, now);
        let mut answered = 0;
        for n in 100..130 {
            let mut out = Vec::new();
            ov.handle(
                Event::Message {
                    from: id(n),
                    msg: OverlayMessage::Shuffle {
                        nonce: 1,
                        origin: info(n),
                        ttl: 0,
                        peers: PeerList(vec![info(n + 100)]),
                    },
                },
                now,
                &mut out,
            );
            answered += out
                .iter()
                .filter(|c| matches!(c, Command::SendOnce { .. }))
                .count();
        }
        assert_eq!(answered, MAX_STRANGER_SHUFFLES as usize);
        assert!(ov.passive.contains(&id(100)));
    }
}
