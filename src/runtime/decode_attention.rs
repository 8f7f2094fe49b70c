//! Batched decode attention: one decode step's attention over B sequences, each with ONE new
//! token and its own per-layer KV buffers of its own length, in a constant number of launches
//! per layer (two ops) instead of a dozen small ones per sequence.
//!
//! Sequence `b` owns `k_b`, `v_b`: `[nkv, cap_b, hd]`, contiguous (head, position, dim), on the
//! device and in the dtype (f32, bf16 or f16) of the inputs.
//!
//! 1. [`append_kv_rows`] writes `k_new[b]` / `v_new[b]` (`[B, nkv, hd]`) into position `pos[b]`
//!    of `k_b` / `v_b`, in place.
//! 2. [`decode_attention`] attends `q` (`[B, nh, hd]`) to positions `0..len[b]`: query head `h`
//!    reads KV head `h / (nh / nkv)` (GQA), `s_t = scale · q·k_t`, softmax in f32 (max
//!    subtracted), `out = Σ_t p_t v_t`, rounded once to q's dtype; output `[B, nh·hd]`
//!    (row `b`, column `h·hd + d`).
//!
//! On the CPU both run through plain candle ops / [`decode_attention_reference`]; with the
//! `cuda` feature, on CUDA, through the project's kernels (`runtime::cuda::decode_attention`).
//! [`check_against_reference`] is the device check.

use candle_core::{bail, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// One sequence's KV buffers for one layer: `[nkv, cap, hd]` each, contiguous.
#[derive(Clone, Copy, Debug)]
pub struct KvBuffers<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
}

/// The largest head dim the ops take (the CUDA kernels keep two dims per thread, 128 threads).
pub const MAX_HEAD_DIM: usize = 256;

