//! AVX2 integer inner loop of the NF4 decode kernel (`decode`): NF4 codes are looked up in an
//! int16 codebook (`round(code * CODE_SCALE)`, split into a low-byte and a high-byte table for two
//! `vpshufb`s), multiplied with int16 activations by `vpmaddwd` and summed in int32 over one
//! unit of 64 weights; each unit's sum is then scaled by `absmax * x_scale` into an f32
//! accumulator. 64 weights cost one 32-byte load, one shift, four lookups and four unpacks, all
//! inside 128-bit lanes (no cross-lane permutes, which are slow on AMD cores).
//!
//! Element order: a unit's 32 packed bytes are loaded as they are, so lane 0 holds elements
//! 0..32 and lane 1 elements 32..64; the high nibbles (even elements) and the low nibbles (odd
//! elements) are looked up separately and widened by `unpacklo/hi_epi8`, which gives four vectors
//! of 16 int16 weights in the order of `decode::slot`. The activations are stored in that order
//! once per matmul (`quantize_unit`), so the inner loop needs no shuffles for them.
//!
//! Weight rows are read two at a time for a single input row (sharing its loads), with a
//! software prefetch [`PREFETCH`] bytes ahead.
//!
//! Overflow: `vpmaddwd` adds two products of at most 14640 · 16383 each (code · input), and a
//! unit adds four such vectors, so an int32 lane holds at most 8 · 14640 · 16383 = 1 918 740 960
//! < 2³¹ − 1 before it is converted to f32 at the end of every unit.

#![deny(unsafe_op_in_unsafe_fn)]

use super::int16::{Chunk, CODE_SCALE};
use super::nf4::NF4_CODE;
use super::simd::hsum;

use std::arch::x86_64::*;

/// Weights per unit (the span of one int32 accumulation).
const UNIT: usize = 64;
/// How far ahead of the rows being read the kernel prefetches weights, in bytes (measured with
/// `benches/nf4.rs`: 2-4 KiB ahead take a whole-model pass from 6.6 to 5.1 ms on a Zen 3 core).
const PREFETCH: usize = 2048;

/// `round(NF4_CODE[i] * CODE_SCALE)` (half away from zero, like `f64::round`).
const CODE_I16: [i16; 16] = {
    let mut t = [0i16; 16];
    let mut i = 0;
    while i < 16 {
        let v = NF4_CODE[i] as f64 * CODE_SCALE;
        t[i] = if v >= 0.0 {
            (v + 0.5) as i16
        } else {
            (v - 0.5) as i16
        };
        i += 1;
    }
    t
};

/// Byte `k` (0: low, 1: high) of each int16 code, repeated in both 128-bit lanes.
const CODE_BYTES: [[u8; 32]; 2] = {
    let mut t = [[0u8; 32]; 2];
    let mut i = 0;
    while i < 32 {
        let b = CODE_I16[i % 16].to_le_bytes();
        t[0][i] = b[0];
        t[1][i] = b[1];
        i += 1;
    }
    t
};

/// The lookup tables in registers.
#[derive(Copy, Clone)]
struct Tables {
    lo: __m256i,
    hi: __m256i,
    nibble: __m256i,
}

impl Tables {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn new() -> Self {
        // SAFETY: each table is 32 bytes, the size of the unaligned load.
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_si256(CODE_BYTES[0].as_ptr().cast()),
                _mm256_loadu_si256(CODE_BYTES[1].as_ptr().cast()),
            )
        };
        Self {
            lo,
            hi,
            nibble: _mm256_set1_epi8(0x0f),
        }
    }

    /// The 64 int16 weights of 32 packed bytes (high nibble first), in the order of
    /// `decode::slot`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn decode(self, v: __m256i) -> [__m256i; 4] {
        let even = _mm256_and_si256(_mm256_srli_epi16::<4>(v), self.nibble);
        let odd = _mm256_and_si256(v, self.nibble);
        let (el, eh) = (
            _mm256_shuffle_epi8(self.lo, even),
            _mm256_shuffle_epi8(self.hi, even),
        );
        let (ol, oh) = (
            _mm256_shuffle_epi8(self.lo, odd),
            _mm256_shuffle_epi8(self.hi, odd),
        );
        [
            _mm256_unpacklo_epi8(el, eh),
            _mm256_unpackhi_epi8(el, eh),
            _mm256_unpacklo_epi8(ol, oh),
            _mm256_unpackhi_epi8(ol, oh),
        ]
    }
}

