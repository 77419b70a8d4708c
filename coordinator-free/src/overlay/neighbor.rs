//! Joins, neighbour requests and the active view: who is admitted and who is displaced
//! (repairs and rewires, our own requests, are in `repair.rs`).

use super::*;

impl Overlay {
    pub(super) fn on_contact(&mut self, info: PeerInfo, now: Instant) {
        if info.id == self.me.id || self.contacts.iter().any(|c| c.id == info.id) {
            return;
        }
        if self.contacts.len() == MAX_CONTACTS {
            self.contacts.remove(0);
        }
        self.contacts.push(info);
        // A peer with no neighbour joins through a second contact while the first join is
        // under way.
        if self.active.is_empty() && self.pending.len() < MAX_PENDING {
            self.next_repair = now;
        }
    }

    pub(super) fn on_connection_up(
        &mut self,
        peer: PeerId,
        addr: SocketAddr,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let host = Host::of(addr.ip());
        if let Some(p) = self.pending.iter_mut().find(|p| p.info.id == peer) {
            p.host = Some(host);
            let msg = match p.request {
                Request::Join => OverlayMessage::Join { info: self.me },
                Request::Neighbor { priority, .. } => OverlayMessage::Neighbor {
                    info: self.me,
                    priority,
                },
                Request::Rewire => OverlayMessage::Neighbor {
                    info: self.me,
                    priority: Priority::Low,
                },
            };
            out.push(Command::Send { to: peer, msg });
            return;
        }
        if self.active.contains(&peer) || self.strays.iter().any(|s| s.id == peer) {
            return;
        }
        if peer == self.me.id || self.strays.len() >= MAX_STRAYS {
            self.stats.strays_closed += 1;
            out.push(Command::Disconnect(peer));
            return;
        }
        self.strays.push(Stray {
            id: peer,
            host,
            since: now,
        });
    }

    pub(super) fn on_connection_down(
        &mut self,
        peer: PeerId,
        graceful: bool,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        self.strays.retain(|s| s.id != peer);
        if let Some(at) = self.pending.iter().position(|p| p.info.id == peer) {
            let p = self.pending.swap_remove(at);
            if !graceful {
                self.passive.remove(&peer);
            }
            self.refused(p.request, now);
        }
        if let Some(entry) = self.active.remove(&peer) {
            out.push(Command::NeighborDown(peer));
            if graceful {
                self.keep_former_neighbor(&entry, now);
            } else {
                self.passive.remove(&peer);
            }
            // A lost neighbour is repaired at once.
            self.repair_delay = self.config.repair_min;
            self.next_repair = now;
        }
    }

    pub(super) fn on_dial_failed(&mut self, peer: PeerId, now: Instant, out: &mut Vec<Command>) {
        self.passive.remove(&peer);
        if let Some(at) = self.pending.iter().position(|p| p.info.id == peer) {
            let p = self.pending.swap_remove(at);
            self.close_unless_neighbor(peer, out);
            match p.request {
                // A dead rewire candidate costs nothing but the next rewire's wait.
                Request::Rewire => {}
                // Another candidate at once: this one was dead, not unwilling.
                Request::Neighbor { .. } => self.next_repair = now,
                Request::Join => self.refused(p.request, now),
            }
        }
    }

    /// The host of a connection a request arrived on, and whether we asked for it (our own
    /// outbound request crossing theirs); `None` when no connection is known.
    pub(super) fn requester(&mut self, from: PeerId) -> Option<(Host, Option<bool>)> {
        let stray = self
            .strays
            .iter()
            .position(|s| s.id == from)
            .map(|at| self.strays.swap_remove(at).host);
        let pending = match self.pending.iter().position(|p| p.info.id == from) {
            Some(at) if self.pending[at].host.is_some() || stray.is_some() => {
                Some(self.pending.swap_remove(at))
            }
            _ => None,
        };
        let host = stray.or_else(|| pending.as_ref().and_then(|p| p.host))?;
        let outbound = pending.map(|p| match p.request {
            Request::Join | Request::Rewire => true,
            Request::Neighbor { outbound, .. } => outbound,
        });
        Some((host, outbound))
    }

