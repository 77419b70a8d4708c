//! Epidemic broadcast of job adverts over the overlay's active view: PlumTree (Leitão, Pereira
//! and Rodrigues, 2007), as iroh-gossip runs it, as a sans-IO state machine.
//!
//! Each neighbour is *eager* (sent every advert in full) or *lazy* (sent only its id, batched
//! every `ihave_interval`). A neighbour starts eager; one that sends an advert we already had is
//! pruned to lazy, so the eager links settle into a spanning tree and each advert crosses each
//! peer about once in full. An id announced lazily that does not arrive in full within
//! `graft_timeout` is asked for (`Graft`), which also makes that link eager again: the tree
//! repairs itself as neighbours come and go. The overlay's `NeighborUp`/`NeighborDown` drive the
//! neighbour set. Adverts carry an expiry (wall-clock milliseconds); an expired one is neither
//! delivered nor forwarded, and what is remembered of seen adverts is bounded in count.
//! Traffic grows with the number of adverts, not of peers.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::MessageError;
use super::message::{decode_capped, encode_capped};
use crate::peer_id::PeerId;

/// Largest advert payload carried.
pub const MAX_ADVERT_BYTES: usize = 1024;
/// Most ids in one `IHave`.
pub const MAX_IHAVE: usize = 64;
/// Most adverts remembered (seen ids, and payloads kept to answer grafts).
pub const MAX_REMEMBERED: usize = 4096;

/// An advert's identity (the digest of its signed bytes, in the node).
pub type AdvertId = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BroadcastMessage {
    /// An advert in full; `round` counts the hops from its origin.
    Gossip {
        id: AdvertId,
        expires: u64,
        round: u16,
        payload: Vec<u8>,
    },
    /// Ids of adverts the sender has, for a lazy neighbour.
    IHave { ids: Vec<(AdvertId, u16)> },
    /// "Send me this one, and send me adverts in full from now on."
    Graft { id: AdvertId },
    /// "Send me only ids from now on."
    Prune,
}

impl BroadcastMessage {
    /// Whether a decoded message is within the caps.
    pub fn valid(&self) -> bool {
        match self {
            Self::Gossip { payload, .. } => payload.len() <= MAX_ADVERT_BYTES,
            Self::IHave { ids } => ids.len() <= MAX_IHAVE,
            Self::Graft { .. } | Self::Prune => true,
        }
    }

    /// The length of the encoding (what the simulator charges a sender).
    pub fn encoded_len(&self) -> usize {
        postcard::to_allocvec(self).map_or(MAX_ADVERT_BYTES * 2, |b| b.len())
    }

