//! `POST /v1/chat/completions` and `POST /v1/completions`: validate, resolve the adapter set,
//! tokenize, submit one engine sequence per choice, then answer as JSON or as an SSE stream.

use super::errors::ApiError;
use super::openai::{parse_body, ChatRequest, CommonParams, CompletionRequest, PromptSpec};
use super::resolve::resolve;
use super::stream::{collect, sse_response, Choice, Flavor, Job};
use super::Shared;
use crate::engine::{EngineRequest, SubmitError};
use crate::generate::GenerationParams;
use crate::tokenize::ChatMessage;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Instant;

/// Most alternatives per position in `top_logprobs` / `logprobs`.
const MAX_TOP_LOGPROBS: i64 = 20;

fn count_error(state: &Shared, label: &str, e: &ApiError) {
    state
        .metrics
        .requests
        .with_label_values(&[label, e.status.as_str()])
        .inc();
    tracing::info!(adapter = label, status = e.status.as_u16(), error = %e.message, "request refused");
}

/// Counts a request as `cancelled` when its handler is dropped before answering (the client went
/// away; hyper drops the future). Streams count their own ending in `stream`.
struct Pending {
    state: Shared,
    /// `unresolved` until the adapter set is known.
    label: String,
    started: Instant,
    armed: bool,
}

impl Pending {
    fn new(state: &Shared) -> Self {
        Self {
            state: state.clone(),
            label: "unresolved".into(),
            started: Instant::now(),
            armed: true,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            self.state
                .metrics
                .requests
                .with_label_values(&[self.label.as_str(), "cancelled"])
                .inc();
            tracing::info!(
                adapter = %self.label,
                latency_ms = self.started.elapsed().as_millis() as u64,
                status = "cancelled",
                "request"
            );
        }
    }
}

pub async fn chat(State(state): State<Shared>, body: Bytes) -> Response {
    let mut pending = Pending::new(&state);
    let resp = match chat_inner(&state, &body, &mut pending.label).await {
        Ok(r) => r,
        Err((label, e)) => {
            count_error(&state, &label, &e);
            e.into_response()
        }
    };
    pending.armed = false;
    resp
}

pub async fn completion(State(state): State<Shared>, body: Bytes) -> Response {
    let mut pending = Pending::new(&state);
    let resp = match completion_inner(&state, &body, &mut pending.label).await {
        Ok(r) => r,
        Err((label, e)) => {
            count_error(&state, &label, &e);
            e.into_response()
        }
    };
    pending.armed = false;
    resp
}

type Failure = (String, ApiError);

fn label_err(label: &str) -> impl Fn(ApiError) -> Failure + '_ {
    move |e| (label.to_string(), e)
}

async fn chat_inner(
    state: &Shared,
    body: &[u8],
    pending_label: &mut String,
) -> Result<Response, Failure> {
    let req: ChatRequest = parse_body(body).map_err(label_err("invalid"))?;
    let resolved = resolve(state, &req.common)
        .await
        .map_err(label_err("invalid"))?;
    let label = resolved.label.clone();
    pending_label.clone_from(&label);
    let fail = label_err(&label);
    let tok = state.model.tokenizer.as_ref().ok_or_else(|| {
        fail(ApiError::invalid(
            None,
            "this model has no tokenizer; use /v1/completions with token ids",
        ))
    })?;
    if req.messages.is_empty() {
        return Err(fail(ApiError::invalid(
            Some("messages"),
            "messages must not be empty",
        )));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if !["system", "user", "assistant", "developer"].contains(&m.role.as_str()) {
            return Err(fail(ApiError::invalid(
                Some("messages"),
                format!(
                    "message role `{}` is not supported (system, user, assistant)",
                    m.role
                ),
            )));
        }
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role.clone()
        };
        messages.push(ChatMessage {
            role,
            content: m.text().map_err(&fail)?,
        });
    }
    let rendered = tok.apply_chat_template(&messages, true).map_err(|e| {
        fail(ApiError::invalid(
            Some("messages"),
            format!("chat template: {e:#}"),
        ))
    })?;
    let prompt_ids = tok
        .encode(&rendered, false)
        .map_err(|e| fail(ApiError::internal(format!("tokenizer: {e:#}"))))?;
    let top = req.top_logprobs.unwrap_or(0);
    if !(0..=MAX_TOP_LOGPROBS).contains(&top) {
        return Err(fail(ApiError::invalid(
            Some("top_logprobs"),
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
        )));
    }
    let logprobs = req.logprobs.unwrap_or(false);
    if top > 0 && !logprobs {
        return Err(fail(ApiError::invalid(
            Some("top_logprobs"),
            "top_logprobs needs logprobs: true",
        )));
    }
    let max = req.max_completion_tokens.or(req.common.max_tokens);
    let params = req
        .common
        .generation_params(
            &state.sampling,
            max,
            prompt_ids.len(),
            state.model.llama.max_context(),
            top as usize,
            logprobs,
        )
        .map_err(&fail)?;
    let params = fit_default_to_kv(state, max, prompt_ids.len(), params);
    let job = Job {
        flavor: Flavor::Chat,
        echo: None,
        model: req.common.model.clone(),
        label: label.clone(),
        prompt_logprobs: None,
        prompt_only: false,
    };
    run(state, &req.common, prompt_ids, params, resolved.lora, job)
        .await
        .map_err(fail)
}

