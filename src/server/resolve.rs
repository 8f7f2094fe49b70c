//! Which weights a request runs on: `model` = the base id (no adapter), an adapter's name, or the
//! `adapters` body extension (a weighted stack, or with `combination` the adapters combined by
//! PEFT's arithmetic, computed once and cached); in merged mode only the merged model.

use super::errors::ApiError;
use super::openai::CommonParams;
use super::AppState;
use crate::lora::{Combination, CombineOptions, LoraStack};
use std::sync::Arc;

/// The largest |weight| of an adapter in a per-request stack (beyond it the delta swamps the
/// base and logits overflow).
const MAX_STACK_WEIGHT: f64 = 100.0;

/// The resolved adapter set of a request.
pub struct Resolved {
    pub lora: Option<Arc<LoraStack>>,
    /// Metrics/log label: `base`, the adapter name, or a stack's sorted names (`a+b`).
    pub label: String,
}

/// Most adapters in one stack.
pub const MAX_STACK: usize = 8;

/// The request's combination fields: `None` for the weighted stack (no `combination`, or `cat`).
fn combination(p: &CommonParams) -> Result<Option<CombineOptions>, ApiError> {
    let Some(name) = &p.combination else {
        let given = [
            ("density", p.density.is_some()),
            ("svd_rank", p.svd_rank.is_some()),
            ("majority_sign_method", p.majority_sign_method.is_some()),
            ("combination_seed", p.combination_seed.is_some()),
        ];
        if let Some((field, _)) = given.iter().find(|(_, set)| *set) {
            return Err(ApiError::invalid(
                Some(field),
                format!("`{field}` is a parameter of `combination`, which is not given"),
            ));
        }
        return Ok(None);
    };
    let combination: Combination = name
        .parse()
        .map_err(|e: String| ApiError::invalid(Some("combination"), e))?;
    let svd_rank = match p.svd_rank {
        None => None,
        Some(r) if r >= 1 => Some(r as usize),
        Some(r) => {
            return Err(ApiError::invalid(
                Some("svd_rank"),
                format!("svd_rank must be at least 1 (got {r})"),
            ))
        }
    };
    let majority_sign = match &p.majority_sign_method {
        None => None,
        Some(m) => Some(
            m.parse()
                .map_err(|e: String| ApiError::invalid(Some("majority_sign_method"), e))?,
        ),
    };
    let opts = CombineOptions {
        combination,
        density: p.density,
        svd_rank,
        majority_sign,
        seed: p.combination_seed,
    };
    opts.validate().map_err(|e| {
        let field = match e.option {
            "seed" => "combination_seed",
            other => other,
        };
        ApiError::invalid(Some(field), e.message.replace("a seed", "combination_seed"))
    })?;
    Ok((combination != Combination::Cat).then_some(opts))
}

pub async fn resolve(state: &AppState, p: &CommonParams) -> Result<Resolved, ApiError> {
    let combined = combination(p)?;
    if p.combination.is_some() && p.adapters.is_none() {
        return Err(ApiError::invalid(
            Some("combination"),
            "`combination` combines the adapters listed in `adapters`, which is not given",
        ));
    }
    if let Some(m) = &state.merged {
        if p.adapters.is_some() {
            return Err(ApiError::invalid(
                Some("adapters"),
                format!(
                    "this server runs `{}` merged into the base; adapter stacks are not available",
                    m.name
                ),
            ));
        }
        if p.model == m.name {
            return Ok(Resolved {
                lora: None,
                label: m.name.clone(),
            });
        }
        let mut e = ApiError::model_not_found(&p.model);
        e.message = format!(
            "The model `{}` is not served: this server runs `{}` merged into the base, and only `{}` is available",
            p.model, m.name, m.name
        );
        return Err(e);
    }
    if let Some(list) = &p.adapters {
        if list.is_empty() || list.len() > MAX_STACK {
            return Err(ApiError::invalid(
                Some("adapters"),
                format!("adapters takes 1 to {MAX_STACK} entries"),
            ));
        }
        if p.model != state.base_id() && !list.iter().any(|a| a.name == p.model) {
            return Err(ApiError::invalid(
                Some("model"),
                format!("with `adapters`, `model` must be the base model `{}` or one of the stacked adapters", state.base_id()),
            ));
        }
        for a in list {
            if !a.weight.is_finite() || a.weight.abs() > MAX_STACK_WEIGHT {
                return Err(ApiError::invalid(
                    Some("adapters"),
                    format!(
                        "adapter `{}`: weight must be a finite number within ±{MAX_STACK_WEIGHT} (got {})",
                        a.name, a.weight
                    ),
                ));
            }
        }
        if let Some(opts) = combined {
            let named: Vec<(String, f64)> =
                list.iter().map(|a| (a.name.clone(), a.weight)).collect();
            let cached = state.adapters.combined(&named, &opts).await?;
            // Metrics labels from a bounded set: the method and the sorted names.
            let mut names: Vec<&str> = list.iter().map(|a| a.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            return Ok(Resolved {
                lora: Some(cached.stack.clone()),
                label: format!("{}:{}", opts.combination, names.join("+")),
            });
        }
        let mut members = Vec::with_capacity(list.len());
        for a in list {
            let cached = state.adapters.get(&a.name).await?;
            members.push((cached.adapter.clone(), a.weight));
        }
        let layers = state.model.llama.cfg.num_hidden_layers;
        let at = state.model.llama.placement();
        let stack = tokio::task::spawn_blocking(move || LoraStack::new_on(members, layers, &at))
            .await
            .map_err(|e| ApiError::internal(format!("stack build failed: {e}")))?
            .map_err(|e| ApiError::invalid(Some("adapters"), format!("{e:#}")))?;
        // Metrics labels must come from a bounded set: the names, not the weights.
        let label = stack.names_label();
        return Ok(Resolved {
            lora: Some(Arc::new(stack)),
            label,
        });
    }
    if p.model == state.base_id() {
        return Ok(Resolved {
            lora: None,
            label: "base".into(),
        });
    }
    if !crate::adapters::valid_name(&p.model) {
        return Err(ApiError::model_not_found(&p.model));
    }
    let cached = state.adapters.get(&p.model).await?;
    Ok(Resolved {
        lora: Some(cached.stack.clone()),
        label: p.model.clone(),
    })
}
