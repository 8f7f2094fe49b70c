//! The engine through its public handle on the tiny model: a sequence whose forward fails is
//! retired alone while its batch-mates finish exactly as they would alone, the KV budget
//! refuses a request that could never fit, sequences preempted when KV blocks run out finish as
//! they would alone, and a cancelled sequence leaves the gauges at zero.

mod common;

use candle_core::Device;
use common::*;
use loraplex::engine::{
    EngineConfig, EngineEvent, EngineHandle, EngineMetrics, EngineRequest, SubmitError,
};
use loraplex::generate::GenerationParams;
use loraplex::model;
use std::sync::Arc;

fn engine(kv_budget_bytes: Option<usize>) -> EngineHandle {
    engine_with_metrics(kv_budget_bytes).0
}

fn engine_with_metrics(kv_budget_bytes: Option<usize>) -> (EngineHandle, Arc<EngineMetrics>) {
    engine_with_config(EngineConfig {
        kv_budget_bytes,
        ..EngineConfig::default()
    })
}

fn engine_with_config(cfg: EngineConfig) -> (EngineHandle, Arc<EngineMetrics>) {
    let m = Arc::new(model::load_path(&tiny_model(), &Device::Cpu).unwrap());
    let registry = prometheus::Registry::new();
    let metrics = Arc::new(EngineMetrics::new(&registry).unwrap());
    (EngineHandle::start(m, cfg, metrics.clone()), metrics)
}

#[test]
fn a_cancelled_sequence_leaves_the_gauges_at_zero() {
    let (e, metrics) = engine_with_metrics(None);
    let mut rx = e.submit(request(vec![3, 1, 4, 1, 5], 2000)).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            rx.blocking_recv(),
            Some(EngineEvent::Token { .. })
        ));
    }
    assert!(metrics.kv_cache_bytes.get() > 0);
    drop(rx);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while metrics.cancelled.get() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The scheduler publishes the gauges right after dropping the departed sequence.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(metrics.cancelled.get(), 1);
    assert_eq!(metrics.running.get(), 0);
    assert_eq!(metrics.kv_cache_bytes.get(), 0);
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> EngineRequest {
    EngineRequest {
        prompt_ids: prompt,
        params: GenerationParams {
            max_tokens,
            ignore_eos: true,
            ..GenerationParams::default()
        },
        lora: None,
        label: "base".into(),
        prompt_logprobs: None,
        prompt_only: false,
    }
}

/// Token ids until Done, or the error text.
fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>) -> Result<Vec<u32>, String> {
    let mut ids = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            EngineEvent::Token { id, .. } => ids.push(id),
            EngineEvent::Done { .. } => return Ok(ids),
            EngineEvent::Error(e) => return Err(e),
            EngineEvent::PromptLogprobs(_) => return Err("unasked prompt logprobs".into()),
        }
    }
    Err("channel closed".into())
}

#[test]
fn a_failing_sequence_fails_alone_and_its_batch_mates_decode_as_alone() {
    let e = engine(None);
    let good = [vec![5u32, 9, 17, 3], vec![7u32, 7, 2, 40, 41]];
    let alone: Vec<Vec<u32>> = good
        .iter()
        .map(|p| collect(e.submit(request(p.clone(), 8)).unwrap()).unwrap())
        .collect();
    // A long sequence keeps the engine busy, so the next three are admitted into one step.
    let blocker = e.submit(request(vec![4, 4, 4], 120)).unwrap();
    // Token 999 is outside the tiny vocabulary (256): its forward fails in the batch.
    let rx_good: Vec<_> = good
        .iter()
        .map(|p| e.submit(request(p.clone(), 8)).unwrap())
        .collect();
    let rx_bad = e.submit(request(vec![1, 999, 3], 8)).unwrap();
    let together: Vec<Vec<u32>> = rx_good.into_iter().map(|rx| collect(rx).unwrap()).collect();
    let err = collect(rx_bad).unwrap_err();
    assert!(err.contains("outside the vocabulary"), "{err}");
    assert_eq!(together, alone);
    assert!(together.iter().all(|ids| ids.len() == 8));
    assert_eq!(collect(blocker).unwrap().len(), 120);
}

