//! loraplex: one frozen base LLM, many LoRA adapters.
//!
//! The library behind the `loraplex` binary. Each module owns one concept; see `ARCHITECTURE.md`
//! for the map and for the path of one request through them.

pub mod adapters;
pub mod cli;
pub mod engine;
pub mod fetch;
pub mod generate;
pub mod lora;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod server;
pub mod tokenize;
pub mod train;
