//! ferryd, the edge daemon.
//!
//! Serves `ferry.v1.Inference` over gRPC (TCP and optionally a Unix socket) on top of the local
//! candle engine, with admission control (bounded concurrency and queue), request records for
//! feedback, MESS+ routing of `model: "auto"` with its state persisted, the standard health and reflection services, and a graceful drain on SIGTERM.
//! The binary in `main.rs` only parses the command line and calls [`RunningServer`].

pub mod auth;
pub mod cloud;
pub mod config;
mod delivered;
pub mod http;
mod judge;
mod ledger;
pub mod metrics;
mod pipeline;
pub mod placement;
pub mod records;
pub mod router;
pub mod sdnotify;
pub mod server;
pub mod service;
pub mod state;

pub use config::{Cli, EdgeConfig};
pub use server::RunningServer;
pub use state::AppState;
