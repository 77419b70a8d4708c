//! Jobs over real QUIC between nodes in one process: a submitter spreads a job over workers,
//! replicas run on distinct peers, a lying worker is outvoted and named, and the journal holds
//! every unit. Every wait is bounded.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::digest::Digest;
use coordinator_free::identity::Identity;
use coordinator_free::job::JobManifest;
use coordinator_free::job::driver::{JobData, JobSummary, run_job};
use coordinator_free::job::local::job_id;
use coordinator_free::node::{
    Bootstrap, NetWorkers, Node, NodeConfig, WorkConfig, WorkRunner, net_schedule_config,
};
use coordinator_free::sandbox::SandboxConfig;
use coordinator_free::store::JobStore;

fn worker_config(bootstrap: Option<&Node>, tamper: bool) -> NodeConfig {
    let mut config = NodeConfig::new("127.0.0.1:0".parse().expect("addr"));
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

/// Runs the job in `dir` from `node` on a thread of its own, as `worker submit` does.
async fn submit(
    node: &Node,
    dir: &Path,
    manifest: JobManifest,
    store: Arc<JobStore>,
) -> JobSummary {
    let units = manifest.units(&dir.join("job.toml")).expect("units");
    let module: Arc<[u8]> = std::fs::read(dir.join("reverse.wasm"))
        .expect("read")
        .into();
    let module_digest = Digest::of(&module);
    let job = JobData {
        id: job_id(&module_digest, &manifest, &units),
        module: module_digest,
        units,
        limits: manifest.limits.to_limits(),
    };
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
