//! Rotary position embeddings in the HF "rotate-half" layout (dimension `i` pairs with `i + d/2`),
//! with per-sequence position offsets.

use super::config::{LlamaConfig, RopeScaling};
use candle_core::{DType, Device, Result, Tensor};

/// Precomputed cos/sin tables, one row per position (`[max_positions, head_dim / 2]`).
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// The inverse frequencies HF computes for this config (float32, as transformers does).
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / d as f32))
        .collect();
    match &cfg.rope_scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => base
            .iter()
            .map(|&freq| {
                let freq = freq as f64;
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let f = if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * freq / factor + smooth * freq
                };
                f as f32
            })
            .collect(),
    }
}

impl Rope {
    pub fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let inv = inv_freq(cfg);
        let half = inv.len();
        let n = cfg.max_position_embeddings;
        let inv = Tensor::from_vec(inv, (1, half), device)?;
        let pos = Tensor::arange(0u32, n as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// The `(cos, sin)` tables, `[max_positions, head_dim / 2]` each (for the fast path).
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// The `(cos, sin)` rows of `positions` (`[rows, head_dim / 2]` each) in `dtype`: what
    /// `apply_rows` takes, gathered once per decode step and shared by every layer.
    pub fn rows(&self, positions: &[usize], dtype: DType) -> Result<(Tensor, Tensor)> {
        let idx: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let idx = Tensor::from_vec(idx, positions.len(), self.cos.device())?;
        Ok((
            self.cos.index_select(&idx, 0)?.to_dtype(dtype)?,
            self.sin.index_select(&idx, 0)?.to_dtype(dtype)?,
        ))
    }

    /// Rotates single-token rows `x` (`[rows, heads, head_dim]`), row `r` by row `r` of the
    /// tables from `rows` (a batched decode step: each sequence at its own position).
    pub fn apply_rows(&self, x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
        // As one sequence of `rows` positions, heads inside (the thd layout).
        candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)
    }

    /// Rotates `x` (`[heads, len, head_dim]`) whose rows sit at positions `offset..offset+len`.
    /// `differentiable` selects the composed ops that have a backward pass (training) instead of
    /// candle's fused kernel (inference).
    pub fn apply(&self, x: &Tensor, offset: usize, differentiable: bool) -> Result<Tensor> {
        let (_h, len, _d) = x.dims3()?;
        // The tables are f32; like HF, rotate in the activations' dtype.
        let cos = self.cos.narrow(0, offset, len)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, offset, len)?.to_dtype(x.dtype())?;
        let x4 = x.unsqueeze(0)?;
        let out = if differentiable {
            candle_nn::rotary_emb::rope_slow(&x4, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&x4.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)?
        };
        out.squeeze(0)
    }
}
