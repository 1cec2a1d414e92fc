//! Running one request on the cloud tier, and what happens when that fails.
//!
//! Semantics (the README's "Offload and fallback" section says the same to users):
//! - **Before the first token** — refused connection, UNAVAILABLE/5xx, no first token within the
//!   time budget, an open circuit, no healthy endpoint: the next endpoint is tried while attempts
//!   (`cloud.max_attempts`) and time remain, then the request runs locally. Its completion says
//!   `fallback: true` and why. Bad input the cloud refuses (INVALID_ARGUMENT) is the app's, not
//!   the endpoint's, and goes back to the app as is. A budget that ran out with
//!   `cloud.on_deadline = "error"`, or past the app's own deadline, ends the call with
//!   DEADLINE_EXCEEDED instead of a fallback.
//! - **After the first token** — the endpoint dies, the stream breaks, the deadline passes: the
//!   stream ends with that status (UNAVAILABLE, DEADLINE_EXCEEDED, ...) and the accounting of
//!   what was delivered in its metadata (`x-ferry-tier`, `x-ferry-model`, `x-ferry-endpoint`,
//!   `x-ferry-delivered-deltas`, `x-ferry-delivered-bytes`); nothing is retried, so no text is
//!   duplicated. The request is recorded as `interrupted`, and the routers book it.
//! - **The app leaves** — the cloud stream is dropped, which cancels the call on ferry-cloud
//!   (HTTP/2 RST_STREAM), and ferry-cloud stops generating.
//!
//! Every offload carries the edge's request id, so a retry that reaches an endpoint which already
//! finished it replays the stored answer instead of paying twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::Status;

use ferry_core::{ChatMessage, Error, Part, ValidatedRequest};
use ferry_proto::v1 as pb;
use ferry_router::tmo::Action;

use crate::cloud::{is_endpoint_failure, CloudPool, Lease, NoEndpoint, OnDeadline};
use crate::delivered::Delivered;
use crate::ledger::{self, End};
use crate::router::{Routed, ZooRouter};
use crate::service::{prepare_local, route_off_thread, run_local, Item};
use crate::state::AppState;

/// Which cloud model a request asks for.
pub(crate) enum CloudTarget {
    /// The request named this cloud model.
    Named(String),
    /// `auto`, placed in the cloud: MESS+ over the cloud zoo (or the default cloud model).
    Auto,
}

/// A request the daemon decided to run in the cloud.
pub(crate) struct CloudJob {
    pub(crate) state: Arc<AppState>,
    pub(crate) pool: Arc<CloudPool>,
    pub(crate) req: ValidatedRequest,
    pub(crate) request_id: String,
    pub(crate) arrived: Instant,
    /// The app's deadline, as time left when the request arrived.
    pub(crate) deadline: Option<Duration>,
    pub(crate) placed: Option<crate::placement::Placement>,
    pub(crate) target: CloudTarget,
}

/// Why an offload did not produce a first token.
struct Failed {
    /// Metrics label (bounded).
    label: &'static str,
    /// For the completion's reason.
    why: String,
    /// The budget ran out (rather than the endpoints).
    timed_out: bool,
}

