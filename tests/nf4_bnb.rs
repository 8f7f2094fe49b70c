//! bitsandbytes serialization: save → safetensors file → load is lossless, layers written the way
//! transformers saves a `load_in_4bit` model load, and malformed layers are refused by name.

use candle_core::{DType, Device, Tensor};
use loraplex::quant::bnb::{quant_state_json, QUANT_STATE_NF4};
use loraplex::quant::{
    is_bnb_layer, load_layer, quantize_nf4, quantize_nf4_double, save_layer, Absmax, Nf4Packed,
    QuantizationConfig,
};
use serde_json::json;
use std::collections::HashMap;

const P: &str = "model.layers.0.self_attn.k_proj";

fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0;
            (u * u * u * 0.1) as f32
        })
        .collect()
}

fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let flat = t.flatten_all().unwrap();
    match t.dtype() {
        DType::U8 => flat.to_vec1::<u8>().unwrap(),
        DType::F32 => flat
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

fn save_load_file(map: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    candle_core::safetensors::save(map, &f).unwrap();
    candle_core::safetensors::load(&f, &Device::Cpu).unwrap()
}

fn layers() -> Vec<Nf4Packed> {
    let w = normal(192 * 576, 1);
    let odd = normal(5 * 7, 2);
    vec![
        quantize_nf4(&w, 192, 576, 64).unwrap(),
        quantize_nf4_double(&w, 192, 576, 64).unwrap(),
        quantize_nf4_double(&normal(1536 * 576, 3), 1536, 576, 64).unwrap(),
        quantize_nf4(&odd, 5, 7, 64).unwrap(),
        quantize_nf4_double(&odd, 5, 7, 64).unwrap(),
    ]
}

#[test]
fn save_writes_bitsandbytes_layout() {
    for p in layers() {
        let mut map = HashMap::new();
        save_layer(&p, P, &mut map).unwrap();
        let n = p.rows * p.cols;
        let blocks = n.div_ceil(64);
        let w = &map[&format!("{P}.weight")];
        assert_eq!((w.dtype(), w.dims()), (DType::U8, &[n.div_ceil(2), 1][..]));
        let qm = &map[&format!("{P}.weight.quant_map")];
        assert_eq!((qm.dtype(), qm.dims()), (DType::F32, &[16][..]));
        let am = &map[&format!("{P}.weight.absmax")];
        assert_eq!(am.dims(), &[blocks]);
        let qs = &map[&format!("{P}.weight.{QUANT_STATE_NF4}")];
        let text = String::from_utf8(tensor_bytes(qs)).unwrap();
        match &p.absmax {
            Absmax::F32(_) => {
                assert_eq!(am.dtype(), DType::F32);
                assert_eq!(map.len(), 4);
                let want = format!(
                    "{{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [{}, {}]}}",
                    p.rows, p.cols
                );
                assert_eq!(text, want);
            }
            Absmax::Nested(nested) => {
                assert_eq!(am.dtype(), DType::U8);
                assert_eq!(map.len(), 6);
                let na = &map[&format!("{P}.weight.nested_absmax")];
                assert_eq!(
                    (na.dtype(), na.dims()),
                    (DType::F32, &[blocks.div_ceil(256)][..])
                );
                let nq = &map[&format!("{P}.weight.nested_quant_map")];
                assert_eq!((nq.dtype(), nq.dims()), (DType::F32, &[256][..]));
                let prefix = format!(
                    "{{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [{}, {}], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": ",
                    p.rows, p.cols
                );
                let offset = text
                    .strip_prefix(&prefix)
                    .unwrap()
                    .strip_suffix('}')
                    .unwrap();
                assert_eq!(offset.parse::<f64>().unwrap() as f32, nested.offset);
            }
        }
        assert!(is_bnb_layer(&map, P));
        assert!(!is_bnb_layer(&map, "model.layers.0.self_attn.q_proj"));
    }
}

#[test]
fn round_trip_through_a_file_is_lossless() {
    for p in layers() {
        let mut first = HashMap::new();
        save_layer(&p, P, &mut first).unwrap();
        let mut loaded = save_load_file(&first);
        let back = load_layer(&mut loaded, P).unwrap();
        assert!(
            loaded.is_empty(),
            "load_layer consumes every tensor of the layer"
        );
        assert_eq!(back, p);
        let (a, b) = (back.dequantize(), p.dequantize());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        let mut second = HashMap::new();
        save_layer(&back, P, &mut second).unwrap();
        assert_eq!(first.len(), second.len());
        for (k, t) in &first {
            let u = &second[k];
            assert_eq!((t.dtype(), t.dims()), (u.dtype(), u.dims()), "{k}");
            assert_eq!(tensor_bytes(t), tensor_bytes(u), "{k}");
        }
    }
}

/// A layer as transformers saves a `load_in_4bit` model: a bias next to the weight, the quant
/// state written by Python (`dtype` of the original weights, a Python float offset), and
/// optionally the packed bytes viewed as another `bnb_4bit_quant_storage` dtype.
#[test]
fn loads_layers_saved_by_transformers() {
    let p = quantize_nf4_double(&normal(64 * 128, 4), 64, 128, 64).unwrap();
    let Absmax::Nested(nested) = &p.absmax else {
        unreachable!()
    };
    let mut map = HashMap::new();
    save_layer(&p, P, &mut map).unwrap();
    let js = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [64, 128], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": {}}}",
        nested.offset as f64
    );
    let qs = Tensor::from_slice(js.as_bytes(), js.len(), &Device::Cpu).unwrap();
    map.insert(format!("{P}.weight.{QUANT_STATE_NF4}"), qs);
    let bias = Tensor::zeros(64, DType::BF16, &Device::Cpu).unwrap();
    map.insert(format!("{P}.bias"), bias);
    let mut map = save_load_file(&map);
    let back = load_layer(&mut map, P).unwrap();
    assert_eq!(back.dtype, "bfloat16");
    assert_eq!(back.dequantize(), p.dequantize());
    assert_eq!(quant_state_json(&back), js);
    assert!(
        map.contains_key(&format!("{P}.bias")),
        "the bias is left for the model loader"
    );

    // quant_storage = bfloat16: the same bytes viewed as bf16, [n / 4, 1].
    let mut map = HashMap::new();
    save_layer(&p, P, &mut map).unwrap();
    let as_bf16: Vec<half::bf16> = p
        .data
        .chunks(2)
        .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
        .collect();
    let len = as_bf16.len();
    map.insert(
        format!("{P}.weight"),
        Tensor::from_vec(as_bf16, (len, 1), &Device::Cpu).unwrap(),
    );
    let back = load_layer(&mut save_load_file(&map), P).unwrap();
    assert_eq!(back, p);
}

