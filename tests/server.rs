//! `loraplex serve` end to end over HTTP on the tiny fixture model (as a GGUF with a byte-level
//! tokenizer and a chat template): batching equals `generate`, the official `openai` client,
//! bad input, adapter admin, cache churn, disconnects, merged mode, auth and backpressure.

mod common;

use common::server::{assert_error, Server};
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    adapters: PathBuf,
}

/// tiny.gguf + an adapters dir with attn-r4, all-r8, rslora-r16 and neg-attn (attn-r4 with -B).
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf_with(&model, "smollm", true, Some(TINY_CHAT_TEMPLATE));
    let adapters = dir.path().join("adapters");
    for a in ["attn-r4", "all-r8", "rslora-r16"] {
        copy_dir(&tiny_adapter(a), &adapters.join(a));
    }
    scaled_adapter("attn-r4", &adapters, "neg-attn", -1.0);
    Fixture {
        _dir: dir,
        model,
        adapters,
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
        ];
        args.extend_from_slice(extra);
        Server::start(&args)
    }

    /// What `loraplex generate` gives alone (greedy, ignoring EOS).
    fn generate_alone(
        &self,
        prompt: &[u32],
        adapters: &[(&str, f64)],
        max_tokens: usize,
    ) -> String {
        self.generate_alone_with(prompt, adapters, max_tokens, &[])
    }

    /// `generate_alone` with extra flags (e.g. `--quantize nf4`).
    fn generate_alone_with(
        &self,
        prompt: &[u32],
        adapters: &[(&str, f64)],
        max_tokens: usize,
        extra: &[&str],
    ) -> String {
        let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            s(&self.model).into(),
            "--prompt-ids".into(),
            ids.join(","),
            "--max-tokens".into(),
            max_tokens.to_string(),
            "--ignore-eos".into(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        for (name, w) in adapters {
            args.push("--adapter".into());
            args.push(format!("{}:{w}", s(&self.adapters.join(name))));
        }
        let out = Command::new(bin()).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["text"].as_str().unwrap().to_string()
    }
}

const BASE: &str = "tiny";

