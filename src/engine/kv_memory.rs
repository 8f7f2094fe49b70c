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
use super::prefix_cache::PrefixCache;
use super::running::Running;

/// The pool (with a KV budget), the prefix cache, and the blocks that cache holds.
pub(super) struct KvMemory {
    pool: Option<KvBlocks>,
    pub(super) prefixes: PrefixCache,
    prefix_blocks: Vec<u32>,
}

impl KvMemory {
    pub(super) fn new(pool: Option<KvBlocks>, prefixes: PrefixCache) -> Self {
        Self {
            pool,
            prefixes,
            prefix_blocks: Vec::new(),
        }
    }

    /// The pool's blocks: (all, held by running sequences, held by the prefix cache); `None`
    /// without a KV budget.
    pub(super) fn blocks(&self) -> Option<(usize, usize, usize)> {
        let pool = self.pool.as_ref()?;
        let prefix = self.prefix_blocks.len();
        Some((pool.total(), pool.used() - prefix, prefix))
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
    pub(super) fn grant(&mut self, r: &mut Running, positions: usize) -> bool {
        loop {
            let Some(pool) = &mut self.pool else {
                return true;
            };
            if pool.grow(&mut r.blocks, positions) {
                r.cache.set_limit(r.blocks.len() * BLOCK_POSITIONS);
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
        r.cache.set_limit(0);
    }

    /// Makes the prefix cache's block table match its entries after inserts: it takes free
    /// blocks for new entries, evicting the oldest entries while the pool has too few, and gives
    /// back the blocks of entries gone.
    pub(super) fn settle_prefixes(&mut self) {
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
