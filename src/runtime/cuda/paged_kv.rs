//! CUDA launch code of [`crate::runtime::paged_kv`]: the paged kernels of
//! `kernels/decode_attention.cu` (the attention body is the per-buffer kernel's, reading K/V
//! rows through the block tables). The rows' metadata (slots for the append; table starts,
//! lengths and the concatenated tables for the attention) is the same for every layer of a
//! decode step: it is uploaded by the first layer and reused by the others
//! (`runtime::upload_cache`). Then one launch for the append, one for the attention plus one to
//! merge splits (the same [`Plan`]).
//!
//! The inputs were validated by the device-generic module (shapes, dtypes, devices, ids inside
//! the pool, tables covering the lengths and positions, distinct written slots, no aliasing);
//! this module re-checks what the kernels' memory safety rests on (storages on this device,
//! element counts) before launching.

use super::decode_attention::{
    alloc_outputs, combine_splits, cuda_device, lock_distinct, to_i32, to_u32, view, Plan, MODULE,
    PTX, THREADS,
};
use crate::runtime::upload_cache::LastUpload;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Result, Storage, Tensor};
use std::sync::Arc;

/// The last upload of a decode step's slots and of its tables and lengths (the same for every
/// layer of the step).
static SLOTS: LastUpload<DeviceId, Arc<CudaSlice<u32>>> = LastUpload::new();
static TABLES: LastUpload<DeviceId, Arc<CudaSlice<u32>>> = LastUpload::new();

/// The CUDA side of `paged_append_kv_rows`: `k_new`, `v_new` contiguous `[B, nkv, hd]`; row b
/// writes pool slot `slots[b]` (block · bs + offset), distinct and inside the pools.
pub(crate) fn paged_append_kv_rows(
    k_new: &Tensor,
    v_new: &Tensor,
    pools: (&Tensor, &Tensor),
    slots: &[u32],
    dims: (usize, usize, usize),
) -> Result<()> {
    match k_new.dtype() {
        DType::F32 => append::<f32>(k_new, v_new, pools, slots, dims, "f32"),
        DType::BF16 => append::<half::bf16>(k_new, v_new, pools, slots, dims, "bf16"),
        DType::F16 => append::<half::f16>(k_new, v_new, pools, slots, dims, "f16"),
        d => bail!("paged_append_kv_rows: dtype {d:?} is not supported"),
    }
}

