//! NF4 matmul kernels as a candle custom op: `y = x W^T` with `W` kept packed.
//!
//! Two paths, neither of which materialises the whole dequantized weight:
//! - **fused** (few input rows, i.e. decode): each output row's packed bytes are decoded 16 codes
//!   at a time and multiplied straight into the dot products of up to four input rows, block by
//!   block (`sum(code * x)` per block, times the block's absmax). AVX2+FMA when the CPU has them
//!   (runtime detection), a scalar loop otherwise; output rows are split across rayon's threads.
//! - **tiled** (many input rows: prefill, big batches): a tile of weight rows is dequantized into a
//!   scratch buffer (bit-identical to bitsandbytes' dequantization, in parallel) and multiplied with
//!   candle's gemm; tiles are visited one after another.
//!
//! The backward pass returns the input gradient only (`grad_x = grad_y W`, tile by tile): the
//! quantized base is frozen, as in QLoRA.

use super::nf4::{Nf4Packed, NF4_CODE};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Inputs with at most this many rows take the fused path (measured with `benches/nf4.rs`).
pub const FUSED_MAX_ROWS: usize = 8;

/// Which kernel computes `x W^T` (tests and benchmarks pin one; the model uses `Auto`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Fused for `n <= FUSED_MAX_ROWS`, tiled above.
    Auto,
    /// Fused, with AVX2 when the CPU has it.
    Fused,
    /// Fused, scalar code only.
    FusedScalar,
    /// Dequantize tiles into scratch + gemm.
    Tiled,
}

/// Whether this CPU runs the AVX2+FMA kernels.
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

/// Blocks lie inside rows and hold whole 16-code groups: the layout the fast kernels need.
fn aligned(w: &Nf4Packed) -> bool {
    w.blocksize % 16 == 0 && w.cols % w.blocksize == 0
}

/// The absmax of every block of row `r` (aligned layout).
fn row_scales(w: &Nf4Packed, r: usize, out: &mut Vec<f32>) {
    let per_row = w.cols / w.blocksize;
    out.clear();
    out.extend((r * per_row..(r + 1) * per_row).map(|b| w.block_scale(b)));
}

/// `x: [n, cols]` row-major → `y: [n, rows]` row-major.
pub fn matmul(w: &Nf4Packed, x: &[f32], n: usize, path: KernelPath) -> candle_core::Result<Vec<f32>> {
    if x.len() != n * w.cols {
        candle_core::bail!(
            "nf4 matmul: input has {} values, {n} rows of {} features need {}",
            x.len(),
            w.cols,
            n * w.cols
        );
    }
    let path = match path {
        KernelPath::Auto if n <= FUSED_MAX_ROWS => KernelPath::Fused,
        KernelPath::Auto => KernelPath::Tiled,
        p => p,
    };
    match path {
        KernelPath::Tiled => tiled(w, x, n),
        KernelPath::FusedScalar => Ok(fused(w, x, n, false)),
        _ => Ok(fused(w, x, n, simd_available())),
    }
}

/// The fused path: output rows split into one chunk per rayon thread.
fn fused(w: &Nf4Packed, x: &[f32], n: usize, simd: bool) -> Vec<f32> {
    let rows = w.rows;
    let mut y = vec![0f32; n * rows];
    if n == 0 || rows == 0 {
        return y;
    }
    let chunk = rows.div_ceil(rayon::current_num_threads().max(1)).max(8);
    // Each chunk fills `[rows_in_chunk][n]`; the scatter into `[n][rows]` is cheap for few rows.
    let parts: Vec<(usize, Vec<f32>)> = (0..rows)
        .step_by(chunk)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|r0| {
            let r1 = (r0 + chunk).min(rows);
            (r0, fused_rows(w, x, n, r0, r1, simd))
        })
        .collect();
    for (r0, part) in parts {
        for (i, vals) in part.chunks(n).enumerate() {
            for (k, v) in vals.iter().enumerate() {
                y[k * rows + r0 + i] = *v;
            }
        }
    }
    y
}

