//! The control endpoint: how `worker status` asks the running peer of a data directory.
//!
//! A Unix socket inside the data directory, mode 0600 in a 0700 directory, so only the user
//! who runs the peer (and root) can reach it; nothing is exposed on the network. The protocol
//! is one request line answered by one JSON document, then the server closes: `status`;
//! `status all` (the status with every peer a survey of the overlay finds);
//! `pause` (until `resume`) or `pause SECS`; `resume`. Each answers with the status report as
//! it is after the request, or `{"error": "..."}`.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::peer_id::PeerId;

/// The socket file inside the data directory.
pub const SOCKET_FILE: &str = "control.sock";
/// Longest request line.
pub(crate) const MAX_REQUEST: usize = 256;
/// Longest reply read by the client: a full table of 4096 peers is about 1.5 MB.
const MAX_REPLY: u64 = 16 * 1024 * 1024;
/// Clients served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 8;
/// A client that has not finished in this time is dropped, so it cannot hold a slot: a survey
/// of the overlay takes up to `survey::SURVEY_TIME`.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// What a running peer says about itself and its view of the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub id: PeerId,
    /// Socket the QUIC endpoint is bound to.
    pub listen: SocketAddr,
    /// Addresses in this peer's advert: where others dial it.
    pub addrs: Vec<SocketAddr>,
    pub cores_donated: u16,
    pub cores_free: u16,
    pub memory_mb: u32,
    pub profile: u32,
    pub seq: u64,
    pub connections: usize,
    /// Every known live peer, self excluded, ordered by id.
    pub peers: Vec<PeerStatus>,
    /// The units this peer runs for others, when it donates cores.
    #[serde(default)]
    pub work: Option<WorkStatus>,
    /// Bytes this peer's links moved, by kind.
    #[serde(default)]
    pub traffic: crate::traffic::TrafficReport,
    /// The overlay's views and adverts, when the peer finds others through one.
    #[serde(default)]
    pub overlay: Option<OverlayStatus>,
    /// What this peer does as a relay, or keeps on one (peers behind NAT).
    #[serde(default)]
    pub relay: RelayStatus,
}

/// A peer's part in relaying: the service it offers, and the reservation it keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// When this peer relays (`--relay`): what it holds now.
    #[serde(default)]
    pub serving: Option<RelayServing>,
    /// When this peer is behind NAT (`--via-relay`): its relay and reservation.
    #[serde(default)]
    pub via: Option<RelayVia>,
}

/// What a relay holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayServing {
    pub reservations: usize,
    /// Circuits carried, and asked for but not joined yet.
    pub circuits: usize,
    /// Relay links open.
    pub links: usize,
}

/// The reservation a peer behind NAT keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayVia {
    pub relay: SocketAddr,
    /// Where the relay sees this peer while the reservation holds; `None` while it is being
    /// taken again.
    pub observed: Option<SocketAddr>,
}

/// Most running units a status lists.
pub const MAX_LISTED_UNITS: usize = 64;

/// A unit running on this peer for a submitter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningUnit {
    pub submitter: PeerId,
    pub job: crate::digest::Digest,
    /// The job's name as its submitter gave it (control characters escaped).
    #[serde(default)]
    pub job_name: String,
    /// The unit's index in its job.
    pub unit: u32,
    /// The module's digest.
    pub module: crate::digest::Digest,
    /// How long it has run, suspensions included.
    pub running_ms: u64,
    /// The last progress the unit reported: done of total, in its own units.
    #[serde(default)]
    pub progress: Option<(u64, u64)>,
}

/// What a peer gave: time its donated cores ran units, units run to an answer, and the
/// verdicts submitters returned on them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Given {
    pub unit_secs: u64,
    pub units_run: u64,
    pub accepted: u64,
    pub rejected: u64,
}

