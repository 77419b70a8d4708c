//! `worker exec`: one unit, locally, in the sandbox.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use coordinator_free::sandbox::{
    self, Executor, HostedModule, Limits, LogLine, Metering, OutcomeClass, Sandbox, SandboxConfig,
    UnitHost, UnitHostCommand, UnitObserver, UnitReport, UnitRequest,
};

use crate::{DEFAULT_CACHE_MB, Failure, exit};

#[derive(Args)]
pub struct ExecArgs {
    /// The module: WebAssembly binary (.wasm) or text (.wat).
    module: PathBuf,
    /// The unit's input: a file, or `-` for standard input. Empty when not given.
    #[arg(long, value_name = "FILE|-")]
    input: Option<PathBuf>,
    /// Wall-clock limit in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    timeout: f64,
    /// Linear memory cap in MiB (at most 4096).
    #[arg(long, value_name = "N", default_value_t = 256)]
    memory_mb: u64,
    /// Deterministic fuel budget; without it only the wall clock bounds the unit.
    #[arg(long, value_name = "N")]
    fuel: Option<u64>,
    /// Resume from this checkpoint file if it exists, and keep the unit's latest checkpoint in it.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// The peer's data directory (compiled-module cache).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Do not read or write the compiled-module cache on disk.
    #[arg(long)]
    no_cache: bool,
    /// Run the unit inside this process, with deadline checks compiled into the module, instead
    /// of in a separate unit host process that is killed at the deadline (slower on tight
    /// loops; for debugging).
    #[arg(long)]
    in_process: bool,
}

#[derive(Args)]
pub struct UnitHostArgs {
    /// Lower this process's CPU priority by this niceness (0–19) before serving units, so donated
    /// work yields to the volunteer's own programs.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..=19))]
    nice: Option<i32>,
    /// The peer's data directory (compiled-module cache).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Do not read or write the compiled-module cache on disk.
    #[arg(long)]
    no_cache: bool,
    /// Threads that compile modules (their functions in parallel), shared by every unit host of
    /// the data directory: the peer's donated cores. A compile takes as many of them as are
    /// free, so the peer's hosts together never compile on more.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    compile_threads: u16,
    /// Most MiB of compiled modules kept on disk (least recently used go first).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CACHE_MB, value_parser = clap::value_parser!(u64).range(1..))]
    max_cache_mb: u64,
    /// Most memory this process may map writable, in MiB (`RLIMIT_DATA`): the unit's linear
    /// memory, the engine and the compiler together. Past it, the host fails and the unit is a
    /// host failure.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    memory_limit_mb: Option<u64>,
}

/// `worker unit-host`: the child side of [`UnitHost`].
pub fn unit_host(args: UnitHostArgs) -> Result<ExitCode, Failure> {
    if let Some(nice) = args.nice {
        lower_priority(nice).map_err(|e| Failure {
            error: anyhow!(e).context("cannot lower the unit host's priority"),
            code: exit::HOST_FAILURE,
        })?;
    }
    if let Some(mb) = args.memory_limit_mb {
        limit_memory(mb.saturating_mul(1 << 20)).map_err(|e| Failure {
            error: anyhow!(e).context("cannot limit the unit host's memory"),
            code: exit::HOST_FAILURE,
        })?;
    }
    let mut config = SandboxConfig {
        cache_dir: cache_dir(args.data_dir, args.no_cache),
        disk_cache_bytes: args.max_cache_mb.saturating_mul(1 << 20),
        compile_threads: Some(u32::from(args.compile_threads)),
        ..SandboxConfig::default()
    };
    // An unusable cache directory only costs compile time.
    if let Some(dir) = &config.cache_dir
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        tracing::warn!(
            "cannot use {}: {e}; running without the on-disk module cache",
            dir.display()
        );
        config.cache_dir = None;
    }
    sandbox::serve_unit_host(config)
        .map(|()| ExitCode::SUCCESS)
        .map_err(|e| Failure {
            error: e.into(),
            code: exit::HOST_FAILURE,
        })
}

