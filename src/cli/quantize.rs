//! `loraplex quantize`: write the base with NF4 linear weights as an HF folder in bitsandbytes'
//! serialization (the layout transformers saves a `load_in_4bit` model in), loadable by loraplex
//! and by transformers with bitsandbytes installed. With `--calibration`, the NF4 codes and scales
//! are chosen by GPTQ rounding on that data (`calibrate`) instead of plain rounding.

use crate::calibrate::{quantize_calibrated, CalibrationSettings};
use crate::model::export::save_hf_folder;
use crate::model::{LoadedModel, Nf4Settings};
use crate::quant::GptqSettings;
use crate::train::data::{self, Example, Method};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// Base model: an HF folder, a .gguf file, or a hub id (org/name). Default: SmolLM2-135M-Instruct.
    #[arg(long, short = 'm', env = "LORAPLEX_MODEL")]
    pub model: Option<String>,
    /// Also quantize the block scales to 8 bits (QLoRA's double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// Calibration data (JSONL in the training formats, repeatable): choose the NF4 codes and
    /// scales by GPTQ rounding (act-order, searched block scales) so each layer's outputs on this
    /// text change least. Use data like what the model will serve, not the data you evaluate on.
    #[arg(long, value_name = "JSONL")]
    pub calibration: Vec<PathBuf>,
    /// Calibration sequences used at most (taken evenly from each file, in file order).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub calibration_samples: u64,
    /// Tokens per calibration sequence at most (longer ones are cut).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(8..))]
    pub calibration_max_len: u64,
    /// GPTQ dampening: this fraction of the mean Hessian diagonal is added to the diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// Output folder (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    if !(a.damp > 0.0 && a.damp <= 1.0) {
        bail!("--damp must be in (0, 1], got {}", a.damp);
    }
    let mut model = crate::model::load(a.model.as_deref())?;
    let before: usize = model.llama.bytes_by_dtype().iter().map(|(_, b)| b).sum();
    let how = if a.calibration.is_empty() {
        model.quantize(Some(Nf4Settings::new(a.double_quant)))?;
        "NF4".to_string()
    } else {
        let samples = calibration_samples(&model, &a)?;
        calibrate(&mut model, &samples, &a)?
    };
    save_hf_folder(&model, &a.out)?;
    let after: usize = model.llama.bytes_by_dtype().iter().map(|(_, b)| b).sum();
    eprintln!(
        "quantized {} to {how}{} ({:.1} MB -> {:.1} MB of weights) and wrote {}",
        model.id,
        if a.double_quant {
            " with double quantization"
        } else {
            ""
        },
        before as f64 / 1e6,
        after as f64 / 1e6,
        a.out.display()
    );
    Ok(())
}

fn calibrate(model: &mut LoadedModel, samples: &[Vec<u32>], a: &QuantizeArgs) -> Result<String> {
    let settings = CalibrationSettings {
        gptq: GptqSettings {
            damp: a.damp,
            double_quant: a.double_quant,
            ..GptqSettings::default()
        },
    };
    let bar = indicatif::ProgressBar::new(model.llama.blocks.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("GPTQ {bar:30} layer {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = quantize_calibrated(&mut model.llama, samples, settings, &|done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    crate::model::release_freed_memory();
    Ok(format!(
        "NF4 (GPTQ rounding on {} sequences, {} tokens)",
        report.sequences, report.tokens
    ))
}

/// Token ids of up to `--calibration-samples` sequences, spread evenly over the files.
fn calibration_samples(model: &LoadedModel, a: &QuantizeArgs) -> Result<Vec<Vec<u32>>> {
    let tok = model
        .tokenizer()
        .context("--calibration: the data is tokenized with the model's tokenizer")?;
    let max_len = (a.calibration_max_len as usize).min(model.llama.max_context());
    let per_file = (a.calibration_samples as usize).div_ceil(a.calibration.len());
    let mut out = Vec::new();
    for path in &a.calibration {
        let ds = data::load(path, tok, Method::Sft, max_len, false)
            .with_context(|| format!("calibration data {}", path.display()))?;
        out.extend(
            ds.examples
                .into_iter()
                .filter_map(|e| match e {
                    Example::Sft(t) => Some(t.ids),
                    Example::Dpo { .. } => None,
                })
                .take(per_file),
        );
    }
    out.truncate(a.calibration_samples as usize);
    Ok(out)
}
