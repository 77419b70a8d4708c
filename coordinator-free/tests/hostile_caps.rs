//! Caps that keep one host's many keys to a share: pull links into a submitter, and blob
//! fetch slots in a worker.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::digest::Digest;
use coordinator_free::job::proto::{InputRef, JobFrame, JobSpec, Offer, WireLease};
use coordinator_free::net::{LinkKind, PeerLink};
use coordinator_free::sandbox::Limits;
use coordinator_free::schedule::LeaseId;
use coordinator_free::store::JobStore;

mod common;
use common::*;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// Twelve keys of one host dial pull links into a running job and hold every one they are
/// given: the submitter takes at most eight of them at once and closes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitter_takes_at_most_eight_pull_links_from_one_host() {
    let a = start(None, false).await;
    let b = start(Some(&a), false).await;
    converge(&[&a, &b], 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = job_files(dir.path(), 3000, 1);
    let store = Arc::new(JobStore::open(&dir.path().join("submit.redb")).expect("store"));
    let sybils = Arc::new(Sybils::on(ip("127.0.4.9"), 12));
    let (id, addr) = (a.id(), a.local_addr());

    let hoard = tokio::spawn(async move {
        // Each key dials until it is offered leases (the job loop took its link) or is closed
        // with the cap's reason; taken links are held, unread, until every key has its answer.
        let mut taken: Vec<PeerLink> = Vec::new();
        let mut capped = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut pending: Vec<usize> = (0..sybils.len()).collect();
        while !pending.is_empty() && Instant::now() < deadline {
            let mut still = Vec::new();
            for key in pending {
                let Ok(mut link) = sybils.dial(key, id, addr, LinkKind::Pull).await else {
                    still.push(key);
                    continue;
                };
                let offered = next(&mut link, |f| matches!(f, JobFrame::Offer(_)).then_some(()))
                    .await
                    .is_some();
                let reason = link.conn.close_reason().map(|r| r.to_string());
                if offered {
                    taken.push(link);
                } else if reason
                    .as_deref()
                    .is_some_and(|r| r.contains("too many links"))
                {
                    capped += 1;
                } else {
                    // Closed because the job loop had not started yet: try again.
                    still.push(key);
                }
            }
            pending = still;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let open = taken
            .iter()
            .filter(|l| l.conn.close_reason().is_none())
            .count();
        (taken.len(), open, capped)
    });
    let summary = submit(&a, dir.path(), manifest, store).await;
    let (taken, open, capped) = hoard.await.expect("hoarder");
    assert!(summary.succeeded(), "{summary:?}");
    assert!(
        (1..=8).contains(&taken),
        "{taken} pull links of one host taken"
    );
    assert_eq!(open, taken, "taken links stayed open while held");
    assert_eq!(taken + capped, 12, "every other key was refused by the cap");
    a.shutdown().await;
    b.shutdown().await;
}

fn blob_offer(job: &str, module: &[u8], inputs: &[Vec<u8>]) -> JobFrame {
    JobFrame::Offer(Offer {
        name: "test".into(),
        job: Digest::of(job.as_bytes()),
        spec: JobSpec::new(Digest::of(module), module.len() as u64, &Limits::default()),
        leases: inputs
            .iter()
            .enumerate()
            .map(|(i, input)| WireLease {
                id: LeaseId(i as u64),
                unit: i as u32,
                attempt: 1,
                ttl_ms: 60_000,
                input: InputRef::Blob {
                    digest: Digest::of(input),
                    len: input.len() as u64,
                },
            })
            .collect(),
    })
}

/// Counts the distinct inputs asked for on `link` during `window`, serving the module and
/// never a byte of any input.
async fn count_asks(link: &mut PeerLink, module: &[u8], window: Duration) -> usize {
    let mut asked = std::collections::HashSet::new();
    let until = Instant::now() + window;
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(
            left,
            next(link, |f| match f {
                JobFrame::BlobGet { digest } => Some(digest),
                _ => None,
            }),
        )
        .await
        {
            Ok(Some(digest)) if digest == Digest::of(module) => {
                send_blob(link, digest, module).await;
            }
            Ok(Some(digest)) => {
                asked.insert(digest);
            }
            _ => break,
        }
    }
    asked.len()
}

/// Submitters of one host that offer leases with many inputs and never send a byte of them
/// hold two fetch slots each and four for their host; an honest submitter elsewhere still has
/// its inputs fetched and its units run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_fetches_of_one_host_leave_fetch_slots_for_others() {
    let worker = start(None, false).await;
    let module = reverse_module();
    let sybils = Sybils::on(ip("127.0.4.11"), 4);
    let mut stalling = Vec::new();
    for key in 0..sybils.len() {
        let mut link = sybils
            .link(key, &worker, LinkKind::Job)
            .await
            .expect("job link");
        let inputs: Vec<Vec<u8>> = (0..6)
            .map(|i| format!("never sent {key} {i}").into_bytes().repeat(1000))
            .collect();
        send(
            &mut link,
            &blob_offer(&format!("stall {key}"), &module, &inputs),
        )
        .await;
        stalling.push(link);
    }
    // Each stalling submitter serves its module and never an input: no key holds more than
    // two fetches, and the host no more than four (24 inputs are wanted).
    let mut per_key = Vec::new();
    for link in &mut stalling {
        per_key.push(count_asks(link, &module, Duration::from_millis(700)).await);
    }
    assert!(
        per_key.iter().all(|n| *n <= 2),
        "fetches per stalling submitter: {per_key:?}"
    );
    let host_total: usize = per_key.iter().sum();
    assert!(
        (1..=4).contains(&host_total),
        "fetches held by the stalling host: {host_total}"
    );

    // The honest submitter's module and inputs are asked for, and its units run.
    let mut honest = link_to(&worker).await;
    let inputs: Vec<Vec<u8>> = (0..3).map(|i| format!("honest {i}").into_bytes()).collect();
    send(&mut honest, &blob_offer("honest", &module, &inputs)).await;
    let mut outputs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while outputs.len() < inputs.len() && Instant::now() < deadline {
        match next(&mut honest, Some).await.expect("the worker answers") {
            JobFrame::BlobGet { digest } => {
                let bytes = if digest == Digest::of(&module) {
                    module.clone()
                } else {
                    inputs
                        .iter()
                        .find(|i| Digest::of(i) == digest)
                        .expect("one of our inputs")
                        .clone()
                };
                send_blob(&mut honest, digest, &bytes).await;
            }
            JobFrame::Report { results, .. } => {
                outputs.extend(results.into_iter().map(|r| r.result.expect("ran")));
            }
            _ => {}
        }
    }
    outputs.sort();
    let mut expected: Vec<Vec<u8>> = inputs
        .iter()
        .map(|i| i.iter().rev().copied().collect())
        .collect();
    expected.sort();
    assert_eq!(outputs, expected, "the honest submitter's units ran");
    drop(stalling);
    worker.shutdown().await;
}
