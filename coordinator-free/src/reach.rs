//! Which addresses this peer may dial, and how often: the defence against being used as a
//! reflector.
//!
//! A dial sends QUIC Initial packets (1,200 bytes each, retransmitted until the handshake
//! times out) to whatever address it names. Addresses reach us in adverts signed by whoever
//! claims them and in `BlobAt` frames from submitters, so without a check one ~100-byte frame
//! from a peer with many keys makes every idle worker send kilobytes to any address it likes.
//! [`Reach`] tells dials apart by what vouches for their address:
//!
//! * **confirmed**: we have had an authenticated connection with that peer id at exactly that
//!   address, inbound or outbound. Such an address belongs to a peer that spoke our protocol
//!   from it; dials to it are limited only by a back-off after failures.
//! * **bootstrap**: the operator named it (`--bootstrap`). Limited like a confirmed one.
//! * **probe**: anything else — an advertised address we have never seen its owner at, or one
//!   an mDNS answer named. A probe is how such an address becomes confirmed, so it cannot be
//!   refused outright, but it is rationed per IP address (one at a time, and a failed probe
//!   costs that IP [`PROBE_REFILL`] before the next) and overall (a bucket of
//!   [`GLOBAL_PROBES`] failures refilled one per [`GLOBAL_REFILL`]). A probe that reaches the
//!   peer it was meant for costs nothing: honest networks are not slowed, and a thousand
//!   adverts naming one victim produce one probe a minute towards it.
//!
//! `BlobAt` does not use probes at all: it names a peer id, and the fetcher dials it only at a
//! confirmed address (the submitter has the blob itself, so nothing is lost by asking it).
//!
//! This is a sans-IO book-keeper, like the state machines: the caller passes `now`, and the
//! async side (`JobDialer`) holds it behind a lock for the instant of each call.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::peer_id::PeerId;

/// How long one IP address waits for its next probe after a probe to it failed.
pub const PROBE_REFILL: Duration = Duration::from_secs(60);
/// Failed probes allowed back to back across all addresses.
pub const GLOBAL_PROBES: u32 = 16;
/// How fast that allowance comes back.
pub const GLOBAL_REFILL: Duration = Duration::from_secs(2);
/// Longest a probe may take. A handshake needs about two round trips, so this leaves room for
/// one lost Initial on a slow path (quinn retransmits it after about a second), while a dead
/// address gets the first Initial, one retransmission of two datagrams and the close: four.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(2500);
/// Probes in flight at once across all addresses.
pub const PROBES_IN_FLIGHT: usize = 8;
/// Dials in flight at once to one socket address (a peer may be dialed for membership, a job
/// link and a blob at the same moment).
const DIALS_PER_ADDR: u32 = 4;
/// The first back-off after a failed dial to a confirmed or bootstrap address; it doubles
/// per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Peers whose confirmed addresses are remembered; the least recently confirmed go first.
pub const MAX_CONFIRMED: usize = 8192;
/// Confirmed addresses remembered per peer; the least recent goes first.
const ADDRS_PER_PEER: usize = 4;
/// IP and socket addresses with dial state remembered. When full of live state, probes to new
/// addresses are refused: a flood of addresses fails closed.
pub const MAX_TRACKED: usize = 8192;

/// What vouches for the address of a dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vouch {
    /// The operator named it.
    Bootstrap,
    /// Nothing but a claim: an advert, an mDNS answer.
    Claimed,
    /// A peer's own signed info that this peer picked as an overlay neighbour, at its own pace
    /// and at most a few per host: limited like a bootstrap address, by back-off after
    /// failures. (Ranked as probes, dials that time out while many peers start at once on one
    /// machine closed their addresses for a minute, and 200 peers took 65 s to form one
    /// overlay instead of 7.)
    Chosen,
}

/// Leave to dial, to be handed back to [`Reach::finished`] with the outcome.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a ticket must be handed back when the dial ends"]
pub struct Ticket {
    addr: SocketAddr,
    probe: bool,
}

