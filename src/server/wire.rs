//! HTTP hygiene around the routes: request bodies are read whole with a size cap (413) and a
//! read timeout (408) before any handler runs, and every error response leaves in the OpenAI
//! shape, `{"error": {"message", "type", "param", "code"}}` — including axum's own refusals
//! (405 with an empty body, path rejections in plain text, ...).

use super::errors::ApiError;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// Limits on request bodies (`ServeConfig::max_body_bytes`, `body_read_timeout_secs`).
#[derive(Clone, Debug)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub read_timeout: Duration,
}

fn too_large(max: usize) -> ApiError {
    let mut e = ApiError::invalid(
        None,
        format!("the request body is larger than the limit of {max} bytes"),
    );
    e.status = StatusCode::PAYLOAD_TOO_LARGE;
    e.code = Some("payload_too_large");
    e
}

/// Reads the whole request body (capped, timed) and hands the handlers a buffered one.
pub async fn buffer_body(
    State(limits): State<Arc<BodyLimits>>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return too_large(limits.max_bytes).into_response();
    }
    let max = limits.max_bytes;
    let read = async move {
        let mut stream = body.into_data_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::invalid(None, format!("the request body could not be read: {e}"))
            })?;
            if buf.len() + chunk.len() > max {
                return Err(too_large(max));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    };
    let bytes = match tokio::time::timeout(limits.read_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return e.into_response(),
        Err(_) => {
            let mut e = ApiError::invalid(
                None,
                format!(
                    "the request body did not arrive within {:.1} s",
                    limits.read_timeout.as_secs_f64()
                ),
            );
            e.status = StatusCode::REQUEST_TIMEOUT;
            e.code = Some("request_timeout");
            let mut resp = e.into_response();
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Longest request URI accepted (beyond: 414).
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most bytes of header names and values in a request (beyond: 431). Hyper refuses heads much
/// larger than this before they are parsed (`conn`); this check makes the limit exact.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Refuses requests whose URI or headers are over the limits, with an OpenAI error.
pub async fn head_limits(req: Request, next: Next) -> Response {
    let uri = req.uri().to_string().len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    let refuse = |status: StatusCode, code: &'static str, message: String| {
        let mut e = ApiError::invalid(None, message);
        e.status = status;
        e.code = Some(code);
        e.into_response()
    };
    if uri > MAX_URI_BYTES {
        return refuse(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request URI has {uri} bytes; the limit is {MAX_URI_BYTES}"),
        );
    }
    if headers > MAX_HEADER_BYTES {
        return refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the request headers have {headers} bytes; the limit is {MAX_HEADER_BYTES}"),
        );
    }
    next.run(req).await
}

fn is_json(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The OpenAI error `type` and `code` for a status the routes did not phrase themselves.
fn kind_of(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::UNAUTHORIZED => ("authentication_error", "invalid_api_key"),
        StatusCode::NOT_FOUND => ("invalid_request_error", "not_found"),
        StatusCode::METHOD_NOT_ALLOWED => ("invalid_request_error", "method_not_allowed"),
        StatusCode::REQUEST_TIMEOUT => ("invalid_request_error", "request_timeout"),
        StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", "payload_too_large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("invalid_request_error", "unsupported_media_type"),
        StatusCode::TOO_MANY_REQUESTS => ("rate_limit_error", "too_many_requests"),
        s if s.is_server_error() => ("server_error", "internal_error"),
        _ => ("invalid_request_error", "invalid_request"),
    }
}

/// Rewrites any error response that is not JSON into an OpenAI error body with the same status
/// and headers (`Allow`, `Retry-After`, ...). The routes' own errors are JSON already.
pub async fn openai_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&resp) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 1 << 16)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match (status, text.is_empty()) {
        (StatusCode::METHOD_NOT_ALLOWED, _) => {
            let allow = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            format!("{method} is not allowed on {path} (allowed: {allow})")
        }
        (_, false) => text,
        (_, true) => status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string(),
    };
    let (kind, code) = kind_of(status);
    let mut e = ApiError::invalid(None, message);
    e.status = status;
    e.kind = kind;
    e.code = Some(code);
    let fresh = e.into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRANSFER_ENCODING);
    for (name, value) in fresh.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    Response::from_parts(parts, fresh.into_body())
}
