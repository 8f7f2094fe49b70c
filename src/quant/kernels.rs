//! NF4 matmul kernels as a candle custom op: `y = x W^T` with `W` kept packed.
//!
//! Two paths, neither of which materialises the whole dequantized weight:
//! - **fused** (few input rows, i.e. decode): each output row's packed bytes are decoded 32 codes
//!   at a time, scaled by their block's absmax and multiplied straight into the dot products of up
//!   to four input rows. AVX2+FMA when the CPU has them (runtime detection; the decoder builds
//!   each f32 from four byte-plane shuffles, see `simd`), a scalar loop otherwise; output rows are
//!   split across rayon's threads, the calling thread taking the first share.
//! - **tiled** (many input rows: prefill, big batches): tiles of a few dozen weight rows are
//!   dequantized into a per-thread scratch buffer (about 128 KiB, bit-identical to bitsandbytes'
//!   dequantization) and multiplied with all input rows by a register-blocked gemm kernel (4 input
//!   rows x 3 weight rows per block); tiles are spread over rayon's threads.
//!
//! The backward pass returns the input gradient only (`grad_x = grad_y W`, tile by tile): the
//! quantized base is frozen, as in QLoRA.

use super::nf4::{Nf4Packed, NF4_CODE};
#[cfg(target_arch = "x86_64")]
use super::simd;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Inputs with at most this many rows take the fused path (measured with `benches/nf4.rs`).
pub const FUSED_MAX_ROWS: usize = 4;

/// Below this many multiply-adds a call stays on the calling thread (waking rayon's workers
/// costs more than it saves).
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// Which kernel computes `x W^T` (tests and benchmarks pin one; the model uses `Auto`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Fused for `n <= FUSED_MAX_ROWS`, tiled above.
    Auto,
    /// Fused, with AVX2 when the CPU has it.
    Fused,
    /// Fused, scalar code only.
    FusedScalar,
    /// Dequantize tiles into scratch + gemm, with AVX2 when the CPU has it.
    Tiled,
    /// Tiled, scalar code only.
    TiledScalar,
}

/// Whether this CPU runs the AVX-512 VNNI form of the NF4 integer kernel (`vpdpwssd`).
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd_available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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

/// Blocks lie inside rows and hold whole 32-code groups: the layout the fast kernels need.
fn aligned(w: &Nf4Packed) -> bool {
    w.blocksize.is_multiple_of(32) && w.cols.is_multiple_of(w.blocksize)
}

/// `x: [n, cols]` row-major → `y: [n, rows]` row-major.
pub fn matmul(
    w: &Nf4Packed,
    x: &[f32],
    n: usize,
    path: KernelPath,
) -> candle_core::Result<Vec<f32>> {
    if x.len() != n * w.cols {
        candle_core::bail!(
            "nf4 matmul: input has {} values, {n} rows of {} features need {}",
            x.len(),
            w.cols,
            n * w.cols
        );
    }
    if w.cols == 0 {
        return Ok(vec![0f32; n * w.rows]);
    }
    let simd = simd_available();
    Ok(match path {
        KernelPath::Auto if n <= FUSED_MAX_ROWS => fused(w, x, n, simd),
        KernelPath::Auto | KernelPath::Tiled => tiled(w, x, n, simd),
        KernelPath::Fused => fused(w, x, n, simd),
        KernelPath::FusedScalar => fused(w, x, n, false),
        KernelPath::TiledScalar => tiled(w, x, n, false),
    })
}

/// Runs `f` over `items` and returns the results in order: on the calling thread for small
/// calls, else the first item on the calling thread while rayon's workers take the others (the
/// caller works instead of sleeping until a worker wakes up, which matters at decode sizes).
fn spread<T: Sync, R: Send + Default>(
    macs: usize,
    items: &[T],
    f: impl Fn(&T) -> R + Sync + Send,
) -> Vec<R> {
    if macs < PARALLEL_MIN_MACS || items.len() < 2 || rayon::current_num_threads() < 2 {
        return items.iter().map(f).collect();
    }
    let mut out: Vec<R> = items.iter().map(|_| R::default()).collect();
    let f = &f;
    rayon::in_place_scope(|s| {
        let (first, rest) = out.split_at_mut(1);
        for (slot, item) in rest.iter_mut().zip(&items[1..]) {
            s.spawn(move |_| *slot = f(item));
        }
        first[0] = f(&items[0]);
    });
    out
}

/// The fused path: output rows split into one chunk per rayon thread.
fn fused(w: &Nf4Packed, x: &[f32], n: usize, simd: bool) -> Vec<f32> {
    let rows = w.rows;
    let mut y = vec![0f32; n * rows];
    if n == 0 || rows == 0 {
        return y;
    }
    let chunk = rows.div_ceil(rayon::current_num_threads().max(1)).max(8);
    let starts: Vec<usize> = (0..rows).step_by(chunk).collect();
    // Each chunk fills `[rows_in_chunk][n]`; the scatter into `[n][rows]` is cheap for few rows.
    let parts = spread(n * rows * w.cols, &starts, |&r0| {
        fused_rows(w, x, n, r0, (r0 + chunk).min(rows), simd)
    });
    for (r0, part) in starts.iter().zip(parts) {
        for (i, vals) in part.chunks(n).enumerate() {
            for (k, v) in vals.iter().enumerate() {
                y[k * rows + r0 + i] = *v;
            }
        }
    }
    y
}

