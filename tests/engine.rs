//! The engine through its public handle on the tiny model: a sequence whose forward fails is
//! retired alone while its batch-mates finish exactly as they would alone, the KV budget
//! refuses a request that could never fit, and a cancelled sequence leaves the gauges at zero.

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
    let m = Arc::new(model::load_path(&tiny_model(), &Device::Cpu).unwrap());
    let registry = prometheus::Registry::new();
    let metrics = Arc::new(EngineMetrics::new(&registry).unwrap());
    let cfg = EngineConfig {
        kv_budget_bytes,
        ..EngineConfig::default()
    };
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
    // bytes a position; 40 positions fit.
    let e = engine(Some(40 * 512));
    match e.submit(request(vec![1, 2, 3], 38)) {
        Err(SubmitError::KvTooLarge { need, budget }) => {
            assert_eq!((need, budget), (41 * 512, 40 * 512))
        }
        other => panic!("expected KvTooLarge, got {:?}", other.map(|_| ())),
    }
    // Three requests of 20 positions each: at most two run at once, all finish.
    let rxs: Vec<_> = (0..3)
        .map(|i| e.submit(request(vec![1, 2, 3 + i], 17)).unwrap())
        .collect();
    for rx in rxs {
        assert_eq!(collect(rx).unwrap().len(), 17);
    }
}
