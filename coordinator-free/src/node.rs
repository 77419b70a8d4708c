//! A running peer: the async driver around the membership state machine.
//!
//! One task (the actor) owns the [`Membership`] and every connection's outbox. It `select!`s
//! over requests from the [`Node`] handle and the control socket, inputs from the connection
//! tasks (new links, frames, closures, dial failures, mDNS answers) and the state machine's
//! timer, feeds them in, and carries out the commands that come out. Every other task only
//! moves bytes: one reader and one writer per connection, one task per dial or handshake, the
//! accept loop, the mDNS browser. All of them live in the actor's `JoinSet`, so stopping the
//! actor stops them, and every channel between them is bounded.

mod circuit;
mod donate;
mod mdns;
mod modules;
mod outbox;
mod overlay;
mod relay;
mod submit;
mod survey;
mod work;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quinn::VarInt;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use crate::control::{self, ControlError, ControlRequest, KnownBy, PeerStatus, StatusReport};
use crate::identity::{AllowList, Identity};
use crate::membership::{
    self, Capacity, Command, Event, LocalPeer, MAX_ADVERT_ADDRS, Membership, MembershipMessage,
};
use crate::net::{self, LinkKind, NetConfig, NetError, PeerLink, close};
use crate::peer_id::{ParsePeerIdError, PeerId};
use crate::sandbox::SandboxError;
use crate::wire::{self, Frame, WireError};
use outbox::{Outbox, OutboxError, write_loop};

pub use donate::Donation;
pub use submit::{JobDialer, NET_LEASE_MARGIN, NetWorkers, net_schedule_config};
pub use work::{SuspendSwitch, WorkConfig, WorkRunner};

/// Inputs queued for the actor from all connection tasks together.
const INPUT_QUEUE: usize = 1024;
/// Frames queued for one connection's writer. When full, gossip to that peer is dropped
/// (the next round repeats it) rather than blocking the actor on a slow peer.
const OUTBOX: usize = 64;
/// Bytes queued for one connection's writer: a few full-size membership messages.
const OUTBOX_BYTES: u32 = 2 << 20;
/// How long a status request waits for the work task's part.
const STATUS_WAIT: Duration = Duration::from_secs(1);
/// How long shutdown waits for goodbyes to be delivered.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A bootstrap address, optionally pinned to the peer id expected there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootstrap {
    pub addr: SocketAddr,
    pub peer: Option<PeerId>,
}

/// Why a bootstrap argument is not `ADDR` or `ID@ADDR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    #[error("{text:?} is not IP:PORT or HOST:PORT (either may start with ID@)")]
    Addr { text: String },
    #[error("bad peer id before '@'")]
    Peer(#[from] ParsePeerIdError),
}

impl FromStr for Bootstrap {
    type Err = BootstrapError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (peer, addr) = match s.split_once('@') {
            Some((id, addr)) => (Some(id.trim().parse()?), addr),
            None => (None, s),
        };
        let addr = addr.trim().parse().map_err(|_| BootstrapError::Addr {
            text: addr.to_owned(),
        })?;
        Ok(Self { addr, peer })
    }
}

