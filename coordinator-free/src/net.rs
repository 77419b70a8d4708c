//! QUIC plumbing: the endpoint, and turning a dial or an incoming connection into an
//! authenticated, greeted [`PeerLink`].
//!
//! The TLS handshake (see [`crate::identity`]) establishes who the remote is; the hello that
//! follows checks that it speaks our protocol version. Only then does the node hand the link
//! to the membership state machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, RecvStream, SendStream, TransportConfig, VarInt};

use crate::identity::{
    ALPN, AllowList, BLOB_ALPN, Identity, IdentityError, JOB_ALPN, PULL_ALPN, SERVER_NAME,
    connection_peer_id,
};
use crate::membership::MAX_MESSAGE_BYTES;
use crate::peer_id::PeerId;
use crate::wire::{self, Frame, Hello, PROTOCOL_VERSION, WireError};

/// Application close codes, so a log on the other side says why a connection ended.
pub mod close {
    /// Orderly close: shuffle, at capacity, shutdown.
    pub const NORMAL: u32 = 0;
    /// The remote sent something we do not accept (bad frame, wrong version, extra hello).
    pub const PROTOCOL: u32 = 1;
    /// A second connection between the same two peers; the other one stays.
    pub const DUPLICATE: u32 = 2;
}

/// Connection timing and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Keep-alive pings, well below `idle_timeout` so a silent peer (crashed, unplugged) is
    /// noticed by the idle timer rather than by TCP-like retransmission back-off. Default 2 s.
    pub keep_alive: Duration,
    /// A connection with no traffic for this long is dead. Default 6 s.
    pub idle_timeout: Duration,
    /// Longest time from dial or accept to a greeted link. Default 5 s.
    pub handshake_timeout: Duration,
    /// Most handshakes in progress on the accepting side; more are refused, so a flood of
    /// connection attempts costs a bounded amount of work. Default 64.
    pub max_handshakes: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(6),
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 64,
        }
    }
}

/// Why a link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("TLS configuration unusable for QUIC")]
    QuicTls(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("idle timeout out of range")]
    IdleTimeout(#[source] quinn::VarIntBoundsExceeded),
    #[error("cannot start connecting to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("connection failed")]
    Connection(#[from] quinn::ConnectionError),
    #[error("handshake not finished within {0:?}")]
    Timeout(Duration),
    #[error("remote presented no usable identity")]
    NoPeerId,
    #[error("remote did not greet with a hello")]
    NoHello,
    #[error("remote speaks protocol version {theirs}, we speak {PROTOCOL_VERSION}")]
    Version { theirs: u16 },
    #[error("greeting failed")]
    Wire(#[from] WireError),
    #[error("stream closed during the greeting")]
    StreamClosed(#[from] quinn::ClosedStream),
    #[error("not dialing {addr}: {reason}")]
    Refused {
        addr: SocketAddr,
        reason: crate::reach::Refusal,
    },
}

impl NetError {
    /// Whether the remote sent something our protocol forbids (as opposed to a network or
    /// handshake failure), which deserves a louder log.
    pub fn is_protocol_violation(&self) -> bool {
        match self {
            NetError::NoHello | NetError::Version { .. } => true,
            NetError::Wire(err) => !matches!(err, WireError::Io(_)),
            _ => false,
        }
    }
}

/// What a connection is for, from the ALPN protocol its dialer chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// Membership gossip, managed by the membership state machine.
    Membership,
    /// One submitter's job traffic with one worker, dialed by the submitter.
    Job,
    /// The same, dialed by the worker: a worker asking a submitter for work.
    Pull,
    /// A worker fetching a blob from another worker that holds it.
    Blob,
}

impl LinkKind {
    fn alpn(self) -> &'static [u8] {
        match self {
            LinkKind::Membership => ALPN,
            LinkKind::Job => JOB_ALPN,
            LinkKind::Pull => PULL_ALPN,
            LinkKind::Blob => BLOB_ALPN,
        }
    }
}

/// An authenticated, greeted connection: the remote's id, and the one stream each way.
#[derive(Debug)]
pub struct PeerLink {
    pub conn: Connection,
    pub peer: PeerId,
    pub addr: SocketAddr,
    pub inbound: bool,
    pub kind: LinkKind,
    pub send: SendStream,
    pub recv: RecvStream,
}

/// Flow-control window of membership links.
const MEMBERSHIP_WINDOW: u32 = 4 * MAX_MESSAGE_BYTES as u32;
/// Flow-control window of job, pull and blob links: the bandwidth-delay product of a path
/// with 16 MiB in flight, 128 MB/s at 125 ms.
pub const LINK_WINDOW: u32 = 16 << 20;

fn transport(config: &NetConfig) -> Result<Arc<TransportConfig>, NetError> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(config.keep_alive));
    t.max_idle_timeout(Some(
        config
            .idle_timeout
            .try_into()
            .map_err(NetError::IdleTimeout)?,
    ));
    // One stream per direction is the whole protocol; refusing more keeps a peer from
    // opening thousands of streams that each hold buffers.
    t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    t.max_concurrent_uni_streams(VarInt::from_u32(1));
    // A connection starts with room for a few maximal membership messages, no more: flow
    // control then pushes back on a peer that sends faster than we read, and an unknown peer
    // can make us buffer little. Job, pull and blob links are opened up to `LINK_WINDOW` once
    // their protocol is known (`greet`); the stream window allows it from the start.
    t.stream_receive_window(VarInt::from_u32(LINK_WINDOW));
    t.receive_window(VarInt::from_u32(MEMBERSHIP_WINDOW));
    t.send_window(u64::from(LINK_WINDOW));
    t.datagram_receive_buffer_size(None);
    Ok(Arc::new(t))
}

