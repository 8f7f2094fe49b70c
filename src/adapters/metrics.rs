//! The adapter cache's Prometheus metrics: hits, misses, evictions, bytes and load times.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

/// Cache metrics.
pub struct AdapterMetrics {
    pub hits: IntCounter,
    pub misses: IntCounter,
    pub evictions: IntCounter,
    pub bytes: IntGauge,
    pub load_seconds: Histogram,
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
        })
    }
}
