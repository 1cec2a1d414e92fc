//! The one way into ferryd's request path, for gRPC `Generate` and the OpenAI API alike:
//! validate, place (TMO), pick the tier, run it, and fall back to the local tier when the cloud
//! hands the request back before its first token.
//!
//! Everything that refuses a request (draining, still loading, bad input, an unknown model, a
//! prompt over the limits, a full queue) is answered here, before any stream starts, and booked
//! by `ledger::refused`; after that the tier streams and the ledger books the end.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use ferry_core::{Error, ValidatedRequest};
use ferry_proto::v1 as pb;

use super::cloud::{CloudTarget, CloudTier};
use super::local::LocalTier;
use super::{Declined, Item, Job, Lead, Ran, Tier};
use crate::ledger;
use crate::state::AppState;

/// Validates, places, routes and admits a request, then streams it from a task of its own.
/// `deadline` is the app's (time left when the request arrived): it bounds an offload and the
/// wait in the queue. `app` is the calling app (its bearer token's name), which takes its turn
/// in the queue.
pub(crate) async fn dispatch(
    state: &Arc<AppState>,
    request: pb::GenerateRequest,
    deadline: Option<Duration>,
    app: Option<&crate::auth::AppName>,
) -> Result<ReceiverStream<Item>, Error> {
    let arrived = Instant::now();
    state
        .stats
        .requests_received
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let refuse = |e: Error| ledger::refused(state.book(), e);
    let open = state.enter().map_err(refuse)?;
    if !state.is_ready() {
        return Err(refuse(Error::Unavailable(
            "ferryd is still loading its models".into(),
        )));
    }
    let mut req = ValidatedRequest::from_proto(request, &state.config.limits, state.next_seed())
        .map_err(refuse)?;
    if let Some(app) = app {
        req.app = app.0.clone();
    }
    let request_id = req
        .request_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    // Where it runs (TMO), then which model of that tier (its router or the named one).
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
    let target = cloud_target(state, &req, placed.as_ref()).map_err(refuse)?;
    let lead = placed.as_ref().map(|p| Lead {
        reason: p.reason.clone(),
        fallback: p.fallback,
    });
    let job = Job {
        state: state.clone(),
        model: req.model.clone(),
        req,
        request_id,
        arrived,
        deadline,
        placed,
        lead,
    };
    let (tx, rx) = mpsc::channel::<Item>(64);
    match (target, state.cloud.clone()) {
        (Some(target), Some(pool)) => {
            let cloud = CloudTier { pool, target };
            let prepared = cloud.prepare(&job).await.map_err(refuse)?;
            tokio::spawn(async move {
                let _open = open;
                if let Ran::Declined(job, why) = cloud.run(job, prepared, tx.clone()).await {
                    fall_back(*job, why, &cloud.target, tx).await;
                }
            });
        }
        _ => {
            let prepared = LocalTier.prepare(&job).await.map_err(refuse)?;
            tokio::spawn(async move {
                let _open = open;
                LocalTier.run(job, prepared, tx).await
            });
        }
    }
    Ok(ReceiverStream::new(rx))
}

/// The cloud model the request is for, or `None` when it runs here: a named model no local
/// manifest has but a cloud endpoint lists, or `auto` placed in the cloud. A named model that
/// neither tier has is refused.
fn cloud_target(
    state: &AppState,
    req: &ValidatedRequest,
    placed: Option<&crate::placement::Placement>,
) -> Result<Option<CloudTarget>, Error> {
    let Some(pool) = &state.cloud else {
        return Ok(None);
    };
    match req.model.as_deref() {
        Some(id) if state.manifests.iter().any(|m| m.id == id) => Ok(None),
        Some(id) if pool.lists(id) => Ok(Some(CloudTarget::Named(id.to_string()))),
        Some(id) => Err(Error::ModelNotFound(format!(
            "{id} (not a local model, and no cloud endpoint lists it)"
        ))),
        None if placed.is_some_and(|p| !p.executed.is_local()) => Ok(Some(CloudTarget::Auto)),
        None => Ok(None),
    }
}

/// Runs the request locally after the cloud handed it back before its first token; the
/// completion says `fallback: true` and why.
async fn fall_back(mut job: Job, declined: Declined, target: &CloudTarget, tx: mpsc::Sender<Item>) {
    metrics::counter!("ferry_fallbacks_total", "from_tier" => "cloud", "reason" => declined.label)
        .increment(1);
    tracing::warn!(request_id = %job.request_id, reason = %declined.why, "offload failed before the first token; running locally");
    let lead = match (target, &job.placed) {
        (CloudTarget::Named(m), _) => format!("cloud model `{m}` named by the request"),
        (CloudTarget::Auto, Some(p)) => p.reason.clone(),
        (CloudTarget::Auto, None) => "placed in the cloud".to_string(),
    };
    let reason = format!(
        "{lead}; fallback to local: {} ({})",
        declined.label.replace('_', " "),
        declined.why
    );
    // Whatever the request named is a cloud model: locally, `auto` chooses.
    job.model = None;
    job.lead = Some(Lead {
        reason: reason.clone(),
        fallback: true,
    });
    match LocalTier.prepare(&job).await {
        Ok(prepared) => {
            LocalTier.run(job, prepared, tx).await;
        }
        Err(e) => {
            let e = ledger::refused(job.state.book(), e);
            let _ = tx
                .send(Err(Status::new(
                    e.kind().grpc_code(),
                    format!("{reason}; the local tier refused it too: {e}"),
                )))
                .await;
        }
    }
}
