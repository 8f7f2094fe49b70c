//! The inference-only forward pass for a scheduler step's rows (decode rows and prompt chunks,
//! up to `MAX_ROWS` in one call).
//!
//! Same math as the candle-op path (`runtime::reference`), run on plain `f32` slices of the weights
//! (read in place, no copies) with the kernels of `model::kernels`: per layer, one parallel pass
//! over q/k/v, one over o, one over gate/up and one over down, each followed by one over the rows
//! with an adapter (`y += B (A x)`, each row streaming its own stack's `A` and `B^T` out of the
//! stack's flat buffer); RMS norm,
//! RoPE and attention over each sequence's KV cache on slices too. Only the KV cache writes go
//! through candle ops. Every row is computed the same way whatever batch it is in.
//!
//! Nothing here has a backward pass; `Kernels::Candle` keeps the candle-op path (training has its own differentiable forward).

use super::attend::{attend_head, attend_head_paged, History, PagedRuns};
use super::kernels::{self, JobWeight, LinearJob, LowRank};
use crate::lora::LoraPair;
use crate::model::{LinearWeight, Llama, Proj};
use crate::runtime::batch::{LogitsMode, RowGroups, SeqInput};
use candle_core::{DType, Device, Result, Storage, StorageRef, Tensor};
use rayon::prelude::*;

/// The most rows (new tokens over all sequences) a forward call may have to take this path: a
/// whole scheduler step (every decode row plus a prompt chunk) fits, so each weight is read
/// once per step. Longer calls (long prompts outside the server) go to candle's gemm and its
/// matmul attention, which scale better with the prompt length.
pub const MAX_ROWS: usize = 512;

/// Attention work (multiply-adds) from which sequences and heads are spread over threads.
const ATTN_PARALLEL_MIN_WORK: usize = 1 << 16;

/// Whether `t` can be read in place as a contiguous f32 CPU slice.
fn readable(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.is_contiguous() && matches!(t.device(), Device::Cpu)
}

/// Whether this call can take the fast path: few rows, f32 CPU tensors (linear weights may be
/// NF4-packed instead) and stacks.
pub fn eligible(model: &Llama, seqs: &[SeqInput<'_>], rows: usize) -> bool {
    if rows > MAX_ROWS || !matches!(model.device(), Device::Cpu) {
        return false;
    }
    let (cos, sin) = model.rope().tables();
    let model_ok = [&model.embed, &model.norm, &model.lm_head, cos, sin]
        .into_iter()
        .chain(model.blocks.iter().flat_map(|b| {
            [&b.attn_norm, &b.mlp_norm]
                .into_iter()
                .chain(b.proj.iter().flat_map(|p| {
                    let dense = match &p.weight {
                        LinearWeight::Dense(w) => Some(w),
                        LinearWeight::Nf4(_) | LinearWeight::Nf4Device(_) => None,
                    };
                    dense.into_iter().chain(&p.bias)
                }))
        }))
        .all(readable);
    // Weights packed in a device's memory take the device ops (`runtime::reference`).
    let lm_nf4 = model.lm_head_nf4.iter();
    let on_device = model
        .blocks
        .iter()
        .flat_map(|b| b.proj.iter())
        .chain(lm_nf4)
        .any(|p| matches!(p.weight, LinearWeight::Nf4Device(_)));
    let stacks_ok = seqs
        .iter()
        .filter_map(|s| s.lora.as_ref())
        .all(|st| st.flat().is_some_and(readable));
    model_ok && stacks_ok && !on_device
}

/// A read-locked f32 CPU tensor: its storage and where its elements start.
struct View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> View<'a> {
    /// Any f32 CPU tensor; `slice()` then covers everything from its first element to the end of
    /// its layout's span (strides are the caller's business).
    fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        if t.dtype() != DType::F32 {
            candle_core::bail!("fast path: expected f32, found {:?}", t.dtype());
        }
        let start = layout.start_offset();
        let span = match layout.contiguous_offsets() {
            Some((a, b)) => b - a,
            None => {
                // Furthest element reachable through the strides, plus one.
                1 + layout
                    .dims()
                    .iter()
                    .zip(layout.stride())
                    .map(|(&d, &s)| d.saturating_sub(1) * s)
                    .sum::<usize>()
            }
        };
        Ok(Self {
            guard,
            start,
            len: if t.elem_count() == 0 { 0 } else { span },
        })
    }

    fn slice(&self) -> Result<&[f32]> {
        match &*self.guard {
            Storage::Cpu(cpu) => {
                let all = cpu.as_slice::<f32>()?;
                match all.get(self.start..self.start + self.len) {
                    Some(s) => Ok(s),
                    None => candle_core::bail!("fast path: tensor layout exceeds its storage"),
                }
            }
            _ => candle_core::bail!("fast path: tensor is not on the CPU"),
        }
    }
}

