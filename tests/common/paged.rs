//! Paged KV caches against per-sequence buffers: the steps both run, and how they run them
//! (`tests/paged_cache.rs` on the CPU, `tests/gpu.rs` on the GPU).

use super::tiny_adapter;
use loraplex::lora::{LoraAdapter, LoraStack};
use loraplex::model::{KvCache, KvPool, LoadedModel};
use loraplex::runtime::{Kernels, LogitsMode, SeqInput};
use std::sync::Arc;

/// Per call, per sequence: its new tokens (empty = idle).
pub type Steps = Vec<Vec<Vec<u32>>>;
/// Per sequence: its adapter stack, if any.
pub type Adapters = Vec<Option<Arc<LoraStack>>>;

/// Positions per block of the pools these tests make (the engine's).
pub const BLOCK: usize = 16;

pub fn stack(m: &LoadedModel, names: &[(&str, f64)]) -> Arc<LoraStack> {
    let members = names
        .iter()
        .map(|(n, w)| {
            let a = LoraAdapter::load(n, &tiny_adapter(n), &m.llama.cfg).unwrap();
            (Arc::new(a), *w)
        })
        .collect();
    Arc::new(LoraStack::new(members, m.llama.cfg.num_hidden_layers).unwrap())
}

/// A pool of `blocks` blocks for `m`, on its device in its dtype.
pub fn pool(m: &LoadedModel, blocks: usize) -> Arc<KvPool> {
    let (_, nkv, hd) = m.llama.cfg.heads();
    let layers = m.llama.cfg.num_hidden_layers;
    let (dtype, device) = (m.llama.dtype(), m.llama.device());
    Arc::new(KvPool::new(layers, blocks, BLOCK, (nkv, hd), dtype, device).unwrap())
}

/// Four sequences' adapters (none, one, a stack, none) and steps for them (per sequence its new
/// tokens, empty = idle): prompts crossing block boundaries (15, 17 and 33 positions), decode
/// steps across the next boundaries, a second chunk for one sequence, a late prompt.
pub fn steps_and_adapters(m: &LoadedModel) -> (Steps, Adapters) {
    let all = stack(m, &[("all-r8", 1.0)]);
    let mixed = stack(m, &[("all-r8", 0.7), ("attn-r4", -0.4)]);
    let loras = vec![None, Some(all), Some(mixed), None];
    let toks = |n: usize, seed: u32| -> Vec<u32> {
        (0..n as u32).map(|i| (seed * 31 + i * 17) % 250).collect()
    };
    let one = |seed: u32| vec![toks(1, seed), toks(1, seed + 1), toks(1, seed + 2), vec![]];
    let mut steps = vec![vec![toks(15, 1), toks(17, 2), toks(33, 3), vec![]]];
    steps.extend((0..4).map(|i| one(10 + 3 * i)));
    steps.push(vec![toks(20, 30), toks(1, 31), vec![], toks(5, 32)]);
    steps.extend((0..3).map(|i| {
        let mut s = one(40 + 3 * i);
        s[3] = toks(1, 50 + i);
        s
    }));
    (steps, loras)
}

/// Runs `steps` with `kernels`, in buffer caches or (with `pool`) paged ones whose tables grow
/// block by block from scattered ids, and returns every call's logits.
pub fn run(
    m: &LoadedModel,
    steps: &[Vec<Vec<u32>>],
    loras: &[Option<Arc<LoraStack>>],
    kernels: Kernels,
    pool: Option<&Arc<KvPool>>,
) -> Vec<Vec<Vec<f32>>> {
    let max = m.llama.max_context();
    let mut caches: Vec<KvCache> = (loras.iter())
        .map(|_| match pool {
            Some(p) => KvCache::paged(p.clone(), max),
            None => m.llama.new_cache(),
        })
        .collect();
    // Free ids in a scattered order: every third, then the rest.
    let mut free: Vec<u32> = match pool {
        Some(p) => {
            let n = p.blocks() as u32;
            let mut ids: Vec<u32> = (0..n).filter(|i| i % 3 == 0).collect();
            ids.extend((0..n).filter(|i| i % 3 != 0));
            ids.reverse();
            ids
        }
        None => Vec::new(),
    };
    steps
        .iter()
        .map(|step| {
            if pool.is_some() {
                for (cache, tokens) in caches.iter_mut().zip(step) {
                    let (_, held) = cache.paged_table().unwrap();
                    let mut table = held.to_vec();
                    while table.len() * BLOCK < cache.len() + tokens.len() {
                        table.push(free.pop().expect("the pool is big enough"));
                    }
                    cache.set_table(table).unwrap();
                }
            }
            let mut seqs: Vec<SeqInput> = caches
                .iter_mut()
                .zip(step)
                .zip(loras)
                .filter(|((_, t), _)| !t.is_empty())
                .map(|((cache, tokens), lora)| SeqInput {
                    tokens,
                    cache,
                    lora: lora.clone(),
                })
                .collect();
            loraplex::runtime::forward_with(&m.llama, &mut seqs, LogitsMode::All, kernels)
                .unwrap()
                .to_vec2()
                .unwrap()
        })
        .collect()
}
