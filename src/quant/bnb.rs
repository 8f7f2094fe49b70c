//! bitsandbytes' HF serialization of 4-bit linear layers, and the `quantization_config` block.
//!
//! One quantized `nn.Linear` named `P` is stored as (bitsandbytes `Linear4bit._save_to_state_dict`
//! + `QuantState.as_dict(packed=True)` in `bitsandbytes/functional.py`):
//! - `P.weight`: uint8 `[ceil(n / 2), 1]`, the packed codes (another `bnb_4bit_quant_storage`
//!   dtype is the same bytes viewed as that dtype, `[ceil(n / 2) / itemsize, 1]`);
//! - `P.weight.absmax`: float32 `[blocks]`, or uint8 `[blocks]` with double quantization;
//! - `P.weight.quant_map`: float32 `[16]`, the NF4 code;
//! - with double quantization: `P.weight.nested_absmax` float32 `[ceil(blocks / 256)]` and
//!   `P.weight.nested_quant_map` float32 `[256]`;
//! - `P.weight.quant_state.bitsandbytes__nf4`: uint8, the UTF-8 bytes of `json.dumps` of the
//!   non-tensor fields (`pack_dict_to_tensor` in `bitsandbytes/utils.py`), in `as_dict`'s order:
//!   `quant_type`, `blocksize`, `dtype`, `shape` and, nested, `nested_blocksize`, `nested_dtype`,
//!   `nested_offset` (`QuantState.from_dict` reads them back).
//!
//! `config.json` carries transformers' `BitsAndBytesConfig.to_dict()` under `quantization_config`
//! (`quant_method: "bitsandbytes"`, `load_in_4bit`, `bnb_4bit_quant_type`, ...).

use super::nf4::{Absmax, NestedAbsmax, Nf4Packed, NF4_CODE};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;

/// The suffix of the packed quant-state tensor of an NF4 weight.
pub const QUANT_STATE_NF4: &str = "quant_state.bitsandbytes__nf4";

/// `repr(float)` as Python writes it (what `json.dumps` emits for a float): the shortest digits
/// that round-trip, positional for exponents -4..16, else `d.ddde±XX`.
pub fn py_float_repr(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: "-1.2345e-5".
    let sci = format!("{v:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (a, b) = digits.split_at(point as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{body}")
    } else {
        let m = match digits.len() {
            1 => digits.clone(),
            _ => format!("{}.{}", &digits[..1], &digits[1..]),
        };
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

/// The JSON bitsandbytes packs into `weight.quant_state.bitsandbytes__nf4`, byte for byte.
pub fn quant_state_json(w: &Nf4Packed) -> String {
    let mut s = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}, {}]",
        w.blocksize, w.dtype, w.rows, w.cols
    );
    if let Absmax::Nested(n) = &w.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            n.blocksize,
            py_float_repr(n.offset as f64)
        ));
    }
    s.push('}');
    s
}

fn f32_tensor(v: &[f32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?)
}

fn u8_tensor(v: &[u8], shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, shape, &Device::Cpu)?)
}

/// Writes one layer's tensors under `prefix` (the module name, e.g.
/// `model.layers.0.self_attn.q_proj`) in bitsandbytes' layout.
pub fn save_layer(w: &Nf4Packed, prefix: &str, out: &mut HashMap<String, Tensor>) -> Result<()> {
    let p = format!("{prefix}.weight");
    out.insert(p.clone(), u8_tensor(&w.data, &[w.data.len(), 1])?);
    out.insert(format!("{p}.quant_map"), f32_tensor(&w.quant_map)?);
    match &w.absmax {
        Absmax::F32(a) => {
            out.insert(format!("{p}.absmax"), f32_tensor(a)?);
        }
        Absmax::Nested(n) => {
            out.insert(
                format!("{p}.absmax"),
                u8_tensor(&n.codes, &[n.codes.len()])?,
            );
            out.insert(format!("{p}.nested_absmax"), f32_tensor(&n.absmax)?);
            out.insert(format!("{p}.nested_quant_map"), f32_tensor(&n.code[..])?);
        }
    }
    let js = quant_state_json(w).into_bytes();
    out.insert(
        format!("{p}.{QUANT_STATE_NF4}"),
        u8_tensor(&js, &[js.len()])?,
    );
    Ok(())
}

/// The name of `prefix`'s packed quant-state tensor, when the map holds one of any 4-bit type.
fn quant_state_key(tensors: &HashMap<String, Tensor>, prefix: &str) -> Option<String> {
    let start = format!("{prefix}.weight.quant_state.");
    tensors.keys().find(|k| k.starts_with(&start)).cloned()
}

/// Whether `prefix` (a module name) is stored as a bitsandbytes 4-bit layer.
pub fn is_bnb_layer(tensors: &HashMap<String, Tensor>, prefix: &str) -> bool {
    quant_state_key(tensors, prefix).is_some()
}

