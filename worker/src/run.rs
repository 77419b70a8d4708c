//! `worker run`: join the network, run other peers' units on the donated cores, and stay up
//! until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{ArgMatches, Args};
use coordinator_free::conditions::{Conditions, Window};
use coordinator_free::control::SOCKET_FILE;
use coordinator_free::identity::{AllowList, Identity};
use coordinator_free::membership::{MAX_CORES, MAX_MEMORY_MB};
use coordinator_free::node::{BootstrapArg, Donation, Node, NodeConfig, WorkConfig, WorkRunner};
use coordinator_free::sandbox::UnitHostCommand;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::{Failure, exit};

/// The port peers listen on unless told otherwise, so a bare `IP` bootstrap is easy to guess.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7401";

/// Below this share of memory per donated core, most jobs' units (256 MiB by default) are
/// declined: worth a warning.
const MIN_USEFUL_MB_PER_CORE: u32 = 256;

#[derive(Args, Clone, Debug, Serialize)]
pub struct RunArgs {
    /// Settings file (TOML; default: $XDG_CONFIG_HOME/coordinator-free/worker.toml). Every
    /// flag below is a key of the same name in snake_case; a flag given here wins over its key.
    /// Edits (and SIGHUP) apply while the peer runs.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address to accept peers on (`IP:PORT` or `HOST:PORT`; port 0 picks a free one).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN, value_parser = crate::listen_addr)]
    listen: SocketAddr,
    /// A peer to join through: `IP:PORT` or `HOST:PORT` (looked up at start and again while
    /// no peer answers), either optionally as `ID@...` to also check its identity. Repeatable.
    #[arg(long, value_name = "[ID@]ADDR")]
    #[serde(serialize_with = "crate::config::as_texts")]
    bootstrap: Vec<BootstrapArg>,
    /// Where the identity key and caches live (default: ~/.local/share/coordinator-free).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Cores to donate (default: all of this machine's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_CORES)))]
    cpus: Option<u16>,
    /// Memory to offer, in MiB (default: 512 per donated core); while the machine is in use
    /// when --memory-mb-idle is given.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_MEMORY_MB)))]
    memory_mb: Option<u32>,
    /// Memory to offer while nobody has used the machine for --idle-after minutes, in MiB
    /// (default: the same as --memory-mb). Units already running keep the share they started
    /// with; new ones get the new share.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_MEMORY_MB)))]
    memory_mb_idle: Option<u32>,
    /// Longest a unit may run here, in seconds: jobs whose units may run longer are declined
    /// and run elsewhere.
    #[arg(long, value_name = "SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    max_unit_secs: u64,
    /// Most disk space, in MiB, for everything this peer keeps in its data directory as a
    /// volunteer: its key, the record of what it gave, and compiled modules, which are removed
    /// least recently used first to stay under it. A submitter's job journal is the user's own
    /// results and is not counted.
    #[arg(long, alias = "max-cache-mb", value_name = "N", default_value_t = crate::DEFAULT_CACHE_MB, value_parser = clap::value_parser!(u64).range(1..))]
    max_disk_mb: u64,
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
    /// How peers are found: "overlay" (a few neighbours each, job adverts broadcast, for
    /// networks of any size) or "table" (every peer holds every other, for a lab). Every peer
    /// of a network must use the same.
    #[arg(long, value_name = "overlay|table", default_value = "overlay")]
    discovery: coordinator_free::node::Discovery,
    /// Offer to introduce peers behind NAT to each other: they keep a reservation here and are
    /// reached through it (at most 128 reservations, 4 per host, an hour each). Only useful on
    /// a peer others can dial.
    #[arg(long)]
    relay: bool,
    /// This peer is behind NAT: keep a reservation on the relay peer at `[ID@]IP:PORT`,
    /// advertise the address it sees this peer at, and let peers it introduces dial in.
    #[arg(long, value_name = "[ID@]IP:PORT", conflicts_with_all = ["dial_out_only", "advertise"])]
    #[serde(serialize_with = "crate::config::as_text_option")]
    via_relay: Option<coordinator_free::node::Bootstrap>,
    /// Work only while nobody uses this machine: no keyboard or mouse input for --idle-after.
    #[arg(long)]
    only_when_idle: bool,
    /// Minutes without keyboard or mouse input after which the machine counts as idle.
    #[arg(long, value_name = "MINUTES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=1440))]
    idle_after: u32,
    /// Stop work while other programs use more than this share of the machine's CPU, in
    /// percent (BOINC's default is 25).
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    suspend_above_cpu_percent: Option<u8>,
    /// Work while the machine runs on its battery too.
    #[arg(long)]
    run_on_battery: bool,
    /// Stop work while the machine's hottest sensor is at or above this, in °C.
    #[arg(long, value_name = "CELSIUS", value_parser = clap::value_parser!(u8).range(30..=120))]
    max_temperature_c: Option<u8>,
    /// Work only inside this weekly window, in local time: "Mon-Fri 18:00-08:00", "Sat-Sun",
    /// "22:00-06:00". Repeatable; none means any time.
    #[arg(long, value_name = "WINDOW", value_parser = window_text)]
    windows: Vec<String>,
    /// Let the units use at most this share of each donated core's time while someone uses the
    /// machine, in percent: the unit hosts are stopped and continued several times a second.
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    max_cpu_percent: Option<u8>,
    /// The same while the machine is idle (default: all of it).
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
    max_cpu_percent_idle: Option<u8>,
    /// Serve a web page of this peer's state, units, contribution and peers, with a pause
    /// button, at this address (`127.0.0.1:PORT`; port 0 picks a free one). It needs the token
    /// printed at start, kept in the data directory's `ui-token`.
    #[arg(long, value_name = "IP:PORT")]
    ui: Option<SocketAddr>,
    /// Let --ui take an address other machines can reach (the token still guards it, but it
    /// travels unencrypted).
    #[arg(long, requires = "ui")]
    ui_remote: bool,
}

