//! `ferry.v1.Inference`: validation, the choice of tier and model, and the local engine path.
//!
//! Generate validates a request and decides where it runs synchronously — so bad input, an
//! unknown model and a full queue are answered with a status before any stream starts. A local
//! request is admitted and streamed from a blocking generation thread through a bounded channel;
//! a closed channel (client gone) stops decoding at the next token, the shutdown token stops it
//! with UNAVAILABLE. A cloud request is handed to [`crate::offload`], which falls back to this
//! module's local path when the offload fails before its first token.

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use ferry_core::{Error, Role, ValidatedRequest};
use ferry_engine::{GenerationEvent, LoadedModel};
use ferry_proto::v1 as pb;
use pb::inference_server::Inference;

use crate::delivered::Delivered;
use crate::ledger::{self, End};
use crate::records::Feedback;
use crate::router::Routed;
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
        let arrived = Instant::now();
        let state = &self.state;
        state
            .stats
            .requests_received
            .fetch_add(1, Ordering::Relaxed);
        let refuse = |e: Error| ledger::refused(state, e);
        let open = state.enter().map_err(refuse)?;
        if !state.is_ready() {
            return Err(refuse(Error::Unavailable(
                "ferryd is still loading its models".into(),
            )));
        }
        let mut req =
            ValidatedRequest::from_proto(request, &state.config.limits, state.next_seed())
                .map_err(refuse)?;
        if let Some(app) = app {
            req.app = app.0.clone();
        }
        let request_id = req
            .request_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // Where it runs (TMO), then which model of that tier (MESS+ or the named one).
        let placed = match &state.placement {
            Some(p) => Some(
                p.decide(
                    req.dialogue_id.as_deref(),
                    req.task.as_deref(),
                    state.cloud.is_some(),
                )
                .map_err(refuse)?,
            ),
            None => None,
        };
        let named_local = req
            .model
            .as_deref()
            .is_some_and(|id| state.manifests.iter().any(|m| m.id == id));
        let cloud_target = match (&state.cloud, req.model.as_deref()) {
            (Some(pool), Some(id)) if !named_local => match pool.lists(id) {
                true => Some(crate::offload::CloudTarget::Named(id.to_string())),
                false => {
                    return Err(refuse(Error::ModelNotFound(format!(
                        "{id} (not a local model, and no cloud endpoint lists it)"
                    ))))
                }
            },
            (Some(_), None) if placed.as_ref().is_some_and(|p| !p.executed.is_local()) => {
                Some(crate::offload::CloudTarget::Auto)
            }
            _ => None,
        };
        let (tx, rx) = mpsc::channel::<Item>(64);
        if let (Some(target), Some(pool)) = (cloud_target, state.cloud.clone()) {
            let job = crate::offload::CloudJob {
                state: state.clone(),
                pool,
                req,
                request_id,
                arrived,
                deadline,
                placed,
                target,
            };
            tokio::spawn(async move {
                let _open = open;
                job.run(tx).await
            });
            return Ok(ReceiverStream::new(rx));
        }
        let deadline_at = deadline.map(|d| arrived + d);
        let mut job = prepare_local(state, &req, req.model.as_deref(), &request_id, deadline_at)
            .await
            .map_err(refuse)?;
        if let Some(p) = &placed {
            job.placement.reason = format!("{}; {}", p.reason, job.placement.reason);
            job.placement.fallback = p.fallback;
        }
        let run = run_local(state.clone(), job, req, request_id, arrived, placed, tx);
        tokio::spawn(async move {
            let _open = open;
            run.await
        });
        Ok(ReceiverStream::new(rx))
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }
}

/// One item of a response stream.
pub(crate) type Item = Result<pb::GenerateResponse, Status>;

/// A local request that passed routing, prompt checks and admission.
pub(crate) struct LocalJob {
    model: Arc<LoadedModel>,
    routed: Option<Routed>,
    prompt: Vec<u32>,
    ticket: ferry_core::admission::Ticket,
    /// When work on the request stops: the app's deadline less [`ferry_core::deadline::margin`],
    /// so that the app hears why (and, once text has gone out, how much) before its own timer
    /// fires.
    give_up_at: Option<Instant>,
    /// The completion's placement; callers prefix the tier decision's reason.
    pub(crate) placement: pb::Placement,
}

