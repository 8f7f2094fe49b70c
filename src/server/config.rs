//! `loraplex serve` settings: a TOML file (`configs/default.toml` documents every key) with
//! command-line flags on top.

use super::defaults::SamplingDefaults;
use crate::model::Quantize;
use crate::runtime::{DeviceSpec, DtypeSpec};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the KV budget's blocks live (`serve --kv-layout`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvLayout {
    /// Paged on a GPU, buffers on the CPU.
    #[default]
    Auto,
    /// One pool of blocks on the device, read through block tables.
    Paged,
    /// Each sequence's own buffers, capped at its blocks.
    Buffers,
}

impl KvLayout {
    /// Whether caches are paged on `device`.
    pub fn paged_on(self, device: &candle_core::Device) -> bool {
        match self {
            Self::Auto => !device.is_cpu(),
            Self::Paged => true,
            Self::Buffers => false,
        }
    }
}

/// Everything `serve` needs. Every field is a TOML key of the same name.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Base model: HF folder, .gguf file or hub id; unset = the default model.
    pub model: Option<String>,
    /// `"nf4"`: keep the base's linear weights in QLoRA's 4-bit NormalFloat (`"none"`: as loaded).
    pub quantize: Quantize,
    /// With NF4: store the block scales in 8 bits too (double quantization).
    pub double_quant: bool,
    /// With NF4: compute the logits from an NF4 copy of lm_head too.
    pub quantize_lm_head: bool,
    /// `"auto"` (the GPU when built with `cuda` and one is visible), `"cpu"`, `"cuda"`, `"cuda:N"`.
    pub device: DeviceSpec,
    /// `"auto"` (bf16 on a GPU, f32 on the CPU), `"bf16"`, `"f16"`, `"f32"`.
    pub dtype: DtypeSpec,
    /// Byte budget of all running sequences' KV caches, in blocks of 16 positions (unset: 90% of
    /// free GPU memory after loading on a GPU, half the available host memory on the CPU). A
    /// request waits while its prompt's blocks are not free.
    pub kv_cache_bytes: Option<u64>,
    /// Where the KV budget's blocks live: `"paged"` (one pool on the device, read through block
    /// tables), `"buffers"` (each sequence's own buffers, capped at its blocks) or `"auto"`
    /// (paged on a GPU, buffers on the CPU).
    pub kv_layout: KvLayout,
    pub host: String,
    pub port: u16,
    /// Folder whose subfolders are PEFT adapters, named by the folder.
    pub adapters_dir: PathBuf,
    /// Serve adapter folders that resolve (symlinks followed) outside `adapters_dir`: registered
    /// through the API or symlinked into it. Off: both are refused.
    pub allow_adapter_paths_outside: bool,
    /// Adapters to load at start-up.
    pub preload: Vec<String>,
    /// Serve these adapters merged into the base (`name` or `name:weight`).
    pub merge: Vec<String>,
    /// Byte cap of the loaded-adapter cache.
    pub adapter_cache_bytes: u64,
    /// Byte cap of the host tier: parsed adapters kept in host memory behind the cache, so an
    /// evicted adapter returns without its folder being read again (0: off). Unset: 2 GiB with
    /// the base on a GPU; 0 on the CPU (measured: no gain there, BENCHMARKS.md).
    pub adapter_host_cache_bytes: Option<u64>,
    /// Most sequences per forward step.
    pub max_batch_size: usize,
    /// Most requests waiting for a batch slot (beyond: 429).
    pub max_waiting: usize,
    /// Most prompt tokens prefilled per step.
    pub prefill_chunk: usize,
    /// Byte cap of the prefix cache (0: off): keys and values of earlier prompts and answers,
    /// reused when a new prompt starts the same way under the same adapters.
    pub prefix_cache_bytes: u64,
    /// Bearer key every `/v1` route needs (unset = open). `LORAPLEX_API_KEY` also sets it.
    pub api_key: Option<String>,
    /// Bearer key for adapter admin routes (unset = `api_key`). `LORAPLEX_ADMIN_KEY` also sets it.
    pub admin_key: Option<String>,
    /// Most open client connections; beyond it a new connection gets a 503 and is closed.
    /// Lowered at start-up to what the open-file limit allows.
    pub max_connections: usize,
    /// Seconds from the first byte of a request head to its end before the connection is closed.
    pub header_read_timeout_secs: f64,
    /// Seconds to receive a whole request body (beyond: 408).
    pub body_read_timeout_secs: f64,
    /// Seconds an idle connection (no request in progress, no byte of a new one) stays open.
    pub keep_alive_timeout_secs: f64,
    /// Largest request body in bytes (beyond: 413).
    pub max_body_bytes: usize,
    /// Read the model's `generation_config.json` for sampling defaults (they win over
    /// `[sampling]`).
    pub use_generation_config: bool,
    /// Export vLLM's `vllm:*` queue, KV-cache and LoRA gauges on `/metrics` (for routers such
    /// as the Gateway API Inference Extension / llm-d).
    pub vllm_metrics: bool,
    /// `[sampling]`: defaults for fields a request leaves out (after the model's own).
    pub sampling: SamplingDefaults,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model: None,
            quantize: Quantize::None,
            double_quant: false,
            quantize_lm_head: false,
            device: DeviceSpec::Auto,
            dtype: DtypeSpec::Auto,
            kv_cache_bytes: None,
            kv_layout: KvLayout::Auto,
            host: "127.0.0.1".into(),
            port: 8000,
            adapters_dir: PathBuf::from("adapters"),
            allow_adapter_paths_outside: false,
            preload: Vec::new(),
            merge: Vec::new(),
            adapter_cache_bytes: 1 << 30,
            adapter_host_cache_bytes: None,
            max_batch_size: 32,
            max_waiting: 256,
            prefill_chunk: 256,
            prefix_cache_bytes: 1 << 30,
            api_key: None,
            admin_key: None,
            max_connections: 1024,
            header_read_timeout_secs: 10.0,
            body_read_timeout_secs: 30.0,
            keep_alive_timeout_secs: 30.0,
            max_body_bytes: 2 << 20,
            use_generation_config: true,
            vllm_metrics: true,
            sampling: SamplingDefaults::default(),
        }
    }
}

