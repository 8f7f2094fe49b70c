//! Building a [`TextTokenizer`] from GGUF metadata.
//!
//! Two tokenizer models (`tokenizer.ggml.model`) are supported; any other is refused by name:
//!
//! * `gpt2`: byte-level BPE. The pre-tokenizer is chosen from `tokenizer.ggml.pre` through a
//!   fixed table whose entries are the exact Hugging Face `tokenizer.json` pre-tokenizers of those
//!   model families; an unknown value is refused instead of guessed, because a wrong guess
//!   silently produces different token ids.
//! * `llama`: SentencePiece BPE with byte fallback (Llama 1/2, Mistral, TinyLlama), from the
//!   pieces, `tokenizer.ggml.scores` and `tokenizer.ggml.add_space_prefix` (see the
//!   `sentencepiece` module); BOS is added unless `tokenizer.ggml.add_bos_token` says otherwise.
//!
//! Token types follow llama.cpp: 3 (control) becomes a special added token and 4 (user-defined) a
//! plain added token; both match inside text as whole strings, as in Hugging Face. In a
//! SentencePiece vocabulary 2 (unknown, `<unk>`) is special too, and only type 1 (normal) pieces
//! take part in merges.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer,
};

use super::sentencepiece::{self, SentencePiece};
use super::{Extras, TextTokenizer};

/// The `tokenizer.ggml.pre` values [`TextTokenizer::from_gguf`] accepts.
pub const SUPPORTED_GGUF_PRE_TOKENIZERS: &[&str] = &[
    "smollm",
    "starcoder",
    "gpt2",
    "gpt-2",
    "default",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
];

/// The split regex of Llama-3's `tokenizer.json` (numbers in runs of up to three digits).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex of Qwen2's `tokenizer.json` (single digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// How one `tokenizer.ggml.pre` value tokenizes, in Hugging Face terms.
struct PreSpec {
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: PreTokenizerWrapper,
    /// BPE `ignore_merges`: a pre-token found whole in the vocabulary is not merged.
    ignore_merges: bool,
    /// Whether BOS is added when the GGUF does not say (llama.cpp's per-family default).
    add_bos_default: bool,
}

/// The Hugging Face equivalent of a GGUF `tokenizer.ggml.pre` value, or `None` if unsupported.
fn pre_spec(pre: &str) -> Result<Option<PreSpec>> {
    // ByteLevel(add_prefix_space, trim_offsets, use_regex): the GPT-2 split when use_regex.
    let gpt2 = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("cannot compile the pre-tokenizer regex for '{pre}': {e}"))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])))
    };
    let spec = match pre {
        // SmolLM / StarCoder: every digit alone, then the GPT-2 split.
        "smollm" | "starcoder" => PreSpec {
            normalizer: None,
            pre_tokenizer: PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                gpt2(),
            ])),
            ignore_merges: false,
            add_bos_default: false,
        },
        "gpt2" | "gpt-2" | "default" => PreSpec {
            normalizer: None,
            pre_tokenizer: gpt2(),
            ignore_merges: false,
            add_bos_default: false,
        },
        "llama-bpe" | "llama3" | "llama-v3" => PreSpec {
            normalizer: None,
            pre_tokenizer: split_then_bytes(LLAMA3_SPLIT)?,
            ignore_merges: true,
            add_bos_default: true,
        },
        "qwen2" => PreSpec {
            normalizer: Some(NormalizerWrapper::NFC(NFC)),
            pre_tokenizer: split_then_bytes(QWEN2_SPLIT)?,
            ignore_merges: false,
            add_bos_default: false,
        },
        _ => return Ok(None),
    };
    Ok(Some(spec))
}

