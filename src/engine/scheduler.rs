//! The scheduler loop (runs on its own thread): admit, batch, forward, sample, stream, retire.

use super::admission::{admit, plan_with_blocks, reuse_late};
use super::kv_blocks::{KvBlocks, BLOCK_POSITIONS};
use super::kv_memory::KvMemory;
use super::metrics::EngineMetrics;
use super::prefix_cache::PrefixCache;
use super::running::Running;
use super::vllm_metrics::VllmSnapshot;
use super::{EngineConfig, EngineEvent, Submission};
use crate::model::{KvPool, LoadedModel};
use crate::runtime::{Backend, LogitsMode, SeqInput};
use crate::sampling::logprobs;
use candle_core::Tensor;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

pub(super) fn run(
    model: Arc<LoadedModel>,
    cfg: EngineConfig,
    pool: Option<KvBlocks>,
    paged: Option<Arc<KvPool>>,
    rx: mpsc::Receiver<Submission>,
    waiting_count: Arc<AtomicUsize>,
    metrics: Arc<EngineMetrics>,
) {
    let mut waiting: VecDeque<Submission> = VecDeque::new();
    // Preempted sequences, oldest first; they return before any new submission.
    let mut preempted: VecDeque<Running> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    let mut mem = KvMemory::new(pool, PrefixCache::new(cfg.prefix_cache_bytes), paged);
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
        if running.is_empty() && waiting.is_empty() && preempted.is_empty() {
            match rx.recv() {
                Ok(s) => waiting.push_back(s),
                Err(_) => return,
            }
        }
        while let Ok(s) = rx.try_recv() {
            waiting.push_back(s);
        }
        // Drop sequences whose client went away (their receiver is gone).
        let before = running.len() + preempted.len();
        running.retain_mut(|r| {
            let open = !r.sub.events.is_closed();
            if !open {
                mem.release(r);
            }
            open
        });
        preempted.retain(|r| !r.sub.events.is_closed());
        let gone_waiting = waiting.len();
        waiting.retain(|s| !s.events.is_closed());
        let dropped_waiting = gone_waiting - waiting.len();
        if dropped_waiting > 0 {
            waiting_count.fetch_sub(dropped_waiting, Ordering::SeqCst);
        }
        metrics
            .cancelled
            .inc_by((before - running.len() - preempted.len() + dropped_waiting) as u64);
        admit(
            &model,
            &mut mem,
            &mut preempted,
            &mut waiting,
            &mut running,
            &cfg,
            &waiting_count,
            &metrics,
        );
        metrics
            .waiting
            .set((waiting.len() + preempted.len()) as i64);
        publish(&metrics, &cfg, &mem, &running, &waiting, &preempted);
        if running.is_empty() {
            continue;
        }
        step(
            &model,
            &cfg,
            row_budget,
            &mut running,
            &mut mem,
            &mut preempted,
            &metrics,
        );
        mem.settle_prefixes();
        metrics.prefix_cache_bytes.set(mem.prefixes.bytes() as i64);
        publish(&metrics, &cfg, &mem, &running, &waiting, &preempted);
    }
}

/// The device storage of a pool of `blocks` KV blocks for paged caches; `None` (each sequence
/// keeps its own buffers) when the device cannot hold it, with a warning.
pub(super) fn paged_storage(model: &LoadedModel, blocks: usize) -> Option<Arc<KvPool>> {
    let llama = &model.llama;
    let (_, nkv, hd) = llama.cfg.heads();
    let layers = llama.cfg.num_hidden_layers;
    let at = (llama.dtype(), llama.device());
    match KvPool::new(layers, blocks, BLOCK_POSITIONS, (nkv, hd), at.0, at.1) {
        Ok(pool) => Some(Arc::new(pool)),
        Err(e) => {
            tracing::warn!("paged KV storage of {blocks} blocks failed ({e}): each sequence keeps its own KV buffers");
            None
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
    mem: &KvMemory,
    running: &[Running],
    waiting: &VecDeque<Submission>,
    preempted: &VecDeque<Running>,
) {
    metrics
        .kv_cache_bytes
        .set(running.iter().map(|r| r.cache.bytes()).sum::<usize>() as i64);
    metrics.running.set(running.len() as i64);
    let blocks = mem.blocks();
    if let Some((_, sequences, prefixes)) = blocks {
        metrics.kv_blocks_used.set(sequences as i64);
        metrics.kv_blocks_prefix_cache.set(prefixes as i64);
    }
    if let Some(v) = &metrics.vllm {
        // As vLLM counts it: blocks held by requests (cached prefixes can be reclaimed).
        let kv_usage = match blocks {
            Some((total, sequences, _)) if total > 0 => sequences as f64 / total as f64,
            _ => running.len() as f64 / cfg.max_batch_size.max(1) as f64,
        };
        fn names(s: &Submission) -> Vec<&str> {
            s.req.lora.as_ref().map_or_else(Vec::new, |l| {
                l.members.iter().map(|(a, _)| a.name.as_str()).collect()
            })
        }
        v.publish(&VllmSnapshot {
            waiting: waiting.len() + preempted.len(),
            running: running.len(),
            kv_usage,
            running_adapters: running.iter().flat_map(|r| names(&r.sub)).collect(),
            waiting_adapters: preempted
                .iter()
                .map(|r| &r.sub)
                .chain(waiting)
                .flat_map(names)
                .collect(),
        });
    }
}

/// One batched forward over the running sequences, then sampling and retiring.
fn step(
    model: &LoadedModel,
    cfg: &EngineConfig,
    row_budget: usize,
    running: &mut Vec<Running>,
    mem: &mut KvMemory,
    preempted: &mut VecDeque<Running>,
    metrics: &EngineMetrics,
) {
    reuse_late(running, mem, metrics);
    let plan = plan_with_blocks(running, cfg.prefill_chunk, mem, preempted, metrics);
    if plan.is_empty() {
        return;
    }
    metrics.batch_size.observe(plan.len() as f64);
    // Sequences scoring their prompt need a row of logits per prompt token, not just the last.
    let all_rows: Vec<bool> = plan
        .iter()
        .map(|(i, _, _)| {
            let r = &running[*i];
            r.next.is_none() && r.first_pass() && r.sub.req.prompt_logprobs.is_some()
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
            if let Some(top) = r.sub.req.prompt_logprobs.filter(|_| r.first_pass()) {
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
                mem.insert_prefix(&r.key, r.fill(), &r.cache);
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
                    mem.insert_finished(r, &fed);
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
    retire(running, &finished, mem);
}

/// Drops the sequences marked in `marked` (by index), freeing their caches and KV blocks.
fn retire(running: &mut Vec<Running>, marked: &[bool], mem: &mut KvMemory) {
    let mut idx = 0;
    running.retain_mut(|r| {
        idx += 1;
        if marked[idx - 1] {
            mem.release(r);
        }
        !marked[idx - 1]
    });
}