impl Ticket {
    /// Whether this dial is a probe of an unconfirmed address.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// Why a dial was not allowed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Another probe to this IP is under way; ask again when it has ended.
    #[error("a probe to this address is under way")]
    Busy,
    /// Dials to this address failed recently, or probes are used up for now.
    #[error("dials to this address are rationed after failures")]
    Rationed,
    /// Too many addresses are being tracked to take another.
    #[error("too many unconfirmed addresses at once")]
    Full,
}

impl Refusal {
    /// Whether waiting a moment may turn the refusal into a ticket.
    pub fn is_transient(self) -> bool {
        self == Refusal::Busy
    }
}

/// The addresses one peer was confirmed at, most recent last: a peer reached at its
/// advertised address and heard from another (a socket bound to every interface answers from
/// whichever the route picks) keeps both, so a later dial to either is no probe.
#[derive(Debug, Clone)]
struct Confirmed {
    addrs: Vec<SocketAddr>,
    at: Instant,
}

/// Probe state of one IP address.
#[derive(Debug, Clone, Copy)]
struct IpState {
    in_flight: bool,
    /// No probe before this instant (after a failed one).
    next: Instant,
}

/// Dial state of one socket address.
#[derive(Debug, Clone, Copy)]
struct AddrState {
    in_flight: u32,
    failures: u32,
    next: Instant,
}

/// The book of confirmed addresses and dial rations.
#[derive(Debug)]
pub struct Reach {
    confirmed: HashMap<PeerId, Confirmed>,
    ips: HashMap<IpAddr, IpState>,
    addrs: HashMap<SocketAddr, AddrState>,
    /// Failed probes that may still happen now, out of [`GLOBAL_PROBES`], and when the last
    /// refill was counted.
    global: u32,
    refilled: Instant,
    probes: usize,
}

impl Reach {
    pub fn new(now: Instant) -> Self {
        Self {
            confirmed: HashMap::new(),
            ips: HashMap::new(),
            addrs: HashMap::new(),
            global: GLOBAL_PROBES,
            refilled: now,
            probes: 0,
        }
    }

