//! ferry-cloud on loopback: the Offload gRPC API over the candle backend with the bundled
//! SmolLM2, and over the openai backend fronting a real OpenAI-compatible server — ferryd's own
//! HTTP API, started in-process — including the upstream's errors, an unreachable upstream and
//! deadlines.

use std::time::Duration;

use ferry_cloud::{BackendKind, CloudConfig, CloudServer, ModelConfig};
use ferry_integration::{free_port, model_dir, repo_root, TestServer, DEFAULT_MODEL, LONG_PROMPT};
use ferry_proto::v1 as pb;
use futures::StreamExt;
use pb::offload_client::OffloadClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const QUESTION: &str = "Name three colours of the rainbow.";
/// The bundled SmolLM2 as configs/cloud.toml names it (unlike the local id, so ferryd lists both).
const SAMPLE_CLOUD_MODEL: &str = "smollm2-135m-instruct-cloud";
/// The variable the openai test's models read their upstream key from.
const KEY_VAR: &str = "FERRY_TEST_CLOUD_UPSTREAM_KEY";

fn model(id: &str, backend: BackendKind) -> ModelConfig {
    ModelConfig {
        id: id.to_string(),
        backend,
        manifest: None,
        base_url: None,
        upstream_model: None,
        api_key_env: None,
        stream: true,
        connect_timeout_ms: 2_000,
        read_timeout_ms: 60_000,
        capabilities: None,
        usd_per_million_tokens: None,
        joules_per_token: None,
        family: None,
        context_length: None,
    }
}

fn cloud_config(models: Vec<ModelConfig>) -> CloudConfig {
    let mut c = CloudConfig::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    // Several servers run at once: no fixed probe/metrics port.
    c.server.http_addr = "127.0.0.1:0".parse().unwrap();
    c.server.shutdown_grace_s = 5;
    c.candle.manifest_dir = repo_root().join("models");
    c.candle.model_dir = model_dir();
    c.models = models;
    c
}

