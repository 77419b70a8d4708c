//! The overlay's driver: one actor that owns an [`Overlay`] and does its IO over QUIC.
//!
//! It carries out the state machine's commands — dialing overlay links (ALPN `cf-overlay/2`),
//! sending frames on them, closing links; a message for a peer with no link (`SendOnce`) goes on
//! a new link the overlay soon closes as a stray, and an answer to a peer whose link is open
//! (a shuffle's, through a contact) goes back on it, not on a new connection — and turns
//! what happens on the links into the state machine's events. One link per peer: when both
//! ends dial at once, both keep the link dialed by the smaller id, as membership links do. A
//! link's liveness is QUIC's (keep-alives under the idle timeout): a link that timed out is a
//! failed neighbour, one the remote closed is a neighbour that left.
//!
//! It also owns the job adverts' broadcast ([`Broadcast`], PlumTree over the active view). A
//! gossiped advert is checked before the state machine sees it — it must decode, carry its
//! submitter's valid signature, match the id and expiry it travels under, and be newer than
//! what is known of that submitter ([`AdvertBook`]) — so nothing unsigned, forged, expired or
//! replayed is forwarded; a neighbour that forwards a forgery is dropped, since honest peers
//! check before forwarding. Each link may bring at most [`GOSSIP_RATE`] new adverts a second.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::VarInt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::outbox::{Outbox, write_loop};
use crate::budget::Budget;
use crate::identity::{AllowList, Identity};
use crate::job_advert::{AdvertBook, AdvertError, JobAdvert};
use crate::net::{self, LinkKind, NetConfig, PeerLink, close};
use crate::overlay::broadcast::{
    Broadcast, BroadcastCommand, BroadcastConfig, BroadcastEvent, BroadcastMessage,
};
use crate::overlay::{Command, Config, Event, Overlay, OverlayMessage, PeerInfo};
use crate::peer_id::PeerId;
use crate::wire::{self, Frame};

/// Frames queued for one overlay link's writer; overlay messages are small and few.
const LINK_FRAMES: usize = 32;
const LINK_BYTES: u32 = 64 << 10;
/// Inputs queued for the actor.
const INPUTS: usize = 256;
/// Adverts delivered to the node and not yet taken; later ones are dropped when it lags (the
/// submitter re-issues its advert).
const DELIVERED: usize = 64;
/// New adverts a link may bring per second, and in a burst: far above what honest submitters
/// re-issue, far below what would let one neighbour flood the network.
pub(crate) const GOSSIP_RATE: f64 = 10.0;
const GOSSIP_BURST: f64 = 40.0;
/// How often bootstrap addresses whose peer is not known yet are dialed again while this peer
/// has no neighbour.
const CONTACT_RETRY: Duration = Duration::from_secs(5);
/// Most bootstrap addresses remembered.
const MAX_CONTACT_ADDRS: usize = 64;
/// How long a leaving peer waits for its links to deliver what is queued on them.
const FLUSH_ON_LEAVE: Duration = Duration::from_millis(200);

/// What the actor hears.
pub(crate) enum OverlayInput {
    /// The peer is leaving: deliver what the links hold, say goodbye and stop. (The links'
    /// readers hold senders of these inputs, so the driver cannot wait for every sender to go.)
    Leave,
    /// An overlay link someone dialed to us.
    Accepted(PeerLink),
    /// A bootstrap or discovered address, with the peer expected there when known.
    ContactAddr {
        addr: SocketAddr,
        peer: Option<PeerId>,
    },
    /// A link dialed to carry one message (`SendOnce`) is up.
    SentOnce { link: PeerLink, msg: OverlayMessage },
    /// A dial to a contact address ended.
    ContactDialed {
        addr: SocketAddr,
        link: Option<PeerLink>,
    },
    /// Broadcast this peer's own advert (signed by it).
    Publish(JobAdvert),
    /// The views as they are now.
    #[cfg(test)]
    Views(tokio::sync::oneshot::Sender<Views>),
    Dialed {
        peer: PeerId,
        link: Option<PeerLink>,
    },
    Frame {
        peer: PeerId,
        conn: u64,
        msg: OverlayMessage,
    },
    Broadcast {
        peer: PeerId,
        conn: u64,
        msg: BroadcastMessage,
    },
    Closed {
        peer: PeerId,
        conn: u64,
        graceful: bool,
    },
}

/// A peer's views, for status output and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Views {
    pub active: Vec<PeerId>,
    pub passive: Vec<PeerId>,
    /// Where each peer of either view accepts connections, as its latest info says.
    pub addrs: Vec<(PeerId, SocketAddr)>,
    /// Adverts relayed, and refused (forged, out of time, stale or over a link's rate).
    pub adverts_relayed: u64,
    pub adverts_refused: u64,
    /// The network's size as the census of shuffled peers estimates it, and its draws.
    pub estimate: Option<crate::census::Estimate>,
    pub census_samples: usize,
}

