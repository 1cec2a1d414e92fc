//! `ferry.v1.Offload` over the configured backends.
//!
//! Generate validates a request synchronously (request id, model, deadline, content, limits,
//! capabilities), then runs it on a task: wait for an execution slot, drive the model's backend,
//! forward its deltas, and close with an `OffloadCompletion` carrying usage, energy, cost and
//! latency. The handler waits for the first event before answering, so a failure before the
//! first token (unknown upstream model, unreachable engine, deadline) is the call's own status
//! and the edge can still fall back. The deadline is the earlier of the request's `timeout_ms`
//! and the gRPC deadline; when it passes the request ends with DEADLINE_EXCEEDED and its
//! backend is stopped.
//!
//! Until the models are loaded (ferry-cloud listens before it loads) every call answers
//! UNAVAILABLE, so that probes and clients see a live but not yet ready server.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use ferry_core::{Error, ErrorKind, ValidatedRequest};
use ferry_daemon::admission::{Admission, Ticket};
use ferry_daemon::auth::Auth;
use ferry_proto::v1 as pb;
use pb::offload_server::Offload;

use crate::backend::{Backend, BackendOutcome, BackendRequest, Failure};
use crate::config::{CloudConfig, ModelConfig};
use crate::metrics;

/// The status of every call while the models load.
pub const LOADING: &str = "ferry-cloud is still loading its models";

/// Longest accepted request id.
const MAX_REQUEST_ID_BYTES: usize = 256;

/// One model of the cloud zoo with what serves it.
pub struct CloudModel {
    pub config: ModelConfig,
    /// What ListModels reports.
    pub info: pb::ModelInfo,
    pub backend: Arc<dyn Backend>,
}

/// A finished answer kept for retries.
#[derive(Clone)]
struct Stored {
    model: String,
    text: String,
    completion: pb::OffloadCompletion,
}

/// Request ids running now, and finished answers (bounded, oldest evicted first).
#[derive(Default)]
struct Replay {
    capacity: usize,
    running: HashSet<String>,
    done: HashMap<String, Stored>,
    order: VecDeque<String>,
}

enum Begin {
    New,
    Running,
    Done(Box<Stored>),
}

impl Replay {
    fn begin(&mut self, id: &str) -> Begin {
        if let Some(s) = self.done.get(id) {
            return Begin::Done(Box::new(s.clone()));
        }
        if !self.running.insert(id.to_string()) {
            return Begin::Running;
        }
        Begin::New
    }

    fn finish(&mut self, id: &str, stored: Option<Stored>) {
        self.running.remove(id);
        let Some(stored) = stored else { return };
        if self.capacity == 0 {
            return;
        }
        if self.done.insert(id.to_string(), stored).is_none() {
            self.order.push_back(id.to_string());
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.done.remove(&old);
            }
        }
    }
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub rejected: AtomicU64,
    pub replayed: AtomicU64,
}

/// Everything the service shares.
pub struct CloudState {
    pub config: CloudConfig,
    /// The zoo, set once when the models are loaded.
    models: OnceLock<Vec<Arc<CloudModel>>>,
    pub stats: Stats,
    /// Bearer tokens (`auth.tokens_file`); off when unset.
    pub auth: Auth,
    /// Cancelled at the end of the shutdown grace period: in-flight requests stop.
    pub abort: CancellationToken,
    draining: AtomicBool,
    /// Slots and queue, with the expected-wait refusal (`ferry_daemon::admission`, ferryd's too).
    admission: Admission,
    in_system: AtomicUsize,
    replay: Mutex<Replay>,
    seed: AtomicU64,
}

impl ferry_daemon::Daemon for CloudState {
    fn auth(&self) -> &Auth {
        &self.auth
    }
    fn is_ready(&self) -> bool {
        CloudState::is_ready(self)
    }
    fn is_draining(&self) -> bool {
        CloudState::is_draining(self)
    }
    fn in_flight(&self) -> usize {
        self.in_system()
    }
    fn token_refused(&self, surface: &'static str, _error: &Error) {
        crate::metrics::auth_refused(surface);
    }
    fn refresh_gauges(&self) {
        crate::metrics::set_load_gauges(
            self.running(),
            self.in_system(),
            self.is_ready() && !self.is_draining(),
        );
    }
}

