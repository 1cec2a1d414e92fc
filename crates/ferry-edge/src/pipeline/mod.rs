//! ferryd's request path, in one direction: [`dispatch`] places a request and picks its tier,
//! a [`Tier`] runs it ([`local`]: the candle engine; [`cloud`]: an offload to ferry-cloud), and
//! `crate::ledger` books its end and teaches the policies.
//!
//! A tier has two steps, so that what can refuse a request is answered with a status before any
//! stream starts: [`Tier::prepare`] (choose the model, check the prompt, admit) and [`Tier::run`]
//! (stream the answer). A tier that fails before its first token may hand the request back
//! ([`Ran::Declined`]); `dispatch` then runs it on the local tier with `fallback: true` and the
//! reason. Nothing here imports `dispatch` or the gRPC service, and the tiers do not import each
//! other.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;
use tonic::Status;

use ferry_core::{Error, Role, ValidatedRequest};
use ferry_proto::v1 as pb;

use crate::placement::Placement;
use crate::router::{Routed, ZooRouter};
use crate::state::AppState;

pub(crate) mod cloud;
pub(crate) mod dispatch;
pub(crate) mod local;

/// One item of a response stream.
pub(crate) type Item = Result<pb::GenerateResponse, Status>;

/// A validated request on its way through the pipeline, whichever tier runs it.
pub(crate) struct Job {
    pub state: Arc<AppState>,
    pub req: ValidatedRequest,
    pub request_id: String,
    pub arrived: Instant,
    /// The app's deadline, as time left when the request arrived.
    pub deadline: Option<Duration>,
    /// Where the placement policy put it, when one is configured.
    pub placed: Option<Placement>,
    /// The model the tier must run; `None` lets the tier's router (or default) choose.
    pub model: Option<String>,
    /// What the completion's placement reason starts with, and whether this run is a fallback.
    pub lead: Option<Lead>,
}

/// The start of a completion's placement: why the request is on this tier.
pub(crate) struct Lead {
    pub reason: String,
    pub fallback: bool,
}

impl Job {
    /// When the app's deadline passes.
    pub fn deadline_at(&self) -> Option<Instant> {
        self.deadline.map(|d| self.arrived + d)
    }

    /// Milliseconds since the request arrived.
    pub fn elapsed_ms(&self) -> f64 {
        self.arrived.elapsed().as_secs_f64() * 1e3
    }
}

/// Why a tier handed a request back before its first token.
pub(crate) struct Declined {
    /// Metrics label (bounded).
    pub label: &'static str,
    /// For the completion's reason.
    pub why: String,
}

/// What a tier did with a request.
pub(crate) enum Ran {
    /// The request ended on this tier (answered, failed with a status, or the app left) and is
    /// booked in the ledger.
    Ended,
    /// The tier could not start the answer; the request may run on another tier.
    Declined(Box<Job>, Declined),
}

/// One tier of ferryd: where a request can run. Shaped like ferry-cloud's `Backend`: one seam,
/// and one way to hand a request back.
#[tonic::async_trait]
pub(crate) trait Tier: Send + Sync {
    /// What [`Tier::prepare`] hands [`Tier::run`].
    type Prepared: Send;

    /// Everything that can refuse the request before its stream starts: an unknown model, a
    /// prompt over the limits, a full queue. The error goes back to the app as its status.
    async fn prepare(&self, job: &Job) -> Result<Self::Prepared, Error>;

    /// Runs a prepared request, streaming into `tx`, to its end (booked in the ledger), or hands
    /// it back before its first token.
    async fn run(&self, job: Job, prepared: Self::Prepared, tx: mpsc::Sender<Item>) -> Ran;
}

/// Routes `req` (question, task, whether feedback will come) on a blocking thread: embedding
/// the question and deciding are CPU work that must not hold an async worker.
pub(crate) async fn route_off_thread(
    router: Arc<ZooRouter>,
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
