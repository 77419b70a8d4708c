//! Peer identity: the 32-byte Ed25519 public key of a peer.
//!
//! The text form is lowercase RFC 4648 base32 without padding (52 characters). Base32 rather
//! than hex or base64 because it is case-insensitive, survives DNS labels and file names, and
//! is short enough to paste into an allow-list.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of a peer id in bytes.
pub const PEER_ID_LEN: usize = 32;
/// Length of a peer id's text form: ceil(256 / 5).
pub const PEER_ID_STR_LEN: usize = 52;

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// How many leading characters `Debug` shows: enough to tell peers apart in logs.
const DEBUG_PREFIX: usize = 10;

/// A peer's identity: its Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId([u8; PEER_ID_LEN]);

impl PeerId {
    pub const fn from_bytes(bytes: [u8; PEER_ID_LEN]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; PEER_ID_LEN] {
        &self.0
    }

    fn encode(&self) -> [u8; PEER_ID_STR_LEN] {
        let mut out = [0u8; PEER_ID_STR_LEN];
        let mut acc: u32 = 0;
        let mut bits = 0u32;
        let mut i = 0;
        for &byte in &self.0 {
            acc = (acc << 8) | u32::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out[i] = ALPHABET[((acc >> bits) & 31) as usize];
                i += 1;
            }
            acc &= (1 << bits) - 1;
        }
        if bits > 0 {
            out[i] = ALPHABET[((acc << (5 - bits)) & 31) as usize];
        }
        out
    }
}

fn symbol_value(c: u8) -> Option<u32> {
    match c {
        b'a'..=b'z' => Some(u32::from(c - b'a')),
        b'A'..=b'Z' => Some(u32::from(c - b'A')),
        b'2'..=b'7' => Some(u32::from(c - b'2') + 26),
        _ => None,
    }
}

/// Why a string is not a peer id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParsePeerIdError {
    #[error("a peer id is {expected} base32 characters, got {actual} bytes")]
    Length { expected: usize, actual: usize },
    #[error("invalid character {character:?} at position {position} in peer id")]
    InvalidCharacter { position: usize, character: char },
    /// The last character carries 4 unused bits; accepting non-zero ones would give one key
    /// several spellings, which breaks allow-lists compared as text.
    #[error("peer id is not canonical: its unused trailing bits are not zero")]
    NonCanonical,
}

impl FromStr for PeerId {
    type Err = ParsePeerIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != PEER_ID_STR_LEN {
            return Err(ParsePeerIdError::Length {
                expected: PEER_ID_STR_LEN,
                actual: s.len(),
            });
        }
        let mut out = [0u8; PEER_ID_LEN];
        let mut acc: u32 = 0;
        let mut bits = 0u32;
        let mut i = 0;
        for (position, &c) in s.as_bytes().iter().enumerate() {
            let Some(value) = symbol_value(c) else {
                let character = s
                    .get(position..)
                    .and_then(|rest| rest.chars().next())
                    .unwrap_or(char::REPLACEMENT_CHARACTER);
                return Err(ParsePeerIdError::InvalidCharacter {
                    position,
                    character,
                });
            };
            acc = (acc << 5) | value;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                // 52 * 5 = 260 bits: the 32 full bytes come out before the last 4 bits.
                if i < PEER_ID_LEN {
                    out[i] = (acc >> bits) as u8;
                    i += 1;
                }
            }
            acc &= (1 << bits) - 1;
        }
        if acc != 0 {
            return Err(ParsePeerIdError::NonCanonical);
        }
        Ok(Self(out))
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.encode();
        // The alphabet is ASCII, so this cannot fail.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.encode();
        let prefix = std::str::from_utf8(&text[..DEBUG_PREFIX]).map_err(|_| fmt::Error)?;
        write!(f, "PeerId({prefix}…)")
    }
}

/// Binary formats carry the raw 32 bytes; human-readable ones (JSON status output, TOML
/// allow-lists) carry the base32 text so the two never disagree on how an id looks.
impl Serialize for PeerId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for PeerId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            deserializer.deserialize_str(PeerIdVisitor)
        } else {
            deserializer.deserialize_bytes(PeerIdVisitor)
        }
    }
}

struct PeerIdVisitor;

