//! NF4 through the `loraplex` binary on the tiny fixture model: `--quantize nf4` on generate and
//! info, `quantize` writing a bitsandbytes folder that loads back bit for bit, a folder laid out
//! as transformers saves a `load_in_4bit` model, merge onto an NF4 base (re-quantized, with a
//! warning) and merge-then-quantize, QLoRA training, and clear errors for bad NF4 input.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn run_ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "loraplex {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_json(args: &[&str]) -> Value {
    serde_json::from_slice(&run_ok(args).stdout).unwrap()
}

fn run_err(args: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "loraplex {args:?}: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

const PROMPT: &str = "1,17,200,33,5,91,120,7";

/// `generate --json` (12 greedy tokens, top logprobs) with extra flags.
fn generate(model: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["generate", "--model", p(model), "--prompt-ids", PROMPT];
    args.extend([
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
        "--top-logprobs",
        "5",
    ]);
    args.extend(extra);
    let mut v = run_json(&args);
    v.as_object_mut().unwrap().remove("model");
    v
}

fn load_st(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    let flat = t.flatten_all().unwrap();
    match t.dtype() {
        DType::U8 => flat.to_vec1::<u8>().unwrap(),
        _ => flat
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    }
}

#[test]
fn quantize_writes_a_bitsandbytes_folder_that_loads_back_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    for dq in [false, true] {
        let out = dir.path().join(format!("nf4-{dq}"));
        let mut args = vec!["quantize", "--model", p(&model), "--out", p(&out)];
        if dq {
            args.push("--double-quant");
        }
        run_ok(&args);
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let q = &cfg["quantization_config"];
        assert_eq!(q["quant_method"], "bitsandbytes");
        assert_eq!(q["load_in_4bit"], true);
        assert_eq!(q["bnb_4bit_quant_type"], "nf4");
        assert_eq!(q["bnb_4bit_use_double_quant"], dq);
        let st = load_st(&out.join("model.safetensors"));
        let w = "model.layers.1.mlp.down_proj.weight";
        assert_eq!(st[w].dtype(), DType::U8);
        assert_eq!(st[w].dims(), &[64 * 128 / 2, 1]);
        assert_eq!(
            st[&format!("{w}.absmax")].dtype(),
            if dq { DType::U8 } else { DType::F32 }
        );
        assert_eq!(st.contains_key(&format!("{w}.nested_absmax")), dq);
        let qs = st[&format!("{w}.quant_state.bitsandbytes__nf4")]
            .to_vec1::<u8>()
            .unwrap();
        let qs: Value = serde_json::from_slice(&qs).unwrap();
        assert_eq!(qs["shape"], json!([64, 128]));
        assert_eq!(qs["blocksize"], 64);
        // Embedding, norms and lm_head stay dense.
        assert_eq!(st["model.embed_tokens.weight"].dtype(), DType::F32);
        assert_eq!(st["lm_head.weight"].dtype(), DType::F32);

        // The folder serves exactly what `--quantize nf4` computes in memory.
        let mut flags = vec!["--quantize", "nf4"];
        if dq {
            flags.push("--double-quant");
        }
        let in_memory = generate(&model, &flags);
        assert_eq!(generate(&out, &[]), in_memory);
        assert_ne!(generate(&model, &[])["ids"], in_memory["ids"]);

        // Saving the loaded folder again reproduces every tensor byte for byte.
        let again = dir.path().join(format!("again-{dq}"));
        run_ok(&["quantize", "--model", p(&out), "--out", p(&again)]);
        let st2 = load_st(&again.join("model.safetensors"));
        assert_eq!(st.len(), st2.len());
        for (k, t) in &st {
            assert_eq!(t.dtype(), st2[k].dtype(), "{k}");
            assert_eq!(t.dims(), st2[k].dims(), "{k}");
            assert!(
                bytes_of(t) == bytes_of(&st2[k]),
                "{k} changed on the round trip"
            );
        }

        // info: NF4 bytes by dtype and the ratio to f16.
        let info = run_json(&["info", "--model", p(&out), "--json"]);
        assert_eq!(info["quantization"]["type"], "nf4");
        assert_eq!(info["quantization"]["double_quant"], dq);
        let dtypes: Vec<&str> = info["bytes_by_dtype"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["dtype"].as_str().unwrap())
            .collect();
        assert!(
            dtypes.contains(&"nf4") && dtypes.contains(&"f32"),
            "{dtypes:?}"
        );
        let (res, f16) = (
            info["linear_weight_bytes"].as_f64().unwrap(),
            info["linear_weight_bytes_as_f16"].as_f64().unwrap(),
        );
        assert!(res / f16 < 0.4, "NF4 ratio {}", res / f16);
        let mem = run_json(&["info", "--model", p(&model), "--json"]);
        assert_eq!(mem["quantization"], Value::Null);
        assert_eq!(
            mem["linear_weight_bytes"].as_f64().unwrap(),
            2.0 * mem["linear_weight_bytes_as_f16"].as_f64().unwrap()
        );
    }
}

