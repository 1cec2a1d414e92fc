//! The routers of both tiers and the sentence encoder they share: the local tier's, built once
//! the local models are loaded, and the cloud tier's, built when an `auto` request is first
//! placed in the cloud (its zoo is known only once an endpoint answered ListModels).

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use ferry_core::{Error, ModelKind, ModelManifest, Result};
use ferry_engine::encoder::SentenceEncoder;
use ferry_engine::LoadedModel;
use ferry_proto::v1 as pb;

use crate::config::EdgeConfig;
use crate::router::ZooRouter;

/// The daemon's routers.
#[derive(Default)]
pub struct Routers {
    /// Over the local models, when `router.enabled`; set once the models are loaded.
    local: OnceLock<Arc<ZooRouter>>,
    /// Over the cloud zoo; built on first use.
    cloud: Mutex<Option<Arc<ZooRouter>>>,
    /// The sentence encoder of both routers (one copy), with its embedding space's id (what
    /// priors and saved router state are tied to).
    encoder: OnceLock<(String, Arc<SentenceEncoder>)>,
}

impl Routers {
    /// Builds the local tier's router (blocking): the loaded models ordered by resident weight bytes (the
    /// cost and capability proxy until measured joules replace the cost side), the encoder
    /// from its manifest, and the state restored from the state directory.
    pub fn build_local(
        &self,
        models: &[Arc<LoadedModel>],
        config: &EdgeConfig,
        device: &ferry_engine::Device,
    ) -> Result<Arc<ZooRouter>> {
        let mut zoo: Vec<(u64, String)> = models
            .iter()
            .map(|m| (m.info().resident_weight_bytes, m.info().id.clone()))
            .collect();
        zoo.sort();
        let zoo: Vec<String> = zoo.into_iter().map(|(_, id)| id).collect();
        let cfg = &config.router;
        let manifest = ModelManifest::load_dir(&config.models.manifest_dir)?
            .into_iter()
            .find(|m| m.id == cfg.encoder && m.kind == ModelKind::Encoder)
            .ok_or_else(|| {
                Error::invalid(
                    "router.encoder",
                    format!(
                        "no encoder manifest `{}` in {}",
                        cfg.encoder,
                        config.models.manifest_dir.display()
                    ),
                )
            })?;
        let encoder = Arc::new(SentenceEncoder::load(
            &manifest,
            &config.models.model_dir,
            device,
        )?);
        let started = std::time::Instant::now();
        encoder.embed(&["warm up"])?;
        tracing::info!(
            encoder = %manifest.id,
            warm_up_ms = started.elapsed().as_millis() as u64,
            "encoder loaded"
        );
        let space = manifest.embedding_space();
        let _ = self.encoder.set((space.to_string(), encoder.clone()));
        let router = ZooRouter::new(
            "local",
            zoo,
            space,
            encoder,
            cfg,
            &config.state.dir,
            config.state.max_records,
        )?;
        tracing::info!(zoo = ?router.zoo(), policy = %cfg.policy, alpha = cfg.alpha, "the router routes model auto");
        let router = Arc::new(router);
        let _ = self.local.set(router.clone());
        Ok(router)
    }

    /// The local tier's router, when routing is enabled and the models are loaded.
    pub fn local(&self) -> Option<&Arc<ZooRouter>> {
        self.local.get()
    }

    /// The cloud tier's router, once built.
    pub fn cloud(&self) -> Option<Arc<ZooRouter>> {
        self.cloud.lock().clone()
    }

    /// Every router built so far (local first), for saving and status.
    pub fn all(&self) -> Vec<Arc<ZooRouter>> {
        self.local()
            .cloned()
            .into_iter()
            .chain(self.cloud())
            .collect()
    }

    /// The cloud tier's router over `zoo` (ferry-cloud's ListModels), built on first use
    /// (blocking: restores its state file). `None` when routing is off for the cloud tier.
    /// The zoo is fixed when the router is built, ordered by ascending price hint then joules
    /// hint; a model the cloud lists later joins it at the next start (the state file of the
    /// old zoo is then set aside as stale).
    pub fn ensure_cloud(
        &self,
        zoo: &[pb::ModelInfo],
        config: &EdgeConfig,
    ) -> Result<Option<Arc<ZooRouter>>> {
        if !(config.router.enabled && config.cloud.route_auto) || zoo.is_empty() {
            return Ok(None);
        }
        let mut slot = self.cloud.lock();
        if let Some(r) = slot.as_ref() {
            return Ok(Some(r.clone()));
        }
        let Some((encoder_id, encoder)) = self.encoder.get().cloned() else {
            return Ok(None);
        };
        let mut ordered: Vec<&pb::ModelInfo> = zoo.iter().collect();
        ordered.sort_by(|a, b| {
            let key = |m: &pb::ModelInfo| {
                (
                    m.usd_per_million_tokens.unwrap_or(0.0),
                    m.joules_per_token.unwrap_or(0.0),
                )
            };
            key(a)
                .partial_cmp(&key(b))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let ids: Vec<String> = ordered.iter().map(|m| m.id.clone()).collect();
        let router = Arc::new(ZooRouter::new(
            "cloud",
            ids,
            &encoder_id,
            encoder,
            &config.router,
            &config.state.dir,
            config.state.max_records,
        )?);
        tracing::info!(zoo = ?router.zoo(), "the router routes auto requests placed in the cloud");
        *slot = Some(router.clone());
        Ok(Some(router))
    }
}
