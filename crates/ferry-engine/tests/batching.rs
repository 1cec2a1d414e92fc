//! Continuous batching on the real bundled model (SmolLM2-135M-Instruct Q4_1): generations run
//! together give what each gives alone, sequences join and leave between steps, a long prompt
//! is read in chunks, and a consumer that leaves stops only its own sequence. Needs
//! `ferry models fetch` (the test scripts run it first).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_core::{ChatMessage, Error, ModelManifest, Role, SamplingParams};
use ferry_engine::batch::{BatchConfig, Batcher};
use ferry_engine::{GenerateOptions, GenerationOutcome, LoadedModel};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load() -> Arc<LoadedModel> {
    let dir = std::env::var_os("FERRY_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/cache"));
    let manifest = ModelManifest::load(&root().join("models/smollm2-135m-instruct.toml")).unwrap();
    Arc::new(
        LoadedModel::load(&manifest, &dir, &ferry_engine::Device::Cpu).unwrap_or_else(|e| {
            panic!(
                "{e}\n(the bundled model is installed by `cargo run -p ferry-cli -- models fetch`)"
            )
        }),
    )
}

const QUESTIONS: &[&str] = &[
    "What is the capital of France?",
    "Name three colours.",
    "What is 12 plus 7?",
    "Write one sentence about the sea.",
    "Is the sun a star? Answer yes or no.",
];

fn prompt(model: &LoadedModel, question: &str) -> Vec<u32> {
    model
        .encode_chat(&[
            ChatMessage::text(Role::System, "You are a helpful assistant."),
            ChatMessage::text(Role::User, question),
        ])
        .unwrap()
}

/// `(text, deltas joined, outcome)` of one generation through `generate`.
fn collect(
    generate: impl FnOnce(
        &mut dyn ferry_engine::GenerationEvent,
    ) -> ferry_core::Result<GenerationOutcome>,
) -> (String, GenerationOutcome) {
    let mut deltas = String::new();
    let mut sink = |d: &str| {
        deltas.push_str(d);
        ControlFlow::Continue(())
    };
    let out = generate(&mut sink).unwrap();
    assert_eq!(deltas, out.text, "the deltas are the completion's text");
    (deltas, out)
}

fn load_id(id: &str) -> Arc<LoadedModel> {
    let dir = std::env::var_os("FERRY_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/cache"));
    let manifest = ModelManifest::load(&root().join(format!("models/{id}.toml"))).unwrap();
    Arc::new(LoadedModel::load(&manifest, &dir, &ferry_engine::Device::Cpu).unwrap())
}

