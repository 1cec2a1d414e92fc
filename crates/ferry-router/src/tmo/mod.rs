//! TMO: where each request of a multi-turn dialogue runs (local model, or cloud model) and which
//! camera views go with it, learned by reinforcement learning over the M4A1 dialogue log; and a
//! constrained bandit for the same decision.
//!
//! # The environment ([`env`])
//! Follows the TMO authors' code (liangqiyuan/TMO, `tmo/env.py`, `tmo/data.py`,
//! `tmo/devices.py`), restated:
//! - Episode = one dialogue, step = one turn. `1 + 2^X` actions with X = 3 views: 0 = local
//!   (text only), 1 = cloud text only, 2..=4 = one view, 5..=7 = two views, 8 = all three
//!   (subsets by size, then lexicographically).
//! - Per-turn state `[previous action (-1 start, 0 local, 1 cloud), views the previous turn
//!   sent (3 × 0/1), task category]`; the observation is the last 5 such states, oldest first,
//!   padded with -1 (25 numbers). The resource-constrained variant appends the remaining
//!   latency and dollar budgets (27).
//! - Reward `1·response + ⅓·association − ⅓·latency_norm − ⅓·cost_norm`: association is the
//!   summed per-view relevance of the views sent, min-max normalised over the 9 actions of the
//!   turn; latency and cost are min-max normalised over the five call kinds (local, cloud with
//!   0..=3 views) of the device/network profile ([`profiles`]).
//! - The response score of an action the log did not take is imputed ([`knn`]): k = 5 nearest
//!   (Euclidean) logged (observation ⊕ action one-hot) pairs of the training split,
//!   inverse-distance weights `1/(d + 1e-6)`. Logged scores of refusals ("sorry",
//!   "I don't have", "can't" in the answer) count as 0.
//! - Budgets per dialogue: 30 s and $0.05 at evaluation. Training of the constrained variant
//!   samples each episode's budgets from a normal centred on the middle of
//!   `[5·local call, 5·cloud call with all views]` with σ = range/6, clipped to the range
//!   (uniform also available), and zeroes the reward of a step that overdraws a budget.
//! - 80/20 split by dialogue, seeded. Evaluation plays each test dialogue once.
//!
//! # Where the reference is silent or where we differ (our choices)
//! - **History in the observation** ([`HistoryProtocol`]). By default training replays the
//!   *logged* previous placements into the observation (the agent's own choices reach it only
//!   through the budgets) and evaluation feeds the agent's own back, as the authors' `step` and
//!   `step_eval` do. `HistoryProtocol::Own` trains on the agent's own history too; the learner
//!   can then steer the KNN imputer through its history. [`ceiling`] gives, per split, the best
//!   mean response any placements reach under either history.
//! - **Hard budget mask.** The authors' resource-constrained variants only see the budgets and
//!   get zero reward on overdraw, which does not guarantee anything. Ours also mask (in training
//!   and when acting) every action whose call would leave less than a reserve of 4 local calls
//!   in either budget ([`feasible`]); local is always allowed. With dialogues of at most 5 turns
//!   the constrained policies therefore never exceed a budget in simulation. Live, the mask
//!   prices calls by what they cost on this device and endpoint ([`LiveCosts`]).
//! - **Budget features are scaled** by the cost of 5 cloud calls with all views (about 35 s and
//!   $0.068 on the reference profile); the authors feed raw seconds and dollars, which leaves the
//!   dollar feature around 1e-2 and nearly invisible to the network.
//! - **Budget accounting** sums the dialogue's calls. The authors sum the calls in the 5-turn
//!   observation window plus the current one, which is the same for M4A1 (at most 5 turns).
//! - **KNN ties** are broken by the lexicographic order of the stored pairs, then by index.
//! - **Learners** ([`learn`]) restate Stable-Baselines3's defaults, which the authors use
//!   unchanged: separate actor and critic MLPs (64-64, tanh) with orthogonal initialisation
//!   (gain √2, policy head 0.01, value head 1); A2C: RMSprop (lr 7e-4, α 0.99, ε 1e-5),
//!   n_steps 5, γ 0.99, GAE λ 1, value coefficient 0.5, gradient-norm clip 0.5; PPO: Adam
//!   (lr 3e-4, ε 1e-5), n_steps 2048, 10 epochs, minibatch 64, γ 0.99, λ 0.95, clip 0.2,
//!   advantages normalised per minibatch. DQN: a ReLU Q-network (64-64, PyTorch's default
//!   initialisation), Adam (lr 1e-4), learning from step 100, a batch of 32 every 4 steps,
//!   Huber loss, γ 0.99, gradient-norm clip 10, target copied every 10,000 steps, ε 1 → 0.05
//!   over the first 10 % (the constrained variant explores and maximises over allowed actions).
//!   Evaluation acts greedily (argmax), as theirs does.
//! - **Baselines**: local-only, cloud-only with all views, cloud-uniform (a uniform cloud
//!   action: the authors' "Cloud"), and random (local with probability ½, otherwise a uniform
//!   cloud action, as the authors').
//! - **Violation** is reported as the fraction of test dialogues over either budget; the
//!   authors report the mean excess over the budget of the dialogues that exceed it.
//!
//! # The constrained bandit ([`bandit`])
//! Huang, Liu and Xu, "Online LLM Selection via Constrained Bandits with Time-Varying Demand"
//! (arXiv 2606.17489): only the abstract is public. It states the problem class (constrained
//! stochastic bandit with bandit feedback, hard packing budget, soft covering constraint,
//! time-varying demand) and that the algorithm combines confidence bounds with demand
//! predictions. Everything concrete in [`bandit`] is ours; see its header.
//!
//! # Live use
//! [`PlacementPolicy`] is loaded from a safetensors file and answers
//! [`PlacementPolicy::act`] for an [`Observation`] built by a [`DialogueState`] from the live
//! dialogue: previous placements and views, the task category, and the remaining budgets after
//! the measured latency and cost of earlier turns; [`LiveCosts`] prices the mask's calls from
//! what they really cost. With the `torch` feature, a TorchScript module
//! exported from PyTorch / Stable-Baselines3 serves instead ([`torch`], [`ServedPolicy`]), with
//! the same observation, actions and mask.

