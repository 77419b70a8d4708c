//! The submitter side of jobs: the job loop's [`Workers`] over real peers.
//!
//! [`NetWorkers`] reads the membership table for peers that advertise free cores under our
//! engine profile, opens a job link to each (this peer included, when it donates cores), and
//! turns the job loop's offers and revocations into frames. Each link's reader task turns the
//! worker's reports, declines and blob requests into events for the job loop, and serves
//! blobs (the module, large inputs) from memory itself, so a worker's fetch never waits for
//! the job loop.
//!
//! The job loop runs on a thread of its own; it reaches the async side through a runtime
//! handle and one bounded event channel, whose senders wait when it is full: a worker's
//! reports then stay in QUIC's flow control rather than in memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::VarInt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::outbox::{Outbox, write_loop};
use super::{NodeError, Request, end_of_reading, error_chain, work::send_blob};
use crate::control::StatusReport;
use crate::digest::Digest;
use crate::host::Host;
use crate::identity::{AllowList, Identity};
use crate::job::driver::{JobData, JobError, WorkerEvent, Workers, route_commands};
use crate::job::inputs::UnitSource;
use crate::job::proto::{
    InputRef, JobFrame, JobSpec, MAX_IDS_PER_MESSAGE, MAX_INLINE_INPUT, Offer, WireLease,
};
use crate::net::{self, LinkKind, NetConfig, PeerLink, close};
use crate::peer_id::PeerId;
use crate::reach::{PROBE_TIMEOUT, Reach, Ticket, Vouch};
use crate::sandbox::PROFILE_VERSION;
use crate::schedule::{Command, Lease, LeaseId, Scheduler};
use crate::wire;

/// Events queued from all job links together, and the output bytes their reports may hold: a
/// link whose report does not fit waits, which leaves the rest in QUIC's flow control.
const EVENT_QUEUE: usize = 4096;
const EVENT_BYTES: usize = 64 << 20;
/// Frames queued for one job link's writer.
const OUTBOX: usize = 256;
/// Bytes queued for one job link's writer: offers and blob chunks for a worker that reads
/// slowly wait here; one that stops reading pins no more than this.
const OUTBOX_BYTES: u32 = 16 << 20;
/// Pull links waiting for the job loop.
const PULL_QUEUE: usize = 64;
/// Most job links at once, and most of them from one host: a host of many keys that pulls
/// with every one of them holds no more than this.
const MAX_LINKS: usize = 1024;
const MAX_LINKS_PER_HOST: usize = 8;
/// Times one link may be sent one blob in full; an honest worker asks again only when a holder
/// failed it or its cache let the blob go.
const MAX_SENDS_PER_BLOB: u32 = 4;
/// How often the membership table is read for new workers.
const SCAN_EVERY: Duration = Duration::from_millis(100);
/// How long a peer that could not be dialed is left alone.
const REDIAL_AFTER: Duration = Duration::from_secs(5);
/// Leases offered to a newly linked worker per advertised core, before its reports say how
/// many it wants.
const FIRST_OFFER_PER_CORE: u32 = 2;

/// Added to the unit timeout to form a lease's deadline: fetching the module and the inputs
/// and compiling the module are not the unit's time. A worker that vanishes is noticed sooner,
/// when its job link closes.
pub const NET_LEASE_MARGIN: Duration = Duration::from_secs(60);

/// Scheduler settings for a job spread over the network: long batches so tiny units share a
/// round trip, and a lease deadline from the unit's timeout.
pub fn net_schedule_config(limits: &crate::sandbox::Limits) -> crate::schedule::Config {
    crate::schedule::Config {
        lease_timeout: limits.timeout.saturating_add(NET_LEASE_MARGIN),
        max_leases_per_peer: 512,
        // Room for a busy machine with its submitter's own peer beside its worker; a host's
        // many keys share this.
        max_leases_per_host: 1024,
        max_batch: crate::job::proto::MAX_LEASES_PER_OFFER,
        ..crate::schedule::Config::default()
    }
}

/// Where a node puts the pull links workers open to it: the sender of the job loop running on
/// it, if any. One job loop at a time takes pull links; a node running several jobs at once
/// gives them to the latest.
#[derive(Debug, Clone, Default)]
pub(super) struct PullInbox(Arc<std::sync::Mutex<Option<mpsc::Sender<PeerLink>>>>);

impl PullInbox {
    /// Hands `link` to the job loop, or closes it when there is none or it is full.
    pub(super) fn offer(&self, link: PeerLink) {
        let slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let refused = match slot.as_ref() {
            Some(tx) => tx.try_send(link).err().map(|e| e.into_inner()),
            None => Some(link),
        };
        if let Some(link) = refused {
            link.conn
                .close(VarInt::from_u32(close::NORMAL), b"no job here");
        }
    }

    fn set(&self, tx: Option<mpsc::Sender<PeerLink>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = tx;
    }

    /// Whether a job is taking pull links now.
    pub(super) fn is_open(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

/// What a submitter needs from its node to reach workers: the endpoint, identity and the
/// membership table.
#[derive(Debug, Clone)]
pub struct JobDialer {
    pub(super) pulls: PullInbox,
    pub(super) me: PeerId,
    pub(super) endpoint: quinn::Endpoint,
    pub(super) identity: Arc<Identity>,
    pub(super) allow: Option<Arc<AllowList>>,
    pub(super) net: NetConfig,
    pub(super) requests: mpsc::Sender<Request>,
    pub(super) local_addr: SocketAddr,
    /// Which addresses may be dialed, shared by every dial of this node (see [`Reach`]).
    pub(super) reach: Arc<Mutex<Reach>>,
}

/// How long a dial waits for another probe of the same address to end before giving up.
const PROBE_WAIT: Duration = Duration::from_millis(50);

/// A ticket held while its dial runs; dropped unfinished (the dial was cancelled) it counts as
/// a failure, so a cancelled probe never leaves its address marked busy.
struct Pending<'a> {
    reach: &'a Mutex<Reach>,
    ticket: Option<Ticket>,
}

impl Pending<'_> {
    fn finish(mut self, reached: Option<PeerId>) {
        if let Some(ticket) = self.ticket.take() {
            lock(self.reach).finished(ticket, reached, Instant::now());
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            lock(self.reach).finished(ticket, None, Instant::now());
        }
    }
}