/// Output rows `r0..r1` for all `n` input rows, laid out `[r - r0][k]`.
fn fused_rows(w: &Nf4Packed, x: &[f32], n: usize, r0: usize, r1: usize, simd: bool) -> Vec<f32> {
    let cols = w.cols;
    let mut out = vec![0f32; (r1 - r0) * n];
    if !aligned(w) {
        // Any layout: dequantize one row at a time, then plain dots.
        let mut row = vec![0f32; cols];
        for r in r0..r1 {
            w.dequantize_rows_into(r, &mut row);
            for k in 0..n {
                let xk = &x[k * cols..(k + 1) * cols];
                out[(r - r0) * n + k] = row.iter().zip(xk).map(|(a, b)| a * b).sum();
            }
        }
        return out;
    }
    let xs: Vec<&[f32]> = x.chunks(cols).collect();
    let bytes_per_row = cols / 2;
    let mut scales = Vec::with_capacity(cols / w.blocksize);
    for r in r0..r1 {
        row_scales(w, r, &mut scales);
        let packed = &w.data[r * bytes_per_row..(r + 1) * bytes_per_row];
        let dst = &mut out[(r - r0) * n..(r - r0 + 1) * n];
        let mut k = 0;
        while k < n {
            let g = (n - k).min(4);
            let group = &xs[k..k + g];
            let res = &mut dst[k..k + g];
            match g {
                4 => res.copy_from_slice(&dot_row::<4>(packed, &scales, w.blocksize, group, simd)),
                3 => res.copy_from_slice(&dot_row::<3>(packed, &scales, w.blocksize, group, simd)),
                2 => res.copy_from_slice(&dot_row::<2>(packed, &scales, w.blocksize, group, simd)),
                _ => res.copy_from_slice(&dot_row::<1>(packed, &scales, w.blocksize, group, simd)),
            }
            k += g;
        }
    }
    out
}

/// Dot products of one packed row with `G` input rows (aligned layout).
fn dot_row<const G: usize>(
    packed: &[u8],
    scales: &[f32],
    bs: usize,
    xs: &[&[f32]],
    simd: bool,
) -> [f32; G] {
    let xs: [&[f32]; G] = std::array::from_fn(|g| xs[g]);
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when `simd_available()` saw AVX2 and FMA; the layout is
        // aligned (bs % 16 == 0, whole blocks per row), `packed` holds `scales.len() * bs / 2`
        // bytes and every `xs[g]` holds `scales.len() * bs` values, as checked here.
        unsafe {
            assert!(packed.len() * 2 == scales.len() * bs && bs % 16 == 0);
            assert!(xs.iter().all(|x| x.len() == scales.len() * bs));
            return avx2::dot_row::<G>(packed, scales, bs, &xs);
        }
    }
    let _ = simd;
    dot_row_scalar::<G>(packed, scales, bs, &xs)
}

fn dot_row_scalar<const G: usize>(
    packed: &[u8],
    scales: &[f32],
    bs: usize,
    xs: &[&[f32]; G],
) -> [f32; G] {
    let mut tot = [0f32; G];
    for (b, s) in scales.iter().enumerate() {
        let mut acc = [0f32; G];
        let base = b * bs;
        for (j, byte) in packed[base / 2..(base + bs) / 2].iter().enumerate() {
            let hi = NF4_CODE[(byte >> 4) as usize];
            let lo = NF4_CODE[(byte & 0x0f) as usize];
            let c = base + 2 * j;
            for g in 0..G {
                acc[g] += hi * xs[g][c] + lo * xs[g][c + 1];
            }
        }
        for g in 0..G {
            tot[g] += acc[g] * s;
        }
    }
    tot
}

