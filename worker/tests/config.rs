//! The config file of `worker run` with real processes on loopback, mDNS off: `worker config`
//! shows each setting and its source, `worker run --config` uses the file, and an edited file
//! (or a SIGHUP) changes the donated cores of the running peer, while a bad edit changes
//! nothing and is one warning.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
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

/// `worker ARGS`, with a config directory of the test's own so no user's file is read.
fn worker(args: &[&str], config_home: &Path) -> Output {
    Command::new(WORKER)
        .args(args)
        .env("XDG_CONFIG_HOME", config_home)
        .env_remove("WORKER_LOG")
        .output()
        .expect("run worker")
}

fn status(dir: &Path, config_home: &Path) -> Option<Value> {
    let out = worker(
        &["status", "--json", "--data-dir", &dir.display().to_string()],
        config_home,
    );
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls `worker status --json` until `check` accepts it or 15 s pass.
fn wait_for_status(dir: &Path, config_home: &Path, check: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(15) {
        if let Some(status) = status(dir, config_home) {
            if check(&status) {
                return status;
            }
            last = Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("status never satisfied the check; last: {last:?}");
}

/// `child`'s stderr, a line at a time.
fn stderr_lines(child: &mut Child) -> Receiver<String> {
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

/// The lines that arrive within `within`.
fn lines_for(lines: &Receiver<String>, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    seen
}

/// Reads lines until one contains `wanted` or `within` passes.
fn until(lines: &Receiver<String>, wanted: &str, within: Duration) -> (bool, Vec<String>) {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = lines.recv_timeout(left) else {
            break;
        };
        let found = line.contains(wanted);
        seen.push(line);
        if found {
            return (true, seen);
        }
    }
    (false, seen)
}

/// Rewrites the file in place with text of the same length and gives it back its old
/// modification time, so only a SIGHUP can tell the peer it changed.
fn rewrite_unseen(path: &Path, text: &str) {
    let before = std::fs::metadata(path).expect("config file");
    assert_eq!(before.len(), text.len() as u64, "same length");
    let modified = before.modified().expect("mtime");
    std::fs::write(path, text).expect("rewrite");
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(modified))
        .expect("set mtime");
}

fn config_text(cpus: u32, max_unit_secs: u64) -> String {
    format!(
        "# test peer\nlisten = \"127.0.0.1:0\"\nno_mdns = true\ndata_dir = \"peer\"\ncpus = {cpus}\nmemory_mb = 1000\nmax_unit_secs = {max_unit_secs}\n"
    )
}

#[test]
fn worker_config_shows_each_setting_with_its_source() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("worker.toml");
    std::fs::write(&file, config_text(2, 600)).expect("config file");
    let file_arg = file.display().to_string();

    let out = worker(
        &[
            "config",
            "--config",
            &file_arg,
            "--memory-mb",
            "800",
            "--json",
        ],
        tmp.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(shown["file"], file_arg.as_str());
    let setting = |key: &str| &shown["settings"][key];
    assert_eq!(setting("cpus")["value"], 2);
    assert_eq!(setting("cpus")["source"], "file");
    assert_eq!(setting("memory_mb")["value"], 800);
    assert_eq!(setting("memory_mb")["source"], "flag");
    assert_eq!(setting("max_disk_mb")["value"], 1024);
    assert_eq!(setting("max_disk_mb")["source"], "default");
    // Relative to the file's directory, not to where the command runs.
    assert_eq!(
        setting("data_dir")["value"],
        tmp.path().join("peer").display().to_string().as_str()
    );

    let out = worker(&["config", "--config", &file_arg], tmp.path());
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    // One row per key: the key, its value, its source.
    let row = |key: &str| -> Vec<String> {
        table
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .find(|words| words.first().map(String::as_str) == Some(key))
            .unwrap_or_else(|| panic!("no row for {key}:\n{table}"))
    };
    assert_eq!(row("cpus"), ["cpus", "2", "file", &file_arg], "{table}");
    assert_eq!(
        row("listen"),
        ["listen", "127.0.0.1:0", "file", &file_arg],
        "{table}"
    );
    assert_eq!(
        row("max_disk_mb"),
        ["max_disk_mb", "1024", "default"],
        "{table}"
    );
    assert_eq!(row("allow"), ["allow", "-", "default"], "{table}");

    // Without --config, the file of $XDG_CONFIG_HOME is read; without one, the defaults.
    let out = worker(&["config", "--json"], tmp.path());
    let shown: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(shown["file_found"], false);
    assert_eq!(shown["settings"]["listen"]["source"], "default");
    let home_file = tmp.path().join("coordinator-free").join("worker.toml");
    std::fs::create_dir_all(home_file.parent().expect("parent")).expect("mkdir");
    std::fs::write(&home_file, "cpus = 1\n").expect("write");
    let out = worker(&["config", "--json"], tmp.path());
    let shown: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(shown["settings"]["cpus"]["value"], 1);
    assert_eq!(shown["settings"]["cpus"]["source"], "file");
}

#[test]
fn a_bad_or_missing_file_stops_worker_run_at_start_with_one_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("worker.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\ncores = 2\n").expect("config file");
    let file_arg = file.display().to_string();
    for (args, needle) in [
        (vec!["run", "--config", &file_arg], "unknown field `cores`"),
        (
            vec!["config", "--config", &file_arg],
            "unknown field `cores`",
        ),
        (
            vec!["run", "--config", "/nonexistent/worker.toml"],
            "cannot read config file /nonexistent/worker.toml",
        ),
    ] {
        let out = worker(&args, tmp.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn an_edited_file_or_a_sighup_changes_the_running_peers_cores() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("worker.toml");
    std::fs::write(&file, config_text(2, 600)).expect("config file");
    let dir = tmp.path().join("peer");
    let child = Command::new(WORKER)
        .args(["run", "--config"])
        .arg(&file)
        .args(["--memory-mb", "800"])
        .env("XDG_CONFIG_HOME", tmp.path())
        .env_remove("WORKER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker run");
    let mut peer = Peer(child);
    let lines = stderr_lines(&mut peer.0);
    let home = tmp.path();

    let started = wait_for_status(&dir, home, |_| true);
    assert_eq!(started["cores_donated"], 2, "{started}");
    assert_eq!(
        started["memory_mb"], 800,
        "the flag beats the file: {started}"
    );
    assert_eq!(started["work"]["slots"], 2, "{started}");
    let listen = started["listen"].clone();

    // An edit is seen within a poll: the cores change, the flag still wins over the file's
    // memory, and a setting that needs a restart says so.
    std::fs::write(&file, config_text(1, 900)).expect("edit");
    let edited = wait_for_status(&dir, home, |s| s["cores_donated"] == 1);
    assert_eq!(edited["memory_mb"], 800, "{edited}");
    assert_eq!(edited["work"]["slots"], 1, "{edited}");
    assert_eq!(edited["listen"], listen, "the same process: {edited}");
    let (found, seen) = until(&lines, "max_unit_secs changed in", Duration::from_secs(10));
    assert!(found, "{seen:?}");
    assert!(
        seen.iter().any(|l| l.contains("applies at the next start")),
        "{seen:?}"
    );

    // A change the poll cannot see: only the SIGHUP applies it.
    rewrite_unseen(&file, &config_text(3, 900));
    let pid = peer.0.id().to_string();
    let hup = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(hup.success());
    let reloaded = wait_for_status(&dir, home, |s| s["cores_donated"] == 3);
    assert_eq!(reloaded["work"]["slots"], 3, "{reloaded}");

    // A bad edit keeps the running settings and is one warning, not one per poll.
    let _ = lines_for(&lines, Duration::from_millis(200));
    std::fs::write(
        &file,
        config_text(3, 900).replace("cpus = 3", "cpus = \"lots\""),
    )
    .expect("edit");
    let seen = lines_for(&lines, Duration::from_secs(7));
    // (A peer alone says so after ten seconds; that warning is not about the file.)
    let warnings: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains("WARN") && !l.contains("no peer reachable"))
        .collect();
    assert_eq!(warnings.len(), 1, "{seen:?}");
    assert!(warnings[0].contains("field `cpus`"), "{warnings:?}");
    assert!(
        warnings[0].contains("the running settings stay"),
        "{warnings:?}"
    );
    let kept = status(&dir, home).expect("still running");
    assert_eq!(kept["cores_donated"], 3, "{kept}");
    assert!(
        peer.0.try_wait().expect("wait").is_none(),
        "the peer kept running"
    );
}