/// `x / sqrt(mean(x²) + eps) * alpha` per row, as candle's `rms_norm` computes it.
fn rms_norm(x: &[f32], alpha: &[f32], eps: f32) -> Vec<f32> {
    let n = alpha.len();
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x.chunks(n).zip(out.chunks_mut(n)) {
        let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((d, s), a) in dst.iter_mut().zip(src).zip(alpha) {
            *d = *s / m * *a;
        }
    }
    out
}

/// Rotate-half RoPE of one token's heads (`[heads * hd]`) with that position's tables.
fn rope_row(v: &mut [f32], hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for head in v.chunks_mut(hd) {
        let (a, b) = head.split_at_mut(half);
        for (((x1, x2), c), s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
            let (u, w) = (*x1, *x2);
            *x1 = u * c - w * s;
            *x2 = u * s + w * c;
        }
    }
}

/// One linear call's inputs: the rows and which projections of which layer to apply.
struct Projector<'m> {
    model: &'m Llama,
    groups: &'m RowGroups,
    /// Each group's stack's flat buffer (`LoraStack::flat`), read-locked for the whole call.
    flats: Vec<View<'m>>,
}

impl Projector<'_> {
    /// `x: [m, k]` through each projection of `projs` (base + bias + each row's LoRA delta).
    fn run(&self, x: &[f32], m: usize, layer: usize, projs: &[Proj]) -> Result<Vec<Vec<f32>>> {
        let blk = &self.model.blocks[layer];
        let k = x.len() / m.max(1);
        let groups = &self.groups.list;
        let pairs: Vec<Vec<Option<&LoraPair>>> = projs
            .iter()
            .map(|&p| groups.iter().map(|(st, _)| st.pair(layer, p)).collect())
            .collect();
        // Read locks on everything this call reads.
        let w_views = projs
            .iter()
            .map(|p| match &blk.proj[p.index()].weight {
                LinearWeight::Dense(w) => View::new(w).map(Some),
                LinearWeight::Nf4(_) | LinearWeight::Nf4Device(_) => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let bias_views = projs
            .iter()
            .map(|p| blk.proj[p.index()].bias.as_ref().map(View::new).transpose())
            .collect::<Result<Vec<_>>>()?;
        // `A: [R, in]` and `B^T: [R, out]` of each (projection, group), from the group's flat
        // buffer (`eligible` checked every stack has one).
        let flats = self
            .flats
            .iter()
            .map(View::slice)
            .collect::<Result<Vec<_>>>()?;
        let ab = pairs
            .iter()
            .map(|row| {
                row.iter()
                    .zip(&flats)
                    .map(|(pr, flat)| {
                        let Some(pr) = pr else { return Ok(None) };
                        let spans = pr.flat.as_ref();
                        match spans
                            .and_then(|s| Some((flat.get(s.a.clone())?, flat.get(s.bt.clone())?)))
                        {
                            Some(ab) => Ok(Some(ab)),
                            None => candle_core::bail!(
                                "fast path: an adapter pair outside its stack's buffer"
                            ),
                        }
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        // The base projections with bias, and each row's `B A x`.
        let mut jobs = Vec::with_capacity(projs.len());
        for (pi, &p) in projs.iter().enumerate() {
            let w = match (&w_views[pi], &blk.proj[p.index()].weight) {
                (Some(v), _) => JobWeight::F32(v.slice()?),
                (None, LinearWeight::Nf4(packed)) => JobWeight::Nf4(packed),
                (None, LinearWeight::Dense(_) | LinearWeight::Nf4Device(_)) => {
                    candle_core::bail!("fast path: weight not read")
                }
            };
            let n = p.in_out(&self.model.cfg).1;
            let mut low_rank = Vec::new();
            if ab[pi].iter().any(Option::is_some) {
                low_rank = self
                    .groups
                    .of_row
                    .iter()
                    .map(|g| {
                        let (a, bt) = ab[pi][g.as_ref()?.0]?;
                        Some(LowRank { a, bt })
                    })
                    .collect();
            }
            jobs.push(LinearJob {
                x,
                m,
                k,
                w,
                n,
                bias: bias_views[pi].as_ref().map(View::slice).transpose()?,
                low_rank,
            });
        }
        kernels::linear_rows(&jobs)
    }
}

/// Attention of every sequence: RoPE on q/k, K/V appended to the caches, one output row per
/// input row (`[m, heads * hd]`).
fn attention(
    model: &Llama,
    seqs: &mut [SeqInput<'_>],
    layer: usize,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
) -> Result<Vec<f32>> {
    let cfg = &model.cfg;
    let (nh, nkv, hd) = cfg.heads();
    let group = cfg.gqa_group();
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let (cos_t, sin_t) = model.rope().tables();
    let (cos_v, sin_v) = (View::new(cos_t)?, View::new(sin_t)?);
    let (cos, sin) = (cos_v.slice()?, sin_v.slice()?);
    let half = hd / 2;
    // RoPE and cache writes, sequence by sequence; keep each sequence's full K/V history.
    let mut hist = Vec::with_capacity(seqs.len());
    let mut r0 = 0;
    for s in seqs.iter_mut() {
        let (len, off) = (s.tokens.len(), s.cache.len());
        let mut kh = vec![0f32; nkv * len * hd];
        let mut vh = vec![0f32; nkv * len * hd];
        for i in 0..len {
            let pos = off + i;
            let (c, sn) = (
                &cos[pos * half..(pos + 1) * half],
                &sin[pos * half..(pos + 1) * half],
            );
            rope_row(
                &mut q[(r0 + i) * nh * hd..(r0 + i + 1) * nh * hd],
                hd,
                c,
                sn,
            );
            let kr = &mut k[(r0 + i) * nkv * hd..(r0 + i + 1) * nkv * hd];
            rope_row(kr, hd, c, sn);
            let vr = &v[(r0 + i) * nkv * hd..(r0 + i + 1) * nkv * hd];
            for h in 0..nkv {
                let dst = (h * len + i) * hd;
                kh[dst..dst + hd].copy_from_slice(&kr[h * hd..(h + 1) * hd]);
                vh[dst..dst + hd].copy_from_slice(&vr[h * hd..(h + 1) * hd]);
            }
        }
        let kt = Tensor::from_vec(kh, (nkv, len, hd), model.device())?;
        let vt = Tensor::from_vec(vh, (nkv, len, hd), model.device())?;
        if let Some((pool, table)) = s.cache.paged_table() {
            // Paged: written into its blocks, read there in place below.
            let (pool, table) = (pool.clone(), table.to_vec());
            s.cache.write_paged(layer, &kt, &vt)?;
            let (kp, vp) = pool.layer(layer)?;
            hist.push(History::Paged {
                k: kp.clone(),
                v: vp.clone(),
                table,
                bs: pool.block_positions(),
                len: off + len,
            });
        } else {
            let (k, v) = s.cache.append(layer, &kt, &vt)?;
            hist.push(History::Buffers { k, v });
        }
        r0 += len;
    }
    // (sequence, query head) pairs, each attending over its KV head's history.
    let mut work = Vec::with_capacity(seqs.len() * nh);
    let mut r0 = 0;
    let mut total = 0;
    for (si, s) in seqs.iter().enumerate() {
        let len = s.tokens.len();
        let t = hist[si].len();
        for h in 0..nh {
            work.push((si, r0, len, s.cache.len(), h));
        }
        total += nh * len * t * hd;
        r0 += len;
    }
    let views = hist
        .iter()
        .map(|h| {
            let (kt, vt) = h.tensors();
            Ok((
                View::new(kt)?,
                View::new(vt)?,
                kt.layout().stride().to_vec(),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let q: &[f32] = q;
    let one = |&(si, r0, len, off, h): &(usize, usize, usize, usize, usize)| {
        let (kv, vv, stride) = &views[si];
        let (ks, vs) = (kv.slice()?, vv.slice()?);
        if stride.last() != Some(&1) {
            candle_core::bail!("fast path: unexpected KV cache layout {stride:?}");
        }
        let mut qh = Vec::with_capacity(len * hd);
        for i in 0..len {
            let row = (r0 + i) * nh * hd + h * hd;
            qh.extend_from_slice(&q[row..row + hd]);
        }
        match &hist[si] {
            History::Buffers { k, .. } => {
                let t = k.dims()[1];
                let base = (h / group) * stride[0];
                let span = (t.max(1) - 1) * stride[1] + hd;
                let (kk, vvs) = (&ks[base..base + span], &vs[base..base + span]);
                attend_head(&qh, kk, vvs, stride[1], t, off, hd, scale)
            }
            History::Paged { table, bs, len, .. } => {
                // Block b of KV head g: bs rows of hd at ((id · nkv + g) · bs) · hd.
                let runs: Vec<usize> = (table.iter())
                    .map(|&id| (id as usize * nkv + h / group) * bs * hd)
                    .collect();
                let blocks = PagedRuns {
                    k: ks,
                    v: vs,
                    runs: &runs,
                    bs: *bs,
                };
                attend_head_paged(&qh, &blocks, *len, off, hd, scale)
            }
        }
    };
    let outs: Vec<Vec<f32>> = if total >= ATTN_PARALLEL_MIN_WORK {
        work.par_iter().map(one).collect::<Result<_>>()?
    } else {
        work.iter().map(one).collect::<Result<_>>()?
    };
    let m = r0;
    let mut attn = vec![0f32; m * nh * hd];
    for (&(_, r0, len, _, h), o) in work.iter().zip(&outs) {
        for i in 0..len {
            let dst = (r0 + i) * nh * hd + h * hd;
            attn[dst..dst + hd].copy_from_slice(&o[i * hd..(i + 1) * hd]);
        }
    }
    Ok(attn)
}

/// The forward pass on slices. The caller has validated the tokens and checked `eligible`;
/// caches are committed only when every layer succeeded.
pub fn forward(
    model: &Llama,
    seqs: &mut [SeqInput<'_>],
    mode: LogitsMode,
    groups: &RowGroups,
) -> Result<Tensor> {
    if rayon::current_thread_index().is_some() {
        return forward_on_pool(model, seqs, mode, groups);
    }
    // Run the whole call on one of rayon's threads: its many parallel passes then start from
    // inside the pool instead of each blocking the calling thread and waking it afterwards
    // (measured: 5-10% faster decode on 2 cores).
    rayon::scope(|_| forward_on_pool(model, seqs, mode, groups))
}

fn forward_on_pool(
    model: &Llama,
    seqs: &mut [SeqInput<'_>],
    mode: LogitsMode,
    groups: &RowGroups,
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let h = cfg.hidden_size;
    let eps = cfg.rms_norm_eps as f32;
    let flats = groups
        .list
        .iter()
        .map(|(st, _)| match st.flat() {
            Some(f) => View::new(f),
            None => candle_core::bail!("fast path: an adapter stack without its flat buffer"),
        })
        .collect::<Result<Vec<_>>>()?;
    let lin = Projector {
        model,
        groups,
        flats,
    };
    let m = groups.of_row.len();
    let mut x = Vec::with_capacity(m * h);
    {
        let ev = View::new(&model.embed)?;
        let embed = ev.slice()?;
        for s in seqs.iter() {
            for &t in s.tokens {
                let t = t as usize;
                x.extend_from_slice(&embed[t * h..(t + 1) * h]);
            }
        }
    }
    for (l, blk) in model.blocks.iter().enumerate() {
        let norm = rms_norm(&x, View::new(&blk.attn_norm)?.slice()?, eps);
        let mut qkv = lin
            .run(&norm, m, l, &[Proj::Q, Proj::K, Proj::V])?
            .into_iter();
        let (Some(mut q), Some(mut k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
            candle_core::bail!("fast path: q/k/v projections missing");
        };
        let attn = attention(model, seqs, l, &mut q, &mut k, &v)?;
        let o = lin.run(&attn, m, l, &[Proj::O])?;
        for (a, b) in x.iter_mut().zip(&o[0]) {
            *a += *b;
        }
        let norm = rms_norm(&x, View::new(&blk.mlp_norm)?.slice()?, eps);
        let gu = lin.run(&norm, m, l, &[Proj::Gate, Proj::Up])?;
        let act: Vec<f32> = gu[0]
            .iter()
            .zip(&gu[1])
            .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let down = lin.run(&act, m, l, &[Proj::Down])?;
        for (a, b) in x.iter_mut().zip(&down[0]) {
            *a += *b;
        }
    }
    for s in seqs.iter_mut() {
        s.cache.commit();
    }
    let x = match mode {
        LogitsMode::All => x,
        LogitsMode::Last => {
            let mut last = Vec::with_capacity(seqs.len() * h);
            let mut r = 0;
            for s in seqs.iter() {
                r += s.tokens.len();
                last.extend_from_slice(&x[(r - 1) * h..r * h]);
            }
            last
        }
    };
    let rows = x.len() / h;
    let x = rms_norm(&x, View::new(&model.norm)?.slice()?, eps);
    let lm = View::new(&model.lm_head)?;
    let lm_weight = match model.lm_head_nf4.as_ref().map(|q| &q.weight) {
        Some(LinearWeight::Nf4(packed)) => JobWeight::Nf4(packed),
        _ => JobWeight::F32(lm.slice()?),
    };
    let logits = kernels::linear_rows(&[LinearJob {
        x: &x,
        m: rows,
        k: h,
        w: lm_weight,
        n: cfg.vocab_size,
        bias: None,
        low_rank: vec![],
    }])?
    .remove(0);
    Tensor::from_vec(logits, (rows, cfg.vocab_size), model.device())
}
