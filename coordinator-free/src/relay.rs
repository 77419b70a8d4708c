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
    /// Peer → relay: carry a circuit to `target`, which holds a reservation here (the path
    /// when a punch did not get through).
    Circuit { target: PeerId },
    /// Relay → reserved peer: `from`, seen at `addr`, wants a circuit; join it on a new link
    /// with `token`.
    CircuitFrom {
        from: PeerId,
        addr: SocketAddr,
        token: u64,
    },
    /// Reserved peer → relay, on a new link: this link is my end of circuit `token`.
    JoinCircuit { token: u64 },
    /// Relay → both ends: the circuit is up; what follows is [`RelayMessage::Data`].
    CircuitOpen,
    /// One datagram of the QUIC connection the two ends run through the circuit.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl RelayMessage {
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        encode_capped(self)
    }

    /// Decodes one message from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let msg: Self = decode_capped(bytes)?;
        if let Self::Data(datagram) = &msg
            && datagram.len() > MAX_CIRCUIT_DATAGRAM
        {
            return Err(MessageError::OverCap);
        }
        Ok(msg)
    }
}

/// Largest datagram a circuit carries: QUIC's own packets through a circuit stay at its
/// initial 1,200 bytes (the circuit reports that it may fragment, so no path MTU is probed).
pub const MAX_CIRCUIT_DATAGRAM: usize = 1500;

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
    #[error("the relay carries as many circuits as it allows")]
    CircuitsFull,
    #[error("no circuit of that token awaits this peer")]
    NoCircuit,
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
    /// Circuits carried at once, and at once for askers of one host.
    pub max_circuits: usize,
    pub circuits_per_host: usize,
    /// Bytes one circuit carries (both directions together) before it is closed.
    pub circuit_bytes: u64,
    /// Longest one circuit lasts.
    pub circuit_time: Duration,
    /// How long a circuit waits for the reserved peer to join it.
    pub join_wait: Duration,
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
            max_circuits: 16,
            circuits_per_host: 4,
            circuit_bytes: 256 << 20,
            circuit_time: Duration::from_secs(30 * 60),
            join_wait: Duration::from_secs(10),
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

/// A circuit asked for, or carried.
#[derive(Debug)]
struct Circuit {
    asker: u64,
    asker_host: Host,
    target: PeerId,
    /// The reserved peer's link, once it joined.
    joined: Option<u64>,
    bytes: u64,
    /// When it must be joined by, then when it ends.
    until: Instant,
}

/// Where a datagram arriving on a circuit link goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// To this link.
    To(u64),
    /// Nowhere: the circuit is over its bytes; these links are to be closed.
    Over(Vec<u64>),
    /// Nowhere: the link carries no open circuit.
    Stray,
}

/// The relay's reservations and circuits.
#[derive(Debug)]
pub struct RelayBook {
    limits: Limits,
    reservations: HashMap<PeerId, Reservation>,
    circuits: HashMap<u64, Circuit>,
    next_token: u64,
}

impl RelayBook {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            reservations: HashMap::new(),
            circuits: HashMap::new(),
            next_token: 0,
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

    /// `link` closed: the reservations it held end, and the circuits it was an end of; the
    /// links of their other ends, to be closed.
    pub fn closed(&mut self, link: u64) -> Vec<u64> {
        self.reservations.retain(|_, r| r.link != link);
        let mut others = Vec::new();
        self.circuits.retain(|_, c| {
            if c.asker == link {
                others.extend(c.joined);
                false
            } else if c.joined == Some(link) {
                others.push(c.asker);
                false
            } else {
                true
            }
        });
        others
    }

    /// `from`, on `link` from `from_addr`, asks for a circuit to `target`: the reserved peer's
    /// link, and the token it is to join with.
    pub fn open_circuit(
        &mut self,
        link: u64,
        from: PeerId,
        from_addr: SocketAddr,
        target: PeerId,
        now: Instant,
    ) -> Result<(u64, u64), Refusal> {
        self.expire(now);
        let asker_host = Host::of(from_addr.ip());
        if self.circuits.len() >= self.limits.max_circuits
            || self
                .circuits
                .values()
                .filter(|c| c.asker_host == asker_host)
                .count()
                >= self.limits.circuits_per_host
            || self.circuits.values().any(|c| c.asker == link)
        {
            return Err(Refusal::CircuitsFull);
        }
        let target_link = self.connect(from, target, now)?.target_link;
        let token = self.next_token;
        self.next_token += 1;
        self.circuits.insert(
            token,
            Circuit {
                asker: link,
                asker_host,
                target,
                joined: None,
                bytes: 0,
                until: now + self.limits.join_wait,
            },
        );
        Ok((target_link, token))
    }

    /// `peer` joins circuit `token` on `link`: the asker's link, to tell it the circuit is up.
    pub fn join_circuit(
        &mut self,
        link: u64,
        peer: PeerId,
        token: u64,
        now: Instant,
    ) -> Result<u64, Refusal> {
        self.expire(now);
        let limits = self.limits;
        let circuit = self
            .circuits
            .get_mut(&token)
            .filter(|c| c.target == peer && c.joined.is_none() && c.asker != link)
            .ok_or(Refusal::NoCircuit)?;
        circuit.joined = Some(link);
        circuit.until = now + limits.circuit_time;
        Ok(circuit.asker)
    }

