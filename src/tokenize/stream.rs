//! Streaming detokenization: text pieces as ids arrive, never splitting a UTF-8 character.
//!
//! Byte-level tokens often hold part of a character (a Korean syllable or an emoji can take
//! several tokens). [`StreamDecoder`] decodes a short window of recent ids and releases new text
//! only when it does not end in U+FFFD, the mark of an unfinished UTF-8 sequence. The window is
//! restarted after each release, so each push costs O(window), not O(all ids). The pieces from
//! [`StreamDecoder::push`] followed by [`StreamDecoder::finish`] concatenate to
//! `decode(all ids)`.

use std::sync::Arc;

use anyhow::{anyhow, Result};

use super::TextTokenizer;

/// Turns generated ids into text pieces; one per generation stream.
pub struct StreamDecoder {
    tok: Arc<tokenizers::Tokenizer>,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the decode window: text of `ids[prefix..read]` has already been released.
    prefix: usize,
    /// End of the released part of the window.
    read: usize,
}

impl StreamDecoder {
    /// A decoder for `tokenizer`; `skip_special` leaves special tokens (e.g. `<|im_end|>`) out.
    pub fn new(tokenizer: &TextTokenizer, skip_special: bool) -> Self {
        Self {
            tok: Arc::clone(&tokenizer.tok),
            skip_special,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds one id; returns the text it completes, or `None` while a character is unfinished (or
    /// the id adds no text).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let released = self.decode(self.prefix, self.read)?;
        let window = self.decode(self.prefix, self.ids.len())?;
        if window.len() <= released.len() || window.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        match window.strip_prefix(released.as_str()) {
            Some(new) => {
                let new = new.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(Some(new))
            }
            // The decoder rewrote earlier text (not the case for byte-level BPE); wait for
            // `finish` rather than release text that contradicts what was already sent.
            None => Ok(None),
        }
    }

    /// Returns whatever text is still held back (an unfinished character at the end shows as
    /// U+FFFD, as in `decode`), and resets the decoder for reuse.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let released = self.decode(self.prefix, self.read)?;
        let window = self.decode(self.prefix, self.ids.len())?;
        let rest = match window.strip_prefix(released.as_str()) {
            Some(rest) => rest.to_string(),
            None => {
                // Only the part after the longest common prefix is new.
                let common = window
                    .char_indices()
                    .zip(released.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, c), _)| i + c.len_utf8());
                window.get(common..).unwrap_or_default().to_string()
            }
        };
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        Ok(if rest.is_empty() { None } else { Some(rest) })
    }

    /// All ids pushed since the start (or the last `finish`).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn decode(&self, from: usize, to: usize) -> Result<String> {
        let ids = self.ids.get(from..to).unwrap_or(&[]);
        self.tok
            .decode(ids, self.skip_special)
            .map_err(|e| anyhow!("cannot decode generated ids: {e}"))
    }
}
