//! The delta math: a weighted stack of adapters applied unmerged to rows, or merged into the base.
//!
//! A stack `Σ_i w_i s_i B_i A_i` is stored concatenated along the rank — `A = [A_1; A_2; ...]`,
//! `B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...]` — so applying any stack to a group of rows costs two
//! small matmuls per module (`(x A^T) B^T`), however many adapters it holds (PEFT's "cat").

use super::adapter::LoraAdapter;
use super::AdapterSpec;
use crate::model::{Llama, Placement, Proj};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

/// Moves every pair's `a` and `bt` into one 1-D buffer (same device and dtype) and makes them
/// views of it, recording where each lies.
fn flatten(layers: &mut [[Option<LoraPair>; 7]]) -> Result<Tensor> {
    let mut pieces = Vec::new();
    let mut at = 0;
    for pair in layers.iter_mut().flatten().flatten() {
        let (a_len, bt_len) = (pair.a.elem_count(), pair.bt.elem_count());
        pieces.push(pair.a.flatten_all()?);
        pieces.push(pair.bt.flatten_all()?);
        pair.flat = Some(FlatSpans {
            a: at..at + a_len,
            bt: at + a_len..at + a_len + bt_len,
        });
        at += a_len + bt_len;
    }
    if pieces.is_empty() {
        return Ok(Tensor::zeros(0, DType::F32, &candle_core::Device::Cpu)?);
    }
    let flat = Tensor::cat(&pieces, 0)?;
    for pair in layers.iter_mut().flatten().flatten() {
        let Some(spans) = &pair.flat else { continue };
        let a = flat
            .narrow(0, spans.a.start, spans.a.len())?
            .reshape(pair.a.dims())?;
        let bt = flat
            .narrow(0, spans.bt.start, spans.bt.len())?
            .reshape(pair.bt.dims())?;
        pair.b = bt.t()?;
        pair.a = a;
        pair.bt = bt;
    }
    Ok(flat)
}

/// What to tell the user after `LoraStack::merge_into` re-quantized `weights` NF4 weights.
pub fn requantize_warning(weights: usize) -> Option<String> {
    (weights > 0).then(|| {
        format!(
            "the base is NF4-quantized: {weights} merged weights were dequantized, summed with \
             the adapter and quantized again; the merged model carries a second rounding error and \
             small adapter deltas can vanish in it. Merge into the unquantized base and quantize \
             afterwards (--quantize nf4) to avoid this."
        )
    })
}

/// The concatenated low-rank pair of one module for one stack.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// `[R, in]`, R = sum of member ranks.
    pub a: Tensor,
    /// `[out, R]`, each member's columns pre-multiplied by `weight * scaling`: the transposed
    /// view of `bt`.
    pub b: Tensor,
    /// `B^T: [R, out]`, contiguous: the layout the fast decode path reads (`y += Σ_r t_r B[:, r]`
    /// along contiguous rows), kept so that no call builds the view again.
    pub bt: Tensor,
    /// Where `a` and `bt` lie in the stack's one buffer (`LoraStack::flat`), when it has one.
    pub flat: Option<FlatSpans>,
}

/// Element ranges of a pair's `a` and `bt` in its stack's flat buffer.
#[derive(Clone, Debug)]
pub struct FlatSpans {
    pub a: Range<usize>,
    pub bt: Range<usize>,
}

impl LoraPair {
    /// `x (B A)^T` for rows `x: [n, in]`, computed as `(x A^T) B^T` without forming `B A`.
    pub fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)
    }

    /// The dense `[out, in]` weight delta (for merging).
    pub fn dense(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)
    }
}

/// An active adapter set (one adapter, or a weighted stack), ready for the forward pass.
#[derive(Debug)]
pub struct LoraStack {
    /// `(adapter, weight)` in the order given.
    pub members: Vec<(Arc<LoraAdapter>, f64)>,
    /// Indexed `[layer][proj.index()]`.
    layers: Vec<[Option<LoraPair>; 7]>,
    /// On the CPU in f32: every pair's `a` and `bt` in one 1-D buffer, layer by layer (each pair
    /// a view into it), so the CPU fast path takes one read lock per stack and forward call
    /// instead of two per pair and layer (with 32 r16 all-linear adapters in a step, ~13,000 of
    /// them, each a few cache misses on tensor metadata).
    flat: Option<Tensor>,
}

