//! Jobs over real QUIC between nodes in one process: a submitter spreads a job over workers,
//! replicas run on distinct hosts (each node binds a loopback address of its own), a lying
//! worker is outvoted and named, and the journal holds every unit. Every wait is bounded. The
//! attacks of hostile peers are in `hostile_peers.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::digest::Digest;
use coordinator_free::identity::Identity;
use coordinator_free::job::JobManifest;
use coordinator_free::node::Node;
use coordinator_free::store::JobStore;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_spreads_over_peers_and_replicas_agree() {
    let a = start(None, false).await;
    let b = start(Some(&a), false).await;
    let c = start(Some(&a), false).await;
    converge(&[&a, &b, &c], 3).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = job_files(dir.path(), 40, 2);
    let store = Arc::new(JobStore::open(&dir.path().join("submit.redb")).expect("store"));
    let summary = submit(&a, dir.path(), manifest, store).await;
    assert!(summary.succeeded(), "{summary:?}");
    assert!(!summary.simulated_peers);
    assert_eq!(summary.executions, 80, "{summary:?}");
    assert!(
        summary.peers.len() >= 2,
        "replicas need distinct peers: {summary:?}"
    );
    assert!(summary.dissenters.is_empty());
    let lines = results(dir.path());
    eprintln!("{}\n{:?}", lines[0], summary.peers);
    check_reversed(&lines, 40, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_is_outvoted_and_named() {
    let a = start(None, false).await;
    let b = start(Some(&a), false).await;
    let c = start(Some(&a), false).await;
    let liar = start(Some(&a), true).await;
    converge(&[&a, &b, &c, &liar], 4).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = job_files(dir.path(), 40, 2);
    let store = Arc::new(JobStore::open(&dir.path().join("submit.redb")).expect("store"));
    let summary = submit(&a, dir.path(), manifest, store.clone()).await;
    assert!(summary.succeeded(), "{summary:?}");
    assert_eq!(
        summary.dissenters.keys().copied().collect::<Vec<_>>(),
        vec![liar.id()],
        "only the liar disagreed: {summary:?}"
    );
    let lines = results(dir.path());
    check_reversed(&lines, 40, 2);
    let named = lines
        .iter()
        .filter(|l| l["dissented"].as_array().is_some_and(|d| !d.is_empty()))
        .count() as u64;
    assert_eq!(named, summary.dissenters[&liar.id()]);
    for line in &lines {
        for peer in line["agreed"].as_array().expect("agreed") {
            assert_ne!(peer.as_str(), Some(liar.id().to_string().as_str()));
        }
    }
    let reputation = store.reputation(&liar.id()).expect("reputation");
    assert_eq!(reputation.disagreements, named);
    assert_eq!(reputation.agreements, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_inputs_travel_as_checked_blobs() {
    let a = start(None, false).await;
    let b = start(Some(&a), false).await;
    let c = start(Some(&a), false).await;
    converge(&[&a, &b, &c], 3).await;

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("reverse.wasm"), reverse_module()).expect("module");
    // Inline, one chunk, two chunks (over the 1 MiB chunk size).
    let sizes = [100usize, 40 << 10, (3 << 20) / 2];
    let mut names = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let bytes: Vec<u8> = (0..*size).map(|j| (j * 7 + i) as u8).collect();
        let name = format!("input-{i}.bin");
        std::fs::write(dir.path().join(&name), &bytes).expect("input");
        names.push(format!("{name:?}"));
    }
    let text = format!(
        "name = \"blobs\"\nmodule = \"reverse.wasm\"\n[inputs]\nfiles = [{}]\n[redundancy]\nreplicas = 2\n",
        names.join(", ")
    );
    std::fs::write(dir.path().join("job.toml"), text).expect("manifest");
    let manifest = JobManifest::load(&dir.path().join("job.toml")).expect("manifest");
    let store = Arc::new(JobStore::open(&dir.path().join("submit.redb")).expect("store"));
    let summary = submit(&a, dir.path(), manifest, store).await;
    assert!(summary.succeeded(), "{summary:?}");
    let lines = results(dir.path());
    assert_eq!(lines.len(), sizes.len());
    for line in &lines {
        let index = line["index"].as_u64().expect("index") as usize;
        let input = std::fs::read(dir.path().join(format!("input-{index}.bin"))).expect("input");
        let expected: Vec<u8> = input.iter().rev().copied().collect();
        let output = line["output"]["base64"].as_str().expect("base64 output");
        assert!(base64_decode(output) == expected, "unit {index} reversed");
        assert_eq!(line["agreed"].as_array().expect("agreed").len(), 2);
    }
    // The status counts the large inputs as blobs, not as job traffic: whoever ran a replica
    // elsewhere than its submitter received the 1.5 MiB input as blob payload.
    let mut blobs_received = 0;
    let mut blobs_sent = 0;
    for node in [&a, &b, &c] {
        let t = node.status().await.expect("status").traffic;
        blobs_received += t.blobs.total.received;
        blobs_sent += t.blobs.total.sent;
        assert!(t.membership.total.sent > 0, "{t:?}");
    }
    assert!(blobs_sent >= (3 << 20) / 2, "{blobs_sent}");
    // Equal on loopback but for the last packets of a blob link closing as they are counted.
    assert!(
        blobs_received.abs_diff(blobs_sent) <= blobs_sent / 100,
        "{blobs_received} of {blobs_sent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_submitters_share_the_workers_at_once() {
    let a = start(None, false).await;
    let b = start(Some(&a), false).await;
    let c = start(Some(&a), false).await;
    let d = start(Some(&a), false).await;
    converge(&[&a, &b, &c, &d], 4).await;

    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let job_a = job_files(dir_a.path(), 60, 2);
    let job_b = job_files(dir_b.path(), 60, 2);
    let store_a = Arc::new(JobStore::open(&dir_a.path().join("s.redb")).expect("store"));
    let store_b = Arc::new(JobStore::open(&dir_b.path().join("s.redb")).expect("store"));
    let (sa, sb) = tokio::join!(
        submit(&a, dir_a.path(), job_a, store_a),
        submit(&b, dir_b.path(), job_b, store_b)
    );
    for (summary, dir) in [(&sa, &dir_a), (&sb, &dir_b)] {
        assert!(summary.succeeded(), "{summary:?}");
        assert!(
            summary.peers.len() >= 3,
            "each job spread over the network: {summary:?}"
        );
        check_reversed(&results(dir.path()), 60, 2);
    }
    // The workers served both submitters: c and d each ran units of both jobs.
    for worker in [c.id(), d.id()] {
        assert!(
            sa.peers.contains_key(&worker) && sb.peers.contains_key(&worker),
            "{worker} ran units of both jobs: {sa:?} {sb:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_offering_too_little_memory_is_not_given_units() {
    let a = start(None, false).await;
    let b = start(Some(&a), false).await;
    // A volunteer offering 64 MiB: the job's units may use 256 MiB each.
    let mut config = worker_config(Some(&a), false);
    config.capacity.memory_mb = 64;
    if let Some(work) = &mut config.work {
        work.memory_per_slot = 64 << 20;
    }
    let small = Node::start(Identity::generate().expect("identity"), config)
        .await
        .expect("node starts");
    converge(&[&a, &b, &small], 3).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = job_files(dir.path(), 20, 2);
    let store = Arc::new(JobStore::open(&dir.path().join("submit.redb")).expect("store"));
    let summary = submit(&a, dir.path(), manifest, store).await;
    assert!(summary.succeeded(), "{summary:?}");
    assert!(
        !summary.peers.contains_key(&small.id()),
        "the small peer ran nothing: {summary:?}"
    );
    assert_eq!(summary.peers.len(), 2, "{summary:?}");

    // Offered directly anyway, the small peer declines.
    use coordinator_free::job::proto::JobFrame;
    use coordinator_free::schedule::LeaseId;
    use coordinator_free::wire;
    let mut link = link_to(&small).await;
    let offer = offer(&reverse_module(), 1);
    wire::write(&mut link.send, &offer).await.expect("send");
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        wire::read::<JobFrame, _>(&mut link.recv),
    )
    .await
    .expect("an answer")
    .expect("a frame");
    assert!(
        matches!(answer, Some(JobFrame::Decline { ref leases, .. }) if leases == &[LeaseId(0)]),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_declines_units_longer_than_it_allows_and_others_run_them() {
    let a = start(None, false).await;
    let b = start(Some(&a), false).await;
    // The job's units may run 60 s each; this volunteer allows 30 s.
    let mut config = worker_config(Some(&a), false);
    if let Some(work) = &mut config.work {
        work.max_unit_time = Duration::from_secs(30);
    }
    let brief = Node::start(Identity::generate().expect("identity"), config)
        .await
        .expect("node starts");
    converge(&[&a, &b, &brief], 3).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = job_files(dir.path(), 20, 2);
    let store = Arc::new(JobStore::open(&dir.path().join("submit.redb")).expect("store"));
    let summary = submit(&a, dir.path(), manifest, store).await;
    assert!(summary.succeeded(), "{summary:?}");
    assert!(
        !summary.peers.contains_key(&brief.id()),
        "the brief peer ran nothing: {summary:?}"
    );
    check_reversed(&results(dir.path()), 20, 2);

    use coordinator_free::job::proto::{InputRef, JobFrame, JobSpec, Offer, WireLease};
    use coordinator_free::sandbox::Limits;
    use coordinator_free::schedule::LeaseId;
    use coordinator_free::wire;
    let module = reverse_module();
    let offer = |timeout: Duration, lease: u64| {
        let limits = Limits {
            timeout,
            ..Limits::default()
        };
        JobFrame::Offer(Offer {
            name: "test".into(),
            job: Digest::of(format!("a job of {timeout:?} units").as_bytes()),
            spec: JobSpec::new(Digest::of(&module), module.len() as u64, &limits),
            leases: vec![WireLease {
                id: LeaseId(lease),
                unit: 0,
                attempt: 1,
                ttl_ms: 30_000,
                input: InputRef::Inline(b"abc".to_vec()),
            }],
        })
    };
    let mut link = link_to(&brief).await;
    let mut answer = async |frame: &JobFrame| {
        wire::write(&mut link.send, frame).await.expect("send");
        tokio::time::timeout(
            Duration::from_secs(10),
            wire::read::<JobFrame, _>(&mut link.recv),
        )
        .await
        .expect("an answer")
        .expect("a frame")
    };
    // A second over the limit is declined; at the limit, the worker takes the lease and asks
    // for the module.
    let over = answer(&offer(Duration::from_secs(31), 1)).await;
    assert!(
        matches!(over, Some(JobFrame::Decline { ref leases, .. }) if leases == &[LeaseId(1)]),
        "{over:?}"
    );
    let within = answer(&offer(Duration::from_secs(30), 2)).await;
    assert!(
        matches!(within, Some(JobFrame::BlobGet { digest }) if digest == Digest::of(&module)),
        "{within:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_be_dialed_pulls_work_from_the_submitter() {
    // On full tables, where the submitter would otherwise dial every worker it holds (on the
    // overlay every worker pulls).
    let a = start_table_on("127.0.0.1".parse().expect("ip"), None, false).await;
    // Advertises no address, as a peer behind NAT would: the submitter cannot dial it.
    let mut config = worker_config(Some(&a), false);
    config.discovery = coordinator_free::node::Discovery::Table;
    config.advertise = Some(Vec::new());
    let hidden = Node::start(Identity::generate().expect("identity"), config)
        .await
        .expect("node starts");
    converge(&[&a, &hidden], 2).await;
    let seen = a.status().await.expect("status");
    assert!(
        seen.peers.iter().all(|p| p.addrs.is_empty()),
        "the submitter has no address for it"
    );

    // Replicas on two distinct peers need the hidden one: the job only ends if it pulls.
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = job_files(dir.path(), 20, 2);
    let store = Arc::new(JobStore::open(&dir.path().join("submit.redb")).expect("store"));
    let summary = submit(&a, dir.path(), manifest, store).await;
    assert!(summary.succeeded(), "{summary:?}");
    assert!(
        summary.peers.contains_key(&hidden.id()),
        "the hidden worker took part: {summary:?}"
    );
    check_reversed(&results(dir.path()), 20, 2);
    // The advert named the job while it ran and names none after.
    let start = Instant::now();
    loop {
        let status = hidden.status().await.expect("status");
        if status.peers.iter().all(|p| p.job.is_none()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the job advert is withdrawn"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
