//! NF4 (QLoRA's 4-bit NormalFloat) blockwise quantization, bit-compatible with bitsandbytes.
//!
//! What is followed, and where it comes from (bitsandbytes-foundation/bitsandbytes):
//! - the 16 code values: `bitsandbytes/functional.py::get_4bit_type("nf4")`, identical to the
//!   literals of `dDequantizeNF4` in `csrc/kernels.cu`;
//! - value → code: `dQuantizeNF4` in `csrc/kernels.cu` (also `csrc/cuda/blockwise_quantization.cu`),
//!   a comparison tree with strict `>` against 15 f32 thresholds (the midpoints of neighbouring
//!   codes), so a value exactly on a threshold takes the lower code and NaN takes code 0;
//! - blocks: `kQuantizeBlockwise<.., NF4>` — `absmax` = max |v| over `blocksize` consecutive
//!   elements of the row-major flattening (a partial last block uses its valid elements), the value
//!   is scaled by multiplying with the f32 reciprocal `1.0f / absmax` (not by dividing), and two
//!   codes share a byte: the first element in the high nibble, the second in the low nibble; an odd
//!   element count pads the last low nibble with the code of `0.0 * (1/absmax)`;
//! - dequantization: `kDequantizeBlockwise<.., NF4>` — `code[nibble] * absmax` in f32;
//! - double quantization (`quantize_4bit(.., compress_statistics=True)` in `functional.py`):
//!   `offset = absmax.mean()`, then `quantize_blockwise(absmax - offset, blocksize=256)` with the
//!   signed 8-bit dynamic map of `create_dynamic_map(signed=True)`; dequantization is
//!   `nested_code[q] * nested_absmax[b / 256] + offset` (`dequantize_blockwise`, then `+= offset`);
//! - the 8-bit value → code search: `dQuantize<0>` in `csrc/kernels.cu` (a 7-step binary search
//!   over the odd indices, then a midpoint test; a value exactly on a midpoint goes to the even
//!   index);
//! - the dynamic map: `create_dynamic_map` builds its boundaries with `torch.linspace(0.1, 1, n,
//!   dtype=float32)`; PyTorch's CPU linspace kernel (`RangeFactoriesKernel.cpp`) computes
//!   `start + step * i` for the first half and `end - step * (n - 1 - i)` for the second, and the
//!   x86 builds contract each into one fused multiply-add — the map below reproduces the values
//!   torch prints (checked against two published dumps of the table).
//!
//! The CUDA kernels are the reference (they quantized the published QLoRA checkpoints).
//! bitsandbytes' torch-only fallback (`backends/default/ops.py`) picks codes by `argmin |x - code|`
//! after clamping to [-1, 1]; it differs only for values within an ulp of a threshold.
//!
//! Where bitsandbytes itself is not deterministic this module picks one documented behaviour: the
//! double-quantization offset is the f32 mean computed as `(exact-as-possible f64 sum, rounded to
//! f32) / n` (torch's CPU `mean` is `sum / n`; its reduction order only matters when the f32 sum
//! is inexact).

use anyhow::{bail, Result};

/// bitsandbytes' default 4-bit block size.
pub const DEFAULT_BLOCKSIZE: usize = 64;
/// bitsandbytes' block size for the second (8-bit) quantization of the absmax values.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The NF4 code values, index = 4-bit code (bitsandbytes' digits).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// `dQuantizeNF4`'s thresholds in ascending order (f32 literals of csrc/kernels.cu, written here
/// with the kernel's digits so they round to the same f32). The digits are the f64 midpoints of
/// neighbouring codes; four of those midpoints are exact f32 ties, which the decimal literal
/// resolves differently from `midpoint as f32`, so the literal is what counts.
#[allow(clippy::excessive_precision)]
const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// The 4-bit code of a value already scaled into [-1, 1]: `dQuantizeNF4`'s tree (root at the
/// middle threshold, strict `>` at every node).
pub fn quantize_nf4_value(x: f32) -> u8 {
    let t = &NF4_THRESHOLDS;
    // Each level decides one bit, most significant first, like the kernel's nested ifs.
    let mut code = 0usize;
    for bit in [8usize, 4, 2, 1] {
        if x > t[code + bit - 1] {
            code += bit;
        }
    }
    code as u8
}

