//! Who is out there and what they offer: a sans-IO membership state machine.
//!
//! Every peer keeps a table of every other live peer's signed [`Advert`] (full membership, which
//! is what a scheduler choosing among hundreds of peers wants) and spreads it by push-pull
//! anti-entropy in the style of Scuttlebutt:
//!
//! * each peer bumps its own advert's `seq` every `heartbeat_interval` and re-signs it;
//! * every `gossip_interval` it sends a [`Digest`] of `(peer, seq)` pairs to `gossip_fanout`
//!   random connected peers; the receiver pushes back adverts that are newer than or missing
//!   from the digest and requests the ones the digest shows it lacks;
//! * a peer whose `seq` has not advanced for `dead_after` is dropped and tombstoned at that
//!   `seq`, so replayed or late gossip cannot bring it back; only a strictly higher `seq` can.
//!
//! Adverts travel with their age (see [`GossipedAdvert`]), so every table dates an advert from
//! when its owner issued it. A crashed peer therefore leaves every table at most
//! [`Config::removal_bound`] after the crash, however many hops gossip took: `dead_after` plus
//! one gossip tick plus the summed transit delays of the path its last advert took (with the
//! defaults and loopback or LAN delays, under 7 s; the issue requires ≤ 10 s).
//!
//! A closed connection is not treated as death: peers behind flaky links reconnect, and only
//! the missing heartbeats remove a peer.
//!
//! Each peer holds between `min_connections` and `max_connections` connections to random known
//! peers and swaps one every `shuffle_interval` so the overlay keeps mixing; gossip only flows
//! over these connections, which is what keeps the cost per peer flat as the network grows.
//!
//! The state machine does no IO and reads no clock: the driver feeds it [`Event`]s and the
//! current time, calls [`Membership::handle_timeout`] at [`Membership::poll_timeout`], and
//! carries out the [`Command`]s it drains from [`Membership::poll_command`].

mod advert;
mod message;
#[cfg(test)]
mod sim;

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Bound;
use std::time::{Duration, Instant};

pub use advert::{
    Advert, AdvertAuth, AdvertError, Capacity, MAX_ADVERT_ADDRS, MAX_ADVERT_BYTES, MAX_CORES,
    MAX_MEMORY_MB, MAX_SIGNATURE_LEN, SignedAdvert,
};
pub use message::{
    Digest, DigestEntry, GossipedAdvert, MAX_ADVERTS_PER_MESSAGE, MAX_DIGEST_ENTRIES,
    MAX_MESSAGE_BYTES, MAX_REQUEST_IDS, MembershipMessage, MessageError,
};

use crate::host::Host;
use crate::peer_id::PeerId;
use crate::rng::Rng;

/// Most bootstrap/discovered addresses remembered for re-dialing when isolated.
pub const MAX_BOOTSTRAP_ADDRS: usize = 64;
/// Closed links whose address is remembered (then forgotten all at once).
const MAX_CLOSED: usize = 256;
/// Most adverts sent back in answer to one digest or request, so a small message cannot make
/// a peer send an unbounded amount.
pub const MAX_REPLY_ADVERTS: usize = 256;

/// Timers and limits. The defaults suit anything from a LAN of ten peers to a few thousand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How often a digest goes out (jittered ±25 %). Default 500 ms.
    pub gossip_interval: Duration,
    /// How many random connected peers receive each round's digest. Default 2.
    pub gossip_fanout: usize,
    /// How often the local advert's `seq` is bumped. Each bump reaches every table, so this
    /// sets the background gossip volume (N adverts per interval per peer); content changes
    /// bump `seq` at once and do not wait for it. Default 2 s.
    pub heartbeat_interval: Duration,
    /// A peer whose `seq` has not advanced for this long is dropped. Must stay well above
    /// `heartbeat_interval` plus the time gossip needs to cross the network, or live peers get
    /// dropped. Default 6 s.
    pub dead_after: Duration,
    /// How long a dropped peer's tombstone blocks stale adverts. Must exceed `max_clock_skew`
    /// plus `dead_after`: a replayed advert is then refused by the tombstone while it is young
    /// and by its signed issue time once the tombstone is gone. Default 10 min.
    pub tombstone_ttl: Duration,
    /// An advert's `seq` is its owner's wall-clock time in milliseconds when it issued it,
    /// covered by the signature; one issued longer ago than this by our clock, or this far in
    /// the future, is refused. It is how far apart two peers' clocks may be. Default 5 min.
    pub max_clock_skew: Duration,
    /// Below this many connections (open plus dialing) random known peers are dialed. Default 4.
    pub min_connections: usize,
    /// Hard cap on open connections; connections beyond it are refused. Default 8.
    pub max_connections: usize,
    /// How often one connection is swapped for one to a random other peer (jittered ±25 %).
    /// Default 10 s.
    pub shuffle_interval: Duration,
    /// A dial with no outcome after this long is forgotten. Default 5 s.
    pub dial_timeout: Duration,
    /// How often bootstrap addresses are re-dialed while isolated. Default 5 s.
    pub bootstrap_retry: Duration,
    /// Most peers in the table (and most tombstones), so a flood of valid-looking identities
    /// cannot exhaust memory. Default 4096.
    pub max_peers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            gossip_interval: Duration::from_millis(500),
            gossip_fanout: 2,
            heartbeat_interval: Duration::from_secs(2),
            dead_after: Duration::from_secs(6),
            tombstone_ttl: Duration::from_secs(600),
            max_clock_skew: Duration::from_secs(300),
            min_connections: 4,
            max_connections: 8,
            shuffle_interval: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(5),
            bootstrap_retry: Duration::from_secs(5),
            max_peers: 4096,
        }
    }
}

impl Config {
    /// Longest time from a peer's crash until every other table has dropped it, given the
    /// summed one-way transit delay along the path its last advert took.
    ///
    /// Ages are carried in whole milliseconds and rounded down, so add a millisecond per hop
    /// to `path_delay` when computing a tight figure.
    pub fn removal_bound(&self, path_delay: Duration) -> Duration {
        self.dead_after + self.gossip_interval * 5 / 4 + path_delay
    }
}

/// The local peer's own identity and offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPeer {
    pub id: PeerId,
    pub addrs: Vec<SocketAddr>,
    pub capacity: Capacity,
    /// The wall-clock time, in milliseconds since the Unix epoch, at the `now` the state
    /// machine is created with: every `seq` this peer issues is its wall clock then (or one
    /// more than the last, should the clock step back), so a restarted peer outranks the
    /// tombstones its previous run left behind and others can tell a replayed advert's age
    /// from its signed bytes.
    pub initial_seq: u64,
}

/// What the driver tells the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A connection is up; `peer` comes from the TLS handshake. The driver keeps at most one
    /// connection per peer.
    Connected {
        peer: PeerId,
        addr: SocketAddr,
        inbound: bool,
    },
    /// The only connection to `peer` closed (by either side).
    Disconnected { peer: PeerId },
    /// A `Dial` failed, or the dialed peer's id did not match the one asked for.
    DialFailed { addr: SocketAddr },
    /// A decoded message arrived from a connected peer.
    Message {
        from: PeerId,
        msg: MembershipMessage,
    },
    /// A bootstrap address or an mDNS answer, with the peer id if it is known.
    Discovered {
        addr: SocketAddr,
        peer: Option<PeerId>,
    },
    /// The local capacity changed (units started or finished, limits changed).
    CapacityChanged(Capacity),
    /// The local listen addresses changed.
    AddrsChanged(Vec<SocketAddr>),
    /// The job this peer submits now changed (`None`: it submits none).
    JobChanged(Option<crate::digest::Digest>),
}