/// A window as given, once it parses.
fn window_text(text: &str) -> Result<String, String> {
    Window::parse(text)
        .map(|_| text.trim().to_string())
        .map_err(|e| e.to_string())
}

/// When the peer may work, from its settings.
fn conditions(args: &RunArgs) -> Conditions {
    Conditions {
        only_when_idle: args.only_when_idle,
        idle_after: Duration::from_secs(60 * u64::from(args.idle_after)),
        suspend_above_cpu_percent: args.suspend_above_cpu_percent.map(f64::from),
        run_on_battery: args.run_on_battery,
        max_temperature_c: args.max_temperature_c.map(f64::from),
        // Each was checked as it was read.
        windows: args
            .windows
            .iter()
            .filter_map(|w| Window::parse(w).ok())
            .collect(),
        max_cpu_percent: args.max_cpu_percent,
        max_cpu_percent_idle: args.max_cpu_percent_idle,
        memory_mb_idle: args.memory_mb_idle,
    }
}

/// Settings of when to work: a running peer applies them from an edited config file.
const CONDITION_KEYS: [&str; 9] = [
    "only_when_idle",
    "idle_after",
    "suspend_above_cpu_percent",
    "run_on_battery",
    "max_temperature_c",
    "windows",
    "max_cpu_percent",
    "max_cpu_percent_idle",
    "memory_mb_idle",
];

/// Settings a running peer takes from an edited config file; the others apply at its next
/// start.
const LIVE_KEYS: [&str; 3] = ["cpus", "memory_mb", "memory_mb_idle"];

/// How often the config file is looked at for changes.
const CONFIG_POLL: Duration = Duration::from_secs(2);

