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
    ALPN, AllowList, BLOB_ALPN, Identity, IdentityError, JOB_ALPN, OVERLAY_ALPN, PULL_ALPN,
    RELAY_ALPN, SERVER_NAME, SURVEY_ALPN, connection_peer_id,
};
use crate::membership::MAX_MESSAGE_BYTES;
use crate::peer_id::PeerId;
use crate::traffic::Traffic;
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
#[derive(Debug, Clone)]
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
    /// Where every link dialed or accepted with this configuration counts its bytes; clones
    /// of a configuration count into the same meter.
    pub traffic: Traffic,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(6),
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 64,
            traffic: Traffic::default(),
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
    /// The partial-view overlay: neighbours, and short-lived links for shuffle replies.
    Overlay,
    /// One survey question and its answer (`worker status --all`).
    Survey,
    /// A reservation on a relay, or a request to be introduced to a peer that holds one.
    Relay,
}

impl LinkKind {
    fn alpn(self) -> &'static [u8] {
        match self {
            LinkKind::Membership => ALPN,
            LinkKind::Job => JOB_ALPN,
            LinkKind::Pull => PULL_ALPN,
            LinkKind::Blob => BLOB_ALPN,
            LinkKind::Overlay => OVERLAY_ALPN,
            LinkKind::Survey => SURVEY_ALPN,
            LinkKind::Relay => RELAY_ALPN,
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

/// Largest UDP payload this endpoint accepts, and the most a loopback path is probed up to:
/// loopback's 65,536-byte MTU less the IPv6 and UDP headers.
const LOOPBACK_MAX_PAYLOAD: u16 = 65_488;

/// Whether `addr` is on this host's loopback interface (an IPv4-mapped one too).
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// The transport of a link of `kind` this peer dials to `remote`, or (with `None`) of one it
/// accepts.
///
/// A job, pull or blob link dialed on loopback probes its path up to the loopback MTU: a blob
/// then crosses in datagrams of about 64 KiB instead of 1,452 bytes, forty times fewer
/// packets to build, encrypt, send, receive and acknowledge. Segmentation offload is off on
/// such a path, since a batch of even two datagrams that size is over the 64 KiB the kernel
/// sends at once. Probing that far sends about half a megabyte of padding on a new
/// connection (and again every ten minutes), worth it for a link that carries blobs, not for
/// a membership link that carries a few hundred bytes a second; and the accepting side
/// cannot tell the kinds apart when its transport is chosen (before the handshake names the
/// protocol), so it keeps the default, as every other path does: discovery up to 1,452
/// bytes, with offload. The dialer of a job link is the side that sends its bulk (a
/// submitter serving inputs on the links it dials); a submitter accepts loopback connections
/// under [`bulk_server_config`] while it serves a job, so the pull links workers dial to it
/// carry its inputs in large datagrams too; blob links carry theirs to the dialer in
/// default-sized datagrams.
fn transport(
    config: &NetConfig,
    dialed: Option<(SocketAddr, LinkKind)>,
) -> Result<Arc<TransportConfig>, NetError> {
    let mut t = TransportConfig::default();
    if let Some((remote, kind)) = dialed
        && matches!(kind, LinkKind::Job | LinkKind::Pull | LinkKind::Blob)
        && is_loopback(remote)
    {
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(LOOPBACK_MAX_PAYLOAD);
        t.mtu_discovery_config(Some(mtu));
        t.enable_segmentation_offload(false);
    }
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
    endpoint_and_puncher(identity, allow, listen, config).map(|(endpoint, _)| endpoint)
}

/// [`endpoint`], with a [`Puncher`] that sends from the endpoint's own socket.
pub fn endpoint_and_puncher(
    identity: &Identity,
    allow: Option<Arc<AllowList>>,
    listen: SocketAddr,
    config: &NetConfig,
) -> Result<(quinn::Endpoint, Puncher), NetError> {
    let server = server_config(identity, allow, config)?;
    let bind = |source| NetError::Bind {
        addr: listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(listen).map_err(bind)?;
    widen_socket_buffers(&socket);
    let puncher = Puncher {
        socket: Arc::new(socket.try_clone().map_err(bind)?),
    };
    // What the endpoint accepts is not what it sends: its own datagrams grow past 1,452 bytes
    // only on a loopback path (`transport`).
    let mut endpoint = quinn::EndpointConfig::default();
    endpoint
        .max_udp_payload_size(LOOPBACK_MAX_PAYLOAD)
        .map_err(|_| NetError::Bind {
            addr: listen,
            source: std::io::Error::other("payload size out of range"),
        })?;
    let endpoint = quinn::Endpoint::new(
        endpoint,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind)?;
    Ok((endpoint, puncher))
}

/// Hop limit of the datagrams that open a NAT: enough to leave this peer's own NAT (the first
/// hop or two), too few to reach the other side. A punch that arrived there would make the
/// other NAT remember an unanswered flow from us, and a Linux NAT then gives the other peer's
/// own outgoing packets towards us a different port, which closes the hole being made.
pub const PUNCH_TTL: u8 = 2;
/// Datagrams sent per punch, and the pause between them.
pub const PUNCHES: u32 = 3;
pub const PUNCH_GAP: Duration = Duration::from_millis(20);

/// Sends the datagrams that open this peer's NAT towards a peer about to dial it, from the
/// QUIC endpoint's own socket (the NAT maps that socket's port, so the hole is the one the
/// dial arrives at). The payload is four zero bytes: not a QUIC packet, dropped unread by any
/// endpoint it reaches.
#[derive(Debug, Clone)]
pub struct Puncher {
    socket: Arc<std::net::UdpSocket>,
}

impl Puncher {
    /// Sends [`PUNCHES`] datagrams to `to` with a hop limit of [`PUNCH_TTL`].
    pub async fn punch(&self, to: SocketAddr) {
        for n in 0..PUNCHES {
            if n > 0 {
                tokio::time::sleep(PUNCH_GAP).await;
            }
            if let Err(err) = self.send_short(to) {
                tracing::debug!(%to, %err, "punch not sent");
                return;
            }
        }
    }

    /// One datagram with the short hop limit, set on that datagram alone (a control message),
    /// so the endpoint's own packets sent meanwhile keep the default.
    #[cfg(target_os = "linux")]
    fn send_short(&self, to: SocketAddr) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let local_v6 = self.socket.local_addr()?.is_ipv6();
        let to = match (to, local_v6) {
            (SocketAddr::V4(v4), true) => {
                SocketAddr::new(std::net::IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            (SocketAddr::V6(v6), false) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(std::net::IpAddr::V4(v4), v6.port()),
                None => return Err(std::io::Error::other("an IPv6 address on an IPv4 socket")),
            },
            (to, _) => to,
        };
        let payload = [0u8; 4];
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: sockaddr_storage is plain data, valid when zeroed.
        let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let name_len = match to {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write((&raw mut name).cast(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { std::ptr::write((&raw mut name).cast(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        let (level, kind) = if to.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_TTL)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT)
        };
        let hops = libc::c_int::from(PUNCH_TTL);
        // Room for one control message carrying a c_int, aligned as cmsghdr wants.
        let mut control = [0u64; 4];
        // SAFETY: CMSG_SPACE is pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) };
        // SAFETY: msghdr is plain data, valid when zeroed.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut name).cast();
        msg.msg_namelen = name_len as libc::socklen_t;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `control`, 32 bytes, more than CMSG_SPACE(4); the
        // header CMSG_FIRSTHDR returns lies inside it, and so does CMSG_DATA's c_int.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = level;
            (*cmsg).cmsg_type = kind;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), hops);
        }
        // SAFETY: every pointer in `msg` refers to a live local of the right size.
        let sent = unsafe { libc::sendmsg(self.socket.as_raw_fd(), &raw const msg, 0) };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Elsewhere the punch goes with the socket's usual hop limit.
    #[cfg(not(target_os = "linux"))]
    fn send_short(&self, to: SocketAddr) -> std::io::Result<()> {
        self.socket.send_to(&[0u8; 4], to).map(|_| ())
    }
}

/// An endpoint over a socket of the caller's making (a relay's circuit), accepting
/// connections when `serve`. Its datagrams keep QUIC's initial size: the socket says it may
/// fragment, so no larger path is probed.
pub fn endpoint_on(
    identity: &Identity,
    allow: Option<Arc<AllowList>>,
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    config: &NetConfig,
    serve: bool,
) -> Result<quinn::Endpoint, NetError> {
    let server = if serve {
        Some(server_config(identity, allow, config)?)
    } else {
        None
    };
    let addr = socket
        .local_addr()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| NetError::Bind { addr, source })
}

/// The accepting side's configuration for connections from loopback while this peer serves a
/// job: they are mostly workers' pull links, over which this peer sends the job's inputs, so
/// they probe the path up to the loopback MTU as the links it dials for bulk do (see
/// [`transport`]). The padding this costs on the few other links accepted meanwhile stays on
/// the machine.
pub fn bulk_server_config(
    identity: &Identity,
    allow: Option<Arc<AllowList>>,
    config: &NetConfig,
) -> Result<Arc<quinn::ServerConfig>, NetError> {
    let mut server = server_config(identity, allow, config)?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    server.transport_config(transport(config, Some((loopback, LinkKind::Pull)))?);
    Ok(Arc::new(server))
}

/// The accepting side's configuration.
fn server_config(
    identity: &Identity,
    allow: Option<Arc<AllowList>>,
    config: &NetConfig,
) -> Result<quinn::ServerConfig, NetError> {
    let tls = identity.server_config(allow)?;
    let crypto = QuicServerConfig::try_from(Arc::new(tls)).map_err(NetError::QuicTls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport(config, None)?);
    // Peers dial by address and id; a migrating client is not something we need to follow.
    server.migration(false);
    Ok(server)
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
    client.transport_config(transport(config, Some((addr, kind)))?);
    let connecting = endpoint
        .connect_with(client, addr, SERVER_NAME)
        .map_err(|source| NetError::Connect { addr, source })?;
    let limit = config.handshake_timeout;
    tokio::time::timeout(limit, async {
        let conn = connecting.await?;
        greet(conn, false, &config.traffic).await
    })
    .await
    .map_err(|_| NetError::Timeout(limit))?
}

/// Completes an incoming connection.
pub async fn accept(incoming: quinn::Incoming, config: &NetConfig) -> Result<PeerLink, NetError> {
    accept_with(incoming, config, None).await
}

/// [`accept`] under `server` instead of the endpoint's own configuration, when given.
pub async fn accept_with(
    incoming: quinn::Incoming,
    config: &NetConfig,
    server: Option<Arc<quinn::ServerConfig>>,
) -> Result<PeerLink, NetError> {
    let limit = config.handshake_timeout;
    tokio::time::timeout(limit, async {
        let connecting = match server {
            Some(server) => incoming.accept_with(server)?,
            None => incoming.accept()?,
        };
        let conn = connecting.await?;
        greet(conn, true, &config.traffic).await
    })
    .await
    .map_err(|_| NetError::Timeout(limit))?
}

/// Exchanges hellos on freshly opened streams. Any failure closes the connection with a code
/// the remote can log. The connection's bytes count in `traffic` from here on, whatever the
/// greeting's outcome.
async fn greet(conn: Connection, inbound: bool, traffic: &Traffic) -> Result<PeerLink, NetError> {
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
            Some(p) if p == OVERLAY_ALPN => LinkKind::Overlay,
            Some(p) if p == SURVEY_ALPN => LinkKind::Survey,
            Some(p) if p == RELAY_ALPN => LinkKind::Relay,
            _ => LinkKind::Membership,
        };
        traffic.track(kind, &conn);
        if matches!(kind, LinkKind::Job | LinkKind::Pull | LinkKind::Blob) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_told_from_other_addresses() {
        for (addr, loopback) in [
            ("127.0.0.1:1", true),
            ("127.3.0.9:1", true),
            ("[::1]:1", true),
            ("[::ffff:127.0.0.1]:1", true),
            ("10.0.0.1:1", false),
            ("[::ffff:10.0.0.1]:1", false),
            ("[2001:db8::1]:1", false),
        ] {
            assert_eq!(is_loopback(addr.parse().unwrap()), loopback, "{addr}");
        }
    }

    /// A punch leaves from the endpoint's own port, with the short hop limit on the datagram
    /// (read back with IP_RECVTTL), and the socket's default hop limit is left as it was.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn punches_leave_from_the_endpoint_port_with_a_short_hop_limit() {
        use std::os::fd::AsRawFd;
        let identity = Identity::generate().unwrap();
        let (endpoint, puncher) = endpoint_and_puncher(
            &identity,
            None,
            "127.0.0.1:0".parse().unwrap(),
            &NetConfig::default(),
        )
        .unwrap();
        let target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        target
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let on: libc::c_int = 1;
        // SAFETY: a c_int option on the socket we own, its size passed alongside.
        let set = unsafe {
            libc::setsockopt(
                target.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVTTL,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
        puncher.punch(target.local_addr().unwrap()).await;
        let mut hops = Vec::new();
        for _ in 0..PUNCHES {
            let mut buf = [0u8; 16];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut control = [0u64; 8];
            // SAFETY: sockaddr_in is plain data, valid when zeroed.
            let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            // SAFETY: msghdr is plain data, valid when zeroed.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&raw mut from).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            // SAFETY: every pointer in `msg` refers to a live local of the size given.
            let got = unsafe { libc::recvmsg(target.as_raw_fd(), &raw mut msg, 0) };
            assert_eq!(got, 4, "a punch of four bytes arrives");
            assert_eq!(
                u16::from_be(from.sin_port),
                endpoint.local_addr().unwrap().port(),
                "from the endpoint's own port"
            );
            // SAFETY: the kernel filled `control` with `msg_controllen` bytes of messages.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
                assert!(!cmsg.is_null(), "the hop limit came with the datagram");
                hops.push(std::ptr::read_unaligned(
                    libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
                ));
            }
        }
        assert_eq!(hops, vec![libc::c_int::from(PUNCH_TTL); PUNCHES as usize]);
        let mut ttl: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reads a c_int option into a c_int of the size given.
        let got = unsafe {
            libc::getsockopt(
                puncher.socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_TTL,
                (&raw mut ttl).cast(),
                &raw mut len,
            )
        };
        assert_eq!(got, 0);
        assert!(ttl > 2, "the socket's own hop limit is untouched: {ttl}");
    }

    /// Sends on `send` (while the other side drains) until the path's datagrams have grown
    /// past what an Ethernet path carries, or 64 MiB have gone; the datagram size reached.
    async fn grow(conn: &Connection, send: &mut SendStream) -> u16 {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..64 {
            send.write_all(&chunk).await.expect("sent");
            let mtu = conn.stats().path.current_mtu;
            if mtu > 16_000 {
                return mtu;
            }
        }
        conn.stats().path.current_mtu
    }

    fn drain(mut recv: RecvStream) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 20];
            while let Ok(Some(_)) = recv.read(&mut buf).await {}
        })
    }

    /// The dialer of a loopback job link grows its datagrams to about the loopback MTU; the
    /// accepting side keeps the default path, and a membership link is not probed past it, so
    /// a link that carries little costs little.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_job_links_send_large_datagrams_from_the_dialer() {
        let config = NetConfig::default();
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        let a_end = endpoint(&a, None, "127.0.0.1:0".parse().unwrap(), &config).unwrap();
        // Bound to every address, as a peer usually is.
        let b_end = endpoint(&b, None, "0.0.0.0:0".parse().unwrap(), &config).unwrap();
        let at = SocketAddr::from(([127, 0, 0, 1], b_end.local_addr().unwrap().port()));
        let accepting = tokio::spawn(async move {
            let incoming = b_end.accept().await.expect("incoming");
            let link = accept(incoming, &NetConfig::default()).await;
            (link, b_end)
        });
        let dialed = dial_for(&a_end, &a, None, at, Some(b.id()), &config, LinkKind::Job)
            .await
            .expect("dialed");
        let (accepted, _b_end) = accepting.await.unwrap();
        let accepted = accepted.expect("accepted");
        let (mut a_send, mut b_send) = (dialed.send, accepted.send);
        let drains = [drain(dialed.recv), drain(accepted.recv)];
        let up = grow(&dialed.conn, &mut a_send).await;
        let down = grow(&accepted.conn, &mut b_send).await;
        assert!(
            up > 16_000,
            "dialing side's datagrams reached only {up} bytes"
        );
        assert!(
            down <= 1_452,
            "accepting side's datagrams reached {down} bytes"
        );
        dialed.conn.close(0u32.into(), b"done");
        for d in drains {
            let _ = d.await;
        }
    }
}