/// The tiny model as transformers saves it after `from_pretrained(..., load_in_4bit=True,
/// bnb_4bit_compute_dtype=bfloat16)`: bf16 dense tensors, 4-bit layers with a bfloat16
/// quant-state dtype, lm_head skipped.
fn write_transformers_style_folder(out: &Path, double_quant: bool) {
    use loraplex::quant::{quantize_nf4, quantize_nf4_double, save_layer};
    std::fs::create_dir_all(out).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_model().join("config.json")).unwrap())
            .unwrap();
    cfg["torch_dtype"] = json!("bfloat16");
    cfg["quantization_config"] = json!({
        "_load_in_4bit": true, "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null, "llm_int8_threshold": 6.0,
        "load_in_4bit": true, "load_in_8bit": false, "quant_method": "bitsandbytes"
    });
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    let st = load_st(&tiny_model().join("model.safetensors"));
    let mut map = HashMap::new();
    for (k, t) in st {
        let t = t.to_dtype(DType::BF16).unwrap();
        if k.contains("_proj.weight") {
            let (r, c) = t.dims2().unwrap();
            let v: Vec<f32> = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut w = match double_quant {
                true => quantize_nf4_double(&v, r, c, 64).unwrap(),
                false => quantize_nf4(&v, r, c, 64).unwrap(),
            };
            w.dtype = "bfloat16".into();
            save_layer(&w, k.trim_end_matches(".weight"), &mut map).unwrap();
        } else {
            map.insert(k, t);
        }
    }
    candle_core::safetensors::save(&map, out.join("model.safetensors")).unwrap();
}

#[test]
fn loads_a_folder_saved_by_transformers_from_a_load_in_4bit_model() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("hf-4bit");
    write_transformers_style_folder(&folder, true);
    let info = run_json(&["info", "--model", p(&folder), "--json"]);
    assert_eq!(info["quantization"]["type"], "nf4");
    assert_eq!(info["quantization"]["double_quant"], true);
    let g = generate(&folder, &[]);
    assert_eq!(g["ids"].as_array().unwrap().len(), 12);
    // With the adapter from the fixtures (PEFT, f32) on top.
    let a = tiny_adapter("all-r8");
    let ga = generate(&folder, &["--adapter", p(&a)]);
    assert_ne!(ga["ids"], g["ids"]);
}

