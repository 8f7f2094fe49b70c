//! Adapter arithmetic against PEFT's `add_weighted_adapter` (tests/fixtures/tiny-combos-golden.json:
//! combo-a and combo-b combined by every deterministic combination): in the library, through
//! `loraplex merge --out-adapter` / `--out` (per request over HTTP: tests/combos_server.rs); DARE's density,
//! rescaling and seed; clear errors for bad input.

mod common;

use common::combos::*;
use common::golden::all_logits;
use common::*;
use loraplex::lora::{combine, Combination, CombineOptions, LoraAdapter, LoraStack};
use loraplex::model::{self, LoadedModel, Proj};
use serde_json::{json, Value};
use std::sync::Arc;

fn load_base() -> LoadedModel {
    model::load_path(&tiny_model(), &candle_core::Device::Cpu).unwrap()
}

fn members(m: &LoadedModel, call: &Value) -> Vec<(Arc<LoraAdapter>, f64)> {
    let names = call["adapters"].as_array().unwrap();
    let weights = call["weights"].as_array().unwrap();
    names
        .iter()
        .zip(weights)
        .map(|(n, w)| {
            let n = n.as_str().unwrap();
            let a = LoraAdapter::load(n, &tiny_adapter(n), &m.llama.cfg).unwrap();
            (Arc::new(a), w.as_f64().unwrap())
        })
        .collect()
}

fn stack(m: &LoadedModel, adapter: LoraAdapter) -> Arc<LoraStack> {
    Arc::new(LoraStack::single(Arc::new(adapter), m.llama.cfg.num_hidden_layers).unwrap())
}

/// Last-position logits on every golden prompt within `tol`, argmax identical; the largest
/// difference.
fn check(
    m: &LoadedModel,
    label: &str,
    case: &Value,
    lora: Option<Arc<LoraStack>>,
    tol: f32,
) -> f32 {
    let g = combos();
    let mut worst = 0f32;
    for (pname, r) in case["prompts"].as_object().unwrap() {
        let prompt = ids(&g["prompts"][pname.as_str()]);
        let logits = all_logits(m, &prompt, lora.clone());
        let last = logits.last().unwrap();
        let d = max_abs_diff(last, &floats(&r["last_logits"]));
        assert!(d < tol, "{label}/{pname}: last logits differ by {d}");
        assert_eq!(
            argmax(last) as u64,
            r["argmax"].as_u64().unwrap(),
            "{label}/{pname}: argmax"
        );
        worst = worst.max(d);
    }
    worst
}

#[test]
fn every_deterministic_combination_matches_peft() {
    let m = load_base();
    for (label, case) in combos()["combinations"].as_object().unwrap() {
        let call = &case["peft_call"];
        let opts = options(call);
        let adapter = combine(label, &members(&m, call), &opts).unwrap();
        // PEFT's new config: r = lora_alpha = the new rank.
        let want_r = match opts.combination {
            Combination::Cat => 16,
            _ => 8,
        };
        assert_eq!(
            (adapter.config.r, adapter.config.lora_alpha),
            (want_r, want_r as f64)
        );
        let worst = check(&m, label, case, Some(stack(&m, adapter)), tolerance(&opts));
        eprintln!("library {label}: max |logit - golden| = {worst:.3e}");
    }
}