fn completion(model: &str, prompt: &[u32], max_tokens: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

/// Posts every body to /v1/completions at once (one thread each); answers in body order.
fn post_concurrently(server: &Server, bodies: &[Value]) -> Vec<(u16, Value)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|body| scope.spawn(move || server.post("/v1/completions", body)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn sixteen_concurrent_requests_over_adapters_and_a_stack_equal_generate_alone() {
    let f = fixture();
    let server = f.serve(&["--max-batch-size", "16"]);
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 15, 72, 101, 200],
        vec![1, 33, 7, 250, 128, 64, 9, 77, 4],
        vec![1, 5, 10, 20],
    ];
    // (model field, stack) for each kind of request.
    let kinds: Vec<(&str, Vec<(&str, f64)>)> = vec![
        (BASE, vec![]),
        ("attn-r4", vec![("attn-r4", 1.0)]),
        ("all-r8", vec![("all-r8", 1.0)]),
        ("rslora-r16", vec![("rslora-r16", 1.0)]),
        ("neg-attn", vec![("neg-attn", 1.0)]),
        (BASE, vec![("attn-r4", 0.7), ("all-r8", 0.5)]),
    ];
    let jobs: Vec<(usize, usize)> = (0..16)
        .map(|i| (i % kinds.len(), i % prompts.len()))
        .collect();
    let expected: Vec<String> = jobs
        .iter()
        .map(|&(k, p)| f.generate_alone(&prompts[p], &kinds[k].1, 10))
        .collect();
    let bodies: Vec<Value> = jobs
        .iter()
        .map(|&(k, p)| {
            let (model, stack) = &kinds[k];
            let mut body = completion(model, &prompts[p], 10);
            if stack.len() > 1 {
                body["adapters"] = json!(stack
                    .iter()
                    .map(|(n, w)| json!({"name": n, "weight": w}))
                    .collect::<Vec<_>>());
            }
            body
        })
        .collect();
    let got = post_concurrently(&server, &bodies);
    for (i, (code, body)) in got.iter().enumerate() {
        assert_eq!(*code, 200, "{body}");
        assert_eq!(
            body["choices"][0]["text"].as_str().unwrap(),
            expected[i],
            "request {i} ({:?})",
            kinds[jobs[i].0]
        );
        assert_eq!(body["usage"]["completion_tokens"], 10);
    }
    // They really were batched together: some step ran more than one sequence.
    let (_, metrics) = server.get("/metrics");
    let single: f64 = metrics
        .lines()
        .find(|l| l.starts_with("loraplex_batch_size_bucket{le=\"1\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(
        server.metric("loraplex_batch_size_count") > single,
        "no multi-sequence step:\n{metrics}"
    );
}

#[test]
fn official_openai_client_against_the_tiny_model() {
    let f = fixture();
    let server = f.serve(&[]);
    let seen = server.run_openai_client(BASE, "all-r8");
    assert!(seen["models"].as_array().unwrap().len() >= 5, "{seen}");
    // Without --kv-cache-bytes the CPU server still has a KV budget: half the host memory
    // available (Linux reports it), in blocks of 16 positions of 512 bytes each.
    #[cfg(target_os = "linux")]
    {
        let blocks = server.metric("loraplex_kv_blocks_total");
        let available = loraplex::runtime::device::host_memory_available().unwrap() as f64;
        assert!(
            blocks > 0.0 && blocks * 16.0 * 512.0 <= available,
            "{blocks}"
        );
    }
}

#[test]
fn sixteen_adapters_a_stack_and_the_base_under_concurrent_load_equal_alone() {
    let f = fixture();
    let names = many_adapters(&f.adapters, 16);
    let server = f.serve(&["--max-batch-size", "32"]);
    let seen = server.run_python("openai_concurrent.py", &[BASE, &names.join(","), "32"]);
    assert_eq!(seen["equal"], true, "{seen}");
    assert_eq!(seen["requests"], 32, "{seen}");
}

#[test]
fn kv_budget_makes_requests_wait_preempts_when_blocks_run_out_and_refuses_what_never_fits() {
    let f = fixture();
    // The tiny model's KV takes 512 bytes a position: ~2 of these requests fit at once.
    let server = f.serve(&["--kv-cache-bytes", "60000"]);
    let names = ["all-r8".to_string(), "attn-r4".to_string()];
    let seen = server.run_python("openai_concurrent.py", &[BASE, &names.join(","), "8"]);
    assert_eq!(seen["equal"], true, "{seen}");
    let chat = |max_tokens: u32| {
        let b = json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, "ignore_eos": true});
        server.post("/v1/chat/completions", &b)
    };
    let refused = chat(150);
    assert_error(
        &refused,
        400,
        "prompt + max_tokens over the whole KV budget",
    );
    assert!(
        refused.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("KV budget"),
        "{}",
        refused.1
    );
    assert_eq!(chat(8).0, 200);
    assert!(server.metric("loraplex_device_memory_bytes{kind=\"weights\"}") > 0.0);
    // Without max_tokens an answer may run to the context's end (256), which this budget cannot
    // hold; it runs to where the budget ends (112 positions) instead of being refused.
    let b = json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}],
        "ignore_eos": true});
    let (code, body) = server.post("/v1/chat/completions", &b);
    assert_eq!(code, 200, "{body}");
    let usage = &body["usage"];
    let total =
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(total, 112, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    // 7 blocks of 16 positions; ~20-token prompts take 2 blocks each, so three run at once and
    // grow to 4: the newest are preempted and recomputed, and each answer is what it is alone.
    assert_eq!(server.metric("loraplex_kv_blocks_total"), 7.0);
    assert_eq!(
        server.metric("loraplex_kv_paged"),
        0.0,
        "buffers on the CPU by default"
    );
    let (alone, together) = server.answers_alone_and_together(BASE, 4, 40);
    assert_eq!(together, alone);
    assert!(server.metric("loraplex_preemptions_total") > 0.0);
    assert_eq!(
        server.metric("vllm:num_preemptions_total"),
        server.metric("loraplex_preemptions_total")
    );
}

