//! The NF4 row kernel of the inference fast path (`model::fast`): dot products of a range of
//! packed weight rows with a few prepared input rows, written straight into the caller's output
//! layout (`out[(r - r0) * stride + g]`), so that the fast path can split a projection's rows
//! across threads and add biases and LoRA deltas in the same pass, as it does for f32 weights.
//!
//! Inputs are prepared once per matmul (`Nf4Input::new`) and shared by every row range.
//!
//! With AVX2+FMA and the usual layout (block size a multiple of 32 that divides the row length)
//! the dot products are integer ones, like llama.cpp's IQ4_NL but with 16-bit precision: each
//! input row is quantized to int16 per unit of 64 features (`q = round(x * 16383 / max|x|)`), the
//! NF4 codebook is `round(code * 14640)` ([`CODE_SCALE`]), and `simd_int` sums the int16 products
//! in int32 over each unit before scaling by `absmax * max|x| / (16383 * 14640)` in f32. An input
//! is off by at most half a step of `max|x| / 16383` and every code by at most 7.1e-5 of its own
//! value (14640 is the integer scale up to 16383 with the smallest worst relative rounding error of
//! the 16 codes; 16383 itself leaves 2.2e-4 on the code 0.0796), so a result is within about 1e-4
//! of `sum |W| |x|` of the exact dot product of the dequantized weights (an input whose 64-feature
//! group holds an outlier far above the rest can exceed that: the rest of the group is rounded in
//! the outlier's steps). Other layouts, inputs that are not finite or outside [`GROUP_MAX_RANGE`],
//! and CPUs without AVX2 take the exact f32 kernel (`kernels::fused_rows`).

use super::int16::{Chunk, CODE_SCALE};
use super::kernels::{fused_rows, simd_available, vnni_available};
use super::nf4::{Absmax, Nf4Packed};

/// Features per int16 quantization group (one `x` scale), and weights per int32 accumulation.
const UNIT: usize = 64;
/// Largest int16 magnitude of a quantized input.
const QMAX: f64 = 16383.0;
/// Input rows one pass of the integer kernel serves (each decoded weight unit is reused for all).
#[cfg(target_arch = "x86_64")]
const MAX_G: usize = 16;
/// Weight rows whose absmax are fetched at once.
#[cfg(target_arch = "x86_64")]
const ROW_BATCH: usize = 64;
/// Group maxima outside this range (other than 0) send the input to the exact kernel: their
/// scales would leave f32's normal range.
const GROUP_MAX_RANGE: std::ops::RangeInclusive<f32> = 1e-20..=1e20;

/// Where element `i` of a 64-feature unit goes: `(chunk, position)`. Lane `l` (positions
/// `8l..8l+8`) of chunk `2 * parity + half` holds elements `32l + 16 half + 2j + parity`, the
/// order in which `simd_int` widens the high (even) and low (odd) nibbles of a unit's 32 bytes.
#[cfg(test)]
pub(crate) const fn slot(i: usize) -> (usize, usize) {
    let (lane, within) = (i / 32, i % 32);
    let (half, rem) = (within / 16, within % 16);
    (2 * (rem % 2) + half, 8 * lane + rem / 2)
}

/// The int16 form of the input rows.
#[derive(Clone, Debug)]
struct Quantized {
    /// Units per row (`cols.div_ceil(64)`; a last unit of 32 features is padded with zeros).
    units: usize,
    /// `n * units * 4` chunks.
    q: Vec<Chunk>,
    /// `n * units` scales: `max|x| / (16383 * CODE_SCALE)` of each unit.
    scale: Vec<f32>,
}

/// Quantizes `x: [n, cols]` (`cols % 32 == 0`) per 64-feature unit; `None` when some value is
/// not finite or some unit's max|x| is outside [`GROUP_MAX_RANGE`]. Needs AVX2.
#[cfg(target_arch = "x86_64")]
fn quantize(x: &[f32], n: usize, cols: usize) -> Option<Quantized> {
    use super::simd_int::{max_abs_bits, quantize_unit};
    if !simd_available() || !cols.is_multiple_of(32) || n.checked_mul(cols) != Some(x.len()) {
        return None;
    }
    let units = cols.div_ceil(UNIT);
    let mut q = vec![Chunk::default(); n * units * 4];
    let mut scale = vec![0f32; n * units];
    for (g, row) in x.chunks_exact(cols).enumerate() {
        for (u, group) in row.chunks(UNIT).enumerate() {
            // SAFETY: AVX2 was detected; `group` holds 64 values, or 32 at the end of a row
            // (`cols % 32 == 0`).
            let m = f32::from_bits(unsafe { max_abs_bits(group) });
            if !m.is_finite() {
                return None;
            }
            if m == 0.0 {
                continue;
            }
            if !GROUP_MAX_RANGE.contains(&m) {
                return None;
            }
            let i = g * units + u;
            // |x * inv| <= 16383 * (1 + 2^-23): rounds to at most 16383.
            let inv = (QMAX / m as f64) as f32;
            let dst: &mut [Chunk; 4] = (&mut q[4 * i..4 * i + 4]).try_into().ok()?;
            // SAFETY: as above, and |x| <= m.
            unsafe { quantize_unit(group, inv, dst) };
            scale[i] = (m as f64 / (QMAX * CODE_SCALE)) as f32;
        }
    }
    Some(Quantized { units, q, scale })
}

