//! Per-row LoRA: one batched projection where every row of the batch gets its own adapter set
//! ("BGMV/SGMV"-style), in one operation instead of one matmul pair per adapter.
//!
//! For `x: [N, in]`, the base projection's output `y: [N, out]`, adapter sets `s` with
//! `A_s: [R_s, in]` and `Bt_s: [R_s, out]` (Bᵀ with the LoRA scaling folded in) and a per-row set
//! index `row_set[n]` (`u32::MAX`: no adapter):
//!
//! `out[n, o] = y[n, o] + Σ_{r < R_s} (Σ_i x[n, i] · A_s[r, i]) · Bt_s[r, o]`, `s = row_set[n]`,
//!
//! accumulated in f32 and rounded once to the output dtype; rows without a set are copies of `y`.
//! [`apply_lora_rows`] runs it as a candle custom op: on the CPU through [`lora_rows_reference`],
//! on CUDA through the project's shrink/expand kernels (`runtime::cuda::lora_rows`).
//! [`check_against_reference`] is the device check that compares a device with the reference.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

/// The largest rank a set may have (the GPU kernels stage `t[row, :rank]` in shared memory).
pub const MAX_RANK: usize = 256;
/// `row_set` value of a row without an adapter.
pub const NO_SET: u32 = u32::MAX;

/// One adapter set's low-rank pair for one projection: `a` [R, in], `bt` [R, out], on the same
/// device and dtype as `x`.
#[derive(Clone, Copy, Debug)]
pub struct LoraSetRef<'a> {
    pub a: &'a Tensor,
    pub bt: &'a Tensor,
}

