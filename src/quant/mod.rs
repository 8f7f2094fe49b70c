//! NF4 (QLoRA's 4-bit NormalFloat) weights: bitsandbytes-exact quantization (`nf4`), the matmul
//! kernels that use the packed form directly (`kernels`), NF4 weights resident in a GPU's
//! memory and their ops (`nf4_device`, kernels in `cuda/` with the `cuda` feature),
//! error-compensating rounding from calibration data (`gptq`) and bitsandbytes' HF
//! serialization (`bnb`).

pub mod bnb;
#[cfg(feature = "cuda")]
mod cuda;
pub mod decode;
pub mod gptq;
mod int16;
pub mod kernels;
pub mod nf4;
pub mod nf4_device;
mod scale_search;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod simd_int;

pub use bnb::{is_bnb_layer, load_layer, save_layer, QuantizationConfig};
pub use decode::{dot_rows_into, Nf4Input};
pub use gptq::{gptq_nf4, GptqSettings, Hessian};
pub use kernels::{KernelPath, Nf4Linear, Nf4MatmulOp};
pub use nf4::{
    dynamic_map, quantize_nf4, quantize_nf4_double, Absmax, NestedAbsmax, Nf4Packed, Nf4Shape,
    DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE, NF4_CODE,
};
pub use nf4_device::Nf4Device;

/// Deterministic uniform values in [-0.5, 0.5) for the quantizers' unit tests.
#[cfg(test)]
pub(crate) fn test_noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}