impl<'de> Visitor<'de> for PeerIdVisitor {
    type Value = PeerId;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PEER_ID_LEN} bytes or {PEER_ID_STR_LEN} base32 characters"
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<PeerId, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<PeerId, E> {
        let bytes: [u8; PEER_ID_LEN] = v
            .try_into()
            .map_err(|_| E::invalid_length(v.len(), &self))?;
        Ok(PeerId(bytes))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<PeerId, A::Error> {
        let mut bytes = [0u8; PEER_ID_LEN];
        for (i, slot) in bytes.iter_mut().enumerate() {
            *slot = seq
                .next_element()?
                .ok_or_else(|| de::Error::invalid_length(i, &self))?;
        }
        if seq.next_element::<u8>()?.is_some() {
            return Err(de::Error::invalid_length(PEER_ID_LEN + 1, &self));
        }
        Ok(PeerId(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u8) -> PeerId {
        let mut bytes = [0u8; PEER_ID_LEN];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(seed);
        }
        PeerId::from_bytes(bytes)
    }

    #[test]
    fn known_vectors() {
        assert_eq!(
            PeerId::from_bytes([0; 32]).to_string(),
            "a".repeat(PEER_ID_STR_LEN)
        );
        // All ones: 51 full symbols, then the last bit padded with 0000 -> 10000 = 16 = 'q'.
        let ones = PeerId::from_bytes([0xff; 32]).to_string();
        assert_eq!(ones, format!("{}q", "7".repeat(51)));
        // RFC 4648 test vector "foobar" -> "mzxw6ytboi", extended with zero bytes.
        let mut bytes = [0u8; 32];
        bytes[..6].copy_from_slice(b"foobar");
        assert!(
            PeerId::from_bytes(bytes)
                .to_string()
                .starts_with("mzxw6ytboi")
        );
    }

    #[test]
    fn round_trips_text() {
        for seed in 0..=255u8 {
            let id = sample(seed);
            let text = id.to_string();
            assert_eq!(text.len(), PEER_ID_STR_LEN);
            assert!(text.bytes().all(|c| ALPHABET.contains(&c)));
            assert_eq!(text.parse::<PeerId>(), Ok(id));
            assert_eq!(text.to_uppercase().parse::<PeerId>(), Ok(id));
        }
    }

    #[test]
    fn rejects_bad_text() {
        let good = sample(7).to_string();
        assert_eq!(
            good[..51].parse::<PeerId>(),
            Err(ParsePeerIdError::Length {
                expected: 52,
                actual: 51
            })
        );
        let mut bad = good.clone();
        bad.replace_range(3..4, "1");
        assert_eq!(
            bad.parse::<PeerId>(),
            Err(ParsePeerIdError::InvalidCharacter {
                position: 3,
                character: '1'
            })
        );
        let mut bad = good.clone();
        bad.replace_range(0..2, "é");
        assert!(matches!(
            bad.parse::<PeerId>(),
            Err(ParsePeerIdError::InvalidCharacter {
                position: 0,
                character: 'é'
            })
        ));
        // Last symbol 'b' = 00001: a trailing unused bit set.
        let mut bad = "a".repeat(51);
        bad.push('b');
        assert_eq!(bad.parse::<PeerId>(), Err(ParsePeerIdError::NonCanonical));
    }

    #[test]
    fn debug_is_short() {
        let id = sample(1);
        let debug = format!("{id:?}");
        assert!(debug.starts_with("PeerId("));
        assert!(debug.len() < 24, "{debug}");
        assert!(id.to_string().starts_with(&debug[7..17]));
    }

    #[test]
    fn postcard_carries_raw_bytes() {
        let id = sample(9);
        let bytes = postcard::to_allocvec(&id).unwrap();
        assert_eq!(bytes.len(), 1 + PEER_ID_LEN);
        assert_eq!(&bytes[1..], id.as_bytes());
        assert_eq!(postcard::from_bytes::<PeerId>(&bytes).unwrap(), id);
        let mut short = bytes.clone();
        short[0] = 31;
        short.pop();
        assert!(postcard::from_bytes::<PeerId>(&short).is_err());
    }

    #[test]
    fn order_follows_bytes() {
        let low = PeerId::from_bytes([0; 32]);
        let mut high = [0; 32];
        high[0] = 1;
        assert!(low < PeerId::from_bytes(high));
    }
}