#[test]
fn the_kv_budget_refuses_what_can_never_fit_and_queues_the_rest() {
    // The tiny model's KV takes 2 layers x 2 kv heads x 16 dims x 2 (k, v) x 4 bytes = 512
    // bytes a position; 50 positions' bytes hold 3 blocks of 16 positions.
    let e = engine(Some(50 * 512));
    match e.submit(request(vec![1, 2, 3], 46)) {
        Err(SubmitError::KvTooLarge { need, budget }) => {
            assert_eq!((need, budget), (49 * 512, 48 * 512))
        }
        other => panic!("expected KvTooLarge, got {:?}", other.map(|_| ())),
    }
    assert_eq!(
        collect(e.submit(request(vec![1, 2, 3], 45)).unwrap())
            .unwrap()
            .len(),
        45
    );
    // Three requests of 20 positions each: at most two run at once, all finish.
    let rxs: Vec<_> = (0..3)
        .map(|i| e.submit(request(vec![1, 2, 3 + i], 17)).unwrap())
        .collect();
    for rx in rxs {
        assert_eq!(collect(rx).unwrap().len(), 17);
    }
}

/// Events of one sequence until Done: its prompt logprobs (if sent), generated ids, and the
/// completion token count Done reported.
type Scored = (
    Option<Vec<loraplex::engine::PromptLogprob>>,
    Vec<u32>,
    usize,
);

fn collect_scored(mut rx: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>) -> Scored {
    let (mut prompt, mut ids) = (None, Vec::new());
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            EngineEvent::PromptLogprobs(v) => {
                assert!(
                    prompt.is_none() && ids.is_empty(),
                    "sent once, before any token"
                );
                prompt = Some(v);
            }
            EngineEvent::Token { id, .. } => ids.push(id),
            EngineEvent::Done {
                completion_tokens, ..
            } => return (prompt, ids, completion_tokens),
            EngineEvent::Error(e) => panic!("{e}"),
        }
    }
    panic!("channel closed");
}

#[test]
fn prompt_logprobs_match_a_full_forward_across_chunks_and_batch_mates() {
    let m = Arc::new(model::load_path(&tiny_model(), &Device::Cpu).unwrap());
    let prompt: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46];
    // Reference: one forward over the whole prompt, every row's log-softmax.
    let mut cache = m.llama.new_cache();
    let mut seqs = [loraplex::runtime::SeqInput {
        tokens: &prompt,
        cache: &mut cache,
        lora: None,
    }];
    let logits =
        loraplex::runtime::forward(&m.llama, &mut seqs, loraplex::runtime::LogitsMode::All)
            .unwrap();
    let lp: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, 1)
        .unwrap()
        .to_vec2()
        .unwrap();
    // A prefill chunk of 4 splits the prompt in three; a decoding batch-mate shares the steps.
    let registry = prometheus::Registry::new();
    let metrics = Arc::new(EngineMetrics::new(&registry).unwrap());
    let cfg = EngineConfig {
        prefill_chunk: 4,
        ..EngineConfig::default()
    };
    let e = EngineHandle::start(m, cfg, metrics);
    let mate = e.submit(request(vec![4, 4, 4], 60)).unwrap();
    let scored = |prompt_only: bool| EngineRequest {
        prompt_logprobs: Some(3),
        prompt_only,
        ..request(prompt.clone(), 5)
    };
    let (got, ids, n) = collect_scored(e.submit(scored(false)).unwrap());
    assert_eq!((ids.len(), n), (5, 5));
    let got = got.expect("prompt logprobs sent");
    assert_eq!(got.len(), prompt.len());
    assert_eq!(got[0], (prompt[0], None));
    for (k, (id, scored)) in got.iter().enumerate().skip(1) {
        assert_eq!(*id, prompt[k]);
        let (chosen, top) = scored.as_ref().unwrap();
        let want = lp[k - 1][prompt[k] as usize];
        assert!(
            (chosen.logprob - want).abs() < 1e-4,
            "{k}: {} vs {want}",
            chosen.logprob
        );
        assert_eq!(top.len(), 3);
        let best = lp[k - 1].iter().cloned().fold(f32::MIN, f32::max);
        assert!((top[0].logprob - best).abs() < 1e-4);
    }
    // Alone, the same sequence generates the same tokens: scoring changes nothing else.
    let (none, alone, _) = collect_scored(e.submit(request(prompt.clone(), 5)).unwrap());
    assert!(none.is_none());
    assert_eq!(alone, ids);
    // Prompt only: the scores, then Done with nothing generated.
    let (again, ids, n) = collect_scored(e.submit(scored(true)).unwrap());
    assert_eq!((ids.len(), n), (0, 0));
    assert_eq!(again.unwrap(), got);
    assert_eq!(collect(mate).unwrap().len(), 60);
}

