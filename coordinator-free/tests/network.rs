//! Real-stack tests: nodes over QUIC on loopback in one process, mDNS off. Every wait is a
//! bounded poll.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::identity::{AllowList, Identity, SERVER_NAME};
use coordinator_free::net::{self, NetConfig, close};
use coordinator_free::node::{Bootstrap, BootstrapArg, Discovery, Node, NodeConfig};
use coordinator_free::peer_id::PeerId;
use coordinator_free::wire::{Frame, Hello, Message};
use quinn::crypto::rustls::QuicClientConfig;

const LOOPBACK: &str = "127.0.0.1:0";

/// Full tables: these tests check the membership tables (the overlay has `tests/overlay.rs`).
fn config(bootstrap: &[Bootstrap]) -> NodeConfig {
    let mut config = NodeConfig::new(LOOPBACK.parse().expect("addr"));
    config.discovery = Discovery::Table;
    config.mdns = false;
    config.bootstrap = bootstrap.to_vec();
    config.capacity.cores_donated = 2;
    config.capacity.cores_free = 1;
    config.capacity.memory_mb = 256;
    config
}

async fn start(bootstrap: &[Bootstrap]) -> Node {
    start_with(Identity::generate().expect("identity"), config(bootstrap)).await
}

async fn start_with(identity: Identity, config: NodeConfig) -> Node {
    Node::start(identity, config).await.expect("node starts")
}

fn via(node: &Node) -> Bootstrap {
    Bootstrap {
        addr: node.local_addr(),
        peer: Some(node.id()),
    }
}

async fn known(node: &Node) -> Vec<PeerId> {
    node.status()
        .await
        .expect("status")
        .peers
        .iter()
        .map(|p| p.id)
        .collect()
}

