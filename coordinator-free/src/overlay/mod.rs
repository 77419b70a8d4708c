//! A partial-view overlay: HyParView (Leitão, Pereira and Rodrigues, 2007) as a sans-IO state
//! machine, hardened against Sybil floods and eclipses.
//!
//! Each peer keeps a small *active view* (default 5) of neighbours it holds connections with
//! and a larger *passive view* (default 30) of addresses to repair from, so what a peer holds
//! and sends does not grow with the network:
//!
//! * a new peer connects to a contact and sends `Join`; the contact takes it as a neighbour and
//!   starts a random walk of `ForwardJoin` (length `active_walk`, 6) through each of its other
//!   neighbours; the peer where a walk ends offers itself as a neighbour to the newcomer, and
//!   the peer `passive_walk` (3) hops before the end keeps it as a passive entry;
//! * a neighbour is lost when its connection closes (liveness comes from the transport: QUIC
//!   keep-alives under an idle timeout). A closed connection with a `Disconnect` before it
//!   moves the peer to the passive view; one that timed out drops the peer altogether;
//! * repairs ask passive peers to become neighbours, with `High` priority when the active view
//!   holds at most one neighbour (such a request is not refused for lack of room; the paper
//!   waits for an empty view, which leaves pairs of peers holding only each other cut off) and
//!   `Low` otherwise; a passive peer asked is not asked again for `ask_again_after`;
//! * every `shuffle_interval` a peer sends a sample of both views on a random walk; the peer
//!   where it ends answers with a sample of its passive view, and both merge what they got.
//!
//! Against floods of cheap identities, every entry carries its [`Host`] (the /24 or /48 it
//! connects from, as the hostile-peer defences group peers), and:
//!
//! * each view holds at most `active_per_host` (1) / `passive_per_host` (2) peers per host,
//!   so identities from H hosts fill at most H active slots and 2H passive ones;
//! * `outbound_min` (2) active slots are for neighbours this peer chose itself from its passive
//!   view; requests from others fill the remaining slots and may displace only an inbound
//!   neighbour, at most once per `displace_every` (30 s), and a recent one whenever there is
//!   any, so a flood of requests gains a slot now and then, not the view; a stranger's join
//!   walk never costs a neighbour held longer than `established_after`;
//! * passive entries are ranked by history (once a neighbour, then first seen): a newcomer
//!   never displaces an entry with more history, and repairs prefer the longer-known of two
//!   random candidates.
//!
//! The state machine does no IO and reads no clock: the driver reports [`Event`]s with the
//! current time to [`Overlay::handle`], wakes it at [`Overlay::poll_timeout`], and carries out
//! the [`Command`]s it returns.

mod message;
pub mod sim;
mod view;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use message::{
    MAX_LIST_PEERS, MAX_MESSAGE_BYTES, MAX_WALK, MessageError, OverlayMessage, PeerInfo, PeerList,
    Priority, Seal, Signature, Unsealed,
};
use view::{ActiveEntry, ActiveView, PassiveEntry, PassiveView};

use crate::host::Host;
use crate::peer_id::PeerId;
use crate::rng::Rng;

/// Most bootstrap contacts remembered.
pub const MAX_CONTACTS: usize = 16;
/// Most connections open at once that are in neither view nor a request of ours (someone
/// about to ask us something); further ones are closed at once.
pub const MAX_STRAYS: usize = 16;
/// Most of our own requests (join or neighbour) in flight at once.
const MAX_PENDING: usize = 2;
/// Most shuffles taken per second from peers that are not neighbours (a contact's, sent over a
/// short-lived connection); more are dropped, so a bootstrap peer's work stays bounded.
const MAX_STRANGER_SHUFFLES: u32 = 10;
/// How far in the future (by our clock) a copy may claim to have been issued, for clocks that
/// disagree a little; a copy from further ahead is refused, or it would outlive `max_age`.
const MAX_CLOCK_AHEAD_MS: u64 = 10_000;
/// A settled passive peer may be asked again this soon, before any young one is asked.
const REASK_SETTLED: Duration = Duration::from_secs(10);
/// Longest wait between repairs while the active view is empty.
const ISOLATED_REPAIR_MAX: Duration = Duration::from_secs(2);
/// Passive peers named in a refusal.
const REFUSAL_PEERS: usize = 4;

/// Sizes, caps and timers. The defaults were chosen with the simulator (`overlay::sim`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Neighbours held. Default 5.
    pub active_view: usize,
    /// Addresses kept for repair. Default 30.
    pub passive_view: usize,
    /// Active slots kept for neighbours this peer picks itself. Must stay at most half of
    /// `active_view`: every link is outbound at one end and inbound at the other. Default 2.
    pub outbound_min: usize,
    /// Most neighbours from one host. Default 1.
    pub active_per_host: usize,
    /// Most passive entries from one host. Default 2.
    pub passive_per_host: usize,
    /// Length of a join's walk (the paper's ARWL). Default 6.
    pub active_walk: u8,
    /// Hops left when a join's walk leaves the newcomer in a passive view (PRWL). Default 3.
    pub passive_walk: u8,
    /// How often a shuffle goes out (jittered ±25 %). Default 60 s.
    pub shuffle_interval: Duration,
    /// Length of a shuffle's walk. Default 3.
    pub shuffle_walk: u8,
    /// Neighbours and passive peers sent in a shuffle (the paper's ka and kp). Default 3 and 4.
    pub shuffle_active: usize,
    pub shuffle_passive: usize,
    /// A request, a stray connection or a shuffle with no answer after this long is given up
    /// (a shuffle after twice as long). Default 2 s: a round trip is well under a second, and
    /// a newcomer whose join was lost, or a repair that dialled a dead address (QUIC's
    /// handshake timeout is 5 s), moves on to the next candidate sooner.
    pub request_timeout: Duration,
    /// An inbound neighbour held this long is no longer displaced to make room for a
    /// stranger's join walk. Default 60 s.
    pub established_after: Duration,
    /// Others' requests displace a neighbour at most this often. Default 30 s.
    pub displace_every: Duration,
    /// Delay between repair attempts after a refusal, doubling up to the maximum. Default
    /// 500 ms to 30 s.
    pub repair_min: Duration,
    pub repair_max: Duration,
    /// A passive peer asked to be a neighbour is not asked again before this long, so repairs
    /// go round the view instead of asking the same full peers over and over. Default 60 s.
    pub ask_again_after: Duration,
    /// How often a peer whose view is full trades one of its own picks for a passive peer
    /// that has room (jittered ±25 %), so groups that split off find the rest again. Zero
    /// turns it off. Default 60 s.
    pub rewire_interval: Duration,
    /// How often a shuffle goes through a bootstrap contact instead of a neighbour (jittered
    /// ±25 %), so a group cut off from the rest learns of it again. Zero turns it off.
    /// Default 300 s.
    pub contact_shuffle_interval: Duration,
    /// An identity this peer first heard of less than this long ago is *young*: it may take a
    /// free slot, but displaces only young neighbours, holds at most `young_inbound_max`
    /// inbound slots, and loses to settled entries in passive picks and evictions. Default
    /// 300 s.
    pub young_for: Duration,
    /// Most inbound neighbours with young identities, once the view holds a settled one. Off
    /// by default (`usize::MAX`): a quota of 2 made no difference the simulator could measure
    /// to the flood (most Sybil slots came from requests into free slots and from picks of
    /// newcomers that know no settled peer yet) and slowed honest newcomers down.
    pub young_inbound_max: usize,
    /// A copy of a peer's info issued longer ago than this is dropped from the passive view
    /// and refused wherever it arrives, so a dead peer's address leaves every passive view
    /// at most this long after its last issue, and a replayed old copy never brings it back.
    /// Default 120 s.
    pub max_age: Duration,
    /// How often this peer issues a fresh copy of its own info. Default 10 s.
    pub reissue_interval: Duration,
    /// How often the fresh copy goes to each neighbour (`Refresh`), so the copies neighbours
    /// pass on in shuffles stay young. Default 30 s.
    pub refresh_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            active_view: 5,
            passive_view: 30,
            outbound_min: 2,
            active_per_host: 1,
            passive_per_host: 2,
            active_walk: 6,
            passive_walk: 3,
            shuffle_interval: Duration::from_secs(60),
            shuffle_walk: 3,
            shuffle_active: 3,
            shuffle_passive: 4,
            request_timeout: Duration::from_secs(2),
            established_after: Duration::from_secs(60),
            displace_every: Duration::from_secs(30),
            repair_min: Duration::from_millis(500),
            repair_max: Duration::from_secs(30),
            ask_again_after: Duration::from_secs(60),
            rewire_interval: Duration::from_secs(60),
            contact_shuffle_interval: Duration::from_secs(300),
            young_for: Duration::from_secs(120),
            young_inbound_max: usize::MAX,
            max_age: Duration::from_secs(120),
            reissue_interval: Duration::from_secs(10),
            refresh_interval: Duration::from_secs(30),
        }
    }
}

/// What the driver tells the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A bootstrap address (configured, or found by mDNS). Joining starts from these whenever
    /// both views are empty.
    Contact(PeerInfo),
    /// A connection to `peer` is up; `addr` is its remote address as the transport saw it.
    ConnectionUp { peer: PeerId, addr: SocketAddr },
    /// The connection to `peer` closed: `graceful` when the remote closed it, not when it
    /// timed out or was reset.
    ConnectionDown { peer: PeerId, graceful: bool },
    /// A `Connect` to `peer` failed.
    DialFailed { peer: PeerId },
    /// A decoded message, over a connection or a short-lived one.
    Message { from: PeerId, msg: OverlayMessage },
    /// The time given by [`Overlay::poll_timeout`] has come.
    Timer,
}

/// What the state machine asks of the driver, and what it tells the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open a connection to the peer (a `ConnectionUp` or `DialFailed` follows), or report
    /// `ConnectionUp` again if one is open.
    Connect(PeerInfo),
    /// Send over the open connection; dropped if there is none.
    Send { to: PeerId, msg: OverlayMessage },
    /// Send over a short-lived connection, closed once the message is delivered.
    SendOnce { to: PeerInfo, msg: OverlayMessage },
    /// Close the connection after what was sent on it is delivered.
    Disconnect(PeerId),
    /// A neighbour joined the active view.
    NeighborUp(PeerId),
    /// A neighbour left the active view.
    NeighborDown(PeerId),
}

/// Counters of what was refused or dropped, for status output and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages that no state of ours asked for (walks from non-neighbours, replies to
    /// nothing, requests without a connection).
    pub unsolicited: u64,
    /// Requests refused: no room, or the host already has its share of the view.
    pub refused: u64,
    /// Joins whose advertised address is not on the host the connection comes from.
    pub bad_address: u64,
    /// Connections closed at once because too many strays were open.
    pub strays_closed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Join,
    Neighbor {
        priority: Priority,
        outbound: bool,
    },
    /// A low-priority request of our own that, once accepted, replaces one of our own picks.
    Rewire,
}