impl CloudJob {
    /// Runs the request: offload, fall back, stream into `tx`.
    pub(crate) async fn run(self, tx: mpsc::Sender<Item>) {
        let _in_flight = self.pool.track();
        // The whole zoo only when a router or default must choose from it.
        let zoo = match &self.target {
            CloudTarget::Named(id) => self.pool.model(id).into_iter().collect(),
            CloudTarget::Auto => self.pool.models(),
        };
        let (model, routed, route_reason) = match self.choose_model(&zoo).await {
            Ok(x) => x,
            Err(why) => {
                return self
                    .fall_back(
                        tx,
                        Failed {
                            label: "no_cloud_zoo",
                            why,
                            timed_out: false,
                        },
                        None,
                    )
                    .await
            }
        };
        let info = zoo.iter().find(|m| m.id == model).cloned();
        let image_capable = info
            .as_ref()
            .is_some_and(|m| m.capabilities.iter().any(|c| c == "image"));
        let action = self
            .placed
            .as_ref()
            .map(|p| p.executed)
            .filter(|a| !a.is_local());
        let chosen = ChosenImages::select(&self.req.messages, action, image_capable);
        let mut reason = match (&self.target, &self.placed) {
            (CloudTarget::Named(_), _) => "model named by the request".to_string(),
            (CloudTarget::Auto, Some(p)) => p.reason.clone(),
            (CloudTarget::Auto, None) => "placed in the cloud".to_string(),
        };
        if let Some(r) = &route_reason {
            reason.push_str("; ");
            reason.push_str(r);
        }
        if let Some(note) = &chosen.note {
            reason.push_str("; ");
            reason.push_str(note);
        }

        let cfg = &self.pool.cfg;
        // The app's own deadline, less the margin that lets our status reach it first.
        let app_deadline = self
            .deadline
            .map(|d| ferry_core::deadline::give_up_at(self.arrived, d));
        let budget = Duration::from_millis(cfg.request_timeout_ms);
        let until = match app_deadline {
            Some(a) => a.min(self.arrived + budget),
            None => self.arrived + budget,
        };
        let mut tried = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        let mut last = Failed {
            label: "unavailable",
            why: String::new(),
            timed_out: false,
        };
        for _ in 0..cfg.max_attempts {
            let mut lease = match self.pool.acquire(&model, &tried) {
                Ok(l) => l,
                Err(no) => {
                    if tried.is_empty() {
                        let mut why = format!("{} for `{model}`", no.as_str().replace('_', " "));
                        if no == NoEndpoint::Unhealthy {
                            let probes = self.pool.probe_errors(&model);
                            if !probes.is_empty() {
                                why.push_str(&format!(" ({probes})"));
                            }
                        }
                        last = Failed {
                            label: no.as_str(),
                            why,
                            timed_out: false,
                        };
                    }
                    break;
                }
            };
            tried.push(lease.index());
            let now = Instant::now();
            if now >= until {
                lease.failed();
                last = Failed {
                    label: "deadline",
                    why: "no time left for the cloud".into(),
                    timed_out: true,
                };
                break;
            }
            let remaining = until - now;
            let offload = self.offload_request(&model, chosen.messages.clone(), remaining);
            let mut client = lease.client();
            let attempt = async move {
                let mut stream = client.generate(offload).await?.into_inner();
                let first = stream.message().await?;
                Ok::<_, Status>((stream, first))
            };
            let outcome = tokio::select! {
                r = tokio::time::timeout(remaining, attempt) => r,
                _ = tx.closed() => {
                    self.abandoned(routed.as_ref(), &model);
                    return;
                }
                _ = self.state.abort.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("ferryd is shutting down"))).await;
                    return;
                }
            };
            let uri = lease.uri().to_string();
            match outcome {
                Err(_) => {
                    lease.failed();
                    attempt_metric(&uri, "timeout");
                    last = Failed {
                        label: "deadline",
                        why: format!("{uri}: no first token within {} ms", remaining.as_millis()),
                        timed_out: true,
                    };
                    failures.push(last.why.clone());
                    // The budget is spent: no other endpoint can do better.
                    break;
                }
                Ok(Err(status)) if !is_endpoint_failure(status.code()) => {
                    // The request's own fault: the app hears it, the endpoint is fine.
                    lease.succeeded();
                    attempt_metric(&uri, "refused");
                    self.failed_request(&model, routed.as_ref());
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                Ok(Err(status)) => {
                    if counts_against_endpoint(status.code()) {
                        lease.failed();
                    }
                    attempt_metric(&uri, "failed");
                    // The server side of a grpc-timeout answers CANCELLED "Timeout expired".
                    let timed_out = status.code() == tonic::Code::DeadlineExceeded
                        || Instant::now() + Duration::from_millis(5) >= until;
                    let said = format!("{}: {}", code_name(status.code()), status.message());
                    last = Failed {
                        label: if status.code() == tonic::Code::ResourceExhausted {
                            // Busy, not down: the cloud found no slot in time.
                            "busy"
                        } else if timed_out {
                            "deadline"
                        } else {
                            "unavailable"
                        },
                        // Say what ran out, not only how the transport put it.
                        why: if timed_out {
                            format!(
                                "{uri}: no first token within {} ms ({said})",
                                remaining.as_millis()
                            )
                        } else {
                            format!("{uri}: {said}")
                        },
                        timed_out,
                    };
                    failures.push(last.why.clone());
                    tracing::warn!(request_id = %self.request_id, endpoint = %uri, code = ?status.code(), error = %status.message(), "offload failed before the first token");
                }
                Ok(Ok((_, None))) => {
                    lease.failed();
                    attempt_metric(&uri, "failed");
                    last = Failed {
                        label: "unavailable",
                        why: format!("{uri}: the stream closed without an answer"),
                        timed_out: false,
                    };
                    failures.push(last.why.clone());
                }
                Ok(Ok((stream, Some(first)))) => {
                    lease.succeeded();
                    attempt_metric(&uri, "ok");
                    let placement = pb::Placement {
                        fallback: false,
                        reason,
                        modalities_sent: chosen.sources.clone(),
                    };
                    let executed = Action::cloud(chosen.views_mask);
                    self.stream(
                        tx,
                        lease,
                        stream,
                        first,
                        StreamCtx {
                            model,
                            info,
                            routed,
                            placement,
                            executed,
                            until,
                        },
                    )
                    .await;
                    return;
                }
            }
        }
        if failures.len() > 1 {
            last.why = failures.join("; then ");
        }
        let past_app_deadline = app_deadline.is_some_and(|a| Instant::now() >= a);
        if last.timed_out && (cfg.on_deadline == OnDeadline::Error || past_app_deadline) {
            self.failed_request(&model, routed.as_ref());
            metrics::counter!("ferry_offload_deadline_total").increment(1);
            let _ = tx
                .send(Err(Status::deadline_exceeded(format!(
                    "the cloud tier gave no first token in time ({})",
                    last.why
                ))))
                .await;
            return;
        }
        self.fall_back(
            tx,
            last,
            routed.as_ref().map(|(r, x)| (r.clone(), x.request_id())),
        )
        .await
    }

    /// The cloud model: the named one, MESS+ over the cloud zoo, or the default cloud model.
    #[allow(clippy::type_complexity)]
    async fn choose_model(
        &self,
        zoo: &[pb::ModelInfo],
    ) -> Result<
        (
            String,
            Option<(Arc<ZooRouter>, RoutedCloud)>,
            Option<String>,
        ),
        String,
    > {
        if let CloudTarget::Named(id) = &self.target {
            return Ok((id.clone(), None, None));
        }
        if zoo.is_empty() {
            return Err("no cloud endpoint has listed its models yet".into());
        }
        let st = self.state.clone();
        let listed = zoo.to_vec();
        let router = tokio::task::spawn_blocking(move || st.ensure_cloud_router(&listed))
            .await
            .map_err(|e| Error::Engine(format!("router thread failed: {e}")))
            .and_then(|r| r);
        match router {
            Ok(Some(router)) => {
                let routed = route_off_thread(router.clone(), &self.req, &self.request_id).await;
                match routed {
                    Ok(routed) if zoo.iter().any(|m| m.id == routed.model) => {
                        let reason = format!("cloud {}", routed.reason);
                        let model = routed.model.clone();
                        return Ok((
                            model,
                            Some((
                                router,
                                RoutedCloud {
                                    routed,
                                    request_id: self.request_id.clone(),
                                },
                            )),
                            Some(reason),
                        ));
                    }
                    Ok(routed) => {
                        router.abandon(&self.request_id);
                        tracing::warn!(model = %routed.model, "the cloud router chose a model no endpoint lists now; using the default cloud model");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cloud routing failed; using the default cloud model")
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the cloud router could not be built; using the default cloud model")
            }
        }
        let model = match &self.pool.cfg.default_model {
            Some(m) => m.clone(),
            None => zoo
                .iter()
                .min_by(|a, b| {
                    let p = |m: &pb::ModelInfo| m.usd_per_million_tokens.unwrap_or(0.0);
                    p(a).partial_cmp(&p(b)).unwrap_or(std::cmp::Ordering::Equal)
                })
                .map(|m| m.id.clone())
                .expect("zoo is not empty"),
        };
        Ok((model, None, Some("default cloud model".to_string())))
    }

    fn offload_request(
        &self,
        model: &str,
        messages: Vec<pb::Message>,
        remaining: Duration,
    ) -> tonic::Request<pb::OffloadRequest> {
        let s = &self.req.sampling;
        let timeout_ms = remaining.as_millis().clamp(1, u32::MAX as u128) as u32;
        let mut r = tonic::Request::new(pb::OffloadRequest {
            request_id: self.request_id.clone(),
            model: model.to_string(),
            messages,
            max_tokens: Some(s.max_tokens),
            temperature: Some(s.temperature as f32),
            top_p: s.top_p.map(|p| p as f32),
            top_k: s.top_k.map(|k| k as u32),
            seed: Some(s.seed),
            stop: s.stop.clone(),
            timeout_ms: Some(timeout_ms),
        });
        r.set_timeout(remaining);
        r
    }

    /// Forwards the cloud stream to the app until its completion, an error, or the app leaving.
    async fn stream(
        self,
        tx: mpsc::Sender<Item>,
        lease: Lease,
        mut stream: tonic::Streaming<pb::OffloadResponse>,
        first: pb::OffloadResponse,
        ctx: StreamCtx,
    ) {
        let judged = ctx.routed.as_ref().is_some_and(|(_, rc)| rc.routed.judge);
        let mut delivered = Delivered::new(judged);
        let mut next = Some(first);
        loop {
            let event = match next.take() {
                Some(m) => Ok(Some(m)),
                None => {
                    let now = Instant::now();
                    let left = ctx.until.saturating_duration_since(now);
                    tokio::select! {
                        r = tokio::time::timeout(left, stream.message()) => match r {
                            Ok(r) => r,
                            Err(_) => Err(Status::deadline_exceeded(format!(
                                "the request's time budget ran out after {} ms",
                                self.arrived.elapsed().as_millis()
                            ))),
                        },
                        _ = tx.closed() => {
                            drop(stream);
                            self.cancelled(&ctx, &delivered);
                            return;
                        }
                        _ = self.state.abort.cancelled() => Err(Status::unavailable("ferryd is shutting down")),
                    }
                }
            };
            match event {
                Ok(Some(pb::OffloadResponse {
                    event: Some(pb::offload_response::Event::Delta(d)),
                })) => {
                    delivered.push(&d.text, self.arrived);
                    let msg = pb::GenerateResponse {
                        event: Some(pb::generate_response::Event::Delta(d)),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        drop(stream);
                        self.cancelled(&ctx, &delivered);
                        return;
                    }
                }
                Ok(Some(pb::OffloadResponse {
                    event: Some(pb::offload_response::Event::Completion(c)),
                })) => {
                    drop(lease);
                    self.completed(tx, ctx, c, &delivered).await;
                    return;
                }
                Ok(Some(pb::OffloadResponse { event: None })) => {}
                Ok(None) => {
                    let status = Status::unavailable(format!(
                        "{}: the cloud stream ended without a completion",
                        lease.uri()
                    ));
                    return self.interrupted(tx, &lease, ctx, status, &delivered).await;
                }
                Err(status) => {
                    return self.interrupted(tx, &lease, ctx, status, &delivered).await;
                }
            }
        }
    }

    async fn completed(
        self,
        tx: mpsc::Sender<Item>,
        ctx: StreamCtx,
        c: pb::OffloadCompletion,
        delivered: &Delivered,
    ) {
        let total_ms = self.arrived.elapsed().as_secs_f64() * 1e3;
        let usage = c.usage.unwrap_or_default();
        let energy = c.energy.unwrap_or_else(|| pb::Energy {
            joules: None,
            source: "none".into(),
            devices: Vec::new(),
        });
        let finish =
            pb::FinishReason::try_from(c.finish_reason).unwrap_or(pb::FinishReason::Unspecified);
        let first_token_ms = delivered.first_token_ms;
        let completion = pb::Completion {
            request_id: self.request_id.clone(),
            model: ctx.model.clone(),
            tier: pb::Tier::Cloud as i32,
            finish_reason: c.finish_reason,
            usage: Some(usage),
            latency: Some(pb::Latency {
                time_to_first_token_ms: first_token_ms.unwrap_or(total_ms),
                total_ms,
                queue_ms: c.latency.map(|l| l.queue_ms).unwrap_or(0.0),
            }),
            energy: Some(energy.clone()),
            cost_usd: c.cost_usd,
            placement: Some(ctx.placement),
        };
        tracing::debug!(request_id = %self.request_id, backend = %c.backend, replayed = c.replayed, "cloud answer");
        ledger::finish(
            &self.state,
            &self.booking(&ctx.model, total_ms),
            End::Completed {
                finish_reason: finish_name(finish).to_string(),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                first_token_ms,
                joules: energy.joules,
                queue_ms: None,
                cost_usd: c.cost_usd,
            },
        );
        if let Some(j) = energy.joules {
            metrics::gauge!("ferry_cloud_energy_joules", "model" => ctx.model.clone(), "source" => energy.source.clone())
                .increment(j);
            metrics::histogram!("ferry_request_energy_joules", "model" => ctx.model.clone(), "source" => format!("cloud:{}", energy.source))
                .record(j);
        }
        if let Some(usd) = c.cost_usd {
            metrics::gauge!("ferry_cloud_spend_usd").increment(usd);
        }
        let msg = pb::GenerateResponse {
            event: Some(pb::generate_response::Event::Completion(completion)),
        };
        if tx.send(Ok(msg)).await.is_err() {
            ledger::completion_undelivered(&self.state);
        }
        drop(tx);
        if let (Some(placer), Some(p)) = (&self.state.placement, &self.placed) {
            placer.record(p, ctx.executed, total_ms / 1e3, c.cost_usd.unwrap_or(0.0));
        }
        if let Some((router, rc)) = ctx.routed {
            self.learn(router, rc, energy.joules, delivered.text.clone())
                .await;
        }
    }

    /// Books a cloud router's request: on an exploration step, first offloads the same request
    /// to the rest of the cloud zoo (after the app has its answer) to measure what each costs;
    /// then hands the answers to the judge when it grades this request.
    async fn learn(
        &self,
        router: Arc<ZooRouter>,
        rc: RoutedCloud,
        served_joules: Option<f64>,
        served_text: Option<String>,
    ) {
        let zoo = router.zoo().to_vec();
        let mut joules = vec![None; zoo.len()];
        joules[rc.routed.served] = served_joules;
        let judge = rc.routed.judge;
        let mut answers: Vec<(usize, String)> = served_text
            .filter(|_| judge)
            .map(|t| (rc.routed.served, t))
            .into_iter()
            .collect();
        for &i in &rc.routed.also {
            let Some(model) = zoo.get(i) else {
                continue;
            };
            // Images only to models that read them (a text-only model refuses them).
            let reads_images = self
                .pool
                .model(model)
                .is_some_and(|m| m.capabilities.iter().any(|c| c == "image"));
            let messages = ChosenImages::select(&self.req.messages, None, reads_images).messages;
            if let Some((text, j)) = self.measure(model, messages, judge).await {
                joules[i] = j;
                if judge {
                    answers.push((i, text));
                }
            }
        }
        router.finished(&rc.routed, &joules);
        if judge {
            crate::judge::spawn(
                self.state.clone(),
                router,
                rc.request_id.clone(),
                crate::service::question(&self.req),
                answers,
            );
        }
    }

    /// Runs the request on another cloud model to read the joules it reports (and its text,
    /// when the judge will grade it).
    async fn measure(
        &self,
        model: &str,
        messages: Vec<pb::Message>,
        keep_text: bool,
    ) -> Option<(String, Option<f64>)> {
        let budget = Duration::from_millis(self.pool.cfg.request_timeout_ms);
        let mut r = self.offload_request(model, messages, budget).into_inner();
        r.request_id = format!("{}.explore.{model}", self.request_id);
        run_to_end(&self.pool, &self.state.abort, r, keep_text).await
    }

    /// The stream broke after tokens were sent: end it with the status and the accounting.
    async fn interrupted(
        self,
        tx: mpsc::Sender<Item>,
        lease: &Lease,
        ctx: StreamCtx,
        status: Status,
        delivered: &Delivered,
    ) {
        let total_ms = self.arrived.elapsed().as_secs_f64() * 1e3;
        let code = match status.code() {
            // A transport failure (endpoint gone) reads as UNAVAILABLE to the app.
            tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled => {
                tonic::Code::Unavailable
            }
            c => c,
        };
        let message = format!(
            "the cloud answer was interrupted after {} deltas ({} bytes) had been delivered; the text is incomplete and was not retried ({}: {}: {})",
            delivered.deltas,
            delivered.bytes,
            lease.uri(),
            code_name(status.code()),
            status.message()
        );
        let ended = delivered.status(
            code,
            message,
            "cloud",
            &ctx.model,
            &self.request_id,
            Some(lease.uri()),
        );
        tracing::warn!(request_id = %self.request_id, endpoint = %lease.uri(), deltas = delivered.deltas, bytes = delivered.bytes, error = %status.message(), "offload interrupted after the first token");
        ledger::finish(
            &self.state,
            &self.booking(&ctx.model, total_ms),
            End::Cut {
                outcome: "interrupted",
                delivered_deltas: delivered.deltas,
            },
        );
        let _ = tx.send(Err(ended)).await;
        drop(tx);
        // What it probably cost: the hints applied to what was delivered.
        let est_tokens = delivered.deltas as f64;
        let usd = ctx
            .info
            .as_ref()
            .and_then(|m| m.usd_per_million_tokens)
            .map(|p| p * est_tokens / 1e6)
            .unwrap_or(0.0);
        if let (Some(placer), Some(p)) = (&self.state.placement, &self.placed) {
            placer.record(p, ctx.executed, total_ms / 1e3, usd);
        }
        if let Some((router, rc)) = ctx.routed {
            let joules = ctx
                .info
                .as_ref()
                .and_then(|m| m.joules_per_token)
                .map(|j| j * est_tokens);
            let mut costs = vec![None; router.zoo().len()];
            costs[rc.routed.served] = joules;
            router.finished(&rc.routed, &costs);
        }
    }

    /// This request's line in the ledger, served by cloud `model`.
    fn booking<'a>(&'a self, model: &'a str, total_ms: f64) -> ledger::Booking<'a> {
        ledger::Booking {
            request_id: &self.request_id,
            tier: "cloud",
            model,
            total_ms,
        }
    }

    /// The app left while the cloud answered.
    fn cancelled(&self, ctx: &StreamCtx, delivered: &Delivered) {
        tracing::info!(request_id = %self.request_id, model = %ctx.model, deltas = delivered.deltas, "client went away; cloud request cancelled");
        self.ended_unanswered(&ctx.model, ctx.routed.as_ref(), "cancelled");
    }

    /// The app left before the first token.
    fn abandoned(&self, routed: Option<&(Arc<ZooRouter>, RoutedCloud)>, model: &str) {
        self.ended_unanswered(model, routed, "cancelled");
    }

    /// The request ended with an error before any token, without a fallback.
    fn failed_request(&self, model: &str, routed: Option<&(Arc<ZooRouter>, RoutedCloud)>) {
        self.ended_unanswered(model, routed, "failed");
    }

    /// Books a request that ends without a full answer (`outcome`: `cancelled` or `failed`) in
    /// the ledger, and the cloud router forgets it.
    fn ended_unanswered(
        &self,
        model: &str,
        routed: Option<&(Arc<ZooRouter>, RoutedCloud)>,
        outcome: &'static str,
    ) {
        let end = if outcome == "failed" {
            End::Failed { outcome }
        } else {
            End::Abandoned
        };
        let total_ms = self.arrived.elapsed().as_secs_f64() * 1e3;
        ledger::finish(&self.state, &self.booking(model, total_ms), end);
        if let Some((router, _)) = routed {
            router.abandon(&self.request_id);
        }
    }

    /// Runs the request locally after the offload failed before its first token.
    async fn fall_back(
        self,
        tx: mpsc::Sender<Item>,
        failed: Failed,
        routed: Option<(Arc<ZooRouter>, String)>,
    ) {
        if let Some((router, id)) = routed {
            router.abandon(&id);
        }
        metrics::counter!("ferry_fallbacks_total", "from_tier" => "cloud", "reason" => failed.label)
            .increment(1);
        tracing::warn!(request_id = %self.request_id, reason = %failed.why, "offload failed before the first token; running locally");
        let lead = match (&self.target, &self.placed) {
            (CloudTarget::Named(m), _) => format!("cloud model `{m}` named by the request"),
            (CloudTarget::Auto, Some(p)) => p.reason.clone(),
            (CloudTarget::Auto, None) => "placed in the cloud".to_string(),
        };
        let reason = format!(
            "{lead}; fallback to local: {} ({})",
            failed.label.replace('_', " "),
            failed.why
        );
        // Whatever the request named is a cloud model: locally, `auto` chooses.
        let deadline_at = self.deadline.map(|d| self.arrived + d);
        let job = prepare_local(&self.state, &self.req, None, &self.request_id, deadline_at).await;
        let mut job = match job {
            Ok(j) => j,
            Err(e) => {
                let e = ledger::refused(&self.state, e);
                let _ = tx
                    .send(Err(Status::new(
                        e.kind().grpc_code(),
                        format!("{reason}; the local tier refused it too: {e}"),
                    )))
                    .await;
                return;
            }
        };
        job.placement.reason = format!("{reason}; {}", job.placement.reason);
        job.placement.fallback = true;
        let placed = self.placed.clone();
        run_local(
            self.state.clone(),
            job,
            self.req,
            self.request_id,
            self.arrived,
            placed,
            tx,
        )
        .await;
    }
}

/// A cloud router's decision for one request.
pub(crate) struct RoutedCloud {
    routed: Routed,
    request_id: String,
}

impl RoutedCloud {
    fn request_id(&self) -> String {
        self.request_id.clone()
    }
}

struct StreamCtx {
    model: String,
    info: Option<pb::ModelInfo>,
    routed: Option<(Arc<ZooRouter>, RoutedCloud)>,
    placement: pb::Placement,
    executed: Action,
    until: Instant,
}

/// The messages as sent to the cloud, with only the chosen images.
struct ChosenImages {
    messages: Vec<pb::Message>,
    /// Sources of the images sent.
    sources: Vec<String>,
    /// Bits of the views sent (image `i` < 3 is view `i`).
    views_mask: u8,
    /// Why images were left out, if any were.
    note: Option<String>,
}

impl ChosenImages {
    /// Keeps image `k` (in request order) when the model reads images and, under a placement
    /// action, the action sends view `k`.
    fn select(messages: &[ChatMessage], action: Option<Action>, image_capable: bool) -> Self {
        let mut k = 0usize;
        let mut sources = Vec::new();
        let mut mask = 0u8;
        let mut dropped = 0usize;
        let out = messages
            .iter()
            .map(|m| {
                let mut parts = Vec::with_capacity(m.parts.len());
                for p in &m.parts {
                    match p {
                        Part::Text(t) => parts.push(pb::ContentPart {
                            kind: Some(pb::content_part::Kind::Text(t.clone())),
                        }),
                        Part::Image(img) => {
                            let send = image_capable && action.is_none_or(|a| k < 3 && a.sends(k));
                            if send {
                                if k < 3 {
                                    mask |= 1 << k;
                                }
                                sources.push(img.source.clone());
                                parts.push(pb::ContentPart {
                                    kind: Some(pb::content_part::Kind::Image(pb::Image {
                                        data: img.data.clone(),
                                        mime_type: img.mime_type.clone(),
                                        source: img.source.clone(),
                                    })),
                                });
                            } else {
                                dropped += 1;
                            }
                            k += 1;
                        }
                    }
                }
                if parts.is_empty() {
                    // Every part was an image left out: keep the turn, say what was there.
                    parts.push(pb::ContentPart {
                        kind: Some(pb::content_part::Kind::Text("(image not sent)".into())),
                    });
                }
                pb::Message {
                    role: match m.role {
                        ferry_core::Role::System => pb::Role::System,
                        ferry_core::Role::User => pb::Role::User,
                        ferry_core::Role::Assistant => pb::Role::Assistant,
                    } as i32,
                    parts,
                }
            })
            .collect();
        let note = (dropped > 0).then(|| {
            if !image_capable {
                format!("{dropped} image(s) not sent: the cloud model is text-only")
            } else {
                format!("{dropped} image(s) not sent: the placement chose fewer views")
            }
        });
        ChosenImages {
            messages: out,
            sources,
            views_mask: mask,
            note,
        }
    }
}

/// Text-only messages as the cloud reads them (a judge's conversation).
pub(crate) fn text_messages(messages: &[ChatMessage]) -> Vec<pb::Message> {
    ChosenImages::select(messages, None, false).messages
}

/// Runs one offload that no app streams (an exploration step's other models, a judge) to its
/// completion within `cloud.request_timeout_ms`: the text when `keep_text` (else empty) and
/// the joules the cloud reports. `None` when no endpoint serves the model or the call fails.
pub(crate) async fn run_to_end(
    pool: &Arc<CloudPool>,
    abort: &tokio_util::sync::CancellationToken,
    request: pb::OffloadRequest,
    keep_text: bool,
) -> Option<(String, Option<f64>)> {
    let lease = pool.acquire(&request.model, &[]).ok()?;
    let budget = Duration::from_millis(pool.cfg.request_timeout_ms);
    let mut r = tonic::Request::new(pb::OffloadRequest {
        timeout_ms: Some(budget.as_millis().clamp(1, u32::MAX as u128) as u32),
        ..request
    });
    r.set_timeout(budget);
    let run = async {
        let mut s = lease.client().generate(r).await.ok()?.into_inner();
        let mut text = String::new();
        while let Ok(Some(m)) = s.message().await {
            match m.event {
                Some(pb::offload_response::Event::Delta(d)) if keep_text => text.push_str(&d.text),
                Some(pb::offload_response::Event::Completion(c)) => {
                    return Some((text, c.energy.and_then(|e| e.joules)));
                }
                _ => {}
            }
        }
        None
    };
    tokio::select! {
        j = tokio::time::timeout(budget, run) => j.ok().flatten(),
        _ = abort.cancelled() => None,
    }
}

/// Whether a failure status should count towards the endpoint's circuit: the endpoint or its
/// engine is broken, not merely busy or missing one model.
fn counts_against_endpoint(code: tonic::Code) -> bool {
    !matches!(
        code,
        tonic::Code::ResourceExhausted
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition
            | tonic::Code::Aborted
    )
}

fn attempt_metric(endpoint: &str, outcome: &'static str) {
    metrics::counter!("ferry_offload_attempts_total", "endpoint" => endpoint.to_string(), "outcome" => outcome)
        .increment(1);
}

/// The status code as gRPC spells it (`RESOURCE_EXHAUSTED`, `DEADLINE_EXCEEDED`).
fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, ch) in format!("{code:?}").chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(ch.to_ascii_uppercase());
    }
    name
}

