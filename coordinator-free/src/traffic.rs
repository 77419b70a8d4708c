//! What a peer's links cost: bytes sent and received, by kind, since start and per second.
//!
//! Every connection a node opens or accepts is tracked from its greeting on ([`Traffic::track`])
//! under the kind its ALPN names. QUIC counts the UDP payload bytes of each connection; a
//! sample adds what each connection moved since the last one, so a connection's last bytes are
//! counted even after it closed. Blob chunks travel on job links too (a submitter serves its
//! inputs on the link it leases on): their payload is moved from *jobs* to *blobs* where they
//! are written and read ([`Traffic::blob_payload`]), so *jobs* is leases, results and their
//! framing, and *blobs* the modules and inputs themselves.
//!
//! The meter is shared by the tasks that hold links (a clone is a handle to the same counts);
//! every holder only adds to it, under a lock held for a few additions.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::net::LinkKind;

/// The kinds traffic is reported by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficKind {
    /// Peer discovery and liveness: membership and overlay links.
    Membership,
    /// Leases, results and job adverts on job and pull links.
    Jobs,
    /// Modules and inputs: blob links, and blob chunks on job links.
    Blobs,
}

impl TrafficKind {
    fn of(link: LinkKind) -> Self {
        match link {
            LinkKind::Membership | LinkKind::Overlay | LinkKind::Survey | LinkKind::Relay => {
                Self::Membership
            }
            LinkKind::Job | LinkKind::Pull => Self::Jobs,
            LinkKind::Blob => Self::Blobs,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Bytes each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    pub sent: u64,
    pub received: u64,
}

impl Bytes {
    fn minus(self, earlier: Self) -> Self {
        Self {
            sent: self.sent.saturating_sub(earlier.sent),
            received: self.received.saturating_sub(earlier.received),
        }
    }
}

/// One kind's traffic as `worker status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindTraffic {
    /// Since the peer started.
    pub total: Bytes,
    /// Bytes per second over the report's window, rounded.
    pub sent_per_sec: u64,
    pub received_per_sec: u64,
}

/// A peer's traffic by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficReport {
    /// The rates are averages over the last this many seconds (at most [`WINDOW`]); 0 until
    /// a second has passed since the first snapshot.
    pub window_secs: u64,
    pub membership: KindTraffic,
    pub jobs: KindTraffic,
    pub blobs: KindTraffic,
}

/// The rates of a report are averages over at most this long.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Snapshots kept for the rates: one per [`SNAPSHOT_EVERY`] at most.
const SNAPSHOTS: usize = 16;
/// Least time between two snapshots.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);
/// Tracked connections past which closed ones are counted and dropped at once rather than at
/// the next sample.
const PRUNE_PAST: usize = 256;

struct Tracked {
    kind: TrafficKind,
    conn: quinn::Connection,
    seen: Bytes,
}

#[derive(Default)]
struct Meter {
    links: Vec<Tracked>,
    /// What the links moved, by the kind of link.
    totals: [Bytes; 3],
    /// Blob payload among the job links' bytes.
    blob_payload: Bytes,
    snapshots: VecDeque<(Instant, [Bytes; 3])>,
}

impl Meter {
    /// The totals by kind, blob payload moved from jobs to blobs. A link's bytes are read
    /// when sampled and its payload counted when written or read, so the two may be a
    /// sample apart; jobs never goes below zero meanwhile.
    fn by_kind(&self) -> [Bytes; 3] {
        let mut kinds = self.totals;
        let jobs = &mut kinds[TrafficKind::Jobs.index()];
        *jobs = jobs.minus(self.blob_payload);
        let blobs = &mut kinds[TrafficKind::Blobs.index()];
        blobs.sent += self.blob_payload.sent;
        blobs.received += self.blob_payload.received;
        kinds
    }

