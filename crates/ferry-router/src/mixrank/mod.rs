//! `mixrank`, ferry's default zoo router: the cheapest mix of models that meets the SLA, with
//! each request ranked inside the mix by how much a costlier model would help it.
//!
//! Per request `x` (with an optional task):
//! - **Satisfaction model.** `p_m(x) = σ(θ_m + δ_{m,task} − b(x) + v_m·ℓ(x))`: a Gaussian belief
//!   about each model's ability (and its offset on the request's task) learned online from every
//!   labelled answer, and a model-agnostic difficulty `b(x) = w₁·g(x) + w₂·δ_nn(x)` from a
//!   pretrained prior `g` ([`prior`]) and the residuals of similar past questions `δ_nn`
//!   ([`knn`]), with the weights `w` learned online too, so a prior or a neighbourhood that
//!   tells nothing about this stream fades to 0 and the policy degrades to the plain mix.
//!   Each model also gets its own neighbourhood lift `δ_m(x)` (its own answers' residuals
//!   among the question's neighbours, shrunk to 0 by the same prior): where the weak model
//!   fails and the strong one does not — GSM8K's word problems, MMLU's subjects — the gain
//!   is model-specific, which a difficulty shared by every model cannot say.
//!   `ℓ(x)` is the question's log length standardised over the stream so far, and `v_m` each
//!   model's own slope on it (a long GSM8K question defeats Mixtral far more often than GPT-4);
//!   it ranks a pair of models by their slope difference shrunk by its noise (positive-part
//!   James–Stein), so a difference within its noise ranks nothing.
//! - **Price.** Serve `argmin_m c_m − λ·p_m(x)` with running mean costs `c_m`. The price of
//!   satisfaction is `λ = λ_α · exp(η (D + m₀))`: `λ_α` is the price at which the expected
//!   satisfaction of the recent requests meets α ([`lagrange`]; the feedforward, in whatever unit
//!   the costs are, so no cost weight is configured), and `D = Σ(α − s)` is the SLA debt over the
//!   answers that got feedback (a two-sided virtual queue, floored so a long surplus is not
//!   banked forever), kept near `−m₀`, a few requests of surplus held as a margin. The debt
//!   moves the *price*, not the target: paying a debt back buys satisfaction where it is
//!   cheapest (the next cheap switch) long before a costly model becomes worth its price.
//! - **Exploration** only on requests that can get feedback: there the mix and the choice are
//!   made with the abilities' upper confidence bounds (optimism in the face of uncertainty), so a
//!   model is tried while its uncertainty could put it into the mix, one call at a time, and
//!   every such call is an ordinary served and charged answer. What optimism overstates comes
//!   back as SLA debt, which raises the price. Costs are learned by serving each
//!   model once, cheapest known first.
//! - **Shadows** where an unserved answer can be labelled too (a judge, or replayed data): a
//!   model cheaper than the served one and outside the mix, whose rate could still make the
//!   mix cheaper (a few unlucky first answers write a good model off for hundreds of
//!   requests), runs beside the served one, charged, its label teaching the rates but not the
//!   SLA debt, while the expected saving over the stream pays for its labels.

pub mod irt;
pub mod knn;
pub mod lagrange;
pub mod prior;
pub mod rates;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use rand::Rng;

use crate::rng::{seeded, PolicyRng, RngSnapshot};
use crate::{Decision, Observation, RouteRequest, RouterError, ZooPolicy};
use irt::{expected_sigmoid, Belief, Belief2, Levels};
use knn::{Entry, Memory, MemorySnapshot, Offsets};
use prior::DifficultyPrior;
use rates::Rates;

/// Parameters. None depends on the zoo, the cost unit or the data: the defaults are the same
/// for every deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct MixRankConfig {
    /// SLA target: the long-run fraction of satisfied requests.
    pub alpha: f64,
    pub seed: u64,
    /// `W`: requests over which an SLA debt is paid back.
    pub payback_requests: f64,
    /// `m₀`: satisfied requests kept in hand as a margin against noise.
    pub margin_requests: f64,
    /// A debt above `escalate_after_requests + escalate_after_share × judged requests` is more
    /// than noise: each further request of it multiplies the price by `e^escalation`.
    pub escalate_after_requests: f64,
    pub escalate_after_share: f64,
    pub escalation: f64,
    /// Largest surplus (in requests) the queue banks.
    pub max_surplus_requests: f64,
    /// Scale of the exploration bonus: `optimism · √(2 ln t) · var` logits on a model's rate
    /// (0 turns exploration off).
    pub optimism: f64,
    /// Recent requests over which the threshold is set.
    pub reference: usize,
    /// Prior standard deviation of a model's slope on the standardised log length (logit
    /// units per standard deviation of length).
    pub slope_sd: f64,
    /// Prior standard deviation of an ability (logit units; 1.5 is about a uniform rate).
    pub ability_sd: f64,
    /// Prior standard deviation of a model's offset on one task.
    pub task_sd: f64,
    /// Tasks with their own offsets; further tasks share the global abilities.
    pub max_tasks: usize,
    /// Neighbours and memory size of the local difficulty, and its prior precision.
    pub neighbours: usize,
    pub memory: usize,
    pub neighbour_precision: f64,
    /// Whether requests are ranked inside the mix by their predicted gain. Off, the share `w`
    /// of the upper model goes by a coin: the mix controller alone, an online fixed split —
    /// the baseline that shows what the ranking buys.
    pub rank: bool,
}

