//! The engine on the real bundled model (SmolLM2-135M-Instruct Q4_1). Needs
//! `ferry models fetch` (the test scripts run it first).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use ferry_core::{ChatMessage, ModelManifest, Role, SamplingParams};
use ferry_engine::{GenerateOptions, LoadedModel};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> PathBuf {
    std::env::var_os("FERRY_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/cache"))
}

fn load() -> LoadedModel {
    let manifest = ModelManifest::load(&root().join("models/smollm2-135m-instruct.toml")).unwrap();
    LoadedModel::load(&manifest, &model_dir(), &ferry_engine::Device::Cpu).unwrap_or_else(|e| {
        panic!("{e}\n(the bundled model is installed by `cargo run -p ferry-cli -- models fetch`)")
    })
}

/// Greedy/seeded generation with a short system prompt. (Without one, SmolLM2's own template
/// inserts "You are a helpful AI assistant named SmolLM...", after which the 135M model answers
/// the France question with a list of French words — llama.cpp does the same on this file.)
fn generate(
    model: &LoadedModel,
    prompt: &str,
    params: &SamplingParams,
) -> (String, Vec<String>, ferry_engine::GenerationOutcome) {
    let ids = model
        .encode_chat(&[
            ChatMessage::text(Role::System, "You are a helpful assistant."),
            ChatMessage::text(Role::User, prompt),
        ])
        .unwrap();
    let mut deltas = Vec::new();
    let mut sink = |d: &str| {
        deltas.push(d.to_string());
        ControlFlow::Continue(())
    };
    let out = model
        .generate(&ids, params, GenerateOptions::default(), &mut sink)
        .unwrap();
    (out.text.clone(), deltas, out)
}