    /// Adds what each tracked connection moved since it was last looked at; forgets closed
    /// ones, whose counts no longer change.
    fn collect(&mut self) {
        let totals = &mut self.totals;
        self.links.retain_mut(|link| {
            let stats = link.conn.stats();
            let now = Bytes {
                sent: stats.udp_tx.bytes,
                received: stats.udp_rx.bytes,
            };
            let delta = now.minus(link.seen);
            link.seen = now;
            let total = &mut totals[link.kind.index()];
            total.sent += delta.sent;
            total.received += delta.received;
            link.conn.close_reason().is_none()
        });
    }
}

/// A node's traffic meter; clones count into the same totals.
#[derive(Clone, Default)]
pub struct Traffic(Arc<Mutex<Meter>>);

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Traffic")
    }
}

impl Traffic {
    fn meter(&self) -> std::sync::MutexGuard<'_, Meter> {
        // Only additions happen under the lock: a panic elsewhere leaves the counts usable.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts `conn`'s bytes, from its first, under `kind`.
    pub fn track(&self, kind: LinkKind, conn: &quinn::Connection) {
        let mut meter = self.meter();
        if meter.links.len() >= PRUNE_PAST {
            meter.collect();
        }
        meter.links.push(Tracked {
            kind: TrafficKind::of(kind),
            conn: conn.clone(),
            seen: Bytes::default(),
        });
    }

    /// Blob chunk payload carried on a job link: counted as blobs, not jobs.
    pub fn blob_payload(&self, sent: u64, received: u64) {
        let mut meter = self.meter();
        meter.blob_payload.sent += sent;
        meter.blob_payload.received += received;
    }

    /// Counts what moved since the last sample and keeps a snapshot for the rates when the
    /// last is [`SNAPSHOT_EVERY`] old.
    pub fn sample(&self, now: Instant) {
        let mut meter = self.meter();
        meter.collect();
        let due = meter
            .snapshots
            .back()
            .is_none_or(|(at, _)| now.saturating_duration_since(*at) >= SNAPSHOT_EVERY);
        if due {
            if meter.snapshots.len() == SNAPSHOTS {
                meter.snapshots.pop_front();
            }
            let totals = meter.by_kind();
            meter.snapshots.push_back((now, totals));
        }
    }