pub mod bandit;
pub mod data;
pub mod env;
pub mod eval;
pub mod knn;
#[cfg(feature = "train")]
pub mod learn;
pub mod live;
mod nn;
pub mod policy;
pub mod profiles;
pub mod serve;
pub mod state;
#[cfg(feature = "torch")]
pub mod torch;

pub use bandit::{BanditConfig, ConstrainedBandit};
pub use data::{Dataset, Dialogue, Turn};
pub use env::{BudgetSampling, Env, EnvConfig, HistoryProtocol, StepOutcome};
pub use eval::{ceiling, evaluate, Ceiling, Metrics, Placer};
pub use knn::Knn;
#[cfg(feature = "train")]
pub use learn::{train, TrainConfig, TrainReport};
pub use live::LiveCosts;
pub use policy::{Algorithm, PlacementPolicy, PolicyMeta, Serve, Variant};
pub use profiles::{CallPrices, CostModel, DeviceProfile, NetworkProfile};
pub use serve::{PolicyFormat, ServedPolicy, TORCHSCRIPT_SUPPORTED};
pub use state::{feasible, DialogueState, Observation};

/// Camera views (X).
pub const VIEWS: usize = 3;
/// Turns of history in the observation (Z).
pub const HISTORY: usize = 5;
/// Numbers per turn in the observation: previous action, views sent, task.
pub const STEP_DIM: usize = VIEWS + 2;
/// Observation length without budgets.
pub const OBS_DIM: usize = STEP_DIM * HISTORY;
/// Observation length with the two remaining budgets.
pub const OBS_DIM_RC: usize = OBS_DIM + 2;
/// Number of actions: local, or cloud with any subset of the views.
pub const ACTIONS: usize = 1 + (1 << VIEWS);
/// Evaluation budgets per dialogue.
pub const LATENCY_BUDGET_S: f64 = 30.0;
pub const USD_BUDGET: f64 = 0.05;

