//! The overlay's wire messages and their caps.
//!
//! Every list a peer can send is a [`PeerList`], whose decoder stops at [`MAX_LIST_PEERS`]
//! entries instead of trusting the length prefix, and every message fits in
//! [`MAX_MESSAGE_BYTES`], so the framing layer can refuse longer frames unread.

use std::fmt;
use std::net::SocketAddr;

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::peer_id::PeerId;

/// Most peers in one shuffle or shuffle reply. The default shuffle sends 8 (the sender, 3
/// active and 4 passive); the cap leaves room for larger configurations without letting one
/// message flood a passive view.
pub const MAX_LIST_PEERS: usize = 24;
/// Longest random walk a peer follows, whatever the message asks; every peer also clamps a
/// walk to its own configured length.
pub const MAX_WALK: u8 = 16;
/// Upper bound on an encoded message (checked by a test for the largest one within the caps).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// A peer as the overlay knows it: its identity, the address it accepts connections on, when
/// it issued this copy, and its signature over all three, so a copy's age cannot be forged:
/// whoever relays a copy can only relay it as old as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: PeerId,
    pub addr: SocketAddr,
    /// Wall-clock time of issue, milliseconds since the Unix epoch, by the peer's own clock.
    pub issued: u64,
    pub signature: Signature,
}

impl PeerInfo {
    /// An unsigned copy issued at `issued` (the signature is all zeros until a [`Seal`] signs
    /// it).
    pub fn new(id: PeerId, addr: SocketAddr, issued: u64) -> Self {
        Self {
            id,
            addr,
            issued,
            signature: Signature::default(),
        }
    }

    /// The bytes the signature covers: a domain prefix, then id, address and issue time as
    /// postcard encodes them.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = b"coordinator-free overlay peer info v1".to_vec();
        // Encoding a fixed-size struct into a vector cannot fail.
        if let Ok(body) = postcard::to_allocvec(&(self.id, self.addr, self.issued)) {
            bytes.extend_from_slice(&body);
        }
        bytes
    }
}

/// An Ed25519 signature: 64 bytes on the wire, no length prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 64]);

impl Default for Signature {
    fn default() -> Self {
        Self([0; 64])
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut tuple = serializer.serialize_tuple(64)?;
        for byte in &self.0 {
            tuple.serialize_element(byte)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes64;
        impl<'de> Visitor<'de> for Bytes64 {
            type Value = Signature;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "64 signature bytes")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Signature, A::Error> {
                let mut out = [0u8; 64];
                for (i, byte) in out.iter_mut().enumerate() {
                    *byte = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(Signature(out))
            }
        }
        deserializer.deserialize_tuple(64, Bytes64)
    }
}

/// Signs this peer's own [`PeerInfo`] whenever it is re-issued and checks every copy that
/// arrives. The driver gives the overlay one that uses the peer's Ed25519 key; the state
/// machine only calls it, so it stays free of IO.
pub trait Seal: fmt::Debug + Send {
    fn sign(&self, info: &PeerInfo) -> Signature;
    fn verify(&self, info: &PeerInfo) -> bool;
}

/// Signs nothing and accepts every copy: for simulations and tests, where identities are not
/// keys. The signature's 64 bytes still travel, so traffic estimates count them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unsealed;

impl Seal for Unsealed {
    fn sign(&self, _info: &PeerInfo) -> Signature {
        Signature::default()
    }

    fn verify(&self, _info: &PeerInfo) -> bool {
        true
    }
}

/// How badly the sender wants the neighbour: `High` when its active view is empty (the paper's
/// rule, so an isolated peer always finds a way back in), `Low` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Priority {
    High,
    Low,
}

/// A list of peers whose decoder refuses more than [`MAX_LIST_PEERS`] entries without
/// allocating for the length the sender claimed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerList(pub Vec<PeerInfo>);

