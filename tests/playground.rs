//! The web playground (`GET /`) in a real browser: headless Debian chromium driven by
//! `tests/browser/playground.mjs` (playwright-core) against the real server on the tiny model
//! (as a GGUF with a byte-level tokenizer and a chat template) with two adapters. The page's
//! streamed chat and compare answers must equal the server's own non-streamed greedy answers;
//! with an API key on, the page shows the 401 and then works with the key. Screenshots go to
//! the target folder (`playground-screenshot.png` and friends).
//!
//! Needs `/usr/bin/chromium`, `node` and `tests/browser/node_modules` (`scripts/test.sh` installs
//! them). Missing, the tests fail when `CI` is set and are skipped loudly otherwise.

mod common;

use common::server::Server;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const CHROMIUM: &str = "/usr/bin/chromium";
const BASE: &str = "tiny";
const ADAPTERS: [(&str, usize); 2] = [("attn-r4", 4), ("all-r8", 8)];
const STACK: [(&str, f64); 2] = [("attn-r4", 0.7), ("all-r8", 0.5)];
const PROMPT: &str = "Tell me a story about a lighthouse.";
const MAX_TOKENS: u64 = 24;
const KEY: &str = "playground-secret";

/// The browser test's folder, if chromium, node and playwright-core are all here. Otherwise a
/// panic under `CI`, else a loud skip.
fn browser() -> Option<PathBuf> {
    let dir = repo_root().join("tests/browser");
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push(format!("{CHROMIUM} (apt-get install chromium)"));
    }
    let node = Command::new("node").arg("--version").output();
    if !node.map(|o| o.status.success()).unwrap_or(false) {
        missing.push("node".to_string());
    }
    if !dir.join("node_modules/playwright-core").exists() {
        missing.push("tests/browser/node_modules (npm ci --prefix tests/browser)".to_string());
    }
    if missing.is_empty() {
        return Some(dir);
    }
    let msg = format!(
        "the playground browser test needs {}; scripts/test.sh installs them",
        missing.join(", ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    // Straight to stderr, past the test harness's capture: a skip must be seen.
    let bar = "!".repeat(78);
    let _ = writeln!(
        std::io::stderr(),
        "\n{bar}\nSKIPPED (CI is not set): {msg}\n{bar}\n"
    );
    None
}

/// Where screenshots go: the target folder (`CARGO_TARGET_DIR` or `target/`).
fn shots_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).to_path_buf()
}

struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    adapters: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(format!("{BASE}.gguf"));
    write_tiny_gguf_with(&model, "smollm", true, Some(TINY_CHAT_TEMPLATE));
    let adapters = dir.path().join("adapters");
    for (a, _) in ADAPTERS {
        copy_dir(&tiny_adapter(a), &adapters.join(a));
    }
    Fixture {
        _dir: dir,
        model,
        adapters,
    }
}

