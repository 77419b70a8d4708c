//! Jobs: `worker submit` over three `worker run` peers on loopback and on this machine alone,
//! against the same work done natively and by GNU parallel.
//!
//! ```sh
//! apt-get install parallel                  # optional: the GNU parallel column
//! cargo bench -p worker --bench jobs
//! ```
//!
//! Prints (1) the useful-work fraction of a 200-unit Monte Carlo sweep of ~50 ms units — the
//! native single-core time of all units ÷ cores ÷ wall time — for `worker submit` at replicas 1
//! and 2, over the network and locally, and for GNU parallel running the natively compiled
//! kernel; (2) throughput of 10,000 tiny units at replicas 1 and 2; (3) the data path: 100
//! inputs of 10 MiB delivered to two peers, next to Dask and Ray moving the same files (set up
//! once with `worker/benches/data_path/setup.sh`; `jobs --data-path` runs this part alone). Each figure is the median
//! of a few whole runs, each in a fresh data directory (so nothing is resumed). Wall times are
//! of the whole `worker submit` process: start, joining the network, journal and results.
//!
//! The machine's speed drifts over minutes on a shared VM, so each run of a sweep is paired with
//! a native probe (20 of the units, one core) timed just before it: a run's useful-work fraction
//! is the probe scaled to all units ÷ cores ÷ that run's wall, and the row shows the median and
//! the range over the runs.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coordinator_free::sandbox::{Metering, Sandbox, SandboxConfig, UnitRequest};

const WORKER: &str = env!("CARGO_BIN_EXE_worker");
const RUNS: usize = 3;
const PI_UNITS: u64 = 200;
const TINY_UNITS: u64 = 10_000;
/// Units in the native probe timed before each run of the sweep.
const PROBE_UNITS: u64 = 20;

/// The `worker` binary every peer and submitter runs: this build's, or the one named by
/// `CF_BENCH_WORKER` (a build of an earlier commit, for a baseline run just before).
fn worker() -> String {
    std::env::var("CF_BENCH_WORKER").unwrap_or_else(|_| WORKER.to_owned())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One run of the sweep and the native probe timed just before it.
struct Run {
    wall: Duration,
    /// The native single-core time of all units, estimated from the probe.
    native: Duration,
}

/// Times `run` after a native probe, `RUNS` times.
fn paired_runs(samples: u64, mut run: impl FnMut() -> Duration) -> Vec<Run> {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            for seed in 1..=PROBE_UNITS {
                std::hint::black_box(pi(seed, samples));
            }
            let native = t.elapsed() * (PI_UNITS / PROBE_UNITS) as u32;
            Run {
                wall: run(),
                native,
            }
        })
        .collect()
}