/// Three sequences of 45 positions (3 blocks each) in a pool of 4 blocks: all are admitted (a
/// 5-token prompt takes one block, where reserving prompt plus max_tokens admitted one at a
/// time), so as they grow the pool runs dry and the newest are preempted, again and again, and
/// recomputed from their history. Each finishes with exactly
/// the tokens it generates alone, greedy or sampled, whether its history comes back through
/// the prefix cache or a full prefill.
#[test]
fn sequences_preempted_when_kv_blocks_run_out_finish_as_alone() {
    let prompts = [
        vec![5u32, 9, 17, 3, 8],
        vec![7u32, 7, 2, 40, 41],
        vec![1u32, 2, 3, 4, 5],
    ];
    let sampled = |p: &Vec<u32>, i: usize| {
        let mut r = request(p.clone(), 40);
        r.params.sampling.temperature = 0.9;
        r.params.sampling.seed = 11 + i as u64;
        r
    };
    let reqs = |prompts: &[Vec<u32>]| -> Vec<EngineRequest> {
        prompts
            .iter()
            .enumerate()
            .flat_map(|(i, p)| [request(p.clone(), 40), sampled(p, i)])
            .collect()
    };
    let unlimited = engine(None);
    let alone: Vec<Vec<u32>> = reqs(&prompts)
        .into_iter()
        .map(|r| collect(unlimited.submit(r).unwrap()).unwrap())
        .collect();
    for (prefix_cache_bytes, paged_kv) in [(0, false), (1 << 30, false), (0, true), (1 << 30, true)]
    {
        let (e, metrics) = engine_with_config(EngineConfig {
            kv_budget_bytes: Some(4 * 16 * 512),
            prefix_cache_bytes,
            paged_kv,
            ..EngineConfig::default()
        });
        assert_eq!(metrics.kv_blocks_total.get(), 4);
        // Greedy and sampled requests in two rounds of three.
        let all = reqs(&prompts);
        let (greedy, sampled): (Vec<_>, Vec<_>) =
            all.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
        let mut got = vec![Vec::new(); alone.len()];
        for round in [greedy, sampled] {
            let rxs: Vec<_> = round
                .into_iter()
                .map(|(i, r)| (i, e.submit(r).unwrap()))
                .collect();
            for (i, rx) in rxs {
                got[i] = collect(rx).unwrap();
            }
        }
        assert_eq!(
            got, alone,
            "prefix cache of {prefix_cache_bytes} bytes, paged {paged_kv}"
        );
        assert!(
            metrics.preemptions.get() >= 2,
            "{} preemptions",
            metrics.preemptions.get()
        );
        // Every block comes back once the sequences are done.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while metrics.kv_blocks_used.get() != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(metrics.kv_blocks_used.get(), 0);
        assert_eq!(metrics.running.get(), 0);
    }
}

/// Under a KV budget the prefix cache lives in the same block pool: a finished sequence's
/// history stays cached in free blocks, and a later sequence that needs those blocks gets them
/// by evicting the cached entry, not by preempting anyone (and not beyond the budget).
#[test]
fn cached_prefixes_hold_pool_blocks_and_give_them_up_to_growing_sequences() {
    cached_prefixes_give_up_their_blocks(false);
}

/// The same with paged caches: the entries' keys and values live in their blocks of the pool.
#[test]
fn paged_cached_prefixes_hold_pool_blocks_and_give_them_up_to_growing_sequences() {
    cached_prefixes_give_up_their_blocks(true);
}

