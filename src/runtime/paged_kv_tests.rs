//! Tests of `runtime::paged_kv` on the CPU: the paged ops against the contiguous ones of
//! `runtime::decode_attention` on the same histories, and their refusals.

use super::*;
use crate::runtime::decode_attention::{append_kv_rows, decode_attention, KvBuffers};

fn t(data: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(data, dims, &Device::Cpu).expect("tensor")
}

fn noise(n: usize, seed: u64) -> Vec<f32> {
    let v = crate::quant::test_noise(n, seed);
    v.iter().map(|x| 4.0 * x).collect()
}

fn fails<T: std::fmt::Debug>(res: Result<T>, needle: &str) {
    let msg = res.expect_err("must fail").to_string();
    assert!(msg.contains(needle), "{msg:?} does not say {needle:?}");
}

/// GQA 6 query heads over 2 KV heads, hd 8, blocks of 4 positions, a pool of 9 blocks.
const NH: usize = 6;
const NKV: usize = 2;
const HD: usize = 8;
const BS: usize = 4;
const BLOCKS: usize = 9;
/// 3 rows: lengths 1, 9 and 7 after the append; rows 1 and 2 share block 5 (positions 0..4).
const LEN: [usize; 3] = [1, 9, 7];
const TABLES: [&[u32]; 3] = [&[2], &[5, 0, 7], &[5, 8]];

fn pool(seed: u64) -> (Tensor, Tensor) {
    let dims = [BLOCKS, NKV, BS, HD];
    let n = BLOCKS * NKV * BS * HD;
    (t(noise(n, seed), &dims), t(noise(n, seed + 1), &dims))
}

/// Row `row`'s first `cap` positions as contiguous `[nkv, cap, hd]` copies (the layout of
/// `decode_attention`'s buffers).
fn contiguous(k: &Tensor, table: &[u32], cap: usize) -> Result<Tensor> {
    gather_history(k, k, table, cap)?.0.contiguous()
}

