//! The HF transformers + PEFT goldens (tests/fixtures/tiny-golden.json) as checks that run on a
//! model wherever it lives: the CPU suite asks for the exact tolerances, the GPU check for f32
//! and bf16 ones.
#![allow(dead_code)]

use super::{argmax, floats, golden, ids, max_abs_diff, tiny_adapter};
use loraplex::lora::{LoraAdapter, LoraStack};
use loraplex::model::LoadedModel;
use loraplex::runtime::{LogitsMode, SeqInput};
use serde_json::Value;
use std::sync::Arc;

/// The stack a golden case names, built on the model's device and dtype (`None`: the base).
pub fn stack_for(m: &LoadedModel, case: &Value) -> Option<Arc<LoraStack>> {
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
    let layers = m.llama.cfg.num_hidden_layers;
    Some(Arc::new(
        LoraStack::new_on(members, layers, &m.llama.placement()).unwrap(),
    ))
}

/// Logits of every position of `prompt` (f32, on the host).
pub fn all_logits(m: &LoadedModel, prompt: &[u32], lora: Option<Arc<LoraStack>>) -> Vec<Vec<f32>> {
    let mut cache = m.llama.new_cache();
    let mut seqs = [SeqInput {
        tokens: prompt,
        cache: &mut cache,
        lora,
    }];
    loraplex::runtime::forward(&m.llama, &mut seqs, LogitsMode::All)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// One golden case: the last position's logits within `tol` and the argmax of every position
/// identical. Returns the largest logit difference seen.
pub fn check_case(
    m: &LoadedModel,
    label: &str,
    case: &Value,
    lora: Option<Arc<LoraStack>>,
    tol: f32,
) -> f32 {
    let g = golden();
    let mut worst = 0f32;
    for r in case["results"].as_array().unwrap() {
        let pname = r["prompt"].as_str().unwrap();
        let prompt = ids(&g["prompts"][pname]);
        let logits = all_logits(m, &prompt, lora.clone());
        let last = logits.last().unwrap();
        let d = max_abs_diff(last, &floats(&r["last_logits"]));
        assert!(d < tol, "{label}/{pname}: last logits differ by {d}");
        worst = worst.max(d);
        let am: Vec<u32> = logits.iter().map(|row| argmax(row)).collect();
        assert_eq!(am, ids(&r["argmax_ids"]), "{label}/{pname}: argmax ids");
    }
    worst
}

/// Every golden case but the merged one (`check_merged` covers it); returns the largest logit
/// difference.
pub fn check_all_cases(m: &LoadedModel, tol: f32) -> f32 {
    let g = golden();
    let mut worst = 0f32;
    for (label, case) in g["cases"].as_object().unwrap() {
        if label == "merged-all-r8" {
            continue;
        }
        let lora = stack_for(m, case);
        worst = worst.max(check_case(m, label, case, lora, tol));
    }
    worst
}

/// The merged golden case: `m` is consumed by the merge.
pub fn check_merged(mut m: LoadedModel, tol: f32) -> f32 {
    let g = golden();
    let case = &g["cases"]["merged-all-r8"];
    let stack = stack_for(&m, case).unwrap();
    stack.merge_into(&mut m.llama).unwrap();
    check_case(&m, "merged-all-r8", case, None, tol)
}

/// Greedy continuation with the KV cache, one token per forward.
pub fn greedy(m: &LoadedModel, prompt: &[u32], lora: Option<Arc<LoraStack>>, n: usize) -> Vec<u32> {
    let mut cache = m.llama.new_cache();
    let mut out = Vec::new();
    let mut next: Vec<u32> = prompt.to_vec();
    for _ in 0..n {
        let mut seqs = [SeqInput {
            tokens: &next,
            cache: &mut cache,
            lora: lora.clone(),
        }];
        let logits: Vec<Vec<f32>> =
            loraplex::runtime::forward(&m.llama, &mut seqs, LogitsMode::Last)
                .unwrap()
                .to_vec2()
                .unwrap();
        let t = argmax(&logits[0]);
        out.push(t);
        next = vec![t];
    }
    out
}

/// The golden greedy continuations (12 tokens each).
pub fn check_generation(m: &LoadedModel) {
    let g = golden();
    for (label, results) in g["generation"]["results"].as_object().unwrap() {
        let lora = stack_for(m, &g["cases"][label.as_str()]);
        for r in results.as_array().unwrap() {
            let prompt = ids(&g["prompts"][r["prompt"].as_str().unwrap()]);
            assert_eq!(
                greedy(m, &prompt, lora.clone(), 12),
                ids(&r["new_ids"]),
                "{label}"
            );
        }
    }
}

/// Six sequences with different adapter sets decoded together equal each decoded alone (ids),
/// and the batched prefill's logits equal the single-sequence ones within `tol`.
pub fn check_mixed_batch(m: &LoadedModel, tol: f32) {
    let g = golden();
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
        .map(|l| stack_for(m, &g["cases"][*l]))
        .collect();
    let prompts: Vec<Vec<u32>> = prompts.iter().map(|p| ids(&g["prompts"][*p])).collect();
    let alone: Vec<Vec<u32>> = (0..labels.len())
        .map(|i| greedy(m, &prompts[i], stacks[i].clone(), 6))
        .collect();
    let mut caches: Vec<_> = (0..labels.len()).map(|_| m.llama.new_cache()).collect();
    let mut next: Vec<Vec<u32>> = prompts.clone();
    let mut together = vec![Vec::new(); labels.len()];
    let mut first_rows: Option<Vec<Vec<f32>>> = None;
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
        let rows: Vec<Vec<f32>> = loraplex::runtime::forward(&m.llama, &mut seqs, LogitsMode::Last)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (i, row) in rows.iter().enumerate() {
            let t = argmax(row);
            together[i].push(t);
            next[i] = vec![t];
        }
        first_rows.get_or_insert(rows);
    }
    assert_eq!(alone, together);
    let rows = first_rows.unwrap();
    for i in 0..labels.len() {
        let single = all_logits(m, &prompts[i], stacks[i].clone());
        let d = max_abs_diff(&rows[i], single.last().unwrap());
        assert!(d < tol, "{}: batched vs alone differ by {d}", labels[i]);
    }
}
