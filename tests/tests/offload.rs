//! ferryd offloading to ferry-cloud over loopback, both real (ferry-cloud in process with the
//! bundled SmolLM2 standing in for a large model, or the real binary where it must be killed),
//! and the failures the offload path must survive, each ending with a terminal outcome for every
//! request: the cloud gone before the request (fallback to local), killed mid-stream (a defined
//! error with the accounting of what was delivered), slower than the deadline (fallback, or
//! DEADLINE_EXCEEDED as configured), a flapping endpoint (the circuit opens and closes), an
//! app that leaves (the cloud request is cancelled too), and a cloud behind a link much slower
//! than the placement policy's profile (no dialogue overdraws its latency budget).

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_cloud::{CloudConfig, CloudServer, ModelConfig};
use ferry_edge::cloud::OnDeadline;
use ferry_edge::EdgeConfig;
use ferry_integration::{
    binary, free_port, greedy, model_dir, repo_root, run, slow_link, variable_link, TestServer,
    DEFAULT_MODEL,
};
use ferry_proto::v1 as pb;
use ferry_router::tmo::Serve;
use futures::StreamExt;

/// The bundled SmolLM2 served by ferry-cloud under a cloud id.
const CLOUD_MODEL: &str = "cloud-smollm2";
const QUESTION: &str = "Name three colours of the rainbow.";
/// A prompt that keeps a small model talking for hundreds of tokens.
const LONG: &str = ferry_integration::LONG_PROMPT;

fn candle_model(id: &str) -> ModelConfig {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "backend": "candle",
        "manifest": DEFAULT_MODEL,
        "usd_per_million_tokens": 0.2,
    }))
    .unwrap()
}

fn cloud_config(listen: &str, models: Vec<ModelConfig>) -> CloudConfig {
    let mut c = CloudConfig::default();
    c.server.listen = listen.parse().unwrap();
    c.server.shutdown_grace_s = 1;
    c.server.http_addr = "127.0.0.1:0".parse().unwrap();
    c.candle.manifest_dir = repo_root().join("models");
    c.candle.model_dir = model_dir();
    c.models = models;
    c
}

async fn start_cloud(listen: &str) -> CloudServer {
    CloudServer::start(cloud_config(listen, vec![candle_model(CLOUD_MODEL)]))
        .await
        .expect("ferry-cloud starts")
}

fn with_cloud(c: &mut EdgeConfig, endpoint: String) {
    c.cloud.endpoints = vec![endpoint];
    // Probes only at start (to list the zoo): the tests drive the circuit with requests.
    c.cloud.health_interval_ms = 600_000;
}

/// ferry-cloud in process with the cloud model, and ferryd offloading to it, once ferryd lists it.
async fn cloud_and_edge() -> (CloudServer, TestServer) {
    let cloud = start_cloud("127.0.0.1:0").await;
    let endpoint = format!("http://{}", cloud.local_addr);
    let mut t = TestServer::start(|c| with_cloud(c, endpoint)).await;
    wait_for_cloud_model(&mut t.client, CLOUD_MODEL).await;
    (cloud, t)
}

