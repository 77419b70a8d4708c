//! Real nodes that find each other through the partial-view overlay instead of full tables:
//! each holds a few neighbours, the submitter knows none of the workers' capacity, and its job
//! still runs on peers it never met, which heard its advert through the broadcast and pulled.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::control::{KnownBy, StatusReport};
use coordinator_free::identity::Identity;
use coordinator_free::node::{Bootstrap, Discovery, Node};
use coordinator_free::store::JobStore;

const PEERS: usize = 10;

async fn start(bootstrap: Option<Bootstrap>) -> Node {
    let mut config = common::worker_config(None, false);
    config.discovery = Discovery::Overlay;
    config.bootstrap = bootstrap.into_iter().collect();
    Node::start(Identity::generate().expect("identity"), config)
        .await
        .expect("node starts")
}

async fn statuses(nodes: &[Node]) -> Vec<StatusReport> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(n.status().await.expect("status"));
    }
    out
}

/// Waits (bounded) until `check` holds for every node's status.
async fn wait_all(nodes: &[Node], limit: Duration, check: impl Fn(&StatusReport) -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if statuses(nodes).await.iter().all(&check) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_on_peers_that_heard_its_advert_through_the_overlay() {
    let first = start(None).await;
    let mut nodes = vec![first];
    for i in 1..PEERS {
        // Most bootstrap with the first peer's id; one knows only its address, as an operator
        // who typed `--bootstrap IP:PORT` would.
        let via = Bootstrap {
            addr: nodes[0].local_addr(),
            peer: (i != PEERS - 1).then(|| nodes[0].id()),
        };
        nodes.push(start(Some(via)).await);
    }
    assert!(
        wait_all(&nodes, Duration::from_secs(20), |s| {
            s.overlay.as_ref().is_some_and(|o| o.active >= 1)
        })
        .await,
        "every peer finds a neighbour"
    );
    // A lab still sees every peer: a survey walks the views and every other peer answers with
    // its capacity.
    let all = nodes[PEERS - 1].status_all().await.expect("survey");
    let survey = all
        .overlay
        .as_ref()
        .and_then(|o| o.survey.clone())
        .expect("survey count");
    assert!(survey.complete, "{survey:?}");
    assert_eq!(survey.answered, PEERS - 1, "{survey:?}");
    assert_eq!(all.peers.len(), PEERS - 1);
    for p in &all.peers {
        assert_eq!(p.known_by, KnownBy::Survey);
        assert_eq!((p.cores_donated, p.cores_free), (1, 1), "{p:?}");
        assert!(nodes.iter().any(|n| n.id() == p.id));
    }

    for s in statuses(&nodes).await {
        let o = s.overlay.expect("overlay status");
        // A handful of neighbours, not the whole network; links are only the neighbours'.
        assert!((1..=5).contains(&o.active), "{o:?}");
        assert_eq!(s.connections, o.active);
        assert!(s.peers.iter().all(|p| p.known_by != KnownBy::Table));
        // Nobody's capacity travels without full tables.
        assert!(s.peers.iter().all(|p| p.cores_donated == 0));
    }

    // The submitter is a peer that is not the bootstrap; it can dial only itself from what it
    // knows, so every other worker it links to pulled after hearing the advert.
    let submitter = &nodes[1];
    let dir = tempfile::tempdir().expect("tempdir");
    let units = 400;
    let manifest = common::job_files(dir.path(), units, 2);
    let store = Arc::new(JobStore::open(&dir.path().join("store")).expect("store"));
    let summary = common::submit(submitter, dir.path(), manifest, store).await;
    assert_eq!(summary.accepted, units, "{summary:?}");
    common::check_reversed(&common::results(dir.path()), units as usize, 2);
    eprintln!(
        "units ran on {} peers: {:?}",
        summary.peers.len(),
        summary.peers
    );
    // Idle workers pull as soon as the advert reaches them: most of the ten take part in a
    // job that lasts about a second.
    assert!(
        summary.peers.len() >= PEERS / 2,
        "units ran on other peers: {:?}",
        summary.peers
    );
    assert!(
        summary.peers.keys().any(|p| *p != submitter.id()),
        "{:?}",
        summary.peers
    );

    // The job is over, and its submitter's withdrawal reached every other peer through the
    // broadcast tree: each holds the submitter's last advert, and none lists its job any more.
    let job = {
        let s = submitter.status().await.expect("status");
        assert!(s.overlay.as_ref().is_some_and(|o| o.adverts_heard == 0));
        s.id
    };
    let others: Vec<Node> = nodes.drain(..).filter(|n| n.id() != job).collect();
    assert!(
        wait_all(&others, Duration::from_secs(10), |s| {
            s.overlay.as_ref().is_some_and(|o| o.adverts_heard == 1)
                && !s.peers.iter().any(|p| p.id == job && p.job.is_some())
        })
        .await,
        "every peer heard the withdrawal"
    );
    for s in statuses(&others).await {
        let o = s.overlay.expect("overlay status");
        assert_eq!(o.adverts_refused, 0, "{o:?}");
    }
}

/// Survey questions are answered at most 20 a second (a burst of 20): whoever asks a peer over
/// and over, with one key or many, gets no more answers than that, and each answer names no
/// more than the caps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_answers_surveys_within_its_rate() {
    use coordinator_free::net::{self, LinkKind, NetConfig};
    use coordinator_free::survey::{MAX_REPLY_ACTIVE, MAX_REPLY_PASSIVE, SurveyMessage};
    use coordinator_free::wire::{self, Frame};

    let target = start(None).await;
    let net_config = NetConfig::default();
    let asker = Arc::new(Identity::generate().expect("identity"));
    let endpoint = net::endpoint(&asker, None, common::next_host(), &net_config).expect("endpoint");
    const ASKS: usize = 60;
    let mut asks = tokio::task::JoinSet::new();
    for _ in 0..ASKS {
        let (endpoint, asker, net_config) =
            (endpoint.clone(), Arc::clone(&asker), net_config.clone());
        let (addr, id) = (target.local_addr(), target.id());
        asks.spawn(async move {
            let mut link = net::dial_for(
                &endpoint,
                &asker,
                None,
                addr,
                Some(id),
                &net_config,
                LinkKind::Survey,
            )
            .await
            .ok()?;
            wire::write(&mut link.send, &Frame::Survey(SurveyMessage::Request))
                .await
                .ok()?;
            match wire::read::<Frame, _>(&mut link.recv).await {
                Ok(Some(Frame::Survey(SurveyMessage::Reply(reply)))) => Some(reply),
                _ => None,
            }
        });
    }
    let started = Instant::now();
    let mut answered = 0;
    while let Some(joined) = asks.join_next().await {
        if let Some(reply) = joined.expect("ask task") {
            answered += 1;
            assert_eq!((reply.cores_donated, reply.cores_free), (1, 1));
            assert!(reply.active.0.len() <= MAX_REPLY_ACTIVE);
            assert!(reply.passive.0.len() <= MAX_REPLY_PASSIVE);
        }
    }
    eprintln!("{answered} of {ASKS} answered in {:?}", started.elapsed());
    // The burst, and what the rate refilled while the questions arrived.
    let refilled = (started.elapsed().as_secs_f64() * 20.0).ceil() as usize;
    assert!(answered >= 1, "the peer answers at all");
    assert!(
        answered <= 20 + refilled,
        "{answered} answers in {:?}",
        started.elapsed()
    );
    assert!(answered < ASKS, "{answered} of {ASKS}");
}

