//! Random-weight models of real shapes for benchmarks (`--model dummy:llama-3-8b`, or
//! `dummy:path/to/config.json`): the architecture built with seeded random weights directly on
//! the device, no weights file and no tokenizer (vLLM's `--load-format dummy`). Speed does not
//! depend on the values; these models speak token ids only.

use super::config::LlamaConfig;
use super::linear::{Linear, LinearWeight};
use super::llama::{Block, Llama, Placement};
use super::proj::Proj;
use super::{LoadedModel, ModelFormat};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::path::{Path, PathBuf};

/// The `--model` prefix of a random-weight model.
pub const PREFIX: &str = "dummy:";

/// The seed of every dummy model's weights.
pub const SEED: u64 = 20261201;

/// Standard deviation of the linear and embedding weights (HF's `initializer_range` default).
const INIT_STD: f64 = 0.02;

/// Named shapes, as HF `config.json` text.
const NAMED: &[(&str, &str)] = &[
    (
        "llama-3-8b",
        r#"{"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": false,
            "bos_token_id": 128000, "eos_token_id": 128001}"#,
    ),
    (
        "llama-3.2-1b",
        r#"{"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
            "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": true,
            "bos_token_id": 128000, "eos_token_id": 128001}"#,
    ),
    (
        // Llama-3-8B's 32 layers, head_dim and GQA grouping with tiny widths: the same launches
        // and host work per decode step with almost no weights to read (a step's overhead floor).
        "llama-3-8b-skeleton",
        r#"{"model_type": "llama", "vocab_size": 1024, "hidden_size": 512,
            "intermediate_size": 1024, "num_hidden_layers": 32, "num_attention_heads": 4,
            "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2}"#,
    ),
    (
        "smollm2-135m",
        r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": true,
            "bos_token_id": 1, "eos_token_id": 2}"#,
    ),
    (
        "tiny",
        r#"{"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 256, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2}"#,
    ),
];

/// The names `dummy:NAME` accepts.
pub fn names() -> Vec<&'static str> {
    NAMED.iter().map(|(n, _)| *n).collect()
}

/// The config of `dummy:WHAT`: a named shape, or an HF `config.json` path.
pub fn config(what: &str) -> Result<LlamaConfig> {
    if let Some((_, json)) = NAMED.iter().find(|(n, _)| *n == what) {
        let v: serde_json::Value = serde_json::from_str(json).context("built-in dummy config")?;
        return LlamaConfig::from_hf_json(&v);
    }
    let path = Path::new(what);
    if path.is_file() {
        return LlamaConfig::from_hf_file(path);
    }
    bail!(
        "unknown dummy model `{what}`: use one of {} or the path of a config.json",
        names().join(", ")
    )
}

/// Builds `dummy:WHAT` with seeded random weights, stored as `at` says.
pub fn load(what: &str, at: &Placement) -> Result<LoadedModel> {
    let cfg = config(what)?;
    let llama = build(cfg, at).with_context(|| format!("building dummy model `{what}`"))?;
    let eos_ids = llama.cfg.eos_token_ids.clone();
    let id = format!(
        "dummy-{}",
        Path::new(what)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
    );
    Ok(LoadedModel {
        id,
        path: PathBuf::from(format!("{PREFIX}{what}")),
        format: ModelFormat::Dummy,
        llama,
        tokenizer: None,
        eos_ids,
    })
}

/// Models below this many parameters draw their weights on the host, so that they are the same
/// bits on every device (the GPU check compares a GPU against the CPU on them); larger ones are
/// drawn on the device itself (seeded curand), which takes seconds instead of minutes.
const HOST_DRAW_MAX_PARAMS: usize = 2_000_000_000;

/// Parameters of a config's weights (lm_head counted when untied).
pub fn param_count(cfg: &LlamaConfig) -> usize {
    let per_layer: usize = Proj::ALL
        .iter()
        .map(|p| {
            let (i, o) = p.in_out(cfg);
            i * o
        })
        .sum::<usize>()
        + 2 * cfg.hidden_size;
    let embed = cfg.vocab_size * cfg.hidden_size;
    per_layer * cfg.num_hidden_layers
        + embed * (1 + usize::from(!cfg.tie_word_embeddings))
        + cfg.hidden_size
}