/// Dials `addr` (for `peer`, a link of `kind`) from `endpoint` with leave from the [`Reach`]
/// book `reach`: a probe of an unconfirmed address waits briefly for another probe of the same
/// IP to end, and is refused when probes to it are rationed. Every dial of a node goes through
/// here, the overlay's too.
pub(super) async fn dial_with_leave(
    reach: &Mutex<Reach>,
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    allow: Option<Arc<AllowList>>,
    config: &NetConfig,
    (addr, peer, kind): (SocketAddr, Option<PeerId>, LinkKind),
    vouch: Vouch,
) -> Result<PeerLink, net::NetError> {
    // Port 0 names a peer behind NAT, reached only by introduction: no packet goes there, and
    // no probe allowance is spent on it.
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(net::NetError::Connect {
            addr,
            source: quinn::ConnectError::InvalidRemoteAddress(addr),
        });
    }
    let give_up = tokio::time::Instant::now() + config.handshake_timeout;
    let ticket = loop {
        let asked = lock(reach).ask(addr, peer, vouch, Instant::now());
        match asked {
            Ok(ticket) => break ticket,
            Err(reason)
                if reason.is_transient() && tokio::time::Instant::now() + PROBE_WAIT < give_up =>
            {
                tokio::time::sleep(PROBE_WAIT).await;
            }
            Err(reason) => return Err(net::NetError::Refused { addr, reason }),
        }
    };
    let mut net = config.clone();
    if ticket.is_probe() {
        net.handshake_timeout = net.handshake_timeout.min(PROBE_TIMEOUT);
    }
    let pending = Pending {
        reach,
        ticket: Some(ticket),
    };
    let result = net::dial_for(endpoint, identity, allow, addr, peer, &net, kind).await;
    pending.finish(result.as_ref().ok().map(|link| link.peer));
    result
}

fn lock(reach: &Mutex<Reach>) -> std::sync::MutexGuard<'_, Reach> {
    reach.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobDialer {
    /// The node's traffic meter.
    pub(crate) fn traffic(&self) -> &crate::traffic::Traffic {
        &self.net.traffic
    }

    /// This peer's id.
    pub fn id(&self) -> PeerId {
        self.me
    }

    /// Opens a link of `kind` to `peer` at `addr`, an address only claimed for it (an
    /// advert), checking its id.
    pub(super) async fn dial(
        &self,
        addr: SocketAddr,
        peer: PeerId,
        kind: LinkKind,
    ) -> Result<PeerLink, net::NetError> {
        self.dial_vouched(addr, Some(peer), kind, Vouch::Claimed)
            .await
    }

    /// Opens a link of `kind` to `addr` from this peer's endpoint, with leave from the
    /// [`Reach`] book: a probe of an unconfirmed address waits briefly for another probe of the
    /// same IP to end, and is refused when probes to it are rationed.
    pub(super) async fn dial_vouched(
        &self,
        addr: SocketAddr,
        peer: Option<PeerId>,
        kind: LinkKind,
        vouch: Vouch,
    ) -> Result<PeerLink, net::NetError> {
        dial_with_leave(
            &self.reach,
            &self.endpoint,
            &self.identity,
            self.allow.clone(),
            &self.net,
            (addr, peer, kind),
            vouch,
        )
        .await
    }

    /// The address `peer` was last seen at on an authenticated connection, if any.
    pub(super) fn confirmed(&self, peer: &PeerId) -> Option<SocketAddr> {
        lock(&self.reach).confirmed(peer)
    }

    /// `link` proved its remote's id at its remote address.
    pub(super) fn confirm(&self, link: &PeerLink) {
        lock(&self.reach).confirm(link.peer, link.addr, Instant::now());
    }

    pub(super) async fn status(&self) -> Result<StatusReport, NodeError> {
        super::NodeControl {
            requests: self.requests.clone(),
        }
        .status()
        .await
    }

    /// Advertises `job` as the job this peer submits now, so workers it cannot reach (or, on
    /// the overlay, does not know) ask it for work (`None` withdraws it). Best effort: a full
    /// request queue drops it.
    fn announce(&self, job: Option<super::JobNotice>) {
        let _ = self.requests.try_send(Request::Announce(job));
    }

    /// The address to dial this peer itself at.
    fn self_addr(&self) -> SocketAddr {
        let ip = match self.local_addr.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, self.local_addr.port())
    }
}

/// What link tasks tell the job loop.
enum NetEvent {
    Linked {
        peer: PeerId,
        conn: u64,
        quic: quinn::Connection,
        outbox: Outbox,
        cores: u32,
    },
    DialFailed {
        peer: PeerId,
    },
    Report {
        peer: PeerId,
        conn: u64,
        results: Vec<(LeaseId, Result<Vec<u8>, crate::sandbox::UnitError>)>,
        want: u32,
        /// The report's share of [`EVENT_BYTES`], given back when the job loop has taken it.
        _held: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    Declined {
        peer: PeerId,
        leases: Vec<LeaseId>,
    },
    Closed {
        peer: PeerId,
        conn: u64,
    },
}

struct Link {
    conn: u64,
    quic: quinn::Connection,
    outbox: Outbox,
    /// Where the link's connection comes from, as this peer sees it: the host its leases are
    /// placed on. Never an address the peer advertised.
    host: Host,
}

/// The blobs a job serves to its workers, and which workers hold them; and the byte budget of
/// the reports the links hand to the job loop (`EVENT_BYTES`), which every link shares.
#[derive(Debug)]
struct Blobs {
    /// Blobs held in memory: the module.
    map: HashMap<Digest, Arc<Vec<u8>>>,
    /// Inputs too large to travel inline, read from the job's inputs when a worker asks.
    inputs: std::sync::Mutex<Offered>,
    source: Option<Arc<UnitSource>>,
    shared: std::sync::Mutex<Sharing>,
    reports: Arc<tokio::sync::Semaphore>,
    /// The node's meter, told which bytes of the job links were blobs.
    traffic: crate::traffic::Traffic,
}

impl Default for Blobs {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            inputs: Default::default(),
            source: None,
            shared: Default::default(),
            reports: Arc::new(tokio::sync::Semaphore::new(EVENT_BYTES)),
            traffic: Default::default(),
        }
    }
}

