//! A partial-view overlay: HyParView (Leitão, Pereira and Rodrigues, 2007) as a sans-IO state
//! machine, hardened against Sybil floods and eclipses.
//!
//! Each peer keeps a small *active view* (default 5) of neighbours it holds connections with
//! and a larger *passive view* (default 30) of addresses to repair from, so what a peer holds
//! and sends does not grow with the network:
//!
//! * a new peer connects to a contact (to two at once while it has no neighbour) and sends
//!   `Join`; the contact takes it as a neighbour and starts a random walk of `ForwardJoin`
//!   (length `active_walk`, 6) through each of its other neighbours; the peer where a walk
//!   ends offers itself as a neighbour to the newcomer, and the peer `passive_walk` (3) hops
//!   before the end keeps it as a passive entry;
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
//! Groups that split off heal at a constant cost per peer (`neighbor.rs`, `shuffle.rs`):
//!
//! * a refusal, and the acceptance of a `Join`, name a few passive peers to try (gossipsub's
//!   peer exchange), so a peer whose passive view knows only full peers learns of others;
//! * every `rewire_interval` (60 s) a full view asks one passive peer with low priority, and
//!   only if it accepts (it had room) gives up one of its own picks for it: links keep being
//!   re-randomised, and reach past a split whenever a passive view knows the other side;
//! * every `contact_shuffle_interval` (300 s) a shuffle starts at a bootstrap contact, over a
//!   short-lived connection, so a group whose own shuffles walk only inside it learns of the
//!   rest; a peer takes at most 10 such shuffles from strangers a second.
//!
//! Copies of a peer's info carry their issue time and the peer's signature over it
//! (`fresh.rs`): each peer re-issues its own every `reissue_interval` (10 s) and sends it to
//! its neighbours every `refresh_interval` (30 s) with its other neighbours' copies; a copy
//! older than `max_age` (120 s) is refused and dropped from the passive view, the fresher of two
//! copies wins, so a dead peer leaves every passive view within `max_age` of its last issue
//! and a replay never brings it back. The wall clock is counted from the issue time of the
//! info `new` is given; a [`Seal`] signs and checks copies (the driver's uses the peer's key).
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
//! * an identity first heard of less than `young_for` (120 s) ago is *young*: it displaces
//!   only young neighbours, and passive entries are ranked settled first (then, among settled
//!   ones, former neighbours): a young entry never displaces a settled one, not even one just
//!   sent away in a shuffle, and repairs and rewires ask settled peers first (rewires, once
//!   this peer has been up for `young_for`, only them);
//! * a public /24 (or /48) that this peer has heard name `crowded_ids` (2) distinct identities
//!   is *crowded* (`crowd.rs`): keys are free and hosts are not, so its identities count as one
//!   witness. All crowded hosts together hold at most `crowded_active_max` (1) neighbours
//!   (more taken before the host was known crowded are dropped), a crowded identity never
//!   displaces a neighbour, and crowded passive entries rank below all others, in picks and
//!   evictions alike;
//! * every list a peer takes is cut to what a peer of its own configuration sends (a shuffle's
//!   8, a refresh's 4, a refusal's 4), so one flooding neighbour adds few entries at a time.
//!
//! The state machine does no IO and reads no clock: the driver reports [`Event`]s with the
//! current time to [`Overlay::handle`], wakes it at [`Overlay::poll_timeout`], and carries out
//! the [`Command`]s it returns.

