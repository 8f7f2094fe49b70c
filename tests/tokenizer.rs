//! Tokenizer integration tests, through the public API only.
//!
//! The golden tests load the default model's GGUF (fetched into the cache on first use) and must
//! reproduce Hugging Face's token ids and chat rendering exactly. The other tests build small GGUF
//! files in memory to check the pre-tokenizer table, the refusals and the HF-folder round trip.
//! The SentencePiece tests train small SentencePiece models with the `sentencepiece` package
//! (`tests/spm_reference.py`, run with `.venv`'s python, which scripts/test.sh makes), write their
//! vocabularies as GGUF metadata, and must give the package's ids and decoded text.

use std::collections::BTreeSet;
use std::io::{Cursor, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Content, Value};
use loraplex::fetch;
use loraplex::tokenize::{ChatMessage, StreamDecoder, TextTokenizer};
use serde::Deserialize;

// ---------------------------------------------------------------------------------------------
// The real model and the golden file

#[derive(Deserialize)]
struct Golden {
    cases: Vec<GoldenCase>,
    chat: GoldenChat,
}

#[derive(Deserialize)]
struct GoldenCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct GoldenChat {
    messages: Vec<ChatMessage>,
    rendered: String,
    ids: Vec<u32>,
}

fn golden() -> Result<Golden> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smol-tokenizer-golden.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn load_smol() -> Result<TextTokenizer> {
    let path = fetch::ensure_default_model()?;
    let mut file = std::fs::File::open(&path)?;
    let content =
        Content::read(&mut file).map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
    TextTokenizer::from_gguf(&content)
}

