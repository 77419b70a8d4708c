//! Network benchmark: real `worker run` processes on loopback (mDNS off).
//!
//! ```sh
//! cargo bench -p worker --bench network                 # N = 10 and 50
//! cargo bench -p worker --bench network -- 10 20 100    # other sizes
//! cargo bench -p worker --bench network -- overlay 50 200   # peers on the overlay
//! cargo bench -p worker --bench network -- overlay settle=60 200   # idle 60 s before measuring
//! ```
//!
//! Prints, for each N: the time from spawning N peers (all bootstrapping through the first) until
//! every peer's table holds the other N − 1 (with `overlay`: until every peer has a neighbour
//! and the neighbours link all N into one overlay); the resident memory of the idle peers; what an
//! idle peer sends, from the traffic counters `worker status` reports (QUIC's UDP payload
//! bytes, by kind), over 20 s; and the wall time of a 400-unit job of no-op units submitted
//! through the first peer, with how many peers ran its units. Then the QUIC + TLS 1.3 + hello
//! set-up time of one connection to a running peer. Each peer listens on a loopback address
//! of its own (127.0.40.1, 127.0.40.2, ...), so each is a host of its own to the others.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coordinator_free::control;
use coordinator_free::identity::Identity;
use coordinator_free::net::{self, NetConfig};
use coordinator_free::peer_id::PeerId;

const WORKER: &str = env!("CARGO_BIN_EXE_worker");
/// Longest a run may take to converge before it is reported as a failure.
const CONVERGE_LIMIT: Duration = Duration::from_secs(120);
const SETUP_SAMPLES: usize = 50;
/// How long idle traffic is measured over.
const IDLE_WINDOW: Duration = Duration::from_secs(20);

/// The window idle traffic is averaged over: `window=SECS` among the arguments, else
/// [`IDLE_WINDOW`]. A 20-s window shows bursts (one incoming handshake is a few KB); a longer
/// one shows what a peer costs over time.
fn idle_window() -> Duration {
    std::env::args()
        .find_map(|a| a.strip_prefix("window=").and_then(|s| s.parse().ok()))
        .map_or(IDLE_WINDOW, Duration::from_secs)
}
/// Units of the job run on the converged network.
const JOB_UNITS: u64 = 400;

struct Peer {
    child: Child,
    dir: PathBuf,
}

/// Whether peers run the overlay (`overlay` among the arguments) rather than full tables.
fn overlay() -> bool {
    std::env::args().any(|a| a == "overlay")
}

/// How long the peers idle after converging before memory and traffic are measured:
/// `settle=SECS` among the arguments, 3 s by default.
fn settle() -> Duration {
    let secs = std::env::args()
        .find_map(|a| a.strip_prefix("settle=").and_then(|s| s.parse().ok()))
        .unwrap_or(3);
    Duration::from_secs(secs)
}

fn discovery() -> &'static str {
    if overlay() { "overlay" } else { "table" }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn worker_id(dir: &Path) -> PeerId {
    let out = Command::new(WORKER)
        .args(["id", "--data-dir"])
        .arg(dir)
        .output()
        .expect("worker id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a peer id")
}

fn free_port() -> u16 {
    // Bind, read the port, release it: the first peer then listens there. A race with another
    // program is possible but harmless for a benchmark run.
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn spawn(dir: &Path, listen: SocketAddr, bootstrap: Option<&str>) -> Peer {
    let mut cmd = Command::new(WORKER);
    cmd.args([
        "run",
        "--no-mdns",
        "--cpus",
        "1",
        "--discovery",
        discovery(),
        "--listen",
    ])
    .arg(listen.to_string())
    .arg("--data-dir")
    .arg(dir);
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker run");
    Peer {
        child,
        dir: dir.to_owned(),
    }
}

/// Peer `i`'s loopback address.
fn address(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, 40 + (i / 250) as u8, 1 + (i % 250) as u8)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let i = ((values.len() as f64 - 1.0) * p).round() as usize;
    values.get(i).copied().unwrap_or(f64::NAN)
}