#[derive(Debug, Clone)]
struct Pending {
    info: PeerInfo,
    request: Request,
    /// The connection's host, once it is up.
    host: Option<Host>,
    deadline: Instant,
}

#[derive(Debug, Clone)]
struct Stray {
    id: PeerId,
    host: Host,
    since: Instant,
}

#[derive(Debug, Clone)]
struct OutstandingShuffle {
    nonce: u64,
    sent: Vec<PeerId>,
    deadline: Instant,
}

/// One peer's view of the overlay.
#[derive(Debug)]
pub struct Overlay {
    config: Config,
    me: PeerInfo,
    rng: Rng,
    active: ActiveView,
    passive: PassiveView,
    pending: Vec<Pending>,
    strays: Vec<Stray>,
    contacts: Vec<PeerInfo>,
    next_contact: usize,
    shuffle: Option<OutstandingShuffle>,
    next_shuffle: Instant,
    next_repair: Instant,
    repair_delay: Duration,
    /// When a request from another peer last displaced a neighbour.
    last_forced: Option<Instant>,
    /// Set while a `Join` is admitted.
    joining: bool,
    next_rewire: Instant,
    next_contact_shuffle: Instant,
    /// Shuffles from non-neighbours taken in the second that began at the instant.
    stranger_shuffles: (Instant, u32),
    /// When this peer started: identities heard of since are young until `young_for` later.
    born: Instant,
    /// Wall-clock milliseconds at `born` (the issue time of the info given to `new`): the
    /// state machine reads no clock, it counts from there with `now`.
    unix_at_birth: u64,
    next_refresh: Instant,
    seal: Box<dyn Seal>,
    stats: Stats,
}

impl Overlay {
    /// `me` must be a copy issued now (its `issued` is the wall clock at `now`: the overlay
    /// counts wall time from it). Copies are unsigned until [`Overlay::with_seal`].
    /// `outbound_min` is clamped to half of `active_view`, walk lengths to [`MAX_WALK`] and
    /// shuffle samples to [`MAX_LIST_PEERS`].
    pub fn new(mut config: Config, me: PeerInfo, seed: u64, now: Instant) -> Self {
        config.outbound_min = config.outbound_min.min(config.active_view / 2);
        config.active_walk = config.active_walk.min(MAX_WALK);
        config.passive_walk = config.passive_walk.min(config.active_walk);
        config.shuffle_walk = config.shuffle_walk.min(MAX_WALK);
        config.shuffle_active = config.shuffle_active.min(MAX_LIST_PEERS / 2);
        config.shuffle_passive = config.shuffle_passive.min(MAX_LIST_PEERS / 2 - 1);
        let mut rng = Rng::seed_from_u64(seed);
        let first_shuffle = rng.duration_between(Duration::ZERO, config.shuffle_interval);
        let first_rewire = rng.duration_between(Duration::ZERO, config.rewire_interval);
        let first_refresh = rng.duration_between(Duration::ZERO, config.refresh_interval);
        let first_contact_shuffle =
            rng.duration_between(Duration::ZERO, config.contact_shuffle_interval);
        Self {
            repair_delay: config.repair_min,
            config,
            me,
            rng,
            active: ActiveView::default(),
            passive: PassiveView::default(),
            pending: Vec::new(),
            strays: Vec::new(),
            contacts: Vec::new(),
            next_contact: 0,
            shuffle: None,
            next_shuffle: now + first_shuffle,
            next_repair: now,
            last_forced: None,
            joining: false,
            next_rewire: now + first_rewire,
            next_contact_shuffle: now + first_contact_shuffle,
            stranger_shuffles: (now, 0),
            born: now,
            unix_at_birth: me.issued,
            next_refresh: now + first_refresh,
            seal: Box::new(Unsealed),
            stats: Stats::default(),
        }
    }

    /// Signs this peer's info with `seal` from now on and checks every copy that arrives with
    /// it.
    pub fn with_seal(mut self, seal: Box<dyn Seal>) -> Self {
        self.me.signature = seal.sign(&self.me);
        self.seal = seal;
        self
    }

    /// This peer's info, as last issued.
    pub fn me(&self) -> PeerInfo {
        self.me
    }

    /// Wall-clock milliseconds at `now`, counted from the issue time `new` was given.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.born).as_millis();
        self.unix_at_birth
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    /// Whether a copy of a peer's info may be kept or passed on: signed by its peer, not
    /// older than `max_age` and not from the future.
    fn acceptable(&self, info: &PeerInfo, now: Instant) -> bool {
        let unix = self.unix_ms(now);
        let max_age = u64::try_from(self.config.max_age.as_millis()).unwrap_or(u64::MAX);
        info.issued <= unix.saturating_add(MAX_CLOCK_AHEAD_MS)
            && info.issued.saturating_add(max_age) >= unix
            && self.seal.verify(info)
    }

    /// When the passive entry issued at `issued` expires, as an instant.
    fn expiry(&self, issued: u64) -> Instant {
        let max_age = u64::try_from(self.config.max_age.as_millis()).unwrap_or(u64::MAX);
        let at = issued
            .saturating_add(max_age)
            .saturating_sub(self.unix_at_birth);
        self.born + Duration::from_millis(at.saturating_add(1))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The neighbours.
    pub fn active(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.active.entries.iter().map(|e| e.info.id)
    }

    /// The neighbours, each with whether this peer chose it.
    pub fn neighbors(&self) -> impl Iterator<Item = (PeerId, bool)> + '_ {
        self.active.entries.iter().map(|e| (e.info.id, e.outbound))
    }

    pub fn active_len(&self) -> usize {
        self.active.len()
    }

    /// The neighbours this peer chose itself.
    pub fn outbound_len(&self) -> usize {
        self.active.outbound()
    }

    /// The passive peers.
    pub fn passive(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.passive.entries.iter().map(|e| e.info.id)
    }

    pub fn passive_len(&self) -> usize {
        self.passive.len()
    }

    /// Connections the state machine holds open or is opening (neighbours, its own requests and
    /// strays), for the driver to check against its own.
    pub fn connection_count(&self) -> usize {
        self.active.len() + self.pending.len() + self.strays.len()
    }

    /// When to deliver the next [`Event::Timer`].
    pub fn poll_timeout(&self) -> Instant {
        let mut at = self.next_shuffle.min(self.next_refresh);
        if let Some(oldest) = self.passive.entries.iter().map(|e| e.info.issued).min() {
            at = at.min(self.expiry(oldest));
        }
        if !self.config.rewire_interval.is_zero() {
            at = at.min(self.next_rewire);
        }
        if !self.config.contact_shuffle_interval.is_zero() && !self.contacts.is_empty() {
            at = at.min(self.next_contact_shuffle);
        }
        if self.wants_neighbor() {
            at = at.min(self.next_repair);
        }
        for p in &self.pending {
            at = at.min(p.deadline);
        }
        for s in &self.strays {
            at = at.min(s.since + self.config.request_timeout);
        }
        if let Some(s) = &self.shuffle {
            at = at.min(s.deadline);
        }
        at
    }

    /// Processes one event; the commands it produces are appended to `out`.
    pub fn handle(&mut self, event: Event, now: Instant, out: &mut Vec<Command>) {
        match event {
            Event::Contact(info) => self.on_contact(info, now),
            Event::ConnectionUp { peer, addr } => self.on_connection_up(peer, addr, now, out),
            Event::ConnectionDown { peer, graceful } => {
                self.on_connection_down(peer, graceful, now, out);
            }
            Event::DialFailed { peer } => self.on_dial_failed(peer, now, out),
            Event::Message { from, msg } => self.on_message(from, msg, now, out),
            Event::Timer => {}
        }
        self.maintain(now, out);
    }

    fn on_contact(&mut self, info: PeerInfo, now: Instant) {
        if info.id == self.me.id || self.contacts.iter().any(|c| c.id == info.id) {
            return;
        }
        if self.contacts.len() == MAX_CONTACTS {
            self.contacts.remove(0);
        }
        self.contacts.push(info);
        if self.active.is_empty() && self.pending.is_empty() {
            self.next_repair = now;
        }
    }

    fn on_connection_up(
        &mut self,
        peer: PeerId,
        addr: SocketAddr,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let host = Host::of(addr.ip());
        if let Some(p) = self.pending.iter_mut().find(|p| p.info.id == peer) {
            p.host = Some(host);
            let msg = match p.request {
                Request::Join => OverlayMessage::Join { info: self.me },
                Request::Neighbor { priority, .. } => OverlayMessage::Neighbor {
                    info: self.me,
                    priority,
                },
                Request::Rewire => OverlayMessage::Neighbor {
                    info: self.me,
                    priority: Priority::Low,
                },
            };
            out.push(Command::Send { to: peer, msg });
            return;
        }
        if self.active.contains(&peer) || self.strays.iter().any(|s| s.id == peer) {
            return;
        }
        if peer == self.me.id || self.strays.len() >= MAX_STRAYS {
            self.stats.strays_closed += 1;
            out.push(Command::Disconnect(peer));
            return;
        }
        self.strays.push(Stray {
            id: peer,
            host,
            since: now,
        });
    }

    fn on_connection_down(
        &mut self,
        peer: PeerId,
        graceful: bool,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        self.strays.retain(|s| s.id != peer);
        if let Some(at) = self.pending.iter().position(|p| p.info.id == peer) {
            let p = self.pending.swap_remove(at);
            if !graceful {
                self.passive.remove(&peer);
            }
            self.refused(p.request, now);
        }
        if let Some(entry) = self.active.remove(&peer) {
            out.push(Command::NeighborDown(peer));
            if graceful {
                self.keep_former_neighbor(&entry, now);
            } else {
                self.passive.remove(&peer);
            }
            // A lost neighbour is repaired at once.
            self.repair_delay = self.config.repair_min;
            self.next_repair = now;
        }
    }

    fn on_dial_failed(&mut self, peer: PeerId, now: Instant, out: &mut Vec<Command>) {
        self.passive.remove(&peer);
        if let Some(at) = self.pending.iter().position(|p| p.info.id == peer) {
            let p = self.pending.swap_remove(at);
            self.close_unless_neighbor(peer, out);
            match p.request {
                // A dead rewire candidate costs nothing but the next rewire's wait.
                Request::Rewire => {}
                // Another candidate at once: this one was dead, not unwilling.
                Request::Neighbor { .. } => self.next_repair = now,
                Request::Join => self.refused(p.request, now),
            }
        }
    }

