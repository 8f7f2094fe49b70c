//! Per-sequence key/value cache, so each sequence in a batch keeps its own history and its own
//! position: either one growable buffer per layer, or a block table into a shared paged pool
//! ([`KvPool`], the layout the GPU's paged decode attention reads).

use super::kv_pool::KvPool;
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// Keys and values of one layer: `[kv_heads, capacity, head_dim]` buffers, filled up to `len`.
#[derive(Debug, Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// Where a cache's keys and values live.
#[derive(Debug)]
enum Store {
    /// One growable buffer per layer.
    Buffers(Vec<LayerKv>),
    /// The blocks of a shared pool that `table` lists, in position order.
    Paged { pool: Arc<KvPool>, table: Vec<u32> },
}

/// The cache of one sequence. Its length is the position of the next token.
#[derive(Debug)]
pub struct KvCache {
    store: Store,
    num_layers: usize,
    len: usize,
    /// Length that layer writes have reached during the current forward (committed at the end).
    pending: usize,
    max_len: usize,
    /// Positions the engine's KV blocks cover (`None`: no pool); buffers never grow past it.
    limit: Option<usize>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers and a context of `max_len` positions.
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Self {
            store: Store::Buffers((0..num_layers).map(|_| LayerKv::default()).collect()),
            num_layers,
            len: 0,
            pending: 0,
            max_len,
            limit: None,
        }
    }

    /// An empty cache in `pool`'s blocks, for a context of `max_len` positions. It holds no
    /// block until [`KvCache::set_table`] gives it some.
    pub fn paged(pool: Arc<KvPool>, max_len: usize) -> Self {
        Self {
            num_layers: pool.num_layers(),
            store: Store::Paged {
                pool,
                table: Vec::new(),
            },
            len: 0,
            pending: 0,
            max_len,
            limit: None,
        }
    }

    /// A paged cache's pool and block table (`None` for per-layer buffers).
    pub fn paged_table(&self) -> Option<(&Arc<KvPool>, &[u32])> {
        match &self.store {
            Store::Paged { pool, table } => Some((pool, table)),
            Store::Buffers(_) => None,
        }
    }

    /// Gives a paged cache the blocks `table` lists (position order; the first ones must be
    /// those it already holds its history in). Errors for a buffer cache, ids outside the pool,
    /// or a table too short for the history.
    pub fn set_table(&mut self, new: Vec<u32>) -> Result<()> {
        let Store::Paged { pool, table } = &mut self.store else {
            candle_core::bail!("set_table on a cache that is not paged");
        };
        pool.check_table(&new)?;
        if new.len() * pool.block_positions() < self.len {
            candle_core::bail!(
                "a table of {} blocks cannot hold the {} positions in the cache",
                new.len(),
                self.len
            );
        }
        *table = new;
        Ok(())
    }

    /// For a paged cache: writes `k`, `v` (`[kv_heads, new, head_dim]`) of `layer` at positions
    /// `len()..len() + new` of its blocks, without reading the history back (a caller that reads
    /// the blocks in place); they become pending, as `append` makes them.
    pub fn write_paged(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let end = self.len + k.dims3()?.1;
        self.check_end(end)?;
        let Store::Paged { pool, table } = &self.store else {
            candle_core::bail!("write_paged on a cache that is not paged");
        };
        pool.write(layer, table, self.len, k, v)?;
        self.pending = end;
        Ok(())
    }

    /// For a paged cache, before its caller writes positions `len()..end` into the pool itself
    /// (batched decode): checks that the context and the blocks cover them and makes them
    /// pending, as `append` does.
    pub fn begin_paged_write(&mut self, end: usize) -> Result<()> {
        self.check_end(end)?;
        self.pending = end;
        Ok(())
    }

    /// `end` positions fit the context, the block limit and (paged) the table.
    fn check_end(&self, end: usize) -> Result<()> {
        if end > self.max_len {
            candle_core::bail!(
                "sequence of {end} positions exceeds the context length {}",
                self.max_len
            );
        }
        if let Some(limit) = self.limit.filter(|&l| end > l) {
            candle_core::bail!(
                "sequence of {end} positions exceeds the {limit} positions of its KV blocks"
            );
        }
        match &self.store {
            Store::Paged { pool, table } if end > table.len() * pool.block_positions() => {
                candle_core::bail!(
                    "sequence of {end} positions exceeds the {} positions of its KV blocks",
                    table.len() * pool.block_positions()
                )
            }
            Store::Paged { .. } => Ok(()),
            Store::Buffers(_) => Ok(()),
        }
    }

    /// Caps the buffers at `positions` positions (the blocks the engine granted this sequence);
    /// a write past it is an error, not a bigger buffer.
    pub fn set_limit(&mut self, positions: usize) {
        self.limit = Some(positions);
    }

    /// An empty cache of the same model, context and block limit (paged: the same blocks).
    pub fn empty_like(&self) -> Self {
        let store = match &self.store {
            Store::Buffers(layers) => {
                Store::Buffers(layers.iter().map(|_| LayerKv::default()).collect())
            }
            // The same blocks: they are still granted (release empties the table first).
            Store::Paged { pool, table } => Store::Paged {
                pool: pool.clone(),
                table: table.clone(),
            },
        };
        Self {
            store,
            num_layers: self.num_layers,
            len: 0,
            pending: 0,
            max_len: self.max_len,
            limit: self.limit,
        }
    }

    /// Tokens already in the cache (= the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache may hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Bytes held by the buffers (capacity, not just the filled part).
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Buffers(layers) => layers
                .iter()
                .flat_map(|l| [&l.k, &l.v])
                .flatten()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum(),
            Store::Paged { pool, table } => table.len() * pool.block_bytes(),
        }
    }

    /// Drops everything after the first `len` positions (e.g. to reuse a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.pending = self.len;
    }

    /// Appends `k`, `v` (`[kv_heads, new, head_dim]`) for `layer` and returns the whole history
    /// (`[kv_heads, len + new, head_dim]`).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (heads, new, dim) = k.dims3()?;
        let start = self.len;
        let end = start + new;
        if let Store::Paged { pool, table } = &self.store {
            self.check_end(end)?;
            pool.write(layer, table, start, k, v)?;
            let history = pool.read(layer, table, end)?;
            self.pending = end;
            return Ok(history);
        }
        let (kb, vb) = self.reserve(layer, end, (heads, dim), k.dtype(), k.device())?;
        kb.slice_set(&k.contiguous()?, 1, start)?;
        vb.slice_set(&v.contiguous()?, 1, start)?;
        Ok((kb.narrow(1, 0, end)?, vb.narrow(1, 0, end)?))
    }

    /// The buffers of `layer` (`[kv_heads, capacity, head_dim]` each, contiguous), grown so
    /// that positions `..end` fit (the history before `len()` is kept), for a caller that writes
    /// positions `len()..end` itself (batched decode); those become pending, as `append` makes
    /// them.
    pub fn reserve(
        &mut self,
        layer: usize,
        end: usize,
        (heads, dim): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let start = self.len;
        self.check_end(end)?;
        let cap_limit = self.limit.unwrap_or(usize::MAX).min(self.max_len.max(end));
        let Store::Buffers(layers) = &mut self.store else {
            candle_core::bail!("a paged KV cache has no per-layer buffers to reserve");
        };
        let Some(slot) = layers.get_mut(layer) else {
            candle_core::bail!("kv cache has no layer {layer}");
        };
        let grow = |buf: &Option<Tensor>| -> Result<Tensor> {
            let cap = buf.as_ref().map(|b| b.dims()[1]).unwrap_or(0);
            match buf {
                Some(b) if cap >= end => Ok(b.clone()),
                _ => {
                    let new_cap = (cap * 2).max(end).max(32).min(cap_limit);
                    let fresh = Tensor::zeros((heads, new_cap, dim), dtype, device)?;
                    if let Some(b) = buf {
                        if start > 0 {
                            fresh.slice_set(&b.narrow(1, 0, start)?.contiguous()?, 1, 0)?;
                        }
                    }
                    Ok(fresh)
                }
            }
        };
        let kb = grow(&slot.k)?;
        let vb = grow(&slot.v)?;
        slot.k = Some(kb.clone());
        slot.v = Some(vb.clone());
        self.pending = end;
        Ok((kb, vb))
    }

    /// Makes the positions written by the last forward part of the history.
    pub fn commit(&mut self) {
        self.len = self.pending;
    }

    /// A copy of the first `len` positions of every layer (`[kv_heads, len, head_dim]` keys and
    /// values, sharing nothing with this cache), e.g. for the engine's prefix cache.
    pub fn snapshot(&self, len: usize) -> Result<Vec<(Tensor, Tensor)>> {
        if len > self.len {
            candle_core::bail!("snapshot of {len} positions from a cache of {}", self.len);
        }
        let layers = match &self.store {
            Store::Buffers(layers) => layers,
            Store::Paged { pool, table } => {
                return (0..self.num_layers)
                    .map(|l| {
                        let (k, v) = pool.read(l, table, len)?;
                        Ok((k.contiguous()?, v.contiguous()?))
                    })
                    .collect();
            }
        };
        let owned = |t: &Option<Tensor>| -> Result<Tensor> {
            let Some(t) = t else {
                candle_core::bail!("snapshot of a layer that holds nothing");
            };
            let part = t.narrow(1, 0, len)?;
            // `contiguous` would share the buffer when the view already is contiguous.
            if part.is_contiguous() {
                part.copy()
            } else {
                part.contiguous()
            }
        };
        layers
            .iter()
            .map(|l| Ok((owned(&l.k)?, owned(&l.v)?)))
            .collect()
    }

    /// Fills an empty paged cache with `src`'s first `len` positions, both in the same pool:
    /// the first `shared_blocks` blocks of its table must be `src`'s own (the engine shares
    /// them: they already hold those positions and are never written again), and the rest,
    /// positions `shared_blocks · bs..len`, is copied from `src`'s blocks into its own. The next
    /// token is at `len`.
    pub fn share_prefix(&mut self, src: &KvCache, shared_blocks: usize, len: usize) -> Result<()> {
        if self.len != 0 {
            candle_core::bail!("share_prefix into a cache that already holds {}", self.len);
        }
        if len > src.len {
            candle_core::bail!("a prefix of {len} positions from a cache of {}", src.len);
        }
        let (Store::Paged { pool, table }, Some((src_pool, src_table))) =
            (&self.store, src.paged_table())
        else {
            candle_core::bail!("share_prefix needs two paged caches");
        };
        if !Arc::ptr_eq(pool, src_pool) {
            candle_core::bail!("share_prefix from a cache of another pool");
        }
        let shared = shared_blocks * pool.block_positions();
        if shared > len
            || table.len() < shared_blocks
            || src_table.len() < shared_blocks
            || table[..shared_blocks] != src_table[..shared_blocks]
        {
            candle_core::bail!(
                "share_prefix: the first {shared_blocks} blocks are not the source's, or hold more than {len} positions"
            );
        }
        self.check_end(len)?;
        pool.copy_positions(src_table, table, shared, len)?;
        self.pending = len;
        self.commit();
        Ok(())
    }

    /// Fills an empty cache with the first `len` positions of `kv` (one `[kv_heads, n, head_dim]`
    /// pair per layer, `n >= len`, as [`KvCache::snapshot`] gives): the next token is at `len`.
    pub fn load_prefix(&mut self, kv: &[(Tensor, Tensor)], len: usize) -> Result<()> {
        if self.len != 0 {
            candle_core::bail!("load_prefix into a cache that already holds {}", self.len);
        }
        if kv.len() != self.num_layers {
            candle_core::bail!(
                "prefix of {} layers for a cache of {}",
                kv.len(),
                self.num_layers
            );
        }
        if let Store::Paged { pool, table } = &self.store {
            self.check_end(len)?;
            for (layer, (k, v)) in kv.iter().enumerate() {
                pool.write(
                    layer,
                    table,
                    0,
                    &k.narrow(1, 0, len)?,
                    &v.narrow(1, 0, len)?,
                )?;
            }
            self.pending = len;
            self.commit();
            return Ok(());
        }
        for (layer, (k, v)) in kv.iter().enumerate() {
            let (heads, _, dim) = k.dims3()?;
            let (kb, vb) = self.reserve(layer, len, (heads, dim), k.dtype(), k.device())?;
            kb.slice_set(&k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            vb.slice_set(&v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
        }
        self.commit();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limited_cache_never_holds_more_than_its_blocks() {
        let dev = Device::Cpu;
        let kv = |n: usize| Tensor::ones((2, n, 4), DType::F32, &dev).unwrap();
        let mut c = KvCache::new(1, 100);
        c.set_limit(20);
        c.append(0, &kv(5), &kv(5)).unwrap();
        c.commit();
        // Doubling would give 32 positions; the blocks cover 20.
        assert_eq!(c.bytes(), 2 * (2 * 20 * 4) * 4);
        let err = c.append(0, &kv(16), &kv(16)).unwrap_err().to_string();
        assert!(err.contains("20 positions of its KV blocks"), "{err}");
        c.set_limit(48);
        let (k, _) = c.append(0, &kv(16), &kv(16)).unwrap();
        c.commit();
        assert_eq!((c.len(), k.dims3().unwrap()), (21, (2, 21, 4)));
        assert!(c.bytes() <= 2 * (2 * 48 * 4) * 4);
        // An emptied cache keeps its limit.
        let e = c.empty_like();
        assert_eq!((e.len(), e.limit, e.max_len), (0, Some(48), 100));
    }

    #[test]
    fn a_paged_cache_holds_what_a_buffer_cache_holds() {
        let dev = Device::Cpu;
        let kv = |n: usize, at: f32| {
            let data: Vec<f32> = (0..2 * n * 4).map(|i| at + i as f32).collect();
            Tensor::from_vec(data, (2, n, 4), &dev).unwrap()
        };
        let pool = Arc::new(KvPool::new(2, 8, 4, (2, 4), DType::F32, &dev).unwrap());
        let mut paged = KvCache::paged(pool.clone(), 100);
        let mut plain = KvCache::new(2, 100);
        // No blocks yet: nothing fits.
        let err = paged.append(0, &kv(3, 0.0), &kv(3, 0.0)).unwrap_err();
        assert!(
            err.to_string().contains("0 positions of its KV blocks"),
            "{err}"
        );
        paged.set_table(vec![6, 2]).unwrap();
        assert_eq!(paged.bytes(), 2 * pool.block_bytes());
        for (n, at) in [(3, 0.0), (4, 1000.0)] {
            for l in 0..2 {
                let a = paged.append(l, &kv(n, at + l as f32), &kv(n, -at)).unwrap();
                let b = plain.append(l, &kv(n, at + l as f32), &kv(n, -at)).unwrap();
                assert_eq!(a.0.to_vec3::<f32>().unwrap(), b.0.to_vec3::<f32>().unwrap());
                assert_eq!(a.1.to_vec3::<f32>().unwrap(), b.1.to_vec3::<f32>().unwrap());
            }
            paged.commit();
            plain.commit();
        }
        assert_eq!(paged.len(), 7);
        // Past its 8 positions until the table grows; a table that drops history is refused.
        let err = paged.append(0, &kv(2, 0.0), &kv(2, 0.0)).unwrap_err();
        assert!(
            err.to_string().contains("8 positions of its KV blocks"),
            "{err}"
        );
        assert!(paged.set_table(vec![6]).is_err());
        assert!(paged.set_table(vec![6, 2, 9]).is_err());
        paged.set_table(vec![6, 2, 0]).unwrap();
        // Snapshots are equal, and a prefix loads into another paged cache of the pool.
        let (sa, sb) = (paged.snapshot(6).unwrap(), plain.snapshot(6).unwrap());
        for ((ka, va), (kb, vb)) in sa.iter().zip(&sb) {
            assert_eq!(ka.to_vec3::<f32>().unwrap(), kb.to_vec3::<f32>().unwrap());
            assert_eq!(va.to_vec3::<f32>().unwrap(), vb.to_vec3::<f32>().unwrap());
        }
        // An emptied cache keeps its blocks, as a buffer cache keeps its limit.
        let mut other = paged.empty_like();
        assert_eq!((other.len(), other.bytes()), (0, 3 * pool.block_bytes()));
        assert_eq!(other.paged_table().unwrap().1, [6, 2, 0]);
        other.set_table(vec![5, 1]).unwrap();
        other.load_prefix(&sb, 6).unwrap();
        let again = other.snapshot(6).unwrap();
        assert_eq!(
            again[1].0.to_vec3::<f32>().unwrap(),
            sb[1].0.to_vec3::<f32>().unwrap()
        );
        // The first cache's blocks were not touched by the second's writes.
        let mine = paged.snapshot(7).unwrap();
        assert_eq!(
            mine[1].1.to_vec3::<f32>().unwrap(),
            plain.snapshot(7).unwrap()[1].1.to_vec3::<f32>().unwrap()
        );
        // A paged cache has no per-layer buffers; a buffer cache takes no table.
        assert!(paged.reserve(0, 8, (2, 4), DType::F32, &dev).is_err());
        assert!(plain.set_table(vec![0]).is_err());
        assert!(paged.begin_paged_write(13).is_err());
        paged.begin_paged_write(12).unwrap();
    }
}
