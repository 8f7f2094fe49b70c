//! The `loraplex` binary end to end on the tiny fixture model: generate (base, adapter, stack),
//! merge + reload, info, --help, and clear errors for bad input.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn run_json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "loraplex {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs a command that must fail cleanly and returns its stderr.
fn run_err(args: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "loraplex {args:?} should fail");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn ids_arg(v: &Value) -> String {
    ids(v)
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn generate_matches_golden_continuations() {
    let g = golden();
    let model = tiny_model();
    for (label, results) in g["generation"]["results"].as_object().unwrap() {
        for r in results.as_array().unwrap() {
            let prompt = ids_arg(&g["prompts"][r["prompt"].as_str().unwrap()]);
            let adapter = tiny_adapter(label);
            let mut args = vec!["generate", "--model", p(&model), "--prompt-ids", &prompt];
            args.extend(["--max-tokens", "12", "--ignore-eos", "--json"]);
            if label != "base" {
                args.extend(["--adapter", p(&adapter)]);
            }
            let out = run_json(&args);
            assert_eq!(ids(&out["ids"]), ids(&r["new_ids"]), "{label}");
            assert_eq!(out["finish_reason"], "length");
            assert_eq!(
                ids(&out["prompt_ids"]),
                ids(&g["prompts"][r["prompt"].as_str().unwrap()])
            );
        }
    }
}

#[test]
fn stacked_adapters_give_the_weighted_stack_and_its_logprobs() {
    let g = golden();
    let case = &g["cases"]["stack-cat"]["results"][2];
    let prompt = ids_arg(&g["prompts"][case["prompt"].as_str().unwrap()]);
    let a1 = format!("{}:0.7", p(&tiny_adapter("attn-r4")));
    let a2 = format!("{}:0.5", p(&tiny_adapter("all-r8")));
    let out = run_json(&[
        "generate",
        "--model",
        p(&tiny_model()),
        "--prompt-ids",
        &prompt,
        "--adapter",
        &a1,
        "--adapter",
        &a2,
        "--max-tokens",
        "1",
        "--ignore-eos",
        "--json",
    ]);
    let logits = floats(&case["last_logits"]);
    let z = logits
        .iter()
        .map(|x| (x - logits[0]).exp())
        .sum::<f32>()
        .ln()
        + logits[0];
    let top = out["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 20);
    assert_eq!(out["ids"][0].as_u64().unwrap() as u32, argmax(&logits));
    for t in top {
        let id = t["id"].as_u64().unwrap() as usize;
        let want = logits[id] - z;
        let got = t["logprob"].as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() < 1e-4,
            "token {id}: logprob {got} vs {want}"
        );
    }
    let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
    assert!(
        lps.windows(2).all(|w| w[0] >= w[1]),
        "top_logprobs sorted best first"
    );
}

#[test]
fn merge_writes_a_folder_that_reloads_as_the_merged_model() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let st = run(&[
        "merge",
        "--model",
        p(&tiny_model()),
        "--adapter",
        p(&tiny_adapter("all-r8")),
        "--out",
        p(&out),
    ]);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let r = &g["generation"]["results"]["all-r8"][0];
    let prompt = ids_arg(&g["prompts"][r["prompt"].as_str().unwrap()]);
    let gen = run_json(&[
        "generate",
        "--model",
        p(&out),
        "--prompt-ids",
        &prompt,
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(ids(&gen["ids"]), ids(&r["new_ids"]));
    // A second merge into the same, now non-empty folder is refused and leaves it intact.
    let err = run_err(&[
        "merge",
        "--model",
        p(&tiny_model()),
        "--adapter",
        p(&tiny_adapter("attn-r4")),
        "--out",
        p(&out),
    ]);
    assert!(err.contains("already exists"), "{err}");
    let gen2 = run_json(&[
        "generate",
        "--model",
        p(&out),
        "--prompt-ids",
        &prompt,
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(gen2["ids"], gen["ids"]);
}

#[test]
fn info_describes_model_and_adapters() {
    let v = run_json(&[
        "info",
        "--model",
        p(&tiny_model()),
        "--adapter",
        p(&tiny_adapter("rslora-r16")),
        "--json",
    ]);
    assert_eq!(v["layers"], 2);
    assert_eq!(v["kv_heads"], 2);
    assert_eq!(v["vocab_size"], 256);
    assert_eq!(v["tied_embeddings"], false);
    let a = &v["adapters"][0];
    assert_eq!(a["r"], 16);
    assert_eq!(a["use_rslora"], true);
    assert_eq!(a["scaling"], serde_json::json!([4.0]));
    assert_eq!(
        a["targets"],
        serde_json::json!(["q_proj", "o_proj", "down_proj"])
    );
    assert!(a["bytes"].as_u64().unwrap() > 0);
}

#[test]
fn every_command_has_help() {
    for cmd in [
        vec!["--help"],
        vec!["generate", "--help"],
        vec!["merge", "--help"],
        vec!["info", "--help"],
        vec!["fetch", "--help"],
    ] {
        let out = run(&cmd);
        assert!(out.status.success(), "{cmd:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{cmd:?}"
        );
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let gen = |m: &str, extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            m,
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "2",
        ];
        a.extend_from_slice(extra);
        run_err(&a)
    };
    // Missing model.
    let err = gen("/nonexistent/model", &[]);
    assert!(err.contains("not found"), "{err}");
    // Corrupt safetensors.
    let corrupt = tmp.path().join("corrupt");
    copy_dir(&model, &corrupt);
    std::fs::write(
        corrupt.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
    )
    .unwrap();
    let err = gen(p(&corrupt), &[]);
    assert!(err.contains("model.safetensors"), "{err}");
    // Adapter for another base: q_proj A with 32 inputs instead of 64.
    let other = tmp.path().join("other-base");
    write_mismatched_adapter(&other, 32);
    let err = gen(p(&model), &["--adapter", p(&other)]);
    assert!(
        err.contains("lora_A.weight") && err.contains("[4, 32]") && err.contains("[4, 64]"),
        "{err}"
    );
    // Unsupported adapter feature: DoRA.
    let dora = tmp.path().join("dora");
    copy_dir(&tiny_adapter("attn-r4"), &dora);
    let cfg = std::fs::read_to_string(dora.join("adapter_config.json")).unwrap();
    std::fs::write(
        dora.join("adapter_config.json"),
        cfg.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let err = gen(p(&model), &["--adapter", p(&dora)]);
    assert!(err.contains("DoRA"), "{err}");
    // Missing adapter folder.
    let err = gen(p(&model), &["--adapter", "/nonexistent/adapter"]);
    assert!(err.contains("adapter_config.json"), "{err}");
    // Unknown GGUF pre-tokenizer.
    let gguf = tmp.path().join("odd.gguf");
    write_tiny_gguf(&gguf, "mystery-pre", true);
    let err = gen(p(&gguf), &[]);
    assert!(err.contains("mystery-pre"), "{err}");
    // Text prompt on a model without tokenizer.
    let err = run_err(&["generate", "--model", p(&model), "--prompt", "hello"]);
    assert!(err.contains("no tokenizer"), "{err}");
    // Token id outside the vocabulary, bad sampling values, bad adapter weight.
    assert!(gen(p(&model), &["--prompt-ids", "1,999"]).contains("vocabulary"));
    assert!(gen(p(&model), &["--temperature", "-1"]).contains("temperature"));
    assert!(gen(p(&model), &["--top-p", "0"]).contains("top_p"));
    let err = run_err(&[
        "generate",
        "--model",
        p(&model),
        "--prompt-ids",
        "1,2",
        "--max-tokens",
        "0",
    ]);
    assert!(err.contains("max_tokens"), "{err}");
}

#[test]
fn bench_runs_every_case_on_a_dummy_model_and_refuses_bad_workloads() {
    let rows = run_json(&[
        "bench",
        "--model",
        "dummy:tiny",
        "--streams",
        "1,4",
        "--adapters",
        "none,shared,distinct",
        "--rank",
        "4",
        "--targets",
        "q_proj,v_proj",
        "--prompt-len",
        "8",
        "--new-tokens",
        "6",
        "--warmup-steps",
        "1",
        "--warmup-secs",
        "0",
        "--kv-layouts",
        "buffers,paged",
        "--json",
    ]);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 12, "{rows:?}");
    let adapters: Vec<u64> = rows
        .iter()
        .map(|r| r["adapters"].as_u64().unwrap())
        .collect();
    assert_eq!(adapters, [0, 1, 1, 0, 1, 4, 0, 1, 1, 0, 1, 4]);
    let layouts: Vec<&str> = rows.iter().map(|r| r["layout"].as_str().unwrap()).collect();
    assert_eq!(layouts, [["buffers"; 6], ["paged"; 6]].concat());
    for r in rows {
        assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["prefill_tok_s"].as_f64().unwrap() > 0.0, "{r}");
        let ratio = r["vs_base"].as_f64().unwrap();
        match r["case"].as_str().unwrap() {
            "none" => assert_eq!(ratio, 1.0),
            _ => assert!(ratio > 0.0, "{r}"),
        }
        // No GPU: no device memory figure.
        assert!(r["device_mem_used_bytes"].is_null(), "{r}");
    }
    // The table form names every case.
    let out = run(&[
        "bench",
        "--model",
        "dummy:tiny",
        "--streams",
        "2",
        "--adapters",
        "distinct",
        "--prompt-len",
        "4",
        "--new-tokens",
        "4",
        "--warmup-steps",
        "0",
        "--warmup-secs",
        "0",
    ]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| 2 | 2 distinct | 16 |"), "{table}");
    for (args, needle) in [
        (vec!["--targets", "lm_head"], "unknown target module"),
        (
            vec!["--new-tokens", "3", "--warmup-steps", "5"],
            "more than warmup_steps",
        ),
        (
            vec!["--prompt-len", "250", "--new-tokens", "100"],
            "exceeds the model's context",
        ),
        (vec!["--device", "cuda"], "--features cuda"),
        (vec!["--dtype", "bf16"], "needs a GPU"),
    ] {
        let mut a = vec!["bench", "--model", "dummy:tiny", "--warmup-secs", "0"];
        a.extend(args);
        let err = run_err(&a);
        assert!(err.contains(needle), "{a:?}: {err}");
    }
    let err = run_err(&["bench", "--model", "dummy:llama-9"]);
    assert!(err.contains("unknown dummy model"), "{err}");
}
