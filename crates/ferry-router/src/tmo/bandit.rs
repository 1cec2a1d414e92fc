//! A constrained bandit for placement, after Huang, Liu and Xu, "Online LLM Selection via
//! Constrained Bandits with Time-Varying Demand" (arXiv 2606.17489, 2026).
//!
//! **Only the paper's abstract is public.** It fixes the problem class (stochastic bandit with
//! bandit feedback, unknown reward/cost/latency distributions, a hard packing budget, a soft
//! covering constraint, time-varying demand) and says the algorithm combines confidence-bound
//! estimates with demand predictions, with sublinear regret and violation. Everything below is
//! our reading of that sentence, not the authors' algorithm:
//! - Arms are the 9 placements; statistics are kept per task category (a context of 4 values).
//! - **Optimism**: reward UCB `r̄ + c·range·√(2 ln t / n)`; latency and price LCBs
//!   `max(0, x̄ − c·range·√(2 ln t / n))` (ranges are the spreads observed so far, so the
//!   bonus is in each quantity's unit). Unplayed arms have an infinite UCB and zero LCBs.
//! - **Pacing by forecast task arrivals**: the demand of a dialogue is its number of turns and
//!   which tasks they will be, unknown in advance. An online histogram of finished dialogues'
//!   lengths (one pseudo-count per length 1..=5) gives the chance `S_k` that the dialogue lasts
//!   k more turns; online task-to-task transition counts (one pseudo-count each) forecast the
//!   task of each of those turns. Each task is worth its gain `g` (best cloud arm's mean utility
//!   over local's, at least a small floor). A turn of task τ may spend at most
//!   `remaining · g_τ / (g_τ + Σ_k S_k · E[g of the task k turns ahead])` of each budget, judged
//!   on the LCBs: budget goes to the turns whose tasks gain most from the cloud. With equal gains
//!   this is `remaining / D̂`, `D̂ = E[L − t | L > t]`.
//! - **Hard stop**: an arm is never played if its worst observed latency or price (for an
//!   unplayed arm, the worst seen on any arm) would leave less than a reserve of 4 local calls;
//!   once the budget cannot afford any cloud call, every remaining turn runs locally.
//! - **What it maximises**: the utility `w_r·response + w_a·association` only. Latency and
//!   dollars are constraints (paced and hard-stopped), so they are not also subtracted from
//!   the objective (the environment's reward subtracts them; charging them twice made the
//!   bandit timid).
//! - **Soft covering constraint** (optional, [`BanditConfig::response_floor`]): the long-run
//!   mean response per turn should stay at or above a floor. A virtual queue `Z ← max(0, Z +
//!   floor − response)` carries the deficit, and arms are scored `UCB(utility) + Z/√t ·
//!   UCB(response)`: the weight of quality grows while it is owed, and since the queue stays
//!   O(√t) the violation per turn vanishes (the drift-plus-penalty argument).
//! - Among the paced and safe arms, the highest score wins; if pacing rules out every arm, the
//!   highest-scoring safe arm is played (local is always safe).
//! - **Frozen** ([`ConstrainedBandit::freeze`]): statistics and the demand forecast stop
//!   learning, and the confidence bonuses drop to zero (it plays its estimates); the covering
//!   queue still tracks the turns, as a controller's state.
//! - In this environment latency is a per-dialogue budget like the dollars, so both are paced
//!   and hard-stopped.

use serde::Serialize;

use super::eval::Placer;
use super::{Action, Observation, StepOutcome, ACTIONS, HISTORY};
use crate::tmo::state::RESERVE_LOCAL_CALLS;

/// Bandit settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BanditConfig {
    /// Scale of the reward UCB bonus.
    pub ucb: f64,
    /// Scale of the latency/price LCB bonus.
    pub lcb: f64,
    /// Keep statistics per task category (otherwise one set for all).
    pub per_task: bool,
    /// Weights of the response and of the (normalised) association in the utility.
    pub utility_weights: [f64; 2],
    /// The covering constraint: mean response per turn to keep at or above; `None` = none.
    pub response_floor: Option<f64>,
}

