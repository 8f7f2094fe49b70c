//! Who runs each step, and with what KV memory: admission in arrival order (preempted
//! sequences first) while a batch slot and the KV pool allow, the KV blocks each sequence is
//! granted as it grows (`KvMemory`), preemption of the newest sequence when the pool runs dry,
//! and the step's plan (one token per decoding sequence, bounded prefill chunks for the others).

use super::kv_memory::KvMemory;
use super::metrics::EngineMetrics;
use super::prefix_cache::{common_prefix, PrefixCache, PrefixHit, StackKey};
use super::running::Running;
use super::{kv_positions, EngineConfig, EngineEvent, Submission};
use crate::generate::SequenceState;
use crate::model::LoadedModel;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Admits, in arrival order (preempted sequences first), while a batch slot is open and the KV
/// pool holds the next one's prompt (or, for a preempted one, its history), evicting cached
/// prefixes for room if needed but never the one it is about to reuse.
#[allow(clippy::too_many_arguments)]
pub(super) fn admit(
    model: &LoadedModel,
    mem: &mut KvMemory,
    preempted: &mut VecDeque<Running>,
    waiting: &mut VecDeque<Submission>,
    running: &mut Vec<Running>,
    cfg: &EngineConfig,
    waiting_count: &AtomicUsize,
    metrics: &EngineMetrics,
) {
    while running.len() < cfg.max_batch_size {
        if let Some(front) = preempted.front() {
            // The lookup marks the entry it finds as just used, so making room evicts others.
            let hit = find_prefix(&mut mem.prefixes, front);
            let shared = mem.shareable(hit.as_ref());
            if !mem.make_room(front.fill().len().saturating_sub(shared)) {
                break;
            }
            let Some(mut r) = preempted.pop_front() else {
                break;
            };
            start(mem, &mut r, hit, metrics);
            running.push(r);
            continue;
        }
        let Some(front) = waiting.front() else {
            break;
        };
        let key = StackKey::of(front.req.lora.as_ref());
        let hit = match front.req.prompt_logprobs {
            Some(_) => None,
            None => mem.prefixes.lookup(&key, &front.req.prompt_ids),
        };
        let shared = mem.shareable(hit.as_ref());
        if !mem.make_room(front.req.prompt_ids.len().saturating_sub(shared)) {
            break;
        }
        let Some(sub) = waiting.pop_front() else {
            break;
        };
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
                let positions = kv_positions(model, &sub.req);
                let mut r = Running {
                    state,
                    // Capped at what the sequence may fill; without a KV budget its buffers
                    // grow by doubling up to that.
                    cache: mem.new_cache(model.llama.cfg.num_hidden_layers, positions),
                    blocks: Vec::new(),
                    prefilled: 0,
                    loaded: 0,
                    next: None,
                    last_token_at: None,
                    prompt_lp: Vec::new(),
                    key,
                    cached_tokens: 0,
                    refill: None,
                    sub,
                };
                start(mem, &mut r, hit, metrics);
                running.push(r);
            }
            Err(e) => {
                let _ = sub.events.send(EngineEvent::Error(format!("{e:#}")));
            }
        }
    }
}

/// Grants an admitted `r` the blocks of what it fills — the cached prefix's whole blocks shared
/// (`KvMemory::share_hit_blocks`), the rest its own — and loads the prefix. Without its blocks
/// (the pool short after all) it holds none and is granted them as it runs.
fn start(mem: &mut KvMemory, r: &mut Running, hit: Option<PrefixHit>, metrics: &EngineMetrics) {
    mem.share_hit_blocks(r, hit.as_ref());
    let n = r.fill().len();
    if mem.grant(r, n) {
        load_prefix(mem, r, hit, metrics);
    } else {
        mem.release(r);
    }
}

/// Frees `r`'s KV and makes it start over when it returns: a sequence still in its first
/// prefill starts it again; one that generated prefills its whole history, and its next token
/// comes from that history's last row, as its next decode step's would have.
pub(super) fn preempt(mem: &mut KvMemory, mut r: Running) -> Running {
    mem.release(&mut r);
    r.cache = r.cache.empty_like();
    r.prefilled = 0;
    r.loaded = 0;
    r.next = None;
    if r.first_pass() {
        r.prompt_lp.clear();
        r.cached_tokens = 0;
    } else {
        let mut history = r.sub.req.prompt_ids.clone();
        history.extend_from_slice(&r.state.ids);
        r.refill = Some(history);
    }
    r
}

/// The longest cached prefix of what `r` fills under its stack (none when it scores its
/// prompt: every prompt token needs its row then).
fn find_prefix(prefixes: &mut PrefixCache, r: &Running) -> Option<PrefixHit> {
    if r.scores_prompt() {
        return None;
    }
    prefixes.lookup(&r.key, r.fill())
}

