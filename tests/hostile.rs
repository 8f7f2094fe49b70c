//! Hostile input against the real `loraplex serve` on the tiny model: hundreds of malformed,
//! extreme or malicious requests over every route — broken and truncated JSON, wrong types,
//! numbers like `1e999`, huge and deeply nested bodies, invalid UTF-8 in bodies and paths (raw
//! sockets), broken HTTP, path tricks and symlinks in adapter registration, corrupt adapters of
//! many kinds, oversized stacks. Every answer must be a 4xx with an OpenAI error body (never a
//! 5xx, never an empty or plain-text body) within 10 s, no answer may show the server's absolute
//! paths, and afterwards a greedy request must give exactly what it gave before the barrage.

mod common;

use common::hostile_cases::*;
use common::raw::{self, assert_openai_4xx, assert_openai_error_body, Reply};
use common::server::Server;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    adapters: PathBuf,
    outside: PathBuf,
    corrupt: Vec<String>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf_with(&model, "smollm", true, Some(TINY_CHAT_TEMPLATE));
    let adapters = dir.path().join("adapters");
    for a in ["attn-r4", "all-r8", "rslora-r16"] {
        copy_dir(&tiny_adapter(a), &adapters.join(a));
    }
    let corrupt = common::corrupt::write_all(&adapters);
    // A good adapter outside the adapters directory, and a symlink to it inside.
    let outside = dir.path().join("elsewhere").join("outside-adapter");
    copy_dir(&tiny_adapter("attn-r4"), &outside);
    std::os::unix::fs::symlink(&outside, adapters.join("link-out")).unwrap();
    Fixture {
        dir,
        model,
        adapters,
        outside,
        corrupt,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

impl Fixture {
    fn serve(&self, extra: &[&str]) -> Server {
        let mut args = vec![
            "--model",
            s(&self.model),
            "--adapters-dir",
            s(&self.adapters),
            "--body-read-timeout",
            "2",
            "--header-read-timeout",
            "3",
        ];
        args.extend_from_slice(extra);
        Server::start(&args)
    }
}

fn generation_cases() -> Vec<Case> {
    use Want::*;
    let mut cases = Vec::new();
    for (path, base) in [
        ("/v1/chat/completions", chat_base()),
        ("/v1/completions", completion_base()),
    ] {
        for (k, raw, want) in field_cases() {
            cases.push(case(
                format!("{path} {k}={raw}"),
                path,
                with_raw(&base, k, &raw),
                want,
            ));
        }
    }
    let chat = chat_base();
    for raw in [
        "\"hi\"",
        "[]",
        "[1]",
        "[{\"role\": 1}]",
        "[{\"role\": \"tool\", \"content\": \"x\"}]",
        "[{\"role\": \"user\", \"content\": 5}]",
        "[{\"role\": \"user\", \"content\": [{\"type\": \"image_url\"}]}]",
        "[{\"content\": \"x\"}]",
        "null",
    ] {
        cases.push(case(
            format!("chat messages={raw}"),
            "/v1/chat/completions",
            with_raw(&chat, "messages", raw),
            Refused,
        ));
    }
    for (k, raw) in [
        ("top_logprobs", "21"),
        ("top_logprobs", "-1"),
        ("top_logprobs", "5"),
        ("logprobs", "\"yes\""),
        ("max_completion_tokens", "0"),
        ("max_completion_tokens", "1e999"),
    ] {
        cases.push(case(
            format!("chat {k}={raw}"),
            "/v1/chat/completions",
            with_raw(&chat, k, raw),
            Refused,
        ));
    }
    let big = format!(
        "[{{\"role\": \"user\", \"content\": \"{}\"}}]",
        "word ".repeat(5000)
    );
    cases.push(case(
        "chat prompt over the context",
        "/v1/chat/completions",
        with_raw(&chat, "messages", &big),
        Refused,
    ));
    let comp = completion_base();
    for raw in [
        "1",
        "[-1]",
        "[1.5]",
        "[999999]",
        "[256]",
        "[]",
        "\"\"",
        "[[1]]",
        "{\"a\": 1}",
        "null",
        "[4294967296]",
    ] {
        cases.push(case(
            format!("completion prompt={raw}"),
            "/v1/completions",
            with_raw(&comp, "prompt", raw),
            Refused,
        ));
    }
    let long: Vec<String> = (0..300).map(|i| (i % 250 + 3).to_string()).collect();
    cases.push(case(
        "completion prompt over the context",
        "/v1/completions",
        with_raw(&comp, "prompt", &format!("[{}]", long.join(","))),
        Refused,
    ));
    for (k, raw) in [
        ("logprobs", "21"),
        ("logprobs", "true"),
        ("logprobs", "-1"),
        ("echo", "\"x\""),
    ] {
        cases.push(case(
            format!("completion {k}={raw}"),
            "/v1/completions",
            with_raw(&comp, k, raw),
            Refused,
        ));
    }
    cases
}

fn admin_cases(f: &Fixture) -> Vec<Case> {
    use Want::*;
    let mut cases = Vec::new();
    let outside = s(&f.outside).to_string();
    let long = "a".repeat(5000);
    let paths = [
        "..",
        "../x",
        "../adapters/attn-r4",
        "/etc",
        "/",
        "",
        ".",
        "attn-r4/../../",
        "/proc/self",
        "link-out",
        &outside,
        "attn-r4\u{0}",
        &long,
        "~/x",
        "attn-r4/adapter_config.json",
        "%2e%2e",
        "nope",
    ];
    for p in paths {
        let body = json!({"name": "x", "path": p}).to_string();
        cases.push(case(
            format!("register path {p:.40}"),
            "/v1/adapters",
            body,
            Refused,
        ));
        let body = json!({"lora_name": "x", "lora_path": p}).to_string();
        cases.push(case(
            format!("vllm load path {p:.40}"),
            "/v1/load_lora_adapter",
            body,
            Refused,
        ));
    }
    let names = [
        json!(""),
        json!(".."),
        json!("a/b"),
        json!("x".repeat(65)),
        json!("é"),
        json!(BASE),
        json!(" "),
        json!("a b"),
        json!(null),
        json!(5),
    ];
    for n in names {
        cases.push(case(
            format!("register name {n}"),
            "/v1/adapters",
            json!({"name": n, "path": "attn-r4"}).to_string(),
            Refused,
        ));
        cases.push(case(
            format!("vllm load name {n}"),
            "/v1/load_lora_adapter",
            json!({"lora_name": n, "lora_path": "attn-r4"}).to_string(),
            Refused,
        ));
    }
    cases.push(case(
        "register extra field",
        "/v1/adapters",
        json!({"name": "x", "path": "attn-r4", "admin": true}).to_string(),
        Refused,
    ));
    cases.push(case(
        "register no path",
        "/v1/adapters",
        json!({"name": "x"}).to_string(),
        Refused,
    ));
    for c in &f.corrupt {
        cases.push(case(
            format!("register corrupt {c}"),
            "/v1/adapters",
            json!({"name": format!("r-{c}"), "path": c}).to_string(),
            Refused,
        ));
        cases.push(case(
            format!("vllm load corrupt {c}"),
            "/v1/load_lora_adapter",
            json!({"lora_name": format!("v-{c}"), "lora_path": c}).to_string(),
            Refused,
        ));
        cases.push(case(
            format!("chat with corrupt {c}"),
            "/v1/chat/completions",
            with_raw(&chat_base(), "model", &format!("\"{c}\"")),
            Refused,
        ));
        cases.push(case(
            format!("stack with corrupt {c}"),
            "/v1/completions",
            with_raw(
                &completion_base(),
                "adapters",
                &format!("[{{\"name\": \"attn-r4\"}}, {{\"name\": \"{c}\"}}]"),
            ),
            Refused,
        ));
    }
    for n in [json!("nope"), json!(""), json!(5), json!(null)] {
        cases.push(case(
            format!("unload {n}"),
            "/v1/unload_lora_adapter",
            json!({"lora_name": n}).to_string(),
            Refused,
        ));
    }
    cases
}

fn check(r: &Reply, want: Want, what: &str, secret: &str) {
    assert!(r.status != 0, "{what}: no answer ({:?})", r.text());
    assert!(r.status < 500, "{what}: {} {}", r.status, r.text());
    match (want, r.status) {
        (Want::Either, 200) => assert!(r.elapsed < std::time::Duration::from_secs(10), "{what}"),
        _ => {
            assert_openai_4xx(r, what);
        }
    }
    assert!(
        !r.text().contains(secret),
        "{what}: the answer shows a server path: {}",
        r.text()
    );
}

/// The greedy answers the barrage must not change.
fn reference_answers(server: &Server) -> Vec<Value> {
    let bodies = [
        json!({"model": BASE, "prompt": [1, 15, 72, 101], "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        json!({"model": "attn-r4", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        json!({"model": BASE, "adapters": [{"name": "all-r8", "weight": 0.5}, {"name": "rslora-r16"}], "prompt": [9, 8, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
    ];
    bodies
        .iter()
        .map(|b| {
            let (code, v) = server.post("/v1/completions", b);
            assert_eq!(code, 200, "{v}");
            v["choices"].clone()
        })
        .collect()
}

#[test]
fn hostile_requests_get_openai_4xx_errors_and_leave_the_server_correct() {
    let f = fixture();
    let server = f.serve(&[]);
    let addr = raw::addr_of(&server.url);
    let before = reference_answers(&server);
    let secret = s(f.dir.path()).to_string();
    let mut n = 0;
    let mut cases = generation_cases();
    cases.extend(admin_cases(&f));
    for route in POST_ROUTES {
        for (what, body) in malformed_bodies() {
            cases.push(case(format!("{route} {what}"), route, body, Want::Refused));
        }
    }
    for c in &cases {
        let r = raw::post(&addr, &c.path, &c.body);
        // A client's own path may come back in its error; the server's paths may not.
        let own = String::from_utf8_lossy(&c.body).contains(&secret);
        check(&r, c.want, &c.what, if own { "\u{0}-" } else { &secret });
        n += 1;
    }
    for (what, bytes) in http_cases(&addr) {
        let r = raw::send(&addr, &bytes);
        check(&r, Want::Refused, &what, &secret);
        n += 1;
    }
    eprintln!("{n} hostile cases answered");
    assert!(n >= 200, "{n}");
    // Nothing broke: same greedy answers, the 5xx counter untouched, the server healthy.
    assert_eq!(reference_answers(&server), before);
    let (_, metrics) = server.get("/metrics");
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("loraplex_requests_total") && l.contains("status=\"5")),
        "{metrics}"
    );
    assert_eq!(server.get("/health").0, 200);
}

fn get_with_key(addr: &str, path: &str, key: &str) -> Reply {
    let auth = format!("Bearer {key}");
    raw::request(
        addr,
        "GET",
        path.as_bytes(),
        &[("Authorization", auth.as_str())],
        b"",
    )
}

#[test]
fn symlinks_out_of_the_adapters_dir_follow_one_rule_and_paths_stay_private() {
    let f = fixture();
    let secret = s(f.dir.path()).to_string();
    let server = f.serve(&["--api-key", "user", "--admin-key", "admin"]);
    let addr = raw::addr_of(&server.url);
    // The user key sees paths relative to the adapters directory; the admin key sees them whole.
    let user = get_with_key(&addr, "/v1/adapters", "user");
    assert_eq!(user.status, 200, "{}", user.text());
    assert!(!user.text().contains(&secret), "{}", user.text());
    let list = user.json().unwrap();
    let attn = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "attn-r4")
        .unwrap();
    assert_eq!(attn["path"], "attn-r4");
    let admin = get_with_key(&addr, "/v1/adapters", "admin").json().unwrap();
    let attn = admin["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "attn-r4")
        .unwrap();
    assert!(attn["path"].as_str().unwrap().starts_with('/'), "{attn}");
    // The symlink to a folder outside was not picked up at start-up, and cannot be registered.
    assert!(!list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["name"] == "link-out"));
    let r = server.post_with("/v1/chat/completions", &json!({"model": "link-out", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}), Some("user"));
    assert_eq!(r.0, 404, "{}", r.1);
    let r = server.post_with(
        "/v1/adapters",
        &json!({"name": "lo", "path": "link-out"}),
        Some("admin"),
    );
    assert_eq!(r.0, 400, "{}", r.1);
    assert!(
        r.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside the adapters directory"),
        "{}",
        r.1
    );
    // An adapter that fails to load shows no server path to anyone.
    let r = server.post_with(
        "/v1/adapters",
        &json!({"name": "tw", "path": "trunc-half"}),
        Some("admin"),
    );
    assert_eq!(r.0, 400, "{}", r.1);
    assert!(!r.1.to_string().contains(&secret), "{}", r.1);
    drop(server);
    // Allowed outside: the symlink is served at start-up and registrable, by the same rule.
    let server = f.serve(&["--allow-adapter-paths-outside"]);
    let body = json!({"model": "link-out", "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0});
    let (code, v) = server.post("/v1/completions", &body);
    assert_eq!(code, 200, "{v}");
    let (code, v) = server.post("/v1/adapters", &json!({"name": "lo", "path": "link-out"}));
    assert_eq!(code, 200, "{v}");
    // No key configured: nobody is an admin, so the outside folder shows by its name only.
    let (_, list) = server.get("/v1/adapters");
    assert!(!list.contains(&secret), "{list}");
    assert!(list.contains("\"outside-adapter\""), "{list}");
}

#[test]
fn a_model_without_a_tokenizer_refuses_what_needs_one_with_400_not_500() {
    let server = Server::start(&["--model", s(&tiny_model())]);
    let addr = raw::addr_of(&server.url);
    let (_, models) = server.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_string();
    let ids = json!({"model": model, "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0});
    let (code, v) = server.post("/v1/completions", &ids);
    assert_eq!(code, 200, "{v}");
    let mut n = 0;
    for (k, raw_value) in [
        ("stop", "\"x\""),
        ("stop", "[\"a\", \"b\"]"),
        ("prompt", "\"text\""),
    ] {
        let r = raw::post(&addr, "/v1/completions", &with_raw(&ids, k, raw_value));
        assert_eq!(
            assert_openai_4xx(&r, k),
            400,
            "{k}={raw_value}: {}",
            r.text()
        );
        n += 1;
    }
    let chat = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let r = raw::post(&addr, "/v1/chat/completions", chat.to_string().as_bytes());
    assert_openai_4xx(&r, "chat without a tokenizer");
    for (k, raw_value, want) in field_cases() {
        let r = raw::post(&addr, "/v1/completions", &with_raw(&ids, k, &raw_value));
        check(&r, want, &format!("{k}={raw_value}"), "\u{0}-");
        if r.status != 200 {
            assert_openai_error_body(&r, k);
        }
        n += 1;
    }
    assert!(n > 50);
    assert_eq!(
        server.metric("loraplex_requests_total{adapter=\"base\",status=\"500\"}"),
        0.0
    );
}
