//! CUDA launch code of [`crate::runtime::lora_rows`]: plans the row tiles and shrink work items
//! on the host, uploads them with the sets' device pointers in one copy, and runs the `shrink`
//! and `expand` kernels of `kernels/lora_rows.cu` (one launch each, whatever the number of sets).
//!
//! Rows are grouped by set into tiles of up to [`TILE_ROWS`] rows, so that a block reads a set's
//! A / Bᵀ rows once for all the tile's rows. The shrink runs one block per (tile, group of
//! [`SHRINK_RANKS`] ranks the set has) — nothing for ranks it does not have — and, when that is
//! too few blocks for the GPU, splits `in` over `ksplit` blocks writing separate f32 partials
//! that the expand sums in a fixed order (deterministic, no atomics).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor, WithDType};

/// Rows without an adapter set (the same sentinel as `runtime::lora_rows::NO_SET`).
pub const NO_SET: u32 = u32::MAX;

/// One set as the launch sees it: `a: [rank, in]`, `bt: [rank, out]`.
pub struct SetRef<'a> {
    pub a: &'a Tensor,
    pub bt: &'a Tensor,
    pub rank: usize,
}

/// What the launch needs of the op, as plain data (so this module does not reach back into the
/// op's own module: the op calls down, nothing calls up).
pub struct LoraRowsLaunch<'a> {
    pub sets: Vec<SetRef<'a>>,
    pub row_set: &'a [u32],
    pub n: usize,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// Rows per tile (`LORA_TILE_ROWS` in the kernels).
pub const TILE_ROWS: usize = 8;
/// Ranks per shrink work item (`LORA_SHRINK_RANKS`).
pub const SHRINK_RANKS: usize = 4;
/// Threads per shrink block (`LORA_SHRINK_THREADS`).
const SHRINK_THREADS: usize = 128;
/// Warps per expand block (`LORA_EXPAND_WARPS`).
const EXPAND_WARPS: usize = 4;
/// The most blocks the shrink splits `in` over.
const MAX_KSPLIT: usize = 16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora_rows.ptx"));
const MODULE: &str = "loraplex_lora_rows";

/// The host side of one launch pair: tiles of rows sharing a set (rows without a set last, in
/// tiles of their own with `tile_set == NO_SET`) and the shrink work items.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The set of each tile, or `NO_SET`.
    pub tile_set: Vec<u32>,
    /// Rows in each tile, `1..=TILE_ROWS`.
    pub tile_nrows: Vec<u32>,
    /// `TILE_ROWS` row indices per tile; the first `tile_nrows[t]` are valid, the rest `NO_SET`.
    pub tile_rows: Vec<u32>,
    /// Shrink work items as (tile, first rank) pairs, flattened.
    pub work: Vec<u32>,
    /// The largest rank of a used set: the row stride of the t buffer (at least 1).
    pub r_stride: usize,
}

impl Plan {
    /// Tiles and work items for `row_set` over sets of the given `ranks` (validated indices).
    pub fn new(row_set: &[u32], ranks: &[usize]) -> Result<Self> {
        let mut by_set: Vec<Vec<u32>> = vec![Vec::new(); ranks.len()];
        let mut no_set = Vec::new();
        for (row, &s) in row_set.iter().enumerate() {
            let row = u32::try_from(row).map_err(|_| candle_core::Error::msg("too many rows"))?;
            match s {
                NO_SET => no_set.push(row),
                s => match by_set.get_mut(s as usize) {
                    Some(rows) => rows.push(row),
                    None => bail!("lora_rows: row {row} names set {s} of {}", ranks.len()),
                },
            }
        }
        let mut plan = Plan {
            tile_set: Vec::new(),
            tile_nrows: Vec::new(),
            tile_rows: Vec::new(),
            work: Vec::new(),
            r_stride: 1,
        };
        let groups = by_set
            .iter()
            .enumerate()
            .map(|(s, rows)| (s as u32, rows))
            .chain(std::iter::once((NO_SET, &no_set)));
        for (set, rows) in groups {
            for chunk in rows.chunks(TILE_ROWS) {
                let tile = plan.tile_set.len() as u32;
                plan.tile_set.push(set);
                plan.tile_nrows.push(chunk.len() as u32);
                plan.tile_rows.extend_from_slice(chunk);
                plan.tile_rows
                    .extend(std::iter::repeat_n(NO_SET, TILE_ROWS - chunk.len()));
                if set != NO_SET {
                    let rank = ranks[set as usize];
                    plan.r_stride = plan.r_stride.max(rank);
                    for r0 in (0..rank).step_by(SHRINK_RANKS) {
                        plan.work.extend([tile, r0 as u32]);
                    }
                }
            }
        }
        Ok(plan)
    }

