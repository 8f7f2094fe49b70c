//! The fused decoder-block ops (`runtime::fused`, one launch each on a GPU) on the CPU: their
//! reference math equals candle's unfused ops (residual add + RMSNorm, SiLU · up) within one
//! rounding of the dtype, and the public functions are exactly the unfused ops on the CPU.

use candle_core::{DType, Device, Tensor};
use loraplex::runtime::fused::{add_rms_norm, check_against_reference, silu_mul, tolerance};

#[test]
fn the_fused_ops_reference_matches_candles_unfused_ops() {
    for dtype in [DType::F32, DType::BF16] {
        for seed in 0..2 {
            let e = check_against_reference(&Device::Cpu, dtype, seed).unwrap();
            assert!(e <= tolerance(dtype), "{dtype:?} seed {seed}: {e}");
        }
    }
}

#[test]
fn on_the_cpu_the_fused_functions_are_the_unfused_ops_bit_for_bit() {
    let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
    let d = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
    let w = Tensor::randn(1f32, 0.1, 64, &Device::Cpu).unwrap();
    let (s, n) = add_rms_norm(&x, &d, &w, 1e-5).unwrap();
    let want_s = (&x + &d).unwrap();
    let want_n = candle_nn::ops::rms_norm(&want_s, &w, 1e-5).unwrap();
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(bits(&s), bits(&want_s));
    assert_eq!(bits(&n), bits(&want_n));
    let a = silu_mul(&x, &d).unwrap();
    assert_eq!(bits(&a), bits(&(x.silu().unwrap() * &d).unwrap()));
}
