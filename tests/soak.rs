//! A bounded soak of `loraplex serve` on the tiny model: many clients over many adapters through
//! a cache that holds only a few of them, stacks and the base mixed. Every answer must be a 200
//! equal to the same request answered alone, and the server's memory (RSS from /proc) must stay
//! bounded. Defaults fit CI (about a minute on 2 cores); environment knobs make it a real soak:
//!
//! - `LORAPLEX_SOAK_SECS` (default 30): how long the clients run;
//! - `LORAPLEX_SOAK_CLIENTS` (32), `LORAPLEX_SOAK_ADAPTERS` (50), `LORAPLEX_SOAK_CACHED` (10:
//!   how many adapters the cache holds).
//!
//! `scripts/soak.sh` runs it with longer settings.

mod common;

use common::server::Server;
use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory of `pid` in bytes.
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The request set: the base, every adapter, and stacks of two or three, with varied prompts.
fn requests(adapters: &[String]) -> Vec<Value> {
    let mut out = Vec::new();
    let prompt = |i: usize| -> Vec<u32> {
        (0..4 + i % 5)
            .map(|j| ((i * 31 + j * 7) % 250 + 3) as u32)
            .collect()
    };
    let body = |model: &str, i: usize| json!({"model": model, "prompt": prompt(i), "max_tokens": 6, "temperature": 0, "ignore_eos": true});
    out.push(body("tiny", 0));
    for (i, a) in adapters.iter().enumerate() {
        out.push(body(a, i + 1));
    }
    for i in 0..adapters.len() / 3 {
        let n = adapters.len();
        let mut b = body("tiny", 1000 + i);
        let mut stack = vec![
            json!({"name": adapters[i % n], "weight": 0.5}),
            json!({"name": adapters[(i * 7 + 3) % n]}),
        ];
        if i % 2 == 0 {
            stack.push(json!({"name": adapters[(i * 11 + 5) % n], "weight": -0.25}));
        }
        b["adapters"] = Value::Array(stack);
        out.push(b);
    }
    for i in 0..4 {
        out.push(body("tiny", 2000 + i));
    }
    out
}

#[test]
fn soak_many_clients_over_many_adapters_through_a_small_cache() {
    let secs = knob("LORAPLEX_SOAK_SECS", 30);
    let clients = knob("LORAPLEX_SOAK_CLIENTS", 32);
    let n_adapters = knob("LORAPLEX_SOAK_ADAPTERS", 50);
    let cached = knob("LORAPLEX_SOAK_CACHED", 10);
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf_with(&model, "smollm", true, Some(TINY_CHAT_TEMPLATE));
    let adapters_dir = dir.path().join("adapters");
    let adapters = many_adapters(&adapters_dir, n_adapters);
    let weights: u64 = adapters
        .iter()
        .map(|a| {
            std::fs::metadata(adapters_dir.join(a).join("adapter_model.safetensors"))
                .unwrap()
                .len()
        })
        .sum();
    let cache_bytes = (weights / n_adapters as u64 * cached as u64).to_string();
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--adapters-dir",
        adapters_dir.to_str().unwrap(),
        "--adapter-cache-bytes",
        &cache_bytes,
        "--max-batch-size",
        "16",
        "--max-waiting",
        "1024",
    ]);
    let reqs = requests(&adapters);
    // Each request answered alone, one at a time: what it must give under load.
    let alone: Vec<Value> = reqs
        .iter()
        .map(|b| {
            let (code, v) = server.post("/v1/completions", b);
            assert_eq!(code, 200, "{v}");
            v["choices"][0]["text"].clone()
        })
        .collect();
    let pid = server.pid();
    let warm = rss(pid).unwrap();
    let stop = AtomicBool::new(false);
    let samples = Mutex::new(Vec::<(Duration, u64)>::new());
    let (done, errors) = (AtomicUsize::new(0), Mutex::new(Vec::<String>::new()));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs as u64);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = rss(pid) {
                    samples.lock().unwrap().push((t0.elapsed(), r));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        let workers: Vec<_> = (0..clients)
            .map(|c| {
                let (reqs, alone, server, done, errors) = (&reqs, &alone, &server, &done, &errors);
                scope.spawn(move || {
                    let mut k = c * 7919;
                    while Instant::now() < deadline {
                        k = k
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let i = (k >> 33) % reqs.len();
                        let (code, v) = server.post("/v1/completions", &reqs[i]);
                        if code != 200 || v["choices"][0]["text"] != alone[i] {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("request {i}: {code} {v} (alone: {})", alone[i]));
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let errors = errors.into_inner().unwrap();
    let n = done.load(Ordering::Relaxed);
    let samples = samples.into_inner().unwrap();
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(warm);
    let third = samples.len() / 3;
    let early = samples[..third.max(1)]
        .iter()
        .map(|s| s.1)
        .max()
        .unwrap_or(warm);
    let late = samples[samples.len() - third.max(1)..]
        .iter()
        .map(|s| s.1)
        .max()
        .unwrap_or(warm);
    let evictions = server.metric("loraplex_adapter_cache_evictions_total");
    eprintln!(
        "soak: {n} requests by {clients} clients in {:?} over {n_adapters} adapters (cache {cache_bytes} B, {evictions} evictions); RSS warm {} MB, early peak {} MB, late peak {} MB, peak {} MB; {} errors",
        t0.elapsed(),
        warm >> 20,
        early >> 20,
        late >> 20,
        peak >> 20,
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {}",
        errors.len(),
        errors[0]
    );
    assert!(n >= clients, "{n}");
    assert!(evictions > 0.0, "the cache never churned");
    assert!(server.metric("loraplex_adapter_cache_bytes") <= cache_bytes.parse::<f64>().unwrap());
    // Memory is bounded: no more than 256 MB over the warmed-up server, and not growing from the
    // first third of the run to the last.
    assert!(peak <= warm + (256 << 20), "peak {peak} vs warm {warm}");
    assert!(
        late <= early + early / 4 + (32 << 20),
        "late {late} vs early {early}"
    );
    assert_eq!(server.metric("loraplex_running_sequences"), 0.0);
}
