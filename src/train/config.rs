//! `loraplex train` settings: a TOML file (`configs/train-*.toml`) with flags on top.

use super::data::Method;
use super::optim::Schedule;
use crate::model::Quantize;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Every training option; each is a TOML key of the same name.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: Option<String>,
    /// `"nf4"`: QLoRA, the frozen base's linear weights in 4-bit NormalFloat.
    pub quantize: Quantize,
    /// With NF4: double quantization of the block scales.
    pub double_quant: bool,
    pub data: Option<PathBuf>,
    pub val: Option<PathBuf>,
    /// Fraction of `data` held out for validation when `val` is not given.
    pub val_split: f64,
    pub out: Option<PathBuf>,
    pub method: Method,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names, or `all-linear`.
    pub target_modules: Vec<String>,
    pub rslora: bool,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub warmup_ratio: f64,
    pub scheduler: Schedule,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Keep only each block's input for the backward and run the block again there (one more
    /// forward per step, a fraction of the activation memory).
    pub gradient_checkpointing: bool,
    /// Evaluate on the validation set every N optimizer steps (0 = only at the end).
    pub eval_every: usize,
    /// Checkpoint every N optimizer steps (0 = only at the end).
    pub save_every: usize,
    /// Stop after this many evaluations without a new best validation loss (0 = never).
    pub early_stopping_patience: usize,
    pub seed: u64,
    pub beta: f64,
    /// `general.jsonl:0.8`: blend a general set in at that share of the examples.
    pub mix: Option<String>,
    pub skip_bad_lines: bool,
    pub overwrite: bool,
    pub resume: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: None,
            quantize: Quantize::None,
            double_quant: false,
            data: None,
            val: None,
            val_split: 0.1,
            out: None,
            method: Method::Sft,
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            rslora: false,
            epochs: 3,
            max_steps: None,
            lr: 2e-4,
            batch_size: 4,
            grad_accum: 4,
            max_seq_len: 512,
            warmup_ratio: 0.03,
            scheduler: Schedule::Cosine,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            gradient_checkpointing: true,
            eval_every: 0,
            save_every: 0,
            early_stopping_patience: 0,
            seed: 42,
            beta: 0.1,
            mix: None,
            skip_bad_lines: false,
            overwrite: false,
            resume: false,
        }
    }
}

impl TrainConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config {} is not valid", path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        if self.data.is_none() {
            bail!("--data is required");
        }
        if self.out.is_none() {
            bail!("--out is required");
        }
        self.quantize.settings(self.double_quant)?;
        if self.rank == 0 || self.batch_size == 0 || self.grad_accum == 0 || self.max_seq_len < 2 {
            bail!("rank, batch_size and grad_accum must be positive; max_seq_len at least 2");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("dropout must be in [0, 1)");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("lr must be a positive number");
        }
        if !(0.0..1.0).contains(&self.val_split) || !(0.0..1.0).contains(&self.warmup_ratio) {
            bail!("val_split and warmup_ratio must be in [0, 1)");
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            bail!("give epochs >= 1 or max_steps");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_configs_parse_and_qlora_keys_are_read() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        for name in [
            "train-legal.toml",
            "train-medical.toml",
            "train-chatbot.toml",
        ] {
            let c = TrainConfig::from_file(&dir.join(name)).unwrap();
            c.validate().unwrap();
            assert_eq!(c.quantize, Quantize::None);
        }
        let mut c: TrainConfig = toml::from_str(
            "data = \"d.jsonl\"\nout = \"o\"\nquantize = \"nf4\"\ndouble_quant = true",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.quantize, Quantize::Nf4);
        c.quantize = Quantize::None;
        assert!(c.validate().is_err(), "double_quant without nf4");
    }
}