/// What the node holds of a running driver.
pub(crate) struct OverlayHandle {
    pub inputs: mpsc::Sender<OverlayInput>,
    /// Adverts heard for the first time, checked.
    pub adverts: mpsc::Receiver<JobAdvert>,
    /// The views, updated as they change.
    pub views: tokio::sync::watch::Receiver<Views>,
    pub task: tokio::task::JoinHandle<()>,
}

/// How the driver dials.
#[derive(Clone)]
pub(crate) struct Dialing {
    pub endpoint: quinn::Endpoint,
    pub identity: Arc<Identity>,
    pub allow: Option<Arc<AllowList>>,
    pub net: NetConfig,
    /// The node's book of what may be dialed and how often (`None` in tests of the driver
    /// alone). A peer's info names any address its signer likes, so a thousand keys could
    /// otherwise have every peer that hears their infos dial one victim.
    pub reach: Option<Arc<std::sync::Mutex<crate::reach::Reach>>>,
}

impl Dialing {
    /// Dials `addr` (for `peer`, when known) for an overlay link.
    async fn link(
        &self,
        addr: SocketAddr,
        peer: Option<PeerId>,
        vouch: crate::reach::Vouch,
    ) -> Result<PeerLink, net::NetError> {
        match &self.reach {
            Some(reach) => {
                super::submit::dial_with_leave(
                    reach,
                    &self.endpoint,
                    &self.identity,
                    self.allow.clone(),
                    &self.net,
                    (addr, peer, LinkKind::Overlay),
                    vouch,
                )
                .await
            }
            None => {
                net::dial_for(
                    &self.endpoint,
                    &self.identity,
                    self.allow.clone(),
                    addr,
                    peer,
                    &self.net,
                    LinkKind::Overlay,
                )
                .await
            }
        }
    }

    /// Dials the peer of `to`. A neighbour the state machine chose (at its own pace, at most
    /// a few of one host in its views) goes with the back-off of a known address; a stranger's
    /// shuffle answered on a new connection goes as a rationed probe, since strangers decide
    /// how often that happens and their infos may name anyone's address.
    async fn dial(&self, to: PeerInfo, vouch: crate::reach::Vouch) -> Option<PeerLink> {
        self.link(to.addr, Some(to.id), vouch)
            .await
            .map_err(|err| tracing::debug!(peer = %to.id, %err, "overlay dial failed"))
            .ok()
    }
}

struct Link {
    conn_id: u64,
    inbound: bool,
    conn: quinn::Connection,
    outbox: Outbox,
    /// New adverts this link may still bring.
    gossip_budget: Budget,
}

/// The actor.
pub(crate) struct OverlayDriver {
    me: PeerId,
    overlay: Overlay,
    broadcast: Broadcast,
    /// The newest advert of each submitter relayed, so replays and older copies stop here.
    book: AdvertBook,
    dialing: Dialing,
    links: HashMap<PeerId, Link>,
    pending_dials: HashSet<PeerId>,
    /// Bootstrap addresses whose peer is not known, dialed again while this peer is alone.
    contact_addrs: Vec<SocketAddr>,
    contact_dials: HashSet<SocketAddr>,
    next_contact_retry: Instant,
    next_conn: u64,
    /// For the actor's own tasks; weak, so the actor ends when every outside sender is gone.
    inputs_tx: mpsc::WeakSender<OverlayInput>,
    delivered: mpsc::Sender<JobAdvert>,
    views: tokio::sync::watch::Sender<Views>,
    relayed: u64,
    refused: u64,
    /// Peers named by the shuffles that reach this peer, for the size estimate.
    census: crate::census::Census,
    tasks: JoinSet<()>,
    commands: Vec<Command>,
    broadcast_commands: Vec<BroadcastCommand>,
}

/// Starts the driver for the peer `me`. It runs until told to leave, or every sender of inputs
/// is dropped.
pub(crate) fn spawn(me: PeerInfo, config: Config, seed: u64, dialing: Dialing) -> OverlayHandle {
    let (inputs_tx, inputs_rx) = mpsc::channel(INPUTS);
    let (delivered, adverts) = mpsc::channel(DELIVERED);
    let (views, views_rx) = tokio::sync::watch::channel(Views::default());
    let seal = Box::new(dialing.identity.advert_auth());
    let driver = OverlayDriver {
        me: me.id,
        overlay: Overlay::new(config, me, seed, Instant::now()).with_seal(seal),
        broadcast: Broadcast::new(BroadcastConfig::default()),
        book: AdvertBook::default(),
        dialing,
        links: HashMap::new(),
        pending_dials: HashSet::new(),
        contact_addrs: Vec::new(),
        contact_dials: HashSet::new(),
        next_contact_retry: Instant::now(),
        next_conn: 0,
        inputs_tx: inputs_tx.downgrade(),
        delivered,
        views,
        relayed: 0,
        refused: 0,
        census: crate::census::Census::default(),
        tasks: JoinSet::new(),
        commands: Vec::new(),
        broadcast_commands: Vec::new(),
    };
    let span = tracing::debug_span!("overlay", peer = %me.id);
    let task = tokio::spawn(driver.run(inputs_rx).instrument(span));
    OverlayHandle {
        inputs: inputs_tx,
        adverts,
        views: views_rx,
        task,
    }
}