/// Each peer's status; `None` where the control socket is not up yet.
async fn statuses(peers: &[Peer]) -> Vec<Option<control::StatusReport>> {
    let mut out = Vec::with_capacity(peers.len());
    for peer in peers {
        out.push(control::status(&peer.dir).await.ok());
    }
    out
}

/// Whether the network has converged: every table holds the other `n - 1`, or on the overlay,
/// every peer has a neighbour and the neighbours link all `n` together.
fn has_converged(reports: &[Option<control::StatusReport>], n: usize) -> bool {
    let Some(reports) = reports
        .iter()
        .map(Option::as_ref)
        .collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    if !overlay() {
        return reports.iter().all(|r| r.peers.len() == n - 1);
    }
    let index: std::collections::HashMap<PeerId, usize> =
        reports.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
    let mut seen = vec![false; reports.len()];
    let mut stack = vec![0];
    seen[0] = true;
    while let Some(i) = stack.pop() {
        for p in reports[i].peers.iter().filter(|p| p.connected) {
            if let Some(&j) = index.get(&p.id)
                && !seen[j]
            {
                seen[j] = true;
                stack.push(j);
            }
        }
    }
    seen.iter().all(|s| *s) && reports.iter().all(|r| r.connections > 0)
}

struct Run {
    n: usize,
    converged: Option<Duration>,
    all_up: Duration,
    rss_kib: Vec<f64>,
}