    /// Closes a connection kept for a request or a stray, unless the peer became a neighbour
    /// over it meanwhile.
    pub(super) fn close_unless_neighbor(&self, peer: PeerId, out: &mut Vec<Command>) {
        if !self.active.contains(&peer) {
            out.push(Command::Disconnect(peer));
        }
    }

    pub(super) fn on_join(
        &mut self,
        from: PeerId,
        joiner: PeerInfo,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        if self.active.contains(&from) {
            return;
        }
        if joiner.id != from || !self.acceptable(&joiner, now) {
            self.stats.unsolicited += 1;
            self.strays.retain(|s| s.id != from);
            out.push(Command::Disconnect(from));
            return;
        }
        let addr = joiner.addr;
        let Some((host, ours)) = self.requester(from) else {
            self.stats.unsolicited += 1;
            return;
        };
        // The address the newcomer will be known by must be on the host it connects from,
        // or one host could spread identities under other hosts' names.
        if Host::of(addr.ip()) != host {
            self.stats.bad_address += 1;
            out.push(Command::Send {
                to: from,
                msg: OverlayMessage::NeighborReply {
                    accepted: false,
                    peers: PeerList::default(),
                },
            });
            out.push(Command::Disconnect(from));
            return;
        }
        for n in &self.active.entries {
            out.push(Command::Send {
                to: n.info.id,
                msg: OverlayMessage::ForwardJoin {
                    joiner,
                    ttl: self.config.active_walk,
                },
            });
        }
        // A newcomer must get in somewhere: its contact takes it even when displacements are
        // rationed (a neighbour it displaces keeps its other links and repairs at once).
        self.joining = true;
        let accepted = self.admit(
            joiner,
            host,
            Priority::High,
            ours.unwrap_or(false),
            now,
            out,
        );
        self.joining = false;
        self.reply(from, accepted, true, now, out);
    }

    pub(super) fn on_neighbor(
        &mut self,
        from: PeerId,
        info: PeerInfo,
        priority: Priority,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        if info.id != from || !self.acceptable(&info, now) {
            self.stats.unsolicited += 1;
            return;
        }
        if self.active.contains(&from) {
            self.refresh_neighbor(info);
            self.reply(from, true, false, now, out);
            return;
        }
        let Some((host, ours)) = self.requester(from) else {
            self.stats.unsolicited += 1;
            return;
        };
        let accepted = self.admit(info, host, priority, ours.unwrap_or(false), now, out);
        self.reply(from, accepted, false, now, out);
    }

    /// Answers a request; a refusal, and the acceptance of a newcomer's `Join`, name a few
    /// passive peers, so the requester has others to ask.
    pub(super) fn reply(
        &mut self,
        to: PeerId,
        accepted: bool,
        join: bool,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let peers = if accepted && !join {
            PeerList::default()
        } else if join {
            let settled = self.settled(now);
            let mut peers = self
                .passive
                .sample_settled(&mut self.rng, REFUSAL_PEERS, settled);
            peers.retain(|p| p.id != to);
            PeerList(peers)
        } else {
            let mut peers = self.passive.sample(&mut self.rng, REFUSAL_PEERS);
            peers.retain(|p| p.id != to);
            PeerList(peers)
        };
        out.push(Command::Send {
            to,
            msg: OverlayMessage::NeighborReply { accepted, peers },
        });
        if !accepted {
            self.stats.refused += 1;
            out.push(Command::Disconnect(to));
        }
    }

