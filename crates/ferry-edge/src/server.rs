//! Starting and stopping ferryd's gRPC server: TCP and an optional Unix socket, the health and
//! reflection services, model loading in the background, and a graceful drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use ferry_core::{Error, Result};
use ferry_proto::v1::inference_server::{InferenceServer, SERVICE_NAME};

use crate::config::EdgeConfig;
use crate::service::InferenceService;
use crate::state::AppState;

/// Largest gRPC message accepted (requests may carry images).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A running ferryd.
pub struct RunningServer {
    /// The bound TCP address (useful with port 0).
    pub local_addr: SocketAddr,
    /// The bound HTTP address, when the HTTP surface is enabled.
    pub http_addr: Option<SocketAddr>,
    /// Shared state, for tests and status.
    pub state: Arc<AppState>,
    health: HealthReporter,
    stop_tx: watch::Sender<bool>,
    servers: Vec<JoinHandle<std::result::Result<(), tonic::transport::Error>>>,
    http_server: Option<JoinHandle<std::io::Result<()>>>,
    loader: JoinHandle<Result<()>>,
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// Checks the bearer token of a TCP caller (a no-op when authentication is off).
#[derive(Clone)]
struct BearerCheck(Arc<AppState>);

impl tonic::service::Interceptor for BearerCheck {
    fn call(
        &mut self,
        req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match self.0.auth.check(header) {
            Ok(name) => {
                let mut req = req;
                req.extensions_mut().insert(crate::auth::AppName(name));
                Ok(req)
            }
            Err(e) => {
                crate::metrics::request_rejected(e.kind());
                Err(e.into())
            }
        }
    }
}

/// The gRPC services. Over TCP (`authenticate`), `Inference` and reflection need a bearer token
/// when `auth.tokens_file` is set; health stays open for probes and reveals nothing. Over the
/// Unix socket the file permissions decide and no token is asked.
fn router(
    state: &Arc<AppState>,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    authenticate: bool,
) -> Result<tonic::transport::server::Router> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Engine(format!("reflection service: {e}")))?;
    let inference = InferenceServer::new(InferenceService::new(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let builder = Server::builder().add_service(health_service);
    Ok(if authenticate && state.auth.enabled() {
        let check = BearerCheck(state.clone());
        builder
            .add_service(tonic::service::interceptor::InterceptedService::new(
                reflection,
                check.clone(),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                inference, check,
            ))
    } else {
        builder.add_service(reflection).add_service(inference)
    })
}

/// Writes the routers' state whenever it changed, at most once per `every`, until stopped.
async fn save_periodically(state: Arc<AppState>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for r in state.routers() {
            match tokio::task::spawn_blocking(move || r.save_if_due()).await {
                Ok(Err(e)) => tracing::warn!(error = %e, "saving router state failed; will retry"),
                Err(e) => tracing::warn!(error = %e, "router state saver panicked"),
                Ok(Ok(_)) => {}
            }
        }
    }
}

impl RunningServer {
    /// Binds the listeners, starts serving (health NOT_SERVING), and loads the models in the
    /// background; health turns SERVING once the default model is resident.
    pub async fn start(config: EdgeConfig) -> Result<Self> {
        let state = Arc::new(AppState::new(config)?);
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;

        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_rx_saver = stop_rx.clone();
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let addr = state.config.server.grpc_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("binding gRPC address {addr}"), e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the bound address", e))?;
        let mut servers = Vec::new();
        let tcp = router(&state, health_service.clone(), true)?.serve_with_incoming_shutdown(
            // Small gRPC frames (one token each) must not wait for Nagle and delayed ACKs.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );
        servers.push(tokio::spawn(tcp));

        if let Some(path) = state.config.server.unix_socket.clone() {
            // A stale socket from an earlier run would make bind fail.
            let _ = std::fs::remove_file(&path);
            let uds = tokio::net::UnixListener::bind(&path)
                .map_err(|e| Error::io(format!("binding Unix socket {}", path.display()), e))?;
            // Owner and group only: the socket is trusted without a token.
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).map_err(
                    |e| Error::io(format!("restricting Unix socket {}", path.display()), e),
                )?;
            }
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(uds);
            let serve = router(&state, health_service, false)?
                .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
            servers.push(tokio::spawn(serve));
            tracing::info!(path = %path.display(), "serving gRPC on Unix socket");
        }
        tracing::info!(addr = %local_addr, "serving gRPC");