/// `--kv-layout paged` (the GPU's default) on the CPU: the same small budget, the sequences'
/// and the cached prefixes' keys and values in one pool of 7 blocks. Concurrent adapters, a
/// stack and the base answer as alone, preempted sequences come back with the same tokens, and
/// cached prefixes are reused from their blocks.
#[test]
fn paged_kv_layout_answers_as_alone_under_preemption() {
    let f = fixture();
    let server = f.serve(&["--kv-cache-bytes", "60000", "--kv-layout", "paged"]);
    assert_eq!(server.metric("loraplex_kv_blocks_total"), 7.0);
    assert_eq!(server.metric("loraplex_kv_paged"), 1.0);
    // 7 blocks of 16 positions of 512 bytes, allocated at start, are the device's KV memory.
    assert_eq!(server.metric("loraplex_kv_pool_bytes"), 7.0 * 16.0 * 512.0);
    assert_eq!(
        server.metric("loraplex_device_memory_bytes{kind=\"kv\"}"),
        7.0 * 16.0 * 512.0
    );
    let names = ["all-r8".to_string(), "attn-r4".to_string()];
    let seen = server.run_python("openai_concurrent.py", &[BASE, &names.join(","), "8"]);
    assert_eq!(seen["equal"], true, "{seen}");
    let (alone, together) = server.answers_alone_and_together(BASE, 4, 40);
    assert_eq!(together, alone);
    assert!(server.metric("loraplex_preemptions_total") > 0.0);
    assert!(server.metric("loraplex_prefix_cache_hits_total") > 0.0);
}