/// Polls `check` every 100 ms until it holds or `limit` passes; returns the time it took.
async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn everyone_knows_everyone(nodes: &[Node]) -> bool {
    for node in nodes {
        let mut peers = known(node).await;
        peers.sort();
        let mut others: Vec<PeerId> = nodes
            .iter()
            .map(Node::id)
            .filter(|id| *id != node.id())
            .collect();
        others.sort();
        if peers != others {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_peers_converge_over_quic() {
    let first = start(&[]).await;
    let mut nodes = vec![first];
    for _ in 1..10 {
        let seed = via(&nodes[0]);
        nodes.push(start(&[seed]).await);
    }
    let took = wait_until(Duration::from_secs(20), || everyone_knows_everyone(&nodes)).await;
    assert!(took.is_some(), "10 peers did not converge within 20 s");

    // Capacity travels with the adverts; every peer's connection count stays within the cap.
    let status = nodes[3].status().await.expect("status");
    assert_eq!(status.peers.len(), 9);
    assert!(
        status
            .peers
            .iter()
            .all(|p| p.cores_free == 1 && p.cores_donated == 2)
    );
    assert!(
        status
            .peers
            .iter()
            .all(|p| p.profile == coordinator_free::sandbox::PROFILE_VERSION)
    );
    for node in &nodes {
        let s = node.status().await.expect("status");
        assert!(s.connections <= 8, "{} connections", s.connections);
    }
    for node in nodes {
        node.shutdown().await;
    }
}

/// A bootstrap peer named by host name is looked up again at each retry: a peer that started
/// before it, with a name that never resolves beside it, joins it once it is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_host_name_is_joined_once_its_peer_is_up() {
    // A port nobody listens on yet.
    let port = std::net::UdpSocket::bind(LOOPBACK)
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let first_identity = Identity::generate().expect("identity");
    let first_id = first_identity.id();
    let mut late = config(&[]);
    late.membership.bootstrap_retry = Duration::from_millis(300);
    for arg in [
        // RFC 6761: names under .invalid never resolve.
        "no-such-peer.invalid:7401".to_owned(),
        format!("{first_id}@localhost:{port}"),
    ] {
        let arg: BootstrapArg = arg.parse().expect("a host name bootstrap");
        assert!(matches!(arg, BootstrapArg::Name(_)), "{arg}");
        late.add_bootstrap(arg);
    }
    let late = start_with(Identity::generate().expect("identity"), late).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(known(&late).await.is_empty());

    let mut first = config(&[]);
    first.listen = SocketAddr::from(([127, 0, 0, 1], port));
    let first = start_with(first_identity, first).await;
    let took = wait_until(Duration::from_secs(20), || async {
        known(&late).await == vec![first_id]
    })
    .await;
    assert!(
        took.is_some(),
        "the peer named localhost:{port} was not joined"
    );
    late.shutdown().await;
    first.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_peer_leaves_every_table_within_the_bound() {
    let first = start(&[]).await;
    let mut nodes = vec![first];
    for _ in 1..4 {
        let seed = via(&nodes[0]);
        nodes.push(start(&[seed]).await);
    }
    assert!(
        wait_until(Duration::from_secs(15), || everyone_knows_everyone(&nodes))
            .await
            .is_some(),
        "4 peers did not converge"
    );
    // Dropping the handle aborts the node at once, with no goodbye: a crash.
    let victim = nodes.pop().expect("a node");
    let victim_id = victim.id();
    drop(victim);
    let took = wait_until(Duration::from_secs(12), || async {
        for node in &nodes {
            if known(node).await.contains(&victim_id) {
                return false;
            }
        }
        true
    })
    .await;
    let took = took.expect("the killed peer stayed in some table for 12 s");
    assert!(took <= Duration::from_secs(10), "removal took {took:?}");
    // The survivors still know each other.
    assert!(everyone_knows_everyone(&nodes).await);
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_for_a_pinned_id_is_refused() {
    let target = start(&[]).await;
    let impostor_id = Identity::generate().expect("identity").id();

    // Directly: the dial fails in the handshake and says why.
    let dialer = Identity::generate().expect("identity");
    let endpoint = client_endpoint();
    let err = net::dial(
        &endpoint,
        &dialer,
        None,
        target.local_addr(),
        Some(impostor_id),
        &NetConfig::default(),
    )
    .await
    .expect_err("dial with the wrong pinned id must fail");
    let text = coordinator_free::node::error_chain(&err);
    assert!(text.contains("WrongPeer"), "{text}");

    // And through a node: bootstrapping with the wrong pin never links the two.
    let wrong = Bootstrap {
        addr: target.local_addr(),
        peer: Some(impostor_id),
    };
    let joiner = start(&[wrong]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(known(&joiner).await.is_empty());
    assert!(known(&target).await.is_empty());
    assert_eq!(joiner.status().await.expect("status").connections, 0);

    // The right pin works, so the refusal above was about the key.
    let right = net::dial(
        &endpoint,
        &dialer,
        None,
        target.local_addr(),
        Some(target.id()),
        &NetConfig::default(),
    )
    .await
    .expect("dial with the right pin");
    assert_eq!(right.peer, target.id());
    joiner.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_off_the_allow_list_is_refused() {
    let member = Identity::generate().expect("identity");
    let outsider = Identity::generate().expect("identity");
    let member_id = member.id();
    let mut lab = config(&[]);
    lab.allow = Some(AllowList::new([member_id]));
    let guarded = start_with(Identity::generate().expect("identity"), lab).await;

    // The outsider's handshake is refused by the guarded peer.
    let endpoint = client_endpoint();
    let refused = net::dial(
        &endpoint,
        &outsider,
        None,
        guarded.local_addr(),
        None,
        &NetConfig::default(),
    )
    .await;
    assert!(refused.is_err(), "an outsider got a link");

    // As nodes: the outsider never gets in, the member does.
    let outsider_node = start_with(outsider, config(&[via(&guarded)])).await;
    let member_node = start_with(member, config(&[via(&guarded)])).await;
    let joined = wait_until(Duration::from_secs(10), || async {
        known(&guarded).await == vec![member_id]
    })
    .await;
    assert!(joined.is_some(), "the allowed peer did not join");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(known(&guarded).await, vec![member_id]);
    assert!(!known(&outsider_node).await.contains(&guarded.id()));
    for node in [outsider_node, member_node, guarded] {
        node.shutdown().await;
    }
}

fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client(LOOPBACK.parse().expect("addr")).expect("client endpoint")
}

/// Connects with a valid identity but then speaks raw bytes on the stream.
async fn raw_connection(endpoint: &quinn::Endpoint, to: SocketAddr) -> quinn::Connection {
    let identity = Identity::generate().expect("identity");
    let tls = identity.client_config(None, None).expect("tls");
    let crypto = QuicClientConfig::try_from(Arc::new(tls)).expect("quic tls");
    let client = quinn::ClientConfig::new(Arc::new(crypto));
    endpoint
        .connect_with(client, to, SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_do_not_take_a_node_down() {
    let node = start(&[]).await;
    let endpoint = client_endpoint();
    let hello = Frame::Hello(Hello::current())
        .encode_frame()
        .expect("hello");
    let mut oversized = hello.clone();
    oversized.push(Frame::KIND_MEMBERSHIP);
    oversized.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut unknown = hello.clone();
    unknown.extend_from_slice(&[0xee, 0, 0, 0, 1, 0]);
    let mut garbage_payload = hello.clone();
    garbage_payload.extend_from_slice(&[
        Frame::KIND_MEMBERSHIP,
        0,
        0,
        0,
        4,
        0xff,
        0xff,
        0xff,
        0xff,
    ]);
    let mut second_hello = hello.clone();
    second_hello.extend_from_slice(&hello);
    let mut cut = hello.clone();
    cut.extend_from_slice(&[Frame::KIND_MEMBERSHIP, 0, 0, 0, 100, 1, 2]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no hello", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("wrong version", {
            let mut v = Frame::Hello(Hello { version: 999 })
                .encode_frame()
                .expect("hello");
            v.extend_from_slice(&[0; 8]);
            v
        }),
        ("oversized length", oversized),
        ("unknown kind", unknown),
        ("garbage payload", garbage_payload),
        ("second hello", second_hello),
        ("cut frame", cut),
    ];
    for (name, bytes) in cases {
        let conn = raw_connection(&endpoint, node.local_addr()).await;
        let mut send = conn.open_uni().await.expect("stream");
        send.write_all(&bytes).await.expect("write");
        let _ = send.finish();
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .unwrap_or_else(|_| panic!("{name}: the node kept the connection open"));
        match reason {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(
                    close.error_code,
                    quinn::VarInt::from_u32(close::PROTOCOL),
                    "{name}"
                );
            }
            other => panic!("{name}: unexpected close {other:?}"),
        }
    }

    // Still serving: a real peer joins and both see each other.
    let peer = start(&[via(&node)]).await;
    let pair = [node, peer];
    assert!(
        wait_until(Duration::from_secs(10), || everyone_knows_everyone(&pair))
            .await
            .is_some(),
        "the node stopped serving after malformed input"
    );
    for node in pair {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_version_fails_the_handshake() {
    let node = start(&[]).await;
    let identity = Identity::generate().expect("identity");
    let mut tls = identity.client_config(None, None).expect("tls");
    tls.alpn_protocols = vec![b"cf/1".to_vec()];
    let crypto = QuicClientConfig::try_from(Arc::new(tls)).expect("quic tls");
    let endpoint = client_endpoint();
    let connecting = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(crypto)),
            node.local_addr(),
            SERVER_NAME,
        )
        .expect("connect");
    let result = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .expect("the handshake ends");
    assert!(result.is_err(), "a cf/1 client was accepted");
    assert!(known(&node).await.is_empty());
    node.shutdown().await;
}
