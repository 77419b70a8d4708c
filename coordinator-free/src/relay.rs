//! Rendezvous for peers behind NAT: what a public relay peer keeps, and the messages of a relay
//! link (ALPN `cf-relay/1`).
//!
//! A peer behind NAT cannot be dialed, but it can dial out. It keeps a *reservation* on a relay
//! it chose (`worker run --via-relay`): a link it opened and holds open, which keeps its NAT's
//! mapping towards the relay alive and on which the relay says at which address it sees the
//! peer (its address on the public side of the NAT, which the peer then advertises). A peer
//! that wants to reach it asks the relay ([`RelayMessage::Connect`]); the relay tells the
//! reserved peer who is coming and from where ([`RelayMessage::Introduce`]), and the asker at
//! which address to dial ([`RelayMessage::Meet`]). The reserved peer sends a few small
//! datagrams towards the asker (its NAT then lets the asker's packets in), and the asker dials
//! it directly, from the same socket its relay link came from: QUIC hole punching, with the
//! relay carrying only the introduction.
//!
//! A relay is a public service anyone may use, so it holds little and answers slowly: at most
//! [`Limits::max_reservations`] reservations, [`Limits::per_host`] per host (a /24 of public
//! addresses: a thousand keys on one machine still hold four), each for at most
//! [`Limits::reservation_time`] before it must be renewed by a new link; introductions to one
//! reserved peer are rationed ([`Limits::introduce_rate`]), since each makes that peer send
//! datagrams. The address an introduction names is always the asker's as the relay observed
//! it on an authenticated QUIC connection, never one the asker chose, so a relay cannot be used
//! to make peers send datagrams at a third party. libp2p's circuit relay v2 is the reference
//! for the shape and the limits (128 reservations, 4 per peer, an hour each).
//!
//! [`RelayBook`] is the relay's bookkeeping with no IO: the caller passes `now`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::host::Host;
use crate::overlay::MessageError;
use crate::overlay::message::{decode_capped, encode_capped};
use crate::peer_id::PeerId;

/// A relay a peer behind NAT holds a reservation on: where peers ask to be introduced to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelayRef {
    pub peer: PeerId,
    pub addr: SocketAddr,
}

/// One message on a relay link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayMessage {
    /// Peer → relay: keep me reachable through you while this link lasts.
    Reserve,
    /// Relay → peer: the reservation holds for `secs` seconds; the link comes from `observed`.
    Reserved { observed: SocketAddr, secs: u32 },
    /// Peer → relay: introduce me to `target`, which holds a reservation here.
    Connect { target: PeerId },
    /// Relay → asker: `target` was told; dial it at `addr`.
    Meet { target: PeerId, addr: SocketAddr },
    /// Relay → reserved peer: `from` is about to dial you from `addr`; open your NAT to it.
    Introduce { from: PeerId, addr: SocketAddr },
    /// Relay → peer: what it asked for was refused.
    Refused(Refusal),
}

impl RelayMessage {
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        encode_capped(self)
    }

    /// Decodes one message from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        decode_capped(bytes)
    }
}

/// Why a relay refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the relay holds as many reservations as it allows")]
    Full,
    #[error("the relay holds as many reservations from this host as it allows")]
    HostFull,
    #[error("the peer asked for holds no reservation on this relay")]
    NoReservation,
    #[error("too many introductions asked for; try again later")]
    RateLimited,
    #[error("this peer does not relay")]
    NotRelay,
}

/// What a relay allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Reservations held at once.
    pub max_reservations: usize,
    /// Reservations held at once by peers of one host.
    pub per_host: usize,
    /// Longest one reservation lasts; the peer then reserves again on a new link.
    pub reservation_time: Duration,
    /// Introductions to one reserved peer per second, and in a burst.
    pub introduce_rate: f64,
    pub introduce_burst: f64,
    /// Introductions one link may ask for per second, and in a burst.
    pub connect_rate: f64,
    pub connect_burst: f64,
    /// Relay links open at once (reservations and askers together).
    pub max_links: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            per_host: 4,
            reservation_time: Duration::from_secs(3600),
            introduce_rate: 1.0,
            introduce_burst: 4.0,
            connect_rate: 1.0,
            connect_burst: 4.0,
            max_links: 256,
        }
    }
}

/// One reservation.
#[derive(Debug)]
struct Reservation {
    /// The relay link it lives on (the caller's number for it).
    link: u64,
    observed: SocketAddr,
    host: Host,
    until: Instant,
    introductions: Budget,
}

/// An introduction to make: tell the reserved peer on `link` that `from` comes from `from_addr`,
/// and the asker to dial `target_addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Introduction {
    pub target_link: u64,
    pub target_addr: SocketAddr,
}

/// The relay's reservations.
#[derive(Debug)]
pub struct RelayBook {
    limits: Limits,
    reservations: HashMap<PeerId, Reservation>,
}

impl RelayBook {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            reservations: HashMap::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Reservations held now.
    pub fn len(&self) -> usize {
        self.reservations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }

    /// `peer` asks on `link`, which comes from `observed`, to be reachable here; how long the
    /// reservation lasts. A new reservation of the same peer replaces its old one (a peer that
    /// lost its link and came back).
    pub fn reserve(
        &mut self,
        link: u64,
        peer: PeerId,
        observed: SocketAddr,
        now: Instant,
    ) -> Result<Duration, Refusal> {
        self.expire(now);
        let host = Host::of(observed.ip());
        let replacing = self.reservations.contains_key(&peer);
        if !replacing {
            if self.reservations.len() >= self.limits.max_reservations {
                return Err(Refusal::Full);
            }
            let same_host = self
                .reservations
                .values()
                .filter(|r| r.host == host)
                .count();
            if same_host >= self.limits.per_host {
                return Err(Refusal::HostFull);
            }
        }
        let introductions =
            Budget::new(self.limits.introduce_rate, self.limits.introduce_burst, now);
        self.reservations.insert(
            peer,
            Reservation {
                link,
                observed,
                host,
                until: now + self.limits.reservation_time,
                introductions,
            },
        );
        Ok(self.limits.reservation_time)
    }

