//! `loraplex bench`: the fixed decode workload of `bench` on any device, as a table (or JSON).

use super::ModelArgs;
use crate::bench::{self, AdapterCase, BenchLayout, BenchSpec};
use crate::model::Proj;
use anyhow::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Concurrent streams per case, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 64])]
    pub streams: Vec<usize>,
    /// Adapter cases, comma-separated: none, shared (one adapter for all streams), distinct
    /// (one per stream).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![AdapterCase::None, AdapterCase::Shared, AdapterCase::Distinct])]
    pub adapters: Vec<AdapterCase>,
    /// KV layouts, comma-separated: buffers (each stream's own), paged (one pool of 16-position
    /// blocks read through block tables); each case runs in each.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![BenchLayout::Buffers])]
    pub kv_layouts: Vec<BenchLayout>,
    /// Prompt tokens per stream (seeded random ids).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// New tokens per stream (greedy; end-of-sequence ignored).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// LoRA rank of the synthetic adapters.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Modules the synthetic adapters target: all-linear, or comma-separated names
    /// (q_proj,v_proj,...).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["all-linear".to_string()])]
    pub targets: Vec<String>,
    /// Most distinct adapters in the `distinct` case (streams beyond reuse them in turn).
    #[arg(long, default_value_t = 1000)]
    pub distinct: usize,
    /// Decode steps of each case left out of the timing.
    #[arg(long, default_value_t = 5)]
    pub warmup_steps: usize,
    /// Seconds of single-stream decoding before the first case (a GPU's clocks ramp up).
    #[arg(long, default_value_t = 3.0)]
    pub warmup_secs: f64,
    /// Seed of the prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `all-linear` or module names → projections.
pub fn parse_targets(names: &[String]) -> Result<Vec<Proj>> {
    if names.iter().any(|n| n == "all-linear") {
        return Ok(Proj::ALL.to_vec());
    }
    let mut out = Vec::new();
    for n in names {
        match Proj::from_name(n) {
            Some(p) if !out.contains(&p) => out.push(p),
            Some(_) => {}
            None => bail!("unknown target module `{n}`: use all-linear or q_proj, k_proj, ..."),
        }
    }
    if out.is_empty() {
        bail!("give at least one target module");
    }
    Ok(out)
}

pub fn run(a: BenchArgs) -> Result<()> {
    let spec = BenchSpec {
        streams: a.streams.clone(),
        cases: a.adapters.clone(),
        layouts: a.kv_layouts.clone(),
        prompt_len: a.prompt_len,
        new_tokens: a.new_tokens,
        rank: a.rank,
        targets: parse_targets(&a.targets)?,
        distinct: a.distinct,
        warmup_steps: a.warmup_steps,
        warmup_secs: a.warmup_secs,
        seed: a.seed,
    };
    let model = a.model.load()?;
    let rows = bench::run(&model, &spec, |line| eprintln!("bench: {line}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let at = model.llama.placement();
        println!(
            "model {} on {} ({:?}), prompt {} + {} new tokens",
            model.id,
            crate::runtime::device::describe(&at.device),
            at.dtype,
            a.prompt_len,
            a.new_tokens
        );
        print!("{}", bench::table(&rows));
    }
    Ok(())
}
