//! The scheduler loop (runs on its own thread): admit, batch, forward, sample, stream, retire.

use super::prefix_cache::{PrefixCache, StackKey};
use super::vllm_metrics::{VllmMetrics, VllmSnapshot};
use super::{
    kv_bytes_per_position, kv_positions, EngineConfig, EngineEvent, PromptLogprob, Submission,
};
use crate::generate::SequenceState;
use crate::model::{KvCache, LoadedModel};
use crate::runtime::{Backend, LogitsMode, SeqInput};
use crate::sampling::logprobs;
use candle_core::Tensor;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

/// Scheduler-side metrics (registered in the server's registry).
pub struct EngineMetrics {
    pub batch_size: Histogram,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub queue_wait: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub cancelled: IntCounter,
    pub kv_cache_bytes: IntGauge,
    /// Sequences whose prefill started after a cached prefix, and the prompt tokens so skipped.
    pub prefix_cache_hits: IntCounter,
    pub prefix_cache_reused_tokens: IntCounter,
    pub prefix_cache_bytes: IntGauge,
    /// vLLM's gauges for routers (`None`: not exported).
    pub vllm: Option<VllmMetrics>,
}

impl EngineMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let hist = |name: &str, help: &str, buckets: Vec<f64>| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let secs = prometheus::exponential_buckets(0.001, 2.0, 16)?;
        let cancelled = IntCounter::new(
            "loraplex_cancelled_sequences_total",
            "Sequences stopped because their client disconnected",
        )?;
        registry.register(Box::new(cancelled.clone()))?;
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Self {
            batch_size: hist(
                "loraplex_batch_size",
                "Sequences in each forward step",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
            )?,
            running: gauge(
                "loraplex_running_sequences",
                "Sequences in the running batch",
            )?,
            waiting: gauge(
                "loraplex_waiting_sequences",
                "Sequences waiting for a batch slot",
            )?,
            queue_wait: hist(
                "loraplex_queue_wait_seconds",
                "Time from submission to admission",
                secs.clone(),
            )?,
            time_to_first_token: hist(
                "loraplex_time_to_first_token_seconds",
                "Time from submission to the first generated token",
                secs.clone(),
            )?,
            inter_token_latency: hist(
                "loraplex_inter_token_latency_seconds",
                "Time between consecutive tokens of a sequence",
                secs,
            )?,
            cancelled,
            kv_cache_bytes: gauge(
                "loraplex_kv_cache_bytes",
                "Bytes held by running sequences' KV caches",
            )?,
            prefix_cache_hits: counter(
                "loraplex_prefix_cache_hits_total",
                "Sequences whose prefill started after a cached prompt prefix",
            )?,
            prefix_cache_reused_tokens: counter(
                "loraplex_prefix_cache_reused_tokens_total",
                "Prompt tokens not prefilled because their keys and values were cached",
            )?,
            prefix_cache_bytes: gauge(
                "loraplex_prefix_cache_bytes",
                "Bytes held by the prefix cache",
            )?,
            vllm: None,
        })
    }

    /// Also exports vLLM's queue, KV and LoRA gauges (`vllm_metrics`).
    pub fn with_vllm(mut self, registry: &Registry, max_lora: usize) -> prometheus::Result<Self> {
        self.vllm = Some(VllmMetrics::new(registry, max_lora)?);
        Ok(self)
    }
}

/// A sequence in the running batch.
struct Running {
    sub: Submission,
    state: SequenceState,
    cache: KvCache,
    /// Prompt tokens not yet prefilled.
    prefilled: usize,
    /// The token to feed next (after prefill).
    next: Option<u32>,
    last_token_at: Option<Instant>,
    /// KV bytes reserved for this sequence against the engine's budget.
    kv_reserved: usize,
    /// Prompt logprobs gathered so far (when the request asked for them).
    prompt_lp: Vec<PromptLogprob>,
    /// The identity of its LoRA stack, for the prefix cache.
    key: StackKey,
    /// Prompt tokens taken from the prefix cache.
    cached_tokens: usize,
}

