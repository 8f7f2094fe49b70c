//! The KV budget as a pool of fixed-size blocks (vLLM's paged accounting).
//!
//! A budget of `B` bytes becomes `B / (BLOCK_POSITIONS × bytes per position)` blocks of
//! [`BLOCK_POSITIONS`] positions each. Every running sequence holds a block table: the ids of the
//! blocks that cover its positions so far. It is admitted when its prompt's blocks are free (not
//! its prompt plus `max_tokens`, which most sequences never reach), gains one block each time it
//! crosses a block boundary, and gives them all back when it ends or is preempted. A sequence's
//! KV storage never holds more positions than its table covers (`KvCache::set_limit`), so the
//! pool's use is the bytes really held.
//!
//! The ids are what a device pool's block tables index; on the CPU each sequence's storage is
//! still one buffer per layer, sized to its blocks.
//!
//! With paged caches a block may be in several tables at once — a cached prefix's full blocks
//! and every sequence that starts with that prefix (`engine::kv_memory`) — so each block counts
//! its holders: [`KvBlocks::share`] adds one, [`KvBlocks::release`] removes one, and a block is
//! free again when its last holder lets it go. Shared blocks are only ever read.

/// Positions one block holds (vLLM's default block size).
pub const BLOCK_POSITIONS: usize = 16;

/// The free and used blocks of the engine's KV budget.
#[derive(Debug)]
pub struct KvBlocks {
    total: usize,
    /// Ids of blocks given back (the most recently freed last, reused first).
    freed: Vec<u32>,
    /// Ids from here to `total` were never handed out (so a big pool costs nothing up front).
    fresh: usize,
    /// Holders of each block handed out so far (index: id; 0: free).
    holders: Vec<u32>,
}

impl KvBlocks {
    /// The pool a budget of `budget_bytes` holds, for `bytes_per_position` bytes of KV each.
    pub fn for_budget(budget_bytes: usize, bytes_per_position: usize) -> Self {
        let block_bytes = BLOCK_POSITIONS.saturating_mul(bytes_per_position).max(1);
        Self::with_blocks(budget_bytes / block_bytes)
    }

    /// A pool of `total` blocks, all free.
    pub fn with_blocks(total: usize) -> Self {
        let total = total.min(u32::MAX as usize);
        Self {
            total,
            freed: Vec::new(),
            fresh: 0,
            holders: Vec::new(),
        }
    }

    /// Blocks that cover `positions` positions.
    pub fn blocks_for(positions: usize) -> usize {
        positions.div_ceil(BLOCK_POSITIONS)
    }

    /// Every block of the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks no sequence holds.
    pub fn free(&self) -> usize {
        self.freed.len() + (self.total - self.fresh)
    }

    /// Blocks held by sequences.
    pub fn used(&self) -> usize {
        self.total - self.free()
    }

    /// Positions the whole pool holds.
    pub fn capacity_positions(&self) -> usize {
        self.total * BLOCK_POSITIONS
    }

    /// Extends `table` to cover `positions` positions with blocks of its own (one holder each).
    /// Takes nothing and returns false when the pool has too few free blocks.
    pub fn grow(&mut self, table: &mut Vec<u32>, positions: usize) -> bool {
        let want = Self::blocks_for(positions).saturating_sub(table.len());
        if want > self.free() {
            return false;
        }
        let from = table.len();
        let recycled = want.min(self.freed.len());
        let keep = self.freed.len() - recycled;
        table.extend(self.freed.drain(keep..).rev());
        let new = want - recycled;
        // `total` fits u32 (see `with_blocks`), so every fresh id does.
        table.extend((self.fresh..self.fresh + new).map(|id| id as u32));
        self.fresh += new;
        self.holders.resize(self.fresh, 0);
        for &id in &table[from..] {
            self.holders[id as usize] = 1;
        }
        true
    }

    /// Adds a holder to each of `ids` (a table starting with blocks another table holds).
    /// False, with nothing changed, when one of them is free or outside the pool.
    pub fn share(&mut self, ids: &[u32]) -> bool {
        if ids.iter().any(|&id| self.holders(id) == 0) {
            return false;
        }
        for &id in ids {
            self.holders[id as usize] += 1;
        }
        true
    }

