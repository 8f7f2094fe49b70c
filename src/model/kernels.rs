//! Inference-only f32 kernels for few rows (the decode path), on plain slices.
//!
//! Decoding multiplies a handful of rows by every weight matrix: memory-bound matrix-vector work
//! where candle's gemm pays for packing, thread dispatch and allocation on each of hundreds of
//! small calls per token. `linear_rows` instead streams each `[n, k]` row-major weight once, over
//! contiguous rows (dot products), for all input rows at a time, split across rayon's threads,
//! and adds the bias and a per-row low-rank (LoRA) term in the same pass.
//!
//! Each output element is computed the same way whatever the number of rows, their grouping or
//! the split across threads: one 8-lane accumulator over `k` in order, a fixed horizontal sum,
//! then the `k % 8` tail. A row's result therefore does not depend on which batch it is in.
//! AVX2+FMA is used when the CPU has it (checked at run time), with a scalar fallback.
//!
//! Nothing here has a backward pass: training uses the candle ops (`Kernels::Candle`).

use candle_core::Result;
use rayon::prelude::*;

/// Weight rows per parallel task.
const TASK_ROWS: usize = 64;
/// Below this many multiply-adds a call runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// A low-rank term for one input row: `y[j] += dot(b[j, ..], t)` with `b: [n, r]`, `t: [r]`.
#[derive(Clone, Copy, Debug)]
pub struct LowRank<'a> {
    pub b: &'a [f32],
    pub t: &'a [f32],
}

/// One linear map `y = x w^T (+ bias) (+ low-rank terms)` over `m` rows.
#[derive(Clone, Debug)]
pub struct LinearJob<'a> {
    /// `[m, k]` row-major.
    pub x: &'a [f32],
    pub m: usize,
    pub k: usize,
    /// `[n, k]` row-major.
    pub w: &'a [f32],
    pub n: usize,
    /// `[n]`
    pub bias: Option<&'a [f32]>,
    /// Empty, or one entry per input row.
    pub low_rank: Vec<Option<LowRank<'a>>>,
}

impl LinearJob<'_> {
    fn check(&self) -> Result<()> {
        let (m, k, n) = (self.m, self.k, self.n);
        if self.x.len() != m * k {
            candle_core::bail!(
                "linear_rows: x has {} values, expected {m}x{k}",
                self.x.len()
            );
        }
        if self.w.len() != n * k {
            candle_core::bail!(
                "linear_rows: w has {} values, expected {n}x{k}",
                self.w.len()
            );
        }
        if let Some(b) = self.bias {
            if b.len() != n {
                candle_core::bail!("linear_rows: bias has {} values, expected {n}", b.len());
            }
        }
        if !self.low_rank.is_empty() && self.low_rank.len() != m {
            candle_core::bail!(
                "linear_rows: {} low-rank entries for {m} rows",
                self.low_rank.len()
            );
        }
        for lr in self.low_rank.iter().flatten() {
            if lr.b.len() != n * lr.t.len() {
                candle_core::bail!(
                    "linear_rows: low-rank b has {} values, expected {n}x{}",
                    lr.b.len(),
                    lr.t.len()
                );
            }
        }
        Ok(())
    }
}

