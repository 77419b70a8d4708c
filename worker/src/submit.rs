//! `worker submit`: run a job across the network, or on this machine alone.
//!
//! With `--bootstrap`, or when a `worker run` peer is running on the data directory, the
//! submitter starts a peer of its own (with its own identity, so it never impersonates the
//! running one), joins the network through them, and spreads the job's units over every peer
//! that advertises free cores, itself included. Without either, replicas run as redundant
//! executions in local unit host processes, each under its own simulated peer id; they guard
//! against nondeterminism and host failures, not against a lying peer, and the summary says so.
//! Either way the job is journaled in the data directory, so running the same command again
//! resumes it without re-running accepted units.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use coordinator_free::digest::Digest;
use coordinator_free::host::Placement;
use coordinator_free::identity::Identity;
use coordinator_free::job::driver::{JobData, JobProgress, JobSummary, run_job};
use coordinator_free::job::local::{LocalJob, default_out_dir};
use coordinator_free::job::{JobManifest, UnitSource};
use coordinator_free::node::{
    Bootstrap, BootstrapArg, Discovery, NetWorkers, Node, NodeConfig, WorkConfig, WorkRunner,
    net_schedule_config,
};
use coordinator_free::sandbox::{self, Executor, HostedModule, Metering};
use coordinator_free::schedule::Culprit;
use coordinator_free::store::{JobSource, JobStore};
use coordinator_free::ui::JobView;

use crate::{Failure, exit};

/// How long the submitting peer spends saying goodbye once its job is over. The close frames
/// leave on the endpoint's next turn (peers on loopback log them within a millisecond); what
/// the limit cuts short is QUIC's drain after them (three probe timeouts, over 50 ms even on
/// loopback), which only answers stray packets. A peer that misses the goodbye notices the
/// silence by its idle timeout, and by then the job's results are on disk.
const SHUTDOWN_LIMIT: Duration = Duration::from_millis(10);
/// How long the submitting peer waits, before that, for its overlay neighbours to take the
/// withdrawal of its job (a round trip each): workers that heard the offer then stop dialing
/// an address nobody will answer at.
const LEAVE_LIMIT: Duration = Duration::from_millis(300);
/// How long the job waits for the first peers before it starts anyway (and keeps looking).
const JOIN_WAIT: Duration = Duration::from_secs(3);
/// How long a job may run short of the distinct hosts a unit needs before a warning says so.
const HOSTS_WARNING_AFTER: Duration = Duration::from_secs(5);
/// After how long the progress line says the job waits for hosts.
const HOSTS_NOTED_AFTER: Duration = Duration::from_secs(1);
/// How often progress is printed as a plain line when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Args)]
pub struct SubmitArgs {
    /// The job manifest (TOML).
    manifest: PathBuf,
    /// Where `results.jsonl` goes [default: ./<job name>-results].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The peer's data directory (job journal and compiled-module cache).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Cores to run units on [default: all]; 0 runs none here (network jobs only).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1024))]
    cpus: Option<u32>,
    /// Run the job across the network, joining through this peer: `IP:PORT` or `HOST:PORT`,
    /// either optionally as `ID@...` to also check its identity. Repeatable. Without it, a peer running on the data directory is joined if there is one;
    /// otherwise the job runs on this machine alone.
    #[arg(long, value_name = "[ID@]ADDR")]
    bootstrap: Vec<BootstrapArg>,
    /// Address the submitting peer listens on (network jobs): `IP:PORT` or `HOST:PORT`.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:0", value_parser = crate::listen_addr)]
    listen: SocketAddr,
    /// Do not look for peers on the local network (network jobs).
    #[arg(long)]
    no_mdns: bool,
    /// How peers are found (network jobs): "overlay" or "table", as the network's peers do.
    #[arg(long, value_name = "overlay|table", default_value = "overlay")]
    discovery: coordinator_free::node::Discovery,
    /// This submitter is behind NAT (network jobs): hold a reservation on the relay peer at
    /// `[ID@]IP:PORT`, so workers behind other NATs are introduced there and dial in.
    #[arg(long, value_name = "[ID@]IP:PORT")]
    via_relay: Option<Bootstrap>,
    /// Serve a web page of the job's progress and the peers at this loopback address
    /// (`127.0.0.1:PORT`; network jobs); it needs the token printed at start.
    #[arg(long, value_name = "IP:PORT")]
    ui: Option<SocketAddr>,
}

