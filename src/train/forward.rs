//! The training forward pass: the frozen base (input-gradient-only linears, composed RMSNorm,
//! RoPE and softmax that all have a backward) with trainable LoRA deltas and seeded dropout, over a
//! right-padded batch. Losses: SFT cross-entropy on response tokens, DPO (sigmoid) against the
//! base as the reference.

use super::frozen::frozen_linear;
use super::params::LoraParams;
use crate::model::{LinearWeight, Llama, LlamaConfig, Proj};
use crate::quant::{KernelPath, Nf4MatmulOp, Nf4Packed};
use anyhow::Result;
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
}

/// Dropout on the LoRA input, from a seeded generator (reproducible runs and resumes).
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

/// Final-norm hidden states `[B*T, hidden]` for ids `[B, T]`, with LoRA when given.
pub fn hidden_states(
    base: &TrainBase,
    lora: Option<&LoraParams>,
    ids: &Tensor,
    mut dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let cfg = &base.cfg;
    let (b, t) = ids.dims2()?;
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let scale = lora.map(|l| l.shape.scaling()).unwrap_or(0.0);
    // The embedding is frozen: start the graph after the lookup.
    let mut x = base.embed.index_select(&ids.flatten_all()?, 0)?.detach();
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?.to_dtype(base.dtype)?;
    let cos = base.cos.narrow(0, 0, t)?;
    let sin = base.sin.narrow(0, 0, t)?;
    let eps = cfg.rms_norm_eps;
    for (
        l,
        FrozenLayer {
            attn_norm,
            mlp_norm,
            w,
            bias,
        },
    ) in base.layers.iter().enumerate()
    {
        let mut linear = |h: &Tensor, p: Proj| -> Result<Tensor> {
            let mut y = w[p.index()].forward(h)?;
            if let Some(bb) = &bias[p.index()] {
                y = y.broadcast_add(bb)?;
            }
            if let Some((a, bm)) = lora.and_then(|lp| lp.pairs.get(&(l, p))) {
                let xin = match dropout.as_deref_mut() {
                    Some(d) => d.apply(h)?,
                    None => h.clone(),
                };
                let delta = xin
                    .matmul(&a.as_tensor().t()?)?
                    .matmul(&bm.as_tensor().t()?)?;
                y = (y + (delta * scale)?)?;
            }
            Ok(y)
        };
        let h = rms_norm(&x, attn_norm, eps)?;
        let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = candle_nn::rotary_emb::rope_slow(&heads(linear(&h, Proj::Q)?, nh)?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope_slow(&heads(linear(&h, Proj::K)?, nkv)?, &cos, &sin)?;
        let v = heads(linear(&h, Proj::V)?, nkv)?;
        let k = candle_transformers::utils::repeat_kv(k, nh / nkv)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, nh / nkv)?.contiguous()?;
        let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(&mask)?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        x = (x + linear(&o, Proj::O)?)?;
        let h = rms_norm(&x, mlp_norm, eps)?;
        let act = (linear(&h, Proj::Gate)?.silu()? * linear(&h, Proj::Up)?)?;
        x = (x + linear(&act, Proj::Down)?)?;
    }
    Ok(rms_norm(&x, &base.norm, eps)?)
}

/// `log p(target)` for each `(row, target)`: rows index `hidden` (`[B*T, H]`).
pub fn token_logprobs(
    base: &TrainBase,
    hidden: &Tensor,
    rows: &[u32],
    targets: &[u32],
) -> Result<Tensor> {
    let n = rows.len();
    let h = hidden.index_select(&Tensor::from_vec(rows.to_vec(), n, &Device::Cpu)?, 0)?;
    let logits = frozen_linear(&h, &base.lm_head)?;
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let idx = Tensor::from_vec(targets.to_vec(), (n, 1), &Device::Cpu)?;
    Ok(lsm.gather(&idx, 1)?.squeeze(1)?)
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

/// Sum of the response tokens' negative log-likelihood (divide by the token count yourself).
pub fn sft_loss_sum(
    base: &TrainBase,
    lora: Option<&LoraParams>,
    batch: &PackedBatch,
    dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let h = hidden_states(base, lora, &batch.ids, dropout)?;
    Ok(token_logprobs(base, &h, &batch.rows, &batch.targets)?
        .sum_all()?
        .neg()?)
}

/// Per-sequence sums of response-token log-probabilities `[B]`.
pub fn sequence_logprobs(
    base: &TrainBase,
    lora: Option<&LoraParams>,
    batch: &PackedBatch,
    dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let h = hidden_states(base, lora, &batch.ids, dropout)?;
    let lp = token_logprobs(base, &h, &batch.rows, &batch.targets)?;
    let mut sums = Vec::with_capacity(batch.per_seq.len());
    let mut start = 0;
    for &n in &batch.per_seq {
        sums.push(lp.narrow(0, start, n)?.sum_all()?);
        start += n;
    }
    Ok(Tensor::stack(&sums, 0)?)
}

/// DPO (sigmoid) loss summed over pairs: `-log σ(β((π_c - ref_c) - (π_r - ref_r)))`. The batch
/// holds the chosen sequences first, then the rejected ones in the same order.
pub fn dpo_loss_sum(
    base: &TrainBase,
    lora: &LoraParams,
    batch: &PackedBatch,
    beta: f64,
    dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let pairs = batch.per_seq.len() / 2;
    let policy = sequence_logprobs(base, Some(lora), batch, dropout)?;
    // Reference: the frozen base (adapter off), no gradient.
    let reference = sequence_logprobs(base, None, batch, None)?.detach();
    let diff = (policy - reference)?;
    let margin = (diff.narrow(0, 0, pairs)? - diff.narrow(0, pairs, pairs)?)?;
    // -log σ(z) = softplus(-z) = log(1 + exp(-z)), computed stably.
    let z = (margin * beta)?;
    let neg = z.neg()?;
    let softplus = (neg.relu()? + ((neg.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    Ok(softplus.sum_all()?)
}
