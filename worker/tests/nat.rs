//! Peers behind NAT: two `worker` processes behind separate NATs and a public relay, in network
//! namespaces the test makes. The NATs are real: nftables masquerade, and a forward filter that
//! lets in only what answers a flow from inside. One NATed peer submits a job; it must run on
//! the other (the relay declines the job). With NATs that keep a flow's source port the worker
//! reaches the submitter directly, through a hole punched after the relay's introduction; when
//! the worker's NAT picks a random port per flow (as symmetric NATs do) the punch cannot work,
//! and the units travel through a circuit the relay carries.
//!
//! ```text
//!   hosta 10.1.0.2 ─ nata [10.1.0.1 | 203.0.113.2] ─┐
//!                                                    inet ─ relay 198.51.100.10
//!   hostb 10.2.0.2 ─ natb [10.2.0.1 | 192.0.2.2] ───┘
//! ```
//!
//! Needs root, iproute2 and nftables. Without them the test says it was skipped, unless
//! `CF_REQUIRE_NETNS` is set (as the landing check sets it), when it fails.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{WORKER, check_pi_line, finish};

const RELAY: &str = "198.51.100.10:7401";
const NAMESPACES: [&str; 6] = ["inet", "relay", "nata", "hosta", "natb", "hostb"];

/// The namespaces of one test, deleted when it ends.
struct Topology {
    suffix: String,
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> bool {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let Ok(mut child) = command.spawn() else {
        return false;
    };
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write as _;
        let _ = pipe.write_all(text.as_bytes());
    }
    child.wait().is_ok_and(|s| s.success())
}

/// A NAT: masquerade out of `wan` (`MAPPING` is replaced by nothing, or by `random` for a
/// NAT that maps every flow to a port of its own), and forward only from the LAN or what
/// answers it.
const NAT_RULES: &str = r#"
table ip nat {
  chain post {
    type nat hook postrouting priority 100; policy accept;
    oifname "wan" masquerade MAPPING
  }
}
table ip filter {
  chain through {
    type filter hook forward priority 0; policy drop;
    iifname "lan" accept
    ct state established,related accept
  }
}
"#;

impl Topology {
    /// The topology; with `symmetric`, the worker's NAT (natb) maps each flow to a random port.
    fn create(tag: &str, symmetric: bool) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !run("nft", &["--version"], None) {
            return None;
        }
        let topology = Self {
            suffix: format!("-{tag}{}", std::process::id()),
        };
        for ns in NAMESPACES {
            if !run("ip", &["netns", "add", &topology.name(ns)], None) {
                return None;
            }
            assert!(topology.ip(ns, &["link", "set", "lo", "up"]));
        }
        let link = |a: &str, a_if: &str, b: &str, b_if: &str| {
            assert!(
                run(
                    "ip",
                    &[
                        "link",
                        "add",
                        a_if,
                        "netns",
                        &topology.name(a),
                        "type",
                        "veth",
                        "peer",
                        "name",
                        b_if,
                        "netns",
                        &topology.name(b),
                    ],
                    None,
                ),
                "veth {a}/{b}"
            );
        };
        link("relay", "eth", "inet", "to-relay");
        link("nata", "wan", "inet", "to-nata");
        link("natb", "wan", "inet", "to-natb");
        link("nata", "lan", "hosta", "eth");
        link("natb", "lan", "hostb", "eth");
        let address = |ns: &str, dev: &str, addr: &str| {
            assert!(topology.ip(ns, &["addr", "add", addr, "dev", dev]));
            assert!(topology.ip(ns, &["link", "set", "dev", dev, "up"]));
        };
        let route = |ns: &str, via: &str| {
            assert!(topology.ip(ns, &["route", "add", "default", "via", via]));
        };
        address("inet", "to-relay", "198.51.100.1/24");
        address("inet", "to-nata", "203.0.113.1/24");
        address("inet", "to-natb", "192.0.2.1/24");
        address("relay", "eth", "198.51.100.10/24");
        route("relay", "198.51.100.1");
        address("nata", "wan", "203.0.113.2/24");
        address("nata", "lan", "10.1.0.1/24");
        route("nata", "203.0.113.1");
        address("natb", "wan", "192.0.2.2/24");
        address("natb", "lan", "10.2.0.1/24");
        route("natb", "192.0.2.1");
        address("hosta", "eth", "10.1.0.2/24");
        route("hosta", "10.1.0.1");
        address("hostb", "eth", "10.2.0.2/24");
        route("hostb", "10.2.0.1");
        for router in ["inet", "nata", "natb"] {
            assert!(topology.exec_ok(
                router,
                &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]
            ));
        }
        for nat in ["nata", "natb"] {
            let mapping = if symmetric && nat == "natb" {
                "random"
            } else {
                ""
            };
            assert!(
                run(
                    "ip",
                    &["netns", "exec", &topology.name(nat), "nft", "-f", "-"],
                    Some(&NAT_RULES.replace("MAPPING", mapping)),
                ),
                "nftables rules of {nat}"
            );
        }
        Some(topology)
    }

    fn name(&self, ns: &str) -> String {
        format!("cf-{ns}{}", self.suffix)
    }

    fn ip(&self, ns: &str, args: &[&str]) -> bool {
        let mut all = vec!["ip"];
        all.extend_from_slice(args);
        self.exec_ok(ns, &all)
    }

    fn exec_ok(&self, ns: &str, args: &[&str]) -> bool {
        let name = self.name(ns);
        let mut all = vec!["netns", "exec", name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all, None)
    }

    /// `program` run inside namespace `ns`.
    fn command(&self, ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name(ns), program]);
        cmd
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in NAMESPACES {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name(ns)])
                .status();
        }
    }
}