    /// How many tables hold block `id` (0: free).
    pub fn holders(&self, id: u32) -> u32 {
        self.holders.get(id as usize).copied().unwrap_or(0)
    }

    /// Lets go of every block of `table` (the table is left empty): each loses a holder and is
    /// free once it has none.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for id in table.drain(..).rev() {
            match self.holders.get_mut(id as usize) {
                Some(h) if *h > 1 => *h -= 1,
                Some(h) if *h == 1 => {
                    *h = 0;
                    self.freed.push(id);
                }
                // Never: every table holds what it lists.
                _ => tracing::error!("KV blocks: block {id} released but not held"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_becomes_whole_blocks() {
        // 100 positions' bytes hold 6 whole blocks of 16.
        let pool = KvBlocks::for_budget(100 * 512, 512);
        assert_eq!((pool.total(), pool.free(), pool.used()), (6, 6, 0));
        assert_eq!(pool.capacity_positions(), 96);
        assert_eq!(KvBlocks::for_budget(15 * 512, 512).total(), 0);
        assert_eq!(KvBlocks::blocks_for(0), 0);
        assert_eq!(KvBlocks::blocks_for(16), 1);
        assert_eq!(KvBlocks::blocks_for(17), 2);
    }

    #[test]
    fn tables_grow_by_whole_blocks_and_give_them_back() {
        let mut pool = KvBlocks::with_blocks(5);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        assert!(pool.grow(&mut a, 3));
        assert_eq!(a.len(), 1);
        // Positions inside blocks already held take nothing.
        assert!(pool.grow(&mut a, 16));
        assert_eq!(a.len(), 1);
        assert!(pool.grow(&mut a, 33));
        assert_eq!((a.len(), pool.free()), (3, 2));
        // Too few free blocks: nothing is taken.
        assert!(!pool.grow(&mut b, 3 * 16));
        assert_eq!((b.len(), pool.free()), (0, 2));
        assert!(pool.grow(&mut b, 2 * 16));
        assert_eq!(pool.free(), 0);
        // Every id is held once.
        let mut ids: Vec<u32> = a.iter().chain(&b).copied().collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![0, 1, 2, 3, 4]);
        pool.release(&mut a);
        assert!(a.is_empty());
        assert_eq!((pool.free(), pool.used()), (3, 2));
        assert!(pool.grow(&mut b, 5 * 16));
        let mut ids = b.clone();
        ids.sort_unstable();
        assert_eq!(ids, vec![0, 1, 2, 3, 4]);
        pool.release(&mut b);
        assert_eq!(pool.free(), 5);
        // A pool of a billion blocks costs nothing until used.
        let mut big = KvBlocks::with_blocks(1 << 30);
        let mut t = Vec::new();
        assert!(big.grow(&mut t, 3 * 16));
        assert_eq!((t, big.used()), (vec![0, 1, 2], 3));
    }

    #[test]
    fn shared_blocks_are_free_when_their_last_holder_lets_go() {
        let mut pool = KvBlocks::with_blocks(4);
        let mut entry = Vec::new();
        assert!(pool.grow(&mut entry, 2 * 16));
        // A sequence starting with the entry's two blocks, plus one of its own.
        let mut seq = entry.clone();
        assert!(pool.share(&seq));
        assert!(pool.grow(&mut seq, 3 * 16));
        assert_eq!((pool.used(), pool.free()), (3, 1));
        assert_eq!(pool.holders(entry[0]), 2);
        // Free or unknown ids cannot be shared.
        let free_id = (0..4).find(|&id| pool.holders(id) == 0).unwrap();
        assert!(!pool.share(&[entry[0], free_id]));
        assert!(!pool.share(&[99]));
        assert_eq!(pool.holders(entry[0]), 2, "a refused share changes nothing");
        // The entry goes: its blocks stay held by the sequence.
        pool.release(&mut entry);
        assert_eq!((pool.used(), pool.free()), (3, 1));
        pool.release(&mut seq);
        assert_eq!((pool.used(), pool.free()), (0, 4));
        assert!((0..4).all(|id| pool.holders(id) == 0));
    }
}
