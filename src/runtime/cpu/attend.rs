//! Causal attention of one query head over one sequence's K/V history on f32 slices, for the
//! fast path (`fast`): over contiguous per-sequence buffers, or block by block over a paged pool
//! (with the same per-row arithmetic, so both give the same bits).

use super::kernels;
use candle_core::{Result, Tensor};

/// `scores ← softmax(scale · scores)` in place (max subtracted; one division per score).
fn softmax_scaled(scores: &mut [f32], scale: f32) {
    let mut max = f32::NEG_INFINITY;
    for s in scores.iter_mut() {
        *s *= scale;
        max = max.max(*s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

/// Causal attention of one sequence's `len` new rows at offset `off` for one query head:
/// `q: [len, hd]` (already rotated), keys/values of its KV head `t` rows apart by `row_stride`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    row_stride: usize,
    t: usize,
    off: usize,
    hd: usize,
    scale: f32,
) -> Result<Vec<f32>> {
    let len = q.len() / hd;
    let mut out = vec![0f32; len * hd];
    let mut scores = vec![0f32; t];
    for i in 0..len {
        let n = (off + i + 1).min(t);
        let qi = &q[i * hd..(i + 1) * hd];
        if row_stride == hd {
            kernels::matvec_into(qi, &k[..n * hd], hd, &mut scores[..n])?;
        } else {
            for (j, s) in scores[..n].iter_mut().enumerate() {
                *s = kernels::dot(qi, &k[j * row_stride..j * row_stride + hd]);
            }
        }
        softmax_scaled(&mut scores[..n], scale);
        let o = &mut out[i * hd..(i + 1) * hd];
        kernels::weighted_rows_sum(&scores[..n], v, row_stride, o)?;
    }
    Ok(out)
}

/// One sequence's K/V history for one layer: its cache's buffers (`[nkv, cap, hd]` views of the
/// first `len` positions), or the layer's paged pools read through its block table.
pub(super) enum History {
    Buffers {
        k: Tensor,
        v: Tensor,
    },
    Paged {
        k: Tensor,
        v: Tensor,
        table: Vec<u32>,
        bs: usize,
        len: usize,
    },
}

impl History {
    pub(super) fn tensors(&self) -> (&Tensor, &Tensor) {
        match self {
            Self::Buffers { k, v } | Self::Paged { k, v, .. } => (k, v),
        }
    }

    /// Positions in the history.
    pub(super) fn len(&self) -> usize {
        match self {
            Self::Buffers { k, .. } => k.dims()[1],
            Self::Paged { len, .. } => *len,
        }
    }
}

/// One KV head's rows in a paged pool: block `i` of the history holds `bs` rows of `hd` at
/// `runs[i]` in `k` and `v`.
pub(super) struct PagedRuns<'a> {
    pub(super) k: &'a [f32],
    pub(super) v: &'a [f32],
    pub(super) runs: &'a [usize],
    pub(super) bs: usize,
}

/// [`attend_head`] over a paged history of `t` positions: the scores and the weighted sum run
/// block by block, with the same per-row arithmetic, so the result equals the contiguous one.
pub(super) fn attend_head_paged(
    q: &[f32],
    kv: &PagedRuns<'_>,
    t: usize,
    off: usize,
    hd: usize,
    scale: f32,
) -> Result<Vec<f32>> {
    let len = q.len() / hd;
    let mut out = vec![0f32; len * hd];
    let mut scores = vec![0f32; t];
    let bs = kv.bs;
    fn run<'a>(buf: &'a [f32], start: Option<&usize>, rows: usize) -> Result<&'a [f32]> {
        start
            .and_then(|&s| buf.get(s..s + rows))
            .ok_or_else(|| candle_core::Error::msg("fast path: a KV block outside the pool"))
    }
    for i in 0..len {
        let n = (off + i + 1).min(t);
        let qi = &q[i * hd..(i + 1) * hd];
        for (b, chunk) in scores[..n].chunks_mut(bs).enumerate() {
            kernels::matvec_into(qi, run(kv.k, kv.runs.get(b), chunk.len() * hd)?, hd, chunk)?;
        }
        softmax_scaled(&mut scores[..n], scale);
        let o = &mut out[i * hd..(i + 1) * hd];
        for (b, chunk) in scores[..n].chunks(bs).enumerate() {
            let rows = run(kv.v, kv.runs.get(b), chunk.len() * hd)?;
            kernels::weighted_rows_accumulate(chunk, rows, o)?;
        }
    }
    Ok(out)
}
