//! The Llama-family decoder's weights: embedding, blocks of norms and seven projections, final
//! norm, lm_head and the RoPE tables, on one device in one dtype. Running them is
//! `runtime`'s business (`runtime::forward`).

use super::config::LlamaConfig;
use super::kv_cache::KvCache;
use super::linear::{tensor_bytes, Linear, LinearWeight, Nf4Settings};
use super::proj::Proj;
use super::rope::Rope;
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
    /// An NF4 copy of `lm_head` that inference uses for the logits when present
    /// (`--quantize-lm-head`: a decode step then reads it instead of the f32 matrix, the largest
    /// single read per token of a small model). `lm_head` itself stays: it is the embedding when
    /// tied, and training reads it.
    pub lm_head_nf4: Option<Linear>,
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

/// Where and how the weights are stored: one device, one dtype for every dense tensor.
#[derive(Clone, Debug)]
pub struct Placement {
    pub device: Device,
    pub dtype: DType,
}

impl Placement {
    /// f32 on the CPU (the CPU backend's only dtype).
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// `t` converted to the dtype (on its own device first, so a narrower dtype travels less),
    /// then moved to the device.
    pub fn put(&self, t: &Tensor) -> Result<Tensor> {
        t.to_dtype(self.dtype)?.to_device(&self.device)
    }
}

fn take(
    map: &mut HashMap<String, Tensor>,
    name: &str,
    shape: &[usize],
    at: &Placement,
) -> anyhow::Result<Tensor> {
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
    Ok(at.put(&t)?)
}

impl Llama {
    /// Builds the model from HF-named tensors (`model.layers.N.self_attn.q_proj.weight`, ...),
    /// stored as `at` says. Every shape is checked against the config; a missing or misshapen
    /// tensor is an error. bitsandbytes NF4 layers stay packed: in host memory on the CPU, in
    /// the device's memory on a GPU.
    pub fn from_tensors(
        cfg: LlamaConfig,
        mut map: HashMap<String, Tensor>,
        at: &Placement,
    ) -> anyhow::Result<Self> {
        let device = &at.device;
        let h = cfg.hidden_size;
        let embed = take(
            &mut map,
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            at,
        )?;
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
                        LinearWeight::nf4_on(Arc::new(w), device)?
                    }
                    false => LinearWeight::Dense(take(&mut map, &name, &[o, i], at)?),
                };
                let bias_name = format!("{module}.bias");
                let bias = match map.contains_key(&bias_name) {
                    true => Some(take(&mut map, &bias_name, &[o], at)?),
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
                    at,
                )?,
                mlp_norm: take(
                    &mut map,
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    &[h],
                    at,
                )?,
                proj,
            });
        }
        let norm = take(&mut map, "model.norm.weight", &[h], at)?;
        let tied = cfg.tie_word_embeddings || !map.contains_key("lm_head.weight");
        let lm_head = match tied {
            false => Some(take(&mut map, "lm_head.weight", &[cfg.vocab_size, h], at)?),
            true => None,
        };
        // Rotary tables are not weights; anything else left over is a layout we do not understand.
        map.retain(|k, _| !k.contains("rotary_emb") && k != "lm_head.weight");
        if let Some(extra) = map.keys().next() {
            bail!("weights: unexpected tensor `{extra}` (not part of a Llama-family model)");
        }
        Ok(Self::from_parts(cfg, embed, blocks, norm, lm_head, device)?)
    }

    /// Assembles a model from its parts (shapes as the config says); `lm_head: None` ties it to
    /// the embedding.
    pub fn from_parts(
        mut cfg: LlamaConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        norm: Tensor,
        lm_head: Option<Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let tied = lm_head.is_none();
        cfg.tie_word_embeddings = tied;
        let rope = Rope::new(&cfg, device)?;
        Ok(Self {
            cfg,
            lm_head: lm_head.unwrap_or_else(|| embed.clone()),
            lm_head_nf4: None,
            embed,
            blocks,
            norm,
            tied,
            rope,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Where and how the dense weights are stored.
    pub fn placement(&self) -> Placement {
        Placement {
            device: self.device.clone(),
            dtype: self.dtype(),
        }
    }

    /// The dtype of the dense weights (and so of activations and the KV cache).
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
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
                    LinearWeight::Dense(w) => out.push((name, w.clone())),
                    LinearWeight::Nf4(_) | LinearWeight::Nf4Device(_) => {
                        let Some(w) = lin.nf4() else { continue };
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
        if let Some(q) = &self.lm_head_nf4 {
            parts.extend(q.bytes_by_dtype());
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
                LinearWeight::Dense(w) => tensor_bytes(w).1,
                LinearWeight::Nf4(w) => w.resident_bytes(),
                LinearWeight::Nf4Device(w) => w.resident_bytes(),
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
    /// On a GPU each weight is copied to the host, quantized there (`quantize_nf4` spreads one
    /// weight over the cores) and uploaded packed, one at a time on the calling thread.
    pub fn quantize_nf4(&mut self, settings: Nf4Settings) -> anyhow::Result<()> {
        use rayon::prelude::*;
        if !self.device().is_cpu() {
            return self
                .blocks
                .iter_mut()
                .flat_map(|b| b.proj.iter_mut())
                .try_for_each(|lin| lin.quantize(settings));
        }
        self.blocks
            .par_iter_mut()
            .flat_map(|b| b.proj.par_iter_mut())
            .try_for_each(|lin| lin.quantize(settings))
    }

    /// Moves every NF4 weight packed in host memory (projections and the lm_head copy) to
    /// `device`'s memory: what loading does on a GPU; `force` does it on the CPU too (tests run
    /// the device ops there).
    pub fn place_nf4(&mut self, device: &Device, force: bool) -> Result<()> {
        let lins = self.blocks.iter_mut().flat_map(|b| b.proj.iter_mut());
        for lin in lins.chain(self.lm_head_nf4.as_mut()) {
            lin.place_nf4(device, force)?;
        }
        Ok(())
    }

    /// Keeps an NF4 copy of lm_head for inference's logits (see `lm_head_nf4`).
    pub fn quantize_lm_head(&mut self, settings: Nf4Settings) -> anyhow::Result<()> {
        let mut lin = Linear {
            weight: LinearWeight::Dense(self.lm_head.clone()),
            bias: None,
        };
        lin.quantize(settings)?;
        self.lm_head_nf4 = Some(lin);
        Ok(())
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
}

/// Log-softmax over the last dimension, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)
}
