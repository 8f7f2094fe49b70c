//! One PEFT LoRA adapter loaded from disk and validated against a base model: every tensor name,
//! layer index and shape is checked, and anything loraplex would have to ignore is refused.

use super::config::{PeftLoraConfig, TargetModules};
use crate::model::{LlamaConfig, Proj};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The largest |alpha / r| accepted: far above any trained adapter's (rsLoRA at r = 1 with
/// alpha = 1024 is 1024), far below where the delta overflows.
pub const MAX_SCALING: f64 = 1e4;

/// The low-rank pair of one targeted module: `delta W = scaling * B A`.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// `[r, in_features]`
    pub a: Tensor,
    /// `[out_features, r]`
    pub b: Tensor,
    pub scaling: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
}

/// A validated adapter, immutable once loaded (share it through an `Arc`).
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub name: String,
    pub dir: PathBuf,
    pub config: PeftLoraConfig,
    /// Keyed by `(layer, projection)`.
    pub modules: BTreeMap<(usize, Proj), LoraModule>,
}

/// The `(key, tensor)` of a module's lora_A and lora_B, as they are found.
type HalfPair = (Option<(String, Tensor)>, Option<(String, Tensor)>);

/// What one safetensors key of a PEFT adapter names.
#[derive(Debug, PartialEq)]
struct LoraKey {
    layer: usize,
    proj: Proj,
    is_a: bool,
}

/// Parses `base_model.model.model.layers.N.self_attn.q_proj.lora_A[.adapter].weight`.
fn parse_key(key: &str) -> Result<LoraKey> {
    let unsupported = |what: &str| -> Result<LoraKey> {
        bail!("adapter tensor `{key}`: {what} is not supported")
    };
    if key.contains("lora_embedding_") || key.contains("embed_tokens") {
        return unsupported("LoRA on the embedding");
    }
    if key.contains("lm_head") {
        return unsupported("LoRA on lm_head");
    }
    if key.contains("lora_magnitude_vector") {
        return unsupported("DoRA (magnitude vector)");
    }
    if key.contains("modules_to_save") {
        return unsupported("a fully trained module (modules_to_save)");
    }
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    let parts: Vec<&str> = rest.split('.').collect();
    // model . layers . N . parent . proj . lora_X [. adapter] . weight
    let shape_ok = (parts.len() == 7 || parts.len() == 8)
        && parts[0] == "model"
        && parts[1] == "layers"
        && parts.last() == Some(&"weight");
    if !shape_ok {
        if parts.last() == Some(&"bias") {
            return unsupported("a LoRA bias");
        }
        bail!("adapter tensor `{key}` is not a LoRA weight of a decoder layer (unknown key)");
    }
    let layer: usize = parts[2].parse().with_context(|| {
        format!(
            "adapter tensor `{key}`: `{}` is not a layer index",
            parts[2]
        )
    })?;
    let proj = Proj::from_name(parts[4]).with_context(|| {
        format!(
            "adapter tensor `{key}`: module `{}` is not a Llama linear layer",
            parts[4]
        )
    })?;
    if parts[3] != proj.parent() {
        bail!(
            "adapter tensor `{key}`: `{}` belongs under `{}`",
            parts[4],
            proj.parent()
        );
    }
    let is_a = match parts[5] {
        "lora_A" => true,
        "lora_B" => false,
        other => bail!("adapter tensor `{key}`: `{other}` is neither lora_A nor lora_B"),
    };
    Ok(LoraKey { layer, proj, is_a })
}

