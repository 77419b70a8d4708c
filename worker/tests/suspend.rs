//! Suspension of a worker's donated cores, through the library: nodes in this process on
//! loopback, units in real unit host processes (this package's `worker unit-host`), a pi job
//! submitted as `worker submit` does. A suspended worker's unit hosts are stopped (state `T`),
//! it takes no lease and advertises no free core, and its unit continues to the right result
//! after the resume; a suspension longer than the leases' slack hands them back and the job
//! completes on another worker. Every wait is bounded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::digest::Digest;
use coordinator_free::identity::Identity;
use coordinator_free::job::JobManifest;
use coordinator_free::job::driver::{JobData, JobSummary, run_job};
use coordinator_free::job::proto::{InputRef, JobFrame, JobSpec, Offer, WireLease};
use coordinator_free::net::{self, LinkKind, NetConfig};
use coordinator_free::node::{
    Bootstrap, Discovery, NetWorkers, Node, NodeConfig, WorkConfig, WorkRunner, net_schedule_config,
};
use coordinator_free::sandbox::{Limits, UnitHostCommand};
use coordinator_free::schedule::LeaseId;
use coordinator_free::store::JobStore;
use coordinator_free::suspend::Reason;
use coordinator_free::wire;

const WORKER: &str = env!("CARGO_BIN_EXE_worker");
/// Samples per unit: a few seconds of one core.
const SAMPLES: u64 = 1_200_000_000;

/// A loopback address of its own for each node, so each is a host of its own to a submitter.
fn next_host() -> std::net::SocketAddr {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::net::SocketAddr::new(std::net::Ipv4Addr::new(127, 0, 9, n).into(), 0)
}

fn via(node: &Node) -> Bootstrap {
    Bootstrap {
        addr: node.local_addr(),
        peer: Some(node.id()),
    }
}

/// A worker with one slot whose unit hosts carry `tag` on their command line, so a test finds
/// its own among this process's children.
/// On full tables, where the submitter sees each worker's free cores: a suspended worker
/// advertises none.
async fn start_worker(bootstrap: Option<&Node>, tag: &Path) -> Node {
    let mut config = NodeConfig::new(next_host());
    config.discovery = Discovery::Table;
    config.mdns = false;
    config.bootstrap = bootstrap.map(via).into_iter().collect();
    config.capacity.cores_donated = 1;
    config.capacity.cores_free = 1;
    let command = UnitHostCommand {
        program: WORKER.into(),
        args: vec![
            "unit-host".into(),
            "--no-cache".into(),
            "--data-dir".into(),
            tag.as_os_str().to_owned(),
        ],
    };
    config.work = Some(WorkConfig::new(WorkRunner::UnitHosts(command), 1));
    Node::start(Identity::generate().expect("identity"), config)
        .await
        .expect("worker starts")
}

/// A peer that only submits.
async fn start_submitter() -> Node {
    let mut config = NodeConfig::new(next_host());
    config.discovery = Discovery::Table;
    config.mdns = false;
    config.capacity.cores_donated = 0;
    config.capacity.cores_free = 0;
    Node::start(Identity::generate().expect("identity"), config)
        .await
        .expect("submitter starts")
}

/// Writes `dir/job.toml`: the pi example over seeds `1..=units`, one replica each.
fn pi_job(dir: &Path, units: u64, timeout_secs: u64) -> JobManifest {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"pi\"\nmodule = {:?}\n[inputs.sweep]\nseed = {{ start = 1, stop = {units}, step = 1 }}\nsamples = {SAMPLES}\n[redundancy]\nreplicas = 1\n[limits]\ntimeout_secs = {timeout_secs}\n",
            example_artifacts::PI
        ),
    )
    .expect("manifest written");
    JobManifest::load(&path).expect("manifest parses")
}