impl OverlayDriver {
    async fn run(mut self, mut inputs: mpsc::Receiver<OverlayInput>) {
        loop {
            let mut wake = self.overlay.poll_timeout();
            if let Some(at) = self.broadcast.poll_timeout() {
                wake = wake.min(at);
            }
            if self.overlay.active_len() == 0 && !self.contact_addrs.is_empty() {
                wake = wake.min(self.next_contact_retry);
            }
            let wake = tokio::time::Instant::from_std(wake);
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(OverlayInput::Leave) | None => break,
                    Some(input) => self.on_input(input),
                },
                () = tokio::time::sleep_until(wake) => self.on_timer(),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
            self.publish_views();
        }
        // Each writer sends what is queued (a job's withdrawal, say), finishes its stream and
        // closes its connection once the peer has it; links still open after a moment are
        // closed as they are.
        let conns: Vec<quinn::Connection> = self.links.drain().map(|(_, link)| link.conn).collect();
        let _ = tokio::time::timeout(FLUSH_ON_LEAVE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        for conn in conns {
            conn.close(VarInt::from_u32(close::NORMAL), b"shutdown");
        }
    }

    fn on_input(&mut self, input: OverlayInput) {
        match input {
            // Handled by the loop.
            OverlayInput::Leave => {}
            OverlayInput::Accepted(link) => self.linked(link, None),
            OverlayInput::SentOnce { link, msg } => self.linked(link, Some(msg)),
            OverlayInput::ContactAddr { addr, peer } => self.contact_addr(addr, peer),
            OverlayInput::ContactDialed { addr, link } => {
                self.contact_dials.remove(&addr);
                if let Some(link) = link {
                    let info = PeerInfo::new(link.peer, addr, super::wall_clock_ms());
                    // The link first, so the overlay's own dial finds it open.
                    self.linked(link, None);
                    if info.id != self.me {
                        self.handle(Event::Contact(info));
                    }
                }
            }
            OverlayInput::Publish(advert) => self.publish(advert),
            #[cfg(test)]
            OverlayInput::Views(reply) => {
                let _ = reply.send(self.current_views());
            }
            OverlayInput::Broadcast { peer, conn, msg } => {
                if self.links.get(&peer).is_some_and(|l| l.conn_id == conn) {
                    self.on_broadcast(peer, msg);
                }
            }
            OverlayInput::Dialed { peer, link } => {
                self.pending_dials.remove(&peer);
                match link {
                    Some(link) => self.linked(link, None),
                    None if self.links.contains_key(&peer) => {
                        // The peer dialed us meanwhile.
                        let addr = self.links[&peer].conn.remote_address();
                        self.handle(Event::ConnectionUp { peer, addr });
                    }
                    None => self.handle(Event::DialFailed { peer }),
                }
            }
            OverlayInput::Frame { peer, conn, msg } => {
                if self.links.get(&peer).is_some_and(|l| l.conn_id == conn) {
                    self.count(&msg);
                    self.handle(Event::Message { from: peer, msg });
                }
            }
            OverlayInput::Closed {
                peer,
                conn,
                graceful,
            } => {
                if self.links.get(&peer).is_some_and(|l| l.conn_id == conn) {
                    self.links.remove(&peer);
                    self.handle(Event::ConnectionDown { peer, graceful });
                }
            }
        }
    }

