//! NF4 format exactness: loraplex's quantizer against an independent implementation of
//! bitsandbytes' published algorithm, written here from the published code values and rules
//! (not by calling the module's helpers), plus values torch prints for the 8-bit dynamic map.

mod common;
use common::normal;

use loraplex::quant::nf4::{quantize_blockwise_8bit, quantize_dynamic_value};
use loraplex::quant::{
    dynamic_map, quantize_nf4, quantize_nf4_double, Absmax, Nf4Packed, NF4_CODE,
};

// ---------- the independent reference ----------

/// bitsandbytes' NF4 values (functional.py get_4bit_type("nf4")), as decimal text.
const NF4_TEXT: [&str; 16] = [
    "-1.0",
    "-0.6961928009986877",
    "-0.5250730514526367",
    "-0.39491748809814453",
    "-0.28444138169288635",
    "-0.18477343022823334",
    "-0.09105003625154495",
    "0.0",
    "0.07958029955625534",
    "0.16093020141124725",
    "0.24611230194568634",
    "0.33791524171829224",
    "0.44070982933044434",
    "0.5626170039176941",
    "0.7229568362236023",
    "1.0",
];

fn ref_code64() -> Vec<f64> {
    NF4_TEXT.iter().map(|s| s.parse::<f64>().unwrap()).collect()
}

/// torch.tensor(list_of_python_floats): each f64 rounded to f32.
fn ref_code() -> Vec<f32> {
    ref_code64().iter().map(|v| *v as f32).collect()
}

/// `dQuantizeNF4`'s thresholds as written in csrc/kernels.cu: f32 literals whose digits are the
/// f64 midpoints of neighbouring codes (checked in `thresholds_are_code_midpoints`). The literal is
/// converted to f32 directly, which is not always `f64 midpoint as f32` (four midpoints are f32
/// ties that the shortened digits resolve).
const THRESHOLD_TEXT: [&str; 15] = [
    "-0.8480964004993439",
    "-0.6106329262256622",
    "-0.4599952697753906",
    "-0.33967943489551544",
    "-0.23460740596055984",
    "-0.13791173323988914",
    "-0.045525018125772476",
    "0.03979014977812767",
    "0.1202552504837513",
    "0.2035212516784668",
    "0.2920137718319893",
    "0.3893125355243683",
    "0.5016634166240692",
    "0.6427869200706482",
    "0.8614784181118011",
];

fn ref_thresholds() -> Vec<f32> {
    THRESHOLD_TEXT
        .iter()
        .map(|s| s.parse::<f32>().unwrap())
        .collect()
}

/// A value's code: how many thresholds it is strictly above (NaN is above none).
fn ref_nf4(x: f32) -> u8 {
    ref_thresholds().iter().filter(|t| x > **t).count() as u8
}

/// quantize_4bit(nf4) per the CUDA kernel: absmax over each block, x * (1/absmax), two codes per
/// byte with the first element high; a missing last element is 0.0 before scaling.
fn ref_quantize(w: &[f32], bs: usize) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut absmax = Vec::new();
    let mut codes = Vec::new();
    for block in w.chunks(bs) {
        let mut m = 0f32;
        for v in block {
            if v.abs() > m {
                m = v.abs();
            }
        }
        absmax.push(m);
        let r = 1.0f32 / m;
        for v in block {
            codes.push(ref_nf4(v * r));
        }
        if block.len() % 2 == 1 {
            codes.push(ref_nf4(0.0 * r));
        }
    }
    for pair in codes.chunks(2) {
        bytes.push(pair[0] * 16 + pair[1]);
    }
    (bytes, absmax)
}