/// `y` plus each row's low-rank delta (see the module doc). `row_set.len() == N`;
/// `row_set[n] == u32::MAX`: row `n` has no adapter and is copied from `y`.
///
/// Errors (never panics) on shapes that do not fit, dtypes other than f32/bf16/f16 or that
/// differ, tensors on different devices, ranks outside `1..=256` and set indices out of range.
pub fn apply_lora_rows(
    x: &Tensor,
    y: &Tensor,
    sets: &[LoraSetRef<'_>],
    row_set: &[u32],
) -> Result<Tensor> {
    let (n, in_dim, out_dim, ranks) = validate(x, y, sets, row_set)?;
    if n == 0 || out_dim == 0 || row_set.iter().all(|&s| s == NO_SET) {
        return Ok(y.clone());
    }
    let sets = sets
        .iter()
        .zip(ranks)
        .map(|(s, rank)| {
            Ok(LoraSetTensors {
                a: s.a.contiguous()?,
                bt: s.bt.contiguous()?,
                rank,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let op = LoraRowsOp {
        sets,
        row_set: row_set.to_vec(),
        n,
        in_dim,
        out_dim,
    };
    x.contiguous()?.apply_op2_no_bwd(&y.contiguous()?, &op)
}

/// The CPU reference of [`apply_lora_rows`] on plain row-major f32 slices: `x` [n, in],
/// `y` [n, out], each set `(a [rank, in], bt [rank, out], rank)`. Accumulates in f32; rows whose
/// `row_set` entry is `u32::MAX` are copies of `y`.
///
/// # Panics
/// On slice lengths that do not match `n`, `in_`, `out` and the ranks, or a set index out of
/// range: it is the reference for tests and device checks, which build consistent inputs.
pub fn lora_rows_reference(
    x: &[f32],
    y: &[f32],
    n: usize,
    in_: usize,
    out: usize,
    sets: &[(&[f32], &[f32], usize)],
    row_set: &[u32],
) -> Vec<f32> {
    assert_eq!(x.len(), n * in_, "lora_rows_reference: x is not [n, in]");
    assert_eq!(y.len(), n * out, "lora_rows_reference: y is not [n, out]");
    assert_eq!(row_set.len(), n, "lora_rows_reference: row_set is not [n]");
    for (i, (a, bt, rank)) in sets.iter().enumerate() {
        assert_eq!(
            a.len(),
            rank * in_,
            "lora_rows_reference: set {i}: a is not [rank, in]"
        );
        assert_eq!(
            bt.len(),
            rank * out,
            "lora_rows_reference: set {i}: bt is not [rank, out]"
        );
    }
    let mut res = y.to_vec();
    if out == 0 {
        return res;
    }
    res.par_chunks_mut(out)
        .enumerate()
        .for_each(|(row, out_row)| {
            let s = row_set[row];
            if s == NO_SET {
                return;
            }
            let Some(&(a, bt, rank)) = sets.get(s as usize) else {
                panic!("lora_rows_reference: row {row}: set {s} of {}", sets.len());
            };
            let xr = &x[row * in_..(row + 1) * in_];
            let mut delta = vec![0f32; out];
            for r in 0..rank {
                let t: f32 = xr
                    .iter()
                    .zip(&a[r * in_..(r + 1) * in_])
                    .map(|(x, a)| x * a)
                    .sum();
                for (d, b) in delta.iter_mut().zip(&bt[r * out..(r + 1) * out]) {
                    *d += t * b;
                }
            }
            for (o, d) in out_row.iter_mut().zip(delta) {
                *o += d;
            }
        });
    res
}

/// One set's tensors as the op holds them: contiguous clones and the validated rank.
pub(crate) struct LoraSetTensors {
    pub(crate) a: Tensor,
    pub(crate) bt: Tensor,
    pub(crate) rank: usize,
}

/// The custom op on `(x, y)`: the sets and the row→set map travel in the op.
pub(crate) struct LoraRowsOp {
    pub(crate) sets: Vec<LoraSetTensors>,
    pub(crate) row_set: Vec<u32>,
    pub(crate) n: usize,
    pub(crate) in_dim: usize,
    pub(crate) out_dim: usize,
}

/// Checks every shape, dtype, device, rank and set index; returns `(N, in, out, ranks)`.
fn validate(
    x: &Tensor,
    y: &Tensor,
    sets: &[LoraSetRef<'_>],
    row_set: &[u32],
) -> Result<(usize, usize, usize, Vec<usize>)> {
    let dtype = x.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        bail!("lora_rows: dtype {dtype:?} is not supported (f32, bf16 or f16)");
    }
    let (n, in_dim) = match x.dims() {
        &[n, i] => (n, i),
        d => bail!("lora_rows: x must be [N, in], got {d:?}"),
    };
    let out_dim = match y.dims() {
        &[yn, o] if yn == n => o,
        d => bail!("lora_rows: y must be [N = {n}, out], got {d:?}"),
    };
    if y.dtype() != dtype {
        bail!("lora_rows: y is {:?}, x is {dtype:?}", y.dtype());
    }
    if !y.device().same_device(x.device()) {
        bail!("lora_rows: y is on {:?}, x on {:?}", y.device(), x.device());
    }
    if row_set.len() != n {
        bail!(
            "lora_rows: row_set has {} entries for {n} rows",
            row_set.len()
        );
    }
    let mut ranks = Vec::with_capacity(sets.len());
    for (i, s) in sets.iter().enumerate() {
        let rank = match s.a.dims() {
            &[r, i2] if i2 == in_dim => r,
            d => bail!("lora_rows: set {i}: a must be [rank, in = {in_dim}], got {d:?}"),
        };
        match s.bt.dims() {
            &[r, o] if r == rank && o == out_dim => {}
            d => {
                bail!("lora_rows: set {i}: bt must be [rank = {rank}, out = {out_dim}], got {d:?}")
            }
        }
        if !(1..=MAX_RANK).contains(&rank) {
            bail!("lora_rows: set {i}: rank {rank} is outside 1..={MAX_RANK}");
        }
        for (name, t) in [("a", s.a), ("bt", s.bt)] {
            if t.dtype() != dtype {
                bail!(
                    "lora_rows: set {i}: {name} is {:?}, x is {dtype:?}",
                    t.dtype()
                );
            }
            if !t.device().same_device(x.device()) {
                bail!(
                    "lora_rows: set {i}: {name} is on {:?}, x on {:?}",
                    t.device(),
                    x.device()
                );
            }
        }
        ranks.push(rank);
    }
    if let Some((row, &s)) = row_set
        .iter()
        .enumerate()
        .find(|&(_, &s)| s != NO_SET && s as usize >= sets.len())
    {
        bail!(
            "lora_rows: row {row} names set {s}, there are {} sets",
            sets.len()
        );
    }
    Ok((n, in_dim, out_dim, ranks))
}

/// The contiguous f32/bf16/f16 data of a CPU storage as f32 (borrowed when already f32).
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Cow<'a, [f32]>> {
    let Some((lo, hi)) = l.contiguous_offsets() else {
        bail!("lora_rows: {what} is not contiguous");
    };
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[lo..hi]),
        CpuStorage::BF16(v) => Cow::Owned(v[lo..hi].iter().map(|e| e.to_f32()).collect()),
        CpuStorage::F16(v) => Cow::Owned(v[lo..hi].iter().map(|e| e.to_f32()).collect()),
        other => bail!("lora_rows: {what} is {:?}", other.dtype()),
    })
}

impl CustomOp2 for LoraRowsOp {
    fn name(&self) -> &'static str {
        "lora-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, in_dim, out_dim) = (self.n, self.in_dim, self.out_dim);
        let x = cpu_f32(s1, l1, "x")?;
        let y = cpu_f32(s2, l2, "y")?;
        if x.len() != n * in_dim || y.len() != n * out_dim {
            bail!("lora_rows: x or y changed shape since validation");
        }
        // Only the sets some row uses are read (and converted when not f32).
        let mut used = vec![false; self.sets.len()];
        for &s in self.row_set.iter().filter(|&&s| s != NO_SET) {
            match used.get_mut(s as usize) {
                Some(u) => *u = true,
                None => bail!("lora_rows: set index {s} out of range"),
            }
        }
        let guards = self
            .sets
            .iter()
            .zip(&used)
            .map(|(s, &u)| {
                u.then(|| {
                    let (ga, la) = s.a.storage_and_layout();
                    let (gb, lb) = s.bt.storage_and_layout();
                    (ga, la.clone(), gb, lb.clone(), s.rank)
                })
            })
            .collect::<Vec<_>>();
        let mut data = Vec::with_capacity(guards.len());
        for (i, g) in guards.iter().enumerate() {
            data.push(match g {
                None => None,
                Some((ga, la, gb, lb, rank)) => {
                    let (Storage::Cpu(a), Storage::Cpu(bt)) = (&**ga, &**gb) else {
                        bail!("lora_rows: set {i} is not on the CPU");
                    };
                    let (a, bt) = (cpu_f32(a, la, "a")?, cpu_f32(bt, lb, "bt")?);
                    if a.len() != rank * in_dim || bt.len() != rank * out_dim {
                        bail!("lora_rows: set {i} changed shape since validation");
                    }
                    Some((a, bt, *rank))
                }
            });
        }
        let sets: Vec<(&[f32], &[f32], usize)> = data
            .iter()
            .map(|d| match d {
                Some((a, bt, rank)) => (&a[..], &bt[..], *rank),
                None => (&[][..], &[][..], 0),
            })
            .collect();
        let res = lora_rows_reference(&x, &y, n, in_dim, out_dim, &sets, &self.row_set);
        let storage = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(res),
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(res.into_iter().map(half::bf16::from_f32).collect())
            }
            CpuStorage::F16(_) => {
                CpuStorage::F16(res.into_iter().map(half::f16::from_f32).collect())
            }
            other => bail!("lora_rows: x is {:?}", other.dtype()),
        };
        Ok((storage, Shape::from_dims(&[n, out_dim])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::lora_rows::{cuda_fwd, LoraRowsLaunch, SetRef};
        let launch = LoraRowsLaunch {
            sets: self
                .sets
                .iter()
                .map(|s| SetRef {
                    a: &s.a,
                    bt: &s.bt,
                    rank: s.rank,
                })
                .collect(),
            row_set: &self.row_set,
            n: self.n,
            in_dim: self.in_dim,
            out_dim: self.out_dim,
        };
        cuda_fwd(&launch, s1, l1, s2, l2)
    }
}