pub(super) fn run(
    model: Arc<LoadedModel>,
    cfg: EngineConfig,
    rx: mpsc::Receiver<Submission>,
    waiting_count: Arc<AtomicUsize>,
    metrics: Arc<EngineMetrics>,
) {
    let mut waiting: VecDeque<Submission> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    let mut prefixes = PrefixCache::new(cfg.prefix_cache_bytes);
    // The backend is fixed by the model's device; it says how many rows one forward call holds.
    let row_budget = match Backend::of(model.llama.device()) {
        Ok(b) => b.row_budget(),
        Err(e) => {
            tracing::error!("engine: {e}");
            return;
        }
    };
    loop {
        // Block when idle; otherwise take whatever has arrived.
        if running.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(s) => waiting.push_back(s),
                Err(_) => return,
            }
        }
        while let Ok(s) = rx.try_recv() {
            waiting.push_back(s);
        }
        // Drop sequences whose client went away (their receiver is gone).
        let before = running.len();
        running.retain(|r| !r.sub.events.is_closed());
        let gone_waiting = waiting.len();
        waiting.retain(|s| !s.events.is_closed());
        let dropped_waiting = gone_waiting - waiting.len();
        if dropped_waiting > 0 {
            waiting_count.fetch_sub(dropped_waiting, Ordering::SeqCst);
        }
        metrics
            .cancelled
            .inc_by((before - running.len() + dropped_waiting) as u64);
        // Admit, in arrival order, while a batch slot and the KV budget allow.
        let per_position = kv_bytes_per_position(&model);
        let mut reserved: usize = running.iter().map(|r| r.kv_reserved).sum();
        while running.len() < cfg.max_batch_size {
            let Some(front) = waiting.front() else {
                break;
            };
            let positions = kv_positions(&model, &front.req);
            let need = positions * per_position;
            if cfg
                .kv_budget_bytes
                .is_some_and(|budget| reserved + need > budget)
            {
                break;
            }
            let Some(sub) = waiting.pop_front() else {
                break;
            };
            reserved += need;
            waiting_count.fetch_sub(1, Ordering::SeqCst);
            metrics
                .queue_wait
                .observe(sub.submitted.elapsed().as_secs_f64());
            match SequenceState::new(
                sub.req.params.clone(),
                model.eos_ids.clone(),
                model.tokenizer.as_ref(),
            ) {
                Ok(state) => {
                    let mut r = Running {
                        state,
                        // Capped at what the sequence may fill, so its buffers stay within its
                        // reservation.
                        cache: KvCache::new(model.llama.cfg.num_hidden_layers, positions),
                        kv_reserved: need,
                        prefilled: 0,
                        next: None,
                        last_token_at: None,
                        prompt_lp: Vec::new(),
                        key: StackKey::of(sub.req.lora.as_ref()),
                        cached_tokens: 0,
                        sub,
                    };
                    reuse_prefix(&model, &mut prefixes, &mut r, &metrics);
                    running.push(r);
                }
                Err(e) => {
                    reserved -= need;
                    let _ = sub.events.send(EngineEvent::Error(format!("{e:#}")));
                }
            }
        }
        metrics.waiting.set(waiting.len() as i64);
        publish(&metrics, &cfg, &running, &waiting);
        if running.is_empty() {
            continue;
        }
        step(
            &model,
            &cfg,
            row_budget,
            &mut running,
            &mut prefixes,
            &metrics,
        );
        metrics.prefix_cache_bytes.set(prefixes.bytes() as i64);
        publish(&metrics, &cfg, &running, &waiting);
    }
}

/// Starts `r`'s prefill after the longest cached prefix of its prompt under its stack (not when
/// it scores its prompt: every prompt token needs its row then).
fn reuse_prefix(
    model: &LoadedModel,
    prefixes: &mut PrefixCache,
    r: &mut Running,
    metrics: &EngineMetrics,
) {
    if r.sub.req.prompt_logprobs.is_some() {
        return;
    }
    let Some(hit) = prefixes.lookup(&r.key, &r.sub.req.prompt_ids) else {
        return;
    };
    match hit.load_into(&mut r.cache) {
        Ok(()) => {
            r.prefilled = hit.len;
            r.cached_tokens = hit.len;
            metrics.prefix_cache_hits.inc();
            metrics.prefix_cache_reused_tokens.inc_by(hit.len as u64);
        }
        Err(e) => {
            // Device memory, say: prefill the whole prompt in a fresh cache instead.
            tracing::debug!("prefix cache: reuse skipped ({e})");
            r.cache = KvCache::new(model.llama.cfg.num_hidden_layers, r.cache.max_len());
        }
    }
}

/// Scores the prompt tokens this chunk's rows predict: row `j` (position `prefilled + j`)
/// gives the distribution of the prompt token after it. The first prompt token has no score.
fn score_prompt(r: &mut Running, rows: &Tensor, chunk: usize, top: usize) -> anyhow::Result<()> {
    let prompt = &r.sub.req.prompt_ids;
    if let (0, Some(&first)) = (r.prefilled, prompt.first()) {
        r.prompt_lp.push((first, None));
    }
    for j in 0..chunk {
        let pos = r.prefilled + j + 1;
        let Some(&id) = prompt.get(pos) else { break };
        let lp = logprobs(&rows.get(j)?, id, top)?;
        r.prompt_lp.push((id, Some(lp)));
    }
    Ok(())
}

