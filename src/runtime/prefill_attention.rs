//! Prompt (prefill) attention of one sequence in query tiles, so a long prompt never holds its
//! `T × T` scores: each tile of query rows attends over the keys up to its last position only
//! (the causal mask makes the later ones zero), with scores at most `SCORE_BYTES_*` in f32.
//!
//! Candle ops only, so it runs on any device and dtype (`runtime::reference` calls it for every
//! prompt chunk). Tiling also skips the masked upper triangle beyond each tile: a prompt in one
//! call does about half the score work of one `T × T` product. The server's prompt chunks are
//! usually one tile; `generate`, `bench` and calibration send whole prompts.

use candle_core::{bail, DType, Device, Result, Tensor};

/// Bytes of f32 scores one tile may hold on the CPU (a few tiles' worth stays in cache-friendly
/// sizes and keeps a long prompt's peak memory small).
pub const SCORE_BYTES_CPU: usize = 32 << 20;

/// Bytes of f32 scores one tile may hold on a GPU (larger tiles: fewer launches per layer).
pub const SCORE_BYTES_GPU: usize = 256 << 20;

/// Query rows per tile for `heads` query heads over at most `keys` keys: as many as fit the
/// device's score budget, at least one.
pub fn query_tile(heads: usize, keys: usize, device: &Device) -> usize {
    let budget = match device.is_cpu() {
        true => SCORE_BYTES_CPU,
        false => SCORE_BYTES_GPU,
    };
    (budget / (heads * keys * 4).max(1)).max(1)
}

