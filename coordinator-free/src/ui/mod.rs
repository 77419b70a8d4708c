//! The local web page: a peer's state and why, its running units, what it gave over time, the
//! peers it knows, a pause and resume control, and the progress of the job it submits.
//!
//! Served by the peer itself over plain HTTP on a loopback address unless the volunteer asks
//! for another. Like a notebook server, it is protected by a token kept in the data directory
//! (`ui-token`, mode 0600): the address printed at start carries it once (`/?token=...`), the
//! page then keeps it in a cookie that only this origin sends (`SameSite=Strict`, `HttpOnly`),
//! and the page's script sends it as a bearer header on every call of the API, so a page on
//! another site can neither read the state nor press pause. On a loopback address the `Host`
//! header must name a loopback address or `localhost`, which turns away DNS rebinding.
//!
//! Routes: `GET /` (the page), `GET /ui.js`, `GET /ui.css`, `GET /api/state` (JSON),
//! `POST /api/pause[?secs=N]`, `POST /api/resume`.

mod http;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::control::{Given, MAX_PAUSE_SECS, PauseChange, PeerStatus, StatusReport, WorkStatus};
use crate::ledger::{Ledger, Totals};
use crate::node::NodeControl;
use http::{Request, Response};

/// The token's file in the data directory.
pub const TOKEN_FILE: &str = "ui-token";
/// The cookie the page keeps the token in.
const COOKIE: &str = "cf_ui_token";
/// Connections served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 16;
/// A connection that has not been answered in this time is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most peers listed in one answer; the count of all is given beside them.
pub const MAX_LISTED_PEERS: usize = 256;
/// Most days of the ledger sent for the chart.
pub const CHART_DAYS: usize = 60;

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("ui.js");
const STYLE: &str = include_str!("ui.css");

/// Why the page could not be served.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error(
        "the web page would be reachable from other machines at {0}; serve it on a loopback address (127.0.0.1:PORT) or allow that explicitly"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot serve the web page on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot keep the web page's token in {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A job's progress as the page shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JobView {
    pub name: String,
    pub id: String,
    pub units: u32,
    pub accepted: u32,
    pub failed: u32,
    pub running: u32,
    pub peers: u32,
    /// Units taken from the journal of an earlier run.
    pub restored: u32,
    /// Units decided in this run.
    pub decided_now: u32,
    pub elapsed_ms: u64,
    /// Distinct hosts that offered room, and how many a unit needs.
    pub hosts: u32,
    pub quorum: u32,
    /// Whether every unit is decided.
    pub finished: bool,
}

impl JobView {
    pub fn new(name: &str, id: &str, p: &crate::job::driver::JobProgress) -> Self {
        JobView {
            name: name.to_string(),
            id: id.to_string(),
            units: p.units,
            accepted: p.accepted,
            failed: p.failed,
            running: p.running,
            peers: p.peers,
            restored: p.restored,
            decided_now: p.decided_now,
            elapsed_ms: u64::try_from(p.elapsed.as_millis()).unwrap_or(u64::MAX),
            hosts: p.hosts,
            quorum: p.quorum,
            finished: p.accepted.saturating_add(p.failed) >= p.units,
        }
    }
}

/// What the page shows, and where it comes from.
#[derive(Debug, Clone)]
pub struct PageSource {
    pub node: NodeControl,
    /// The data directory whose ledger the chart draws; `None` draws none.
    pub data_dir: Option<PathBuf>,
    /// The job this peer submits, when it does.
    pub job: Option<watch::Receiver<Option<JobView>>>,
}

/// A bound page server, before it serves.
#[derive(Debug)]
pub struct Ui {
    listener: TcpListener,
    addr: SocketAddr,
    token: Arc<str>,
}

