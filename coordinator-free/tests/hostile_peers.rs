//! Hostile peers against real nodes over QUIC in one process: submitters that lie, hoard,
//! never read or flood, workers that forge together from one host or fail every lease. Each
//! attack has its test; every wait is bounded.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::digest::Digest;
use coordinator_free::host::Host;
use coordinator_free::job::proto::{
    InputRef, JobFrame, JobSpec, MAX_LEASES_PER_OFFER, Offer, WireLease, WireResult,
};
use coordinator_free::net::{LinkKind, PeerLink};
use coordinator_free::sandbox::{Limits, UnitError};
use coordinator_free::schedule::{Culprit, LeaseId};
use coordinator_free::store::JobStore;
use coordinator_free::wire::{self, Message};

mod common;
use common::*;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// Serves the module when asked; returns the outputs reported for `leases` leases.
async fn serve_and_collect(link: &mut PeerLink, module: &[u8], leases: usize) -> Vec<Vec<u8>> {
    let mut outputs = Vec::new();
    while outputs.len() < leases {
        let got = next(link, Some).await.expect("the worker answers");
        match got {
            JobFrame::BlobGet { digest } => {
                assert_eq!(digest, Digest::of(module));
                let chunk = JobFrame::BlobChunk {
                    digest,
                    total: module.len() as u64,
                    offset: 0,
                    bytes: module.to_vec().into(),
                };
                send(link, &chunk).await;
            }
            JobFrame::Report { results, .. } => {
                for r in results {
                    outputs.push(r.result.expect("the unit ran"));
                }
            }
            // The worker says it holds the module now.
            JobFrame::BlobHeld { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    outputs
}

async fn offer_blob_input(link: &mut PeerLink, module: &[u8], input: &[u8], lease: u64) {
    let frame = JobFrame::Offer(Offer {
        name: "test".into(),
        job: Digest::of(b"a shared blob"),
        spec: JobSpec::new(Digest::of(module), module.len() as u64, &Limits::default()),
        leases: vec![WireLease {
            id: LeaseId(lease),
            unit: lease as u32,
            attempt: 1,
            ttl_ms: 30_000,
            input: InputRef::Blob {
                digest: Digest::of(input),
                len: input.len() as u64,
            },
        }],
    });
    send(link, &frame).await;
}

/// Answers blob requests from `blobs` (or with `redirect` for `input` the first time) until
/// a report arrives; returns its output and whether the input was asked for here.
async fn serve_until_report(
    link: &mut PeerLink,
    blobs: &[&[u8]],
    mut redirect: Option<JobFrame>,
) -> (Vec<u8>, Vec<Digest>) {
    let mut asked = Vec::new();
    loop {
        match next(link, Some).await.expect("the worker answers") {
            JobFrame::BlobGet { digest } => {
                asked.push(digest);
                let bytes = blobs
                    .iter()
                    .find(|b| Digest::of(b) == digest)
                    .expect("a known blob");
                if bytes.len() > 64 << 10
                    && let Some(at) = redirect.take()
                {
                    send(link, &at).await;
                    continue;
                }
                send_blob(link, digest, bytes).await;
            }
            JobFrame::Report { mut results, .. } if !results.is_empty() => {
                return (results.remove(0).result.expect("the unit ran"), asked);
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_fetches_a_blob_from_a_peer_that_holds_it() {
    let holder = start(None, false).await;
    // The fetcher knows the holder from a connection of its own: only then does it dial it.
    let fetcher = start(Some(&holder), false).await;
    converge(&[&holder, &fetcher], 2).await;
    let module = reverse_module();
    let input: Vec<u8> = (0..(3usize << 19)).map(|i| (i * 13) as u8).collect();
    let expected: Vec<u8> = input.iter().rev().copied().collect();

    // The holder gets the input from the submitter itself.
    let mut to_holder = link_to(&holder).await;
    offer_blob_input(&mut to_holder, &module, &input, 1).await;
    let (out, asked) = serve_until_report(&mut to_holder, &[&module, &input], None).await;
    assert!(out == expected);
    assert!(asked.contains(&Digest::of(&input)));

    // The fetcher is sent to the holder for the input, and never asks us for it.
    let mut to_fetcher = link_to(&fetcher).await;
    offer_blob_input(&mut to_fetcher, &module, &input, 2).await;
    let at = JobFrame::BlobAt {
        digest: Digest::of(&input),
        peer: holder.id(),
    };
    let (out, asked) = serve_until_report(&mut to_fetcher, &[&module, &input], Some(at)).await;
    assert!(out == expected, "the unit ran on the holder's copy");
    assert_eq!(
        asked.iter().filter(|d| **d == Digest::of(&input)).count(),
        1,
        "asked once, then fetched from the holder"
    );

    // Sent to a peer that lacks the blob, a worker comes back and asks again.
    let other: Vec<u8> = input.iter().map(|b| b ^ 0x5a).collect();
    let expected: Vec<u8> = other.iter().rev().copied().collect();
    let third = start(Some(&fetcher), false).await;
    converge(&[&holder, &fetcher, &third], 3).await;
    let mut to_third = link_to(&third).await;
    offer_blob_input(&mut to_third, &module, &other, 3).await;
    let at = JobFrame::BlobAt {
        digest: Digest::of(&other),
        peer: fetcher.id(),
    };
    let (out, asked) = serve_until_report(&mut to_third, &[&module, &other], Some(at)).await;
    assert!(out == expected);
    assert_eq!(
        asked.iter().filter(|d| **d == Digest::of(&other)).count(),
        2,
        "asked again after the holder had nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_survives_hostile_submitters() {
    let worker = start(None, false).await;
    let module = reverse_module();

    // A module the submitter cannot serve: the leases are declined, not kept.
    let mut link = link_to(&worker).await;
    send(&mut link, &offer(&module, 3)).await;
    let digest = next(&mut link, |f| match f {
        JobFrame::BlobGet { digest } => Some(digest),
        _ => None,
    })
    .await
    .expect("the worker asks for the module");
    send(&mut link, &JobFrame::BlobMissing { digest }).await;
    let declined = next(&mut link, |f| match f {
        JobFrame::Decline { leases, .. } => Some(leases),
        _ => None,
    })
    .await
    .expect("declined");
    assert_eq!(declined.len(), 3);

    // Bytes that do not match the module's digest: refused, leases declined.
    let mut link = link_to(&worker).await;
    let mut forged = module.clone();
    forged.extend_from_slice(b"tampered");
    let mut bad_offer = offer(&module, 2);
    if let JobFrame::Offer(o) = &mut bad_offer {
        o.spec.module_len = forged.len() as u64;
    }
    send(&mut link, &bad_offer).await;
    let digest = next(&mut link, |f| match f {
        JobFrame::BlobGet { digest } => Some(digest),
        _ => None,
    })
    .await
    .expect("asks for the module");
    let chunk = JobFrame::BlobChunk {
        digest,
        total: forged.len() as u64,
        offset: 0,
        bytes: forged.into(),
    };
    send(&mut link, &chunk).await;
    let declined = next(&mut link, |f| match f {
        JobFrame::Decline { leases, .. } => Some(leases),
        _ => None,
    })
    .await
    .expect("declined after a digest mismatch");
    assert_eq!(declined.len(), 2);

    // Garbage: an unknown frame kind and an oversized length end the link, nothing more.
    for garbage in [vec![99u8, 0, 0, 0, 1, 0], {
        let mut g = vec![JobFrame::KIND_OFFER];
        g.extend_from_slice(&u32::MAX.to_be_bytes());
        g
    }] {
        let mut link = link_to(&worker).await;
        tokio::io::AsyncWriteExt::write_all(&mut link.send, &garbage)
            .await
            .expect("send garbage");
        assert!(next(&mut link, Some).await.is_none(), "link closed");
    }

    // Too many leases in one offer: refused when decoded, link closed.
    let mut link = link_to(&worker).await;
    let frame = offer(&module, MAX_LEASES_PER_OFFER + 1);
    let (kind, payload) = frame.encode_payload().expect("encode");
    let mut bytes = vec![kind];
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&payload);
    tokio::io::AsyncWriteExt::write_all(&mut link.send, &bytes)
        .await
        .expect("send");
    assert!(next(&mut link, Some).await.is_none(), "link closed");

    // After all that, an honest submitter is served correctly.
    let mut link = link_to(&worker).await;
    send(&mut link, &offer(&module, 4)).await;
    let mut outputs = serve_and_collect(&mut link, &module, 4).await;
    outputs.sort();
    let mut expected: Vec<Vec<u8>> = (0..4)
        .map(|i| format!("input {i}").bytes().rev().collect())
        .collect();
    expected.sort();
    assert_eq!(outputs, expected);
}

/// Two keys on one host that forge the same output together never get it accepted: each unit
/// needs a second host, and the honest hosts outvote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colluding_keys_on_one_host_never_get_a_forgery_accepted() {
    let a = start(None, false).await;
    let b = start(Some(&a), false).await;
    let c = start(Some(&a), false).await;
    let attacker = ip("127.0.3.7");
    let t1 = start_on(attacker, Some(&a), true).await;
    let t2 = start_on(attacker, Some(&a), true).await;
    converge(&[&a, &b, &c, &t1, &t2], 5).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = job_files(dir.path(), 60, 2);
    let store = Arc::new(JobStore::open(&dir.path().join("submit.redb")).expect("store"));
    let summary = submit(&a, dir.path(), manifest, store).await;
    assert!(summary.succeeded(), "{summary:?}");
    let lines = results(dir.path());
    // Every output is the true one: no unit was accepted on the colluders' word.
    check_reversed(&lines, 60, 2);
    let colluders = [t1.id().to_string(), t2.id().to_string()];
    for line in &lines {
        let agreed = line["agreed"].as_array().expect("agreed");
        assert!(
            agreed
                .iter()
                .all(|p| !colluders.iter().any(|c| p.as_str() == Some(c.as_str()))),
            "{line}"
        );
        let hosts = line["hosts"].as_array().expect("hosts");
        assert_ne!(hosts[0], hosts[1], "{line}");
    }
}

/// Answers every offer on `link` with host failures until the link ends or `until` passes.
async fn fail_every_lease(mut link: PeerLink, until: Instant) {
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        let frame =
            match tokio::time::timeout(left, wire::read::<JobFrame, _>(&mut link.recv)).await {
                Ok(Ok(Some(frame))) => frame,
                _ => break,
            };
        if let JobFrame::Offer(offer) = frame {
            let results = offer
                .leases
                .iter()
                .map(|l| WireResult {
                    lease: l.id,
                    result: Err(UnitError::Host {
                        detail: "out of memory, honestly".into(),
                    }),
                })
                .collect();
            let report = JobFrame::Report {
                job: offer.job,
                results,
                want: 256,
            };
            if wire::write(&mut link.send, &report).await.is_err() {
                break;
            }
        }
    }
}

/// A host of fresh keys that takes leases and fails them all: it is backed off after a few,
/// named in the summary, and fails no unit for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_fails_every_lease_is_backed_off_and_fails_nothing() {
    let a = start(None, false).await;
    let b = start(Some(&a), false).await;
    let c = start(Some(&a), false).await;
    converge(&[&a, &b, &c], 3).await;
    let attacker = ip("127.0.3.9");
    let sybils = Arc::new(Sybils::on(attacker, 12));

    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = job_files(dir.path(), 200, 2);
    let store = Arc::new(JobStore::open(&dir.path().join("submit.redb")).expect("store"));
    // Every key asks the submitter for work as soon as it takes pull links, and fails all it
    // gets.
    let until = Instant::now() + Duration::from_secs(40);
    let mut griefers = Vec::new();
    for key in 0..sybils.len() {
        let sybils = Arc::clone(&sybils);
        let (id, addr) = (a.id(), a.local_addr());
        griefers.push(tokio::spawn(async move {
            while Instant::now() < until {
                if let Ok(link) = sybils.dial(key, id, addr, LinkKind::Pull).await {
                    fail_every_lease(link, until).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let summary = submit(&a, dir.path(), manifest, store).await;
    assert!(summary.succeeded(), "{summary:?}");
    assert_eq!(summary.failed, 0);
    check_reversed(&results(dir.path()), 200, 2);
    let host = Host::of(attacker);
    assert!(
        summary
            .penalties
            .iter()
            .any(|(who, p)| *who == Culprit::Host(host) && p.backoffs > 0),
        "the attacking host is named and was backed off: {:?}",
        summary.penalties
    );
    for g in griefers {
        g.abort();
    }
}

/// Many keys of one host that open job links and send empty offers, or offers whose module
/// they never serve, hold nothing an honest submitter needs: it is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_hoarding_offers_from_one_host_do_not_lock_a_volunteer_out() {
    let worker = start(None, false).await;
    let module = reverse_module();
    let sybils = Sybils::on(ip("127.0.3.11"), 8);
    let mut links = Vec::new();
    let mut job = 0u32;
    for key in 0..sybils.len() {
        let mut link = sybils
            .link(key, &worker, LinkKind::Job)
            .await
            .expect("job link");
        for _ in 0..8 {
            job += 1;
            send(
                &mut link,
                &offer_job(Digest::of(&job.to_le_bytes()), &module, 0),
            )
            .await;
            job += 1;
            // One lease whose module is never served: it waits here, and holds its job.
            send(
                &mut link,
                &offer_job(Digest::of(&job.to_le_bytes()), &module, 1),
            )
            .await;
        }
        links.push(link);
    }
    // Let the worker take all of it in.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut honest = link_to(&worker).await;
    send(&mut honest, &offer(&module, 4)).await;
    let mut outputs = serve_and_collect(&mut honest, &module, 4).await;
    outputs.sort();
    let mut expected: Vec<Vec<u8>> = (0..4)
        .map(|i| format!("input {i}").bytes().rev().collect())
        .collect();
    expected.sort();
    assert_eq!(outputs, expected, "the honest submitter was served");
    drop(links);
}

/// Fetchers of one host that open blob links, ask for a blob and never read: at most two of
/// their links are served, the rest are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_links_from_one_host_are_capped() {
    let holder = start(None, false).await;
    let module = reverse_module();
    let input: Vec<u8> = (0..(3usize << 20)).map(|i| (i * 31) as u8).collect();
    let digest = Digest::of(&input);
    let mut to_holder = link_to(&holder).await;
    offer_blob_input(&mut to_holder, &module, &input, 1).await;
    serve_until_report(&mut to_holder, &[&module, &input], None).await;

    let sybils = Sybils::on(ip("127.0.3.13"), 10);
    let mut links = Vec::new();
    for key in 0..sybils.len() {
        // A refused link may be closed before, or right after, its handshake.
        if let Ok(mut link) = sybils.link(key, &holder, LinkKind::Blob).await {
            let _ = wire::write(&mut link.send, &JobFrame::BlobGet { digest }).await;
            links.push(link);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let open = || {
        links
            .iter()
            .filter(|l| l.conn.close_reason().is_none())
            .count()
    };
    while open() > 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        open(),
        2,
        "two links of the host are served, the rest refused"
    );
}

/// A second job with the same module under a fuel budget runs its units: modules are kept per
/// digest *and* metering, so one job's preparation never fails another's units.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_module_under_another_fuel_setting_still_runs() {
    let worker = start(None, false).await;
    let module = reverse_module();
    let mut link = link_to(&worker).await;
    send(&mut link, &offer(&module, 2)).await;
    assert_eq!(serve_and_collect(&mut link, &module, 2).await.len(), 2);

    let fueled = Limits {
        fuel: Some(10_000_000),
        ..Limits::default()
    };
    let frame = JobFrame::Offer(Offer {
        name: "test".into(),
        job: Digest::of(b"the same module, metered"),
        spec: JobSpec::new(Digest::of(&module), module.len() as u64, &fueled),
        leases: vec![WireLease {
            id: LeaseId(7),
            unit: 0,
            attempt: 1,
            ttl_ms: 30_000,
            input: InputRef::Inline(b"metered".to_vec()),
        }],
    });
    send(&mut link, &frame).await;
    let outputs = serve_and_collect(&mut link, &module, 1).await;
    assert_eq!(outputs, vec![b"deretem".to_vec()]);
}

/// A worker that asks for the same blob again and again is sent it a few times, then told it
/// is missing, so it cannot make the submitter upload without end; the job goes on elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_asking_for_one_blob_again_and_again_is_refused_it() {
    let a = start(None, false).await;
    let b = start(Some(&a), false).await;
    let c = start(Some(&a), false).await;
    converge(&[&a, &b, &c], 3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Long enough that the greedy worker's few requests all fall within the job.
    let manifest = job_files(dir.path(), 5000, 2);
    let store = Arc::new(JobStore::open(&dir.path().join("submit.redb")).expect("store"));
    let greedy = Sybils::on(ip("127.0.3.15"), 1);
    let (id, addr) = (a.id(), a.local_addr());
    let asking = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        // Dialled before the job loop takes pull links, a link is closed at once: dial until
        // one is offered leases, which shows the job loop took it.
        let mut link = loop {
            if let Ok(mut link) = greedy.dial(0, id, addr, LinkKind::Pull).await
                && next(&mut link, |f| matches!(f, JobFrame::Offer(_)).then_some(()))
                    .await
                    .is_some()
            {
                break link;
            }
            assert!(
                Instant::now() < deadline,
                "the submitter never took the pull link"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let module = Digest::of(&reverse_module());
        let (mut sent, mut missing) = (0, 0);
        for _ in 0..6 {
            send(&mut link, &JobFrame::BlobGet { digest: module }).await;
            loop {
                match next(&mut link, Some).await.expect("the submitter answers") {
                    JobFrame::BlobChunk {
                        offset,
                        bytes,
                        total,
                        ..
                    } if offset + bytes.len() as u64 == total => {
                        sent += 1;
                        break;
                    }
                    JobFrame::BlobMissing { .. } => {
                        missing += 1;
                        break;
                    }
                    _ => {}
                }
            }
        }
        (sent, missing)
    });
    let summary = submit(&a, dir.path(), manifest, store).await;
    assert!(summary.succeeded(), "{summary:?}");
    let (sent, missing) = asking.await.expect("the greedy worker's task");
    assert_eq!((sent, missing), (4, 2));
}

const SPIN: &str = r#"(module (memory (export "memory") 1)
    (func (export "run") (result i32) (loop $l (br $l)) i32.const 0))"#;

/// A submitter that revokes a running lease frees the worker's one slot at once: the unit is
/// stopped, its answer never arrives, and the next lease runs. (Without the stop, the spinning
/// unit would hold the slot for its whole minute.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_running_unit_is_stopped_and_never_reported() {
    let worker = start(None, false).await;
    let spin = wat::parse_str(SPIN).expect("spin module");
    let mut link = link_to(&worker).await;
    let job = Digest::of(b"spin, then revoke");
    let slow = Limits {
        timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let offer = JobFrame::Offer(Offer {
        name: "test".into(),
        job,
        spec: JobSpec::new(Digest::of(&spin), spin.len() as u64, &slow),
        leases: vec![WireLease {
            id: LeaseId(0),
            unit: 0,
            attempt: 1,
            ttl_ms: 120_000,
            input: InputRef::Inline(b"spin".to_vec()),
        }],
    });
    send(&mut link, &offer).await;
    let asked = next(&mut link, |f| match f {
        JobFrame::BlobGet { digest } => Some(digest),
        _ => None,
    })
    .await;
    assert_eq!(asked, Some(Digest::of(&spin)));
    send_blob(&mut link, Digest::of(&spin), &spin).await;
    let running = async {
        loop {
            let status = worker.status().await.expect("status");
            if status.work.is_some_and(|w| w.running == 1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the spinning unit started");

    let revoked = Instant::now();
    send(
        &mut link,
        &JobFrame::Revoke {
            job,
            leases: vec![LeaseId(0)],
        },
    )
    .await;
    let module = reverse_module();
    let next_job = Digest::of(b"next");
    send(&mut link, &offer_job(next_job, &module, 1)).await;
    let mut spin_reported = false;
    let output = loop {
        match next(&mut link, Some).await.expect("the worker answers") {
            JobFrame::BlobGet { digest } => send_blob(&mut link, digest, &module).await,
            JobFrame::Report {
                job: j, results, ..
            } if j == job => {
                spin_reported |= !results.is_empty();
            }
            JobFrame::Report {
                job: j,
                mut results,
                ..
            } if j == next_job && !results.is_empty() => {
                break results.remove(0).result.expect("the next unit ran");
            }
            _ => {}
        }
    };
    assert_eq!(output, b"0 tupni".to_vec());
    let waited = revoked.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "the next lease waited {waited:?} for the slot"
    );
    assert!(!spin_reported, "the revoked unit's answer was sent");
    let status = worker.status().await.expect("status");
    assert_eq!(status.work.map(|w| w.running), Some(0));
    worker.shutdown().await;
}
