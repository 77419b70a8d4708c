//! What the tests of real nodes in one process share: nodes on loopback addresses of their
//! own, a job of the `reverse` module submitted as `worker submit` does, the checks of its
//! results, and a hand-made submitter that speaks the job protocol directly.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::digest::Digest;
use coordinator_free::identity::Identity;
use coordinator_free::job::JobManifest;
use coordinator_free::job::driver::{JobData, JobSummary, run_job};
use coordinator_free::job::proto::{InputRef, JobFrame, JobSpec, Offer, WireLease};
use coordinator_free::net::{self, LinkKind, NetConfig, PeerLink};
use coordinator_free::node::{
    Bootstrap, NetWorkers, Node, NodeConfig, WorkConfig, WorkRunner, net_schedule_config,
};
use coordinator_free::sandbox::{Limits, SandboxConfig};
use coordinator_free::schedule::LeaseId;
use coordinator_free::store::JobStore;
use coordinator_free::wire;

/// A loopback address of its own for each node, so each is a host of its own to the
/// submitter (every 127.0.0.0/8 address reaches the loopback interface on Linux).
pub fn next_host() -> std::net::SocketAddr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ip = std::net::Ipv4Addr::new(127, 0, 1 + (n / 250) as u8, 2 + (n % 250) as u8);
    std::net::SocketAddr::new(ip.into(), 0)
}

pub fn worker_config(bootstrap: Option<&Node>, tamper: bool) -> NodeConfig {
    worker_config_at(next_host(), bootstrap, tamper)
}

