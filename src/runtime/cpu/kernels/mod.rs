//! Inference-only f32 kernels for few rows (the decode path), on plain slices.
//!
//! Decoding multiplies a handful of rows by every weight matrix: memory-bound matrix-vector work
//! where candle's gemm pays for packing, thread dispatch and allocation on each of hundreds of
//! small calls per token. `linear_rows` instead streams each `[n, k]` row-major weight once, over
//! contiguous rows (dot products), for all input rows at a time, split across rayon's threads,
//! and adds the bias; then each row's low-rank (LoRA) term in a pass of its own, one row at a time.
//!
//! Each output element is computed the same way whatever the number of rows, their grouping or
//! the split across threads: one accumulator of the instruction set's width (16 lanes with
//! AVX-512, 8 with AVX2) over `k` in order, a fixed horizontal sum, then the tail. A row's
//! result therefore does not depend on which batch it is in. The widest instruction set the CPU
//! has is picked once at run time (`isa()`), with a scalar fallback.
//!
//! Nothing here has a backward pass: training uses the candle ops (`Kernels::Candle`).

use crate::quant::{dot_rows_into, Nf4Input, Nf4Packed};
use candle_core::Result;
use rayon::prelude::*;

/// Weight rows per parallel task.
const TASK_ROWS: usize = 64;
/// Below this many multiply-adds a call runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// A low-rank term for one input row `x`: `y[j] += Σ_r t[r] bt[r, j]` with `t = a x`, `a: [r, k]`
/// and `bt: [r, n]` (that is `B^T`, so that the sum runs along contiguous rows).
#[derive(Clone, Copy, Debug)]
pub struct LowRank<'a> {
    pub a: &'a [f32],
    pub bt: &'a [f32],
}