impl CloudState {
    /// State with no models yet (every call UNAVAILABLE until [`CloudState::set_models`]).
    pub fn new(config: CloudConfig, auth: Auth) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        CloudState {
            admission: Admission::new(config.server.max_concurrent, config.server.max_queue),
            replay: Mutex::new(Replay {
                capacity: config.server.replay_cache,
                ..Default::default()
            }),
            config,
            models: OnceLock::new(),
            stats: Stats::default(),
            auth,
            abort: CancellationToken::new(),
            draining: AtomicBool::new(false),
            in_system: AtomicUsize::new(0),
            seed: AtomicU64::new(seed),
        }
    }

    /// Installs the loaded zoo; false (and nothing changes) when it was already set.
    pub fn set_models(&self, models: Vec<Arc<CloudModel>>) -> bool {
        self.models.set(models).is_ok()
    }

    /// The zoo; empty while loading.
    pub fn models(&self) -> &[Arc<CloudModel>] {
        self.models.get().map(Vec::as_slice).unwrap_or(&[])
    }

    /// True once the models are loaded.
    pub fn is_ready(&self) -> bool {
        self.models.get().is_some()
    }

    /// The model with this id.
    pub fn model(&self, id: &str) -> Option<&Arc<CloudModel>> {
        self.models().iter().find(|m| m.config.id == id)
    }

    /// Requests generating now (holding an execution slot).
    pub fn running(&self) -> usize {
        self.admission.running()
    }

    /// Requests admitted and not finished (waiting or generating).
    pub fn in_system(&self) -> usize {
        self.in_system.load(Ordering::SeqCst)
    }

    /// Refuse new requests from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn next_seed(&self) -> u64 {
        self.seed
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
    }
}

/// Holds a request's place in the system and its request id; releases both when dropped.
struct Admitted {
    state: Arc<CloudState>,
    request_id: String,
    stored: Option<Stored>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.state.in_system.fetch_sub(1, Ordering::SeqCst);
        self.state
            .replay
            .lock()
            .finish(&self.request_id, self.stored.take());
    }
}

type Item = Result<pb::OffloadResponse, Status>;
/// The response stream of Generate.
pub type EventStream = Pin<Box<dyn Stream<Item = Item> + Send>>;

fn delta(text: String) -> pb::OffloadResponse {
    pb::OffloadResponse {
        event: Some(pb::offload_response::Event::Delta(pb::TextDelta { text })),
    }
}

