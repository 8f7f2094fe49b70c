//! The model-server metrics protocol that routers built for vLLM read from `/metrics`: the
//! Kubernetes Gateway API Inference Extension (llm-d's endpoint picker) scores replicas by queue
//! length, KV-cache use and which LoRA adapters each one already runs. Same names, types and label
//! formats as vLLM:
//!
//! - `vllm:num_requests_waiting`, `vllm:num_requests_running` (gauges);
//! - `vllm:kv_cache_usage_perc` and its older name `vllm:gpu_cache_usage_perc` (gauges, a
//!   fraction: 1 = full). loraplex reports the KV blocks running sequences hold over the blocks
//!   of the KV budget (blocks of cached prefixes count as free: they are reclaimed on demand, as
//!   in vLLM); without a budget (no memory figure for the device) the running sequences over
//!   `max_batch_size`;
//! - `vllm:num_preemptions_total` (counter): sequences preempted when KV blocks ran out;
//! - `vllm:lora_requests_info` (gauge, one series): labels `running_lora_adapters` and
//!   `waiting_lora_adapters` (adapter names, comma-separated without spaces) and `max_lora` (how
//!   many distinct adapters can run at once: every row of a batch may have its own, so
//!   `max_batch_size`); its value is the Unix time of the last update.

use prometheus::{Gauge, GaugeVec, IntCounter, IntGauge, Opts, Registry};
use std::collections::BTreeSet;

/// The gauges, registered in the server's registry.
pub struct VllmMetrics {
    waiting: IntGauge,
    running: IntGauge,
    kv_usage: Gauge,
    gpu_cache_usage: Gauge,
    lora_info: GaugeVec,
    max_lora: String,
    /// `vllm:num_preemptions_total`, counted by the scheduler.
    pub preemptions: IntCounter,
}

/// What one update reports.
pub struct VllmSnapshot<'a> {
    pub waiting: usize,
    pub running: usize,
    /// Fraction of the KV capacity in use, in [0, 1].
    pub kv_usage: f64,
    /// Adapter names of each running sequence (empty: the base).
    pub running_adapters: Vec<&'a str>,
    pub waiting_adapters: Vec<&'a str>,
}

impl VllmMetrics {
    pub fn new(registry: &Registry, max_lora: usize) -> prometheus::Result<Self> {
        let int_gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<Gauge> {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let lora_info = GaugeVec::new(
            Opts::new(
                "vllm:lora_requests_info",
                "Running stats on LoRA requests (value: time of the last update).",
            ),
            &["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )?;
        registry.register(Box::new(lora_info.clone()))?;
        let preemptions = IntCounter::new(
            "vllm:num_preemptions_total",
            "Cumulative number of preemption from the engine.",
        )?;
        registry.register(Box::new(preemptions.clone()))?;
        let m = Self {
            preemptions,
            waiting: int_gauge(
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
            )?,
            running: int_gauge(
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
            )?,
            kv_usage: gauge(
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
            )?,
            gpu_cache_usage: gauge(
                "vllm:gpu_cache_usage_perc",
                "KV-cache usage (older name of vllm:kv_cache_usage_perc). 1 means 100 percent usage.",
            )?,
            lora_info,
            max_lora: max_lora.to_string(),
        };
        m.publish(&VllmSnapshot {
            waiting: 0,
            running: 0,
            kv_usage: 0.0,
            running_adapters: Vec::new(),
            waiting_adapters: Vec::new(),
        });
        Ok(m)
    }

    pub fn publish(&self, s: &VllmSnapshot) {
        self.waiting.set(s.waiting as i64);
        self.running.set(s.running as i64);
        let usage = s.kv_usage.clamp(0.0, 1.0);
        self.kv_usage.set(usage);
        self.gpu_cache_usage.set(usage);
        let list = |names: &[&str]| -> String {
            let set: BTreeSet<&str> = names.iter().copied().filter(|n| !n.is_empty()).collect();
            set.into_iter().collect::<Vec<_>>().join(",")
        };
        let (running, waiting) = (list(&s.running_adapters), list(&s.waiting_adapters));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        // One series: the previous label set goes when the adapters change.
        self.lora_info.reset();
        self.lora_info
            .with_label_values(&[running.as_str(), waiting.as_str(), self.max_lora.as_str()])
            .set(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lora_series_with_sorted_comma_lists() {
        let r = Registry::new();
        let m = VllmMetrics::new(&r, 32).unwrap();
        m.publish(&VllmSnapshot {
            waiting: 2,
            running: 3,
            kv_usage: 0.25,
            running_adapters: vec!["medical", "legal", "", "legal"],
            waiting_adapters: vec!["chatbot"],
        });
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&r.gather())
            .unwrap();
        let info: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("vllm:lora_requests_info{"))
            .collect();
        assert_eq!(info.len(), 1, "{text}");
        assert!(
            info[0].contains(r#"running_lora_adapters="legal,medical""#),
            "{text}"
        );
        assert!(
            info[0].contains(r#"waiting_lora_adapters="chatbot""#),
            "{text}"
        );
        assert!(info[0].contains(r#"max_lora="32""#), "{text}");
        assert!(text.contains("vllm:num_requests_waiting 2"), "{text}");
        assert!(text.contains("vllm:kv_cache_usage_perc 0.25"), "{text}");
        assert!(text.contains("vllm:gpu_cache_usage_perc 0.25"), "{text}");
    }
}