/// Causal attention of `q` (`[nh, len, hd]`, RoPE applied, positions `off..off + len`) over the
/// sequence's whole history `k`, `v` (`[nkv, off + len, hd]`, the chunk already appended), GQA
/// by folding each KV head's `nh / nkv` query heads into rows. Softmax in f32, the result in
/// `q`'s dtype: `[nh, len, hd]`. `tile` query rows per pass (`query_tile` for the device).
pub fn attend_prompt(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    off: usize,
    tile: usize,
) -> Result<Tensor> {
    let (nh, len, hd) = q.dims3()?;
    let (nkv, t, _) = k.dims3()?;
    if nkv == 0 || nh % nkv != 0 || t != off + len || v.dims3()? != (nkv, t, hd) {
        bail!(
            "prompt attention: q {:?}, k {:?}, v {:?} at offset {off} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let group = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let dtype = q.dtype();
    let tile = tile.clamp(1, len.max(1));
    let mut outs = Vec::with_capacity(len.div_ceil(tile));
    let mut i0 = 0;
    while i0 < len {
        let n = tile.min(len - i0);
        // Keys beyond this tile's last query are all masked: leave them out.
        let kt = off + i0 + n;
        let keys = |x: &Tensor| match kt == t {
            true => Ok(x.clone()),
            false => x.narrow(1, 0, kt)?.contiguous(),
        };
        let (ks, vs) = (keys(k)?, keys(v)?);
        // Query heads h = kv * group + g share kv head `kv`: fold the group into rows.
        let qg = q
            .narrow(1, i0, n)?
            .contiguous()?
            .reshape((nkv, group * n, hd))?;
        let mut att = (qg.matmul(&ks.t()?)?.to_dtype(DType::F32)? * scale)?;
        if n > 1 {
            let first = off + i0;
            let mask: Vec<f32> = (0..n)
                .flat_map(|i| {
                    (0..kt).map(move |j| {
                        if j > first + i {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (n, kt), q.device())?;
            att = att
                .reshape((nkv, group, n, kt))?
                .broadcast_add(&mask)?
                .reshape((nkv, group * n, kt))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(dtype)?;
        outs.push(att.matmul(&vs.contiguous()?)?.reshape((nh, n, hd))?);
        i0 += n;
    }
    match outs.len() {
        1 => Ok(outs.swap_remove(0)),
        _ => Tensor::cat(&outs, 1),
    }
}

/// Largest relative error `check_against_reference` accepts for `dtype`: scores, probabilities
/// and outputs are each rounded to the dtype (measured on the CPU without tiles: bf16 0.13,
/// f16 0.013 on these inputs; a wrong mask or tile gives errors of order 1).
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 0.2,
        DType::F16 => 0.03,
        _ => 1e-4,
    }
}

/// Compares `attend_prompt` on `device` in `dtype`, untiled and in tiles of 1, 37 and 1,000 rows, with
/// the same attention in f32 on the CPU in one tile, on random inputs of Llama-3-8B's heads
/// (32 query heads over 8 KV heads of 128): 300 prompt rows after 100 cached positions, and a
/// whole 61-row prompt. Returns the largest `|got − ref| / max(|ref|, 0.1)`; non-finite outputs
/// are errors.
pub fn check_against_reference(device: &Device, dtype: DType, seed: u64) -> Result<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (nh, nkv, hd) = (32, 8, 128);
    let mut worst = 0f32;
    for (off, len) in [(100usize, 300usize), (0, 61)] {
        let mut rand = |dims: (usize, usize, usize)| -> Result<Tensor> {
            let v: Vec<f32> = (0..dims.0 * dims.1 * dims.2)
                .map(|_| rng.random::<f32>() * 4.0 - 2.0)
                .collect();
            // Rounded to the dtype first, so both sides read the same values.
            Tensor::from_vec(v, dims, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)
        };
        let (q, k, v) = (
            rand((nh, len, hd))?,
            rand((nkv, off + len, hd))?,
            rand((nkv, off + len, hd))?,
        );
        let want = attend_prompt(&q, &k, &v, off, len)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
        let (qd, kd, vd) = (on(&q)?, on(&k)?, on(&v)?);
        for tile in [len, 1, 37, 1000] {
            let got = attend_prompt(&qd, &kd, &vd, off, tile)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                if !a.is_finite() {
                    bail!(
                        "prompt attention check: element {i} is {a} (reference {b}), tile {tile}"
                    );
                }
                worst = worst.max((a - b).abs() / b.abs().max(0.1));
            }
        }
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let mut s = seed;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Naive causal attention, one query row and head at a time (the math, no tiles).
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, off: usize) -> Vec<f32> {
        let (nh, _, hd) = q.dims3().unwrap();
        let nkv = k.dims3().unwrap().0;
        let (q, k, v) = (
            q.to_vec3::<f32>().unwrap(),
            k.to_vec3::<f32>().unwrap(),
            v.to_vec3::<f32>().unwrap(),
        );
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let mut out = Vec::new();
        for (h, qh) in q.iter().enumerate() {
            let (kh, vh) = (&k[h / (nh / nkv)], &v[h / (nh / nkv)]);
            for (i, qi) in qh.iter().enumerate() {
                let s: Vec<f32> = kh[..=off + i]
                    .iter()
                    .map(|kj| dot(qi, kj) / (hd as f32).sqrt())
                    .collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                out.extend(
                    (0..hd).map(|d| e.iter().zip(vh).map(|(p, vj)| p * vj[d]).sum::<f32>() / z),
                );
            }
        }
        out
    }

    /// Every tile size gives the naive causal attention, with and without a cached prefix,
    /// GQA groups of 1 and 3.
    #[test]
    fn tiles_of_any_size_give_the_causal_attention() {
        for (nh, nkv, off, len) in [(6, 2, 0, 13), (6, 2, 5, 11), (4, 4, 3, 1), (3, 1, 0, 1)] {
            let hd = 8;
            let q = randn((nh, len, hd), 1 + off as u64);
            let k = randn((nkv, off + len, hd), 2 + len as u64);
            let v = randn((nkv, off + len, hd), 3 + nh as u64);
            let want = naive(&q, &k, &v, off);
            for tile in [1, 2, 3, 7, len, 64] {
                let got = attend_prompt(&q, &k, &v, off, tile).unwrap();
                assert_eq!(got.dims(), &[nh, len, hd]);
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-5,
                    "{nh}/{nkv} heads, off {off}, len {len}, tile {tile}: {worst}"
                );
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_an_error() {
        let q = randn((4, 3, 8), 1);
        let k = randn((2, 5, 8), 2);
        assert!(attend_prompt(&q, &k, &k, 1, 2).is_err(), "wrong offset");
        assert!(attend_prompt(&q, &k, &k, 2, 2).is_ok());
        let k3 = randn((3, 5, 8), 3);
        assert!(
            attend_prompt(&q, &k3, &k3, 2, 2).is_err(),
            "heads not a multiple"
        );
    }

    /// The check the GPU run makes, here on the CPU (f32 and bf16 inputs, tiles against one).
    #[test]
    fn the_device_check_passes_on_the_cpu() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let e = check_against_reference(&Device::Cpu, dtype, 1).unwrap();
            assert!(e <= tolerance(dtype), "{dtype:?}: {e}");
        }
    }

    #[test]
    fn the_tile_fits_the_score_budget() {
        let cpu = Device::Cpu;
        let n = query_tile(9, 8192, &cpu);
        assert!(n * 9 * 8192 * 4 <= SCORE_BYTES_CPU && (n + 1) * 9 * 8192 * 4 > SCORE_BYTES_CPU);
        assert_eq!(query_tile(64, 1 << 20, &cpu), 1);
    }
}
