//! The engine's prefix cache on the tiny model: a repeated prompt, a prompt sharing a prefix, the
//! next turn of a conversation (prompt + answer + more) and an adapter's prompts reuse cached
//! keys and values, report how many tokens they reused, and decode exactly what an engine
//! without the cache decodes; another adapter, or the base, never reuses an adapter's entry.

mod common;

use candle_core::Device;
use common::*;
use loraplex::engine::{EngineConfig, EngineEvent, EngineHandle, EngineMetrics, EngineRequest};
use loraplex::generate::GenerationParams;
use loraplex::lora::{LoraAdapter, LoraStack};
use loraplex::model::{self, LoadedModel};
use std::sync::Arc;

fn engine(m: &Arc<LoadedModel>, prefix_cache_bytes: usize) -> (EngineHandle, Arc<EngineMetrics>) {
    let registry = prometheus::Registry::new();
    let metrics = Arc::new(EngineMetrics::new(&registry).unwrap());
    let cfg = EngineConfig {
        prefix_cache_bytes,
        prefill_chunk: 5,
        ..EngineConfig::default()
    };
    (
        EngineHandle::start(m.clone(), cfg, metrics.clone()),
        metrics,
    )
}

fn stack(m: &LoadedModel, name: &str) -> Arc<LoraStack> {
    let a = LoraAdapter::load(name, &tiny_adapter(name), &m.llama.cfg).unwrap();
    Arc::new(LoraStack::new(vec![(Arc::new(a), 1.0)], m.llama.cfg.num_hidden_layers).unwrap())
}

/// Greedy ids and the cached prompt tokens Done reported.
fn run(e: &EngineHandle, prompt: &[u32], lora: Option<Arc<LoraStack>>) -> (Vec<u32>, usize) {
    let req = EngineRequest {
        prompt_ids: prompt.to_vec(),
        params: GenerationParams {
            max_tokens: 12,
            ignore_eos: true,
            ..GenerationParams::default()
        },
        lora,
        label: "test".into(),
        prompt_logprobs: None,
        prompt_only: false,
    };
    let mut rx = e.submit(req).unwrap();
    let mut ids = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            EngineEvent::Token { id, .. } => ids.push(id),
            EngineEvent::Done { cached_tokens, .. } => return (ids, cached_tokens),
            EngineEvent::Error(e) => panic!("{e}"),
            EngineEvent::PromptLogprobs(_) => panic!("unasked prompt logprobs"),
        }
    }
    panic!("channel closed")
}

/// What a case does, its prompt, its adapter stack, the cached tokens it must report.
type Case = (&'static str, Vec<u32>, Option<Arc<LoraStack>>, usize);

#[test]
fn reused_prefixes_decode_exactly_as_a_full_prefill_and_only_under_the_same_adapters() {
    let m = Arc::new(model::load_path(&tiny_model(), &Device::Cpu).unwrap());
    let (off, off_metrics) = engine(&m, 0);
    let (on, metrics) = engine(&m, 64 << 20);
    let adapter = stack(&m, "all-r8");
    let other = stack(&m, "attn-r4");

    let first: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79];
    // Each case: prompt, adapter, the cached tokens the engine with the cache must report.
    let (ids, cached) = run(&on, &first, None);
    assert_eq!(cached, 0, "nothing is cached yet");
    assert_eq!(ids, run(&off, &first, None).0);
    // The history the first sequence fed: its prompt and its answer but the last token.
    let fed = first.len() + ids.len() - 1;
    let mut next_turn = first.clone();
    next_turn.extend_from_slice(&ids);
    next_turn.extend_from_slice(&[7, 8, 9]);
    let mut shared = first[..5].to_vec();
    shared.extend_from_slice(&[100, 101, 102]);
    let cases: Vec<Case> = vec![
        (
            "the same prompt again",
            first.clone(),
            None,
            first.len() - 1,
        ),
        ("the next turn", next_turn.clone(), None, fed),
        ("a shared prefix of five", shared.clone(), None, 5),
        (
            "an adapter, first time",
            first.clone(),
            Some(adapter.clone()),
            0,
        ),
        ("the adapter again", first.clone(), Some(adapter.clone()), 7),
        (
            "the adapter's next turn",
            shared.clone(),
            Some(adapter.clone()),
            5,
        ),
        ("another adapter", first.clone(), Some(other.clone()), 0),
    ];
    for (what, prompt, lora, want_cached) in cases {
        let (with_cache, cached) = run(&on, &prompt, lora.clone());
        let (without, none) = run(&off, &prompt, lora);
        assert_eq!(none, 0, "{what}: the cache is off");
        assert_eq!(cached, want_cached, "{what}: cached tokens");
        assert_eq!(with_cache, without, "{what}: greedy ids differ");
    }
    // A stack of the same adapter at another weight is another stack.
    let reweighted = {
        let members = adapter
            .members
            .iter()
            .map(|(a, _)| (a.clone(), 0.5))
            .collect();
        Arc::new(LoraStack::new(members, m.llama.cfg.num_hidden_layers).unwrap())
    };
    let (ids, cached) = run(&on, &first, Some(reweighted.clone()));
    assert_eq!(
        cached, 0,
        "another weight must not reuse the weight-1 entry"
    );
    assert_eq!(ids, run(&off, &first, Some(reweighted)).0);

    assert_eq!(off_metrics.prefix_cache_hits.get(), 0);
    assert_eq!(metrics.prefix_cache_hits.get(), 5);
    assert_eq!(
        metrics.prefix_cache_reused_tokens.get() as usize,
        (first.len() - 1) + fed + 5 + 7 + 5
    );
    assert!(metrics.prefix_cache_bytes.get() > 0);
}

#[test]
fn the_byte_cap_evicts_the_least_recently_used_history() {
    let m = Arc::new(model::load_path(&tiny_model(), &Device::Cpu).unwrap());
    // The tiny model's KV is 512 bytes a position: a 30-position cap holds one 8-token prompt
    // with its 11 fed answer tokens (19 positions) but not two.
    let (on, metrics) = engine(&m, 30 * 512);
    let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8];
    let b: Vec<u32> = vec![9, 10, 11, 12, 13, 14, 15, 16];
    run(&on, &a, None);
    run(&on, &b, None);
    assert!(metrics.prefix_cache_bytes.get() <= 30 * 512);
    assert_eq!(run(&on, &b, None).1, 7, "the latest history is kept");
    assert_eq!(run(&on, &a, None).1, 0, "the older one was evicted");
}