/// The default model's tokenizer, built once per test binary.
fn smol() -> Result<TextTokenizer> {
    static SMOL: OnceLock<std::result::Result<TextTokenizer, String>> = OnceLock::new();
    SMOL.get_or_init(|| load_smol().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

#[test]
fn default_model_is_cached_with_the_pinned_hash() -> Result<()> {
    let path = fetch::ensure_default_model()?;
    assert_eq!(path, fetch::default_model_path()?);
    fetch::verify_sha256(&path, fetch::DEFAULT_MODEL_SHA256)
}

#[test]
fn gguf_tokenizer_reproduces_hf_ids() -> Result<()> {
    let tok = smol()?;
    let golden = golden()?;
    assert_eq!(golden.cases.len(), 10);
    for case in &golden.cases {
        let ids = tok.encode(&case.text, false)?;
        assert_eq!(ids, case.ids, "ids differ for {:?}", case.text);
        assert_eq!(
            tok.decode(&ids, false)?,
            case.text,
            "decode does not invert encode"
        );
    }
    Ok(())
}

#[test]
fn gguf_chat_template_reproduces_hf_rendering() -> Result<()> {
    let tok = smol()?;
    let chat = golden()?.chat;
    let rendered = tok.apply_chat_template(&chat.messages, true)?;
    assert_eq!(rendered, chat.rendered);
    assert_eq!(tok.encode(&rendered, false)?, chat.ids);

    // Without the generation prompt the text stops after the user's turn.
    let no_prompt = tok.apply_chat_template(&chat.messages, false)?;
    assert!(chat.rendered.starts_with(&no_prompt) && no_prompt.len() < chat.rendered.len());
    Ok(())
}

#[test]
fn gguf_special_ids_come_from_the_metadata() -> Result<()> {
    let tok = smol()?;
    let im_end = tok.token_to_id("<|im_end|>").context("no <|im_end|>")?;
    let im_start = tok.token_to_id("<|im_start|>").context("no <|im_start|>")?;
    assert_eq!(tok.eos_ids(), &[im_end]);
    assert!(tok.is_eos(im_end));
    assert_eq!(tok.bos_id(), Some(im_start));
    assert_eq!(tok.vocab_size(), 49152);
    assert!(!tok.adds_bos(), "SmolLM2 adds no BOS");
    assert_eq!(tok.encode("Hi", true)?, tok.encode("Hi", false)?);
    assert_eq!(tok.token_text(im_end), "<|im_end|>");
    assert_eq!(tok.decode(&[im_start, im_end], true)?, "");
    assert_eq!(tok.model_max_length(), Some(8192));
    Ok(())
}

/// Pushes every id of `ids` through a fresh stream decoder; returns the pieces.
fn stream_pieces(tok: &TextTokenizer, ids: &[u32], skip_special: bool) -> Result<Vec<String>> {
    let mut stream = StreamDecoder::new(tok, skip_special);
    let mut pieces = Vec::new();
    for &id in ids {
        pieces.extend(stream.push(id)?);
    }
    pieces.extend(stream.finish()?);
    Ok(pieces)
}

#[test]
fn stream_decoder_never_splits_characters() -> Result<()> {
    let tok = smol()?;
    let texts = [
        "한국어 문장입니다. 日本語のテキスト。",
        "Emoji: 😀👍🏽🚀 and symbols ©®™ ∑∫√",
        "Déjà vu — naïve café. Ελληνικά.",
        "plain ascii, numbers 12345",
    ];
    for text in texts {
        let ids = tok.encode(text, false)?;
        let pieces = stream_pieces(&tok, &ids, false)?;
        assert_eq!(pieces.concat(), tok.decode(&ids, false)?);
        assert_eq!(pieces.concat(), text);
        for piece in &pieces {
            assert!(
                !piece.contains('\u{FFFD}'),
                "piece {piece:?} of {text:?} splits a character"
            );
        }
        if !text.is_ascii() {
            // Some ids hold partial characters, so fewer pieces than ids came out.
            assert!(
                pieces.len() < ids.len(),
                "{text:?}: {} pieces, {} ids",
                pieces.len(),
                ids.len()
            );
        }
    }
    Ok(())
}

#[test]
fn stream_decoder_matches_decode_with_special_tokens() -> Result<()> {
    let tok = smol()?;
    let chat = golden()?.chat;
    let mut ids = chat.ids.clone();
    ids.extend(tok.encode("안녕하세요! 🚀<|im_end|>\n", false)?);
    for skip in [false, true] {
        let pieces = stream_pieces(&tok, &ids, skip)?;
        assert_eq!(
            pieces.concat(),
            tok.decode(&ids, skip)?,
            "skip_special = {skip}"
        );
    }
    // An unfinished character at the end comes out of `finish` as decode shows it.
    let emoji = tok.encode("🚀", false)?;
    assert!(
        emoji.len() > 1,
        "expected the emoji to take several byte tokens"
    );
    let cut = &emoji[..emoji.len() - 1];
    let mut stream = StreamDecoder::new(&tok, false);
    for &id in cut {
        assert_eq!(stream.push(id)?, None);
    }
    assert_eq!(
        stream.finish()?.unwrap_or_default(),
        tok.decode(cut, false)?
    );
    Ok(())
}

#[test]
fn save_hf_folder_round_trips_the_default_tokenizer() -> Result<()> {
    let tok = smol()?;
    let dir = tempfile::tempdir()?;
    tok.save_hf_folder(dir.path())?;
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("tokenizer_config.json"),
    )?)?;
    assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(config["added_tokens_decoder"]["2"]["special"], true);

    let back = TextTokenizer::from_hf_folder(dir.path())?;
    assert_eq!(back.chat_template(), tok.chat_template());
    assert_eq!(back.eos_ids(), tok.eos_ids());
    assert_eq!(back.bos_id(), tok.bos_id());
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.model_max_length(), tok.model_max_length());
    for case in golden()?.cases {
        assert_eq!(back.encode(&case.text, false)?, case.ids, "{:?}", case.text);
    }
    let chat = golden()?.chat;
    assert_eq!(
        back.apply_chat_template(&chat.messages, true)?,
        chat.rendered
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Small GGUF files built in memory

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others are moved to
/// code points from 256 up, in byte order.
fn byte_char(b: u8) -> char {
    let printable = |c: u8| (b'!'..=b'~').contains(&c) || (0xA1..=0xAC).contains(&c) || c >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let shifted = (0..b).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + shifted).unwrap_or('?')
}

