//! Harness for the workspace integration tests: start ferryd in-process on loopback (port 0,
//! temporary state directory) with the real bundled model, talk to it with the generated gRPC
//! client, and find the built binaries for the tests that run them as processes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use ferry_cli::client::Client;
use ferry_edge::{EdgeConfig, RunningServer};
use ferry_proto::v1 as pb;
use futures::StreamExt;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where the bundled models are installed (`FERRY_MODEL_DIR` or `models/cache`).
pub fn model_dir() -> PathBuf {
    let dir = std::env::var_os("FERRY_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/cache"));
    let gguf = dir.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.is_file(),
        "{} is missing: install the bundled models first with `cargo run -p ferry-cli -- models fetch` \
         (scripts/test does this)",
        gguf.display()
    );
    dir
}

/// The Python of the test venv (`FERRY_TEST_PYTHON`, or `.venv` made by scripts/setup-python).
pub fn python() -> PathBuf {
    let p = std::env::var_os("FERRY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup-python (scripts/test does this)",
        p.display()
    );
    p
}

/// Runs a Python test client from `tests/python/` with the test venv (on a blocking thread) and
/// checks that it exits 0 and prints `ok_line`.
pub async fn run_python_client(script: &str, args: Vec<String>, ok_line: &str) {
    let script = repo_root().join("tests/python").join(script);
    let py = python();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(py)
            .arg(script)
            .args(args)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains(ok_line), "{stdout}");
}

/// The id of the bundled default model.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// A config for tests: loopback port 0, the repo's manifests, a fresh state directory.
pub fn test_config(state_dir: &Path) -> EdgeConfig {
    let mut c = EdgeConfig::default();
    c.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    c.server.http_addr = "127.0.0.1:0".parse().unwrap();
    c.server.shutdown_grace_s = 5;
    c.models.manifest_dir = repo_root().join("models");
    c.models.model_dir = model_dir();
    c.models.load = vec![DEFAULT_MODEL.to_string()];
    c.models.default = Some(DEFAULT_MODEL.to_string());
    c.state.dir = state_dir.to_path_buf();
    c
}

/// A started server with a connected client.
pub struct TestServer {
    pub server: RunningServer,
    pub client: Client,
    pub _state_dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts ferryd with `tweak` applied to the test config and waits until it is ready.
    pub async fn start(tweak: impl FnOnce(&mut EdgeConfig)) -> Self {
        let state_dir = tempfile::tempdir().unwrap();
        let mut config = test_config(state_dir.path());
        tweak(&mut config);
        let mut server = RunningServer::start(config).await.expect("ferryd starts");
        server.wait_ready().await.expect("models load");
        let client = client(&format!("http://{}", server.local_addr)).await;
        TestServer {
            server,
            client,
            _state_dir: state_dir,
        }
    }
}

/// Connects a client, retrying briefly while the listener comes up.
pub async fn client(addr: &str) -> Client {
    for _ in 0..100 {
        if let Ok(c) = ferry_cli::client::inference(addr).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not connect to {addr}");
}

/// A text message.
pub fn msg(role: pb::Role, text: &str) -> pb::Message {
    pb::Message {
        role: role as i32,
        parts: vec![pb::ContentPart {
            kind: Some(pb::content_part::Kind::Text(text.to_string())),
        }],
    }
}

/// A greedy request with one user message.
pub fn greedy(text: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: "auto".into(),
        messages: vec![msg(pb::Role::User, text)],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// Runs a request to the end: (concatenated deltas, number of deltas, completion).
pub async fn run(
    client: &mut Client,
    req: pb::GenerateRequest,
) -> Result<(String, usize, pb::Completion), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut text = String::new();
    let mut deltas = 0;
    let mut completion = None;
    while let Some(item) = stream.next().await {
        match item?.event {
            Some(pb::generate_response::Event::Delta(d)) => {
                assert!(completion.is_none(), "delta after the completion");
                text.push_str(&d.text);
                deltas += 1;
            }
            Some(pb::generate_response::Event::Completion(c)) => completion = Some(c),
            None => panic!("empty event"),
        }
    }
    Ok((
        text,
        deltas,
        completion.expect("stream ended without a completion"),
    ))
}

/// Path of a binary built by `cargo build` next to the running test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (scripts/test does this)",
        path.display()
    );
    path
}

