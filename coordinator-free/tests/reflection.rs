//! A hostile peer cannot turn a worker into a reflector: adverts and `BlobAt` frames naming
//! a bystander's address make the worker send it at most a handful of datagrams.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use coordinator_free::digest::Digest;
use coordinator_free::identity::Identity;
use coordinator_free::job::proto::{InputRef, JobFrame, JobSpec, Offer, WireLease};
use coordinator_free::membership::{
    Advert, GossipedAdvert, MAX_ADVERTS_PER_MESSAGE, MembershipMessage, SignedAdvert,
};
use coordinator_free::net::LinkKind;
use coordinator_free::sandbox::Limits;
use coordinator_free::schedule::LeaseId;
use coordinator_free::wire::{self, Frame};

mod common;
use common::*;

/// Most datagrams the bystander may receive: one probe's Initial and its retransmissions.
const HANDFUL: usize = 5;
/// Forged identities, each advertising the bystander as its address.
const FORGED: usize = 1000;

/// Counts datagrams arriving at a UDP socket until `stop`.
fn count_datagrams(socket: UdpSocket, stop: Instant) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&count);
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while Instant::now() < stop {
            if socket.recv_from(&mut buf).is_ok() {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    count
}

fn forged_advert(identity: &Identity, at: SocketAddr, job: Digest) -> GossipedAdvert {
    let advert = Advert {
        peer: identity.id(),
        addrs: vec![at],
        cores_donated: 64,
        cores_free: 64,
        memory_mb: 65_536,
        profile: coordinator_free::sandbox::PROFILE_VERSION,
        // Issued now: an advert dated far from the receiver's clock is refused unread.
        seq: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis() as u64,
        // An advertised job makes every idle worker dial its submitter for work.
        job: Some(job),
    };
    GossipedAdvert {
        signed: SignedAdvert::sign(advert, &identity.advert_auth()).expect("signed"),
        age_ms: 0,
        public_path: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adverts_and_blob_at_frames_naming_a_bystander_make_a_handful_of_datagrams() {
    let bystander = UdpSocket::bind("127.0.6.9:0").expect("bystander socket");
    let target = bystander.local_addr().expect("addr");
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    // On full tables, whose gossip carries the forged adverts (the overlay's job adverts have
    // tests of their own).
    let worker = start_table_on(ip("127.0.6.1"), None, false).await;
    let attacker = Sybils::on(ip("127.0.6.2"), 2);

    // 1,000 validly signed identities, all claiming the bystander's address and a job.
    let forged: Vec<Identity> = (0..FORGED)
        .map(|_| Identity::generate().expect("identity"))
        .collect();
    // Long enough for membership maintenance and the pull loop (which dials an advertised
    // submitter 1.5 s after first seeing it) to act on every forged advert.
    let stop = Instant::now() + Duration::from_secs(12);
    let count = count_datagrams(bystander, stop);

    // Gossip them to the worker over a membership link of our own.
    let mut gossip = attacker
        .link(0, &worker, LinkKind::Membership)
        .await
        .expect("membership link");
    let job = Digest::of(b"a job that does not exist");
    for chunk in forged.chunks(MAX_ADVERTS_PER_MESSAGE) {
        let adverts = chunk
            .iter()
            .map(|id| forged_advert(id, target, job))
            .collect();
        let frame = Frame::Membership(MembershipMessage::Adverts(adverts));
        wire::write(&mut gossip.send, &frame)
            .await
            .expect("adverts sent");
    }

    // As a submitter, send it 1,000 BlobAt frames naming those identities.
    let mut link = attacker
        .link(1, &worker, LinkKind::Job)
        .await
        .expect("job link");
    let module = reverse_module();
    let input = vec![7u8; 1 << 20];
    let offer = JobFrame::Offer(Offer {
        name: "test".into(),
        job,
        spec: JobSpec::new(Digest::of(&module), module.len() as u64, &Limits::default()),
        leases: vec![WireLease {
            id: LeaseId(1),
            unit: 0,
            attempt: 1,
            ttl_ms: 60_000,
            input: InputRef::Blob {
                digest: Digest::of(&input),
                len: input.len() as u64,
            },
        }],
    });
    send(&mut link, &offer).await;
    let mut redirects = 0;
    let mut asked_again = 0;
    let deadline = Instant::now() + Duration::from_secs(8);
    while redirects < FORGED && Instant::now() < deadline {
        let Some(asked) = next(&mut link, |f| match f {
            JobFrame::BlobGet { digest } => Some(digest),
            _ => None,
        })
        .await
        else {
            break;
        };
        if asked == Digest::of(&module) {
            send_blob(&mut link, asked, &module).await;
            continue;
        }
        assert_eq!(asked, Digest::of(&input));
        if redirects > 0 {
            asked_again += 1;
        }
        let at = JobFrame::BlobAt {
            digest: asked,
            peer: forged[redirects].id(),
        };
        send(&mut link, &at).await;
        redirects += 1;
    }
    assert_eq!(
        redirects, FORGED,
        "every BlobAt was answered by asking again"
    );
    assert!(asked_again >= FORGED - 1);

    let status = worker.status().await.expect("status");
    assert!(
        status.peers.len() >= FORGED,
        "the forged identities were admitted: {} peers",
        status.peers.len()
    );
    tokio::time::sleep_until((stop + Duration::from_millis(200)).into()).await;
    let datagrams = count.load(Ordering::SeqCst);
    eprintln!("bystander received {datagrams} datagrams");
    assert!(
        datagrams <= HANDFUL,
        "the bystander received {datagrams} datagrams"
    );
    worker.shutdown().await;
}