    fn on_message(
        &mut self,
        from: PeerId,
        msg: OverlayMessage,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        if from == self.me.id || msg.validate().is_err() {
            self.stats.unsolicited += 1;
            return;
        }
        match msg {
            OverlayMessage::Join { info } => self.on_join(from, info, now, out),
            OverlayMessage::ForwardJoin { joiner, ttl } => {
                self.on_forward_join(from, joiner, ttl, now, out);
            }
            OverlayMessage::Neighbor { info, priority } => {
                self.on_neighbor(from, info, priority, now, out);
            }
            OverlayMessage::Refresh { info, peers } => self.on_refresh(from, info, peers, now),
            OverlayMessage::NeighborReply { accepted, peers } => {
                self.on_neighbor_reply(from, accepted, peers, now, out);
            }
            OverlayMessage::Disconnect => self.on_disconnect(from, now, out),
            OverlayMessage::Shuffle {
                nonce,
                origin,
                ttl,
                peers,
            } => self.on_shuffle(from, nonce, origin, ttl, peers, now, out),
            OverlayMessage::ShuffleReply { nonce, peers } => {
                self.on_shuffle_reply(nonce, peers, now);
            }
        }
    }

    /// The host of a connection a request arrived on, and whether we asked for it (our own
    /// outbound request crossing theirs); `None` when no connection is known.
    fn requester(&mut self, from: PeerId) -> Option<(Host, Option<bool>)> {
        let stray = self
            .strays
            .iter()
            .position(|s| s.id == from)
            .map(|at| self.strays.swap_remove(at).host);
        let pending = match self.pending.iter().position(|p| p.info.id == from) {
            Some(at) if self.pending[at].host.is_some() || stray.is_some() => {
                Some(self.pending.swap_remove(at))
            }
            _ => None,
        };
        let host = stray.or_else(|| pending.as_ref().and_then(|p| p.host))?;
        let outbound = pending.map(|p| match p.request {
            Request::Join | Request::Rewire => true,
            Request::Neighbor { outbound, .. } => outbound,
        });
        Some((host, outbound))
    }

    /// Closes a connection kept for a request or a stray, unless the peer became a neighbour
    /// over it meanwhile.
    fn close_unless_neighbor(&self, peer: PeerId, out: &mut Vec<Command>) {
        if !self.active.contains(&peer) {
            out.push(Command::Disconnect(peer));
        }
    }

    fn on_join(&mut self, from: PeerId, joiner: PeerInfo, now: Instant, out: &mut Vec<Command>) {
        if self.active.contains(&from) {
            return;
        }
        if joiner.id != from || !self.acceptable(&joiner, now) {
            self.stats.unsolicited += 1;
            self.strays.retain(|s| s.id != from);
            out.push(Command::Disconnect(from));
            return;
        }
        let addr = joiner.addr;
        let Some((host, ours)) = self.requester(from) else {
            self.stats.unsolicited += 1;
            return;
        };
        // The address the newcomer will be known by must be on the host it connects from,
        // or one host could spread identities under other hosts' names.
        if Host::of(addr.ip()) != host {
            self.stats.bad_address += 1;
            out.push(Command::Send {
                to: from,
                msg: OverlayMessage::NeighborReply {
                    accepted: false,
                    peers: PeerList::default(),
                },
            });
            out.push(Command::Disconnect(from));
            return;
        }
        for n in &self.active.entries {
            out.push(Command::Send {
                to: n.info.id,
                msg: OverlayMessage::ForwardJoin {
                    joiner,
                    ttl: self.config.active_walk,
                },
            });
        }
        // A newcomer must get in somewhere: its contact takes it even when displacements are
        // rationed (a neighbour it displaces keeps its other links and repairs at once).
        self.joining = true;
        let accepted = self.admit(
            joiner,
            host,
            Priority::High,
            ours.unwrap_or(false),
            now,
            out,
        );
        self.joining = false;
        self.reply(from, accepted, true, now, out);
    }

    fn on_neighbor(
        &mut self,
        from: PeerId,
        info: PeerInfo,
        priority: Priority,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        if info.id != from || !self.acceptable(&info, now) {
            self.stats.unsolicited += 1;
            return;
        }
        if self.active.contains(&from) {
            self.refresh_neighbor(info);
            self.reply(from, true, false, now, out);
            return;
        }
        let Some((host, ours)) = self.requester(from) else {
            self.stats.unsolicited += 1;
            return;
        };
        let accepted = self.admit(info, host, priority, ours.unwrap_or(false), now, out);
        self.reply(from, accepted, false, now, out);
    }

    /// Answers a request; a refusal, and the acceptance of a newcomer's `Join`, name a few
    /// passive peers, so the requester has others to ask.
    fn reply(
        &mut self,
        to: PeerId,
        accepted: bool,
        join: bool,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let peers = if accepted && !join {
            PeerList::default()
        } else if join {
            let settled = self.settled(now);
            let mut peers = self
                .passive
                .sample_settled(&mut self.rng, REFUSAL_PEERS, settled);
            peers.retain(|p| p.id != to);
            PeerList(peers)
        } else {
            let mut peers = self.passive.sample(&mut self.rng, REFUSAL_PEERS);
            peers.retain(|p| p.id != to);
            PeerList(peers)
        };
        out.push(Command::Send {
            to,
            msg: OverlayMessage::NeighborReply { accepted, peers },
        });
        if !accepted {
            self.stats.refused += 1;
            out.push(Command::Disconnect(to));
        }
    }

    /// Whether `info` may become a neighbour now, making room if the rules allow it; on
    /// success the peer is in the active view.
    fn admit(
        &mut self,
        info: PeerInfo,
        host: Host,
        priority: Priority,
        outbound: bool,
        now: Instant,
        out: &mut Vec<Command>,
    ) -> bool {
        if info.id == self.me.id {
            return false;
        }
        if self.active.contains(&info.id) {
            return true;
        }
        if self.active.per_host(&host) >= self.config.active_per_host {
            return false;
        }
        let settled = self.settled(now);
        let known_since = self.passive.first_seen(&info.id).unwrap_or(now);
        let young = !outbound && known_since > settled;
        // The quota guards a view that holds settled neighbours; a peer that knows nobody
        // for long yet (a whole network starting) takes what comes.
        let over_quota = young
            && self.active.young_inbound(settled) >= self.config.young_inbound_max
            && self.active.entries.iter().any(|e| !e.is_young(settled));
        if self.active.len() >= self.config.active_view || over_quota {
            let established = now
                .checked_sub(self.config.established_after)
                .unwrap_or(now);
            let owed = outbound && self.active.outbound() < self.config.outbound_min;
            // Our own pick owed a slot may take any inbound neighbour's place. A peer about to
            // be cut off may too, but others' requests displace a neighbour at most once per
            // `displace_every`, so a flood of them gains a slot now and then, not the view;
            // a recent neighbour goes first, so such requests mostly displace each other. A
            // young identity displaces only another young one, so a flood of new identities
            // never costs a settled neighbour (a newcomer's join, at its contact, excepted:
            // it must get in somewhere).
            let victim = if owed {
                self.active.inbound_victim(&mut self.rng, established, true)
            } else if priority == Priority::High && (self.joining || self.may_displace(now)) {
                let victim = if young && (over_quota || !self.joining) {
                    self.active.young_victim(&mut self.rng, settled)
                } else {
                    self.active.inbound_victim(&mut self.rng, established, true)
                };
                if victim.is_some() && !self.joining {
                    self.last_forced = Some(now);
                }
                victim
            } else {
                None
            };
            let Some(victim) = victim else {
                return false;
            };
            self.drop_neighbor(victim, now, out);
        }
        self.passive.remove(&info.id);
        self.strays.retain(|s| s.id != info.id);
        self.active.entries.push(ActiveEntry {
            info,
            host,
            outbound,
            since: now,
            known_since,
        });
        out.push(Command::NeighborUp(info.id));
        true
    }

    /// Ends a neighbourship by our choice: the peer is told, keeps our slot in its passive
    /// view, and stays in ours.
    fn drop_neighbor(&mut self, id: PeerId, now: Instant, out: &mut Vec<Command>) {
        if let Some(entry) = self.active.remove(&id) {
            out.push(Command::Send {
                to: id,
                msg: OverlayMessage::Disconnect,
            });
            out.push(Command::Disconnect(id));
            out.push(Command::NeighborDown(id));
            self.keep_former_neighbor(&entry, now);
        }
    }

    fn on_neighbor_reply(
        &mut self,
        from: PeerId,
        accepted: bool,
        peers: PeerList,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let Some(at) = self
            .pending
            .iter()
            .position(|p| p.info.id == from && p.host.is_some())
        else {
            self.stats.unsolicited += 1;
            return;
        };
        let p = self.pending.swap_remove(at);
        let host = p.host.unwrap_or(Host::Peer(from));
        let (priority, outbound) = match p.request {
            Request::Join => (Priority::High, true),
            Request::Neighbor { priority, outbound } => (priority, outbound),
            Request::Rewire => (Priority::Low, true),
        };
        self.merge(peers.0.into_iter().take(REFUSAL_PEERS), &[], now);
        if accepted && p.request == Request::Rewire && !self.active.contains(&from) {
            self.make_room_for_rewire(from, now, out);
        }
        // Our side applies its own rules too: the view may have filled while we waited.
        if accepted && self.admit(p.info, host, priority, outbound, now, out) {
            self.repair_delay = self.config.repair_min;
            return;
        }
        if self.active.contains(&from) {
            return;
        }
        if accepted {
            out.push(Command::Send {
                to: from,
                msg: OverlayMessage::Disconnect,
            });
        }
        out.push(Command::Disconnect(from));
        self.keep_passive(p.info, host, false, now, &[]);
        self.refused(p.request, now);
    }

    fn on_disconnect(&mut self, from: PeerId, now: Instant, out: &mut Vec<Command>) {
        if let Some(entry) = self.active.remove(&from) {
            out.push(Command::NeighborDown(from));
            out.push(Command::Disconnect(from));
            self.keep_former_neighbor(&entry, now);
            self.next_repair = now;
        } else if let Some(at) = self.pending.iter().position(|p| p.info.id == from) {
            let p = self.pending.swap_remove(at);
            self.close_unless_neighbor(from, out);
            self.refused(p.request, now);
        } else {
            self.stats.unsolicited += 1;
        }
    }

    fn on_forward_join(
        &mut self,
        from: PeerId,
        joiner: PeerInfo,
        ttl: u8,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        if !self.active.contains(&from) {
            self.stats.unsolicited += 1;
            return;
        }
        if joiner.id == self.me.id
            || self.active.contains(&joiner.id)
            || !self.acceptable(&joiner, now)
        {
            return;
        }
        let ttl = ttl.min(self.config.active_walk);
        let host = Host::of(joiner.addr.ip());
        if ttl == 0 || self.active.len() <= 1 {
            let busy = self.pending.len() >= MAX_PENDING
                || self.pending.iter().any(|p| p.info.id == joiner.id);
            if !busy && self.can_admit_inbound(&joiner.id, &host, now) {
                self.request(
                    joiner,
                    Request::Neighbor {
                        priority: Priority::High,
                        outbound: false,
                    },
                    now,
                    out,
                );
            } else {
                self.keep_passive(joiner, host, false, now, &[]);
            }
            return;
        }
        if ttl == self.config.passive_walk {
            self.keep_passive(joiner, host, false, now, &[]);
        }
        if let Some(next) = self.active.random_except(&mut self.rng, Some(&from)) {
            out.push(Command::Send {
                to: next.id,
                msg: OverlayMessage::ForwardJoin {
                    joiner,
                    ttl: ttl - 1,
                },
            });
        }
    }

