//! The CPU backend's inference kernels: the few-row forward on slices (`fast`) and the AVX2/FMA
//! matrix-vector kernels it runs (`kernels`).

pub mod fast;
pub mod kernels;