    /// Whether `info` may become a neighbour now, making room if the rules allow it; on
    /// success the peer is in the active view.
    pub(super) fn admit(
        &mut self,
        info: PeerInfo,
        host: Host,
        priority: Priority,
        outbound: bool,
        now: Instant,
        out: &mut Vec<Command>,
    ) -> bool {
        if info.id == self.me.id {
            return false;
        }
        if self.active.contains(&info.id) {
            return true;
        }
        if self.active.per_host(&host) >= self.config.active_per_host {
            return false;
        }
        self.hear(host, &info);
        // A crowded host's identities count as one witness: a slot of their own at most, and
        // never one someone else held (our own picks avoid them, see `candidate`).
        let crowded = self.crowd.is_crowded(&host);
        if crowded
            && (self.crowd_full() || !outbound && self.active.len() >= self.config.active_view)
        {
            return false;
        }
        let settled = self.settled(now);
        let known_since = self.passive.first_seen(&info.id).unwrap_or(now);
        let young = !outbound && known_since > settled;
        // The quota guards a view that holds settled neighbours; a peer that knows nobody
        // for long yet (a whole network starting) takes what comes.
        let over_quota = young
            && self.active.young_inbound(settled) >= self.config.young_inbound_max
            && self.active.entries.iter().any(|e| !e.is_young(settled));
        if self.active.len() >= self.config.active_view || over_quota {
            let established = now
                .checked_sub(self.config.established_after)
                .unwrap_or(now);
            let owed = outbound && self.active.outbound() < self.config.outbound_min;
            // Our own pick owed a slot may take any inbound neighbour's place. A peer about to
            // be cut off may too, but others' requests displace a neighbour at most once per
            // `displace_every`, so a flood of them gains a slot now and then, not the view;
            // a recent neighbour goes first, so such requests mostly displace each other. A
            // young identity displaces only another young one, so a flood of new identities
            // never costs a settled neighbour (a newcomer's join, at its contact, excepted:
            // it must get in somewhere).
            let victim = if owed {
                self.active.inbound_victim(&mut self.rng, established, true)
            } else if priority == Priority::High && (self.joining || self.may_displace(now)) {
                let victim = if young && (over_quota || !self.joining) {
                    self.active.young_victim(&mut self.rng, settled)
                } else {
                    self.active.inbound_victim(&mut self.rng, established, true)
                };
                if victim.is_some() && !self.joining {
                    self.last_forced = Some(now);
                }
                victim
            } else {
                None
            };
            let Some(victim) = victim else {
                return false;
            };
            self.drop_neighbor(victim, now, out);
        }
        self.passive.remove(&info.id);
        self.strays.retain(|s| s.id != info.id);
        self.active.entries.push(ActiveEntry {
            info,
            host,
            outbound,
            since: now,
            known_since,
        });
        out.push(Command::NeighborUp(info.id));
        true
    }

    /// Ends a neighbourship by our choice: the peer is told, keeps our slot in its passive
    /// view, and stays in ours.
    pub(super) fn drop_neighbor(&mut self, id: PeerId, now: Instant, out: &mut Vec<Command>) {
        if let Some(entry) = self.active.remove(&id) {
            out.push(Command::Send {
                to: id,
                msg: OverlayMessage::Disconnect,
            });
            out.push(Command::Disconnect(id));
            out.push(Command::NeighborDown(id));
            self.keep_former_neighbor(&entry, now);
        }
    }

    pub(super) fn on_neighbor_reply(
        &mut self,
        from: PeerId,
        accepted: bool,
        peers: PeerList,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let Some(at) = self
            .pending
            .iter()
            .position(|p| p.info.id == from && p.host.is_some())
        else {
            self.stats.unsolicited += 1;
            return;
        };
        let p = self.pending.swap_remove(at);
        let host = p.host.unwrap_or(Host::Peer(from));
        let (priority, outbound) = match p.request {
            Request::Join => (Priority::High, true),
            Request::Neighbor { priority, outbound } => (priority, outbound),
            Request::Rewire => (Priority::Low, true),
        };
        self.merge(peers.0.into_iter().take(REFUSAL_PEERS), &[], now);
        if accepted && p.request == Request::Rewire && !self.active.contains(&from) {
            self.make_room_for_rewire(from, now, out);
        }
        // Our side applies its own rules too: the view may have filled while we waited.
        if accepted && self.admit(p.info, host, priority, outbound, now, out) {
            self.repair_delay = self.config.repair_min;
            return;
        }
        if self.active.contains(&from) {
            return;
        }
        if accepted {
            out.push(Command::Send {
                to: from,
                msg: OverlayMessage::Disconnect,
            });
        }
        out.push(Command::Disconnect(from));
        self.keep_passive(p.info, host, false, now, &[]);
        self.refused(p.request, now);
    }

    pub(super) fn on_disconnect(&mut self, from: PeerId, now: Instant, out: &mut Vec<Command>) {
        if let Some(entry) = self.active.remove(&from) {
            out.push(Command::NeighborDown(from));
            out.push(Command::Disconnect(from));
            self.keep_former_neighbor(&entry, now);
            self.next_repair = now;
        } else if let Some(at) = self.pending.iter().position(|p| p.info.id == from) {
            let p = self.pending.swap_remove(at);
            self.close_unless_neighbor(from, out);
            self.refused(p.request, now);
        } else {
            self.stats.unsolicited += 1;
        }
    }

