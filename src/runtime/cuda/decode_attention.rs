//! CUDA launch code of [`crate::runtime::decode_attention`]: uploads each row's K/V buffer
//! addresses with its capacity and length (or position) in one copy and runs the kernels of
//! `kernels/decode_attention.cu` — one launch for the append; one for the attention, plus one
//! to merge the splits when the positions are split over several blocks (see [`Plan`]).
//!
//! The inputs were validated by the device-generic module (shapes, dtypes, devices, lengths,
//! positions, contiguity, no aliasing of written buffers); this module re-checks what the
//! kernels' memory safety rests on (storages on this device, element counts) before launching.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Result, Storage, StorageRef, Tensor};

/// Threads per attention block (`DA_THREADS`).
pub(super) const THREADS: usize = 128;
/// Query heads one attention block serves (`DA_GMAX`).
pub const GMAX: usize = 8;
/// Floats of the PV run reduction (`DA_RED`).
const RED_FLOATS: usize = (THREADS / 32 - 1) * GMAX * 32;
/// The fewest positions a split gets (when it is not the whole row).
const MIN_CHUNK: usize = 256;
/// The most splits of a row.
const MAX_SPLITS: usize = 64;

pub(super) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));
pub(super) const MODULE: &str = "loraplex_decode_attention";

/// How one attention launch covers the rows: grid `(nsplit, nkv · head_chunks, B)`, a block
/// serving `GMAX` query heads of a KV head over `chunk` positions in tiles of `tile`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub tile: usize,
    /// The k_s / q_s row stride in floats (see the kernel).
    pub stride: usize,
    pub head_chunks: usize,
    pub chunk: usize,
    pub nsplit: usize,
    pub smem_bytes: usize,
}

impl Plan {
    /// Splits rows over blocks so that the work, `Σ len · nkv · head_chunks` positions, spreads
    /// over about four blocks per SM, with splits of at least `MIN_CHUNK` positions (the
    /// longest row's splits; shorter rows leave their last splits empty).
    pub fn new(nkv: usize, group: usize, hd: usize, len: &[usize], sms: usize) -> Self {
        let tile = if hd <= 128 { 64 } else { 32 };
        let hd4 = hd.div_ceil(4) * 4;
        // hd4 / 4 odd: consecutive rows start 4 banks apart (see the kernel).
        let stride = hd4 + 4 * usize::from((hd4 / 4).is_multiple_of(2));
        let head_chunks = group.div_ceil(GMAX);
        let max_len = len.iter().copied().max().unwrap_or(1).max(1);
        let work: usize = len.iter().sum::<usize>() * nkv * head_chunks;
        let want = work.div_ceil(4 * sms.max(1)).max(MIN_CHUNK);
        let chunk = want.max(max_len.div_ceil(MAX_SPLITS)).min(max_len);
        let chunk = chunk.div_ceil(tile) * tile;
        let floats = (tile * stride).max(RED_FLOATS) + GMAX * stride + GMAX * tile + 3 * GMAX;
        Plan {
            tile,
            stride,
            head_chunks,
            chunk,
            nsplit: max_len.div_ceil(chunk),
            smem_bytes: 4 * floats,
        }
    }
}

/// Read guards on the storages of `ts`, one per distinct storage (a second `read` of a lock the
/// thread holds could deadlock behind a waiting writer), and for each tensor its guard's index.
pub(super) fn lock_distinct<'a>(ts: &[&'a Tensor]) -> (Vec<StorageRef<'a>>, Vec<usize>) {
    let mut guards = Vec::new();
    let mut seen = std::collections::HashMap::new();
    let mut index = Vec::with_capacity(ts.len());
    for t in ts {
        // The storage's address identifies it: the guard taken here is dropped at once.
        let key = &*t.storage_and_layout().0 as *const Storage as usize;
        let i = *seen.entry(key).or_insert_with(|| {
            guards.push(t.storage_and_layout().0);
            guards.len() - 1
        });
        index.push(i);
    }
    (guards, index)
}

