//! AVX2+FMA inner loops of the NF4 kernels (x86-64 only). Every function here requires AVX2 and
//! FMA; the callers in `kernels` check for them at run time and fall back to scalar code.

use super::nf4::NF4_CODE;
use std::arch::x86_64::*;

/// Byte `k` of each NF4 value's f32 bits, for `k = 0..4`, repeated in both 128-bit lanes (the
/// tables of the byte-plane lookup).
const BYTE_PLANES: [[u8; 32]; 4] = {
    let mut t = [[0u8; 32]; 4];
    let mut i = 0;
    while i < 32 {
        let b = NF4_CODE[i % 16].to_bits().to_le_bytes();
        let mut k = 0;
        while k < 4 {
            t[k][i] = b[k];
            k += 1;
        }
        i += 1;
    }
    t
};

/// Decoder state: the four byte-plane tables in registers.
#[derive(Copy, Clone)]
struct Decoder {
    planes: [__m256i; 4],
}

impl Decoder {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn new() -> Self {
        // SAFETY: each plane is 32 bytes, the size of the unaligned load.
        let planes = std::array::from_fn(|k| unsafe {
            _mm256_loadu_si256(BYTE_PLANES[k].as_ptr() as *const __m256i)
        });
        Self { planes }
    }

    /// Decodes 32 codes (16 bytes at `p`, high nibble first) into four vectors of NF4 values in
    /// element order, exactly (the f32 bits are assembled byte by byte with in-lane shuffles; no
    /// cross-lane permute, which is slow on AMD cores).
    ///
    /// # Safety
    /// `p` points at 16 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode32(self, p: *const u8) -> [__m256; 4] {
        // SAFETY: the caller guarantees 16 readable bytes at `p`.
        let v = unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i)) };
        // Lane 0 takes bytes 0,1,4,5,8,9,12,13 (elements 0-3, 8-11, 16-19, 24-27), lane 1 the
        // others, so that the 4-wide unpacks below come out in element order.
        let arrange = _mm256_setr_epi8(
            0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7, 10, 11, 14, 15,
            -1, -1, -1, -1, -1, -1, -1, -1,
        );
        let v = _mm256_shuffle_epi8(v, arrange);
        let mask = _mm256_set1_epi8(0x0f);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
        let lo = _mm256_and_si256(v, mask);
        let idx = _mm256_unpacklo_epi8(hi, lo);
        let [b0, b1, b2, b3] = self.planes.map(|t| _mm256_shuffle_epi8(t, idx));
        let (l01, h01) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1));
        let (l23, h23) = (_mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3));
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23)),
        ]
    }
}

/// The sum of the eight lanes of `v`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// Dot products of consecutive packed rows with `G` input rows:
/// `out[r * stride + g] = row_r . xs[g]`. With one input row each block's `sum(code * x)` is
/// scaled once (four accumulator chains); with more, the decoded block is scaled into the
/// dequantized weights (bit for bit) and shared by the `G` rows.
///
/// # Safety
/// AVX2+FMA available; `bs % 32 == 0`; `cols % bs == 0`; `packed.len() * 2 == scales.len() * bs`
/// and is a multiple of `cols`; every `xs[g].len() >= cols`; `out` holds
/// `(rows - 1) * stride + G` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows<const G: usize>(
    packed: &[u8],
    scales: &[f32],
    bs: usize,
    cols: usize,
    xs: &[&[f32]; G],
    out: &mut [f32],
    stride: usize,
) {
    let dec = Decoder::new();
    let per_row = cols / bs;
    for (r, row_scales) in scales.chunks_exact(per_row).enumerate() {
        let row = packed.as_ptr().wrapping_add(r * cols / 2);
        let mut acc = [[_mm256_setzero_ps(); 2]; G];
        for (b, s) in row_scales.iter().enumerate() {
            let sv = _mm256_set1_ps(*s);
            let base = b * bs;
            let mut part = [_mm256_setzero_ps(); 4];
            let mut j = 0;
            while j < bs {
                // SAFETY: base + j + 32 <= cols, so the 16 bytes at row + (base + j) / 2 lie in
                // this row of `packed` and the 32 floats at base + j in every input row
                // (caller's contract).
                unsafe {
                    let w = dec.decode32(row.add((base + j) / 2));
                    if G == 1 {
                        let xp = xs[0].as_ptr().add(base + j);
                        for (q, p) in part.iter_mut().enumerate() {
                            *p = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(xp.add(8 * q)), *p);
                        }
                    } else {
                        let w = w.map(|v| _mm256_mul_ps(v, sv));
                        for (g, a) in acc.iter_mut().enumerate() {
                            let xp = xs[g].as_ptr().add(base + j);
                            for (q, wq) in w.iter().enumerate() {
                                let xv = _mm256_loadu_ps(xp.add(8 * q));
                                a[q % 2] = _mm256_fmadd_ps(*wq, xv, a[q % 2]);
                            }
                        }
                    }
                }
                j += 32;
            }
            if G == 1 {
                acc[0][0] = _mm256_fmadd_ps(_mm256_add_ps(part[0], part[1]), sv, acc[0][0]);
                acc[0][1] = _mm256_fmadd_ps(_mm256_add_ps(part[2], part[3]), sv, acc[0][1]);
            }
        }
        for (g, a) in acc.iter().enumerate() {
            out[r * stride + g] = hsum(_mm256_add_ps(a[0], a[1]));
        }
    }
}

/// Dequantizes one row: `code * absmax`, the same products as the scalar code.
///
/// # Safety
/// AVX2+FMA available; `bs % 32 == 0`; `packed.len() == scales.len() * bs / 2`;
/// `out.len() == scales.len() * bs`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dequantize_row(packed: &[u8], scales: &[f32], bs: usize, out: &mut [f32]) {
    let dec = Decoder::new();
    for (b, s) in scales.iter().enumerate() {
        let sv = _mm256_set1_ps(*s);
        let base = b * bs;
        let mut j = 0;
        while j < bs {
            // SAFETY: base + j + 32 <= out.len(), and the 16 source bytes lie in `packed`.
            unsafe {
                let w = dec.decode32(packed.as_ptr().add((base + j) / 2));
                let o = out.as_mut_ptr().add(base + j);
                for (q, wq) in w.iter().enumerate() {
                    _mm256_storeu_ps(o.add(8 * q), _mm256_mul_ps(*wq, sv));
                }
            }
            j += 32;
        }
    }
}

/// A register block of `x w^T`: `out[i][j] = sum_c x[i * k + c] * w[j * k + c]` for `MR` rows of
/// `x` and `NR` rows of `w` (4 x 3 uses 12 accumulators + 3 weight registers + 1 input register).
///
/// # Safety
/// AVX2+FMA available; `x` holds `MR * k` values and `w` holds `NR * k` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn block_dot<const MR: usize, const NR: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
) -> [[f32; NR]; MR] {
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut c = 0;
    while c + 8 <= k {
        // SAFETY: c + 8 <= k, so every 8-float load stays inside its row of `x` or `w`.
        unsafe {
            let wv: [__m256; NR] = std::array::from_fn(|j| _mm256_loadu_ps(wp.add(j * k + c)));
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(i * k + c));
                for (a, wj) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *wj, *a);
                }
            }
        }
        c += 8;
    }
    let mut out = [[0f32; NR]; MR];
    for i in 0..MR {
        for j in 0..NR {
            let tail: f32 = (c..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
            out[i][j] = hsum(acc[i][j]) + tail;
        }
    }
    out
}