impl Default for BanditConfig {
    fn default() -> Self {
        let w = super::EnvConfig::default().weights;
        BanditConfig {
            ucb: 1.0,
            lcb: 1.0,
            per_task: true,
            utility_weights: [w[0], w[1]],
            response_floor: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Arm {
    n: u64,
    /// Summed utility.
    reward: f64,
    /// Summed response.
    response: f64,
    usd: f64,
    lat: f64,
    usd_max: f64,
    lat_max: f64,
}

/// Running min and max of a quantity.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Range(f64, f64);

impl Range {
    fn new() -> Self {
        Range(f64::INFINITY, f64::NEG_INFINITY)
    }
    fn add(&mut self, x: f64) {
        self.0 = self.0.min(x);
        self.1 = self.1.max(x);
    }
    fn width(&self) -> f64 {
        if self.1 > self.0 {
            self.1 - self.0
        } else {
            0.0
        }
    }
}

/// The constrained bandit (see the module header).
#[derive(Debug, Clone)]
pub struct ConstrainedBandit {
    cfg: BanditConfig,
    arms: Vec<[Arm; ACTIONS]>,
    t: u64,
    lengths: [f64; 64],
    reward: Range,
    response: Range,
    usd: Range,
    lat: Range,
    /// The covering constraint's virtual queue (response owed).
    owed: f64,
    frozen: bool,
    /// Task transitions: row 0 = a dialogue's first turn, row 1 + a = after task a.
    transitions: Vec<Vec<f64>>,
    /// The task of the turn last fed back, if its dialogue goes on.
    prev_task: Option<usize>,
}

impl ConstrainedBandit {
    /// A bandit for `tasks` task categories.
    pub fn new(cfg: BanditConfig, tasks: usize) -> Self {
        let mut lengths = [0.0; 64];
        lengths[1..=HISTORY].fill(1.0);
        ConstrainedBandit {
            cfg,
            arms: vec![[Arm::default(); ACTIONS]; if cfg.per_task { tasks.max(1) } else { 1 }],
            t: 0,
            lengths,
            reward: Range::new(),
            response: Range::new(),
            usd: Range::new(),
            lat: Range::new(),
            owed: 0.0,
            frozen: false,
            transitions: vec![vec![1.0; tasks.max(1)]; tasks.max(1) + 1],
            prev_task: None,
        }
    }

    /// How much of the remaining budgets the turn `obs` describes may spend (see the module
    /// header): `g_τ / (g_τ + Σ_k S_k · E[g_k])`.
    pub fn pace_share(&self, obs: &Observation) -> f64 {
        let tasks = self.transitions[0].len();
        let gains: Vec<f64> = (0..tasks).map(|t| self.gain(t)).collect();
        let survive_from = |turn: usize| -> f64 { self.lengths.iter().skip(turn + 1).sum() };
        let alive = survive_from(obs.turn);
        let mut dist = vec![0.0; tasks];
        dist[obs.task.min(tasks - 1)] = 1.0;
        let mut future = 0.0;
        for k in 1..self.lengths.len() - obs.turn {
            let s_k = if alive > 0.0 {
                survive_from(obs.turn + k) / alive
            } else {
                0.0
            };
            if s_k <= 0.0 {
                break;
            }
            let mut next = vec![0.0; tasks];
            for (from, p) in dist.iter().enumerate() {
                let row = &self.transitions[1 + from];
                let total: f64 = row.iter().sum();
                for (to, c) in row.iter().enumerate() {
                    next[to] += p * c / total;
                }
            }
            dist = next;
            future += s_k * dist.iter().zip(&gains).map(|(p, g)| p * g).sum::<f64>();
        }
        let g = gains[obs.task.min(tasks - 1)];
        g / (g + future)
    }

    /// What the cloud gains over local on `task`: the best played cloud arm's mean utility over
    /// local's, floored so that no task is worth nothing (ties share the budget evenly).
    fn gain(&self, task: usize) -> f64 {
        const FLOOR: f64 = 0.05;
        let ctx = &self.arms[self.context(task)];
        let mean = |a: &Arm| (a.n > 0).then(|| a.reward / a.n as f64);
        let best_cloud = ctx[1..]
            .iter()
            .filter_map(mean)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        match (best_cloud, mean(&ctx[0])) {
            (Some(c), Some(l)) => (c - l).max(FLOOR),
            _ => 1.0,
        }
    }

    /// Stops learning: from now on it plays its estimates (see the module header).
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// The covering constraint's queue: response owed so far.
    pub fn owed(&self) -> f64 {
        self.owed
    }

    fn context(&self, task: usize) -> usize {
        if self.cfg.per_task {
            task.min(self.arms.len() - 1)
        } else {
            0
        }
    }

    /// Forecast of the turns left in a dialogue that has taken `turn` turns, this one included.
    pub fn remaining_demand(&self, turn: usize) -> f64 {
        let (mut mass, mut sum) = (0.0, 0.0);
        for (l, &c) in self.lengths.iter().enumerate().skip(turn + 1) {
            mass += c;
            sum += c * (l - turn) as f64;
        }
        if mass > 0.0 {
            (sum / mass).max(1.0)
        } else {
            1.0
        }
    }

    /// The worst latency and price seen on any arm (the bound for unplayed arms).
    fn worst(&self) -> (f64, f64) {
        let mut w = (0.0f64, 0.0f64);
        for ctx in &self.arms {
            for a in ctx {
                w = (w.0.max(a.lat_max), w.1.max(a.usd_max));
            }
        }
        w
    }

    /// Mean observed local call (the reserve unit), 0 before the first.
    fn local_cost(&self) -> (f64, f64) {
        let (mut n, mut s, mut u) = (0u64, 0.0, 0.0);
        for ctx in &self.arms {
            n += ctx[0].n;
            s += ctx[0].lat;
            u += ctx[0].usd;
        }
        if n == 0 {
            (0.0, 0.0)
        } else {
            (s / n as f64, u / n as f64)
        }
    }

    /// Which arms the hard stop allows for `obs`.
    pub fn safe(&self, obs: &Observation) -> [bool; ACTIONS] {
        let ctx = &self.arms[self.context(obs.task)];
        let (ls, lu) = self.local_cost();
        let k = RESERVE_LOCAL_CALLS as f64;
        let (room_s, room_u) = (obs.remaining_latency_s - k * ls, obs.remaining_usd - k * lu);
        let worst = self.worst();
        let mut ok = [false; ACTIONS];
        for (i, arm) in ctx.iter().enumerate() {
            let (s, u) = if arm.n > 0 {
                (arm.lat_max, arm.usd_max)
            } else {
                worst
            };
            ok[i] = i == 0 || (s <= room_s && u <= room_u);
        }
        ok
    }
}

impl ConstrainedBandit {
    /// Learns online on `env` (a training environment) for at least `steps` turns, finishing
    /// the dialogue in progress.
    pub fn warm_up(&mut self, env: &mut super::Env, steps: usize) {
        let mut done = 0;
        while done < steps {
            let mut obs = env.reset();
            loop {
                let a = self.place(&obs);
                let out = env.step(a);
                self.feedback(&obs, a, &out);
                done += 1;
                if out.done {
                    break;
                }
                obs = env.observation();
            }
        }
    }
}

impl Placer for ConstrainedBandit {
    fn name(&self) -> String {
        "bandit".into()
    }

    fn place(&mut self, obs: &Observation) -> Action {
        self.t += 1;
        let safe = self.safe(obs);
        let share = self.pace_share(obs);
        let (allow_s, allow_u) = (obs.remaining_latency_s * share, obs.remaining_usd * share);
        let ln_t = (self.t as f64).ln().max(0.0);
        let quality_weight = self.owed / (self.t as f64).sqrt();
        let ctx = &self.arms[self.context(obs.task)];
        let mut ucb = [f64::NEG_INFINITY; ACTIONS];
        let mut paced = [false; ACTIONS];
        for (i, arm) in ctx.iter().enumerate() {
            if arm.n == 0 {
                // Unplayed: tried first while learning; never chosen once frozen.
                ucb[i] = if self.frozen {
                    f64::NEG_INFINITY
                } else {
                    f64::INFINITY
                };
                paced[i] = true;
                continue;
            }
            let n = arm.n as f64;
            let bonus = if self.frozen {
                0.0
            } else {
                (2.0 * ln_t / n).sqrt()
            };
            ucb[i] = arm.reward / n
                + self.cfg.ucb * self.reward.width() * bonus
                + quality_weight
                    * (arm.response / n + self.cfg.ucb * self.response.width() * bonus);
            let lcb_s = (arm.lat / n - self.cfg.lcb * self.lat.width() * bonus).max(0.0);
            let lcb_u = (arm.usd / n - self.cfg.lcb * self.usd.width() * bonus).max(0.0);
            paced[i] = lcb_s <= allow_s && lcb_u <= allow_u;
        }
        let pick = |allowed: &dyn Fn(usize) -> bool| {
            (0..ACTIONS)
                .filter(|&i| allowed(i))
                .fold(None, |best: Option<usize>, i| match best {
                    Some(b) if ucb[b] >= ucb[i] => Some(b),
                    _ => Some(i),
                })
        };
        let i = pick(&|i| safe[i] && paced[i])
            .or_else(|| pick(&|i| safe[i]))
            .unwrap_or(0);
        Action::from_index(i).expect("in range")
    }

    fn feedback(&mut self, obs: &Observation, action: Action, out: &StepOutcome) {
        if let Some(floor) = self.cfg.response_floor {
            self.owed = (self.owed + floor - out.response).max(0.0);
        }
        if self.frozen {
            return;
        }
        let tasks = self.transitions[0].len();
        let from = match (obs.turn, self.prev_task) {
            (0, _) | (_, None) => 0,
            (_, Some(p)) => 1 + p,
        };
        self.transitions[from][obs.task.min(tasks - 1)] += 1.0;
        self.prev_task = (!out.done).then_some(obs.task.min(tasks - 1));
        let [wr, wa] = self.cfg.utility_weights;
        let utility = wr * out.response + wa * out.association_norm;
        let c = self.context(obs.task);
        let arm = &mut self.arms[c][action.index()];
        arm.n += 1;
        arm.reward += utility;
        arm.response += out.response;
        arm.usd += out.cost_usd;
        arm.lat += out.latency_s;
        arm.usd_max = arm.usd_max.max(out.cost_usd);
        arm.lat_max = arm.lat_max.max(out.latency_s);
        self.reward.add(utility);
        self.response.add(out.response);
        self.usd.add(out.cost_usd);
        self.lat.add(out.latency_s);
        if out.done {
            let l = (obs.turn + 1).min(self.lengths.len() - 1);
            self.lengths[l] += 1.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::tmo::env::tests::toy;
    use crate::tmo::{evaluate, Env, EnvConfig, Knn};

    /// A free, instant turn with this response and (normalised) association.
    fn outcome(response: f64, association: f64, done: bool) -> StepOutcome {
        StepOutcome {
            reward: 0.0,
            response,
            association,
            association_norm: association,
            latency_s: 0.0,
            cost_usd: 0.0,
            latency_norm: 0.0,
            cost_norm: 0.0,
            overdrawn: false,
            done,
        }
    }

    #[test]
    fn demand_forecast_follows_observed_lengths() {
        let mut b = ConstrainedBandit::new(BanditConfig::default(), 1);
        // Prior: lengths 1..=5 equally likely: E[L] = 3.
        assert!((b.remaining_demand(0) - 3.0).abs() < 1e-12);
        assert!((b.remaining_demand(4) - 1.0).abs() < 1e-12);
        let obs = crate::tmo::DialogueState::new(30.0, 0.05).observe(0);
        let mut o = obs.clone();
        o.turn = 1;
        let out = outcome(1.0, 0.0, true);
        for _ in 0..95 {
            b.feedback(&o, Action::LOCAL, &out);
        }
        // 95 more dialogues of 2 turns: about 2 expected at the start, 1 after the first turn.
        assert!((b.remaining_demand(0) - 205.0 / 100.0).abs() < 1e-12);
        assert!((b.remaining_demand(1) - (96.0 + 2.0 + 3.0 + 4.0) / 99.0).abs() < 1e-12);
    }

    #[test]
    fn pacing_gives_budget_to_the_tasks_the_cloud_helps() {
        let mut b = ConstrainedBandit::new(BanditConfig::default(), 2);
        let mut obs = crate::tmo::DialogueState::new(30.0, 0.05).observe(0);
        // Nothing learned: every task is worth the same, so the share is 1/D̂.
        for turn in 0..5 {
            obs.turn = turn;
            let d = b.remaining_demand(turn);
            assert!((b.pace_share(&obs) - 1.0 / d).abs() < 1e-12, "turn {turn}");
        }
        // Task 0 gains 1.0 from the cloud, task 1 nothing; dialogues alternate 0, 1, 0, 1.
        let out = |response: f64, done: bool| outcome(response, 0.0, done);
        for _ in 0..200 {
            for turn in 0..4 {
                let mut o = obs.clone();
                o.turn = turn;
                o.task = turn % 2;
                let gain = if o.task == 0 { 1.0 } else { 0.0 };
                b.feedback(&o, Action::LOCAL, &out(0.5, false));
                b.feedback(&o, Action::cloud(0), &out(0.5 + gain, turn == 3));
            }
        }
        let share = |task: usize, turn: usize| {
            let mut o = obs.clone();
            o.task = task;
            o.turn = turn;
            b.pace_share(&o)
        };
        // At the first turn, task 0 may spend most of the budget: only one more task-0 turn is
        // likely to follow, and task-1 turns are worth little.
        assert!(share(0, 0) > 0.4, "{}", share(0, 0));
        assert!(share(1, 0) < 0.05, "{}", share(1, 0));
        assert!(share(0, 0) > 1.0 / b.remaining_demand(0));
        for (task, turn) in [(0, 0), (1, 1), (0, 2), (1, 3)] {
            assert!((0.0..=1.0).contains(&share(task, turn)));
        }
    }

    #[test]
    fn never_overdraws_and_learns() {
        let d = toy();
        let knn = Arc::new(Knn::from_log(5, &d.dialogues).unwrap());
        // Tight budgets: about one cloud call with all views per dialogue.
        let cfg = EnvConfig {
            latency_budget_s: 8.0,
            usd_budget: 0.015,
            ..EnvConfig::default()
        };
        let mut train = Env::new(d.dialogues.clone(), knn.clone(), cfg.clone(), true, 3).unwrap();
        let mut test = Env::new(d.dialogues, knn, cfg, false, 0).unwrap();
        let mut b = ConstrainedBandit::new(BanditConfig::default(), 2);
        for _ in 0..3 {
            let m = evaluate(&mut train, &mut b);
            assert_eq!(m.violation, 0.0, "{m:?}");
        }
        let m = evaluate(&mut test, &mut b);
        assert_eq!(m.violation, 0.0);
        assert!(m.actions[0] < 1.0, "uses the cloud when it pays: {m:?}");
        // Frozen, it stops learning: the same test twice plays the same way.
        b.freeze();
        let before = b.arms.clone();
        let m1 = evaluate(&mut test, &mut b);
        let m2 = evaluate(&mut test, &mut b);
        assert_eq!(b.arms, before);
        assert_eq!(m1, m2);
        assert_eq!(m1.violation, 0.0);
    }

    #[test]
    fn an_owed_response_floor_buys_quality() {
        // Local: response 0.5 with association 0 (utility 0.5). Cloud with all views: response
        // 0.4 but association 1 (utility 0.4 + 1/3). Without a floor the cloud's utility wins;
        // owing response turns the choice to local, and paying it back turns it back.
        let obs = crate::tmo::DialogueState::new(1e9, 1e9).observe(0);
        let all = Action::cloud(0b111);
        let teach = |floor: Option<f64>| {
            let mut b = ConstrainedBandit::new(
                BanditConfig {
                    response_floor: floor,
                    per_task: false,
                    ..BanditConfig::default()
                },
                1,
            );
            for _ in 0..50 {
                b.feedback(&obs, Action::LOCAL, &outcome(0.5, 0.0, false));
                b.feedback(&obs, all, &outcome(0.4, 1.0, false));
            }
            b.freeze();
            b
        };
        let mut free = teach(None);
        assert_eq!(free.place(&obs), all);
        assert_eq!(free.owed(), 0.0);
        let mut owing = teach(Some(0.9));
        // 100 turns at 0.45 under a 0.9 floor: 45 owed.
        assert!((owing.owed() - 45.0).abs() < 1e-9, "{}", owing.owed());
        assert_eq!(owing.place(&obs), Action::LOCAL);
        // Responses above the floor pay the debt back; it never goes below zero.
        for _ in 0..100 {
            owing.feedback(&obs, Action::LOCAL, &outcome(2.0, 0.0, false));
        }
        assert_eq!(owing.owed(), 0.0);
        assert_eq!(owing.place(&obs), all);
    }
}
