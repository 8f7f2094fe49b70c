//! Weighted sums of rows (the attention's `p V`): over rows a stride apart in one call, or
//! accumulated run by run over rows split into runs (a paged KV cache's blocks), with the same
//! per-column arithmetic.

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::{isa, low_rank_cols, Isa};
use candle_core::Result;

/// `out[c] += Σ_j weights[j] rows[j * out.len() + c]`, continuing [`weighted_rows_sum`]'s
/// per-column arithmetic: a weighted sum over rows split into runs (the blocks of a paged KV
/// cache), zeroed once and accumulated run by run, equals one call over all the rows.
pub fn weighted_rows_accumulate(weights: &[f32], rows: &[f32], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    if rows.len() < weights.len() * n {
        candle_core::bail!(
            "weighted_rows_accumulate: {} values for {} rows of {n}",
            rows.len(),
            weights.len()
        );
    }
    let rows = &rows[..weights.len() * n];
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        // SAFETY: `isa()` found AVX2 and FMA on this CPU.
        unsafe { avx2::accumulate_rows(rows, weights, out) };
        return Ok(());
    }
    for (row, &w) in rows.chunks(n.max(1)).zip(weights) {
        for (a, x) in out.iter_mut().zip(row) {
            *a += w * *x;
        }
    }
    Ok(())
}

/// `out[c] = Σ_j weights[j] rows[j * stride + c]`: a weighted sum of rows `stride` apart (the
/// attention's `p V`), summed in `j` order with fused multiply-adds where available.
pub fn weighted_rows_sum(
    weights: &[f32],
    rows: &[f32],
    stride: usize,
    out: &mut [f32],
) -> Result<()> {
    let need = weights.len().saturating_sub(1) * stride + out.len();
    if !weights.is_empty() && rows.len() < need {
        candle_core::bail!(
            "weighted_rows_sum: {} values, {} rows of stride {stride} need {need}",
            rows.len(),
            weights.len()
        );
    }
    if weights.is_empty() {
        out.fill(0.0);
        return Ok(());
    }
    low_rank_cols(rows, stride, 0, weights, out, isa());
    Ok(())
}