    pub fn n_tiles(&self) -> usize {
        self.tile_set.len()
    }

    pub fn n_work(&self) -> usize {
        self.work.len() / 2
    }
}

/// How the shrink splits `in` (`n_vec` loads per row): `(ksplit, k_chunk)` with every split
/// non-empty, each thread at least one load per split, and about two blocks per SM in all.
pub fn shrink_split(n_work: usize, n_vec: usize, sms: usize) -> (usize, usize) {
    let max_split = (n_vec / SHRINK_THREADS).clamp(1, MAX_KSPLIT);
    let ksplit = (2 * sms).div_ceil(n_work.max(1)).clamp(1, max_split);
    let k_chunk = n_vec.div_ceil(ksplit);
    if k_chunk == 0 {
        return (1, 0);
    }
    (n_vec.div_ceil(k_chunk), k_chunk)
}

/// The op's CUDA forward: `x` [N, in] and `y` [N, out] contiguous storages of one dtype.
pub(crate) fn cuda_fwd(
    op: &LoraRowsLaunch<'_>,
    x: &CudaStorage,
    lx: &Layout,
    y: &CudaStorage,
    ly: &Layout,
) -> Result<(CudaStorage, Shape)> {
    if x.dtype() != y.dtype() {
        bail!("lora_rows: y is {:?}, x is {:?}", y.dtype(), x.dtype());
    }
    let dev = x.device().clone();
    let storage = match x.dtype() {
        DType::F32 => CudaStorage::wrap_cuda_slice(launch::<f32>(op, x, lx, y, ly, "f32")?, dev),
        DType::BF16 => {
            CudaStorage::wrap_cuda_slice(launch::<half::bf16>(op, x, lx, y, ly, "bf16")?, dev)
        }
        DType::F16 => {
            CudaStorage::wrap_cuda_slice(launch::<half::f16>(op, x, lx, y, ly, "f16")?, dev)
        }
        other => bail!("lora_rows: dtype {other:?} is not supported"),
    };
    Ok((storage, Shape::from_dims(&[op.n, op.out_dim])))
}

/// The contiguous view of a CUDA storage, checked to hold `len` elements of `T`.
fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    len: usize,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((lo, hi)) = l.contiguous_offsets() else {
        bail!("lora_rows: {what} is not contiguous");
    };
    if hi - lo != len {
        bail!("lora_rows: {what} has {} elements, expected {len}", hi - lo);
    }
    Ok(s.as_cuda_slice::<T>()?.slice(lo..hi))
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::msg(format!("lora_rows: {what} {v} too large")))
}

