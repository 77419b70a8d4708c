//! Signed capacity adverts: what a peer tells the network about itself.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::peer_id::PeerId;

/// Most addresses one advert may list (a dual-stack host with a few interfaces).
pub const MAX_ADVERT_ADDRS: usize = 8;
/// Longest signature accepted; Ed25519 needs 64 bytes.
pub const MAX_SIGNATURE_LEN: usize = 128;
/// More cores than any single machine offers today; anything above is a lie or a bug.
pub const MAX_CORES: u16 = 4096;
/// 64 TiB.
pub const MAX_MEMORY_MB: u32 = 64 * 1024 * 1024;
/// Upper bound on the canonical encoding of a valid [`Advert`], used to sign and verify
/// without allocating.
pub const MAX_ADVERT_BYTES: usize = 512;

/// What a peer offers, signed by the peer itself and spread by gossip.
///
/// `seq` orders a peer's adverts: a higher one replaces a lower one everywhere. The owner bumps
/// it on every heartbeat, which is also how others know it is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    pub peer: PeerId,
    /// Where the peer accepts connections; empty if it cannot be dialed (behind NAT).
    pub addrs: Vec<SocketAddr>,
    pub cores_donated: u16,
    pub cores_free: u16,
    pub memory_mb: u32,
    /// Engine profile version the peer runs units under.
    pub profile: u32,
    pub seq: u64,
    /// The job this peer is submitting now, if any: workers that it has not reached (they may
    /// not be dialable) open a job link to it and ask for work.
    pub job: Option<crate::digest::Digest>,
}

/// The capacity part of an advert, which the local node updates as units start and finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    pub cores_donated: u16,
    pub cores_free: u16,
    pub memory_mb: u32,
    pub profile: u32,
}

/// An advert with its owner's signature over the advert's canonical postcard bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAdvert {
    pub advert: Advert,
    pub signature: Vec<u8>,
}

/// Signs the local peer's adverts and checks other peers' ones.
///
/// Injected so the state machine stays free of key handling; the real implementation uses the
/// peer's Ed25519 key, tests use a cheap fake.
pub trait AdvertAuth {
    /// Signs `bytes` with the local peer's key.
    fn sign(&self, bytes: &[u8]) -> Vec<u8>;
    /// Whether `sig` is `peer`'s signature over `bytes`.
    fn verify(&self, peer: &PeerId, bytes: &[u8], sig: &[u8]) -> bool;
}

/// Why an advert was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertError {
    #[error("advert lists {count} addresses, at most {MAX_ADVERT_ADDRS} allowed")]
    TooManyAddrs { count: usize },
    #[error("advert lists an address that cannot be dialed: {addr}")]
    BadAddr { addr: SocketAddr },
    #[error(
        "advert capacity is implausible: {cores_free} of {cores_donated} cores free, {memory_mb} MB"
    )]
    Implausible {
        cores_donated: u16,
        cores_free: u16,
        memory_mb: u32,
    },
    #[error("advert signature is {len} bytes, at most {MAX_SIGNATURE_LEN} allowed")]
    SignatureTooLong { len: usize },
    #[error("advert does not fit its canonical encoding buffer")]
    Encoding,
    #[error("advert signature does not verify for {peer}")]
    BadSignature { peer: PeerId },
}

impl Advert {
    /// Field checks that need no key: a peer that sends absurd values is not trusted with them
    /// even when it signed them.
    pub fn check(&self) -> Result<(), AdvertError> {
        if self.addrs.len() > MAX_ADVERT_ADDRS {
            return Err(AdvertError::TooManyAddrs {
                count: self.addrs.len(),
            });
        }
        if let Some(&addr) = self
            .addrs
            .iter()
            .find(|a| a.port() == 0 || a.ip().is_unspecified() || a.ip().is_multicast())
        {
            return Err(AdvertError::BadAddr { addr });
        }
        if self.cores_donated > MAX_CORES
            || self.cores_free > self.cores_donated
            || self.memory_mb > MAX_MEMORY_MB
        {
            return Err(AdvertError::Implausible {
                cores_donated: self.cores_donated,
                cores_free: self.cores_free,
                memory_mb: self.memory_mb,
            });
        }
        Ok(())
    }

    /// The canonical bytes a signature covers, written into `buf`.
    pub fn signing_bytes<'a>(&self, buf: &'a mut [u8; MAX_ADVERT_BYTES]) -> Option<&'a [u8]> {
        postcard::to_slice(self, buf).ok().map(|bytes| &*bytes)
    }
}

