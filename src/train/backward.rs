//! The LoRA gradients of one micro-batch's loss, two ways with the same result:
//!
//! - whole graph: candle's `backward` over the full forward, which keeps every block's
//!   activations (attention probabilities included) alive until the backward ends;
//! - gradient checkpointing (per block): a forward without a graph keeps only each block's input
//!   `[B*T, hidden]`; the loss head runs on the last block's output as a leaf, and then each block,
//!   last to first, is run again from its saved input with the LoRA weights tracked and
//!   back-propagated alone (`Σ y ⊙ dL/dy`), which hands the gradient of its input to the block
//!   before. Dropout replays each block's masks from a copy of the generator taken before it.
//!   One block's graph lives at a time, for the price of a second forward.

use super::forward::{
    loss_from_hidden, reference_logprobs, Dropout, LoraIn, Objective, PackedBatch, TrainBase,
};
use super::optim::grads_of;
use super::params::LoraParams;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor, TensorId, Var};
use std::collections::HashMap;

/// The loss divided by `norm` (its value) and the gradients of `lora.vars()` (in that order).
pub fn loss_and_grads(
    base: &TrainBase,
    lora: &LoraParams,
    batch: &PackedBatch,
    objective: Objective,
    norm: f64,
    dropout: Option<&mut Dropout>,
    checkpointing: bool,
) -> Result<(f64, Vec<Tensor>)> {
    let reference = match objective {
        Objective::Dpo { .. } => Some(reference_logprobs(base, batch)?),
        Objective::Sft => None,
    };
    let head = |h: &Tensor| -> Result<Tensor> {
        Ok((loss_from_hidden(base, h, batch, objective, reference.as_ref())? / norm)?)
    };
    if checkpointing {
        checkpointed(base, lora, batch, dropout, &head)
    } else {
        let tracked = LoraIn {
            params: lora,
            grad: true,
        };
        let h = super::forward::hidden_states_with(base, Some(tracked), &batch.ids, dropout)?;
        let loss = head(&h)?;
        let grads = grads_of(&loss.backward()?, &lora.vars())?;
        Ok((scalar(&loss)?, grads))
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Gradient checkpointing per block (see the module doc).
fn checkpointed(
    base: &TrainBase,
    lora: &LoraParams,
    batch: &PackedBatch,
    mut dropout: Option<&mut Dropout>,
    head: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<(f64, Vec<Tensor>)> {
    let (b, t) = batch.ids.dims2()?;
    let ctx = base.block_context(b, t)?;
    let (untracked, tracked) = (
        LoraIn {
            params: lora,
            grad: false,
        },
        LoraIn {
            params: lora,
            grad: true,
        },
    );
    // Forward without a graph: each block's input and the dropout generator before it.
    let mut saved: Vec<(Tensor, Option<Dropout>)> = Vec::with_capacity(base.num_layers());
    let mut x = base.embed(&batch.ids)?;
    for l in 0..base.num_layers() {
        let before = dropout.as_deref().cloned();
        let y = base.block(l, &x, Some(untracked), &ctx, dropout.as_deref_mut())?;
        saved.push((x, before));
        x = y;
    }
    // The loss head on the last block's output as a leaf.
    let (loss, mut grad) = {
        let top = Var::from_tensor(&x)?;
        let loss = head(&base.final_norm(top.as_tensor())?)?;
        let store = loss.backward()?;
        let grad = match store.get(top.as_tensor()) {
            Some(g) => g.clone(),
            None => x.zeros_like()?,
        };
        (scalar(&loss)?, grad)
    };
    drop(x);
    // Blocks last to first: recompute with the LoRA weights tracked, back-propagate `grad`.
    let vars = lora.vars();
    let mut found: HashMap<TensorId, Tensor> = HashMap::new();
    for l in (0..base.num_layers()).rev() {
        let (input, mut replay) = saved.pop().context("a block input is missing")?;
        let input = Var::from_tensor(&input)?;
        let y = base.block(l, input.as_tensor(), Some(tracked), &ctx, replay.as_mut())?;
        let store = (y * &grad)?.sum_all()?.backward()?;
        for v in &vars {
            if let Some(g) = store.get(v.as_tensor()) {
                found.insert(v.as_tensor().id(), g.clone());
            }
        }
        grad = match store.get(input.as_tensor()) {
            Some(g) => g.clone(),
            None => grad.zeros_like()?,
        };
    }
    let grads = vars
        .iter()
        .map(|v| match found.remove(&v.as_tensor().id()) {
            Some(g) => Ok(g),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((loss, grads))
}
