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
