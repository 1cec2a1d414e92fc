//! A loaded model and its generation loop.

mod multimodal;

pub use multimodal::MultimodalPrompt;

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use tokenizers::Tokenizer;

use crate::model::{gguf_architecture, Backbone, Session};
use crate::sampling::Sampler;
use crate::source::ModelLocation;
use crate::stream::{Detokenizer, StopMatcher, StopScan};
use crate::template::{ChatTemplate, CHATML};
use crate::{candle_err, tokenizer};
use ferry_core::{
    ChatMessage, CostHints, Error, FinishReason, ModelFormat, ModelManifest, Result,
    SamplingParams, Tier,
};

/// End-of-turn markers that end generation when present in a vocabulary, as llama.cpp treats
/// its "end of generation" tokens.
/// A model that writes one of these has ended its turn: the end-of-turn markers, and the
/// start-of-turn markers (a model opening the next turn, as base checkpoints do, has ended its
/// own).
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|end|>",
    "<|im_start|>",
    "<start_of_turn>",
];

/// Counters shared by every request on the engine; tests and metrics read them.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Tokens sampled, over all requests.
    pub tokens_decoded: AtomicU64,
    /// Prompt tokens evaluated, over all requests.
    pub prompt_tokens: AtomicU64,
    /// Generations that ran to a finish reason.
    pub completed: AtomicU64,
    /// Generations stopped because the client went away.
    pub cancelled: AtomicU64,
}

/// Static description of a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub family: String,
    pub tier: Tier,
    pub capabilities: Vec<String>,
    /// Usable context window in tokens (prompt + completion).
    pub context_length: usize,
    pub cost: CostHints,
    /// Weight file(s) the model was loaded from.
    pub weights: Vec<PathBuf>,
    /// Bytes of weights held in memory (after any repacking); decoding reads them all per token.
    pub resident_weight_bytes: u64,
}

/// Engine-level switches that are not part of a user request.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenerateOptions {
    /// Keep generating past end-of-sequence (benchmarks need a fixed token count).
    pub ignore_eos: bool,
}

/// What a generation sends to its consumer.
pub trait GenerationEvent {
    /// Called with each new piece of text; `Break` stops generation (client gone).
    fn text(&mut self, delta: &str) -> ControlFlow<()>;
    /// Polled once per token; `true` stops generation even while text is being held back.
    fn cancelled(&self) -> bool {
        false
    }
}

impl<F: FnMut(&str) -> ControlFlow<()>> GenerationEvent for F {
    fn text(&mut self, delta: &str) -> ControlFlow<()> {
        self(delta)
    }
}

/// How a generation ended, with its accounting.
#[derive(Debug, Clone)]
pub struct GenerationOutcome {
    pub prompt_tokens: usize,
    /// Tokens generated, excluding the end-of-sequence token.
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
    /// The text sent to the consumer.
    pub text: String,
    /// Time to evaluate the prompt.
    pub prefill_ms: f64,
    /// Time spent generating after the prompt.
    pub decode_ms: f64,
}

/// A model resident in memory, ready to serve any number of concurrent requests.
pub struct LoadedModel {
    info: ModelInfo,
    backbone: Backbone,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    bos_token: String,
    eos_ids: BTreeSet<u32>,
    device: Device,
    stats: Arc<EngineStats>,
    /// Image preprocessing and placeholders, for vision-language models.
    vision: Option<multimodal::VisionSupport>,
    /// The manifest's `example_turns`, as messages put before each conversation.
    examples: Vec<ChatMessage>,
    /// The manifest's `stop`: text that ends every generation.
    stop: Vec<String>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("info", &self.info)
            .finish()
    }
}

