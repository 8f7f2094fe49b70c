//! Device-level building blocks of the forward pass: operations with a CPU reference and, with
//! the `cuda` feature, the project's own GPU kernels.

pub mod decode_attention;

#[cfg(feature = "cuda")]
pub mod cuda;
