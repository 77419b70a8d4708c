//! The worker's local web page, served by a real `worker run`: its API refuses callers without
//! the token, and in a real headless browser (Debian's `chromium`) the page shows the peer's
//! state, its pause button pauses the peer and its resume button resumes it. A screenshot of
//! the paused page is kept in `target/test-artifacts/`.
//!
//! Without a browser the browser test says it was skipped, unless `CF_REQUIRE_BROWSER` is set
//! (as the landing check sets it, after installing one): then a missing browser fails it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{reasons, start_peer_reading, status, wait_for, write_config};
use serde_json::{Value, json};

/// Samples per unit of the pi job: a second or two of one core.
const SAMPLES: u64 = 500_000_000;

/// Starts a peer whose config file asks for the page on a free loopback port; returns the peer,
/// its data directory and the page's address with its token.
fn peer_with_page(root: &Path, listen: &str) -> (common::Peer, PathBuf, String) {
    // The page comes from the config file's key, as a volunteer would set it.
    write_config(root, "ui = \"127.0.21.1:0\"\n");
    let (peer, lines) = start_peer_reading(root, "w", None, listen, 1);
    let url = lines[0]
        .trim()
        .strip_prefix("web page at ")
        .unwrap_or_else(|| panic!("the page's address is printed: {lines:?}"))
        .to_string();
    (peer, root.join("w"), url)
}

/// The host and port of a page address `http://HOST:PORT/?token=T`, and its token.
fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("http address");
    let (host, query) = rest.split_once("/?token=").expect("a token in the address");
    (host.to_string(), query.to_string())
}

/// One raw HTTP request; the status code and body of the answer.
fn http(host: &str, head: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(host).expect("the page accepts connections");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP answer: {answer}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn the_pages_api_needs_its_token_and_its_pause_reaches_the_peer() {
    let root = tempfile::tempdir().unwrap();
    let (peer, dir, url) = peer_with_page(root.path(), "127.0.21.2:0");
    let (host, token) = split_url(&url);
    assert_eq!(
        std::fs::read_to_string(dir.join("ui-token"))
            .unwrap()
            .trim(),
        token,
        "the token is the one kept in the data directory"
    );
    let get = |path: &str, extra: &str| {
        http(
            &host,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n"),
        )
    };
    let post = |path: &str, extra: &str| {
        http(
            &host,
            &format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n{extra}\r\n"),
        )
    };
    let bearer = format!("Authorization: Bearer {token}\r\n");
    assert_eq!(get("/", "").0, 403);
    assert_eq!(get("/api/state", "").0, 403);
    assert_eq!(post("/api/pause", "Authorization: Bearer 00\r\n").0, 403);
    // DNS rebinding: a page whose own name now points here is turned away.
    let rebound = http(
        &host,
        &format!(
            "GET /api/state HTTP/1.1\r\nHost: attacker.example:{}\r\n{bearer}\r\n",
            host.rsplit(':').next().unwrap()
        ),
    );
    assert_eq!(rebound.0, 421);

    let (code, body) = get("/api/state", &bearer);
    assert_eq!(code, 200, "{body}");
    let state: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["status"]["id"], peer.id.as_str());
    assert_eq!(state["status"]["work"]["suspended"], json!([]));
    assert!(state["given"]["total"].is_object(), "{state}");

    let (code, body) = post("/api/pause?secs=3600", &bearer);
    assert_eq!(code, 200, "{body}");
    assert_eq!(reasons(&dir), ["paused_by_user"]);
    assert!(status(&dir)["work"]["pause_until_ms"].is_u64());
    let (code, body) = post("/api/resume", &bearer);
    assert_eq!(code, 200, "{body}");
    assert!(reasons(&dir).is_empty());
}

/// A browser to drive: Debian's `chromium`, or another Chromium by a common name.
fn browser() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|path| path.is_file())
            })
        })
}