pub fn run(args: SubmitArgs) -> Result<ExitCode, Failure> {
    submit(args, None)
}

/// Runs the job of `args`; `revalidating` is the id the job must still have when it is run
/// again because a peer its results rest on was caught by another job.
fn submit(args: SubmitArgs, revalidating: Option<Digest>) -> Result<ExitCode, Failure> {
    // Everything the user gave is checked before anything runs.
    let manifest = JobManifest::load(&args.manifest).map_err(Failure::usage)?;
    // Input files are hashed (every core, a gigabyte in a tenth of a second or more) while the
    // module is checked and the network joined; the job is defined once both are done.
    let hashing = {
        let (manifest, path) = (manifest.clone(), args.manifest.clone());
        std::thread::Builder::new()
            .name("cf-inputs".into())
            .spawn(move || UnitSource::open(&manifest, &path))
            .map_err(|e| internal(e.into()))?
    };
    let module_file = std::fs::read(&manifest.module)
        .with_context(|| format!("cannot read the module {}", manifest.module.display()))
        .map_err(Failure::usage)?;
    let wasm = sandbox::module_from_file_bytes(&module_file).map_err(|e| Failure {
        error: anyhow!(e).context(format!("module {}", manifest.module.display())),
        code: exit::MODULE_REFUSED,
    })?;
    let data_dir = crate::data_dir(args.data_dir)
        .ok_or_else(|| Failure::usage(anyhow!("no data directory: pass --data-dir or set HOME")))?;
    refuse_up_front(&manifest, &wasm, &data_dir)?;
    let out_dir = args.out.unwrap_or_else(|| default_out_dir(&manifest));
    let cpus = args.cpus.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
    });

    let store = JobStore::open(&data_dir.join("submit.redb")).map_err(|e| Failure {
        error: e.into(),
        code: exit::USAGE,
    })?;
    // Joining through the peer running on the data directory, the submitter finds peers as
    // that peer does.
    let (bootstrap, discovery) = if args.bootstrap.is_empty() {
        match running_peer(&data_dir) {
            Some((bootstrap, discovery)) => (vec![bootstrap], discovery),
            None => (Vec::new(), args.discovery),
        }
    } else {
        (args.bootstrap.clone(), args.discovery)
    };
    let network = Network {
        bootstrap,
        listen: args.listen,
        mdns: !args.no_mdns,
        discovery,
        via_relay: args.via_relay,
        cpus,
        data_dir: &data_dir,
        ui: args.ui,
    };
    if network.bootstrap.is_empty() && cpus == 0 {
        return Err(Failure::usage(anyhow!(
            "--cpus 0 leaves no core to run a job on this machine; pass --bootstrap to use the network"
        )));
    }
    let joined = if network.bootstrap.is_empty() {
        None
    } else {
        Some(join_network(&network)?)
    };
    let units = match hashing.join() {
        Ok(Ok(units)) => units,
        Ok(Err(e)) => {
            leave(joined);
            return Err(Failure::usage(e));
        }
        Err(_) => {
            leave(joined);
            return Err(internal(anyhow!("hashing the inputs failed")));
        }
    };
    let module_digest = Digest::of(&wasm);
    let id = coordinator_free::job::local::job_id(&module_digest, &manifest, &units);
    if store
        .times(&id)
        .map_err(|e| internal(e.into()))?
        .is_some_and(|t| t.cancelled)
    {
        eprintln!("job {} ({id}) was cancelled; resuming it", manifest.name);
    }
    stop::watch(stop::Job {
        data_dir: data_dir.clone(),
        running: crate::jobs::Running {
            pid: std::process::id(),
            job: id.to_hex(),
            name: manifest.name.clone(),
            units: u32::try_from(units.len()).unwrap_or(u32::MAX),
            accepted: 0,
            failed: 0,
        },
    });
    if let Some(expected) = revalidating
        && expected != id
    {
        eprintln!(
            "job {}: its manifest, module or inputs changed since it ran (job {expected}, now {id}); resubmit it to run its units again",
            manifest.name
        );
        leave(joined);
        return Ok(ExitCode::SUCCESS);
    }
    // Where the job came from, so a later job that catches a peer its results rest on can run
    // it again; a path that cannot be made absolute is not recorded.
    if let (Ok(manifest_path), Ok(out)) = (
        std::path::absolute(&args.manifest),
        std::path::absolute(&out_dir),
    ) {
        store
            .put_source(
                &id,
                &JobSource {
                    manifest: manifest_path,
                    out,
                },
            )
            .map_err(|e| internal(e.into()))?;
    }
    if store
        .blob(&module_digest)
        .map_err(|e| internal(e.into()))?
        .is_none()
    {
        store.put_blob(&wasm).map_err(|e| internal(e.into()))?;
    }
    let metering = if manifest.limits.fuel.is_some() {
        Metering::Fuel
    } else {
        Metering::Off
    };
    let (summary, simulated) = if let Some(joined) = joined {
        let summary = run_on_network(
            joined,
            &manifest,
            units,
            wasm.to_vec().into(),
            module_digest,
            &network,
            &store,
            &out_dir,
        )?;
        (summary, false)
    } else {
        let module = Arc::new(HostedModule::new(wasm.to_vec(), metering));
        let command = crate::unit_host_command(
            &data_dir,
            crate::UnitHostLimits {
                cores: cpus,
                unit_memory: manifest.limits.memory_mb << 20,
                cache_mb: crate::DEFAULT_CACHE_MB,
            },
        )
        .map_err(internal)?;
        // The queue holds every execution the job keeps in flight, so handing out a burst of
        // leases never meets a full queue before the unit threads pick them up.
        let threads = cpus as usize;
        // Several per core, so the unit threads can hand short units to their hosts in batches.
        let in_flight = cpus.saturating_mul(16);
        let executor = Executor::unit_hosts(&command, threads, in_flight as usize)
            .map_err(|e| internal(anyhow!(e)))?;
        let job = LocalJob::new(
            &manifest,
            units,
            module_digest,
            module,
            executor,
            in_flight,
            &store,
            out_dir,
        );
        eprintln!(
            "job {} ({}), {} cores on this machine",
            manifest.name,
            job.id(),
            cpus
        );
        if args.ui.is_some() {
            eprintln!(
                "--ui: a job on this machine alone has no web page; it serves one when it runs across the network"
            );
        }
        let mut display = Display::new();
        let summary = job
            .run(|p| display.show(p))
            .map_err(|e| internal(anyhow!(e)))?;
        display.finish();
        (summary, true)
    };
    stop::done();
    print_summary(&manifest, &summary, simulated);
    let mut succeeded = summary.succeeded();
    if revalidating.is_none() && !summary.suspect_jobs.is_empty() {
        // Other journaled jobs hold results accepted on the word of a peer this job caught:
        // each is resumed, which runs exactly those units again, replicated. One level only: a
        // catch while re-validating is listed by that job's summary for the next submit.
        let sources: Vec<(String, Digest, u64, Option<JobSource>)> = summary
            .suspect_jobs
            .iter()
            .map(|(name, id, n)| (name.clone(), *id, *n, store.source(id).ok().flatten()))
            .collect();
        // The nested runs open the journal themselves.
        drop(store);
        for (name, id, n, source) in sources {
            let Some(source) = source else {
                eprintln!(
                    "job {name} ({id}): {n} units to run again, but where it was submitted from is not recorded; resubmit it"
                );
                continue;
            };
            println!("\nre-validating job {name} ({id}): {n} units rest on a peer caught since");
            let again = SubmitArgs {
                manifest: source.manifest,
                out: Some(source.out),
                data_dir: Some(data_dir.clone()),
                cpus: args.cpus,
                bootstrap: args.bootstrap.clone(),
                listen: args.listen,
                no_mdns: args.no_mdns,
                discovery: args.discovery,
                via_relay: args.via_relay,
                ui: args.ui,
            };
            match submit(again, Some(id)) {
                Ok(code) => succeeded &= code == ExitCode::SUCCESS,
                Err(failure) => {
                    eprintln!(
                        "job {name} ({id}) could not be run again: {:#}",
                        failure.error
                    );
                    succeeded = false;
                }
            }
        }
    }
    Ok(if succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::UNIT_FAILED)
    })
}

