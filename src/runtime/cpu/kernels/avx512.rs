//! The AVX-512F version of the dot-product tile (x86_64; callers check the CPU at run time).
//!
//! Same shape of computation as the AVX2 tile — one accumulator per (input row, weight row),
//! running over `k` in order, a fixed horizontal sum, then the `k % 16` tail — with 16 lanes.
//! Twice the multiply-adds per instruction and 32 registers: tiles of 4 input rows × 4 weight
//! rows keep 16 accumulators in flight, so many-row calls (a batch's decode rows plus prompt
//! chunks) run near the FMA units' rate instead of the load ports'.

use std::arch::x86_64::*;

/// Dot products of `M` rows of `x` with `N` rows of `w`, `k` columns each; `pf` is prefetched
/// (the next weight rows) while this tile is computed.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile<const M: usize, const N: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    pf: &[f32],
) -> [[f32; N]; M] {
    // Slicing bounds every load below: row `i` of x is `x[i*k..(i+1)*k]`, likewise for w.
    let (x, w) = (&x[..M * k], &w[..N * k]);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let full = k / 16 * 16;
    let mut acc = [[_mm512_setzero_ps(); N]; M];
    // Cache lines of `pf` to prefetch per iteration, spread over the k/16 iterations.
    let pf_step = (pf.len() / 16).div_ceil((full / 16).max(1)) * 16;
    let mut pf_at = 0;
    let mut c = 0;
    while c < full {
        let pf_end = (pf_at + pf_step).min(pf.len());
        while pf_at < pf_end {
            // SAFETY: pf_at < pf.len(), so the address is inside `pf`; a prefetch never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(pf.as_ptr().add(pf_at) as *const i8) };
            pf_at += 16;
        }
        let mut wv = [_mm512_setzero_ps(); N];
        for (j, v) in wv.iter_mut().enumerate() {
            // SAFETY: c + 16 <= full <= k, so j*k + c + 16 <= N*k = w.len().
            *v = unsafe { _mm512_loadu_ps(wp.add(j * k + c)) };
        }
        for (i, acc_i) in acc.iter_mut().enumerate() {
            // SAFETY: c + 16 <= k, so i*k + c + 16 <= M*k = x.len().
            let xv = unsafe { _mm512_loadu_ps(xp.add(i * k + c)) };
            for (a, wj) in acc_i.iter_mut().zip(wv.iter()) {
                *a = _mm512_fmadd_ps(xv, *wj, *a);
            }
        }
        c += 16;
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

/// The 16 lanes summed in a fixed order: halves, then quarters, ... (lane i + lane i+8, ...).
#[target_feature(enable = "avx512f")]
fn hsum(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let o = _mm256_add_ps(lo, hi);
    let q = _mm_add_ps(_mm256_castps256_ps128(o), _mm256_extractf128_ps::<1>(o));
    let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
}