/// Waits until ferryd lists `model` as a cloud model.
async fn wait_for_cloud_model(client: &mut ferry_cli::client::Client, model: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let models = client
            .list_models(pb::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models;
        if models
            .iter()
            .any(|m| m.id == model && m.tier == pb::Tier::Cloud as i32)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ferryd never listed {model}: {models:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn named(model: &str, text: &str, max_tokens: u32) -> pb::GenerateRequest {
    let mut r = greedy(text, max_tokens);
    r.model = model.into();
    r
}

async fn status(t: &mut TestServer) -> pb::StatusResponse {
    t.client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Polls ferryd's Status until `done` holds (then returns it), failing with `what` after 20 s.
async fn wait_for_status(
    t: &mut TestServer,
    what: &str,
    done: impl Fn(&pb::StatusResponse) -> bool,
) -> pb::StatusResponse {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(t).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_streams_from_ferry_cloud_and_both_tiers_are_listed() {
    let (cloud, mut t) = cloud_and_edge().await;

    let models = t
        .client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let local = models.iter().find(|m| m.id == DEFAULT_MODEL).unwrap();
    assert_eq!(local.tier, pb::Tier::Local as i32);
    let remote = models.iter().find(|m| m.id == CLOUD_MODEL).unwrap();
    assert_eq!(remote.tier, pb::Tier::Cloud as i32);
    assert_eq!(remote.usd_per_million_tokens, Some(0.2));

    let (text, deltas, done) = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 24))
        .await
        .unwrap();
    assert!(deltas >= 2, "streamed, got {deltas} deltas");
    assert_eq!(done.tier, pb::Tier::Cloud as i32);
    assert_eq!(done.model, CLOUD_MODEL);
    let p = done.placement.clone().unwrap();
    assert!(!p.fallback, "{p:?}");
    assert!(p.reason.contains("named by the request"), "{}", p.reason);
    let energy = done.energy.clone().unwrap();
    assert!(
        energy.joules.is_some_and(|j| j > 0.0),
        "cloud energy: {energy:?}"
    );
    let usage = done.usage.unwrap();
    let cost = done.cost_usd.expect("the cloud model is priced");
    let expected = 0.2 * f64::from(usage.prompt_tokens + usage.completion_tokens) / 1e6;
    assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");

    // The same weights locally, greedy: the same words, so the offload forwarded faithfully.
    let (local_text, _, local_done) = run(&mut t.client, named(DEFAULT_MODEL, QUESTION, 24))
        .await
        .unwrap();
    assert_eq!(local_done.tier, pb::Tier::Local as i32);
    assert_eq!(text, local_text);

    // Feedback reaches the offloaded request's record.
    t.client
        .feedback(pb::FeedbackRequest {
            request_id: done.request_id.clone(),
            satisfied: true,
            score: None,
        })
        .await
        .unwrap();

    let s = status(&mut t).await;
    let e = &s.cloud_endpoints[0];
    assert!(e.healthy && e.circuit == "closed", "{e:?}");
    assert_eq!(e.models, vec![CLOUD_MODEL]);
    assert_eq!(e.in_flight, 0);

    // A name neither tier knows.
    let err = run(&mut t.client, named("no-such-model", QUESTION, 4))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    cloud.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_gone_before_the_request_falls_back_to_local() {
    let (cloud, mut t) = cloud_and_edge().await;
    cloud.shutdown(Duration::from_millis(100)).await;

    let (text, _, done) = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 12))
        .await
        .expect("the request still gets an answer");
    assert!(!text.trim().is_empty());
    assert_eq!(done.tier, pb::Tier::Local as i32);
    let p = done.placement.unwrap();
    assert!(p.fallback, "{p:?}");
    assert!(
        p.reason.contains("fallback to local: unavailable"),
        "{}",
        p.reason
    );
    let stats = &t.server.state.stats;
    assert_eq!(stats.requests_completed.load(Ordering::Relaxed), 1);
    assert_eq!(stats.requests_failed.load(Ordering::Relaxed), 0);
    assert_eq!(t.server.state.cloud.as_ref().unwrap().in_flight(), 0);
}

/// A running ferry-cloud process, killed on drop.
struct CloudProcess(std::process::Child);

impl Drop for CloudProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_cloud_binary(port: u16, dir: &std::path::Path) -> CloudProcess {
    let mut cfg = cloud_config(
        &format!("127.0.0.1:{port}"),
        vec![candle_model(CLOUD_MODEL)],
    );
    cfg.energy.sources = vec!["estimate".into()];
    let path = dir.join("cloud.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let child = Command::new(binary("ferry-cloud"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ferry-cloud starts");
    CloudProcess(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_killed_mid_stream_ends_with_a_defined_error_and_the_accounting() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cloud = spawn_cloud_binary(port, dir.path());
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut t = TestServer::start(|c| {
        with_cloud(c, endpoint);
        // The binary loads its model after ferryd starts: probe until it lists it.
        c.cloud.health_interval_ms = 200;
    })
    .await;
    wait_for_cloud_model(&mut t.client, CLOUD_MODEL).await;

    let mut stream = t
        .client
        .generate(named(CLOUD_MODEL, LONG, 400))
        .await
        .unwrap()
        .into_inner();
    let mut deltas = 0u64;
    let mut bytes = 0u64;
    let mut killed = false;
    let status = loop {
        match stream.next().await {
            Some(Ok(pb::GenerateResponse {
                event: Some(pb::generate_response::Event::Delta(d)),
            })) => {
                deltas += 1;
                bytes += d.text.len() as u64;
                if deltas == 5 && !killed {
                    cloud.0.kill().unwrap();
                    cloud.0.wait().unwrap();
                    killed = true;
                }
            }
            Some(Ok(other)) => panic!("the cloud was killed, yet: {other:?}"),
            Some(Err(s)) => break s,
            None => panic!("the stream ended without a status"),
        }
    };
    assert!(killed);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("interrupted"),
        "{}",
        status.message()
    );
    let md = status.metadata();
    let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(get("x-ferry-tier").as_deref(), Some("cloud"));
    assert_eq!(get("x-ferry-model").as_deref(), Some(CLOUD_MODEL));
    // Exactly what reached the app, nothing duplicated or lost.
    assert_eq!(get("x-ferry-delivered-deltas"), Some(deltas.to_string()));
    assert_eq!(get("x-ferry-delivered-bytes"), Some(bytes.to_string()));

    let state = &t.server.state;
    assert_eq!(state.stats.requests_failed.load(Ordering::Relaxed), 1);
    assert_eq!(state.cloud.as_ref().unwrap().in_flight(), 0);
}

/// Accepts connections and never answers: an upstream engine that hangs.
async fn black_hole() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slower_than_the_deadline_falls_back_or_fails_as_configured() {
    let hole = black_hole().await;
    let slow: ModelConfig = serde_json::from_value(serde_json::json!({
        "id": "slow-model",
        "backend": "openai",
        "base_url": format!("http://{hole}/v1"),
        "read_timeout_ms": 60_000,
    }))
    .unwrap();
    let cloud = CloudServer::start(cloud_config("127.0.0.1:0", vec![slow]))
        .await
        .unwrap();
    let endpoint = format!("http://{}", cloud.local_addr);

    // Fallback (the default).
    let e = endpoint.clone();
    let mut t = TestServer::start(move |c| {
        with_cloud(c, e);
        c.cloud.request_timeout_ms = 800;
    })
    .await;
    wait_for_cloud_model(&mut t.client, "slow-model").await;
    let started = Instant::now();
    let (_, _, done) = run(&mut t.client, named("slow-model", QUESTION, 8))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert_eq!(done.tier, pb::Tier::Local as i32);
    let p = done.placement.unwrap();
    assert!(
        p.fallback && p.reason.contains("deadline") && p.reason.contains("no first token within"),
        "{p:?}"
    );
    drop(t);

    // DEADLINE_EXCEEDED instead.
    let mut t = TestServer::start(move |c| {
        with_cloud(c, endpoint);
        c.cloud.request_timeout_ms = 800;
        c.cloud.on_deadline = OnDeadline::Error;
    })
    .await;
    wait_for_cloud_model(&mut t.client, "slow-model").await;
    let err = run(&mut t.client, named("slow-model", QUESTION, 8))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    let stats = &t.server.state.stats;
    assert_eq!(stats.requests_failed.load(Ordering::Relaxed), 1);
    assert_eq!(stats.requests_completed.load(Ordering::Relaxed), 0);
    cloud.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_endpoint_opens_and_closes_its_circuit() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let cloud = start_cloud(&listen).await;
    let mut t = TestServer::start(|c| {
        with_cloud(c, format!("http://{listen}"));
        c.cloud.failure_threshold = 2;
        // Long enough that the next request surely finds it open on a loaded CI machine.
        c.cloud.open_ms = 6_000;
    })
    .await;
    wait_for_cloud_model(&mut t.client, CLOUD_MODEL).await;
    let tier = |d: &pb::Completion| d.tier;

    let (_, _, d) = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 4))
        .await
        .unwrap();
    assert_eq!(tier(&d), pb::Tier::Cloud as i32);

    cloud.shutdown(Duration::from_millis(100)).await;
    for _ in 0..2 {
        let (_, _, d) = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 4))
            .await
            .unwrap();
        let p = d.placement.unwrap();
        assert!(p.fallback && p.reason.contains("unavailable"), "{p:?}");
    }
    let s = status(&mut t).await;
    assert_eq!(
        s.cloud_endpoints[0].circuit, "open",
        "{:?}",
        s.cloud_endpoints
    );
    assert_eq!(s.cloud_endpoints[0].circuit_opened_total, 1);

    // While open, the endpoint is not even tried.
    let (_, _, d) = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 4))
        .await
        .unwrap();
    let p = d.placement.unwrap();
    assert!(p.fallback && p.reason.contains("circuit open"), "{p:?}");

    // Back up; after open_ms one trial goes through and closes the circuit.
    let cloud = start_cloud(&listen).await;
    tokio::time::sleep(Duration::from_millis(6_100)).await;
    let (_, _, d) = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 4))
        .await
        .unwrap();
    assert_eq!(tier(&d), pb::Tier::Cloud as i32, "{:?}", d.placement);
    let s = status(&mut t).await;
    assert_eq!(s.cloud_endpoints[0].circuit, "closed");

    let stats = &t.server.state.stats;
    assert_eq!(stats.requests_completed.load(Ordering::Relaxed), 5);
    assert_eq!(stats.requests_failed.load(Ordering::Relaxed), 0);
    cloud.shutdown(Duration::from_millis(100)).await;
}