/// Large inputs named in offers, by digest, and the last ones read: replicas of one unit, and
/// workers that fetch what another just fetched, are served from memory, within
/// [`INPUT_CACHE_BYTES`].
#[derive(Debug, Default)]
struct Offered {
    /// The unit whose input has this digest, and its length.
    units: HashMap<Digest, (u32, u64)>,
    /// Digests in the order they were first offered, to forget the oldest.
    order: VecDeque<Digest>,
    cache: VecDeque<(Digest, Arc<Vec<u8>>)>,
    cached_bytes: usize,
}

/// Most large inputs remembered as offered: a worker fetches an input soon after its offer,
/// and one asking for an input forgotten since is told it is missing and declines the lease,
/// which is offered again.
const MAX_OFFERED: usize = 65_536;
/// Bytes of inputs kept in memory after they were read for a worker.
const INPUT_CACHE_BYTES: usize = 64 << 20;

/// Who holds which large blob, so later fetchers can be sent to them instead of to us.
#[derive(Debug, Default)]
struct Sharing {
    holders: HashMap<Digest, Vec<Holder>>,
    /// Fetchers already sent elsewhere for a blob, and to whom: a second ask is served here,
    /// and counts as a miss of that holder.
    redirected: HashMap<(PeerId, Digest), PeerId>,
    /// Blobs served from here, and fetches sent to a holder.
    served: u64,
    sent_elsewhere: u64,
}

/// A worker that said it holds a blob, at the address its link comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    peer: PeerId,
    addr: SocketAddr,
    /// Fetchers sent to it that came back without the blob. A fetcher that has never met the
    /// holder comes back too (it dials only addresses it has confirmed itself), so one miss
    /// proves nothing; [`MAX_HOLDER_MISSES`] of them and the holder is no longer named.
    misses: u32,
}

/// Misses after which a holder is no longer named.
const MAX_HOLDER_MISSES: u32 = 3;

/// Blobs at least this large are fetched from workers that hold them when there are some.
const SHARE_MIN: usize = 256 << 10;
/// Most holders remembered per blob.
const MAX_HOLDERS: usize = 16;
/// Most redirections remembered.
const MAX_REDIRECTED: usize = 65_536;

impl Blobs {
    /// The length of a blob this job serves.
    fn len(&self, digest: &Digest) -> Option<u64> {
        if let Some(bytes) = self.map.get(digest) {
            return Some(bytes.len() as u64);
        }
        let inputs = self.inputs.lock().unwrap_or_else(|p| p.into_inner());
        inputs.units.get(digest).map(|(_, len)| *len)
    }

    /// Notes that unit `unit`'s input, of `len` bytes, is offered as the blob `digest`.
    fn offered(&self, digest: Digest, unit: u32, len: u64) {
        let mut inputs = self.inputs.lock().unwrap_or_else(|p| p.into_inner());
        if inputs.units.insert(digest, (unit, len)).is_none() {
            inputs.order.push_back(digest);
            while inputs.order.len() > MAX_OFFERED {
                if let Some(old) = inputs.order.pop_front() {
                    inputs.units.remove(&old);
                }
            }
        }
    }

    /// The bytes of `digest`: the module, or an offered input read from the job's inputs and
    /// checked against its digest. Reads files: call it off the async threads.
    fn bytes(&self, digest: &Digest) -> Option<Arc<Vec<u8>>> {
        if let Some(bytes) = self.map.get(digest) {
            return Some(Arc::clone(bytes));
        }
        let unit = {
            let inputs = self.inputs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, bytes)) = inputs.cache.iter().find(|(d, _)| d == digest) {
                return Some(Arc::clone(bytes));
            }
            inputs.units.get(digest)?.0
        };
        let source = self.source.as_ref()?;
        // An input file's bytes are checked against its digest by the source as it reads
        // them; only computed inputs are hashed here.
        let checked = source
            .known(u64::from(unit))
            .is_some_and(|(_, known)| known == *digest);
        let bytes = match source.input(u64::from(unit)) {
            Ok(bytes) if checked || Digest::of(&bytes) == *digest => Arc::new(bytes),
            Ok(_) | Err(_) => {
                tracing::warn!(unit, %digest, "an input offered as a blob can no longer be read as it was");
                return None;
            }
        };
        let mut inputs = self.inputs.lock().unwrap_or_else(|p| p.into_inner());
        if bytes.len() <= INPUT_CACHE_BYTES && !inputs.cache.iter().any(|(d, _)| d == digest) {
            inputs.cached_bytes += bytes.len();
            inputs.cache.push_back((*digest, Arc::clone(&bytes)));
            while inputs.cached_bytes > INPUT_CACHE_BYTES {
                let Some((_, old)) = inputs.cache.pop_front() else {
                    break;
                };
                inputs.cached_bytes -= old.len();
            }
        }
        Some(bytes)
    }

    /// Where `peer` should fetch `digest` from: a holder, the first time a large blob with
    /// holders is asked for; `None` to serve it here.
    fn holder_for(&self, peer: PeerId, digest: Digest) -> Option<PeerId> {
        let large = self.len(&digest).is_some_and(|len| len >= SHARE_MIN as u64);
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(missed) = s.redirected.get(&(peer, digest)).copied() {
            if let Some(h) = s.holders.get_mut(&digest) {
                for holder in h.iter_mut().filter(|h| h.peer == missed) {
                    holder.misses += 1;
                }
                h.retain(|h| h.misses < MAX_HOLDER_MISSES);
            }
            s.served += 1;
            return None;
        }
        if !large {
            s.served += 1;
            return None;
        }
        let candidates: Vec<PeerId> = s
            .holders
            .get(&digest)
            .map(|h| h.iter().map(|h| h.peer).filter(|p| *p != peer).collect())
            .unwrap_or_default();
        if candidates.is_empty() || s.redirected.len() >= MAX_REDIRECTED {
            s.served += 1;
            return None;
        }
        let pick = candidates[(s.sent_elsewhere as usize) % candidates.len()];
        s.redirected.insert((peer, digest), pick);
        s.sent_elsewhere += 1;
        Some(pick)
    }

    /// `peer`, reachable at `addr`, says it now holds `digest`. One holder per host: a host
    /// of many keys cannot fill the holder list and serve every fetcher bad bytes (fetchers
    /// check the digest and come back here, and a holder that fails one is dropped).
    fn add_holder(&self, digest: Digest, peer: PeerId, addr: SocketAddr) {
        if self.len(&digest).is_none_or(|len| len < SHARE_MIN as u64) {
            return;
        }
        let host = Host::of(addr.ip());
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let holders = s.holders.entry(digest).or_default();
        if holders.len() < MAX_HOLDERS
            && !holders
                .iter()
                .any(|h| h.peer == peer || Host::of(h.addr.ip()) == host)
        {
            holders.push(Holder {
                peer,
                addr,
                misses: 0,
            });
        }
    }
}

