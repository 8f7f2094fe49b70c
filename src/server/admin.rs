//! Models, adapter admin, health and metrics routes.

use super::errors::ApiError;
use super::openai::parse_body;
use super::{Caller, Shared};
use crate::adapters::AdapterSummary;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde::Deserialize;
use serde_json::json;

/// `GET /v1/models`: the base and every adapter (adapters with `parent` = the base id); the base's
/// entry carries `sampling_defaults`.
pub async fn models(State(state): State<Shared>) -> Response {
    let base = state.base_id().to_string();
    let card = |id: &str, parent: Option<&str>| {
        json!({"id": id, "object": "model", "created": state.started, "owned_by": "loraplex",
               "root": base, "parent": parent})
    };
    // The base's card (or the merged model's) also says what omitted sampling fields default to.
    let base_card = |id: &str| {
        let mut c = card(id, None);
        c["sampling_defaults"] = json!(state.sampling);
        c
    };
    let data = match &state.merged {
        Some(m) => vec![base_card(&m.name)],
        None => {
            let mut d = vec![base_card(&base)];
            for a in state.adapters.list().await {
                d.push(card(&a.name, Some(&base)));
            }
            d
        }
    };
    Json(json!({"object": "list", "data": data})).into_response()
}

/// An adapter's summary as `caller` may see it: the absolute path for the admin key only.
fn shown(state: &Shared, caller: Caller, mut s: AdapterSummary) -> AdapterSummary {
    if !caller.admin {
        s.path = state.adapters.shown_path(&s.path);
    }
    s
}

pub async fn list_adapters(
    State(state): State<Shared>,
    caller: Option<Extension<Caller>>,
) -> Response {
    let caller = caller.map(|c| c.0).unwrap_or_default();
    let data: Vec<AdapterSummary> = state
        .adapters
        .list()
        .await
        .into_iter()
        .map(|s| shown(&state, caller, s))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    name: String,
    path: String,
}

fn merged_refusal(state: &Shared) -> Result<(), ApiError> {
    match &state.merged {
        Some(m) => Err(ApiError::invalid(
            None,
            format!(
                "this server runs `{}` merged; adapters cannot be changed",
                m.name
            ),
        )),
        None => Ok(()),
    }
}

/// An adapter under the base model's name could never be reached (`"model": NAME` means the
/// base): refused.
fn not_the_base_name(state: &Shared, name: &str) -> Result<(), ApiError> {
    match name == state.base_id() {
        true => Err(ApiError::invalid(
            Some("name"),
            format!("`{name}` is the base model's name; register the adapter under another name"),
        )),
        false => Ok(()),
    }
}

/// `POST /v1/adapters {name, path}`: register (or replace) and load an adapter.
pub async fn register_adapter(
    State(state): State<Shared>,
    caller: Option<Extension<Caller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    merged_refusal(&state)?;
    let b: RegisterBody = parse_body(&body)?;
    not_the_base_name(&state, &b.name)?;
    let summary = state.adapters.register(&b.name, &b.path).await?;
    tracing::info!(adapter = %b.name, path = %summary.path.display(), "adapter registered");
    let caller = caller.map(|c| c.0).unwrap_or_default();
    Ok(Json(shown(&state, caller, summary)).into_response())
}

/// `DELETE /v1/adapters/{name}`.
pub async fn delete_adapter(
    State(state): State<Shared>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(|e| {
        ApiError::invalid(
            Some("name"),
            format!("the adapter name in the path is not valid: {e}"),
        )
    })?;
    merged_refusal(&state)?;
    state
        .adapters
        .remove(&name)
        .await
        .map_err(|_| ApiError::not_found(format!("adapter `{name}` does not exist")))?;
    Ok(Json(json!({"name": name, "deleted": true})).into_response())
}

#[derive(Deserialize)]
struct VllmLoad {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct VllmUnload {
    lora_name: String,
}

/// vLLM's `POST /v1/load_lora_adapter {lora_name, lora_path}`.
pub async fn vllm_load(State(state): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    merged_refusal(&state)?;
    let b: VllmLoad = parse_body(&body)?;
    not_the_base_name(&state, &b.lora_name)?;
    state.adapters.register(&b.lora_name, &b.lora_path).await?;
    Ok(format!(
        "Success: LoRA adapter '{}' added successfully.",
        b.lora_name
    )
    .into_response())
}

/// vLLM's `POST /v1/unload_lora_adapter {lora_name}`.
pub async fn vllm_unload(State(state): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    merged_refusal(&state)?;
    let b: VllmUnload = parse_body(&body)?;
    state
        .adapters
        .remove(&b.lora_name)
        .await
        .map_err(|_| ApiError::not_found(format!("adapter `{}` does not exist", b.lora_name)))?;
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        b.lora_name
    )
    .into_response())
}

pub async fn health(State(state): State<Shared>) -> Response {
    Json(json!({"status": "ok", "model": state.base_id(), "waiting": state.engine.waiting()}))
        .into_response()
}

pub async fn metrics(State(state): State<Shared>) -> Response {
    // Refresh cache gauges before rendering.
    let _ = state.adapters.list().await;
    let memory = &state.metrics.device_memory;
    // Paged, the whole pool is allocated at start; otherwise the running caches hold theirs.
    let pool = state.engine_metrics.kv_pool_bytes.get();
    let kv = match pool {
        0 => state.engine_metrics.kv_cache_bytes.get(),
        _ => pool,
    };
    memory.with_label_values(&["kv"]).set(kv);
    memory
        .with_label_values(&["adapters"])
        .set(state.adapters.bytes_on_device() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn fallback() -> ApiError {
    ApiError::not_found("no such route")
}
