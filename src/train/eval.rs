//! `loraplex eval`: held-out loss and perplexity (teacher-forced, response tokens only), greedy
//! exact match and format-match rate (a regex per dataset), for the base and an adapter.

use super::data::{self, Example, Method, Tokenized};
use crate::generate::{generate, GenerationParams};
use crate::lora::LoraStack;
use crate::model::{llama::log_softmax, LoadedModel};
use crate::runtime::{LogitsMode, SeqInput};
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;

/// Scores of one model variant on one dataset.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    pub label: String,
    pub examples: usize,
    pub loss: f64,
    pub perplexity: f64,
    pub exact_match: f64,
    /// `None` without a format regex.
    pub format_match: Option<f64>,
}

/// Mean response-token NLL of `t` under the model (+ LoRA), and the token count.
fn nll(model: &LoadedModel, t: &Tokenized, lora: &Option<Arc<LoraStack>>) -> Result<(f64, usize)> {
    let mut cache = model.llama.new_cache();
    let mut seqs = [SeqInput {
        tokens: &t.ids,
        cache: &mut cache,
        lora: lora.clone(),
    }];
    let lp: Vec<Vec<f32>> = log_softmax(&crate::runtime::forward(
        &model.llama,
        &mut seqs,
        LogitsMode::All,
    )?)?
    .to_vec2()?;
    let (mut sum, mut n) = (0f64, 0usize);
    for pos in 1..t.ids.len() {
        if t.mask[pos] {
            sum -= lp[pos - 1][t.ids[pos] as usize] as f64;
            n += 1;
        }
    }
    Ok((sum, n))
}

/// Evaluates `model` with `lora` on an SFT dataset.
pub fn evaluate(
    model: &LoadedModel,
    lora: Option<Arc<LoraStack>>,
    label: &str,
    data_path: &Path,
    format: Option<&regex::Regex>,
    max_tokens: usize,
    limit: Option<usize>,
) -> Result<EvalReport> {
    let tok = model.tokenizer()?;
    let ds = data::load(
        data_path,
        tok,
        Method::Sft,
        model.llama.max_context().min(2048),
        false,
    )?;
    let examples: Vec<&Tokenized> = ds
        .examples
        .iter()
        .filter_map(|e| match e {
            Example::Sft(t) => Some(t),
            Example::Dpo { .. } => None,
        })
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    let (mut loss_sum, mut tokens, mut exact, mut fmt) = (0.0, 0usize, 0usize, 0usize);
    for t in &examples {
        let (s, n) = nll(model, t, &lora)?;
        loss_sum += s;
        tokens += n;
        // The prompt is everything before the first response token.
        let first = t
            .mask
            .iter()
            .position(|&m| m)
            .context("example without response tokens")?;
        let reference: Vec<u32> = t
            .ids
            .iter()
            .zip(&t.mask)
            .filter(|(_, m)| **m)
            .map(|(i, _)| *i)
            .collect();
        let reference = tok.decode(&reference, true)?.trim().to_string();
        let params = GenerationParams {
            max_tokens,
            ..Default::default()
        };
        let out = generate(model, &t.ids[..first], lora.clone(), params, |_| {})?;
        let answer = out.text.trim();
        exact += (answer == reference) as usize;
        if let Some(re) = format {
            fmt += re.is_match(answer) as usize;
        }
    }
    let n = examples.len().max(1) as f64;
    let loss = loss_sum / tokens.max(1) as f64;
    Ok(EvalReport {
        label: label.to_string(),
        examples: examples.len(),
        loss,
        perplexity: loss.exp(),
        exact_match: exact as f64 / n,
        format_match: format.map(|_| fmt as f64 / n),
    })
}
