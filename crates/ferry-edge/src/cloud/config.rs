//! `[cloud]` settings: the ferry-cloud endpoints, TLS and token files, timeouts, breaker and
//! probe parameters, and their validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use ferry_core::{Error, Result};

/// What to do when an offloaded request sees no first token within its time budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeadline {
    /// Run the request locally instead (the completion says `fallback` and why).
    Fallback,
    /// End the request with DEADLINE_EXCEEDED.
    Error,
}

/// `[cloud]` settings: the ferry-cloud endpoints and how ferryd talks to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// ferry-cloud gRPC endpoints, `http://host:port` (plaintext) or `https://host:port` (TLS).
    /// Empty: no cloud tier; every request runs locally.
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) that signed the endpoints' server certificates. Required for
    /// `https://` endpoints (no system roots are trusted).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) presented to ferry-cloud: mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Name checked against the server certificate; unset: the endpoint's host.
    pub tls_domain: Option<String>,
    /// File holding the bearer token sent to ferry-cloud (the token itself, one line).
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the bearer token (used when `token_file` is unset).
    pub token_env: Option<String>,
    /// Milliseconds to establish a connection to an endpoint.
    pub connect_timeout_ms: u64,
    /// Time budget of an offloaded request when the app sets no deadline (the app's deadline,
    /// when sooner, wins).
    pub request_timeout_ms: u64,
    /// Endpoints tried for one request before the first token (then local fallback).
    pub max_attempts: usize,
    /// What a request whose first token did not arrive within its budget does.
    pub on_deadline: OnDeadline,
    /// Health probe period and timeout, milliseconds.
    pub health_interval_ms: u64,
    pub health_timeout_ms: u64,
    /// Consecutive failures that open an endpoint's circuit.
    pub failure_threshold: u32,
    /// How long an open circuit stays open before one trial request, milliseconds.
    pub open_ms: u64,
    /// Route `auto` requests placed in the cloud with MESS+ over the cloud zoo (needs
    /// `router.enabled`); off, they go to `default_model`.
    pub route_auto: bool,
    /// Cloud model for `auto` requests placed in the cloud when not routed; unset: the
    /// cheapest model the cloud lists.
    pub default_model: Option<String>,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            endpoints: Vec::new(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_domain: None,
            token_file: None,
            token_env: None,
            connect_timeout_ms: 1_000,
            request_timeout_ms: 120_000,
            max_attempts: 2,
            on_deadline: OnDeadline::Fallback,
            health_interval_ms: 2_000,
            health_timeout_ms: 1_000,
            failure_threshold: 3,
            open_ms: 5_000,
            route_auto: true,
            default_model: None,
        }
    }
}

impl CloudConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| Error::invalid(format!("cloud.{field}"), reason);
        for (i, e) in self.endpoints.iter().enumerate() {
            let uri: http_uri::Uri = e
                .parse()
                .map_err(|err| bad(&format!("endpoints[{i}]"), format!("`{e}`: {err}")))?;
            match uri.scheme_str() {
                Some("http") => {}
                Some("https") if self.ca_file.is_none() => {
                    return Err(bad(
                        "ca_file",
                        format!("`{e}` uses TLS, so the CA that signed ferry-cloud's certificate is needed (`ferry certs dev` makes one for development)"),
                    ))
                }
                Some("https") => {}
                _ => {
                    return Err(bad(
                        &format!("endpoints[{i}]"),
                        format!("`{e}` must start with http:// or https://"),
                    ))
                }
            }
            if uri.host().is_none() {
                return Err(bad(
                    &format!("endpoints[{i}]"),
                    format!("`{e}` has no host"),
                ));
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(bad(
                "cert_file",
                "cert_file and key_file go together (the client identity for mutual TLS)".into(),
            ));
        }
        if self.max_attempts == 0 {
            return Err(bad("max_attempts", "must be at least 1".into()));
        }
        if self.failure_threshold == 0 {
            return Err(bad("failure_threshold", "must be at least 1".into()));
        }
        for (name, v) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("health_interval_ms", self.health_interval_ms),
            ("health_timeout_ms", self.health_timeout_ms),
        ] {
            if v == 0 {
                return Err(bad(name, "must be above 0".into()));
            }
        }
        Ok(())
    }
}

// `http::Uri` through tonic's re-export, without a direct dependency on `http`.
mod http_uri {
    pub use tonic::codegen::http::Uri;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks_endpoints_and_tls_files() {
        let ok = CloudConfig {
            endpoints: vec!["http://127.0.0.1:50061".into()],
            ..CloudConfig::default()
        };
        ok.validate().unwrap();
        let tls_without_ca = CloudConfig {
            endpoints: vec!["https://cloud:50061".into()],
            ..CloudConfig::default()
        };
        assert!(tls_without_ca
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ca_file"));
        let bad_scheme = CloudConfig {
            endpoints: vec!["ftp://x".into()],
            ..CloudConfig::default()
        };
        assert!(bad_scheme.validate().is_err());
        let half_identity = CloudConfig {
            endpoints: vec!["http://127.0.0.1:1".into()],
            cert_file: Some("a.pem".into()),
            ..CloudConfig::default()
        };
        assert!(half_identity
            .validate()
            .unwrap_err()
            .to_string()
            .contains("key_file"));
    }
}