#[test]
fn bad_input_gets_openai_errors_and_the_server_keeps_serving() {
    let f = fixture();
    // A folder whose tensors do not fit the base (picked up at start-up, used by name below).
    let bad = f.adapters.join("wrong-shape");
    write_mismatched_adapter(&bad, 48);
    let server = f.serve(&[]);
    let chat = |extra: Value| {
        let mut b = json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        server.post("/v1/chat/completions", &b)
    };
    assert_error(
        &server.post_raw("/v1/chat/completions", "{not json"),
        400,
        "malformed JSON",
    );
    assert_error(
        &server.post_raw("/v1/chat/completions", "[1,2]"),
        400,
        "not an object",
    );
    assert_error(&chat(json!({"temperature": "hot"})), 400, "wrong type");
    assert_error(
        &chat(json!({"max_tokens": i64::MAX})),
        400,
        "max_tokens that overflows prompt + max_tokens",
    );
    assert_error(&chat(json!({"messages": "hi"})), 400, "messages not a list");
    assert_error(&chat(json!({"model": "nope"})), 404, "unknown adapter");
    assert_eq!(
        chat(json!({"model": "nope"})).1["error"]["code"],
        "model_not_found"
    );
    assert_error(
        &chat(json!({"model": "../attn-r4"})),
        404,
        "../ in model name",
    );
    assert_error(&chat(json!({"max_tokens": 0})), 400, "max_tokens 0");
    assert_error(&chat(json!({"max_tokens": -5})), 400, "max_tokens negative");
    assert_error(
        &chat(json!({"max_tokens": 1_000_000_000})),
        400,
        "max_tokens huge",
    );
    assert_error(&chat(json!({"temperature": -1})), 400, "temperature < 0");
    assert_error(&chat(json!({"top_p": 0})), 400, "top_p 0");
    assert_error(&chat(json!({"n": 0})), 400, "n 0");
    assert_error(
        &chat(json!({"logprobs": true, "top_logprobs": 21})),
        400,
        "top_logprobs > 20",
    );
    assert_error(
        &chat(json!({"adapters": [{"name": "nope"}]})),
        404,
        "unknown stacked adapter",
    );
    assert_error(
        &chat(json!({"messages": [{"role": "tool", "content": "x"}]})),
        400,
        "bad role",
    );
    let long: Vec<u32> = (0..300).map(|i| (i % 250) as u32 + 3).collect();
    assert_error(
        &server.post("/v1/completions", &completion(BASE, &long, 4)),
        400,
        "prompt over the context",
    );
    assert_error(
        &server.post("/v1/completions", &completion(BASE, &[1, 999], 4)),
        400,
        "token outside vocab",
    );
    // Adapter admin: traversal in names and paths, a shape-mismatched adapter.
    assert_error(
        &server.post("/v1/adapters", &json!({"name": "../x", "path": "attn-r4"})),
        400,
        "../ in name",
    );
    assert_error(
        &server.post(
            "/v1/adapters",
            &json!({"name": "x", "path": "../adapters/attn-r4"}),
        ),
        400,
        "../ in path",
    );
    assert_error(
        &server.post("/v1/adapters", &json!({"name": "x", "path": "/etc"})),
        400,
        "outside the dir",
    );
    let r = server.post(
        "/v1/adapters",
        &json!({"name": "wrong", "path": "wrong-shape"}),
    );
    assert_error(&r, 400, "shape mismatch");
    assert!(
        r.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[4, 48]"),
        "{}",
        r.1
    );
    // Using the bad folder by name fails that request only.
    let r = server.post("/v1/completions", &completion("wrong-shape", &[1, 2, 3], 2));
    assert_error(&r, 400, "bad adapter used by name");
    assert_error(
        &server.post("/v1/unload_lora_adapter", &json!({"lora_name": "nope"})),
        404,
        "unload unknown",
    );
    assert_error(
        &server.post("/v1/nothing", &json!({})),
        404,
        "unknown route",
    );
    // Still serving.
    let (code, body) = chat(json!({}));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(server.metric("loraplex_requests_total{adapter=\"invalid\",status=\"400\"}") >= 5.0);
    // Numbers that would break sampling are refused up front.
    assert_error(
        &chat(json!({"top_p": 1e-300, "temperature": 1})),
        400,
        "top_p below the smallest nucleus",
    );
    for w in [1e308, -1e308, 101.0] {
        let stack = json!({"adapters": [{"name": "attn-r4", "weight": w}]});
        assert_error(&chat(stack), 400, "stack weight out of bounds");
    }
    // Adapters whose numbers cannot be served are refused with the reason.
    scaled_adapter("all-r8", &f.adapters, "nan-b", f64::NAN);
    let huge = scaled_adapter("attn-r4", &f.adapters, "huge-alpha", 1.0);
    let cfg_path = huge.join("adapter_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["lora_alpha"] = json!(1e300);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    for (name, why) in [("nan-b", "NaN or infinite"), ("huge-alpha", "scaling")] {
        let got = server.post("/v1/adapters", &json!({"name": name, "path": name}));
        assert_error(&got, 400, name);
        let msg = got.1["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(why), "{name}: {msg}");
    }
    // Stacks with ever new weights (refused after resolution) add no new metric series.
    let series = || {
        let (_, text) = server.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with("loraplex_requests_total{"))
            .count()
    };
    let stack_chat = |w: f64| {
        chat(
            json!({"adapters": [{"name": "attn-r4", "weight": w}, {"name": "all-r8", "weight": 1.0}],
            "temperature": 7}),
        )
    };
    assert_error(&stack_chat(0.5), 400, "temperature out of range");
    let before = series();
    for i in 0..20 {
        assert_error(
            &stack_chat(0.1 + i as f64 / 7.0),
            400,
            "temperature out of range",
        );
    }
    assert_eq!(series(), before);
    assert!(
        server.metric("loraplex_requests_total{adapter=\"all-r8+attn-r4\",status=\"400\"}") >= 21.0
    );
}

#[test]
fn api_keys_protect_v1_and_admin_routes() {
    let f = fixture();
    let server = f.serve(&["--api-key", "user-key", "--admin-key", "admin-key"]);
    let body = completion(BASE, &[1, 2, 3], 2);
    assert_error(&server.post("/v1/completions", &body), 401, "missing key");
    assert_error(
        &server.post_with("/v1/completions", &body, Some("wrong")),
        401,
        "wrong key",
    );
    assert_eq!(
        server
            .post_with("/v1/completions", &body, Some("user-key"))
            .0,
        200
    );
    let reg = json!({"name": "again", "path": "attn-r4"});
    assert_error(
        &server.post_with("/v1/adapters", &reg, Some("user-key")),
        401,
        "user key on admin route",
    );
    assert_eq!(
        server.post_with("/v1/adapters", &reg, Some("admin-key")).0,
        200
    );
    assert_eq!(server.get("/health").0, 200, "health stays open");
    // The scheme is case-insensitive; a 401 names the scheme it wants.
    // (status, WWW-Authenticate) of a request with this Authorization header.
    let raw = |auth: &str| match ureq::post(&format!("{}/v1/completions", server.url))
        .set("Authorization", auth)
        .send_string(&body.to_string())
    {
        Ok(r) => (r.status(), None),
        Err(ureq::Error::Status(c, r)) => (c, r.header("WWW-Authenticate").map(str::to_string)),
        Err(e) => panic!("{e}"),
    };
    for auth in ["bearer user-key", "BEARER  user-key"] {
        assert_eq!(raw(auth).0, 200, "{auth}");
    }
    assert_eq!(raw("Basic user-key"), (401, Some("Bearer".to_string())));
}

