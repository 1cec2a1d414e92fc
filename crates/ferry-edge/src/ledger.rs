//! The ledger: the one place where the end of a request that ferryd started is booked, on
//! either tier — the outcome counter `Status` shows, the `ferry_requests_total` metric with the
//! latency and token metrics of a completed request, the request record that `Feedback` refers
//! to, and the log line.
//!
//! What ends a request, and how it is booked:
//! - [`End::Completed`]: a full answer. Counted completed, recorded, timed.
//! - [`End::Cut`]: an error status after the app already had part of the text (deadline,
//!   shutdown, a cloud stream that broke). Counted failed and recorded with what was delivered,
//!   so Feedback on the partial answer still finds its request.
//! - [`End::Failed`]: an error status before any text. Counted failed.
//! - [`End::Abandoned`]: the app left. Counted abandoned.
//!
//! A request refused before its stream started (bad input, full queue, not ready) is booked
//! by [`refused`]: counted rejected, by reason.
//!
//! The policies are taught here too, once the tier knows what the request cost: the placement
//! policy by [`teach_placer`], a tier's router by [`teach_router`] (after the models that run
//! beside the served one, which the tier runs first) or [`forget_route`] when no answer came.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_router::tmo::Action;

use crate::placement::{Placement, Placer};
use crate::records::{unix_ms, RequestRecord};
use crate::router::{Routed, ZooRouter};
use crate::state::{AppState, Book, ServerStats};

/// Which request ended, where, and after how long.
pub(crate) struct Booking<'a> {
    pub request_id: &'a str,
    /// `local` or `cloud`.
    pub tier: &'static str,
    pub model: &'a str,
    /// From arrival to the end.
    pub total_ms: f64,
}

/// How a request ended.
pub(crate) enum End {
    Completed {
        finish_reason: String,
        prompt_tokens: u32,
        completion_tokens: u32,
        first_token_ms: Option<f64>,
        /// For the log line: the measured joules, the time waited for a slot, the cloud's price.
        joules: Option<f64>,
        queue_ms: Option<f64>,
        cost_usd: Option<f64>,
    },
    /// An error status after `delivered_deltas` deltas reached the app (`outcome`: `deadline`,
    /// `shutdown`, `interrupted`, `failed`).
    Cut {
        outcome: &'static str,
        delivered_deltas: u64,
    },
    /// An error status before any text (`outcome`: `deadline`, `shutdown`, `failed`).
    Failed {
        outcome: &'static str,
    },
    Abandoned,
}

/// Books the end of a request: counter, metrics, record, log.
pub(crate) fn finish(book: Book<'_>, b: &Booking, end: End) {
    let stats = book.stats;
    let record = |finish_reason: String, prompt_tokens: u32, completion_tokens: u32| {
        book.records.insert(RequestRecord {
            request_id: b.request_id.to_string(),
            model: b.model.to_string(),
            tier: b.tier,
            finish_reason,
            prompt_tokens,
            completion_tokens,
            total_ms: b.total_ms,
            finished_unix_ms: unix_ms(),
        });
    };
    match end {
        End::Completed {
            finish_reason,
            prompt_tokens,
            completion_tokens,
            first_token_ms,
            joules,
            queue_ms,
            cost_usd,
        } => {
            tracing::info!(
                request_id = %b.request_id,
                tier = b.tier,
                model = %b.model,
                prompt_tokens,
                completion_tokens,
                finish = %finish_reason,
                joules,
                cost_usd,
                queue_ms = queue_ms.map(|q| q as u64),
                total_ms = b.total_ms as u64,
                "request finished"
            );
            record(finish_reason, prompt_tokens, completion_tokens);
            stats.requests_completed.fetch_add(1, Ordering::Relaxed);
            crate::metrics::request_finished(
                b.tier,
                b.model,
                "ok",
                u64::from(prompt_tokens),
                u64::from(completion_tokens),
                b.total_ms / 1e3,
                first_token_ms.map(|ms| ms / 1e3),
            );
        }
        End::Cut {
            outcome,
            delivered_deltas,
        } => {
            tracing::info!(request_id = %b.request_id, tier = b.tier, model = %b.model, outcome, deltas = delivered_deltas, total_ms = b.total_ms as u64, "request ended after part of its text");
            record(
                outcome.to_string(),
                0,
                u32::try_from(delivered_deltas).unwrap_or(u32::MAX),
            );
            failed(stats, b, outcome);
        }
        End::Failed { outcome } => {
            tracing::info!(request_id = %b.request_id, tier = b.tier, model = %b.model, outcome, total_ms = b.total_ms as u64, "request ended without an answer");
            failed(stats, b, outcome);
        }
        End::Abandoned => {
            tracing::info!(request_id = %b.request_id, tier = b.tier, model = %b.model, total_ms = b.total_ms as u64, "the app went away");
            stats.requests_abandoned.fetch_add(1, Ordering::Relaxed);
            crate::metrics::request_finished(
                b.tier,
                b.model,
                "cancelled",
                0,
                0,
                b.total_ms / 1e3,
                None,
            );
        }
    }
}

