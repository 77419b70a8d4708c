//! Jobs over real QUIC between nodes in one process: a submitter spreads a job over workers,
//! replicas run on distinct hosts (each node binds a loopback address of its own), a lying worker is outvoted and named, and the journal holds
//! every unit. Every wait is bounded.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::digest::Digest;
use coordinator_free::identity::Identity;
use coordinator_free::job::JobManifest;
use coordinator_free::job::driver::{JobData, JobSummary, run_job};
use coordinator_free::node::{
    Bootstrap, NetWorkers, Node, NodeConfig, WorkConfig, WorkRunner, net_schedule_config,
};
use coordinator_free::sandbox::SandboxConfig;
use coordinator_free::store::JobStore;

/// A loopback address of its own for each node, so each is a host of its own to the
/// submitter (every 127.0.0.0/8 address reaches the loopback interface on Linux).
fn next_host() -> std::net::SocketAddr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ip = std::net::Ipv4Addr::new(127, 0, 1 + (n / 250) as u8, 2 + (n % 250) as u8);
    std::net::SocketAddr::new(ip.into(), 0)
}

fn worker_config(bootstrap: Option<&Node>, tamper: bool) -> NodeConfig {
    let mut config = NodeConfig::new(next_host());
    config.mdns = false;
    config.bootstrap = bootstrap
        .map(|n| Bootstrap {
            addr: n.local_addr(),
            peer: Some(n.id()),
        })
        .into_iter()
        .collect();
    config.capacity.cores_donated = 1;
    config.capacity.cores_free = 1;
    let mut work = WorkConfig::new(WorkRunner::InProcess(SandboxConfig::default()), 1);
    work.tamper = tamper;
    config.work = Some(work);
    config
}

async fn start(bootstrap: Option<&Node>, tamper: bool) -> Node {
    Node::start(
        Identity::generate().expect("identity"),
        worker_config(bootstrap, tamper),
    )
    .await
    .expect("node starts")
}

/// Waits (bounded) until every node knows `count - 1` others.
async fn converge(nodes: &[&Node], count: usize) {
    let start = Instant::now();
    loop {
        let mut ok = true;
        for node in nodes {
            ok &= node.status().await.expect("status").peers.len() == count - 1;
        }
        if ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "membership did not converge"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn reverse_module() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wat/reverse.wat");
    wat::parse_file(path).expect("reverse.wat compiles")
}

/// Writes the module and a manifest of `units` sweep points into `dir`.
fn job_files(dir: &Path, units: u32, replicas: u32) -> JobManifest {
    std::fs::write(dir.join("reverse.wasm"), reverse_module()).expect("module");
    let text = format!(
        "name = \"reverse\"\nmodule = \"reverse.wasm\"\n[inputs.sweep]\nx = {{ start = 0, stop = {}, step = 1 }}\n[redundancy]\nreplicas = {replicas}\nquorum = {replicas}\n",
        units - 1
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, &text).expect("manifest");
    JobManifest::load(&path).expect("manifest parses")
}

/// Runs the job of `dir/job.toml` from `node` on a thread of its own, as `worker submit`
/// does; results go to `dir/out`.
async fn submit(
    node: &Node,
    dir: &Path,
    manifest: JobManifest,
    store: Arc<JobStore>,
) -> JobSummary {
    let units = manifest.units(&dir.join("job.toml")).expect("units");
    let module: Arc<[u8]> = std::fs::read(&manifest.module).expect("read").into();
    let module_digest = Digest::of(&module);
    let job = JobData::new(&manifest, units, module_digest);
    let dialer = node.job_dialer();
    let runtime = tokio::runtime::Handle::current();
    let out = dir.join("out");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut workers = NetWorkers::new(dialer, runtime, &job, module);
        let config = net_schedule_config(&workers.spec().limits());
        let summary = run_job(&manifest, &job, config, &mut workers, &store, &out, |_| {});
        let _ = tx.send(summary.map_err(|e| e.to_string()));
    });
    tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .expect("the job ends within a minute")
        .expect("the job thread answers")
        .expect("the job runs")
}