    pub(super) fn on_forward_join(
        &mut self,
        from: PeerId,
        joiner: PeerInfo,
        ttl: u8,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        if !self.active.contains(&from) {
            self.stats.unsolicited += 1;
            return;
        }
        if joiner.id == self.me.id
            || self.active.contains(&joiner.id)
            || !self.acceptable(&joiner, now)
        {
            return;
        }
        let ttl = ttl.min(self.config.active_walk);
        let host = Host::of(joiner.addr.ip());
        if ttl == 0 || self.active.len() <= 1 {
            let busy = self.pending.len() >= MAX_PENDING
                || self.pending.iter().any(|p| p.info.id == joiner.id);
            if !busy && self.can_admit_inbound(&joiner.id, &host, now) {
                self.request(
                    joiner,
                    Request::Neighbor {
                        priority: Priority::High,
                        outbound: false,
                    },
                    now,
                    out,
                );
            } else {
                self.keep_passive(joiner, host, false, now, &[]);
            }
            return;
        }
        if ttl == self.config.passive_walk {
            self.keep_passive(joiner, host, false, now, &[]);
        }
        if let Some(next) = self.active.random_except(&mut self.rng, Some(&from)) {
            out.push(Command::Send {
                to: next.id,
                msg: OverlayMessage::ForwardJoin {
                    joiner,
                    ttl: ttl - 1,
                },
            });
        }
    }

    pub(super) fn may_displace(&self, now: Instant) -> bool {
        self.last_forced
            .is_none_or(|t| t + self.config.displace_every <= now)
    }

    /// Whether a walk's newcomer from `host` may be offered a slot: a free one, or one held by
    /// an inbound neighbour not yet established. A stranger's walk never costs a neighbour held
    /// for long.
    pub(super) fn can_admit_inbound(&self, joiner: &PeerId, host: &Host, now: Instant) -> bool {
        if self.active.per_host(host) >= self.config.active_per_host {
            return false;
        }
        if self.crowd.is_crowded(host)
            && (self.crowd_full() || self.active.len() >= self.config.active_view)
        {
            return false;
        }
        let settled = self.settled(now);
        let young = self.passive.first_seen(joiner).is_none_or(|t| t > settled);
        let young_inbound = self.active.young_inbound(settled);
        let guarded = self.active.entries.iter().any(|e| !e.is_young(settled));
        if young && guarded && young_inbound >= self.config.young_inbound_max {
            return self.may_displace(now) && young_inbound > 0;
        }
        self.active.len() < self.config.active_view
            || self.may_displace(now) && {
                if young {
                    young_inbound > 0
                } else {
                    let established = now
                        .checked_sub(self.config.established_after)
                        .unwrap_or(now);
                    self.active
                        .entries
                        .iter()
                        .any(|e| !e.outbound && e.since > established)
                }
            }
    }

    /// Identities first heard of after this instant are young.
    pub(super) fn settled(&self, now: Instant) -> Instant {
        now.checked_sub(self.config.young_for)
            .map_or(self.born, |t| t.max(self.born))
    }