impl MixRankConfig {
    /// The defaults for SLA target `alpha`.
    pub fn new(alpha: f64, seed: u64) -> Self {
        MixRankConfig {
            alpha,
            seed,
            payback_requests: 50.0,
            margin_requests: 3.0,
            escalate_after_requests: 3.0,
            escalate_after_share: 0.003,
            escalation: 0.5,
            max_surplus_requests: 13.0,
            optimism: 1.0,
            reference: 128,
            slope_sd: 0.5,
            ability_sd: 1.5,
            task_sd: 1.0,
            max_tasks: 256,
            neighbours: 32,
            memory: 2048,
            neighbour_precision: 1.0,
            rank: true,
        }
    }
}

/// What a decision needs to be learned from later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    pub model: usize,
    /// Unit embedding (empty without features).
    pub x: Vec<f32>,
    pub task: Option<u32>,
    /// `(g(x), δ_nn(x))` as computed when deciding.
    pub difficulty: [f64; 2],
    /// The standardised log length `ℓ(x)` (0 when the length is unknown).
    #[serde(default)]
    pub length: f64,
}

/// One decision and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub model: usize,
    /// Predicted satisfaction of every model for this request (ability means).
    pub predicted: Vec<f64>,
    /// Whether the exploration bound changed the choice (a model was tried).
    pub explored: bool,
    /// Whether the model was served only to learn its cost.
    pub probe: bool,
    /// A cheaper model to run beside the served one, only to learn its rate (its answer is
    /// not served, its cost is charged, its label teaches the rates but not the SLA debt).
    pub shadow: Option<usize>,
    /// Price of satisfaction in the cost unit, and the SLA debt that set it.
    pub lambda: f64,
    pub debt: f64,
    pub ticket: Ticket,
}

/// Per-model figures for reports and `ferry status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEstimate {
    /// Satisfaction over the recent requests at the ability's mean, with a 95 % interval.
    pub rate: f64,
    pub rate_low: f64,
    pub rate_high: f64,
    /// Mean observed cost (`None` before the first).
    pub cost: Option<f64>,
    pub labels: u64,
    pub served: u64,
}

/// What a decision knows of the request being decided.
struct Request<'a> {
    /// Difficulty `b(x)`.
    b: f64,
    /// Standardised log length.
    length: f64,
    /// Per-model neighbourhood lifts (empty: none).
    lifts: &'a [f64],
    task: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RefEntry {
    difficulty: [f64; 2],
    #[serde(default)]
    length: f64,
    task: Option<u32>,
    /// `δ_m(x)` per model (empty without features, and in state saved before the lifts).
    #[serde(default)]
    lifts: Vec<f64>,
}

/// The policy.
pub struct MixRank {
    cfg: MixRankConfig,
    models: usize,
    prior: Option<DifficultyPrior>,
    /// Per-request satisfaction: `σ(ability − b(x))`, for ranking inside the mix.
    abilities: Levels,
    /// Population satisfaction rates (Beta posteriors, no difficulty), for the mix itself.
    rates: Rates,
    tasks: HashMap<String, u32>,
    weights: Belief2,
    /// Per-model logit slope on the request's standardised log length: a longer question
    /// may be harder for a small model and no harder for a large one, which is exactly
    /// the difference a ranking needs.
    slopes: Vec<Belief>,
    lengths: LogLengths,
    cost_sum: Vec<f64>,
    cost_n: Vec<u64>,
    labels: Vec<u64>,
    served: Vec<u64>,
    debt: f64,
    t: u64,
    explored: u64,
    memory: Memory,
    reference: Vec<RefEntry>,
    ref_next: usize,
    rng: PolicyRng,
    last: Option<Routed>,
    /// Each model's satisfaction rate given instead of learned (see [`MixRank::with_known_rates`]).
    known_rates: Option<Vec<f64>>,
}

/// Everything [`MixRank`] has learned; restoring it continues the run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixRankSnapshot {
    pub abilities: Levels,
    /// Population rates as counts.
    #[serde(default)]
    pub rate_counts: Rates,
    /// Population rates as logit beliefs, as state saved before the counts holds them
    /// (converted on restore); never written.
    #[serde(default, skip_serializing)]
    pub rates: Option<Levels>,
    pub tasks: Vec<(String, u32)>,
    pub weights: Belief2,
    /// Per-model length slopes (absent in state saved before them: restored at the prior).
    #[serde(default)]
    pub slopes: Vec<Belief>,
    /// Running statistics of the requests' log lengths (absent in state saved before them).
    #[serde(default)]
    pub lengths: LogLengths,
    pub cost_sum: Vec<f64>,
    pub cost_n: Vec<u64>,
    pub labels: Vec<u64>,
    pub served: Vec<u64>,
    pub debt: f64,
    pub t: u64,
    pub explored: u64,
    pub memory: MemorySnapshot,
    reference: Vec<RefEntry>,
    /// The reference requests' lifts as state saved between 2026-12-07's two versions holds
    /// them, beside the requests (merged into them on restore); never written.
    #[serde(default, skip_serializing)]
    reference_lifts: Vec<Vec<f64>>,
    pub ref_next: usize,
    pub rng: RngSnapshot,
}

