//! Error-compensating NF4 rounding (GPTQ, Frantar et al. 2022) that still writes ordinary
//! bitsandbytes NF4: the same codebook, blocks of `blocksize` along each row, one absmax per
//! block, so the result loads, serves and serializes exactly like `quantize_nf4`'s.
//!
//! Plain NF4 rounds each weight to its nearest code. GPTQ rounds the columns of a layer one after
//! another and spreads each column's rounding error over the columns not yet rounded, weighted by
//! the inverse Hessian `H = Σ x xᵀ` of the layer's inputs on calibration data, so the layer's
//! *outputs* on such inputs move as little as possible. Per row and rounding step `i`:
//! `q = nf4(w_i)`, `e = (w_i - q) / U_ii`, `w_j -= e · U_ij` for later steps `j`, with `U` the
//! upper Cholesky factor of `H⁻¹` (`H⁻¹ = Uᵀ U`) in rounding order.
//!
//! Rounding order and scales (`GptqSettings`): by default columns go by decreasing input energy
//! (`H_jj`, GPTQ's act-order) and each block's absmax is fixed before rounding — shrunk by up to
//! 20% where that rounds the block with less input-weighted error, and double-quantized first when
//! asked (each block's 8-bit scale re-picked among its neighbours on the 8-bit grid), so rounding
//! sees the scales the file stores (`quant::scale_search`). In natural order a block's absmax is
//! instead taken from its error-adjusted weights when the block is reached (GPTQ's group scales).
//! On the default model act-order with searched scales is what brings held-out perplexity within
//! ~1% of the dense model's (BENCHMARKS.md).
//!
//! Rows are independent, so they run in parallel, a tile of rows at a time (one pass over `U` per
//! tile). With a diagonal `H`, unshrunk scales and no double quantization nothing is spread and the
//! result is `quantize_nf4`'s, bit for bit.

use super::nf4::{quantize_nf4, quantize_nf4_value, Absmax, Nf4Packed, NF4_CODE};
use super::scale_search::{refine_nested_scales, searched_scales};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Rows rounded together per pass over `U`.
const ROW_TILE: usize = 16;

/// The running sum `Σ x xᵀ` over the inputs a linear layer saw (its proxy Hessian).
#[derive(Clone, Debug)]
pub struct Hessian {
    n: usize,
    sum: Vec<f64>,
}

impl Hessian {
    /// An empty sum for a layer with `n` input features.
    pub fn new(n: usize) -> Self {
        Self {
            n,
            sum: vec![0.0; n * n],
        }
    }

    /// The sum with rows and columns reordered: entry `(i, j)` is the old `(order[i], order[j])`.
    fn permuted(&self, order: &[usize]) -> Hessian {
        let n = self.n;
        let mut sum = vec![0f64; n * n];
        for (i, &oi) in order.iter().enumerate() {
            for (j, &oj) in order.iter().enumerate() {
                sum[i * n + j] = self.sum[oi * n + oj];
            }
        }
        Hessian { n, sum }
    }

    /// Adds the rows of `x` (`[rows, n]`, any float dtype).
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let x = x.to_dtype(DType::F32)?;
        let (_, n) = x.dims2()?;
        if n != self.n {
            bail!(
                "calibration: input has {n} features, the layer takes {}",
                self.n
            );
        }
        let xtx: Vec<f32> = x.t()?.matmul(&x)?.flatten_all()?.to_vec1()?;
        for (s, v) in self.sum.iter_mut().zip(xtx) {
            *s += v as f64;
        }
        Ok(())
    }
}

/// Settings of [`gptq_nf4`].
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct GptqSettings {
    /// Elements per absmax block along a row (bitsandbytes' default is 64).
    pub blocksize: usize,
    /// Dampening added to the Hessian's diagonal, as a fraction of its mean (GPTQ uses 0.01).
    pub damp: f64,
    /// Round columns by decreasing input energy (GPTQ's `act_order`), with each block's absmax
    /// fixed beforehand from the weights (plain NF4's scales).
    pub act_order: bool,
    /// With `act_order`: each block's scale is the one of `absmax · {1, 0.98, .., 0.8}` that
    /// rounds the block with the least input-weighted error (`Σ H_jj (w_j - q_j)²`); values
    /// beyond it take the end codes; with `double_quant`, the stored 8-bit scale is re-picked
    /// the same way among its neighbours. Still plain bitsandbytes NF4 to whoever loads it.
    pub search_scales: bool,
    /// QLoRA's double quantization of the block scales (with `act_order` applied before rounding,
    /// so rounding uses the scales that are stored; otherwise after).
    pub double_quant: bool,
}

