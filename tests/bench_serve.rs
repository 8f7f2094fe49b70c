//! `loraplex bench-serve` end to end on the tiny model: it starts `loraplex serve` itself, writes
//! synthetic adapters, drives every case over HTTP and reports each request complete, with fixed
//! lengths and stopping at end-of-sequence, also under a KV budget small enough that the server
//! preempts sequences while the clients stream.

mod common;

use common::*;
use serde_json::Value;
use std::process::Command;

fn bench_serve(model: &std::path::Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "bench-serve",
        "--model",
        model.to_str().unwrap(),
        "--passes",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(bin()).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array().unwrap().clone()
}

#[test]
fn bench_serve_drives_every_case_and_counts_every_token() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf_with(&model, "smollm", true, Some(TINY_CHAT_TEMPLATE));
    // 4 cases: 1 and 3 streams, on the base and over 2 distinct adapters (1 stream uses one).
    let cases = ["--streams", "1,3", "--adapters", "0,2"];
    let fixed = bench_serve(&model, &[&cases[..], &["--new-tokens", "20"]].concat());
    assert_eq!(fixed.len(), 4, "{fixed:?}");
    for (row, streams) in fixed.iter().zip([1, 1, 3, 3]) {
        assert_eq!(row["errors"], 0, "{row}");
        assert_eq!(row["requests"], streams, "{row}");
        assert_eq!(row["completion_tokens"], 20 * streams, "{row}");
        assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert_eq!(fixed[3]["distinct_models"], 2);
    // More adapters than clients: the requests take them in turn, so 2 clients × 3 requests
    // use 5 adapters (6 requests, one adapter twice).
    let many = bench_serve(
        &model,
        &[
            "--new-tokens",
            "4",
            "--streams",
            "2",
            "--adapters",
            "5",
            "--requests-per-stream",
            "3",
        ],
    );
    assert_eq!(many.len(), 1, "{many:?}");
    assert_eq!(many[0]["distinct_models"], 5, "{many:?}");
    assert_eq!(many[0]["requests"], 6, "{many:?}");
    assert_eq!(many[0]["errors"], 0, "{many:?}");
    // Stopping at end-of-sequence with a KV budget of 16 blocks (the tiny model's KV is 512
    // bytes a position): the ~90-token prompts take 6 blocks, so two of three streams run at
    // once and, unless they stop early, outgrow the pool at 128 positions, where the newest is
    // preempted and recomputed; every request still completes, with 1 to 40 tokens.
    let eos = bench_serve(
        &model,
        &[
            &cases[..],
            &[
                "--new-tokens",
                "40",
                "--stop-at-eos",
                "--serve-arg=--kv-cache-bytes=131072",
            ],
        ]
        .concat(),
    );
    assert_eq!(eos.len(), 4, "{eos:?}");
    for row in &eos {
        assert_eq!(row["errors"], 0, "{row}");
        let streams = row["streams"].as_u64().unwrap();
        let tokens = row["completion_tokens"].as_u64().unwrap();
        assert!((streams..=40 * streams).contains(&tokens), "{row}");
    }
}
