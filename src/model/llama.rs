//! The Llama-family decoder and its batched forward pass.
//!
//! One call runs a batch of sequences, each with its own new tokens, KV cache (and so its own
//! positions) and its own LoRA stack. The linear layers run over all rows of the batch at once;
//! each group of rows that shares a LoRA stack gets that stack's delta added (a gather/scatter over
//! the group's rows); attention runs per sequence on its own cache.
//!
//! That is the candle-op path (`Kernels::Candle`). Calls with few rows (decode steps) take the
//! inference-only `model::fast` path instead, the same math on slices (`Kernels::Auto`).

use super::config::LlamaConfig;
use super::fast;
use super::kv_cache::KvCache;
use super::linear::{tensor_bytes, Linear, LinearWeight, Nf4Settings};
use super::proj::Proj;
use super::rope::Rope;
use crate::lora::LoraStack;
use crate::quant::{is_bnb_layer, load_layer, save_layer};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor, D};
use std::collections::HashMap;
use std::sync::Arc;

/// One decoder block's weights.
#[derive(Clone, Debug)]
pub struct Block {
    pub attn_norm: Tensor,
    pub mlp_norm: Tensor,
    /// Indexed by `Proj::index()`.
    pub proj: [Linear; 7],
}

/// The whole base model, resident and shared by every request.
#[derive(Debug)]
pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    pub lm_head: Tensor,
    /// lm_head is the embedding matrix (tied weights).
    tied: bool,
    rope: Rope,
    device: Device,
}

/// Bytes of the linear projections' weights (`Llama::linear_weight_bytes`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct LinearBytes {
    /// As stored now.
    pub resident: usize,
    /// The same weights in f16.
    pub f16: usize,
}

/// Sees the input of each projection group during `Llama::block_forward` (calibration).
pub type InputObserver<'a> = dyn FnMut(Proj, &Tensor) -> Result<()> + 'a;

/// One sequence's share of a forward call.
pub struct SeqInput<'a> {
    /// The new tokens (a prompt chunk, or the one token just sampled).
    pub tokens: &'a [u32],
    /// This sequence's cache; the new tokens sit at positions `cache.len()..`.
    pub cache: &'a mut KvCache,
    /// The LoRA stack applied to this sequence's rows, if any.
    pub lora: Option<Arc<LoraStack>>,
}

/// Which positions' logits a forward call returns.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LogitsMode {
    /// One row per sequence: its last new token.
    Last,
    /// One row per new token, sequences one after another.
    All,
}

/// Which implementation runs a forward call.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The inference kernels of `model::fast` when the call has few rows (decode steps, up to
    /// `fast::MAX_ROWS` new tokens in all) and f32 CPU weights; candle ops otherwise.
    #[default]
    Auto,
    /// Candle ops only: the reference path, built from the ops a training step differentiates.
    Candle,
}

/// Rows of the batch that share one LoRA stack.
struct RowGroup {
    /// `None` when the group is the whole batch (no gather needed).
    rows: Option<Tensor>,
    stack: Arc<LoraStack>,
}

fn take(map: &mut HashMap<String, Tensor>, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
    let t = map
        .remove(name)
        .with_context(|| format!("weights: tensor `{name}` is missing"))?;
    if t.dims() != shape {
        bail!(
            "weights: tensor `{name}` has shape {:?}, the config needs {:?}",
            t.dims(),
            shape
        );
    }
    Ok(t.to_dtype(DType::F32)?)
}

