//! GGUF loading: llama.cpp's Q/K permutation undone, config from metadata, tied lm_head, and the
//! same PEFT goldens as the HF folder.

mod common;

use candle_core::Device;
use common::*;
use loraplex::lora::{LoraAdapter, LoraStack};
use loraplex::model::{self, LoadedModel};
use loraplex::runtime::{LogitsMode, SeqInput};
use std::sync::Arc;

fn last_logits(m: &LoadedModel, prompt: &[u32], lora: Option<Arc<LoraStack>>) -> Vec<f32> {
    let mut cache = m.llama.new_cache();
    let mut seqs = [SeqInput {
        tokens: prompt,
        cache: &mut cache,
        lora,
    }];
    let l: Vec<Vec<f32>> = loraplex::runtime::forward(&m.llama, &mut seqs, LogitsMode::Last)
        .unwrap()
        .to_vec2()
        .unwrap();
    l.into_iter().next().unwrap()
}

#[test]
fn gguf_with_permuted_qk_matches_the_peft_goldens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, "smollm", true);
    let m = model::load_path(&path, &Device::Cpu).unwrap();
    assert_eq!(m.format, model::ModelFormat::Gguf);
    assert!(!m.llama.lm_head_tied());
    assert_eq!(m.eos_ids, vec![2]);
    assert!(m.tokenizer.is_some());
    let g = golden();
    let adapter =
        Arc::new(LoraAdapter::load("all-r8", &tiny_adapter("all-r8"), &m.llama.cfg).unwrap());
    let stack = Arc::new(LoraStack::single(adapter, m.llama.cfg.num_hidden_layers).unwrap());
    for (label, lora) in [("base", None), ("all-r8", Some(stack))] {
        for r in g["cases"][label]["results"].as_array().unwrap() {
            let prompt = ids(&g["prompts"][r["prompt"].as_str().unwrap()]);
            let d = max_abs_diff(
                &last_logits(&m, &prompt, lora.clone()),
                &floats(&r["last_logits"]),
            );
            assert!(d < 1e-4, "{label}: GGUF logits differ from PEFT by {d}");
        }
    }
}

#[test]
fn gguf_without_output_weight_ties_lm_head_to_the_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tied.gguf");
    write_tiny_gguf(&path, "smollm", false);
    let m = model::load_path(&path, &Device::Cpu).unwrap();
    assert!(m.llama.lm_head_tied());
    // Reference: the HF folder with lm_head replaced by the embedding.
    let hf = tempfile::tempdir().unwrap();
    let mut st =
        candle_core::safetensors::load(tiny_model().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    st.remove("lm_head.weight");
    candle_core::safetensors::save(&st, hf.path().join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_model().join("config.json")).unwrap())
            .unwrap();
    cfg["tie_word_embeddings"] = serde_json::json!(true);
    std::fs::write(hf.path().join("config.json"), cfg.to_string()).unwrap();
    let r = model::load_path(hf.path(), &Device::Cpu).unwrap();
    let p = [1u32, 33, 7, 250, 128];
    let d = max_abs_diff(&last_logits(&m, &p, None), &last_logits(&r, &p, None));
    assert!(d < 1e-5, "tied GGUF vs tied HF folder differ by {d}");
    // And it really is different from the untied model.
    let untied = model::load_path(&tiny_model(), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&last_logits(&m, &p, None), &last_logits(&untied, &p, None)) > 1e-2);
}

#[test]
fn unknown_gguf_pre_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.gguf");
    write_tiny_gguf(&path, "mystery-pre", true);
    let err = match model::load_path(&path, &Device::Cpu) {
        Ok(_) => panic!("an unknown pre-tokenizer must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("mystery-pre"), "{err}");
}