/// |max| of a tensor difference.
fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn combined_factors_equal_the_adapters_peft_saved() {
    // Two of PEFT's result folders (tests/fixtures/tiny-combos/): the factor-wise TIES is the
    // same f32 arithmetic (bit for bit), the SVD one the same B·A (its factors only up to sign).
    let m = load_base();
    let g = combos();
    for (label, exact) in [("ties", true), ("ties_svd", false)] {
        let case = &g["combinations"][label];
        let ours = combine(
            label,
            &members(&m, &case["peft_call"]),
            &options(&case["peft_call"]),
        )
        .unwrap();
        let dir = fixtures().join(case["folder"].as_str().unwrap());
        let peft = LoraAdapter::load(label, &dir, &m.llama.cfg).unwrap();
        assert_eq!(
            ours.modules.keys().collect::<Vec<_>>(),
            peft.modules.keys().collect::<Vec<_>>()
        );
        for (k, p) in &peft.modules {
            let o = &ours.modules[k];
            assert_eq!((o.scaling, p.scaling), (1.0, 1.0));
            let d = max_diff(&o.b.matmul(&o.a).unwrap(), &p.b.matmul(&p.a).unwrap());
            if exact {
                assert_eq!(
                    max_diff(&o.a, &p.a) + max_diff(&o.b, &p.b),
                    0.0,
                    "{label} {k:?}"
                );
            } else {
                assert!(d < 1e-6, "{label} {k:?}: B·A differs by {d}");
            }
        }
    }
}

#[tokio::test]
async fn registry_combinations_are_cached_and_match_the_golden() {
    use loraplex::adapters::{AdapterMetrics, AdapterRegistry};
    let m = load_base();
    let tmp = tempfile::tempdir().unwrap();
    for a in ["combo-a", "combo-b"] {
        copy_dir(&tiny_adapter(a), &tmp.path().join(a));
    }
    let metrics = Arc::new(AdapterMetrics::new(&prometheus::Registry::new()).unwrap());
    let reg = AdapterRegistry::new(
        tmp.path().to_path_buf(),
        false,
        m.llama.cfg.clone(),
        m.llama.placement(),
        1 << 30,
        metrics,
    )
    .unwrap();
    assert_eq!(reg.scan().unwrap(), 2);
    let named = |call: &Value| -> Vec<(String, f64)> {
        let n = call["adapters"].as_array().unwrap();
        let w = call["weights"].as_array().unwrap();
        n.iter()
            .zip(w)
            .map(|(n, w)| (n.as_str().unwrap().to_string(), w.as_f64().unwrap()))
            .collect()
    };
    let g = combos();
    for (label, case) in g["combinations"].as_object().unwrap() {
        let call = &case["peft_call"];
        let opts = options(call);
        let c = reg.combined(&named(call), &opts).await.unwrap();
        let worst = check(&m, label, case, Some(c.stack.clone()), tolerance(&opts));
        eprintln!("registry (per request) {label}: max |logit - golden| = {worst:.3e}");
    }
    // Computed once: concurrent and later requests share one copy, until a member changes.
    let call = &g["combinations"]["ties_svd"]["peft_call"];
    let opts = options(call);
    let members = named(call);
    let (x, y) = tokio::join!(reg.combined(&members, &opts), reg.combined(&members, &opts));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert!(Arc::ptr_eq(&x, &y));
    let mut other = opts.clone();
    other.svd_rank = Some(4);
    let z = reg.combined(&named(call), &other).await.unwrap();
    assert!(!Arc::ptr_eq(&x, &z));
    assert_eq!(z.adapter.config.r, 4);
    reg.register("combo-b", "combo-b").await.unwrap();
    let after = reg.combined(&named(call), &opts).await.unwrap();
    assert!(
        !Arc::ptr_eq(&x, &after),
        "a new version of a member is a new combination"
    );
    // Unequal ranks, and an unknown member, are errors (not panics).
    copy_dir(&tiny_adapter("attn-r4"), &tmp.path().join("attn-r4"));
    reg.scan().unwrap();
    let linear = CombineOptions::new(Combination::Linear);
    let e = reg
        .combined(&[("combo-a".into(), 1.0), ("attn-r4".into(), 1.0)], &linear)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("one rank"), "{e}");
    assert!(reg
        .combined(&[("nope".into(), 1.0)], &linear)
        .await
        .is_err());
}

