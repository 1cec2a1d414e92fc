//! Continuous batching: many generations of one model decode together.
//!
//! A [`Batcher`] owns one thread per model. Each step it feeds every active sequence in one
//! forward pass ([`Session::forward_many`]): a decoding sequence gives one row, a sequence
//! still reading its prompt a chunk of it, so a long prompt never stalls the others for more
//! than one chunk. A step reads the weights once whatever the number of rows, which is where
//! the throughput comes from: at this size decode is bound by memory bandwidth, not by
//! arithmetic. Sequences join and leave between steps; each has its own KV cache, sampler,
//! detokeniser and stop strings (the same [`Decoder`] the single-stream loop drives), so a
//! batched generation gives what [`LoadedModel::generate`] gives, up to float rounding in the
//! products.
//!
//! Callers keep the blocking, sink-driven interface of [`LoadedModel::generate`]:
//! [`Batcher::generate`] hands the work to the batch thread and relays its text to the sink on
//! the calling thread, so a slow consumer (a full response channel) holds up only its own
//! relay, never the batch. Admission (how many run at once, in which order) stays with the
//! daemon: the batcher takes whatever it is given, up to its batch size, first come first
//! served.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ferry_core::{Error, Result, SamplingParams};

use crate::engine::{Decoder, Next};
use crate::model::Session;
use crate::{GenerateOptions, GenerationEvent, GenerationOutcome, LoadedModel, MultimodalPrompt};

/// How a [`Batcher`] groups its sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most sequences in one step; more wait for one to leave.
    pub max_batch: usize,
    /// Most prompt tokens one sequence feeds in a step. A longer prompt is read in chunks,
    /// between which the other sequences decode a token each.
    pub prefill_chunk_tokens: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch: 8,
            prefill_chunk_tokens: 128,
        }
    }
}

/// Counters of a batcher's steps, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Forward passes run.
    pub steps: AtomicU64,
    /// Sequence-rows fed, summed over steps (rows / steps is the mean batch).
    pub sequence_steps: AtomicU64,
    /// Steps that failed (an engine error or a panic): every sequence in them failed.
    pub failed_steps: AtomicU64,
}

/// One model's batch thread. Dropping the handle lets the thread finish the sequences it has
/// and exit.
pub struct Batcher {
    tx: mpsc::Sender<Work>,
    model: Arc<LoadedModel>,
    config: BatchConfig,
    stats: Arc<BatchStats>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("model", &self.model.info().id)
            .field("config", &self.config)
            .finish()
    }
}

/// Models whose steps share the CPU: one step at a time across every batcher of the process,
/// so two models' passes do not split the cores between them mid-product (the kernels'
/// thread pool spins between its barriers, and two callers would make each wait on the other).
static STEP: Mutex<()> = Mutex::new(());

/// What the batch thread sends back to a relaying caller.
enum Event {
    Text(String),
    Done(Result<GenerationOutcome>),
}

/// A generation handed to the batch thread.
struct Work {
    prompt: Vec<u32>,
    params: SamplingParams,
    options: GenerateOptions,
    events: mpsc::Sender<Event>,
    /// Set by the relaying caller when its consumer is gone.
    cancel: Arc<AtomicBool>,
}

/// The batch thread's side of a sequence's consumer: sends text to the relay, and stops when
/// the relay says so (or is gone).
struct RelaySink {
    events: mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
}

impl GenerationEvent for RelaySink {
    fn text(&mut self, delta: &str) -> ControlFlow<()> {
        match self.events.send(Event::Text(delta.to_string())) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// How often a relaying caller looks at its consumer's `cancelled()` while no text comes (a
/// long prompt, a full batch).
const RELAY_POLL: Duration = Duration::from_millis(10);

impl Batcher {
    /// Starts the batch thread of `model`.
    pub fn start(model: Arc<LoadedModel>, config: BatchConfig) -> Result<Self> {
        let config = BatchConfig {
            max_batch: config.max_batch.max(1),
            prefill_chunk_tokens: config.prefill_chunk_tokens.max(1),
        };
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(BatchStats::default());
        let (thread_model, thread_stats) = (model.clone(), stats.clone());
        std::thread::Builder::new()
            .name(format!("batch-{}", model.info().id))
            .spawn(move || run(&thread_model, &rx, config, &thread_stats))
            .map_err(|e| Error::io("starting the batch thread", e))?;
        Ok(Batcher {
            tx,
            model,
            config,
            stats,
        })
    }

    /// The model this batcher serves.
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// How it groups sequences.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// Counters of its steps.
    pub fn stats(&self) -> &Arc<BatchStats> {
        &self.stats
    }

    /// [`LoadedModel::generate`] through the batch: blocks the calling thread until the
    /// generation ends, calling `sink` with its text on this thread as it comes.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        options: GenerateOptions,
        sink: &mut dyn GenerationEvent,
    ) -> Result<GenerationOutcome> {
        let (events, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        self.tx
            .send(Work {
                prompt: prompt.to_vec(),
                params: params.clone(),
                options,
                events,
                cancel: cancel.clone(),
            })
            .map_err(|_| Error::Engine("the model's batch thread has stopped".to_string()))?;
        // Once the consumer is gone, text still in flight is dropped; the batch thread answers
        // the cancel flag at its next step with `Error::Cancelled`.
        let mut gone = false;
        loop {
            if !gone && sink.cancelled() {
                gone = true;
                cancel.store(true, Ordering::Relaxed);
            }
            match rx.recv_timeout(RELAY_POLL) {
                Ok(Event::Text(delta)) => {
                    if !gone && sink.text(&delta).is_break() {
                        gone = true;
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
                Ok(Event::Done(outcome)) => return outcome,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Engine(
                        "the model's batch thread stopped during the generation".to_string(),
                    ))
                }
            }
        }
    }
}

impl Batcher {
    /// [`LoadedModel::generate_multimodal`] through the batch where it can be: a prompt without
    /// images joins the batch; one with images (its prefill splices the vision tower's features
    /// into the embeddings) runs alone on the calling thread.
    pub fn generate_multimodal(
        &self,
        prompt: &MultimodalPrompt,
        params: &SamplingParams,
        options: GenerateOptions,
        sink: &mut dyn GenerationEvent,
    ) -> Result<GenerationOutcome> {
        if prompt.image_count() == 0 {
            self.generate(&prompt.tokens, params, options, sink)
        } else {
            self.model
                .generate_multimodal(prompt, params, options, sink)
        }
    }
}

/// A sequence in the batch.
struct Sequence<'m> {
    session: Session,
    decoder: Decoder<'m>,
    prompt: Vec<u32>,
    /// Prompt tokens fed so far.
    fed: usize,
    /// The token to feed next once the prompt is in.
    next: u32,
    sink: RelaySink,
}

impl<'m> Sequence<'m> {
    /// Sets up a sequence, or hands back why not with the channel to tell its caller.
    fn start(
        model: &'m LoadedModel,
        work: Work,
    ) -> std::result::Result<Self, (Error, mpsc::Sender<Event>)> {
        let prepared = Decoder::new(model, work.prompt.len(), &work.params, work.options)
            .and_then(|decoder| Ok((decoder, model.session()?)));
        match prepared {
            Ok((decoder, session)) => Ok(Sequence {
                session,
                decoder,
                fed: 0,
                next: 0,
                sink: RelaySink {
                    events: work.events,
                    cancel: work.cancel,
                },
                prompt: work.prompt,
            }),
            Err(e) => Err((e, work.events)),
        }
    }