impl TextTokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    ///
    /// Requires `tokenizer.ggml.model` to be `"gpt2"` (byte-level BPE, with a
    /// `tokenizer.ggml.pre` from [`SUPPORTED_GGUF_PRE_TOKENIZERS`]) or `"llama"` (SentencePiece,
    /// with `tokenizer.ggml.scores`); anything else is refused with an error that says what to use
    /// instead. EOS ids are `tokenizer.ggml.eos_token_id` plus, when present, the end-of-turn /
    /// end-of-message ids (`eot_token_id`, `eom_token_id`).
    pub fn from_gguf(content: &Content) -> Result<TextTokenizer> {
        let md = &content.metadata;
        let model = get_str(md, "tokenizer.ggml.model")?.ok_or_else(|| {
            anyhow!(
                "this GGUF has no tokenizer (no tokenizer.ggml.model); load the tokenizer from \
                 the model's Hugging Face folder (tokenizer.json) instead"
            )
        })?;
        let kind = match model {
            "gpt2" => Kind::ByteLevel,
            "llama" => Kind::SentencePiece,
            _ => {
                let kind = match model {
                    "bert" => "a WordPiece ('bert')",
                    "t5" => "a Unigram ('t5')",
                    "rwkv" => "an RWKV ('rwkv')",
                    _ => "an unsupported",
                };
                bail!(
                    "this GGUF has {kind} tokenizer (tokenizer.ggml.model = '{model}'); only \
                     byte-level BPE ('gpt2') and SentencePiece ('llama') are built from GGUF \
                     metadata; load the tokenizer from the model's Hugging Face folder \
                     (tokenizer.json) instead"
                );
            }
        };
        let (mut tok, tokens, add_bos_default) = match kind {
            Kind::ByteLevel => byte_level_tokenizer(md)?,
            Kind::SentencePiece => sentencepiece_tokenizer(md)?,
        };
        let n_tokens = tokens.len();

        let id_key = |key: &str| -> Result<Option<u32>> {
            let id = get_u32(md, key)?;
            match id {
                Some(id) if id as usize >= n_tokens => {
                    bail!("{key} = {id} is outside the vocabulary of {n_tokens} tokens")
                }
                other => Ok(other),
            }
        };
        let bos_id = id_key("tokenizer.ggml.bos_token_id")?;
        let eos_id = id_key("tokenizer.ggml.eos_token_id")?;
        let extras = Extras {
            eos_ids: [
                eos_id,
                id_key("tokenizer.ggml.eot_token_id")?,
                id_key("tokenizer.ggml.eom_token_id")?,
            ]
            .into_iter()
            .flatten()
            .collect(),
            bos_id,
            pad_id: id_key("tokenizer.ggml.padding_token_id")?,
            unk_id: id_key("tokenizer.ggml.unknown_token_id")?,
            chat_template: get_str(md, "tokenizer.chat_template")?.map(str::to_string),
            model_max_length: context_length(md)?,
        };
        let add_bos = get_bool(md, "tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default);

        tok.with_post_processor(post_processor(kind, add_bos, bos_id, &tokens)?);

        // Special (control) and user-defined tokens match whole inside the text.
        let special_types: &[i64] = match kind {
            Kind::ByteLevel => &[TOKEN_TYPE_CONTROL],
            Kind::SentencePiece => &[TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN],
        };
        let types = token_types(md, n_tokens)?;
        let (special, user) =
            added_tokens(types.as_deref(), special_types, &tokens, [bos_id, eos_id]);
        tok.add_special_tokens(special)
            .map_err(|e| anyhow!("cannot register the GGUF's control tokens: {e}"))?;
        tok.add_tokens(user)
            .map_err(|e| anyhow!("cannot register the GGUF's user-defined tokens: {e}"))?;
        TextTokenizer::assemble(tok, extras, "GGUF metadata")
    }
}

/// The tokenizer models built from GGUF metadata.
#[derive(Clone, Copy)]
enum Kind {
    /// `gpt2`: byte-level BPE.
    ByteLevel,
    /// `llama`: SentencePiece BPE with byte fallback.
    SentencePiece,
}

/// The byte-level BPE (`gpt2`) tokenizer without added tokens or post-processor; its vocabulary;
/// whether BOS is added by default.
fn byte_level_tokenizer(md: &HashMap<String, Value>) -> Result<(Tokenizer, Vec<&str>, bool)> {
    let supported = SUPPORTED_GGUF_PRE_TOKENIZERS.join(", ");
    let pre = get_str(md, "tokenizer.ggml.pre")?.ok_or_else(|| {
        anyhow!(
            "this GGUF does not say how to pre-tokenize (no tokenizer.ggml.pre), and guessing \
             gives wrong token ids; supported values: {supported}; or load the tokenizer \
             from the model's Hugging Face folder (tokenizer.json)"
        )
    })?;
    let spec = pre_spec(pre)?.ok_or_else(|| {
        anyhow!(
            "unsupported GGUF pre-tokenizer tokenizer.ggml.pre = '{pre}'; supported values: \
             {supported}; or load the tokenizer from the model's Hugging Face folder \
             (tokenizer.json)"
        )
    })?;

    let tokens = vocabulary(md)?;
    let merges = get_str_array(md, "tokenizer.ggml.merges")?
        .ok_or_else(|| anyhow!("this GGUF has no tokenizer.ggml.merges (BPE merge rules)"))?
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => bail!("tokenizer.ggml.merges[{i}] = {m:?} is not two tokens and a space"),
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(&tokens)?, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| anyhow!("the GGUF's vocabulary and merges do not form a BPE model: {e}"))?;

    let mut tok = Tokenizer::new(bpe);
    if let Some(normalizer) = spec.normalizer {
        tok.with_normalizer(Some(normalizer))
            .map_err(|e| anyhow!("cannot set the normalizer: {e}"))?;
    }
    tok.with_pre_tokenizer(Some(spec.pre_tokenizer));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    Ok((tok, tokens, spec.add_bos_default))
}

