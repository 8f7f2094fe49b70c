//! `loraplex serve`: the OpenAI-compatible HTTP server (axum) in front of the engine.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, adapter admin
//! (`GET/POST /v1/adapters`, `DELETE /v1/adapters/{name}`, vLLM's `POST /v1/load_lora_adapter` and
//! `POST /v1/unload_lora_adapter`), `GET /health`, `GET /metrics`, and the web playground at `/`
//! (`playground`). Connections are served by `conn` (cap and timeouts); `wire` buffers request
//! bodies and keeps every error in the OpenAI shape.

mod admin;
mod completions;
pub mod config;
mod conn;
mod conn_io;
pub mod defaults;
mod errors;
mod metrics;
pub mod openai;
mod playground;
mod rate;
mod resolve;
mod stream;
mod wire;

pub use config::{KvLayout, ServeConfig};
pub use errors::ApiError;

use crate::adapters::{AdapterMetrics, AdapterRegistry};
use crate::engine::{EngineConfig, EngineHandle, EngineMetrics};
use crate::lora::AdapterSpec;
use crate::model::LoadedModel;
use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use metrics::ServerMetrics;
use std::sync::Arc;

/// The adapter merged into the base at start-up, if any.
#[derive(Clone, Debug)]
pub struct MergedMode {
    /// The name requests use for the merged model (the adapter's name).
    pub name: String,
}

/// Shared by every handler.
pub struct AppState {
    pub engine: EngineHandle,
    pub model: Arc<LoadedModel>,
    pub adapters: Arc<AdapterRegistry>,
    pub metrics: Arc<ServerMetrics>,
    pub engine_metrics: Arc<EngineMetrics>,
    pub merged: Option<MergedMode>,
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    pub started: u64,
    /// Finished requests per second, for `Retry-After`.
    pub rate: rate::ServiceRate,
    pub body_limits: Arc<wire::BodyLimits>,
    /// What requests that leave sampling fields out get (model, then `[sampling]`).
    pub sampling: defaults::SamplingDefaults,
}

/// Who is calling, as the auth middleware established it (in the request's extensions).
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    /// Holds the admin key (`admin_key`, or `api_key` when no admin key is set). With no key
    /// configured nobody is: absolute paths stay out of answers.
    pub admin: bool,
}

impl AppState {
    /// The id clients use for the base model.
    pub fn base_id(&self) -> &str {
        &self.model.id
    }
}

type Shared = Arc<AppState>;

/// The credentials of an `Authorization: Bearer KEY` header (the scheme is case-insensitive,
/// RFC 9110 §11.1).
fn bearer(req: &Request) -> Option<&str> {
    let value = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, key) = value.split_once(char::is_whitespace)?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// API keys: every `/v1` route needs `api_key` (or the admin key); adapter admin routes need
/// `admin_key` (or `api_key` when no admin key is set). Records the `Caller` for the handlers.
async fn auth(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !path.starts_with("/v1/") {
        return next.run(req).await;
    }
    let admin_cred = state.admin_key.as_deref().or(state.api_key.as_deref());
    let caller = Caller {
        admin: admin_cred.is_some() && bearer(&req) == admin_cred,
    };
    let admin = path == "/v1/load_lora_adapter"
        || path == "/v1/unload_lora_adapter"
        || (path.starts_with("/v1/adapters") && req.method() != Method::GET);
    let needed = match admin {
        true => state.admin_key.as_deref().or(state.api_key.as_deref()),
        false => state.api_key.as_deref(),
    };
    if let Some(key) = needed {
        match bearer(&req) {
            None => {
                return ApiError::unauthorized(
                    "missing API key: send `Authorization: Bearer <key>`",
                )
                .into_response()
            }
            // The admin key opens every route the API key opens.
            Some(k) if k != key && !caller.admin => {
                let what = if admin { "admin key" } else { "API key" };
                return ApiError::unauthorized(format!("invalid {what}")).into_response();
            }
            Some(_) => {}
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The router over a ready state (used by `serve` and by tests).
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completion))
        .route("/v1/models", get(admin::models))
        .route(
            "/v1/adapters",
            get(admin::list_adapters).post(admin::register_adapter),
        )
        .route("/v1/adapters/{name}", delete(admin::delete_adapter))
        .route("/v1/load_lora_adapter", post(admin::vllm_load))
        .route("/v1/unload_lora_adapter", post(admin::vllm_unload))
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .merge(playground::routes())
        .fallback(admin::fallback)
        // `wire::buffer_body` enforces `max_body_bytes` before any extractor runs.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.body_limits.clone(),
            wire::buffer_body,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(axum::middleware::from_fn(wire::head_limits))
        .layer(axum::middleware::from_fn(wire::openai_errors))
        .with_state(state)
}

