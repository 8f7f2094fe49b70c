//! Adapter arithmetic: PEFT's `LoraModel.add_weighted_adapter` as a function from weighted
//! adapters to one new `LoraAdapter` (`r` = the new rank, `lora_alpha = r`, so scaling 1) that
//! every serving path (per-row, stacked, merged, GPU) then treats like any other adapter.
//!
//! Per targeted module, over the adapters that target it (a module only one adapter targets
//! combines that adapter alone), as PEFT computes it (`peft/utils/merge_utils.py`), in f32:
//! - `cat`: `A = [w_i s_i A_i]`, `B = [B_i]`; rank `Σ r_i`, zero rows/columns where an adapter
//!   does not target the module (the delta of today's weighted stack);
//! - `linear`, `ties`, `magnitude_prune`, `dare_linear`, `dare_ties`: A and B are reduced
//!   separately (equal ranks required) with the factor weights `sign(w_i s_i)·sqrt|w_i s_i|` on A
//!   and `sqrt|w_i s_i|` on B;
//! - `svd`, `ties_svd`, `magnitude_prune_svd`, `dare_linear_svd`, `dare_ties_svd`: the same
//!   reductions on the full deltas `dW_i = s_i B_i A_i` with the weights `w_i`, then a truncated
//!   SVD to `svd_rank` (default: the largest member rank): `B = U_k S_k`, `A = V_kᵀ` (`svd`).
//!
//! The reductions: a weighted sum; magnitude pruning (each adapter's tensor keeps its top
//! `density` fraction by |x|) then a weighted sum; TIES (magnitude pruning, a sign elected per
//! entry from the pruned unweighted tensors — `total`: the sign of their sum, `frequency`: of
//! their signs' sum — then the mean of the weighted entries that agree with it); DARE (each
//! entry kept with probability `density` from a seeded stream, kept entries divided by
//! `density`) then a weighted sum or TIES' election. One adapter alone is `linear`, as in PEFT.

use super::adapter::{LoraAdapter, LoraModule};
use super::combination::{Combination, CombineOptions, MajoritySign, Reduction};
use super::config::{PeftLoraConfig, TargetModules};
use super::svd;
use crate::model::Proj;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

/// One member's pair for the module being combined.
struct Part<'a> {
    index: usize,
    module: &'a LoraModule,
    weight: f64,
}

/// Combines weighted `members` into one adapter called `name` (see the module doc). Members must
/// have been validated against the same base. Errors say what is wrong (unequal ranks for a
/// method that needs them, a rank the module cannot hold, non-finite weights or results).
pub fn combine(
    name: &str,
    members: &[(Arc<LoraAdapter>, f64)],
    opts: &CombineOptions,
) -> Result<LoraAdapter> {
    opts.validate()?;
    if members.is_empty() {
        bail!("a combination needs at least one adapter");
    }
    for (a, w) in members {
        if !w.is_finite() {
            bail!("adapter `{}`: weight {w} is not a finite number", a.name);
        }
    }
    // PEFT: a single adapter can only be combined linearly.
    let method = match members.len() {
        1 => Combination::Linear,
        _ => opts.combination,
    };
    let rank = new_rank(method, members, opts.svd_rank)?;
    let keys: BTreeSet<(usize, Proj)> = members
        .iter()
        .flat_map(|(a, _)| a.modules.keys().copied())
        .collect();
    let mut modules = BTreeMap::new();
    for (layer, proj) in keys {
        let parts: Vec<Part> = members
            .iter()
            .enumerate()
            .filter_map(|(index, (a, w))| {
                a.modules.get(&(layer, proj)).map(|module| Part {
                    index,
                    module,
                    weight: *w,
                })
            })
            .collect();
        let seed = module_seed(opts.seed.unwrap_or(0), layer, proj);
        let combined = match method {
            Combination::Cat => cat(&parts, rank),
            m if m.is_svd() => svd_combine(m, &parts, rank, opts, seed),
            m => factor_combine(m, &parts, rank, opts, seed),
        }
        .with_context(|| {
            format!(
                "`{method}` of module model.layers.{layer}.{}.{}",
                proj.parent(),
                proj.name()
            )
        })?;
        modules.insert((layer, proj), combined);
    }
    let targets: BTreeSet<Proj> = modules.keys().map(|(_, p)| *p).collect();
    let config = PeftLoraConfig {
        r: rank,
        lora_alpha: rank as f64,
        use_rslora: false,
        lora_dropout: 0.0,
        target_modules: TargetModules::List(
            targets.into_iter().map(|p| p.name().to_string()).collect(),
        ),
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        fan_in_fan_out: false,
        base_model_name_or_path: members[0].0.config.base_model_name_or_path.clone(),
    };
    Ok(LoraAdapter {
        name: name.to_string(),
        dir: PathBuf::from(format!("combined:{name}")),
        config,
        modules,
    })
}