/// Chooses the local model (`requested`, or MESS+ / the default for `auto`), checks the prompt
/// against the limits and admits the request.
pub(crate) async fn prepare_local(
    state: &Arc<AppState>,
    req: &ValidatedRequest,
    requested: Option<&str>,
    request_id: &str,
    deadline_at: Option<Instant>,
) -> Result<LocalJob, Error> {
    let (model, routed) = match (requested, state.router()) {
        (None, Some(router)) => {
            let routed = route_off_thread(router.clone(), req, request_id).await?;
            let model = state.resolve_model(Some(&routed.model))?;
            (model, Some(routed))
        }
        (requested, _) => (state.resolve_model(requested)?, None),
    };
    let prompt = model.encode_chat(&req.messages)?;
    let limit = (state.config.limits.max_prompt_tokens as usize)
        .min(model.info().context_length.saturating_sub(1));
    if prompt.len() > limit {
        return Err(Error::invalid(
            "messages",
            format!(
                "the prompt is {} tokens, over the limit of {limit} tokens (limits.max_prompt_tokens {}, context of `{}` {})",
                prompt.len(),
                state.config.limits.max_prompt_tokens,
                model.info().id,
                model.info().context_length
            ),
        ));
    }
    let left = deadline_at.map(|t| t.saturating_duration_since(Instant::now()));
    let ticket = state.admission.admit_for(&req.app, left)?;
    let give_up_at = deadline_at
        .zip(left)
        .map(|(t, left)| t - ferry_core::deadline::margin(left));
    let placement = placement_for(&model, req, requested, routed.as_ref());
    Ok(LocalJob {
        model,
        routed,
        prompt,
        ticket,
        give_up_at,
        placement,
    })
}

