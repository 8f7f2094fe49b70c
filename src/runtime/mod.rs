//! Device-level building blocks of the forward pass: operations with a CPU reference and, with
//! the `cuda` feature, the project's own GPU kernels.

pub mod lora_rows;

#[cfg(feature = "cuda")]
pub mod cuda;
