//! The training loop: data order, gradient accumulation, clipping, AdamW, schedule, evaluation,
//! early stopping, atomic checkpoints and exact resume, PEFT export, metrics and a loss plot.

use super::backward::loss_and_grads;
use super::config::TrainConfig;
use super::data::{self, Dataset, Example, Method};
use super::forward::{loss_sum, pack, Dropout, LoraIn, Objective, PackedBatch, TrainBase};
use super::optim::{clip, lr_at, AdamW};
use super::params::{write_atomic, LoraParams, LoraShape};
use crate::model::{LoadedModel, Proj};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub steps: usize,
    pub first_loss: f64,
    pub final_loss: f64,
    pub best_val_loss: Option<f64>,
    pub stopped_early: bool,
    pub trainable_params: usize,
    /// Training examples after mixing and the validation split.
    pub train_examples: usize,
    pub tokens_per_second: f64,
    /// The process's peak resident memory so far (Linux `VmHWM`), when the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    pub out: PathBuf,
}

/// The peak resident set size of this process (`VmHWM` in `/proc/self/status`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resolves `--target-modules` (`all-linear` = all seven).
pub fn targets(names: &[String]) -> Result<Vec<Proj>> {
    if names.iter().any(|n| n == "all-linear") {
        return Ok(Proj::ALL.to_vec());
    }
    let mut out = Vec::new();
    for n in names {
        let p = Proj::from_name(n).with_context(|| {
            format!("target module `{n}` is not one of q/k/v/o/gate/up/down_proj or all-linear")
        })?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        bail!("no target modules");
    }
    out.sort();
    Ok(out)
}

fn pad_id(model: &LoadedModel) -> u32 {
    model
        .tokenizer
        .as_ref()
        .and_then(|t| t.pad_id())
        .or(model.eos_ids.first().copied())
        .unwrap_or(0)
}

/// Sequences of a micro-batch for packing (DPO: chosen first, then rejected).
fn batch_of(examples: &[&Example], pad: u32) -> Result<PackedBatch> {
    let mut seqs: Vec<(&[u32], &[bool])> = Vec::new();
    let mut rejected = Vec::new();
    for ex in examples {
        match ex {
            Example::Sft(t) => seqs.push((&t.ids, &t.mask)),
            Example::Dpo {
                chosen,
                rejected: r,
            } => {
                seqs.push((&chosen.ids, &chosen.mask));
                rejected.push((&r.ids[..], &r.mask[..]));
            }
        }
    }
    seqs.extend(rejected);
    pack(&seqs, pad)
}

/// What the config trains.
fn objective(cfg: &TrainConfig) -> Objective {
    match cfg.method {
        Method::Sft => Objective::Sft,
        Method::Dpo => Objective::Dpo { beta: cfg.beta },
    }
}

/// The loss normaliser of a micro-batch: SFT's loss tokens, DPO's pairs.
fn loss_count(cfg: &TrainConfig, batch: &PackedBatch) -> usize {
    match cfg.method {
        Method::Sft => batch.targets.len(),
        Method::Dpo => batch.per_seq.len() / 2,
    }
}

/// Mean validation loss (no dropout, no graph).
pub fn evaluate(
    base: &TrainBase,
    lora: &LoraParams,
    cfg: &TrainConfig,
    val: &Dataset,
    pad: u32,
) -> Result<f64> {
    let (mut total, mut n) = (0.0, 0usize);
    let refs: Vec<&Example> = val.examples.iter().collect();
    let lora = LoraIn {
        params: lora,
        grad: false,
    };
    for chunk in refs.chunks(cfg.batch_size) {
        let batch = batch_of(chunk, pad)?;
        let l = loss_sum(base, Some(lora), &batch, objective(cfg), None)?;
        total += l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        n += loss_count(cfg, &batch);
    }
    Ok(total / n.max(1) as f64)
}

/// Example index at position `g` of the endless sequence of seeded per-epoch shuffles.
fn order_at(n: usize, seed: u64, g: usize, cache: &mut HashMap<usize, Vec<usize>>) -> usize {
    let epoch = g / n;
    let perm = cache.entry(epoch).or_insert_with(|| {
        let mut p: Vec<usize> = (0..n).collect();
        p.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
            seed.wrapping_add(epoch as u64 * 7919),
        ));
        p
    });
    perm[g % n]
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct State {
    step: usize,
    best_val: Option<f64>,
    evals_since_best: usize,
    first_loss: Option<f64>,
    last_loss: f64,
}