/// A unit's four chunks of int16 inputs.
///
/// # Safety
/// AVX2 available; `x` points at 4 readable chunks.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_chunks(x: *const Chunk) -> [__m256i; 4] {
    // SAFETY: the caller guarantees four chunks at `x`; `Chunk` is 32-byte aligned.
    unsafe {
        [
            _mm256_load_si256(x.cast()),
            _mm256_load_si256(x.add(1).cast()),
            _mm256_load_si256(x.add(2).cast()),
            _mm256_load_si256(x.add(3).cast()),
        ]
    }
}

/// The int32 sums of one unit's products: `x` points at its four chunks (8 products a lane).
///
/// # Safety
/// AVX2+FMA available; `x` points at 4 readable chunks.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn unit_sum(w: &[__m256i; 4], x: *const Chunk) -> __m256i {
    // SAFETY: the caller guarantees four chunks at `x`.
    let p = unsafe { load_chunks(x) };
    _mm256_add_epi32(
        _mm256_add_epi32(_mm256_madd_epi16(w[0], p[0]), _mm256_madd_epi16(w[1], p[1])),
        _mm256_add_epi32(_mm256_madd_epi16(w[2], p[2]), _mm256_madd_epi16(w[3], p[3])),
    )
}

/// `unit_sum` with AVX-512 VNNI: `vpdpwssd` adds each pair of int16 products into the int32
/// lanes in one instruction; the same integers (no sum can overflow, see the module doc).
///
/// # Safety
/// AVX2, AVX-512VL and AVX-512 VNNI available; `x` points at 4 readable chunks.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
unsafe fn unit_sum_vnni(w: &[__m256i; 4], x: *const Chunk) -> __m256i {
    // SAFETY: the caller guarantees four chunks at `x`.
    let p = unsafe { load_chunks(x) };
    let s = _mm256_dpwssd_epi32(_mm256_setzero_si256(), w[0], p[0]);
    let s = _mm256_dpwssd_epi32(s, w[1], p[1]);
    let s = _mm256_dpwssd_epi32(s, w[2], p[2]);
    _mm256_dpwssd_epi32(s, w[3], p[3])
}

/// Where the kernel finds each unit's weight scale.
#[derive(Copy, Clone)]
pub(crate) enum Scales<'a> {
    /// Per row, one f32 scale per unit (per half unit with `SPLIT`, `2 * units` a row, the second
    /// half of a last, 32-weight unit being a padding 0).
    Dense(&'a [f32]),
    /// 64-weight blocks with double-quantized absmax (one block per unit): block `k` of these
    /// rows (`first + k` of the weight) has the scale
    /// `luts[((first + k) >> shift) - (first >> shift)) * 256 + codes[k]]`, each 256-entry table
    /// holding one nested block's `code * nested_absmax + offset`.
    Nested {
        codes: &'a [u8],
        luts: &'a [f32],
        first: usize,
        shift: u32,
    },
}

