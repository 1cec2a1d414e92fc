//! ferry-cloud's HTTP surface (axum, plain HTTP on `server.http_addr`): probes and metrics for
//! the orchestrator and Prometheus.
//!
//! - `GET /healthz`: 200 while the process answers (liveness).
//! - `GET /readyz`: 200 once the models are loaded and ferry-cloud is not draining; 503
//!   (`loading` or `draining`) otherwise (readiness).
//! - `GET /metrics`: Prometheus text of every `ferry_cloud_*` metric (see [`crate::metrics`]).
//!
//! With `auth.tokens_file` set, `/metrics` needs `Authorization: Bearer <token>` (the same
//! tokens as gRPC); the probes stay open: they reveal nothing and kubelets send no tokens.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::service::CloudState;

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<CloudState>>) -> Response {
    if state.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if state.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading\n").into_response()
    }
}

async fn metrics_text(State(state): State<Arc<CloudState>>) -> Response {
    crate::metrics::set_load_gauges(
        state.running(),
        state.in_system(),
        state.is_ready() && !state.is_draining(),
    );
    (
        [(header::CONTENT_TYPE, ferry_core::telemetry::CONTENT_TYPE)],
        ferry_core::telemetry::render(),
    )
        .into_response()
}

/// Refuses callers without a valid bearer token (when `auth.tokens_file` is set).
async fn require_token(
    State(state): State<Arc<CloudState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.auth.check(value) {
        Ok(_) => next.run(req).await,
        Err(e) => {
            crate::metrics::auth_refused("http");
            let status =
                StatusCode::from_u16(e.kind().http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            let mut r = (status, format!("{e}\n")).into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

/// The HTTP router: `/metrics` behind the token check, the probes open.
pub fn router(state: Arc<CloudState>) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .merge(protected)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}