/// Checks and compiles the module as every peer would, before joining anything or running any
/// unit: a module the sandbox refuses (a missing `run` export, an import outside the guest ABI)
/// is the user's to fix, not something for every peer to discover unit by unit. The compiled
/// module goes to the data directory's module cache, which this machine's unit hosts share: a
/// module submitted again, or run here, is not compiled a second time.
fn refuse_up_front(manifest: &JobManifest, wasm: &[u8], data_dir: &Path) -> Result<(), Failure> {
    let cache_dir = data_dir.join("modules");
    // An unusable cache directory only costs compile time.
    let cache_dir = std::fs::create_dir_all(&cache_dir)
        .is_ok()
        .then_some(cache_dir);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sandbox = sandbox::Sandbox::new(sandbox::SandboxConfig {
        max_concurrent_units: 1,
        cache_dir,
        disk_cache_bytes: crate::DEFAULT_CACHE_MB.saturating_mul(1 << 20),
        compile_threads: Some(u32::try_from(cores).unwrap_or(1)),
        ..sandbox::SandboxConfig::default()
    })
    .map_err(|e| internal(e.into()))?;
    let metering = if manifest.limits.fuel.is_some() {
        Metering::Fuel
    } else {
        Metering::Off
    };
    sandbox
        .prepare(wasm, metering)
        .map(drop)
        .map_err(|e| Failure {
            error: anyhow!(e).context(format!("module {}", manifest.module.display())),
            code: exit::MODULE_REFUSED,
        })
}

