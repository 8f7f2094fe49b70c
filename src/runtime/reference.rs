//! The candle-op forward path: the oracle for tests, the path of prefill chunks and calibration on
//! the CPU, and the first GPU path. Built only from candle ops (plus the per-row LoRA op), so it
//! runs on any device and dtype; training differentiates the same math in `train::forward`.
//!
//! The linear layers run over all rows of the call at once. LoRA deltas: on the CPU each group of
//! rows that shares a stack gets `(x A^T) B^T` by gather/scatter (nothing to gather when one group
//! holds every row); on other devices every group is applied in one per-row launch pair per
//! projection (`runtime::lora_rows`). Attention runs per sequence on its own cache, softmax in f32.

use super::batch::{LogitsMode, RowGroups, SeqInput};
use super::decode_attention::{append_kv_rows, decode_attention, KvBuffers};
use super::lora_rows::{apply_lora_rows, LoraSetRef};
use super::paged_kv::{paged_append_kv_rows, paged_decode_attention, PagedKv};
use super::prefill_attention::{attend_prompt, query_tile};
use crate::lora::LoraStack;
use crate::model::{KvCache, KvPool, Llama, Proj};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// Sees the input of each projection group during `block_forward` (calibration).
pub type InputObserver<'a> = dyn FnMut(Proj, &Tensor) -> Result<()> + 'a;

/// How one call's LoRA deltas are applied.
enum LoraRows {
    /// No row has an adapter.
    None,
    /// Per group: its stack and the index of its rows (`None`: the group is the whole batch).
    Gather(Vec<(Arc<LoraStack>, Option<Tensor>)>),
    /// Every group in one per-row launch: the stacks and each row's group (`u32::MAX`: none).
    PerRow(Vec<Arc<LoraStack>>, Vec<u32>),
}

impl LoraRows {
    /// Per-row launches off the CPU; gather/scatter on it (the oracle's own arithmetic).
    fn new(groups: &RowGroups, device: &Device) -> Result<Self> {
        match device.is_cpu() {
            true => Self::gather(groups, device),
            false => Ok(Self::per_row(groups)),
        }
    }

    fn per_row(groups: &RowGroups) -> Self {
        match groups.list.is_empty() {
            true => Self::None,
            false => Self::PerRow(
                groups.list.iter().map(|(s, _)| s.clone()).collect(),
                groups.row_sets(),
            ),
        }
    }

    fn gather(groups: &RowGroups, device: &Device) -> Result<Self> {
        if groups.list.is_empty() {
            return Ok(Self::None);
        }
        if groups.one_group_for_all() {
            return Ok(Self::Gather(vec![(groups.list[0].0.clone(), None)]));
        }
        let list = groups
            .list
            .iter()
            .map(|(stack, rows)| {
                let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                let n = rows.len();
                Ok((stack.clone(), Some(Tensor::from_vec(rows, n, device)?)))
            })
            .collect::<Result<_>>()?;
        Ok(Self::Gather(list))
    }
}

