//! Execution of the base model: one batched forward call over many sequences, each with its own
//! cache and adapter set, on the backend of the model's device.
//!
//! `model` holds weights only; this layer decides how to run them. The backend is an enum, not a
//! trait object: two arms known at compile time, the CUDA arm only with the `cuda` feature.
//! - CPU: calls with few rows (decode steps) take the slice kernels of `runtime::cpu`; larger
//!   calls (prefill chunks) and `Kernels::Candle` take the candle-op path `runtime::reference`.
//! - CUDA: the reference path on the device, LoRA deltas by the per-row kernels of
//!   `runtime::lora_rows`.
//!
//! The engine asks the backend how many rows one call may hold (`Backend::row_budget`).

pub mod batch;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decode_attention;
pub mod device;
pub mod fused;
pub mod lora_rows;
pub mod paged_kv;
pub mod prefill_attention;
pub mod reference;
pub mod upload_cache;

pub use batch::{LogitsMode, RowGroups, SeqInput};
pub use device::{DeviceSpec, DtypeSpec};
pub use reference::{block_forward, InputObserver};

use crate::model::Llama;
use candle_core::{Device, Result, Tensor};

/// Which implementation runs a forward call.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The backend's own: on the CPU the slice kernels of `runtime::cpu` when the call has few
    /// rows (a scheduler step: up to `cpu::fast::MAX_ROWS` new tokens in all) and f32 weights,
    /// candle ops otherwise; on a GPU the reference path with the per-row LoRA kernels.
    #[default]
    Auto,
    /// Candle ops only: the reference path, built from the ops a training step differentiates.
    Candle,
}

/// The backend that runs a model, chosen once from the device its weights live on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda,
}

impl Backend {
    /// The backend of `device`. Devices this build cannot run are an error.
    pub fn of(device: &Device) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Backend::Cpu),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Ok(Backend::Cuda),
            #[allow(unreachable_patterns)]
            other => candle_core::bail!("no loraplex backend for device {other:?}"),
        }
    }

    /// The most rows (new tokens over all sequences) one forward call should hold: the engine
    /// splits a step into calls of at most this many rows (a bigger prompt chunk goes alone).
    pub fn row_budget(self) -> usize {
        match self {
            // The slice kernels' limit: a whole step (decode rows + a prompt chunk) in one call.
            Backend::Cpu => cpu::fast::MAX_ROWS,
            // One launch per projection serves the whole batch; the weights are read once.
            #[cfg(feature = "cuda")]
            Backend::Cuda => 512,
        }
    }
}

/// The largest error a kernel's `check_against_reference` accepts for `dtype` (relative to the
/// reference's magnitude): one rounding of the output (bf16 keeps 8 significant bits, f16 11),
/// plus f32 summation-order noise.
pub fn kernel_tolerance(dtype: candle_core::DType) -> f32 {
    match dtype {
        candle_core::DType::BF16 => 1e-2,
        candle_core::DType::F16 => 2e-3,
        _ => 1e-4,
    }
}

/// Runs one batched forward step and returns f32 logits (`[rows, vocab]`, see `LogitsMode`).
/// Each sequence's cache grows by its new tokens; on error no cache advances.
pub fn forward(model: &Llama, seqs: &mut [SeqInput<'_>], mode: LogitsMode) -> Result<Tensor> {
    forward_with(model, seqs, mode, Kernels::Auto)
}

/// `forward` with a choice of implementation: `Kernels::Candle` always runs the candle-op
/// path; `Kernels::Auto` lets the backend pick.
pub fn forward_with(
    model: &Llama,
    seqs: &mut [SeqInput<'_>],
    mode: LogitsMode,
    kernels: Kernels,
) -> Result<Tensor> {
    let total = validate(model, seqs)?;
    let groups = RowGroups::new(seqs);
    match Backend::of(model.device())? {
        Backend::Cpu if kernels == Kernels::Auto && cpu::fast::eligible(model, seqs, total) => {
            cpu::fast::forward(model, seqs, mode, &groups)
        }
        _ => reference::forward(model, seqs, mode, &groups),
    }
}

/// Checks every sequence's new tokens (non-empty, inside the vocabulary and the context) and
/// returns the call's row count.
fn validate(model: &Llama, seqs: &[SeqInput<'_>]) -> Result<usize> {
    let vocab = model.cfg.vocab_size;
    let mut total = 0;
    for s in seqs {
        if s.tokens.is_empty() {
            candle_core::bail!("every sequence in a forward call needs at least one new token");
        }
        let end = s.cache.len() + s.tokens.len();
        if end > model.max_context() {
            candle_core::bail!(
                "sequence of {end} tokens exceeds the model's context of {}",
                model.max_context()
            );
        }
        if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary ({vocab})");
        }
        total += s.tokens.len();
    }
    Ok(total)
}
