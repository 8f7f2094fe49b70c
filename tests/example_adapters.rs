//! The example adapters that ship in `adapters/` (trained by `scripts/train-examples.sh` from
//! `configs/train-*.toml` on `data/`): each is a small PEFT folder that meets the learning bar on
//! its own held-out test split (loss at most 0.7× the base's, format match at least 80%), and
//! `loraplex serve` started as the README says (no flags, from the repository) lists all three
//! and answers each one's unseen question in that adapter's format.

mod common;

use common::server::Server;
use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

const EXAMPLES: [&str; 3] = ["legal", "medical", "chatbot"];

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn format_regex(name: &str) -> regex::Regex {
    let path = repo(&format!("data/{name}/format.regex"));
    regex::Regex::new(std::fs::read_to_string(path).unwrap().trim()).unwrap()
}

#[test]
fn shipped_examples_are_small_and_meet_the_learning_bar_on_their_test_splits() {
    loraplex::fetch::ensure_default_model().unwrap();
    for name in EXAMPLES {
        let dir = repo(&format!("adapters/{name}"));
        let weights = std::fs::metadata(dir.join("adapter_model.safetensors"))
            .unwrap_or_else(|e| panic!("adapters/{name}: {e} (run scripts/train-examples.sh)"));
        assert!(
            weights.len() < 8 << 20,
            "adapters/{name} is {} bytes",
            weights.len()
        );
        let data = repo(&format!("data/{name}/test.jsonl"));
        let regex_file = repo(&format!("data/{name}/format.regex"));
        let out = Command::new(bin())
            .args(["eval", "--adapter", dir.to_str().unwrap(), "--data"])
            .arg(&data)
            .arg("--format-regex-file")
            .arg(&regex_file)
            .args(["--limit", "10", "--max-tokens", "48", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        let (base, tuned) = (&r[0], &r[1]);
        let loss = |v: &Value| v["loss"].as_f64().unwrap();
        let format = |v: &Value| v["format_match"].as_f64().unwrap();
        eprintln!(
            "{name}: loss {:.3} -> {:.3}, format match {:.2} -> {:.2}",
            loss(base),
            loss(tuned),
            format(base),
            format(tuned)
        );
        assert!(loss(tuned) <= 0.7 * loss(base), "{name}: {r}");
        assert!(format(tuned) >= 0.8, "{name}: {r}");
    }
}

#[test]
fn a_first_serve_lists_the_three_examples_and_answers_in_their_formats() {
    loraplex::fetch::ensure_default_model().unwrap();
    // The README's command: the default config, so `adapters/` of the repository.
    let server = Server::start(&[]);
    let (code, models) = server.get("/v1/models");
    assert_eq!(code, 200, "{models}");
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    for name in EXAMPLES {
        assert!(ids.contains(&name), "{name} not in /v1/models: {ids:?}");
    }
    // Questions that are in none of the data splits.
    let questions = [
        (
            "legal",
            "May an employer read an employee's private letters?",
        ),
        (
            "medical",
            "My child has had a mild rash on both arms for two days. What should we do?",
        ),
        ("chatbot", "Hi! How do I get a new laptop charger?"),
    ];
    for (name, question) in questions {
        let answer = server.chat_answer(name, question, 48);
        assert!(
            format_regex(name).is_match(&answer),
            "{name}: answer not in its format: {answer:?}"
        );
    }
}
