//! Adaptive replication across real processes on loopback: three `worker run` peers and a
//! peer made by the test that turns liar on a switch, each on a loopback address (a host) of
//! its own, and `worker submit` run three times from one data directory. The warm-up job earns
//! the peers their trust, which `worker status` shows; the next job runs most units once; then
//! the trusted peer starts lying, is caught, everything it ran alone is run again, no wrong
//! result survives, and `worker status` shows it trusted no more. Every wait is bounded.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{
    Lies, Run, WORKER, check_pi_line, count_before, finish, manifest, number_before,
    one_thread_runtime, results, spawn_submit, start_liar, start_peer_at, status, wait_for,
};

/// Samples per unit: a unit takes about a millisecond, so the test measures scheduling and
/// validation, not arithmetic.
const SAMPLES: u64 = 100_000;
/// Units of each job: the warm-up, the job run mostly on trust, and the one with the liar. The
/// last is long enough that the liar runs a hundred units or more alone: each is spot-checked
/// with a chance of at least 5 %, so the liar is all but sure to be caught.
const WARM_UP: u64 = 400;
const TRUSTED: u64 = 200;
const LYING: u64 = 500;
/// Longest one job may take.
const JOB_LIMIT: Duration = Duration::from_secs(60);

/// Runs the adaptive pi job `name` over `seeds` through `via` and waits for it.
fn submit(root: &Path, name: &str, seeds: (u64, u64), via: &common::Peer) -> Run {
    let job = manifest(root, name, seeds, SAMPLES, true);
    let started = Instant::now();
    let run = finish(spawn_submit(root, &job, via, name), root, name, JOB_LIMIT);
    println!(
        "{name}: {:.1}s\n{}",
        started.elapsed().as_secs_f64(),
        run.stdout
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let units = seeds.1 - seeds.0 + 1;
    assert!(
        run.stdout
            .contains(&format!("units: {units} accepted, 0 failed, of {units}")),
        "{}",
        run.stdout
    );
    run
}

/// Checks that the job's results hold one accepted line per unit with the native kernel's
/// answer, and returns how many lines were validated each way: `quorum`, `trusted`,
/// `spot-checked`, or `re-validated` (a quorum's result that first rested on a caught peer).
fn check_results(root: &Path, name: &str, seeds: (u64, u64)) -> BTreeMap<String, u64> {
    let lines = results(root, name);
    let units = seeds.1 - seeds.0 + 1;
    assert_eq!(lines.len() as u64, units, "one line per unit of {name}");
    let mut seen: Vec<u64> = Vec::new();
    let mut by = BTreeMap::new();
    for line in &lines {
        let index = check_pi_line(line, SAMPLES);
        let validated = &line["validated"];
        let kind = match validated["by"].as_str() {
            Some("quorum") if validated["revalidated_after"].is_string() => "re-validated",
            Some(kind) => kind,
            None => panic!("no validation: {line}"),
        };
        *by.entry(kind.to_owned()).or_default() += 1;
        seen.push(index);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..units).collect::<Vec<_>>(), "{name}");
    by
}

/// The summary's "N decided this run (A quorum, B trusted, ...)", as a map.
fn summary_kinds(stdout: &str) -> BTreeMap<String, u64> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("adaptive replication: "))
        .unwrap_or_else(|| panic!("the adaptive replication line in {stdout}"));
    let inner = &line[line.find('(').unwrap() + 1..line.find(')').unwrap()];
    inner
        .split(", ")
        .filter(|part| *part != "none")
        .map(|part| {
            let (n, kind) = part.split_once(' ').unwrap();
            (kind.to_owned(), n.parse().unwrap())
        })
        .collect()
}

/// The submitter's record of `peer` in `worker status --json`.
fn standing(report: &Value, peer: &str) -> Value {
    report["reputation"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["peer"] == peer))
        .cloned()
        .unwrap_or_else(|| panic!("worker status knows {peer}: {report}"))
}

