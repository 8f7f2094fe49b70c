//! The engine's KV memory under a KV budget: one pool of blocks ([`KvBlocks`]) shared by the
//! running sequences and the prefix cache.
//!
//! The prefix cache's entries hold blocks of the pool too (their own table), so the budget
//! bounds everything the engine keeps. Cached prefixes only use blocks no sequence needs: when a
//! sequence must grow or one waiting must be admitted and too few blocks are free, cached
//! entries are evicted first (least recently used), and only once the cache is empty is a
//! running sequence preempted. Without a budget there is no pool and the prefix cache keeps its
//! own byte cap.

use super::kv_blocks::{KvBlocks, BLOCK_POSITIONS};
use super::prefix_cache::{PrefixCache, StackKey, Stored};
use super::running::Running;
use crate::model::{KvCache, KvPool};
use std::sync::Arc;

/// Caps `r`'s cache at the blocks it holds: a paged cache gets their ids, buffers a limit.
fn give_blocks(r: &mut Running) {
    if r.cache.paged_table().is_some() {
        if let Err(e) = r.cache.set_table(r.blocks.clone()) {
            // Never: blocks only grow while a sequence runs, and a released one is emptied.
            tracing::error!("KV blocks: {e}");
        }
    } else {
        r.cache.set_limit(r.blocks.len() * BLOCK_POSITIONS);
    }
}

/// Extends `table` past `positions` when it must grow: to a quarter more (at least one block
/// more, at most the context's `max_len` positions), if that many blocks are free. False, with
/// nothing taken, when the table already covers `positions`, when nothing more would be granted
/// than `positions` needs, or when the extra blocks are not free.
fn grow_ahead(pool: &mut KvBlocks, table: &mut Vec<u32>, positions: usize, max_len: usize) -> bool {
    let ahead = (positions + (positions / 4).max(BLOCK_POSITIONS))
        .min(max_len)
        .max(positions);
    let held = table.len() * BLOCK_POSITIONS;
    positions > held
        && KvBlocks::blocks_for(ahead) > KvBlocks::blocks_for(positions)
        && pool.grow(table, ahead)
}

/// The pool (with a KV budget), the prefix cache, and the blocks that cache holds.
pub(super) struct KvMemory {
    pool: Option<KvBlocks>,
    pub(super) prefixes: PrefixCache,
    /// Blocks held for the prefix cache's entries when they keep their own tensors.
    prefix_blocks: Vec<u32>,
    /// The device storage of the pool's blocks when caches are paged (`None`: each sequence
    /// keeps its own buffers, capped at its blocks).
    paged: Option<Arc<KvPool>>,
}

impl KvMemory {
    /// `paged`: the storage of `pool`'s blocks (as many blocks), for paged caches; ignored
    /// without a pool or when the block counts differ.
    pub(super) fn new(
        pool: Option<KvBlocks>,
        prefixes: PrefixCache,
        paged: Option<Arc<KvPool>>,
    ) -> Self {
        let paged = paged.filter(|p| pool.as_ref().is_some_and(|b| b.total() == p.blocks()));
        Self {
            pool,
            prefixes,
            prefix_blocks: Vec::new(),
            paged,
        }
    }

    /// Whether sequences' caches are paged in the pool's storage.
    pub(super) fn is_paged(&self) -> bool {
        self.paged.is_some()
    }

    /// Bytes of the paged storage (0 without one).
    pub(super) fn pool_bytes(&self) -> usize {
        self.paged
            .as_ref()
            .map_or(0, |p| p.blocks() * p.block_bytes())
    }

    /// An empty cache for a sequence of at most `positions` positions: paged in the pool's
    /// storage, or buffers of its own.
    pub(super) fn new_cache(&self, num_layers: usize, positions: usize) -> KvCache {
        match &self.paged {
            Some(pool) => KvCache::paged(pool.clone(), positions),
            None => KvCache::new(num_layers, positions),
        }
    }