fn internal(error: anyhow::Error) -> Failure {
    Failure {
        error,
        code: exit::HOST_FAILURE,
    }
}

/// How a network job joins the network.
struct Network<'a> {
    bootstrap: Vec<BootstrapArg>,
    listen: SocketAddr,
    mdns: bool,
    discovery: coordinator_free::node::Discovery,
    via_relay: Option<Bootstrap>,
    cpus: u32,
    data_dir: &'a Path,
    ui: Option<SocketAddr>,
}

/// The peer running on `data_dir`, if one answers: as a bootstrap address, and how it finds
/// peers.
fn running_peer(data_dir: &Path) -> Option<(BootstrapArg, Discovery)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let report = runtime
        .block_on(coordinator_free::control::status(data_dir))
        .ok()?;
    let discovery = if report.overlay.is_some() {
        Discovery::Overlay
    } else {
        Discovery::Table
    };
    let ip = match report.listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let bootstrap = BootstrapArg::Addr(Bootstrap {
        addr: SocketAddr::new(ip, report.listen.port()),
        peer: Some(report.id),
    });
    Some((bootstrap, discovery))
}

/// The submitting peer, started and joined (or given up waiting for the first peers).
struct Joined {
    runtime: tokio::runtime::Runtime,
    node: Node,
}

/// Says goodbye for a peer that joined but has no job to run after all.
fn leave(joined: Option<Joined>) {
    if let Some(Joined { runtime, node }) = joined {
        runtime.block_on(async {
            let _ = tokio::time::timeout(LEAVE_LIMIT, node.leave()).await;
            let _ = tokio::time::timeout(SHUTDOWN_LIMIT, node.shutdown()).await;
        });
    }
}

