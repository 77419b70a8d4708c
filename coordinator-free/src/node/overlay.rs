//! The overlay's driver: one actor that owns an [`Overlay`] and does its IO over QUIC.
//!
//! It carries out the state machine's commands — dialing overlay links (ALPN `cf-overlay/1`),
//! sending frames on them, short-lived links for shuffle replies, closing links — and turns
//! what happens on the links into the state machine's events. One link per peer: when both
//! ends dial at once, both keep the link dialed by the smaller id, as membership links do. A
//! link's liveness is QUIC's (keep-alives under the idle timeout): a link that timed out is a
//! failed neighbour, one the remote closed is a neighbour that left.
//!
//! Not yet started by the node, which still runs full-table membership: the driver is tested
//! here on its own, with real peers on loopback.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::VarInt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::outbox::{Outbox, write_loop};
use crate::identity::{AllowList, Identity};
use crate::net::{self, LinkKind, NetConfig, PeerLink, close};
use crate::overlay::{Command, Config, Event, Overlay, OverlayMessage, PeerInfo};
use crate::peer_id::PeerId;
use crate::wire::{self, Frame};

/// Frames queued for one overlay link's writer; overlay messages are small and few.
const LINK_FRAMES: usize = 32;
const LINK_BYTES: u32 = 64 << 10;
/// Inputs queued for the actor.
const INPUTS: usize = 256;
/// Neighbour changes queued for whoever follows them; later ones are dropped when it lags.
const NEIGHBOUR_EVENTS: usize = 64;
/// Longest a short-lived link waits for its one message to be acknowledged.
const SEND_ONCE_LINGER: Duration = Duration::from_secs(5);

/// What the actor hears.
pub(crate) enum OverlayInput {
    /// An overlay link someone dialed to us.
    Accepted(PeerLink),
    /// A bootstrap peer.
    Contact(PeerInfo),
    /// The views as they are now.
    Views(oneshot::Sender<Views>),
    Dialed {
        peer: PeerId,
        link: Option<PeerLink>,
    },
    Frame {
        peer: PeerId,
        conn: u64,
        msg: OverlayMessage,
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
}

/// A neighbour joined or left the active view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NeighbourChange {
    Up(PeerId),
    Down(PeerId),
}

/// How the driver dials.
#[derive(Clone)]
pub(crate) struct Dialing {
    pub endpoint: quinn::Endpoint,
    pub identity: Arc<Identity>,
    pub allow: Option<Arc<AllowList>>,
    pub net: NetConfig,
}

impl Dialing {
    async fn dial(&self, to: PeerInfo) -> Option<PeerLink> {
        net::dial_for(
            &self.endpoint,
            &self.identity,
            self.allow.clone(),
            to.addr,
            Some(to.id),
            &self.net,
            LinkKind::Overlay,
        )
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
}

/// The actor.
pub(crate) struct OverlayDriver {
    me: PeerId,
    overlay: Overlay,
    dialing: Dialing,
    links: HashMap<PeerId, Link>,
    pending_dials: HashSet<PeerId>,
    next_conn: u64,
    /// For the actor's own tasks; weak, so the actor ends when every outside sender is gone.
    inputs_tx: mpsc::WeakSender<OverlayInput>,
    neighbours: mpsc::Sender<NeighbourChange>,
    tasks: JoinSet<()>,
    commands: Vec<Command>,
}

/// Starts the driver for the peer `me`; returns where to send it inputs and where neighbour
/// changes come out. It runs until every sender of inputs is dropped.
pub(crate) fn spawn(
    me: PeerInfo,
    config: Config,
    seed: u64,
    dialing: Dialing,
) -> (
    mpsc::Sender<OverlayInput>,
    mpsc::Receiver<NeighbourChange>,
    tokio::task::JoinHandle<()>,
) {
    let (inputs_tx, inputs_rx) = mpsc::channel(INPUTS);
    let (neighbours, neighbours_rx) = mpsc::channel(NEIGHBOUR_EVENTS);
    let seal = Box::new(dialing.identity.advert_auth());
    let driver = OverlayDriver {
        me: me.id,
        overlay: Overlay::new(config, me, seed, Instant::now()).with_seal(seal),
        dialing,
        links: HashMap::new(),
        pending_dials: HashSet::new(),
        next_conn: 0,
        inputs_tx: inputs_tx.downgrade(),
        neighbours,
        tasks: JoinSet::new(),
        commands: Vec::new(),
    };
    let span = tracing::debug_span!("overlay", peer = %me.id);
    let handle = tokio::spawn(driver.run(inputs_rx).instrument(span));
    (inputs_tx, neighbours_rx, handle)
}

impl OverlayDriver {
    async fn run(mut self, mut inputs: mpsc::Receiver<OverlayInput>) {
        loop {
            let wake = tokio::time::Instant::from_std(self.overlay.poll_timeout());
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(input) => self.on_input(input),
                    None => break,
                },
                () = tokio::time::sleep_until(wake) => self.handle(Event::Timer),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
        for (_, link) in self.links.drain() {
            link.conn
                .close(VarInt::from_u32(close::NORMAL), b"shutdown");
        }
    }

