//! A sequence in the running batch: its request, sampling state, KV cache and blocks, and how
//! far its prefill got.

use super::prefix_cache::StackKey;
use super::{PromptLogprob, Submission};
use crate::generate::SequenceState;
use crate::model::KvCache;
use std::time::Instant;

/// A sequence in the running batch.
pub(super) struct Running {
    pub(super) sub: Submission,
    pub(super) state: SequenceState,
    pub(super) cache: KvCache,
    /// Tokens of [`Running::fill`] already in the cache.
    pub(super) prefilled: usize,
    /// Of those, the ones loaded from the prefix cache (its prefill has not run while
    /// `prefilled == loaded`).
    pub(super) loaded: usize,
    /// The token to feed next (after prefill).
    pub(super) next: Option<u32>,
    pub(super) last_token_at: Option<Instant>,
    /// The ids of the KV blocks it holds (none without a KV budget).
    pub(super) blocks: Vec<u32>,
    /// Prompt logprobs gathered so far (when the request asked for them).
    pub(super) prompt_lp: Vec<PromptLogprob>,
    /// The identity of its LoRA stack, for the prefix cache.
    pub(super) key: StackKey,
    /// Prompt tokens taken from the prefix cache.
    pub(super) cached_tokens: usize,
    /// After a preemption: its whole history (prompt and generated tokens), prefilled again.
    pub(super) refill: Option<Vec<u32>>,
}

impl Running {
    /// The tokens its prefill feeds: the prompt, or after a preemption the whole history, whose
    /// last row gives the next token as the decode step would have.
    pub(super) fn fill(&self) -> &[u32] {
        self.refill.as_deref().unwrap_or(&self.sub.req.prompt_ids)
    }

    /// Nothing generated yet (the prompt's logprobs and first-token events are still to come).
    pub(super) fn first_pass(&self) -> bool {
        self.state.ids.is_empty()
    }

    /// Admitted, but none of its prefill has run yet (a cached prefix may have been loaded).
    pub(super) fn not_started(&self) -> bool {
        self.next.is_none() && self.prefilled == self.loaded
    }

    /// Scores its prompt: every prompt token needs its row, so nothing comes from the cache.
    pub(super) fn scores_prompt(&self) -> bool {
        self.first_pass() && self.sub.req.prompt_logprobs.is_some()
    }
}