/// Running mean and variance of the requests' log lengths (Welford), which put a request's
/// length on the scale of the stream it arrives in: `ℓ(x) = (ln chars − mean) / sd`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LogLengths {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
}

impl LogLengths {
    /// A standardised feature beyond this many standard deviations is clipped, so one absurd
    /// request cannot carry a weight's whole update.
    const CLIP_SD: f64 = 4.0;

    /// Adds a request of `chars` characters and returns its standardised log length (0 until
    /// the lengths vary).
    pub fn standardise(&mut self, chars: usize) -> f64 {
        let v = (chars.max(1) as f64).ln();
        self.n += 1;
        let d = v - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (v - self.mean);
        if self.n < 2 {
            return 0.0;
        }
        let sd = (self.m2 / (self.n - 1) as f64).sqrt();
        if sd > 1e-9 {
            ((v - self.mean) / sd).clamp(-Self::CLIP_SD, Self::CLIP_SD)
        } else {
            0.0
        }
    }

    fn is_valid(&self) -> bool {
        self.mean.is_finite() && self.m2.is_finite() && self.m2 >= 0.0
    }
}

impl MixRank {
    /// A policy over `models` models; `dim` is the embedding size (0 without features).
    pub fn new(
        cfg: MixRankConfig,
        models: usize,
        dim: usize,
        prior: Option<DifficultyPrior>,
    ) -> Result<Self, RouterError> {
        if models == 0 {
            return Err(RouterError::Invalid("the zoo is empty".into()));
        }
        if models > usize::from(u16::MAX) {
            return Err(RouterError::Invalid(format!("{models} models is too many")));
        }
        if !(0.0..=1.0).contains(&cfg.alpha) {
            return Err(RouterError::Invalid(format!(
                "alpha {} not in [0, 1]",
                cfg.alpha
            )));
        }
        let positive = [
            cfg.payback_requests,
            cfg.ability_sd,
            cfg.task_sd,
            cfg.neighbour_precision,
            cfg.slope_sd,
        ];
        let non_negative = [
            cfg.margin_requests,
            cfg.max_surplus_requests,
            cfg.optimism,
            cfg.escalate_after_requests,
            cfg.escalate_after_share,
            cfg.escalation,
        ];
        let valid = positive.iter().all(|v| v.is_finite() && *v > 0.0)
            && non_negative.iter().all(|v| v.is_finite() && *v >= 0.0)
            && cfg.reference > 0;
        if !valid {
            return Err(RouterError::Invalid(
                "mixrank parameters must be finite, and positive where they scale".into(),
            ));
        }
        if let Some(p) = &prior {
            if p.dim != dim {
                return Err(RouterError::Invalid(format!(
                    "difficulty prior reads {}-dimensional embeddings, the encoder gives {dim}",
                    p.dim
                )));
            }
        }
        // With a prior, trust its scale at first; the neighbourhood starts at full weight
        // too (its estimate is already shrunk towards 0 by its own prior).
        let weights = Belief2::new([if prior.is_some() { 1.0 } else { 0.0 }, 1.0], [0.5, 0.5]);
        Ok(MixRank {
            abilities: Levels::new(models, cfg.ability_sd),
            rates: Rates::new(models),
            tasks: HashMap::new(),
            weights,
            slopes: vec![Belief::new(0.0, cfg.slope_sd); models],
            lengths: LogLengths::default(),
            cost_sum: vec![0.0; models],
            cost_n: vec![0; models],
            labels: vec![0; models],
            served: vec![0; models],
            debt: 0.0,
            t: 0,
            explored: 0,
            memory: Memory::new(dim, if dim == 0 { 0 } else { cfg.memory }),
            reference: Vec::new(),
            ref_next: 0,
            rng: seeded(cfg.seed),
            last: None,
            known_rates: None,
            prior,
            models,
            cfg,
        })
    }

    /// The same policy told each model's satisfaction rate instead of learning it (its costs,
    /// the SLA debt and the ranking are still learned online): an oracle on the rates alone,
    /// for replays that split the policy's distance from the best fixed split into the price
    /// of learning the rates and the controller's own. Nothing live uses it.
    pub fn with_known_rates(mut self, rates: Vec<f64>) -> Result<Self, RouterError> {
        if rates.len() != self.models || !rates.iter().all(|r| (0.0..=1.0).contains(r)) {
            return Err(RouterError::Invalid(format!(
                "known rates: one rate in [0, 1] per model ({} models)",
                self.models
            )));
        }
        self.known_rates = Some(rates);
        Ok(self)
    }

    /// The posterior of model m's rate on `task`: the counted one, or a known rate held with
    /// the weight of a billion answers (clamped off 0 and 1, where a logit is infinite).
    fn rate_posterior(&self, m: usize, task: Option<u32>) -> rates::Posterior {
        match &self.known_rates {
            Some(known) => {
                const ANSWERS: f64 = 1e9;
                let r = known[m].clamp(1e-6, 1.0 - 1e-6);
                rates::Posterior {
                    a: r * ANSWERS,
                    b: (1.0 - r) * ANSWERS,
                }
            }
            None => self.rates.posterior(m, task, self.cfg.task_sd),
        }
    }