        let mut http_addr = None;
        let mut http_server = None;
        if state.config.server.http_enabled {
            crate::metrics::install();
            let addr = state.config.server.http_addr;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("binding HTTP address {addr}"), e))?;
            let bound = listener
                .local_addr()
                .map_err(|e| Error::io("reading the bound HTTP address", e))?;
            let app = crate::http::router(Arc::new(InferenceService::new(state.clone())));
            let stop = stopped(stop_rx.clone());
            http_server = Some(tokio::spawn(async move {
                use axum::serve::ListenerExt;
                // SSE chunks are one token each: no Nagle delay.
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
            }));
            tracing::info!(addr = %bound, "serving HTTP (OpenAI API, /metrics, /healthz, /readyz)");
            http_addr = Some(bound);
        }

        if let Some(pool) = state.cloud.clone() {
            tokio::spawn(pool.probe_forever(state.abort.clone()));
        }

        let load_state = state.clone();
        let load_health = health.clone();
        let saver_stop = stop_rx_saver;
        let loader = tokio::spawn(async move {
            let s = load_state.clone();
            let loaded = tokio::task::spawn_blocking(move || s.load_models())
                .await
                .map_err(|e| Error::Engine(format!("model loader panicked: {e}")))?;
            match loaded {
                Ok(()) => {
                    if load_state.router().is_some() {
                        let every =
                            Duration::from_millis(load_state.config.router.save_interval_ms);
                        tokio::spawn(save_periodically(load_state.clone(), every, saver_stop));
                    }
                    set_health(&load_health, ServingStatus::Serving).await;
                    tracing::info!(default = ?load_state.default_model_id(), "ready");
                    Ok(())
                }
                Err(e) => {
                    tracing::error!(error = %e, "loading models failed");
                    Err(e)
                }
            }
        });

        Ok(RunningServer {
            local_addr,
            http_addr,
            http_server,
            state,
            health,
            stop_tx,
            servers,
            loader,
        })
    }

    /// Waits until the models are loaded; returns the loading error if it failed.
    pub async fn wait_ready(&mut self) -> Result<()> {
        if self.state.is_ready() {
            return Ok(());
        }
        (&mut self.loader)
            .await
            .map_err(|e| Error::Engine(format!("model loader task failed: {e}")))?
    }

    /// Drains and stops: refuse new requests, let in-flight ones finish for up to `grace`, then
    /// stop the rest (their streams end with UNAVAILABLE), then close the listeners.
    pub async fn shutdown(self, grace: Duration) {
        let in_flight = |s: &AppState| s.open_requests();
        tracing::info!(in_flight = in_flight(&self.state), "draining");
        self.state.start_draining();
        set_health(&self.health, ServingStatus::NotServing).await;
        let deadline = tokio::time::Instant::now() + grace;
        while in_flight(&self.state) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if in_flight(&self.state) > 0 {
            tracing::warn!(
                in_flight = in_flight(&self.state),
                "grace period over; stopping in-flight requests"
            );
        }
        self.state.abort.cancel();
        let _ = self.stop_tx.send(true);
        for router in self.state.routers() {
            match tokio::task::spawn_blocking(move || router.save()).await {
                Ok(Ok(())) => tracing::info!("router state saved"),
                Ok(Err(e)) => tracing::error!(error = %e, "saving router state failed"),
                Err(e) => tracing::error!(error = %e, "saving router state panicked"),
            }
        }
        self.loader.abort();
        for s in self.servers {
            // Connections that stay open after their streams ended must not hold shutdown.
            match tokio::time::timeout(Duration::from_secs(5), s).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "server ended with an error"),
                Ok(_) => {}
                Err(_) => tracing::warn!("listener did not close within 5 s"),
            }
        }
        if let Some(h) = self.http_server {
            match tokio::time::timeout(Duration::from_secs(5), h).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server ended with an error"),
                Ok(_) => {}
                Err(_) => tracing::warn!("HTTP listener did not close within 5 s"),
            }
        }
        if let Some(path) = &self.state.config.server.unix_socket {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("stopped");
    }
}
