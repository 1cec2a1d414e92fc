//! ferry-cloud's security and operations on loopback: mutual TLS with the certificates of
//! `ferry certs dev` (a client without a certificate, with one from another CA, or with an expired
//! or not yet valid one, is refused in the handshake), bearer tokens (missing or wrong: UNAUTHENTICATED with the one message), the
//! refusal to listen beyond loopback with no authentication, and the HTTP probes and metrics:
//! listening before the models load (`/readyz` 503, health NOT_SERVING, Offload UNAVAILABLE),
//! ready after, and `/metrics` as Prometheus text whose counters move with requests.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ferry_cli::certs::{self, DevCertsOptions};
use ferry_cloud::{BackendKind, CloudConfig, CloudServer, ModelConfig};
use ferry_integration::{free_port, http_with_headers, model_dir, repo_root, DEFAULT_MODEL};
use ferry_proto::v1 as pb;
use futures::StreamExt;
use pb::offload_client::OffloadClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A cloud model that needs no loading: an OpenAI-compatible upstream that is never called
/// (ListModels answers without it).
fn upstream_model(id: &str) -> ModelConfig {
    ModelConfig {
        id: id.to_string(),
        backend: BackendKind::Openai,
        manifest: None,
        base_url: Some(format!("http://127.0.0.1:{}/v1", free_port())),
        upstream_model: None,
        api_key_env: None,
        stream: true,
        connect_timeout_ms: 500,
        read_timeout_ms: 5_000,
        capabilities: None,
        usd_per_million_tokens: None,
        joules_per_token: None,
        family: None,
        context_length: None,
    }
}

/// The bundled SmolLM2 on the candle backend.
fn candle_model() -> ModelConfig {
    ModelConfig {
        backend: BackendKind::Candle,
        base_url: None,
        ..upstream_model(DEFAULT_MODEL)
    }
}

fn cloud_config(models: Vec<ModelConfig>) -> CloudConfig {
    let mut c = CloudConfig::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.http_addr = "127.0.0.1:0".parse().unwrap();
    c.server.shutdown_grace_s = 5;
    c.candle.manifest_dir = repo_root().join("models");
    c.candle.model_dir = model_dir();
    c.models = models;
    c
}

/// `ferry certs dev` (the library behind it) into `dir`.
fn dev_certs(dir: &Path) -> certs::DevCerts {
    certs::write_dev_certs(&DevCertsOptions {
        out: dir.to_path_buf(),
        days: 2,
        ..DevCertsOptions::default()
    })
    .expect("dev certificates")
}