impl ServeConfig {
    /// Reads a TOML config file; unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config {} is not valid", path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.max_batch_size >= 1,
            "max_batch_size must be at least 1"
        );
        anyhow::ensure!(self.prefill_chunk >= 1, "prefill_chunk must be at least 1");
        let nf4 = self.quantize.settings(self.double_quant)?;
        anyhow::ensure!(
            nf4.is_some() || !self.quantize_lm_head,
            "quantize_lm_head needs quantize = \"nf4\""
        );
        anyhow::ensure!(
            self.adapter_cache_bytes >= 1,
            "adapter_cache_bytes must be positive"
        );
        anyhow::ensure!(
            self.max_connections >= 1,
            "max_connections must be at least 1"
        );
        anyhow::ensure!(self.max_body_bytes >= 1, "max_body_bytes must be positive");
        self.sampling.validate().context("[sampling]")?;
        for (key, v) in [
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            ("body_read_timeout_secs", self.body_read_timeout_secs),
            ("keep_alive_timeout_secs", self.keep_alive_timeout_secs),
        ] {
            anyhow::ensure!(
                v.is_finite() && v > 0.0 && v <= 86_400.0,
                "{key} must be a number of seconds in (0, 86400] (got {v})"
            );
        }
        Ok(())
    }

    /// A validated number of seconds as a `Duration`.
    pub fn secs(v: f64) -> std::time::Duration {
        std::time::Duration::from_secs_f64(v.clamp(0.001, 86_400.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_default_config_parses_and_unknown_keys_fail() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.toml");
        let c = ServeConfig::from_file(&path).unwrap();
        c.validate().unwrap();
        assert_eq!(c.port, 8000);
        assert_eq!(c.quantize, Quantize::None);
        assert_eq!(c.device, DeviceSpec::Auto);
        let gpu: ServeConfig =
            toml::from_str("device = \"cuda:1\"\ndtype = \"f16\"\nkv_cache_bytes = 1000").unwrap();
        assert_eq!(
            (gpu.device, gpu.dtype, gpu.kv_cache_bytes),
            (DeviceSpec::Cuda(1), DtypeSpec::F16, Some(1000))
        );
        assert!(toml::from_str::<ServeConfig>("device = \"tpu\"").is_err());
        assert!(toml::from_str::<ServeConfig>("prot = 1").is_err());
        assert!(toml::from_str::<ServeConfig>("[sampling]\ntemprature = 1.0").is_err());
        let nf4: ServeConfig = toml::from_str("quantize = \"nf4\"\ndouble_quant = true").unwrap();
        nf4.validate().unwrap();
        assert_eq!(
            nf4.quantize.settings(nf4.double_quant).unwrap(),
            Some(crate::model::Nf4Settings::new(true))
        );
        assert!(toml::from_str::<ServeConfig>("quantize = \"int3\"").is_err());
        let dq_alone: ServeConfig = toml::from_str("double_quant = true").unwrap();
        assert!(dq_alone.validate().is_err());
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.max_body_bytes, 2 << 20);
        // The shipped config sets what the default model's card recommends.
        assert_eq!(
            c.sampling,
            super::super::defaults::DEFAULT_MODEL_RECOMMENDED
        );
        assert!(c.use_generation_config);
        for bad in [
            "header_read_timeout_secs = 0.0",
            "keep_alive_timeout_secs = -1.0",
            "body_read_timeout_secs = 1e300",
            "max_connections = 0",
            "[sampling]\ntemperature = 3.0",
            "[sampling]\ntop_p = 0.0",
            "[sampling]\nmax_tokens = 0",
        ] {
            let c: ServeConfig = toml::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
    }
}
