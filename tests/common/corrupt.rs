//! Broken adapter folders of many kinds, each a copy of the `attn-r4` fixture with one thing
//! wrong (for the hostile-input suite).
#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::Path;

fn config_of(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}

fn set_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let mut c = config_of(dir);
    f(&mut c);
    std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

fn set_weights(dir: &Path, bytes: &[u8]) {
    std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
}

/// A safetensors file with `header` as its JSON header and `data` after it.
pub fn safetensors_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

/// Writes every kind into `adapters` (one folder each) and returns their names.
pub fn write_all(adapters: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let mut make = |name: &str, f: &dyn Fn(&Path)| {
        let dir = adapters.join(name);
        super::copy_dir(&super::tiny_adapter("attn-r4"), &dir);
        f(&dir);
        names.push(name.to_string());
    };
    // Weights files.
    make("trunc-10", &|d| {
        let w = weights(d);
        set_weights(d, &w[..10]);
    });
    make("trunc-half", &|d| {
        let w = weights(d);
        set_weights(d, &w[..w.len() / 2]);
    });
    make("trunc-last-byte", &|d| {
        let w = weights(d);
        set_weights(d, &w[..w.len() - 1]);
    });
    make("empty-weights", &|d| set_weights(d, b""));
    make("header-len-huge", &|d| {
        let mut w = weights(d);
        w[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        set_weights(d, &w);
    });
    make("header-not-json", &|d| {
        set_weights(d, &safetensors_with_header("{not json!!", &[0; 64]))
    });
    make("header-bad-utf8", &|d| {
        let mut b = 8u64.to_le_bytes().to_vec();
        b.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc, 0x7b, 0x7d, 0x20, 0x20]);
        set_weights(d, &b);
    });
    make("offsets-out-of-range", &|d| {
        let h = json!({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
            {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1_000_000]}});
        set_weights(d, &safetensors_with_header(&h.to_string(), &[0; 1024]));
    });
    make("shape-bytes-mismatch", &|d| {
        let h = json!({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
            {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 16]}});
        set_weights(d, &safetensors_with_header(&h.to_string(), &[0; 16]));
    });
    make("bad-dtype", &|d| {
        let h = json!({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
            {"dtype": "Q9", "shape": [4, 64], "data_offsets": [0, 1024]}});
        set_weights(d, &safetensors_with_header(&h.to_string(), &[0; 1024]));
    });
    make("no-tensors", &|d| {
        set_weights(d, &safetensors_with_header("{}", &[]))
    });
    make("weights-missing", &|d| {
        std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap()
    });
    make("weights-is-dir", &|d| {
        std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
        std::fs::create_dir(d.join("adapter_model.safetensors")).unwrap();
    });
    make("wrong-shape", &|d| super::write_mismatched_adapter(d, 48));
    make("rank-mismatch", &|d| set_config(d, |c| c["r"] = json!(8)));
    // Configs.
    make("config-missing", &|d| {
        std::fs::remove_file(d.join("adapter_config.json")).unwrap()
    });
    make("config-not-json", &|d| {
        std::fs::write(d.join("adapter_config.json"), "{\"r\": 4,").unwrap()
    });
    make("config-array", &|d| {
        std::fs::write(d.join("adapter_config.json"), "[1, 2, 3]").unwrap()
    });
    make("config-empty", &|d| {
        std::fs::write(d.join("adapter_config.json"), "").unwrap()
    });
    make("config-bad-utf8", &|d| {
        std::fs::write(d.join("adapter_config.json"), b"{\"r\": \xff\xfe}").unwrap()
    });
    make("config-r-zero", &|d| set_config(d, |c| c["r"] = json!(0)));
    make("config-r-negative", &|d| {
        set_config(d, |c| c["r"] = json!(-4))
    });
    make("config-r-huge", &|d| {
        set_config(d, |c| c["r"] = json!(1u64 << 40))
    });
    make("config-r-string", &|d| {
        set_config(d, |c| c["r"] = json!("4"))
    });
    make("config-alpha-huge", &|d| {
        set_config(d, |c| c["lora_alpha"] = json!(1e300))
    });
    make("config-alpha-string", &|d| {
        set_config(d, |c| c["lora_alpha"] = json!("x"))
    });
    make("config-targets-unknown", &|d| {
        set_config(d, |c| c["target_modules"] = json!(["not_a_module"]))
    });
    make("config-targets-missing", &|d| {
        set_config(d, |c| {
            c.as_object_mut().unwrap().remove("target_modules");
        })
    });
    make("config-dora", &|d| {
        set_config(d, |c| c["use_dora"] = json!(true))
    });
    make("config-peft-type", &|d| {
        set_config(d, |c| c["peft_type"] = json!("IA3"))
    });
    make("config-bias", &|d| {
        set_config(d, |c| c["bias"] = json!("all"))
    });
    make("nan-b", &|_| {});
    super::scaled_adapter("attn-r4", adapters, "nan-b", f64::NAN);
    make("inf-b", &|_| {});
    super::scaled_adapter("attn-r4", adapters, "inf-b", f64::INFINITY);
    names
}