/// `[tls]` with the dev server certificate, and mutual TLS with the dev CA.
fn mtls(c: &mut CloudConfig, certs: &certs::DevCerts) {
    c.tls.cert_file = Some(certs.path(certs::CLOUD_CERT));
    c.tls.key_file = Some(certs.path(certs::CLOUD_KEY));
    c.tls.client_ca_file = Some(certs.path(certs::CA_CERT));
}

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// What ferryd's offload client does: trust the dev CA for `localhost`, and present the edge
/// certificate when `client` names a certificate set.
fn tls_endpoint(
    server: &CloudServer,
    trust: &certs::DevCerts,
    client: Option<&certs::DevCerts>,
) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(trust.path(certs::CA_CERT))))
        .domain_name(certs::CLOUD_DOMAIN_NAME);
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(
            read(c.path(certs::EDGE_CERT)),
            read(c.path(certs::EDGE_KEY)),
        ));
    }
    Channel::from_shared(format!("https://localhost:{}", server.local_addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
}

/// ListModels over `endpoint`: the model ids, or why the call failed (connect or status).
async fn list_models(endpoint: Endpoint, token: Option<&str>) -> Result<Vec<String>, String> {
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    let mut req = tonic::Request::new(pb::ListModelsRequest {});
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    OffloadClient::new(channel)
        .list_models(req)
        .await
        .map(|r| r.into_inner().models.into_iter().map(|m| m.id).collect())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

fn request(id: &str, model: &str, max_tokens: u32) -> pb::OffloadRequest {
    pb::OffloadRequest {
        request_id: id.to_string(),
        model: model.to_string(),
        messages: vec![pb::Message {
            role: pb::Role::User as i32,
            parts: vec![pb::ContentPart {
                kind: Some(pb::content_part::Kind::Text(
                    "Name three colours of the rainbow.".into(),
                )),
            }],
        }],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_dev_certs_and_a_token_serves_a_generation() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dev_certs(&dir.path().join("dev"));
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("{}\n", ferry_core::token::token_line("edge-1", "tok-edge")),
    )
    .unwrap();
    let mut config = cloud_config(vec![candle_model()]);
    mtls(&mut config, &dev);
    config.auth.tokens_file = Some(tokens);
    let server = CloudServer::start(config)
        .await
        .expect("ferry-cloud starts");

    let channel = tls_endpoint(&server, &dev, Some(&dev))
        .connect()
        .await
        .expect("mutual TLS handshake");
    // Health is open to a client that passed the handshake, without a token.
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "ferry.v1.Offload".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    let mut client = OffloadClient::new(channel);
    // The handshake alone is not enough when tokens are configured too.
    let err = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    let mut stream = client
        .generate(with_token(request("sec-1", DEFAULT_MODEL, 8), "tok-edge"))
        .await
        .expect("authenticated generate")
        .into_inner();
    let mut text = String::new();
    let mut done = None;
    while let Some(item) = stream.next().await {
        match item.unwrap().event {
            Some(pb::offload_response::Event::Delta(d)) => text.push_str(&d.text),
            Some(pb::offload_response::Event::Completion(c)) => done = Some(c),
            None => panic!("empty event"),
        }
    }
    assert!(!text.trim().is_empty());
    let done = done.expect("completion");
    assert_eq!(done.model, DEFAULT_MODEL);
    assert!(done.usage.unwrap().completion_tokens >= 1);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_from_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dev_certs(&dir.path().join("dev"));
    let other = dev_certs(&dir.path().join("other"));
    let mut config = cloud_config(vec![upstream_model("up")]);
    mtls(&mut config, &dev);
    let server = CloudServer::start(config)
        .await
        .expect("ferry-cloud starts");

    // The edge certificate of the dev CA: served.
    let ok = list_models(tls_endpoint(&server, &dev, Some(&dev)), None).await;
    assert_eq!(ok.unwrap(), vec!["up"]);

    // No client certificate: the handshake fails (in TLS 1.3 the server's alert may only
    // arrive with the first call, so either step may be the one that fails).
    let no_cert = list_models(tls_endpoint(&server, &dev, None), None).await;
    assert!(
        no_cert.is_err(),
        "a client without a certificate got {no_cert:?}"
    );

    // A certificate signed by another CA (another `ferry certs dev`): refused.
    let foreign = list_models(tls_endpoint(&server, &dev, Some(&other)), None).await;
    assert!(
        foreign.is_err(),
        "a foreign client certificate got {foreign:?}"
    );

    // A client that does not trust the server's CA refuses the server.
    let untrusted = list_models(tls_endpoint(&server, &other, Some(&dev)), None).await;
    assert!(untrusted.is_err(), "{untrusted:?}");

    // Plaintext to a TLS listener.
    let plain = list_models(
        Channel::from_shared(format!("http://{}", server.local_addr)).unwrap(),
        None,
    )
    .await;
    assert!(plain.is_err(), "{plain:?}");

    // And the good client still works afterwards.
    let again = list_models(tls_endpoint(&server, &dev, Some(&dev)), None).await;
    assert_eq!(again.unwrap(), vec!["up"]);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_expired_and_not_yet_valid_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dev_certs(&dir.path().join("dev"));
    let mut config = cloud_config(vec![upstream_model("up")]);
    mtls(&mut config, &dev);
    let server = CloudServer::start(config)
        .await
        .expect("ferry-cloud starts");
    let ca_key = std::fs::read_to_string(dev.path(certs::CA_KEY)).unwrap();
    // A client trusting the dev CA and presenting an edge certificate the same CA issued for
    // the validity window `days` (from today).
    let client = |days: (i64, i64)| {
        let (cert, key) = certs::edge_cert_from_ca(&ca_key, days).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(dev.path(certs::CA_CERT))))
            .domain_name(certs::CLOUD_DOMAIN_NAME)
            .identity(Identity::from_pem(cert, key));
        Channel::from_shared(format!("https://localhost:{}", server.local_addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
    };
    // Valid now: served, so what is refused below is refused for its dates alone.
    let current = list_models(client((-1, 2)), None).await;
    assert_eq!(current.unwrap(), vec!["up"]);
    for (what, days) in [("an expired", (-10, -2)), ("a not yet valid", (2, 10))] {
        let refused = list_models(client(days), None).await;
        assert!(
            refused.is_err(),
            "{what} client certificate got {refused:?}"
        );
    }
    // The server keeps serving good clients.
    let again = list_models(tls_endpoint(&server, &dev, Some(&dev)), None).await;
    assert_eq!(again.unwrap(), vec!["up"]);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_missing_or_wrong_are_unauthenticated_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("{}\n", ferry_core::token::token_line("edge-1", "tok-right")),
    )
    .unwrap();
    let mut config = cloud_config(vec![upstream_model("up")]);
    config.auth.tokens_file = Some(tokens.clone());
    let server = CloudServer::start(config)
        .await
        .expect("ferry-cloud starts");
    let endpoint = || Channel::from_shared(format!("http://{}", server.local_addr)).unwrap();

    // The same message as ferryd's: missing, wrong and revoked tokens are not told apart.
    let refused = format!(
        "Unauthenticated: unauthenticated: {}",
        ferry_daemon::auth::REFUSED
    );
    assert_eq!(list_models(endpoint(), None).await.unwrap_err(), refused);
    assert_eq!(
        list_models(endpoint(), Some("tok-wrong"))
            .await
            .unwrap_err(),
        refused,
        "a wrong token is refused with the same message"
    );
    assert_eq!(
        list_models(endpoint(), Some("tok-right")).await.unwrap(),
        vec!["up"]
    );
    // Generate is guarded too, before any validation of the request.
    let channel = endpoint().connect().await.unwrap();
    let err = OffloadClient::new(channel.clone())
        .generate(request("", "", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(
        err.message().ends_with(ferry_daemon::auth::REFUSED),
        "{err:?}"
    );
    // Health stays open for probes.
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    // Revocation: the file changes, a reload (what SIGHUP does) applies it.
    std::fs::write(
        &tokens,
        format!("{}\n", ferry_core::token::token_line("edge-2", "tok-new")),
    )
    .unwrap();
    assert_eq!(server.state.auth.reload().unwrap(), 1);
    assert_eq!(
        list_models(endpoint(), Some("tok-right"))
            .await
            .unwrap_err(),
        refused
    );
    assert!(list_models(endpoint(), Some("tok-new")).await.is_ok());
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_listen_beyond_loopback_without_authentication() {
    let mut config = cloud_config(vec![upstream_model("up")]);
    config.server.listen = "0.0.0.0:0".parse().unwrap();
    let err = match CloudServer::start(config.clone()).await {
        Ok(_) => panic!("ferry-cloud started exposed and open"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ferry_core::ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("auth.tokens_file"), "{err}");
    assert!(err.to_string().contains("tls.client_ca_file"), "{err}");

    // The explicit opt-out starts it.
    config.auth.allow_unauthenticated_network = true;
    let server = CloudServer::start(config).await.expect("opted out");
    assert!(server.local_addr.ip().is_unspecified());
    server.shutdown(Duration::from_secs(5)).await;

    // The real binary says why and exits non-zero.
    let out = std::process::Command::new(ferry_integration::binary("ferry-cloud"))
        .args(["--listen", "0.0.0.0:0"])
        .env_remove("FERRY_CLOUD_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("auth.tokens_file"), "{stderr}");
}

#[test]
fn ferry_certs_dev_writes_the_contract_files_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs/dev");
    let ferry = ferry_integration::binary("ferry");
    let run = |extra: &[&str]| {
        std::process::Command::new(&ferry)
            .args(["certs", "dev", "--out"])
            .arg(&out)
            .args(["--san", "cloud.example.org", "--days", "30"])
            .args(extra)
            .output()
            .unwrap()
    };
    let first = run(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let snippets = String::from_utf8_lossy(&first.stdout);
    for needle in [
        "[tls]",
        "client_ca_file",
        "[cloud]",
        "ca_file",
        "edge.pem",
        "edge.key",
    ] {
        assert!(snippets.contains(needle), "{needle}: {snippets}");
    }
    for f in [
        "ca.pem",
        "ca.key",
        "cloud.pem",
        "cloud.key",
        "edge.pem",
        "edge.key",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        if f.ends_with(".key") {
            assert_eq!(mode, 0o600, "{f}");
        }
    }
    let ca = read(out.join("ca.pem"));
    let again = run(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(read(out.join("ca.pem")), ca, "nothing overwritten");
    let forced = run(&["--force"]);
    assert!(forced.status.success());
    assert_ne!(read(out.join("ca.pem")), ca);
}

/// One sample of the Prometheus text format: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses Prometheus text exposition strictly enough to catch a malformed page: comment lines
/// are `# HELP`/`# TYPE` with a known type, every other line is `name{k="v",...} value`.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(c) = line.strip_prefix("# ") {
            let mut f = c.split_whitespace();
            match f.next() {
                Some("TYPE") => {
                    let _name = f.next().expect("TYPE names a metric");
                    let ty = f.next().expect("TYPE has a type");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                        "{line}"
                    );
                }
                Some("HELP") => {}
                _ => panic!("unexpected comment line: {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let labels = body
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("k=\"v\"");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        out.push((name, labels, value));
    }
    out
}

/// The sum of the samples named `name` whose labels include all of `labels`.
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

async fn scrape(addr: std::net::SocketAddr, token: &str) -> Vec<Sample> {
    let auth = format!("Bearer {token}");
    let r = http_with_headers(addr, "GET", "/metrics", &[("Authorization", &auth)], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    parse_prometheus(&r.body)
}

async fn health_status(server: &CloudServer) -> i32 {
    let channel = Channel::from_shared(format!("http://{}", server.local_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "ferry.v1.Offload".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listens_before_loading_then_ready_and_metrics_count_requests() {
    // A model id of this test's own, so that the process-wide counters it reads are its own.
    const MODEL: &str = "sec-metrics-smollm2";
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("{}\n", ferry_core::token::token_line("ops", "tok-ops")),
    )
    .unwrap();
    let mut config = cloud_config(vec![ModelConfig {
        id: MODEL.into(),
        manifest: Some(DEFAULT_MODEL.into()),
        usd_per_million_tokens: Some(1.0),
        ..candle_model()
    }]);
    config.auth.tokens_file = Some(tokens);

    // Bound, not loaded: live, not ready; every call UNAVAILABLE with the reason.
    let server = CloudServer::bind(config).await.expect("listeners bound");
    let http = server.http_addr.expect("HTTP enabled");
    let live = ferry_integration::http(http, "GET", "/healthz", None).await;
    assert_eq!((live.status, live.body.as_str()), (200, "ok\n"));
    let ready = ferry_integration::http(http, "GET", "/readyz", None).await;
    assert_eq!((ready.status, ready.body.as_str()), (503, "loading\n"));
    assert_eq!(
        health_status(&server).await,
        ServingStatus::NotServing as i32
    );
    let endpoint = || Channel::from_shared(format!("http://{}", server.local_addr)).unwrap();
    let mut client = OffloadClient::new(endpoint().connect().await.unwrap());
    let err = client
        .generate(with_token(request("m-0", MODEL, 4), "tok-ops"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "ferry-cloud is still loading its models");
    let err = client
        .list_models(with_token(pb::ListModelsRequest {}, "tok-ops"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let before = scrape(http, "tok-ops").await;
    assert_eq!(sum(&before, "ferry_cloud_ready", &[]), 0.0);

    // Loaded: ready.
    server.load().await.expect("models load");
    let ready = ferry_integration::http(http, "GET", "/readyz", None).await;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    assert_eq!(health_status(&server).await, ServingStatus::Serving as i32);

    // /metrics needs the token; a refusal is counted.
    let refused = ferry_integration::http(http, "GET", "/metrics", None).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    let wrong = client
        .list_models(with_token(pb::ListModelsRequest {}, "tok-wrong"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);

    // One request, then its retry (a replay).
    for _ in 0..2 {
        let mut stream = client
            .generate(with_token(request("m-1", MODEL, 6), "tok-ops"))
            .await
            .unwrap()
            .into_inner();
        while let Some(item) = stream.next().await {
            item.unwrap();
        }
    }

    let after = scrape(http, "tok-ops").await;
    let ok = [("model", MODEL), ("backend", "candle"), ("outcome", "ok")];
    assert_eq!(sum(&before, "ferry_cloud_requests_total", &ok), 0.0);
    assert_eq!(sum(&after, "ferry_cloud_requests_total", &ok), 1.0);
    assert_eq!(
        sum(&after, "ferry_cloud_replays_total", &[("model", MODEL)]),
        1.0
    );
    let prompt = sum(
        &after,
        "ferry_cloud_tokens_total",
        &[("model", MODEL), ("kind", "prompt")],
    );
    let completion = sum(
        &after,
        "ferry_cloud_tokens_total",
        &[("model", MODEL), ("kind", "completion")],
    );
    assert!(
        prompt > 5.0 && (1.0..=6.0).contains(&completion),
        "{prompt} {completion}"
    );
    for h in [
        "ferry_cloud_request_duration_seconds_count",
        "ferry_cloud_time_to_first_token_seconds_count",
    ] {
        assert_eq!(
            sum(&after, h, &[("model", MODEL), ("backend", "candle")]),
            1.0,
            "{h}"
        );
    }
    assert_eq!(
        sum(
            &after,
            "ferry_cloud_queue_wait_seconds_count",
            &[("model", MODEL)]
        ),
        1.0
    );
    // Measured joules, labelled with the meter's source.
    let energy: Vec<&Sample> = after
        .iter()
        .filter(|(n, l, _)| {
            n == "ferry_cloud_request_energy_joules_sum"
                && l.get("model").map(String::as_str) == Some(MODEL)
        })
        .collect();
    assert_eq!(energy.len(), 1, "{energy:?}");
    assert!(energy[0].2 > 0.0);
    let source = energy[0].1.get("source").unwrap();
    assert!(
        !source.is_empty() && source != "hint" && source != "none",
        "{source}"
    );
    // Histogram buckets are cumulative and end at +Inf.
    assert!(after.iter().any(|(n, l, _)| {
        n == "ferry_cloud_request_duration_seconds_bucket"
            && l.get("le").map(String::as_str) == Some("+Inf")
    }));
    // Refusals moved: the loading calls, and the bad tokens on both surfaces.
    let unavailable = [("reason", "unavailable")];
    assert!(
        sum(&after, "ferry_cloud_requests_rejected_total", &unavailable)
            >= sum(&before, "ferry_cloud_requests_rejected_total", &unavailable)
    );
    assert!(
        sum(&before, "ferry_cloud_requests_rejected_total", &unavailable) >= 1.0,
        "the call while loading was counted"
    );
    for surface in ["grpc", "http"] {
        let l = [("surface", surface)];
        assert!(
            sum(&after, "ferry_cloud_auth_refusals_total", &l)
                > sum(&before, "ferry_cloud_auth_refusals_total", &l),
            "{surface}"
        );
    }
    assert_eq!(sum(&after, "ferry_cloud_ready", &[]), 1.0);
    assert_eq!(sum(&after, "ferry_cloud_requests_running", &[]), 0.0);
    assert_eq!(sum(&after, "ferry_cloud_requests_queued", &[]), 0.0);

    // Draining: not ready any more.
    server.state.start_draining();
    let ready = ferry_integration::http(http, "GET", "/readyz", None).await;
    assert_eq!((ready.status, ready.body.as_str()), (503, "draining\n"));
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_to_load_leaves_the_server_live_but_not_ready() {
    let mut config = cloud_config(vec![ModelConfig {
        id: "sec-missing".into(),
        manifest: Some("no-such-manifest".into()),
        ..candle_model()
    }]);
    config.server.http_enabled = true;
    let server = CloudServer::bind(config).await.expect("listeners bound");
    let http = server.http_addr.unwrap();
    let err = server.load().await.unwrap_err();
    assert!(err.to_string().contains("no-such-manifest"), "{err}");
    let ready = ferry_integration::http(http, "GET", "/readyz", None).await;
    assert_eq!(ready.status, 503);
    assert_eq!(
        health_status(&server).await,
        ServingStatus::NotServing as i32
    );
    server.shutdown(Duration::ZERO).await;
}