/// Starts the submitting peer and waits (at most [`JOIN_WAIT`]) until it knows a peer.
fn join_network(network: &Network<'_>) -> Result<Joined, Failure> {
    // Its own identity: a `worker run` peer may be using the data directory's.
    let identity = Identity::load_or_create(&network.data_dir.join("submitter"))
        .map_err(|e| internal(anyhow!(e)))?;
    if network.via_relay.is_some() && network.discovery != Discovery::Overlay {
        return Err(Failure::usage(anyhow!(
            "--via-relay needs --discovery overlay: a submitter behind NAT is found through its job's advert, which the full tables do not carry"
        )));
    }
    let mut config = NodeConfig::new(network.listen);
    for arg in &network.bootstrap {
        config.add_bootstrap(arg.clone());
    }
    config.mdns = network.mdns;
    config.discovery = network.discovery;
    config.via_relay = network.via_relay;
    let cores = u16::try_from(network.cpus).unwrap_or(u16::MAX);
    config.capacity.cores_donated = cores;
    config.capacity.cores_free = cores;
    config.capacity.memory_mb = 512 * u32::from(cores);
    if network.cpus > 0 {
        let command = crate::unit_host_command(
            network.data_dir,
            crate::UnitHostLimits {
                cores: network.cpus,
                unit_memory: (u64::from(config.capacity.memory_mb) << 20) / u64::from(cores.max(1)),
                cache_mb: crate::DEFAULT_CACHE_MB,
            },
        )
        .map_err(internal)?;
        config.work = Some(WorkConfig::new(
            WorkRunner::UnitHosts(command),
            network.cpus,
        ));
    }
    let runtime = crate::peer_runtime().map_err(internal)?;
    let node = runtime
        .block_on(Node::start(identity, config))
        .map_err(Failure::usage)?;
    // Joining takes a round trip or two; starting the job once the first adverts are in means
    // its first offers already reach every peer the bootstrap knows.
    let joined = runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + JOIN_WAIT;
        while tokio::time::Instant::now() < deadline {
            if node.status().await.is_ok_and(|s| !s.peers.is_empty()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    });
    if !joined {
        eprintln!(
            "no peer answered yet; the job waits for peers (Ctrl-C stops it, and the same command resumes it)"
        );
    }
    Ok(Joined { runtime, node })
}