impl Default for GptqSettings {
    fn default() -> Self {
        Self {
            blocksize: super::nf4::DEFAULT_BLOCKSIZE,
            damp: 0.01,
            act_order: true,
            search_scales: true,
            double_quant: false,
        }
    }
}

/// Quantizes a row-major `[rows, cols]` weight to NF4, rounding so that the layer's outputs on
/// inputs described by `h` change least. `cols` must be a multiple of the block size.
pub fn gptq_nf4(
    weight: &[f32],
    rows: usize,
    cols: usize,
    h: &Hessian,
    s: &GptqSettings,
) -> Result<Nf4Packed> {
    if weight.len() != rows * cols {
        bail!(
            "gptq: weight has {} elements, shape [{rows}, {cols}] needs {}",
            weight.len(),
            rows * cols
        );
    }
    if h.n != cols {
        bail!(
            "gptq: the Hessian is {0}x{0}, the weight has {cols} columns",
            h.n
        );
    }
    let bs = s.blocksize;
    if bs == 0 || !bs.is_multiple_of(2) || !cols.is_multiple_of(bs) {
        bail!("gptq: block size {bs} must be even and divide the {cols} columns");
    }
    // Act-order: the columns with the largest inputs first, while most columns remain to absorb
    // their error.
    let order: Option<Vec<usize>> = s.act_order.then(|| {
        let mut o: Vec<usize> = (0..cols).collect();
        o.sort_by(|&a, &b| h.sum[b * cols + b].total_cmp(&h.sum[a * cols + a]));
        o
    });
    let u = match &order {
        None => inverse_hessian_factor(h, s.damp)?,
        Some(o) => inverse_hessian_factor(&h.permuted(o), s.damp)?,
    };
    let plan = Plan {
        cols,
        bs,
        u: &u,
        order: order.as_deref(),
    };
    let blocks_per_row = cols / bs;
    let mut data = vec![0u8; rows * cols / 2];
    // With an order, the scales are fixed up front: plain NF4's absmax, double-quantized first
    // when asked so that rounding sees the scales the file will hold.
    let (mut absmax, fixed) = match s.act_order {
        true => {
            let mut plain = quantize_nf4(weight, rows, cols, bs)?;
            let d: Vec<f32> = (0..cols).map(|j| h.sum[j * cols + j] as f32).collect();
            if s.search_scales {
                plain.absmax = Absmax::F32(searched_scales(weight, cols, bs, &d));
            }
            if s.double_quant {
                plain.double_quantize();
                if let (true, Absmax::Nested(n)) = (s.search_scales, &mut plain.absmax) {
                    refine_nested_scales(n, weight, cols, bs, &d);
                }
            }
            (plain.absmax_f32(), Some(plain.absmax))
        }
        false => (vec![0f32; rows * blocks_per_row], None),
    };
    use rayon::prelude::*;
    data.par_chunks_mut(ROW_TILE * cols / 2)
        .zip(absmax.par_chunks_mut(ROW_TILE * blocks_per_row))
        .zip(weight.par_chunks(ROW_TILE * cols))
        .for_each(|((data, absmax), w)| round_tile(w, &plan, data, absmax));
    let mut packed = Nf4Packed {
        rows,
        cols,
        blocksize: bs,
        data,
        absmax: fixed.unwrap_or(Absmax::F32(absmax)),
        quant_map: NF4_CODE,
        dtype: "float32".to_string(),
    };
    if s.double_quant {
        // A no-op when the scales were fixed (and nested) up front.
        packed.double_quantize();
    }
    Ok(packed)
}