#[test]
fn merge_out_adapter_writes_peft_folders_that_reproduce_the_golden() {
    let m = load_base();
    let tmp = tempfile::tempdir().unwrap();
    for (label, case) in combos()["combinations"].as_object().unwrap() {
        let call = &case["peft_call"];
        let dir = tmp.path().join(label);
        merge(&merge_flags(call), "--out-adapter", &dir);
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["r"], cfg["lora_alpha"], "{label}");
        let loaded = LoraAdapter::load(label, &dir, &m.llama.cfg).unwrap();
        let opts = options(call);
        let worst = check(
            &m,
            label,
            case,
            Some(stack(&m, loaded.clone())),
            tolerance(&opts),
        );
        eprintln!("merge --out-adapter {label}: max |logit - golden| = {worst:.3e}");
        // The folder holds exactly what the library computes.
        let ours = combine(label, &members(&m, call), &opts).unwrap();
        for (k, o) in &ours.modules {
            let l = &loaded.modules[k];
            assert_eq!(
                max_diff(&o.a, &l.a) + max_diff(&o.b, &l.b),
                0.0,
                "{label} {k:?}"
            );
        }
    }
}

#[test]
fn merge_out_folds_a_combination_into_the_base() {
    let g = combos();
    let tmp = tempfile::tempdir().unwrap();
    for label in ["ties", "svd", "linear-neg"] {
        let case = &g["combinations"][label];
        let out = tmp.path().join(label);
        merge(&merge_flags(&case["peft_call"]), "--out", &out);
        let merged = model::load_path(&out, &candle_core::Device::Cpu).unwrap();
        let tol = tolerance(&options(&case["peft_call"]));
        let worst = check(&merged, label, case, None, tol);
        eprintln!("merge --out {label}: max |logit - golden| = {worst:.3e}");
    }
}

