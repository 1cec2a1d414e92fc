//! Who may call ferryd: bearer tokens checked on gRPC and HTTP, stored hashed at rest, reloaded
//! on SIGHUP. Callers on the Unix socket are trusted: the socket's file permissions decide who
//! can connect.
//!
//! The token file and its check are shared with ferry-cloud and live in [`ferry_daemon::auth`]
//! (format, constant-time comparison, the one refusal message); this module re-exports them.

pub use ferry_core::token::token_line;
pub use ferry_daemon::auth::{AppName, Auth, REFUSED};