fn append<T: CudaDType + DeviceRepr>(
    k_new: &Tensor,
    v_new: &Tensor,
    (k_pool, v_pool): (&Tensor, &Tensor),
    slots: &[u32],
    (nkv, bs, hd): (usize, usize, usize),
    suffix: &str,
) -> Result<()> {
    let dev = cuda_device(k_new)?;
    let b = slots.len();
    if b > 65535 || nkv > 65535 {
        bail!("paged_append_kv_rows: {b} rows of {nkv} KV heads are too many for one launch");
    }
    let pool_elems = k_pool.elem_count();
    if pool_elems != v_pool.elem_count() || !pool_elems.is_multiple_of(nkv * bs * hd) {
        bail!("paged_append_kv_rows: the pools are not [blocks, {nkv}, {bs}, {hd}]");
    }
    let slots_in_pool = pool_elems / (nkv * hd);
    if let Some(&s) = slots.iter().find(|&&s| s as usize >= slots_in_pool) {
        bail!("paged_append_kv_rows: slot {s} is outside the pool of {slots_in_pool}");
    }
    let ts = [k_new, v_new, k_pool, v_pool];
    // One read guard per storage, held until the launch is queued.
    let (guards, idx) = lock_distinct(&ts);
    let kn = view::<T>(&guards[idx[0]], k_new, &dev, b * nkv * hd, "k_new")?;
    let vn = view::<T>(&guards[idx[1]], v_new, &dev, b * nkv * hd, "v_new")?;
    let kp = view::<T>(&guards[idx[2]], k_pool, &dev, pool_elems, "the K pool")?;
    let vp = view::<T>(&guards[idx[3]], v_pool, &dev, pool_elems, "the V pool")?;
    // The same slots for every layer of a decode step: uploaded once per step.
    let meta_buf = SLOTS.get(dev.id(), slots, |m| dev.clone_htod(m).map(Arc::new))?;
    let meta: &CudaSlice<u32> = &meta_buf;
    let (nkv_i, bs_i, hd_i) = (to_i32(nkv, "nkv")?, to_i32(bs, "bs")?, to_i32(hd, "hd")?);

    let func =
        dev.get_or_load_custom_func(&format!("paged_append_kv_rows_{suffix}"), MODULE, PTX)?;
    let mut builder = func.builder();
    builder.arg(&kn).arg(&vn).arg(&kp).arg(&vp).arg(meta);
    builder.arg(&nkv_i).arg(&bs_i).arg(&hd_i);
    let cfg = LaunchConfig {
        grid_dim: (b as u32, nkv as u32, 1),
        block_dim: (hd.div_ceil(32).min(8) as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `paged_append_kv_rows_*` in decode_attention.cu. The pools
    // are live, contiguous [blocks, nkv, bs, hd] CUDA buffers of this device (checked above);
    // every slot is inside them (checked above) and no two rows write the same slot (checked by
    // the caller), so the kernel's writes are in bounds and do not race each other; the new
    // rows do not share memory with the pools (checked by the caller). The writes go through a
    // view taken under a read guard: the pools belong to the caller, which holds no other
    // reference that reads or writes them while this call runs, and every launch on them is
    // ordered on the device's one stream. The guards stay held until the launch is queued.
    unsafe { builder.launch(cfg) }.w()?;
    drop(guards);
    Ok(())
}

/// The CUDA side of `paged_decode_attention`: `q` contiguous `[B, nh, hd]`, validated tables
/// and lengths (`len[b]` ≥ 1, covered by its table, ids inside the pools).
pub(crate) fn paged_decode_attention(
    q: &Tensor,
    pools: (&Tensor, &Tensor),
    tables: &[&[u32]],
    len: &[usize],
    scale: f32,
    (nkv, bs): (usize, usize),
) -> Result<Tensor> {
    let dev = cuda_device(q)?;
    let (b, nh, hd) = q.dims3()?;
    let args = (pools, tables, len, scale, (nkv, bs), &dev);
    let storage = match q.dtype() {
        DType::F32 => attend::<f32>(q, args, "f32")?,
        DType::BF16 => attend::<half::bf16>(q, args, "bf16")?,
        DType::F16 => attend::<half::f16>(q, args, "f16")?,
        d => bail!("paged_decode_attention: dtype {d:?} is not supported"),
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        (b, nh * hd),
        BackpropOp::none(),
        false,
    ))
}

type AttendArgs<'a> = (
    (&'a Tensor, &'a Tensor),
    &'a [&'a [u32]],
    &'a [usize],
    f32,
    (usize, usize),
    &'a CudaDevice,
);

