//! Jobs across real processes on loopback: four `worker run` peers, a lying peer made by the
//! test, and `worker submit --bootstrap`. One worker is killed with SIGKILL mid-job, the liar
//! is outvoted and named (in the results, the summary and `worker status`), and a submitter
//! killed with SIGKILL resumes from its journal. Every wait is bounded.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{
    Lies, Peer, WORKER, check_pi_line, count_before, finish, one_thread_runtime, results,
    spawn_submit, start_liar, start_peer_at, status, wait_for,
};

const SAMPLES: u64 = 3_000_000;

/// A loopback address of its own for each peer: each is a host of its own to a submitter.
fn next_listen() -> String {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("127.0.0.{n}:0")
}

fn start_peer(root: &Path, name: &str, bootstrap: Option<&Peer>) -> Peer {
    start_peer_at(root, name, bootstrap, &next_listen())
}

/// The pi job over `seeds`, replicated twice.
fn manifest(dir: &Path, name: &str, seeds: (u64, u64)) -> std::path::PathBuf {
    common::manifest(dir, name, seeds, SAMPLES, false)
}

/// Every line accepted with the native kernel's answer, one per unit, agreed by two distinct
/// peers of which none is `liar`.
fn check_results(lines: &[Value], seeds: (u64, u64), liar: &str) {
    let units = seeds.1 - seeds.0 + 1;
    assert_eq!(lines.len() as u64, units);
    let mut seen: Vec<u64> = Vec::new();
    for line in lines {
        let index = check_pi_line(line, SAMPLES);
        let agreed = line["agreed"].as_array().unwrap();
        assert_eq!(agreed.len(), 2, "{line}");
        assert_ne!(agreed[0], agreed[1], "{line}");
        assert!(agreed.iter().all(|p| p != liar), "{line}");
        seen.push(index);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..units).collect::<Vec<_>>());
}