/// What a peer's donated cores are doing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkStatus {
    /// Units run at once.
    pub slots: u32,
    /// Units running now.
    pub running: u32,
    /// Leases queued for a free slot.
    pub queued: u32,
    /// Units run to the end since this peer started.
    pub completed: u64,
    /// Submitters with a job link to this peer now.
    pub submitters: u32,
    /// Jobs this peer holds leases or state for.
    pub jobs: u32,
    /// Why the donated cores are suspended now; empty while they work.
    #[serde(default)]
    pub suspended: Vec<crate::suspend::Reason>,
    /// When the current suspension began, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub suspended_since_ms: Option<u64>,
    /// When the user's pause ends by itself, in milliseconds since the Unix epoch; `None` with
    /// `paused_by_user` among the reasons is a pause until `worker resume`.
    #[serde(default)]
    pub pause_until_ms: Option<u64>,
    /// Leases handed back to their submitters because a suspension outlasted their slack.
    #[serde(default)]
    pub handed_back: u64,
    /// Where idle time is read from (`logind`, `input devices`, `unknown`), once the machine
    /// is watched.
    #[serde(default)]
    pub idle_source: Option<String>,
    /// What this peer gave today (local time) and in all.
    #[serde(default)]
    pub given_today: Given,
    #[serde(default)]
    pub given_total: Given,
    /// The units running now, longest running first (at most [`MAX_LISTED_UNITS`]).
    #[serde(default)]
    pub units: Vec<RunningUnit>,
}

/// One known peer, from its latest advert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: PeerId,
    /// The addresses this peer would dial it at: the advertised ones, less loopback and
    /// private ones that reached us only through peers on public addresses.
    pub addrs: Vec<SocketAddr>,
    pub cores_donated: u16,
    pub cores_free: u16,
    pub memory_mb: u32,
    pub profile: u32,
    pub seq: u64,
    /// Whether this peer holds a connection to it right now (gossip reaches the rest).
    pub connected: bool,
    /// The job it is submitting now, if any.
    #[serde(default)]
    pub job: Option<crate::digest::Digest>,
    /// How this peer knows of it.
    #[serde(default)]
    pub known_by: KnownBy,
}

/// How a peer in a status came to be known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KnownBy {
    /// Its advert, in the full table every peer holds.
    #[default]
    Table,
    /// A neighbour in the overlay's active view.
    Neighbour,
    /// An address in the overlay's passive view.
    Passive,
    /// A job advert it broadcast.
    Advert,
    /// A survey of the overlay (`worker status --all`): it answered.
    Survey,
}

impl KnownBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Table => "table",
            Self::Neighbour => "neighbour",
            Self::Passive => "passive",
            Self::Advert => "advert",
            Self::Survey => "survey",
        }
    }
}

/// What the overlay holds, when the peer runs one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayStatus {
    /// Neighbours, and addresses kept for repair.
    pub active: usize,
    pub passive: usize,
    /// Submitters whose current adverts were heard.
    pub adverts_heard: usize,
    /// Adverts passed on, and refused (forged, out of time, stale, or over a link's rate).
    pub adverts_relayed: u64,
    pub adverts_refused: u64,
    /// The survey this report's peers come from, when it was asked for (`status all`).
    #[serde(default)]
    pub survey: Option<SurveyCount>,
    /// The network's size as estimated from the peers shuffles named (`census`): about this
    /// many, or at least this many while no peer was named twice; `None` until enough were.
    #[serde(default)]
    pub estimated_peers: Option<u64>,
    #[serde(default)]
    pub estimate_is_lower_bound: bool,
    /// Peers named by shuffles the estimate rests on.
    #[serde(default)]
    pub census_samples: usize,
}

/// What a survey of the overlay found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurveyCount {
    /// Peers named by the views it walked, and of them those that answered.
    pub named: usize,
    pub answered: usize,
    /// Whether it asked everyone it heard of, within its limits: then `named` is the size of
    /// the network this peer reaches.
    pub complete: bool,
    pub millis: u64,
}