pub(super) fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::msg(format!("decode_attention: {what} {v} too large")))
}

pub(super) fn to_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| candle_core::Error::msg(format!("decode_attention: {what} {v} too large")))
}

/// The contiguous view of `t`'s CUDA storage (`storage`, locked by the caller), checked to be
/// on `dev` and to hold `len` elements of `T`.
pub(super) fn view<'a, T: CudaDType>(
    storage: &'a Storage,
    t: &Tensor,
    dev: &CudaDevice,
    len: usize,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(cs) = storage else {
        bail!("decode_attention: {what} is not on CUDA");
    };
    if cs.device().id() != dev.id() {
        bail!("decode_attention: {what} is on another CUDA device");
    }
    let Some((lo, hi)) = t.layout().contiguous_offsets() else {
        bail!("decode_attention: {what} is not contiguous");
    };
    if hi - lo != len {
        bail!(
            "decode_attention: {what} has {} elements, expected {len}",
            hi - lo
        );
    }
    Ok(cs.as_cuda_slice::<T>()?.slice(lo..hi))
}

/// One upload of the rows' metadata: k and v buffer addresses (u64 as u32 pairs), then the u32
/// `caps` and `per_row` (positions or lengths). Returns the slice and the byte offsets of the
/// four arrays.
fn upload_meta(
    dev: &CudaDevice,
    k_ptrs: &[u64],
    v_ptrs: &[u64],
    caps: &[usize],
    per_row: &[usize],
) -> Result<(CudaSlice<u32>, [u64; 4])> {
    let b = k_ptrs.len() as u64;
    let mut meta = Vec::with_capacity(6 * k_ptrs.len());
    for p in k_ptrs.iter().chain(v_ptrs) {
        meta.extend([*p as u32, (*p >> 32) as u32]);
    }
    for &c in caps.iter().chain(per_row) {
        meta.push(to_u32(c, "capacity or position")?);
    }
    Ok((dev.clone_htod(&meta)?, [0, 8 * b, 16 * b, 20 * b]))
}

pub(super) fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev.clone()),
        d => bail!(
            "decode_attention: expected a CUDA tensor, got {:?}",
            d.location()
        ),
    }
}

/// The CUDA side of `append_kv_rows`: `k_new`, `v_new` contiguous `[B, nkv, hd]`, validated
/// buffers and positions.
pub(crate) fn append_kv_rows(
    k_new: &Tensor,
    v_new: &Tensor,
    bufs: &[(&Tensor, &Tensor)],
    pos: &[usize],
    caps: &[usize],
) -> Result<()> {
    match k_new.dtype() {
        DType::F32 => append::<f32>(k_new, v_new, bufs, pos, caps, "f32"),
        DType::BF16 => append::<half::bf16>(k_new, v_new, bufs, pos, caps, "bf16"),
        DType::F16 => append::<half::f16>(k_new, v_new, bufs, pos, caps, "f16"),
        d => bail!("append_kv_rows: dtype {d:?} is not supported"),
    }
}

