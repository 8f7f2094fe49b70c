//! Decode attention over a paged KV pool: the device side of the engine's KV blocks
//! (`engine::kv_blocks`). One layer's keys and values live in two pools of fixed-size blocks,
//! `[blocks, nkv, bs, hd]` each, contiguous; a sequence's positions are the blocks its table
//! lists, position `t` at block `table[t / bs]`, slot `t % bs`. Tables may share blocks (a
//! shared prefix is read by every row that lists it); writes never go to a slot two rows share.
//!
//! 1. [`paged_append_kv_rows`] writes `k_new[b]` / `v_new[b]` (`[B, nkv, hd]`) at position
//!    `pos[b]` of row `b`'s table, in place.
//! 2. [`paged_decode_attention`] attends `q` (`[B, nh, hd]`) to positions `0..len[b]` of row
//!    `b`'s table, with the math of [`super::decode_attention`] (GQA, f32 softmax, one rounding).
//!
//! On the CPU both gather through candle ops and the contiguous reference
//! ([`super::decode_attention::decode_attention_reference`]); with the `cuda` feature, on CUDA,
//! through the project's kernels (`runtime::cuda::paged_kv`, sharing the attention kernel's body).
//! [`check_against_reference`] is the device check.

use super::decode_attention::{
    check_dtype, check_heads, check_like, decode_attention_reference, host_f32, storage_range,
    CHECK_CASES,
};
use crate::model::kv_pool::gather_history;
use candle_core::{bail, DType, Device, Result, Tensor};

/// One layer's KV pool: `k` and `v` are `[blocks, nkv, bs, hd]` each, contiguous, of one dtype
/// on one device, in separate memory.
#[derive(Clone, Copy, Debug)]
pub struct PagedKv<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
}

/// The pool's `(blocks, nkv, bs, hd)`, checked.
#[derive(Clone, Copy, Debug)]
struct PoolShape {
    blocks: usize,
    nkv: usize,
    bs: usize,
    hd: usize,
}

impl PagedKv<'_> {
    fn shape(&self, op: &str, like: &Tensor) -> Result<PoolShape> {
        let (blocks, nkv, bs, hd) = match self.k.dims() {
            &[blocks, nkv, bs, hd] if blocks > 0 && bs > 0 => (blocks, nkv, bs, hd),
            d => bail!("{op}: the K pool must be [blocks > 0, nkv, bs > 0, hd], got {d:?}"),
        };
        if self.v.dims() != self.k.dims() {
            bail!(
                "{op}: the V pool is {:?}, K {:?}",
                self.v.dims(),
                self.k.dims()
            );
        }
        check_heads(op, nkv, hd)?;
        for (name, t) in [("K pool", self.k), ("V pool", self.v)] {
            check_like(op, name, t, like)?;
            if !t.is_contiguous() {
                bail!("{op}: the {name} is not contiguous");
            }
        }
        let (k, v) = (storage_range(op, self.k)?, storage_range(op, self.v)?);
        if k.0 == v.0 && k.1 < v.2 && v.1 < k.2 {
            bail!("{op}: the K and V pools share memory");
        }
        if blocks.saturating_mul(bs) > u32::MAX as usize {
            bail!("{op}: a pool of {blocks} blocks of {bs} positions is too large");
        }
        Ok(PoolShape {
            blocks,
            nkv,
            bs,
            hd,
        })
    }
}

/// Every table's ids are blocks of the pool and cover `need[b]` positions.
fn check_tables(
    op: &str,
    shape: PoolShape,
    tables: &[&[u32]],
    need: &[usize],
    what: &str,
) -> Result<()> {
    for (row, (table, &n)) in tables.iter().zip(need).enumerate() {
        if let Some(&id) = table.iter().find(|&&id| id as usize >= shape.blocks) {
            bail!(
                "{op}: row {row}: block {id} is outside the pool of {}",
                shape.blocks
            );
        }
        let covered = table.len() * shape.bs;
        if n > covered {
            bail!("{op}: row {row}: {what} {n} is past the {covered} positions of its blocks");
        }
    }
    Ok(())
}

fn check_rows(op: &str, b: usize, tables: usize, per_row: usize, what: &str) -> Result<()> {
    if tables != b || per_row != b {
        bail!("{op}: {b} rows but {tables} block tables and {per_row} {what}");
    }
    Ok(())
}

