//! `loraplex bench`: a fixed decode workload on any device, printed as a table.
//!
//! For each number of streams and each adapter case (none; one adapter shared by every stream;
//! a distinct adapter per stream, up to `--distinct`), every stream gets a seeded random prompt
//! of `prompt_len` tokens, prefilled in calls of the backend's row budget, then `new_tokens`
//! greedy decode steps over all streams at once (one batched forward per step, as the server's
//! scheduler does). Decode tok/s counts the timed steps only (after `warmup_steps`); the
//! process first decodes for `warmup_secs` to bring a GPU's clocks up. Adapters are synthetic
//! (`lora::synthetic_adapter`), built on the device, never on disk: speed does not depend on
//! the values, as with `dummy:` models. Each case runs with the KV layouts asked for: every
//! stream's own buffers, or one paged pool (`model::KvPool`, 16-position blocks, each stream's
//! blocks interleaved with the others', as a busy server's tables are).

use crate::lora::{synthetic::synthetic_adapter, LoraStack};
use crate::model::{dummy, KvCache, KvPool, LoadedModel, Proj};
use crate::runtime::{self, device::memory_info, Backend, LogitsMode, SeqInput};
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which adapters the streams of one case use.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AdapterCase {
    /// The base alone.
    None,
    /// One adapter shared by every stream.
    Shared,
    /// A different adapter per stream (cycling through `distinct` adapters).
    Distinct,
}

/// Where the streams' keys and values live.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchLayout {
    /// Each stream's own growable buffers.
    Buffers,
    /// One pool of blocks read through block tables.
    Paged,
}

/// Positions per block of the paged layout (the engine's).
const BENCH_BLOCK: usize = 16;

/// The workload.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    pub streams: Vec<usize>,
    pub cases: Vec<AdapterCase>,
    pub layouts: Vec<BenchLayout>,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub rank: usize,
    pub targets: Vec<Proj>,
    /// Most distinct adapters (streams beyond it reuse them in turn).
    pub distinct: usize,
    pub warmup_steps: usize,
    pub warmup_secs: f64,
    pub seed: u64,
}

/// One measured case.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub layout: BenchLayout,
    pub streams: usize,
    pub case: AdapterCase,
    /// Distinct adapters in the batch.
    pub adapters: usize,
    pub rank: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub ms_per_step: f64,
    /// Decode tok/s over the no-adapter case with as many streams (when measured).
    pub vs_base: Option<f64>,
    /// Device memory in use after the case (GPU only).
    pub device_mem_used_bytes: Option<usize>,
}