/// Runs every job and returns each one's output, `[m, n]` row-major. The jobs' weight rows are
/// shared out across rayon's threads together, so several projections of the same input
/// (q/k/v, gate/up) cost one dispatch.
pub fn linear_rows(jobs: &[LinearJob<'_>]) -> Result<Vec<Vec<f32>>> {
    linear_rows_with(jobs, simd_available())
}

/// `linear_rows` with the SIMD kernels on or off (`simd` only where `simd_available()`).
fn linear_rows_with(jobs: &[LinearJob<'_>], simd: bool) -> Result<Vec<Vec<f32>>> {
    for job in jobs {
        job.check()?;
    }
    // Outputs are computed transposed (`[n, m]`) so that a task's rows are one contiguous chunk.
    let mut outs: Vec<Vec<f32>> = jobs.iter().map(|j| vec![0f32; j.n * j.m]).collect();
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (ji, (job, out)) in jobs.iter().zip(outs.iter_mut()).enumerate() {
        if job.m == 0 {
            continue;
        }
        for (c, chunk) in out.chunks_mut(TASK_ROWS * job.m).enumerate() {
            tasks.push((ji, c * TASK_ROWS, chunk));
        }
    }
    let work: usize = jobs.iter().map(|j| j.m * j.n * j.k).sum();
    if work < PARALLEL_MIN_WORK || tasks.len() < 2 {
        for (ji, j0, chunk) in tasks {
            run_rows(&jobs[ji], j0, chunk, simd);
        }
    } else {
        tasks
            .into_par_iter()
            .for_each(|(ji, j0, chunk)| run_rows(&jobs[ji], j0, chunk, simd));
    }
    Ok(jobs
        .iter()
        .zip(outs)
        .map(|(job, t)| transpose(t, job.n, job.m))
        .collect())
}

/// `[rows, cols]` → `[cols, rows]` (no copy for a single row or column).
fn transpose(t: Vec<f32>, rows: usize, cols: usize) -> Vec<f32> {
    if rows <= 1 || cols <= 1 {
        return t;
    }
    let mut out = vec![0f32; t.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = t[r * cols + c];
        }
    }
    out
}

/// Input rows per tile, and weight rows per tile: `NR` next to several input rows, `NR_ONE`
/// next to a single one (memory-bound: more weight streams in flight).
const MR: usize = 2;
const NR: usize = 4;
const NR_ONE: usize = 8;

/// Output rows `j0..` of `job` into `out` (`[rows, m]`, transposed).
fn run_rows(job: &LinearJob<'_>, j0: usize, out: &mut [f32], simd: bool) {
    let (m, k) = (job.m, job.k);
    let rows = out.len() / m;
    let step = if m == 1 { NR_ONE } else { NR };
    let mut j = 0;
    while j < rows {
        let nr = (rows - j).min(step);
        let w = &job.w[(j0 + j) * k..(j0 + j + nr) * k];
        // With several input rows the tiles are compute-bound and the hardware prefetcher falls
        // behind: prefetch the next block of weight rows while this one is computed (measured:
        // 20-25% faster for 2-8 rows; no gain for one row, which streams).
        let next = match m {
            1 => &[][..],
            _ => {
                &job.w
                    [((j0 + j + nr) * k).min(job.w.len())..((j0 + j + 2 * nr) * k).min(job.w.len())]
            }
        };
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(MR);
            let x = &job.x[i * k..(i + mr) * k];
            let pf = if i == 0 { next } else { &[] };
            let tile = tile_any(x, mr, w, nr, k, pf, simd);
            for (ii, row) in tile.iter().enumerate().take(mr) {
                for (jj, v) in row.iter().enumerate().take(nr) {
                    out[(j + jj) * m + i + ii] = *v;
                }
            }
            i += mr;
        }
        j += nr;
    }
    if let Some(bias) = job.bias {
        for (jj, row) in out.chunks_mut(m).enumerate() {
            let b = bias[j0 + jj];
            for v in row {
                *v += b;
            }
        }
    }
    for (i, lr) in job.low_rank.iter().enumerate() {
        let Some(lr) = lr else { continue };
        let r = lr.t.len();
        if r == 0 {
            continue;
        }
        let mut j = 0;
        while j < rows {
            let nr = (rows - j).min(NR_ONE);
            let b = &lr.b[(j0 + j) * r..(j0 + j + nr) * r];
            let tile = tile_any(lr.t, 1, b, nr, r, &[], simd);
            for (jj, v) in tile[0].iter().enumerate().take(nr) {
                out[(j + jj) * m + i] += *v;
            }
            j += nr;
        }
    }
}

/// Dot products of `mr` rows of `x` with `nr` rows of `w` (`k` columns each), for `mr = 1,
/// nr ≤ NR_ONE` or `mr ≤ MR, nr ≤ NR`; other entries are zero.
fn tile_any(
    x: &[f32],
    mr: usize,
    w: &[f32],
    nr: usize,
    k: usize,
    pf: &[f32],
    simd: bool,
) -> [[f32; NR_ONE]; MR] {
    let mut out = [[0f32; NR_ONE]; MR];
    macro_rules! tiles {
        ($($m:literal, $n:literal);*) => {
            match (mr, nr) {
                $(($m, $n) => {
                    let t = tile::<$m, $n>(x, w, k, pf, simd);
                    for (o, r) in out.iter_mut().zip(t.iter()) {
                        o[..$n].copy_from_slice(r);
                    }
                })*
                _ => unreachable!("tile sizes are bounded by MR, NR and NR_ONE"),
            }
        };
    }
    tiles!(1, 1; 1, 2; 1, 3; 1, 4; 1, 5; 1, 6; 1, 7; 1, 8; 2, 1; 2, 2; 2, 3; 2, 4);
    out
}

