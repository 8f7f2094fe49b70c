//! `loraplex merge`: fold adapters into the base weights and write an HF folder, or combine them
//! by PEFT's adapter arithmetic (`--combination`) and write the result as a PEFT adapter folder
//! (`--out-adapter`).

use super::ModelArgs;
use crate::lora::{combine, requantize_warning, AdapterSpec, LoraAdapter, LoraStack};
use crate::lora::{Combination, CombineOptions, MajoritySign};
use crate::model::export::save_hf_folder;
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter to merge, DIR[:WEIGHT]; repeat to merge a weighted stack.
    #[arg(
        long = "adapter",
        short = 'a',
        value_name = "DIR[:WEIGHT]",
        required = true
    )]
    pub adapters: Vec<AdapterSpec>,
    /// How the adapters combine (PEFT's add_weighted_adapter): cat (the weighted stack), linear,
    /// ties, magnitude_prune, dare_linear, dare_ties, svd, ties_svd, magnitude_prune_svd,
    /// dare_linear_svd, dare_ties_svd.
    #[arg(long, value_name = "NAME", default_value = "cat")]
    pub combination: Combination,
    /// ties, magnitude_prune, dare_* (and their _svd variants): the fraction of each adapter's
    /// entries kept, in (0, 1]. Required by those (unset: refused); unused by the others.
    #[arg(long)]
    pub density: Option<f64>,
    /// _svd combinations: the rank of the result (default: the largest adapter rank).
    #[arg(long, value_name = "R")]
    pub svd_rank: Option<usize>,
    /// ties, dare_ties (and _svd): elect each entry's sign by the sum of the entries (total,
    /// the default) or by the count of signs (frequency).
    #[arg(long, value_name = "total|frequency")]
    pub majority_sign_method: Option<MajoritySign>,
    /// dare_*: the seed of the random masks (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output folder for the merged model (must not exist, or be empty). Required unless
    /// --out-adapter is given (unset: no merged model written).
    #[arg(
        long,
        required_unless_present = "out_adapter",
        conflicts_with = "out_adapter"
    )]
    pub out: Option<PathBuf>,
    /// Write the combined adapter as a PEFT adapter folder (adapter_config.json with r =
    /// lora_alpha = the new rank, adapter_model.safetensors) instead of merging it. Unset:
    /// merge into the base (--out).
    #[arg(long, value_name = "DIR")]
    pub out_adapter: Option<PathBuf>,
}

/// The command-line flag of a combination option.
fn flag(option: &str) -> String {
    format!("--{}", option.replace('_', "-"))
}

pub fn run(a: MergeArgs) -> Result<()> {
    let opts = CombineOptions {
        combination: a.combination,
        density: a.density,
        svd_rank: a.svd_rank,
        majority_sign: a.majority_sign_method,
        seed: a.seed,
    };
    opts.validate()
        .map_err(|e| anyhow!("{}: {}", flag(e.option), e.message))?;
    if a.out_adapter.is_some() && a.model.quantize != crate::model::Quantize::None {
        bail!("--quantize applies to the merged model (--out), not to --out-adapter");
    }
    // Merge into the weights as stored, then quantize (one rounding, not two).
    let settings = a.model.nf4_settings()?;
    let mut model = a.model.load_unquantized()?;
    let stack = match (&a.out, opts.combination) {
        // The weighted stack, as before combinations existed.
        (Some(_), Combination::Cat) => {
            LoraStack::load(&model.llama, &a.adapters)?.context("no adapters given")?
        }
        _ => {
            let mut members = Vec::with_capacity(a.adapters.len());
            for s in &a.adapters {
                let adapter = LoraAdapter::load(&s.name()?, &s.dir, &model.llama.cfg)?;
                members.push((Arc::new(adapter), s.weight));
            }
            let terms: Vec<String> = members
                .iter()
                .map(|(m, w)| format!("{}*{w}", m.name))
                .collect();
            let label = format!("{}({})", opts.combination, terms.join("+"));
            let name = match &a.out_adapter {
                Some(dir) => dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("combined")
                    .to_string(),
                None => label.clone(),
            };
            let combined = combine(&name, &members, &opts)?;
            if let Some(dir) = &a.out_adapter {
                combined.save_peft(dir)?;
                eprintln!(
                    "combined {label} (r = {}) and wrote the adapter {}",
                    combined.config.r,
                    dir.display()
                );
                return Ok(());
            }
            let layers = model.llama.cfg.num_hidden_layers;
            Arc::new(LoraStack::new_on(
                vec![(Arc::new(combined), 1.0)],
                layers,
                &model.llama.placement(),
            )?)
        }
    };
    let requantized = stack.merge_into(&mut model.llama)?;
    if let Some(w) = requantize_warning(requantized) {
        eprintln!("warning: {w}");
    }
    model.quantize(settings)?;
    let out = a.out.as_ref().context("--out or --out-adapter is needed")?;
    save_hf_folder(&model, out)?;
    eprintln!(
        "merged {} into {} and wrote {}",
        stack.label(),
        model.id,
        out.display()
    );
    Ok(())
}