#[test]
fn merge_onto_nf4_requantizes_with_a_warning_and_merge_then_quantize_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let adapter = tiny_adapter("all-r8");
    let nf4 = dir.path().join("nf4");
    run_ok(&["quantize", "--model", p(&model), "--out", p(&nf4)]);

    // Onto the NF4 folder: dequantize, merge, re-quantize, warn.
    let merged = dir.path().join("merged-nf4");
    let out = run_ok(&[
        "merge",
        "--model",
        p(&nf4),
        "--adapter",
        p(&adapter),
        "--out",
        p(&merged),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning:") && err.contains("quantized again"),
        "{err}"
    );
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    let merged_nf4 = generate(&merged, &[]);

    // Merge into f32 first, quantize after: one rounding, no warning.
    let mq = dir.path().join("merged-then-quantized");
    let out = run_ok(&[
        "merge",
        "--model",
        p(&model),
        "--quantize",
        "nf4",
        "--adapter",
        p(&adapter),
        "--out",
        p(&mq),
    ]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));
    let merge_then_quantize = generate(&mq, &[]);

    // Both are close to the exact f32 merge (the adapter served unmerged on f32): top-5 logprobs
    // of the first generated token agree to NF4 precision.
    let exact = generate(&model, &["--adapter", p(&adapter)]);
    let base_nf4 = generate(&nf4, &[]);
    let first = |v: &Value| -> Vec<f64> {
        v["top_logprobs"].as_array().unwrap()[..5]
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect()
    };
    let dist = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    let (e, m1, m2, b) = (
        first(&exact),
        first(&merged_nf4),
        first(&merge_then_quantize),
        first(&base_nf4),
    );
    assert!(dist(&e, &m2) < 0.5, "{e:?} vs {m2:?}");
    assert!(dist(&e, &m1) < 0.5, "{e:?} vs {m1:?}");
    assert_ne!(
        merged_nf4["ids"], base_nf4["ids"],
        "the merge changed nothing: {b:?}"
    );
}

#[test]
fn bad_nf4_input_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let e = run_err(&[
        "generate",
        "--model",
        p(&model),
        "--double-quant",
        "--prompt-ids",
        "1",
    ]);
    assert!(e.contains("--quantize nf4"), "{e}");
    // A usage error (clap's exit code 2) naming the value and the choices.
    let out = run(&[
        "generate",
        "--model",
        p(&model),
        "--quantize",
        "int3",
        "--prompt-ids",
        "1",
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("int3") && e.contains("nf4"),
        "{e}"
    );

    // Calibration: a bad dampening; a model without a tokenizer (calibration text needs one).
    let out = dir.path().join("never");
    let calibrate = |data: &str, extra: &[&str]| {
        let mut args = vec![
            "quantize",
            "--model",
            p(&model),
            "--out",
            p(&out),
            "--calibration",
            data,
        ];
        args.extend_from_slice(extra);
        run_err(&args)
    };
    let e = calibrate("x.jsonl", &["--damp", "0"]);
    assert!(e.contains("--damp"), "{e}");
    let data = dir.path().join("calibration.jsonl");
    std::fs::write(&data, "{\"instruction\": \"hi\", \"output\": \"hello\"}\n").unwrap();
    let e = calibrate(p(&data), &[]);
    assert!(
        e.contains("--calibration") && e.contains("no tokenizer"),
        "{e}"
    );
    assert!(!out.exists(), "nothing is written on a refusal");

    // Another quantization method in config.json.
    let gptq = dir.path().join("gptq");
    std::fs::create_dir_all(&gptq).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"] = json!({"quant_method": "gptq", "bits": 4});
    std::fs::write(gptq.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        model.join("model.safetensors"),
        gptq.join("model.safetensors"),
    )
    .unwrap();
    let e = run_err(&["info", "--model", p(&gptq)]);
    assert!(e.contains("gptq"), "{e}");

    // A 4-bit layer whose quant state is not JSON, and one whose shape disagrees with the config.
    let nf4 = dir.path().join("nf4");
    run_ok(&["quantize", "--model", p(&model), "--out", p(&nf4)]);
    let name = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4";
    for (label, bad) in [
        (
            "garbage",
            Tensor::new(b"not json".as_slice(), &Device::Cpu).unwrap(),
        ),
        ("shape", {
            let text =
                r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [32, 128]}"#;
            Tensor::new(text.as_bytes(), &Device::Cpu).unwrap()
        }),
    ] {
        let broken = dir.path().join(format!("broken-{label}"));
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::copy(nf4.join("config.json"), broken.join("config.json")).unwrap();
        let mut st = load_st(&nf4.join("model.safetensors"));
        st.insert(name.to_string(), bad);
        candle_core::safetensors::save(&st, broken.join("model.safetensors")).unwrap();
        let e = run_err(&["info", "--model", p(&broken)]);
        assert!(e.contains("q_proj"), "{label}: {e}");
    }
}
