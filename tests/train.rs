//! Training: the differentiable forward against the PEFT goldens, gradient checks against finite
//! differences (SFT and DPO, every module type, with and without rsLoRA), loss masking,
//! memorisation, kill-and-resume, bad input, and the PEFT export served by `generate`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use loraplex::model::{self, Proj};
use loraplex::train::forward::{
    dpo_loss_sum, hidden_states, pack, sft_loss_sum, token_logprobs, TrainBase,
};
use loraplex::train::params::{LoraParams, LoraShape};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

fn tiny_base(dtype: DType) -> (loraplex::model::LoadedModel, TrainBase) {
    let m = model::load_path(&tiny_model(), &Device::Cpu).unwrap();
    let b = TrainBase::new(&m.llama, dtype).unwrap();
    (m, b)
}

#[test]
fn training_forward_reproduces_the_peft_goldens() {
    let (m, base) = tiny_base(DType::F32);
    let g = golden();
    let shape = LoraShape {
        rank: 8,
        alpha: 16.0,
        rslora: false,
        targets: Proj::ALL.to_vec(),
    };
    let lora = LoraParams::init(&m.llama.cfg, shape, 0, DType::F32).unwrap();
    let st = candle_core::safetensors::load(
        tiny_adapter("all-r8").join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    lora.load_tensors(&st).unwrap();
    for (label, l) in [("base", None), ("all-r8", Some(&lora))] {
        for r in g["cases"][label]["results"].as_array().unwrap() {
            let prompt = ids(&g["prompts"][r["prompt"].as_str().unwrap()]);
            let n = prompt.len();
            let ids_t = Tensor::from_vec(prompt.clone(), (1, n), &Device::Cpu).unwrap();
            let h = hidden_states(&base, l, &ids_t, None).unwrap();
            // log-probs of every vocab entry at the last position, vs the golden logits' log-softmax.
            let all: Vec<u32> = (0..256).collect();
            let lp: Vec<f32> = token_logprobs(&base, &h, &vec![(n - 1) as u32; 256], &all)
                .unwrap()
                .to_vec1()
                .unwrap();
            let logits = floats(&r["last_logits"]);
            let mx = logits.iter().cloned().fold(f32::MIN, f32::max);
            let z = logits.iter().map(|x| (x - mx).exp()).sum::<f32>().ln() + mx;
            let want: Vec<f32> = logits.iter().map(|x| x - z).collect();
            let d = max_abs_diff(&lp, &want);
            assert!(
                d < 1e-4,
                "{label}: training forward differs from PEFT by {d}"
            );
        }
    }
}

/// Seeded random non-zero LoRA weights in f64 (B starts at zero in PEFT's init, which hides A's gradient).
fn random_lora(m: &loraplex::model::LoadedModel, rslora: bool) -> LoraParams {
    let shape = LoraShape {
        rank: 4,
        alpha: 8.0,
        rslora,
        targets: Proj::ALL.to_vec(),
    };
    let lora = LoraParams::init(&m.llama.cfg, shape, 3, DType::F64).unwrap();
    // Seeded, so every run checks the same point (candle's randn is not seeded: a rare draw put
    // a gradient entry near zero, where the finite difference's relative error is large).
    for (i, (_, b)) in lora.pairs.values().enumerate() {
        let v: Vec<f64> = normal(b.elem_count(), 100 + i as u64, 0.2)
            .into_iter()
            .map(f64::from)
            .collect();
        b.set(&Tensor::from_vec(v, b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    lora
}

fn gradcheck(loss: &dyn Fn(&LoraParams) -> Tensor, lora: &LoraParams, what: &str) {
    let l = loss(lora);
    let grads = l.backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for (&(layer, p), (a, b)) in &lora.pairs {
        for (var, half) in [(a, "A"), (b, "B")] {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{what}: no gradient for {p:?}.{half}"));
            let flat: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let orig = var.as_tensor().copy().unwrap();
            let n = flat.len();
            for &i in &[0, n / 3, n - 1] {
                let mut v: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
                let x0 = v[i];
                v[i] = x0 + eps;
                var.set(&Tensor::from_vec(v.clone(), orig.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let lp = loss(lora).to_scalar::<f64>().unwrap();
                v[i] = x0 - eps;
                var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let lm = loss(lora).to_scalar::<f64>().unwrap();
                var.set(&orig).unwrap();
                let fd = (lp - lm) / (2.0 * eps);
                let rel = (fd - flat[i]).abs() / fd.abs().max(flat[i].abs()).max(1e-7);
                assert!(rel < 1e-3, "{what}: layer {layer} {p:?}.{half}[{i}]: backprop {} vs finite diff {fd} (rel {rel})", flat[i]);
                checked += 1;
            }
        }
    }
    assert_eq!(
        checked,
        2 * 7 * 2 * 3,
        "{what}: every module type in both layers"
    );
}

#[test]
fn lora_gradients_match_finite_differences_for_sft_and_dpo() {
    let (m, base) = tiny_base(DType::F64);
    let s1: Vec<u32> = vec![1, 15, 72, 101, 200, 33, 7, 250];
    let m1 = vec![false, false, false, false, true, true, true, true];
    let s2: Vec<u32> = vec![1, 5, 10, 20, 40, 80];
    let m2 = vec![false, false, false, true, true, true];
    let sft = pack(&[(&s1, &m1), (&s2, &m2)], 0).unwrap();
    // DPO: chosen = s1, rejected = s1 with another response.
    let r1: Vec<u32> = vec![1, 15, 72, 101, 9, 9, 64, 3];
    let dpo = pack(&[(&s1, &m1), (&r1, &m1)], 0).unwrap();
    for rslora in [false, true] {
        let lora = random_lora(&m, rslora);
        gradcheck(
            &|l| sft_loss_sum(&base, Some(l), &sft, None).unwrap(),
            &lora,
            &format!("sft rslora={rslora}"),
        );
        gradcheck(
            &|l| dpo_loss_sum(&base, l, &dpo, 0.5, None).unwrap(),
            &lora,
            &format!("dpo rslora={rslora}"),
        );
    }
}

#[test]
fn only_response_tokens_carry_loss() {
    let s: Vec<u32> = vec![1, 40, 41, 42, 43, 44];
    let mask = vec![false, false, false, true, true, false];
    let b = pack(&[(&s, &mask), (&s[..4], &mask[..4])], 0).unwrap();
    // Row t-1 predicts token t; only tokens 42 and 43 of the first and 42 of the second count.
    assert_eq!(b.targets, vec![42, 43, 42]);
    assert_eq!(b.rows, vec![2, 3, 6 + 2]);
    assert_eq!(b.per_seq, vec![2, 1]);
    // The loss equals the inference model's NLL of exactly those tokens.
    let (m, base) = tiny_base(DType::F32);
    let loss = sft_loss_sum(&base, None, &b, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mut want = 0.0f32;
    for (prefix, tok) in [(&s[..3], 42u32), (&s[..4], 43), (&s[..3], 42)] {
        let mut cache = m.llama.new_cache();
        let mut seqs = [loraplex::runtime::SeqInput {
            tokens: prefix,
            cache: &mut cache,
            lora: None,
        }];
        let lp = loraplex::model::llama::log_softmax(
            &loraplex::runtime::forward(&m.llama, &mut seqs, loraplex::runtime::LogitsMode::Last)
                .unwrap(),
        )
        .unwrap();
        let v: Vec<Vec<f32>> = lp.to_vec2().unwrap();
        want -= v[0][tok as usize];
    }
    assert!((loss - want).abs() < 1e-3, "{loss} vs {want}");
}

// ---- the `train` command on the tiny model (byte tokenizer + chat template) ----

struct TinyRun {
    dir: tempfile::TempDir,
    model: std::path::PathBuf,
}

fn tiny_run() -> TinyRun {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf_with(&model, "smollm", true, Some(TINY_CHAT_TEMPLATE));
    let lines: Vec<String> = (0..16)
        .map(|i| {
            json!({"instruction": format!("q{i}?"), "output": format!("A{}-{}", i * 7 % 10, i % 3)})
                .to_string()
        })
        .collect();
    std::fs::write(dir.path().join("train.jsonl"), lines.join("\n")).unwrap();
    TinyRun { dir, model }
}

impl TinyRun {
    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
    fn train(&self, extra: &[&str]) -> std::process::Output {
        let mut args = vec![
            "train".to_string(),
            "--model".into(),
            self.model.to_str().unwrap().into(),
            "--data".into(),
            self.p("train.jsonl"),
            "--val-split".into(),
            "0".into(),
            "--rank".into(),
            "8".into(),
            "--alpha".into(),
            "16".into(),
            "--target-modules".into(),
            "all-linear".into(),
            "--lr".into(),
            "0.01".into(),
            "--batch-size".into(),
            "4".into(),
            "--grad-accum".into(),
            "1".into(),
            "--max-seq-len".into(),
            "64".into(),
            "--dropout".into(),
            "0".into(),
            "--warmup-ratio".into(),
            "0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Command::new(bin()).args(&args).output().unwrap()
    }

    /// The run that memorises the 16 examples (400 steps, r=16), with extra flags.
    fn train_memorise(&self, out: &str, extra: &[&str]) -> std::process::Output {
        let mut args = vec!["--out", out, "--max-steps", "400", "--lr", "0.005"];
        args.extend(["--rank", "16", "--alpha", "32", "--warmup-ratio", "0.05"]);
        args.extend(extra);
        self.train(&args)
    }

    /// `generate --chat` through `adapter` (4 greedy tokens) with extra flags: the answer text.
    fn answer(&self, adapter: &str, question: &str, extra: &[&str]) -> String {
        let mut args = vec!["generate", "--model", self.model.to_str().unwrap()];
        args.extend([
            "--adapter",
            adapter,
            "--chat",
            question,
            "--max-tokens",
            "4",
            "--json",
        ]);
        args.extend(extra);
        let g = Command::new(bin()).args(&args).output().unwrap();
        assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
        let v: Value = serde_json::from_slice(&g.stdout).unwrap();
        v["text"].as_str().unwrap().to_string()
    }
}

fn last_loss(out: &Path) -> f64 {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let v: Value =
        serde_json::from_str(text.lines().rfind(|l| l.contains("\"loss\"")).unwrap()).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn memorises_sixteen_examples_and_the_adapter_is_served() {
    let r = tiny_run();
    let out = r.p("memo");
    let o = r.train_memorise(&out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let loss = last_loss(Path::new(&out));
    assert!(loss < 0.05, "final train loss {loss}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_args.json",
        "metrics.jsonl",
        "loss.png",
    ] {
        assert!(Path::new(&out).join(f).is_file(), "{f} missing");
    }
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&out).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            cfg["peft_type"].as_str(),
            cfg["task_type"].as_str(),
            cfg["r"].as_u64()
        ),
        (Some("LORA"), Some("CAUSAL_LM"), Some(16))
    );
    // generate through the adapter reproduces a training answer.
    assert_eq!(r.answer(&out, "q3?", &[]), "A1-0");
    // eval: base vs adapter on the training set (loss, exact match, format match).
    let e = Command::new(bin())
        .args([
            "eval",
            "--model",
            r.model.to_str().unwrap(),
            "--adapter",
            &out,
            "--data",
            &r.p("train.jsonl"),
            "--format-regex",
            r"^A\d-\d$",
            "--max-tokens",
            "4",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let reports: Value = serde_json::from_slice(&e.stdout).unwrap();
    let (base, adapted) = (&reports[0], &reports[1]);
    assert_eq!(base["label"], "base");
    assert_eq!(adapted["examples"], 16);
    assert_eq!(adapted["exact_match"], 1.0, "{reports}");
    assert_eq!(adapted["format_match"], 1.0);
    assert!(base["format_match"].as_f64().unwrap() < 0.5);
    assert!(
        adapted["loss"].as_f64().unwrap() < 0.1 && base["loss"].as_f64().unwrap() > 1.0,
        "{reports}"
    );
}

#[test]
fn qlora_on_an_nf4_base_memorises_and_the_adapter_is_served_on_it() {
    let r = tiny_run();
    let out = r.p("qlora");
    let nf4 = ["--quantize", "nf4", "--double-quant"];
    let o = r.train_memorise(&out, &nf4);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(summary["peak_rss_bytes"].as_u64().unwrap() > 0);
    let loss = last_loss(Path::new(&out));
    assert!(loss < 0.05, "final train loss {loss}");
    let args: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&out).join("training_args.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(args["quantize"], "nf4", "{args}");
    assert_eq!(args["double_quant"], true);
    // Served on the same NF4 base, the adapter answers like its training data.
    assert_eq!(r.answer(&out, "q3?", &nf4), "A1-0");
}

#[test]
fn killed_and_resumed_run_ends_with_the_same_adapter() {
    let r = tiny_run();
    let full = r.p("full");
    let args = ["--max-steps", "60", "--save-every", "5", "--dropout", "0.1"];
    let o = r.train(&[&["--out", &full], &args[..]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Same run, killed with SIGKILL after its first checkpoint, then resumed.
    let cut = r.p("cut");
    let mut child = Command::new(bin())
        .args([
            "train",
            "--model",
            r.model.to_str().unwrap(),
            "--data",
            &r.p("train.jsonl"),
            "--val-split",
            "0",
            "--rank",
            "8",
            "--alpha",
            "16",
            "--target-modules",
            "all-linear",
            "--lr",
            "0.01",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--max-seq-len",
            "64",
            "--warmup-ratio",
            "0",
            "--out",
            &cut,
        ])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = Path::new(&cut).join("checkpoint/state.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !state.is_file() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let st: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let at = st["state"]["step"].as_u64().unwrap();
    assert!(at < 60, "killed too late to test resuming (step {at})");
    let o = r.train(&[&["--out", &cut, "--resume"], &args[..]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = candle_core::safetensors::load(
        Path::new(&full).join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let b = candle_core::safetensors::load(
        Path::new(&cut).join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        let d = (t - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-6, "{k} differs by {d} after resuming at step {at}");
    }
}

#[test]
fn bad_training_input_is_refused_and_nothing_is_written() {
    let r = tiny_run();
    let out = r.p("never");
    let check = |data: &str, extra: &[&str], needle: &str| {
        std::fs::write(r.dir.path().join("bad.jsonl"), data).unwrap();
        let mut args = vec!["--data".to_string(), r.p("bad.jsonl")];
        args.extend([
            "--out".to_string(),
            out.clone(),
            "--max-steps".into(),
            "1".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = r.train(&refs);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "{needle}: should fail");
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !Path::new(&out).exists(),
            "{needle}: output folder was created"
        );
    };
    let good = json!({"instruction": "a", "output": "b"}).to_string();
    check(&format!("{good}\n{{not json\n"), &[], "bad.jsonl:2");
    check(
        &format!("{good}\n{}\n", json!({"instruction": "a"})),
        &[],
        "missing field `output`",
    );
    check("\n\n", &[], "no usable examples");
    check(
        &good,
        &["--max-seq-len", "999"],
        "exceeds the model's context",
    );
    // --skip-bad-lines counts the bad line and trains on the rest.
    std::fs::write(
        r.dir.path().join("bad.jsonl"),
        format!("{good}\n{{not json\n{good}\n"),
    )
    .unwrap();
    let o = r.train(&[
        "--data",
        &r.p("bad.jsonl"),
        "--out",
        &out,
        "--max-steps",
        "1",
        "--skip-bad-lines",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // An existing output folder needs --overwrite.
    let o = r.train(&["--out", &out, "--max-steps", "1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    assert!(r
        .train(&["--out", &out, "--max-steps", "1", "--overwrite"])
        .status
        .success());
}

#[test]
fn dpo_training_prefers_chosen_answers_and_mix_blends_a_general_set() {
    let r = tiny_run();
    let prefs: Vec<String> = (0..8)
        .map(|i| json!({"prompt": format!("p{i}?"), "chosen": format!("yes{i}"), "rejected": format!("no{i}")}).to_string())
        .collect();
    std::fs::write(r.dir.path().join("prefs.jsonl"), prefs.join("\n")).unwrap();
    let out = r.p("dpo");
    let o = r.train(&[
        "--method",
        "dpo",
        "--data",
        &r.p("prefs.jsonl"),
        "--out",
        &out,
        "--max-steps",
        "30",
        "--lr",
        "0.003",
        "--beta",
        "0.5",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(Path::new(&out).join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["loss"].as_f64())
        .collect();
    // DPO starts at log 2 (policy = reference) and falls as the margin grows.
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-3,
        "first DPO loss {}",
        losses[0]
    );
    assert!(
        *losses.last().unwrap() < 0.3,
        "DPO loss did not fall: {losses:?}"
    );
    // --mix: 16 domain examples keep a 0.8 share, so 4 general ones join them.
    let o = r.train(&[
        "--data",
        &r.p("train.jsonl"),
        "--out",
        &r.p("mixed"),
        "--max-steps",
        "1",
        "--mix",
        &format!("{}:0.8", r.p("prefs-sft.jsonl")),
    ]);
    assert!(!o.status.success(), "a missing mix file is an error");
    let general: Vec<String> = (0..8)
        .map(|i| json!({"instruction": format!("g{i}"), "output": "ok"}).to_string())
        .collect();
    std::fs::write(r.dir.path().join("general.jsonl"), general.join("\n")).unwrap();
    let o = r.train(&[
        "--data",
        &r.p("train.jsonl"),
        "--out",
        &r.p("mixed"),
        "--max-steps",
        "1",
        "--mix",
        &format!("{}:0.8", r.p("general.jsonl")),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["train_examples"], 20);
}
