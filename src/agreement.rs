//! Greedy agreement with a reference model: how closely a changed base (quantized, merged,
//! perturbed) follows the original's greedy answers. Used by the NF4 quality tests and by
//! `cargo bench --bench agreement`.
//!
//! Three views of the same answers: *free-running* (each model continues its own answer; one
//! different token early on usually makes the rest differ), *teacher-forced* (each position sees
//! the reference answer so far, so every choice is compared in the same context), and the
//! length of the common prefix (how far the answers go before they part).

use crate::generate::{generate, GenerationParams};
use crate::model::LoadedModel;
use crate::runtime::{LogitsMode, SeqInput};
use crate::tokenize::ChatMessage;
use anyhow::{bail, Result};
use candle_core::D;

/// Short chat requests of several kinds (facts, advice, legal, creative, arithmetic, science,
/// medical, code, summary): the prompt set of the NF4 quality test and `benches/agreement.rs`.
pub const CHAT_PROMPTS: [&str; 10] = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a contract is in one sentence.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Why is the sky blue?",
    "Name two symptoms of the flu.",
    "How do I reverse a list in Python?",
    "What does a lawyer do?",
    "Summarize the plot of Romeo and Juliet.",
];

/// How a model's greedy answers compare with reference answers.
#[derive(Clone, Debug, PartialEq)]
pub struct Agreement {
    /// Share of equal tokens at equal positions, free-running.
    pub free: f64,
    /// Share of equal next-token choices, teacher-forced on the reference answers.
    pub forced: f64,
    /// Answers whose first token is the reference's.
    pub first: usize,
    /// Mean length of the common prefix of the free-running answers, in tokens.
    pub mean_prefix: f64,
    /// Answers compared.
    pub answers: usize,
}

/// Each user message through the model's chat template (with the generation prompt), as ids.
pub fn chat_prompts(m: &LoadedModel, messages: &[&str]) -> Result<Vec<Vec<u32>>> {
    let tok = m.tokenizer()?;
    messages
        .iter()
        .map(|p| {
            let text = tok.apply_chat_template(&[ChatMessage::new("user", *p)], true)?;
            tok.encode(&text, false)
        })
        .collect()
}

/// `max_tokens` greedy tokens for each prompt, end-of-sequence ignored (so every answer has the
/// same length).
pub fn greedy_answers(
    m: &LoadedModel,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .map(|ids| {
            let params = GenerationParams {
                max_tokens,
                ignore_eos: true,
                ..Default::default()
            };
            Ok(generate(m, ids, None, params, |_| {})?.ids)
        })
        .collect()
}

/// The model's greedy choice at each position of `answer` when fed `prompt` and the answer so
/// far (one forward pass over the whole sequence).
pub fn forced_choices(m: &LoadedModel, prompt: &[u32], answer: &[u32]) -> Result<Vec<u32>> {
    if prompt.is_empty() || answer.is_empty() {
        bail!("forced choices need a prompt and an answer");
    }
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(&answer[..answer.len() - 1]);
    let mut cache = m.llama.new_cache();
    let mut seqs = [SeqInput {
        tokens: &ids,
        cache: &mut cache,
        lora: None,
    }];
    let choices: Vec<u32> = crate::runtime::forward(&m.llama, &mut seqs, LogitsMode::All)?
        .argmax(D::Minus1)?
        .to_vec1()?;
    Ok(choices[prompt.len() - 1..].to_vec())
}

/// Compares `m`'s greedy answers to `prompts` with `reference` (another model's greedy answers
/// to the same prompts, e.g. from [`greedy_answers`]).
pub fn agreement(
    m: &LoadedModel,
    prompts: &[Vec<u32>],
    reference: &[Vec<u32>],
) -> Result<Agreement> {
    if prompts.len() != reference.len() || reference.is_empty() {
        bail!(
            "agreement needs one reference answer per prompt ({} prompts, {} answers)",
            prompts.len(),
            reference.len()
        );
    }
    let max_tokens = reference.iter().map(Vec::len).max().unwrap_or(0);
    let free = greedy_answers(m, prompts, max_tokens)?;
    let forced = prompts
        .iter()
        .zip(reference)
        .map(|(p, a)| forced_choices(m, p, a))
        .collect::<Result<Vec<_>>>()?;
    let prefix: usize = reference
        .iter()
        .zip(&free)
        .map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count())
        .sum();
    Ok(Agreement {
        free: share_equal(reference, &free),
        forced: share_equal(reference, &forced),
        first: reference
            .iter()
            .zip(&forced)
            .filter(|(a, b)| a.first() == b.first())
            .count(),
        mean_prefix: prefix as f64 / reference.len() as f64,
        answers: reference.len(),
    })
}

/// Share of positions where `a` and `b` hold the same token (over `a`'s tokens).
pub fn share_equal(a: &[Vec<u32>], b: &[Vec<u32>]) -> f64 {
    let total: usize = a.iter().map(Vec::len).sum();
    let same: usize = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p == q).count())
        .sum();
    if total == 0 {
        return 0.0;
    }
    same as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_equal_counts_positions() {
        let a = vec![vec![1, 2, 3, 4], vec![5, 6]];
        let b = vec![vec![1, 9, 3, 4], vec![0, 6]];
        assert_eq!(share_equal(&a, &b), 4.0 / 6.0);
        assert_eq!(share_equal(&[], &[]), 0.0);
    }
}