#[inline(always)]
fn tile<const M: usize, const N: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    pf: &[f32],
    simd: bool,
) -> [[f32; N]; M] {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when `simd_available()` found AVX2 and FMA on this CPU.
        return unsafe { avx2::tile::<M, N>(x, w, k, pf) };
    }
    let _ = (simd, pf);
    scalar_tile::<M, N>(x, w, k)
}

/// Whether the AVX2+FMA kernels can run on this CPU.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The portable tile: the same 8-lane accumulation order as the AVX2 one, without fused
/// multiply-adds.
fn scalar_tile<const M: usize, const N: usize>(x: &[f32], w: &[f32], k: usize) -> [[f32; N]; M] {
    let (x, w) = (&x[..M * k], &w[..N * k]);
    let full = k / 8 * 8;
    let mut acc = [[[0f32; 8]; N]; M];
    for c in (0..full).step_by(8) {
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let xs = &x[i * k + c..i * k + c + 8];
            for (j, a) in acc_i.iter_mut().enumerate() {
                let ws = &w[j * k + c..j * k + c + 8];
                for l in 0..8 {
                    a[l] += xs[l] * ws[l];
                }
            }
        }
    }
    let mut out = [[0f32; N]; M];
    for i in 0..M {
        for j in 0..N {
            let a = &acc[i][j];
            // Same pairing as the AVX2 horizontal sum.
            let q = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
            let mut s = (q[0] + q[2]) + (q[1] + q[3]);
            for t in full..k {
                s += x[i * k + t] * w[j * k + t];
            }
            out[i][j] = s;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Dot products of `M` rows of `x` with `N` rows of `w`, `k` columns each.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const M: usize, const N: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        pf: &[f32],
    ) -> [[f32; N]; M] {
        // Slicing bounds every load below: row `i` of x is `x[i*k..(i+1)*k]`, likewise for w.
        let (x, w) = (&x[..M * k], &w[..N * k]);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let full = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        // Cache lines of `pf` (the next weight rows) to prefetch per iteration: its lines spread
        // over the k/8 iterations.
        let pf_step = (pf.len() / 16).div_ceil((full / 8).max(1)) * 16;
        let mut pf_at = 0;
        let mut c = 0;
        while c < full {
            let pf_end = (pf_at + pf_step).min(pf.len());
            while pf_at < pf_end {
                // SAFETY: pf_at < pf.len(), so the address is inside `pf`; a prefetch never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(pf.as_ptr().add(pf_at) as *const i8) };
                pf_at += 16;
            }
            let mut wv = [_mm256_setzero_ps(); N];
            for (j, v) in wv.iter_mut().enumerate() {
                // SAFETY: c + 8 <= full <= k, so j*k + c + 8 <= N*k = w.len().
                *v = unsafe { _mm256_loadu_ps(wp.add(j * k + c)) };
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                // SAFETY: c + 8 <= k, so i*k + c + 8 <= M*k = x.len().
                let xv = unsafe { _mm256_loadu_ps(xp.add(i * k + c)) };
                for (a, wj) in acc_i.iter_mut().zip(wv.iter()) {
                    *a = _mm256_fmadd_ps(xv, *wj, *a);
                }
            }
            c += 8;
        }
        let mut out = [[0f32; N]; M];
        for i in 0..M {
            for j in 0..N {
                let mut s = hsum(acc[i][j]);
                for t in full..k {
                    s = x[i * k + t].mul_add(w[j * k + t], s);
                }
                out[i][j] = s;
            }
        }
        out
    }

    /// `y += a * x` with fused multiply-adds (LLVM vectorizes the loop to 8 lanes).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y = a.mul_add(*x, *y);
        }
    }

    /// `(l0+l4) + (l2+l6)` + `(l1+l5) + (l3+l7)`, the order `scalar_tile` mirrors.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
    }
}

/// `dot(a, b)` with the same accumulation order as one element of `linear_rows`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    tile::<1, 1>(&a[..k], &b[..k], k, &[], simd_available())[0][0]
}

/// `out[j] = dot(x, w[j, ..])` for the rows of `w: [out.len(), k]`, on the calling thread.
pub fn matvec_into(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) -> Result<()> {
    if x.len() != k || w.len() != out.len() * k {
        candle_core::bail!(
            "matvec_into: x has {} values and w {}, expected {k} and {}x{k}",
            x.len(),
            w.len(),
            out.len()
        );
    }
    let simd = simd_available();
    for (j, chunk) in out.chunks_mut(NR_ONE).enumerate() {
        let nr = chunk.len();
        let tile = tile_any(
            x,
            1,
            &w[j * NR_ONE * k..(j * NR_ONE + nr) * k],
            nr,
            k,
            &[],
            simd,
        );
        chunk.copy_from_slice(&tile[0][..nr]);
    }
    Ok(())
}