/// Starts `r`'s prefill after the cached prefix `hit` (shared or copied into its cache,
/// `KvMemory::load_hit`), unless it already starts as far in. A sequence that swaps a shorter
/// loaded prefix for `hit` first takes blocks of its own for any it shares (nothing may write
/// into shared blocks); when the pool has none to spare it keeps the shorter one.
fn load_prefix(
    mem: &mut KvMemory,
    r: &mut Running,
    hit: Option<PrefixHit>,
    metrics: &EngineMetrics,
) {
    let Some(hit) = hit.filter(|h| h.len > r.prefilled) else {
        return;
    };
    let before = r.prefilled;
    if before > 0 {
        if !mem.unshare(r) {
            return;
        }
        r.cache = r.cache.empty_like();
        (r.prefilled, r.loaded) = (0, 0);
    }
    match mem.load_hit(r, &hit) {
        Ok(shared) => {
            metrics.prefix_cache_shared_blocks.inc_by(shared as u64);
            (r.prefilled, r.loaded) = (hit.len, hit.len);
            if r.first_pass() {
                r.cached_tokens = hit.len;
            }
            if before == 0 {
                metrics.prefix_cache_hits.inc();
            }
            metrics
                .prefix_cache_reused_tokens
                .inc_by((hit.len - before) as u64);
        }
        Err(e) => {
            // Device memory, say: prefill it all in a fresh cache instead.
            tracing::debug!("prefix cache: reuse skipped ({e})");
            r.cache = r.cache.empty_like();
        }
    }
}

/// Prompt tokens a sequence must gain from an earlier one's prefill to wait for it.
const SHARE_MIN_TOKENS: usize = 16;

/// Sequences admitted together often share a prefix (a system prompt, the chat template's
/// start) that no cache holds yet. A sequence whose prefill has not started waits while an
/// earlier sequence under the same adapters is still prefilling a prompt that shares at least
/// [`SHARE_MIN_TOKENS`] more tokens with its own than it already has, and at least half of what
/// that one still has to prefill (so nobody waits long for a little). That prefill's completion
/// puts the prompt in the prefix cache, and [`reuse_late`] then starts the waiting one after
/// the shared part. Without a prefix cache, never.
fn waits_for_shared_prefix(earlier: &[Running], r: &Running, sharing: bool) -> bool {
    if !sharing || !r.not_started() || r.scores_prompt() {
        return false;
    }
    earlier.iter().any(|a| {
        if a.next.is_some() || a.scores_prompt() || !a.key.same(&r.key) {
            return false;
        }
        let shared = common_prefix(a.fill(), r.fill()).min(r.fill().len().saturating_sub(1));
        let gain = shared.saturating_sub(r.prefilled);
        let left = a.fill().len() - a.prefilled;
        gain >= SHARE_MIN_TOKENS && 2 * gain >= left
    })
}

/// Before each step: a sequence whose prefill has not started takes the longest cached prefix
/// again (an earlier sequence's prefill may have just put its prompt there).
pub(super) fn reuse_late(running: &mut [Running], mem: &mut KvMemory, metrics: &EngineMetrics) {
    if !mem.prefixes.enabled() {
        return;
    }
    for r in running.iter_mut().filter(|r| r.not_started()) {
        let hit = find_prefix(&mut mem.prefixes, r);
        load_prefix(mem, r, hit, metrics);
    }
}

/// Each running sequence's tokens for this step (index, tokens, whether they complete its
/// prefill): one token for each decoding sequence, prefill chunks within `prefill_chunk` tokens
/// over all the others, in arrival order, skipping those that wait for a shared prefix
/// (`sharing`: a prefix cache is on).
pub(super) fn plan(
    running: &[Running],
    prefill_chunk: usize,
    sharing: bool,
) -> Vec<(usize, Vec<u32>, bool)> {
    let mut budget = prefill_chunk.max(1);
    let mut plan = Vec::new();
    for (i, r) in running.iter().enumerate() {
        if let Some(t) = r.next {
            plan.push((i, vec![t], true));
        } else if budget > 0 && !waits_for_shared_prefix(&running[..i], r, sharing) {
            let fill = r.fill();
            let n = (fill.len() - r.prefilled).min(budget);
            budget -= n;
            let chunk = fill[r.prefilled..r.prefilled + n].to_vec();
            plan.push((i, chunk, r.prefilled + n == fill.len()));
        }
    }
    plan
}

/// The step's plan, once every planned sequence holds the KV blocks for the positions it
/// writes. While the pool is short (once cached prefixes are evicted), the newest running
/// sequence is preempted: its blocks go
/// back and it waits, first in line, to be recomputed (vLLM's policy: the oldest sequences keep
/// going, so someone always finishes).
pub(super) fn plan_with_blocks(
    running: &mut Vec<Running>,
    prefill_chunk: usize,
    mem: &mut KvMemory,
    preempted: &mut VecDeque<Running>,
    metrics: &EngineMetrics,
) -> Vec<(usize, Vec<u32>, bool)> {
    let sharing = mem.prefixes.enabled();
    loop {
        let plan = plan(running, prefill_chunk, sharing);
        let short = plan.iter().any(|(i, toks, _)| {
            let r = &mut running[*i];
            let end = r.cache.len() + toks.len();
            !mem.grant(r, end)
        });
        if !short {
            return plan;
        }
        let Some(newest) = running.pop() else {
            return Vec::new();
        };
        tracing::debug!(
            "KV blocks ran out: preempting a sequence holding {} positions",
            newest.cache.len()
        );
        metrics.preemptions.inc();
        if let Some(v) = &metrics.vllm {
            v.preemptions.inc();
        }
        preempted.push_front(preempt(mem, newest));
    }
}
