//! The engine's KV memory under a KV budget: one pool of blocks ([`KvBlocks`]) shared by the
//! running sequences and the prefix cache.
//!
//! The prefix cache's entries hold blocks of the pool too (their own table), so the budget
//! bounds everything the engine keeps. Cached prefixes only use blocks no sequence needs: when a
//! sequence must grow or one waiting must be admitted and too few blocks are free, cached
//! entries are evicted first (least recently used), and only once the cache is empty is a
//! running sequence preempted. Without a budget there is no pool and the prefix cache keeps its
//! own byte cap.
//!
//! With paged caches the blocks a prefix fills whole are shared, not copied: an entry made from
//! a running sequence's prompt holds the same blocks as the sequence, and a sequence that starts
//! with a cached prefix holds the entry's blocks; only the positions of a last, partly filled
//! block are copied (into a block of the new holder's own, since its owner goes on writing
//! there). A block is free when its last holder lets it go, and nothing writes into a block
//! another table holds.

use super::kv_blocks::{KvBlocks, BLOCK_POSITIONS};
use super::prefix_cache::{PrefixCache, PrefixHit, StackKey, Stored};
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
        // Blocks shared by an entry and sequences count as the cache's.
        let prefix = (self.prefix_blocks.len() + self.prefixes.paged_blocks()).min(pool.used());
        Some((pool.total(), pool.used() - prefix, prefix))
    }

    /// Keeps the history of `tokens` from `cache` in the prefix cache under `key`. Paged, the
    /// entry shares the blocks `tokens` fill whole and copies the rest into a block of its own,
    /// taken from free ones (evicting older entries, never preempting anyone); skipped when even
    /// an empty prefix cache leaves too few.
    pub(super) fn insert_prefix(&mut self, key: &StackKey, tokens: &[u32], cache: &KvCache) {
        let Some(storage) = self.paged.clone() else {
            self.prefixes.insert(key, tokens, cache);
            return;
        };
        if !self.prefixes.wants(key, tokens, cache) {
            return;
        }
        let full = tokens.len() / BLOCK_POSITIONS;
        let mut table: Vec<u32> = match cache.paged_table() {
            Some((_, t)) if t.len() >= full => t[..full].to_vec(),
            _ => Vec::new(),
        };
        let Some(pool) = &mut self.pool else {
            return;
        };
        if !pool.share(&table) {
            table.clear();
        }
        let shared = table.len();
        loop {
            let Some(pool) = &mut self.pool else {
                return;
            };
            if pool.grow(&mut table, tokens.len()) {
                break;
            }
            if !self.evict_prefix() {
                if let Some(pool) = &mut self.pool {
                    pool.release(&mut table);
                }
                return;
            }
        }
        let mut entry = KvCache::paged(storage, tokens.len());
        let copied = entry
            .set_table(table.clone())
            .and_then(|()| entry.share_prefix(cache, shared, tokens.len()));
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

    /// The cached entry of `hit` and its blocks that the reused part fills whole, when `r`
    /// may share them: paged caches, a pool, the entry still cached, at least one whole block.
    fn shareable_blocks(&self, hit: &PrefixHit) -> Option<(Arc<KvCache>, Vec<u32>)> {
        let full = hit.len / BLOCK_POSITIONS;
        let entry = hit.paged_entry()?;
        if full == 0 || self.paged.is_none() || self.pool.is_none() || !self.prefixes.holds(entry) {
            return None;
        }
        let (_, table) = entry.paged_table()?;
        (table.len() >= full).then(|| (entry.clone(), table[..full].to_vec()))
    }

    /// Positions of `hit` a sequence starting with it would hold in shared blocks (0: it would
    /// copy them), so that admission asks only for the blocks of the rest.
    pub(super) fn shareable(&self, hit: Option<&PrefixHit>) -> usize {
        hit.and_then(|h| self.shareable_blocks(h))
            .map_or(0, |(_, shared)| shared.len() * BLOCK_POSITIONS)
    }

    /// Starts `r`'s table (empty: before its grant) with the blocks of `hit`'s entry that the
    /// reused part fills whole, shared; nothing when they cannot be shared.
    pub(super) fn share_hit_blocks(&mut self, r: &mut Running, hit: Option<&PrefixHit>) {
        if !r.blocks.is_empty() || !r.cache.is_empty() {
            return;
        }
        let Some((_, shared)) = hit.and_then(|h| self.shareable_blocks(h)) else {
            return;
        };
        if let Some(pool) = &mut self.pool {
            if pool.share(&shared) {
                r.blocks = shared;
                give_blocks(r);
            }
        }
    }

    /// Fills `r`'s empty cache (its blocks granted for what it fills) with `hit`'s reused
    /// positions. From a paged entry still cached, `r`'s first blocks are the entry's blocks
    /// that the reused part fills whole (shared at admission, `share_hit_blocks`, or here in
    /// place of blocks granted before — those go back) and only the rest is copied; otherwise
    /// (buffer caches, or the entry evicted to make room for `r`) everything is copied. On an
    /// error `r` holds no shared block any more. Returns the blocks shared.
    pub(super) fn load_hit(
        &mut self,
        r: &mut Running,
        hit: &PrefixHit,
    ) -> candle_core::Result<usize> {
        let Some((entry, shared)) = self.shareable_blocks(hit) else {
            return hit.load_into(&mut r.cache).map(|()| 0);
        };
        let full = shared.len();
        if r.blocks.len() < full {
            return hit.load_into(&mut r.cache).map(|()| 0);
        }
        let pre_shared = r.blocks[..full] == shared[..];
        let mut own = Vec::new();
        if !pre_shared {
            let Some(pool) = &mut self.pool else {
                return hit.load_into(&mut r.cache).map(|()| 0);
            };
            if !pool.share(&shared) {
                return hit.load_into(&mut r.cache).map(|()| 0);
            }
            own = r.blocks.splice(..full, shared).collect();
        }
        let loaded = r
            .cache
            .set_table(r.blocks.clone())
            .and_then(|()| r.cache.share_prefix(&entry, full, hit.len));
        if let Err(e) = loaded {
            // Back to blocks of its own, empty: nothing may write into the shared ones.
            if pre_shared {
                if !self.unshare(r) {
                    self.release(r);
                }
            } else if let Some(pool) = &mut self.pool {
                let mut back: Vec<u32> = r.blocks.splice(..full, own).collect();
                pool.release(&mut back);
                r.cache.truncate(0);
                give_blocks(r);
            }
            return Err(e);
        }
        if let Some(pool) = &mut self.pool {
            pool.release(&mut own);
        }
        Ok(full)
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

    /// Gives `r` blocks of its own in place of those it shares with a cached prefix (before its
    /// cache is emptied and filled again); false, with nothing changed, when too few are free.
    /// The positions those blocks held are gone: the caller empties the cache.
    pub(super) fn unshare(&mut self, r: &mut Running) -> bool {
        let Some(pool) = &mut self.pool else {
            return true;
        };
        let shared: Vec<usize> = (0..r.blocks.len())
            .filter(|&i| pool.holders(r.blocks[i]) > 1)
            .collect();
        if shared.is_empty() {
            return true;
        }
        let mut fresh = Vec::new();
        if !pool.grow(&mut fresh, shared.len() * BLOCK_POSITIONS) {
            return false;
        }
        let mut old: Vec<u32> = Vec::with_capacity(shared.len());
        for (i, id) in shared.into_iter().zip(fresh) {
            old.push(std::mem::replace(&mut r.blocks[i], id));
        }
        pool.release(&mut old);
        r.cache.truncate(0);
        give_blocks(r);
        true
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
