//! The fast inference path (`Kernels::Auto` with few rows) against the candle-op path
//! (`Kernels::Candle`) on the tiny model: prefill chunks, decode steps, mixed adapters.

mod common;

use candle_core::Device;
use common::paged::{run, stack};
use common::*;
use loraplex::lora::LoraStack;
use loraplex::model::{self, LoadedModel};
use loraplex::runtime::{Kernels, LogitsMode, SeqInput};
use std::sync::Arc;

/// Runs the same steps with both kernels and compares every call's logits.
fn compare(m: &LoadedModel, steps: &[Vec<Vec<u32>>], loras: &[Option<Arc<LoraStack>>]) {
    let fast = run(m, steps, loras, Kernels::Auto, None);
    let reference = run(m, steps, loras, Kernels::Candle, None);
    for (s, (f, r)) in fast.iter().zip(&reference).enumerate() {
        assert_eq!(f.len(), r.len());
        for (row, (a, b)) in f.iter().zip(r).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(
                d < 1e-5,
                "step {s} row {row}: fast and candle differ by {d}"
            );
            assert_eq!(argmax(a), argmax(b), "step {s} row {row}");
        }
    }
}

#[test]
fn fast_path_matches_candle_ops() {
    let m = model::load_path(&tiny_model(), &Device::Cpu).unwrap();
    let all = stack(&m, &[("all-r8", 1.0)]);
    let attn = stack(&m, &[("attn-r4", 1.0)]);
    let mixed = stack(&m, &[("all-r8", 0.7), ("attn-r4", -0.4)]);
    let loras = vec![None, Some(all.clone()), Some(attn), Some(mixed), Some(all)];
    let toks = |n: usize, seed: u32| -> Vec<u32> {
        (0..n as u32).map(|i| (seed * 31 + i * 17) % 250).collect()
    };
    let steps = vec![
        // Prefill: 3+1+5+2+4 = 15 rows (fast path).
        vec![toks(3, 1), toks(1, 2), toks(5, 3), toks(2, 4), toks(4, 5)],
        // Decode steps, one token each, some sequences idle.
        vec![toks(1, 6), toks(1, 7), toks(1, 8), toks(1, 9), toks(1, 10)],
        vec![toks(1, 11), vec![], toks(1, 12), toks(1, 13), vec![]],
        // A longer chunk (candle gemm for the linears) followed by more fast steps.
        vec![toks(20, 14), toks(1, 15), vec![], vec![], toks(2, 16)],
        vec![
            toks(1, 17),
            toks(1, 18),
            toks(1, 19),
            toks(1, 20),
            toks(1, 21),
        ],
        vec![toks(16, 22), vec![], vec![], vec![], vec![]],
    ];
    compare(&m, &steps, &loras);
}

#[test]
fn fast_path_checks_context_like_candle() {
    let m = model::load_path(&tiny_model(), &Device::Cpu).unwrap();
    let mut cache = m.llama.new_cache();
    let max = m.llama.max_context();
    let prompt: Vec<u32> = (0..max as u32 - 1).map(|i| i % 200).collect();
    let mut seqs = [SeqInput {
        tokens: &prompt,
        cache: &mut cache,
        lora: None,
    }];
    loraplex::runtime::forward(&m.llama, &mut seqs, LogitsMode::Last).unwrap();
    let two = [5u32, 6];
    let mut seqs = [SeqInput {
        tokens: &two,
        cache: &mut cache,
        lora: None,
    }];
    assert!(loraplex::runtime::forward(&m.llama, &mut seqs, LogitsMode::Last).is_err());
    assert_eq!(cache.len(), max - 1, "no cache advances on error");
    let one = [5u32];
    let mut seqs = [SeqInput {
        tokens: &one,
        cache: &mut cache,
        lora: None,
    }];
    loraplex::runtime::forward(&m.llama, &mut seqs, LogitsMode::Last).unwrap();
    assert_eq!(cache.len(), max);
}
