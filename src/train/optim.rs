//! AdamW (PyTorch semantics, decoupled weight decay), learning-rate schedules with warmup, and
//! global gradient-norm clipping.

use anyhow::Result;
use candle_core::{backprop::GradStore, Tensor, Var};

/// Learning-rate schedule after linear warmup.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Learning rate at optimizer step `step` (0-based) of `total`.
pub fn lr_at(schedule: Schedule, base_lr: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base_lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    match schedule {
        Schedule::Constant => base_lr,
        Schedule::Linear => base_lr * (1.0 - progress),
        Schedule::Cosine => base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// AdamW over a fixed list of variables.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken.
    pub t: usize,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(vars: &[&Var], weight_decay: f64) -> Result<Self> {
        let zeros = |v: &&Var| v.as_tensor().zeros_like();
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update with gradients `grads[i]` for `vars[i]` at learning rate `lr`.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, var) in vars.iter().enumerate() {
            let g = &grads[i];
            self.m[i] = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let p = var.as_tensor();
            let decayed = (p * (1.0 - lr * self.weight_decay))?;
            let m_hat = (&self.m[i] / bc1)?;
            let denom = ((&self.v[i] / bc2)?.sqrt()? + self.eps)?;
            let update = (m_hat / denom)?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Gradients of `vars` from `store` (zeros where a variable got none).
pub fn grads_of(store: &GradStore, vars: &[&Var]) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| match store.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect()
}

/// The global L2 norm of `grads`.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g
            .to_dtype(candle_core::DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (no-op for `max_norm <= 0`).
/// Returns the norm before clipping.
pub fn clip(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_step_matches_hand_computation() {
        let p0 = [0.5f64, -1.0, 2.0];
        let g = [0.1f64, -0.2, 0.0];
        let var = Var::from_tensor(&Tensor::new(&p0, &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(&[&var], 0.01).unwrap();
        let grads = vec![Tensor::new(&g, &Device::Cpu).unwrap()];
        let lr = 0.1;
        for step in 1..=2 {
            opt.step(&[&var], &grads, lr).unwrap();
            let got: Vec<f64> = var.as_tensor().to_vec1().unwrap();
            // By hand: constant gradient, so m_hat = g and v_hat = g^2 after bias correction.
            let mut want = p0.to_vec();
            for _ in 0..step {
                for (i, w) in want.iter_mut().enumerate() {
                    let upd = if g[i] == 0.0 {
                        0.0
                    } else {
                        g[i] / (g[i].abs() + 1e-8)
                    };
                    *w = *w * (1.0 - lr * 0.01) - lr * upd;
                }
            }
            for i in 0..3 {
                assert!(
                    (got[i] - want[i]).abs() < 1e-9,
                    "step {step} [{i}]: {} vs {}",
                    got[i],
                    want[i]
                );
            }
        }
    }

    #[test]
    fn schedules() {
        assert!((lr_at(Schedule::Cosine, 1.0, 0, 100, 10) - 0.1).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!(lr_at(Schedule::Cosine, 1.0, 99, 100, 10) < 0.01);
        assert!((lr_at(Schedule::Linear, 1.0, 55, 100, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 1.0, 80, 100, 10), 1.0);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![Tensor::new(&[3.0f64, 4.0], &Device::Cpu).unwrap()];
        let n = clip(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-12);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }
}
