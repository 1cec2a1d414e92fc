//! `ferry bench`: prefill and decode speed of a local model in ferry's engine, beside llama.cpp
//! (through llama-cpp-python) on the same GGUF file in the same run, plus the machine's memory
//! read bandwidth, which bounds decode speed for a model that is read once per token.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use ferry_core::{Error, ModelFormat, ModelManifest, Result, SamplingParams};
use ferry_engine::batch::{BatchConfig, Batcher};
use ferry_engine::{GenerateOptions, LoadedModel};

/// A fixed English text; prompts of N tokens are cut from its repetition.
const PROMPT_TEXT: &str = "The harbour ferry leaves at dawn, carrying commuters, bicycles and the \
morning newspapers across the grey water. On calm days the crossing takes twelve minutes; when \
the wind rises from the west, the captain steers a longer course to keep the deck dry. ";

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub repeats: usize,
    /// Threads for the peer (candle uses every core it sees).
    pub threads: usize,
    /// Concurrent streams for the batching figures (each count on its own, the counts in turn
    /// round after round).
    pub streams: Vec<usize>,
}

/// One engine's numbers (medians over the repeats).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineResult {
    pub engine: String,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub load_s: f64,
    /// Where it ran (`cpu`, `cuda:0`; ferry only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Weight bytes resident for decoding (ferry only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident_weight_bytes: Option<u64>,
    /// Several streams through the batcher at once (ferry only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batched: Vec<BatchedResult>,
}

/// `streams` generations submitted at once to a [`Batcher`] (medians over the repeats).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchedResult {
    pub streams: usize,
    /// Generated tokens of every stream over the wall time from the first submission to the
    /// last completion (the prompts' prefill included).
    pub aggregate_tok_s: f64,
    /// What one stream sees: its generated tokens over its own decode time.
    pub per_stream_decode_tok_s: f64,
    /// Sequences per forward pass, on average.
    pub mean_batch: f64,
    /// Median over the rounds of this count's aggregate over the one-stream aggregate of the
    /// same round (when 1 is among the counts): the counts run in turn, round after round, so
    /// each ratio compares runs seconds apart rather than minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_one_stream: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Measures ferry's engine on `manifest`.
pub fn run_ferry(
    manifest: &ModelManifest,
    model_dir: &Path,
    opts: &BenchOptions,
) -> Result<EngineResult> {
    let t0 = Instant::now();
    let dev = ferry_engine::default_device();
    let model = LoadedModel::load(manifest, model_dir, &dev)?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut ids = Vec::new();
    while ids.len() < opts.prompt_tokens {
        ids.extend(model.encode_text(PROMPT_TEXT)?);
    }
    ids.truncate(opts.prompt_tokens);
    let params = SamplingParams::greedy(opts.gen_tokens as u32);
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    // One warm-up run: first-touch page faults of the mmapped weights are not engine speed.
    for i in 0..=opts.repeats {
        let mut sink = |_: &str| std::ops::ControlFlow::Continue(());
        let out = model.generate(
            &ids,
            &params,
            GenerateOptions { ignore_eos: true },
            &mut sink,
        )?;
        if i == 0 {
            continue;
        }
        prefill.push(out.prompt_tokens as f64 / (out.prefill_ms / 1e3));
        // The first token comes from the prefill logits; the rest each cost one forward pass.
        decode.push((out.completion_tokens.saturating_sub(1)) as f64 / (out.decode_ms / 1e3));
    }
    let model = std::sync::Arc::new(model);
    let mut runs = opts
        .streams
        .iter()
        .map(|&streams| BatchedRuns::start(&model, streams))
        .collect::<Result<Vec<_>>>()?;
    // Round after round, every count in turn (one warm-up round): this VM's speed drifts by
    // ±15 % over minutes, which a count measured all at once would take for batching's effect.
    for round in 0..=opts.repeats {
        for run in &mut runs {
            run.round(&ids, &params, round == 0)?;
        }
    }
    let one = runs
        .iter()
        .find(|r| r.streams == 1)
        .map(|r| r.aggregate.clone());
    let batched = runs.into_iter().map(|r| r.finish(one.as_deref())).collect();
    Ok(EngineResult {
        engine: format!("ferry ({})", ferry_engine::kernels::kernel_isa()),
        prefill_tok_s: median(prefill),
        decode_tok_s: median(decode),
        load_s,
        device: Some(ferry_engine::device_label(&dev)),
        resident_weight_bytes: Some(model.info().resident_weight_bytes),
        batched,
    })
}

