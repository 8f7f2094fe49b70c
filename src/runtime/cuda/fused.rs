//! CUDA launch code of [`crate::runtime::fused`]: the kernels of `kernels/fused.cu`, one launch
//! per op. The inputs' shapes were checked by the op's module; this one re-checks the element
//! counts and contiguity the kernels' memory safety rests on.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "loraplex_fused";
/// Threads per row of the norm kernel (`FUSED_NORM_THREADS`).
const NORM_THREADS: u32 = 256;
/// Threads per block and most blocks of the elementwise kernel.
const ELEM_THREADS: u32 = 256;
const ELEM_MAX_BLOCKS: u64 = 65535;

type Input<'a> = (&'a CudaStorage, &'a Layout);

/// The contiguous view of an input, checked to hold `len` elements of `T`.
fn view<'a, T: CudaDType>((s, l): Input<'a>, len: usize, what: &str) -> Result<CudaView<'a, T>> {
    let Some((lo, hi)) = l.contiguous_offsets() else {
        bail!("fused op: {what} is not contiguous");
    };
    if hi - lo != len {
        bail!("fused op: {what} has {} elements, expected {len}", hi - lo);
    }
    Ok(s.as_cuda_slice::<T>()?.slice(lo..hi))
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::msg(format!("fused op: {what} {v} too large")))
}

/// `[2, rows, cols]`: `x + d`, then its RMSNorm times `w`.
pub(crate) fn add_rms_norm(
    x: Input<'_>,
    d: Input<'_>,
    w: Input<'_>,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    let args = (x, d, w, rows, cols, eps);
    Ok(match x.0.dtype() {
        DType::F32 => CudaStorage::wrap_cuda_slice(norm::<f32>(args, "f32")?, dev),
        DType::BF16 => CudaStorage::wrap_cuda_slice(norm::<half::bf16>(args, "bf16")?, dev),
        DType::F16 => CudaStorage::wrap_cuda_slice(norm::<half::f16>(args, "f16")?, dev),
        other => bail!("add_rms_norm: dtype {other:?} is not supported"),
    })
}

type NormArgs<'a> = (Input<'a>, Input<'a>, Input<'a>, usize, usize, f32);

fn norm<T: CudaDType + DeviceRepr>(
    (x, d, w, rows, cols, eps): NormArgs<'_>,
    suffix: &str,
) -> Result<CudaSlice<T>> {
    if x.0.dtype() != d.0.dtype() || x.0.dtype() != w.0.dtype() {
        bail!("add_rms_norm: x, d and w differ in dtype");
    }
    let dev = x.0.device();
    let xv = view::<T>(x, rows * cols, "x")?;
    let dv = view::<T>(d, rows * cols, "d")?;
    let wv = view::<T>(w, cols, "w")?;
    // SAFETY: one block per row writes every element of both halves.
    let mut out = unsafe { dev.alloc::<T>((2 * rows * cols).max(1))? };
    if rows == 0 || cols == 0 {
        return Ok(out);
    }
    let (rows_i, cols_i) = (to_i32(rows, "rows")?, to_i32(cols, "cols")?);
    let func = dev.get_or_load_custom_func(&format!("fused_add_rms_norm_{suffix}"), MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&xv).arg(&dv).arg(&wv).arg(&mut out);
    b.arg(&rows_i).arg(&cols_i).arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows_i as u32, 1, 1),
        block_dim: (NORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `fused_add_rms_norm_*` in fused.cu; x and d hold rows · cols
    // elements, w cols, out 2 · rows · cols (checked above); the block size is the kernel's.
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

/// `silu(g) · u` elementwise.
pub(crate) fn silu_mul(g: Input<'_>, u: Input<'_>) -> Result<CudaStorage> {
    let dev = g.0.device().clone();
    Ok(match g.0.dtype() {
        DType::F32 => CudaStorage::wrap_cuda_slice(elem::<f32>(g, u, "f32")?, dev),
        DType::BF16 => CudaStorage::wrap_cuda_slice(elem::<half::bf16>(g, u, "bf16")?, dev),
        DType::F16 => CudaStorage::wrap_cuda_slice(elem::<half::f16>(g, u, "f16")?, dev),
        other => bail!("silu_mul: dtype {other:?} is not supported"),
    })
}

fn elem<T: CudaDType + DeviceRepr>(
    g: Input<'_>,
    u: Input<'_>,
    suffix: &str,
) -> Result<CudaSlice<T>> {
    if g.0.dtype() != u.0.dtype() {
        bail!("silu_mul: g and u differ in dtype");
    }
    let n = g.1.shape().elem_count();
    let dev = g.0.device();
    let gv = view::<T>(g, n, "g")?;
    let uv = view::<T>(u, n, "u")?;
    // SAFETY: the grid-stride loop writes every one of the n elements.
    let mut out = unsafe { dev.alloc::<T>(n.max(1))? };
    if n == 0 {
        return Ok(out);
    }
    let n_u = n as u64;
    let grid = n_u.div_ceil(ELEM_THREADS as u64).min(ELEM_MAX_BLOCKS) as u32;
    let func = dev.get_or_load_custom_func(&format!("fused_silu_mul_{suffix}"), MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&gv).arg(&uv).arg(&mut out).arg(&n_u);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (ELEM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `fused_silu_mul_*` in fused.cu; g, u and out hold n elements.
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}
