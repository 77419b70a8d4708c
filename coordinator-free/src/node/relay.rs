//! Relay links over real connections (`crate::relay`): the relay service a public peer offers
//! (`worker run --relay`), the reservation a peer behind NAT keeps on its relay, and asking a
//! relay for an introduction before dialing a peer behind NAT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn::VarInt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::{Bootstrap, JobDialer};
use crate::budget::Budget;
use crate::control::RelayServing;
use crate::host::Host;
use crate::net::{self, LinkKind, PeerLink, Puncher, close};
use crate::peer_id::PeerId;
use crate::reach::Vouch;
use crate::relay::{Forward, Limits, Refusal, RelayBook, RelayMessage, RelayRef};
use crate::wire::{self, Frame};

/// Relay links one host may hold open at a relay at once (reservations and askers together).
const LINKS_PER_HOST: usize = 8;
/// Messages queued towards one relay link (a circuit's datagrams among them); a link that does
/// not read them loses its messages.
const OUTBOX: usize = 64;
/// How long a relay answers within, and a new link has to say what it wants.
const ANSWER_WAIT: Duration = Duration::from_secs(3);
/// How long after the relay's answer an asker dials, so the reserved peer's punch (sent as the
/// relay tells it, a moment before the asker hears back) has left its NAT first.
const PUNCH_LEAD: Duration = Duration::from_millis(150);
/// Introductions a reserved peer acts on per second, and in a burst: each makes it send
/// datagrams, and a relay it chose may still be hostile.
const PUNCH_RATE: f64 = 2.0;
const PUNCH_BURST: f64 = 4.0;
/// Back-off between attempts to get a reservation back, first and longest.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Why a relay could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot reach the relay")]
    Net(#[from] net::NetError),
    #[error("the relay refused: {0}")]
    Refused(Refusal),
    #[error("the relay did not answer in time")]
    Timeout,
    #[error("the relay closed the link or answered out of turn")]
    Unexpected,
}

/// Where the relay service takes its new links.
#[derive(Debug, Clone)]
pub(super) struct RelayService {
    links: mpsc::Sender<PeerLink>,
    /// What the service holds, for status.
    pub(super) serving: watch::Receiver<RelayServing>,
}

impl RelayService {
    /// Starts the service on `tasks`.
    pub(super) fn spawn(limits: Limits, tasks: &mut JoinSet<()>) -> Self {
        let (links, rx) = mpsc::channel(32);
        let (counts, serving) = watch::channel(RelayServing::default());
        tasks.spawn(serve(limits, rx, counts).instrument(tracing::debug_span!("relay")));
        Self { links, serving }
    }

    /// Hands an accepted relay link to the service; a busy service closes it.
    pub(super) fn offer(&self, link: PeerLink) {
        if let Err(err) = self.links.try_send(link) {
            let link = err.into_inner();
            link.conn.close(VarInt::from_u32(close::NORMAL), b"busy");
        }
    }
}

/// How long a relay link may stay open holding neither a reservation nor a circuit (an asker
/// hears back within a moment and closes): idle links would otherwise use up the relay's.
const IDLE_LINK: Duration = Duration::from_secs(30);

/// A relay link the service holds.
struct Held {
    since: Instant,
    peer: PeerId,
    addr: SocketAddr,
    host: Host,
    conn: quinn::Connection,
    out: mpsc::Sender<RelayMessage>,
    connects: Budget,
}