fn take(tensors: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    tensors
        .remove(name)
        .with_context(|| format!("bnb: tensor `{name}` is missing"))
}

fn f32_values(t: &Tensor, name: &str, len: usize) -> Result<Vec<f32>> {
    if t.dtype() != DType::F32 {
        bail!("bnb: tensor `{name}` is {:?}, expected F32", t.dtype());
    }
    if t.elem_count() != len {
        bail!(
            "bnb: tensor `{name}` has {} values, expected {len}",
            t.elem_count()
        );
    }
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The raw bytes of the packed weight, whatever `bnb_4bit_quant_storage` dtype views them.
fn weight_bytes(t: &Tensor, name: &str) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        other => bail!("bnb: tensor `{name}` has storage dtype {other:?}, expected U8"),
    })
}

fn json_usize(js: &Value, key: &str, name: &str) -> Result<usize> {
    js.get(key)
        .and_then(Value::as_u64)
        .filter(|v| *v > 0)
        .map(|v| v as usize)
        .with_context(|| format!("bnb: `{name}` has no positive integer `{key}`"))
}

/// Reads (and removes from `tensors`) the NF4 layer stored under `prefix`, checking every
/// tensor's dtype and size against the quant state.
pub fn load_layer(tensors: &mut HashMap<String, Tensor>, prefix: &str) -> Result<Nf4Packed> {
    let p = format!("{prefix}.weight");
    let qs_name = quant_state_key(tensors, prefix)
        .with_context(|| format!("bnb: `{p}` has no quant_state tensor"))?;
    if !qs_name.ends_with(QUANT_STATE_NF4) {
        bail!("bnb: `{qs_name}`: only NF4 4-bit weights are supported");
    }
    let qs = take(tensors, &qs_name)?;
    if qs.dtype() != DType::U8 {
        bail!("bnb: tensor `{qs_name}` is {:?}, expected U8", qs.dtype());
    }
    let text = String::from_utf8(qs.flatten_all()?.to_vec1::<u8>()?)
        .with_context(|| format!("bnb: tensor `{qs_name}` is not UTF-8 text"))?;
    let js: Value = serde_json::from_str(&text)
        .with_context(|| format!("bnb: tensor `{qs_name}` is not valid JSON"))?;
    if js.get("quant_type").and_then(Value::as_str) != Some("nf4") {
        bail!("bnb: `{qs_name}`: quant_type is not \"nf4\"");
    }
    let blocksize = json_usize(&js, "blocksize", &qs_name)?;
    let dtype = js
        .get("dtype")
        .and_then(Value::as_str)
        .with_context(|| format!("bnb: `{qs_name}` has no `dtype` string"))?
        .to_string();
    let shape: Vec<usize> = js
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|v| v.as_u64().map(|v| v as usize)).collect())
        .with_context(|| format!("bnb: `{qs_name}` has no integer `shape` list"))?;
    let [rows, cols] = shape[..] else {
        bail!("bnb: `{qs_name}`: shape {shape:?} is not 2-D");
    };
    let n = rows
        .checked_mul(cols)
        .with_context(|| format!("bnb: `{qs_name}`: shape {shape:?} is too large"))?;
    let n_blocks = n.div_ceil(blocksize);

    let wt = take(tensors, &p)?;
    let data = weight_bytes(&wt, &p)?;
    if data.len() != n.div_ceil(2) {
        bail!(
            "bnb: tensor `{p}` holds {} bytes, shape [{rows}, {cols}] needs {}",
            data.len(),
            n.div_ceil(2)
        );
    }
    let qm_name = format!("{p}.quant_map");
    let quant_map_v = f32_values(&take(tensors, &qm_name)?, &qm_name, 16)?;
    if quant_map_v
        .iter()
        .zip(NF4_CODE)
        .any(|(a, b)| (a - b).abs() > 1e-6)
    {
        bail!("bnb: tensor `{qm_name}` is not the NF4 code");
    }
    let mut quant_map = [0f32; 16];
    quant_map.copy_from_slice(&quant_map_v);

    let am_name = format!("{p}.absmax");
    let am = take(tensors, &am_name)?;
    let absmax = if js.get("nested_blocksize").is_some() {
        let nbs = json_usize(&js, "nested_blocksize", &qs_name)?;
        let offset = js
            .get("nested_offset")
            .and_then(Value::as_f64)
            .with_context(|| format!("bnb: `{qs_name}` has no numeric `nested_offset`"))?;
        if let Some(d) = js.get("nested_dtype").and_then(Value::as_str) {
            if d != "float32" {
                bail!("bnb: `{qs_name}`: nested_dtype {d:?} is not supported (float32 only)");
            }
        }
        if am.dtype() != DType::U8 || am.elem_count() != n_blocks {
            bail!(
                "bnb: tensor `{am_name}` is {:?} with {} values, double quantization needs U8 with {n_blocks}",
                am.dtype(),
                am.elem_count()
            );
        }
        let codes = am.flatten_all()?.to_vec1::<u8>()?;
        let na_name = format!("{p}.nested_absmax");
        let nested = f32_values(&take(tensors, &na_name)?, &na_name, n_blocks.div_ceil(nbs))?;
        let nq_name = format!("{p}.nested_quant_map");
        let nq = f32_values(&take(tensors, &nq_name)?, &nq_name, 256)?;
        let mut code = Box::new([0f32; 256]);
        code.copy_from_slice(&nq);
        Absmax::Nested(NestedAbsmax {
            codes,
            absmax: nested,
            code,
            blocksize: nbs,
            offset: offset as f32,
        })
    } else {
        Absmax::F32(f32_values(&am, &am_name, n_blocks)?)
    };
    let rest = format!("{p}.");
    if let Some(extra) = tensors.keys().find(|k| k.starts_with(&rest)) {
        bail!("bnb: unexpected tensor `{extra}` next to the quantized `{p}`");
    }
    Ok(Nf4Packed {
        rows,
        cols,
        blocksize,
        data,
        absmax,
        quant_map,
        dtype,
    })
}