/// The order columns are rounded in and where block scales come from.
struct Plan<'a> {
    cols: usize,
    bs: usize,
    /// `U` of the Hessian in rounding order.
    u: &'a [f32],
    /// Rounding position → column (`None`: natural order).
    order: Option<&'a [usize]>,
}

/// Rounds a tile of rows (`w`: `[t, cols]`) column by column, spreading each error through `u`.
/// In natural order a block's absmax is taken when its first column is reached (from the
/// error-adjusted weights) and written to `absmax`; with an `order`, blocks are not contiguous in
/// time, so `absmax` comes filled with fixed scales.
fn round_tile(src: &[f32], plan: &Plan<'_>, data: &mut [u8], absmax: &mut [f32]) {
    let (cols, bs) = (plan.cols, plan.bs);
    let per_row = cols / bs;
    let t = src.len() / cols;
    // Weights in rounding order.
    let mut w: Vec<f32> = match plan.order {
        None => src.to_vec(),
        Some(order) => src
            .chunks(cols)
            .flat_map(|row| order.iter().map(move |&c| row[c]))
            .collect(),
    };
    let mut codes = vec![0u8; t * cols];
    let mut err = vec![0f32; t];
    for i in 0..cols {
        let c = plan.order.map_or(i, |o| o[i]);
        if plan.order.is_none() && i % bs == 0 {
            for r in 0..t {
                let block = &w[r * cols + i..r * cols + i + bs];
                absmax[r * per_row + i / bs] = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            }
        }
        let urow = &plan.u[i * cols..(i + 1) * cols];
        for r in 0..t {
            let v = w[r * cols + i];
            let m = absmax[r * per_row + c / bs];
            // bitsandbytes scales by the f32 reciprocal (a zero block gives inf·0 = NaN → code 0).
            let code = quantize_nf4_value(v * (1.0 / m));
            codes[r * cols + c] = code;
            err[r] = (v - NF4_CODE[code as usize] * m) / urow[i];
        }
        for r in 0..t {
            let e = err[r];
            if e == 0.0 || !e.is_finite() {
                continue;
            }
            let row = &mut w[r * cols + i + 1..(r + 1) * cols];
            for (x, uij) in row.iter_mut().zip(&urow[i + 1..]) {
                *x -= e * uij;
            }
        }
    }
    for (byte, pair) in data.iter_mut().zip(codes.chunks(2)) {
        *byte = (pair[0] << 4) | pair[1];
    }
}

/// The upper Cholesky factor `U` of `(H + λI)⁻¹` (row-major, f32), with `λ = damp · mean(diag H)`.
/// Inputs that were never active (zero diagonal) get a unit diagonal. A Hessian that is still not
/// positive definite is dampened ten times more, twice, before giving up.
///
/// With `J` the index reversal and `J A J = L Lᵀ` (Cholesky of the reversed matrix),
/// `A⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)` and `J L⁻¹ J` is upper triangular: one factorization and one
/// triangular inverse give `U`.
fn inverse_hessian_factor(h: &Hessian, damp: f64) -> Result<Vec<f32>> {
    let n = h.n;
    let diag = |i: usize| h.sum[i * n + i].max(0.0);
    let mean_diag = (0..n)
        .map(|i| if diag(i) > 0.0 { diag(i) } else { 1.0 })
        .sum::<f64>()
        / n.max(1) as f64;
    let mut damp = damp.max(1e-6);
    for _ in 0..3 {
        // The reversed, dampened matrix.
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[(n - 1 - i) * n + (n - 1 - j)] = h.sum[i * n + j];
            }
            let d = &mut a[(n - 1 - i) * n + (n - 1 - i)];
            if *d <= 0.0 {
                *d = 1.0;
            }
            *d += damp * mean_diag;
        }
        if cholesky_lower(&mut a, n) {
            let m = invert_lower(&a, n);
            let mut u = vec![0f32; n * n];
            for i in 0..n {
                for j in i..n {
                    u[i * n + j] = m[(n - 1 - i) * n + (n - 1 - j)] as f32;
                }
            }
            return Ok(u);
        }
        damp *= 10.0;
    }
    bail!("gptq: the calibration Hessian is not positive definite even after dampening")
}

