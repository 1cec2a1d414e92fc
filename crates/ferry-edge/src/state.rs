//! The daemon's shared state: configuration, the local engine handle ([`crate::engine`]: models,
//! batch threads, energy), admission control, the ledger's book (counters and request records),
//! routers, placement, the cloud pool, and the shutdown signals. Request paths take the narrow
//! handle they need ([`AppState::engine`], [`AppState::book`]) where they can.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use ferry_core::{Error, ModelKind, ModelManifest, Result, Tier};
use ferry_energy::meter::EnergyMeter;
use ferry_engine::LoadedModel;

use crate::auth::Auth;
use crate::cloud::CloudPool;
use crate::config::EdgeConfig;
use crate::engine::LocalEngine;
use crate::records::RecordStore;
use crate::router::ZooRouter;
use crate::routers::Routers;
use ferry_daemon::admission::Admission;
use ferry_proto::v1 as pb;

/// Counters of the gRPC surface, read by tests and (later) metrics.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub requests_received: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub requests_completed: AtomicU64,
    pub requests_failed: AtomicU64,
    /// Clients that left before their request finished.
    pub requests_abandoned: AtomicU64,
}

/// What the ledger books a request's end into: the outcome counters and the request records.
/// The ledger's `finish`, `refused` and `completion_undelivered` take this narrow handle
/// ([`AppState::book`]), not the daemon's whole state.
#[derive(Clone, Copy)]
pub struct Book<'a> {
    pub stats: &'a ServerStats,
    pub records: &'a RecordStore,
}

/// Everything the services share.
pub struct AppState {
    pub config: EdgeConfig,
    /// Generator manifests of the local tier, sorted by id.
    pub manifests: Vec<ModelManifest>,
    /// The loaded models, their batch threads and their energy accounts: the handle the local
    /// tier, exploration and the judge run generations through.
    engine: Arc<LocalEngine>,
    ready: AtomicBool,
    draining: AtomicBool,
    /// Requests between [`AppState::enter`] and the end of their stream (the drain waits on it).
    open_requests: Arc<AtomicUsize>,
    pub admission: Admission,
    pub records: RecordStore,
    pub stats: ServerStats,
    /// Measures device energy and attributes it to requests (shared with the engine).
    pub energy: Arc<EnergyMeter>,
    /// Cancelled when in-flight generations must stop (end of the shutdown grace period).
    pub abort: CancellationToken,
    seed_state: AtomicU64,
    /// The routers of both tiers and their encoder.
    routers: Routers,
    /// When the state was built, for uptime.
    pub started: Instant,
    /// Bearer-token check for TCP callers.
    pub auth: Auth,
    /// TMO placement, when `placement.policy_file` is set.
    pub placement: Option<crate::placement::Placer>,
    /// The cloud tier's endpoints, when `cloud.endpoints` is set.
    pub cloud: Option<Arc<CloudPool>>,
}