/// Writes `k_new[b]` into `bufs[b].k[:, pos[b], :]` and `v_new[b]` into `bufs[b].v[:, pos[b], :]`
/// in place. `k_new`, `v_new`: `[B, nkv, hd]`; every buffer `[nkv, cap_b, hd]`, contiguous, of
/// the same dtype and device; `pos[b] < cap_b`. Buffers may not overlap each other nor the new
/// rows. Errors (never panics) on anything else.
pub fn append_kv_rows(
    k_new: &Tensor,
    v_new: &Tensor,
    bufs: &[KvBuffers<'_>],
    pos: &[usize],
) -> Result<()> {
    const OP: &str = "append_kv_rows";
    check_dtype(OP, k_new.dtype())?;
    let (b, nkv, hd) = match k_new.dims() {
        &[b, nkv, hd] => (b, nkv, hd),
        d => bail!("{OP}: k_new must be [B, nkv, hd], got {d:?}"),
    };
    if v_new.dims() != k_new.dims() {
        bail!(
            "{OP}: v_new is {:?}, k_new {:?}",
            v_new.dims(),
            [b, nkv, hd]
        );
    }
    check_like(OP, "v_new", v_new, k_new)?;
    check_heads(OP, nkv, hd)?;
    check_rows(OP, b, bufs.len(), pos.len(), "positions")?;
    let caps = check_buffers(OP, bufs, k_new, nkv, hd)?;
    for (row, (&p, &cap)) in pos.iter().zip(&caps).enumerate() {
        if p >= cap {
            bail!("{OP}: row {row}: position {p} is past its capacity {cap}");
        }
    }
    if b == 0 {
        return Ok(());
    }
    let (k_new, v_new) = (k_new.contiguous()?, v_new.contiguous()?);
    check_no_overlap(OP, &k_new, &v_new, bufs)?;
    match k_new.device() {
        Device::Cpu => {
            for (row, (kb, &p)) in bufs.iter().zip(pos).enumerate() {
                kb.k.slice_set(&k_new.get(row)?.unsqueeze(1)?, 1, p)?;
                kb.v.slice_set(&v_new.get(row)?.unsqueeze(1)?, 1, p)?;
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let pairs: Vec<(&Tensor, &Tensor)> = bufs.iter().map(|b| (b.k, b.v)).collect();
            super::cuda::decode_attention::append_kv_rows(&k_new, &v_new, &pairs, pos, &caps)
        }
        d => bail!("{OP}: device {:?} is not supported", d.location()),
    }
}

/// Attention of each row's query heads (`q`: `[B, nh, hd]`) over positions `0..len[b]` of its
/// buffers (see the module doc); returns `[B, nh·hd]` in q's dtype. `nh` must be a multiple of
/// the buffers' `nkv`, `len[b]` in `1..=cap_b`, `scale` finite. Errors (never panics) otherwise.
pub fn decode_attention(
    q: &Tensor,
    bufs: &[KvBuffers<'_>],
    len: &[usize],
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "decode_attention";
    let dtype = check_dtype(OP, q.dtype())?;
    let (b, nh, hd) = match q.dims() {
        &[b, nh, hd] => (b, nh, hd),
        d => bail!("{OP}: q must be [B, nh, hd], got {d:?}"),
    };
    check_rows(OP, b, bufs.len(), len.len(), "lengths")?;
    if !scale.is_finite() {
        bail!("{OP}: scale {scale} is not finite");
    }
    let Some(first) = bufs.first() else {
        return Tensor::zeros((0, nh * hd), dtype, q.device());
    };
    let nkv = match first.k.dims() {
        &[nkv, _, _] => nkv,
        d => bail!("{OP}: row 0: k must be [nkv, cap, hd], got {d:?}"),
    };
    check_heads(OP, nkv, hd)?;
    if nh == 0 || !nh.is_multiple_of(nkv) {
        bail!("{OP}: {nh} query heads are not a positive multiple of {nkv} KV heads");
    }
    let caps = check_buffers(OP, bufs, q, nkv, hd)?;
    for (row, (&l, &cap)) in len.iter().zip(&caps).enumerate() {
        if l == 0 || l > cap {
            bail!("{OP}: row {row}: length {l} is outside 1..={cap}");
        }
    }
    let q = q.contiguous()?;
    match q.device() {
        Device::Cpu => {
            // The valid positions only: each row as a buffer of capacity len.
            let valid = |t: &Tensor, l: usize| host_f32(&t.narrow(1, 0, l)?);
            let kv = (bufs.iter().zip(len))
                .map(|(kb, &l)| Ok((valid(kb.k, l)?, valid(kb.v, l)?, l)))
                .collect::<Result<Vec<_>>>()?;
            let kv: Vec<_> = kv.iter().map(|(k, v, l)| (&k[..], &v[..], *l)).collect();
            let out = decode_attention_reference(&host_f32(&q)?, b, nh, nkv, hd, &kv, len, scale);
            Tensor::from_vec(out, (b, nh * hd), &Device::Cpu)?.to_dtype(dtype)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let pairs: Vec<(&Tensor, &Tensor)> = bufs.iter().map(|b| (b.k, b.v)).collect();
            super::cuda::decode_attention::decode_attention(&q, &pairs, len, &caps, scale, nkv)
        }
        d => bail!("{OP}: device {:?} is not supported", d.location()),
    }
}

/// The CPU reference on f32 slices: `q` `[b, nh, hd]`; row `i`'s `(k, v, cap)` with `k`, `v` flat
/// `[nkv·cap·hd]`; attends to positions `0..len[i]`. Returns `[b, nh·hd]`, f32 throughout.
///
/// # Panics
/// On slice lengths that do not match the sizes, `nh` not a multiple of `nkv`, or a length
/// outside `1..=cap`: it is the reference for tests and device checks, which build consistent
/// inputs.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_reference(
    q: &[f32],
    b: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    kv: &[(&[f32], &[f32], usize /*cap*/)],
    len: &[usize],
    scale: f32,
) -> Vec<f32> {
    let sizes_fit = nkv > 0 && hd > 0 && nh > 0 && nh.is_multiple_of(nkv);
    assert!(sizes_fit && q.len() == b * nh * hd && kv.len() == b && len.len() == b);
    for (i, (&(k, v, cap), &l)) in kv.iter().zip(len).enumerate() {
        let fits = k.len() == nkv * cap * hd && v.len() == k.len() && (1..=cap).contains(&l);
        assert!(fits, "decode_attention_reference: row {i} does not fit");
    }
    let group = nh / nkv;
    let mut out = vec![0f32; b * nh * hd];
    out.par_chunks_mut(nh * hd)
        .enumerate()
        .for_each(|(row, out_row)| {
            let (k, v, cap) = kv[row];
            let n = len[row];
            let mut p = vec![0f32; n];
            for (h, o) in out_row.chunks_mut(hd).enumerate() {
                let qh = &q[(row * nh + h) * hd..][..hd];
                let base = (h / group) * cap * hd;
                for (t, s) in p.iter_mut().enumerate() {
                    let kt = &k[base + t * hd..][..hd];
                    *s = scale * qh.iter().zip(kt).map(|(a, b)| a * b).sum::<f32>();
                }
                let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                p.iter_mut().for_each(|s| *s = (*s - m).exp());
                let inv = 1.0 / p.iter().sum::<f32>();
                for (t, &pt) in p.iter().enumerate() {
                    let vt = &v[base + t * hd..][..hd];
                    o.iter_mut().zip(vt).for_each(|(o, &x)| *o += pt * inv * x);
                }
            }
        });
    out
}

pub(super) fn check_dtype(op: &str, dtype: DType) -> Result<DType> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(dtype),
        d => bail!("{op}: dtype {d:?} is not supported (f32, bf16 or f16)"),
    }
}

