//! The daemon kit: what ferryd and ferry-cloud share as servers, so that each is written once.
//!
//! - [`auth`]: bearer tokens (the token file, hashed at rest, reloaded on SIGHUP) and the calling
//!   app's name; [`grpc`] and [`http`] check them on every protected call.
//! - [`admission`]: generation slots shared fairly between apps, a bounded queue, and refusal at
//!   once when the expected wait exceeds a request's deadline; [`deadline`]: the `grpc-timeout`
//!   header and the margin that lets a daemon answer before the app's own timer fires.
//! - [`config`]: TOML config files with errors naming the file, and the `[log]` section;
//!   [`settings`]: each setting's flag, `FERRY_*` variable and config key declared once;
//!   [`telemetry`]: the Prometheus recorder behind `/metrics`.
//! - [`grpc`]: health and reflection, the token interceptor, TCP without Nagle; [`http`]:
//!   `/healthz`, `/readyz`, `/metrics` and the token middleware; [`drain`]: a graceful stop;
//!   [`signals`]: SIGTERM / Ctrl-C to stop, SIGHUP to reload.
//!
//! What a daemon tells the kit about itself is the [`Daemon`] trait.

pub mod admission;
pub mod auth;
pub mod config;
pub mod deadline;
pub mod drain;
pub mod grpc;
pub mod http;
pub mod settings;
pub mod signals;
pub mod telemetry;

/// What the kit needs to know of a running daemon.
pub trait Daemon: Send + Sync + 'static {
    /// Its bearer tokens.
    fn auth(&self) -> &auth::Auth;
    /// Its models are loaded and it takes requests (unless draining).
    fn is_ready(&self) -> bool;
    /// It is stopping: new requests are refused.
    fn is_draining(&self) -> bool;
    /// Requests it holds (running or queued), which a drain waits for.
    fn in_flight(&self) -> usize;
    /// A caller presented no valid token on `surface` (`grpc` or `http`): count it.
    fn token_refused(&self, surface: &'static str, error: &ferry_core::Error);
    /// Sets the gauges read off live state, before `/metrics` renders.
    fn refresh_gauges(&self) {}
}
