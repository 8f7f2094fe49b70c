//! The NF4 device ops (`quant::nf4_device`, the GPU's NF4 weights) on the CPU: the device check
//! passes against the CPU reference (dequantization bit for bit, products within tolerance), and
//! the rows op and the dequantize + matmul path equal a dense product of the dequantized weight
//! computed independently by candle.

use candle_core::{DType, Device, Tensor};
use loraplex::quant::nf4_device::{check_against_reference, tolerance, Nf4Device, ROWS_MAX};
use loraplex::quant::quantize_nf4;
use std::sync::Arc;

#[test]
fn the_device_check_passes_on_the_cpu() {
    for dtype in [DType::F32, DType::BF16] {
        for seed in 0..2 {
            let e = check_against_reference(&Device::Cpu, dtype, seed).unwrap();
            assert!(e <= tolerance(dtype), "{dtype:?} seed {seed}: {e}");
        }
    }
}

#[test]
fn nf4_products_equal_candle_on_the_dequantized_weight() {
    let (rows, cols) = (96, 320);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
        .collect();
    let packed = Arc::new(quantize_nf4(&w, rows, cols, 64).unwrap());
    let dev = Nf4Device::upload(packed.clone(), &Device::Cpu).unwrap();
    assert_eq!(dev.shape(), (rows, cols));
    assert_eq!(
        dev.resident_bytes(),
        rows * cols / 2 + 4 * (16 + rows * cols / 64)
    );
    let dense = Tensor::from_vec(packed.dequantize(), (rows, cols), &Device::Cpu).unwrap();
    let deq = dev.dequantize(DType::F32).unwrap();
    assert_eq!(
        deq.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        packed.dequantize()
    );
    // Few rows (the rows op), more rows (dequantize + matmul), and a leading batch dimension.
    for m in [1, 3, ROWS_MAX, ROWS_MAX + 1, 40] {
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5)
            .collect();
        let x = Tensor::from_vec(x, (1, m, cols), &Device::Cpu).unwrap();
        let got = dev.matmul(&x).unwrap();
        assert_eq!(got.dims(), &[1, m, rows]);
        let want = x.matmul(&dense.t().unwrap().unsqueeze(0).unwrap()).unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{m} rows: max |diff| {diff}");
    }
    // A wrong input width is an error, not a panic.
    let bad = Tensor::zeros((2, cols + 1), DType::F32, &Device::Cpu).unwrap();
    assert!(dev.matmul(&bad).is_err());
}