    /// `peer` proved its id on a connection with `addr` at the other end.
    pub fn confirm(&mut self, peer: PeerId, addr: SocketAddr, now: Instant) {
        let addr = canonical(addr);
        if !self.confirmed.contains_key(&peer) && self.confirmed.len() >= MAX_CONFIRMED {
            let oldest = self
                .confirmed
                .iter()
                .min_by_key(|(_, c)| c.at)
                .map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                self.confirmed.remove(&oldest);
            }
        }
        let entry = self.confirmed.entry(peer).or_insert(Confirmed {
            addrs: Vec::new(),
            at: now,
        });
        entry.at = now;
        entry.addrs.retain(|a| *a != addr);
        if entry.addrs.len() >= ADDRS_PER_PEER {
            entry.addrs.remove(0);
        }
        entry.addrs.push(addr);
    }

    /// The address `peer` was last confirmed at.
    pub fn confirmed(&self, peer: &PeerId) -> Option<SocketAddr> {
        self.confirmed
            .get(peer)
            .and_then(|c| c.addrs.last().copied())
    }

    fn is_confirmed(&self, peer: Option<PeerId>, addr: SocketAddr) -> bool {
        peer.is_some_and(|p| {
            self.confirmed
                .get(&p)
                .is_some_and(|c| c.addrs.contains(&addr))
        })
    }

    /// Asks leave to dial `peer` (when known) at `addr`.
    pub fn ask(
        &mut self,
        addr: SocketAddr,
        peer: Option<PeerId>,
        vouch: Vouch,
        now: Instant,
    ) -> Result<Ticket, Refusal> {
        let addr = canonical(addr);
        self.refill(now);
        let probe = vouch == Vouch::Claimed && !self.is_confirmed(peer, addr);
        if let Some(state) = self.addrs.get(&addr)
            && (state.in_flight >= DIALS_PER_ADDR || now < state.next)
        {
            return Err(if state.in_flight > 0 {
                Refusal::Busy
            } else {
                Refusal::Rationed
            });
        }
        if probe {
            if let Some(ip) = self.ips.get(&addr.ip()) {
                if ip.in_flight {
                    return Err(Refusal::Busy);
                }
                if now < ip.next {
                    return Err(Refusal::Rationed);
                }
            }
            if self.probes >= PROBES_IN_FLIGHT {
                return Err(Refusal::Busy);
            }
            if self.global == 0 {
                return Err(Refusal::Rationed);
            }
            if !self.ips.contains_key(&addr.ip()) && !self.make_room_for_ip(now) {
                return Err(Refusal::Full);
            }
        }
        if !self.addrs.contains_key(&addr) && !self.make_room_for_addr(now) {
            return Err(Refusal::Full);
        }
        if probe {
            self.ips.insert(
                addr.ip(),
                IpState {
                    in_flight: true,
                    next: now,
                },
            );
            self.probes += 1;
            // Charged now, refunded on success: a flood of probes that never finish (or
            // finish late) cannot overdraw the allowance.
            self.global -= 1;
        }
        let state = self.addrs.entry(addr).or_insert(AddrState {
            in_flight: 0,
            failures: 0,
            next: now,
        });
        state.in_flight += 1;
        Ok(Ticket { addr, probe })
    }

    /// The dial of `ticket` ended: `reached` is the id the remote proved, if the handshake
    /// completed with the peer that was asked for.
    pub fn finished(&mut self, ticket: Ticket, reached: Option<PeerId>, now: Instant) {
        let Ticket { addr, probe } = ticket;
        if let Some(state) = self.addrs.get_mut(&addr) {
            state.in_flight = state.in_flight.saturating_sub(1);
            if reached.is_some() {
                state.failures = 0;
                state.next = now;
            } else {
                state.failures = state.failures.saturating_add(1);
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << state.failures.saturating_sub(1).min(6))
                    .min(MAX_BACKOFF);
                state.next = now + backoff;
            }
        }
        if probe {
            self.probes = self.probes.saturating_sub(1);
            if let Some(ip) = self.ips.get_mut(&addr.ip()) {
                ip.in_flight = false;
                if reached.is_none() {
                    ip.next = now + PROBE_REFILL;
                }
            }
            if reached.is_some() {
                self.global = (self.global + 1).min(GLOBAL_PROBES);
            }
        }
        if let Some(peer) = reached {
            self.confirm(peer, addr, now);
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        let steps = (elapsed.as_millis() / GLOBAL_REFILL.as_millis().max(1)) as u64;
        if steps == 0 {
            return;
        }
        let steps_u32 = u32::try_from(steps).unwrap_or(u32::MAX);
        self.global = self.global.saturating_add(steps_u32).min(GLOBAL_PROBES);
        self.refilled = if self.global == GLOBAL_PROBES {
            now
        } else {
            self.refilled + GLOBAL_REFILL * steps_u32
        };
    }

    /// Forgets IP states at rest (no probe in flight, ration over); `false` when none is.
    fn make_room_for_ip(&mut self, now: Instant) -> bool {
        if self.ips.len() < MAX_TRACKED {
            return true;
        }
        self.ips.retain(|_, s| s.in_flight || now < s.next);
        self.ips.len() < MAX_TRACKED
    }

    fn make_room_for_addr(&mut self, now: Instant) -> bool {
        if self.addrs.len() < MAX_TRACKED {
            return true;
        }
        self.addrs.retain(|_, s| s.in_flight > 0 || now < s.next);
        self.addrs.len() < MAX_TRACKED
    }
}

