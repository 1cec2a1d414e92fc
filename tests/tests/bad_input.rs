//! Bad input gets the right status, names what is wrong, and the daemon keeps serving.

use ferry_integration::{greedy, msg, run, TestServer};
use ferry_proto::v1 as pb;
use tonic::Code;

async fn expect(t: &mut TestServer, req: pb::GenerateRequest, code: Code, needle: &str) {
    let err = match t.client.generate(req).await {
        Err(s) => s,
        Ok(resp) => {
            let mut s = resp.into_inner();
            use futures::StreamExt;
            loop {
                match s.next().await {
                    Some(Err(e)) => break e,
                    Some(Ok(_)) => continue,
                    None => panic!("expected {code:?}, the request succeeded"),
                }
            }
        }
    };
    assert_eq!(err.code(), code, "{}", err.message());
    assert!(
        err.message().contains(needle),
        "{:?} should mention {needle:?}",
        err.message()
    );
}

#[tokio::test]
async fn invalid_requests_are_refused_and_serving_continues() {
    let mut t = TestServer::start(|c| c.limits.max_prompt_tokens = 64).await;
    let base = greedy("Hi", 4);
    expect(
        &mut t,
        pb::GenerateRequest {
            messages: vec![],
            ..base.clone()
        },
        Code::InvalidArgument,
        "messages",
    )
    .await;
    expect(
        &mut t,
        pb::GenerateRequest {
            messages: vec![msg(pb::Role::User, "")],
            ..base.clone()
        },
        Code::InvalidArgument,
        "messages[0]",
    )
    .await;
    let long = "ferry ".repeat(200);
    expect(
        &mut t,
        greedy(&long, 4),
        Code::InvalidArgument,
        "limit of 64 tokens",
    )
    .await;
    expect(
        &mut t,
        pb::GenerateRequest {
            model: "no-such-model".into(),
            ..base.clone()
        },
        Code::NotFound,
        "no-such-model",
    )
    .await;
    // A model id is only ever matched against the manifests: a path is an unknown id, never a
    // file that is opened.
    for path in [
        "../../../../etc/passwd",
        "/etc/passwd",
        "smollm2-135m-instruct/../../../etc/passwd",
    ] {
        expect(
            &mut t,
            pb::GenerateRequest {
                model: path.into(),
                ..base.clone()
            },
            Code::NotFound,
            "not found",
        )
        .await;
    }
    expect(
        &mut t,
        pb::GenerateRequest {
            max_tokens: Some(0),
            ..base.clone()
        },
        Code::InvalidArgument,
        "max_tokens",
    )
    .await;
    expect(
        &mut t,
        pb::GenerateRequest {
            max_tokens: Some(1_000_000),
            ..base.clone()
        },
        Code::InvalidArgument,
        "limit of 2048",
    )
    .await;
    expect(
        &mut t,
        pb::GenerateRequest {
            top_p: Some(-1.0),
            ..base.clone()
        },
        Code::InvalidArgument,
        "top_p",
    )
    .await;
    let image_only_bad = pb::Message {
        role: pb::Role::User as i32,
        parts: vec![pb::ContentPart {
            kind: Some(pb::content_part::Kind::Image(pb::Image {
                data: vec![1, 2, 3],
                mime_type: "application/zip".into(),
                source: "cam".into(),
            })),
        }],
    };
    expect(
        &mut t,
        pb::GenerateRequest {
            messages: vec![image_only_bad],
            ..base.clone()
        },
        Code::InvalidArgument,
        "mime_type",
    )
    .await;
    expect(
        &mut t,
        pb::GenerateRequest {
            messages: vec![pb::Message {
                role: 2,
                parts: vec![pb::ContentPart { kind: None }],
            }],
            ..base.clone()
        },
        Code::InvalidArgument,
        "parts[0]",
    )
    .await;

    let (text, _, _) = run(&mut t.client, base)
        .await
        .expect("still serving after bad input");
    assert!(!text.is_empty());
    let rejected = t
        .server
        .state
        .stats
        .requests_rejected
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(rejected, 12);
}