/// A `worker run` process, killed when the test ends.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_peer(topology: &Topology, ns: &str, dir: &Path, args: &[&str]) -> Peer {
    let child = topology
        .command(ns, WORKER)
        .arg("run")
        .args(args)
        .args(["--discovery", "overlay", "--no-mdns", "--data-dir"])
        .arg(dir)
        .env("WORKER_LOG", "coordinator_free=info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.with_extension("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.with_extension("stderr")).unwrap())
        .spawn()
        .expect("worker run starts");
    Peer(child)
}

/// The peer id a `worker run` printed, once it has.
fn peer_id(dir: &Path) -> String {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let out = std::fs::read_to_string(dir.with_extension("stdout")).unwrap_or_default();
        if let Some(id) = out
            .lines()
            .find_map(|l| l.strip_prefix("peer "))
            .and_then(|l| l.split_whitespace().next())
        {
            return id.to_owned();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no peer id printed in {}", dir.display());
}

/// Waits until `dir`'s log holds `line`.
fn wait_for_log(dir: &Path, line: &str) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let log = std::fs::read_to_string(dir.with_extension("stderr")).unwrap_or_default();
        if log.contains(line) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(dir.with_extension("stderr")).unwrap_or_default();
    panic!("{} never logged {line:?}:\n{log}", dir.display());
}

/// The paths the worker behind NAT reported: (direct, relayed).
struct Paths {
    direct: bool,
    relayed: bool,
}