impl LoraStack {
    /// Builds the stack for a base of `num_layers` layers, f32 on the CPU. Weights must be finite.
    pub fn new(members: Vec<(Arc<LoraAdapter>, f64)>, num_layers: usize) -> Result<Self> {
        Self::new_on(members, num_layers, &Placement::cpu())
    }

    /// Builds the stack for a base of `num_layers` layers whose weights are stored as `at` says:
    /// the concatenated pairs live on that device in that dtype (the scaled sums are formed in
    /// f32 first). Weights must be finite.
    pub fn new_on(
        members: Vec<(Arc<LoraAdapter>, f64)>,
        num_layers: usize,
        at: &Placement,
    ) -> Result<Self> {
        if members.is_empty() {
            bail!("an adapter stack needs at least one adapter");
        }
        let mut parts: BTreeMap<(usize, Proj), (Vec<Tensor>, Vec<Tensor>)> = BTreeMap::new();
        for (adapter, weight) in &members {
            if !weight.is_finite() {
                bail!(
                    "adapter `{}`: weight {weight} is not a finite number",
                    adapter.name
                );
            }
            for (&(layer, proj), m) in &adapter.modules {
                if layer >= num_layers {
                    bail!(
                        "adapter `{}` has layer {layer}; the base has {num_layers}",
                        adapter.name
                    );
                }
                let entry = parts.entry((layer, proj)).or_default();
                entry.0.push(m.a.clone());
                entry.1.push((&m.b * (weight * m.scaling))?);
            }
        }
        let mut layers: Vec<[Option<LoraPair>; 7]> =
            (0..num_layers).map(|_| Default::default()).collect();
        for ((layer, proj), (a, b)) in parts {
            let bt = at.put(&Tensor::cat(&b, 1)?.t()?.contiguous()?)?;
            layers[layer][proj.index()] = Some(LoraPair {
                a: at.put(&Tensor::cat(&a, 0)?)?.contiguous()?,
                b: bt.t()?,
                bt,
                flat: None,
            });
        }
        let flat = match at.device.is_cpu() && at.dtype == DType::F32 {
            true => Some(flatten(&mut layers)?),
            false => None,
        };
        // On a GPU the copies were queued on this thread's stream; the engine reads the stack
        // on another thread's, so they must be done before the stack is handed over.
        at.device.synchronize()?;
        Ok(Self {
            members,
            layers,
            flat,
        })
    }

    /// A stack of one adapter at weight 1.
    pub fn single(adapter: Arc<LoraAdapter>, num_layers: usize) -> Result<Self> {
        Self::new(vec![(adapter, 1.0)], num_layers)
    }

    /// Loads `DIR[:WEIGHT]` adapters, validates each against `base` and stacks them on the
    /// base's device and dtype; `None` when no adapter is given.
    pub fn load(base: &Llama, specs: &[AdapterSpec]) -> Result<Option<Arc<Self>>> {
        if specs.is_empty() {
            return Ok(None);
        }
        let mut members = Vec::with_capacity(specs.len());
        for s in specs {
            let adapter = LoraAdapter::load(&s.name()?, &s.dir, &base.cfg)?;
            members.push((Arc::new(adapter), s.weight));
        }
        let stack = Self::new_on(members, base.cfg.num_hidden_layers, &base.placement())?;
        Ok(Some(Arc::new(stack)))
    }

