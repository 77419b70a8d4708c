//! A volunteer's worker as real processes: when it may work (time windows, other programs'
//! CPU use), settings changed in its config file while it runs, and the record of what it gave
//! (`worker status`, `worker history`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::{WORKER, reasons, start_peer_at, status, wait_for, write_config};
use serde_json::Value;

#[test]
fn outside_its_window_the_peer_stops_and_an_edited_window_lets_it_work() {
    let root = tempfile::tempdir().unwrap();
    let today = coordinator_free::conditions::probe::local_time(SystemTime::now())
        .expect("local time")
        .weekday();
    // A day that is not today (nor tomorrow, should the test run past midnight).
    let day = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][usize::from((today + 3) % 7)];
    write_config(root.path(), &format!("windows = [\"{day} 00:00-24:00\"]\n"));
    let _peer = start_peer_at(root.path(), "w", None, "127.0.11.2:0");
    let dir = root.path().join("w");
    wait_for(
        Duration::from_secs(20),
        "suspended outside its window",
        || reasons(&dir) == ["outside_window"],
    );
    let report = status(&dir);
    assert_eq!(report["cores_free"], 0, "{report}");
    assert!(
        report["work"]["idle_source"].is_string(),
        "the idle source is named: {report}"
    );
    let table = Command::new(WORKER)
        .args(["status", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("outside window"), "{table}");

    // The volunteer widens the window: the running peer works again, no restart.
    write_config(
        root.path(),
        &format!("windows = [\"{day} 00:00-24:00\", \"Mon-Sun\"]\n"),
    );
    wait_for(Duration::from_secs(20), "working again", || {
        reasons(&dir).is_empty()
    });
    assert_eq!(status(&dir)["cores_free"], 1);
}

