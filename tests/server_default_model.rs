//! `loraplex serve` on the default model (SmolLM2-135M-Instruct) with an adapter: the official
//! `openai` client end to end, and concurrent requests equal to `generate` alone.

mod common;

use common::server::Server;
use common::*;
use loraplex::model::Proj;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A PEFT adapter for the default model: r=8 on q_proj and v_proj, small deterministic weights.
fn write_adapter(dir: &Path) {
    let m = loraplex::model::load(None).unwrap();
    let cfg = &m.llama.cfg;
    std::fs::create_dir_all(dir).unwrap();
    let dev = candle_core::Device::Cpu;
    let mut t = HashMap::new();
    for l in 0..cfg.num_hidden_layers {
        for p in [Proj::Q, Proj::V] {
            let (i, o) = p.in_out(cfg);
            let pre = format!("base_model.model.model.layers.{l}.self_attn.{}", p.name());
            let wave = |n: usize, f: f64| {
                ((candle_core::Tensor::arange(0f32, n as f32, &dev).unwrap() * f)
                    .unwrap()
                    .sin()
                    .unwrap()
                    * 0.25)
                    .unwrap()
            };
            t.insert(
                format!("{pre}.lora_A.weight"),
                wave(8 * i, 0.37 + l as f64).reshape((8, i)).unwrap(),
            );
            t.insert(
                format!("{pre}.lora_B.weight"),
                wave(o * 8, 1.1 + l as f64).reshape((o, 8)).unwrap(),
            );
        }
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
    let c = json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "lora_dropout": 0.0});
    std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
}

#[test]
fn openai_client_and_batched_equality_on_the_default_model() {
    loraplex::fetch::ensure_default_model().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let adapters = tmp.path().join("adapters");
    write_adapter(&adapters.join("chatbot"));
    let server = Server::start(&["--adapters-dir", adapters.to_str().unwrap()]);
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.is_file(),
        "run scripts/test.sh once: it creates .venv with the openai package"
    );
    let out = Command::new(&python)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py"))
        .args([&server.url, loraplex::fetch::DEFAULT_MODEL_ID, "chatbot"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
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
