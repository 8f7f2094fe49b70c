//! The project's own CUDA kernels (built with the `cuda` feature): PTX compiled from
//! `kernels/*.cu` by `build.rs`, and the Rust code that launches them on candle's CUDA storages.

pub mod decode_attention;
pub mod fused;
pub mod lora_rows;
pub mod paged_kv;

use candle_core::cuda_backend::cudarc::driver::{sys::CUdevice_attribute, CudaStream};

/// Streaming multiprocessors assumed when the device does not say (an H200 has 132).
const DEFAULT_SMS: usize = 132;

/// The device's streaming-multiprocessor count (what the launch planners size grids by).
pub(crate) fn sm_count(stream: &CudaStream) -> usize {
    stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .ok()
        .and_then(|v| usize::try_from(v).ok())
        .filter(|&v| v > 0)
        .unwrap_or(DEFAULT_SMS)
}
