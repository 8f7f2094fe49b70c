//! Calibrated NF4 quantization of the base: GPTQ rounding (`quant::gptq`) driven by the inputs
//! each linear layer sees on calibration text.
//!
//! Layer by layer, as GPTQ does: the calibration sequences' hidden states run through block `l`
//! on the dense weights while the inputs of its projection groups (q/k/v share one, o, gate/up
//! share one, down) are summed into `Σ x xᵀ`; the block's seven weights are rounded to NF4 with
//! those sums; then the hidden states run through the *quantized* block to become block `l + 1`'s
//! inputs, so later layers compensate for the rounding of earlier ones. The result is ordinary
//! bitsandbytes NF4 (same codebook, blocks and scales): it loads, serves, merges and saves like
//! `--quantize nf4`'s, only the codes and scales are chosen for the calibration data.

use crate::model::{LinearWeight, Llama, Proj};
use crate::quant::{gptq_nf4, GptqSettings, Hessian};
use crate::runtime::{block_forward, SeqInput};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::sync::Arc;

/// Sequences run through a block together.
const CHUNK: usize = 8;

/// How calibrated quantization runs.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct CalibrationSettings {
    pub gptq: GptqSettings,
}

/// What a calibrated quantization used.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CalibrationReport {
    pub sequences: usize,
    pub tokens: usize,
    pub layers: usize,
}

/// The projection whose input a group of projections shares.
fn input_group(p: Proj) -> Proj {
    match p {
        Proj::Q | Proj::K | Proj::V => Proj::Q,
        Proj::Gate | Proj::Up => Proj::Gate,
        other => other,
    }
}

/// Quantizes every linear weight of `llama` to NF4 with GPTQ rounding on `samples` (token ids of
/// whole sequences, each within the model's context). `progress(done, total)` is called after each
/// block. The model must still be dense.
pub fn quantize_calibrated(
    llama: &mut Llama,
    samples: &[Vec<u32>],
    settings: CalibrationSettings,
    progress: &dyn Fn(usize, usize),
) -> Result<CalibrationReport> {
    check_samples(llama, samples)?;
    if llama.nf4_settings().is_some() {
        bail!(
            "calibration: the model's linear weights are already NF4 (calibrate the dense model)"
        );
    }
    let chunks: Vec<&[Vec<u32>]> = samples.chunks(CHUNK).collect();
    let mut hidden = chunks
        .iter()
        .map(|c| {
            let ids: Vec<u32> = c.iter().flatten().copied().collect();
            let n = ids.len();
            llama
                .embed
                .index_select(&Tensor::from_vec(ids, n, llama.device())?, 0)
        })
        .collect::<candle_core::Result<Vec<Tensor>>>()?;
    let layers = llama.blocks.len();
    for l in 0..layers {
        let mut sums: Vec<(Proj, Hessian)> = Vec::new();
        for (chunk, x) in chunks.iter().zip(&hidden) {
            run_block(llama, l, chunk, x, &mut |p, t| {
                match sums.iter_mut().find(|(g, _)| *g == p) {
                    Some((_, h)) => h.add(t),
                    None => {
                        let mut h = Hessian::new(t.dim(1)?);
                        let r = h.add(t);
                        sums.push((p, h));
                        r
                    }
                }
                .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
            })?;
        }
        round_block(llama, l, &sums, settings)
            .with_context(|| format!("calibration: layer {l}"))?;
        for (chunk, x) in chunks.iter().zip(hidden.iter_mut()) {
            *x = run_block(llama, l, chunk, x, &mut |_, _| Ok(()))?;
        }
        progress(l + 1, layers);
    }
    Ok(CalibrationReport {
        sequences: samples.len(),
        tokens: samples.iter().map(Vec::len).sum(),
        layers,
    })
}

fn check_samples(llama: &Llama, samples: &[Vec<u32>]) -> Result<()> {
    if samples.is_empty() {
        bail!("calibration: no sequences to calibrate on");
    }
    let vocab = llama.cfg.vocab_size;
    for (i, s) in samples.iter().enumerate() {
        if s.is_empty() || s.len() > llama.max_context() {
            bail!(
                "calibration: sequence {i} has {} tokens (needs 1..={})",
                s.len(),
                llama.max_context()
            );
        }
        if let Some(bad) = s.iter().find(|&&t| t as usize >= vocab) {
            bail!("calibration: sequence {i} has token id {bad}, outside the vocabulary ({vocab})");
        }
    }
    Ok(())
}

/// Block `l` on one chunk's hidden states, each sequence from position 0 on a fresh cache.
fn run_block(
    llama: &Llama,
    l: usize,
    chunk: &[Vec<u32>],
    x: &Tensor,
    observe: &mut dyn FnMut(Proj, &Tensor) -> candle_core::Result<()>,
) -> Result<Tensor> {
    let mut caches: Vec<_> = chunk.iter().map(|_| llama.new_cache()).collect();
    let mut seqs: Vec<SeqInput<'_>> = chunk
        .iter()
        .zip(caches.iter_mut())
        .map(|(tokens, cache)| SeqInput {
            tokens,
            cache,
            lora: None,
        })
        .collect();
    Ok(block_forward(llama, l, x, &mut seqs, observe)?)
}

/// Rounds block `l`'s seven weights with their input groups' sums.
fn round_block(
    llama: &mut Llama,
    l: usize,
    sums: &[(Proj, Hessian)],
    s: CalibrationSettings,
) -> Result<()> {
    for p in Proj::ALL {
        let (_, h) = sums
            .iter()
            .find(|(g, _)| *g == input_group(p))
            .context("no calibration inputs were seen")?;
        let lin = &mut llama.blocks[l].proj[p.index()];
        let LinearWeight::Dense(w) = &lin.weight else {
            bail!("{} is already quantized", p.name());
        };
        let (rows, cols) = w.dims2()?;
        let data: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let packed = gptq_nf4(&data, rows, cols, h, &s.gptq)
            .with_context(|| format!("rounding {}", p.name()))?;
        lin.weight = LinearWeight::Nf4(Arc::new(packed));
    }
    Ok(())
}
