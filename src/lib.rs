//! loraplex: one frozen base LLM, many LoRA adapters.
//!
//! The library behind the `loraplex` binary. Each module owns one concept; see `ARCHITECTURE.md`
//! for the map and for the path of one request through them.

pub mod fetch;
pub mod lora;
pub mod model;
pub mod tokenize;
