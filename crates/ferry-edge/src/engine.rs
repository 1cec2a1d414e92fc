//! The local tier's engine handle: the loaded models, their batch threads, and the energy each
//! model's runs are charged. Every local generation (an app's, an exploration step's other
//! models, the judge's) goes through [`LocalEngine::generate_metered`]; the blocking threads
//! that run them hold this handle, not the daemon's whole state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use ferry_core::{Error, ModelManifest, Result};
use ferry_energy::meter::{EnergyMeter, RequestEnergy};
use ferry_engine::batch::{BatchConfig, BatchStats, Batcher};
use ferry_engine::{Device, GenerateOptions, GenerationEvent, GenerationOutcome, LoadedModel};

/// The loaded local models with their batch threads and energy accounts.
pub struct LocalEngine {
    /// Ids of the configured local generators (loaded or not), for a clear refusal.
    configured: Vec<String>,
    models: RwLock<HashMap<String, Arc<LoadedModel>>>,
    /// Each loaded model's batch thread: concurrent requests to one model decode together.
    batchers: RwLock<HashMap<String, Arc<Batcher>>>,
    default_model: RwLock<Option<String>>,
    /// Measures device energy and attributes it to requests.
    energy: Arc<EnergyMeter>,
    /// Joules attributed per model since start.
    energy_by_model: Mutex<BTreeMap<String, f64>>,
}

impl LocalEngine {
    /// An engine with nothing loaded yet; `configured` are the local generator manifests.
    pub fn new(configured: &[ModelManifest], energy: Arc<EnergyMeter>) -> Self {
        LocalEngine {
            configured: configured.iter().map(|m| m.id.clone()).collect(),
            models: RwLock::new(HashMap::new()),
            batchers: RwLock::new(HashMap::new()),
            default_model: RwLock::new(None),
            energy,
            energy_by_model: Mutex::new(BTreeMap::new()),
        }
    }

    /// Loads `manifest`'s model (blocking), warms it up and starts its batch thread of up to
    /// `max_batch` sequences.
    pub fn load(
        &self,
        manifest: &ModelManifest,
        model_dir: &std::path::Path,
        device: &Device,
        max_batch: usize,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let model = LoadedModel::load(manifest, model_dir, device)?;
        let load_ms = started.elapsed().as_millis() as u64;
        // Before the model is ready: the first request must not pay for first touches.
        let warm_up_ms = model.warm_up()?;
        tracing::info!(
            model = %manifest.id,
            family = %model.info().family,
            context_length = model.info().context_length,
            load_ms,
            warm_up_ms = warm_up_ms as u64,
            "model loaded"
        );
        let model = Arc::new(model);
        let batcher = Batcher::start(
            model.clone(),
            BatchConfig {
                max_batch,
                ..BatchConfig::default()
            },
        )?;
        self.batchers
            .write()
            .insert(manifest.id.clone(), Arc::new(batcher));
        self.models.write().insert(manifest.id.clone(), model);
        Ok(())
    }

    /// Sets the model `auto` uses when nothing routes it.
    pub fn set_default(&self, id: String) {
        *self.default_model.write() = Some(id);
    }

    /// A loaded model by id.
    pub fn model(&self, id: &str) -> Option<Arc<LoadedModel>> {
        self.models.read().get(id).cloned()
    }

    /// Every loaded model.
    pub fn models(&self) -> Vec<Arc<LoadedModel>> {
        self.models.read().values().cloned().collect()
    }

    /// Counters of a loaded model's batch thread (steps, and sequences summed over steps).
    pub fn batch_stats(&self, id: &str) -> Option<Arc<BatchStats>> {
        self.batchers.read().get(id).map(|b| b.stats().clone())
    }

    /// The model used for `auto`.
    pub fn default_model_id(&self) -> Option<String> {
        self.default_model.read().clone()
    }

    /// Picks the model for a request: the named one, or the default for `auto`.
    pub fn resolve_model(&self, requested: Option<&str>) -> Result<Arc<LoadedModel>> {
        let id = match requested {
            Some(id) => id.to_string(),
            None => self
                .default_model_id()
                .ok_or_else(|| Error::Unavailable("no model is loaded yet".into()))?,
        };
        if let Some(m) = self.model(&id) {
            return Ok(m);
        }
        if self.configured.contains(&id) {
            return Err(Error::FailedPrecondition(format!(
                "model `{id}` is configured but not loaded; add it to models.load"
            )));
        }
        Err(Error::ModelNotFound(id))
    }

    /// The energy meter the runs are measured with.
    pub fn energy(&self) -> &Arc<EnergyMeter> {
        &self.energy
    }

    /// Runs `model` on `prompt` on this (blocking) thread, through its batch thread, with the
    /// energy of the run measured and booked to the model ([`LocalEngine::add_model_energy`]).
    pub fn generate_metered(
        &self,
        model: &LoadedModel,
        prompt: &[u32],
        sampling: &ferry_core::SamplingParams,
        sink: &mut dyn GenerationEvent,
    ) -> (Result<GenerationOutcome>, RequestEnergy) {
        let account = self.energy.begin();
        let batcher = self.batchers.read().get(&model.info().id).cloned();
        let out = match batcher {
            Some(b) => b.generate(prompt, sampling, GenerateOptions::default(), sink),
            None => model.generate(prompt, sampling, GenerateOptions::default(), sink),
        };
        let energy = self.energy.end(account);
        self.add_model_energy(&model.info().id, &energy);
        (out, energy)
    }

    /// Books a request's energy: its model's total, and the exported metrics.
    ///
    /// Metrics (labels bounded by the configured models and sources):
    /// `ferry_request_energy_joules{model,source}` (histogram, per request),
    /// `ferry_model_energy_joules{model,source}` (total attributed to a model),
    /// `ferry_energy_joules{source,account}` with account `measured`, `attributed` or `idle`.
    pub fn add_model_energy(&self, model: &str, energy: &RequestEnergy) {
        let total = {
            let mut by_model = self.energy_by_model.lock();
            let t = by_model.entry(model.to_string()).or_default();
            *t += energy.joules;
            *t
        };
        let source = energy.source.clone();
        metrics::histogram!("ferry_request_energy_joules", "model" => model.to_string(), "source" => source.clone())
            .record(energy.joules);
        metrics::gauge!("ferry_model_energy_joules", "model" => model.to_string(), "source" => source.clone())
            .set(total);
        let totals = self.energy.totals();
        for (account, value) in [
            ("measured", totals.measured_joules),
            ("attributed", totals.attributed_joules),
            ("idle", totals.idle_joules),
        ] {
            metrics::gauge!("ferry_energy_joules", "source" => source.clone(), "account" => account).set(value);
        }
    }

    /// Joules attributed per model since start.
    pub fn energy_by_model(&self) -> BTreeMap<String, f64> {
        self.energy_by_model.lock().clone()
    }
}
