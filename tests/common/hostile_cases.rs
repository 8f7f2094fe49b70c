//! The request tables of the hostile-input suite (`tests/hostile.rs`): malformed bodies, extreme
//! and mistyped fields, and raw HTTP requests with broken framing, methods and paths.
#![allow(dead_code)]

use serde_json::{json, Value};

pub const BASE: &str = "tiny";

/// `base` with `key` set to the JSON text `raw` (which may be no valid JSON value, like `1e999`).
pub fn with_raw(base: &Value, key: &str, raw: &str) -> Vec<u8> {
    let mut b = base.clone();
    b.as_object_mut().unwrap().remove(key);
    let rest = b.to_string();
    let rest = &rest[1..rest.len() - 1];
    let sep = if rest.is_empty() { "" } else { ", " };
    format!("{{\"{key}\": {raw}{sep}{rest}}}").into_bytes()
}

pub fn chat_base() -> Value {
    json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0})
}

pub fn completion_base() -> Value {
    json!({"model": BASE, "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0})
}

/// What a case may answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Want {
    /// A 4xx with an OpenAI error body.
    Refused,
    /// A 200, or a 4xx with an OpenAI error body (an extreme value that may be valid).
    Either,
}

pub struct Case {
    pub what: String,
    pub path: String,
    pub body: Vec<u8>,
    pub want: Want,
}

pub fn case(what: impl Into<String>, path: &str, body: impl Into<Vec<u8>>, want: Want) -> Case {
    Case {
        what: what.into(),
        path: path.into(),
        body: body.into(),
        want,
    }
}

pub const POST_ROUTES: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/adapters",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
];

/// Bodies that are no valid request on any POST route.
pub fn malformed_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let valid = chat_base().to_string();
    let mut v: Vec<(&'static str, Vec<u8>)> = vec![
        ("empty body", b"".to_vec()),
        ("open brace", b"{".to_vec()),
        ("key only", b"{\"model\":".to_vec()),
        ("array", b"[1,2]".to_vec()),
        ("null", b"null".to_vec()),
        ("number", b"1".to_vec()),
        ("string", b"\"x\"".to_vec()),
        ("bare word", b"{not json}".to_vec()),
        ("trailing comma", b"{\"a\":1,}".to_vec()),
        ("NaN literal", b"{\"model\": NaN}".to_vec()),
        ("Infinity literal", b"{\"model\": Infinity}".to_vec()),
        ("1e999", b"{\"model\": 1e999}".to_vec()),
        ("NUL byte", b"{\"model\": \"\0\"}".to_vec()),
        ("invalid UTF-8", b"{\"model\": \"\xff\xfe\"}".to_vec()),
        ("lone surrogate", br#"{"model": "\ud800"}"#.to_vec()),
        ("BOM", b"\xef\xbb\xbf{}".to_vec()),
        ("two objects", b"{}{}".to_vec()),
    ];
    for cut in [1, 10, valid.len() / 2, valid.len() - 1] {
        v.push(("truncated", valid.as_bytes()[..cut].to_vec()));
    }
    v.push(("deep arrays", "[".repeat(100_000).into_bytes()));
    v.push(("deep objects", "{\"a\":".repeat(50_000).into_bytes()));
    v.push(("1.9 MB of junk", vec![b'x'; 1_900_000]));
    v
}

