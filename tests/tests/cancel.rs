//! A client that goes away mid-stream stops decoding: checked on the engine's counters.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_integration::{greedy, TestServer, DEFAULT_MODEL};
use futures::StreamExt;

#[tokio::test]
async fn cancelling_mid_stream_stops_decoding() {
    let mut t = TestServer::start(|_| {}).await;
    let stats = t.server.state.model(DEFAULT_MODEL).unwrap().stats().clone();
    let max_tokens = 2000;
    let mut stream = t
        .client
        .generate(greedy(
            "Tell me a very long story about ferries and harbours.",
            max_tokens,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut deltas = 0;
    while deltas < 3 {
        stream.next().await.expect("stream open").expect("delta");
        deltas += 1;
    }
    drop(stream);
    // Wait for the engine to record the cancellation (bounded, event-driven by the counter).
    let mut waited = 0;
    while stats.cancelled.load(Ordering::Relaxed) == 0 {
        assert!(
            waited < 600,
            "generation did not stop after the client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    let decoded = stats.tokens_decoded.load(Ordering::Relaxed);
    assert!(
        decoded < 200,
        "decoding went on after cancel: {decoded} tokens"
    );
    // The counter stays put: nothing is decoding any more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats.tokens_decoded.load(Ordering::Relaxed), decoded);
    assert_eq!(stats.completed.load(Ordering::Relaxed), 0);
    assert_eq!(t.server.state.admission.in_system(), 0);
}

/// A deadline reached mid-stream ends the stream from ferryd's side, a little before the app's
/// own timer, with DEADLINE_EXCEEDED and the accounting of what was delivered; decoding stops.
#[tokio::test]
async fn a_deadline_reached_mid_stream_ends_it_with_the_accounting() {
    let mut t = TestServer::start(|_| {}).await;
    let stats = t.server.state.model(DEFAULT_MODEL).unwrap().stats().clone();
    let mut req = tonic::Request::new(greedy(ferry_integration::LONG_PROMPT, 2000));
    // Long enough for the first tokens on a slow machine, far too short for 2,000 tokens.
    req.set_timeout(Duration::from_secs(3));
    let started = std::time::Instant::now();
    let mut stream = t.client.generate(req).await.unwrap().into_inner();
    let (mut deltas, mut bytes) = (0u64, 0u64);
    let status = loop {
        match stream.next().await.expect("the stream ends with a status") {
            Ok(m) => match m.event {
                Some(ferry_proto::v1::generate_response::Event::Delta(d)) => {
                    deltas += 1;
                    bytes += d.text.len() as u64;
                }
                other => panic!("expected deltas then a status, got {other:?}"),
            },
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "ferryd's status came after the deadline"
    );
    assert!(deltas > 0, "no text within 3 s");
    let md = status.metadata();
    assert_eq!(md.get("x-ferry-tier").unwrap(), "local");
    assert_eq!(
        md.get("x-ferry-delivered-deltas")
            .unwrap()
            .to_str()
            .unwrap(),
        deltas.to_string()
    );
    assert_eq!(
        md.get("x-ferry-delivered-bytes").unwrap().to_str().unwrap(),
        bytes.to_string()
    );
    assert_eq!(stats.completed.load(Ordering::Relaxed), 0);
    assert_eq!(t.server.state.admission.in_system(), 0);
    // The ledger recorded the cut request with what was delivered, so the app's Feedback on
    // its partial answer finds it.
    let id = md
        .get("x-ferry-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    t.client
        .feedback(ferry_proto::v1::FeedbackRequest {
            request_id: id,
            satisfied: false,
            score: None,
        })
        .await
        .expect("feedback on a request cut by its deadline is accepted");
    let s = t
        .client
        .status(ferry_proto::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.requests_completed, s.requests_failed), (0, 1));
}