/// One count of streams' batcher and the figures of its rounds so far.
struct BatchedRuns {
    streams: usize,
    batcher: Batcher,
    aggregate: Vec<f64>,
    per_stream: Vec<f64>,
    mean_batch: Vec<f64>,
}

impl BatchedRuns {
    /// A batcher of `streams` sequences for `model`.
    fn start(model: &std::sync::Arc<LoadedModel>, streams: usize) -> Result<Self> {
        let batcher = Batcher::start(
            model.clone(),
            BatchConfig {
                max_batch: streams.max(1),
                ..BatchConfig::default()
            },
        )?;
        Ok(BatchedRuns {
            streams,
            batcher,
            aggregate: Vec::new(),
            per_stream: Vec::new(),
            mean_batch: Vec::new(),
        })
    }

    /// `streams` copies of the prompt submitted at once; a `warm_up` round is not recorded.
    fn round(&mut self, ids: &[u32], params: &SamplingParams, warm_up: bool) -> Result<()> {
        use std::sync::atomic::Ordering;
        let batcher = &self.batcher;
        let (steps0, rows0) = (
            batcher.stats().steps.load(Ordering::Relaxed),
            batcher.stats().sequence_steps.load(Ordering::Relaxed),
        );
        let t0 = Instant::now();
        let outcomes: Vec<Result<ferry_engine::GenerationOutcome>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..self.streams.max(1))
                .map(|_| {
                    scope.spawn(|| {
                        let mut sink = |_: &str| std::ops::ControlFlow::Continue(());
                        batcher.generate(
                            ids,
                            params,
                            GenerateOptions { ignore_eos: true },
                            &mut sink,
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Engine("a stream panicked".into())))
                })
                .collect()
        });
        let wall_s = t0.elapsed().as_secs_f64();
        let outcomes = outcomes.into_iter().collect::<Result<Vec<_>>>()?;
        if warm_up {
            return Ok(());
        }
        let generated: usize = outcomes.iter().map(|o| o.completion_tokens).sum();
        self.aggregate.push(generated as f64 / wall_s);
        self.per_stream.push(median(
            outcomes
                .iter()
                .map(|o| o.completion_tokens.saturating_sub(1) as f64 / (o.decode_ms / 1e3))
                .collect(),
        ));
        let steps = batcher.stats().steps.load(Ordering::Relaxed) - steps0;
        let rows = batcher.stats().sequence_steps.load(Ordering::Relaxed) - rows0;
        self.mean_batch.push(rows as f64 / steps.max(1) as f64);
        Ok(())
    }

    /// The medians; `one` is the one-stream aggregate of each round, when measured.
    fn finish(self, one: Option<&[f64]>) -> BatchedResult {
        let vs_one_stream = one.map(|one| {
            median(
                self.aggregate
                    .iter()
                    .zip(one)
                    .map(|(ours, one)| ours / one)
                    .collect(),
            )
        });
        BatchedResult {
            streams: self.streams,
            aggregate_tok_s: median(self.aggregate),
            per_stream_decode_tok_s: median(self.per_stream),
            mean_batch: median(self.mean_batch),
            vs_one_stream,
        }
    }
}

#[derive(Deserialize)]
struct PeerJson {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    load_s: f64,
    version: Option<String>,
}

/// Measures llama.cpp on a GGUF file with `python` running `script`.
pub fn run_llama_cpp(
    python: &Path,
    script: &Path,
    gguf: &Path,
    opts: &BenchOptions,
) -> Result<EngineResult> {
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .arg("--model")
        .arg(gguf)
        .args(["--prompt-tokens", &opts.prompt_tokens.to_string()])
        .args(["--gen-tokens", &opts.gen_tokens.to_string()])
        .args(["--threads", &opts.threads.to_string()])
        .args(["--repeats", &opts.repeats.to_string()])
        .arg("--json");
    let parsed: PeerJson = run_peer(cmd, "llama.cpp peer", "scripts/setup-bench-peer")?;
    Ok(EngineResult {
        engine: format!("llama.cpp {}", parsed.version.unwrap_or_default())
            .trim()
            .to_string(),
        prefill_tok_s: parsed.prefill_tok_s,
        decode_tok_s: parsed.decode_tok_s,
        load_s: parsed.load_s,
        device: None,
        resident_weight_bytes: None,
        batched: Vec::new(),
    })
}

