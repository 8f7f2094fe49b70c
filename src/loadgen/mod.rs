//! The load generator behind `loraplex bench-serve`: N concurrent clients, each sending streamed
//! chat completions (greedy, end-of-sequence ignored, a fixed number of new tokens) over M
//! distinct adapters, against a server over HTTP. It measures what a user sees: aggregate
//! generated tokens per second, requests per second, time to first token and inter-token
//! latency (p50/p99), and errors.
//!
//! It talks to the server only through its public API (it may run against any running
//! loraplex, or one `spawn` starts), so it knows nothing of the engine or the server's code.

pub mod client;
pub mod spawn;

use client::{ChatRequest, RequestTiming};
use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The chat prompts clients draw from (short user questions: ~30–40 tokens with the default
/// model's chat template). Each request starts its message with its own reference, so no two
/// requests of a run share more than the chat template's system part: a server's prefix cache
/// can reuse that, not the questions.
pub const PROMPTS: &[&str] = &[
    "Explain in two sentences why the sky looks blue during the day.",
    "Write a short note reminding the team about Friday's deployment freeze.",
    "What are three common causes of a slow database query?",
    "Summarise the plot of a heist movie in one paragraph.",
    "Give me a checklist for reviewing a rental agreement before signing it.",
    "How should I store fresh herbs so that they last longer?",
    "Describe the difference between a virus and a bacterium simply.",
    "Suggest a polite reply to a customer asking for a refund.",
    "List the steps to make a cup of pour-over coffee.",
    "Why do programmers write unit tests? Answer briefly.",
    "What should a patient ask a doctor before starting a new medication?",
    "Draft a friendly greeting for a company's internal chatbot.",
    "Explain what an interest rate is to a twelve-year-old.",
    "Name four things to pack for a weekend hiking trip.",
    "What is the main idea of the theory of supply and demand?",
    "Write a haiku about a quiet morning in the city.",
];

/// One measured case: how many clients, which model each one asks for.
#[derive(Clone, Debug)]
pub struct LoadCase {
    /// Row label, e.g. `32 streams, 32 distinct r8 q,v`.
    pub label: String,
    pub streams: usize,
    /// Model names, taken in turn by the case's requests (one name: all on it).
    pub models: Vec<String>,
}

/// What every case shares.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub url: String,
    pub api_key: Option<String>,
    /// New tokens per request (with `stop_at_eos`, at most).
    pub new_tokens: usize,
    /// Requests may stop at end-of-sequence (otherwise every one generates `new_tokens`).
    pub stop_at_eos: bool,
    /// Requests each client sends one after another.
    pub requests_per_stream: usize,
    /// Seed of the prompt assignment.
    pub seed: u64,
    /// Longest wait for one chunk.
    pub timeout: Duration,
}

/// A case's results.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub label: String,
    pub pass: usize,
    pub streams: usize,
    pub distinct_models: usize,
    pub requests: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub completion_tokens: usize,
    pub prompt_tokens_mean: f64,
    /// Prompt tokens the server's prefix cache supplied, per request.
    pub cached_tokens_mean: f64,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    pub inter_token_p50_s: f64,
    pub inter_token_p99_s: f64,
}

/// The `q`-quantile (0..=1) of `v` by nearest rank; NaN when empty.
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The model of request `k` of client `c`: the names in turn over all requests of the case
/// (round `k` continues where round `k - 1` stopped), so a case with more names than clients
/// uses them all.
fn model_of(models: &[String], streams: usize, c: usize, k: usize) -> String {
    match models.len() {
        0 => String::new(),
        n => models[(c + k * streams) % n].clone(),
    }
}

/// Runs one case: `case.streams` client threads start together, each sending
/// `spec.requests_per_stream` requests in turn; `progress` advances per finished request.
pub fn run_case(
    spec: &LoadSpec,
    case: &LoadCase,
    pass: usize,
    progress: &ProgressBar,
) -> CaseResult {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed.wrapping_add(case.streams as u64));
    let mut order: Vec<usize> = (0..PROMPTS.len()).collect();
    order.shuffle(&mut rng);
    let results: Arc<Mutex<Vec<Result<RequestTiming, String>>>> = Arc::default();
    let start = Arc::new(std::sync::Barrier::new(case.streams + 1));
    let mut handles = Vec::with_capacity(case.streams);
    let case_streams = case.streams;
    for c in 0..case.streams {
        let models = case.models.clone();
        let spec = spec.clone();
        let (results, start, progress) = (results.clone(), start.clone(), progress.clone());
        let first = order[c % order.len()];
        handles.push(std::thread::spawn(move || {
            let agent = client::agent(spec.timeout);
            start.wait();
            for k in 0..spec.requests_per_stream {
                let req = ChatRequest {
                    model: model_of(&models, case_streams, c, k),
                    prompt: format!(
                        "[ref {pass}.{c}.{k}] {}",
                        PROMPTS[(first + k) % PROMPTS.len()]
                    ),
                    max_tokens: spec.new_tokens,
                    ignore_eos: !spec.stop_at_eos,
                };
                let r = client::stream_chat(&agent, &spec.url, spec.api_key.as_deref(), &req);
                if let Ok(mut all) = results.lock() {
                    all.push(r);
                }
                progress.inc(1);
            }
        }));
    }
    start.wait();
    let t0 = Instant::now();
    for h in handles {
        let _ = h.join();
    }
    let wall = t0.elapsed().as_secs_f64();
    let all = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
    summarise(case, pass, wall, all, spec)
}

