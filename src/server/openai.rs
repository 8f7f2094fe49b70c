//! OpenAI wire types for requests, and their validation into engine parameters.

use super::errors::ApiError;
use crate::generate::GenerationParams;
use crate::sampling::{SamplingParams, MIN_TOP_P};
use serde::Deserialize;
use serde_json::Value;

/// `stop`: a string or a list of strings.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

/// One entry of the `adapters` body extension.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AdapterRef {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Message content: a string or a list of parts (text parts only).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// Sampling fields shared by both endpoints.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct CommonParams {
    pub model: String,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<StopSpec>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// loraplex extension: a weighted stack of adapters.
    #[serde(default)]
    pub adapters: Option<Vec<AdapterRef>>,
    /// loraplex extension: how `adapters` combine (PEFT's `combination_type`; absent or `cat`:
    /// the weighted stack).
    #[serde(default)]
    pub combination: Option<String>,
    /// The combination's pruning density, in (0, 1].
    #[serde(default)]
    pub density: Option<f64>,
    /// The rank of an `_svd` combination.
    #[serde(default)]
    pub svd_rank: Option<i64>,
    /// TIES' sign election: `total` or `frequency`.
    #[serde(default)]
    pub majority_sign_method: Option<String>,
    /// The seed of a `dare_*` combination's masks.
    #[serde(default)]
    pub combination_seed: Option<u64>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
}

/// `prompt`: text, or a list of token ids.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    pub prompt: PromptSpec,
    #[serde(default)]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: Option<bool>,
}

/// Parses a JSON body into `T`, answering 400 with serde's reason on failure.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid(
            None,
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(v).map_err(|e| ApiError::invalid(None, format!("invalid request: {e}")))
}

/// Most choices per request.
pub const MAX_N: i64 = 8;

impl CommonParams {
    /// Validates and converts sampling fields. `prompt_len` and `ctx` bound `max_tokens`.
    pub fn generation_params(
        &self,
        max_tokens: Option<i64>,
        prompt_len: usize,
        ctx: usize,
        top_logprobs: usize,
        logprobs: bool,
    ) -> Result<GenerationParams, ApiError> {
        if prompt_len == 0 {
            return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
        }
        if prompt_len >= ctx {
            return Err(ApiError::invalid(
                Some("messages"),
                format!("the prompt has {prompt_len} tokens; the model's context is {ctx} tokens"),
            ));
        }
        let max_tokens = match max_tokens {
            None => ctx - prompt_len,
            Some(m) if m <= 0 => {
                return Err(ApiError::invalid(Some("max_tokens"), format!("max_tokens must be at least 1 (got {m})")))
            }
            // Compared without adding, so that no max_tokens can overflow past the check.
            Some(m) if m > ctx.saturating_sub(prompt_len) as i64 => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    format!(
                        "prompt ({prompt_len} tokens) + max_tokens ({m}) exceeds the model's context of {ctx} tokens"
                    ),
                ))
            }
            Some(m) => m as usize,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                Some("temperature"),
                format!("temperature must be between 0 and 2 (got {temperature})"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(MIN_TOP_P..=1.0).contains(&top_p) {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("top_p must be in [{MIN_TOP_P}, 1] (got {top_p})"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k < 0 => {
                return Err(ApiError::invalid(
                    Some("top_k"),
                    "top_k must be positive, or -1 to disable",
                ))
            }
            Some(k) => Some(k as usize),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopSpec::One(s)) => vec![s.clone()],
            Some(StopSpec::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                Some("stop"),
                "stop takes up to 4 non-empty strings",
            ));
        }
        Ok(GenerationParams {
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                seed: self.seed.unwrap_or(0),
            },
            max_tokens,
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            top_logprobs,
            logprobs,
        })
    }

    /// `n`, validated.
    pub fn choices(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) {
            n if (1..=MAX_N).contains(&n) => Ok(n as usize),
            n => Err(ApiError::invalid(
                Some("n"),
                format!("n must be between 1 and {MAX_N} (got {n})"),
            )),
        }
    }
}

impl ChatMessageIn {
    /// The message's text (text parts joined).
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(s)) => Ok(s.clone()),
            Some(Content::Parts(parts)) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                Some("messages"),
                                format!(
                                    "content parts of type `{kind}` are not supported (text only)"
                                ),
                            ))
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}
