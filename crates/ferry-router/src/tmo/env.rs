//! The M4A1 environment: one dialogue per episode, one turn per step, imputed responses.

use std::sync::Arc;

use rand::Rng;

use super::{
    Action, CostModel, Dialogue, DialogueState, Knn, Observation, TmoError, HISTORY,
    LATENCY_BUDGET_S, USD_BUDGET, VIEWS,
};
use crate::rng::{seeded, PolicyRng};

/// How the constrained variant draws each training episode's budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSampling {
    /// Normal, centred on the middle of [5 local calls, 5 cloud calls with all views], σ =
    /// range/6, clipped to the range (the authors' default).
    Normal,
    /// Uniform over that range.
    Uniform,
    /// The evaluation budgets every time.
    Fixed,
}

impl std::str::FromStr for BudgetSampling {
    type Err = TmoError;
    fn from_str(s: &str) -> Result<Self, TmoError> {
        match s {
            "normal" => Ok(Self::Normal),
            "uniform" => Ok(Self::Uniform),
            "fixed" => Ok(Self::Fixed),
            _ => Err(TmoError::Invalid(format!(
                "budget sampling `{s}` (normal, uniform or fixed)"
            ))),
        }
    }
}

/// Whose placements fill the history part of a *training* observation (and so the KNN key of
/// the imputed response). Evaluation always feeds the agent's own placements back, as the
/// reference evaluator does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HistoryProtocol {
    /// The reference protocol (liangqiyuan/TMO `env.step`): training replays the log's own
    /// previous placements, so the agent cannot steer the imputer through its history; its
    /// choices reach the observation only through the remaining budgets.
    #[default]
    Logged,
    /// The agent's own placements in training too. Training and evaluation then see the same
    /// distribution, but the learner can find histories where the imputer is generous.
    Own,
}

impl std::fmt::Display for HistoryProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HistoryProtocol::Logged => "logged",
            HistoryProtocol::Own => "own",
        })
    }
}

impl std::str::FromStr for HistoryProtocol {
    type Err = TmoError;
    fn from_str(s: &str) -> Result<Self, TmoError> {
        match s {
            "logged" | "reference" => Ok(Self::Logged),
            "own" => Ok(Self::Own),
            _ => Err(TmoError::Invalid(format!(
                "history protocol `{s}` (logged or own)"
            ))),
        }
    }
}

/// Environment settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvConfig {
    /// `[response, association, latency, cost]` reward weights.
    pub weights: [f64; 4],
    pub latency_budget_s: f64,
    pub usd_budget: f64,
    /// The resource-constrained variant: budgets drawn per training episode, reward 0 on a
    /// step that overdraws.
    pub constrained: bool,
    pub sampling: BudgetSampling,
    pub costs: CostModel,
    /// The history of training observations (evaluation always uses the agent's own).
    pub history: HistoryProtocol,
}

impl Default for EnvConfig {
    fn default() -> Self {
        EnvConfig {
            weights: [1.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
            latency_budget_s: LATENCY_BUDGET_S,
            usd_budget: USD_BUDGET,
            constrained: false,
            sampling: BudgetSampling::Normal,
            costs: CostModel::reference(),
            history: HistoryProtocol::default(),
        }
    }
}

/// What one step produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    pub reward: f64,
    /// Imputed response score.
    pub response: f64,
    /// Summed association of the views sent (raw).
    pub association: f64,
    /// The same, min-max normalised over the turn's actions (the reward term).
    pub association_norm: f64,
    pub latency_s: f64,
    pub cost_usd: f64,
    pub latency_norm: f64,
    pub cost_norm: f64,
    /// A remaining budget is below zero after this step.
    pub overdrawn: bool,
    /// The dialogue ended with this step.
    pub done: bool,
}

/// One environment over a set of dialogues.
#[derive(Debug, Clone)]
pub struct Env {
    cfg: EnvConfig,
    dialogues: Vec<Dialogue>,
    knn: Arc<Knn>,
    training: bool,
    rng: PolicyRng,
    cursor: usize,
    current: usize,
    state: DialogueState,
    /// The log's own placements of the dialogue so far (for [`HistoryProtocol::Logged`]).
    logged: DialogueState,
}

