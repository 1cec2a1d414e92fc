//! The candle backend: ferry-cloud serves a zoo model itself with ferry-engine's
//! [`LoadedModel`] (the same engine as ferryd; CPU by default, the first CUDA GPU when built with
//! the `cuda` feature), and measures each request's energy with ferry-energy's [`EnergyMeter`].
//! Text requests run through the model's batch thread ([`Batcher`]): concurrent ones decode
//! together, up to `server.max_concurrent` per step.
//!
//! Vision-language models (LLaVA-1.5, LLaVA-NeXT) get the request's images: ferry-engine decodes
//! and preprocesses them, places one image placeholder per image through the model's chat
//! template, and splices the vision tower's features in at the placeholders. An image that does
//! not decode is INVALID_ARGUMENT naming its field (`messages[i].parts[j].image`); the prompt's
//! token count, for limits and usage, includes the context positions the images' features take.

use std::ops::ControlFlow;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use ferry_core::{Error, ErrorKind};
use ferry_energy::meter::EnergyMeter;
use ferry_engine::batch::{BatchConfig, Batcher};
use ferry_engine::{GenerateOptions, GenerationEvent, LoadedModel};

use crate::backend::{Backend, BackendOutcome, BackendRequest, EnergyFigure, Failure};

/// A resident candle model, with its batch thread: concurrent text requests decode together.
pub struct CandleBackend {
    batcher: Arc<Batcher>,
    energy: Arc<EnergyMeter>,
    max_prompt_tokens: u32,
}

impl CandleBackend {
    /// Serves `model`, batching up to `max_batch` generations per step.
    pub fn new(
        model: Arc<LoadedModel>,
        energy: Arc<EnergyMeter>,
        max_prompt_tokens: u32,
        max_batch: usize,
    ) -> Result<Self, Error> {
        let batcher = Batcher::start(
            model,
            BatchConfig {
                max_batch,
                ..BatchConfig::default()
            },
        )?;
        Ok(CandleBackend {
            batcher: Arc::new(batcher),
            energy,
            max_prompt_tokens,
        })
    }

    /// The loaded model.
    pub fn model(&self) -> &Arc<LoadedModel> {
        self.batcher.model()
    }
}

/// Forwards generated text into the service's channel from the blocking generation thread.
struct ChannelSink {
    tx: mpsc::Sender<String>,
    stop: CancellationToken,
}

impl GenerationEvent for ChannelSink {
    fn text(&mut self, delta: &str) -> ControlFlow<()> {
        match self.tx.blocking_send(delta.to_string()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    fn cancelled(&self) -> bool {
        self.stop.is_cancelled() || self.tx.is_closed()
    }
}

#[tonic::async_trait]
impl Backend for CandleBackend {
    fn kind(&self) -> &'static str {
        "candle"
    }

    async fn generate(
        &self,
        req: BackendRequest,
        deltas: mpsc::Sender<String>,
    ) -> Result<BackendOutcome, Failure> {
        let batcher = self.batcher.clone();
        let model = batcher.model().clone();
        let energy = self.energy.clone();
        let max_prompt = self.max_prompt_tokens as usize;
        let span =
            tracing::info_span!("candle", request_id = %req.request_id, model = %model.info().id);
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            // Text-only models refuse images here too (ferry-cloud's capability check may be
            // configured wider than the model).
            let prompt = model.encode_multimodal(&req.messages)?;
            let limit = max_prompt.min(model.info().context_length.saturating_sub(1));
            if prompt.positions() > limit {
                let images = match prompt.image_count() {
                    0 => String::new(),
                    n => format!(
                        " ({} of them for {n} image{})",
                        prompt.image_positions(),
                        if n == 1 { "" } else { "s" }
                    ),
                };
                return Err(Error::invalid(
                    "messages",
                    format!(
                        "the prompt is {} tokens{images}, over the limit of {limit} tokens of model `{}`",
                        prompt.positions(),
                        model.info().id
                    ),
                )
                .into());
            }
            let mut sink = ChannelSink {
                tx: deltas,
                stop: req.stop.clone(),
            };
            let account = energy.begin();
            let out = batcher.generate_multimodal(
                &prompt,
                &req.sampling,
                GenerateOptions::default(),
                &mut sink,
            );
            let used = energy.end(account);
            let out = out?;
            Ok(BackendOutcome {
                prompt_tokens: out.prompt_tokens as u32,
                completion_tokens: out.completion_tokens as u32,
                finish_reason: out.finish_reason,
                energy: Some(EnergyFigure {
                    joules: used.joules,
                    source: used.source,
                    devices: used.devices,
                }),
            })
        })
        .await
        .map_err(|e| {
            Failure::new(
                ErrorKind::Internal,
                format!("generation thread failed: {e}"),
            )
        })?
    }
}
