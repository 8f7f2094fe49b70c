//! The NF4 row kernel of the decode fast path (`quant::dot_rows_into`): every result against an
//! f64 dot product with the dequantized weight, within 1e-4 of `sum |W| |x|` (the int16 kernel
//! quantizes the inputs to 16383 steps of max|x| per 64 features and the codebook to 14640
//! steps) and within the error bound that this quantization implies; row sub-ranges and
//! strides, zero and extreme inputs, and size errors.

mod common;

use common::normal;
use loraplex::quant::kernels::{matmul, simd_available, KernelPath};
use loraplex::quant::{dot_rows_into, quantize_nf4, quantize_nf4_double, Nf4Input, Nf4Packed};

/// Per weight row r and input row g: the f64 dot product with the dequantized weight, the scale
/// `sum |W| |x|`, and the bound on the int16 kernel's error (half a step of the input's 64-feature
/// group times |W|, plus half a codebook step times absmax times |x| + half an input step, plus
/// f32 rounding), all laid out `[r][g]`.
struct Reference {
    want: Vec<f64>,
    mag: Vec<f64>,
    bound: Vec<f64>,
}

fn reference(w: &Nf4Packed, x: &[f32], n: usize) -> Reference {
    let (rows, cols) = (w.rows, w.cols);
    let d = w.dequantize();
    let absmax = w.absmax_f32();
    let mut r = Reference {
        want: vec![0.0; rows * n],
        mag: vec![0.0; rows * n],
        bound: vec![0.0; rows * n],
    };
    for g in 0..n {
        let xg = &x[g * cols..(g + 1) * cols];
        let steps: Vec<f64> = xg
            .chunks(64)
            .map(|u| u.iter().fold(0f64, |m, v| m.max(v.abs() as f64)) / 16383.0)
            .collect();
        for row in 0..rows {
            let (mut y, mut m, mut b) = (0f64, 0f64, 0f64);
            for c in 0..cols {
                let (wv, xv) = (d[row * cols + c] as f64, xg[c] as f64);
                let (step, a) = (steps[c / 64], absmax[(row * cols + c) / w.blocksize] as f64);
                y += wv * xv;
                m += (wv * xv).abs();
                b += wv.abs() * step * 0.5 + (xv.abs() + step * 0.5) * a * (0.5 / 14640.0);
            }
            let i = row * n + g;
            (r.want[i], r.mag[i], r.bound[i]) = (y, m, b * 1.01 + 1e-6 * m);
        }
    }
    r
}

/// Runs `dot_rows_into` over rows `r0..r1` with `stride`, checks every value against `reference`
/// (1e-4 of `sum |W| |x|`, and the quantization bound), that the padding between strides is
/// untouched, and returns the largest error relative to `sum |W| |x|`.
fn check(
    w: &Nf4Packed,
    x: &[f32],
    n: usize,
    r0: usize,
    r1: usize,
    stride: usize,
    what: &str,
) -> f64 {
    check_tol(w, x, n, r0, r1, stride, 1e-4, what)
}

/// [`check`] with another tolerance relative to `sum |W| |x|` (the quantization bound always
/// applies).
#[allow(clippy::too_many_arguments)]
fn check_tol(
    w: &Nf4Packed,
    x: &[f32],
    n: usize,
    r0: usize,
    r1: usize,
    stride: usize,
    rel: f64,
    what: &str,
) -> f64 {
    let re = reference(w, x, n);
    let input = Nf4Input::new(x, n, w.cols);
    assert_eq!((input.rows(), input.cols()), (n, w.cols));
    const SENTINEL: f32 = -12345.5;
    let mut out = vec![SENTINEL; (r1 - r0) * stride + 3];
    dot_rows_into(w, r0, r1, &input, &mut out, stride).unwrap();
    let mut worst = 0f64;
    for r in r0..r1 {
        for g in 0..stride {
            let got = out[(r - r0) * stride + g];
            if g >= n {
                assert_eq!(
                    got, SENTINEL,
                    "{what}: padding at row {r}, slot {g} was written"
                );
                continue;
            }
            let i = r * n + g;
            let (want, mag, bound) = (re.want[i], re.mag[i], re.bound[i]);
            let err = (got as f64 - want).abs();
            assert!(
                err <= rel * mag + 1e-30 && err <= bound.max(1e-30),
                "{what}: row {r}, input {g}: {got} vs {want} (|W||x| {mag}, bound {bound})"
            );
            if mag > 0.0 {
                worst = worst.max(err / mag);
            }
        }
    }
    assert!(
        out[(r1 - r0) * stride..].iter().all(|v| *v == SENTINEL),
        "{what}: wrote past the end"
    );
    worst
}