    pub fn config(&self) -> &MixRankConfig {
        &self.cfg
    }

    pub fn models(&self) -> usize {
        self.models
    }

    /// The difficulty prior in use.
    pub fn prior(&self) -> Option<&DifficultyPrior> {
        self.prior.as_ref()
    }

    /// SLA debt `D` (negative: surplus).
    pub fn debt(&self) -> f64 {
        self.debt
    }

    /// Requests decided and exploration choices so far.
    pub fn t(&self) -> u64 {
        self.t
    }

    pub fn explored(&self) -> u64 {
        self.explored
    }

    /// The difficulty weights `(w_prior, w_neighbours)` learned so far.
    pub fn difficulty_weights(&self) -> [f64; 2] {
        self.weights.mean
    }

    fn mean_cost(&self, m: usize) -> Option<f64> {
        (self.cost_n[m] > 0).then(|| self.cost_sum[m] / self.cost_n[m] as f64)
    }

    /// Logit mean and variance of model m's ability on `task`.
    fn ability(&self, m: usize, task: Option<u32>) -> (f64, f64) {
        self.abilities.get(m, task)
    }

    /// Logit mean and variance of model m's satisfaction on a request of difficulty `b`,
    /// standardised log length `length` and neighbourhood lifts `lifts` (empty: none) on
    /// `task`.
    fn logit(&self, m: usize, task: Option<u32>, b: f64, length: f64, lifts: &[f64]) -> (f64, f64) {
        let (mean, var) = self.ability(m, task);
        let v = self.slopes[m];
        let lift = lifts.get(m).copied().unwrap_or(0.0);
        (
            mean - b + v.mean * length + lift,
            var + length * length * v.var,
        )
    }

    /// Predicted satisfaction of every model for a request.
    fn predict(&self, b: f64, length: f64, task: Option<u32>, lifts: &[f64]) -> Vec<f64> {
        (0..self.models)
            .map(|m| {
                let (mean, var) = self.logit(m, task, b, length, lifts);
                expected_sigmoid(mean, var)
            })
            .collect()
    }

    fn task_slot(&mut self, task: Option<&str>) -> Option<u32> {
        let name = task?;
        if let Some(&k) = self.tasks.get(name) {
            return Some(k);
        }
        if self.tasks.len() >= self.cfg.max_tasks {
            return None;
        }
        let k = self.abilities.add_task(self.cfg.task_sd);
        self.rates.add_task();
        self.tasks.insert(name.to_string(), k);
        Some(k)
    }

    /// `(g(x), δ_nn(x))` for a unit embedding (empty: no embedding), and each model's
    /// neighbourhood lift `δ_m(x)` (empty without an embedding).
    fn difficulty_features(&mut self, x: &[f32]) -> ([f64; 2], Vec<f64>) {
        if x.is_empty() {
            return ([0.0, 0.0], Vec::new());
        }
        let g = self.prior.as_ref().map_or(0.0, |p| p.score(x));
        // Residuals of the neighbours under the current abilities and the known part of their
        // difficulty (split borrows: the memory scans while the beliefs are read).
        let MixRank {
            memory,
            abilities,
            weights,
            slopes,
            cfg,
            models,
            ..
        } = self;
        let [w_prior, w_near] = weights.mean;
        let residual = |e: &Entry, near: f64| {
            let task = (e.task != u32::MAX).then_some(e.task);
            let m = usize::from(e.model);
            let (theta, _) = abilities.get(m, task);
            let p = irt::sigmoid(
                theta - w_prior * f64::from(e.prior) - near + slopes[m].mean * f64::from(e.length),
            );
            (f64::from(u8::from(e.satisfied)) - p, p * (1.0 - p))
        };
        let Offsets { difficulty, lifts } = memory.offsets(
            x,
            cfg.neighbours,
            cfg.neighbour_precision,
            *models,
            |e| residual(e, 0.0),
            |e| residual(e, w_near * f64::from(e.neighbours)),
        );
        ([g, difficulty], lifts)
    }

    fn push_reference(&mut self, r: RefEntry) {
        if self.reference.len() < self.cfg.reference {
            self.reference.push(r);
        } else {
            self.reference[self.ref_next] = r;
        }
        self.ref_next = (self.ref_next + 1) % self.cfg.reference;
    }

