//! `worker run`, `worker status` and `worker id` as real processes on loopback, mDNS off.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const WORKER: &str = env!("CARGO_BIN_EXE_worker");

/// Kills the child when the test ends, however it ends.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_peer(dir: &Path, extra: &[&str]) -> Peer {
    let child = Command::new(WORKER)
        .args(["run", "--listen", "127.0.0.1:0", "--no-mdns", "--data-dir"])
        .arg(dir)
        .args(extra)
        // No config file: the user's own must not change what a test runs.
        .env("XDG_CONFIG_HOME", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker run");
    Peer(child)
}

fn worker(args: &[&str], dir: &Path) -> Output {
    Command::new(WORKER)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run worker")
}

fn status_json(dir: &Path) -> Option<Value> {
    let out = worker(&["status", "--json"], dir);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls `worker status --json` until `check` accepts it or 15 s pass.
fn wait_for_status(dir: &Path, check: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(15) {
        if let Some(status) = status_json(dir) {
            if check(&status) {
                return status;
            }
            last = Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("status never satisfied the check; last: {last:?}");
}

#[test]
fn run_status_and_id_as_processes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));

    // Before any peer runs: status is one clear line and a failure exit, not a panic.
    let out = worker(&["status"], &dir_a);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no peer is running"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Full tables: each peer's capacity, and a crashed peer's removal, are what is checked.
    let mut a = spawn_peer(
        &dir_a,
        &["--cpus", "3", "--memory-mb", "1000", "--discovery", "table"],
    );
    let status_a = wait_for_status(&dir_a, |_| true);
    let listen = status_a["listen"].as_str().expect("listen").to_owned();
    let id_a = status_a["id"].as_str().expect("id").to_owned();

    // `worker id` reads the same key the running peer uses.
    let out = worker(&["id"], &dir_a);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id_a);

    let pinned = format!("{id_a}@{listen}");
    let mut b = spawn_peer(
        &dir_b,
        &[
            "--cpus",
            "2",
            "--bootstrap",
            &pinned,
            "--discovery",
            "table",
        ],
    );
    let id_b = String::from_utf8(worker(&["id"], &dir_b).stdout).expect("utf-8");
    let id_b = id_b.trim().to_owned();

    let seen = wait_for_status(&dir_a, |s| {
        s["peers"].as_array().is_some_and(|p| p.len() == 1)
    });
    let peer = &seen["peers"][0];
    assert_eq!(peer["id"].as_str(), Some(id_b.as_str()));
    assert_eq!(peer["cores_free"].as_u64(), Some(2));
    assert_eq!(seen["cores_donated"].as_u64(), Some(3));
    assert_eq!(seen["memory_mb"].as_u64(), Some(1000));
    let seen_b = wait_for_status(&dir_b, |s| {
        s["peers"].as_array().is_some_and(|p| p.len() == 1)
    });
    assert_eq!(seen_b["peers"][0]["id"].as_str(), Some(id_a.as_str()));

    // What the links cost, by kind: membership traffic both ways, with a rate; no job ran.
    let costed = wait_for_status(&dir_a, |s| {
        let m = &s["traffic"]["membership"];
        m["total"]["sent"].as_u64() > Some(0)
            && m["total"]["received"].as_u64() > Some(0)
            && m["sent_per_sec"].as_u64() > Some(0)
    });
    assert!(
        costed["traffic"]["window_secs"].as_u64() > Some(0),
        "{costed}"
    );
    for kind in ["jobs", "blobs"] {
        assert_eq!(
            costed["traffic"][kind]["total"]["sent"].as_u64(),
            Some(0),
            "{costed}"
        );
    }
    let text = worker(&["status"], &dir_a);
    let text = String::from_utf8_lossy(&text.stdout);
    let membership = text
        .lines()
        .find(|l| l.trim_start().starts_with("membership"))
        .unwrap_or_else(|| panic!("no membership traffic line in\n{text}"));
    assert!(membership.contains("/s"), "{membership}");
    assert!(text.contains("traffic "), "{text}");

    // A second peer on the same data directory is refused with one line.
    let out = Command::new(WORKER)
        .args(["run", "--listen", "127.0.0.1:0", "--no-mdns", "--data-dir"])
        .arg(&dir_a)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A crashed peer (SIGKILL: no goodbye) leaves the survivor's table within 10 s.
    b.0.kill().expect("kill b");
    let _ = b.0.wait();
    let crashed = Instant::now();
    wait_for_status(&dir_a, |s| {
        s["peers"].as_array().is_some_and(|p| p.is_empty())
    });
    let took = crashed.elapsed();
    assert!(took <= Duration::from_secs(10), "removal took {took:?}");

    // SIGTERM stops a peer cleanly: exit status 0, control socket removed.
    let pid = a.0.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let start = Instant::now();
    let exit = loop {
        if let Some(exit) = a.0.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "worker ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(!dir_a.join("control.sock").exists());
    let _ = &mut a;
}

/// `child`'s stderr, a line at a time.
fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads lines until one contains every one of `wanted`, or `within` passes; returns whether
/// one did and what was read.
fn until(
    lines: &std::sync::mpsc::Receiver<String>,
    wanted: &[&str],
    within: Duration,
) -> (bool, String) {
    let deadline = Instant::now() + within;
    let mut seen = String::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = lines.recv_timeout(left) else {
            break;
        };
        seen.push_str(&line);
        seen.push('\n');
        if wanted.iter().all(|w| line.contains(w)) {
            return (true, seen);
        }
    }
    (false, seen)
}