pub use super::kernel_tolerance as tolerance;

/// The shapes [`check_against_reference`] runs: (rows, in, out, sets, element offset of `x` in
/// its buffer). 1: 64 rows over 40 sets, ranks mixed, a hot set spanning several row tiles;
/// 2: odd sizes and an unaligned `x` (the kernels' element-wise path); 3: few long rows (the
/// shrink splits `in` over several blocks).
const CHECK_CASES: [(usize, usize, usize, usize, usize); 3] = [
    (64, 512, 768, 40, 0),
    (64, 509, 771, 40, 1),
    (3, 4096, 1024, 2, 0),
];

const CHECK_RANKS: [usize; 5] = [1, 8, 16, 64, 256];

/// Runs [`apply_lora_rows`] on `device` in `dtype` on seeded random inputs (64 rows over 40 sets
/// with ranks {1, 8, 16, 64, 256} mixed and some rows without a set, plus an odd-sized unaligned
/// case and a few-long-rows case) and compares with [`lora_rows_reference`] on the same
/// (dtype-rounded) inputs. Returns the largest relative error `|got − ref| / max(|ref|, 0.1)`
/// (outputs are O(1)); compare it with [`tolerance`]. Before each run the memory an output of
/// the same size would get is poisoned with NaN (on CUDA a freed block is reused by the next
/// allocation of its size), so an element the device never writes shows up: any non-finite
/// output, or a row without a set that is not bit-for-bit `y`, is an error.
pub fn check_against_reference(device: &Device, dtype: DType, seed: u64) -> Result<f32> {
    let mut worst = 0f32;
    for (i, case) in CHECK_CASES.iter().enumerate() {
        let err = check_case(device, dtype, seed.wrapping_add(i as u64), *case)?;
        worst = worst.max(err);
    }
    Ok(worst)
}

