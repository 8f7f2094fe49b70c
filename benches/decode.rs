//! Prefill and single-stream decode speed on the default model: base, one adapter (r=16 on all
//! seven linear modules), a stack of two, the adapter merged into the base, and the NF4-quantized
//! base (plain, with the adapter, with double quantization).
//!
//! `cargo bench --bench decode` (fetches the default model on first use). Knobs:
//! `LORAPLEX_BENCH_PROMPT` (prompt tokens, default 128), `LORAPLEX_BENCH_DECODE` (generated tokens,
//! default 64), `LORAPLEX_BENCH_RUNS` (repeats; the median is reported, default 3).

use anyhow::Result;
use loraplex::generate::{generate, GenerationParams};
use loraplex::lora::synthetic::write_synthetic_adapter;
use loraplex::lora::{LoraAdapter, LoraStack};
use loraplex::model::{self, LoadedModel, Nf4Settings, Proj};
use std::sync::Arc;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
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
        write_synthetic_adapter(
            &dir.path().join(name),
            &m.llama.cfg,
            16,
            &Proj::ALL,
            0.37 + i as f64,
            0.02,
        )?;
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
    let mut nf4 = model::load(None)?;
    nf4.quantize(Some(Nf4Settings::new(false)))?;
    rows.push(measure("NF4 base", &nf4, &prompt, None, n, runs)?);
    rows.push(measure(
        "NF4 base + adapter r16",
        &nf4,
        &prompt,
        Some(one.clone()),
        n,
        runs,
    )?);
    drop(nf4);
    let mut nf4dq = model::load(None)?;
    nf4dq.quantize(Some(Nf4Settings::new(true)))?;
    rows.push(measure(
        "NF4 + double quant base",
        &nf4dq,
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
