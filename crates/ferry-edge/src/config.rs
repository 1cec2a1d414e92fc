//! ferryd's configuration: a TOML file (`configs/edge.toml`), every setting of which can be
//! overridden by a command-line flag or a `FERRY_*` environment variable (flag > env > file >
//! built-in default).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

use ferry_core::{Error, RequestLimits, Result};
use ferry_daemon::config::{ConfigVersion, LogConfig};
use ferry_energy::EnergyConfig;

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// The file format (`version = 1`; absent reads as 1).
    pub version: ConfigVersion,
    pub server: ServerConfig,
    pub models: ModelsConfig,
    pub limits: RequestLimits,
    pub energy: EnergyConfig,
    pub state: StateConfig,
    pub router: RouterConfig,
    pub placement: crate::placement::PlacementConfig,
    pub cloud: crate::cloud::CloudConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
}

/// Who may call ferryd over TCP (gRPC and HTTP): the same `[auth]` settings as ferry-cloud's.
/// The Unix socket is trusted: its file permissions decide.
pub use ferry_daemon::auth::AuthConfig;

/// Routing of `model: "auto"` over the loaded local models (and the cloud tier's zoo).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Route `auto` over the zoo; off, `auto` goes to `models.default`.
    pub enabled: bool,
    /// `mixrank` (ferry's: the cheapest mix of models that meets alpha, no cost weight to set),
    /// `mess-plus-fb` (MESS+ that also learns from feedback on served answers) or `mess-plus`
    /// (the paper's: learns from exploration samples only).
    pub policy: String,
    /// SLA target: fraction of requests whose feedback must say "satisfied".
    pub alpha: f64,
    /// Cost weight V per joule: a request of `0.1 / v` joules weighs as much as 0.1 request of
    /// SLA debt. The default 0.01 suits the 1–20 J requests of small local models.
    pub v_per_joule: f64,
    /// MESS+ exploration constant c in `p_t = min(1, c / t^(1/4))`.
    pub c: f64,
    /// mixrank: share of the requests without `expect_feedback` on which a model whose rate is
    /// still uncertain may be tried anyway (set it to the share of traffic your apps send
    /// Feedback on without saying so). 0: only requests that say so explore.
    pub feedback_share: f64,
    /// mixrank: difficulty prior file from `ferry router train-prior` (must match `encoder`).
    pub prior: Option<PathBuf>,
    /// Seed of the exploration coins and the predictor's initial weights.
    pub seed: u64,
    /// Sentence encoder (manifest id) that turns the question into the predictor's input.
    pub encoder: String,
    /// Learned state is written to `<state.dir>/router-<tier>.json` at most this often.
    pub save_interval_ms: u64,
    /// An optional judge that grades answers no app will send Feedback on.
    pub judge: JudgeConfig,
}

/// `[router.judge]`: a model that grades routed answers, so the router learns on requests no
/// app gives Feedback on. Its labels are counted apart from the apps' (`ferry status`), and
/// they teach only a request that has no label yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeConfig {
    /// The grading model: a loaded local model or one the cloud tier serves (the strongest you
    /// have). Unset: no judge.
    pub model: Option<String>,
    /// Share of the routed requests without `expect_feedback` that the judge grades. mixrank may
    /// try an uncertain model on them; on a MESS+ exploration step the judge grades every
    /// model's answer, so the predictor learns all of them as the paper's offline labels do.
    pub share: f64,
    /// Tokens the judge may write; its verdict is the first "yes" or "no" in them.
    pub max_tokens: u32,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            model: None,
            share: 0.1,
            max_tokens: 8,
        }
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            enabled: false,
            policy: "mixrank".to_string(),
            alpha: 0.7,
            v_per_joule: 0.01,
            c: 0.1,
            feedback_share: 0.0,
            prior: None,
            seed: 42,
            encoder: "all-minilm-l6-v2-q8".to_string(),
            save_interval_ms: 1000,
            judge: JudgeConfig::default(),
        }
    }
}

