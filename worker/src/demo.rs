//! `worker demo`: a small network inside this process. Three peers on loopback join through
//! the first, each donating one core to unit host processes; the first submits an example SIR
//! sweep with two replicas per unit, which spreads over all three, and every unit is accepted
//! only when two distinct hosts (each peer binds its own loopback address) returned identical
//! bytes. With `--liar`, a fourth peer alters every output it returns, and validation outvotes
//! and names it.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use coordinator_free::digest::Digest;
use coordinator_free::identity::Identity;
use coordinator_free::job::JobManifest;
use coordinator_free::job::driver::{JobData, run_job};
use coordinator_free::node::{
    Bootstrap, NetWorkers, Node, NodeConfig, WorkConfig, WorkRunner, net_schedule_config,
};
use coordinator_free::peer_id::PeerId;
use coordinator_free::store::JobStore;

use crate::{Failure, exit};

#[derive(Args)]
pub struct DemoArgs {
    /// Peers in the demo network.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=16))]
    peers: u32,
    /// Add a peer that alters every output it returns, to watch validation catch it.
    #[arg(long)]
    liar: bool,
    /// How the peers find each other: "overlay" (a few neighbours each; the job reaches the
    /// workers as a broadcast advert, and they pull) or "table" (every peer holds every other).
    #[arg(long, value_name = "overlay|table", default_value = "overlay")]
    discovery: coordinator_free::node::Discovery,
}

/// The example sweep: an SIR epidemic over 4 infection rates × 4 recovery rates.
const MANIFEST: &str = r#"
name = "demo-sir-sweep"
module = "sir.wasm"

[inputs.sweep]
beta = [0.2, 0.3, 0.4, 0.5]
gamma = [0.1, 0.15, 0.2, 0.25]
population = 1000000.0
initial_infected = 10.0
days = 365
steps_per_day = 24

[redundancy]
replicas = 2
quorum = 2
max_attempts = 4
"#;

/// Longest wait for the peers to find each other.
const CONVERGE_LIMIT: Duration = Duration::from_secs(20);