/// A linear map's weight `[n, k]`: dense row-major f32, or NF4-packed.
#[derive(Clone, Copy, Debug)]
pub enum JobWeight<'a> {
    F32(&'a [f32]),
    Nf4(&'a Nf4Packed),
}

/// One linear map `y = x w^T (+ bias) (+ low-rank terms)` over `m` rows.
#[derive(Clone, Debug)]
pub struct LinearJob<'a> {
    /// `[m, k]` row-major.
    pub x: &'a [f32],
    pub m: usize,
    pub k: usize,
    /// `[n, k]`.
    pub w: JobWeight<'a>,
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
        match self.w {
            JobWeight::F32(w) if w.len() != n * k => {
                candle_core::bail!("linear_rows: w has {} values, expected {n}x{k}", w.len());
            }
            JobWeight::Nf4(w) if (w.rows, w.cols) != (n, k) => {
                candle_core::bail!(
                    "linear_rows: NF4 weight is [{}, {}], expected [{n}, {k}]",
                    w.rows,
                    w.cols
                );
            }
            _ => {}
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
            if k == 0 || lr.a.len() % k != 0 {
                candle_core::bail!(
                    "linear_rows: low-rank a has {} values, not a multiple of k = {k}",
                    lr.a.len()
                );
            }
            let r = lr.a.len() / k;
            if lr.bt.len() != n * r {
                candle_core::bail!(
                    "linear_rows: low-rank bt has {} values, expected {r}x{n}",
                    lr.bt.len()
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
    linear_rows_with(jobs, isa())
}

/// `linear_rows` on a given instruction set (one `isa()` allows: it or a narrower one).
fn linear_rows_with(jobs: &[LinearJob<'_>], isa: Isa) -> Result<Vec<Vec<f32>>> {
    for job in jobs {
        job.check()?;
    }
    // NF4 jobs: the input rows prepared for the packed-row kernel, once per distinct input (q/k/v
    // and gate/up read the same rows).
    let mut prepared: Vec<(&[f32], usize, Nf4Input)> = Vec::new();
    let mut nf4_slot: Vec<Option<usize>> = Vec::with_capacity(jobs.len());
    for j in jobs {
        nf4_slot.push(match j.w {
            JobWeight::F32(_) => None,
            JobWeight::Nf4(_) => Some(
                match prepared
                    .iter()
                    .position(|(x, m, _)| std::ptr::eq(*x, j.x) && *m == j.m)
                {
                    Some(i) => i,
                    None => {
                        let input = Nf4Input::new(j.x, j.m, j.k).with_vnni(isa >= Isa::Avx512);
                        prepared.push((j.x, j.m, input));
                        prepared.len() - 1
                    }
                },
            ),
        });
    }
    let nf4_inputs: Vec<Option<&Nf4Input>> =
        nf4_slot.iter().map(|s| s.map(|i| &prepared[i].2)).collect();
    // Outputs are computed transposed (`[n, m]`) so that a task's rows are one contiguous chunk.
    let mut outs: Vec<Vec<f32>> = jobs.iter().map(|j| vec![0f32; j.n * j.m]).collect();
    let mut tasks: Vec<Task<'_>> = Vec::new();
    for (ji, (job, out)) in jobs.iter().zip(outs.iter_mut()).enumerate() {
        if job.m == 0 {
            continue;
        }
        if by_input_rows(job) {
            for (c, chunk) in out.chunks_mut(ROW_TASK_ROWS * job.n).enumerate() {
                tasks.push(Task::InputRows(ji, c * ROW_TASK_ROWS, chunk));
            }
            continue;
        }
        // Small jobs (8-64 weight rows) still split in two, to spread over two threads.
        let rows = TASK_ROWS.min(job.n.div_ceil(2).next_multiple_of(NR_ONE));
        for (c, chunk) in out.chunks_mut(rows * job.m).enumerate() {
            tasks.push(Task::WeightRows(ji, c * rows, chunk));
        }
    }
    let run = |task: Task<'_>| match task {
        Task::WeightRows(ji, j0, chunk) => run_rows(&jobs[ji], nf4_inputs[ji], j0, chunk, isa),
        Task::InputRows(ji, i0, chunk) => {
            input_rows(&jobs[ji], i0, chunk, isa);
            Ok(())
        }
    };
    let work: usize = jobs.iter().map(|j| j.m * j.n * j.k).sum();
    if work < PARALLEL_MIN_WORK || tasks.len() < 2 {
        tasks.into_iter().try_for_each(run)?;
    } else {
        tasks.into_par_iter().try_for_each(run)?;
    }
    let mut outs: Vec<Vec<f32>> = jobs
        .iter()
        .zip(outs)
        .map(|(job, t)| match by_input_rows(job) {
            true => t,
            false => transpose(t, job.n, job.m),
        })
        .collect();
    add_low_rank(jobs, &mut outs, isa);
    Ok(outs)
}

/// A share of one job's output: weight rows `j0..` for every input row (`[rows, m]`,
/// transposed: the few-row case, where each thread streams its own weight rows), or input rows
/// `i0..` for every weight row (`[rows, n]`, in place: the many-row case, compute-bound, where
/// every thread reads all weights from cache and no transpose is needed).
enum Task<'a> {
    WeightRows(usize, usize, &'a mut [f32]),
    InputRows(usize, usize, &'a mut [f32]),
}

/// Input rows from which a dense job is split by input rows instead of weight rows.
const ROW_SPLIT_MIN: usize = 48;
/// Input rows per task of a job split by input rows.
const ROW_TASK_ROWS: usize = 16;

fn by_input_rows(job: &LinearJob<'_>) -> bool {
    job.m >= ROW_SPLIT_MIN && matches!(job.w, JobWeight::F32(_))
}

/// Input rows `i0..` of a dense job into `out` (`[rows, n]` row-major): the base product, then
/// the bias — the same values in the same order as `run_rows` computes them, so a row's result
/// does not depend on how its call was split (low-rank terms come after, in `add_low_rank`).
fn input_rows(job: &LinearJob<'_>, i0: usize, out: &mut [f32], isa: Isa) {
    let JobWeight::F32(w_all) = job.w else {
        return;
    };
    let (k, n) = (job.k, job.n);
    let rows = out.len() / n;
    let mr_max = mr(isa);
    let x_all = &job.x[i0 * k..(i0 + rows) * k];
    let mut j = 0;
    while j < n {
        let nr = (n - j).min(NR);
        let w = &w_all[j * k..(j + nr) * k];
        let next = &w_all[((j + nr) * k).min(w_all.len())..((j + 2 * nr) * k).min(w_all.len())];
        let mut i = 0;
        while i < rows {
            let mr = (rows - i).min(mr_max);
            let pf = if i == 0 { next } else { &[] };
            let tile = tile_any(&x_all[i * k..(i + mr) * k], mr, w, nr, k, pf, isa);
            for (ii, row) in tile.iter().enumerate().take(mr) {
                out[(i + ii) * n + j..(i + ii) * n + j + nr].copy_from_slice(&row[..nr]);
            }
            i += mr;
        }
        j += nr;
    }
    if let Some(bias) = job.bias {
        for row in out.chunks_mut(n) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += *b;
            }
        }
    }
}

/// `[rows, cols]` → `[cols, rows]` (no copy for a single row or column), in blocks of output
/// rows spread over rayon's threads when it is large.
fn transpose(t: Vec<f32>, rows: usize, cols: usize) -> Vec<f32> {
    if rows <= 1 || cols <= 1 {
        return t;
    }
    let mut out = vec![0f32; t.len()];
    const BLOCK: usize = 8;
    let fill = |(b, chunk): (usize, &mut [f32])| {
        let c0 = b * BLOCK;
        for r in 0..rows {
            for (dc, row) in chunk.chunks_mut(rows).enumerate() {
                row[r] = t[r * cols + c0 + dc];
            }
        }
    };
    if t.len() >= PARALLEL_MIN_WORK {
        out.par_chunks_mut(BLOCK * rows).enumerate().for_each(fill);
    } else {
        out.chunks_mut(BLOCK * rows).enumerate().for_each(fill);
    }
    out
}

/// Input rows per tile (`mr(isa)`, at most `MR_MAX`), and weight rows per tile: `NR` next to
/// several input rows, `NR_ONE` next to a single one (memory-bound: more weight streams in
/// flight).
const MR_MAX: usize = 4;
/// Input values (rows × k) one block of input rows may hold: 96 KB, to stay in L2 next to the
/// task's weight rows.
const X_BLOCK_FLOATS: usize = 24 * 1024;
const NR: usize = 4;
const NR_ONE: usize = 8;

/// Input rows per tile: 4 × 4 accumulators fit AVX-512's 32 registers, 2 × 4 AVX2's 16.
fn mr(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 4,
        Isa::Avx2 | Isa::Scalar => 2,
    }
}

/// The instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA, 8 lanes.
    Avx2,
    /// AVX-512F (+ FMA), 16 lanes.
    Avx512,
}