    fn may_displace(&self, now: Instant) -> bool {
        self.last_forced
            .is_none_or(|t| t + self.config.displace_every <= now)
    }

    /// Whether a walk's newcomer from `host` may be offered a slot: a free one, or one held by
    /// an inbound neighbour not yet established. A stranger's walk never costs a neighbour held
    /// for long.
    fn can_admit_inbound(&self, joiner: &PeerId, host: &Host, now: Instant) -> bool {
        if self.active.per_host(host) >= self.config.active_per_host {
            return false;
        }
        let settled = self.settled(now);
        let young = self.passive.first_seen(joiner).is_none_or(|t| t > settled);
        let young_inbound = self.active.young_inbound(settled);
        let guarded = self.active.entries.iter().any(|e| !e.is_young(settled));
        if young && guarded && young_inbound >= self.config.young_inbound_max {
            return self.may_displace(now) && young_inbound > 0;
        }
        self.active.len() < self.config.active_view
            || self.may_displace(now) && {
                if young {
                    young_inbound > 0
                } else {
                    let established = now
                        .checked_sub(self.config.established_after)
                        .unwrap_or(now);
                    self.active
                        .entries
                        .iter()
                        .any(|e| !e.outbound && e.since > established)
                }
            }
    }

    /// Identities first heard of after this instant are young.
    fn settled(&self, now: Instant) -> Instant {
        now.checked_sub(self.config.young_for)
            .map_or(self.born, |t| t.max(self.born))
    }

    #[allow(clippy::too_many_arguments)]
    fn on_shuffle(
        &mut self,
        from: PeerId,
        nonce: u64,
        origin: PeerInfo,
        ttl: u8,
        peers: PeerList,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        // A neighbour's walk, or a stranger's own shuffle (sent to it as a contact).
        let taken =
            self.active.contains(&from) || origin.id == from && self.take_stranger_shuffle(now);
        if !taken {
            self.stats.unsolicited += 1;
            return;
        }
        if origin.id == self.me.id || !self.acceptable(&origin, now) {
            return;
        }
        let ttl = ttl.min(self.config.shuffle_walk);
        if ttl > 0 && self.active.len() > 1 {
            if let Some(next) = self.active.random_except(&mut self.rng, Some(&from)) {
                out.push(Command::Send {
                    to: next.id,
                    msg: OverlayMessage::Shuffle {
                        nonce,
                        origin,
                        ttl: ttl - 1,
                        peers,
                    },
                });
            }
            return;
        }
        // What a peer of our configuration sends is all we take, and all we answer with.
        let mut peers = peers;
        peers.0.truncate(self.shuffle_len());
        let answer = self.passive.sample(&mut self.rng, peers.0.len());
        let sent: Vec<PeerId> = answer.iter().map(|p| p.id).collect();
        let msg = OverlayMessage::ShuffleReply {
            nonce,
            peers: PeerList(answer),
        };
        out.push(if self.active.contains(&origin.id) {
            Command::Send { to: origin.id, msg }
        } else {
            Command::SendOnce { to: origin, msg }
        });
        self.merge(std::iter::once(origin).chain(peers.0), &sent, now);
    }

    fn on_shuffle_reply(&mut self, nonce: u64, peers: PeerList, now: Instant) {
        match self.shuffle.take() {
            Some(s) if s.nonce == nonce => {
                let take = self.shuffle_len();
                self.merge(peers.0.into_iter().take(take), &s.sent, now);
            }
            other => {
                self.shuffle = other;
                self.stats.unsolicited += 1;
            }
        }
    }

    fn merge(
        &mut self,
        peers: impl Iterator<Item = PeerInfo>,
        prefer_drop: &[PeerId],
        now: Instant,
    ) {
        for info in peers.take(MAX_LIST_PEERS + 1) {
            if info.id == self.me.id || self.active.contains(&info.id) {
                continue;
            }
            let host = Host::of(info.addr.ip());
            self.keep_passive(info, host, false, now, prefer_drop);
        }
    }

    /// A neighbour going back to the passive view keeps how long we have known it.
    fn keep_former_neighbor(&mut self, entry: &ActiveEntry, now: Instant) {
        self.keep_passive(entry.info, entry.host, true, now, &[]);
        if let Some(e) = self
            .passive
            .entries
            .iter_mut()
            .find(|e| e.info.id == entry.info.id)
        {
            e.first_seen = e.first_seen.min(entry.known_since);
        }
    }

    fn keep_passive(
        &mut self,
        info: PeerInfo,
        host: Host,
        verified: bool,
        now: Instant,
        prefer_drop: &[PeerId],
    ) {
        if info.id == self.me.id || self.active.contains(&info.id) || !self.acceptable(&info, now) {
            return;
        }
        self.passive.insert(
            PassiveEntry {
                info,
                host,
                first_seen: now,
                verified,
                asked: None,
            },
            self.config.passive_view,
            self.config.passive_per_host,
            prefer_drop,
            self.settled(now),
            &mut self.rng,
        );
    }

    fn request(&mut self, info: PeerInfo, request: Request, now: Instant, out: &mut Vec<Command>) {
        if let Some(e) = self
            .passive
            .entries
            .iter_mut()
            .find(|e| e.info.id == info.id)
        {
            e.asked = Some(now);
        }
        self.pending.push(Pending {
            info,
            request,
            host: None,
            deadline: now + self.config.request_timeout,
        });
        out.push(Command::Connect(info));
    }

    /// A request of ours came to nothing: back off before the next.
    fn refused(&mut self, request: Request, now: Instant) {
        if request == Request::Rewire {
            return;
        }
        if request == Request::Join {
            self.next_contact = self.next_contact.wrapping_add(1);
        }
        // A peer with no neighbour at all keeps asking quickly: it is cut off, and the refusals
        // it gets name other peers to try.
        let max = if self.active.is_empty() {
            self.config.repair_max.min(ISOLATED_REPAIR_MAX)
        } else {
            self.config.repair_max
        };
        self.repair_delay = (self.repair_delay * 2).min(max);
        self.next_repair = now + self.repair_delay;
    }

    /// Our requests in flight that would fill a free slot.
    fn pending_neighbors(&self) -> usize {
        self.pending
            .iter()
            .filter(|p| p.request != Request::Rewire)
            .count()
    }

    /// Whether the view has room to repair. A full view short of its own picks is not
    /// repaired at the repair pace: its rewires (`rewire_interval`) trade inbound neighbours
    /// for picks of its own, without a stream of refused requests to full peers.
    fn wants_neighbor(&self) -> bool {
        self.active.len() + self.pending_neighbors() < self.config.active_view
    }

    fn maintain(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.expire(now, out);
        self.freshen(now, out);
        if now >= self.next_shuffle {
            self.start_shuffle(now, out);
        }
        if now >= self.next_contact_shuffle && !self.config.contact_shuffle_interval.is_zero() {
            self.contact_shuffle(now, out);
        }
        if now >= self.next_rewire && !self.config.rewire_interval.is_zero() {
            self.rewire(now, out);
        }
        if now >= self.next_repair && self.wants_neighbor() && self.pending.len() < MAX_PENDING {
            self.repair(now, out);
        }
    }

    /// Re-issues our own info when due, sends it to the neighbours when due, and drops
    /// passive entries whose copy has grown too old: a dead peer issues no more, so its
    /// address leaves every passive view within `max_age` of its last issue.
    fn freshen(&mut self, now: Instant, out: &mut Vec<Command>) {
        let unix = self.unix_ms(now);
        let reissue = u64::try_from(self.config.reissue_interval.as_millis()).unwrap_or(u64::MAX);
        if unix >= self.me.issued.saturating_add(reissue) {
            self.me.issued = unix;
            self.me.signature = self.seal.sign(&self.me);
        }
        if now >= self.next_refresh {
            self.next_refresh = now + self.jittered(self.config.refresh_interval);
            for n in &self.active.entries {
                let peers = self
                    .active
                    .entries
                    .iter()
                    .filter(|o| o.info.id != n.info.id)
                    .map(|o| o.info)
                    .take(MAX_LIST_PEERS)
                    .collect();
                out.push(Command::Send {
                    to: n.info.id,
                    msg: OverlayMessage::Refresh {
                        info: self.me,
                        peers: PeerList(peers),
                    },
                });
            }
        }
        let max_age = u64::try_from(self.config.max_age.as_millis()).unwrap_or(u64::MAX);
        self.passive
            .entries
            .retain(|e| e.info.issued.saturating_add(max_age) >= unix);
    }

    fn on_refresh(&mut self, from: PeerId, info: PeerInfo, peers: PeerList, now: Instant) {
        if info.id != from || !self.active.contains(&from) || !self.acceptable(&info, now) {
            self.stats.unsolicited += 1;
            return;
        }
        self.refresh_neighbor(info);
        // A neighbour has at most `active_view - 1` others to name; a longer list is a flood.
        let take = self.config.active_view.saturating_sub(1);
        self.merge(peers.0.into_iter().take(take), &[], now);
    }

    /// Peers in a shuffle of our configuration: the sender, neighbours and passive peers.
    fn shuffle_len(&self) -> usize {
        1 + self.config.shuffle_active + self.config.shuffle_passive
    }

    /// Keeps the fresher of a neighbour's copies. Its address stays the one it connected
    /// with: the connection, not the copy, is what the host caps count.
    fn refresh_neighbor(&mut self, info: PeerInfo) {
        if let Some(e) = self
            .active
            .entries
            .iter_mut()
            .find(|e| e.info.id == info.id)
            && info.issued > e.info.issued
        {
            e.info = info;
        }
    }

