//! The cloud tier as ferryd sees it: the ferry-cloud endpoints it may offload to, their health,
//! their circuit breakers, the cloud zoo they list, and the client that sends one offload.
//!
//! Each endpoint is one gRPC channel (plaintext on loopback, or TLS with rustls and, when a client
//! certificate is configured, mutual TLS), optionally with a bearer token on every call. A
//! background task probes each endpoint's `grpc.health.v1` status for `ferry.v1.Offload` and
//! refreshes the cloud zoo from `ListModels`. An endpoint that answers its probe with anything
//! but SERVING, or cannot be reached, is not chosen until a probe succeeds again; one that is only
//! slow to answer (no answer within `health_timeout_ms`) keeps its place until
//! `failure_threshold` probes in a row have gone unanswered, because a cloud busy generating on
//! every core answers late without being down (one late probe used to send the next two seconds
//! of offloads home). Fallbacks for want of a healthy endpoint name the probes' last errors.
//!
//! Requests feed a circuit breaker per endpoint (linkerd2-proxy's failure accrual, simplified):
//! `failure_threshold` consecutive failures before the first token open it; while open the
//! endpoint is skipped; after `open_ms` one trial request is let through (half-open), and its
//! success closes the circuit while its failure opens it again. Load balancing picks, among the
//! endpoints that are healthy, whose circuit lets a request through and that list the model, the
//! one with the fewest offloads in flight (ties rotate).

use parking_lot::{Mutex, RwLock};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use ferry_core::auth::Bearer;
use ferry_core::{Error, Result};
use ferry_proto::v1 as pb;
use pb::offload_client::OffloadClient;

/// Largest gRPC message accepted from ferry-cloud.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// What to do when an offloaded request sees no first token within its time budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeadline {
    /// Run the request locally instead (the completion says `fallback` and why).
    Fallback,
    /// End the request with DEADLINE_EXCEEDED.
    Error,
}

/// `[cloud]` settings: the ferry-cloud endpoints and how ferryd talks to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// ferry-cloud gRPC endpoints, `http://host:port` (plaintext) or `https://host:port` (TLS).
    /// Empty: no cloud tier; every request runs locally.
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) that signed the endpoints' server certificates. Required for
    /// `https://` endpoints (no system roots are trusted).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) presented to ferry-cloud: mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Name checked against the server certificate; unset: the endpoint's host.
    pub tls_domain: Option<String>,
    /// File holding the bearer token sent to ferry-cloud (the token itself, one line).
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the bearer token (used when `token_file` is unset).
    pub token_env: Option<String>,
    /// Milliseconds to establish a connection to an endpoint.
    pub connect_timeout_ms: u64,
    /// Time budget of an offloaded request when the app sets no deadline (the app's deadline,
    /// when sooner, wins).
    pub request_timeout_ms: u64,
    /// Endpoints tried for one request before the first token (then local fallback).
    pub max_attempts: usize,
    /// What a request whose first token did not arrive within its budget does.
    pub on_deadline: OnDeadline,
    /// Health probe period and timeout, milliseconds.
    pub health_interval_ms: u64,
    pub health_timeout_ms: u64,
    /// Consecutive failures that open an endpoint's circuit.
    pub failure_threshold: u32,
    /// How long an open circuit stays open before one trial request, milliseconds.
    pub open_ms: u64,
    /// Route `auto` requests placed in the cloud with MESS+ over the cloud zoo (needs
    /// `router.enabled`); off, they go to `default_model`.
    pub route_auto: bool,
    /// Cloud model for `auto` requests placed in the cloud when not routed; unset: the
    /// cheapest model the cloud lists.
    pub default_model: Option<String>,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            endpoints: Vec::new(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_domain: None,
            token_file: None,
            token_env: None,
            connect_timeout_ms: 1_000,
            request_timeout_ms: 120_000,
            max_attempts: 2,
            on_deadline: OnDeadline::Fallback,
            health_interval_ms: 2_000,
            health_timeout_ms: 1_000,
            failure_threshold: 3,
            open_ms: 5_000,
            route_auto: true,
            default_model: None,
        }
    }
}