/// View subsets (bit v = view v) in action order 1..ACTIONS: by size, then lexicographic.
const SUBSETS: [u8; 1 << VIEWS] = [0b000, 0b001, 0b010, 0b100, 0b011, 0b101, 0b110, 0b111];

/// Errors of the TMO environment, learners and policy files.
#[derive(Debug, thiserror::Error)]
pub enum TmoError {
    /// The dialogue log is malformed.
    #[error("data: {0}")]
    Data(String),
    /// A bad parameter (unknown profile, zero steps, ...).
    #[error("invalid: {0}")]
    Invalid(String),
    /// A policy file that is malformed or does not fit.
    #[error("policy file: {0}")]
    Policy(String),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// A placement: local, or cloud with a subset of the views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Action(u8);

impl Action {
    pub const LOCAL: Action = Action(0);

    /// Cloud, sending the views whose bits are set in `views` (bit v = view v).
    pub fn cloud(views: u8) -> Action {
        let views = views & ((1 << VIEWS) - 1) as u8;
        let i = SUBSETS
            .iter()
            .position(|&s| s == views)
            .expect("all subsets listed");
        Action(1 + i as u8)
    }

    /// The action with this index, if in range.
    pub fn from_index(i: usize) -> Option<Action> {
        (i < ACTIONS).then_some(Action(i as u8))
    }

    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// All actions in index order.
    pub fn all() -> impl Iterator<Item = Action> + Clone {
        (0..ACTIONS as u8).map(Action)
    }

    pub fn is_local(self) -> bool {
        self.0 == 0
    }

    /// The views sent, as bits (0 for local and for cloud text only).
    pub fn views(self) -> u8 {
        if self.is_local() {
            0
        } else {
            SUBSETS[self.0 as usize - 1]
        }
    }

    /// Whether view `v` is sent.
    pub fn sends(self, v: usize) -> bool {
        self.views() & (1 << v) != 0
    }

    /// Number of views sent.
    pub fn views_sent(self) -> usize {
        self.views().count_ones() as usize
    }

    /// `[cloud, view 0, view 1, view 2]` as 0/1: the per-turn record of the observation.
    pub fn one_hot(self) -> [f32; VIEWS + 1] {
        let mut o = [0.0; VIEWS + 1];
        if !self.is_local() {
            o[0] = 1.0;
            for (v, x) in o[1..].iter_mut().enumerate() {
                *x = if self.sends(v) { 1.0 } else { 0.0 };
            }
        }
        o
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_local() {
            return write!(f, "local");
        }
        write!(f, "cloud")?;
        let views: Vec<String> = (0..VIEWS)
            .filter(|&v| self.sends(v))
            .map(|v| v.to_string())
            .collect();
        if views.is_empty() {
            write!(f, "+text")
        } else {
            write!(f, "+v{}", views.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_decode_to_the_reference_layout() {
        let views: Vec<u8> = Action::all().map(|a| a.views()).collect();
        assert_eq!(
            views,
            [0, 0, 0b001, 0b010, 0b100, 0b011, 0b101, 0b110, 0b111]
        );
        assert!(Action::LOCAL.is_local());
        assert!(!Action::cloud(0).is_local());
        assert_eq!(Action::cloud(0).index(), 1);
        assert_eq!(Action::cloud(0b111).index(), 8);
        assert_eq!(Action::cloud(0b101).index(), 6);
        for a in Action::all() {
            assert_eq!(Action::from_index(a.index()), Some(a));
            if !a.is_local() {
                assert_eq!(Action::cloud(a.views()), a);
            }
        }
        assert_eq!(Action::from_index(ACTIONS), None);
        assert_eq!(Action::LOCAL.one_hot(), [0.0; 4]);
        assert_eq!(Action::cloud(0b100).one_hot(), [1.0, 0.0, 0.0, 1.0]);
        assert_eq!(Action::cloud(0b011).to_string(), "cloud+v0,1");
        assert_eq!(Action::cloud(0).to_string(), "cloud+text");
    }
}
