//! How far greedy answers of the default model follow the f32 model when its linear weights are
//! changed by known amounts: bf16 rounding, 8- and 6-bit block rounding, Gaussian noise, plain NF4
//! (with and without double quantization) and calibrated NF4 (`loraplex quantize --calibration`
//! on the example datasets' training splits). It puts the NF4 agreement numbers on a scale: what
//! fraction of free-running tokens survives a given weight error on this model.
//!
//! `cargo bench --bench agreement` (fetches the default model on first use; the calibrated
//! variant runs the release binary for 3–4 minutes). Knobs: `LORAPLEX_BENCH_TOKENS` (answer
//! length, default 32), `LORAPLEX_BENCH_CALIBRATED` (a folder written by `loraplex quantize
//! --calibration` to use instead, or `skip`).

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use loraplex::agreement::{agreement, chat_prompts, greedy_answers, Agreement, CHAT_PROMPTS};
use loraplex::model::{self, LinearWeight, LoadedModel, Nf4Settings};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The f32 model with every linear weight `w` (`cols` per row) replaced by `change(w, cols)`.
fn changed(change: &dyn Fn(&[f32], usize) -> Vec<f32>) -> Result<LoadedModel> {
    let mut m = model::load(None)?;
    for block in &mut m.llama.blocks {
        for lin in &mut block.proj {
            let w = lin.dense_weight(&Device::Cpu)?;
            let (rows, cols) = w.dims2()?;
            let v = change(&w.flatten_all()?.to_vec1::<f32>()?, cols);
            lin.weight = LinearWeight::Dense(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?);
        }
    }
    Ok(m)
}

/// Symmetric rounding to `levels` steps either side of zero, one absmax per 64 weights.
fn block_round(w: &[f32], levels: f32) -> Vec<f32> {
    let mut v = w.to_vec();
    for b in v.chunks_mut(64) {
        let a = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        if a > 0.0 {
            b.iter_mut()
                .for_each(|x| *x = (*x / a * levels).round() / levels * a);
        }
    }
    v
}

/// Adds Gaussian noise of `rel` times each row's RMS (deterministic xorshift, Irwin–Hall).
fn noisy(w: &[f32], cols: usize, rel: f32) -> Vec<f32> {
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut gauss = move || {
        let mut t = 0f32;
        for _ in 0..12 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            t += (s >> 40) as f32 / (1u64 << 24) as f32;
        }
        t - 6.0
    };
    let mut v = w.to_vec();
    for row in v.chunks_mut(cols) {
        let rms = (row.iter().map(|x| x * x).sum::<f32>() / cols as f32).sqrt();
        row.iter_mut().for_each(|x| *x += rel * rms * gauss());
    }
    v
}

/// RMS of the change of all linear weights, relative to their RMS.
fn relative_error(base: &LoadedModel, m: &LoadedModel) -> Result<f64> {
    let (mut num, mut den) = (0f64, 0f64);
    for (bb, bm) in base.llama.blocks.iter().zip(&m.llama.blocks) {
        for (lb, lm) in bb.proj.iter().zip(&bm.proj) {
            let a = lb
                .dense_weight(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let b = lm
                .dense_weight(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (x, y) in a.iter().zip(&b) {
                num += f64::from(x - y).powi(2);
                den += f64::from(*x).powi(2);
            }
        }
    }
    Ok((num / den).sqrt())
}

/// A calibrated NF4 folder: the one named by `LORAPLEX_BENCH_CALIBRATED`, or one written now.
fn calibrated_folder(tmp: &Path) -> Result<Option<PathBuf>> {
    match std::env::var("LORAPLEX_BENCH_CALIBRATED") {
        Ok(v) if v == "skip" => return Ok(None),
        Ok(v) => return Ok(Some(PathBuf::from(v))),
        Err(_) => {}
    }
    let out = tmp.join("nf4-calibrated");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loraplex"));
    cmd.arg("quantize").arg("--out").arg(&out);
    for set in ["legal", "medical", "chatbot"] {
        cmd.arg("--calibration")
            .arg(root.join(format!("data/{set}/train.jsonl")));
    }
    eprintln!("running loraplex quantize --calibration (3-4 minutes on 2 cores) ...");
    let status = cmd.status().context("running loraplex quantize")?;
    anyhow::ensure!(status.success(), "loraplex quantize failed: {status}");
    Ok(Some(out))
}

fn main() -> Result<()> {
    loraplex::init_threads();
    loraplex::fetch::ensure_default_model()?;
    let tokens = std::env::var("LORAPLEX_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let base = model::load(None)?;
    let prompts = chat_prompts(&base, &CHAT_PROMPTS)?;
    let reference = greedy_answers(&base, &prompts, tokens)?;
    let tmp = tempfile::tempdir()?;

    type Build<'a> = Box<dyn Fn() -> Result<LoadedModel> + 'a>;
    let nf4 = |double_quant: bool| -> Build {
        Box::new(move || {
            let mut m = model::load(None)?;
            m.quantize(Some(Nf4Settings::new(double_quant)))?;
            Ok(m)
        })
    };
    let mut variants: Vec<(String, Build)> = vec![
        ("f32 (itself)".into(), Box::new(|| model::load(None))),
        (
            "bf16 rounding".into(),
            Box::new(|| {
                changed(&|w, _| {
                    w.iter()
                        .map(|x| half::bf16::from_f32(*x).to_f32())
                        .collect()
                })
            }),
        ),
        (
            "8-bit absmax, blocks of 64".into(),
            Box::new(|| changed(&|w, _| block_round(w, 127.0))),
        ),
        (
            "6-bit absmax, blocks of 64".into(),
            Box::new(|| changed(&|w, _| block_round(w, 31.0))),
        ),
    ];
    for rel in [0.01f32, 0.02, 0.04] {
        variants.push((
            format!("Gaussian noise {:.0}% of row RMS", rel * 100.0),
            Box::new(move || changed(&|w, cols| noisy(w, cols, rel))),
        ));
    }
    variants.push(("NF4 (round to nearest)".into(), nf4(false)));
    variants.push(("NF4 + double quant".into(), nf4(true)));
    if let Some(folder) = calibrated_folder(tmp.path())? {
        variants.push((
            "NF4 calibrated (GPTQ, default)".into(),
            Box::new(move || model::load_path(&folder, &Device::Cpu)),
        ));
    }

    let mut rows: Vec<(String, f64, Agreement)> = Vec::new();
    for (label, build) in &variants {
        let m = build()?;
        let err = relative_error(&base, &m)?;
        let a = agreement(&m, &prompts, &reference)?;
        eprintln!("{label}: weight error {:.2}%, {a:?}", err * 100.0);
        rows.push((label.clone(), err, a));
    }
    println!(
        "\n{} prompts x {tokens} greedy tokens, against the f32 model's answers\n",
        prompts.len()
    );
    println!("| weights | RMS weight error | free-running | teacher-forced | first token | tokens before the first difference (mean) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (label, err, a) in rows {
        println!(
            "| {label} | {:.2}% | {:.1}% | {:.1}% | {}/{} | {:.1} |",
            err * 100.0,
            a.free * 100.0,
            a.forced * 100.0,
            a.first,
            a.answers,
            a.mean_prefix
        );
    }
    Ok(())
}