fn byte_level(text: &str) -> String {
    text.bytes().map(byte_char).collect()
}

/// A toy byte-level vocabulary: `<|bos|>`, `<|end|>` (both control), the 256 byte tokens, then
/// one token per merge (named by joining its parts).
struct Toy {
    tokens: Vec<String>,
    merges: Vec<String>,
    types: Vec<i32>,
}

impl Toy {
    fn new(merges: &[(&str, &str)], extra_tokens: &[&str]) -> Self {
        let mut tokens = vec!["<|bos|>".to_string(), "<|end|>".to_string()];
        let mut types = vec![3, 3];
        tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
        types.extend(std::iter::repeat_n(1, 256));
        for (a, b) in merges {
            tokens.push(byte_level(&format!("{a}{b}")));
            types.push(1);
        }
        for t in extra_tokens {
            tokens.push(byte_level(t));
            types.push(1);
        }
        let merges = merges
            .iter()
            .map(|(a, b)| format!("{} {}", byte_level(a), byte_level(b)))
            .collect();
        Self {
            tokens,
            merges,
            types,
        }
    }

    fn id(&self, text: &str) -> Result<u32> {
        let key = byte_level(text);
        let pos = self
            .tokens
            .iter()
            .position(|t| *t == key)
            .context("no such toy token")?;
        Ok(pos as u32)
    }

    fn metadata(&self, model: &str, pre: Option<&str>) -> Vec<(String, Value)> {
        let strings =
            |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
        let mut md = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("llama.context_length".to_string(), Value::U32(512)),
            (
                "tokenizer.ggml.model".to_string(),
                Value::String(model.into()),
            ),
            ("tokenizer.ggml.tokens".to_string(), strings(&self.tokens)),
            ("tokenizer.ggml.merges".to_string(), strings(&self.merges)),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(self.types.iter().map(|&t| Value::I32(t)).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(0)),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(1)),
            (
                "tokenizer.chat_template".to_string(),
                Value::String("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
            ),
        ];
        if let Some(pre) = pre {
            md.push(("tokenizer.ggml.pre".to_string(), Value::String(pre.into())));
        }
        md
    }
}

/// Writes `metadata` as a GGUF file in memory and reads it back.
fn gguf(metadata: &[(String, Value)]) -> Result<Content> {
    let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &refs, &[]).map_err(|e| anyhow!("writing GGUF: {e}"))?;
    buf.set_position(0);
    Content::read(&mut buf).map_err(|e| anyhow!("reading GGUF: {e}"))
}

fn toy_tokenizer(toy: &Toy, pre: &str) -> Result<TextTokenizer> {
    TextTokenizer::from_gguf(&gguf(&toy.metadata("gpt2", Some(pre)))?)
}

fn err_text(result: Result<TextTokenizer>) -> Result<String> {
    match result {
        Ok(_) => bail!("expected an error, got a tokenizer"),
        Err(e) => Ok(format!("{e:#}")),
    }
}

#[test]
fn unknown_pre_tokenizer_is_refused_by_name() -> Result<()> {
    let toy = Toy::new(&[], &[]);
    let msg = err_text(toy_tokenizer(&toy, "made-up-pre"))?;
    assert!(msg.contains("'made-up-pre'"), "{msg}");
    for name in ["smollm", "gpt2", "llama-bpe", "qwen2"] {
        assert!(msg.contains(name), "{msg} does not list {name}");
    }
    let missing = err_text(TextTokenizer::from_gguf(&gguf(
        &toy.metadata("gpt2", None),
    )?))?;
    assert!(missing.contains("tokenizer.ggml.pre"), "{missing}");
    Ok(())
}

