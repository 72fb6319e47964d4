//! The `/metrics` endpoint: a small HTTP/1.x responder on tokio's
//! TcpListener. It answers GET and HEAD of one path, so a web framework
//! would bring far more than it serves here.
//!
//! A client cannot stall the agent: each connection is its own task, the
//! request head is bounded in size and in time, at most
//! [`MAX_CONNECTIONS`] are served at once, and every connection is closed
//! after one response. The snapshot comes from the agent's loop over a
//! channel ([`Scrape`]); rendering happens here, outside the loop.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
    time::timeout,
};

use crate::report::metrics::{self, Snapshot};

/// The largest request head read; Prometheus sends a few hundred bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the agent's loop has to answer a scrape (it may be draining a
/// burst of events).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_CONNECTIONS: usize = 16;

/// A scrape asked of the agent's loop, answered with a snapshot.
pub struct Scrape {
    pub reply: oneshot::Sender<Snapshot>,
}

/// Binds `addr` and serves it on a task of its own. Returns the address
/// bound (port 0 picks one) and the scrapes the agent's loop must answer.
pub async fn serve(addr: SocketAddr) -> std::io::Result<(SocketAddr, mpsc::Receiver<Scrape>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let (scrapes, requests) = mpsc::channel(MAX_CONNECTIONS);
    tokio::spawn(accept_loop(listener, scrapes));
    Ok((local, requests))
}

async fn accept_loop(listener: TcpListener, scrapes: mpsc::Sender<Scrape>) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // EMFILE and kin: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let open = Arc::clone(&open);
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            serve_connection(stream, &scrapes).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn serve_connection(mut stream: TcpStream, scrapes: &mpsc::Sender<Scrape>) {
    let response = match timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::error(408, "Request Timeout"),
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::TooLarge)) => Response::error(431, "Request Header Fields Too Large"),
        Ok(Ok(head)) => match parse_request(&head) {
            Err(response) => response,
            Ok(request) => scrape(request, scrapes).await,
        },
    };
    let _ = timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response.bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

enum HeadError {
    /// The client closed (or failed) before a whole head arrived.
    Closed,
    TooLarge,
}

/// Reads up to the blank line that ends the request head.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head) {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| bytes.windows(2).position(|w| w == b"\n\n"))
}

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// HEAD: the headers of a GET, no body.
    pub head_only: bool,
    /// The client accepts OpenMetrics (Prometheus does).
    pub openmetrics: bool,
}

/// Parses a request head; anything but GET or HEAD of /metrics is an
/// error response.
pub fn parse_request(head: &[u8]) -> Result<Request, Response> {
    let bad = || Response::error(400, "Bad Request");
    let text = std::str::from_utf8(head).map_err(|_| bad())?;
    let mut lines = text.lines();
    let mut request_line = lines.next().ok_or_else(bad)?.split(' ');
    let (Some(method), Some(target), Some(version), None) = (
        request_line.next(),
        request_line.next(),
        request_line.next(),
        request_line.next(),
    ) else {
        return Err(bad());
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Response::error(505, "HTTP Version Not Supported"));
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(Response::error(405, "Method Not Allowed")),
    };
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return Err(Response::error(404, "Not Found"));
    }
    let mut openmetrics = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad());
        };
        if name.trim().eq_ignore_ascii_case("accept") {
            openmetrics |= value.contains("application/openmetrics-text");
        }
    }
    Ok(Request {
        head_only,
        openmetrics,
    })
}

async fn scrape(request: Request, scrapes: &mpsc::Sender<Scrape>) -> Response {
    let unavailable = || Response::error(503, "Service Unavailable");
    let (reply, answer) = oneshot::channel();
    if scrapes.send(Scrape { reply }).await.is_err() {
        return unavailable();
    }
    let Ok(Ok(snapshot)) = timeout(SCRAPE_TIMEOUT, answer).await else {
        return unavailable();
    };
    match metrics::render(snapshot, request.openmetrics) {
        Ok(body) => Response {
            status: 200,
            reason: "OK",
            content_type: metrics::content_type(request.openmetrics),
            body,
            head_only: request.head_only,
        },
        Err(_) => Response::error(500, "Internal Server Error"),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    head_only: bool,
}

impl Response {
    fn error(status: u16, reason: &'static str) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: format!("{status} {reason}\n"),
            head_only: false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(head: &str) -> u16 {
        match parse_request(head.as_bytes()) {
            Ok(_) => 200,
            Err(response) => response.status,
        }
    }

    #[test]
    fn requests_and_their_answers() {
        for (head, expected) in [
            ("GET /metrics HTTP/1.1\r\nHost: x\r\n", 200),
            ("GET /metrics?x=1 HTTP/1.0", 200),
            ("HEAD /metrics HTTP/1.1", 200),
            ("GET / HTTP/1.1", 404),
            ("GET /metricsx HTTP/1.1", 404),
            ("POST /metrics HTTP/1.1", 405),
            ("GET /metrics HTTP/2", 505),
            ("GET /metrics", 400),
            ("GET  /metrics HTTP/1.1", 400),
            ("", 400),
            ("GET /metrics HTTP/1.1\r\nno colon here", 400),
            ("\u{0}\u{1}\u{2}", 400),
        ] {
            assert_eq!(status(head), expected, "{head:?}");
        }
        assert_eq!(status_of_bytes(&[0xff, 0xfe, b'\n']), 400);
    }

    fn status_of_bytes(head: &[u8]) -> u16 {
        parse_request(head).map_or_else(|r| r.status, |_| 200)
    }

    #[test]
    fn openmetrics_only_when_asked() {
        let prometheus = "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n";
        assert!(parse_request(prometheus.as_bytes()).unwrap().openmetrics);
        let curl = "GET /metrics HTTP/1.1\r\naccept: */*\r\n";
        assert!(!parse_request(curl.as_bytes()).unwrap().openmetrics);
    }

    #[test]
    fn head_has_no_body_but_its_length() {
        let mut response = Response::error(404, "Not Found");
        response.head_only = true;
        let text = String::from_utf8(response.bytes()).unwrap();
        assert!(
            text.ends_with("Content-Length: 14\r\nConnection: close\r\n\r\n"),
            "{text}"
        );
    }

    #[test]
    fn head_end_found_with_either_line_ending() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
