//! `ferry policy`: train a TMO placement policy on the M4A1 dialogue log, and evaluate policies
//! beside the baselines (local-only, cloud-only with all views, random) and the constrained
//! bandit. The learning and the environment are `ferry_router::tmo`; this module reads and
//! writes files and prints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

pub use ferry_router::tmo;
use ferry_router::tmo::Serve;
use ferry_router::tmo::{
    eval, learn, policy, BanditConfig, Ceiling, ConstrainedBandit, CostModel, Dataset, Env,
    EnvConfig, Metrics, PlacementPolicy, TrainConfig, TrainReport,
};

/// `ferry policy ...`
#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Train a placement policy (A2C, PPO or DQN, plain or resource-constrained) and save it
    /// as safetensors.
    Train(TrainArgs),
    /// Evaluate saved policies on their held-out dialogues beside local-only, cloud-only, random
    /// and the constrained bandit.
    Eval(EvalArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EnvName {
    /// TMO's M4A1 multi-modal multi-turn dialogue log.
    M4a1,
}

/// The environment's data and profiles.
#[derive(Args, Clone)]
pub struct EnvArgs {
    /// M4A1.json (TMO authors' log, see shared/data/MANIFEST.md).
    #[arg(long, default_value = "../shared/data/tmo-m4a1/M4A1.json")]
    pub data: PathBuf,
    /// Edge device profile: rpi-4b, rpi-5, jetson-nano, jetson-tx2, jetson-xavier-nx,
    /// jetson-orin-nx, jetson-agx-orin, iphone-15-pro.
    #[arg(long, default_value = "jetson-tx2")]
    pub device: String,
    /// Network profile: wired, wifi, 5g, 4g.
    #[arg(long, default_value = "wired")]
    pub network: String,
}

#[derive(Args, Clone)]
pub struct TrainArgs {
    #[arg(long, value_enum, default_value = "m4a1")]
    pub env: EnvName,
    /// a2c, ppo, dqn, rc-a2c, rc-ppo or rc-dqn (rc: resource-constrained: budgets observed,
    /// hard mask).
    #[arg(long, default_value = "rc-a2c")]
    pub algo: String,
    /// Environment steps (dialogue turns).
    #[arg(long, default_value_t = 30000)]
    pub steps: usize,
    /// Seeds the split (80/20 by dialogue), the networks and the training.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where to write the policy (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub env_args: EnvArgs,
    /// How the constrained variant draws each training dialogue's budgets: normal, uniform or
    /// fixed.
    #[arg(long, default_value = "normal")]
    pub budget_sampling: String,
    /// Hidden layer widths.
    #[arg(long, value_delimiter = ',', default_value = "64,64")]
    pub hidden: Vec<usize>,
    /// Whose placements the training observations' history shows: `logged` (the reference
    /// protocol: the log's, so the learner cannot steer the response imputer) or `own` (the
    /// agent's, as evaluation does). Evaluation always uses the agent's own.
    #[arg(long, default_value = "logged")]
    pub history: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Clone)]
pub struct EvalArgs {
    /// Policy files (repeat the flag or give a comma list). Each is evaluated on the held-out
    /// dialogues of its own seed; methods are averaged over seeds.
    #[arg(long = "policy", value_delimiter = ',')]
    pub policies: Vec<PathBuf>,
    /// Seeds for the baselines when no policy is given.
    #[arg(long, value_delimiter = ',', default_value = "42,43,44")]
    pub seeds: Vec<u64>,
    /// Turns the bandit learns on the training dialogues before the evaluation (the `bandit`
    /// row is then frozen; `bandit/online` keeps learning).
    #[arg(long, default_value_t = 30000)]
    pub bandit_steps: usize,
    /// The bandit's covering constraint: mean response per turn to keep at or above. Unset:
    /// the mean logged response of the split's training dialogues (no worse than the log).
    #[arg(long)]
    pub bandit_response_floor: Option<f64>,
    #[command(flatten)]
    pub env_args: EnvArgs,
    #[arg(long)]
    pub json: bool,
}

/// Reads and parses the M4A1 log.
pub fn load_data(path: &Path) -> anyhow::Result<Dataset> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} (set --data)", path.display()))?;
    Ok(Dataset::parse(&text)?)
}

/// Trains as `args` says; returns the policy, the report and the wall time in seconds.
pub fn train(
    data: &Dataset,
    args: &TrainArgs,
) -> anyhow::Result<(PlacementPolicy, TrainReport, f64)> {
    let (algorithm, variant) = policy::parse_algo(&args.algo)?;
    let mut cfg = TrainConfig::new(algorithm, variant, args.steps, args.seed);
    cfg.costs = CostModel::by_name(&args.env_args.device, &args.env_args.network)?;
    cfg.sampling = args.budget_sampling.parse()?;
    cfg.hidden = args.hidden.clone();
    cfg.history = args.history.parse()?;
    let split = learn::Split::new(data, args.seed)?;
    let test_ids = split.test_ids();
    let start = Instant::now();
    let (p, report) = tmo::train(split.train, split.knn, data.tasks.clone(), test_ids, &cfg)?;
    Ok((p, report, start.elapsed().as_secs_f64()))
}