fn both(w: &[f32], rows: usize, cols: usize, bs: usize) -> [Nf4Packed; 2] {
    [
        quantize_nf4(w, rows, cols, bs).unwrap(),
        quantize_nf4_double(w, rows, cols, bs).unwrap(),
    ]
}

#[test]
fn default_model_shapes_1_to_16_inputs() {
    let mut worst = 0f64;
    for (i, (rows, cols)) in [(576, 576), (192, 576), (1536, 576), (576, 1536)]
        .into_iter()
        .enumerate()
    {
        let wv = normal(rows * cols, 10 + i as u64, 0.02);
        let x = normal(16 * cols, 20 + i as u64, 1.0);
        for w in both(&wv, rows, cols, 64) {
            for n in 1..=16 {
                let what = format!("{rows}x{cols} dq={} n={n}", w.is_double_quant());
                worst = worst.max(check(&w, &x[..n * cols], n, 0, rows, n, &what));
            }
        }
    }
    eprintln!("default shapes: worst error / sum|W||x| = {worst:.2e}");
}

#[test]
fn odd_shapes_and_block_sizes() {
    // (rows, cols, blocksize): fast layouts with 32-, 64-, 128- and 256-blocks, a row length with
    // a half (32-feature) last unit, and layouts that take the exact kernel (blocks straddling
    // rows, a row length that is not a multiple of 32, an odd element count).
    let shapes = [
        (5, 7, 64),
        (29, 100, 64),
        (37, 128, 64),
        (16, 96, 32),
        (9, 160, 32),
        (13, 256, 128),
        (24, 512, 256),
        (11, 384, 128),
        (7, 48, 64),
        (3, 64, 64),
        (6, 32, 32),
    ];
    for (i, (rows, cols, bs)) in shapes.into_iter().enumerate() {
        let wv = normal(rows * cols, 100 + i as u64, 0.05);
        let x = normal(16 * cols, 200 + i as u64, 1.0);
        for w in both(&wv, rows, cols, bs) {
            for n in [1, 2, 3, 4, 5, 7, 8, 13, 16] {
                let what = format!("{rows}x{cols}/{bs} dq={} n={n}", w.is_double_quant());
                check(&w, &x[..n * cols], n, 0, rows, n, &what);
            }
        }
    }
}

#[test]
fn more_than_16_inputs() {
    let (rows, cols) = (40, 192);
    let w = quantize_nf4_double(&normal(rows * cols, 5, 0.03), rows, cols, 64).unwrap();
    for n in [17, 33] {
        check(
            &w,
            &normal(n * cols, 6, 1.0),
            n,
            0,
            rows,
            n,
            &format!("n={n}"),
        );
    }
}

#[test]
fn row_ranges_with_wider_strides() {
    for (rows, cols, bs) in [
        (1536, 576, 64),
        (70, 160, 32),
        (29, 100, 64),
        (50, 256, 128),
    ] {
        let wv = normal(rows * cols, 31, 0.02);
        let x = normal(16 * cols, 32, 1.0);
        for w in both(&wv, rows, cols, bs) {
            for (r0, r1) in [
                (0, 1),
                (1, 2),
                (3, 17),
                (rows / 2, rows),
                (rows - 1, rows),
                (5, 5),
            ] {
                for (n, stride) in [(1, 2), (1, 8), (3, 4), (4, 16), (16, 19)] {
                    let what = format!("{rows}x{cols}/{bs} rows {r0}..{r1} n={n} stride {stride}");
                    check(&w, &x[..n * cols], n, r0, r1, stride, &what);
                }
            }
        }
    }
}

#[test]
fn zero_input_rows_give_exact_zeros() {
    let (rows, cols) = (64, 576);
    let w = quantize_nf4_double(&normal(rows * cols, 41, 0.02), rows, cols, 64).unwrap();
    // Rows 0 and 2 all zero, row 1 random with a zero unit in the middle.
    let mut x = vec![0f32; 3 * cols];
    x[cols..2 * cols].copy_from_slice(&normal(cols, 42, 1.0));
    x[cols + 128..cols + 192].fill(0.0);
    check(&w, &x, 3, 0, rows, 3, "zero rows");
    let input = Nf4Input::new(&x, 3, cols);
    let mut out = vec![1f32; rows * 3];
    dot_rows_into(&w, 0, rows, &input, &mut out, 3).unwrap();
    for r in 0..rows {
        assert_eq!((out[r * 3], out[r * 3 + 2]), (0.0, 0.0), "row {r}");
    }
}

