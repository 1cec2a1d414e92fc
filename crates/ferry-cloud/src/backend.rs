//! The [`Backend`] trait: what serves one model of the cloud zoo, and the failure type every
//! backend reports in [`ferry_core::ErrorKind`] terms.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use ferry_core::{ChatMessage, ErrorKind, FinishReason, SamplingParams};

/// A failure of a request in ferry-cloud, classified once by [`ErrorKind`] so that it maps to
/// one gRPC status like every other ferry error. Upstream engines' errors arrive as HTTP
/// statuses and OpenAI-style bodies; their backends translate them into this.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl From<ferry_core::Error> for Failure {
    fn from(e: ferry_core::Error) -> Self {
        Failure {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

impl From<Failure> for tonic::Status {
    fn from(f: Failure) -> Self {
        tonic::Status::new(f.kind.grpc_code(), f.message)
    }
}

/// One validated request, as a backend sees it.
#[derive(Debug, Clone)]
pub struct BackendRequest {
    pub request_id: String,
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingParams,
    /// Cancelled when the request must stop early (client gone, deadline, shutdown). Async
    /// backends are also stopped by dropping their future; blocking ones must poll this.
    pub stop: CancellationToken,
}

/// Energy attributed to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct EnergyFigure {
    pub joules: f64,
    /// "nvml", "rapl", "estimate", ... for measurements; "hint" for a configured estimate.
    pub source: String,
    pub devices: Vec<String>,
}

/// How a generation ended, with its accounting.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendOutcome {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish_reason: FinishReason,
    /// `None` when the backend cannot tell (the service may still apply a hint).
    pub energy: Option<EnergyFigure>,
}

/// What serves one model of the cloud zoo.
#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// "candle" or "openai".
    fn kind(&self) -> &'static str;

    /// Runs `req`, sending text deltas (never empty) into `deltas` as they are produced, and
    /// returns the accounting. A closed `deltas` channel means the consumer is gone: stop.
    async fn generate(
        &self,
        req: BackendRequest,
        deltas: mpsc::Sender<String>,
    ) -> Result<BackendOutcome, Failure>;
}
