//! Adapter arithmetic per request over HTTP against PEFT's golden and against the folders
//! `loraplex merge --out-adapter` writes (tests/combos.rs covers the library and the CLI).

mod common;

use common::combos::*;
use common::server::{assert_error, Server};
use common::*;
use serde_json::{json, Value};

/// Log-softmax of golden logits (f64).
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// A greedy one-token completion with `logprobs: 20`: the token's text and its top-20
/// alternatives by id (the test vocabulary spells id `i` as `t{i}`).
fn first_token(server: &Server, body: &Value) -> (String, Vec<(u32, f64)>) {
    let (code, v) = server.post("/v1/completions", body);
    assert_eq!(code, 200, "{body}: {v}");
    let lp = &v["choices"][0]["logprobs"];
    let top: Vec<(u32, f64)> = lp["top_logprobs"][0]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, x)| (t[1..].parse().unwrap(), x.as_f64().unwrap()))
        .collect();
    assert_eq!(top.len(), 20, "{v}");
    (lp["tokens"][0].as_str().unwrap().to_string(), top)
}

/// A request body for `prompt` with the golden call's adapters and combination fields.
fn request(prompt: &[u32], call: &Value) -> Value {
    let adapters: Vec<Value> = call["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .zip(call["weights"].as_array().unwrap())
        .map(|(n, w)| json!({"name": n, "weight": w}))
        .collect();
    let mut body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0,
        "logprobs": 20, "adapters": adapters, "combination": call["combination_type"]});
    for key in ["density", "svd_rank", "majority_sign_method"] {
        if let Some(v) = call.get(key) {
            body[key] = v.clone();
        }
    }
    body
}

