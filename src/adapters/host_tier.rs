//! The adapters' host tier: parsed and validated adapters (their PEFT tensors in host memory)
//! kept under a byte cap of their own, apart from the cache of ready stacks. When that cache
//! evicts an adapter (its device copy is what its cap protects on a GPU) and a request wants it
//! again, the registry finds it here and only builds its stack again — on a GPU one upload —
//! instead of reading, parsing and validating its folder. Entries are keyed by name and
//! registered version, so a replaced adapter is never served from here; least recently used go
//! first. A cap of 0 turns the tier off.

use crate::lora::LoraAdapter;
use moka::future::Cache;
use std::sync::Arc;

/// Parsed adapters by `(name, version)`, capped in bytes of their tensors.
pub(super) struct HostTier {
    cache: Option<Cache<(String, u64), Arc<LoraAdapter>>>,
}

/// An adapter's weight against the cap: its tensors' bytes.
fn weight(adapter: &LoraAdapter) -> u32 {
    u32::try_from(adapter.bytes()).unwrap_or(u32::MAX)
}

impl HostTier {
    /// A tier of at most `cap_bytes` bytes (0: off).
    pub(super) fn new(cap_bytes: u64) -> Self {
        let cache = (cap_bytes > 0).then(|| {
            Cache::builder()
                .max_capacity(cap_bytes)
                .weigher(|_k: &(String, u64), v: &Arc<LoraAdapter>| weight(v))
                .build()
        });
        Self { cache }
    }

    /// The parsed adapter `name` at `version`, if kept.
    pub(super) async fn get(&self, name: &str, version: u64) -> Option<Arc<LoraAdapter>> {
        let cache = self.cache.as_ref()?;
        cache.get(&(name.to_string(), version)).await
    }

    /// Keeps `adapter` as `name` at `version` (evicting the least recently used beyond the cap).
    pub(super) async fn insert(&self, name: &str, version: u64, adapter: Arc<LoraAdapter>) {
        if let Some(cache) = &self.cache {
            cache.insert((name.to_string(), version), adapter).await;
            cache.run_pending_tasks().await;
        }
    }

    /// Drops `name` at `version` (removed or replaced).
    pub(super) async fn forget(&self, name: &str, version: u64) {
        if let Some(cache) = &self.cache {
            cache.invalidate(&(name.to_string(), version)).await;
        }
    }

    /// Bytes of the adapters kept.
    pub(super) fn bytes(&self) -> u64 {
        self.cache.as_ref().map_or(0, Cache::weighted_size)
    }
}