pub mod broadcast;
mod crowd;
mod fresh;
pub(crate) mod message;
mod neighbor;
mod repair;
mod shuffle;
pub mod sim;
mod view;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crowd::Crowd;
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
    /// Default 300 s. In a network larger than `contact_load_per_hour` allows at that pace, the pace
    /// slows with the network's size (see [`Overlay::set_network_size`]).
    pub contact_shuffle_interval: Duration,
    /// Contact shuffles an hour one contact should get from the whole network, taking every
    /// peer to share this peer's contacts: a peer shuffles through a contact at most every
    /// `network size / (contacts × contact_load_per_hour)` hours, so the peers everyone
    /// bootstraps from pay a constant cost whatever the network's size (each such shuffle comes
    /// on a fresh connection: among 200 real peers, 0.67 a second cost the bootstrap peer about
    /// 4 KB/s). Default 360 (one every 10 s).
    pub contact_load_per_hour: u32,
    /// An identity this peer first heard of less than this long ago is *young*: it may take a
    /// free slot, but displaces only young neighbours, holds at most `young_inbound_max`
    /// inbound slots, and loses to settled entries in passive picks and evictions. Default
    /// 120 s.
    pub young_for: Duration,
    /// Most inbound neighbours with young identities, once the view holds a settled one. Off
    /// by default (`usize::MAX`): a quota of 2 made no difference the simulator could measure
    /// to the flood (most Sybil slots came from requests into free slots and from picks of
    /// newcomers that know no settled peer yet) and slowed honest newcomers down.
    pub young_inbound_max: usize,
    /// A copy of a peer's info issued longer ago than this is dropped from the passive view
    /// and refused wherever it arrives, so a dead peer's address leaves every passive view
    /// at most this long after its last issue, and a replayed old copy never brings it back.
    /// Default 120 s. A copy lives while `reissue_interval + 2 × refresh_interval` (its age
    /// when a neighbour passes it on, and the wait for the next one) stays under it. With 8.5,
    /// 1.5 and 3.5 s a dead peer leaves every passive view within 9.5 s of its crash
    /// (simulated at 100,000 peers), but 200 real peers then send 1.6 KB/s idle, up to 2.4
    /// (`BENCHMARKS.md`): over the 2 KB/s budget until a refreshed copy costs less than a
    /// signature.
    pub max_age: Duration,
    /// How often this peer issues a fresh copy of its own info. Default 10 s.
    pub reissue_interval: Duration,
    /// How often the fresh copy goes to each neighbour (`Refresh`, with the neighbour's other
    /// neighbours' copies), so the copies neighbours hold and pass on in shuffles stay young.
    /// Default 30 s.
    pub refresh_interval: Duration,
    /// Distinct identities heard from one public /24 (or /48) after which it is a *crowded*
    /// host (`crowd.rs`); 0 turns crowding off. Default 2: with 3 the simulated flood's hosts
    /// were learned too slowly (1.06 % majority-Sybil views against 0.44 %).
    pub crowded_ids: usize,
    /// Most neighbours from crowded hosts, however many such hosts. Default 1.
    pub crowded_active_max: usize,
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
            contact_load_per_hour: 360,
            young_for: Duration::from_secs(120),
            young_inbound_max: usize::MAX,
            max_age: Duration::from_secs(120),
            reissue_interval: Duration::from_secs(10),
            refresh_interval: Duration::from_secs(30),
            crowded_ids: 2,
            crowded_active_max: 1,
        }
    }
}