#[test]
fn per_request_combinations_match_the_golden_and_merge_out_adapter() {
    let g = combos();
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    let names: Vec<String> = (0..256).map(|i| format!("t{i}")).collect();
    write_tiny_gguf_tokens(&gguf, "smollm", true, None, &names);
    let adapters = tmp.path().join("adapters");
    for a in ["combo-a", "combo-b", "attn-r4"] {
        copy_dir(&tiny_adapter(a), &adapters.join(a));
    }
    // Offline combinations, registered at start-up like any adapter folder.
    merge(
        &merge_flags(&g["combinations"]["ties"]["peft_call"]),
        "--out-adapter",
        &adapters.join("ties-offline"),
    );
    let dare_call = json!({"adapters": ["combo-a", "combo-b"], "weights": [0.8, 0.6],
        "combination_type": "dare_ties", "density": 0.5});
    let mut dare_flags = merge_flags(&dare_call);
    dare_flags.extend(["--seed".to_string(), "5".to_string()]);
    merge(&dare_flags, "--out-adapter", &adapters.join("dare-offline"));
    let server = Server::start(&["--model", p(&gguf), "--adapters-dir", p(&adapters)]);

    // The members alone first (the plain stack), so that the combinations' own bytes show.
    let p5 = ids(&g["prompts"]["p5"]);
    let cat_call = &g["combinations"]["cat"]["peft_call"];
    let mut stack_body = request(&p5, cat_call);
    stack_body.as_object_mut().unwrap().remove("combination");
    first_token(&server, &stack_body);

    for (label, case) in g["combinations"].as_object().unwrap() {
        let call = &case["peft_call"];
        let tol = tolerance(&options(call)) as f64;
        let mut worst = 0f64;
        for (i, (pname, r)) in case["prompts"].as_object().unwrap().iter().enumerate() {
            let prompt = ids(&g["prompts"][pname.as_str()]);
            let bytes = server.metric("loraplex_adapter_cache_bytes");
            let (token, top) = first_token(&server, &request(&prompt, call));
            if i == 0 {
                // Computed once and counted in the cache like an adapter: 2 layers × 7
                // modules of rank 8 in f32. `cat` is the weighted stack, built per request.
                let grown = server.metric("loraplex_adapter_cache_bytes") - bytes;
                let want = if label == "cat" { 0.0 } else { 65536.0 };
                assert_eq!(
                    grown, want,
                    "{label}: the combined adapter's bytes in the cache"
                );
            }
            assert_eq!(
                token,
                format!("t{}", r["argmax"]),
                "{label}/{pname}: argmax"
            );
            let want = log_softmax(&floats(&r["last_logits"]));
            for (id, lp) in top {
                let d = (lp - want[id as usize]).abs();
                assert!(d < tol, "{label}/{pname}: logprob of {id} differs by {d}");
                worst = worst.max(d);
            }
        }
        eprintln!("per request {label}: max |logprob - golden| over the top 20 = {worst:.3e}");
    }

    // Cached under (names, versions, weights, method, parameters): a repeat is a hit.
    let ties = &g["combinations"]["ties"]["peft_call"];
    let (misses, hits) = (
        server.metric("loraplex_adapter_cache_misses_total"),
        server.metric("loraplex_adapter_cache_hits_total"),
    );
    let per_request = first_token(&server, &request(&p5, ties));
    assert_eq!(server.metric("loraplex_adapter_cache_misses_total"), misses);
    assert!(server.metric("loraplex_adapter_cache_hits_total") > hits);
    // Another weight is another combination.
    let mut other = request(&p5, ties);
    other["adapters"][1]["weight"] = json!(0.5);
    first_token(&server, &other);
    assert_eq!(
        server.metric("loraplex_adapter_cache_misses_total"),
        misses + 1.0
    );

    // `merge --out-adapter` folders serve the same logits as the per-request combination.
    let body = |model: &str| {
        json!({"model": model, "prompt": p5, "max_tokens": 1,
        "temperature": 0, "logprobs": 20})
    };
    assert_eq!(first_token(&server, &body("ties-offline")), per_request);
    let mut dare = request(&p5, &dare_call);
    dare["combination_seed"] = json!(5);
    let dare_online = first_token(&server, &dare);
    assert_eq!(first_token(&server, &body("dare-offline")), dare_online);
    dare["combination_seed"] = json!(6);
    assert_ne!(first_token(&server, &dare).1, dare_online.1);

    // Bad input: OpenAI-style 400s naming the field, and the server keeps serving.
    let bad = |edit: &dyn Fn(&mut Value), param: &str| {
        let mut b = request(&p5, ties);
        edit(&mut b);
        let got = server.post("/v1/completions", &b);
        assert_error(&got, 400, param);
        assert_eq!(got.1["error"]["param"], param, "{b}: {}", got.1);
    };
    // `b` as a `combination` without ties' parameters.
    let plain = |b: &mut Value, combination: &str| {
        b["combination"] = json!(combination);
        let o = b.as_object_mut().unwrap();
        o.remove("density");
        o.remove("majority_sign_method");
    };
    bad(&|b| b["combination"] = json!("tie"), "combination");
    bad(
        &|b| {
            b.as_object_mut().unwrap().remove("density");
        },
        "density",
    );
    bad(&|b| b["density"] = json!(1.5), "density");
    bad(&|b| b["density"] = json!(0), "density");
    bad(
        &|b| {
            b.as_object_mut().unwrap().remove("combination");
        },
        "density",
    );
    bad(
        &|b| {
            plain(b, "svd");
            b["svd_rank"] = json!(0);
        },
        "svd_rank",
    );
    bad(
        &|b| {
            plain(b, "svd");
            b["svd_rank"] = json!(-2);
        },
        "svd_rank",
    );
    bad(
        &|b| {
            plain(b, "svd");
            b["svd_rank"] = json!(65);
        },
        "combination",
    );
    bad(&|b| b["svd_rank"] = json!(4), "svd_rank");
    bad(
        &|b| b["majority_sign_method"] = json!("median"),
        "majority_sign_method",
    );
    bad(&|b| b["combination_seed"] = json!(1), "combination_seed");
    bad(
        &|b| {
            plain(b, "linear");
            b["adapters"][1]["name"] = json!("attn-r4");
        },
        "combination",
    );
    bad(
        &|b| {
            plain(b, "linear");
            b["majority_sign_method"] = json!("total");
        },
        "majority_sign_method",
    );
    bad(&|b| b["adapters"][0]["weight"] = json!(1e3), "adapters");
    bad(
        &|b| {
            b.as_object_mut().unwrap().remove("adapters");
        },
        "combination",
    );
    let mut unknown = request(&p5, ties);
    unknown["adapters"][0]["name"] = json!("nope");
    assert_error(
        &server.post("/v1/completions", &unknown),
        404,
        "unknown adapter",
    );
    assert_eq!(first_token(&server, &request(&p5, ties)), per_request);
}