#[test]
fn adapter_admin_register_replace_list_delete_and_vllm_routes() {
    let f = fixture();
    // A folder named as the base is not registered at start-up (it could never be reached).
    copy_dir(&tiny_adapter("attn-r4"), &f.adapters.join(BASE));
    let server = f.serve(&[]);
    let (code, list) = server.get("/v1/adapters");
    assert_eq!(code, 200);
    let list: Value = serde_json::from_str(&list).unwrap();
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["name"] != BASE),
        "{list}"
    );
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["state"] == "on-disk"));
    let prompt = [1u32, 15, 72, 101, 200];
    // Not under the base model's name (it could never be reached), on either route.
    assert_error(
        &server.post("/v1/adapters", &json!({"name": BASE, "path": "attn-r4"})),
        400,
        "adapter named as the base",
    );
    assert_error(
        &server.post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": BASE, "lora_path": "attn-r4"}),
        ),
        400,
        "vLLM route, adapter named as the base",
    );
    // Register attn-r4 under a new name: same output as attn-r4.
    let (code, s) = server.post("/v1/adapters", &json!({"name": "legal", "path": "attn-r4"}));
    assert_eq!(code, 200, "{s}");
    assert_eq!(
        (s["rank"].clone(), s["state"].clone()),
        (json!(4), json!("loaded"))
    );
    let want = f.generate_alone(&prompt, &[("attn-r4", 1.0)], 6);
    let got = server
        .post("/v1/completions", &completion("legal", &prompt, 6))
        .1;
    assert_eq!(got["choices"][0]["text"], want.as_str());
    // Replace it with neg-attn: new version, new output.
    let (code, s2) = server.post(
        "/v1/adapters",
        &json!({"name": "legal", "path": "neg-attn"}),
    );
    assert_eq!(code, 200);
    assert!(s2["version"].as_u64() > s["version"].as_u64());
    let want2 = f.generate_alone(&prompt, &[("neg-attn", 1.0)], 6);
    let got2 = server
        .post("/v1/completions", &completion("legal", &prompt, 6))
        .1;
    assert_eq!(got2["choices"][0]["text"], want2.as_str());
    // /v1/models lists it with the base as parent.
    let (_, models) = server.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    let legal = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "legal")
        .unwrap();
    assert_eq!(legal["parent"], BASE);
    // Delete → 404 afterwards.
    assert_eq!(server.delete("/v1/adapters/legal").0, 200);
    assert_error(
        &server.post("/v1/completions", &completion("legal", &prompt, 2)),
        404,
        "deleted adapter",
    );
    // vLLM's routes.
    let r = server.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "med", "lora_path": "all-r8"}),
    );
    assert_eq!(r.0, 200, "{}", r.1);
    assert_eq!(
        server
            .post("/v1/completions", &completion("med", &prompt, 2))
            .0,
        200
    );
    assert_eq!(
        server
            .post("/v1/unload_lora_adapter", &json!({"lora_name": "med"}))
            .0,
        200
    );
    assert_error(
        &server.post("/v1/completions", &completion("med", &prompt, 2)),
        404,
        "unloaded",
    );
}