#[test]
fn chat_prompt_uses_smollm_tokenization() {
    let model = load();
    let ids = model
        .encode_chat(&[ChatMessage::text(Role::User, "Hi")])
        .unwrap();
    let text = model.tokenizer().decode(&ids, false).unwrap();
    eprintln!("{ids:?}\n{text}");
    // <|im_start|> is one special token, and "user" after it has no prefix space (Ġ).
    assert_eq!(ids[0], 1, "{text}");
    assert!(
        text.contains("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    let user = model.tokenizer().token_to_id("user").unwrap();
    assert!(ids.windows(2).any(|w| w == [1, user]), "{ids:?}");
}

#[test]
fn greedy_answer_is_correct_and_repeatable() {
    let model = load();
    let params = SamplingParams::greedy(24);
    let (a, deltas, out) = generate(&model, "What is the capital of France?", &params);
    let (b, _, _) = generate(&model, "What is the capital of France?", &params);
    assert_eq!(a, b);
    assert_eq!(a, "The capital of France is Paris.");
    assert_eq!(out.finish_reason, ferry_core::FinishReason::Stop);
    assert_eq!(deltas.concat(), a);
}

#[test]
fn multibyte_characters_are_never_split_across_deltas() {
    let model = load();
    let text = "Le café 🚢 au port de 日本, naïve façade.";
    let ids = model.encode_text(text).unwrap();
    // Byte-level BPE spreads the emoji and the CJK characters over several tokens each.
    let partial = ids
        .iter()
        .filter(|&&id| {
            model
                .tokenizer()
                .decode(&[id], true)
                .unwrap()
                .contains('\u{FFFD}')
        })
        .count();
    assert!(
        partial >= 2,
        "expected tokens holding partial characters in {ids:?}"
    );
    let mut detok = ferry_engine::stream::Detokenizer::new(model.tokenizer());
    let mut deltas = Vec::new();
    for id in ids {
        if let Some(d) = detok.push(id).unwrap() {
            deltas.push(d);
        }
    }
    deltas.extend(detok.flush().unwrap());
    assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    assert_eq!(deltas.concat(), text);
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let model = load();
    let ids = vec![42u32; model.info().context_length];
    let mut sink = |_: &str| ControlFlow::Continue(());
    let err = model
        .generate(
            &ids,
            &SamplingParams::greedy(4),
            GenerateOptions::default(),
            &mut sink,
        )
        .unwrap_err();
    assert!(
        matches!(err, ferry_core::Error::InvalidArgument { .. }),
        "{err}"
    );
}

#[test]
fn sink_break_cancels() {
    let model = load();
    let ids = model
        .encode_chat(&[ChatMessage::text(Role::User, "Tell me a long story.")])
        .unwrap();
    let mut n = 0;
    let mut sink = |_: &str| {
        n += 1;
        if n == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let err = model
        .generate(
            &ids,
            &SamplingParams::greedy(500),
            GenerateOptions::default(),
            &mut sink,
        )
        .unwrap_err();
    assert!(matches!(err, ferry_core::Error::Cancelled(_)), "{err}");
    assert_eq!(
        model
            .stats()
            .cancelled
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        model
            .stats()
            .tokens_decoded
            .load(std::sync::atomic::Ordering::Relaxed)
            < 20
    );
}

/// ferry's llama forward pass (its own kernels on this CPU) against the same forward pass in
/// f32 (`dequantized`) and against candle's `quantized_llama`, all fed the f32 model's greedy
/// continuation of a chat prompt: the f32 model's choice stays among ferry's top three at every
/// step, and ferry's logits are no further from f32 than candle's own quantized ones (both
/// round activations to int8; near-ties such as "The" vs "Sure" at the first token can flip).
#[test]
fn ferrys_llama_matches_f32_as_closely_as_candles_quantized_llama() {
    use candle_core::quantized::gguf_file;
    use candle_core::Tensor;
    use candle_transformers::models::quantized_llama;
    use ferry_engine::model::gguf_llama::GgufLlama;

    let manifest = ModelManifest::load(&root().join("models/smollm2-135m-instruct.toml")).unwrap();
    let path = model_dir()
        .join(&manifest.id)
        .join(manifest.weights.as_deref().unwrap());
    let open = || {
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        (ct, f)
    };
    let cpu = candle_core::Device::Cpu;
    let (ct, mut f) = open();
    assert!(GgufLlama::supports(&ct));
    let ours = GgufLlama::from_gguf(&ct, &mut f, &cpu).unwrap();
    assert_eq!(
        ours.uses_kernels(),
        ferry_engine::kernels::kernel_available(),
        "every layer takes ferry's kernel where the CPU runs it"
    );
    assert_eq!(ours.uses_cpu_path(), ours.uses_kernels());
    let (ct, mut f) = open();
    let exact = GgufLlama::from_gguf(&ct, &mut f, &cpu)
        .unwrap()
        .dequantized()
        .unwrap();
    let (ct, mut f) = open();
    let mut candle = quantized_llama::ModelWeights::from_gguf(ct, &mut f, &cpu).unwrap();

    let prompt = load()
        .encode_chat(&[
            ChatMessage::text(Role::System, "You are a helpful assistant."),
            ChatMessage::text(Role::User, "What is the capital of France?"),
        ])
        .unwrap();
    let logits = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let gap = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let (mut c_ours, mut c_exact) = (ours.new_cache(), exact.new_cache());
    let (mut worst_ours, mut worst_candle) = (0f32, 0f32);
    let mut feed = prompt;
    let mut pos = 0;
    for step in 0..12 {
        let e = logits(exact.forward(&mut c_exact, &feed, pos).unwrap());
        let o = logits(ours.forward(&mut c_ours, &feed, pos).unwrap());
        let input = Tensor::new(feed.as_slice(), &cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let c = logits(candle.forward(&input, pos).unwrap());
        pos += feed.len();
        worst_ours = worst_ours.max(gap(&o, &e));
        worst_candle = worst_candle.max(gap(&c, &e));
        let choice = (0..e.len()).max_by(|&a, &b| e[a].total_cmp(&e[b])).unwrap();
        let above = o.iter().filter(|&&v| v > o[choice]).count();
        assert!(
            above < 3,
            "step {step}: f32's token {choice} is ranked {} by ferry's kernels",
            above + 1
        );
        feed = vec![choice as u32];
    }
    eprintln!("largest logit gap to f32: ferry {worst_ours}, candle {worst_candle}");
    assert!(
        worst_ours <= 1.5 * worst_candle + 0.25,
        "ferry's logits are {worst_ours} from f32, candle's {worst_candle}"
    );
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let manifest = ModelManifest::load(&root().join("models/all-minilm-l6-v2.toml")).unwrap();
    let enc = ferry_engine::encoder::SentenceEncoder::load(
        &manifest,
        &model_dir(),
        &ferry_engine::Device::Cpu,
    )
    .unwrap();
    assert_eq!(enc.dim(), 384);
    let v = enc
        .embed(&[
            "A cat sits on the mat.",
            "A kitten rests on a rug.",
            "Stock markets fell sharply today.",
        ])
        .unwrap();
    let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let similar = cos(&v[0], &v[1]);
    let unrelated = cos(&v[0], &v[2]);
    assert!(similar > 0.5 && unrelated < 0.2, "{similar} {unrelated}");
    // The same text twice (and the cache) give the same vector; batching does not change it.
    let again = enc.embed(&["A cat sits on the mat."]).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&again[0], &v[0]),
        "served from the cache"
    );
    let alone = ferry_engine::encoder::SentenceEncoder::load(
        &manifest,
        &model_dir(),
        &ferry_engine::Device::Cpu,
    )
    .unwrap()
    .embed(&["A cat sits on the mat."])
    .unwrap();
    assert!(v[0]
        .iter()
        .zip(alone[0].iter())
        .all(|(a, b)| (a - b).abs() < 1e-5));
}

/// The encoder stores its linear weights transposed for the CPU gemm; this checks it against
/// candle's BERT loaded straight from the file, pooled here by hand.
#[test]
fn minilm_embeddings_match_the_file_layout_forward_pass() {
    use candle_core::{DType, Tensor};
    let manifest = ModelManifest::load(&root().join("models/all-minilm-l6-v2.toml")).unwrap();
    let dir = manifest.local_dir(&model_dir());
    let text = "Which gas do plants take in from the air to make their food?";
    let ours = ferry_engine::encoder::SentenceEncoder::load(
        &manifest,
        &model_dir(),
        &ferry_engine::Device::Cpu,
    )
    .unwrap()
    .embed(&[text])
    .unwrap();
    let config: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let device = candle_core::Device::Cpu;
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let vb = candle_nn::VarBuilder::from_buffered_safetensors(bytes, DType::F32, &device).unwrap();
    let bert = candle_transformers::models::bert::BertModel::load(vb, &config).unwrap();
    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    // The file pads to 128 tokens; sentence-transformers pools over the text's own tokens.
    tok.with_padding(None);
    let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
    let ids = Tensor::new(ids.as_slice(), &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let hidden = bert
        .forward(
            &ids,
            &ids.zeros_like().unwrap(),
            Some(&ids.ones_like().unwrap()),
        )
        .unwrap();
    let mean: Vec<f32> = hidden
        .mean(1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
    let diff = ours[0]
        .iter()
        .zip(&mean)
        .map(|(a, b)| (a - b / norm).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "largest difference {diff}");
}

/// The bundled encoder `name` (a manifest id), on the CPU.
fn encoder(name: &str) -> ferry_engine::encoder::SentenceEncoder {
    let m = ModelManifest::load(&root().join(format!("models/{name}.toml"))).unwrap();
    ferry_engine::encoder::SentenceEncoder::load(&m, &model_dir(), &ferry_engine::Device::Cpu)
        .unwrap()
}

/// Static pooling: a one-token text is exactly the contextual embedding of that text, and
/// texts keep their similarities roughly.
#[test]
fn static_pooling_agrees_with_the_contextual_encoder() {
    let (stat, full) = (
        encoder("all-minilm-l6-v2-static"),
        encoder("all-minilm-l6-v2"),
    );
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let one = "ferry";
    assert_eq!(stat.embed_token_count(one).unwrap(), 3);
    let (a, b) = (stat.embed(&[one]).unwrap(), full.embed(&[one]).unwrap());
    assert!(cos(&a[0], &b[0]) > 0.99999, "{}", cos(&a[0], &b[0]));
    let texts = [
        "A cat sits on the mat.",
        "A kitten rests on a rug.",
        "Stock markets fell sharply today.",
    ];
    let v = stat.embed(&texts).unwrap();
    let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    assert!(cos(&v[0], &v[1]) > cos(&v[0], &v[2]) + 0.1);
    // Each text's static embedding is nearer its own contextual embedding than the others'.
    let w = full.embed(&texts).unwrap();
    for (i, s) in v.iter().enumerate() {
        for (j, c) in w.iter().enumerate().filter(|&(j, _)| j != i) {
            assert!(cos(s, &w[i]) > cos(s, c), "text {i} against {j}");
        }
    }
    // An empty text has no tokens and falls back to the contextual embedding.
    let (e, f) = (stat.embed(&[""]).unwrap(), full.embed(&[""]).unwrap());
    assert!(cos(&e[0], &f[0]) > 0.99999);
}

/// The int8 encoder (Q8_0 weights on ferry's kernels, one text at a time) stays within
/// rounding of the f32 one: every text's vector is nearest its own f32 vector, at cosine
/// > 0.99, short and long texts alike, and its static pooling runs on it too.
#[test]
fn int8_encoder_stays_within_rounding_of_the_f32_one() {
    let (q8, full) = (encoder("all-minilm-l6-v2-q8"), encoder("all-minilm-l6-v2"));
    let long = "The committee met on Tuesday to review the budget, the hiring plan and the \
                schedule for the new building, and after a long discussion of each item it \
                agreed to postpone the decision on the roof until the engineers report. "
        .repeat(4);
    let texts = [
        "ferry",
        "A cat sits on the mat.",
        "A kitten rests on a rug.",
        "Stock markets fell sharply today.",
        "What is the capital of France?",
        "Which gas do plants absorb from the air for photosynthesis?",
        "If a train travels 60 miles in 1.5 hours, what is its average speed?",
        "To open a jar with a stuck lid, run the lid under hot water.",
        "Jordan lent his notes to a classmate before the exam. How would the classmate feel?",
        long.as_str(),
    ];
    assert!(q8.embed_token_count(&long).unwrap() > 150);
    let (a, b) = (q8.embed(&texts).unwrap(), full.embed(&texts).unwrap());
    let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for (i, v) in a.iter().enumerate() {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let own = cos(v, &b[i]);
        eprintln!("text {i}: cosine to the f32 vector {own:.5}");
        assert!(own > 0.99, "text {i}: cosine {own}");
        for (j, other) in b.iter().enumerate().filter(|&(j, _)| j != i) {
            assert!(own > cos(v, other), "text {i} nearer f32 text {j}");
        }
    }
    // Alone or in company, a text gets the same vector (each is embedded on its own).
    let alone = encoder("all-minilm-l6-v2-q8").embed(&[texts[4]]).unwrap();
    assert_eq!(alone[0].as_slice(), a[4].as_slice());
}

#[test]
fn warm_up_generates_and_leaves_the_counters_alone() {
    let model = load();
    let ms = model.warm_up().unwrap();
    assert!(ms > 0.0);
    let stats = model.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.prompt_tokens.load(Relaxed), 0);
    assert_eq!(stats.tokens_decoded.load(Relaxed), 0);
    assert_eq!(stats.completed.load(Relaxed), 0);
    // The model still answers as before after it.
    let (text, _, out) = generate(
        &model,
        "What is the capital of France?",
        &SamplingParams::greedy(8),
    );
    assert!(out.completion_tokens > 0 && !text.is_empty());
    assert!(stats.tokens_decoded.load(Relaxed) > 0);
}