/// A `max_tokens` the client left out runs to the context's end (or the model's default); where
/// the KV budget holds fewer positions than that, it ends where the budget does, instead of the
/// request being refused for a limit the client never set.
fn fit_default_to_kv(
    state: &Shared,
    given: Option<i64>,
    prompt_len: usize,
    mut params: GenerationParams,
) -> GenerationParams {
    if given.is_none() {
        if let Some(cap) = state.engine.kv_capacity().filter(|&c| c > prompt_len) {
            params.max_tokens = params.max_tokens.min(cap - prompt_len);
        }
    }
    params
}

async fn completion_inner(
    state: &Shared,
    body: &[u8],
    pending_label: &mut String,
) -> Result<Response, Failure> {
    let req: CompletionRequest = parse_body(body).map_err(label_err("invalid"))?;
    let resolved = resolve(state, &req.common)
        .await
        .map_err(label_err("invalid"))?;
    let label = resolved.label.clone();
    pending_label.clone_from(&label);
    let fail = label_err(&label);
    let vocab = state.model.llama.cfg.vocab_size;
    let (prompt_ids, prompt_text) = match &req.prompt {
        PromptSpec::Ids(ids) => {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(fail(ApiError::invalid(
                    Some("prompt"),
                    format!("token id {bad} is outside the vocabulary ({vocab})"),
                )));
            }
            let text = match &state.model.tokenizer {
                Some(t) => t.decode(ids, false).unwrap_or_default(),
                None => String::new(),
            };
            (ids.clone(), text)
        }
        PromptSpec::Text(text) => {
            let tok = state.model.tokenizer.as_ref().ok_or_else(|| {
                fail(ApiError::invalid(
                    Some("prompt"),
                    "this model has no tokenizer; send the prompt as token ids",
                ))
            })?;
            let ids = tok
                .encode(text, true)
                .map_err(|e| fail(ApiError::internal(format!("tokenizer: {e:#}"))))?;
            (ids, text.clone())
        }
    };
    if state.model.tokenizer.is_none() && req.common.stop.is_some() {
        return Err(fail(ApiError::invalid(
            Some("stop"),
            "stop strings need a tokenizer; this model has none (it takes and gives token ids)",
        )));
    }
    let top = req.logprobs.unwrap_or(0);
    if !(0..=MAX_TOP_LOGPROBS).contains(&top) {
        return Err(fail(ApiError::invalid(
            Some("logprobs"),
            format!("logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
        )));
    }
    let echo = req.echo.unwrap_or(false);
    // `echo` with `max_tokens: 0` scores the prompt and generates nothing (as lm-eval's
    // loglikelihood requests do); checked and reserved as one token.
    let prompt_only = echo && req.common.max_tokens == Some(0);
    let params = req
        .common
        .generation_params(
            &state.sampling,
            if prompt_only {
                Some(1)
            } else {
                req.common.max_tokens
            },
            prompt_ids.len(),
            state.model.llama.max_context(),
            top as usize,
            req.logprobs.is_some(),
        )
        .map_err(&fail)?;
    let params = fit_default_to_kv(state, req.common.max_tokens, prompt_ids.len(), params);
    let job = Job {
        flavor: Flavor::Completion,
        echo: echo.then_some(prompt_text),
        model: req.common.model.clone(),
        label: label.clone(),
        prompt_logprobs: (echo && req.logprobs.is_some()).then_some(top as usize),
        prompt_only,
    };
    run(state, &req.common, prompt_ids, params, resolved.lora, job)
        .await
        .map_err(fail)
}

/// Submits one sequence per choice and answers (stream or JSON).
async fn run(
    state: &Shared,
    common: &CommonParams,
    prompt_ids: Vec<u32>,
    params: GenerationParams,
    lora: Option<Arc<crate::lora::LoraStack>>,
    job: Job,
) -> Result<Response, ApiError> {
    let n = common.choices()?;
    // What the engine checks when it admits the sequence, checked here first: whatever it would
    // refuse is the request's fault (400), not a failure of the server.
    crate::generate::SequenceState::new(
        params.clone(),
        state.model.eos_ids.clone(),
        state.model.tokenizer.as_ref(),
    )
    .map_err(|e| ApiError::invalid(None, format!("{e:#}")))?;
    let mut choices = Vec::with_capacity(n);
    for i in 0..n {
        let mut p = params.clone();
        p.sampling.seed = p.sampling.seed.wrapping_add(i as u64);
        let rx = state
            .engine
            .submit(EngineRequest {
                prompt_ids: prompt_ids.clone(),
                params: p,
                lora: lora.clone(),
                label: job.label.clone(),
                prompt_logprobs: job.prompt_logprobs,
                prompt_only: job.prompt_only,
            })
            .map_err(|e| match e {
                SubmitError::QueueFull(_) => ApiError::overloaded(
                    e.to_string(),
                    state.rate.retry_after(state.engine.waiting()),
                ),
                SubmitError::Stopped => ApiError::unavailable(e.to_string()),
                SubmitError::KvTooLarge { .. } => {
                    ApiError::invalid(Some("max_tokens"), e.to_string())
                }
            })?;
        choices.push(Choice { index: i, rx });
    }
    let started = Instant::now();
    if common.stream.unwrap_or(false) {
        let usage = common
            .stream_options
            .as_ref()
            .map(|o| o.include_usage)
            .unwrap_or(false);
        return Ok(sse_response(state.clone(), job, choices, usage, started));
    }
    collect(state, job, choices, started).await
}