#[test]
fn cache_of_two_adapters_churns_through_six_with_correct_output() {
    let f = fixture();
    let names = ["c0", "c1", "c2", "c3", "c4", "c5"];
    for (i, n) in names.iter().enumerate() {
        scaled_adapter("all-r8", &f.adapters, n, 0.5 + 0.25 * i as f64);
    }
    // all-r8 holds 65536 bytes of f32 tensors: room for two.
    let server = f.serve(&["--adapter-cache-bytes", "140000", "--max-batch-size", "8"]);
    let prompt = [1u32, 33, 7, 250];
    let want: Vec<String> = names
        .iter()
        .map(|n| f.generate_alone(&prompt, &[(n, 1.0)], 5))
        .collect();
    std::thread::scope(|scope| {
        for client in 0..4 {
            let (server, want) = (&server, &want);
            scope.spawn(move || {
                for round in 0..6 {
                    let i = (client + round) % names.len();
                    let (code, body) =
                        server.post("/v1/completions", &completion(names[i], &prompt, 5));
                    assert_eq!(code, 200, "{body}");
                    assert_eq!(
                        body["choices"][0]["text"],
                        want[i].as_str(),
                        "adapter {}",
                        names[i]
                    );
                }
            });
        }
    });
    assert!(
        server.metric("loraplex_adapter_cache_evictions_total") >= 1.0,
        "no evictions counted"
    );
    assert!(server.metric("loraplex_adapter_cache_bytes") <= 140000.0);
    assert!(server.metric("loraplex_adapter_cache_misses_total") >= 6.0);
}

#[test]
fn a_streaming_client_that_disconnects_frees_its_slot() {
    use std::io::{BufRead, BufReader, Write};
    let f = fixture();
    let server = f.serve(&[]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let body = json!({"model": BASE, "prompt": [1, 2, 3], "max_tokens": 240, "temperature": 0,
                      "ignore_eos": true, "stream": true})
    .to_string();
    {
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        write!(sock, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut reader = BufReader::new(sock.try_clone().unwrap());
        let mut data_lines = 0;
        let mut line = String::new();
        while data_lines < 3 {
            line.clear();
            assert!(
                reader.read_line(&mut line).unwrap() > 0,
                "stream ended early"
            );
            if line.starts_with("data:") {
                data_lines += 1;
            }
        }
        sock.shutdown(std::net::Shutdown::Both).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let cancelled = server.metric("loraplex_cancelled_sequences_total");
        let running = server.metric("loraplex_running_sequences");
        if cancelled >= 1.0 && running == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot not freed: cancelled {cancelled}, running {running}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        server.metric("loraplex_generated_tokens_total") < 240.0
            || server.metric("loraplex_requests_total{adapter=\"base\",status=\"cancelled\"}")
                >= 1.0
    );
    assert_eq!(
        server
            .post("/v1/completions", &completion(BASE, &[1, 2], 2))
            .0,
        200
    );
}

#[test]
fn nf4_base_serves_adapters_batched_together_and_reports_its_bytes() {
    let f = fixture();
    let nf4 = ["--quantize", "nf4", "--double-quant"];
    let mut args = nf4.to_vec();
    args.extend(["--max-batch-size", "8"]);
    let server = f.serve(&args);
    let prompt = [1u32, 33, 7, 250, 128, 64];
    let kinds: Vec<(&str, Vec<(&str, f64)>)> = vec![
        (BASE, vec![]),
        ("all-r8", vec![("all-r8", 1.0)]),
        ("rslora-r16", vec![("rslora-r16", 1.0)]),
        ("attn-r4", vec![("attn-r4", 1.0)]),
    ];
    let expected: Vec<String> = kinds
        .iter()
        .map(|(_, stack)| f.generate_alone_with(&prompt, stack, 10, &nf4))
        .collect();
    // The NF4 base answers differently from the f32 one (it is really quantized).
    assert_ne!(expected[0], f.generate_alone(&prompt, &[], 10));
    let bodies: Vec<Value> = kinds
        .iter()
        .chain(kinds.iter())
        .map(|(model, _)| completion(model, &prompt, 10))
        .collect();
    let got = post_concurrently(&server, &bodies);
    for (i, (code, body)) in got.iter().enumerate() {
        assert_eq!(*code, 200, "{body}");
        let want = &expected[i % kinds.len()];
        assert_eq!(
            body["choices"][0]["text"].as_str().unwrap(),
            want,
            "request {i}"
        );
    }
    let nf4_bytes = server.metric("loraplex_base_model_bytes_by_dtype{dtype=\"nf4\"}");
    let f32_bytes = server.metric("loraplex_base_model_bytes_by_dtype{dtype=\"f32\"}");
    assert!(
        nf4_bytes > 0.0 && f32_bytes > 0.0,
        "{nf4_bytes} {f32_bytes}"
    );
    assert_eq!(
        server.metric("loraplex_base_model_bytes "),
        nf4_bytes + f32_bytes
    );
}

#[test]
fn merged_mode_serves_the_merged_adapter_and_refuses_others() {
    let f = fixture();
    let server = f.serve(&["--merge", "all-r8"]);
    let prompt = [1u32, 15, 72, 101, 200];
    let want = f.generate_alone(&prompt, &[("all-r8", 1.0)], 8);
    let (code, body) = server.post("/v1/completions", &completion("all-r8", &prompt, 8));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], want.as_str());
    let r = server.post("/v1/completions", &completion(BASE, &prompt, 2));
    assert_error(&r, 404, "base in merged mode");
    assert!(r.1["error"]["message"].as_str().unwrap().contains("merged"));
    assert_error(
        &server.post("/v1/completions", &completion("attn-r4", &prompt, 2)),
        404,
        "other adapter",
    );
    let (_, models) = server.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    assert_eq!(models["data"][0]["id"], "all-r8");
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let f = fixture();
    let server = f.serve(&["--max-batch-size", "1", "--max-waiting", "1"]);
    let codes: Vec<u16> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..6)
            .map(|_| {
                let server = &server;
                scope.spawn(move || {
                    server.post("/v1/completions", &completion(BASE, &[1, 2, 3], 200))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                let (code, body) = h.join().unwrap();
                if code == 429 {
                    assert_eq!(body["error"]["type"], "rate_limit_error");
                }
                code
            })
            .collect()
    });
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
    let resp = ureq::get(&format!("{}/health", server.url)).call().unwrap();
    assert_eq!(resp.status(), 200);
}