fn to_vec(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_vec1().unwrap()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

/// Whether this CPU runs the interleaved VNNI kernels (512- or 256-bit), which compute every row
/// by the same instructions whatever shares its step (as do the attention and the other per-row
/// parts of the CPU pass): batched logits are then the lone ones, bit for bit. Plain AVX2 keeps
/// Q8_0 weights (SmolLM2's head) in rows, where one row and many take different products.
fn batch_invariant() -> bool {
    matches!(
        ferry_engine::kernels::kernel_isa(),
        "avx512-vnni" | "avx-vnni"
    )
}

/// `Session::forward_many` against `Session::forward` on each sequence alone, on both bundled
/// models' CPU passes: three sequences, one of them reading its prompt in chunks while the
/// others decode, then all three decoding, every one fed the token its lone run chose. With
/// the interleaved kernel the logits are the same bits. Elsewhere a batch row goes through the
/// many-row product where a lone decode takes the one-row one, so the logits differ by rounding
/// only: within a small fraction of their spread, and the chosen token is the lone run's unless
/// that was a near-tie.
#[test]
fn a_batched_forward_pass_gives_each_sequence_its_own_logits() {
    for id in ["smollm2-135m-instruct", "gemma3-270m-it"] {
        let model = load_id(id);
        let prompts: Vec<Vec<u32>> = QUESTIONS[..3].iter().map(|q| prompt(&model, q)).collect();
        const STEPS: usize = 6;
        // Alone: prefill, then STEPS greedy tokens; the logits of every step.
        let alone: Vec<(Vec<Vec<f32>>, Vec<u32>)> = prompts
            .iter()
            .map(|p| {
                let mut s = model.session().unwrap();
                let mut logits = vec![to_vec(&s.forward(p).unwrap())];
                let mut tokens = Vec::new();
                for _ in 0..STEPS {
                    let t = argmax(logits.last().unwrap()) as u32;
                    tokens.push(t);
                    logits.push(to_vec(&s.forward(&[t]).unwrap()));
                }
                (logits, tokens)
            })
            .collect();
        // Together: sequences 0 and 1 prefill in one step; then 2 reads its prompt in two
        // chunks while 0 and 1 decode; then all decode.
        let mut sessions: Vec<_> = (0..3).map(|_| model.session().unwrap()).collect();
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
        let (s01, s2) = sessions.split_at_mut(2);
        let (a, b) = s01.split_at_mut(1);
        let first = ferry_engine::model::Session::forward_many(&mut [
            (&mut a[0], prompts[0].as_slice()),
            (&mut b[0], prompts[1].as_slice()),
        ])
        .unwrap();
        got[0].push(to_vec(&first[0]));
        got[1].push(to_vec(&first[1]));
        let half = prompts[2].len() / 2;
        let mut fed = [0usize; 3];
        for step in 0..STEPS + 2 {
            let mut batch: Vec<(&mut ferry_engine::model::Session, Vec<u32>, usize)> = Vec::new();
            for (i, s) in a.iter_mut().chain(b.iter_mut()).enumerate() {
                if fed[i] < STEPS {
                    batch.push((s, vec![alone[i].1[fed[i]]], i));
                }
            }
            let chunk = match step {
                0 => Some(prompts[2][..half].to_vec()),
                1 => Some(prompts[2][half..].to_vec()),
                _ if fed[2] < STEPS => Some(vec![alone[2].1[fed[2]]]),
                _ => None,
            };
            if let Some(c) = chunk {
                batch.push((&mut s2[0], c, 2));
            }
            let mut items: Vec<(&mut ferry_engine::model::Session, &[u32])> = batch
                .iter_mut()
                .map(|(s, t, _)| (&mut **s, t.as_slice()))
                .collect();
            let out = ferry_engine::model::Session::forward_many(&mut items).unwrap();
            for ((_, _, i), logits) in batch.iter().zip(out) {
                if *i == 2 && step == 0 {
                    continue; // the first chunk's logits are not a prediction anyone reads
                }
                got[*i].push(to_vec(&logits));
                if !(*i == 2 && step == 1) {
                    fed[*i] += 1;
                }
            }
        }
        for (i, (lone, batched)) in alone.iter().zip(&got).enumerate() {
            assert_eq!(lone.0.len(), batched.len(), "{id}: sequence {i}");
            for (step, (x, y)) in lone.0.iter().zip(batched).enumerate() {
                let gap = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                let mean = x.iter().sum::<f32>() / x.len() as f32;
                let sd =
                    (x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / x.len() as f32).sqrt();
                eprintln!("{id} seq {i} step {step}: largest logit gap {gap:.4} (sd {sd:.2})");
                if batch_invariant() {
                    assert_eq!(
                        gap, 0.0,
                        "{id} seq {i} step {step}: batch-invariant kernels"
                    );
                }
                assert!(
                    gap < 0.35 * sd,
                    "{id} seq {i} step {step}: gap {gap} against sd {sd}"
                );
                let (cx, cy) = (argmax(x), argmax(y));
                assert!(
                    cx == cy || x[cx] - x[cy] < 2.0 * gap,
                    "{id} seq {i} step {step}: token {cy} instead of {cx}, not a near-tie"
                );
            }
        }
    }
}

/// Each question alone (greedy, `max_tokens` differing so sequences leave the batch at
/// different steps) against all of them submitted at once, from threads, through a batcher
/// whose prompt chunks are shorter than the prompts. With the interleaved kernel the
/// completions are identical; elsewhere a decode row in a batch is rounded in the many-row
/// product, a lone one in the one-row product (see the test above), so a near-tie late in a
/// completion may flip: the completions agree on their start, and each one's deltas are its
/// text, its prompt counted the same.
#[test]
fn batched_generations_match_each_alone() {
    let model = load();
    let alone: Vec<(String, GenerationOutcome)> = QUESTIONS
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let ids = prompt(&model, q);
            let params = SamplingParams::greedy(6 + 5 * i as u32);
            collect(|sink| model.generate(&ids, &params, GenerateOptions::default(), sink))
        })
        .collect();
    let batcher = Arc::new(
        Batcher::start(
            model.clone(),
            BatchConfig {
                max_batch: 4,
                prefill_chunk_tokens: 9,
            },
        )
        .unwrap(),
    );
    let together: Vec<(String, GenerationOutcome)> = std::thread::scope(|scope| {
        let handles: Vec<_> = QUESTIONS
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (model, batcher) = (model.clone(), batcher.clone());
                scope.spawn(move || {
                    let ids = prompt(&model, q);
                    let params = SamplingParams::greedy(6 + 5 * i as u32);
                    collect(|sink| {
                        batcher.generate(&ids, &params, GenerateOptions::default(), sink)
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut same = 0;
    for ((q, a), b) in QUESTIONS.iter().zip(&alone).zip(&together) {
        eprintln!("{q}\n  alone:    {:?}\n  together: {:?}", a.0, b.0);
        let start: String = a.0.chars().take(12).collect();
        assert!(b.0.starts_with(&start), "{q}: {:?} against {:?}", b.0, a.0);
        assert_eq!(a.1.prompt_tokens, b.1.prompt_tokens, "{q}");
        assert!(b.1.completion_tokens <= 6 + 5 * QUESTIONS.len());
        same += usize::from(a.0 == b.0);
    }
    eprintln!("{same} of {} completions identical", QUESTIONS.len());
    if batch_invariant() {
        assert_eq!(same, QUESTIONS.len(), "batch-invariant kernels");
    }
    let stats = batcher.stats();
    let (steps, rows) = (
        stats.steps.load(Ordering::Relaxed),
        stats.sequence_steps.load(Ordering::Relaxed),
    );
    eprintln!("{steps} steps, {rows} sequence-steps");
    assert!(
        rows > steps,
        "sequences shared steps ({rows} sequence-steps in {steps} steps)"
    );
    assert_eq!(stats.failed_steps.load(Ordering::Relaxed), 0);
}

/// A consumer that leaves after two deltas ends its own sequence with `Cancelled`; the one
/// decoding beside it runs to its end.
#[test]
fn a_consumer_that_leaves_stops_only_its_sequence() {
    let model = load();
    let batcher = Arc::new(Batcher::start(model.clone(), BatchConfig::default()).unwrap());
    let long = prompt(&model, "Tell me a long story about a dragon.");
    let short = prompt(&model, QUESTIONS[0]);
    let (left, stayed) = std::thread::scope(|scope| {
        let b = batcher.clone();
        let left = scope.spawn(move || {
            let mut n = 0;
            let mut sink = |_: &str| {
                n += 1;
                if n == 2 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            };
            b.generate(
                &long,
                &SamplingParams::greedy(400),
                GenerateOptions { ignore_eos: true },
                &mut sink,
            )
        });
        let b = batcher.clone();
        let stayed = scope.spawn(move || {
            collect(|sink| {
                b.generate(
                    &short,
                    &SamplingParams::greedy(24),
                    GenerateOptions { ignore_eos: true },
                    sink,
                )
            })
        });
        (left.join().unwrap(), stayed.join().unwrap())
    });
    assert!(matches!(left, Err(Error::Cancelled(_))), "{left:?}");
    assert_eq!(stayed.1.completion_tokens, 24);
    assert_eq!(model.stats().cancelled.load(Ordering::Relaxed), 1);
    assert!(
        model.stats().tokens_decoded.load(Ordering::Relaxed) < 24 + 40,
        "the cancelled sequence stopped early"
    );
}

/// Refusals come back to their caller, not to the batch: an empty prompt, a prompt over the
/// context window. The batcher keeps serving after them.
#[test]
fn bad_prompts_are_refused_and_the_batch_goes_on() {
    let model = load();
    let batcher = Batcher::start(model.clone(), BatchConfig::default()).unwrap();
    let mut sink = |_: &str| ControlFlow::Continue(());
    let params = SamplingParams::greedy(4);
    let empty = batcher.generate(&[], &params, GenerateOptions::default(), &mut sink);
    assert!(
        matches!(empty, Err(Error::InvalidArgument { .. })),
        "{empty:?}"
    );
    let too_long = vec![42u32; model.info().context_length];
    let long = batcher.generate(&too_long, &params, GenerateOptions::default(), &mut sink);
    assert!(
        matches!(long, Err(Error::InvalidArgument { .. })),
        "{long:?}"
    );
    let ok = batcher
        .generate(
            &prompt(&model, QUESTIONS[2]),
            &params,
            GenerateOptions::default(),
            &mut sink,
        )
        .unwrap();
    assert!(ok.completion_tokens > 0);
}

/// A sequence decoded in a batch of two is as close to the f32 model as the same sequence
/// decoded alone (both round activations to int8, in different products): within the bound
/// `smollm2.rs` holds ferry's kernels to against candle's quantized llama.
#[test]
fn batched_rows_are_as_close_to_f32_as_lone_ones() {
    use candle_core::quantized::gguf_file;
    use ferry_engine::model::gguf_llama::GgufLlama;
    let model = load_id("smollm2-135m-instruct");
    let manifest = ModelManifest::load(&root().join("models/smollm2-135m-instruct.toml")).unwrap();
    let path = root()
        .join("models/cache")
        .join(&manifest.id)
        .join(manifest.weights.as_deref().unwrap());
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let cpu = candle_core::Device::Cpu;
    let exact = GgufLlama::from_gguf(&ct, &mut f, &cpu)
        .unwrap()
        .dequantized()
        .unwrap();
    let ours = GgufLlama::from_gguf(&ct, &mut f, &cpu).unwrap();
    for q in QUESTIONS {
        let p = prompt(&model, q);
        let mut ce = exact.new_cache();
        let le = exact
            .forward(&mut ce, &p, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let t = argmax(&le) as u32;
        let le1 = exact
            .forward(&mut ce, &[t], p.len())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut c1 = ours.new_cache();
        ours.forward(&mut c1, &p, 0).unwrap();
        let mut c2 = c1.clone();
        let l1 = ours
            .forward(&mut c1, &[t], p.len())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut c3 = c2.clone();
        let out = ours
            .forward_batch(&mut [(&mut c2, &[t][..], p.len()), (&mut c3, &[t][..], p.len())])
            .unwrap();
        let g = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        let (lone, batched) = (g(&l1, &le1), g(&out[0], &le1));
        eprintln!("{q}: largest logit gap to f32 alone {lone:.3}, in a batch {batched:.3}");
        assert!(
            batched <= 1.5 * lone + 0.25,
            "{q}: {batched} against {lone}"
        );
        assert_eq!(
            out[0], out[1],
            "{q}: the same sequence twice in a batch gets the same logits"
        );
    }
}