/// `Σ a_k b_k` with independent partial sums (so the loop vectorizes).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// In-place Cholesky `A = L Lᵀ` of a symmetric `n x n` matrix (row-major); the lower triangle
/// becomes `L`, the upper is zeroed. False when `A` is not positive definite.
fn cholesky_lower(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let rj = j * n;
        let d = a[rj + j] - dot(&a[rj..rj + j], &a[rj..rj + j]);
        if d <= 0.0 || !d.is_finite() {
            return false;
        }
        let d = d.sqrt();
        a[rj + j] = d;
        for i in j + 1..n {
            let ri = i * n;
            let s = a[ri + j] - dot(&a[ri..ri + j], &a[rj..rj + j]);
            a[ri + j] = s / d;
        }
        a[rj + j + 1..rj + n].fill(0.0);
    }
    true
}

/// `L⁻¹` of a lower-triangular `L` (row-major), row by row:
/// `M_i = (e_i - Σ_{k<i} L_ik M_k) / L_ii`.
fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    let mut m = vec![0f64; n * n];
    for i in 0..n {
        let (done, rest) = m.split_at_mut(i * n);
        let row = &mut rest[..n];
        row[i] = 1.0;
        for k in 0..i {
            let c = l[i * n + k];
            if c != 0.0 {
                for (x, y) in row[..=k].iter_mut().zip(&done[k * n..k * n + k + 1]) {
                    *x -= c * y;
                }
            }
        }
        let d = l[i * n + i];
        for x in &mut row[..=i] {
            *x /= d;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::nf4::quantize_nf4_double;
    use crate::quant::test_noise as noise;
    use candle_core::Device;

    /// `(UᵀU)[k][j]`.
    fn utu(u: &[f32], n: usize, k: usize, j: usize) -> f64 {
        (0..n)
            .map(|m| u[m * n + k] as f64 * u[m * n + j] as f64)
            .sum()
    }

    #[test]
    fn cholesky_inverse_is_the_inverse() {
        let n = 5;
        let x = noise(n * 9, 3);
        let mut a = vec![0f64; n * n];
        for r in x.chunks(n) {
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] += (r[i] * r[j]) as f64;
                }
            }
        }
        let mut l = a.clone();
        assert!(cholesky_lower(&mut l, n));
        let m = invert_lower(&l, n);
        // L L^T = A and M L = I.
        for i in 0..n {
            for j in 0..n {
                let llt: f64 = (0..n).map(|k| l[i * n + k] * l[j * n + k]).sum();
                assert!((llt - a[i * n + j]).abs() < 1e-9, "({i},{j}) = {llt}");
                let ml: f64 = (0..n).map(|k| m[i * n + k] * l[k * n + j]).sum();
                assert!(
                    (ml - (i == j) as u8 as f64).abs() < 1e-9,
                    "({i},{j}) = {ml}"
                );
            }
        }
        // U^T U = (A + damp)^-1 for the factor GPTQ uses.
        let mut h = Hessian::new(n);
        h.add(&Tensor::from_vec(x.clone(), (9, n), &Device::Cpu).unwrap())
            .unwrap();
        let u = inverse_hessian_factor(&h, 0.01).unwrap();
        let mean = (0..n).map(|i| h.sum[i * n + i]).sum::<f64>() / n as f64;
        for i in 0..n {
            for j in 0..n {
                let hu: f64 = (0..n)
                    .map(|k| {
                        let damped = h.sum[i * n + k] + if i == k { 0.01 * mean } else { 0.0 };
                        damped * utu(&u, n, k, j)
                    })
                    .sum();
                assert!(
                    (hu - (i == j) as u8 as f64).abs() < 1e-3,
                    "({i},{j}) = {hu}"
                );
            }
        }
        let mut not_pd = vec![1.0, 2.0, 2.0, 1.0];
        assert!(!cholesky_lower(&mut not_pd, 2));
    }

    #[test]
    fn uncorrelated_inputs_give_plain_nf4_bit_for_bit() {
        let (rows, cols) = (7, 128);
        let w = noise(rows * cols, 1);
        let mut h = Hessian::new(cols);
        let diag: Vec<f32> = (0..cols * cols)
            .map(|k| {
                if k % (cols + 1) == 0 {
                    1.0 + (k % 7) as f32
                } else {
                    0.0
                }
            })
            .collect();
        h.add(&Tensor::from_vec(diag, (cols, cols), &Device::Cpu).unwrap())
            .unwrap();
        for act_order in [false, true] {
            let s = GptqSettings {
                act_order,
                search_scales: false,
                ..GptqSettings::default()
            };
            let g = gptq_nf4(&w, rows, cols, &h, &s).unwrap();
            assert_eq!(
                g,
                quantize_nf4(&w, rows, cols, 64).unwrap(),
                "act_order={act_order}"
            );
        }
        // Double quantization after rounding: bitsandbytes' `compress_statistics` exactly.
        let s = GptqSettings {
            act_order: false,
            double_quant: true,
            ..GptqSettings::default()
        };
        let g = gptq_nf4(&w, rows, cols, &h, &s).unwrap();
        let plain_dq = quantize_nf4_double(&w, rows, cols, 64).unwrap();
        assert_eq!(g, plain_dq);
        // With act-order the stored (double-quantized) scales are fixed first and every code is
        // the nearest one for the scale it is stored with.
        let s = GptqSettings {
            act_order: true,
            search_scales: false,
            double_quant: true,
            ..GptqSettings::default()
        };
        let g = gptq_nf4(&w, rows, cols, &h, &s).unwrap();
        assert_eq!(g.absmax, plain_dq.absmax);
        for (i, v) in w.iter().enumerate() {
            let m = g.block_scale(i / 64);
            assert_eq!(
                g.code_at(i),
                quantize_nf4_value(v * (1.0 / m)),
                "element {i}"
            );
        }
    }

    #[test]
    fn correlated_inputs_see_smaller_output_error_than_plain_rounding() {
        let (rows, cols, n) = (24, 128, 512);
        let w = noise(rows * cols, 2);
        // Inputs with strongly correlated features: a few shared factors plus a little noise.
        let f = noise(n * 4, 5);
        let e = noise(n * cols, 6);
        let mix = noise(4 * cols, 7);
        let x: Vec<f32> = (0..n * cols)
            .map(|k| {
                let (r, c) = (k / cols, k % cols);
                (0..4)
                    .map(|q| f[r * 4 + q] * mix[q * cols + c])
                    .sum::<f32>()
                    * 4.0
                    + 0.1 * e[k]
            })
            .collect();
        let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
        let mut h = Hessian::new(cols);
        h.add(&xt).unwrap();
        let out_err = |q: &Nf4Packed| -> f64 {
            let d: Vec<f32> = q.dequantize().iter().zip(&w).map(|(a, b)| a - b).collect();
            let d = Tensor::from_vec(d, (rows, cols), &Device::Cpu).unwrap();
            let y = xt.matmul(&d.t().unwrap()).unwrap();
            y.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let plain = out_err(&quantize_nf4(&w, rows, cols, 64).unwrap());
        for (act_order, search_scales) in [(false, false), (true, false), (true, true)] {
            let s = GptqSettings {
                act_order,
                search_scales,
                ..GptqSettings::default()
            };
            let gptq = out_err(&gptq_nf4(&w, rows, cols, &h, &s).unwrap());
            assert!(
                gptq < 0.5 * plain,
                "act_order={act_order} search={search_scales}: gptq {gptq} vs plain {plain}"
            );
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let h = Hessian::new(64);
        let s = GptqSettings::default();
        assert!(gptq_nf4(&[0.0; 64], 2, 64, &h, &s).is_err());
        assert!(gptq_nf4(&[0.0; 128], 1, 128, &h, &s).is_err());
        let h = Hessian::new(96);
        assert!(gptq_nf4(&[0.0; 96], 1, 96, &h, &s).is_err());
        let mut h = Hessian::new(4);
        assert!(h
            .add(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }
}