/// The job loop's workers: every peer in the network with free cores.
pub struct NetWorkers {
    dialer: JobDialer,
    runtime: tokio::runtime::Handle,
    job: Digest,
    name: String,
    spec: JobSpec,
    blobs: Arc<Blobs>,
    links: HashMap<PeerId, Link>,
    dialing: HashSet<PeerId>,
    failed: HashMap<PeerId, Instant>,
    outstanding: HashMap<LeaseId, PeerId>,
    events_tx: mpsc::Sender<NetEvent>,
    events_rx: mpsc::Receiver<NetEvent>,
    local: Vec<WorkerEvent>,
    next_conn: u64,
    next_scan: Instant,
    tasks: Vec<JoinHandle<()>>,
    /// Peers ever linked, for the summary.
    seen: HashSet<PeerId>,
    /// Job links workers opened to us, asking for work.
    pulls: mpsc::Receiver<PeerLink>,
    /// Verdicts on each worker's answers not yet sent to it: units accepted, units rejected.
    judged: HashMap<PeerId, (Vec<u32>, Vec<u32>)>,
}

impl std::fmt::Debug for NetWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetWorkers")
            .field("job", &self.job)
            .field("links", &self.links.len())
            .field("outstanding", &self.outstanding.len())
            .finish_non_exhaustive()
    }
}

impl NetWorkers {
    /// Sends `to` the verdicts gathered for it. A full link drops them: they are the
    /// volunteer's tally, not worth holding up leases and results for.
    fn send_judged(&mut self, to: PeerId) {
        let Some((accepted, rejected)) = self.judged.remove(&to) else {
            return;
        };
        if let Some(link) = self.links.get(&to) {
            let _ = link.outbox.try_send(&JobFrame::Judged {
                job: self.job,
                accepted,
                rejected,
            });
        }
    }

    /// Workers for `job`, reached through `dialer` on `runtime`. `module` is the module's bytes.
    pub fn new(
        dialer: JobDialer,
        runtime: tokio::runtime::Handle,
        job: &JobData,
        module: Arc<[u8]>,
    ) -> Self {
        let mut map = HashMap::new();
        let spec = JobSpec::new(job.module, module.len() as u64, &job.limits);
        map.insert(job.module, Arc::new(module.to_vec()));
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (pull_tx, pulls) = mpsc::channel(PULL_QUEUE);
        dialer.pulls.set(Some(pull_tx));
        dialer.announce(Some(super::JobNotice {
            job: job.id,
            memory_bytes: spec.memory_bytes,
            wanted: MAX_LINKS as u32,
        }));
        let traffic = dialer.traffic().clone();
        Self {
            pulls,
            judged: HashMap::new(),
            dialer,
            runtime,
            job: job.id,
            name: job.name.clone(),
            spec,
            blobs: Arc::new(Blobs {
                map,
                source: Some(Arc::clone(&job.source)),
                traffic,
                ..Blobs::default()
            }),
            links: HashMap::new(),
            dialing: HashSet::new(),
            failed: HashMap::new(),
            outstanding: HashMap::new(),
            events_tx,
            events_rx,
            local: Vec::new(),
            next_conn: 0,
            next_scan: Instant::now(),
            tasks: Vec::new(),
            seen: HashSet::new(),
        }
    }

    /// The limits every replica runs under (the job's, with the output cap a report carries).
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// Peers linked at some point of this run.
    pub fn peers_seen(&self) -> usize {
        self.seen.len()
    }

    /// Blob fetches served by this peer, and fetches sent to a worker that held the blob.
    pub fn blob_counts(&self) -> (u64, u64) {
        let s = self.blobs.shared.lock().unwrap_or_else(|p| p.into_inner());
        (s.served, s.sent_elsewhere)
    }

