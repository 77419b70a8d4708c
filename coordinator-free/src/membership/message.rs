//! The membership wire messages and their caps.
//!
//! Every variant is bounded so that a peer can check a message before acting on it and so the
//! framing layer can refuse anything larger than [`MAX_MESSAGE_BYTES`] before decoding.

use serde::{Deserialize, Serialize};

use super::advert::SignedAdvert;
use crate::peer_id::PeerId;

/// Most `(peer, seq)` entries in one [`Digest`]; a larger table is sent as several digests that
/// each cover a key range.
pub const MAX_DIGEST_ENTRIES: usize = 256;
/// Most adverts in one [`MembershipMessage::Adverts`].
pub const MAX_ADVERTS_PER_MESSAGE: usize = 64;
/// Most ids in one [`MembershipMessage::Request`].
pub const MAX_REQUEST_IDS: usize = 256;
/// Upper bound on an encoded message; every message within the caps above fits (checked by a
/// test), so the framing layer can reject longer frames unread.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;

/// One table entry as summarised in a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestEntry {
    pub peer: PeerId,
    pub seq: u64,
}

/// The sender's table restricted to the key range `start..end` (`None` = unbounded on that
/// side), sorted by peer. The range lets the receiver tell "the sender lacks this peer" from
/// "this peer is in another chunk".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub start: Option<PeerId>,
    pub end: Option<PeerId>,
    pub entries: Vec<DigestEntry>,
}

impl Digest {
    pub fn covers(&self, peer: &PeerId) -> bool {
        self.start.is_none_or(|s| *peer >= s) && self.end.is_none_or(|e| *peer < e)
    }
}

/// An advert in transit, with how long ago the sender saw its `seq` advance.
///
/// The age travels hop by hop so that a receiver dates the advert from when its owner issued
/// it, not from when gossip happened to deliver it: that is what bounds how long a crashed
/// peer survives in tables far from it, independently of how many hops gossip took.
///
/// `public_path` says whether some hop on the way came from a public address. A loopback or
/// private address in an advert is dialed only when it travelled over local hops alone: a peer
/// on the internet cannot make a LAN's machines dial into that LAN, even by laundering the
/// advert through an honest peer that sits on both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipedAdvert {
    pub signed: SignedAdvert,
    pub age_ms: u32,
    pub public_path: bool,
}

/// Anti-entropy messages (push-pull, Scuttlebutt style).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipMessage {
    /// "This is what I know": the receiver answers with adverts newer than the digest or
    /// missing from it, and requests the ones the digest shows are newer.
    Digest(Digest),
    /// Adverts, pushed or requested.
    Adverts(Vec<GossipedAdvert>),
    /// "Send me these peers' adverts."
    Request(Vec<PeerId>),
}