/// What the state machine asks of the driver, plus notifications for the node and UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open a connection; with `peer` set, refuse it unless the remote proves that id.
    Dial {
        addr: SocketAddr,
        peer: Option<PeerId>,
    },
    /// Close the connection to `peer` after flushing what was sent to it before; no
    /// `Disconnected` needs to be reported back for it.
    Disconnect { peer: PeerId },
    /// Send a message to a connected peer; dropped if the connection is gone.
    Send { to: PeerId, msg: MembershipMessage },
    /// A peer entered the table.
    PeerUp(Advert),
    /// A peer left the table (its heartbeats stopped).
    PeerDown(PeerId),
}

/// Counters of what was dropped and why, for `worker status` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub adverts_accepted: u64,
    /// Bad signature or absurd fields.
    pub adverts_invalid: u64,
    /// Older than `dead_after`, or blocked by a tombstone.
    pub adverts_stale: u64,
    /// New peers not admitted because the table was full.
    pub adverts_table_full: u64,
    /// Messages over a cap or with a malformed digest.
    pub messages_rejected: u64,
    pub connections_refused: u64,
    pub peers_expired: u64,
    /// Adverts whose signed issue time was further from our clock than `max_clock_skew`.
    pub adverts_out_of_time: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    signed: SignedAdvert,
    /// When the owner issued the newest advert we hold, as best we know.
    last_advanced: Instant,
    /// Whether an advert of this peer reached us over local hops alone (or from the peer
    /// itself on a local address): only then are its loopback and private addresses dialed.
    local_path: bool,
}

#[derive(Debug, Clone, Copy)]
struct Tombstone {
    seq: u64,
    expires: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Link {
    addr: SocketAddr,
    inbound: bool,
}

#[derive(Debug, Clone, Copy)]
struct Dialing {
    addr: SocketAddr,
    peer: Option<PeerId>,
    deadline: Instant,
}

/// The membership state machine of one peer.
pub struct Membership<A> {
    config: Config,
    me: PeerId,
    auth: A,
    rng: Rng,
    local: SignedAdvert,
    /// This peer's wall clock: milliseconds since the epoch at an instant.
    wall: (Instant, u64),
    table: BTreeMap<PeerId, Entry>,
    tombstones: BTreeMap<PeerId, Tombstone>,
    links: BTreeMap<PeerId, Link>,
    /// Where recently closed links led, to place messages that arrive just after the close.
    closed: BTreeMap<PeerId, SocketAddr>,
    dialing: Vec<Dialing>,
    bootstrap: Vec<(SocketAddr, Option<PeerId>)>,
    next_gossip: Instant,
    next_heartbeat: Instant,
    next_shuffle: Instant,
    next_bootstrap: Instant,
    out: VecDeque<Command>,
    stats: Stats,
}

impl<A> fmt::Debug for Membership<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Membership")
            .field("me", &self.me)
            .field("seq", &self.local.advert.seq)
            .field("peers", &self.table.len())
            .field("tombstones", &self.tombstones.len())
            .field("links", &self.links.len())
            .field("dialing", &self.dialing.len())
            .finish_non_exhaustive()
    }
}

/// Keeps the local advert valid whatever the local configuration says, so signing it cannot
/// fail and no peer rejects it.
fn sanitize(mut advert: Advert) -> Advert {
    advert
        .addrs
        .retain(|a| a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast());
    advert.addrs.truncate(MAX_ADVERT_ADDRS);
    advert.cores_donated = advert.cores_donated.min(MAX_CORES);
    advert.cores_free = advert.cores_free.min(advert.cores_donated);
    advert.memory_mb = advert.memory_mb.min(MAX_MEMORY_MB);
    advert
}

fn age_ms(now: Instant, since: Instant) -> u32 {
    u32::try_from(now.saturating_duration_since(since).as_millis()).unwrap_or(u32::MAX)
}

impl<A: AdvertAuth> Membership<A> {
    pub fn new(config: Config, local: LocalPeer, auth: A, seed: u64, now: Instant) -> Self {
        let local_wall = local.initial_seq;
        let advert = sanitize(Advert {
            peer: local.id,
            addrs: local.addrs,
            cores_donated: local.capacity.cores_donated,
            cores_free: local.capacity.cores_free,
            memory_mb: local.capacity.memory_mb,
            profile: local.capacity.profile,
            seq: local.initial_seq,
            job: None,
        });
        let signed = SignedAdvert::sign(advert.clone(), &auth).unwrap_or_else(|err| {
            tracing::warn!(%err, "local advert failed to sign; peers will reject it");
            SignedAdvert {
                advert,
                signature: Vec::new(),
            }
        });
        let mut rng = Rng::seed_from_u64(seed);
        // Spread peers' rounds so that a network started at once does not gossip in lockstep.
        let first_gossip = now + rng.duration_between(Duration::ZERO, config.gossip_interval);
        let first_shuffle = now
            + rng.duration_between(
                config.shuffle_interval * 3 / 4,
                config.shuffle_interval * 5 / 4,
            );
        Self {
            me: local.id,
            auth,
            rng,
            local: signed,
            wall: (now, local_wall),
            table: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            links: BTreeMap::new(),
            closed: BTreeMap::new(),
            dialing: Vec::new(),
            bootstrap: Vec::new(),
            next_gossip: first_gossip,
            next_heartbeat: now + config.heartbeat_interval,
            next_shuffle: first_shuffle,
            next_bootstrap: now,
            out: VecDeque::new(),
            stats: Stats::default(),
            config,
        }
    }

