//! Shared ferry types: the request model every tier speaks, model manifests, and the one error
//! type with its single mapping to gRPC status codes and HTTP statuses.
//!
//! This crate holds no policy and does no network I/O; it is what `ferry-engine`, `ferryd`,
//! `ferry-cloud` and the CLI agree on. What only the daemons share (auth, admission, deadlines,
//! config files and logs, metrics, the servers' scaffolding) is `ferry-daemon`.

pub mod error;
pub mod manifest;
pub mod openai;
pub mod request;
pub mod token;

pub use error::{Error, ErrorKind, Result};
pub use manifest::{
    CostHints, EncoderWeights, ExampleTurn, FetchFile, FetchSource, FetchSpec, ModelFormat,
    ModelKind, ModelManifest, Pooling, Tier,
};
pub use request::{
    ChatMessage, FinishReason, ImagePart, Part, RequestLimits, Role, SamplingParams,
    ValidatedRequest,
};