/// Runs a peer script and parses the last line of its stdout that is a JSON object; any way it
/// fails (not installed, non-zero exit, no result) is `Unavailable`, naming `what` and the
/// script that installs it.
pub fn run_peer<T: serde::de::DeserializeOwned>(
    mut cmd: Command,
    what: &str,
    installer: &str,
) -> Result<T> {
    let out = cmd.output().map_err(|e| {
        Error::Unavailable(format!(
            "running {what} ({}; {installer} installs it): {e}",
            cmd.get_program().to_string_lossy()
        ))
    })?;
    if !out.status.success() {
        return Err(Error::Unavailable(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line)
        .map_err(|e| Error::Unavailable(format!("{what} printed no result JSON ({e}): {stdout}")))
}

/// The GGUF file of a manifest, if it is a GGUF model that is installed locally.
pub fn gguf_path(manifest: &ModelManifest, model_dir: &Path) -> Option<PathBuf> {
    if manifest.format != ModelFormat::Gguf {
        return None;
    }
    let p = manifest
        .local_dir(model_dir)
        .join(manifest.weights.as_ref()?);
    p.is_file().then_some(p)
}

/// Single-thread sequential read bandwidth in GB/s over a buffer much larger than the caches.
pub fn memory_read_bandwidth_gb_s() -> f64 {
    let words = 64 * 1024 * 1024; // 512 MiB of u64
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = buf.iter().fold(0u64, |a, &x| a.wrapping_add(x));
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((words * 8) as f64 / secs / 1e9);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 4.0);
        assert!(median(vec![]).is_nan());
    }
}

