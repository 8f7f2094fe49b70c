//! The CPU backend's inference kernels: the forward on slices for a scheduler step's rows
//! (`fast`) and the AVX-512 / AVX2 kernels it runs (`kernels`).

mod attend;
pub mod fast;
pub mod kernels;
