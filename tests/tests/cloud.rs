//! ferry-cloud on loopback: the Offload gRPC API over the candle backend with the bundled
//! SmolLM2, including bad input and deadlines.

use std::time::Duration;

use ferry_cloud::{BackendKind, CloudConfig, CloudServer, ModelConfig};
use ferry_integration::{model_dir, repo_root, DEFAULT_MODEL};
use ferry_proto::v1 as pb;
use futures::StreamExt;
use pb::offload_client::OffloadClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const QUESTION: &str = "Name three colours of the rainbow.";

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
