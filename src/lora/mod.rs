//! PEFT LoRA adapters: config parsing and refusal of unsupported variants (`config`), loading,
//! validation against a base and writing back (`adapter`), the delta math — unmerged per row
//! group, stacked, or merged (`stack`) — and adapter arithmetic, PEFT's `add_weighted_adapter`
//! (the methods and their parameters in `combination`, the math in `combine`, the truncated SVD
//! in `svd`).

pub mod adapter;
pub mod combination;
pub mod combine;
pub mod config;
pub mod stack;
pub mod svd;
pub mod synthetic;

pub use adapter::{LoraAdapter, LoraModule};
pub use combination::{Combination, CombineOptions, MajoritySign, OptionError};
pub use combine::combine;
pub use config::PeftLoraConfig;
pub use stack::{requantize_warning, LoraPair, LoraStack};

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// An adapter named on the command line: `DIR[:WEIGHT]`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    pub dir: PathBuf,
    pub weight: f64,
}

impl std::str::FromStr for AdapterSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        // A trailing `:number` is a weight; anything else is part of the path.
        if let Some((dir, w)) = s.rsplit_once(':') {
            if let Ok(weight) = w.parse::<f64>() {
                if !weight.is_finite() {
                    bail!("adapter weight `{w}` is not a finite number");
                }
                if dir.is_empty() {
                    bail!("adapter `{s}`: missing directory before `:`");
                }
                return Ok(Self {
                    dir: PathBuf::from(dir),
                    weight,
                });
            }
        }
        if s.is_empty() {
            bail!("empty adapter path");
        }
        Ok(Self {
            dir: PathBuf::from(s),
            weight: 1.0,
        })
    }
}

impl AdapterSpec {
    /// The adapter's name: its folder name.
    pub fn name(&self) -> Result<String> {
        self.dir
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .with_context(|| format!("adapter path {} has no folder name", self.dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_spec_parsing() {
        let s: AdapterSpec = "adapters/legal:0.5".parse().unwrap();
        assert_eq!(s.weight, 0.5);
        assert_eq!(s.name().unwrap(), "legal");
        let s: AdapterSpec = "adapters/legal".parse().unwrap();
        assert_eq!(s.weight, 1.0);
        assert!("adapters/x:inf".parse::<AdapterSpec>().is_err());
        assert!(":0.5".parse::<AdapterSpec>().is_err());
    }
}