/// Runs every (streams, case) pair. `progress` hears one line per phase.
pub fn run(
    model: &LoadedModel,
    spec: &BenchSpec,
    mut progress: impl FnMut(&str),
) -> Result<Vec<BenchRow>> {
    if spec.streams.is_empty() || spec.cases.is_empty() || spec.layouts.is_empty() {
        bail!("bench: give at least one stream count, adapter case and KV layout");
    }
    if spec.prompt_len == 0 || spec.new_tokens <= spec.warmup_steps {
        bail!("bench: prompt_len must be ≥ 1 and new_tokens more than warmup_steps");
    }
    let llama = &model.llama;
    let need = spec.prompt_len + spec.new_tokens;
    if need > llama.max_context() {
        bail!(
            "bench: prompt_len + new_tokens = {need} exceeds the model's context of {}",
            llama.max_context()
        );
    }
    let at = llama.placement();
    let max_streams = spec.streams.iter().copied().max().unwrap_or(1);
    let n_adapters = match spec.cases.contains(&AdapterCase::Distinct) {
        true => spec.distinct.clamp(1, max_streams),
        false => usize::from(spec.cases.contains(&AdapterCase::Shared)),
    };
    let mut stacks = Vec::with_capacity(n_adapters);
    for i in 0..n_adapters {
        progress(&format!(
            "building synthetic adapter {}/{n_adapters}",
            i + 1
        ));
        let a = synthetic_adapter(
            &format!("bench{i}"),
            &llama.cfg,
            spec.rank,
            &spec.targets,
            0.02,
            &at,
        )?;
        let stack = LoraStack::new_on(vec![(Arc::new(a), 1.0)], llama.cfg.num_hidden_layers, &at)?;
        stacks.push(Arc::new(stack));
    }
    if spec.warmup_secs > 0.0 {
        progress(&format!("warming up for {:.0} s", spec.warmup_secs));
        let deadline = Instant::now() + Duration::from_secs_f64(spec.warmup_secs);
        while Instant::now() < deadline {
            measure(model, spec, 1, &[None], spec.layouts[0])?;
        }
    }
    let mut rows: Vec<BenchRow> = Vec::new();
    let cases = spec.layouts.iter().flat_map(|&l| {
        (spec.streams.iter()).flat_map(move |&s| spec.cases.iter().map(move |&c| (l, s, c)))
    });
    for (layout, streams, case) in cases {
        progress(&format!(
            "{streams} streams, adapters: {case:?}, KV {layout:?}"
        ));
        let per_stream: Vec<Option<Arc<LoraStack>>> = (0..streams)
            .map(|i| match case {
                AdapterCase::None => None,
                AdapterCase::Shared => stacks.first().cloned(),
                AdapterCase::Distinct => stacks.get(i % stacks.len().max(1)).cloned(),
            })
            .collect();
        let (prefill, decode, ms) = measure(model, spec, streams, &per_stream, layout)?;
        let adapters = match case {
            AdapterCase::None => 0,
            AdapterCase::Shared => 1,
            AdapterCase::Distinct => streams.min(stacks.len()),
        };
        let device_mem_used_bytes = memory_info(llama.device())?.map(|(free, total)| total - free);
        rows.push(BenchRow {
            layout,
            streams,
            case,
            adapters,
            rank: if adapters == 0 { 0 } else { spec.rank },
            prefill_tok_s: prefill,
            decode_tok_s: decode,
            ms_per_step: ms,
            vs_base: None,
            device_mem_used_bytes,
        });
    }
    let base: Vec<(BenchLayout, usize, f64)> = rows
        .iter()
        .filter(|r| r.case == AdapterCase::None)
        .map(|r| (r.layout, r.streams, r.decode_tok_s))
        .collect();
    for r in &mut rows {
        let same = |(l, s, _): &&(BenchLayout, usize, f64)| *l == r.layout && *s == r.streams;
        if let Some((_, _, b)) = base.iter().find(same) {
            r.vs_base = Some(r.decode_tok_s / b);
        }
    }
    Ok(rows)
}

/// Prefills and decodes one case; returns (prefill tok/s, decode tok/s, ms per decode step).
fn measure(
    model: &LoadedModel,
    spec: &BenchSpec,
    streams: usize,
    loras: &[Option<Arc<LoraStack>>],
    layout: BenchLayout,
) -> Result<(f64, f64, f64)> {
    let seed = spec.seed;
    let llama = &model.llama;
    let budget = Backend::of(llama.device())?.row_budget();
    let positions = spec.prompt_len + spec.new_tokens;
    let prompts: Vec<Vec<u32>> = (0..streams)
        .map(|i| dummy::prompt_ids(&llama.cfg, spec.prompt_len, seed + i as u64))
        .collect();
    let mut caches = new_caches(llama, streams, positions, layout)?;
    let lora = |i: usize| loras.get(i % loras.len().max(1)).cloned().flatten();
    // Prefill: sequences grouped into calls of at most the row budget (one alone if longer).
    let t0 = Instant::now();
    let prompt_refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let per_call = (budget / spec.prompt_len).max(1);
    let mut next = step_all(llama, &mut caches, &prompt_refs, &lora, per_call)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    // Decode: every stream one token per step.
    let mut timed = Duration::ZERO;
    for step in 0..spec.new_tokens.saturating_sub(1) {
        let t = Instant::now();
        let tokens: Vec<&[u32]> = next.iter().map(std::slice::from_ref).collect();
        next = step_all(llama, &mut caches, &tokens, &lora, budget)?;
        if step >= spec.warmup_steps {
            timed += t.elapsed();
        }
    }
    let steps = spec
        .new_tokens
        .saturating_sub(1)
        .saturating_sub(spec.warmup_steps)
        .max(1);
    let secs = timed.as_secs_f64().max(1e-9);
    Ok((
        (streams * spec.prompt_len) as f64 / prefill_s.max(1e-9),
        (streams * steps) as f64 / secs,
        secs * 1e3 / steps as f64,
    ))
}

