//! Job adverts: what a submitter broadcasts through the overlay so that workers it has never
//! met can pull its units.
//!
//! An advert names the submitter, the addresses it accepts pull links on, the job, what one
//! unit needs (engine profile, memory), how many more workers it wants and how large it
//! believes the network is, all under the submitter's Ed25519 signature together with the
//! advert's issue and expiry times. Relays cannot change any of it; they can only replay a copy
//! as old as it is, and an [`AdvertBook`] refuses copies older than the submitter's latest or
//! past their expiry. A copy's broadcast id is the BLAKE3 digest of its encoding.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::overlay::Signature;
use crate::peer_id::PeerId;

/// Most addresses an advert lists.
pub const MAX_ADVERT_ADDRS: usize = 4;
/// Longest an advert may live, counted from its issue: a submitter re-issues long before.
pub const MAX_LIFETIME_MS: u64 = 5 * 60 * 1000;
/// How far ahead of our clock an advert's issue time may be, for clocks that disagree a little.
pub const MAX_CLOCK_AHEAD_MS: u64 = 10_000;
/// Most submitters whose adverts a book keeps.
pub const MAX_BOOK: usize = 1024;
/// Most workers an advert may ask for, whatever it says: a submitter links to no more (its cap
/// on links), and an advert naming someone else's address must not send the whole network
/// there.
pub const MAX_WANTED: u32 = 1024;

/// A submitter's signed offer of work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAdvert {
    pub submitter: PeerId,
    pub addrs: Vec<SocketAddr>,
    pub job: Digest,
    /// The engine profile units must run under.
    pub profile: u32,
    /// Memory one unit may use, in bytes.
    pub memory_bytes: u64,
    /// How many more workers the submitter would link to now; 0 withdraws the job (it ended):
    /// such an advert shadows the older ones of its submitter until it expires, and no worker
    /// pulls on it.
    pub wanted: u32,
    /// The submitter's estimate of the network's size; 0 when it has none.
    pub network_size: u32,
    /// Wall-clock milliseconds since the Unix epoch, by the submitter's clock.
    pub issued: u64,
    pub expires: u64,
    /// The relay the submitter holds a reservation on, when it is behind NAT: a worker asks it
    /// for an introduction and then dials `addrs` directly.
    pub relay: Option<crate::relay::RelayRef>,
    pub signature: Signature,
}

/// Why an advert was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertError {
    #[error("advert does not decode")]
    Malformed,
    #[error("advert lists {count} addresses, at most {MAX_ADVERT_ADDRS} allowed")]
    TooManyAddrs { count: usize },
    #[error("advert's signature does not verify")]
    BadSignature,
    #[error("advert expired or lives longer than allowed")]
    OutOfTime,
    #[error("advert's broadcast id or expiry does not match its content")]
    Mismatch,
    #[error("a newer advert of this submitter is known")]
    Stale,
}

impl JobAdvert {
    /// The bytes the signature covers: a domain prefix, then every field but the signature as
    /// postcard encodes them.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = b"coordinator-free job advert v1".to_vec();
        let body = (
            self.submitter,
            &self.addrs,
            self.job,
            self.profile,
            self.memory_bytes,
            self.wanted,
            self.network_size,
            self.issued,
            self.expires,
            self.relay,
        );
        // Encoding plain fields into a vector cannot fail.
        if let Ok(encoded) = postcard::to_allocvec(&body) {
            bytes.extend_from_slice(&encoded);
        }
        bytes
    }

    /// Signs the advert with `sign` (the submitter's key).
    pub fn sign(&mut self, sign: impl FnOnce(&[u8]) -> [u8; 64]) {
        self.signature = Signature(sign(&self.signed_bytes()));
    }

    pub fn verify(&self) -> bool {
        crate::identity::verify_ed25519(&self.submitter, &self.signed_bytes(), &self.signature.0)
    }

    pub fn encode(&self) -> Vec<u8> {
        // Within the caps by construction (a few addresses, fixed-size fields).
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// The broadcast id of an encoded advert.
    pub fn id_of(encoded: &[u8]) -> [u8; 32] {
        Digest::of(encoded).0
    }

    /// Decodes an advert from untrusted bytes and checks what the bytes alone can say: size,
    /// addresses, signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, AdvertError> {
        if bytes.len() > crate::overlay::broadcast::MAX_ADVERT_BYTES {
            return Err(AdvertError::Malformed);
        }
        let (advert, rest): (Self, _) =
            postcard::take_from_bytes(bytes).map_err(|_| AdvertError::Malformed)?;
        if !rest.is_empty() {
            return Err(AdvertError::Malformed);
        }
        if advert.addrs.len() > MAX_ADVERT_ADDRS {
            return Err(AdvertError::TooManyAddrs {
                count: advert.addrs.len(),
            });
        }
        if !advert.verify() {
            return Err(AdvertError::BadSignature);
        }
        Ok(advert)
    }

    /// Whether the advert is current at `now_ms`: issued in the past (or a little ahead),
    /// not expired, and not meant to live longer than [`MAX_LIFETIME_MS`].
    pub fn current(&self, now_ms: u64) -> bool {
        self.issued <= now_ms.saturating_add(MAX_CLOCK_AHEAD_MS)
            && self.expires > now_ms
            && self.expires > self.issued
            && self.expires - self.issued <= MAX_LIFETIME_MS
    }

    /// Whether this advert says its job ended.
    pub fn withdrawn(&self) -> bool {
        self.wanted == 0
    }

    /// The probability with which an idle worker that hears this advert pulls: the share
    /// that makes about `wanted` workers (at most [`MAX_WANTED`]; twice that, for those that
    /// are busy) pull, in a network of the larger of the advert's size and the worker's own
    /// estimate (`local_size`, 0 when it has none), so an advert cannot claim a tiny network to
    /// draw everyone; one when neither knows.
    pub fn pull_probability(&self, local_size: u64) -> f64 {
        if self.withdrawn() {
            return 0.0;
        }
        let size = u64::from(self.network_size).max(local_size);
        if size == 0 {
            return 1.0;
        }
        (2.0 * f64::from(self.wanted.min(MAX_WANTED)) / size as f64).min(1.0)
    }
}

