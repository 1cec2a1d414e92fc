//! ferryd exports its energy totals through the `metrics` facade: with a recorder installed (the
//! Prometheus one in production, a debugging one here) the per-model and per-source figures move
//! with traffic. One test per binary: the recorder is process-global.

use ferry_integration::{greedy, run, TestServer, DEFAULT_MODEL};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[tokio::test]
async fn energy_metrics_move_with_traffic() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("first recorder in this process");
    let empty_sysfs = tempfile::tempdir().unwrap();
    let root = empty_sysfs.path().to_path_buf();
    let mut t = TestServer::start(move |c| c.energy.sysfs_root = root).await;
    let mut joules = 0.0;
    for _ in 0..2 {
        let (_, _, c) = run(&mut t.client, greedy("Hi", 6)).await.unwrap();
        joules += c.energy.unwrap().joules.unwrap();
    }
    let snap = snapshotter.snapshot().into_vec();
    let find = |name: &str, label: (&str, &str)| {
        snap.iter()
            .find(|(key, _, _, _)| {
                key.key().name() == name
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == label.0 && l.value() == label.1)
            })
            .map(|(_, _, _, v)| v)
            .unwrap_or_else(|| panic!("metric {name} with {label:?} missing"))
    };
    match find("ferry_request_energy_joules", ("model", DEFAULT_MODEL)) {
        DebugValue::Histogram(samples) => assert_eq!(samples.len(), 2),
        other => panic!("{other:?}"),
    }
    match find("ferry_model_energy_joules", ("model", DEFAULT_MODEL)) {
        DebugValue::Gauge(v) => assert!((v.into_inner() - joules).abs() < 1e-9),
        other => panic!("{other:?}"),
    }
    match find("ferry_energy_joules", ("account", "measured")) {
        DebugValue::Gauge(v) => assert!(v.into_inner() >= joules),
        other => panic!("{other:?}"),
    }
}
