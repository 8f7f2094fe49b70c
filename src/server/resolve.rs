//! Which weights a request runs on: `model` = the base id (no adapter), an adapter's name, or the
//! `adapters` body extension (a weighted stack); in merged mode only the merged model.

use super::errors::ApiError;
use super::openai::CommonParams;
use super::AppState;
use crate::lora::LoraStack;
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

pub async fn resolve(state: &AppState, p: &CommonParams) -> Result<Resolved, ApiError> {
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
        let mut members = Vec::with_capacity(list.len());
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