fn layer_map(double: bool) -> HashMap<String, Tensor> {
    let w = normal(16 * 64, 5);
    let p = match double {
        true => quantize_nf4_double(&w, 16, 64, 64).unwrap(),
        false => quantize_nf4(&w, 16, 64, 64).unwrap(),
    };
    let mut map = HashMap::new();
    save_layer(&p, P, &mut map).unwrap();
    map
}

fn expect_err(map: &mut HashMap<String, Tensor>, needle: &str) {
    let e = load_layer(map, P).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains(needle),
        "error {msg:?} should mention {needle:?}"
    );
}

fn set_state(map: &mut HashMap<String, Tensor>, key: &str, js: &str) {
    map.retain(|k, _| !k.contains(".quant_state."));
    let t = Tensor::from_slice(js.as_bytes(), js.len(), &Device::Cpu).unwrap();
    map.insert(format!("{P}.weight.{key}"), t);
}

#[test]
fn malformed_layers_are_refused_with_the_tensor_named() {
    let f32_t = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();

    let mut m = layer_map(false);
    m.remove(&format!("{P}.weight.absmax"));
    expect_err(&mut m, "weight.absmax");

    let mut m = layer_map(false);
    m.insert(format!("{P}.weight.absmax"), f32_t(15));
    expect_err(&mut m, "weight.absmax");

    let mut m = layer_map(false);
    m.insert(
        format!("{P}.weight"),
        Tensor::zeros((511, 1), DType::U8, &Device::Cpu).unwrap(),
    );
    expect_err(&mut m, "holds 511 bytes");

    let mut m = layer_map(false);
    m.insert(format!("{P}.weight.quant_map"), f32_t(16));
    expect_err(&mut m, "not the NF4 code");

    let mut m = layer_map(true);
    m.insert(format!("{P}.weight.nested_quant_map"), f32_t(255));
    expect_err(&mut m, "nested_quant_map");

    let mut m = layer_map(true);
    m.remove(&format!("{P}.weight.nested_absmax"));
    expect_err(&mut m, "nested_absmax");

    let mut m = layer_map(false);
    m.insert(format!("{P}.weight.extra"), f32_t(1));
    expect_err(&mut m, "weight.extra");

    let mut m = layer_map(false);
    let fp4 = r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "float16", "shape": [16, 64]}"#;
    set_state(&mut m, "quant_state.bitsandbytes__fp4", fp4);
    expect_err(&mut m, "only NF4");

    for (js, needle) in [
        ("{not json", "not valid JSON"),
        (
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float16"}"#,
            "shape",
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 0, "dtype": "float16", "shape": [16, 64]}"#,
            "blocksize",
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [4, 16, 16]}"#,
            "not 2-D",
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [16, 65]}"#,
            "holds 512 bytes",
        ),
    ] {
        let mut m = layer_map(false);
        set_state(&mut m, QUANT_STATE_NF4, js);
        expect_err(&mut m, needle);
    }
    let mut m = layer_map(true);
    let js = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [16, 64], "nested_blocksize": 256, "nested_dtype": "float16", "nested_offset": 0.1}"#;
    set_state(&mut m, QUANT_STATE_NF4, js);
    expect_err(&mut m, "nested_dtype");

    let mut m = layer_map(false);
    m.retain(|k, _| !k.contains(".quant_state."));
    expect_err(&mut m, "no quant_state");
}

#[test]
fn quantization_config_as_transformers_writes_it() {
    let q = QuantizationConfig::nf4(true).to_json();
    for (k, v) in [
        ("quant_method", json!("bitsandbytes")),
        ("load_in_4bit", json!(true)),
        ("load_in_8bit", json!(false)),
        ("bnb_4bit_quant_type", json!("nf4")),
        ("bnb_4bit_use_double_quant", json!(true)),
        ("bnb_4bit_compute_dtype", json!("float32")),
        ("bnb_4bit_quant_storage", json!("uint8")),
    ] {
        assert_eq!(q[k], v, "{k}");
    }
    // A block as transformers saves it for a bf16 model.
    let cfg = json!({"model_type": "llama", "quantization_config": {
        "_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": false, "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false, "llm_int8_skip_modules": ["lm_head"],
        "llm_int8_threshold": 6.0, "load_in_4bit": true, "load_in_8bit": false,
        "quant_method": "bitsandbytes"}});
    let c = QuantizationConfig::from_config_json(&cfg).unwrap().unwrap();
    assert!(!c.double_quant);
    assert_eq!(c.compute_dtype, "bfloat16");
    assert_eq!(c.skip_modules, Some(vec!["lm_head".to_string()]));
}
