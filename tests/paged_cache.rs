//! Paged KV caches (`KvCache::paged` over one `KvPool`) against per-sequence buffers on the tiny
//! model: the same prefill chunks and decode steps, with mixed adapters, through both the fast
//! path and the candle-op path (whose decode steps run `runtime::paged_kv`), give the same
//! logits bit for bit; tables grow block by block from scattered ids, as the engine hands them.

mod common;

use candle_core::Device;
use common::paged::{pool, run, steps_and_adapters};
use common::*;
use loraplex::model::{self, KvCache};
use loraplex::runtime::{Kernels, LogitsMode, SeqInput};

#[test]
fn paged_caches_give_the_logits_of_buffer_caches() {
    let m = model::load_path(&tiny_model(), &Device::Cpu).unwrap();
    let (steps, loras) = steps_and_adapters(&m);
    for kernels in [Kernels::Candle, Kernels::Auto] {
        let plain = run(&m, &steps, &loras, kernels, None);
        let paged = run(&m, &steps, &loras, kernels, Some(&pool(&m, 40)));
        assert_eq!(paged.len(), steps.len());
        for (s, (p, b)) in paged.iter().zip(&plain).enumerate() {
            let same = p == b;
            assert!(
                same,
                "{kernels:?}, step {s}: paged and buffer logits differ"
            );
        }
    }
}

#[test]
fn a_decode_step_mixing_paged_and_buffer_caches_is_an_error() {
    let m = model::load_path(&tiny_model(), &Device::Cpu).unwrap();
    let pool = pool(&m, 4);
    let max = m.llama.max_context();
    let (mut a, mut b) = (KvCache::paged(pool.clone(), max), m.llama.new_cache());
    a.set_table(vec![2]).unwrap();
    let (one, two) = ([7u32], [8u32]);
    let mut seqs = [
        SeqInput {
            tokens: &one,
            cache: &mut a,
            lora: None,
        },
        SeqInput {
            tokens: &two,
            cache: &mut b,
            lora: None,
        },
    ];
    let err =
        loraplex::runtime::forward_with(&m.llama, &mut seqs, LogitsMode::Last, Kernels::Candle)
            .unwrap_err();
    assert!(err.to_string().contains("mixes paged and unpaged"), "{err}");
    assert_eq!((a.len(), b.len()), (0, 0), "no cache advances on error");
    // A paged cache without the blocks for its next position is refused too.
    let mut c = KvCache::paged(pool, max);
    let mut seqs = [SeqInput {
        tokens: &one,
        cache: &mut c,
        lora: None,
    }];
    let err =
        loraplex::runtime::forward_with(&m.llama, &mut seqs, LogitsMode::Last, Kernels::Candle)
            .unwrap_err();
    assert!(err.to_string().contains("KV blocks"), "{err}");
}
