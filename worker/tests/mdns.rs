//! mDNS discovery between real `worker run` processes with no bootstrap address at all. They run
//! inside a network namespace made for the test, whose loopback has multicast turned on, so the
//! announcements never leave the test (and the host's own network is untouched). Making a
//! namespace needs root; without it the test says so and checks nothing.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WORKER: &str = env!("CARGO_BIN_EXE_worker");

/// A network namespace, deleted when the test ends.
struct Namespace(String);

impl Namespace {
    fn create() -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let name = format!("cf-mdns-{}", std::process::id());
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Self(name);
        let ready = ip(&["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"])
            && ip(&[
                "netns",
                "exec",
                &ns.0,
                "ip",
                "link",
                "set",
                "lo",
                "multicast",
                "on",
            ])
            && ip(&[
                "netns",
                "exec",
                &ns.0,
                "ip",
                "route",
                "add",
                "224.0.0.0/4",
                "dev",
                "lo",
            ]);
        assert!(
            ready,
            "the namespace's loopback could not be set up for multicast"
        );
        Some(ns)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0, program]);
        cmd
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peers_known(ns: &Namespace, dir: &Path) -> Option<usize> {
    let out = ns
        .command(WORKER)
        .args(["status", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .ok()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    status["peers"].as_array().map(Vec::len)
}

#[test]
fn peers_find_each_other_by_mdns_alone() {
    let Some(ns) = Namespace::create() else {
        eprintln!("skipped: creating a network namespace needs root and iproute2");
        return;
    };
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let _peers: Vec<Peer> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let child = ns
                .command(WORKER)
                .args(["run", "--listen"])
                .arg(format!("127.0.0.1:{}", 7601 + i))
                .arg("--data-dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("worker run starts");
            Peer(child)
        })
        .collect();
    let started = Instant::now();
    let mut known = vec![None; dirs.len()];
    while started.elapsed() < Duration::from_secs(30) {
        known = dirs.iter().map(|d| peers_known(&ns, d.path())).collect();
        if known.iter().all(|k| *k == Some(dirs.len() - 1)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("peers known after 30 s, per peer: {known:?}");
}
