//! `ferry bench` against its peer: a comparison whose peer (llama.cpp) cannot run has failed, so
//! the command still prints ferry's figures, says why the peer is missing and exits non-zero;
//! `--no-peer` measures ferry alone and succeeds. Real binary, bundled model, tiny sizes. The same
//! for `ferry bench ttft`, which starts the real ferryd and streams over its OpenAI API.

use std::process::{Command, Output};

use ferry_integration::{binary, model_dir, repo_root};

fn bench(extra: &[&str]) -> Output {
    Command::new(binary("ferry"))
        .current_dir(repo_root())
        .args(["bench", "--model", "smollm2-135m-instruct", "--model-dir"])
        .arg(model_dir())
        .args([
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--repeats",
            "1",
        ])
        .args(extra)
        .output()
        .expect("ferry bench runs")
}

#[test]
fn a_peer_that_cannot_run_fails_the_benchmark() {
    let missing = tempfile::tempdir().unwrap();
    let python = missing.path().join("no-such-python");
    let out = bench(&["--peer-python", python.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "exit 0 without a peer:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("ferry"),
        "ferry's table still printed: {stdout}"
    );
    assert!(
        stderr.contains("the peer (llama.cpp) did not run") && stderr.contains("no-such-python"),
        "{stderr}"
    );

    // The JSON form carries the reason and fails the same way.
    let out = bench(&["--peer-python", python.to_str().unwrap(), "--json"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert!(v["peer"].is_null());
    assert!(v["peer_error"]
        .as_str()
        .is_some_and(|e| e.contains("no-such-python")));
    assert!(v["ferry"]["decode_tok_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn no_peer_measures_ferry_alone() {
    let out = bench(&["--no-peer", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["peer_error"].is_null());
    assert!(v["ferry"]["decode_tok_s"].as_f64().unwrap() > 0.0);
}

fn ttft(extra: &[&str]) -> Output {
    Command::new(binary("ferry"))
        .current_dir(repo_root())
        .args(["bench", "ttft", "--model-dir"])
        .arg(model_dir())
        .args([
            "--load",
            "smollm2-135m-instruct",
            "--targets",
            "auto,smollm2-135m-instruct",
            "--requests",
            "2",
            "--max-tokens",
            "2",
            "--json",
        ])
        .args(extra)
        .output()
        .expect("ferry bench ttft runs")
}

#[test]
fn ttft_streams_through_ferryd_and_fails_without_its_peer() {
    let missing = tempfile::tempdir().unwrap();
    let python = missing.path().join("no-such-python");
    let out = ttft(&["--peer-python", python.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0 without a peer: {stderr}");
    assert!(
        stderr.contains("the peer (llama.cpp) did not run"),
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert!(v["peer"].is_null());
    assert!(v["peer_error"]
        .as_str()
        .is_some_and(|e| e.contains("no-such-python")));
    // ferryd's side was measured: auto first (the first request after start), then the model.
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["target"], "auto");
    for r in rows {
        assert_eq!(r["requests"], 2);
        let (first, p50) = (
            r["first_ms"].as_f64().unwrap(),
            r["p50_ms"].as_f64().unwrap(),
        );
        assert!(first > 0.0 && p50 > 0.0, "{r}");
        assert!(r["min_ms"].as_f64().unwrap() <= r["max_ms"].as_f64().unwrap());
    }
    if cfg!(target_os = "linux") {
        assert!(v["rss_loaded_mb"].as_f64().unwrap() > 10.0, "{v}");
    }

    let out = ttft(&["--no-peer"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["peer"].is_null() && v["peer_error"].is_null());
}
