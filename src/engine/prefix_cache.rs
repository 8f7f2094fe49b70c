//! Automatic prefix caching: the keys and values of token sequences the engine has already run,
//! so that a new prompt sharing a prefix with one of them (a system prompt, the earlier turns of a
//! chat) starts its prefill after that prefix instead of at position 0.
//!
//! An entry is the KV history of one finished prefill or one finished sequence, under the
//! identity of its LoRA stack: the same tokens through a different adapter give different keys
//! and values, so only the same stack (the same loaded adapters with the same weights, or the
//! base) may reuse an entry. Adapters are identified by their loaded instance: a reloaded or
//! re-registered adapter misses. Entries live until the byte cap needs room (least recently
//! used first) or their adapter is dropped; with a KV budget they also live in the engine's KV
//! block pool and go first when running sequences need the blocks (`engine::kv_memory`).

use super::kv_blocks::KvBlocks;
use crate::lora::{LoraAdapter, LoraStack};
use crate::model::KvCache;
use candle_core::Tensor;
use std::sync::{Arc, Weak};

/// The identity of a LoRA stack: each member's loaded instance and weight, in order.
#[derive(Clone, Debug, Default)]
pub struct StackKey(Vec<(Weak<LoraAdapter>, u64)>);

impl StackKey {
    /// The key of `stack` (`None`: the base model).
    pub fn of(stack: Option<&Arc<LoraStack>>) -> Self {
        Self(stack.map_or_else(Vec::new, |s| {
            s.members
                .iter()
                .map(|(a, w)| (Arc::downgrade(a), w.to_bits()))
                .collect()
        }))
    }

    /// The same loaded adapters with the same weights, in order (or both the base).
    pub fn same(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((a, wa), (b, wb))| wa == wb && Weak::ptr_eq(a, b))
    }

    /// False once one of its adapters has been dropped (the entry can never match again).
    fn alive(&self) -> bool {
        self.0.iter().all(|(a, _)| a.strong_count() > 0)
    }
}

struct Entry {
    key: StackKey,
    tokens: Vec<u32>,
    /// Per layer, keys and values `[kv_heads, tokens.len(), head_dim]`.
    kv: Vec<(Tensor, Tensor)>,
    bytes: usize,
    last_used: u64,
}

/// What one lookup found: the first `len` positions of an entry's history.
pub struct PrefixHit {
    pub len: usize,
    kv: Vec<(Tensor, Tensor)>,
}

impl PrefixHit {
    /// Writes the reused positions into an empty cache.
    pub fn load_into(&self, cache: &mut KvCache) -> candle_core::Result<()> {
        cache.load_prefix(&self.kv, self.len)
    }
}

/// The cache, capped in bytes (0: off).
pub struct PrefixCache {
    entries: Vec<Entry>,
    bytes: usize,
    cap: usize,
    clock: u64,
}

/// How many leading tokens `a` and `b` share.
pub(super) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    pub fn new(cap_bytes: usize) -> Self {
        Self {
            entries: Vec::new(),
            bytes: 0,
            cap: cap_bytes,
            clock: 0,
        }
    }

    /// Whether it keeps anything (a cap above 0).
    pub fn enabled(&self) -> bool {
        self.cap > 0
    }

    /// Bytes held by the entries.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The longest history under `key` sharing a prefix with `prompt`, at most `prompt.len() - 1`
    /// positions (the last prompt token is always run, for its logits). `None` below one token.
    pub fn lookup(&mut self, key: &StackKey, prompt: &[u32]) -> Option<PrefixHit> {
        if self.cap == 0 || prompt.len() < 2 {
            return None;
        }
        self.clock += 1;
        let limit = prompt.len() - 1;
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.key.same(key))
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(_, n)| n)?;
        if len == 0 {
            return None;
        }
        let e = &mut self.entries[best];
        e.last_used = self.clock;
        Some(PrefixHit {
            len,
            kv: e.kv.clone(),
        })
    }

    /// Keeps the history of `tokens` (the first `tokens.len()` positions of `cache`) under
    /// `key`, unless an entry already covers it; an entry it extends is replaced. Evicts the
    /// least recently used entries beyond the cap. Errors (device memory) only skip the entry.
    pub fn insert(&mut self, key: &StackKey, tokens: &[u32], cache: &KvCache) {
        if self.cap == 0 || tokens.is_empty() || cache.len() < tokens.len() {
            return;
        }
        self.entries.retain(|e| e.key.alive());
        let same_key = |e: &Entry| e.key.same(key);
        if self
            .entries
            .iter()
            .any(|e| same_key(e) && e.tokens.starts_with(tokens))
        {
            return;
        }
        let kv = match cache.snapshot(tokens.len()) {
            Ok(kv) => kv,
            Err(e) => {
                tracing::debug!("prefix cache: snapshot skipped ({e})");
                return;
            }
        };
        let bytes: usize = kv
            .iter()
            .flat_map(|(k, v)| [k, v])
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        if bytes > self.cap {
            return;
        }
        self.entries
            .retain(|e| !(same_key(e) && tokens.starts_with(&e.tokens)));
        self.clock += 1;
        self.entries.push(Entry {
            key: key.clone(),
            tokens: tokens.to_vec(),
            kv,
            bytes,
            last_used: self.clock,
        });
        self.bytes = self.entries.iter().map(|e| e.bytes).sum();
        while self.bytes > self.cap && self.evict_oldest() {}
    }

    /// Drops the least recently used entry; false when there is none.
    pub fn evict_oldest(&mut self) -> bool {
        let Some(oldest) = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(i, _)| i)
        else {
            return false;
        };
        self.bytes -= self.entries.swap_remove(oldest).bytes;
        true
    }

    /// KV blocks of [`BLOCK_POSITIONS`](super::kv_blocks::BLOCK_POSITIONS) positions the entries would take in the engine's pool
    /// (each entry rounded up to whole blocks).
    pub fn blocks(&self) -> usize {
        self.entries
            .iter()
            .map(|e| KvBlocks::blocks_for(e.tokens.len()))
            .sum()
    }
}
