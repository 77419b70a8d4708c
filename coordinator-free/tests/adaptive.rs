//! Adaptive replication over real peers: trust earned in one job lets the next run most units
//! once, and a trusted peer that turns liar is caught and everything it ran alone is run again.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use coordinator_free::job::manifest::JobManifest;
use coordinator_free::node::Node;
use coordinator_free::store::JobStore;

mod common;
use common::*;

/// A sweep of `units` points starting at `from`, replicated twice, adaptive.
fn adaptive_job(dir: &Path, from: u32, units: u32) -> JobManifest {
    std::fs::write(dir.join("reverse.wasm"), reverse_module()).expect("module");
    let text = format!(
        "name = \"adaptive\"\nmodule = \"reverse.wasm\"\n[inputs.sweep]\nx = {{ start = {from}, stop = {}, step = 1 }}\n[redundancy]\nreplicas = 2\nadaptive = true\n",
        from + units - 1
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).expect("manifest");
    JobManifest::load(&path).expect("manifest parses")
}

async fn start_switchable(ip: &str, bootstrap: Option<&Node>, switch: Arc<AtomicBool>) -> Node {
    let ip: IpAddr = ip.parse().expect("ip");
    let mut config = worker_config_at(std::net::SocketAddr::new(ip, 0), bootstrap, false);
    if let Some(work) = &mut config.work {
        work.tamper_switch = Some(switch);
    }
    Node::start(
        coordinator_free::identity::Identity::generate().expect("id"),
        config,
    )
    .await
    .expect("node")
}

/// Every line's output is its input reversed; returns how each was validated.
fn check_and_count(dir: &Path, units: usize) -> std::collections::BTreeMap<String, usize> {
    let lines = results(dir);
    assert_eq!(lines.len(), units, "one line per unit");
    let mut by = std::collections::BTreeMap::new();
    for line in &lines {
        assert_reversed(line);
        let kind = line["validated"]["by"]
            .as_str()
            .expect("validated")
            .to_owned();
        *by.entry(kind).or_default() += 1;
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_earned_in_one_job_runs_the_next_alone_and_a_liar_is_caught() {
    let switch = Arc::new(AtomicBool::new(false));
    let a = start_on("127.0.8.1".parse().unwrap(), None, false).await;
    let b = start_on("127.0.8.2".parse().unwrap(), Some(&a), false).await;
    let c = start_on("127.0.8.3".parse().unwrap(), Some(&a), false).await;
    let d = start_switchable("127.0.8.4", Some(&a), Arc::clone(&switch)).await;
    converge(&[&a, &b, &c, &d], 4).await;
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(JobStore::open(&store_dir.path().join("submit.redb")).expect("store"));

    // Job 1: nobody is trusted at first; units run twice until the peers have earned their
    // streaks (ten agreeing results each), then mostly once.
    let dir1 = tempfile::tempdir().expect("tempdir");
    let s1 = submit(
        &a,
        dir1.path(),
        adaptive_job(dir1.path(), 0, 300),
        Arc::clone(&store),
    )
    .await;
    assert!(s1.succeeded(), "{s1:?}");
    let by1 = check_and_count(dir1.path(), 300);
    assert!(by1.get("quorum").copied().unwrap_or(0) >= 40, "{by1:?}");

    // Job 2: most units run once.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let s2 = submit(
        &a,
        dir2.path(),
        adaptive_job(dir2.path(), 1000, 300),
        Arc::clone(&store),
    )
    .await;
    assert!(s2.succeeded(), "{s2:?}");
    let by2 = check_and_count(dir2.path(), 300);
    let alone =
        by2.get("trusted").copied().unwrap_or(0) + by2.get("spot-checked").copied().unwrap_or(0);
    assert!(alone >= 200, "{by2:?}");
    let per_unit = s2.executions as f64 / 300.0;
    assert!(per_unit < 1.4, "{per_unit:.2} executions per unit: {s2:?}");

    // Job 3: peer d turns liar. It is caught, and every unit it ran alone is run again, so no
    // wrong result is left.
    switch.store(true, Ordering::Relaxed);
    let dir3 = tempfile::tempdir().expect("tempdir");
    let s3 = submit(
        &a,
        dir3.path(),
        adaptive_job(dir3.path(), 2000, 600),
        Arc::clone(&store),
    )
    .await;
    assert!(s3.succeeded(), "{s3:?}");
    check_and_count(dir3.path(), 600);
    println!(
        "job 2: {per_unit:.2} executions per unit, {by2:?}; job 3: {:.2} per unit, {:?}, {} re-validated, trust {:?}",
        s3.executions as f64 / 600.0,
        s3.validated,
        s3.revalidated,
        s3.trust
    );
    assert!(s3.caught.contains(&d.id()), "{s3:?}");
    // Each unit counts once in the summary, as it was decided last.
    assert_eq!(
        s3.validated.values().sum::<u64>(),
        600,
        "{:?}",
        s3.validated
    );
    let rerun = s3.validated.get("re-validated").copied().unwrap_or(0);
    assert!(rerun >= u64::from(s3.revalidated), "{s3:?}");
    assert!(s3.trust.caught >= 1, "{:?}", s3.trust);

    // Job 2 holds units peer d ran alone before it turned liar: job 3's summary names it, and
    // resuming it runs exactly those again, on other hosts.
    let d_alone = |dir: &Path| {
        results(dir)
            .iter()
            .filter(|l| l["validated"]["by"] == "trusted" && l["agreed"][0] == d.id().to_string())
            .count() as u64
    };
    let d_alone_in_job2 = d_alone(dir2.path());
    assert!(d_alone_in_job2 > 0, "d ran units of job 2 alone");
    let mut expected: Vec<(coordinator_free::digest::Digest, u64)> =
        [(s1.job, d_alone(dir1.path())), (s2.job, d_alone_in_job2)]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
    expected.sort();
    let mut named: Vec<_> = s3.suspect_jobs.iter().map(|(_, id, n)| (*id, *n)).collect();
    named.sort();
    assert_eq!(named, expected, "{:?}", s3.suspect_jobs);
    let again = submit(
        &a,
        dir2.path(),
        adaptive_job(dir2.path(), 1000, 300),
        Arc::clone(&store),
    )
    .await;
    assert!(again.succeeded(), "{again:?}");
    assert_eq!(u64::from(again.revalidated), d_alone_in_job2, "{again:?}");
    assert_eq!(u64::from(again.restored), 300 - d_alone_in_job2);
    let lines = results(dir2.path());
    check_and_count(dir2.path(), 300);
    assert!(
        lines
            .iter()
            .all(|l| !(l["validated"]["by"] == "trusted" && l["agreed"][0] == d.id().to_string())),
        "no result of job 2 rests on d's word any more"
    );
    for node in [a, b, c, d] {
        node.shutdown().await;
    }
}
