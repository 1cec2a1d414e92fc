//! The cloud tier: one request offloaded to ferry-cloud, and what happens when that fails.
//!
//! Semantics (the README's "Offload and fallback" section says the same to users):
//! - **Before the first token** — refused connection, UNAVAILABLE/5xx, no first token within the
//!   time budget, an open circuit, no healthy endpoint: the next endpoint is tried while attempts
//!   (`cloud.max_attempts`) and time remain, then the request is handed back
//!   ([`super::Ran::Declined`]) and `dispatch` runs it locally. Its completion says
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
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;
use tonic::Status;

use ferry_core::Error;
use ferry_proto::v1 as pb;
use ferry_router::tmo::Action;

use super::{question, route_off_thread, Declined, Item, Job, Ran, Tier};
use crate::cloud::offload::{
    attempt_metric, code_name, counts_against_endpoint, finish_name, run_to_end, ChosenImages,
};
use crate::cloud::{is_endpoint_failure, CloudPool, InFlight, Lease, NoEndpoint, OnDeadline};
use crate::delivered::Delivered;
use crate::ledger::{self, End, PlacedCost, RouteCosts};
use crate::router::{Routed, ZooRouter};

/// Which cloud model a request asks for.
#[derive(Clone)]
pub(crate) enum CloudTarget {
    /// The request named this cloud model.
    Named(String),
    /// `auto`, placed in the cloud: MESS+ over the cloud zoo (or the default cloud model).
    Auto,
}

/// The cloud tier, for one request: the endpoints and the model asked for.
pub(crate) struct CloudTier {
    pub(crate) pool: Arc<CloudPool>,
    pub(crate) target: CloudTarget,
}

#[tonic::async_trait]
impl Tier for CloudTier {
    /// The request counts as offloaded while it runs.
    type Prepared = InFlight;

    /// Nothing refuses an offload before its stream: a cloud that cannot take it hands it back.
    async fn prepare(&self, _job: &Job) -> Result<InFlight, Error> {
        Ok(self.pool.track())
    }

    async fn run(&self, job: Job, in_flight: InFlight, tx: mpsc::Sender<Item>) -> Ran {
        let offload = Offload {
            job,
            pool: self.pool.clone(),
            target: self.target.clone(),
        };
        let ran = offload.run(tx).await;
        drop(in_flight);
        ran
    }
}

