//! The low-rank (LoRA) pass of `linear_rows`: after the base product and bias, each row with a
//! term gets one task that computes `t = A x` (the dot products of `matvec_with`, the same values
//! as for any number of rows) and adds `B t`, reading `A` and then `B^T` whole, front to back.

use super::{matvec_with, Isa, LinearJob, LowRank, PARALLEL_MIN_WORK};
use rayon::prelude::*;

/// Adds each row's low-rank term to its output row (`outs[j]`: `[m, n]`, base product and bias
/// already in): one task per row, which streams that row's `A` (`t = A x`, dot products as
/// `linear_rows` computes them for any number of rows, so the same `t`) and then its `B^T`
/// whole, front to back, one row after the other. With one adapter per row (32 distinct in a
/// step) that is a few long memory streams per task, where splitting `B t` by weight rows read
/// 64-column pieces of every adapter at once; the values are those of the per-column sums.
pub(super) fn add_low_rank(jobs: &[LinearJob<'_>], outs: &mut [Vec<f32>], isa: Isa) {
    let mut rows: Vec<(&[f32], &LowRank<'_>, &mut [f32])> = Vec::new();
    let mut work = 0;
    for (job, out) in jobs.iter().zip(outs.iter_mut()) {
        let rows_of = job.x.chunks(job.k.max(1)).zip(out.chunks_mut(job.n.max(1)));
        for (lr, (x, y)) in job.low_rank.iter().zip(rows_of) {
            if let Some(lr) = lr {
                work += lr.a.len() + lr.bt.len();
                rows.push((x, lr, y));
            }
        }
    }
    let one = |(x, lr, y): (&[f32], &LowRank<'_>, &mut [f32])| {
        let k = x.len();
        let mut t = vec![0f32; lr.a.len() / k.max(1)];
        matvec_with(x, lr.a, k, &mut t, isa);
        let mut acc = vec![0f32; y.len()];
        low_rank_row(lr.bt, &t, &mut acc, isa);
        for (v, a) in y.iter_mut().zip(&acc) {
            *v += *a;
        }
    };
    if work < PARALLEL_MIN_WORK || rows.len() < 2 {
        rows.into_iter().for_each(one);
    } else {
        rows.into_par_iter().for_each(one);
    }
}

/// `acc[c] = Σ_r t[r] bt[r, c]` for every column of `bt: [t.len(), acc.len()]`, per column the
/// arithmetic of `low_rank_cols` (so the same values), reading `bt` row after row.
fn low_rank_row(bt: &[f32], t: &[f32], acc: &mut [f32], isa: Isa) {
    let n = acc.len();
    let bt = &bt[..t.len() * n];
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `isa` is at most `Isa::detect()`, which found AVX2 and FMA on this CPU.
        unsafe { super::avx2::low_rank_row(bt, t, acc) };
        return;
    }
    let _ = isa;
    acc.fill(0.0);
    for (row, &tr) in bt.chunks(n.max(1)).zip(t) {
        for (a, w) in acc.iter_mut().zip(row) {
            *a += tr * *w;
        }
    }
}