    pub(super) fn request(
        &mut self,
        info: PeerInfo,
        request: Request,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        if let Some(e) = self
            .passive
            .entries
            .iter_mut()
            .find(|e| e.info.id == info.id)
        {
            e.asked = Some(now);
        }
        self.pending.push(Pending {
            info,
            request,
            host: None,
            deadline: now + self.config.request_timeout,
        });
        out.push(Command::Connect(info));
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::tests::*;
    use super::*;

    #[test]
    fn forward_join_walks_the_configured_length() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        for n in 1..=3 {
            assert!(accepted(&ask(&mut ov, info(n), Priority::Low, now), id(n)));
        }
        let joiner = info(99);
        let walk = |ov: &mut Overlay, ttl: u8| {
            let mut out = Vec::new();
            ov.handle(
                Event::Message {
                    from: id(1),
                    msg: OverlayMessage::ForwardJoin { joiner, ttl },
                },
                now,
                &mut out,
            );
            out
        };
        // Mid-walk: one hop shorter, never back to the sender, not kept.
        for (ttl, next) in [(6, 5), (5, 4), (16, 5)] {
            let out = walk(&mut ov, ttl);
            assert_eq!(out.len(), 1, "{out:?}");
            match &out[0] {
                Command::Send {
                    to,
                    msg: OverlayMessage::ForwardJoin { ttl, .. },
                } => {
                    assert_ne!(*to, id(1));
                    assert_eq!(*ttl, next);
                }
                other => panic!("{other:?}"),
            }
            assert!(!ov.passive.contains(&joiner.id));
        }
        // At the passive walk length the newcomer is kept as a passive peer.
        let out = walk(&mut ov, 3);
        assert!(matches!(
            out[0],
            Command::Send {
                msg: OverlayMessage::ForwardJoin { ttl: 2, .. },
                ..
            }
        ));
        assert!(ov.passive.contains(&joiner.id));
        // Where the walk ends, this peer offers itself with high priority.
        let out = walk(&mut ov, 0);
        assert_eq!(out, vec![Command::Connect(joiner)]);
        let mut out = Vec::new();
        ov.handle(
            Event::ConnectionUp {
                peer: joiner.id,
                addr: joiner.addr,
            },
            now,
            &mut out,
        );
        assert_eq!(
            out,
            vec![Command::Send {
                to: joiner.id,
                msg: OverlayMessage::Neighbor {
                    info: ov.me(),
                    priority: Priority::High,
                },
            }]
        );
    }