/// torch.linspace(start, end, steps, dtype=float32) as PyTorch's CPU kernel computes it (with the
/// multiply-add fused, as in its x86 builds).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| match i < halfway {
            true => step.mul_add(i as f32, start),
            false => (-step).mul_add((steps - 1 - i) as f32, end),
        })
        .collect()
}

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: the 256 sorted values of
/// bitsandbytes' signed 8-bit dynamic type (the default `nested_quant_map`).
pub fn dynamic_map() -> [f32; 256] {
    // 10 ** (-(max_exponent_bits - 1) + i) as Python evaluates it, then cast to the tensor's f32.
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, scale) in SCALES.iter().enumerate() {
        let b = linspace_f32(0.1, 1.0, (1 << i) + 1);
        let scale = *scale as f32;
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
        }
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// `dQuantize<0>`: the 8-bit code of a value already scaled into [-1, 1], for a sorted 256-entry
/// map. A binary search over the odd indices (127, ±64, ±32, ... ±2) ends on an even pivot whose
/// neighbours bracket `x`; the midpoint with the neighbour on `x`'s side decides, ties keeping the
/// pivot. NaN ends at code 0.
pub fn quantize_dynamic_value(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut lower_pivot = 0usize;
    let mut upper_pivot = 255usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut step = 64usize;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[255];
    }
    if lower_pivot == 0 {
        lower = code[0];
    }
    let chosen = if x > val {
        match x > (upper + val) * 0.5 {
            true => upper_pivot,
            false => pivot,
        }
    } else {
        match x < (lower + val) * 0.5 {
            true => lower_pivot,
            false => pivot,
        }
    };
    chosen as u8
}

/// Max |v| as the CUDA kernels reduce it (`fmaxf`, so NaN is ignored), starting from 0.
fn block_absmax(block: &[f32]) -> f32 {
    block.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// `quantize_blockwise` with an 8-bit map (`kQuantizeBlockwise<.., General8bit>`): one code per
/// value and one f32 absmax per block of `blocksize` values.
pub fn quantize_blockwise_8bit(
    values: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let blocksize = blocksize.max(1);
    let mut q = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let m = block_absmax(block);
        let r = 1.0f32 / m;
        absmax.push(m);
        q.extend(block.iter().map(|v| quantize_dynamic_value(code, v * r)));
    }
    (q, absmax)
}

/// The per-block scales of a packed weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per block.
    F32(Vec<f32>),
    /// Double quantization: absmax stored as 8-bit codes of `absmax - offset`.
    Nested(NestedAbsmax),
}

/// The second-level state of a double-quantized weight (`QuantState.state2` + `offset`).
#[derive(Clone, Debug, PartialEq)]
pub struct NestedAbsmax {
    /// One 8-bit code per first-level block (`weight.absmax`, uint8).
    pub codes: Vec<u8>,
    /// One f32 absmax per `blocksize` codes (`weight.nested_absmax`).
    pub absmax: Vec<f32>,
    /// The 8-bit map (`weight.nested_quant_map`), 256 values.
    pub code: Box<[f32; 256]>,
    /// `nested_blocksize`.
    pub blocksize: usize,
    /// `nested_offset`: the mean that was subtracted before quantizing.
    pub offset: f32,
}

impl NestedAbsmax {
    /// The f32 absmax of first-level block `b` exactly as bitsandbytes reconstructs it.
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        let q = self.codes[b] as usize;
        self.code[q] * self.absmax[b / self.blocksize] + self.offset
    }
}

/// A weight matrix `[rows, cols]` in NF4: packed codes plus per-block scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Packed {
    pub rows: usize,
    pub cols: usize,
    /// Elements per absmax block, along the row-major flattening.
    pub blocksize: usize,
    /// `ceil(rows * cols / 2)` bytes, high nibble first.
    pub data: Vec<u8>,
    pub absmax: Absmax,
    /// The `quant_map` stored with the weight (always the NF4 code for weights made here; decoding
    /// uses [`NF4_CODE`], as bitsandbytes' kernels do).
    pub quant_map: [f32; 16],
    /// The torch dtype name the weight had when it was quantized (`"float32"`, `"bfloat16"`, ...).
    pub dtype: String,
}

/// A packed weight's `[rows, cols]` and absmax block size, as the device ops (`nf4_device`) and
/// their CUDA launch code (`quant::cuda`) see it.
#[derive(Clone, Copy, Debug)]
pub struct Nf4Shape {
    pub rows: usize,
    pub cols: usize,
    pub blocksize: usize,
}

impl Nf4Shape {
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// Checks the codes and table lengths against the shape.
    pub fn check(&self, codes: usize, tables: usize) -> candle_core::Result<()> {
        if self.blocksize == 0 {
            candle_core::bail!("nf4: block size 0");
        }
        if codes != self.numel().div_ceil(2) {
            candle_core::bail!("nf4: {codes} code bytes for [{}, {}]", self.rows, self.cols);
        }
        if tables != 16 + self.numel().div_ceil(self.blocksize) {
            candle_core::bail!(
                "nf4: table of {tables} values for {} blocks",
                self.numel().div_ceil(self.blocksize)
            );
        }
        Ok(())
    }
}