/// Weight rows per tile of the tiled path: about 256 KiB of f32 scratch.
fn tile_rows(cols: usize) -> usize {
    ((1usize << 16) / cols.max(1)).clamp(16, 1024).next_multiple_of(8)
}

/// Dequantizes weight rows `r0..r0 + out.len() / cols` into `out`, split across rayon's threads.
fn dequantize_tile(w: &Nf4Packed, r0: usize, out: &mut [f32], simd: bool) {
    let cols = w.cols;
    let per_task = (out.len() / cols).div_ceil(rayon::current_num_threads().max(1)).max(1);
    out.par_chunks_mut(per_task * cols)
        .enumerate()
        .for_each(|(t, chunk)| {
            let first = r0 + t * per_task;
            if !aligned(w) {
                w.dequantize_rows_into(first, chunk);
                return;
            }
            let mut scales = Vec::with_capacity(cols / w.blocksize);
            for (i, row) in chunk.chunks_mut(cols).enumerate() {
                let r = first + i;
                row_scales(w, r, &mut scales);
                let packed = &w.data[r * cols / 2..(r + 1) * cols / 2];
                dequantize_row(packed, &scales, w.blocksize, row, simd);
            }
        });
}

/// One aligned row: `code * absmax`, exactly as [`Nf4Packed::dequantize_rows_into`].
fn dequantize_row(packed: &[u8], scales: &[f32], bs: usize, out: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2/FMA were detected (`simd`), and the lengths are checked here: `packed` has
        // `scales.len() * bs / 2` bytes, `out` `scales.len() * bs` values, bs % 16 == 0.
        unsafe {
            assert!(packed.len() * 2 == scales.len() * bs && out.len() == packed.len() * 2);
            assert!(bs % 16 == 0);
            return avx2::dequantize_row(packed, scales, bs, out);
        }
    }
    let _ = simd;
    for (b, s) in scales.iter().enumerate() {
        let base = b * bs;
        for (j, byte) in packed[base / 2..(base + bs) / 2].iter().enumerate() {
            out[base + 2 * j] = NF4_CODE[(byte >> 4) as usize] * s;
            out[base + 2 * j + 1] = NF4_CODE[(byte & 0x0f) as usize] * s;
        }
    }
}