    #[test]
    fn a_full_view_refuses_low_priority_and_gives_high_priority_an_inbound_slot() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        choose(&mut ov, info(1), start);
        choose(&mut ov, info(2), start);
        for n in 3..=5 {
            let at = start + Duration::from_secs(u64::from(n));
            assert!(accepted(&ask(&mut ov, info(n), Priority::Low, at), id(n)));
        }
        assert_eq!(ov.active_len(), 5);
        let now = start + Duration::from_secs(10);
        let out = ask(&mut ov, info(6), Priority::Low, now);
        assert!(!accepted(&out, id(6)));
        assert!(out.contains(&Command::Disconnect(id(6))));
        // High priority takes an inbound neighbour's slot, never an outbound one's.
        let out = ask(&mut ov, info(7), Priority::High, now);
        assert!(accepted(&out, id(7)));
        let gone: Vec<u32> = (3..=5)
            .filter(|&n| {
                out.contains(&Command::Send {
                    to: id(n),
                    msg: OverlayMessage::Disconnect,
                })
            })
            .collect();
        assert_eq!(gone.len(), 1, "{out:?}");
        assert!(ov.passive.contains(&id(gone[0])));
        // A burst of requesters long after the others joined only displaces itself.
        let established = start + Duration::from_secs(100);
        for n in 100..150 {
            ask(&mut ov, info(n), Priority::High, established);
            assert_eq!(ov.active_len(), 5);
            assert!(ov.active.contains(&id(1)) && ov.active.contains(&id(2)));
            let held = (3..=7).filter(|&k| ov.active.contains(&id(k))).count();
            assert_eq!(held, 2, "{n}");
        }
        // Once every inbound neighbour is established, a stranger's join walk no longer
        // earns a slot: the newcomer is only kept as a passive peer.
        let later = start + Duration::from_secs(200);
        let mut ov = overlay(0, start);
        choose(&mut ov, info(1), start);
        choose(&mut ov, info(2), start);
        for n in 3..=5 {
            ask(&mut ov, info(n), Priority::Low, start);
        }
        // Not the moment of a rewire, which might pick the newcomer.
        ov.next_rewire = later + Duration::from_secs(1000);
        let joiner = PeerInfo {
            issued: T0 + 200_000,
            ..info(8)
        };
        let mut out = Vec::new();
        ov.handle(
            Event::Message {
                from: id(3),
                msg: OverlayMessage::ForwardJoin { joiner, ttl: 0 },
            },
            later,
            &mut out,
        );
        assert!(!out.contains(&Command::Connect(joiner)));
        assert!(ov.passive.contains(&id(8)));
        assert_eq!(ov.active_len(), 5);
    }

    #[test]
    fn own_picks_may_displace_inbound_neighbours_until_the_outbound_quota_is_met() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        for n in 1..=5 {
            ask(&mut ov, info(n), Priority::Low, start);
        }
        let later = start + Duration::from_secs(300);
        choose(&mut ov, info(10), later);
        choose(&mut ov, info(11), later);
        assert_eq!(ov.active_len(), 5);
        assert_eq!(ov.outbound_len(), 2);
        // The quota is met: a third pick of our own is not owed a slot.
        let mut out = Vec::new();
        ov.request(
            info(12),
            Request::Neighbor {
                priority: Priority::Low,
                outbound: true,
            },
            later,
            &mut out,
        );
        ov.handle(
            Event::ConnectionUp {
                peer: id(12),
                addr: info(12).addr,
            },
            later,
            &mut out,
        );
        out.clear();
        ov.handle(
            Event::Message {
                from: id(12),
                msg: OverlayMessage::NeighborReply {
                    accepted: true,
                    peers: PeerList::default(),
                },
            },
            later,
            &mut out,
        );
        assert!(!ov.active.contains(&id(12)));
        assert!(out.contains(&Command::Disconnect(id(12))));
    }

    #[test]
    fn a_refusal_and_a_join_name_other_peers_to_try() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        for n in 1..=5 {
            ask(&mut ov, info(n), Priority::Low, now);
        }
        for n in 20..30 {
            ov.keep_passive(info(n), Host::of(info(n).addr.ip()), true, now, &[]);
        }
        let out = ask(&mut ov, info(6), Priority::Low, now);
        let named = out.iter().find_map(|c| match c {
            Command::Send {
                to,
                msg:
                    OverlayMessage::NeighborReply {
                        accepted: false,
                        peers,
                    },
            } if *to == id(6) => Some(peers.0.clone()),
            _ => None,
        });
        let named = named.expect("a refusal");
        assert_eq!(named.len(), REFUSAL_PEERS);
        assert!(named.iter().all(|p| (20..30).any(|n| p.id == id(n))));
        // A newcomer's join is answered with peers too, to start its passive view.
        let mut out = Vec::new();
        let joiner = info(40);
        ov.handle(
            Event::ConnectionUp {
                peer: joiner.id,
                addr: joiner.addr,
            },
            now,
            &mut out,
        );
        ov.handle(
            Event::Message {
                from: joiner.id,
                msg: OverlayMessage::Join { info: joiner },
            },
            now,
            &mut out,
        );
        assert!(out.iter().any(|c| matches!(
            c,
            Command::Send {
                msg: OverlayMessage::NeighborReply { accepted: true, peers },
                ..
            } if !peers.0.is_empty()
        )));
    }

    #[test]
    fn young_identities_never_displace_settled_neighbours_nor_win_our_picks() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        choose(&mut ov, info(1), start);
        choose(&mut ov, info(2), start);
        for n in 3..=5 {
            ask(&mut ov, info(n), Priority::Low, start);
        }
        // A passive peer heard of early on, whose copies keep coming fresh, is settled.
        let early = start + Duration::from_secs(10);
        let copy = |n: u32, at: Instant| PeerInfo {
            issued: T0 + u64::try_from((at - start).as_millis()).unwrap(),
            ..info(n)
        };
        ov.keep_passive(
            copy(50, early),
            Host::of(info(50).addr.ip()),
            false,
            early,
            &[],
        );
        let later = early + ov.config().young_for + Duration::from_secs(10);
        ov.keep_passive(
            copy(50, later),
            Host::of(info(50).addr.ip()),
            false,
            later,
            &[],
        );
        // Not the moment of a rewire, which would ask the settled peer first.
        ov.next_rewire = later + Duration::from_secs(1000);
        // Long after, a flood of identities first heard of now asks with high priority:
        // every neighbour is settled, so none of them gets a slot.
        for n in 100..110 {
            let out = ask(&mut ov, copy(n, later), Priority::High, later);
            assert!(!accepted(&out, id(n)), "{n}");
        }
        assert!((1..=5).all(|n| ov.active.contains(&id(n))));
        // Many young passive peers beside the settled one: our own picks go to the settled.
        for n in 60..80 {
            ov.keep_passive(
                copy(n, later),
                Host::of(info(n).addr.ip()),
                false,
                later,
                &[],
            );
        }
        for _ in 0..20 {
            let picked = ov
                .candidate(later)
                .map(|(info, settled)| (info.id, settled));
            assert_eq!(picked, Some((id(50), true)));
        }
    }
}
