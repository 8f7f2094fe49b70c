//! Truncated SVD for adapter arithmetic (`*_svd` combinations): the best rank-`k` approximation
//! `M ≈ B A` of a weight delta, split as PEFT splits it (`B = U_k S_k`, `A = V_kᵀ`).
//!
//! Only the top `k` singular triplets are needed, so the dense case works on the Gram matrix of
//! the smaller side (`MᵀM` or `M Mᵀ`, f64, nalgebra's symmetric eigendecomposition) instead of a
//! full SVD; a delta known as a product of thin factors (`B A`, rank `r ≤ min(m, n)`) is
//! reduced by two QR factorizations to an `r × r` core first and never formed. Singular vectors
//! are unique only up to sign (and within repeated singular values): compare `B A`, not factors.

use anyhow::{bail, Result};
use nalgebra::{DMatrix, SymmetricEigen, QR};

/// A rank-`k` factorization: `b` is `[m, k]` and `a` is `[k, n]`, both row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Factors {
    pub b: Vec<f32>,
    pub a: Vec<f32>,
}

fn check_rank(m: usize, n: usize, k: usize) -> Result<()> {
    if k == 0 {
        bail!("the SVD rank must be at least 1");
    }
    if k > m.min(n) {
        bail!(
            "svd_rank {k} exceeds what a {m} × {n} weight can hold (at most {})",
            m.min(n)
        );
    }
    Ok(())
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn finite(v: &[f32]) -> Result<()> {
    if v.iter().any(|x| !x.is_finite()) {
        bail!("the combined delta holds NaN or infinite values");
    }
    Ok(())
}

/// Row-major f32 of a matrix.
fn rows_f32(m: &DMatrix<f64>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.len());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)] as f32);
        }
    }
    out
}

/// Indices of the `k` largest eigenvalues, largest first.
fn top(eigenvalues: &nalgebra::DVector<f64>, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..eigenvalues.len()).collect();
    idx.sort_by(|&i, &j| eigenvalues[j].total_cmp(&eigenvalues[i]).then(i.cmp(&j)));
    idx.truncate(k);
    idx
}

/// `(U_k S_k, V_kᵀ)` of `m` in f64 (`k ≤ min(rows, cols)`).
fn truncate_f64(m: &DMatrix<f64>, k: usize) -> (DMatrix<f64>, DMatrix<f64>) {
    let (rows, cols) = m.shape();
    if cols <= rows {
        // MᵀM = V S² Vᵀ: B = M V_k (= U_k S_k), A = V_kᵀ.
        let eig = SymmetricEigen::new(m.transpose() * m);
        let v = eig.eigenvectors.select_columns(&top(&eig.eigenvalues, k));
        (m * &v, v.transpose())
    } else {
        // M Mᵀ = U S² Uᵀ: the rows of U_kᵀ M are S_k V_kᵀ; their norms are the singular values.
        let eig = SymmetricEigen::new(m * m.transpose());
        let mut u = eig.eigenvectors.select_columns(&top(&eig.eigenvalues, k));
        let mut svt = u.transpose() * m;
        for c in 0..k {
            let s = svt.row(c).norm();
            if s > 0.0 {
                svt.row_mut(c).unscale_mut(s);
                u.column_mut(c).scale_mut(s);
            } else {
                svt.row_mut(c).fill(0.0);
                u.column_mut(c).fill(0.0);
            }
        }
        (u, svt)
    }
}

/// The best rank-`k` approximation of the `m × n` row-major matrix `data`.
pub fn truncate_dense(m: usize, n: usize, data: &[f32], k: usize) -> Result<Factors> {
    check_rank(m, n, k)?;
    if data.len() != m * n {
        bail!(
            "a {m} × {n} matrix needs {} values, got {}",
            m * n,
            data.len()
        );
    }
    finite(data)?;
    let mat = DMatrix::from_row_slice(m, n, &to_f64(data));
    let (b, a) = truncate_f64(&mat, k);
    Ok(Factors {
        b: rows_f32(&b),
        a: rows_f32(&a),
    })
}