fn completion(c: pb::OffloadCompletion) -> pb::OffloadResponse {
    pb::OffloadResponse {
        event: Some(pb::offload_response::Event::Completion(c)),
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct OffloadService {
    state: Arc<CloudState>,
}

impl OffloadService {
    pub fn new(state: Arc<CloudState>) -> Self {
        OffloadService { state }
    }

    /// Validates and admits a request of `app` (the caller's bearer token name; edges take
    /// turns for the slots) and starts it; returns the receiving end of its events.
    fn start(
        &self,
        req: pb::OffloadRequest,
        grpc_deadline: Option<Duration>,
        app: &str,
    ) -> Result<mpsc::Receiver<Item>, Failure> {
        let arrived = Instant::now();
        let state = &self.state;
        if state.is_draining() {
            return Err(Error::Unavailable("ferry-cloud is shutting down".into()).into());
        }
        if !state.is_ready() {
            return Err(Failure::new(ErrorKind::Unavailable, LOADING));
        }
        let request_id = req.request_id.trim().to_string();
        if request_id.is_empty() {
            return Err(
                Error::invalid("request_id", "is required (it makes retries idempotent)").into(),
            );
        }
        if request_id.len() > MAX_REQUEST_ID_BYTES {
            return Err(Error::invalid(
                "request_id",
                format!("longer than {MAX_REQUEST_ID_BYTES} bytes"),
            )
            .into());
        }
        if req.model.trim().is_empty() || req.model == "auto" {
            return Err(Error::invalid(
                "model",
                "name a cloud model from ListModels (the edge chooses; `auto` is not served here)",
            )
            .into());
        }
        let model = state
            .model(&req.model)
            .cloned()
            .ok_or_else(|| Error::ModelNotFound(req.model.clone()))?;
        let timeout = match req.timeout_ms {
            Some(0) => {
                return Err(Error::invalid(
                    "timeout_ms",
                    "must be at least 1 (leave it unset for no deadline)",
                )
                .into())
            }
            Some(ms) => Some(Duration::from_millis(u64::from(ms))),
            None => None,
        };
        let budget = match (timeout, grpc_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let validated = ValidatedRequest::from_proto(
            pb::GenerateRequest {
                model: req.model.clone(),
                messages: req.messages,
                max_tokens: req.max_tokens,
                temperature: req.temperature,
                top_p: req.top_p,
                top_k: req.top_k,
                seed: req.seed,
                stop: req.stop,
                request_id: request_id.clone(),
                // Edge-only fields (dialogue, placement task) do not cross to the cloud.
                ..Default::default()
            },
            &state.config.limits,
            state.next_seed(),
        )?;
        if !model.info.capabilities.iter().any(|c| c == "image") {
            for (i, m) in validated.messages.iter().enumerate() {
                if m.images().next().is_some() {
                    return Err(Error::invalid(
                        format!("messages[{i}]"),
                        format!(
                            "model `{}` does not accept images (capabilities: {})",
                            model.config.id,
                            model.info.capabilities.join(", ")
                        ),
                    )
                    .into());
                }
            }
        }

        let (tx, rx) = mpsc::channel::<Item>(64);
        let begun = state.replay.lock().begin(&request_id);
        match begun {
            Begin::Done(stored) if stored.model == model.config.id => {
                state.stats.replayed.fetch_add(1, Ordering::Relaxed);
                metrics::replayed(&model.config.id);
                let mut c = stored.completion;
                c.replayed = true;
                if !stored.text.is_empty() {
                    tx.try_send(Ok(delta(stored.text))).ok();
                }
                tx.try_send(Ok(completion(c))).ok();
                return Ok(rx);
            }
            Begin::Done(stored) => {
                return Err(Error::FailedPrecondition(format!(
                    "request `{request_id}` already ran on model `{}`; use a new request id for another model",
                    stored.model
                ))
                .into())
            }
            Begin::Running => {
                return Err(Error::FailedPrecondition(format!(
                    "request `{request_id}` is already running"
                ))
                .into())
            }
            Begin::New => {}
        }
        // Count, then look at the drain flag again (both sequentially consistent, as is the
        // drain's set-flag-then-read-count): a request past the first check cannot slip between
        // the drain's "nothing in flight" and its stop.
        state.in_system.fetch_add(1, Ordering::SeqCst);
        let admitted = Admitted {
            state: state.clone(),
            request_id: request_id.clone(),
            stored: None,
        };
        if state.is_draining() {
            drop(admitted);
            return Err(Error::Unavailable("ferry-cloud is shutting down".into()).into());
        }
        // Refused at once when full, or when the expected wait for a slot exceeds the
        // request's budget: the edge then falls back at once, naming the wait, instead of
        // learning it from a timeout.
        let ticket = match state.admission.admit_for(app, budget) {
            Ok(t) => t,
            Err(e) => {
                drop(admitted);
                return Err(e.into());
            }
        };
        let breq = BackendRequest {
            request_id,
            messages: validated.messages,
            sampling: validated.sampling,
            stop: CancellationToken::new(),
        };
        tokio::spawn(run(
            state.clone(),
            model,
            breq,
            arrived,
            budget,
            tx,
            (admitted, ticket),
        ));
        Ok(rx)
    }
}

/// Runs one admitted request to its end.
async fn run(
    state: Arc<CloudState>,
    model: Arc<CloudModel>,
    req: BackendRequest,
    arrived: Instant,
    budget: Option<Duration>,
    tx: mpsc::Sender<Item>,
    (mut admitted, ticket): (Admitted, Ticket),
) {
    let request_id = req.request_id.clone();
    let _stop_on_exit = req.stop.clone().drop_guard();
    let deadline = budget.map(|b| tokio::time::Instant::from_std(arrived + b));
    let expired = async move {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    // A queued request gives up a little before its deadline and says it found no slot, so the
    // edge hears "busy" (RESOURCE_EXHAUSTED: fall back, the endpoint is not failing) instead of
    // its own transport timeout, which would count against the endpoint's circuit.
    let queue_deadline =
        deadline.map(|d| d - budget.map_or(Duration::ZERO, ferry_daemon::deadline::margin));
    let queue_expired = async move {
        match queue_deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let deadline_failure = |stage: &str| {
        Failure::new(
            ErrorKind::DeadlineExceeded,
            format!(
                "the request's deadline of {} ms passed {stage} (after {} ms)",
                budget.map(|b| b.as_millis()).unwrap_or(0),
                arrived.elapsed().as_millis()
            ),
        )
    };
    let backend = model.backend.kind();
    let fail = |f: Failure| {
        state.stats.failed.fetch_add(1, Ordering::Relaxed);
        let outcome = if state.abort.is_cancelled() {
            "shutdown"
        } else if f.kind == ErrorKind::DeadlineExceeded {
            "deadline"
        } else if f.kind == ErrorKind::ResourceExhausted {
            "busy"
        } else {
            "failed"
        };
        metrics::request_ended(&model.config.id, backend, outcome);
        tracing::info!(request_id = %request_id, model = %model.config.id, error = %f, "request failed");
        Err::<pb::OffloadResponse, Status>(f.into())
    };
    let gone = || {
        tracing::info!(request_id = %request_id, "client went away");
        metrics::request_ended(&model.config.id, backend, "cancelled");
    };

    let running = state.admission.max_concurrent();
    let slot = tokio::select! {
        slot = ticket.run() => slot,
        _ = queue_expired => {
            let item = fail(Failure::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "no slot free within {} ms of the request's deadline of {} ms ({running} \
                     running): ferry-cloud is busy",
                    arrived.elapsed().as_millis(),
                    budget.map(|b| b.as_millis()).unwrap_or(0),
                ),
            ));
            drop(admitted);
            let _ = tx.send(item).await;
            return;
        }
        _ = state.abort.cancelled() => {
            let item = fail(Failure::new(ErrorKind::Unavailable, "ferry-cloud is shutting down"));
            drop(admitted);
            let _ = tx.send(item).await;
            return;
        }
        _ = tx.closed() => {
            gone();
            return;
        }
    };
    let queue_ms = arrived.elapsed().as_secs_f64() * 1e3;

    let (dtx, mut drx) = mpsc::channel::<String>(64);
    let generation = model.backend.generate(req, dtx);
    tokio::pin!(generation);
    let mut text = String::new();
    let mut first_ms: Option<f64> = None;
    let result = loop {
        tokio::select! {
            biased;
            Some(d) = drx.recv() => {
                first_ms.get_or_insert_with(|| arrived.elapsed().as_secs_f64() * 1e3);
                text.push_str(&d);
                if tx.send(Ok(delta(d))).await.is_err() {
                    gone();
                    return;
                }
            }
            r = &mut generation => break r,
            _ = &mut expired => break Err(deadline_failure("while generating")),
            _ = state.abort.cancelled() => break Err(Failure::new(
                ErrorKind::Unavailable,
                "ferry-cloud shut down before the request finished",
            )),
            _ = tx.closed() => {
                gone();
                return;
            }
        }
    };
    // Deltas sent just before the backend returned.
    while let Ok(d) = drx.try_recv() {
        first_ms.get_or_insert_with(|| arrived.elapsed().as_secs_f64() * 1e3);
        text.push_str(&d);
        if tx.send(Ok(delta(d))).await.is_err() {
            gone();
            return;
        }
    }
    drop(slot);
    let out: BackendOutcome = match result {
        Ok(out) => out,
        Err(f) if f.kind == ErrorKind::Cancelled && tx.is_closed() => {
            gone();
            return;
        }
        Err(f) => {
            // The id is free again before the caller hears of the failure.
            let item = fail(f);
            drop(admitted);
            let _ = tx.send(item).await;
            return;
        }
    };
    let total_ms = arrived.elapsed().as_secs_f64() * 1e3;
    let tokens = f64::from(out.prompt_tokens) + f64::from(out.completion_tokens);
    let energy = match (&out.energy, model.info.joules_per_token) {
        (Some(e), _) => pb::Energy {
            joules: Some(e.joules),
            source: e.source.clone(),
            devices: e.devices.clone(),
        },
        (None, Some(jpt)) => pb::Energy {
            joules: Some(jpt * tokens),
            source: "hint".to_string(),
            devices: Vec::new(),
        },
        (None, None) => pb::Energy {
            joules: None,
            source: "none".to_string(),
            devices: Vec::new(),
        },
    };
    let finish: pb::FinishReason = out.finish_reason.into();
    let done = pb::OffloadCompletion {
        request_id: request_id.clone(),
        model: model.config.id.clone(),
        finish_reason: finish as i32,
        usage: Some(pb::Usage {
            prompt_tokens: out.prompt_tokens,
            completion_tokens: out.completion_tokens,
        }),
        energy: Some(energy),
        cost_usd: model.info.usd_per_million_tokens.map(|p| p * tokens / 1e6),
        latency: Some(pb::Latency {
            time_to_first_token_ms: first_ms.unwrap_or(total_ms),
            total_ms,
            queue_ms,
        }),
        backend: model.backend.kind().to_string(),
        replayed: false,
    };
    tracing::info!(
        request_id = %request_id,
        model = %model.config.id,
        backend = model.backend.kind(),
        prompt_tokens = out.prompt_tokens,
        completion_tokens = out.completion_tokens,
        joules = done.energy.as_ref().and_then(|e| e.joules),
        cost_usd = done.cost_usd,
        total_ms = total_ms as u64,
        "request finished"
    );
    state.stats.completed.fetch_add(1, Ordering::Relaxed);
    metrics::request_ok(metrics::Finished {
        model: &model.config.id,
        backend,
        prompt_tokens: out.prompt_tokens,
        completion_tokens: out.completion_tokens,
        total_s: total_ms / 1e3,
        first_token_s: first_ms.map(|ms| ms / 1e3),
        queue_s: queue_ms / 1e3,
        energy: done
            .energy
            .as_ref()
            .and_then(|e| e.joules.map(|j| (j, e.source.as_str()))),
    });
    // Stored (and the id released) before the caller has the completion, so that a retry
    // right after it replays.
    admitted.stored = Some(Stored {
        model: model.config.id.clone(),
        text,
        completion: done.clone(),
    });
    drop(admitted);
    let _ = tx.send(Ok(completion(done))).await;
}

#[tonic::async_trait]
impl Offload for OffloadService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<pb::OffloadRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let grpc_deadline = ferry_daemon::deadline::grpc_timeout(request.metadata());
        let app = request
            .extensions()
            .get::<ferry_daemon::auth::AppName>()
            .map(|a| a.0.clone())
            .unwrap_or_default();
        let mut rx = match self.start(request.into_inner(), grpc_deadline, &app) {
            Ok(rx) => rx,
            Err(f) => {
                self.state.stats.rejected.fetch_add(1, Ordering::Relaxed);
                metrics::request_rejected(f.kind);
                tracing::debug!(error = %f, "request refused");
                return Err(f.into());
            }
        };
        // A failure before the first event is the call's status.
        match rx.recv().await {
            Some(Ok(first)) => {
                let rest = ReceiverStream::new(rx);
                let stream = tokio_stream::once(Ok(first)).chain(rest);
                Ok(Response::new(Box::pin(stream)))
            }
            Some(Err(status)) => Err(status),
            None => Err(Status::internal("the request ended without an answer")),
        }
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        if !self.state.is_ready() {
            return Err(Status::unavailable(LOADING));
        }
        let models = self.state.models().iter().map(|m| m.info.clone()).collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keeps_a_bounded_set_of_answers() {
        let mut r = Replay {
            capacity: 2,
            ..Default::default()
        };
        let stored = |m: &str| Stored {
            model: m.into(),
            text: "hi".into(),
            completion: pb::OffloadCompletion::default(),
        };
        assert!(matches!(r.begin("a"), Begin::New));
        assert!(matches!(r.begin("a"), Begin::Running));
        r.finish("a", Some(stored("m")));
        assert!(matches!(r.begin("a"), Begin::Done(_)));
        for id in ["b", "c"] {
            assert!(matches!(r.begin(id), Begin::New));
            r.finish(id, Some(stored("m")));
        }
        assert!(matches!(r.begin("a"), Begin::New), "evicted");
        r.finish("a", None);
        assert!(
            matches!(r.begin("a"), Begin::New),
            "failures are not stored"
        );
    }
}