impl Ui {
    /// Binds `addr` (refusing an address other machines reach unless `remote` allows it) and
    /// takes the token of `dir`, making one the first time.
    pub async fn bind(addr: SocketAddr, remote: bool, dir: &Path) -> Result<Self, UiError> {
        if !addr.ip().is_loopback() && !remote {
            return Err(UiError::NotLoopback(addr));
        }
        let token = load_or_create_token(dir)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| UiError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| UiError::Bind { addr, source })?;
        Ok(Ui {
            listener,
            addr,
            token: token.into(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address to open, with the token: what the volunteer is told at start.
    pub fn url(&self) -> String {
        format!("http://{}/?token={}", self.addr, self.token)
    }

    /// Serves the page until the task is aborted.
    pub async fn serve(self, source: PageSource) {
        let server = Arc::new(Server {
            token: self.token,
            addr: self.addr,
            source,
        });
        let permits = Arc::new(Semaphore::new(MAX_CLIENTS));
        let mut clients = JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                            return;
                        };
                        let server = Arc::clone(&server);
                        clients.spawn(async move {
                            let _permit = permit;
                            if tokio::time::timeout(CLIENT_TIMEOUT, server.answer(stream))
                                .await
                                .is_err()
                            {
                                tracing::debug!("web page client timed out");
                            }
                        });
                    }
                    Err(err) => {
                        tracing::warn!(%err, "web page accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = clients.join_next(), if !clients.is_empty() => {}
            }
        }
    }
}

/// The token of data directory `dir`: read from [`TOKEN_FILE`], or made (32 random bytes, as
/// hex) and written there readable by its owner only.
pub fn load_or_create_token(dir: &Path) -> Result<String, UiError> {
    let path = dir.join(TOKEN_FILE);
    let err = |source| UiError::Token {
        path: path.clone(),
        source,
    };
    if let Ok(text) = std::fs::read_to_string(&path) {
        let token = text.trim();
        if token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(token.to_string());
        }
        tracing::warn!(path = %path.display(), "the web page's token file is damaged; making a new one");
    }
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| err(std::io::Error::other("no random source")))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!("{TOKEN_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(err)?;
    std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes()).map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(token)
}