/// Output rows `r0..r1` for all `n` input rows, laid out `[r - r0][k]`.
pub(crate) fn fused_rows(
    w: &Nf4Packed,
    x: &[f32],
    n: usize,
    r0: usize,
    r1: usize,
    simd: bool,
) -> Vec<f32> {
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
    let per_row = cols / w.blocksize;
    let mut scales = vec![0f32; (r1 - r0) * per_row];
    w.scales_into(r0 * per_row, &mut scales);
    let packed = &w.data[r0 * cols / 2..r1 * cols / 2];
    let mut k = 0;
    while k < n {
        let g = (n - k).min(4);
        let (group, dst) = (&xs[k..k + g], &mut out[k..]);
        let bs = w.blocksize;
        match g {
            4 => dot_rows::<4>(packed, &scales, bs, cols, group, dst, n, simd),
            3 => dot_rows::<3>(packed, &scales, bs, cols, group, dst, n, simd),
            2 => dot_rows::<2>(packed, &scales, bs, cols, group, dst, n, simd),
            _ => dot_rows::<1>(packed, &scales, bs, cols, group, dst, n, simd),
        }
        k += g;
    }
    out
}

/// `out[r * stride + g] = row_r . xs[g]` for the packed rows in `packed` (aligned layout).
#[allow(clippy::too_many_arguments)]
fn dot_rows<const G: usize>(
    packed: &[u8],
    scales: &[f32],
    bs: usize,
    cols: usize,
    xs: &[&[f32]],
    out: &mut [f32],
    stride: usize,
    simd: bool,
) {
    let xs: [&[f32]; G] = std::array::from_fn(|g| xs[g]);
    let rows = packed.len() * 2 / cols.max(1);
    #[cfg(target_arch = "x86_64")]
    if simd
        && bs.is_multiple_of(32)
        && cols.is_multiple_of(bs)
        && packed.len() * 2 == scales.len() * bs
        && packed.len() * 2 == rows * cols
        && xs.iter().all(|x| x.len() >= cols)
        && (rows == 0 || out.len() >= (rows - 1) * stride + G)
    {
        // SAFETY: `simd` is only true when `simd_available()` saw AVX2 and FMA, and the lengths
        // the kernel relies on were checked just above.
        return unsafe { simd::dot_rows::<G>(packed, scales, bs, cols, &xs, out, stride) };
    }
    let _ = simd;
    let per_row = cols / bs;
    for r in 0..rows {
        let mut tot = [0f32; G];
        for (b, s) in scales[r * per_row..(r + 1) * per_row].iter().enumerate() {
            let base = b * bs;
            let bytes = &packed[(r * cols + base) / 2..(r * cols + base + bs) / 2];
            for (j, byte) in bytes.iter().enumerate() {
                let hi = NF4_CODE[(byte >> 4) as usize] * s;
                let lo = NF4_CODE[(byte & 0x0f) as usize] * s;
                let c = base + 2 * j;
                for (t, x) in tot.iter_mut().zip(&xs) {
                    *t += hi * x[c] + lo * x[c + 1];
                }
            }
        }
        out[r * stride..r * stride + G].copy_from_slice(&tot);
    }
}

/// Weight rows per tile: about 128 KiB of f32 scratch, a multiple of the 3-row register block.
fn tile_rows(cols: usize) -> usize {
    ((32768 / cols.max(1)).clamp(12, 96) / 3) * 3
}

/// Dequantizes weight rows `r0..r0 + out.len() / cols` into `out`.
fn dequantize_tile(w: &Nf4Packed, r0: usize, out: &mut [f32], simd: bool) {
    let cols = w.cols;
    if !aligned(w) {
        w.dequantize_rows_into(r0, out);
        return;
    }
    let per_row = cols / w.blocksize;
    let mut scales = vec![0f32; per_row];
    for (i, row) in out.chunks_mut(cols).enumerate() {
        let r = r0 + i;
        w.scales_into(r * per_row, &mut scales);
        let packed = &w.data[r * cols / 2..(r + 1) * cols / 2];
        dequantize_row(packed, &scales, w.blocksize, row, simd);
    }
}