/// Runs an admitted local request to the end, streaming into `tx`.
pub(crate) async fn run_local(
    state: Arc<AppState>,
    job: LocalJob,
    req: ValidatedRequest,
    request_id: String,
    arrived: Instant,
    placed: Option<crate::placement::Placement>,
    tx: mpsc::Sender<Item>,
) {
    let LocalJob {
        model,
        routed,
        prompt,
        ticket,
        give_up_at,
        placement,
    } = job;
    let queue_expired = async move {
        match give_up_at {
            Some(t) => tokio::time::sleep_until(t.into()).await,
            None => std::future::pending().await,
        }
    };
    let model_id = model.info().id.clone();
    let booking = |total_ms: f64| ledger::Booking {
        request_id: &request_id,
        tier: "local",
        model: &model_id,
        total_ms,
    };
    let slot = tokio::select! {
        slot = ticket.run() => slot,
        _ = tx.closed() => {
            ledger::finish(&state, &booking(arrived.elapsed().as_secs_f64() * 1e3), End::Abandoned);
            return;
        }
        _ = state.abort.cancelled() => {
            let _ = tx.send(Err(Status::unavailable("ferryd is shutting down"))).await;
            return;
        }
        _ = queue_expired => {
            let waited_ms = arrived.elapsed().as_millis();
            tracing::info!(request_id = %request_id, waited_ms = waited_ms as u64, "deadline reached while queued");
            ledger::finish(&state, &booking(waited_ms as f64), End::Failed { outcome: "deadline" });
            let _ = tx
                .send(Err(Status::deadline_exceeded(format!(
                    "no generation slot became free within the request's deadline (queued {waited_ms} ms); \
                     ferryd is busy"
                ))))
                .await;
            return;
        }
    };
    let queue_ms = arrived.elapsed().as_secs_f64() * 1e3;
    metrics::histogram!("ferry_queue_wait_seconds").record(queue_ms / 1e3);
    let span = tracing::info_span!("generate", request_id = %request_id, model = %model.info().id);
    let gen_state = state.clone();
    let gen_model = model.clone();
    let gen_tx = tx.clone();
    let sampling = req.sampling.clone();
    let judged = routed.as_ref().is_some_and(|r| r.judge);
    let result = tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let mut sink = ChannelSink {
            tx: gen_tx,
            abort: gen_state.abort.clone(),
            arrived,
            give_up_at,
            delivered: Delivered::new(judged),
        };
        // Energy is charged from here: queue time is not busy time.
        let (out, energy) = gen_state.generate_metered(&gen_model, &prompt, &sampling, &mut sink);
        (out, sink.delivered, Some(energy), slot)
    })
    .await;
    let (outcome, delivered, energy, slot) = match result {
        Ok((out, delivered, energy, slot)) => (out, delivered, energy, Some(slot)),
        Err(join) => (
            Err(Error::Engine(format!("generation thread failed: {join}"))),
            Delivered::default(),
            None,
            None,
        ),
    };
    let first_text_ms = delivered.first_token_ms;
    let past_deadline = give_up_at.is_some_and(|t| Instant::now() >= t);
    let ended = |code: tonic::Code, message: String| {
        delivered.status(code, message, "local", &model.info().id, &request_id, None)
    };
    // An exploration or shadow step keeps the slot to run its other models after the answer.
    let slot = match &routed {
        Some(r) if !r.also.is_empty() && outcome.is_ok() => slot,
        _ => {
            drop(slot);
            None
        }
    };
    let total_ms = arrived.elapsed().as_secs_f64() * 1e3;
    // An error after part of the text reached the app is booked with what was delivered.
    let cut = |outcome: &'static str| match delivered.deltas {
        0 => End::Failed { outcome },
        n => End::Cut {
            outcome,
            delivered_deltas: n,
        },
    };
    match outcome {
        Ok(out) => {
            let finish: pb::FinishReason = out.finish_reason.into();
            let completion = pb::Completion {
                request_id: request_id.clone(),
                model: model.info().id.clone(),
                tier: pb::Tier::Local as i32,
                finish_reason: finish as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: out.prompt_tokens as u32,
                    completion_tokens: out.completion_tokens as u32,
                }),
                latency: Some(pb::Latency {
                    time_to_first_token_ms: first_text_ms.unwrap_or(total_ms),
                    total_ms,
                    queue_ms,
                }),
                energy: Some(match &energy {
                    Some(e) => pb::Energy {
                        joules: Some(e.joules),
                        source: e.source.clone(),
                        devices: e.devices.clone(),
                    },
                    None => pb::Energy {
                        joules: None,
                        source: "none".to_string(),
                        devices: Vec::new(),
                    },
                }),
                cost_usd: None,
                placement: Some(placement),
            };
            ledger::finish(
                &state,
                &booking(total_ms),
                End::Completed {
                    finish_reason: format!("{:?}", out.finish_reason).to_lowercase(),
                    prompt_tokens: out.prompt_tokens as u32,
                    completion_tokens: out.completion_tokens as u32,
                    first_token_ms: first_text_ms,
                    joules: energy.as_ref().map(|e| e.joules),
                    queue_ms: Some(queue_ms),
                    cost_usd: None,
                },
            );
            let msg = pb::GenerateResponse {
                event: Some(pb::generate_response::Event::Completion(completion)),
            };
            if tx.send(Ok(msg)).await.is_err() {
                ledger::completion_undelivered(&state);
            }
            drop(tx);
            if let (Some(placer), Some(p)) = (&state.placement, &placed) {
                placer.record_local(p, total_ms / 1e3, energy.as_ref().map(|e| e.joules));
            }
            if let Some(routed) = routed {
                let served_joules = energy.as_ref().map(|e| e.joules);
                let served_text = delivered.text.clone();
                learn_from_routed(
                    &state,
                    &routed,
                    &req,
                    &request_id,
                    (served_joules, served_text),
                    slot,
                )
                .await;
            }
        }
        Err(Error::Cancelled(why)) if state.abort.is_cancelled() && !tx.is_closed() => {
            ledger::finish(&state, &booking(total_ms), cut("shutdown"));
            let status = ended(
                tonic::Code::Unavailable,
                format!("ferryd shut down before the request finished ({why})"),
            );
            let _ = tx.send(Err(status)).await;
        }
        Err(Error::Cancelled(_)) if past_deadline && !tx.is_closed() => {
            ledger::finish(&state, &booking(total_ms), cut("deadline"));
            let status = ended(
                tonic::Code::DeadlineExceeded,
                format!(
                    "the request's deadline was reached after {} deltas ({} bytes) had been delivered; the text is incomplete",
                    delivered.deltas, delivered.bytes
                ),
            );
            let _ = tx.send(Err(status)).await;
        }
        Err(Error::Cancelled(why)) => {
            tracing::debug!(request_id = %request_id, "client went away: {why}");
            ledger::finish(&state, &booking(total_ms), End::Abandoned);
        }
        Err(e) => {
            tracing::warn!(request_id = %request_id, error = %e, "generation failed");
            ledger::finish(&state, &booking(total_ms), cut("failed"));
            let status: Status = e.into();
            let _ = tx
                .send(Err(ended(status.code(), status.message().to_string())))
                .await;
        }
    }
}

/// Forwards generated text into the response channel.
struct ChannelSink {
    tx: mpsc::Sender<Item>,
    abort: tokio_util::sync::CancellationToken,
    arrived: Instant,
    /// Generation stops here (the app's deadline, less the margin).
    give_up_at: Option<Instant>,
    delivered: Delivered,
}