/// The gauges of the running batch (also when it has just emptied: an idle server shows 0).
fn publish(
    metrics: &EngineMetrics,
    cfg: &EngineConfig,
    running: &[Running],
    waiting: &VecDeque<Submission>,
) {
    metrics
        .kv_cache_bytes
        .set(running.iter().map(|r| r.cache.bytes()).sum::<usize>() as i64);
    metrics.running.set(running.len() as i64);
    if let Some(v) = &metrics.vllm {
        let kv_usage = match cfg.kv_budget_bytes {
            Some(budget) if budget > 0 => {
                running.iter().map(|r| r.kv_reserved).sum::<usize>() as f64 / budget as f64
            }
            _ => running.len() as f64 / cfg.max_batch_size.max(1) as f64,
        };
        fn names(s: &Submission) -> Vec<&str> {
            s.req.lora.as_ref().map_or_else(Vec::new, |l| {
                l.members.iter().map(|(a, _)| a.name.as_str()).collect()
            })
        }
        v.publish(&VllmSnapshot {
            waiting: waiting.len(),
            running: running.len(),
            kv_usage,
            running_adapters: running.iter().flat_map(|r| names(&r.sub)).collect(),
            waiting_adapters: waiting.iter().flat_map(names).collect(),
        });
    }
}

