//! Placeholder (replaced by the per-row LoRA op with its CUDA kernels): the same math by
//! gather/scatter per set with candle ops.

use candle_core::{Result, Tensor};

/// One adapter set's low-rank pair for one projection: `a: [R, in]`, `bt: [R, out]`.
pub struct LoraSetRef<'a> {
    pub a: &'a Tensor,
    pub bt: &'a Tensor,
}

/// `y` plus each row's delta `(x_n A_s^T) Bt_s`, `s = row_set[n]` (`u32::MAX`: none).
pub fn apply_lora_rows(
    x: &Tensor,
    y: &Tensor,
    sets: &[LoraSetRef<'_>],
    row_set: &[u32],
) -> Result<Tensor> {
    let mut y = y.clone();
    for (si, set) in sets.iter().enumerate() {
        let rows: Vec<u32> = (0..row_set.len() as u32)
            .filter(|&r| row_set[r as usize] == si as u32)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let n = rows.len();
        let rows = Tensor::from_vec(rows, n, x.device())?;
        let d = x
            .index_select(&rows, 0)?
            .matmul(&set.a.t()?)?
            .matmul(set.bt)?;
        y = y.index_add(&rows, &d, 0)?;
    }
    Ok(y)
}