/// The KV budget: as configured; else on a GPU 90% of the device memory free after loading
/// (the rest stays for activations and adapters); else on the CPU half the host memory still
/// available after loading (the rest stays for adapters, activations and everything else on the
/// machine), so that many long sequences make the newest wait or be preempted instead of the
/// process being killed; else (no figure) none.
fn kv_budget(cfg: &ServeConfig, model: &crate::model::LoadedModel) -> Result<Option<usize>> {
    if let Some(b) = cfg.kv_cache_bytes {
        return Ok(Some(usize::try_from(b).unwrap_or(usize::MAX)));
    }
    let device = model.llama.device();
    if device.is_cpu() {
        return Ok(crate::runtime::device::host_memory_available().map(|b| b / 2));
    }
    let free = crate::runtime::device::memory_info(device)?;
    Ok(free.map(|(free, _total)| free / 10 * 9))
}

/// The adapters' host tier cap: as configured, else 2 GiB with the base on a GPU (a reload is a
/// parse and an upload there) and none on the CPU (where it measured no gain).
fn host_tier_bytes(cfg: &ServeConfig, model: &crate::model::LoadedModel) -> u64 {
    let default = match model.llama.device().is_cpu() {
        true => 0,
        false => 2 << 30,
    };
    cfg.adapter_host_cache_bytes.unwrap_or(default)
}

/// Loads the model and adapters, starts the engine and builds the shared state.
pub async fn build_state(cfg: &ServeConfig) -> Result<Shared> {
    cfg.validate()?;
    let metrics = Arc::new(ServerMetrics::new()?);
    let model_spec = cfg.model.clone();
    let merges = cfg.merge.clone();
    let adapters_dir = cfg.adapters_dir.clone();
    let nf4 = cfg.quantize.settings(cfg.double_quant)?;
    let lm_head_nf4 = cfg.quantize_lm_head;
    let at = crate::runtime::device::placement(cfg.device, cfg.dtype)?;
    let (model, merged) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut model = crate::model::load_as(model_spec.as_deref(), &at)?;
        // Merge before quantizing: the merged weights are rounded to NF4 once.
        let merged = merge_at_startup(&mut model, &merges, &adapters_dir)?;
        model.quantize(nf4)?;
        model.quantize_lm_head(nf4, lm_head_nf4)?;
        Ok((model, merged))
    })
    .await??;
    let by_dtype = model.llama.bytes_by_dtype();
    for (dtype, b) in &by_dtype {
        tracing::info!("base weights: {dtype} {:.1} MB", *b as f64 / 1e6);
        metrics
            .base_bytes_by_dtype
            .with_label_values(&[dtype.as_str()])
            .set(*b as i64);
    }
    let bytes: usize = by_dtype.iter().map(|(_, b)| b).sum();
    metrics.base_bytes.set(bytes as i64);
    metrics
        .device_memory
        .with_label_values(&["weights"])
        .set(bytes as i64);
    let sampling = sampling_defaults(cfg, &model)?;
    let model = Arc::new(model);
    let adapter_metrics = Arc::new(AdapterMetrics::new(&metrics.registry)?);
    let adapters = Arc::new(
        AdapterRegistry::new(
            cfg.adapters_dir.clone(),
            cfg.allow_adapter_paths_outside,
            model.llama.cfg.clone(),
            model.llama.placement(),
            cfg.adapter_cache_bytes,
            adapter_metrics,
        )?
        .with_host_tier(host_tier_bytes(cfg, &model)),
    );
    let mut n = adapters.scan()?;
    if adapters.remove(&model.id).await.is_ok() {
        n -= 1;
        tracing::warn!(
            "adapter folder `{}` has the base model's name and cannot be served; rename it",
            model.id
        );
    }
    tracing::info!("{n} adapters registered from {}", adapters.dir().display());
    for name in &cfg.preload {
        adapters
            .get(name)
            .await
            .map_err(|e| anyhow::anyhow!("preload: {e}"))?;
    }
    let mut engine_metrics = EngineMetrics::new(&metrics.registry)?;
    if cfg.vllm_metrics {
        engine_metrics = engine_metrics.with_vllm(&metrics.registry, cfg.max_batch_size)?;
    }
    let engine_metrics = Arc::new(engine_metrics);
    let kv_budget_bytes = kv_budget(cfg, &model)?;
    let engine = EngineHandle::start(
        model.clone(),
        EngineConfig {
            max_batch_size: cfg.max_batch_size,
            max_waiting: cfg.max_waiting,
            prefill_chunk: cfg.prefill_chunk,
            kv_budget_bytes,
            prefix_cache_bytes: usize::try_from(cfg.prefix_cache_bytes).unwrap_or(usize::MAX),
            paged_kv: cfg.kv_layout.paged_on(model.llama.device()),
        },
        engine_metrics.clone(),
    );
    match (kv_budget_bytes, engine.kv_capacity()) {
        (Some(b), Some(positions)) => tracing::info!(
            "KV budget: {:.1} MB, {} blocks of {} positions ({positions} positions), {}",
            b as f64 / 1e6,
            positions / crate::engine::BLOCK_POSITIONS,
            crate::engine::BLOCK_POSITIONS,
            match cfg.kv_layout.paged_on(model.llama.device()) {
                true => "paged in one pool",
                false => "in per-sequence buffers",
            },
        ),
        _ => tracing::info!("KV budget: none (no memory figure for this device)"),
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Arc::new(AppState {
        engine,
        model,
        adapters,
        metrics,
        engine_metrics,
        merged,
        api_key: cfg.api_key.clone().filter(|k| !k.is_empty()),
        admin_key: cfg.admin_key.clone().filter(|k| !k.is_empty()),
        started,
        rate: rate::ServiceRate::new(),
        body_limits: Arc::new(wire::BodyLimits {
            max_bytes: cfg.max_body_bytes,
            read_timeout: ServeConfig::secs(cfg.body_read_timeout_secs),
        }),
        sampling,
    }))
}