/// `streams` empty caches for `positions` positions each, in `layout`: paged ones in one pool,
/// stream `i` holding blocks `i, i + streams, i + 2·streams, ...`.
fn new_caches(
    llama: &crate::model::Llama,
    streams: usize,
    positions: usize,
    layout: BenchLayout,
) -> Result<Vec<KvCache>> {
    let layers = llama.cfg.num_hidden_layers;
    if layout == BenchLayout::Buffers {
        return Ok((0..streams)
            .map(|_| KvCache::new(layers, positions))
            .collect());
    }
    let per_stream = positions.div_ceil(BENCH_BLOCK);
    let (_, nkv, hd) = llama.cfg.heads();
    let blocks = streams * per_stream;
    let pool = KvPool::new(
        layers,
        blocks,
        BENCH_BLOCK,
        (nkv, hd),
        llama.dtype(),
        llama.device(),
    )?;
    let pool = Arc::new(pool);
    (0..streams)
        .map(|i| {
            let mut c = KvCache::paged(pool.clone(), positions);
            let table = (0..per_stream).map(|b| (i + b * streams) as u32).collect();
            c.set_table(table)?;
            Ok(c)
        })
        .collect()
}

/// One forward over every stream (stream `i` feeds `tokens[i]`), in calls of at most `per_call`
/// sequences; returns each stream's greedy next id.
fn step_all(
    llama: &crate::model::Llama,
    caches: &mut [KvCache],
    tokens: &[&[u32]],
    lora: &dyn Fn(usize) -> Option<Arc<LoraStack>>,
    per_call: usize,
) -> Result<Vec<u32>> {
    let mut next = Vec::with_capacity(tokens.len());
    for (c, (caches, tokens)) in caches
        .chunks_mut(per_call)
        .zip(tokens.chunks(per_call))
        .enumerate()
    {
        let mut seqs: Vec<SeqInput<'_>> = caches
            .iter_mut()
            .zip(tokens)
            .enumerate()
            .map(|(j, (cache, &tokens))| SeqInput {
                tokens,
                cache,
                lora: lora(c * per_call + j),
            })
            .collect();
        let logits = runtime::forward(llama, &mut seqs, LogitsMode::Last)?;
        next.extend(argmax(&logits)?);
    }
    Ok(next)
}

/// Greedy ids of `[rows, vocab]` logits, computed on the logits' device; only the ids travel.
fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// The rows as a Markdown table.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| KV | streams | adapters | rank | prefill tok/s | decode tok/s | ms/step | vs no adapter | device mem GiB |\n\
         | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let case = match r.case {
            AdapterCase::None => "none".to_string(),
            AdapterCase::Shared => "1 shared".to_string(),
            AdapterCase::Distinct => format!("{} distinct", r.adapters),
        };
        out.push_str(&format!(
            "| {} | {} | {case} | {} | {:.0} | {:.1} | {:.2} | {} | {} |\n",
            match r.layout {
                BenchLayout::Buffers => "buffers",
                BenchLayout::Paged => "paged",
            },
            r.streams,
            r.rank,
            r.prefill_tok_s,
            r.decode_tok_s,
            r.ms_per_step,
            r.vs_base.map_or("-".into(), |v| format!("{v:.2}x")),
            r.device_mem_used_bytes.map_or("-".into(), |b| format!(
                "{:.1}",
                b as f64 / (1u64 << 30) as f64
            )),
        ));
    }
    out
}
