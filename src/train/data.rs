//! Training data: JSONL in Alpaca (`{instruction, input?, output}`), chat (`{messages}`) or DPO
//! (`{prompt | messages, chosen, rejected}`) form, rendered with the model's chat template and
//! tokenized segment by segment so that only response tokens carry loss.
//!
//! Truncation policy: a sequence longer than `max_seq_len` loses prompt tokens from the left
//! first; if the responses alone are still too long, the tail is cut. Both are counted.

use crate::tokenize::{ChatMessage, TextTokenizer};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// A tokenized sequence and which positions are response (loss) tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
}

/// One training example.
#[derive(Clone, Debug)]
pub enum Example {
    Sft(Tokenized),
    Dpo {
        chosen: Tokenized,
        rejected: Tokenized,
    },
}

/// Which losses the data feeds.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Sft,
    Dpo,
}

/// A loaded dataset and what happened while loading it.
#[derive(Debug, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub skipped: usize,
    pub truncated: usize,
}

fn str_field<'a>(v: &'a Value, k: &str) -> Result<&'a str> {
    v.get(k)
        .with_context(|| format!("missing field `{k}`"))?
        .as_str()
        .with_context(|| format!("field `{k}` must be a string"))
}

fn messages_of(v: &Value) -> Result<Vec<ChatMessage>> {
    let arr = v.as_array().context("`messages` must be a list")?;
    arr.iter()
        .map(|m| {
            Ok(ChatMessage {
                role: str_field(m, "role")?.to_string(),
                content: str_field(m, "content")?.to_string(),
            })
        })
        .collect()
}

/// `(text, is_response)` segments of a conversation, one response per assistant turn.
fn segments(tok: &TextTokenizer, messages: &[ChatMessage]) -> Result<Vec<(String, bool)>> {
    if !messages.iter().any(|m| m.role == "assistant") {
        bail!("the conversation has no assistant message to learn from");
    }
    let full = tok.apply_chat_template(messages, false)?;
    let mut segs = Vec::new();
    let mut done = 0;
    for k in 0..messages.len() {
        if messages[k].role != "assistant" {
            continue;
        }
        let prompt = tok.apply_chat_template(&messages[..k], true)?;
        let upto = tok.apply_chat_template(&messages[..=k], false)?;
        if !upto.starts_with(&prompt) || !full.starts_with(&upto) || prompt.len() < done {
            bail!("the chat template does not render conversations as growing prefixes; cannot locate responses");
        }
        segs.push((full[done..prompt.len()].to_string(), false));
        segs.push((full[prompt.len()..upto.len()].to_string(), true));
        done = upto.len();
    }
    if done < full.len() {
        segs.push((full[done..].to_string(), false));
    }
    Ok(segs)
}

/// Tokenizes segments and applies the truncation policy. Returns whether it truncated.
fn tokenize(
    tok: &TextTokenizer,
    segs: &[(String, bool)],
    max_len: usize,
) -> Result<(Tokenized, bool)> {
    let mut parts: Vec<(Vec<u32>, bool)> = Vec::new();
    for (text, resp) in segs {
        if !text.is_empty() {
            parts.push((tok.encode(text, false)?, *resp));
        }
    }
    let total: usize = parts.iter().map(|p| p.0.len()).sum();
    let mut truncated = false;
    if total > max_len {
        truncated = true;
        let mut excess = total - max_len;
        for (ids, resp) in parts.iter_mut() {
            if excess == 0 {
                break;
            }
            if !*resp {
                let cut = excess.min(ids.len());
                ids.drain(..cut);
                excess -= cut;
            }
        }
    }
    let mut out = Tokenized {
        ids: Vec::new(),
        mask: Vec::new(),
    };
    for (ids, resp) in parts {
        out.mask.extend(std::iter::repeat_n(resp, ids.len()));
        out.ids.extend(ids);
    }
    out.ids.truncate(max_len);
    out.mask.truncate(max_len);
    if !out.mask.iter().skip(1).any(|&m| m) {
        bail!("no response tokens left after truncation to {max_len} tokens");
    }
    Ok((out, truncated))
}

fn parse_line(
    tok: &TextTokenizer,
    v: &Value,
    method: Method,
    max_len: usize,
) -> Result<(Example, bool)> {
    if !v.is_object() {
        bail!("each line must be a JSON object");
    }
    match method {
        Method::Sft => {
            let messages = if let Some(m) = v.get("messages") {
                messages_of(m)?
            } else {
                let instruction = str_field(v, "instruction")?;
                let input = match v.get("input") {
                    None | Some(Value::Null) => "",
                    Some(x) => x.as_str().context("field `input` must be a string")?,
                };
                let output = str_field(v, "output")?;
                let user = if input.is_empty() {
                    instruction.to_string()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                vec![
                    ChatMessage {
                        role: "user".into(),
                        content: user,
                    },
                    ChatMessage {
                        role: "assistant".into(),
                        content: output.to_string(),
                    },
                ]
            };
            let (t, tr) = tokenize(tok, &segments(tok, &messages)?, max_len)?;
            Ok((Example::Sft(t), tr))
        }
        Method::Dpo => {
            let prompt = match (v.get("messages"), v.get("prompt")) {
                (Some(m), _) => messages_of(m)?,
                (None, Some(p)) => vec![ChatMessage {
                    role: "user".into(),
                    content: p
                        .as_str()
                        .context("field `prompt` must be a string")?
                        .to_string(),
                }],
                _ => bail!("missing field `prompt` (or `messages`)"),
            };
            let side = |k: &str| -> Result<(Tokenized, bool)> {
                let mut m = prompt.clone();
                m.push(ChatMessage {
                    role: "assistant".into(),
                    content: str_field(v, k)?.to_string(),
                });
                tokenize(tok, &segments(tok, &m)?, max_len)
            };
            let (chosen, t1) = side("chosen")?;
            let (rejected, t2) = side("rejected")?;
            Ok((Example::Dpo { chosen, rejected }, t1 || t2))
        }
    }
}

/// Reads `path`. A bad line stops the load with its line number unless `skip_bad` (then it is
/// counted in `skipped`). An empty result is an error.
pub fn load(
    path: &Path,
    tok: &TextTokenizer,
    method: Method,
    max_len: usize,
    skip_bad: bool,
) -> Result<Dataset> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut ds = Dataset::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let res = serde_json::from_str::<Value>(line)
            .map_err(anyhow::Error::from)
            .and_then(|v| parse_line(tok, &v, method, max_len));
        match res {
            Ok((ex, tr)) => {
                ds.truncated += tr as usize;
                ds.examples.push(ex);
            }
            Err(e) if skip_bad => {
                tracing::warn!("{}:{}: skipped: {e:#}", path.display(), i + 1);
                ds.skipped += 1;
            }
            Err(e) => bail!(
                "{}:{}: {e:#} (use --skip-bad-lines to skip such lines)",
                path.display(),
                i + 1
            ),
        }
    }
    if ds.examples.is_empty() {
        bail!("{}: no usable examples", path.display());
    }
    Ok(ds)
}
