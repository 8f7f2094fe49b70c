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

/// Where an entry's keys and values live.
#[derive(Clone)]
pub enum Stored {
    /// Per layer, keys and values `[kv_heads, tokens.len(), head_dim]` of its own.
    Tensors(Vec<(Tensor, Tensor)>),
    /// A paged cache holding them in blocks of the engine's KV pool (given back through
    /// [`PrefixCache::take_freed_blocks`] when the entry goes).
    Paged(Arc<KvCache>),
}

struct Entry {
    key: StackKey,
    tokens: Vec<u32>,
    kv: Stored,
    bytes: usize,
    last_used: u64,
}

/// What one lookup found: the first `len` positions of an entry's history.
pub struct PrefixHit {
    pub len: usize,
    kv: Stored,
}

impl PrefixHit {
    /// Writes the reused positions into an empty cache. From a paged entry, each layer is read
    /// whole before it is written, so the entry's blocks may already have been handed to the
    /// very cache it loads into (evicted to make its room) without harm.
    pub fn load_into(&self, cache: &mut KvCache) -> candle_core::Result<()> {
        match &self.kv {
            Stored::Tensors(kv) => cache.load_prefix(kv, self.len),
            Stored::Paged(entry) => cache.load_prefix(&entry.snapshot(self.len)?, self.len),
        }
    }

    /// The paged cache of the entry found, when it keeps its history in pool blocks.
    pub fn paged_entry(&self) -> Option<&Arc<KvCache>> {
        match &self.kv {
            Stored::Paged(entry) => Some(entry),
            Stored::Tensors(_) => None,
        }
    }
}

/// The cache, capped in bytes (0: off).
pub struct PrefixCache {
    entries: Vec<Entry>,
    bytes: usize,
    cap: usize,
    clock: u64,
    /// Pool blocks of paged entries that are gone, for the engine to take back.
    freed: Vec<u32>,
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
            freed: Vec::new(),
        }
    }

    /// The pool blocks of paged entries dropped since the last call.
    pub fn take_freed_blocks(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.freed)
    }

    /// Pool blocks the paged entries hold.
    pub fn paged_blocks(&self) -> usize {
        (self.entries.iter())
            .filter_map(|e| match &e.kv {
                Stored::Paged(c) => c.paged_table().map(|(_, t)| t.len()),
                Stored::Tensors(_) => None,
            })
            .sum()
    }

    /// Drops the entries `gone` selects, keeping their paged blocks for the engine.
    fn remove_where(&mut self, gone: impl Fn(&Entry) -> bool) {
        let freed = &mut self.freed;
        self.entries.retain(|e| {
            let drop = gone(e);
            if let (true, Stored::Paged(c)) = (drop, &e.kv) {
                freed.extend(c.paged_table().map_or(&[][..], |(_, t)| t));
            }
            !drop
        });
        self.bytes = self.entries.iter().map(|e| e.bytes).sum();
    }

    /// Whether `entry` is still one of the cached entries (not evicted since it was found).
    pub fn holds(&self, entry: &Arc<KvCache>) -> bool {
        (self.entries.iter()).any(|e| matches!(&e.kv, Stored::Paged(c) if Arc::ptr_eq(c, entry)))
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

    /// Whether the history of `tokens` from `cache` would be kept under `key`: the cache is
    /// on, `cache` holds it, and no entry under `key` covers it already (entries of dropped
    /// adapters are dropped on the way).
    pub fn wants(&mut self, key: &StackKey, tokens: &[u32], cache: &KvCache) -> bool {
        if self.cap == 0 || tokens.is_empty() || cache.len() < tokens.len() {
            return false;
        }
        self.remove_where(|e| !e.key.alive());
        !(self.entries.iter()).any(|e| e.key.same(key) && e.tokens.starts_with(tokens))
    }

    /// Keeps the history of `tokens` (the first `tokens.len()` positions of `cache`) under
    /// `key`, unless an entry already covers it; an entry it extends is replaced. Evicts the
    /// least recently used entries beyond the cap. Errors (device memory) only skip the entry.
    pub fn insert(&mut self, key: &StackKey, tokens: &[u32], cache: &KvCache) {
        if !self.wants(key, tokens, cache) {
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
        self.keep(key, tokens, Stored::Tensors(kv), bytes);
    }

    /// Keeps `kv`, the history of `tokens` under `key` taking `bytes`, for a caller that checked
    /// [`PrefixCache::wants`]: replaces the entries it extends, then evicts the least recently
    /// used beyond the cap. Refused (and, paged, its blocks freed) when larger than the cap.
    pub fn keep(&mut self, key: &StackKey, tokens: &[u32], kv: Stored, bytes: usize) {
        self.clock += 1;
        self.entries.push(Entry {
            key: key.clone(),
            tokens: tokens.to_vec(),
            kv,
            bytes,
            last_used: self.clock,
        });
        let (newest, too_big) = (self.clock, bytes > self.cap);
        self.remove_where(|e| match e.last_used == newest {
            true => too_big,
            false => !too_big && e.key.same(key) && tokens.starts_with(&e.tokens),
        });
        while self.bytes > self.cap && self.evict_oldest() {}
    }

    /// Drops the least recently used entry; false when there is none.
    pub fn evict_oldest(&mut self) -> bool {
        let Some(oldest) = self.entries.iter().map(|e| e.last_used).min() else {
            return false;
        };
        self.remove_where(|e| e.last_used == oldest);
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
