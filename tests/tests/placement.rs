//! TMO placement inside ferryd with a policy trained here on the authors' M4A1 log
//! (../shared/data/tmo-m4a1): each request's completion says what the policy chose; a cloud
//! choice, with no cloud tier configured, is a reported fallback to local (tests/offload.rs
//! covers cloud choices with a cloud tier); the dialogue's turns are
//! counted; an unknown task and a malformed policy file are refused clearly; a reload swaps the
//! policy.

use std::path::PathBuf;

use ferry_integration::{greedy, run, train_policy as train, TestServer};
use ferry_router::tmo::Serve;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_policy_decides_each_turn_and_reports_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("placement.safetensors");
    train("rc-a2c", &file);
    let f = file.clone();
    let mut t = TestServer::start(move |c| c.placement.policy_file = Some(f)).await;

    for turn in 1..=3 {
        let mut req = greedy("What is on the table?", 2);
        req.dialogue_id = "kitchen-1".into();
        req.task = "Query".into();
        let (_, _, done) = run(&mut t.client, req).await.unwrap();
        let p = done.placement.unwrap();
        assert!(p.reason.starts_with("tmo RC-A2C"), "{}", p.reason);
        assert!(p.reason.contains(&format!("turn {turn}")), "{}", p.reason);
        // No cloud tier configured: a cloud choice is a reported fallback, and it ran locally.
        assert_eq!(p.fallback, p.reason.contains("chose cloud"), "{}", p.reason);
        assert_eq!(done.tier, ferry_proto::v1::Tier::Local as i32);
    }
    let placer = t.server.state.placement.as_ref().unwrap();
    assert_eq!(placer.turns("kitchen-1"), 3);

    let mut bad = greedy("Hi", 2);
    bad.task = "Juggling".into();
    let e = run(&mut t.client, bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("Query"), "{}", e.message());

    // A reload swaps the policy; a broken file keeps the running one.
    train("a2c", &file);
    assert_eq!(placer.reload().unwrap(), "A2C");
    let (_, _, done) = run(&mut t.client, greedy("Hi", 2)).await.unwrap();
    assert!(done.placement.unwrap().reason.starts_with("tmo A2C"));
    std::fs::write(&file, b"not a policy").unwrap();
    assert!(placer.reload().is_err());
    assert_eq!(placer.policy().meta().method(), "A2C");
    t.server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_malformed_policy_file_stops_the_daemon_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.safetensors");
    std::fs::write(&file, b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage").unwrap();
    let mut c = ferry_integration::test_config(dir.path());
    c.placement.policy_file = Some(file);
    let e = match ferry_edge::RunningServer::start(c).await {
        Ok(_) => panic!("started with a broken policy"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("placement policy"), "{e}");
}