/// Median of the per-run values, with their minimum and maximum.
fn median_range(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn pi(seed: u64, samples: u64) -> example_pi::Output {
    example_pi::compute(&example_pi::Input { samples, seed })
}

/// Samples per unit so one unit takes about `target` natively.
fn calibrate(target: Duration) -> u64 {
    let probe = 2_000_000;
    let t = Instant::now();
    std::hint::black_box(pi(1, probe));
    let per_sample = t.elapsed().as_secs_f64() / probe as f64;
    ((target.as_secs_f64() / per_sample) as u64).max(1)
}

/// `count` `worker run` peers on loopback, one core each; stopped when dropped.
struct Network {
    peers: Vec<Child>,
    bootstrap: String,
    _dirs: Vec<tempfile::TempDir>,
}

impl Network {
    /// `worker submit` arguments that join this network and lend the submitter no core.
    fn submit_args(&self) -> [&str; 5] {
        [
            "--bootstrap",
            self.bootstrap.as_str(),
            "--cpus",
            "0",
            "--no-mdns",
        ]
    }
}

/// The benchmark's Monte Carlo sweep as a job manifest.
fn pi_manifest(samples: u64, replicas: u32) -> String {
    format!(
        "name = \"pi\"\nmodule = \"pi.wasm\"\n[inputs.sweep]\nseed = {{ start = 1, stop = {PI_UNITS}, step = 1 }}\nsamples = {samples}\n[redundancy]\nreplicas = {replicas}\nquorum = {replicas}\n[limits]\ntimeout_secs = 120\n"
    )
}

/// The sweep of `PI_UNITS` seeds from `first`, replicated twice, adaptive: a job of its own
/// for every `first`, so a submitter keeping its data directory never resumes one.
fn adaptive_manifest(samples: u64, first: u64) -> String {
    format!(
        "name = \"pi\"\nmodule = \"pi.wasm\"\n[inputs.sweep]\nseed = {{ start = {first}, stop = {}, step = 1 }}\nsamples = {samples}\n[redundancy]\nreplicas = 2\nquorum = 2\nadaptive = true\n[limits]\ntimeout_secs = 120\n",
        first + PI_UNITS - 1
    )
}

impl Drop for Network {
    fn drop(&mut self) {
        for p in &mut self.peers {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn network(count: usize) -> Network {
    let mut peers = Vec::new();
    let mut dirs = Vec::new();
    let mut bootstrap = String::new();
    for i in 0..count {
        let dir = tempfile::tempdir().expect("data dir");
        let mut command = Command::new(worker());
        // Each peer on a loopback address of its own: a host of its own to the submitter.
        let listen = format!("127.0.0.{}:0", i + 2);
        command
            .args(["run", "--listen", &listen, "--no-mdns", "--cpus", "1"])
            .arg("--data-dir")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if i > 0 {
            command.args(["--bootstrap", &bootstrap]);
        }
        let mut child = command.spawn().expect("worker run starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("address line");
        let words: Vec<&str> = line.split_whitespace().collect();
        if i == 0 {
            bootstrap = format!("{}@{}", words[1], words[4]);
        }
        peers.push(child);
        dirs.push(dir);
    }
    // Let membership settle so every job starts with the whole network known.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = Command::new(worker())
            .args(["status", "--json", "--data-dir"])
            .arg(dirs[0].path())
            .output()
            .expect("status");
        let known = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["peers"].as_array().map(Vec::len))
            .unwrap_or(0);
        if known + 1 >= count {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Network {
        peers,
        bootstrap,
        _dirs: dirs,
    }
}

/// Runs `worker submit` on a manifest in a fresh data directory; returns its wall time.
fn submit(dir: &Path, name: &str, manifest: &str) -> Duration {
    submit_with(dir, name, manifest, &[])
}

fn submit_with(dir: &Path, name: &str, manifest: &str, extra: &[&str]) -> Duration {
    let data = tempfile::tempdir().expect("data dir");
    submit_in(dir, data.path(), name, manifest, extra)
}

/// Runs `worker submit` with the data directory `data` (a submitter that keeps its journal and
/// its trust table from one job to the next).
fn submit_in(dir: &Path, data: &Path, name: &str, manifest: &str, extra: &[&str]) -> Duration {
    let job = dir.join(format!("{name}.toml"));
    std::fs::write(&job, manifest).expect("manifest written");
    let out = tempfile::tempdir().expect("out dir");
    let started = Instant::now();
    let status = Command::new(worker())
        .arg("submit")
        .arg(&job)
        .arg("--data-dir")
        .arg(data)
        .arg("--out")
        .arg(out.path())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("worker submit runs");
    let wall = started.elapsed();
    assert!(status.success(), "worker submit failed on {name}");
    let lines = std::fs::read_to_string(out.path().join("results.jsonl"))
        .expect("results written")
        .lines()
        .count();
    assert!(lines > 0, "no results for {name}");
    wall
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // GNU parallel runs this same program as the native kernel: `jobs --pi SEED SAMPLES`.
    if args.get(1).map(String::as_str) == Some("--pi") {
        let seed = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
        let samples = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
        println!(
            "{}",
            serde_json::to_string(&pi(seed, samples)).expect("encodes")
        );
        return;
    }
    println!("# worker binary: {}", worker());
    // `jobs --data-path` runs only the data path and its baselines.
    if args.iter().any(|a| a == "--data-path") {
        data_path();
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("pi.wasm"), example_artifacts::PI_BYTES).expect("module");
    std::fs::write(dir.path().join("echo.wasm"), example_artifacts::ECHO_BYTES).expect("module");

    let samples = calibrate(Duration::from_millis(50));
    let native_total = {
        let t = Instant::now();
        for seed in 1..=PI_UNITS {
            std::hint::black_box(pi(seed, samples));
        }
        t.elapsed()
    };
    println!(
        "# {PI_UNITS} Monte Carlo units of {samples} samples ({:.1} ms each natively), {cores} cores",
        native_total.as_secs_f64() * 1e3 / PI_UNITS as f64
    );
    // The same kernel in the sandbox, one core, no deadline checks (as in a unit host): how
    // much of the gap to native is the compiled wasm rather than the framework.
    let sandboxed_total = {
        let sandbox = Sandbox::new(SandboxConfig {
            epoch_deadlines: false,
            ..SandboxConfig::default()
        })
        .expect("sandbox");
        let module = sandbox
            .prepare(example_artifacts::PI_BYTES, Metering::Off)
            .expect("module");
        let probe = 20;
        let t = Instant::now();
        for seed in 1..=probe {
            let input = format!(r#"{{"samples":{samples},"seed":{seed}}}"#);
            let report = sandbox.run(&module, UnitRequest::new(input.into_bytes()));
            assert!(report.result.is_ok(), "the kernel runs");
        }
        t.elapsed() * (PI_UNITS as u32) / probe
    };
    println!(
        "# sandboxed kernel: {:.1} ms per unit on one core ({:.2}x native speed)",
        sandboxed_total.as_secs_f64() * 1e3 / PI_UNITS as f64,
        native_total.as_secs_f64() / sandboxed_total.as_secs_f64()
    );
    println!(
        "# useful-work fraction = native single-core total / cores / wall (\"vs sandboxed\": the sandboxed kernel's total instead); median of {RUNS} runs"
    );
    println!(
        "{:<62} {:>10} {:>11} {:>13} {:>14}",
        "runner", "wall", "useful", "range", "vs sandboxed"
    );
    // The sandboxed kernel's speed against native, measured once: "vs sandboxed" divides each
    // run's fraction by it.
    let sandbox_speed = native_total.as_secs_f64() / sandboxed_total.as_secs_f64();
    let row = |name: &str, runs: &[Run], sandboxed: bool| {
        let wall = median(runs.iter().map(|r| r.wall).collect());
        let (useful, low, high) = median_range(
            runs.iter()
                .map(|r| 100.0 * r.native.as_secs_f64() / cores as f64 / r.wall.as_secs_f64())
                .collect(),
        );
        let vs = if sandboxed {
            format!("{:.1} %", useful / sandbox_speed)
        } else {
            "-".to_string()
        };
        println!(
            "{name:<62} {:>8.2} s {useful:>9.1} % {:>13} {vs:>14}",
            wall.as_secs_f64(),
            format!("{low:.1}-{high:.1} %"),
        );
    };
    println!(
        "{:<62} {:>8.2} s {:>9.1} % {:>13} {:>14}",
        "native, one core, sequential (reference)",
        native_total.as_secs_f64(),
        100.0 / cores as f64,
        "-",
        "-"
    );

    let net = network(3);
    let via = net.submit_args();
    for replicas in [1, 2] {
        let manifest = pi_manifest(samples, replicas);
        let runs = paired_runs(samples, || submit_with(dir.path(), "pi", &manifest, &via));
        row(
            &format!("worker submit, 3 peers, replicas = {replicas}"),
            &runs,
            true,
        );
    }
    {
        // One peer per core: the shape of a network of machines, where no two peers' unit
        // hosts (and module compilations) share a core.
        let pair = network(cores.max(1));
        let via = pair.submit_args();
        for replicas in [1, 2] {
            let manifest = pi_manifest(samples, replicas);
            let runs = paired_runs(samples, || submit_with(dir.path(), "pi", &manifest, &via));
            row(
                &format!(
                    "worker submit, {} peers (1 per core), replicas = {replicas}",
                    cores.max(1)
                ),
                &runs,
                true,
            );
        }
        // Adaptive replication: a warm-up job lets the peers earn this submitter's trust
        // (untimed), then every timed run is a new job of the same size from the same data
        // directory.
        let submitter = tempfile::tempdir().expect("submitter data dir");
        submit_in(
            dir.path(),
            submitter.path(),
            "pi",
            &adaptive_manifest(samples, 1_000_001),
            &via,
        );
        let mut next = 0u64;
        let runs = paired_runs(samples, || {
            next += 1;
            let manifest = adaptive_manifest(samples, 1 + next * 10_000);
            submit_in(dir.path(), submitter.path(), "pi", &manifest, &via)
        });
        row(
            &format!(
                "worker submit, {} peers (1 per core), replicas = 2, adaptive",
                cores.max(1)
            ),
            &runs,
            true,
        );
    }

    for replicas in [1, 2] {
        let manifest = pi_manifest(samples, replicas);
        let runs = paired_runs(samples, || submit(dir.path(), "pi", &manifest));
        row(
            &format!("worker submit, this machine, replicas = {replicas}"),
            &runs,
            true,
        );
    }

    let parallel_available = Command::new("parallel")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if parallel_available {
        let me = std::env::current_exe().expect("own path");
        let runs = paired_runs(samples, || {
            let started = Instant::now();
            let status = Command::new("parallel")
                .arg("-j")
                .arg(cores.to_string())
                .arg(&me)
                .args(["--pi", "{}"])
                .arg(samples.to_string())
                .arg(":::")
                .args((1..=PI_UNITS).map(|s| s.to_string()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("parallel runs");
            assert!(status.success(), "GNU parallel failed");
            started.elapsed()
        });
        row(
            &format!("GNU parallel -j {cores}, native kernel"),
            &runs,
            false,
        );
    } else {
        println!(
            "{:<62} (not installed: apt-get install parallel)",
            "GNU parallel"
        );
    }

    println!();
    println!(
        "# {TINY_UNITS} tiny units (echo module, a few bytes each), end to end: process start, journal, results; median of {RUNS} runs"
    );
    for (label, extra) in [("3 peers", &via[..]), ("this machine", &[][..])] {
        for replicas in [1, 2] {
            let manifest = format!(
                "name = \"tiny\"\nmodule = \"echo.wasm\"\n[inputs.sweep]\nx = {{ start = 1, stop = {TINY_UNITS}, step = 1 }}\n[redundancy]\nreplicas = {replicas}\nquorum = {replicas}\n"
            );
            let wall = median(
                (0..RUNS)
                    .map(|_| submit_with(dir.path(), "tiny", &manifest, extra))
                    .collect(),
            );
            println!(
                "{:<62} {:>8.2} s {:>9.0} units/s",
                format!("worker submit, {label}, replicas = {replicas}"),
                wall.as_secs_f64(),
                TINY_UNITS as f64 / wall.as_secs_f64()
            );
        }
    }

    println!();
    data_path();
}

/// Inputs of the data path: this many files of `DATA_INPUT_BYTES` each.
const DATA_INPUTS: usize = 100;
const DATA_INPUT_BYTES: usize = 10 << 20;

/// 100 inputs of 10 MiB delivered to two peers (one per core) and checksummed there, against
/// Dask and Ray doing the same with the same files in the same run. The figure is the inputs'
/// bytes over the wall time of the whole `worker submit` (start, hashing the inputs, joining,
/// serving them, results) — for Dask and Ray from the first read to the last result, with the
/// cluster up and warm.
fn data_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let inputs = dir.path().join("inputs");
    std::fs::create_dir_all(&inputs).expect("inputs dir");
    // Incompressible bytes from a fixed seed, so every run and every system moves the same.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..DATA_INPUTS {
        let mut bytes = vec![0u8; DATA_INPUT_BYTES];
        for word in bytes.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        std::fs::write(inputs.join(format!("input-{i:03}.bin")), bytes).expect("input");
    }
    std::fs::write(
        dir.path().join("checksum.wat"),
        include_str!("../../examples/wat/checksum.wat"),
    )
    .expect("module");
    let manifest = format!(
        "name = \"data\"\nmodule = \"checksum.wat\"\n[inputs]\ndir = \"{}\"\n[redundancy]\nreplicas = 1\nquorum = 1\n[limits]\nmemory_mb = 64\n",
        inputs.display()
    );
    let bytes = (DATA_INPUTS * DATA_INPUT_BYTES) as f64;
    println!(
        "# data path: {DATA_INPUTS} inputs of {} MiB to 2 peers (1 per core) on loopback, a checksum each; MB/s = 10^6 bytes/s, median and range of {RUNS} runs",
        DATA_INPUT_BYTES >> 20
    );
    let net = network(2);
    let via = net.submit_args();
    let rates: Vec<f64> = (0..RUNS)
        .map(|run| {
            // Every run moves new bytes: a worker keeps recent inputs (by digest), and would
            // otherwise skip fetching what it ran the run before.
            salt_inputs(&inputs, run);
            bytes / submit_with(dir.path(), "data", &manifest, &via).as_secs_f64() / 1e6
        })
        .collect();
    drop(net);
    print_rate(
        "worker submit, 2 peers, replicas = 1 (whole process)",
        rates,
    );
    // The baselines run from a virtual environment made by worker/benches/data_path/setup.sh.
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/data-path-venv/bin/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/data_path/baseline.py");
    for system in ["dask", "ray"] {
        let label = format!(
            "{}, 2 worker processes",
            if system == "dask" {
                "Dask (TCP)"
            } else {
                "Ray (shared memory)"
            }
        );
        if !python.exists() {
            println!("{label:<62} (not set up: worker/benches/data_path/setup.sh)");
            continue;
        }
        let out = Command::new(&python)
            .arg(&script)
            .arg(system)
            .arg("--inputs")
            .arg(&inputs)
            .args(["--runs", &RUNS.to_string()])
            .stderr(Stdio::null())
            .output()
            .expect("baseline runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let runs: Vec<f64> = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("RESULT {system} ")))
            .and_then(|rest| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix("runs="))
            })
            .map(|list| list.split(',').filter_map(|v| v.parse().ok()).collect())
            .unwrap_or_default();
        if runs.is_empty() {
            println!(
                "{label:<62} (failed: {})",
                text.lines().last().unwrap_or("")
            );
        } else {
            print_rate(&label, runs);
        }
    }
}

/// Writes `run` over the first bytes of every input file, then waits until the files count as
/// settled (a second), as a scientist's input files are: the submitter then trusts their
/// digests from the start of the job, not hashing them again as it serves them.
fn salt_inputs(inputs: &Path, run: usize) {
    use std::io::{Seek, SeekFrom};
    for i in 0..DATA_INPUTS {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(inputs.join(format!("input-{i:03}.bin")))
            .expect("input opens");
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.write_all(&(run as u64 + 1).to_le_bytes())
            .expect("salt written");
    }
    std::thread::sleep(Duration::from_millis(1100));
}

fn print_rate(label: &str, rates: Vec<f64>) {
    let (median, low, high) = median_range(rates);
    println!("{label:<62} {median:>8.0} MB/s  ({low:.0}–{high:.0})");
}
