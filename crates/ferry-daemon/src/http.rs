//! The HTTP surface both daemons share (axum): the probes an orchestrator polls and the
//! `/metrics` Prometheus scrapes, and the bearer-token middleware for whatever else a daemon
//! serves there.
//!
//! - `GET /healthz`: 200 while the process answers (liveness).
//! - `GET /readyz`: 200 once the models are loaded and the daemon is not draining; 503
//!   (`loading` or `draining`) otherwise (readiness).
//! - `GET /metrics`: the Prometheus text of the process's recorder ([`crate::telemetry`]).
//!
//! Probes stay open (they reveal nothing, and kubelets send no tokens); `/metrics` goes behind
//! [`behind_token`], with the same tokens as gRPC.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use ferry_core::Error;

use crate::auth::AppName;
use crate::Daemon;

/// `/healthz` and `/readyz`.
pub fn probe_routes<D: Daemon, S: Clone + Send + Sync + 'static>(daemon: Arc<D>) -> Router<S> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<D>))
        .with_state(daemon)
}

/// `/metrics`: the daemon's gauges refreshed, then the recorder's text.
pub fn metrics_routes<D: Daemon, S: Clone + Send + Sync + 'static>(daemon: Arc<D>) -> Router<S> {
    Router::new()
        .route("/metrics", get(metrics_text::<D>))
        .with_state(daemon)
}

/// `routes` behind the bearer-token check (when the daemon's auth is on): a caller's app name
/// goes into the request's extensions as [`AppName`]; a refusal is counted by
/// [`Daemon::token_refused`], rendered by `refusal` (its status from the error) and carries
/// `WWW-Authenticate: Bearer`.
pub fn behind_token<D: Daemon, S: Clone + Send + Sync + 'static>(
    routes: Router<S>,
    daemon: Arc<D>,
    refusal: fn(Error) -> Response,
) -> Router<S> {
    routes.route_layer(axum::middleware::from_fn_with_state(
        Gate { daemon, refusal },
        require_token::<D>,
    ))
}

/// A refusal as plain text: the error's HTTP status and message.
pub fn plain_refusal(e: Error) -> Response {
    let status = StatusCode::from_u16(e.kind().http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
    (status, format!("{e}\n")).into_response()
}

struct Gate<D> {
    daemon: Arc<D>,
    refusal: fn(Error) -> Response,
}

impl<D> Clone for Gate<D> {
    fn clone(&self) -> Self {
        Gate {
            daemon: self.daemon.clone(),
            refusal: self.refusal,
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz<D: Daemon>(State(daemon): State<Arc<D>>) -> Response {
    if daemon.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if daemon.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading\n").into_response()
    }
}

async fn metrics_text<D: Daemon>(State(daemon): State<Arc<D>>) -> Response {
    daemon.refresh_gauges();
    (
        [(header::CONTENT_TYPE, crate::telemetry::CONTENT_TYPE)],
        crate::telemetry::render(),
    )
        .into_response()
}

async fn require_token<D: Daemon>(
    State(gate): State<Gate<D>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match gate.daemon.auth().check(value) {
        Ok(name) => {
            req.extensions_mut().insert(AppName(name));
            next.run(req).await
        }
        Err(e) => {
            gate.daemon.token_refused("http", &e);
            let mut r = (gate.refusal)(e);
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}