/// Caps the memory this process may map writable and private (`RLIMIT_DATA`): heap, thread
/// stacks and the accessible part of linear memories, but not the address space the engine
/// reserves without access, which is many times larger than what it uses. Past the cap a linear
/// memory cannot grow (the unit ends with the host out of memory) and any other allocation ends
/// the process; either way the parent reports a host failure.
fn limit_memory(bytes: u64) -> std::io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given; the resource is this process's.
    if unsafe { libc::getrlimit(libc::RLIMIT_DATA, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Only ever lowered: a hard limit set by the volunteer already stays.
    let bytes = libc::rlim_t::try_from(bytes)
        .unwrap_or(libc::RLIM_INFINITY)
        .min(limit.rlim_max);
    limit.rlim_cur = bytes;
    limit.rlim_max = bytes;
    // SAFETY: setrlimit reads the struct it is given; the resource is this process's.
    if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises this process's niceness to `nice` (only ever lowers its priority).
fn lower_priority(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes plain integers; `who = 0` is this process.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    // Refused only when this process is already nicer than asked (raising priority back needs
    // privileges): yielding is the point, so that is fine.
    if matches!(error.raw_os_error(), Some(libc::EACCES | libc::EPERM)) {
        tracing::info!("keeping the current, lower priority: {error}");
        return Ok(());
    }
    Err(error)
}

fn cache_dir(data_dir: Option<PathBuf>, no_cache: bool) -> Option<PathBuf> {
    if no_cache {
        None
    } else {
        crate::data_dir(data_dir).map(|d| d.join("modules"))
    }
}

pub fn run(args: ExecArgs) -> Result<ExitCode, Failure> {
    let limits = limits(&args).map_err(Failure::usage)?;
    let module_file = std::fs::read(&args.module)
        .with_context(|| format!("cannot read the module {}", args.module.display()))
        .map_err(Failure::usage)?;
    let input = read_input(args.input.as_deref(), limits.input_bytes).map_err(Failure::usage)?;
    let checkpoint = match &args.checkpoint {
        Some(path) => read_checkpoint(path, limits.checkpoint_bytes).map_err(Failure::usage)?,
        None => None,
    };

    let cache_dir = cache_dir(args.data_dir.clone(), args.no_cache);
    let wasm = sandbox::module_from_file_bytes(&module_file).map_err(|e| Failure {
        error: anyhow!(e),
        code: exit::MODULE_REFUSED,
    })?;
    let observer = Arc::new(Console::new(args.checkpoint.clone()));
    let request = UnitRequest {
        input: input.into(),
        checkpoint,
        limits,
        observer: Some(observer.clone()),
        abort: None,
    };
    let report = if args.in_process {
        run_in_process(cache_dir, &wasm, request)?
    } else {
        run_in_unit_host(&args, &wasm, request)?
    };
    observer.finish_progress();
    finish(report)
}

/// Runs the unit in a child `worker unit-host` process.
fn run_in_unit_host(
    args: &ExecArgs,
    wasm: &[u8],
    request: UnitRequest,
) -> Result<UnitReport, Failure> {
    let program = std::env::current_exe().map_err(|e| Failure {
        error: anyhow!(e).context("cannot find the worker binary to start a unit host"),
        code: exit::HOST_FAILURE,
    })?;
    let mut host_args: Vec<std::ffi::OsString> = vec!["unit-host".into()];
    if args.no_cache {
        host_args.push("--no-cache".into());
    }
    if let Some(dir) = &args.data_dir {
        host_args.push("--data-dir".into());
        host_args.push(dir.into());
    }
    let metering = if request.limits.fuel.is_some() {
        Metering::Fuel
    } else {
        Metering::Off
    };
    let mut host = UnitHost::new(UnitHostCommand {
        program,
        args: host_args,
    });
    let report = host.run(&HostedModule::new(wasm.to_vec(), metering), request);
    if let Err(error) = &report.result
        && error.is_module_refused()
    {
        return Err(Failure {
            error: anyhow!(error.clone()),
            code: exit::MODULE_REFUSED,
        });
    }
    Ok(report)
}

/// Runs the unit on a thread of this process, bounded by compiled-in deadline checks.
fn run_in_process(
    cache_dir: Option<PathBuf>,
    wasm: &[u8],
    request: UnitRequest,
) -> Result<UnitReport, Failure> {
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir,
        max_concurrent_units: 1,
        ..SandboxConfig::default()
    })
    .or_else(|e| {
        // An unusable cache directory only costs compile time.
        tracing::warn!("{e}; running without the on-disk module cache");
        Sandbox::new(SandboxConfig {
            max_concurrent_units: 1,
            ..SandboxConfig::default()
        })
    })
    .map_err(|e| Failure {
        error: e.into(),
        code: exit::HOST_FAILURE,
    })?;

    let metering = if request.limits.fuel.is_some() {
        Metering::Fuel
    } else {
        Metering::Off
    };
    let module = sandbox.prepare(wasm, metering).map_err(|e| Failure {
        error: anyhow!(e),
        code: exit::MODULE_REFUSED,
    })?;
    let executor = Executor::new(sandbox, 1, 1).map_err(|e| Failure {
        error: e.into(),
        code: exit::HOST_FAILURE,
    })?;
    Ok(executor.run(module, request))
}