/// A cloud whose only slot is taken: an offload queued there past its budget falls back with
/// the cloud's own "busy" answer, and a busy endpoint is not a failing one — its circuit stays
/// closed even at `failure_threshold = 1`, and the next offload goes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_cloud_is_fallen_back_from_without_opening_its_circuit() {
    let mut cc = cloud_config("127.0.0.1:0", vec![candle_model(CLOUD_MODEL)]);
    cc.server.max_concurrent = 1;
    let cloud = CloudServer::start(cc).await.expect("ferry-cloud starts");
    let endpoint = format!("http://{}", cloud.local_addr);
    let e = endpoint.clone();
    let mut t = TestServer::start(move |c| {
        with_cloud(c, e);
        c.cloud.failure_threshold = 1;
        c.cloud.request_timeout_ms = 1_500;
    })
    .await;
    wait_for_cloud_model(&mut t.client, CLOUD_MODEL).await;

    // Another edge's long generation holds the slot.
    let mut direct = ferry_proto::v1::offload_client::OffloadClient::connect(endpoint)
        .await
        .unwrap();
    let long = pb::OffloadRequest {
        request_id: "other-edge".into(),
        model: CLOUD_MODEL.into(),
        messages: vec![pb::Message {
            role: pb::Role::User as i32,
            parts: vec![pb::ContentPart {
                kind: Some(pb::content_part::Kind::Text(LONG.into())),
            }],
        }],
        max_tokens: Some(400),
        temperature: Some(0.0),
        ..Default::default()
    };
    let mut held = direct.generate(long).await.unwrap().into_inner();
    assert!(
        held.message().await.unwrap().is_some(),
        "the long request runs"
    );

    let (_, _, d) = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 4))
        .await
        .unwrap();
    assert_eq!(d.tier, pb::Tier::Local as i32);
    let p = d.placement.unwrap();
    assert!(
        p.fallback
            && p.reason.contains("fallback to local: busy")
            && p.reason.contains("RESOURCE_EXHAUSTED: no slot free"),
        "{p:?}"
    );
    let s = status(&mut t).await;
    assert_eq!(
        (
            s.cloud_endpoints[0].circuit.as_str(),
            s.cloud_endpoints[0].circuit_opened_total
        ),
        ("closed", 0),
        "{:?}",
        s.cloud_endpoints
    );
    // Once the slot is free the next offload is served there. (An attempt admitted while the
    // long generation was still winding down can run out of its 1.5 s budget mid-stream on a
    // loaded machine — CI runs these tests two at a time on two cores — and ends with
    // DEADLINE_EXCEEDED and the accounting; that is the documented outcome, so try again.)
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let last = match run(&mut t.client, named(CLOUD_MODEL, QUESTION, 4)).await {
            Ok((_, _, d)) if d.tier == pb::Tier::Cloud as i32 => break,
            Ok((_, _, d)) => format!("{:?}", d.placement),
            Err(e) if e.code() == tonic::Code::DeadlineExceeded => e.message().to_string(),
            Err(e) => panic!("{e:?}"),
        };
        assert!(Instant::now() < deadline, "never offloaded again: {last}");
    }
    cloud.shutdown(Duration::from_millis(100)).await;
}

