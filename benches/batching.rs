//! Aggregate decode throughput of continuous batching on the default model: N sequences decoding
//! together each step (in forward calls of at most `loraplex::runtime::cpu::fast::MAX_ROWS` rows, as the scheduler does),
//! all on the base, or spread over 4 different adapters (r=16, all seven linear modules) — the
//! multi-adapter case llama.cpp cannot batch — on the f32 base and on the NF4 (double-quantized)
//! base.
//!
//! `cargo bench --bench batching`. Knobs: `LORAPLEX_BENCH_BATCHES` (default "1,4,16,32"),
//! `LORAPLEX_BENCH_STEPS` (decode steps measured, default 16).

use anyhow::Result;
use loraplex::lora::synthetic::write_synthetic_adapter;
use loraplex::lora::{LoraAdapter, LoraStack};
use loraplex::model::{self, LoadedModel, Nf4Settings, Proj};
use loraplex::runtime::{LogitsMode, SeqInput};
use std::sync::Arc;
use std::time::Instant;

/// Rows per forward call: `LORAPLEX_BENCH_CALL_ROWS`, default the CPU fast path's limit.
fn call_rows() -> usize {
    std::env::var("LORAPLEX_BENCH_CALL_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(loraplex::runtime::cpu::fast::MAX_ROWS)
        .max(1)
}

/// Tokens per second over `steps` decode steps of `stacks.len()` sequences decoding together.
fn throughput(m: &LoadedModel, stacks: &[Option<Arc<LoraStack>>], steps: usize) -> Result<f64> {
    let n = stacks.len();
    let mut caches: Vec<_> = (0..n).map(|_| m.llama.new_cache()).collect();
    let prompt: Vec<u32> = (0..32).map(|i| 100 + i).collect();
    // Prefill each (not measured).
    let mut next = vec![0u32; n];
    for (i, c) in caches.iter_mut().enumerate() {
        let mut s = [SeqInput {
            tokens: &prompt,
            cache: c,
            lora: stacks[i].clone(),
        }];
        let l = loraplex::runtime::forward(&m.llama, &mut s, LogitsMode::Last)?;
        next[i] = l.argmax(1)?.to_vec1::<u32>()?[0];
    }
    let t0 = Instant::now();
    for _ in 0..steps {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut seqs: Vec<SeqInput> = caches
            .iter_mut()
            .zip(&toks)
            .zip(stacks)
            .map(|((cache, t), lora)| SeqInput {
                tokens: t,
                cache,
                lora: lora.clone(),
            })
            .collect();
        // As the scheduler does: decode rows in calls of at most `loraplex::runtime::cpu::fast::MAX_ROWS`.
        next.clear();
        for chunk in seqs.chunks_mut(call_rows()) {
            let l = loraplex::runtime::forward(&m.llama, chunk, LogitsMode::Last)?;
            next.extend(l.argmax(1)?.to_vec1::<u32>()?);
        }
    }
    Ok((n * steps) as f64 / t0.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    loraplex::init_threads();
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let batches: Vec<usize> = std::env::var("LORAPLEX_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,4,16,32".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let steps: usize = std::env::var("LORAPLEX_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let m = model::load(None)?;
    let dir = tempfile::tempdir()?;
    let layers = m.llama.cfg.num_hidden_layers;
    let mut stacks = Vec::new();
    for i in 0..4 {
        let p = dir.path().join(format!("a{i}"));
        write_synthetic_adapter(&p, &m.llama.cfg, 16, &Proj::ALL, 0.3 + i as f64, 0.02)?;
        let a = Arc::new(LoraAdapter::load(&format!("a{i}"), &p, &m.llama.cfg)?);
        stacks.push(Some(Arc::new(LoraStack::single(a, layers)?)));
    }
    let mut nf4 = model::load(None)?;
    nf4.quantize(Some(Nf4Settings::new(true)))?;
    println!("| sequences | base only tok/s | 4 adapters mixed tok/s | mixed vs base | NF4 base tok/s | NF4 4 adapters mixed tok/s | NF4 vs f32 (base, mixed) |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &n in &batches {
        let mixed_stacks: Vec<_> = (0..n).map(|i| stacks[i % 4].clone()).collect();
        let base = throughput(&m, &vec![None; n], steps)?;
        let mixed = throughput(&m, &mixed_stacks, steps)?;
        let nf4_base = throughput(&nf4, &vec![None; n], steps)?;
        let nf4_mixed = throughput(&nf4, &mixed_stacks, steps)?;
        println!(
            "| {n} | {base:.1} | {mixed:.1} | {:.2}x | {nf4_base:.1} | {nf4_mixed:.1} | {:.2}x, {:.2}x |",
            mixed / base,
            nf4_base / base,
            nf4_mixed / mixed
        );
    }
    Ok(())
}
