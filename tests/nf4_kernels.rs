//! NF4 kernels: every path against dequantize → dense matmul, the backward pass against the dense
//! gradient and finite differences, and the resident-memory ratio on the default model's shapes.

mod common;
use common::normal;

use candle_core::{Device, Tensor, Var};
use loraplex::quant::kernels::{matmul, simd_available, KernelPath};
use loraplex::quant::{quantize_nf4, quantize_nf4_double, Nf4Linear, Nf4Packed};

/// y = x W^T with W dequantized, in f64 (the reference), and the scale of |x| |W| for tolerances.
fn dense_ref(w: &Nf4Packed, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
    let d = w.dequantize();
    let (rows, cols) = (w.rows, w.cols);
    let mut y = vec![0f64; n * rows];
    let mut mag = vec![0f64; n * rows];
    for k in 0..n {
        for r in 0..rows {
            for c in 0..cols {
                let (a, b) = (x[k * cols + c] as f64, d[r * cols + c] as f64);
                y[k * rows + r] += a * b;
                mag[k * rows + r] += (a * b).abs();
            }
        }
    }
    (y, mag)
}

fn check_close(got: &[f32], want: &[f64], mag: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((g, w), m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = 2e-5 * m + 1e-6;
        assert!(
            (*g as f64 - w).abs() <= tol,
            "{what}: element {i}: {g} vs {w} (tol {tol})"
        );
    }
}

const PATHS: [KernelPath; 5] = [
    KernelPath::Auto,
    KernelPath::Fused,
    KernelPath::FusedScalar,
    KernelPath::Tiled,
    KernelPath::TiledScalar,
];

/// Shapes: aligned (blocks inside rows, 16-code groups), odd row counts, rows that straddle
/// blocks (cols % blocksize != 0), a bigger block size, an odd element count.
fn weights() -> Vec<Nf4Packed> {
    let mut out = Vec::new();
    for (i, (rows, cols, bs)) in [
        (64, 192, 64),
        (37, 128, 64),
        (29, 100, 64),
        (16, 96, 32),
        (24, 512, 256),
        (5, 7, 64),
    ]
    .into_iter()
    .enumerate()
    {
        let w = normal(rows * cols, 100 + i as u64, 0.05);
        out.push(quantize_nf4(&w, rows, cols, bs).unwrap());
        out.push(quantize_nf4_double(&w, rows, cols, bs).unwrap());
    }
    out
}

#[test]
fn every_path_matches_dense_for_1_to_40_rows() {
    for (wi, w) in weights().iter().enumerate() {
        for n in 1..=40 {
            let x = normal(n * w.cols, 1000 + n as u64, 1.0);
            let (want, mag) = dense_ref(w, &x, n);
            for path in PATHS {
                let got = matmul(w, &x, n, path).unwrap();
                let what = format!("weight {wi} [{}x{}], n={n}, {path:?}", w.rows, w.cols);
                check_close(&got, &want, &mag, &what);
            }
        }
    }
}

#[test]
fn default_model_shapes_match_dense() {
    for (rows, cols) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        let w = quantize_nf4_double(&normal(rows * cols, 7, 0.02), rows, cols, 64).unwrap();
        for n in [1, 3, 8, 9, 32] {
            let x = normal(n * cols, 11, 1.0);
            let (want, mag) = dense_ref(&w, &x, n);
            for path in PATHS {
                let got = matmul(&w, &x, n, path).unwrap();
                check_close(&got, &want, &mag, &format!("{rows}x{cols} n={n} {path:?}"));
            }
        }
    }
}

/// One-hot inputs make every product but one an exact zero, so each path must return the
/// dequantized weights bit for bit (this pins the SIMD decoders' element order and values).
#[test]
fn one_hot_inputs_reproduce_the_dequantized_weight_exactly() {
    for w in weights() {
        let cols = w.cols;
        let mut x = vec![0f32; cols * cols];
        for c in 0..cols {
            x[c * cols + c] = 1.0;
        }
        let d = w.dequantize();
        for path in PATHS {
            let y = matmul(&w, &x, cols, path).unwrap();
            for k in 0..cols {
                for r in 0..w.rows {
                    let (got, want) = (y[k * w.rows + r], d[r * cols + k]);
                    assert!(
                        got == want,
                        "{path:?} [{}x{cols}] w[{r}][{k}]: {got} vs {want}",
                        w.rows
                    );
                }
            }
        }
    }
}

#[test]
fn simd_and_scalar_agree_closely() {
    if !simd_available() {
        eprintln!("no AVX2+FMA here: only the scalar kernel runs");
        return;
    }
    let w = quantize_nf4(&normal(96 * 256, 3, 0.1), 96, 256, 64).unwrap();
    let x = normal(4 * 256, 4, 1.0);
    for (simd, scalar) in [
        (KernelPath::Fused, KernelPath::FusedScalar),
        (KernelPath::Tiled, KernelPath::TiledScalar),
    ] {
        let a = matmul(&w, &x, 4, simd).unwrap();
        let b = matmul(&w, &x, 4, scalar).unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }
}

