//! `worker run` processes on the overlay, set by their config file (`discovery = "overlay"`):
//! they find each other with a few neighbours each, a `worker submit --discovery overlay` job
//! runs on them through its broadcast advert, and `worker status --all` surveys them all.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    WORKER, finish, manifest, results, spawn_submit_with, start_peer_at, status, wait_for,
    write_config,
};

const PEERS: usize = 4;

#[test]
fn peers_on_the_overlay_run_a_job_and_answer_a_survey() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    write_config(root, "discovery = \"overlay\"\n");
    let first = start_peer_at(root, "p1", None, "127.0.12.1:0");
    let _others: Vec<_> = (2..=PEERS)
        .map(|i| {
            start_peer_at(
                root,
                &format!("p{i}"),
                Some(&first),
                &format!("127.0.12.{i}:0"),
            )
        })
        .collect();
    wait_for(
        Duration::from_secs(30),
        "every peer has a neighbour",
        || {
            (1..=PEERS).all(|i| {
                status(&root.join(format!("p{i}")))["overlay"]["active"]
                    .as_u64()
                    .is_some_and(|n| n >= 1)
            })
        },
    );
    let p1 = status(&root.join("p1"));
    assert!(p1["peers"].as_array().is_some_and(|p| {
        p.iter()
            .all(|p| p["known_by"] == "neighbour" || p["known_by"] == "passive")
    }));

    // The submitter's own peer knows nobody's capacity: the workers pull after the advert.
    let seeds = (1, 30);
    let job = manifest(root, "pi-overlay", seeds, 1_000, false);
    let child = spawn_submit_with(root, &job, &first, "sub", &["--discovery", "overlay"]);
    let run = finish(child, root, "sub", Duration::from_secs(120));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("30 accepted, 0 failed, of 30"),
        "{}",
        run.stdout
    );
    let lines = results(root, "pi-overlay");
    assert_eq!(lines.len(), 30);
    for line in &lines {
        common::check_pi_line(line, 1_000);
    }

    // Submitted through the peer running on a data directory (no --bootstrap), the submitter
    // finds peers as that peer does: on the overlay.
    let second = manifest(root, "pi-local", (31, 40), 1_000, false);
    let child = Command::new(WORKER)
        .arg("submit")
        .arg(&second)
        .arg("--out")
        .arg(root.join("out-pi-local"))
        .arg("--data-dir")
        .arg(root.join("p2"))
        .args(["--cpus", "0", "--no-mdns"])
        .env_remove("WORKER_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(root.join("local.stdout")).unwrap())
        .stderr(std::fs::File::create(root.join("local.stderr")).unwrap())
        .spawn()
        .unwrap();
    let run = finish(child, root, "local", Duration::from_secs(60));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("10 accepted, 0 failed, of 10"),
        "{}",
        run.stdout
    );

    // A survey from the first peer finds the three others and their capacity; the submitters'
    // peers have gone, and are at most named.
    let out = Command::new(WORKER)
        .args(["status", "--all", "--data-dir"])
        .arg(root.join("p1"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("every peer this one reaches was asked: 3 others answer"),
        "{text}"
    );
    assert_eq!(text.matches("  1/1  ").count(), PEERS - 1, "{text}");
}