/// The latest current advert of each submitter heard of, bounded in count, each with the
/// neighbour it came through (`None`: this peer's own, or a book with one source).
#[derive(Debug, Default)]
pub struct AdvertBook {
    adverts: HashMap<PeerId, (JobAdvert, Option<PeerId>)>,
}

/// Why the book had no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NoRoom;

impl AdvertBook {
    /// Takes `advert`, which came through `via`, if it is current and newer than what is known
    /// of its submitter. When the book is full (expired adverts gone first), the source that
    /// holds the most entries gives way: its advert that expires first is dropped, or, when the
    /// new advert comes from that source, the new one is refused unless it outlives that
    /// entry. One neighbour relaying the adverts of a thousand keys thus fills at most its
    /// share of the book and cannot push out what others relay.
    pub fn admit_via(
        &mut self,
        advert: JobAdvert,
        via: Option<PeerId>,
        now_ms: u64,
    ) -> Result<(), AdvertError> {
        if !advert.current(now_ms) {
            return Err(AdvertError::OutOfTime);
        }
        if let Some((known, _)) = self.adverts.get(&advert.submitter)
            && known.issued >= advert.issued
        {
            return Err(AdvertError::Stale);
        }
        if !self.adverts.contains_key(&advert.submitter) && self.adverts.len() >= MAX_BOOK {
            self.expire(now_ms);
            if self.adverts.len() >= MAX_BOOK && self.make_room(&advert, via) == Err(NoRoom) {
                return Err(AdvertError::Stale);
            }
        }
        self.adverts.insert(advert.submitter, (advert, via));
        Ok(())
    }

    /// [`AdvertBook::admit_via`] for a book with one source.
    pub fn admit(&mut self, advert: JobAdvert, now_ms: u64) -> Result<(), AdvertError> {
        self.admit_via(advert, None, now_ms)
    }

    fn make_room(&mut self, advert: &JobAdvert, via: Option<PeerId>) -> Result<(), NoRoom> {
        let mut held: HashMap<Option<PeerId>, usize> = HashMap::new();
        for (_, source) in self.adverts.values() {
            *held.entry(*source).or_default() += 1;
        }
        let (top, most) = held
            .iter()
            .max_by_key(|(source, n)| (**n, **source))
            .map(|(source, n)| (*source, *n))
            .ok_or(NoRoom)?;
        if via != top && held.get(&via).copied().unwrap_or(0) >= most {
            return Err(NoRoom);
        }
        let (first, expires) = self
            .adverts
            .iter()
            .filter(|(_, (_, source))| *source == top)
            .map(|(submitter, (a, _))| (*submitter, a.expires))
            .min_by_key(|(submitter, expires)| (*expires, *submitter))
            .ok_or(NoRoom)?;
        if via == top && expires >= advert.expires {
            return Err(NoRoom);
        }
        self.adverts.remove(&first);
        Ok(())
    }

    /// Drops every advert past its expiry.
    pub fn expire(&mut self, now_ms: u64) {
        self.adverts.retain(|_, (a, _)| a.expires > now_ms);
    }

    /// Forgets a submitter's advert (it said it has no work for us).
    pub fn forget(&mut self, submitter: &PeerId) {
        self.adverts.remove(submitter);
    }

