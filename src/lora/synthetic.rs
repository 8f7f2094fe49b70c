//! Synthetic PEFT adapters with deterministic non-zero weights, for benchmarks, load tests and
//! examples (any base shape, any rank and targets).

use super::adapter::{LoraAdapter, LoraModule};
use super::config::PeftLoraConfig;
use crate::model::{LlamaConfig, Placement, Proj};
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The PEFT config of a synthetic adapter: rank `r`, alpha `2r`, the given targets.
fn synthetic_config(r: usize, targets: &[Proj]) -> serde_json::Value {
    let names: Vec<&str> = targets.iter().map(|p| p.name()).collect();
    serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
        "lora_alpha": 2 * r, "target_modules": names, "bias": "none", "lora_dropout": 0.0})
}

/// A synthetic adapter built in memory, its tensors drawn where `at` says (rank `r`, alpha
/// `2r`, the given targets in every layer, normal weights of standard deviation `std`; seeded
/// on a GPU, where benchmarks of many adapters build them without touching the disk).
pub fn synthetic_adapter(
    name: &str,
    cfg: &LlamaConfig,
    r: usize,
    targets: &[Proj],
    std: f64,
    at: &Placement,
) -> Result<LoraAdapter> {
    let config = PeftLoraConfig::from_json(&synthetic_config(r, targets))?;
    let mut modules = BTreeMap::new();
    for l in 0..cfg.num_hidden_layers {
        for &p in targets {
            let (i, o) = p.in_out(cfg);
            let draw = |shape: (usize, usize)| -> Result<Tensor> {
                Ok(Tensor::randn(0f32, std as f32, shape, &at.device)?.to_dtype(at.dtype)?)
            };
            let module = LoraModule {
                a: draw((r, i))?,
                b: draw((o, r))?,
                scaling: config.scaling_for(&format!(
                    "model.layers.{l}.{}.{}",
                    p.parent(),
                    p.name()
                )),
            };
            modules.insert((l, p), module);
        }
    }
    Ok(LoraAdapter {
        name: name.to_string(),
        dir: PathBuf::from(format!("synthetic:{name}")),
        config,
        modules,
    })
}

/// Writes `adapter_config.json` + `adapter_model.safetensors` into `dir`: rank `r`, alpha `2r`,
/// the given targets in every layer, weights `amplitude * sin(k * seed')` (different per layer).
pub fn write_synthetic_adapter(
    dir: &Path,
    cfg: &LlamaConfig,
    r: usize,
    targets: &[Proj],
    seed: f64,
    amplitude: f64,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let wave = |n: usize, s: f64| -> Result<Tensor> {
        Ok(((Tensor::arange(0f32, n as f32, &Device::Cpu)? * s)?.sin()? * amplitude)?)
    };
    let mut t = HashMap::new();
    for l in 0..cfg.num_hidden_layers {
        for p in targets {
            let (i, o) = p.in_out(cfg);
            let pre = format!(
                "base_model.model.model.layers.{l}.{}.{}",
                p.parent(),
                p.name()
            );
            t.insert(
                format!("{pre}.lora_A.weight"),
                wave(r * i, seed + l as f64)?.reshape((r, i))?,
            );
            t.insert(
                format!("{pre}.lora_B.weight"),
                wave(o * r, seed * 1.3 + l as f64)?.reshape((o, r))?,
            );
        }
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors"))?;
    std::fs::write(
        dir.join("adapter_config.json"),
        synthetic_config(r, targets).to_string(),
    )?;
    Ok(())
}