/// PEFT's new rank: the common rank (linear family), the sum (cat), or `svd_rank` / the
/// largest rank (`_svd`).
fn new_rank(
    method: Combination,
    members: &[(Arc<LoraAdapter>, f64)],
    svd_rank: Option<usize>,
) -> Result<usize> {
    let ranks: Vec<usize> = members.iter().map(|(a, _)| a.config.r).collect();
    if method.needs_equal_ranks() {
        if ranks.iter().any(|&r| r != ranks[0]) {
            let list: Vec<String> = members
                .iter()
                .map(|(a, _)| format!("`{}` r={}", a.name, a.config.r))
                .collect();
            bail!(
                "`{method}` combines the A and B factors entry by entry, so it needs adapters of \
                 one rank (as PEFT does); got {}. Use cat or an _svd combination instead",
                list.join(", ")
            );
        }
        return Ok(ranks[0]);
    }
    if method == Combination::Cat {
        // Each member's widest module (its config's r unless a rank_pattern widens one).
        return Ok(members
            .iter()
            .map(|(a, _)| a.modules.values().map(LoraModule::rank).max().unwrap_or(0))
            .sum());
    }
    Ok(svd_rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1)))
}

/// A tensor's values, row-major f32 on the host.
fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn finished(a: Vec<f32>, rank: usize, b: Vec<f32>, out: usize, inp: usize) -> Result<LoraModule> {
    if a.iter().chain(&b).any(|x| !x.is_finite()) {
        bail!("the combination produced NaN or infinite values (weights too large?)");
    }
    Ok(LoraModule {
        a: Tensor::from_vec(a, (rank, inp), &Device::Cpu)?,
        b: Tensor::from_vec(b, (out, rank), &Device::Cpu)?,
        scaling: 1.0,
    })
}

fn shape(parts: &[Part]) -> (usize, usize) {
    let m = parts[0].module;
    (m.b.dims()[0], m.a.dims()[1])
}

/// `cat`: `A = [w_i s_i A_i]` (rows), `B = [B_i]` (columns), zero-padded to `rank`.
fn cat(parts: &[Part], rank: usize) -> Result<LoraModule> {
    let (out, inp) = shape(parts);
    let mut a = vec![0f32; rank * inp];
    let mut b = vec![0f32; out * rank];
    let mut offset = 0;
    for p in parts {
        let r = p.module.rank();
        let (w, s) = (p.weight as f32, p.module.scaling as f32);
        for (dst, x) in a[offset * inp..(offset + r) * inp]
            .iter_mut()
            .zip(host(&p.module.a)?)
        {
            *dst = x * w * s;
        }
        let bv = host(&p.module.b)?;
        for row in 0..out {
            b[row * rank + offset..row * rank + offset + r]
                .copy_from_slice(&bv[row * r..(row + 1) * r]);
        }
        offset += r;
    }
    finished(a, rank, b, out, inp)
}

/// The linear family: A and B reduced separately with `±sqrt|w s|` on A and `sqrt|w s|` on B.
fn factor_combine(
    method: Combination,
    parts: &[Part],
    rank: usize,
    opts: &CombineOptions,
    seed: u64,
) -> Result<LoraModule> {
    let (out, inp) = shape(parts);
    if let Some(p) = parts.iter().find(|p| p.module.rank() != rank) {
        bail!(
            "member {} has rank {} here but the combination's rank is {rank} (a rank_pattern?); \
             `{method}` needs equal ranks",
            p.index,
            p.module.rank()
        );
    }
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    for p in parts {
        let ws = p.weight * p.module.scaling;
        let root = ws.abs().sqrt();
        wa.push((if ws >= 0.0 { root } else { -root }) as f32);
        wb.push(root as f32);
    }
    let reducer = Reducer::new(method, opts, seed, parts);
    let a: Vec<Vec<f32>> = parts
        .iter()
        .map(|p| host(&p.module.a))
        .collect::<Result<_>>()?;
    let b: Vec<Vec<f32>> = parts
        .iter()
        .map(|p| host(&p.module.b))
        .collect::<Result<_>>()?;
    let a = reducer.reduce(a, &wa, 0);
    let b = reducer.reduce(b, &wb, 1);
    finished(a, rank, b, out, inp)
}