    /// Tokens this sequence feeds in the next step.
    fn input(&self, chunk: usize) -> &[u32] {
        if self.fed < self.prompt.len() {
            &self.prompt[self.fed..self.prompt.len().min(self.fed + chunk)]
        } else {
            std::slice::from_ref(&self.next)
        }
    }

    fn end(self, outcome: Result<GenerationOutcome>) {
        // A relay that is gone has nothing left to tell.
        let _ = self.sink.events.send(Event::Done(outcome));
    }
}

/// The batch thread: admit, step, hand out tokens, until the handle is dropped and nothing
/// is left to finish.
fn run(model: &LoadedModel, rx: &mpsc::Receiver<Work>, config: BatchConfig, stats: &BatchStats) {
    let mut waiting: VecDeque<Work> = VecDeque::new();
    let mut active: Vec<Sequence<'_>> = Vec::new();
    let mut open = true;
    loop {
        if active.is_empty() && waiting.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(work) => waiting.push_back(work),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(work) => waiting.push_back(work),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        while active.len() < config.max_batch {
            let Some(work) = waiting.pop_front() else {
                break;
            };
            match Sequence::start(model, work) {
                Ok(seq) => active.push(seq),
                Err((e, events)) => {
                    let _ = events.send(Event::Done(Err(e)));
                }
            }
        }
        // Consumers that left since the last step leave before it.
        let mut i = 0;
        while i < active.len() {
            if active[i].sink.cancelled() {
                let seq = active.swap_remove(i);
                let e = seq.decoder.cancelled();
                seq.end(Err(e));
            } else {
                i += 1;
            }
        }
        if active.is_empty() {
            continue;
        }
        step(&mut active, config, stats);
    }
}

/// One forward pass over every active sequence, then a token for each that finished its
/// prompt or is decoding; sequences that end leave `active`.
fn step(active: &mut Vec<Sequence<'_>>, config: BatchConfig, stats: &BatchStats) {
    let chunk = config.prefill_chunk_tokens;
    // Copied out so the sessions can be borrowed mutably beside them.
    let inputs: Vec<Vec<u32>> = active.iter().map(|s| s.input(chunk).to_vec()).collect();
    let fed: Vec<usize> = inputs.iter().map(Vec::len).collect();
    let result = {
        let _step = STEP.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut batch: Vec<(&mut Session, &[u32])> = active
                .iter_mut()
                .zip(&inputs)
                .map(|(s, input)| (&mut s.session, input.as_slice()))
                .collect();
            Session::forward_many(&mut batch)
        }))
    };
    stats.steps.fetch_add(1, Ordering::Relaxed);
    stats
        .sequence_steps
        .fetch_add(active.len() as u64, Ordering::Relaxed);
    let logits = match result {
        Ok(Ok(logits)) => logits,
        failed => {
            stats.failed_steps.fetch_add(1, Ordering::Relaxed);
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "the forward pass panicked".to_string(),
            };
            tracing::error!(sequences = active.len(), "batch step failed: {why}");
            for seq in active.drain(..) {
                seq.end(Err(Error::Engine(format!("batch step failed: {why}"))));
            }
            return;
        }
    };
    let mut ended = Vec::new();
    for (i, ((seq, logits), n)) in active.iter_mut().zip(&logits).zip(fed).enumerate() {
        let prefilling = seq.fed < seq.prompt.len();
        if prefilling {
            seq.fed += n;
            if seq.fed < seq.prompt.len() {
                continue;
            }
            seq.decoder.prefilled();
        }
        match seq.decoder.step(logits, &mut seq.sink) {
            Next::Feed(token) => seq.next = token,
            Next::Done(outcome) => ended.push((i, outcome)),
        }
    }
    // Highest index first, so the earlier indices stay valid.
    for (i, outcome) in ended.into_iter().rev() {
        active.swap_remove(i).end(outcome);
    }
}
