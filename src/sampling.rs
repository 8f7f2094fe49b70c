//! Logits → token: greedy, temperature, top-k, top-p, seeded; and log-probabilities of the chosen
//! token and the top alternatives.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use candle_transformers::generation::{LogitsProcessor, Sampling};

/// The smallest nucleus accepted: below it no token's cumulative mass can pass the cut and the
/// sampler has nothing to choose from (use temperature 0 for greedy).
pub const MIN_TOP_P: f64 = 1e-6;

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f64,
    /// Keep only the k most likely tokens; `None` or 0 disables it.
    pub top_k: Option<usize>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the message names the offending parameter.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!(
                "temperature must be a finite number >= 0 (got {})",
                self.temperature
            );
        }
        if !(MIN_TOP_P..=1.0).contains(&self.top_p) {
            bail!("top_p must be in [{MIN_TOP_P}, 1] (got {})", self.top_p);
        }
        Ok(())
    }

    fn to_candle(&self) -> Sampling {
        let k = self.top_k.filter(|&k| k > 0);
        if self.temperature < 1e-7 || k == Some(1) {
            return Sampling::ArgMax;
        }
        let temperature = self.temperature;
        match (k, self.top_p < 1.0) {
            (None, false) => Sampling::All { temperature },
            (None, true) => Sampling::TopP {
                p: self.top_p,
                temperature,
            },
            (Some(k), false) => Sampling::TopK { k, temperature },
            (Some(k), true) => Sampling::TopKThenTopP {
                k,
                p: self.top_p,
                temperature,
            },
        }
    }
}

/// One sequence's sampler (its own seeded RNG).
pub struct Sampler {
    proc: LogitsProcessor,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            proc: LogitsProcessor::from_sampling(params.seed, params.to_candle()),
        })
    }

    /// Picks the next token from a `[vocab]` row of logits.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        Ok(self.proc.sample(&logits.to_dtype(DType::F32)?)?)
    }
}

/// A token with its log-probability under the model's (untempered) distribution.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// The chosen token's log-probability and the `top_n` most likely tokens (best first).
pub fn logprobs(
    logits: &Tensor,
    chosen: u32,
    top_n: usize,
) -> Result<(TokenLogprob, Vec<TokenLogprob>)> {
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let v: Vec<f32> = lp.to_vec1()?;
    let Some(&chosen_lp) = v.get(chosen as usize) else {
        bail!("token {chosen} is outside the logits ({} entries)", v.len());
    };
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let n = top_n.min(v.len());
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, |&a, &b| v[b].total_cmp(&v[a]));
    }
    idx.truncate(n);
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    let top = idx
        .into_iter()
        .map(|i| TokenLogprob {
            id: i as u32,
            logprob: v[i],
        })
        .collect();
    Ok((
        TokenLogprob {
            id: chosen,
            logprob: chosen_lp,
        },
        top,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn greedy_and_top_k_one_pick_the_max() {
        let l = logits(&[0.1, 3.0, -1.0, 2.9]);
        let mut s = Sampler::new(&SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&l).unwrap(), 1);
        let p = SamplingParams {
            temperature: 5.0,
            top_k: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(&p).unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&l).unwrap(), 1);
        }
    }

    #[test]
    fn seeded_sampling_repeats_and_top_p_restricts() {
        let l = logits(&[1.0, 1.1, 0.9, 1.05, -5.0]);
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p).unwrap();
            (0..50).map(|_| s.sample(&l).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(&p), draw(&p));
        assert!(
            draw(&p)
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 1
        );
        // top_p small enough to keep only the best token.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.05,
            seed: 3,
            ..Default::default()
        };
        assert!(draw(&p).iter().all(|&t| t == 1));
        // top_k = 2 keeps tokens 1 and 3 only.
        let p = SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            seed: 3,
            ..Default::default()
        };
        assert!(draw(&p).iter().all(|&t| t == 1 || t == 3));
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let l = logits(&[0.0, 2.0, 1.0]);
        let (c, top) = logprobs(&l, 2, 2).unwrap();
        let z: f32 = [0.0f32, 2.0, 1.0].iter().map(|x| x.exp()).sum();
        assert!((c.logprob - (1.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1, 2]);
        assert!(logprobs(&l, 9, 1).is_err());
    }

    #[test]
    fn invalid_params_are_refused() {
        for p in [
            SamplingParams {
                temperature: -0.1,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                temperature: f64::NAN,
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(&p).is_err(), "{p:?}");
        }
    }
}