/// A headless browser with its DevTools endpoint, killed when dropped.
struct Browser {
    child: Child,
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// A page open in the browser: its DevTools session.
struct Tab(String);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts the browser.
    fn start(program: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(program)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1100,1400",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the browser starts");
        // The browser writes its DevTools port and path here once it listens.
        let active = profile.path().join("DevToolsActivePort");
        let mut endpoint = None;
        wait_for(
            Duration::from_secs(60),
            "the browser's DevTools port",
            || {
                let text = std::fs::read_to_string(&active).unwrap_or_default();
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    endpoint = Some(format!("ws://127.0.0.1:{port}{path}"));
                }
                endpoint.is_some()
            },
        );
        let endpoint = endpoint.unwrap();
        let port = endpoint
            .trim_start_matches("ws://127.0.0.1:")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let stream = TcpStream::connect(format!("127.0.0.1:{port}")).expect("DevTools accepts");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (socket, _) = tungstenite::client(endpoint.as_str(), stream).expect("a WebSocket");
        Browser {
            child,
            socket,
            next_id: 0,
            _profile: profile,
        }
    }

    /// Opens `url` in a new page.
    fn open(&mut self, url: &str) -> Tab {
        let target = self.call(None, "Target.createTarget", json!({ "url": url }));
        let target = target["targetId"].as_str().expect("a target").to_string();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        Tab(attached["sessionId"]
            .as_str()
            .expect("a session")
            .to_string())
    }

    /// Sends one DevTools command (to the browser, or to a page) and waits for its answer.
    fn call(&mut self, tab: Option<&Tab>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(tab) = tab {
            message["sessionId"] = json!(tab.0);
        }
        self.socket
            .send(tungstenite::Message::text(message.to_string()))
            .expect("DevTools takes the command");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "no answer to {method}");
            let tungstenite::Message::Text(text) = self.socket.read().expect("DevTools answers")
            else {
                continue;
            };
            let answer: Value = serde_json::from_str(text.as_str()).unwrap();
            // Events come in between; the answer carries the command's id.
            if answer["id"] == json!(id) {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in a page.
    fn eval(&mut self, tab: &Tab, expression: &str) -> Value {
        let result = self.call(
            Some(tab),
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        result["result"]["value"].clone()
    }

    /// The page's state word and the reason line under it.
    fn state(&mut self, tab: &Tab) -> (String, String) {
        let value = self.eval(
            tab,
            "JSON.stringify([document.getElementById('state')?.dataset.state ?? '', \
             document.getElementById('reason')?.textContent ?? ''])",
        );
        let pair: Vec<String> = serde_json::from_str(value.as_str().unwrap_or("[]")).unwrap();
        match pair.as_slice() {
            [state, reason] => (state.clone(), reason.clone()),
            _ => (String::new(), String::new()),
        }
    }

    fn screenshot(&mut self, tab: &Tab, path: &Path) {
        let shot = self.call(
            Some(tab),
            "Page.captureScreenshot",
            json!({ "format": "png" }),
        );
        let png = base64_decode(shot["data"].as_str().expect("image data"));
        assert!(png.starts_with(b"\x89PNG"), "a PNG image");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// Standard base64 with padding, as DevTools sends images.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= u32::from(value(c)) << (18 - 6 * i);
        }
        let [_, a, b, c] = acc.to_be_bytes();
        out.extend_from_slice(&[a, b, c][..chunk.len() - 1]);
    }
    out
}

