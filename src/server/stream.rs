//! Turning engine events into OpenAI responses: one JSON body, or SSE chunks ending in
//! `data: [DONE]`.

use super::errors::ApiError;
use super::Shared;
use crate::engine::{EngineEvent, PromptLogprob};
use crate::generate::FinishReason;
use crate::sampling::TokenLogprob;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};

/// Which endpoint's wire format to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Chat,
    Completion,
}

/// What the response needs to know about the request.
pub struct Job {
    pub flavor: Flavor,
    /// Prompt text to prepend (completions `echo`).
    pub echo: Option<String>,
    /// The `model` the client asked for (echoed back).
    pub model: String,
    /// Adapter label for metrics and logs.
    pub label: String,
    /// Score the prompt with this many alternatives (completions' `echo` + `logprobs`).
    pub prompt_logprobs: Option<usize>,
    /// Generate nothing, only score the prompt (`echo` with `max_tokens: 0`).
    pub prompt_only: bool,
}

/// One choice's event stream.
pub struct Choice {
    pub index: usize,
    pub rx: mpsc::UnboundedReceiver<EngineEvent>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn response_id(flavor: Flavor) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let prefix = if flavor == Flavor::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    format!("{prefix}-{t:x}{n:04x}")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn token_text(state: &Shared, id: u32) -> String {
    state
        .model
        .tokenizer
        .as_ref()
        .map(|t| t.token_text(id))
        .unwrap_or_default()
}

/// Chat `logprobs.content` entry for one token.
fn chat_logprob(state: &Shared, lp: &(TokenLogprob, Vec<TokenLogprob>)) -> Value {
    let entry = |t: &TokenLogprob| {
        let s = token_text(state, t.id);
        json!({"token": s, "logprob": t.logprob, "bytes": s.as_bytes()})
    };
    let mut v = entry(&lp.0);
    v["top_logprobs"] = Value::Array(lp.1.iter().map(entry).collect());
    v
}

/// Accumulated output of one choice.
#[derive(Default)]
struct ChoiceOut {
    text: String,
    prompt_lp: Vec<PromptLogprob>,
    logprobs: Vec<(TokenLogprob, Vec<TokenLogprob>)>,
    finish: Option<FinishReason>,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
}

/// OpenAI's `usage` object; `prompt_tokens_details.cached_tokens` counts the prompt tokens the
/// prefix cache supplied.
fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// Completions' `logprobs` object: the scored prompt tokens (echo; the first has no score),
/// then the generated ones, whose text offsets start at `offset0` (the echoed text's length).
fn completion_logprobs(
    state: &Shared,
    prompt: &[PromptLogprob],
    lps: &[(TokenLogprob, Vec<TokenLogprob>)],
    offset0: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    let alternatives = |alts: &[TokenLogprob]| -> Value {
        let m: serde_json::Map<String, Value> = alts
            .iter()
            .map(|t| (token_text(state, t.id), json!(t.logprob)))
            .collect();
        Value::Object(m)
    };
    let mut off = 0;
    for (id, scored) in prompt {
        let s = token_text(state, *id);
        offsets.push(off);
        off += s.len();
        tokens.push(s);
        match scored {
            Some((c, alts)) => {
                token_logprobs.push(json!(c.logprob));
                top.push(alternatives(alts));
            }
            None => {
                token_logprobs.push(Value::Null);
                top.push(Value::Null);
            }
        }
    }
    let mut off = offset0;
    for (c, alts) in lps {
        let s = token_text(state, c.id);
        offsets.push(off);
        off += s.len();
        tokens.push(s);
        token_logprobs.push(json!(c.logprob));
        top.push(alternatives(alts));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

fn record(
    state: &Shared,
    job: &Job,
    prompt: usize,
    completion: usize,
    started: Instant,
    status: &str,
) {
    state.rate.finished();
    let m = &state.metrics;
    m.requests
        .with_label_values(&[job.label.as_str(), status])
        .inc();
    m.prompt_tokens
        .with_label_values(&[job.label.as_str()])
        .inc_by(prompt as u64);
    m.generated_tokens
        .with_label_values(&[job.label.as_str()])
        .inc_by(completion as u64);
    tracing::info!(
        adapter = %job.label,
        prompt_tokens = prompt,
        completion_tokens = completion,
        latency_ms = started.elapsed().as_millis() as u64,
        status,
        "request"
    );
}

/// Waits for every choice to finish and answers one JSON body.
pub async fn collect(
    state: &Shared,
    job: Job,
    choices: Vec<Choice>,
    started: Instant,
) -> Result<Response, ApiError> {
    let mut outs = Vec::with_capacity(choices.len());
    for mut c in choices {
        let mut out = ChoiceOut::default();
        while let Some(ev) = c.rx.recv().await {
            match ev {
                EngineEvent::PromptLogprobs(v) => out.prompt_lp = v,
                EngineEvent::Token { text, logprob, .. } => {
                    out.text.push_str(&text);
                    if let Some(lp) = logprob {
                        out.logprobs.push(lp);
                    }
                }
                EngineEvent::Done {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                } => {
                    out.finish = Some(reason);
                    out.prompt_tokens = prompt_tokens;
                    out.completion_tokens = completion_tokens;
                    out.cached_tokens = cached_tokens;
                    break;
                }
                EngineEvent::Error(e) => {
                    // Counted by the handler, like every error it answers.
                    state.rate.finished();
                    return Err(ApiError::internal(e));
                }
            }
        }
        if out.finish.is_none() {
            return Err(ApiError::unavailable(
                "the engine stopped before the sequence finished",
            ));
        }
        outs.push(out);
    }
    let prompt_tokens = outs.first().map(|o| o.prompt_tokens).unwrap_or(0);
    let cached_tokens = outs.iter().map(|o| o.cached_tokens).min().unwrap_or(0);
    let completion_tokens: usize = outs.iter().map(|o| o.completion_tokens).sum();
    let want_lp = outs
        .iter()
        .any(|o| !o.logprobs.is_empty() || !o.prompt_lp.is_empty());
    let choices: Vec<Value> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| match job.flavor {
            Flavor::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": if want_lp { json!({"content": o.logprobs.iter().map(|lp| chat_logprob(state, lp)).collect::<Vec<_>>()}) } else { Value::Null },
                "finish_reason": o.finish,
            }),
            Flavor::Completion => {
                let echo = job.echo.clone().unwrap_or_default();
                json!({
                    "index": i,
                    "text": format!("{echo}{}", o.text),
                    "logprobs": if want_lp { completion_logprobs(state, &o.prompt_lp, &o.logprobs, echo.len()) } else { Value::Null },
                    "finish_reason": o.finish,
                })
            }
        })
        .collect();
    record(
        state,
        &job,
        prompt_tokens,
        completion_tokens,
        started,
        "200",
    );
    let body = json!({
        "id": response_id(job.flavor),
        "object": if job.flavor == Flavor::Chat { "chat.completion" } else { "text_completion" },
        "created": unix_now(),
        "model": job.model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    });
    Ok(axum::Json(body).into_response())
}

