//! The base model as weights: config parsing, weight loading (HF safetensors folders, GGUF files,
//! hub ids, seeded random `dummy:` models) onto a device in a dtype, per-sequence KV caches, and
//! writing an HF folder back out. Running the model is `runtime`'s business.

pub mod config;
pub mod dummy;
pub mod export;
pub mod kv_cache;
pub mod kv_pool;
pub mod linear;
pub mod llama;
pub mod proj;
pub mod rope;
pub mod weights;

pub use config::LlamaConfig;
pub use kv_cache::KvCache;
pub use kv_pool::KvPool;
pub use linear::{Linear, LinearWeight, Nf4Settings, Quantize};
pub use llama::{Llama, Placement};
pub use proj::Proj;

use crate::tokenize::TextTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// Where the base model came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    HfFolder,
    Gguf,
    /// Seeded random weights of a named or given shape (`dummy:`), for benchmarks.
    Dummy,
}

/// A base model ready to run: weights, tokenizer (if the source has one) and stop ids.
pub struct LoadedModel {
    /// Short id shown to users and API clients (folder or file name).
    pub id: String,
    pub path: PathBuf,
    pub format: ModelFormat,
    pub llama: Llama,
    pub tokenizer: Option<TextTokenizer>,
    /// End-of-sequence ids: the union of config.json, generation_config.json and the tokenizer's.
    pub eos_ids: Vec<u32>,
}

impl LoadedModel {
    /// The tokenizer, or a clear error for token-id-only models.
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().with_context(|| {
            format!(
                "model `{}` has no tokenizer (no tokenizer.json); use token ids (--prompt-ids)",
                self.id
            )
        })
    }
}

/// Resolves `--model`: `None` is the default model (fetched on first use); an existing `.gguf`
/// file or HF folder loads from disk; `org/name` that is not a local path goes to the HF hub.
pub fn resolve(spec: Option<&str>) -> Result<PathBuf> {
    let Some(spec) = spec else {
        return crate::fetch::ensure_default_model();
    };
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let looks_like_hub_id = spec.split('/').count() == 2
        && !spec.starts_with('.')
        && !spec.starts_with('/')
        && !spec.ends_with(".gguf");
    if looks_like_hub_id {
        return hub_download(spec);
    }
    bail!("model `{spec}` not found: not a file or folder, and not a hub id like `org/name`")
}

/// Downloads an HF hub model's config, tokenizer and safetensors into the hub cache and returns
/// the snapshot folder (needs network access to the hub).
fn hub_download(id: &str) -> Result<PathBuf> {
    eprintln!("fetching `{id}` from the Hugging Face hub ...");
    let api = hf_hub::api::sync::Api::new().context("cannot start the HF hub client")?;
    let repo = api.model(id.to_string());
    let config = repo
        .get("config.json")
        .with_context(|| format!("hub model `{id}`: cannot fetch config.json"))?;
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let _ = repo.get(optional);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let dir = index.parent().map(Path::to_path_buf).unwrap_or_default();
            for f in weights::safetensors_files(&dir)? {
                let name = f
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                repo.get(&name)
                    .with_context(|| format!("hub model `{id}`: cannot fetch {name}"))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .with_context(|| format!("hub model `{id}`: cannot fetch model.safetensors"))?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Refuses a checkpoint quantized by anything but bitsandbytes NF4 (GPTQ, AWQ, 8-bit, FP4, ...)
/// by name, instead of failing later on tensors it does not know.
fn check_quantization_config(config: &Path) -> Result<()> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config.display()))?;
    crate::quant::QuantizationConfig::from_config_json(&v)
        .with_context(|| format!("model folder {}", config.display()))?;
    Ok(())
}

fn file_id(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    name.strip_suffix(".gguf").unwrap_or(name).to_string()
}

/// Loads a base model from a resolved path (HF folder or GGUF file) onto `device`, in f32.
pub fn load_path(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_path_as(
        path,
        &Placement {
            device: device.clone(),
            dtype: candle_core::DType::F32,
        },
    )
}