#[test]
fn trust_earned_by_worker_processes_runs_units_once_and_a_liar_is_caught() {
    let started = Instant::now();
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let first = start_peer_at(root, "w1", None, "127.0.9.2:0");
    let _others = [
        start_peer_at(root, "w2", Some(&first), "127.0.9.3:0"),
        start_peer_at(root, "w3", Some(&first), "127.0.9.4:0"),
    ];
    // The fourth peer, in this process: honest until the switch is set.
    let switch = Arc::new(AtomicBool::new(false));
    let runtime = one_thread_runtime();
    let liar = start_liar(
        &runtime,
        "127.0.9.5:0",
        &first,
        Lies::While(Arc::clone(&switch)),
    );
    let liar_id = liar.id().to_string();
    wait_for(
        Duration::from_secs(30),
        "four peers know each other",
        || {
            status(&root.join("w1"))["peers"]
                .as_array()
                .is_some_and(|p| p.len() >= 3)
        },
    );
    let submitter = root.join("submitter");

    // Job 1, the warm-up: nobody is trusted yet, so units run twice; a peer that agrees with
    // the other hosts ten times in a row earns its trust, and the submitter's data directory
    // keeps it.
    let seeds = (1, WARM_UP);
    submit(root, "pi-warm-up", seeds, &first);
    let by = check_results(root, "pi-warm-up", seeds);
    assert!(by.get("quorum").copied().unwrap_or(0) >= 40, "{by:?}");
    let report = status(&submitter);
    println!("after the warm-up: {}", report["reputation"]);
    // No peer runs with the submitter's data directory: its record is the status, not an error.
    let plain = std::process::Command::new(WORKER)
        .args(["status", "--data-dir"])
        .arg(&submitter)
        .output()
        .expect("worker status runs");
    assert!(
        plain.status.success() && String::from_utf8_lossy(&plain.stdout).contains("trust streak"),
        "{plain:?}"
    );
    let peers = report["reputation"]
        .as_array()
        .unwrap_or_else(|| panic!("worker status shows the submitter's record: {report}"));
    assert_eq!(peers.len(), 4, "the four peers ran units: {report}");
    for peer in peers {
        let own = peer["trust_streak"].as_u64().unwrap_or(0);
        let host = peer["host_trust_streak"].as_u64().unwrap_or(0);
        assert_eq!(peer["trusted"], own >= 10 && host >= 10, "{peer}");
    }
    // The peers share the units unevenly: the one in this process needs no unit host and
    // takes a replica of nearly every unit, and a `worker run` whose first unit waited for
    // its module to compile may get few. The liar-to-be and a `worker run` at least have
    // earned their trust.
    let trusted = peers.iter().filter(|p| p["trusted"] == true).count();
    assert!(trusted >= 2, "peers earned their trust: {report}");
    let liar_standing = standing(&report, &liar_id);
    assert!(
        liar_standing["trusted"] == true && liar_standing["trust_streak"].as_u64() >= Some(10),
        "{report}"
    );

    // Job 2: the trust carries over from the data directory, and most units run once.
    let seeds = (1001, 1000 + TRUSTED);
    let run = submit(root, "pi-trusted", seeds, &first);
    let by = check_results(root, "pi-trusted", seeds);
    let alone =
        by.get("trusted").copied().unwrap_or(0) + by.get("spot-checked").copied().unwrap_or(0);
    assert!(alone * 2 > TRUSTED, "most units validated alone: {by:?}");
    assert_eq!(summary_kinds(&run.stdout), by, "{}", run.stdout);
    let per_unit: f64 = number_before(&run.stdout, "executions per unit");
    assert!(
        per_unit <= 1.4,
        "{per_unit} executions per unit: {}",
        run.stdout
    );
    // Units run alone by one of the `worker run` processes, and units the liar-to-be got
    // accepted on its word alone.
    let lines = results(root, "pi-trusted");
    let by_processes = lines
        .iter()
        .filter(|l| {
            matches!(
                l["validated"]["by"].as_str(),
                Some("trusted" | "spot-checked")
            ) && l["validated"]["peer"] != liar_id.as_str()
        })
        .count();
    assert!(
        by_processes > 0,
        "`worker run` processes ran units alone: {by:?}"
    );
    let liar_alone_in_job_2 = lines
        .iter()
        .filter(|l| l["validated"]["by"] == "trusted" && l["validated"]["peer"] == liar_id.as_str())
        .count();

    // Job 3: the trusted peer turns liar. It is caught, every unit it ran alone is run again
    // on other hosts, and the job completes with the right answers only.
    switch.store(true, Ordering::Relaxed);
    let seeds = (2001, 2000 + LYING);
    let run = submit(root, "pi-lying", seeds, &first);
    let by = check_results(root, "pi-lying", seeds);
    // Job 3's own summary, then the re-run of job 2's units that rested on the liar.
    let (stdout, rerun_of_job_2) = run
        .stdout
        .split_once("re-validating job pi-trusted")
        .unwrap_or((&run.stdout, ""));
    assert!(
        stdout.contains(&format!(
            "peer {liar_id} was caught disagreeing with a quorum while trusted"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("peer {liar_id} disagreed")),
        "{stdout}"
    );
    let revalidated = count_before(
        stdout,
        "units accepted on a trusted peer's word were run again",
    );
    assert!(revalidated >= 1, "{stdout}");
    // Those, and any of its alone results still unsettled when it was caught, name it.
    let rerun = results(root, "pi-lying")
        .iter()
        .filter(|l| l["validated"]["revalidated_after"] == liar_id.as_str())
        .count() as u64;
    assert!(
        rerun >= revalidated,
        "the lines name the caught peer: {by:?}"
    );
    assert_eq!(summary_kinds(stdout), by, "{stdout}");
    if liar_alone_in_job_2 > 0 {
        assert!(
            stdout.contains(&format!(
                "holds {liar_alone_in_job_2} units accepted on the word of a peer caught since"
            )),
            "job 2's units on the liar's word are named: {stdout}"
        );
        // ... and run again by the same `worker submit`, without being asked: job 2's results
        // still hold every unit, right, and none rests on the liar's word any more.
        assert!(
            rerun_of_job_2.contains(&format!(
                "{liar_alone_in_job_2} units rest on a peer caught since"
            )),
            "{}",
            run.stdout
        );
        let by2 = check_results(root, "pi-trusted", (1001, 1000 + TRUSTED));
        let lines = results(root, "pi-trusted");
        let still_on_liar = lines
            .iter()
            .filter(|l| {
                l["validated"]["by"] == "trusted" && l["validated"]["peer"] == liar_id.as_str()
            })
            .count();
        assert_eq!(still_on_liar, 0, "{by2:?}");
        let rerun = lines
            .iter()
            .filter(|l| l["validated"]["revalidated_after"] == liar_id.as_str())
            .count();
        assert_eq!(rerun, liar_alone_in_job_2, "{by2:?}");
    } else {
        assert!(rerun_of_job_2.is_empty(), "{}", run.stdout);
    }
    let report = status(&submitter);
    let liar_standing = standing(&report, &liar_id);
    assert_eq!(liar_standing["trusted"], false, "{report}");
    assert!(
        liar_standing["caught"].as_u64().unwrap_or(0) >= 1,
        "{report}"
    );
    // The catch raised every spot check for a while, and the journal kept it.
    let alert = report["spot_check_alert"].as_u64().unwrap_or(0);
    assert!(alert > 0 && alert <= 2_000, "{report}");
    println!(
        "job 2: {per_unit:.2} executions per unit; job 3: {revalidated} units re-validated, {by:?}; {:.1}s in all",
        started.elapsed().as_secs_f64()
    );
    runtime.block_on(liar.shutdown());
}
