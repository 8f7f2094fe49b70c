//! The combination methods of adapter arithmetic (PEFT's `combination_type`s) and their
//! parameters: parsing, the checks a request or the command line gets (each parameter the method
//! needs, in range, and none it does not use), and the text that keys a combination in a cache.

use std::fmt;
use std::str::FromStr;

/// A PEFT `combination_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Combination {
    Cat,
    Linear,
    Ties,
    MagnitudePrune,
    DareLinear,
    DareTies,
    Svd,
    TiesSvd,
    MagnitudePruneSvd,
    DareLinearSvd,
    DareTiesSvd,
}

/// How the per-adapter tensors of one module become one (`lora::combine` does it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Reduction {
    Sum,
    MagnitudePrune,
    Ties,
    DareLinear,
    DareTies,
}

impl Combination {
    pub const ALL: [Self; 11] = [
        Self::Cat,
        Self::Linear,
        Self::Ties,
        Self::MagnitudePrune,
        Self::DareLinear,
        Self::DareTies,
        Self::Svd,
        Self::TiesSvd,
        Self::MagnitudePruneSvd,
        Self::DareLinearSvd,
        Self::DareTiesSvd,
    ];

    /// PEFT's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cat => "cat",
            Self::Linear => "linear",
            Self::Ties => "ties",
            Self::MagnitudePrune => "magnitude_prune",
            Self::DareLinear => "dare_linear",
            Self::DareTies => "dare_ties",
            Self::Svd => "svd",
            Self::TiesSvd => "ties_svd",
            Self::MagnitudePruneSvd => "magnitude_prune_svd",
            Self::DareLinearSvd => "dare_linear_svd",
            Self::DareTiesSvd => "dare_ties_svd",
        }
    }

    pub(super) fn reduction(self) -> Reduction {
        match self {
            Self::Cat | Self::Linear | Self::Svd => Reduction::Sum,
            Self::Ties | Self::TiesSvd => Reduction::Ties,
            Self::MagnitudePrune | Self::MagnitudePruneSvd => Reduction::MagnitudePrune,
            Self::DareLinear | Self::DareLinearSvd => Reduction::DareLinear,
            Self::DareTies | Self::DareTiesSvd => Reduction::DareTies,
        }
    }

    /// Ends in a truncated SVD of the combined delta.
    pub fn is_svd(self) -> bool {
        self.name().ends_with("svd")
    }

    /// Prunes, so needs a `density`.
    pub fn uses_density(self) -> bool {
        self.reduction() != Reduction::Sum
    }

    /// Elects a sign per entry (`majority_sign_method`).
    pub fn uses_sign(self) -> bool {
        matches!(self.reduction(), Reduction::Ties | Reduction::DareTies)
    }

    /// Draws random masks (`seed`).
    pub fn is_random(self) -> bool {
        matches!(
            self.reduction(),
            Reduction::DareLinear | Reduction::DareTies
        )
    }

    /// Reduces A and B separately, which needs one rank for all adapters.
    pub fn needs_equal_ranks(self) -> bool {
        !self.is_svd() && self != Self::Cat
    }
}

impl fmt::Display for Combination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Combination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|c| c.name()).collect();
                format!("unknown combination `{s}` (one of: {})", names.join(", "))
            })
    }
}

/// TIES' sign election.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum MajoritySign {
    /// The sign of the entries' sum.
    #[default]
    Total,
    /// The sign of the sum of their signs (the more frequent sign).
    Frequency,
}

impl MajoritySign {
    pub fn name(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::Frequency => "frequency",
        }
    }
}

impl FromStr for MajoritySign {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            _ => Err(format!(
                "unknown majority_sign_method `{s}` (total or frequency)"
            )),
        }
    }
}

/// A combination and its parameters; `None` means "not given" (so that a parameter the method
/// does not use is refused instead of silently ignored).
#[derive(Clone, Debug, PartialEq)]
pub struct CombineOptions {
    pub combination: Combination,
    /// The fraction each adapter keeps when pruning, in (0, 1].
    pub density: Option<f64>,
    /// The rank of an `_svd` result (default: the largest member rank).
    pub svd_rank: Option<usize>,
    /// TIES' sign election (default `total`).
    pub majority_sign: Option<MajoritySign>,
    /// The seed of DARE's masks (default 0).
    pub seed: Option<u64>,
}

/// A combination parameter that is missing, out of range or meaningless for the method.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct OptionError {
    /// The parameter: `combination`, `density`, `svd_rank`, `majority_sign_method` or `seed`.
    pub option: &'static str,
    pub message: String,
}

fn option_error(option: &'static str, message: String) -> OptionError {
    OptionError { option, message }
}