/// create_dynamic_map(signed=True): linspace(0.1, 1, 2^i + 1) in f32 with torch's CPU formula
/// (first half from the start, second half from the end, multiply-add rounded once), means of
/// neighbours, times 10^(i-6) cast to f32, both signs, plus 0 and 1, sorted.
fn ref_dynamic_map() -> Vec<f32> {
    let mut data = Vec::new();
    for i in 0..7i32 {
        let steps = (1usize << i) + 1;
        let (start, end) = (0.1f32, 1.0f32);
        let step = ((end as f64 - start as f64) as f32 as f64 / (steps - 1) as f64) as f32;
        let b: Vec<f32> = (0..steps)
            .map(|k| {
                if k < steps / 2 {
                    (step as f64 * k as f64 + start as f64) as f32
                } else {
                    (end as f64 - step as f64 * (steps - 1 - k) as f64) as f32
                }
            })
            .collect();
        let scale = format!("1e{}", i - 6).parse::<f64>().unwrap() as f32;
        let means: Vec<f32> = b
            .windows(2)
            .map(|w| ((w[0] as f64 + w[1] as f64) / 2.0) as f32)
            .collect();
        data.extend(means.iter().map(|m| (scale as f64 * *m as f64) as f32));
        data.extend(means.iter().map(|m| (-(scale as f64) * *m as f64) as f32));
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.partial_cmp(b).unwrap());
    data
}

/// dQuantize<0> restated: the index of the nearest map value by f32 midpoints
/// `(c[j] + c[j+1]) * 0.5`, a value exactly on a midpoint going to the even index.
fn ref_q8(code: &[f32], x: f32) -> u8 {
    let mut above = 0;
    for j in 0..255 {
        let m = (code[j] + code[j + 1]) * 0.5;
        if x == m {
            return (if j % 2 == 0 { j } else { j + 1 }) as u8;
        }
        if x > m {
            above = j + 1;
        }
    }
    above as u8
}

/// quantize_blockwise(A, code, blocksize) per the CUDA kernel.
fn ref_blockwise8(v: &[f32], code: &[f32], bs: usize) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::new();
    let mut absmax = Vec::new();
    for block in v.chunks(bs) {
        let m = block
            .iter()
            .fold(0f32, |m, x| if x.abs() > m { x.abs() } else { m });
        absmax.push(m);
        let r = 1.0f32 / m;
        q.extend(block.iter().map(|x| ref_q8(code, x * r)));
    }
    (q, absmax)
}

// ---------- fixtures ----------

/// Blocks with absmax exactly 1.0 holding every threshold, its f32 neighbours and every code
/// value (so the scaled value is the value itself), a block whose absmax is a negative element, a
/// zero block, and a block with absmax 3 (whose reciprocal is inexact).
fn edge_fixture() -> Vec<f32> {
    let mut v = Vec::new();
    for t in ref_thresholds() {
        v.extend([t, t.next_up(), t.next_down()]);
    }
    let c = ref_code64();
    v.extend(c.windows(2).map(|w| ((w[0] + w[1]) / 2.0) as f32));
    v.extend(ref_code());
    v.extend([1.0, -0.0, 0.0]);
    v.resize(128, 0.5);
    let mut neg: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 40.0).collect();
    neg[0] = -2.0;
    v.extend(neg);
    v.extend([0.0f32; 64]);
    v.extend((0..64).map(|i| (i as f32 - 31.5) * 3.0 / 32.0));
    v
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn f32_absmax(p: &Nf4Packed) -> &[f32] {
    match &p.absmax {
        Absmax::F32(a) => a,
        Absmax::Nested(_) => panic!("expected f32 absmax"),
    }
}

// ---------- tests ----------

#[test]
fn codebook_is_bitsandbytes_nf4() {
    assert_eq!(bits(&NF4_CODE), bits(&ref_code()));
    // The kernel's f32 literals (decimal → f32 directly) agree with torch's f64 → f32.
    for s in NF4_TEXT {
        assert_eq!(s.parse::<f32>().unwrap(), s.parse::<f64>().unwrap() as f32);
    }
}

