//! The connection layer of `loraplex serve` against the real binary on the tiny model: idle
//! sockets and a slow-header client do not stop normal requests and are closed by their
//! timeouts; the connection cap answers 503 beyond it and recovers; streams outlive every
//! timeout; a slow body gets 408; a client that leaves is counted `cancelled`; a full queue
//! answers 429 with a measured `Retry-After`.

mod common;

use common::raw::{self, assert_openai_error_body};
use common::server::Server;
use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn serve(extra: &[&str]) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf_with(&model, "smollm", true, Some(TINY_CHAT_TEMPLATE));
    let adapters = dir.path().join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--adapters-dir",
        adapters.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    (dir, server)
}

/// A small completion on a fresh connection (a pooled one may have been closed as idle).
fn normal_request(server: &Server) -> Duration {
    let body = json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0});
    let r = raw::post(
        &raw::addr_of(&server.url),
        "/v1/completions",
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .json()
        .is_some_and(|v| v["choices"][0]["text"].is_string()));
    r.elapsed
}

/// Waits until the server closes `s` (EOF or reset); `None` if it stays open past `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1024];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
    None
}

#[test]
fn idle_sockets_and_a_slow_header_client_do_not_stop_requests_and_are_closed() {
    let (_d, server) = serve(&["--header-read-timeout", "1", "--keep-alive-timeout", "3"]);
    let addr = raw::addr_of(&server.url);
    let mut idle: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    // A client that sends its head one byte every 200 ms: it would take 6 s.
    let slow_addr = addr.clone();
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&slow_addr).unwrap();
        let head = format!("GET /health HTTP/1.1\r\nHost: {slow_addr}\r\nX-Slow: aaaa\r\n\r\n");
        let t0 = Instant::now();
        for b in head.bytes() {
            if s.write_all(&[b]).is_err() {
                return (t0.elapsed(), true);
            }
            std::thread::sleep(Duration::from_millis(200));
            // Closed by the server? (A read of 0 bytes.)
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 64];
            let gone = matches!(s.read(&mut buf), Ok(0));
            s.set_nonblocking(false).unwrap();
            if gone {
                return (t0.elapsed(), true);
            }
        }
        (t0.elapsed(), false)
    });
    // Meanwhile normal requests are answered promptly.
    for _ in 0..5 {
        let took = normal_request(&server);
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    let (took, closed) = slow.join().unwrap();
    assert!(closed, "the slow client sent its whole head ({took:?})");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "slow client closed after {took:?} (header timeout 1 s)"
    );
    // The idle sockets are closed by the keep-alive timeout (3 s after they opened).
    for s in idle.iter_mut() {
        assert!(
            closed_within(s, Duration::from_secs(8)).is_some(),
            "idle socket still open"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let timed_out = server.metric("loraplex_timed_out_connections_total");
    assert!(timed_out >= 500.0, "{timed_out}");
    assert!(server.metric("loraplex_open_connections") <= 5.0);
    normal_request(&server);
}

#[test]
fn the_connection_cap_answers_503_beyond_it_and_recovers() {
    let (_d, server) = serve(&["--max-connections", "8", "--keep-alive-timeout", "2"]);
    let addr = raw::addr_of(&server.url);
    normal_request(&server);
    std::thread::sleep(Duration::from_millis(200));
    let _idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let r = raw::request(&addr, "GET", b"/health", &[], b"");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_openai_error_body(&r, "over the cap");
    assert_eq!(r.header("retry-after"), Some("1"));
    // The idle ones time out; then requests are served again.
    std::thread::sleep(Duration::from_millis(2500));
    normal_request(&server);
    assert!(server.metric("loraplex_refused_connections_total") >= 1.0);
}

#[test]
fn a_stream_outlives_every_timeout_and_a_slow_body_gets_408() {
    let (_d, server) = serve(&[
        "--header-read-timeout",
        "0.5",
        "--keep-alive-timeout",
        "0.5",
        "--body-read-timeout",
        "0.5",
    ]);
    let addr = raw::addr_of(&server.url);
    let body = json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 200, "temperature": 0,
                      "ignore_eos": true, "stream": true})
    .to_string();
    let mut sock = TcpStream::connect(&addr).unwrap();
    write!(sock, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut reader = BufReader::new(sock.try_clone().unwrap());
    let t0 = Instant::now();
    let (mut chunks, mut done, mut finished) = (0, false, false);
    let mut line = String::new();
    while !done {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream cut");
        if line.starts_with("data:") {
            chunks += 1;
            done = line.contains("[DONE]");
            finished |= line.contains("\"finish_reason\":\"length\"");
            // A slow reader: the stream lasts several times every timeout.
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    assert!(
        t0.elapsed() > Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        chunks >= 40 && finished,
        "{chunks} chunks, finished: {finished}"
    );
    // A body that stops arriving: 408 after the body timeout, in the OpenAI shape.
    let head = format!("POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\"");
    let r = raw::send(&addr, head.as_bytes());
    assert_eq!(r.status, 408, "{}", r.text());
    assert_openai_error_body(&r, "slow body");
    assert!(r.elapsed < Duration::from_secs(3), "{:?}", r.elapsed);
    // Keep-alive: two requests on one connection.
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for _ in 0..2 {
        write!(s, "GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.contains(" 200 "), "{status}");
        let mut len = 0;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if h == "\r\n" {
                break;
            }
        }
        let mut b = vec![0u8; len];
        reader.read_exact(&mut b).unwrap();
    }
}

/// `n` long greedy requests that keep a one-sequence engine busy.
fn filler(n: usize) -> serde_json::Value {
    json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 240, "temperature": 0,
           "ignore_eos": true, "n": n})
}

#[test]
fn a_client_that_leaves_is_counted_cancelled_and_429_carries_a_measured_retry_after() {
    let (_d, server) = serve(&["--max-batch-size", "1", "--max-waiting", "256"]);
    let addr = raw::addr_of(&server.url);
    let t0 = Instant::now();
    assert_eq!(server.post("/v1/completions", &filler(1)).0, 200);
    let one = t0.elapsed();
    // Enough work ahead of the request that leaves for it to be still waiting when it does.
    let busy = (Duration::from_secs(3).as_secs_f64() / one.as_secs_f64()).ceil() as usize;
    let jobs = busy.div_ceil(8).clamp(1, 16);
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| assert_eq!(server.post("/v1/completions", &filler(8)).0, 200));
        }
        std::thread::sleep(Duration::from_millis(300));
        let body = filler(1).to_string();
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(s, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(10);
        let label = "loraplex_requests_total{adapter=\"base\",status=\"cancelled\"}";
        while server.metric(label) < 1.0 {
            assert!(
                Instant::now() < deadline,
                "the departed request was not counted"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    // A full queue: 429 with a Retry-After derived from the measured rate, within 1..=60 s.
    let (_d2, small) = serve(&["--max-batch-size", "1", "--max-waiting", "1"]);
    let small_addr = raw::addr_of(&small.url);
    assert_eq!(small.post("/v1/completions", &filler(1)).0, 200);
    let body = filler(2).to_string();
    let replies: Vec<raw::Reply> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..6)
            .map(|_| scope.spawn(|| raw::post(&small_addr, "/v1/completions", body.as_bytes())))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let limited: Vec<&raw::Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(
        !limited.is_empty(),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in limited {
        assert_openai_error_body(r, "429");
        let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&secs), "{secs}");
    }
}
