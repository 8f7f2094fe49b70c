//! `loraplex train`: flags on top of a TOML config, then the training loop.

use crate::model::Quantize;
use crate::runtime::DeviceSpec;
use crate::train::config::TrainConfig;
use crate::train::data::Method;
use crate::train::optim::Schedule;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(args_override_self = true)]
pub struct TrainArgs {
    /// TOML config (keys as the long flags, with underscores, e.g. configs/train-legal.toml);
    /// flags override it. Unset: the built-in defaults shown here.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Base model: HF folder, .gguf file or hub id. Default: SmolLM2-135M-Instruct.
    #[arg(long, short = 'm', env = "LORAPLEX_MODEL")]
    pub model: Option<String>,
    /// QLoRA: keep the frozen base's linear weights in NF4 (4-bit NormalFloat).
    #[arg(long, value_enum)]
    pub quantize: Option<Quantize>,
    /// With --quantize nf4: double quantization of the block scales.
    #[arg(long)]
    pub double_quant: bool,
    /// Where to train: auto or cpu (training runs on the CPU for now; cuda is refused).
    #[arg(long, default_value_t = DeviceSpec::Auto)]
    pub device: DeviceSpec,
    /// Training data (JSONL: Alpaca, chat messages, or DPO prompt/chosen/rejected). Required
    /// (here or in --config; unset: an error).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Validation data (JSONL). Unset: --val-split of --data is held out.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Fraction of --data held out for validation when --val is not given.
    #[arg(long)]
    pub val_split: Option<f64>,
    /// Output adapter folder (PEFT format; checkpoints and metrics.jsonl too). Required (here
    /// or in --config; unset: an error).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// sft: supervised fine-tuning on prompt/response pairs (loss on the response tokens only);
    /// dpo: Direct Preference Optimization on prompt/chosen/rejected triples.
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// LoRA rank r: the inner dimension of the low-rank update B·A (trainable parameters grow
    /// linearly with it; 8–16 is typical for a task adapter).
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with --rslora); alpha = 2r is
    /// the usual starting point.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA branch's input during training, in [0, 1).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Comma-separated module names, or all-linear.
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// Scale by alpha/sqrt(r) (rsLoRA).
    #[arg(long)]
    pub rslora: bool,
    /// Passes over the training data (ignored once --max-steps is reached).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps. Unset: --epochs decide.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Peak learning rate of AdamW (LoRA tolerates higher rates than full fine-tuning: 1e-4 to
    /// 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Examples per micro-batch (one forward/backward).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Gradient accumulation: micro-batches summed per optimizer step (effective batch =
    /// batch-size × grad-accum).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Longest example in tokens; a longer one loses the start of its prompt first, then the end
    /// of its response.
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Fraction of the optimizer steps spent warming the learning rate up linearly from 0.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Learning-rate schedule after warmup: cosine or linear decay to 0, or constant.
    #[arg(long, value_enum)]
    pub scheduler: Option<Schedule>,
    /// AdamW's decoupled weight decay on the LoRA matrices.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this value before each step (0 = no clipping).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Gradient checkpointing: recompute each block's activations in the backward instead of
    /// keeping them (`false` trades memory for 15-25% speed).
    #[arg(long, value_name = "BOOL")]
    pub gradient_checkpointing: Option<bool>,
    /// Evaluate the validation loss every N optimizer steps (0 = only at the end).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Write a checkpoint every N optimizer steps (0 = only at the end); --resume continues
    /// from the last one.
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Stop after this many evaluations without a new best validation loss (0 = never); the
    /// best adapter so far is also kept in OUT/best.
    #[arg(long)]
    pub early_stopping_patience: Option<usize>,
    /// Seed of the LoRA initialisation, data shuffling and dropout (same seed, same adapter).
    #[arg(long)]
    pub seed: Option<u64>,
    /// DPO's beta: how far the policy may move from the reference (higher = closer).
    #[arg(long)]
    pub beta: Option<f64>,
    /// Blend a general dataset in: FILE:DOMAIN_SHARE (0.8 = 8 domain : 2 general), against
    /// catastrophic forgetting. Unset: the domain data only.
    #[arg(long)]
    pub mix: Option<String>,
    /// Skip (and count) malformed lines instead of stopping.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Replace an existing output folder.
    #[arg(long)]
    pub overwrite: bool,
    /// Continue from the output folder's last checkpoint.
    #[arg(long)]
    pub resume: bool,
}

impl TrainArgs {
    pub fn to_config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_file(p)?,
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            val_split,
            method,
            rank,
            alpha,
            dropout,
            target_modules,
            epochs,
            lr,
            batch_size,
            grad_accum,
            max_seq_len,
            warmup_ratio,
            scheduler,
            weight_decay,
            max_grad_norm,
            gradient_checkpointing,
            eval_every,
            save_every,
            early_stopping_patience,
            seed,
            beta,
            quantize
        );
        macro_rules! set_opt {
            ($($f:ident),*) => { $( if self.$f.is_some() { c.$f = self.$f.clone(); } )* };
        }
        set_opt!(model, data, val, out, max_steps, mix);
        c.rslora |= self.rslora;
        c.double_quant |= self.double_quant;
        c.skip_bad_lines |= self.skip_bad_lines;
        c.overwrite |= self.overwrite;
        c.resume |= self.resume;
        Ok(c)
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    if let DeviceSpec::Cuda(_) = a.device {
        anyhow::bail!(
            "training runs on the CPU for now: `train --device cuda` is not supported yet \
             (use --device cpu or auto)"
        );
    }
    let cfg = a.to_config()?;
    cfg.validate()?;
    let nf4 = cfg.quantize.settings(cfg.double_quant)?;
    let mut model = crate::model::load(cfg.model.as_deref())?;
    model.quantize(nf4)?;
    let s = crate::train::trainer::train(&cfg, &model)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    eprintln!(
        "trained {} steps: loss {:.4} -> {:.4}{}; adapter written to {}",
        s.steps,
        s.first_loss,
        s.final_loss,
        s.best_val_loss
            .map(|v| format!(", best val loss {v:.4}"))
            .unwrap_or_default(),
        s.out.display()
    );
    Ok(())
}
