//! Training LoRA adapters on the frozen base: data (`data`), the differentiable forward and
//! losses (`forward`, `frozen`), parameters and PEFT export (`params`), AdamW and the schedule
//! (`optim`).

pub mod config;
pub mod data;
pub mod eval;
pub mod forward;
pub mod frozen;
pub mod optim;
pub mod params;
pub mod plot;
pub mod trainer;
