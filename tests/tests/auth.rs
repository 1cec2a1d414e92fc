//! Bearer tokens on gRPC and HTTP: missing, wrong and revoked tokens are refused the same way
//! (UNAUTHENTICATED / 401, nothing else revealed), a listed token works, a reload picks up a new
//! token file, probes and health stay open, and the Unix socket needs no token.

use ferry_core::token::token_line;
use ferry_integration::{greedy, http, run, TestServer};
use ferry_proto::v1 as pb;

const REFUSED: &str = "unauthenticated: missing or invalid bearer token";

async fn grpc_with(addr: &str, token: Option<&str>) -> Result<String, tonic::Status> {
    let mut c = ferry_cli::client::inference_with_token(addr, token)
        .await
        .unwrap();
    run(&mut c, greedy("Hi", 2)).await.map(|(t, _, _)| t)
}

async fn http_with(addr: std::net::SocketAddr, token: Option<&str>) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let status: u16 = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let json = raw
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// A temporary directory holding a token file of `(name, token)` pairs, and the file's path.
fn token_file(tokens: &[(&str, &str)]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens");
    let lines: String = tokens
        .iter()
        .map(|(name, tok)| format!("{}\n", token_line(name, tok)))
        .collect();
    std::fs::write(&path, lines).unwrap();
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_on_grpc_and_http_and_reloaded() {
    let (dir, tokens) = token_file(&[("app", "tok-app"), ("ops", "tok-ops")]);
    let socket = dir.path().join("ferryd.sock");
    let (tf, sock) = (tokens.clone(), socket.clone());
    let t = TestServer::start(move |c| {
        c.auth.tokens_file = Some(tf);
        c.server.unix_socket = Some(sock);
    })
    .await;
    let grpc = format!("http://{}", t.server.local_addr);
    let web = t.server.http_addr.unwrap();

    for bad in [None, Some("wrong"), Some("tok-ap")] {
        let e = grpc_with(&grpc, bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        assert_eq!(e.message(), REFUSED);
        let (status, body) = http_with(web, bad).await;
        assert_eq!(status, 401, "{bad:?}");
        assert_eq!(body["error"]["type"], "authentication_error");
        assert_eq!(
            body["error"]["message"], REFUSED,
            "same words on both surfaces"
        );
    }
    assert!(grpc_with(&grpc, Some("tok-app")).await.is_ok());
    assert_eq!(http_with(web, Some("tok-ops")).await.0, 200);
    // /metrics is protected too; the probes and gRPC health are open.
    assert_eq!(http(web, "GET", "/metrics", None).await.status, 401);
    assert_eq!(http(web, "GET", "/healthz", None).await.status, 200);
    assert_eq!(http(web, "GET", "/readyz", None).await.status, 200);
    let ch = ferry_cli::client::connect(&grpc).await.unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "health needs no token");
    // The Unix socket is trusted by its file permissions.
    let uds = format!("unix:{}", socket.display());
    assert!(grpc_with(&uds, None).await.is_ok());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660);

    // Revoke `app`, add `new`, reload (what SIGHUP does).
    std::fs::write(
        &tokens,
        format!(
            "{}\n{}\n",
            token_line("ops", "tok-ops"),
            token_line("new", "tok-new")
        ),
    )
    .unwrap();
    assert_eq!(t.server.state.auth.reload().unwrap(), 2);
    let e = grpc_with(&grpc, Some("tok-app")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(http_with(web, Some("tok-app")).await.0, 401);
    assert!(grpc_with(&grpc, Some("tok-new")).await.is_ok());
    assert_eq!(http_with(web, Some("tok-new")).await.0, 200);

    // Status needs a token too.
    let mut anon = ferry_cli::client::inference(&grpc).await.unwrap();
    let e = anon.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    t.server.shutdown(std::time::Duration::from_secs(5)).await;
}

/// Apps (bearer tokens) share the generation slot by the slot time they used: a flood from one
/// app does not delay another app's request behind the flood, and one app cannot fill the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_take_turns_and_one_app_cannot_fill_the_queue() {
    let (_dir, tokens) = token_file(&[("flood", "tok-flood"), ("other", "tok-other")]);
    let tf = tokens.clone();
    let t = TestServer::start(move |c| {
        c.auth.tokens_file = Some(tf);
        c.server.max_concurrent = 1;
        // Half of it, 4, is one app's share of the waiting places.
        c.server.max_queue = 8;
    })
    .await;
    let grpc = format!("http://{}", t.server.local_addr);
    let finished = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let ask = |token: &'static str, name: String| {
        let (grpc, finished) = (grpc.clone(), finished.clone());
        tokio::spawn(async move {
            let mut c = ferry_cli::client::inference_with_token(&grpc, Some(token))
                .await
                .unwrap();
            let out = run(&mut c, greedy("Tell me about the sea.", 24)).await;
            if out.is_ok() {
                finished.lock().unwrap().push(name);
            }
            out.map(|_| ())
        })
    };
    // One running and four waiting fill "flood"'s share; a sixth is refused.
    let floods: Vec<_> = (0..6)
        .map(|i| ask("tok-flood", format!("flood{i}")))
        .collect();
    let mut status = ferry_cli::client::inference_with_token(&grpc, Some("tok-other"))
        .await
        .unwrap();
    for _ in 0..600 {
        let s = status
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.running == 1 && s.queued == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let other = ask("tok-other", "other".into());
    other
        .await
        .unwrap()
        .expect("the other app is admitted and served");
    let mut refused = Vec::new();
    for f in floods {
        if let Err(e) = f.await.unwrap() {
            refused.push(e);
        }
    }
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].code(), tonic::Code::ResourceExhausted);
    assert!(
        refused[0].message().contains("max_queue_per_app"),
        "{}",
        refused[0].message()
    );
    let order = finished.lock().unwrap().clone();
    let at = order.iter().position(|n| n == "other").unwrap();
    // The running request and at most one more of the flood's before it, not all five.
    assert!(at <= 2, "other finished {at}th of {order:?}");
    assert_eq!(order.len(), 6);
}