/// Defines the kernel `$name` on the target features `$features`, with `$unit_sum` for a
/// unit's integer sums: the same code and the same results on two instruction sets.
macro_rules! dot_rows_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, $unit_sum:ident) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name<
            const G: usize,
            const R: usize,
            const SPLIT: bool,
            const NESTED: bool,
        >(
            packed: &[u8],
            cols: usize,
            scales: Scales<'_>,
            x: &[Chunk],
            xs: &[f32],
            out: &mut [f32],
            stride: usize,
        ) {
            let t = Tables::new();
            let units = cols.div_ceil(UNIT);
            let full = cols / UNIT;
            let per_row = if SPLIT { 2 * units } else { units };
            let rows = packed.len() * 2 / cols;
            let (dense, codes, luts, first, shift): (&[f32], &[u8], &[f32], usize, u32) = match scales {
                Scales::Dense(d) => (d, &[], &[], 0, 0),
                Scales::Nested {
                    codes,
                    luts,
                    first,
                    shift,
                } => (&[], codes, luts, first, shift),
            };
            let run0 = first >> shift;
            let (xp, xsp) = (x.as_ptr(), xs.as_ptr());
            let zero = _mm256_setzero_si256();
            let mut r = 0;
            while r + R <= rows {
                let mut row = [packed.as_ptr(); R];
                for (i, p) in row.iter_mut().enumerate() {
                    *p = packed[(r + i) * cols / 2..].as_ptr();
                }
                let mut acc = [[_mm256_setzero_ps(); R]; G];
                for u in 0..units {
                    // The R rows are contiguous and each unit takes 32 bytes of each, so prefetching
                    // 32 * R bytes a unit, PREFETCH bytes ahead, keeps the stream in flight (it can
                    // point past `packed`: a prefetch never faults).
                    _mm_prefetch::<_MM_HINT_T0>(row[0].wrapping_add(32 * R * u + PREFETCH).cast());
                    let mut w = [[zero; 4]; R];
                    let mut ws = [_mm256_setzero_ps(); R];
                    for i in 0..R {
                        // SAFETY: unit u < full has 32 bytes at row + 32u inside row r + i of `packed`;
                        // a last, half unit (u == full, SPLIT only) has the row's last 16 bytes.
                        let v = unsafe {
                            match !SPLIT || u < full {
                                true => _mm256_loadu_si256(row[i].add(32 * u).cast()),
                                false => _mm256_zextsi128_si256(_mm_loadu_si128(row[i].add(32 * u).cast())),
                            }
                        };
                        w[i] = t.decode(v);
                        let k = (r + i) * per_row + u;
                        ws[i] = if NESTED {
                            // SAFETY: k < rows * units == codes.len(), and the table index is inside
                            // `luts` (caller's contract).
                            unsafe {
                                let code = *codes.get_unchecked(k) as usize;
                                let lut = (((first + k) >> shift) - run0) << 8;
                                _mm256_broadcast_ss(luts.get_unchecked(lut | code))
                            }
                        } else if SPLIT {
                            let (a, b) = (
                                dense[(r + i) * per_row + 2 * u],
                                dense[(r + i) * per_row + 2 * u + 1],
                            );
                            _mm256_setr_m128(_mm_set1_ps(a), _mm_set1_ps(b))
                        } else {
                            _mm256_broadcast_ss(&dense[k])
                        };
                    }
                    for (g, ag) in acc.iter_mut().enumerate() {
                        let k = g * units + u;
                        // SAFETY: g < G and u < units, so unit k lies inside `x` and `xs`.
                        let (xk, xsk) = unsafe { (xp.add(4 * k), _mm256_broadcast_ss(&*xsp.add(k))) };
                        for ((a, wi), wsi) in ag.iter_mut().zip(&w).zip(&ws) {
                            // SAFETY: as above, four chunks at `xk`.
                            let s = _mm256_cvtepi32_ps(unsafe { $unit_sum(wi, xk) });
                            // (Multiplying the two broadcast scales first would make LLVM multiply
                            // scalars and broadcast the product: a shuffle-port op per unit.)
                            *a = _mm256_fmadd_ps(_mm256_mul_ps(s, xsk), *wsi, *a);
                        }
                    }
                }
                for (g, ag) in acc.iter().enumerate() {
                    for (i, v) in ag.iter().enumerate() {
                        out[(r + i) * stride + g] = hsum(*v);
                    }
                }
                r += R;
            }
            if r < rows {
                // The last rows when R does not divide them.
                let tail = &packed[r * cols / 2..];
                let o = &mut out[r * stride..];
                let rest = match scales {
                    Scales::Dense(d) => Scales::Dense(&d[r * per_row..]),
                    Scales::Nested {
                        codes,
                        luts,
                        first,
                        shift,
                    } => {
                        // Keep the tables' numbering: they start at the first block's nested block.
                        let skip = (((first + r * units) >> shift) - run0) << 8;
                        Scales::Nested {
                            codes: &codes[r * units..],
                            luts: &luts[skip..],
                            first: first + r * units,
                            shift,
                        }
                    }
                };
                // SAFETY: the same contract, for the remaining rows.
                unsafe { $name::<G, 1, SPLIT, NESTED>(tail, cols, rest, x, xs, o, stride) };
            }
        }
    };
}

dot_rows_kernel!(
    /// `out[r * stride + g] = row_r . x_g` for the packed rows in `packed` (`cols / 2` bytes each)
    /// and `G` prepared input rows, `R` weight rows at a time (sharing the input loads). `x` holds
    /// `G` rows of `units = cols.div_ceil(64)` units (4 chunks each), `xs` their `G * units` scales
    /// (`max|x| / (16383 * CODE_SCALE)` per unit). `SPLIT` is the 32-weight block layout: two scales
    /// a unit, and when `cols % 64 == 32` a last unit of 32 weights whose second half of `x` is
    /// zeros. `NESTED` says which [`Scales`] variant `scales` is.
    ///
    /// # Safety
    /// AVX2+FMA available; `cols > 0` and `cols % 32 == 0`, and `cols % 64 == 0` unless `SPLIT`;
    /// `packed.len() * 2 == rows * cols` for some `rows`; `x.len() >= G * units * 4`;
    /// `xs.len() >= G * units`; `stride >= G` and `out.len() >= (rows - 1) * stride + G` when
    /// `rows > 0`. `NESTED` iff `scales` is `Nested`, and then `!SPLIT`, `codes.len() == rows * units`
    /// and `luts` holds `256 * (((first + rows * units - 1) >> shift) - (first >> shift) + 1)`
    /// values; else `Dense` with `rows * units` values (`2 * rows * units` with `SPLIT`).
    dot_rows,
    "avx2,fma",
    unit_sum
);

