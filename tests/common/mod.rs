//! Helpers shared by the integration tests: fixture paths and the golden file.
#![allow(dead_code)]

pub mod combos;
pub mod corrupt;
pub mod golden;
pub mod hostile_cases;
pub mod paged;
pub mod raw;
pub mod server;

use serde_json::Value;
use std::path::PathBuf;

/// The repository root: where the tests were built, or `LORAPLEX_TEST_ROOT` (a test binary
/// carried to another machine, as the GPU check does).
pub fn repo_root() -> PathBuf {
    match std::env::var_os("LORAPLEX_TEST_ROOT") {
        Some(root) => PathBuf::from(root),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

pub fn tiny_model() -> PathBuf {
    fixtures().join("tiny-llama")
}

pub fn tiny_adapter(name: &str) -> PathBuf {
    fixtures().join("tiny-adapters").join(name)
}

pub fn golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("tiny-golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Path of the built `loraplex` binary.
/// (`LORAPLEX_BIN` overrides it for a test binary carried to another machine.)
pub fn bin() -> PathBuf {
    match std::env::var_os("LORAPLEX_BIN") {
        Some(b) => PathBuf::from(b),
        None => PathBuf::from(env!("CARGO_BIN_EXE_loraplex")),
    }
}

/// GPT-2's byte → printable-character table (how byte-level BPE vocabularies spell raw bytes).
pub fn byte_token(b: u8) -> String {
    let printable =
        |c: u32| (33..=126).contains(&c) || (161..=172).contains(&c) || (174..=255).contains(&c);
    if printable(b as u32) {
        return char::from_u32(b as u32).unwrap().to_string();
    }
    let mut n = 0;
    for c in 0..256u32 {
        if !printable(c) {
            if c == b as u32 {
                return char::from_u32(256 + n).unwrap().to_string();
            }
            n += 1;
        }
    }
    unreachable!()
}

/// llama.cpp's Q/K row permutation, written independently of the library: HF row
/// `h*d + half*d/2 + i` moves to `h*d + 2*i + half`.
pub fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..d / 2 {
                let src = h * d + half * d / 2 + i;
                let dst = h * d + 2 * i + half;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Writes the tiny fixture model as a llama.cpp-style GGUF (f32 tensors, permuted Q/K, a
/// 256-token byte-level tokenizer whose pre-tokenizer is `pre`). Without `lm_head` the file has
/// no `output.weight` (tied embeddings).
pub fn write_tiny_gguf(path: &std::path::Path, pre: &str, lm_head: bool) {
    write_tiny_gguf_with(path, pre, lm_head, None)
}

/// A chat template for the byte-level tiny model.
pub const TINY_CHAT_TEMPLATE: &str = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

/// `write_tiny_gguf` with an optional `tokenizer.chat_template`.
pub fn write_tiny_gguf_with(
    path: &std::path::Path,
    pre: &str,
    lm_head: bool,
    chat_template: Option<&str>,
) {
    let tokens: Vec<String> = (0..=255u8).map(byte_token).collect();
    write_tiny_gguf_tokens(path, pre, lm_head, chat_template, &tokens);
}

/// `write_tiny_gguf_with` with the vocabulary's 256 strings given (e.g. `t0` .. `t255`, so that
/// a token's text names its id).
pub fn write_tiny_gguf_tokens(
    path: &std::path::Path,
    pre: &str,
    lm_head: bool,
    chat_template: Option<&str>,
    token_strings: &[String],
) {
    use candle_core::quantized::{gguf_file::Value, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let cfg: Value2 =
        serde_json::from_str(&std::fs::read_to_string(tiny_model().join("config.json")).unwrap())
            .unwrap();
    let st = candle_core::safetensors::load(tiny_model().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let (nh, nkv) = (
        u("num_attention_heads") as usize,
        u("num_key_value_heads") as usize,
    );
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, t: &Tensor, permute_heads: Option<usize>| {
        let t = match permute_heads {
            Some(h) => {
                let (r, c) = t.dims2().unwrap();
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                Tensor::from_vec(llama_cpp_permute(&v, r, c, h), (r, c), &Device::Cpu).unwrap()
            }
            None => t.clone(),
        };
        tensors.push((name, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    };
    add(
        "token_embd.weight".into(),
        &st["model.embed_tokens.weight"],
        None,
    );
    add("output_norm.weight".into(), &st["model.norm.weight"], None);
    if lm_head {
        add("output.weight".into(), &st["lm_head.weight"], None);
    }
    for l in 0..u("num_hidden_layers") as usize {
        let hf = |n: &str| &st[&format!("model.layers.{l}.{n}.weight")];
        add(
            format!("blk.{l}.attn_norm.weight"),
            hf("input_layernorm"),
            None,
        );
        add(
            format!("blk.{l}.ffn_norm.weight"),
            hf("post_attention_layernorm"),
            None,
        );
        add(
            format!("blk.{l}.attn_q.weight"),
            hf("self_attn.q_proj"),
            Some(nh),
        );
        add(
            format!("blk.{l}.attn_k.weight"),
            hf("self_attn.k_proj"),
            Some(nkv),
        );
        add(
            format!("blk.{l}.attn_v.weight"),
            hf("self_attn.v_proj"),
            None,
        );
        add(
            format!("blk.{l}.attn_output.weight"),
            hf("self_attn.o_proj"),
            None,
        );
        add(
            format!("blk.{l}.ffn_gate.weight"),
            hf("mlp.gate_proj"),
            None,
        );
        add(format!("blk.{l}.ffn_up.weight"), hf("mlp.up_proj"), None);
        add(
            format!("blk.{l}.ffn_down.weight"),
            hf("mlp.down_proj"),
            None,
        );
    }
    assert_eq!(token_strings.len(), 256);
    let tokens: Vec<Value> = token_strings.iter().cloned().map(Value::String).collect();
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tiny".into())),
        ("llama.embedding_length", Value::U32(u("hidden_size"))),
        ("llama.block_count", Value::U32(u("num_hidden_layers"))),
        (
            "llama.feed_forward_length",
            Value::U32(u("intermediate_size")),
        ),
        ("llama.attention.head_count", Value::U32(nh as u32)),
        ("llama.attention.head_count_kv", Value::U32(nkv as u32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (
            "llama.rope.freq_base",
            Value::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        ),
        (
            "llama.context_length",
            Value::U32(u("max_position_embeddings")),
        ),
        ("llama.rope.dimension_count", Value::U32(u("head_dim"))),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array((0..256).map(|_| Value::I32(1)).collect()),
        ),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    let mut md = md;
    if let Some(t) = chat_template {
        md.push(("tokenizer.chat_template", Value::String(t.into())));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

type Value2 = serde_json::Value;

/// Copies a folder's files (one level).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Copies fixture adapter `from` to `dir/name` with every lora_B multiplied by `factor`
/// (a distinct adapter of the same shapes).
pub fn scaled_adapter(from: &str, dir: &std::path::Path, name: &str, factor: f64) -> PathBuf {
    let out = dir.join(name);
    copy_dir(&tiny_adapter(from), &out);
    let dev = candle_core::Device::Cpu;
    let st = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &dev).unwrap();
    let scaled: std::collections::HashMap<String, candle_core::Tensor> = st
        .into_iter()
        .map(|(k, t)| {
            let t = if k.contains("lora_B") {
                (t * factor).unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect();
    candle_core::safetensors::save(&scaled, out.join("adapter_model.safetensors")).unwrap();
    out
}

/// Writes `n` adapters into `dir` (`mix0`, `mix1`, ...): the three fixture adapters in turn,
/// each with lora_B scaled by its own factor, so every one answers differently. Returns names.
pub fn many_adapters(dir: &std::path::Path, n: usize) -> Vec<String> {
    let from = ["all-r8", "attn-r4", "rslora-r16"];
    (0..n)
        .map(|i| {
            let name = format!("mix{i}");
            let factor = 0.5 + 0.25 * (i / from.len()) as f64;
            scaled_adapter(from[i % from.len()], dir, &name, factor);
            name
        })
        .collect()
}

/// Writes an adapter (attn-r4's config) whose q/v lora_A takes `in_features` inputs: a mismatch
/// for the tiny model (64) unless `in_features` is 64.
pub fn write_mismatched_adapter(dir: &std::path::Path, in_features: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        tiny_adapter("attn-r4").join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let dev = candle_core::Device::Cpu;
    let zeros = |shape: (usize, usize)| {
        candle_core::Tensor::zeros(shape, candle_core::DType::F32, &dev).unwrap()
    };
    let mut t = std::collections::HashMap::new();
    for l in 0..2 {
        for m in ["q_proj", "v_proj"] {
            let pre = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            t.insert(format!("{pre}.lora_A.weight"), zeros((4, in_features)));
            t.insert(format!("{pre}.lora_B.weight"), zeros((64, 4)));
        }
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
}

/// Deterministic N(0, sigma) values (LCG + Box-Muller).
pub fn normal(n: usize, seed: u64, sigma: f64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut uni = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (uni(), uni());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * sigma) as f32
        })
        .collect()
}
