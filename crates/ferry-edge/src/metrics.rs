//! ferryd's metrics: names, the Prometheus recorder behind `GET /metrics`, and the gauges read
//! from live state at scrape time.
//!
//! Every name starts with `ferry_`; labels are bounded (model ids come from the configured
//! manifests and the cloud zoo, endpoints from `cloud.endpoints`, tiers and outcomes from fixed
//! sets, energy sources from the probed kinds):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `ferry_requests_total` | counter | `tier`, `model`, `outcome` (`ok`, `cancelled`, `failed`, `shutdown`, `interrupted`) |
//! | `ferry_requests_rejected_total` | counter | `reason` (error kind: `invalid_argument`, `resource_exhausted`, ...) |
//! | `ferry_tokens_total` | counter | `model`, `kind` (`prompt`, `completion`) |
//! | `ferry_request_duration_seconds` | histogram | `tier`, `model` |
//! | `ferry_time_to_first_token_seconds` | histogram | `tier`, `model` |
//! | `ferry_queue_wait_seconds` | histogram | — |
//! | `ferry_request_energy_joules` | histogram | `model`, `source` |
//! | `ferry_model_energy_joules` | gauge | `model`, `source` |
//! | `ferry_energy_joules` | gauge | `source`, `account` (`measured`, `attributed`, `idle`) |
//! | `ferry_fallbacks_total` | counter | `from_tier`, `reason` (`unavailable`, `deadline`, `circuit_open`, `no_healthy_endpoint`, `model_not_listed`, `endpoints_exhausted`, `no_cloud_zoo`, `cloud_unavailable`) |
//! | `ferry_offload_attempts_total` | counter | `endpoint`, `outcome` (`ok`, `failed`, `timeout`, `refused`) |
//! | `ferry_offload_deadline_total` | counter | — (offloads ended with DEADLINE_EXCEEDED, no fallback) |
//! | `ferry_offloads_in_flight` | gauge | — |
//! | `ferry_cloud_circuit_state` | gauge | `endpoint` (0 closed, 1 half-open, 2 open) |
//! | `ferry_cloud_endpoint_healthy`, `ferry_cloud_endpoint_in_flight` | gauge | `endpoint` |
//! | `ferry_cloud_energy_joules` | gauge | `model`, `source` (joules ferry-cloud reported, summed) |
//! | `ferry_cloud_spend_usd` | gauge | — (dollars ferry-cloud reported, summed) |
//! | `ferry_requests_running`, `ferry_requests_queued` | gauge | — |
//! | `ferry_ready` | gauge | — (1 when models are loaded and state restored) |
//! | `ferry_router_q`, `ferry_router_q_tracked`, `ferry_router_alpha` | gauge | `tier` |
//! | `ferry_router_satisfaction` | gauge | `tier` (satisfied / judged, once feedback arrived) |
//! | `ferry_router_requests`, `ferry_router_explored` | gauge | `tier` |
//! | `ferry_router_calls` | gauge | `tier`, `model` |
//! | `ferry_router_debt` | gauge | `tier` (mixrank's SLA debt in requests; negative: surplus) |
//! | `ferry_router_rate`, `ferry_router_rate_low`, `ferry_router_rate_high` | gauge | `tier`, `model` (mixrank) |
//!
//! The recorder is process-global: the first server in a process installs it; when another
//! recorder is already installed (a test's debugging recorder), `/metrics` renders nothing and
//! the metrics go to that recorder instead.

pub use ferry_daemon::telemetry::{install, render};

use crate::state::AppState;

/// Sets the gauges that are read off live state rather than counted as events.
pub fn refresh_gauges(state: &AppState) {
    let running = state.admission.running();
    metrics::gauge!("ferry_requests_running").set(running as f64);
    metrics::gauge!("ferry_requests_queued")
        .set(state.admission.in_system().saturating_sub(running) as f64);
    metrics::gauge!("ferry_ready").set(if state.is_ready() && !state.is_draining() {
        1.0
    } else {
        0.0
    });
    if let Some(pool) = &state.cloud {
        metrics::gauge!("ferry_offloads_in_flight").set(pool.in_flight() as f64);
        for e in pool.status() {
            metrics::gauge!("ferry_cloud_circuit_state", "endpoint" => e.uri.clone())
                .set(e.circuit.gauge());
            metrics::gauge!("ferry_cloud_endpoint_healthy", "endpoint" => e.uri.clone())
                .set(if e.healthy { 1.0 } else { 0.0 });
            metrics::gauge!("ferry_cloud_endpoint_in_flight", "endpoint" => e.uri)
                .set(e.in_flight as f64);
        }
    }
    for router in state.routers() {
        let s = router.status();
        let tier = s.tier.clone();
        metrics::gauge!("ferry_router_q", "tier" => tier.clone()).set(s.q);
        metrics::gauge!("ferry_router_q_tracked", "tier" => tier.clone()).set(s.q_tracked);
        metrics::gauge!("ferry_router_alpha", "tier" => tier.clone()).set(s.alpha);
        metrics::gauge!("ferry_router_requests", "tier" => tier.clone()).set(s.requests as f64);
        metrics::gauge!("ferry_router_explored", "tier" => tier.clone()).set(s.explored as f64);
        if s.feedback > 0 {
            metrics::gauge!("ferry_router_satisfaction", "tier" => tier.clone())
                .set(s.satisfied as f64 / s.feedback as f64);
        }
        metrics::gauge!("ferry_router_debt", "tier" => tier.clone()).set(s.debt);
        for ((model, calls), est) in s.zoo.iter().zip(&s.calls).zip(&s.estimates) {
            metrics::gauge!("ferry_router_calls", "tier" => tier.clone(), "model" => model.clone())
                .set(*calls as f64);
            if let Some(e) = est {
                let labels = [("tier", tier.clone()), ("model", model.clone())];
                metrics::gauge!("ferry_router_rate", &labels).set(e.rate);
                metrics::gauge!("ferry_router_rate_low", &labels).set(e.rate_low);
                metrics::gauge!("ferry_router_rate_high", &labels).set(e.rate_high);
            }
        }
    }
}

/// Books a finished request.
pub fn request_finished(
    tier: &'static str,
    model: &str,
    outcome: &'static str,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_s: f64,
    first_token_s: Option<f64>,
) {
    let model = model.to_string();
    metrics::counter!("ferry_requests_total", "tier" => tier, "model" => model.clone(), "outcome" => outcome)
        .increment(1);
    if outcome != "ok" {
        return;
    }
    metrics::counter!("ferry_tokens_total", "model" => model.clone(), "kind" => "prompt")
        .increment(prompt_tokens);
    metrics::counter!("ferry_tokens_total", "model" => model.clone(), "kind" => "completion")
        .increment(completion_tokens);
    metrics::histogram!("ferry_request_duration_seconds", "tier" => tier, "model" => model.clone())
        .record(total_s);
    if let Some(t) = first_token_s {
        metrics::histogram!("ferry_time_to_first_token_seconds", "tier" => tier, "model" => model)
            .record(t);
    }
}

/// Books a request refused before it started.
pub fn request_rejected(kind: ferry_core::ErrorKind) {
    metrics::counter!("ferry_requests_rejected_total", "reason" => kind.as_str()).increment(1);
}
