//! The Prometheus recorder behind ferryd's and ferry-cloud's `GET /metrics`: installed once per
//! process with ferry's histogram buckets (latencies in seconds, energy in joules), and rendered
//! as Prometheus text. Each server names its own metrics (`ferry_*` for ferryd,
//! `ferry_cloud_*` for ferry-cloud) through the `metrics` facade.
//!
//! The recorder is process-global: the first server in a process installs it, and servers
//! sharing a process (the integration tests) share it too. When another recorder is already
//! installed (a test's debugging recorder), `/metrics` renders nothing and the metrics go to
//! that recorder instead.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The `Content-Type` of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process; false when another recorder was first.
pub fn install() -> bool {
    HANDLE
        .get_or_init(|| {
            let secs = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ];
            let joules = [
                0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &secs)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_joules".into()), &joules))
                .map(|b| b.build_recorder());
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    match metrics::set_global_recorder(recorder) {
                        Ok(()) => Some(handle),
                        Err(_) => {
                            tracing::debug!(
                                "a metrics recorder is already installed; /metrics stays empty"
                            );
                            None
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Prometheus recorder not built");
                    None
                }
            }
        })
        .is_some()
}

/// The Prometheus text exposition of everything recorded so far (empty before [`install`]).
pub fn render() -> String {
    HANDLE
        .get()
        .and_then(|h| h.as_ref())
        .map(|h| h.render())
        .unwrap_or_default()
}
