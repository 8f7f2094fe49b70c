//! Writes a base model (typically with adapters merged in) as an HF folder: `config.json`,
//! `model.safetensors`, `generation_config.json` and the tokenizer files. NF4 linear weights are
//! written in bitsandbytes' serialization with a `quantization_config` in config.json, the form
//! transformers saves a `load_in_4bit` model in.

use super::LoadedModel;
use crate::quant::QuantizationConfig;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Writes `model` to `out` (which must not exist yet, or be empty). Files are written into a
/// temporary sibling folder first and renamed into place, so a failure leaves nothing behind.
pub fn save_hf_folder(model: &LoadedModel, out: &Path) -> Result<()> {
    if out.exists() {
        let empty = out.is_dir() && std::fs::read_dir(out)?.next().is_none();
        if !empty {
            bail!(
                "output folder {} already exists and is not empty",
                out.display()
            );
        }
        std::fs::remove_dir(out)?;
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".loraplex-export-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a temporary folder in {}", parent.display()))?;
    let dir = tmp.path();
    let cfg = &model.llama.cfg;
    let mut config = cfg.to_hf_json();
    config["eos_token_id"] = match model.eos_ids.as_slice() {
        [] => serde_json::Value::Null,
        [one] => serde_json::json!(one),
        many => serde_json::json!(many),
    };
    if let Some(nf4) = model.llama.nf4_settings() {
        config["quantization_config"] = QuantizationConfig::nf4(nf4.double_quant).to_json();
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let gen = serde_json::json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": config["eos_token_id"],
        "do_sample": false,
    });
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)?,
    )?;
    let tensors: HashMap<String, Tensor> = model
        .llama
        .hf_tensors()?
        .into_iter()
        .map(|(k, t)| Ok((k, t.contiguous()?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .context("cannot write model.safetensors")?;
    if let Some(tok) = &model.tokenizer {
        tok.save_hf_folder(dir)?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, out)
        .with_context(|| format!("cannot move the finished folder to {}", out.display()))?;
    Ok(())
}