impl Isa {
    /// The widest set this CPU runs.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }
}

/// The instruction set of every kernel call in this process: the widest the CPU has, capped by
/// `LORAPLEX_CPU_KERNELS` (`avx2` or `scalar`; for comparisons). Chosen once, so a row's result
/// never depends on when it was computed.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var("LORAPLEX_CPU_KERNELS").as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        Isa::detect().min(cap)
    })
}

/// Output rows `j0..` of `job` into `out` (`[rows, m]`, transposed); `nf4` is the prepared
/// input of an NF4 job.
fn run_rows(
    job: &LinearJob<'_>,
    nf4: Option<&Nf4Input>,
    j0: usize,
    out: &mut [f32],
    isa: Isa,
) -> Result<()> {
    let m = job.m;
    let rows = out.len() / m;
    match (job.w, nf4) {
        (JobWeight::F32(w), _) => dense_rows(w, job, j0, out, isa),
        (JobWeight::Nf4(w), Some(input)) => dot_rows_into(w, j0, j0 + rows, input, out, m)?,
        (JobWeight::Nf4(_), None) => candle_core::bail!("linear_rows: NF4 job without its input"),
    }
    if let Some(bias) = job.bias {
        for (jj, row) in out.chunks_mut(m).enumerate() {
            let b = bias[j0 + jj];
            for v in row {
                *v += b;
            }
        }
    }
    Ok(())
}

/// The base product `x w^T` for output rows `j0..` of a dense job into `out` (`[rows, m]`).
fn dense_rows(w_all: &[f32], job: &LinearJob<'_>, j0: usize, out: &mut [f32], isa: Isa) {
    let (m, k) = (job.m, job.k);
    let mr_max = mr(isa);
    let rows = out.len() / m;
    let step = if m == 1 { NR_ONE } else { NR };
    // Input rows in blocks that stay in cache while every weight tile of this task passes over
    // them (many-row calls: prompt chunks plus a batch's decode rows); the task's weight rows
    // (at most TASK_ROWS) stay in L2 from one block to the next.
    let block = (X_BLOCK_FLOATS / k.max(1)).max(mr_max) / mr_max * mr_max;
    let mut i0 = 0;
    while i0 < m {
        let i1 = (i0 + block).min(m);
        let mut j = 0;
        while j < rows {
            let nr = (rows - j).min(step);
            let w = &w_all[(j0 + j) * k..(j0 + j + nr) * k];
            // With several input rows the tiles are compute-bound and the hardware prefetcher
            // falls behind: prefetch the next block of weight rows while this one is computed
            // (measured: 20-25% faster for 2-8 rows; no gain for one row, which streams).
            let next = match (m, i0) {
                (1, _) | (_, 1..) => &[][..],
                _ => {
                    let from = ((j0 + j + nr) * k).min(w_all.len());
                    &w_all[from..((j0 + j + 2 * nr) * k).min(w_all.len())]
                }
            };
            let mut i = i0;
            while i < i1 {
                let mr = (i1 - i).min(mr_max);
                let x = &job.x[i * k..(i + mr) * k];
                let pf = if i == i0 { next } else { &[] };
                let tile = tile_any(x, mr, w, nr, k, pf, isa);
                for (ii, row) in tile.iter().enumerate().take(mr) {
                    for (jj, v) in row.iter().enumerate().take(nr) {
                        out[(j + jj) * m + i + ii] = *v;
                    }
                }
                i += mr;
            }
            j += nr;
        }
        i0 = i1;
    }
}

