//! A streamed request whose client leaves before its first token is cancelled at once: here it
//! waits in the queue behind a long generation (batch size 1) and is dropped from the queue as
//! soon as its connection closes, not when a first token would find nobody to send to.

mod common;

use common::server::Server;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Opens a streamed chat completion on a raw connection and returns it (headers sent).
fn open_stream(url: &str, max_tokens: usize) -> TcpStream {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    let body = format!(
        r#"{{"model":"SmolLM2-135M-Instruct","messages":[{{"role":"user","content":"Tell me a long story."}}],"max_tokens":{max_tokens},"ignore_eos":true,"temperature":0,"stream":true}}"#
    );
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

fn metric(url: &str, name: &str) -> f64 {
    let text = ureq::get(&format!("{url}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn wait_for(url: &str, name: &str, want: f64, within: Duration) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let v = metric(url, name);
        if v == want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stream_that_leaves_before_its_first_token_is_cancelled_at_once() {
    loraplex::fetch::ensure_default_model().unwrap();
    let server = Server::start(&["--max-batch-size", "1"]);
    let url = server.url.clone();
    // A long generation holds the only batch slot.
    let mut long = open_stream(&url, 3000);
    let mut first = [0u8; 256];
    let n = long.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("200 OK"));
    assert_eq!(
        wait_for(
            &url,
            "loraplex_running_sequences",
            1.0,
            Duration::from_secs(10)
        ),
        1.0
    );
    // A second stream queues behind it, then its client leaves before any token.
    let queued = open_stream(&url, 16);
    assert_eq!(
        wait_for(
            &url,
            "loraplex_waiting_sequences",
            1.0,
            Duration::from_secs(10)
        ),
        1.0
    );
    drop(queued);
    let cancelled = wait_for(
        &url,
        "loraplex_cancelled_sequences_total",
        1.0,
        Duration::from_secs(3),
    );
    assert_eq!(
        cancelled, 1.0,
        "the departed queued stream was not cancelled"
    );
    assert_eq!(metric(&url, "loraplex_waiting_sequences"), 0.0);
    // The long one goes too: the slot frees and the KV gauge returns to zero.
    drop(long);
    assert_eq!(
        wait_for(
            &url,
            "loraplex_running_sequences",
            0.0,
            Duration::from_secs(5)
        ),
        0.0
    );
    assert_eq!(
        wait_for(&url, "loraplex_kv_cache_bytes", 0.0, Duration::from_secs(2)),
        0.0
    );
    assert_eq!(metric(&url, "loraplex_cancelled_sequences_total"), 2.0);
}
