//! A plain HTTP/1.0 client for the metrics tests (the agent's endpoint and
//! Prometheus's API), and lookups in the text exposition format.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `request` as is and returns the status and body of the answer.
/// HTTP/1.0 keeps the answer simple: no chunks, closed at its end.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(request)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no end of head in {answer:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, body.to_owned()))
}

pub fn get(addr: SocketAddr, target: &str) -> (u16, String) {
    let request = format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    exchange(addr, request.as_bytes()).unwrap_or_else(|e| panic!("GET http://{addr}{target}: {e}"))
}

/// The address the agent said it serves metrics on.
pub fn metrics_addr(startup: &str) -> SocketAddr {
    startup
        .lines()
        .find_map(|line| {
            line.strip_prefix("backlog-agent: metrics: serving http://")?
                .strip_suffix("/metrics")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no metrics address at start-up:\n{startup}"))
}

/// The value of the sample of `name` whose labels include all of
/// `labels` (a lookup, not a validation: the unit tests parse strictly).
pub fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if !all {
            return None;
        }
        rest.rsplit(' ').next()?.parse().ok()
    })
}

/// Percent-encodes a URL query value.
pub fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `probe` every 100 ms until it returns Some, or panics after
/// `timeout` with what `describe` says about the last attempt.
pub fn poll<T>(
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
    describe: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "not there after {timeout:?}: {}",
            describe()
        );
        thread::sleep(Duration::from_millis(100));
    }
}