/// CPU time of this whole process (every thread), in nanoseconds, from `/proc/self/task/*/schedstat`.
pub fn process_cpu_ns() -> Result<u64> {
    let tasks = std::fs::read_dir("/proc/self/task")
        .map_err(|e| Error::io("reading /proc/self/task", e))?;
    let mut total = 0u64;
    for t in tasks.flatten() {
        // Threads may exit between listing and reading; those are simply gone.
        if let Ok(text) = std::fs::read_to_string(t.path().join("schedstat")) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// CPU cost of the energy sampler at one rate.
#[derive(Debug, Clone, Serialize)]
pub struct SamplerOverhead {
    pub sample_hz: f64,
    pub seconds: f64,
    pub source: String,
    /// Sampler CPU time as a percentage of one core.
    pub cpu_percent_of_core: f64,
    /// The same process doing nothing, for reference.
    pub baseline_percent_of_core: f64,
    /// CPU time per sample in microseconds.
    pub us_per_sample: f64,
}

/// Runs the meter at `sample_hz` for `seconds` with nothing else to do and measures its CPU time.
pub fn sampler_overhead(
    cfg: &ferry_energy::EnergyConfig,
    sample_hz: f64,
    seconds: f64,
) -> Result<SamplerOverhead> {
    let window = std::time::Duration::from_secs_f64(seconds);
    let b0 = process_cpu_ns()?;
    std::thread::sleep(window);
    let baseline = (process_cpu_ns()? - b0) as f64;
    let sources = ferry_energy::open_sources(cfg).map_err(|e| Error::Unavailable(e.to_string()))?;
    let meter = ferry_energy::meter::EnergyMeter::start(sources, sample_hz)
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    let source = meter.source_label().to_string();
    let c0 = process_cpu_ns()?;
    std::thread::sleep(window);
    let used = (process_cpu_ns()? - c0) as f64;
    drop(meter);
    let wall_ns = seconds * 1e9;
    Ok(SamplerOverhead {
        sample_hz,
        seconds,
        source,
        cpu_percent_of_core: used / wall_ns * 100.0,
        baseline_percent_of_core: baseline / wall_ns * 100.0,
        us_per_sample: used / 1e3 / (sample_hz * seconds),
    })
}

/// The `q` quantile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `ferry bench router` figures.
#[derive(Debug, Clone, Serialize)]
pub struct RouterBench {
    /// MESS+ decide + observe with known satisfaction estimates: coin, argmin, queue update.
    pub decision_p50_us: f64,
    pub decision_p99_us: f64,
    /// The satisfaction head's forward pass (384 -> 384 -> 3).
    pub head_p50_us: f64,
    pub head_p99_us: f64,
    /// Encoder latency for one uncached question (each carries a word the others lack).
    pub encoder_p50_ms: f64,
    pub encoder_p99_ms: f64,
    pub encoder_tokens: usize,
    /// Encoder latency over the input's first questions, one at a time in order, as a live
    /// router sees them (a static-pooling encoder pays for each token the first time only):
    /// the first [`STREAM_WINDOW`], and the last [`STREAM_WINDOW`] of `stream_questions`.
    pub stream_questions: usize,
    pub stream_p50_ms: f64,
    pub stream_p99_ms: f64,
    pub stream_late_p50_ms: f64,
    pub stream_late_p99_ms: f64,
    /// Median question length of that stream, in encoder tokens.
    pub stream_tokens_p50: usize,
    /// Requests in the full replay.
    pub replay_requests: usize,
    /// Encoding every question of the replay (0 when they came from the cache).
    pub replay_encode_s: f64,
    /// MESS+ over every request, one seed, embeddings in hand.
    pub replay_policy_s: f64,
    /// The reference encoder on the same questions in the same run (`None` when it could not
    /// run: see `peer_error`; the bench has then failed).
    pub peer: Option<EncoderPeer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_error: Option<String>,
}

/// Where the encoder peer lives: a Python with transformers and PyTorch, and its script.
#[derive(Debug, Clone)]
pub struct EncoderPeerSetup {
    pub python: PathBuf,
    pub script: PathBuf,
    /// The encoder's model directory (config.json, tokenizer.json, model.safetensors).
    pub model_dir: PathBuf,
    pub threads: usize,
}

/// The reference stack (Hugging Face transformers on PyTorch, mean pooling, as
/// sentence-transformers runs all-MiniLM-L6-v2) on the same questions, one at a time.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderPeer {
    pub engine: String,
    pub threads: usize,
    /// The "one question" set and the stream's first window.
    pub one_p50_ms: f64,
    pub one_p99_ms: f64,
    pub stream_p50_ms: f64,
    pub stream_p99_ms: f64,
    /// Lowest cosine between ferry's vector and the peer's for the first questions: about 1
    /// for the contextual encoder (same model, same pooling), lower for static pooling.
    pub min_cosine: f64,
}

#[derive(Deserialize)]
struct EncoderPeerJson {
    engine: String,
    threads: usize,
    sets: std::collections::BTreeMap<String, PeerSet>,
    embeddings: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct PeerSet {
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs the encoder peer on the two question sets; `ours` are ferry's vectors of the first
/// questions of `one`, for the agreement check.
fn run_encoder_peer(
    setup: &EncoderPeerSetup,
    one: &[String],
    stream: &[&str],
    ours: &[Vec<f32>],
) -> Result<EncoderPeer> {
    let dir = tempfile::tempdir().map_err(|e| Error::Engine(e.to_string()))?;
    let texts = dir.path().join("texts.json");
    let body = serde_json::json!({ "one": one, "stream": stream });
    std::fs::write(&texts, body.to_string()).map_err(|e| Error::Engine(e.to_string()))?;
    let mut cmd = Command::new(&setup.python);
    cmd.arg(&setup.script)
        .arg("--model-dir")
        .arg(&setup.model_dir)
        .arg("--texts")
        .arg(&texts)
        .args(["--threads", &setup.threads.to_string()])
        .args(["--keep", &ours.len().to_string()]);
    let parsed: EncoderPeerJson = run_peer(cmd, "encoder peer", "scripts/setup-encoder-peer")?;
    let set = |name: &str| {
        parsed
            .sets
            .get(name)
            .map(|s| (s.p50_ms, s.p99_ms))
            .ok_or_else(|| Error::Unavailable(format!("encoder peer reported no `{name}` set")))
    };
    let (one_p50_ms, one_p99_ms) = set("one")?;
    let (stream_p50_ms, stream_p99_ms) = set("stream")?;
    if parsed.embeddings.len() != ours.len() {
        return Err(Error::Unavailable(format!(
            "encoder peer returned {} vectors for {} questions",
            parsed.embeddings.len(),
            ours.len()
        )));
    }
    let min_cosine = ours
        .iter()
        .zip(&parsed.embeddings)
        .map(|(a, b)| cosine(a, b))
        .fold(f64::INFINITY, f64::min);
    Ok(EncoderPeer {
        engine: parsed.engine,
        threads: parsed.threads,
        one_p50_ms,
        one_p99_ms,
        stream_p50_ms,
        stream_p99_ms,
        min_cosine,
    })
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Questions of the input the encoder stream figures embed one at a time.
const STREAM_QUESTIONS: usize = 3000;
/// Questions in each of the stream's two latency windows.
pub const STREAM_WINDOW: usize = 300;

/// Measures the router's hot path, the encoder, and a full replay of `input`.
pub fn router_bench(
    encoder: &ferry_engine::encoder::SentenceEncoder,
    encoder_id: &str,
    input: &Path,
    cache_dir: &Path,
    peer: &EncoderPeerSetup,
) -> Result<RouterBench> {
    use ferry_router::mess::{MessPlus, MessPlusConfig};
    use ferry_router::predictor::{Fixed, MlpPredictor, Predictor, SgdConfig};
    use ferry_router::{Decision, Observation, ZooPolicy};

    let cfg = MessPlusConfig {
        alpha: 0.7,
        v: 1e-4,
        c: 0.1,
        seed: 42,
        train_on_feedback: false,
    };
    let mut policy = MessPlus::new(cfg, 3, Fixed(vec![0.4, 0.7, 0.9]))
        .map_err(|e| Error::Engine(e.to_string()))?;
    let x = vec![0.01f32; encoder.dim()];
    let obs = Observation {
        costs: vec![Some(80.0), None, None],
        satisfied: vec![Some(true), None, None],
        feedback: true,
    };
    let mut decision = Vec::with_capacity(100_000);
    for i in 0..100_000u32 {
        let t = Instant::now();
        let d = policy.decide(&x);
        let o = if d == Decision::Explore {
            Observation {
                costs: vec![Some(80.0), Some(400.0), Some(2000.0)],
                satisfied: vec![Some(false), Some(true), Some(i % 2 == 0)],
                feedback: true,
            }
        } else {
            obs.clone()
        };
        policy.observe(&x, d, &o);
        decision.push(t.elapsed().as_secs_f64() * 1e6);
    }
    decision.sort_by(|a, b| a.total_cmp(b));

    let mut head = MlpPredictor::new(encoder.dim(), encoder.dim(), 3, SgdConfig::default(), 1)
        .map_err(|e| Error::Engine(e.to_string()))?;
    let mut head_us = Vec::with_capacity(5000);
    for _ in 0..5000 {
        let t = Instant::now();
        std::hint::black_box(head.predict(&x));
        head_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    head_us.sort_by(|a, b| a.total_cmp(b));

    // A question of 64 tokens (the yardstick), made unique per run so that the cache
    // never answers.
    let base = "Which of the following best explains why the morning ferry crossing takes longer when the \
                wind rises from the west, given that the captain must keep the passenger deck dry, the \
                harbour entrance narrows at low tide, and the timetable allows only twelve minutes \
                between the first bell and the raising of the ramp";
    let mut enc_ms = Vec::new();
    let mut tokens = 0;
    let one: Vec<String> = (0..60).map(|i| format!("{base} (case {i})?")).collect();
    for q in &one {
        tokens = encoder.embed_token_count(q)?;
        let t = Instant::now();
        encoder.embed(&[q.as_str()])?;
        enc_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    enc_ms.sort_by(|a, b| a.total_cmp(b));

    let data = crate::replay::Dataset::load(input, None, "energy_consumption")?;
    let texts: Vec<&str> = data.records.iter().map(|r| r.text.as_str()).collect();
    // Before the replay, so the cache (in memory) holds none of these questions yet.
    let mut seen = std::collections::HashSet::new();
    let stream: Vec<&str> = texts
        .iter()
        .copied()
        .filter(|t| seen.insert(*t))
        .take(STREAM_QUESTIONS)
        .collect();
    let mut stream_ms = Vec::with_capacity(stream.len());
    let mut stream_tokens = Vec::with_capacity(stream.len());
    for q in &stream {
        stream_tokens.push(encoder.embed_token_count(q)?);
        let t = Instant::now();
        encoder.embed(&[q])?;
        stream_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let window = |w: &[f64]| {
        let mut w = w.to_vec();
        w.sort_by(|a, b| a.total_cmp(b));
        (percentile(&w, 0.5), percentile(&w, 0.99))
    };
    let first = window(&stream_ms[..stream_ms.len().min(STREAM_WINDOW)]);
    let late = window(&stream_ms[stream_ms.len().saturating_sub(STREAM_WINDOW)..]);
    stream_tokens.sort_unstable();
    let ((features, _), encode_s) =
        crate::replay::cached_embeddings(&texts, encoder_id, cache_dir, |texts| {
            Ok((encoder.embed(texts)?, encoder.dim()))
        })?;
    let replay_encode_s = encode_s.unwrap_or(0.0);
    let opts = crate::replay::ReplayOptions {
        alpha: 0.7,
        v: data.default_v(),
        c: 0.1,
        seeds: vec![42],
        policy: crate::replay::PolicyKind::MessPlus,
        prior: None,
    };
    let t = Instant::now();
    crate::replay::run_policy(&data, &features, encoder.dim(), &opts.policy, &opts)?;
    let replay_policy_s = t.elapsed().as_secs_f64();
    let firsts: Vec<&str> = one.iter().take(8).map(String::as_str).collect();
    let ours: Vec<Vec<f32>> = encoder
        .embed(&firsts)?
        .iter()
        .map(|v| v.as_ref().clone())
        .collect();
    let window_texts = &stream[..stream.len().min(STREAM_WINDOW)];
    let (peer, peer_error) = match run_encoder_peer(peer, &one, window_texts, &ours) {
        Ok(p) => (Some(p), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(RouterBench {
        decision_p50_us: percentile(&decision, 0.5),
        decision_p99_us: percentile(&decision, 0.99),
        head_p50_us: percentile(&head_us, 0.5),
        head_p99_us: percentile(&head_us, 0.99),
        encoder_p50_ms: percentile(&enc_ms, 0.5),
        encoder_p99_ms: percentile(&enc_ms, 0.99),
        encoder_tokens: tokens,
        stream_questions: stream.len(),
        stream_p50_ms: first.0,
        stream_p99_ms: first.1,
        stream_late_p50_ms: late.0,
        stream_late_p99_ms: late.1,
        stream_tokens_p50: stream_tokens
            .get(stream_tokens.len() / 2)
            .copied()
            .unwrap_or(0),
        replay_requests: data.records.len(),
        replay_encode_s,
        replay_policy_s,
        peer,
        peer_error,
    })
}

/// `ferry bench requests` settings.
#[derive(Debug, Clone)]
pub struct RequestsOptions {
    pub prompt_tokens: usize,
    /// Generated tokens of each request, cycled.
    pub gen_tokens: Vec<usize>,
    /// Requests per mode.
    pub requests: usize,
    pub sample_hz: f64,
}

/// One request: what the meter booked and what NVML's counter says over the same request.
#[derive(Debug, Clone, Serialize)]
pub struct RequestEnergyRow {
    /// `exact`: the counter read at the request's start and end (ferryd's way); `ticks`: power
    /// readings only, scaled by the calibration.
    pub mode: String,
    pub gen_tokens: usize,
    pub seconds: f64,
    pub meter_joules: f64,
    pub counter_joules: f64,
    pub error_percent: f64,
}

/// Per-mode summary.
#[derive(Debug, Clone, Serialize)]
pub struct RequestEnergyMode {
    pub mode: String,
    pub requests: usize,
    pub max_abs_error_percent: f64,
    pub median_abs_error_percent: f64,
    pub meter_joules: f64,
    pub counter_joules: f64,
    pub total_error_percent: f64,
}

/// `ferry bench requests` figures.
#[derive(Debug, Clone, Serialize)]
pub struct RequestsBench {
    pub model: String,
    pub device: String,
    pub source: String,
    pub gpus: Vec<String>,
    /// Median wall time of one read of NVML's total-energy counter, ms.
    pub counter_read_ms: f64,
    /// Median wall time of one power reading, µs.
    pub power_read_us: f64,
    pub sample_hz: f64,
    pub modes: Vec<RequestEnergyMode>,
    pub rows: Vec<RequestEnergyRow>,
    /// Sampler thread CPU time over the whole run, as % of one core.
    pub sampler_cpu_percent_of_core: Option<f64>,
    pub sampler_seconds: f64,
    pub ticks: u64,
    pub exact_reads: u64,
    /// Mean wall time of an exact read (what each request start and end costs), ms.
    pub exact_read_ms: f64,
    /// Mean wall time of a tick, µs.
    pub tick_us: f64,
    /// Exact joules per joule of the power integral, as calibrated at the end.
    pub calibration: Option<f64>,
}

/// Runs `opts.requests` generations with the meter reading exactly at each start and end, then
/// the same requests with power readings only, and holds each request's joules against NVML's
/// own total-energy counter read around the same request. Needs an NVIDIA GPU.
pub fn energy_requests(
    manifest: &ModelManifest,
    model_dir: &Path,
    opts: &RequestsOptions,
) -> Result<RequestsBench> {
    use ferry_energy::meter::EnergyMeter;
    use ferry_energy::nvml::{NvmlCounter, NvmlSource};
    let unavailable = |e: ferry_energy::EnergyError| Error::Unavailable(e.to_string());
    if opts.gen_tokens.is_empty() {
        return Err(Error::Unavailable("no --gen-tokens value".into()));
    }
    let counter = NvmlCounter::open().map_err(unavailable)?;
    let time_calls = |f: &dyn Fn() -> std::result::Result<f64, ferry_energy::EnergyError>,
                      n: usize|
     -> Result<f64> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            f().map_err(unavailable)?;
            v.push(t.elapsed().as_secs_f64());
        }
        Ok(median(v))
    };
    let counter_read_ms = time_calls(&|| counter.joules(), 20)? * 1e3;
    let power_read_us = time_calls(&|| counter.watts(), 200)? * 1e6;

    let dev = ferry_engine::default_device();
    let device = ferry_engine::device_label(&dev);
    let model = LoadedModel::load(manifest, model_dir, &dev)?;
    let mut ids = Vec::new();
    while ids.len() < opts.prompt_tokens {
        ids.extend(model.encode_text(PROMPT_TEXT)?);
    }
    ids.truncate(opts.prompt_tokens);
    let generate = |n: usize| -> Result<()> {
        let mut sink = |_: &str| std::ops::ControlFlow::Continue(());
        model.generate(
            &ids,
            &SamplingParams::greedy(n as u32),
            GenerateOptions { ignore_eos: true },
            &mut sink,
        )?;
        Ok(())
    };
    // Warm-up: kernels compiled and weights resident before anything is measured.
    generate(8)?;

    let source = NvmlSource::open().map_err(unavailable)?;
    let gpus = ferry_energy::PowerSource::devices(&source);
    let meter = EnergyMeter::start(vec![Box::new(source)], opts.sample_hz).map_err(unavailable)?;
    let cpu0 = meter.sampler_cpu_s();
    let t_run = Instant::now();
    let mut rows = Vec::new();
    let mut modes = Vec::new();
    for (mode, exact) in [("exact", true), ("ticks", false)] {
        meter.set_exact_at_requests(exact);
        let mut mode_rows = Vec::new();
        for i in 0..opts.requests {
            let n = opts.gen_tokens[i % opts.gen_tokens.len()];
            // Reference and meter each read once before and once after the generation, in the
            // same order, so both windows hold the generation plus one counter read.
            let c0 = counter.joules().map_err(unavailable)?;
            let t = Instant::now();
            let account = meter.begin();
            generate(n)?;
            let c1 = counter.joules().map_err(unavailable)?;
            let e = meter.end(account);
            let counter_joules = c1 - c0;
            mode_rows.push(RequestEnergyRow {
                mode: mode.into(),
                gen_tokens: n,
                seconds: t.elapsed().as_secs_f64(),
                meter_joules: e.joules,
                counter_joules,
                error_percent: (e.joules - counter_joules) / counter_joules * 100.0,
            });
        }
        let meter_joules: f64 = mode_rows.iter().map(|r| r.meter_joules).sum();
        let counter_joules: f64 = mode_rows.iter().map(|r| r.counter_joules).sum();
        let abs: Vec<f64> = mode_rows.iter().map(|r| r.error_percent.abs()).collect();
        modes.push(RequestEnergyMode {
            mode: mode.into(),
            requests: mode_rows.len(),
            max_abs_error_percent: abs.iter().copied().fold(0.0, f64::max),
            median_abs_error_percent: median(abs),
            meter_joules,
            counter_joules,
            total_error_percent: (meter_joules - counter_joules) / counter_joules * 100.0,
        });
        rows.extend(mode_rows);
    }
    let sampler_seconds = t_run.elapsed().as_secs_f64();
    let sampler_cpu_percent_of_core = match (cpu0, meter.sampler_cpu_s()) {
        (Some(a), Some(b)) => Some((b - a) / sampler_seconds * 100.0),
        _ => None,
    };
    let stats = meter.stats();
    Ok(RequestsBench {
        model: manifest.id.clone(),
        device,
        source: meter.source_label().to_string(),
        gpus,
        counter_read_ms,
        power_read_us,
        sample_hz: opts.sample_hz,
        modes,
        rows,
        sampler_cpu_percent_of_core,
        sampler_seconds,
        ticks: stats.ticks,
        exact_reads: stats.exact_reads,
        exact_read_ms: stats.exact_read_s / stats.exact_reads.max(1) as f64 * 1e3,
        tick_us: stats.tick_s / stats.ticks.max(1) as f64 * 1e6,
        calibration: meter.calibration().first().map(|(_, k)| *k),
    })
}

/// The text report of `ferry bench requests`.
pub fn format_requests(r: &RequestsBench) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {} on {} · source {} ({}) · meter at {} Hz",
        r.model,
        r.device,
        r.source,
        r.gpus.join(", "),
        r.sample_hz
    );
    let _ = writeln!(
        s,
        "NVML reads: total-energy counter {:.3} ms, power {:.1} us (median wall time)",
        r.counter_read_ms, r.power_read_us
    );
    let _ = writeln!(
        s,
        "{:<6} {:>6} {:>8} {:>12} {:>12} {:>9}",
        "mode", "tokens", "seconds", "meter J", "counter J", "error %"
    );
    for row in &r.rows {
        let _ = writeln!(
            s,
            "{:<6} {:>6} {:>8.3} {:>12.3} {:>12.3} {:>+9.3}",
            row.mode,
            row.gen_tokens,
            row.seconds,
            row.meter_joules,
            row.counter_joules,
            row.error_percent
        );
    }
    for m in &r.modes {
        let _ = writeln!(
            s,
            "{}: {} requests, |error| max {:.3} % median {:.3} %, total {:.3} J vs {:.3} J ({:+.3} %)",
            m.mode,
            m.requests,
            m.max_abs_error_percent,
            m.median_abs_error_percent,
            m.meter_joules,
            m.counter_joules,
            m.total_error_percent
        );
    }
    let _ = writeln!(
        s,
        "sampler: {} over {:.1} s; {} ticks ({:.1} us each), {} exact reads ({:.3} ms each); calibration {}",
        r.sampler_cpu_percent_of_core
            .map(|p| format!("{p:.4} % of one core"))
            .unwrap_or_else(|| "CPU time unreadable".into()),
        r.sampler_seconds,
        r.ticks,
        r.tick_us,
        r.exact_reads,
        r.exact_read_ms,
        r.calibration
            .map(|k| format!("{k:.4}"))
            .unwrap_or_else(|| "-".into())
    );
    s
}

#[cfg(test)]
mod requests_tests {
    use super::*;

    #[test]
    fn report_names_every_figure() {
        let r = RequestsBench {
            model: "smollm2-135m-instruct".into(),
            device: "cuda:0".into(),
            source: "nvml".into(),
            gpus: vec!["gpu0 (NVIDIA H200)".into()],
            counter_read_ms: 4.07,
            power_read_us: 1.2,
            sample_hz: 10.0,
            modes: vec![RequestEnergyMode {
                mode: "exact".into(),
                requests: 1,
                max_abs_error_percent: 0.5,
                median_abs_error_percent: 0.5,
                meter_joules: 100.5,
                counter_joules: 100.0,
                total_error_percent: 0.5,
            }],
            rows: vec![RequestEnergyRow {
                mode: "exact".into(),
                gen_tokens: 32,
                seconds: 0.5,
                meter_joules: 100.5,
                counter_joules: 100.0,
                error_percent: 0.5,
            }],
            sampler_cpu_percent_of_core: Some(0.0123),
            sampler_seconds: 12.0,
            ticks: 120,
            exact_reads: 16,
            exact_read_ms: 4.1,
            tick_us: 3.0,
            calibration: Some(1.0123),
        };
        let text = format_requests(&r);
        for needle in [
            "cuda:0",
            "4.070 ms",
            "+0.500",
            "exact: 1 requests",
            "0.0123 % of one core",
            "calibration 1.0123",
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["modes"][0]["max_abs_error_percent"], 0.5);
        assert_eq!(json["rows"][0]["counter_joules"], 100.0);
    }
}