impl CloudConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| Error::invalid(format!("cloud.{field}"), reason);
        for (i, e) in self.endpoints.iter().enumerate() {
            let uri: http_uri::Uri = e
                .parse()
                .map_err(|err| bad(&format!("endpoints[{i}]"), format!("`{e}`: {err}")))?;
            match uri.scheme_str() {
                Some("http") => {}
                Some("https") if self.ca_file.is_none() => {
                    return Err(bad(
                        "ca_file",
                        format!("`{e}` uses TLS, so the CA that signed ferry-cloud's certificate is needed (`ferry certs dev` makes one for development)"),
                    ))
                }
                Some("https") => {}
                _ => {
                    return Err(bad(
                        &format!("endpoints[{i}]"),
                        format!("`{e}` must start with http:// or https://"),
                    ))
                }
            }
            if uri.host().is_none() {
                return Err(bad(
                    &format!("endpoints[{i}]"),
                    format!("`{e}` has no host"),
                ));
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(bad(
                "cert_file",
                "cert_file and key_file go together (the client identity for mutual TLS)".into(),
            ));
        }
        if self.max_attempts == 0 {
            return Err(bad("max_attempts", "must be at least 1".into()));
        }
        if self.failure_threshold == 0 {
            return Err(bad("failure_threshold", "must be at least 1".into()));
        }
        for (name, v) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("health_interval_ms", self.health_interval_ms),
            ("health_timeout_ms", self.health_timeout_ms),
        ] {
            if v == 0 {
                return Err(bad(name, "must be above 0".into()));
            }
        }
        Ok(())
    }
}

// `http::Uri` through tonic's re-export, without a direct dependency on `http`.
mod http_uri {
    pub use tonic::codegen::http::Uri;
}

/// State of an endpoint's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests flow.
    Closed,
    /// Requests are refused until `open_ms` passed.
    Open,
    /// One trial request is in flight; its outcome closes or reopens the circuit.
    HalfOpen,
}

impl CircuitState {
    /// Lower-case name for status and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open => 2.0,
        }
    }
}

/// A circuit breaker over consecutive failures; pure (time is passed in) so it can be tested.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: CircuitState,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    threshold: u32,
    open_for: Duration,
    /// Times the circuit opened, for status.
    pub opened_total: u64,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive failures for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Breaker {
            state: CircuitState::Closed,
            consecutive_failures: 0,
            opened_at: None,
            threshold: threshold.max(1),
            open_for,
            opened_total: 0,
        }
    }

    /// The state as of `now` (an open circuit whose time is up reads as half-open-ready).
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Whether a request could go through at `now`, without reserving it.
    pub fn would_allow(&self, now: Instant) -> bool {
        match self.state {
            CircuitState::Closed => true,
            CircuitState::HalfOpen => false,
            CircuitState::Open => self
                .opened_at
                .is_some_and(|t| now.duration_since(t) >= self.open_for),
        }
    }

    /// Lets a request through at `now` if the circuit allows it; an open circuit whose time is
    /// up lets exactly one trial through and becomes half-open.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            CircuitState::Closed => true,
            CircuitState::HalfOpen => false,
            CircuitState::Open if self.would_allow(now) => {
                self.state = CircuitState::HalfOpen;
                true
            }
            CircuitState::Open => false,
        }
    }

    /// A request succeeded (its first token arrived): the circuit closes.
    pub fn success(&mut self) {
        self.state = CircuitState::Closed;
        self.consecutive_failures = 0;
        self.opened_at = None;
    }

    /// A request failed before its first token at `now`.
    pub fn failure(&mut self, now: Instant) {
        match self.state {
            CircuitState::HalfOpen => self.open(now),
            CircuitState::Closed => {
                self.consecutive_failures += 1;
                if self.consecutive_failures >= self.threshold {
                    self.open(now);
                }
            }
            // A request let through before the circuit opened failed late: nothing new.
            CircuitState::Open => {}
        }
    }

    /// A trial request ended without telling anything (cancelled by its app): let the next one try.
    pub fn release_trial(&mut self, now: Instant) {
        if self.state == CircuitState::HalfOpen {
            self.state = CircuitState::Open;
            // Already waited: the next request may try at once.
            self.opened_at = now.checked_sub(self.open_for).or(Some(now));
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = CircuitState::Open;
        self.opened_at = Some(now);
        self.consecutive_failures = 0;
        self.opened_total += 1;
    }
}