fn launch<T: CudaDType + DeviceRepr + WithDType>(
    op: &LoraRowsLaunch<'_>,
    x: &CudaStorage,
    lx: &Layout,
    y: &CudaStorage,
    ly: &Layout,
    suffix: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
    let (n, in_dim, out_dim) = (op.n, op.in_dim, op.out_dim);
    let dev = x.device();
    let stream = dev.cuda_stream();
    let xv = view::<T>(x, lx, n * in_dim, "x")?;
    let yv = view::<T>(y, ly, n * out_dim, "y")?;

    // The used sets' storages, then their device addresses; the guards stay alive until both
    // kernels are queued (they record the reads on the stream when dropped).
    let mut used = vec![false; op.sets.len()];
    for &s in op.row_set.iter().filter(|&&s| s != NO_SET) {
        match used.get_mut(s as usize) {
            Some(u) => *u = true,
            None => bail!("lora_rows: set index {s} out of range"),
        }
    }
    let storages = op
        .sets
        .iter()
        .zip(&used)
        .filter(|(_, &u)| u)
        .map(|(s, _)| {
            let (ga, la) = s.a.storage_and_layout();
            let (gb, lb) = s.bt.storage_and_layout();
            (ga, la.clone(), gb, lb.clone(), s.rank)
        })
        .collect::<Vec<_>>();
    let mut views = Vec::with_capacity(2 * storages.len());
    for (i, (ga, la, gb, lb, rank)) in storages.iter().enumerate() {
        for (g, l, len, what) in [(ga, la, rank * in_dim, "a"), (gb, lb, rank * out_dim, "bt")] {
            let Storage::Cuda(cs) = &**g else {
                bail!("lora_rows: a set's {what} is not on CUDA (used set {i})");
            };
            if cs.device().id() != dev.id() {
                bail!("lora_rows: a set's {what} is on another CUDA device (used set {i})");
            }
            views.push(view::<T>(cs, l, len, what)?);
        }
    }
    let set_ptrs: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
    let mut a_ptrs = vec![0u64; op.sets.len()];
    let mut bt_ptrs = vec![0u64; op.sets.len()];
    let used_idx: Vec<usize> = (0..op.sets.len()).filter(|&s| used[s]).collect();
    for (k, &s) in used_idx.iter().enumerate() {
        a_ptrs[s] = set_ptrs[2 * k].0;
        bt_ptrs[s] = set_ptrs[2 * k + 1].0;
    }

    let ranks: Vec<usize> = op.sets.iter().map(|s| s.rank).collect();
    let plan = Plan::new(op.row_set, &ranks)?;
    // SAFETY: the expand writes every element: every row is in a tile and the chunks cover out.
    let mut out = unsafe { dev.alloc::<T>(n * out_dim)? };
    let vec_len = 16 / std::mem::size_of::<T>();
    let aligned = |p: u64| p.is_multiple_of(16);
    let vectorised = in_dim.is_multiple_of(vec_len)
        && out_dim.is_multiple_of(vec_len)
        && aligned(xv.device_ptr(&stream).0)
        && aligned(yv.device_ptr(&stream).0)
        && aligned(out.device_ptr(&stream).0)
        && set_ptrs.iter().all(|(p, _)| aligned(*p));
    let vec_len = if vectorised { vec_len } else { 1 };
    let variant = if vectorised { "" } else { "_scalar" };

    let sms = super::sm_count(&stream);
    let (ksplit, k_chunk) = shrink_split(plan.n_work(), in_dim / vec_len, sms);
    let out_chunks = out_dim.div_ceil(32 * vec_len);
    if out_chunks > 65535 {
        bail!("lora_rows: out {out_dim} is too large for one launch");
    }
    let (n_i, in_i, out_i) = (
        to_i32(n, "N")?,
        to_i32(in_dim, "in")?,
        to_i32(out_dim, "out")?,
    );
    let r_stride = to_i32(plan.r_stride, "rank")?;
    let (ksplit_i, k_chunk_i) = (to_i32(ksplit, "ksplit")?, to_i32(k_chunk, "k_chunk")?);
    let t_len = ksplit * n * plan.r_stride;
    to_i32(plan.n_work(), "work items")?;
    to_i32(plan.n_tiles(), "tiles")?;

    // One upload: [a_ptrs | bt_ptrs] as u32 pairs (8-byte aligned at the start), then the u32
    // arrays ranks, tile_set, tile_nrows, tile_rows, work.
    let mut meta: Vec<u32> = Vec::new();
    for p in a_ptrs.iter().chain(&bt_ptrs) {
        meta.extend([*p as u32, (*p >> 32) as u32]);
    }
    let mut offsets = Vec::new();
    for part in [
        ranks.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        plan.tile_set.clone(),
        plan.tile_nrows.clone(),
        plan.tile_rows.clone(),
        plan.work.clone(),
    ] {
        offsets.push(4 * meta.len() as u64);
        meta.extend(part);
    }
    let meta = dev.clone_htod(&meta)?;
    let (meta_ptr, meta_guard) = meta.device_ptr(&stream);
    let a_arg = meta_ptr;
    let bt_arg = meta_ptr + 8 * op.sets.len() as u64;
    let [ranks_arg, tile_set_arg, tile_nrows_arg, tile_rows_arg, work_arg] =
        [0, 1, 2, 3, 4].map(|i| meta_ptr + offsets[i]);

    // SAFETY: every element of t the expand reads (rows with a set, ranks below the set's rank,
    // all ksplit partials) is written by the shrink, queued before it on the same stream.
    let mut t = unsafe { dev.alloc::<f32>(t_len.max(1))? };

    if plan.n_work() > 0 {
        let func =
            dev.get_or_load_custom_func(&format!("lora_shrink_{suffix}{variant}"), MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xv).arg(&mut t);
        b.arg(&a_arg)
            .arg(&ranks_arg)
            .arg(&tile_set_arg)
            .arg(&tile_nrows_arg);
        b.arg(&tile_rows_arg).arg(&work_arg);
        b.arg(&n_i).arg(&in_i).arg(&r_stride).arg(&k_chunk_i);
        let cfg = LaunchConfig {
            grid_dim: (plan.n_work() as u32, ksplit as u32, 1),
            block_dim: (SHRINK_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches `lora_shrink_*` in lora_rows.cu; every pointer in
        // the metadata addresses a live, validated buffer of the sizes the kernel reads.
        unsafe { b.launch(cfg) }.w()?;
    }
    let func =
        dev.get_or_load_custom_func(&format!("lora_expand_{suffix}{variant}"), MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&yv).arg(&mut out).arg(&t);
    b.arg(&bt_arg)
        .arg(&ranks_arg)
        .arg(&tile_set_arg)
        .arg(&tile_nrows_arg);
    b.arg(&tile_rows_arg);
    b.arg(&n_i).arg(&out_i).arg(&r_stride).arg(&ksplit_i);
    let cfg = LaunchConfig {
        grid_dim: (plan.n_tiles() as u32, out_chunks as u32, 1),
        block_dim: (32 * EXPAND_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as for the shrink, with `lora_expand_*`.
    unsafe { b.launch(cfg) }.w()?;
    drop(meta_guard);
    drop(set_ptrs);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_groups_rows_by_set_and_lists_only_existing_ranks() -> Result<()> {
        // Set 0 rank 5 (two rank groups), set 1 rank 256 unused, set 2 rank 1; 10 rows of set 0.
        let mut row_set = vec![0u32; 10];
        row_set.extend([NO_SET, 2, NO_SET]);
        let plan = Plan::new(&row_set, &[5, 256, 1])?;
        assert_eq!(plan.tile_set, [0, 0, 2, NO_SET]);
        assert_eq!(plan.tile_nrows, [8, 2, 1, 2]);
        assert_eq!(&plan.tile_rows[..8], &[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            &plan.tile_rows[8..16],
            &[8, 9, NO_SET, NO_SET, NO_SET, NO_SET, NO_SET, NO_SET]
        );
        assert_eq!(plan.tile_rows[16], 11);
        assert_eq!(&plan.tile_rows[24..26], &[10, 12]);
        assert_eq!(plan.work, [0, 0, 0, 4, 1, 0, 1, 4, 2, 0]);
        assert_eq!(plan.r_stride, 5, "the unused rank-256 set does not widen t");
        assert!(Plan::new(&[3], &[4]).is_err());
        Ok(())
    }

    #[test]
    fn shrink_split_fills_the_gpu_without_empty_splits() {
        // Many work items: no split.
        assert_eq!(shrink_split(1000, 512, 132), (1, 512));
        // One row, rank 16, in 4096 bf16 (512 loads): at most 512 / 128 = 4 splits.
        assert_eq!(shrink_split(4, 512, 132), (4, 128));
        // in 14336 bf16 (1792 loads): 14 splits of 128 loads.
        assert_eq!(shrink_split(1, 1792, 132), (14, 128));
        // Longer rows: capped at MAX_KSPLIT, every split non-empty.
        let (ks, chunk) = shrink_split(1, 4000, 132);
        assert_eq!(ks, MAX_KSPLIT);
        assert!(ks * chunk >= 4000 && (ks - 1) * chunk < 4000);
        // Odd sizes: the last split is short but not empty.
        let (ks, chunk) = shrink_split(2, 509, 132);
        assert!(
            ks * chunk >= 509 && (ks - 1) * chunk < 509,
            "{ks} x {chunk}"
        );
        assert_eq!(shrink_split(3, 0, 132), (1, 0));
    }
}
