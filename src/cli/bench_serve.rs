//! `loraplex bench-serve`: the server under load, as a user sees it. Starts `loraplex serve`
//! (or uses `--url`), writes synthetic adapters for it, and drives each case — N concurrent
//! streams over M distinct adapters — with `loadgen`, printing a table (or JSON).

use crate::loadgen::spawn::{write_adapters, LoraShape, ServerProcess};
use crate::loadgen::{self, LoadCase, LoadSpec};
use crate::model::{LlamaConfig, Quantize};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct BenchServeArgs {
    /// A running server to measure (e.g. http://127.0.0.1:8000). Without it, bench-serve starts
    /// `loraplex serve` on a free port with synthetic adapters and stops it at the end.
    /// Unset: that server it starts.
    #[arg(long)]
    pub url: Option<String>,
    /// Bearer key for --url. Unset: no Authorization header.
    #[arg(long, env = "LORAPLEX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// With --url: adapter names for the cases with adapters (they must be registered there).
    /// Unset: only the base cases run against --url.
    #[arg(long, value_delimiter = ',')]
    pub adapter_names: Vec<String>,
    /// Base model of the server it starts (HF folder, .gguf, hub id). Default: SmolLM2-135M-Instruct.
    #[arg(long, short = 'm', env = "LORAPLEX_MODEL")]
    pub model: Option<String>,
    /// Quantize the started server's base (`serve --quantize`).
    #[arg(long, value_enum, default_value_t = Quantize::None)]
    pub quantize: Quantize,
    /// More `serve` arguments for the server it starts, e.g. --serve-arg=--max-batch-size=64
    /// (repeatable). Unset: serve's defaults.
    #[arg(long, allow_hyphen_values = true)]
    pub serve_arg: Vec<String>,
    /// Concurrent clients per case, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 32])]
    pub streams: Vec<usize>,
    /// Distinct adapters per case, comma-separated (0 = every client on the base); requests take
    /// them in turn (client c's k-th request: adapter (c + k × streams) mod M), so more adapters
    /// than clients all get used when requests per stream allow.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0, 32])]
    pub adapters: Vec<usize>,
    /// Shape of the synthetic adapters, RANK:TARGETS (targets all-linear or joined by `+`, e.g.
    /// 8:q_proj+v_proj); repeat to measure several shapes.
    #[arg(long = "lora", default_values_t = vec!["8:q_proj+v_proj".to_string()])]
    pub loras: Vec<String>,
    /// New tokens per request (greedy, end-of-sequence ignored).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Let requests stop at end-of-sequence, as chat clients do: --new-tokens becomes their
    /// max_tokens, and tok/s counts the tokens they did generate.
    #[arg(long)]
    pub stop_at_eos: bool,
    /// Requests each client sends one after the other.
    #[arg(long, default_value_t = 1)]
    pub requests_per_stream: usize,
    /// Passes over all cases (interleaved: pass 1 of every case, then pass 2, ...).
    #[arg(long, default_value_t = 2)]
    pub passes: usize,
    /// Seed of the prompt assignment.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds to wait for one chunk before a request counts as failed.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The configuration of the base a started server will load (for the synthetic adapters).
fn base_config(model: Option<&str>) -> Result<LlamaConfig> {
    if let Some(what) = model.and_then(|s| s.strip_prefix(crate::model::dummy::PREFIX)) {
        return crate::model::dummy::config(what);
    }
    Ok(crate::model::load(model)?.llama.cfg.clone())
}

/// The base model's id as `/v1/models` names it (the entry without a parent).
fn base_id(url: &str, api_key: Option<&str>) -> Result<String> {
    let mut req = ureq::get(&format!("{url}/v1/models"));
    if let Some(k) = api_key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let v: Value = req
        .call()
        .with_context(|| format!("GET {url}/v1/models"))?
        .into_json()?;
    v["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["parent"].is_null()))
        .and_then(|m| m["id"].as_str())
        .map(str::to_string)
        .context("/v1/models lists no base model")
}

pub fn run(a: BenchServeArgs) -> Result<()> {
    if a.streams.contains(&0) || a.passes == 0 || a.new_tokens == 0 {
        bail!("--streams, --passes and --new-tokens must be at least 1");
    }
    let shapes = a
        .loras
        .iter()
        .map(|s| LoraShape::parse(s))
        .collect::<Result<Vec<_>>>()?;
    let most = a.adapters.iter().copied().max().unwrap_or(0);
    // The server: the one given, or one started here with synthetic adapters preloaded.
    let dir = tempfile::tempdir()?;
    let mut names_by_shape: Vec<(String, Vec<String>)> = Vec::new();
    let (_server, url) = match &a.url {
        Some(url) => {
            if most > 0 && a.adapter_names.len() < most {
                bail!("with --url, give at least {most} --adapter-names for --adapters {most}");
            }
            names_by_shape.push(("adapters".into(), a.adapter_names.clone()));
            (None, url.trim_end_matches('/').to_string())
        }
        None => {
            let mut args: Vec<String> = vec!["--adapters-dir".into()];
            args.push(dir.path().display().to_string());
            if most > 0 {
                let cfg = base_config(a.model.as_deref())?;
                for shape in &shapes {
                    let names = write_adapters(dir.path(), &cfg, shape, most)?;
                    for n in &names {
                        args.extend(["--preload".to_string(), n.clone()]);
                    }
                    names_by_shape.push((shape.label(), names));
                }
            }
            if let Some(m) = &a.model {
                args.extend(["--model".into(), m.clone()]);
            }
            if a.quantize != Quantize::None {
                args.extend(["--quantize".into(), "nf4".into()]);
            }
            args.extend(a.serve_arg.iter().cloned());
            eprintln!("bench-serve: starting loraplex serve {}", args.join(" "));
            let s = ServerProcess::start(&args, Duration::from_secs(600))?;
            let url = s.url.clone();
            (Some(s), url)
        }
    };
    let base = base_id(&url, a.api_key.as_deref())?;
    let mut cases = Vec::new();
    for &n in &a.streams {
        for &m in &a.adapters {
            if m == 0 {
                cases.push(LoadCase {
                    label: format!("{n} streams, base"),
                    streams: n,
                    models: vec![base.clone()],
                });
                continue;
            }
            for (what, names) in &names_by_shape {
                cases.push(LoadCase {
                    label: format!("{n} streams, {m} distinct {what}"),
                    streams: n,
                    models: names[..m].to_vec(),
                });
            }
        }
    }
    let spec = LoadSpec {
        url: url.clone(),
        api_key: a.api_key.clone(),
        new_tokens: a.new_tokens,
        stop_at_eos: a.stop_at_eos,
        requests_per_stream: a.requests_per_stream,
        seed: a.seed,
        timeout: Duration::from_secs(a.timeout_secs),
    };
    // Warm-up (not measured): one short request on the base.
    let warm = LoadSpec {
        new_tokens: 4,
        stop_at_eos: false,
        requests_per_stream: 1,
        ..spec.clone()
    };
    let hidden = ProgressBar::hidden();
    let w = loadgen::run_case(&warm, &cases[0], 0, &hidden);
    if w.errors > 0 {
        bail!(
            "the warm-up request failed: {}",
            w.first_error.unwrap_or_default()
        );
    }
    let total: usize = cases.iter().map(|c| c.streams).sum::<usize>() * a.requests_per_stream;
    let bar = ProgressBar::new((total * a.passes) as u64);
    bar.set_style(
        ProgressStyle::with_template("bench-serve {bar:30} {pos}/{len} requests {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for pass in 1..=a.passes {
        for case in &cases {
            bar.set_message(format!("pass {pass}: {}", case.label));
            rows.push(loadgen::run_case(&spec, case, pass, &bar));
        }
    }
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "server {url}, base {base}; {} new tokens per request, {} request(s) per client",
            a.new_tokens, a.requests_per_stream
        );
        print!("{}", loadgen::table(&rows));
        for r in rows.iter().filter(|r| r.errors > 0) {
            println!(
                "{} (pass {}): {} errors, first: {}",
                r.label,
                r.pass,
                r.errors,
                r.first_error.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}
