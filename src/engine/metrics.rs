//! The engine's Prometheus metrics: batch and queue sizes, latencies, KV-cache and prefix-cache
//! use, preemptions, and (optionally) vLLM's gauges for routers.

use super::vllm_metrics::VllmMetrics;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

/// Scheduler-side metrics (registered in the server's registry).
pub struct EngineMetrics {
    pub batch_size: Histogram,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub queue_wait: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub cancelled: IntCounter,
    pub kv_cache_bytes: IntGauge,
    /// The KV pool's blocks (with a KV budget), and those running sequences hold.
    pub kv_blocks_total: IntGauge,
    /// 1 when the KV blocks are paged in one pool on the device, 0 for per-sequence buffers.
    pub kv_paged: IntGauge,
    /// Bytes of the paged pool, allocated at start (0: per-sequence buffers).
    pub kv_pool_bytes: IntGauge,
    pub kv_blocks_used: IntGauge,
    /// The pool's blocks the prefix cache holds (evicted first when sequences need blocks).
    pub kv_blocks_prefix_cache: IntGauge,
    /// Sequences whose KV blocks were taken back to let older ones go on (recomputed later).
    pub preemptions: IntCounter,
    /// Sequences whose prefill started after a cached prefix, and the prompt tokens so skipped.
    pub prefix_cache_hits: IntCounter,
    pub prefix_cache_reused_tokens: IntCounter,
    /// KV blocks sequences took shared from a cached prefix instead of copying (paged caches).
    pub prefix_cache_shared_blocks: IntCounter,
    pub prefix_cache_bytes: IntGauge,
    /// vLLM's gauges for routers (`None`: not exported).
    pub vllm: Option<VllmMetrics>,
}

impl EngineMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let hist = |name: &str, help: &str, buckets: Vec<f64>| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let secs = prometheus::exponential_buckets(0.001, 2.0, 16)?;
        let cancelled = IntCounter::new(
            "loraplex_cancelled_sequences_total",
            "Sequences stopped because their client disconnected",
        )?;
        registry.register(Box::new(cancelled.clone()))?;
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Self {
            batch_size: hist(
                "loraplex_batch_size",
                "Sequences in each forward step",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
            )?,
            running: gauge(
                "loraplex_running_sequences",
                "Sequences in the running batch",
            )?,
            waiting: gauge(
                "loraplex_waiting_sequences",
                "Sequences waiting for a batch slot",
            )?,
            queue_wait: hist(
                "loraplex_queue_wait_seconds",
                "Time from submission to admission",
                secs.clone(),
            )?,
            time_to_first_token: hist(
                "loraplex_time_to_first_token_seconds",
                "Time from submission to the first generated token",
                secs.clone(),
            )?,
            inter_token_latency: hist(
                "loraplex_inter_token_latency_seconds",
                "Time between consecutive tokens of a sequence",
                secs,
            )?,
            cancelled,
            kv_cache_bytes: gauge(
                "loraplex_kv_cache_bytes",
                "Bytes held by running sequences' KV caches",
            )?,
            kv_blocks_total: gauge(
                "loraplex_kv_blocks_total",
                "KV-cache blocks of 16 positions the KV budget holds (0: no budget)",
            )?,
            kv_paged: gauge(
                "loraplex_kv_paged",
                "1 when the KV blocks live in one paged pool on the device (0: per-sequence buffers)",
            )?,
            kv_pool_bytes: gauge(
                "loraplex_kv_pool_bytes",
                "Bytes of the paged KV pool, allocated at start on the device (0: per-sequence buffers)",
            )?,
            kv_blocks_used: gauge(
                "loraplex_kv_blocks_used",
                "KV-cache blocks held by running sequences",
            )?,
            kv_blocks_prefix_cache: gauge(
                "loraplex_kv_blocks_prefix_cache",
                "KV-cache blocks held by the prefix cache (reclaimed when sequences need them)",
            )?,
            preemptions: counter(
                "loraplex_preemptions_total",
                "Sequences preempted when KV blocks ran out (recomputed when blocks free up)",
            )?,
            prefix_cache_hits: counter(
                "loraplex_prefix_cache_hits_total",
                "Sequences whose prefill started after a cached prompt prefix",
            )?,
            prefix_cache_reused_tokens: counter(
                "loraplex_prefix_cache_reused_tokens_total",
                "Prompt tokens not prefilled because their keys and values were cached",
            )?,
            prefix_cache_shared_blocks: counter(
                "loraplex_prefix_cache_shared_blocks_total",
                "KV blocks of a cached prefix that sequences share instead of copying (paged KV)",
            )?,
            prefix_cache_bytes: gauge(
                "loraplex_prefix_cache_bytes",
                "Bytes held by the prefix cache",
            )?,
            vllm: None,
        })
    }

    /// Also exports vLLM's queue, KV and LoRA gauges (`vllm_metrics`).
    pub fn with_vllm(mut self, registry: &Registry, max_lora: usize) -> prometheus::Result<Self> {
        self.vllm = Some(VllmMetrics::new(registry, max_lora)?);
        Ok(self)
    }
}