    pub fn id(&self) -> PeerId {
        self.me
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The local peer's current signed advert.
    pub fn local_advert(&self) -> &SignedAdvert {
        &self.local
    }

    /// Every live known peer's advert, self excluded, ordered by id.
    pub fn peers(&self) -> impl Iterator<Item = &Advert> {
        self.table.values().map(|e| &e.signed.advert)
    }

    pub fn peer(&self, id: &PeerId) -> Option<&Advert> {
        self.table.get(id).map(|e| &e.signed.advert)
    }

    /// The addresses of `id` this peer may dial: its advertised ones, less the loopback and
    /// private ones when its adverts came to us through a peer on a public address.
    pub fn dial_addrs(&self, id: &PeerId) -> Vec<SocketAddr> {
        self.table.get(id).map_or_else(Vec::new, |e| {
            e.signed
                .advert
                .addrs
                .iter()
                .copied()
                .filter(|a| e.local_path || !Host::of(a.ip()).is_local())
                .collect()
        })
    }

    pub fn peer_count(&self) -> usize {
        self.table.len()
    }

    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// Open connections: peer, remote address, whether the remote dialed us.
    pub fn connections(&self) -> impl Iterator<Item = (PeerId, SocketAddr, bool)> {
        self.links.iter().map(|(p, l)| (*p, l.addr, l.inbound))
    }

    pub fn connection_count(&self) -> usize {
        self.links.len()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The next instant at which [`Self::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(
            self.next_gossip
                .min(self.next_heartbeat)
                .min(self.next_shuffle),
        )
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_heartbeat {
            self.reissue(now, |_| {});
            self.next_heartbeat += self.config.heartbeat_interval;
            if self.next_heartbeat <= now {
                // The driver fell behind; skip the missed beats instead of bursting.
                self.next_heartbeat = now + self.config.heartbeat_interval;
            }
        }
        if now >= self.next_gossip {
            self.expire(now);
            self.maintain(now);
            self.gossip(now);
            self.next_gossip = now + self.jittered(self.config.gossip_interval);
        }
        if now >= self.next_shuffle {
            self.shuffle(now);
            self.next_shuffle = now + self.jittered(self.config.shuffle_interval);
        }
    }

    pub fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Connected {
                peer,
                addr,
                inbound,
            } => self.on_connected(peer, addr, inbound, now),
            Event::Disconnected { peer } => {
                if self.unlink(&peer) {
                    tracing::debug!(?peer, "membership link closed");
                    self.maintain(now);
                }
            }
            Event::DialFailed { addr } => self.dialing.retain(|d| d.addr != addr),
            Event::Message { from, msg } => self.on_message(from, msg, now),
            Event::Discovered { addr, peer } => self.on_discovered(addr, peer, now),
            Event::CapacityChanged(c) => self.reissue(now, |a| {
                a.cores_donated = c.cores_donated;
                a.cores_free = c.cores_free;
                a.memory_mb = c.memory_mb;
                a.profile = c.profile;
            }),
            Event::AddrsChanged(addrs) => self.reissue(now, |a| a.addrs = addrs),
            Event::JobChanged(job) => self.reissue(now, |a| a.job = job),
        }
    }

    /// Applies `change` to the local advert under a new `seq` and re-signs it.
    /// This peer's wall clock at `now`, in milliseconds since the epoch.
    fn wall_ms(&self, now: Instant) -> u64 {
        let (at, ms) = self.wall;
        let since = now.saturating_duration_since(at).as_millis();
        ms.saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    fn reissue(&mut self, now: Instant, change: impl FnOnce(&mut Advert)) {
        let mut advert = self.local.advert.clone();
        change(&mut advert);
        advert.seq = advert.seq.saturating_add(1).max(self.wall_ms(now));
        match SignedAdvert::sign(sanitize(advert), &self.auth) {
            Ok(signed) => self.local = signed,
            Err(err) => tracing::warn!(%err, "local advert failed to sign"),
        }
    }

    fn jittered(&mut self, d: Duration) -> Duration {
        self.rng.duration_between(d * 3 / 4, d * 5 / 4)
    }

    /// Forgets the link to `peer`, remembering where it led for a while; `false` if there
    /// was none.
    fn unlink(&mut self, peer: &PeerId) -> bool {
        let Some(link) = self.links.remove(peer) else {
            return false;
        };
        if self.closed.len() >= MAX_CLOSED {
            self.closed.clear();
        }
        self.closed.insert(*peer, link.addr);
        true
    }

    fn send(&mut self, to: PeerId, msg: MembershipMessage) {
        self.out.push_back(Command::Send { to, msg });
    }

    fn send_adverts(&mut self, to: PeerId, adverts: Vec<GossipedAdvert>) {
        let mut rest = adverts;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(MAX_ADVERTS_PER_MESSAGE));
            self.send(to, MembershipMessage::Adverts(rest));
            rest = tail;
        }
    }

    fn gossiped(&self, peer: &PeerId, now: Instant) -> Option<GossipedAdvert> {
        if *peer == self.me {
            return Some(GossipedAdvert {
                signed: self.local.clone(),
                age_ms: 0,
                public_path: false,
            });
        }
        self.table.get(peer).map(|e| GossipedAdvert {
            signed: e.signed.clone(),
            age_ms: age_ms(now, e.last_advanced),
            public_path: !e.local_path,
        })
    }

    fn dial(&mut self, addr: SocketAddr, peer: Option<PeerId>, now: Instant) {
        if self.dialing.len() >= self.config.max_connections
            || self.dialing.iter().any(|d| d.addr == addr)
        {
            return;
        }
        self.dialing.push(Dialing {
            addr,
            peer,
            deadline: now + self.config.dial_timeout,
        });
        self.out.push_back(Command::Dial { addr, peer });
    }

    /// Known peers we could open a new connection to.
    fn dial_candidates(&self) -> Vec<(PeerId, SocketAddr)> {
        self.table
            .iter()
            .filter(|(p, _)| {
                !self.links.contains_key(*p) && !self.dialing.iter().any(|d| d.peer == Some(**p))
            })
            .filter_map(|(p, _)| self.dial_addrs(p).first().map(|a| (*p, *a)))
            .collect()
    }

    /// Moves `k` random elements to the front of `items` and returns them.
    fn sample<'a, T>(&mut self, items: &'a mut [T], k: usize) -> &'a [T] {
        let k = k.min(items.len());
        for i in 0..k {
            let j = i + self.rng.index(items.len() - i);
            items.swap(i, j);
        }
        &items[..k]
    }

    fn expire(&mut self, now: Instant) {
        let dead_after = self.config.dead_after;
        let dead: Vec<PeerId> = self
            .table
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_advanced) >= dead_after)
            .map(|(p, _)| *p)
            .collect();
        for peer in dead {
            let Some(entry) = self.table.remove(&peer) else {
                continue;
            };
            tracing::debug!(?peer, seq = entry.signed.advert.seq, "peer expired");
            self.stats.peers_expired += 1;
            self.tombstone(peer, entry.signed.advert.seq, now);
            self.out.push_back(Command::PeerDown(peer));
            // A connection whose far end stopped heartbeating is of no use to gossip.
            if self.unlink(&peer) {
                self.out.push_back(Command::Disconnect { peer });
            }
        }
        self.tombstones.retain(|_, t| t.expires > now);
        self.dialing.retain(|d| d.deadline > now);
    }

    fn tombstone(&mut self, peer: PeerId, seq: u64, now: Instant) {
        if self.tombstones.len() >= self.config.max_peers && !self.tombstones.contains_key(&peer) {
            let oldest = self
                .tombstones
                .iter()
                .min_by_key(|(_, t)| t.expires)
                .map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                self.tombstones.remove(&oldest);
            }
        }
        self.tombstones.insert(
            peer,
            Tombstone {
                seq,
                expires: now + self.config.tombstone_ttl,
            },
        );
    }

    /// Dials random known peers while below `min_connections`, and the bootstrap addresses
    /// while isolated.
    fn maintain(&mut self, now: Instant) {
        let have = self.links.len() + self.dialing.len();
        if have >= self.config.min_connections {
            return;
        }
        let mut candidates = self.dial_candidates();
        let chosen = self
            .sample(&mut candidates, self.config.min_connections - have)
            .to_vec();
        for (peer, addr) in chosen {
            self.dial(addr, Some(peer), now);
        }
        if self.links.is_empty() && self.dialing.is_empty() && now >= self.next_bootstrap {
            self.next_bootstrap = now + self.config.bootstrap_retry;
            let mut addrs = self.bootstrap.clone();
            let chosen = self
                .sample(&mut addrs, self.config.min_connections)
                .to_vec();
            for (addr, peer) in chosen {
                self.dial(addr, peer, now);
            }
        }
    }

    fn digest_chunks(&self) -> Vec<Digest> {
        let mut entries: Vec<DigestEntry> = Vec::with_capacity(self.table.len() + 1);
        let mut me_placed = false;
        for (peer, e) in &self.table {
            if !me_placed && self.me < *peer {
                entries.push(self.local_entry());
                me_placed = true;
            }
            entries.push(DigestEntry {
                peer: *peer,
                seq: e.signed.advert.seq,
            });
        }
        if !me_placed {
            entries.push(self.local_entry());
        }
        let chunks: Vec<&[DigestEntry]> = entries.chunks(MAX_DIGEST_ENTRIES).collect();
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| Digest {
                start: if i == 0 { None } else { Some(chunk[0].peer) },
                end: chunks.get(i + 1).map(|next| next[0].peer),
                entries: chunk.to_vec(),
            })
            .collect()
    }

    fn local_entry(&self) -> DigestEntry {
        DigestEntry {
            peer: self.me,
            seq: self.local.advert.seq,
        }
    }

    fn gossip(&mut self, _now: Instant) {
        if self.links.is_empty() {
            return;
        }
        let mut targets: Vec<PeerId> = self.links.keys().copied().collect();
        let targets = self
            .sample(&mut targets, self.config.gossip_fanout)
            .to_vec();
        let chunks = self.digest_chunks();
        if let Some((&last, rest)) = targets.split_last() {
            for &to in rest {
                for chunk in &chunks {
                    self.send(to, MembershipMessage::Digest(chunk.clone()));
                }
            }
            for chunk in chunks {
                self.send(last, MembershipMessage::Digest(chunk));
            }
        }
    }

    /// Swaps one connection for one to a random other peer, so that the overlay does not
    /// freeze into the shape the join order happened to give it.
    fn shuffle(&mut self, now: Instant) {
        if self.links.len() < self.config.min_connections {
            return;
        }
        let mut candidates = self.dial_candidates();
        let Some(&(peer, addr)) = self.sample(&mut candidates, 1).first() else {
            return;
        };
        let mut linked: Vec<PeerId> = self.links.keys().copied().collect();
        if let Some(&victim) = self.sample(&mut linked, 1).first() {
            self.unlink(&victim);
            self.out.push_back(Command::Disconnect { peer: victim });
        }
        self.dial(addr, Some(peer), now);
    }

    fn on_connected(&mut self, peer: PeerId, addr: SocketAddr, inbound: bool, now: Instant) {
        self.dialing
            .retain(|d| d.addr != addr && d.peer != Some(peer));
        if peer == self.me {
            // A bootstrap or mDNS address that turned out to be ourselves.
            self.out.push_back(Command::Disconnect { peer });
            return;
        }
        if self.links.contains_key(&peer) {
            return;
        }
        if self.links.len() >= self.config.max_connections {
            // Refuse, but hand over a sample of the table first so a joiner that only knows
            // us still learns whom else to dial.
            self.stats.connections_refused += 1;
            tracing::debug!(?peer, inbound, "connection refused: at capacity");
            let mut known: Vec<PeerId> = self.table.keys().copied().collect();
            let sample = self
                .sample(&mut known, MAX_ADVERTS_PER_MESSAGE - 1)
                .to_vec();
            let mut adverts: Vec<GossipedAdvert> = sample
                .iter()
                .filter_map(|p| self.gossiped(p, now))
                .collect();
            adverts.extend(self.gossiped(&self.me, now));
            self.send(peer, MembershipMessage::Adverts(adverts));
            self.out.push_back(Command::Disconnect { peer });
            return;
        }
        tracing::debug!(?peer, %addr, inbound, "membership link up");
        self.links.insert(peer, Link { addr, inbound });
        // Sync at once instead of waiting for the next round, so a joiner learns the table
        // within one round trip. One digest syncs both ways (the answer pushes and pulls), so
        // only the accepting side sends one.
        let own = self.gossiped(&self.me, now).into_iter().collect();
        self.send(peer, MembershipMessage::Adverts(own));
        if inbound {
            for chunk in self.digest_chunks() {
                self.send(peer, MembershipMessage::Digest(chunk));
            }
        }
    }

    fn on_discovered(&mut self, addr: SocketAddr, peer: Option<PeerId>, now: Instant) {
        if peer == Some(self.me) {
            return;
        }
        if !self.bootstrap.iter().any(|(a, _)| *a == addr) {
            if self.bootstrap.len() >= MAX_BOOTSTRAP_ADDRS {
                let i = self.rng.index(self.bootstrap.len());
                self.bootstrap[i] = (addr, peer);
            } else {
                self.bootstrap.push((addr, peer));
            }
        }
        if peer.is_some_and(|p| self.links.contains_key(&p)) {
            return;
        }
        if self.links.len() + self.dialing.len() < self.config.min_connections {
            self.dial(addr, peer, now);
        }
    }

    fn on_message(&mut self, from: PeerId, msg: MembershipMessage, now: Instant) {
        if let Err(err) = msg.validate() {
            self.stats.messages_rejected += 1;
            tracing::debug!(?from, %err, "membership message rejected");
            return;
        }
        match msg {
            MembershipMessage::Digest(digest) => self.on_digest(from, digest, now),
            MembershipMessage::Adverts(adverts) => {
                // Where the sender is decides what its adverts may make us dial. A message may
                // arrive just after its link closed (a refusal's sample does); from a sender we
                // cannot place at all, adverts count as having come from afar.
                let from_public = self
                    .links
                    .get(&from)
                    .map(|l| l.addr)
                    .or_else(|| self.closed.get(&from).copied())
                    .is_none_or(|a| !Host::of(a.ip()).is_local());
                for mut advert in adverts {
                    advert.public_path |= from_public;
                    self.learn(advert, now);
                }
            }
            MembershipMessage::Request(ids) => self.on_request(from, ids, now),
        }
    }

    fn on_digest(&mut self, from: PeerId, digest: Digest, now: Instant) {
        // Replies can only travel over a live connection; stale digests are not worth a dial.
        if !self.links.contains_key(&from) {
            return;
        }
        let lower = digest.start.map_or(Bound::Unbounded, Bound::Included);
        let upper = digest.end.map_or(Bound::Unbounded, Bound::Excluded);
        if let (Some(s), Some(e)) = (digest.start, digest.end)
            && s >= e
        {
            return;
        }
        // Merge-walk the digest against our own entries in its range (ours include self): each
        // side is sorted, so this is linear and allocates nothing per entry.
        let mut ours = self
            .table
            .range((lower, upper))
            .map(|(p, e)| {
                let entry = DigestEntry {
                    peer: *p,
                    seq: e.signed.advert.seq,
                };
                (entry, Some(e))
            })
            .peekable();
        let mut me_entry = digest.covers(&self.me).then(|| (self.local_entry(), None));
        let mut theirs = digest.entries.iter().copied().peekable();
        let mut push: Vec<GossipedAdvert> = Vec::new();
        let mut want: Vec<PeerId> = Vec::new();
        let advert_of = |entry: Option<&Entry>| match entry {
            Some(e) => GossipedAdvert {
                signed: e.signed.clone(),
                age_ms: age_ms(now, e.last_advanced),
                public_path: !e.local_path,
            },
            None => GossipedAdvert {
                signed: self.local.clone(),
                age_ms: 0,
                public_path: false,
            },
        };
        while push.len() < MAX_REPLY_ADVERTS || want.len() < MAX_REQUEST_IDS {
            let next_ours = match (ours.peek(), me_entry) {
                (Some(o), Some(m)) => Some(if m.0.peer < o.0.peer { m } else { *o }),
                (Some(o), None) => Some(*o),
                (None, m) => m,
            };
            let o = next_ours.map(|(entry, _)| entry);
            let t = theirs.peek().copied();
            let order = match (t, o) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(t), Some(o)) => t.peer.cmp(&o.peer),
            };
            let (mut take_theirs, mut take_ours) = (false, false);
            match (order, t, o) {
                (Ordering::Equal, Some(t), Some(o)) => {
                    if o.seq > t.seq {
                        push.push(advert_of(next_ours.and_then(|(_, e)| e)));
                    } else if t.seq > o.seq {
                        want.push(t.peer);
                    }
                    (take_theirs, take_ours) = (true, true);
                }
                (Ordering::Less, Some(t), _) => {
                    let blocked = self
                        .tombstones
                        .get(&t.peer)
                        .is_some_and(|stone| stone.seq >= t.seq);
                    if !blocked && self.table.len() < self.config.max_peers {
                        want.push(t.peer);
                    }
                    take_theirs = true;
                }
                (_, _, Some(_)) => {
                    push.push(advert_of(next_ours.and_then(|(_, e)| e)));
                    take_ours = true;
                }
                _ => break,
            }
            if take_theirs {
                theirs.next();
            }
            if take_ours {
                if me_entry.is_some_and(|m| o.is_some_and(|o| o.peer == m.0.peer)) {
                    me_entry = None;
                } else {
                    ours.next();
                }
            }
        }
        push.truncate(MAX_REPLY_ADVERTS);
        want.truncate(MAX_REQUEST_IDS);
        self.send_adverts(from, push);
        if !want.is_empty() {
            self.send(from, MembershipMessage::Request(want));
        }
    }

    fn on_request(&mut self, from: PeerId, mut ids: Vec<PeerId>, now: Instant) {
        if !self.links.contains_key(&from) {
            return;
        }
        ids.sort_unstable();
        ids.dedup();
        let adverts: Vec<GossipedAdvert> = ids
            .iter()
            .take(MAX_REPLY_ADVERTS)
            .filter_map(|p| self.gossiped(p, now))
            .collect();
        self.send_adverts(from, adverts);
    }

    /// Admits an advert if it is newer than what we hold, recent, within the caps and signed
    /// by its owner.
    fn learn(&mut self, gossiped: GossipedAdvert, now: Instant) {
        let GossipedAdvert {
            signed,
            age_ms,
            public_path,
        } = gossiped;
        let peer = signed.advert.peer;
        let seq = signed.advert.seq;
        if peer == self.me {
            // Our own advert from an earlier run that outlived it: jump past it, or the network
            // would keep preferring the stale one.
            if seq >= self.local.advert.seq && signed.verify(&self.auth).is_ok() {
                tracing::debug!(seq, "own advert from an earlier run; jumping past it");
                self.local.advert.seq = seq;
                self.reissue(now, |_| {});
            }
            return;
        }
        let age = Duration::from_millis(u64::from(age_ms));
        if age >= self.config.dead_after {
            self.stats.adverts_stale += 1;
            return;
        }
        // The signed issue time, whatever age the relayer claims: an old advert replayed
        // after its owner died stays old. One from the future is refused too, so a peer with
        // a clock far ahead cannot make its adverts outlive it.
        let wall = self.wall_ms(now);
        let skew = u64::try_from(self.config.max_clock_skew.as_millis()).unwrap_or(u64::MAX);
        if seq.saturating_add(skew) < wall || seq > wall.saturating_add(skew) {
            self.stats.adverts_out_of_time += 1;
            return;
        }
        let issued = now.checked_sub(age).unwrap_or(now);
        // One lookup on the hot path (a newer heartbeat of a known peer).
        if let Some(entry) = self.table.get_mut(&peer) {
            if seq < entry.signed.advert.seq {
                return;
            }
            if seq == entry.signed.advert.seq {
                // The same advert by another path: a local one (checked when it was admitted)
                // makes the peer's local addresses dialable. The signature is not checked
                // again, so only the bytes we hold are trusted, never the copy's.
                if !public_path && entry.signed == signed {
                    entry.local_path = true;
                }
                return;
            }
            if let Err(err) = signed.verify(&self.auth) {
                self.stats.adverts_invalid += 1;
                tracing::debug!(?peer, %err, "advert rejected");
                return;
            }
            self.stats.adverts_accepted += 1;
            entry.last_advanced = entry.last_advanced.max(issued);
            entry.signed = signed;
            entry.local_path |= !public_path;
            return;
        }
        if self.tombstones.get(&peer).is_some_and(|t| t.seq >= seq) {
            self.stats.adverts_stale += 1;
            return;
        }
        if self.table.len() >= self.config.max_peers {
            self.stats.adverts_table_full += 1;
            return;
        }
        if let Err(err) = signed.verify(&self.auth) {
            self.stats.adverts_invalid += 1;
            tracing::debug!(?peer, %err, "advert rejected");
            return;
        }
        self.stats.adverts_accepted += 1;
        tracing::debug!(?peer, seq, "peer learned");
        self.tombstones.remove(&peer);
        self.out.push_back(Command::PeerUp(signed.advert.clone()));
        self.table.insert(
            peer,
            Entry {
                signed,
                last_advanced: issued,
                local_path: !public_path,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::advert::test_auth::{FakeAuth, fake_signature};
    use super::*;

    fn id(n: u16) -> PeerId {
        let mut bytes = [0x5au8; 32];
        bytes[..2].copy_from_slice(&n.to_be_bytes());
        PeerId::from_bytes(bytes)
    }

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8), 7000))
    }

    fn capacity() -> Capacity {
        Capacity {
            cores_donated: 4,
            cores_free: 2,
            memory_mb: 1024,
            profile: 1,
        }
    }

    fn node_with(config: Config, n: u16, now: Instant) -> Membership<FakeAuth> {
        let local = LocalPeer {
            id: id(n),
            addrs: vec![addr(n)],
            capacity: capacity(),
            initial_seq: 0,
        };
        Membership::new(config, local, FakeAuth { me: id(n) }, u64::from(n), now)
    }

    fn node(n: u16, now: Instant) -> Membership<FakeAuth> {
        node_with(Config::default(), n, now)
    }

    fn signed(n: u16, seq: u64) -> SignedAdvert {
        let advert = Advert {
            peer: id(n),
            addrs: vec![addr(n)],
            cores_donated: 4,
            cores_free: 1,
            memory_mb: 512,
            profile: 1,
            seq,
            job: None,
        };
        SignedAdvert::sign(advert, &FakeAuth { me: id(n) }).unwrap()
    }

    fn gossiped(n: u16, seq: u64) -> GossipedAdvert {
        GossipedAdvert {
            signed: signed(n, seq),
            age_ms: 0,
            public_path: false,
        }
    }

    fn feed(m: &mut Membership<FakeAuth>, from: u16, adverts: Vec<GossipedAdvert>, now: Instant) {
        let msg = MembershipMessage::Adverts(adverts);
        m.handle(
            Event::Message {
                from: id(from),
                msg,
            },
            now,
        );
    }

    fn drain(m: &mut Membership<FakeAuth>) -> Vec<Command> {
        std::iter::from_fn(|| m.poll_command()).collect()
    }

    fn connect(m: &mut Membership<FakeAuth>, n: u16, now: Instant) {
        let event = Event::Connected {
            peer: id(n),
            addr: addr(n),
            inbound: true,
        };
        m.handle(event, now);
    }

    fn seq_of(m: &Membership<FakeAuth>, n: u16) -> Option<u64> {
        m.peer(&id(n)).map(|a| a.seq)
    }

    #[test]
    fn local_addresses_heard_of_through_a_public_peer_are_never_dialed() {
        let t0 = Instant::now();
        let mut m = node(1, t0);
        // Peer 2 is on the internet, peer 3 on our LAN.
        let public: SocketAddr = "203.0.113.9:7000".parse().unwrap();
        m.handle(
            Event::Connected {
                peer: id(2),
                addr: public,
                inbound: true,
            },
            t0,
        );
        connect(&mut m, 3, t0);
        drain(&mut m);
        let lan_victim = |n: u16, seq: u64| {
            let advert = Advert {
                peer: id(n),
                addrs: vec![
                    "10.0.0.99:22".parse().unwrap(),
                    "198.51.100.1:7000".parse().unwrap(),
                ],
                cores_donated: 4,
                cores_free: 1,
                memory_mb: 512,
                profile: 1,
                seq,
                job: None,
            };
            SignedAdvert::sign(advert, &FakeAuth { me: id(n) }).unwrap()
        };
        let hop = |signed: SignedAdvert, public_path: bool| GossipedAdvert {
            signed,
            age_ms: 0,
            public_path,
        };
        // From the public peer: only the public address may be dialed.
        feed(&mut m, 2, vec![hop(lan_victim(10, 1), false)], t0);
        let public_only: Vec<SocketAddr> = vec!["198.51.100.1:7000".parse().unwrap()];
        assert_eq!(m.dial_addrs(&id(10)), public_only);
        // Laundered through our LAN neighbour, the path still had a public hop.
        feed(&mut m, 3, vec![hop(lan_victim(11, 1), true)], t0);
        assert_eq!(m.dial_addrs(&id(11)), public_only);
        // Relayed onwards, the advert says so.
        let onward = m.gossiped(&id(10), t0).expect("known");
        assert!(onward.public_path);
        // The same advert over local hops alone makes the LAN address dialable.
        feed(&mut m, 3, vec![hop(lan_victim(10, 1), false)], t0);
        assert_eq!(m.dial_addrs(&id(10)).len(), 2);
        // So does a newer advert that travelled only locally.
        feed(&mut m, 3, vec![hop(lan_victim(11, 2), false)], t0);
        assert_eq!(m.dial_addrs(&id(11)).len(), 2);
        // A sender we cannot place counts as public.
        feed(&mut m, 40, vec![hop(lan_victim(12, 1), false)], t0);
        assert_eq!(m.dial_addrs(&id(12)), public_only);
        // Nothing learned from afar is ever a dial target at its local address.
        m.handle_timeout(t0 + Duration::from_secs(5));
        for c in drain(&mut m) {
            if let Command::Dial { addr, peer } = c {
                assert!(
                    !(addr.ip().to_string() == "10.0.0.99" && peer == Some(id(12))),
                    "dialed a local address heard of from afar"
                );
            }
        }
    }

    #[test]
    fn newer_seq_wins_and_older_is_ignored() {
        let t0 = Instant::now();
        let mut m = node(1, t0);
        feed(&mut m, 2, vec![gossiped(3, 5)], t0);
        assert_eq!(seq_of(&m, 3), Some(5));
        feed(&mut m, 2, vec![gossiped(3, 4), gossiped(3, 5)], t0);
        assert_eq!(seq_of(&m, 3), Some(5));
        feed(&mut m, 2, vec![gossiped(3, 9)], t0);
        assert_eq!(seq_of(&m, 3), Some(9));
        let ups: Vec<_> = drain(&mut m)
            .into_iter()
            .filter(|c| matches!(c, Command::PeerUp(_)))
            .collect();
        assert_eq!(ups.len(), 1, "only the first sighting is a PeerUp");
        assert_eq!(m.peers().count(), 1);
        assert_eq!(m.stats().adverts_accepted, 2);
    }

    #[test]
    fn silent_peer_expires_and_its_tombstone_blocks_stale_adverts() {
        let t0 = Instant::now();
        let config = Config::default();
        let mut m = node(1, t0);
        feed(&mut m, 2, vec![gossiped(3, 5)], t0);
        drain(&mut m);
        let later = t0 + config.dead_after + config.gossip_interval * 2;
        let mut now = t0;
        while now < later {
            now += Duration::from_millis(100);
            m.handle_timeout(now);
        }
        assert_eq!(seq_of(&m, 3), None);
        assert!(drain(&mut m).contains(&Command::PeerDown(id(3))));
        assert_eq!(m.tombstone_count(), 1);
        // Replayed or late gossip of the same seq must not resurrect it.
        feed(&mut m, 2, vec![gossiped(3, 5), gossiped(3, 4)], now);
        assert_eq!(seq_of(&m, 3), None);
        assert_eq!(m.stats().adverts_stale, 2);
        // A genuinely newer advert (the peer came back) does.
        feed(&mut m, 2, vec![gossiped(3, 6)], now);
        assert_eq!(seq_of(&m, 3), Some(6));
        assert_eq!(m.tombstone_count(), 0);
    }

    #[test]
    fn tombstones_expire() {
        let t0 = Instant::now();
        let config = Config::default();
        let mut m = node(1, t0);
        feed(&mut m, 2, vec![gossiped(3, 5)], t0);
        let end = t0 + config.dead_after + config.tombstone_ttl + Duration::from_secs(2);
        let mut now = t0;
        while now < end {
            now += Duration::from_millis(250);
            m.handle_timeout(now);
        }
        assert_eq!(m.tombstone_count(), 0);
    }

    #[test]
    fn old_adverts_are_dated_by_their_age() {
        let t0 = Instant::now();
        let config = Config::default();
        let mut m = node(1, t0);
        let mut old = gossiped(3, 5);
        old.age_ms = config.dead_after.as_millis() as u32;
        feed(&mut m, 2, vec![old], t0);
        assert_eq!(seq_of(&m, 3), None);
        assert_eq!(m.stats().adverts_stale, 1);
        // An advert 4 s old expires 1 s later, not 5 s later.
        let mut aged = gossiped(4, 5);
        aged.age_ms = 4000;
        feed(&mut m, 2, vec![aged], t0);
        assert_eq!(seq_of(&m, 4), Some(5));
        m.handle_timeout(t0 + Duration::from_millis(1300));
        m.handle_timeout(t0 + Duration::from_millis(2000));
        assert_eq!(seq_of(&m, 4), None);
    }

    #[test]
    fn forged_absurd_and_self_adverts_are_dropped() {
        let t0 = Instant::now();
        let mut m = node(1, t0);
        let mut forged = gossiped(3, 5);
        forged.signed.advert.cores_free = 4;
        let mut wrong_key = gossiped(4, 5);
        wrong_key.signed.signature = fake_signature(&id(5), b"anything");
        let mut absurd = gossiped(6, 5);
        absurd.signed.advert.cores_free = 9;
        absurd.signed.signature = fake_signature(
            &id(6),
            &postcard::to_allocvec(&absurd.signed.advert).unwrap(),
        );
        let mut too_many = gossiped(7, 5);
        too_many.signed.advert.addrs = vec![addr(7); MAX_ADVERT_ADDRS + 1];
        let mut long_sig = gossiped(8, 5);
        long_sig.signed.signature = vec![0; MAX_SIGNATURE_LEN + 1];
        feed(
            &mut m,
            2,
            vec![forged, wrong_key, absurd, too_many, long_sig],
            t0,
        );
        assert_eq!(m.peer_count(), 0);
        assert_eq!(m.stats().adverts_invalid, 5);
        // An advert claiming to be us is never put in the table.
        feed(&mut m, 2, vec![gossiped(1, 0)], t0);
        assert_eq!(m.peer_count(), 0);
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn own_advert_from_an_earlier_run_is_outranked() {
        let t0 = Instant::now();
        let mut m = node(1, t0);
        feed(&mut m, 2, vec![gossiped(1, 500)], t0);
        assert_eq!(m.local_advert().advert.seq, 501);
        assert_eq!(m.local_advert().verify(&FakeAuth { me: id(9) }), Ok(()));
        // A forged one does not move us.
        let mut forged = gossiped(1, 9000);
        forged.signed.signature = vec![1; 8];
        feed(&mut m, 2, vec![forged], t0);
        assert_eq!(m.local_advert().advert.seq, 501);
    }

    #[test]
    fn heartbeat_bumps_and_re_signs() {
        let t0 = Instant::now();
        let mut m = node(1, t0);
        let seq0 = m.local_advert().advert.seq;
        let mut now = t0;
        for _ in 0..50 {
            now += Duration::from_millis(100);
            m.handle_timeout(now);
        }
        // Two beats, at 2 s and 4 s: each seq is the wall clock in milliseconds then.
        assert_eq!(m.local_advert().advert.seq, seq0 + 4_000);
        assert_eq!(m.local_advert().verify(&FakeAuth { me: id(2) }), Ok(()));
        m.handle(
            Event::CapacityChanged(Capacity {
                cores_donated: 4,
                cores_free: 99,
                memory_mb: 1,
                profile: 2,
            }),
            now,
        );
        let advert = &m.local_advert().advert;
        assert_eq!(
            (advert.seq, advert.cores_free, advert.profile),
            (seq0 + 5_000, 4, 2)
        );
        // Within one millisecond a change still moves seq on.
        m.handle(Event::JobChanged(None), now);
        assert_eq!(m.local_advert().advert.seq, seq0 + 5_001);
    }

    /// A relayer replays a dead peer's last validly signed advert, claiming it is fresh, after
    /// the tombstone is gone: the signed issue time gives it away. An advert dated far ahead is
    /// refused as well, and one within the clock skew is taken.
    #[test]
    fn a_replayed_advert_never_revives_a_dead_peer() {
        let t0 = Instant::now();
        let config = Config::default();
        // Our clock reads 1,000,000 ms at t0.
        let local = LocalPeer {
            id: id(1),
            addrs: vec![addr(1)],
            capacity: capacity(),
            initial_seq: 1_000_000,
        };
        let mut m = Membership::new(config.clone(), local, FakeAuth { me: id(1) }, 1, t0);
        m.handle(
            Event::Connected {
                peer: id(2),
                addr: addr(2),
                inbound: true,
            },
            t0,
        );
        let push = |m: &mut Membership<FakeAuth>, seq: u64, now: Instant| {
            let msg = MembershipMessage::Adverts(vec![gossiped(7, seq)]);
            m.handle(Event::Message { from: id(2), msg }, now);
        };
        // Peer 7 issued its last advert at 1,000,000 ms, then crashed.
        push(&mut m, 1_000_000, t0);
        assert_eq!(m.peers().count(), 1);
        let mut now = t0;
        while now < t0 + config.dead_after + Duration::from_secs(2) {
            now += Duration::from_millis(100);
            m.handle_timeout(now);
        }
        assert_eq!(m.peers().count(), 0, "expired");
        // Past the tombstone's life the same bytes come back with age 0.
        let later = t0 + config.tombstone_ttl + config.dead_after + Duration::from_secs(1);
        m.handle_timeout(later);
        assert_eq!(m.tombstone_count(), 0);
        push(&mut m, 1_000_000, later);
        assert_eq!(m.peers().count(), 0, "a replay revived a dead peer");
        assert_eq!(m.stats().adverts_out_of_time, 1);
        // Ten minutes ahead of our clock: refused; a few seconds ahead: taken.
        let wall_later = 1_000_000 + later.duration_since(t0).as_millis() as u64;
        push(&mut m, wall_later + 600_000, later);
        assert_eq!(m.peers().count(), 0);
        assert_eq!(m.stats().adverts_out_of_time, 2);
        push(&mut m, wall_later + 3_000, later);
        assert_eq!(m.peers().count(), 1);
    }

    #[test]
    fn over_cap_message_is_ignored_whole() {
        let t0 = Instant::now();
        let mut m = node(1, t0);
        let adverts = (0..=MAX_ADVERTS_PER_MESSAGE as u16)
            .map(|n| gossiped(n + 10, 1))
            .collect();
        feed(&mut m, 2, adverts, t0);
        assert_eq!(m.peer_count(), 0);
        assert_eq!(m.stats().messages_rejected, 1);
    }

    #[test]
    fn table_and_tombstones_stay_within_max_peers() {
        let t0 = Instant::now();
        let config = Config {
            max_peers: 16,
            ..Config::default()
        };
        let mut m = node_with(config.clone(), 1, t0);
        for chunk in (100..400u16)
            .collect::<Vec<_>>()
            .chunks(MAX_ADVERTS_PER_MESSAGE)
        {
            feed(
                &mut m,
                2,
                chunk.iter().map(|&n| gossiped(n, 1)).collect(),
                t0,
            );
        }
        assert_eq!(m.peer_count(), 16);
        assert_eq!(m.stats().adverts_table_full, 300 - 16);
        // Cycle many peers through expiry: tombstones are capped too.
        let mut now = t0;
        for round in 0..20u16 {
            now += config.dead_after + Duration::from_secs(1);
            m.handle_timeout(now);
            let fresh = (0..16)
                .map(|n| gossiped(1000 + round * 16 + n, 1))
                .collect();
            feed(&mut m, 2, fresh, now);
            assert!(m.peer_count() <= 16);
            assert!(m.tombstone_count() <= 16);
        }
    }

    #[test]
    fn digest_gets_push_and_pull_answers() {
        let t0 = Instant::now();
        let mut m = node(10, t0);
        feed(
            &mut m,
            2,
            vec![gossiped(3, 5), gossiped(4, 5), gossiped(5, 5)],
            t0,
        );
        connect(&mut m, 2, t0);
        drain(&mut m);
        let digest = Digest {
            start: None,
            end: None,
            entries: vec![
                DigestEntry {
                    peer: id(2),
                    seq: 1,
                },
                DigestEntry {
                    peer: id(3),
                    seq: 9,
                },
                DigestEntry {
                    peer: id(4),
                    seq: 2,
                },
                DigestEntry {
                    peer: id(7),
                    seq: 1,
                },
            ],
        };
        let msg = MembershipMessage::Digest(digest);
        m.handle(Event::Message { from: id(2), msg }, t0);
        let mut pushed = Vec::new();
        let mut wanted = Vec::new();
        for command in drain(&mut m) {
            match command {
                Command::Send {
                    to,
                    msg: MembershipMessage::Adverts(a),
                } => {
                    assert_eq!(to, id(2));
                    pushed.extend(a.into_iter().map(|g| g.signed.advert.peer));
                }
                Command::Send {
                    msg: MembershipMessage::Request(ids),
                    ..
                } => wanted.extend(ids),
                other => panic!("unexpected {other:?}"),
            }
        }
        pushed.sort();
        assert_eq!(
            pushed,
            vec![id(4), id(5), id(10)],
            "older or missing in the digest"
        );
        assert_eq!(wanted, vec![id(2), id(3), id(7)], "newer or unknown to us");
    }

    #[test]
    fn chunked_digest_covers_only_its_range() {
        let t0 = Instant::now();
        let mut m = node(1000, t0);
        feed(&mut m, 2, vec![gossiped(3, 5), gossiped(20, 5)], t0);
        connect(&mut m, 2, t0);
        drain(&mut m);
        let digest = Digest {
            start: Some(id(10)),
            end: Some(id(30)),
            entries: vec![],
        };
        let msg = MembershipMessage::Digest(digest);
        m.handle(Event::Message { from: id(2), msg }, t0);
        let pushed: Vec<PeerId> = drain(&mut m)
            .into_iter()
            .flat_map(|c| match c {
                Command::Send {
                    msg: MembershipMessage::Adverts(a),
                    ..
                } => a,
                _ => Vec::new(),
            })
            .map(|g| g.signed.advert.peer)
            .collect();
        assert_eq!(pushed, vec![id(20)]);
    }

    #[test]
    fn large_tables_gossip_in_chunks_within_caps() {
        let t0 = Instant::now();
        let mut m = node(1, t0);
        for chunk in (100..700u16)
            .collect::<Vec<_>>()
            .chunks(MAX_ADVERTS_PER_MESSAGE)
        {
            feed(
                &mut m,
                2,
                chunk.iter().map(|&n| gossiped(n, 1)).collect(),
                t0,
            );
        }
        connect(&mut m, 2, t0);
        let mut covered = 0;
        for command in drain(&mut m) {
            if let Command::Send { msg, .. } = command {
                assert!(msg.encode().is_ok());
                msg.validate().unwrap();
                if let MembershipMessage::Digest(d) = msg {
                    covered += d.entries.len();
                }
            }
        }
        assert_eq!(covered, 601);
    }

    #[test]
    fn connections_beyond_the_cap_are_refused_with_a_sample() {
        let t0 = Instant::now();
        let mut m = node(1, t0);
        feed(&mut m, 2, (100..164).map(|n| gossiped(n, 1)).collect(), t0);
        feed(&mut m, 2, (164..200).map(|n| gossiped(n, 1)).collect(), t0);
        for n in 100..108 {
            connect(&mut m, n, t0);
        }
        drain(&mut m);
        assert_eq!(m.connection_count(), 8);
        connect(&mut m, 150, t0);
        let commands = drain(&mut m);
        assert_eq!(m.connection_count(), 8);
        assert_eq!(m.stats().connections_refused, 1);
        assert!(
            matches!(
            &commands[..],
            [
                Command::Send { msg: MembershipMessage::Adverts(a), .. },
                Command::Disconnect { peer },
            ] if a.len() == MAX_ADVERTS_PER_MESSAGE && *peer == id(150)
            ),
            "{commands:?}"
        );
    }

    #[test]
    fn joiner_dials_bootstrap_then_known_peers() {
        let t0 = Instant::now();
        let mut m = node(1, t0);
        let boot = addr(2);
        m.handle(
            Event::Discovered {
                addr: boot,
                peer: None,
            },
            t0,
        );
        assert_eq!(
            drain(&mut m),
            vec![Command::Dial {
                addr: boot,
                peer: None
            }]
        );
        m.handle(
            Event::Connected {
                peer: id(2),
                addr: boot,
                inbound: false,
            },
            t0,
        );
        let sent = drain(&mut m);
        assert!(
            matches!(&sent[0], Command::Send { msg: MembershipMessage::Adverts(a), .. } if a[0].signed.advert.peer == id(1))
        );
        assert_eq!(sent.len(), 1, "the accepting side sends the digest");
        feed(&mut m, 2, (3..20).map(|n| gossiped(n, 1)).collect(), t0);
        drain(&mut m);
        m.handle_timeout(t0 + Duration::from_millis(600));
        let dials: Vec<_> = drain(&mut m)
            .into_iter()
            .filter_map(|c| match c {
                Command::Dial {
                    peer: Some(p),
                    addr,
                } => Some((p, addr)),
                _ => None,
            })
            .collect();
        assert_eq!(
            dials.len(),
            3,
            "up to min_connections with the bootstrap link"
        );
        for (p, a) in dials {
            assert_eq!(m.peer(&p).unwrap().addrs[0], a);
        }
    }

    #[test]
    fn isolated_peer_redials_bootstrap_but_not_in_a_hot_loop() {
        let t0 = Instant::now();
        let mut m = node(1, t0);
        let boot = addr(2);
        m.handle(
            Event::Discovered {
                addr: boot,
                peer: None,
            },
            t0,
        );
        m.handle(Event::DialFailed { addr: boot }, t0);
        drain(&mut m);
        let mut dials = 0;
        let mut now = t0;
        for _ in 0..100 {
            now += Duration::from_millis(100);
            m.handle_timeout(now);
            for c in drain(&mut m) {
                if let Command::Dial { addr, .. } = c {
                    assert_eq!(addr, boot);
                    dials += 1;
                    m.handle(Event::DialFailed { addr }, now);
                }
            }
        }
        assert!((1..=3).contains(&dials), "{dials} dials in 10 s");
    }

    #[test]
    fn dialing_ourselves_is_dropped() {
        let t0 = Instant::now();
        let mut m = node(1, t0);
        m.handle(
            Event::Connected {
                peer: id(1),
                addr: addr(1),
                inbound: false,
            },
            t0,
        );
        assert_eq!(drain(&mut m), vec![Command::Disconnect { peer: id(1) }]);
        assert_eq!(m.connection_count(), 0);
    }

    /// Arbitrary bytes and structurally valid but hostile messages (forged, replayed, stale,
    /// claiming to be us, from unconnected peers, with absurd ages and seqs) must never panic
    /// a peer or grow it past its caps.
    #[test]
    fn hostile_input_never_panics_or_grows_state() {
        let mut rng = Rng::seed_from_u64(0xbad);
        let t0 = Instant::now();
        let config = Config {
            max_peers: 64,
            ..Config::default()
        };
        let mut m = node_with(config.clone(), 1, t0);
        for n in 2..6 {
            connect(&mut m, n, t0);
        }
        let mut now = t0;
        let mut decoded = 0;
        for round in 0..3000u32 {
            now += Duration::from_millis(rng.below(400));
            let len = rng.index(200);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if rng.chance(0.3) {
                // Start from a real message and corrupt a byte, to get past the first tag.
                let real = MembershipMessage::Adverts(vec![gossiped(rng.below(500) as u16, 3)]);
                bytes = real.encode().unwrap();
                let at = rng.index(bytes.len());
                bytes[at] = rng.next_u64() as u8;
            }
            if let Ok(msg) = MembershipMessage::decode(&bytes) {
                decoded += 1;
                m.handle(Event::Message { from: id(2), msg }, now);
            }
            let from = id(rng.below(8) as u16);
            let msg = match rng.below(4) {
                0 => {
                    let mut adverts = Vec::new();
                    for _ in 0..rng.below(MAX_ADVERTS_PER_MESSAGE as u64 + 1) {
                        let peer = rng.below(400) as u16;
                        let mut g = gossiped(peer, rng.below(1 << 20));
                        g.age_ms = rng.below(10_000) as u32;
                        if rng.chance(0.2) {
                            g.signed.signature[0] ^= 1;
                        }
                        if rng.chance(0.1) {
                            g.signed.advert.seq = u64::MAX;
                        }
                        adverts.push(g);
                    }
                    MembershipMessage::Adverts(adverts)
                }
                1 => {
                    let mut entries: Vec<DigestEntry> = (0..rng.below(300))
                        .map(|_| DigestEntry {
                            peer: id(rng.below(1000) as u16),
                            seq: rng.next_u64(),
                        })
                        .collect();
                    if rng.chance(0.8) {
                        entries.sort_by_key(|e| e.peer);
                        entries.dedup_by_key(|e| e.peer);
                    }
                    let start = rng.chance(0.3).then(|| id(rng.below(1000) as u16));
                    let end = rng.chance(0.3).then(|| id(rng.below(1000) as u16));
                    MembershipMessage::Digest(Digest {
                        start,
                        end,
                        entries,
                    })
                }
                2 => MembershipMessage::Request(
                    (0..rng.below(300))
                        .map(|_| id(rng.below(400) as u16))
                        .collect(),
                ),
                _ => MembershipMessage::Adverts(vec![gossiped(1, rng.next_u64())]),
            };
            m.handle(Event::Message { from, msg }, now);
            if round % 7 == 0 {
                m.handle_timeout(now);
            }
            if round % 11 == 0 {
                let peer = id(rng.below(20) as u16);
                let event = match rng.below(4) {
                    0 => Event::Disconnected { peer },
                    1 => Event::Connected {
                        peer,
                        addr: addr(9),
                        inbound: rng.chance(0.5),
                    },
                    2 => Event::DialFailed { addr: addr(9) },
                    _ => Event::Discovered {
                        addr: addr(rng.below(200) as u16),
                        peer: rng.chance(0.5).then_some(peer),
                    },
                };
                m.handle(event, now);
            }
            for command in std::iter::from_fn(|| m.poll_command()) {
                if let Command::Send { msg, .. } = command {
                    msg.validate().unwrap();
                    assert!(msg.encode().is_ok(), "our own messages fit the frame cap");
                }
            }
            assert!(m.peer_count() <= config.max_peers);
            assert!(m.tombstone_count() <= config.max_peers);
            assert!(m.connection_count() <= config.max_connections);
        }
        assert!(decoded > 0, "some corrupted messages still decode");
        assert!(m.stats().adverts_invalid > 0 && m.stats().messages_rejected > 0);
    }
}