fn read_json(path: &std::path::Path, what: &'static str) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| Error::InvalidFile {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Token ids named by a config's `eos_token_id` (a number or a list of numbers).
fn json_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// A special token given in `tokenizer_config.json` either as a string or as `{ "content": .. }`.
fn json_token(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` of a `tokenizer_config.json`: a string, or a list of named templates.
fn json_template(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl LoadedModel {
    /// Loads the model described by `manifest`, resolving files under `model_dir`.
    pub fn load(
        manifest: &ModelManifest,
        model_dir: &std::path::Path,
        device: &Device,
    ) -> Result<Self> {
        let loc = ModelLocation::of(manifest, model_dir);
        let tokenizer_json = loc.optional_file("tokenizer.json")?;
        let tokenizer_config = match loc.optional_file("tokenizer_config.json")? {
            Some(p) => Some(read_json(&p, "tokenizer config")?),
            None => None,
        };
        let mut eos_ids: BTreeSet<u32> = BTreeSet::new();
        let mut template_src = manifest.chat_template.clone().or_else(|| {
            tokenizer_config
                .as_ref()
                .and_then(|c| json_template(c.get("chat_template")))
        });
        let mut bos_token = tokenizer_config
            .as_ref()
            .and_then(|c| json_token(c.get("bos_token")))
            .unwrap_or_default();
        let mut eos_token = tokenizer_config
            .as_ref()
            .and_then(|c| json_token(c.get("eos_token")))
            .unwrap_or_default();

        let (backbone, tokenizer, family, meta_ctx, weights, resident_weight_bytes) = match manifest
            .format
        {
            ModelFormat::Gguf => {
                let name = manifest.weights.as_deref().ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "model `{}` names no weights file",
                        manifest.id
                    ))
                })?;
                let path = loc.file(name)?;
                let mut file = std::fs::File::open(&path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                let content = crate::gguf::read_checked(&mut file, &path)?;
                let arch = gguf_architecture(&content);
                let meta_u32 = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
                let meta_ctx = meta_u32(&format!("{arch}.context_length"));
                let tokens = content
                    .metadata
                    .get("tokenizer.ggml.tokens")
                    .and_then(|v| v.to_vec().ok())
                    .map(|v| {
                        v.iter()
                            .filter_map(|t| t.to_string().ok().cloned())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                if let Some(id) = meta_u32("tokenizer.ggml.eos_token_id") {
                    eos_ids.insert(id);
                    if eos_token.is_empty() {
                        eos_token = tokens.get(id as usize).cloned().unwrap_or_default();
                    }
                }
                if bos_token.is_empty() {
                    if let Some(id) = meta_u32("tokenizer.ggml.bos_token_id") {
                        bos_token = tokens.get(id as usize).cloned().unwrap_or_default();
                    }
                }
                if template_src.is_none() {
                    template_src = content
                        .metadata
                        .get("tokenizer.chat_template")
                        .and_then(|v| v.to_string().ok())
                        .cloned();
                }
                let tok = match &tokenizer_json {
                    Some(p) => tokenizer::from_file(p)?,
                    None => tokenizer::from_gguf(&content, &path)?,
                };
                // ferry's kernels read Q4_1 as it is; candle alone needs the Q8_0 copy.
                let repacked = if device.is_cpu()
                    && manifest.cpu_repack_q4_1
                    && !crate::kernels::kernel_available()
                {
                    crate::model::repack_q4_1_as_q8_0(&content, &mut file, &path)?
                } else {
                    None
                };
                let resident = match &repacked {
                    Some((_, buf)) => buf.get_ref().len() as u64,
                    None => file.metadata().map(|m| m.len()).unwrap_or(0),
                };
                let backbone = match repacked {
                    Some((content, mut buf)) => {
                        tracing::debug!(model = %manifest.id, "Q4_1 weights repacked as Q8_0 for the CPU kernel");
                        Backbone::from_gguf(content, &mut buf, &path, device)?
                    }
                    None => Backbone::from_gguf(content, &mut file, &path, device)?,
                };
                let resident = backbone.resident_bytes().unwrap_or(resident);
                (backbone, tok, arch, meta_ctx, vec![path], resident)
            }
            ModelFormat::Safetensors => {
                let config_path = loc.file("config.json")?;
                let config = read_json(&config_path, "model config")?;
                let family = if manifest.family == "auto" {
                    config
                        .get("model_type")
                        .and_then(|v| v.as_str())
                        .unwrap_or("unknown")
                        .to_string()
                } else {
                    manifest.family.clone()
                };
                eos_ids.extend(json_ids(config.get("eos_token_id")));
                // Vision-language configs keep the language model's ids in `text_config`.
                eos_ids.extend(json_ids(
                    config
                        .get("text_config")
                        .and_then(|t| t.get("eos_token_id")),
                ));
                if let Some(gen) = loc.optional_file("generation_config.json")? {
                    eos_ids.extend(json_ids(
                        read_json(&gen, "generation config")?.get("eos_token_id"),
                    ));
                }
                let meta_ctx = config
                    .get("max_position_embeddings")
                    .and_then(|v| v.as_u64())
                    .map(|v| v as u32);
                let files = match &manifest.weights {
                    Some(w) => vec![loc.file(w)?],
                    None => match loc.optional_file("model.safetensors.index.json")? {
                        Some(index) => {
                            let idx = read_json(&index, "safetensors index")?;
                            let names: BTreeSet<String> = idx
                                .get("weight_map")
                                .and_then(|m| m.as_object())
                                .map(|m| {
                                    m.values()
                                        .filter_map(|v| v.as_str().map(str::to_string))
                                        .collect()
                                })
                                .unwrap_or_default();
                            names
                                .iter()
                                .map(|n| loc.file(n))
                                .collect::<Result<Vec<_>>>()?
                        }
                        None => vec![loc.file("model.safetensors")?],
                    },
                };
                let tok_path = tokenizer_json
                    .clone()
                    .ok_or_else(|| Error::MissingModelFile {
                        path: loc.dir.join("tokenizer.json"),
                        hint: "a safetensors model needs its tokenizer.json".to_string(),
                    })?;
                let tok = tokenizer::from_file(&tok_path)?;
                let config_text =
                    serde_json::to_string(&config).expect("re-serialising parsed JSON");
                let backbone = Backbone::from_safetensors(
                    &family,
                    &config_text,
                    &files,
                    &config_path,
                    device,
                )?;
                let resident = files
                    .iter()
                    .filter_map(|f| std::fs::metadata(f).ok())
                    .map(|m| m.len())
                    .sum();
                (backbone, tok, family, meta_ctx, files, resident)
            }
        };

        for marker in END_OF_TURN_TOKENS
            .iter()
            .copied()
            .chain(manifest.eos_tokens.iter().map(String::as_str))
        {
            if let Some(id) = tokenizer::token_id(&tokenizer, marker) {
                eos_ids.insert(id);
            }
        }
        if eos_ids.is_empty() {
            if let Some(id) = tokenizer::token_id(&tokenizer, &eos_token) {
                eos_ids.insert(id);
            }
        }
        let vision = multimodal::VisionSupport::load(&backbone, &loc, &tokenizer)?;
        if vision.is_some() && manifest.chat_template.is_none() {
            if let Some(t) = multimodal::processor_template(&loc)? {
                template_src = Some(t);
            }
        }
        let fallback_template = if vision.is_some() {
            crate::template::LLAVA
        } else if family == "gemma3" {
            crate::template::GEMMA3
        } else {
            CHATML
        };
        let template = ChatTemplate::new(
            template_src.as_deref().unwrap_or(fallback_template),
            &bos_token,
            &eos_token,
        )?;
        let declared = manifest.context_length.or(meta_ctx).unwrap_or(2048) as usize;
        let context_length = match backbone.max_positions() {
            Some(cap) => declared.min(cap),
            None => declared,
        };
        let info = ModelInfo {
            id: manifest.id.clone(),
            family,
            tier: manifest.tier,
            capabilities: manifest.capabilities.clone(),
            context_length,
            cost: manifest.cost.clone(),
            weights,
            resident_weight_bytes,
        };
        tracing::debug!(model = %info.id, family = %info.family, context_length, eos = ?eos_ids, "model loaded");
        Ok(LoadedModel {
            info,
            backbone,
            tokenizer,
            template,
            bos_token,
            eos_ids,
            device: device.clone(),
            stats: Arc::new(EngineStats::default()),
            vision,
            examples: manifest
                .example_turns
                .iter()
                .flat_map(|t| {
                    [
                        ChatMessage::text(ferry_core::Role::User, &t.user),
                        ChatMessage::text(ferry_core::Role::Assistant, &t.assistant),
                    ]
                })
                .collect(),
            stop: manifest.stop.clone(),
        })
    }

    /// Static description of the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Counters of this model's generations.
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids that end a generation: the EOS of the model's metadata, the end-of-turn markers
    /// its vocabulary has, and the manifest's `eos_tokens`.
    pub fn stop_token_ids(&self) -> &BTreeSet<u32> {
        &self.eos_ids
    }

    /// Renders the conversation with the chat template, after the manifest's example turns,
    /// and tokenises it.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.encode_chat_with(messages, true)
    }

    /// [`LoadedModel::encode_chat`], with or without the manifest's example turns (to measure
    /// what they change).
    pub fn encode_chat_with(&self, messages: &[ChatMessage], examples: bool) -> Result<Vec<u32>> {
        if examples && !self.examples.is_empty() {
            // After the system message, if any: templates expect it first.
            let split = usize::from(
                messages
                    .first()
                    .is_some_and(|m| m.role == ferry_core::Role::System),
            );
            let mut all = messages[..split].to_vec();
            all.extend(self.examples.iter().cloned());
            all.extend_from_slice(&messages[split..]);
            return self.encode_chat_with(&all, false);
        }
        if self.vision.is_some() {
            return self.encode_multimodal_text(messages);
        }
        let text = self.template.render(messages)?;
        // Templates that write the BOS token themselves must not get a second one.
        let add_special = self.bos_token.is_empty() || !text.starts_with(&self.bos_token);
        tokenizer::encode_prompt(&self.tokenizer, &text, add_special)
    }

    /// Tokenises plain text without special tokens (benchmarks, token counting).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        tokenizer::encode_prompt(&self.tokenizer, text, false)
    }

    /// Runs one short greedy chat generation and forgets it, so that the first request is
    /// not the one that pays for first-touch costs: page-in of the mapped weights, the
    /// allocator's first buffers, the thread pool and the kernels' lazy setup. The counters in
    /// [`LoadedModel::stats`] are left as they were. Call before the model is shared (blocking).
    /// Returns the wall time it took, in milliseconds.
    pub fn warm_up(&self) -> Result<f64> {
        let started = Instant::now();
        let before = [
            self.stats.prompt_tokens.load(Ordering::Relaxed),
            self.stats.tokens_decoded.load(Ordering::Relaxed),
            self.stats.completed.load(Ordering::Relaxed),
        ];
        // Vision-language models render a text-only chat too (`encode_chat` dispatches).
        let prompt = self.encode_chat(&[ChatMessage::text(ferry_core::Role::User, "Hello")])?;
        let outcome = self.generate(
            &prompt,
            &SamplingParams::greedy(2),
            GenerateOptions { ignore_eos: true },
            &mut |_: &str| ControlFlow::Continue(()),
        );
        for (counter, was) in [
            &self.stats.prompt_tokens,
            &self.stats.tokens_decoded,
            &self.stats.completed,
        ]
        .into_iter()
        .zip(before)
        {
            counter.store(was, Ordering::Relaxed);
        }
        outcome?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    }

    /// Generates a completion for `prompt`, calling `sink` with text as it is produced.
    ///
    /// Blocking and CPU-heavy: call it from a blocking thread. Returns `Error::Cancelled` when
    /// the sink reports the consumer gone, `Error::InvalidArgument` when the prompt leaves no
    /// room in the context window.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        options: GenerateOptions,
        sink: &mut dyn GenerationEvent,
    ) -> Result<GenerationOutcome> {
        self.run_generation(
            prompt.len(),
            &mut |session: &mut Session| session.forward(prompt),
            params,
            options,
            sink,
        )
    }

    /// The generation loop after the prompt: `prefill` feeds the prompt's `prompt_len`
    /// positions to a fresh session and returns the logits of its last position.
    fn run_generation(
        &self,
        prompt_len: usize,
        prefill: &mut dyn FnMut(&mut Session) -> Result<candle_core::Tensor>,
        params: &SamplingParams,
        options: GenerateOptions,
        sink: &mut dyn GenerationEvent,
    ) -> Result<GenerationOutcome> {
        let mut decoder = Decoder::new(self, prompt_len, params, options)?;
        let mut session = self.backbone.session(&self.device)?;
        let mut logits = prefill(&mut session)?;
        decoder.prefilled();
        loop {
            match decoder.step(&logits, sink) {
                Next::Feed(token) => logits = session.forward(&[token])?,
                Next::Done(outcome) => return outcome,
            }
        }
    }

    /// A fresh decoding session over this model's weights, with its own empty KV cache (what
    /// each generation and each batched sequence decodes with).
    pub fn session(&self) -> Result<Session> {
        self.backbone.session(&self.device)
    }
}

/// What a generation does after a step: feed the sampled token, or end.
pub(crate) enum Next {
    /// Feed this token and step again with the logits it gives.
    Feed(u32),
    /// The generation ended (a finish reason, or an error such as the client gone).
    Done(Result<GenerationOutcome>),
}

/// One generation after its prompt: sampling, end-of-sequence and stop strings, UTF-8-safe
/// detokenising, the token budget and the accounting. The single-stream loop
/// ([`LoadedModel::generate`]) and the batcher ([`crate::batch`]) drive the same one, a step
/// per set of logits.
pub(crate) struct Decoder<'m> {
    model: &'m LoadedModel,
    sampler: Sampler,
    detok: Detokenizer<'m>,
    stopper: StopMatcher,
    ignore_eos: bool,
    prompt_len: usize,
    budget: usize,
    generated: usize,
    text: String,
    started: Instant,
    prefill_ms: f64,
    decode_started: Instant,
}

impl<'m> Decoder<'m> {
    /// Checks the prompt (not empty, room left in the context window) and sets up the
    /// generation.
    pub(crate) fn new(
        model: &'m LoadedModel,
        prompt_len: usize,
        params: &SamplingParams,
        options: GenerateOptions,
    ) -> Result<Self> {
        if prompt_len == 0 {
            return Err(Error::invalid(
                "messages",
                "the prompt encodes to no tokens",
            ));
        }
        let ctx = model.info.context_length;
        if prompt_len >= ctx {
            return Err(Error::invalid(
                "messages",
                format!(
                    "the prompt is {prompt_len} tokens; model `{}` has a context of {ctx} tokens",
                    model.info.id
                ),
            ));
        }
        let now = Instant::now();
        Ok(Decoder {
            model,
            sampler: Sampler::new(params),
            detok: Detokenizer::new(&model.tokenizer),
            stopper: StopMatcher::new(
                params
                    .stop
                    .iter()
                    .chain(&model.stop)
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .collect(),
            ),
            ignore_eos: options.ignore_eos,
            prompt_len,
            budget: (params.max_tokens as usize).min(ctx - prompt_len),
            generated: 0,
            text: String::new(),
            started: now,
            prefill_ms: 0.0,
            decode_started: now,
        })
    }

    /// The prompt has been fed: the time so far is prefill time.
    pub(crate) fn prefilled(&mut self) {
        self.model
            .stats
            .prompt_tokens
            .fetch_add(self.prompt_len as u64, Ordering::Relaxed);
        self.prefill_ms = self.started.elapsed().as_secs_f64() * 1e3;
        self.decode_started = Instant::now();
    }

    /// The generation stops because its consumer is gone (counted as cancelled).
    pub(crate) fn cancelled(&self) -> Error {
        self.model.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        Error::Cancelled(format!("client went away after {} tokens", self.generated))
    }

    fn emit(&mut self, delta: &str, sink: &mut dyn GenerationEvent) -> ControlFlow<()> {
        if delta.is_empty() {
            return ControlFlow::Continue(());
        }
        self.text.push_str(delta);
        sink.text(delta)
    }

    /// Samples the next token from `logits` and sends the text it completes.
    pub(crate) fn step(
        &mut self,
        logits: &candle_core::Tensor,
        sink: &mut dyn GenerationEvent,
    ) -> Next {
        if self.generated >= self.budget {
            return self.finish(FinishReason::Length, sink);
        }
        if sink.cancelled() {
            return Next::Done(Err(self.cancelled()));
        }
        let next = match self.sampler.sample(logits) {
            Ok(t) => t,
            Err(e) => return Next::Done(Err(candle_err(e))),
        };
        self.model
            .stats
            .tokens_decoded
            .fetch_add(1, Ordering::Relaxed);
        if !self.ignore_eos && self.model.eos_ids.contains(&next) {
            return self.finish(FinishReason::Stop, sink);
        }
        self.generated += 1;
        let piece = match self.detok.push(next) {
            Ok(p) => p,
            Err(e) => return Next::Done(Err(e)),
        };
        if let Some(piece) = piece {
            let (released, stopped) = match self.stopper.push(&piece) {
                StopScan::Continue(t) => (t, false),
                StopScan::Stopped(t) => (t, true),
            };
            if self.emit(&released, sink).is_break() {
                return Next::Done(Err(self.cancelled()));
            }
            if stopped {
                return self.done(FinishReason::StopSequence);
            }
        }
        if self.generated < self.budget {
            Next::Feed(next)
        } else {
            self.finish(FinishReason::Length, sink)
        }
    }

    /// Ends without a stop string having matched: releases what the detokeniser and the stop
    /// matcher still hold (a stop string may yet complete in the detokeniser's tail).
    fn finish(&mut self, mut finish: FinishReason, sink: &mut dyn GenerationEvent) -> Next {
        let flushed = match self.detok.flush() {
            Ok(t) => t.unwrap_or_default(),
            Err(e) => return Next::Done(Err(e)),
        };
        let tail = match self.stopper.push(&flushed) {
            StopScan::Continue(mut t) => {
                t.push_str(&self.stopper.finish());
                t
            }
            StopScan::Stopped(t) => {
                finish = FinishReason::StopSequence;
                t
            }
        };
        if self.emit(&tail, sink).is_break() {
            return Next::Done(Err(self.cancelled()));
        }
        self.done(finish)
    }

    fn done(&mut self, finish_reason: FinishReason) -> Next {
        self.model.stats.completed.fetch_add(1, Ordering::Relaxed);
        Next::Done(Ok(GenerationOutcome {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
            finish_reason,
            text: std::mem::take(&mut self.text),
            prefill_ms: self.prefill_ms,
            decode_ms: self.decode_started.elapsed().as_secs_f64() * 1e3,
        }))
    }
}
