//! `worker run`: join the network, run other peers' units on the donated cores, and stay up
//! until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::Args;
use coordinator_free::control::SOCKET_FILE;
use coordinator_free::identity::{AllowList, Identity};
use coordinator_free::membership::{MAX_CORES, MAX_MEMORY_MB};
use coordinator_free::node::{BootstrapArg, Node, NodeConfig, WorkConfig, WorkRunner};

use crate::{Failure, exit};

/// The port peers listen on unless told otherwise, so a bare `IP` bootstrap is easy to guess.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7401";

/// Below this share of memory per donated core, most jobs' units (256 MiB by default) are
/// declined: worth a warning.
const MIN_USEFUL_MB_PER_CORE: u32 = 256;

#[derive(Args)]
pub struct RunArgs {
    /// Address to accept peers on (`IP:PORT` or `HOST:PORT`; port 0 picks a free one).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN, value_parser = crate::listen_addr)]
    listen: SocketAddr,
    /// A peer to join through: `IP:PORT` or `HOST:PORT` (looked up at start and again while
    /// no peer answers), either optionally as `ID@...` to also check its identity. Repeatable.
    #[arg(long, value_name = "[ID@]ADDR")]
    bootstrap: Vec<BootstrapArg>,
    /// Where the identity key and caches live (default: ~/.local/share/coordinator-free).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Cores to donate (default: all of this machine's).
    #[arg(long, value_name = "N")]
    cpus: Option<u16>,
    /// Memory to offer, in MiB (default: 512 per donated core).
    #[arg(long, value_name = "N")]
    memory_mb: Option<u32>,
    /// Longest a unit may run here, in seconds: jobs whose units may run longer are declined
    /// and run elsewhere.
    #[arg(long, value_name = "SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    max_unit_secs: u64,
    /// Most disk space for compiled modules, in MiB; the least recently used go first.
    #[arg(long, value_name = "N", default_value_t = crate::DEFAULT_CACHE_MB, value_parser = clap::value_parser!(u64).range(1..))]
    max_cache_mb: u64,
    /// Do not announce or look for peers on the local network.
    #[arg(long)]
    no_mdns: bool,
    /// Advertise this address instead of those found from --listen (a forwarded port, say).
    /// Repeatable.
    #[arg(long, value_name = "IP:PORT", conflicts_with = "dial_out_only")]
    advertise: Vec<SocketAddr>,
    /// Advertise no address: this peer cannot be dialed (behind NAT). It joins by dialing out,
    /// and asks submitters for work on links it opens itself.
    #[arg(long)]
    dial_out_only: bool,
    /// Lab mode: a file of peer ids (one per line); only they may connect.
    #[arg(long, value_name = "FILE")]
    allow: Option<PathBuf>,
}

pub fn run(args: RunArgs) -> Result<ExitCode, Failure> {
    let dir = crate::data_dir(args.data_dir)
        .ok_or_else(|| Failure::usage(anyhow!("no data directory: pass --data-dir DIR")))?;
    let identity = Identity::load_or_create(&dir).map_err(Failure::usage)?;
    let allow = args
        .allow
        .as_deref()
        .map(AllowList::load)
        .transpose()
        .map_err(Failure::usage)?;
    if let (Some(list), Some(path)) = (&allow, &args.allow)
        && list.is_empty()
    {
        tracing::warn!(
            "--allow {}: the file names no peer, so no peer may connect to this one and it can join no network",
            path.display()
        );
    }

    let mut config = NodeConfig::new(args.listen);
    for arg in args.bootstrap {
        config.add_bootstrap(arg);
    }
    config.mdns = !args.no_mdns;
    config.allow = allow;
    config.control_socket = Some(dir.join(SOCKET_FILE));
    if args.dial_out_only {
        config.advertise = Some(Vec::new());
    } else if !args.advertise.is_empty() {
        config.advertise = Some(args.advertise);
    }
    if let Some(cpus) = args.cpus {
        if cpus == 0 || cpus > MAX_CORES {
            return Err(Failure::usage(anyhow!(
                "--cpus must be between 1 and {MAX_CORES}"
            )));
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if usize::from(cpus) > cores {
            tracing::warn!(
                "--cpus {cpus} is more than this machine's {cores} cores: units will share cores and each run slower"
            );
        }
        config.capacity.cores_donated = cpus;
        config.capacity.cores_free = cpus;
        config.capacity.memory_mb = 512 * u32::from(cpus);
    }
    if let Some(memory_mb) = args.memory_mb {
        if memory_mb == 0 || memory_mb > MAX_MEMORY_MB {
            return Err(Failure::usage(anyhow!(
                "--memory-mb must be between 1 and {MAX_MEMORY_MB}"
            )));
        }
        let per_core = memory_mb / u32::from(config.capacity.cores_donated.max(1));
        if per_core < MIN_USEFUL_MB_PER_CORE {
            tracing::warn!(
                "--memory-mb {memory_mb} leaves {per_core} MiB per donated core: units that need more are declined"
            );
        }
        config.capacity.memory_mb = memory_mb;
    }

    // The memory offered is shared by the donated cores; a unit may use one core's share.
    let memory_per_slot = (u64::from(config.capacity.memory_mb) << 20)
        / u64::from(config.capacity.cores_donated.max(1));
    let command = crate::unit_host_command(
        &dir,
        crate::UnitHostLimits {
            cores: u32::from(config.capacity.cores_donated),
            unit_memory: memory_per_slot,
            cache_mb: args.max_cache_mb,
        },
    )
    .map_err(internal)?;
    let mut work = WorkConfig::new(
        WorkRunner::UnitHosts(command),
        u32::from(config.capacity.cores_donated),
    );
    work.memory_per_slot = memory_per_slot;
    work.max_unit_time = std::time::Duration::from_secs(args.max_unit_secs);
    work.pause_dir = Some(dir.clone());
    config.work = Some(work);

    let runtime = crate::peer_runtime().map_err(internal)?;
    runtime.block_on(async move {
        let node = Node::start(identity, config)
            .await
            .map_err(Failure::usage)?;
        println!("peer {} listening on {}", node.id(), node.local_addr());
        say_if_paused(&node).await;
        wait_for_stop().await.map_err(internal)?;
        tracing::info!("stopping");
        node.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// A peer that starts paused (a pause recorded before this start) says so, or the volunteer
/// would wonder why it takes no work.
async fn say_if_paused(node: &Node) {
    if let Ok(report) = node.status().await
        && report
            .work
            .as_ref()
            .is_some_and(|w| !w.suspended.is_empty())
    {
        println!("{}", crate::pause::state_line(&report));
    }
}

fn internal(error: anyhow::Error) -> Failure {
    Failure {
        error,
        code: exit::INTERNAL as u8,
    }
}

/// Returns on Ctrl-C or SIGTERM (what `kill` and service managers send).
async fn wait_for_stop() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("cannot watch Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot watch Ctrl-C")?;
    Ok(())
}