    fn on_input(&mut self, input: OverlayInput) {
        match input {
            OverlayInput::Accepted(link) => self.linked(link),
            OverlayInput::Contact(info) => self.handle(Event::Contact(info)),
            OverlayInput::Views(reply) => {
                let _ = reply.send(Views {
                    active: self.overlay.active().collect(),
                    passive: self.overlay.passive().collect(),
                });
            }
            OverlayInput::Dialed { peer, link } => {
                self.pending_dials.remove(&peer);
                match link {
                    Some(link) => self.linked(link),
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
    fn linked(&mut self, link: PeerLink) {
        let peer = link.peer;
        if peer == self.me {
            link.conn
                .close(VarInt::from_u32(close::PROTOCOL), b"that is me");
            return;
        }
        if let Some(existing) = self.links.get(&peer) {
            // Both keep the link dialed by the smaller id.
            let keep_new = if self.me < peer {
                !link.inbound
            } else {
                link.inbound
            };
            if !keep_new || existing.inbound == link.inbound {
                link.conn
                    .close(VarInt::from_u32(close::DUPLICATE), b"duplicate");
                let addr = existing.conn.remote_address();
                self.handle(Event::ConnectionUp { peer, addr });
                return;
            }
            if let Some(old) = self.links.remove(&peer) {
                old.conn
                    .close(VarInt::from_u32(close::DUPLICATE), b"duplicate");
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
            },
        );
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
                    let link = dialing.dial(info).await;
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
                let dialing = self.dialing.clone();
                self.tasks.spawn(send_once(dialing, to, msg));
            }
            Command::Disconnect(peer) => {
                if let Some(link) = self.links.remove(&peer) {
                    // The writer sends what is queued, finishes and closes.
                    link.outbox.finish();
                }
            }
            Command::NeighborUp(peer) => {
                let _ = self.neighbours.try_send(NeighbourChange::Up(peer));
            }
            Command::NeighborDown(peer) => {
                let _ = self.neighbours.try_send(NeighbourChange::Down(peer));
            }
        }
    }
}

/// Dials `to`, sends one message, waits for it to be acknowledged and closes.
async fn send_once(dialing: Dialing, to: PeerInfo, msg: OverlayMessage) {
    let Some(mut link) = dialing.dial(to).await else {
        return;
    };
    if wire::write(&mut link.send, &Frame::Overlay(msg))
        .await
        .is_ok()
    {
        let _ = link.send.finish();
        let _ = tokio::time::timeout(SEND_ONCE_LINGER, link.send.stopped()).await;
    }
    link.conn.close(VarInt::from_u32(close::NORMAL), b"sent");
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

/// Where a peer's overlay links are accepted: hands every overlay link the endpoint accepts to
/// the driver and closes links of other kinds (the node's accept loop does this routing once
/// the overlay runs in it).
pub(crate) async fn accept_overlay_links(
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

/// This peer's info as the overlay is started with: its address, issued now (the overlay
/// counts wall time from it and signs it with the seal it is given).
pub(crate) fn info(identity: &Identity, addr: SocketAddr) -> PeerInfo {
    PeerInfo::new(identity.id(), addr, super::wall_clock_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Peer {
        info: PeerInfo,
        inputs: mpsc::Sender<OverlayInput>,
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
        };
        let (inputs, _neighbours, driver) = spawn(me, Config::default(), u64::from(i), dialing);
        let accept = tokio::spawn(accept_overlay_links(
            endpoint.clone(),
            net,
            inputs.downgrade(),
        ));
        Peer {
            info: me,
            inputs,
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
                .send(OverlayInput::Contact(peers[0].info))
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
}
