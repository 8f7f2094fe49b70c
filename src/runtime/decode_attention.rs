//! Placeholder (replaced by the batched decode-attention op with its CUDA kernels): the same
//! math with candle ops per sequence.

use candle_core::{DType, Result, Tensor, D};

/// One sequence's KV buffers for one layer: `[nkv, cap, hd]` each, contiguous.
pub struct KvBuffers<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
}

/// Writes row `b` of `k_new`/`v_new` (`[B, nkv, hd]`) at position `pos[b]` of its buffers.
pub fn append_kv_rows(
    k_new: &Tensor,
    v_new: &Tensor,
    bufs: &[KvBuffers<'_>],
    pos: &[usize],
) -> Result<()> {
    for (b, (buf, &p)) in bufs.iter().zip(pos).enumerate() {
        buf.k
            .slice_set(&k_new.get(b)?.unsqueeze(1)?.contiguous()?, 1, p)?;
        buf.v
            .slice_set(&v_new.get(b)?.unsqueeze(1)?.contiguous()?, 1, p)?;
    }
    Ok(())
}

/// Single-token attention of each row over its own first `len[b]` positions (GQA).
pub fn decode_attention(
    q: &Tensor,
    bufs: &[KvBuffers<'_>],
    len: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let (_b, nh, hd) = q.dims3()?;
    let mut out = Vec::with_capacity(bufs.len());
    for (b, (buf, &l)) in bufs.iter().zip(len).enumerate() {
        let nkv = buf.k.dims()[0];
        let k = buf.k.narrow(1, 0, l)?;
        let v = buf.v.narrow(1, 0, l)?.contiguous()?;
        let qg = q.get(b)?.reshape((nkv, nh / nkv, hd))?;
        let att = (qg.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale as f64)?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?.to_dtype(q.dtype())?;
        out.push(att.matmul(&v)?.reshape(nh * hd)?);
    }
    Tensor::stack(&out, 0)
}