#[cfg(not(target_arch = "x86_64"))]
fn quantize(_x: &[f32], _n: usize, _cols: usize) -> Option<Quantized> {
    None
}

/// Input rows prepared for [`dot_rows_into`]: `n` rows of `cols` features.
#[derive(Clone, Debug)]
pub struct Nf4Input {
    x: Vec<f32>,
    n: usize,
    cols: usize,
    /// The integer kernel's form, when this CPU and these values allow it.
    q: Option<Quantized>,
    /// Whether the integer kernel may use AVX-512 VNNI (same results, fewer instructions).
    vnni: bool,
}

impl Nf4Input {
    /// `x: [n, cols]` row-major. A length other than `n * cols` is reported by [`dot_rows_into`].
    pub fn new(x: &[f32], n: usize, cols: usize) -> Self {
        let q = match n > 0 && cols > 0 {
            true => quantize(x, n, cols),
            false => None,
        };
        Self {
            x: x.to_vec(),
            n,
            cols,
            q,
            vnni: vnni_available(),
        }
    }

    /// With `false`, the integer kernel keeps to AVX2 even where the CPU has AVX-512 VNNI (to
    /// compare the two, or under a cap on the instruction set); `true` changes nothing.
    pub fn with_vnni(mut self, allowed: bool) -> Self {
        self.vnni &= allowed;
        self
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// The packed data and scales cover `rows * cols` elements (the fields are public, so a weight
/// built by hand may not).
fn check_layout(w: &Nf4Packed) -> candle_core::Result<()> {
    let bad = |what: &str| {
        candle_core::bail!(
            "nf4 rows: inconsistent [{}, {}] weight (block size {}): {what}",
            w.rows,
            w.cols,
            w.blocksize
        )
    };
    if w.blocksize == 0 {
        return bad("zero block size");
    }
    let numel = w.rows.checked_mul(w.cols);
    let Some(numel) = numel else {
        return bad("element count overflows");
    };
    if w.data.len() < numel.div_ceil(2) {
        return bad("packed data too short");
    }
    let blocks = numel.div_ceil(w.blocksize);
    let ok = match &w.absmax {
        Absmax::F32(a) => a.len() >= blocks,
        Absmax::Nested(nst) => {
            nst.blocksize > 0
                && nst.codes.len() >= blocks
                && nst.absmax.len() >= blocks.div_ceil(nst.blocksize)
        }
    };
    match ok {
        true => Ok(()),
        false => bad("too few scales"),
    }
}

/// `out[(r - r0) * stride + g] = W[r] . x[g]` for weight rows `r0..r1` and input rows
/// `g < input.rows()`. Errors (instead of panicking) on mismatched sizes.
pub fn dot_rows_into(
    w: &Nf4Packed,
    r0: usize,
    r1: usize,
    input: &Nf4Input,
    out: &mut [f32],
    stride: usize,
) -> candle_core::Result<()> {
    let n = input.n;
    if input.cols != w.cols || r0 > r1 || r1 > w.rows || stride < n {
        candle_core::bail!(
            "nf4 rows: rows {r0}..{r1} of a [{}, {}] weight with {n} inputs of {} features",
            w.rows,
            w.cols,
            input.cols
        );
    }
    if n.checked_mul(input.cols) != Some(input.x.len()) {
        candle_core::bail!(
            "nf4 rows: input has {} values, {n} rows of {} features need {}",
            input.x.len(),
            input.cols,
            n.saturating_mul(input.cols)
        );
    }
    let needed = (r1 - r0)
        .checked_sub(1)
        .map(|rows| rows.checked_mul(stride).and_then(|v| v.checked_add(n)));
    if matches!(needed, Some(None)) || matches!(needed, Some(Some(k)) if out.len() < k) {
        candle_core::bail!("nf4 rows: output of {} values is too small", out.len());
    }
    check_layout(w)?;
    if n == 0 || r1 == r0 {
        return Ok(());
    }
    if w.cols == 0 {
        for i in 0..r1 - r0 {
            out[i * stride..i * stride + n].fill(0.0);
        }
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(q) = &input.q {
        let bs = w.blocksize;
        // (`int_rows` declines only if its own checks find a broken invariant.)
        if bs.is_multiple_of(32)
            && w.cols.is_multiple_of(bs)
            && simd_available()
            && int_rows(w, r0, r1, q, n, out, stride, input.vnni)
        {
            return Ok(());
        }
    }
    let part = fused_rows(w, &input.x, n, r0, r1, simd_available());
    for (i, vals) in part.chunks(n).enumerate() {
        out[i * stride..i * stride + n].copy_from_slice(vals);
    }
    Ok(())
}

/// The integer kernel over rows `r0..r1`, [`ROW_BATCH`] rows at a time, input rows taken
/// [`MAX_G`] at a time. Sizes were checked by [`dot_rows_into`]; the layout is aligned
/// (`bs % 32 == 0`, `cols % bs == 0`, `cols > 0`) and AVX2+FMA are available. Returns false if a
/// kernel call's arguments fail its contract (which these checks rule out); the caller then
/// recomputes every row with the exact kernel.
///
/// Weight scales: with 64-weight blocks the kernel reads f32 absmax in place, and looks
/// double-quantized ones up in tables of `code * nested_absmax + offset` built here per nested
/// block (the values [`Nf4Packed::scales_into`] gives, at a fraction of its cost); other block
/// sizes get a per-unit copy.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn int_rows(
    w: &Nf4Packed,
    r0: usize,
    r1: usize,
    q: &Quantized,
    n: usize,
    out: &mut [f32],
    stride: usize,
    vnni: bool,
) -> bool {
    use super::simd_int::Scales;
    let (cols, bs) = (w.cols, w.blocksize);
    let per_row = cols / bs;
    let split = bs == 32;
    let units = q.units;
    // Weight scales per unit (per half unit with 32-weight blocks), as `simd_int` wants them.
    let unit_scales = if split { 2 * units } else { units };
    let (mut abs, mut expanded, mut luts) = (Vec::new(), Vec::new(), Vec::new());
    for b0 in (r0..r1).step_by(ROW_BATCH) {
        let b1 = (b0 + ROW_BATCH).min(r1);
        let (f0, f1) = (b0 * per_row, b1 * per_row);
        let scales = match &w.absmax {
            Absmax::F32(a) if bs == UNIT => Scales::Dense(&a[f0..f1]),
            Absmax::Nested(nst) if bs == UNIT && nst.blocksize.is_power_of_two() => {
                let shift = nst.blocksize.trailing_zeros();
                let (run0, run1) = (f0 >> shift, (f1 - 1) >> shift);
                luts.resize((run1 - run0 + 1) * 256, 0f32);
                for (lut, a2) in luts.chunks_exact_mut(256).zip(&nst.absmax[run0..=run1]) {
                    for (l, c) in lut.iter_mut().zip(nst.code.iter()) {
                        *l = c * a2 + nst.offset;
                    }
                }
                Scales::Nested {
                    codes: &nst.codes[f0..f1],
                    luts: &luts,
                    first: f0,
                    shift,
                }
            }
            _ => {
                abs.resize(f1 - f0, 0f32);
                w.scales_into(f0, &mut abs);
                // Blocks of 128+ weights: each block's scale repeated for its units; 32-weight
                // blocks with a half last unit: a zero scale for the missing half.
                let per_block = if split { 1 } else { bs / UNIT };
                expanded.resize((b1 - b0) * unit_scales, 0f32);
                for (d, a) in expanded
                    .chunks_exact_mut(unit_scales)
                    .zip(abs.chunks_exact(per_row))
                {
                    d.fill(0.0);
                    for (chunk, s) in d.chunks_mut(per_block).zip(a) {
                        chunk.fill(*s);
                    }
                }
                Scales::Dense(&expanded)
            }
        };
        let packed = &w.data[b0 * cols / 2..b1 * cols / 2];
        let dst = &mut out[(b0 - r0) * stride..];
        for g0 in (0..n).step_by(MAX_G) {
            let g = (n - g0).min(MAX_G);
            let chunks_per_row = units * 4;
            let args = IntArgs {
                packed,
                cols,
                scales,
                x: &q.q[g0 * chunks_per_row..(g0 + g) * chunks_per_row],
                xs: &q.scale[g0 * units..(g0 + g) * units],
                out: &mut dst[g0..],
                stride,
                split,
                vnni,
            };
            let done = match g {
                1 => args.run::<1>(),
                2 => args.run::<2>(),
                3 => args.run::<3>(),
                4 => args.run::<4>(),
                5 => args.run::<5>(),
                6 => args.run::<6>(),
                7 => args.run::<7>(),
                8 => args.run::<8>(),
                9 => args.run::<9>(),
                10 => args.run::<10>(),
                11 => args.run::<11>(),
                12 => args.run::<12>(),
                13 => args.run::<13>(),
                14 => args.run::<14>(),
                15 => args.run::<15>(),
                _ => args.run::<16>(),
            };
            if !done {
                return false;
            }
        }
    }
    true
}

/// One call of the integer kernel for `G` input rows.
#[cfg(target_arch = "x86_64")]
struct IntArgs<'a> {
    packed: &'a [u8],
    cols: usize,
    scales: super::simd_int::Scales<'a>,
    x: &'a [Chunk],
    xs: &'a [f32],
    out: &'a mut [f32],
    stride: usize,
    split: bool,
    /// Take `dot_rows_vnni` (AVX-512 VNNI was detected).
    vnni: bool,
}

#[cfg(target_arch = "x86_64")]
impl IntArgs<'_> {
    /// Runs the kernel, or returns false when the arguments fail its contract.
    fn run<const G: usize>(self) -> bool {
        use super::simd_int::{dot_rows, dot_rows_vnni, Scales};
        let Self {
            packed,
            cols,
            scales,
            x,
            xs,
            out,
            stride,
            split,
            vnni,
        } = self;
        let units = cols.div_ceil(UNIT);
        let rows = packed.len() * 2 / cols.max(1);
        let scales_ok = match scales {
            Scales::Dense(d) => d.len() == rows * units * if split { 2 } else { 1 },
            Scales::Nested {
                codes,
                luts,
                first,
                shift,
            } => {
                let runs = match rows * units {
                    0 => 0,
                    k => ((first + k - 1) >> shift) - (first >> shift) + 1,
                };
                !split && codes.len() == rows * units && luts.len() >= runs * 256
            }
        };
        let ok = simd_available()
            && (!vnni || vnni_available())
            && cols > 0
            && cols.is_multiple_of(32)
            && (split || cols.is_multiple_of(UNIT))
            && packed.len() * 2 == rows * cols
            && scales_ok
            && x.len() >= G * units * 4
            && xs.len() >= G * units
            && stride >= G
            && (rows == 0 || out.len() >= (rows - 1) * stride + G);
        if !ok {
            // Unreachable from `dot_rows_into`, whose checks imply the contract; kept so that a
            // broken invariant can never reach the unsafe kernel.
            return false;
        }
        let nested = matches!(scales, Scales::Nested { .. });
        // One input row leaves VNNI's dependent chain of 4 multiply-adds per unit exposed (3-4%
        // slower there in `benches/nf4.rs`); with more, it saves 2-10%.
        let vnni = vnni && G > 1;
        macro_rules! call {
            ($r:literal, $s:literal, $n:literal) => {
                match vnni {
                    true => {
                        dot_rows_vnni::<G, $r, $s, $n>(packed, cols, scales, x, xs, out, stride)
                    }
                    false => dot_rows::<G, $r, $s, $n>(packed, cols, scales, x, xs, out, stride),
                }
            };
        }
        // SAFETY: AVX2 and FMA were detected (and AVX-512 VNNI for `dot_rows_vnni`), and every
        // condition of `dot_rows`' contract was checked just above.
        unsafe {
            // One input row: two weight rows at a time (their input loads shared) are about 10%
            // faster; with more input rows one at a time is (fewer live registers).
            match (G == 1, split, nested) {
                (true, true, _) => call!(2, true, false),
                (true, false, true) => call!(2, false, true),
                (true, false, false) => call!(2, false, false),
                (false, true, _) => call!(1, true, false),
                (false, false, true) => call!(1, false, true),
                (false, false, false) => call!(1, false, false),
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn quantize_unit_stores_each_value_at_its_slot() {
        if !simd_available() {
            return;
        }
        for len in [32, 64] {
            let x: Vec<f32> = (0..len)
                .map(|i| (i + 1) as f32 * if i % 3 == 0 { -1.0 } else { 1.0 })
                .collect();
            let mut dst = [Chunk::default(); 4];
            // SAFETY: AVX2 detected; 32 or 64 values, |x * 1| <= 64.
            unsafe { super::super::simd_int::quantize_unit(&x, 1.0, &mut dst) };
            for i in 0..64 {
                let (c, p) = slot(i);
                let want = x.get(i).map_or(0, |v| *v as i16);
                assert_eq!(dst[c].0[p], want, "len {len}, element {i}");
            }
        }
    }

    #[test]
    fn slot_is_a_permutation() {
        let mut seen = [[false; 16]; 4];
        for i in 0..64 {
            let (c, p) = slot(i);
            assert!(!seen[c][p], "element {i}");
            seen[c][p] = true;
        }
        // Elements 0..32 stay in lane 0.
        assert!((0..32).all(|i| slot(i).1 < 8));
    }
}
