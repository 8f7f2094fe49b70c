//! Prefill and single-stream decode speed on the default model: base, one adapter (r=16 on all
//! seven linear modules), a stack of two, and the adapter merged into the base.
//!
//! `cargo bench --bench decode` (fetches the default model on first use). Knobs:
//! `LORAPLEX_BENCH_PROMPT` (prompt tokens, default 128), `LORAPLEX_BENCH_DECODE` (generated tokens,
//! default 64), `LORAPLEX_BENCH_RUNS` (repeats; the median is reported, default 3).

use anyhow::Result;
use candle_core::{Device, Tensor};
use loraplex::generate::{generate, GenerationParams};
use loraplex::lora::{LoraAdapter, LoraStack};
use loraplex::model::{self, LoadedModel, Proj};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Writes a PEFT adapter with deterministic non-zero weights.
fn write_adapter(dir: &Path, m: &LoadedModel, r: usize, seed: f32) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let cfg = &m.llama.cfg;
    let mut t = HashMap::new();
    for l in 0..cfg.num_hidden_layers {
        for p in Proj::ALL {
            let (i, o) = p.in_out(cfg);
            let pre = format!(
                "base_model.model.model.layers.{l}.{}.{}",
                p.parent(),
                p.name()
            );
            let wave = |n: usize, s: f32| -> Result<Tensor> {
                Ok(((Tensor::arange(0f32, n as f32, &Device::Cpu)? * (s as f64))?.sin()? * 0.02)?)
            };
            t.insert(
                format!("{pre}.lora_A.weight"),
                wave(r * i, seed + l as f32)?.reshape((r, i))?,
            );
            t.insert(
                format!("{pre}.lora_B.weight"),
                wave(o * r, seed * 1.3 + l as f32)?.reshape((o, r))?,
            );
        }
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors"))?;
    let targets: Vec<&str> = Proj::ALL.iter().map(|p| p.name()).collect();
    let config = serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
        "lora_alpha": 2 * r, "target_modules": targets, "bias": "none", "lora_dropout": 0.0});
    std::fs::write(dir.join("adapter_config.json"), config.to_string())?;
    Ok(())
}

struct Row {
    label: String,
    prefill_tps: f64,
    decode_tps: f64,
}

fn measure(
    label: &str,
    m: &LoadedModel,
    prompt: &[u32],
    lora: Option<Arc<LoraStack>>,
    n: usize,
    runs: usize,
) -> Result<Row> {
    let mut pre = Vec::new();
    let mut dec = Vec::new();
    for _ in 0..runs {
        let params = GenerationParams {
            max_tokens: n,
            ignore_eos: true,
            ..Default::default()
        };
        let g = generate(m, prompt, lora.clone(), params, |_| {})?;
        pre.push(prompt.len() as f64 / g.prefill_seconds);
        dec.push((g.ids.len() - 1) as f64 / g.decode_seconds);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let row = Row {
        label: label.to_string(),
        prefill_tps: median(&mut pre),
        decode_tps: median(&mut dec),
    };
    eprintln!(
        "{:<28} prefill {:>8.1} tok/s   decode {:>7.2} tok/s",
        row.label, row.prefill_tps, row.decode_tps
    );
    Ok(row)
}

fn main() -> Result<()> {
    loraplex::init_threads();
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let prompt_len = env_usize("LORAPLEX_BENCH_PROMPT", 128);
    let n = env_usize("LORAPLEX_BENCH_DECODE", 64);
    let runs = env_usize("LORAPLEX_BENCH_RUNS", 3).max(1);
    let m = model::load(None)?;
    let tok = m.tokenizer()?;
    let text =
        "The court held that the contract was void because the parties never agreed on the price. ";
    let mut prompt = tok.encode(&text.repeat(prompt_len / 8 + 1), false)?;
    prompt.truncate(prompt_len);
    let dir = tempfile::tempdir()?;
    let layers = m.llama.cfg.num_hidden_layers;
    let mut adapters = Vec::new();
    for (i, name) in ["bench-a", "bench-b"].iter().enumerate() {
        write_adapter(&dir.path().join(name), &m, 16, 0.37 + i as f32)?;
        adapters.push(Arc::new(LoraAdapter::load(
            name,
            &dir.path().join(name),
            &m.llama.cfg,
        )?));
    }
    let one = Arc::new(LoraStack::single(adapters[0].clone(), layers)?);
    let two = Arc::new(LoraStack::new(
        vec![(adapters[0].clone(), 0.7), (adapters[1].clone(), 0.5)],
        layers,
    )?);
    eprintln!(
        "model {} ({} params, {} threads), prompt {} tokens, decode {n} tokens, median of {runs}",
        m.id,
        m.llama.num_params(),
        candle_core::utils::get_num_threads(),
        prompt.len()
    );
    let mut rows = vec![
        measure("base", &m, &prompt, None, n, runs)?,
        measure(
            "adapter r16 all-linear",
            &m,
            &prompt,
            Some(one.clone()),
            n,
            runs,
        )?,
        measure("stack of 2 adapters", &m, &prompt, Some(two), n, runs)?,
    ];
    let mut merged = model::load(None)?;
    one.merge_into(&mut merged.llama)?;
    rows.push(measure(
        "adapter merged into base",
        &merged,
        &prompt,
        None,
        n,
        runs,
    )?);
    let base = rows[0].decode_tps;
    println!("\n| case | prefill tok/s | decode tok/s | decode vs base |");
    println!("| --- | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.2} | {:.2}x |",
            r.label,
            r.prefill_tps,
            r.decode_tps,
            r.decode_tps / base
        );
    }
    Ok(())
}
