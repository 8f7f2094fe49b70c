//! The kernels against candle's matmul on random shapes, and their batch invariance.

use super::*;
use candle_core::{Device, Tensor};

fn randn(n: usize, seed: u64) -> Vec<f32> {
    // A small deterministic generator: tests must not depend on global RNG state.
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn candle_linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let x = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
    let w = Tensor::from_slice(w, (n, k), &Device::Cpu).unwrap();
    x.matmul(&w.t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "at {i}: {x} vs {y}");
    }
}

#[test]
fn matches_candle_matmul_on_odd_shapes() {
    for (s, &(k, n)) in [
        (1, 1),
        (3, 5),
        (7, 9),
        (13, 33),
        (64, 130),
        (77, 67),
        (300, 257),
    ]
    .iter()
    .enumerate()
    {
        for m in (1..=17).chain([48, 64, 100]) {
            let seed = (s * 100 + m) as u64;
            let x = randn(m * k, seed);
            let w = randn(n * k, seed + 7);
            let job = LinearJob {
                x: &x,
                m,
                k,
                w: JobWeight::F32(&w),
                n,
                bias: None,
                low_rank: vec![],
            };
            let want = candle_linear(&x, m, k, &w, n);
            for isa in isas() {
                let got = linear_rows_with(std::slice::from_ref(&job), isa)
                    .unwrap()
                    .remove(0);
                close(&got, &want, 1e-5);
            }
            let got = linear_rows(&[job]).unwrap().remove(0);
            close(&got, &want, 1e-5);
        }
    }
}

#[test]
fn bias_and_low_rank_match_candle() {
    let (m, k, n) = (5, 37, 70);
    for r in [1, 4, 12, 16, 19] {
        let x = randn(m * k, r as u64);
        let w = randn(n * k, 11);
        let bias = randn(n, 12);
        let a = randn(r * k, 13);
        let b = randn(n * r, 14);
        let bt = transpose(b.clone(), n, r);
        // t = x A^T, for rows 1 and 3 only.
        let t = candle_linear(&x, m, k, &a, r);
        let mut low_rank = vec![None; m];
        for i in [1, 3] {
            low_rank[i] = Some(LowRank { a: &a, bt: &bt });
        }
        let job = LinearJob {
            x: &x,
            m,
            k,
            w: JobWeight::F32(&w),
            n,
            bias: Some(&bias),
            low_rank,
        };
        let per_isa: Vec<Vec<f32>> = isas()
            .map(|isa| {
                linear_rows_with(std::slice::from_ref(&job), isa)
                    .unwrap()
                    .remove(0)
            })
            .collect();
        let got = linear_rows(&[job]).unwrap().remove(0);
        let mut want = candle_linear(&x, m, k, &w, n);
        let delta = candle_linear(&t, m, r, &b, n);
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] += bias[j];
                if i == 1 || i == 3 {
                    want[i * n + j] += delta[i * n + j];
                }
            }
        }
        close(&got, &want, 1e-5);
        for one in &per_isa {
            close(one, &want, 1e-5);
        }
    }
}

/// Every instruction set this CPU runs, narrowest first.
fn isas() -> impl Iterator<Item = Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|&i| i <= Isa::detect())
}

#[test]
fn rows_do_not_depend_on_the_batch_on_any_isa() {
    // 70 rows: split by input rows (many-row path); one row alone: split by weight rows. With a
    // bias and low-rank terms on some rows, every value must be identical.
    let (k, n, m, r) = (150, 37, 70, 3);
    let w = randn(n * k, 11);
    let x = randn(m * k, 12);
    let bias = randn(n, 13);
    let bt = randn(r * n, 14);
    let a = randn(r * k, 15);
    let low_rank = |rows: std::ops::Range<usize>| -> Vec<Option<LowRank<'_>>> {
        rows.map(|i| (i % 3 == 1).then_some(LowRank { a: &a, bt: &bt }))
            .collect()
    };
    let job = |i0: usize, rows: usize| LinearJob {
        x: &x[i0 * k..(i0 + rows) * k],
        m: rows,
        k,
        w: JobWeight::F32(&w),
        n,
        bias: Some(&bias),
        low_rank: low_rank(i0..i0 + rows),
    };
    for isa in isas() {
        let all = linear_rows_with(&[job(0, m)], isa).unwrap().remove(0);
        let few = linear_rows_with(&[job(3, 9)], isa).unwrap().remove(0);
        assert_eq!(few, all[3 * n..12 * n], "{isa:?}: 9 rows vs 70");
        for i in 0..m {
            let one = linear_rows_with(&[job(i, 1)], isa).unwrap().remove(0);
            assert_eq!(one, all[i * n..(i + 1) * n], "{isa:?} row {i}");
        }
    }
    // And against candle on the many-row path.
    let got = linear_rows(&[job(0, m)]).unwrap().remove(0);
    let mut want = candle_linear(&x, m, k, &w, n);
    let t = candle_linear(&x, m, k, &a, r);
    let delta = candle_linear(&t, m, r, &bt_as_b(&bt, r, n), n);
    for i in 0..m {
        for j in 0..n {
            want[i * n + j] += bias[j] + if i % 3 == 1 { delta[i * n + j] } else { 0.0 };
        }
    }
    close(&got, &want, 1e-4);
}

/// `bt: [r, n]` as `b: [n, r]` (what `candle_linear` multiplies by).
fn bt_as_b(bt: &[f32], r: usize, n: usize) -> Vec<f32> {
    let mut b = vec![0f32; n * r];
    for q in 0..r {
        for j in 0..n {
            b[j * r + q] = bt[q * n + j];
        }
    }
    b
}