/// Loads a base model from a resolved path (HF folder or GGUF file), stored as `at` says. The
/// files are read on the CPU; each tensor is converted and moved as the model takes it.
pub fn load_path_as(path: &Path, at: &Placement) -> Result<LoadedModel> {
    let device = &Device::Cpu;
    if !path.exists() {
        bail!("model path {} not found", path.display());
    }
    let (format, llama, tokenizer, mut eos) = if path.is_dir() {
        let cfg = LlamaConfig::from_hf_file(&path.join("config.json"))?;
        check_quantization_config(&path.join("config.json"))?;
        let files = weights::safetensors_files(path)?;
        let map = weights::load_safetensors(&files, device)?;
        let eos = cfg.eos_token_ids.clone();
        let llama = Llama::from_tensors(cfg, map, at)
            .with_context(|| format!("model folder {}", path.display()))?;
        let tokenizer = match path.join("tokenizer.json").is_file() {
            true => Some(TextTokenizer::from_hf_folder(path)?),
            false => None,
        };
        (ModelFormat::HfFolder, llama, tokenizer, eos)
    } else {
        let (content, cfg, map) = weights::load_gguf(path, device)?;
        let eos = cfg.eos_token_ids.clone();
        let llama = Llama::from_tensors(cfg, map, at)
            .with_context(|| format!("GGUF file {}", path.display()))?;
        let tokenizer = TextTokenizer::from_gguf(&content)
            .with_context(|| format!("GGUF file {}: tokenizer", path.display()))?;
        (ModelFormat::Gguf, llama, Some(tokenizer), eos)
    };
    if let Some(t) = &tokenizer {
        if t.vocab_size() > llama.cfg.vocab_size {
            bail!(
                "the tokenizer has {} tokens but the model's vocabulary is {}",
                t.vocab_size(),
                llama.cfg.vocab_size
            );
        }
        eos.extend_from_slice(t.eos_ids());
    }
    eos.sort_unstable();
    eos.dedup();
    let id = match format {
        ModelFormat::Gguf | ModelFormat::Dummy => file_id(path),
        ModelFormat::HfFolder => path
            .canonicalize()
            .ok()
            .as_deref()
            .map(file_id)
            .unwrap_or_else(|| file_id(path)),
    };
    Ok(LoadedModel {
        id,
        path: path.to_path_buf(),
        format,
        llama,
        tokenizer,
        eos_ids: eos,
    })
}

impl LoadedModel {
    /// Quantizes the linear weights to NF4 when `settings` is given, then hands the freed dense
    /// memory back to the operating system.
    pub fn quantize(&mut self, settings: Option<Nf4Settings>) -> Result<()> {
        let Some(settings) = settings else {
            return Ok(());
        };
        self.llama
            .quantize_nf4(settings)
            .context("quantizing the base to NF4")?;
        release_freed_memory();
        Ok(())
    }
}

impl LoadedModel {
    /// With `on`, keeps an NF4 copy of lm_head for the logits (`--quantize-lm-head`), quantized
    /// with the base's NF4 `settings`; asking for it without NF4 settings is an error.
    pub fn quantize_lm_head(&mut self, settings: Option<Nf4Settings>, on: bool) -> Result<()> {
        if !on {
            return Ok(());
        }
        let Some(settings) = settings else {
            anyhow::bail!("--quantize-lm-head (quantize_lm_head) needs --quantize nf4");
        };
        self.llama
            .quantize_lm_head(settings)
            .context("quantizing lm_head to NF4")
    }
}

/// Returns freed heap pages to the OS (glibc keeps them otherwise, and the process would go on
/// showing the dense weights' size as resident after they were quantized away).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap structures under its own lock.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `resolve` then `load_path` on the CPU, in f32.
pub fn load(spec: Option<&str>) -> Result<LoadedModel> {
    load_as(spec, &Placement::cpu())
}

/// Loads `--model` stored as `at` says: `dummy:NAME` or `dummy:path/config.json` builds a
/// seeded random model on the device (no weights file, no tokenizer); anything else is
/// `resolve`d and loaded from disk.
pub fn load_as(spec: Option<&str>, at: &Placement) -> Result<LoadedModel> {
    if let Some(what) = spec.and_then(|s| s.strip_prefix(dummy::PREFIX)) {
        return dummy::load(what, at);
    }
    let path = resolve(spec)?;
    let mut model = load_path_as(&path, at)?;
    if spec.is_none() {
        model.id = crate::fetch::DEFAULT_MODEL_ID.to_string();
    }
    Ok(model)
}
