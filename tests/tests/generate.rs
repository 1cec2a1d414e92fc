//! Streaming completions over gRPC from the real bundled model: determinism, limits, stop
//! strings, and the accounting in the final message.

use ferry_integration::{greedy, run, TestServer, DEFAULT_MODEL};
use ferry_proto::v1 as pb;

const QUESTION: &str = "Name three colours of the rainbow.";

#[tokio::test]
async fn greedy_stream_is_repeatable_and_accounted() {
    let mut t = TestServer::start(|_| {}).await;
    let (a, deltas, ca) = run(&mut t.client, greedy(QUESTION, 24)).await.unwrap();
    let (b, _, cb) = run(&mut t.client, greedy(QUESTION, 24)).await.unwrap();
    assert_eq!(a, b, "same settings, same text");
    assert!(!a.trim().is_empty());
    assert!(deltas >= 2, "text arrives as a stream, got {deltas} deltas");
    assert_ne!(ca.request_id, cb.request_id);
    assert_eq!(ca.model, DEFAULT_MODEL);
    assert_eq!(ca.tier, pb::Tier::Local as i32);
    let usage = ca.usage.unwrap();
    assert!(usage.prompt_tokens > 5);
    assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 24);
    let lat = ca.latency.unwrap();
    assert!(lat.time_to_first_token_ms > 0.0 && lat.time_to_first_token_ms <= lat.total_ms);
    let energy = ca.energy.unwrap();
    assert!(energy.joules.is_some_and(|j| j > 0.0) && !energy.source.is_empty());

    // The completion count is the number of tokens of the streamed text.
    let model = t.server.state.model(DEFAULT_MODEL).unwrap();
    let retokenized = model.encode_text(&a).unwrap().len() as u32;
    assert_eq!(retokenized, usage.completion_tokens, "text {a:?}");
}

#[tokio::test]
async fn max_tokens_and_stop_strings_are_honoured() {
    let mut t = TestServer::start(|_| {}).await;
    let (text, _, c) = run(
        &mut t.client,
        greedy("Tell me a long story about a ferry.", 12),
    )
    .await
    .unwrap();
    assert_eq!(c.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(c.usage.unwrap().completion_tokens, 12);

    // Stop at a word the unconstrained answer contains: the text ends right before it.
    let word = text
        .split_whitespace()
        .map(|w| w.trim_matches(|ch: char| !ch.is_alphanumeric()))
        .filter(|w| w.len() >= 3)
        .nth(1)
        .expect("a word to stop at")
        .to_string();
    let cut = text.find(&word).unwrap();
    let mut req = greedy("Tell me a long story about a ferry.", 12);
    req.stop = vec![word.clone(), "\u{1F6A2}never".into()];
    let (stopped, _, c) = run(&mut t.client, req).await.unwrap();
    assert_eq!(
        c.finish_reason,
        pb::FinishReason::StopSequence as i32,
        "stop {word:?} in {text:?}"
    );
    assert_eq!(stopped, text[..cut], "stop {word:?}");
    assert!(!stopped.contains(&word));
}

#[tokio::test]
async fn seeded_sampling_is_repeatable() {
    let mut t = TestServer::start(|_| {}).await;
    let req = |seed| pb::GenerateRequest {
        temperature: Some(0.9),
        top_p: Some(0.95),
        top_k: Some(40),
        seed: Some(seed),
        ..greedy("Write one sentence about the sea.", 20)
    };
    let (a, _, _) = run(&mut t.client, req(7)).await.unwrap();
    let (b, _, _) = run(&mut t.client, req(7)).await.unwrap();
    assert_eq!(a, b, "same seed, same text");
    let mut others = Vec::new();
    for seed in [8, 9, 10] {
        others.push(run(&mut t.client, req(seed)).await.unwrap().0);
    }
    assert!(
        others.iter().any(|o| o != &a),
        "other seeds should sample other text"
    );
}

#[tokio::test]
async fn list_models_and_feedback() {
    let mut t = TestServer::start(|_| {}).await;
    let models = t
        .client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let m = models
        .iter()
        .find(|m| m.id == DEFAULT_MODEL)
        .expect("default model listed");
    assert!(m.loaded && m.is_default);
    assert_eq!(m.family, "llama");
    // The file's own `llama.context_length` (candle's quantized llama capped every file at 4096).
    assert_eq!(m.context_length, 8192);
    assert!(
        models.iter().all(|m| m.id != "all-minilm-l6-v2"),
        "encoders are not chat models"
    );

    let (_, _, c) = run(&mut t.client, greedy("Hello!", 4)).await.unwrap();
    let fb = |id: &str, satisfied| pb::FeedbackRequest {
        request_id: id.to_string(),
        satisfied,
        score: Some(0.8),
    };
    let r = t
        .client
        .feedback(fb(&c.request_id, true))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.replaced);
    let r = t
        .client
        .feedback(fb(&c.request_id, false))
        .await
        .unwrap()
        .into_inner();
    assert!(r.replaced);
    let err = t
        .client
        .feedback(fb("no-such-request", true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let stored = t.server.state.records.feedback_of(&c.request_id).unwrap();
    assert!(!stored.satisfied);
    let log =
        std::fs::read_to_string(t.server.state.config.state.dir.join("feedback.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2);
}

#[tokio::test]
async fn client_request_id_is_echoed() {
    let mut t = TestServer::start(|_| {}).await;
    let mut req = greedy("Hi", 3);
    req.request_id = "app-chosen-id-1".into();
    let (_, _, c) = run(&mut t.client, req).await.unwrap();
    assert_eq!(c.request_id, "app-chosen-id-1");
}
