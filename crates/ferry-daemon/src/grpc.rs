//! gRPC scaffolding both daemons serve with: the standard health service reported per service
//! name, reflection over ferry's protos, the bearer-token interceptor, and TCP without Nagle.

use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use ferry_core::{Error, Result};

use crate::auth::AppName;
use crate::Daemon;

/// Largest gRPC message a daemon accepts (requests may carry images).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Reports `status` for the whole server (`""`) and for `service`.
pub async fn set_health(health: &HealthReporter, service: &str, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(service, status).await;
}

/// The reflection service over ferry's protos and the health protocol's.
pub fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Engine(format!("reflection service: {e}")))
}

/// The bound listener as tonic's incoming stream: small gRPC frames (one token each) must not
/// wait for Nagle and delayed ACKs.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Checks the bearer token of every call to the service it wraps (a no-op while the daemon's
/// auth is off) and hands the calling app's name on in the request's extensions as
/// [`AppName`]; a refusal is counted by [`Daemon::token_refused`] and answered UNAUTHENTICATED.
pub struct TokenCheck<D>(pub Arc<D>);

impl<D> Clone for TokenCheck<D> {
    fn clone(&self) -> Self {
        TokenCheck(self.0.clone())
    }
}

impl<D: Daemon> tonic::service::Interceptor for TokenCheck<D> {
    fn call(
        &mut self,
        mut req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        match self.0.auth().check_metadata(req.metadata()) {
            Ok(name) => {
                req.extensions_mut().insert(AppName(name));
                Ok(req)
            }
            Err(e) => {
                self.0.token_refused("grpc", &e);
                tracing::debug!(peer = ?req.remote_addr(), "gRPC call refused: bad bearer token");
                Err(e.into())
            }
        }
    }
}
