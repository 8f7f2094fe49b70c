//! `loraplex quantize`: write the base with NF4 linear weights as an HF folder in bitsandbytes'
//! serialization (the layout transformers saves a `load_in_4bit` model in), loadable by loraplex
//! and by transformers with bitsandbytes installed.

use crate::model::export::save_hf_folder;
use crate::model::Nf4Settings;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// Base model: an HF folder, a .gguf file, or a hub id (org/name). Default: SmolLM2-135M-Instruct.
    #[arg(long, short = 'm', env = "LORAPLEX_MODEL")]
    pub model: Option<String>,
    /// Also quantize the block scales to 8 bits (QLoRA's double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// Output folder (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let mut model = crate::model::load(a.model.as_deref())?;
    let before: usize = model.llama.bytes_by_dtype().iter().map(|(_, b)| b).sum();
    model.quantize(Some(Nf4Settings::new(a.double_quant)))?;
    save_hf_folder(&model, &a.out)?;
    let after: usize = model.llama.bytes_by_dtype().iter().map(|(_, b)| b).sum();
    eprintln!(
        "quantized {} to NF4{} ({:.1} MB -> {:.1} MB of weights) and wrote {}",
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
