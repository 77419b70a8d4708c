//! Repairs and rewires: how the active view is refilled from the passive view (and, when
//! nobody is left to ask, from the bootstrap contacts), and how a full view trades one of its
//! own picks now and then.

use super::*;

impl Overlay {
    /// A request of ours came to nothing: back off before the next.
    pub(super) fn refused(&mut self, request: Request, now: Instant) {
        if request == Request::Rewire {
            return;
        }
        if request == Request::Join {
            self.next_contact = self.next_contact.wrapping_add(1);
        }
        // A peer with no neighbour at all keeps asking quickly: it is cut off, and the refusals
        // it gets name other peers to try.
        let max = if self.active.is_empty() {
            self.config.repair_max.min(ISOLATED_REPAIR_MAX)
        } else {
            self.config.repair_max
        };
        self.repair_delay = (self.repair_delay * 2).min(max);
        self.next_repair = now + self.repair_delay;
    }

    /// Our requests in flight that would fill a free slot.
    pub(super) fn pending_neighbors(&self) -> usize {
        self.pending
            .iter()
            .filter(|p| p.request != Request::Rewire)
            .count()
    }

    /// Whether the view has room to repair. A full view short of its own picks is not
    /// repaired at the repair pace: its rewires (`rewire_interval`) trade inbound neighbours
    /// for picks of its own, without a stream of refused requests to full peers.
    pub(super) fn wants_neighbor(&self) -> bool {
        self.active.len() + self.pending_neighbors() < self.config.active_view
    }

    /// A full view trades one of our own picks for a passive peer with room now and then
    /// (gossipsub's opportunistic grafting, on one slot): the request is low priority, so
    /// only a peer with a free slot takes it, and the trade happens only once it accepted.
    /// Links of a group that split off then reach the rest whenever the group's passive views
    /// know of it, and the active graph keeps being re-randomised at a constant cost.
    pub(super) fn rewire(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.next_rewire = now + self.jittered(self.config.rewire_interval);
        if self.active.len() < self.config.active_view
            || self.pending.len() >= MAX_PENDING
            || self.pending.iter().any(|p| p.request == Request::Rewire)
        {
            return;
        }
        // Once this peer has been up for `young_for`, it rewires to settled peers only: a
        // trade is optional, and a flood's fresh identities must not win our own slots.
        match self.candidate(now) {
            Some((info, settled)) if settled || self.settled(now) <= self.born => {
                self.request(info, Request::Rewire, now, out);
            }
            _ => {}
        }
    }

    /// A passive peer to ask, and whether it is settled: settled ones first, each asked at
    /// most once per `ask_again_after`, or, before any young one, once per
    /// `REASK_SETTLED`.
    pub(super) fn candidate(&mut self, now: Instant) -> Option<(PeerInfo, bool)> {
        let active = &self.active;
        let pending = &self.pending;
        let per_host = self.config.active_per_host;
        let crowd_full = self.crowd_full();
        let open = |e: &PassiveEntry| {
            !active.contains(&e.info.id)
                && !pending.iter().any(|p| p.info.id == e.info.id)
                && active.per_host(&e.host) < per_host
                && (!e.crowded || !crowd_full)
        };
        let fresh = now.checked_sub(self.config.ask_again_after);
        let recent = now.checked_sub(REASK_SETTLED);
        let settled = self.settled(now);
        let first = self.passive.pick(&mut self.rng, settled, |e| {
            open(e) && e.asked.is_none_or(|t| fresh.is_some_and(|f| t <= f))
        });
        if let Some(info) = first
            && self
                .passive
                .first_seen(&info.id)
                .is_some_and(|t| t <= settled)
        {
            return Some((info, true));
        }
        let again = self.passive.pick(&mut self.rng, settled, |e| {
            open(e)
                && !e.crowded
                && e.first_seen <= settled
                && e.asked.is_none_or(|t| recent.is_some_and(|r| t <= r))
        });
        match again {
            Some(info) => Some((info, true)),
            None => first.map(|info| (info, false)),
        }
    }