fn check_case(
    device: &Device,
    dtype: DType,
    seed: u64,
    (n, in_dim, out_dim, n_sets, x_offset): (usize, usize, usize, usize, usize),
) -> Result<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut uniform = |len: usize, scale: f32| -> Vec<f32> {
        (0..len)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect()
    };
    // Tensors on the device, and the values they hold (after rounding to dtype) for the reference.
    let make = |data: Vec<f32>, dims: &[usize], offset: usize| -> Result<(Tensor, Vec<f32>)> {
        let len = data.len();
        let t = Tensor::from_vec(data, len, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?
            .narrow(0, offset, len - offset)?
            .reshape(dims)?;
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((t, values))
    };
    let (x, xv) = make(uniform(n * in_dim + x_offset, 1.0), &[n, in_dim], x_offset)?;
    let (y, yv) = make(uniform(n * out_dim, 1.0), &[n, out_dim], 0)?;
    let mut set_tensors = Vec::with_capacity(n_sets);
    for s in 0..n_sets {
        let rank = CHECK_RANKS[s % CHECK_RANKS.len()];
        let (a_scale, bt_scale) = (1.0 / (in_dim as f32).sqrt(), 1.0 / (rank as f32).sqrt());
        let a = make(uniform(rank * in_dim, a_scale), &[rank, in_dim], 0)?;
        let bt = make(uniform(rank * out_dim, bt_scale), &[rank, out_dim], 0)?;
        set_tensors.push((a, bt, rank));
    }
    // Every 7th row has no set, every 3rd the hot set (rank 256 when there are 5+ sets), the
    // others a random one.
    let hot = (CHECK_RANKS.len() - 1).min(n_sets - 1) as u32;
    let row_set: Vec<u32> = (0..n)
        .map(|row| match row {
            r if r % 7 == 2 => NO_SET,
            r if r % 3 == 0 => hot,
            _ => rng.random_range(0..n_sets as u32),
        })
        .collect();

    let r_max = CHECK_RANKS[CHECK_RANKS.len() - 1];
    drop(Tensor::full(f32::NAN, (n, out_dim), device)?.to_dtype(dtype)?);
    drop(Tensor::full(f32::NAN, (4, n, r_max), device)?);
    let refs: Vec<LoraSetRef<'_>> = set_tensors
        .iter()
        .map(|((a, _), (bt, _), _)| LoraSetRef { a, bt })
        .collect();
    let got = apply_lora_rows(&x, &y, &refs, &row_set)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;

    let sets: Vec<(&[f32], &[f32], usize)> = set_tensors
        .iter()
        .map(|((_, a), (_, bt), rank)| (&a[..], &bt[..], *rank))
        .collect();
    let want = lora_rows_reference(&xv, &yv, n, in_dim, out_dim, &sets, &row_set);
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let (row, col) = (i / out_dim, i % out_dim);
        if !g.is_finite() {
            bail!("lora_rows check: output [{row}, {col}] is {g} (reference {w})");
        }
        if row_set[row] == NO_SET && g.to_bits() != yv[i].to_bits() {
            bail!(
                "lora_rows check: row {row} has no set but [{row}, {col}] = {g} != y = {}",
                yv[i]
            );
        }
        worst = worst.max((g - w).abs() / w.abs().max(0.1));
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<f32> {
        crate::quant::test_noise(len, seed)
    }

    fn t2(data: Vec<f32>, rows: usize, cols: usize) -> Tensor {
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn reference_matches_per_row_matmuls() -> Result<()> {
        let (n, in_dim, out_dim) = (9, 48, 40);
        let ranks = [1, 8, 16, 64, 256];
        let x = noise(n * in_dim, 1);
        let y = noise(n * out_dim, 2);
        let a: Vec<Vec<f32>> = (0..5)
            .map(|s| noise(ranks[s] * in_dim, 10 + s as u64))
            .collect();
        let bt: Vec<Vec<f32>> = (0..5)
            .map(|s| noise(ranks[s] * out_dim, 20 + s as u64))
            .collect();
        let row_set = [0, 1, NO_SET, 2, 3, 4, 4, NO_SET, 1];
        let sets: Vec<(&[f32], &[f32], usize)> =
            (0..5).map(|s| (&a[s][..], &bt[s][..], ranks[s])).collect();
        let got = lora_rows_reference(&x, &y, n, in_dim, out_dim, &sets, &row_set);
        for (row, &s) in row_set.iter().enumerate() {
            let y_row = t2(y[row * out_dim..(row + 1) * out_dim].to_vec(), 1, out_dim);
            let want = if s == NO_SET {
                y_row
            } else {
                let s = s as usize;
                let x_row = t2(x[row * in_dim..(row + 1) * in_dim].to_vec(), 1, in_dim);
                let a_s = t2(a[s].clone(), ranks[s], in_dim);
                let bt_s = t2(bt[s].clone(), ranks[s], out_dim);
                (x_row.matmul(&a_s.t()?)?.matmul(&bt_s)? + y_row)?
            };
            let want = want.flatten_all()?.to_vec1::<f32>()?;
            for (g, w) in got[row * out_dim..(row + 1) * out_dim].iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "row {row}: {g} vs {w}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn cpu_op_matches_reference_in_every_dtype() -> Result<()> {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for seed in [0, 7] {
                let err = check_against_reference(&Device::Cpu, dtype, seed)?;
                assert!(err <= tolerance(dtype), "{dtype:?} seed {seed}: {err}");
                if dtype == DType::F32 {
                    assert_eq!(err, 0.0, "the CPU op is the reference in f32");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn non_contiguous_inputs_empty_batches_and_no_sets() -> Result<()> {
        let (n, in_dim, out_dim) = (5, 6, 7);
        let x = t2(noise(n * in_dim, 3), in_dim, n).t()?; // [n, in], transposed storage
        let y = t2(noise(n * out_dim, 4), n, out_dim);
        let a = t2(noise(2 * in_dim, 5), 2, in_dim);
        let bt = t2(noise(out_dim * 2, 6), out_dim, 2).t()?;
        let sets = [LoraSetRef { a: &a, bt: &bt }];
        let row_set = [0, NO_SET, 0, 0, NO_SET];
        let got = apply_lora_rows(&x, &y, &sets, &row_set)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (xv, yv) = (x.contiguous()?.flatten_all()?, y.flatten_all()?);
        let (av, btv) = (a.flatten_all()?, bt.contiguous()?.flatten_all()?);
        let want = lora_rows_reference(
            &xv.to_vec1()?,
            &yv.to_vec1()?,
            n,
            in_dim,
            out_dim,
            &[(&av.to_vec1()?, &btv.to_vec1()?, 2)],
            &row_set,
        );
        assert_eq!(got, want);

        let none = apply_lora_rows(&x, &y, &sets, &[NO_SET; 5])?;
        assert_eq!(none.to_vec2::<f32>()?, y.to_vec2::<f32>()?);
        let (x0, y0) = (x.narrow(0, 0, 0)?, y.narrow(0, 0, 0)?);
        assert_eq!(apply_lora_rows(&x0, &y0, &sets, &[])?.dims(), &[0, out_dim]);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> Result<()> {
        let (n, in_dim, out_dim) = (4, 8, 6);
        let x = t2(noise(n * in_dim, 1), n, in_dim);
        let y = t2(noise(n * out_dim, 2), n, out_dim);
        let (a, bt) = (t2(noise(16, 3), 2, in_dim), t2(noise(12, 4), 2, out_dim));
        let rows = [0, NO_SET, 0, 0];
        let sets = |a, bt| [LoraSetRef { a, bt }];
        assert!(apply_lora_rows(&x, &y, &sets(&a, &bt), &rows).is_ok());

        let expect_err = |x: &Tensor, y: &Tensor, s: [LoraSetRef; 1], rows: &[u32], needle| {
            let res = apply_lora_rows(x, y, &s, rows);
            let msg = res.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains(needle), "expected {needle:?}, got {msg:?}");
        };
        let ok = || sets(&a, &bt);
        expect_err(&x.unsqueeze(0)?, &y, ok(), &rows, "x must be [N, in]");
        expect_err(
            &x,
            &y.narrow(0, 0, 3)?,
            ok(),
            &rows,
            "y must be [N = 4, out]",
        );
        expect_err(&x, &y, ok(), &rows[..3], "row_set has 3 entries");
        expect_err(&x, &y, ok(), &[0, 1, 0, 0], "row 1 names set 1");
        let a_in = t2(noise(14, 3), 2, 7);
        expect_err(&x, &y, sets(&a_in, &bt), &rows, "a must be [rank, in = 8]");
        let bt_rank = t2(noise(18, 4), 3, out_dim);
        let msg = "bt must be [rank = 2, out = 6]";
        expect_err(&x, &y, sets(&a, &bt_rank), &rows, msg);
        let a_big = t2(noise(257 * in_dim, 3), 257, in_dim);
        let bt_big = t2(noise(257 * out_dim, 4), 257, out_dim);
        let msg = "rank 257 is outside 1..=256";
        expect_err(&x, &y, sets(&a_big, &bt_big), &rows, msg);
        let (a0, bt0) = (a.narrow(0, 0, 0)?, bt.narrow(0, 0, 0)?);
        expect_err(&x, &y, sets(&a0, &bt0), &rows, "rank 0 is outside");

        let y16 = y.to_dtype(DType::BF16)?;
        expect_err(&x, &y16, ok(), &rows, "y is BF16, x is F32");
        let bt16 = bt.to_dtype(DType::F16)?;
        expect_err(&x, &y, sets(&a, &bt16), &rows, "set 0: bt is F16, x is F32");
        let (x64, y64) = (x.to_dtype(DType::F64)?, y.to_dtype(DType::F64)?);
        expect_err(&x64, &y64, ok(), &rows, "F64 is not supported");
        Ok(())
    }
}
