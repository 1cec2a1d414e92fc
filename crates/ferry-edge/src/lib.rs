//! ferryd, the edge daemon.
//!
//! Serves `ferry.v1.Inference` over gRPC (TCP and optionally a Unix socket) and the
//! OpenAI-compatible API over HTTP. Every request takes one path (`pipeline`): `dispatch`
//! validates and places it, a `Tier` runs it (the local candle engine, or an offload to
//! ferry-cloud that falls back to local), and the `ledger` books its end and teaches the
//! placement policy and the routers (mixrank or MESS+ over each tier's zoo, state persisted).
//! The servers' scaffolding (auth, admission, health, probes, drain, signals) is the daemon kit,
//! `ferry_daemon`. The binary in `main.rs` only parses the command line and calls
//! [`RunningServer`].

pub mod auth;
pub mod cloud;
pub mod config;
mod delivered;
pub mod engine;
pub mod http;
mod judge;
mod ledger;
pub mod metrics;
mod pipeline;
pub mod placement;
pub mod records;
pub mod router;
pub mod routers;
pub mod sdnotify;
pub mod server;
pub mod service;
pub mod state;

pub use config::{Cli, EdgeConfig};
pub use server::RunningServer;
pub use state::AppState;