/// The relay service: one owner for the reservations and the links they live on.
async fn serve(
    limits: Limits,
    mut new_links: mpsc::Receiver<PeerLink>,
    counts: watch::Sender<RelayServing>,
) {
    let mut book = RelayBook::new(limits);
    let mut held: HashMap<u64, Held> = HashMap::new();
    let mut next = 0u64;
    let (events_tx, mut events) = mpsc::channel::<(u64, Option<RelayMessage>)>(64);
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            link = new_links.recv() => {
                let Some(link) = link else { return };
                let host = Host::of(link.addr.ip());
                let same_host = held.values().filter(|h| h.host == host).count();
                if held.len() >= limits.max_links || same_host >= LINKS_PER_HOST {
                    link.conn.close(VarInt::from_u32(close::NORMAL), b"relay busy");
                    continue;
                }
                let id = next;
                next += 1;
                let (out, rx) = mpsc::channel(OUTBOX);
                tasks.spawn(write_loop(link.send, rx));
                tasks.spawn(read_loop(id, link.recv, link.conn.clone(), events_tx.clone()));
                tracing::debug!(peer = %link.peer, addr = %link.addr, "relay link");
                held.insert(id, Held {
                    since: Instant::now(),
                    peer: link.peer,
                    addr: link.addr,
                    host,
                    conn: link.conn,
                    out,
                    connects: Budget::new(limits.connect_rate, limits.connect_burst, Instant::now()),
                });
            }
            Some((id, msg)) = events.recv() => {
                on_message(&mut book, &mut held, id, msg, Instant::now());
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let mut ended = book.expire(now);
                ended.extend(
                    held.iter()
                        .filter(|(id, h)| h.since + IDLE_LINK < now && !book.holds(**id))
                        .map(|(id, _)| *id),
                );
                close_links(&mut held, &mut book, ended, b"time is up");
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
        let now = RelayServing {
            reservations: book.len(),
            circuits: book.circuits(),
            links: held.len(),
        };
        counts.send_if_modified(|c| std::mem::replace(c, now) != now);
    }
}

/// One message from relay link `id`, or its end (`None`).
fn on_message(
    book: &mut RelayBook,
    held: &mut HashMap<u64, Held>,
    id: u64,
    msg: Option<RelayMessage>,
    now: Instant,
) {
    let Some(msg) = msg else {
        held.remove(&id);
        let others = book.closed(id);
        close_links(held, book, others, b"circuit over");
        return;
    };
    // Datagrams first: they are most of what a circuit carries.
    if let RelayMessage::Data(datagram) = msg {
        match book.forward(id, datagram.len()) {
            // A full outbox drops the datagram, as a full router queue would; QUIC resends.
            Forward::To(other) => {
                if let Some(h) = held.get(&other) {
                    let _ = h.out.try_send(RelayMessage::Data(datagram));
                }
            }
            Forward::Over(links) => close_links(held, book, links, b"circuit used up"),
            Forward::Stray => close_links(held, book, vec![id], b"no circuit here"),
        }
        return;
    }
    let Some(link) = held.get_mut(&id) else {
        return;
    };
    let (peer, addr) = (link.peer, link.addr);
    let answer = match msg {
        RelayMessage::Reserve => match book.reserve(id, peer, addr, now) {
            Ok(time) => {
                tracing::info!(%peer, %addr, "reservation held");
                RelayMessage::Reserved {
                    observed: addr,
                    secs: u32::try_from(time.as_secs()).unwrap_or(u32::MAX),
                }
            }
            Err(refusal) => RelayMessage::Refused(refusal),
        },
        RelayMessage::Connect { target } => {
            if !link.connects.take(now) {
                RelayMessage::Refused(Refusal::RateLimited)
            } else {
                match book.connect(peer, target, now) {
                    Ok(intro) => {
                        // The reserved peer first, so its punch leaves before the asker dials.
                        if let Some(t) = held.get(&intro.target_link) {
                            let _ = t.out.try_send(RelayMessage::Introduce { from: peer, addr });
                        }
                        tracing::debug!(from = %peer, to = %target, "introduced");
                        RelayMessage::Meet {
                            target,
                            addr: intro.target_addr,
                        }
                    }
                    Err(refusal) => RelayMessage::Refused(refusal),
                }
            }
        }
        RelayMessage::Circuit { target } => {
            if !link.connects.take(now) {
                RelayMessage::Refused(Refusal::RateLimited)
            } else {
                match book.open_circuit(id, peer, addr, target, now) {
                    Ok((target_link, token)) => {
                        if let Some(t) = held.get(&target_link) {
                            let _ = t.out.try_send(RelayMessage::CircuitFrom {
                                from: peer,
                                addr,
                                token,
                            });
                        }
                        tracing::debug!(from = %peer, to = %target, "circuit asked for");
                        // The asker hears `CircuitOpen` once the reserved peer joins.
                        return;
                    }
                    Err(refusal) => RelayMessage::Refused(refusal),
                }
            }
        }
        RelayMessage::JoinCircuit { token } => match book.join_circuit(id, peer, token, now) {
            Ok(asker) => {
                if let Some(a) = held.get(&asker) {
                    let _ = a.out.try_send(RelayMessage::CircuitOpen);
                }
                tracing::info!(%peer, "circuit carried");
                RelayMessage::CircuitOpen
            }
            Err(refusal) => RelayMessage::Refused(refusal),
        },
        // Only a relay says these.
        RelayMessage::Reserved { .. }
        | RelayMessage::Meet { .. }
        | RelayMessage::Introduce { .. }
        | RelayMessage::Refused(_)
        | RelayMessage::CircuitFrom { .. }
        | RelayMessage::CircuitOpen
        | RelayMessage::Data(_) => {
            close_links(held, book, vec![id], b"unexpected frame");
            return;
        }
    };
    if let Some(h) = held.get(&id) {
        let _ = h.out.try_send(answer);
    }
}

