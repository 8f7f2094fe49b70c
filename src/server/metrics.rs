//! Request-level Prometheus metrics and the registry that all server metrics live in.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Counters by adapter label.
pub struct ServerMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounterVec,
    pub generated_tokens: IntCounterVec,
    pub base_bytes: IntGauge,
    pub base_bytes_by_dtype: IntGaugeVec,
    /// Bytes on the base's device by kind: `weights`, `kv`, `adapters` (host memory on the CPU).
    pub device_memory: IntGaugeVec,
}

impl ServerMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let vec = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let base_bytes = IntGauge::new(
            "loraplex_base_model_bytes",
            "Bytes of the resident base weights",
        )?;
        registry.register(Box::new(base_bytes.clone()))?;
        let base_bytes_by_dtype = IntGaugeVec::new(
            Opts::new(
                "loraplex_base_model_bytes_by_dtype",
                "Bytes of the resident base weights by storage type (nf4: packed 4-bit weights with their block scales)",
            ),
            &["dtype"],
        )?;
        registry.register(Box::new(base_bytes_by_dtype.clone()))?;
        let device_memory = IntGaugeVec::new(
            Opts::new(
                "loraplex_device_memory_bytes",
                "Bytes held on the base's device by kind: weights, kv (running sequences' caches), adapters (cached adapters' device copies; host tensors on the CPU)",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(device_memory.clone()))?;
        Ok(Self {
            requests: vec(
                "loraplex_requests_total",
                "Requests by adapter and HTTP status",
                &["adapter", "status"],
            )?,
            prompt_tokens: vec(
                "loraplex_prompt_tokens_total",
                "Prompt tokens by adapter",
                &["adapter"],
            )?,
            generated_tokens: vec(
                "loraplex_generated_tokens_total",
                "Generated tokens by adapter",
                &["adapter"],
            )?,
            base_bytes,
            base_bytes_by_dtype,
            device_memory,
            registry,
        })
    }

    /// Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let enc = prometheus::TextEncoder::new();
        enc.encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# error: {e}\n"))
    }
}
