//! `loraplex serve` on the default model (SmolLM2-135M-Instruct) with an adapter: the official
//! `openai` client end to end, and concurrent requests equal to `generate` alone.

mod common;

use common::server::Server;
use common::*;
use loraplex::lora::synthetic::write_synthetic_adapter;
use loraplex::model::Proj;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A PEFT adapter for the default model: r=8 on q_proj and v_proj.
fn write_adapter(dir: &Path) {
    let m = loraplex::model::load(None).unwrap();
    write_synthetic_adapter(dir, &m.llama.cfg, 8, &[Proj::Q, Proj::V], 0.37, 0.25).unwrap();
}

#[test]
fn openai_client_and_batched_equality_on_the_default_model() {
    loraplex::fetch::ensure_default_model().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    write_adapter(&adapters.join("chatbot"));
    let server = Server::start(&["--adapters-dir", adapters.to_str().unwrap()]);
    let seen = server.run_openai_client(loraplex::fetch::DEFAULT_MODEL_ID, "chatbot");
    let base_answer = seen[loraplex::fetch::DEFAULT_MODEL_ID]["chat"]
        .as_str()
        .unwrap();
    assert!(base_answer.contains("Paris"), "{base_answer}");
    assert_ne!(
        seen["chatbot"]["chat"],
        seen[loraplex::fetch::DEFAULT_MODEL_ID]["chat"],
        "the adapter changes the answer"
    );

    // Four concurrent chats (base and adapter) equal `generate --chat` alone.
    let questions = ["What is the capital of France?", "Name a primary colour."];
    let cases: Vec<(&str, Option<PathBuf>, &str)> = questions
        .iter()
        .flat_map(|q| {
            [
                (loraplex::fetch::DEFAULT_MODEL_ID, None, *q),
                ("chatbot", Some(adapters.join("chatbot")), *q),
            ]
        })
        .collect();
    let alone: Vec<String> = cases
        .iter()
        .map(|(_, adapter, q)| {
            let mut args = vec!["generate", "--chat", q, "--max-tokens", "16", "--json"];
            if let Some(a) = adapter {
                args.extend(["--adapter", a.to_str().unwrap()]);
            }
            let out = Command::new(bin()).args(&args).output().unwrap();
            assert!(out.status.success());
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            v["text"].as_str().unwrap().to_string()
        })
        .collect();
    let together: Vec<String> = std::thread::scope(|scope| {
        let hs: Vec<_> = cases
            .iter()
            .map(|(model, _, q)| {
                let server = &server;
                let body = json!({"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 16, "temperature": 0});
                scope.spawn(move || server.post("/v1/chat/completions", &body))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                let (code, body) = h.join().unwrap();
                assert_eq!(code, 200, "{body}");
                body["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    });
    assert_eq!(alone, together);
}

/// The README's first curl, on the README's first command (no config, no sampling fields in the
/// request): the default model's recommended sampling is in force and the answer makes sense.
#[test]
fn the_readme_curl_gets_a_sensible_answer() {
    loraplex::fetch::ensure_default_model().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&["--adapters-dir", tmp.path().to_str().unwrap()]);
    let (_, models) = server.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(
        models["data"][0]["sampling_defaults"],
        json!({"temperature": 0.2, "top_p": 0.9})
    );
    let body = json!({"model": "SmolLM2-135M-Instruct",
                      "messages": [{"role": "user", "content": "What is the capital of France?"}]});
    for _ in 0..2 {
        let (status, r) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{r}");
        let answer = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(answer.contains("Paris"), "{answer}");
    }
}

/// vLLM's metrics protocol (for llm-d / the Gateway API Inference Extension), read by the
/// official Prometheus client's parser while two adapters run and a third waits.
#[test]
fn vllm_metrics_show_running_and_waiting_adapters() {
    loraplex::fetch::ensure_default_model().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    let names = ["legal", "medical", "chatbot"];
    for n in names {
        write_adapter(&adapters.join(n));
    }
    let server = Server::start(&[
        "--adapters-dir",
        adapters.to_str().unwrap(),
        "--max-batch-size",
        "2",
        "--preload",
        "legal",
        "--preload",
        "medical",
        "--preload",
        "chatbot",
    ]);
    let out = server.run_python("vllm_metrics.py", &names);
    assert_eq!(out["labels"]["max_lora"], "2", "{out}");
}