fn summarise(
    case: &LoadCase,
    pass: usize,
    wall: f64,
    all: Vec<Result<RequestTiming, String>>,
    spec: &LoadSpec,
) -> CaseResult {
    let new_tokens = spec.new_tokens;
    let complete = |n: usize| match spec.stop_at_eos {
        true => (1..=new_tokens).contains(&n),
        false => n == new_tokens,
    };
    let requests = all.len();
    let (mut ttft, mut itl, mut tokens, mut prompt_tokens, mut errors) =
        (Vec::new(), Vec::new(), 0, 0, 0);
    let mut cached_tokens = 0;
    let mut first_error = None;
    let mut ok = 0;
    for r in all {
        match r {
            Ok(t) if complete(t.completion_tokens) => {
                ok += 1;
                ttft.extend(t.ttft);
                itl.extend(t.inter_token);
                tokens += t.completion_tokens;
                prompt_tokens += t.prompt_tokens;
                cached_tokens += t.cached_tokens;
            }
            Ok(t) => {
                errors += 1;
                first_error.get_or_insert(format!(
                    "{} tokens generated, {new_tokens} asked",
                    t.completion_tokens
                ));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let distinct = {
        let mut m: Vec<String> = (0..case.streams)
            .flat_map(|c| {
                (0..spec.requests_per_stream)
                    .map(move |k| model_of(&case.models, case.streams, c, k))
            })
            .collect();
        m.sort();
        m.dedup();
        m.len()
    };
    CaseResult {
        label: case.label.clone(),
        pass,
        streams: case.streams,
        distinct_models: distinct,
        requests,
        errors,
        first_error,
        completion_tokens: tokens,
        prompt_tokens_mean: prompt_tokens as f64 / ok.max(1) as f64,
        cached_tokens_mean: cached_tokens as f64 / ok.max(1) as f64,
        wall_s: wall,
        tokens_per_s: tokens as f64 / wall,
        requests_per_s: ok as f64 / wall,
        ttft_p50_s: percentile(&mut ttft, 0.5),
        ttft_p99_s: percentile(&mut ttft, 0.99),
        inter_token_p50_s: percentile(&mut itl, 0.5),
        inter_token_p99_s: percentile(&mut itl, 0.99),
    }
}

/// The results as a Markdown table, with each row's throughput against the first row's.
pub fn table(rows: &[CaseResult]) -> String {
    let mut s = String::from(
        "| case | pass | tok/s | vs first | req/s | TTFT p50 / p99 s | inter-token p50 / p99 s | prompt / cached tokens | errors |\n\
         | --- | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |\n",
    );
    let first = rows.first().map(|r| r.tokens_per_s).unwrap_or(f64::NAN);
    for r in rows {
        s += &format!(
            "| {} | {} | {:.1} | {:.2}x | {:.2} | {:.2} / {:.2} | {:.3} / {:.3} | {:.1} / {:.1} | {} |\n",
            r.label,
            r.pass,
            r.tokens_per_s,
            r.tokens_per_s / first,
            r.requests_per_s,
            r.ttft_p50_s,
            r.ttft_p99_s,
            r.inter_token_p50_s,
            r.inter_token_p99_s,
            r.prompt_tokens_mean,
            r.cached_tokens_mean,
            r.errors
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut v, 1.0), 100.0);
        assert!(percentile(&mut [], 0.5).is_nan());
        assert_eq!(percentile(&mut [3.0], 0.99), 3.0);
    }

    #[test]
    fn short_or_failed_requests_count_as_errors() {
        let case = LoadCase {
            label: "x".into(),
            streams: 2,
            models: vec!["a".into(), "b".into(), "a".into()],
        };
        let good = RequestTiming {
            ttft: Some(0.1),
            inter_token: vec![0.02, 0.03],
            completion_tokens: 3,
            prompt_tokens: 10,
            cached_tokens: 4,
        };
        let short = RequestTiming {
            completion_tokens: 1,
            ..good.clone()
        };
        let mut spec = LoadSpec {
            url: String::new(),
            api_key: None,
            new_tokens: 3,
            stop_at_eos: false,
            requests_per_stream: 1,
            seed: 0,
            timeout: std::time::Duration::from_secs(1),
        };
        let all = vec![Ok(good), Ok(short), Err("boom".into())];
        let r = summarise(&case, 1, 2.0, all.clone(), &spec);
        assert_eq!((r.requests, r.errors, r.completion_tokens), (3, 2, 3));
        assert_eq!(r.distinct_models, 2);
        assert_eq!(r.tokens_per_s, 1.5);
        assert_eq!((r.prompt_tokens_mean, r.cached_tokens_mean), (10.0, 4.0));
        assert!(r.first_error.unwrap().contains("1 tokens"));
        // Stopping at end-of-sequence, a shorter answer is complete and its tokens count.
        spec.stop_at_eos = true;
        let r = summarise(&case, 1, 2.0, all, &spec);
        assert_eq!((r.requests, r.errors, r.completion_tokens), (3, 1, 4));
        assert_eq!(r.tokens_per_s, 2.0);
    }
}
