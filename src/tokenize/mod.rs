//! Tokenizers, chat templates and streaming detokenization.
//!
//! [`TextTokenizer`] wraps a Hugging Face `tokenizers::Tokenizer` together with what generation
//! needs beside it: the set of end-of-sequence ids, the BOS id, and the chat template. It is built
//! either from a GGUF file's metadata ([`TextTokenizer::from_gguf`]: byte-level BPE or
//! SentencePiece) or from a Hugging Face folder ([`TextTokenizer::from_hf_folder`]), and can write
//! itself back out as a Hugging Face folder ([`TextTokenizer::save_hf_folder`]).
//!
//! * `gguf` turns GGUF `tokenizer.ggml.*` metadata into the same tokenizer HF builds.
//! * `sentencepiece` builds the HF equivalent of a SentencePiece BPE vocabulary (pieces + scores).
//! * `hf` reads and writes `tokenizer.json` / `tokenizer_config.json` (+ generation configs).
//! * `chat` renders chat templates with minijinja the way `transformers` does.
//! * `stream` turns a stream of ids into text pieces without splitting UTF-8 characters.
//!
//! Cloning a [`TextTokenizer`] is cheap: the underlying tokenizer is shared.

mod chat;
mod gguf;
mod hf;
mod sentencepiece;
mod stream;

use std::fmt;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

pub use chat::ChatMessage;
pub use gguf::SUPPORTED_GGUF_PRE_TOKENIZERS;
pub use stream::StreamDecoder;

/// A tokenizer plus the facts about it that generation needs.
#[derive(Clone)]
pub struct TextTokenizer {
    tok: Arc<tokenizers::Tokenizer>,
    eos_ids: Vec<u32>,
    bos_id: Option<u32>,
    pad_id: Option<u32>,
    unk_id: Option<u32>,
    chat_template: Option<String>,
    model_max_length: Option<usize>,
}

impl fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_ids", &self.eos_ids)
            .field("bos_id", &self.bos_id)
            .field("pad_id", &self.pad_id)
            .field("unk_id", &self.unk_id)
            .field("has_chat_template", &self.chat_template.is_some())
            .field("model_max_length", &self.model_max_length)
            .finish()
    }
}

/// What a loader found beside the tokenizer itself.
#[derive(Default)]
struct Extras {
    eos_ids: Vec<u32>,
    bos_id: Option<u32>,
    pad_id: Option<u32>,
    unk_id: Option<u32>,
    chat_template: Option<String>,
    model_max_length: Option<usize>,
}

impl TextTokenizer {
    /// Puts the parts together, checking every special id against the vocabulary. `source` names
    /// where the ids came from, for error messages.
    fn assemble(tok: tokenizers::Tokenizer, extras: Extras, source: &str) -> Result<Self> {
        let vocab = tok.get_vocab_size(true);
        let check = |what: &str, id: Option<u32>| -> Result<Option<u32>> {
            match id {
                Some(id) if id as usize >= vocab => {
                    bail!("{source}: {what} {id} is outside the vocabulary of {vocab} tokens")
                }
                other => Ok(other),
            }
        };
        let mut eos_ids = Vec::new();
        for id in extras.eos_ids {
            check("eos token id", Some(id))?;
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        Ok(Self {
            bos_id: check("bos token id", extras.bos_id)?,
            pad_id: check("padding token id", extras.pad_id)?,
            unk_id: check("unknown token id", extras.unk_id)?,
            tok: Arc::new(tok),
            eos_ids,
            chat_template: extras.chat_template,
            model_max_length: extras.model_max_length,
        })
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer's post-processor may add
    /// tokens (such as BOS for Llama-3); special-token strings inside `text` (e.g.
    /// `<|im_start|>`) always match as their special tokens, as in Hugging Face.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tok
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("cannot tokenize the text: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` leaves out special tokens such as `<|im_end|>`. Bytes that do
    /// not form valid UTF-8 come out as U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tok
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("cannot decode {} token ids: {e}", ids.len()))
    }

    /// The decoded text of one token (for displays such as log-probabilities). A token that holds
    /// only part of a UTF-8 character shows as U+FFFD; an id outside the vocabulary gives "".
    pub fn token_text(&self, id: u32) -> String {
        self.tok.decode(&[id], false).unwrap_or_default()
    }

    /// The token's string as stored in the vocabulary (e.g. `Ġworld` in byte-level BPE, `▁world`
    /// in SentencePiece).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tok.id_to_token(id)
    }

    /// The id of a vocabulary string (as stored, see [`Self::id_to_token`]) or of an
    /// added/special token.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Ids that end generation (deduplicated, in the order the sources named them).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// Adds ids that end generation (e.g. a stop token given on the command line).
    pub fn add_eos_ids(&mut self, ids: &[u32]) -> Result<()> {
        let vocab = self.vocab_size();
        for &id in ids {
            if id as usize >= vocab {
                bail!("eos token id {id} is outside the vocabulary of {vocab} tokens");
            }
            if !self.eos_ids.contains(&id) {
                self.eos_ids.push(id);
            }
        }
        Ok(())
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The padding id, if the model names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The unknown-token id, if the model names one.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    /// Whether `encode(text, true)` puts the BOS token in front (a Llama-2/3 style post-processor).
    pub fn adds_bos(&self) -> bool {
        match (self.bos_id, self.encode("a", true)) {
            (Some(bos), Ok(ids)) => ids.first() == Some(&bos),
            _ => false,
        }
    }

    /// The Jinja chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Replaces the chat template (e.g. with one given on the command line).
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    /// The longest sequence the model was trained for, if known.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tok
    }

    /// The vocabulary string of `id`, or an error naming `what` it was meant to be.
    fn token_string(&self, id: u32, what: &str) -> Result<String> {
        self.tok
            .id_to_token(id)
            .ok_or_else(|| anyhow!("{what} id {id} has no token in the vocabulary"))
    }
}
