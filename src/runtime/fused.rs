//! Two fused steps of a decoder block, one launch each on a GPU instead of two:
//!
//! - [`add_rms_norm`]: `s = x + d` (the residual add, rounded to the dtype) and `n = rms_norm(s)
//!   · w` (f32 sum of squares over the row, `s · rsqrt(mean + eps) · w`, rounded once);
//! - [`silu_mul`]: `silu(g) · u` (SiLU rounded to the dtype, as candle's op leaves it, then the
//!   product rounded).
//!
//! On the CPU (and on a GPU with `LORAPLEX_FUSED=0`, to measure the difference) they are the
//! candle ops the block used before, so CPU results do not change. On CUDA they are candle
//! custom ops over the kernels of `kernels/fused.cu`; the ops' `cpu_fwd` is the same math on
//! slices, the reference [`check_against_reference`] compares a device with.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};
use half::{bf16, f16};

/// Whether the fused kernels run on a GPU (`LORAPLEX_FUSED=0` turns them off; read once).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LORAPLEX_FUSED").map_or(true, |v| v != "0"))
}

fn fused_here(t: &Tensor) -> bool {
    t.device().is_cuda() && enabled()
}

/// `(x + d, rms_norm(x + d) · w)` for `x`, `d`: `[rows, cols]` (or any shape ending in `cols`),
/// `w`: `[cols]`.
pub fn add_rms_norm(x: &Tensor, d: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    if !fused_here(x) {
        let s = (x + d)?;
        let n = candle_nn::ops::rms_norm(&s, w, eps)?;
        return Ok((s, n));
    }
    let dims = x.dims().to_vec();
    let cols = *dims.last().unwrap_or(&0);
    if d.dims() != dims || w.dims() != [cols] || cols == 0 {
        bail!(
            "add_rms_norm: x {:?}, d {:?}, w {:?} do not fit",
            x.dims(),
            d.dims(),
            w.dims()
        );
    }
    let rows = x.elem_count() / cols;
    let op = AddRmsNormOp { rows, cols, eps };
    let both = x
        .contiguous()?
        .apply_op3_no_bwd(&d.contiguous()?, &w.contiguous()?, &op)?;
    Ok((
        both.get(0)?.reshape(dims.as_slice())?,
        both.get(1)?.reshape(dims.as_slice())?,
    ))
}

/// `silu(g) · u` for `g`, `u` of one shape.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if !fused_here(g) {
        return g.silu()? * u;
    }
    if g.dims() != u.dims() {
        bail!("silu_mul: g {:?} and u {:?} differ", g.dims(), u.dims());
    }
    g.contiguous()?
        .apply_op2_no_bwd(&u.contiguous()?, &SiluMulOp)
}

/// `x` in f32 after rounding to `dtype` (what a value of that dtype holds).
fn round(v: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(v).to_f32(),
        DType::F16 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// The CPU reference of the fused add + RMSNorm, on f32 values of `dtype`: returns `(s, n)`.
pub fn add_rms_norm_reference(
    x: &[f32],
    d: &[f32],
    w: &[f32],
    cols: usize,
    eps: f32,
    dtype: DType,
) -> (Vec<f32>, Vec<f32>) {
    let s: Vec<f32> = x.iter().zip(d).map(|(a, b)| round(a + b, dtype)).collect();
    let mut n = vec![0f32; s.len()];
    for (sr, nr) in s.chunks(cols).zip(n.chunks_mut(cols)) {
        let ss: f32 = sr.iter().map(|v| v * v).sum();
        let scale = 1.0 / (ss / cols as f32 + eps).sqrt();
        for ((o, v), wv) in nr.iter_mut().zip(sr).zip(w) {
            *o = round(v * scale * wv, dtype);
        }
    }
    (s, n)
}

/// The CPU reference of the fused SiLU · up, on f32 values of `dtype`.
pub fn silu_mul_reference(g: &[f32], u: &[f32], dtype: DType) -> Vec<f32> {
    g.iter()
        .zip(u)
        .map(|(&gv, &uv)| round(round(gv / (1.0 + (-gv).exp()), dtype) * uv, dtype))
        .collect()
}

/// A float CPU storage's values in f32.
fn values(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let Some((lo, hi)) = l.contiguous_offsets() else {
        bail!("fused op: input not contiguous");
    };
    Ok(match s {
        CpuStorage::F32(v) => v[lo..hi].to_vec(),
        CpuStorage::BF16(v) => v[lo..hi].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[lo..hi].iter().map(|x| x.to_f32()).collect(),
        other => bail!("fused op: dtype {:?} is not supported", other.dtype()),
    })
}

fn storage(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        other => bail!("fused op: dtype {other:?} is not supported"),
    })
}

