//! `loraplex generate`: one prompt through the base and optional stacked adapters.

use super::ModelArgs;
use crate::generate::{generate, GenerationParams};
use crate::lora::AdapterSpec;
use crate::lora::LoraStack;
use crate::sampling::SamplingParams;
use crate::tokenize::ChatMessage;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::io::Write;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat", "prompt_ids"])))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A PEFT adapter folder, optionally with a stacking weight: DIR[:WEIGHT]. Repeat to stack.
    #[arg(long = "adapter", short = 'a', value_name = "DIR[:WEIGHT]")]
    pub adapters: Vec<AdapterSpec>,
    /// Raw prompt text (no chat template). One of --prompt, --chat, --prompt-ids is required
    /// (unset: the others).
    #[arg(long)]
    pub prompt: Option<String>,
    /// A user message, rendered with the model's chat template. Unset: --prompt or
    /// --prompt-ids.
    #[arg(long)]
    pub chat: Option<String>,
    /// System message for --chat. Unset: the template's default (none, or its own).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Prompt as comma-separated token ids (models without a tokenizer). Unset: --prompt or
    /// --chat.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub prompt_ids: Option<Vec<u32>>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample among the k most likely tokens only. Unset: no top-k cut.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object (prompt_ids, ids, text, finish_reason, top_logprobs) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Alternatives reported in --json's top_logprobs for the first generated token.
    #[arg(long, default_value_t = 20)]
    pub top_logprobs: usize,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let model = a.model.load()?;
    let stack = LoraStack::load(&model.llama, &a.adapters)?;
    let prompt_ids = if let Some(ids) = &a.prompt_ids {
        ids.clone()
    } else if let Some(text) = &a.prompt {
        model.tokenizer()?.encode(text, false)?
    } else if let Some(user) = &a.chat {
        let tok = model.tokenizer()?;
        let mut messages = Vec::new();
        if let Some(sys) = &a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: sys.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: user.clone(),
        });
        let rendered = tok.apply_chat_template(&messages, true)?;
        tok.encode(&rendered, false)?
    } else {
        bail!("give one of --prompt, --chat or --prompt-ids");
    };
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            seed: a.seed,
        },
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        top_logprobs: if a.json { a.top_logprobs } else { 0 },
        logprobs: a.json,
    };
    let stream = !a.json;
    let mut stdout = std::io::stdout();
    let gen = generate(&model, &prompt_ids, stack, params, |piece| {
        if stream {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    let decode_tps = gen.ids.len() as f64 / gen.decode_seconds.max(1e-9);
    tracing::info!(
        prompt_tokens = gen.prompt_ids.len(),
        generated = gen.ids.len(),
        prefill_s = gen.prefill_seconds,
        decode_tok_s = decode_tps,
        "generation finished"
    );
    if a.json {
        let tok = model.tokenizer.as_ref();
        let token_text = |id: u32| tok.map(|t| t.token_text(id));
        let top: Vec<_> = gen
            .logprobs
            .first()
            .map(|(_, top)| {
                top.iter()
                    .map(|t| json!({"id": t.id, "token": token_text(t.id), "logprob": t.logprob}))
                    .collect()
            })
            .unwrap_or_default();
        let out = json!({
            "model": model.id,
            "adapters": a.adapters.iter().map(|s| json!({"path": s.dir, "weight": s.weight})).collect::<Vec<_>>(),
            "prompt_ids": gen.prompt_ids,
            "ids": gen.ids,
            "text": gen.text,
            "finish_reason": gen.finish_reason,
            "top_logprobs": top,
            "usage": {"prompt_tokens": gen.prompt_ids.len(), "completion_tokens": gen.ids.len()},
        });
        println!(
            "{}",
            serde_json::to_string(&out).context("cannot serialise the result")?
        );
    } else {
        println!();
    }
    Ok(())
}
