//! The adapter cache's Prometheus metrics: hits, misses, evictions, bytes and load times, and
//! the host tier's hits and bytes.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

/// Cache metrics.
pub struct AdapterMetrics {
    pub hits: IntCounter,
    pub misses: IntCounter,
    pub evictions: IntCounter,
    pub bytes: IntGauge,
    pub load_seconds: Histogram,
    /// Cache misses served from the host tier (no folder read), and the tier's bytes.
    pub host_hits: IntCounter,
    pub host_bytes: IntGauge,
}

impl AdapterMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |n: &str, h: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(n, h)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let bytes = IntGauge::new(
            "loraplex_adapter_cache_bytes",
            "Bytes of adapters in the cache",
        )?;
        registry.register(Box::new(bytes.clone()))?;
        let load_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "loraplex_adapter_load_seconds",
                "Time to load and validate an adapter",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 14)?),
        )?;
        registry.register(Box::new(load_seconds.clone()))?;
        let host_bytes = IntGauge::new(
            "loraplex_adapter_host_tier_bytes",
            "Bytes of parsed adapters kept in host memory behind the cache",
        )?;
        registry.register(Box::new(host_bytes.clone()))?;
        Ok(Self {
            hits: counter(
                "loraplex_adapter_cache_hits_total",
                "Adapter lookups served from memory",
            )?,
            misses: counter(
                "loraplex_adapter_cache_misses_total",
                "Adapter lookups that loaded from disk",
            )?,
            evictions: counter(
                "loraplex_adapter_cache_evictions_total",
                "Adapters evicted to stay under the byte cap",
            )?,
            bytes,
            load_seconds,
            host_hits: counter(
                "loraplex_adapter_host_tier_hits_total",
                "Adapter cache misses rebuilt from the host tier instead of the folder",
            )?,
            host_bytes,
        })
    }
}