#[test]
fn unsupported_tokenizer_model_is_refused() -> Result<()> {
    let toy = Toy::new(&[], &[]);
    for (model, kind) in [
        ("bert", "WordPiece"),
        ("t5", "Unigram"),
        ("made-up", "unsupported"),
    ] {
        let msg = err_text(TextTokenizer::from_gguf(&gguf(
            &toy.metadata(model, Some("default")),
        )?))?;
        assert!(msg.contains(&format!("'{model}'")), "{msg}");
        assert!(msg.contains(kind), "{msg}");
        assert!(msg.contains("tokenizer.json"), "{msg}");
        for supported in ["'gpt2'", "'llama'"] {
            assert!(msg.contains(supported), "{msg} does not name {supported}");
        }
    }
    let mut no_tokenizer = toy.metadata("gpt2", Some("gpt2"));
    no_tokenizer.retain(|(k, _)| k != "tokenizer.ggml.model");
    let msg = err_text(TextTokenizer::from_gguf(&gguf(&no_tokenizer)?))?;
    assert!(msg.contains("no tokenizer"), "{msg}");
    Ok(())
}

#[test]
fn pre_tokenizers_split_digits_as_their_families_do() -> Result<()> {
    // "3 4" outranks the others, so only a split before the 4 can produce "123".
    let toy = Toy::new(&[("3", "4"), ("1", "2"), ("12", "3"), ("4", "5")], &[]);
    let ids = |names: &[&str]| names.iter().map(|n| toy.id(n)).collect::<Result<Vec<_>>>();
    // GPT-2: one pre-token "12345".
    assert_eq!(
        toy_tokenizer(&toy, "gpt2")?.encode("12345", false)?,
        ids(&["12", "34", "5"])?
    );
    // Llama-3: runs of at most three digits, "123" | "45".
    assert_eq!(
        toy_tokenizer(&toy, "llama-bpe")?.encode("12345", false)?,
        ids(&["123", "45"])?
    );
    // SmolLM / Qwen2: every digit alone.
    let singles = ids(&["1", "2", "3", "4", "5"])?;
    assert_eq!(
        toy_tokenizer(&toy, "smollm")?.encode("12345", false)?,
        singles
    );
    assert_eq!(
        toy_tokenizer(&toy, "qwen2")?.encode("12345", false)?,
        singles
    );
    Ok(())
}

#[test]
fn llama3_ignores_merges_for_whole_words_and_adds_bos() -> Result<()> {
    // "abc" is in the vocabulary but no merge chain builds it.
    let toy = Toy::new(&[("a", "b")], &["abc"]);
    let gpt2 = toy_tokenizer(&toy, "gpt2")?;
    let llama = toy_tokenizer(&toy, "llama-bpe")?;
    assert_eq!(
        gpt2.encode("abc", false)?,
        vec![toy.id("ab")?, toy.id("c")?]
    );
    assert_eq!(llama.encode("abc", false)?, vec![toy.id("abc")?]);
    assert!(llama.adds_bos() && !gpt2.adds_bos());
    assert_eq!(llama.encode("abc", true)?, vec![0, toy.id("abc")?]);

    // An explicit tokenizer.ggml.add_bos_token wins over the family default.
    let mut md = toy.metadata("gpt2", Some("llama-bpe"));
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
    assert!(!TextTokenizer::from_gguf(&gguf(&md)?)?.adds_bos());
    Ok(())
}

#[test]
fn qwen2_normalizes_to_nfc() -> Result<()> {
    let toy = Toy::new(&[], &[]);
    let decomposed = "e\u{301}";
    let composed = "\u{e9}";
    let qwen = toy_tokenizer(&toy, "qwen2")?;
    assert_eq!(
        qwen.encode(decomposed, false)?,
        qwen.encode(composed, false)?
    );
    let gpt2 = toy_tokenizer(&toy, "gpt2")?;
    assert_ne!(
        gpt2.encode(decomposed, false)?,
        gpt2.encode(composed, false)?
    );
    Ok(())
}