    /// Reads the membership table and dials workers not linked yet.
    fn scan(&mut self, now: Instant) -> Result<(), JobError> {
        self.next_scan = now + SCAN_EVERY;
        let dialer = self.dialer.clone();
        let status = self
            .runtime
            .block_on(async move { dialer.status().await })
            .map_err(|_| JobError::NodeStopped)?;
        // A unit needs its memory cap on one core of the peer: peers offering less per core
        // would decline the job anyway.
        let per_unit = self.spec.memory_bytes;
        let fits = |memory_mb: u32, cores: u16| {
            u64::from(memory_mb) << 20 >= per_unit.saturating_mul(u64::from(cores.max(1)))
        };
        let mut candidates = Vec::new();
        if status.cores_donated > 0 && fits(status.memory_mb, status.cores_donated) {
            candidates.push((
                self.dialer.me,
                self.dialer.self_addr(),
                status.cores_donated,
            ));
        }
        for p in &status.peers {
            if p.cores_donated == 0
                || p.profile != PROFILE_VERSION
                || !fits(p.memory_mb, p.cores_donated)
            {
                continue;
            }
            if let Some(addr) = p.addrs.first() {
                candidates.push((p.id, *addr, p.cores_donated.max(p.cores_free)));
            }
        }
        for (peer, addr, cores) in candidates {
            if self.links.contains_key(&peer)
                || self.dialing.contains(&peer)
                || self
                    .failed
                    .get(&peer)
                    .is_some_and(|at| now.duration_since(*at) < REDIAL_AFTER)
            {
                continue;
            }
            self.dial(peer, addr, u32::from(cores));
        }
        Ok(())
    }

    fn dial(&mut self, peer: PeerId, addr: SocketAddr, cores: u32) {
        self.dialing.insert(peer);
        let conn_id = self.next_conn;
        self.next_conn += 1;
        let d = self.dialer.clone();
        let events = self.events_tx.clone();
        let blobs = Arc::clone(&self.blobs);
        let job = self.job;
        let span = tracing::debug_span!("job-link", %peer, conn = conn_id);
        let task = self.runtime.spawn(
            async move {
                match d.dial(addr, peer, LinkKind::Job).await {
                    Ok(link) => serve_link(link, conn_id, cores, job, blobs, events, true).await,
                    Err(err) => {
                        tracing::debug!(err = %error_chain(&err), "job link dial failed");
                        let _ = events.send(NetEvent::DialFailed { peer }).await;
                    }
                }
            }
            .instrument(span),
        );
        self.tasks.push(task);
        self.tasks.retain(|t| !t.is_finished());
    }

    /// Takes a link a worker opened to ask for work, unless that worker is linked already.
    fn adopt(&mut self, link: PeerLink) {
        let peer = link.peer;
        if self.links.contains_key(&peer) || self.dialing.contains(&peer) {
            link.conn
                .close(VarInt::from_u32(close::DUPLICATE), b"already linked");
            return;
        }
        let host = Host::of(link.conn.remote_address().ip());
        let from_host = self.links.values().filter(|l| l.host == host).count();
        if self.links.len() + self.dialing.len() >= MAX_LINKS || from_host >= MAX_LINKS_PER_HOST {
            tracing::debug!(%peer, %host, "pull link refused: too many links");
            link.conn
                .close(VarInt::from_u32(close::NORMAL), b"too many links");
            return;
        }
        self.dialing.insert(peer);
        let conn_id = self.next_conn;
        self.next_conn += 1;
        let span = tracing::debug_span!("pull-link", %peer, conn = conn_id);
        let task = self.runtime.spawn(
            serve_link(
                link,
                conn_id,
                1,
                self.job,
                Arc::clone(&self.blobs),
                self.events_tx.clone(),
                // A worker that pulled may not be dialable: never name it as a holder.
                false,
            )
            .instrument(span),
        );
        self.tasks.push(task);
        self.tasks.retain(|t| !t.is_finished());
    }

    fn on_event(&mut self, event: NetEvent, out: &mut Vec<WorkerEvent>) {
        match event {
            NetEvent::Linked {
                peer,
                conn,
                quic,
                outbox,
                cores,
            } => {
                self.dialing.remove(&peer);
                self.seen.insert(peer);
                let host = Host::of(quic.remote_address().ip());
                tracing::info!(%peer, %host, "job link up");
                self.links.insert(
                    peer,
                    Link {
                        conn,
                        quic,
                        outbox,
                        host,
                    },
                );
                out.push(WorkerEvent::Available {
                    peer,
                    slots: cores.max(1) * FIRST_OFFER_PER_CORE,
                    host,
                });
            }
            NetEvent::DialFailed { peer } => {
                self.dialing.remove(&peer);
                self.failed.insert(peer, Instant::now());
            }
            NetEvent::Report {
                peer,
                conn,
                results,
                want,
                ..
            } => {
                let Some(host) = self
                    .links
                    .get(&peer)
                    .filter(|l| l.conn == conn)
                    .map(|l| l.host)
                else {
                    return;
                };
                for (lease, result) in results {
                    self.outstanding.remove(&lease);
                    out.push(WorkerEvent::Answer {
                        peer,
                        lease,
                        result,
                    });
                }
                out.push(WorkerEvent::Available {
                    peer,
                    slots: want,
                    host,
                });
            }
            NetEvent::Declined { peer, leases } => {
                for lease in &leases {
                    self.outstanding.remove(lease);
                }
                out.push(WorkerEvent::Declined { peer, leases });
            }
            NetEvent::Closed { peer, conn } => {
                if self.links.get(&peer).is_some_and(|l| l.conn == conn) {
                    self.links.remove(&peer);
                    self.outstanding.retain(|_, p| *p != peer);
                    self.failed.insert(peer, Instant::now());
                    tracing::info!(%peer, "job link closed");
                    out.push(WorkerEvent::Gone { peer });
                }
            }
        }
    }
}