    /// `link` closed: the reservations it held end.
    pub fn closed(&mut self, link: u64) {
        self.reservations.retain(|_, r| r.link != link);
    }

    /// `from` asks to be introduced to `target`: where the reserved peer is, if it holds a live
    /// reservation and may be introduced to someone now.
    pub fn connect(
        &mut self,
        from: PeerId,
        target: PeerId,
        now: Instant,
    ) -> Result<Introduction, Refusal> {
        self.expire(now);
        if from == target {
            return Err(Refusal::NoReservation);
        }
        let r = self
            .reservations
            .get_mut(&target)
            .ok_or(Refusal::NoReservation)?;
        if !r.introductions.take(now) {
            return Err(Refusal::RateLimited);
        }
        Ok(Introduction {
            target_link: r.link,
            target_addr: r.observed,
        })
    }

    /// Reservations past their time end; their links, to be closed.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let mut ended = Vec::new();
        self.reservations.retain(|_, r| {
            let live = r.until > now;
            if !live {
                ended.push(r.link);
            }
            live
        });
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        for msg in [
            RelayMessage::Reserve,
            RelayMessage::Reserved {
                observed: addr("203.0.113.7:40000"),
                secs: 3600,
            },
            RelayMessage::Connect { target: peer(1) },
            RelayMessage::Meet {
                target: peer(1),
                addr: addr("[2001:db8::1]:7401"),
            },
            RelayMessage::Introduce {
                from: peer(2),
                addr: addr("198.51.100.9:1234"),
            },
            RelayMessage::Refused(Refusal::HostFull),
        ] {
            let bytes = msg.encode().unwrap();
            assert_eq!(RelayMessage::decode(&bytes).unwrap(), msg);
        }
        assert!(RelayMessage::decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(RelayMessage::decode(&[]).is_err());
    }

    #[test]
    fn one_host_holds_at_most_its_share_of_reservations() {
        let now = Instant::now();
        let mut book = RelayBook::new(Limits::default());
        // A thousand keys on one public /24.
        let mut held = 0;
        for n in 0..=250u8 {
            let from = addr(&format!("203.0.113.{n}:5000"));
            match book.reserve(u64::from(n), peer(n), from, now) {
                Ok(_) => held += 1,
                Err(refusal) => assert_eq!(refusal, Refusal::HostFull),
            }
        }
        assert_eq!(held, 4);
        // Another host still gets in.
        assert!(
            book.reserve(999, peer(251), addr("198.51.100.1:5000"), now)
                .is_ok()
        );
    }

    #[test]
    fn the_relay_holds_at_most_its_reservations_and_frees_them_with_their_link() {
        let now = Instant::now();
        let limits = Limits {
            max_reservations: 3,
            ..Limits::default()
        };
        let mut book = RelayBook::new(limits);
        for n in 0..3u8 {
            let from = addr(&format!("198.51.{n}.1:5000"));
            book.reserve(u64::from(n), peer(n), from, now).unwrap();
        }
        assert_eq!(
            book.reserve(3, peer(3), addr("198.51.3.1:5000"), now),
            Err(Refusal::Full)
        );
        // The same peer renewing is no new reservation.
        assert!(
            book.reserve(7, peer(0), addr("198.51.0.1:5001"), now)
                .is_ok()
        );
        book.closed(1);
        assert_eq!(book.len(), 2);
        assert!(
            book.reserve(3, peer(3), addr("198.51.3.1:5000"), now)
                .is_ok()
        );
    }

    #[test]
    fn introductions_name_the_reserved_peer_and_are_rationed() {
        let now = Instant::now();
        let mut book = RelayBook::new(Limits::default());
        let target_addr = addr("198.51.100.2:40001");
        book.reserve(5, peer(1), target_addr, now).unwrap();
        assert_eq!(
            book.connect(peer(2), peer(9), now),
            Err(Refusal::NoReservation)
        );
        assert_eq!(
            book.connect(peer(1), peer(1), now),
            Err(Refusal::NoReservation)
        );
        let mut granted = 0;
        for _ in 0..20 {
            match book.connect(peer(2), peer(1), now) {
                Ok(intro) => {
                    assert_eq!(
                        intro,
                        Introduction {
                            target_link: 5,
                            target_addr
                        }
                    );
                    granted += 1;
                }
                Err(refusal) => assert_eq!(refusal, Refusal::RateLimited),
            }
        }
        assert_eq!(granted, 4, "the burst, then nothing until it refills");
        assert!(
            book.connect(peer(2), peer(1), now + Duration::from_secs(2))
                .is_ok()
        );
    }

    #[test]
    fn reservations_end_after_their_time() {
        let now = Instant::now();
        let mut book = RelayBook::new(Limits::default());
        book.reserve(5, peer(1), addr("198.51.100.2:1"), now)
            .unwrap();
        let later = now + Limits::default().reservation_time + Duration::from_secs(1);
        assert_eq!(book.expire(later), vec![5]);
        assert_eq!(
            book.connect(peer(2), peer(1), later),
            Err(Refusal::NoReservation)
        );
    }
}
