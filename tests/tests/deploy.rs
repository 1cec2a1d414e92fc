//! The systemd deployment: the unit passes `systemd-analyze verify`, the install script stages
//! binaries, unit, config and manifests, the installed config is valid, and the real ferryd
//! speaks sd_notify — READY=1 only once it serves, watchdog pings, STOPPING=1 on SIGTERM —
//! to a NOTIFY_SOCKET this test binds itself.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_integration::{binary, client, free_port, model_dir, repo_root};
use ferry_proto::v1 as pb;

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo_root().join("deploy/systemd/ferryd.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    assert!(unit.contains("ProtectSystem=strict") && unit.contains("NoNewPrivileges=true"));
    // verify insists that ExecStart exists: point it at the binary this suite built.
    let local = unit.replace("/usr/local/bin/ferryd", binary("ferryd").to_str().unwrap());
    let path = dir.path().join("ferryd.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (Debian's systemd package)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Unknown keys are only warnings for verify: any output is a failure here.
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze warned:\n{stderr}"
    );
}

#[test]
fn install_script_stages_everything_and_the_config_is_valid() {
    let stage = tempfile::tempdir().unwrap();
    let bins = binary("ferryd").parent().unwrap().to_path_buf();
    let out = Command::new(repo_root().join("deploy/install.sh"))
        .arg("--no-build")
        .env("DESTDIR", stage.path())
        .env("FERRY_BIN_DIR", &bins)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = stage.path();
    for f in [
        "usr/local/bin/ferryd",
        "usr/local/bin/ferry",
        "etc/systemd/system/ferryd.service",
        "etc/ferry/edge.toml",
        "usr/local/share/ferry/models/smollm2-135m-instruct.toml",
        "usr/local/share/ferry/models/gemma3-270m-it.toml",
    ] {
        assert!(root.join(f).is_file(), "{f} not installed");
    }
    let config = ferry_edge::EdgeConfig::from_file(&root.join("etc/ferry/edge.toml")).unwrap();
    assert_eq!(
        config.models.manifest_dir,
        std::path::Path::new("/usr/local/share/ferry/models")
    );
    assert!(config.server.grpc_addr.ip().is_loopback());
    assert!(config.router.enabled);
    // A second run keeps an operator's edits.
    std::fs::write(root.join("etc/ferry/edge.toml"), "# edited\n").unwrap();
    let again = Command::new(repo_root().join("deploy/install.sh"))
        .arg("--no-build")
        .env("DESTDIR", root)
        .env("FERRY_BIN_DIR", &bins)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(root.join("etc/ferry/edge.toml")).unwrap(),
        "# edited\n"
    );
}

fn recv(sock: &UnixDatagram, deadline: Instant) -> Option<String> {
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => return Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferryd_notifies_ready_only_when_serving_and_feeds_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&notify_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(binary("ferryd"))
        .current_dir(repo_root())
        .args(["--config", "configs/edge.toml"])
        .args(["--grpc-addr", &addr, "--http-addr", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("FERRY_MODEL_DIR", model_dir())
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(180);
    let first = recv(&sock, deadline).expect("a first notification");
    assert_eq!(first, "STATUS=loading models");
    let ready = recv(&sock, deadline).expect("READY=1 after loading");
    assert_eq!(ready, "READY=1\nSTATUS=serving");
    // READY means serving: the models are loaded and the router state is restored.
    let mut c = client(&format!("http://{addr}")).await;
    let status = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert!(status.ready);
    assert_eq!(
        status.routers.len(),
        1,
        "router state restored before READY"
    );
    let mut pings = 0;
    while pings < 2 {
        let m = recv(&sock, Instant::now() + Duration::from_secs(5)).expect("watchdog ping");
        assert_eq!(m, "WATCHDOG=1");
        pings += 1;
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut stopping = false;
    while let Some(m) = recv(&sock, Instant::now() + Duration::from_secs(10)) {
        if m.starts_with("STOPPING=1") {
            stopping = true;
            break;
        }
        assert_eq!(m, "WATCHDOG=1");
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    assert!(child.wait().unwrap().success());
}

#[test]
fn jetson_config_is_valid_and_counts_the_power_rails() {
    let c =
        ferry_edge::EdgeConfig::from_file(&repo_root().join("deploy/jetson/edge.toml")).unwrap();
    assert_eq!(c.energy.sources, vec!["ina3221"]);
    assert!(c.server.grpc_addr.ip().is_loopback());
    assert_eq!(c.server.max_concurrent, 1);
}
