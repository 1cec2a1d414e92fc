//! Routing of `model: "auto"` inside ferryd, with the real models: MESS+ and mixrank (the
//! default) decisions and their reasons, feedback moving `Q_tracked` or mixrank's SLA debt and
//! rates, `Status`, and the learned state surviving a restart or being set aside when corrupt
//! or learned by another policy.

use ferry_integration::{greedy, run, TestServer};
use ferry_proto::v1 as pb;

/// The local zoo the router chooses from: the bundled default model and the second family.
fn zoo() -> Vec<String> {
    ferry_integration::local_zoo()
}

fn routed(c: &mut ferry_edge::EdgeConfig, state_dir: Option<&std::path::Path>) {
    c.models.load = zoo();
    c.router.enabled = true;
    c.router.policy = "mess-plus-fb".into();
    // No exploration: every decision is the argmin, so the test knows which path ran.
    c.router.c = 0.0;
    c.router.alpha = 0.7;
    c.router.save_interval_ms = 100;
    if let Some(d) = state_dir {
        c.state.dir = d.to_path_buf();
    }
}

async fn status(t: &mut TestServer) -> pb::RouterStatus {
    let s = t
        .client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(s.ready);
    assert_eq!(s.routers.len(), 1, "one router, for the local tier");
    s.routers[0].clone()
}