/// One method's results.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub method: String,
    pub seeds: Vec<u64>,
    /// Mean over seeds.
    pub mean: Metrics,
    pub per_seed: Vec<Metrics>,
}

/// The response ceilings of one split's held-out dialogues ([`tmo::ceiling`]).
#[derive(Debug, Clone, Serialize)]
pub struct SplitCeiling {
    pub seed: u64,
    #[serde(flatten)]
    pub ceiling: Ceiling,
}

/// The evaluation table.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub device: String,
    pub network: String,
    pub latency_budget_s: f64,
    pub usd_budget: f64,
    /// Per split: the best mean response the imputer allows with the log's history in its key
    /// (what a learner trained under the reference protocol is scored against while it
    /// learns) and with the placer's own (the bound of every row below).
    pub ceiling: Vec<SplitCeiling>,
    /// The ceilings' mean over the splits.
    pub ceiling_mean: Ceiling,
    /// The bandit's covering constraint (mean over the splits).
    pub bandit_response_floor: f64,
    pub rows: Vec<Row>,
}

/// How the bandit rows are run.
#[derive(Debug, Clone, Copy, Default)]
pub struct BanditArgs {
    /// Warm-up turns on the training dialogues.
    pub steps: usize,
    /// The covering constraint; `None` = the split's mean logged response.
    pub response_floor: Option<f64>,
}

/// Mean logged response per turn of `dialogues`.
fn logged_response(dialogues: &[tmo::Dialogue]) -> f64 {
    let scores: Vec<f64> = dialogues
        .iter()
        .flat_map(|d| d.turns.iter().map(|t| t.score))
        .collect();
    scores.iter().sum::<f64>() / scores.len().max(1) as f64
}

/// Evaluates `policies` (each on its own seed's held-out dialogues) and, on every seed
/// involved (`seeds` when there are no policies), the baselines and the bandit.
pub fn evaluate(
    data: &Dataset,
    policies: &mut [PlacementPolicy],
    seeds: &[u64],
    bandit: &BanditArgs,
    costs: &CostModel,
) -> anyhow::Result<Table> {
    let env_cfg = EnvConfig {
        costs: costs.clone(),
        ..EnvConfig::default()
    };
    let mut seeds: Vec<u64> = if policies.is_empty() {
        seeds.to_vec()
    } else {
        policies.iter().map(|p| p.meta().seed).collect()
    };
    seeds.sort_unstable();
    seeds.dedup();
    let mut results: BTreeMap<(usize, String), Vec<(u64, Metrics)>> = BTreeMap::new();
    let mut ceilings = Vec::new();
    let mut floors = Vec::new();
    for &seed in &seeds {
        let split = learn::Split::new(data, seed)?;
        ceilings.push(SplitCeiling {
            seed,
            ceiling: tmo::ceiling(&split.test, &split.knn),
        });
        let test_env = || {
            Env::new(
                split.test.clone(),
                split.knn.clone(),
                env_cfg.clone(),
                false,
                0,
            )
        };
        let mut add = |order: usize, name: String, m: Metrics| {
            results.entry((order, name)).or_default().push((seed, m));
        };
        add(
            0,
            "local-only".into(),
            tmo::evaluate(&mut test_env()?, &mut eval::LocalOnly),
        );
        add(
            1,
            "cloud-only".into(),
            tmo::evaluate(&mut test_env()?, &mut eval::CloudAll),
        );
        add(
            2,
            "cloud-uniform".into(),
            tmo::evaluate(&mut test_env()?, &mut eval::CloudUniform::new(seed)),
        );
        add(
            3,
            "random".into(),
            tmo::evaluate(&mut test_env()?, &mut eval::Random::new(seed)),
        );
        let floor = bandit
            .response_floor
            .unwrap_or_else(|| logged_response(&split.train));
        floors.push(floor);
        let cfg = BanditConfig {
            response_floor: Some(floor),
            ..BanditConfig::default()
        };
        let mut online = ConstrainedBandit::new(cfg, data.tasks.len());
        let mut train_env = Env::new(
            split.train.clone(),
            split.knn.clone(),
            env_cfg.clone(),
            true,
            seed,
        )?;
        online.warm_up(&mut train_env, bandit.steps);
        let mut frozen = online.clone();
        frozen.freeze();
        add(
            4,
            "bandit".into(),
            tmo::evaluate(&mut test_env()?, &mut frozen),
        );
        add(
            5,
            "bandit/online".into(),
            tmo::evaluate(&mut test_env()?, &mut online),
        );
        for p in policies.iter_mut().filter(|p| p.meta().seed == seed) {
            if p.meta().test_dialogues != split.test_ids() {
                bail!(
                    "policy {} (seed {seed}) was trained on another split of the dialogues \
                     (another data file?)",
                    p.meta().method()
                );
            }
            p.check_env(&env_cfg)?;
            if p.meta().tasks != data.tasks {
                bail!(
                    "policy's task categories {:?} differ from the data's",
                    p.meta().tasks
                );
            }
            let order = 6
                + p.meta().history as usize * 6
                + p.meta().variant as usize * 3
                + p.meta().algorithm as usize;
            let name = p.meta().label();
            add(order, name, tmo::evaluate(&mut test_env()?, p));
        }
    }
    let rows = results
        .into_iter()
        .map(|((_, method), runs)| Row {
            method,
            seeds: runs.iter().map(|r| r.0).collect(),
            mean: Metrics::mean(&runs.iter().map(|r| r.1.clone()).collect::<Vec<_>>()),
            per_seed: runs.into_iter().map(|r| r.1).collect(),
        })
        .collect();
    let n = ceilings.len().max(1) as f64;
    let ceiling_mean = Ceiling {
        logged_history: ceilings
            .iter()
            .map(|c| c.ceiling.logged_history)
            .sum::<f64>()
            / n,
        own_history: ceilings.iter().map(|c| c.ceiling.own_history).sum::<f64>() / n,
    };
    Ok(Table {
        device: costs.device.slug.into(),
        network: costs.network.slug.into(),
        latency_budget_s: env_cfg.latency_budget_s,
        usd_budget: env_cfg.usd_budget,
        ceiling: ceilings,
        ceiling_mean,
        bandit_response_floor: floors.iter().sum::<f64>() / floors.len().max(1) as f64,
        rows,
    })
}

