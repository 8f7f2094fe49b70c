//! Sampling defaults end to end: fields a request leaves out come from the model's
//! `generation_config.json`, else from the config's `[sampling]`, else OpenAI's; `/v1/models`
//! shows what is in force; a generation config no request could carry stops the server with a
//! reason. (Tiny HF model, prompts as token ids.)

mod common;

use common::server::Server;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The tiny HF model in a temp folder, with `generation_config` written beside it when given.
fn model_with(dir: &Path, generation_config: Option<&str>) -> PathBuf {
    let model = dir.join("tiny");
    copy_dir(&tiny_model(), &model);
    if let Some(g) = generation_config {
        std::fs::write(model.join("generation_config.json"), g).unwrap();
    }
    model
}

fn serve(model: &Path, extra: &[&str]) -> Server {
    let empty = model.parent().unwrap().join("no-adapters");
    std::fs::create_dir_all(&empty).unwrap();
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--adapters-dir",
        empty.to_str().unwrap(),
    ];
    args.extend(extra);
    Server::start(&args)
}

/// One completion's fingerprint: the logprob of each generated token under the model (raw
/// logits, whatever the sampling), as bits; equal answers give equal fingerprints. `fields` are
/// merged into a request for the prompt [1, 5, 9, 13].
fn tokens(server: &Server, fields: Value) -> Vec<u32> {
    let mut body = json!({"model": "tiny", "prompt": [1, 5, 9, 13], "ignore_eos": true,
                          "logprobs": 0});
    for (k, v) in fields.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, r) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let lp = r["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .clone();
    lp.iter()
        .map(|v| (v.as_f64().unwrap() as f32).to_bits())
        .collect()
}

fn sampling_defaults(server: &Server) -> Value {
    let (status, body) = server.get("/v1/models");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"][0]["sampling_defaults"].clone()
}

#[test]
fn omitted_fields_come_from_generation_config_then_sampling_table_then_openai() {
    let dir = tempfile::tempdir().unwrap();

    // No generation config, no [sampling]: OpenAI's temperature 1, so seeds change the answer
    // (this is what the checks below would see if the defaults were ignored).
    let plain = model_with(&dir.path().join("a"), None);
    let server = serve(&plain, &[]);
    assert_eq!(sampling_defaults(&server), json!({}));
    let greedy = tokens(&server, json!({"temperature": 0, "max_tokens": 12}));
    let sampled: BTreeSet<Vec<u32>> = (1..=4)
        .map(|seed| tokens(&server, json!({"seed": seed, "max_tokens": 12})))
        .collect();
    assert!(
        sampled.len() >= 2 && sampled.iter().any(|t| *t != greedy),
        "temperature 1 must sample: {sampled:?}"
    );
    let full = tokens(&server, json!({"temperature": 0}));
    assert!(full.len() > 12, "no max_tokens: up to the context's end");
    drop(server);

    // generation_config.json: do_sample false (greedy) and max_new_tokens 5.
    let model = model_with(
        &dir.path().join("b"),
        Some(r#"{"bos_token_id": 1, "do_sample": false, "temperature": 0.7, "max_new_tokens": 5}"#),
    );
    let server = serve(&model, &[]);
    assert_eq!(
        sampling_defaults(&server),
        json!({"temperature": 0.0, "max_tokens": 5})
    );
    for seed in 1..=4 {
        let t = tokens(&server, json!({"seed": seed}));
        assert_eq!(t, greedy[..5], "seed {seed}: the model's greedy default");
    }
    // A request's own fields still win.
    assert_eq!(
        tokens(&server, json!({"max_tokens": 12, "temperature": 0})),
        greedy
    );
    drop(server);

    // [sampling] fills what the model leaves unset; the model wins where both set a field.
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        "[sampling]\ntemperature = 1.5\ntop_p = 0.5\ntop_k = 3\nmax_tokens = 9\n",
    )
    .unwrap();
    let server = serve(&model, &["--config", cfg.to_str().unwrap()]);
    assert_eq!(
        sampling_defaults(&server),
        json!({"temperature": 0.0, "top_p": 0.5, "top_k": 3, "max_tokens": 5})
    );
    drop(server);

    // use_generation_config = false: the model's file is ignored, [sampling] is in force.
    std::fs::write(
        &cfg,
        "use_generation_config = false\n[sampling]\ntemperature = 0.0\nmax_tokens = 7\n",
    )
    .unwrap();
    let server = serve(&model, &["--config", cfg.to_str().unwrap()]);
    assert_eq!(
        sampling_defaults(&server),
        json!({"temperature": 0.0, "max_tokens": 7})
    );
    assert_eq!(tokens(&server, json!({"seed": 3})), greedy[..7]);
    // A default max_tokens beyond the context is cut to fit, never refused.
    drop(server);
    std::fs::write(&cfg, "[sampling]\ntemperature = 0.0\nmax_tokens = 100000\n").unwrap();
    let server = serve(&plain, &["--config", cfg.to_str().unwrap()]);
    assert_eq!(tokens(&server, json!({})), full);
}

#[test]
fn an_unusable_generation_config_stops_the_server_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_with(dir.path(), Some(r#"{"temperature": 9.0}"#));
    let out = std::process::Command::new(bin())
        .args(["serve", "--port", "0", "--model", model.to_str().unwrap()])
        .args(["--adapters-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("generation_config.json")
            && err.contains("temperature must be between 0 and 2"),
        "{err}"
    );
}
