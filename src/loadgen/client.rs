//! One simulated client request: a streamed chat completion over HTTP (blocking `ureq`, one
//! thread per client), timed at the arrival of every SSE chunk that carries a token.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

/// What one streamed request measured.
#[derive(Clone, Debug, Default)]
pub struct RequestTiming {
    /// Seconds from sending the request to the first chunk with generated text.
    pub ttft: Option<f64>,
    /// Seconds between consecutive token chunks.
    pub inter_token: Vec<f64>,
    /// Generated tokens (`usage.completion_tokens` of the final chunk).
    pub completion_tokens: usize,
    /// Prompt tokens (`usage.prompt_tokens`).
    pub prompt_tokens: usize,
    /// Prompt tokens the server's prefix cache supplied
    /// (`usage.prompt_tokens_details.cached_tokens`; 0 when absent).
    pub cached_tokens: usize,
}

/// The request a client sends.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    pub model: String,
    pub prompt: String,
    pub max_tokens: usize,
    /// Generate `max_tokens` whatever the model says (otherwise it may stop at end-of-sequence).
    pub ignore_eos: bool,
}

/// The JSON body: greedy, streamed with usage in the last chunk.
pub fn body(req: &ChatRequest) -> Value {
    json!({
        "model": req.model,
        "messages": [{"role": "user", "content": req.prompt}],
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": req.ignore_eos,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// Sends `req` to `{url}/v1/chat/completions` and reads its stream to the end.
pub fn stream_chat(
    agent: &ureq::Agent,
    url: &str,
    api_key: Option<&str>,
    req: &ChatRequest,
) -> Result<RequestTiming, String> {
    let mut http = agent.post(&format!("{url}/v1/chat/completions"));
    if let Some(k) = api_key {
        http = http.set("Authorization", &format!("Bearer {k}"));
    }
    let sent = Instant::now();
    let resp = match http.send_json(body(req)) {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let text = r.into_string().unwrap_or_default();
            return Err(format!("HTTP {code}: {}", text.trim()));
        }
        Err(e) => return Err(format!("transport: {e}")),
    };
    read_stream(BufReader::new(resp.into_reader()), sent)
}

/// Reads SSE lines until `data: [DONE]`, timing each chunk that carries generated text.
pub fn read_stream(reader: impl BufRead, sent: Instant) -> Result<RequestTiming, String> {
    let mut t = RequestTiming::default();
    let mut last: Option<Instant> = None;
    for line in reader.lines() {
        let line = line.map_err(|e| format!("reading the stream: {e}"))?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return Ok(t);
        }
        let now = Instant::now();
        let v: Value =
            serde_json::from_str(data).map_err(|e| format!("chunk is not JSON ({e}): {data}"))?;
        if let Some(err) = v.get("error") {
            return Err(format!("error in the stream: {err}"));
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
            t.completion_tokens = n("completion_tokens");
            t.prompt_tokens = n("prompt_tokens");
            t.cached_tokens = u
                .pointer("/prompt_tokens_details/cached_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize;
        }
        if is_token_chunk(&v) {
            match last {
                None => t.ttft = Some(now.duration_since(sent).as_secs_f64()),
                Some(prev) => t.inter_token.push(now.duration_since(prev).as_secs_f64()),
            }
            last = Some(now);
        }
    }
    Err("the stream ended without data: [DONE]".into())
}

/// A chunk whose first choice's delta carries text (the opening role chunk does not count).
fn is_token_chunk(v: &Value) -> bool {
    let Some(delta) = v
        .get("choices")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("delta"))
    else {
        return false;
    };
    delta.get("role").is_none()
        && delta
            .get("content")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
}

/// An HTTP agent for one client thread (its own connection, generous timeouts).
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(timeout)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_timing_counts_token_chunks_and_usage() {
        let text = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{\"content\":\" there\"}}]}\n\n\
                    data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":3}}}\n\n\
                    data: [DONE]\n\n";
        let t = read_stream(text.as_bytes(), Instant::now()).unwrap();
        assert!(t.ttft.is_some());
        assert_eq!(t.inter_token.len(), 1);
        assert_eq!((t.prompt_tokens, t.completion_tokens), (5, 2));
        assert_eq!(t.cached_tokens, 3);
        let cut = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n";
        assert!(read_stream(cut.as_bytes(), Instant::now()).is_err());
        let err = "data: {\"error\":{\"message\":\"boom\"}}\n";
        assert!(read_stream(err.as_bytes(), Instant::now())
            .unwrap_err()
            .contains("boom"));
    }
}