/// The SentencePiece (`llama`) tokenizer without added tokens or post-processor; its
/// vocabulary; whether BOS is added by default (yes, as llama.cpp).
///
/// `tokenizer.ggml.pre` plays no part (llama.cpp ignores it for this model too).
fn sentencepiece_tokenizer(md: &HashMap<String, Value>) -> Result<(Tokenizer, Vec<&str>, bool)> {
    let tokens = vocabulary(md)?;
    let n = tokens.len();
    let scores = get_f32_array(md, "tokenizer.ggml.scores")?.ok_or_else(|| {
        anyhow!(
            "this SentencePiece GGUF has no tokenizer.ggml.scores (the pieces' merge priorities)"
        )
    })?;
    if scores.len() != n {
        bail!(
            "tokenizer.ggml.scores has {} entries but tokenizer.ggml.tokens has {n}",
            scores.len()
        );
    }
    // Without token types every piece counts as normal (llama.cpp's default).
    let normal: Vec<bool> = match token_types(md, n)? {
        Some(types) => types.iter().map(|&t| t == TOKEN_TYPE_NORMAL).collect(),
        None => vec![true; n],
    };
    let unk = match get_u32(md, "tokenizer.ggml.unknown_token_id")? {
        Some(id) => Some(*tokens.get(id as usize).ok_or_else(|| {
            anyhow!(
                "tokenizer.ggml.unknown_token_id = {id} is outside the vocabulary of {n} tokens"
            )
        })?),
        None => None,
    };
    let vocab = vocab_map(&tokens)?;
    let tok = sentencepiece::tokenizer(&SentencePiece {
        pieces: &tokens,
        scores: &scores,
        normal: &normal,
        vocab: &vocab,
        unk,
        add_space_prefix: get_bool(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true),
    })?;
    Ok((tok, tokens, true))
}

/// `tokenizer.ggml.tokens`, the vocabulary.
fn vocabulary(md: &HashMap<String, Value>) -> Result<Vec<&str>> {
    let tokens = get_str_array(md, "tokenizer.ggml.tokens")?
        .ok_or_else(|| anyhow!("this GGUF has no tokenizer.ggml.tokens (the vocabulary)"))?;
    u32::try_from(tokens.len()).context("the GGUF vocabulary has over 2^32 tokens")?;
    Ok(tokens)
}

/// Token string → id. Like llama.cpp and transformers, the last of repeated strings wins.
fn vocab_map(tokens: &[&str]) -> Result<Vocab> {
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        let id = u32::try_from(id).context("the GGUF vocabulary has over 2^32 tokens")?;
        if let Some(earlier) = vocab.get(*token) {
            tracing::warn!(
                "GGUF token {id} repeats token {earlier} ({token:?}); text maps to {id}"
            );
        }
        vocab.insert((*token).to_string(), id);
    }
    Ok(vocab)
}

/// The post-processor: for byte-level BPE, ByteLevel (offsets only); preceded by a BOS-adding
/// template when `add_bos`.
fn post_processor(
    kind: Kind,
    add_bos: bool,
    bos_id: Option<u32>,
    tokens: &[&str],
) -> Result<Option<PostProcessorWrapper>> {
    let bytes = match kind {
        Kind::ByteLevel => Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(
            true, false, true,
        ))),
        Kind::SentencePiece => None,
    };
    if !add_bos {
        return Ok(bytes);
    }
    let bos_id = bos_id.ok_or_else(|| {
        anyhow!("the GGUF asks to add a BOS token but has no tokenizer.ggml.bos_token_id")
    })?;
    let bos = tokens
        .get(bos_id as usize)
        .ok_or_else(|| anyhow!("tokenizer.ggml.bos_token_id {bos_id} is out of range"))?;
    let template = TemplateProcessing::builder()
        .try_single(vec![format!("{bos}:0"), "$A:0".to_string()])
        .and_then(|b| b.try_pair(vec![format!("{bos}:0"), "$A:0".into(), "$B:1".into()]))
        .map_err(|e| anyhow!("cannot build the BOS template for {bos:?}: {e}"))?
        .special_tokens(vec![(bos.to_string(), bos_id)])
        .build()
        .map_err(|e| anyhow!("cannot build the BOS template for {bos:?}: {e}"))?;
    let template = PostProcessorWrapper::Template(template);
    Ok(Some(match bytes {
        Some(bytes) => {
            PostProcessorWrapper::Sequence(ProcessorSequence::new(vec![bytes, template]))
        }
        None => template,
    }))
}