/// One ferry-cloud endpoint.
pub struct Endpoint {
    /// As configured, e.g. `https://cloud-0:50061`; also the metrics label.
    pub uri: String,
    channel: Channel,
    breaker: Mutex<Breaker>,
    /// Last probe result; endpoints start healthy so the first request need not wait a probe.
    healthy: AtomicBool,
    in_flight: AtomicUsize,
    /// The models this endpoint listed (empty until the first successful ListModels).
    models: RwLock<Vec<pb::ModelInfo>>,
    /// Why the last probe failed.
    last_error: Mutex<Option<String>>,
    /// Probes in a row that got no answer in time.
    unanswered: AtomicU32,
}

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

/// What `Status` shows of an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStatus {
    pub uri: String,
    pub healthy: bool,
    pub circuit: CircuitState,
    pub in_flight: usize,
    pub models: Vec<String>,
    pub circuit_opened_total: u64,
    pub last_error: Option<String>,
}

impl Endpoint {
    fn status(&self) -> EndpointStatus {
        let b = self.breaker.lock();
        EndpointStatus {
            uri: self.uri.clone(),
            healthy: self.healthy.load(Ordering::Acquire),
            circuit: b.state(),
            in_flight: self.in_flight.load(Ordering::Acquire),
            models: self.models.read().iter().map(|m| m.id.clone()).collect(),
            circuit_opened_total: b.opened_total,
            last_error: self.last_error.lock().clone(),
        }
    }

    fn serves(&self, model: &str) -> bool {
        let models = self.models.read();
        // Not listed yet: let the request find out.
        models.is_empty() || models.iter().any(|m| m.id == model)
    }

    fn export_circuit(&self, state: CircuitState) {
        metrics::gauge!("ferry_cloud_circuit_state", "endpoint" => self.uri.clone())
            .set(state.gauge());
    }
}

/// An Offload client on one endpoint's channel with the bearer token.
pub type Client = OffloadClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A reservation of one endpoint for one offload attempt; books the outcome on its breaker.
pub struct Lease {
    pool: Arc<CloudPool>,
    index: usize,
    settled: bool,
}

impl Lease {
    /// The endpoint's URI.
    pub fn uri(&self) -> &str {
        &self.pool.endpoints[self.index].uri
    }

    /// Index of the endpoint in the pool.
    pub fn index(&self) -> usize {
        self.index
    }

    /// A client on this endpoint.
    pub fn client(&self) -> Client {
        self.pool.client(self.index)
    }

    /// The first token arrived (or the request completed): the endpoint works.
    pub fn succeeded(&mut self) {
        if !self.settled {
            self.settled = true;
            let ep = &self.pool.endpoints[self.index];
            let mut b = ep.breaker.lock();
            b.success();
            ep.export_circuit(b.state());
        }
    }

    /// The attempt failed before its first token because of the endpoint (refused, timeout,
    /// UNAVAILABLE, internal error).
    pub fn failed(&mut self) {
        if !self.settled {
            self.settled = true;
            let ep = &self.pool.endpoints[self.index];
            let mut b = ep.breaker.lock();
            let before = b.state();
            b.failure(Instant::now());
            if b.state() == CircuitState::Open && before != CircuitState::Open {
                tracing::warn!(endpoint = %ep.uri, "circuit opened: offloads skip this endpoint for {} ms", b.open_for.as_millis());
            }
            ep.export_circuit(b.state());
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let ep = &self.pool.endpoints[self.index];
        ep.in_flight.fetch_sub(1, Ordering::AcqRel);
        if !self.settled {
            // Ended without a verdict (the app left, or the error was the request's own): a
            // half-open trial must not wedge the circuit.
            let mut b = ep.breaker.lock();
            b.release_trial(Instant::now());
            ep.export_circuit(b.state());
        }
    }
}

/// Why no endpoint could take a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoEndpoint {
    /// No endpoint lists the model.
    UnknownModel,
    /// Every endpoint that could serve it failed its last probe.
    Unhealthy,
    /// Every healthy endpoint that could serve it has its circuit open.
    CircuitOpen,
    /// All candidates were already tried for this request.
    Exhausted,
}