async fn connect(server: &CloudServer) -> OffloadClient<Channel> {
    let addr = format!("http://{}", server.local_addr);
    for _ in 0..100 {
        if let Ok(c) = OffloadClient::connect(addr.clone()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not connect to {addr}");
}

fn request(id: &str, model: &str, text: &str, max_tokens: u32) -> pb::OffloadRequest {
    pb::OffloadRequest {
        request_id: id.to_string(),
        model: model.to_string(),
        messages: vec![pb::Message {
            role: pb::Role::User as i32,
            parts: vec![pb::ContentPart {
                kind: Some(pb::content_part::Kind::Text(text.to_string())),
            }],
        }],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// Runs a request to the end: (text, number of deltas, completion).
async fn run(
    client: &mut OffloadClient<Channel>,
    req: pb::OffloadRequest,
) -> Result<(String, usize, pb::OffloadCompletion), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut text = String::new();
    let mut deltas = 0;
    let mut done = None;
    while let Some(item) = stream.next().await {
        match item?.event {
            Some(pb::offload_response::Event::Delta(d)) => {
                assert!(done.is_none(), "delta after the completion");
                assert!(!d.text.is_empty(), "empty delta");
                text.push_str(&d.text);
                deltas += 1;
            }
            Some(pb::offload_response::Event::Completion(c)) => done = Some(c),
            None => panic!("empty event"),
        }
    }
    Ok((
        text,
        deltas,
        done.expect("stream ended without a completion"),
    ))
}

/// ferry-cloud admits as ferryd does: with its one slot taken, a request whose deadline is
/// shorter than the expected wait for a slot is refused at once, saying so (the edge then falls
/// back at once with that reason instead of timing out in the cloud's queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_shorter_than_the_expected_wait_is_refused_at_once() {
    let mut c = cloud_config(vec![model(DEFAULT_MODEL, BackendKind::Candle)]);
    c.server.max_concurrent = 1;
    let server = CloudServer::start(c).await.expect("ferry-cloud starts");
    let mut client = connect(&server).await;
    // One finished request measures how long a request holds the slot.
    run(
        &mut client,
        request("a", DEFAULT_MODEL, "Count to ten.", 16),
    )
    .await
    .unwrap();
    let mut busy = client.clone();
    let hold = tokio::spawn(async move {
        run(&mut busy, request("b", DEFAULT_MODEL, "Count to ten.", 16)).await
    });
    while server.state.in_system() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut late = tonic::Request::new(request("c", DEFAULT_MODEL, "Hi", 2));
    late.set_timeout(Duration::from_millis(20));
    let refused = std::time::Instant::now();
    let err = client.generate(late).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("expected wait") && err.message().contains("deadline of 20 ms"),
        "{err:?}"
    );
    assert!(refused.elapsed() < Duration::from_secs(2));
    // Without a deadline it waits its turn and is served.
    let (_, _, done) = run(&mut client, request("d", DEFAULT_MODEL, "Hi", 2))
        .await
        .unwrap();
    assert!(done.usage.unwrap().completion_tokens > 0);
    hold.await.unwrap().unwrap();
    server.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_hears_busy_before_its_deadline() {
    let mut c = cloud_config(vec![model(DEFAULT_MODEL, BackendKind::Candle)]);
    c.server.max_concurrent = 1;
    let server = CloudServer::start(c).await.expect("ferry-cloud starts");
    let client = connect(&server).await;
    // A long generation holds the only slot; no slot time is known yet, so the next request
    // is queued rather than refused at once.
    let mut busy = client.clone();
    let hold = tokio::spawn(async move {
        run(
            &mut busy,
            request("long", DEFAULT_MODEL, "Count from 1 to 300 in words.", 400),
        )
        .await
    });
    while server.state.running() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut queued = tonic::Request::new(request("queued", DEFAULT_MODEL, "Hi", 2));
    queued.set_timeout(Duration::from_millis(1500));
    let sent = std::time::Instant::now();
    // The refusal comes as the stream's status (the request was admitted to the queue).
    let mut queued_client = client.clone();
    let err = async move {
        let mut stream = queued_client.generate(queued).await?.into_inner();
        stream.message().await
    }
    .await
    .unwrap_err();
    let waited = sent.elapsed();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("no slot free") && err.message().contains("deadline of 1500 ms"),
        "{err:?}"
    );
    // It waited for a slot until shortly before the deadline, and answered before it.
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    assert!(server.state.running() == 1, "the long request still runs");
    hold.abort();
    server.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candle_backend_streams_lists_and_refuses_bad_requests() {
    let mut m = model(DEFAULT_MODEL, BackendKind::Candle);
    m.usd_per_million_tokens = Some(0.5);
    let server = CloudServer::start(cloud_config(vec![m]))
        .await
        .expect("ferry-cloud starts");
    let mut client = connect(&server).await;

    let channel = Channel::from_shared(format!("http://{}", server.local_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "ferry.v1.Offload".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    // ListModels: the zoo with capabilities and cost hints.
    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    let info = &models[0];
    assert_eq!(info.id, DEFAULT_MODEL);
    assert_eq!(info.tier, pb::Tier::Cloud as i32);
    assert_eq!(info.capabilities, vec!["text"]);
    assert_eq!(info.family, "llama");
    assert!(info.context_length > 0 && info.loaded);
    assert_eq!(info.usd_per_million_tokens, Some(0.5));

    // A streamed completion: deltas, then the accounting.
    let (text, deltas, c) = run(&mut client, request("cloud-1", DEFAULT_MODEL, QUESTION, 16))
        .await
        .unwrap();
    assert!(!text.trim().is_empty());
    assert!(deltas >= 2, "text arrives as a stream, got {deltas} deltas");
    assert_eq!(c.request_id, "cloud-1");
    assert_eq!(c.model, DEFAULT_MODEL);
    assert_eq!(c.backend, "candle");
    assert!(!c.replayed);
    let usage = c.usage.unwrap();
    assert!(usage.prompt_tokens > 5);
    assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 16);
    let energy = c.energy.clone().unwrap();
    assert!(
        energy.joules.is_some_and(|j| j > 0.0),
        "measured energy: {energy:?}"
    );
    assert!(!energy.source.is_empty() && energy.source != "hint" && energy.source != "none");
    let cost = c.cost_usd.expect("priced model has a cost");
    let expected = 0.5 * f64::from(usage.prompt_tokens + usage.completion_tokens) / 1e6;
    assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
    let lat = c.latency.unwrap();
    assert!(lat.time_to_first_token_ms > 0.0 && lat.time_to_first_token_ms <= lat.total_ms);

    // The same request id again: the stored answer, not a second run.
    let (again, _, c2) = run(&mut client, request("cloud-1", DEFAULT_MODEL, QUESTION, 16))
        .await
        .unwrap();
    assert_eq!(again, text);
    assert!(c2.replayed);
    assert_eq!(c2.usage, c.usage);

    // Unknown model.
    let err = run(
        &mut client,
        request("cloud-2", "no-such-model", QUESTION, 4),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("no-such-model"), "{}", err.message());

    // Bad input, each with the field named.
    let mut cases = Vec::new();
    cases.push((request("", DEFAULT_MODEL, QUESTION, 4), "request_id"));
    cases.push((request("cloud-3", "", QUESTION, 4), "model"));
    cases.push((request("cloud-4", DEFAULT_MODEL, QUESTION, 0), "max_tokens"));
    let mut r = request("cloud-5", DEFAULT_MODEL, QUESTION, 4);
    r.messages.clear();
    cases.push((r, "messages"));
    let mut r = request("cloud-6", DEFAULT_MODEL, QUESTION, 4);
    r.timeout_ms = Some(0);
    cases.push((r, "timeout_ms"));
    let mut r = request("cloud-7", DEFAULT_MODEL, QUESTION, 4);
    r.messages[0].parts.push(pb::ContentPart {
        kind: Some(pb::content_part::Kind::Image(pb::Image {
            data: vec![0x89, b'P', b'N', b'G'],
            mime_type: "image/png".into(),
            source: "camera/front".into(),
        })),
    });
    cases.push((r, "images"));
    let mut r = request("cloud-8", DEFAULT_MODEL, QUESTION, 4);
    r.top_p = Some(1.5);
    cases.push((r, "top_p"));
    for (req, field) in cases {
        let err = run(&mut client, req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }

    // A deadline too short for any answer.
    let mut r = request("cloud-9", DEFAULT_MODEL, QUESTION, 64);
    r.timeout_ms = Some(1);
    let err = run(&mut client, r).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("deadline"), "{}", err.message());
    // A failed request is not stored: the id can be used again.
    let (_, _, c) = run(&mut client, request("cloud-9", DEFAULT_MODEL, QUESTION, 4))
        .await
        .unwrap();
    assert!(!c.replayed);

    // Drain: new requests are refused.
    let state = server.state.clone();
    server.shutdown(Duration::from_secs(5)).await;
    assert!(state.is_draining());
    assert_eq!(state.in_system(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_backend_fronts_a_real_openai_compatible_server() {
    // The upstream: ferryd's OpenAI-compatible HTTP API, with a bearer token required.
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("{}\n", ferry_core::token::token_line("cloud", "tok-cloud")),
    )
    .unwrap();
    let tf = tokens.clone();
    let edge = TestServer::start(move |c| c.auth.tokens_file = Some(tf)).await;
    // SAFETY: set once, before anything in this process reads it.
    #[allow(unsafe_code, clippy::disallowed_methods)]
    unsafe {
        std::env::set_var(KEY_VAR, "tok-cloud")
    };
    let upstream = format!("http://{}/v1", edge.server.http_addr.expect("HTTP enabled"));
    let fronting = |id: &str, upstream_model: &str, stream: bool| {
        let mut m = model(id, BackendKind::Openai);
        m.base_url = Some(upstream.clone());
        m.upstream_model = Some(upstream_model.to_string());
        m.api_key_env = Some(KEY_VAR.to_string());
        m.stream = stream;
        m.usd_per_million_tokens = Some(2.0);
        m.joules_per_token = Some(0.25);
        m
    };
    let mut vision = fronting("edge-vision", DEFAULT_MODEL, true);
    vision.capabilities = Some(vec!["text".into(), "image".into()]);
    let mut no_key = fronting("edge-no-key", DEFAULT_MODEL, true);
    no_key.api_key_env = None;
    let mut closed = model("closed", BackendKind::Openai);
    closed.base_url = Some(format!("http://127.0.0.1:{}/v1", free_port()));
    closed.connect_timeout_ms = 500;
    let server = CloudServer::start(cloud_config(vec![
        fronting("edge-sse", DEFAULT_MODEL, true),
        fronting("edge-whole", DEFAULT_MODEL, false),
        fronting("edge-unknown", "no-such-model", true),
        closed,
        vision,
        no_key,
    ]))
    .await
    .expect("ferry-cloud starts");
    let mut client = connect(&server).await;

    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let ids: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "edge-sse",
            "edge-whole",
            "edge-unknown",
            "closed",
            "edge-vision",
            "edge-no-key"
        ]
    );
    assert_eq!(models[4].capabilities, vec!["text", "image"]);
    assert_eq!(models[0].capabilities, vec!["text"]);
    assert_eq!(models[0].joules_per_token, Some(0.25));
    assert_eq!(models[0].usd_per_million_tokens, Some(2.0));

    // What the upstream itself answers, for comparison.
    let edge_addr = format!("http://{}", edge.server.local_addr);
    let mut edge_client = ferry_cli::client::inference_with_token(&edge_addr, Some("tok-cloud"))
        .await
        .unwrap();
    let direct = ferry_integration::run(&mut edge_client, {
        let mut r = ferry_integration::greedy(QUESTION, 12);
        r.model = DEFAULT_MODEL.into();
        r
    })
    .await
    .unwrap();

    // Streamed over SSE from the upstream, re-streamed over gRPC.
    let (text, deltas, c) = run(&mut client, request("oa-1", "edge-sse", QUESTION, 12))
        .await
        .unwrap();
    assert_eq!(text, direct.0, "same greedy answer through the cloud tier");
    assert!(deltas >= 2, "streamed, got {deltas} deltas");
    assert_eq!(
        (c.model.as_str(), c.backend.as_str()),
        ("edge-sse", "openai")
    );
    let usage = c.usage.unwrap();
    assert_eq!(usage, direct.2.usage.unwrap(), "the upstream's usage");
    let tokens = f64::from(usage.prompt_tokens + usage.completion_tokens);
    let energy = c.energy.unwrap();
    assert_eq!(energy.source, "hint");
    assert!((energy.joules.unwrap() - 0.25 * tokens).abs() < 1e-9);
    assert!((c.cost_usd.unwrap() - 2.0 * tokens / 1e6).abs() < 1e-12);
    assert_eq!(
        c.finish_reason,
        pb::FinishReason::try_from(direct.2.finish_reason)
            .map(|f| match f {
                pb::FinishReason::StopSequence => pb::FinishReason::Stop,
                f => f,
            })
            .unwrap() as i32
    );

    // Non-streaming upstream call: one delta with the whole answer, same accounting.
    let (whole, deltas, c) = run(&mut client, request("oa-2", "edge-whole", QUESTION, 12))
        .await
        .unwrap();
    assert_eq!(whole, direct.0);
    assert_eq!(deltas, 1);
    assert_eq!(c.usage.unwrap(), usage);

    // The upstream does not know the model: its 404 is NOT_FOUND here, with its message.
    let err = run(&mut client, request("oa-3", "edge-unknown", QUESTION, 4))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("no-such-model") && err.message().contains("404"),
        "{}",
        err.message()
    );

    // Nothing listens on the upstream's port: UNAVAILABLE.
    let err = run(&mut client, request("oa-4", "closed", QUESTION, 4))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("cannot reach"), "{}", err.message());

    // The upstream refuses ferry-cloud's missing credentials: nothing the edge can fix, so the
    // cloud tier is UNAVAILABLE, and the message says why.
    let err = run(&mut client, request("oa-7", "edge-no-key", QUESTION, 4))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("401"), "{}", err.message());

    // Images go upstream as data: URL content parts, which the upstream accepts.
    let mut r = request("oa-8", "edge-vision", QUESTION, 4);
    r.messages[0].parts.push(pb::ContentPart {
        kind: Some(pb::content_part::Kind::Image(pb::Image {
            data: vec![0x89, b'P', b'N', b'G', 0, 1, 2, 3],
            mime_type: "image/png".into(),
            source: "camera/front".into(),
        })),
    });
    let (_, _, c) = run(&mut client, r.clone()).await.unwrap();
    assert_eq!(c.model, "edge-vision");
    // A text-only model refuses them before anything is sent.
    r.request_id = "oa-9".into();
    r.model = "edge-sse".into();
    let err = run(&mut client, r).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // Bad input the upstream would also refuse is refused before it is sent.
    let mut r = request("oa-5", "edge-sse", QUESTION, 4);
    r.temperature = Some(-1.0);
    let err = run(&mut client, r).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // A deadline shorter than the upstream's answer.
    let mut r = request(
        "oa-6",
        "edge-sse",
        "Tell me a long story about a ferry.",
        200,
    );
    r.timeout_ms = Some(5);
    let err = run(&mut client, r).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");

    server.shutdown(Duration::from_secs(5)).await;
}