/// Runs the job over the submitting peer (a peer of the submitter's own, joined through the
/// bootstrap peers), then leaves.
#[allow(clippy::too_many_arguments)]
fn run_on_network(
    joined: Joined,
    manifest: &JobManifest,
    units: UnitSource,
    module: Arc<[u8]>,
    module_digest: Digest,
    network: &Network<'_>,
    store: &JobStore,
    out_dir: &Path,
) -> Result<JobSummary, Failure> {
    let Joined { runtime, node } = joined;
    let job = JobData::new(manifest, units, module_digest);
    eprintln!(
        "job {} ({}) from peer {}, joining through {}",
        manifest.name,
        job.id,
        node.id(),
        network
            .bootstrap
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (progress, watched) = tokio::sync::watch::channel(None);
    let page = match network.ui {
        Some(addr) => {
            let ui = runtime
                .block_on(coordinator_free::ui::Ui::bind(
                    addr,
                    false,
                    network.data_dir,
                ))
                .map_err(Failure::usage)?;
            eprintln!("web page at {}", ui.url());
            Some(runtime.spawn(ui.serve(coordinator_free::ui::PageSource {
                node: node.control(),
                data_dir: None,
                job: Some(watched),
            })))
        }
        None => None,
    };
    let mut workers = NetWorkers::new(node.job_dialer(), runtime.handle().clone(), &job, module);
    let config = net_schedule_config(&workers.spec().limits());
    let mut display = Display::new();
    let id = job.id.to_hex();
    let summary = run_job(manifest, &job, config, &mut workers, store, out_dir, |p| {
        if page.is_some() {
            progress.send_replace(Some(JobView::new(&manifest.name, &id, p)));
        }
        display.show(p)
    });
    display.finish();
    if let Some(page) = page {
        page.abort();
    }
    // The results are durable; the workers get the last verdicts, and goodbyes to the peers
    // a moment, not the full drain.
    runtime.block_on(async {
        workers.close().await;
        let _ = tokio::time::timeout(LEAVE_LIMIT, node.leave()).await;
        let _ = tokio::time::timeout(SHUTDOWN_LIMIT, node.shutdown()).await;
    });
    summary.map_err(|e| internal(anyhow!(e)))
}

/// Progress on stderr: one line rewritten in place on a terminal, a plain line now and then
/// otherwise (logs and CI).
struct Display {
    terminal: bool,
    /// The progress bar, on a terminal.
    bar: Option<indicatif::ProgressBar>,
    last_plain: Option<Instant>,
    /// The latest line not yet printed in plain mode, printed at the end.
    unprinted: Option<String>,
    /// The warning that too few hosts take part was printed.
    warned: bool,
    /// The note that units run on fewer hosts than `replicas` was printed.
    noted_replicas: bool,
    /// That note, while it applies and is not printed yet: printed after a few seconds, or
    /// when the job ends first.
    replicas_note: Option<String>,
}

impl Display {
    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            bar: None,
            last_plain: None,
            unprinted: None,
            warned: false,
            noted_replicas: false,
            replicas_note: None,
        }
    }

    /// Prints a line of its own above the progress line.
    fn say(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// The terminal's progress bar: units decided of all, then the counts, rate and ETA.
    fn bar(&mut self, units: u32) -> &indicatif::ProgressBar {
        self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(u64::from(units)),
                indicatif::ProgressDrawTarget::stderr_with_hz(10),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30.green/white} {pos}/{len} units  {wide_msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        })
    }

    fn show(&mut self, p: &JobProgress) {
        stop::progress(p);
        if p.short_of_hosts() && p.elapsed >= HOSTS_WARNING_AFTER && !self.warned {
            self.warned = true;
            let line = format!(
                "warning: only {} distinct host(s) can take units, and a unit needs {} to be \
                 accepted; peers are grouped by the address they connect from. Add peers on \
                 other machines, give each local peer its own loopback address (127.0.0.2, …), \
                 or set placement = \"peer\" in [redundancy]",
                p.hosts, p.quorum
            );
            self.say(&line);
        }
        if p.short_of_replicas() && !self.noted_replicas {
            self.replicas_note = Some(format!(
                "note: replicas = {} but {} distinct host(s) can take units: each unit runs on at \
                 most {} until more join, and is accepted once {} agree (executions still running \
                 then are cancelled)",
                p.replicas, p.hosts, p.hosts, p.quorum
            ));
        } else if p.hosts >= p.replicas {
            self.replicas_note = None;
        }
        if p.elapsed >= HOSTS_WARNING_AFTER
            && let Some(line) = self.replicas_note.take()
        {
            self.noted_replicas = true;
            self.say(&line);
        }
        if self.terminal {
            let message = progress_message(p);
            let bar = self.bar(p.units);
            bar.set_position(u64::from(p.accepted + p.failed));
            bar.set_message(message);
            return;
        }
        let line = progress_line(p);
        let mut err = std::io::stderr().lock();
        if self
            .last_plain
            .is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY)
        {
            self.last_plain = Some(Instant::now());
            self.unprinted = None;
            let _ = writeln!(err, "{line}");
        } else {
            self.unprinted = Some(line);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        } else if let Some(line) = self.unprinted.take() {
            eprintln!("{line}");
        }
        if let Some(line) = self.replicas_note.take() {
            eprintln!("{line}");
        }
    }
}

/// What the progress bar says beside the bar: the counts, peers, rate and ETA.
fn progress_message(p: &JobProgress) -> String {
    let line = progress_line(p);
    // The same words as the plain line, without its leading "done/units units:".
    line.split_once(": ")
        .map_or(line.clone(), |(_, rest)| rest.to_owned())
}