#[test]
fn preload_chunked_prefill_n_choices_single_load_and_graceful_shutdown() {
    let f = fixture();
    let mut server = f.serve(&["--preload", "attn-r4", "--prefill-chunk", "4"]);
    // Preloaded before any request.
    let (_, list) = server.get("/v1/adapters");
    let list: Value = serde_json::from_str(&list).unwrap();
    let attn = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "attn-r4")
        .unwrap();
    assert_eq!(attn["state"], "loaded");
    // A 20-token prompt prefilled in chunks of 4 gives what `generate` gives.
    let prompt: Vec<u32> = (0..20).map(|i| (i * 13 % 250) as u32 + 3).collect();
    let want = f.generate_alone(&prompt, &[("attn-r4", 1.0)], 6);
    let (code, body) = server.post("/v1/completions", &completion("attn-r4", &prompt, 6));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], want.as_str());
    // n = 3 sampled choices, seeded per choice.
    let b = json!({"model": BASE, "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 3, "ignore_eos": true});
    let (code, body) = server.post("/v1/completions", &b);
    assert_eq!(code, 200, "{body}");
    let texts: Vec<&str> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 3);
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");
    assert_eq!(body["usage"]["completion_tokens"], 24);
    assert_eq!(
        server.post("/v1/completions", &b).1["choices"],
        body["choices"],
        "same seed, same choices"
    );
    // Eight concurrent first requests for one adapter load it once.
    let loads_before = server.metric("loraplex_adapter_load_seconds_count");
    std::thread::scope(|scope| {
        for _ in 0..8 {
            let server = &server;
            scope.spawn(move || {
                assert_eq!(
                    server
                        .post("/v1/completions", &completion("rslora-r16", &[1, 2], 2))
                        .0,
                    200
                )
            });
        }
    });
    assert_eq!(
        server.metric("loraplex_adapter_load_seconds_count") - loads_before,
        1.0
    );
    // SIGTERM: a clean exit.
    let status = server.terminate();
    assert!(status.success(), "{status}");
}