fn finish_name(f: pb::FinishReason) -> &'static str {
    match f {
        pb::FinishReason::Stop => "stop",
        pb::FinishReason::Length => "length",
        pb::FinishReason::StopSequence => "stop_sequence",
        pb::FinishReason::Unspecified => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{ImagePart, Role};

    fn image(source: &str) -> Part {
        Part::Image(ImagePart {
            data: vec![1, 2, 3],
            mime_type: "image/png".into(),
            source: source.into(),
        })
    }

    fn request() -> Vec<ChatMessage> {
        vec![
            ChatMessage::text(Role::System, "be brief"),
            ChatMessage {
                role: Role::User,
                parts: vec![
                    Part::Text("what is here?".into()),
                    image("camera/front"),
                    image("camera/left"),
                    image("camera/right"),
                ],
            },
        ]
    }

    fn images_of(m: &[pb::Message]) -> Vec<String> {
        m.iter()
            .flat_map(|m| &m.parts)
            .filter_map(|p| match &p.kind {
                Some(pb::content_part::Kind::Image(i)) => Some(i.source.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_action_picks_views_by_image_order() {
        let c = ChosenImages::select(&request(), Some(Action::cloud(0b101)), true);
        assert_eq!(images_of(&c.messages), vec!["camera/front", "camera/right"]);
        assert_eq!(c.sources, vec!["camera/front", "camera/right"]);
        assert_eq!(c.views_mask, 0b101);
        assert!(c.note.unwrap().contains("1 image(s) not sent"));
        assert_eq!(c.messages[0].role, pb::Role::System as i32);
    }

    #[test]
    fn text_only_models_get_no_images_and_image_only_turns_keep_a_placeholder() {
        let msgs = vec![ChatMessage {
            role: Role::User,
            parts: vec![image("cam")],
        }];
        let c = ChosenImages::select(&msgs, None, false);
        assert!(images_of(&c.messages).is_empty());
        assert_eq!(c.views_mask, 0);
        assert!(c.note.unwrap().contains("text-only"));
        assert_eq!(c.messages[0].parts.len(), 1, "the turn is kept");
    }

    #[test]
    fn without_a_placement_every_image_goes_to_an_image_model() {
        let c = ChosenImages::select(&request(), None, true);
        assert_eq!(images_of(&c.messages).len(), 3);
        assert_eq!(c.views_mask, 0b111);
        assert!(c.note.is_none());
    }

    #[test]
    fn status_codes_are_named_as_grpc_spells_them() {
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn only_broken_endpoints_trip_the_circuit() {
        assert!(counts_against_endpoint(tonic::Code::Unavailable));
        assert!(counts_against_endpoint(tonic::Code::DeadlineExceeded));
        assert!(counts_against_endpoint(tonic::Code::Internal));
        assert!(!counts_against_endpoint(tonic::Code::ResourceExhausted));
        assert!(!counts_against_endpoint(tonic::Code::NotFound));
        assert!(is_endpoint_failure(tonic::Code::Unavailable));
        assert!(!is_endpoint_failure(tonic::Code::InvalidArgument));
    }
}
