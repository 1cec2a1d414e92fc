//! ferry-cloud, the cloud tier.
//!
//! Serves `ferry.v1.Offload` (proto/ferry/v1/offload.proto) to ferryd: streaming Generate of a
//! chat request on a model of the cloud zoo, ending with the request's accounting (tokens,
//! energy and what measured it, cost), and ListModels with capabilities and cost hints. Each
//! zoo model has a [`backend::Backend`]:
//!
//! - [`candle::CandleBackend`]: ferry-cloud runs the model itself with ferry-engine (CPU, or
//!   CUDA with the `cuda` feature), energy measured per request by ferry-energy;
//! - [`openai::OpenAiBackend`]: an OpenAI-compatible engine (vLLM in production) serves it,
//!   streamed over SSE, its errors mapped to ferry's statuses.
//!
//! Around them: mutual TLS and bearer tokens on the gRPC listener ([`config::TlsConfig`],
//! [`ferry_daemon::auth`]), and an HTTP listener with `/healthz`, `/readyz` and Prometheus
//! `/metrics` ([`http`], [`metrics`]). The listeners are bound before the models load.
//!
//! The binary in `main.rs` only parses the command line and runs [`CloudServer`].

pub mod backend;
pub mod candle;
pub mod config;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod server;
pub mod service;

pub use backend::{Backend, Failure};
pub use config::{BackendKind, Cli, CloudConfig, ModelConfig};
pub use server::CloudServer;