impl fmt::Display for Bootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.peer {
            Some(peer) => write!(f, "{peer}@{}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// A bootstrap peer named by its host name, resolved when the node starts and again before
/// each retry while the node is isolated (and every few minutes otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedBootstrap {
    pub host: String,
    pub port: u16,
    pub peer: Option<PeerId>,
}

impl fmt::Display for NamedBootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(peer) = self.peer {
            write!(f, "{peer}@")?;
        }
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A `--bootstrap` argument: `[ID@]IP:PORT` or `[ID@]HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapArg {
    Addr(Bootstrap),
    Name(NamedBootstrap),
}

/// Longest host name DNS allows.
const MAX_HOST_NAME: usize = 253;

/// Whether `host` is a host name as DNS spells them: dot-separated labels of ASCII letters,
/// digits and hyphens, at most 63 bytes each, not starting or ending with a hyphen, the last
/// not all digits (which would be a mistyped IP address).
pub fn is_host_name(host: &str) -> bool {
    let trimmed = host.trim_end_matches('.');
    !host.is_empty()
        && host.len() <= MAX_HOST_NAME
        && !trimmed
            .rsplit('.')
            .next()
            .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
        && trimmed.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `HOST:PORT` with a host name (not an IP address) and a port number.
pub fn host_and_port(text: &str) -> Option<(&str, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (is_host_name(host) && host.parse::<IpAddr>().is_err()).then_some((host, port))
}

impl FromStr for BootstrapArg {
    type Err = BootstrapError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(b) = s.parse::<Bootstrap>() {
            return Ok(Self::Addr(b));
        }
        let (peer, target) = match s.split_once('@') {
            Some((id, target)) => (Some(id.trim().parse()?), target.trim()),
            None => (None, s.trim()),
        };
        let (host, port) = host_and_port(target).ok_or_else(|| BootstrapError::Addr {
            text: target.to_owned(),
        })?;
        Ok(Self::Name(NamedBootstrap {
            host: host.to_ascii_lowercase(),
            port,
            peer,
        }))
    }
}

impl fmt::Display for BootstrapArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(b) => b.fmt(f),
            Self::Name(n) => n.fmt(f),
        }
    }
}

/// Most addresses one bootstrap name contributes.
const MAX_ADDRS_PER_NAME: usize = 8;
/// How long one name's lookup may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often bootstrap names are looked up again while the node has peers.
const RESOLVE_CONNECTED: Duration = Duration::from_secs(300);
/// How long a node goes without any connection before it says so.
const ISOLATED_AFTER: Duration = Duration::from_secs(10);

/// How a node finds other peers and the work they offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Discovery {
    /// Every peer holds every other peer's signed advert (capacity and job), gossiped in full:
    /// a lab-sized network, where each peer sees all the others at once. Its cost per peer
    /// grows with the network, and it stops at `max_peers`.
    Table,
    /// A partial-view overlay (a few neighbours, a few dozen addresses), whatever the network's
    /// size; jobs are found through adverts broadcast over it, and idle workers pull.
    #[default]
    Overlay,
}

impl FromStr for Discovery {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" => Ok(Self::Table),
            "overlay" => Ok(Self::Overlay),
            _ => Err(format!("{s:?} is neither \"table\" nor \"overlay\"")),
        }
    }
}

/// The job a submitter offers, as its advert states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobNotice {
    pub job: crate::digest::Digest,
    /// Memory one unit may use.
    pub memory_bytes: u64,
    /// How many more workers the submitter would link to.
    pub wanted: u32,
}

/// How long a job advert broadcast over the overlay lives, and how often it is issued again
/// while the job runs.
const ADVERT_LIFETIME: Duration = Duration::from_secs(60);
const ADVERT_REISSUE: Duration = Duration::from_secs(20);

/// Everything a node needs besides its identity.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub bootstrap: Vec<Bootstrap>,
    /// Bootstrap peers named by host name.
    pub bootstrap_names: Vec<NamedBootstrap>,
    pub capacity: Capacity,
    /// Announce and browse on the LAN with mDNS.
    pub mdns: bool,
    /// Lab mode: only these peers may connect or be dialed.
    pub allow: Option<AllowList>,
    /// Where to serve the control socket, if anywhere.
    pub control_socket: Option<PathBuf>,
    pub membership: membership::Config,
    pub net: NetConfig,
    /// Run other peers' units here; `None` for a peer that only submits or only gossips.
    pub work: Option<WorkConfig>,
    /// The addresses to advertise instead of the ones found from `listen`; an empty list says
    /// this peer cannot be dialed (it then reaches others, and submitters, by dialing out).
    pub advertise: Option<Vec<SocketAddr>>,
    /// Full tables or the overlay.
    pub discovery: Discovery,
    /// Offer to introduce peers behind NAT to each other (`crate::relay`), within these limits.
    pub offer_relay: Option<crate::relay::Limits>,
    /// Hold a reservation on this relay: this peer is behind NAT, reached through introductions
    /// there, and advertises the address the relay sees it at.
    pub via_relay: Option<Bootstrap>,
}

impl NodeConfig {
    /// Adds a `--bootstrap` argument, an address or a host name.
    pub fn add_bootstrap(&mut self, arg: BootstrapArg) {
        match arg {
            BootstrapArg::Addr(b) => self.bootstrap.push(b),
            BootstrapArg::Name(n) => self.bootstrap_names.push(n),
        }
    }

    /// Defaults: listen on `listen`, mDNS on, no control socket, the whole machine's cores.
    pub fn new(listen: SocketAddr) -> Self {
        let cores = std::thread::available_parallelism()
            .map_or(1, |n| u16::try_from(n.get()).unwrap_or(u16::MAX));
        Self {
            listen,
            bootstrap: Vec::new(),
            bootstrap_names: Vec::new(),
            capacity: Capacity {
                cores_donated: cores,
                cores_free: cores,
                memory_mb: 512 * u32::from(cores),
                profile: crate::sandbox::PROFILE_VERSION,
            },
            mdns: true,
            allow: None,
            control_socket: None,
            membership: membership::Config::default(),
            net: NetConfig::default(),
            work: None,
            advertise: None,
            discovery: Discovery::default(),
            offer_relay: None,
            via_relay: None,
        }
    }
}

/// Why a node could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot read the endpoint's local address")]
    LocalAddr(#[source] std::io::Error),
    #[error("the node has stopped")]
    Stopped,
    #[error("cannot start the unit threads")]
    Work(#[from] SandboxError),
}

/// Handle to a running node. Dropping it stops the node at once, without goodbyes, as a crash
/// would; [`Node::shutdown`] closes connections first.
#[derive(Debug)]
pub struct Node {
    id: PeerId,
    local_addr: SocketAddr,
    dialer: JobDialer,
    requests: mpsc::Sender<Request>,
    /// The work task, when this peer runs other peers' units.
    work: Option<mpsc::Sender<work::WorkInput>>,
    suspend: Option<SuspendSwitch>,
    task: Option<JoinHandle<()>>,
}

#[derive(Debug)]
enum Request {
    Control(ControlRequest),
    /// Advertise the job this peer submits now (`None`: none).
    Announce(Option<JobNotice>),
    /// Advertise this capacity from now on.
    Donate(Capacity),
    Shutdown(oneshot::Sender<()>),
    /// Leave the overlay, its links flushed: the first step of a shutdown.
    Leave(oneshot::Sender<()>),
}

impl Node {
    /// Binds the endpoint, starts the actor and returns once the node is listening.
    pub async fn start(identity: Identity, config: NodeConfig) -> Result<Self, NodeError> {
        let id = identity.id();
        let identity = Arc::new(identity);
        let allow = config.allow.map(Arc::new);
        // The control socket first: a second peer on the same data directory is then refused
        // with that reason, not with whatever binding the same port would say.
        let control = match &config.control_socket {
            Some(path) => Some((control::bind(path).await?, path.clone())),
            None => None,
        };
        let endpoint =
            match net::endpoint_and_puncher(&identity, allow.clone(), config.listen, &config.net) {
                Ok(endpoint) => endpoint,
                Err(err) => {
                    if let Some((_, path)) = &control {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(err.into());
                }
            };
        let (endpoint, puncher) = endpoint;
        let local_addr = endpoint.local_addr().map_err(NodeError::LocalAddr)?;
        let reservation = match config.via_relay {
            Some(relay) => Some(
                relay::first_reservation(&endpoint, &identity, allow.clone(), &config.net, relay)
                    .await,
            ),
            None => None,
        };
        let observed = reservation
            .as_ref()
            .and_then(|r| r.as_ref().ok().map(|(_, observed)| *observed));
        let addrs = config.advertise.clone().unwrap_or_else(|| match observed {
            // Behind NAT: the host the relay sees this peer on, with port 0, which no peer
            // dials. A packet from a peer this one has not punched towards would make its NAT
            // remember an unanswered flow from that peer and later map this peer's own punch
            // to another port; peers reach it only through an introduction (whose answer
            // carries the real port), and the overlay still sees on which host it is.
            Some(observed) => vec![SocketAddr::new(observed.ip(), 0)],
            None => advertised_addrs(local_addr),
        });

        let now = Instant::now();
        let bootstrap_retry = config.membership.bootstrap_retry;
        let mut membership = Membership::new(
            config.membership,
            LocalPeer {
                id,
                addrs: addrs.clone(),
                capacity: config.capacity,
                initial_seq: wall_clock_ms(),
            },
            identity.advert_auth(),
            random_seed(),
            now,
        );
        if config.discovery == Discovery::Table {
            for b in &config.bootstrap {
                membership.handle(
                    Event::Discovered {
                        addr: b.addr,
                        peer: b.peer,
                    },
                    now,
                );
            }
        }

        let (inputs_tx, inputs_rx) = mpsc::channel(INPUT_QUEUE);
        let (requests_tx, requests_rx) = mpsc::channel(16);
        let mut tasks = JoinSet::new();
        let pulls = submit::PullInbox::default();
        let bulk = Bulk {
            server: net::bulk_server_config(&identity, allow.clone(), &config.net)?,
            serving: pulls.clone(),
        };
        tasks.spawn(
            accept_loop(
                endpoint.clone(),
                config.net.clone(),
                inputs_tx.clone(),
                bulk,
            )
            .instrument(tracing::debug_span!("accept")),
        );

        let mut control_path = None;
        if let Some((listener, path)) = control {
            let (control_tx, mut control_rx) = mpsc::channel(16);
            tasks.spawn(control::serve(listener, control_tx));
            // Forward control requests into the actor's one request queue.
            let forward = requests_tx.clone();
            tasks.spawn(async move {
                while let Some(req) = control_rx.recv().await {
                    if forward.send(Request::Control(req)).await.is_err() {
                        return;
                    }
                }
            });
            control_path = Some(path);
        }

        let mdns = if config.mdns {
            match mdns::start(id, local_addr.port(), &addrs, inputs_tx.clone(), &mut tasks) {
                Ok(daemon) => Some(daemon),
                Err(err) => {
                    tracing::warn!(%err, "mDNS discovery unavailable; relying on bootstrap addresses");
                    None
                }
            }
        } else {
            None
        };

        let (isolated, isolated_rx) = tokio::sync::watch::channel(true);
        tasks.spawn(isolation_log(
            isolated_rx.clone(),
            where_to_look(&config.bootstrap, &config.bootstrap_names, mdns.is_some()),
        ));
        tasks.spawn(traffic_snapshots(config.net.traffic.clone()));
        if !config.bootstrap_names.is_empty() {
            tasks.spawn(
                resolve_loop(
                    config.bootstrap_names.clone(),
                    inputs_tx.clone(),
                    isolated_rx,
                    bootstrap_retry,
                )
                .instrument(tracing::debug_span!("resolve")),
            );
        }

        let dialer = JobDialer {
            pulls: pulls.clone(),
            me: id,
            endpoint: endpoint.clone(),
            identity: Arc::clone(&identity),
            allow: allow.clone(),
            net: config.net.clone(),
            requests: requests_tx.clone(),
            local_addr,
            reach: Arc::new(std::sync::Mutex::new(crate::reach::Reach::new(
                Instant::now(),
            ))),
        };
        // The work side says whether it is suspended; the actor advertises no free cores
        // meanwhile.
        let (suspended_tx, suspended_rx) = tokio::sync::watch::channel(false);
        let work = match config.work {
            Some(work) => Some(work::spawn(work, dialer.clone(), suspended_tx, &mut tasks)?),
            None => None,
        };
        let work_handle = work.clone();
        let suspend = work.clone().map(SuspendSwitch::new);
        let overlay = match config.discovery {
            Discovery::Table => None,
            Discovery::Overlay => {
                let me = overlay::info(
                    &identity,
                    overlay_addr(&addrs, &config.bootstrap).unwrap_or(local_addr),
                );
                let handle = overlay::spawn(
                    me,
                    // Lab mode: identities are vetted, the caps against Sybils go.
                    if allow.is_some() {
                        crate::overlay::Config::lab()
                    } else {
                        crate::overlay::Config::default()
                    },
                    random_seed(),
                    overlay::Dialing {
                        endpoint: endpoint.clone(),
                        identity: Arc::clone(&identity),
                        allow: allow.clone(),
                        net: config.net.clone(),
                        reach: Some(Arc::clone(&dialer.reach)),
                    },
                );
                for b in &config.bootstrap {
                    let _ = handle.inputs.try_send(overlay::OverlayInput::ContactAddr {
                        addr: b.addr,
                        peer: b.peer,
                    });
                }
                Some(OverlayPart {
                    handle,
                    heard: crate::job_advert::AdvertBook::default(),
                    announced: None,
                    last_issued: 0,
                    next_publish: None,
                })
            }
        };
        let reservation = match (reservation, config.via_relay) {
            (Some(first), Some(relay)) => {
                let first = first
                    .map_err(|err| {
                        tracing::warn!(
                            relay = %relay.addr, err = %error_chain(&err),
                            "no reservation on the relay yet: peers behind other NATs cannot reach this one until there is"
                        );
                    })
                    .ok();
                let (held, seen) = tokio::sync::watch::channel(None);
                tasks.spawn(
                    relay::keep_reservation(
                        first,
                        relay,
                        dialer.clone(),
                        puncher.clone(),
                        inputs_tx.clone(),
                        held,
                    )
                    .instrument(tracing::info_span!("reservation", relay = %relay.addr)),
                );
                Some((relay.addr, seen))
            }
            _ => None,
        };
        let relay_service = config
            .offer_relay
            .map(|limits| relay::RelayService::spawn(limits, &mut tasks));
        let actor = Actor {
            reservation,
            relay_service,
            overlay,
            survey_budget: crate::budget::Budget::new(
                survey::ANSWER_RATE,
                survey::ANSWER_BURST,
                Instant::now(),
            ),
            dialer: dialer.clone(),
            bootstrap: config.bootstrap.iter().map(|b| b.addr).collect(),
            resolved: vec![Vec::new(); config.bootstrap_names.len()],
            isolated,
            dialer_pulls: pulls,
            suspended: work.is_some().then_some(suspended_rx),
            work,
            capacity: config.capacity,
            advertised_suspended: false,
            me: id,
            membership,
            allow,
            endpoint,
            local_addr,
            conns: HashMap::new(),
            next_conn: 0,
            inputs_tx,
            tasks,
            mdns,
            control_path,
        };
        let task = tokio::spawn(
            actor
                .run(requests_rx, inputs_rx)
                .instrument(tracing::info_span!("node", peer = %id)),
        );
        tracing::info!(peer = %id, %local_addr, ?addrs, "node started");
        Ok(Self {
            id,
            local_addr,
            dialer,
            requests: requests_tx,
            work: work_handle,
            suspend,
            task: Some(task),
        })
    }

    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The socket the QUIC endpoint is bound to (with the real port if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What a submitter on this node needs to open job links to workers.
    pub fn job_dialer(&self) -> JobDialer {
        self.dialer.clone()
    }

    pub async fn status(&self) -> Result<StatusReport, NodeError> {
        self.dialer.status().await
    }

    /// The status with every peer a survey of the overlay finds.
    pub async fn status_all(&self) -> Result<StatusReport, NodeError> {
        self.control().status_all().await
    }

    /// A handle that asks this node for its status and steers the user's pause from inside the
    /// process, as the control socket does from outside (the web page uses it).
    pub fn control(&self) -> NodeControl {
        NodeControl {
            requests: self.requests.clone(),
        }
    }

    /// The switch that suspends and resumes this peer's donated work for a reason, for the
    /// parts that watch the machine (idle, battery, time windows, load, heat); `None` when the
    /// peer runs no units.
    pub fn suspend_switch(&self) -> Option<SuspendSwitch> {
        self.suspend.clone()
    }

    /// Leaves the overlay: what its links hold is delivered (the withdrawal of a job that
    /// ended) and each says goodbye. Then [`Node::shutdown`] has only QUIC's drain to wait for.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(Request::Leave(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Closes every connection with a goodbye and stops all tasks.
    pub async fn shutdown(mut self) {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(Request::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Asks a running node for its status and changes the user's pause; cheap to clone. Requests
/// after the node stopped fail with [`NodeError::Stopped`].
#[derive(Debug, Clone)]
pub struct NodeControl {
    requests: mpsc::Sender<Request>,
}

impl NodeControl {
    /// A handle whose node has stopped: every request fails.
    #[cfg(test)]
    pub(crate) fn stopped() -> Self {
        let (requests, _) = mpsc::channel(1);
        NodeControl { requests }
    }

    pub async fn status(&self) -> Result<StatusReport, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Control(ControlRequest::Status(tx)))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// The status with every peer a survey of the overlay finds (`worker status --all`); on
    /// full tables, the table.
    pub async fn status_all(&self) -> Result<StatusReport, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Control(ControlRequest::Survey(tx)))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Pauses (for a while, or until resumed) or resumes; answers with the status after the
    /// change, or why it could not be made.
    pub async fn pause(&self, change: control::PauseChange) -> Result<StatusReport, String> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Control(ControlRequest::Pause { change, reply }))
            .await
            .map_err(|_| "the peer is shutting down".to_owned())?;
        rx.await
            .unwrap_or_else(|_| Err("the peer is shutting down".into()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What the connection tasks tell the actor.
#[derive(Debug)]
enum Input {
    Established(PeerLink),
    DialFailed {
        addr: SocketAddr,
    },
    Message {
        peer: PeerId,
        msg: MembershipMessage,
    },
    Closed {
        conn: u64,
        peer: PeerId,
    },
    Discovered {
        addr: SocketAddr,
        peer: Option<PeerId>,
    },
    /// The addresses bootstrap name `index` resolved to just now.
    Resolved {
        index: usize,
        addrs: Vec<SocketAddr>,
        peer: Option<PeerId>,
    },
}

/// The actor's side of one open connection. Dropping it makes the writer flush and close.
#[derive(Debug)]
struct Conn {
    id: u64,
    inbound: bool,
    conn: quinn::Connection,
    outbox: Outbox,
}

/// The overlay's part of the actor, when the node runs one.
struct OverlayPart {
    handle: overlay::OverlayHandle,
    /// The newest advert of each submitter heard, for status.
    heard: crate::job_advert::AdvertBook,
    /// The job this peer submits, while it does.
    announced: Option<JobNotice>,
    /// When this peer's last advert was issued: each is issued later than the one before, so
    /// a withdrawal right after an offer still supersedes it.
    last_issued: u64,
    /// When its advert is issued again.
    next_publish: Option<Instant>,
}

impl Drop for OverlayPart {
    fn drop(&mut self) {
        // A node dropped without shutdown stops like a crashed one: no goodbyes.
        self.handle.task.abort();
    }
}

/// What the overlay driver delivered to the node.
enum FromOverlay {
    Advert(Box<crate::job_advert::JobAdvert>),
    /// Its views changed.
    Views,
}

/// The next advert, or change of views, from the overlay; never, without one. `None` once its
/// driver has stopped.
async fn next_from_overlay(overlay: &mut Option<OverlayPart>) -> Option<FromOverlay> {
    match overlay {
        Some(part) => tokio::select! {
            advert = part.handle.adverts.recv() => advert.map(|a| FromOverlay::Advert(Box::new(a))),
            changed = part.handle.views.changed() => changed.ok().map(|()| FromOverlay::Views),
        },
        None => std::future::pending().await,
    }
}

/// While a reservation holds: the relay's id, and where it sees this peer.
type Reservation = tokio::sync::watch::Receiver<Option<(PeerId, SocketAddr)>>;

struct Actor {
    /// The relay this peer keeps a reservation on (it is behind NAT), and while it holds, the
    /// relay's id and where it sees this peer: named in its job adverts, shown by status.
    reservation: Option<(SocketAddr, Reservation)>,
    /// The relay service this peer offers, if it does.
    relay_service: Option<relay::RelayService>,
    /// The partial-view overlay, when the node finds peers through one instead of full tables.
    overlay: Option<OverlayPart>,
    /// Survey answers this peer may still give.
    survey_budget: crate::budget::Budget,
    /// Dials through the node's [`crate::reach::Reach`] book, like every other dial here.
    dialer: JobDialer,
    /// The operator's bootstrap addresses: dialed without being confirmed first.
    bootstrap: std::collections::HashSet<SocketAddr>,
    /// What each bootstrap name resolved to last: dialed like the operator's addresses.
    resolved: Vec<Vec<SocketAddr>>,
    /// Tells the resolver whether the node has no connection, so it looks names up again
    /// before each retry.
    isolated: tokio::sync::watch::Sender<bool>,
    /// Where pull links go: the job loop running on this peer, if any.
    dialer_pulls: submit::PullInbox,
    /// The work task, when this peer runs other peers' units.
    work: Option<mpsc::Sender<work::WorkInput>>,
    /// Whether the work task is suspended: the advert then says no core is free. `None` when
    /// there is no work task (or it ended).
    suspended: Option<tokio::sync::watch::Receiver<bool>>,
    /// The capacity this peer was started with, advertised while its work is not suspended.
    capacity: Capacity,
    /// Whether the advert says the work is suspended (no core free).
    advertised_suspended: bool,
    me: PeerId,
    membership: Membership<crate::identity::KeyAuth>,
    allow: Option<Arc<AllowList>>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    conns: HashMap<PeerId, Conn>,
    next_conn: u64,
    inputs_tx: mpsc::Sender<Input>,
    tasks: JoinSet<()>,
    mdns: Option<mdns_sd::ServiceDaemon>,
    control_path: Option<PathBuf>,
}

impl Actor {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut inputs: mpsc::Receiver<Input>,
    ) {
        self.flush();
        loop {
            let mut wake = self
                .membership
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
            if let Some(at) = self.overlay.as_ref().and_then(|o| o.next_publish) {
                wake = wake.min(at);
            }
            let wake = tokio::time::Instant::from_std(wake);
            tokio::select! {
                request = requests.recv() => match request {
                    Some(Request::Control(ControlRequest::Status(reply))) => {
                        // A change the work task made just now shows in this report already.
                        self.follow_suspension();
                        let mut report = self.status();
                        match &self.work {
                            // The work task answers on its own time; the actor does not wait.
                            Some(work) => {
                                let (tx, rx) = oneshot::channel();
                                if work.try_send(work::WorkInput::Status(tx)).is_ok() {
                                    self.tasks.spawn(async move {
                                        report.work = tokio::time::timeout(STATUS_WAIT, rx)
                                            .await
                                            .ok()
                                            .and_then(Result::ok);
                                        let _ = reply.send(report);
                                    });
                                } else {
                                    let _ = reply.send(report);
                                }
                            }
                            None => {
                                let _ = reply.send(report);
                            }
                        }
                    }
                    Some(Request::Control(ControlRequest::Survey(reply))) => self.survey(reply),
                    Some(Request::Control(ControlRequest::Pause { change, reply })) => {
                        self.pause(change, reply);
                    }
                    Some(Request::Announce(notice)) => self.announce(notice),
                    Some(Request::Donate(capacity)) => self.donate(capacity),
                    Some(Request::Leave(done)) => {
                        self.leave_overlay().await;
                        let _ = done.send(());
                    }
                    Some(Request::Shutdown(done)) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                Some(input) = inputs.recv() => self.on_input(input),
                changed = suspension_changed(&mut self.suspended) => match changed {
                    Ok(()) => self.follow_suspension(),
                    // The work task ended: nothing will change any more.
                    Err(_) => self.suspended = None,
                },
                () = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    self.membership.handle_timeout(now);
                    if self
                        .overlay
                        .as_ref()
                        .and_then(|o| o.next_publish)
                        .is_some_and(|at| at <= now)
                    {
                        self.publish_advert(now);
                    }
                }
                Some(heard) = next_from_overlay(&mut self.overlay) => {
                    if let FromOverlay::Advert(advert) = heard {
                        self.on_advert(*advert);
                    }
                }
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(err) = joined
                        && err.is_panic()
                    {
                        tracing::error!(%err, "a node task panicked");
                    }
                }
            }
            self.flush();
            let alone = match &self.overlay {
                Some(o) => o.handle.views.borrow().active.is_empty(),
                None => self.conns.is_empty(),
            };
            let was_alone = *self.isolated.borrow();
            self.isolated
                .send_if_modified(|was| std::mem::replace(was, alone) != alone);
            // An advert broadcast while this peer had no neighbour reached no one: the first
            // neighbour gets a fresh one at once rather than at the next reissue.
            if was_alone && !alone && self.overlay.as_ref().is_some_and(|o| o.announced.is_some()) {
                self.publish_advert(Instant::now());
            }
        }
    }

    /// Re-signs the advert when the work task's suspension changed: no core is free while it
    /// is suspended, so submitters look elsewhere.
    fn follow_suspension(&mut self) {
        let Some(rx) = &mut self.suspended else {
            return;
        };
        let suspended = *rx.borrow_and_update();
        if suspended == self.advertised_suspended {
            return;
        }
        self.advertised_suspended = suspended;
        let capacity = Capacity {
            cores_free: if suspended {
                0
            } else {
                self.capacity.cores_free
            },
            ..self.capacity
        };
        tracing::debug!(
            suspended,
            cores_free = capacity.cores_free,
            "advert follows the work side"
        );
        self.membership
            .handle(Event::CapacityChanged(capacity), Instant::now());
    }

    /// Hands a pause or resume to the work task, and answers with the status after it.
    fn pause(
        &mut self,
        change: control::PauseChange,
        reply: oneshot::Sender<Result<StatusReport, String>>,
    ) {
        let Some(work) = &self.work else {
            let _ = reply.send(Err(
                "this peer donates no cores: there is no work to pause".into()
            ));
            return;
        };
        let (tx, rx) = oneshot::channel();
        if work
            .try_send(work::WorkInput::Pause { change, reply: tx })
            .is_err()
        {
            let _ = reply.send(Err("the peer is busy; try again".into()));
            return;
        }
        let dialer = self.dialer.clone();
        self.tasks.spawn(async move {
            let answer = match tokio::time::timeout(STATUS_WAIT, rx).await {
                Ok(Ok(Ok(()))) => dialer
                    .status()
                    .await
                    .map_err(|_| "the peer is shutting down".to_owned()),
                Ok(Ok(Err(err))) => Err(err),
                Ok(Err(_)) => Err("the peer is shutting down".into()),
                Err(_) => Err("the peer did not answer in time".into()),
            };
            let _ = reply.send(answer);
        });
    }

    fn on_input(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Established(link) => self.on_established(link, now),
            Input::DialFailed { addr } => self.membership.handle(Event::DialFailed { addr }, now),
            Input::Message { peer, msg } => {
                self.membership
                    .handle(Event::Message { from: peer, msg }, now);
            }
            Input::Closed { conn, peer } => {
                if self.conns.get(&peer).is_some_and(|c| c.id == conn) {
                    self.conns.remove(&peer);
                    self.membership.handle(Event::Disconnected { peer }, now);
                }
            }
            Input::Discovered { addr, peer } => self.discovered(addr, peer, now),
            Input::Resolved { index, addrs, peer } => {
                if let Some(slot) = self.resolved.get_mut(index) {
                    slot.clone_from(&addrs);
                    for addr in addrs {
                        self.discovered(addr, peer, now);
                    }
                }
            }
        }
    }

    /// Installs a new link, keeping at most one connection per peer. When both peers dialed
    /// each other at once, both keep the connection dialed by the smaller id, so they agree
    /// without a round trip.
    fn on_established(&mut self, link: PeerLink, now: Instant) {
        // Whoever proved its id on a connection is confirmed at its end of it.
        self.dialer.confirm(&link);
        if link.kind == LinkKind::Pull {
            // A worker asking for work: the job loop running here, if any, adopts the link.
            self.dialer_pulls.offer(link);
            return;
        }
        if link.kind == LinkKind::Overlay {
            match &self.overlay {
                Some(o) => {
                    if let Err(err) = o
                        .handle
                        .inputs
                        .try_send(overlay::OverlayInput::Accepted(link))
                        && let overlay::OverlayInput::Accepted(link) = err.into_inner()
                    {
                        link.conn.close(VarInt::from_u32(close::NORMAL), b"busy");
                    }
                }
                None => link
                    .conn
                    .close(VarInt::from_u32(close::NORMAL), b"no overlay here"),
            }
            return;
        }
        if link.kind == LinkKind::Survey {
            self.answer_survey(link);
            return;
        }
        if link.kind == LinkKind::Relay {
            match &self.relay_service {
                Some(service) if link.inbound => service.offer(link),
                _ => link
                    .conn
                    .close(VarInt::from_u32(close::NORMAL), b"not a relay"),
            }
            return;
        }
        if link.kind == LinkKind::Membership && self.overlay.is_some() {
            link.conn
                .close(VarInt::from_u32(close::NORMAL), b"overlay only");
            return;
        }
        if link.kind == LinkKind::Blob {
            match &self.work {
                Some(work) => {
                    if let Err(err) = work.try_send(work::WorkInput::BlobLink(link))
                        && let work::WorkInput::BlobLink(link) = err.into_inner()
                    {
                        link.conn.close(VarInt::from_u32(close::NORMAL), b"busy");
                    }
                }
                None => link
                    .conn
                    .close(VarInt::from_u32(close::NORMAL), b"not a worker"),
            }
            return;
        }
        if link.kind == LinkKind::Job {
            // Job links bypass membership: they belong to the work task.
            match (&self.work, link.inbound) {
                (Some(work), true) => {
                    if let Err(err) = work.try_send(work::WorkInput::Link(link))
                        && let work::WorkInput::Link(link) = err.into_inner()
                    {
                        link.conn.close(VarInt::from_u32(close::NORMAL), b"busy");
                    }
                }
                _ => link
                    .conn
                    .close(VarInt::from_u32(close::NORMAL), b"not a worker"),
            }
            return;
        }
        let peer = link.peer;
        let event = Event::Connected {
            peer,
            addr: link.addr,
            inbound: link.inbound,
        };
        if let Some(existing) = self.conns.get(&peer) {
            let dialer = |inbound: bool| if inbound { peer } else { self.me };
            let (new, old) = (dialer(link.inbound), dialer(existing.inbound));
            if new >= old {
                tracing::debug!(%peer, inbound = link.inbound, "duplicate connection closed");
                link.conn
                    .close(VarInt::from_u32(close::DUPLICATE), b"duplicate");
                // Still reported: it settles the state machine's pending dial.
                self.membership.handle(event, now);
                return;
            }
            tracing::debug!(%peer, "duplicate connection replaces the existing one");
            self.conns.remove(&peer);
        }
        let id = self.next_conn;
        self.next_conn += 1;
        let span = tracing::info_span!("conn", %peer, conn = id, inbound = link.inbound, addr = %link.addr);
        span.in_scope(|| tracing::debug!("link up"));
        let (outbox, rx) = Outbox::new(OUTBOX, OUTBOX_BYTES);
        self.tasks
            .spawn(write_loop(link.conn.clone(), link.send, rx).instrument(span.clone()));
        self.tasks.spawn(
            read_loop(
                id,
                peer,
                link.conn.clone(),
                link.recv,
                self.inputs_tx.clone(),
            )
            .instrument(span),
        );
        self.conns.insert(
            peer,
            Conn {
                id,
                inbound: link.inbound,
                conn: link.conn,
                outbox,
            },
        );
        self.membership.handle(event, now);
    }

    /// A bootstrap, resolved or mDNS address: for whichever of membership and overlay runs.
    fn discovered(&mut self, addr: SocketAddr, peer: Option<PeerId>, now: Instant) {
        match &self.overlay {
            Some(o) => {
                let _ = o
                    .handle
                    .inputs
                    .try_send(overlay::OverlayInput::ContactAddr { addr, peer });
            }
            None => self
                .membership
                .handle(Event::Discovered { addr, peer }, now),
        }
    }

    /// The job this peer submits changed: in its membership advert, or in adverts broadcast
    /// over the overlay from now on.
    fn announce(&mut self, notice: Option<JobNotice>) {
        let now = Instant::now();
        match &mut self.overlay {
            Some(o) => {
                // A job that ended is withdrawn by an advert wanting no one, so workers that
                // heard the offer stop dialing this peer (and a later job of the same
                // submitter, from another port, is not hidden behind a dead address).
                let ended = o.announced.filter(|_| notice.is_none());
                o.announced = notice;
                o.next_publish = notice.map(|_| now);
                match ended {
                    Some(ended) => self.broadcast_advert(JobNotice { wanted: 0, ..ended }),
                    None => self.publish_advert(now),
                }
            }
            None => self
                .membership
                .handle(Event::JobChanged(notice.map(|n| n.job)), now),
        }
    }

    /// The relay to name in this peer's job adverts: the one it holds a reservation on now.
    fn relay_ref(&self) -> Option<crate::relay::RelayRef> {
        let (addr, held) = self.reservation.as_ref()?;
        let (peer, _) = (*held.borrow())?;
        Some(crate::relay::RelayRef { peer, addr: *addr })
    }

    /// Broadcasts a fresh advert of the job this peer submits, and sets when to do it again.
    fn publish_advert(&mut self, now: Instant) {
        let Some(o) = &mut self.overlay else {
            return;
        };
        let Some(notice) = o.announced else {
            o.next_publish = None;
            return;
        };
        o.next_publish = Some(now + ADVERT_REISSUE);
        self.broadcast_advert(notice);
    }

    /// Signs and broadcasts an advert of `notice` issued now.
    fn broadcast_advert(&mut self, notice: JobNotice) {
        let addrs: Vec<SocketAddr> = self
            .membership
            .local_advert()
            .advert
            .addrs
            .iter()
            .take(crate::job_advert::MAX_ADVERT_ADDRS)
            .copied()
            .collect();
        let identity = Arc::clone(&self.dialer.identity);
        let relay = self.relay_ref();
        let Some(o) = &mut self.overlay else {
            return;
        };
        let issued = wall_clock_ms().max(o.last_issued + 1);
        o.last_issued = issued;
        let mut advert = crate::job_advert::JobAdvert {
            submitter: self.me,
            addrs,
            job: notice.job,
            profile: crate::sandbox::PROFILE_VERSION,
            memory_bytes: notice.memory_bytes,
            wanted: notice.wanted,
            network_size: o
                .handle
                .views
                .borrow()
                .estimate
                .map_or(0, |e| u32::try_from(e.peers()).unwrap_or(u32::MAX)),
            issued,
            expires: issued + ADVERT_LIFETIME.as_millis() as u64,
            relay,
            signature: crate::overlay::Signature::default(),
        };
        advert.sign(|bytes| identity.sign(bytes));
        tracing::debug!(job = %notice.job, "job advert broadcast");
        let _ = o
            .handle
            .inputs
            .try_send(overlay::OverlayInput::Publish(advert));
    }

    /// An advert the overlay delivered: kept for status, handed to the work task, which pulls
    /// when it has room.
    fn on_advert(&mut self, advert: crate::job_advert::JobAdvert) {
        let mut size = 0;
        if let Some(o) = &mut self.overlay {
            let _ = o.heard.admit(advert.clone(), wall_clock_ms());
            size = o
                .handle
                .views
                .borrow()
                .estimate
                .map_or(0, crate::census::Estimate::peers);
        }
        if let Some(work) = &self.work {
            let _ = work.try_send(work::WorkInput::Advert(advert, size));
        }
    }

    /// Answers a survey link with this peer's capacity, job and views, within the answer rate;
    /// a peer on full tables has no views to tell.
    fn answer_survey(&mut self, link: PeerLink) {
        let now = Instant::now();
        let Some(o) = &self.overlay else {
            link.conn
                .close(VarInt::from_u32(close::NORMAL), b"no overlay here");
            return;
        };
        if !self.survey_budget.take(now) {
            link.conn.close(VarInt::from_u32(close::NORMAL), b"busy");
            return;
        }
        let views = o.handle.views.borrow();
        let info = |id: &PeerId| {
            views
                .addrs
                .iter()
                .find(|(p, _)| p == id)
                .map(|&(p, addr)| crate::overlay::PeerInfo::new(p, addr, 0))
        };
        let local = &self.membership.local_advert().advert;
        let reply = crate::survey::SurveyReply {
            cores_donated: local.cores_donated,
            cores_free: local.cores_free,
            memory_mb: local.memory_mb,
            profile: local.profile,
            job: o.announced.map(|n| n.job),
            active: crate::overlay::PeerList(
                views
                    .active
                    .iter()
                    .filter_map(info)
                    .take(crate::survey::MAX_REPLY_ACTIVE)
                    .collect(),
            ),
            passive: crate::overlay::PeerList(
                views
                    .passive
                    .iter()
                    .filter_map(info)
                    .take(crate::survey::MAX_REPLY_PASSIVE)
                    .collect(),
            ),
        };
        drop(views);
        self.tasks.spawn(survey::answer(link, reply));
    }

    /// Answers `status all`: on the overlay, the status with every peer a walk of the overlay
    /// finds; on full tables, the table itself.
    fn survey(&mut self, reply: oneshot::Sender<StatusReport>) {
        let Some(o) = &self.overlay else {
            let _ = reply.send(self.status());
            return;
        };
        let (seeds, active) = {
            let views = o.handle.views.borrow();
            (views.addrs.clone(), views.active.clone())
        };
        let dialer = self.dialer.clone();
        let me = self.me;
        self.tasks.spawn(async move {
            let (peers, count) = survey::walk(dialer.clone(), me, seeds, active).await;
            let Ok(mut report) = dialer.status().await else {
                return;
            };
            report.peers = peers;
            if let Some(o) = &mut report.overlay {
                o.survey = Some(count);
            }
            let _ = reply.send(report);
        });
    }

    /// Carries out every command the state machine has queued.
    fn flush(&mut self) {
        while let Some(command) = self.membership.poll_command() {
            match command {
                Command::Dial { addr, peer } => self.dial(addr, peer),
                Command::Disconnect { peer } => {
                    // Dropping the entry closes the outbox: the writer sends what is queued,
                    // then closes.
                    self.conns.remove(&peer);
                }
                Command::Send { to, msg } => {
                    if let Some(conn) = self.conns.get(&to)
                        && conn.outbox.try_send(&Frame::Membership(msg)) == Err(OutboxError::Full)
                    {
                        tracing::debug!(peer = %to, "outbox full; message dropped");
                    }
                }
                Command::PeerUp(advert) => tracing::info!(
                    peer = %advert.peer,
                    cores_free = advert.cores_free,
                    cores_donated = advert.cores_donated,
                    "peer up"
                ),
                Command::PeerDown(peer) => tracing::info!(%peer, "peer down"),
            }
        }
    }

    fn dial(&mut self, addr: SocketAddr, peer: Option<PeerId>) {
        if let (Some(allow), Some(p)) = (&self.allow, peer)
            && !allow.contains(&p)
        {
            tracing::debug!(%addr, peer = %p, "not dialing a peer off the allow-list");
            self.membership
                .handle(Event::DialFailed { addr }, Instant::now());
            return;
        }
        let vouch = if self.bootstrap.contains(&addr)
            || self.resolved.iter().flatten().any(|a| *a == addr)
        {
            crate::reach::Vouch::Bootstrap
        } else {
            crate::reach::Vouch::Claimed
        };
        let dialer = self.dialer.clone();
        let inputs = self.inputs_tx.clone();
        let span = tracing::debug_span!("dial", %addr, peer = ?peer);
        self.tasks.spawn(
            async move {
                let dialed = dialer
                    .dial_vouched(addr, peer, LinkKind::Membership, vouch)
                    .await;
                let input = match dialed {
                    Ok(link) => Input::Established(link),
                    Err(err) => {
                        tracing::debug!(err = %error_chain(&err), "dial failed");
                        Input::DialFailed { addr }
                    }
                };
                let _ = inputs.send(input).await;
            }
            .instrument(span),
        );
    }

    fn status(&self) -> StatusReport {
        let local = &self.membership.local_advert().advert;
        let (connections, peers) = match &self.overlay {
            Some(o) => self.overlay_peers(o),
            None => (
                self.conns.len(),
                self.membership
                    .peers()
                    .map(|a| PeerStatus {
                        id: a.peer,
                        addrs: self.membership.dial_addrs(&a.peer),
                        cores_donated: a.cores_donated,
                        cores_free: a.cores_free,
                        memory_mb: a.memory_mb,
                        profile: a.profile,
                        seq: a.seq,
                        connected: self.conns.contains_key(&a.peer),
                        job: a.job,
                        known_by: KnownBy::Table,
                    })
                    .collect(),
            ),
        };
        StatusReport {
            id: self.me,
            listen: self.local_addr,
            addrs: local.addrs.clone(),
            cores_donated: local.cores_donated,
            cores_free: local.cores_free,
            memory_mb: local.memory_mb,
            profile: local.profile,
            seq: local.seq,
            connections,
            work: None,
            traffic: self.dialer.traffic().report(Instant::now()),
            peers,
            overlay: self.overlay.as_ref().map(|o| {
                let views = o.handle.views.borrow();
                control::OverlayStatus {
                    active: views.active.len(),
                    passive: views.passive.len(),
                    adverts_heard: o.heard.len(),
                    adverts_relayed: views.adverts_relayed,
                    adverts_refused: views.adverts_refused,
                    survey: None,
                    estimated_peers: views.estimate.map(crate::census::Estimate::peers),
                    estimate_is_lower_bound: matches!(
                        views.estimate,
                        Some(crate::census::Estimate::AtLeast(_))
                    ),
                    census_samples: views.census_samples,
                }
            }),
            relay: control::RelayStatus {
                serving: self.relay_service.as_ref().map(|r| *r.serving.borrow()),
                via: self
                    .reservation
                    .as_ref()
                    .map(|(relay, held)| control::RelayVia {
                        relay: *relay,
                        observed: held.borrow().map(|(_, observed)| observed),
                    }),
            },
        }
    }

    /// The peers of the overlay's views and the submitters whose adverts were heard: what this
    /// peer knows without full tables. Capacity is known only from adverts (submitters).
    fn overlay_peers(&self, o: &OverlayPart) -> (usize, Vec<PeerStatus>) {
        let views = o.handle.views.borrow();
        let now_ms = wall_clock_ms();
        let mut peers: std::collections::BTreeMap<PeerId, PeerStatus> = views
            .addrs
            .iter()
            .map(|&(id, addr)| {
                let active = views.active.contains(&id);
                let status = PeerStatus {
                    id,
                    addrs: vec![addr],
                    cores_donated: 0,
                    cores_free: 0,
                    memory_mb: 0,
                    profile: 0,
                    seq: 0,
                    connected: active,
                    job: None,
                    known_by: if active {
                        KnownBy::Neighbour
                    } else {
                        KnownBy::Passive
                    },
                };
                (id, status)
            })
            .collect();
        for advert in o.heard.current(now_ms) {
            let entry = peers.entry(advert.submitter).or_insert_with(|| PeerStatus {
                id: advert.submitter,
                addrs: advert.addrs.clone(),
                cores_donated: 0,
                cores_free: 0,
                memory_mb: 0,
                profile: advert.profile,
                seq: advert.issued,
                connected: false,
                job: None,
                known_by: KnownBy::Advert,
            });
            entry.job = Some(advert.job);
            entry.profile = advert.profile;
            entry.seq = advert.issued;
        }
        (views.active.len(), peers.into_values().collect())
    }

    /// Stops the overlay driver, which delivers what its links hold (a job's withdrawal) and
    /// says goodbye on each.
    async fn leave_overlay(&mut self) {
        if let Some(mut o) = self.overlay.take() {
            let _ = tokio::time::timeout(
                SHUTDOWN_GRACE,
                o.handle.inputs.send(overlay::OverlayInput::Leave),
            )
            .await;
            let (closed, _) = mpsc::channel(1);
            drop(std::mem::replace(&mut o.handle.inputs, closed));
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, &mut o.handle.task).await;
        }
    }

    async fn shutdown(&mut self) {
        tracing::info!("shutting down");
        self.leave_overlay().await;
        for (_, conn) in self.conns.drain() {
            conn.conn
                .close(VarInt::from_u32(close::NORMAL), b"shutdown");
        }
        self.endpoint
            .close(VarInt::from_u32(close::NORMAL), b"shutdown");
        if let Some(daemon) = self.mdns.take() {
            // Unregisters our service (a goodbye packet) and stops the daemon thread.
            let _ = daemon.shutdown();
        }
        self.tasks.shutdown().await;
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.endpoint.wait_idle()).await;
        if let Some(path) = self.control_path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Waits for the work task's suspension to change; never, when there is no work task.
async fn suspension_changed(
    rx: &mut Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// The configuration loopback connections are accepted under while this peer serves a job.
struct Bulk {
    server: Arc<quinn::ServerConfig>,
    serving: submit::PullInbox,
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    net: NetConfig,
    inputs: mpsc::Sender<Input>,
    bulk: Bulk,
) {
    let permits = Arc::new(Semaphore::new(net.max_handshakes));
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    tracing::debug!(remote = %incoming.remote_address(), "too many handshakes; refused");
                    incoming.refuse();
                    continue;
                };
                let net = net.clone();
                let inputs = inputs.clone();
                let server = (net::is_loopback(incoming.remote_address())
                    && bulk.serving.is_open())
                .then(|| Arc::clone(&bulk.server));
                let span = tracing::debug_span!("accept", remote = %incoming.remote_address());
                handshakes.spawn(async move {
                    let _permit = permit;
                    match net::accept_with(incoming, &net, server).await {
                        Ok(link) => {
                            let _ = inputs.send(Input::Established(link)).await;
                        }
                        Err(err) if err.is_protocol_violation() => {
                            tracing::warn!(err = %error_chain(&err), "incoming connection broke the protocol; closed");
                        }
                        Err(err) => tracing::debug!(err = %error_chain(&err), "incoming connection failed"),
                    }
                }.instrument(span));
            }
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
        }
    }
}

/// Reads the remote's frames until its stream ends or breaks. A protocol violation closes the
/// whole connection: a peer that sends garbage once is not worth resynchronising with.
async fn read_loop(
    conn_id: u64,
    peer: PeerId,
    conn: quinn::Connection,
    mut recv: quinn::RecvStream,
    inputs: mpsc::Sender<Input>,
) {
    loop {
        match wire::read::<Frame, _>(&mut recv).await {
            Ok(Some(Frame::Membership(msg))) => {
                // Awaiting here is the backpressure: a full actor queue stops our reads and
                // QUIC flow control then stops the remote.
                if inputs.send(Input::Message { peer, msg }).await.is_err() {
                    return;
                }
            }
            Ok(Some(Frame::Hello(_))) => {
                tracing::warn!("peer sent a second hello; closing");
                conn.close(VarInt::from_u32(close::PROTOCOL), b"unexpected hello");
                break;
            }
            Ok(Some(
                Frame::Overlay(_) | Frame::Broadcast(_) | Frame::Survey(_) | Frame::Relay(_),
            )) => {
                tracing::warn!("peer sent an overlay message on a membership link; closing");
                conn.close(VarInt::from_u32(close::PROTOCOL), b"unexpected frame");
                break;
            }
            Ok(None) => {
                tracing::debug!("peer finished its stream");
                break;
            }
            Err(err) => {
                end_of_reading(err, &conn);
                break;
            }
        }
    }
    let _ = inputs
        .send(Input::Closed {
            conn: conn_id,
            peer,
        })
        .await;
}

/// Ends a link's reader after a read error: a lost connection is only logged; anything else is
/// a protocol violation, and the whole connection is closed with a code the remote can log — a
/// peer that sends garbage once is not worth resynchronising with.
fn end_of_reading(err: WireError, conn: &quinn::Connection) {
    match err {
        WireError::Io(err) => {
            tracing::debug!(%err, reason = ?conn.close_reason(), "connection lost");
            discovery_mismatch(conn);
        }
        err => {
            tracing::warn!(err = %error_chain(&err), "malformed input from peer; closing");
            conn.close(VarInt::from_u32(close::PROTOCOL), b"malformed frame");
        }
    }
}

/// Says once, when a peer closed a link because it finds peers the other way (full tables
/// against the overlay), why the two will never talk: a network's peers must all run one.
fn discovery_mismatch(conn: &quinn::Connection) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(quinn::ConnectionError::ApplicationClosed(close)) = conn.close_reason() else {
        return;
    };
    let (theirs, ours) = match &close.reason[..] {
        b"overlay only" => ("the overlay", "full tables"),
        b"no overlay here" => ("full tables", "the overlay"),
        _ => return,
    };
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            remote = %conn.remote_address(),
            "the peer at this address finds peers with {theirs} and this one with {ours}: they cannot talk; give every peer of the network the same --discovery"
        );
    }
}

/// An error and its sources on one line, for logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The addresses to advertise for an endpoint bound to `local`: itself if it is a concrete
/// address; otherwise this machine's interface addresses, routable ones first (peers dial the
/// first one).
fn advertised_addrs(local: SocketAddr) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let interfaces = match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces,
        Err(err) => {
            tracing::warn!(%err, "cannot list network interfaces; advertising no address");
            return Vec::new();
        }
    };
    let mut ips: Vec<IpAddr> = interfaces
        .iter()
        .map(|i| i.ip())
        .filter(|ip| local.is_ipv6() || ip.is_ipv4())
        .filter(|ip| match ip {
            // Link-local IPv6 needs a scope id that an advert cannot carry.
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            IpAddr::V4(_) => true,
        })
        .collect();
    ips.sort_by_key(|ip| (ip.is_loopback(), ip.is_ipv6()));
    ips.dedup();
    ips.into_iter()
        .take(MAX_ADVERT_ADDRS)
        .map(|ip| SocketAddr::new(ip, local.port()))
        .collect()
}

/// The one address the overlay names this peer by, among those it advertises: peers check that
/// a joiner's address is on the host its connection comes from, so a peer that joins through a
/// loopback bootstrap names its loopback address, and otherwise its first other one.
fn overlay_addr(addrs: &[SocketAddr], bootstrap: &[Bootstrap]) -> Option<SocketAddr> {
    let loopback = bootstrap.first().is_some_and(|b| b.addr.ip().is_loopback());
    addrs
        .iter()
        .find(|a| a.ip().is_loopback() == loopback)
        .or(addrs.first())
        .copied()
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    // Only spreads gossip timing and targets; a clock-derived fallback is good enough.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        return wall_clock_ms();
    }
    u64::from_le_bytes(bytes)
}

/// Where a node looks for peers, for the line that says it found none.
fn where_to_look(addrs: &[Bootstrap], names: &[NamedBootstrap], mdns: bool) -> String {
    let mut places: Vec<String> = addrs.iter().map(|b| b.addr.to_string()).collect();
    places.extend(names.iter().map(ToString::to_string));
    match (places.is_empty(), mdns) {
        (true, true) => "on the local network (mDNS; no --bootstrap given)".to_owned(),
        (true, false) => "anywhere: no --bootstrap given and mDNS is off".to_owned(),
        (false, true) => format!("at {} or on the local network (mDNS)", places.join(", ")),
        (false, false) => format!("at {}", places.join(", ")),
    }
}

/// Says once when the node has gone [`ISOLATED_AFTER`] without any connection — from its
/// start, or since it lost its last — and once when it has a peer again: a volunteer whose
/// bootstrap peers are unreachable should not be left guessing.
/// Samples the node's traffic meter now and then, so a status asked for once still has a
/// rate to show and closed links are counted and let go.
async fn traffic_snapshots(traffic: crate::traffic::Traffic) {
    let mut tick = tokio::time::interval(crate::traffic::SNAPSHOT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        traffic.sample(Instant::now());
    }
}

async fn isolation_log(mut isolated: tokio::sync::watch::Receiver<bool>, looked: String) {
    loop {
        if isolated.wait_for(|alone| *alone).await.is_err() {
            return;
        }
        let joined = tokio::time::timeout(ISOLATED_AFTER, isolated.wait_for(|alone| !*alone))
            .await
            .map(|r| r.is_ok());
        match joined {
            Ok(true) => continue,
            Ok(false) => return,
            Err(_) => {
                tracing::warn!(
                    "no peer reachable {looked} after {} s; still trying",
                    ISOLATED_AFTER.as_secs()
                );
                if isolated.wait_for(|alone| !*alone).await.is_err() {
                    return;
                }
                tracing::info!("connected to a peer again");
            }
        }
    }
}

/// Looks the bootstrap names up now, again every `retry` while the node has no connection, and
/// every few minutes otherwise, and hands what they resolve to to the actor. A name that does not
/// resolve is logged once until it resolves again.
async fn resolve_loop(
    names: Vec<NamedBootstrap>,
    inputs: mpsc::Sender<Input>,
    mut isolated: tokio::sync::watch::Receiver<bool>,
    retry: Duration,
) {
    let mut failing = vec![false; names.len()];
    loop {
        for (index, name) in names.iter().enumerate() {
            let looked = tokio::time::timeout(
                RESOLVE_TIMEOUT,
                tokio::net::lookup_host((name.host.as_str(), name.port)),
            )
            .await;
            let addrs: Vec<SocketAddr> = match looked {
                Ok(Ok(addrs)) => addrs.take(MAX_ADDRS_PER_NAME).collect(),
                Ok(Err(err)) => {
                    if !std::mem::replace(&mut failing[index], true) {
                        tracing::warn!(bootstrap = %name, %err, "cannot resolve a bootstrap name; trying again later");
                    }
                    continue;
                }
                Err(_) => {
                    if !std::mem::replace(&mut failing[index], true) {
                        tracing::warn!(bootstrap = %name, "a bootstrap name did not resolve within {RESOLVE_TIMEOUT:?}; trying again later");
                    }
                    continue;
                }
            };
            if std::mem::replace(&mut failing[index], false) {
                tracing::info!(bootstrap = %name, ?addrs, "bootstrap name resolved");
            } else {
                tracing::debug!(bootstrap = %name, ?addrs, "bootstrap name resolved");
            }
            let resolved = Input::Resolved {
                index,
                addrs,
                peer: name.peer,
            };
            if inputs.send(resolved).await.is_err() {
                return;
            }
        }
        let wait = if *isolated.borrow_and_update() {
            retry
        } else {
            RESOLVE_CONNECTED
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                changed = isolated.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Just lost every peer: look the names up again after a short pause.
                    if *isolated.borrow_and_update() {
                        tokio::time::sleep(retry).await;
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_parses_both_forms() {
        let id = Identity::generate().expect("identity").id();
        let plain: Bootstrap = "127.0.0.1:7401".parse().expect("plain");
        assert_eq!(plain.peer, None);
        let pinned: Bootstrap = format!("{id}@[::1]:9").parse().expect("pinned");
        assert_eq!(pinned.peer, Some(id));
        assert_eq!(pinned.to_string(), format!("{id}@[::1]:9"));
        assert!("nonsense".parse::<Bootstrap>().is_err());
        assert!("abc@127.0.0.1:1".parse::<Bootstrap>().is_err());
    }

    #[test]
    fn bootstrap_arguments_take_host_names() {
        let id = Identity::generate().expect("identity").id();
        assert_eq!(
            "127.0.0.1:7401".parse::<BootstrapArg>(),
            Ok(BootstrapArg::Addr("127.0.0.1:7401".parse().expect("addr")))
        );
        let named: BootstrapArg = format!("{id}@Lab-01.example:7401").parse().expect("name");
        assert_eq!(
            named,
            BootstrapArg::Name(NamedBootstrap {
                host: "lab-01.example".into(),
                port: 7401,
                peer: Some(id),
            })
        );
        assert_eq!(named.to_string(), format!("{id}@lab-01.example:7401"));
        for bad in [
            "lab-01",
            "lab-01:",
            "lab-01:70000",
            "-lab:1",
            "lab_01:1",
            "a..b:1",
            "[::1]:x",
            "1.2.3.4.5:1",
            "héte:1",
            "abc@lab:1",
        ] {
            assert!(bad.parse::<BootstrapArg>().is_err(), "{bad}");
        }
        assert!(!is_host_name(&"a".repeat(254)));
        assert!(!is_host_name(&format!("{}.b", "a".repeat(64))));
        assert!(is_host_name("localhost"));
    }

    #[test]
    fn unspecified_listen_addresses_advertise_concrete_ones() {
        let addrs = advertised_addrs("0.0.0.0:4000".parse().expect("addr"));
        assert!(
            addrs
                .iter()
                .all(|a| !a.ip().is_unspecified() && a.port() == 4000)
        );
        let concrete: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        assert_eq!(advertised_addrs(concrete), vec![concrete]);
    }
}