#[test]
fn thresholds_are_code_midpoints() {
    let c = ref_code64();
    for (i, t) in THRESHOLD_TEXT.iter().enumerate() {
        assert_eq!(
            t.parse::<f64>().unwrap(),
            (c[i] + c[i + 1]) / 2.0,
            "threshold {i}"
        );
    }
}

#[test]
fn nf4_codes_and_absmax_are_bit_exact() {
    let cases: Vec<(Vec<f32>, usize, usize)> = vec![
        (edge_fixture(), 5, 64),
        (normal(576 * 64, 1, 0.02), 576, 64),
        (normal(37 * 100, 2, 1.0), 37, 100),
        (normal(3 * 37, 3, 0.5), 3, 37), // odd count, partial last block
    ];
    for (w, rows, cols) in cases {
        for bs in [64, 128, 256] {
            let p = quantize_nf4(&w, rows, cols, bs).unwrap();
            let (bytes, absmax) = ref_quantize(&w, bs);
            assert_eq!(p.data, bytes, "codes, {rows}x{cols} bs {bs}");
            assert_eq!(bits(f32_absmax(&p)), bits(&absmax), "absmax, {rows}x{cols}");
        }
    }
}

#[test]
fn nf4_dequantize_is_bit_exact_and_bounded() {
    let code = ref_code();
    let w = normal(192 * 576, 4, 0.05);
    let p = quantize_nf4(&w, 192, 576, 64).unwrap();
    let (bytes, absmax) = ref_quantize(&w, 64);
    let expect: Vec<f32> = (0..w.len())
        .map(|i| {
            let c = if i % 2 == 0 {
                bytes[i / 2] >> 4
            } else {
                bytes[i / 2] & 15
            };
            code[c as usize] * absmax[i / 64]
        })
        .collect();
    let got = p.dequantize();
    assert_eq!(bits(&got), bits(&expect));
    // Nearest-code rounding: the error is at most half the widest gap between codes, in units of
    // the block's absmax.
    let half_gap = code.windows(2).map(|c| c[1] - c[0]).fold(0f32, f32::max) / 2.0;
    for (i, (a, b)) in w.iter().zip(&got).enumerate() {
        assert!(
            (a - b).abs() <= absmax[i / 64] * half_gap * 1.0001,
            "element {i}"
        );
    }
}

#[test]
fn dynamic_map_matches_reference_and_torch() {
    let m = dynamic_map();
    assert_eq!(bits(&m), bits(&ref_dynamic_map()));
    // Entries as torch prints create_dynamic_map() (these are the ones a non-fused linspace, or a
    // product taken in f64, would get wrong).
    #[allow(clippy::excessive_precision)]
    let published: [(usize, f32); 9] = [
        (0, -0.992968738079071),
        (18, -0.7398437261581421),
        (20, -0.7117187976837158),
        (65, -0.09578125923871994),
        (72, -0.07609374821186066),
        (80, -0.053593751043081284),
        (126, -5.500000384017767e-07),
        (137, 0.0003812500217463821),
        (255, 1.0),
    ];
    for (i, v) in published {
        assert_eq!(m[i], v, "map[{i}]");
    }
}

#[test]
fn eight_bit_search_matches_midpoint_rule() {
    let m = dynamic_map();
    let mut xs = normal(20000, 5, 0.4);
    for j in 0..255 {
        let mid = (m[j] + m[j + 1]) * 0.5;
        xs.extend([mid, mid.next_up(), mid.next_down(), m[j]]);
    }
    xs.extend([-1.0, 1.0, 1.0000001, -1.0000001, f32::NAN, 0.0, -0.0]);
    for x in xs {
        assert_eq!(quantize_dynamic_value(&m, x), ref_q8(&m, x), "x = {x:e}");
    }
}

#[test]
fn blockwise_8bit_matches_reference() {
    let m = dynamic_map();
    let v = normal(1000, 6, 0.3);
    for bs in [256, 64] {
        let (q, a) = quantize_blockwise_8bit(&v, &m, bs);
        let (rq, ra) = ref_blockwise8(&v, &m, bs);
        assert_eq!(q, rq);
        assert_eq!(bits(&a), bits(&ra));
    }
}