impl AppState {
    /// Builds the state from a validated config; reads the manifests, loads no weights.
    pub fn new(config: EdgeConfig) -> Result<Self> {
        let manifests: Vec<ModelManifest> = ModelManifest::load_dir(&config.models.manifest_dir)?
            .into_iter()
            .filter(|m| m.kind == ModelKind::Generator && m.tier == Tier::Local)
            .collect();
        for id in config.models_to_load() {
            if !manifests.iter().any(|m| m.id == id) {
                return Err(Error::invalid(
                    "models.load",
                    format!(
                        "no local generator manifest with id `{id}` in {}",
                        config.models.manifest_dir.display()
                    ),
                ));
            }
        }
        let records = RecordStore::new(config.state.max_records, Some(&config.state.dir))?;
        let auth = match &config.auth.tokens_file {
            Some(path) => Auth::from_file(path)?,
            None => Auth::off(),
        };
        let placement = crate::placement::Placer::from_config(&config.placement)?;
        let cloud = CloudPool::from_config(&config.cloud)?;
        let sources = ferry_energy::open_sources(&config.energy)
            .map_err(|e| Error::invalid("energy.sources", e.to_string()))?;
        let energy = Arc::new(
            EnergyMeter::start(sources, config.energy.sample_hz)
                .map_err(|e| Error::invalid("energy", e.to_string()))?,
        );
        tracing::info!(source = energy.source_label(), devices = ?energy.devices(), "energy metering");
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed);
        Ok(AppState {
            admission: Admission::with_app_queue(
                config.server.max_concurrent,
                config.server.max_queue,
                config
                    .server
                    .max_queue_per_app
                    .unwrap_or(config.server.max_queue / 2),
            ),
            engine: Arc::new(LocalEngine::new(&manifests, energy.clone())),
            config,
            manifests,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            open_requests: Arc::new(AtomicUsize::new(0)),
            records,
            stats: ServerStats::default(),
            energy,
            abort: CancellationToken::new(),
            seed_state: AtomicU64::new(seed),
            routers: Routers::default(),
            started: Instant::now(),
            auth,
            placement,
            cloud,
        })
    }

    /// Loads the configured models (blocking: call from a blocking thread) and marks the state
    /// ready once the default model is resident.
    pub fn load_models(&self) -> Result<()> {
        let device = candle_core_device();
        for id in self.config.models_to_load() {
            let manifest = self
                .manifests
                .iter()
                .find(|m| m.id == id)
                .expect("checked in AppState::new");
            self.engine.load(
                manifest,
                &self.config.models.model_dir,
                &device,
                self.config.server.max_concurrent,
            )?;
        }
        let default = match &self.config.models.default {
            Some(d) if self.model(d).is_some() => d.clone(),
            Some(d) => {
                return Err(Error::invalid(
                    "models.default",
                    format!("default model `{d}` is not among the loaded models"),
                ))
            }
            None => self
                .config
                .models_to_load()
                .first()
                .cloned()
                .ok_or_else(|| Error::invalid("models.load", "no model to load"))?,
        };
        self.engine.set_default(default);
        if self.config.router.enabled {
            self.routers
                .build_local(&self.engine.models(), &self.config, &device)?;
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// The local tier's router, when routing is enabled and the models are loaded.
    pub fn router(&self) -> Option<&Arc<ZooRouter>> {
        self.routers.local()
    }

    /// The cloud tier's router, once built.
    pub fn cloud_router(&self) -> Option<Arc<ZooRouter>> {
        self.routers.cloud()
    }

    /// Every router built so far (local first), for saving and status.
    pub fn routers(&self) -> Vec<Arc<ZooRouter>> {
        self.routers.all()
    }

    /// The cloud tier's router over `zoo` (ferry-cloud's ListModels), built on first use
    /// (blocking; see [`Routers::ensure_cloud`]). `None` when routing is off for the cloud tier.
    pub fn ensure_cloud_router(&self, zoo: &[pb::ModelInfo]) -> Result<Option<Arc<ZooRouter>>> {
        self.routers.ensure_cloud(zoo, &self.config)
    }

    /// What the ledger books into (counters and records), as a narrow handle.
    pub fn book(&self) -> Book<'_> {
        Book {
            stats: &self.stats,
            records: &self.records,
        }
    }

    /// The local engine: loaded models, batch threads, energy per model.
    pub fn engine(&self) -> &Arc<LocalEngine> {
        &self.engine
    }

    /// A loaded model by id.
    pub fn model(&self, id: &str) -> Option<Arc<LoadedModel>> {
        self.engine.model(id)
    }

    /// Counters of a loaded model's batch thread (steps, and sequences summed over steps).
    pub fn batch_stats(&self, id: &str) -> Option<Arc<ferry_engine::batch::BatchStats>> {
        self.engine.batch_stats(id)
    }

    /// The model used for `auto`.
    pub fn default_model_id(&self) -> Option<String> {
        self.engine.default_model_id()
    }

    /// True once the default model is loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// True after shutdown began: new requests are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts draining: from here [`AppState::enter`] refuses, and [`AppState::open_requests`]
    /// counts every request that entered before.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Opens a request for the drain: counted until the returned guard drops (held by the task
    /// that runs the request to its last item, local, offloaded or fallen back), or refused
    /// with UNAVAILABLE once draining started.
    ///
    /// Count first, then look at the flag, both sequentially consistent, while the drain sets
    /// the flag, then reads the count: whichever comes second sees the other, so no request can
    /// slip between a "not draining" check and the drain's "nothing in flight".
    pub fn enter(&self) -> Result<OpenRequest> {
        self.open_requests.fetch_add(1, Ordering::SeqCst);
        let open = OpenRequest(self.open_requests.clone());
        if self.is_draining() {
            return Err(Error::Unavailable("ferryd is shutting down".into()));
        }
        Ok(open)
    }

    /// Requests entered and not yet finished (what the drain waits for).
    pub fn open_requests(&self) -> usize {
        self.open_requests.load(Ordering::SeqCst)
    }

    /// Joules attributed per model since start.
    pub fn energy_by_model(&self) -> std::collections::BTreeMap<String, f64> {
        self.engine.energy_by_model()
    }

    /// A fresh seed for requests that bring none (splitmix64 over a time-seeded counter).
    pub fn next_seed(&self) -> u64 {
        let mut z = self
            .seed_state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The compute device: CPU unless built with CUDA and a GPU is present.
fn candle_core_device() -> ferry_engine::Device {
    ferry_engine::default_device()
}

/// One request's place in the drain count ([`AppState::enter`]); released when dropped.
#[derive(Debug)]
pub struct OpenRequest(Arc<AtomicUsize>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