/// Runs a job link to a worker: starts its writer, tells the job loop it is up, then reads the
/// worker's frames until the link ends.
/// An input held by the blob cache, handed to QUIC as it is.
struct SharedInput(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedInput {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

async fn serve_link(
    link: PeerLink,
    conn_id: u64,
    cores: u32,
    job: Digest,
    blobs: Arc<Blobs>,
    events: mpsc::Sender<NetEvent>,
    dialable: bool,
) {
    let peer = link.peer;
    let (outbox, rx) = Outbox::new(OUTBOX, OUTBOX_BYTES);
    let writer = tokio::spawn(write_loop(link.conn.clone(), link.send, rx).in_current_span());
    if events
        .send(NetEvent::Linked {
            peer,
            conn: conn_id,
            quic: link.conn.clone(),
            outbox: outbox.clone(),
            cores,
        })
        .await
        .is_err()
    {
        return;
    }
    let holder_addr = dialable.then(|| link.conn.remote_address());
    read_reports(
        peer,
        conn_id,
        job,
        link.conn,
        link.recv,
        outbox,
        (blobs, holder_addr),
        &events,
    )
    .await;
    let _ = events
        .send(NetEvent::Closed {
            peer,
            conn: conn_id,
        })
        .await;
    let _ = writer.await;
}

/// How long a job's links stay open after it ends, for the frames still queued on them (the
/// last verdicts) to go out; each link's writer closes it sooner once its queue is written.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// Longest [`NetWorkers::close`] waits for its links to deliver what is queued on them: the
/// writer's own wait for the peer's acknowledgement, and a little more.
const CLOSE_LIMIT: Duration = Duration::from_millis(1500);

impl NetWorkers {
    /// Ends the job's links: the last verdicts are sent, each link's queue is written and its
    /// stream finished, and the future returned waits (at most [`CLOSE_LIMIT`]) until the
    /// workers have acknowledged it all. A process about to exit awaits it, so the last
    /// verdicts are not lost with it; dropping `NetWorkers` instead closes the links after
    /// [`CLOSE_GRACE`] without anyone waiting.
    pub fn close(mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.send_all_judged();
        for link in self.links.values() {
            link.outbox.finish();
        }
        self.links.clear();
        // Links that end report it to nobody: no task waits on a full event queue.
        let (_, closed) = mpsc::channel(1);
        self.events_rx = closed;
        let mut tasks = std::mem::take(&mut self.tasks);
        drop(self);
        async move {
            let ended = tokio::time::timeout(CLOSE_LIMIT, async {
                for task in &mut tasks {
                    let _ = task.await;
                }
            })
            .await;
            if ended.is_err() {
                for task in &tasks {
                    task.abort();
                }
            }
        }
    }

    fn send_all_judged(&mut self) {
        let waiting: Vec<PeerId> = self.judged.keys().copied().collect();
        for peer in waiting {
            self.send_judged(peer);
        }
    }
}

impl Drop for NetWorkers {
    fn drop(&mut self) {
        self.dialer.pulls.set(None);
        self.dialer.announce(None);
        self.send_all_judged();
        for (_, link) in self.links.drain() {
            let quic = link.quic;
            self.runtime.spawn(async move {
                tokio::time::sleep(CLOSE_GRACE).await;
                quic.close(VarInt::from_u32(close::NORMAL), b"job over");
            });
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Reads a worker's frames on a job link until it closes.
#[allow(clippy::too_many_arguments)]
async fn read_reports(
    peer: PeerId,
    conn: u64,
    job: Digest,
    quic: quinn::Connection,
    mut recv: quinn::RecvStream,
    outbox: Outbox,
    (blobs, holder_addr): (Arc<Blobs>, Option<SocketAddr>),
    events: &mpsc::Sender<NetEvent>,
) {
    let mut sends: HashMap<Digest, u32> = HashMap::new();
    loop {
        let event = match wire::read::<JobFrame, _>(&mut recv).await {
            Ok(Some(JobFrame::Report {
                job: j,
                results,
                want,
            })) if j == job => NetEvent::Report {
                _held: {
                    let bytes: usize = results
                        .iter()
                        .map(|r| r.result.as_ref().map_or(256, Vec::len))
                        .sum();
                    let weight = u32::try_from(bytes.clamp(1, EVENT_BYTES)).unwrap_or(u32::MAX);
                    match Arc::clone(&blobs.reports).acquire_many_owned(weight).await {
                        Ok(permit) => Some(permit),
                        Err(_) => break,
                    }
                },
                peer,
                conn,
                // A peer's error text is bounded and escaped like our own before anyone sees it.
                results: results
                    .into_iter()
                    .map(|r| {
                        (
                            r.lease,
                            r.result.map_err(crate::sandbox::UnitError::bounded),
                        )
                    })
                    .collect(),
                want,
            },
            Ok(Some(JobFrame::Decline { job: j, leases })) if j == job => {
                NetEvent::Declined { peer, leases }
            }
            Ok(Some(JobFrame::BlobGet { digest })) => {
                if let Some(holder) = blobs.holder_for(peer, digest) {
                    let at = JobFrame::BlobAt {
                        digest,
                        peer: holder,
                    };
                    if outbox.send(&at).await.is_err() {
                        break;
                    }
                    continue;
                }
                let read = Arc::clone(&blobs);
                let mut bytes = tokio::task::spawn_blocking(move || read.bytes(&digest))
                    .await
                    .ok()
                    .flatten();
                if bytes.is_some() {
                    let sent = sends.entry(digest).or_default();
                    *sent += 1;
                    if *sent > MAX_SENDS_PER_BLOB {
                        // Asked for again and again: answered as missing, so the worker declines
                        // what needs it and its units go elsewhere.
                        bytes = None;
                    }
                }
                let bytes = bytes.map(|b| bytes::Bytes::from_owner(SharedInput(b)));
                let len = bytes.as_ref().map_or(0, |b| b.len() as u64);
                if !send_blob(&outbox, digest, bytes).await {
                    break;
                }
                blobs.traffic.blob_payload(len, 0);
                continue;
            }
            Ok(Some(JobFrame::BlobHeld { digest })) => {
                // Later fetchers may go to it. A worker that reached us by pulling may not be
                // dialable, and is never named.
                if let Some(addr) = holder_addr {
                    blobs.add_holder(digest, peer, addr);
                }
                continue;
            }
            Ok(Some(_)) => {
                tracing::warn!("worker sent a frame that has no place on this link; closing");
                quic.close(VarInt::from_u32(close::PROTOCOL), b"unexpected frame");
                break;
            }
            Ok(None) => break,
            Err(err) => {
                end_of_reading(err, &quic);
                break;
            }
        };
        if events.send(event).await.is_err() {
            break;
        }
    }
}

impl Workers for NetWorkers {
    fn refill(
        &mut self,
        scheduler: &mut Scheduler,
        job: &JobData,
        now: Instant,
        other: &mut dyn FnMut(Command),
    ) -> Result<(), JobError> {
        if now >= self.next_scan {
            self.scan(now)?;
        }
        let waiting: Vec<PeerId> = self.judged.keys().copied().collect();
        for peer in waiting {
            self.send_judged(peer);
        }
        route_commands(self, scheduler, job, other)
    }

    fn offer(&mut self, to: PeerId, leases: Vec<Lease>, job: &JobData) -> Result<(), JobError> {
        let now = Instant::now();
        let ids: Vec<LeaseId> = leases.iter().map(|l| l.id).collect();
        let Some(link) = self.links.get(&to) else {
            self.local.push(WorkerEvent::Declined {
                peer: to,
                leases: ids,
            });
            return Ok(());
        };
        let mut wire = Vec::with_capacity(leases.len());
        for l in &leases {
            // An input file's digest is known from the start: a large one is named, not read.
            let input = match job.source.known(u64::from(l.unit)) {
                Some((len, digest)) if len > MAX_INLINE_INPUT as u64 => {
                    self.blobs.offered(digest, l.unit, len);
                    InputRef::Blob { digest, len }
                }
                _ => {
                    let bytes = job.input(l.unit)?;
                    if bytes.len() <= MAX_INLINE_INPUT {
                        InputRef::Inline(bytes)
                    } else {
                        let (digest, len) = (Digest::of(&bytes), bytes.len() as u64);
                        self.blobs.offered(digest, l.unit, len);
                        InputRef::Blob { digest, len }
                    }
                }
            };
            wire.push(WireLease {
                id: l.id,
                unit: l.unit,
                attempt: l.attempt,
                ttl_ms: u64::try_from(l.deadline.saturating_duration_since(now).as_millis())
                    .unwrap_or(u64::MAX),
                input,
            });
        }
        let frame = JobFrame::Offer(Offer {
            job: self.job,
            name: self.name.clone(),
            spec: self.spec.clone(),
            leases: wire,
        });
        match link.outbox.try_send(&frame) {
            Ok(()) => {
                for id in ids {
                    self.outstanding.insert(id, to);
                }
            }
            Err(_) => {
                // A full outbox is a worker that does not keep up: give the leases back.
                self.local.push(WorkerEvent::Declined {
                    peer: to,
                    leases: ids,
                });
            }
        }
        Ok(())
    }

    fn judge(&mut self, to: PeerId, unit: u32, accepted: bool) {
        if !self.links.contains_key(&to) {
            return;
        }
        let (yes, no) = self.judged.entry(to).or_default();
        if accepted {
            yes.push(unit);
        } else {
            no.push(unit);
        }
        if yes.len() + no.len() >= MAX_IDS_PER_MESSAGE {
            self.send_judged(to);
        }
    }

    fn revoke(&mut self, to: PeerId, leases: Vec<LeaseId>, _job: &JobData) {
        for lease in &leases {
            self.outstanding.remove(lease);
        }
        if let Some(link) = self.links.get(&to) {
            let _ = link.outbox.try_send(&JobFrame::Revoke {
                job: self.job,
                leases,
            });
        }
    }

    fn wait(&mut self, until: Instant) -> Result<Vec<WorkerEvent>, JobError> {
        let mut out = std::mem::take(&mut self.local);
        let mut events = Vec::new();
        if out.is_empty() {
            let deadline =
                tokio::time::Instant::from_std(until.min(self.next_scan.max(Instant::now())));
            let (rx, pulls) = (&mut self.events_rx, &mut self.pulls);
            // A worker that pulled is served at once, not at the next scan: its link is the
            // job's start on a network that found it by its advert. (An inbox another job
            // took over is closed, and no longer waited on.)
            let pulls_open = !pulls.is_closed();
            let woken = self.runtime.block_on(async {
                tokio::time::timeout_at(deadline, async {
                    tokio::select! {
                        event = rx.recv() => event.map(Woken::Event),
                        link = pulls.recv(), if pulls_open => link.map(Woken::Pull),
                    }
                })
                .await
            });
            match woken {
                Ok(Some(Woken::Event(event))) => events.push(event),
                Ok(Some(Woken::Pull(link))) => self.adopt(link),
                Ok(None) | Err(_) => {}
            }
        }
        while let Ok(event) = self.events_rx.try_recv() {
            events.push(event);
        }
        while let Ok(link) = self.pulls.try_recv() {
            self.adopt(link);
        }
        for event in events {
            self.on_event(event, &mut out);
        }
        Ok(out)
    }

    fn running(&self) -> u32 {
        u32::try_from(self.outstanding.len()).unwrap_or(u32::MAX)
    }

    fn may_progress(&self) -> bool {
        true
    }

    fn simulated(&self) -> bool {
        false
    }

    fn allowed(&self) -> Vec<PeerId> {
        self.dialer
            .allow
            .as_ref()
            .map(|a| a.ids().copied().collect())
            .unwrap_or_default()
    }
}

/// What ended a wait of the job loop.
enum Woken {
    Event(NetEvent),
    Pull(PeerLink),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    /// Reports that the job loop has not taken yet hold at most the byte budget, whatever
    /// their count: a worker sending 4 MiB reports as fast as it can is held back by flow
    /// control once the budget is spent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_reports_are_bounded_in_bytes() {
        let config = NetConfig::default();
        let worker_id = Identity::generate().unwrap();
        let submitter_id = Identity::generate().unwrap();
        let worker_end =
            net::endpoint(&worker_id, None, "127.0.0.1:0".parse().unwrap(), &config).unwrap();
        let submitter_end =
            net::endpoint(&submitter_id, None, "127.0.0.1:0".parse().unwrap(), &config).unwrap();
        let at = submitter_end.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let incoming = submitter_end.accept().await.expect("incoming");
            (
                net::accept(incoming, &NetConfig::default()).await,
                submitter_end,
            )
        });
        let mut worker = net::dial_for(
            &worker_end,
            &worker_id,
            None,
            at,
            Some(submitter_id.id()),
            &config,
            LinkKind::Job,
        )
        .await
        .expect("dialed");
        let (accepted, _submitter_end) = accepting.await.unwrap();
        let link = accepted.expect("accepted");

        let job = Digest::of(b"reports");
        let blobs = Arc::new(Blobs::default());
        let (events_tx, mut events_rx) = mpsc::channel(EVENT_QUEUE);
        let (outbox, _rx) = Outbox::new(64, 1 << 20);
        let reader = tokio::spawn(async move {
            read_reports(
                worker_id.id(),
                0,
                job,
                link.conn,
                link.recv,
                outbox,
                (blobs, None),
                &events_tx,
            )
            .await;
        });
        // 40 reports of 4 MiB: 160 MiB against a 64 MiB budget. Nobody takes them.
        let sender = tokio::spawn(async move {
            for i in 0..40u64 {
                let report = JobFrame::Report {
                    job,
                    results: vec![crate::job::proto::WireResult {
                        lease: LeaseId(i),
                        result: Ok(vec![i as u8; 4 << 20]),
                    }],
                    want: 0,
                };
                if wire::write(&mut worker.send, &report).await.is_err() {
                    break;
                }
            }
            worker
        });
        // Until the worker has sent everything, or nothing more has been queued for 2 s.
        let (mut last, mut still_since) = (0, tokio::time::Instant::now());
        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
        while !sender.is_finished() && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if events_rx.len() != last {
                (last, still_since) = (events_rx.len(), tokio::time::Instant::now());
            } else if still_since.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        let mut queued = 0usize;
        let mut held = Vec::new();
        while let Ok(event) = events_rx.try_recv() {
            if let NetEvent::Report { results, _held, .. } = event {
                queued += results
                    .iter()
                    .map(|(_, r)| r.as_ref().map_or(0, Vec::len))
                    .sum::<usize>();
                held.push(_held);
            }
        }
        assert!(
            queued <= EVENT_BYTES,
            "{} MiB of reports queued for the job loop",
            queued >> 20
        );
        assert!(queued >= 8 << 20, "reports flow while the budget lasts");
        assert!(!sender.is_finished(), "the worker is held back");
        // Taken by the job loop, the budget comes back and the rest arrive.
        drop(held);
        let mut rest = 0;
        while rest < 40 * (4 << 20) - queued {
            match tokio::time::timeout(Duration::from_secs(10), events_rx.recv()).await {
                Ok(Some(NetEvent::Report { results, .. })) => {
                    rest += results
                        .iter()
                        .map(|(_, r)| r.as_ref().map_or(0, Vec::len))
                        .sum::<usize>();
                }
                Ok(Some(_)) => {}
                _ => panic!("the rest of the reports did not arrive"),
            }
        }
        let _worker = sender.await.unwrap();
        reader.abort();
    }

    #[test]
    fn one_holder_per_host_and_a_holder_fetchers_keep_coming_back_from_is_dropped() {
        let big = Arc::new(vec![7u8; SHARE_MIN]);
        let b = Digest::of(&big);
        let blobs = Blobs {
            map: [(b, big)].into_iter().collect(),
            ..Blobs::default()
        };
        let sybil: SocketAddr = "127.0.3.3:9".parse().unwrap();
        let honest: SocketAddr = "127.0.3.4:9".parse().unwrap();
        for n in 10..30 {
            blobs.add_holder(b, peer(n), sybil);
        }
        blobs.add_holder(b, peer(40), honest);
        let holders: Vec<(PeerId, SocketAddr)> = blobs.shared.lock().unwrap().holders[&b]
            .iter()
            .map(|h| (h.peer, h.addr))
            .collect();
        assert_eq!(holders, vec![(peer(10), sybil), (peer(40), honest)]);
        // Fetchers are sent to both in turn; those sent to the Sybil come back and are served
        // here. Its third miss drops it, and every later fetcher goes to the honest holder.
        let mut sent_to_sybil = 0;
        for fetcher in 1..=6 {
            match blobs.holder_for(peer(fetcher), b) {
                Some(p) if p == peer(10) => {
                    sent_to_sybil += 1;
                    assert_eq!(blobs.holder_for(peer(fetcher), b), None, "served here");
                }
                Some(p) => assert_eq!(p, peer(40)),
                None => panic!("a holder is named while one is left"),
            }
        }
        assert_eq!(sent_to_sybil, MAX_HOLDER_MISSES);
        for fetcher in 7..=10 {
            assert_eq!(blobs.holder_for(peer(fetcher), b), Some(peer(40)));
        }
    }

    #[test]
    fn large_blobs_go_to_holders_once_per_fetcher_and_small_ones_never() {
        let big = Arc::new(vec![7u8; SHARE_MIN]);
        let small = Arc::new(vec![1u8; 100]);
        let (b, s) = (Digest::of(&big), Digest::of(&small));
        let blobs = Blobs {
            map: [(b, big), (s, small)].into_iter().collect(),
            ..Blobs::default()
        };
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // No holder yet: served here.
        assert_eq!(blobs.holder_for(peer(1), b), None);
        blobs.add_holder(b, peer(1), addr);
        blobs.add_holder(s, peer(1), addr);
        // A holder: the next fetcher goes there, once; asking again is served here.
        assert_eq!(blobs.holder_for(peer(2), b), Some(peer(1)));
        assert_eq!(blobs.holder_for(peer(2), b), None);
        // The holder itself is never sent to itself; small blobs are always served here.
        assert_eq!(blobs.holder_for(peer(1), b), None);
        assert_eq!(blobs.holder_for(peer(3), s), None);
        let shared = blobs.shared.lock().unwrap();
        assert_eq!((shared.served, shared.sent_elsewhere), (4, 1));
    }
}
