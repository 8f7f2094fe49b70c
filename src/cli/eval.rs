//! `loraplex eval`: base vs adapter on a held-out set.

use super::ModelArgs;
use crate::lora::AdapterSpec;
use crate::lora::LoraStack;
use crate::train::eval::{evaluate, EvalReport};
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter to compare with the base, DIR[:WEIGHT] (repeat to stack).
    #[arg(long = "adapter", short = 'a', value_name = "DIR[:WEIGHT]")]
    pub adapters: Vec<AdapterSpec>,
    /// Test data (JSONL, Alpaca or chat form).
    #[arg(long)]
    pub data: PathBuf,
    /// Regex every answer should match (format-match rate). Unset: no format-match rate.
    #[arg(long)]
    pub format_regex: Option<String>,
    /// File holding that regex (e.g. data/legal/format.regex). Unset: --format-regex, if any.
    #[arg(long, conflicts_with = "format_regex")]
    pub format_regex_file: Option<PathBuf>,
    /// Most tokens generated per answer.
    #[arg(long, default_value_t = 96)]
    pub max_tokens: usize,
    /// Evaluate only the first N examples. Unset: all of them.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Skip the base model (adapter only).
    #[arg(long)]
    pub no_base: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let model = a.model.load()?;
    let pattern = match (&a.format_regex, &a.format_regex_file) {
        (Some(r), _) => Some(r.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    let re = pattern
        .map(|p| regex::Regex::new(&p).with_context(|| format!("invalid --format-regex `{p}`")))
        .transpose()?;
    let mut reports: Vec<EvalReport> = Vec::new();
    if !a.no_base {
        reports.push(evaluate(
            &model,
            None,
            "base",
            &a.data,
            re.as_ref(),
            a.max_tokens,
            a.limit,
        )?);
    }
    if let Some(stack) = LoraStack::load(&model.llama, &a.adapters)? {
        let label = stack.label();
        reports.push(evaluate(
            &model,
            Some(stack),
            &label,
            &a.data,
            re.as_ref(),
            a.max_tokens,
            a.limit,
        )?);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    println!("| model | examples | loss | perplexity | exact match | format match |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &reports {
        let f = r
            .format_match
            .map(|f| format!("{:.1}%", f * 100.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {:.4} | {:.2} | {:.1}% | {f} |",
            r.label,
            r.examples,
            r.loss,
            r.perplexity,
            r.exact_match * 100.0
        );
    }
    Ok(())
}