    pub fn get(&self, submitter: &PeerId) -> Option<&JobAdvert> {
        self.adverts.get(submitter).map(|(a, _)| a)
    }

    /// Current offers of work, ordered by submitter (withdrawals left out).
    pub fn current(&self, now_ms: u64) -> Vec<&JobAdvert> {
        let mut out: Vec<_> = self
            .adverts
            .values()
            .map(|(a, _)| a)
            .filter(|a| a.expires > now_ms && !a.withdrawn())
            .collect();
        out.sort_by_key(|a| a.submitter);
        out
    }

    pub fn len(&self) -> usize {
        self.adverts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adverts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    const NOW: u64 = 1_800_000_000_000;

    fn advert(identity: &Identity, issued: u64) -> JobAdvert {
        let mut a = JobAdvert {
            submitter: identity.id(),
            addrs: vec!["127.0.0.1:7401".parse().expect("addr")],
            job: Digest::of(b"job"),
            profile: crate::sandbox::PROFILE_VERSION,
            memory_bytes: 64 << 20,
            wanted: 10,
            network_size: 0,
            issued,
            expires: issued + 90_000,
            relay: None,
            signature: Signature::default(),
        };
        a.sign(|bytes| identity.sign(bytes));
        a
    }

    #[test]
    fn a_signed_advert_round_trips_and_any_change_breaks_it() {
        let id = Identity::generate().expect("identity");
        let a = advert(&id, NOW);
        let bytes = a.encode();
        assert_eq!(JobAdvert::decode(&bytes), Ok(a.clone()));

        let mut more = a.clone();
        more.wanted += 1;
        assert_eq!(
            JobAdvert::decode(&more.encode()),
            Err(AdvertError::BadSignature)
        );
        let mut later = a.clone();
        later.expires += 1;
        assert_eq!(
            JobAdvert::decode(&later.encode()),
            Err(AdvertError::BadSignature)
        );
        // A relayer cannot send workers to a relay of its choosing.
        let mut rerouted = a.clone();
        rerouted.relay = Some(crate::relay::RelayRef {
            peer: crate::peer_id::PeerId::from_bytes([7; 32]),
            addr: "198.51.100.1:7401".parse().expect("addr"),
        });
        assert_eq!(
            JobAdvert::decode(&rerouted.encode()),
            Err(AdvertError::BadSignature)
        );
        // Someone else's key over the same content is not the submitter's.
        let other = Identity::generate().expect("identity");
        let mut forged = a.clone();
        forged.sign(|bytes| other.sign(bytes));
        assert_eq!(
            JobAdvert::decode(&forged.encode()),
            Err(AdvertError::BadSignature)
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(JobAdvert::decode(&trailing), Err(AdvertError::Malformed));
        for cut in 0..bytes.len() {
            assert!(JobAdvert::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn too_many_addresses_are_refused_before_the_signature_is_checked() {
        let id = Identity::generate().expect("identity");
        let mut a = advert(&id, NOW);
        a.addrs = vec!["127.0.0.1:1".parse().expect("addr"); MAX_ADVERT_ADDRS + 1];
        a.sign(|bytes| id.sign(bytes));
        assert_eq!(
            JobAdvert::decode(&a.encode()),
            Err(AdvertError::TooManyAddrs {
                count: MAX_ADVERT_ADDRS + 1
            })
        );
    }

    #[test]
    fn the_book_keeps_the_newest_current_copy_per_submitter() {
        let id = Identity::generate().expect("identity");
        let mut book = AdvertBook::default();
        assert_eq!(book.admit(advert(&id, NOW), NOW), Ok(()));
        // The same copy again, or an older one, is stale: a replay changes nothing.
        assert_eq!(book.admit(advert(&id, NOW), NOW), Err(AdvertError::Stale));
        assert_eq!(
            book.admit(advert(&id, NOW - 1), NOW),
            Err(AdvertError::Stale)
        );
        assert_eq!(book.admit(advert(&id, NOW + 1), NOW), Ok(()));
        assert_eq!(book.get(&id.id()).map(|a| a.issued), Some(NOW + 1));
        // Expired, issued far ahead, or meant to live too long: refused.
        let expired = advert(&id, NOW - 100_000);
        assert_eq!(book.admit(expired, NOW), Err(AdvertError::OutOfTime));
        let ahead = advert(&id, NOW + MAX_CLOCK_AHEAD_MS + 1);
        assert_eq!(book.admit(ahead, NOW), Err(AdvertError::OutOfTime));
        let mut long = advert(&id, NOW + 2);
        long.expires = long.issued + MAX_LIFETIME_MS + 1;
        assert_eq!(book.admit(long, NOW), Err(AdvertError::OutOfTime));
        book.expire(NOW + 90_002);
        assert!(book.is_empty());
    }

    /// A submitter whose job ended broadcasts a withdrawal: workers stop pulling from it at
    /// once, and a replay of its last offer is stale.
    #[test]
    fn a_withdrawal_shadows_the_offer_and_is_not_current() {
        let id = Identity::generate().expect("identity");
        let mut book = AdvertBook::default();
        let offer = advert(&id, NOW);
        assert_eq!(book.admit(offer.clone(), NOW), Ok(()));
        assert_eq!(book.current(NOW).len(), 1);
        assert!(offer.pull_probability(0) > 0.0);
        let mut ended = advert(&id, NOW + 1);
        ended.wanted = 0;
        ended.sign(|bytes| id.sign(bytes));
        assert!(ended.withdrawn());
        assert_eq!(ended.pull_probability(0), 0.0);
        assert_eq!(book.admit(ended, NOW + 1), Ok(()));
        assert!(book.current(NOW + 1).is_empty());
        assert_eq!(book.admit(offer, NOW + 2), Err(AdvertError::Stale));
    }

    #[test]
    fn a_full_book_lets_the_first_to_expire_go() {
        let mut book = AdvertBook::default();
        let ids: Vec<Identity> = (0..MAX_BOOK + 1)
            .map(|_| Identity::generate().expect("identity"))
            .collect();
        for (i, id) in ids.iter().enumerate().take(MAX_BOOK) {
            assert_eq!(book.admit(advert(id, NOW + i as u64), NOW), Ok(()));
        }
        let first = ids[0].id();
        let last = &ids[MAX_BOOK];
        assert_eq!(book.admit(advert(last, NOW + 5_000), NOW), Ok(()));
        assert_eq!(book.len(), MAX_BOOK);
        assert!(book.get(&first).is_none());
        // One that would expire before everything held is not worth a place.
        let early = Identity::generate().expect("identity");
        assert_eq!(
            book.admit(advert(&early, NOW - 10_000), NOW),
            Err(AdvertError::Stale)
        );
    }

    /// A neighbour relaying the adverts of more keys than the book holds fills only what the
    /// others leave: adverts relayed by another neighbour still get in, and push out the
    /// flooder's, not each other.
    #[test]
    fn one_flooding_neighbour_cannot_push_out_what_others_relay() {
        let flooder = PeerId::from_bytes([1; 32]);
        let honest = PeerId::from_bytes([2; 32]);
        let mut book = AdvertBook::default();
        // Keys are cheap to make; their adverts are made once and reused for speed.
        let keys: Vec<Identity> = (0..MAX_BOOK + 50)
            .map(|_| Identity::generate().expect("identity"))
            .collect();
        for (i, key) in keys.iter().enumerate() {
            // Long-lived copies: they would outlive every honest one.
            let mut a = advert(key, NOW + i as u64 % 1_000);
            a.expires = a.issued + MAX_LIFETIME_MS;
            a.sign(|bytes| key.sign(bytes));
            let _ = book.admit_via(a, Some(flooder), NOW);
        }
        assert_eq!(book.len(), MAX_BOOK);
        // Ten honest submitters' adverts, short-lived, arrive through another neighbour.
        let submitters: Vec<Identity> = (0..10)
            .map(|_| Identity::generate().expect("identity"))
            .collect();
        for s in &submitters {
            assert_eq!(book.admit_via(advert(s, NOW), Some(honest), NOW), Ok(()));
        }
        assert_eq!(book.len(), MAX_BOOK);
        assert!(submitters.iter().all(|s| book.get(&s.id()).is_some()));
        // The flooder's next key is refused rather than displacing anyone.
        let more = Identity::generate().expect("identity");
        assert_eq!(
            book.admit_via(advert(&more, NOW + 5), Some(flooder), NOW),
            Err(AdvertError::Stale)
        );
        assert!(submitters.iter().all(|s| book.get(&s.id()).is_some()));
    }

    #[test]
    fn workers_pull_with_the_probability_that_meets_the_want() {
        let id = Identity::generate().expect("identity");
        let mut a = advert(&id, NOW);
        assert_eq!(a.pull_probability(0), 1.0);
        a.network_size = 10;
        assert_eq!(a.pull_probability(0), 1.0);
        a.network_size = 100_000;
        a.wanted = 50;
        assert!((a.pull_probability(0) - 0.001).abs() < 1e-12);
        // An advert that claims a tiny network and a huge want draws no more than the cap out
        // of the network the worker itself estimates.
        a.network_size = 1;
        a.wanted = u32::MAX;
        let p = a.pull_probability(1_000_000);
        assert!((p - 2.0 * f64::from(MAX_WANTED) / 1e6).abs() < 1e-12, "{p}");
    }
}
