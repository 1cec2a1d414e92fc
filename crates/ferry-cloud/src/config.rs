//! ferry-cloud's configuration: a TOML file (`configs/cloud.toml`) whose scalar settings can each
//! be overridden by a command-line flag or a `FERRY_CLOUD_*` environment variable (flag > env >
//! file > built-in default), in the style of ferryd's. The model list (`[[models]]`) is set in
//! the file only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

use ferry_core::{Error, RequestLimits, Result};
use ferry_daemon::auth::AuthConfig;
use ferry_daemon::config::{ConfigVersion, LogConfig};
use ferry_energy::EnergyConfig;

/// The whole ferry-cloud configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// The file format (`version = 1`; absent reads as 1).
    pub version: ConfigVersion,
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub candle: CandleConfig,
    pub limits: RequestLimits,
    pub energy: EnergyConfig,
    pub log: LogConfig,
    /// The cloud zoo, in the order ListModels reports it.
    pub models: Vec<ModelConfig>,
}

/// Listening, admission control, retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address. Loopback by default: exposing the cloud tier is an explicit choice,
    /// and needs mutual TLS (`tls.client_ca_file`) or bearer tokens (`auth.tokens_file`).
    pub listen: SocketAddr,
    /// Serve `/healthz`, `/readyz` and `/metrics` over HTTP on `http_addr`.
    pub http_enabled: bool,
    /// HTTP listen address of the probes and metrics (plain HTTP; `/metrics` needs a bearer
    /// token when `auth.tokens_file` is set, the probes are open).
    pub http_addr: SocketAddr,
    /// Requests generating at the same time, over all models.
    pub max_concurrent: usize,
    /// Requests waiting for a slot; beyond it new requests get RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Seconds in-flight requests may take to finish after SIGTERM before they are stopped.
    pub shutdown_grace_s: u64,
    /// Finished answers kept by request id, so that a retry replays instead of running again.
    pub replay_cache: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:50061".parse().expect("valid default address"),
            http_enabled: true,
            http_addr: "127.0.0.1:9061".parse().expect("valid default address"),
            max_concurrent: 4,
            max_queue: 64,
            shutdown_grace_s: 30,
            replay_cache: 1024,
        }
    }
}

/// TLS on the gRPC listener. No certificate: plaintext (fine on loopback). `cert_file` +
/// `key_file`: TLS with that server identity. `client_ca_file` as well: mutual TLS, every
/// client must present a certificate signed by that CA (`ferry certs dev` makes a development
/// set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM, leaf first.
    pub cert_file: Option<PathBuf>,
    /// The server certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA certificate(s), PEM, that sign the clients' certificates; set: a client certificate
    /// is required (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    /// True when the gRPC listener speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// True when clients must present a certificate (mutual TLS).
    pub fn mutual(&self) -> bool {
        self.enabled() && self.client_ca_file.is_some()
    }
}

/// Where the candle backend finds its models (the same manifests and files as ferryd's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CandleConfig {
    /// Directory of model manifests (`*.toml`).
    pub manifest_dir: PathBuf,
    /// Directory holding model files (`ferry models fetch` installs there).
    pub model_dir: PathBuf,
}

impl Default for CandleConfig {
    fn default() -> Self {
        CandleConfig {
            manifest_dir: PathBuf::from("models"),
            model_dir: PathBuf::from("models/cache"),
        }
    }
}

/// Which backend serves a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// ferry-cloud runs the model itself with candle (ferry-engine).
    Candle,
    /// An OpenAI-compatible engine (vLLM, or any `/v1/chat/completions` server) serves it.
    Openai,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Candle => "candle",
            BackendKind::Openai => "openai",
        }
    }
}

/// One model of the cloud zoo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The id the edge names in `OffloadRequest.model`.
    pub id: String,
    pub backend: BackendKind,
    /// candle: the manifest id under `candle.manifest_dir`; unset = `id`.
    #[serde(default)]
    pub manifest: Option<String>,
    /// openai: the engine's API root, e.g. `http://127.0.0.1:8000/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// openai: the model name the engine knows; unset = `id`.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// openai: environment variable holding the engine's API key (sent as a bearer token);
    /// unset = no authentication. A named variable that is not set stops ferry-cloud at start.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// openai: stream from the engine (SSE) or ask for the whole answer at once.
    #[serde(default = "yes")]
    pub stream: bool,
    /// openai: milliseconds to establish a connection to the engine.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// openai: most milliseconds between two reads from the engine (a stalled stream fails).
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// "text", "image". Images are refused for a model without "image". Unset: candle takes the
    /// manifest's, openai `["text"]`.
    #[serde(default)]
    pub capabilities: Option<Vec<String>>,
    /// Price hint, US dollars per million (prompt + completion) tokens; gives `cost_usd`.
    #[serde(default)]
    pub usd_per_million_tokens: Option<f64>,
    /// Typical energy per token in joules; gives the "hint" energy of upstream-served requests.
    #[serde(default)]
    pub joules_per_token: Option<f64>,
    /// Architecture family for ListModels (openai; candle reads the model's).
    #[serde(default)]
    pub family: Option<String>,
    /// Context window in tokens for ListModels (openai; candle reads the model's).
    #[serde(default)]
    pub context_length: Option<u32>,
}

