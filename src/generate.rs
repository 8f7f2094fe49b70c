//! One sequence's generation state — sampling, EOS and stop strings, max tokens, streaming text,
//! log-probabilities — and a simple driver that runs a single request to completion.
//!
//! `SequenceState` only sees logits rows, so the same code serves the CLI (`generate`) and the
//! server's batched engine.

use crate::lora::LoraStack;
use crate::model::LoadedModel;
use crate::runtime::{LogitsMode, SeqInput};
use crate::sampling::{logprobs, Sampler, SamplingParams, TokenLogprob};
use crate::tokenize::{StreamDecoder, TextTokenizer};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::sync::Arc;

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// Everything that decides how one sequence is generated.
#[derive(Clone, Debug)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Text that ends generation; it is not part of the output.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// How many top alternatives to report per token (0 = none).
    pub top_logprobs: usize,
    /// Report the chosen token's log-probability.
    pub logprobs: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            top_logprobs: 0,
            logprobs: false,
        }
    }
}

/// What one decoding step produced.
#[derive(Clone, Debug)]
pub struct StepOutput {
    pub token: u32,
    /// Text that became final with this step (may be empty while a UTF-8 character or a possible
    /// stop string is incomplete).
    pub text: String,
    /// The chosen token's log-probability and the top alternatives, when asked for.
    pub logprob: Option<(TokenLogprob, Vec<TokenLogprob>)>,
    pub finish: Option<FinishReason>,
}

/// The evolving state of one sequence's output.
pub struct SequenceState {
    params: GenerationParams,
    sampler: Sampler,
    eos_ids: Vec<u32>,
    decoder: Option<StreamDecoder>,
    /// Generated ids so far.
    pub ids: Vec<u32>,
    /// All decoded text so far (stop strings cut off).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    finish: Option<FinishReason>,
}

impl SequenceState {
    pub fn new(
        params: GenerationParams,
        eos_ids: Vec<u32>,
        tokenizer: Option<&TextTokenizer>,
    ) -> Result<Self> {
        if params.max_tokens == 0 {
            bail!("max_tokens must be at least 1");
        }
        if params.stop.iter().any(String::is_empty) {
            bail!("stop strings must not be empty");
        }
        if !params.stop.is_empty() && tokenizer.is_none() {
            bail!("stop strings need a tokenizer; this model has none");
        }
        Ok(Self {
            sampler: Sampler::new(&params.sampling)?,
            params,
            eos_ids,
            decoder: tokenizer.map(|t| StreamDecoder::new(t, true)),
            ids: Vec::new(),
            text: String::new(),
            emitted: 0,
            finish: None,
        })
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// The generated text so far (without stop strings).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Consumes one `[vocab]` row of logits: samples, updates text and finish state.
    pub fn step(&mut self, logits: &Tensor) -> Result<StepOutput> {
        if self.finish.is_some() {
            bail!("sequence already finished");
        }
        let token = self.sampler.sample(logits)?;
        let logprob = match self.params.logprobs || self.params.top_logprobs > 0 {
            true => Some(logprobs(logits, token, self.params.top_logprobs)?),
            false => None,
        };
        self.ids.push(token);
        let is_eos = !self.params.ignore_eos && self.eos_ids.contains(&token);
        if is_eos {
            self.finish = Some(FinishReason::Stop);
        } else if let Some(d) = self.decoder.as_mut() {
            if let Some(piece) = d.push(token)? {
                self.text.push_str(&piece);
            }
        }
        if self.finish.is_none() && self.ids.len() >= self.params.max_tokens {
            self.finish = Some(FinishReason::Length);
        }
        if self.finish.is_some() {
            if let Some(d) = self.decoder.as_mut() {
                if let Some(rest) = d.finish()? {
                    self.text.push_str(&rest);
                }
            }
        }
        let text = self.take_final_text();
        Ok(StepOutput {
            token,
            text,
            logprob,
            finish: self.finish,
        })
    }

    /// Applies stop strings and returns the newly final text.
    fn take_final_text(&mut self) -> String {
        let longest = self.params.stop.iter().map(String::len).max().unwrap_or(0);
        if longest > 0 {
            let mut from = self.emitted.saturating_sub(longest);
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            let hit = self
                .params
                .stop
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
                .min();
            if let Some(pos) = hit {
                self.text.truncate(pos.max(self.emitted));
                self.finish = Some(FinishReason::Stop);
            }
        }
        let mut end = self.text.len();
        if self.finish.is_none() {
            // Hold back a tail that may be the start of a stop string.
            for s in &self.params.stop {
                for k in (1..s.len().min(self.text.len() - self.emitted + 1)).rev() {
                    let cut = self.text.len() - k;
                    if self.text.is_char_boundary(cut) && s.starts_with(&self.text[cut..]) {
                        end = end.min(cut);
                        break;
                    }
                }
            }
        }
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}

/// The result of running one request to completion.
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// Per generated token: chosen logprob and top alternatives (when asked for).
    pub logprobs: Vec<(TokenLogprob, Vec<TokenLogprob>)>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Prompt tokens go through the model in chunks of this many (bounds activation memory).
pub const PREFILL_CHUNK: usize = 512;

/// Runs one prompt to completion on `model` with an optional LoRA stack, calling `on_text` with
/// each piece of final text as it is produced.
pub fn generate(
    model: &LoadedModel,
    prompt_ids: &[u32],
    lora: Option<Arc<LoraStack>>,
    params: GenerationParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let vocab = model.llama.cfg.vocab_size;
    if let Some(bad) = prompt_ids.iter().find(|&&t| t as usize >= vocab) {
        bail!("prompt token id {bad} is outside the vocabulary ({vocab})");
    }
    let ctx = model.llama.max_context();
    if prompt_ids.len() >= ctx {
        bail!(
            "the prompt has {} tokens; the model's context is {ctx}",
            prompt_ids.len()
        );
    }
    let mut params = params;
    params.max_tokens = params.max_tokens.min(ctx - prompt_ids.len());
    let mut state = SequenceState::new(params, model.eos_ids.clone(), model.tokenizer.as_ref())?;
    let mut cache = model.llama.new_cache();
    let t0 = std::time::Instant::now();
    let mut logits = None;
    for chunk in prompt_ids.chunks(PREFILL_CHUNK) {
        let mut seqs = [SeqInput {
            tokens: chunk,
            cache: &mut cache,
            lora: lora.clone(),
        }];
        logits = Some(crate::runtime::forward(
            &model.llama,
            &mut seqs,
            LogitsMode::Last,
        )?);
    }
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut all_logprobs = Vec::new();
    let mut row = match logits {
        Some(l) => l.squeeze(0)?,
        None => bail!("the prompt is empty"),
    };
    loop {
        let out = state.step(&row)?;
        if !out.text.is_empty() {
            on_text(&out.text);
        }
        if let Some(lp) = out.logprob {
            all_logprobs.push(lp);
        }
        if let Some(reason) = out.finish {
            return Ok(Generation {
                prompt_ids: prompt_ids.to_vec(),
                ids: state.ids.clone(),
                text: state.text().to_string(),
                finish_reason: reason,
                logprobs: all_logprobs,
                prefill_seconds,
                decode_seconds: t1.elapsed().as_secs_f64(),
            });
        }
        let tok = [out.token];
        let mut seqs = [SeqInput {
            tokens: &tok,
            cache: &mut cache,
            lora: lora.clone(),
        }];
        row = crate::runtime::forward(&model.llama, &mut seqs, LogitsMode::Last)?.squeeze(0)?;
    }
}
