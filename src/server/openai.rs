//! OpenAI wire types for requests, and their validation into engine parameters.

use super::defaults::SamplingDefaults;
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
    /// Accepted at their neutral value only (0 / empty): the sampler has no penalties or biases,
    /// and a request that relies on them is refused rather than silently answered without.
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
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

/// Parses a JSON body into `T`, answering 400 with serde's reason on failure. (Public for the
/// fuzz targets, with `ChatRequest`/`CompletionRequest` and `CommonParams::generation_params`.)
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
    /// Validates and converts sampling fields; those the request leaves out come from
    /// `defaults` (then OpenAI's). `prompt_len` and `ctx` bound `max_tokens` (a default one is
    /// cut to fit, a requested one that cannot fit is refused).
    pub fn generation_params(
        &self,
        defaults: &SamplingDefaults,
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
        let room = ctx - prompt_len;
        let max_tokens = match max_tokens {
            None => defaults
                .max_tokens
                .map_or(room, |m| usize::try_from(m).unwrap_or(room).clamp(1, room)),
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
        let temperature = self.temperature.or(defaults.temperature).unwrap_or(1.0);
        if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                Some("temperature"),
                format!("temperature must be between 0 and 2 (got {temperature})"),
            ));
        }
        let top_p = self.top_p.or(defaults.top_p).unwrap_or(1.0);
        if !(MIN_TOP_P..=1.0).contains(&top_p) {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("top_p must be in [{MIN_TOP_P}, 1] (got {top_p})"),
            ));
        }
        let top_k = match self.top_k.or(defaults.top_k) {
            None | Some(-1) | Some(0) => None,
            Some(k) if k < 0 => {
                return Err(ApiError::invalid(
                    Some("top_k"),
                    "top_k must be positive, or -1 to disable",
                ))
            }
            Some(k) => Some(k as usize),
        };
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            match v {
                None => {}
                Some(p) if !p.is_finite() || !(-2.0..=2.0).contains(&p) => {
                    return Err(ApiError::invalid(
                        Some(name),
                        format!("{name} must be between -2 and 2 (got {p})"),
                    ))
                }
                Some(p) if p != 0.0 => {
                    return Err(ApiError::invalid(
                        Some(name),
                        format!("{name} is not supported by this server (only 0)"),
                    ))
                }
                Some(_) => {}
            }
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::invalid(
                Some("logit_bias"),
                "logit_bias is not supported by this server (only an empty object)",
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::SequenceState;
    use candle_core::{Device, Tensor};

    /// Whatever `generation_params` accepts, the sampler takes without failing: extreme values
    /// of every field are either refused up front (400) or sample fine.
    #[test]
    fn accepted_sampling_values_never_fail_in_the_sampler() {
        let temps = [
            0.0, 1e-300, 1e-8, 1e-7, 1e-6, 0.5, 1.0, 2.0, 2.0001, -0.0, 1e308,
        ];
        let top_ps = [MIN_TOP_P, 1e-3, 0.5, 0.999_999, 1.0, 1.5, 0.0];
        let top_ks = [-2, -1, 0, 1, 2, 255, 256, 257, i64::MAX];
        let seeds = [0, 1, u64::MAX];
        let logits = Tensor::new(
            (0..256)
                .map(|i| ((i * 37) % 101) as f32 / 7.0 - 5.0)
                .collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        let (mut accepted, mut refused) = (0, 0);
        for &temperature in &temps {
            for &top_p in &top_ps {
                for &top_k in &top_ks {
                    for &seed in &seeds {
                        let p = CommonParams {
                            model: "m".into(),
                            temperature: Some(temperature),
                            top_p: Some(top_p),
                            top_k: Some(top_k),
                            seed: Some(seed),
                            ..Default::default()
                        };
                        match p.generation_params(
                            &SamplingDefaults::default(),
                            Some(4),
                            3,
                            256,
                            20,
                            true,
                        ) {
                            Err(e) => {
                                assert_eq!(e.status.as_u16(), 400);
                                refused += 1;
                            }
                            Ok(g) => {
                                let mut st = SequenceState::new(g, vec![], None).unwrap();
                                for _ in 0..4 {
                                    st.step(&logits).unwrap_or_else(|e| {
                                        panic!("{temperature} {top_p} {top_k} {seed}: {e:#}")
                                    });
                                }
                                accepted += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(accepted > 100 && refused > 100, "{accepted} {refused}");
    }

    #[test]
    fn penalties_and_logit_bias_only_at_their_neutral_value() {
        let with = |v: Value| -> Result<GenerationParams, ApiError> {
            let mut body = serde_json::json!({"model": "m", "prompt": "x"});
            for (k, x) in v.as_object().unwrap() {
                body[k] = x.clone();
            }
            let r: CompletionRequest = parse_body(body.to_string().as_bytes())?;
            r.common
                .generation_params(&SamplingDefaults::default(), Some(2), 1, 16, 0, false)
        };
        for ok in [
            serde_json::json!({"frequency_penalty": 0}),
            serde_json::json!({"presence_penalty": 0.0, "logit_bias": {}}),
        ] {
            assert!(with(ok.clone()).is_ok(), "{ok}");
        }
        for bad in [
            serde_json::json!({"frequency_penalty": 0.5}),
            serde_json::json!({"presence_penalty": -3}),
            serde_json::json!({"presence_penalty": "x"}),
            serde_json::json!({"logit_bias": {"5": 100}}),
            serde_json::json!({"logit_bias": [1]}),
        ] {
            let e = with(bad.clone()).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{bad}");
        }
    }
}
