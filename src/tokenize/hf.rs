//! Reading and writing Hugging Face tokenizer folders.
//!
//! A folder holds `tokenizer.json` (the tokenizer itself) and usually `tokenizer_config.json`
//! (chat template, special-token names, `model_max_length`); newer `transformers` versions keep
//! the chat template in `chat_template.jinja`. End-of-sequence ids also come from
//! `generation_config.json` and `config.json` when they are there: the EOS set is the union of all
//! three sources.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value as Json};

use super::{Extras, TextTokenizer};

/// Values of `model_max_length` at or above this are `transformers`' "no limit" placeholder.
const NO_LIMIT: f64 = 1e15;

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` plus, when present, `tokenizer_config.json`,
    /// `chat_template.jinja`, `generation_config.json` and `config.json` from the same folder.
    ///
    /// The chat template is `chat_template.jinja` if present, else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of `{name, template}` of which "default" is used).
    /// `bos_token`/`eos_token` may be strings or `{"content": ...}` objects. The EOS ids are the
    /// union of `eos_token` and both configs' `eos_token_id` (an integer or a list).
    pub fn from_hf_folder(dir: &Path) -> Result<TextTokenizer> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            bail!("{} has no tokenizer.json", dir.display());
        }
        let tok = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("cannot load {}: {e}", tok_path.display()))?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or_else(|| json!({}));
        let where_ = config_path.display().to_string();
        let token_id = |key: &str| -> Result<Option<u32>> {
            let Some(text) = token_name(&config, key, &where_)? else {
                return Ok(None);
            };
            tok.token_to_id(&text).map(Some).ok_or_else(|| {
                anyhow!(
                    "{where_}: {key} {text:?} is not a token of {}",
                    tok_path.display()
                )
            })
        };

        // A wrong BOS/EOS would break generation, so those are errors; pad/unk are only noted.
        let lenient = |key: &str| match token_id(key) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!("{e:#}; ignoring {key}");
                None
            }
        };
        let mut extras = Extras {
            bos_id: token_id("bos_token")?,
            pad_id: lenient("pad_token"),
            unk_id: lenient("unk_token"),
            eos_ids: token_id("eos_token")?.into_iter().collect(),
            chat_template: chat_template(&config, &where_)?,
            model_max_length: match config.get("model_max_length") {
                Some(Json::Number(n)) => n
                    .as_f64()
                    .filter(|v| *v >= 1.0 && *v < NO_LIMIT && v.fract() == 0.0)
                    .map(|v| v as usize),
                _ => None,
            },
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja)
                .with_context(|| format!("cannot read {}", jinja.display()))?;
            extras.chat_template = Some(text);
        }
        for name in ["generation_config.json", "config.json"] {
            let path = dir.join(name);
            let Some(cfg) = read_json(&path)? else {
                continue;
            };
            let where_ = path.display().to_string();
            extras
                .eos_ids
                .extend(id_list(cfg.get("eos_token_id"), "eos_token_id", &where_)?);
            if extras.bos_id.is_none() {
                extras.bos_id = id_list(cfg.get("bos_token_id"), "bos_token_id", &where_)?
                    .first()
                    .copied();
            }
        }
        TextTokenizer::assemble(tok, extras, &dir.display().to_string())
    }

    /// Writes `dir/tokenizer.json` and `dir/tokenizer_config.json` (chat template, special-token
    /// names, added-tokens table, `tokenizer_class: PreTrainedTokenizerFast`, `model_max_length`
    /// when known) so that `transformers.AutoTokenizer` loads the folder and
    /// [`TextTokenizer::from_hf_folder`] reloads an equal tokenizer. Creates `dir` if needed. If
    /// `dir` already has a `chat_template.jinja` (which would win on reload), it is rewritten with
    /// this template, or removed when there is none.
    ///
    /// Only the first EOS id fits in `tokenizer_config.json` (`eos_token`); a caller writing a
    /// whole model folder should put all of [`TextTokenizer::eos_ids`] in
    /// `generation_config.json`.
    pub fn save_hf_folder(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the folder {}", dir.display()))?;

        let tok_json = self
            .tok
            .to_string(true)
            .map_err(|e| anyhow!("cannot serialize the tokenizer: {e}"))?;
        write(&dir.join("tokenizer.json"), &tok_json)?;

        let mut config = Map::new();
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        config.insert("clean_up_tokenization_spaces".into(), json!(false));
        config.insert("add_bos_token".into(), json!(self.adds_bos()));
        config.insert("add_eos_token".into(), json!(false));
        let names = [
            ("bos_token", self.bos_id),
            ("eos_token", self.eos_ids.first().copied()),
            ("pad_token", self.pad_id),
            ("unk_token", self.unk_id),
        ];
        for (key, id) in names {
            if let Some(id) = id {
                config.insert(key.into(), json!(self.token_string(id, key)?));
            }
        }
        if let Some(template) = &self.chat_template {
            config.insert("chat_template".into(), json!(template));
        }
        if let Some(n) = self.model_max_length {
            config.insert("model_max_length".into(), json!(n));
        }
        let mut added: Vec<_> = self.tok.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        let decoder: Map<String, Json> = added
            .into_iter()
            .map(|(id, t)| {
                let entry = json!({
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                });
                (id.to_string(), entry)
            })
            .collect();
        config.insert("added_tokens_decoder".into(), Json::Object(decoder));
        let text = serde_json::to_string_pretty(&Json::Object(config))
            .context("cannot serialize tokenizer_config.json")?;
        write(&dir.join("tokenizer_config.json"), &text)?;

        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            match &self.chat_template {
                Some(template) => write(&jinja, template)?,
                None => std::fs::remove_file(&jinja)
                    .with_context(|| format!("cannot remove the stale {}", jinja.display()))?,
            }
        }
        Ok(())
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Parses a JSON file; `None` if it does not exist.
fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(value))
}

/// A special-token name: a string, an AddedToken-like `{"content": ...}` object, or null/absent.
fn token_name(config: &Json, key: &str, where_: &str) -> Result<Option<String>> {
    match config.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => bail!("{where_}: {key} is an object without a string \"content\""),
        },
        Some(other) => bail!("{where_}: {key} should be a string or an object, found {other}"),
    }
}

/// The chat template: a string, or the "default" entry of a list of `{name, template}`.
fn chat_template(config: &Json, where_: &str) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let name = entry.get("name").and_then(Json::as_str);
                let template = entry.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => bail!("{where_}: chat_template entries need a string name and template"),
                }
            }
            tracing::warn!(
                "{where_}: no chat template is named \"default\" (found: {}); using none",
                names.join(", ")
            );
            Ok(None)
        }
        Some(other) => bail!("{where_}: chat_template should be a string or a list, found {other}"),
    }
}

/// An id field that may be an integer, a list of integers, or null.
fn id_list(value: Option<&Json>, key: &str, where_: &str) -> Result<Vec<u32>> {
    let one = |v: &Json| -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| anyhow!("{where_}: {key} has {v}, which is not a token id"))
    };
    match value {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}