/// Runs the job of `dir/job.toml` from `node` on a thread, as `worker submit` does, but with
/// `margin` between a unit's timeout and its lease's deadline; results go to `dir/out`.
fn submit(
    node: &Node,
    dir: &Path,
    manifest: JobManifest,
    margin: Option<Duration>,
) -> tokio::sync::oneshot::Receiver<Result<JobSummary, String>> {
    let units =
        coordinator_free::job::UnitSource::open(&manifest, &dir.join("job.toml")).expect("units");
    let module: Arc<[u8]> = std::fs::read(&manifest.module).expect("module").into();
    let job = JobData::new(&manifest, units, Digest::of(&module));
    let dialer = node.job_dialer();
    let runtime = tokio::runtime::Handle::current();
    let out = dir.join("out");
    let store = Arc::new(JobStore::open(&dir.join("submit.redb")).expect("store"));
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut workers = NetWorkers::new(dialer, runtime, &job, module);
        let limits = workers.spec().limits();
        let mut config = net_schedule_config(&limits);
        if let Some(margin) = margin {
            config.lease_timeout = limits.timeout + margin;
        }
        let summary = run_job(&manifest, &job, config, &mut workers, &store, &out, |_| {});
        let _ = tx.send(summary.map_err(|e| e.to_string()));
    });
    rx
}

/// Every result line accepted with the native kernel's answer; returns who agreed on each.
fn check_results(dir: &Path, units: u64) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("out/results.jsonl")).expect("results");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len() as u64, units, "{text}");
    let mut agreed = Vec::new();
    for line in &lines {
        assert_eq!(line["status"], "accepted", "{line}");
        let seed = line["input"]["params"]["seed"].as_u64().expect("seed");
        let expected = example_pi::compute(&example_pi::Input {
            samples: SAMPLES,
            seed,
        });
        assert_eq!(
            line["output"],
            serde_json::to_value(expected).expect("json"),
            "{line}"
        );
        for peer in line["agreed"].as_array().expect("agreed") {
            agreed.push(peer.as_str().expect("a peer id").to_owned());
        }
    }
    agreed
}

/// The unit host processes of this test process whose command line names `tag`, with their
/// state letter from `/proc/PID/stat` (`R` running, `S` sleeping, `T` stopped).
fn unit_hosts(tag: &Path) -> Vec<(u32, char)> {
    let me = std::process::id();
    let tag = tag.to_string_lossy();
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
        // The name in parentheses may hold spaces: the fields after its last ')' are
        // "STATE PPID ...".
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next());
        let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if let (Some(state), Some(ppid)) = (state, ppid)
            && ppid == me
            && cmdline.contains("unit-host")
            && cmdline.contains(tag.as_ref())
        {
            found.push((pid, state));
        }
    }
    found
}

/// The state of process `pid`, if it still exists.
fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().next()?.chars().next()
}

async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a unit host of `tag` is busy with a unit (running or runnable), and returns
/// its pid.
async fn running_host(tag: &Path, worker: &Node) -> u32 {
    let mut pid = None;
    wait_until(Duration::from_secs(60), "a unit runs on the worker", || {
        let busy = unit_hosts(tag).into_iter().find(|(_, s)| *s == 'R');
        pid = busy.map(|(p, _)| p);
        async move {
            let running = worker
                .status()
                .await
                .ok()
                .and_then(|s| s.work)
                .is_some_and(|w| w.running == 1);
            running && busy.is_some()
        }
    })
    .await;
    pid.expect("a busy unit host")
}

async fn cores_free_seen_by(node: &Node, peer: coordinator_free::peer_id::PeerId) -> Option<u16> {
    let status = node.status().await.ok()?;
    status
        .peers
        .iter()
        .find(|p| p.id == peer)
        .map(|p| p.cores_free)
}