pub fn worker_config_at(
    listen: std::net::SocketAddr,
    bootstrap: Option<&Node>,
    tamper: bool,
) -> NodeConfig {
    let mut config = NodeConfig::new(listen);
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

pub async fn start(bootstrap: Option<&Node>, tamper: bool) -> Node {
    Node::start(
        Identity::generate().expect("identity"),
        worker_config(bootstrap, tamper),
    )
    .await
    .expect("node starts")
}

/// A node listening on `ip`: nodes started on one address are one host.
pub async fn start_on(ip: std::net::IpAddr, bootstrap: Option<&Node>, tamper: bool) -> Node {
    Node::start(
        Identity::generate().expect("identity"),
        worker_config_at(std::net::SocketAddr::new(ip, 0), bootstrap, tamper),
    )
    .await
    .expect("node starts")
}

/// [`start_on`] on full tables, for tests of what they carry (capacity and job adverts
/// gossiped to every peer).
pub async fn start_table_on(ip: std::net::IpAddr, bootstrap: Option<&Node>, tamper: bool) -> Node {
    let mut config = worker_config_at(std::net::SocketAddr::new(ip, 0), bootstrap, tamper);
    config.discovery = coordinator_free::node::Discovery::Table;
    Node::start(Identity::generate().expect("identity"), config)
        .await
        .expect("node starts")
}

/// Waits (bounded) until the nodes form one network: on full tables every node knows
/// `count - 1` others; on the overlay every node has a neighbour and a survey from the first
/// finds the `count - 1` others.
pub async fn converge(nodes: &[&Node], count: usize) {
    let start = Instant::now();
    loop {
        let mut ok = true;
        let mut overlay = false;
        for node in nodes {
            let status = node.status().await.expect("status");
            ok &= match &status.overlay {
                Some(o) => {
                    overlay = true;
                    o.active > 0
                }
                None => status.peers.len() == count - 1,
            };
        }
        if ok && overlay {
            let all = nodes[0].status_all().await.expect("survey");
            ok = all.peers.len() == count - 1;
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

pub fn reverse_module() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wat/reverse.wat");
    wat::parse_file(path).expect("reverse.wat compiles")
}

/// Writes the module and a manifest of `units` sweep points into `dir`.
pub fn job_files(dir: &Path, units: u32, replicas: u32) -> JobManifest {
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
pub async fn submit(
    node: &Node,
    dir: &Path,
    manifest: JobManifest,
    store: Arc<JobStore>,
) -> JobSummary {
    let units =
        coordinator_free::job::UnitSource::open(&manifest, &dir.join("job.toml")).expect("units");
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

pub fn results(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("out/results.jsonl"))
        .expect("results")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

pub fn base64_decode(text: &str) -> Vec<u8> {
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

/// Checks that `line` is accepted and its output is its sweep input reversed.
pub fn assert_reversed(line: &serde_json::Value) {
    assert_eq!(line["status"], "accepted", "{line}");
    let x = line["input"]["params"]["x"].as_u64().expect("x");
    let expected: Vec<u8> = format!("{{\"x\":{x}}}").bytes().rev().collect();
    let output = match &line["output"] {
        serde_json::Value::String(s) => s.clone(),
        other => other["base64"].as_str().expect("base64 output").to_owned(),
    };
    assert_eq!(base64_decode(&output), expected, "{line}");
}

/// Checks every line: accepted, output = the input reversed, agreed by distinct peers.
pub fn check_reversed(lines: &[serde_json::Value], units: usize, replicas: usize) {
    assert_eq!(lines.len(), units);
    for line in lines {
        assert_reversed(line);
        let agreed = line["agreed"].as_array().expect("agreed");
        assert_eq!(agreed.len(), replicas, "{line}");
        assert_ne!(Some(&agreed[0]), agreed.get(1), "{line}");
    }
}

/// A hand-made submitter: a job link to `worker` from an identity of our own.
pub async fn link_to(worker: &Node) -> PeerLink {
    Sybils::on("127.0.0.1".parse().expect("addr"), 1)
        .link(0, worker, LinkKind::Job)
        .await
        .expect("job link")
}

/// The attacker's machine: many identities behind one address, each with an endpoint of its
/// own bound to that address, so every link it opens comes from the same host.
pub struct Sybils {
    keys: Vec<(Identity, quinn::Endpoint)>,
}

impl Sybils {
    pub fn on(ip: std::net::IpAddr, count: usize) -> Self {
        let keys = (0..count)
            .map(|_| {
                let identity = Identity::generate().expect("identity");
                let endpoint = net::endpoint(
                    &identity,
                    None,
                    std::net::SocketAddr::new(ip, 0),
                    &NetConfig::default(),
                )
                .expect("endpoint");
                (identity, endpoint)
            })
            .collect();
        Self { keys }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn id(&self, key: usize) -> coordinator_free::peer_id::PeerId {
        self.keys[key].0.id()
    }

    /// A link of `kind` from identity `key` to `node`.
    pub async fn link(
        &self,
        key: usize,
        node: &Node,
        kind: LinkKind,
    ) -> Result<PeerLink, net::NetError> {
        self.dial(key, node.id(), node.local_addr(), kind).await
    }

    /// A link of `kind` from identity `key` to `peer` at `addr`.
    pub async fn dial(
        &self,
        key: usize,
        peer: coordinator_free::peer_id::PeerId,
        addr: std::net::SocketAddr,
        kind: LinkKind,
    ) -> Result<PeerLink, net::NetError> {
        let (identity, endpoint) = &self.keys[key];
        net::dial_for(
            endpoint,
            identity,
            None,
            addr,
            Some(peer),
            &NetConfig::default(),
            kind,
        )
        .await
    }
}

pub fn offer(module: &[u8], leases: usize) -> JobFrame {
    offer_job(Digest::of(b"a hostile job"), module, leases)
}

/// An offer of `leases` leases of job `job`, with small inline inputs.
pub fn offer_job(job: Digest, module: &[u8], leases: usize) -> JobFrame {
    JobFrame::Offer(Offer {
        name: "test".into(),
        job,
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
pub async fn next<T>(
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

pub async fn send(link: &mut PeerLink, frame: &JobFrame) {
    wire::write(&mut link.send, frame).await.expect("send");
}

/// Sends `bytes` as the blob `digest`, in chunks of 1 MiB, as a submitter does.
pub async fn send_blob(link: &mut PeerLink, digest: Digest, bytes: &[u8]) {
    for (i, chunk) in bytes.chunks(1 << 20).enumerate() {
        let frame = JobFrame::BlobChunk {
            digest,
            total: bytes.len() as u64,
            offset: (i << 20) as u64,
            bytes: chunk.to_vec().into(),
        };
        wire::write(&mut link.send, &frame)
            .await
            .expect("chunk sent");
    }
}