/// A cloud that answers its health probes late (busy, not down) keeps its place until
/// `failure_threshold` probes in a row went unanswered; then offloads fall back, and the reason
/// says what the probes saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_health_answers_count_only_in_a_row() {
    let cloud = start_cloud("127.0.0.1:0").await;
    let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let link = variable_link(cloud.local_addr, delay_ms.clone()).await;
    let mut t = TestServer::start(move |c| {
        with_cloud(c, format!("http://{link}"));
        c.cloud.health_interval_ms = 100;
        c.cloud.health_timeout_ms = 400;
        c.cloud.failure_threshold = 3;
    })
    .await;
    wait_for_cloud_model(&mut t.client, CLOUD_MODEL).await;
    delay_ms.store(1_000, Ordering::Relaxed);
    // Each late probe takes its 400 ms timeout, so every count is visible to 100 ms polls.
    let late = |n: u32| format!("no health answer within 400 ms ({n} in a row)");
    for n in 1..=2 {
        wait_for_status(&mut t, &format!("late probe {n} while healthy"), |s| {
            let e = &s.cloud_endpoints[0];
            e.healthy && e.last_error.contains(&late(n))
        })
        .await;
    }
    wait_for_status(&mut t, "unhealthy after the third", |s| {
        !s.cloud_endpoints[0].healthy
    })
    .await;
    let (_, _, d) = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 2))
        .await
        .unwrap();
    let p = d.placement.unwrap();
    assert!(
        p.fallback
            && p.reason.contains("no healthy endpoint")
            && p.reason.contains("no health answer within 400 ms"),
        "{p:?}"
    );
    // Answers in time again: healthy at the next probe.
    delay_ms.store(0, Ordering::Relaxed);
    wait_for_status(&mut t, "healthy again", |s| s.cloud_endpoints[0].healthy).await;
    cloud.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_leaves_cancels_the_cloud_request() {
    let (cloud, mut t) = cloud_and_edge().await;

    let mut req = named(CLOUD_MODEL, LONG, 1_500);
    req.request_id = "leaves-early".into();
    let mut stream = t.client.generate(req).await.unwrap().into_inner();
    for _ in 0..3 {
        match stream.next().await {
            Some(Ok(pb::GenerateResponse {
                event: Some(pb::generate_response::Event::Delta(_)),
            })) => {}
            other => panic!("expected a delta, got {other:?}"),
        }
    }
    assert_eq!(cloud.state.in_system(), 1, "the cloud is generating");
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while cloud.state.in_system() > 0 {
        assert!(
            Instant::now() < deadline,
            "the cloud request was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not finished on the cloud: the same id runs again rather than replaying a stored answer.
    let mut direct =
        pb::offload_client::OffloadClient::connect(format!("http://{}", cloud.local_addr))
            .await
            .unwrap();
    let mut again = direct
        .generate(pb::OffloadRequest {
            request_id: "leaves-early".into(),
            model: CLOUD_MODEL.into(),
            messages: vec![ferry_integration::msg(pb::Role::User, QUESTION)],
            max_tokens: Some(2),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut replayed = None;
    while let Some(m) = again.next().await {
        if let Some(pb::offload_response::Event::Completion(c)) = m.unwrap().event {
            replayed = Some(c.replayed);
        }
    }
    assert_eq!(
        replayed,
        Some(false),
        "the cancelled request had been stored as finished"
    );
    assert_eq!(t.server.state.cloud.as_ref().unwrap().in_flight(), 0);
    cloud.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_over_mutual_tls_with_a_token_and_edges_without_credentials_are_refused() {
    use ferry_cli::certs::{self, DevCertsOptions};
    let dir = tempfile::tempdir().unwrap();
    // `ferry certs dev`, through the library behind it.
    let dev = certs::write_dev_certs(&DevCertsOptions {
        out: dir.path().join("dev"),
        days: 2,
        ..DevCertsOptions::default()
    })
    .unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("{}\n", ferry_core::token::token_line("edge-1", "tok-edge")),
    )
    .unwrap();
    let mut cfg = cloud_config("127.0.0.1:0", vec![candle_model(CLOUD_MODEL)]);
    cfg.tls.cert_file = Some(dev.path(certs::CLOUD_CERT));
    cfg.tls.key_file = Some(dev.path(certs::CLOUD_KEY));
    cfg.tls.client_ca_file = Some(dev.path(certs::CA_CERT));
    cfg.auth.tokens_file = Some(tokens);
    let cloud = CloudServer::start(cfg).await.unwrap();
    let endpoint = format!("https://localhost:{}", cloud.local_addr.port());
    let token_file = dir.path().join("edge-token");
    std::fs::write(&token_file, "tok-edge\n").unwrap();

    // The edge as configured for production: CA, client certificate, token.
    let tls = |c: &mut EdgeConfig, cert: bool, token: &std::path::Path| {
        with_cloud(c, endpoint.clone());
        c.cloud.ca_file = Some(dev.path(certs::CA_CERT));
        if cert {
            c.cloud.cert_file = Some(dev.path(certs::EDGE_CERT));
            c.cloud.key_file = Some(dev.path(certs::EDGE_KEY));
        }
        c.cloud.token_file = Some(token.to_path_buf());
    };
    let mut t = TestServer::start(|c| tls(c, true, &token_file)).await;
    wait_for_cloud_model(&mut t.client, CLOUD_MODEL).await;
    let (text, deltas, done) = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 12))
        .await
        .unwrap();
    assert!(!text.trim().is_empty() && deltas >= 2);
    assert_eq!(done.tier, pb::Tier::Cloud as i32, "{:?}", done.placement);
    drop(t);

    // A wrong token: ferry-cloud refuses to list its zoo (health stays open), and Status says why.
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let mut t = TestServer::start(|c| {
        tls(c, true, &wrong);
    })
    .await;
    let s = wait_for_status(&mut t, "a wrong token was let in", |s| {
        s.cloud_endpoints[0].last_error.contains("UNAUTHENTICATED")
    })
    .await;
    assert!(s.cloud_endpoints[0].models.is_empty());
    let err = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 4))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::NotFound,
        "no endpoint lists it: {err:?}"
    );
    drop(t);

    // No client certificate: the handshake fails, the probe says so.
    let mut t = TestServer::start(|c| tls(c, false, &token_file)).await;
    let s = wait_for_status(&mut t, "a client without a certificate was let in", |s| {
        !s.cloud_endpoints[0].healthy
    })
    .await;
    assert!(s.cloud_endpoints[0].models.is_empty());
    cloud.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmo_places_auto_requests_in_the_cloud_and_mess_plus_picks_the_cloud_model() {
    let dir = tempfile::tempdir().unwrap();
    let policy_file = dir.path().join("placement.safetensors");
    ferry_integration::train_policy("rc-a2c", &policy_file);
    let tasks = {
        let bytes = std::fs::read(&policy_file).unwrap();
        ferry_router::tmo::PlacementPolicy::from_bytes(&bytes)
            .unwrap()
            .meta()
            .tasks
            .clone()
    };
    // Two cloud models (the same weights at two prices) so MESS+ has a zoo to route over.
    let mut cheap = candle_model("cloud-cheap");
    cheap.usd_per_million_tokens = Some(0.1);
    let mut dear = candle_model("cloud-dear");
    dear.usd_per_million_tokens = Some(0.5);
    let cloud = CloudServer::start(cloud_config("127.0.0.1:0", vec![dear, cheap]))
        .await
        .unwrap();
    let endpoint = format!("http://{}", cloud.local_addr);
    let mut t = TestServer::start(|c| {
        with_cloud(c, endpoint);
        c.placement.policy_file = Some(policy_file);
        c.router.enabled = true;
        c.router.policy = "mess-plus-fb".into();
        // Explore at the first routed request: every cloud model runs, the dearest serves.
        c.router.c = 1.0;
    })
    .await;
    wait_for_cloud_model(&mut t.client, "cloud-cheap").await;

    let mut cloud_turns = 0;
    for (i, task) in tasks.iter().enumerate() {
        let mut req = greedy(QUESTION, 4);
        req.task = task.clone();
        req.dialogue_id = format!("d-{i}");
        let (_, _, done) = run(&mut t.client, req).await.unwrap();
        let p = done.placement.unwrap();
        assert!(!p.fallback, "{p:?}");
        if p.reason.contains("cloud with") {
            cloud_turns += 1;
            assert_eq!(done.tier, pb::Tier::Cloud as i32, "{p:?}");
            assert!(p.reason.contains("cloud mess-plus-fb"), "{}", p.reason);
            assert!(done.model.starts_with("cloud-"), "{}", done.model);
        } else {
            assert_eq!(done.tier, pb::Tier::Local as i32, "{p:?}");
        }
    }
    assert!(
        cloud_turns > 0,
        "the policy placed no task in the cloud: {tasks:?}"
    );
    let s = status(&mut t).await;
    let r = s
        .routers
        .iter()
        .find(|r| r.tier == pb::Tier::Cloud as i32)
        .expect("a cloud router");
    // Ascending price; the first routed request explored, so both cloud models have run.
    let zoo: Vec<&str> = r.models.iter().map(|m| m.model.as_str()).collect();
    assert_eq!(zoo, vec!["cloud-cheap", "cloud-dear"]);
    assert!(r.explored >= 1 && r.requests == cloud_turns, "{r:?}");
    wait_for_status(&mut t, "exploration never measured the cloud zoo", |s| {
        s.routers
            .iter()
            .filter(|r| r.tier == pb::Tier::Cloud as i32)
            .all(|r| r.models.iter().all(|m| m.mean_joules.is_some()))
    })
    .await;
    cloud.shutdown(Duration::from_millis(100)).await;
}

