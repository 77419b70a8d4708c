//! Helpers shared by the tests that run `worker` as a process: `worker run` peers on loopback
//! addresses of their own, a lying peer in the test's process, pi jobs submitted with
//! `worker submit`, and what they leave behind.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use coordinator_free::identity::Identity;
use coordinator_free::node::{Bootstrap, Node, NodeConfig, WorkConfig, WorkRunner};
use coordinator_free::sandbox::SandboxConfig;
use serde_json::Value;

/// What a finished `worker submit` left behind.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Waits for `child`, whose output goes to `dir/TAG.stdout` and `dir/TAG.stderr`, at most
/// `limit`; past that it is killed and the test fails with its stderr.
pub fn finish(mut child: Child, dir: &Path, tag: &str, limit: Duration) -> Run {
    let read = |stream: &str| {
        std::fs::read_to_string(dir.join(format!("{tag}.{stream}"))).unwrap_or_default()
    };
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "worker submit did not finish within {limit:?}; stderr: {}",
                read("stderr")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: read("stdout"),
        stderr: read("stderr"),
    }
}

/// The number before `label` in a summary, e.g. "12 units run this time".
pub fn count_before(stdout: &str, label: &str) -> u64 {
    number_before(stdout, label)
}

/// The number before `label` in a summary, e.g. "1.12 executions per unit".
pub fn number_before<T: FromStr>(stdout: &str, label: &str) -> T {
    let at = stdout
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} in {stdout}"));
    stdout[..at]
        .split_whitespace()
        .last()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("a number before {label:?} in {stdout}"))
}

/// The `worker` binary under test.
pub const WORKER: &str = env!("CARGO_BIN_EXE_worker");

/// A `worker run` process, killed when dropped.
pub struct Peer {
    pub child: Child,
    pub id: String,
    pub addr: String,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    pub fn bootstrap(&self) -> String {
        format!("{}@{}", self.id, self.addr)
    }
}

/// Starts `worker run` on `listen` with the data directory `root/NAME` and one core, its
/// stderr in `root/NAME.stderr`, joining through `bootstrap` if given.
pub fn start_peer_at(root: &Path, name: &str, bootstrap: Option<&Peer>, listen: &str) -> Peer {
    start_peer_reading(root, name, bootstrap, listen, 0).0
}

/// [`start_peer_at`], returning also the `more` lines the peer prints after its address.
pub fn start_peer_reading(
    root: &Path,
    name: &str,
    bootstrap: Option<&Peer>,
    listen: &str,
    more: usize,
) -> (Peer, Vec<String>) {
    let mut command = Command::new(WORKER);
    command
        .args(["run", "--listen", listen, "--no-mdns", "--cpus", "1"])
        .arg("--data-dir")
        .arg(root.join(name))
        .env_remove("WORKER_LOG")
        // No config file: the user's own must not change what a test runs.
        .env("XDG_CONFIG_HOME", root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(root.join(format!("{name}.stderr"))).unwrap());
    if let Some(b) = bootstrap {
        command.args(["--bootstrap", &b.bootstrap()]);
    }
    let mut child = command.spawn().expect("worker run starts");
    // "peer ID listening on ADDR", read on a thread so a silent peer cannot hang the test.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        for _ in 0..=more {
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = (0..=more).map(|_| {
        rx.recv_timeout(Duration::from_secs(20))
            .expect("worker run prints its address")
    });
    let line = lines.next().expect("a first line");
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.get(2), Some(&"listening"), "{line}");
    let peer = Peer {
        child,
        id: words[1].to_owned(),
        addr: words[4].to_owned(),
    };
    let more = lines.collect();
    (peer, more)
}

/// When the lying peer made by a test alters its outputs.
pub enum Lies {
    /// Every output.
    Always,
    /// While the switch is set.
    While(Arc<AtomicBool>),
}

/// A runtime with one worker thread, for the lying peer.
pub fn one_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A peer in the test's process on `listen` with one slot, joining through `bootstrap`, whose
/// outputs are altered as `lies` says.
pub fn start_liar(
    runtime: &tokio::runtime::Runtime,
    listen: &str,
    bootstrap: &Peer,
    lies: Lies,
) -> Node {
    let mut config = NodeConfig::new(listen.parse().unwrap());
    config.mdns = false;
    config.bootstrap = vec![bootstrap.bootstrap().parse::<Bootstrap>().unwrap()];
    config.capacity.cores_donated = 1;
    config.capacity.cores_free = 1;
    let mut work = WorkConfig::new(WorkRunner::InProcess(SandboxConfig::default()), 1);
    match lies {
        Lies::Always => work.tamper = true,
        Lies::While(switch) => work.tamper_switch = Some(switch),
    }
    config.work = Some(work);
    runtime
        .block_on(Node::start(Identity::generate().unwrap(), config))
        .expect("the lying peer starts")
}