    /// A link is up: kept (one per peer), its reader and writer started, the overlay told.
    /// `first` goes out on the link before the overlay hears of it: a message for a short-lived
    /// link, which the overlay may close at once as a stray it has no room for.
    fn linked(&mut self, link: PeerLink, first: Option<OverlayMessage>) {
        let peer = link.peer;
        if peer == self.me {
            link.conn
                .close(VarInt::from_u32(close::PROTOCOL), b"that is me");
            return;
        }
        if let Some(existing) = self.links.get(&peer) {
            // Links dialed both ways at once: both ends keep the one dialed by the smaller id.
            // A second link dialed the same way replaces the first: the dialer has given up on
            // it (a peer restarted with its key dials in while the link to its old process
            // still waits for the idle timeout), and the new one has just proved that key.
            let restarted = existing.inbound == link.inbound;
            let keep_new = restarted || (self.me < peer) != link.inbound;
            if !keep_new {
                link.conn
                    .close(VarInt::from_u32(close::DUPLICATE), b"duplicate");
                if let Some(msg) = first {
                    let _ = existing.outbox.try_send(&Frame::Overlay(msg));
                }
                let addr = existing.conn.remote_address();
                self.handle(Event::ConnectionUp { peer, addr });
                return;
            }
            if let Some(old) = self.links.remove(&peer) {
                old.conn
                    .close(VarInt::from_u32(close::DUPLICATE), b"duplicate");
            }
            if restarted {
                // Whatever the old link stood for is gone with it: the peer's new process asks
                // afresh (its join would be ignored from a peer still counted as a neighbour).
                self.handle(Event::ConnectionDown {
                    peer,
                    graceful: true,
                });
            }
        }
        let Some(inputs) = self.inputs_tx.upgrade() else {
            return;
        };
        let conn_id = self.next_conn;
        self.next_conn += 1;
        let (outbox, queue) = Outbox::new(LINK_FRAMES, LINK_BYTES);
        let span = tracing::debug_span!("overlay-link", %peer, conn = conn_id);
        self.tasks
            .spawn(write_loop(link.conn.clone(), link.send, queue).instrument(span.clone()));
        self.tasks
            .spawn(read_loop(peer, conn_id, link.conn.clone(), link.recv, inputs).instrument(span));
        let addr = link.conn.remote_address();
        self.links.insert(
            peer,
            Link {
                conn_id,
                inbound: link.inbound,
                conn: link.conn,
                outbox,
                gossip_budget: Budget::new(GOSSIP_RATE, GOSSIP_BURST, Instant::now()),
            },
        );
        if let Some(msg) = first
            && let Some(link) = self.links.get(&peer)
            && link.outbox.try_send(&Frame::Overlay(msg)).is_err()
        {
            tracing::debug!(%peer, "overlay link full; message dropped");
        }
        self.handle(Event::ConnectionUp { peer, addr });
    }

    /// Runs an event through the state machine and carries out what it asks.
    fn handle(&mut self, event: Event) {
        let mut commands = std::mem::take(&mut self.commands);
        self.overlay.handle(event, Instant::now(), &mut commands);
        for command in commands.drain(..) {
            self.execute(command);
        }
        self.commands = commands;
    }