#[test]
fn jobs_survive_a_killed_worker_a_liar_and_a_killed_submitter() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let first = start_peer(root, "p1", None);
    let mut peers = vec![
        start_peer(root, "p2", Some(&first)),
        start_peer(root, "p3", Some(&first)),
        start_peer(root, "p4", Some(&first)),
    ];

    // The lying peer: a node in this process whose every output is altered.
    let runtime = one_thread_runtime();
    let liar = start_liar(&runtime, &next_listen(), &first, Lies::Always);
    let liar_id = liar.id().to_string();

    wait_for(
        Duration::from_secs(30),
        "five peers know each other",
        || {
            status(&root.join("p1"))["peers"]
                .as_array()
                .is_some_and(|p| p.len() >= 4)
        },
    );

    // Phase 1: a job runs across the peers; one worker is killed mid-job.
    let seeds = (1, 40);
    let job = manifest(root, "pi-a", seeds);
    let child = spawn_submit(root, &job, &first, "a");
    wait_for(Duration::from_secs(60), "a few units accepted", || {
        results(root, "pi-a").len() >= 4
    });
    let killed = peers.remove(0);
    drop(killed); // SIGKILL
    let run = finish(child, root, "a", Duration::from_secs(120));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let stdout = run.stdout;
    assert!(stdout.contains("40 accepted, 0 failed, of 40"), "{stdout}");
    check_results(&results(root, "pi-a"), seeds, &liar_id);

    // The workers say what their donated cores did.
    let p1 = status(&root.join("p1"));
    assert_eq!(p1["work"]["slots"], 1, "{p1}");
    assert!(p1["work"]["completed"].as_u64().unwrap_or(0) > 0, "{p1}");

    // The liar took part, was outvoted every time, and is named.
    assert!(
        stdout.contains(&format!("peer {liar_id}: ")),
        "the liar ran units: {stdout}"
    );
    assert!(
        stdout.contains(&format!("peer {liar_id} disagreed")),
        "{stdout}"
    );
    let named = results(root, "pi-a")
        .iter()
        .filter(|l| {
            l["dissented"]
                .as_array()
                .is_some_and(|d| d.iter().any(|p| p == liar_id.as_str()))
        })
        .count();
    assert!(named > 0, "the liar is named in the results");
    let report = Command::new(WORKER)
        .args(["status", "--data-dir"])
        .arg(root.join("submitter"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(
        text.contains(&liar_id) && text.contains("disagreed"),
        "worker status names the liar: {text}"
    );
    // And the host each peer answered from: every peer here has a loopback address of its own.
    assert!(
        text.lines()
            .any(|l| l.contains(&liar_id) && l.contains("on 127.0.0.")),
        "worker status names the liar's host: {text}"
    );

    // Phase 2: the submitter itself is killed mid-job and started again (a job long enough
    // that the kill lands mid-job even when this machine is busy).
    let seeds = (101, 220);
    let job = manifest(root, "pi-b", seeds);
    let mut child = spawn_submit(root, &job, &first, "b1");
    wait_for(Duration::from_secs(60), "a few units accepted", || {
        results(root, "pi-b").len() >= 4
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = results(root, "pi-b").len() as u64;
    assert!(before < 120, "killed mid-job, {before} units done");
    let child = spawn_submit(root, &job, &first, "b2");
    let run = finish(child, root, "b2", Duration::from_secs(120));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let stdout = run.stdout;
    let restored = count_before(&stdout, "restored");
    let ran = count_before(&stdout, "units run this time");
    assert!(
        restored >= before,
        "{restored} restored of {before}: {stdout}"
    );
    assert_eq!(ran + restored, 120, "{stdout}");
    check_results(&results(root, "pi-b"), seeds, &liar_id);

    runtime.block_on(liar.shutdown());
}

/// Two hosts with two keys each: every unit is accepted on the word of both hosts, never on two
/// keys of one (placement by host, the default), and the job still completes.
#[test]
fn two_keys_of_one_host_are_one_witness() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let first = start_peer_at(root, "a1", None, "127.0.1.2:0");
    let _others = [
        start_peer_at(root, "a2", Some(&first), "127.0.1.2:0"),
        start_peer_at(root, "b1", Some(&first), "127.0.1.3:0"),
        start_peer_at(root, "b2", Some(&first), "127.0.1.3:0"),
    ];
    wait_for(
        Duration::from_secs(30),
        "four peers know each other",
        || {
            status(&root.join("a1"))["peers"]
                .as_array()
                .is_some_and(|p| p.len() >= 3)
        },
    );
    let seeds = (1, 80);
    let job = manifest(root, "pi-hosts", seeds);
    let child = spawn_submit(root, &job, &first, "hosts");
    let run = finish(child, root, "hosts", Duration::from_secs(180));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("80 accepted, 0 failed, of 80"),
        "{}",
        run.stdout
    );
    let lines = results(root, "pi-hosts");
    check_results(&lines, seeds, "no liar here");
    for line in &lines {
        let mut hosts: Vec<&str> = line["hosts"]
            .as_array()
            .expect("each line names the agreeing hosts")
            .iter()
            .map(|h| h.as_str().expect("a host"))
            .collect();
        hosts.sort_unstable();
        assert_eq!(hosts, ["127.0.1.2", "127.0.1.3"], "{line}");
    }
}

/// With one host taking part and two needed per unit, the job says so instead of waiting in
/// silence; a second host lets it finish.
#[test]
fn a_job_short_of_distinct_hosts_says_so() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let first = start_peer_at(root, "only", None, "127.0.1.9:0");
    let job = manifest(root, "pi-short", (1, 4));
    let child = spawn_submit(root, &job, &first, "short");
    let stderr = root.join("short.stderr");
    // The warning, and a progress line (printed every few seconds when not on a terminal)
    // saying what the job waits for; either may come first.
    wait_for(
        Duration::from_secs(60),
        "the warning about hosts and a progress line",
        || {
            let text = std::fs::read_to_string(&stderr).unwrap_or_default();
            text.contains("warning: only 1 distinct host(s) can take units, and a unit needs 2")
                && text.contains("waiting for hosts: 1 of the 2 a unit needs")
        },
    );
    // Another machine joins: the job completes.
    let _second = start_peer_at(root, "second", Some(&first), "127.0.1.10:0");
    let run = finish(child, root, "short", Duration::from_secs(120));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
}

/// `replicas` above the hosts taking part: the job says what runs instead (each unit on the
/// hosts there are, accepted once a quorum agrees) and completes.
#[test]
fn replicas_above_the_hosts_there_are_are_explained() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let first = start_peer_at(root, "one", None, "127.0.1.11:0");
    let _second = start_peer_at(root, "two", Some(&first), "127.0.1.12:0");
    let job = manifest(root, "pi-replicas", (1, 40));
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("replicas = 2\n", "replicas = 3\nquorum = 2\n");
    std::fs::write(&job, text).unwrap();
    let child = spawn_submit(root, &job, &first, "replicas");
    let run = finish(child, root, "replicas", Duration::from_secs(120));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(
            "note: replicas = 3 but 2 distinct host(s) can take units: each unit runs on at most 2"
        ),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("warning: only"), "{}", run.stderr);
}