dot_rows_kernel!(
    /// `dot_rows` with AVX-512 VNNI: `vpdpwssd` multiplies and adds into the int32 sums in one
    /// instruction (`unit_sum_vnni`), the rest as `dot_rows`. Integer sums do not depend on
    /// their order, so the results are bit-identical to `dot_rows`'.
    ///
    /// # Safety
    /// As `dot_rows`, and AVX-512F, AVX-512VL and AVX-512 VNNI available.
    dot_rows_vnni,
    "avx2,fma,avx512f,avx512vl,avx512vnni",
    unit_sum_vnni
);

/// `max(bits(|v|))` over `group` (at most 64 values, a multiple of 8): the bit pattern of
/// max |v| for finite values; at least `0x7f80_0000` when some value is infinite or NaN.
///
/// # Safety
/// AVX2 available; `group.len() % 8 == 0`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn max_abs_bits(group: &[f32]) -> u32 {
    let mask = _mm256_set1_epi32(0x7fff_ffff);
    let mut m = _mm256_setzero_si256();
    for v in group.chunks_exact(8) {
        // SAFETY: `v` holds 8 floats.
        let bits = unsafe { _mm256_loadu_si256(v.as_ptr().cast()) };
        m = _mm256_max_epu32(m, _mm256_and_si256(bits, mask));
    }
    let m = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256::<1>(m));
    let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
    let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
    _mm_cvtsi128_si32(m) as u32
}

/// Quantizes one unit of inputs (`group`: 64 values, or 32 for a half unit whose other half is
/// zeros) to `round(x * inv)` (ties to even) into `dst` in the kernel's order (`decode::slot`).
///
/// # Safety
/// AVX2 available; `group.len()` is 32 or 64; `|x * inv| <= 16383.5` for every value.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize_unit(group: &[f32], inv: f32, dst: &mut [Chunk; 4]) {
    let scale = _mm256_set1_ps(inv);
    let mut v = [_mm256_setzero_si256(); 8];
    for (k, x) in group.chunks_exact(8).enumerate().take(8) {
        // SAFETY: `x` holds 8 floats.
        let x = unsafe { _mm256_loadu_ps(x.as_ptr()) };
        v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(x, scale));
    }
    // Per 16 values: pack to int16 (lane 0: values 0-3, 8-11; lane 1: 4-7, 12-15), move the even
    // values of each lane to its first 8 bytes, then gather the dwords so that lane 0 holds the
    // 8 even values in order and lane 1 the 8 odd ones.
    let evens_first = _mm256_setr_epi8(
        0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7,
        10, 11, 14, 15,
    );
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut h = [_mm256_setzero_si256(); 4];
    for (k, hk) in h.iter_mut().enumerate() {
        let p = _mm256_packs_epi32(v[2 * k], v[2 * k + 1]);
        *hk = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(p, evens_first), order);
    }
    // Chunk 2 * parity + half holds, in lane l, the values of parity `parity` of 16-value group
    // 2l + half.
    let c = [
        _mm256_permute2x128_si256::<0x20>(h[0], h[2]),
        _mm256_permute2x128_si256::<0x20>(h[1], h[3]),
        _mm256_permute2x128_si256::<0x31>(h[0], h[2]),
        _mm256_permute2x128_si256::<0x31>(h[1], h[3]),
    ];
    for (d, v) in dst.iter_mut().zip(c) {
        // SAFETY: a chunk is 32 aligned bytes.
        unsafe { _mm256_store_si256((d as *mut Chunk).cast(), v) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codebook_is_rounded_and_in_range() {
        for (c, q) in NF4_CODE.iter().zip(CODE_I16) {
            assert_eq!(q as f64, (*c as f64 * CODE_SCALE).round());
            // Every code within 7.1e-5 of its own value.
            let v = *c as f64 * CODE_SCALE;
            assert!((q as f64 - v).abs() <= 7.1e-5 * v.abs());
        }
        assert_eq!((CODE_I16[0], CODE_I16[7], CODE_I16[15]), (-14640, 0, 14640));
        // The worst int32 lane of a unit.
        assert!(8 * 14640i64 * 16383 < i32::MAX as i64);
    }
}
