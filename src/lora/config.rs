//! PEFT `adapter_config.json`: the fields loraplex uses, and a clear refusal of every LoRA variant
//! it does not implement (so an adapter is never half-applied).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Which modules the config says it targets.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// An explicit list of module names (`["q_proj", "v_proj"]`).
    List(Vec<String>),
    /// A regex or `all-linear`: the tensors present decide.
    Pattern(String),
}

/// The parts of a PEFT LoRA config that change the math.
#[derive(Clone, Debug)]
pub struct PeftLoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    /// Per-module rank overrides, keyed by a module-name suffix.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, keyed by a module-name suffix.
    pub alpha_pattern: BTreeMap<String, f64>,
    pub fan_in_fan_out: bool,
    pub base_model_name_or_path: Option<String>,
}

fn is_set(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Number(_)) => true,
    }
}

/// Finds the override whose key matches `module` the way PEFT does for plain names: the key equals
/// the module's full name or is a dotted suffix of it.
pub fn pattern_match<'a, T>(patterns: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
    patterns
        .iter()
        .filter(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| v)
}

impl PeftLoraConfig {
    pub fn from_json(v: &Value) -> Result<Self> {
        let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            bail!("adapter type `{peft_type}` is not supported (only PEFT LORA)");
        }
        let refuse = [
            ("use_dora", "DoRA (use_dora) is not supported"),
            (
                "modules_to_save",
                "modules_to_save (fully trained extra modules) is not supported",
            ),
            ("lora_bias", "LoRA bias terms (lora_bias) are not supported"),
            ("use_qalora", "QA-LoRA (use_qalora) is not supported"),
            ("layer_replication", "layer_replication is not supported"),
            (
                "trainable_token_indices",
                "trainable token embeddings are not supported",
            ),
            (
                "alora_invocation_tokens",
                "activated LoRA (alora_invocation_tokens) is not supported",
            ),
            (
                "target_parameters",
                "LoRA on parameters (target_parameters) is not supported",
            ),
            ("megatron_config", "Megatron-parallel LoRA is not supported"),
            ("use_bdlora", "BD-LoRA is not supported"),
            ("arrow_config", "Arrow routing is not supported"),
            ("kasa_config", "KaSA is not supported"),
            ("monteclora_config", "MonteCLoRA is not supported"),
            ("velora_config", "VeLoRA is not supported"),
        ];
        for (key, why) in refuse {
            if is_set(v.get(key)) {
                bail!("adapter_config.json: {why} (`{key}` is set)");
            }
        }
        let bias = v.get("bias").and_then(Value::as_str).unwrap_or("none");
        if bias != "none" {
            bail!("adapter_config.json: bias = `{bias}` (trained biases) is not supported; only `none`");
        }
        if let Some(init) = v.get("init_lora_weights").and_then(Value::as_str) {
            let i = init.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "loftq"]
                .iter()
                .any(|p| i.starts_with(p))
            {
                bail!(
                    "adapter_config.json: init_lora_weights = `{init}` changes the base weights; \
                     convert the adapter to plain LoRA first (PEFT: save_pretrained with \
                     path_initial_model_for_weight_conversion)"
                );
            }
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .context("adapter_config.json: `r` is missing or not a positive integer")?
            as usize;
        // PEFT's default when absent; present but not a number is an error, not the default.
        let lora_alpha = match v.get("lora_alpha") {
            None | Some(Value::Null) => 8.0,
            Some(a) => a
                .as_f64()
                .context("adapter_config.json: `lora_alpha` must be a number")?,
        };
        let target_modules = match v.get("target_modules") {
            Some(Value::Array(a)) => TargetModules::List(
                a.iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .context("adapter_config.json: target_modules must hold strings")
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(Value::String(s)) => TargetModules::Pattern(s.clone()),
            _ => bail!("adapter_config.json: `target_modules` is missing"),
        };
        let mut rank_pattern = BTreeMap::new();
        if let Some(Value::Object(o)) = v.get("rank_pattern") {
            for (k, x) in o {
                let r = x.as_u64().with_context(|| {
                    format!("adapter_config.json: rank_pattern[{k}] is not an integer")
                })?;
                rank_pattern.insert(k.clone(), r as usize);
            }
        }
        let mut alpha_pattern = BTreeMap::new();
        if let Some(Value::Object(o)) = v.get("alpha_pattern") {
            for (k, x) in o {
                let a = x.as_f64().with_context(|| {
                    format!("adapter_config.json: alpha_pattern[{k}] is not a number")
                })?;
                alpha_pattern.insert(k.clone(), a);
            }
        }
        Ok(Self {
            r,
            lora_alpha,
            use_rslora: v
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            lora_dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            target_modules,
            rank_pattern,
            alpha_pattern,
            fan_in_fan_out: v
                .get("fan_in_fan_out")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            base_model_name_or_path: v
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// The config as PEFT writes `adapter_config.json` (plain LoRA: the variants loraplex
    /// refuses are written as off).
    pub fn to_json(&self) -> Value {
        let targets = match &self.target_modules {
            TargetModules::List(l) => serde_json::json!(l),
            TargetModules::Pattern(p) => serde_json::json!(p),
        };
        // PEFT writes a whole alpha as an integer.
        let alpha = match self.lora_alpha.fract() == 0.0 && self.lora_alpha.abs() < 1e15 {
            true => serde_json::json!(self.lora_alpha as i64),
            false => serde_json::json!(self.lora_alpha),
        };
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "bias": "none",
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_dora": false,
            "modules_to_save": null,
            "init_lora_weights": true,
            "inference_mode": true,
            "layers_to_transform": null,
            "layers_pattern": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": null,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(&v)
    }

    /// The rank PEFT expects for `module` (full name such as `model.layers.0.self_attn.q_proj`).
    pub fn rank_for(&self, module: &str) -> usize {
        pattern_match(&self.rank_pattern, module)
            .copied()
            .unwrap_or(self.r)
    }

    /// The scaling PEFT applies to `module`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling_for(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let alpha = pattern_match(&self.alpha_pattern, module)
            .copied()
            .unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scaling_with_patterns_and_rslora() {
        let c = PeftLoraConfig::from_json(&json!({"r": 8, "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"layers.1.self_attn.q_proj": 4}}))
        .unwrap();
        assert_eq!(c.scaling_for("model.layers.0.self_attn.q_proj"), 2.0);
        assert_eq!(c.scaling_for("model.layers.0.self_attn.v_proj"), 4.0);
        assert_eq!(c.scaling_for("model.layers.1.self_attn.q_proj"), 0.5);
        let rs = PeftLoraConfig::from_json(&json!({"r": 16, "lora_alpha": 16,
            "use_rslora": true, "target_modules": "all-linear"}))
        .unwrap();
        assert_eq!(rs.scaling_for("model.layers.0.mlp.up_proj"), 4.0);
    }

    #[test]
    fn to_json_reads_back() {
        let c = PeftLoraConfig::from_json(&json!({"r": 8, "lora_alpha": 16, "use_rslora": true,
            "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 4},
            "alpha_pattern": {"q_proj": 2}, "base_model_name_or_path": "tiny"}))
        .unwrap();
        let back = PeftLoraConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(back.to_json(), c.to_json());
        assert_eq!(
            back.scaling_for("model.layers.0.self_attn.v_proj"),
            16.0 / 2.0
        );
        assert_eq!(back.target_modules, c.target_modules);
    }

    #[test]
    fn refuses_variants() {
        for (k, v) in [
            ("use_dora", json!(true)),
            ("modules_to_save", json!(["lm_head"])),
            ("bias", json!("all")),
            ("peft_type", json!("IA3")),
            ("init_lora_weights", json!("pissa")),
        ] {
            let mut cfg = json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]});
            cfg[k] = v;
            let err = PeftLoraConfig::from_json(&cfg).unwrap_err().to_string();
            assert!(err.contains(k) || err.contains("IA3"), "{k}: {err}");
        }
    }
}
