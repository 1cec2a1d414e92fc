//! ferry-cloud's metrics, served as Prometheus text on `GET /metrics` (the recorder is
//! [`ferry_daemon::telemetry`]'s, shared with ferryd).
//!
//! Every name starts with `ferry_cloud_`; labels are bounded: model ids and backends come from
//! the configured zoo, outcomes and reasons from fixed sets, energy sources from the probed
//! meter kinds (plus `hint` and `none`).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `ferry_cloud_requests_total` | counter | `model`, `backend`, `outcome` (`ok`, `failed`, `deadline`, `cancelled`, `shutdown`) |
//! | `ferry_cloud_requests_rejected_total` | counter | `reason` (error kind: `invalid_argument`, `not_found`, `unavailable`, `resource_exhausted`, `failed_precondition`, ...) |
//! | `ferry_cloud_auth_refusals_total` | counter | `surface` (`grpc`, `http`): missing or wrong bearer token |
//! | `ferry_cloud_replays_total` | counter | `model`: retries answered from the replay cache |
//! | `ferry_cloud_tokens_total` | counter | `model`, `kind` (`prompt`, `completion`) |
//! | `ferry_cloud_request_duration_seconds` | histogram | `model`, `backend` |
//! | `ferry_cloud_time_to_first_token_seconds` | histogram | `model`, `backend` |
//! | `ferry_cloud_queue_wait_seconds` | histogram | `model` |
//! | `ferry_cloud_request_energy_joules` | histogram | `model`, `source` (its `_sum` is the joules by source) |
//! | `ferry_cloud_requests_running`, `ferry_cloud_requests_queued` | gauge | — |
//! | `ferry_cloud_ready` | gauge | — (1 when the models are loaded and ferry-cloud is not draining) |
//!
//! TLS handshakes refused for a missing or foreign client certificate never reach a service, so
//! they are not counted here (they are logged at debug level by the transport).

use ferry_core::ErrorKind;

/// Sets the gauges read off live state at scrape time: requests generating, requests
/// admitted in all (running or queued), and whether ferry-cloud takes requests.
pub fn set_load_gauges(running: usize, in_system: usize, ready: bool) {
    metrics::gauge!("ferry_cloud_requests_running").set(running as f64);
    metrics::gauge!("ferry_cloud_requests_queued").set(in_system.saturating_sub(running) as f64);
    metrics::gauge!("ferry_cloud_ready").set(if ready { 1.0 } else { 0.0 });
}

/// What one finished request reports.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    pub model: &'a str,
    pub backend: &'static str,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_s: f64,
    pub first_token_s: Option<f64>,
    pub queue_s: f64,
    /// Joules and their source (`nvml`, `rapl`, ..., `hint`), when known.
    pub energy: Option<(f64, &'a str)>,
}

/// Books a request that ran to its end.
pub fn request_ok(f: Finished<'_>) {
    let model = f.model.to_string();
    metrics::counter!("ferry_cloud_requests_total", "model" => model.clone(), "backend" => f.backend, "outcome" => "ok")
        .increment(1);
    metrics::counter!("ferry_cloud_tokens_total", "model" => model.clone(), "kind" => "prompt")
        .increment(u64::from(f.prompt_tokens));
    metrics::counter!("ferry_cloud_tokens_total", "model" => model.clone(), "kind" => "completion")
        .increment(u64::from(f.completion_tokens));
    metrics::histogram!("ferry_cloud_request_duration_seconds", "model" => model.clone(), "backend" => f.backend)
        .record(f.total_s);
    if let Some(t) = f.first_token_s {
        metrics::histogram!("ferry_cloud_time_to_first_token_seconds", "model" => model.clone(), "backend" => f.backend)
            .record(t);
    }
    metrics::histogram!("ferry_cloud_queue_wait_seconds", "model" => model.clone())
        .record(f.queue_s);
    if let Some((joules, source)) = f.energy {
        metrics::histogram!("ferry_cloud_request_energy_joules", "model" => model, "source" => source.to_string())
            .record(joules);
    }
}

/// Books a request that started and did not finish: `outcome` is `failed`, `deadline`, `busy`
/// (no slot before its deadline), `cancelled` or `shutdown`.
pub fn request_ended(model: &str, backend: &'static str, outcome: &'static str) {
    metrics::counter!("ferry_cloud_requests_total", "model" => model.to_string(), "backend" => backend, "outcome" => outcome)
        .increment(1);
}

/// Books a request refused before it started.
pub fn request_rejected(kind: ErrorKind) {
    metrics::counter!("ferry_cloud_requests_rejected_total", "reason" => kind.as_str())
        .increment(1);
}

/// Books a retry answered from the replay cache.
pub fn replayed(model: &str) {
    metrics::counter!("ferry_cloud_replays_total", "model" => model.to_string()).increment(1);
}

/// Books a refused bearer token on `surface` (`grpc` or `http`).
pub fn auth_refused(surface: &'static str) {
    metrics::counter!("ferry_cloud_auth_refusals_total", "surface" => surface).increment(1);
}
