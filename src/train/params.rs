//! Trainable LoRA parameters: PEFT's initialisation (A Kaiming-uniform, B zeros), the PEFT
//! export (`adapter_config.json` + `adapter_model.safetensors`) and plain tensor maps for
//! checkpoints.

use crate::model::{LlamaConfig, Proj};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// LoRA hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraShape {
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub targets: Vec<Proj>,
}

impl LoraShape {
    /// PEFT's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// The trainable A/B pairs of every targeted module.
pub struct LoraParams {
    pub shape: LoraShape,
    /// `(A [r, in], B [out, r])` keyed by `(layer, proj)`.
    pub pairs: BTreeMap<(usize, Proj), (Var, Var)>,
}

/// PEFT's safetensors key of one half.
pub fn peft_key(layer: usize, proj: Proj, half: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{half}.weight",
        proj.parent(),
        proj.name()
    )
}

impl LoraParams {
    /// PEFT's init: `A ~ U(-1/sqrt(in), 1/sqrt(in))` (kaiming_uniform with a = sqrt(5)), `B = 0`.
    pub fn init(cfg: &LlamaConfig, shape: LoraShape, seed: u64, dtype: DType) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for layer in 0..cfg.num_hidden_layers {
            for &p in &shape.targets {
                let (i, o) = p.in_out(cfg);
                let bound = 1.0 / (i as f64).sqrt();
                let a: Vec<f64> = (0..shape.rank * i)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Tensor::from_vec(a, (shape.rank, i), &Device::Cpu)?.to_dtype(dtype)?;
                let b = Tensor::zeros((o, shape.rank), dtype, &Device::Cpu)?;
                pairs.insert((layer, p), (Var::from_tensor(&a)?, Var::from_tensor(&b)?));
            }
        }
        Ok(Self { shape, pairs })
    }

    /// Every trainable variable, A then B per module, in a fixed order.
    pub fn vars(&self) -> Vec<&Var> {
        self.pairs.values().flat_map(|(a, b)| [a, b]).collect()
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Tensors under PEFT key names (f32, as PEFT saves).
    pub fn peft_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (&(l, p), (a, b)) in &self.pairs {
            out.insert(
                peft_key(l, p, "A"),
                a.as_tensor().to_dtype(DType::F32)?.contiguous()?,
            );
            out.insert(
                peft_key(l, p, "B"),
                b.as_tensor().to_dtype(DType::F32)?.contiguous()?,
            );
        }
        Ok(out)
    }

    /// Overwrites the values from PEFT-keyed tensors (checkpoint resume).
    pub fn load_tensors(&self, map: &HashMap<String, Tensor>) -> Result<()> {
        for (&(l, p), (a, b)) in &self.pairs {
            for (var, half) in [(a, "A"), (b, "B")] {
                let key = peft_key(l, p, half);
                let t = map
                    .get(&key)
                    .with_context(|| format!("checkpoint lacks `{key}`"))?;
                var.set(&t.to_dtype(var.dtype())?)?;
            }
        }
        Ok(())
    }

    /// Writes a PEFT adapter folder's two files into `dir` (atomically each).
    pub fn save_peft(&self, dir: &Path, base_model: &str, dropout: f64) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let targets: Vec<&str> = self.shape.targets.iter().map(|p| p.name()).collect();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.shape.rank,
            "lora_alpha": self.shape.alpha,
            "lora_dropout": dropout,
            "target_modules": targets,
            "use_rslora": self.shape.rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_dora": false,
            "modules_to_save": null,
            "init_lora_weights": true,
            "inference_mode": true,
            "rank_pattern": {},
            "alpha_pattern": {},
            "base_model_name_or_path": base_model,
            "revision": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "peft_version": "0.21.2",
        });
        write_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        let tmp = dir.join(".adapter_model.safetensors.tmp");
        candle_core::safetensors::save(&self.peft_tensors()?, &tmp)?;
        std::fs::rename(&tmp, dir.join("adapter_model.safetensors"))?;
        Ok(())
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    Ok(())
}