impl Nf4Packed {
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    pub fn n_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    pub fn is_double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Nested(_))
    }

    /// The f32 absmax of block `b`.
    #[inline]
    pub fn block_scale(&self, b: usize) -> f32 {
        match &self.absmax {
            Absmax::F32(a) => a[b],
            Absmax::Nested(n) => n.get(b),
        }
    }

    /// The f32 absmax of blocks `first..first + out.len()` into `out` (the same values as
    /// [`Self::block_scale`], without a division per block).
    pub fn scales_into(&self, first: usize, out: &mut [f32]) {
        match &self.absmax {
            Absmax::F32(a) => out.copy_from_slice(&a[first..first + out.len()]),
            Absmax::Nested(n) => {
                // Runs of blocks that share one second-level absmax.
                let mut b = first;
                let mut rest = out;
                while !rest.is_empty() {
                    let a2 = n.absmax[b / n.blocksize];
                    let len = (n.blocksize - b % n.blocksize).min(rest.len());
                    let (run, tail) = rest.split_at_mut(len);
                    for (o, q) in run.iter_mut().zip(&n.codes[b..b + len]) {
                        *o = n.code[*q as usize] * a2 + n.offset;
                    }
                    (b, rest) = (b + len, tail);
                }
            }
        }
    }

    /// Every block's f32 absmax (for a double-quantized weight, reconstructed).
    pub fn absmax_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n_blocks()];
        self.scales_into(0, &mut out);
        out
    }

    /// The 4-bit code of flat element `i`.
    #[inline]
    pub fn code_at(&self, i: usize) -> u8 {
        let byte = self.data[i / 2];
        match i % 2 {
            0 => byte >> 4,
            _ => byte & 0x0f,
        }
    }

    /// Dequantizes rows `r0..r0 + out.len() / cols` into `out` (row-major), element by element
    /// (`code * absmax`, bit-identical to bitsandbytes' dequantization). Works for any layout,
    /// including blocks that straddle rows.
    pub fn dequantize_rows_into(&self, r0: usize, out: &mut [f32]) {
        let start = r0 * self.cols;
        let mut b_cur = usize::MAX;
        let mut scale = 0f32;
        for (k, o) in out.iter_mut().enumerate() {
            let i = start + k;
            let b = i / self.blocksize;
            if b != b_cur {
                b_cur = b;
                scale = self.block_scale(b);
            }
            *o = NF4_CODE[self.code_at(i) as usize] * scale;
        }
    }

    /// The whole matrix in f32 (tests and export; the kernels never call this).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_rows_into(0, &mut out);
        out
    }

    /// Bytes this weight keeps resident: packed codes, scales, maps and the offset.
    pub fn resident_bytes(&self) -> usize {
        let scales = match &self.absmax {
            Absmax::F32(a) => a.len() * 4,
            Absmax::Nested(n) => n.codes.len() + n.absmax.len() * 4 + 256 * 4 + 4,
        };
        self.data.len() + scales + 16 * 4
    }

    /// Applies bitsandbytes' double quantization to the f32 absmax (a no-op when already nested).
    pub fn double_quantize(&mut self) {
        let Absmax::F32(a) = &self.absmax else {
            return;
        };
        let offset = mean_f32(a);
        let centred: Vec<f32> = a.iter().map(|v| v - offset).collect();
        let code = Box::new(dynamic_map());
        let (codes, absmax) = quantize_blockwise_8bit(&centred, &code, NESTED_BLOCKSIZE);
        self.absmax = Absmax::Nested(NestedAbsmax {
            codes,
            absmax,
            code,
            blocksize: NESTED_BLOCKSIZE,
            offset,
        });
    }
}

/// The f32 mean: the sum accumulated in f64 (exact for well-scaled inputs), rounded to f32, then
/// divided by the count in f32 like torch's CPU `sum(..) / n`.
fn mean_f32(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let sum: f64 = v.iter().map(|&x| x as f64).sum();
    (sum as f32) / (v.len() as f32)
}

