//! Training LoRA adapters on the frozen base: data (`data`), the differentiable forward and
//! losses (`forward`, `frozen`, the chunked vocabulary loss `vocab_loss`), the gradients of a
//! micro-batch with or without gradient checkpointing (`backward`), parameters and PEFT export
//! (`params`), AdamW and the schedule (`optim`).

pub mod backward;
pub mod config;
pub mod data;
pub mod eval;
pub mod forward;
pub mod frozen;
pub mod optim;
pub mod params;
pub mod plot;
pub mod trainer;
pub mod vocab_loss;
