//! CUDA launch code of [`crate::quant::nf4_device`]'s ops: the kernels of `nf4.cu` (PTX built by
//! `build.rs`), on candle's CUDA storages. The ops call down with the weight's `Nf4Shape` (from
//! `quant::nf4`, so this module does not reach back into theirs); it re-checks what the kernels'
//! memory safety rests on (element counts, contiguity, the rows kernel's shape limits, alignment
//! of the code rows) before launching.

use super::nf4::Nf4Shape;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));
const MODULE: &str = "loraplex_nf4";
/// Threads per block of the dequantize kernel, and the most blocks it launches (grid-stride).
const DEQUANT_THREADS: u32 = 256;
const DEQUANT_MAX_BLOCKS: u64 = 65535;
/// Warps (weight rows) per block of the rows kernel (`NF4_ROWS_WARPS`).
const ROWS_WARPS: usize = 4;
/// The most input rows of the rows kernel (`NF4_ROWS_MAX`).
const ROWS_MAX: usize = 8;
/// Weights per 16-byte code chunk (`NF4_CHUNK`).
const CHUNK: usize = 32;

/// The contiguous view of a CUDA storage, checked to hold `len` elements of `T`.
fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    len: usize,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((lo, hi)) = l.contiguous_offsets() else {
        bail!("nf4: {what} is not contiguous");
    };
    if hi - lo != len {
        bail!("nf4: {what} has {} elements, expected {len}", hi - lo);
    }
    Ok(s.as_cuda_slice::<T>()?.slice(lo..hi))
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::msg(format!("nf4: {what} {v} too large")))
}

fn to_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::msg(format!("nf4: {what} {v} too large")))
}

/// `nf4_dequant_*`: the whole weight in `dtype`.
pub(crate) fn dequantize(
    codes: &CudaStorage,
    lc: &Layout,
    tables: &CudaStorage,
    lt: &Layout,
    shape: Nf4Shape,
    dtype: DType,
) -> Result<CudaStorage> {
    let dev = codes.device().clone();
    Ok(match dtype {
        DType::F32 => {
            CudaStorage::wrap_cuda_slice(dequant::<f32>(codes, lc, tables, lt, shape, "f32")?, dev)
        }
        DType::BF16 => CudaStorage::wrap_cuda_slice(
            dequant::<half::bf16>(codes, lc, tables, lt, shape, "bf16")?,
            dev,
        ),
        DType::F16 => CudaStorage::wrap_cuda_slice(
            dequant::<half::f16>(codes, lc, tables, lt, shape, "f16")?,
            dev,
        ),
        other => bail!("nf4 dequantize: dtype {other:?} is not supported"),
    })
}

