//! NF4 weights kept packed in a device's memory (`--quantize nf4` on a GPU), and their two ops:
//!
//! - [`Nf4Device::dequantize`]: the whole matrix in a float dtype,
//!   `w[i] = code[nibble(i)] · absmax[i / blocksize]` in f32, rounded once to the dtype — the
//!   values of [`Nf4Packed::dequantize`] bit for bit (bitsandbytes' dequantization);
//! - [`Nf4Device::matmul`]: `y = x · deq(W)ᵀ`. Up to [`ROWS_MAX`] input rows (decode steps) read
//!   the packed codes directly (`Nf4RowsOp`: each weight row's codes are streamed once for all
//!   rows, 0.56 bytes per weight instead of bf16's 2); more rows (prefill) dequantize the matrix
//!   into the input's dtype and multiply with the device's matmul (cuBLAS on a GPU).
//!
//! On the device the packed codes are one u8 buffer in bitsandbytes' order (high nibble first)
//! and a `[16 + blocks]` f32 table: the 16 NF4 code values, then every block's absmax (a
//! double-quantized absmax is expanded once, at upload, exactly as the CPU reads it). Each op
//! has a CPU implementation of the same math — the reference CI tests — and, with the `cuda`
//! feature, the kernels of `quant/cuda/nf4.cu`; [`check_against_reference`] compares the two.

use super::nf4::{Nf4Packed, Nf4Shape, NF4_CODE};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};
use half::{bf16, f16};
use std::sync::Arc;

/// The most input rows [`Nf4Device::matmul`] multiplies straight from the packed codes; more
/// dequantize the weight first.
pub const ROWS_MAX: usize = 8;
/// Weights per code chunk of the rows kernel: 16 bytes, one vector load per lane.
pub const CHUNK: usize = 32;

/// An NF4 weight `[rows, cols]` resident on a device, with the host copy it was made from
/// (export, merges and the quantization settings read that).
#[derive(Debug)]
pub struct Nf4Device {
    host: Arc<Nf4Packed>,
    /// `[ceil(rows · cols / 2)]` u8.
    codes: Tensor,
    /// `[16 + blocks]` f32: the NF4 code values, then each block's absmax.
    tables: Tensor,
}

impl Nf4Device {
    /// Copies `host`'s codes and scales to `device`.
    pub fn upload(host: Arc<Nf4Packed>, device: &Device) -> Result<Self> {
        let codes = Tensor::from_slice(&host.data, host.data.len(), device)?;
        let tables = Tensor::from_vec(tables_of(&host), 16 + host.n_blocks(), device)?;
        Ok(Self {
            host,
            codes,
            tables,
        })
    }

    /// The packed weight on the host.
    pub fn host(&self) -> &Arc<Nf4Packed> {
        &self.host
    }

    pub fn device(&self) -> &Device {
        self.codes.device()
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.host.rows, self.host.cols)
    }

    /// Device bytes: the codes and the f32 table.
    pub fn resident_bytes(&self) -> usize {
        self.codes.elem_count() + 4 * self.tables.elem_count()
    }

    fn op_shape(&self) -> Nf4Shape {
        Nf4Shape {
            rows: self.host.rows,
            cols: self.host.cols,
            blocksize: self.host.blocksize,
        }
    }

    /// The dequantized matrix `[rows, cols]` in `dtype` (f32, bf16 or f16) on the device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let op = Nf4DequantOp {
            shape: self.op_shape(),
            dtype,
        };
        self.codes.apply_op2_no_bwd(&self.tables, &op)
    }

    /// `x: [.., cols]` → `x · deq(W)ᵀ: [.., rows]` in `x`'s dtype.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, cols) = self.shape();
        let dims = x.dims();
        if dims.last() != Some(&cols) {
            bail!("nf4 matmul: input {:?} does not end in {cols}", x.shape());
        }
        let m = x.elem_count() / cols.max(1);
        let x2 = x.reshape((m, cols))?;
        let y = match m <= ROWS_MAX && rows_kernel_fits(cols, self.host.blocksize) {
            true => x2.contiguous()?.apply_op3_no_bwd(
                &self.codes,
                &self.tables,
                &Nf4RowsOp {
                    shape: self.op_shape(),
                    m,
                },
            )?,
            false => x2.matmul(&self.dequantize(x.dtype())?.t()?)?,
        };
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = rows;
        }
        y.reshape(out)
    }
}

/// The `[16 + blocks]` table of a packed weight: the NF4 code values, then each block's absmax
/// as the CPU reads it.
pub fn tables_of(host: &Nf4Packed) -> Vec<f32> {
    let mut tables = Vec::with_capacity(16 + host.n_blocks());
    tables.extend_from_slice(&NF4_CODE);
    tables.resize(16 + host.n_blocks(), 0.0);
    host.scales_into(0, &mut tables[16..]);
    tables
}