fn append<T: CudaDType + DeviceRepr>(
    k_new: &Tensor,
    v_new: &Tensor,
    bufs: &[(&Tensor, &Tensor)],
    pos: &[usize],
    caps: &[usize],
    suffix: &str,
) -> Result<()> {
    let dev = cuda_device(k_new)?;
    let stream = dev.cuda_stream();
    let (b, nkv, hd) = k_new.dims3()?;
    if b > 65535 || nkv > 65535 {
        bail!("append_kv_rows: {b} rows of {nkv} KV heads are too many for one launch");
    }
    let mut ts = vec![k_new, v_new];
    ts.extend(bufs.iter().flat_map(|&(k, v)| [k, v]));
    // One read guard per storage, held until the launch is queued.
    let (guards, idx) = lock_distinct(&ts);
    let kn = view::<T>(&guards[idx[0]], k_new, &dev, b * nkv * hd, "k_new")?;
    let vn = view::<T>(&guards[idx[1]], v_new, &dev, b * nkv * hd, "v_new")?;
    let mut views = Vec::with_capacity(2 * b);
    for (i, t) in ts.iter().enumerate().skip(2) {
        let (row, cap) = ((i - 2) / 2, caps[(i - 2) / 2]);
        if pos[row] >= cap {
            bail!(
                "append_kv_rows: row {row}: position {} of capacity {cap}",
                pos[row]
            );
        }
        views.push(view::<T>(
            &guards[idx[i]],
            t,
            &dev,
            nkv * cap * hd,
            "a KV buffer",
        )?);
    }
    let ptrs: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
    let k_ptrs: Vec<u64> = ptrs.iter().step_by(2).map(|p| p.0).collect();
    let v_ptrs: Vec<u64> = ptrs.iter().skip(1).step_by(2).map(|p| p.0).collect();
    let (meta, off) = upload_meta(&dev, &k_ptrs, &v_ptrs, caps, pos)?;
    let (meta_ptr, meta_guard) = meta.device_ptr(&stream);
    let [k_arg, v_arg, caps_arg, pos_arg] = off.map(|o| meta_ptr + o);
    let (nkv_i, hd_i) = (to_i32(nkv, "nkv")?, to_i32(hd, "hd")?);

    let func = dev.get_or_load_custom_func(&format!("append_kv_rows_{suffix}"), MODULE, PTX)?;
    let mut builder = func.builder();
    builder.arg(&kn).arg(&vn).arg(&k_arg).arg(&v_arg);
    builder.arg(&caps_arg).arg(&pos_arg).arg(&nkv_i).arg(&hd_i);
    let cfg = LaunchConfig {
        grid_dim: (b as u32, nkv as u32, 1),
        block_dim: (hd.div_ceil(32).min(8) as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `append_kv_rows_*` in decode_attention.cu. Every buffer
    // address is that of a live, contiguous [nkv, cap, hd] CUDA buffer of this device (checked
    // above), the kernel writes only slot pos < cap of each, and the written buffers overlap
    // neither each other nor k_new / v_new (checked by the caller). The writes go through
    // addresses taken under read guards: the buffers belong to the caller's caches, which
    // hold no other reference that reads or writes them while this call runs (one thread), and
    // every launch on them is ordered on the device's one stream, so the kernel neither races
    // a reader nor a writer. The guards stay held until the launch is queued.
    unsafe { builder.launch(cfg) }.w()?;
    drop(meta_guard);
    drop(ptrs);
    Ok(())
}

/// The CUDA side of `decode_attention`: `q` contiguous `[B, nh, hd]`, validated buffers and
/// lengths (`len[b]` in `1..=caps[b]`), `nkv` KV heads.
pub(crate) fn decode_attention(
    q: &Tensor,
    bufs: &[(&Tensor, &Tensor)],
    len: &[usize],
    caps: &[usize],
    scale: f32,
    nkv: usize,
) -> Result<Tensor> {
    let dev = cuda_device(q)?;
    let (b, nh, hd) = q.dims3()?;
    let storage = match q.dtype() {
        DType::F32 => attend::<f32>(q, bufs, len, caps, scale, nkv, &dev, "f32")?,
        DType::BF16 => attend::<half::bf16>(q, bufs, len, caps, scale, nkv, &dev, "bf16")?,
        DType::F16 => attend::<half::f16>(q, bufs, len, caps, scale, nkv, &dev, "f16")?,
        d => bail!("decode_attention: dtype {d:?} is not supported"),
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        (b, nh * hd),
        BackpropOp::none(),
        false,
    ))
}

#[allow(clippy::too_many_arguments)]
fn attend<T: CudaDType + DeviceRepr>(
    q: &Tensor,
    bufs: &[(&Tensor, &Tensor)],
    len: &[usize],
    caps: &[usize],
    scale: f32,
    nkv: usize,
    dev: &CudaDevice,
    suffix: &str,
) -> Result<CudaStorage> {
    let stream = dev.cuda_stream();
    let (b, nh, hd) = q.dims3()?;
    if nkv == 0 || !nh.is_multiple_of(nkv) || hd == 0 || hd > 2 * THREADS {
        bail!("decode_attention: {nh} query heads, {nkv} KV heads of dim {hd} are not supported");
    }
    let sms = super::sm_count(&stream);
    let group = nh / nkv;
    let plan = Plan::new(nkv, group, hd, len, sms);
    if b > 65535 || nkv * plan.head_chunks > 65535 {
        bail!("decode_attention: {b} rows of {nkv} x {group} heads are too many for one launch");
    }

    let mut ts = vec![q];
    ts.extend(bufs.iter().flat_map(|&(k, v)| [k, v]));
    // One read guard per storage, held until the launches are queued.
    let (guards, idx) = lock_distinct(&ts);
    let qv = view::<T>(&guards[idx[0]], q, dev, b * nh * hd, "q")?;
    let mut views = Vec::with_capacity(2 * b);
    for (i, t) in ts.iter().enumerate().skip(1) {
        let (row, cap) = ((i - 1) / 2, caps[(i - 1) / 2]);
        if !(1..=cap).contains(&len[row]) {
            bail!(
                "decode_attention: row {row}: length {} of capacity {cap}",
                len[row]
            );
        }
        views.push(view::<T>(
            &guards[idx[i]],
            t,
            dev,
            nkv * cap * hd,
            "a KV buffer",
        )?);
    }
    let ptrs: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
    let k_ptrs: Vec<u64> = ptrs.iter().step_by(2).map(|p| p.0).collect();
    let v_ptrs: Vec<u64> = ptrs.iter().skip(1).step_by(2).map(|p| p.0).collect();
    let (meta, off) = upload_meta(dev, &k_ptrs, &v_ptrs, caps, len)?;
    let (meta_ptr, meta_guard) = meta.device_ptr(&stream);
    let [k_arg, v_arg, caps_arg, lens_arg] = off.map(|o| meta_ptr + o);

    // The kernel's int arguments, in order: nh, nkv, hd, group, head_chunks, chunk, nsplit,
    // tile, stride.
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
    ]
    .map(|(what, v)| to_i32(v, what));
    let ints = ints.into_iter().collect::<Result<Vec<i32>>>()?;
    let (mut out, mut part) = alloc_outputs::<T>(dev, b * nh, hd, plan.nsplit)?;
    let null = 0u64;
    {
        let func =
            dev.get_or_load_custom_func(&format!("decode_attention_{suffix}"), MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(&qv).arg(&mut out);
        match part.as_mut() {
            Some((acc, ml)) => builder.arg(acc).arg(ml),
            None => builder.arg(&null).arg(&null),
        };
        builder
            .arg(&k_arg)
            .arg(&v_arg)
            .arg(&caps_arg)
            .arg(&lens_arg);
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
        // SAFETY: the arguments match `decode_attention_*` in decode_attention.cu; every buffer
        // address is a live, contiguous [nkv, cap, hd] buffer of this device, read only at
        // positions below its length (<= cap); q and out hold B · nh · hd elements; the
        // partials hold nh · B · nsplit slots; the shared memory size is the kernel's layout
        // (under 48 KiB: hd <= 256).
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
    drop(ptrs);
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// One attention launch's output (`rows · hd` elements) and, with several splits, the f32
/// partials the combine kernel merges (accumulators, then (max, sum) pairs).
pub(super) type Outputs<T> = (CudaSlice<T>, Option<(CudaSlice<f32>, CudaSlice<f32>)>);

/// Allocates [`Outputs`] for `rows` query rows of `hd` dims over `nsplit` splits.
pub(super) fn alloc_outputs<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    rows: usize,
    hd: usize,
    nsplit: usize,
) -> Result<Outputs<T>> {
    // SAFETY: every element is written: with one split by the attention kernel (each block
    // writes its heads' rows), otherwise by the combine kernel (one block per row).
    let out = unsafe { dev.alloc::<T>(rows * hd)? };
    // SAFETY: every block writes its split's slot (empty splits too), and the combine kernel
    // reads only slots < nsplit of each row, queued after on the same stream.
    let part = match nsplit {
        1 => None,
        n => Some(unsafe {
            (
                dev.alloc::<f32>(rows * n * hd)?,
                dev.alloc::<f32>(rows * n * 2)?,
            )
        }),
    };
    Ok((out, part))
}

/// Merges the splits' partials into `out` (`[B · nh, hd]`) in one launch; nothing to do
/// without partials (one split).
pub(super) fn combine_splits<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    part: Option<&(CudaSlice<f32>, CudaSlice<f32>)>,
    out: &mut CudaSlice<T>,
    (b, nh, hd, nsplit): (usize, usize, usize, usize),
    suffix: &str,
) -> Result<()> {
    let Some((acc, ml)) = part else {
        return Ok(());
    };
    let (nh_i, hd_i) = (to_i32(nh, "nh")?, to_i32(hd, "hd")?);
    let nsplit_i = to_i32(nsplit, "splits")?;
    let func =
        dev.get_or_load_custom_func(&format!("decode_attention_combine_{suffix}"), MODULE, PTX)?;
    let mut builder = func.builder();
    builder.arg(acc).arg(ml).arg(out);
    builder.arg(&nh_i).arg(&hd_i).arg(&nsplit_i);
    let cfg = LaunchConfig {
        grid_dim: (nh as u32, b as u32, 1),
        block_dim: (hd.div_ceil(32) as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `decode_attention_combine_*`; the partials were written by
    // the attention kernel queued before on the same stream; out holds B · nh · hd elements.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_fits_the_kernel_layout_and_splits_only_small_batches() {
        // The decode batch: 64 rows, mean length ~750: two splits of 768.
        let len: Vec<usize> = (0..64).map(|i| 1 + i * 1500 / 63).collect();
        let p = Plan::new(8, 4, 128, &len, 132);
        assert_eq!((p.tile, p.stride, p.head_chunks), (64, 132, 1));
        assert_eq!((p.chunk, p.nsplit), (768, 2));
        assert!(p.smem_bytes <= 48 * 1024, "{}", p.smem_bytes);
        // One long row: split into MIN_CHUNK pieces.
        let p = Plan::new(8, 4, 128, &[8192], 132);
        assert_eq!((p.chunk, p.nsplit), (256, 32));
        // Short rows: one split covering the longest.
        let p = Plan::new(8, 4, 128, &[3, 40, 1], 132);
        assert_eq!((p.chunk, p.nsplit), (64, 1));
        // hd 256: tile 32, bank-spread stride, groups of 10 in two head chunks.
        let p = Plan::new(2, 10, 256, &[700; 3], 132);
        assert_eq!((p.tile, p.stride, p.head_chunks), (32, 260, 2));
        assert_eq!((p.chunk, p.nsplit), (256, 3));
        assert!(p.smem_bytes <= 48 * 1024, "{}", p.smem_bytes);
        // Small odd hd: the reduction space bounds k_s; very long rows stay within MAX_SPLITS.
        let p = Plan::new(1, 1, 5, &[1_000_000], 132);
        assert_eq!(p.stride, 12);
        assert!(p.nsplit <= MAX_SPLITS && p.chunk * p.nsplit >= 1_000_000);
        assert_eq!(
            p.smem_bytes,
            4 * (RED_FLOATS + GMAX * 12 + GMAX * 64 + 3 * GMAX)
        );
    }
}