    /// Totals now, and rates since the oldest snapshot within [`WINDOW`].
    pub fn report(&self, now: Instant) -> TrafficReport {
        let mut meter = self.meter();
        meter.collect();
        let totals = meter.by_kind();
        let since = meter
            .snapshots
            .iter()
            .find(|(at, _)| now.saturating_duration_since(*at) <= WINDOW)
            .copied();
        let (window, base) = match since {
            Some((at, base)) => (now.saturating_duration_since(at), base),
            None => (Duration::ZERO, totals),
        };
        let secs = window.as_secs_f64();
        let kind = |k: TrafficKind| {
            let moved = totals[k.index()].minus(base[k.index()]);
            let rate = |bytes: u64| {
                if secs >= 1.0 {
                    (bytes as f64 / secs).round() as u64
                } else {
                    0
                }
            };
            KindTraffic {
                total: totals[k.index()],
                sent_per_sec: rate(moved.sent),
                received_per_sec: rate(moved.received),
            }
        };
        TrafficReport {
            window_secs: if secs >= 1.0 { window.as_secs() } else { 0 },
            membership: kind(TrafficKind::Membership),
            jobs: kind(TrafficKind::Jobs),
            blobs: kind(TrafficKind::Blobs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::net::{self, NetConfig};

    /// Two real peers on loopback: a membership link and a job link carrying a blob-sized
    /// payload; each side's meter counts them under their kinds, both ways, and keeps the
    /// bytes of a link after it closed.
    #[tokio::test]
    async fn links_are_counted_by_kind_both_ways_and_after_they_close() {
        let a = Identity::generate().unwrap();
        let b = Identity::generate().unwrap();
        let (config_a, config_b) = (NetConfig::default(), NetConfig::default());
        let ea = net::endpoint(&a, None, "127.0.0.1:0".parse().unwrap(), &config_a).unwrap();
        let eb = net::endpoint(&b, None, "127.0.0.1:0".parse().unwrap(), &config_b).unwrap();
        let addr_b = eb.local_addr().unwrap();
        let accepting = {
            let config_b = config_b.clone();
            tokio::spawn(async move {
                let mut links = Vec::new();
                for _ in 0..2 {
                    let incoming = eb.accept().await.unwrap();
                    links.push(net::accept(incoming, &config_b).await.unwrap());
                }
                (eb, links)
            })
        };
        let member = net::dial(&ea, &a, None, addr_b, Some(b.id()), &config_a)
            .await
            .unwrap();
        let mut job = net::dial_for(
            &ea,
            &a,
            None,
            addr_b,
            Some(b.id()),
            &config_a,
            LinkKind::Job,
        )
        .await
        .unwrap();
        let (_eb, mut links) = accepting.await.unwrap();
        let payload = vec![5u8; 1 << 20];
        job.send.write_all(&payload).await.unwrap();
        job.send.finish().unwrap();
        let inbound_job = links.iter_mut().find(|l| l.kind == LinkKind::Job).unwrap();
        let got = inbound_job.recv.read_to_end(2 << 20).await.unwrap();
        assert_eq!(got.len(), payload.len());
        config_a.traffic.blob_payload(payload.len() as u64 / 2, 0);
        job.conn.close(0u32.into(), b"done");
        member.conn.close(0u32.into(), b"done");
        ea.wait_idle().await;

        let now = Instant::now();
        let sent = config_a.traffic.report(now);
        let received = config_b.traffic.report(now);
        // The job link carried the megabyte (and, on loopback, its path probes); half of the
        // megabyte was declared blob payload.
        assert!(sent.jobs.total.sent >= (1 << 19), "{sent:?}");
        assert_eq!(sent.blobs.total.sent, 1 << 19, "{sent:?}");
        assert!(received.jobs.total.received >= 1 << 20, "{received:?}");
        // The membership link carried handshakes and hellos, far less than the payload: no
        // path probes past the default datagram size.
        assert!(sent.membership.total.sent > 1000, "{sent:?}");
        assert!(sent.membership.total.sent < 20_000, "{sent:?}");
        assert!(received.membership.total.received > 1000, "{received:?}");
        // Closed links are forgotten once counted; their bytes stay.
        assert!(config_a.traffic.meter().links.is_empty());
        assert_eq!(config_a.traffic.report(now).jobs, sent.jobs);
    }

    #[test]
    fn rates_are_averaged_over_the_snapshots_within_the_window() {
        let traffic = Traffic::default();
        let t0 = Instant::now();
        traffic.sample(t0);
        // No tracked connection: only the blob payload moves the totals.
        traffic.blob_payload(10_000, 4_000);
        traffic.sample(t0 + Duration::from_secs(1)); // too soon for a snapshot
        let report = traffic.report(t0 + Duration::from_secs(10));
        assert_eq!(report.window_secs, 10);
        assert_eq!(report.blobs.sent_per_sec, 1_000);
        assert_eq!(report.blobs.received_per_sec, 400);
        assert_eq!(report.jobs.total, Bytes::default());
        // Past the window, the old snapshot no longer counts: no snapshot, no rate.
        let later = traffic.report(t0 + WINDOW + Duration::from_secs(1));
        assert_eq!(later.window_secs, 0);
        assert_eq!(later.blobs.sent_per_sec, 0);
        assert_eq!(later.blobs.total.sent, 10_000);
        for s in 0..40 {
            traffic.sample(t0 + Duration::from_secs(100 + 5 * s));
        }
        assert_eq!(traffic.meter().snapshots.len(), SNAPSHOTS);
    }
}