/// Whether the rows kernel takes a weight of `cols` columns in blocks of `blocksize`: whole
/// 16-byte chunks per row, each inside one block.
pub fn rows_kernel_fits(cols: usize, blocksize: usize) -> bool {
    cols > 0 && cols.is_multiple_of(CHUNK) && blocksize.is_multiple_of(CHUNK)
}

/// The contiguous slice of a CPU storage of type `T`.
fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let Some((lo, hi)) = l.contiguous_offsets() else {
        bail!("nf4: {what} is not contiguous");
    };
    Ok(&s.as_slice::<T>()?[lo..hi])
}

/// The CPU reference of the dequantization: `out[i] = table[code(i)] · table[16 + i / bs]`.
pub fn dequantize_reference(codes: &[u8], tables: &[f32], shape: Nf4Shape) -> Vec<f32> {
    let (code, absmax) = tables.split_at(16);
    (0..shape.numel())
        .map(|i| {
            let byte = codes[i / 2];
            let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
            code[nibble as usize] * absmax[i / shape.blocksize]
        })
        .collect()
}

/// The CPU reference of the rows op in f32: for each input row and weight row, the products
/// of each 32-weight chunk summed in order, times the chunk's absmax, summed over chunks.
/// Shapes the rows kernel does not take (a chunk may straddle two blocks) scale each weight
/// instead: the dot product of the dequantized row.
pub fn rows_reference(
    x: &[f32],
    m: usize,
    codes: &[u8],
    tables: &[f32],
    shape: Nf4Shape,
) -> Vec<f32> {
    let (rows, cols) = (shape.rows, shape.cols);
    let (code, absmax) = tables.split_at(16);
    let mut y = vec![0f32; m * rows];
    let mut w = vec![0f32; cols];
    let per_chunk = rows_kernel_fits(cols, shape.blocksize);
    for j in 0..rows {
        for (c, v) in w.iter_mut().enumerate() {
            let i = j * cols + c;
            let byte = codes[i / 2];
            *v = code[(if i % 2 == 0 { byte >> 4 } else { byte & 15 }) as usize];
            if !per_chunk {
                *v *= absmax[i / shape.blocksize];
            }
        }
        for r in 0..m {
            let xr = &x[r * cols..(r + 1) * cols];
            let mut acc = 0f32;
            for (c0, (wc, xc)) in w.chunks(CHUNK).zip(xr.chunks(CHUNK)).enumerate() {
                let part = wc.iter().zip(xc).fold(0f32, |s, (a, b)| a.mul_add(*b, s));
                let s = match per_chunk {
                    true => absmax[(j * cols + c0 * CHUNK) / shape.blocksize],
                    false => 1.0,
                };
                acc = part.mul_add(s, acc);
            }
            y[r * rows + j] = acc;
        }
    }
    y
}

/// f32 values into a CPU storage of `dtype`, rounded to nearest-even once.
fn to_storage(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        other => bail!("nf4: dtype {other:?} is not supported (f32, bf16, f16)"),
    })
}

/// A float CPU storage's values in f32.
fn to_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    Ok(match s {
        CpuStorage::F32(_) => cpu_slice::<f32>(s, l, "x")?.to_vec(),
        CpuStorage::BF16(_) => cpu_slice::<bf16>(s, l, "x")?
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        CpuStorage::F16(_) => cpu_slice::<f16>(s, l, "x")?
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        other => bail!("nf4: input dtype {:?} is not supported", other.dtype()),
    })
}

/// `(codes, tables) → deq(W)` in `dtype`.
struct Nf4DequantOp {
    shape: Nf4Shape,
    dtype: DType,
}