/// A submitter that vanishes without a goodbye (its process killed) and starts again with the
/// same key on another port is joined at once, though its neighbours still hold a link to the
/// old process, and its job runs on the workers within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitter_restarted_with_its_key_is_joined_and_its_job_runs() {
    let first = start(None).await;
    let via = Bootstrap {
        addr: first.local_addr(),
        peer: Some(first.id()),
    };
    let workers = vec![first, start(Some(via)).await, start(Some(via)).await];
    let key_dir = tempfile::tempdir().expect("tempdir");
    let key = key_dir.path().to_owned();
    let submitter_config = move || {
        let mut config = common::worker_config(None, false);
        config.bootstrap = vec![via];
        config.work = None;
        config
    };

    // The first process: on a runtime of its own, dropped once the submitter is a neighbour,
    // so no close frame and no withdrawal ever leave it.
    let (joined_tx, joined_rx) = std::sync::mpsc::channel();
    let config = submitter_config();
    let old_key = key.clone();
    let old = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let identity = Identity::load_or_create(&old_key).expect("key");
            let node = Node::start(identity, config).await.expect("node starts");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let s = node.status().await.expect("status");
                if s.overlay.is_some_and(|o| o.active > 0) {
                    let _ = joined_tx.send(node.id());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            std::mem::forget(node);
        });
        drop(runtime);
    });
    let id = tokio::task::spawn_blocking(move || joined_rx.recv_timeout(Duration::from_secs(20)))
        .await
        .expect("join")
        .expect("the first process joins the overlay");
    old.join().expect("the first process ends");
    assert!(
        statuses(&workers).await.iter().any(|s| s
            .peers
            .iter()
            .any(|p| p.id == id && p.known_by == KnownBy::Neighbour)),
        "a worker holds the vanished submitter as a neighbour"
    );

    // The second process, same key.
    let identity = Identity::load_or_create(&key).expect("key");
    let restarted = Node::start(identity, submitter_config())
        .await
        .expect("node starts");
    assert_eq!(restarted.id(), id);
    let started = Instant::now();
    // The worker's link to the old process ends by the idle timeout only after 6 s: before
    // that, the new process's link replaces it and its join is answered.
    let mut neighbour = false;
    while !neighbour && started.elapsed() < Duration::from_secs(4) {
        let s = restarted.status().await.expect("status");
        neighbour = s.overlay.is_some_and(|o| o.active > 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(neighbour, "joined within {:?}", started.elapsed());
    let dir = tempfile::tempdir().expect("tempdir");
    let units = 40;
    let manifest = common::job_files(dir.path(), units, 2);
    let store = Arc::new(JobStore::open(&dir.path().join("store")).expect("store"));
    let summary = common::submit(&restarted, dir.path(), manifest, store).await;
    assert_eq!(summary.accepted, units, "{summary:?}");
    common::check_reversed(&common::results(dir.path()), units as usize, 2);
    eprintln!(
        "the restarted submitter's job was done {:?} after it started",
        started.elapsed()
    );
}