    /// A datagram of `len` bytes arrived on `link`: where it goes.
    pub fn forward(&mut self, link: u64, len: usize) -> Forward {
        let cap = self.limits.circuit_bytes;
        let Some((&token, circuit)) = self
            .circuits
            .iter_mut()
            .find(|(_, c)| c.joined.is_some() && (c.asker == link || c.joined == Some(link)))
        else {
            return Forward::Stray;
        };
        circuit.bytes += len as u64;
        let (asker, joined) = (circuit.asker, circuit.joined.unwrap_or(circuit.asker));
        if circuit.bytes > cap {
            self.circuits.remove(&token);
            return Forward::Over(vec![asker, joined]);
        }
        Forward::To(if link == asker { joined } else { asker })
    }

    /// Whether `link` holds a reservation or is an end of a circuit.
    pub fn holds(&self, link: u64) -> bool {
        self.reservations.values().any(|r| r.link == link)
            || self
                .circuits
                .values()
                .any(|c| c.asker == link || c.joined == Some(link))
    }

    /// Circuits carried now (joined or not).
    pub fn circuits(&self) -> usize {
        self.circuits.len()
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

    /// Reservations and circuits past their time end; their links, to be closed.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let mut ended = Vec::new();
        self.reservations.retain(|_, r| {
            let live = r.until > now;
            if !live {
                ended.push(r.link);
            }
            live
        });
        self.circuits.retain(|_, c| {
            let live = c.until > now;
            if !live {
                ended.push(c.asker);
                ended.extend(c.joined);
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
    fn a_circuit_joins_its_two_links_counts_their_bytes_and_ends_with_either() {
        let now = Instant::now();
        let limits = Limits {
            circuit_bytes: 3000,
            ..Limits::default()
        };
        let mut book = RelayBook::new(limits);
        book.reserve(1, peer(1), addr("198.51.100.2:4000"), now)
            .unwrap();
        let asker_addr = addr("203.0.113.9:5000");
        assert_eq!(
            book.open_circuit(2, peer(2), asker_addr, peer(9), now),
            Err(Refusal::NoReservation)
        );
        let (target_link, token) = book
            .open_circuit(2, peer(2), asker_addr, peer(1), now)
            .unwrap();
        assert_eq!(target_link, 1);
        // Nothing flows before the reserved peer joins, and only it may join.
        assert_eq!(book.forward(2, 100), Forward::Stray);
        assert_eq!(
            book.join_circuit(3, peer(7), token, now),
            Err(Refusal::NoCircuit)
        );
        assert_eq!(book.join_circuit(3, peer(1), token, now), Ok(2));
        assert_eq!(
            book.join_circuit(4, peer(1), token, now),
            Err(Refusal::NoCircuit),
            "a circuit is joined once"
        );
        assert_eq!(book.forward(2, 1200), Forward::To(3));
        assert_eq!(book.forward(3, 1200), Forward::To(2));
        assert_eq!(book.forward(5, 1200), Forward::Stray);
        assert_eq!(book.forward(2, 1200), Forward::Over(vec![2, 3]));
        assert_eq!(book.circuits(), 0);

        let (_, token) = book
            .open_circuit(6, peer(2), asker_addr, peer(1), now)
            .unwrap();
        book.join_circuit(7, peer(1), token, now).unwrap();
        assert!(book.holds(6) && book.holds(7) && book.holds(1) && !book.holds(2));
        assert_eq!(book.closed(7), vec![6]);
        assert_eq!(book.circuits(), 0);
    }

    #[test]
    fn circuits_are_capped_per_asking_host_and_wait_a_while_for_their_join() {
        let now = Instant::now();
        let mut book = RelayBook::new(Limits {
            introduce_burst: 100.0,
            connect_burst: 100.0,
            ..Limits::default()
        });
        book.reserve(1, peer(1), addr("198.51.100.2:4000"), now)
            .unwrap();
        let mut opened = 0;
        for n in 0..10u8 {
            let from = addr(&format!("203.0.113.{n}:5000"));
            match book.open_circuit(10 + u64::from(n), peer(20 + n), from, peer(1), now) {
                Ok(_) => opened += 1,
                Err(refusal) => assert_eq!(refusal, Refusal::CircuitsFull),
            }
        }
        assert_eq!(opened, Limits::default().circuits_per_host);
        let later = now + Limits::default().join_wait + Duration::from_secs(1);
        let ended = book.expire(later);
        assert_eq!(ended.len(), opened, "unjoined circuits end: {ended:?}");
        assert_eq!(book.circuits(), 0);
    }

    #[test]
    fn an_oversized_datagram_does_not_decode() {
        let big = RelayMessage::Data(vec![0; MAX_CIRCUIT_DATAGRAM + 1]);
        let bytes = big.encode().unwrap();
        assert!(RelayMessage::decode(&bytes).is_err());
        let fits = RelayMessage::Data(vec![0; MAX_CIRCUIT_DATAGRAM]);
        assert_eq!(RelayMessage::decode(&fits.encode().unwrap()).unwrap(), fits);
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
