//! The HTTP surface of ferryd (axum): the OpenAI-compatible API, Prometheus metrics, and the
//! liveness/readiness probes.
//!
//! - `POST /v1/chat/completions`: streaming (SSE, `data: [DONE]` at the end) and non-streaming,
//!   with `usage`; image content parts as `data:` URLs. It drives the same code path as the gRPC
//!   `Generate` ([`InferenceService::start`]), so validation, routing, admission, energy and
//!   records behave identically. Routing metadata (tier, model, joules, fallback, reason) is in a
//!   `ferry` extension object of the response (the last chunk when streaming) and in `x-ferry-*`
//!   headers (non-streaming; a stream's headers leave before the outcome is known).
//! - `GET /v1/models`: the models ferryd can serve, plus `auto`.
//! - `GET /metrics`: Prometheus text exposition of every `ferry_*` metric.
//! - `GET /healthz` (the process answers) and `GET /readyz` (models loaded and router state
//!   restored, not draining).
//!
//! With `auth.tokens_file` set, the API and `/metrics` need `Authorization: Bearer <token>`
//! (401 with an OpenAI-style body otherwise); the probes stay open and reveal nothing.
//!
//! Errors are OpenAI-style bodies `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status of `ferry_core::ErrorKind`, the same mapping the gRPC API uses.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};

use ferry_core::{Error, ErrorKind};
use ferry_proto::v1 as pb;

use ferry_daemon::http::{behind_token, metrics_routes, probe_routes};

use crate::service::InferenceService;

/// Largest request body accepted (requests may carry images as data URLs).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// An OpenAI-style error response.
pub struct ApiError {
    kind: ErrorKind,
    message: String,
    param: Option<String>,
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let param = match &e {
            Error::InvalidArgument { field, .. } => Some(field.clone()),
            _ => None,
        };
        ApiError {
            kind: e.kind(),
            message: e.to_string(),
            param,
        }
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        ApiError {
            kind: ErrorKind::from_grpc_code(s.code()),
            message: s.message().to_string(),
            param: None,
        }
    }
}

impl ApiError {
    fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind.openai_type(),
                "param": self.param,
                "code": self.kind.as_str(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.kind.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

fn finish_reason(c: &pb::Completion) -> &'static str {
    match pb::FinishReason::try_from(c.finish_reason) {
        Ok(pb::FinishReason::Length) => "length",
        _ => "stop",
    }
}

fn tier(c: &pb::Completion) -> &'static str {
    match pb::Tier::try_from(c.tier) {
        Ok(pb::Tier::Cloud) => "cloud",
        _ => "local",
    }
}

/// The `ferry` extension object: where and how the request ran.
fn ferry_ext(c: &pb::Completion) -> Value {
    let energy = c.energy.clone().unwrap_or_default();
    let placement = c.placement.clone().unwrap_or_default();
    let latency = c.latency.unwrap_or_default();
    json!({
        "request_id": c.request_id,
        "tier": tier(c),
        "model": c.model,
        "joules": energy.joules,
        "energy_source": energy.source,
        "cost_usd": c.cost_usd,
        "fallback": placement.fallback,
        "reason": placement.reason,
        "modalities_sent": placement.modalities_sent,
        "latency_ms": {
            "queue": latency.queue_ms,
            "time_to_first_token": latency.time_to_first_token_ms,
            "total": latency.total_ms,
        },
    })
}

