//! Per-sequence key/value cache: one growable buffer per layer, so each sequence in a batch keeps
//! its own history and its own position.

use candle_core::{DType, Device, Result, Tensor};

/// Keys and values of one layer: `[kv_heads, capacity, head_dim]` buffers, filled up to `len`.
#[derive(Debug, Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// The cache of one sequence. Its length is the position of the next token.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
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
            layers: (0..num_layers).map(|_| LayerKv::default()).collect(),
            len: 0,
            pending: 0,
            max_len,
            limit: None,
        }
    }

    /// Caps the buffers at `positions` positions (the blocks the engine granted this sequence);
    /// a write past it is an error, not a bigger buffer.
    pub fn set_limit(&mut self, positions: usize) {
        self.limit = Some(positions);
    }

    /// An empty cache of the same model, context and block limit.
    pub fn empty_like(&self) -> Self {
        Self {
            layers: self.layers.iter().map(|_| LayerKv::default()).collect(),
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
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
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
        let cap_limit = self.limit.unwrap_or(usize::MAX).min(self.max_len.max(end));
        let Some(slot) = self.layers.get_mut(layer) else {
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
        self.layers
            .iter()
            .map(|l| Ok((owned(&l.k)?, owned(&l.v)?)))
            .collect()
    }

    /// Fills an empty cache with the first `len` positions of `kv` (one `[kv_heads, n, head_dim]`
    /// pair per layer, `n >= len`, as [`KvCache::snapshot`] gives): the next token is at `len`.
    pub fn load_prefix(&mut self, kv: &[(Tensor, Tensor)], len: usize) -> Result<()> {
        if self.len != 0 {
            candle_core::bail!("load_prefix into a cache that already holds {}", self.len);
        }
        if kv.len() != self.layers.len() {
            candle_core::bail!(
                "prefix of {} layers for a cache of {}",
                kv.len(),
                self.layers.len()
            );
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
}