/// The host copy of `t` as f32.
pub(super) fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

fn check_rows(op: &str, b: usize, bufs: usize, per_row: usize, what: &str) -> Result<()> {
    if bufs != b || per_row != b {
        bail!("{op}: {b} rows but {bufs} buffer pairs and {per_row} {what}");
    }
    Ok(())
}

pub(super) fn check_heads(op: &str, nkv: usize, hd: usize) -> Result<()> {
    if nkv == 0 || !(1..=MAX_HEAD_DIM).contains(&hd) {
        bail!("{op}: {nkv} KV heads of dim {hd}: need at least one head, dim 1..={MAX_HEAD_DIM}");
    }
    Ok(())
}

/// `t` has `like`'s dtype and device.
pub(super) fn check_like(op: &str, what: &str, t: &Tensor, like: &Tensor) -> Result<()> {
    let (dtype, want) = (t.dtype(), like.dtype());
    if dtype != want {
        bail!("{op}: {what} is {dtype:?}, expected {want:?}");
    }
    let (dev, want) = (t.device().location(), like.device().location());
    if !t.device().same_device(like.device()) {
        bail!("{op}: {what} is on {dev:?}, expected {want:?}");
    }
    Ok(())
}

/// Every buffer `[nkv, cap, hd]` (k and v of a row with one cap), contiguous, of `like`'s dtype
/// and device; returns the caps.
fn check_buffers(
    op: &str,
    bufs: &[KvBuffers<'_>],
    like: &Tensor,
    nkv: usize,
    hd: usize,
) -> Result<Vec<usize>> {
    let mut caps = Vec::with_capacity(bufs.len());
    for (row, kb) in bufs.iter().enumerate() {
        let cap = match kb.k.dims() {
            &[n, cap, d] if n == nkv && d == hd && cap > 0 => cap,
            d => bail!("{op}: row {row}: k must be [nkv = {nkv}, cap > 0, hd = {hd}], got {d:?}"),
        };
        let v_dims = kb.v.dims();
        if v_dims != kb.k.dims() {
            bail!("{op}: row {row}: v is {v_dims:?}, k [{nkv}, {cap}, {hd}]");
        }
        for (name, t) in [("k", kb.k), ("v", kb.v)] {
            check_like(op, &format!("row {row}'s {name}"), t, like)?;
            if !t.is_contiguous() {
                bail!("{op}: row {row}: {name} is not contiguous");
            }
        }
        caps.push(cap);
    }
    Ok(caps)
}

/// Each tensor's storage identity and contiguous element range (read guards taken one at a
/// time, dropped at once).
pub(super) fn storage_range(op: &str, t: &Tensor) -> Result<(usize, usize, usize)> {
    let (guard, layout) = t.storage_and_layout();
    let key = &*guard as *const Storage as usize;
    match layout.contiguous_offsets() {
        Some((lo, hi)) => Ok((key, lo, hi)),
        None => bail!("{op}: a tensor is not contiguous"),
    }
}

/// The buffers written in place may overlap neither each other nor the rows written from.
fn check_no_overlap(
    op: &str,
    k_new: &Tensor,
    v_new: &Tensor,
    bufs: &[KvBuffers<'_>],
) -> Result<()> {
    let read = [storage_range(op, k_new)?, storage_range(op, v_new)?];
    let mut written = Vec::with_capacity(2 * bufs.len());
    for (row, kb) in bufs.iter().enumerate() {
        for (name, t) in [("k", kb.k), ("v", kb.v)] {
            let (key, lo, hi) = storage_range(op, t)?;
            let overlaps = |r: &(usize, usize, usize)| r.0 == key && r.1 < hi && lo < r.2;
            if let Some(i) = read.iter().position(overlaps) {
                let other = ["k_new", "v_new"][i];
                bail!("{op}: row {row}'s {name} shares memory with {other}");
            }
            written.push((key, lo, hi, row, name));
        }
    }
    // Sorted by (storage, start), a range overlaps an earlier one iff it starts before the
    // furthest end reached so far in its storage.
    written.sort_unstable_by_key(|w| (w.0, w.1));
    let mut reach: Option<usize> = None;
    for i in 0..written.len() {
        let (key, lo, hi, row, name) = written[i];
        match reach {
            Some(j) if written[j].0 == key && written[j].2 > lo => {
                let (_, _, _, row_j, name_j) = written[j];
                bail!("{op}: row {row}'s {name} shares memory with row {row_j}'s {name_j}");
            }
            Some(j) if written[j].0 == key && written[j].2 >= hi => {}
            _ => reach = Some(i),
        }
    }
    Ok(())
}

pub use super::kernel_tolerance as tolerance;

/// The cases [`check_against_reference`] runs: (B, nh, nkv, hd, longest length). 1: the decode
/// batch (GQA 32/8, hd 128, mixed lengths); 2: a small odd head dim, groups of 3; 3: MHA with
/// hd 16; 4: groups of 10 query heads (two head chunks on CUDA) with hd 256; 5: one long row
/// (the CUDA kernel splits it over many blocks).
pub(super) const CHECK_CASES: [(usize, usize, usize, usize, usize); 5] = [
    (64, 32, 8, 128, 1500),
    (7, 12, 4, 40, 300),
    (5, 4, 4, 16, 200),
    (3, 20, 2, 256, 700),
    (1, 32, 8, 128, 8192),
];

/// Runs [`append_kv_rows`] then [`decode_attention`] on `device` in `dtype` on seeded random
/// inputs (`CHECK_CASES`: B = 64 rows of lengths 1..=1500, 1 included, GQA nh = 32 / nkv = 8,
/// hd = 128; small-hd, MHA, wide-group and long-row cases) and compares with
/// [`decode_attention_reference`] on the same (dtype-rounded) values. Returns the largest
/// `|got − ref|` relative to the largest `|ref|`; compare it with [`tolerance`]. The buffers hold
/// NaN from the appended position on, so a read past `len` shows; the memory an output of the
/// same size gets is poisoned with NaN first. Errors on a non-finite output or an append that
/// did not write exactly its slot.
pub fn check_against_reference(device: &Device, dtype: DType, seed: u64) -> Result<f32> {
    let mut worst = 0f32;
    for (i, &case) in CHECK_CASES.iter().enumerate() {
        let err = check_case(device, dtype, seed.wrapping_add(i as u64), case)?;
        worst = worst.max(err);
    }
    Ok(worst)
}

fn check_case(
    device: &Device,
    dtype: DType,
    seed: u64,
    (b, nh, nkv, hd, max_len): (usize, usize, usize, usize, usize),
) -> Result<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let round = |x: f32| match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    };
    let on_device = |data: Vec<f32>, dims: &[usize]| -> Result<Tensor> {
        let cpu = Tensor::from_vec(data, dims, &Device::Cpu)?;
        cpu.to_dtype(dtype)?.to_device(device)
    };
    // Lengths: row 1 (0 if alone) the longest, row 0 one position, the rest mixed; caps from
    // len (every third row) to len + 8. Each row appends at len - 1.
    let mut len: Vec<usize> = (0..b).map(|_| rng.random_range(1..=max_len)).collect();
    (len[0], len[1 % b]) = (1, max_len);
    let mut caps: Vec<usize> = len.iter().map(|l| l + rng.random_range(1..=8)).collect();
    for row in (0..b).step_by(3) {
        caps[row] = len[row];
    }
    let pos: Vec<usize> = len.iter().map(|l| l - 1).collect();
    let mut uniform = |n: usize, a: f32| -> Vec<f32> {
        let x = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * a);
        x.map(round).collect()
    };
    // q spreads the scores over a few units; row 2's (the max matters) over ~40 times more.
    let mut q = uniform(b * nh * hd, 3.0);
    for x in q.iter_mut().skip(2 * nh * hd).take(nh * hd) {
        *x = round(*x * 40.0);
    }
    let (k_new, v_new) = (uniform(b * nkv * hd, 1.0), uniform(b * nkv * hd, 1.0));
    // Device buffers hold NaN from the appended slot on; `host` holds them after the append.
    let (mut host, mut tensors) = (Vec::with_capacity(b), Vec::with_capacity(b));
    for (row, (&cap, &p)) in caps.iter().zip(&pos).enumerate() {
        let mut kv = [uniform(nkv * cap * hd, 1.0), uniform(nkv * cap * hd, 1.0)];
        for head in kv.iter_mut().flat_map(|buf| buf.chunks_mut(cap * hd)) {
            head[p * hd..].fill(f32::NAN);
        }
        let [k, v] = kv.clone().map(|x| on_device(x, &[nkv, cap, hd]));
        tensors.push([k?, v?]);
        for (buf, new) in kv.iter_mut().zip([&k_new, &v_new]) {
            for g in 0..nkv {
                let (dst, src) = ((g * cap + p) * hd, (row * nkv + g) * hd);
                buf[dst..dst + hd].copy_from_slice(&new[src..src + hd]);
            }
        }
        host.push(kv);
    }
    let bufs: Vec<_> = tensors.iter().map(|[k, v]| KvBuffers { k, v }).collect();
    let dims = [b, nkv, hd];
    let (k_new_t, v_new_t) = (on_device(k_new, &dims)?, on_device(v_new, &dims)?);
    append_kv_rows(&k_new_t, &v_new_t, &bufs, &pos)?;
    for (row, (kb, kv)) in bufs.iter().zip(&host).enumerate() {
        // The appended slot and the next one (still NaN, when there is one) are as they should.
        let (cap, p) = (caps[row], pos[row]);
        let n = (cap - p).min(2);
        for (t, h) in [kb.k, kb.v].into_iter().zip(kv) {
            let want = (0..nkv).flat_map(|g| &h[(g * cap + p) * hd..(g * cap + p + n) * hd]);
            let same =
                |(a, b): (&f32, &f32)| a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan();
            if !host_f32(&t.narrow(1, p, n)?)?.iter().zip(want).all(same) {
                bail!("decode_attention check: row {row}: slots {p}.. are not as appended");
            }
        }
    }

    let scale = 1.0 / (hd as f32).sqrt();
    drop(Tensor::full(f32::NAN, (b, nh * hd), device)?.to_dtype(dtype)?);
    let got = decode_attention(&on_device(q.clone(), &[b, nh, hd])?, &bufs, &len, scale)?;
    let got = host_f32(&got)?;
    let kv = host
        .iter()
        .zip(&caps)
        .map(|([k, v], &c)| (&k[..], &v[..], c));
    let kv: Vec<_> = kv.collect();
    let want = decode_attention_reference(&q, b, nh, nkv, hd, &kv, &len, scale);
    let max = want.iter().fold(1e-6f32, |m, w| m.max(w.abs()));
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if !g.is_finite() {
            let (row, col) = (i / (nh * hd), i % (nh * hd));
            bail!("decode_attention check: output [{row}, {col}] is {g} (reference {w})");
        }
        worst = worst.max((g - w).abs() / max);
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(data: Vec<f32>, dims: &[usize]) -> Tensor {
        Tensor::from_vec(data, dims, &Device::Cpu).expect("tensor")
    }

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let v = crate::quant::test_noise(n, seed);
        v.iter().map(|x| 4.0 * x).collect()
    }

    fn fails<T: std::fmt::Debug>(res: Result<T>, needle: &str) {
        let msg = res.expect_err("must fail").to_string();
        assert!(msg.contains(needle), "{msg:?} does not say {needle:?}");
    }

    /// 3 rows of these capacities and lengths; GQA 6 query heads over 2 KV heads, hd 8.
    const CAPS: [usize; 3] = [5, 9, 12];
    const LEN: [usize; 3] = [1, 9, 7];
    const NH: usize = 6;
    const NKV: usize = 2;
    const HD: usize = 8;

    fn buffers(seed: u64) -> Vec<(Tensor, Tensor)> {
        let kv = |cap: usize, s: u64| t(noise(NKV * cap * HD, s), &[NKV, cap, HD]);
        let s = |i: usize| seed + 2 * i as u64;
        (0..3)
            .map(|i| (kv(CAPS[i], s(i)), kv(CAPS[i], s(i) + 1)))
            .collect()
    }

    type Kv<'a> = KvBuffers<'a>;

    fn refs(bufs: &[(Tensor, Tensor)]) -> Vec<KvBuffers<'_>> {
        bufs.iter().map(|(k, v)| KvBuffers { k, v }).collect()
    }

    /// The reference on host copies `kv` of the buffers.
    fn reference(q: &[f32], kv: &[(Vec<f32>, Vec<f32>)], scale: f32) -> Vec<f32> {
        let kv = kv.iter().zip(CAPS).map(|((k, v), c)| (&k[..], &v[..], c));
        decode_attention_reference(q, 3, NH, NKV, HD, &kv.collect::<Vec<_>>(), &LEN, scale)
    }

    /// `r` with row `i`'s buffers replaced.
    fn with_row<'a>(r: &[KvBuffers<'a>], i: usize, k: &'a Tensor, v: &'a Tensor) -> Vec<Kv<'a>> {
        let mut r = r.to_vec();
        r[i] = KvBuffers { k, v };
        r
    }

    #[test]
    fn reference_matches_candle_ops() -> Result<()> {
        let bufs = buffers(1);
        let q = noise(3 * NH * HD, 100);
        let kv = bufs.iter().map(|(k, v)| Ok((host_f32(k)?, host_f32(v)?)));
        let got = reference(&q, &kv.collect::<Result<Vec<_>>>()?, 0.3);
        for (row, ((k, v), &l)) in bufs.iter().zip(&LEN).enumerate() {
            // [nkv, group, hd] queries against [nkv, len, hd] keys: GQA by reshape.
            let qb = t(q[row * NH * HD..][..NH * HD].to_vec(), &[NKV, NH / NKV, HD]);
            let (k, v) = (k.narrow(1, 0, l)?, v.narrow(1, 0, l)?);
            let p = candle_nn::ops::softmax_last_dim(&(qb.matmul(&k.t()?)? * 0.3)?)?;
            let want = host_f32(&p.matmul(&v)?)?;
            for (g, w) in got[row * NH * HD..][..NH * HD].iter().zip(&want) {
                let close = (g - w).abs() <= 1e-5 * w.abs().max(1.0);
                assert!(close, "row {row}: {g} vs {w}");
            }
        }
        Ok(())
    }

    #[test]
    fn cpu_ops_append_then_attend_like_the_reference() -> Result<()> {
        let bufs = buffers(10);
        let (k_new, v_new) = (noise(3 * NKV * HD, 50), noise(3 * NKV * HD, 51));
        let pos = LEN.map(|l| l - 1);
        let mut kv = Vec::new();
        for (row, ((k, v), cap)) in bufs.iter().zip(CAPS).enumerate() {
            let (mut k, mut v) = (host_f32(k)?, host_f32(v)?);
            for g in 0..NKV {
                let (dst, src) = ((g * cap + pos[row]) * HD, (row * NKV + g) * HD);
                k[dst..dst + HD].copy_from_slice(&k_new[src..src + HD]);
                v[dst..dst + HD].copy_from_slice(&v_new[src..src + HD]);
            }
            kv.push((k, v));
        }
        let dims = [3, NKV, HD];
        append_kv_rows(&t(k_new, &dims), &t(v_new, &dims), &refs(&bufs), &pos)?;
        for ((k, v), (hk, hv)) in bufs.iter().zip(&kv) {
            assert_eq!((&host_f32(k)?, &host_f32(v)?), (hk, hv), "after the append");
        }
        let q = noise(3 * NH * HD, 60);
        let got = decode_attention(&t(q.clone(), &[3, NH, HD]), &refs(&bufs), &LEN, 0.2)?;
        assert_eq!(got.dims(), [3, NH * HD]);
        assert_eq!(host_f32(&got)?, reference(&q, &kv, 0.2));
        Ok(())
    }

    #[test]
    fn invalid_inputs_are_errors() -> Result<()> {
        let bufs = buffers(20);
        let r = refs(&bufs);
        let q = t(noise(3 * NH * HD, 1), &[3, NH, HD]);
        let new = t(noise(3 * NKV * HD, 2), &[3, NKV, HD]);
        let pos = [0, 8, 6];
        decode_attention(&q, &r, &LEN, 1.0)?;
        append_kv_rows(&new, &new, &r, &pos)?;
        // Shapes, batch sizes, lengths, positions, scale, dtypes.
        let attend =
            |q: &Tensor, r: &[KvBuffers<'_>], len: &[usize]| decode_attention(q, r, len, 1.0);
        fails(attend(&q.flatten_from(1)?, &r, &LEN), "q must be");
        fails(attend(&q, &r[..2], &LEN), "3 rows");
        fails(attend(&q, &r, &[1, 9]), "3 rows");
        fails(attend(&q, &r, &[0, 9, 7]), "outside 1..=5");
        fails(attend(&q, &r, &[1, 10, 7]), "outside 1..=9");
        fails(decode_attention(&q, &r, &LEN, f32::NAN), "not finite");
        let (q5, q_hd4) = (t(noise(120, 3), &[3, 5, HD]), t(noise(72, 3), &[3, NH, 4]));
        fails(attend(&q5, &r, &LEN), "multiple");
        fails(attend(&q_hd4, &r, &LEN), "hd = 4");
        fails(attend(&q.to_dtype(DType::BF16)?, &r, &LEN), "BF16");
        fails(attend(&q.to_dtype(DType::U32)?, &r, &LEN), "not supported");
        fails(append_kv_rows(&new, &new, &r, &[0, 9, 6]), "capacity 9");
        fails(append_kv_rows(&new, &new, &r, &pos[..2]), "3 rows");
        fails(append_kv_rows(&new, &new.get(0)?, &r, &pos), "v_new");
        let new_bf16 = new.to_dtype(DType::BF16)?;
        fails(append_kv_rows(&new, &new_bf16, &r, &pos), "BF16");
        fails(append_kv_rows(&new_bf16, &new_bf16, &r, &pos), "BF16");
        // Buffers: v shaped unlike k, not contiguous, sharing memory (each other, k_new).
        let wide = t(noise(9 * NKV * HD, 4), &[9, NKV, HD]).transpose(0, 1)?;
        let (v_unlike_k, strided) = (
            with_row(&r, 1, r[1].k, r[2].v),
            with_row(&r, 1, r[1].k, &wide),
        );
        fails(attend(&q, &v_unlike_k, &LEN), "row 1: v is");
        fails(attend(&q, &strided, &LEN), "contiguous");
        let shared = with_row(&r, 2, r[2].k, r[2].k);
        fails(append_kv_rows(&new, &new, &shared, &pos), "shares memory");
        let whole = t(noise(2 * NKV * 9 * HD, 5), &[2 * NKV, 9, HD]);
        let [lo, mid, hi] = [0, 1, NKV].map(|s| whole.narrow(0, s, NKV));
        let (lo, mid, hi) = (lo?, mid?, hi?);
        let overlap = with_row(&r, 1, &lo, &mid);
        fails(append_kv_rows(&new, &new, &overlap, &pos), "shares memory");
        // Disjoint parts of one storage are fine.
        append_kv_rows(&new, &new, &with_row(&r, 1, &lo, &hi), &pos)?;
        let fresh = t(noise(3 * NKV * HD, 6), &[NKV, 3, HD]);
        let alias = new.reshape((NKV, 3, HD))?;
        let into_new = with_row(&r, 0, &fresh, &alias);
        fails(append_kv_rows(&new, &new, &into_new, &pos), "with k_new");
        // No rows: nothing to do.
        let q0 = t(vec![], &[0, NH, HD]);
        assert_eq!(decode_attention(&q0, &[], &[], 1.0)?.dims(), [0, NH * HD]);
        Ok(())
    }

    #[test]
    fn cpu_check_against_reference() -> Result<()> {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let err = check_against_reference(&Device::Cpu, dtype, 0)?;
            assert!(err <= tolerance(dtype), "{dtype:?}: relative error {err}");
        }
        Ok(())
    }
}
