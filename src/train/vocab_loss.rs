//! The loss head over the vocabulary in chunks of rows: `log p(target)` of each loss row from the
//! final hidden states and the frozen `lm_head`, never holding more than `chunk_rows` × vocab
//! logits. A custom op: the forward keeps nothing but its output, and the backward recomputes
//! each chunk's logits and returns the input gradient only (`lm_head` is frozen),
//! `dh_i = g_i (W[t_i] − Σ_v p_iv W[v])` with `p_i = softmax(h_i Wᵀ)`.
//!
//! `token_logprobs_dense` is the composed reference (all logits at once, candle's autograd);
//! both compute each row with the same operations in the same order.

use super::frozen::frozen_linear;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Storage, Tensor, D};

/// Loss rows per chunk: 64 × 49152 f32 logits are 12.6 MB.
pub const DEFAULT_CHUNK_ROWS: usize = 64;

/// `h [n, hidden] → log softmax(h Wᵀ)[target] [n]` in chunks of rows, input gradient only.
struct ChunkedLogprobs {
    /// `[vocab, hidden]`, frozen.
    weight: Tensor,
    targets: Vec<u32>,
    chunk_rows: usize,
}

/// The chunks `(start, len)` of `n` rows.
fn chunks(n: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    let size = size.max(1);
    (0..n.div_ceil(size)).map(move |i| (i * size, size.min(n - i * size)))
}

/// A chunk's logits `[c, vocab]`, shifted by their row maximum, and `log Σ exp` of the shifted
/// row `[c, 1]` (the steps of candle's `log_softmax`).
fn shifted_logits(h: &Tensor, weight: &Tensor) -> Result<(Tensor, Tensor)> {
    let diff = {
        let logits = h.matmul(&weight.t()?)?;
        let max = logits.max_keepdim(D::Minus1)?;
        logits.broadcast_sub(&max)?
    };
    let log_sum = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok((diff, log_sum))
}

fn targets_tensor(t: &[u32], dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(t.to_vec(), (t.len(), 1), dev)
}

impl ChunkedLogprobs {
    /// The op's value on an untracked input.
    fn value(&self, h: &Tensor) -> Result<Tensor> {
        let n = h.dim(0)?;
        if n == 0 {
            return Tensor::zeros(0, h.dtype(), h.device());
        }
        let mut parts = Vec::new();
        for (start, len) in chunks(n, self.chunk_rows) {
            let (diff, log_sum) = shifted_logits(&h.narrow(0, start, len)?, &self.weight)?;
            let idx = targets_tensor(&self.targets[start..start + len], h.device())?;
            parts.push(diff.gather(&idx, 1)?.sub(&log_sum)?.squeeze(1)?);
        }
        Tensor::cat(&parts, 0)
    }
}

impl CustomOp1 for ChunkedLogprobs {
    fn name(&self) -> &'static str {
        "chunked-vocab-logprobs"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        if !layout.is_contiguous() {
            candle_core::bail!("chunked-vocab-logprobs needs a contiguous input");
        }
        let h = match storage {
            CpuStorage::F32(v) => Tensor::from_slice(
                &v[layout.start_offset()..][..layout.shape().elem_count()],
                layout.shape(),
                &Device::Cpu,
            )?,
            CpuStorage::F64(v) => Tensor::from_slice(
                &v[layout.start_offset()..][..layout.shape().elem_count()],
                layout.shape(),
                &Device::Cpu,
            )?,
            _ => candle_core::bail!("chunked-vocab-logprobs supports f32 and f64 inputs"),
        };
        let y = self.value(&h)?;
        let shape = y.shape().clone();
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cpu(c) if l.is_contiguous() && l.start_offset() == 0 => Ok((c.clone(), shape)),
            _ => candle_core::bail!("chunked-vocab-logprobs: unexpected output layout"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let h = arg.detach();
        let n = h.dim(0)?;
        if n == 0 {
            return Ok(Some(h.zeros_like()?));
        }
        let g = grad_res.detach().reshape((n, 1))?;
        let mut parts = Vec::new();
        for (start, len) in chunks(n, self.chunk_rows) {
            // p W: the softmax-weighted mean of lm_head rows, then W[t] − p W, times g.
            let pw = {
                let (diff, log_sum) = shifted_logits(&h.narrow(0, start, len)?, &self.weight)?;
                diff.broadcast_sub(&log_sum)?.exp()?.matmul(&self.weight)?
            };
            let idx = Tensor::from_slice(&self.targets[start..start + len], len, h.device())?;
            let wt = self.weight.index_select(&idx, 0)?;
            parts.push((wt - pw)?.broadcast_mul(&g.narrow(0, start, len)?)?);
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}

/// `log p(targets[i])` for each row of `h [n, hidden]` under `lm_head [vocab, hidden]`, computed
/// `chunk_rows` rows at a time; the backward gives `h` its gradient and nothing to `lm_head`.
pub fn token_logprobs_chunked(
    h: &Tensor,
    lm_head: &Tensor,
    targets: &[u32],
    chunk_rows: usize,
) -> Result<Tensor> {
    let n = h.dim(0)?;
    if n != targets.len() {
        candle_core::bail!("{n} loss rows but {} targets", targets.len());
    }
    h.contiguous()?.apply_op1(ChunkedLogprobs {
        weight: lm_head.clone(),
        targets: targets.to_vec(),
        chunk_rows: chunk_rows.max(1),
    })
}

/// The composed reference: all `n × vocab` logits at once, candle's `log_softmax` and `gather`
/// with autograd keeping every intermediate for the backward.
pub fn token_logprobs_dense(h: &Tensor, lm_head: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let logits = frozen_linear(h, lm_head)?;
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    lsm.gather(&targets_tensor(targets, h.device())?, 1)?
        .squeeze(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    fn max_abs(t: &Tensor) -> f64 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-30)
    }

    /// Values and input gradients (under uneven upstream weights, as DPO's per-sequence sums
    /// give) equal the dense path's for chunk sizes that do and do not divide the row count.
    #[test]
    fn chunked_equals_dense_values_and_gradients() {
        let dev = Device::Cpu;
        let (n, hidden, vocab) = (10, 8, 37);
        let w = Tensor::randn(0f32, 1.0, (vocab, hidden), &dev).unwrap();
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, hidden), &dev).unwrap()).unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
        let weights = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let run = |chunk: Option<usize>| {
            let lp = match chunk {
                Some(c) => token_logprobs_chunked(h.as_tensor(), &w, &targets, c).unwrap(),
                None => token_logprobs_dense(h.as_tensor(), &w, &targets).unwrap(),
            };
            let g = (&lp * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(g.get(&w).is_none(), "lm_head is frozen");
            (lp, g.get(h.as_tensor()).unwrap().clone())
        };
        let (want_lp, want_g) = run(None);
        for c in [1, 3, 4, 10, 64] {
            let (lp, g) = run(Some(c));
            assert!(max_rel(&lp, &want_lp) < 1e-6, "chunk {c}: values");
            assert!(max_rel(&g, &want_g) < 1e-5, "chunk {c}: gradients");
        }
    }

    #[test]
    fn no_rows_give_an_empty_result_and_a_zero_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, (5, 3), &dev).unwrap();
        let h = Var::from_tensor(&Tensor::zeros((0, 3), DType::F64, &dev).unwrap()).unwrap();
        let lp = token_logprobs_chunked(h.as_tensor(), &w, &[], 4).unwrap();
        assert_eq!(lp.dims(), &[0]);
        assert!(token_logprobs_chunked(h.as_tensor(), &w, &[1], 4).is_err());
    }
}