fn attend<T: CudaDType + DeviceRepr>(
    q: &Tensor,
    ((k_pool, v_pool), tables, len, scale, (nkv, bs), dev): AttendArgs<'_>,
    suffix: &str,
) -> Result<CudaStorage> {
    let stream = dev.cuda_stream();
    let (b, nh, hd) = q.dims3()?;
    if nkv == 0 || !nh.is_multiple_of(nkv) || hd == 0 || hd > 2 * THREADS || bs == 0 {
        bail!(
            "paged_decode_attention: {nh} query heads, {nkv} KV heads of dim {hd} in blocks \
             of {bs} are not supported"
        );
    }
    let pool_elems = k_pool.elem_count();
    let block_elems = nkv * bs * hd;
    if pool_elems != v_pool.elem_count() || !pool_elems.is_multiple_of(block_elems) {
        bail!("paged_decode_attention: the pools are not [blocks, {nkv}, {bs}, {hd}]");
    }
    let blocks = pool_elems / block_elems;
    // Metadata in one upload: table starts (B), lengths (B), then every table; a start is the
    // table's offset from the upload's beginning, which the kernel gets as `tables`.
    let mut meta = Vec::with_capacity(2 * b + tables.iter().map(|t| t.len()).sum::<usize>());
    let mut start = 2 * b;
    for t in tables {
        meta.push(to_u32(start, "table start")?);
        start += t.len();
    }
    for (row, (&l, t)) in len.iter().zip(tables).enumerate() {
        if l == 0 || l > t.len() * bs {
            bail!("paged_decode_attention: row {row}: length {l} outside its blocks");
        }
        meta.push(to_u32(l, "length")?);
    }
    for t in tables {
        if let Some(&id) = t.iter().find(|&&id| id as usize >= blocks) {
            bail!("paged_decode_attention: block {id} is outside the pool of {blocks}");
        }
        meta.extend_from_slice(t);
    }
    let sms = super::sm_count(&stream);
    let group = nh / nkv;
    let plan = Plan::new(nkv, group, hd, len, sms);
    if b > 65535 || nkv * plan.head_chunks > 65535 {
        bail!(
            "paged_decode_attention: {b} rows of {nkv} x {group} heads are too many for one \
             launch"
        );
    }
    let ts = [q, k_pool, v_pool];
    // One read guard per storage, held until the launches are queued.
    let (guards, idx) = lock_distinct(&ts);
    let qv = view::<T>(&guards[idx[0]], q, dev, b * nh * hd, "q")?;
    let kp = view::<T>(&guards[idx[1]], k_pool, dev, pool_elems, "the K pool")?;
    let vp = view::<T>(&guards[idx[2]], v_pool, dev, pool_elems, "the V pool")?;
    // The same tables and lengths for every layer of a decode step: uploaded once per step.
    let meta = TABLES.get(dev.id(), &meta, |m| dev.clone_htod(m).map(Arc::new))?;
    let (meta_ptr, meta_guard) = meta.device_ptr(&stream);
    let (starts_arg, lens_arg) = (meta_ptr, meta_ptr + 4 * b as u64);
    let tables_arg = meta_ptr;

    // The kernel's int arguments, in order: nh, nkv, hd, group, head_chunks, chunk, nsplit,
    // tile, stride, bs.
    let ints = [
        ("nh", nh),
        ("nkv", nkv),
        ("hd", hd),
        ("group", group),
        ("head chunks", plan.head_chunks),
        ("chunk", plan.chunk),
        ("splits", plan.nsplit),
        ("tile", plan.tile),
        ("stride", plan.stride),
        ("block size", bs),
    ]
    .map(|(what, v)| to_i32(v, what));
    let ints = ints.into_iter().collect::<Result<Vec<i32>>>()?;
    let (mut out, mut part) = alloc_outputs::<T>(dev, b * nh, hd, plan.nsplit)?;
    let null = 0u64;
    {
        let func =
            dev.get_or_load_custom_func(&format!("paged_decode_attention_{suffix}"), MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(&qv).arg(&mut out);
        match part.as_mut() {
            Some((acc, ml)) => builder.arg(acc).arg(ml),
            None => builder.arg(&null).arg(&null),
        };
        builder.arg(&kp).arg(&vp);
        builder.arg(&starts_arg).arg(&tables_arg).arg(&lens_arg);
        for i in &ints {
            builder.arg(i);
        }
        builder.arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (
                plan.nsplit as u32,
                (nkv * plan.head_chunks) as u32,
                b as u32,
            ),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: plan.smem_bytes as u32,
        };
        // SAFETY: the arguments match `paged_decode_attention_*` in decode_attention.cu; the
        // pools are live, contiguous CUDA buffers of `blocks` whole blocks of this device, read
        // only at blocks their tables list (every id < blocks, checked above) and positions
        // below each row's length (covered by its table, checked above); the metadata holds B
        // starts, B lengths and every table; q and out hold B · nh · hd elements; the partials
        // hold nh · B · nsplit slots; the shared memory size is the kernel's layout (under
        // 48 KiB: hd <= 256).
        unsafe { builder.launch(cfg) }.w()?;
    }
    combine_splits(
        dev,
        part.as_ref(),
        &mut out,
        (b, nh, hd, plan.nsplit),
        suffix,
    )?;
    drop(meta_guard);
    drop(guards);
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