impl Serialize for PeerList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for PeerList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bounded;
        impl<'de> Visitor<'de> for Bounded {
            type Value = PeerList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "at most {MAX_LIST_PEERS} peers")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PeerList, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > MAX_LIST_PEERS {
                    return Err(serde::de::Error::invalid_length(hint, &self));
                }
                let mut peers = Vec::with_capacity(hint);
                while let Some(peer) = seq.next_element()? {
                    if peers.len() == MAX_LIST_PEERS {
                        return Err(serde::de::Error::invalid_length(peers.len() + 1, &self));
                    }
                    peers.push(peer);
                }
                Ok(PeerList(peers))
            }
        }
        deserializer.deserialize_seq(Bounded)
    }
}

/// HyParView's messages. The sender's identity is the connection's (mutual TLS); a request
/// carries the sender's info, which must name that identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OverlayMessage {
    /// "Let me in": sent by a new peer to a contact over a fresh connection, with a fresh copy
    /// of its info.
    Join { info: PeerInfo },
    /// A new peer's join walking the active views; `ttl` counts the hops left.
    ForwardJoin { joiner: PeerInfo, ttl: u8 },
    /// "Be my neighbour", over a fresh connection.
    Neighbor { info: PeerInfo, priority: Priority },
    /// The answer to `Join` or `Neighbor`. A refusal is followed by the connection closing and
    /// names a few other peers to try (gossipsub's peer exchange on prune), so a peer whose
    /// passive view knows only full peers, or only its own group, learns of more.
    NeighborReply { accepted: bool, peers: PeerList },
    /// "You are no longer my neighbour" (the sender stays alive: keep it as a passive peer).
    Disconnect,
    /// A sample of the sender's views walking the active views; the peer where the walk ends
    /// answers `origin` directly. `nonce` ties the reply to the request.
    Shuffle {
        nonce: u64,
        origin: PeerInfo,
        ttl: u8,
        peers: PeerList,
    },
    /// A sample of the answering peer's passive view, over a short-lived connection.
    ShuffleReply { nonce: u64, peers: PeerList },
    /// A fresh copy of the sender's info, sent to its neighbours now and then so the copies
    /// they pass on in shuffles stay young, with the fresh copies of its other neighbours, so
    /// passive views keep filling with live peers as old copies expire.
    Refresh { info: PeerInfo, peers: PeerList },
}

/// Encodes a message of the overlay's links (overlay, broadcast or survey), refusing one over
/// [`MAX_MESSAGE_BYTES`].
pub(crate) fn encode_capped<T: Serialize>(msg: &T) -> Result<Vec<u8>, MessageError> {
    let bytes = postcard::to_allocvec(msg).map_err(MessageError::Encode)?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(MessageError::TooLarge { len: bytes.len() });
    }
    Ok(bytes)
}

/// Decodes one message of the overlay's links from untrusted bytes: at most
/// [`MAX_MESSAGE_BYTES`], no trailing bytes. What the kind checks beyond that is the caller's.
pub(crate) fn decode_capped<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, MessageError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(MessageError::TooLarge { len: bytes.len() });
    }
    let (msg, rest): (T, _) = postcard::take_from_bytes(bytes).map_err(MessageError::Malformed)?;
    if !rest.is_empty() {
        return Err(MessageError::Trailing {
            trailing: rest.len(),
        });
    }
    Ok(msg)
}