/// Why the control endpoint could not be served or asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no peer is running with data directory {dir} (no control socket answers)")]
    NotRunning { dir: PathBuf },
    #[error("another peer is already running with control socket {path}")]
    AlreadyRunning { path: PathBuf },
    #[error("cannot open control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control request failed")]
    Io(#[from] io::Error),
    #[error("the peer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the peer's answer is not a status report")]
    BadReply(#[source] serde_json::Error),
    #[error("the peer refused the request: {0}")]
    Refused(String),
}

/// A change to the user's pause asked over the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseChange {
    /// Pause for this long, or until resumed when `None`.
    Pause(Option<Duration>),
    Resume,
}

/// A request from a control client to the node that owns the state.
#[derive(Debug)]
pub(crate) enum ControlRequest {
    Status(oneshot::Sender<StatusReport>),
    /// The status with every peer a survey of the overlay finds (`status all`).
    Survey(oneshot::Sender<StatusReport>),
    /// Pause or resume; answered with the status after the change, or why it failed.
    Pause {
        change: PauseChange,
        reply: oneshot::Sender<Result<StatusReport, String>>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorReply {
    error: String,
}

/// Binds the socket, refusing to take over one a live peer still answers on.
pub(crate) async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::AlreadyRunning {
                path: path.to_owned(),
            });
        }
        // Left behind by a peer that did not shut down cleanly.
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    }
    Ok(listener)
}

/// Serves control clients until the task is aborted.
pub(crate) async fn serve(listener: UnixListener, requests: mpsc::Sender<ControlRequest>) {
    let permits = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut clients = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Waiting for a permit here lets the backlog, not our memory, hold the rest.
                    let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                        return;
                    };
                    let requests = requests.clone();
                    clients.spawn(async move {
                        let _permit = permit;
                        match tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, requests)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(err)) => tracing::debug!(%err, "control client failed"),
                            Err(_) => tracing::debug!("control client timed out"),
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!(%err, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
}

async fn answer(
    stream: UnixStream,
    requests: mpsc::Sender<ControlRequest>,
) -> Result<(), ControlError> {
    let (read, mut write) = stream.into_split();
    let request = read_request(read).await?;
    let reply = match request {
        ClientRequest::Status | ClientRequest::StatusAll => {
            let (tx, rx) = oneshot::channel();
            let request = match request {
                ClientRequest::StatusAll => ControlRequest::Survey(tx),
                _ => ControlRequest::Status(tx),
            };
            let report = match requests.send(request).await {
                Ok(()) => rx.await.ok(),
                Err(_) => None,
            };
            match report {
                Some(report) => serde_json::to_vec(&report),
                None => serde_json::to_vec(&ErrorReply {
                    error: "the peer is shutting down".into(),
                }),
            }
        }
        ClientRequest::Pause(secs) => {
            change(&requests, PauseChange::Pause(secs.map(Duration::from_secs))).await
        }
        ClientRequest::Resume => change(&requests, PauseChange::Resume).await,
        ClientRequest::BadPause(argument) => serde_json::to_vec(&ErrorReply {
            error: format!(
                "pause takes whole seconds from 1 to {MAX_PAUSE_SECS}, not {argument:?}"
            ),
        }),
        ClientRequest::Unknown(request) => serde_json::to_vec(&ErrorReply {
            error: format!("unknown request {request:?}"),
        }),
    }
    .map_err(|err| ControlError::Io(io::Error::other(err)))?;
    write.write_all(&reply).await?;
    write.shutdown().await?;
    Ok(())
}

/// Asks the node for a pause change and renders its answer.
async fn change(
    requests: &mpsc::Sender<ControlRequest>,
    change: PauseChange,
) -> serde_json::Result<Vec<u8>> {
    let (reply, rx) = oneshot::channel();
    let answer = match requests.send(ControlRequest::Pause { change, reply }).await {
        Ok(()) => rx
            .await
            .unwrap_or_else(|_| Err("the peer is shutting down".into())),
        Err(_) => Err("the peer is shutting down".into()),
    };
    match answer {
        Ok(report) => serde_json::to_vec(&report),
        Err(error) => serde_json::to_vec(&ErrorReply { error }),
    }
}