fn cached_prefixes_give_up_their_blocks(paged_kv: bool) {
    let (e, metrics) = engine_with_config(EngineConfig {
        kv_budget_bytes: Some(4 * 16 * 512),
        paged_kv,
        ..EngineConfig::default()
    });
    let wait_for = |what: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !what() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    // 20 prompt tokens + 10 generated: its history (29 positions) is cached in 2 blocks.
    let first: Vec<u32> = (10..30).collect();
    assert_eq!(
        collect(e.submit(request(first.clone(), 10)).unwrap())
            .unwrap()
            .len(),
        10
    );
    wait_for(&|| metrics.kv_blocks_used.get() == 0);
    assert_eq!(metrics.kv_blocks_prefix_cache.get(), 2);
    assert_eq!(metrics.kv_blocks_used.get(), 0);
    // A new prompt growing to 64 positions needs all 4 blocks: the cached entry goes.
    let unlimited = engine(None);
    let alone = collect(unlimited.submit(request(vec![3, 1, 4], 61)).unwrap()).unwrap();
    let got = collect(e.submit(request(vec![3, 1, 4], 61)).unwrap()).unwrap();
    assert_eq!(got, alone);
    assert_eq!(metrics.preemptions.get(), 0);
    // Its own history (63 positions, 4 blocks) is cached now, in the whole pool.
    wait_for(&|| metrics.kv_blocks_used.get() == 0);
    assert_eq!(metrics.kv_blocks_prefix_cache.get(), 4);
    // The first prompt again: nothing of it is cached any more, and it runs as before.
    let again = e.submit(request(first, 10)).unwrap();
    assert_eq!(collect(again).unwrap().len(), 10);
    assert_eq!(metrics.prefix_cache_hits.get(), 0);
}

/// Sequences that score their prompt (echo with logprobs), in a pool of 4 blocks, with prefill
/// chunks of 3 tokens: the prompts (12, 12, 15 tokens) prefill one after another while the
/// earlier ones decode, and when the second needs its second block the third is still
/// prefilling, so it is preempted mid-prompt and starts its scoring over. Each sends its prompt
/// logprobs once, and both they and its tokens equal what it gets alone.
#[test]
fn sequences_preempted_while_scoring_their_prompt_score_it_once_as_alone() {
    let scored = |i: u32| EngineRequest {
        prompt_logprobs: Some(2),
        ..request(
            (0..12 + 3 * (i / 2))
                .map(|k| (k * 7 + i * 13) % 250 + 3)
                .collect(),
            30,
        )
    };
    let unlimited = engine(None);
    let alone: Vec<Scored> = (0..3)
        .map(|i| collect_scored(unlimited.submit(scored(i)).unwrap()))
        .collect();
    for paged_kv in [false, true] {
        let (e, metrics) = engine_with_config(EngineConfig {
            kv_budget_bytes: Some(4 * 16 * 512),
            prefill_chunk: 3,
            paged_kv,
            ..EngineConfig::default()
        });
        let rxs: Vec<_> = (0..3).map(|i| e.submit(scored(i)).unwrap()).collect();
        let got: Vec<Scored> = rxs.into_iter().map(collect_scored).collect();
        assert_eq!(got, alone, "paged {paged_kv}");
        assert!(metrics.preemptions.get() > 0);
    }
}

/// A burst whose prompts start with a cached prefix (20 tokens, loaded at admission) and then
/// share 50 new tokens: the later ones wait, then swap their short prefix for the long one
/// (their cache emptied and refilled while they hold their blocks). Answers as alone, in both
/// KV layouts.
#[test]
fn a_longer_shared_prefix_replaces_a_loaded_short_one() {
    let start: Vec<u32> = (0..20).map(|k| (k * 7) % 250 + 3).collect();
    let shared: Vec<u32> = (0..50).map(|k| (k * 11) % 250 + 3).collect();
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|i| {
            let tail = [200 + i, 7, 8, 9, 10];
            start.iter().chain(&shared).copied().chain(tail).collect()
        })
        .collect();
    let first: Vec<u32> = start.iter().copied().chain([99, 98, 97]).collect();
    let (alone_engine, _) = engine_with_config(EngineConfig {
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    });
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| collect(alone_engine.submit(request(p.clone(), 6)).unwrap()).unwrap())
        .collect();
    for paged_kv in [false, true] {
        let (e, metrics) = engine_with_config(EngineConfig {
            prefill_chunk: 4,
            kv_budget_bytes: Some(40 * 16 * 512),
            paged_kv,
            ..EngineConfig::default()
        });
        collect(e.submit(request(first.clone(), 2)).unwrap()).unwrap();
        let rxs: Vec<_> = prompts
            .iter()
            .map(|p| e.submit(request(p.clone(), 6)).unwrap())
            .collect();
        let got: Vec<Vec<u32>> = rxs.into_iter().map(|rx| collect(rx).unwrap()).collect();
        assert_eq!(got, alone, "paged {paged_kv}");
        // Each of the three loaded the 20-token start; the later two then the 70-token prefix.
        assert_eq!(metrics.prefix_cache_hits.get(), 3, "paged {paged_kv}");
        assert_eq!(
            metrics.prefix_cache_reused_tokens.get(),
            3 * 20 + 2 * 50,
            "paged {paged_kv}"
        );
    }
}

