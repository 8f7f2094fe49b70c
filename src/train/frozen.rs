//! A frozen linear layer for training: `y = x W^T` whose backward returns the input gradient
//! only. (Backward through a plain `matmul` would also build a weight-sized gradient that nobody
//! uses.)

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

/// `x [n, in] → x W^T [n, out]` with `W [out, in]` frozen.
pub struct FrozenLinear {
    pub weight: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        // Rebuild the (untracked) input as a tensor and let candle's gemm do the work.
        let x = match storage {
            CpuStorage::F32(v) => Tensor::from_slice(
                &v[layout.start_offset()..][..layout.shape().elem_count()],
                layout.shape(),
                &candle_core::Device::Cpu,
            )?,
            CpuStorage::F64(v) => Tensor::from_slice(
                &v[layout.start_offset()..][..layout.shape().elem_count()],
                layout.shape(),
                &candle_core::Device::Cpu,
            )?,
            _ => candle_core::bail!("frozen-linear supports f32 and f64 inputs"),
        };
        if !layout.is_contiguous() {
            candle_core::bail!("frozen-linear needs a contiguous input");
        }
        let y = x.matmul(&self.weight.t()?)?;
        let shape = y.shape().clone();
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cpu(c) if l.is_contiguous() && l.start_offset() == 0 => Ok((c.clone(), shape)),
            _ => candle_core::bail!("frozen-linear: unexpected output layout"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
}

/// Applies a frozen weight to rows `x [n, in]` (contiguous copy made if needed).
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenLinear {
        weight: weight.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn forward_and_input_gradient_match_matmul_without_weight_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, (5, 3), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (4, 3), &dev).unwrap()).unwrap();
        let y = frozen_linear(x.as_tensor(), &w).unwrap();
        let want = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let d = (y.clone() - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12);
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap();
        let want_gx = (want * 2.0).unwrap().matmul(&w).unwrap();
        let d = (gx - want_gx)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-10);
        assert!(grads.get(&w).is_none(), "no gradient for the frozen weight");
        let _ = DType::F64;
    }
}