/// Weights whose block absmaxes are multiples of 1/1024 below 1/4: their f32 sum is exact in any
/// order, so the offset equals torch's `mean()` bit for bit; 1024 blocks make `/ n` and CUDA's
/// `* (1 / n)` agree too.
fn dyadic_fixture() -> Vec<f32> {
    let mut w = normal(1024 * 64, 7, 0.01);
    for (b, block) in w.chunks_mut(64).enumerate() {
        let target = ((b * 37) % 200 + 20) as f32 / 1024.0;
        let (mut hi, mut hi_i) = (0f32, 0);
        for (i, v) in block.iter().enumerate() {
            if v.abs() > hi {
                (hi, hi_i) = (v.abs(), i);
            }
        }
        let s = target / hi * 0.9;
        for v in block.iter_mut() {
            *v *= s;
        }
        block[hi_i] = if b % 3 == 0 { -target } else { target };
    }
    w
}

fn check_double_quant(w: &[f32], rows: usize, cols: usize) {
    let p = quantize_nf4_double(w, rows, cols, 64).unwrap();
    let (bytes, absmax) = ref_quantize(w, 64);
    assert_eq!(p.data, bytes);
    let sum: f64 = absmax.iter().map(|a| *a as f64).sum();
    let offset = sum as f32 / absmax.len() as f32;
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let code = ref_dynamic_map();
    let (q, a2) = ref_blockwise8(&centred, &code, 256);
    let Absmax::Nested(n) = &p.absmax else {
        panic!("expected nested absmax")
    };
    assert_eq!(n.offset.to_bits(), offset.to_bits());
    assert_eq!(n.blocksize, 256);
    assert_eq!(n.codes, q);
    assert_eq!(bits(&n.absmax), bits(&a2));
    assert_eq!(bits(&n.code[..]), bits(&code));
    // dequantize_blockwise + offset, then code * absmax.
    let scale: Vec<f32> = (0..absmax.len())
        .map(|b| code[q[b] as usize] * a2[b / 256] + offset)
        .collect();
    assert_eq!(bits(&p.absmax_f32()), bits(&scale));
    let nf4 = ref_code();
    let expect: Vec<f32> = (0..w.len())
        .map(|i| {
            let c = if i % 2 == 0 {
                bytes[i / 2] >> 4
            } else {
                bytes[i / 2] & 15
            };
            nf4[c as usize] * scale[i / 64]
        })
        .collect();
    assert_eq!(bits(&p.dequantize()), bits(&expect));
    // The reconstructed absmax is off by at most half a gap of the 8-bit map, in units of the
    // second-level absmax.
    let half_gap = code.windows(2).map(|c| c[1] - c[0]).fold(0f32, f32::max) / 2.0;
    for (b, (s, a)) in scale.iter().zip(&absmax).enumerate() {
        let bound = a2[b / 256] * half_gap * 1.001 + 1e-7;
        assert!((s - a).abs() <= bound, "block {b}: {s} vs {a}");
    }
}

#[test]
fn double_quant_is_bit_exact() {
    let w = dyadic_fixture();
    // The fixture's sum really is exact in f32 arithmetic, whatever the order.
    let p = quantize_nf4(&w, 1024, 64, 64).unwrap();
    let a = f32_absmax(&p);
    let fwd = a.iter().fold(0f32, |s, v| s + v);
    let rev = a.iter().rev().fold(0f32, |s, v| s + v);
    assert_eq!(fwd, rev);
    assert_eq!(fwd as f64, a.iter().map(|v| *v as f64).sum::<f64>());
    check_double_quant(&w, 1024, 64);
    // Ordinary weights: the same algorithm (mean as f64 sum / n in f32).
    check_double_quant(&normal(576 * 576, 8, 0.02), 576, 576);
    check_double_quant(&normal(7 * 50, 9, 1.0), 7, 50);
}