    /// Decides for one request.
    pub fn route(&mut self, req: &RouteRequest) -> Routed {
        self.t += 1;
        let x = knn::unit(req.features).unwrap_or_default();
        let task = self.task_slot(req.task);
        let (difficulty, lifts) = self.difficulty_features(&x);
        let length = req.text_chars.map_or(0.0, |c| self.lengths.standardise(c));
        self.push_reference(RefEntry {
            difficulty,
            length,
            task,
            lifts: lifts.clone(),
        });
        let b = self.weights.dot(difficulty);
        let predicted = self.predict(b, length, task, &lifts);
        let debt = self.debt;
        let ticket = |model| Ticket {
            model,
            x: x.clone(),
            task,
            difficulty,
            length,
        };
        // Costs are learned by serving each model once, in zoo order.
        if let Some(m) = (0..self.models).find(|&m| self.cost_n[m] == 0 && self.served[m] == 0) {
            self.served[m] += 1;
            let routed = Routed {
                model: m,
                predicted,
                explored: false,
                probe: true,
                shadow: None,
                lambda: 0.0,
                debt,
                ticket: ticket(m),
            };
            self.last = Some(routed.clone());
            return routed;
        }
        let cost: Vec<f64> = (0..self.models)
            .map(|m| self.mean_cost(m).unwrap_or(0.0))
            .collect();
        let explore = req.feedback_expected && self.cfg.optimism > 0.0;
        // The bound widens like UCB's √(2 ln t), so a model unlucky in its first answers is
        // retried, ever more rarely, however long the run.
        let z = if explore {
            self.cfg.optimism * (2.0 * (self.t as f64).max(1.0).ln()).sqrt().max(1.0)
        } else {
            0.0
        };
        let u = self.rng.random::<f64>();
        let me = Request {
            b,
            length,
            lifts: &lifts,
            task,
        };
        let (model, lambda) = self.decide_model(&me, &cost, z, u);
        let explored = explore && self.decide_model(&me, &cost, 0.0, u).0 != model;
        let shadow = if explore && req.label_unserved {
            self.shadow(model, task, &cost)
        } else {
            None
        };
        self.explored += u64::from(explored || shadow.is_some());
        self.served[model] += 1;
        let routed = Routed {
            model,
            predicted,
            explored,
            probe: false,
            shadow,
            lambda,
            debt,
            ticket: ticket(model),
        };
        self.last = Some(routed.clone());
        routed
    }

    /// A cheaper model worth running beside `served` only to learn its rate, charged like any
    /// call. Its answer costs less than the served one's, so the lesson never costs more than
    /// the request; serving that model instead would stake the SLA on a rate not yet known.
    ///
    /// Candidates are the costed models cheaper than `served` and outside the honest mix (the
    /// mix's own models get labels by being served, and the SLA feedback corrects their
    /// share). A candidate's worth is the expected saving on the cheapest mix meeting α over
    /// its rate's posterior (logit-normal, the upper tail, where a better rate could lower
    /// the mix's cost), times the requests seen so far (as many again are expected). It runs
    /// while that worth covers the price of doubling its labels; the worthiest one is taken.
    fn shadow(&self, served: usize, task: Option<u32>, cost: &[f64]) -> Option<usize> {
        const GRID: usize = 24;
        const GRID_STEP: f64 = 0.25;
        let posts: Vec<_> = (0..self.models)
            .map(|m| self.rate_posterior(m, task))
            .collect();
        let honest: Vec<f64> = posts.iter().map(|p| p.mean()).collect();
        let mix_cost = |p: &[f64]| {
            let th = lagrange::threshold(&[p.to_vec()], cost, self.cfg.alpha);
            th.reachable.then_some(th.cost)
        };
        let base_th = lagrange::threshold(std::slice::from_ref(&honest), cost, self.cfg.alpha);
        let base = if base_th.reachable {
            base_th.cost
        } else {
            cost.iter().copied().fold(0.0, f64::max)
        };
        let in_mix = |m: usize| {
            base_th.reachable
                && [false, true]
                    .iter()
                    .any(|&up| lagrange::choose_with(&honest, cost, base_th.lambda, up) == m)
        };
        let tiny = 1e-9 * base.max(f64::MIN_POSITIVE);
        let mut best: Option<(f64, usize)> = None;
        for m in 0..self.models {
            if m == served || self.cost_n[m] == 0 || cost[m] >= cost[served] || in_mix(m) {
                continue;
            }
            let post = posts[m];
            let (mu, sd) = ((post.a / post.b).ln(), post.logit_var().sqrt());
            let at = |logit: f64| {
                let mut p = honest.clone();
                p[m] = irt::sigmoid(logit);
                mix_cost(&p).unwrap_or(base)
            };
            // Expected saving: a Riemann sum over the upper tail, to 6 standard deviations.
            let mut saving = 0.0;
            for k in 1..=GRID {
                let u = k as f64 * GRID_STEP;
                let gain = (base - at(mu + u * sd)).max(0.0);
                saving +=
                    gain * (-0.5 * u * u).exp() * GRID_STEP / (2.0 * std::f64::consts::PI).sqrt();
            }
            if saving <= tiny {
                continue;
            }
            let worth = saving * self.t as f64;
            if worth >= cost[m] * (self.labels[m] + 1) as f64 && best.is_none_or(|(w, _)| worth > w)
            {
                best = Some((worth, m));
            }
        }
        best.map(|(_, m)| m)
    }

    /// Every model's rate on `task` at `z` standard deviations above its logit mean: an upper
    /// confidence bound that stays open as long as the model's answers are few.
    fn upper_bounds(&self, task: Option<u32>, z: f64) -> Vec<f64> {
        (0..self.models)
            .map(|m| {
                let post = self.rate_posterior(m, task);
                post.shifted(z * post.logit_var().sqrt())
            })
            .collect()
    }

    /// Population rates of every model on `task`: honest (`z = 0`, the rate's expectation
    /// under its belief) or optimistic, `z · var` logits up. A bonus in the logit *variance*
    /// is large for a model with a handful of answers (variance near the prior's) and gone
    /// after a few dozen, which is where one more answer stops changing the mix.
    fn task_rates(&self, task: Option<u32>, z: f64) -> Vec<f64> {
        (0..self.models)
            .map(|m| {
                let post = self.rate_posterior(m, task);
                if z > 0.0 {
                    post.shifted(z * post.logit_var())
                } else {
                    post.mean()
                }
            })
            .collect()
    }

