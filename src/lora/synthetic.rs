//! Synthetic PEFT adapters with deterministic non-zero weights, for benchmarks, load tests and
//! examples (any base shape, any rank and targets).

use crate::model::{LlamaConfig, Proj};
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

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
    let names: Vec<&str> = targets.iter().map(|p| p.name()).collect();
    let config = serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
        "lora_alpha": 2 * r, "target_modules": names, "bias": "none", "lora_dropout": 0.0});
    std::fs::write(dir.join("adapter_config.json"), config.to_string())?;
    Ok(())
}
