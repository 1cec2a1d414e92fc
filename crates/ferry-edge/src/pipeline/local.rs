//! The local tier: the candle engine on this box.
//!
//! [`LocalTier::prepare`] chooses the model (the one named, or the local router's choice for
//! `auto`), checks the prompt against the limits and takes a place in the admission queue;
//! [`LocalTier::run`] waits for a generation slot and streams from a blocking generation thread
//! through a bounded channel. A closed channel (client gone) stops decoding at the next token,
//! the shutdown token stops it with UNAVAILABLE, and the app's deadline (less its margin) stops
//! it with DEADLINE_EXCEEDED. A routed request keeps its slot after the answer to run the models
//! its router wants beside the served one.

use std::ops::ControlFlow;
use std::sync::Arc;
use tokio::time::Instant;

use tokio::sync::mpsc;
use tonic::Status;

use ferry_core::{Error, ValidatedRequest};
use ferry_engine::{GenerationEvent, LoadedModel};
use ferry_proto::v1 as pb;

use super::{question, route_off_thread, Item, Job, Ran, Tier};
use crate::delivered::Delivered;
use crate::ledger::{self, End, PlacedCost, RouteCosts};
use crate::router::Routed;
use crate::state::AppState;

/// The local tier.
pub(crate) struct LocalTier;

/// A local request that passed routing, prompt checks and admission.
pub(crate) struct LocalJob {
    model: Arc<LoadedModel>,
    routed: Option<Routed>,
    prompt: Vec<u32>,
    ticket: ferry_daemon::admission::Ticket,
    /// When work on the request stops: the app's deadline less [`ferry_daemon::deadline::margin`],
    /// so that the app hears why (and, once text has gone out, how much) before its own timer
    /// fires.
    give_up_at: Option<Instant>,
    /// The completion's placement.
    placement: pb::Placement,
}

#[tonic::async_trait]
impl Tier for LocalTier {
    type Prepared = LocalJob;