/// Random weights of the config's shapes (see `HOST_DRAW_MAX_PARAMS` for where they are drawn;
/// the CPU rng of candle cannot be seeded, so host draws use a seeded generator of our own).
fn build(cfg: LlamaConfig, at: &Placement) -> Result<Llama> {
    let host = at.device.is_cpu() || param_count(&cfg) < HOST_DRAW_MAX_PARAMS;
    let mut gen = Generator::new(&at.device, host)?;
    let h = cfg.hidden_size;
    let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
    for _ in 0..cfg.num_hidden_layers {
        let mut proj = Vec::with_capacity(7);
        for p in Proj::ALL {
            let (i, o) = p.in_out(&cfg);
            proj.push(Linear {
                weight: LinearWeight::Dense(gen.normal(&[o, i], at)?),
                bias: None,
            });
        }
        let proj: [Linear; 7] = proj
            .try_into()
            .map_err(|_| anyhow::anyhow!("internal: expected 7 projections"))?;
        blocks.push(Block {
            attn_norm: ones(h, at)?,
            mlp_norm: ones(h, at)?,
            proj,
        });
    }
    let embed = gen.normal(&[cfg.vocab_size, h], at)?;
    let lm_head = match cfg.tie_word_embeddings {
        true => None,
        false => Some(gen.normal(&[cfg.vocab_size, h], at)?),
    };
    let norm = ones(h, at)?;
    Ok(Llama::from_parts(
        cfg, embed, blocks, norm, lm_head, &at.device,
    )?)
}

fn ones(n: usize, at: &Placement) -> candle_core::Result<Tensor> {
    Tensor::ones(n, at.dtype, &at.device)
}

/// Seeded normal draws on the placement's device.
enum Generator {
    Host(Box<StdRng>),
    Device,
}

impl Generator {
    fn new(device: &Device, host: bool) -> Result<Self> {
        match host {
            true => Ok(Self::Host(Box::new(StdRng::seed_from_u64(SEED)))),
            false => {
                device.set_seed(SEED)?;
                Ok(Self::Device)
            }
        }
    }

    fn normal(&mut self, shape: &[usize], at: &Placement) -> Result<Tensor> {
        match self {
            Self::Host(rng) => {
                let n: usize = shape.iter().product();
                let dist = Normal::new(0.0f32, INIT_STD as f32)?;
                let v: Vec<f32> = (0..n).map(|_| dist.sample(rng)).collect();
                Ok(at.put(&Tensor::from_vec(v, shape, &Device::Cpu)?)?)
            }
            Self::Device => {
                Ok(Tensor::randn(0f32, INIT_STD as f32, shape, &at.device)?.to_dtype(at.dtype)?)
            }
        }
    }
}

/// Token ids for a benchmark prompt: `len` ids drawn uniformly from the vocabulary (seeded),
/// avoiding the config's end-of-sequence ids.
pub fn prompt_ids(cfg: &LlamaConfig, len: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let vocab = cfg.vocab_size.max(2) as u32;
    (0..len)
        .map(|_| loop {
            let t = rng.random_range(0..vocab);
            if !cfg.eos_token_ids.contains(&t) {
                break t;
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_shapes_parse_and_count_as_published() {
        let c = config("llama-3-8b").unwrap();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.head_dim),
            (4096, 32, 128)
        );
        // Llama-3-8B has 8.03 B parameters.
        let n = param_count(&c) as f64 / 1e9;
        assert!((n - 8.03).abs() < 0.01, "{n}");
        let k = config("llama-3-8b-skeleton").unwrap();
        assert_eq!(
            (
                k.num_hidden_layers,
                k.head_dim,
                k.num_attention_heads / k.num_key_value_heads
            ),
            (c.num_hidden_layers, c.head_dim, 4),
            "the 8B's layers, head_dim and GQA group"
        );
        assert!(param_count(&k) * 50 < param_count(&c));
        let s = config("smollm2-135m").unwrap();
        let n = param_count(&s) as f64 / 1e6;
        assert!((n - 134.5).abs() < 1.0, "{n}");
        let err = config("llama-9").unwrap_err().to_string();
        assert!(err.contains("llama-3-8b"), "{err}");
    }

    #[test]
    fn dummy_models_are_seeded_and_run() {
        let a = load("tiny", &Placement::cpu()).unwrap();
        let b = load("tiny", &Placement::cpu()).unwrap();
        let (wa, wb) = (&a.llama.blocks[1].proj[3], &b.llama.blocks[1].proj[3]);
        let (LinearWeight::Dense(wa), LinearWeight::Dense(wb)) = (&wa.weight, &wb.weight) else {
            panic!("dense weights expected");
        };
        let diff = (wa - wb).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let std = wa
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((std - 0.02).abs() < 0.002, "{std}");
        assert!(a.tokenizer.is_none());
        assert_eq!(a.id, "dummy-tiny");
        let ids = prompt_ids(&a.llama.cfg, 16, 3);
        assert_eq!(ids, prompt_ids(&a.llama.cfg, 16, 3));
        assert!(ids.iter().all(|&t| (t as usize) < 256 && t != 2));
    }
}
