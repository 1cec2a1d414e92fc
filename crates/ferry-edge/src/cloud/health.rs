//! Health of the endpoints: each is probed every `health_interval_ms` on `grpc.health.v1` for
//! `ferry.v1.Offload` and, when serving, asked for its model list; silence counts against an
//! endpoint only after `failure_threshold` probes in a row, a refusal at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use ferry_proto::v1 as pb;

use super::CloudPool;

/// How a health probe ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// SERVING.
    Serving,
    /// An answer that is not SERVING, or an error reaching the endpoint.
    Failed,
    /// No answer within `health_timeout_ms`.
    Unanswered,
}

/// Whether an endpoint counts as healthy after a probe: `unanswered` is the count of unanswered
/// probes in a row including this one. A definite failure counts at once, silence only at the
/// `threshold`-th probe in a row.
pub fn healthy_after(outcome: ProbeOutcome, unanswered: u32, threshold: u32) -> bool {
    match outcome {
        ProbeOutcome::Serving => true,
        ProbeOutcome::Failed => false,
        ProbeOutcome::Unanswered => unanswered < threshold.max(1),
    }
}

impl CloudPool {
    /// Probes every endpoint once: health, and the model list when healthy.
    pub async fn probe_all(&self) {
        let timeout = Duration::from_millis(self.cfg.health_timeout_ms);
        let probes = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, _)| self.probe(i, timeout));
        futures::future::join_all(probes).await;
    }

    async fn probe(&self, i: usize, timeout: Duration) {
        let ep = &self.endpoints[i];
        let mut health = tonic_health::pb::health_client::HealthClient::with_interceptor(
            ep.channel.clone(),
            self.bearer.clone(),
        );
        let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
            service: pb::offload_server::SERVICE_NAME.to_string(),
        });
        req.set_timeout(timeout);
        let unanswered = || {
            (
                ProbeOutcome::Unanswered,
                format!("no health answer within {} ms", timeout.as_millis()),
            )
        };
        let started = Instant::now();
        let verdict = match tokio::time::timeout(timeout, health.check(req)).await {
            Ok(Ok(r))
                if r.get_ref().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 =>
            {
                Ok(())
            }
            Ok(Ok(r)) => Err((
                ProbeOutcome::Failed,
                format!("health status {:?}", r.get_ref().status()),
            )),
            // tonic's own end of the grpc-timeout (CANCELLED, "Timeout expired"), or the
            // server's DEADLINE_EXCEEDED, is silence too.
            Ok(Err(s))
                if s.code() == tonic::Code::DeadlineExceeded || started.elapsed() >= timeout =>
            {
                Err(unanswered())
            }
            Ok(Err(s)) => Err((
                ProbeOutcome::Failed,
                format!("{}: {}", s.code(), s.message()),
            )),
            Err(_) => Err(unanswered()),
        };
        let verdict = match verdict {
            Ok(()) => {
                ep.unanswered.store(0, Ordering::Release);
                Ok(())
            }
            Err((outcome, why)) => {
                let n = if outcome == ProbeOutcome::Unanswered {
                    ep.unanswered.fetch_add(1, Ordering::AcqRel) + 1
                } else {
                    ep.unanswered.store(0, Ordering::Release);
                    0
                };
                if healthy_after(outcome, n, self.cfg.failure_threshold) {
                    // Slow, not down: keep serving, remember why, count on.
                    tracing::debug!(endpoint = %ep.uri, unanswered = n, "late health answer");
                    *ep.last_error.lock() = Some(format!("{why} ({n} in a row)"));
                    return;
                }
                Err(why)
            }
        };
        let was = ep.healthy.load(Ordering::Acquire);
        match verdict {
            Ok(()) => {
                let listed = !ep.models.read().is_empty();
                let mut list_error = None;
                if !listed || !was {
                    let mut req = tonic::Request::new(pb::ListModelsRequest {});
                    req.set_timeout(timeout);
                    match tokio::time::timeout(timeout, self.client(i).list_models(req)).await {
                        Ok(Ok(r)) => {
                            let models = r.into_inner().models;
                            tracing::info!(endpoint = %ep.uri, models = ?models.iter().map(|m| &m.id).collect::<Vec<_>>(), "cloud zoo listed");
                            *ep.models.write() = models;
                        }
                        Ok(Err(s)) => {
                            let why = format!(
                                "ListModels: {}: {}",
                                format!("{:?}", s.code()).to_uppercase(),
                                s.message()
                            );
                            tracing::warn!(endpoint = %ep.uri, error = %why, "the cloud zoo could not be listed");
                            list_error = Some(why);
                        }
                        Err(_) => list_error = Some("ListModels timed out".to_string()),
                    }
                }
                ep.healthy.store(true, Ordering::Release);
                *ep.last_error.lock() = list_error;
                if !was {
                    tracing::info!(endpoint = %ep.uri, "cloud endpoint healthy again");
                }
            }
            Err(why) => {
                ep.healthy.store(false, Ordering::Release);
                if was {
                    tracing::warn!(endpoint = %ep.uri, error = %why, "cloud endpoint unhealthy");
                }
                *ep.last_error.lock() = Some(why);
            }
        }
        metrics::gauge!("ferry_cloud_endpoint_healthy", "endpoint" => ep.uri.clone()).set(
            if ep.healthy.load(Ordering::Acquire) {
                1.0
            } else {
                0.0
            },
        );
    }

    /// Probes every `health_interval_ms` until `stop` is cancelled.
    pub async fn probe_forever(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.health_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.probe_all().await,
                _ = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_counts_at_the_threshold_and_a_refusal_at_once() {
        use ProbeOutcome::*;
        assert!(healthy_after(Serving, 0, 3));
        assert!(!healthy_after(Failed, 0, 3));
        assert!(healthy_after(Unanswered, 1, 3));
        assert!(healthy_after(Unanswered, 2, 3));
        assert!(!healthy_after(Unanswered, 3, 3));
        // A threshold of 1 (or a bad 0) is the old rule: one late answer is enough.
        assert!(!healthy_after(Unanswered, 1, 1));
        assert!(!healthy_after(Unanswered, 1, 0));
    }
}