fn progress_line(p: &JobProgress) -> String {
    let done = p.accepted + p.failed;
    let secs = p.elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        f64::from(p.decided_now) / secs
    } else {
        0.0
    };
    let left = p.units.saturating_sub(done);
    let eta = if left == 0 {
        "0s".to_owned()
    } else if rate > 0.0 {
        format!("{:.0}s", f64::from(left) / rate)
    } else {
        "?".to_owned()
    };
    let mut line = format!(
        "{done}/{} units: {} accepted, {} running, {} failed, {} peers, {rate:.1} units/s, ETA {eta}",
        p.units, p.accepted, p.running, p.failed, p.peers
    );
    // In its first second a job has not heard from its hosts yet: nothing to wait for so far.
    if p.short_of_hosts() && p.elapsed >= HOSTS_NOTED_AFTER {
        line.push_str(&format!(
            "; waiting for hosts: {} of the {} a unit needs",
            p.hosts, p.quorum
        ));
    }
    line
}

fn print_summary(manifest: &JobManifest, s: &JobSummary, simulated: bool) {
    let r = manifest.redundancy;
    println!("job {} ({})", manifest.name, s.job);
    println!(
        "units: {} accepted, {} failed, of {}",
        s.accepted, s.failed, s.units
    );
    if !s.first_failed.is_empty() {
        let more = if (s.failed as usize) > s.first_failed.len() {
            format!(" (the first {} of {})", s.first_failed.len(), s.failed)
        } else {
            String::new()
        };
        println!("failed units{more}:");
        for (index, error) in &s.first_failed {
            println!("  unit {index}: {error}");
        }
    }
    if s.reused > 0 {
        println!(
            "{} units reused from earlier jobs with the same module, input and limits (not run again)",
            s.reused
        );
    }
    if s.retried > 0 {
        println!(
            "{} units the journal held as failed by host failures or cancellation were run again",
            s.retried
        );
    }
    println!(
        "this run: {} units run this time, {} restored; {} executions, {} host failures, {} disagreeing results, {:.1}s",
        s.units_run,
        s.restored,
        s.executions,
        s.host_failures,
        s.dissents,
        s.elapsed.as_secs_f64()
    );
    if simulated {
        println!(
            "validation: replicas {}, quorum {}, max attempts {}; replicas ran as redundant executions on this machine (simulated peer ids, not independent peers)",
            r.replicas, r.quorum, r.max_attempts
        );
    } else {
        let placement = match r.placement {
            Placement::Host => "on distinct hosts",
            Placement::Peer => "on distinct peers (placement = \"peer\")",
        };
        println!(
            "validation: replicas {}, quorum {}, max attempts {}, {placement}; {} peers took part",
            r.replicas,
            r.quorum,
            r.max_attempts,
            s.peers.len()
        );
        for (peer, answers) in &s.peers {
            println!("  peer {peer}: {answers} executions");
        }
        for (peer, times) in &s.dissenters {
            println!("  peer {peer} disagreed with an accepted result {times} times");
        }
        if r.adaptive {
            let decided: u64 = s.validated.values().sum();
            let kinds: Vec<String> = s
                .validated
                .iter()
                .map(|(kind, n)| format!("{n} {kind}"))
                .collect();
            println!(
                "adaptive replication: {} decided this run ({}); {:.2} executions per unit; {} spot checks, {} confirmed",
                decided,
                if kinds.is_empty() {
                    "none".to_owned()
                } else {
                    kinds.join(", ")
                },
                s.executions as f64 / (s.units_run.max(1)) as f64,
                s.trust.spot_checks,
                s.trust.spot_confirmed,
            );
            if s.revalidated > 0 {
                println!(
                    "  {} units accepted on a trusted peer's word were run again: their peer was caught lying",
                    s.revalidated
                );
            }
            if s.trust.looked_back > 0 {
                println!(
                    "  {} units accepted alone just before a catch were sent to spot checks after all",
                    s.trust.looked_back
                );
            }
            for peer in &s.caught {
                println!("  peer {peer} was caught disagreeing with a quorum while trusted");
            }
            for (name, id, units) in &s.suspect_jobs {
                println!(
                    "  job {name} ({id}) holds {units} units accepted on the word of a peer caught since: they are run again below, or when the job is next submitted"
                );
            }
        }
        for (culprit, p) in &s.penalties {
            let who = match culprit {
                Culprit::Peer(peer) => format!("peer {peer}"),
                Culprit::Host(host) => format!("host {host}"),
            };
            let now = if p.backed_off { ", backed off now" } else { "" };
            println!(
                "  {who}: {} failed leases (host failures, expiries, lost links), {} back-offs{now}",
                p.failures, p.backoffs
            );
        }
    }
    println!("results: {}", display_path(&s.results));
}

