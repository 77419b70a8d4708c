//! Surveying the overlay: how a lab sees every peer without every peer holding every other.
//!
//! `worker status --all` asks the peers of this peer's views, then the peers of theirs, and so
//! on breadth first, each over a short-lived survey link (ALPN `cf-survey/1`): a peer answers
//! one [`SurveyMessage::Request`] with its capacity, the job it submits and its two views. The
//! walk stops when nobody new is named, at [`MAX_SURVEY_PEERS`] peers, or after
//! [`SURVEY_TIME`]; nothing is spent while nobody asks. In a network of a few hundred peers the
//! walk finds them all, and a walk that ran out of peers to ask counts the network exactly.
//!
//! [`Walk`] is the walk's bookkeeping with no IO, driven by the node.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::overlay::message::{decode_capped, encode_capped};
use crate::overlay::{MessageError, PeerInfo, PeerList};
use crate::peer_id::PeerId;

/// Most peers one walk finds.
pub const MAX_SURVEY_PEERS: usize = 1000;
/// Longest a walk runs.
pub const SURVEY_TIME: Duration = Duration::from_secs(10);
/// Peers asked at once.
pub const SURVEY_PARALLEL: usize = 16;
/// Most passive peers named in one reply (with at most the active view's few neighbours, the
/// reply fits one overlay-sized frame).
pub const MAX_REPLY_PASSIVE: usize = 20;
/// Most neighbours named in one reply.
pub const MAX_REPLY_ACTIVE: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SurveyMessage {
    Request,
    Reply(SurveyReply),
}

/// What a peer says of itself to a survey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurveyReply {
    pub cores_donated: u16,
    pub cores_free: u16,
    pub memory_mb: u32,
    pub profile: u32,
    /// The job it submits now, if any.
    pub job: Option<Digest>,
    /// Its neighbours and some of its passive peers, as hints: their signatures are not
    /// checked, since a surveyor dials each with the id named and TLS proves it.
    pub active: PeerList,
    pub passive: PeerList,
}

impl SurveyMessage {
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

    fn valid(&self) -> bool {
        match self {
            Self::Request => true,
            Self::Reply(r) => {
                r.active.0.len() <= MAX_REPLY_ACTIVE && r.passive.0.len() <= MAX_REPLY_PASSIVE
            }
        }
    }
}

/// A peer the walk found: where it was named, and its answer once it gave one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub addr: SocketAddr,
    pub reply: Option<SurveyReply>,
}

/// A breadth-first walk's state: who was found, who is still to be asked.
#[derive(Debug)]
pub struct Walk {
    me: PeerId,
    limit: usize,
    found: BTreeMap<PeerId, Found>,
    queue: VecDeque<PeerId>,
    asking: HashSet<PeerId>,
    /// Peers named but left out because the walk was full.
    left_out: bool,
}

impl Walk {
    /// A walk from `me`, starting with the peers of its own views.
    pub fn new(
        me: PeerId,
        seeds: impl IntoIterator<Item = (PeerId, SocketAddr)>,
        limit: usize,
    ) -> Self {
        let mut walk = Self {
            me,
            limit,
            found: BTreeMap::new(),
            queue: VecDeque::new(),
            asking: HashSet::new(),
            left_out: false,
        };
        for (id, addr) in seeds {
            walk.name(id, addr);
        }
        walk
    }

    fn name(&mut self, id: PeerId, addr: SocketAddr) {
        if id == self.me || self.found.contains_key(&id) {
            return;
        }
        if self.found.len() >= self.limit {
            self.left_out = true;
            return;
        }
        self.found.insert(id, Found { addr, reply: None });
        self.queue.push_back(id);
    }

    /// The next peer to ask, while fewer than `parallel` are being asked.
    pub fn next(&mut self, parallel: usize) -> Option<(PeerId, SocketAddr)> {
        if self.asking.len() >= parallel {
            return None;
        }
        let id = self.queue.pop_front()?;
        self.asking.insert(id);
        Some((id, self.found[&id].addr))
    }

    /// `peer` answered: the peers it names join the walk.
    pub fn answered(&mut self, peer: PeerId, reply: SurveyReply) {
        if !self.asking.remove(&peer) {
            return;
        }
        let named: Vec<PeerInfo> = reply
            .active
            .0
            .iter()
            .chain(&reply.passive.0)
            .copied()
            .collect();
        if let Some(found) = self.found.get_mut(&peer) {
            found.reply = Some(reply);
        }
        for info in named {
            self.name(info.id, info.addr);
        }
    }

