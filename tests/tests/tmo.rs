//! `ferry policy` on the TMO authors' M4A1 log (../shared/data/tmo-m4a1, cited in
//! shared/data/MANIFEST.md): the data parses to the published counts, a short seeded training
//! run is repeatable and its constrained policy stays in budget, policy files round-trip and bad
//! ones are refused with a clear error.

use std::path::PathBuf;

use ferry_integration::repo_root;
use ferry_lab::policy::{self, tmo, EnvArgs, EvalArgs, PolicyCommand, TrainArgs};
use tmo::Serve;

fn data_path() -> PathBuf {
    let p = repo_root().join("../shared/data/tmo-m4a1/M4A1.json");
    assert!(
        p.is_file(),
        "{} missing: the shared data folder must sit beside the repo",
        p.display()
    );
    p
}

fn env_args() -> EnvArgs {
    EnvArgs {
        data: data_path(),
        device: "jetson-tx2".into(),
        network: "wired".into(),
    }
}

fn train_args(algo: &str, steps: usize, seed: u64, out: PathBuf) -> TrainArgs {
    TrainArgs {
        env: policy::EnvName::M4a1,
        algo: algo.into(),
        steps,
        seed,
        out,
        env_args: env_args(),
        budget_sampling: "normal".into(),
        history: "logged".into(),
        hidden: vec![64, 64],
        json: false,
    }
}

#[test]
fn m4a1_parses_to_the_published_counts() {
    let d = policy::load_data(&data_path()).unwrap();
    assert_eq!(d.dialogues.len(), 100);
    assert_eq!(d.turns(), 352);
    assert_eq!(
        d.tasks,
        [
            "Assistive System",
            "Message Editing",
            "Query",
            "Recommendation"
        ]
    );
    // Logged actions (papers.md §3.4): local 170, cloud text 85, +1 view 19, +2 31, +3 47.
    let mut by_views = [0; 5];
    for t in d.dialogues.iter().flat_map(|d| &d.turns) {
        let k = if t.action.is_local() {
            0
        } else {
            1 + t.action.views_sent()
        };
        by_views[k] += 1;
    }
    assert_eq!(by_views, [170, 85, 19, 31, 47]);
    let (train, test) = d.split(42, 0.2);
    assert_eq!((train.len(), test.len()), (80, 20));
}

#[test]
fn short_constrained_training_is_repeatable_in_budget_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let data = policy::load_data(&data_path()).unwrap();
    let out = dir.path().join("rc.safetensors");
    let args = train_args("rc-a2c", 1500, 42, out.clone());
    let (p, report, _) = policy::train(&data, &args).unwrap();
    let (q, report2, _) = policy::train(&data, &args).unwrap();
    assert_eq!(report, report2);
    assert_eq!((report.steps, report.updates), (1500, 300));
    std::fs::write(&out, p.to_bytes().unwrap()).unwrap();
    let loaded = tmo::PlacementPolicy::from_bytes(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(loaded.meta(), q.meta());
    assert_eq!(loaded.meta().method(), "RC-A2C");
    assert_eq!(loaded.meta().test_dialogues.len(), 20);

    let costs = tmo::CostModel::reference();
    let bandit = policy::BanditArgs {
        steps: 2000,
        response_floor: None,
    };
    let run =
        |p: tmo::PlacementPolicy| policy::evaluate(&data, &mut [p], &[], &bandit, &costs).unwrap();
    let a = run(loaded);
    let b = run(q);
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
    let methods: Vec<&str> = a.rows.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        [
            "local-only",
            "cloud-only",
            "cloud-uniform",
            "random",
            "bandit",
            "bandit/online",
            "RC-A2C"
        ]
    );
    // The imputer's ceiling (the placer's own history) bounds every method.
    assert_eq!(a.ceiling.len(), 1);
    for r in &a.rows {
        assert!(
            r.mean.response <= a.ceiling_mean.own_history + 1e-9,
            "{} {} above the ceiling {:?}",
            r.method,
            r.mean.response,
            a.ceiling_mean
        );
    }
    assert!(a.ceiling_mean.logged_history > row_mean(&a, "local-only"));
    let row = |m: &str| &a.rows.iter().find(|r| r.method == m).unwrap().mean;
    assert_eq!(row("RC-A2C").violation, 0.0);
    assert_eq!(row("bandit").violation, 0.0);
    assert_eq!(row("bandit/online").violation, 0.0);
    assert!(a.bandit_response_floor > 0.5 && a.bandit_response_floor < 2.0);
    assert_eq!(row("local-only").violation, 0.0);
    // Sending all views on every turn breaks the $0.05 budget in 4- and 5-turn dialogues.
    assert!(row("cloud-only").cost_violation > 0.0);
    assert!(row("local-only").latency_s < 0.06);
    let text = policy::render(&a);
    assert!(text.contains("RC-A2C") && text.contains("violation") && text.contains("ceiling"));

    // The agent's-own-history protocol stays available, and its rows are named for it.
    let mut own = train_args("rc-a2c", 300, 42, out);
    own.history = "own".into();
    let (p, _, _) = policy::train(&data, &own).unwrap();
    assert_eq!(p.meta().label(), "RC-A2C/own");
    let t = run(p);
    assert!(t.rows.iter().any(|r| r.method == "RC-A2C/own"));
    own.history = "mine".into();
    assert!(policy::train(&data, &own).is_err());
}

fn row_mean(t: &policy::Table, method: &str) -> f64 {
    t.rows
        .iter()
        .find(|r| r.method == method)
        .unwrap()
        .mean
        .response
}

#[test]
fn bad_policy_files_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let eval = |path: PathBuf| {
        policy::run(PolicyCommand::Eval(EvalArgs {
            policies: vec![path],
            seeds: vec![42],
            bandit_steps: 10,
            bandit_response_floor: None,
            env_args: env_args(),
            json: true,
        }))
        .unwrap_err()
    };
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    let e = format!("{:#}", eval(junk));
    assert!(
        e.contains("junk.safetensors") && e.contains("not a safetensors file"),
        "{e}"
    );
    let missing = format!("{:#}", eval(dir.path().join("absent.safetensors")));
    assert!(missing.contains("absent.safetensors"), "{missing}");
    // A policy for another split of the data (a different log file) is refused.
    let data = policy::load_data(&data_path()).unwrap();
    let out = dir.path().join("p.safetensors");
    let (p, _, _) = policy::train(&data, &train_args("a2c", 5, 42, out)).unwrap();
    let mut fewer = data.clone();
    fewer.dialogues.truncate(90);
    let bandit = policy::BanditArgs {
        steps: 10,
        response_floor: None,
    };
    let e = policy::evaluate(&fewer, &mut [p], &[], &bandit, &tmo::CostModel::reference())
        .unwrap_err()
        .to_string();
    assert!(e.contains("another split"), "{e}");
    assert!(policy::train(&data, &train_args("sarsa", 5, 42, dir.path().join("x"))).is_err());
}