impl CustomOp2 for Nf4DequantOp {
    fn name(&self) -> &'static str {
        "nf4-dequantize"
    }

    fn cpu_fwd(
        &self,
        codes: &CpuStorage,
        lc: &Layout,
        tables: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let codes = cpu_slice::<u8>(codes, lc, "codes")?;
        let tables = cpu_slice::<f32>(tables, lt, "tables")?;
        self.shape.check(codes.len(), tables.len())?;
        let v = dequantize_reference(codes, tables, self.shape);
        Ok((
            to_storage(v, self.dtype)?,
            Shape::from_dims(&[self.shape.rows, self.shape.cols]),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        codes: &candle_core::CudaStorage,
        lc: &Layout,
        tables: &candle_core::CudaStorage,
        lt: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::dequantize(codes, lc, tables, lt, self.shape, self.dtype)?;
        Ok((out, Shape::from_dims(&[self.shape.rows, self.shape.cols])))
    }
}

/// `(x [m, cols], codes, tables) → x · deq(W)ᵀ [m, rows]` for `m ≤ ROWS_MAX`.
struct Nf4RowsOp {
    shape: Nf4Shape,
    m: usize,
}

impl CustomOp3 for Nf4RowsOp {
    fn name(&self) -> &'static str {
        "nf4-rows"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        codes: &CpuStorage,
        lc: &Layout,
        tables: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xv = to_f32(x, lx)?;
        let codes = cpu_slice::<u8>(codes, lc, "codes")?;
        let tables = cpu_slice::<f32>(tables, lt, "tables")?;
        self.shape.check(codes.len(), tables.len())?;
        if xv.len() != self.m * self.shape.cols {
            bail!(
                "nf4 rows: x has {} values, expected {}x{}",
                xv.len(),
                self.m,
                self.shape.cols
            );
        }
        let y = rows_reference(&xv, self.m, codes, tables, self.shape);
        Ok((
            to_storage(y, x.dtype())?,
            Shape::from_dims(&[self.m, self.shape.rows]),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        codes: &candle_core::CudaStorage,
        lc: &Layout,
        tables: &candle_core::CudaStorage,
        lt: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::rows(x, lx, codes, lc, tables, lt, self.shape, self.m)?;
        Ok((out, Shape::from_dims(&[self.m, self.shape.rows])))
    }
}

/// Cases of the device check: (input rows, weight rows, cols, blocksize, double quantization).
/// Up to [`ROWS_MAX`] rows with cols a multiple of 32 take the rows kernel; the others
/// dequantize and multiply.
const CHECK_CASES: [(usize, usize, usize, usize, bool); 6] = [
    // A decode step's q_proj at Llama-3-8B shape.
    (1, 4096, 4096, 64, false),
    // k_proj's shape, an odd row count, double-quantized absmax.
    (7, 1024, 4096, 64, true),
    // down_proj's long rows, the most rows the kernel takes.
    (8, 256, 14336, 64, false),
    // Blocks of 128.
    (3, 160, 1536, 128, false),
    // Prefill rows: dequantize + matmul.
    (24, 512, 4096, 64, false),
    // cols not a multiple of 32 (blocks across rows): dequantize + matmul.
    (5, 37, 200, 64, false),
];

/// The largest relative error [`check_against_reference`] accepts for `dtype`: the matmul path
/// multiplies weights rounded to the dtype, and every output is rounded to it once.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 5e-3,
        _ => 2e-4,
    }
}

/// The device check: random weights quantized to NF4 and uploaded to `device`, then
/// (1) [`Nf4Device::dequantize`] in `dtype` against [`Nf4Packed::dequantize`] rounded to the
/// dtype — bit for bit, any difference is an error — and (2) [`Nf4Device::matmul`] of random
/// inputs against [`rows_reference`] in f32 on the same (dtype-rounded) inputs. Returns the
/// largest relative error `|got − ref| / max(|ref|, 0.1)` of (2) (outputs are O(1)); compare it
/// with [`tolerance`]. Before each product the memory its output would get is poisoned with NaN
/// (a freed GPU block is reused by the next allocation of its size), so an element never
/// written shows up as a non-finite output, which is an error.
pub fn check_against_reference(device: &Device, dtype: DType, seed: u64) -> Result<f32> {
    use rand::{Rng, SeedableRng};
    let mut worst = 0f32;
    for (ci, &(m, rows, cols, blocksize, double)) in CHECK_CASES.iter().enumerate() {
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(ci as u64));
        let scale = 1.0 / (cols as f32).sqrt();
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        let mut packed = super::nf4::quantize_nf4(&w, rows, cols, blocksize)
            .map_err(|e| candle_core::Error::msg(format!("nf4 check: {e}")))?;
        if double {
            packed.double_quantize();
        }
        let packed = Arc::new(packed);
        let dev_w = Nf4Device::upload(packed.clone(), device)?;

        let got = dev_w.dequantize(dtype)?;
        let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let want = Tensor::from_vec(packed.dequantize(), rows * cols, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        if let Some(i) = (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            bail!(
                "nf4 check case {ci}: dequantized [{}, {}] = {} but the CPU gives {}",
                i / cols,
                i % cols,
                got[i],
                want[i]
            );
        }

        let x: Vec<f32> = (0..m * cols)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(x, (m, cols), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        drop(Tensor::full(f32::NAN, (m, rows), device)?.to_dtype(dtype)?);
        let got = dev_w
            .matmul(&x)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let tables = tables_of(&packed);
        let shape = Nf4Shape {
            rows,
            cols,
            blocksize,
        };
        let want = rows_reference(&xv, m, &packed.data, &tables, shape);
        for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
            if !g.is_finite() {
                bail!(
                    "nf4 check case {ci}: output [{}, {}] is {g} (reference {r})",
                    i / rows,
                    i % rows
                );
            }
            worst = worst.max((g - r).abs() / r.abs().max(0.1));
        }
    }
    Ok(worst)
}