#[test]
fn large_dynamic_range_inputs() {
    let (rows, cols) = (96, 1536);
    let wv = normal(rows * cols, 51, 0.02);
    let base = normal(3 * cols, 52, 1.0);
    // Row 0: each 64-feature group scaled by 10^k, k from -6 to 6 (a scale per group absorbs
    // it). Row 1: wide ranges inside every group (each value scaled by 10^(0..3)). Row 2: one
    // outlier of 1e3 per group (LLM activations have a few such features).
    let mut x = base.clone();
    for (c, v) in x[..cols].iter_mut().enumerate() {
        *v *= 10f32.powi((c / 64) as i32 % 13 - 6);
    }
    for (c, v) in x[cols..2 * cols].iter_mut().enumerate() {
        *v *= 10f32.powi((c % 4) as i32);
    }
    for c in (0..cols).step_by(64) {
        x[2 * cols + c + 17] = 1e3;
    }
    for w in both(&wv, rows, cols, 64) {
        let worst = check(&w, &x[..2 * cols], 2, 0, rows, 2, "dynamic range");
        eprintln!("dynamic range: worst error / sum|W||x| = {worst:.2e}");
        // An outlier coarsens its group's input steps: its neighbours' rounding errors are
        // relative to the outlier, which dominates `sum |W| |x|` only when its weight is large.
        let worst = check_tol(&w, &x[2 * cols..], 1, 0, rows, 1, 2e-4, "1e3 outliers");
        eprintln!("1e3 outliers: worst error / sum|W||x| = {worst:.2e}");
    }
}

/// Extreme outliers: one of 1e4 per group of values around 1 (about 1e-4 of `sum |W| |x|`), and
/// one of 3e7 next to values around 1 and 1e-9, which all round to 0 in its group, so that where
/// the outlier meets a zero weight the result can be off by much more than 1e-4 of
/// `sum |W| |x|`. Both must stay within the bound (half an input step times the group's |W|).
#[test]
fn extreme_outliers_stay_within_the_quantization_bound() {
    let (rows, cols) = (96, 1536);
    let wv = normal(rows * cols, 53, 0.02);
    let mut x = normal(2 * cols, 54, 1.0);
    for c in (0..cols).step_by(64) {
        x[c + 17] = 1e4;
    }
    x[cols + 5] = 3e7;
    x[cols + 700] = -2e-9;
    x[cols + 1500] = 1e-30;
    for w in both(&wv, rows, cols, 64) {
        let worst = check_tol(&w, &x[..cols], 1, 0, rows, 1, 2e-4, "1e4 outliers");
        eprintln!("1e4 outliers: worst error / sum|W||x| = {worst:.2e}");
        let worst = check_tol(&w, &x[cols..], 1, 0, rows, 1, f64::INFINITY, "3e7 outlier");
        eprintln!("3e7 outlier: worst error / sum|W||x| = {worst:.2e}");
    }
}

#[test]
fn extreme_and_non_finite_inputs() {
    let (rows, cols) = (20, 128);
    let w = quantize_nf4(&normal(rows * cols, 61, 0.02), rows, cols, 64).unwrap();
    // Tiny and huge magnitudes take the exact kernel.
    for scale in [1e-25f32, 1e-12, 1e12, 1e25] {
        let x: Vec<f32> = normal(2 * cols, 62, 1.0)
            .iter()
            .map(|v| v * scale)
            .collect();
        check(&w, &x, 2, 0, rows, 2, &format!("scale {scale}"));
    }
    // NaN and infinity propagate as in the exact kernel.
    let mut x = normal(2 * cols, 63, 1.0);
    x[3] = f32::NAN;
    x[cols + 9] = f32::INFINITY;
    let input = Nf4Input::new(&x, 2, cols);
    let mut out = vec![0f32; rows * 2];
    dot_rows_into(&w, 0, rows, &input, &mut out, 2).unwrap();
    let exact = matmul(&w, &x, 2, KernelPath::Fused).unwrap();
    for r in 0..rows {
        assert!(
            out[r * 2].is_nan(),
            "row {r}: NaN input gave {}",
            out[r * 2]
        );
        let (got, want) = (out[r * 2 + 1], exact[rows + r]);
        assert!(
            got == want || (got.is_nan() && want.is_nan()),
            "row {r}: {got} vs {want}"
        );
    }
}