/// Counts a request that ended with an error status, and its metric.
fn failed(stats: &ServerStats, b: &Booking, outcome: &'static str) {
    stats.requests_failed.fetch_add(1, Ordering::Relaxed);
    crate::metrics::request_finished(b.tier, b.model, outcome, 0, 0, b.total_ms / 1e3, None);
}

/// Books a request refused before its stream started; returns the error for the app.
pub(crate) fn refused(book: Book<'_>, e: ferry_core::Error) -> ferry_core::Error {
    book.stats.requests_rejected.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(error = %e, "request refused");
    crate::metrics::request_rejected(e.kind());
    e
}

/// The app went away after its completion was produced but before it could be sent: the request
/// stays completed (it was served and paid for) and is also counted abandoned.
pub(crate) fn completion_undelivered(book: Book<'_>) {
    book.stats
        .requests_abandoned
        .fetch_add(1, Ordering::Relaxed);
}

/// What a placed request cost on the tier that ran it.
pub(crate) enum PlacedCost {
    /// Ran here, with the joules measured (when a source measured them).
    Local { joules: Option<f64> },
    /// Offloaded with the views in `executed`, at the cloud's price.
    Cloud { executed: Action, usd: f64 },
}

/// Teaches the placement policy what the request it placed cost (`latency_s` from arrival to
/// the end). Nothing without a placement.
pub(crate) fn teach_placer(
    placer: Option<&Placer>,
    placed: Option<&Placement>,
    latency_s: f64,
    cost: PlacedCost,
) {
    let (Some(placer), Some(p)) = (placer, placed) else {
        return;
    };
    match cost {
        PlacedCost::Local { joules } => placer.record_local(p, latency_s, joules),
        PlacedCost::Cloud { executed, usd } => placer.record(p, executed, latency_s, usd),
    }
}

/// What a routed request's models cost, and what they answered when the judge grades them.
#[derive(Default)]
pub(crate) struct RouteCosts {
    /// The served model's joules (measured here, reported by the cloud, or estimated).
    pub served_joules: Option<f64>,
    /// The served answer, kept when the judge grades this request.
    pub served_text: Option<String>,
    /// The models that ran beside it ([`Routed::also`]): zoo index, joules, and the answer when
    /// judged.
    pub also: Vec<(usize, Option<f64>, Option<String>)>,
}

/// Teaches `router` what its request cost, and hands the answers to the judge when it grades
/// this request (`question` is what it grades them against).
pub(crate) fn teach_router(
    state: &Arc<AppState>,
    router: Arc<ZooRouter>,
    routed: &Routed,
    request_id: &str,
    question: String,
    costs: RouteCosts,
) {
    let mut joules = vec![None; router.zoo().len()];
    if let Some(j) = joules.get_mut(routed.served) {
        *j = costs.served_joules;
    }
    let mut answers: Vec<(usize, String)> = costs
        .served_text
        .filter(|_| routed.judge)
        .map(|t| (routed.served, t))
        .into_iter()
        .collect();
    for (i, j, text) in costs.also {
        if let Some(slot) = joules.get_mut(i) {
            *slot = j;
        }
        if let Some(t) = text.filter(|_| routed.judge) {
            answers.push((i, t));
        }
    }
    router.finished(routed, &joules);
    if routed.judge {
        crate::judge::spawn(
            state.clone(),
            router,
            request_id.to_string(),
            question,
            answers,
        );
    }
}

/// A routed request that ended without an answer to learn from: its router forgets it.
pub(crate) fn forget_route(router: &ZooRouter, request_id: &str) {
    router.abandon(request_id);
}