fn yes() -> bool {
    true
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_read_timeout_ms() -> u64 {
    60_000
}

impl CloudConfig {
    /// Parses a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: CloudConfig = ferry_daemon::config::read_toml(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses config text; `path` is for messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        let cfg: CloudConfig = ferry_daemon::config::parse_toml(text, path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<()> {
        self.version.validate()?;
        let bad = |field: &str, reason: &str| Error::invalid(field, reason);
        if self.server.max_concurrent == 0 {
            return Err(bad("server.max_concurrent", "must be at least 1"));
        }
        if self.server.http_enabled
            && self.server.http_addr == self.server.listen
            && self.server.listen.port() != 0
        {
            return Err(bad(
                "server.http_addr",
                "must differ from server.listen (the probes and metrics have their own port)",
            ));
        }
        self.limits.validate()?;
        self.energy
            .validate()
            .map_err(|e| bad("energy", &e.to_string()))?;
        self.log.validate()?;
        self.validate_security()?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let field = |k: &str| format!("models[{i}].{k}");
            if m.id.trim().is_empty() || m.id == "auto" {
                return Err(Error::invalid(
                    field("id"),
                    "must be a non-empty id other than `auto`",
                ));
            }
            if !seen.insert(m.id.as_str()) {
                return Err(Error::invalid(
                    field("id"),
                    format!("`{}` is listed twice", m.id),
                ));
            }
            match m.backend {
                BackendKind::Candle => {
                    if m.base_url.is_some() || m.upstream_model.is_some() || m.api_key_env.is_some()
                    {
                        return Err(Error::invalid(
                            field("backend"),
                            "base_url, upstream_model and api_key_env belong to backend = \"openai\"",
                        ));
                    }
                }
                BackendKind::Openai => {
                    let url = m.base_url.as_deref().unwrap_or("");
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(Error::invalid(
                            field("base_url"),
                            "backend = \"openai\" needs an http:// or https:// base_url, e.g. http://127.0.0.1:8000/v1",
                        ));
                    }
                    if m.connect_timeout_ms == 0 || m.read_timeout_ms == 0 {
                        return Err(Error::invalid(
                            field("read_timeout_ms"),
                            "connect_timeout_ms and read_timeout_ms must be at least 1",
                        ));
                    }
                }
            }
            for (k, v) in [
                ("usd_per_million_tokens", m.usd_per_million_tokens),
                ("joules_per_token", m.joules_per_token),
            ] {
                if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                    return Err(Error::invalid(field(k), "must be a finite number >= 0"));
                }
            }
            if let Some(caps) = &m.capabilities {
                if let Some(c) = caps
                    .iter()
                    .find(|c| !matches!(c.as_str(), "text" | "image"))
                {
                    return Err(Error::invalid(
                        field("capabilities"),
                        format!("unknown capability `{c}` (text, image)"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl CloudConfig {
    /// TLS files come in pairs, and an exposed listener needs authentication.
    fn validate_security(&self) -> Result<()> {
        let tls = &self.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            let missing = if tls.cert_file.is_none() {
                "tls.cert_file"
            } else {
                "tls.key_file"
            };
            return Err(Error::invalid(
                missing,
                "tls.cert_file and tls.key_file are set together (the server's certificate and its key)",
            ));
        }
        if tls.client_ca_file.is_some() && !tls.enabled() {
            return Err(Error::invalid(
                "tls.client_ca_file",
                "mutual TLS needs the server's own tls.cert_file and tls.key_file too",
            ));
        }
        let authenticated = tls.mutual() || self.auth.tokens_file.is_some();
        if !self.server.listen.ip().is_loopback()
            && !authenticated
            && !self.auth.allow_unauthenticated_network
        {
            return Err(Error::invalid(
                "auth.tokens_file",
                format!(
                    "ferry-cloud would listen on the non-loopback address {} with no authentication; \
                     set tls.client_ca_file (mutual TLS; `ferry certs dev` makes development certificates) \
                     or auth.tokens_file (`ferry token new`), or auth.allow_unauthenticated_network = true",
                    self.server.listen
                ),
            ));
        }
        Ok(())
    }
}

/// Command line of `ferry-cloud`. Every scalar setting of [`CloudConfig`] has a flag and a
/// `FERRY_CLOUD_*` variable.
#[derive(Debug, Parser, Default)]
#[command(
    name = "ferry-cloud",
    version,
    about = "ferry cloud tier: serves the cloud zoo to ferryd over gRPC (ferry.v1.Offload)"
)]
pub struct Cli {
    /// TOML config file; flags and FERRY_CLOUD_* variables override its values.
    #[arg(long, env = "FERRY_CLOUD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
    #[command(flatten)]
    pub shared: SharedSettings,
}

ferry_daemon::settings! {
    /// Every scalar setting of [`CloudConfig`] but the file itself, each as a flag, a
    /// `FERRY_CLOUD_*` variable and the config key it overrides.
    pub struct Settings for CloudConfig {
        /// gRPC listen address.
        listen: SocketAddr = "FERRY_CLOUD_LISTEN" => server.listen;
        /// Finished answers kept for retries by request id.
        replay_cache: usize = "FERRY_CLOUD_REPLAY_CACHE" => server.replay_cache;
        /// Server certificate chain, PEM (TLS on the gRPC listener).
        tls_cert_file: PathBuf = "FERRY_CLOUD_TLS_CERT_FILE" => tls.cert_file;
        /// Server private key, PEM.
        tls_key_file: PathBuf = "FERRY_CLOUD_TLS_KEY_FILE" => tls.key_file;
        /// CA certificate(s), PEM, that sign client certificates; set: mutual TLS.
        tls_client_ca_file: PathBuf = "FERRY_CLOUD_TLS_CLIENT_CA_FILE" => tls.client_ca_file;
        /// Directory of model manifests (candle backend).
        manifest_dir: PathBuf = "FERRY_CLOUD_MANIFEST_DIR" => candle.manifest_dir;
        /// Directory of model files (candle backend).
        model_dir: PathBuf = "FERRY_CLOUD_MODEL_DIR" => candle.model_dir;
    }
}

ferry_daemon::shared_settings! {
    /// The request limits, energy and log settings, as in every ferry daemon.
    pub struct SharedSettings for CloudConfig, prefix = "FERRY_CLOUD_"
}

impl Cli {
    /// Loads the config file (if any) and applies flag/env overrides.
    pub fn resolve(&self) -> Result<CloudConfig> {
        let mut c = match &self.config {
            Some(p) => CloudConfig::from_file(p)?,
            None => CloudConfig::default(),
        };
        self.settings.apply(&mut c);
        self.shared.apply(&mut c);
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_its_own_flag_variable_and_key() {
        let mut seen = std::collections::HashSet::new();
        for (flag, var, key) in Settings::TABLE.iter().chain(SharedSettings::TABLE) {
            assert!(var.starts_with("FERRY_CLOUD_"), "{var}");
            assert!(
                seen.insert(*flag) && seen.insert(*var),
                "{flag} / {var} twice"
            );
            assert!(
                seen.insert(Box::leak(key.join(".").into_boxed_str())),
                "{key:?} twice"
            );
        }
    }

    fn sample_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/cloud.toml")
    }

    #[test]
    fn sample_config_parses_and_flags_override() {
        let file = CloudConfig::from_file(&sample_path()).unwrap();
        assert_eq!(file.server.listen, "127.0.0.1:50061".parse().unwrap());
        assert!(file.models.iter().any(|m| m.backend == BackendKind::Candle));
        assert!(file.models.iter().any(|m| m.backend == BackendKind::Openai));
        let cli = Cli::parse_from([
            "ferry-cloud",
            "--config",
            sample_path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:6001",
            "--log-level",
            "debug",
            "--max-new-tokens",
            "99",
            "--default-max-tokens",
            "9",
            "--http-addr",
            "127.0.0.1:6002",
            "--http-enabled",
            "false",
        ]);
        let c = cli.resolve().unwrap();
        assert_eq!(c.server.listen.port(), 6001);
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.limits.max_new_tokens, 99);
        assert_eq!(c.server.http_addr.port(), 6002);
        assert!(!c.server.http_enabled);
        assert!(file.server.http_enabled);
        assert_eq!(c.models, file.models);
        assert_eq!(c.server.max_queue, file.server.max_queue);
    }

    #[test]
    fn defaults_are_loopback_and_valid() {
        let c = CloudConfig::from_toml("", Path::new("x")).unwrap();
        assert_eq!(c, CloudConfig::default());
        assert!(c.server.listen.ip().is_loopback());
        assert_eq!(c.server.listen.port(), 50061);
        assert!(c.server.http_enabled && c.server.http_addr.ip().is_loopback());
        assert_eq!(c.server.http_addr.port(), 9061);
        assert!(!c.tls.enabled() && c.auth.tokens_file.is_none());
    }

    #[test]
    fn refuses_to_listen_exposed_without_authentication() {
        let exposed = "[server]\nlisten = \"0.0.0.0:50061\"\n";
        let err = CloudConfig::from_toml(exposed, Path::new("x")).unwrap_err();
        assert!(
            err.to_string().contains("auth.tokens_file")
                && err.to_string().contains("tls.client_ca_file"),
            "{err}"
        );
        let tls = "[tls]\ncert_file = \"c.pem\"\nkey_file = \"c.key\"\n";
        // Server-side TLS alone does not say who the client is.
        assert!(CloudConfig::from_toml(&format!("{exposed}{tls}"), Path::new("x")).is_err());
        for ok in [
            format!("{exposed}{tls}client_ca_file = \"ca.pem\"\n"),
            format!("{exposed}[auth]\ntokens_file = \"/etc/ferry/tokens\"\n"),
            format!("{exposed}[auth]\nallow_unauthenticated_network = true\n"),
            format!("{exposed}{tls}[auth]\ntokens_file = \"/etc/ferry/tokens\"\n"),
        ] {
            let c =
                CloudConfig::from_toml(&ok, Path::new("x")).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(!c.server.listen.ip().is_loopback());
        }
        // The flag/env override is checked the same way.
        let cli = Cli::parse_from(["ferry-cloud", "--listen", "0.0.0.0:6001"]);
        assert!(cli.resolve().is_err());
        let cli = Cli::parse_from([
            "ferry-cloud",
            "--listen",
            "0.0.0.0:6001",
            "--tokens-file",
            "/etc/ferry/tokens",
        ]);
        let c = cli.resolve().unwrap();
        assert_eq!(c.auth.tokens_file, Some(PathBuf::from("/etc/ferry/tokens")));
        let cli = Cli::parse_from([
            "ferry-cloud",
            "--listen",
            "[::]:6001",
            "--allow-unauthenticated-network",
            "true",
        ]);
        assert!(cli.resolve().unwrap().auth.allow_unauthenticated_network);
    }

    #[test]
    fn tls_files_come_in_pairs() {
        let cases = [
            ("[tls]\ncert_file = \"c.pem\"\n", "tls.key_file"),
            ("[tls]\nkey_file = \"c.key\"\n", "tls.cert_file"),
            ("[tls]\nclient_ca_file = \"ca.pem\"\n", "tls.client_ca_file"),
            ("[tls]\nca_file = \"ca.pem\"\n", "ca_file"),
        ];
        for (text, needle) in cases {
            let err = CloudConfig::from_toml(text, Path::new("x")).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
        let c = CloudConfig::from_toml(
            "[tls]\ncert_file = \"c.pem\"\nkey_file = \"c.key\"\nclient_ca_file = \"ca.pem\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert!(c.tls.enabled() && c.tls.mutual());
        let cli = Cli::parse_from([
            "ferry-cloud",
            "--tls-cert-file",
            "s.pem",
            "--tls-key-file",
            "s.key",
        ]);
        let c = cli.resolve().unwrap();
        assert!(c.tls.enabled() && !c.tls.mutual());
    }

    #[test]
    fn rejects_bad_models() {
        let cases = [
            ("[[models]]\nid = \"a\"\nbackend = \"openai\"\n", "base_url"),
            (
                "[[models]]\nid = \"a\"\nbackend = \"candle\"\nbase_url = \"http://x/v1\"\n",
                "backend",
            ),
            (
                "[[models]]\nid = \"a\"\nbackend = \"candle\"\n[[models]]\nid = \"a\"\nbackend = \"candle\"\n",
                "twice",
            ),
            (
                "[[models]]\nid = \"a\"\nbackend = \"candle\"\ncapabilities = [\"audio\"]\n",
                "audio",
            ),
            (
                "[[models]]\nid = \"a\"\nbackend = \"candle\"\nusd_per_million_tokens = -1.0\n",
                "usd_per_million_tokens",
            ),
            ("[[models]]\nid = \"a\"\nbackend = \"tgi\"\n", "backend"),
            ("[server]\nbogus = 1\n", "bogus"),
            (
                "[server]\nlisten = \"127.0.0.1:7000\"\nhttp_addr = \"127.0.0.1:7000\"\n",
                "server.http_addr",
            ),
        ];
        for (text, needle) in cases {
            let err = CloudConfig::from_toml(text, Path::new("x")).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }
}
