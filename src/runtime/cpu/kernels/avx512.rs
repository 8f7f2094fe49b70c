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
    // The full 4 × 4 tile sums its 16 accumulators together (`hsum16`), the others one by one;
    // each value is the same sum either way.
    let mut sums = [0f32; 16];
    if M == 4 && N == 4 {
        let mut all = [_mm512_setzero_ps(); 16];
        for i in 0..M {
            for j in 0..N {
                all[i * 4 + j] = acc[i][j];
            }
        }
        sums = hsum16(&all);
    }
    for i in 0..M {
        for j in 0..N {
            let mut s = match M == 4 && N == 4 {
                true => sums[i * 4 + j],
                false => hsum(acc[i][j]),
            };
            for t in full..k {
                s = x[i * k + t].mul_add(w[j * k + t], s);
            }
            out[i][j] = s;
        }
    }
    out
}

/// `hsum` of each of 16 vectors, together: the same pairs added in the same order (lane i +
/// lane i+8, then + 4, + 2, + 1), with the lanes of several vectors moved side by side first:
/// 15 additions and 30 shuffles instead of 16 × (4 additions and 5 extracts), about a seventh
/// of a 4 × 4 tile's instructions at k = 576 (an instruction count, not a timing).
/// `out[i] = hsum(v[i])`.
#[target_feature(enable = "avx512f")]
fn hsum16(v: &[__m512; 16]) -> [f32; 16] {
    // 8 vectors: lanes 0-7 `v[2p]`'s (lane i + lane i+8), lanes 8-15 `v[2p+1]`'s.
    let s: [__m512; 8] = std::array::from_fn(|p| {
        let (a, b) = (v[2 * p], v[2 * p + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    });
    // 4 vectors: 128-bit chunk c holds `v[4q + c]`'s (+ 4) stage.
    let t: [__m512; 4] = std::array::from_fn(|q| {
        let (a, b) = (s[2 * q], s[2 * q + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        )
    });
    // 2 vectors: chunk c holds the (+ 2) stage of `v[8u + c]` (lanes 0, 1) and `v[8u + 4 + c]`
    // (lanes 2, 3).
    let u: [__m512; 2] = std::array::from_fn(|w| {
        let (a, b) = (t[2 * w], t[2 * w + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(a, b),
            _mm512_shuffle_ps::<0xEE>(a, b),
        )
    });
    // Lane 4c + s: the sum of `v[4s + c]`.
    let r = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(u[0], u[1]),
        _mm512_shuffle_ps::<0xDD>(u[0], u[1]),
    );
    let mut lanes = [0f32; 16];
    // SAFETY: `lanes` holds 16 floats.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), r) };
    std::array::from_fn(|i| lanes[4 * (i % 4) + i / 4])
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
