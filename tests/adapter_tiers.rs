//! The adapter registry's two tiers: a cache of ready stacks capped in bytes, and behind it a
//! host tier of parsed adapters. An adapter the cache evicted comes back from the host tier
//! without its folder being read (here: its folder is deleted first, and it still loads, with
//! the same tensors); with the tier off it must be read again (and fails); removing an adapter
//! drops it from the tier.

mod common;

use common::*;
use loraplex::adapters::{AdapterError, AdapterMetrics, AdapterRegistry, CachedAdapter};
use loraplex::lora::LoraAdapter;
use loraplex::model;
use std::sync::Arc;

/// A registry over copies `a` and `b` of one tiny adapter whose stack cache is too small to keep
/// either (every use after the last holder let go is a cache miss).
fn registry(host_bytes: u64) -> (AdapterRegistry, Arc<AdapterMetrics>, tempfile::TempDir) {
    let m = model::load_path(&tiny_model(), &candle_core::Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        copy_dir(&tiny_adapter("all-r8"), &tmp.path().join(name));
    }
    let one = LoraAdapter::load("a", &tmp.path().join("a"), &m.llama.cfg)
        .unwrap()
        .bytes() as u64;
    let metrics = Arc::new(AdapterMetrics::new(&prometheus::Registry::new()).unwrap());
    let reg = AdapterRegistry::new(
        tmp.path().to_path_buf(),
        false,
        m.llama.cfg.clone(),
        m.llama.placement(),
        one / 2,
        metrics.clone(),
    )
    .unwrap()
    .with_host_tier(host_bytes);
    assert_eq!(reg.scan().unwrap(), 2);
    (reg, metrics, tmp)
}

/// Uses `a` until a use finds it in neither the stack cache nor a running holder (an entry over
/// the cap stays reachable until the cache's housekeeping, which a miss — a use of `b` — runs):
/// returns the first such use's result, or the last one's after 5 s.
async fn use_until_reloaded(
    reg: &AdapterRegistry,
    metrics: &AdapterMetrics,
) -> Result<Arc<CachedAdapter>, AdapterError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let misses = metrics.misses.get();
        let r = reg.get("a").await;
        if metrics.misses.get() > misses || std::time::Instant::now() > deadline {
            return r;
        }
        drop(r);
        drop(reg.get("b").await);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_evicted_adapter_comes_back_from_the_host_tier_without_its_folder() {
    let (reg, metrics, tmp) = registry(1 << 30);
    let first = reg.get("a").await.unwrap();
    let a_tensor = |c: &CachedAdapter| {
        let (_, m) = c.adapter.modules.iter().next().unwrap();
        m.a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let want = a_tensor(&first);
    drop(first);
    // Its folder is gone: only the host tier can serve it now.
    std::fs::remove_dir_all(tmp.path().join("a")).unwrap();
    let again = use_until_reloaded(&reg, &metrics).await.unwrap();
    assert_eq!(a_tensor(&again), want);
    // (`b`'s reloads in between come from the tier too.)
    assert!(metrics.host_hits.get() >= 1);
    assert!(metrics.host_bytes.get() > 0);
    // Removed: dropped from both tiers, and a later registration reads its (new) folder.
    drop(again);
    let hits = metrics.host_hits.get();
    reg.remove("a").await.unwrap();
    copy_dir(&tiny_adapter("all-r8"), &tmp.path().join("a"));
    reg.register("a", "a").await.unwrap();
    reg.get("a").await.unwrap();
    assert_eq!(
        metrics.host_hits.get(),
        hits,
        "a new version is read from its folder"
    );
}

#[tokio::test]
async fn without_the_host_tier_an_evicted_adapter_is_read_again() {
    let (reg, metrics, tmp) = registry(0);
    drop(reg.get("a").await.unwrap());
    std::fs::remove_dir_all(tmp.path().join("a")).unwrap();
    assert!(use_until_reloaded(&reg, &metrics).await.is_err());
    assert_eq!(metrics.host_hits.get(), 0);
    assert_eq!(metrics.host_bytes.get(), 0);
}
