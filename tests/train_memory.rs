//! Training's memory savings change no number: the chunked vocabulary loss gives the dense
//! head's loss and LoRA gradients for chunk sizes that do and do not divide the loss rows, and
//! gradient checkpointing (per block, dropout replayed) gives the whole-graph backward's loss and
//! gradients — SFT and DPO, f32 and f64, dense and NF4 base, masked prompt rows and padding; the
//! `train` command's metrics are the same with `--gradient-checkpointing false`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use loraplex::model::{self, Nf4Settings, Proj};
use loraplex::train::backward::loss_and_grads;
use loraplex::train::forward::{hidden_states, pack, Dropout, Objective, PackedBatch, TrainBase};
use loraplex::train::params::{LoraParams, LoraShape};
use loraplex::train::vocab_loss::{token_logprobs_chunked, token_logprobs_dense};
use serde_json::Value;
use std::process::Command;

/// LoRA on every module of the tiny model with non-zero B (PEFT's zero B hides A's gradient).
fn random_lora(cfg: &model::LlamaConfig, dtype: DType) -> LoraParams {
    let shape = LoraShape {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        targets: Proj::ALL.to_vec(),
    };
    let lora = LoraParams::init(cfg, shape, 3, dtype).unwrap();
    // Seeded (candle's randn is not): every run compares the same point.
    for (i, (_, b)) in lora.pairs.values().enumerate() {
        let v = normal(b.elem_count(), 200 + i as u64, 0.2);
        b.set(
            &Tensor::from_vec(v, b.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
    }
    lora
}

/// Two SFT sequences of different lengths (prompt rows masked, the shorter one padded), and a
/// DPO batch (chosen, then rejected).
fn batches() -> (PackedBatch, PackedBatch) {
    let s1: Vec<u32> = vec![1, 15, 72, 101, 200, 33, 7, 250, 19, 44, 3];
    let m1 = vec![
        false, false, false, false, true, true, true, true, true, true, true,
    ];
    let s2: Vec<u32> = vec![1, 5, 10, 20, 40, 80];
    let m2 = vec![false, false, false, true, true, true];
    let r1: Vec<u32> = vec![1, 15, 72, 101, 9, 9, 64, 3, 8, 8, 2];
    (
        pack(&[(&s1, &m1), (&s2, &m2)], 0).unwrap(),
        pack(&[(&s1, &m1), (&r1, &m1)], 0).unwrap(),
    )
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |a − b| / max |b|` over one tensor.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (to_f64(a), to_f64(b));
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let s = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    assert!(s > 0.0, "a gradient that is all zeros compares nothing");
    d / s
}

fn assert_grads_close(got: &[Tensor], want: &[Tensor], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let r = rel_diff(g, w);
        assert!(r <= tol, "{what}: gradient {i} differs by {r:e} (relative)");
    }
}

#[test]
fn chunked_vocabulary_loss_gives_the_dense_heads_loss_and_lora_gradients() {
    let m = model::load_path(&tiny_model(), &Device::Cpu).unwrap();
    let (sft, _) = batches();
    let n = sft.rows.len();
    assert_eq!(n, 10, "loss rows of the batch");
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-10)] {
        let base = TrainBase::new(&m.llama, dtype).unwrap();
        let lora = random_lora(&m.llama.cfg, dtype);
        let vars = lora.vars();
        // Uneven weights per row, as DPO's per-sequence sums hand the head.
        let weights = Tensor::from_vec(
            (0..n).map(|i| 1.0 + 0.3 * i as f64).collect::<Vec<_>>(),
            n,
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
        let run = |chunk: Option<usize>| {
            let h = hidden_states(&base, Some(&lora), &sft.ids, None).unwrap();
            let rows = Tensor::new(sft.rows.as_slice(), &Device::Cpu).unwrap();
            let h = h.index_select(&rows, 0).unwrap();
            let lp = match chunk {
                None => token_logprobs_dense(&h, base.lm_head(), &sft.targets).unwrap(),
                Some(c) => token_logprobs_chunked(&h, base.lm_head(), &sft.targets, c).unwrap(),
            };
            let loss = (lp * &weights).unwrap().sum_all().unwrap();
            let store = loss.backward().unwrap();
            assert!(store.get(base.lm_head()).is_none(), "lm_head is frozen");
            let grads: Vec<Tensor> = vars
                .iter()
                .map(|v| store.get(v.as_tensor()).unwrap().clone())
                .collect();
            (loss, grads)
        };
        let (want_loss, want) = run(None);
        for chunk in [1, 3, 4, 7, 10, 64] {
            let (loss, got) = run(Some(chunk));
            let what = format!("{dtype:?} chunk {chunk}");
            assert!(rel_diff(&loss, &want_loss) <= tol, "{what}: loss");
            assert_grads_close(&got, &want, tol, &what);
        }
    }
}

#[test]
fn gradient_checkpointing_gives_the_whole_graphs_loss_and_gradients() {
    let dense = model::load_path(&tiny_model(), &Device::Cpu).unwrap();
    let mut nf4 = model::load_path(&tiny_model(), &Device::Cpu).unwrap();
    nf4.quantize(Some(Nf4Settings::new(true))).unwrap();
    let (sft, dpo) = batches();
    let cases = [
        ("f32", &dense, DType::F32, 1e-5),
        ("f64", &dense, DType::F64, 1e-10),
        ("nf4", &nf4, DType::F32, 1e-5),
    ];
    for (label, m, dtype, tol) in cases {
        let base = TrainBase::new(&m.llama, dtype).unwrap();
        let lora = random_lora(&m.llama.cfg, dtype);
        for (objective, batch) in [(Objective::Sft, &sft), (Objective::Dpo { beta: 0.5 }, &dpo)] {
            let run = |p: f64, checkpointing: bool| {
                let mut drop = Dropout::new(p, 11);
                let drop = (p > 0.0).then_some(&mut drop);
                loss_and_grads(&base, &lora, batch, objective, 7.0, drop, checkpointing).unwrap()
            };
            for p in [0.0, 0.3] {
                let what = format!("{label} {objective:?} dropout {p}");
                let (want_loss, want) = run(p, false);
                let (loss, got) = run(p, true);
                assert!(
                    (loss - want_loss).abs() <= tol * want_loss.abs(),
                    "{what}: loss {loss} vs {want_loss}"
                );
                assert_grads_close(&got, &want, tol, &what);
            }
            // Dropout changed the gradients, so the replayed masks were compared above.
            let (_, plain) = run(0.0, true);
            let (_, dropped) = run(0.3, true);
            assert!(
                rel_diff(&dropped[0], &plain[0]) > 1e-3,
                "{label}: dropout inactive"
            );
        }
    }
}

fn train_metrics(dir: &std::path::Path, model: &std::path::Path, flag: &str) -> Vec<Value> {
    let out = dir.join(format!("out-{flag}"));
    let o = Command::new(bin())
        .args(["train", "--model", model.to_str().unwrap()])
        .args(["--data", dir.join("train.jsonl").to_str().unwrap()])
        .args(["--out", out.to_str().unwrap(), "--val-split", "0"])
        .args([
            "--target-modules",
            "all-linear",
            "--rank",
            "4",
            "--alpha",
            "8",
        ])
        .args(["--batch-size", "3", "--grad-accum", "2", "--max-steps", "3"])
        .args([
            "--dropout",
            "0.2",
            "--lr",
            "0.01",
            "--warmup-ratio",
            "0",
            "--max-seq-len",
            "64",
        ])
        .args(["--gradient-checkpointing", flag])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let args: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training_args.json")).unwrap())
            .unwrap();
    assert_eq!(args["gradient_checkpointing"], flag == "true", "{args}");
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn train_command_gives_the_same_run_with_and_without_checkpointing() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf_with(&model, "smollm", true, Some(TINY_CHAT_TEMPLATE));
    let lines: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({"instruction": format!("question {i}?"), "output": format!("answer {}", i * 7 % 10)})
                .to_string()
        })
        .collect();
    std::fs::write(dir.path().join("train.jsonl"), lines.join("\n")).unwrap();
    let on = train_metrics(dir.path(), &model, "true");
    let off = train_metrics(dir.path(), &model, "false");
    assert_eq!(on.len(), 3);
    for (a, b) in on.iter().zip(&off) {
        for key in ["loss", "grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * y.abs(),
                "step {}: {key} {x} vs {y}",
                a["step"]
            );
        }
    }
}
