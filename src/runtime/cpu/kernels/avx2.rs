//! The AVX2+FMA versions of the kernels (x86_64; callers check the CPU at run time).

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

/// `acc[c] = Σ_r t[r] bt[r*n + j0 + c]`, `r` in order, fused multiply-adds: `V` vectors of
/// 8 columns held in registers across `r`, then the columns past the last full vector.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn low_rank_cols(bt: &[f32], n: usize, j0: usize, t: &[f32], acc: &mut [f32]) {
    let cols = acc.len();
    let vecs = cols / 8;
    let mut q = 0;
    while q + 8 <= vecs {
        // SAFETY: AVX2 and FMA are enabled here, as the caller guarantees.
        unsafe { cols_block::<8>(bt, n, j0 + q * 8, t, &mut acc[q * 8..(q + 8) * 8]) };
        q += 8;
    }
    while q < vecs {
        // SAFETY: as above.
        unsafe { cols_block::<1>(bt, n, j0 + q * 8, t, &mut acc[q * 8..(q + 1) * 8]) };
        q += 1;
    }
    for c in vecs * 8..cols {
        let mut s = 0f32;
        for (r, &tr) in t.iter().enumerate() {
            s = tr.mul_add(bt[r * n + j0 + c], s);
        }
        acc[c] = s;
    }
}

/// `acc[c] = Σ_r t[r] bt[r*n + c]` for every column `c < n = acc.len()`: one pass over `acc`
/// per `r`, so each row of `bt` is read once, front to back (one memory stream at a time). Per
/// column it is the same chain of fused multiply-adds, in `r` order from zero, as
/// `low_rank_cols` computes, so both give the same values.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn low_rank_row(bt: &[f32], t: &[f32], acc: &mut [f32]) {
    acc.fill(0.0);
    // SAFETY: AVX2 and FMA are enabled here, as the caller guarantees.
    unsafe { accumulate_rows(bt, t, acc) };
}

/// `acc[c] += Σ_r t[r] bt[r*n + c]` (`n = acc.len()`), continuing each column's chain of fused
/// multiply-adds in `r` order: rows split over several calls give what one call over all of
/// them gives.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn accumulate_rows(bt: &[f32], t: &[f32], acc: &mut [f32]) {
    let n = acc.len();
    let full = n / 8 * 8;
    for (r, &tr) in t.iter().enumerate() {
        let row = &bt[r * n..(r + 1) * n];
        let b = _mm256_set1_ps(tr);
        let (rp, ap) = (row.as_ptr(), acc.as_mut_ptr());
        let mut c = 0;
        while c < full {
            // SAFETY: c + 8 <= full <= n = row.len() = acc.len().
            unsafe {
                let sum =
                    _mm256_fmadd_ps(b, _mm256_loadu_ps(rp.add(c)), _mm256_loadu_ps(ap.add(c)));
                _mm256_storeu_ps(ap.add(c), sum);
            }
            c += 8;
        }
        for (a, w) in acc[full..].iter_mut().zip(&row[full..]) {
            *a = tr.mul_add(*w, *a);
        }
    }
}

/// `out[c] = Σ_r t[r] bt[r*n + c0 + c]` for `8 * V` columns.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn cols_block<const V: usize>(bt: &[f32], n: usize, c0: usize, t: &[f32], out: &mut [f32]) {
    let out = &mut out[..V * 8];
    let mut acc = [_mm256_setzero_ps(); V];
    for (r, &tr) in t.iter().enumerate() {
        let row = &bt[r * n + c0..r * n + c0 + V * 8];
        let b = _mm256_set1_ps(tr);
        for (v, a) in acc.iter_mut().enumerate() {
            // SAFETY: `row` has V*8 values, so 8 floats from v*8 are inside it.
            let w = unsafe { _mm256_loadu_ps(row.as_ptr().add(v * 8)) };
            *a = _mm256_fmadd_ps(b, w, *a);
        }
    }
    for (v, a) in acc.iter().enumerate() {
        // SAFETY: `out` has V*8 values, so 8 floats from v*8 are inside it.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(v * 8), *a) };
    }
}

/// `(l0+l4) + (l2+l6)` + `(l1+l5) + (l3+l7)`, the order `scalar_tile` mirrors.
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
}