/// One normal draw (Box–Muller).
pub(crate) fn normal(rng: &mut PolicyRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl Env {
    /// An environment over `dialogues`, imputing with `knn` (fitted on the training split).
    /// Training environments draw dialogues at random (and budgets, when constrained);
    /// evaluation ones play the dialogues in order, with the configured budgets.
    pub fn new(
        dialogues: Vec<Dialogue>,
        knn: Arc<Knn>,
        cfg: EnvConfig,
        training: bool,
        seed: u64,
    ) -> Result<Self, TmoError> {
        if dialogues.is_empty() {
            return Err(TmoError::Invalid("environment without dialogues".into()));
        }
        if cfg.weights.iter().any(|w| !w.is_finite())
            || !(cfg.latency_budget_s >= 0.0 && cfg.usd_budget >= 0.0)
        {
            return Err(TmoError::Invalid("reward weights or budgets".into()));
        }
        let state = DialogueState::new(cfg.latency_budget_s, cfg.usd_budget);
        Ok(Env {
            cfg,
            dialogues,
            knn,
            training,
            rng: seeded(seed),
            cursor: 0,
            current: 0,
            state,
            logged: DialogueState::new(0.0, 0.0),
        })
    }

    pub fn config(&self) -> &EnvConfig {
        &self.cfg
    }

    pub fn costs(&self) -> &CostModel {
        &self.cfg.costs
    }

    pub fn dialogues(&self) -> &[Dialogue] {
        &self.dialogues
    }

    /// The dialogue being played.
    pub fn dialogue(&self) -> &Dialogue {
        &self.dialogues[self.current]
    }

    /// The bookkeeping of the dialogue being played.
    pub fn state(&self) -> &DialogueState {
        &self.state
    }

    /// Range of the training budgets: [5 local calls, 5 cloud calls with all views].
    pub fn budget_range(&self) -> ((f64, f64), (f64, f64)) {
        let c = &self.cfg.costs;
        let z = HISTORY as f64;
        let (s, u) = c.max_call();
        ((z * c.local_s, z * s), (z * c.local_usd, z * u))
    }

    fn draw_budget(&mut self, lo: f64, hi: f64) -> f64 {
        match self.cfg.sampling {
            BudgetSampling::Normal => {
                let mu = 0.5 * (lo + hi);
                let sigma = ((hi - lo) / 6.0).max(1e-8);
                (mu + sigma * normal(&mut self.rng)).clamp(lo, hi)
            }
            BudgetSampling::Uniform => lo + (hi - lo) * self.rng.random::<f64>(),
            BudgetSampling::Fixed => unreachable!("fixed budgets are not drawn"),
        }
    }

    /// Starts the next episode and returns its first observation.
    pub fn reset(&mut self) -> Observation {
        if self.training {
            self.current = self.rng.random_range(0..self.dialogues.len());
        } else {
            self.current = self.cursor % self.dialogues.len();
            self.cursor += 1;
        }
        let (mut lat, mut usd) = (self.cfg.latency_budget_s, self.cfg.usd_budget);
        if self.training && self.cfg.constrained && self.cfg.sampling != BudgetSampling::Fixed {
            let ((l0, l1), (u0, u1)) = self.budget_range();
            lat = self.draw_budget(l0, l1);
            usd = self.draw_budget(u0, u1);
        }
        self.state = DialogueState::new(lat, usd);
        self.logged = DialogueState::new(0.0, 0.0);
        self.observation()
    }

    /// Whether observations replay the logged history (training under the reference protocol).
    fn replays_log(&self) -> bool {
        self.training && self.cfg.history == HistoryProtocol::Logged
    }

    /// The observation for the current turn: the history (the agent's own, or the log's when
    /// training under the reference protocol) and the budgets the agent has left.
    pub fn observation(&self) -> Observation {
        let d = &self.dialogues[self.current];
        let t = self.state.turns().min(d.turns.len() - 1);
        let mut obs = self.state.observe(d.turns[t].task);
        if self.replays_log() {
            obs.history = self.logged.observe(d.turns[t].task).history;
        }
        obs
    }

    /// Plays `a` on the current turn. After the last turn, call [`Env::reset`].
    pub fn step(&mut self, a: Action) -> StepOutcome {
        let obs = self.observation();
        let turn = &self.dialogues[self.current].turns[obs.turn];
        let c = &self.cfg.costs;
        let per_action: Vec<f64> = Action::all()
            .map(|b| {
                (0..VIEWS)
                    .filter(|&v| b.sends(v))
                    .map(|v| turn.association[v])
                    .sum()
            })
            .collect();
        let association = per_action[a.index()];
        let lo = per_action.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = per_action.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let association_norm = if hi > lo {
            (association - lo) / (hi - lo)
        } else {
            0.0
        };
        let response = self.knn.response(&obs, a);
        let (latency_s, cost_usd) = (c.latency_s(a), c.cost_usd(a));
        let (latency_norm, cost_norm) = (c.latency_norm(a), c.cost_norm(a));
        let w = &self.cfg.weights;
        let mut reward =
            w[0] * response + w[1] * association_norm - w[2] * latency_norm - w[3] * cost_norm;
        let task = turn.task;
        let turns = self.dialogues[self.current].turns.len();
        self.state.record(task, a, latency_s, cost_usd);
        self.logged.record(task, turn.action, 0.0, 0.0);
        let (ol, ou) = self.state.over_budget();
        let overdrawn = ol || ou;
        if self.training && self.cfg.constrained && overdrawn {
            reward = 0.0;
        }
        StepOutcome {
            reward,
            response,
            association,
            association_norm,
            latency_s,
            cost_usd,
            latency_norm,
            cost_norm,
            overdrawn,
            done: self.state.turns() >= turns,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tmo::Dataset;

    /// Three short dialogues over two tasks.
    pub(crate) fn toy() -> Dataset {
        let turn = |task: &str, action: u8, views: &str, score: f64| {
            format!(
                r#"{{"question": "q", "task_cat": "{task}", "action": {action}, "image_index": {views},
                    "answer": "ok", "score": {score}, "interaction_time": 1.0, "usage_cost": 0.0}}"#
            )
        };
        let dialogue = |id: u32, turns: Vec<String>| {
            let assoc: Vec<&str> = (0..turns.len()).map(|_| "[0.2, 0.25, 0.19]").collect();
            format!(
                r#"{{"id": {id}, "image_paths": [], "interactions": [{}], "association_score": [{}]}}"#,
                turns.join(","),
                assoc.join(",")
            )
        };
        let text = format!(
            "[{}]",
            [
                dialogue(
                    0,
                    vec![turn("A", 0, "null", 0.5), turn("B", 1, "[0, 1, 2]", 2.0)]
                ),
                dialogue(
                    1,
                    vec![
                        turn("B", 1, "null", 1.0),
                        turn("B", 1, "[1]", 1.5),
                        turn("A", 0, "null", 0.25)
                    ]
                ),
                dialogue(
                    2,
                    vec![turn("A", 1, "[2]", 1.0), turn("A", 0, "null", 0.75)]
                ),
            ]
            .join(",")
        );
        Dataset::parse(&text).unwrap()
    }

    fn env(constrained: bool, training: bool) -> Env {
        let d = toy();
        let knn = Arc::new(Knn::from_log(5, &d.dialogues).unwrap());
        let cfg = EnvConfig {
            constrained,
            ..EnvConfig::default()
        };
        Env::new(d.dialogues, knn, cfg, training, 1).unwrap()
    }

    #[test]
    fn reward_terms_are_in_range_and_add_up() {
        let mut e = env(false, false);
        for _ in 0..3 {
            e.reset();
            for a in Action::all().cycle() {
                let o = e.step(a);
                for x in [o.association_norm, o.latency_norm, o.cost_norm] {
                    assert!((0.0..=1.0).contains(&x), "{o:?}");
                }
                assert!((0.0..=2.0).contains(&o.response), "{o:?}");
                let r = o.response + (o.association_norm - o.latency_norm - o.cost_norm) / 3.0;
                assert!((o.reward - r).abs() < 1e-12);
                if a.is_local() {
                    assert_eq!(
                        (o.association, o.latency_norm, o.cost_norm),
                        (0.0, 0.0, 0.0)
                    );
                }
                if a == Action::cloud(0b111) {
                    assert!((o.association - 0.64).abs() < 1e-12);
                    assert_eq!((o.association_norm, o.cost_norm), (1.0, 1.0));
                }
                if o.done {
                    break;
                }
            }
        }
    }

    #[test]
    fn training_history_follows_the_protocol_and_evaluation_is_always_own() {
        let d = toy();
        let knn = Arc::new(Knn::from_log(5, &d.dialogues).unwrap());
        for (history, training) in [
            (HistoryProtocol::Logged, true),
            (HistoryProtocol::Own, true),
            (HistoryProtocol::Logged, false),
        ] {
            let cfg = EnvConfig {
                history,
                constrained: true,
                ..EnvConfig::default()
            };
            let mut e = Env::new(d.dialogues.clone(), knn.clone(), cfg, training, 3).unwrap();
            for _ in 0..6 {
                e.reset();
                let mut own = DialogueState::new(0.0, 0.0);
                let mut log = DialogueState::new(0.0, 0.0);
                // Always the action the log did not take, so the two histories differ.
                loop {
                    let turn = e.dialogue().turns[e.state().turns()].clone();
                    let a = if turn.action.is_local() {
                        Action::cloud(0b111)
                    } else {
                        Action::LOCAL
                    };
                    let obs = e.observation();
                    let want = if training && history == HistoryProtocol::Logged {
                        log.observe(turn.task)
                    } else {
                        own.observe(turn.task)
                    };
                    assert_eq!(obs.history, want.history, "{history:?} training {training}");
                    // Budgets are the agent's own in every protocol.
                    let (bl, bu) = e.state().budgets();
                    let (sl, su) = e.state().spent();
                    assert_eq!(
                        (obs.remaining_latency_s, obs.remaining_usd),
                        (bl - sl, bu - su)
                    );
                    let out = e.step(a);
                    assert_eq!(out.response, knn.response(&want, a));
                    own.record(turn.task, a, 0.0, 0.0);
                    log.record(turn.task, turn.action, 0.0, 0.0);
                    if out.done {
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn evaluation_plays_dialogues_in_order_with_fixed_budgets() {
        let mut e = env(true, false);
        for id in [0, 1, 2, 0] {
            let o = e.reset();
            assert_eq!(e.dialogue().id, id);
            assert_eq!((o.remaining_latency_s, o.remaining_usd), (30.0, 0.05));
            assert_eq!(o.turn, 0);
        }
    }

    #[test]
    fn budget_bookkeeping_and_zero_reward_on_overdraw() {
        let mut e = env(true, true);
        let ((l0, l1), (u0, u1)) = e.budget_range();
        let mut zeroed = 0;
        for _ in 0..200 {
            let o = e.reset();
            assert!((l0..=l1).contains(&o.remaining_latency_s));
            assert!((u0..=u1).contains(&o.remaining_usd));
            let (b_lat, b_usd) = e.state().budgets();
            loop {
                let before = e.observation();
                let s = e.step(Action::cloud(0b111));
                let after = e.state().spent();
                assert!(
                    (b_lat - after.0 - (before.remaining_latency_s - s.latency_s)).abs() < 1e-9
                );
                assert!((b_usd - after.1 - (before.remaining_usd - s.cost_usd)).abs() < 1e-12);
                let over =
                    before.remaining_latency_s < s.latency_s || before.remaining_usd < s.cost_usd;
                assert_eq!(s.reward == 0.0, over, "{s:?}");
                zeroed += usize::from(over);
                if s.done {
                    break;
                }
            }
        }
        assert!(zeroed > 0, "sampled budgets below two cloud calls exist");
    }
}