async fn converge(n: usize) -> (Run, Vec<Peer>, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs: Vec<PathBuf> = (0..n).map(|i| tmp.path().join(format!("p{i}"))).collect();
    // Keys are made before timing: a first run's key generation is not membership's cost.
    let first_id = worker_id(&dirs[0]);
    for dir in &dirs[1..] {
        let _ = worker_id(dir);
    }
    let first_addr = SocketAddr::from((address(0), free_port()));
    let bootstrap = format!("{first_id}@{first_addr}");

    let start = Instant::now();
    let mut peers = vec![spawn(&dirs[0], first_addr, None)];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        peers.push(spawn(
            dir,
            SocketAddr::from((address(i), 0)),
            Some(&bootstrap),
        ));
    }
    let mut all_up = None;
    let mut converged = None;
    while start.elapsed() < CONVERGE_LIMIT {
        let reports = statuses(&peers).await;
        if all_up.is_none() && reports.iter().all(Option::is_some) {
            all_up = Some(start.elapsed());
        }
        if has_converged(&reports, n) {
            converged = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the peers settle into their idle state before measuring memory.
    tokio::time::sleep(settle()).await;
    let rss_kib = peers
        .iter()
        .filter_map(|p| rss_kib(p.child.id()))
        .map(|k| k as f64)
        .collect();
    (
        Run {
            n,
            converged,
            all_up: all_up.unwrap_or(CONVERGE_LIMIT),
            rss_kib,
        },
        peers,
        tmp,
    )
}

/// Bytes each peer sent per second over [`idle_window`], all kinds and membership alone, in
/// the peers' order (`None` for a peer whose status did not answer).
async fn idle_sent(peers: &[Peer]) -> Vec<Option<(f64, f64)>> {
    let sent = |t: &coordinator_free::traffic::TrafficReport| {
        (
            t.membership.total.sent + t.jobs.total.sent + t.blobs.total.sent,
            t.membership.total.sent,
        )
    };
    let mut before = Vec::with_capacity(peers.len());
    for peer in peers {
        before.push(
            control::status(&peer.dir)
                .await
                .ok()
                .map(|s| (Instant::now(), sent(&s.traffic))),
        );
    }
    tokio::time::sleep(idle_window()).await;
    let mut out = Vec::with_capacity(peers.len());
    for (peer, before) in peers.iter().zip(before) {
        let (Some((t0, (all0, m0))), Ok(status)) = (before, control::status(&peer.dir).await)
        else {
            out.push(None);
            continue;
        };
        let secs = t0.elapsed().as_secs_f64();
        let (all1, m1) = sent(&status.traffic);
        out.push(Some((
            all1.saturating_sub(all0) as f64 / secs,
            m1.saturating_sub(m0) as f64 / secs,
        )));
    }
    out
}

/// The bootstrap peer's idle traffic beside the network's size as the peers estimate it:
/// contact shuffles, which all land on the bootstrap peer, slow down only once the estimate
/// says the network is large.
async fn estimates(peers: &[Peer], bootstrap_sent: f64) -> String {
    let mut sizes = Vec::new();
    let mut unknown = 0;
    let mut first = None;
    for (i, status) in statuses(peers).await.into_iter().enumerate() {
        let Some(overlay) = status.and_then(|s| s.overlay) else {
            continue;
        };
        if i == 0 {
            first = Some((overlay.estimated_peers, overlay.census_samples));
        }
        match overlay.estimated_peers {
            Some(n) => sizes.push(n as f64),
            None => unknown += 1,
        }
    }
    let (low, high) = (
        sizes.iter().copied().fold(f64::INFINITY, f64::min),
        sizes.iter().copied().fold(0.0, f64::max),
    );
    format!(
        "bootstrap peer: {bootstrap_sent:.0} B/s sent, its size estimate {:?} from {} samples; the peers' estimates: median {:.0}, range {low:.0}-{high:.0}, {unknown} with none",
        first.and_then(|f| f.0),
        first.map_or(0, |f| f.1),
        median(&mut sizes),
    )
}

/// The three peers that sent the most while idle (`sent` in the peers' order), with what they
/// hold: connections and the overlay's views.
async fn top_senders(peers: &[Peer], sent: &[f64]) -> String {
    let mut order: Vec<usize> = (0..sent.len().min(peers.len())).collect();
    order.sort_by(|a, b| sent[*b].total_cmp(&sent[*a]));
    let mut parts = Vec::new();
    for &i in order.iter().take(3) {
        let Ok(s) = control::status(&peers[i].dir).await else {
            continue;
        };
        let (active, passive) = s.overlay.as_ref().map_or((0, 0), |o| (o.active, o.passive));
        parts.push(format!(
            "peer {i}: {:.0} B/s, {} connections, active {active}, passive {passive}",
            sent[i], s.connections
        ));
    }
    format!("most idle traffic: {}", parts.join("; "))
}

/// Submits a job of no-op units through the first peer; its wall time and the number of peers
/// that ran its units, from the summary.
fn run_job(bootstrap: &str) -> (Duration, Option<usize>) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("noop.wat"),
        include_str!("../../examples/wat/noop.wat"),
    )
    .expect("module");
    std::fs::write(
        dir.path().join("job.toml"),
        format!(
            "name = \"many\"\nmodule = \"noop.wat\"\n[inputs.sweep]\nseed = {{ start = 1, stop = {JOB_UNITS}, step = 1 }}\n[redundancy]\nreplicas = 1\nquorum = 1\n"
        ),
    )
    .expect("manifest");
    let start = Instant::now();
    let out = Command::new(WORKER)
        .arg("submit")
        .arg(dir.path().join("job.toml"))
        .args([
            "--bootstrap",
            bootstrap,
            "--cpus",
            "0",
            "--no-mdns",
            "--discovery",
            discovery(),
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--out")
        .arg(dir.path().join("out"))
        .stdin(Stdio::null())
        .output()
        .expect("worker submit");
    let wall = start.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let took_part = text
        .lines()
        .find_map(|l| {
            l.split("; ")
                .find_map(|p| p.strip_suffix(" peers took part"))
        })
        .and_then(|n| n.trim().parse().ok());
    (wall, took_part.filter(|_| out.status.success()))
}

async fn setup_times(target: &Peer) -> Vec<f64> {
    let status = control::status(&target.dir).await.expect("status");
    let identity = Identity::generate().expect("identity");
    let config = NetConfig::default();
    let endpoint = net::endpoint(
        &identity,
        None,
        "127.0.0.1:0".parse().expect("addr"),
        &config,
    )
    .expect("endpoint");
    let mut times = Vec::with_capacity(SETUP_SAMPLES);
    for _ in 0..SETUP_SAMPLES {
        let start = Instant::now();
        let link = net::dial(
            &endpoint,
            &identity,
            None,
            status.listen,
            Some(status.id),
            &config,
        )
        .await
        .expect("dial");
        times.push(start.elapsed().as_secs_f64() * 1e3);
        link.conn.close(0u32.into(), b"bench");
        // Let the peer retire the connection so samples do not pile up.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    endpoint.close(0u32.into(), b"bench");
    times
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .filter(|&n| n >= 2)
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10, 50]
    } else {
        sizes
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!("worker binary: {WORKER}");
        println!();
        println!(
            "discovery: {}, settling {} s after convergence, idle traffic averaged over {} s",
            discovery(),
            settle().as_secs(),
            idle_window().as_secs()
        );
        println!("| peers | all control sockets up | converged ({}) | idle RSS median | idle RSS max | idle B/s sent per peer: median / max | of it membership: median / max | {JOB_UNITS} no-op units: wall, peers that ran some |", if overlay() { "one connected overlay" } else { "every table N-1" });
        println!("|---|---|---|---|---|---|---|---|");
        let mut last = None;
        for &n in &sizes {
            let (mut run, peers, tmp) = converge(n).await;
            let converged = run
                .converged
                .map_or("did not converge".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
            let rss_median = median(&mut run.rss_kib) / 1024.0;
            let rss_max = run.rss_kib.iter().copied().fold(0.0, f64::max) / 1024.0;
            let sent = idle_sent(&peers).await;
            if overlay() {
                let bootstrap_sent = sent.first().copied().flatten().map_or(0.0, |s| s.0);
                println!("{}", estimates(&peers, bootstrap_sent).await);
                // Peers that did not answer rank last.
                let by_peer: Vec<f64> = sent.iter().map(|s| s.map_or(0.0, |s| s.0)).collect();
                println!("{}", top_senders(&peers, &by_peer).await);
            }
            let (mut all, mut membership): (Vec<f64>, Vec<f64>) = sent.into_iter().flatten().unzip();
            let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
            let (all_max, membership_max) = (max(&all), max(&membership));
            let bootstrap = {
                let first = control::status(&peers[0].dir).await.expect("first peer's status");
                format!("{}@{}", first.id, first.listen)
            };
            let (wall, took_part) = run_job(&bootstrap);
            println!(
                "| {} | {:.2} s | {} | {:.1} MiB | {:.1} MiB | {:.0} / {:.0} | {:.0} / {:.0} | {:.2} s, {} |",
                run.n,
                run.all_up.as_secs_f64(),
                converged,
                rss_median,
                rss_max,
                median(&mut all),
                all_max,
                median(&mut membership),
                membership_max,
                wall.as_secs_f64(),
                took_part.map_or("failed".to_owned(), |n| n.to_string()),
            );
            last = Some((peers, tmp));
        }
        // Set-up is timed on a peer-table link (`net::dial`'s protocol), which an overlay
        // peer refuses: only table runs measure it.
        if let Some((peers, _tmp)) = last.as_ref().filter(|_| !overlay()) {
            let mut times = setup_times(&peers[0]).await;
            println!();
            println!(
                "connection set-up (QUIC + TLS 1.3 mutual auth + hello, loopback, {} samples): median {:.2} ms, p90 {:.2} ms, min {:.2} ms",
                times.len(),
                median(&mut times),
                percentile(&mut times, 0.9),
                times.iter().copied().fold(f64::INFINITY, f64::min)
            );
        }
    });
}