#[test]
fn paged_ops_equal_the_contiguous_ones_on_the_same_history() -> Result<()> {
    let (k_pool, v_pool) = pool(1);
    let paged = PagedKv {
        k: &k_pool,
        v: &v_pool,
    };
    // The same histories as contiguous buffers, each with its whole table's capacity.
    let bufs = (TABLES.iter())
        .map(|tb| {
            let cap = tb.len() * BS;
            Ok((contiguous(&k_pool, tb, cap)?, contiguous(&v_pool, tb, cap)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<KvBuffers<'_>> = bufs.iter().map(|(k, v)| KvBuffers { k, v }).collect();
    // Rows 1 and 2 share block 5 but append past it (positions 8 and 6).
    let pos = LEN.map(|l| l - 1);
    let (k_new, v_new) = (
        t(noise(3 * NKV * HD, 50), &[3, NKV, HD]),
        t(noise(3 * NKV * HD, 51), &[3, NKV, HD]),
    );
    paged_append_kv_rows(&k_new, &v_new, paged, &TABLES, &pos)?;
    append_kv_rows(&k_new, &v_new, &refs, &pos)?;
    for (row, (tb, (k, v))) in TABLES.iter().zip(&bufs).enumerate() {
        let cap = tb.len() * BS;
        let got_k = contiguous(&k_pool, tb, cap)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let got_v = contiguous(&v_pool, tb, cap)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(got_k, k.flatten_all()?.to_vec1::<f32>()?, "row {row}: K");
        assert_eq!(got_v, v.flatten_all()?.to_vec1::<f32>()?, "row {row}: V");
    }
    // Blocks no table lists are untouched.
    let (k0, _) = pool(1);
    for id in [1usize, 3, 4, 6] {
        let same = k_pool.get(id)?.flatten_all()?.to_vec1::<f32>()?
            == k0.get(id)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(same, "block {id} changed");
    }
    let q = t(noise(3 * NH * HD, 60), &[3, NH, HD]);
    let got = paged_decode_attention(&q, paged, &TABLES, &LEN, 0.2)?;
    let want = decode_attention(&q, &refs, &LEN, 0.2)?;
    assert_eq!(got.dims(), [3, NH * HD]);
    assert_eq!(
        got.flatten_all()?.to_vec1::<f32>()?,
        want.flatten_all()?.to_vec1::<f32>()?
    );
    // bf16 pools give the contiguous op's bf16 result too.
    let (kb, vb) = (k_pool.to_dtype(DType::BF16)?, v_pool.to_dtype(DType::BF16)?);
    let qb = q.to_dtype(DType::BF16)?;
    let got = paged_decode_attention(&qb, PagedKv { k: &kb, v: &vb }, &TABLES, &LEN, 0.2)?;
    let bufs_b = (bufs.iter())
        .map(|(k, v)| Ok((k.to_dtype(DType::BF16)?, v.to_dtype(DType::BF16)?)))
        .collect::<Result<Vec<_>>>()?;
    let refs_b: Vec<_> = bufs_b.iter().map(|(k, v)| KvBuffers { k, v }).collect();
    let want = decode_attention(&qb, &refs_b, &LEN, 0.2)?;
    let bits = |x: &Tensor| -> Result<Vec<u16>> {
        Ok(x.flatten_all()?
            .to_vec1::<half::bf16>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    assert_eq!(bits(&got)?, bits(&want)?);
    Ok(())
}

#[test]
fn invalid_inputs_are_errors() -> Result<()> {
    let (k_pool, v_pool) = pool(20);
    let p = PagedKv {
        k: &k_pool,
        v: &v_pool,
    };
    let q = t(noise(3 * NH * HD, 1), &[3, NH, HD]);
    let new = t(noise(3 * NKV * HD, 2), &[3, NKV, HD]);
    let pos = [0, 8, 6];
    paged_decode_attention(&q, p, &TABLES, &LEN, 1.0)?;
    paged_append_kv_rows(&new, &new, p, &TABLES, &pos)?;
    let attend = |q: &Tensor, tables: &[&[u32]], len: &[usize]| {
        paged_decode_attention(q, p, tables, len, 1.0)
    };
    // Shapes, rows, lengths, ids, scale, dtypes.
    fails(attend(&q.flatten_from(1)?, &TABLES, &LEN), "q must be");
    fails(
        attend(&t(noise(120, 3), &[3, 5, HD]), &TABLES, &LEN),
        "multiple",
    );
    fails(attend(&q, &TABLES[..2], &LEN), "3 rows");
    fails(attend(&q, &TABLES, &[1, 9]), "3 rows");
    fails(attend(&q, &TABLES, &[0, 9, 7]), "length 0");
    fails(attend(&q, &TABLES, &[1, 13, 7]), "past the 12 positions");
    const OUTSIDE: [&[u32]; 3] = [&[2], &[5, 9, 7], &[5, 8]];
    fails(attend(&q, &OUTSIDE, &LEN), "block 9 is outside");
    fails(
        paged_decode_attention(&q, p, &TABLES, &LEN, f32::INFINITY),
        "finite",
    );
    fails(attend(&q.to_dtype(DType::BF16)?, &TABLES, &LEN), "BF16");
    fails(
        attend(&q.to_dtype(DType::U32)?, &TABLES, &LEN),
        "not supported",
    );
    let append =
        |tables: &[&[u32]], pos: &[usize]| paged_append_kv_rows(&new, &new, p, tables, pos);
    fails(append(&TABLES, &[0, 12, 6]), "position + 1 13 is past");
    fails(append(&TABLES, &pos[..2]), "3 rows");
    // Rows 1 and 2 both writing position 2 of shared block 5.
    fails(
        append(&TABLES, &[0, 2, 2]),
        "rows 1 and 2 write the same pool slot",
    );
    const CROSSING: [&[u32]; 3] = [&[2], &[5, 0, 7], &[5, 0]];
    fails(append(&CROSSING, &[0, 5, 5]), "the same pool slot");
    let wrong = t(noise(3 * NKV * 4, 2), &[3, NKV, 4]);
    fails(
        paged_append_kv_rows(&wrong, &wrong, p, &TABLES, &pos),
        "k_new must be",
    );
    fails(
        paged_append_kv_rows(&new, &new.get(0)?, p, &TABLES, &pos),
        "v_new is",
    );
    let new_bf16 = new.to_dtype(DType::BF16)?;
    fails(
        paged_append_kv_rows(&new, &new_bf16, p, &TABLES, &pos),
        "BF16",
    );
    // Pools: V unlike K, not contiguous, K and V one memory, new rows inside the pool.
    let small = t(noise(NKV * BS * HD, 4), &[1, NKV, BS, HD]);
    fails(attend_with(&q, &k_pool, &small), "the V pool is");
    let wide = t(noise(BLOCKS * NKV * BS * HD, 5), &[BLOCKS, BS, NKV, HD]).transpose(1, 2)?;
    fails(attend_with(&q, &wide, &wide), "not contiguous");
    fails(attend_with(&q, &k_pool, &k_pool), "share memory");
    let alias = k_pool
        .flatten_all()?
        .narrow(0, 0, 3 * NKV * HD)?
        .reshape((3, NKV, HD))?;
    fails(
        paged_append_kv_rows(&alias, &new, p, &TABLES, &pos),
        "k_new shares memory",
    );
    // No rows: nothing to do.
    let q0 = t(vec![], &[0, NH, HD]);
    assert_eq!(
        paged_decode_attention(&q0, p, &[], &[], 1.0)?.dims(),
        [0, NH * HD]
    );
    Ok(())
}

fn attend_with(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    paged_decode_attention(q, PagedKv { k, v }, &TABLES, &LEN, 1.0)
}

#[test]
fn cpu_check_against_reference() -> Result<()> {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let err = check_against_reference(&Device::Cpu, dtype, 0)?;
        assert!(err <= tolerance(dtype), "{dtype:?}: relative error {err}");
    }
    Ok(())
}