/// Why a membership message was refused.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("membership message of {len} bytes exceeds the {MAX_MESSAGE_BYTES}-byte cap")]
    TooLarge { len: usize },
    #[error("malformed membership message")]
    Malformed(#[source] postcard::Error),
    #[error("membership message has {trailing} trailing bytes")]
    Trailing { trailing: usize },
    #[error("{what} holds {len} items, at most {max} allowed")]
    OverCap {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("digest entries are not sorted, unique and inside the digest's range")]
    BadDigest,
    #[error("encoding a membership message failed")]
    Encode(#[source] postcard::Error),
}

impl MembershipMessage {
    /// Checks the caps and digest shape; postcard already bounds nothing beyond frame size.
    pub fn validate(&self) -> Result<(), MessageError> {
        let over = |what, len, max| {
            if len > max {
                Err(MessageError::OverCap { what, len, max })
            } else {
                Ok(())
            }
        };
        match self {
            Self::Digest(digest) => {
                over("digest", digest.entries.len(), MAX_DIGEST_ENTRIES)?;
                if let (Some(s), Some(e)) = (digest.start, digest.end)
                    && s >= e
                {
                    return Err(MessageError::BadDigest);
                }
                let sorted = digest.entries.windows(2).all(|w| w[0].peer < w[1].peer);
                // Sorted, so the ends bound the rest.
                let inside = [digest.entries.first(), digest.entries.last()]
                    .into_iter()
                    .flatten()
                    .all(|e| digest.covers(&e.peer));
                if !sorted || !inside {
                    return Err(MessageError::BadDigest);
                }
                Ok(())
            }
            Self::Adverts(adverts) => over("adverts", adverts.len(), MAX_ADVERTS_PER_MESSAGE),
            Self::Request(ids) => over("request", ids.len(), MAX_REQUEST_IDS),
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        let bytes = postcard::to_allocvec(self).map_err(MessageError::Encode)?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLarge { len: bytes.len() });
        }
        Ok(bytes)
    }

    /// Decodes and validates one message from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLarge { len: bytes.len() });
        }
        let (msg, rest): (Self, _) =
            postcard::take_from_bytes(bytes).map_err(MessageError::Malformed)?;
        if !rest.is_empty() {
            return Err(MessageError::Trailing {
                trailing: rest.len(),
            });
        }
        msg.validate()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

    use super::super::advert::{
        Advert, MAX_ADVERT_ADDRS, MAX_CORES, MAX_MEMORY_MB, MAX_SIGNATURE_LEN,
    };
    use super::*;

    fn id(n: u8) -> PeerId {
        let mut bytes = [0xabu8; 32];
        bytes[0] = n;
        PeerId::from_bytes(bytes)
    }

    fn biggest_advert(n: u8) -> GossipedAdvert {
        GossipedAdvert {
            signed: SignedAdvert {
                advert: Advert {
                    peer: id(n),
                    addrs: vec![
                        SocketAddr::V6(SocketAddrV6::new(
                            Ipv6Addr::from([0xfe; 16]),
                            u16::MAX,
                            0,
                            0
                        ));
                        MAX_ADVERT_ADDRS
                    ],
                    cores_donated: MAX_CORES,
                    cores_free: MAX_CORES,
                    memory_mb: MAX_MEMORY_MB,
                    profile: u32::MAX,
                    seq: u64::MAX,
                    job: Some(crate::digest::Digest([0xff; 32])),
                },
                signature: vec![0xff; MAX_SIGNATURE_LEN],
            },
            age_ms: u32::MAX,
            public_path: true,
        }
    }

    #[test]
    fn largest_messages_fit_the_frame_cap() {
        let adverts = MembershipMessage::Adverts(
            (0..MAX_ADVERTS_PER_MESSAGE as u8)
                .map(biggest_advert)
                .collect(),
        );
        let digest = MembershipMessage::Digest(Digest {
            start: Some(PeerId::from_bytes([0; 32])),
            end: None,
            entries: (0..MAX_DIGEST_ENTRIES as u16)
                .map(|n| {
                    let mut bytes = [0xffu8; 32];
                    bytes[0] = (n >> 8) as u8;
                    bytes[1] = n as u8;
                    DigestEntry {
                        peer: PeerId::from_bytes(bytes),
                        seq: u64::MAX,
                    }
                })
                .collect(),
        });
        let request = MembershipMessage::Request(vec![id(1); MAX_REQUEST_IDS]);
        for msg in [adverts, digest, request] {
            let bytes = msg.encode().unwrap();
            assert!(bytes.len() <= MAX_MESSAGE_BYTES);
            assert_eq!(MembershipMessage::decode(&bytes).unwrap(), msg);
        }
    }

    #[test]
    fn over_cap_and_bad_digests_are_refused() {
        let too_many = MembershipMessage::Request(vec![id(1); MAX_REQUEST_IDS + 1]);
        let bytes = postcard::to_allocvec(&too_many).unwrap();
        assert!(matches!(
            MembershipMessage::decode(&bytes),
            Err(MessageError::OverCap { .. })
        ));
        let unsorted = MembershipMessage::Digest(Digest {
            start: None,
            end: None,
            entries: vec![
                DigestEntry {
                    peer: id(2),
                    seq: 1,
                },
                DigestEntry {
                    peer: id(1),
                    seq: 1,
                },
            ],
        });
        assert!(matches!(unsorted.validate(), Err(MessageError::BadDigest)));
        let outside = MembershipMessage::Digest(Digest {
            start: Some(id(5)),
            end: None,
            entries: vec![DigestEntry {
                peer: id(1),
                seq: 1,
            }],
        });
        assert!(outside.validate().is_err());
        let inverted = MembershipMessage::Digest(Digest {
            start: Some(id(5)),
            end: Some(id(5)),
            entries: vec![],
        });
        assert!(inverted.validate().is_err());
        let mut bytes = MembershipMessage::Request(vec![]).encode().unwrap();
        bytes.push(0);
        assert!(matches!(
            MembershipMessage::decode(&bytes),
            Err(MessageError::Trailing { trailing: 1 })
        ));
        assert!(matches!(
            MembershipMessage::decode(&vec![0; MAX_MESSAGE_BYTES + 1]),
            Err(MessageError::TooLarge { .. })
        ));
    }
}