    /// Encodes a message within the caps (what the state machine builds always is).
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        if !self.valid() {
            return Err(MessageError::OverCap);
        }
        encode_capped(self)
    }

    /// Decodes one message from untrusted bytes and checks its caps.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let msg: Self = decode_capped(bytes)?;
        if !msg.valid() {
            return Err(MessageError::OverCap);
        }
        Ok(msg)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastConfig {
    /// How long an id announced lazily may stay missing before it is grafted. Default 100 ms.
    pub graft_timeout: Duration,
    /// How often lazy announcements go out, batched per neighbour. Default 100 ms.
    pub ihave_interval: Duration,
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        Self {
            graft_timeout: Duration::from_millis(100),
            ihave_interval: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BroadcastEvent {
    NeighborUp(PeerId),
    NeighborDown(PeerId),
    Message {
        from: PeerId,
        msg: BroadcastMessage,
    },
    /// This peer's own advert.
    Publish {
        id: AdvertId,
        expires: u64,
        payload: Vec<u8>,
    },
    Timer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BroadcastCommand {
    Send {
        to: PeerId,
        msg: BroadcastMessage,
    },
    /// An advert seen for the first time, for the node.
    Deliver {
        id: AdvertId,
        expires: u64,
        payload: Vec<u8>,
    },
}

#[derive(Debug, Clone)]
struct Missing {
    announcers: VecDeque<(PeerId, u16)>,
    deadline: Instant,
}

/// One peer's broadcast state.
#[derive(Debug, Default)]
pub struct Broadcast {
    config: BroadcastConfig,
    eager: Vec<PeerId>,
    lazy: Vec<PeerId>,
    /// Adverts seen, by id: expiry and payload (kept to answer grafts).
    seen: BTreeMap<AdvertId, (u64, Vec<u8>)>,
    missing: BTreeMap<AdvertId, Missing>,
    /// Lazy announcements waiting for the next batch.
    queued: Vec<(PeerId, AdvertId, u16)>,
    next_ihave: Option<Instant>,
}

impl Broadcast {
    pub fn new(config: BroadcastConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    pub fn eager(&self) -> &[PeerId] {
        &self.eager
    }

    pub fn lazy(&self) -> &[PeerId] {
        &self.lazy
    }

    /// Whether the advert `id` was seen (and is still remembered).
    pub fn has_seen(&self, id: &AdvertId) -> bool {
        self.seen.contains_key(id)
    }

    /// When to deliver the next [`BroadcastEvent::Timer`], if anything waits.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let missing = self.missing.values().map(|m| m.deadline).min();
        match (missing, self.next_ihave) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Processes one event at `now` (`unix_ms` is the wall clock, for expiries).
    pub fn handle(
        &mut self,
        event: BroadcastEvent,
        now: Instant,
        unix_ms: u64,
        out: &mut Vec<BroadcastCommand>,
    ) {
        match event {
            BroadcastEvent::NeighborUp(peer) => {
                self.lazy.retain(|p| *p != peer);
                if !self.eager.contains(&peer) {
                    self.eager.push(peer);
                }
            }
            BroadcastEvent::NeighborDown(peer) => {
                self.eager.retain(|p| *p != peer);
                self.lazy.retain(|p| *p != peer);
                self.queued.retain(|(p, _, _)| *p != peer);
                for m in self.missing.values_mut() {
                    m.announcers.retain(|(p, _)| *p != peer);
                }
            }
            BroadcastEvent::Publish {
                id,
                expires,
                payload,
            } => {
                if payload.len() <= MAX_ADVERT_BYTES && expires > unix_ms {
                    self.accept(None, id, expires, 0, payload, now, out);
                }
            }
            BroadcastEvent::Message { from, msg } => {
                if self.is_neighbor(&from) && msg.valid() {
                    self.on_message(from, msg, now, unix_ms, out);
                }
            }
            BroadcastEvent::Timer => {}
        }
        self.tick(now, unix_ms, out);
    }

    fn is_neighbor(&self, peer: &PeerId) -> bool {
        self.eager.contains(peer) || self.lazy.contains(peer)
    }

    fn on_message(
        &mut self,
        from: PeerId,
        msg: BroadcastMessage,
        now: Instant,
        unix_ms: u64,
        out: &mut Vec<BroadcastCommand>,
    ) {
        match msg {
            BroadcastMessage::Gossip {
                id,
                expires,
                round,
                payload,
            } => {
                if expires <= unix_ms {
                    return;
                }
                if self.seen.contains_key(&id) {
                    // A second copy: this link is redundant in the tree.
                    self.make_lazy(from);
                    out.push(BroadcastCommand::Send {
                        to: from,
                        msg: BroadcastMessage::Prune,
                    });
                    return;
                }
                self.make_eager(from);
                self.accept(Some(from), id, expires, round, payload, now, out);
            }
            BroadcastMessage::IHave { ids } => {
                for (id, round) in ids {
                    if self.seen.contains_key(&id) {
                        continue;
                    }
                    if self.missing.len() >= MAX_REMEMBERED && !self.missing.contains_key(&id) {
                        continue;
                    }
                    let deadline = now + self.config.graft_timeout;
                    let m = self.missing.entry(id).or_insert_with(|| Missing {
                        announcers: VecDeque::new(),
                        deadline,
                    });
                    if m.announcers.len() < 8 && !m.announcers.iter().any(|(p, _)| *p == from) {
                        m.announcers.push_back((from, round));
                    }
                }
            }
            BroadcastMessage::Graft { id } => {
                self.make_eager(from);
                if let Some((expires, payload)) = self.seen.get(&id)
                    && *expires > unix_ms
                {
                    out.push(BroadcastCommand::Send {
                        to: from,
                        msg: BroadcastMessage::Gossip {
                            id,
                            expires: *expires,
                            round: 0,
                            payload: payload.clone(),
                        },
                    });
                }
            }
            BroadcastMessage::Prune => self.make_lazy(from),
        }
    }

    /// A new advert: delivered, pushed in full to the eager neighbours, announced to the lazy.
    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        from: Option<PeerId>,
        id: AdvertId,
        expires: u64,
        round: u16,
        payload: Vec<u8>,
        now: Instant,
        out: &mut Vec<BroadcastCommand>,
    ) {
        self.missing.remove(&id);
        if self.seen.len() >= MAX_REMEMBERED {
            // Forget the advert that expires first.
            if let Some(first) = self
                .seen
                .iter()
                .min_by_key(|(_, (e, _))| *e)
                .map(|(k, _)| *k)
            {
                self.seen.remove(&first);
            }
        }
        self.seen.insert(id, (expires, payload.clone()));
        out.push(BroadcastCommand::Deliver {
            id,
            expires,
            payload: payload.clone(),
        });
        let next = round.saturating_add(1);
        for &peer in &self.eager {
            if Some(peer) != from {
                out.push(BroadcastCommand::Send {
                    to: peer,
                    msg: BroadcastMessage::Gossip {
                        id,
                        expires,
                        round: next,
                        payload: payload.clone(),
                    },
                });
            }
        }
        for &peer in &self.lazy {
            if Some(peer) != from {
                self.queued.push((peer, id, next));
            }
        }
        if !self.queued.is_empty() && self.next_ihave.is_none() {
            self.next_ihave = Some(now + self.config.ihave_interval);
        }
    }

    fn make_eager(&mut self, peer: PeerId) {
        if self.lazy.contains(&peer) {
            self.lazy.retain(|p| *p != peer);
            self.eager.push(peer);
        }
    }

    fn make_lazy(&mut self, peer: PeerId) {
        if self.eager.contains(&peer) {
            self.eager.retain(|p| *p != peer);
            self.lazy.push(peer);
        }
    }

    fn tick(&mut self, now: Instant, unix_ms: u64, out: &mut Vec<BroadcastCommand>) {
        // Missing adverts past their wait: graft the next announcer.
        let due: Vec<AdvertId> = self
            .missing
            .iter()
            .filter(|(_, m)| m.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(m) = self.missing.get_mut(&id) else {
                continue;
            };
            match m.announcers.pop_front() {
                Some((peer, _)) => {
                    m.deadline = now + self.config.graft_timeout;
                    self.make_eager(peer);
                    out.push(BroadcastCommand::Send {
                        to: peer,
                        msg: BroadcastMessage::Graft { id },
                    });
                }
                None => {
                    self.missing.remove(&id);
                }
            }
        }
        if self.next_ihave.is_some_and(|t| t <= now) {
            self.next_ihave = None;
            let mut batches: BTreeMap<PeerId, Vec<(AdvertId, u16)>> = BTreeMap::new();
            for (peer, id, round) in self.queued.drain(..) {
                let batch = batches.entry(peer).or_default();
                if batch.len() < MAX_IHAVE {
                    batch.push((id, round));
                }
            }
            for (to, ids) in batches {
                out.push(BroadcastCommand::Send {
                    to,
                    msg: BroadcastMessage::IHave { ids },
                });
            }
        }
        self.seen.retain(|_, (expires, _)| *expires > unix_ms);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn id(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    /// A line a - b - c - d plus a chord a - c, delivered in order without loss.
    #[test]
    fn an_advert_reaches_everyone_and_redundant_links_turn_lazy() {
        let now = Instant::now();
        let links = [(0u8, 1u8), (1, 2), (2, 3), (0, 2)];
        let mut peers: Vec<Broadcast> = (0..4)
            .map(|_| Broadcast::new(BroadcastConfig::default()))
            .collect();
        let mut out = Vec::new();
        for &(a, b) in &links {
            peers[a as usize].handle(BroadcastEvent::NeighborUp(id(b)), now, 0, &mut out);
            peers[b as usize].handle(BroadcastEvent::NeighborUp(id(a)), now, 0, &mut out);
        }
        let mut delivered = BTreeSet::new();
        let mut queue: VecDeque<(u8, BroadcastEvent)> = VecDeque::new();
        queue.push_back((
            0,
            BroadcastEvent::Publish {
                id: [7; 32],
                expires: 10_000,
                payload: b"job".to_vec(),
            },
        ));
        let mut t = now;
        for _ in 0..50 {
            while let Some((at, event)) = queue.pop_front() {
                let mut out = Vec::new();
                peers[at as usize].handle(event, t, 1, &mut out);
                for cmd in out {
                    match cmd {
                        BroadcastCommand::Deliver { .. } => {
                            assert!(delivered.insert(at), "delivered twice");
                        }
                        BroadcastCommand::Send { to, msg } => {
                            queue.push_back((
                                to.as_bytes()[0],
                                BroadcastEvent::Message { from: id(at), msg },
                            ));
                        }
                    }
                }
            }
            t += Duration::from_millis(50);
            for p in 0..4u8 {
                queue.push_back((p, BroadcastEvent::Timer));
            }
        }
        assert_eq!(delivered.len(), 4);
        // One of the two paths to c was pruned: the eager links form a tree (3 links, so 6
        // link ends).
        let eager: usize = peers.iter().map(|p| p.eager().len()).sum();
        assert!(eager <= 7, "{eager}");
        // A second advert after the first crosses each tree link once.
        let mut sends = 0;
        queue.push_back((
            3,
            BroadcastEvent::Publish {
                id: [8; 32],
                expires: 10_000,
                payload: b"job2".to_vec(),
            },
        ));
        while let Some((at, event)) = queue.pop_front() {
            let mut out = Vec::new();
            peers[at as usize].handle(event, t, 1, &mut out);
            for cmd in out {
                if let BroadcastCommand::Send { to, msg } = cmd {
                    if matches!(msg, BroadcastMessage::Gossip { .. }) {
                        sends += 1;
                    }
                    queue.push_back((
                        to.as_bytes()[0],
                        BroadcastEvent::Message { from: id(at), msg },
                    ));
                }
            }
        }
        assert!(sends <= 4, "{sends}");
    }

    #[test]
    fn a_lazy_announcement_is_grafted_and_expired_adverts_go_nowhere() {
        let now = Instant::now();
        let mut b = Broadcast::new(BroadcastConfig::default());
        let mut out = Vec::new();
        b.handle(BroadcastEvent::NeighborUp(id(1)), now, 0, &mut out);
        b.handle(
            BroadcastEvent::Message {
                from: id(1),
                msg: BroadcastMessage::Prune,
            },
            now,
            0,
            &mut out,
        );
        assert_eq!(b.lazy(), &[id(1)]);
        b.handle(
            BroadcastEvent::Message {
                from: id(1),
                msg: BroadcastMessage::IHave {
                    ids: vec![([5; 32], 2)],
                },
            },
            now,
            0,
            &mut out,
        );
        assert!(out.is_empty());
        let due = b.poll_timeout().unwrap();
        b.handle(BroadcastEvent::Timer, due, 0, &mut out);
        assert_eq!(
            out,
            vec![BroadcastCommand::Send {
                to: id(1),
                msg: BroadcastMessage::Graft { id: [5; 32] }
            }]
        );
        assert_eq!(b.eager(), &[id(1)]);
        // An expired advert is neither delivered nor forwarded; strangers are ignored.
        out.clear();
        for from in [id(1), id(9)] {
            b.handle(
                BroadcastEvent::Message {
                    from,
                    msg: BroadcastMessage::Gossip {
                        id: [6; 32],
                        expires: 100,
                        round: 0,
                        payload: vec![1],
                    },
                },
                due,
                200,
                &mut out,
            );
        }
        b.handle(
            BroadcastEvent::Message {
                from: id(9),
                msg: BroadcastMessage::Gossip {
                    id: [6; 32],
                    expires: 1_000,
                    round: 0,
                    payload: vec![1],
                },
            },
            due,
            200,
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
        // An over-long payload is refused.
        let big = BroadcastMessage::Gossip {
            id: [7; 32],
            expires: 1_000,
            round: 0,
            payload: vec![0; MAX_ADVERT_BYTES + 1],
        };
        assert!(!big.valid());
    }
}