fn save_checkpoint(out: &Path, lora: &LoraParams, opt: &AdamW, st: &State) -> Result<()> {
    let tmp = out.join(".checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    candle_core::safetensors::save(&lora.peft_tensors()?, tmp.join("lora.safetensors"))?;
    let mut optim = HashMap::new();
    for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
        optim.insert(format!("m.{i}"), m.contiguous()?);
        optim.insert(format!("v.{i}"), v.contiguous()?);
    }
    candle_core::safetensors::save(&optim, tmp.join("optim.safetensors"))?;
    std::fs::write(
        tmp.join("state.json"),
        serde_json::to_string(&json!({"state": st, "adam_t": opt.t}))?,
    )?;
    let dst = out.join("checkpoint");
    let old = out.join(".checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if dst.exists() {
        std::fs::rename(&dst, &old)?;
    }
    std::fs::rename(&tmp, &dst)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn load_checkpoint(out: &Path, lora: &LoraParams, opt: &mut AdamW) -> Result<State> {
    let dir = [out.join("checkpoint"), out.join(".checkpoint.old")]
        .into_iter()
        .find(|d| d.join("state.json").is_file())
        .with_context(|| format!("--resume: no checkpoint in {}", out.display()))?;
    let dev = candle_core::Device::Cpu;
    lora.load_tensors(&candle_core::safetensors::load(
        dir.join("lora.safetensors"),
        &dev,
    )?)?;
    let optim = candle_core::safetensors::load(dir.join("optim.safetensors"), &dev)?;
    for i in 0..opt.m.len() {
        opt.m[i] = optim
            .get(&format!("m.{i}"))
            .context("checkpoint optimizer state incomplete")?
            .clone();
        opt.v[i] = optim
            .get(&format!("v.{i}"))
            .context("checkpoint optimizer state incomplete")?
            .clone();
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)?;
    opt.t = v["adam_t"].as_u64().unwrap_or(0) as usize;
    Ok(serde_json::from_value(v["state"].clone())?)
}

/// Trains an adapter as `cfg` says and writes the output folder.
pub fn train(cfg: &TrainConfig, model: &LoadedModel) -> Result<Summary> {
    cfg.validate()?;
    let out = cfg.out.clone().context("--out is required")?;
    let data_path = cfg.data.clone().context("--data is required")?;
    if cfg.max_seq_len > model.llama.max_context() {
        bail!(
            "max_seq_len {} exceeds the model's context of {} tokens",
            cfg.max_seq_len,
            model.llama.max_context()
        );
    }
    let tok = model.tokenizer()?;
    // Everything that can fail on the input happens before the output folder is touched.
    let mut train = data::load(
        &data_path,
        tok,
        cfg.method,
        cfg.max_seq_len,
        cfg.skip_bad_lines,
    )?;
    if let Some(mix) = &cfg.mix {
        let (path, share) = mix
            .rsplit_once(':')
            .context("--mix takes FILE:DOMAIN_SHARE, e.g. general.jsonl:0.8")?;
        let share: f64 = share
            .parse()
            .ok()
            .filter(|s: &f64| *s > 0.0 && *s <= 1.0)
            .context("--mix share must be in (0, 1]")?;
        let general = data::load(
            Path::new(path),
            tok,
            cfg.method,
            cfg.max_seq_len,
            cfg.skip_bad_lines,
        )?;
        let want = ((train.examples.len() as f64) * (1.0 - share) / share).round() as usize;
        let mut pick: Vec<usize> = (0..general.examples.len()).collect();
        pick.shuffle(&mut rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x5eed));
        for i in pick.into_iter().cycle().take(want) {
            train.examples.push(general.examples[i].clone());
        }
    }
    let val = match &cfg.val {
        Some(p) => Some(data::load(
            p,
            tok,
            cfg.method,
            cfg.max_seq_len,
            cfg.skip_bad_lines,
        )?),
        None if cfg.val_split > 0.0 && train.examples.len() >= 10 => {
            let mut idx: Vec<usize> = (0..train.examples.len()).collect();
            idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x7a1));
            let n_val = ((train.examples.len() as f64) * cfg.val_split).ceil() as usize;
            let val_idx: std::collections::HashSet<usize> = idx[..n_val].iter().copied().collect();
            let (mut tr, mut va) = (Vec::new(), Vec::new());
            for (i, ex) in train.examples.drain(..).enumerate() {
                if val_idx.contains(&i) {
                    va.push(ex)
                } else {
                    tr.push(ex)
                }
            }
            train.examples = tr;
            Some(Dataset {
                examples: va,
                ..Default::default()
            })
        }
        None => None,
    };
    let shape = LoraShape {
        rank: cfg.rank,
        alpha: cfg.alpha,
        rslora: cfg.rslora,
        targets: targets(&cfg.target_modules)?,
    };
    if out.exists() && !cfg.resume {
        if !cfg.overwrite {
            bail!(
                "output folder {} exists (use --overwrite to replace it, or --resume to continue)",
                out.display()
            );
        }
        std::fs::remove_dir_all(&out)
            .with_context(|| format!("cannot remove {}", out.display()))?;
    }
    std::fs::create_dir_all(&out)?;
    let base = TrainBase::new(&model.llama, DType::F32)?;
    let lora = LoraParams::init(&model.llama.cfg, shape, cfg.seed, DType::F32)?;
    let vars = lora.vars();
    let mut opt = AdamW::new(&vars, cfg.weight_decay)?;
    let n = train.examples.len();
    let per_step = cfg.batch_size * cfg.grad_accum;
    let total = cfg
        .max_steps
        .unwrap_or_else(|| (cfg.epochs * n).div_ceil(per_step))
        .max(1);
    let warmup = (cfg.warmup_ratio * total as f64).ceil() as usize;
    let mut st = if cfg.resume {
        load_checkpoint(&out, &lora, &mut opt)?
    } else {
        State::default()
    };
    write_atomic(
        &out.join("training_args.json"),
        serde_json::to_string_pretty(cfg)?.as_bytes(),
    )?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("metrics.jsonl"))?;
    let pad = pad_id(model);
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(st.step as u64);
    let mut order_cache = HashMap::new();
    let (mut tokens_seen, started) = (0usize, Instant::now());
    let mut stopped_early = false;
    let base_name = model.id.clone();
    while st.step < total {
        let step = st.step;
        let t0 = Instant::now();
        let lr = lr_at(cfg.scheduler, cfg.lr, step, total, warmup);
        // Micro-batches of this step, and the normaliser over the whole accumulation window.
        let micro: Vec<Vec<&Example>> = (0..cfg.grad_accum)
            .map(|j| {
                (0..cfg.batch_size)
                    .map(|k| {
                        &train.examples[order_at(
                            n,
                            cfg.seed,
                            (step * cfg.grad_accum + j) * cfg.batch_size + k,
                            &mut order_cache,
                        )]
                    })
                    .collect()
            })
            .collect();
        let batches: Vec<PackedBatch> = micro
            .iter()
            .map(|m| batch_of(m, pad))
            .collect::<Result<_>>()?;
        let norm: usize = batches.iter().map(|b| loss_count(cfg, b)).sum();
        let mut acc: Option<Vec<Tensor>> = None;
        let mut loss_total = 0.0;
        for (j, batch) in batches.iter().enumerate() {
            let mut drop = Dropout::new(
                cfg.dropout,
                cfg.seed ^ ((step * cfg.grad_accum + j) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            let (l, g) = loss_and_grads(
                &base,
                &lora,
                batch,
                objective(cfg),
                norm.max(1) as f64,
                Some(&mut drop),
                cfg.gradient_checkpointing,
            )?;
            loss_total += l;
            acc = Some(match acc {
                None => g,
                Some(a) => a
                    .iter()
                    .zip(&g)
                    .map(|(x, y)| x + y)
                    .collect::<candle_core::Result<_>>()?,
            });
            tokens_seen += batch.ids.elem_count();
        }
        let mut grads = acc.context("no micro-batches")?;
        let grad_norm = clip(&mut grads, cfg.max_grad_norm)?;
        opt.step(&vars, &grads, lr)?;
        st.step += 1;
        st.first_loss.get_or_insert(loss_total);
        st.last_loss = loss_total;
        let tps = batches.iter().map(|b| b.ids.elem_count()).sum::<usize>() as f64
            / t0.elapsed().as_secs_f64();
        writeln!(
            metrics,
            "{}",
            json!({"step": st.step, "loss": loss_total, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps, "epoch": (st.step * per_step) as f64 / n as f64})
        )?;
        pb.set_position(st.step as u64);
        pb.set_message(format!(
            "loss {loss_total:.4} lr {lr:.2e} gnorm {grad_norm:.3} {tps:.0} tok/s"
        ));
        let last = st.step == total;
        if let Some(val) = &val {
            if (cfg.eval_every > 0 && st.step % cfg.eval_every == 0) || last {
                let vl = evaluate(&base, &lora, cfg, val, pad)?;
                writeln!(metrics, "{}", json!({"step": st.step, "val_loss": vl}))?;
                if st.best_val.is_none_or(|b| vl < b) {
                    st.best_val = Some(vl);
                    st.evals_since_best = 0;
                    lora.save_peft(&out.join("best"), &base_name, cfg.dropout)?;
                } else {
                    st.evals_since_best += 1;
                    if cfg.early_stopping_patience > 0
                        && st.evals_since_best >= cfg.early_stopping_patience
                    {
                        stopped_early = true;
                    }
                }
            }
        }
        if (cfg.save_every > 0 && st.step % cfg.save_every == 0) || last || stopped_early {
            save_checkpoint(&out, &lora, &opt, &st)?;
        }
        if stopped_early {
            pb.println(format!(
                "early stopping at step {}: no better validation loss in {} evaluations",
                st.step, cfg.early_stopping_patience
            ));
            break;
        }
    }
    pb.finish_and_clear();
    // The output adapter: the best by validation loss when there was validation, else the last.
    if out.join("best").join("adapter_model.safetensors").is_file() {
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::copy(out.join("best").join(f), out.join(format!(".{f}.tmp")))?;
            std::fs::rename(out.join(format!(".{f}.tmp")), out.join(f))?;
        }
    } else {
        lora.save_peft(&out, &base_name, cfg.dropout)?;
    }
    super::plot::loss_curve(&out.join("metrics.jsonl"), &out.join("loss.png"))?;
    let summary = Summary {
        steps: st.step,
        first_loss: st.first_loss.unwrap_or(f64::NAN),
        final_loss: st.last_loss,
        best_val_loss: st.best_val,
        stopped_early,
        trainable_params: lora.num_params(),
        train_examples: n,
        tokens_per_second: tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
        peak_rss_bytes: peak_rss_bytes(),
        out: out.clone(),
    };
    Ok(summary)
}
