//! The NF4-quantized base inside the model (tiny fixture model): every forward path (candle ops
//! for many rows, the fast few-row path for decode) equals a dense model built from the
//! dequantized weights, unmerged adapters (alone, stacked, mixed in one batch) work on the NF4
//! base, merging into NF4 weights re-quantizes the merged sum, and the QLoRA training forward
//! gives input gradients through the packed weights.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use loraplex::lora::{LoraAdapter, LoraStack};
use loraplex::model::{self, LinearWeight, LoadedModel, Nf4Settings};
use loraplex::runtime::{Kernels, LogitsMode, SeqInput};
use loraplex::train::forward::{hidden_states, TrainBase};
use loraplex::train::params::{LoraParams, LoraShape};
use std::sync::Arc;

fn load() -> LoadedModel {
    model::load_path(&tiny_model(), &Device::Cpu).unwrap()
}

fn quantized(double_quant: bool) -> LoadedModel {
    let mut m = load();
    m.quantize(Some(Nf4Settings::new(double_quant))).unwrap();
    m
}

/// A dense model whose linear weights are exactly the dequantized NF4 weights of `q`.
fn dequantized_copy(q: &LoadedModel) -> LoadedModel {
    let mut d = load();
    for (bd, bq) in d.llama.blocks.iter_mut().zip(&q.llama.blocks) {
        for (ld, lq) in bd.proj.iter_mut().zip(&bq.proj) {
            assert!(lq.nf4().is_some(), "every projection is quantized");
            ld.weight = LinearWeight::Dense(lq.dense_weight(&Device::Cpu).unwrap());
        }
    }
    d
}

fn adapter(m: &LoadedModel, name: &str) -> Arc<LoraAdapter> {
    Arc::new(LoraAdapter::load(name, &tiny_adapter(name), &m.llama.cfg).unwrap())
}

/// Logits of every position of `prompt` (one forward call), then of `steps` single-token decode
/// steps feeding `feed` (fixed tokens, so both models see the same inputs).
fn run(
    m: &LoadedModel,
    prompt: &[u32],
    feed: &[u32],
    lora: Option<Arc<LoraStack>>,
    kernels: Kernels,
) -> Vec<Vec<f32>> {
    let mut cache = m.llama.new_cache();
    let mut seqs = [SeqInput {
        tokens: prompt,
        cache: &mut cache,
        lora: lora.clone(),
    }];
    let mut rows: Vec<Vec<f32>> =
        loraplex::runtime::forward_with(&m.llama, &mut seqs, LogitsMode::All, kernels)
            .unwrap()
            .to_vec2()
            .unwrap();
    for t in feed {
        let mut seqs = [SeqInput {
            tokens: std::slice::from_ref(t),
            cache: &mut cache,
            lora: lora.clone(),
        }];
        let l: Vec<Vec<f32>> =
            loraplex::runtime::forward_with(&m.llama, &mut seqs, LogitsMode::Last, kernels)
                .unwrap()
                .to_vec2()
                .unwrap();
        rows.extend(l);
    }
    rows
}

fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: row count");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = max_abs_diff(x, y);
        assert!(d <= tol, "{what}: row {i} differs by {d} (tolerance {tol})");
    }
}

const LONG: [u32; 24] = [
    1, 17, 200, 33, 5, 91, 120, 7, 64, 250, 3, 44, 18, 77, 190, 2, 9, 160, 81, 45, 101, 11, 30, 66,
];
const FEED: [u32; 6] = [12, 140, 8, 230, 55, 99];

#[test]
fn nf4_model_equals_the_dense_model_of_its_dequantized_weights() {
    for double_quant in [false, true] {
        let q = quantized(double_quant);
        let d = dequantized_copy(&q);
        // The weights really changed: NF4 is not the f32 model.
        let f32_model = load();
        let orig = run(&f32_model, &LONG[..5], &[], None, Kernels::Candle);
        let nf4 = run(&q, &LONG[..5], &[], None, Kernels::Candle);
        assert!(
            max_abs_diff(&orig[4], &nf4[4]) > 1e-3,
            "quantization had no effect"
        );
        for kernels in [Kernels::Candle, Kernels::Auto] {
            // 24-token prompt: candle's many-row path (tiled NF4 kernel); 3 tokens and single
            // tokens: the fused kernel (Candle) or the fast decode path (Auto).
            for prompt in [&LONG[..], &LONG[..3]] {
                let got = run(&q, prompt, &FEED, None, kernels);
                let want = run(&d, prompt, &FEED, None, kernels);
                let what = format!("dq={double_quant} {kernels:?} prompt {}", prompt.len());
                assert_close(&got, &want, 2e-3, &what);
            }
        }
    }
}