#[test]
fn control_tokens_match_inside_text_and_user_defined_ones_too() -> Result<()> {
    let mut toy = Toy::new(&[], &["<tool>"]);
    let tool = toy.id("<tool>")?;
    toy.types[tool as usize] = 4;
    let tok = toy_tokenizer(&toy, "gpt2")?;
    assert_eq!(
        tok.encode("a<|end|>b", false)?,
        vec![toy.id("a")?, 1, toy.id("b")?]
    );
    assert_eq!(tok.encode("x<tool>", false)?, vec![toy.id("x")?, tool]);
    assert_eq!(
        tok.decode(&[toy.id("a")?, 1], true)?,
        "a",
        "control tokens are special"
    );
    assert_eq!(
        tok.decode(&[tool], true)?,
        "<tool>",
        "user-defined tokens are not special"
    );
    Ok(())
}

#[test]
fn bad_metadata_gives_clear_errors() -> Result<()> {
    let toy = Toy::new(&[], &[]);
    let mut md = toy.metadata("gpt2", Some("gpt2"));
    md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(100_000)));
    let msg = err_text(TextTokenizer::from_gguf(&gguf(&md)?))?;
    assert!(
        msg.contains("eos_token_id") && msg.contains("100000"),
        "{msg}"
    );

    let mut md = toy.metadata("gpt2", Some("gpt2"));
    md.retain(|(k, _)| k != "tokenizer.ggml.merges");
    md.push((
        "tokenizer.ggml.merges".into(),
        Value::Array(vec![Value::String("nospace".into())]),
    ));
    let msg = err_text(TextTokenizer::from_gguf(&gguf(&md)?))?;
    assert!(msg.contains("nospace"), "{msg}");
    Ok(())
}