/// The QUIC endpoint: listens on `listen` and dials from the same socket, so the address a
/// peer sees us dial from is the one it can dial back.
pub fn endpoint(
    identity: &Identity,
    allow: Option<Arc<AllowList>>,
    listen: SocketAddr,
    config: &NetConfig,
) -> Result<quinn::Endpoint, NetError> {
    let tls = identity.server_config(allow)?;
    let crypto = QuicServerConfig::try_from(Arc::new(tls)).map_err(NetError::QuicTls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport(config)?);
    // Peers dial by address and id; a migrating client is not something we need to follow.
    server.migration(false);
    let bind = |source| NetError::Bind {
        addr: listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(listen).map_err(bind)?;
    widen_socket_buffers(&socket);
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind)
}

/// Socket buffers asked of the kernel for the endpoint's UDP socket.
const SOCKET_BUFFER_BYTES: libc::c_int = 4 << 20;

/// A blob arrives as a burst of datagrams faster than one task can read them; the kernel's
/// default receive buffer (about 200 KiB) drops part of the burst, and QUIC takes the drops
/// for congestion and slows down. The kernel caps the request at `net.core.rmem_max` (and
/// `wmem_max`), so on a machine that allows less this asks for less, which is only slower.
fn widen_socket_buffers(socket: &std::net::UdpSocket) {
    #[cfg(unix)]
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        use std::os::fd::AsRawFd;
        let bytes = SOCKET_BUFFER_BYTES;
        // SAFETY: the descriptor is the open socket we own, and the option's value is a c_int
        // that lives across the call, with its size passed alongside.
        let failed = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const bytes).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } != 0;
        if failed {
            tracing::debug!(option, "socket buffer not widened");
        }
    }
    #[cfg(not(unix))]
    let _ = socket;
}

/// Dials `addr`; with `expected` set, the handshake fails unless the remote proves that id.
pub async fn dial(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    allow: Option<Arc<AllowList>>,
    addr: SocketAddr,
    expected: Option<PeerId>,
    config: &NetConfig,
) -> Result<PeerLink, NetError> {
    dial_for(
        endpoint,
        identity,
        allow,
        addr,
        expected,
        config,
        LinkKind::Membership,
    )
    .await
}

/// [`dial`] for a link of `kind`.
pub async fn dial_for(
    endpoint: &quinn::Endpoint,
    identity: &Identity,
    allow: Option<Arc<AllowList>>,
    addr: SocketAddr,
    expected: Option<PeerId>,
    config: &NetConfig,
    kind: LinkKind,
) -> Result<PeerLink, NetError> {
    let tls = identity.client_config_for(expected, allow, kind.alpn())?;
    let crypto = QuicClientConfig::try_from(Arc::new(tls)).map_err(NetError::QuicTls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport(config)?);
    let connecting = endpoint
        .connect_with(client, addr, SERVER_NAME)
        .map_err(|source| NetError::Connect { addr, source })?;
    let limit = config.handshake_timeout;
    tokio::time::timeout(limit, async {
        let conn = connecting.await?;
        greet(conn, false).await
    })
    .await
    .map_err(|_| NetError::Timeout(limit))?
}

/// Completes an incoming connection.
pub async fn accept(incoming: quinn::Incoming, config: &NetConfig) -> Result<PeerLink, NetError> {
    let limit = config.handshake_timeout;
    tokio::time::timeout(limit, async {
        let conn = incoming.accept()?.await?;
        greet(conn, true).await
    })
    .await
    .map_err(|_| NetError::Timeout(limit))?
}

/// Exchanges hellos on freshly opened streams. Any failure closes the connection with a code
/// the remote can log.
async fn greet(conn: Connection, inbound: bool) -> Result<PeerLink, NetError> {
    let result = async {
        let peer = connection_peer_id(&conn).ok_or(NetError::NoPeerId)?;
        let kind = match conn
            .handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol)
        {
            Some(p) if p == JOB_ALPN => LinkKind::Job,
            Some(p) if p == PULL_ALPN => LinkKind::Pull,
            Some(p) if p == BLOB_ALPN => LinkKind::Blob,
            _ => LinkKind::Membership,
        };
        if kind != LinkKind::Membership {
            conn.set_receive_window(VarInt::from_u32(LINK_WINDOW));
        }
        let mut send = conn.open_uni().await?;
        wire::write(&mut send, &Frame::Hello(Hello::current())).await?;
        let mut recv = conn.accept_uni().await?;
        match wire::read::<Frame, _>(&mut recv).await? {
            Some(Frame::Hello(hello)) if hello.version == PROTOCOL_VERSION => {}
            Some(Frame::Hello(hello)) => {
                return Err(NetError::Version {
                    theirs: hello.version,
                });
            }
            _ => return Err(NetError::NoHello),
        }
        Ok(PeerLink {
            addr: conn.remote_address(),
            conn: conn.clone(),
            peer,
            inbound,
            kind,
            send,
            recv,
        })
    }
    .await;
    if let Err(err) = &result {
        conn.close(
            VarInt::from_u32(close::PROTOCOL),
            err.to_string().as_bytes(),
        );
    }
    result
}
