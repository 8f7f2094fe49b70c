//! The numerically exact core against HF transformers + PEFT goldens (tests/fixtures/tiny-golden.json):
//! base, each adapter (rsLoRA included), the weighted stack and the merged adapter.

mod common;

use candle_core::Device;
use common::golden::*;
use common::*;
use loraplex::model::{self, LoadedModel};

fn load_base() -> LoadedModel {
    model::load_path(&tiny_model(), &Device::Cpu).unwrap()
}

#[test]
fn every_golden_case_matches_peft() {
    check_all_cases(&load_base(), 1e-4);
}

#[test]
fn merged_adapter_matches_peft_merge_and_unload() {
    check_merged(load_base(), 1e-4);
}

#[test]
fn greedy_continuations_match_with_kv_cache() {
    check_generation(&load_base());
}

#[test]
fn mixed_batch_equals_each_sequence_alone() {
    check_mixed_batch(&load_base(), 1e-5);
}