#[test]
fn rows_do_not_depend_on_the_batch() {
    let (k, n) = (45, 300);
    let w = randn(n * k, 1);
    let x = randn(17 * k, 2);
    let all = linear_rows(&[LinearJob {
        x: &x,
        m: 17,
        k,
        w: JobWeight::F32(&w),
        n,
        bias: None,
        low_rank: vec![],
    }])
    .unwrap()
    .remove(0);
    for i in 0..17 {
        let one = linear_rows(&[LinearJob {
            x: &x[i * k..(i + 1) * k],
            m: 1,
            k,
            w: JobWeight::F32(&w),
            n,
            bias: None,
            low_rank: vec![],
        }])
        .unwrap()
        .remove(0);
        assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        assert_eq!(dot(&x[i * k..(i + 1) * k], &w[..k]), all[i * n]);
    }
}

#[test]
fn several_jobs_and_bad_shapes() {
    let (k, m) = (20, 3);
    let x = randn(m * k, 3);
    let w1 = randn(10 * k, 4);
    let w2 = randn(1000 * k, 5);
    let jobs = [
        LinearJob {
            x: &x,
            m,
            k,
            w: JobWeight::F32(&w1),
            n: 10,
            bias: None,
            low_rank: vec![],
        },
        LinearJob {
            x: &x,
            m,
            k,
            w: JobWeight::F32(&w2),
            n: 1000,
            bias: None,
            low_rank: vec![],
        },
    ];
    let outs = linear_rows(&jobs).unwrap();
    close(&outs[0], &candle_linear(&x, m, k, &w1, 10), 1e-5);
    close(&outs[1], &candle_linear(&x, m, k, &w2, 1000), 1e-5);
    let bad = LinearJob {
        x: &x,
        m,
        k,
        w: JobWeight::F32(&w1),
        n: 11,
        bias: None,
        low_rank: vec![],
    };
    assert!(linear_rows(&[bad]).is_err());
    // Low-rank factors whose sizes do not fit k (a) or n (bt) are refused, not read past.
    let (a, bt) = (randn(3 * k + 1, 5), randn(3 * 10, 6));
    let (a_ok, bt_short) = (randn(3 * k, 7), randn(3 * 10 - 1, 8));
    for (a, bt) in [(&a, &bt), (&a_ok, &bt_short)] {
        let job = LinearJob {
            x: &x,
            m,
            k,
            w: JobWeight::F32(&w1),
            n: 10,
            bias: None,
            low_rank: vec![Some(LowRank { a, bt }); m],
        };
        assert!(linear_rows(&[job]).is_err());
    }
}

#[test]
fn attention_helpers_match_naive_sums() {
    for (t, hd, stride) in [
        (1, 16, 16),
        (7, 64, 64),
        (33, 64, 80),
        (130, 13, 13),
        (5, 100, 128),
    ] {
        let q = randn(hd, t as u64);
        let rows = randn((t - 1) * stride + hd, 99);
        let p = randn(t, 5);
        let mut scores = vec![0f32; t];
        if stride == hd {
            matvec_into(&q, &rows, hd, &mut scores).unwrap();
            for (j, s) in scores.iter().enumerate() {
                let want: f32 = (0..hd).map(|c| q[c] * rows[j * hd + c]).sum();
                assert!((s - want).abs() < 1e-4, "score {j}: {s} vs {want}");
            }
        }
        let mut out = vec![0f32; hd];
        weighted_rows_sum(&p, &rows, stride, &mut out).unwrap();
        for (c, o) in out.iter().enumerate() {
            let want: f32 = (0..t).map(|j| p[j] * rows[j * stride + c]).sum();
            assert!((o - want).abs() < 1e-4, "column {c}: {o} vs {want}");
        }
        assert!(weighted_rows_sum(&p, &rows[..rows.len() - 1], stride, &mut out).is_err());
    }
}

/// A paged history's attention runs block by block: scores per block of rows and the weighted
/// sum accumulated block by block give the bits of one pass over the contiguous rows.
#[test]
fn block_by_block_attention_sums_equal_one_pass() {
    for (t, hd) in [(1, 64), (16, 64), (37, 64), (130, 13), (5, 100)] {
        let q = randn(hd, t as u64);
        let rows = randn(t * hd, 7);
        let p = randn(t, 8);
        let (mut whole, mut split) = (vec![0f32; t], vec![0f32; t]);
        matvec_into(&q, &rows, hd, &mut whole).unwrap();
        for (b, chunk) in split.chunks_mut(16).enumerate() {
            let n = chunk.len();
            matvec_into(&q, &rows[b * 16 * hd..(b * 16 + n) * hd], hd, chunk).unwrap();
        }
        assert_eq!(whole, split, "scores, t {t} hd {hd}");
        let mut one = vec![0f32; hd];
        weighted_rows_sum(&p, &rows, hd, &mut one).unwrap();
        let mut acc = vec![0f32; hd];
        for (b, w) in p.chunks(16).enumerate() {
            let run = &rows[b * 16 * hd..(b * 16 + w.len()) * hd];
            weighted_rows_accumulate(w, run, &mut acc).unwrap();
        }
        assert_eq!(one, acc, "weighted sum, t {t} hd {hd}");
        assert!(weighted_rows_accumulate(&p, &rows[..t * hd - 1], &mut acc).is_err());
    }
}
