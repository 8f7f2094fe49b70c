//! The base model's hyper-parameters: parsed from an HF `config.json` (classic `rope_theta` and
//! transformers-5 `rope_parameters`) or from GGUF metadata, and written back as an HF config.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value};
use std::path::Path;

/// How rotary position frequencies are derived (`rope_type` in HF configs).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    Default,
    /// Positions divided by `factor` (HF `linear`).
    Linear { factor: f64 },
    /// Llama 3.x frequency-dependent scaling (HF `llama3`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Hyper-parameters of a Llama-family decoder (Llama, Mistral, Qwen2-style, SmolLM).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `model_type` as the source named it (`llama`, `mistral`, `qwen2`, ...).
    pub model_type: String,
}

fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .with_context(|| format!("config.json: `{key}` is missing or not a non-negative integer"))
}

/// Reads a token id field that may be an integer, a list of integers or null.
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_rope(v: &Value) -> Result<(f64, RopeScaling)> {
    // transformers 5 keeps everything in `rope_parameters`; older configs use `rope_theta` and an
    // optional `rope_scaling` object.
    let params = v
        .get("rope_parameters")
        .filter(|p| p.is_object())
        .or_else(|| v.get("rope_scaling").filter(|p| p.is_object()));
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or_else(|| v.get("rope_theta").and_then(Value::as_f64))
        .unwrap_or(10_000.0);
    let Some(p) = params else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |k: &str| -> Result<f64> {
        p.get(k)
            .and_then(Value::as_f64)
            .with_context(|| format!("config.json: rope `{kind}` needs `{k}`"))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: f("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: f("original_max_position_embeddings")?,
        },
        other => bail!(
            "config.json: rope type `{other}` is not supported (supported: default, linear, llama3)"
        ),
    };
    Ok((theta, scaling))
}

impl LlamaConfig {
    /// Parses an HF `config.json` of the `LlamaForCausalLM` family.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama")
            .to_string();
        const KNOWN: [&str; 4] = ["llama", "mistral", "qwen2", "smollm3"];
        if !KNOWN.contains(&model_type.as_str()) {
            bail!(
                "config.json: model_type `{model_type}` is not a supported Llama-family decoder \
                 (supported: {})",
                KNOWN.join(", ")
            );
        }
        let hidden_size = get_usize(v, "hidden_size")?;
        let num_attention_heads = get_usize(v, "num_attention_heads")?;
        let num_key_value_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_attention_heads);
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let (rope_theta, rope_scaling) = parse_rope(v)?;
        let cfg = Self {
            vocab_size: get_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size")?,
            num_hidden_layers: get_usize(v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(2048),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            model_type,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `config.json` from a model folder.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_hf_json(&v).with_context(|| format!("in {}", path.display()))
    }

    /// Builds the config from GGUF metadata (`general.architecture = llama`).
    pub fn from_gguf(content: &gguf_file::Content, vocab_size: usize, tied: bool) -> Result<Self> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            bail!("GGUF architecture `{arch}` is not supported (only `llama`)");
        }
        let u = |k: &str| -> Result<usize> {
            let v = md
                .get(&format!("llama.{k}"))
                .with_context(|| format!("GGUF metadata `llama.{k}` is missing"))?;
            Ok(v.to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .with_context(|| format!("GGUF metadata `llama.{k}` is not an integer"))?
                as usize)
        };
        let f = |k: &str| -> Option<f64> {
            md.get(&format!("llama.{k}"))
                .and_then(|v| v.to_f32().ok())
                .map(f64::from)
        };
        let hidden_size = u("embedding_length")?;
        let num_attention_heads = u("attention.head_count")?;
        let num_key_value_heads = u("attention.head_count_kv").unwrap_or(num_attention_heads);
        let head_dim =
            u("attention.key_length").unwrap_or(hidden_size / num_attention_heads.max(1));
        let tok_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: f("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: match f("rope.scaling.factor") {
                Some(factor) if factor != 1.0 => RopeScaling::Linear { factor },
                _ => RopeScaling::Default,
            },
            max_position_embeddings: u("context_length").unwrap_or(2048),
            tie_word_embeddings: tied,
            bos_token_id: tok_u32("tokenizer.ggml.bos_token_id"),
            eos_token_ids: tok_u32("tokenizer.ggml.eos_token_id").into_iter().collect(),
            model_type: "llama".to_string(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            bail!("head_dim ({}) must be even and positive", self.head_dim);
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            bail!("vocab_size, hidden_size and num_hidden_layers must be positive");
        }
        Ok(())
    }

    /// The HF `config.json` for this model (what `merge` writes).
    pub fn to_hf_json(&self) -> Value {
        let rope_parameters = match &self.rope_scaling {
            RopeScaling::Default => json!({"rope_type": "default", "rope_theta": self.rope_theta}),
            RopeScaling::Linear { factor } => {
                json!({"rope_type": "linear", "factor": factor, "rope_theta": self.rope_theta})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
                "rope_theta": self.rope_theta,
            }),
        };
        let mut v = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters.clone(),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
        });
        if self.rope_scaling != RopeScaling::Default {
            v["rope_scaling"] = rope_parameters;
        }
        v["eos_token_id"] = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        v
    }

    /// `(query heads, key/value heads, head dim)`.
    pub fn heads(&self) -> (usize, usize, usize) {
        (
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        )
    }

    /// Number of query heads that share one key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_parameters_and_legacy_theta() {
        let v = json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}});
        let c = LlamaConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.rope_theta, 5000.0);
        assert_eq!(c.head_dim, 4);
        let mut v2 = v.clone();
        v2.as_object_mut().unwrap().remove("rope_parameters");
        v2["rope_theta"] = json!(123.0);
        assert_eq!(LlamaConfig::from_hf_json(&v2).unwrap().rope_theta, 123.0);
    }

    #[test]
    fn refuses_bad_heads_and_unknown_rope() {
        let v = json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2});
        assert!(LlamaConfig::from_hf_json(&v).is_err());
        let v = json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_scaling": {"rope_type": "yarn", "factor": 2.0}});
        let err = LlamaConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
    }

    #[test]
    fn hf_json_round_trip() {
        let v = json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": [2, 3],
            "tie_word_embeddings": true});
        let c = LlamaConfig::from_hf_json(&v).unwrap();
        assert_eq!(LlamaConfig::from_hf_json(&c.to_hf_json()).unwrap(), c);
    }
}