    /// `peer` could not be asked (unreachable, refused, or no answer in time).
    pub fn failed(&mut self, peer: PeerId) {
        self.asking.remove(&peer);
    }

    /// Whether nobody is left to ask and nobody is being asked.
    pub fn done(&self) -> bool {
        self.queue.is_empty() && self.asking.is_empty()
    }

    /// Whether the walk asked everyone it heard of: then it counted the network (the part of
    /// it this peer's component reaches) exactly.
    pub fn complete(&self) -> bool {
        self.done() && !self.left_out
    }

    pub fn found(&self) -> &BTreeMap<PeerId, Found> {
        &self.found
    }

    /// Peers that answered.
    pub fn answered_count(&self) -> usize {
        self.found.values().filter(|f| f.reply.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u16) -> PeerId {
        let mut bytes = [0u8; 32];
        bytes[..2].copy_from_slice(&n.to_le_bytes());
        PeerId::from_bytes(bytes)
    }

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, (n >> 8) as u8, n as u8], 7401))
    }

    fn info(n: u16) -> PeerInfo {
        PeerInfo::new(id(n), addr(n), 1)
    }

    fn reply(active: &[u16], passive: &[u16]) -> SurveyReply {
        SurveyReply {
            cores_donated: 2,
            cores_free: 1,
            memory_mb: 1024,
            profile: 1,
            job: None,
            active: PeerList(active.iter().map(|&n| info(n)).collect()),
            passive: PeerList(passive.iter().map(|&n| info(n)).collect()),
        }
    }

    /// A ring of 50 peers, each naming its two neighbours and one passive peer ten along: the
    /// walk from peer 0 finds all 49 others, asks each once, and knows it counted them all.
    #[test]
    fn a_walk_finds_every_peer_of_a_ring_once() {
        const N: u16 = 50;
        let mut walk = Walk::new(id(0), [(id(1), addr(1)), (id(N - 1), addr(N - 1))], 1000);
        let mut asked = Vec::new();
        while !walk.done() {
            let mut batch = Vec::new();
            while let Some((peer, at)) = walk.next(4) {
                let n = u16::from_le_bytes([peer.as_bytes()[0], peer.as_bytes()[1]]);
                assert_eq!(at, addr(n));
                batch.push(n);
            }
            assert!(!batch.is_empty() && batch.len() <= 4);
            for n in batch {
                asked.push(n);
                walk.answered(
                    id(n),
                    reply(&[(n + 1) % N, (n + N - 1) % N, 0], &[(n + 10) % N]),
                );
            }
        }
        asked.sort_unstable();
        assert_eq!(
            asked,
            (1..N).collect::<Vec<_>>(),
            "each asked once, never itself"
        );
        assert!(walk.complete());
        assert_eq!(walk.found().len(), usize::from(N) - 1);
        assert_eq!(walk.answered_count(), usize::from(N) - 1);
    }

    #[test]
    fn a_full_walk_says_it_left_peers_out_and_failures_end_the_walk() {
        let mut walk = Walk::new(id(0), [(id(1), addr(1))], 3);
        let (p, _) = walk.next(16).unwrap();
        walk.answered(p, reply(&[2, 3], &[4, 5]));
        assert_eq!(walk.found().len(), 3);
        while let Some((p, _)) = walk.next(16) {
            walk.failed(p);
        }
        assert!(walk.done());
        assert!(!walk.complete(), "peers were named past the limit");
        // An answer nobody asked for changes nothing.
        walk.answered(id(9), reply(&[10], &[]));
        assert_eq!(walk.found().len(), 3);
    }

    #[test]
    fn replies_round_trip_and_over_long_lists_are_refused() {
        let msg = SurveyMessage::Reply(reply(&[1, 2, 3, 4, 5], &(10..30).collect::<Vec<_>>()));
        let bytes = msg.encode().expect("within the caps");
        assert_eq!(SurveyMessage::decode(&bytes).expect("decodes"), msg);
        let long = SurveyMessage::Reply(reply(&[1], &(10..31).collect::<Vec<_>>()));
        assert!(long.encode().is_err());
        let forged = postcard::to_allocvec(&long).expect("encodes");
        assert!(matches!(
            SurveyMessage::decode(&forged),
            Err(MessageError::OverCap)
        ));
        for cut in 0..bytes.len() {
            assert!(SurveyMessage::decode(&bytes[..cut]).is_err());
        }
    }
}
