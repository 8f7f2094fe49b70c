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
    /// TOML config (keys as the long flags, with underscores); flags override it.
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
    /// Training data (JSONL: Alpaca, chat messages, or DPO prompt/chosen/rejected).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Validation data (JSONL); otherwise --val-split of --data is held out.
    #[arg(long)]
    pub val: Option<PathBuf>,
    #[arg(long)]
    pub val_split: Option<f64>,
    /// Output adapter folder (PEFT format).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Comma-separated module names, or all-linear.
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// Scale by alpha/sqrt(r) (rsLoRA).
    #[arg(long)]
    pub rslora: bool,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    #[arg(long, value_enum)]
    pub scheduler: Option<Schedule>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long)]
    pub save_every: Option<usize>,
    #[arg(long)]
    pub early_stopping_patience: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// DPO temperature.
    #[arg(long)]
    pub beta: Option<f64>,
    /// Blend a general dataset in: FILE:DOMAIN_SHARE (0.8 = 8 domain : 2 general).
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