    fn expire(&mut self, now: Instant, out: &mut Vec<Command>) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].deadline <= now {
                let p = self.pending.swap_remove(i);
                self.close_unless_neighbor(p.info.id, out);
                self.refused(p.request, now);
            } else {
                i += 1;
            }
        }
        let timeout = self.config.request_timeout;
        self.strays.retain(|s| {
            let keep = s.since + timeout > now;
            if !keep {
                out.push(Command::Disconnect(s.id));
            }
            keep
        });
        if self.shuffle.as_ref().is_some_and(|s| s.deadline <= now) {
            self.shuffle = None;
        }
    }

    fn start_shuffle(&mut self, now: Instant, out: &mut Vec<Command>) {
        let jitter = self.config.shuffle_interval / 4;
        self.next_shuffle = now
            + self.rng.duration_between(
                self.config.shuffle_interval - jitter,
                self.config.shuffle_interval + jitter,
            );
        let Some(target) = self.active.random_except(&mut self.rng, None) else {
            return;
        };
        let msg = self.shuffle_request(&target.id, now);
        out.push(Command::Send { to: target.id, msg });
    }

    /// A shuffle of our sample to walk from `target`, now outstanding.
    fn shuffle_request(&mut self, target: &PeerId, now: Instant) -> OverlayMessage {
        let mut peers = vec![self.me];
        let mut neighbors: Vec<PeerInfo> = self
            .active
            .entries
            .iter()
            .map(|e| e.info)
            .filter(|i| i.id != *target)
            .collect();
        self.rng.shuffle(&mut neighbors);
        peers.extend(neighbors.into_iter().take(self.config.shuffle_active));
        let passive = self
            .passive
            .sample(&mut self.rng, self.config.shuffle_passive);
        let sent = passive.iter().map(|p| p.id).collect();
        peers.extend(passive);
        let nonce = self.rng.next_u64();
        self.shuffle = Some(OutstandingShuffle {
            nonce,
            sent,
            deadline: now + self.config.request_timeout * 2,
        });
        OverlayMessage::Shuffle {
            nonce,
            origin: self.me,
            ttl: self.config.shuffle_walk,
            peers: PeerList(peers),
        }
    }

    /// Now and then a shuffle starts at a bootstrap contact, over a short-lived connection, and
    /// walks its neighbours: the only way a group that split off from the rest, whose own
    /// shuffles walk inside it, learns of the rest again.
    fn contact_shuffle(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.next_contact_shuffle = now + self.jittered(self.config.contact_shuffle_interval);
        if self.contacts.is_empty() || self.shuffle.is_some() {
            return;
        }
        let contact = self.contacts[self.rng.index(self.contacts.len())];
        let msg = self.shuffle_request(&contact.id, now);
        out.push(if self.active.contains(&contact.id) {
            Command::Send {
                to: contact.id,
                msg,
            }
        } else {
            Command::SendOnce { to: contact, msg }
        });
    }

    /// Whether a shuffle from a non-neighbour may be taken now.
    fn take_stranger_shuffle(&mut self, now: Instant) -> bool {
        let (since, count) = &mut self.stranger_shuffles;
        if *since + Duration::from_secs(1) <= now {
            *since = now;
            *count = 0;
        }
        *count += 1;
        *count <= MAX_STRANGER_SHUFFLES
    }

    fn jittered(&mut self, interval: Duration) -> Duration {
        let jitter = interval / 4;
        self.rng
            .duration_between(interval - jitter, interval + jitter)
    }

    /// A full view trades one of our own picks for a passive peer with room now and then
    /// (gossipsub's opportunistic grafting, on one slot): the request is low priority, so
    /// only a peer with a free slot takes it, and the trade happens only once it accepted.
    /// Links of a group that split off then reach the rest whenever the group's passive views
    /// know of it, and the active graph keeps being re-randomised at a constant cost.
    fn rewire(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.next_rewire = now + self.jittered(self.config.rewire_interval);
        if self.active.len() < self.config.active_view
            || self.pending.len() >= MAX_PENDING
            || self.pending.iter().any(|p| p.request == Request::Rewire)
        {
            return;
        }
        // Once this peer has been up for `young_for`, it rewires to settled peers only: a
        // trade is optional, and a flood's fresh identities must not win our own slots.
        match self.candidate(now) {
            Some((info, settled)) if settled || self.settled(now) <= self.born => {
                self.request(info, Request::Rewire, now, out);
            }
            _ => {}
        }
    }

    /// A passive peer to ask, and whether it is settled: settled ones first, each asked at
    /// most once per `ask_again_after`, or, before any young one, once per
    /// `REASK_SETTLED`.
    fn candidate(&mut self, now: Instant) -> Option<(PeerInfo, bool)> {
        let active = &self.active;
        let pending = &self.pending;
        let per_host = self.config.active_per_host;
        let open = |e: &PassiveEntry| {
            !active.contains(&e.info.id)
                && !pending.iter().any(|p| p.info.id == e.info.id)
                && active.per_host(&e.host) < per_host
        };
        let fresh = now.checked_sub(self.config.ask_again_after);
        let recent = now.checked_sub(REASK_SETTLED);
        let settled = self.settled(now);
        let first = self.passive.pick(&mut self.rng, settled, |e| {
            open(e) && e.asked.is_none_or(|t| fresh.is_some_and(|f| t <= f))
        });
        if let Some(info) = first
            && self
                .passive
                .first_seen(&info.id)
                .is_some_and(|t| t <= settled)
        {
            return Some((info, true));
        }
        let again = self.passive.pick(&mut self.rng, settled, |e| {
            open(e)
                && e.first_seen <= settled
                && e.asked.is_none_or(|t| recent.is_some_and(|r| t <= r))
        });
        match again {
            Some(info) => Some((info, true)),
            None => first.map(|info| (info, false)),
        }
    }

    /// A rewire was accepted: one of our own picks gives up its slot, or, short of our own
    /// picks, an inbound neighbour does (`admit` makes that room).
    fn make_room_for_rewire(&mut self, keep: PeerId, now: Instant, out: &mut Vec<Command>) {
        if self.active.len() < self.config.active_view
            || self.active.outbound() < self.config.outbound_min
        {
            return;
        }
        let ours: Vec<PeerId> = self
            .active
            .entries
            .iter()
            .filter(|e| e.outbound && e.info.id != keep)
            .map(|e| e.info.id)
            .collect();
        if let Some(&victim) = self.rng.choose(&ours) {
            self.drop_neighbor(victim, now, out);
        }
    }

    fn repair(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.next_repair = now + self.repair_delay;
        match self.candidate(now).map(|(info, _)| info) {
            Some(info) => {
                // The paper asks with high priority only when the view is empty; one neighbour
                // is asked for the same way, or pairs of peers that hold only each other stay
                // cut off from the rest (measured with the simulator).
                let priority = if self.active.len() <= 1 {
                    Priority::High
                } else {
                    Priority::Low
                };
                let request = Request::Neighbor {
                    priority,
                    outbound: true,
                };
                self.request(info, request, now, out);
            }
            // Cut off, or nearly, with nobody left to ask: back to a contact.
            None if self.active.len() <= 1
                && self.pending.is_empty()
                && !self.contacts.is_empty() =>
            {
                let contact = self.contacts[self.next_contact % self.contacts.len()];
                self.request(contact, Request::Join, now, out);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, VecDeque};
    use std::net::Ipv4Addr;

    use super::*;

    /// Wall-clock milliseconds every test peer issued its info at, and the overlays start at.
    const T0: u64 = 1_796_601_600_000;

    fn id(n: u32) -> PeerId {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&n.to_be_bytes());
        PeerId::from_bytes(bytes)
    }

    /// Peer `n` on a public /24 of its own.
    fn info(n: u32) -> PeerInfo {
        on_block(n, n)
    }

    /// Peer `n` on the /24 numbered `block`.
    fn on_block(n: u32, block: u32) -> PeerInfo {
        let ip = Ipv4Addr::new(11, (block >> 8) as u8, block as u8, (n % 250 + 1) as u8);
        PeerInfo::new(id(n), SocketAddr::from((ip, 4000)), T0)
    }

    fn overlay(n: u32, now: Instant) -> Overlay {
        Overlay::new(Config::default(), info(n), u64::from(n), now)
    }

    /// Hands `ov` an inbound neighbour request from `peer` and returns the commands.
    fn ask(ov: &mut Overlay, peer: PeerInfo, priority: Priority, now: Instant) -> Vec<Command> {
        let mut out = Vec::new();
        ov.handle(
            Event::ConnectionUp {
                peer: peer.id,
                addr: peer.addr,
            },
            now,
            &mut out,
        );
        ov.handle(
            Event::Message {
                from: peer.id,
                msg: OverlayMessage::Neighbor {
                    info: peer,
                    priority,
                },
            },
            now,
            &mut out,
        );
        out
    }

    fn accepted(out: &[Command], peer: PeerId) -> bool {
        out.iter().any(|c| {
            *c == Command::Send {
                to: peer,
                msg: OverlayMessage::NeighborReply {
                    accepted: true,
                    peers: PeerList::default(),
                },
            }
        })
    }

    /// Makes `ov` choose `peer` itself: its own request, accepted.
    fn choose(ov: &mut Overlay, peer: PeerInfo, now: Instant) {
        let mut out = Vec::new();
        ov.request(
            peer,
            Request::Neighbor {
                priority: Priority::Low,
                outbound: true,
            },
            now,
            &mut out,
        );
        ov.handle(
            Event::ConnectionUp {
                peer: peer.id,
                addr: peer.addr,
            },
            now,
            &mut out,
        );
        ov.handle(
            Event::Message {
                from: peer.id,
                msg: OverlayMessage::NeighborReply {
                    accepted: true,
                    peers: PeerList::default(),
                },
            },
            now,
            &mut out,
        );
        assert!(ov.active.get(&peer.id).is_some_and(|e| e.outbound));
    }

    /// Synchronous in-order delivery between a few overlays, no loss.
    struct Net {
        now: Instant,
        nodes: BTreeMap<PeerId, Overlay>,
        infos: BTreeMap<PeerId, PeerInfo>,
        conns: BTreeSet<(PeerId, PeerId)>,
        queue: VecDeque<(PeerId, Event)>,
    }

    impl Net {
        fn new(n: u32) -> Self {
            let now = Instant::now();
            Self {
                now,
                nodes: (0..n).map(|i| (id(i), overlay(i, now))).collect(),
                infos: (0..n).map(|i| (id(i), info(i))).collect(),
                conns: BTreeSet::new(),
                queue: VecDeque::new(),
            }
        }

        fn link(a: PeerId, b: PeerId) -> (PeerId, PeerId) {
            (a.min(b), a.max(b))
        }

        fn pump(&mut self) {
            let mut steps = 0;
            while let Some((to, event)) = self.queue.pop_front() {
                steps += 1;
                assert!(steps < 100_000, "no quiescence");
                let Some(node) = self.nodes.get_mut(&to) else {
                    continue;
                };
                let mut out = Vec::new();
                node.handle(event, self.now, &mut out);
                for cmd in out {
                    self.carry(to, cmd);
                }
            }
        }

        fn carry(&mut self, from: PeerId, cmd: Command) {
            match cmd {
                Command::Connect(peer) => {
                    if !self.nodes.contains_key(&peer.id) {
                        self.queue
                            .push_back((from, Event::DialFailed { peer: peer.id }));
                        return;
                    }
                    if self.conns.insert(Self::link(from, peer.id)) {
                        let addr = self.infos[&from].addr;
                        self.queue
                            .push_back((peer.id, Event::ConnectionUp { peer: from, addr }));
                    }
                    self.queue.push_back((
                        from,
                        Event::ConnectionUp {
                            peer: peer.id,
                            addr: peer.addr,
                        },
                    ));
                }
                Command::Send { to, msg } => {
                    if self.conns.contains(&Self::link(from, to)) {
                        self.queue.push_back((to, Event::Message { from, msg }));
                    }
                }
                Command::SendOnce { to, msg } => {
                    self.queue.push_back((to.id, Event::Message { from, msg }));
                }
                Command::Disconnect(peer) => {
                    if self.conns.remove(&Self::link(from, peer)) {
                        self.queue.push_back((
                            peer,
                            Event::ConnectionDown {
                                peer: from,
                                graceful: true,
                            },
                        ));
                    }
                }
                Command::NeighborUp(_) | Command::NeighborDown(_) => {}
            }
        }

        /// Advances the clock and wakes every peer.
        fn tick(&mut self, by: Duration) {
            self.now += by;
            let ids: Vec<PeerId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.queue.push_back((id, Event::Timer));
            }
            self.pump();
        }

        fn check_symmetric(&self) {
            for (a, node) in &self.nodes {
                for b in node.active() {
                    assert!(
                        self.nodes[&b].active.contains(a),
                        "{a:?} -> {b:?} one-sided"
                    );
                }
            }
        }

        fn component(&self) -> usize {
            let start = *self.nodes.keys().next().unwrap();
            let mut seen = BTreeSet::from([start]);
            let mut todo = vec![start];
            while let Some(a) = todo.pop() {
                for b in self.nodes[&a].active() {
                    if seen.insert(b) {
                        todo.push(b);
                    }
                }
            }
            seen.len()
        }
    }

    #[test]
    fn peers_join_a_small_network_through_one_contact() {
        let mut net = Net::new(12);
        let contact = info(0);
        for i in 1..12 {
            net.queue.push_back((id(i), Event::Contact(contact)));
            net.pump();
            net.tick(Duration::from_millis(100));
        }
        for _ in 0..60 {
            net.tick(Duration::from_secs(1));
        }
        net.check_symmetric();
        assert_eq!(net.component(), 12);
        for (me, node) in &net.nodes {
            assert!(
                (2..=5).contains(&node.active_len()),
                "{me:?}: {}",
                node.active_len()
            );
            assert!(!node.active.contains(me) && !node.passive.contains(me));
            assert!(node.passive().all(|p| !node.active.contains(&p)));
            assert!(node.outbound_len() <= node.active_len());
        }
    }

    #[test]
    fn forward_join_walks_the_configured_length() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        for n in 1..=3 {
            assert!(accepted(&ask(&mut ov, info(n), Priority::Low, now), id(n)));
        }
        let joiner = info(99);
        let walk = |ov: &mut Overlay, ttl: u8| {
            let mut out = Vec::new();
            ov.handle(
                Event::Message {
                    from: id(1),
                    msg: OverlayMessage::ForwardJoin { joiner, ttl },
                },
                now,
                &mut out,
            );
            out
        };
        // Mid-walk: one hop shorter, never back to the sender, not kept.
        for (ttl, next) in [(6, 5), (5, 4), (16, 5)] {
            let out = walk(&mut ov, ttl);
            assert_eq!(out.len(), 1, "{out:?}");
            match &out[0] {
                Command::Send {
                    to,
                    msg: OverlayMessage::ForwardJoin { ttl, .. },
                } => {
                    assert_ne!(*to, id(1));
                    assert_eq!(*ttl, next);
                }
                other => panic!("{other:?}"),
            }
            assert!(!ov.passive.contains(&joiner.id));
        }
        // At the passive walk length the newcomer is kept as a passive peer.
        let out = walk(&mut ov, 3);
        assert!(matches!(
            out[0],
            Command::Send {
                msg: OverlayMessage::ForwardJoin { ttl: 2, .. },
                ..
            }
        ));
        assert!(ov.passive.contains(&joiner.id));
        // Where the walk ends, this peer offers itself with high priority.
        let out = walk(&mut ov, 0);
        assert_eq!(out, vec![Command::Connect(joiner)]);
        let mut out = Vec::new();
        ov.handle(
            Event::ConnectionUp {
                peer: joiner.id,
                addr: joiner.addr,
            },
            now,
            &mut out,
        );
        assert_eq!(
            out,
            vec![Command::Send {
                to: joiner.id,
                msg: OverlayMessage::Neighbor {
                    info: ov.me(),
                    priority: Priority::High,
                },
            }]
        );
    }

    #[test]
    fn a_full_view_refuses_low_priority_and_gives_high_priority_an_inbound_slot() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        choose(&mut ov, info(1), start);
        choose(&mut ov, info(2), start);
        for n in 3..=5 {
            let at = start + Duration::from_secs(u64::from(n));
            assert!(accepted(&ask(&mut ov, info(n), Priority::Low, at), id(n)));
        }
        assert_eq!(ov.active_len(), 5);
        let now = start + Duration::from_secs(10);
        let out = ask(&mut ov, info(6), Priority::Low, now);
        assert!(!accepted(&out, id(6)));
        assert!(out.contains(&Command::Disconnect(id(6))));
        // High priority takes an inbound neighbour's slot, never an outbound one's.
        let out = ask(&mut ov, info(7), Priority::High, now);
        assert!(accepted(&out, id(7)));
        let gone: Vec<u32> = (3..=5)
            .filter(|&n| {
                out.contains(&Command::Send {
                    to: id(n),
                    msg: OverlayMessage::Disconnect,
                })
            })
            .collect();
        assert_eq!(gone.len(), 1, "{out:?}");
        assert!(ov.passive.contains(&id(gone[0])));
        // A burst of requesters long after the others joined only displaces itself.
        let established = start + Duration::from_secs(100);
        for n in 100..150 {
            ask(&mut ov, info(n), Priority::High, established);
            assert_eq!(ov.active_len(), 5);
            assert!(ov.active.contains(&id(1)) && ov.active.contains(&id(2)));
            let held = (3..=7).filter(|&k| ov.active.contains(&id(k))).count();
            assert_eq!(held, 2, "{n}");
        }
        // Once every inbound neighbour is established, a stranger's join walk no longer
        // earns a slot: the newcomer is only kept as a passive peer.
        let later = start + Duration::from_secs(200);
        let mut ov = overlay(0, start);
        choose(&mut ov, info(1), start);
        choose(&mut ov, info(2), start);
        for n in 3..=5 {
            ask(&mut ov, info(n), Priority::Low, start);
        }
        // Not the moment of a rewire, which might pick the newcomer.
        ov.next_rewire = later + Duration::from_secs(1000);
        let joiner = PeerInfo {
            issued: T0 + 200_000,
            ..info(8)
        };
        let mut out = Vec::new();
        ov.handle(
            Event::Message {
                from: id(3),
                msg: OverlayMessage::ForwardJoin { joiner, ttl: 0 },
            },
            later,
            &mut out,
        );
        assert!(!out.contains(&Command::Connect(joiner)));
        assert!(ov.passive.contains(&id(8)));
        assert_eq!(ov.active_len(), 5);
    }

    #[test]
    fn own_picks_may_displace_inbound_neighbours_until_the_outbound_quota_is_met() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        for n in 1..=5 {
            ask(&mut ov, info(n), Priority::Low, start);
        }
        let later = start + Duration::from_secs(300);
        choose(&mut ov, info(10), later);
        choose(&mut ov, info(11), later);
        assert_eq!(ov.active_len(), 5);
        assert_eq!(ov.outbound_len(), 2);
        // The quota is met: a third pick of our own is not owed a slot.
        let mut out = Vec::new();
        ov.request(
            info(12),
            Request::Neighbor {
                priority: Priority::Low,
                outbound: true,
            },
            later,
            &mut out,
        );
        ov.handle(
            Event::ConnectionUp {
                peer: id(12),
                addr: info(12).addr,
            },
            later,
            &mut out,
        );
        out.clear();
        ov.handle(
            Event::Message {
                from: id(12),
                msg: OverlayMessage::NeighborReply {
                    accepted: true,
                    peers: PeerList::default(),
                },
            },
            later,
            &mut out,
        );
        assert!(!ov.active.contains(&id(12)));
        assert!(out.contains(&Command::Disconnect(id(12))));
    }

    #[test]
    fn one_neighbour_per_host_and_two_passive_entries_per_host() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        assert!(accepted(
            &ask(&mut ov, on_block(1, 500), Priority::High, now),
            id(1)
        ));
        let out = ask(&mut ov, on_block(2, 500), Priority::High, now);
        assert!(!accepted(&out, id(2)));
        assert_eq!(ov.active_len(), 1);
        // A shuffle full of one host's identities leaves at most two of them.
        let peers = PeerList(
            (10..10 + MAX_LIST_PEERS as u32)
                .map(|n| on_block(n, 600))
                .collect(),
        );
        let mut out = Vec::new();
        ov.handle(
            Event::Message {
                from: id(1),
                msg: OverlayMessage::Shuffle {
                    nonce: 7,
                    origin: on_block(9, 601),
                    ttl: 0,
                    peers,
                },
            },
            now,
            &mut out,
        );
        let from_600 = ov
            .passive
            .entries
            .iter()
            .filter(|e| e.host == Host::of(on_block(10, 600).addr.ip()))
            .count();
        assert_eq!(from_600, 2);
        assert!(ov.passive.contains(&id(9)));
    }

    #[test]
    fn a_shuffle_swaps_samples_between_both_ends() {
        let mut net = Net::new(2);
        // One neighbour each, so neither tries the made-up passive peers below.
        let config = Config {
            active_view: 1,
            ..Config::default()
        };
        for n in 0..2 {
            let node = Overlay::new(config.clone(), info(n), u64::from(n), net.now);
            net.nodes.insert(id(n), node);
        }
        let (a, b) = (id(0), id(1));
        net.queue.push_back((b, Event::Contact(info(0))));
        net.pump();
        assert!(net.nodes[&a].active.contains(&b));
        let now = net.now;
        for n in 10..14 {
            let node = net.nodes.get_mut(&a).unwrap();
            node.keep_passive(info(n), Host::of(info(n).addr.ip()), false, now, &[]);
        }
        for n in 20..24 {
            let node = net.nodes.get_mut(&b).unwrap();
            node.keep_passive(info(n), Host::of(info(n).addr.ip()), false, now, &[]);
        }
        // Whoever shuffles first, both end up knowing the other's passive peers.
        net.tick(Duration::from_secs(120));
        let a_knows: BTreeSet<PeerId> = net.nodes[&a].passive().collect();
        let b_knows: BTreeSet<PeerId> = net.nodes[&b].passive().collect();
        assert!((20..24).all(|n| a_knows.contains(&id(n))), "{a_knows:?}");
        assert!((10..14).all(|n| b_knows.contains(&id(n))), "{b_knows:?}");
        assert!(net.nodes[&a].shuffle.is_none() || net.nodes[&b].shuffle.is_none());
    }

    #[test]
    fn a_failed_neighbour_is_forgotten_and_replaced_from_the_passive_view() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        ask(&mut ov, info(1), Priority::Low, now);
        ask(&mut ov, info(2), Priority::Low, now);
        ask(&mut ov, info(4), Priority::Low, now);
        ov.keep_passive(info(3), Host::of(info(3).addr.ip()), true, now, &[]);
        let later = now + Duration::from_secs(100);
        let mut out = Vec::new();
        ov.handle(
            Event::ConnectionDown {
                peer: id(1),
                graceful: false,
            },
            later,
            &mut out,
        );
        assert!(out.contains(&Command::NeighborDown(id(1))));
        assert!(!ov.passive.contains(&id(1)));
        assert!(out.contains(&Command::Connect(info(3))));
        out.clear();
        ov.handle(
            Event::ConnectionUp {
                peer: id(3),
                addr: info(3).addr,
            },
            later,
            &mut out,
        );
        assert!(out.contains(&Command::Send {
            to: id(3),
            msg: OverlayMessage::Neighbor {
                info: ov.me(),
                priority: Priority::Low
            }
        }));
        // A graceful close keeps the peer for later repairs; with one neighbour left the next
        // request is high priority.
        let mut out = Vec::new();
        ov.handle(
            Event::ConnectionDown {
                peer: id(4),
                graceful: false,
            },
            later,
            &mut out,
        );
        out.clear();
        ov.handle(
            Event::ConnectionDown {
                peer: id(2),
                graceful: true,
            },
            later,
            &mut out,
        );
        assert!(ov.passive.contains(&id(2)));
        assert!(out.contains(&Command::Connect(info(2))), "{out:?}");
        ov.handle(
            Event::ConnectionUp {
                peer: id(2),
                addr: info(2).addr,
            },
            later,
            &mut out,
        );
        assert!(out.contains(&Command::Send {
            to: id(2),
            msg: OverlayMessage::Neighbor {
                info: ov.me(),
                priority: Priority::High
            }
        }));
        // A dial that fails forgets the address.
        ov.handle(Event::DialFailed { peer: id(3) }, later, &mut out);
        assert!(!ov.passive.contains(&id(3)));
    }

    #[test]
    fn hostile_messages_change_nothing_and_state_stays_bounded() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        ask(&mut ov, info(1), Priority::Low, now);
        let stranger = info(50);
        let mut out = Vec::new();
        // Walks and shuffles from a non-neighbour, replies to nothing, requests without a
        // connection, messages claiming to come from ourselves.
        let hostile = [
            (
                stranger.id,
                OverlayMessage::ForwardJoin {
                    joiner: info(51),
                    ttl: 3,
                },
            ),
            (
                stranger.id,
                OverlayMessage::Shuffle {
                    nonce: 1,
                    // Not its own: a walk a stranger claims to relay.
                    origin: info(55),
                    ttl: 0,
                    peers: PeerList(vec![info(52)]),
                },
            ),
            (
                stranger.id,
                OverlayMessage::ShuffleReply {
                    nonce: 1,
                    peers: PeerList(vec![info(53)]),
                },
            ),
            (
                stranger.id,
                OverlayMessage::NeighborReply {
                    accepted: true,
                    peers: PeerList::default(),
                },
            ),
            (stranger.id, OverlayMessage::Join { info: stranger }),
            (stranger.id, OverlayMessage::Disconnect),
            (
                id(0),
                OverlayMessage::Neighbor {
                    info: info(0),
                    priority: Priority::High,
                },
            ),
            (
                id(1),
                OverlayMessage::ForwardJoin {
                    joiner: info(54),
                    ttl: 200,
                },
            ),
        ];
        for (from, msg) in hostile {
            ov.handle(Event::Message { from, msg }, now, &mut out);
        }
        assert_eq!(ov.active().collect::<Vec<_>>(), vec![id(1)]);
        assert_eq!(ov.passive_len(), 0);
        assert!(ov.stats().unsolicited >= 7);
        assert!(
            !out.iter()
                .any(|c| matches!(c, Command::Connect(_) | Command::NeighborUp(_)))
        );
        // A shuffle from a neighbour naming ourselves, duplicates and a full list.
        let mut peers = vec![info(0), info(60), info(60), info(60)];
        peers.extend((100..100 + MAX_LIST_PEERS as u32 - 4).map(info));
        ov.handle(
            Event::Message {
                from: id(1),
                msg: OverlayMessage::Shuffle {
                    nonce: 2,
                    origin: info(61),
                    ttl: 0,
                    peers: PeerList(peers),
                },
            },
            now,
            &mut out,
        );
        assert!(ov.passive_len() <= ov.config().passive_view);
        assert!(!ov.passive.contains(&id(0)));
        let unique: BTreeSet<PeerId> = ov.passive().collect();
        assert_eq!(unique.len(), ov.passive_len());
        // A join whose address is on another host than its connection.
        out.clear();
        ov.handle(
            Event::ConnectionUp {
                peer: id(70),
                addr: info(70).addr,
            },
            now,
            &mut out,
        );
        ov.handle(
            Event::Message {
                from: id(70),
                msg: OverlayMessage::Join {
                    info: PeerInfo {
                        addr: info(71).addr,
                        ..info(70)
                    },
                },
            },
            now,
            &mut out,
        );
        assert_eq!(ov.stats().bad_address, 1);
        assert!(out.contains(&Command::Disconnect(id(70))));
        assert!(!out.iter().any(|c| matches!(
            c,
            Command::Send {
                msg: OverlayMessage::ForwardJoin { .. },
                ..
            }
        )));
        // A flood of connections that never ask for anything.
        out.clear();
        for n in 1000..1200 {
            ov.handle(
                Event::ConnectionUp {
                    peer: id(n),
                    addr: info(n).addr,
                },
                now,
                &mut out,
            );
        }
        assert!(ov.strays.len() <= MAX_STRAYS);
        assert!(ov.connection_count() <= 5 + MAX_PENDING + MAX_STRAYS);
        out.clear();
        ov.handle(Event::Timer, now + ov.config().request_timeout, &mut out);
        assert!(ov.strays.is_empty());
        assert!(ov.pending.len() <= MAX_PENDING);
    }

    #[test]
    fn a_full_view_trades_one_of_its_own_picks_for_a_passive_peer_with_room() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        choose(&mut ov, info(1), start);
        choose(&mut ov, info(2), start);
        for n in 3..=5 {
            ask(&mut ov, info(n), Priority::Low, start);
        }
        ov.keep_passive(info(9), Host::of(info(9).addr.ip()), true, start, &[]);
        let at = ov.next_rewire;
        ov.next_shuffle = at + Duration::from_secs(1000);
        ov.next_refresh = at + Duration::from_secs(1000);
        let mut out = Vec::new();
        ov.handle(Event::Timer, at, &mut out);
        assert_eq!(out, vec![Command::Connect(info(9))]);
        out.clear();
        ov.handle(
            Event::ConnectionUp {
                peer: id(9),
                addr: info(9).addr,
            },
            at,
            &mut out,
        );
        // Asked with low priority: only a peer with room takes it.
        assert!(out.contains(&Command::Send {
            to: id(9),
            msg: OverlayMessage::Neighbor {
                info: ov.me(),
                priority: Priority::Low,
            },
        }));
        out.clear();
        ov.handle(
            Event::Message {
                from: id(9),
                msg: OverlayMessage::NeighborReply {
                    accepted: true,
                    peers: PeerList::default(),
                },
            },
            at,
            &mut out,
        );
        assert!(ov.active.get(&id(9)).is_some_and(|e| e.outbound));
        assert_eq!(ov.active_len(), 5);
        assert_eq!(ov.outbound_len(), 2);
        // One of the earlier picks went back to the passive view; inbound neighbours stayed.
        let gone: Vec<u32> = [1, 2]
            .into_iter()
            .filter(|&n| !ov.active.contains(&id(n)))
            .collect();
        assert_eq!(gone.len(), 1);
        assert!(ov.passive.contains(&id(gone[0])));
        assert!((3..=5).all(|n| ov.active.contains(&id(n))));
        // A refused rewire changes nothing and does not slow repairs down.
        let delay = ov.repair_delay;
        let at = ov.next_rewire;
        ov.next_shuffle = at + Duration::from_secs(1000);
        ov.keep_passive(info(10), Host::of(info(10).addr.ip()), true, at, &[]);
        let mut out = Vec::new();
        ov.handle(Event::Timer, at, &mut out);
        let asked = ov
            .pending
            .iter()
            .find(|p| p.request == Request::Rewire)
            .unwrap();
        let asked = asked.info;
        ov.handle(
            Event::ConnectionUp {
                peer: asked.id,
                addr: asked.addr,
            },
            at,
            &mut out,
        );
        ov.handle(
            Event::Message {
                from: asked.id,
                msg: OverlayMessage::NeighborReply {
                    accepted: false,
                    peers: PeerList(vec![info(11)]),
                },
            },
            at,
            &mut out,
        );
        assert_eq!(ov.active_len(), 5);
        assert_eq!(ov.repair_delay, delay);
        // The refusal's peers are kept to try later.
        assert!(ov.passive.contains(&id(11)));
    }

    #[test]
    fn a_refusal_and_a_join_name_other_peers_to_try() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        for n in 1..=5 {
            ask(&mut ov, info(n), Priority::Low, now);
        }
        for n in 20..30 {
            ov.keep_passive(info(n), Host::of(info(n).addr.ip()), true, now, &[]);
        }
        let out = ask(&mut ov, info(6), Priority::Low, now);
        let named = out.iter().find_map(|c| match c {
            Command::Send {
                to,
                msg:
                    OverlayMessage::NeighborReply {
                        accepted: false,
                        peers,
                    },
            } if *to == id(6) => Some(peers.0.clone()),
            _ => None,
        });
        let named = named.expect("a refusal");
        assert_eq!(named.len(), REFUSAL_PEERS);
        assert!(named.iter().all(|p| (20..30).any(|n| p.id == id(n))));
        // A newcomer's join is answered with peers too, to start its passive view.
        let mut out = Vec::new();
        let joiner = info(40);
        ov.handle(
            Event::ConnectionUp {
                peer: joiner.id,
                addr: joiner.addr,
            },
            now,
            &mut out,
        );
        ov.handle(
            Event::Message {
                from: joiner.id,
                msg: OverlayMessage::Join { info: joiner },
            },
            now,
            &mut out,
        );
        assert!(out.iter().any(|c| matches!(
            c,
            Command::Send {
                msg: OverlayMessage::NeighborReply { accepted: true, peers },
                ..
            } if !peers.0.is_empty()
        )));
    }

    #[test]
    fn a_shuffle_goes_through_a_contact_now_and_then_and_strangers_are_rationed() {
        let now = Instant::now();
        let mut ov = overlay(0, now);
        ask(&mut ov, info(1), Priority::Low, now);
        let mut out = Vec::new();
        ov.handle(Event::Contact(info(7)), now, &mut out);
        let at = ov.next_contact_shuffle.max(now);
        ov.next_shuffle = at + Duration::from_secs(1000);
        ov.next_rewire = at + Duration::from_secs(1000);
        out.clear();
        ov.handle(Event::Timer, at, &mut out);
        assert!(
            out.iter().any(|c| matches!(
                c,
                Command::SendOnce {
                    to,
                    msg: OverlayMessage::Shuffle { origin, .. },
                } if to.id == id(7) && origin.id == id(0)
            )),
            "{out:?}"
        );
        // A stranger's own shuffle is taken (it walks on, or is answered), a few a second.
        let mut ov = overlay(0, now);
        let mut answered = 0;
        for n in 100..130 {
            let mut out = Vec::new();
            ov.handle(
                Event::Message {
                    from: id(n),
                    msg: OverlayMessage::Shuffle {
                        nonce: 1,
                        origin: info(n),
                        ttl: 0,
                        peers: PeerList(vec![info(n + 100)]),
                    },
                },
                now,
                &mut out,
            );
            answered += out
                .iter()
                .filter(|c| matches!(c, Command::SendOnce { .. }))
                .count();
        }
        assert_eq!(answered, MAX_STRANGER_SHUFFLES as usize);
        assert!(ov.passive.contains(&id(100)));
    }

    #[test]
    fn old_copies_expire_and_a_replay_never_brings_a_dead_peer_back() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        ask(&mut ov, info(1), Priority::Low, start);
        let max_age = ov.config().max_age;
        let at = |secs: u64| PeerInfo {
            issued: T0 + secs * 1000,
            ..info(5)
        };
        let shuffle = |ov: &mut Overlay, peer: PeerInfo, now: Instant| {
            let mut out = Vec::new();
            ov.handle(
                Event::Message {
                    from: id(1),
                    msg: OverlayMessage::Shuffle {
                        nonce: 9,
                        origin: info(1),
                        ttl: 0,
                        peers: PeerList(vec![peer]),
                    },
                },
                now,
                &mut out,
            );
        };
        // Peer 5 issued a copy at 30 s; it is kept, and a fresher one replaces it.
        let now = start + Duration::from_secs(40);
        shuffle(&mut ov, at(30), now);
        assert!(ov.passive.contains(&id(5)));
        shuffle(&mut ov, at(35), now);
        shuffle(&mut ov, at(10), now);
        let held = ov.passive.entries.iter().find(|e| e.info.id == id(5));
        assert_eq!(held.map(|e| e.info.issued), Some(T0 + 35_000));
        // Peer 5 dies: it issues nothing more, and its entry goes once its copy is too old;
        // the timer asks to be woken for it.
        let expires = start + Duration::from_secs(35) + max_age + Duration::from_millis(1);
        assert!(ov.poll_timeout() <= expires);
        let mut out = Vec::new();
        ov.handle(Event::Timer, expires - Duration::from_secs(1), &mut out);
        assert!(ov.passive.contains(&id(5)));
        ov.handle(Event::Timer, expires, &mut out);
        assert!(!ov.passive.contains(&id(5)));
        // A replay of its last copy, or of any older one, is refused.
        shuffle(&mut ov, at(35), expires);
        shuffle(&mut ov, at(0), expires);
        assert!(!ov.passive.contains(&id(5)));
        // A copy from too far ahead of our clock is refused too.
        let ahead = expires + Duration::from_secs(1);
        shuffle(&mut ov, at(10_000), ahead);
        assert!(!ov.passive.contains(&id(5)));
    }

    #[test]
    fn a_peer_reissues_its_info_and_sends_it_to_its_neighbours() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        ask(&mut ov, info(1), Priority::Low, start);
        ask(&mut ov, info(2), Priority::Low, start);
        assert_eq!(ov.me().issued, T0);
        let later = start + Duration::from_secs(45);
        let mut out = Vec::new();
        ov.handle(Event::Timer, later, &mut out);
        assert_eq!(ov.unix_ms(later), T0 + 45_000);
        assert_eq!(ov.me().issued, T0 + 45_000);
        // Each neighbour gets our fresh copy and the other neighbour's.
        let refreshes: Vec<(PeerId, PeerInfo, Vec<PeerId>)> = out
            .iter()
            .filter_map(|c| match c {
                Command::Send {
                    to,
                    msg: OverlayMessage::Refresh { info, peers },
                } => Some((*to, *info, peers.0.iter().map(|p| p.id).collect())),
                _ => None,
            })
            .collect();
        assert_eq!(refreshes.len(), 2, "{out:?}");
        for (to, info, peers) in refreshes {
            assert_eq!(info, ov.me());
            let other = if to == id(1) { id(2) } else { id(1) };
            assert_eq!(peers, vec![other]);
        }
        // A neighbour's fresh copy replaces the one we hold; a stranger's is ignored.
        let fresh = PeerInfo {
            issued: T0 + 44_000,
            ..info(1)
        };
        let mut out = Vec::new();
        for from in [id(1), id(7)] {
            ov.handle(
                Event::Message {
                    from,
                    msg: OverlayMessage::Refresh {
                        info: PeerInfo { id: from, ..fresh },
                        peers: PeerList::default(),
                    },
                },
                later,
                &mut out,
            );
        }
        let held = ov.active.entries.iter().find(|e| e.info.id == id(1));
        assert_eq!(held.map(|e| e.info.issued), Some(T0 + 44_000));
        assert_eq!(ov.stats().unsolicited, 1);
    }

    #[test]
    fn young_identities_never_displace_settled_neighbours_nor_win_our_picks() {
        let start = Instant::now();
        let mut ov = overlay(0, start);
        choose(&mut ov, info(1), start);
        choose(&mut ov, info(2), start);
        for n in 3..=5 {
            ask(&mut ov, info(n), Priority::Low, start);
        }
        // A passive peer heard of early on, whose copies keep coming fresh, is settled.
        let early = start + Duration::from_secs(10);
        let copy = |n: u32, at: Instant| PeerInfo {
            issued: T0 + u64::try_from((at - start).as_millis()).unwrap(),
            ..info(n)
        };
        ov.keep_passive(
            copy(50, early),
            Host::of(info(50).addr.ip()),
            false,
            early,
            &[],
        );
        let later = early + ov.config().young_for + Duration::from_secs(10);
        ov.keep_passive(
            copy(50, later),
            Host::of(info(50).addr.ip()),
            false,
            later,
            &[],
        );
        // Not the moment of a rewire, which would ask the settled peer first.
        ov.next_rewire = later + Duration::from_secs(1000);
        // Long after, a flood of identities first heard of now asks with high priority:
        // every neighbour is settled, so none of them gets a slot.
        for n in 100..110 {
            let out = ask(&mut ov, copy(n, later), Priority::High, later);
            assert!(!accepted(&out, id(n)), "{n}");
        }
        assert!((1..=5).all(|n| ov.active.contains(&id(n))));
        // Many young passive peers beside the settled one: our own picks go to the settled.
        for n in 60..80 {
            ov.keep_passive(
                copy(n, later),
                Host::of(info(n).addr.ip()),
                false,
                later,
                &[],
            );
        }
        for _ in 0..20 {
            let picked = ov
                .candidate(later)
                .map(|(info, settled)| (info.id, settled));
            assert_eq!(picked, Some((id(50), true)));
        }
    }

    #[test]
    fn arbitrary_events_never_break_the_bounds() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config as RunnerConfig, TestRunner};
        let msg = prop_oneof![
            any::<u16>().prop_map(|n| OverlayMessage::Join {
                info: info(u32::from(n) % 40)
            }),
            (any::<u16>(), any::<u8>()).prop_map(|(n, ttl)| OverlayMessage::ForwardJoin {
                joiner: info(u32::from(n) % 40),
                ttl,
            }),
            (any::<u16>(), any::<bool>()).prop_map(|(n, high)| OverlayMessage::Neighbor {
                info: info(u32::from(n) % 40),
                priority: if high { Priority::High } else { Priority::Low },
            }),
            any::<bool>().prop_map(|accepted| OverlayMessage::NeighborReply {
                accepted,
                peers: PeerList(vec![info(30)]),
            }),
            Just(OverlayMessage::Disconnect),
            (
                any::<u16>(),
                proptest::collection::vec(any::<u16>(), 0..MAX_LIST_PEERS)
            )
                .prop_map(|(o, ps)| OverlayMessage::Shuffle {
                    nonce: 0,
                    origin: info(u32::from(o) % 40),
                    ttl: 0,
                    peers: PeerList(
                        ps.into_iter()
                            .map(|p| on_block(u32::from(p) % 200, u32::from(p) % 7))
                            .collect()
                    ),
                }),
        ];
        let event = prop_oneof![
            (0u32..40, msg).prop_map(|(from, msg)| Event::Message {
                from: id(from),
                msg
            }),
            (0u32..40).prop_map(|p| Event::ConnectionUp {
                peer: id(p),
                addr: info(p).addr
            }),
            (0u32..40, any::<bool>()).prop_map(|(p, graceful)| Event::ConnectionDown {
                peer: id(p),
                graceful
            }),
            (0u32..40).prop_map(|p| Event::DialFailed { peer: id(p) }),
            (0u32..40).prop_map(|p| Event::Contact(info(p))),
            Just(Event::Timer),
        ];
        let mut runner = TestRunner::new(RunnerConfig::with_cases(64));
        runner
            .run(
                &proptest::collection::vec((event, 0u64..3000), 0..300),
                |events| {
                    let start = Instant::now();
                    let mut now = start;
                    let mut ov = overlay(0, start);
                    let mut out = Vec::new();
                    for (event, step) in events {
                        now += Duration::from_millis(step);
                        ov.handle(event, now, &mut out);
                        let config = ov.config();
                        prop_assert!(ov.active_len() <= config.active_view);
                        prop_assert!(ov.passive_len() <= config.passive_view);
                        prop_assert!(ov.pending.len() <= MAX_PENDING);
                        prop_assert!(ov.strays.len() <= MAX_STRAYS);
                        prop_assert!(!ov.active.contains(&id(0)) && !ov.passive.contains(&id(0)));
                        let hosts: BTreeSet<Host> =
                            ov.active.entries.iter().map(|e| e.host).collect();
                        prop_assert_eq!(hosts.len(), ov.active_len());
                        prop_assert!(ov.passive().all(|p| !ov.active.contains(&p)));
                        prop_assert!(out.len() < 100_000);
                        out.clear();
                    }
                    Ok(())
                },
            )
            .unwrap();
    }
}