/// `worker run` with the flags of `command_line`, layered over the config file.
pub fn run(command_line: &ArgMatches) -> Result<ExitCode, Failure> {
    let file = crate::config::ConfigFile::of(command_line);
    // Taken before the file is read, so an edit made meanwhile is seen by the first poll.
    let stamp = file.as_ref().and_then(|f| crate::config::stamp(&f.path));
    let layered = crate::config::layer(command_line).map_err(Failure::usage)?;
    let args = layered.args.clone();
    let dir = crate::data_dir(args.data_dir.clone())
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

    if args.via_relay.is_some() && args.discovery != coordinator_free::node::Discovery::Overlay {
        return Err(Failure::usage(anyhow!(
            "--via-relay needs --discovery overlay: a peer behind NAT is introduced to the peers that ask, which the full tables do not do"
        )));
    }
    let mut config = NodeConfig::new(args.listen);
    for arg in args.bootstrap.iter().cloned() {
        config.add_bootstrap(arg);
    }
    config.mdns = !args.no_mdns;
    config.allow = allow;
    config.discovery = args.discovery;
    config.offer_relay = args.relay.then(Default::default);
    config.via_relay = args.via_relay;
    config.control_socket = Some(dir.join(SOCKET_FILE));
    if args.dial_out_only {
        config.advertise = Some(Vec::new());
    } else if !args.advertise.is_empty() {
        config.advertise = Some(args.advertise.clone());
    }
    warn_about_donation(&args);
    let donation = donation(&args, None);
    config.capacity.cores_donated = donation.cores;
    config.capacity.cores_free = donation.cores;
    config.capacity.memory_mb = donation.memory_mb;
    let cache_mb =
        cache_budget(&dir, args.max_disk_mb).map_err(|e| Failure::usage(anyhow::anyhow!(e)))?;
    let command = unit_hosts(&dir, &donation, cache_mb).map_err(internal)?;
    let mut work = WorkConfig::new(WorkRunner::UnitHosts(command), u32::from(donation.cores));
    work.memory_per_slot = donation.memory_per_slot();
    work.max_unit_time = Duration::from_secs(args.max_unit_secs);
    work.data_dir = Some(dir.clone());
    config.work = Some(work);

    let runtime = crate::peer_runtime().map_err(internal)?;
    runtime.block_on(async move {
        // Before the node answers anyone: from then on a SIGHUP reloads, never kills.
        let mut hangup = signal(SignalKind::hangup())
            .context("cannot watch SIGHUP")
            .map_err(internal)?;
        let node = Node::start(identity, config)
            .await
            .map_err(Failure::usage)?;
        println!("peer {} listening on {}", node.id(), node.local_addr());
        let page = match args.ui {
            Some(addr) => Some(serve_page(&node, addr, args.ui_remote, &dir).await?),
            None => None,
        };
        say_if_paused(&node).await;
        let (when, settings) = tokio::sync::watch::channel(conditions(&args));
        let (memory_tx, mut memory) = tokio::sync::watch::channel(None);
        if let Some(switch) = node.suspend_switch() {
            tokio::spawn(coordinator_free::conditions::watch(
                switch, settings, memory_tx,
            ));
        }
        let mut live = Live {
            when,
            command_line: command_line.clone(),
            file,
            stamp,
            started: args.clone(),
            last: args,
            dir,
            cache_mb,
            idle_memory: None,
        };
        let stop = wait_for_stop();
        tokio::pin!(stop);
        let mut poll = tokio::time::interval(CONFIG_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                stopped = &mut stop => {
                    stopped.map_err(internal)?;
                    break;
                }
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: reading the config file again");
                    live.reload(&node).await;
                }
                _ = poll.tick() => {
                    if live.file_changed() {
                        live.reload(&node).await;
                    }
                }
                Ok(()) = memory.changed() => {
                    live.idle_memory = *memory.borrow_and_update();
                    let why = if live.idle_memory.is_some() {
                        "the machine is idle"
                    } else {
                        "the machine is in use"
                    };
                    live.donate(&node, why).await;
                }
            }
        }
        tracing::info!("stopping");
        if let Some(page) = page {
            page.abort();
        }
        node.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// What a running peer needs to apply an edited config file.
struct Live {
    /// When the peer may work, for the task that watches the machine.
    when: tokio::sync::watch::Sender<Conditions>,
    /// The flags given at start: they keep winning over the file.
    command_line: ArgMatches,
    file: Option<crate::config::ConfigFile>,
    stamp: Option<crate::config::Stamp>,
    /// The settings the peer started with: those that need a restart are still these.
    started: RunArgs,
    /// The settings last read: changes are reported once, against these.
    last: RunArgs,
    dir: PathBuf,
    /// The compiled modules' share of `max_disk_mb`, fixed at start.
    cache_mb: u64,
    /// The memory offered while the machine is idle, while it is (`memory_mb_idle`).
    idle_memory: Option<u32>,
}

impl Live {
    fn file_changed(&mut self) -> bool {
        let Some(file) = &self.file else {
            return false;
        };
        let now = crate::config::stamp(&file.path);
        now != std::mem::replace(&mut self.stamp, now)
    }

    /// Reads the settings again: a file that cannot be used is one warning and changes
    /// nothing; the donated capacity is applied at once; other changes are named as waiting
    /// for the next start.
    async fn reload(&mut self, node: &Node) {
        if let Some(file) = &self.file {
            self.stamp = crate::config::stamp(&file.path);
        }
        let layered = match crate::config::layer(&self.command_line) {
            Ok(layered) => layered,
            Err(err) => {
                tracing::warn!(
                    "{}; the running settings stay",
                    coordinator_free::node::error_chain(&err)
                );
                return;
            }
        };
        let where_ = self
            .file
            .as_ref()
            .map_or_else(String::new, |f| f.path.display().to_string());
        let next = layered.args;
        let (started, before, after) = (as_map(&self.started), as_map(&self.last), as_map(&next));
        let changed: Vec<&str> = after
            .iter()
            .filter(|(key, value)| before.get(*key) != Some(*value))
            .map(|(key, _)| key.as_str())
            .collect();
        // Set back to what the peer runs with, a change that waited is no longer news.
        let waiting: Vec<&str> = changed
            .iter()
            .copied()
            .filter(|k| {
                !LIVE_KEYS.contains(k)
                    && !CONDITION_KEYS.contains(k)
                    && after.get(*k) != started.get(*k)
            })
            .collect();
        if !waiting.is_empty() {
            tracing::warn!(
                "{} changed in {where_}; applies at the next start",
                waiting.join(", ")
            );
        }
        if changed.iter().any(|k| CONDITION_KEYS.contains(k)) {
            self.when.send_replace(conditions(&next));
            tracing::info!("when to work changed in {where_}; applied");
        }
        let redonate = changed.iter().any(|k| LIVE_KEYS.contains(k));
        // Settings that wait for a restart are reported once, not at every reload.
        self.last = next;
        if redonate {
            warn_about_donation(&self.last);
            // The idle amount applies from the next look at the machine.
            if self.last.memory_mb_idle.is_none() {
                self.idle_memory = None;
            }
            self.donate(node, &format!("{where_} changed")).await;
        }
    }

    /// Donates what the last settings say, with the idle memory while the machine is idle.
    async fn donate(&self, node: &Node, why: &str) {
        let mut donation = donation(&self.last, self.idle_memory);
        // Unit hosts keep the cache cap the peer started with.
        match unit_hosts(&self.dir, &donation, self.cache_mb) {
            Ok(command) => {
                donation.unit_host = Some(command);
                let (cores, memory_mb) = (donation.cores, donation.memory_mb);
                match node.donate(donation).await {
                    Ok(()) => tracing::info!(cores, memory_mb, "donation applied: {why}"),
                    Err(err) => tracing::warn!(%err, "cannot apply the new donation"),
                }
            }
            Err(err) => tracing::warn!("{err:#}; the running settings stay"),
        }
    }
}

/// The settings as a map from key to value, to see which changed.
fn as_map(args: &RunArgs) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(args) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

/// This machine's cores, as a peer donates them when not told otherwise.
fn machine_cores() -> u16 {
    std::thread::available_parallelism()
        .map_or(1, |n| u16::try_from(n.get()).unwrap_or(MAX_CORES))
        .min(MAX_CORES)
}

/// Cores and MiB a peer with these settings donates: `cpus`, else every core; `memory_mb`,
/// else 512 per donated core.
pub(crate) fn capacity_of(args: &RunArgs) -> (u16, u32) {
    let cores = args.cpus.unwrap_or_else(machine_cores);
    let memory_mb = args
        .memory_mb
        .unwrap_or_else(|| 512u32.saturating_mul(u32::from(cores)).min(MAX_MEMORY_MB));
    (cores, memory_mb)
}

/// What a peer with these settings donates; with `idle_memory`, that much memory in place of
/// `memory_mb`.
fn donation(args: &RunArgs, idle_memory: Option<u32>) -> Donation {
    let (cores, in_use) = capacity_of(args);
    Donation {
        cores,
        memory_mb: idle_memory.unwrap_or(in_use),
        unit_host: None,
    }
}

/// Warns about donation settings that work badly: once at start and once per config change,
/// not each time the machine turns idle or busy.
fn warn_about_donation(args: &RunArgs) {
    let (cores, memory_mb) = capacity_of(args);
    let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
    if usize::from(cores) > machine {
        tracing::warn!(
            "--cpus {cores} is more than this machine's {machine} cores: units will share cores and each run slower"
        );
    }
    let per_core = memory_mb / u32::from(cores.max(1));
    if args.memory_mb.is_some() && per_core < MIN_USEFUL_MB_PER_CORE {
        tracing::warn!(
            "--memory-mb {memory_mb} leaves {per_core} MiB per donated core: units that need more are declined"
        );
    }
}

/// Room kept for the record of what this peer gave to grow: a day's entry is about 100 bytes,
/// and the record keeps ten years of days.
const LEDGER_GROWTH_MB: u64 = 1;
/// Most entries of the data directory looked at when adding up its size.
const MAX_DIR_ENTRIES: usize = 10_000;

/// The compiled modules' share of `max_disk_mb`: what is left after everything else the peer
/// keeps in `dir` (its key, the record of what it gave, the web page's token, a pause) and
/// room for the record to grow. A submitter's job journal and identity are the user's, not
/// the volunteer peer's, and are left out.
fn cache_budget(dir: &std::path::Path, max_disk_mb: u64) -> Result<u64, String> {
    let mut others = 0u64;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten().take(MAX_DIR_ENTRIES) {
            if entry.file_name() == "submit.redb" {
                continue;
            }
            // Files only: the module cache is a directory, as is a submitter's identity, and
            // the volunteer peer keeps no other.
            if let Ok(meta) = entry.metadata()
                && meta.is_file()
            {
                others = others.saturating_add(meta.len());
            }
        }
    }
    let others_mb = others.div_ceil(1 << 20) + LEDGER_GROWTH_MB;
    match max_disk_mb.checked_sub(others_mb) {
        Some(left) if left >= 1 => Ok(left),
        _ => Err(format!(
            "--max-disk-mb {max_disk_mb} leaves no room for compiled modules: this peer's other files in {} take up to {others_mb} MiB",
            dir.display()
        )),
    }
}