pub fn run(args: DemoArgs) -> Result<ExitCode, Failure> {
    let host = |e: anyhow::Error| Failure {
        error: e,
        code: exit::HOST_FAILURE,
    };
    let scratch =
        std::env::temp_dir().join(format!("coordinator-free-demo-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(scratch.clone());
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))
        .map_err(host)?;
    let manifest = JobManifest::parse(MANIFEST, &scratch.join("demo.toml"), &scratch)
        .map_err(|e| host(e.into()))?;
    let units = coordinator_free::job::UnitSource::open(&manifest, &scratch.join("demo.toml"))
        .map_err(|e| host(e.into()))?;
    let module: Arc<[u8]> = Arc::from(example_artifacts::SIR_BYTES);
    let module_digest = Digest::of(&module);
    let job = JobData::new(&manifest, units, module_digest);
    let store = JobStore::open(&scratch.join("submit.redb")).map_err(|e| host(e.into()))?;
    let command = crate::unit_host_command(
        &scratch.join("cache"),
        crate::UnitHostLimits {
            cores: 1,
            unit_memory: 512 << 20,
            cache_mb: crate::DEFAULT_CACHE_MB,
        },
    )
    .map_err(host)?;

    let runtime = crate::peer_runtime().map_err(host)?;
    let total = args.peers + u32::from(args.liar);
    let nodes = runtime
        .block_on(async {
            let mut nodes: Vec<Node> = Vec::new();
            for i in 0..total {
                // Each peer on a loopback address of its own (127.0.0.1, .2, …), so the submitter
                // sees distinct hosts and places replicas on them.
                let ip = std::net::Ipv4Addr::new(127, 0, 0, u8::try_from(i + 1)?);
                let mut config = NodeConfig::new(std::net::SocketAddr::new(ip.into(), 0));
                config.mdns = false;
                config.discovery = args.discovery;
                if let Some(first) = nodes.first() {
                    config.bootstrap = vec![Bootstrap {
                        addr: first.local_addr(),
                        peer: Some(first.id()),
                    }];
                }
                config.capacity.cores_donated = 1;
                config.capacity.cores_free = 1;
                config.capacity.memory_mb = 512;
                let mut work = WorkConfig::new(WorkRunner::UnitHosts(command.clone()), 1);
                work.tamper = args.liar && i == total - 1;
                config.work = Some(work);
                nodes.push(Node::start(Identity::generate()?, config).await?);
            }
            let started = Instant::now();
            loop {
                // Every table holds every other peer; on the overlay, every peer has a
                // neighbour and a survey from the first finds all the others.
                let mut found = true;
                for node in &nodes {
                    let status = node.status().await?;
                    found &= match &status.overlay {
                        Some(o) => o.active > 0,
                        None => status.peers.len() == nodes.len() - 1,
                    };
                }
                if found && args.discovery == coordinator_free::node::Discovery::Overlay {
                    found = nodes[0].status_all().await?.peers.len() == nodes.len() - 1;
                }
                if found {
                    break;
                }
                if started.elapsed() > CONVERGE_LIMIT {
                    return Err(anyhow!("the demo peers did not find each other"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(nodes)
        })
        .map_err(host)?;
    let liar = args.liar.then(|| nodes[nodes.len() - 1].id());
    let names: Vec<(PeerId, String)> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let role = match (i, Some(n.id()) == liar) {
                (0, _) => " (submitter)",
                (_, true) => " (alters its outputs)",
                _ => "",
            };
            (n.id(), format!("peer {}{role}", i + 1))
        })
        .collect();
    println!(
        "coordinator-free demo: {} peers on loopback, job {} of {} units, {} replicas each",
        nodes.len(),
        manifest.name,
        job.count(),
        manifest.redundancy.replicas
    );
    for (id, name) in &names {
        println!("  {name:<28} {id}");
    }

    let mut workers = NetWorkers::new(
        nodes[0].job_dialer(),
        runtime.handle().clone(),
        &job,
        module,
    );
    let config = net_schedule_config(&workers.spec().limits());
    let out = scratch.join("out");
    let summary = run_job(&manifest, &job, config, &mut workers, &store, &out, |_| {})
        .map_err(|e| host(e.into()))?;
    drop(workers);
    runtime.block_on(async {
        for node in nodes {
            node.shutdown().await;
        }
    });

    let short = |peer: &str| {
        names
            .iter()
            .find(|(id, _)| id.to_string() == peer)
            .map_or_else(|| peer.chars().take(8).collect(), |(_, n)| n.clone())
    };
    let text = std::fs::read_to_string(&summary.results)
        .context("cannot read the results")
        .map_err(host)?;
    let mut lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    lines.sort_by_key(|l| l["index"].as_u64());
    println!();
    println!(
        "  {:<20} {:>9} {:>12}  {:<8}  agreed by",
        "unit", "peak day", "peak infect", "status"
    );
    for line in &lines {
        let params = &line["input"]["params"];
        let agreed: Vec<String> = line["agreed"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p.as_str()).map(short).collect())
            .unwrap_or_default();
        let mut extra = String::new();
        if let Some(d) = line["dissented"].as_array().filter(|d| !d.is_empty()) {
            let names: Vec<String> = d.iter().filter_map(|p| p.as_str()).map(short).collect();
            extra = format!("; outvoted: {}", names.join(", "));
        }
        println!(
            "  beta={:<4} gamma={:<5} {:>9} {:>12.0}  {:<8}  {}{extra}",
            params["beta"].to_string(),
            params["gamma"].to_string(),
            line["output"]["peak_day"].to_string(),
            line["output"]["peak_infected"].as_f64().unwrap_or(f64::NAN),
            line["status"].as_str().unwrap_or("?"),
            agreed.join(" + "),
        );
    }
    println!();
    println!(
        "{}/{} units accepted, {} failed: {} executions on {} peers, {} host failures, {:.2} s",
        summary.accepted,
        summary.units,
        summary.failed,
        summary.executions,
        summary.peers.len(),
        summary.host_failures,
        summary.elapsed.as_secs_f64()
    );
    println!(
        "validation: a unit is accepted when {} distinct hosts return byte-identical output",
        manifest.redundancy.quorum
    );
    for (peer, times) in &summary.dissenters {
        println!(
            "dissent: {} returned a different result {times} times and was outvoted",
            short(&peer.to_string())
        );
    }
    // A liar that ran nothing had nothing to catch.
    let caught =
        liar.is_none_or(|l| !summary.peers.contains_key(&l) || summary.dissenters.contains_key(&l));
    if summary.succeeded() && caught {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(Failure {
            error: anyhow!(
                "{} units were not accepted{}",
                summary.units - summary.accepted,
                if caught {
                    ""
                } else {
                    "; the altering peer was not caught"
                }
            ),
            code: exit::UNIT_FAILED,
        })
    }
}

/// Removes the demo's scratch directory however the demo ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
