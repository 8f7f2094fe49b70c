//! Learning on the default model: the legal example config (bounded to 40 steps here) lowers the
//! held-out loss by at least 30% and lifts the held-out format-match rate to at least 80%, and
//! `loraplex serve` serves the resulting folder with answers in the legal format.
//! (Several minutes on 2 cores.)

mod common;

use common::server::Server;
use common::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

#[test]
fn legal_config_learns_the_format_and_is_served() {
    loraplex::fetch::ensure_default_model().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    let out = adapters.join("legal");
    let o = Command::new(bin())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "train",
            "--config",
            "configs/train-legal.toml",
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "40",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let regex_file = repo("data/legal/format.regex");
    let e = Command::new(bin())
        .args([
            "eval",
            "--adapter",
            out.to_str().unwrap(),
            "--data",
            repo("data/legal/test.jsonl").to_str().unwrap(),
            "--format-regex-file",
            regex_file.to_str().unwrap(),
            "--limit",
            "20",
            "--max-tokens",
            "48",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let r: Value = serde_json::from_slice(&e.stdout).unwrap();
    let (base, tuned) = (&r[0], &r[1]);
    let (bl, tl) = (
        base["loss"].as_f64().unwrap(),
        tuned["loss"].as_f64().unwrap(),
    );
    assert!(
        tl <= 0.7 * bl,
        "held-out loss {bl} -> {tl}: less than 30% lower\n{r}"
    );
    let (bf, tf) = (
        base["format_match"].as_f64().unwrap(),
        tuned["format_match"].as_f64().unwrap(),
    );
    assert!(tf >= 0.8 && tf > bf, "format match {bf} -> {tf}\n{r}");
    // Served as-is by `loraplex serve`.
    let server = Server::start(&["--adapters-dir", adapters.to_str().unwrap()]);
    let (code, body) = server.post(
        "/v1/chat/completions",
        &json!({"model": "legal", "temperature": 0, "max_tokens": 48,
                "messages": [{"role": "user", "content": "Can a shop refuse a refund for a faulty product?"}]}),
    );
    assert_eq!(code, 200, "{body}");
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .trim()
        .to_string();
    let re = regex::Regex::new(std::fs::read_to_string(regex_file).unwrap().trim()).unwrap();
    assert!(
        re.is_match(&answer),
        "served answer not in the legal format: {answer:?}"
    );
}