/// A dual-stack socket reports IPv4 peers as `::ffff:a.b.c.d`; one address, one entry.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    fn addr(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("ip"), port)
    }

    #[test]
    fn a_thousand_claims_on_one_ip_make_one_probe_a_minute() {
        let t0 = Instant::now();
        let mut reach = Reach::new(t0);
        let victim = "192.0.2.7";
        let mut tickets = Vec::new();
        for i in 0..1000u16 {
            if let Ok(t) = reach.ask(addr(victim, 1000 + i), Some(id(1)), Vouch::Claimed, t0) {
                tickets.push(t);
            }
        }
        assert_eq!(tickets.len(), 1, "one probe at a time per IP");
        for t in tickets {
            reach.finished(t, None, t0);
        }
        let mut later = 0;
        for s in 1..=120u64 {
            let now = t0 + Duration::from_secs(s);
            for i in 0..10u16 {
                if let Ok(t) = reach.ask(addr(victim, 3000 + i), Some(id(2)), Vouch::Claimed, now) {
                    later += 1;
                    reach.finished(t, None, now);
                }
            }
        }
        assert_eq!(later, 2, "one more probe per minute after a failure");
    }

    #[test]
    fn probes_that_reach_their_peer_cost_nothing() {
        let t0 = Instant::now();
        let mut reach = Reach::new(t0);
        for port in 0..200u16 {
            let a = addr("127.0.0.1", 7000 + port);
            let peer = id((port % 250) as u8);
            let t = reach.ask(a, Some(peer), Vouch::Claimed, t0).expect("probe");
            assert!(t.is_probe());
            reach.finished(t, Some(peer), t0);
        }
        let t = reach
            .ask(addr("127.0.0.1", 7199), Some(id(199)), Vouch::Claimed, t0)
            .expect("dial");
        assert!(!t.is_probe(), "a reached address is confirmed");
        reach.finished(t, Some(id(199)), t0);
    }

    #[test]
    fn failed_probes_over_many_ips_draw_on_one_allowance() {
        let t0 = Instant::now();
        let mut reach = Reach::new(t0);
        let mut probes = 0;
        for i in 0..1000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if let Ok(t) = reach.ask(SocketAddr::new(ip, 7000), None, Vouch::Claimed, t0) {
                probes += 1;
                reach.finished(t, None, t0);
            }
        }
        assert_eq!(probes, GLOBAL_PROBES as usize);
        let later = t0 + GLOBAL_REFILL * 5;
        let mut more = 0;
        for i in 1000..2000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if let Ok(t) = reach.ask(SocketAddr::new(ip, 7000), None, Vouch::Claimed, later) {
                more += 1;
                reach.finished(t, None, later);
            }
        }
        assert_eq!(more, 5, "one failed probe per refill period");
    }

    #[test]
    fn probes_in_flight_are_capped_overall() {
        let t0 = Instant::now();
        let mut reach = Reach::new(t0);
        let mut held = Vec::new();
        for i in 0..100u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if let Ok(t) = reach.ask(SocketAddr::new(ip, 7000), None, Vouch::Claimed, t0) {
                held.push(t);
            }
        }
        assert_eq!(held.len(), PROBES_IN_FLIGHT);
        for t in held {
            reach.finished(t, None, t0);
        }
    }

    #[test]
    fn confirmed_and_bootstrap_addresses_back_off_after_failures() {
        let t0 = Instant::now();
        let mut reach = Reach::new(t0);
        let a = addr("127.0.0.2", 7000);
        reach.confirm(id(1), a, t0);
        let t = reach.ask(a, Some(id(1)), Vouch::Claimed, t0).expect("dial");
        assert!(!t.is_probe());
        reach.finished(t, None, t0);
        assert_eq!(
            reach.ask(a, Some(id(1)), Vouch::Claimed, t0),
            Err(Refusal::Rationed)
        );
        let t = reach
            .ask(a, Some(id(1)), Vouch::Claimed, t0 + FIRST_BACKOFF)
            .expect("after the back-off");
        reach.finished(t, Some(id(1)), t0 + FIRST_BACKOFF);

        let boot = addr("198.51.100.1", 7401);
        for _ in 0..3 {
            let t = reach
                .ask(boot, None, Vouch::Bootstrap, t0)
                .expect("bootstrap");
            assert!(!t.is_probe(), "the operator's addresses are not probes");
            reach.finished(t, Some(id(9)), t0);
        }
    }

    /// A neighbour the overlay chose is not a probe: a failed probe of its IP does not close it,
    /// only its own failures back it off.
    #[test]
    fn a_chosen_neighbour_backs_off_on_its_own_failures_only() {
        let t0 = Instant::now();
        let mut reach = Reach::new(t0);
        let probed = addr("203.0.113.8", 7000);
        let t = reach
            .ask(probed, Some(id(3)), Vouch::Claimed, t0)
            .expect("probe");
        assert!(t.is_probe());
        reach.finished(t, None, t0);
        let chosen = addr("203.0.113.8", 7001);
        let t = reach
            .ask(chosen, Some(id(4)), Vouch::Chosen, t0)
            .expect("a chosen neighbour on that IP");
        assert!(!t.is_probe());
        reach.finished(t, None, t0);
        assert_eq!(
            reach.ask(chosen, Some(id(4)), Vouch::Chosen, t0),
            Err(Refusal::Rationed),
            "its own failure backs it off"
        );
        assert!(
            reach
                .ask(chosen, Some(id(4)), Vouch::Chosen, t0 + FIRST_BACKOFF)
                .is_ok()
        );
    }

    /// A submitter restarted on the same host: its old address (reached before, then heard
    /// from at another) is still confirmed, so the failed dial there backs off that address
    /// only, and the probe of the new one goes ahead.
    #[test]
    fn a_dead_confirmed_address_does_not_ration_the_peers_new_one() {
        let t0 = Instant::now();
        let mut reach = Reach::new(t0);
        let old = addr("192.0.2.2", 44870);
        let t = reach
            .ask(old, Some(id(1)), Vouch::Claimed, t0)
            .expect("probe");
        reach.finished(t, Some(id(1)), t0);
        reach.confirm(id(1), addr("127.0.0.1", 44870), t0);
        let t = reach
            .ask(old, Some(id(1)), Vouch::Claimed, t0)
            .expect("the old address");
        assert!(!t.is_probe(), "both addresses stay confirmed");
        reach.finished(t, None, t0);
        let new = addr("192.0.2.2", 51203);
        let t = reach
            .ask(new, Some(id(1)), Vouch::Claimed, t0)
            .expect("the new address is probed at once");
        assert!(t.is_probe());
        reach.finished(t, Some(id(1)), t0);
        assert_eq!(reach.confirmed(&id(1)), Some(new));
        // Only the last few addresses are kept.
        for port in 1..=ADDRS_PER_PEER as u16 {
            reach.confirm(id(1), addr("192.0.2.9", port), t0);
        }
        assert!(!reach.is_confirmed(Some(id(1)), new));
    }

    #[test]
    fn a_claim_of_another_peers_confirmed_address_is_a_probe() {
        let t0 = Instant::now();
        let mut reach = Reach::new(t0);
        let honest = addr("203.0.113.5", 7000);
        reach.confirm(id(1), honest, t0);
        let t = reach
            .ask(honest, Some(id(66)), Vouch::Claimed, t0)
            .expect("probe");
        assert!(t.is_probe(), "the address is confirmed for its owner only");
        reach.finished(t, None, t0);
        assert!(
            reach.ask(honest, Some(id(1)), Vouch::Claimed, t0).is_err(),
            "the failed probe backs the address off for everyone"
        );
    }

    #[test]
    fn the_confirmed_table_is_capped() {
        let t0 = Instant::now();
        let mut reach = Reach::new(t0);
        for i in 0..(MAX_CONFIRMED + 10) {
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&(i as u64).to_be_bytes());
            reach.confirm(
                PeerId::from_bytes(bytes),
                addr("127.0.0.1", 1),
                t0 + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(reach.confirmed.len(), MAX_CONFIRMED);
        assert!(
            reach.confirmed(&PeerId::from_bytes([0; 32])).is_none(),
            "the oldest went first"
        );
    }

    #[test]
    fn mapped_and_plain_ipv4_are_one_address() {
        let t0 = Instant::now();
        let mut reach = Reach::new(t0);
        let plain = addr("192.0.2.1", 7000);
        let mapped = addr("::ffff:192.0.2.1", 7000);
        reach.confirm(id(1), mapped, t0);
        let t = reach
            .ask(plain, Some(id(1)), Vouch::Claimed, t0)
            .expect("dial");
        assert!(!t.is_probe());
        reach.finished(t, Some(id(1)), t0);
    }
}