/// A request on its way to the cloud.
struct Offload {
    job: Job,
    pool: Arc<CloudPool>,
    target: CloudTarget,
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

impl Offload {
    /// Runs the request: offload and stream into `tx`, or hand it back.
    async fn run(self, tx: mpsc::Sender<Item>) -> Ran {
        // The whole zoo only when a router or default must choose from it.
        let zoo = match &self.target {
            CloudTarget::Named(id) => self.pool.model(id).into_iter().collect(),
            CloudTarget::Auto => self.pool.models(),
        };
        let (model, routed, route_reason) = match self.choose_model(&zoo).await {
            Ok(x) => x,
            Err(why) => {
                return self.decline(
                    Failed {
                        label: "no_cloud_zoo",
                        why,
                        timed_out: false,
                    },
                    None,
                )
            }
        };
        let info = zoo.iter().find(|m| m.id == model).cloned();
        let image_capable = info
            .as_ref()
            .is_some_and(|m| m.capabilities.iter().any(|c| c == "image"));
        let action = self
            .job
            .placed
            .as_ref()
            .map(|p| p.executed)
            .filter(|a| !a.is_local());
        let chosen = ChosenImages::select(&self.job.req.messages, action, image_capable);
        let mut reason = match (&self.target, &self.job.placed) {
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
            .job
            .deadline
            .map(|d| ferry_daemon::deadline::give_up_at(self.job.arrived, d));
        let budget = Duration::from_millis(cfg.request_timeout_ms);
        let until = match app_deadline {
            Some(a) => a.min(self.job.arrived + budget),
            None => self.job.arrived + budget,
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
                    return Ran::Ended;
                }
                _ = self.job.state.abort.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("ferryd is shutting down"))).await;
                    return Ran::Ended;
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
                    return Ran::Ended;
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
                    tracing::warn!(request_id = %self.job.request_id, endpoint = %uri, code = ?status.code(), error = %status.message(), "offload failed before the first token");
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
                    return Ran::Ended;
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
            return Ran::Ended;
        }
        self.decline(last, routed.as_ref().map(|(r, _)| r.as_ref()))
    }

    /// The cloud model: the named one, MESS+ over the cloud zoo, or the default cloud model.
    #[allow(clippy::type_complexity)]
    async fn choose_model(
        &self,
        zoo: &[pb::ModelInfo],
    ) -> Result<(String, Option<(Arc<ZooRouter>, Routed)>, Option<String>), String> {
        if let CloudTarget::Named(id) = &self.target {
            return Ok((id.clone(), None, None));
        }
        if zoo.is_empty() {
            return Err("no cloud endpoint has listed its models yet".into());
        }
        let st = self.job.state.clone();
        let listed = zoo.to_vec();
        let router = tokio::task::spawn_blocking(move || st.ensure_cloud_router(&listed))
            .await
            .map_err(|e| Error::Engine(format!("router thread failed: {e}")))
            .and_then(|r| r);
        match router {
            Ok(Some(router)) => {
                let routed =
                    route_off_thread(router.clone(), &self.job.req, &self.job.request_id).await;
                match routed {
                    Ok(routed) if zoo.iter().any(|m| m.id == routed.model) => {
                        let reason = format!("cloud {}", routed.reason);
                        let model = routed.model.clone();
                        return Ok((model, Some((router, routed)), Some(reason)));
                    }
                    Ok(routed) => {
                        ledger::forget_route(&router, &self.job.request_id);
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
        crate::cloud::offload::request(
            &self.job.request_id,
            model,
            messages,
            &self.job.req.sampling,
            remaining,
        )
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
        let judged = ctx.routed.as_ref().is_some_and(|(_, routed)| routed.judge);
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
                                self.job.arrived.elapsed().as_millis()
                            ))),
                        },
                        _ = tx.closed() => {
                            drop(stream);
                            self.cancelled(&ctx, &delivered);
                            return;
                        }
                        _ = self.job.state.abort.cancelled() => Err(Status::unavailable("ferryd is shutting down")),
                    }
                }
            };
            match event {
                Ok(Some(pb::OffloadResponse {
                    event: Some(pb::offload_response::Event::Delta(d)),
                })) => {
                    delivered.push(&d.text, self.job.arrived);
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
        let total_ms = self.job.elapsed_ms();
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
            request_id: self.job.request_id.clone(),
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
        tracing::debug!(request_id = %self.job.request_id, backend = %c.backend, replayed = c.replayed, "cloud answer");
        ledger::finish(
            self.job.state.book(),
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
            ledger::completion_undelivered(self.job.state.book());
        }
        drop(tx);
        self.teach_placer(total_ms, ctx.executed, c.cost_usd.unwrap_or(0.0));
        if let Some((router, routed)) = ctx.routed {
            let costs = RouteCosts {
                served_joules: energy.joules,
                served_text: delivered.text.clone(),
                also: self.run_also(&router, &routed).await,
            };
            self.teach_router(router, &routed, costs);
        }
    }

    /// Offloads the same request to the models the cloud router wants beside the served one
    /// (`Routed::also`), after the app has its answer, to read the joules each reports, and
    /// their answers when the judge grades this request.
    async fn run_also(
        &self,
        router: &ZooRouter,
        routed: &Routed,
    ) -> Vec<(usize, Option<f64>, Option<String>)> {
        let mut out = Vec::new();
        for &i in &routed.also {
            let Some(model) = router.zoo().get(i) else {
                continue;
            };
            // Images only to models that read them (a text-only model refuses them).
            let reads_images = self
                .pool
                .model(model)
                .is_some_and(|m| m.capabilities.iter().any(|c| c == "image"));
            let messages =
                ChosenImages::select(&self.job.req.messages, None, reads_images).messages;
            let budget = Duration::from_millis(self.pool.cfg.request_timeout_ms);
            let mut r = self.offload_request(model, messages, budget).into_inner();
            r.request_id = format!("{}.explore.{model}", self.job.request_id);
            let abort = &self.job.state.abort;
            if let Some((text, j)) = run_to_end(&self.pool, abort, r, routed.judge).await {
                out.push((i, j, routed.judge.then_some(text)));
            }
        }
        out
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
        let total_ms = self.job.elapsed_ms();
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
            &self.job.request_id,
            Some(lease.uri()),
        );
        tracing::warn!(request_id = %self.job.request_id, endpoint = %lease.uri(), deltas = delivered.deltas, bytes = delivered.bytes, error = %status.message(), "offload interrupted after the first token");
        ledger::finish(
            self.job.state.book(),
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
        self.teach_placer(total_ms, ctx.executed, usd);
        if let Some((router, routed)) = ctx.routed {
            let costs = RouteCosts {
                served_joules: ctx
                    .info
                    .as_ref()
                    .and_then(|m| m.joules_per_token)
                    .map(|j| j * est_tokens),
                ..RouteCosts::default()
            };
            self.teach_router(router, &routed, costs);
        }
    }

    /// Teaches the placement policy what the offload cost: `total_ms` from arrival, the views
    /// sent, the cloud's price (reported, or estimated for a broken stream).
    fn teach_placer(&self, total_ms: f64, executed: Action, usd: f64) {
        let cost = PlacedCost::Cloud { executed, usd };
        ledger::teach_placer(
            self.job.state.placement.as_ref(),
            self.job.placed.as_ref(),
            total_ms / 1e3,
            cost,
        );
    }

    /// Teaches the cloud router what its request cost (and the judge what it answered).
    fn teach_router(&self, router: Arc<ZooRouter>, routed: &Routed, costs: RouteCosts) {
        let question = question(&self.job.req);
        let (state, id) = (&self.job.state, &self.job.request_id);
        ledger::teach_router(state, router, routed, id, question, costs);
    }

    /// This request's line in the ledger, served by cloud `model`.
    fn booking<'a>(&'a self, model: &'a str, total_ms: f64) -> ledger::Booking<'a> {
        ledger::Booking {
            request_id: &self.job.request_id,
            tier: "cloud",
            model,
            total_ms,
        }
    }

    /// The app left while the cloud answered.
    fn cancelled(&self, ctx: &StreamCtx, delivered: &Delivered) {
        tracing::info!(request_id = %self.job.request_id, model = %ctx.model, deltas = delivered.deltas, "client went away; cloud request cancelled");
        self.ended_unanswered(&ctx.model, ctx.routed.as_ref(), "cancelled");
    }

    /// The app left before the first token.
    fn abandoned(&self, routed: Option<&(Arc<ZooRouter>, Routed)>, model: &str) {
        self.ended_unanswered(model, routed, "cancelled");
    }

    /// The request ended with an error before any token, without a fallback.
    fn failed_request(&self, model: &str, routed: Option<&(Arc<ZooRouter>, Routed)>) {
        self.ended_unanswered(model, routed, "failed");
    }

    /// Books a request that ends without a full answer (`outcome`: `cancelled` or `failed`) in
    /// the ledger, and the cloud router forgets it.
    fn ended_unanswered(
        &self,
        model: &str,
        routed: Option<&(Arc<ZooRouter>, Routed)>,
        outcome: &'static str,
    ) {
        let end = if outcome == "failed" {
            End::Failed { outcome }
        } else {
            End::Abandoned
        };
        let total_ms = self.job.elapsed_ms();
        ledger::finish(self.job.state.book(), &self.booking(model, total_ms), end);
        if let Some((router, _)) = routed {
            ledger::forget_route(router, &self.job.request_id);
        }
    }

    /// Hands the request back after the offload failed before its first token; the cloud
    /// router forgets its choice.
    fn decline(self, failed: Failed, router: Option<&ZooRouter>) -> Ran {
        if let Some(router) = router {
            ledger::forget_route(router, &self.job.request_id);
        }
        Ran::Declined(
            Box::new(self.job),
            Declined {
                label: failed.label,
                why: failed.why,
            },
        )
    }
}

struct StreamCtx {
    model: String,
    info: Option<pb::ModelInfo>,
    routed: Option<(Arc<ZooRouter>, Routed)>,
    placement: pb::Placement,
    executed: Action,
    until: Instant,
}
