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
//!
//! This module is the pool (endpoints, leases, load balancing, the client and its TLS); the
//! settings are in `config`, the breaker in `breaker`, the probes in `health`, one offload call
//! as the wire carries it in `offload`.

use parking_lot::{Mutex, RwLock};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use ferry_core::token::Bearer;
use ferry_core::{Error, Result};
use ferry_proto::v1 as pb;
use pb::offload_client::OffloadClient;

mod breaker;
mod config;
mod health;
pub(crate) mod offload;

pub use breaker::{Breaker, CircuitState};
pub use config::{CloudConfig, OnDeadline};
pub use health::{healthy_after, ProbeOutcome};

/// Largest gRPC message accepted from ferry-cloud.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

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
}