    /// The choice for a request of difficulty `b` on `task`, and the price it was made at.
    ///
    /// Mix first: the threshold over the recent requests, each at its task's rate (so only
    /// tasks, not single requests, move the mix), gives the price `λ_α` that meets α and the
    /// group of switches at that price. The debt moves how much of that group is taken: the
    /// share `w` that meets `α + (D + m₀)/W`, so a debt is paid back over about `W` requests
    /// through the mix's own models, never a costlier one, until it exceeds what noise
    /// explains (see `escalate_*`) and the price rises above `λ_α`.
    ///
    /// Rank inside: a request whose task sits in that group goes to the upper model when its
    /// predicted gain `p_hi(x) − p_lo(x)` ranks in the top `w` of the recent requests' gains
    /// (`u` places it uniformly among ties, so with no signal this is a coin of weight `w`).
    fn decide_model(&self, me: &Request, cost: &[f64], z: f64, u: f64) -> (usize, f64) {
        let task = me.task;
        // Each recent request at its task's rates: optimistic ones choose the mix (a model is
        // tried while it could belong to it), honest ones set how much of the mix's upper
        // model is served.
        let table = |zz: f64| {
            let mut by_task: HashMap<Option<u32>, Vec<f64>> = HashMap::new();
            for r in self.reference.iter().map(|r| r.task).chain([task]) {
                by_task.entry(r).or_insert_with(|| self.task_rates(r, zz));
            }
            by_task
        };
        let optimistic = table(z);
        // Without exploration both tables are the same: build it once.
        let honest = if z > 0.0 {
            table(0.0)
        } else {
            optimistic.clone()
        };
        let rows: Vec<Vec<f64>> = self
            .reference
            .iter()
            .map(|r| optimistic[&r.task].clone())
            .collect();
        let mine = &optimistic[&task];
        let alpha = self.cfg.alpha;
        let at_alpha = lagrange::threshold(&rows, cost, alpha);
        if !at_alpha.reachable {
            // Nothing believed meets α: the most promising model by UCB's widening bound (in
            // standard deviations: the SLA is being missed anyway, and a model unlucky in its
            // first answers must be retried however well the others are known).
            let wide = if z > 0.0 {
                (2.0 * (self.t as f64).max(1.0).ln()).sqrt().max(z)
            } else {
                0.0
            };
            let top =
                lagrange::choose_with(&self.upper_bounds(task, wide), cost, f64::INFINITY, true);
            return (top, f64::INFINITY);
        }
        // The mix's price: where α is crossed, or the first switch when the cheapest choices
        // are believed to meet α already (their upper neighbour is the way to pay a debt).
        let lambda = if at_alpha.lambda > 0.0 {
            at_alpha.lambda
        } else {
            at_alpha.first_switch
        };
        if !lambda.is_finite() {
            return (lagrange::choose_with(mine, cost, 0.0, false), 0.0);
        }
        let judged: u64 = self.labels.iter().sum();
        let tolerated =
            self.cfg.escalate_after_requests + self.cfg.escalate_after_share * judged as f64;
        if self.debt > tolerated {
            // Past the noise: take whole switch groups up to a price rising with the debt.
            let log = self.cfg.escalation * (self.debt - tolerated);
            let escalated = lambda * log.min(700.0).exp();
            return (
                lagrange::choose_with(mine, cost, escalated, true),
                escalated,
            );
        }
        // The share w of the switches at that price that meets the target on honest rates.
        let target = (alpha + (self.debt + self.cfg.margin_requests) / self.cfg.payback_requests)
            .clamp(0.0, 1.0);
        let (mut fixed, mut span) = (0.0, 0.0);
        for r in &self.reference {
            let q = &optimistic[&r.task];
            let h = &honest[&r.task];
            let lo = lagrange::choose_with(q, cost, lambda, false);
            let hi = lagrange::choose_with(q, cost, lambda, true);
            fixed += h[lo];
            span += h[hi] - h[lo];
        }
        let need = target * self.reference.len() as f64 - fixed;
        let w = if span > 1e-12 {
            (need / span).clamp(0.0, 1.0)
        } else if need > 0.0 {
            1.0
        } else {
            0.0
        };
        let lo = lagrange::choose_with(mine, cost, lambda, false);
        let hi = lagrange::choose_with(mine, cost, lambda, true);
        if lo == hi {
            return (lo, lambda);
        }
        if !self.cfg.rank {
            return (if u >= 1.0 - w { hi } else { lo }, lambda);
        }
        // Rank this request's gain among the recent requests of its task.
        // The length ranks by the two models' slope difference shrunk by its noise (positive-
        // part James–Stein: a difference within one standard deviation counts for nothing, one
        // of z deviations for 1 − 1/z² of itself): a difference still within its noise would
        // rank by chance, and a wrong ranking costs more (debt, escalation) than a right one
        // saves.
        let (vh, vl) = (self.slopes[hi], self.slopes[lo]);
        let diff = vh.mean - vl.mean;
        let shrink = if diff.abs() > 1e-12 {
            (1.0 - (vh.var + vl.var) / (diff * diff)).max(0.0)
        } else {
            0.0
        };
        let gain = |b: f64, length: f64, lifts: &[f64]| {
            let length = length * shrink;
            let (mh, vh) = self.logit(hi, task, b, length, lifts);
            let (ml, vl) = self.logit(lo, task, b, length, lifts);
            expected_sigmoid(mh, vh) - expected_sigmoid(ml, vl)
        };
        let own = gain(me.b, me.length, me.lifts);
        let (mut below, mut ties, mut n) = (0usize, 0usize, 0usize);
        for r in self.reference.iter().filter(|r| r.task == task) {
            let g = gain(self.weights.dot(r.difficulty), r.length, &r.lifts);
            n += 1;
            if (g - own).abs() <= 1e-12 {
                ties += 1;
            } else if g < own {
                below += 1;
            }
        }
        let rank = if n == 0 {
            u
        } else {
            (below as f64 + u * ties as f64) / n as f64
        };
        (if rank >= 1.0 - w { hi } else { lo }, lambda)
    }