/// The model's sampling defaults (its `generation_config.json`; for the default model, its
/// card's recommendation) over the config's `[sampling]`, logged with where each came from.
fn sampling_defaults(cfg: &ServeConfig, model: &LoadedModel) -> Result<defaults::SamplingDefaults> {
    use defaults::SamplingDefaults;
    let from_model = if !cfg.use_generation_config {
        SamplingDefaults::default()
    } else if model.path.is_dir() {
        SamplingDefaults::from_generation_config(&model.path)?
    } else if model.path.file_name() == Some(std::ffi::OsStr::new(crate::fetch::DEFAULT_MODEL_FILE))
    {
        defaults::DEFAULT_MODEL_RECOMMENDED
    } else {
        SamplingDefaults::default()
    };
    let d = from_model.or(cfg.sampling);
    // On stderr whatever the log level: answers depend on it.
    eprintln!(
        "loraplex: sampling defaults: {}",
        d.describe(&from_model, &cfg.sampling)
    );
    Ok(d)
}

/// `--merge name[:w]...`: folds those adapters (from the adapters directory) into the base.
fn merge_at_startup(
    model: &mut LoadedModel,
    merges: &[String],
    dir: &std::path::Path,
) -> Result<Option<MergedMode>> {
    if merges.is_empty() {
        return Ok(None);
    }
    let mut specs = Vec::new();
    for m in merges {
        let spec: AdapterSpec = m.parse()?;
        let name = spec.name()?;
        anyhow::ensure!(
            crate::adapters::valid_name(&name),
            "--merge: invalid adapter name `{name}`"
        );
        specs.push(AdapterSpec {
            dir: dir.join(&name),
            weight: spec.weight,
        });
    }
    let stack =
        crate::lora::LoraStack::load(&model.llama, &specs)?.context("no adapters to merge")?;
    let requantized = stack.merge_into(&mut model.llama)?;
    if let Some(w) = crate::lora::requantize_warning(requantized) {
        eprintln!("warning: {w}");
        tracing::warn!("{w}");
    }
    let name = stack.label();
    tracing::info!("serving `{name}` merged into the base");
    Ok(Some(MergedMode { name }))
}

/// Runs the server until SIGINT/SIGTERM.
pub async fn serve(cfg: ServeConfig) -> Result<()> {
    let state = build_state(&cfg).await?;
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
    let addr = listener.local_addr()?;
    let served = match &state.merged {
        Some(m) => format!("`{}` merged into {}", m.name, state.model.id),
        None => format!(
            "{} with adapters from {}",
            state.model.id,
            state.adapters.dir().display()
        ),
    };
    // One machine-readable line (tests and scripts read the port from it).
    let placement = state.model.llama.placement();
    println!(
        "loraplex listening on http://{addr} serving {served} on {} ({})",
        crate::runtime::device::describe(&placement.device),
        format!("{:?}", placement.dtype).to_lowercase()
    );
    let limits = conn::ConnLimits {
        max_connections: conn::connections_that_fit(cfg.max_connections),
        header_read_timeout: ServeConfig::secs(cfg.header_read_timeout_secs),
        keep_alive_timeout: ServeConfig::secs(cfg.keep_alive_timeout_secs),
    };
    let metrics = conn::ConnMetrics {
        open: state.metrics.open_connections.clone(),
        refused: state.metrics.refused_connections.clone(),
        timed_out: state.metrics.timed_out_connections.clone(),
    };
    conn::serve_connections(listener, router(state), limits, metrics, shutdown_signal()).await;
    eprintln!("loraplex: shut down");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