#[test]
fn nf4_lm_head_equals_the_dense_lm_head_of_its_dequantized_weights() {
    let settings = Nf4Settings::new(false);
    let mut q = quantized(false);
    let before = run(&q, &LONG[..5], &[], None, Kernels::Candle);
    assert!(
        q.quantize_lm_head(None, true).is_err(),
        "needs NF4 settings"
    );
    q.quantize_lm_head(Some(settings), true).unwrap();
    let lm = q.llama.lm_head_nf4.as_ref().expect("an NF4 lm_head");
    assert!(lm.nf4().is_some());
    let mut d = dequantized_copy(&q);
    d.llama.lm_head = lm.dense_weight(&Device::Cpu).unwrap();
    let after = run(&q, &LONG[..5], &[], None, Kernels::Candle);
    assert!(
        max_abs_diff(&before[4], &after[4]) > 1e-4,
        "the NF4 lm_head is not used"
    );
    for kernels in [Kernels::Candle, Kernels::Auto] {
        for prompt in [&LONG[..], &LONG[..3]] {
            let got = run(&q, prompt, &FEED, None, kernels);
            let want = run(&d, prompt, &FEED, None, kernels);
            let what = format!("lm_head {kernels:?} prompt {}", prompt.len());
            assert_close(&got, &want, 2e-3, &what);
        }
    }
}

#[test]
fn unmerged_adapters_and_stacks_apply_on_the_nf4_base() {
    let q = quantized(true);
    let d = dequantized_copy(&q);
    let layers = q.llama.cfg.num_hidden_layers;
    let all = adapter(&q, "all-r8");
    let attn = adapter(&q, "attn-r4");
    let one = Arc::new(LoraStack::single(all.clone(), layers).unwrap());
    let stack = Arc::new(LoraStack::new(vec![(all, 0.7), (attn, 0.5)], layers).unwrap());
    for lora in [one.clone(), stack.clone()] {
        for kernels in [Kernels::Candle, Kernels::Auto] {
            let got = run(&q, &LONG[..7], &FEED, Some(lora.clone()), kernels);
            let want = run(&d, &LONG[..7], &FEED, Some(lora.clone()), kernels);
            assert_close(&got, &want, 2e-3, &format!("{} {kernels:?}", lora.label()));
            // The adapter changes the output.
            let base = run(&q, &LONG[..7], &FEED, None, kernels);
            assert!(
                max_abs_diff(&got[6], &base[6]) > 1e-2,
                "adapter had no effect"
            );
        }
    }
    // One batch mixing the base, an adapter and a stack equals each sequence alone.
    let loras = [None, Some(one), Some(stack)];
    let prompts: [&[u32]; 3] = [&LONG[..4], &LONG[4..9], &LONG[9..12]];
    let mut caches: Vec<_> = (0..3).map(|_| q.llama.new_cache()).collect();
    let mut seqs: Vec<SeqInput> = caches
        .iter_mut()
        .zip(prompts)
        .zip(&loras)
        .map(|((cache, tokens), lora)| SeqInput {
            tokens,
            cache,
            lora: lora.clone(),
        })
        .collect();
    let batch: Vec<Vec<f32>> = loraplex::runtime::forward(&q.llama, &mut seqs, LogitsMode::Last)
        .unwrap()
        .to_vec2()
        .unwrap();
    for i in 0..3 {
        let alone = run(&q, prompts[i], &[], loras[i].clone(), Kernels::Auto);
        let d = max_abs_diff(&batch[i], alone.last().unwrap());
        assert!(d <= 1e-5, "sequence {i} in a mixed batch differs by {d}");
    }
}

#[test]
fn merging_into_nf4_weights_requantizes_the_merged_sum() {
    let mut q = quantized(false);
    let before = q.llama.blocks[1].proj[0]
        .dense_weight(&Device::Cpu)
        .unwrap();
    let stack = LoraStack::single(adapter(&q, "all-r8"), q.llama.cfg.num_hidden_layers).unwrap();
    let delta = stack.pair(1, model::Proj::Q).unwrap().dense().unwrap();
    let requantized = stack.merge_into(&mut q.llama).unwrap();
    assert_eq!(
        requantized,
        2 * 7,
        "every targeted NF4 weight is re-quantized"
    );
    let merged = q.llama.blocks[1].proj[0].nf4().unwrap();
    let want = Nf4Settings::new(false)
        .quantize(&(before + delta).unwrap())
        .unwrap();
    assert_eq!(merged.data, want.data);
    assert_eq!(merged.absmax_f32(), want.absmax_f32());
    // An f32 base merges exactly, with nothing re-quantized.
    let mut f = load();
    assert_eq!(stack.merge_into(&mut f.llama).unwrap(), 0);
}