    /// Books the measured cost of a model's answer (any request, explored or not).
    pub fn record_cost(&mut self, model: usize, cost: f64) {
        if model < self.models && cost.is_finite() && cost >= 0.0 {
            self.cost_sum[model] += cost;
            self.cost_n[model] += 1;
        }
    }

    /// The satisfaction label of a decided request: moves the SLA debt, the abilities, the
    /// difficulty weights, and remembers the question for its neighbours.
    pub fn record_feedback(&mut self, ticket: &Ticket, satisfied: bool) {
        self.record_label(ticket, satisfied, true);
    }

    /// The label of one model's answer to a decided request: `served` says whether the user
    /// got that answer (only those move the SLA debt; a shadow answer teaches the rates).
    pub fn record_label(&mut self, ticket: &Ticket, satisfied: bool, served: bool) {
        let m = ticket.model;
        if m >= self.models {
            return;
        }
        if served {
            let s = f64::from(u8::from(satisfied));
            self.debt = (self.debt + self.cfg.alpha - s).max(-self.cfg.max_surplus_requests);
        }
        let b = self.weights.dot(ticket.difficulty);
        let task = ticket
            .task
            .filter(|&k| (k as usize) < self.abilities.tasks.len());
        let length = if ticket.length.is_finite() {
            ticket.length
        } else {
            0.0
        };
        let lift = self.slopes[m].mean * length;
        self.abilities.observe(m, task, lift - b, satisfied);
        self.rates.observe(m, task, satisfied);
        let (theta, _) = self.ability(m, task);
        if !ticket.x.is_empty() {
            self.weights
                .observe(theta + lift, ticket.difficulty, satisfied);
        }
        self.slopes[m].observe_along(theta - b, length, satisfied);
        self.labels[m] += 1;
        if ticket.x.len() == self.memory.dim() {
            self.memory.push(
                &ticket.x,
                Entry {
                    model: m as u16,
                    task: task.unwrap_or(u32::MAX),
                    satisfied,
                    prior: ticket.difficulty[0] as f32,
                    length: length as f32,
                    neighbours: ticket.difficulty[1] as f32,
                },
            );
        }
    }

    /// Each model's satisfaction rate over the recent requests' tasks (the rate the mix is
    /// decided on) with a 95 % interval, its mean cost and counts.
    pub fn estimates(&self) -> Vec<ModelEstimate> {
        let tasks: Vec<Option<u32>> = if self.reference.is_empty() {
            vec![None]
        } else {
            self.reference.iter().map(|r| r.task).collect()
        };
        (0..self.models)
            .map(|m| {
                let mut acc = [0.0; 3];
                for &k in &tasks {
                    let post = self.rate_posterior(m, k);
                    let sd = post.logit_var().sqrt();
                    acc[0] += post.mean();
                    acc[1] += post.shifted(-1.96 * sd);
                    acc[2] += post.shifted(1.96 * sd);
                }
                let n = tasks.len() as f64;
                ModelEstimate {
                    rate: acc[0] / n,
                    rate_low: acc[1] / n,
                    rate_high: acc[2] / n,
                    cost: self.mean_cost(m),
                    labels: self.labels[m],
                    served: self.served[m],
                }
            })
            .collect()
    }

    pub fn snapshot(&self) -> MixRankSnapshot {
        let mut tasks: Vec<(String, u32)> =
            self.tasks.iter().map(|(k, v)| (k.clone(), *v)).collect();
        tasks.sort_by_key(|t| t.1);
        MixRankSnapshot {
            abilities: self.abilities.clone(),
            rate_counts: self.rates.clone(),
            rates: None,
            tasks,
            weights: self.weights,
            slopes: self.slopes.clone(),
            lengths: self.lengths,
            cost_sum: self.cost_sum.clone(),
            cost_n: self.cost_n.clone(),
            labels: self.labels.clone(),
            served: self.served.clone(),
            debt: self.debt,
            t: self.t,
            explored: self.explored,
            memory: self.memory.snapshot(),
            reference: self.reference.clone(),
            reference_lifts: Vec::new(),
            ref_next: self.ref_next,
            rng: RngSnapshot::capture(&self.rng),
        }
    }