fn display_path(path: &Path) -> String {
    path.display().to_string()
}

/// Ctrl-C (or `worker cancel`) while a job runs: the journal already holds every unit decided
/// so far, so the submit says where the job stopped and how to resume it, and exits. The
/// running job also describes itself beside the journal for `worker jobs` and `worker cancel`.
mod stop {
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use coordinator_free::job::driver::JobProgress;

    use crate::jobs::{Running, clear_running, write_running};

    /// The job running now.
    pub struct Job {
        pub data_dir: PathBuf,
        pub running: Running,
    }

    static CURRENT: Mutex<Option<(Job, Option<Instant>)>> = Mutex::new(None);
    static INTERRUPTED: AtomicBool = AtomicBool::new(false);
    /// How often the running file is rewritten.
    const EVERY: Duration = Duration::from_secs(1);

    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }

    /// Starts watching for Ctrl-C on behalf of `job` (once per process), and describes it
    /// beside the journal.
    pub fn watch(job: Job) {
        write_running(&job.data_dir, &job.running);
        let first = CURRENT
            .lock()
            .map(|mut current| current.replace((job, None)).is_none())
            .unwrap_or(false);
        static STARTED: std::sync::Once = std::sync::Once::new();
        if !first {
            return;
        }
        STARTED.call_once(|| {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
                libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
            }
            let _ = std::thread::Builder::new().name("stop".into()).spawn(|| {
                loop {
                    std::thread::sleep(Duration::from_millis(50));
                    if INTERRUPTED.load(Ordering::SeqCst) {
                        stopped();
                    }
                }
            });
        });
    }

    /// The job's latest counts.
    pub fn progress(p: &JobProgress) {
        if let Ok(mut current) = CURRENT.lock()
            && let Some((job, written)) = current.as_mut()
        {
            job.running.accepted = p.accepted;
            job.running.failed = p.failed;
            if written.is_none_or(|t| t.elapsed() >= EVERY) {
                *written = Some(Instant::now());
                write_running(&job.data_dir, &job.running);
            }
        }
    }

    /// The job ended by itself.
    pub fn done() {
        if let Ok(mut current) = CURRENT.lock()
            && let Some((job, _)) = current.take()
        {
            clear_running(&job.data_dir);
        }
    }

    fn stopped() -> ! {
        let command: Vec<String> = std::env::args().map(|a| quote(&a)).collect();
        if let Ok(current) = CURRENT.lock()
            && let Some((job, _)) = current.as_ref()
        {
            let r = &job.running;
            eprintln!(
                "\nstopped: job {} ({}) has at least {} of {} units decided ({} accepted, {} failed), kept in {}; the same command resumes it and runs only the rest:\n  {}",
                r.name,
                r.job.get(..12).unwrap_or(&r.job),
                r.accepted + r.failed,
                r.units,
                r.accepted,
                r.failed,
                job.data_dir.join(crate::jobs::JOURNAL_FILE).display(),
                command.join(" ")
            );
            clear_running(&job.data_dir);
        } else {
            eprintln!("\nstopped");
        }
        std::process::exit(130)
    }

    /// `arg` as a shell reads it back.
    fn quote(arg: &str) -> String {
        if !arg.is_empty()
            && arg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+".contains(&b))
        {
            arg.to_owned()
        } else {
            format!("'{}'", arg.replace('\'', "'\\''"))
        }
    }
}
