//! Starting and stopping ferry-cloud: bind the gRPC and HTTP listeners first (health
//! NOT_SERVING, `/readyz` 503, Offload UNAVAILABLE), then build the backends (loading the
//! candle models), then turn SERVING; serve `ferry.v1.Offload` with the standard health and
//! reflection services, and drain gracefully.
//!
//! Security (`[tls]`, `[auth]`): the gRPC listener speaks TLS when `tls.cert_file` is set and
//! requires a client certificate signed by `tls.client_ca_file` when that is set (mutual TLS,
//! checked in the handshake); with `auth.tokens_file`, `Offload` and reflection also need an
//! `authorization: Bearer <token>` header. Health stays open to whoever completes the
//! handshake, for probes; it reveals nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use ferry_core::{Error, ModelManifest, Result, Tier};
use ferry_daemon::auth::Auth;
use ferry_energy::meter::EnergyMeter;
use ferry_engine::LoadedModel;
use ferry_proto::v1 as pb;
use pb::offload_server::{OffloadServer, SERVICE_NAME};

use crate::backend::Backend;
use crate::candle::CandleBackend;
use crate::config::{BackendKind, CloudConfig, TlsConfig};
use crate::openai::OpenAiBackend;
use crate::service::{CloudModel, CloudState, OffloadService};

/// Builds every configured model's backend; loads the candle models (blocking: call it from a
/// blocking thread).
pub fn build_models(config: &CloudConfig) -> Result<Vec<Arc<CloudModel>>> {
    let needs_candle = config
        .models
        .iter()
        .any(|m| m.backend == BackendKind::Candle);
    let (manifests, energy) = if needs_candle {
        let manifests = ModelManifest::load_dir(&config.candle.manifest_dir)?;
        let sources = ferry_energy::open_sources(&config.energy)
            .map_err(|e| Error::invalid("energy.sources", e.to_string()))?;
        let meter = EnergyMeter::start(sources, config.energy.sample_hz)
            .map_err(|e| Error::invalid("energy", e.to_string()))?;
        tracing::info!(source = meter.source_label(), devices = ?meter.devices(), "energy metering");
        (manifests, Some(Arc::new(meter)))
    } else {
        (Vec::new(), None)
    };
    let device = ferry_engine::default_device();
    let mut out = Vec::with_capacity(config.models.len());
    for m in &config.models {
        let (backend, family, context_length, caps, usd, jpt): (Arc<dyn Backend>, _, _, _, _, _) =
            match m.backend {
                BackendKind::Candle => {
                    let manifest_id = m.manifest.as_deref().unwrap_or(&m.id);
                    let manifest =
                        manifests
                            .iter()
                            .find(|x| x.id == manifest_id)
                            .ok_or_else(|| {
                                Error::invalid(
                                    format!("models[{}].manifest", m.id),
                                    format!(
                                        "no manifest `{manifest_id}` in {}",
                                        config.candle.manifest_dir.display()
                                    ),
                                )
                            })?;
                    tracing::info!(model = %m.id, manifest = %manifest_id, "loading candle model");
                    let loaded = LoadedModel::load(manifest, &config.candle.model_dir, &device)?;
                    // Serving starts warm: the first request pays no first-touch costs.
                    let warm_up_ms = loaded.warm_up()?;
                    tracing::info!(model = %m.id, warm_up_ms = warm_up_ms as u64, "warmed up");
                    let loaded = Arc::new(loaded);
                    let info = loaded.info().clone();
                    let energy = energy.clone().expect("meter opened for candle models");
                    (
                        Arc::new(CandleBackend::new(
                            loaded,
                            energy,
                            config.limits.max_prompt_tokens,
                            config.server.max_concurrent,
                        )?),
                        info.family,
                        info.context_length as u32,
                        m.capabilities
                            .clone()
                            .unwrap_or_else(|| manifest.capabilities.clone()),
                        m.usd_per_million_tokens
                            .or(manifest.cost.usd_per_million_tokens),
                        m.joules_per_token.or(manifest.cost.joules_per_token),
                    )
                }
                BackendKind::Openai => (
                    Arc::new(OpenAiBackend::new(m)?),
                    m.family.clone().unwrap_or_default(),
                    m.context_length.unwrap_or(0),
                    m.capabilities
                        .clone()
                        .unwrap_or_else(|| vec!["text".to_string()]),
                    m.usd_per_million_tokens,
                    m.joules_per_token,
                ),
            };
        let info = pb::ModelInfo {
            id: m.id.clone(),
            family,
            tier: pb::Tier::Cloud as i32,
            capabilities: caps,
            context_length,
            loaded: true,
            is_default: false,
            usd_per_million_tokens: usd,
            joules_per_token: jpt,
        };
        debug_assert_eq!(Tier::Cloud.as_str(), "cloud");
        out.push(Arc::new(CloudModel {
            config: m.clone(),
            info,
            backend,
        }));
    }
    Ok(out)
}