/// Listening and admission control.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address. Loopback by default: exposing ferryd is an explicit choice.
    pub grpc_addr: SocketAddr,
    /// Optional Unix socket path served in addition to TCP.
    pub unix_socket: Option<PathBuf>,
    /// Serve the HTTP surface: OpenAI-compatible API, /metrics, /healthz, /readyz.
    pub http_enabled: bool,
    /// HTTP listen address. Loopback by default, like gRPC.
    pub http_addr: SocketAddr,
    /// Requests generating at the same time; a model's concurrent requests decode together, in
    /// one forward pass per token (continuous batching), so this is also the batch size.
    pub max_concurrent: usize,
    /// Requests waiting for a slot; beyond it new requests get RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Waiting requests one app (bearer token) may hold, so a flood from one app cannot get
    /// the others refused; unset: half of `max_queue` (at least 1). Whatever this is, a freed
    /// slot goes to the waiting app that has used the least slot time.
    pub max_queue_per_app: Option<usize>,
    /// Seconds in-flight requests may take to finish after SIGTERM before they are stopped.
    pub shutdown_grace_s: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: "127.0.0.1:50051".parse().expect("valid default address"),
            unix_socket: None,
            http_enabled: true,
            http_addr: "127.0.0.1:8080".parse().expect("valid default address"),
            // Eight sequences per step gave the most tokens a second on a 2-core AVX-512 box
            // (README, Benchmark); each stream then decodes at about a third of its lone speed.
            max_concurrent: 8,
            max_queue: 16,
            max_queue_per_app: None,
            shutdown_grace_s: 30,
        }
    }
}

/// Which models exist and which are loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// Directory of model manifests (`*.toml`).
    pub manifest_dir: PathBuf,
    /// Directory holding model files (`ferry models fetch` installs there).
    pub model_dir: PathBuf,
    /// Manifest ids loaded at start; empty loads the default model only.
    pub load: Vec<String>,
    /// Model used for `auto` until a routing policy chooses; unset uses the first loaded.
    pub default: Option<String>,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            manifest_dir: PathBuf::from("models"),
            model_dir: PathBuf::from("models/cache"),
            load: Vec::new(),
            default: Some("smollm2-135m-instruct".to_string()),
        }
    }
}

/// Where learned state and request records are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// State directory (feedback log); created if missing.
    pub dir: PathBuf,
    /// Request records kept in memory for Feedback lookups.
    pub max_records: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: PathBuf::from("state"),
            max_records: 100_000,
        }
    }
}

impl EdgeConfig {
    /// Parses a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: EdgeConfig = ferry_daemon::config::read_toml(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses config text; `path` is for messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        let cfg: EdgeConfig = ferry_daemon::config::parse_toml(text, path)?;
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
        self.limits.validate()?;
        self.energy
            .validate()
            .map_err(|e| bad("energy", &e.to_string()))?;
        let exposed = !self.server.grpc_addr.ip().is_loopback()
            || (self.server.http_enabled && !self.server.http_addr.ip().is_loopback());
        if exposed && self.auth.tokens_file.is_none() && !self.auth.allow_unauthenticated_network {
            return Err(bad(
                "auth.tokens_file",
                "ferryd would listen on a non-loopback address with no authentication; set auth.tokens_file (see `ferry token new`) or auth.allow_unauthenticated_network = true",
            ));
        }
        let r = &self.router;
        if !matches!(r.policy.as_str(), "mixrank" | "mess-plus" | "mess-plus-fb") {
            return Err(bad(
                "router.policy",
                "must be `mixrank`, `mess-plus` or `mess-plus-fb`",
            ));
        }
        if !(0.0..=1.0).contains(&r.feedback_share) {
            return Err(bad("router.feedback_share", "must be in [0, 1]"));
        }
        if !(0.0..=1.0).contains(&r.alpha) {
            return Err(bad("router.alpha", "must be in [0, 1]"));
        }
        if !(r.v_per_joule.is_finite() && r.v_per_joule >= 0.0 && r.c.is_finite() && r.c >= 0.0) {
            return Err(bad(
                "router.v_per_joule",
                "v_per_joule and c must be finite and >= 0",
            ));
        }
        if r.save_interval_ms == 0 {
            return Err(bad("router.save_interval_ms", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&r.judge.share) {
            return Err(bad("router.judge.share", "must be in [0, 1]"));
        }
        if !(1..=256).contains(&r.judge.max_tokens) {
            return Err(bad("router.judge.max_tokens", "must be in 1..=256"));
        }
        if r.judge
            .model
            .as_deref()
            .is_some_and(|m| m.trim().is_empty())
        {
            return Err(bad(
                "router.judge.model",
                "must name a model (leave it out for no judge)",
            ));
        }
        self.cloud.validate()?;
        self.placement.validate()?;
        self.log.validate()?;
        Ok(())
    }

    /// The ids to load at start.
    pub fn models_to_load(&self) -> Vec<String> {
        if !self.models.load.is_empty() {
            return self.models.load.clone();
        }
        self.models.default.iter().cloned().collect()
    }
}

/// Command line of `ferryd`. Every setting of [`EdgeConfig`] has a flag and a `FERRY_*` variable.
#[derive(Debug, Parser, Default)]
#[command(
    name = "ferryd",
    version,
    about = "ferry edge daemon: serves local LLMs over gRPC"
)]
pub struct Cli {
    /// TOML config file; flags and FERRY_* variables override its values.
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// ferry-cloud endpoints to offload to (comma-separated http:// or https:// URIs; empty
    /// string: no cloud tier).
    #[arg(long, env = "FERRY_CLOUD_ENDPOINTS", value_delimiter = ',')]
    pub cloud_endpoints: Option<Vec<String>>,
    #[command(flatten)]
    pub settings: Settings,
    #[command(flatten)]
    pub shared: SharedSettings,
}