#[test]
fn forward_keeps_leading_dims_adds_bias_and_refuses_bad_input() {
    let w = quantize_nf4(&normal(48 * 64, 5, 0.1), 48, 64, 64).unwrap();
    let dense = Tensor::from_vec(w.dequantize(), (48, 64), &Device::Cpu).unwrap();
    let bias = Tensor::from_vec(normal(48, 6, 1.0), 48, &Device::Cpu).unwrap();
    let lin = Nf4Linear::new(w, Some(bias.clone()));
    let x = Tensor::from_vec(normal(2 * 3 * 64, 7, 1.0), (2, 3, 64), &Device::Cpu).unwrap();
    let y = lin.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 3, 48]);
    let want = x
        .broadcast_matmul(&dense.t().unwrap())
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
    let diff = (y - want).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    // A transposed (non-contiguous) input gives the same result as its contiguous copy.
    let xt = Tensor::from_vec(normal(64 * 5, 8, 1.0), (64, 5), &Device::Cpu).unwrap();
    let a = lin.forward(&xt.t().unwrap()).unwrap();
    let b = lin.forward(&xt.t().unwrap().contiguous().unwrap()).unwrap();
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    // Empty shapes work.
    let empty = Nf4Linear::new(quantize_nf4(&[], 3, 0, 64).unwrap(), None);
    let x0 = Tensor::zeros((2, 0), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        empty.forward(&x0).unwrap().to_vec2::<f32>().unwrap(),
        vec![vec![0f32; 3]; 2]
    );
    // Wrong feature count, wrong dtype: errors, not panics.
    let bad = Tensor::zeros((2, 63), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(lin.forward(&bad).is_err());
    let bad = Tensor::zeros((2, 64), candle_core::DType::F64, &Device::Cpu).unwrap();
    assert!(lin.forward(&bad).is_err());
}

#[test]
fn backward_gives_the_input_gradient() {
    for (n, path) in [
        (3, KernelPath::Auto),
        (40, KernelPath::Auto),
        (5, KernelPath::Tiled),
    ] {
        let w = quantize_nf4_double(&normal(1100 * 64, 9, 0.05), 1100, 64, 64).unwrap();
        let dense = Tensor::from_vec(w.dequantize(), (1100, 64), &Device::Cpu).unwrap();
        let lin = Nf4Linear::new(w, None);
        let x0 = Tensor::from_vec(normal(n * 64, 10, 1.0), (n, 64), &Device::Cpu).unwrap();
        let c = Tensor::from_vec(normal(n * 1100, 12, 1.0), (n, 1100), &Device::Cpu).unwrap();

        let x = Var::from_tensor(&x0).unwrap();
        let loss = (lin.forward_with(x.as_tensor(), path).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let gx = grads.get(x.as_tensor()).expect("gradient of x");

        // The dense layer's autograd gradient: c W.
        let xd = Var::from_tensor(&x0).unwrap();
        let loss_d = (xd.as_tensor().matmul(&dense.t().unwrap()).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap();
        let gd = loss_d.backward().unwrap();
        let gd = gd.get(xd.as_tensor()).unwrap();
        let diff = (gx - gd).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-3, "n={n} {path:?}");

        // Finite differences on a few coordinates (the loss is linear in x: exact up to rounding).
        let gx = gx.to_vec2::<f32>().unwrap();
        let loss_at = |x: &Tensor| -> f64 {
            let y = lin.forward_with(x, path).unwrap();
            let y = y.to_vec2::<f32>().unwrap();
            let c = c.to_vec2::<f32>().unwrap();
            let mut s = 0f64;
            for (yr, cr) in y.iter().zip(&c) {
                for (a, b) in yr.iter().zip(cr) {
                    s += *a as f64 * *b as f64;
                }
            }
            s
        };
        let base = x0.to_vec2::<f32>().unwrap();
        for (i, j) in [(0, 0), (n - 1, 63), (n / 2, 17)] {
            let h = 0.01f32;
            let mut up = base.clone();
            up[i][j] += h;
            let mut dn = base.clone();
            dn[i][j] -= h;
            let t = |v: Vec<Vec<f32>>| Tensor::from_vec(v.concat(), (n, 64), &Device::Cpu).unwrap();
            let fd = (loss_at(&t(up)) - loss_at(&t(dn))) / (2.0 * h as f64);
            let g = gx[i][j] as f64;
            assert!((fd - g).abs() <= 1e-2 * (1.0 + g.abs()), "fd {fd} vs {g}");
        }
    }
}

#[test]
fn resident_bytes_vs_f16_on_default_model_shapes() {
    for (rows, cols) in [(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        let w = normal(rows * cols, 13, 0.02);
        let f16_bytes = (rows * cols * 2) as f64;
        let plain = quantize_nf4(&w, rows, cols, 64).unwrap().resident_bytes() as f64;
        let double = quantize_nf4_double(&w, rows, cols, 64)
            .unwrap()
            .resident_bytes() as f64;
        assert!(
            plain / f16_bytes <= 0.29,
            "{rows}x{cols}: {}",
            plain / f16_bytes
        );
        assert!(
            double / f16_bytes <= 0.27,
            "{rows}x{cols}: {}",
            double / f16_bytes
        );
        eprintln!(
            "{rows}x{cols}: nf4 {:.4}x f16, nf4+double-quant {:.4}x f16",
            plain / f16_bytes,
            double / f16_bytes
        );
    }
}
