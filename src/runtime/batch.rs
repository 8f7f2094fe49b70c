//! The description of one forward call: each sequence's new tokens, cache and adapter set
//! (`SeqInput`), which logits come back (`LogitsMode`), and the batch's rows segmented by adapter
//! set (`RowGroups`), built once per call and read by every backend.

use crate::lora::LoraStack;
use crate::model::KvCache;
use std::sync::Arc;

/// One sequence's share of a forward call.
pub struct SeqInput<'a> {
    /// The new tokens (a prompt chunk, or the one token just sampled).
    pub tokens: &'a [u32],
    /// This sequence's cache; the new tokens sit at positions `cache.len()..`.
    pub cache: &'a mut KvCache,
    /// The LoRA stack applied to this sequence's rows, if any.
    pub lora: Option<Arc<LoraStack>>,
}

/// Which positions' logits a forward call returns.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LogitsMode {
    /// One row per sequence: its last new token.
    Last,
    /// One row per new token, sequences one after another.
    All,
}

/// The rows of a call (new tokens of all sequences, one after another) grouped by adapter set:
/// rows that share one `LoraStack` (identity of the `Arc`) form one group, in batch order.
#[derive(Debug)]
pub struct RowGroups {
    /// Each stack with its rows, in batch order.
    pub list: Vec<(Arc<LoraStack>, Vec<usize>)>,
    /// Per row: its group and its position in that group (`None`: no adapter).
    pub of_row: Vec<Option<(usize, usize)>>,
}

impl RowGroups {
    pub fn new(seqs: &[SeqInput<'_>]) -> Self {
        let mut list: Vec<(Arc<LoraStack>, Vec<usize>)> = Vec::new();
        let mut of_row = Vec::new();
        let mut r = 0;
        for s in seqs {
            let n = s.tokens.len();
            match &s.lora {
                Some(stack) => {
                    let gi = match list.iter().position(|(st, _)| Arc::ptr_eq(st, stack)) {
                        Some(gi) => gi,
                        None => {
                            list.push((stack.clone(), Vec::new()));
                            list.len() - 1
                        }
                    };
                    for row in r..r + n {
                        of_row.push(Some((gi, list[gi].1.len())));
                        list[gi].1.push(row);
                    }
                }
                None => of_row.extend(std::iter::repeat_n(None, n)),
            }
            r += n;
        }
        Self { list, of_row }
    }

    /// Rows in the call.
    pub fn rows(&self) -> usize {
        self.of_row.len()
    }

    /// Whether one group holds every row (then no gather is needed).
    pub fn one_group_for_all(&self) -> bool {
        self.list.len() == 1 && self.of_row.iter().all(Option::is_some)
    }

    /// Per row, the index of its group, or `u32::MAX` for rows without an adapter: the row → set
    /// map that per-row LoRA kernels take.
    pub fn row_sets(&self) -> Vec<u32> {
        self.of_row
            .iter()
            .map(|g| g.map_or(u32::MAX, |(gi, _)| gi as u32))
            .collect()
    }
}