/// `y += a * x` (elementwise, over the shorter of the two).
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2 and FMA were just detected on this CPU.
        unsafe { avx2::axpy(a, x, y) };
        return;
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        // A small deterministic generator: tests must not depend on global RNG state.
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn candle_linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let x = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
        let w = Tensor::from_slice(w, (n, k), &Device::Cpu).unwrap();
        x.matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "at {i}: {x} vs {y}");
        }
    }

    #[test]
    fn matches_candle_matmul_on_odd_shapes() {
        for (s, &(k, n)) in [
            (1, 1),
            (3, 5),
            (7, 9),
            (13, 33),
            (64, 130),
            (77, 67),
            (300, 257),
        ]
        .iter()
        .enumerate()
        {
            for m in 1..=17 {
                let seed = (s * 100 + m) as u64;
                let x = randn(m * k, seed);
                let w = randn(n * k, seed + 7);
                let job = LinearJob {
                    x: &x,
                    m,
                    k,
                    w: &w,
                    n,
                    bias: None,
                    low_rank: vec![],
                };
                let want = candle_linear(&x, m, k, &w, n);
                let scalar = linear_rows_with(&[job.clone()], false).unwrap().remove(0);
                close(&scalar, &want, 1e-5);
                let got = linear_rows(&[job]).unwrap().remove(0);
                close(&got, &want, 1e-5);
            }
        }
    }

    #[test]
    fn bias_and_low_rank_match_candle() {
        let (m, k, n) = (5, 37, 70);
        for r in [1, 4, 12, 16, 19] {
            let x = randn(m * k, r as u64);
            let w = randn(n * k, 11);
            let bias = randn(n, 12);
            let a = randn(r * k, 13);
            let b = randn(n * r, 14);
            // t = x A^T for rows 1 and 3 only.
            let t = candle_linear(&x, m, k, &a, r);
            let mut low_rank = vec![None; m];
            for i in [1, 3] {
                low_rank[i] = Some(LowRank {
                    b: &b,
                    t: &t[i * r..(i + 1) * r],
                });
            }
            let job = LinearJob {
                x: &x,
                m,
                k,
                w: &w,
                n,
                bias: Some(&bias),
                low_rank,
            };
            let got = linear_rows(&[job]).unwrap().remove(0);
            let mut want = candle_linear(&x, m, k, &w, n);
            let delta = candle_linear(&t, m, r, &b, n);
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] += bias[j];
                    if i == 1 || i == 3 {
                        want[i * n + j] += delta[i * n + j];
                    }
                }
            }
            close(&got, &want, 1e-5);
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (k, n) = (45, 300);
        let w = randn(n * k, 1);
        let x = randn(17 * k, 2);
        let all = linear_rows(&[LinearJob {
            x: &x,
            m: 17,
            k,
            w: &w,
            n,
            bias: None,
            low_rank: vec![],
        }])
        .unwrap()
        .remove(0);
        for i in 0..17 {
            let one = linear_rows(&[LinearJob {
                x: &x[i * k..(i + 1) * k],
                m: 1,
                k,
                w: &w,
                n,
                bias: None,
                low_rank: vec![],
            }])
            .unwrap()
            .remove(0);
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
            assert_eq!(dot(&x[i * k..(i + 1) * k], &w[..k]), all[i * n]);
        }
    }

    #[test]
    fn several_jobs_and_bad_shapes() {
        let (k, m) = (20, 3);
        let x = randn(m * k, 3);
        let w1 = randn(10 * k, 4);
        let w2 = randn(1000 * k, 5);
        let jobs = [
            LinearJob {
                x: &x,
                m,
                k,
                w: &w1,
                n: 10,
                bias: None,
                low_rank: vec![],
            },
            LinearJob {
                x: &x,
                m,
                k,
                w: &w2,
                n: 1000,
                bias: None,
                low_rank: vec![],
            },
        ];
        let outs = linear_rows(&jobs).unwrap();
        close(&outs[0], &candle_linear(&x, m, k, &w1, 10), 1e-5);
        close(&outs[1], &candle_linear(&x, m, k, &w2, 1000), 1e-5);
        let bad = LinearJob {
            x: &x,
            m,
            k,
            w: &w1,
            n: 11,
            bias: None,
            low_rank: vec![],
        };
        assert!(linear_rows(&[bad]).is_err());
    }
}