/// `tokenizer.ggml.token_type`, if the file has it, checked against the vocabulary's length.
fn token_types(md: &HashMap<String, Value>, n_tokens: usize) -> Result<Option<Vec<i64>>> {
    let Some(types) = md.get("tokenizer.ggml.token_type") else {
        return Ok(None);
    };
    let types = types
        .to_vec()
        .map_err(|_| anyhow!("tokenizer.ggml.token_type is not an array"))?;
    if types.len() != n_tokens {
        bail!(
            "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {n_tokens}",
            types.len()
        );
    }
    types
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            as_i64(kind).ok_or_else(|| anyhow!("tokenizer.ggml.token_type[{i}] is not an integer"))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The added tokens: those of `special_types` (special) and user-defined ones (not special).
/// Without token types, the BOS and EOS tokens are taken as the special tokens.
fn added_tokens(
    types: Option<&[i64]>,
    special_types: &[i64],
    tokens: &[&str],
    fallback_special: [Option<u32>; 2],
) -> (Vec<AddedToken>, Vec<AddedToken>) {
    let added = |text: &str, special: bool| AddedToken::from(text, special).normalized(false);
    let Some(types) = types else {
        let special = fallback_special
            .into_iter()
            .flatten()
            .filter_map(|id| tokens.get(id as usize))
            .map(|t| added(t, true))
            .collect();
        return (special, Vec::new());
    };
    let (mut special, mut user) = (Vec::new(), Vec::new());
    for (&kind, text) in types.iter().zip(tokens) {
        if special_types.contains(&kind) {
            special.push(added(text, true));
        } else if kind == TOKEN_TYPE_USER_DEFINED {
            user.push(added(text, false));
        }
    }
    (special, user)
}

/// `{general.architecture}.context_length`, if the file has it.
fn context_length(md: &HashMap<String, Value>) -> Result<Option<usize>> {
    let Some(arch) = get_str(md, "general.architecture")? else {
        return Ok(None);
    };
    Ok(get_u32(md, &format!("{arch}.context_length"))?.map(|n| n as usize))
}

fn get_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => bail!(
            "GGUF metadata {key} should be a string, found {:?}",
            other.value_type()
        ),
    }
}

fn get_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => match as_i64(other) {
            Some(n @ (0 | 1)) => Ok(Some(n == 1)),
            _ => bail!("GGUF metadata {key} should be a bool, found {other:?}"),
        },
    }
}

fn get_u32(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>> {
    let Some(value) = md.get(key) else {
        return Ok(None);
    };
    let n = as_i64(value).ok_or_else(|| {
        anyhow!(
            "GGUF metadata {key} should be an integer, found {:?}",
            value.value_type()
        )
    })?;
    u32::try_from(n)
        .map(Some)
        .map_err(|_| anyhow!("GGUF metadata {key} = {n} is not a valid id or count"))
}

fn get_str_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(value) = md.get(key) else {
        return Ok(None);
    };
    let Value::Array(items) = value else {
        bail!(
            "GGUF metadata {key} should be an array of strings, found {:?}",
            value.value_type()
        );
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            other => bail!("GGUF metadata {key}[{i}] should be a string, found {other:?}"),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn get_f32_array(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<f32>>> {
    let Some(value) = md.get(key) else {
        return Ok(None);
    };
    let Value::Array(items) = value else {
        bail!(
            "GGUF metadata {key} should be an array of numbers, found {:?}",
            value.value_type()
        );
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match *v {
            Value::F32(x) => Ok(x),
            Value::F64(x) => Ok(x as f32),
            ref other => match as_i64(other) {
                Some(n) => Ok(n as f32),
                None => bail!("GGUF metadata {key}[{i}] should be a number, found {other:?}"),
            },
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Any integer-typed GGUF value as i64 (u64 values above i64::MAX give `None`).
fn as_i64(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(n) => Some(n.into()),
        Value::I8(n) => Some(n.into()),
        Value::U16(n) => Some(n.into()),
        Value::I16(n) => Some(n.into()),
        Value::U32(n) => Some(n.into()),
        Value::I32(n) => Some(n.into()),
        Value::U64(n) => i64::try_from(n).ok(),
        Value::I64(n) => Some(n),
        _ => None,
    }
}