/// `(x, d, w) → [2, rows, cols]`: the sum, then the normalised sum.
pub(crate) struct AddRmsNormOp {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) eps: f32,
}

impl CustomOp3 for AddRmsNormOp {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        d: &CpuStorage,
        ld: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xv, dv, wv) = (values(x, lx)?, values(d, ld)?, values(w, lw)?);
        if xv.len() != self.rows * self.cols || dv.len() != xv.len() || wv.len() != self.cols {
            bail!("add_rms_norm: inputs changed shape");
        }
        let (mut s, n) = add_rms_norm_reference(&xv, &dv, &wv, self.cols, self.eps, x.dtype());
        s.extend(n);
        Ok((
            storage(s, x.dtype())?,
            Shape::from_dims(&[2, self.rows, self.cols]),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        d: &candle_core::CudaStorage,
        ld: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::fused::add_rms_norm(
            (x, lx),
            (d, ld),
            (w, lw),
            self.rows,
            self.cols,
            self.eps,
        )?;
        Ok((out, Shape::from_dims(&[2, self.rows, self.cols])))
    }
}

/// `(g, u) → silu(g) · u`.
pub(crate) struct SiluMulOp;

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gv, uv) = (values(g, lg)?, values(u, lu)?);
        if gv.len() != uv.len() {
            bail!("silu_mul: inputs differ in size");
        }
        let out = silu_mul_reference(&gv, &uv, g.dtype());
        Ok((storage(out, g.dtype())?, lg.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        u: &candle_core::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::fused::silu_mul((g, lg), (u, lu))?;
        Ok((out, lg.shape().clone()))
    }
}

/// The largest relative error [`check_against_reference`] accepts for `dtype`: a few roundings
/// of the dtype (candle's CPU ops round SiLU's steps in bf16 one by one; the fused ops round
/// once per step), and f32 sums in another order.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 2e-3,
        _ => 1e-5,
    }
}

/// Compares both fused ops on `device` (the custom ops, whatever `LORAPLEX_FUSED` says) with
/// candle's unfused ops on the CPU, on random inputs of the dtype: rows 1, 7 and 64 of widths
/// 4096, 576 and 100. Returns the largest relative error `|got − ref| / max(|ref|, 0.1)`;
/// non-finite outputs are errors.
pub fn check_against_reference(device: &Device, dtype: DType, seed: u64) -> Result<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut worst = 0f32;
    for (rows, cols) in [(1usize, 4096usize), (7, 576), (64, 100)] {
        let mut rand = |n: usize, lo: f32, hi: f32| -> Result<Tensor> {
            let v: Vec<f32> = (0..n)
                .map(|_| lo + (hi - lo) * rng.random::<f32>())
                .collect();
            Tensor::from_vec(v, n, &Device::Cpu)?.to_dtype(dtype)
        };
        let (x, d) = (rand(rows * cols, -2.0, 2.0)?, rand(rows * cols, -2.0, 2.0)?);
        let w = rand(cols, 0.5, 1.5)?;
        let (g, u) = (rand(rows * cols, -6.0, 6.0)?, rand(rows * cols, -2.0, 2.0)?);
        let on = |t: &Tensor, dims: &[usize]| t.reshape(dims)?.to_device(device);
        let op = AddRmsNormOp {
            rows,
            cols,
            eps: 1e-5,
        };
        let both = on(&x, &[rows, cols])?.apply_op3_no_bwd(
            &on(&d, &[rows, cols])?,
            &on(&w, &[cols])?,
            &op,
        )?;
        let got_s = both.get(0)?;
        let got_n = both.get(1)?;
        let got_a = on(&g, &[rows, cols])?.apply_op2_no_bwd(&on(&u, &[rows, cols])?, &SiluMulOp)?;
        // The unfused candle ops on the CPU.
        let (x, d, g, u) = (
            x.reshape((rows, cols))?,
            d.reshape((rows, cols))?,
            g.reshape((rows, cols))?,
            u.reshape((rows, cols))?,
        );
        let want_s = (&x + &d)?;
        let want_n = candle_nn::ops::rms_norm(&want_s, &w, 1e-5)?;
        let want_a = (g.silu()? * &u)?;
        for (got, want, what) in [
            (got_s, want_s, "sum"),
            (got_n, want_n, "rms_norm"),
            (got_a, want_a, "silu_mul"),
        ] {
            let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let want = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                if !a.is_finite() {
                    bail!(
                        "fused check: {what} [{}, {}] is {a} (reference {b})",
                        i / cols,
                        i % cols
                    );
                }
                worst = worst.max((a - b).abs() / b.abs().max(0.1));
            }
        }
    }
    Ok(worst)
}