/// The tiled path: per tile, dequantize into scratch and run candle's gemm on it.
fn tiled(w: &Nf4Packed, x: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
    let (rows, cols) = (w.rows, w.cols);
    let mut y = vec![0f32; n * rows];
    if n == 0 || rows == 0 {
        return Ok(y);
    }
    let simd = simd_available();
    let xt = Tensor::from_slice(x, (n, cols), &Device::Cpu)?;
    let tile = tile_rows(cols);
    for r0 in (0..rows).step_by(tile) {
        let t = tile.min(rows - r0);
        let mut scratch = vec![0f32; t * cols];
        dequantize_tile(w, r0, &mut scratch, simd);
        let wt = Tensor::from_vec(scratch, (t, cols), &Device::Cpu)?;
        let yt = xt.matmul(&wt.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        for k in 0..n {
            y[k * rows + r0..k * rows + r0 + t].copy_from_slice(&yt[k * t..(k + 1) * t]);
        }
    }
    Ok(y)
}

/// `grad_x = grad_y W` for `grad_y: [n, rows]`, one dequantized tile of `W` at a time.
pub fn grad_input(w: &Nf4Packed, grad_y: &Tensor) -> candle_core::Result<Tensor> {
    let (n, rows) = grad_y.dims2()?;
    if rows != w.rows {
        candle_core::bail!(
            "nf4 backward: gradient has {rows} features, the weight has {} rows",
            w.rows
        );
    }
    let g = grad_y.detach().to_dtype(DType::F32)?;
    let simd = simd_available();
    let tile = tile_rows(w.cols);
    let mut acc = Tensor::zeros((n, w.cols), DType::F32, grad_y.device())?;
    for r0 in (0..rows).step_by(tile) {
        let t = tile.min(rows - r0);
        let mut scratch = vec![0f32; t * w.cols];
        dequantize_tile(w, r0, &mut scratch, simd);
        let wt = Tensor::from_vec(scratch, (t, w.cols), grad_y.device())?;
        let gt = g.narrow(1, r0, t)?.contiguous()?;
        acc = (acc + gt.matmul(&wt)?)?;
    }
    Ok(acc)
}

/// The custom op: `x: [.., cols]` → `[.., rows]`.
#[derive(Clone, Debug)]
pub struct Nf4MatmulOp {
    pub weight: Arc<Nf4Packed>,
    pub path: KernelPath,
}

/// Copies a possibly strided f32 view into a contiguous vector.
fn gather(data: &[f32], layout: &Layout) -> Vec<f32> {
    if let Some((a, b)) = layout.contiguous_offsets() {
        return data[a..b].to_vec();
    }
    let dims = layout.dims();
    let stride = layout.stride();
    let total: usize = dims.iter().product();
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..total {
        let off: usize = layout.start_offset() + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(data[off]);
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            if idx[d] < dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

impl CustomOp1 for Nf4MatmulOp {
    fn name(&self) -> &'static str {
        "nf4-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("nf4 matmul: input must be f32, got {:?}", storage.dtype());
        };
        let dims = layout.dims();
        let Some((&cols, lead)) = dims.split_last() else {
            candle_core::bail!("nf4 matmul: input is a scalar, it needs a feature dimension");
        };
        if cols != self.weight.cols {
            candle_core::bail!(
                "nf4 matmul: input has {cols} features, the weight expects {}",
                self.weight.cols
            );
        }
        let n: usize = lead.iter().product();
        let x = match layout.contiguous_offsets() {
            Some((a, b)) => std::borrow::Cow::Borrowed(&data[a..b]),
            None => std::borrow::Cow::Owned(gather(data, layout)),
        };
        let y = matmul(&self.weight, &x, n, self.path)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(self.weight.rows);
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let rows = self.weight.rows;
        let g = grad_res.reshape(((), rows))?;
        let gx = grad_input(&self.weight, &g)?;
        Ok(Some(gx.reshape(arg.shape())?.to_dtype(arg.dtype())?))
    }
}

/// A frozen NF4 linear layer `y = x W^T (+ b)`, `W: [out, in]` kept packed.
#[derive(Clone, Debug)]
pub struct Nf4Linear {
    weight: Arc<Nf4Packed>,
    pub bias: Option<Tensor>,
}

impl Nf4Linear {
    pub fn new(weight: Nf4Packed, bias: Option<Tensor>) -> Self {
        Self {
            weight: Arc::new(weight),
            bias,
        }
    }

    pub fn weight(&self) -> &Nf4Packed {
        &self.weight
    }

    pub fn in_features(&self) -> usize {
        self.weight.cols
    }

    pub fn out_features(&self) -> usize {
        self.weight.rows
    }

    /// `x: [.., in]` (f32, CPU) → `[.., out]`; differentiable with respect to `x`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, KernelPath::Auto)
    }

    /// [`Self::forward`] with a pinned kernel path.
    pub fn forward_with(&self, x: &Tensor, path: KernelPath) -> candle_core::Result<Tensor> {
        let y = x.apply_op1(Nf4MatmulOp {
            weight: self.weight.clone(),
            path,
        })?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2+FMA inner loops. Every function requires AVX2 and FMA (callers check at run time).
    use super::NF4_CODE;
    use std::arch::x86_64::*;

    /// Decodes 16 codes (8 bytes at `p`, high nibble first) into two vectors of NF4 values.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode16(p: *const u8, lut_lo: __m256, lut_hi: __m256) -> (__m256, __m256) {
        // SAFETY (caller): `p` points at 8 readable bytes.
        let v = unsafe { _mm_loadl_epi64(p as *const __m128i) };
        let mask = _mm_set1_epi8(0x0f);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
        let lo = _mm_and_si128(v, mask);
        // [hi0, lo0, hi1, lo1, ...]: the codes in element order.
        let idx = _mm_unpacklo_epi8(hi, lo);
        let i0 = _mm256_cvtepu8_epi32(idx);
        let i1 = _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(idx));
        (lookup(i0, lut_lo, lut_hi), lookup(i1, lut_lo, lut_hi))
    }

    /// 16-entry table lookup: two 8-lane permutes, bit 3 of the index picks the half.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lookup(i: __m256i, lut_lo: __m256, lut_hi: __m256) -> __m256 {
        let a = _mm256_permutevar8x32_ps(lut_lo, i);
        let b = _mm256_permutevar8x32_ps(lut_hi, i);
        let m = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(i));
        _mm256_blendv_ps(a, b, m)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// AVX2+FMA available; `bs % 16 == 0`; `packed.len() == scales.len() * bs / 2`; every
    /// `xs[g].len() == scales.len() * bs`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_row<const G: usize>(
        packed: &[u8],
        scales: &[f32],
        bs: usize,
        xs: &[&[f32]; G],
    ) -> [f32; G] {
        // SAFETY: NF4_CODE has 16 values, so both 8-value loads are in bounds.
        let (lut_lo, lut_hi) = unsafe {
            (
                _mm256_loadu_ps(NF4_CODE.as_ptr()),
                _mm256_loadu_ps(NF4_CODE.as_ptr().add(8)),
            )
        };
        let mut tot = [_mm256_setzero_ps(); G];
        for (b, s) in scales.iter().enumerate() {
            let base = b * bs;
            let mut acc0 = [_mm256_setzero_ps(); G];
            let mut acc1 = [_mm256_setzero_ps(); G];
            let mut j = 0;
            while j < bs {
                // SAFETY: base + j + 16 <= scales.len() * bs, so the 8 bytes at (base + j) / 2
                // and the 16 floats at base + j of every input row are in bounds.
                unsafe {
                    let (w0, w1) = decode16(packed.as_ptr().add((base + j) / 2), lut_lo, lut_hi);
                    for g in 0..G {
                        let xp = xs[g].as_ptr().add(base + j);
                        acc0[g] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc0[g]);
                        acc1[g] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), acc1[g]);
                    }
                }
                j += 16;
            }
            let sv = _mm256_set1_ps(*s);
            for g in 0..G {
                tot[g] = _mm256_fmadd_ps(_mm256_add_ps(acc0[g], acc1[g]), sv, tot[g]);
            }
        }
        std::array::from_fn(|g| hsum(tot[g]))
    }

    /// # Safety
    /// AVX2+FMA available; `bs % 16 == 0`; `packed.len() == scales.len() * bs / 2`;
    /// `out.len() == scales.len() * bs`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dequantize_row(packed: &[u8], scales: &[f32], bs: usize, out: &mut [f32]) {
        // SAFETY: NF4_CODE has 16 values.
        let (lut_lo, lut_hi) = unsafe {
            (
                _mm256_loadu_ps(NF4_CODE.as_ptr()),
                _mm256_loadu_ps(NF4_CODE.as_ptr().add(8)),
            )
        };
        for (b, s) in scales.iter().enumerate() {
            let sv = _mm256_set1_ps(*s);
            let base = b * bs;
            let mut j = 0;
            while j < bs {
                // SAFETY: base + j + 16 <= out.len(), and the 8 source bytes are in `packed`.
                unsafe {
                    let (w0, w1) = decode16(packed.as_ptr().add((base + j) / 2), lut_lo, lut_hi);
                    let o = out.as_mut_ptr().add(base + j);
                    _mm256_storeu_ps(o, _mm256_mul_ps(w0, sv));
                    _mm256_storeu_ps(o.add(8), _mm256_mul_ps(w1, sv));
                }
                j += 16;
            }
        }
    }
}
