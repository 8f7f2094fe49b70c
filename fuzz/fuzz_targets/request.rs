//! The OpenAI request parser and its validation: any body either parses and validates, or is
//! refused with a 400 — never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loraplex::server::openai::{parse_body, ChatRequest, CompletionRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = parse_body::<ChatRequest>(data) {
        let _ = r.common.choices();
        for m in &r.messages {
            let _ = m.text();
        }
        let max = r.max_completion_tokens.or(r.common.max_tokens);
        let top = r.top_logprobs.unwrap_or(0).clamp(0, 20) as usize;
        let _ = r.common.generation_params(&Default::default(), max, 5, 256, top, true);
    } else if let Err(e) = parse_body::<ChatRequest>(data) {
        assert_eq!(e.status.as_u16(), 400);
    }
    if let Ok(r) = parse_body::<CompletionRequest>(data) {
        let _ = r.common.choices();
        let _ = r
            .common
            .generation_params(&Default::default(), r.common.max_tokens, 1, 256, 0, false);
    }
});
