//! The training forward pass: the frozen base (input-gradient-only linears, composed RMSNorm,
//! RoPE and softmax that all have a backward) with trainable LoRA deltas and seeded dropout, over a
//! right-padded batch. Losses: SFT cross-entropy on response tokens, DPO (sigmoid) against the
//! base as the reference.

use super::frozen::frozen_linear;
use super::params::LoraParams;
use super::vocab_loss::{token_logprobs_chunked, DEFAULT_CHUNK_ROWS};
use crate::model::{LinearWeight, Llama, LlamaConfig, Proj};
use crate::quant::{KernelPath, Nf4MatmulOp, Nf4Packed};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// One decoder block's frozen weights.
struct FrozenLayer {
    attn_norm: Tensor,
    mlp_norm: Tensor,
    /// The seven projection weights, by `Proj::index`.
    w: Vec<FrozenWeight>,
    bias: Vec<Option<Tensor>>,
}

/// A frozen projection weight: dense in the training dtype, or NF4-packed (QLoRA; f32 only).
enum FrozenWeight {
    Dense(Tensor),
    Nf4(Arc<Nf4Packed>),
}

impl FrozenWeight {
    /// `x [n, in] → [n, out]`, with an input-gradient-only backward either way.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => frozen_linear(x, w),
            FrozenWeight::Nf4(w) => x.contiguous()?.apply_op1(Nf4MatmulOp {
                weight: w.clone(),
                path: KernelPath::Auto,
            }),
        }
    }
}

/// The frozen base in the dtype training runs in (f32; f64 for gradient checks).
pub struct TrainBase {
    pub cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<FrozenLayer>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
}

