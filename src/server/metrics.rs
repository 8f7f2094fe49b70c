//! Request-level Prometheus metrics and the registry that all server metrics live in.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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
    pub open_connections: IntGauge,
    pub refused_connections: IntCounter,
    pub timed_out_connections: IntCounter,
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
        let open_connections =
            IntGauge::new("loraplex_open_connections", "Client connections open now")?;
        registry.register(Box::new(open_connections.clone()))?;
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let refused_connections = counter(
            "loraplex_refused_connections_total",
            "Connections answered 503 and closed because max_connections were open",
        )?;
        let timed_out_connections = counter(
            "loraplex_timed_out_connections_total",
            "Connections closed for idling past keep_alive_timeout or a request head slower than header_read_timeout",
        )?;
        Ok(Self {
            open_connections,
            refused_connections,
            timed_out_connections,
            requests: vec(
                "loraplex_requests_total",
                "Requests by adapter and status: the HTTP status answered (200, 400, 404, 429, 500, 503, ...), or cancelled when the client went away before the answer was complete",
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
