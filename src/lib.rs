//! loraplex: one frozen base LLM, many LoRA adapters.
//!
//! The library behind the `loraplex` binary. Each module owns one concept; see `ARCHITECTURE.md`
//! for the map and for the path of one request through them.

pub mod adapters;
pub mod agreement;
pub mod bench;
pub mod calibrate;
pub mod cli;
pub mod engine;
pub mod fetch;
pub mod generate;
pub mod loadgen;
pub mod lora;
pub mod model;
pub mod quant;
pub mod runtime;
pub mod sampling;
pub mod server;
pub mod tokenize;
pub mod train;

/// Pins the CPU thread count for the process (call first thing in `main`, before any thread
/// starts). candle asks for the thread count on every matmul and, unless `RAYON_NUM_THREADS` is
/// set, re-detects the available cores each time (reading cgroup files): at ~600 matmuls per
/// decoded token that costs about a third of single-stream decode speed on 2 cores.
pub fn init_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