/// Writes `k_new[b]` / `v_new[b]` (`[B, nkv, hd]`) at position `pos[b]` of row `b`'s blocks, in
/// place. Errors (never panics) on shapes, dtypes or devices that differ, ids outside the pool,
/// positions past a table's blocks, two rows writing one slot, or new rows in the pool's memory.
pub fn paged_append_kv_rows(
    k_new: &Tensor,
    v_new: &Tensor,
    pool: PagedKv<'_>,
    tables: &[&[u32]],
    pos: &[usize],
) -> Result<()> {
    const OP: &str = "paged_append_kv_rows";
    check_dtype(OP, k_new.dtype())?;
    let shape = pool.shape(OP, k_new)?;
    let (nkv, hd) = (shape.nkv, shape.hd);
    let b = match k_new.dims() {
        &[b, n, d] if n == nkv && d == hd => b,
        d => bail!("{OP}: k_new must be [B, nkv = {nkv}, hd = {hd}], got {d:?}"),
    };
    if v_new.dims() != k_new.dims() {
        bail!(
            "{OP}: v_new is {:?}, k_new {:?}",
            v_new.dims(),
            k_new.dims()
        );
    }
    check_like(OP, "v_new", v_new, k_new)?;
    check_rows(OP, b, tables.len(), pos.len(), "positions")?;
    let ends: Vec<usize> = pos.iter().map(|p| p + 1).collect();
    check_tables(OP, shape, tables, &ends, "position + 1")?;
    // The slot each row writes: block * bs + offset, distinct across rows.
    let slots: Vec<u32> = (tables.iter().zip(pos))
        .map(|(t, &p)| t[p / shape.bs] * shape.bs as u32 + (p % shape.bs) as u32)
        .collect();
    let mut sorted: Vec<(u32, usize)> = slots.iter().copied().zip(0..).collect();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!(
            "{OP}: rows {} and {} write the same pool slot",
            w[0].1,
            w[1].1
        );
    }
    if b == 0 {
        return Ok(());
    }
    let (k_new, v_new) = (k_new.contiguous()?, v_new.contiguous()?);
    for (name, t) in [("k_new", &k_new), ("v_new", &v_new)] {
        let r = storage_range(OP, t)?;
        for p in [pool.k, pool.v] {
            let w = storage_range(OP, p)?;
            if r.0 == w.0 && r.1 < w.2 && w.1 < r.2 {
                bail!("{OP}: {name} shares memory with the pool");
            }
        }
    }
    match k_new.device() {
        Device::Cpu => {
            for (row, &slot) in slots.iter().enumerate() {
                let (block, off) = (slot as usize / shape.bs, slot as usize % shape.bs);
                let (k, v) = (k_new.get(row)?.unsqueeze(1)?, v_new.get(row)?.unsqueeze(1)?);
                pool.k.get(block)?.slice_set(&k, 1, off)?;
                pool.v.get(block)?.slice_set(&v, 1, off)?;
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => super::cuda::paged_kv::paged_append_kv_rows(
            &k_new,
            &v_new,
            (pool.k, pool.v),
            &slots,
            (nkv, shape.bs, hd),
        ),
        d => bail!("{OP}: device {:?} is not supported", d.location()),
    }
}

/// Attention of each row's query heads (`q`: `[B, nh, hd]`) over positions `0..len[b]` of its
/// blocks; returns `[B, nh·hd]` in q's dtype. `nh` a multiple of the pool's `nkv`, `len[b] ≥ 1`
/// and covered by its table, `scale` finite. Errors (never panics) otherwise.
pub fn paged_decode_attention(
    q: &Tensor,
    pool: PagedKv<'_>,
    tables: &[&[u32]],
    len: &[usize],
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "paged_decode_attention";
    let dtype = check_dtype(OP, q.dtype())?;
    let shape = pool.shape(OP, q)?;
    let (nkv, hd) = (shape.nkv, shape.hd);
    let (b, nh) = match q.dims() {
        &[b, nh, d] if d == hd => (b, nh),
        d => bail!("{OP}: q must be [B, nh, hd = {hd}], got {d:?}"),
    };
    if nh == 0 || !nh.is_multiple_of(nkv) {
        bail!("{OP}: {nh} query heads are not a positive multiple of {nkv} KV heads");
    }
    check_rows(OP, b, tables.len(), len.len(), "lengths")?;
    if !scale.is_finite() {
        bail!("{OP}: scale {scale} is not finite");
    }
    if let Some(row) = len.iter().position(|&l| l == 0) {
        bail!("{OP}: row {row}: length 0 (a row attends to at least its own position)");
    }
    check_tables(OP, shape, tables, len, "length")?;
    if b == 0 {
        return Tensor::zeros((0, nh * hd), dtype, q.device());
    }
    let q = q.contiguous()?;
    match q.device() {
        Device::Cpu => {
            let kv = (tables.iter().zip(len))
                .map(|(t, &l)| gather(pool, t, l))
                .collect::<Result<Vec<_>>>()?;
            let kv: Vec<_> = (kv.iter().zip(len))
                .map(|((k, v), &l)| (&k[..], &v[..], l))
                .collect();
            let out = decode_attention_reference(&host_f32(&q)?, b, nh, nkv, hd, &kv, len, scale);
            Tensor::from_vec(out, (b, nh * hd), &Device::Cpu)?.to_dtype(dtype)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => super::cuda::paged_kv::paged_decode_attention(
            &q,
            (pool.k, pool.v),
            tables,
            len,
            scale,
            (nkv, shape.bs),
        ),
        d => bail!("{OP}: device {:?} is not supported", d.location()),
    }
}

/// Row positions `0..len` of `table` as host f32 `[nkv, len, hd]` keys and values.
fn gather(pool: PagedKv<'_>, table: &[u32], len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let (k, v) = gather_history(pool.k, pool.v, table, len)?;
    Ok((host_f32(&k)?, host_f32(&v)?))
}

pub use super::kernel_tolerance as tolerance;

/// Positions per block in [`check_against_reference`] (the engine's block size).
const CHECK_BLOCK: usize = 16;

/// Runs [`paged_append_kv_rows`] then [`paged_decode_attention`] on `device` in `dtype` on seeded
/// random inputs (the shapes of `decode_attention`'s check: the 64-row GQA decode batch, small
/// and odd head dims, MHA, wide groups, one 8,192-position row), with shuffled block tables,
/// rows 0 and 1 sharing their first blocks, and compares with the contiguous reference on the
/// same (dtype-rounded) values. Unlisted blocks and every slot past a row's length hold NaN, so
/// a read outside the tables shows. Returns the largest `|got − ref|` relative to the largest
/// `|ref|` (compare with [`tolerance`]); errors on a non-finite output or an append that did not
/// write exactly its slot.
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
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bs = CHECK_BLOCK;
    let round = |x: f32| match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    };
    // Lengths as in decode_attention's check; row 1 (when there is one) shares row 0's first
    // blocks: row 0 is then at least two blocks long and appends in its last one.
    let mut len: Vec<usize> = (0..b).map(|_| rng.random_range(1..=max_len)).collect();
    len[b - 1] = 1;
    len[1 % b] = max_len;
    if b > 1 {
        len[0] = 2 * bs + rng.random_range(1..=bs);
    }
    let shared = if b > 1 { 2 } else { 0 };
    // Block ids: shuffled, a few spare (never listed) between them.
    let own: Vec<usize> = (0..b)
        .map(|r| len[r].div_ceil(bs) + usize::from(r % 3 == 1) - if r == 1 { shared } else { 0 })
        .collect();
    let blocks = own.iter().sum::<usize>() + 5;
    let mut ids: Vec<u32> = (0..blocks as u32).collect();
    ids.shuffle(&mut rng);
    let mut next = ids.into_iter();
    let mut tables: Vec<Vec<u32>> = Vec::with_capacity(b);
    for (r, &n) in own.iter().enumerate() {
        let mut t: Vec<u32> = if r == 1 {
            tables[0][..shared].to_vec()
        } else {
            Vec::new()
        };
        t.extend(next.by_ref().take(n));
        tables.push(t);
    }
    let block_elems = nkv * bs * hd;
    let mut uniform = |n: usize, a: f32| -> Vec<f32> {
        let x = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * a);
        x.map(round).collect()
    };
    // Host pools: NaN everywhere, then each row's positions before its append filled.
    let mut host = [
        vec![f32::NAN; blocks * block_elems],
        vec![f32::NAN; blocks * block_elems],
    ];
    let slot =
        |table: &[u32], t: usize, g: usize| ((table[t / bs] as usize * nkv + g) * bs + t % bs) * hd;
    for (table, &l) in tables.iter().zip(&len) {
        for pool in host.iter_mut() {
            let vals = uniform(nkv * (l - 1) * hd, 1.0);
            for t in 0..l - 1 {
                for g in 0..nkv {
                    let at = slot(table, t, g);
                    if pool[at].is_nan() {
                        pool[at..at + hd].copy_from_slice(&vals[(g * (l - 1) + t) * hd..][..hd]);
                    }
                }
            }
        }
    }
    let mut q = uniform(b * nh * hd, 3.0);
    for x in q.iter_mut().skip(2 * nh * hd).take(nh * hd) {
        *x = round(*x * 40.0);
    }
    let (k_new, v_new) = (uniform(b * nkv * hd, 1.0), uniform(b * nkv * hd, 1.0));
    let on_device = |data: &[f32], dims: &[usize]| -> Result<Tensor> {
        let cpu = Tensor::from_slice(data, dims, &Device::Cpu)?;
        cpu.to_dtype(dtype)?.to_device(device)
    };
    let dims4 = [blocks, nkv, bs, hd];
    let (k_pool, v_pool) = (on_device(&host[0], &dims4)?, on_device(&host[1], &dims4)?);
    let pool = PagedKv {
        k: &k_pool,
        v: &v_pool,
    };
    let refs: Vec<&[u32]> = tables.iter().map(|t| &t[..]).collect();
    let pos: Vec<usize> = len.iter().map(|l| l - 1).collect();
    let dims3 = [b, nkv, hd];
    paged_append_kv_rows(
        &on_device(&k_new, &dims3)?,
        &on_device(&v_new, &dims3)?,
        pool,
        &refs,
        &pos,
    )?;
    for (pool, new) in host.iter_mut().zip([&k_new, &v_new]) {
        for (row, (table, &p)) in tables.iter().zip(&pos).enumerate() {
            for g in 0..nkv {
                let at = slot(table, p, g);
                pool[at..at + hd].copy_from_slice(&new[(row * nkv + g) * hd..][..hd]);
            }
        }
    }
    // The whole pool, NaN slots included, is as the host's after the append.
    for (t, h) in [&k_pool, &v_pool].into_iter().zip(&host) {
        let same = |(a, b): (&f32, &f32)| a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan();
        if !host_f32(t)?.iter().zip(h).all(same) {
            bail!("paged_kv check: the pool after the append is not the expected one");
        }
    }
    let scale = 1.0 / (hd as f32).sqrt();
    drop(Tensor::full(f32::NAN, (b, nh * hd), device)?.to_dtype(dtype)?);
    let got = paged_decode_attention(&on_device(&q, &[b, nh, hd])?, pool, &refs, &len, scale)?;
    let got = host_f32(&got)?;
    // The reference on each row's history gathered on the host.
    let hist: Vec<[Vec<f32>; 2]> = (tables.iter().zip(&len))
        .map(|(table, &l)| {
            [&host[0], &host[1]].map(|p| {
                let mut out = Vec::with_capacity(nkv * l * hd);
                for g in 0..nkv {
                    for t in 0..l {
                        out.extend_from_slice(&p[slot(table, t, g)..][..hd]);
                    }
                }
                out
            })
        })
        .collect();
    let kv: Vec<_> = (hist.iter().zip(&len))
        .map(|([k, v], &l)| (&k[..], &v[..], l))
        .collect();
    let want = decode_attention_reference(&q, b, nh, nkv, hd, &kv, &len, scale);
    let max = want.iter().fold(1e-6f32, |m, w| m.max(w.abs()));
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if !g.is_finite() {
            let (row, col) = (i / (nh * hd), i % (nh * hd));
            bail!("paged_kv check: output [{row}, {col}] is {g} (reference {w})");
        }
        worst = worst.max((g - w).abs() / max);
    }
    Ok(worst)
}

#[cfg(test)]
#[path = "paged_kv_tests.rs"]
mod tests;