/// A prompt the bundled models answer at length (hundreds of tokens at temperature 0): keeps a
/// stream in flight long enough to act on it mid-way, on any machine. ("Count from 1 to 500,
/// writing every number in words" alone ended its turn after 121 tokens once the engine's own
/// kernels changed the rounding; the explicit "do not stop" keeps SmolLM2 going past 600.)
pub const LONG_PROMPT: &str =
    "Count from 1 to 500 in words, separated by commas. Do not stop before 500.";

/// Polls a gRPC health service (`service`, "" for the whole server) at `addr` until it reports
/// NOT_SERVING, for at most 60 s. The drain sets this first, so it is how a test knows the
/// server has started draining without sleeping. Panics when the server cannot be reached.
pub async fn wait_not_serving(addr: &str, service: &str) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Channel::from_shared(addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{addr} cannot be reached while draining: {e}"));
    let mut health = HealthClient::new(channel);
    for _ in 0..6_000 {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {addr} while draining: {e}"))
            .into_inner()
            .status;
        if status == ServingStatus::NotServing as i32 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{addr} never reported NOT_SERVING");
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The id of the second local model family (Gemma 3), the most capable of the local zoo.
pub const SECOND_MODEL: &str = "gemma3-270m-it";

/// The local zoo in the router's order (ascending resident weight bytes, the cost proxy).
pub fn local_zoo() -> Vec<String> {
    vec![DEFAULT_MODEL.to_string(), SECOND_MODEL.to_string()]
}

/// A plain HTTP/1.1 response: status, lower-cased headers, body (de-chunked).
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`), read to the end: enough
/// to look at exactly what ferryd puts on the wire, with no client library in between.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> HttpResponse {
    http_with_headers(addr, method, path, &[], body).await
}

/// [`http`] with extra request headers (`(name, value)`, e.g. an `Authorization`).
pub async fn http_with_headers(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    http_watched(addr, method, path, headers, body, |_| {}).await
}

/// [`http_with_headers`] that shows `watch` the raw response read so far after every read, so a
/// test can act at a point of the stream (e.g. kill a peer once content has arrived) instead of
/// after a fixed sleep that assumes a fast machine.
pub async fn http_watched(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    mut watch: impl FnMut(&str),
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        watch(&String::from_utf8_lossy(&raw));
    }
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, rest) = text.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut out = String::new();
        let mut rest = rest;
        loop {
            let (size, after) = rest.split_once("\r\n").expect("chunk size line");
            let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// Trains a TMO placement policy (`ferry policy train`'s library) for 500 steps on the M4A1 log
/// and writes it to `out`.
pub fn train_policy(algo: &str, out: &Path) {
    train_policy_on(algo, "wired", 500, out)
}

/// The same for a network profile and a number of steps.
pub fn train_policy_on(algo: &str, network: &str, steps: usize, out: &Path) {
    use ferry_lab::policy::{self, EnvArgs, TrainArgs};
    let data_path = repo_root().join("../shared/data/tmo-m4a1/M4A1.json");
    let data = policy::load_data(&data_path).unwrap();
    let args = TrainArgs {
        env: policy::EnvName::M4a1,
        algo: algo.into(),
        steps,
        seed: 42,
        out: out.to_path_buf(),
        env_args: EnvArgs {
            data: data_path,
            device: "jetson-tx2".into(),
            network: network.into(),
        },
        budget_sampling: "normal".into(),
        history: "logged".into(),
        hidden: vec![32],
        json: false,
    };
    let (p, _, _) = policy::train(&data, &args).unwrap();
    std::fs::write(out, p.to_bytes().unwrap()).unwrap();
}

/// A slow network link on loopback: a TCP relay to `upstream` that holds every byte coming back
/// for `delay` before passing it on (requests go through at once). Each call over it, health
/// probes included, answers at least `delay` later than the server did.
pub async fn slow_link(upstream: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    let ms = Arc::new(std::sync::atomic::AtomicU64::new(delay.as_millis() as u64));
    variable_link(upstream, ms).await
}

/// [`slow_link`] whose delay (milliseconds, read as each chunk arrives) the test can change.
pub async fn variable_link(
    upstream: std::net::SocketAddr,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                let _ = server_tx.shutdown().await;
            });
            let (tx, mut rx) =
                tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
            let delay_ms = delay_ms.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = server_rx.read(&mut buf).await {
                    let delay =
                        Duration::from_millis(delay_ms.load(std::sync::atomic::Ordering::Relaxed));
                    if n == 0
                        || tx
                            .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                            .is_err()
                    {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((due, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(due).await;
                    if client_tx.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                let _ = client_tx.shutdown().await;
            });
        }
    });
    addr
}