fn usage(c: &pb::Completion) -> Value {
    let u = c.usage.unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn header(v: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&v.to_string()).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

async fn chat_completions(
    State(svc): State<Arc<InferenceService>>,
    app: Option<axum::Extension<crate::auth::AppName>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let ferry_core::openai::ChatCall {
        request: proto,
        stream,
        include_usage,
    } = ferry_core::openai::parse_chat_request(&body)?;
    let requested_model = proto.model.clone();
    let id = proto.request_id.clone();
    let created = unix_s();
    let mut events = svc
        .start_with_deadline(proto, None, app.as_ref().map(|a| &a.0))
        .await?;

    if !stream {
        let mut text = String::new();
        let mut done = None;
        while let Some(item) = events.next().await {
            match item?.event {
                Some(pb::generate_response::Event::Delta(d)) => text.push_str(&d.text),
                Some(pb::generate_response::Event::Completion(c)) => done = Some(c),
                None => {}
            }
        }
        let c = done.ok_or_else(|| ApiError::from(Error::Engine("stream ended early".into())))?;
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": c.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(&c),
                "logprobs": null,
            }],
            "usage": usage(&c),
            "ferry": ferry_ext(&c),
        });
        let mut headers = HeaderMap::new();
        headers.insert("x-ferry-request-id", header(&c.request_id));
        headers.insert("x-ferry-tier", header(tier(&c)));
        headers.insert("x-ferry-model", header(&c.model));
        if let Some(j) = c.energy.as_ref().and_then(|e| e.joules) {
            headers.insert("x-ferry-joules", header(format!("{j:.6}")));
        }
        headers.insert(
            "x-ferry-fallback",
            header(c.placement.as_ref().is_some_and(|p| p.fallback)),
        );
        return Ok((headers, Json(body)).into_response());
    }

    let stream_id = header(&id);
    // Streaming: OpenAI's chunk sequence. The first chunk carries the role; the model id is the
    // one asked for until the completion names the one that served.
    let chunk = move |model: &str, delta: Value, finish: Option<&str>| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    };
    let first = chunk(
        &requested_model,
        json!({"role": "assistant", "content": ""}),
        None,
    );
    let sse = futures::stream::once(async move { first })
        .chain(events.map(move |item| match item {
            Ok(pb::GenerateResponse {
                event: Some(pb::generate_response::Event::Delta(d)),
            }) => chunk(&requested_model, json!({"content": d.text}), None),
            Ok(pb::GenerateResponse {
                event: Some(pb::generate_response::Event::Completion(c)),
            }) => {
                let mut last = chunk(&c.model, json!({}), Some(finish_reason(&c)));
                last["ferry"] = ferry_ext(&c);
                if include_usage {
                    last["usage"] = usage(&c);
                }
                last
            }
            Ok(_) => json!({}),
            // A failure after the stream began: an error object in the stream, as OpenAI does,
            // with the accounting of an interrupted offload (the x-ferry-* trailers) under `ferry`.
            Err(status) => {
                let accounting: serde_json::Map<String, serde_json::Value> = status
                    .metadata()
                    .iter()
                    .filter_map(|kv| match kv {
                        tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                            let k = k.as_str().strip_prefix("x-ferry-")?;
                            Some((k.replace('-', "_"), json!(v.to_str().ok()?)))
                        }
                        tonic::metadata::KeyAndValueRef::Binary(..) => None,
                    })
                    .collect();
                let mut body = ApiError::from(status).body();
                if !accounting.is_empty() {
                    body["ferry"] = serde_json::Value::Object(accounting);
                }
                body
            }
        }))
        .filter(|v| futures::future::ready(v.as_object().is_some_and(|o| !o.is_empty())))
        .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())))
        .chain(futures::stream::once(async {
            Ok::<_, Infallible>(Event::default().data("[DONE]"))
        }));
    let mut headers = HeaderMap::new();
    headers.insert("x-ferry-request-id", stream_id);
    Ok((headers, Sse::new(sse)).into_response())
}

async fn models(State(svc): State<Arc<InferenceService>>) -> Response {
    let state = svc.state();
    let created = unix_s();
    let mut data = vec![json!({
        "id": "auto",
        "object": "model",
        "created": created,
        "owned_by": "ferry",
        "ferry": {"routed": state.router().is_some()},
    })];
    for m in &state.manifests {
        let loaded = state.model(&m.id).is_some();
        data.push(json!({
            "id": m.id,
            "object": "model",
            "created": created,
            "owned_by": "ferry",
            "ferry": {"tier": m.tier.as_str(), "family": m.family, "loaded": loaded, "capabilities": m.capabilities},
        }));
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

/// A refused token, OpenAI-shaped like every other error of this API.
fn api_refusal(e: Error) -> Response {
    ApiError::from(e).into_response()
}

/// The HTTP router: the API and `/metrics` behind the token check, the probes open (the
/// probes, `/metrics` and the token check are the daemon kit's, shared with ferry-cloud).
pub fn router(svc: Arc<InferenceService>) -> Router {
    let state = svc.state().clone();
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .with_state(svc)
        .merge(metrics_routes(state.clone()));
    behind_token(api, state.clone(), api_refusal)
        .merge(probe_routes(state))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_is_openai_shaped() {
        let e: ApiError = Error::Overloaded("queue full".into()).into();
        let b = e.body();
        assert_eq!(b["error"]["type"], "rate_limit_error");
        assert_eq!(b["error"]["code"], "resource_exhausted");
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    }
}