/// Longest pause with an end asked over the socket, in seconds.
pub(crate) const MAX_PAUSE_SECS: u64 = crate::suspend::MAX_PAUSE.as_secs();

/// What a control client asked for, as read from its request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientRequest {
    Status,
    /// The status with a survey of the overlay.
    StatusAll,
    /// Pause for this many seconds, or until resumed.
    Pause(Option<u64>),
    Resume,
    /// `pause` with an argument that is not a number of seconds in range, cut like
    /// [`ClientRequest::Unknown`]'s.
    BadPause(String),
    /// Anything else, cut to [`MAX_ECHOED_CHARS`] characters for the refusal.
    Unknown(String),
}

/// Longest part of an unknown request echoed back in the refusal.
pub(crate) const MAX_ECHOED_CHARS: usize = 32;

/// Reads the request line: at most [`MAX_REQUEST`] bytes, so a client cannot make the peer
/// buffer more by never sending a newline.
pub(crate) async fn read_request(
    reader: impl AsyncRead + Unpin,
) -> Result<ClientRequest, ControlError> {
    let mut line = String::new();
    BufReader::new(reader.take(MAX_REQUEST as u64))
        .read_line(&mut line)
        .await?;
    let echo = |text: &str| text.chars().take(MAX_ECHOED_CHARS).collect();
    let mut words = line.split_whitespace();
    Ok(match (words.next(), words.next(), words.next()) {
        (Some("status"), None, None) => ClientRequest::Status,
        (Some("status"), Some("all"), None) => ClientRequest::StatusAll,
        (Some("resume"), None, None) => ClientRequest::Resume,
        (Some("pause"), None, None) => ClientRequest::Pause(None),
        (Some("pause"), Some(secs), None) => match secs.parse::<u64>() {
            Ok(secs) if (1..=MAX_PAUSE_SECS).contains(&secs) => ClientRequest::Pause(Some(secs)),
            _ => ClientRequest::BadPause(echo(secs)),
        },
        _ => ClientRequest::Unknown(echo(line.trim())),
    })
}

/// The client's reading of the peer's answer: a status report or the peer's refusal.
pub(crate) fn parse_reply(reply: &[u8]) -> Result<StatusReport, ControlError> {
    match serde_json::from_slice::<StatusReport>(reply) {
        Ok(report) => Ok(report),
        Err(err) => match serde_json::from_slice::<ErrorReply>(reply) {
            Ok(refusal) => Err(ControlError::Refused(refusal.error)),
            Err(_) => Err(ControlError::BadReply(err)),
        },
    }
}

/// Asks the peer running with data directory `dir` for its status.
pub async fn status(dir: &Path) -> Result<StatusReport, ControlError> {
    ask(dir, "status").await
}

/// Asks the peer running with data directory `dir` for its status with every peer a survey of
/// the overlay finds (a peer on full tables answers with its table).
pub async fn status_all(dir: &Path) -> Result<StatusReport, ControlError> {
    ask(dir, "status all").await
}

/// Pauses the peer running with data directory `dir` for `length`, or until resumed when
/// `None`; answers with its status after the change.
pub async fn pause(dir: &Path, length: Option<Duration>) -> Result<StatusReport, ControlError> {
    match length {
        // Whole seconds on the wire, at least one: a pause is never shorter than asked.
        Some(length) => {
            let secs = length
                .as_secs()
                .saturating_add(u64::from(length.subsec_nanos() > 0))
                .clamp(1, MAX_PAUSE_SECS);
            ask(dir, &format!("pause {secs}")).await
        }
        None => ask(dir, "pause").await,
    }
}

/// Resumes the peer running with data directory `dir` from the user's pause.
pub async fn resume(dir: &Path) -> Result<StatusReport, ControlError> {
    ask(dir, "resume").await
}

