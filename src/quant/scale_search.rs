//! Block scales for GPTQ's act-order rounding (`quant::gptq`), chosen before any code is: per
//! block of `blocksize` weights, the absmax that rounds the block with the least input-weighted
//! error `Σ d_j (w_j − q_j)²` (`d`: the diagonal of the layer's input Hessian), searched among
//! shrunk absmax values; with double quantization, among the scales the 8-bit nested code can
//! store. Every choice is still an ordinary bitsandbytes NF4 scale: dequantization is
//! `code · scale` whatever the scale is.

use super::nf4::{quantize_nf4_value, NestedAbsmax, NF4_CODE};
use rayon::prelude::*;

/// Shrink steps tried below a block's absmax: `absmax · (1 − 0.02 k)`, k = 0..=10.
const SHRINK_STEPS: usize = 10;
/// Stored 8-bit scales tried either side of the double-quantized one.
const NESTED_NEIGHBOURS: usize = 6;

/// `Σ d_j (w_j − q_j)²` for one block rounded to nearest at scale `s`.
fn block_error(block: &[f32], d: &[f32], s: f32) -> f32 {
    let r = 1.0 / s;
    block
        .iter()
        .zip(d)
        .map(|(v, dj)| {
            let q = NF4_CODE[quantize_nf4_value(v * r) as usize] * s;
            dj * (v - q) * (v - q)
        })
        .sum()
}

/// Per block of a row-major `[_, cols]` weight, the shrunk absmax with the least error.
pub(super) fn searched_scales(weight: &[f32], cols: usize, bs: usize, d: &[f32]) -> Vec<f32> {
    weight
        .par_chunks(bs)
        .enumerate()
        .map(|(b, block)| {
            let c0 = (b * bs) % cols;
            let d = &d[c0..c0 + bs];
            let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut best = (block_error(block, d, m), m);
            for k in 1..=SHRINK_STEPS {
                let s = m * (1.0 - 0.02 * k as f32);
                let e = block_error(block, d, s);
                if e < best.0 {
                    best = (e, s);
                }
            }
            best.1
        })
        .collect()
}

/// Re-picks each block's 8-bit code among its neighbours in value order (the nested absmax and
/// offset stay as they are, so the other blocks' scales do not move): double quantization
/// rounds the searched scales to the 8-bit grid, and the nearest stored scale is not always the
/// one that rounds the block best.
pub(super) fn refine_nested_scales(
    nested: &mut NestedAbsmax,
    weight: &[f32],
    cols: usize,
    bs: usize,
    d: &[f32],
) {
    let mut by_value: Vec<u8> = (0..=255u8).collect();
    by_value.sort_by(|&a, &b| nested.code[a as usize].total_cmp(&nested.code[b as usize]));
    let mut rank = [0usize; 256];
    for (i, &c) in by_value.iter().enumerate() {
        rank[c as usize] = i;
    }
    let (code, absmax, group, offset) = (
        &nested.code,
        &nested.absmax,
        nested.blocksize,
        nested.offset,
    );
    nested
        .codes
        .par_iter_mut()
        .zip(weight.par_chunks(bs))
        .enumerate()
        .for_each(|(b, (stored, block))| {
            let ga = absmax[b / group];
            let c0 = (b * bs) % cols;
            let d = &d[c0..c0 + bs];
            let scale = |c: u8| code[c as usize] * ga + offset;
            let mut best = (block_error(block, d, scale(*stored)), *stored);
            let r = rank[*stored as usize];
            let lo = r.saturating_sub(NESTED_NEIGHBOURS);
            let hi = (r + NESTED_NEIGHBOURS).min(255);
            for &c in &by_value[lo..=hi] {
                let s = scale(c);
                if s > 0.0 && s.is_finite() {
                    let e = block_error(block, d, s);
                    if e < best.0 {
                        best = (e, c);
                    }
                }
            }
            *stored = best.1;
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::nf4::{quantize_nf4, Absmax};
    use crate::quant::test_noise as noise;

    /// Total input-weighted error of `w` rounded at per-block `scales`.
    fn total_error(w: &[f32], d: &[f32], cols: usize, scales: &[f32]) -> f64 {
        w.chunks(64)
            .enumerate()
            .map(|(b, block)| {
                let c0 = (b * 64) % cols;
                block_error(block, &d[c0..c0 + 64], scales[b]) as f64
            })
            .sum()
    }

    #[test]
    fn searched_scales_round_with_less_error_than_absmax() {
        let (rows, cols) = (32, 256);
        let w = noise(rows * cols, 1);
        let d: Vec<f32> = noise(cols, 2).iter().map(|v| v + 0.6).collect();
        let plain = quantize_nf4(&w, rows, cols, 64).unwrap().absmax_f32();
        let searched = searched_scales(&w, cols, 64, &d);
        for (s, m) in searched.iter().zip(&plain) {
            assert!(*s <= *m && *s >= 0.79 * m, "{s} vs absmax {m}");
        }
        assert!(total_error(&w, &d, cols, &searched) < total_error(&w, &d, cols, &plain));
    }

    #[test]
    fn refined_nested_scales_round_with_no_more_error_and_keep_the_groups() {
        let (rows, cols) = (64, 512);
        let w: Vec<f32> = noise(rows * cols, 3)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1.0 + (i / 64 % 5) as f32))
            .collect();
        let d: Vec<f32> = noise(cols, 4).iter().map(|v| v + 0.6).collect();
        let mut p = quantize_nf4(&w, rows, cols, 64).unwrap();
        p.absmax = Absmax::F32(searched_scales(&w, cols, 64, &d));
        p.double_quantize();
        let before = p.absmax_f32();
        let Absmax::Nested(n) = &mut p.absmax else {
            panic!("double quantized")
        };
        let (group_absmax, offset) = (n.absmax.clone(), n.offset);
        refine_nested_scales(n, &w, cols, 64, &d);
        assert_eq!((n.absmax.clone(), n.offset), (group_absmax, offset));
        let after = p.absmax_f32();
        let (eb, ea) = (
            total_error(&w, &d, cols, &before),
            total_error(&w, &d, cols, &after),
        );
        assert!(ea < eb, "refined {ea} vs nearest {eb}");
        for (b, (x, y)) in before.iter().zip(&after).enumerate() {
            let c0 = (b * 64) % cols;
            let blk = &w[b * 64..b * 64 + 64];
            assert!(
                block_error(blk, &d[c0..c0 + 64], *y) <= block_error(blk, &d[c0..c0 + 64], *x),
                "block {b}"
            );
        }
    }
}