/// Closes `links`, and whatever circuits they carried.
fn close_links(held: &mut HashMap<u64, Held>, book: &mut RelayBook, links: Vec<u64>, why: &[u8]) {
    let mut pending = links;
    while let Some(id) = pending.pop() {
        if let Some(h) = held.remove(&id) {
            h.conn.close(VarInt::from_u32(close::NORMAL), why);
        }
        pending.extend(book.closed(id));
    }
}

async fn write_loop(mut send: quinn::SendStream, mut rx: mpsc::Receiver<RelayMessage>) {
    while let Some(msg) = rx.recv().await {
        if wire::write(&mut send, &Frame::Relay(msg)).await.is_err() {
            return;
        }
    }
}

async fn read_loop(
    id: u64,
    mut recv: quinn::RecvStream,
    conn: quinn::Connection,
    events: mpsc::Sender<(u64, Option<RelayMessage>)>,
) {
    loop {
        match wire::read::<Frame, _>(&mut recv).await {
            Ok(Some(Frame::Relay(msg))) => {
                if events.send((id, Some(msg))).await.is_err() {
                    return;
                }
            }
            Ok(Some(_)) => {
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
    let _ = events.send((id, None)).await;
}

/// Sends `question` on `link` and reads the relay's answer within `wait`. A refusal is an
/// error; whatever goes wrong, the link is closed.
async fn ask(
    mut link: PeerLink,
    question: RelayMessage,
    wait: Duration,
) -> Result<(PeerLink, RelayMessage), RelayError> {
    let answer = async {
        wire::write(&mut link.send, &Frame::Relay(question))
            .await
            .map_err(|e| RelayError::Net(e.into()))?;
        match tokio::time::timeout(wait, wire::read::<Frame, _>(&mut link.recv)).await {
            Ok(Ok(Some(Frame::Relay(RelayMessage::Refused(refusal))))) => {
                Err(RelayError::Refused(refusal))
            }
            Ok(Ok(Some(Frame::Relay(msg)))) => Ok(msg),
            Ok(_) => Err(RelayError::Unexpected),
            Err(_) => Err(RelayError::Timeout),
        }
    }
    .await;
    match answer {
        Ok(msg) => Ok((link, msg)),
        Err(err) => {
            link.conn
                .close(VarInt::from_u32(close::NORMAL), b"no answer");
            Err(err)
        }
    }
}

/// Asks for a reservation on `link`, a relay link just dialed: the link, held, and the address
/// the relay sees this peer at.
async fn reserve(link: PeerLink) -> Result<(PeerLink, SocketAddr), RelayError> {
    match ask(link, RelayMessage::Reserve, ANSWER_WAIT).await? {
        (link, RelayMessage::Reserved { observed, .. }) => Ok((link, observed)),
        (link, _) => {
            link.conn
                .close(VarInt::from_u32(close::PROTOCOL), b"out of turn");
            Err(RelayError::Unexpected)
        }
    }
}

/// Keeps a reservation: punches towards whoever the relay introduces, joins the circuits asked
/// of it (their links go to the node through `inputs`, as accepted ones do), and when the link
/// ends reserves again (with back-off) on a new one. `held` says, while a reservation holds,
/// the relay's id and where it sees this peer.
pub(super) async fn keep_reservation(
    first: Option<(PeerLink, SocketAddr)>,
    relay: Bootstrap,
    dialer: JobDialer,
    puncher: Puncher,
    inputs: mpsc::Sender<super::Input>,
    held: watch::Sender<Option<(PeerId, SocketAddr)>>,
) {
    let mut relay_id = relay.peer;
    let first_seen = first.as_ref().map(|(_, observed)| *observed);
    let mut first = first;
    let mut punches = Budget::new(PUNCH_RATE, PUNCH_BURST, Instant::now());
    let mut retry = FIRST_RETRY;
    loop {
        let (mut link, observed) = match first.take() {
            Some(first) => first,
            None => reserve_again(&dialer, relay, relay_id, &mut retry).await,
        };
        if first_seen.is_some_and(|was| was != observed) {
            tracing::warn!(
                now = %observed,
                "the relay sees this peer at a new address; peers are told the old one until it restarts"
            );
        }
        relay_id = Some(link.peer);
        held.send_replace(Some((link.peer, observed)));
        loop {
            match wire::read::<Frame, _>(&mut link.recv).await {
                Ok(Some(Frame::Relay(RelayMessage::Introduce { from, addr }))) => {
                    if punches.take(Instant::now()) {
                        tracing::debug!(%from, %addr, "opening the NAT to an introduced peer");
                        puncher.punch(addr).await;
                    }
                }
                Ok(Some(Frame::Relay(RelayMessage::CircuitFrom { from, addr, token }))) => {
                    if punches.take(Instant::now()) {
                        let (dialer, inputs) = (dialer.clone(), inputs.clone());
                        let relay_at = (relay.addr, link.peer);
                        tokio::spawn(async move {
                            if let Err(err) =
                                join_circuit(&dialer, relay_at, token, from, addr, inputs).await
                            {
                                tracing::info!(%from, err = %super::error_chain(&err), "circuit through the relay not joined");
                            }
                        });
                    }
                }
                // Refusals of nothing asked, and anything else, end the link.
                _ => break,
            }
        }
        link.conn
            .close(VarInt::from_u32(close::NORMAL), b"reservation ended");
        held.send_replace(None);
        tracing::info!("reservation on the relay ended; reserving again");
    }
}

/// Dials the relay and reserves, with back-off between attempts, until it holds.
async fn reserve_again(
    dialer: &JobDialer,
    relay: Bootstrap,
    relay_id: Option<PeerId>,
    retry: &mut Duration,
) -> (PeerLink, SocketAddr) {
    loop {
        tokio::time::sleep(*retry).await;
        *retry = (*retry * 2).min(MAX_RETRY);
        let link = match dialer
            .dial_vouched(relay.addr, relay_id, LinkKind::Relay, Vouch::Bootstrap)
            .await
        {
            Ok(link) => link,
            Err(err) => {
                tracing::debug!(err = %super::error_chain(&err), "relay unreachable");
                continue;
            }
        };
        match reserve(link).await {
            Ok((link, observed)) => {
                *retry = FIRST_RETRY;
                tracing::info!(%observed, "reservation held again");
                return (link, observed);
            }
            Err(err) => tracing::debug!(%err, "reservation refused"),
        }
    }
}

/// The reservation a peer behind NAT takes at start, before it knows what address to
/// advertise: a link dialed straight from the endpoint, and the address the relay sees.
pub(super) async fn first_reservation(
    endpoint: &quinn::Endpoint,
    identity: &crate::identity::Identity,
    allow: Option<std::sync::Arc<crate::identity::AllowList>>,
    config: &net::NetConfig,
    relay: Bootstrap,
) -> Result<(PeerLink, SocketAddr), RelayError> {
    let link = net::dial_for(
        endpoint,
        identity,
        allow,
        relay.addr,
        relay.peer,
        config,
        LinkKind::Relay,
    )
    .await?;
    let (link, observed) = reserve(link).await?;
    tracing::info!(relay = %relay.addr, %observed, "reservation held; advertising the address the relay sees");
    Ok((link, observed))
}

/// Which path a link to a peer behind NAT took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    /// Dialed directly, through the hole the peer punched after the relay's introduction.
    Direct,
    /// Through a circuit the relay carries (the punch did not get through).
    Relayed,
}

/// Opens a link of `kind` to `target`, a peer behind NAT that holds a reservation on `relay`:
/// asks the relay for an introduction, dials the target directly once its punch has left, and
/// when that fails asks the relay for a circuit and dials through it. Never dials the target
/// without an introduction (an unasked packet spoils its NAT's next hole, see `Node::start`).
pub(super) async fn dial_behind_nat(
    dialer: &JobDialer,
    relay: RelayRef,
    target: PeerId,
    kind: LinkKind,
) -> Result<(PeerLink, Path), RelayError> {
    let link = dialer.dial(relay.addr, relay.peer, LinkKind::Relay).await?;
    let addr = match ask(link, RelayMessage::Connect { target }, ANSWER_WAIT).await? {
        (link, RelayMessage::Meet { target: t, addr }) if t == target => {
            link.conn.close(VarInt::from_u32(close::NORMAL), b"thanks");
            addr
        }
        (link, _) => {
            link.conn
                .close(VarInt::from_u32(close::PROTOCOL), b"out of turn");
            return Err(RelayError::Unexpected);
        }
    };
    tokio::time::sleep(PUNCH_LEAD).await;
    let direct = match dialer.dial(addr, target, kind).await {
        Ok(link) => return Ok((link, Path::Direct)),
        Err(err) => err,
    };
    tracing::info!(peer = %target, %addr, err = %super::error_chain(&direct), "no direct path through NAT; asking the relay for a circuit");
    let link = dialer.dial(relay.addr, relay.peer, LinkKind::Relay).await?;
    let link = circuit(link, RelayMessage::Circuit { target }).await?;
    let endpoint = endpoint_through(dialer, link, addr, false)?;
    let link = net::dial_for(
        &endpoint,
        &dialer.identity,
        dialer.allow.clone(),
        addr,
        Some(target),
        &dialer.net,
        kind,
    )
    .await?;
    Ok((link, Path::Relayed))
}

/// How long a circuit takes to open: the reserved peer dials the relay and joins it.
const CIRCUIT_WAIT: Duration = Duration::from_secs(10);

/// Asks with `question` (`Circuit` or `JoinCircuit`) on a relay link just dialed, and waits
/// for the relay to say the circuit is open; the link, now one end of the circuit.
async fn circuit(link: PeerLink, question: RelayMessage) -> Result<PeerLink, RelayError> {
    match ask(link, question, CIRCUIT_WAIT).await? {
        (link, RelayMessage::CircuitOpen) => Ok(link),
        (link, _) => {
            link.conn
                .close(VarInt::from_u32(close::PROTOCOL), b"out of turn");
            Err(RelayError::Unexpected)
        }
    }
}

/// A QUIC endpoint of this peer's own over the circuit `link` is an end of, reaching `remote`
/// (the other end, named by the address the relay saw it at); it accepts when `serve`. The
/// connection inside is end to end between the two peers.
fn endpoint_through(
    dialer: &JobDialer,
    link: PeerLink,
    remote: SocketAddr,
    serve: bool,
) -> Result<quinn::Endpoint, RelayError> {
    let socket = super::circuit::carry(link, remote);
    Ok(net::endpoint_on(
        &dialer.identity,
        dialer.allow.clone(),
        socket,
        &dialer.net,
        serve,
    )?)
}

/// Joins circuit `token` the relay at `relay` asked for on behalf of `from` (seen at
/// `from_addr`), and accepts the one connection `from` opens through it.
async fn join_circuit(
    dialer: &JobDialer,
    relay: (SocketAddr, PeerId),
    token: u64,
    from: PeerId,
    from_addr: SocketAddr,
    inputs: mpsc::Sender<super::Input>,
) -> Result<(), RelayError> {
    let link = dialer.dial(relay.0, relay.1, LinkKind::Relay).await?;
    let link = circuit(link, RelayMessage::JoinCircuit { token }).await?;
    let endpoint = endpoint_through(dialer, link, from_addr, true)?;
    let incoming = tokio::time::timeout(CIRCUIT_WAIT, endpoint.accept())
        .await
        .map_err(|_| RelayError::Timeout)?
        .ok_or(RelayError::Unexpected)?;
    let link = net::accept(incoming, &dialer.net).await?;
    if link.peer != from {
        link.conn
            .close(VarInt::from_u32(close::PROTOCOL), b"not who asked");
        return Err(RelayError::Unexpected);
    }
    tracing::info!(peer = %from, "relayed path opened through a circuit");
    let _ = inputs.send(super::Input::Established(link)).await;
    Ok(())
}