ferry_daemon::settings! {
    /// Every setting of [`EdgeConfig`] but the file itself and the cloud endpoints, each as a
    /// flag, a `FERRY_*` variable and the config key it overrides.
    pub struct Settings for EdgeConfig {
        /// gRPC listen address.
        grpc_addr: SocketAddr = "FERRY_GRPC_ADDR" => server.grpc_addr;
        /// Also serve on this Unix socket.
        unix_socket: PathBuf = "FERRY_UNIX_SOCKET" => server.unix_socket;
        /// Waiting requests one app (bearer token) may hold (default: half of max_queue).
        max_queue_per_app: usize = "FERRY_MAX_QUEUE_PER_APP" => server.max_queue_per_app;
        /// Directory of model manifests.
        manifest_dir: PathBuf = "FERRY_MANIFEST_DIR" => models.manifest_dir;
        /// Directory of model files.
        model_dir: PathBuf = "FERRY_MODEL_DIR" => models.model_dir;
        /// Model ids to load at start (comma-separated).
        #[arg(value_delimiter = ',')]
        load: Vec<String> = "FERRY_LOAD" => models.load;
        /// Default model id.
        default_model: String = "FERRY_DEFAULT_MODEL" => models.default;
        /// State directory.
        state_dir: PathBuf = "FERRY_STATE_DIR" => state.dir;
        /// Request records kept for Feedback.
        max_records: usize = "FERRY_MAX_RECORDS" => state.max_records;
        /// Route model "auto" with MESS+ over the loaded models (true/false).
        router_enabled: bool = "FERRY_ROUTER_ENABLED" => router.enabled;
        /// Routing policy: mixrank, mess-plus-fb or mess-plus (the paper's: live, an exploration
        /// step's Feedback trains only the served model; with a judge every answer is graded).
        router_policy: String = "FERRY_ROUTER_POLICY" => router.policy;
        /// SLA target alpha.
        router_alpha: f64 = "FERRY_ROUTER_ALPHA" => router.alpha;
        /// Cost weight V per joule.
        router_v_per_joule: f64 = "FERRY_ROUTER_V_PER_JOULE" => router.v_per_joule;
        /// Exploration constant c.
        router_c: f64 = "FERRY_ROUTER_C" => router.c;
        /// mixrank: share of requests without expect_feedback that may explore.
        router_feedback_share: f64 = "FERRY_ROUTER_FEEDBACK_SHARE" => router.feedback_share;
        /// Judge model that grades routed answers without feedback (local or cloud model id).
        router_judge_model: String = "FERRY_ROUTER_JUDGE_MODEL" => router.judge.model;
        /// Share of routed requests without expect_feedback that the judge grades.
        router_judge_share: f64 = "FERRY_ROUTER_JUDGE_SHARE" => router.judge.share;
        /// mixrank: difficulty prior file (`ferry router train-prior`).
        router_prior: PathBuf = "FERRY_ROUTER_PRIOR" => router.prior;
        /// Router seed.
        router_seed: u64 = "FERRY_ROUTER_SEED" => router.seed;
        /// Sentence encoder manifest id for routing.
        router_encoder: String = "FERRY_ROUTER_ENCODER" => router.encoder;
        /// Least milliseconds between two saves of the router's state.
        router_save_interval_ms: u64 = "FERRY_ROUTER_SAVE_INTERVAL_MS" => router.save_interval_ms;
        /// TMO placement policy file from `ferry policy train` (reloaded on SIGHUP).
        placement_policy: PathBuf = "FERRY_PLACEMENT_POLICY" => placement.policy_file;
        /// Task category of requests that name none.
        placement_default_task: String = "FERRY_PLACEMENT_DEFAULT_TASK" => placement.default_task;
        /// CA certificate (PEM) of the cloud endpoints' TLS certificates.
        cloud_ca_file: PathBuf = "FERRY_CLOUD_CA_FILE" => cloud.ca_file;
        /// Client certificate (PEM) for mutual TLS with ferry-cloud.
        cloud_cert_file: PathBuf = "FERRY_CLOUD_CERT_FILE" => cloud.cert_file;
        /// Client key (PEM) for mutual TLS with ferry-cloud.
        cloud_key_file: PathBuf = "FERRY_CLOUD_KEY_FILE" => cloud.key_file;
        /// File holding the bearer token sent to ferry-cloud.
        cloud_token_file: PathBuf = "FERRY_CLOUD_TOKEN_FILE" => cloud.token_file;
        /// Time budget of an offloaded request without an app deadline, milliseconds.
        cloud_request_timeout_ms: u64 = "FERRY_CLOUD_REQUEST_TIMEOUT_MS" => cloud.request_timeout_ms;
    }
}