impl TrainBase {
    pub fn new(llama: &Llama, dtype: DType) -> Result<Self> {
        let cfg = llama.cfg.clone();
        let c = |t: &Tensor| t.to_dtype(dtype);
        let mut layers = Vec::with_capacity(llama.blocks.len());
        for b in &llama.blocks {
            let w = b
                .proj
                .iter()
                .map(|l| match &l.weight {
                    LinearWeight::Dense(t) => Ok(FrozenWeight::Dense(c(t)?)),
                    LinearWeight::Nf4(p) if dtype == DType::F32 => Ok(FrozenWeight::Nf4(p.clone())),
                    LinearWeight::Nf4(_) => {
                        anyhow::bail!("an NF4 base trains in f32 only, not {dtype:?}")
                    }
                    LinearWeight::Nf4Device(_) => anyhow::bail!(
                        "training an NF4 base runs on the CPU for now (--device cpu); on a GPU, \
                         train on the bf16 base (drop --quantize)"
                    ),
                })
                .collect::<Result<Vec<_>>>()?;
            let bias = b
                .proj
                .iter()
                .map(|l| l.bias.as_ref().map(c).transpose())
                .collect::<candle_core::Result<Vec<_>>>()?;
            layers.push(FrozenLayer {
                attn_norm: c(&b.attn_norm)?,
                mlp_norm: c(&b.mlp_norm)?,
                w,
                bias,
            });
        }
        // The same tables inference uses, in the training dtype.
        let (cos, sin) = llama.rope().tables();
        Ok(Self {
            embed: c(&llama.embed)?,
            norm: c(&llama.norm)?,
            lm_head: c(&llama.lm_head)?,
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
            layers,
            cfg,
            dtype,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The frozen vocabulary projection `[vocab, hidden]`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
}

/// Dropout on the LoRA input, from a seeded generator (reproducible runs and resumes). A clone
/// continues the same stream (gradient checkpointing replays a block's masks from one).
#[derive(Clone)]
pub struct Dropout {
    pub p: f64,
    pub rng: rand::rngs::StdRng,
}

impl Dropout {
    pub fn new(p: f64, seed: u64) -> Self {
        Self {
            p,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    fn apply(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if self.rng.random::<f64>() < self.p {
                    0.0
                } else {
                    keep as f32
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// What the blocks of one batch share: its shape, the causal mask and the RoPE rows.
pub struct BlockContext {
    b: usize,
    t: usize,
    mask: Tensor,
    cos: Tensor,
    sin: Tensor,
}

/// LoRA weights as a forward sees them: tracked (gradients reach the `Var`s, candle keeps the
/// graph) or detached (no graph: evaluation, or the first pass of gradient checkpointing).
#[derive(Clone, Copy)]
pub struct LoraIn<'a> {
    pub params: &'a LoraParams,
    pub grad: bool,
}

impl TrainBase {
    /// The frozen embedding rows `[B*T, hidden]` of ids `[B, T]` (no graph starts here).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed.index_select(&ids.flatten_all()?, 0)?.detach())
    }

    /// The causal mask and RoPE rows for a `[b, t]` batch.
    pub fn block_context(&self, b: usize, t: usize) -> Result<BlockContext> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?.to_dtype(self.dtype)?;
        Ok(BlockContext {
            b,
            t,
            mask,
            cos: self.cos.narrow(0, 0, t)?,
            sin: self.sin.narrow(0, 0, t)?,
        })
    }

    /// The final RMSNorm of the residual stream.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(x, &self.norm, self.cfg.rms_norm_eps)?)
    }

    /// Decoder block `l` on the residual stream `x [B*T, hidden]`. Dropout draws its masks in a
    /// fixed order (q, k, v, o, gate, up, down), so a block run again from a copy of the
    /// generator taken before it sees the same masks.
    pub fn block(
        &self,
        l: usize,
        x: &Tensor,
        lora: Option<LoraIn>,
        ctx: &BlockContext,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = (ctx.b, ctx.t);
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let eps = cfg.rms_norm_eps;
        let layer = self.layers.get(l).context("no such layer")?;
        let scale = lora.map(|l| l.params.shape.scaling()).unwrap_or(0.0);
        let mut linear = |h: &Tensor, p: Proj| -> Result<Tensor> {
            let mut y = layer.w[p.index()].forward(h)?;
            if let Some(bb) = &layer.bias[p.index()] {
                y = y.broadcast_add(bb)?;
            }
            if let Some((lp, (a, bm))) =
                lora.and_then(|lp| Some((lp, lp.params.pairs.get(&(l, p))?)))
            {
                let (a, bm) = if lp.grad {
                    (a.as_tensor().clone(), bm.as_tensor().clone())
                } else {
                    (a.as_tensor().detach(), bm.as_tensor().detach())
                };
                let xin = match dropout.as_deref_mut() {
                    Some(d) => d.apply(h)?,
                    None => h.clone(),
                };
                let delta = xin.matmul(&a.t()?)?.matmul(&bm.t()?)?;
                y = (y + (delta * scale)?)?;
            }
            Ok(y)
        };
        let h = rms_norm(x, &layer.attn_norm, eps)?;
        let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let (cos, sin) = (&ctx.cos, &ctx.sin);
        let q = candle_nn::rotary_emb::rope_slow(&heads(linear(&h, Proj::Q)?, nh)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_slow(&heads(linear(&h, Proj::K)?, nkv)?, cos, sin)?;
        let v = heads(linear(&h, Proj::V)?, nkv)?;
        let k = candle_transformers::utils::repeat_kv(k, nh / nkv)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, nh / nkv)?.contiguous()?;
        let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(&ctx.mask)?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        let x = (x + linear(&o, Proj::O)?)?;
        let h = rms_norm(&x, &layer.mlp_norm, eps)?;
        let act = (linear(&h, Proj::Gate)?.silu()? * linear(&h, Proj::Up)?)?;
        Ok((&x + linear(&act, Proj::Down)?)?)
    }
}

/// Final-norm hidden states `[B*T, hidden]` for ids `[B, T]`, with LoRA when given (tracked:
/// candle keeps the whole graph for one backward).
pub fn hidden_states(
    base: &TrainBase,
    lora: Option<&LoraParams>,
    ids: &Tensor,
    dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let lora = lora.map(|params| LoraIn { params, grad: true });
    hidden_states_with(base, lora, ids, dropout)
}

/// `hidden_states` with the LoRA weights tracked or not.
pub fn hidden_states_with(
    base: &TrainBase,
    lora: Option<LoraIn>,
    ids: &Tensor,
    mut dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let ctx = base.block_context(b, t)?;
    let mut x = base.embed(ids)?;
    for l in 0..base.layers.len() {
        x = base.block(l, &x, lora, &ctx, dropout.as_deref_mut())?;
    }
    base.final_norm(&x)
}

/// `log p(target)` for each `(row, target)`: rows index `hidden` (`[B*T, H]`). The vocabulary
/// projection runs in chunks of rows (`vocab_loss`).
pub fn token_logprobs(
    base: &TrainBase,
    hidden: &Tensor,
    rows: &[u32],
    targets: &[u32],
) -> Result<Tensor> {
    let h = hidden.index_select(
        &Tensor::from_vec(rows.to_vec(), rows.len(), &Device::Cpu)?,
        0,
    )?;
    Ok(token_logprobs_chunked(
        &h,
        &base.lm_head,
        targets,
        DEFAULT_CHUNK_ROWS,
    )?)
}

/// A padded batch and where its loss tokens are.
pub struct PackedBatch {
    /// `[B, T]`
    pub ids: Tensor,
    /// Row (`b*T + t - 1`) predicting each loss token, and the token.
    pub rows: Vec<u32>,
    pub targets: Vec<u32>,
    /// Loss tokens per sequence (in row order), for per-sequence sums (DPO).
    pub per_seq: Vec<usize>,
}

/// Right-pads `seqs` (ids + which positions are loss tokens) into one batch.
pub fn pack(seqs: &[(&[u32], &[bool])], pad: u32) -> Result<PackedBatch> {
    let t = seqs
        .iter()
        .map(|(ids, _)| ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let (mut rows, mut targets, mut per_seq) = (Vec::new(), Vec::new(), Vec::new());
    for (b, (s, m)) in seqs.iter().enumerate() {
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(pad, t - s.len()));
        let mut n = 0;
        for pos in 1..s.len() {
            if m[pos] {
                rows.push((b * t + pos - 1) as u32);
                targets.push(s[pos]);
                n += 1;
            }
        }
        per_seq.push(n);
    }
    Ok(PackedBatch {
        ids: Tensor::from_vec(ids, (seqs.len(), t), &Device::Cpu)?,
        rows,
        targets,
        per_seq,
    })
}

/// What a micro-batch's loss is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Objective {
    /// Negative log-likelihood of the response tokens.
    Sft,
    /// DPO (sigmoid) with temperature `beta`; the batch holds the chosen sequences first, then
    /// the rejected ones in the same order.
    Dpo { beta: f64 },
}

/// Per-sequence sums `[B]` of per-token values in row order.
fn sequence_sums(lp: &Tensor, per_seq: &[usize]) -> Result<Tensor> {
    let mut sums = Vec::with_capacity(per_seq.len());
    let mut start = 0;
    for &n in per_seq {
        sums.push(lp.narrow(0, start, n)?.sum_all()?);
        start += n;
    }
    Ok(Tensor::stack(&sums, 0)?)
}

/// The DPO reference: the frozen base's (adapter off) per-sequence log-probabilities, no graph.
pub fn reference_logprobs(base: &TrainBase, batch: &PackedBatch) -> Result<Tensor> {
    Ok(sequence_logprobs(base, None, batch, None)?.detach())
}

/// The loss summed over the batch from its final-norm hidden states `h`: the SFT token NLL, or
/// DPO's pair losses `-log σ(β((π_c - ref_c) - (π_r - ref_r)))` against `reference`
/// (`reference_logprobs`, required for DPO).
pub fn loss_from_hidden(
    base: &TrainBase,
    h: &Tensor,
    batch: &PackedBatch,
    objective: Objective,
    reference: Option<&Tensor>,
) -> Result<Tensor> {
    let lp = token_logprobs(base, h, &batch.rows, &batch.targets)?;
    match objective {
        Objective::Sft => Ok(lp.sum_all()?.neg()?),
        Objective::Dpo { beta } => {
            let reference = reference.context("DPO needs the reference log-probabilities")?;
            let pairs = batch.per_seq.len() / 2;
            let diff = (sequence_sums(&lp, &batch.per_seq)? - reference)?;
            let margin = (diff.narrow(0, 0, pairs)? - diff.narrow(0, pairs, pairs)?)?;
            // -log σ(z) = softplus(-z) = log(1 + exp(-z)), computed stably.
            let z = (margin * beta)?;
            let neg = z.neg()?;
            let softplus = (neg.relu()? + ((neg.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
            Ok(softplus.sum_all()?)
        }
    }
}

/// The loss summed over the batch, the whole forward in one graph when `lora` is tracked.
pub fn loss_sum(
    base: &TrainBase,
    lora: Option<LoraIn>,
    batch: &PackedBatch,
    objective: Objective,
    dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let reference = match objective {
        Objective::Dpo { .. } => Some(reference_logprobs(base, batch)?),
        Objective::Sft => None,
    };
    let h = hidden_states_with(base, lora, &batch.ids, dropout)?;
    loss_from_hidden(base, &h, batch, objective, reference.as_ref())
}

/// Sum of the response tokens' negative log-likelihood (divide by the token count yourself).
pub fn sft_loss_sum(
    base: &TrainBase,
    lora: Option<&LoraParams>,
    batch: &PackedBatch,
    dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let lora = lora.map(|params| LoraIn { params, grad: true });
    loss_sum(base, lora, batch, Objective::Sft, dropout)
}

/// Per-sequence sums of response-token log-probabilities `[B]`.
pub fn sequence_logprobs(
    base: &TrainBase,
    lora: Option<&LoraParams>,
    batch: &PackedBatch,
    dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let h = hidden_states(base, lora, &batch.ids, dropout)?;
    sequence_sums(
        &token_logprobs(base, &h, &batch.rows, &batch.targets)?,
        &batch.per_seq,
    )
}

/// DPO (sigmoid) loss summed over pairs (`Objective::Dpo`), against the frozen base.
pub fn dpo_loss_sum(
    base: &TrainBase,
    lora: &LoraParams,
    batch: &PackedBatch,
    beta: f64,
    dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let lora = LoraIn {
        params: lora,
        grad: true,
    };
    loss_sum(base, Some(lora), batch, Objective::Dpo { beta }, dropout)
}
