//! The numerically exact core against HF transformers + PEFT goldens (tests/fixtures/tiny-golden.json):
//! base, each adapter (rsLoRA included), the weighted stack and the merged adapter.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use loraplex::lora::{LoraAdapter, LoraStack};
use loraplex::model::{self, LoadedModel, LogitsMode, SeqInput};
use serde_json::Value;
use std::sync::Arc;

fn load_base() -> LoadedModel {
    model::load_path(&tiny_model(), &Device::Cpu).unwrap()
}

fn stack_for(m: &LoadedModel, case: &Value) -> Option<Arc<LoraStack>> {
    let members: Vec<_> = case["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let name = a["name"].as_str().unwrap();
            let ad = LoraAdapter::load(name, &tiny_adapter(name), &m.llama.cfg).unwrap();
            (Arc::new(ad), a["weight"].as_f64().unwrap())
        })
        .collect();
    if members.is_empty() {
        return None;
    }
    Some(Arc::new(
        LoraStack::new(members, m.llama.cfg.num_hidden_layers).unwrap(),
    ))
}

fn all_logits(m: &LoadedModel, prompt: &[u32], lora: Option<Arc<LoraStack>>) -> Vec<Vec<f32>> {
    let mut cache = m.llama.new_cache();
    let mut seqs = [SeqInput {
        tokens: prompt,
        cache: &mut cache,
        lora,
    }];
    m.llama
        .forward(&mut seqs, LogitsMode::All)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn check_case(m: &LoadedModel, label: &str, case: &Value, lora: Option<Arc<LoraStack>>) {
    let g = golden();
    for r in case["results"].as_array().unwrap() {
        let pname = r["prompt"].as_str().unwrap();
        let prompt = ids(&g["prompts"][pname]);
        let logits = all_logits(m, &prompt, lora.clone());
        let last = logits.last().unwrap();
        let d = max_abs_diff(last, &floats(&r["last_logits"]));
        assert!(d < 1e-4, "{label}/{pname}: last logits differ by {d}");
        let am: Vec<u32> = logits.iter().map(|row| argmax(row)).collect();
        assert_eq!(am, ids(&r["argmax_ids"]), "{label}/{pname}: argmax ids");
    }
}

#[test]
fn every_golden_case_matches_peft() {
    let g = golden();
    let m = load_base();
    for (label, case) in g["cases"].as_object().unwrap() {
        if label == "merged-all-r8" {
            continue;
        }
        let lora = stack_for(&m, case);
        check_case(&m, label, case, lora);
    }
}

#[test]
fn merged_adapter_matches_peft_merge_and_unload() {
    let g = golden();
    let mut m = load_base();
    let case = &g["cases"]["merged-all-r8"];
    let stack = stack_for(&m, case).unwrap();
    stack.merge_into(&mut m.llama).unwrap();
    check_case(&m, "merged-all-r8", case, None);
}

/// Greedy continuation with the KV cache, one token per forward.
fn greedy(m: &LoadedModel, prompt: &[u32], lora: Option<Arc<LoraStack>>, n: usize) -> Vec<u32> {
    let mut cache = m.llama.new_cache();
    let mut out = Vec::new();
    let mut next: Vec<u32> = prompt.to_vec();
    for _ in 0..n {
        let mut seqs = [SeqInput {
            tokens: &next,
            cache: &mut cache,
            lora: lora.clone(),
        }];
        let logits: Vec<Vec<f32>> = m
            .llama
            .forward(&mut seqs, LogitsMode::Last)
            .unwrap()
            .to_vec2()
            .unwrap();
        let t = argmax(&logits[0]);
        out.push(t);
        next = vec![t];
    }
    out
}

#[test]
fn greedy_continuations_match_with_kv_cache() {
    let g = golden();
    let m = load_base();
    for (label, results) in g["generation"]["results"].as_object().unwrap() {
        let lora = stack_for(&m, &g["cases"][label.as_str()]);
        for r in results.as_array().unwrap() {
            let prompt = ids(&g["prompts"][r["prompt"].as_str().unwrap()]);
            assert_eq!(
                greedy(&m, &prompt, lora.clone(), 12),
                ids(&r["new_ids"]),
                "{label}"
            );
        }
    }
}

#[test]
fn mixed_batch_equals_each_sequence_alone() {
    let g = golden();
    let m = load_base();
    let labels = [
        "base",
        "attn-r4",
        "all-r8",
        "rslora-r16",
        "stack-cat",
        "all-r8",
    ];
    let prompts = ["p5", "p9", "p17", "p9", "p5", "p17"];
    let stacks: Vec<_> = labels
        .iter()
        .map(|l| stack_for(&m, &g["cases"][*l]))
        .collect();
    let prompts: Vec<Vec<u32>> = prompts.iter().map(|p| ids(&g["prompts"][*p])).collect();
    // Alone: prefill + 6 greedy steps each.
    let alone: Vec<Vec<u32>> = (0..labels.len())
        .map(|i| greedy(&m, &prompts[i], stacks[i].clone(), 6))
        .collect();
    // Together: one batched prefill of all six, then batched decode steps.
    let mut caches: Vec<_> = (0..labels.len()).map(|_| m.llama.new_cache()).collect();
    let mut next: Vec<Vec<u32>> = prompts.clone();
    let mut together = vec![Vec::new(); labels.len()];
    let mut first_logits: Option<Tensor> = None;
    for _ in 0..6 {
        let mut seqs: Vec<SeqInput> = caches
            .iter_mut()
            .zip(&next)
            .zip(&stacks)
            .map(|((cache, toks), lora)| SeqInput {
                tokens: toks,
                cache,
                lora: lora.clone(),
            })
            .collect();
        let logits = m.llama.forward(&mut seqs, LogitsMode::Last).unwrap();
        if first_logits.is_none() {
            first_logits = Some(logits.clone());
        }
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        for (i, row) in rows.iter().enumerate() {
            let t = argmax(row);
            together[i].push(t);
            next[i] = vec![t];
        }
    }
    assert_eq!(alone, together);
    // Logits of the batched prefill equal the single-sequence ones.
    let rows: Vec<Vec<f32>> = first_logits.unwrap().to_vec2().unwrap();
    for i in 0..labels.len() {
        let single = all_logits(&m, &prompts[i], stacks[i].clone());
        let d = max_abs_diff(&rows[i], single.last().unwrap());
        assert!(d < 1e-5, "{}: batched vs alone differ by {d}", labels[i]);
    }
}