ferry_daemon::shared_settings! {
    /// The request limits, energy and log settings, as in every ferry daemon.
    pub struct SharedSettings for EdgeConfig, prefix = "FERRY_"
}

impl Cli {
    /// Loads the config file (if any) and applies flag/env overrides.
    pub fn resolve(&self) -> Result<EdgeConfig> {
        let mut c = match &self.config {
            Some(p) => EdgeConfig::from_file(p)?,
            None => EdgeConfig::default(),
        };
        self.settings.apply(&mut c);
        self.shared.apply(&mut c);
        // An empty entry (`FERRY_CLOUD_ENDPOINTS=""`) means no cloud tier.
        if let Some(e) = &self.cloud_endpoints {
            c.cloud.endpoints = e.iter().filter(|s| !s.trim().is_empty()).cloned().collect();
        }
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
            assert!(var.starts_with("FERRY_"), "{var}");
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

    #[test]
    fn sample_config_parses_and_flags_override() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/edge.toml");
        let file = EdgeConfig::from_file(&path).unwrap();
        assert!(
            file.server.grpc_addr.ip().is_loopback(),
            "safe default: loopback"
        );
        let cli = Cli::parse_from([
            "ferryd",
            "--config",
            path.to_str().unwrap(),
            "--grpc-addr",
            "127.0.0.1:6000",
            "--load",
            "a,b",
            "--max-prompt-tokens",
            "99",
            "--energy-sources",
            "rapl,estimate",
        ]);
        let c = cli.resolve().unwrap();
        assert_eq!(c.server.grpc_addr.port(), 6000);
        assert_eq!(c.models.load, vec!["a", "b"]);
        assert_eq!(c.limits.max_prompt_tokens, 99);
        assert_eq!(c.energy.sources, vec!["rapl", "estimate"]);
        assert_eq!(c.energy.sample_hz, file.energy.sample_hz);
        assert_eq!(c.server.max_queue, file.server.max_queue);
    }

    #[test]
    fn refuses_to_listen_exposed_without_tokens() {
        let exposed = "[server]\ngrpc_addr = \"0.0.0.0:50051\"\n";
        let err = EdgeConfig::from_toml(exposed, Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("auth.tokens_file"), "{err}");
        let with_tokens = format!("{exposed}[auth]\ntokens_file = \"/etc/ferry/tokens\"\n");
        assert!(EdgeConfig::from_toml(&with_tokens, Path::new("x")).is_ok());
        let opted_out = format!("{exposed}[auth]\nallow_unauthenticated_network = true\n");
        assert!(EdgeConfig::from_toml(&opted_out, Path::new("x")).is_ok());
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(EdgeConfig::from_toml("[server]\nbogus = 1\n", Path::new("x")).is_err());
        let err =
            EdgeConfig::from_toml("[server]\nmax_concurrent = 0\n", Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("max_concurrent"), "{err}");
        assert_eq!(
            EdgeConfig::from_toml("", Path::new("x")).unwrap(),
            EdgeConfig::default()
        );
    }
}