/// Quantizes a row-major `[rows, cols]` f32 matrix to NF4 with one absmax per `blocksize`
/// consecutive elements (bitsandbytes' `quantize_4bit(.., quant_type="nf4")`, no double quant).
pub fn quantize_nf4(
    weight: &[f32],
    rows: usize,
    cols: usize,
    blocksize: usize,
) -> Result<Nf4Packed> {
    if weight.len() != rows * cols {
        bail!(
            "nf4: weight has {} elements, shape [{rows}, {cols}] needs {}",
            weight.len(),
            rows * cols
        );
    }
    if blocksize == 0 || !blocksize.is_multiple_of(2) {
        bail!("nf4: block size {blocksize} must be even and positive");
    }
    // Whole blocks per task (an even number of elements each), so the pieces join into the
    // same bytes as one pass: large weights use every core.
    use rayon::prelude::*;
    let parts: Vec<(Vec<u8>, Vec<f32>)> = weight
        .par_chunks(blocksize * QUANTIZE_TASK_BLOCKS)
        .map(|part| quantize_blocks(part, blocksize))
        .collect();
    let mut data = Vec::with_capacity(weight.len().div_ceil(2));
    let mut absmax = Vec::with_capacity(weight.len().div_ceil(blocksize));
    for (d, a) in parts {
        data.extend(d);
        absmax.extend(a);
    }
    Ok(Nf4Packed {
        rows,
        cols,
        blocksize,
        data,
        absmax: Absmax::F32(absmax),
        quant_map: NF4_CODE,
        dtype: "float32".to_string(),
    })
}

/// Blocks of `blocksize` per parallel task of [`quantize_nf4`].
const QUANTIZE_TASK_BLOCKS: usize = 4096;

/// The codes and absmax of consecutive blocks (the last one may be short).
fn quantize_blocks(weight: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mut data = Vec::with_capacity(weight.len().div_ceil(2));
    let mut absmax = Vec::with_capacity(weight.len().div_ceil(blocksize));
    for block in weight.chunks(blocksize) {
        let m = block_absmax(block);
        let r = 1.0f32 / m;
        absmax.push(m);
        for pair in block.chunks(2) {
            let hi = quantize_nf4_value(pair[0] * r);
            // The kernel loads a missing element as 0.0 and scales it like the others.
            let lo = quantize_nf4_value(pair.get(1).copied().unwrap_or(0.0) * r);
            data.push((hi << 4) | lo);
        }
    }
    (data, absmax)
}

/// [`quantize_nf4`] followed by bitsandbytes' double quantization of the absmax
/// (`compress_statistics=True`, QLoRA's `--double-quant`).
pub fn quantize_nf4_double(
    weight: &[f32],
    rows: usize,
    cols: usize,
    blocksize: usize,
) -> Result<Nf4Packed> {
    let mut p = quantize_nf4(weight, rows, cols, blocksize)?;
    p.double_quantize();
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_is_monotone_and_hits_every_code() {
        let mut last = 0u8;
        for i in -1000..=1000 {
            let c = quantize_nf4_value(i as f32 / 1000.0);
            assert!(c >= last);
            last = c;
        }
        for (i, v) in NF4_CODE.iter().enumerate() {
            assert_eq!(quantize_nf4_value(*v) as usize, i);
        }
        assert_eq!(quantize_nf4_value(f32::NAN), 0);
        assert_eq!(quantize_nf4_value(0.0), 7);
    }

    #[test]
    fn on_a_threshold_takes_the_lower_code() {
        for (i, t) in NF4_THRESHOLDS.iter().enumerate() {
            assert_eq!(quantize_nf4_value(*t) as usize, i);
            assert_eq!(quantize_nf4_value(t.next_up()) as usize, i + 1);
        }
    }

    #[test]
    fn dynamic_map_is_sorted_and_spans_the_range() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(m[255], 1.0);
        assert_eq!(m[127], 0.0);
        for (i, v) in m.iter().enumerate() {
            assert_eq!(quantize_dynamic_value(&m, *v) as usize, i, "value {v}");
        }
        assert_eq!(quantize_dynamic_value(&m, -1.0), 0);
        assert_eq!(quantize_dynamic_value(&m, 1.5), 255);
    }

    #[test]
    fn odd_length_pads_the_low_nibble() {
        let p = quantize_nf4(&[1.0, -1.0, 0.5], 1, 3, 64).unwrap();
        assert_eq!(p.data.len(), 2);
        assert_eq!(p.data[1] & 0x0f, 7);
        assert_eq!(p.dequantize().len(), 3);
    }

    #[test]
    fn zero_block_is_code_zero_and_dequantizes_to_zero() {
        let p = quantize_nf4(&[0.0; 64], 1, 64, 64).unwrap();
        assert!(p.data.iter().all(|&b| b == 0));
        assert!(p.dequantize().iter().all(|v| *v == 0.0));
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(quantize_nf4(&[0.0; 6], 2, 2, 64).is_err());
        assert!(quantize_nf4(&[0.0; 4], 2, 2, 0).is_err());
        assert!(quantize_nf4(&[0.0; 4], 2, 2, 3).is_err());
    }
}
