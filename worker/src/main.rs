//! `worker`: the one binary of coordinator-free. It parses the command line, sets up logging and
//! calls into the library.

mod config;
mod demo;
mod exec;
mod history;
mod id;
mod jobs;
mod pause;
mod run;
mod service;
mod status;
mod submit;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "Donate idle CPU to science: run sandboxed WebAssembly work units, validated by redundant execution among peers."
)]
struct Cli {
    /// More log output on stderr (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one work unit locally in the sandbox and print its output bytes on stdout.
    Exec(exec::ExecArgs),
    /// A small network on this machine runs an example sweep, each unit on two peers, and
    /// shows the validated results.
    Demo(demo::DemoArgs),
    /// Join the network and donate this machine's spare cores until stopped.
    Run(run::RunArgs),
    /// Show the settings `worker run` would use with these arguments, and where each comes
    /// from: a flag, the config file, or the default.
    Config(config::ConfigArgs),
    /// Run a job across the network (or on this machine alone), redundantly validated, with
    /// results in results.jsonl.
    Submit(submit::SubmitArgs),
    /// Ask the running peer for its identity, known peers and the work it runs, and list the
    /// peers that disagreed with accepted results of jobs submitted from this data directory.
    Status(status::StatusArgs),
    /// Stop the running peer's units at once and take no new ones, until `worker resume` or
    /// for a while (`--for 2h`); kept across restarts.
    Pause(pause::PauseArgs),
    /// End a pause: the stopped units continue and the peer takes leases again.
    Resume(pause::ResumeArgs),
    /// Print this peer's id (creates the identity key on first use).
    Id(id::IdArgs),
    /// Run `worker run` as a systemd service: `worker service install [--user]`, `uninstall`.
    Service(service::ServiceArgs),
    /// What this peer has given, day by day: time its cores ran units, units run, verdicts on its answers.
    History(history::HistoryArgs),
    /// List the jobs submitted from this data directory: name, id, state, counts, times.
    Jobs(jobs::JobsArgs),
    /// Print a job's results again, in unit order, as JSON lines or CSV.
    Results(jobs::ResultsArgs),
    /// Stop a job (a running `worker submit` of it stops and says where); submitting it again
    /// resumes it.
    Cancel(jobs::JobArgs),
    /// Remove a job and its results from this data directory's journal.
    Forget(jobs::JobArgs),
    /// Serve units to a parent process over stdin and stdout (started by the worker itself).
    #[command(hide = true)]
    UnitHost(exec::UnitHostArgs),
}

/// Exit codes, documented in the README.
pub(crate) mod exit {
    /// The command line or a file could not be used.
    pub const USAGE: u8 = 2;
    /// The module was refused (bad module, forbidden import, too large).
    pub const MODULE_REFUSED: u8 = 3;
    /// The unit ended in a deterministic failure (trap, guest failure, limit).
    pub const UNIT_FAILED: u8 = 4;
    /// The machine could not finish the unit (timeout, stack overflow, out of memory).
    pub const HOST_FAILURE: u8 = 5;
    /// A bug in the worker itself.
    pub const INTERNAL: i32 = 70;
}

