//! Raw HTTP/1.1 over a `TcpStream`, for bytes an HTTP client refuses to send (invalid UTF-8 in
//! paths, broken request lines, lying `Content-Length`s) and for reading answers exactly as the
//! server wrote them.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// What came back on one connection.
#[derive(Debug)]
pub struct Reply {
    /// 0 when the server closed without a status line.
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub elapsed: Duration,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// `http://127.0.0.1:PORT` → `127.0.0.1:PORT`.
pub fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        b = &b[eol + 2..];
        if size == 0 || b.len() < size {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or(&[]);
    }
}

/// Parses a whole response (the server closed the connection after it).
pub fn parse(raw: &[u8], elapsed: Duration) -> Reply {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Reply {
            status: 0,
            headers: vec![],
            body: raw.to_vec(),
            elapsed,
        };
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    } else if let Some(n) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(n);
    }
    Reply {
        status,
        headers,
        body,
        elapsed,
    }
}

/// Sends `bytes` on a new connection and reads until the server closes it (or `limit` passes).
/// Write errors are ignored: a server may answer and close before reading everything.
pub fn send_within(addr: &str, bytes: &[u8], limit: Duration) -> Reply {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.set_write_timeout(Some(limit)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // One response per connection here: stop once it is complete.
                let r = parse(&out, t0.elapsed());
                if r.status != 0 && complete(&out, &r) {
                    return r;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    parse(&out, t0.elapsed())
}

fn complete(raw: &[u8], r: &Reply) -> bool {
    match r
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) => r.body.len() >= n,
        None => raw.ends_with(b"0\r\n\r\n"),
    }
}

pub fn send(addr: &str, bytes: &[u8]) -> Reply {
    send_within(addr, bytes, Duration::from_secs(15))
}

/// A request with `Host`, `Content-Length` and `Connection: close` added.
pub fn request(
    addr: &str,
    method: &str,
    path: &[u8],
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(path);
    req.extend_from_slice(format!(" HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n").as_bytes());
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if !headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    }) {
        req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    send(addr, &req)
}

/// `POST path` with a JSON content type.
pub fn post(addr: &str, path: &str, body: &[u8]) -> Reply {
    request(
        addr,
        "POST",
        path.as_bytes(),
        &[("Content-Type", "application/json")],
        body,
    )
}

/// Asserts an OpenAI error body (`error.message`, `type`, `param`, `code`) with a 4xx status,
/// answered within 10 s; returns the status.
pub fn assert_openai_4xx(r: &Reply, what: &str) -> u16 {
    assert!(
        (400..500).contains(&r.status),
        "{what}: status {} (want 4xx): {}",
        r.status,
        r.text()
    );
    assert_openai_error_body(r, what);
    r.status
}

/// Asserts the body is an OpenAI error and the answer came within 10 s.
pub fn assert_openai_error_body(r: &Reply, what: &str) {
    assert!(
        r.elapsed < Duration::from_secs(10),
        "{what}: took {:?}",
        r.elapsed
    );
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{what}: content type {:?}: {}",
        r.header("content-type"),
        r.text()
    );
    let v = r
        .json()
        .unwrap_or_else(|| panic!("{what}: body is not JSON: {:?}", r.text()));
    let e = &v["error"];
    assert!(
        e["message"].is_string() && e["type"].is_string(),
        "{what}: not an OpenAI error: {v}"
    );
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{what}: missing param/code: {v}"
    );
}