/// Why an overlay message was refused.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("overlay message of {len} bytes exceeds the {MAX_MESSAGE_BYTES}-byte cap")]
    TooLarge { len: usize },
    #[error("malformed overlay message")]
    Malformed(#[source] postcard::Error),
    #[error("overlay message has {trailing} trailing bytes")]
    Trailing { trailing: usize },
    #[error("walk of {ttl} hops is longer than {MAX_WALK}")]
    WalkTooLong { ttl: u8 },
    #[error("encoding an overlay message failed")]
    Encode(#[source] postcard::Error),
    #[error("broadcast message holds more than its caps allow")]
    OverCap,
}

impl OverlayMessage {
    /// Checks what postcard cannot: walk lengths. List lengths are already bounded by
    /// [`PeerList`]'s decoder.
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            Self::ForwardJoin { ttl, .. } | Self::Shuffle { ttl, .. } if *ttl > MAX_WALK => {
                Err(MessageError::WalkTooLong { ttl: *ttl })
            }
            _ => Ok(()),
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        encode_capped(self)
    }

    /// The length of the encoding, without allocating (what the simulator charges a sender).
    pub fn encoded_len(&self) -> usize {
        let mut buf = [0u8; MAX_MESSAGE_BYTES];
        // Messages built by the state machine are within the caps; an over-long one would be
        // refused by `encode` and is charged the cap here.
        postcard::to_slice(self, &mut buf).map_or(MAX_MESSAGE_BYTES, |b| b.len())
    }

    /// Decodes and validates one message from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let msg: Self = decode_capped(bytes)?;
        msg.validate()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv6Addr, SocketAddrV6};

    use proptest::prelude::*;

    use super::*;

    fn widest(n: u8) -> PeerInfo {
        PeerInfo {
            id: PeerId::from_bytes([n; 32]),
            addr: SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::new(
                    0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
                ),
                u16::MAX,
                0,
                0,
            )),
            issued: u64::MAX,
            signature: Signature([0xff; 64]),
        }
    }

    fn all_kinds() -> Vec<OverlayMessage> {
        let full = PeerList((0..MAX_LIST_PEERS as u8).map(widest).collect());
        vec![
            OverlayMessage::Join { info: widest(0) },
            OverlayMessage::ForwardJoin {
                joiner: widest(1),
                ttl: MAX_WALK,
            },
            OverlayMessage::Neighbor {
                info: widest(2),
                priority: Priority::High,
            },
            OverlayMessage::Refresh {
                info: widest(4),
                peers: PeerList((0..MAX_LIST_PEERS as u8 - 1).map(widest).collect()),
            },
            OverlayMessage::NeighborReply {
                accepted: false,
                peers: full.clone(),
            },
            OverlayMessage::Disconnect,
            OverlayMessage::Shuffle {
                nonce: u64::MAX,
                origin: widest(3),
                ttl: MAX_WALK,
                peers: full.clone(),
            },
            OverlayMessage::ShuffleReply {
                nonce: u64::MAX,
                peers: full,
            },
        ]
    }

    #[test]
    fn every_kind_round_trips_within_the_cap() {
        for msg in all_kinds() {
            let bytes = msg.encode().unwrap();
            assert!(bytes.len() <= MAX_MESSAGE_BYTES, "{msg:?}: {}", bytes.len());
            assert_eq!(msg.encoded_len(), bytes.len());
            assert_eq!(OverlayMessage::decode(&bytes).unwrap(), msg);
        }
    }

    #[test]
    fn an_over_long_list_is_refused_before_it_is_collected() {
        let msg = OverlayMessage::ShuffleReply {
            nonce: 1,
            peers: PeerList((0..=MAX_LIST_PEERS as u8).map(widest).collect()),
        };
        let bytes = postcard::to_allocvec(&msg).unwrap();
        assert!(matches!(
            OverlayMessage::decode(&bytes),
            Err(MessageError::Malformed(_) | MessageError::TooLarge { .. })
        ));
        // A length prefix claiming four billion peers in a few bytes.
        let mut forged = postcard::to_allocvec(&OverlayMessage::ShuffleReply {
            nonce: 1,
            peers: PeerList::default(),
        })
        .unwrap();
        forged.pop();
        forged.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(OverlayMessage::decode(&forged).is_err());
    }

    #[test]
    fn long_walks_and_trailing_bytes_are_refused() {
        let walk = OverlayMessage::ForwardJoin {
            joiner: widest(1),
            ttl: MAX_WALK + 1,
        };
        let bytes = postcard::to_allocvec(&walk).unwrap();
        assert!(matches!(
            OverlayMessage::decode(&bytes),
            Err(MessageError::WalkTooLong { .. })
        ));
        let mut bytes = OverlayMessage::Disconnect.encode().unwrap();
        bytes.push(0);
        assert!(matches!(
            OverlayMessage::decode(&bytes),
            Err(MessageError::Trailing { trailing: 1 })
        ));
        assert!(matches!(
            OverlayMessage::decode(&vec![0; MAX_MESSAGE_BYTES + 1]),
            Err(MessageError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = OverlayMessage::decode(&bytes);
        }
    }
}