/// One batched forward over the running sequences, then sampling and retiring.
fn step(
    model: &LoadedModel,
    cfg: &EngineConfig,
    row_budget: usize,
    running: &mut Vec<Running>,
    prefixes: &mut PrefixCache,
    metrics: &EngineMetrics,
) {
    // Decide each sequence's tokens for this step.
    let mut budget = cfg.prefill_chunk.max(1);
    let mut plan: Vec<(usize, Vec<u32>, bool)> = Vec::new(); // (index, tokens, completes prefill)
    for (i, r) in running.iter().enumerate() {
        if let Some(t) = r.next {
            plan.push((i, vec![t], true));
        } else if budget > 0 {
            let prompt = &r.sub.req.prompt_ids;
            let n = (prompt.len() - r.prefilled).min(budget);
            budget -= n;
            plan.push((
                i,
                prompt[r.prefilled..r.prefilled + n].to_vec(),
                r.prefilled + n == prompt.len(),
            ));
        }
    }
    if plan.is_empty() {
        return;
    }
    metrics.batch_size.observe(plan.len() as f64);
    // Sequences scoring their prompt need a row of logits per prompt token, not just the last.
    let all_rows: Vec<bool> = plan
        .iter()
        .map(|(i, _, _)| {
            running[*i].next.is_none() && running[*i].sub.req.prompt_logprobs.is_some()
        })
        .collect();
    // One result per planned sequence: its rows' logits (`[1, vocab]`, or one row per new token
    // when it scores its prompt), or why its forward failed.
    let rows: Vec<Result<Tensor, String>> = {
        let mut slots: Vec<Option<&mut Running>> = running.iter_mut().map(Some).collect();
        let mut seqs: Vec<SeqInput> = Vec::with_capacity(plan.len());
        for (i, toks, _) in &plan {
            let Some(r) = slots[*i].take() else { continue };
            seqs.push(SeqInput {
                tokens: toks,
                cache: &mut r.cache,
                lora: r.sub.req.lora.clone(),
            });
        }
        // Calls of at most the backend's row budget (on the CPU a whole step fits one call of
        // the slice kernels, bit-identical per row whatever the batch, so every weight is read
        // once per step); a bigger prompt chunk goes alone.
        let mut rows = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            let (mut end, mut n) = (start, 0);
            while end < seqs.len() && (end == start || n + seqs[end].tokens.len() <= row_budget) {
                n += seqs[end].tokens.len();
                end += 1;
            }
            let forward =
                |part: &mut [SeqInput<'_>], all: &[bool]| -> Result<Vec<Tensor>, String> {
                    let lens: Vec<usize> = part.iter().map(|s| s.tokens.len()).collect();
                    let mode = match all.iter().any(|&a| a) {
                        true => LogitsMode::All,
                        false => LogitsMode::Last,
                    };
                    let l = crate::runtime::forward(&model.llama, part, mode)
                        .map_err(|e| e.to_string())?;
                    let mut off = 0;
                    let mut out = Vec::with_capacity(part.len());
                    for (j, len) in lens.into_iter().enumerate() {
                        let t = match mode {
                            LogitsMode::Last => l.narrow(0, j, 1),
                            LogitsMode::All if all[j] => l.narrow(0, off, len),
                            LogitsMode::All => l.narrow(0, off + len - 1, 1),
                        };
                        off += len;
                        out.push(t.map_err(|e| e.to_string())?);
                    }
                    Ok(out)
                };
            match forward(&mut seqs[start..end], &all_rows[start..end]) {
                Ok(l) => rows.extend(l.into_iter().map(Ok)),
                Err(e) if end - start == 1 => rows.push(Err(e)),
                Err(e) => {
                    // No cache advanced: run each sequence alone, so that one sequence's error
                    // (a token outside the context, device memory) fails that sequence only.
                    tracing::warn!("batched forward failed ({e}); retrying its sequences alone");
                    for j in start..end {
                        let alone = forward(&mut seqs[j..j + 1], &all_rows[j..j + 1])
                            .and_then(|mut l| l.pop().ok_or_else(|| "no logits".to_string()));
                        rows.push(alone);
                    }
                }
            }
            start = end;
        }
        rows
    };
    let mut finished = vec![false; running.len()];
    for ((i, toks, completes), row) in plan.iter().zip(&rows) {
        let r = &mut running[*i];
        let logits = match row {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("forward failed for one sequence: {e}");
                let _ = r
                    .sub
                    .events
                    .send(EngineEvent::Error(format!("inference failed: {e}")));
                finished[*i] = true;
                continue;
            }
        };
        if r.next.is_none() {
            if let Some(top) = r.sub.req.prompt_logprobs {
                if let Err(e) = score_prompt(r, logits, toks.len(), top) {
                    let _ = r
                        .sub
                        .events
                        .send(EngineEvent::Error(format!("prompt logprobs failed: {e:#}")));
                    finished[*i] = true;
                    continue;
                }
            }
            r.prefilled += toks.len();
            if *completes {
                prefixes.insert(&r.key, &r.sub.req.prompt_ids, &r.cache);
            }
        }
        if !completes {
            continue;
        }
        let last = logits.dim(0).and_then(|n| logits.get(n - 1));
        let logits = match last {
            Ok(l) => l,
            Err(e) => {
                let _ = r
                    .sub
                    .events
                    .send(EngineEvent::Error(format!("inference failed: {e}")));
                finished[*i] = true;
                continue;
            }
        };
        if r.state.ids.is_empty() && r.sub.req.prompt_logprobs.is_some() {
            let _ = r
                .sub
                .events
                .send(EngineEvent::PromptLogprobs(std::mem::take(
                    &mut r.prompt_lp,
                )));
        }
        if r.sub.req.prompt_only {
            let _ = r.sub.events.send(EngineEvent::Done {
                reason: crate::generate::FinishReason::Length,
                prompt_tokens: r.sub.req.prompt_ids.len(),
                completion_tokens: 0,
                cached_tokens: r.cached_tokens,
            });
            finished[*i] = true;
            continue;
        }
        let out = r.state.step(&logits);
        let now = Instant::now();
        match out {
            Ok(out) => {
                match r.last_token_at {
                    None => metrics
                        .time_to_first_token
                        .observe(now.duration_since(r.sub.submitted).as_secs_f64()),
                    Some(t) => metrics
                        .inter_token_latency
                        .observe(now.duration_since(t).as_secs_f64()),
                }
                r.last_token_at = Some(now);
                r.next = Some(out.token);
                let _ = r.sub.events.send(EngineEvent::Token {
                    id: out.token,
                    text: out.text,
                    logprob: out.logprob,
                });
                if let Some(reason) = out.finish {
                    // The whole history (prompt and answer but the last token), for the next
                    // turn of a conversation; kept before Done goes out, so a client's next
                    // request finds it.
                    let mut fed = r.sub.req.prompt_ids.clone();
                    fed.extend_from_slice(&r.state.ids);
                    fed.truncate(r.cache.len());
                    prefixes.insert(&r.key, &fed, &r.cache);
                    let _ = r.sub.events.send(EngineEvent::Done {
                        reason,
                        prompt_tokens: r.sub.req.prompt_ids.len(),
                        completion_tokens: r.state.ids.len(),
                        cached_tokens: r.cached_tokens,
                    });
                    finished[*i] = true;
                }
            }
            Err(e) => {
                let _ = r
                    .sub
                    .events
                    .send(EngineEvent::Error(format!("sampling failed: {e:#}")));
                finished[*i] = true;
            }
        }
    }
    retire(running, &finished);
}

/// Drops the sequences marked in `marked` (by index), freeing their caches.
fn retire(running: &mut Vec<Running>, marked: &[bool]) {
    let mut idx = 0;
    running.retain(|_| {
        idx += 1;
        !marked[idx - 1]
    });
}