impl SignedAdvert {
    /// Signs `advert` with the local key. Fails only if the advert itself is invalid, so a
    /// bad local configuration surfaces here rather than as silent rejection by every peer.
    pub fn sign(advert: Advert, auth: &impl AdvertAuth) -> Result<Self, AdvertError> {
        advert.check()?;
        let mut buf = [0u8; MAX_ADVERT_BYTES];
        let bytes = advert
            .signing_bytes(&mut buf)
            .ok_or(AdvertError::Encoding)?;
        let signature = auth.sign(bytes);
        Ok(Self { advert, signature })
    }

    /// Field checks, then the signature.
    pub fn verify(&self, auth: &impl AdvertAuth) -> Result<(), AdvertError> {
        self.advert.check()?;
        if self.signature.len() > MAX_SIGNATURE_LEN {
            return Err(AdvertError::SignatureTooLong {
                len: self.signature.len(),
            });
        }
        let mut buf = [0u8; MAX_ADVERT_BYTES];
        let bytes = self
            .advert
            .signing_bytes(&mut buf)
            .ok_or(AdvertError::Encoding)?;
        if auth.verify(&self.advert.peer, bytes, &self.signature) {
            Ok(())
        } else {
            Err(AdvertError::BadSignature {
                peer: self.advert.peer,
            })
        }
    }
}

#[cfg(test)]
pub(crate) mod test_auth {
    use super::*;

    /// A stand-in for Ed25519: the "signature" is a keyed FNV-1a hash of the signer's id and
    /// the bytes. Anyone could forge it, which is fine for tests that only need honest peers to
    /// verify and tampered adverts to fail.
    #[derive(Debug, Clone)]
    pub struct FakeAuth {
        pub me: PeerId,
    }

    pub fn fake_signature(peer: &PeerId, bytes: &[u8]) -> Vec<u8> {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ 0x5eed;
        // Two plain loops: a chained iterator is several times slower in debug builds, and
        // simulations verify millions of these.
        for &b in peer.as_bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        hash.to_le_bytes().to_vec()
    }

    impl AdvertAuth for FakeAuth {
        fn sign(&self, bytes: &[u8]) -> Vec<u8> {
            fake_signature(&self.me, bytes)
        }

        fn verify(&self, peer: &PeerId, bytes: &[u8], sig: &[u8]) -> bool {
            fake_signature(peer, bytes) == sig
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    use super::test_auth::FakeAuth;
    use super::*;

    fn advert() -> Advert {
        Advert {
            peer: PeerId::from_bytes([3; 32]),
            addrs: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 4000))],
            cores_donated: 8,
            cores_free: 3,
            memory_mb: 4096,
            profile: 1,
            seq: 17,
            job: None,
        }
    }

    #[test]
    fn sign_then_verify() {
        let auth = FakeAuth {
            me: PeerId::from_bytes([3; 32]),
        };
        let signed = SignedAdvert::sign(advert(), &auth).unwrap();
        assert_eq!(signed.verify(&auth), Ok(()));
        let mut tampered = signed.clone();
        tampered.advert.cores_free = 4;
        assert!(matches!(
            tampered.verify(&auth),
            Err(AdvertError::BadSignature { .. })
        ));
        let mut long = signed;
        long.signature = vec![0; MAX_SIGNATURE_LEN + 1];
        assert!(matches!(
            long.verify(&auth),
            Err(AdvertError::SignatureTooLong { .. })
        ));
    }

    #[test]
    fn absurd_fields_rejected() {
        let mut a = advert();
        a.cores_free = 9;
        assert!(matches!(a.check(), Err(AdvertError::Implausible { .. })));
        let mut a = advert();
        a.cores_donated = MAX_CORES + 1;
        a.cores_free = 0;
        assert!(a.check().is_err());
        let mut a = advert();
        a.memory_mb = MAX_MEMORY_MB + 1;
        assert!(a.check().is_err());
        let mut a = advert();
        a.addrs = vec![a.addrs[0]; MAX_ADVERT_ADDRS + 1];
        assert_eq!(a.check(), Err(AdvertError::TooManyAddrs { count: 9 }));
        let mut a = advert();
        a.addrs = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 4000))];
        assert!(matches!(a.check(), Err(AdvertError::BadAddr { .. })));
        let mut a = advert();
        a.addrs = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))];
        assert!(a.check().is_err());
    }

    #[test]
    fn largest_valid_advert_fits_the_buffer() {
        let mut a = advert();
        a.addrs = vec![
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from([0xff; 16]),
                u16::MAX,
                0,
                0
            ));
            MAX_ADVERT_ADDRS
        ];
        a.cores_donated = MAX_CORES;
        a.memory_mb = u32::MAX;
        a.profile = u32::MAX;
        a.seq = u64::MAX;
        a.job = Some(crate::digest::Digest([0xff; 32]));
        let mut buf = [0u8; MAX_ADVERT_BYTES];
        let len = a.signing_bytes(&mut buf).unwrap().len();
        assert!(len < MAX_ADVERT_BYTES / 2, "{len}");
    }
}