/// The `quantization_config` block of an NF4 model's config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizationConfig {
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype` (loraplex computes in f32 whatever it says).
    pub compute_dtype: String,
    /// `bnb_4bit_quant_storage`.
    pub quant_storage: String,
    /// `llm_int8_skip_modules`: modules left unquantized, when listed.
    pub skip_modules: Option<Vec<String>>,
}

impl QuantizationConfig {
    /// NF4 as `loraplex quantize` writes it (f32 compute, uint8 storage).
    pub fn nf4(double_quant: bool) -> Self {
        Self {
            double_quant,
            compute_dtype: "float32".into(),
            quant_storage: "uint8".into(),
            skip_modules: None,
        }
    }

    /// transformers' `BitsAndBytesConfig.to_dict()` for this configuration.
    pub fn to_json(&self) -> Value {
        json!({
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": self.compute_dtype,
            "bnb_4bit_quant_storage": self.quant_storage,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": self.skip_modules,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": true,
            "load_in_8bit": false,
            "quant_method": "bitsandbytes"
        })
    }

    /// Reads `quantization_config` from a parsed config.json: `None` when there is none, an error
    /// for any quantization other than bitsandbytes NF4.
    pub fn from_config_json(config: &Value) -> Result<Option<Self>> {
        let Some(q) = config.get("quantization_config") else {
            return Ok(None);
        };
        let flag = |k: &str| q.get(k).and_then(Value::as_bool);
        let text = |k: &str, d: &str| q.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
        let method = text("quant_method", "");
        if method != "bitsandbytes" {
            bail!("config.json: quantization method {method:?} is not supported (bitsandbytes NF4 only)");
        }
        if flag("load_in_8bit").or(flag("_load_in_8bit")) == Some(true) {
            bail!("config.json: 8-bit bitsandbytes checkpoints are not supported (NF4 only)");
        }
        if flag("load_in_4bit").or(flag("_load_in_4bit")) != Some(true) {
            bail!("config.json: quantization_config does not set load_in_4bit");
        }
        // transformers' default quant type is fp4.
        let qt = text("bnb_4bit_quant_type", "fp4");
        if qt != "nf4" {
            bail!("config.json: bnb_4bit_quant_type {qt:?} is not supported (nf4 only)");
        }
        let skip_modules = match q.get("llm_int8_skip_modules") {
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .context("config.json: llm_int8_skip_modules is not a list of names")?,
            ),
            _ => None,
        };
        Ok(Some(Self {
            double_quant: flag("bnb_4bit_use_double_quant").unwrap_or(false),
            compute_dtype: text("bnb_4bit_compute_dtype", "float32"),
            quant_storage: text("bnb_4bit_quant_storage", "uint8"),
            skip_modules,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        for (v, s) in [
            (0.1, "0.1"),
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.5e16, "1.5e+16"),
            (123456.0, "123456.0"),
            (-3.25e-7, "-3.25e-07"),
            (0.012345678, "0.012345678"),
            (0.0, "0.0"),
        ] {
            assert_eq!(py_float_repr(v), s);
        }
        let f = 0.012_345_679_f32 as f64;
        assert_eq!(py_float_repr(f).parse::<f64>().unwrap(), f);
    }

    #[test]
    fn config_round_trip_and_refusals() {
        let c = QuantizationConfig::nf4(true);
        let cfg = json!({ "quantization_config": c.to_json() });
        assert_eq!(QuantizationConfig::from_config_json(&cfg).unwrap(), Some(c));
        assert_eq!(
            QuantizationConfig::from_config_json(&json!({})).unwrap(),
            None
        );
        for bad in [
            json!({"quant_method": "gptq"}),
            json!({"quant_method": "bitsandbytes", "load_in_8bit": true}),
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true}),
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "fp4"}),
        ] {
            let cfg = json!({ "quantization_config": bad });
            assert!(QuantizationConfig::from_config_json(&cfg).is_err());
        }
    }
}