fn results(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("out/results.jsonl"))
        .expect("results")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn base64_decode(text: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = alphabet.iter().position(|a| *a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Checks every line: accepted, output = the input reversed, agreed by distinct peers.
fn check_reversed(lines: &[serde_json::Value], units: usize, replicas: usize) {
    assert_eq!(lines.len(), units);
    for line in lines {
        assert_eq!(line["status"], "accepted", "{line}");
        let x = line["input"]["params"]["x"].as_u64().expect("x");
        let input = format!("{{\"x\":{x}}}");
        let expected: Vec<u8> = input.bytes().rev().collect();
        let output = match &line["output"] {
            serde_json::Value::String(s) => s.clone(),
            other => other["base64"].as_str().expect("base64 output").to_owned(),
        };
        assert_eq!(base64_decode(&output), expected, "{line}");
        let agreed = line["agreed"].as_array().expect("agreed");
        assert_eq!(agreed.len(), replicas, "{line}");
        assert_ne!(Some(&agreed[0]), agreed.get(1), "{line}");
    }
}

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

mod hostile {
    use super::*;
    use coordinator_free::job::proto::{
        InputRef, JobFrame, JobSpec, MAX_LEASES_PER_OFFER, Offer, WireLease,
    };
    use coordinator_free::net::{self, LinkKind, NetConfig, PeerLink};
    use coordinator_free::sandbox::Limits;
    use coordinator_free::schedule::LeaseId;
    use coordinator_free::wire::{self, Message};

    /// A hand-made submitter: a job link to `worker` from an identity of our own.
    pub(super) async fn link_to(worker: &Node) -> PeerLink {
        let identity = Identity::generate().expect("identity");
        let endpoint = net::endpoint(
            &identity,
            None,
            "127.0.0.1:0".parse().expect("addr"),
            &NetConfig::default(),
        )
        .expect("endpoint");
        net::dial_for(
            &endpoint,
            &identity,
            None,
            worker.local_addr(),
            Some(worker.id()),
            &NetConfig::default(),
            LinkKind::Job,
        )
        .await
        .expect("job link")
    }

    pub(super) fn offer(module: &[u8], leases: usize) -> JobFrame {
        JobFrame::Offer(Offer {
            job: Digest::of(b"a hostile job"),
            spec: JobSpec::new(Digest::of(module), module.len() as u64, &Limits::default()),
            leases: (0..leases)
                .map(|i| WireLease {
                    id: LeaseId(i as u64),
                    unit: i as u32,
                    attempt: 1,
                    ttl_ms: 30_000,
                    input: InputRef::Inline(format!("input {i}").into_bytes()),
                })
                .collect(),
        })
    }

    /// Reads frames until one matches `pick`, or the link ends, or 10 s pass.
    async fn next<T>(
        link: &mut PeerLink,
        mut pick: impl FnMut(JobFrame) -> Option<T>,
    ) -> Option<T> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match wire::read::<JobFrame, _>(&mut link.recv).await {
                    Ok(Some(frame)) => {
                        if let Some(found) = pick(frame) {
                            return Some(found);
                        }
                    }
                    _ => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    async fn send(link: &mut PeerLink, frame: &JobFrame) {
        wire::write(&mut link.send, frame).await.expect("send");
    }

    /// Serves the module when asked; returns the outputs reported for `leases` leases.
    async fn serve_and_collect(link: &mut PeerLink, module: &[u8], leases: usize) -> Vec<Vec<u8>> {
        let mut outputs = Vec::new();
        while outputs.len() < leases {
            let got = next(link, Some).await.expect("the worker answers");
            match got {
                JobFrame::BlobGet { digest } => {
                    assert_eq!(digest, Digest::of(module));
                    let chunk = JobFrame::BlobChunk {
                        digest,
                        total: module.len() as u64,
                        offset: 0,
                        bytes: module.to_vec(),
                    };
                    send(link, &chunk).await;
                }
                JobFrame::Report { results, .. } => {
                    for r in results {
                        outputs.push(r.result.expect("the unit ran"));
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        outputs
    }

    async fn offer_blob_input(link: &mut PeerLink, module: &[u8], input: &[u8], lease: u64) {
        let frame = JobFrame::Offer(Offer {
            job: Digest::of(b"a shared blob"),
            spec: JobSpec::new(Digest::of(module), module.len() as u64, &Limits::default()),
            leases: vec![WireLease {
                id: LeaseId(lease),
                unit: lease as u32,
                attempt: 1,
                ttl_ms: 30_000,
                input: InputRef::Blob {
                    digest: Digest::of(input),
                    len: input.len() as u64,
                },
            }],
        });
        send(link, &frame).await;
    }

    /// Answers blob requests from `blobs` (or with `redirect` for `input` the first time) until
    /// a report arrives; returns its output and whether the input was asked for here.
    async fn serve_until_report(
        link: &mut PeerLink,
        blobs: &[&[u8]],
        mut redirect: Option<JobFrame>,
    ) -> (Vec<u8>, Vec<Digest>) {
        let mut asked = Vec::new();
        loop {
            match next(link, Some).await.expect("the worker answers") {
                JobFrame::BlobGet { digest } => {
                    asked.push(digest);
                    let bytes = blobs
                        .iter()
                        .find(|b| Digest::of(b) == digest)
                        .expect("a known blob");
                    if bytes.len() > 64 << 10
                        && let Some(at) = redirect.take()
                    {
                        send(link, &at).await;
                        continue;
                    }
                    for (i, chunk) in bytes.chunks(1 << 20).enumerate() {
                        let frame = JobFrame::BlobChunk {
                            digest,
                            total: bytes.len() as u64,
                            offset: (i << 20) as u64,
                            bytes: chunk.to_vec(),
                        };
                        send(link, &frame).await;
                    }
                }
                JobFrame::Report { mut results, .. } if !results.is_empty() => {
                    return (results.remove(0).result.expect("the unit ran"), asked);
                }
                _ => {}
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_fetches_a_blob_from_a_peer_that_holds_it() {
        let holder = start(None, false).await;
        let fetcher = start(None, false).await;
        let module = reverse_module();
        let input: Vec<u8> = (0..(3usize << 19)).map(|i| (i * 13) as u8).collect();
        let expected: Vec<u8> = input.iter().rev().copied().collect();

        // The holder gets the input from the submitter itself.
        let mut to_holder = link_to(&holder).await;
        offer_blob_input(&mut to_holder, &module, &input, 1).await;
        let (out, asked) = serve_until_report(&mut to_holder, &[&module, &input], None).await;
        assert!(out == expected);
        assert!(asked.contains(&Digest::of(&input)));

        // The fetcher is sent to the holder for the input, and never asks us for it.
        let mut to_fetcher = link_to(&fetcher).await;
        offer_blob_input(&mut to_fetcher, &module, &input, 2).await;
        let at = JobFrame::BlobAt {
            digest: Digest::of(&input),
            peer: holder.id(),
            addr: holder.local_addr(),
        };
        let (out, asked) = serve_until_report(&mut to_fetcher, &[&module, &input], Some(at)).await;
        assert!(out == expected, "the unit ran on the holder's copy");
        assert_eq!(
            asked.iter().filter(|d| **d == Digest::of(&input)).count(),
            1,
            "asked once, then fetched from the holder"
        );

        // Sent to a peer that lacks the blob, a worker comes back and asks again.
        let other: Vec<u8> = input.iter().map(|b| b ^ 0x5a).collect();
        let expected: Vec<u8> = other.iter().rev().copied().collect();
        let third = start(None, false).await;
        let mut to_third = link_to(&third).await;
        offer_blob_input(&mut to_third, &module, &other, 3).await;
        let at = JobFrame::BlobAt {
            digest: Digest::of(&other),
            peer: fetcher.id(),
            addr: fetcher.local_addr(),
        };
        let (out, asked) = serve_until_report(&mut to_third, &[&module, &other], Some(at)).await;
        assert!(out == expected);
        assert_eq!(
            asked.iter().filter(|d| **d == Digest::of(&other)).count(),
            2,
            "asked again after the holder had nothing"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_survives_hostile_submitters() {
        let worker = start(None, false).await;
        let module = reverse_module();

        // A module the submitter cannot serve: the leases are declined, not kept.
        let mut link = link_to(&worker).await;
        send(&mut link, &offer(&module, 3)).await;
        let digest = next(&mut link, |f| match f {
            JobFrame::BlobGet { digest } => Some(digest),
            _ => None,
        })
        .await
        .expect("the worker asks for the module");
        send(&mut link, &JobFrame::BlobMissing { digest }).await;
        let declined = next(&mut link, |f| match f {
            JobFrame::Decline { leases, .. } => Some(leases),
            _ => None,
        })
        .await
        .expect("declined");
        assert_eq!(declined.len(), 3);

        // Bytes that do not match the module's digest: refused, leases declined.
        let mut link = link_to(&worker).await;
        let mut forged = module.clone();
        forged.extend_from_slice(b"tampered");
        let mut bad_offer = offer(&module, 2);
        if let JobFrame::Offer(o) = &mut bad_offer {
            o.spec.module_len = forged.len() as u64;
        }
        send(&mut link, &bad_offer).await;
        let digest = next(&mut link, |f| match f {
            JobFrame::BlobGet { digest } => Some(digest),
            _ => None,
        })
        .await
        .expect("asks for the module");
        let chunk = JobFrame::BlobChunk {
            digest,
            total: forged.len() as u64,
            offset: 0,
            bytes: forged,
        };
        send(&mut link, &chunk).await;
        let declined = next(&mut link, |f| match f {
            JobFrame::Decline { leases, .. } => Some(leases),
            _ => None,
        })
        .await
        .expect("declined after a digest mismatch");
        assert_eq!(declined.len(), 2);

        // Garbage: an unknown frame kind and an oversized length end the link, nothing more.
        for garbage in [vec![99u8, 0, 0, 0, 1, 0], {
            let mut g = vec![JobFrame::KIND_OFFER];
            g.extend_from_slice(&u32::MAX.to_be_bytes());
            g
        }] {
            let mut link = link_to(&worker).await;
            tokio::io::AsyncWriteExt::write_all(&mut link.send, &garbage)
                .await
                .expect("send garbage");
            assert!(next(&mut link, Some).await.is_none(), "link closed");
        }

        // Too many leases in one offer: refused when decoded, link closed.
        let mut link = link_to(&worker).await;
        let frame = offer(&module, MAX_LEASES_PER_OFFER + 1);
        let (kind, payload) = frame.encode_payload().expect("encode");
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&payload);
        tokio::io::AsyncWriteExt::write_all(&mut link.send, &bytes)
            .await
            .expect("send");
        assert!(next(&mut link, Some).await.is_none(), "link closed");

        // After all that, an honest submitter is served correctly.
        let mut link = link_to(&worker).await;
        send(&mut link, &offer(&module, 4)).await;
        let mut outputs = serve_and_collect(&mut link, &module, 4).await;
        outputs.sort();
        let mut expected: Vec<Vec<u8>> = (0..4)
            .map(|i| format!("input {i}").bytes().rev().collect())
            .collect();
        expected.sort();
        assert_eq!(outputs, expected);
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
    let mut link = hostile::link_to(&small).await;
    let offer = hostile::offer(&reverse_module(), 1);
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
    let mut link = hostile::link_to(&brief).await;
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
    let a = start(None, false).await;
    // Advertises no address, as a peer behind NAT would: the submitter cannot dial it.
    let mut config = worker_config(Some(&a), false);
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
