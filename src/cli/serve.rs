//! `loraplex serve`: flags on top of the TOML config, then the server.

use crate::model::Quantize;
use crate::runtime::{DeviceSpec, DtypeSpec};
use crate::server::{serve, KvLayout, ServeConfig};
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// TOML config (keys as in configs/default.toml); flags override it. Unset: the built-in
    /// defaults shown here.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Base model: HF folder, .gguf file or hub id. Default: SmolLM2-135M-Instruct.
    #[arg(long, short = 'm', env = "LORAPLEX_MODEL")]
    pub model: Option<String>,
    /// Store the base's linear weights quantized (nf4: QLoRA's 4-bit NormalFloat).
    #[arg(long, value_enum)]
    pub quantize: Option<Quantize>,
    /// With --quantize nf4: store the block scales in 8 bits too (double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// With --quantize nf4: compute the logits from an NF4 copy of lm_head too.
    #[arg(long)]
    pub quantize_lm_head: bool,
    /// Where the base lives: auto, cpu, cuda or cuda:N. Default: auto (the GPU when built with
    /// `--features cuda` and one is visible, else the CPU)
    #[arg(long, env = "LORAPLEX_DEVICE")]
    pub device: Option<DeviceSpec>,
    /// Dtype of weights, activations and KV cache. Default: auto (bf16 on a GPU, f32 on the CPU)
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeSpec>,
    /// Byte budget of all running KV caches, as blocks of 16 positions taken as sequences grow
    /// (requests wait while it is full; the newest sequence is preempted and recomputed when it
    /// runs dry). Default: 90% of free GPU memory after loading on a GPU; on the CPU half the
    /// host memory available after loading (cgroup limit included)
    #[arg(long)]
    pub kv_cache_bytes: Option<u64>,
    /// Where the KV budget's blocks live: paged (one pool on the device, allocated at start and
    /// read through block tables), buffers (each sequence's own, capped at its blocks), auto
    /// (paged on a GPU, buffers on the CPU). Default: auto
    #[arg(long, value_enum)]
    pub kv_layout: Option<KvLayout>,
    /// Folder of PEFT adapters (each subfolder is one, named by the folder). Default: adapters
    #[arg(long)]
    pub adapters_dir: Option<PathBuf>,
    /// Address to bind. Default: 127.0.0.1
    #[arg(long)]
    pub host: Option<String>,
    /// Port (0 = any free port). Default: 8000
    #[arg(long)]
    pub port: Option<u16>,
    /// Serve this adapter merged into the base: NAME[:WEIGHT] (repeat to merge a stack).
    #[arg(long, value_name = "NAME[:WEIGHT]")]
    pub merge: Vec<String>,
    /// Load this adapter at start-up (repeatable).
    #[arg(long)]
    pub preload: Vec<String>,
    /// Byte cap of the loaded-adapter cache.
    #[arg(long)]
    pub adapter_cache_bytes: Option<u64>,
    /// Byte cap of the adapters' host tier (parsed adapters kept in host memory behind the
    /// cache, so an evicted one returns without reading its folder; 0: off). Default: 2 GiB
    /// with the base on a GPU, 0 on the CPU.
    #[arg(long)]
    pub adapter_host_cache_bytes: Option<u64>,
    /// Most sequences per forward step.
    #[arg(long)]
    pub max_batch_size: Option<usize>,
    /// Most requests waiting for a slot before 429.
    #[arg(long)]
    pub max_waiting: Option<usize>,
    /// Most prompt tokens prefilled per step.
    #[arg(long)]
    pub prefill_chunk: Option<usize>,
    /// Byte cap of the prefix cache: keys and values of earlier prompts and answers, reused by
    /// prompts that start the same way under the same adapters (0 = off). With a KV budget it
    /// also lives in that budget's blocks, evicted when running sequences need them.
    #[arg(long)]
    pub prefix_cache_bytes: Option<u64>,
    /// Require `Authorization: Bearer KEY` on /v1 routes. Unset: no auth.
    #[arg(long, env = "LORAPLEX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Separate key for adapter admin routes. Unset: --api-key.
    #[arg(long, env = "LORAPLEX_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Allow adapter folders outside the adapters directory (registered through the API, or
    /// symlinked into it).
    #[arg(long)]
    pub allow_adapter_paths_outside: bool,
    /// Most open client connections (beyond: 503 and close). Default: 1024
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds for a request head once its first byte arrived. Default: 10
    #[arg(long, value_name = "SECS")]
    pub header_read_timeout: Option<f64>,
    /// Seconds to receive a request body (beyond: 408). Default: 30
    #[arg(long, value_name = "SECS")]
    pub body_read_timeout: Option<f64>,
    /// Seconds an idle connection stays open. Default: 30
    #[arg(long, value_name = "SECS")]
    pub keep_alive_timeout: Option<f64>,
    /// Largest request body in bytes (beyond: 413). Default: 2 MiB
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
}

impl ServeArgs {
    /// The config file (or defaults) with every given flag applied.
    pub fn to_config(&self) -> Result<ServeConfig> {
        let mut c = match &self.config {
            Some(p) => ServeConfig::from_file(p)?,
            None => ServeConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            adapters_dir,
            host,
            port,
            adapter_cache_bytes,
            max_batch_size,
            max_waiting,
            prefill_chunk,
            prefix_cache_bytes,
            quantize,
            device,
            dtype,
            kv_layout,
            max_connections,
            max_body_bytes
        );
        if let Some(v) = self.header_read_timeout {
            c.header_read_timeout_secs = v;
        }
        if let Some(v) = self.body_read_timeout {
            c.body_read_timeout_secs = v;
        }
        if let Some(v) = self.keep_alive_timeout {
            c.keep_alive_timeout_secs = v;
        }
        if self.adapter_host_cache_bytes.is_some() {
            c.adapter_host_cache_bytes = self.adapter_host_cache_bytes;
        }
        if self.kv_cache_bytes.is_some() {
            c.kv_cache_bytes = self.kv_cache_bytes;
        }
        c.double_quant |= self.double_quant;
        c.quantize_lm_head |= self.quantize_lm_head;
        if self.model.is_some() {
            c.model = self.model.clone();
        }
        if self.api_key.is_some() {
            c.api_key = self.api_key.clone();
        }
        if self.admin_key.is_some() {
            c.admin_key = self.admin_key.clone();
        }
        if !self.merge.is_empty() {
            c.merge = self.merge.clone();
        }
        if !self.preload.is_empty() {
            c.preload = self.preload.clone();
        }
        c.allow_adapter_paths_outside |= self.allow_adapter_paths_outside;
        Ok(c)
    }
}

pub fn run(a: ServeArgs) -> Result<()> {
    let cfg = a.to_config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(cfg))
}