impl LoraAdapter {
    /// Loads `dir/adapter_config.json` + `dir/adapter_model.safetensors` and validates it against
    /// a base with config `base`.
    pub fn load(name: &str, dir: &Path, base: &LlamaConfig) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        if !cfg_path.is_file() {
            bail!(
                "adapter `{name}`: {} not found (expected a PEFT adapter folder)",
                cfg_path.display()
            );
        }
        let config = PeftLoraConfig::from_file(&cfg_path)
            .with_context(|| format!("adapter `{name}` ({})", dir.display()))?;
        let st = dir.join("adapter_model.safetensors");
        if !st.is_file() {
            if dir.join("adapter_model.bin").is_file() {
                bail!(
                    "adapter `{name}`: only adapter_model.bin (a PyTorch pickle) is present; save \
                     the adapter with safe_serialization=True to get adapter_model.safetensors"
                );
            }
            bail!("adapter `{name}`: {} not found", st.display());
        }
        let tensors = candle_core::safetensors::load(&st, &Device::Cpu)
            .with_context(|| format!("adapter `{name}`: cannot read {}", st.display()))?;
        Self::from_tensors(name, dir, config, tensors, base).with_context(|| {
            format!(
                "adapter `{name}` ({}) does not fit the base model",
                dir.display()
            )
        })
    }

    /// Validates tensors already in memory (used by `load` and by training's export check).
    pub fn from_tensors(
        name: &str,
        dir: &Path,
        config: PeftLoraConfig,
        tensors: HashMap<String, Tensor>,
        base: &LlamaConfig,
    ) -> Result<Self> {
        if tensors.is_empty() {
            bail!("the adapter has no tensors");
        }
        if config.fan_in_fan_out {
            // PEFT itself resets fan_in_fan_out to false for nn.Linear targets (all Llama ones).
            tracing::warn!(
                "adapter `{name}`: fan_in_fan_out=true ignored for Linear layers, as PEFT does"
            );
        }
        let mut halves: BTreeMap<(usize, Proj), HalfPair> = BTreeMap::new();
        let mut names: Vec<_> = tensors.into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, t) in names {
            let k = parse_key(&key)?;
            if k.layer >= base.num_hidden_layers {
                bail!(
                    "adapter tensor `{key}` is for layer {} but the base model has {} layers",
                    k.layer,
                    base.num_hidden_layers
                );
            }
            let slot = halves.entry((k.layer, k.proj)).or_default();
            let half = if k.is_a { &mut slot.0 } else { &mut slot.1 };
            if half.is_some() {
                bail!("adapter tensor `{key}` appears twice (several adapter names in one file?)");
            }
            *half = Some((key, t.to_dtype(DType::F32)?));
        }
        let mut modules = BTreeMap::new();
        for ((layer, proj), pair) in halves {
            let module = format!("model.layers.{layer}.{}.{}", proj.parent(), proj.name());
            let (Some((a_key, a)), Some((b_key, b))) = pair else {
                bail!("module `{module}` has only one of lora_A / lora_B");
            };
            let (fan_in, fan_out) = proj.in_out(base);
            let r = config.rank_for(&module);
            let check = |key: &str, t: &Tensor, want: [usize; 2]| -> Result<()> {
                if t.dims() != want {
                    bail!(
                        "tensor `{key}` has shape {:?} but the base model's {} needs {:?} \
                         ({} = {fan_in} in, {fan_out} out; rank {r})",
                        t.dims(),
                        proj.name(),
                        want,
                        proj.name()
                    );
                }
                Ok(())
            };
            check(&a_key, &a, [r, fan_in])?;
            check(&b_key, &b, [fan_out, r])?;
            for (key, t) in [(&a_key, &a), (&b_key, &b)] {
                let finite = t.abs()?.max_all()?.to_scalar::<f32>()?.is_finite();
                if !finite {
                    bail!("tensor `{key}` holds NaN or infinite values");
                }
            }
            let scaling = config.scaling_for(&module);
            if !scaling.is_finite() || scaling.abs() > MAX_SCALING {
                bail!(
                    "module `{module}`: scaling {scaling} (lora_alpha / r) is outside ±{MAX_SCALING}"
                );
            }
            modules.insert((layer, proj), LoraModule { a, b, scaling });
        }
        if let TargetModules::List(list) = &config.target_modules {
            let present: BTreeSet<&str> = modules.keys().map(|(_, p)| p.name()).collect();
            for t in list {
                if Proj::from_name(t).is_none() {
                    bail!("target module `{t}` is not a Llama linear layer (q/k/v/o/gate/up/down_proj)");
                }
                if !present.contains(t.as_str()) {
                    bail!(
                        "adapter_config.json targets `{t}` but the weights hold no `{t}` tensors"
                    );
                }
            }
            if let Some(extra) = present.iter().find(|p| !list.iter().any(|t| t == *p)) {
                bail!(
                    "the weights hold `{extra}` tensors that adapter_config.json does not target"
                );
            }
        }
        Ok(Self {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            config,
            modules,
        })
    }

    /// Writes the adapter as a PEFT folder, `adapter_config.json` + `adapter_model.safetensors`
    /// (f32, PEFT's key names), into `out`, which must not exist or be empty. The files are
    /// written into a temporary sibling folder renamed into place, so a failure leaves nothing.
    pub fn save_peft(&self, out: &Path) -> Result<()> {
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
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".loraplex-adapter-")
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a temporary folder in {}", parent.display()))?;
        let mut tensors = HashMap::new();
        for (&(layer, proj), m) in &self.modules {
            let pre = format!(
                "base_model.model.model.layers.{layer}.{}.{}",
                proj.parent(),
                proj.name()
            );
            let host = |t: &Tensor| -> Result<Tensor> {
                Ok(t.to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .contiguous()?)
            };
            tensors.insert(format!("{pre}.lora_A.weight"), host(&m.a)?);
            tensors.insert(format!("{pre}.lora_B.weight"), host(&m.b)?);
        }
        candle_core::safetensors::save(&tensors, tmp.path().join("adapter_model.safetensors"))
            .context("cannot write adapter_model.safetensors")?;
        std::fs::write(
            tmp.path().join("adapter_config.json"),
            serde_json::to_string_pretty(&self.config.to_json())?,
        )?;
        let kept = tmp.keep();
        std::fs::rename(&kept, out)
            .with_context(|| format!("cannot move the finished folder to {}", out.display()))?;
        Ok(())
    }

    /// Bytes of all LoRA tensors.
    pub fn bytes(&self) -> usize {
        self.modules
            .values()
            .map(|m| (m.a.elem_count() + m.b.elem_count()) * m.a.dtype().size_in_bytes())
            .sum()
    }

    /// The targeted module names, in `Proj` order.
    pub fn targets(&self) -> Vec<&'static str> {
        let set: BTreeSet<Proj> = self.modules.keys().map(|(_, p)| *p).collect();
        set.into_iter().map(Proj::name).collect()
    }

    /// Distinct scaling factors used (one unless alpha/rank patterns differ per module).
    pub fn scalings(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.modules.values().map(|m| m.scaling).collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let k = parse_key("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight").unwrap();
        assert_eq!(
            k,
            LoraKey {
                layer: 3,
                proj: Proj::Down,
                is_a: false
            }
        );
        let k = parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
            .unwrap();
        assert!(k.is_a);
        for bad in [
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
        ] {
            assert!(parse_key(bad).is_err(), "{bad}");
        }
    }
}
