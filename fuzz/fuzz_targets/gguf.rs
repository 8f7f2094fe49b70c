//! GGUF headers as `--model x.gguf` reads them: candle's reader, then the model config and the
//! tokenizer from the metadata. Any bytes give a model description or an error, never a panic.
#![no_main]

use candle_core::quantized::gguf_file::Content;
use libfuzzer_sys::fuzz_target;
use loraplex::model::LlamaConfig;
use loraplex::tokenize::TextTokenizer;

fuzz_target!(|data: &[u8]| {
    let Ok(content) = Content::read(&mut std::io::Cursor::new(data)) else {
        return;
    };
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims().first().copied())
        .unwrap_or(256);
    let tied = !content.tensor_infos.contains_key("output.weight");
    let _ = LlamaConfig::from_gguf(&content, vocab, tied);
    let _ = TextTokenizer::from_gguf(&content);
});