async fn feedback(t: &mut TestServer, id: &str, satisfied: bool) -> bool {
    t.client
        .feedback(pb::FeedbackRequest {
            request_id: id.into(),
            satisfied,
            score: None,
        })
        .await
        .unwrap()
        .into_inner()
        .replaced
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_is_routed_by_mess_plus_and_feedback_moves_q_tracked() {
    let mut t = TestServer::start(|c| routed(c, None)).await;
    let zoo = zoo();
    let mut ids = Vec::new();
    for q in ["What is 2+2?", "Name a colour.", "Say hi."] {
        let (_, _, done) = run(&mut t.client, greedy(q, 3)).await.unwrap();
        assert!(zoo.contains(&done.model), "{} not in the zoo", done.model);
        let reason = done.placement.unwrap().reason;
        assert!(reason.starts_with("mess-plus-fb argmin"), "{reason}");
        assert!(done.energy.unwrap().joules.is_some());
        ids.push(done.request_id);
    }
    let r = status(&mut t).await;
    assert_eq!(r.requests, 3);
    assert_eq!(r.explored, 0);
    assert_eq!(r.models.iter().map(|m| m.calls).sum::<u64>(), 3);
    assert_eq!(
        r.models.iter().map(|m| m.model.clone()).collect::<Vec<_>>(),
        zoo
    );
    // Without feedback only Q moves (by alpha - predicted satisfaction); Q_tracked waits.
    assert_eq!(r.q_tracked, 0.0);
    assert!(r.q >= 0.0);
    assert!(r
        .models
        .iter()
        .filter(|m| m.calls > 0)
        .all(|m| m.mean_joules.is_some_and(|j| j > 0.0)));

    assert!(!feedback(&mut t, &ids[0], false).await);
    let r = status(&mut t).await;
    assert!(
        (r.q_tracked - 0.7).abs() < 1e-9,
        "Q_tracked {}",
        r.q_tracked
    );
    assert_eq!((r.feedback, r.satisfied), (1, 0));
    // A replacement is recorded but not learned twice.
    assert!(feedback(&mut t, &ids[0], true).await);
    assert!(!feedback(&mut t, &ids[1], true).await);
    let r = status(&mut t).await;
    // max(0, 0.7 + 0.7 - 1): only the second request's label moved it.
    assert!(
        (r.q_tracked - 0.4).abs() < 1e-9,
        "Q_tracked {}",
        r.q_tracked
    );
    assert_eq!((r.feedback, r.satisfied), (2, 1));

    // A request naming its model bypasses the router.
    let mut named = greedy("Hi", 2);
    named.model = zoo[0].clone();
    let (_, _, done) = run(&mut t.client, named).await.unwrap();
    assert_eq!(done.placement.unwrap().reason, "model named by the request");
    assert_eq!(status(&mut t).await.requests, 3);
    t.server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exploration_runs_every_model_and_serves_the_most_capable() {
    let mut t = TestServer::start(|c| {
        routed(c, None);
        // p_1 = min(1, c) = 1: the first request explores.
        c.router.c = 1.0;
    })
    .await;
    let zoo = zoo();
    let (_, _, done) = run(&mut t.client, greedy("What is the capital of France?", 3))
        .await
        .unwrap();
    assert_eq!(&done.model, zoo.last().unwrap());
    let reason = done.placement.unwrap().reason;
    assert!(reason.contains("explore"), "{reason}");
    // The other models run after the answer, holding the slot; wait for them.
    let mut r = status(&mut t).await;
    for _ in 0..200 {
        if r.models.iter().all(|m| m.mean_joules.is_some()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        r = status(&mut t).await;
    }
    assert_eq!(r.explored, 1);
    assert!(
        r.models.iter().all(|m| m.mean_joules.is_some()),
        "every zoo model was measured: {:?}",
        r.models
    );
    assert_eq!(r.models.last().unwrap().calls, 1);
    t.server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_state_survives_restart_and_a_corrupt_file_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("router-local.json");

    let mut t = TestServer::start(|c| routed(c, Some(dir.path()))).await;
    let (_, _, a) = run(&mut t.client, greedy("One?", 2)).await.unwrap();
    run(&mut t.client, greedy("Two?", 2)).await.unwrap();
    feedback(&mut t, &a.request_id, false).await;
    let before = status(&mut t).await;
    t.server.shutdown(std::time::Duration::from_secs(5)).await;
    assert!(file.is_file(), "state written on shutdown");

    let mut t = TestServer::start(|c| routed(c, Some(dir.path()))).await;
    let after = status(&mut t).await;
    assert_eq!(after.requests, before.requests);
    assert_eq!(after.q_tracked, before.q_tracked);
    assert_eq!(after.q, before.q);
    assert_eq!((after.feedback, after.satisfied), (1, 0));
    assert_eq!(after.models, before.models);
    assert!(after.saved_unix_ms > 0);
    t.server.shutdown(std::time::Duration::from_secs(5)).await;

    // A torn or foreign file: set aside with a warning, learning restarts, the daemon serves.
    std::fs::write(&file, b"{\"format\": \"ferry-router-state\", \"vers").unwrap();
    let mut t = TestServer::start(|c| routed(c, Some(dir.path()))).await;
    let fresh = status(&mut t).await;
    assert_eq!(fresh.requests, 0);
    assert_eq!(fresh.q_tracked, 0.0);
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("router-local.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    run(&mut t.client, greedy("Still serving?", 2))
        .await
        .unwrap();
    t.server.shutdown(std::time::Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------------
// mixrank, the default policy.

fn mixrank(c: &mut ferry_edge::EdgeConfig, state_dir: &std::path::Path) {
    c.models.load = zoo();
    c.router.enabled = true;
    c.router.alpha = 0.7;
    c.router.save_interval_ms = 100;
    c.state.dir = state_dir.to_path_buf();
}

fn asking_feedback(q: &str) -> pb::GenerateRequest {
    let mut r = greedy(q, 3);
    r.expect_feedback = true;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixrank_learns_costs_rates_and_debt_and_keeps_them_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let zoo = zoo();
    let mut t = TestServer::start(|c| mixrank(c, dir.path())).await;
    // Each model serves once, in zoo order, so its cost is known before it is weighed.
    let mut ids = Vec::new();
    for (i, q) in ["What is 2+2?", "Name a colour."].into_iter().enumerate() {
        let (_, _, done) = run(&mut t.client, asking_feedback(q)).await.unwrap();
        assert_eq!(done.model, zoo[i]);
        let reason = done.placement.unwrap().reason;
        assert!(
            reason.starts_with("mixrank: first run, to learn its cost"),
            "{reason}"
        );
        ids.push(done.request_id);
    }
    let r = status(&mut t).await;
    assert_eq!(r.policy, "mixrank");
    assert_eq!(r.requests, 2);
    assert_eq!(r.debt, 0.0);
    assert!(r.prior.is_empty());
    for m in &r.models {
        assert!(m.mean_joules.is_some_and(|j| j > 0.0), "{m:?}");
        let (rate, lo, hi) = (m.rate.unwrap(), m.rate_low.unwrap(), m.rate_high.unwrap());
        assert!(0.0 <= lo && lo <= rate && rate <= hi && hi <= 1.0, "{m:?}");
        assert_eq!(m.labels, 0);
    }
    let prior_rate = r.models[0].rate.unwrap();

    // A label moves the debt by alpha - s and the served model's rate.
    assert!(!feedback(&mut t, &ids[0], false).await);
    let r = status(&mut t).await;
    assert!((r.debt - 0.7).abs() < 1e-9, "debt {}", r.debt);
    assert_eq!(r.models[0].labels, 1);
    assert!(r.models[0].rate.unwrap() < prior_rate);
    assert!(feedback(&mut t, &ids[0], true).await, "a replacement");
    assert!(!feedback(&mut t, &ids[1], true).await);
    let r = status(&mut t).await;
    assert!((r.debt - 0.4).abs() < 1e-9, "debt {}", r.debt);
    assert_eq!((r.feedback, r.satisfied), (2, 1));
    // Without expect_feedback nothing is tried.
    let (_, _, done) = run(&mut t.client, greedy("Say hi.", 3)).await.unwrap();
    let reason = done.placement.unwrap().reason;
    assert!(
        reason.starts_with("mixrank: predicted satisfaction"),
        "{reason}"
    );
    // A request's task gets its own rates in mixrank (kept in the saved state).
    let mut with_task = greedy("What is 3+4?", 3);
    with_task.task = "arithmetic".into();
    run(&mut t.client, with_task).await.unwrap();
    let before = status(&mut t).await;
    assert_eq!(before.explored, 0);
    t.server.shutdown(std::time::Duration::from_secs(5)).await;
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("router-local.json")).unwrap())
            .unwrap();
    assert_eq!(
        saved["mixrank"]["tasks"][0][0], "arithmetic",
        "{}",
        saved["mixrank"]["tasks"]
    );

    let mut t = TestServer::start(|c| mixrank(c, dir.path())).await;
    let after = status(&mut t).await;
    assert_eq!(after.requests, 4);
    assert_eq!(after.debt, before.debt);
    assert_eq!(after.models, before.models);
    t.server.shutdown(std::time::Duration::from_secs(5)).await;

    // State learned by another policy family is set aside as stale, not misread.
    let mut t = TestServer::start(|c| {
        mixrank(c, dir.path());
        c.router.policy = "mess-plus".into();
    })
    .await;
    assert_eq!(status(&mut t).await.requests, 0);
    t.server.shutdown(std::time::Duration::from_secs(5)).await;
    let stale = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("router-local.json.stale-")
        })
        .count();
    assert_eq!(stale, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixrank_loads_a_difficulty_prior_and_refuses_one_for_another_encoder() {
    use ferry_router::mixrank::prior::{DifficultyPrior, FORMAT, VERSION};
    let dir = tempfile::tempdir().unwrap();
    let prior = |encoder: &str, dim: usize| DifficultyPrior {
        format: FORMAT.into(),
        version: VERSION,
        encoder: encoder.into(),
        dim,
        weights: ferry_router::predictor::F32s(vec![0.01; dim]),
        bias: 0.0,
        trained_on: vec!["arc_easy".into(), "boolq".into()],
        questions: 2,
        labels: 6,
        l2: 1.0,
        heldout_logloss: 0.6,
        heldout_logloss_without: 0.65,
        command: "test".into(),
    };
    let good = dir.path().join("prior.json");
    std::fs::write(&good, prior("all-minilm-l6-v2", 384).to_json()).unwrap();
    let mut t = TestServer::start(|c| {
        mixrank(c, dir.path());
        c.router.prior = Some(good.clone());
    })
    .await;
    let (_, _, done) = run(&mut t.client, asking_feedback("What is 2+2?"))
        .await
        .unwrap();
    assert!(zoo().contains(&done.model));
    let r = status(&mut t).await;
    assert_eq!(
        r.prior,
        "ferry-difficulty-prior v1 trained on arc_easy,boolq"
    );
    t.server.shutdown(std::time::Duration::from_secs(5)).await;

    let bad = dir.path().join("other.json");
    std::fs::write(&bad, prior("some-other-encoder", 384).to_json()).unwrap();
    let mut cfg = ferry_edge::EdgeConfig::default();
    mixrank(&mut cfg, dir.path());
    cfg.router.prior = Some(bad);
    let err =
        ferry_edge::router::load_prior(cfg.router.prior.as_ref().unwrap(), "all-minilm-l6-v2")
            .unwrap_err();
    assert!(err.to_string().contains("some-other-encoder"), "{err}");
    // The shipped prior loads for the default encoder's embedding space (the int8 encoder
    // embeds like the f32 one it was trained on) and says what trained it.
    let shipped = ferry_edge::router::load_prior(
        &ferry_integration::repo_root().join("models/priors/difficulty-minilm-v1.json"),
        "all-minilm-l6-v2",
    )
    .unwrap();
    assert!(shipped
        .trained_on
        .iter()
        .any(|b| b == "mess-llama/arc_easy"));
    assert!(shipped.heldout_logloss <= shipped.heldout_logloss_without);
    assert!(shipped.command.starts_with("ferry router train-prior"));
}

// ---------------------------------------------------------------------------------------------
// The judge: the costliest local model grades answers no app sends Feedback on.

/// Status once the judge has graded at least `n` answers (it runs after the app's answer).
async fn judged(t: &mut TestServer, n: u64) -> pb::RouterStatus {
    let mut r = status(t).await;
    for _ in 0..1200 {
        if r.judge_verdicts >= n {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        r = status(t).await;
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judge_grades_answers_without_feedback_and_teaches_mixrank_apart_from_the_apps() {
    let dir = tempfile::tempdir().unwrap();
    let judge = zoo().last().unwrap().clone();
    let mut t = TestServer::start(|c| {
        mixrank(c, dir.path());
        c.router.judge.model = Some(judge.clone());
        c.router.judge.share = 1.0;
    })
    .await;
    // A request whose app will send Feedback is left to the app...
    let (_, _, own) = run(&mut t.client, asking_feedback("Name a colour."))
        .await
        .unwrap();
    // ...the others are graded.
    for q in [
        "What is the capital of France?",
        "What is 2+2?",
        "Is the sun a star?",
    ] {
        run(&mut t.client, greedy(q, 12)).await.unwrap();
    }
    let r = judged(&mut t, 3).await;
    assert_eq!(r.judge_model, judge);
    assert_eq!(r.judge_verdicts, 3, "each judged answer graded once: {r:?}");
    assert!(r.judge_satisfied <= 3);
    assert_eq!(
        (r.feedback, r.satisfied),
        (0, 0),
        "judge labels are not feedback"
    );
    let labels: u64 = r.models.iter().map(|m| m.labels).sum();
    assert_eq!(labels, 3, "every grade taught mixrank: {:?}", r.models);
    // The app's own label still teaches its request.
    assert!(!feedback(&mut t, &own.request_id, true).await);
    let r = status(&mut t).await;
    assert_eq!((r.feedback, r.satisfied), (1, 1));
    assert_eq!(r.models.iter().map(|m| m.labels).sum::<u64>(), 4);
    t.server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judge_grades_every_answer_of_a_mess_plus_exploration_step() {
    let judge = zoo().last().unwrap().clone();
    let mut t = TestServer::start(|c| {
        routed(c, None);
        c.router.policy = "mess-plus".into();
        // p_1 = 1: the first request explores; the judge grades it whatever its share.
        c.router.c = 1.0;
        c.router.judge.model = Some(judge.clone());
        c.router.judge.share = 0.0;
    })
    .await;
    let (_, _, done) = run(&mut t.client, greedy("What is the capital of France?", 12))
        .await
        .unwrap();
    assert!(done.placement.unwrap().reason.contains("explore"));
    let r = judged(&mut t, 2).await;
    assert_eq!(r.explored, 1);
    assert_eq!(
        r.judge_verdicts,
        zoo().len() as u64,
        "both models' answers graded: {r:?}"
    );
    assert_eq!(r.feedback, 0);
    t.server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixrank_learns_a_written_off_model_beside_the_served_one_through_the_judge() {
    // A zoo of three: SmolLM2, the same SmolLM2 under a second id (a manifest sharing its
    // files), and Gemma, which also judges every routed answer.
    let dir = tempfile::tempdir().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    let repo = ferry_integration::repo_root().join("models");
    for e in std::fs::read_dir(&repo).unwrap().filter_map(|e| e.ok()) {
        if e.path().extension().is_some_and(|x| x == "toml") {
            std::fs::copy(e.path(), manifests.path().join(e.file_name())).unwrap();
        }
    }
    let twin = "smollm2-twin";
    let smol = std::fs::read_to_string(repo.join("smollm2-135m-instruct.toml")).unwrap();
    let twin_manifest = smol.replacen(
        "id = \"smollm2-135m-instruct\"",
        &format!("id = \"{twin}\"\ndir = \"smollm2-135m-instruct\""),
        1,
    );
    std::fs::write(manifests.path().join("twin.toml"), twin_manifest).unwrap();
    let judge = zoo().last().unwrap().clone();
    let config = |c: &mut ferry_edge::EdgeConfig| {
        mixrank(c, dir.path());
        c.models.manifest_dir = manifests.path().to_path_buf();
        c.models.load = vec![zoo()[0].clone(), twin.into(), judge.clone()];
        c.router.alpha = 0.85;
        c.router.judge.model = Some(judge.clone());
        c.router.judge.share = 1.0;
    };
    let mut t = TestServer::start(config).await;
    let r = status(&mut t).await;
    let ids: Vec<&str> = r.models.iter().map(|m| m.model.as_str()).collect();
    assert_eq!(ids, [zoo()[0].as_str(), twin, judge.as_str()]);
    t.server.shutdown(std::time::Duration::from_secs(5)).await;

    // What 300 requests taught it, written into its state: the first SmolLM2 is poor (10 of
    // 40), Gemma is good (57 of 60), and the twin lost its first 4 answers, so it is off the
    // mix, but a good rate would let it take Gemma's place at a fifth of its price;
    // and the SLA is 20 requests in debt, so Gemma serves (the debt is paid with the model
    // known to be good, never with one still to be learned).
    let path = dir.path().join("router-local.json");
    let mut saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let m = &mut saved["mixrank"];
    m["rate_counts"]["global"] = serde_json::json!([
        {"satisfied": 10.0, "unsatisfied": 30.0},
        {"satisfied": 0.0, "unsatisfied": 4.0},
        {"satisfied": 57.0, "unsatisfied": 3.0},
    ]);
    m["cost_sum"] = serde_json::json!([1000.0, 4000.0, 20000.0]);
    m["cost_n"] = serde_json::json!([1000, 1000, 1000]);
    m["labels"] = serde_json::json!([40, 4, 60]);
    m["served"] = serde_json::json!([40, 4, 60]);
    m["t"] = serde_json::json!(300);
    m["debt"] = serde_json::json!(20.0);
    std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).unwrap();

    // Every judged request may explore: Gemma serves, and the twin runs beside it.
    let mut t = TestServer::start(config).await;
    let (_, _, done) = run(&mut t.client, greedy("What is 2 plus 1?", 6))
        .await
        .unwrap();
    let reason = done.placement.unwrap().reason;
    assert!(reason.contains(&format!("{twin} also runs")), "{reason}");
    assert_eq!(done.model, judge, "{reason}");
    // The judge grades the served answer and the twin's; the twin's run is charged to its
    // cost (its mean moves off the written 4 J) but it served nothing, and a grade of its
    // answer, where the judge gave one, is one more label for it.
    let r = judged(&mut t, 2).await;
    assert!(r.judge_verdicts <= 2, "{r:?}");
    let twin_status = &r.models[1];
    assert_eq!(twin_status.calls, 0, "the twin served nothing: {r:?}");
    assert!(r.judge_verdicts < 2 || twin_status.labels == 5, "{r:?}");
    // Only the served answer's grade moves the SLA debt (20 + 0.85 - s).
    assert!(
        [20.0, 19.85, 20.85]
            .iter()
            .any(|d| (r.debt - d).abs() < 1e-9),
        "debt {}",
        r.debt
    );
    assert!(
        twin_status
            .mean_joules
            .is_some_and(|j| (j - 4.0).abs() > 1e-9),
        "{twin_status:?}"
    );
    assert_eq!(
        (r.feedback, r.satisfied),
        (0, 0),
        "judge labels are not feedback"
    );
    t.server.shutdown(std::time::Duration::from_secs(5)).await;
}