async fn ask(dir: &Path, request: &str) -> Result<StatusReport, ControlError> {
    let path = dir.join(SOCKET_FILE);
    tokio::time::timeout(CLIENT_TIMEOUT, async {
        let mut stream =
            UnixStream::connect(&path)
                .await
                .map_err(|source| match source.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                        ControlError::NotRunning {
                            dir: dir.to_owned(),
                        }
                    }
                    _ => ControlError::Connect {
                        path: path.clone(),
                        source,
                    },
                })?;
        stream.write_all(format!("{request}\n").as_bytes()).await?;
        let mut reply = Vec::new();
        stream.take(MAX_REPLY).read_to_end(&mut reply).await?;
        parse_reply(&reply)
    })
    .await
    .map_err(|_| ControlError::Timeout(CLIENT_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn request(bytes: &[u8]) -> ClientRequest {
        read_request(bytes).await.expect("a request line")
    }

    #[tokio::test]
    async fn the_request_line_is_read_up_to_its_cap() {
        assert_eq!(request(b"status\n").await, ClientRequest::Status);
        assert_eq!(request(b"  status\r\nmore").await, ClientRequest::Status);
        let long = format!("{}\n", "x".repeat(1000));
        assert_eq!(
            request(long.as_bytes()).await,
            ClientRequest::Unknown("x".repeat(MAX_ECHOED_CHARS))
        );
        // The cap cuts the line: a request behind 256 bytes of spaces is never seen.
        let hidden = format!("{}status\n", " ".repeat(MAX_REQUEST));
        assert_eq!(
            request(hidden.as_bytes()).await,
            ClientRequest::Unknown(String::new())
        );
        assert!(read_request(&b"\xff\xfe\n"[..]).await.is_err());
    }

    #[tokio::test]
    async fn pause_and_resume_requests_take_only_seconds_in_range() {
        assert_eq!(request(b"pause\n").await, ClientRequest::Pause(None));
        assert_eq!(request(b"pause 90\n").await, ClientRequest::Pause(Some(90)));
        assert_eq!(request(b" resume \n").await, ClientRequest::Resume);
        let max = format!("pause {MAX_PAUSE_SECS}\n");
        assert_eq!(
            request(max.as_bytes()).await,
            ClientRequest::Pause(Some(MAX_PAUSE_SECS))
        );
        for bad in ["0", "-1", "1.5", "90s", "99999999999999999999999999"] {
            let line = format!("pause {bad}\n");
            assert_eq!(
                request(line.as_bytes()).await,
                ClientRequest::BadPause(bad.chars().take(MAX_ECHOED_CHARS).collect()),
                "{bad}"
            );
        }
        let beyond = format!("pause {}\n", MAX_PAUSE_SECS + 1);
        assert!(matches!(
            request(beyond.as_bytes()).await,
            ClientRequest::BadPause(_)
        ));
        assert_eq!(
            request(b"pause 5 6\n").await,
            ClientRequest::Unknown("pause 5 6".into())
        );
        assert_eq!(
            request(b"resume now\n").await,
            ClientRequest::Unknown("resume now".into())
        );
    }

    #[test]
    fn a_work_status_from_an_older_peer_still_parses() {
        let old = br#"{"slots":2,"running":1,"queued":0,"completed":5,"submitters":1,"jobs":1}"#;
        let status: WorkStatus = serde_json::from_slice(old).expect("parses");
        assert!(status.suspended.is_empty());
        assert_eq!(status.pause_until_ms, None);
        let new = WorkStatus {
            suspended: vec![
                crate::suspend::Reason::PausedByUser,
                crate::suspend::Reason::TooHot,
            ],
            suspended_since_ms: Some(1),
            ..status
        };
        let json = serde_json::to_string(&new).expect("serialises");
        assert!(
            json.contains(r#""suspended":["paused_by_user","too_hot"]"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<WorkStatus>(&json).expect("parses"),
            new
        );
    }

    #[test]
    fn a_refusal_is_told_apart_from_a_bad_reply() {
        assert!(matches!(
            parse_reply(br#"{"error":"busy"}"#),
            Err(ControlError::Refused(reason)) if reason == "busy"
        ));
        assert!(matches!(
            parse_reply(b"not json"),
            Err(ControlError::BadReply(_))
        ));
    }
}
