//! Calibrated (GPTQ) NF4 quantization of the tiny fixture model: every projection ends up
//! ordinary NF4, the model's outputs on the calibration sequences stay closer to the dense
//! model's than plain NF4's do (plain, act-order, double quant), a block can run alone and equals
//! the full forward, and bad calibration input is refused.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use loraplex::calibrate::{quantize_calibrated, CalibrationSettings};
use loraplex::model::{self, LoadedModel, Nf4Settings, Proj};
use loraplex::quant::GptqSettings;
use loraplex::runtime::{LogitsMode, SeqInput};

fn load() -> LoadedModel {
    model::load_path(&tiny_model(), &Device::Cpu).unwrap()
}

/// Token sequences with repeating structure (so layer inputs are correlated, as text's are).
fn samples(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let noise = normal(n * 48, seed, 1.0);
    (0..n)
        .map(|s| {
            (0..48)
                .map(|i| {
                    let base = [5u32, 17, 33, 91, 120, 7, 200, 1][(i + s) % 8];
                    match noise[s * 48 + i] > 1.0 {
                        true => (base * 3 + i as u32) % 256,
                        false => base,
                    }
                })
                .collect()
        })
        .collect()
}

/// Logits of every position of every sequence.
fn logits(m: &LoadedModel, seqs: &[Vec<u32>]) -> Vec<f32> {
    seqs.iter()
        .flat_map(|ids| {
            let mut cache = m.llama.new_cache();
            let mut s = [SeqInput {
                tokens: ids,
                cache: &mut cache,
                lora: None,
            }];
            loraplex::runtime::forward(&m.llama, &mut s, LogitsMode::All)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
}

fn settings(act_order: bool, double_quant: bool) -> CalibrationSettings {
    CalibrationSettings {
        gptq: GptqSettings {
            act_order,
            search_scales: act_order,
            double_quant,
            ..GptqSettings::default()
        },
    }
}

#[test]
fn calibrated_nf4_tracks_the_dense_model_closer_than_plain_nf4() {
    let calib = samples(24, 11);
    let held_out = samples(6, 99);
    let dense = load();
    let (ref_calib, ref_held) = (logits(&dense, &calib), logits(&dense, &held_out));
    for double_quant in [false, true] {
        let mut plain = load();
        plain
            .quantize(Some(Nf4Settings::new(double_quant)))
            .unwrap();
        let plain_err = sq_dist(&logits(&plain, &calib), &ref_calib);
        let plain_held = sq_dist(&logits(&plain, &held_out), &ref_held);
        for act_order in [false, true] {
            let mut m = load();
            let report = quantize_calibrated(
                &mut m.llama,
                &calib,
                settings(act_order, double_quant),
                &|done, total| assert!(done <= total),
            )
            .unwrap();
            assert_eq!(report.sequences, 24);
            assert_eq!(report.tokens, 24 * 48);
            assert_eq!(report.layers, m.llama.blocks.len());
            for b in &m.llama.blocks {
                for lin in &b.proj {
                    let w = lin.nf4().expect("every projection is NF4");
                    assert_eq!(w.blocksize, 64);
                    assert_eq!(w.is_double_quant(), double_quant);
                }
            }
            assert_eq!(m.llama.nf4_settings(), Some(Nf4Settings::new(double_quant)));
            let err = sq_dist(&logits(&m, &calib), &ref_calib);
            let held = sq_dist(&logits(&m, &held_out), &ref_held);
            eprintln!(
                "dq={double_quant} act_order={act_order}: calibration {err:.3} vs plain {plain_err:.3}, held-out {held:.3} vs {plain_held:.3}"
            );
            assert!(
                err < 0.5 * plain_err,
                "act_order={act_order} dq={double_quant}: {err} vs plain {plain_err}"
            );
            assert!(
                held < 0.5 * plain_held,
                "held-out {held} vs plain {plain_held}"
            );
        }
    }
}

#[test]
fn a_block_run_alone_equals_the_full_forward_and_shows_its_inputs() {
    let m = load();
    let ids = samples(1, 3).remove(0);
    let mut x = m
        .llama
        .embed
        .index_select(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap();
    let mut groups = Vec::new();
    for l in 0..m.llama.blocks.len() {
        let mut cache = m.llama.new_cache();
        let mut s = [SeqInput {
            tokens: &ids,
            cache: &mut cache,
            lora: None,
        }];
        x = loraplex::runtime::block_forward(&m.llama, l, &x, &mut s, &mut |p, t| {
            groups.push((l, p, t.dims().to_vec()));
            Ok(())
        })
        .unwrap();
    }
    let (h, i) = (m.llama.cfg.hidden_size, m.llama.cfg.intermediate_size);
    let n = ids.len();
    let expect: Vec<_> = (0..m.llama.blocks.len())
        .flat_map(|l| {
            [
                (l, Proj::Q, vec![n, h]),
                (
                    l,
                    Proj::O,
                    vec![n, m.llama.cfg.num_attention_heads * m.llama.cfg.head_dim],
                ),
                (l, Proj::Gate, vec![n, h]),
                (l, Proj::Down, vec![n, i]),
            ]
        })
        .collect();
    assert_eq!(groups, expect);
    // Final norm + lm_head on the block-by-block hidden states = the model's logits.
    let eps = m.llama.cfg.rms_norm_eps as f32;
    let by_blocks = candle_nn::ops::rms_norm(&x, &m.llama.norm, eps)
        .unwrap()
        .matmul(&m.llama.lm_head.t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let full = logits(&m, &[ids]);
    assert!(max_abs_diff(&by_blocks, &full) < 1e-4);
    let mut cache = m.llama.new_cache();
    let mut s = [SeqInput {
        tokens: &[1],
        cache: &mut cache,
        lora: None,
    }];
    assert!(
        loraplex::runtime::block_forward(&m.llama, 99, &x, &mut s, &mut |_, _| Ok(())).is_err()
    );
}

#[test]
fn bad_calibration_input_is_refused() {
    let s = settings(true, false);
    let mut m = load();
    let err = |m: &mut LoadedModel, samples: &[Vec<u32>]| {
        quantize_calibrated(&mut m.llama, samples, s, &|_, _| {})
            .unwrap_err()
            .to_string()
    };
    assert!(err(&mut m, &[]).contains("no sequences"));
    assert!(err(&mut m, &[vec![1, 2], vec![]]).contains("sequence 1"));
    let vocab = m.llama.cfg.vocab_size as u32;
    assert!(err(&mut m, &[vec![1, vocab]]).contains("outside the vocabulary"));
    let too_long = vec![1u32; m.llama.max_context() + 1];
    assert!(err(&mut m, &[too_long]).contains("tokens"));
    // Nothing was touched by the refusals.
    assert!(m.llama.nf4_settings().is_none());
    m.quantize(Some(Nf4Settings::new(false))).unwrap();
    assert!(err(&mut m, &[vec![1, 2, 3]]).contains("already NF4"));
}
