//! Completions with `echo` and `logprobs` score the prompt too, as OpenAI and vLLM do: the
//! prompt's tokens come first in `logprobs` (the first without a score), in one JSON body or in
//! the first SSE chunk; `max_tokens: 0` with `echo` scores a text and generates nothing.

mod common;

use common::server::{assert_error, Server};
use common::*;
use serde_json::{json, Value};

fn server(dir: &std::path::Path) -> Server {
    let model = dir.join("tiny.gguf");
    write_tiny_gguf_with(&model, "smollm", true, Some(TINY_CHAT_TEMPLATE));
    let adapters = dir.join("adapters");
    std::fs::create_dir_all(&adapters).unwrap();
    Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--adapters-dir",
        adapters.to_str().unwrap(),
    ])
}

/// The `data:` payloads of an SSE answer, up to `[DONE]`.
fn sse(server: &Server, body: &Value) -> Vec<Value> {
    let r = ureq::post(&format!("{}/v1/completions", server.url))
        .send_string(&body.to_string())
        .unwrap();
    let text = r.into_string().unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return out;
        }
        out.push(serde_json::from_str(data).unwrap());
    }
    panic!("no [DONE]: {text}");
}

#[test]
fn echo_with_logprobs_scores_the_prompt_in_json_and_sse() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let prompt = "hello world";
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                      "ignore_eos": true, "echo": true, "logprobs": 2});
    let (status, r) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let n_prompt = r["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let lp = &r["choices"][0]["logprobs"];
    let lps = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), n_prompt + 4, "{r}");
    assert!(lps[0].is_null() && lp["top_logprobs"][0].is_null(), "{r}");
    for (k, v) in lps.iter().enumerate().skip(1) {
        let x = v.as_f64().unwrap();
        assert!(x <= 0.0, "{k}: {x}");
        // Up to 2 alternatives (keyed by text: tokens that print alike share a key).
        let alts = lp["top_logprobs"][k].as_object().unwrap();
        assert!(!alts.is_empty() && alts.len() <= 2, "{r}");
        assert!(alts.values().all(|a| a.as_f64().unwrap() <= 0.0), "{r}");
    }
    // The prompt's tokens spell the prompt; their offsets run through it.
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens[..n_prompt].concat(), prompt);
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(lp["text_offset"][n_prompt], prompt.len());
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(prompt), "{r}");

    // Streamed: the first chunk is the prompt with its scores, then one chunk per token.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let chunks = sse(&server, &stream);
    let first = &chunks[0]["choices"][0];
    assert_eq!(first["text"], prompt);
    assert_eq!(first["logprobs"]["token_logprobs"], json!(lps[..n_prompt]));
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(streamed, text);
    let generated: Vec<Value> = chunks[1..]
        .iter()
        .filter_map(|c| {
            c["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .cloned()
        })
        .flatten()
        .collect();
    assert_eq!(generated, lps[n_prompt..].to_vec());

    // max_tokens 0 + echo: the same scores, nothing generated; without echo it is refused.
    let mut score = body.clone();
    score["max_tokens"] = json!(0);
    let (status, s) = server.post("/v1/completions", &score);
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["choices"][0]["text"], prompt);
    assert_eq!(s["usage"]["completion_tokens"], 0);
    assert_eq!(s["choices"][0]["finish_reason"], "length");
    assert_eq!(
        s["choices"][0]["logprobs"]["token_logprobs"],
        json!(lps[..n_prompt])
    );
    score["stream"] = json!(true);
    let chunks = sse(&server, &score);
    assert_eq!(chunks[0]["choices"][0]["text"], prompt);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    score["echo"] = json!(false);
    score["stream"] = json!(false);
    assert_error(&server.post("/v1/completions", &score), 400, "max_tokens");
    // echo without logprobs: the text only, no scores.
    let (_, plain) = server.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                "ignore_eos": true, "echo": true}),
    );
    assert_eq!(plain["choices"][0]["text"], text);
    assert!(plain["choices"][0]["logprobs"].is_null(), "{plain}");
}