#[test]
fn hf_folder_configs_union_the_eos_ids() -> Result<()> {
    let toy = Toy::new(&[("a", "b")], &[]);
    let tok = toy_tokenizer(&toy, "llama-bpe")?;
    let dir = tempfile::tempdir()?;
    tok.save_hf_folder(dir.path())?;

    let back = TextTokenizer::from_hf_folder(dir.path())?;
    assert!(
        back.adds_bos(),
        "the BOS post-processor survives the round trip"
    );
    assert_eq!(back.encode("abab", true)?, tok.encode("abab", true)?);
    assert_eq!(back.chat_template(), tok.chat_template());

    // Rewrite the config the way other tools write it.
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    cfg["eos_token"] = serde_json::json!({"content": "<|end|>", "__type": "AddedToken"});
    cfg["chat_template"] = serde_json::json!([
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT {{ messages[0].content }}"},
    ]);
    std::fs::write(&cfg_path, cfg.to_string())?;
    let (a, b) = (toy.id("a")?, toy.id("b")?);
    std::fs::write(
        dir.path().join("generation_config.json"),
        format!(r#"{{"eos_token_id": [1, {a}]}}"#),
    )?;
    std::fs::write(
        dir.path().join("config.json"),
        format!(r#"{{"eos_token_id": {b}, "bos_token_id": 0}}"#),
    )?;

    let back = TextTokenizer::from_hf_folder(dir.path())?;
    let eos: BTreeSet<u32> = back.eos_ids().iter().copied().collect();
    assert_eq!(eos, BTreeSet::from([1, a, b]));
    let msgs = [ChatMessage::new("user", "hi")];
    assert_eq!(back.apply_chat_template(&msgs, false)?, "DEFAULT hi");

    // chat_template.jinja wins over tokenizer_config.json, as in transformers.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "JINJA {{ messages[0].content }}",
    )?;
    let back = TextTokenizer::from_hf_folder(dir.path())?;
    assert_eq!(back.apply_chat_template(&msgs, false)?, "JINJA hi");
    Ok(())
}

#[test]
fn hf_folder_errors_name_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let msg = err_text(TextTokenizer::from_hf_folder(dir.path()))?;
    assert!(msg.contains("tokenizer.json"), "{msg}");

    let toy = Toy::new(&[], &[]);
    toy_tokenizer(&toy, "gpt2")?.save_hf_folder(dir.path())?;
    std::fs::write(dir.path().join("config.json"), r#"{"eos_token_id": "two"}"#)?;
    let msg = err_text(TextTokenizer::from_hf_folder(dir.path()))?;
    assert!(
        msg.contains("config.json") && msg.contains("eos_token_id"),
        "{msg}"
    );

    std::fs::write(dir.path().join("config.json"), "{")?;
    let msg = err_text(TextTokenizer::from_hf_folder(dir.path()))?;
    assert!(msg.contains("config.json"), "{msg}");
    Ok(())
}

#[test]
fn missing_chat_template_says_to_use_prompt() -> Result<()> {
    let toy = Toy::new(&[], &[]);
    let mut md = toy.metadata("gpt2", Some("gpt2"));
    md.retain(|(k, _)| k != "tokenizer.chat_template");
    let tok = TextTokenizer::from_gguf(&gguf(&md)?)?;
    assert!(tok.chat_template().is_none());
    let err = tok.apply_chat_template(&[ChatMessage::new("user", "hi")], true);
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("no chat template") && msg.contains("--prompt"),
        "{msg}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`) against the `sentencepiece` package

/// Strings whose ids must equal the reference's: spaces (leading, trailing, repeated), digits,
/// punctuation, accented Latin, CJK and Korean partly in the vocabulary, and characters outside it
/// (emoji, Greek, Cyrillic, control characters: byte fallback).
const SPM_STRINGS: &[&str] = &[
    "",
    "hello world",
    " hello",
    "  two leading spaces",
    "trailing space ",
    "double  space  inside",
    " ",
    "   ",
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "3.14159 and 2,718",
    "in 2024 the server had 100% uptime",
    "$100 #tag @user e-mail",
    "don't it's we're",
    "(parens) [brackets] {braces}",
    "a+b=c x*y/z",
    "Café naïve résumé façade",
    "ZÜRICH München",
    "日本語のテキスト",
    "東京 テスト",
    "테스트 한국어 문장",
    "Emoji: 😀👍🏽🚀",
    " 😀 ",
    "Ελληνικά και русский",
    "tab\tseparated",
    "line\nbreak\r\n",
    "e\u{301} (a combining accent)",
    "½ — … “quotes”",
    "wizardly tokenization of unseen words",
    "supercalifragilisticexpialidocious",
    "ALL CAPS SENTENCE",
    "mixed123digits456",
    "ü",
    "\u{7f}\u{1}",
    "∑∫√ ©®™",
    "a literal \u{2581} mark",
    "\u{feff}byte order mark",
    "The tokenizer model server streams  every  batch; seven wizards hex 42 bishops!",
];

#[derive(Deserialize)]
struct SpmReference {
    sentencepiece: String,
    models: Vec<SpmModel>,
}

#[derive(Deserialize)]
struct SpmModel {
    add_dummy_prefix: bool,
    /// (piece, score, llama.cpp token type) by id.
    pieces: Vec<(String, f32, i32)>,
    unk_id: u32,
    bos_id: u32,
    eos_id: u32,
    cases: Vec<SpmCase>,
}

#[derive(Deserialize)]
struct SpmCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

/// The python with the `sentencepiece` package: `LORAPLEX_PYTHON`, else the repository's `.venv`.
fn reference_python() -> PathBuf {
    match std::env::var_os("LORAPLEX_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
    }
}

fn run_spm_reference() -> Result<SpmReference> {
    let python = reference_python();
    if !python.exists() {
        bail!(
            "{} does not exist: run scripts/test.sh once (it creates .venv with the \
             sentencepiece package), or point LORAPLEX_PYTHON at a python that has it",
            python.display()
        );
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/spm_reference.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let input = serde_json::json!({ "strings": SPM_STRINGS }).to_string();
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            python.display(),
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("reading the reference's JSON")
}

/// The reference, computed once per test binary.
fn spm_reference() -> Result<&'static SpmReference> {
    static REF: OnceLock<std::result::Result<SpmReference, String>> = OnceLock::new();
    REF.get_or_init(|| run_spm_reference().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("the sentencepiece reference: {e}"))
}

/// GGUF metadata as llama.cpp's converter writes it for a SentencePiece model.
/// `add_space_prefix`: `None` leaves the key out (llama.cpp then prepends the space).
fn spm_metadata(model: &SpmModel, add_space_prefix: Option<bool>) -> Vec<(String, Value)> {
    let mut md = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(
                model
                    .pieces
                    .iter()
                    .map(|p| Value::String(p.0.clone()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            Value::Array(model.pieces.iter().map(|p| Value::F32(p.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(model.pieces.iter().map(|p| Value::I32(p.2)).collect()),
        ),
        (
            "tokenizer.ggml.bos_token_id".to_string(),
            Value::U32(model.bos_id),
        ),
        (
            "tokenizer.ggml.eos_token_id".to_string(),
            Value::U32(model.eos_id),
        ),
        (
            "tokenizer.ggml.unknown_token_id".to_string(),
            Value::U32(model.unk_id),
        ),
    ];
    if let Some(prefix) = add_space_prefix {
        md.push((
            "tokenizer.ggml.add_space_prefix".to_string(),
            Value::Bool(prefix),
        ));
    }
    md
}

/// The tokenizer loraplex builds from `model`'s GGUF metadata (the key for the dummy prefix left
/// out when it is llama.cpp's default, true).
fn spm_tokenizer(model: &SpmModel) -> Result<TextTokenizer> {
    let prefix = (!model.add_dummy_prefix).then_some(false);
    TextTokenizer::from_gguf(&gguf(&spm_metadata(model, prefix))?)
}

#[test]
fn sentencepiece_gguf_reproduces_the_reference_ids_and_text() -> Result<()> {
    let reference = spm_reference()?;
    assert_eq!(
        reference.models.len(),
        2,
        "with and without the dummy prefix"
    );
    for model in &reference.models {
        let label = format!(
            "sentencepiece {} model, add_dummy_prefix = {}",
            reference.sentencepiece, model.add_dummy_prefix
        );
        let tok = spm_tokenizer(model)?;
        assert_eq!(tok.vocab_size(), model.pieces.len(), "{label}");
        assert_eq!(model.cases.len(), SPM_STRINGS.len(), "{label}");
        assert!(model.cases.len() >= 30);
        let mut byte_fallbacks = 0;
        for (case, text) in model.cases.iter().zip(SPM_STRINGS) {
            assert_eq!(
                case.text, *text,
                "{label}: the reference saw another string"
            );
            let ids = tok.encode(text, false)?;
            let pieces: Vec<String> = ids.iter().filter_map(|&i| tok.id_to_token(i)).collect();
            assert_eq!(
                ids, case.ids,
                "{label}: ids differ for {text:?} ({pieces:?})"
            );
            byte_fallbacks += pieces.iter().filter(|p| p.starts_with("<0x")).count();

            // BOS in front with special tokens, as llama.cpp adds it by default.
            let mut with_bos = vec![model.bos_id];
            with_bos.extend(&case.ids);
            assert_eq!(tok.encode(text, true)?, with_bos, "{label}: {text:?}");

            // Decoding gives the reference's text, which is the string itself unless the string
            // holds SentencePiece's own space mark (that decodes as a space).
            let decoded = tok.decode(&ids, false)?;
            assert_eq!(decoded, case.decoded, "{label}: decode of {text:?}");
            if !text.contains('\u{2581}') {
                assert_eq!(decoded, *text, "{label}: decode does not invert encode");
            }
            assert_eq!(
                stream_pieces(&tok, &ids, false)?.concat(),
                decoded,
                "{label}: streamed text of {text:?}"
            );
        }
        assert!(
            byte_fallbacks >= 20,
            "{label}: only {byte_fallbacks} byte-fallback tokens; the strings should reach \
             outside the vocabulary"
        );
    }
    Ok(())
}

#[test]
fn sentencepiece_gguf_special_tokens_and_defaults() -> Result<()> {
    let reference = spm_reference()?;
    let model = reference
        .models
        .iter()
        .find(|m| m.add_dummy_prefix)
        .context("no model with the dummy prefix")?;
    let tok = spm_tokenizer(model)?;
    assert!(
        tok.adds_bos(),
        "llama.cpp adds BOS to SentencePiece models by default"
    );
    assert_eq!(tok.bos_id(), Some(model.bos_id));
    assert_eq!(tok.eos_ids(), &[model.eos_id]);
    assert_eq!(tok.unk_id(), Some(model.unk_id));
    assert_eq!(tok.token_to_id("<0x0A>"), Some(3 + 0x0A));

    // Control tokens in the text match as themselves; the text after one gets its own dummy
    // prefix (llama.cpp and Hugging Face both do this).
    let eos = tok.id_to_token(model.eos_id).context("no EOS piece")?;
    let mut want = tok.encode("hello", false)?;
    want.push(model.eos_id);
    want.extend(tok.encode("world", false)?);
    assert_eq!(tok.encode(&format!("hello{eos}world"), false)?, want);
    assert_eq!(tok.decode(&want, true)?, "hello world");

    // An explicit add_bos_token = false wins; the space prefix key is honoured either way.
    let mut md = spm_metadata(model, Some(true));
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
    let no_bos = TextTokenizer::from_gguf(&gguf(&md)?)?;
    assert!(!no_bos.adds_bos());
    assert_eq!(no_bos.encode("hello", true)?, tok.encode("hello", false)?);
    let no_prefix = TextTokenizer::from_gguf(&gguf(&spm_metadata(model, Some(false)))?)?;
    assert_ne!(
        no_prefix.encode("hello", false)?,
        tok.encode("hello", false)?
    );
    assert_eq!(
        no_prefix.encode(" hello", false)?,
        tok.encode("hello", false)?
    );

    // The Hugging Face folder written from it tokenizes the same.
    let dir = tempfile::tempdir()?;
    tok.save_hf_folder(dir.path())?;
    let back = TextTokenizer::from_hf_folder(dir.path())?;
    assert!(back.adds_bos());
    for case in &model.cases {
        assert_eq!(back.encode(&case.text, false)?, case.ids, "{:?}", case.text);
        assert_eq!(back.decode(&case.ids, false)?, case.decoded);
    }
    Ok(())
}

#[test]
fn sentencepiece_gguf_without_scores_is_refused() -> Result<()> {
    let reference = spm_reference()?;
    let mut md = spm_metadata(&reference.models[0], None);
    md.retain(|(k, _)| k != "tokenizer.ggml.scores");
    let msg = err_text(TextTokenizer::from_gguf(&gguf(&md)?))?;
    assert!(msg.contains("tokenizer.ggml.scores"), "{msg}");

    let mut md = spm_metadata(&reference.models[0], None);
    md.retain(|(k, _)| k != "tokenizer.ggml.scores");
    md.push((
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::F32(0.0)]),
    ));
    let msg = err_text(TextTokenizer::from_gguf(&gguf(&md)?))?;
    assert!(msg.contains("scores has 1 entries"), "{msg}");
    Ok(())
}