impl Config {
    /// For a lab, whose identities an allow-list vets: the caps that stand against Sybils (one
    /// neighbour and two passive entries per host, crowded blocks sharing one slot) are off,
    /// since a lab's machines may share a public /24 and its overlay could not form under them.
    pub fn lab() -> Self {
        let default = Self::default();
        Self {
            active_per_host: default.active_view,
            passive_per_host: default.passive_view,
            crowded_ids: 0,
            ..default
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
    /// When the last contact shuffle went (at first, one made up a whole interval before the
    /// first is due, so peers started together spread theirs).
    last_contact_shuffle: Instant,
    /// The network's size as the driver estimates it; 0 while unknown.
    network_size: u64,
    /// Shuffles from non-neighbours taken in the second that began at the instant.
    stranger_shuffles: (Instant, u32),
    /// When this peer started: identities heard of since are young until `young_for` later.
    born: Instant,
    /// Wall-clock milliseconds at `born` (the issue time of the info given to `new`): the
    /// state machine reads no clock, it counts from there with `now`.
    unix_at_birth: u64,
    next_refresh: Instant,
    /// Hosts heard naming many identities.
    crowd: Crowd,
    /// Set when a host became crowded: neighbours beyond `crowded_active_max` are dropped.
    crowd_changed: bool,
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
        let last_contact_shuffle = (now + first_contact_shuffle)
            .checked_sub(config.contact_shuffle_interval)
            .unwrap_or(now);
        let crowd = Crowd::new(config.crowded_ids);
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
            last_contact_shuffle,
            network_size: 0,
            stranger_shuffles: (now, 0),
            born: now,
            unix_at_birth: me.issued,
            next_refresh: now + first_refresh,
            crowd,
            crowd_changed: false,
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

    /// The neighbours' infos, each with whether this peer chose it.
    pub fn active_infos(&self) -> impl Iterator<Item = (PeerInfo, bool)> + '_ {
        self.active.entries.iter().map(|e| (e.info, e.outbound))
    }

    /// The passive peers' infos.
    pub fn passive_infos(&self) -> impl Iterator<Item = PeerInfo> + '_ {
        self.passive.entries.iter().map(|e| e.info)
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
    /// The network's size as estimated now (0: unknown), which paces contact shuffles.
    pub fn set_network_size(&mut self, peers: u64) {
        self.network_size = peers;
    }

    /// How long until the next contact shuffle, before jitter: the configured interval, or
    /// longer in a network so large that its peers together would ask each contact more than
    /// `contact_load_per_hour` times an hour.
    pub(super) fn contact_pace(&self) -> Duration {
        let base = self.config.contact_shuffle_interval;
        let per_second = f64::from(self.config.contact_load_per_hour) / 3600.0;
        let share = self.contacts.len().max(1) as f64 * per_second;
        if share <= 0.0 {
            return base;
        }
        // At most a week: a group cut off from the rest still hears of it now and then.
        let paced = (self.network_size as f64 / share).min(7.0 * 86_400.0);
        base.max(Duration::from_secs_f64(paced))
    }

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

    fn maintain(&mut self, now: Instant, out: &mut Vec<Command>) {
        if self.crowd_changed {
            self.thin_crowd(now, out);
        }
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

    fn jittered(&mut self, interval: Duration) -> Duration {
        let jitter = interval / 4;
        self.rng
            .duration_between(interval - jitter, interval + jitter)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, VecDeque};
    use std::net::Ipv4Addr;

    use super::*;

    /// Wall-clock milliseconds every test peer issued its info at, and the overlays start at.
    pub(super) const T0: u64 = 1_796_601_600_000;

    pub(super) fn id(n: u32) -> PeerId {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&n.to_be_bytes());
        PeerId::from_bytes(bytes)
    }

    /// Peer `n` on a public /24 of its own.
    pub(super) fn info(n: u32) -> PeerInfo {
        on_block(n, n)
    }

    /// Peer `n` on the /24 numbered `block`.
    pub(super) fn on_block(n: u32, block: u32) -> PeerInfo {
        let ip = Ipv4Addr::new(11, (block >> 8) as u8, block as u8, (n % 250 + 1) as u8);
        PeerInfo::new(id(n), SocketAddr::from((ip, 4000)), T0)
    }

    pub(super) fn overlay(n: u32, now: Instant) -> Overlay {
        Overlay::new(long_lived(), info(n), u64::from(n), now)
    }

    #[test]
    fn default_copies_are_passed_on_and_refreshed_before_they_expire() {
        // A neighbour passes a copy on at most `reissue + refresh` after it was issued, and
        // the next one arrives `refresh` later: both within `max_age`, or passive views of
        // live peers empty out between refreshes. `lab` keeps the same timers.
        for c in [Config::default(), Config::lab()] {
            assert!(c.reissue_interval + c.refresh_interval * 2 <= c.max_age);
        }
    }

    /// A configuration with copies that live two minutes (the default's, spelled out): the
    /// tests of views, requests, repairs and shuffles step the clock by tens of seconds between
    /// events about infos issued at fixed times, and test expiry on its own.
    pub(super) fn long_lived() -> Config {
        Config {
            max_age: Duration::from_secs(120),
            reissue_interval: Duration::from_secs(10),
            refresh_interval: Duration::from_secs(30),
            ..Config::default()
        }
    }

    /// Hands `ov` an inbound neighbour request from `peer` and returns the commands.
    pub(super) fn ask(
        ov: &mut Overlay,
        peer: PeerInfo,
        priority: Priority,
        now: Instant,
    ) -> Vec<Command> {
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

    pub(super) fn accepted(out: &[Command], peer: PeerId) -> bool {
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
    pub(super) fn choose(ov: &mut Overlay, peer: PeerInfo, now: Instant) {
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
    pub(super) struct Net {
        pub(super) now: Instant,
        pub(super) nodes: BTreeMap<PeerId, Overlay>,
        pub(super) infos: BTreeMap<PeerId, PeerInfo>,
        pub(super) conns: BTreeSet<(PeerId, PeerId)>,
        pub(super) queue: VecDeque<(PeerId, Event)>,
    }

    impl Net {
        pub(super) fn new(n: u32) -> Self {
            let now = Instant::now();
            Self {
                now,
                nodes: (0..n).map(|i| (id(i), overlay(i, now))).collect(),
                infos: (0..n).map(|i| (id(i), info(i))).collect(),
                conns: BTreeSet::new(),
                queue: VecDeque::new(),
            }
        }

        pub(super) fn link(a: PeerId, b: PeerId) -> (PeerId, PeerId) {
            (a.min(b), a.max(b))
        }

        pub(super) fn pump(&mut self) {
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

        pub(super) fn carry(&mut self, from: PeerId, cmd: Command) {
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
        pub(super) fn tick(&mut self, by: Duration) {
            self.now += by;
            let ids: Vec<PeerId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.queue.push_back((id, Event::Timer));
            }
            self.pump();
        }

        pub(super) fn check_symmetric(&self) {
            for (a, node) in &self.nodes {
                for b in node.active() {
                    assert!(
                        self.nodes[&b].active.contains(a),
                        "{a:?} -> {b:?} one-sided"
                    );
                }
            }
        }

        pub(super) fn component(&self) -> usize {
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

    /// Ten peers on one public /24, as a lab's machines may be: with the caps against Sybils
    /// each holds at most one neighbour from it and the overlay falls apart; with the caps off
    /// (what a node in lab mode, with an allow-list, runs) it forms whole.
    #[test]
    fn peers_of_one_public_block_need_the_host_caps_off() {
        for (config, whole) in [(Config::default(), false), (Config::lab(), true)] {
            let mut net = Net::new(0);
            for i in 0..10 {
                let info = on_block(i, 7);
                net.infos.insert(id(i), info);
                net.nodes.insert(
                    id(i),
                    Overlay::new(config.clone(), info, u64::from(i), net.now),
                );
            }
            for i in 1..10 {
                net.queue.push_back((id(i), Event::Contact(on_block(0, 7))));
                net.pump();
                net.tick(Duration::from_millis(100));
            }
            for _ in 0..60 {
                net.tick(Duration::from_secs(1));
            }
            let most = net
                .nodes
                .values()
                .map(Overlay::active_len)
                .max()
                .unwrap_or(0);
            if whole {
                net.check_symmetric();
                assert_eq!(net.component(), 10);
                assert!(net.nodes.values().all(|n| n.active_len() >= 2));
            } else {
                assert!(most <= 1, "one neighbour per host at most: {most}");
                assert!(net.component() < 10);
            }
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