/// `acc[c] = Σ_r t[r] bt[r, j0 + c]` for `bt: [t.len(), n]`, summed in `r` order with one
/// multiply-add per step (the same arithmetic in the SIMD and scalar-tail lanes, so any SIMD
/// width gives the same result: AVX-512 CPUs run the AVX2 version).
fn low_rank_cols(bt: &[f32], n: usize, j0: usize, t: &[f32], acc: &mut [f32], isa: Isa) {
    let cols = acc.len();
    // Bounds every read below (the last row read is `bt[(r-1)*n + j0 .. + cols]`).
    let bt = &bt[..t.len().saturating_sub(1) * n + j0 + cols];
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `isa` is at most `Isa::detect()`, which found AVX2 and FMA on this CPU.
        unsafe { avx2::low_rank_cols(bt, n, j0, t, acc) };
        return;
    }
    let _ = isa;
    for (c, a) in acc.iter_mut().enumerate() {
        let mut s = 0f32;
        for (r, &tr) in t.iter().enumerate() {
            s += tr * bt[r * n + j0 + c];
        }
        *a = s;
    }
}

/// Dot products of `mr` rows of `x` with `nr` rows of `w` (`k` columns each), for `mr = 1,
/// nr ≤ NR_ONE` or `mr ≤ MR_MAX, nr ≤ NR`; other entries are zero.
fn tile_any(
    x: &[f32],
    mr: usize,
    w: &[f32],
    nr: usize,
    k: usize,
    pf: &[f32],
    isa: Isa,
) -> [[f32; NR_ONE]; MR_MAX] {
    let mut out = [[0f32; NR_ONE]; MR_MAX];
    macro_rules! tiles {
        ($($m:literal, $n:literal);*) => {
            match (mr, nr) {
                $(($m, $n) => {
                    let t = tile::<$m, $n>(x, w, k, pf, isa);
                    for (o, r) in out.iter_mut().zip(t.iter()) {
                        o[..$n].copy_from_slice(r);
                    }
                })*
                _ => unreachable!("tile sizes are bounded by MR_MAX, NR and NR_ONE"),
            }
        };
    }
    tiles!(1, 1; 1, 2; 1, 3; 1, 4; 1, 5; 1, 6; 1, 7; 1, 8; 2, 1; 2, 2; 2, 3; 2, 4;
           3, 1; 3, 2; 3, 3; 3, 4; 4, 1; 4, 2; 4, 3; 4, 4);
    out
}

#[inline(always)]
fn tile<const M: usize, const N: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    pf: &[f32],
    isa: Isa,
) -> [[f32; N]; M] {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `isa` is at most `Isa::detect()`, which found AVX-512F on this CPU.
        Isa::Avx512 => return unsafe { avx512::tile::<M, N>(x, w, k, pf) },
        // SAFETY: as above, AVX2 and FMA.
        Isa::Avx2 => return unsafe { avx2::tile::<M, N>(x, w, k, pf) },
        Isa::Scalar => {}
    }
    let _ = (isa, pf);
    scalar_tile::<M, N>(x, w, k)
}

/// Whether SIMD kernels (AVX2 or wider) run on this CPU.
pub fn simd_available() -> bool {
    isa() >= Isa::Avx2
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
mod avx2;
mod low_rank;
use low_rank::add_low_rank;
mod weighted;
pub use weighted::{weighted_rows_accumulate, weighted_rows_sum};
#[cfg(target_arch = "x86_64")]
mod avx512;

/// `dot(a, b)` with the same accumulation order as one element of `linear_rows`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    tile::<1, 1>(&a[..k], &b[..k], k, &[], isa())[0][0]
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
    matvec_with(x, w, k, out, isa());
    Ok(())
}

/// `matvec_into` on a given instruction set, sizes already checked (`x: [k]`, `w: [out.len(), k]`).
fn matvec_with(x: &[f32], w: &[f32], k: usize, out: &mut [f32], isa: Isa) {
    for (j, chunk) in out.chunks_mut(NR_ONE).enumerate() {
        let nr = chunk.len();
        let tile = tile_any(
            x,
            1,
            &w[j * NR_ONE * k..(j * NR_ONE + nr) * k],
            nr,
            k,
            &[],
            isa,
        );
        chunk.copy_from_slice(&tile[0][..nr]);
    }
}

#[cfg(test)]
mod tests;