/// The gRPC listener's TLS from `[tls]`; `None` is plaintext. Reads the PEM files (an unreadable
/// one is an error naming its key); their contents are checked when the server is built.
pub fn server_tls(tls: &TlsConfig) -> Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) else {
        return Ok(None);
    };
    let read = |field: &str, path: &Path| {
        std::fs::read(path).map_err(|e| Error::io(format!("reading {field} {}", path.display()), e))
    };
    let identity = Identity::from_pem(read("tls.cert_file", cert)?, read("tls.key_file", key)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        // Required, not optional: a client without a certificate from this CA fails the handshake.
        config = config
            .client_ca_root(Certificate::from_pem(read("tls.client_ca_file", ca)?))
            .client_auth_optional(false);
    }
    Ok(Some(config))
}

/// A gRPC server builder with `[tls]` applied.
fn server_builder(tls: &TlsConfig) -> Result<Server> {
    let builder = Server::builder();
    match server_tls(tls)? {
        None => Ok(builder),
        Some(config) => builder.tls_config(config).map_err(|e| {
            Error::invalid(
                "tls",
                format!(
                    "cannot use the certificate/key in {} / {}{}: {e}",
                    tls.cert_file.as_deref().unwrap_or(Path::new("")).display(),
                    tls.key_file.as_deref().unwrap_or(Path::new("")).display(),
                    tls.client_ca_file
                        .as_deref()
                        .map(|p| format!(" (client CA {})", p.display()))
                        .unwrap_or_default()
                ),
            )
        }),
    }
}

/// A running ferry-cloud.
pub struct CloudServer {
    /// The bound gRPC address (useful with port 0).
    pub local_addr: SocketAddr,
    /// The bound HTTP address of the probes and metrics, when `server.http_enabled`.
    pub http_addr: Option<SocketAddr>,
    pub state: Arc<CloudState>,
    health: HealthReporter,
    stop_tx: watch::Sender<bool>,
    server: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    http_server: Option<JoinHandle<std::io::Result<()>>>,
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    ferry_daemon::grpc::set_health(health, SERVICE_NAME, status).await;
}

impl CloudServer {
    /// Binds and serves, then loads the models: [`CloudServer::bind`] followed by
    /// [`CloudServer::load`]. Health is SERVING once this returns; a loading failure closes
    /// the listeners and is returned.
    pub async fn start(config: CloudConfig) -> Result<Self> {
        let server = Self::bind(config).await?;
        match server.load().await {
            Ok(()) => Ok(server),
            Err(e) => {
                server.shutdown(Duration::ZERO).await;
                Err(e)
            }
        }
    }

