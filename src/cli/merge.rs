//! `loraplex merge`: fold adapters into the base weights and write an HF folder.

use super::ModelArgs;
use crate::lora::LoraStack;
use crate::lora::{requantize_warning, AdapterSpec};
use crate::model::export::save_hf_folder;
use anyhow::{Context, Result};

use std::path::PathBuf;

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
    /// Output folder (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: MergeArgs) -> Result<()> {
    // Merge into the weights as stored, then quantize (one rounding, not two).
    let settings = a.model.nf4_settings()?;
    let mut model = a.model.load_unquantized()?;
    let stack = LoraStack::load(&model.llama, &a.adapters)?.context("no adapters given")?;
    let requantized = stack.merge_into(&mut model.llama)?;
    if let Some(w) = requantize_warning(requantized) {
        eprintln!("warning: {w}");
    }
    model.quantize(settings)?;
    save_hf_folder(&model, &a.out)?;
    eprintln!(
        "merged {} into {} and wrote {}",
        stack.label(),
        model.id,
        a.out.display()
    );
    Ok(())
}