    /// The pool's blocks: (all, held by running sequences, held by the prefix cache); `None`
    /// without a KV budget.
    pub(super) fn blocks(&self) -> Option<(usize, usize, usize)> {
        let pool = self.pool.as_ref()?;
        let prefix = self.prefix_blocks.len() + self.prefixes.paged_blocks();
        Some((pool.total(), pool.used() - prefix, prefix))
    }

    /// Keeps the history of `tokens` from `cache` in the prefix cache under `key`. Paged, the
    /// entry is copied into blocks of its own, taken from free ones (evicting older entries,
    /// never preempting anyone); skipped when even an empty prefix cache leaves too few.
    pub(super) fn insert_prefix(&mut self, key: &StackKey, tokens: &[u32], cache: &KvCache) {
        let Some(storage) = self.paged.clone() else {
            self.prefixes.insert(key, tokens, cache);
            return;
        };
        if !self.prefixes.wants(key, tokens, cache) {
            return;
        }
        let mut table = Vec::new();
        loop {
            let Some(pool) = &mut self.pool else {
                return;
            };
            if pool.grow(&mut table, tokens.len()) {
                break;
            }
            if !self.evict_prefix() {
                return;
            }
        }
        let mut entry = KvCache::paged(storage, tokens.len());
        let copied = entry
            .set_table(table.clone())
            .and_then(|()| cache.snapshot(tokens.len()))
            .and_then(|kv| entry.load_prefix(&kv, tokens.len()));
        if let Err(e) = copied {
            tracing::debug!("prefix cache: copy into KV blocks skipped ({e})");
            if let Some(pool) = &mut self.pool {
                pool.release(&mut table);
            }
            return;
        }
        let bytes = entry.bytes();
        let entry = Stored::Paged(Arc::new(entry));
        self.prefixes.keep(key, tokens, entry, bytes);
        self.take_back_prefix_blocks();
    }

    /// At `r`'s end: keeps its history of `tokens` in the prefix cache. Paged, the entry takes
    /// over the blocks that hold it (no copy, no free block needed); `r` keeps the rest, given
    /// back when it is released.
    pub(super) fn insert_finished(&mut self, r: &mut Running, tokens: &[u32]) {
        if self.paged.is_none() {
            self.prefixes.insert(&r.key, tokens, &r.cache);
            return;
        }
        let keep = KvBlocks::blocks_for(tokens.len());
        if keep > r.blocks.len() || !self.prefixes.wants(&r.key, tokens, &r.cache) {
            return;
        }
        let empty = r.cache.empty_like();
        let mut entry = std::mem::replace(&mut r.cache, empty);
        entry.truncate(tokens.len());
        let table: Vec<u32> = r.blocks.drain(..keep).collect();
        if let Err(e) = entry.set_table(table.clone()) {
            // Never: the first blocks hold the first positions.
            tracing::error!("prefix cache: {e}");
            r.blocks.splice(0..0, table);
            return;
        }
        give_blocks(r);
        let bytes = entry.bytes();
        let key = r.key.clone();
        self.prefixes
            .keep(&key, tokens, Stored::Paged(Arc::new(entry)), bytes);
        self.take_back_prefix_blocks();
    }

    /// Returns the blocks of paged prefix entries that are gone to the pool.
    fn take_back_prefix_blocks(&mut self) {
        let mut freed = self.prefixes.take_freed_blocks();
        if let Some(pool) = &mut self.pool {
            pool.release(&mut freed);
        }
    }

    /// Whether `positions` more positions' blocks are free, after evicting cached prefixes if
    /// needed. Always true without a pool.
    pub(super) fn make_room(&mut self, positions: usize) -> bool {
        let want = KvBlocks::blocks_for(positions);
        loop {
            let Some(pool) = &self.pool else {
                return true;
            };
            if want <= pool.free() {
                return true;
            }
            if !self.evict_prefix() {
                return false;
            }
        }
    }