fn serve(f: &Fixture, extra: &[&str]) -> Server {
    let mut args = vec![
        "--model",
        f.model.to_str().unwrap(),
        "--adapters-dir",
        f.adapters.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The server's non-streamed greedy answer to `PROMPT` for `fields` (model / adapters), and its
/// completion tokens.
fn answer(server: &Server, fields: Value, key: Option<&str>) -> (String, u64) {
    let mut body = json!({"messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0, "max_tokens": MAX_TOKENS});
    body.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    let (status, v) = server.post_with("/v1/chat/completions", &body, key);
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    (
        text.to_string(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

/// The versions `GET /v1/adapters` gives (one counter across adapters, in scan order).
fn versions(server: &Server, key: Option<&str>) -> serde_json::Map<String, Value> {
    let mut req = ureq::get(&format!("{}/v1/adapters", server.url));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let list: Value = req.call().unwrap().into_json().unwrap();
    let rows = list["data"].as_array().unwrap();
    assert_eq!(rows.len(), ADAPTERS.len(), "{list}");
    rows.iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["version"].clone(),
            )
        })
        .collect()
}

/// What the page must show: the API's own answers (asked before the page runs).
fn expectations(server: &Server, key: Option<&str>) -> Value {
    let (base_answer, base_tokens) = answer(server, json!({"model": BASE}), key);
    let mut answers = serde_json::Map::new();
    for (a, _) in ADAPTERS {
        answers.insert(a.into(), json!(answer(server, json!({"model": a}), key).0));
    }
    let stack: Vec<Value> = STACK
        .iter()
        .map(|(n, w)| json!({"name": n, "weight": w}))
        .collect();
    let stack_answer = answer(server, json!({"model": BASE, "adapters": stack}), key).0;
    let (a, b) = (ADAPTERS[0].0, ADAPTERS[1].0);
    assert!(
        !answers[a].as_str().unwrap().is_empty() && !base_answer.is_empty(),
        "empty greedy answers: pick another prompt"
    );
    assert_ne!(
        answers[a], answers[b],
        "{a} and {b} answer alike: the compare check would prove nothing"
    );
    json!({
        "base": BASE, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
        "base_answer": base_answer, "base_tokens": base_tokens, "answers": answers, "stack_answer": stack_answer,
        "adapters": [a, b],
        "stack": STACK.iter().map(|(n, w)| (n.to_string(), json!(w))).collect::<serde_json::Map<_, _>>(),
        "versions": versions(server, key),
        "ranks": ADAPTERS.iter().map(|(n, r)| (n.to_string(), json!(r))).collect::<serde_json::Map<_, _>>(),
    })
}

/// Runs `playground.mjs MODE` against `server`; asserts it passed and returns what it saw.
fn run_page(dir: &Path, server: &Server, mode: &str, expect: &Value) -> Value {
    let started = Instant::now();
    let failed_shot = shots_dir().join(format!("playground-failed-{mode}.png"));
    let _ = std::fs::remove_file(&failed_shot);
    let out = Command::new("node")
        .arg(dir.join("playground.mjs"))
        .arg(mode)
        .current_dir(dir)
        .env("PLAYGROUND_URL", &server.url)
        .env("PLAYGROUND_EXPECT", expect.to_string())
        .env("PLAYGROUND_SHOTS", shots_dir())
        .env("PLAYGROUND_KEY", KEY)
        .env("CHROMIUM", CHROMIUM)
        .output()
        .expect("cannot run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "playground.mjs {mode} failed ({}; screenshots in {}):\n{stdout}\n{}",
        out.status,
        shots_dir().display(),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "playground.mjs {mode}: {:.1} s, {stdout}",
        started.elapsed().as_secs_f64()
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("no JSON summary")
}

/// `GET /` answers the page with its security headers, needing no key even when one is set.
fn check_page_headers(server: &Server) {
    for (path, ty) in [
        ("/", "text/html"),
        ("/playground/app.js", "text/javascript"),
        ("/playground/style.css", "text/css"),
    ] {
        let resp = ureq::get(&format!("{}{path}", server.url))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(resp.status(), 200, "{path}");
        assert!(resp.content_type().starts_with(ty), "{path}");
        let csp = resp.header("content-security-policy").unwrap_or("");
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(csp.contains("connect-src 'self'"), "{path}: {csp}");
    }
}

#[test]
fn playground_chats_streams_and_compares_two_adapters_in_chromium() {
    let Some(dir) = browser() else { return };
    let f = fixture();
    let server = serve(&f, &[]);
    check_page_headers(&server);
    let expect = expectations(&server, None);
    let seen = run_page(&dir, &server, "open", &expect);
    assert!(seen["chat"]["chunks"].as_u64().unwrap() > 1, "{seen}");
    assert_eq!(seen["compare"].as_array().unwrap().len(), 3, "{seen}");
    let shot = shots_dir().join("playground-screenshot.png");
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
}

#[test]
fn playground_shows_the_401_without_a_key_and_works_with_it() {
    let Some(dir) = browser() else { return };
    let f = fixture();
    let server = serve(&f, &["--api-key", KEY]);
    check_page_headers(&server);
    let (status, _) = server.post(
        "/v1/chat/completions",
        &json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 401, "the API itself must want the key");
    let expect = expectations(&server, Some(KEY));
    let seen = run_page(&dir, &server, "auth", &expect);
    assert!(
        seen["auth"]["missing"]
            .as_str()
            .unwrap()
            .contains("missing API key"),
        "{seen}"
    );
    assert_eq!(seen["auth"]["adapters"], 2, "{seen}");
}
