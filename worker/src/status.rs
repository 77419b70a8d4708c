//! `worker status`: ask the peer running with a data directory what it knows.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::Args;
use coordinator_free::control::{self, StatusReport};
use coordinator_free::peer_id::PeerId;
use coordinator_free::store::{JobStore, Reputation};
use coordinator_free::validate::trust::{Trust, TrustConfig};

use crate::Failure;

/// Peers that only ever agreed shown by `worker status`, those with the most agreements first.
const STATUS_PEERS: usize = 20;

#[derive(Args)]
pub struct StatusArgs {
    /// The running peer's data directory (default: ~/.local/share/coordinator-free).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// On the overlay, list every peer a walk of the overlay finds (up to 1,000, within 10 s),
    /// with its capacity, instead of only this peer's views.
    #[arg(long)]
    all: bool,
}

pub fn run(args: StatusArgs) -> Result<ExitCode, Failure> {
    let dir = crate::data_dir(args.data_dir)
        .ok_or_else(|| Failure::usage(anyhow!("no data directory: pass --data-dir DIR")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::usage)?;
    let report = runtime.block_on(async {
        if args.all {
            control::status_all(&dir).await
        } else {
            control::status(&dir).await
        }
    });
    let record = submitter_record(&dir);
    if args.json {
        let mut value = match &report {
            Ok(report) => serde_json::to_value(report)
                .context("cannot format the status")
                .map_err(Failure::usage)?,
            Err(_) => serde_json::json!({}),
        };
        if let (Some(map), Some((record, trust))) = (value.as_object_mut(), &record) {
            let peers: Vec<serde_json::Value> = record
                .iter()
                .map(|(peer, r)| {
                    let standing = trust.peer(peer);
                    let host = r.host.map(|h| trust.host(&h));
                    serde_json::json!({
                        "peer": peer.to_string(),
                        "agreements": r.agreements,
                        "disagreements": r.disagreements,
                        "consecutive_agreements": r.consecutive_agreements,
                        "trust_streak": standing.streak,
                        "host_trust_streak": host.map(|h| h.streak),
                        "caught": standing.caught,
                        "trusted": r.host.is_some_and(|h| trust.is_trusted(peer, &h)),
                    })
                })
                .collect();
            map.insert("reputation".into(), peers.into());
            map.insert("spot_check_alert".into(), trust.alert().into());
        }
        if report.is_ok() || record.is_some() {
            println!("{value}");
        }
    } else {
        if let Ok(report) = &report {
            print!("{}", table(report));
        }
        if let Some((record, trust)) = &record {
            print!("{}", reputation_table(record, trust));
        }
    }
    match report {
        Ok(_) => Ok(ExitCode::SUCCESS),
        // A data directory that only ever submitted jobs: its record is the status there is.
        Err(err) if record.is_some() => {
            eprintln!(
                "no peer is running with this data directory ({err}); shown: what its submitter recorded"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => Err(Failure {
            error: err.into(),
            code: 1,
        }),
    }
}

/// What this data directory's submitter recorded about the peers that ran its units, if it
/// ever submitted a job and the record can be read now (a running submit holds it).
fn submitter_record(dir: &std::path::Path) -> Option<(Vec<(PeerId, Reputation)>, Trust)> {
    let path = dir.join("submit.redb");
    if !path.exists() {
        return None;
    }
    let store = JobStore::open(&path).ok()?;
    let mut peers = store.reputations().ok()?;
    // Those who disagreed first, then by the results they returned.
    peers.sort_by_key(|(_, r)| {
        (
            std::cmp::Reverse(r.disagreements),
            std::cmp::Reverse(r.agreements),
        )
    });
    let trust = store.trust(TrustConfig::default()).ok()?;
    Some((peers, trust))
}

fn reputation_table(record: &[(PeerId, Reputation)], trust: &Trust) -> String {
    let mut out = String::new();
    let dissenters: Vec<_> = record.iter().filter(|(_, r)| r.disagreements > 0).collect();
    let _ = writeln!(
        out,
        "\nsubmitted jobs: {} peers returned results, {} of them disagreed with an accepted quorum",
        record.len(),
        dissenters.len()
    );
    if trust.alert() > 0 {
        let _ = writeln!(
            out,
            "  after a recent catch, the next {} units run alone are spot-checked at {:.0} % at least (the results accepted alone just before it were sent to checks too)",
            trust.alert(),
            trust.config().alert_rate * 100.0
        );
    }
    let host = |r: &Reputation| {
        r.host
            .map_or_else(|| "host unknown".to_owned(), |h| format!("on {h}"))
    };
    // What adaptive replication would make of the peer: its streak, its host's, and whether
    // the two together let it run units alone.
    let standing = |peer: &PeerId, r: &Reputation| {
        let own = trust.peer(peer);
        let host = r.host.map(|h| trust.host(&h).streak);
        let trusted = r.host.is_some_and(|h| trust.is_trusted(peer, &h));
        let mut text = format!(
            "trust streak {}{}",
            own.streak,
            host.map_or_else(String::new, |h| format!(" (host {h})"))
        );
        if trusted {
            text.push_str(", runs units alone");
        }
        if own.caught > 0 {
            text.push_str(&format!(", caught {} times", own.caught));
        }
        text
    };
    for (peer, r) in &dissenters {
        let _ = writeln!(
            out,
            "  {peer}  {}  disagreed {} times, agreed {} times; {}",
            host(r),
            r.disagreements,
            r.agreements,
            standing(peer, r)
        );
    }
    // The peers that agreed most, with the host each answered from.
    for (peer, r) in record
        .iter()
        .filter(|(_, r)| r.disagreements == 0)
        .take(STATUS_PEERS)
    {
        let _ = writeln!(
            out,
            "  {peer}  {}  agreed {} times; {}",
            host(r),
            r.agreements,
            standing(peer, r)
        );
    }
    out
}

fn table(report: &StatusReport) -> String {
    let mut out = String::new();
    let addrs = |addrs: &[std::net::SocketAddr]| {
        addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "peer       {}", report.id);
    let _ = writeln!(out, "listening  {}", report.listen);
    let _ = writeln!(out, "advertised {}", addrs(&report.addrs));
    let _ = writeln!(
        out,
        "capacity   {}/{} cores free, {} MiB, engine profile {}",
        report.cores_free, report.cores_donated, report.memory_mb, report.profile
    );
    if let Some(w) = &report.work {
        let _ = writeln!(
            out,
            "work       {}/{} slots busy, {} queued, {} units done, {} jobs from {} submitters",
            w.running, w.slots, w.queued, w.completed, w.jobs, w.submitters
        );
        let _ = writeln!(out, "state      {}", crate::pause::state_line(report));
        for u in &w.units {
            let short = |text: String| text.chars().take(12).collect::<String>();
            let job = match u.job_name.as_str() {
                "" => short(u.job.to_string()),
                name => format!("{name} ({})", short(u.job.to_string())),
            };
            let _ = writeln!(
                out,
                "running    unit {} of job {job} from {}, module {}, for {}{}",
                u.unit,
                short(u.submitter.to_string()),
                short(u.module.to_string()),
                crate::history::unit_time(u.running_ms as f64 / 1000.0),
                progress_text(u.progress)
            );
        }
        if let Some(source) = &w.idle_source {
            let _ = writeln!(out, "idle from  {source}");
        }
        let _ = writeln!(
            out,
            "given      today {} units in {}, {} accepted; in all {} units in {}, {} accepted, {} rejected",
            w.given_today.units_run,
            crate::history::unit_time(w.given_today.unit_secs as f64),
            w.given_today.accepted,
            w.given_total.units_run,
            crate::history::unit_time(w.given_total.unit_secs as f64),
            w.given_total.accepted,
            w.given_total.rejected
        );
        if w.handed_back > 0 {
            let _ = writeln!(
                out,
                "           {} leases handed back to their submitters during suspensions",
                w.handed_back
            );
        }
    }
    if let Some(r) = &report.relay.serving {
        let _ = writeln!(
            out,
            "relay      serving: {} reservations, {} circuits, {} relay links open",
            r.reservations, r.circuits, r.links
        );
    }
    if let Some(v) = &report.relay.via {
        let _ = match v.observed {
            Some(seen) => writeln!(
                out,
                "relay      reservation on {}, which sees this peer at {seen}",
                v.relay
            ),
            None => writeln!(
                out,
                "relay      no reservation on {} now (taking it again): peers behind other NATs cannot reach this one meanwhile",
                v.relay
            ),
        };
    }
    match &report.overlay {
        Some(o) => {
            let _ = writeln!(
                out,
                "network    overlay: {}, {}; adverts of {} heard, {} relayed, {} refused",
                counted(o.active, "neighbour"),
                counted(o.passive, "passive peer"),
                counted(o.adverts_heard, "submitter"),
                o.adverts_relayed,
                o.adverts_refused
            );
            let _ = match o.estimated_peers {
                Some(n) => writeln!(
                    out,
                    "size       {} {n} peers, estimated from {} peers named by shuffles",
                    if o.estimate_is_lower_bound {
                        "at least"
                    } else {
                        "about"
                    },
                    o.census_samples
                ),
                None => writeln!(
                    out,
                    "size       not estimated yet ({} peers named by shuffles so far)",
                    o.census_samples
                ),
            };
            if let Some(s) = &o.survey {
                let _ = writeln!(
                    out,
                    "survey     {} peers answered of {} named, in {:.1} s; {}",
                    s.answered,
                    s.named,
                    s.millis as f64 / 1000.0,
                    if s.complete {
                        format!(
                            "every peer this one reaches was asked: {} others answer",
                            s.answered
                        )
                    } else {
                        "stopped at its limits: the network is larger".to_owned()
                    }
                );
            }
        }
        None => {
            let _ = writeln!(
                out,
                "network    {} peers known, {} connected",
                report.peers.len(),
                report.connections
            );
        }
    }
    out.push_str(&traffic_lines(&report.traffic));
    if report.peers.is_empty() {
        return out;
    }
    let _ = writeln!(out);
    if report.overlay.as_ref().is_some_and(|o| o.survey.is_none()) {
        // Without full tables, a peer's capacity is not known; what is known is how it was
        // met and, for submitters, their job.
        let _ = writeln!(
            out,
            "{:<52}  {:<9}  {:<12}  address",
            "peer", "known as", "job"
        );
        for peer in &report.peers {
            let _ = writeln!(
                out,
                "{:<52}  {:<9}  {:<12}  {}",
                peer.id.to_string(),
                peer.known_by.as_str(),
                peer.job
                    .map_or("-".to_owned(), |j| j.to_hex()[..12].to_owned()),
                addrs(&peer.addrs),
            );
        }
        return out;
    }
    let _ = writeln!(
        out,
        "{:<52}  {:>9}  {:>8}  {:>7}  {:<4}  address",
        "peer", "free/cores", "MiB", "profile", "link"
    );
    for peer in &report.peers {
        let _ = writeln!(
            out,
            "{:<52}  {:>10}  {:>8}  {:>7}  {:<4}  {}",
            peer.id.to_string(),
            format!("{}/{}", peer.cores_free, peer.cores_donated),
            peer.memory_mb,
            peer.profile,
            if peer.connected { "yes" } else { "-" },
            addrs(&peer.addrs),
        );
    }
    out
}

/// What the peer's links cost, by kind: the rates of the last minute and the totals since
/// start.
fn traffic_lines(t: &coordinator_free::traffic::TrafficReport) -> String {
    let mut out = String::new();
    let window = if t.window_secs > 0 {
        format!("per second over the last {} s", t.window_secs)
    } else {
        "per second: not measured yet".to_owned()
    };
    let _ = writeln!(
        out,
        "traffic    {:<11} {:>11} {:>11}   {window}; since start",
        "", "sent", "received"
    );
    for (name, k) in [
        ("membership", &t.membership),
        ("jobs", &t.jobs),
        ("blobs", &t.blobs),
    ] {
        let _ = writeln!(
            out,
            "           {name:<11} {:>9}/s {:>9}/s   {} sent, {} received",
            byte_count(k.sent_per_sec as f64),
            byte_count(k.received_per_sec as f64),
            byte_count(k.total.sent as f64),
            byte_count(k.total.received as f64),
        );
    }
    out
}

/// Bytes in decimal units, as network rates are quoted.
fn byte_count(bytes: f64) -> String {
    match bytes {
        b if b < 1e3 => format!("{b:.0} B"),
        b if b < 1e6 => format!("{:.1} KB", b / 1e3),
        b if b < 1e9 => format!("{:.1} MB", b / 1e6),
        b => format!("{:.2} GB", b / 1e9),
    }
}

/// A unit's reported progress as `worker status` shows it: a share when the unit gave a total,
/// else the count it reported; nothing when it reported none.
fn progress_text(progress: Option<(u64, u64)>) -> String {
    match progress {
        Some((done, total)) if total > 0 => {
            let percent = (done.min(total) as f64 / total as f64) * 100.0;
            format!(", {percent:.0} % done")
        }
        Some((done, _)) => format!(", {done} done"),
        None => String::new(),
    }
}

/// `n` and `noun`, made plural unless `n` is one.
fn counted(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator_free::traffic::{Bytes, KindTraffic, TrafficReport};

    #[test]
    fn traffic_is_shown_per_kind_in_decimal_units() {
        assert_eq!(byte_count(999.0), "999 B");
        assert_eq!(byte_count(1_500.0), "1.5 KB");
        assert_eq!(byte_count(612_000_000.0), "612.0 MB");
        assert_eq!(byte_count(3.2e9), "3.20 GB");
        let report = TrafficReport {
            window_secs: 60,
            membership: KindTraffic {
                total: Bytes {
                    sent: 52_000,
                    received: 48_000,
                },
                sent_per_sec: 430,
                received_per_sec: 410,
            },
            ..TrafficReport::default()
        };
        let text = traffic_lines(&report);
        assert!(text.contains("over the last 60 s"), "{text}");
        let line = text.lines().find(|l| l.contains("membership")).unwrap();
        assert!(line.contains("430 B/s"), "{line}");
        assert!(line.contains("52.0 KB sent, 48.0 KB received"), "{line}");
        assert!(text.lines().any(|l| l.trim_start().starts_with("blobs")));
        let fresh = traffic_lines(&TrafficReport::default());
        assert!(fresh.contains("not measured yet"), "{fresh}");
    }

    #[test]
    fn an_overlay_peer_lists_its_views_and_the_submitters_it_heard() {
        use coordinator_free::control::{KnownBy, OverlayStatus, PeerStatus};
        let peer = |n: u8, known_by, job| PeerStatus {
            id: PeerId::from_bytes([n; 32]),
            addrs: vec![std::net::SocketAddr::from(([127, 0, 0, n], 7401))],
            cores_donated: 0,
            cores_free: 0,
            memory_mb: 0,
            profile: 0,
            seq: 0,
            connected: known_by == KnownBy::Neighbour,
            job,
            known_by,
        };
        let job = coordinator_free::digest::Digest::of(b"job");
        let report = StatusReport {
            id: PeerId::from_bytes([9; 32]),
            listen: "127.0.0.9:7401".parse().unwrap(),
            addrs: Vec::new(),
            cores_donated: 1,
            cores_free: 1,
            memory_mb: 512,
            profile: 1,
            seq: 1,
            connections: 1,
            peers: vec![
                peer(1, KnownBy::Neighbour, None),
                peer(2, KnownBy::Passive, None),
                peer(3, KnownBy::Advert, Some(job)),
            ],
            work: None,
            traffic: TrafficReport::default(),
            overlay: Some(OverlayStatus {
                active: 1,
                passive: 1,
                adverts_heard: 1,
                adverts_relayed: 4,
                adverts_refused: 2,
                survey: None,
                estimated_peers: Some(480),
                estimate_is_lower_bound: false,
                census_samples: 900,
            }),
            relay: coordinator_free::control::RelayStatus {
                serving: Some(coordinator_free::control::RelayServing {
                    reservations: 3,
                    circuits: 1,
                    links: 5,
                }),
                via: Some(coordinator_free::control::RelayVia {
                    relay: "198.51.100.10:7401".parse().unwrap(),
                    observed: Some("203.0.113.2:40012".parse().unwrap()),
                }),
            },
        };
        let text = table(&report);
        assert!(
            text.contains("relay      serving: 3 reservations, 1 circuits, 5 relay links open"),
            "{text}"
        );
        assert!(
            text.contains(
                "relay      reservation on 198.51.100.10:7401, which sees this peer at 203.0.113.2:40012"
            ),
            "{text}"
        );
        assert!(
            text.contains("overlay: 1 neighbour, 1 passive peer; adverts of 1 submitter heard, 4 relayed, 2 refused"),
            "{text}"
        );
        let row = |n: u8| {
            let id = PeerId::from_bytes([n; 32]).to_string();
            text.lines()
                .find(|l| l.starts_with(&id))
                .unwrap()
                .to_owned()
        };
        assert!(
            text.contains("about 480 peers, estimated from 900 peers named by shuffles"),
            "{text}"
        );
        assert!(row(1).contains("neighbour"), "{text}");
        assert!(row(2).contains("passive"), "{text}");
        assert!(
            row(3).contains("advert") && row(3).contains(&job.to_hex()[..12]),
            "{text}"
        );
        // No capacity column: it is not known without full tables.
        assert!(!text.contains("free/cores"), "{text}");

        // With a survey, every peer that answered is listed with its capacity.
        let mut surveyed = report.clone();
        surveyed.peers = vec![PeerStatus {
            cores_donated: 4,
            cores_free: 3,
            ..peer(4, KnownBy::Survey, None)
        }];
        if let Some(o) = &mut surveyed.overlay {
            o.survey = Some(coordinator_free::control::SurveyCount {
                named: 3,
                answered: 1,
                complete: true,
                millis: 1_250,
            });
        }
        let text = table(&surveyed);
        assert!(
            text.contains("1 peers answered of 3 named, in 1.2 s; every peer this one reaches was asked: 1 others answer"),
            "{text}"
        );
        assert!(
            text.contains("free/cores") && text.contains("3/4"),
            "{text}"
        );
    }
}