/// The `_svd` family: the reduction on the deltas `s_i B_i A_i`, then a rank-`rank` SVD.
fn svd_combine(
    method: Combination,
    parts: &[Part],
    rank: usize,
    opts: &CombineOptions,
    seed: u64,
) -> Result<LoraModule> {
    let (out, inp) = shape(parts);
    let weights: Vec<f32> = parts.iter().map(|p| p.weight as f32).collect();
    let factors = if method.reduction() == Reduction::Sum {
        // Σ w_i s_i B_i A_i = [w_i s_i B_i] [A_i]: truncate without forming it.
        let r: usize = parts.iter().map(|p| p.module.rank()).sum();
        let mut b = vec![0f32; out * r];
        let mut a = Vec::with_capacity(r * inp);
        let mut offset = 0;
        for p in parts {
            let ri = p.module.rank();
            let c = (p.weight * p.module.scaling) as f32;
            let bv = host(&p.module.b)?;
            for row in 0..out {
                for j in 0..ri {
                    b[row * r + offset + j] = bv[row * ri + j] * c;
                }
            }
            a.extend(host(&p.module.a)?);
            offset += ri;
        }
        svd::truncate_factored(out, r, inp, &b, &a, rank)?
    } else {
        let deltas: Vec<Vec<f32>> = parts
            .iter()
            .map(|p| delta(p.module))
            .collect::<Result<_>>()?;
        let reducer = Reducer::new(method, opts, seed, parts);
        let merged = reducer.reduce(deltas, &weights, 2);
        svd::truncate_dense(out, inp, &merged, rank)?
    };
    finished(factors.a, rank, factors.b, out, inp)
}

/// `s B A` as PEFT's `get_delta_weight` gives it (f32; dot products accumulated in f64).
fn delta(m: &LoraModule) -> Result<Vec<f32>> {
    let (out, r, inp) = (m.b.dims()[0], m.rank(), m.a.dims()[1]);
    let (a, b) = (host(&m.a)?, host(&m.b)?);
    let s = m.scaling as f32;
    let mut d = vec![0f32; out * inp];
    for i in 0..out {
        for j in 0..inp {
            let dot: f64 = (0..r)
                .map(|t| b[i * r + t] as f64 * a[t * inp + j] as f64)
                .sum();
            d[i * inp + j] = dot as f32 * s;
        }
    }
    Ok(d)
}

/// SplitMix64: a tiny generator whose stream is fixed forever (DARE masks stay reproducible
/// across builds and dependency updates).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn mix(seed: u64, x: u64) -> u64 {
    SplitMix64(seed ^ x.wrapping_mul(0xD1B5_4A32_D192_ED03)).next()
}

/// The seed of one module's masks: the user's seed mixed with the module's place.
fn module_seed(seed: u64, layer: usize, proj: Proj) -> u64 {
    mix(mix(seed, layer as u64), proj.index() as u64)
}

/// One module's reduction (see the module doc), with its parameters.
struct Reducer {
    reduction: Reduction,
    density: f64,
    sign: MajoritySign,
    /// A mask seed per member, for this module.
    seeds: Vec<u64>,
}

impl Reducer {
    fn new(method: Combination, opts: &CombineOptions, seed: u64, parts: &[Part]) -> Self {
        Self {
            reduction: method.reduction(),
            density: opts.density.unwrap_or(1.0),
            sign: opts.majority_sign.unwrap_or_default(),
            seeds: parts.iter().map(|p| mix(seed, p.index as u64)).collect(),
        }
    }

    /// Reduces the members' tensors (same length) with `weights`; `half` (0 = A, 1 = B, 2 = the
    /// delta) gives each its own masks.
    fn reduce(&self, tensors: Vec<Vec<f32>>, weights: &[f32], half: u64) -> Vec<f32> {
        let pruned: Vec<Vec<f32>> = tensors
            .into_iter()
            .zip(&self.seeds)
            .map(|(t, &s)| match self.reduction {
                Reduction::Sum => t,
                Reduction::MagnitudePrune | Reduction::Ties => magnitude_prune(t, self.density),
                Reduction::DareLinear | Reduction::DareTies => {
                    random_prune(t, self.density, mix(s, half))
                }
            })
            .collect();
        let n = pruned[0].len();
        match self.reduction {
            Reduction::Sum | Reduction::MagnitudePrune | Reduction::DareLinear => (0..n)
                .map(|j| pruned.iter().zip(weights).map(|(t, w)| t[j] * w).sum())
                .collect(),
            Reduction::Ties | Reduction::DareTies => (0..n)
                .map(|j| {
                    let elect: f32 = match self.sign {
                        MajoritySign::Total => pruned.iter().map(|t| t[j]).sum(),
                        MajoritySign::Frequency => pruned.iter().map(|t| sign(t[j])).sum(),
                    };
                    let majority = if elect >= 0.0 { 1.0 } else { -1.0 };
                    let (mut sum, mut count) = (0f32, 0f32);
                    for (t, w) in pruned.iter().zip(weights) {
                        if sign(t[j]) == majority {
                            sum += t[j] * w;
                            count += 1.0;
                        }
                    }
                    sum / count.max(1.0)
                })
                .collect(),
        }
    }
}