impl Llama {
    /// Builds the model from HF-named tensors (`model.layers.N.self_attn.q_proj.weight`, ...).
    /// Every shape is checked against the config; a missing or misshapen tensor is an error.
    pub fn from_tensors(
        mut cfg: LlamaConfig,
        mut map: HashMap<String, Tensor>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let h = cfg.hidden_size;
        let embed = take(&mut map, "model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut projs = Vec::with_capacity(7);
            for p in Proj::ALL {
                let (i, o) = p.in_out(&cfg);
                let name = p.hf_weight_name(l);
                let module = name.trim_end_matches(".weight");
                // bitsandbytes 4-bit layers (`loraplex quantize`, transformers' load_in_4bit).
                let weight = match is_bnb_layer(&map, module) {
                    true => {
                        let w = load_layer(&mut map, module)?;
                        if (w.rows, w.cols) != (o, i) {
                            bail!(
                                "weights: NF4 tensor `{name}` has shape [{}, {}], the config needs [{o}, {i}]",
                                w.rows,
                                w.cols
                            );
                        }
                        LinearWeight::Nf4(Arc::new(w))
                    }
                    false => LinearWeight::F32(take(&mut map, &name, &[o, i])?),
                };
                let bias_name = format!("{module}.bias");
                let bias = match map.contains_key(&bias_name) {
                    true => Some(take(&mut map, &bias_name, &[o])?),
                    false => None,
                };
                projs.push(Linear { weight, bias });
            }
            let proj: [Linear; 7] = projs
                .try_into()
                .map_err(|_| anyhow::anyhow!("internal: expected 7 projections"))?;
            blocks.push(Block {
                attn_norm: take(
                    &mut map,
                    &format!("model.layers.{l}.input_layernorm.weight"),
                    &[h],
                )?,
                mlp_norm: take(
                    &mut map,
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                proj,
            });
        }
        let norm = take(&mut map, "model.norm.weight", &[h])?;
        let tied = cfg.tie_word_embeddings || !map.contains_key("lm_head.weight");
        let lm_head = match tied {
            false => take(&mut map, "lm_head.weight", &[cfg.vocab_size, h])?,
            true => embed.clone(),
        };
        cfg.tie_word_embeddings = tied;
        // Rotary tables are not weights; anything else left over is a layout we do not understand.
        map.retain(|k, _| !k.contains("rotary_emb") && k != "lm_head.weight");
        if let Some(extra) = map.keys().next() {
            bail!("weights: unexpected tensor `{extra}` (not part of a Llama-family model)");
        }
        let rope = Rope::new(&cfg, device)?;
        Ok(Self {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            tied,
            rope,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The longest sequence (prompt + generated) this model accepts.
    pub fn max_context(&self) -> usize {
        self.cfg
            .max_position_embeddings
            .min(self.rope.max_positions())
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, self.max_context())
    }

    /// Whether lm_head shares its storage with the embedding.
    pub fn lm_head_tied(&self) -> bool {
        self.tied
    }

    /// Every weight under its HF name (what `merge` writes; NF4 layers in bitsandbytes'
    /// serialization). A tied lm_head is left out.
    pub fn hf_tensors(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (l, b) in self.blocks.iter().enumerate() {
            out.push((
                format!("model.layers.{l}.input_layernorm.weight"),
                b.attn_norm.clone(),
            ));
            out.push((
                format!("model.layers.{l}.post_attention_layernorm.weight"),
                b.mlp_norm.clone(),
            ));
            for p in Proj::ALL {
                let lin = &b.proj[p.index()];
                let name = p.hf_weight_name(l);
                if let Some(bias) = &lin.bias {
                    out.push((name.replace(".weight", ".bias"), bias.clone()));
                }
                match &lin.weight {
                    LinearWeight::F32(w) => out.push((name, w.clone())),
                    LinearWeight::Nf4(w) => {
                        let mut layer = HashMap::new();
                        save_layer(w, name.trim_end_matches(".weight"), &mut layer)?;
                        let mut layer: Vec<_> = layer.into_iter().collect();
                        layer.sort_by(|a, b| a.0.cmp(&b.0));
                        out.extend(layer);
                    }
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.lm_head_tied() {
            out.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        Ok(out)
    }

    /// Resident bytes of all weights, by dtype name (`"nf4"`: packed weights with their block
    /// scales). A tied lm_head is counted once.
    pub fn bytes_by_dtype(&self) -> Vec<(String, usize)> {
        let mut parts = vec![tensor_bytes(&self.embed), tensor_bytes(&self.norm)];
        if !self.tied {
            parts.push(tensor_bytes(&self.lm_head));
        }
        for b in &self.blocks {
            parts.push(tensor_bytes(&b.attn_norm));
            parts.push(tensor_bytes(&b.mlp_norm));
            for lin in &b.proj {
                parts.extend(lin.bytes_by_dtype());
            }
        }
        let mut by: HashMap<String, usize> = HashMap::new();
        for (d, n) in parts {
            *by.entry(d).or_default() += n;
        }
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort();
        v
    }

    /// Resident bytes of the seven linear projections' weights of every block, and what they
    /// would take in f16.
    pub fn linear_weight_bytes(&self) -> LinearBytes {
        let mut out = LinearBytes::default();
        for lin in self.blocks.iter().flat_map(|b| b.proj.iter()) {
            let (o, i) = lin.shape();
            out.f16 += o * i * 2;
            out.resident += match &lin.weight {
                LinearWeight::F32(w) => tensor_bytes(w).1,
                LinearWeight::Nf4(w) => w.resident_bytes(),
            };
        }
        out
    }

    /// Number of parameters (a tied lm_head counted once; an NF4 weight as its element count).
    pub fn num_params(&self) -> usize {
        let mut n = self.embed.elem_count() + self.norm.elem_count();
        if !self.tied {
            n += self.lm_head.elem_count();
        }
        for b in &self.blocks {
            n += b.attn_norm.elem_count() + b.mlp_norm.elem_count();
            for lin in &b.proj {
                let (o, i) = lin.shape();
                n += o * i + lin.bias.as_ref().map_or(0, Tensor::elem_count);
            }
        }
        n
    }

    /// The NF4 settings of the linear weights, when they are quantized (those of the first
    /// quantized layer; `quantize_nf4` makes them all alike).
    pub fn nf4_settings(&self) -> Option<Nf4Settings> {
        self.blocks
            .iter()
            .flat_map(|b| b.proj.iter())
            .find_map(|l| l.nf4())
            .map(|w| Nf4Settings {
                blocksize: w.blocksize,
                double_quant: w.is_double_quant(),
            })
    }

    /// Quantizes every dense linear weight (q/k/v/o/gate/up/down) to NF4, layers in parallel;
    /// the embedding, norms and lm_head stay as they are.
    pub fn quantize_nf4(&mut self, settings: Nf4Settings) -> anyhow::Result<()> {
        use rayon::prelude::*;
        self.blocks
            .par_iter_mut()
            .flat_map(|b| b.proj.par_iter_mut())
            .try_for_each(|lin| lin.quantize(settings))
    }

    /// Adds `delta` (`[out, in]`) to one projection's weight (merging an adapter into the base).
    /// Returns whether the weight was NF4 and had to be quantized again after the sum.
    pub fn add_to_weight(
        &mut self,
        layer: usize,
        proj: Proj,
        delta: &Tensor,
    ) -> anyhow::Result<bool> {
        self.blocks[layer].proj[proj.index()].add_delta(delta)
    }

    /// The RoPE tables.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Runs one batched forward step and returns logits (`[rows, vocab]`, see `LogitsMode`).
    /// Each sequence's cache grows by its new tokens; on error no cache advances.
    /// Inference only (`Kernels::Auto`); see `forward_with`.
    pub fn forward(&self, seqs: &mut [SeqInput<'_>], mode: LogitsMode) -> Result<Tensor> {
        self.forward_with(seqs, mode, Kernels::Auto)
    }

    /// `forward` with a choice of implementation: `Kernels::Candle` always runs the candle-op
    /// path; `Kernels::Auto` takes the fast inference path when the call qualifies.
    pub fn forward_with(
        &self,
        seqs: &mut [SeqInput<'_>],
        mode: LogitsMode,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if seqs.iter().any(|s| s.tokens.is_empty()) {
            candle_core::bail!("every sequence in a forward call needs at least one new token");
        }
        let mut ids = Vec::with_capacity(total);
        for s in seqs.iter() {
            let end = s.cache.len() + s.tokens.len();
            if end > self.max_context() {
                candle_core::bail!(
                    "sequence of {end} tokens exceeds the model's context of {}",
                    self.max_context()
                );
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                candle_core::bail!(
                    "token id {bad} is outside the vocabulary ({})",
                    cfg.vocab_size
                );
            }
            ids.extend_from_slice(s.tokens);
        }
        if kernels == Kernels::Auto && fast::eligible(self, seqs, total) {
            return fast::forward(self, seqs, mode);
        }
        let groups = self.row_groups(seqs)?;
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        for l in 0..self.blocks.len() {
            x = self.block(l, &x, seqs, &groups, None)?;
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
                x.index_select(&Tensor::from_vec(last, n, &self.device)?, 0)?
            }
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, cfg.rms_norm_eps as f32)?;
        x.matmul(&self.lm_head.t()?)
    }

    /// Runs decoder block `layer` alone on hidden states `x` (`[rows, hidden]`, the rows of
    /// `seqs` one after another; each cache's layer `layer` grows and nothing is committed),
    /// without LoRA. `observe` sees the input of each projection group as it is computed
    /// (`Proj::Q` for q/k/v, `O`, `Gate` for gate/up, `Down`): what calibration collects.
    pub fn block_forward(
        &self,
        layer: usize,
        x: &Tensor,
        seqs: &mut [SeqInput<'_>],
        observe: &mut InputObserver<'_>,
    ) -> Result<Tensor> {
        if layer >= self.blocks.len() {
            candle_core::bail!("layer {layer} is outside the model's {}", self.blocks.len());
        }
        self.block(layer, x, seqs, &[], Some(observe))
    }

    /// One decoder block on the candle-op path: attention per sequence on its cache, then the MLP.
    fn block(
        &self,
        l: usize,
        x: &Tensor,
        seqs: &mut [SeqInput<'_>],
        groups: &[RowGroup],
        mut observe: Option<&mut InputObserver<'_>>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let blk = &self.blocks[l];
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let mut seen = |p: Proj, t: &Tensor| -> Result<()> {
            match observe.as_mut() {
                Some(f) => f(p, t),
                None => Ok(()),
            }
        };
        let group = cfg.gqa_group();
        let scale = 1.0 / (hd as f64).sqrt();
        let eps = cfg.rms_norm_eps as f32;
        let h = candle_nn::ops::rms_norm(x, &blk.attn_norm, eps)?;
        seen(Proj::Q, &h)?;
        let q = self.linear(&h, l, Proj::Q, groups)?;
        let k = self.linear(&h, l, Proj::K, groups)?;
        let v = self.linear(&h, l, Proj::V, groups)?;
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
            let qs = self.rope.apply(&heads(&q, nh)?, off, false)?;
            let ks = self.rope.apply(&heads(&k, nkv)?, off, false)?;
            let vs = heads(&v, nkv)?;
            let (k_all, v_all) = s.cache.append(l, &ks, &vs)?;
            let t = off + len;
            // Query heads h = kv * group + g share kv head `kv`: fold the group into rows.
            let qg = qs.reshape((nkv, group * len, hd))?;
            let mut att = (qg.matmul(&k_all.t()?)? * scale)?;
            if len > 1 {
                let mask: Vec<f32> = (0..len)
                    .flat_map(|i| {
                        (0..t).map(move |j| if j > off + i { f32::NEG_INFINITY } else { 0.0 })
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (len, t), &self.device)?;
                att = att
                    .reshape((nkv, group, len, t))?
                    .broadcast_add(&mask)?
                    .reshape((nkv, group * len, t))?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let o = att.matmul(&v_all.contiguous()?)?;
            outs.push(
                o.reshape((nh, len, hd))?
                    .transpose(0, 1)?
                    .reshape((len, nh * hd))?,
            );
            r0 += len;
        }
        let attn = Tensor::cat(&outs, 0)?;
        seen(Proj::O, &attn)?;
        let x = (x + self.linear(&attn, l, Proj::O, groups)?)?;
        let h = candle_nn::ops::rms_norm(&x, &blk.mlp_norm, eps)?;
        seen(Proj::Gate, &h)?;
        let gate = self.linear(&h, l, Proj::Gate, groups)?;
        let up = self.linear(&h, l, Proj::Up, groups)?;
        let act = (gate.silu()? * up)?;
        seen(Proj::Down, &act)?;
        x + self.linear(&act, l, Proj::Down, groups)?
    }

    /// Groups the batch's rows by LoRA stack (identity of the `Arc`).
    fn row_groups(&self, seqs: &[SeqInput<'_>]) -> Result<Vec<RowGroup>> {
        let mut groups: Vec<(Arc<LoraStack>, Vec<u32>)> = Vec::new();
        let mut r = 0u32;
        let mut all_rows_one_stack = true;
        for s in seqs {
            let n = s.tokens.len() as u32;
            match &s.lora {
                Some(stack) => {
                    if let Some(g) = groups.iter_mut().find(|(st, _)| Arc::ptr_eq(st, stack)) {
                        g.1.extend(r..r + n);
                    } else {
                        groups.push((stack.clone(), (r..r + n).collect()));
                    }
                }
                None => all_rows_one_stack = false,
            }
            r += n;
        }
        if groups.len() == 1 && all_rows_one_stack {
            let (stack, _) = groups.remove(0);
            return Ok(vec![RowGroup { rows: None, stack }]);
        }
        groups
            .into_iter()
            .map(|(stack, rows)| {
                let n = rows.len();
                Ok(RowGroup {
                    rows: Some(Tensor::from_vec(rows, n, &self.device)?),
                    stack,
                })
            })
            .collect()
    }

    /// A projection over all rows plus each row group's LoRA delta.
    fn linear(&self, x: &Tensor, layer: usize, proj: Proj, groups: &[RowGroup]) -> Result<Tensor> {
        let mut y = self.blocks[layer].proj[proj.index()].forward(x)?;
        for g in groups {
            let Some(pair) = g.stack.pair(layer, proj) else {
                continue;
            };
            y = match &g.rows {
                None => (y + pair.delta(x)?)?,
                Some(rows) => {
                    let delta = pair.delta(&x.index_select(rows, 0)?)?;
                    y.index_add(rows, &delta, 0)?
                }
            };
        }
        Ok(y)
    }
}

/// Log-softmax over the last dimension, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)
}
