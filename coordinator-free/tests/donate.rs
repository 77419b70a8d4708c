//! A running worker donating fewer cores: the units it runs finish where they are (they are
//! reported, not stopped), and a queued lease starts only once the running ones fit the new
//! number of slots.

use std::time::{Duration, Instant};

use coordinator_free::digest::Digest;
use coordinator_free::identity::Identity;
use coordinator_free::job::proto::{InputRef, JobFrame, JobSpec, Offer, WireLease};
use coordinator_free::node::{Donation, Node, WorkConfig, WorkRunner};
use coordinator_free::sandbox::{Limits, SandboxConfig, UnitError};
use coordinator_free::schedule::LeaseId;

mod common;
use common::*;

/// Runs until its deadline stops it.
const SPIN: &str = r#"(module (memory (export "memory") 1)
    (func (export "run") (result i32) (loop $l (br $l)) i32.const 0))"#;

fn offer(job: Digest, module: &[u8], leases: std::ops::Range<u64>, timeout: Duration) -> JobFrame {
    let limits = Limits {
        timeout,
        ..Limits::default()
    };
    JobFrame::Offer(Offer {
        name: "test".into(),
        job,
        spec: JobSpec::new(Digest::of(module), module.len() as u64, &limits),
        leases: leases
            .map(|i| WireLease {
                id: LeaseId(i),
                unit: i as u32,
                attempt: 1,
                ttl_ms: 60_000,
                input: InputRef::Inline(b"spin".to_vec()),
            })
            .collect(),
    })
}

async fn work(node: &Node) -> coordinator_free::control::WorkStatus {
    node.status()
        .await
        .expect("status")
        .work
        .expect("the node runs units")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fewer_cores_let_running_units_finish_and_start_nothing_until_they_fit() {
    let mut config = worker_config(None, false);
    config.capacity.cores_donated = 2;
    config.capacity.cores_free = 2;
    config.work = Some(WorkConfig::new(
        WorkRunner::InProcess(SandboxConfig::default()),
        2,
    ));
    let worker = Node::start(Identity::generate().expect("identity"), config)
        .await
        .expect("node starts");
    let spin = wat::parse_str(SPIN).expect("spin module");
    let mut link = link_to(&worker).await;
    let job = Digest::of(b"spin while the donation shrinks");
    let timeout = Duration::from_secs(3);

    send(&mut link, &offer(job, &spin, 0..2, timeout)).await;
    let asked = next(&mut link, |f| match f {
        JobFrame::BlobGet { digest } => Some(digest),
        _ => None,
    })
    .await;
    assert_eq!(asked, Some(Digest::of(&spin)));
    send_blob(&mut link, Digest::of(&spin), &spin).await;
    let both_running = async {
        while work(&worker).await.running < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), both_running)
        .await
        .expect("both units started");
    let started = Instant::now();

    worker
        .donate(Donation {
            cores: 1,
            memory_mb: 512,
            unit_host: None,
        })
        .await
        .expect("donate");
    let status = worker.status().await.expect("status");
    assert_eq!(status.cores_donated, 1);
    // A third lease waits: two units run where one fits now, and neither was stopped.
    send(&mut link, &offer(job, &spin, 2..3, timeout)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shrunk = work(&worker).await;
    assert_eq!((shrunk.slots, shrunk.running, shrunk.queued), (1, 2, 1));

    // Both run to their deadline and are reported; only then does the third start.
    let mut reported = Vec::new();
    while reported.len() < 2 {
        let results = next(&mut link, |f| match f {
            JobFrame::Report { results, .. } if !results.is_empty() => Some(results),
            _ => None,
        })
        .await
        .expect("a report");
        reported.extend(results);
    }
    assert!(started.elapsed() >= timeout - Duration::from_millis(500));
    let mut leases: Vec<u64> = reported.iter().map(|r| r.lease.0).collect();
    leases.sort_unstable();
    assert_eq!(leases, [0, 1]);
    for r in &reported {
        assert!(
            matches!(r.result, Err(UnitError::Timeout { .. })),
            "{:?}",
            r.result
        );
    }
    let third = async {
        loop {
            let now = work(&worker).await;
            assert!(now.running <= 1, "{now:?}");
            if now.running == 1 && now.queued == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the third lease started");
    worker.shutdown().await;
}