    /// Continues from a snapshot of a policy over the same zoo and encoder.
    pub fn restore(&mut self, s: &MixRankSnapshot) -> Result<(), RouterError> {
        let bad = |why: String| Err(RouterError::State(why));
        let n = self.models;
        if [
            s.cost_sum.len(),
            s.cost_n.len(),
            s.labels.len(),
            s.served.len(),
        ]
        .iter()
        .any(|&l| l != n)
        {
            return bad(format!(
                "state for another zoo size, this one has {n} models"
            ));
        }
        let ntasks = s.tasks.len();
        if s.abilities.tasks.len() != ntasks
            || s.rate_counts.tasks.len() != ntasks && s.rates.is_none()
            || s.rates.as_ref().is_some_and(|r| r.tasks.len() != ntasks)
            || s.tasks.iter().any(|(_, k)| *k as usize >= ntasks)
        {
            return bad("task offsets do not match the task list".into());
        }
        let rates_valid = match &s.rates {
            Some(old) => old.is_valid(n),
            None => s.rate_counts.is_valid(n),
        };
        if !s.abilities.is_valid(n)
            || !rates_valid
            || !s.weights.is_valid()
            || !s.lengths.is_valid()
            || !(s.slopes.is_empty()
                || s.slopes.len() == n && s.slopes.iter().all(Belief::is_valid))
        {
            return bad("abilities or weights are not finite with positive variance".into());
        }
        if !s.debt.is_finite()
            || !s.cost_sum.iter().all(|c| c.is_finite() && *c >= 0.0)
            || s.reference.len() > self.cfg.reference
            || s.ref_next >= self.cfg.reference
            || s.reference.iter().any(|r| {
                !r.difficulty.iter().all(|d| d.is_finite())
                    || r.task.is_some_and(|k| k as usize >= ntasks)
            })
        {
            return bad("debt, costs or reference requests out of range".into());
        }
        if s.memory.dim != self.memory.dim() {
            return bad(format!(
                "difficulty memory of {}-dimensional embeddings, the encoder gives {}",
                s.memory.dim,
                self.memory.dim()
            ));
        }
        let memory = Memory::restore(&s.memory, n)?;
        self.rng = s.rng.restore()?;
        self.abilities = s.abilities.clone();
        self.rates = match &s.rates {
            Some(old) => Rates::from_logit_beliefs(old),
            None => s.rate_counts.clone(),
        };
        self.tasks = s.tasks.iter().cloned().collect();
        self.weights = s.weights;
        self.slopes = if s.slopes.is_empty() {
            vec![Belief::new(0.0, self.cfg.slope_sd); n]
        } else {
            s.slopes.clone()
        };
        self.lengths = s.lengths;
        self.cost_sum = s.cost_sum.clone();
        self.cost_n = s.cost_n.clone();
        self.labels = s.labels.clone();
        self.served = s.served.clone();
        self.debt = s.debt;
        self.t = s.t;
        self.explored = s.explored;
        self.memory = memory;
        let mut reference = s.reference.clone();
        if s.reference_lifts.len() == reference.len() {
            for (r, lifts) in reference.iter_mut().zip(&s.reference_lifts) {
                r.lifts.clone_from(lifts);
            }
        }
        let lifts_valid = reference.iter().all(|r| {
            (r.lifts.is_empty() || r.lifts.len() == n) && r.lifts.iter().all(|v| v.is_finite())
        });
        if !lifts_valid {
            for r in &mut reference {
                r.lifts.clear();
            }
        }
        self.reference = reference;
        self.ref_next = s.ref_next;
        self.last = None;
        Ok(())
    }
}

impl ZooPolicy for MixRank {
    fn name(&self) -> String {
        "mixrank".into()
    }

    fn decide(&mut self, x: &[f32]) -> Decision {
        self.decide_for(&RouteRequest {
            features: x,
            task: None,
            feedback_expected: true,
            label_unserved: true,
            text_chars: None,
        })
    }

    fn decide_for(&mut self, req: &RouteRequest) -> Decision {
        let r = self.route(req);
        match r.shadow {
            Some(learn) => Decision::Shadow {
                serve: r.model,
                learn,
            },
            None => Decision::Serve(r.model),
        }
    }

    fn predicted(&self) -> Option<Vec<f64>> {
        self.last.as_ref().map(|r| r.predicted.clone())
    }

    fn explorations(&self) -> u64 {
        self.explored
    }

    fn observe(&mut self, _x: &[f32], decision: Decision, obs: &Observation) {
        for (m, c) in obs.costs.iter().enumerate() {
            if let Some(c) = c {
                self.record_cost(m, *c);
            }
        }
        let Some(routed) = self.last.take() else {
            return;
        };
        let m = decision.served(self.models);
        if let (true, Some(Some(s))) = (obs.feedback, obs.satisfied.get(m)) {
            let mut ticket = routed.ticket.clone();
            ticket.model = m;
            self.record_feedback(&ticket, *s);
        }
        if let Decision::Shadow { learn, .. } = decision {
            if let Some(Some(s)) = obs.satisfied.get(learn) {
                let mut ticket = routed.ticket;
                ticket.model = learn;
                self.record_label(&ticket, *s, false);
            }
        }
    }
}

#[cfg(test)]
mod tests;
