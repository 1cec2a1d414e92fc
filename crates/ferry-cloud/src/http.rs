//! ferry-cloud's HTTP surface (axum, plain HTTP on `server.http_addr`): probes and metrics for
//! the orchestrator and Prometheus.
//!
//! - `GET /healthz`: 200 while the process answers (liveness).
//! - `GET /readyz`: 200 once the models are loaded and ferry-cloud is not draining; 503
//!   (`loading` or `draining`) otherwise (readiness).
//! - `GET /metrics`: Prometheus text of every `ferry_cloud_*` metric (see [`crate::metrics`]).
//!
//! The handlers and the token middleware are the daemon kit's (`ferry_daemon::http`), shared with
//! ferryd.
//!
//! With `auth.tokens_file` set, `/metrics` needs `Authorization: Bearer <token>` (the same
//! tokens as gRPC); the probes stay open: they reveal nothing and kubelets send no tokens.

use std::sync::Arc;

use axum::Router;

use ferry_daemon::http::{behind_token, metrics_routes, plain_refusal, probe_routes};

use crate::service::CloudState;

/// The HTTP router: `/metrics` behind the token check, the probes open.
pub fn router(state: Arc<CloudState>) -> Router {
    behind_token(metrics_routes(state.clone()), state.clone(), plain_refusal)
        .merge(probe_routes(state))
}
