//! `ferry.v1.Inference`, the gRPC face of ferryd: `Generate` hands the request to
//! `crate::pipeline::dispatch` (the same path the OpenAI-compatible API takes), and `Status`,
//! `ListModels` and `Feedback` read and teach the daemon's state.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use ferry_core::Error;
use ferry_proto::v1 as pb;
use pb::inference_server::Inference;

use crate::pipeline::Item;
use crate::records::Feedback;
use crate::state::AppState;

/// The gRPC service.
#[derive(Clone)]
pub struct InferenceService {
    state: Arc<AppState>,
}

impl InferenceService {
    pub fn new(state: Arc<AppState>) -> Self {
        InferenceService { state }
    }

    /// Validates, places, routes and admits a request, then streams it: the code path behind
    /// both the gRPC `Generate` and the OpenAI-compatible HTTP API. Errors before the stream (bad
    /// input, unknown model, full queue, not ready) come back here; failures after it started
    /// come as the stream's last item.
    pub async fn start(&self, request: pb::GenerateRequest) -> Result<ReceiverStream<Item>, Error> {
        self.start_with_deadline(request, None, None).await
    }

    /// [`InferenceService::start`] with the app's deadline (time left when the request
    /// arrived), which bounds an offload to the cloud tier and its wait in the queue, and the
    /// calling app (its bearer token's name), which takes its turn in the queue.
    pub async fn start_with_deadline(
        &self,
        request: pb::GenerateRequest,
        deadline: Option<std::time::Duration>,
        app: Option<&crate::auth::AppName>,
    ) -> Result<ReceiverStream<Item>, Error> {
        crate::pipeline::dispatch::dispatch(&self.state, request, deadline, app).await
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = ReceiverStream<Item>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        // The app's deadline (grpc-timeout) bounds an offload to the cloud tier.
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(ferry_daemon::deadline::parse_grpc_timeout);
        let app = request.extensions().get::<crate::auth::AppName>().cloned();
        let stream = self
            .start_with_deadline(request.into_inner(), deadline, app.as_ref())
            .await?;
        Ok(Response::new(stream))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let state = &self.state;
        let totals = state.energy.totals();
        let running = state.admission.running();
        let routers = state
            .routers()
            .iter()
            .map(|r| {
                let s = r.status();
                pb::RouterStatus {
                    tier: if s.tier == "cloud" {
                        pb::Tier::Cloud as i32
                    } else {
                        pb::Tier::Local as i32
                    },
                    policy: s.policy,
                    alpha: s.alpha,
                    v_per_joule: s.v,
                    q: s.q,
                    q_tracked: s.q_tracked,
                    requests: s.requests,
                    explored: s.explored,
                    exploration_probability: s.exploration_probability,
                    models: s
                        .zoo
                        .iter()
                        .zip(&s.calls)
                        .zip(&s.mean_cost_joules)
                        .zip(&s.estimates)
                        .map(|(((model, &calls), &mean_joules), est)| pb::ModelCalls {
                            model: model.clone(),
                            calls,
                            mean_joules,
                            rate: est.as_ref().map(|e| e.rate),
                            rate_low: est.as_ref().map(|e| e.rate_low),
                            rate_high: est.as_ref().map(|e| e.rate_high),
                            labels: est.as_ref().map_or(0, |e| e.labels),
                        })
                        .collect(),
                    debt: s.debt,
                    prior: s.prior.unwrap_or_default(),
                    feedback: s.feedback,
                    satisfied: s.satisfied,
                    judge_model: s.judge_model.unwrap_or_default(),
                    judge_verdicts: s.judge_verdicts,
                    judge_satisfied: s.judge_satisfied,
                    state_file: s.state_file.display().to_string(),
                    saved_unix_ms: s.saved_unix_ms.unwrap_or(0),
                }
            })
            .collect();
        let cloud_endpoints = state
            .cloud
            .as_ref()
            .map(|pool| {
                pool.status()
                    .into_iter()
                    .map(|e| pb::CloudEndpointStatus {
                        uri: e.uri,
                        healthy: e.healthy,
                        circuit: e.circuit.as_str().to_string(),
                        in_flight: e.in_flight as u32,
                        models: e.models,
                        circuit_opened_total: e.circuit_opened_total,
                        last_error: e.last_error.unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let models = self
            .list_models(Request::new(pb::ListModelsRequest {}))
            .await?
            .into_inner()
            .models;
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: state.is_ready(),
            draining: state.is_draining(),
            uptime_s: state.started.elapsed().as_secs_f64(),
            models,
            running: running as u32,
            queued: state.admission.in_system().saturating_sub(running) as u32,
            max_concurrent: state.admission.max_concurrent() as u32,
            max_queue: state.admission.max_queue() as u32,
            energy: Some(pb::EnergyStatus {
                source: state.energy.source_label().to_string(),
                devices: state.energy.devices().to_vec(),
                measured_joules: totals.measured_joules,
                attributed_joules: totals.attributed_joules,
                idle_joules: totals.idle_joules,
            }),
            routers,
            requests_completed: state.stats.requests_completed.load(Ordering::Relaxed),
            requests_failed: state.stats.requests_failed.load(Ordering::Relaxed),
            requests_rejected: state.stats.requests_rejected.load(Ordering::Relaxed),
            cloud_endpoints,
        }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let default = self.state.default_model_id();
        let mut models: Vec<pb::ModelInfo> = self
            .state
            .manifests
            .iter()
            .map(|m| {
                let loaded = self.state.model(&m.id);
                pb::ModelInfo {
                    id: m.id.clone(),
                    family: loaded
                        .as_ref()
                        .map(|l| l.info().family.clone())
                        .unwrap_or_else(|| m.family.clone()),
                    tier: pb::Tier::Local as i32,
                    capabilities: m.capabilities.clone(),
                    context_length: loaded
                        .as_ref()
                        .map(|l| l.info().context_length as u32)
                        .or(m.context_length)
                        .unwrap_or(0),
                    loaded: loaded.is_some(),
                    is_default: default.as_deref() == Some(m.id.as_str()),
                    usd_per_million_tokens: m.cost.usd_per_million_tokens,
                    joules_per_token: m.cost.joules_per_token,
                }
            })
            .collect();
        // Then the cloud zoo, as its endpoints listed it (a local id shadows a cloud one).
        if let Some(pool) = &self.state.cloud {
            for m in pool.models() {
                if !models.iter().any(|x| x.id == m.id) {
                    models.push(pb::ModelInfo {
                        tier: pb::Tier::Cloud as i32,
                        is_default: false,
                        ..m
                    });
                }
            }
        }
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn feedback(
        &self,
        request: Request<pb::FeedbackRequest>,
    ) -> Result<Response<pb::FeedbackResponse>, Status> {
        let req = request.into_inner();
        if req.request_id.trim().is_empty() {
            return Err(Error::invalid("request_id", "is required").into());
        }
        let replaced = self.state.records.feedback(
            &req.request_id,
            Feedback {
                satisfied: req.satisfied,
                score: req.score,
            },
        )?;
        // The request was routed by at most one tier's router.
        let learned = self
            .state
            .routers()
            .iter()
            .any(|r| r.feedback(&req.request_id, req.satisfied));
        tracing::debug!(request_id = %req.request_id, learned, replaced, "feedback");
        Ok(Response::new(pb::FeedbackResponse { replaced }))
    }
}