/// Compares without stopping at the first difference, so timing tells nothing of the token.
fn same_token(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

struct Server {
    token: Arc<str>,
    addr: SocketAddr,
    source: PageSource,
}

/// The answer to `GET /api/state`.
#[derive(Debug, Serialize)]
struct State {
    status: StatusReport,
    /// Known peers in all; `status.peers` lists at most [`MAX_LISTED_PEERS`].
    peers_total: usize,
    given: Option<GivenView>,
    job: Option<JobView>,
}

/// The ledger as the chart draws it.
#[derive(Debug, Serialize)]
struct GivenView {
    /// The latest days, oldest first, at most [`CHART_DAYS`].
    days: Vec<(String, Totals)>,
    today: Totals,
    total: Totals,
}

#[derive(Debug, Serialize)]
struct ErrorReply {
    error: String,
}

impl Server {
    async fn answer(&self, mut stream: TcpStream) {
        let response = match http::read_request(&mut stream).await {
            Ok(request) => self.route(&request).await,
            Err(bad) => Response::text(bad.status(), bad.to_string()),
        };
        if let Err(err) = response.write(&mut stream).await {
            tracing::debug!(%err, "web page client went away");
        }
    }

    async fn route(&self, request: &Request) -> Response {
        if !self.host_allowed(request) {
            return Response::text(
                421,
                "this page answers only to the address it was opened at (127.0.0.1, [::1] or localhost)",
            );
        }
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/") => self.page(request),
            ("GET", "/ui.js") => Response::new(200, "text/javascript; charset=utf-8", SCRIPT),
            ("GET", "/ui.css") => Response::new(200, "text/css; charset=utf-8", STYLE),
            ("GET", "/api/state") => match self.authorised(request) {
                Ok(()) => self.state().await,
                Err(refusal) => refusal,
            },
            ("POST", "/api/pause" | "/api/resume") => match self.authorised(request) {
                Ok(()) => self.pause(request).await,
                Err(refusal) => refusal,
            },
            (_, "/" | "/ui.js" | "/ui.css" | "/api/state" | "/api/pause" | "/api/resume") => {
                Response::text(405, "method not allowed")
            }
            _ => Response::text(404, "not found"),
        }
    }

    /// On a loopback address, only requests that name a loopback host: a page elsewhere that
    /// points its own name at 127.0.0.1 (DNS rebinding) is turned away.
    fn host_allowed(&self, request: &Request) -> bool {
        if !self.addr.ip().is_loopback() {
            return true;
        }
        let Some(host) = request.host.as_deref() else {
            return false;
        };
        let name = match host.rsplit_once(':') {
            Some((name, port)) if !host.ends_with(']') => {
                if port != self.addr.port().to_string() {
                    return false;
                }
                name
            }
            _ => host,
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        name.eq_ignore_ascii_case("localhost")
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The page, with the token for its script, to a browser that has the token; a first visit
    /// with `?token=` gets the cookie and is sent on to `/`, so the token leaves the address bar.
    fn page(&self, request: &Request) -> Response {
        if let Some(given) = request.query("token") {
            if !same_token(given, &self.token) {
                return forbidden();
            }
            return Response::text(303, "").header("Location", "/").header(
                "Set-Cookie",
                format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", self.token),
            );
        }
        match request.cookie(COOKIE) {
            Some(given) if same_token(given, &self.token) => Response::new(
                200,
                "text/html; charset=utf-8",
                PAGE.replace("{{TOKEN}}", &self.token),
            )
            .header(
                "Content-Security-Policy",
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                 img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            _ => forbidden(),
        }
    }

    /// The API takes the token only as a bearer header, which a page on another site cannot
    /// send here without it; a browser that says the call comes from elsewhere is refused too.
    fn authorised(&self, request: &Request) -> Result<(), Response> {
        if let Some(site) = request.fetch_site.as_deref()
            && !matches!(site, "same-origin" | "none")
        {
            return Err(Response::text(403, "calls from other sites are refused"));
        }
        match request.bearer() {
            Some(given) if same_token(given, &self.token) => Ok(()),
            _ => Err(forbidden()),
        }
    }

    async fn state(&self) -> Response {
        let mut status = match self.source.node.status().await {
            Ok(status) => status,
            Err(err) => return error_reply(503, err.to_string()),
        };
        let peers_total = status.peers.len();
        status.peers = take_listed(std::mem::take(&mut status.peers));
        let given = match (self.source.data_dir.as_deref(), &status.work) {
            (Some(dir), Some(work)) => given_view(dir, work),
            _ => None,
        };
        let job = self
            .source
            .job
            .as_ref()
            .and_then(|job| job.borrow().clone());
        let state = State {
            status,
            peers_total,
            given,
            job,
        };
        match serde_json::to_vec(&state) {
            Ok(body) => Response::json(body),
            Err(err) => error_reply(503, err.to_string()),
        }
    }

    async fn pause(&self, request: &Request) -> Response {
        let change = if request.path == "/api/resume" {
            PauseChange::Resume
        } else {
            match request.query("secs") {
                None => PauseChange::Pause(None),
                Some(secs) => match secs.parse::<u64>() {
                    Ok(secs) if (1..=MAX_PAUSE_SECS).contains(&secs) => {
                        PauseChange::Pause(Some(Duration::from_secs(secs)))
                    }
                    _ => {
                        return error_reply(
                            400,
                            format!("a pause takes whole seconds from 1 to {MAX_PAUSE_SECS}"),
                        );
                    }
                },
            }
        };
        match self.source.node.pause(change).await {
            Ok(status) => match serde_json::to_vec(&status) {
                Ok(body) => Response::json(body),
                Err(err) => error_reply(503, err.to_string()),
            },
            Err(error) => error_reply(409, error),
        }
    }
}

fn forbidden() -> Response {
    Response::text(
        403,
        format!(
            "this page needs its token: open the address `worker run --ui` printed (with ?token=...), \
             or read the token from the file {TOKEN_FILE} in the peer's data directory"
        ),
    )
}

fn error_reply(status: u16, error: String) -> Response {
    let body = serde_json::to_vec(&ErrorReply { error }).unwrap_or_default();
    Response::new(status, "application/json", body)
}

/// The peers the page lists: connected ones first, at most [`MAX_LISTED_PEERS`].
fn take_listed(mut peers: Vec<PeerStatus>) -> Vec<PeerStatus> {
    peers.sort_by_key(|p| !p.connected);
    peers.truncate(MAX_LISTED_PEERS);
    peers
}

/// What the peer gave: today's and the total counts from the running peer (newer than its last
/// save of the ledger), the earlier days from the ledger of `dir`. A damaged ledger (which the
/// peer sets aside and starts over from) draws no chart rather than failing the page.
fn given_view(dir: &Path, work: &WorkStatus) -> Option<GivenView> {
    let ledger = Ledger::read(dir).ok()?;
    let totals = |g: &Given| Totals {
        unit_secs: g.unit_secs as f64,
        units_run: g.units_run,
        accepted: g.accepted,
        rejected: g.rejected,
    };
    let (today, total) = (totals(&work.given_today), totals(&work.given_total));
    let day = crate::ledger::today();
    let mut days: Vec<(String, Totals)> = ledger
        .days()
        .filter(|(d, _)| *d != day)
        .rev()
        .take(CHART_DAYS - 1)
        .map(|(d, t)| (d.to_string(), *t))
        .collect();
    days.reverse();
    if today.units_run > 0 {
        days.push((day, today));
    }
    Some(GivenView { days, today, total })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(addr: &str) -> Server {
        Server {
            token: "ab".repeat(32).into(),
            addr: addr.parse().expect("addr"),
            source: PageSource {
                node: NodeControl::stopped(),
                data_dir: None,
                job: None,
            },
        }
    }

    fn request(head: &str) -> Request {
        http::parse_head(head.as_bytes()).expect("parses")
    }

    /// The status `s` answers the request `head` with.
    async fn status_of(s: &Server, head: &str) -> u16 {
        s.route(&request(head)).await.status
    }

    #[test]
    fn only_loopback_host_names_reach_a_loopback_page() {
        let s = server("127.0.0.1:8123");
        for host in [
            "127.0.0.1:8123",
            "localhost:8123",
            "LOCALHOST:8123",
            "127.0.0.2:8123",
            "[::1]:8123",
            "localhost",
        ] {
            let r = request(&format!("GET / HTTP/1.1\r\nHost: {host}"));
            assert!(s.host_allowed(&r), "{host}");
        }
        for host in [
            "evil.example:8123",
            "127.0.0.1:9999",
            "10.0.0.1:8123",
            "localhost.evil.example:8123",
            "",
        ] {
            let r = request(&format!("GET / HTTP/1.1\r\nHost: {host}"));
            assert!(!s.host_allowed(&r), "{host}");
        }
        assert!(!s.host_allowed(&request("GET / HTTP/1.1")));
        // Served on another address by the volunteer's choice, the token alone guards it.
        let remote = server("192.0.2.1:8123");
        assert!(remote.host_allowed(&request("GET / HTTP/1.1\r\nHost: anything")));
    }

    #[tokio::test]
    async fn the_page_and_the_api_need_the_token() {
        let s = server("127.0.0.1:8123");
        let token = "ab".repeat(32);
        let host = "Host: 127.0.0.1:8123";
        let first = s
            .route(&request(&format!("GET /?token={token} HTTP/1.1\r\n{host}")))
            .await;
        assert_eq!(first.status, 303);
        assert!(first.headers.iter().any(|(n, v)| *n == "Set-Cookie"
            && v.contains(&token)
            && v.contains("HttpOnly")
            && v.contains("SameSite=Strict")));
        let short = "ab".repeat(31);
        assert_eq!(
            status_of(&s, &format!("GET /?token={short} HTTP/1.1\r\n{host}")).await,
            403
        );
        assert_eq!(
            status_of(&s, &format!("GET / HTTP/1.1\r\n{host}")).await,
            403
        );
        let page = s
            .route(&request(&format!(
                "GET / HTTP/1.1\r\n{host}\r\nCookie: {COOKIE}={token}"
            )))
            .await;
        assert_eq!(page.status, 200);
        assert!(String::from_utf8_lossy(&page.body).contains(&token));
        let bearer = format!("Authorization: Bearer {token}");
        for (head, expected) in [
            // The API does not take the cookie: only the header the page's own script sends.
            (
                format!("GET /api/state HTTP/1.1\r\n{host}\r\nCookie: {COOKIE}={token}"),
                403,
            ),
            (
                format!("POST /api/pause HTTP/1.1\r\n{host}\r\nCookie: {COOKIE}={token}"),
                403,
            ),
            (
                format!("POST /api/resume HTTP/1.1\r\n{host}\r\nAuthorization: Bearer nope"),
                403,
            ),
            (
                format!(
                    "POST /api/pause HTTP/1.1\r\n{host}\r\n{bearer}\r\nSec-Fetch-Site: cross-site"
                ),
                403,
            ),
            (
                format!("POST /api/pause?secs=0 HTTP/1.1\r\n{host}\r\n{bearer}"),
                400,
            ),
            (format!("DELETE /api/state HTTP/1.1\r\n{host}"), 405),
            (format!("GET /etc/passwd HTTP/1.1\r\n{host}"), 404),
            // The node behind this test server is gone: a clear error, not a hang or a panic.
            (
                format!("GET /api/state HTTP/1.1\r\n{host}\r\n{bearer}"),
                503,
            ),
        ] {
            assert_eq!(status_of(&s, &head).await, expected, "{head}");
        }
    }

    #[test]
    fn the_token_is_made_once_and_kept_private() {
        let dir = tempfile::tempdir().expect("dir");
        let token = load_or_create_token(dir.path()).expect("made");
        assert_eq!(token.len(), 64);
        assert_eq!(load_or_create_token(dir.path()).expect("read"), token);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
                .expect("file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join(TOKEN_FILE), "short").expect("damage");
        let new = load_or_create_token(dir.path()).expect("remade");
        assert_ne!(new, token);
        assert!(same_token(&new, &new.clone()));
        assert!(!same_token(&new[..63], &new));
    }

    #[test]
    fn the_chart_takes_earlier_days_from_the_ledger_and_today_from_the_peer() {
        let dir = tempfile::tempdir().expect("dir");
        let today = crate::ledger::today();
        let mut ledger = Ledger::open(dir.path());
        for day in 1..=70 {
            ledger.ran(
                &format!("2000-{:02}-{:02}", 1 + day / 28, 1 + day % 28),
                Duration::from_secs(day),
            );
        }
        // Saved before the last units: the file is behind the running peer.
        ledger.ran(&today, Duration::from_secs(5));
        ledger.save().expect("saved");
        let live = Given {
            unit_secs: 9,
            units_run: 3,
            accepted: 2,
            rejected: 0,
        };
        let work = WorkStatus {
            given_today: live,
            given_total: Given {
                units_run: 74,
                ..live
            },
            ..WorkStatus::default()
        };
        let view = given_view(dir.path(), &work).expect("a view");
        assert_eq!(view.days.len(), CHART_DAYS);
        let (last_day, last) = view.days.last().expect("today");
        assert_eq!((last_day.as_str(), last.units_run), (today.as_str(), 3));
        assert_eq!(view.today.unit_secs, 9.0);
        assert_eq!(view.total.units_run, 74);
        // The earliest days left are the latest of the ledger's, in order.
        assert!(view.days.windows(2).all(|w| w[0].0 < w[1].0));
        std::fs::write(dir.path().join(crate::ledger::LEDGER_FILE), "{not json").expect("damage");
        assert!(given_view(dir.path(), &work).is_none());
    }

    #[test]
    fn a_long_peer_list_is_cut_with_connected_peers_first() {
        let peer = |i: u8, connected| PeerStatus {
            id: crate::peer_id::PeerId::from_bytes([i; 32]),
            addrs: Vec::new(),
            cores_donated: 1,
            cores_free: 1,
            memory_mb: 1,
            profile: 1,
            seq: 1,
            connected,
            job: None,
            known_by: crate::control::KnownBy::Table,
        };
        let peers: Vec<PeerStatus> = (0..=255u8).chain(0..10).map(|i| peer(i, i == 9)).collect();
        let listed = take_listed(peers);
        assert_eq!(listed.len(), MAX_LISTED_PEERS);
        assert!(listed[0].connected && listed[1].connected);
    }
}