#[test]
fn in_a_real_browser_the_page_shows_the_state_and_its_buttons_pause_and_resume_the_peer() {
    let Some(program) = browser() else {
        assert!(
            std::env::var_os("CF_REQUIRE_BROWSER").is_none(),
            "CF_REQUIRE_BROWSER is set but no chromium is installed"
        );
        eprintln!("skipped: no chromium to drive (apt-get install chromium)");
        return;
    };
    assert_eq!(base64_decode("aGVsbG8gd29ybGQ="), b"hello world");
    let root = tempfile::tempdir().unwrap();
    let (peer, dir, url) = peer_with_page(root.path(), "127.0.21.3:0");
    let mut browser = Browser::start(&program);
    let page = browser.open(&url);

    // The first visit trades the token in the address for a cookie; the page then polls.
    let mut seen = (String::new(), String::new());
    wait_for(
        Duration::from_secs(30),
        "the page shows the peer waiting for work",
        || {
            seen = browser.state(&page);
            seen.0 == "waiting"
        },
    );
    assert!(seen.1.contains("slots free"), "{seen:?}");
    assert_eq!(
        browser.eval(&page, "document.getElementById('peer-id').textContent"),
        json!(peer.id)
    );
    assert_eq!(
        browser.eval(&page, "location.search"),
        json!(""),
        "the token has left the address bar"
    );

    // A job of three units of a second or two each, submitted through the peer, with a page
    // of its own.
    let manifest = root.path().join("pi.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"pi\"\nmodule = {:?}\n[inputs.sweep]\nseed = {{ start = 1, stop = 3, step = 1 }}\nsamples = {SAMPLES}\n[redundancy]\nreplicas = 1\n",
            example_artifacts::PI
        ),
    )
    .unwrap();
    let submit = common::spawn_submit_with(
        root.path(),
        &manifest,
        &peer,
        "submit",
        &["--listen", "127.0.21.4:0", "--ui", "127.0.21.4:0"],
    );
    let mut submit = KilledOnDrop(Some(submit));
    wait_for(
        Duration::from_secs(60),
        "the page lists a running unit",
        || {
            browser.state(&page).0 == "working"
                && browser.eval(&page, "document.querySelectorAll('#units tbody tr').length")
                    == json!(1)
        },
    );
    // The row names the job as its submitter called it.
    let job_cell = browser.eval(
        &page,
        "document.querySelector('#units tbody tr').cells[1].textContent",
    );
    assert!(
        job_cell.as_str().is_some_and(|t| t.starts_with("pi (")),
        "job cell: {job_cell}"
    );

    browser.eval(&page, "document.getElementById('pause').click()");
    wait_for(
        Duration::from_secs(10),
        "the peer paused by the page",
        || reasons(&dir) == ["paused_by_user"],
    );
    wait_for(Duration::from_secs(10), "the page shows the pause", || {
        seen = browser.state(&page);
        seen.0 == "suspended" && seen.1.contains("paused by user")
    });
    assert_eq!(
        browser.eval(&page, "document.getElementById('resume').disabled"),
        json!(false)
    );
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../test-artifacts");
    browser.screenshot(&page, &artifacts.join("worker-page-paused.png"));

    // The submitter's page shows its job, stalled on the paused peer.
    let mut job_url = String::new();
    wait_for(
        Duration::from_secs(20),
        "the submitter's page address",
        || {
            let err =
                std::fs::read_to_string(root.path().join("submit.stderr")).unwrap_or_default();
            job_url = err
                .lines()
                .find_map(|l| l.strip_prefix("web page at "))
                .unwrap_or_default()
                .to_string();
            !job_url.is_empty()
        },
    );
    let job_page = browser.open(&job_url);
    let mut line = Value::Null;
    wait_for(
        Duration::from_secs(20),
        "the job's progress on its page",
        || {
            line = browser.eval(&job_page, "document.getElementById('job-line').textContent");
            line.as_str()
                .is_some_and(|l| l.contains(" of 3 units decided"))
        },
    );
    assert_eq!(
        browser.eval(&job_page, "document.getElementById('job-box').hidden"),
        json!(false)
    );
    assert_eq!(
        browser.eval(
            &job_page,
            "document.getElementById('job-name').textContent.startsWith('pi (')"
        ),
        json!(true)
    );
    browser.screenshot(&job_page, &artifacts.join("submitter-page.png"));

    browser.eval(&page, "document.getElementById('resume').click()");
    wait_for(
        Duration::from_secs(10),
        "the peer resumed by the page",
        || reasons(&dir).is_empty(),
    );
    let run = common::finish(
        submit.0.take().unwrap(),
        root.path(),
        "submit",
        Duration::from_secs(120),
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let results = std::fs::read_to_string(root.path().join("out-pi/results.jsonl")).unwrap();
    assert_eq!(results.matches("\"accepted\"").count(), 3, "{results}");
    wait_for(
        Duration::from_secs(10),
        "the page shows the units given",
        || {
            browser
                .eval(&page, "document.getElementById('given-today').textContent")
                .as_str()
                .is_some_and(|t| t.contains(" 3 units run"))
        },
    );
}

/// A process the test has not waited for yet, killed if the test fails first.
struct KilledOnDrop(Option<Child>);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
