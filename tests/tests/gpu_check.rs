//! The CPU-side parts of `scripts/gpu-check` (argument handling, the engine bench and its JSON,
//! the refusal of `ferry bench requests` without NVML, the idle sampler, the summary tables), run
//! as `scripts/gpu-check --dry-run` with the real `ferry` binary and the bundled model. The GPU
//! parts run only on a GPU machine; their numbers are in the README.

use std::process::Command;

use ferry_integration::{binary, model_dir, repo_root};

#[test]
fn gpu_check_dry_run_writes_every_file_and_the_summary() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(repo_root().join("scripts/gpu-check"))
        .arg("--dry-run")
        .arg("--bin")
        .arg(binary("ferry"))
        .arg("--model-dir")
        .arg(model_dir())
        .args(["--models", "smollm2-135m-instruct"])
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("scripts/gpu-check runs");
    let log = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "gpu-check --dry-run failed:\n{log}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(log.contains("refused without NVML, as it should"), "{log}");
    for f in [
        "gpu.txt",
        "bench.json",
        "requests.json",
        "sampler.json",
        "summary.md",
        "log.txt",
    ] {
        assert!(out.path().join(f).is_file(), "{f} missing:\n{log}");
    }
    let bench: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("bench.json")).unwrap())
            .unwrap();
    let run0 = &bench[0];
    assert_eq!(run0["model"], "smollm2-135m-instruct");
    assert_eq!(run0["ferry"]["device"], "cpu");
    assert!(run0["ferry"]["decode_tok_s"].as_f64().unwrap() > 0.0);
    let summary = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    for needle in [
        "| smollm2-135m-instruct | cpu | 16 | 8 |",
        "| exact | 2 |",
        "| ticks | 2 |",
        "| 10 Hz | estimate |",
        "| 100 Hz | estimate |",
    ] {
        assert!(summary.contains(needle), "{needle} in\n{summary}");
    }
}