/// The best rank-`k` approximation of `M = B A` given its factors `b: [m, r]` and `a: [r, n]`
/// (row-major). With `r ≤ min(m, n)`, `B = Q_b R_b` and `Aᵀ = Q_a R_a` reduce it to the SVD of
/// the `r × r` core `R_b R_aᵀ`; components beyond `r` are zero.
pub fn truncate_factored(
    m: usize,
    r: usize,
    n: usize,
    b: &[f32],
    a: &[f32],
    k: usize,
) -> Result<Factors> {
    check_rank(m, n, k)?;
    if b.len() != m * r || a.len() != r * n {
        bail!("factors of shapes [{m}, {r}] and [{r}, {n}] do not match their data");
    }
    finite(b)?;
    finite(a)?;
    let bm = DMatrix::from_row_slice(m, r, &to_f64(b));
    let am = DMatrix::from_row_slice(r, n, &to_f64(a));
    if r > m.min(n) {
        let (ub, va) = truncate_f64(&(bm * am), k);
        return Ok(Factors {
            b: rows_f32(&ub),
            a: rows_f32(&va),
        });
    }
    let qr_b = QR::new(bm);
    let qr_a = QR::new(am.transpose());
    let core = qr_b.r() * qr_a.r().transpose();
    let kk = k.min(r);
    let (cb, ca) = truncate_f64(&core, kk);
    let mut out_b = DMatrix::<f64>::zeros(m, k);
    let mut out_a = DMatrix::<f64>::zeros(k, n);
    out_b.columns_mut(0, kk).copy_from(&(qr_b.q() * cb));
    out_a
        .rows_mut(0, kk)
        .copy_from(&(ca * qr_a.q().transpose()));
    Ok(Factors {
        b: rows_f32(&out_b),
        a: rows_f32(&out_a),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row-major `[m, k] × [k, n]` in f64.
    fn product(f: &Factors, m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| f.b[i * k + t] as f64 * f.a[t * n + j] as f64)
                    .sum();
            }
        }
        out
    }

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// A matrix with known singular values: `U diag(s) Vᵀ` from orthonormalised random bases.
    fn known(m: usize, n: usize, s: &[f64]) -> Vec<f32> {
        let q = |rows: usize, seed: u64| {
            let x = DMatrix::from_row_slice(rows, s.len(), &to_f64(&pseudo(rows * s.len(), seed)));
            QR::new(x).q()
        };
        let (u, v) = (q(m, 1), q(n, 2));
        let full =
            &u * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(s.to_vec())) * v.transpose();
        rows_f32(&full)
    }

    #[test]
    fn dense_truncation_keeps_the_top_singular_values_both_shapes() {
        let s = [5.0, 3.0, 2.0, 0.5, 0.1];
        for (m, n) in [(12, 7), (7, 12)] {
            let data = known(m, n, &s);
            let f = truncate_dense(m, n, &data, 3).unwrap();
            // The rank-3 truncation keeps 5, 3, 2: its B columns have those norms.
            let norms: Vec<f64> = (0..3)
                .map(|c| {
                    (0..m)
                        .map(|i| (f.b[i * 3 + c] as f64).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .collect();
            for (got, want) in norms.iter().zip([5.0, 3.0, 2.0]) {
                assert!((got - want).abs() < 1e-5, "{m}x{n}: {norms:?}");
            }
            // Rows of A are orthonormal.
            for r in 0..3 {
                let nr: f64 = (0..n).map(|j| (f.a[r * n + j] as f64).powi(2)).sum();
                assert!((nr - 1.0).abs() < 1e-5);
            }
            // Full rank reproduces the matrix.
            let full = truncate_dense(m, n, &data, 5).unwrap();
            let p = product(&full, m, 5, n);
            let err = p
                .iter()
                .zip(&data)
                .map(|(x, y)| (x - *y as f64).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-5, "{m}x{n}: {err}");
        }
    }

    #[test]
    fn factored_equals_dense() {
        let (m, r, n) = (10, 4, 9);
        let b = pseudo(m * r, 7);
        let a = pseudo(r * n, 8);
        let mut dense = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                dense[i * n + j] = (0..r)
                    .map(|t| b[i * r + t] as f64 * a[t * n + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
        for k in [2, 4, 6] {
            let f1 = truncate_factored(m, r, n, &b, &a, k).unwrap();
            let f2 = truncate_dense(m, n, &dense, k).unwrap();
            let (p1, p2) = (product(&f1, m, k, n), product(&f2, m, k, n));
            let err = p1
                .iter()
                .zip(&p2)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-5, "k={k}: {err}");
        }
    }

    #[test]
    fn bad_ranks_and_values_are_errors() {
        assert!(truncate_dense(3, 4, &[0.0; 12], 0).is_err());
        assert!(truncate_dense(3, 4, &[0.0; 12], 4).is_err());
        let mut nan = vec![0.0; 12];
        nan[3] = f32::NAN;
        assert!(truncate_dense(3, 4, &nan, 2).is_err());
        // The zero matrix truncates to zero factors.
        let z = truncate_dense(3, 4, &[0.0; 12], 2).unwrap();
        assert!(z.b.iter().chain(&z.a).all(|x| x.is_finite()));
    }
}
