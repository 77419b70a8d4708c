//! Just enough HTTP/1.1 for the local page: one request per connection, no body, a bounded
//! head, answers that close the connection.
//!
//! A browser is the only client meant to reach it, but anything on the machine (or, with a
//! remote address, the network) can connect, so every byte of the request is checked and
//! capped before it is used.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest request head (request line and headers) read.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// Most headers looked at.
const MAX_HEADERS: usize = 64;

/// A request as far as the page needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub method: String,
    /// The path, without its query.
    pub path: String,
    /// `name=value` pairs of the query, undecoded (the page's values need no decoding).
    pub query: Vec<(String, String)>,
    pub host: Option<String>,
    pub cookie: Option<String>,
    pub authorization: Option<String>,
    /// What `Sec-Fetch-Site` says, when the browser sends it.
    pub fetch_site: Option<String>,
}

impl Request {
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of cookie `name`, if the request carries it.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookie.as_deref()?.split(';').find_map(|pair| {
            let (n, v) = pair.trim().split_once('=')?;
            (n == name).then_some(v)
        })
    }

    /// The token of an `Authorization: Bearer TOKEN` header.
    pub fn bearer(&self) -> Option<&str> {
        let value = self.authorization.as_deref()?.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }
}

/// Why a request was not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum BadRequest {
    #[error("the request head is longer than {MAX_HEAD} bytes")]
    TooLong,
    #[error("the connection closed before the request was complete")]
    Truncated,
    #[error("the request is not HTTP/1.x: {0}")]
    Malformed(&'static str),
    #[error("a request to this page has no body")]
    HasBody,
}

impl BadRequest {
    pub fn status(&self) -> u16 {
        match self {
            BadRequest::TooLong => 431,
            BadRequest::HasBody => 413,
            BadRequest::Truncated | BadRequest::Malformed(_) => 400,
        }
    }
}

/// Reads one request head, at most [`MAX_HEAD`] bytes.
pub(crate) async fn read_request(
    reader: &mut (impl AsyncRead + Unpin),
) -> Result<Request, BadRequest> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = find_end(&head) {
            head.truncate(end);
            break;
        }
        if head.len() >= MAX_HEAD {
            return Err(BadRequest::TooLong);
        }
        let want = buf.len().min(MAX_HEAD + 4 - head.len());
        let n = reader
            .read(&mut buf[..want])
            .await
            .map_err(|_| BadRequest::Truncated)?;
        if n == 0 {
            return Err(BadRequest::Truncated);
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_head(&head)
}

/// Where the blank line that ends the head starts, if it has arrived.
fn find_end(head: &[u8]) -> Option<usize> {
    head.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .filter(|&end| end <= MAX_HEAD)
}

pub(crate) fn parse_head(head: &[u8]) -> Result<Request, BadRequest> {
    let text = std::str::from_utf8(head).map_err(|_| BadRequest::Malformed("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines
        .next()
        .ok_or(BadRequest::Malformed("no request line"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest::Malformed("request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(BadRequest::Malformed("version"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(BadRequest::Malformed("method"));
    }
    if !target.starts_with('/') {
        return Err(BadRequest::Malformed("target"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .take(MAX_HEADERS)
        .map(|pair| {
            let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
            (n.to_string(), v.to_string())
        })
        .collect();
    let mut request = Request {
        method: method.to_string(),
        path: path.to_string(),
        query,
        host: None,
        cookie: None,
        authorization: None,
        fetch_site: None,
    };
    for (i, line) in lines.enumerate() {
        if i >= MAX_HEADERS {
            return Err(BadRequest::TooLong);
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(BadRequest::Malformed("header"))?;
        let value = value.trim().to_string();
        match name.to_ascii_lowercase().as_str() {
            "host" => request.host = Some(value),
            "cookie" => request.cookie = Some(value),
            "authorization" => request.authorization = Some(value),
            "sec-fetch-site" => request.fetch_site = Some(value),
            "content-length" if value != "0" => return Err(BadRequest::HasBody),
            "transfer-encoding" => return Err(BadRequest::HasBody),
            _ => {}
        }
    }
    Ok(request)
}

/// An answer: status, content type, extra headers and body.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response::new(status, "text/plain; charset=utf-8", body.into())
    }

    pub fn json(body: Vec<u8>) -> Self {
        Response::new(200, "application/json", body)
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub async fn write(&self, writer: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
             Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
             Referrer-Policy: no-referrer\r\nX-Frame-Options: DENY\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        writer.write_all(head.as_bytes()).await?;
        writer.write_all(&self.body).await?;
        writer.shutdown().await
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        303 => "See Other",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> Result<Request, BadRequest> {
        let mut reader = bytes;
        read_request(&mut reader).await
    }

    #[tokio::test]
    async fn a_browser_request_is_read_with_what_the_page_needs() {
        let request = read(
            b"GET /api/state?x=1&secs=60 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\
              Authorization: Bearer abc\r\nCookie: a=b; cf_ui=tok\r\nSec-Fetch-Site: same-origin\r\n\r\n",
        )
        .await
        .expect("reads");
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/api/state");
        assert_eq!(request.query("secs"), Some("60"));
        assert_eq!(request.query("y"), None);
        assert_eq!(request.host.as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(request.bearer(), Some("abc"));
        assert_eq!(request.cookie("cf_ui"), Some("tok"));
        assert_eq!(request.cookie("c"), None);
        assert_eq!(request.fetch_site.as_deref(), Some("same-origin"));
    }

    #[tokio::test]
    async fn hostile_heads_are_refused_without_reading_past_the_cap() {
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD + 10));
        assert_eq!(read(long.as_bytes()).await, Err(BadRequest::TooLong));
        let endless = "a".repeat(MAX_HEAD * 4);
        assert_eq!(read(endless.as_bytes()).await, Err(BadRequest::TooLong));
        assert_eq!(
            read(b"GET / HTTP/1.1\r\n").await,
            Err(BadRequest::Truncated)
        );
        assert_eq!(read(b"").await, Err(BadRequest::Truncated));
        let many: String = (0..100).map(|i| format!("H{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(read(many.as_bytes()).await, Err(BadRequest::TooLong));
        for bad in [
            &b"GET / HTTP/2\r\n\r\n"[..],
            b"get / HTTP/1.1\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(read(bad).await, Err(BadRequest::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            read(b"POST /api/pause HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").await,
            Err(BadRequest::HasBody)
        );
        assert_eq!(
            read(b"POST /api/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").await,
            Err(BadRequest::HasBody)
        );
        assert!(
            read(b"POST /api/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
                .await
                .is_ok()
        );
    }

    #[test]
    fn a_bearer_token_needs_its_scheme() {
        let mut request = parse_head(b"GET / HTTP/1.1\r\nAuthorization: Basic abc").expect("ok");
        assert_eq!(request.bearer(), None);
        request.authorization = Some("bearer  xyz ".into());
        assert_eq!(request.bearer(), Some("xyz"));
    }
}