#[test]
fn qlora_forward_differentiates_through_the_packed_weights() {
    let q = quantized(true);
    let d = dequantized_copy(&q);
    let shape = LoraShape {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        targets: model::Proj::ALL.to_vec(),
    };
    let lora = LoraParams::init(&q.llama.cfg, shape, 7, DType::F32).unwrap();
    // B starts at zero (PEFT's init): give it values so that A gets a gradient too.
    for (_, (_, b)) in lora.pairs.iter() {
        let n = b.as_tensor().elem_count();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.01)
            .collect();
        b.set(&Tensor::from_vec(v, b.as_tensor().shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let ids = Tensor::new(&[[1u32, 17, 200, 33, 5, 91, 120, 7]], &Device::Cpu).unwrap();
    let mut results = Vec::new();
    for m in [&q, &d] {
        let base = TrainBase::new(&m.llama, DType::F32).unwrap();
        let h = hidden_states(&base, Some(&lora), &ids, None).unwrap();
        let loss = h.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let (a, b) = lora.pairs.get(&(0, model::Proj::Q)).unwrap();
        let ga: Vec<f32> = grads
            .get(a.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let gb: Vec<f32> = grads
            .get(b.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        results.push((loss.to_scalar::<f32>().unwrap(), ga, gb));
    }
    let ((lq, gaq, gbq), (ld, gad, gbd)) = (&results[0], &results[1]);
    assert!((lq - ld).abs() <= 1e-3 * ld.abs(), "loss {lq} vs {ld}");
    let scale = gad.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(scale > 0.0, "layer-0 A has a gradient");
    assert!(max_abs_diff(gaq, gad) <= 1e-3 * scale, "grad A");
    let scale = gbd.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(max_abs_diff(gbq, gbd) <= 1e-3 * scale, "grad B");
    // An NF4 base trains in f32 only.
    assert!(TrainBase::new(&q.llama, DType::F64).is_err());
}

/// `q` with every NF4 weight (projections and the lm_head copy) in device form (`Nf4Device`:
/// codes and scales as tensors, the GPU's ops), kept on the CPU.
fn device_form(mut p: LoadedModel) -> LoadedModel {
    p.llama.place_nf4(&Device::Cpu, true).unwrap();
    let lins = p.llama.blocks.iter().flat_map(|b| b.proj.iter());
    for lin in lins.chain(p.llama.lm_head_nf4.as_ref()) {
        assert!(matches!(lin.weight, LinearWeight::Nf4Device(_)));
    }
    p
}

#[test]
fn nf4_weights_in_device_form_give_the_logits_of_the_dequantized_model() {
    for double_quant in [false, true] {
        let mut q = quantized(double_quant);
        q.quantize_lm_head(Some(Nf4Settings::new(double_quant)), true)
            .unwrap();
        let mut d = dequantized_copy(&q);
        d.llama.lm_head = q
            .llama
            .lm_head_nf4
            .as_ref()
            .unwrap()
            .dense_weight(&Device::Cpu)
            .unwrap();
        let host_bytes = q.llama.linear_weight_bytes().resident;
        let p = device_form(q);
        // Device form keeps codes + f32 scales (a double-quantized absmax expanded).
        let dev_bytes = p.llama.linear_weight_bytes().resident;
        if !double_quant {
            assert_eq!(dev_bytes, host_bytes);
        }
        // The bar: NF4 linear weights at most 0.30x their 16-bit bytes (0.28x here).
        let ratio = dev_bytes as f64 / p.llama.linear_weight_bytes().f16 as f64;
        assert!(
            ratio <= 0.30,
            "device NF4 weights are {ratio:.3}x their f16 bytes"
        );
        assert!(p.llama.bytes_by_dtype().iter().any(|(d, _)| d == "nf4"));
        // Auto takes the reference path for device-form weights (the fast path reads host NF4).
        for kernels in [Kernels::Candle, Kernels::Auto] {
            // 24 prompt rows: dequantize + matmul; 3 and single rows: the rows op.
            for prompt in [&LONG[..], &LONG[..3]] {
                let got = run(&p, prompt, &FEED, None, kernels);
                let want = run(&d, prompt, &FEED, None, kernels);
                let what = format!(
                    "device form dq={double_quant} {kernels:?} prompt {}",
                    prompt.len()
                );
                assert_close(&got, &want, 2e-3, &what);
            }
        }
        // Adapters apply on top, as on the host form.
        let stack = Arc::new(
            LoraStack::single(adapter(&p, "all-r8"), p.llama.cfg.num_hidden_layers).unwrap(),
        );
        let got = run(&p, &LONG[..5], &FEED, Some(stack.clone()), Kernels::Auto);
        let want = run(&d, &LONG[..5], &FEED, Some(stack), Kernels::Auto);
        assert_close(&got, &want, 2e-3, "device form with an adapter");
    }
}

#[test]
fn merging_into_device_form_nf4_weights_keeps_them_on_the_device() {
    let mut host = quantized(false);
    let mut dev = device_form(quantized(false));
    let stack =
        LoraStack::single(adapter(&host, "all-r8"), host.llama.cfg.num_hidden_layers).unwrap();
    assert_eq!(stack.merge_into(&mut host.llama).unwrap(), 2 * 7);
    assert_eq!(stack.merge_into(&mut dev.llama).unwrap(), 2 * 7);
    for (bh, bd) in host.llama.blocks.iter().zip(&dev.llama.blocks) {
        for (lh, ld) in bh.proj.iter().zip(&bd.proj) {
            assert!(matches!(ld.weight, LinearWeight::Nf4Device(_)));
            assert_eq!(lh.nf4().unwrap().data, ld.nf4().unwrap().data);
        }
    }
}