/// Paged, a sequence that starts with a cached prefix holds the prefix's whole blocks shared
/// with the cache entry instead of copies: three prompts sharing a cached 64-token prefix (4
/// blocks) run in a pool of 10 blocks — the entry's 5 plus about one block each of their own,
/// where copies would need 5 each — as they run alone, sharing 4 blocks each, and every block
/// comes back once they are done and the cache is emptied.
#[test]
fn paged_sequences_share_the_whole_blocks_of_a_cached_prefix() {
    let shared: Vec<u32> = (0..64).map(|k| (k * 13) % 250 + 3).collect();
    let prompt = |i: u32| -> Vec<u32> {
        shared
            .iter()
            .copied()
            .chain([200 + i, 7, 8, 9, 10])
            .collect()
    };
    let (alone_engine, _) = engine_with_config(EngineConfig {
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    });
    let alone: Vec<Vec<u32>> = (0..4)
        .map(|i| collect(alone_engine.submit(request(prompt(i), 6)).unwrap()).unwrap())
        .collect();
    let (e, metrics) = engine_with_config(EngineConfig {
        kv_budget_bytes: Some(10 * 16 * 512),
        paged_kv: true,
        ..EngineConfig::default()
    });
    assert_eq!(metrics.kv_blocks_total.get(), 10);
    // The first one leaves its history (74 positions, 5 blocks) in the prefix cache.
    assert_eq!(
        collect(e.submit(request(prompt(0), 6)).unwrap()).unwrap(),
        alone[0]
    );
    let rxs: Vec<_> = (1..4)
        .map(|i| e.submit(request(prompt(i), 6)).unwrap())
        .collect();
    let got: Vec<Vec<u32>> = rxs.into_iter().map(|rx| collect(rx).unwrap()).collect();
    assert_eq!(got, alone[1..]);
    assert_eq!(metrics.preemptions.get(), 0);
    assert_eq!(metrics.prefix_cache_hits.get(), 3);
    assert_eq!(metrics.prefix_cache_reused_tokens.get(), 3 * 64);
    assert_eq!(metrics.prefix_cache_shared_blocks.get(), 3 * 4);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while metrics.kv_blocks_used.get() != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(metrics.kv_blocks_used.get(), 0);
    // What the cache holds is within the pool (shared blocks counted once).
    assert!(metrics.kv_blocks_prefix_cache.get() <= 10);
}

/// Three prompts sharing a 50-token prefix (a system prompt, say) arrive together, before any
/// cache holds it: the second and third wait for the first one's prefill and then start after
/// the shared part, taken from the prefix cache; the answers are what each gets alone.
#[test]
fn a_burst_sharing_a_long_prefix_prefills_it_once() {
    let shared: Vec<u32> = (0..50).map(|k| (k * 11) % 250 + 3).collect();
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|i| {
            shared
                .iter()
                .copied()
                .chain([200 + i, 7, 8, 9, 10])
                .collect()
        })
        .collect();
    let (alone_engine, _) = engine_with_config(EngineConfig {
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    });
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| collect(alone_engine.submit(request(p.clone(), 6)).unwrap()).unwrap())
        .collect();
    // Without a budget, and paged in a pool of 40 blocks.
    for (kv_budget_bytes, paged_kv) in [(None, false), (Some(40 * 16 * 512), true)] {
        let (e, metrics) = engine_with_config(EngineConfig {
            prefill_chunk: 4,
            kv_budget_bytes,
            paged_kv,
            ..EngineConfig::default()
        });
        let rxs: Vec<_> = prompts
            .iter()
            .map(|p| e.submit(request(p.clone(), 6)).unwrap())
            .collect();
        let got: Vec<Vec<u32>> = rxs.into_iter().map(|rx| collect(rx).unwrap()).collect();
        assert_eq!(got, alone, "paged {paged_kv}");
        assert_eq!(metrics.prefix_cache_hits.get(), 2);
        assert_eq!(metrics.prefix_cache_reused_tokens.get(), 2 * 50);
    }
}
