//! ferryd's local tier decodes concurrent requests to one model together: with room for four
//! generations, four streams share forward passes, each ends with its own completion and text,
//! and a stream whose client leaves does not stop the others.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_integration::{greedy, run, TestServer, DEFAULT_MODEL};
use tokio_stream::StreamExt;

#[tokio::test]
async fn concurrent_streams_share_the_models_forward_passes() {
    let t = TestServer::start(|c| c.server.max_concurrent = 4).await;
    let questions = [
        "Tell me about ferries.",
        "Name three rivers.",
        "What is rain?",
        "Describe a harbour at night.",
    ];
    let runs = questions.iter().enumerate().map(|(i, q)| {
        let mut client = t.client.clone();
        let mut req = greedy(q, 20 + 4 * i as u32);
        req.model = DEFAULT_MODEL.into();
        async move { run(&mut client, req).await }
    });
    let results = futures::future::join_all(runs).await;
    for (q, r) in questions.iter().zip(results) {
        let (text, deltas, completion) = r.unwrap_or_else(|s| panic!("{q}: {s}"));
        assert!(deltas > 0 && !text.is_empty(), "{q}");
        let usage = completion.usage.unwrap();
        assert!(
            usage.completion_tokens > 0 && usage.prompt_tokens > 0,
            "{q}"
        );
    }
    let stats = t.server.state.batch_stats(DEFAULT_MODEL).unwrap();
    let (steps, rows) = (
        stats.steps.load(Ordering::Relaxed),
        stats.sequence_steps.load(Ordering::Relaxed),
    );
    assert!(
        rows as f64 / steps as f64 > 1.5,
        "streams shared steps: {rows} sequence-steps in {steps} steps"
    );
    assert_eq!(stats.failed_steps.load(Ordering::Relaxed), 0);
    assert_eq!(
        t.server
            .state
            .stats
            .requests_completed
            .load(Ordering::Relaxed),
        4
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_batch_does_not_stop_the_others() {
    let t = TestServer::start(|c| c.server.max_concurrent = 4).await;
    let mut leaving = t.client.clone();
    let mut req = greedy("Tell me a long story about a lighthouse.", 200);
    req.model = DEFAULT_MODEL.into();
    let mut stream = leaving.generate(req).await.unwrap().into_inner();
    // Read two events, then drop the stream while the others run.
    for _ in 0..2 {
        stream.next().await.unwrap().unwrap();
    }
    let mut staying = t.client.clone();
    let mut req = greedy("Name three colours.", 24);
    req.model = DEFAULT_MODEL.into();
    let other = tokio::spawn(async move { run(&mut staying, req).await });
    drop(stream);
    let (text, _, completion) = tokio::time::timeout(Duration::from_secs(120), other)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!text.is_empty());
    assert!(completion.usage.unwrap().completion_tokens > 0);
    // The one that left is booked as abandoned, and its sequence left the batch.
    let state = &t.server.state;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while state.stats.requests_abandoned.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never booked as abandoned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
