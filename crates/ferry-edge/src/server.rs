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
    ferry_daemon::grpc::set_health(health, SERVICE_NAME, status).await;
}

impl ferry_daemon::Daemon for AppState {
    fn auth(&self) -> &ferry_daemon::auth::Auth {
        &self.auth
    }
    fn is_ready(&self) -> bool {
        AppState::is_ready(self)
    }
    fn is_draining(&self) -> bool {
        AppState::is_draining(self)
    }
    fn in_flight(&self) -> usize {
        self.open_requests()
    }
    fn token_refused(&self, _surface: &'static str, error: &Error) {
        crate::metrics::request_rejected(error.kind());
    }
    fn refresh_gauges(&self) {
        crate::metrics::refresh_gauges(self);
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
    let reflection = ferry_daemon::grpc::reflection()?;
    let inference = InferenceServer::new(InferenceService::new(state.clone()))
        .max_decoding_message_size(ferry_daemon::grpc::MAX_MESSAGE_BYTES);
    let builder = Server::builder().add_service(health_service);
    Ok(if authenticate && state.auth.enabled() {
        let check = ferry_daemon::grpc::TokenCheck(state.clone());
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
            ferry_daemon::grpc::incoming(listener),
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
        tracing::info!(in_flight = self.state.open_requests(), "draining");
        self.state.start_draining();
        set_health(&self.health, ServingStatus::NotServing).await;
        ferry_daemon::drain::wait_idle(self.state.as_ref(), grace).await;
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
            ferry_daemon::drain::join(s, "server").await;
        }
        if let Some(h) = self.http_server {
            ferry_daemon::drain::join(h, "HTTP server").await;
        }
        if let Some(path) = &self.state.config.server.unix_socket {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("stopped");
    }
}