/// How unit hosts start for `donation`: compiling on at most its cores, each capped at one
/// core's share of the memory (a unit may use that share) plus what the engine needs.
fn unit_hosts(
    dir: &std::path::Path,
    donation: &Donation,
    cache_mb: u64,
) -> anyhow::Result<UnitHostCommand> {
    crate::unit_host_command(
        dir,
        crate::UnitHostLimits {
            cores: u32::from(donation.cores),
            unit_memory: donation.memory_per_slot(),
            cache_mb,
        },
    )
}

/// Binds the web page and serves it beside the node; prints where to open it.
async fn serve_page(
    node: &Node,
    addr: SocketAddr,
    remote: bool,
    dir: &std::path::Path,
) -> Result<tokio::task::JoinHandle<()>, Failure> {
    let ui = coordinator_free::ui::Ui::bind(addr, remote, dir)
        .await
        .map_err(Failure::usage)?;
    println!("web page at {}", ui.url());
    let source = coordinator_free::ui::PageSource {
        node: node.control(),
        data_dir: Some(dir.to_path_buf()),
        job: None,
    };
    Ok(tokio::spawn(ui.serve(source)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_modules_get_what_the_peers_other_files_leave_of_the_disk_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        std::fs::write(path.join("identity.key"), [0u8; 64]).unwrap();
        std::fs::write(path.join("given.json"), vec![b' '; 1500 << 10]).unwrap();
        // A submitter's journal is the user's results, not the volunteer peer's store.
        std::fs::write(path.join("submit.redb"), vec![0u8; 5 << 20]).unwrap();
        std::fs::create_dir(path.join("modules")).unwrap();
        std::fs::write(path.join("modules").join("m"), vec![0u8; 3 << 20]).unwrap();
        // 1.5 MiB of files round up to 2, and the record of gifts may grow by 1.
        assert_eq!(cache_budget(path, 1024), Ok(1021));
        assert_eq!(cache_budget(path, 4), Ok(1));
        let refused = cache_budget(path, 3).unwrap_err();
        assert!(
            refused.contains("--max-disk-mb 3 leaves no room"),
            "{refused}"
        );
        assert!(refused.contains("up to 3 MiB"), "{refused}");
        // A fresh data directory: only the room to grow is set aside.
        let fresh = tempfile::tempdir().unwrap();
        assert_eq!(cache_budget(&fresh.path().join("absent"), 1024), Ok(1023));
    }
}
