//! The one error type of ferry and its mapping to gRPC codes and HTTP statuses.
//!
//! Every library returns [`Error`]; the servers turn it into a `tonic::Status` (or, for the HTTP
//! API, a status and an OpenAI-style body) through [`ErrorKind`], so a given failure is reported
//! the same way on every surface.

use std::path::PathBuf;

/// Result alias for ferry's libraries.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Coarse failure classes; each maps to exactly one gRPC code and one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller sent something we will never accept as is.
    InvalidArgument,
    /// A named model or request does not exist.
    NotFound,
    /// Admission control refused the request (queue full); retrying later may work.
    ResourceExhausted,
    /// The service cannot serve right now (starting, draining, upstream down).
    Unavailable,
    /// The request's deadline passed before it finished.
    DeadlineExceeded,
    /// The caller went away or cancelled.
    Cancelled,
    /// The operation needs a state the system is not in (e.g. a model that is not loaded).
    FailedPrecondition,
    /// The caller did not prove who it is (missing, wrong or revoked token).
    Unauthenticated,
    /// A bug or an unexpected failure of a component.
    Internal,
}

impl ErrorKind {
    /// The gRPC status code for this kind.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            ErrorKind::Cancelled => tonic::Code::Cancelled,
            ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorKind::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status for this kind (OpenAI-compatible API).
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidArgument => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::ResourceExhausted => 429,
            ErrorKind::Unavailable => 503,
            ErrorKind::DeadlineExceeded => 504,
            // nginx's "client closed request"; never seen by the client, but logged.
            ErrorKind::Cancelled => 499,
            ErrorKind::FailedPrecondition => 409,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::Internal => 500,
        }
    }

    /// The kind a gRPC status code stands for: the inverse of [`ErrorKind::grpc_code`], so that
    /// a status that crossed a gRPC hop (a stream's mid-flight failure, an upstream's answer) is
    /// reported on HTTP the same way as the error that produced it. Codes ferry never sends map
    /// to their nearest kind.
    pub fn from_grpc_code(code: tonic::Code) -> Self {
        use tonic::Code as C;
        match code {
            C::InvalidArgument | C::OutOfRange => ErrorKind::InvalidArgument,
            C::NotFound => ErrorKind::NotFound,
            C::ResourceExhausted => ErrorKind::ResourceExhausted,
            C::Unavailable | C::Aborted => ErrorKind::Unavailable,
            C::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            C::Cancelled => ErrorKind::Cancelled,
            C::Unauthenticated | C::PermissionDenied => ErrorKind::Unauthenticated,
            C::FailedPrecondition | C::AlreadyExists | C::Unimplemented => {
                ErrorKind::FailedPrecondition
            }
            _ => ErrorKind::Internal,
        }
    }

    /// A stable snake_case name (`invalid_argument`, `resource_exhausted`, ...), used as the
    /// `error.code` of HTTP error bodies and as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Internal => "internal",
        }
    }

    /// The OpenAI-style `error.type` string for this kind.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_request_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::ResourceExhausted => "rate_limit_error",
            ErrorKind::Unavailable | ErrorKind::DeadlineExceeded => "service_unavailable_error",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::FailedPrecondition => "invalid_request_error",
            ErrorKind::Unauthenticated => "authentication_error",
            ErrorKind::Internal => "server_error",
        }
    }
}

/// Everything that can go wrong in ferry's libraries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller is not authenticated. The message never says which check failed.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A request field failed validation; `field` names it so clients can fix it.
    #[error("invalid `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },

    /// No model with this id is configured.
    #[error("model `{0}` not found; ListModels shows the available ids")]
    ModelNotFound(String),

    /// No request with this id is known (e.g. feedback for an unknown or expired id).
    #[error("request `{0}` not found")]
    RequestNotFound(String),

    /// Admission control refused the request.
    #[error("overloaded: {0}")]
    Overloaded(String),

    /// The service cannot serve now.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// The deadline passed.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),

    /// The client cancelled or disconnected.
    #[error("cancelled: {0}")]
    Cancelled(String),

    /// A model file is not on disk; `hint` says how to get it.
    #[error("model file `{}` is missing; {hint}", path.display())]
    MissingModelFile { path: PathBuf, hint: String },

    /// A model, manifest or config file exists but cannot be used.
    #[error("invalid {what} `{}`: {reason}", path.display())]
    InvalidFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },

    /// A model is configured but not in a state to serve.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The inference engine failed.
    #[error("engine error: {0}")]
    Engine(String),

    /// Filesystem or OS error with its context.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The failure class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::ModelNotFound(_) | Error::RequestNotFound(_) => ErrorKind::NotFound,
            Error::Overloaded(_) => ErrorKind::ResourceExhausted,
            Error::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::DeadlineExceeded(_) => ErrorKind::DeadlineExceeded,
            Error::Cancelled(_) => ErrorKind::Cancelled,
            Error::MissingModelFile { .. } | Error::FailedPrecondition(_) => {
                ErrorKind::FailedPrecondition
            }
            Error::InvalidFile { .. } | Error::Engine(_) | Error::Io { .. } => ErrorKind::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.kind().grpc_code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_consistently() {
        let cases = [
            (
                Error::invalid("messages", "empty"),
                tonic::Code::InvalidArgument,
                400,
            ),
            (Error::ModelNotFound("x".into()), tonic::Code::NotFound, 404),
            (
                Error::RequestNotFound("r".into()),
                tonic::Code::NotFound,
                404,
            ),
            (
                Error::Overloaded("q".into()),
                tonic::Code::ResourceExhausted,
                429,
            ),
            (
                Error::Unavailable("s".into()),
                tonic::Code::Unavailable,
                503,
            ),
            (
                Error::DeadlineExceeded("d".into()),
                tonic::Code::DeadlineExceeded,
                504,
            ),
            (Error::Engine("boom".into()), tonic::Code::Internal, 500),
            (
                Error::Unauthenticated("no token".into()),
                tonic::Code::Unauthenticated,
                401,
            ),
        ];
        for (err, code, http) in cases {
            assert_eq!(ErrorKind::from_grpc_code(code), err.kind(), "{err}");
            assert_eq!(err.kind().grpc_code(), code, "{err}");
            assert_eq!(err.kind().http_status(), http, "{err}");
            let status: tonic::Status = err.into();
            assert_eq!(status.code(), code);
        }
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let status: tonic::Status = Error::invalid("max_tokens", "must be at least 1").into();
        assert!(
            status.message().contains("max_tokens"),
            "{}",
            status.message()
        );
    }
}