    /// Validates the config, reads the token file and certificates, binds the gRPC and HTTP
    /// listeners and serves them with no models yet: gRPC health NOT_SERVING, every Offload
    /// call UNAVAILABLE ("still loading"), `/readyz` 503, until [`CloudServer::load`].
    pub async fn bind(config: CloudConfig) -> Result<Self> {
        config.validate()?;
        let auth = Auth::from_config(&config.auth)?;
        let builder = server_builder(&config.tls)?;
        if !config.server.listen.ip().is_loopback() && auth.enabled() && !config.tls.enabled() {
            tracing::warn!(
                addr = %config.server.listen,
                "bearer tokens over plaintext beyond loopback: set tls.cert_file/tls.key_file so they cannot be read off the network"
            );
        }
        let state = Arc::new(CloudState::new(config, auth));

        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;
        let reflection = ferry_daemon::grpc::reflection()?;
        let offload = OffloadServer::new(OffloadService::new(state.clone()))
            .max_decoding_message_size(ferry_daemon::grpc::MAX_MESSAGE_BYTES);
        let mut builder = builder;
        let router = if state.auth.enabled() {
            let check = ferry_daemon::grpc::TokenCheck(state.clone());
            builder
                .add_service(health_service)
                .add_service(tonic::service::interceptor::InterceptedService::new(
                    reflection,
                    check.clone(),
                ))
                .add_service(tonic::service::interceptor::InterceptedService::new(
                    offload, check,
                ))
        } else {
            builder
                .add_service(health_service)
                .add_service(reflection)
                .add_service(offload)
        };

        let addr = state.config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("binding gRPC address {addr}"), e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the bound address", e))?;
        let http_listener = if state.config.server.http_enabled {
            let addr = state.config.server.http_addr;
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("binding HTTP address {addr}"), e))?;
            Some(l)
        } else {
            None
        };

        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let server = tokio::spawn(router.serve_with_incoming_shutdown(
            ferry_daemon::grpc::incoming(listener),
            stopped(stop_rx.clone()),
        ));
        tracing::info!(
            addr = %local_addr,
            tls = state.config.tls.enabled(),
            mutual_tls = state.config.tls.mutual(),
            tokens = state.auth.enabled(),
            "serving ferry.v1.Offload (NOT_SERVING until the models are loaded)"
        );

        let mut http_addr = None;
        let mut http_server = None;
        if let Some(listener) = http_listener {
            ferry_daemon::telemetry::install();
            let bound = listener
                .local_addr()
                .map_err(|e| Error::io("reading the bound HTTP address", e))?;
            let app = crate::http::router(state.clone());
            let stop = stopped(stop_rx);
            http_server = Some(tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
            }));
            tracing::info!(addr = %bound, "serving HTTP (/healthz, /readyz, /metrics)");
            http_addr = Some(bound);
        }
        Ok(CloudServer {
            local_addr,
            http_addr,
            state,
            health,
            stop_tx,
            server,
            http_server,
        })
    }

    /// Builds every model's backend (loading the candle models on a blocking thread), then
    /// turns health SERVING and `/readyz` 200. An error leaves the server live but not ready.
    pub async fn load(&self) -> Result<()> {
        if self.state.is_ready() {
            return Ok(());
        }
        let cfg = self.state.config.clone();
        let started = std::time::Instant::now();
        let models = tokio::task::spawn_blocking(move || build_models(&cfg))
            .await
            .map_err(|e| Error::Engine(format!("model loader panicked: {e}")))??;
        let n = models.len();
        if !self.state.set_models(models) {
            return Err(Error::FailedPrecondition(
                "the models were loaded twice".into(),
            ));
        }
        if self.state.is_draining() {
            return Ok(());
        }
        set_health(&self.health, ServingStatus::Serving).await;
        tracing::info!(
            models = n,
            load_ms = started.elapsed().as_millis() as u64,
            "models loaded; ready"
        );
        Ok(())
    }

    /// Drains and stops: refuse new requests, let in-flight ones finish for up to `grace`, then
    /// stop the rest (their streams end with UNAVAILABLE), then close the listener.
    pub async fn shutdown(self, grace: Duration) {
        tracing::info!(in_flight = self.state.in_system(), "draining");
        self.state.start_draining();
        set_health(&self.health, ServingStatus::NotServing).await;
        ferry_daemon::drain::wait_idle(self.state.as_ref(), grace).await;
        self.state.abort.cancel();
        // Let the stopped requests send their UNAVAILABLE before the listener closes.
        let settle = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.state.in_system() > 0 && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.stop_tx.send(true);
        ferry_daemon::drain::join(self.server, "server").await;
        if let Some(h) = self.http_server {
            ferry_daemon::drain::join(h, "HTTP server").await;
        }
        tracing::info!("stopped");
    }
}
