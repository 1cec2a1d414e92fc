//! The real binaries as processes: `ferryd` configured by flags and environment, `ferry chat`
//! streaming from it, `ferry models list`, and SIGTERM letting an in-flight stream finish.

use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_integration::{binary, client, free_port, greedy, model_dir, repo_root};
use ferry_proto::v1 as pb;
use futures::StreamExt;

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_ferryd(port: u16, state: &std::path::Path) -> Daemon {
    let child = Command::new(binary("ferryd"))
        .current_dir(repo_root())
        .args(["--config", "configs/edge.toml"])
        .args(["--grpc-addr", &format!("127.0.0.1:{port}")])
        .args(["--http-addr", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state)
        .env("FERRY_MODEL_DIR", model_dir())
        .env("FERRY_MAX_QUEUE", "4")
        // A drain ends when nothing is in flight; a long grace only keeps a slow machine's
        // in-flight stream from being cut.
        .env("FERRY_SHUTDOWN_GRACE_S", "600")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ferryd starts");
    Daemon(child)
}

async fn wait_serving(addr: &str) {
    for _ in 0..600 {
        if let Ok(ch) = ferry_cli::client::connect(addr).await {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            if let Ok(r) = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                if r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("ferryd at {addr} never became ready");
}

#[tokio::test]
async fn ferry_chat_streams_from_ferryd_and_sigterm_drains() {
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut daemon = start_ferryd(port, state.path());
    let addr = format!("127.0.0.1:{port}");
    wait_serving(&format!("http://{addr}")).await;

    let out = Command::new(binary("ferry"))
        .args([
            "chat",
            "What is the capital of France?",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--json",
        ])
        .args(["--addr", &addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let json_line = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(json_line).unwrap();
    // configs/edge.toml routes `auto` over the local zoo.
    let served = v["model"].as_str().unwrap();
    assert!(
        ferry_integration::local_zoo().iter().any(|m| m == served),
        "{served}"
    );
    assert_eq!(v["tier"], "TIER_LOCAL");
    assert!(v["completion_tokens"].as_u64().unwrap() >= 1);

    let out = Command::new(binary("ferry"))
        .args(["models", "list", "--json", "--addr", &addr])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["loaded"], true);

    // SIGTERM once a long stream has sent its first delta: the drain starts (health
    // NOT_SERVING), a request arriving now is refused at once, and the stream still completes
    // within the grace (600 s here, so a slow machine cannot turn it into a failure); every
    // step waits for an event, never for a fixed time.
    let url = format!("http://{addr}");
    let mut c = client(&url).await;
    let mut stream = c
        .generate(greedy(ferry_integration::LONG_PROMPT, 64))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let pid = daemon.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    ferry_integration::wait_not_serving(&url, "").await;
    let late = c
        .generate(greedy("Hello.", 4))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::Unavailable, "{late:?}");
    assert!(late.message().contains("shutting down"), "{late:?}");
    let mut completion = None;
    while let Some(item) = stream.next().await {
        if let Some(pb::generate_response::Event::Completion(done)) = item.unwrap().event {
            completion = Some(done);
        }
    }
    let done = completion.expect("the in-flight stream finished after SIGTERM");
    // It was still generating when the late request was refused: the drain waited for it.
    assert!(done.usage.unwrap().completion_tokens > 20, "{done:?}");
    let status = tokio::task::spawn_blocking(move || {
        let s = daemon.0.wait().unwrap();
        std::mem::forget(daemon);
        s
    })
    .await
    .unwrap();
    assert!(status.success(), "ferryd exit status {status}");
}

#[test]
fn ferryd_rejects_a_bad_config_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[server]\nmax_concurent = 2\n").unwrap();
    let out = Command::new(binary("ferryd"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_concurent"), "{err}");
}

#[test]
fn ferry_models_list_reads_manifests() {
    let out = Command::new(binary("ferry"))
        .current_dir(repo_root())
        .args(["models", "list", "--json"])
        .env("FERRY_MODEL_DIR", model_dir())
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"smollm2-135m-instruct") && ids.contains(&"all-minilm-l6-v2"));
    assert!(v.as_array().unwrap().iter().all(|m| m["installed"] == true));
}

#[test]
fn ferry_energy_probe_reports_every_source_with_a_reason() {
    let fixture =
        repo_root().join("crates/ferry-energy/tests/fixtures/jetson-agx-xavier-l4t32/sys");
    let out = Command::new(binary("ferry"))
        .args(["energy", "probe", "--json", "--sysfs-root"])
        .arg(&fixture)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sources = v["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 4);
    let ina = sources.iter().find(|s| s["kind"] == "ina3221").unwrap();
    assert_eq!(ina["available"], true);
    assert_eq!(ina["devices"].as_array().unwrap().len(), 6);
    let rapl = sources.iter().find(|s| s["kind"] == "rapl").unwrap();
    assert_eq!(rapl["available"], false);
    assert!(rapl["reason"].as_str().unwrap().contains("powercap"));
    assert!(v["selected"].as_str().unwrap().contains("ina3221"));

    // A measured window: the utilisation estimate is always readable and counts > 0 J.
    let out = Command::new(binary("ferry"))
        .args([
            "energy",
            "probe",
            "--json",
            "--sources",
            "estimate",
            "--measure-s",
            "0.5",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &v["measured"][0];
    assert_eq!(m["source"], "estimate");
    let (j, s, w) = (
        m["joules"].as_f64().unwrap(),
        m["seconds"].as_f64().unwrap(),
        m["mean_watts"].as_f64().unwrap(),
    );
    assert!(j > 0.0 && s >= 0.5 && (w - j / s).abs() < 1e-9, "{m}");
}

/// `kill -9` in the middle of learning: the restarted daemon has everything the router learned
/// up to the last save, which is at most `router.save_interval_ms` (1 s) old; `ferry status`
/// shows it.
#[tokio::test]
async fn router_state_survives_kill_9() {
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut daemon = start_ferryd(port, state.path());
    wait_serving(&format!("http://{addr}")).await;
    let mut c = client(&format!("http://{addr}")).await;
    let mut ids = Vec::new();
    for q in ["Hello?", "What is 1+1?"] {
        let (_, _, done) = ferry_integration::run(&mut c, greedy(q, 2)).await.unwrap();
        ids.push(done.request_id);
    }
    c.feedback(pb::FeedbackRequest {
        request_id: ids[0].clone(),
        satisfied: true,
        score: None,
    })
    .await
    .unwrap();
    // Exploration steps finish after their answer (the rest of the zoo runs to measure it):
    // wait until both requests are booked, let one save interval pass, then kill without any
    // chance to save.
    let mut before = pb::RouterStatus::default();
    for _ in 0..300 {
        before = c
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .routers[0]
            .clone();
        if before.models.iter().map(|m| m.calls).sum::<u64>() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The saver writes once per interval (1 s): wait for a save after the last change.
    let settled_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for _ in 0..200 {
        let r = c
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .routers[0]
            .clone();
        if r.saved_unix_ms >= settled_ms {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let saved = c
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .routers[0]
        .saved_unix_ms;
    assert!(
        saved >= settled_ms,
        "state written after the last change ({saved} < {settled_ms})"
    );
    drop(c);
    let pid = daemon.0.id();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let _ = daemon.0.wait();
    drop(daemon);

    let _daemon = start_ferryd(port, state.path());
    wait_serving(&format!("http://{addr}")).await;
    let out = Command::new(binary("ferry"))
        .args(["status", "--json", "--addr", &addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v["routers"][0];
    assert_eq!(r["requests"], before.requests);
    assert_eq!(r["feedback"], 1);
    assert_eq!(r["satisfied"], 1);
    assert_eq!(r["q_tracked"], before.q_tracked);
    assert_eq!(r["alpha"], before.alpha);
    let calls: u64 = r["calls"]
        .as_object()
        .unwrap()
        .values()
        .map(|m| m["calls"].as_u64().unwrap())
        .sum();
    assert_eq!(calls, 2);
}

/// `ferry token new` writes a hashed line; ferryd started with that file refuses `ferry status`
/// without the token and answers with it; SIGHUP loads a token added while it runs.
#[tokio::test]
async fn token_file_from_ferry_token_new_and_sighup_reload() {
    let state = tempfile::tempdir().unwrap();
    let tokens = state.path().join("tokens");
    let new_token = |name: &str| {
        let out = Command::new(binary("ferry"))
            .args(["token", "new", "--name", name, "--file"])
            .arg(&tokens)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let first = new_token("first");
    let text = std::fs::read_to_string(&tokens).unwrap();
    assert!(
        text.starts_with("first sha256:") && !text.contains(&first),
        "hashed at rest"
    );

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(binary("ferryd"))
        .current_dir(repo_root())
        .args([
            "--config",
            "configs/edge.toml",
            "--load",
            "smollm2-135m-instruct",
        ])
        .args(["--router-enabled", "false"])
        .args(["--grpc-addr", &addr, "--http-addr", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state.path())
        .arg("--tokens-file")
        .arg(&tokens)
        .env("FERRY_MODEL_DIR", model_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let daemon = Daemon(child);
    wait_serving(&format!("http://{addr}")).await;
    let status = |token: Option<&str>| {
        let mut cmd = Command::new(binary("ferry"));
        cmd.args(["status", "--addr", &addr]);
        if let Some(t) = token {
            cmd.env("FERRY_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let refused = status(None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"));
    assert!(status(Some(&first)).status.success());
    let second = new_token("second");
    assert!(!status(Some(&second)).status.success(), "not loaded yet");
    assert!(Command::new("kill")
        .args(["-HUP", &daemon.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    let mut ok = false;
    for _ in 0..50 {
        if status(Some(&second)).status.success() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "SIGHUP loaded the new token");
}