#[test]
fn merge_refuses_bad_combinations_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let a = format!("{}:0.8", p(&tiny_adapter("combo-a")));
    let b = format!("{}:0.6", p(&tiny_adapter("combo-b")));
    let r4 = p(&tiny_adapter("attn-r4")).to_string();
    let model = tiny_model();
    let base = ["merge", "--model", p(&model)];
    for (extra, want) in [
        (vec!["--combination", "tie"], "unknown combination `tie`"),
        (vec!["--combination", "ties"], "--density"),
        (vec!["--combination", "ties", "--density", "0"], "(0, 1]"),
        (vec!["--combination", "ties", "--density", "1.5"], "(0, 1]"),
        (
            vec!["--combination", "linear", "--density", "0.5"],
            "does not apply",
        ),
        (
            vec!["--combination", "svd", "--svd-rank", "0"],
            "at least 1",
        ),
        (vec!["--combination", "svd", "--svd-rank", "65"], "exceeds"),
        (vec!["--combination", "linear", "--seed", "3"], "--seed"),
        (
            vec![
                "--combination",
                "magnitude_prune",
                "--density",
                "0.5",
                "--majority-sign-method",
                "frequency",
            ],
            "--majority-sign-method",
        ),
        (
            vec![
                "--combination",
                "ties",
                "--density",
                "0.5",
                "--majority-sign-method",
                "median",
            ],
            "median",
        ),
    ] {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra.iter().copied());
        args.extend(["--adapter", &a, "--adapter", &b, "--out-adapter", p(&out)]);
        let (ok, err) = loraplex(&args);
        assert!(!ok && err.contains(want), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
    // Unequal ranks for a factor-wise method, as PEFT refuses them; cat and svd take them.
    let (ok, err) = loraplex(
        &[
            &base[..],
            &[
                "--combination",
                "linear",
                "--adapter",
                &a,
                "--adapter",
                &r4,
                "--out-adapter",
                p(&out),
            ],
        ]
        .concat(),
    );
    assert!(
        !ok && err.contains("one rank") && err.contains("r=4"),
        "{err}"
    );
    let (ok, err) = loraplex(
        &[
            &base[..],
            &[
                "--combination",
                "svd",
                "--adapter",
                &a,
                "--adapter",
                &r4,
                "--out-adapter",
                p(&out),
            ],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    // A non-finite weight, both outputs at once, neither.
    let inf = format!("{}:inf", p(&tiny_adapter("combo-a")));
    let (ok, err) = loraplex(
        &[
            &base[..],
            &[
                "--combination",
                "linear",
                "--adapter",
                &inf,
                "--out-adapter",
                p(&tmp.path().join("y")),
            ],
        ]
        .concat(),
    );
    assert!(!ok && err.contains("finite"), "{err}");
    let (ok, _) = loraplex(
        &[
            &base[..],
            &[
                "--adapter",
                &a,
                "--out",
                p(&tmp.path().join("y")),
                "--out-adapter",
                p(&tmp.path().join("z")),
            ],
        ]
        .concat(),
    );
    assert!(!ok);
    let (ok, _) = loraplex(&[&base[..], &["--adapter", &a]].concat());
    assert!(!ok);
    // An existing, non-empty output folder is refused and left alone.
    let (ok, err) = loraplex(
        &[
            &base[..],
            &[
                "--combination",
                "linear",
                "--adapter",
                &a,
                "--adapter",
                &b,
                "--out-adapter",
                p(&out),
            ],
        ]
        .concat(),
    );
    assert!(!ok && err.contains("not empty"), "{err}");
}

/// The values of the modules only combo-a targets (k/o/up_proj): DARE leaves `w·x/density` or 0.
#[test]
fn dare_keeps_the_density_and_rescaling_with_a_seed() {
    let m = load_base();
    let members = members(
        &m,
        &json!({"adapters": ["combo-a", "combo-b"], "weights": [0.8, 0.6]}),
    );
    let a_alone = &members[0].0;
    let density = 0.3;
    let dare = |c: Combination, seed: u64| {
        let opts = CombineOptions {
            density: Some(density),
            seed: Some(seed),
            ..CombineOptions::new(c)
        };
        combine("dare", &members, &opts).unwrap()
    };
    for c in [Combination::DareLinear, Combination::DareTies] {
        let x = dare(c, 7);
        // Factor weights: sqrt(0.8 · 2) on both halves (positive weight).
        let w = (0.8f64 * 2.0).sqrt() as f32;
        let (mut kept, mut total) = (0usize, 0usize);
        for (k, o) in &x.modules {
            if ![Proj::K, Proj::O, Proj::Up].contains(&k.1) {
                continue;
            }
            let src = &a_alone.modules[k];
            for (got, orig) in [(&o.a, &src.a), (&o.b, &src.b)] {
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                let orig: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
                for (g, v) in got.iter().zip(&orig) {
                    total += 1;
                    if *g != 0.0 {
                        kept += 1;
                        let want = v / density as f32 * w;
                        assert!((g - want).abs() <= 1e-6 * want.abs(), "{c}: {g} vs {want}");
                    }
                }
            }
        }
        let frac = kept as f64 / total as f64;
        let sd = (density * (1.0 - density) / total as f64).sqrt();
        assert!(
            (frac - density).abs() < 5.0 * sd,
            "{c}: kept {frac} of {total}"
        );
        // Seeded: the same seed gives the same adapter, another seed another one.
        let same = dare(c, 7);
        let other = dare(c, 8);
        let (mut d_same, mut d_other) = (0f32, 0f32);
        for (k, o) in &x.modules {
            d_same = d_same
                .max(max_diff(&o.a, &same.modules[k].a))
                .max(max_diff(&o.b, &same.modules[k].b));
            d_other = d_other.max(max_diff(&o.a, &other.modules[k].a));
        }
        assert_eq!(d_same, 0.0, "{c}");
        assert!(d_other > 0.0, "{c}");
        // It runs: finite logits.
        let logits = all_logits(&m, &[1, 15, 72], Some(stack(&m, x)));
        assert!(logits.iter().flatten().all(|v| v.is_finite()));
    }
}
