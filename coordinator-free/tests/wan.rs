//! A worker on a long path: every datagram between a submitter and a worker is held back by a
//! relay in this process (62.5 ms each way, a 125 ms round trip), and a 64 MiB input still
//! arrives, is checked and its unit runs. With 128 KiB flow-control windows the same transfer
//! moves 128 KiB per round trip, about 1 MiB a second, and misses the test's bound of 50 s.
//!
//! The delay is made in user space rather than with `tc netem`, which needs a kernel module the
//! machines that run this suite do not all have.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::digest::Digest;
use coordinator_free::job::proto::{InputRef, JobFrame, JobSpec, Offer, WireLease};
use coordinator_free::net::LinkKind;
use coordinator_free::sandbox::Limits;
use coordinator_free::schedule::LeaseId;
use coordinator_free::wire;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

mod common;
use common::*;

const ONE_WAY: Duration = Duration::from_micros(62_500);
/// Datagrams a direction holds, as a router's queue would; past it they are dropped.
const QUEUE: usize = 16_384;

/// Sends what arrives on `queue` to `to` from `socket`, each datagram `ONE_WAY` after it was
/// received: one queue per direction keeps the order and costs one task, not one per datagram.
fn delayed(socket: Arc<UdpSocket>, to: SocketAddr) -> mpsc::Sender<(Instant, Vec<u8>)> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    tokio::spawn(async move {
        while let Some((at, datagram)) = rx.recv().await {
            tokio::time::sleep_until((at + ONE_WAY).into()).await;
            let _ = socket.send_to(&datagram, to).await;
        }
    });
    tx
}

/// Forwards datagrams between clients and `server`, each after `ONE_WAY`. Every client gets a
/// socket of its own towards the server, so replies find their way back. Ends with the test.
async fn relay(server: SocketAddr) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay socket"));
    let addr = front.local_addr().expect("relay address");
    tokio::spawn(async move {
        let mut backs: HashMap<SocketAddr, mpsc::Sender<(Instant, Vec<u8>)>> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((len, client)) = front.recv_from(&mut buf).await else {
                return;
            };
            let to_server = match backs.get(&client) {
                Some(tx) => tx.clone(),
                None => {
                    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("back"));
                    let to_server = delayed(Arc::clone(&back), server);
                    let to_client = delayed(Arc::clone(&front), client);
                    backs.insert(client, to_server.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        while let Ok((len, _)) = back.recv_from(&mut buf).await {
                            let _ = to_client.try_send((Instant::now(), buf[..len].to_vec()));
                        }
                    });
                    to_server
                }
            };
            let _ = to_server.try_send((Instant::now(), buf[..len].to_vec()));
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_input_crosses_a_125_ms_path_and_its_unit_runs() {
    let worker = start(None, false).await;
    let via = relay(worker.local_addr()).await;
    let submitter = Sybils::on("127.0.0.1".parse().expect("addr"), 1);
    let mut link = submitter
        .dial(0, worker.id(), via, LinkKind::Job)
        .await
        .expect("a job link over the slow path");

    let module = wat::parse_file(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wat/noop.wat"),
    )
    .expect("noop.wat");
    let input: Vec<u8> = (0..64usize << 20)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    let offer = JobFrame::Offer(Offer {
        name: "test".into(),
        job: Digest::of(b"a job far away"),
        spec: JobSpec::new(Digest::of(&module), module.len() as u64, &Limits::default()),
        leases: vec![WireLease {
            id: LeaseId(1),
            unit: 0,
            attempt: 1,
            ttl_ms: 120_000,
            input: InputRef::Blob {
                digest: Digest::of(&input),
                len: input.len() as u64,
            },
        }],
    });
    let started = Instant::now();
    wire::write(&mut link.send, &offer).await.expect("offer");
    let report = tokio::time::timeout(Duration::from_secs(50), async {
        loop {
            match wire::read::<JobFrame, _>(&mut link.recv).await {
                Ok(Some(JobFrame::BlobGet { digest })) => {
                    let bytes = if digest == Digest::of(&module) {
                        &module
                    } else {
                        assert_eq!(digest, Digest::of(&input));
                        &input
                    };
                    send_blob(&mut link, digest, bytes).await;
                }
                Ok(Some(JobFrame::Report { mut results, .. })) if !results.is_empty() => {
                    return results.remove(0);
                }
                Ok(Some(_)) => {}
                other => panic!("the link ended: {other:?}"),
            }
        }
    })
    .await
    .expect("the unit ran within 50 s");
    let took = started.elapsed();
    assert_eq!(report.lease, LeaseId(1));
    assert_eq!(
        report.result,
        Ok(Vec::new()),
        "the unit ran on the checked input"
    );
    eprintln!("64 MiB over a 125 ms round trip: unit reported after {took:.1?}");
}
