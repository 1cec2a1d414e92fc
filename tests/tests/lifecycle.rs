//! Health, readiness, graceful shutdown, and the Unix socket.

use std::time::Duration;

use ferry_edge::RunningServer;
use ferry_integration::{client, greedy, run, test_config, TestServer, DEFAULT_MODEL};
use ferry_proto::v1 as pb;
use futures::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn health(addr: &str, service: &str) -> ServingStatus {
    let channel = ferry_cli::client::connect(addr).await.unwrap();
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(resp.status).unwrap()
}

#[tokio::test]
async fn serving_only_once_the_default_model_is_loaded() {
    let state_dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(test_config(state_dir.path()))
        .await
        .unwrap();
    let addr = format!("http://{}", server.local_addr);
    // Poll from the first moment: whenever health says SERVING the model must be resident.
    let mut saw_not_serving = false;
    for _ in 0..1200 {
        match health(&addr, "ferry.v1.Inference").await {
            ServingStatus::Serving => {
                assert!(server.state.model(DEFAULT_MODEL).is_some());
                assert!(server.state.is_ready());
                break;
            }
            _ => {
                assert!(!server.state.is_ready() || server.state.model(DEFAULT_MODEL).is_some());
                saw_not_serving = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(health(&addr, "").await, ServingStatus::Serving);
    eprintln!("observed NOT_SERVING before load: {saw_not_serving}");
    server.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_model_that_cannot_load_never_reports_serving() {
    let state_dir = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let mut config = test_config(state_dir.path());
    config.models.model_dir = empty.path().to_path_buf();
    let mut server = RunningServer::start(config).await.unwrap();
    let err = server.wait_ready().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("ferry models fetch smollm2-135m-instruct"),
        "{err}"
    );
    let addr = format!("http://{}", server.local_addr);
    assert_eq!(health(&addr, "").await, ServingStatus::NotServing);
    let mut c = client(&addr).await;
    let status = c.generate(greedy("Hi", 2)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    server.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_streams_finish_and_refuses_new_ones() {
    let mut t = TestServer::start(|_| {}).await;
    let addr = format!("http://{}", t.server.local_addr);
    let mut stream = t
        .client
        .generate(greedy("Tell me about ferries.", 40))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(pb::generate_response::Event::Delta(_))
    ));
    let state = t.server.state.clone();
    let stopper = tokio::spawn(t.server.shutdown(Duration::from_secs(60)));
    while !state.is_draining() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A new request on the existing connection is refused while draining.
    let refused = t.client.generate(greedy("Hi", 2)).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::Unavailable,
        "{}",
        refused.message()
    );
    // The in-flight stream still ends with its completion.
    let mut completion = None;
    while let Some(item) = stream.next().await {
        if let Some(pb::generate_response::Event::Completion(c)) = item.unwrap().event {
            completion = Some(c);
        }
    }
    assert!(completion.is_some(), "in-flight stream finished");
    stopper.await.unwrap();
    assert!(
        ferry_cli::client::connect(&addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn shutdown_grace_over_ends_streams_with_unavailable() {
    let mut t = TestServer::start(|_| {}).await;
    let mut stream = t
        .client
        .generate(greedy("Tell me a very long story about ferries.", 2000))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let stopper = tokio::spawn(t.server.shutdown(Duration::from_millis(0)));
    let mut end = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(r) => assert!(
                !matches!(r.event, Some(pb::generate_response::Event::Completion(_))),
                "a 2000-token story cannot finish within a zero grace period"
            ),
            Err(s) => {
                end = Some(s);
                break;
            }
        }
    }
    let status = end.expect("the stream ends with a status");
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("shut down"),
        "{}",
        status.message()
    );
    stopper.await.unwrap();
}

#[tokio::test]
async fn serves_on_a_unix_socket_too() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("ferryd.sock");
    let path = sock.clone();
    let t = TestServer::start(move |c| c.server.unix_socket = Some(path)).await;
    let mut uds = client(&format!("unix:{}", sock.display())).await;
    let (text, _, c) = run(&mut uds, greedy("Hi", 4)).await.unwrap();
    assert!(!text.is_empty());
    assert_eq!(c.model, DEFAULT_MODEL);
    t.server.shutdown(Duration::from_secs(1)).await;
    assert!(!sock.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let t = TestServer::start(|_| {}).await;
    let channel = ferry_cli::client::connect(&format!("http://{}", t.server.local_addr))
        .await
        .unwrap();
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let names: Vec<String> = match resp.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    };
    assert!(names.iter().any(|n| n == "ferry.v1.Inference"), "{names:?}");
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );
    t.server.shutdown(Duration::from_secs(1)).await;
}