impl GenerationEvent for ChannelSink {
    fn text(&mut self, delta: &str) -> ControlFlow<()> {
        let msg = pb::GenerateResponse {
            event: Some(pb::generate_response::Event::Delta(pb::TextDelta {
                text: delta.to_string(),
            })),
        };
        match self.tx.blocking_send(Ok(msg)) {
            Ok(()) => {
                self.delivered.push(delta, self.arrived);
                ControlFlow::Continue(())
            }
            Err(_) => ControlFlow::Break(()),
        }
    }

    fn cancelled(&self) -> bool {
        self.tx.is_closed()
            || self.abort.is_cancelled()
            || self.give_up_at.is_some_and(|t| Instant::now() >= t)
    }
}

/// Routes `req` (question, task, whether feedback will come) on a blocking thread: embedding
/// the question and deciding are CPU work that must not hold an async worker.
pub(crate) async fn route_off_thread(
    router: Arc<crate::router::ZooRouter>,
    req: &ValidatedRequest,
    request_id: &str,
) -> Result<Routed, Error> {
    let text = question(req);
    let id = request_id.to_string();
    let (task, expect_feedback) = (req.task.clone(), req.expect_feedback);
    tokio::task::spawn_blocking(move || router.route(&id, &text, task.as_deref(), expect_feedback))
        .await
        .map_err(|e| Error::Engine(format!("routing thread failed: {e}")))
        .and_then(|r| r)
}

/// The text the router sees: the last user message.
pub(crate) fn question(req: &ValidatedRequest) -> String {
    req.messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.joined_text())
        .unwrap_or_default()
}

/// Why a request ran where it did, for the final message.
fn placement_for(
    model: &LoadedModel,
    req: &ValidatedRequest,
    requested: Option<&str>,
    routed: Option<&Routed>,
) -> pb::Placement {
    let images = req.messages.iter().flat_map(|m| m.images()).count();
    let mut reason = match (requested.is_some(), routed) {
        (true, _) => "model named by the request".to_string(),
        (false, Some(r)) => r.reason.clone(),
        (false, None) => "default model (no routing policy configured)".to_string(),
    };
    if images > 0 && !model.info().capabilities.iter().any(|c| c == "image") {
        reason.push_str(&format!(
            "; {images} image(s) not sent: model `{}` is text-only",
            model.info().id
        ));
    }
    pb::Placement {
        fallback: false,
        reason,
        modalities_sent: Vec::new(),
    }
}

/// Books a routed request with its router: first runs the models that run beside the served
/// one (`Routed::also`: the rest of the zoo on a MESS+ exploration step, one model on a mixrank
/// shadow step) on the same prompt, holding the request's slot, after the client has its
/// answer, to measure what each costs; then hands the answers (`served`: the served answer's
/// joules and, when judged, text) to the judge when it grades this request.
async fn learn_from_routed(
    state: &Arc<AppState>,
    routed: &Routed,
    req: &ValidatedRequest,
    request_id: &str,
    served: (Option<f64>, Option<String>),
    slot: Option<ferry_core::admission::Slot>,
) {
    let Some(router) = state.router().cloned() else {
        return;
    };
    let zoo = router.zoo().to_vec();
    let mut joules = vec![None; zoo.len()];
    let (served_joules, served_text) = served;
    joules[routed.served] = served_joules;
    let judge = routed.judge;
    let mut answers: Vec<(usize, String)> = served_text
        .filter(|_| judge)
        .map(|t| (routed.served, t))
        .into_iter()
        .collect();
    if !routed.also.is_empty() {
        let others: Vec<(usize, Arc<LoadedModel>)> = routed
            .also
            .iter()
            .filter_map(|&i| state.model(zoo.get(i)?).map(|m| (i, m)))
            .collect();
        let st = state.clone();
        let messages = req.messages.clone();
        let sampling = req.sampling.clone();
        let measured = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for (i, model) in others {
                let Ok(prompt) = model.encode_chat(&messages) else {
                    continue;
                };
                let mut sink = crate::judge::Collect {
                    text: judge.then(String::new),
                    abort: st.abort.clone(),
                };
                let (result, energy) = st.generate_metered(&model, &prompt, &sampling, &mut sink);
                if result.is_ok() {
                    out.push((i, energy.joules, sink.text));
                }
            }
            drop(slot);
            out
        })
        .await
        .unwrap_or_default();
        for (i, j, text) in measured {
            joules[i] = Some(j);
            if let Some(t) = text {
                answers.push((i, t));
            }
        }
    }
    router.finished(routed, &joules);
    if judge {
        crate::judge::spawn(
            state.clone(),
            router,
            request_id.to_string(),
            question(req),
            answers,
        );
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
            .and_then(ferry_core::deadline::parse_grpc_timeout);
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