/// A hand-made submitter offers `worker` two leases of a job on a job link of its own, and
/// returns what the worker answered: the leases it declined and the `want` of its report.
async fn offer_two(worker: &Node) -> (Vec<LeaseId>, Option<u32>) {
    let identity = Identity::generate().expect("identity");
    let endpoint =
        net::endpoint(&identity, None, next_host(), &NetConfig::default()).expect("endpoint");
    let mut link = net::dial_for(
        &endpoint,
        &identity,
        None,
        worker.local_addr(),
        Some(worker.id()),
        &NetConfig::default(),
        LinkKind::Job,
    )
    .await
    .expect("job link");
    let module = example_artifacts::PI_BYTES;
    let job = Digest::of(b"a job offered while suspended");
    let offer = JobFrame::Offer(Offer {
        name: "test".into(),
        job,
        spec: JobSpec::new(Digest::of(module), module.len() as u64, &Limits::default()),
        leases: (0..2)
            .map(|i| WireLease {
                id: LeaseId(i),
                unit: i as u32,
                attempt: 1,
                ttl_ms: 120_000,
                input: InputRef::Inline(format!("{{\"samples\":1,\"seed\":{i}}}").into_bytes()),
            })
            .collect(),
    });
    wire::write(&mut link.send, &offer)
        .await
        .expect("offer sent");
    let (mut declined, mut want) = (Vec::new(), None);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while declined.len() < 2 || want.is_none() {
            match wire::read::<JobFrame, _>(&mut link.recv).await {
                Ok(Some(JobFrame::Decline { job: j, leases })) if j == job => {
                    declined.extend(leases);
                }
                Ok(Some(JobFrame::Report {
                    job: j,
                    results,
                    want: w,
                })) if j == job && results.is_empty() => want = Some(w),
                Ok(Some(JobFrame::BlobGet { .. })) => {
                    panic!("a suspended worker fetched the module of a lease it should decline")
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    })
    .await;
    declined.sort();
    (declined, want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_worker_stops_its_units_takes_nothing_and_continues_after_resume() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let tag = tmp.path().join("continue-tag");
    let submitter = start_submitter().await;
    let worker = start_worker(Some(&submitter), &tag).await;
    let switch = worker.suspend_switch().expect("a worker has a switch");
    wait_until(
        Duration::from_secs(20),
        "the peers know each other",
        || async { cores_free_seen_by(&submitter, worker.id()).await == Some(1) },
    )
    .await;

    // One unit of a few seconds, with a timeout shorter than its run plus the suspension.
    let timeout_secs = 12;
    let done = submit(
        &submitter,
        tmp.path(),
        pi_job(tmp.path(), 1, timeout_secs),
        None,
    );
    let pid = running_host(&tag, &worker).await;
    let suspended_at = Instant::now();
    switch
        .set(Reason::PausedByUser, true)
        .await
        .expect("suspended");

    // The unit host is stopped at once.
    wait_until(
        Duration::from_secs(2),
        "the unit host is stopped",
        || async { state_of(pid) == Some('T') },
    )
    .await;
    let status = worker.status().await.expect("status");
    assert_eq!(status.cores_free, 0, "the advert shows no free core");
    let work = status.work.expect("work status");
    assert_eq!(work.suspended, vec![Reason::PausedByUser]);
    assert!(work.suspended_since_ms.is_some());
    assert_eq!(work.running, 1, "{work:?}");

    // A second reason holds too; clearing it alone resumes nothing.
    switch.set(Reason::TooHot, true).await.expect("suspended");
    switch.set(Reason::TooHot, false).await.expect("cleared");

    // It takes no lease: an offer is declined whole, with a report that asks for none, and
    // no module is fetched for it.
    let (declined, want) = offer_two(&worker).await;
    assert_eq!(declined, vec![LeaseId(0), LeaseId(1)]);
    assert_eq!(want, Some(0));

    // Others hear of it through the gossiped advert.
    wait_until(
        Duration::from_secs(20),
        "the submitter sees no free core",
        || async { cores_free_seen_by(&submitter, worker.id()).await == Some(0) },
    )
    .await;

    // Suspended for longer than the unit's timeout leaves it after it started.
    let hold = Duration::from_secs(timeout_secs) - Duration::from_secs(1);
    if let Some(rest) = hold.checked_sub(suspended_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    assert_eq!(state_of(pid), Some('T'), "still stopped");
    let work = worker.status().await.expect("status").work.expect("work");
    assert_eq!(
        (work.running, work.completed, work.handed_back),
        (1, 0, 0),
        "a suspension within the lease's slack keeps the lease: {work:?}"
    );

    switch
        .set(Reason::PausedByUser, false)
        .await
        .expect("resumed");
    wait_until(
        Duration::from_secs(2),
        "the unit host continues",
        || async { state_of(pid).is_some_and(|s| s != 'T') },
    )
    .await;
    let summary = tokio::time::timeout(Duration::from_secs(90), done)
        .await
        .expect("the job ends")
        .expect("the job thread answers")
        .expect("the job runs");
    assert_eq!((summary.accepted, summary.failed), (1, 0));
    assert_eq!(check_results(tmp.path(), 1), vec![worker.id().to_string()]);

    // The same process ran the unit to its end: stopped time did not count against the
    // timeout, so the host was neither killed nor replaced, and the unit ran once.
    assert!(state_of(pid).is_some(), "the unit host lives on");
    assert_eq!(summary.executions, 1);
    let status = worker.status().await.expect("status");
    assert_eq!(status.cores_free, 1);
    let work = status.work.expect("work");
    assert!(work.suspended.is_empty() && work.suspended_since_ms.is_none());
    assert_eq!(work.completed, 1);

    worker.shutdown().await;
    submitter.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_past_the_slack_hands_leases_back_and_the_job_completes_elsewhere() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (tag_a, tag_b): (PathBuf, PathBuf) = (
        tmp.path().join("slack-tag-a"),
        tmp.path().join("slack-tag-b"),
    );
    let submitter = start_submitter().await;
    let first = start_worker(Some(&submitter), &tag_a).await;
    wait_until(
        Duration::from_secs(20),
        "the peers know each other",
        || async { cores_free_seen_by(&submitter, first.id()).await == Some(1) },
    )
    .await;

    // Two units, both leased to the only worker (two leases per core at first); each lease's
    // deadline is its unit's timeout (two minutes) plus 4 s, so its slack is under 4 s.
    let done = submit(
        &submitter,
        tmp.path(),
        pi_job(tmp.path(), 2, 120),
        Some(Duration::from_secs(4)),
    );
    let pid = running_host(&tag_a, &first).await;
    let work = first.status().await.expect("status").work.expect("work");
    assert_eq!((work.running, work.queued), (1, 1), "{work:?}");
    let suspended_at = Instant::now();
    first
        .suspend_switch()
        .expect("switch")
        .set(Reason::UserActive, true)
        .await
        .expect("suspended");
    wait_until(
        Duration::from_secs(2),
        "the unit host is stopped",
        || async { state_of(pid) == Some('T') },
    )
    .await;

    // Another worker joins while the first is suspended.
    let second = start_worker(Some(&submitter), &tag_b).await;

    // Past the slack the leases go back: the running one's stopped host is killed.
    wait_until(
        Duration::from_secs(15),
        "both leases handed back",
        || async {
            first
                .status()
                .await
                .ok()
                .and_then(|s| s.work)
                .is_some_and(|w| w.handed_back == 2 && w.running == 0 && w.queued == 0)
        },
    )
    .await;
    wait_until(
        Duration::from_secs(5),
        "the stopped unit host is killed",
        || async { state_of(pid).is_none() },
    )
    .await;

    // The submitter re-issues them at once, long before their deadline (124 s after issue),
    // and the other worker runs them.
    let summary = tokio::time::timeout(Duration::from_secs(90), done)
        .await
        .expect("the job ends well before the leases' deadline")
        .expect("the job thread answers")
        .expect("the job runs");
    assert!(
        suspended_at.elapsed() < Duration::from_secs(100),
        "{:?}",
        suspended_at.elapsed()
    );
    assert_eq!((summary.accepted, summary.failed), (2, 0));
    let agreed = check_results(tmp.path(), 2);
    assert!(
        agreed.iter().all(|p| *p == second.id().to_string()),
        "{agreed:?}"
    );
    let work = first.status().await.expect("status").work.expect("work");
    assert_eq!(work.suspended, vec![Reason::UserActive]);
    assert_eq!(work.completed, 0, "{work:?}");

    first.shutdown().await;
    second.shutdown().await;
    submitter.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_at_the_machine_stops_the_units_within_a_second_and_idleness_resumes_them() {
    use coordinator_free::conditions::probe::{IdleSource, Probe};
    use coordinator_free::conditions::{Conditions, watch_with};

    let tmp = tempfile::tempdir().expect("tempdir");
    let tag = tmp.path().join("idle-tag");
    let submitter = start_submitter().await;
    let worker = start_worker(Some(&submitter), &tag).await;
    // The machine as the watcher reads it: input reported from here, and no battery, no
    // thermal zone (an empty /sys).
    let last_input = Arc::new(std::sync::Mutex::new(
        Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(Instant::now),
    ));
    let sys = tmp.path().join("sys");
    std::fs::create_dir_all(&sys).expect("sys");
    let probe = Probe::with_roots(
        "/proc",
        &sys,
        IdleSource::Reported(last_input.clone()),
        std::process::id(),
    );
    let idle_after = Duration::from_secs(2);
    let (_settings, conditions) = tokio::sync::watch::channel(Conditions {
        only_when_idle: true,
        idle_after,
        memory_mb_idle: Some(4096),
        ..Conditions::default()
    });
    // The memory to offer, as the watcher publishes it for `worker run` to donate.
    let (memory_tx, memory) = tokio::sync::watch::channel(None);
    tokio::spawn(watch_with(
        worker.suspend_switch().expect("a worker has a switch"),
        conditions,
        probe,
        memory_tx,
    ));
    let offered = || *memory.borrow();
    wait_until(
        Duration::from_secs(20),
        "the peers know each other",
        || async { cores_free_seen_by(&submitter, worker.id()).await == Some(1) },
    )
    .await;
    let done = submit(&submitter, tmp.path(), pi_job(tmp.path(), 1, 60), None);
    let pid = running_host(&tag, &worker).await;
    assert_eq!(offered(), Some(4096), "idle: the idle amount of memory");

    // Someone touches the keyboard: the unit host stops within a second.
    *last_input.lock().expect("lock") = Instant::now();
    let touched = Instant::now();
    wait_until(Duration::from_secs(3), "the unit host stopped", || async {
        state_of(pid) == Some('T')
    })
    .await;
    let latency = touched.elapsed();
    println!("unit host stopped {latency:?} after the input");
    assert!(
        latency <= Duration::from_secs(1),
        "stopped after {latency:?}"
    );
    let report = worker.status().await.expect("status");
    let work = report.work.expect("work status");
    assert!(
        work.suspended.contains(&Reason::UserActive),
        "{:?}",
        work.suspended
    );
    assert_eq!(work.idle_source.as_deref(), Some("reported"));
    assert_eq!(offered(), None, "in use: the in-use amount of memory");

    // Nobody for `idle_after`: the same unit continues and the job completes, correct.
    wait_until(
        Duration::from_secs(10),
        "the unit host continued",
        || async { state_of(pid).is_some_and(|s| s != 'T') },
    )
    .await;
    assert!(touched.elapsed() >= idle_after);
    assert_eq!(offered(), Some(4096), "idle again");
    let summary = tokio::time::timeout(Duration::from_secs(120), done)
        .await
        .expect("the job ends")
        .expect("the job's thread answers")
        .expect("the job succeeds");
    assert_eq!(summary.accepted, 1);
    check_results(tmp.path(), 1);
}