impl NoEndpoint {
    /// Short label for metrics and the fallback reason.
    pub fn as_str(&self) -> &'static str {
        match self {
            NoEndpoint::UnknownModel => "model_not_listed",
            NoEndpoint::Unhealthy => "no_healthy_endpoint",
            NoEndpoint::CircuitOpen => "circuit_open",
            NoEndpoint::Exhausted => "endpoints_exhausted",
        }
    }
}

/// The configured endpoints.
pub struct CloudPool {
    pub cfg: CloudConfig,
    endpoints: Vec<Endpoint>,
    bearer: Bearer,
    rotate: AtomicUsize,
    /// Offloads in flight over all endpoints (including their fallbacks' hand-over), for drain.
    in_flight: AtomicUsize,
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))
}

fn load_token(cfg: &CloudConfig) -> Result<Option<String>> {
    let token = match (&cfg.token_file, &cfg.token_env) {
        (Some(path), _) => {
            let bytes = read(path, "cloud token file")?;
            Some(String::from_utf8_lossy(&bytes).trim().to_string())
        }
        (None, Some(var)) => match std::env::var(var) {
            Ok(v) => Some(v.trim().to_string()),
            Err(_) => {
                return Err(Error::invalid(
                    "cloud.token_env",
                    format!("environment variable `{var}` is not set"),
                ))
            }
        },
        (None, None) => None,
    };
    match token {
        Some(t) if t.is_empty() => Err(Error::invalid("cloud.token_file", "the token is empty")),
        other => Ok(other),
    }
}