    /// A rewire was accepted: one of our own picks gives up its slot, or, short of our own
    /// picks, an inbound neighbour does (`admit` makes that room).
    pub(super) fn make_room_for_rewire(
        &mut self,
        keep: PeerId,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        if self.active.len() < self.config.active_view
            || self.active.outbound() < self.config.outbound_min
        {
            return;
        }
        let ours: Vec<PeerId> = self
            .active
            .entries
            .iter()
            .filter(|e| e.outbound && e.info.id != keep)
            .map(|e| e.info.id)
            .collect();
        if let Some(&victim) = self.rng.choose(&ours) {
            self.drop_neighbor(victim, now, out);
        }
    }

    pub(super) fn repair(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.next_repair = now + self.repair_delay;
        match self.candidate(now).map(|(info, _)| info) {
            Some(info) => {
                // The paper asks with high priority only when the view is empty; one neighbour
                // is asked for the same way, or pairs of peers that hold only each other stay
                // cut off from the rest (measured with the simulator).
                let priority = if self.active.len() <= 1 {
                    Priority::High
                } else {
                    Priority::Low
                };
                let request = Request::Neighbor {
                    priority,
                    outbound: true,
                };
                self.request(info, request, now, out);
            }
            // Cut off, or nearly, with nobody left to ask: back to a contact. A peer with no
            // neighbour at all joins through two contacts at once when it has them, so one
            // lost message or busy contact does not keep it out for a request timeout (under
            // churn, newcomers waiting on a lost join were most of the peers outside the
            // largest component).
            None if self.active.len() <= 1 && !self.contacts.is_empty() => {
                let joins = if self.active.is_empty() {
                    MAX_PENDING
                } else {
                    1
                };
                let mut k = 0;
                while self.pending.len() < joins && k < self.contacts.len() {
                    let contact = self.contacts[(self.next_contact + k) % self.contacts.len()];
                    k += 1;
                    if !self.active.contains(&contact.id)
                        && !self.pending.iter().any(|p| p.info.id == contact.id)
                    {
                        self.request(contact, Request::Join, now, out);
                    }
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::tests::*;
    use super::*;

    #[test]
    fn a_failed_neighbour_is_forgotten_and_replaced_from_the_passive_view() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        ask(&mut ov, info(1), Priority::Low, now);
        ask(&mut ov, info(2), Priority::Low, now);
        ask(&mut ov, info(4), Priority::Low, now);
        ov.keep_passive(info(3), Host::of(info(3).addr.ip()), true, now, &[]);
        let later = now + Duration::from_secs(100);
        let mut out = Vec::new();
        ov.handle(
            Event::ConnectionDown {
                peer: id(1),
                graceful: false,
            },
            later,
            &mut out,
        );
        assert!(out.contains(&Command::NeighborDown(id(1))));
        assert!(!ov.passive.contains(&id(1)));
        assert!(out.contains(&Command::Connect(info(3))));
        out.clear();
        ov.handle(
            Event::ConnectionUp {
                peer: id(3),
                addr: info(3).addr,
            },
            later,
            &mut out,
        );
        assert!(out.contains(&Command::Send {
            to: id(3),
            msg: OverlayMessage::Neighbor {
                info: ov.me(),
                priority: Priority::Low
            }
        }));
        // A graceful close keeps the peer for later repairs; with one neighbour left the next
        // request is high priority.
        let mut out = Vec::new();
        ov.handle(
            Event::ConnectionDown {
                peer: id(4),
                graceful: false,
            },
            later,
            &mut out,
        );
        out.clear();
        ov.handle(
            Event::ConnectionDown {
                peer: id(2),
                graceful: true,
            },
            later,
            &mut out,
        );
        assert!(ov.passive.contains(&id(2)));
        assert!(out.contains(&Command::Connect(info(2))), "{out:?}");
        ov.handle(
            Event::ConnectionUp {
                peer: id(2),
                addr: info(2).addr,
            },
            later,
            &mut out,
        );
        assert!(out.contains(&Command::Send {
            to: id(2),
            msg: OverlayMessage::Neighbor {
                info: ov.me(),
                priority: Priority::High
            }
        }));
        // A dial that fails forgets the address.
        ov.handle(Event::DialFailed { peer: id(3) }, later, &mut out);
        assert!(!ov.passive.contains(&id(3)));
    }

    #[test]
    fn a_full_view_trades_one_of_its_own_picks_for_a_passive_peer_with_room() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        choose(&mut ov, info(1), start);
        choose(&mut ov, info(2), start);
        for n in 3..=5 {
            ask(&mut ov, info(n), Priority::Low, start);
        }
        ov.keep_passive(info(9), Host::of(info(9).addr.ip()), true, start, &[]);
        let at = ov.next_rewire;
        ov.next_shuffle = at + Duration::from_secs(1000);
        ov.next_refresh = at + Duration::from_secs(1000);
        let mut out = Vec::new();
        ov.handle(Event::Timer, at, &mut out);
        assert_eq!(out, vec![Command::Connect(info(9))]);
        out.clear();
        ov.handle(
            Event::ConnectionUp {
                peer: id(9),
                addr: info(9).addr,
            },
            at,
            &mut out,
        );
        // Asked with low priority: only a peer with room takes it.
        assert!(out.contains(&Command::Send {
            to: id(9),
            msg: OverlayMessage::Neighbor {
                info: ov.me(),
                priority: Priority::Low,
            },
        }));
        out.clear();
        ov.handle(
            Event::Message {
                from: id(9),
                msg: OverlayMessage::NeighborReply {
                    accepted: true,
                    peers: PeerList::default(),
                },
            },
            at,
            &mut out,
        );
        assert!(ov.active.get(&id(9)).is_some_and(|e| e.outbound));
        assert_eq!(ov.active_len(), 5);
        assert_eq!(ov.outbound_len(), 2);
        // One of the earlier picks went back to the passive view; inbound neighbours stayed.
        let gone: Vec<u32> = [1, 2]
            .into_iter()
            .filter(|&n| !ov.active.contains(&id(n)))
            .collect();
        assert_eq!(gone.len(), 1);
        assert!(ov.passive.contains(&id(gone[0])));
        assert!((3..=5).all(|n| ov.active.contains(&id(n))));
        // A refused rewire changes nothing and does not slow repairs down.
        let delay = ov.repair_delay;
        let at = ov.next_rewire;
        ov.next_shuffle = at + Duration::from_secs(1000);
        ov.keep_passive(info(10), Host::of(info(10).addr.ip()), true, at, &[]);
        let mut out = Vec::new();
        ov.handle(Event::Timer, at, &mut out);
        let asked = ov
            .pending
            .iter()
            .find(|p| p.request == Request::Rewire)
            .unwrap();
        let asked = asked.info;
        ov.handle(
            Event::ConnectionUp {
                peer: asked.id,
                addr: asked.addr,
            },
            at,
            &mut out,
        );
        ov.handle(
            Event::Message {
                from: asked.id,
                msg: OverlayMessage::NeighborReply {
                    accepted: false,
                    peers: PeerList(vec![info(11)]),
                },
            },
            at,
            &mut out,
        );
        assert_eq!(ov.active_len(), 5);
        assert_eq!(ov.repair_delay, delay);
        // The refusal's peers are kept to try later.
        assert!(ov.passive.contains(&id(11)));
    }

    #[test]
    fn a_peer_with_no_neighbour_joins_through_two_contacts_at_once() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        let mut out = Vec::new();
        for n in 1..=3 {
            ov.handle(Event::Contact(info(n)), now, &mut out);
        }
        let joins = |out: &[Command]| -> Vec<PeerId> {
            out.iter()
                .filter_map(|c| match c {
                    Command::Connect(p) => Some(p.id),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(joins(&out), vec![id(1), id(2)]);
        assert_eq!(ov.pending.len(), 2);
        // Both are accepted: the two contacts are our first picks.
        for n in 1..=2 {
            let mut out = Vec::new();
            ov.handle(
                Event::ConnectionUp {
                    peer: id(n),
                    addr: info(n).addr,
                },
                now,
                &mut out,
            );
            assert!(out.contains(&Command::Send {
                to: id(n),
                msg: OverlayMessage::Join { info: ov.me() },
            }));
            ov.handle(
                Event::Message {
                    from: id(n),
                    msg: OverlayMessage::NeighborReply {
                        accepted: true,
                        peers: PeerList::default(),
                    },
                },
                now,
                &mut out,
            );
        }
        assert_eq!(ov.outbound_len(), 2);
        // With one neighbour left, one join at a time, as before.
        let mut out = Vec::new();
        ov.handle(
            Event::ConnectionDown {
                peer: id(1),
                graceful: false,
            },
            now,
            &mut out,
        );
        ov.handle(Event::Timer, now + Duration::from_secs(1), &mut out);
        assert_eq!(joins(&out).len(), 1, "{out:?}");
    }
}