    /// Chooses the local model (`job.model`, or the router / the default for `auto`), checks
    /// the prompt against the limits and admits the request.
    async fn prepare(&self, job: &Job) -> Result<LocalJob, Error> {
        let state = &job.state;
        let req = &job.req;
        let requested = job.model.as_deref();
        let (model, routed) = match (requested, state.router()) {
            (None, Some(router)) => {
                let routed = route_off_thread(router.clone(), req, &job.request_id).await?;
                let model = state.engine().resolve_model(Some(&routed.model))?;
                (model, Some(routed))
            }
            (requested, _) => (state.engine().resolve_model(requested)?, None),
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
        let deadline_at = job.deadline_at();
        let left = deadline_at.map(|t| t.saturating_duration_since(Instant::now()));
        let ticket = state.admission.admit_for(&req.app, left)?;
        let give_up_at = deadline_at
            .zip(left)
            .map(|(t, left)| t - ferry_daemon::deadline::margin(left));
        let mut placement = placement_for(&model, req, requested, routed.as_ref());
        if let Some(lead) = &job.lead {
            placement.reason = format!("{}; {}", lead.reason, placement.reason);
            placement.fallback = lead.fallback;
        }
        Ok(LocalJob {
            model,
            routed,
            prompt,
            ticket,
            give_up_at,
            placement,
        })
    }

    async fn run(&self, job: Job, prepared: LocalJob, tx: mpsc::Sender<Item>) -> Ran {
        run(job, prepared, tx).await;
        Ran::Ended
    }
}

/// Runs an admitted local request to the end, streaming into `tx`.
async fn run(job: Job, prepared: LocalJob, tx: mpsc::Sender<Item>) {
    let Job {
        state,
        req,
        request_id,
        arrived,
        placed,
        ..
    } = job;
    let LocalJob {
        model,
        routed,
        prompt,
        ticket,
        give_up_at,
        placement,
    } = prepared;
    let queue_expired = async move {
        match give_up_at {
            Some(t) => tokio::time::sleep_until(t).await,
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
            ledger::finish(state.book(), &booking(arrived.elapsed().as_secs_f64() * 1e3), End::Abandoned);
            return;
        }
        _ = state.abort.cancelled() => {
            let _ = tx.send(Err(Status::unavailable("ferryd is shutting down"))).await;
            return;
        }
        _ = queue_expired => {
            let waited_ms = arrived.elapsed().as_millis();
            tracing::info!(request_id = %request_id, waited_ms = waited_ms as u64, "deadline reached while queued");
            ledger::finish(state.book(), &booking(waited_ms as f64), End::Failed { outcome: "deadline" });
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
    let engine = state.engine().clone();
    let abort = state.abort.clone();
    let gen_model = model.clone();
    let gen_tx = tx.clone();
    let sampling = req.sampling.clone();
    let judged = routed.as_ref().is_some_and(|r| r.judge);
    let result = tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let mut sink = ChannelSink {
            tx: gen_tx,
            abort,
            arrived,
            give_up_at,
            delivered: Delivered::new(judged),
        };
        // Energy is charged from here: queue time is not busy time.
        let (out, energy) = engine.generate_metered(&gen_model, &prompt, &sampling, &mut sink);
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
                state.book(),
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
                ledger::completion_undelivered(state.book());
            }
            drop(tx);
            let joules = energy.as_ref().map(|e| e.joules);
            ledger::teach_placer(
                state.placement.as_ref(),
                placed.as_ref(),
                total_ms / 1e3,
                PlacedCost::Local { joules },
            );
            if let Some(routed) = routed {
                let costs = RouteCosts {
                    served_joules: joules,
                    served_text: delivered.text.clone(),
                    also: run_also(&state, &routed, &req, slot).await,
                };
                if let Some(router) = state.router().cloned() {
                    ledger::teach_router(
                        &state,
                        router,
                        &routed,
                        &request_id,
                        question(&req),
                        costs,
                    );
                }
            }
        }
        Err(Error::Cancelled(why)) if state.abort.is_cancelled() && !tx.is_closed() => {
            ledger::finish(state.book(), &booking(total_ms), cut("shutdown"));
            let status = ended(
                tonic::Code::Unavailable,
                format!("ferryd shut down before the request finished ({why})"),
            );
            let _ = tx.send(Err(status)).await;
        }
        Err(Error::Cancelled(_)) if past_deadline && !tx.is_closed() => {
            ledger::finish(state.book(), &booking(total_ms), cut("deadline"));
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
            ledger::finish(state.book(), &booking(total_ms), End::Abandoned);
        }
        Err(e) => {
            tracing::warn!(request_id = %request_id, error = %e, "generation failed");
            ledger::finish(state.book(), &booking(total_ms), cut("failed"));
            let status: Status = e.into();
            let _ = tx
                .send(Err(ended(status.code(), status.message().to_string())))
                .await;
        }
    }
}

/// Runs the models the router wants beside the served one (`Routed::also`: the rest of the zoo
/// on a MESS+ exploration step, one model on a mixrank shadow step) on the same prompt, after
/// the app has its answer, holding the request's `slot`, to measure what each costs; their
/// answers are kept when the judge grades this request.
async fn run_also(
    state: &Arc<AppState>,
    routed: &Routed,
    req: &ValidatedRequest,
    slot: Option<ferry_daemon::admission::Slot>,
) -> Vec<(usize, Option<f64>, Option<String>)> {
    let Some(router) = state.router() else {
        return Vec::new();
    };
    if routed.also.is_empty() {
        return Vec::new();
    }
    let zoo = router.zoo();
    let others: Vec<(usize, Arc<LoadedModel>)> = routed
        .also
        .iter()
        .filter_map(|&i| state.model(zoo.get(i)?).map(|m| (i, m)))
        .collect();
    let engine = state.engine().clone();
    let abort = state.abort.clone();
    let messages = req.messages.clone();
    let sampling = req.sampling.clone();
    let judge = routed.judge;
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (i, model) in others {
            let Ok(prompt) = model.encode_chat(&messages) else {
                continue;
            };
            let mut sink = crate::judge::Collect {
                text: judge.then(String::new),
                abort: abort.clone(),
            };
            let (result, energy) = engine.generate_metered(&model, &prompt, &sampling, &mut sink);
            if result.is_ok() {
                out.push((i, Some(energy.joules), sink.text));
            }
        }
        drop(slot);
        out
    })
    .await
    .unwrap_or_default()
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