/// Streams chunks as Server-Sent Events. A client that goes away drops the stream, which drops
/// the engine receivers and so cancels the sequences.
pub fn sse_response(
    state: Shared,
    job: Job,
    choices: Vec<Choice>,
    include_usage: bool,
    started: Instant,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let id = response_id(job.flavor);
        let object = if job.flavor == Flavor::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let created = unix_now();
        let n = choices.len();
        let chunk = |choice: Value| {
            let mut v = json!({"id": id, "object": object, "created": created, "model": job.model, "choices": [choice]});
            if include_usage {
                v["usage"] = Value::Null;
            }
            Event::default().data(v.to_string())
        };
        // Opening chunks.
        for i in 0..n {
            let first = match job.flavor {
                Flavor::Chat => {
                    json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})
                }
                Flavor::Completion => match &job.echo {
                    // Sent with the prompt's logprobs once the prefill has scored it.
                    Some(_) if job.prompt_logprobs.is_some() => continue,
                    Some(e) => {
                        json!({"index": i, "text": e, "logprobs": null, "finish_reason": null})
                    }
                    None => continue,
                },
            };
            if tx.send(Ok(chunk(first))).await.is_err() {
                record(&state, &job, 0, 0, started, "cancelled");
                return;
            }
        }
        let mut merged = futures_util::stream::select_all(
            choices
                .into_iter()
                .map(|c| UnboundedReceiverStream::new(c.rx).map(move |ev| (c.index, ev))),
        );
        let (mut prompt_tokens, mut completion_tokens, mut done) = (0, 0, 0);
        // The fewest any choice reused (each choice is its own sequence).
        let mut cached_tokens: Option<usize> = None;
        loop {
            // Wait for the next event or for the client to leave, whichever comes first: a
            // client that leaves before its first token (queued, or during a long prefill)
            // cancels its sequences now, not when the first token finds nobody to send to.
            let next = tokio::select! {
                ev = merged.next() => ev,
                _ = tx.closed() => None,
            };
            let Some((i, ev)) = next else {
                if tx.is_closed() {
                    record(
                        &state,
                        &job,
                        prompt_tokens,
                        completion_tokens,
                        started,
                        "cancelled",
                    );
                    return;
                }
                break;
            };
            let choice = match ev {
                EngineEvent::PromptLogprobs(v) => {
                    let echo = job.echo.clone().unwrap_or_default();
                    json!({"index": i, "text": echo,
                        "logprobs": completion_logprobs(&state, &v, &[], 0),
                        "finish_reason": null})
                }
                EngineEvent::Token { text, logprob, .. } => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    match job.flavor {
                        Flavor::Chat => json!({"index": i, "delta": {"content": text},
                            "logprobs": logprob.map(|lp| json!({"content": [chat_logprob(&state, &lp)]})),
                            "finish_reason": null}),
                        Flavor::Completion => json!({"index": i, "text": text,
                            "logprobs": logprob.map(|lp| completion_logprobs(&state, &[], &[lp], 0)),
                            "finish_reason": null}),
                    }
                }
                EngineEvent::Done {
                    reason,
                    prompt_tokens: p,
                    completion_tokens: c,
                    cached_tokens: k,
                } => {
                    prompt_tokens = p;
                    cached_tokens = Some(cached_tokens.map_or(k, |c| c.min(k)));
                    completion_tokens += c;
                    done += 1;
                    match job.flavor {
                        Flavor::Chat => {
                            json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": reason})
                        }
                        Flavor::Completion => {
                            json!({"index": i, "text": "", "logprobs": null, "finish_reason": reason})
                        }
                    }
                }
                EngineEvent::Error(e) => {
                    let err = ApiError::internal(e);
                    let _ = tx
                        .send(Ok(Event::default().data(err.body().to_string())))
                        .await;
                    record(
                        &state,
                        &job,
                        prompt_tokens,
                        completion_tokens,
                        started,
                        "500",
                    );
                    return;
                }
            };
            if tx.send(Ok(chunk(choice))).await.is_err() {
                // Client gone: dropping `merged` cancels the sequences.
                record(
                    &state,
                    &job,
                    prompt_tokens,
                    completion_tokens,
                    started,
                    "cancelled",
                );
                return;
            }
            if done == n {
                break;
            }
        }
        if done < n {
            // The engine dropped the sequences without finishing them (it is stopping).
            let err = ApiError::unavailable("the engine stopped before the sequence finished");
            let _ = tx
                .send(Ok(Event::default().data(err.body().to_string())))
                .await;
            record(
                &state,
                &job,
                prompt_tokens,
                completion_tokens,
                started,
                "503",
            );
            return;
        }
        if include_usage {
            let v = json!({"id": id, "object": object, "created": created, "model": job.model, "choices": [],
                "usage": usage(prompt_tokens, completion_tokens, cached_tokens.unwrap_or(0))});
            let _ = tx.send(Ok(Event::default().data(v.to_string()))).await;
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        record(
            &state,
            &job,
            prompt_tokens,
            completion_tokens,
            started,
            "200",
        );
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}
