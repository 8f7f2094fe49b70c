//! A paged KV pool: for every layer one K and one V tensor of fixed-size blocks,
//! `[blocks, kv_heads, block_positions, head_dim]`, allocated once on the model's device. Paged
//! caches (`KvCache::paged`) hold block tables into it: position `t` of a sequence lives at
//! block `table[t / block_positions]`, slot `t % block_positions`. The runtime's decode step
//! reads and writes it through block tables in one op per layer (`runtime::paged_kv`); this
//! module writes position ranges and reads histories back as contiguous tensors (prompt chunks,
//! prefix snapshots).

use candle_core::{bail, DType, Device, Result, Tensor};

/// The pool of one model: per layer `(k, v)`, each `[blocks, nkv, block_positions, hd]`.
#[derive(Debug)]
pub struct KvPool {
    layers: Vec<(Tensor, Tensor)>,
    blocks: usize,
    block_positions: usize,
    heads: (usize, usize),
}

impl KvPool {
    /// A zeroed pool of `blocks` blocks of `block_positions` positions for `num_layers` layers
    /// of `nkv` KV heads of dim `hd`, in `dtype` on `device` (an error, not a crash, when the
    /// device cannot hold it).
    pub fn new(
        num_layers: usize,
        blocks: usize,
        block_positions: usize,
        (nkv, hd): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if blocks == 0 || block_positions == 0 || nkv == 0 || hd == 0 {
            bail!("a KV pool needs blocks, positions, heads and a head dim (got {blocks} blocks of {block_positions} positions, {nkv} heads of dim {hd})");
        }
        if blocks.saturating_mul(block_positions) > u32::MAX as usize {
            bail!("a KV pool of {blocks} blocks of {block_positions} positions is too large");
        }
        let shape = (blocks, nkv, block_positions, hd);
        let layers = (0..num_layers)
            .map(|_| {
                let k = Tensor::zeros(shape, dtype, device)?;
                Ok((k, Tensor::zeros(shape, dtype, device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            blocks,
            block_positions,
            heads: (nkv, hd),
        })
    }

    /// Layers the pool holds.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Blocks in the pool.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Positions one block holds.
    pub fn block_positions(&self) -> usize {
        self.block_positions
    }

    /// Bytes of one block over all layers, keys and values.
    pub fn block_bytes(&self) -> usize {
        let per_layer = self.layers.first().map_or(0, |(k, _)| {
            2 * k.dtype().size_in_bytes() * k.elem_count() / self.blocks
        });
        per_layer * self.layers.len()
    }

    /// Layer `l`'s `(k, v)` pools.
    pub fn layer(&self, l: usize) -> Result<(&Tensor, &Tensor)> {
        match self.layers.get(l) {
            Some((k, v)) => Ok((k, v)),
            None => bail!("the KV pool has no layer {l}"),
        }
    }

    /// Checks that `table`'s ids are blocks of this pool.
    pub fn check_table(&self, table: &[u32]) -> Result<()> {
        match table.iter().find(|&&id| id as usize >= self.blocks) {
            Some(id) => bail!("block {id} is outside the KV pool of {}", self.blocks),
            None => Ok(()),
        }
    }

    /// Writes `k`, `v` (`[nkv, n, hd]`) at positions `start..start + n` of `table` in layer
    /// `l`, one copy per block the range touches. The table must cover the range.
    pub fn write(
        &self,
        l: usize,
        table: &[u32],
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let (kp, vp) = self.layer(l)?;
        let (nkv, n, hd) = k.dims3()?;
        if (nkv, hd) != self.heads || v.dims() != k.dims() {
            bail!(
                "KV rows {:?} / {:?} do not fit a pool of {} heads of dim {}",
                k.dims(),
                v.dims(),
                self.heads.0,
                self.heads.1
            );
        }
        let end = start + n;
        let bs = self.block_positions;
        if end > table.len() * bs {
            bail!(
                "positions up to {end} are past the {} positions of the KV blocks",
                table.len() * bs
            );
        }
        self.check_table(table)?;
        let mut p = start;
        while p < end {
            let (block, off) = (table[p / bs] as usize, p % bs);
            let seg = (bs - off).min(end - p);
            for (pool, rows) in [(kp, k), (vp, v)] {
                let part = rows.narrow(1, p - start, seg)?.contiguous()?;
                pool.get(block)?.slice_set(&part, 1, off)?;
            }
            p += seg;
        }
        Ok(())
    }

    /// Copies positions `from..to` of every layer from the blocks of `src` to those of `dst`
    /// (one gather of the source blocks the range touches per layer, then `write`).
    pub fn copy_positions(&self, src: &[u32], dst: &[u32], from: usize, to: usize) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        let bs = self.block_positions;
        let first = from / bs;
        if to.div_ceil(bs) > src.len() {
            bail!(
                "positions up to {to} are past the {} positions of the source blocks",
                src.len() * bs
            );
        }
        self.check_table(&src[first..to.div_ceil(bs)])?;
        for l in 0..self.num_layers() {
            let (kp, vp) = self.layer(l)?;
            let (k, v) = gather_history(kp, vp, &src[first..], to - first * bs)?;
            let (k, v) = (
                k.narrow(1, from - first * bs, to - from)?,
                v.narrow(1, from - first * bs, to - from)?,
            );
            self.write(l, dst, from, &k, &v)?;
        }
        Ok(())
    }

    /// Positions `0..len` of `table` in layer `l` as `[nkv, len, hd]` keys and values (copies).
    pub fn read(&self, l: usize, table: &[u32], len: usize) -> Result<(Tensor, Tensor)> {
        let (kp, vp) = self.layer(l)?;
        let used = len.div_ceil(self.block_positions).min(table.len());
        self.check_table(&table[..used])?;
        gather_history(kp, vp, table, len)
    }
}

/// Positions `0..len` of `table` from one layer's pools `k`, `v` (`[blocks, nkv, bs, hd]`) as
/// `[nkv, len, hd]` keys and values (copies). The table's first `⌈len / bs⌉` ids must be blocks
/// of the pools (callers check; `index_select` errors otherwise).
pub fn gather_history(
    k: &Tensor,
    v: &Tensor,
    table: &[u32],
    len: usize,
) -> Result<(Tensor, Tensor)> {
    let (_, nkv, bs, hd) = k.dims4()?;
    let used = len.div_ceil(bs.max(1));
    if used > table.len() {
        bail!(
            "{len} positions are past the {} positions of the KV blocks",
            table.len() * bs
        );
    }
    if used == 0 {
        let empty = Tensor::zeros((nkv, 0, hd), k.dtype(), k.device())?;
        return Ok((empty.clone(), empty));
    }
    let ids = Tensor::from_slice(&table[..used], used, k.device())?;
    let one = |pool: &Tensor| -> Result<Tensor> {
        // [used, nkv, bs, hd] -> [nkv, used · bs, hd] -> the first len positions.
        let blocks = pool.index_select(&ids, 0)?.transpose(0, 1)?.contiguous()?;
        blocks.reshape((nkv, used * bs, hd))?.narrow(1, 0, len)
    };
    Ok((one(k)?, one(v)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, seed: f32) -> Tensor {
        let data: Vec<f32> = (0..2 * n * 3).map(|i| seed + i as f32).collect();
        Tensor::from_vec(data, (2, n, 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn writes_across_blocks_read_back_in_table_order() -> Result<()> {
        let pool = KvPool::new(2, 6, 4, (2, 3), DType::F32, &Device::Cpu)?;
        assert_eq!(pool.block_bytes(), 2 * 2 * (2 * 4 * 3) * 4);
        let table = [4u32, 1, 5];
        // Positions 0..3, then 3..10 (crossing two block boundaries), in layer 1 only.
        pool.write(1, &table, 0, &rows(3, 0.0), &rows(3, 100.0))?;
        pool.write(1, &table, 3, &rows(7, 1000.0), &rows(7, 2000.0))?;
        let (k, v) = pool.read(1, &table, 10)?;
        let want = |a: Tensor, b: Tensor| Tensor::cat(&[a, b], 1).unwrap();
        let (wk, wv) = (
            want(rows(3, 0.0), rows(7, 1000.0)),
            want(rows(3, 100.0), rows(7, 2000.0)),
        );
        assert_eq!(k.to_vec3::<f32>()?, wk.to_vec3::<f32>()?);
        assert_eq!(v.to_vec3::<f32>()?, wv.to_vec3::<f32>()?);
        // Block 4 holds positions 0..4: 0..3 from the first write, 3 from the second.
        let b4 = pool.layer(1)?.0.get(4)?.to_vec3::<f32>()?;
        assert_eq!(b4[0][3], vec![1000.0, 1001.0, 1002.0]);
        // Layer 0 and unlisted blocks stay zero.
        let zero = |t: Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|&x| x == 0.0)
        };
        assert!(zero(pool.layer(0)?.0.clone()));
        assert!(zero(pool.layer(1)?.0.get(0)?) && zero(pool.layer(1)?.1.get(2)?));
        assert_eq!(pool.read(1, &table, 0)?.0.dims(), [2, 0, 3]);
        Ok(())
    }

    #[test]
    fn writes_and_reads_outside_the_blocks_are_errors() -> Result<()> {
        let pool = KvPool::new(1, 6, 4, (2, 3), DType::F32, &Device::Cpu)?;
        let fails = |r: Result<()>, needle: &str| {
            let msg = r.expect_err("must fail").to_string();
            assert!(msg.contains(needle), "{msg}");
        };
        fails(
            pool.write(0, &[0, 1], 6, &rows(3, 0.0), &rows(3, 0.0)),
            "past the 8 positions",
        );
        fails(
            pool.write(0, &[0, 6], 0, &rows(5, 0.0), &rows(5, 0.0)),
            "block 6 is outside",
        );
        fails(
            pool.write(1, &[0], 0, &rows(1, 0.0), &rows(1, 0.0)),
            "no layer 1",
        );
        let wide = Tensor::zeros((3, 1, 3), DType::F32, &Device::Cpu)?;
        fails(pool.write(0, &[0], 0, &wide, &wide), "do not fit");
        fails(pool.read(0, &[0], 5).map(|_| ()), "past the 4 positions");
        fails(
            KvPool::new(1, 0, 4, (2, 3), DType::F32, &Device::Cpu).map(|_| ()),
            "needs blocks",
        );
        Ok(())
    }
}