impl CombineOptions {
    /// The combination with no parameters given.
    pub fn new(combination: Combination) -> Self {
        Self {
            combination,
            density: None,
            svd_rank: None,
            majority_sign: None,
            seed: None,
        }
    }

    /// Checks that each parameter the method needs is given and in range, and that none it
    /// does not use is given.
    pub fn validate(&self) -> Result<(), OptionError> {
        let c = self.combination;
        match (self.density, c.uses_density()) {
            (None, true) => {
                return Err(option_error(
                    "density",
                    format!("`{c}` needs a density: the fraction of each adapter's entries to keep, in (0, 1]"),
                ))
            }
            (Some(d), true) if !(d > 0.0 && d <= 1.0) => {
                return Err(option_error(
                    "density",
                    format!("density must be in (0, 1] (got {d})"),
                ))
            }
            (Some(_), false) => {
                return Err(option_error(
                    "density",
                    format!("density does not apply to `{c}` (only ties, magnitude_prune, dare_linear, dare_ties and their _svd variants prune)"),
                ))
            }
            _ => {}
        }
        match (self.svd_rank, c.is_svd()) {
            (Some(0), true) => {
                return Err(option_error(
                    "svd_rank",
                    "svd_rank must be at least 1".into(),
                ))
            }
            (Some(_), false) => {
                return Err(option_error(
                    "svd_rank",
                    format!("svd_rank does not apply to `{c}` (only to svd and the _svd variants)"),
                ))
            }
            _ => {}
        }
        if self.majority_sign.is_some() && !c.uses_sign() {
            return Err(option_error(
                "majority_sign_method",
                format!("majority_sign_method does not apply to `{c}` (only to ties, dare_ties and their _svd variants)"),
            ));
        }
        if self.seed.is_some() && !c.is_random() {
            return Err(option_error(
                "seed",
                format!("a seed does not apply to `{c}` (only the dare_* combinations draw random masks)"),
            ));
        }
        Ok(())
    }

    /// The method and the parameters that change its result, defaults filled in: the part of a
    /// cache key that is not the members.
    pub fn key(&self) -> String {
        let c = self.combination;
        let mut k = c.name().to_string();
        if c.uses_density() {
            k += &format!(";density={:?}", self.density.unwrap_or(1.0));
        }
        if c.is_svd() {
            match self.svd_rank {
                Some(r) => k += &format!(";svd_rank={r}"),
                None => k += ";svd_rank=max",
            }
        }
        if c.uses_sign() {
            k += &format!(";sign={}", self.majority_sign.unwrap_or_default().name());
        }
        if c.is_random() {
            k += &format!(";seed={}", self.seed.unwrap_or(0));
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(c: Combination, density: Option<f64>) -> CombineOptions {
        CombineOptions {
            density,
            ..CombineOptions::new(c)
        }
    }

    #[test]
    fn names_round_trip_and_unknown_is_an_error() {
        for c in Combination::ALL {
            assert_eq!(c.name().parse::<Combination>().unwrap(), c);
        }
        let e = "tie".parse::<Combination>().unwrap_err();
        assert!(e.contains("ties") && e.contains("dare_linear"), "{e}");
        assert!("majority".parse::<MajoritySign>().is_err());
    }

    #[test]
    fn options_are_checked_per_method() {
        use Combination::*;
        assert!(opts(Ties, Some(0.5)).validate().is_ok());
        assert!(opts(Linear, None).validate().is_ok());
        for (o, option) in [
            (opts(Ties, None), "density"),
            (opts(Ties, Some(0.0)), "density"),
            (opts(Ties, Some(1.5)), "density"),
            (opts(Ties, Some(f64::NAN)), "density"),
            (opts(Linear, Some(0.5)), "density"),
            (
                CombineOptions {
                    svd_rank: Some(0),
                    ..CombineOptions::new(Svd)
                },
                "svd_rank",
            ),
            (
                CombineOptions {
                    svd_rank: Some(4),
                    ..CombineOptions::new(Linear)
                },
                "svd_rank",
            ),
            (
                CombineOptions {
                    majority_sign: Some(MajoritySign::Frequency),
                    ..opts(MagnitudePrune, Some(0.5))
                },
                "majority_sign_method",
            ),
            (
                CombineOptions {
                    seed: Some(3),
                    ..opts(Ties, Some(0.5))
                },
                "seed",
            ),
        ] {
            assert_eq!(o.validate().unwrap_err().option, option, "{o:?}");
        }
        // Defaults are spelled out in the key; parameters of other methods are not in it.
        assert_eq!(
            opts(DareTies, Some(0.5)).key(),
            "dare_ties;density=0.5;sign=total;seed=0"
        );
        assert_eq!(CombineOptions::new(Svd).key(), "svd;svd_rank=max");
    }
}