#[tokio::test]
async fn images_for_a_text_only_model_are_reported_not_sent() {
    let mut t = TestServer::start(|_| {}).await;
    let mut req = greedy("Describe the picture.", 4);
    req.messages[0].parts.push(pb::ContentPart {
        kind: Some(pb::content_part::Kind::Image(pb::Image {
            data: vec![0x89, b'P', b'N', b'G'],
            mime_type: "image/png".into(),
            source: "camera/front".into(),
        })),
    });
    let (_, _, c) = run(&mut t.client, req).await.unwrap();
    let p = c.placement.unwrap();
    assert!(p.modalities_sent.is_empty());
    assert!(p.reason.contains("text-only"), "{}", p.reason);
}

#[tokio::test]
async fn queue_overflow_is_resource_exhausted() {
    let mut t = TestServer::start(|c| {
        c.server.max_concurrent = 1;
        c.server.max_queue = 1;
    })
    .await;
    // Two long requests fill the one running slot and the one queue place.
    let long = || {
        greedy(
            "Tell me a very long story about ferries and harbours.",
            2000,
        )
    };
    let first = t
        .client
        .generate(long())
        .await
        .expect("first admitted")
        .into_inner();
    let second = t
        .client
        .generate(long())
        .await
        .expect("second queued")
        .into_inner();
    let err = t.client.generate(long()).await.expect_err("third refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("max_queue 1"), "{}", err.message());
    drop(first);
    drop(second);
    // Places free up once the abandoned requests notice their clients are gone.
    let state = t.server.state.clone();
    for _ in 0..600 {
        if state.admission.in_system() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state.admission.in_system(), 0);
    run(&mut t.client, greedy("Hi", 2))
        .await
        .expect("serving again");
}

/// A request whose deadline (grpc-timeout) is shorter than the expected wait for a slot is
/// refused at once with RESOURCE_EXHAUSTED naming the wait, instead of timing out in the queue;
/// one with time to spare queues and is served.
#[tokio::test]
async fn a_deadline_the_queue_cannot_meet_is_refused_at_once() {
    use futures::StreamExt;
    use std::time::Duration;
    let mut t = TestServer::start(|c| {
        c.server.max_concurrent = 1;
        c.server.max_queue = 4;
    })
    .await;
    let with_deadline = |req: pb::GenerateRequest, ms: u64| {
        let mut r = tonic::Request::new(req);
        r.set_timeout(Duration::from_millis(ms));
        r
    };
    // One answer measures how long a request holds the slot (64 tokens: about a second here,
    // and slower on a loaded machine, which lengthens the expected wait with it).
    let (_, _, done) = run(&mut t.client, greedy(ferry_integration::LONG_PROMPT, 64))
        .await
        .unwrap();
    assert!(done.usage.unwrap().completion_tokens > 32);
    let held_ms = t.server.state.admission.held_ms().expect("a slot time");
    // A long answer holds the one slot: the next request waits about half a slot time.
    let mut running = t
        .client
        .generate(greedy(ferry_integration::LONG_PROMPT, 2000))
        .await
        .unwrap()
        .into_inner();
    running.next().await.unwrap().unwrap();
    let short_ms = (held_ms / 4.0).max(1.0) as u64;
    let err = t
        .client
        .generate(with_deadline(greedy("Hi", 2), short_ms))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("expected wait") && err.message().contains("deadline"),
        "{}",
        err.message()
    );
    assert_eq!(
        t.server.state.admission.in_system(),
        1,
        "nothing left queued"
    );
    // With time to spare it queues, and is served once the slot frees up.
    let queued = t
        .client
        .generate(with_deadline(greedy("Hi", 2), 600_000))
        .await
        .expect("queued");
    drop(running);
    let mut queued = queued.into_inner();
    let mut completed = false;
    while let Some(item) = queued.next().await {
        if let Some(pb::generate_response::Event::Completion(_)) = item.unwrap().event {
            completed = true;
        }
    }
    assert!(completed);
}