#[test]
fn an_isolated_peer_and_an_empty_allow_list_say_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let allow = tmp.path().join("allow.txt");
    std::fs::write(&allow, "# nobody yet\n").expect("allow file");
    let child = Command::new(WORKER)
        .args(["run", "--listen", "127.0.0.1:0", "--no-mdns", "--data-dir"])
        .arg(tmp.path().join("a"))
        .arg("--allow")
        .arg(&allow)
        .args(["--bootstrap", "127.0.0.1:9"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker run");
    let mut peer = Peer(child);
    let lines = stderr_lines(&mut peer.0);
    let (found, seen) = until(
        &lines,
        &["--allow", "names no peer"],
        Duration::from_secs(15),
    );
    assert!(found, "no warning for an empty --allow file:\n{seen}");
    // Port 9 on loopback has nobody: after ten seconds alone the peer says where it looked.
    let (found, more) = until(
        &lines,
        &["no peer reachable at 127.0.0.1:9"],
        Duration::from_secs(30),
    );
    assert!(found, "no word of being isolated:\n{seen}{more}");
}

/// A request line written straight to the control socket, and the reply.
fn control_line(dir: &Path, line: &str) -> Value {
    use std::io::{Read, Write};
    let mut stream =
        std::os::unix::net::UnixStream::connect(dir.join("control.sock")).expect("socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(line.as_bytes()).expect("request");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).expect("reply");
    serde_json::from_slice(&reply).expect("a JSON reply")
}

fn suspended(status: &Value) -> Vec<String> {
    status["work"]["suspended"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

#[test]
fn pause_and_resume_a_running_peer_and_keep_the_pause_across_restarts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("p");
    let pause_file = dir.join("pause");
    let stdout = |out: &Output| String::from_utf8_lossy(&out.stdout).into_owned();

    // No peer yet: the pause is recorded, and the first start is paused.
    let out = worker(&["pause", "--for", "1h"], &dir);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("the pause is recorded"), "{out:?}");
    assert!(pause_file.exists());
    let bad = worker(&["pause", "--for", "10x"], &dir);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a duration"));

    let peer = spawn_peer(&dir, &["--cpus", "1"]);
    let status = wait_for_status(&dir, |s| s["work"].is_object());
    assert_eq!(suspended(&status), vec!["paused_by_user"], "{status}");
    assert_eq!(status["cores_free"], 0, "{status}");
    let until = status["work"]["pause_until_ms"].as_u64().expect("an end");
    let hour = 3_600_000;
    assert!(until > now_ms() + hour - 120_000 && until < now_ms() + hour + 1000);
    let text = stdout(&worker(&["status"], &dir));
    assert!(
        text.contains("suspended: paused by user") && text.contains("the pause ends"),
        "{text}"
    );

    // Resume: work again, the record gone.
    let out = worker(&["resume"], &dir);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).trim(), "running");
    let status = wait_for_status(&dir, |s| suspended(s).is_empty());
    assert_eq!(status["cores_free"], 1, "{status}");
    assert!(!pause_file.exists());
    assert!(stdout(&worker(&["status"], &dir)).contains("state      running"));

    // An indefinite pause, then a restart: still paused.
    let out = worker(&["pause"], &dir);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("suspended: paused by user")
            && stdout(&out).contains("until `worker resume`"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&pause_file).expect("pause file"),
        "indefinite\n"
    );
    drop(peer);
    let peer = spawn_peer(&dir, &["--cpus", "1"]);
    let status = wait_for_status(&dir, |s| s["work"].is_object());
    assert_eq!(suspended(&status), vec!["paused_by_user"], "{status}");
    assert!(status["work"]["pause_until_ms"].is_null(), "{status}");

    // Malformed requests get clear refusals, and the peer stays up.
    let refused = control_line(&dir, "pause soon\n");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("whole seconds")),
        "{refused}"
    );
    let refused = control_line(&dir, "resume everything\n");
    assert!(refused["error"].as_str().is_some(), "{refused}");
    // A timed pause replaces the indefinite one and ends by itself.
    let reply = control_line(&dir, "pause 2\n");
    assert!(reply["work"]["pause_until_ms"].is_u64(), "{reply}");
    let status = wait_for_status(&dir, |s| suspended(s).is_empty());
    assert_eq!(status["cores_free"], 1, "{status}");
    assert!(!pause_file.exists(), "an ended pause leaves no record");

    // A pause file that does not parse keeps the next start paused, until resumed.
    drop(peer);
    std::fs::write(&pause_file, b"\xff\x00 until tomorrow").expect("write");
    let _peer = spawn_peer(&dir, &["--cpus", "1"]);
    let status = wait_for_status(&dir, |s| s["work"].is_object());
    assert_eq!(suspended(&status), vec!["paused_by_user"], "{status}");
    let out = worker(&["resume"], &dir);
    assert_eq!(stdout(&out).trim(), "running", "{out:?}");
    assert!(!pause_file.exists());
}