    fn execute(&mut self, command: Command) {
        match command {
            Command::Connect(info) => {
                let Some(inputs) = self.inputs_tx.upgrade() else {
                    return;
                };
                if self.links.contains_key(&info.id) {
                    // Told on the next turn (a `Dialed` without a link finds it), not from
                    // inside this one.
                    let peer = info.id;
                    self.tasks.spawn(async move {
                        let _ = inputs.send(OverlayInput::Dialed { peer, link: None }).await;
                    });
                    return;
                }
                if !self.pending_dials.insert(info.id) {
                    return;
                }
                let dialing = self.dialing.clone();
                self.tasks.spawn(async move {
                    let link = dialing.dial(info, crate::reach::Vouch::Chosen).await;
                    let _ = inputs
                        .send(OverlayInput::Dialed {
                            peer: info.id,
                            link,
                        })
                        .await;
                });
            }
            Command::Send { to, msg } => {
                if let Some(link) = self.links.get(&to)
                    && link.outbox.try_send(&Frame::Overlay(msg)).is_err()
                {
                    tracing::debug!(peer = %to, "overlay link full; message dropped");
                }
            }
            Command::SendOnce { to, msg } => {
                // On a link that is open already (the one a shuffle came in on, say), or on a
                // new one the driver holds like any other: the answer to what it carries may
                // come back on it, and the overlay closes it as a stray soon after.
                if let Some(link) = self.links.get(&to.id) {
                    if link.outbox.try_send(&Frame::Overlay(msg)).is_err() {
                        tracing::debug!(peer = %to.id, "overlay link full; message dropped");
                    }
                    return;
                }
                let Some(inputs) = self.inputs_tx.upgrade() else {
                    return;
                };
                let dialing = self.dialing.clone();
                self.tasks.spawn(async move {
                    if let Some(link) = dialing.dial(to, crate::reach::Vouch::Claimed).await {
                        let _ = inputs.send(OverlayInput::SentOnce { link, msg }).await;
                    }
                });
            }
            Command::Disconnect(peer) => {
                if let Some(link) = self.links.remove(&peer) {
                    // The writer sends what is queued, finishes and closes.
                    link.outbox.finish();
                }
            }
            Command::NeighborUp(peer) => self.step_broadcast(BroadcastEvent::NeighborUp(peer)),
            Command::NeighborDown(peer) => {
                self.step_broadcast(BroadcastEvent::NeighborDown(peer));
            }
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        self.handle(Event::Timer);
        self.step_broadcast(BroadcastEvent::Timer);
        self.book.expire(super::wall_clock_ms());
        if self.overlay.active_len() == 0 && now >= self.next_contact_retry {
            self.next_contact_retry = now + CONTACT_RETRY;
            for addr in self.contact_addrs.clone() {
                self.dial_contact(addr);
            }
        }
    }

    /// A bootstrap or discovered address: a contact at once when its peer is known, else
    /// dialed to learn who is there (and again while this peer has no neighbour).
    fn contact_addr(&mut self, addr: SocketAddr, peer: Option<PeerId>) {
        if let Some(peer) = peer {
            if peer != self.me {
                let info = PeerInfo::new(peer, addr, super::wall_clock_ms());
                self.handle(Event::Contact(info));
            }
            return;
        }
        if !self.contact_addrs.contains(&addr) {
            if self.contact_addrs.len() == MAX_CONTACT_ADDRS {
                self.contact_addrs.remove(0);
            }
            self.contact_addrs.push(addr);
        }
        self.dial_contact(addr);
    }

    fn dial_contact(&mut self, addr: SocketAddr) {
        if self.links.values().any(|l| l.conn.remote_address() == addr)
            || !self.contact_dials.insert(addr)
        {
            return;
        }
        let Some(inputs) = self.inputs_tx.upgrade() else {
            return;
        };
        let dialing = self.dialing.clone();
        self.tasks.spawn(async move {
            // The operator's bootstrap addresses, names they resolved to, and mDNS answers.
            let link = dialing
                .link(addr, None, crate::reach::Vouch::Bootstrap)
                .await
                .map_err(|err| tracing::debug!(%addr, %err, "contact dial failed"))
                .ok();
            let _ = inputs
                .send(OverlayInput::ContactDialed { addr, link })
                .await;
        });
    }

    /// Broadcasts this peer's own advert.
    fn publish(&mut self, advert: JobAdvert) {
        let now_ms = super::wall_clock_ms();
        if advert.submitter != self.me || self.book.admit(advert.clone(), now_ms).is_err() {
            return;
        }
        let payload = advert.encode();
        self.step_broadcast(BroadcastEvent::Publish {
            id: JobAdvert::id_of(&payload),
            expires: advert.expires,
            payload,
        });
    }

    /// A broadcast message from a neighbour. Adverts not seen before are checked first and
    /// count against the link's budget; copies already seen go straight in, since telling
    /// redundant links apart is how the broadcast tree forms.
    fn on_broadcast(&mut self, peer: PeerId, msg: BroadcastMessage) {
        if let BroadcastMessage::Gossip {
            id,
            expires,
            payload,
            ..
        } = &msg
            && !self.broadcast.has_seen(id)
        {
            let now = Instant::now();
            if !self
                .links
                .get_mut(&peer)
                .is_some_and(|l| l.gossip_budget.take(now))
            {
                self.refused += 1;
                tracing::debug!(%peer, "advert over the link's rate; dropped");
                return;
            }
            match JobAdvert::decode(payload) {
                Ok(advert) if JobAdvert::id_of(payload) == *id && advert.expires == *expires => {
                    match self
                        .book
                        .admit_via(advert, Some(peer), super::wall_clock_ms())
                    {
                        Ok(()) => self.relayed += 1,
                        Err(err) => {
                            // Out of time or older than what is known: an honest relay may
                            // hold such a copy (clocks, reordering); not passed on.
                            self.refused += 1;
                            tracing::debug!(%peer, %err, "advert not relayed");
                            return;
                        }
                    }
                }
                Ok(_) | Err(AdvertError::BadSignature | AdvertError::Malformed) => {
                    // Honest peers check before forwarding: this neighbour forged or mangled
                    // it.
                    self.refused += 1;
                    tracing::warn!(%peer, "neighbour forwarded a forged advert; link closed");
                    if let Some(link) = self.links.get(&peer) {
                        link.conn
                            .close(VarInt::from_u32(close::PROTOCOL), b"forged advert");
                    }
                    return;
                }
                Err(err) => {
                    self.refused += 1;
                    tracing::debug!(%peer, %err, "advert refused");
                    return;
                }
            }
        }
        self.step_broadcast(BroadcastEvent::Message { from: peer, msg });
    }

    /// Runs an event through the broadcast and carries out what it asks.
    fn step_broadcast(&mut self, event: BroadcastEvent) {
        let mut commands = std::mem::take(&mut self.broadcast_commands);
        self.broadcast
            .handle(event, Instant::now(), super::wall_clock_ms(), &mut commands);
        for command in commands.drain(..) {
            match command {
                BroadcastCommand::Send { to, msg } => {
                    if let Some(link) = self.links.get(&to)
                        && link.outbox.try_send(&Frame::Broadcast(msg)).is_err()
                    {
                        tracing::debug!(peer = %to, "overlay link full; broadcast dropped");
                    }
                }
                BroadcastCommand::Deliver { payload, .. } => {
                    // Checked on arrival; only its own adverts skip that, and those are not
                    // delivered.
                    if let Ok(advert) = JobAdvert::decode(&payload)
                        && advert.submitter != self.me
                        && self.delivered.try_send(advert).is_err()
                    {
                        tracing::debug!("node lags behind adverts; one dropped");
                    }
                }
            }
        }
        self.broadcast_commands = commands;
    }

    /// Shuffles name peers drawn from the views of a peer a random walk ended at: draws for the
    /// census (this peer itself excluded).
    fn count(&mut self, msg: &OverlayMessage) {
        let named = match msg {
            OverlayMessage::Shuffle { origin, peers, .. } => {
                self.census.sample(origin.id);
                &peers.0
            }
            OverlayMessage::ShuffleReply { peers, .. } => &peers.0,
            _ => return,
        };
        for info in named {
            if info.id != self.me {
                self.census.sample(info.id);
            }
        }
        if let Some(estimate) = self.census.estimate() {
            self.overlay.set_network_size(estimate.peers());
        }
    }

    fn current_views(&self) -> Views {
        let mut addrs: Vec<(PeerId, SocketAddr)> = self
            .overlay
            .active_infos()
            .map(|(info, _)| (info.id, info.addr))
            .chain(
                self.overlay
                    .passive_infos()
                    .map(|info| (info.id, info.addr)),
            )
            .collect();
        addrs.sort_unstable();
        Views {
            active: self.overlay.active().collect(),
            passive: self.overlay.passive().collect(),
            addrs,
            adverts_relayed: self.relayed,
            adverts_refused: self.refused,
            estimate: self.census.estimate(),
            census_samples: self.census.samples(),
        }
    }

    /// Tells the node of the views when they changed.
    fn publish_views(&mut self) {
        let views = self.current_views();
        self.views.send_if_modified(|old| {
            if *old == views {
                false
            } else {
                *old = views;
                true
            }
        });
    }
}

/// Reads a link's frames into the actor until it closes, then says how it closed.
async fn read_loop(
    peer: PeerId,
    conn_id: u64,
    conn: quinn::Connection,
    mut recv: quinn::RecvStream,
    inputs: mpsc::Sender<OverlayInput>,
) {
    loop {
        match wire::read::<Frame, _>(&mut recv).await {
            Ok(Some(Frame::Overlay(msg))) => {
                let frame = OverlayInput::Frame {
                    peer,
                    conn: conn_id,
                    msg,
                };
                if inputs.send(frame).await.is_err() {
                    return;
                }
            }
            Ok(Some(Frame::Broadcast(msg))) => {
                let frame = OverlayInput::Broadcast {
                    peer,
                    conn: conn_id,
                    msg,
                };
                if inputs.send(frame).await.is_err() {
                    return;
                }
            }
            Ok(Some(_)) => {
                tracing::warn!("peer sent a frame that has no place on an overlay link");
                conn.close(VarInt::from_u32(close::PROTOCOL), b"unexpected frame");
                break;
            }
            Ok(None) => break,
            Err(err) => {
                super::end_of_reading(err, &conn);
                break;
            }
        }
    }
    // The remote finished its stream (or the read failed): wait for the connection's end to
    // tell a peer that left from one that vanished.
    let reason = conn.closed().await;
    let graceful = matches!(
        reason,
        quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed
    );
    let _ = inputs
        .send(OverlayInput::Closed {
            peer,
            conn: conn_id,
            graceful,
        })
        .await;
}

/// This peer's info as the overlay is started with: its address, issued now (the overlay
/// counts wall time from it and signs it with the seal it is given).
pub(crate) fn info(identity: &Identity, addr: SocketAddr) -> PeerInfo {
    PeerInfo::new(identity.id(), addr, super::wall_clock_ms())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// Where a peer's overlay links are accepted: hands every overlay link the endpoint accepts to
    /// the driver and closes links of other kinds (the node's accept loop does this routing once
    /// the overlay runs in it).
    async fn accept_overlay_links(
        endpoint: quinn::Endpoint,
        net: NetConfig,
        driver: mpsc::WeakSender<OverlayInput>,
    ) {
        let mut handshakes = JoinSet::new();
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { return };
                    if handshakes.len() >= net.max_handshakes {
                        incoming.refuse();
                        continue;
                    }
                    let net = net.clone();
                    let driver = driver.clone();
                    handshakes.spawn(async move {
                        match net::accept(incoming, &net).await {
                            Ok(link) if link.kind == LinkKind::Overlay => {
                                if let Some(driver) = driver.upgrade() {
                                    let _ = driver.send(OverlayInput::Accepted(link)).await;
                                }
                            }
                            Ok(link) => link.conn.close(VarInt::from_u32(close::NORMAL), b"overlay only"),
                            Err(err) => tracing::debug!(%err, "overlay accept failed"),
                        }
                    });
                }
                Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            }
        }
    }

    struct Peer {
        info: PeerInfo,
        inputs: mpsc::Sender<OverlayInput>,
        adverts: mpsc::Receiver<JobAdvert>,
        driver: tokio::task::JoinHandle<()>,
        accept: tokio::task::JoinHandle<()>,
        endpoint: quinn::Endpoint,
    }

    impl Peer {
        async fn views(&self) -> Views {
            let (tx, rx) = oneshot::channel();
            self.inputs
                .send(OverlayInput::Views(tx))
                .await
                .expect("driver running");
            rx.await.expect("views")
        }

        /// Ends the peer without a goodbye, as a crash would: its endpoint moves to another
        /// socket first, so what it says on the way out comes from an address its peers do
        /// not know and is ignored, and its links time out at the other end.
        fn crash(self) {
            let elsewhere = std::net::UdpSocket::bind("127.0.51.250:0").expect("socket");
            self.endpoint.rebind(elsewhere).expect("rebind");
            self.driver.abort();
            self.accept.abort();
            drop(self.inputs);
        }
    }

    fn start(i: u8) -> Peer {
        let identity = Arc::new(Identity::generate().expect("identity"));
        let net = NetConfig::default();
        // A loopback address of its own: a host of its own to the overlay's per-host caps.
        let listen = SocketAddr::from(([127, 0, 51, i], 0));
        let endpoint = net::endpoint(&identity, None, listen, &net).expect("endpoint");
        let addr = endpoint.local_addr().expect("addr");
        let me = info(&identity, addr);
        let dialing = Dialing {
            endpoint: endpoint.clone(),
            identity,
            allow: None,
            net: net.clone(),
            reach: None,
        };
        let OverlayHandle {
            inputs,
            task: driver,
            adverts,
            ..
        } = spawn(me, Config::default(), u64::from(i), dialing);
        let accept = tokio::spawn(accept_overlay_links(
            endpoint.clone(),
            net,
            inputs.downgrade(),
        ));
        Peer {
            info: me,
            inputs,
            adverts,
            driver,
            accept,
            endpoint,
        }
    }

    /// Twelve real peers over QUIC on loopback, each bootstrapping from the first: they form
    /// one overlay whose active views are small, symmetric and connected, and a peer that
    /// crashes leaves every active view within the idle timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn twelve_peers_form_a_connected_overlay_and_drop_a_crashed_one() {
        const PEERS: u8 = 12;
        let peers: Vec<Peer> = (1..=PEERS).map(start).collect();
        for p in &peers[1..] {
            p.inputs
                .send(OverlayInput::ContactAddr {
                    addr: peers[0].info.addr,
                    peer: Some(peers[0].info.id),
                })
                .await
                .expect("contact");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Joins, walks and repairs settle within a few seconds on loopback.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut views = Vec::new();
        while Instant::now() < deadline {
            views.clear();
            for p in &peers {
                views.push(p.views().await);
            }
            if views.iter().all(|v| v.active.len() >= 2)
                && connected(&peers, &views)
                && symmetric(&peers, &views)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for (p, v) in peers.iter().zip(&views) {
            assert!((2..=5).contains(&v.active.len()), "{}: {v:?}", p.info.id);
            assert!(!v.active.contains(&p.info.id));
        }
        assert!(connected(&peers, &views), "{views:?}");
        // Links are symmetric once settled: a neighbour holds us as a neighbour too.
        assert!(symmetric(&peers, &views), "{views:?}");

        // The most connected peer crashes; the others notice when its links time out.
        let mut peers = peers;
        let busiest = (0..peers.len())
            .max_by_key(|&i| views[i].active.len())
            .expect("peers");
        let crashed = peers.remove(busiest);
        let gone = crashed.info.id;
        let at = Instant::now();
        crashed.crash();
        let deadline = at + Duration::from_secs(15);
        loop {
            let mut holders = 0;
            for p in &peers {
                if p.views().await.active.contains(&gone) {
                    holders += 1;
                }
            }
            if holders == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{holders} peers still hold the crashed one"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let took = at.elapsed();
        assert!(took <= Duration::from_secs(10), "took {took:?}");
        // And the rest repair: every peer keeps at least one neighbour.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for p in &peers {
            assert!(!p.views().await.active.is_empty(), "{} isolated", p.info.id);
        }
    }

    /// Whether every neighbour holds its neighbour as a neighbour too.
    fn symmetric(peers: &[Peer], views: &[Views]) -> bool {
        views.iter().enumerate().all(|(i, v)| {
            v.active.iter().all(|n| {
                peers
                    .iter()
                    .position(|p| p.info.id == *n)
                    .is_some_and(|j| views[j].active.contains(&peers[i].info.id))
            })
        })
    }

    /// Whether the active views link every peer to every other.
    fn connected(peers: &[Peer], views: &[Views]) -> bool {
        let mut seen = vec![false; peers.len()];
        let mut stack = vec![0];
        seen[0] = true;
        while let Some(i) = stack.pop() {
            for n in &views[i].active {
                if let Some(j) = peers.iter().position(|p| p.info.id == *n)
                    && !seen[j]
                {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        seen.iter().all(|s| *s)
    }

    /// A job advert of a fresh submitter, signed by `signer` (its own key when honest).
    fn advert(
        submitter: &Identity,
        signer: &Identity,
        issued: u64,
    ) -> (JobAdvert, BroadcastMessage) {
        let mut a = JobAdvert {
            submitter: submitter.id(),
            addrs: vec![SocketAddr::from(([127, 0, 51, 99], 7401))],
            job: crate::digest::Digest::of(b"job"),
            profile: crate::sandbox::PROFILE_VERSION,
            memory_bytes: 1 << 20,
            wanted: 1,
            network_size: 0,
            issued,
            expires: issued + 60_000,
            relay: None,
            signature: crate::overlay::Signature::default(),
        };
        a.sign(|bytes| signer.sign(bytes));
        let payload = a.encode();
        let msg = BroadcastMessage::Gossip {
            id: JobAdvert::id_of(&payload),
            expires: a.expires,
            round: 0,
            payload,
        };
        (a, msg)
    }

    /// A hostile neighbour: it joins properly, then floods adverts of a hundred fresh keys and
    /// finally forwards a forged one. The flood is cut to the link's budget, only checked
    /// adverts reach the node, and the forgery costs the neighbour its link.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_neighbour_that_floods_or_forges_adverts_is_cut_off() {
        use crate::overlay::Seal;
        let mut target = start(60);
        let hostile = Identity::generate().expect("identity");
        let net = NetConfig::default();
        let endpoint = net::endpoint(
            &hostile,
            None,
            SocketAddr::from(([127, 0, 51, 61], 0)),
            &net,
        )
        .expect("endpoint");
        let mut link = net::dial_for(
            &endpoint,
            &hostile,
            None,
            target.info.addr,
            Some(target.info.id),
            &net,
            LinkKind::Overlay,
        )
        .await
        .expect("overlay link");
        let mut me = info(&hostile, endpoint.local_addr().expect("addr"));
        me.signature = Seal::sign(&hostile.advert_auth(), &me);
        wire::write(
            &mut link.send,
            &Frame::Overlay(OverlayMessage::Join { info: me }),
        )
        .await
        .expect("join");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !target.views().await.active.contains(&hostile.id()) {
            assert!(Instant::now() < deadline, "the join is accepted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        const FLOOD: u64 = 100;
        let now = super::super::wall_clock_ms();
        for _ in 0..FLOOD {
            let key = Identity::generate().expect("identity");
            let (_, msg) = advert(&key, &key, now);
            wire::write(&mut link.send, &Frame::Broadcast(msg))
                .await
                .expect("gossip");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let views = loop {
            let v = target.views().await;
            if v.adverts_relayed + v.adverts_refused >= FLOOD {
                break v;
            }
            assert!(Instant::now() < deadline, "the flood is taken in: {v:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The burst, and what the rate refilled while the flood arrived.
        assert!(
            (GOSSIP_BURST as u64..=GOSSIP_BURST as u64 + 20).contains(&views.adverts_relayed),
            "{views:?}"
        );
        let mut delivered = 0;
        while let Ok(a) = target.adverts.try_recv() {
            assert!(a.verify());
            delivered += 1;
        }
        assert_eq!(delivered, views.adverts_relayed);

        // A forgery once the budget has refilled a little: the link is closed for it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let victim = Identity::generate().expect("identity");
        let (_, forged) = advert(&victim, &hostile, now);
        wire::write(&mut link.send, &Frame::Broadcast(forged))
            .await
            .expect("forged gossip");
        let closed = tokio::time::timeout(Duration::from_secs(5), link.conn.closed())
            .await
            .expect("the link is closed");
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(close::PROTOCOL)),
            "{closed:?}"
        );
        assert!(
            target.adverts.try_recv().is_err(),
            "the forgery is not delivered"
        );
    }
}