/// What `worker status --json --data-dir DIR` prints, or null.
pub fn status(dir: &Path) -> Value {
    let out = Command::new(WORKER)
        .args(["status", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .expect("worker status runs");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The peer's suspension reasons in `worker status --json --data-dir DIR`.
pub fn reasons(dir: &Path) -> Vec<String> {
    status(dir)["work"]["suspended"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes the config file a peer started by `start_peer_at(root, …)` reads.
pub fn write_config(root: &Path, text: &str) {
    let dir = root.join("coordinator-free");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("worker.toml"), text).unwrap();
}

/// Polls `check` every 100 ms; the test fails if it is not true within `limit`.
pub fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `dir/NAME.toml`: the pi example over `seeds` (inclusive) with `samples` samples a
/// unit, replicated twice, adaptive replication on if `adaptive`.
pub fn manifest(
    dir: &Path,
    name: &str,
    seeds: (u64, u64),
    samples: u64,
    adaptive: bool,
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let adaptive = if adaptive { "adaptive = true\n" } else { "" };
    std::fs::write(
        &path,
        format!(
            "name = {name:?}\nmodule = {:?}\n[inputs.sweep]\nseed = {{ start = {}, stop = {}, step = 1 }}\nsamples = {samples}\n[redundancy]\nreplicas = 2\n{adaptive}",
            example_artifacts::PI,
            seeds.0,
            seeds.1
        ),
    )
    .unwrap();
    path
}

/// Starts `worker submit MANIFEST` through `via`, with the data directory `root/submitter`,
/// results in `root/out-NAME` (NAME the manifest's file stem) and its output in
/// `root/TAG.stdout` and `root/TAG.stderr`.
pub fn spawn_submit(root: &Path, manifest: &Path, via: &Peer, tag: &str) -> Child {
    spawn_submit_with(root, manifest, via, tag, &[])
}

/// [`spawn_submit`] with `extra` arguments after the others.
pub fn spawn_submit_with(
    root: &Path,
    manifest: &Path,
    via: &Peer,
    tag: &str,
    extra: &[&str],
) -> Child {
    let mut command = Command::new(WORKER);
    // A test that fails before it waits for the submitter must not leave it running (one that
    // waits for hosts would wait for ever): it is killed when the test's thread ends.
    // SAFETY: prctl(2) only sets this process's parent-death signal; it allocates nothing and
    // is async-signal-safe, as a pre_exec closure must be.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .arg("submit")
        .arg(manifest)
        .arg("--out")
        .arg(root.join(format!(
            "out-{}",
            manifest.file_stem().unwrap().to_string_lossy()
        )))
        .arg("--data-dir")
        .arg(root.join("submitter"))
        .args(["--bootstrap", &via.bootstrap(), "--cpus", "0", "--no-mdns"])
        .args(extra)
        .env_remove("WORKER_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(root.join(format!("{tag}.stdout"))).unwrap())
        .stderr(std::fs::File::create(root.join(format!("{tag}.stderr"))).unwrap())
        .spawn()
        .expect("worker submit starts")
}

/// Starts `worker submit MANIFEST` on this machine alone (two cores), results in `dir/OUT`, the
/// journal in `dir/data`, its output in `dir/TAG.stdout` and `dir/TAG.stderr`.
pub fn spawn_local_submit(dir: &Path, manifest: &Path, out: &str, tag: &str) -> Child {
    Command::new(WORKER)
        .arg("submit")
        .arg(manifest)
        .arg("--out")
        .arg(dir.join(out))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--cpus", "2"])
        .env_remove("WORKER_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join(format!("{tag}.stdout"))).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{tag}.stderr"))).unwrap())
        .spawn()
        .expect("worker starts")
}

/// The lines of `root/out-JOB/results.jsonl` so far.
pub fn results(root: &Path, job: &str) -> Vec<Value> {
    std::fs::read_to_string(root.join(format!("out-{job}/results.jsonl")))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// Checks that a `results.jsonl` line of the pi example was accepted with the native kernel's
/// answer for its seed, at `samples` samples; returns its unit index.
pub fn check_pi_line(line: &Value, samples: u64) -> u64 {
    assert_eq!(line["status"], "accepted", "{line}");
    let seed = line["input"]["params"]["seed"].as_u64().unwrap();
    let expected = example_pi::compute(&example_pi::Input { samples, seed });
    assert_eq!(
        line["output"],
        serde_json::to_value(expected).unwrap(),
        "a wrong result survived: {line}"
    );
    line["index"].as_u64().unwrap()
}
