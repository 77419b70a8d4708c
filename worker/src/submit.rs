//! `worker submit`: run a job on this machine, with this peer as its only worker.
//!
//! Replicas run as redundant executions in local unit host processes, each under its own
//! simulated peer id; they guard against nondeterminism and host failures, not against a lying
//! peer. The job is journaled in the data directory, so running the same command again resumes
//! it without re-running accepted units.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use coordinator_free::digest::Digest;
use coordinator_free::job::JobManifest;
use coordinator_free::job::local::{LocalJob, LocalProgress, LocalSummary, default_out_dir};
use coordinator_free::sandbox::{self, Executor, HostedModule, Metering, UnitHostCommand};
use coordinator_free::store::JobStore;

use crate::{Failure, exit};

/// Niceness of the unit hosts, so the job yields to the user's interactive programs.
const UNIT_HOST_NICE: &str = "10";
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
    /// Cores to run units on [default: all].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    cpus: Option<u32>,
}

pub fn run(args: SubmitArgs) -> Result<ExitCode, Failure> {
    // Everything the user gave is checked before anything runs.
    let manifest = JobManifest::load(&args.manifest).map_err(Failure::usage)?;
    let units = manifest.units(&args.manifest).map_err(Failure::usage)?;
    let module_file = std::fs::read(&manifest.module)
        .with_context(|| format!("cannot read the module {}", manifest.module.display()))
        .map_err(Failure::usage)?;
    let wasm = sandbox::module_from_file_bytes(&module_file).map_err(|e| Failure {
        error: anyhow!(e).context(format!("module {}", manifest.module.display())),
        code: exit::MODULE_REFUSED,
    })?;
    let data_dir = crate::data_dir(args.data_dir)
        .ok_or_else(|| Failure::usage(anyhow!("no data directory: pass --data-dir or set HOME")))?;
    let out_dir = args.out.unwrap_or_else(|| default_out_dir(&manifest));
    let cpus = args.cpus.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
    });

    let store = JobStore::open(&data_dir.join("submit.redb")).map_err(|e| Failure {
        error: e.into(),
        code: exit::USAGE,
    })?;
    let internal = |e: anyhow::Error| Failure {
        error: e,
        code: exit::HOST_FAILURE,
    };
    let module_digest = Digest::of(&wasm);
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
    let module = Arc::new(HostedModule::new(wasm.to_vec(), metering));
    let program = std::env::current_exe()
        .map_err(|e| internal(anyhow!(e).context("cannot find the worker binary")))?;
    let command = UnitHostCommand {
        program,
        args: vec![
            "unit-host".into(),
            "--nice".into(),
            UNIT_HOST_NICE.into(),
            "--data-dir".into(),
            data_dir.clone().into(),
        ],
    };
    // The queue holds every execution the job keeps in flight, so handing out a burst of leases
    // never meets a full queue before the unit threads pick them up.
    let threads = cpus as usize;
    let in_flight = cpus.saturating_mul(2);
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
    let mut display = Display::new();
    let summary = job
        .run(|p| display.show(p))
        .map_err(|e| internal(anyhow!(e)))?;
    display.finish();
    print_summary(&manifest, &summary);
    Ok(if summary.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::UNIT_FAILED)
    })
}

/// Progress on stderr: one line rewritten in place on a terminal, a plain line now and then
/// otherwise (logs and CI).
struct Display {
    terminal: bool,
    last_plain: Option<Instant>,
    drawn: bool,
    /// The latest line not yet printed in plain mode, printed at the end.
    unprinted: Option<String>,
}

impl Display {
    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            last_plain: None,
            drawn: false,
            unprinted: None,
        }
    }

    fn show(&mut self, p: &LocalProgress) {
        let line = progress_line(p);
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
            self.drawn = true;
        } else if self
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
        if self.drawn {
            eprintln!();
        } else if let Some(line) = self.unprinted.take() {
            eprintln!("{line}");
        }
    }
}

fn progress_line(p: &LocalProgress) -> String {
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
    format!(
        "{done}/{} units: {} accepted, {} running, {} failed, {rate:.1} units/s, ETA {eta}",
        p.units, p.accepted, p.running, p.failed
    )
}

fn print_summary(manifest: &JobManifest, s: &LocalSummary) {
    let r = manifest.redundancy;
    println!("job {} ({})", manifest.name, s.job);
    println!(
        "units: {} accepted, {} failed, of {}",
        s.accepted, s.failed, s.units
    );
    println!(
        "this run: {} units run this time, {} restored; {} executions, {} host failures, {} disagreeing results, {:.1}s",
        s.units_run,
        s.restored,
        s.executions,
        s.host_failures,
        s.dissents,
        s.elapsed.as_secs_f64()
    );
    println!(
        "validation: replicas {}, quorum {}, max attempts {}; replicas ran as redundant executions on this machine (simulated peer ids, not independent peers)",
        r.replicas, r.quorum, r.max_attempts
    );
    println!("results: {}", display_path(&s.results));
}

fn display_path(path: &Path) -> String {
    path.display().to_string()
}