/// (field, JSON text, expectation) for the fields both generation routes share.
pub fn field_cases() -> Vec<(&'static str, String, Want)> {
    use Want::*;
    let mut v: Vec<(&'static str, String, Want)> = Vec::new();
    let mut add = |k: &'static str, raws: &[&str], w: Want| {
        for r in raws {
            v.push((k, r.to_string(), w));
        }
    };
    add(
        "model",
        &[
            "1",
            "null",
            "[]",
            "{}",
            "\"\"",
            "\"nope\"",
            "\"../attn-r4\"",
            "\"/etc/passwd\"",
            "\"trunc-half\"",
            "\"nan-b\"",
            "\"link-out\"",
            "\"config-missing\"",
        ],
        Refused,
    );
    add(
        "max_tokens",
        &[
            "\"5\"",
            "1.5",
            "-1",
            "0",
            "1e999",
            "-1e999",
            "1e300",
            "true",
            "9223372036854775808",
            "-9223372036854775809",
            "100000",
        ],
        Refused,
    );
    add(
        "temperature",
        &[
            "\"hot\"",
            "-1",
            "2.5",
            "1e999",
            "-1e999",
            "1e308",
            "-0.000001",
            "[]",
        ],
        Refused,
    );
    add(
        "temperature",
        &["1e-999", "0", "-0.0", "1e-300", "1e-7", "2", "0.0000001"],
        Either,
    );
    add(
        "top_p",
        &["0", "-0.1", "1.1", "1e999", "\"x\"", "1e-300", "1e-999"],
        Refused,
    );
    add("top_p", &["0.000001", "0.5", "1"], Either);
    add(
        "top_k",
        &["-5", "\"1\"", "1.5", "1e30", "9223372036854775808"],
        Refused,
    );
    add(
        "top_k",
        &["-1", "0", "1", "1000000", "9223372036854775807"],
        Either,
    );
    add(
        "seed",
        &["-1", "1.5", "1e30", "\"1\"", "18446744073709551616"],
        Refused,
    );
    add("seed", &["0", "18446744073709551615"], Either);
    add("n", &["0", "9", "-1", "1e9", "\"2\""], Refused);
    add(
        "stop",
        &[
            "[\"a\",\"b\",\"c\",\"d\",\"e\"]",
            "[\"\"]",
            "\"\"",
            "[1]",
            "{\"a\":1}",
        ],
        Refused,
    );
    add(
        "frequency_penalty",
        &["3", "0.5", "\"x\"", "1e999", "-2.5"],
        Refused,
    );
    add("presence_penalty", &["-3", "1", "null"], Either);
    add(
        "logit_bias",
        &["{\"1\": 5}", "[1]", "\"x\"", "{\"999999\": 100}"],
        Refused,
    );
    add("logit_bias", &["{}"], Either);
    add("stream", &["\"yes\"", "1"], Refused);
    add(
        "stream_options",
        &["1", "{\"include_usage\": \"x\"}"],
        Refused,
    );
    add("ignore_eos", &["\"x\"", "2"], Refused);
    add(
        "adapters",
        &[
            "[]",
            "{}",
            "[{\"name\": 1}]",
            "[{\"name\": \"attn-r4\", \"weight\": \"x\"}]",
            "[{\"name\": \"attn-r4\", \"weight\": 1e999}]",
            "[{\"name\": \"attn-r4\", \"weight\": 101}]",
            "[{\"name\": \"attn-r4\", \"weight\": -1e308}]",
            "[{\"name\": \"nope\"}]",
            "[{\"name\": \"attn-r4\", \"extra\": 1}]",
            "[{\"name\": \"wrong-shape\"}]",
            "[{\"name\": \"nan-b\"}]",
        ],
        Refused,
    );
    let nine: Vec<String> = (0..9)
        .map(|_| "{\"name\": \"attn-r4\"}".to_string())
        .collect();
    v.push(("adapters", format!("[{}]", nine.join(",")), Refused));
    for w in ["100", "-100", "1e-300"] {
        let eight: Vec<String> = [
            "attn-r4",
            "all-r8",
            "rslora-r16",
            "attn-r4",
            "all-r8",
            "rslora-r16",
            "attn-r4",
            "all-r8",
        ]
        .iter()
        .map(|n| format!("{{\"name\": \"{n}\", \"weight\": {w}}}"))
        .collect();
        v.push(("adapters", format!("[{}]", eight.join(",")), Either));
    }
    v
}