/// One aligned row: `code * absmax`, exactly as [`Nf4Packed::dequantize_rows_into`].
fn dequantize_row(packed: &[u8], scales: &[f32], bs: usize, out: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd
        && bs.is_multiple_of(32)
        && packed.len() * 2 == scales.len() * bs
        && out.len() == packed.len() * 2
    {
        // SAFETY: AVX2/FMA were detected (`simd`) and the lengths were checked just above.
        return unsafe { simd::dequantize_row(packed, scales, bs, out) };
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

/// One register block of `x w^T` (`MR` input rows, `NR` weight rows, `k` features each).
fn block<const MR: usize, const NR: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    simd: bool,
) -> [[f32; NR]; MR] {
    #[cfg(target_arch = "x86_64")]
    if simd && x.len() >= MR * k && w.len() >= NR * k {
        // SAFETY: AVX2/FMA were detected (`simd`); `x` and `w` hold MR and NR rows of `k`.
        return unsafe { simd::block_dot::<MR, NR>(x, w, k) };
    }
    let _ = simd;
    std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            let (xi, wj) = (&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
            xi.iter().zip(wj).map(|(a, b)| a * b).sum()
        })
    })
}

/// `out[i * t + j] = x[i] . w[j]` for `x: [n, k]`, `w: [t, k]` (the gemm of the tiled path).
fn gemm_nt(x: &[f32], n: usize, w: &[f32], t: usize, k: usize, out: &mut [f32], simd: bool) {
    macro_rules! run {
        ($mr:literal, $nr:literal, $i0:expr, $j0:expr) => {{
            let r = block::<$mr, $nr>(&x[$i0 * k..], &w[$j0 * k..], k, simd);
            for (i, row) in r.iter().enumerate() {
                out[($i0 + i) * t + $j0..($i0 + i) * t + $j0 + $nr].copy_from_slice(row);
            }
        }};
    }
    for j0 in (0..t).step_by(3) {
        for i0 in (0..n).step_by(4) {
            match ((n - i0).min(4), (t - j0).min(3)) {
                (4, 3) => run!(4, 3, i0, j0),
                (4, 2) => run!(4, 2, i0, j0),
                (4, _) => run!(4, 1, i0, j0),
                (3, 3) => run!(3, 3, i0, j0),
                (3, 2) => run!(3, 2, i0, j0),
                (3, _) => run!(3, 1, i0, j0),
                (2, 3) => run!(2, 3, i0, j0),
                (2, 2) => run!(2, 2, i0, j0),
                (2, _) => run!(2, 1, i0, j0),
                (_, 3) => run!(1, 3, i0, j0),
                (_, 2) => run!(1, 2, i0, j0),
                (_, _) => run!(1, 1, i0, j0),
            }
        }
    }
}

/// The tiled path: each task dequantizes one tile of weight rows into its scratch and multiplies
/// it with every input row.
fn tiled(w: &Nf4Packed, x: &[f32], n: usize, simd: bool) -> Vec<f32> {
    let (rows, cols) = (w.rows, w.cols);
    let mut y = vec![0f32; n * rows];
    if n == 0 || rows == 0 {
        return y;
    }
    let tile = tile_rows(cols);
    let starts: Vec<usize> = (0..rows).step_by(tile).collect();
    let run = |scratch: &mut Vec<f32>, r0: usize| -> Vec<f32> {
        let t = tile.min(rows - r0);
        scratch.resize(t * cols, 0.0);
        dequantize_tile(w, r0, scratch, simd);
        let mut out = vec![0f32; n * t];
        gemm_nt(x, n, scratch, t, cols, &mut out, simd);
        out
    };
    let parts: Vec<Vec<f32>> = match n * rows * cols >= PARALLEL_MIN_MACS {
        true => starts
            .par_iter()
            .map_init(Vec::new, |s, &r0| run(s, r0))
            .collect(),
        false => {
            let mut s = Vec::new();
            starts.iter().map(|&r0| run(&mut s, r0)).collect()
        }
    };
    for (r0, part) in starts.iter().zip(parts) {
        let t = part.len() / n;
        for k in 0..n {
            y[k * rows + r0..k * rows + r0 + t].copy_from_slice(&part[k * t..(k + 1) * t]);
        }
    }
    y
}

/// `grad_x = grad_y W` for `grad_y: [n, rows]`, one dequantized tile of `W` at a time
/// (`sum over tiles of grad_y[:, tile] W[tile]`).
pub fn grad_input(w: &Nf4Packed, grad_y: &Tensor) -> candle_core::Result<Tensor> {
    let (n, rows) = grad_y.dims2()?;
    if rows != w.rows {
        candle_core::bail!(
            "nf4 backward: gradient has {rows} features, the weight has {} rows",
            w.rows
        );
    }
    let g = grad_y.detach().to_dtype(DType::F32)?;
    let mut acc = Tensor::zeros((n, w.cols), DType::F32, grad_y.device())?;
    if w.cols == 0 {
        return Ok(acc);
    }
    let simd = simd_available();
    // Bigger tiles than the forward's (about 1 MiB): each one is a candle gemm call.
    let tile = ((1usize << 18) / w.cols).clamp(16, 4096);
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
        let off: usize =
            layout.start_offset() + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
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

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
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

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
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

    /// A layer over a weight shared with others (the model keeps its weights in `Arc`s).
    pub fn from_arc(weight: Arc<Nf4Packed>, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
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