    /// Grants `r` the blocks that cover its first `positions` positions (evicting cached
    /// prefixes if needed) and caps its cache there; false, with nothing taken, when even an
    /// empty prefix cache leaves the pool short. Always true without a pool.
    ///
    /// A sequence that must grow is granted a quarter more than it needs (at least one block,
    /// never past its context) when that many blocks are free: its cache's buffers are
    /// reallocated and copied each time they outgrow their blocks, so growing block by block
    /// would copy a long sequence's whole history every 16 positions. Those extra blocks come
    /// only from free ones, never from evicted prefixes or preempted sequences.
    pub(super) fn grant(&mut self, r: &mut Running, positions: usize) -> bool {
        if let Some(pool) = &mut self.pool {
            if grow_ahead(pool, &mut r.blocks, positions, r.cache.max_len()) {
                give_blocks(r);
                return true;
            }
        }
        loop {
            let Some(pool) = &mut self.pool else {
                return true;
            };
            if pool.grow(&mut r.blocks, positions) {
                give_blocks(r);
                return true;
            }
            if !self.evict_prefix() {
                return false;
            }
        }
    }

    /// Gives `r`'s blocks back to the pool; its cache may hold nothing more.
    pub(super) fn release(&mut self, r: &mut Running) {
        if let Some(pool) = &mut self.pool {
            pool.release(&mut r.blocks);
        }
        r.cache.truncate(0);
        give_blocks(r);
    }

    /// Makes the prefix cache's block table match its entries after inserts: it takes free
    /// blocks for new entries, evicting the oldest entries while the pool has too few, and gives
    /// back the blocks of entries gone.
    pub(super) fn settle_prefixes(&mut self) {
        self.take_back_prefix_blocks();
        if self.paged.is_some() {
            // Paged entries hold blocks of their own.
            return;
        }
        let Some(pool) = &mut self.pool else {
            return;
        };
        loop {
            let want = self.prefixes.blocks();
            if want <= self.prefix_blocks.len() {
                let mut surplus = self.prefix_blocks.split_off(want);
                pool.release(&mut surplus);
                return;
            }
            if pool.grow(&mut self.prefix_blocks, want * BLOCK_POSITIONS) {
                return;
            }
            if !self.prefixes.evict_oldest() {
                return;
            }
        }
    }

    /// Evicts the least recently used cached prefix and returns its blocks; false when the
    /// cache is empty.
    fn evict_prefix(&mut self) -> bool {
        if !self.prefixes.evict_oldest() {
            return false;
        }
        self.settle_prefixes();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_growing_sequence_gets_blocks_ahead_while_the_pool_has_them() {
        let mut pool = KvBlocks::with_blocks(1000);
        let mut table = Vec::new();
        let mut grants = 0;
        // Decoding position by position to 8,000: a grant every quarter of the length, not
        // every block (500 blocks), and never more than a quarter plus a block held unused.
        for end in 1..=8000 {
            if end > table.len() * BLOCK_POSITIONS {
                assert!(grow_ahead(&mut pool, &mut table, end, 8192));
                grants += 1;
            }
            assert!(table.len() * BLOCK_POSITIONS <= end + end / 4 + 2 * BLOCK_POSITIONS);
        }
        assert!(grants <= 30, "{grants} grants");
        // Never past the context.
        let mut pool = KvBlocks::with_blocks(1000);
        let mut t = Vec::new();
        assert!(!grow_ahead(&mut pool, &mut t, 8192, 8192));
        assert!(t.is_empty());
        assert!(grow_ahead(&mut pool, &mut t, 8100, 8192));
        assert_eq!(t.len(), 8192 / BLOCK_POSITIONS);
        // A table that already covers the positions takes nothing.
        assert!(!grow_ahead(&mut pool, &mut t, 100, 8192));
    }

    #[test]
    fn blocks_ahead_come_only_from_free_ones() {
        let mut pool = KvBlocks::with_blocks(4);
        let mut table = Vec::new();
        // 60 positions need 4 blocks; 75 would need 5: nothing is taken, the exact grant is
        // the caller's.
        assert!(!grow_ahead(&mut pool, &mut table, 60, 1000));
        assert!(table.is_empty());
        assert_eq!(pool.free(), 4);
        assert!(grow_ahead(&mut pool, &mut table, 20, 1000));
        assert_eq!(table.len(), 3);
    }
}