fn main() -> ExitCode {
    keep_large_buffers();
    // Whatever happens, the user sees one line, never a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("worker: internal error: {message}{location}");
        std::process::exit(exit::INTERNAL);
    }));

    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    // Which flags the user gave, not only their values: they win over the config file.
    let given = matches
        .subcommand()
        .map(|(_, given)| given.clone())
        .unwrap_or_default();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Exec(args) => exec::run(args),
        Command::Demo(args) => demo::run(args),
        Command::UnitHost(args) => exec::unit_host(args),
        Command::Run(_) => run::run(&given),
        Command::Config(args) => config::show(&args, &given),
        Command::Status(args) => status::run(args),
        Command::Submit(args) => submit::run(args),
        Command::Pause(args) => pause::pause(args),
        Command::Resume(args) => pause::resume(args),
        Command::Id(args) => id::run(args),
        Command::History(args) => history::run(args),
        Command::Service(args) => service::run(args),
        Command::Jobs(args) => jobs::list(args),
        Command::Results(args) => jobs::results(args),
        Command::Cancel(args) => jobs::cancel(args),
        Command::Forget(args) => jobs::forget(args),
    };
    match result {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("worker: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

/// An error for the user and the exit code that goes with it.
pub(crate) struct Failure {
    pub error: anyhow::Error,
    pub code: u8,
}

impl Failure {
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self {
            error: error.into(),
            code: exit::USAGE,
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WORKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Niceness of unit hosts, so donated work yields to the user's interactive programs.
const UNIT_HOST_NICE: &str = "10";

/// Compiled modules kept on disk unless told otherwise, in MiB.
pub(crate) const DEFAULT_CACHE_MB: u64 = 1024;

/// What a unit host needs beyond its unit's linear memory, in MiB: the engine, the compiler
/// (a few hundred MiB for the largest module accepted), thread stacks and the frames in flight.
pub(crate) const UNIT_HOST_OVERHEAD_MB: u64 = 1024;

/// How a peer's unit hosts are started and bounded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnitHostLimits {
    /// Cores the peer donates: together its hosts compile on at most this many threads.
    pub cores: u32,
    /// Most linear memory one unit may have, in bytes.
    pub unit_memory: u64,
    /// Most MiB of compiled modules on disk.
    pub cache_mb: u64,
}

/// How this binary starts its own unit host processes: lowered in priority, sharing the
/// compiled-module cache in `data_dir` (at most `limits.cache_mb` of it), compiling on at most
/// `limits.cores` threads all together, and each capped at its unit's memory plus what the
/// engine and the compiler need.
pub(crate) fn unit_host_command(
    data_dir: &std::path::Path,
    limits: UnitHostLimits,
) -> anyhow::Result<coordinator_free::sandbox::UnitHostCommand> {
    use anyhow::Context as _;
    let program = std::env::current_exe().context("cannot find the worker binary")?;
    let memory_mb = limits.unit_memory.div_ceil(1 << 20) + UNIT_HOST_OVERHEAD_MB;
    Ok(coordinator_free::sandbox::UnitHostCommand {
        program,
        args: vec![
            "unit-host".into(),
            "--nice".into(),
            UNIT_HOST_NICE.into(),
            "--data-dir".into(),
            data_dir.as_os_str().to_owned(),
            "--compile-threads".into(),
            limits.cores.clamp(1, 1024).to_string().into(),
            "--max-cache-mb".into(),
            limits.cache_mb.max(1).to_string().into(),
            "--memory-limit-mb".into(),
            memory_mb.to_string().into(),
        ],
    })
}

/// The async runtime a peer's networking runs on: two threads carry it comfortably; unit
/// threads and unit hosts are separate.
pub(crate) fn peer_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The peer's data directory: `--data-dir`, else `$XDG_DATA_HOME/coordinator-free`, else
/// `~/.local/share/coordinator-free`.
pub(crate) fn data_dir(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit.or_else(|| {
        std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".local/share"))
            })
            .map(|d| d.join("coordinator-free"))
    })
}

/// A `--listen` address: `IP:PORT`, or `HOST:PORT` looked up once at start (the first address
/// it resolves to).
pub(crate) fn listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let (host, port) = coordinator_free::node::host_and_port(text)
        .ok_or_else(|| format!("{text:?} is not IP:PORT or HOST:PORT"))?;
    use std::net::ToSocketAddrs;
    let mut addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{host} resolves to no address"))
}

/// Large buffers (inputs of many MiB, on their way to and from unit hosts) come from glibc's
/// heap and are reused, rather than mapped fresh and faulted in page by page for every unit:
/// 100 inputs of 10 MiB went 3.5 s → 3.15 s end to end with this in the peers. Freed memory
/// past 64 MiB is still given back.
fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
