//! TEMPORARY stub with the agreed interface; replaced by the real module.
use anyhow::Result;
use std::path::Path;
pub struct TextTokenizer;
impl TextTokenizer {
    pub fn from_hf_folder(_d: &Path) -> Result<Self> {
        anyhow::bail!("stub")
    }
    pub fn from_gguf(_c: &candle_core::quantized::gguf_file::Content) -> Result<Self> {
        anyhow::bail!("stub")
    }
    pub fn vocab_size(&self) -> usize {
        0
    }
    pub fn eos_ids(&self) -> &[u32] {
        &[]
    }
    pub fn save_hf_folder(&self, _d: &Path) -> Result<()> {
        Ok(())
    }
}
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}
impl Clone for TextTokenizer {
    fn clone(&self) -> Self {
        TextTokenizer
    }
}
impl TextTokenizer {
    pub fn encode(&self, _t: &str, _a: bool) -> Result<Vec<u32>> {
        anyhow::bail!("stub")
    }
    pub fn apply_chat_template(&self, _m: &[ChatMessage], _a: bool) -> Result<String> {
        anyhow::bail!("stub")
    }
    pub fn token_text(&self, _id: u32) -> String {
        String::new()
    }
}
pub struct StreamDecoder;
impl StreamDecoder {
    pub fn new(_t: TextTokenizer) -> Self {
        StreamDecoder
    }
    pub fn push(&mut self, _id: u32) -> Result<Option<String>> {
        Ok(None)
    }
    pub fn finish(&mut self) -> Result<Option<String>> {
        Ok(None)
    }
}