/// Prints the output, or the one line naming why there is none.
fn finish(report: UnitReport) -> Result<ExitCode, Failure> {
    if report.logs_dropped > 0 {
        eprintln!(
            "worker: {} further log lines were dropped (log volume cap)",
            report.logs_dropped
        );
    }
    tracing::info!(
        elapsed = ?report.elapsed,
        fuel = ?report.fuel_consumed,
        profile = report.profile,
        "unit finished"
    );
    match report.result {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            match stdout.write_all(&output).and_then(|()| stdout.flush()) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                // A closed pipe (`| head`) is the reader's choice, not a failure.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
                Err(e) => Err(Failure::usage(
                    anyhow!(e).context("cannot write the output"),
                )),
            }
        }
        Err(error) => {
            let (code, class) = match error.class() {
                OutcomeClass::Deterministic => (exit::UNIT_FAILED, "deterministic"),
                OutcomeClass::HostFailure => (exit::HOST_FAILURE, "host failure"),
            };
            Err(Failure {
                error: anyhow!("{error} [{class}]"),
                code,
            })
        }
    }
}

fn limits(args: &ExecArgs) -> anyhow::Result<Limits> {
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 7.0 * 86_400.0) {
        return Err(anyhow!(
            "--timeout must be a number of seconds above 0 and at most a week"
        ));
    }
    if args.memory_mb == 0 || args.memory_mb > 4096 {
        return Err(anyhow!("--memory-mb must be between 1 and 4096"));
    }
    if args.fuel == Some(0) {
        return Err(anyhow!("--fuel must be above 0"));
    }
    Ok(Limits {
        memory_bytes: args.memory_mb << 20,
        timeout: Duration::from_secs_f64(args.timeout),
        fuel: args.fuel,
        ..Limits::default()
    })
}

fn read_capped(reader: impl Read, cap: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(cap + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read the {what}"))?;
    if bytes.len() as u64 > cap {
        return Err(anyhow!("the {what} is larger than the cap of {cap} bytes"));
    }
    Ok(bytes)
}

fn read_input(path: Option<&Path>, cap: u64) -> anyhow::Result<Vec<u8>> {
    match path {
        None => Ok(Vec::new()),
        Some(p) if p == Path::new("-") => read_capped(std::io::stdin().lock(), cap, "input"),
        Some(p) => {
            let file = std::fs::File::open(p)
                .with_context(|| format!("cannot open the input {}", p.display()))?;
            read_capped(file, cap, "input")
        }
    }
}

fn read_checkpoint(path: &Path, cap: u64) -> anyhow::Result<Option<Vec<u8>>> {
    match std::fs::File::open(path) {
        Ok(file) => read_capped(file, cap, "checkpoint").map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("cannot open {}", path.display()))),
    }
}

/// Shows the unit's logs on stderr as they come, a progress line on a terminal, and keeps the
/// checkpoint file up to date.
struct Console {
    checkpoint: Option<PathBuf>,
    terminal: bool,
    progress: Mutex<(Instant, bool)>,
}

impl Console {
    fn new(checkpoint: Option<PathBuf>) -> Self {
        Self {
            checkpoint,
            terminal: std::io::stderr().is_terminal(),
            progress: Mutex::new((Instant::now(), false)),
        }
    }

    fn finish_progress(&self) {
        let shown = self.progress.lock().map(|p| p.1).unwrap_or(false);
        if shown {
            eprintln!();
        }
    }
}

impl UnitObserver for Console {
    fn log(&self, line: &LogLine) {
        self.finish_progress();
        if let Ok(mut p) = self.progress.lock() {
            p.1 = false;
        }
        eprintln!("[unit {}] {}", line.level.name(), line.text);
    }

    fn progress(&self, done: u64, total: u64) {
        if !self.terminal {
            return;
        }
        let Ok(mut p) = self.progress.lock() else {
            return;
        };
        if p.0.elapsed() >= Duration::from_millis(200) {
            p.0 = Instant::now();
            p.1 = true;
            let percent = if total == 0 {
                0.0
            } else {
                100.0 * done as f64 / total as f64
            };
            eprint!("\r[unit] {done}/{total} ({percent:.1} %)");
        }
    }

    fn checkpoint(&self, bytes: &[u8]) {
        let Some(path) = &self.checkpoint else {
            return;
        };
        // Write then rename, so a crash leaves the previous checkpoint or the new one.
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!("cannot save the checkpoint to {}: {e}", path.display());
        }
    }
}