/// The table as text.
pub fn render(t: &Table) -> String {
    let mut s = format!(
        "TMO placement on M4A1 held-out dialogues ({} / {}, budgets {} s and ${} per dialogue)\n",
        t.device, t.network, t.latency_budget_s, t.usd_budget
    );
    s += &format!(
        "{:<14} {:>6} {:>9} {:>12} {:>10} {:>8} {:>10} {:>9} {:>9}\n",
        "method",
        "seeds",
        "response",
        "latency (s)",
        "cost ($)",
        "reward",
        "violation",
        "lat viol",
        "usd viol"
    );
    for r in &t.rows {
        let m = &r.mean;
        s += &format!(
            "{:<14} {:>6} {:>9.3} {:>12.2} {:>10.4} {:>8.3} {:>10.3} {:>9.3} {:>9.3}\n",
            r.method,
            r.seeds.len(),
            m.response,
            m.latency_s,
            m.cost_usd,
            m.reward,
            m.violation,
            m.latency_violation,
            m.cost_violation
        );
    }
    let c = &t.ceiling_mean;
    s += &format!(
        "response ceiling (best any placements reach under the imputer, budgets ignored): \
         {:.3} with the placer's own history (bounds every row), {:.3} with the log's\n",
        c.own_history, c.logged_history
    );
    s += &format!(
        "bandit: frozen after its warm-up (bandit/online keeps learning), response floor {:.3}\n",
        t.bandit_response_floor
    );
    s += "response, reward: mean per turn; latency, cost: mean total per dialogue; violation: \
          fraction of dialogues over either budget (lat/usd: each budget). Policies are trained \
          on the log's history (the reference protocol) unless named /own.\n";
    s
}

/// Runs `ferry policy ...`.
pub fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Train(args) => {
            let data = load_data(&args.env_args.data)?;
            let (p, report, secs) = train(&data, &args)?;
            let bytes = p.to_bytes()?;
            let tmp = args.out.with_extension("safetensors.tmp");
            std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &args.out)
                .with_context(|| format!("writing {}", args.out.display()))?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "method": p.meta().method(),
                        "seed": args.seed,
                        "steps": report.steps,
                        "episodes": report.episodes,
                        "updates": report.updates,
                        "recent_reward": report.recent_reward,
                        "seconds": secs,
                        "out": args.out,
                    })
                );
            } else {
                println!(
                    "{} seed {}: {} steps, {} dialogues, {} updates in {:.1} s; mean reward of \
                     the last 100 training dialogues {:.3}; wrote {}",
                    p.meta().method(),
                    args.seed,
                    report.steps,
                    report.episodes,
                    report.updates,
                    secs,
                    report.recent_reward,
                    args.out.display()
                );
            }
            Ok(())
        }
        PolicyCommand::Eval(args) => {
            let data = load_data(&args.env_args.data)?;
            let mut policies = Vec::new();
            for path in &args.policies {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let p = PlacementPolicy::from_bytes(&bytes)
                    .with_context(|| format!("loading {}", path.display()))?;
                policies.push(p);
            }
            // Profiles: the policies' (all the same), or the flags.
            let (device, network) = match policies.first() {
                Some(p) => (p.meta().device.clone(), p.meta().network.clone()),
                None => (args.env_args.device.clone(), args.env_args.network.clone()),
            };
            let costs = CostModel::by_name(&device, &network)?;
            let bandit = BanditArgs {
                steps: args.bandit_steps,
                response_floor: args.bandit_response_floor,
            };
            let table = evaluate(&data, &mut policies, &args.seeds, &bandit, &costs)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&table)?);
            } else {
                print!("{}", render(&table));
            }
            Ok(())
        }
    }
}