/// The real `ferry-cloud` process: the sample config with flag and environment overrides, health,
/// and SIGTERM letting an in-flight stream finish before it exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_cloud_binary_serves_the_sample_config_and_drains_on_sigterm() {
    use std::process::{Command, Stdio};

    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let port = free_port();
    let mut child = Child(
        Command::new(ferry_integration::binary("ferry-cloud"))
            .current_dir(repo_root())
            .args(["--config", "configs/cloud.toml"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("FERRY_CLOUD_MODEL_DIR", model_dir())
            .env("FERRY_CLOUD_SHUTDOWN_GRACE_S", "600")
            .env("FERRY_CLOUD_HTTP_ADDR", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ferry-cloud starts"),
    );
    let addr = format!("http://127.0.0.1:{port}");
    let mut serving = false;
    for _ in 0..600 {
        if let Ok(ch) = Channel::from_shared(addr.clone()).unwrap().connect().await {
            if let Ok(r) = HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: "ferry.v1.Offload".into(),
                })
                .await
            {
                if r.into_inner().status == ServingStatus::Serving as i32 {
                    serving = true;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(serving, "ferry-cloud at {addr} never became ready");
    let mut client = OffloadClient::connect(addr.clone()).await.unwrap();
    let ids: Vec<String> = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(
        ids,
        [SAMPLE_CLOUD_MODEL, "llama-3.1-8b-instruct"],
        "the sample zoo"
    );

    // SIGTERM once a long stream has sent its first delta: the drain starts (health
    // NOT_SERVING), a request arriving now is refused at once, and the stream still completes,
    // however slow the machine: the grace (600 s here) bounds the drain, not the test's pace,
    // and every step waits for an event, never for a fixed time.
    let mut stream = client
        .generate(request("bin-1", SAMPLE_CLOUD_MODEL, LONG_PROMPT, 64))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(pb::offload_response::Event::Delta(_))
    ));
    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    ferry_integration::wait_not_serving(&addr, "ferry.v1.Offload").await;
    let late = client
        .generate(request("bin-2", SAMPLE_CLOUD_MODEL, "Hello.", 4))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::Unavailable, "{late:?}");
    assert!(late.message().contains("shutting down"), "{late:?}");
    let mut deltas = 1u32;
    let mut completion = None;
    while let Some(item) = stream.next().await {
        match item.unwrap().event {
            Some(pb::offload_response::Event::Delta(_)) => deltas += 1,
            Some(pb::offload_response::Event::Completion(c)) => completion = Some(c),
            None => {}
        }
    }
    let c = completion.expect("the in-flight stream finished after SIGTERM");
    assert_eq!(c.request_id, "bin-1");
    // It was still generating when the late request was refused: the drain waited for it.
    assert!(c.usage.unwrap().completion_tokens > 20, "{c:?}");
    assert!(deltas > 1);
    let status = tokio::task::spawn_blocking(move || {
        let s = child.0.wait().unwrap();
        std::mem::forget(child);
        s
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status:?}");
}