/// On AVX2 machines the integer kernel must actually run: its results differ (slightly) from the
/// exact f32 kernel's.
#[test]
fn integer_kernel_is_used_with_avx2() {
    if !simd_available() {
        eprintln!("no AVX2+FMA here: only the exact kernel runs");
        return;
    }
    let (rows, cols) = (64, 576);
    let w = quantize_nf4_double(&normal(rows * cols, 71, 0.02), rows, cols, 64).unwrap();
    let x = normal(cols, 72, 1.0);
    let mut out = vec![0f32; rows];
    dot_rows_into(&w, 0, rows, &Nf4Input::new(&x, 1, cols), &mut out, 1).unwrap();
    let exact = matmul(&w, &x, 1, KernelPath::Fused).unwrap();
    assert!(out.iter().zip(&exact).any(|(a, b)| a != b));
}

#[test]
fn size_errors_are_errors() {
    let (rows, cols) = (8, 128);
    let w = quantize_nf4(&normal(rows * cols, 81, 0.02), rows, cols, 64).unwrap();
    let x = normal(2 * cols, 82, 1.0);
    let input = Nf4Input::new(&x, 2, cols);
    let mut out = vec![0f32; rows * 2];
    // Wrong feature count.
    let other = Nf4Input::new(&x[..2 * 64], 2, 64);
    assert!(dot_rows_into(&w, 0, rows, &other, &mut out, 2).is_err());
    // Rows out of range, reversed.
    assert!(dot_rows_into(&w, 0, rows + 1, &input, &mut out, 2).is_err());
    assert!(dot_rows_into(&w, 5, 4, &input, &mut out, 2).is_err());
    // Output too small, stride below the input count.
    assert!(dot_rows_into(&w, 0, rows, &input, &mut out[..rows * 2 - 1], 2).is_err());
    assert!(dot_rows_into(&w, 0, 4, &input, &mut out, 1).is_err());
    // Input values not matching its shape.
    let short = Nf4Input::new(&x[..cols + 3], 2, cols);
    assert!(dot_rows_into(&w, 0, rows, &short, &mut out, 2).is_err());
    // A weight whose packed data or scales were cut short.
    let mut bad = w.clone();
    bad.data.truncate(10);
    assert!(dot_rows_into(&bad, 0, rows, &input, &mut out, 2).is_err());
    let mut bad = w.clone();
    bad.absmax = loraplex::quant::Absmax::F32(vec![1.0; 3]);
    assert!(dot_rows_into(&bad, 0, rows, &input, &mut out, 2).is_err());
    // Empty ranges and inputs are fine.
    assert!(dot_rows_into(&w, 3, 3, &input, &mut [], 2).is_ok());
    let none = Nf4Input::new(&[], 0, cols);
    assert!(dot_rows_into(&w, 0, rows, &none, &mut out, 0).is_ok());
    let w0 = quantize_nf4(&[], 4, 0, 64).unwrap();
    let mut out0 = vec![1f32; 4];
    dot_rows_into(&w0, 0, 4, &Nf4Input::new(&[], 1, 0), &mut out0, 1).unwrap();
    assert_eq!(out0, vec![0.0; 4]);
}

/// The AVX-512 VNNI form of the integer kernel gives the same bits as the AVX2 one (integer
/// sums do not depend on how they are formed): weights with f32 and double-quantized absmax,
/// 64- and 32-weight blocks, 1 to 20 input rows. Where the CPU lacks VNNI both runs take AVX2.
#[test]
fn vnni_and_avx2_kernels_agree_bit_for_bit() {
    if !loraplex::quant::kernels::vnni_available() {
        eprintln!("no AVX-512 VNNI on this CPU: both runs take the AVX2 kernel");
    }
    let (rows, cols) = (72, 576);
    let wv = normal(rows * cols, 61, 0.02);
    let weights = [
        quantize_nf4(&wv, rows, cols, 64).unwrap(),
        quantize_nf4_double(&wv, rows, cols, 64).unwrap(),
        quantize_nf4(&wv, rows, cols, 32).unwrap(),
    ];
    for w in &weights {
        for n in [1, 2, 5, 16, 20] {
            let x = normal(n * cols, 62 + n as u64, 1.0);
            let run = |vnni: bool| {
                let input = Nf4Input::new(&x, n, cols).with_vnni(vnni);
                let mut out = vec![0f32; rows * n];
                dot_rows_into(w, 0, rows, &input, &mut out, n).unwrap();
                out
            };
            let (fast, plain) = (run(true), run(false));
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&fast),
                bits(&plain),
                "blocksize {}, {n} rows",
                w.blocksize
            );
        }
    }
}