#[test]
fn other_programs_busy_on_the_cpu_stop_the_peer() {
    let root = tempfile::tempdir().unwrap();
    write_config(root.path(), "suspend_above_cpu_percent = 5\n");
    let _peer = start_peer_at(root.path(), "w", None, "127.0.11.3:0");
    let dir = root.path().join("w");
    // Another program takes a whole core (of two): far over 5 % of the machine.
    let mut busy = Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .stdout(Stdio::null())
        .spawn()
        .expect("a busy loop starts");
    let seen = std::panic::catch_unwind(|| {
        wait_for(Duration::from_secs(30), "suspended for a busy CPU", || {
            reasons(&dir).contains(&"cpu_busy".to_string())
        })
    });
    let _ = busy.kill();
    let _ = busy.wait();
    if let Err(panic) = seen {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn what_a_peer_ran_and_what_was_accepted_is_kept_across_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let peer = start_peer_at(root.path(), "w", None, "127.0.11.4:0");
    let units = 6u64;
    let manifest = root.path().join("job.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"given\"\nmodule = {:?}\n[inputs.sweep]\nseed = {{ start = 1, stop = {units}, step = 1 }}\nsamples = 1000\n[redundancy]\nreplicas = 1\nquorum = 1\n",
            example_artifacts::PI
        ),
    )
    .unwrap();
    let submit = common::spawn_submit(root.path(), &manifest, &peer, "submit");
    let run = common::finish(submit, root.path(), "submit", Duration::from_secs(60));
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    let dir = root.path().join("w");
    let given = |report: &Value| {
        let g = &report["work"]["given_total"];
        (g["units_run"].as_u64(), g["accepted"].as_u64())
    };
    // Every unit's verdict comes back from the submitter.
    wait_for(Duration::from_secs(10), "the verdicts", || {
        given(&status(&dir)) == (Some(units), Some(units))
    });
    let today = &status(&dir)["work"]["given_today"];
    assert_eq!(today["units_run"], units, "{today}");

    // Stopped and started again, the peer still has it, and `worker history` prints it.
    let mut peer = peer;
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(
        unsafe { libc::kill(peer.child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    wait_for(Duration::from_secs(15), "a clean stop", || {
        peer.child.try_wait().ok().flatten().is_some()
    });
    let history = Command::new(WORKER)
        .args(["history", "--json", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(history.status.success());
    let history: Value = serde_json::from_slice(&history.stdout).expect("JSON");
    assert_eq!(history["total"]["units_run"], units, "{history}");
    assert_eq!(history["total"]["accepted"], units, "{history}");
    assert_eq!(history["total"]["rejected"], 0, "{history}");
    assert_eq!(history["days"].as_object().map(|d| d.len()), Some(1));
    let _again = start_peer_at(root.path(), "w", None, "127.0.11.4:0");
    assert_eq!(
        given(&status(&dir)),
        (Some(units), Some(units)),
        "kept across a restart"
    );
    let table = Command::new(WORKER)
        .args(["history", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.lines().any(|l| l.starts_with("total")), "{table}");
}

/// The running unit host processes of the peer process `peer`, with their state letter from
/// `/proc/PID/stat` (`R` running, `T` stopped).
fn hosts_of(peer: u32) -> Vec<(u32, char)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let (Ok(stat), Ok(cmdline)) = (
            std::fs::read_to_string(format!("/proc/{pid}/stat")),
            std::fs::read(format!("/proc/{pid}/cmdline")),
        ) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next());
        let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
        if let (Some(state), Some(ppid)) = (state, ppid)
            && ppid == peer
            && String::from_utf8_lossy(&cmdline).contains("unit-host")
        {
            found.push((pid, state));
        }
    }
    found
}

#[test]
fn a_cpu_cap_stops_and_continues_the_unit_hosts_for_their_share() {
    let root = tempfile::tempdir().unwrap();
    write_config(root.path(), "max_cpu_percent = 50\n");
    let peer = start_peer_at(root.path(), "w", None, "127.0.11.5:0");
    // One unit of several seconds at full speed: it runs all through the sampling below.
    let manifest = root.path().join("long.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"long\"\nmodule = {:?}\n[inputs.sweep]\nseed = {{ start = 1, stop = 1, step = 1 }}\nsamples = 4000000000\n[redundancy]\nreplicas = 1\nquorum = 1\n[limits]\ntimeout_secs = 600\n",
            example_artifacts::PI
        ),
    )
    .unwrap();
    let mut submit = common::spawn_submit(root.path(), &manifest, &peer, "long");
    let pid = peer.child.id();
    let mut host = None;
    wait_for(
        Duration::from_secs(30),
        "a unit host running the unit",
        || {
            host = hosts_of(pid)
                .into_iter()
                .find(|(_, s)| *s == 'R')
                .map(|(p, _)| p);
            host.is_some()
        },
    );
    let host = host.unwrap();
    let state = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .next()?
            .chars()
            .next()
    };
    let cpu_ticks = |pid: u32| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    let (ticks_before, since) = (cpu_ticks(host), std::time::Instant::now());
    let (mut stopped, mut seen) = (0, 0);
    // Ten seconds of looks, as the CPU cap is specified over.
    for _ in 0..1000 {
        if let Some(s) = state(host) {
            seen += 1;
            stopped += usize::from(s == 'T');
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let used = match (ticks_before, cpu_ticks(host)) {
        // Clock ticks of 10 ms (USER_HZ is 100 on Linux).
        (Some(a), Some(b)) => Some((b - a) as f64 / 100.0 / since.elapsed().as_secs_f64()),
        _ => None,
    };
    // `worker status` names the unit that runs.
    let dir = root.path().join("w");
    let report = status(&dir);
    let units = report["work"]["units"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let module =
        coordinator_free::digest::Digest::of(&std::fs::read(example_artifacts::PI).unwrap());
    assert_eq!(units.len(), 1, "{report}");
    assert_eq!(units[0]["unit"], 0, "{report}");
    assert_eq!(units[0]["module"], module.to_string(), "{report}");
    // The job's name travels in the offer; the unit's progress comes from its host.
    assert_eq!(units[0]["job_name"], "long", "{report}");
    let progress = units[0]["progress"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        progress.get(1).and_then(|t| t.as_u64()),
        Some(4_000_000_000),
        "{report}"
    );
    assert!(
        progress[0].as_u64().is_some_and(|done| done > 0),
        "{report}"
    );
    assert!(
        units[0]["running_ms"].as_u64().is_some_and(|ms| ms >= 3000),
        "{report}"
    );
    let table = Command::new(WORKER)
        .args(["status", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("running    unit 0 of job long ("), "{table}");
    assert!(table.contains(" % done"), "{table}");
    let _ = submit.kill();
    let _ = submit.wait();
    assert!(seen > 800, "the host ran all along ({seen} looks)");
    // 50 % on: stopped about half the time, whatever the machine's load (the CPU it gets while
    // on depends on what else runs).
    let share = stopped as f64 / seen as f64;
    println!(
        "at max_cpu_percent = 50 the unit host was stopped {share:.2} of the time and used {:.2} of a core",
        used.unwrap_or(f64::NAN)
    );
    assert!(
        (0.3..0.7).contains(&share),
        "stopped {share:.2} of the time"
    );
    assert!(used.is_some_and(|u| u < 0.7), "used {used:?} of a core");
}

#[test]
fn a_user_service_is_installed_and_uninstalled() {
    let home = tempfile::tempdir().unwrap();
    let worker = |args: &[&str]| {
        Command::new(WORKER)
            .args(args)
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME")
            .output()
            .unwrap()
    };
    let out = worker(&["service", "install", "--user"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("systemctl --user daemon-reload"), "{said}");
    let unit = home
        .path()
        .join(".config/systemd/user/coordinator-free-worker.service");
    let text = std::fs::read_to_string(&unit).expect("the unit is written");
    let data = home.path().join(".local/share/coordinator-free");
    assert!(data.is_dir(), "the data directory exists for the sandbox");
    assert!(
        text.contains(&format!("run --data-dir {}", data.display())),
        "{text}"
    );
    assert!(text.lines().any(|l| l == "NoNewPrivileges=yes"), "{text}");
    assert!(text.lines().any(|l| l == "ProtectSystem=strict"), "{text}");
    let out = worker(&["service", "uninstall", "--user"]);
    assert!(out.status.success());
    assert!(!unit.exists());
    // The system unit can be looked at without root.
    let out = worker(&["service", "install", "--print"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("DynamicUser=yes"));
}