/// Raw HTTP requests: methods, paths and framing.
pub fn http_cases(addr: &str) -> Vec<(String, Vec<u8>)> {
    let req = |method: &str, path: &[u8], extra: &str, body: &[u8]| {
        let mut r = format!("{method} ").into_bytes();
        r.extend_from_slice(path);
        r.extend_from_slice(
            format!(" HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n").as_bytes(),
        );
        r.extend_from_slice(body);
        r
    };
    let mut v: Vec<(String, Vec<u8>)> = Vec::new();
    for (m, p) in [
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/completions"),
        ("PUT", "/v1/models"),
        ("DELETE", "/v1/models"),
        ("DELETE", "/health"),
        ("POST", "/metrics"),
        ("PATCH", "/v1/adapters"),
        ("GET", "/v1/load_lora_adapter"),
        ("GET", "/v1/unload_lora_adapter"),
        ("GET", "/v1/adapters/x"),
        ("POST", "/health"),
    ] {
        v.push((
            format!("{m} {p}"),
            req(m, p.as_bytes(), "Content-Length: 0\r\n", b""),
        ));
    }
    // (`GET /` is the playground page: answered 200, so not among these.)
    for p in [
        "/index.html",
        "/playground",
        "/playground/",
        "/playground/app.js/x",
        "/v1",
        "/v1/",
        "/v2/models",
        "/v1/models/../metrics",
        "//v1/models",
        "/v1/models%FF",
        "/v1/%00",
        "/v1/adapters/",
        "/health/x",
    ] {
        v.push((format!("GET {p}"), req("GET", p.as_bytes(), "", b"")));
    }
    for p in [
        &b"/v1/\xff\xfe"[..],
        b"/v1/adapters/\xc3\x28",
        b"/\x80",
        b"/v1/models\x7f",
    ] {
        v.push((
            format!("raw path {:?}", String::from_utf8_lossy(p)),
            req("GET", p, "", b""),
        ));
    }
    for p in [
        "/v1/adapters/%FF%FE",
        "/v1/adapters/..%2F..%2Fetc",
        "/v1/adapters/nope",
        "/v1/adapters/%2e%2e",
        "/v1/adapters/a%00b",
    ] {
        v.push((format!("DELETE {p}"), req("DELETE", p.as_bytes(), "", b"")));
    }
    v.push((
        "URI of 70 kB".into(),
        req(
            "GET",
            format!("/{}", "a".repeat(70_000)).as_bytes(),
            "",
            b"",
        ),
    ));
    v.push((
        "header of 500 kB".into(),
        req(
            "GET",
            b"/health",
            &format!("X-Big: {}\r\n", "b".repeat(500_000)),
            b"",
        ),
    ));
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    v.push(("150 headers".into(), req("GET", b"/health", &many, b"")));
    v.push(("garbage request line".into(), b"HELLO\r\n\r\n".to_vec()));
    v.push(("HTTP/9.9".into(), b"GET /health HTTP/9.9\r\n\r\n".to_vec()));
    v.push((
        "header without colon".into(),
        req("GET", b"/health", "BadHeader\r\n", b""),
    ));
    v.push((
        "NUL in a header".into(),
        req("GET", b"/health", "X-A: a\0b\r\n", b""),
    ));
    v.push((
        "Content-Length abc".into(),
        req("POST", b"/v1/completions", "Content-Length: abc\r\n", b"{}"),
    ));
    v.push((
        "Content-Length -1".into(),
        req("POST", b"/v1/completions", "Content-Length: -1\r\n", b"{}"),
    ));
    v.push((
        "two Content-Lengths".into(),
        req(
            "POST",
            b"/v1/completions",
            "Content-Length: 2\r\nContent-Length: 3\r\n",
            b"{}",
        ),
    ));
    v.push((
        "bad chunk size".into(),
        req(
            "POST",
            b"/v1/completions",
            "Transfer-Encoding: chunked\r\n",
            b"zz\r\nab\r\n0\r\n\r\n",
        ),
    ));
    v.push((
        "body shorter than its length".into(),
        req(
            "POST",
            b"/v1/completions",
            "Content-Length: 100\r\n",
            b"{\"model\"",
        ),
    ));
    v.push((
        "declared 3 MB".into(),
        req(
            "POST",
            b"/v1/chat/completions",
            "Content-Length: 3000000\r\n",
            b"{",
        ),
    ));
    let mut big = b"{\"model\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 3_000_000));
    big.extend_from_slice(b"\"}");
    v.push((
        "3 MB body".into(),
        req(
            "POST",
            b"/v1/completions",
            &format!("Content-Length: {}\r\n", big.len()),
            &big,
        ),
    ));
    let mut chunked = Vec::new();
    for _ in 0..50 {
        chunked.extend_from_slice(format!("{:x}\r\n", 65536).as_bytes());
        chunked.extend(std::iter::repeat_n(b'c', 65536));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    v.push((
        "3 MB chunked".into(),
        req(
            "POST",
            b"/v1/adapters",
            "Transfer-Encoding: chunked\r\n",
            &chunked,
        ),
    ));
    v.push((
        "3 MB on GET /health".into(),
        req("GET", b"/health", "Content-Length: 3000000\r\n", b"x"),
    ));
    v.push((
        "Expect 100-continue, too large".into(),
        req(
            "POST",
            b"/v1/completions",
            "Expect: 100-continue\r\nContent-Length: 9999999\r\n",
            b"",
        ),
    ));
    v
}