/// Out of the box: the sample configs, as shipped, offload to each other over loopback (only the
/// ports are moved off the defaults so tests can run side by side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_configs_offload_to_each_other_out_of_the_box() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_port = free_port();
    let edge_port = free_port();
    let _cloud = CloudProcess(
        Command::new(binary("ferry-cloud"))
            .current_dir(repo_root())
            .args(["--config", "configs/cloud.toml"])
            .args(["--listen", &format!("127.0.0.1:{cloud_port}")])
            .env("FERRY_CLOUD_MODEL_DIR", model_dir())
            .env("FERRY_CLOUD_HTTP_ADDR", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _edge = CloudProcess(
        Command::new(binary("ferryd"))
            .current_dir(repo_root())
            .args(["--config", "configs/edge.toml"])
            .args(["--grpc-addr", &format!("127.0.0.1:{edge_port}")])
            .args(["--http-addr", "127.0.0.1:0"])
            .args([
                "--cloud-endpoints",
                &format!("http://127.0.0.1:{cloud_port}"),
            ])
            .arg("--state-dir")
            .arg(dir.path())
            .env("FERRY_MODEL_DIR", model_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = format!("http://127.0.0.1:{edge_port}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut client = loop {
        if let Ok(mut c) = ferry_cli::client::inference(&addr).await {
            if let Ok(r) = c.status(pb::StatusRequest {}).await {
                let s = r.into_inner();
                if s.ready
                    && s.models
                        .iter()
                        .any(|m| m.id == "smollm2-135m-instruct-cloud")
                {
                    break c;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "ferryd never listed the sample cloud zoo"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (text, _, done) = run(
        &mut client,
        named("smollm2-135m-instruct-cloud", QUESTION, 12),
    )
    .await
    .unwrap();
    assert!(!text.trim().is_empty());
    assert_eq!(done.tier, pb::Tier::Cloud as i32, "{:?}", done.placement);
    // The sample zoo's vLLM model is not running here: UNAVAILABLE, so ferryd answers locally.
    let (_, _, done) = run(&mut client, named("llama-3.1-8b-instruct", QUESTION, 4))
        .await
        .unwrap();
    assert_eq!(done.tier, pb::Tier::Local as i32);
    let p = done.placement.unwrap();
    assert!(
        p.fallback && p.reason.contains("fallback to local"),
        "{p:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_endpoints_share_the_load_and_a_dead_one_is_retried_on_the_other() {
    let a = start_cloud("127.0.0.1:0").await;
    let b = start_cloud("127.0.0.1:0").await;
    let endpoints = vec![
        format!("http://{}", a.local_addr),
        format!("http://{}", b.local_addr),
    ];
    let mut t = TestServer::start(move |c| {
        with_cloud(c, String::new());
        c.cloud.endpoints = endpoints;
    })
    .await;
    wait_for_cloud_model(&mut t.client, CLOUD_MODEL).await;
    // Both listed before the load: wait until each endpoint has answered its first probe.
    wait_for_status(&mut t, "an endpoint never listed its zoo", |s| {
        s.cloud_endpoints.iter().all(|e| !e.models.is_empty())
    })
    .await;

    // Equally idle endpoints take turns.
    for _ in 0..4 {
        let (_, _, d) = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 2))
            .await
            .unwrap();
        assert_eq!(d.tier, pb::Tier::Cloud as i32);
    }
    let served = |s: &CloudServer| s.state.stats.completed.load(Ordering::Relaxed);
    assert_eq!((served(&a), served(&b)), (2, 2), "balanced");

    // One dies: before the first token the next endpoint is tried, so no request falls back.
    a.shutdown(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let (_, _, d) = run(&mut t.client, named(CLOUD_MODEL, QUESTION, 2))
            .await
            .unwrap();
        assert_eq!(d.tier, pb::Tier::Cloud as i32, "{:?}", d.placement);
        assert!(!d.placement.unwrap().fallback);
    }
    assert_eq!(served(&b), 5);
    b.shutdown(Duration::from_millis(100)).await;
}

/// The same mid-stream failure through the OpenAI-compatible API: the SSE stream ends with an
/// OpenAI-style error object that carries the accounting, then `[DONE]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_killed_mid_stream_over_http_ends_the_sse_with_an_error_and_the_accounting() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cloud = spawn_cloud_binary(port, dir.path());
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut t = TestServer::start(|c| {
        with_cloud(c, endpoint);
        c.cloud.health_interval_ms = 200;
    })
    .await;
    wait_for_cloud_model(&mut t.client, CLOUD_MODEL).await;
    let http = t.server.http_addr.unwrap();
    let pid = cloud.0.id();
    let body = serde_json::json!({
        "model": CLOUD_MODEL,
        "stream": true,
        "max_tokens": 400,
        "temperature": 0,
        "messages": [{"role": "user", "content": LONG}],
    })
    .to_string();
    // Kill once a few content chunks have reached the app: the answer is under way from the
    // cloud, whatever the machine's speed (a fixed delay killed a slow CI machine's cloud before
    // its first token, which falls back to local instead).
    let mut killed = false;
    let r = ferry_integration::http_watched(
        http,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(&body),
        |raw| {
            if !killed && raw.matches("\"content\":\"").count() >= 5 {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                killed = true;
            }
        },
    )
    .await;
    assert!(killed, "the answer ended before the cloud could be killed");
    drop(cloud);
    assert_eq!(r.status, 200, "{}", r.body);
    let events: Vec<&str> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let parsed: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content = parsed
        .iter()
        // The first chunk only opens the assistant turn (empty content).
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count();
    let err = parsed.last().unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("interrupted"),
        "{err}"
    );
    assert_eq!(err["ferry"]["tier"], "cloud");
    assert_eq!(
        err["ferry"]["delivered_deltas"],
        content.to_string(),
        "{err}"
    );
    assert!(content > 0);
}

/// The budget guarantee live: a constrained policy trained for Wi-Fi (0.5 s per text-only cloud
/// call) offloads over a link that adds 3 s to every call. Judged by the profile, four or five
/// cloud turns would fit a 15 s budget and take 12 s and more; judged by what calls cost here,
/// no dialogue goes over by more than its calls ran over their estimates, and the completions
/// say when the mask forced a turn local. (CI once saw 16.06 s of 15 s on a loaded machine
/// under the old, unconditional assertion: an estimate bounds what calls cost, not what a
/// busy CPU does next.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_cloud_never_overdraws_a_dialogue_budget() {
    const BUDGET_S: f64 = 15.0;
    let dir = tempfile::tempdir().unwrap();
    let policy_file = dir.path().join("wifi.safetensors");
    ferry_integration::train_policy_on("rc-a2c", "wifi", 3000, &policy_file);
    let cloud = start_cloud("127.0.0.1:0").await;
    let link = slow_link(cloud.local_addr, Duration::from_secs(3)).await;
    let mut t = TestServer::start(move |c| {
        with_cloud(c, format!("http://{link}"));
        c.cloud.health_timeout_ms = 20_000;
        c.cloud.connect_timeout_ms = 20_000;
        c.placement.policy_file = Some(policy_file);
        c.placement.latency_budget_s = Some(BUDGET_S);
    })
    .await;
    wait_for_cloud_model(&mut t.client, CLOUD_MODEL).await;
    let placer = t.server.state.placement.as_ref().unwrap();
    let tasks = placer.policy().meta().tasks.clone();
    let profile = placer.policy().costs().prices();

    let ask = |task: &str, dialogue: Option<String>| {
        let mut req = greedy(QUESTION, 1);
        req.task = task.to_string();
        req.dialogue_id = dialogue.unwrap_or_default();
        req
    };
    // One-turn requests first: the calls they make are measured, dialogues or not. The one
    // that names the local model measures a local call, which the mask keeps in reserve.
    let mut local = ask(&tasks[0], None);
    local.model = DEFAULT_MODEL.into();
    run(&mut t.client, local).await.unwrap();
    for task in &tasks {
        run(&mut t.client, ask(task, None)).await.unwrap();
    }
    // The mask's promise is conditional: a dialogue stays within budget when every call costs
    // no more than the estimate it was judged by. A loaded machine (CI runs tests side by side
    // on two cores) can make a call slower than any estimate, so the test checks the promise
    // as stated: each admitted cloud call left the reserve, and any overdraft is no larger than
    // what calls ran over their estimates.
    let reserve = ferry_router::tmo::state::RESERVE_LOCAL_CALLS as f64;
    let (mut cloud_turns, mut forced) = (0, 0);
    for d in 0..3 {
        let id = format!("slow-{d}");
        let mut log = Vec::new();
        let (mut over_s, mut over_usd) = (0.0f64, 0.0f64);
        for turn in 0..5 {
            let task = &tasks[(d + turn) % tasks.len()];
            let judged = placer.live_prices();
            let (before_s, before_usd) = placer.spent(&id).map_or((0.0, 0.0), |(s, _)| s);
            let (_, _, done) = run(&mut t.client, ask(task, Some(id.clone())))
                .await
                .unwrap();
            let p = done.placement.clone().unwrap();
            assert!(!p.fallback, "{p:?}");
            let ((after_s, after_usd), _) = placer.spent(&id).unwrap();
            let (took_s, took_usd) = (after_s - before_s, after_usd - before_usd);
            let kind = if done.tier == pb::Tier::Cloud as i32 {
                cloud_turns += 1;
                // "cloud with text only" or "cloud with views [0,2]".
                let chosen = p.reason.split("cloud with ").nth(1).unwrap_or_default();
                let views = match chosen.strip_prefix("views [") {
                    Some(rest) => rest.split(']').next().unwrap().split(',').count(),
                    None => 0,
                };
                let kind = 1 + views;
                assert!(
                    judged.latency_s[kind] <= BUDGET_S - before_s - reserve * judged.latency_s[0],
                    "turn {turn} of {id} went to the cloud without leaving the reserve: {p:?} {judged:?}"
                );
                kind
            } else {
                0
            };
            over_s += (took_s - judged.latency_s[kind]).max(0.0);
            over_usd += (took_usd - judged.usd[kind]).max(0.0);
            log.push(format!(
                "turn {turn}: kind {kind} took {took_s:.2} s, judged at {:.2} s (local {:.2} s): {}",
                judged.latency_s[kind], judged.latency_s[0], p.reason
            ));
            if p.reason.contains("the budget mask forced it") {
                forced += 1;
                assert_eq!(done.tier, pb::Tier::Local as i32, "{p:?}");
            }
        }
        let ((spent_s, spent_usd), (budget_s, budget_usd)) = placer.spent(&id).unwrap();
        assert_eq!(budget_s, BUDGET_S);
        assert!(
            spent_s <= budget_s + over_s && spent_usd <= budget_usd + over_usd,
            "dialogue {id} spent {spent_s:.2} s and ${spent_usd:.5} of {budget_s} s / ${budget_usd}, \
             more than its calls ran over their estimates ({over_s:.2} s, ${over_usd:.5}):\n{}",
            log.join("\n")
        );
    }
    assert!(cloud_turns > 0, "the policy never offloaded");
    // As the budget runs out turns stay local: by the mask when the policy would still go to
    // the cloud at its profile's prices (the reason says "the budget mask forced it", checked
    // above), or by the policy itself, which sees the remaining budget too. Which of the two
    // keeps a turn local depends on how long this machine's calls took (a run where 3.3 s cloud
    // calls left 1.6 s had the policy choose local unforced), so only the outcome is asserted.
    assert!(
        cloud_turns < 15,
        "no dialogue turn was kept local as the budget ran out ({forced} by the mask)"
    );
    // The live prices learned the link: cloud calls are judged at their measured 3 s and more,
    // where the profile says at most 2.24 s (0.5 s without views).
    let live = placer.live_prices();
    let worst =
        |p: &ferry_router::tmo::CallPrices| p.latency_s[1..].iter().cloned().fold(0.0, f64::max);
    assert!(worst(&live) >= 3.0, "{live:?}");
    assert!(worst(&profile) < 2.5, "{profile:?}");
    // Local runs are booked at their energy price, not free.
    assert!(live.usd(ferry_router::tmo::Action::LOCAL) > 0.0, "{live:?}");
    cloud.shutdown(Duration::from_millis(100)).await;
}
