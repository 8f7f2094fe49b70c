//! Sampling defaults: what a request that leaves out `temperature`, `top_p`, `top_k` or
//! `max_tokens` gets. As vLLM does, each field comes from the model's `generation_config.json`
//! when it sets it, else from the server config's `[sampling]` table, else from OpenAI's defaults
//! (temperature 1, top_p 1, no top-k, up to the context's end). The default model has no
//! `generation_config.json` in its GGUF; its card's recommendation stands in for it.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Defaults for the sampling fields a request may leave out; `None` = not set at this level.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingDefaults {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// -1 or 0: no top-k.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    /// Cut to what the context leaves after the prompt, never refused for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
}

/// The subset of HF's `generation_config.json` that sets sampling defaults.
#[derive(Deserialize, Default)]
struct HfGenerationConfig {
    do_sample: Option<bool>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    max_new_tokens: Option<i64>,
}

/// What SmolLM2-135M-Instruct's model card recommends (its GGUF carries no generation config).
pub const DEFAULT_MODEL_RECOMMENDED: SamplingDefaults = SamplingDefaults {
    temperature: Some(0.2),
    top_p: Some(0.9),
    top_k: None,
    max_tokens: None,
};

impl SamplingDefaults {
    /// Fields of `self`, each filled from `fallback` where `self` leaves it unset.
    pub fn or(self, fallback: SamplingDefaults) -> SamplingDefaults {
        SamplingDefaults {
            temperature: self.temperature.or(fallback.temperature),
            top_p: self.top_p.or(fallback.top_p),
            top_k: self.top_k.or(fallback.top_k),
            max_tokens: self.max_tokens.or(fallback.max_tokens),
        }
    }

    /// The defaults an HF `generation_config.json` sets (`do_sample: false` means greedy, as in
    /// transformers, whatever its temperature). A folder without the file sets none.
    pub fn from_generation_config(model_dir: &Path) -> Result<SamplingDefaults> {
        let path = model_dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(SamplingDefaults::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let g: HfGenerationConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid generation config", path.display()))?;
        let d = SamplingDefaults {
            temperature: match g.do_sample {
                Some(false) => Some(0.0),
                _ => g.temperature,
            },
            top_p: g.top_p,
            top_k: g.top_k,
            max_tokens: g.max_new_tokens,
        };
        d.validate()
            .with_context(|| format!("{} sets an unusable default", path.display()))?;
        Ok(d)
    }

    /// Refuses values no request could carry, naming the field.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.temperature {
            anyhow::ensure!(
                t.is_finite() && (0.0..=2.0).contains(&t),
                "temperature must be between 0 and 2 (got {t})"
            );
        }
        if let Some(p) = self.top_p {
            anyhow::ensure!(
                (crate::sampling::MIN_TOP_P..=1.0).contains(&p),
                "top_p must be in [{}, 1] (got {p})",
                crate::sampling::MIN_TOP_P
            );
        }
        if let Some(k) = self.top_k {
            anyhow::ensure!(
                k >= -1,
                "top_k must be positive, or -1 / 0 to disable (got {k})"
            );
        }
        if let Some(m) = self.max_tokens {
            anyhow::ensure!(m >= 1, "max_tokens must be at least 1 (got {m})");
        }
        Ok(())
    }

    /// One line for the start-up log: each field set and where it came from.
    pub fn describe(&self, model: &SamplingDefaults, config: &SamplingDefaults) -> String {
        let src = |m: bool, c: bool| match (m, c) {
            (true, _) => "model",
            (false, true) => "config",
            _ => "OpenAI default",
        };
        let mut parts = Vec::new();
        let fmt = |v: Option<String>, unset: &str| v.unwrap_or_else(|| unset.to_string());
        parts.push(format!(
            "temperature {} ({})",
            fmt(self.temperature.map(|v| v.to_string()), "1"),
            src(model.temperature.is_some(), config.temperature.is_some())
        ));
        parts.push(format!(
            "top_p {} ({})",
            fmt(self.top_p.map(|v| v.to_string()), "1"),
            src(model.top_p.is_some(), config.top_p.is_some())
        ));
        parts.push(format!(
            "top_k {} ({})",
            fmt(self.top_k.map(|v| v.to_string()), "off"),
            src(model.top_k.is_some(), config.top_k.is_some())
        ));
        parts.push(format!(
            "max_tokens {} ({})",
            fmt(
                self.max_tokens.map(|v| v.to_string()),
                "to the context's end"
            ),
            src(model.max_tokens.is_some(), config.max_tokens.is_some())
        ));
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_first_then_config_then_unset() {
        let model = SamplingDefaults {
            temperature: Some(0.6),
            ..Default::default()
        };
        let config = SamplingDefaults {
            temperature: Some(0.2),
            top_p: Some(0.9),
            ..Default::default()
        };
        let d = model.or(config);
        assert_eq!(d.temperature, Some(0.6));
        assert_eq!(d.top_p, Some(0.9));
        assert_eq!(d.top_k, None);
        assert!(d
            .describe(&model, &config)
            .contains("temperature 0.6 (model)"));
        assert!(d.describe(&model, &config).contains("top_p 0.9 (config)"));
        assert!(d
            .describe(&model, &config)
            .contains("top_k off (OpenAI default)"));
    }

    #[test]
    fn generation_config_json_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            SamplingDefaults::from_generation_config(dir.path()).unwrap(),
            SamplingDefaults::default()
        );
        let write = |s: &str| std::fs::write(dir.path().join("generation_config.json"), s).unwrap();
        write(
            r#"{"bos_token_id": 1, "do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 40, "max_new_tokens": 64}"#,
        );
        let d = SamplingDefaults::from_generation_config(dir.path()).unwrap();
        assert_eq!(
            d,
            SamplingDefaults {
                temperature: Some(0.6),
                top_p: Some(0.9),
                top_k: Some(40),
                max_tokens: Some(64)
            }
        );
        write(r#"{"do_sample": false, "temperature": 0.6}"#);
        let d = SamplingDefaults::from_generation_config(dir.path()).unwrap();
        assert_eq!(d.temperature, Some(0.0));
        write(r#"{"temperature": 7.0}"#);
        let e = SamplingDefaults::from_generation_config(dir.path()).unwrap_err();
        assert!(
            format!("{e:#}").contains("temperature must be between 0 and 2"),
            "{e:#}"
        );
        write("{not json");
        assert!(SamplingDefaults::from_generation_config(dir.path()).is_err());
    }
}