/// Runs one batched forward call on candle ops. The caller has validated the tokens; caches
/// are committed only when every layer succeeded.
pub fn forward(
    model: &Llama,
    seqs: &mut [SeqInput<'_>],
    mode: LogitsMode,
    groups: &RowGroups,
) -> Result<Tensor> {
    let device = model.device();
    let lora = LoraRows::new(groups, device)?;
    let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
    let n = ids.len();
    let ids = Tensor::from_vec(ids, n, device)?;
    let mut x = model.embed.index_select(&ids, 0)?;
    // A decode step's RoPE rows are the same for every layer: gathered once.
    let decode_rope = match seqs.iter().all(|s| s.tokens.len() == 1) {
        true => {
            let pos: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
            Some(model.rope().rows(&pos, x.dtype())?)
        }
        false => None,
    };
    for l in 0..model.blocks.len() {
        x = block(model, l, &x, seqs, &lora, decode_rope.as_ref(), None)?;
    }
    for s in seqs.iter_mut() {
        s.cache.commit();
    }
    let x = match mode {
        LogitsMode::All => x,
        LogitsMode::Last => {
            let mut last = Vec::with_capacity(seqs.len());
            let mut r = 0u32;
            for s in seqs.iter() {
                r += s.tokens.len() as u32;
                last.push(r - 1);
            }
            let n = last.len();
            x.index_select(&Tensor::from_vec(last, n, device)?, 0)?
        }
    };
    let x = candle_nn::ops::rms_norm(&x, &model.norm, model.cfg.rms_norm_eps as f32)?;
    match &model.lm_head_nf4 {
        Some(q) => q.forward(&x)?.to_dtype(DType::F32),
        None => x.matmul(&model.lm_head.t()?)?.to_dtype(DType::F32),
    }
}

/// Runs decoder block `layer` alone on hidden states `x` (`[rows, hidden]`, the rows of `seqs`
/// one after another; each cache's layer `layer` grows and nothing is committed), without LoRA.
/// `observe` sees the input of each projection group as it is computed (`Proj::Q` for q/k/v,
/// `O`, `Gate` for gate/up, `Down`): what calibration collects.
pub fn block_forward(
    model: &Llama,
    layer: usize,
    x: &Tensor,
    seqs: &mut [SeqInput<'_>],
    observe: &mut InputObserver<'_>,
) -> Result<Tensor> {
    if layer >= model.blocks.len() {
        candle_core::bail!(
            "layer {layer} is outside the model's {}",
            model.blocks.len()
        );
    }
    block(model, layer, x, seqs, &LoraRows::None, None, Some(observe))
}

/// One decoder block: attention (batched for a decode step, given its RoPE rows; per sequence
/// otherwise), then the MLP.
fn block(
    model: &Llama,
    l: usize,
    x: &Tensor,
    seqs: &mut [SeqInput<'_>],
    lora: &LoraRows,
    decode_rope: Option<&(Tensor, Tensor)>,
    mut observe: Option<&mut InputObserver<'_>>,
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let blk = &model.blocks[l];
    let mut seen = |p: Proj, t: &Tensor| -> Result<()> {
        match observe.as_mut() {
            Some(f) => f(p, t),
            None => Ok(()),
        }
    };
    let eps = cfg.rms_norm_eps as f32;
    let h = candle_nn::ops::rms_norm(x, &blk.attn_norm, eps)?;
    seen(Proj::Q, &h)?;
    let q = linear(model, &h, l, Proj::Q, lora)?;
    let k = linear(model, &h, l, Proj::K, lora)?;
    let v = linear(model, &h, l, Proj::V, lora)?;
    let attn = match decode_rope {
        Some(rope) => attend_decode(model, l, (&q, &k, &v), rope, seqs)?,
        None => attend_each(model, l, &q, &k, &v, seqs)?,
    };
    seen(Proj::O, &attn)?;
    let o = linear(model, &attn, l, Proj::O, lora)?;
    let (x, h) = super::fused::add_rms_norm(x, &o, &blk.mlp_norm, eps)?;
    seen(Proj::Gate, &h)?;
    let gate = linear(model, &h, l, Proj::Gate, lora)?;
    let up = linear(model, &h, l, Proj::Up, lora)?;
    let act = super::fused::silu_mul(&gate, &up)?;
    seen(Proj::Down, &act)?;
    x + linear(model, &act, l, Proj::Down, lora)?
}

/// A projection over all rows plus the LoRA deltas of the rows that have one.
fn linear(model: &Llama, x: &Tensor, layer: usize, proj: Proj, lora: &LoraRows) -> Result<Tensor> {
    let mut y = model.blocks[layer].proj[proj.index()].forward(x)?;
    match lora {
        LoraRows::None => {}
        LoraRows::Gather(groups) => {
            for (stack, rows) in groups {
                let Some(pair) = stack.pair(layer, proj) else {
                    continue;
                };
                y = match rows {
                    None => (y + pair.delta(x)?)?,
                    Some(rows) => {
                        let delta = pair.delta(&x.index_select(rows, 0)?)?;
                        y.index_add(rows, &delta, 0)?
                    }
                };
            }
        }
        LoraRows::PerRow(stacks, row_sets) => {
            // Stacks without a pair for this projection drop out; the rest are renumbered.
            let mut sets = Vec::with_capacity(stacks.len());
            let mut bts = Vec::with_capacity(stacks.len());
            let mut renumber = vec![u32::MAX; stacks.len()];
            for (i, stack) in stacks.iter().enumerate() {
                if let Some(pair) = stack.pair(layer, proj) {
                    renumber[i] = sets.len() as u32;
                    sets.push(&pair.a);
                    bts.push(pair.bt.clone());
                }
            }
            if !sets.is_empty() {
                let refs: Vec<LoraSetRef<'_>> = sets
                    .iter()
                    .zip(&bts)
                    .map(|(a, bt)| LoraSetRef { a, bt })
                    .collect();
                let rows: Vec<u32> = row_sets
                    .iter()
                    .map(|&s| renumber.get(s as usize).copied().unwrap_or(u32::MAX))
                    .collect();
                y = apply_lora_rows(x, &y, &refs, &rows)?;
            }
        }
    }
    Ok(y)
}

/// Attention for a decode step (one new token per sequence), batched: RoPE at each row's own
/// position, the new keys/values written into every sequence's cache in one op, and one
/// attention op over each row's own history (`runtime::decode_attention`).
fn attend_decode(
    model: &Llama,
    l: usize,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    rope: &(Tensor, Tensor),
    seqs: &mut [SeqInput<'_>],
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let (nh, nkv, hd) = cfg.heads();
    let b = seqs.len();
    let pos: Vec<usize> = seqs.iter().map(|s| s.cache.len()).collect();
    let q = model.rope().apply_rows(&q.reshape((b, nh, hd))?, rope)?;
    let k = model.rope().apply_rows(&k.reshape((b, nkv, hd))?, rope)?;
    let v = v.reshape((b, nkv, hd))?.contiguous()?;
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    if let Some(pool) = shared_pool(seqs)? {
        // Paged caches: one append and one attention op over the pool's blocks.
        for (s, &p) in seqs.iter_mut().zip(&pos) {
            s.cache.begin_paged_write(p + 1)?;
        }
        let tables: Vec<&[u32]> = (seqs.iter())
            .filter_map(|s| s.cache.paged_table().map(|(_, t)| t))
            .collect();
        let (kp, vp) = pool.layer(l)?;
        let layer = PagedKv { k: kp, v: vp };
        paged_append_kv_rows(&k, &v, layer, &tables, &pos)?;
        let len: Vec<usize> = pos.iter().map(|p| p + 1).collect();
        return paged_decode_attention(&q, layer, &tables, &len, scale);
    }
    let mut bufs = Vec::with_capacity(b);
    for (s, &p) in seqs.iter_mut().zip(&pos) {
        bufs.push(
            s.cache
                .reserve(l, p + 1, (nkv, hd), v.dtype(), v.device())?,
        );
    }
    let views: Vec<KvBuffers<'_>> = bufs.iter().map(|(k, v)| KvBuffers { k, v }).collect();
    append_kv_rows(&k, &v, &views, &pos)?;
    let len: Vec<usize> = pos.iter().map(|p| p + 1).collect();
    decode_attention(&q, &views, &len, scale)
}

/// Appends a prompt chunk's keys and values (`[nkv, len, hd]`) to `cache` and returns its whole
/// history. A paged cache takes the chunk in one append op (one pool slot per row: one launch on
/// a GPU) instead of one copy per block it touches.
fn append_chunk(
    cache: &mut KvCache,
    l: usize,
    ks: &Tensor,
    vs: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let Some((pool, table)) = cache.paged_table().map(|(p, t)| (p.clone(), t.to_vec())) else {
        return cache.append(l, ks, vs);
    };
    let len = ks.dims3()?.1;
    let off = cache.len();
    cache.begin_paged_write(off + len)?;
    let rows = |t: &Tensor| t.transpose(0, 1)?.contiguous();
    let tables = vec![&table[..]; len];
    let pos: Vec<usize> = (off..off + len).collect();
    let (kp, vp) = pool.layer(l)?;
    paged_append_kv_rows(
        &rows(ks)?,
        &rows(vs)?,
        PagedKv { k: kp, v: vp },
        &tables,
        &pos,
    )?;
    pool.read(l, &table, off + len)
}

/// The pool every sequence's cache is paged in; `None` when none is paged; an error when only
/// some are, or they use different pools (one op cannot read them together).
fn shared_pool(seqs: &[SeqInput<'_>]) -> Result<Option<Arc<KvPool>>> {
    let mut pools = seqs.iter().map(|s| s.cache.paged_table().map(|(p, _)| p));
    let Some(first) = pools.next().flatten() else {
        if seqs.iter().any(|s| s.cache.paged_table().is_some()) {
            candle_core::bail!("a decode step mixes paged and unpaged KV caches");
        }
        return Ok(None);
    };
    for p in pools {
        match p {
            Some(p) if Arc::ptr_eq(p, first) => {}
            Some(_) => candle_core::bail!("a decode step mixes KV caches of different pools"),
            None => candle_core::bail!("a decode step mixes paged and unpaged KV caches"),
        }
    }
    Ok(Some(first.clone()))
}

/// Attention sequence by sequence (prompt chunks): RoPE from each sequence's offset, its cache
/// appended, then causal attention in query tiles (`runtime::prefill_attention`).
fn attend_each(
    model: &Llama,
    l: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &mut [SeqInput<'_>],
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let (nh, nkv, hd) = cfg.heads();
    let mut outs = Vec::with_capacity(seqs.len());
    let mut r0 = 0;
    for s in seqs.iter_mut() {
        let len = s.tokens.len();
        let off = s.cache.len();
        let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
            t.narrow(0, r0, len)?
                .reshape((len, n, hd))?
                .transpose(0, 1)?
                .contiguous()
        };
        let qs = model.rope().apply(&heads(q, nh)?, off, false)?;
        let ks = model.rope().apply(&heads(k, nkv)?, off, false)?;
        let vs = heads(v, nkv)?;
        let (k_all, v_all) = append_chunk(s.cache, l, &ks, &vs)?;
        let tile = query_tile(nh, off + len, model.device());
        let o = attend_prompt(&qs, &k_all, &v_all, off, tile)?;
        outs.push(
            o.reshape((nh, len, hd))?
                .transpose(0, 1)?
                .reshape((len, nh * hd))?,
        );
        r0 += len;
    }
    Tensor::cat(&outs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::synthetic::synthetic_adapter;
    use crate::model::{dummy, KvCache, Placement};

    /// The per-row op (a GPU's path) and gather/scatter (the CPU's) give the same projections
    /// for a batch mixing two adapters, a stack of both (different targets and ranks) and rows
    /// without an adapter.
    #[test]
    fn per_row_lora_equals_gather_scatter_on_every_projection() {
        let at = Placement::cpu();
        let m = dummy::load("tiny", &at).unwrap();
        let layers = m.llama.cfg.num_hidden_layers;
        let cfg = &m.llama.cfg;
        let a = Arc::new(synthetic_adapter("a", cfg, 4, &Proj::ALL, 0.3, &at).unwrap());
        let b = Arc::new(synthetic_adapter("b", cfg, 8, &[Proj::Q, Proj::V], 0.3, &at).unwrap());
        let one = |x: &Arc<crate::lora::LoraAdapter>| {
            Some(Arc::new(
                LoraStack::new(vec![(x.clone(), 1.0)], layers).unwrap(),
            ))
        };
        let both = Some(Arc::new(
            LoraStack::new(vec![(a.clone(), 0.7), (b.clone(), -0.5)], layers).unwrap(),
        ));
        let loras = [one(&a), None, both, one(&b), one(&a)];
        let tokens: Vec<Vec<u32>> = (0..loras.len())
            .map(|i| vec![3 + i as u32; 1 + i % 3])
            .collect();
        let mut caches: Vec<KvCache> = (0..loras.len()).map(|_| m.llama.new_cache()).collect();
        let seqs: Vec<SeqInput<'_>> = caches
            .iter_mut()
            .zip(&tokens)
            .zip(&loras)
            .map(|((cache, t), lora)| SeqInput {
                tokens: t,
                cache,
                lora: lora.clone(),
            })
            .collect();
        let groups = RowGroups::new(&seqs);
        let gather = LoraRows::gather(&groups, &Device::Cpu).unwrap();
        let per_row = LoraRows::per_row(&groups);
        assert!(matches!(per_row, LoraRows::PerRow(..)));
        let rows = groups.rows();
        for l in 0..layers {
            for p in Proj::ALL {
                let (i, _) = p.in_out(cfg);
                let x = Tensor::randn(0f32, 1.0, (rows, i), &Device::Cpu).unwrap();
                let g = linear(&m.llama, &x, l, p, &gather).unwrap();
                let r = linear(&m.llama, &x, l, p, &per_row).unwrap();
                let base = m.llama.blocks[l].proj[p.index()].forward(&x).unwrap();
                let diff = (&g - &r).unwrap().abs().unwrap().max_all().unwrap();
                let delta = (&g - &base).unwrap().abs().unwrap().max_all().unwrap();
                let (diff, delta) = (
                    diff.to_scalar::<f32>().unwrap(),
                    delta.to_scalar::<f32>().unwrap(),
                );
                assert!(diff < 1e-5, "layer {l} {p:?}: per-row differs by {diff}");
                assert!(
                    delta > 1e-3,
                    "layer {l} {p:?}: the adapters changed nothing ({delta})"
                );
            }
        }
    }
}