/// Runs a 20-unit job from behind one NAT on a worker behind the other; `None` when the
/// topology cannot be made here.
fn job_across_nats(tag: &str, symmetric: bool) -> Option<Paths> {
    let Some(topology) = Topology::create(tag, symmetric) else {
        assert!(
            std::env::var_os("CF_REQUIRE_NETNS").is_none(),
            "CF_REQUIRE_NETNS is set, but network namespaces with nftables cannot be made here"
        );
        eprintln!("skipped: the NAT topology needs root, iproute2 and nftables");
        return None;
    };
    let root = tempfile::tempdir().unwrap();
    let relay_dir = root.path().join("relay");
    let worker_dir = root.path().join("behind-b");
    // The relay declines the job (its units may run 60 s, it allows 1), so units can only run
    // behind the other NAT.
    let _relay = start_peer(
        &topology,
        "relay",
        &relay_dir,
        &[
            "--listen",
            RELAY,
            "--relay",
            "--cpus",
            "1",
            "--max-unit-secs",
            "1",
        ],
    );
    let relay_id = peer_id(&relay_dir);
    let _worker = start_peer(
        &topology,
        "hostb",
        &worker_dir,
        &[
            "--listen",
            "0.0.0.0:7401",
            "--bootstrap",
            RELAY,
            "--via-relay",
            RELAY,
            "--cpus",
            "1",
        ],
    );
    let worker_id = peer_id(&worker_dir);
    wait_for_log(&worker_dir, "reservation held");
    // Both say what they are to each other: the worker its reservation and the address its NAT
    // gave it, the relay what it holds.
    let status = |ns: &str, dir: &Path| {
        let out = topology
            .command(ns, WORKER)
            .args(["status", "--data-dir"])
            .arg(dir)
            .output()
            .expect("worker status runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let worker_status = status("hostb", &worker_dir);
    assert!(
        worker_status.contains(&format!(
            "reservation on {RELAY}, which sees this peer at 192.0.2.2:"
        )),
        "{worker_status}"
    );
    let relay_status = status("relay", &relay_dir);
    assert!(
        relay_status.contains("serving: 1 reservations, 0 circuits"),
        "{relay_status}"
    );

    let manifest = root.path().join("nat.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"nat\"\nmodule = {:?}\n[inputs.sweep]\nseed = {{ start = 1, stop = 20, step = 1 }}\nsamples = 1000\n[redundancy]\nreplicas = 1\n[limits]\ntimeout_secs = 60\n",
            example_artifacts::PI
        ),
    )
    .unwrap();
    let submitter = topology
        .command("hosta", WORKER)
        .arg("submit")
        .arg(&manifest)
        .args([
            "--bootstrap",
            RELAY,
            "--via-relay",
            RELAY,
            "--discovery",
            "overlay",
            "--no-mdns",
            "--cpus",
            "0",
            "--data-dir",
        ])
        .arg(root.path().join("submitter"))
        .arg("--out")
        .arg(root.path().join("out"))
        .env("WORKER_LOG", "coordinator_free=info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(root.path().join("submit.stdout")).unwrap())
        .stderr(std::fs::File::create(root.path().join("submit.stderr")).unwrap())
        .spawn()
        .expect("worker submit starts");
    let submitted = Instant::now();
    let run = finish(submitter, root.path(), "submit", Duration::from_secs(120));
    let worker_log = std::fs::read_to_string(worker_dir.with_extension("stderr")).unwrap();
    let direct = worker_log.contains("direct path through NAT to the submitter opened");
    let relayed = worker_log.contains("relayed path to the submitter opened");
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!(
        "{tag}: direct path between the two NATed peers established: {}; relayed path: {}; the whole submit took {:.2} s",
        yes(direct),
        yes(relayed),
        submitted.elapsed().as_secs_f64()
    );
    assert_eq!(
        run.code,
        Some(0),
        "the job did not finish:\n{}\n{}\nworker behind NAT:\n{worker_log}",
        run.stdout,
        run.stderr
    );
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(root.path().join("out/results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(lines.len(), 20);
    for line in &lines {
        check_pi_line(line, 1000);
    }
    assert!(
        run.stdout
            .contains(&format!("peer {worker_id}: 20 executions")),
        "every unit ran behind the other NAT:\n{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains(&relay_id),
        "the relay ran units:\n{}",
        run.stdout
    );
    Some(Paths { direct, relayed })
}

#[test]
fn a_job_from_behind_one_nat_runs_behind_another_through_a_punched_hole() {
    let Some(paths) = job_across_nats("punch", false) else {
        return;
    };
    assert!(paths.direct, "the units ran, but not over a direct path");
    assert!(
        !paths.relayed,
        "a circuit was opened though the punch worked"
    );
}

#[test]
fn behind_a_nat_that_maps_each_flow_anew_the_units_go_through_the_relay() {
    let Some(paths) = job_across_nats("sym", true) else {
        return;
    };
    assert!(
        !paths.direct,
        "a direct path through a port-randomising NAT: the test's NAT is not what it claims"
    );
    assert!(paths.relayed, "the units ran, but not through a circuit");
}