/// A submitter that revokes a lease running on a real `worker run` gets the slot back at
/// once: the unit host is killed, the revoked lease is never reported, and the next lease runs
/// in seconds, not after the minute the unit was allowed.
#[test]
fn a_revoked_lease_stops_its_unit_on_a_worker_run() {
    use coordinator_free::digest::Digest;
    use coordinator_free::identity::Identity;
    use coordinator_free::job::proto::{InputRef, JobFrame, JobSpec, Offer, WireLease};
    use coordinator_free::net::{self, LinkKind, NetConfig};
    use coordinator_free::sandbox::Limits;
    use coordinator_free::schedule::LeaseId;
    use coordinator_free::wire;

    let root = tempfile::tempdir().unwrap();
    let peer = start_peer(root.path(), "p1", None);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let identity = Identity::generate().unwrap();
        let endpoint = net::endpoint(
            &identity,
            None,
            "127.0.9.1:0".parse().unwrap(),
            &NetConfig::default(),
        )
        .unwrap();
        let mut link = net::dial_for(
            &endpoint,
            &identity,
            None,
            peer.addr.parse().unwrap(),
            Some(peer.id.parse().unwrap()),
            &NetConfig::default(),
            LinkKind::Job,
        )
        .await
        .expect("a job link to the worker");
        let module = example_artifacts::FAULTS_BYTES;
        let job = Digest::of(b"revoked on a real worker");
        let limits = Limits {
            timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let lease = |id: u64, input: &[u8]| WireLease {
            id: LeaseId(id),
            unit: id as u32,
            attempt: 1,
            ttl_ms: 120_000,
            input: InputRef::Inline(input.to_vec()),
        };
        let offer = |leases| {
            JobFrame::Offer(Offer {
                name: "test".into(),
                job,
                spec: JobSpec::new(Digest::of(module), module.len() as u64, &limits),
                leases,
            })
        };
        wire::write(&mut link.send, &offer(vec![lease(0, br#"{"spin":true}"#)]))
            .await
            .unwrap();
        match read_frame(&mut link.recv).await {
            JobFrame::BlobGet { digest } => {
                assert_eq!(digest, Digest::of(module));
                let chunk = JobFrame::BlobChunk {
                    digest,
                    total: module.len() as u64,
                    offset: 0,
                    bytes: module.to_vec().into(),
                };
                wire::write(&mut link.send, &chunk).await.unwrap();
            }
            other => panic!("expected the module to be asked for, got {other:?}"),
        }
        // The unit is spinning in a unit host once the status says so.
        let dir = root.path().join("p1");
        let started = Instant::now();
        while status(&dir)["work"]["running"].as_u64() != Some(1) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the unit started"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let revoked = Instant::now();
        let revoke = JobFrame::Revoke {
            job,
            leases: vec![LeaseId(0)],
        };
        wire::write(&mut link.send, &revoke).await.unwrap();
        wire::write(&mut link.send, &offer(vec![lease(1, br#"{"ok":true}"#)]))
            .await
            .unwrap();
        let output = loop {
            match read_frame(&mut link.recv).await {
                JobFrame::Report { results, .. } => {
                    assert!(
                        results.iter().all(|r| r.lease != LeaseId(0)),
                        "the revoked lease was reported"
                    );
                    if let Some(r) = results.into_iter().find(|r| r.lease == LeaseId(1)) {
                        break r.result.expect("the next unit ran");
                    }
                }
                JobFrame::BlobHeld { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(output, br#"{"ok":true}"#.to_vec());
        let waited = revoked.elapsed();
        assert!(
            waited < Duration::from_secs(15),
            "the next lease waited {waited:?} for the slot"
        );
    });
    drop(peer);
}

/// The next job frame on `recv`, within 30 s.
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    recv: &mut R,
) -> coordinator_free::job::proto::JobFrame {
    tokio::time::timeout(
        Duration::from_secs(30),
        coordinator_free::wire::read::<coordinator_free::job::proto::JobFrame, _>(recv),
    )
    .await
    .expect("the worker answers in time")
    .expect("a frame")
    .expect("the link stays open")
}