/// torch.sign: -1, 0 or 1 (`f32::signum` gives 1 for 0).
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Keeps the `floor(density · n)` entries of largest magnitude (ties broken by position).
fn magnitude_prune(t: Vec<f32>, density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return t;
    }
    let n = t.len();
    let k = (density * n as f64) as usize;
    let mut idx: Vec<usize> = (0..n).collect();
    if k < n {
        idx.select_nth_unstable_by(k, |&i, &j| {
            t[j].abs().total_cmp(&t[i].abs()).then(i.cmp(&j))
        });
    }
    let mut out = vec![0f32; n];
    for &i in &idx[..k] {
        out[i] = t[i];
    }
    out
}

/// DARE: keeps each entry with probability `density` and divides the kept ones by it.
fn random_prune(t: Vec<f32>, density: f64, seed: u64) -> Vec<f32> {
    if density >= 1.0 {
        return t;
    }
    let mut rng = SplitMix64(seed);
    let d = density as f32;
    t.into_iter()
        .map(|x| if rng.uniform() < density { x / d } else { 0.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_prune_keeps_the_largest() {
        let t = vec![0.1, -3.0, 2.0, 0.5, -0.2, 1.0];
        assert_eq!(
            magnitude_prune(t.clone(), 0.5),
            vec![0.0, -3.0, 2.0, 0.0, 0.0, 1.0]
        );
        assert_eq!(magnitude_prune(t.clone(), 1.0), t);
        assert_eq!(magnitude_prune(t, 0.1), vec![0.0; 6]);
    }

    #[test]
    fn ties_elects_a_sign_and_averages_the_agreeing_entries() {
        let r = Reducer {
            reduction: Reduction::Ties,
            density: 1.0,
            sign: MajoritySign::Total,
            seeds: vec![0, 0, 0],
        };
        let t = vec![
            vec![1.0, -1.0, 0.0],
            vec![2.0, 3.0, 0.0],
            vec![-4.0, -1.0, 0.0],
        ];
        // Entry 0: sum -1 → negative: only -4·w2. Entry 1: sum 1 → positive: 3·w1.
        assert_eq!(
            r.reduce(t.clone(), &[1.0, 1.0, 0.5], 0),
            vec![-2.0, 3.0, 0.0]
        );
        let f = Reducer {
            sign: MajoritySign::Frequency,
            ..r
        };
        // Entry 0: two positive → mean of 1 and 2. Entry 1: two negative → mean of -1 and -0.5.
        assert_eq!(f.reduce(t, &[1.0, 1.0, 0.5], 0), vec![1.5, -0.75, 0.0]);
    }

    #[test]
    fn dare_keeps_the_density_rescales_and_is_seeded() {
        let n = 20_000;
        let t = vec![1.0f32; n];
        for density in [0.2, 0.5, 0.9] {
            let p = random_prune(t.clone(), density, 42);
            let kept = p.iter().filter(|&&x| x != 0.0).count() as f64;
            // Binomial: 5 standard deviations.
            let sd = (n as f64 * density * (1.0 - density)).sqrt();
            assert!(
                (kept - n as f64 * density).abs() < 5.0 * sd,
                "{density}: {kept}"
            );
            assert!(p.iter().all(|&x| x == 0.0 || x == 1.0 / density as f32));
            assert_eq!(p, random_prune(t.clone(), density, 42));
            assert_ne!(p, random_prune(t.clone(), density, 43));
        }
        // dare_linear of constant tensors: E[result] = Σ w_i t_i.
        let r = Reducer {
            reduction: Reduction::DareLinear,
            density: 0.25,
            sign: MajoritySign::Total,
            seeds: vec![1, 2],
        };
        let out = r.reduce(vec![vec![1.0; n], vec![2.0; n]], &[0.5, 1.0], 0);
        let mean = out.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        assert!((mean - 2.5).abs() < 0.1, "{mean}");
    }
}
