//! `loraplex info`: what a base model and adapters are made of.

use super::ModelArgs;
use crate::lora::{AdapterSpec, LoraAdapter};
use anyhow::Result;
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter folders to describe (validated against the base); repeatable. Unset: the base
    /// only.
    #[arg(long = "adapter", short = 'a', value_name = "DIR")]
    pub adapters: Vec<AdapterSpec>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn adapter_json(a: &LoraAdapter) -> Value {
    json!({
        "name": a.name,
        "path": a.dir,
        "r": a.config.r,
        "lora_alpha": a.config.lora_alpha,
        "use_rslora": a.config.use_rslora,
        "targets": a.targets(),
        "scaling": a.scalings(),
        "modules": a.modules.len(),
        "bytes": a.bytes(),
    })
}

pub fn run(a: InfoArgs) -> Result<()> {
    let m = a.model.load()?;
    let c = &m.llama.cfg;
    let bytes: Vec<Value> = m
        .llama
        .bytes_by_dtype()
        .into_iter()
        .map(|(d, b)| json!({"dtype": d, "bytes": b}))
        .collect();
    let linear = m.llama.linear_weight_bytes();
    let mut adapters = Vec::new();
    for s in &a.adapters {
        adapters.push(adapter_json(&LoraAdapter::load(&s.name()?, &s.dir, c)?));
    }
    let device = crate::runtime::device::describe(m.llama.device());
    let weight_bytes: usize = m.llama.bytes_by_dtype().iter().map(|(_, b)| b).sum();
    let memory = crate::runtime::device::memory_info(m.llama.device())?;
    let device_memory = json!({
        "weights": weight_bytes,
        "free": memory.map(|(f, _)| f),
        "total": memory.map(|(_, t)| t),
    });
    let v = json!({
        "model": m.id,
        "path": m.path,
        "format": format!("{:?}", m.format),
        "architecture": c.model_type,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "context": m.llama.max_context(),
        "rope_theta": c.rope_theta,
        "tied_embeddings": m.llama.lm_head_tied(),
        "parameters": m.llama.num_params(),
        "bytes_by_dtype": bytes,
        "quantization": m.llama.nf4_settings().map(|s| json!({
            "type": "nf4", "blocksize": s.blocksize, "double_quant": s.double_quant,
        })),
        "linear_weight_bytes": linear.resident,
        "linear_weight_bytes_as_f16": linear.f16,
        "eos_ids": m.eos_ids,
        "has_tokenizer": m.tokenizer.is_some(),
        "device": device,
        "dtype": format!("{:?}", m.llama.dtype()).to_lowercase(),
        "device_memory": device_memory,
        "adapters": adapters,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "model        {} ({:?}, {})",
        m.id,
        m.format,
        m.path.display()
    );
    println!(
        "architecture {} — {} layers, hidden {}, ffn {}",
        c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size
    );
    println!(
        "attention    {} heads, {} kv heads, head_dim {}, rope_theta {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta
    );
    println!(
        "vocab        {} (lm_head {}), context {}",
        c.vocab_size,
        if m.llama.lm_head_tied() {
            "tied"
        } else {
            "separate"
        },
        m.llama.max_context()
    );
    println!("parameters   {}", m.llama.num_params());
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!(
        "device       {device} ({}), weights {:.2} GiB{}",
        v["dtype"].as_str().unwrap_or(""),
        gib(weight_bytes),
        match memory {
            Some((free, total)) => format!(", {:.1} of {:.1} GiB free", gib(free), gib(total)),
            None => String::new(),
        }
    );
    for (d, b) in m.llama.bytes_by_dtype() {
        println!("bytes        {d}: {b} ({:.1} MiB)", b as f64 / 1048576.0);
    }
    println!(
        "linear       {} bytes resident, {:.3}x of f16{}",
        linear.resident,
        linear.resident as f64 / linear.f16.max(1) as f64,
        match m.llama.nf4_settings() {
            Some(s) => format!(
                " (NF4, blocks of {}{})",
                s.blocksize,
                if s.double_quant {
                    ", double quantization"
                } else {
                    ""
                }
            ),
            None => String::new(),
        }
    );
    for ad in &v["adapters"].as_array().cloned().unwrap_or_default() {
        println!(
            "adapter      {}: r={} alpha={} rslora={} scaling={} targets={} bytes={}",
            ad["name"].as_str().unwrap_or(""),
            ad["r"],
            ad["lora_alpha"],
            ad["use_rslora"],
            ad["scaling"],
            ad["targets"],
            ad["bytes"]
        );
    }
    Ok(())
}