    /// Bytes held by the stack's own pairs (on its device; the members' host tensors are
    /// counted by `LoraAdapter::bytes`).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|p| (p.a.elem_count() + p.b.elem_count()) * p.a.dtype().size_in_bytes())
            .sum()
    }

    /// The one buffer holding every pair (CPU, f32), which `LoraPair::flat` indexes.
    pub fn flat(&self) -> Option<&Tensor> {
        self.flat.as_ref()
    }

    /// Whether the pairs live on the CPU.
    pub fn on_cpu(&self) -> bool {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .all(|p| p.a.device().is_cpu())
    }

    pub fn pair(&self, layer: usize, proj: Proj) -> Option<&LoraPair> {
        self.layers.get(layer)?[proj.index()].as_ref()
    }

    /// A readable label such as `legal` or `legal*0.7+chatbot*0.5`.
    pub fn label(&self) -> String {
        self.members
            .iter()
            .map(|(a, w)| {
                if *w == 1.0 {
                    a.name.clone()
                } else {
                    format!("{}*{w}", a.name)
                }
            })
            .collect::<Vec<_>>()
            .join("+")
    }

    /// A label from a bounded set, for metrics: the members' names, sorted and deduplicated,
    /// joined by `+` (weights left out: every weight would otherwise be a new series).
    pub fn names_label(&self) -> String {
        let mut names: Vec<&str> = self.members.iter().map(|(a, _)| a.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.join("+")
    }

    /// Merges the stack into the base: `W' = W + Σ_i w_i s_i B_i A_i` for every targeted module.
    /// An NF4 weight is dequantized, summed and quantized again, which rounds the merged weight
    /// to the 4-bit grid: returns how many weights that happened to (callers warn about it).
    pub fn merge_into(&self, model: &mut Llama) -> Result<usize> {
        let mut requantized = 0;
        for (layer, projs) in self.layers.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(pair) = &projs[p.index()] {
                    requantized += model.add_to_weight(layer, p, &pair.dense()?)? as usize;
                }
            }
        }
        Ok(requantized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::synthetic::synthetic_adapter;
    use crate::model::dummy;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// On the CPU a stack's pairs are views into its one flat buffer, each where its spans say,
    /// holding the concatenated `A` and the scaled `B^T` of its members (2 adapters of different
    /// ranks and targets, weights 0.7 and -0.5).
    #[test]
    fn cpu_pairs_live_in_the_flat_buffer() {
        let cfg = dummy::config("tiny").unwrap();
        let at = Placement::cpu();
        let a = Arc::new(synthetic_adapter("a", &cfg, 4, &Proj::ALL, 0.3, &at).unwrap());
        let b = Arc::new(synthetic_adapter("b", &cfg, 8, &[Proj::Q, Proj::V], 0.3, &at).unwrap());
        let layers = cfg.num_hidden_layers;
        let stack = LoraStack::new(vec![(a.clone(), 0.7), (b.clone(), -0.5)], layers).unwrap();
        let flat = values(stack.flat().expect("a CPU f32 stack has a flat buffer"));
        let mut covered = 0;
        for l in 0..layers {
            for p in Proj::ALL {
                let Some(pair) = stack.pair(l, p) else {
                    continue;
                };
                let spans = pair.flat.as_ref().expect("spans of a CPU pair");
                assert_eq!(values(&pair.a), flat[spans.a.clone()]);
                assert_eq!(values(&pair.bt), flat[spans.bt.clone()]);
                assert!(pair.a.is_contiguous() && pair.bt.is_contiguous());
                covered += spans.a.len() + spans.bt.len();
                // The members' own factors, in order along the rank.
                let members: Vec<(&LoraAdapter, f64)> = [(&*a, 0.7), (&*b, -0.5)]
                    .into_iter()
                    .filter(|(m, _)| m.modules.contains_key(&(l, p)))
                    .collect();
                let want_a: Vec<f32> = members
                    .iter()
                    .flat_map(|(m, _)| values(&m.modules[&(l, p)].a))
                    .collect();
                assert_eq!(values(&pair.a), want_a);
                let want_bt: Vec<f32> = members
                    .iter()
                    .flat_map(|(m, w)| {
                        let module = &m.modules[&(l, p)];
                        let scaled = (&module.b * (w * module.scaling)).unwrap();
                        values(&scaled.t().unwrap().contiguous().unwrap())
                    })
                    .collect();
                assert_eq!(values(&pair.bt), want_bt);
                assert_eq!(values(&pair.b.t().unwrap()), want_bt);
            }
        }
        assert_eq!(covered, flat.len());
    }
}
