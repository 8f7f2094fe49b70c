//! Shared by the adapter-arithmetic tests (`tests/combos.rs`, `tests/combos_server.rs`): the
//! PEFT golden, a case's options and `loraplex merge` flags, running the binary.
#![allow(dead_code)]

use super::*;
use loraplex::lora::CombineOptions;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

pub fn combos() -> Value {
    let text = std::fs::read_to_string(fixtures().join("tiny-combos-golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The golden's tolerance: 1e-4 on logits, 1e-3 for the SVD variants.
pub fn tolerance(opts: &CombineOptions) -> f32 {
    if opts.combination.is_svd() {
        1e-3
    } else {
        1e-4
    }
}

/// The options of a golden case's PEFT call.
pub fn options(call: &Value) -> CombineOptions {
    CombineOptions {
        combination: call["combination_type"].as_str().unwrap().parse().unwrap(),
        density: call["density"].as_f64(),
        svd_rank: call["svd_rank"].as_u64().map(|r| r as usize),
        majority_sign: call["majority_sign_method"]
            .as_str()
            .map(|s| s.parse().unwrap()),
        seed: None,
    }
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `loraplex ARGS`: (success, stderr).
pub fn loraplex(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The command-line flags of a golden case's PEFT call.
pub fn merge_flags(call: &Value) -> Vec<String> {
    let mut f = vec![
        "--combination".to_string(),
        call["combination_type"].as_str().unwrap().to_string(),
    ];
    for (key, flag) in [
        ("density", "--density"),
        ("svd_rank", "--svd-rank"),
        ("majority_sign_method", "--majority-sign-method"),
    ] {
        if let Some(v) = call.get(key) {
            f.push(flag.into());
            f.push(
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string()),
            );
        }
    }
    let names = call["adapters"].as_array().unwrap();
    for (n, w) in names.iter().zip(call["weights"].as_array().unwrap()) {
        f.push("--adapter".into());
        f.push(format!("{}:{w}", p(&tiny_adapter(n.as_str().unwrap()))));
    }
    f
}

/// `loraplex merge --model tiny-llama FLAGS OUT_FLAG DIR`, asserting success.
pub fn merge(flags: &[String], out_flag: &str, dir: &Path) {
    let model = tiny_model();
    let mut args = vec!["merge", "--model", p(&model)];
    args.extend(flags.iter().map(String::as_str));
    args.extend([out_flag, p(dir)]);
    let (ok, err) = loraplex(&args);
    assert!(ok, "merge {flags:?}: {err}");
}