impl CloudPool {
    /// Builds the channels (connecting lazily); `None` when no endpoint is configured.
    pub fn from_config(cfg: &CloudConfig) -> Result<Option<Arc<Self>>> {
        if cfg.endpoints.is_empty() {
            return Ok(None);
        }
        cfg.validate()?;
        let token = load_token(cfg)?;
        let bearer = Bearer::new(token.as_deref(), "cloud.token_file")?;
        let tls = match &cfg.ca_file {
            Some(ca) => {
                let mut tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(ca, "cloud CA")?));
                if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
                    tls = tls.identity(Identity::from_pem(
                        read(cert, "client certificate")?,
                        read(key, "client key")?,
                    ));
                }
                if let Some(d) = &cfg.tls_domain {
                    tls = tls.domain_name(d.clone());
                }
                Some(tls)
            }
            None => None,
        };
        let mut endpoints = Vec::with_capacity(cfg.endpoints.len());
        for uri in &cfg.endpoints {
            let mut ep = Channel::from_shared(uri.clone())
                .map_err(|e| Error::invalid("cloud.endpoints", format!("`{uri}`: {e}")))?
                .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true);
            if uri.starts_with("https://") {
                let tls = tls.clone().expect("validated: https needs ca_file");
                ep = ep.tls_config(tls).map_err(|e| {
                    Error::invalid("cloud", format!("TLS settings for `{uri}`: {e}"))
                })?;
            }
            let channel = ep.connect_lazy();
            endpoints.push(Endpoint {
                uri: uri.clone(),
                channel,
                breaker: Mutex::new(Breaker::new(
                    cfg.failure_threshold,
                    Duration::from_millis(cfg.open_ms),
                )),
                healthy: AtomicBool::new(true),
                in_flight: AtomicUsize::new(0),
                models: RwLock::new(Vec::new()),
                last_error: Mutex::new(None),
                unanswered: AtomicU32::new(0),
            });
        }
        for ep in &endpoints {
            ep.export_circuit(CircuitState::Closed);
        }
        tracing::info!(endpoints = ?cfg.endpoints, tls = tls.is_some(), mutual_tls = cfg.cert_file.is_some(), token = bearer.is_set(), "cloud tier configured");
        Ok(Some(Arc::new(CloudPool {
            cfg: cfg.clone(),
            endpoints,
            bearer,
            rotate: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
        })))
    }

    fn client(&self, index: usize) -> Client {
        OffloadClient::with_interceptor(self.endpoints[index].channel.clone(), self.bearer.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The cloud zoo: every model some endpoint listed (first listing wins), in listing order.
    pub fn models(&self) -> Vec<pb::ModelInfo> {
        let mut out: Vec<pb::ModelInfo> = Vec::new();
        for ep in &self.endpoints {
            for m in ep.models.read().iter() {
                if !out.iter().any(|x| x.id == m.id) {
                    out.push(m.clone());
                }
            }
        }
        out
    }

    /// A listed cloud model by id.
    pub fn model(&self, id: &str) -> Option<pb::ModelInfo> {
        self.endpoints
            .iter()
            .find_map(|ep| ep.models.read().iter().find(|m| m.id == id).cloned())
    }

    /// Whether some endpoint lists `id`.
    pub fn lists(&self, id: &str) -> bool {
        self.endpoints
            .iter()
            .any(|ep| ep.models.read().iter().any(|m| m.id == id))
    }

    /// Reserves the best endpoint for `model`, skipping those in `tried`.
    pub fn acquire(
        self: &Arc<Self>,
        model: &str,
        tried: &[usize],
    ) -> std::result::Result<Lease, NoEndpoint> {
        let now = Instant::now();
        let n = self.endpoints.len();
        let start = self.rotate.fetch_add(1, Ordering::Relaxed);
        let mut serving = 0usize;
        let mut healthy = 0usize;
        let mut candidates: Vec<(usize, usize)> = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            let ep = &self.endpoints[i];
            if !ep.serves(model) {
                continue;
            }
            serving += 1;
            if !ep.healthy.load(Ordering::Acquire) {
                continue;
            }
            healthy += 1;
            if tried.contains(&i) {
                continue;
            }
            if !ep.breaker.lock().would_allow(now) {
                continue;
            }
            candidates.push((ep.in_flight.load(Ordering::Acquire), i));
        }
        // Stable sort keeps the rotation among equally loaded endpoints.
        candidates.sort_by_key(|&(load, _)| load);
        for (_, i) in candidates {
            let ep = &self.endpoints[i];
            let mut b = ep.breaker.lock();
            if b.allow(now) {
                ep.export_circuit(b.state());
                drop(b);
                ep.in_flight.fetch_add(1, Ordering::AcqRel);
                return Ok(Lease {
                    pool: self.clone(),
                    index: i,
                    settled: false,
                });
            }
        }
        Err(if serving == 0 {
            NoEndpoint::UnknownModel
        } else if healthy == 0 {
            NoEndpoint::Unhealthy
        } else if self.endpoints.iter().enumerate().any(|(i, ep)| {
            !tried.contains(&i) && ep.serves(model) && ep.healthy.load(Ordering::Acquire)
        }) {
            NoEndpoint::CircuitOpen
        } else {
            NoEndpoint::Exhausted
        })
    }

    /// The last probe errors of the endpoints that list `model`, for a fallback's reason
    /// (e.g. `http://cloud-0:50061: no health answer within 1000 ms`).
    pub fn probe_errors(&self, model: &str) -> String {
        self.endpoints
            .iter()
            .filter(|ep| ep.serves(model))
            .filter_map(|ep| {
                let e = ep.last_error.lock();
                e.as_ref().map(|e| format!("{}: {e}", ep.uri))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Status of every endpoint.
    pub fn status(&self) -> Vec<EndpointStatus> {
        self.endpoints.iter().map(Endpoint::status).collect()
    }

    /// Offloads in flight (drain waits for them).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts one offloaded request until the guard drops.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

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

/// One offloaded request in flight.
pub struct InFlight(Arc<CloudPool>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a failure before the first token is the endpoint's (try another, or fall back) rather
/// than the request's own (bad input: tell the app).
pub fn is_endpoint_failure(code: tonic::Code) -> bool {
    // CANCELLED from the server is its grpc-timeout firing (the edge's own cancellations are
    // never read back), so it counts as the endpoint's.
    !matches!(
        code,
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::PermissionDenied
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn breaker_opens_after_threshold_and_closes_after_a_good_trial() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_millis(100));
        for _ in 0..2 {
            assert!(b.allow(t0));
            b.failure(t0);
            assert_eq!(b.state(), CircuitState::Closed);
        }
        b.failure(t0);
        assert_eq!(b.state(), CircuitState::Open);
        assert!(!b.allow(t0 + Duration::from_millis(50)));
        // Time is up: exactly one trial.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.allow(t1));
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(!b.allow(t1));
        b.success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.allow(t1));
        assert_eq!(b.opened_total, 1);
    }

    /// The pool reads the clock through `tokio::time::Instant`, so its circuit can be tested
    /// in paused time: open for exactly `open_ms`, then one trial.
    #[tokio::test(start_paused = true)]
    async fn an_open_circuit_lets_one_trial_through_after_open_ms() {
        let cfg = CloudConfig {
            endpoints: vec!["http://127.0.0.1:9".into()],
            failure_threshold: 1,
            open_ms: 5_000,
            ..CloudConfig::default()
        };
        let pool = CloudPool::from_config(&cfg).unwrap().unwrap();
        pool.endpoints[0].models.write().push(pb::ModelInfo {
            id: "m".into(),
            ..Default::default()
        });
        pool.acquire("m", &[]).unwrap().failed();
        assert_eq!(pool.acquire("m", &[]).err(), Some(NoEndpoint::CircuitOpen));
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert_eq!(pool.acquire("m", &[]).err(), Some(NoEndpoint::CircuitOpen));
        tokio::time::advance(Duration::from_millis(1)).await;
        let trial = pool
            .acquire("m", &[])
            .expect("the cool-down is over: one trial");
        assert_eq!(pool.acquire("m", &[]).err(), Some(NoEndpoint::CircuitOpen));
        drop(trial);
    }

    #[test]
    fn a_failed_trial_reopens_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, Duration::from_millis(10));
        b.failure(t0);
        b.success();
        b.failure(t0);
        assert_eq!(b.state(), CircuitState::Closed, "the count restarted");
        b.failure(t0);
        assert_eq!(b.state(), CircuitState::Open);
        let t1 = t0 + Duration::from_millis(10);
        assert!(b.allow(t1));
        b.failure(t1);
        assert_eq!(b.state(), CircuitState::Open);
        assert!(!b.allow(t1 + Duration::from_millis(5)));
        assert_eq!(b.opened_total, 2);
    }

    #[test]
    fn an_abandoned_trial_lets_the_next_request_try() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_millis(10));
        b.failure(t0);
        let t1 = t0 + Duration::from_millis(10);
        assert!(b.allow(t1));
        b.release_trial(t1);
        assert_eq!(b.state(), CircuitState::Open);
        assert!(b.allow(t1));
    }

    proptest! {
        /// Whatever happens, an open circuit never lets a request through before its time, and
        /// a half-open one lets through nothing until its trial ends.
        #[test]
        fn breaker_never_lets_through_while_open(ops in proptest::collection::vec((0u8..4, 0u64..30), 1..200)) {
            let t0 = Instant::now();
            let mut b = Breaker::new(3, Duration::from_millis(20));
            let mut now = t0;
            let mut opened_at = None;
            for (op, dt) in ops {
                now += Duration::from_millis(dt);
                let before = b.state();
                match op {
                    0 => {
                        let allowed = b.allow(now);
                        match before {
                            CircuitState::HalfOpen => prop_assert!(!allowed),
                            CircuitState::Open => {
                                let waited = now.duration_since(opened_at.unwrap()) >= Duration::from_millis(20);
                                prop_assert_eq!(allowed, waited);
                            }
                            CircuitState::Closed => prop_assert!(allowed),
                        }
                    }
                    1 => b.failure(now),
                    2 => b.success(),
                    _ => b.release_trial(now),
                }
                if b.state() == CircuitState::Open && before != CircuitState::Open {
                    opened_at = Some(if op == 3 { now - Duration::from_millis(20) } else { now });
                }
            }
        }
    }

    #[test]
    fn config_checks_endpoints_and_tls_files() {
        let ok = CloudConfig {
            endpoints: vec!["http://127.0.0.1:50061".into()],
            ..CloudConfig::default()
        };
        ok.validate().unwrap();
        let tls_without_ca = CloudConfig {
            endpoints: vec!["https://cloud:50061".into()],
            ..CloudConfig::default()
        };
        assert!(tls_without_ca
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ca_file"));
        let bad_scheme = CloudConfig {
            endpoints: vec!["ftp://x".into()],
            ..CloudConfig::default()
        };
        assert!(bad_scheme.validate().is_err());
        let half_identity = CloudConfig {
            endpoints: vec!["http://127.0.0.1:1".into()],
            cert_file: Some("a.pem".into()),
            ..CloudConfig::default()
        };
        assert!(half_identity
            .validate()
            .unwrap_err()
            .to_string()
            .contains("key_file"));
    }
}