fn dequant<T: CudaDType + DeviceRepr>(
    codes: &CudaStorage,
    lc: &Layout,
    tables: &CudaStorage,
    lt: &Layout,
    shape: Nf4Shape,
    suffix: &str,
) -> Result<CudaSlice<T>> {
    shape.check(lc.shape().elem_count(), lt.shape().elem_count())?;
    let numel = shape.numel();
    let blocks = numel.div_ceil(shape.blocksize);
    let dev = codes.device();
    let cv = view::<u8>(codes, lc, numel.div_ceil(2), "codes")?;
    let tv = view::<f32>(tables, lt, 16 + blocks, "tables")?;
    // SAFETY: the kernel writes every one of the `numel` elements (one thread per code byte).
    let mut out = unsafe { dev.alloc::<T>(numel.max(1))? };
    if numel == 0 {
        return Ok(out);
    }
    let (numel_u, bs_u) = (numel as u64, to_u32(shape.blocksize, "block size")?);
    let grid = (numel.div_ceil(2) as u64)
        .div_ceil(DEQUANT_THREADS as u64)
        .min(DEQUANT_MAX_BLOCKS) as u32;
    let func = dev.get_or_load_custom_func(&format!("nf4_dequant_{suffix}"), MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&cv).arg(&tv).arg(&mut out).arg(&numel_u).arg(&bs_u);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (DEQUANT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches `nf4_dequant_*` in nf4.cu; codes hold ceil(numel / 2)
    // bytes, tables 16 + ceil(numel / blocksize) values, out numel elements (checked above).
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

/// `nf4_rows_*`: `x [m, cols] · deq(W)ᵀ` for `m ≤ ROWS_MAX`, in x's dtype.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows(
    x: &CudaStorage,
    lx: &Layout,
    codes: &CudaStorage,
    lc: &Layout,
    tables: &CudaStorage,
    lt: &Layout,
    shape: Nf4Shape,
    m: usize,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let args = RowsArgs {
        x: (x, lx),
        codes: (codes, lc),
        tables: (tables, lt),
        shape,
        m,
    };
    Ok(match x.dtype() {
        DType::F32 => CudaStorage::wrap_cuda_slice(rows_launch::<f32>(&args, "f32")?, dev),
        DType::BF16 => CudaStorage::wrap_cuda_slice(rows_launch::<half::bf16>(&args, "bf16")?, dev),
        DType::F16 => CudaStorage::wrap_cuda_slice(rows_launch::<half::f16>(&args, "f16")?, dev),
        other => bail!("nf4 rows: dtype {other:?} is not supported"),
    })
}

struct RowsArgs<'a> {
    x: (&'a CudaStorage, &'a Layout),
    codes: (&'a CudaStorage, &'a Layout),
    tables: (&'a CudaStorage, &'a Layout),
    shape: Nf4Shape,
    m: usize,
}

fn rows_launch<T: CudaDType + DeviceRepr>(a: &RowsArgs<'_>, suffix: &str) -> Result<CudaSlice<T>> {
    let Nf4Shape {
        rows,
        cols,
        blocksize,
    } = a.shape;
    let m = a.m;
    let fits = cols > 0 && cols.is_multiple_of(CHUNK) && blocksize.is_multiple_of(CHUNK);
    if m == 0 || m > ROWS_MAX || blocksize == 0 || !fits {
        bail!(
            "nf4 rows: {m} rows of [{rows}, {cols}] in blocks of {blocksize} do not fit the kernel"
        );
    }
    let numel = rows * cols;
    let blocks = numel.div_ceil(blocksize);
    let dev = a.x.0.device();
    let stream = dev.cuda_stream();
    let xv = view::<T>(a.x.0, a.x.1, m * cols, "x")?;
    let cv = view::<u8>(a.codes.0, a.codes.1, numel / 2, "codes")?;
    let tv = view::<f32>(a.tables.0, a.tables.1, 16 + blocks, "tables")?;
    // Each weight row's codes are 16-byte loads: the buffer must start 16-byte aligned (rows
    // are cols / 2 bytes, a multiple of 16 since cols % 32 == 0).
    if !cv.device_ptr(&stream).0.is_multiple_of(16) {
        bail!("nf4 rows: the codes are not 16-byte aligned");
    }
    let x_aligned = xv.device_ptr(&stream).0.is_multiple_of(16);
    let variant = if x_aligned { "" } else { "_scalar" };
    // SAFETY: the kernel writes y[r, j] for every r < m and j < rows (one warp per row j).
    let mut out = unsafe { dev.alloc::<T>(m * rows)? };
    let (m_i, n_i, cols_i, bs_i) = (
        to_i32(m, "rows")?,
        to_i32(rows, "weight rows")?,
        to_i32(cols, "cols")?,
        to_i32(blocksize, "block size")?,
    );
    to_i32(numel / CHUNK, "chunks")?;
    let grid = to_u32(rows.div_ceil(ROWS_WARPS), "weight rows")?;
    let func = dev.get_or_load_custom_func(&format!("nf4_rows_{suffix}{variant}"), MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&xv).arg(&cv).arg(&tv).arg(&mut out);
    b.arg(&m_i).arg(&n_i).arg(&cols_i).arg(&bs_i);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (32 * ROWS_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches `nf4_rows_*` in nf4.cu; x holds m * cols elements,
    // codes rows * cols / 2 bytes (16-byte aligned), tables 16 + blocks values, out m * rows.
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}
