//! MESS+: per request, explore with probability `p_t = min(1, c / t^(1/4))` (run every model,
//! serve the most capable, train the predictor once), otherwise serve
//! `argmin_m V·Ê_m + Q·(α − ŝ_m(x))`, then move the SLA virtual queue `Q ← max(0, Q + α − s)`.
//!
//! Two queues, as in the reference code: `q` moves on every request (with the observed
//! satisfaction, or the predicted one when no feedback arrived) and `q_tracked` only when feedback
//! arrived; decisions use `q_tracked`. `Ê_m` is the running mean of every cost observed for m,
//! seeded at 1e-6 like the reference's online path.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::predictor::Predictor;
use crate::rng::{seeded, PolicyRng, RngSnapshot};
use crate::{Decision, Observation, RouterError, ZooPolicy};

/// Cost estimate before any observation (reference: 1e-6).
const COST_PRIOR: f64 = 1e-6;

/// MESS+ parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct MessPlusConfig {
    /// SLA target: long-run fraction of satisfied requests.
    pub alpha: f64,
    /// Cost weight; in the cost column's unit (joules: 1e-6..1e-2 in the reference).
    pub v: f64,
    /// Exploration constant of `p_t = min(1, c / t^(1/4))`.
    pub c: f64,
    pub seed: u64,
    /// `mess-plus-fb` (ours, beyond the paper): also train the predictor on every served answer
    /// that got feedback, with loss on the serving model's logit only. The reference trains on
    /// exploration samples alone.
    pub train_on_feedback: bool,
}

/// MESS+ over a zoo ordered by ascending cost.
pub struct MessPlus<P: Predictor> {
    cfg: MessPlusConfig,
    models: usize,
    predictor: P,
    q: f64,
    q_tracked: f64,
    t: u64,
    cost_sum: Vec<f64>,
    cost_n: Vec<u64>,
    rng: PolicyRng,
    explored: u64,
    last_scores: Vec<f64>,
}

/// Everything [`MessPlus`] has learned apart from its predictor: queues, step count, cost
/// means and the generator's position. Restoring it continues the run exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessPlusSnapshot {
    pub q: f64,
    pub q_tracked: f64,
    pub t: u64,
    pub explored: u64,
    /// Sum and count of the observed costs of each model, in zoo order.
    pub cost_sum: Vec<f64>,
    pub cost_n: Vec<u64>,
    pub rng: RngSnapshot,
}

impl<P: Predictor> MessPlus<P> {
    pub fn new(cfg: MessPlusConfig, models: usize, predictor: P) -> Result<Self, RouterError> {
        if models == 0 {
            return Err(RouterError::Invalid("the zoo is empty".into()));
        }
        if !(0.0..=1.0).contains(&cfg.alpha) {
            return Err(RouterError::Invalid(format!(
                "alpha {} not in [0, 1]",
                cfg.alpha
            )));
        }
        if !(cfg.v >= 0.0 && cfg.c >= 0.0) {
            return Err(RouterError::Invalid("v and c must be >= 0".into()));
        }
        if predictor.outputs() != models {
            return Err(RouterError::Invalid(format!(
                "predictor has {} outputs for {models} models",
                predictor.outputs()
            )));
        }
        Ok(MessPlus {
            rng: seeded(cfg.seed),
            cfg,
            models,
            predictor,
            q: 0.0,
            q_tracked: 0.0,
            t: 0,
            cost_sum: vec![0.0; models],
            cost_n: vec![0; models],
            explored: 0,
            last_scores: Vec::new(),
        })
    }

    /// `p_t` for the next request.
    pub fn exploration_probability(&self) -> f64 {
        exploration_probability(self.cfg.c, self.t + 1)
    }

    /// Queue moved on every request.
    pub fn q(&self) -> f64 {
        self.q
    }

    /// Queue moved only on feedback; decisions use it.
    pub fn q_tracked(&self) -> f64 {
        self.q_tracked
    }

    /// Requests decided so far.
    pub fn t(&self) -> u64 {
        self.t
    }

    /// Exploration steps so far.
    pub fn explored(&self) -> u64 {
        self.explored
    }

    /// `Ê_m`.
    pub fn cost_estimates(&self) -> Vec<f64> {
        (0..self.models)
            .map(|m| {
                if self.cost_n[m] == 0 {
                    COST_PRIOR
                } else {
                    self.cost_sum[m] / self.cost_n[m] as f64
                }
            })
            .collect()
    }

    /// The drift-plus-penalty choice for predicted satisfactions `s_hat`.
    pub fn argmin(&self, s_hat: &[f64]) -> usize {
        let e = self.cost_estimates();
        let mut best = (f64::INFINITY, 0);
        for m in 0..self.models {
            let score = self.cfg.v * e[m] + self.q_tracked * (self.cfg.alpha - s_hat[m]);
            // Ties go to the cheaper model (lower index).
            if score < best.0 {
                best = (score, m);
            }
        }
        best.1
    }

    /// The predictor.
    pub fn predictor(&self) -> &P {
        &self.predictor
    }

    /// The predictor, for restoring its weights.
    pub fn predictor_mut(&mut self) -> &mut P {
        &mut self.predictor
    }

    /// The parameters this policy runs with.
    pub fn config(&self) -> &MessPlusConfig {
        &self.cfg
    }

    /// Zoo size.
    pub fn models(&self) -> usize {
        self.models
    }

    /// Decides like [`ZooPolicy::decide`] and also returns the predicted satisfaction of every
    /// model (empty for an exploration step, which predicts nothing). For a live service, where
    /// decisions of concurrent requests interleave and each request keeps its own prediction.
    pub fn decide_scored(&mut self, x: &[f32]) -> (Decision, Vec<f64>) {
        let d = self.decide(x);
        (d, std::mem::take(&mut self.last_scores))
    }

    /// Books the measured cost of each model that ran (`None` for those that did not).
    pub fn record_costs(&mut self, costs: &[Option<f64>]) {
        for (m, c) in costs.iter().enumerate().take(self.models) {
            if let Some(c) = c.filter(|c| c.is_finite() && *c >= 0.0) {
                self.cost_sum[m] += c;
                self.cost_n[m] += 1;
            }
        }
    }

    /// Moves `Q` for a finished request whose feedback has not arrived: by the satisfaction the
    /// predictor expected of the served model (`None`, as after an exploration step, leaves `Q`
    /// where it is: `α − α`).
    pub fn record_unjudged(&mut self, predicted: Option<f64>) {
        let s = predicted.unwrap_or(self.cfg.alpha).clamp(0.0, 1.0);
        self.q = queue_update(self.q, self.cfg.alpha, s);
    }

    /// Feedback on the served answer of a request decided as `decision`: moves `Q_tracked` and
    /// trains the predictor (exploration samples always; served answers in `mess-plus-fb`).
    /// In a live service `Q` already moved when the request finished (see
    /// [`MessPlus::record_unjudged`]); replay, which knows the label at once, uses
    /// [`ZooPolicy::observe`] instead.
    pub fn record_feedback(&mut self, x: &[f32], decision: Decision, satisfied: bool) {
        let mut labels = vec![None; self.models];
        labels[decision.served(self.models)] = Some(satisfied);
        self.record_labels(x, decision, &labels);
    }

    /// Labels for several models' answers to one request (zoo order, `None` where a model did
    /// not run or was not graded), as a judge gives them for an exploration step, where every
    /// model answered: the served model's label moves `Q_tracked`, and the predictor trains on
    /// every label an exploration step has (the paper's offline labels, live) or on the served
    /// one (`mess-plus-fb`).
    pub fn record_labels(&mut self, x: &[f32], decision: Decision, labels: &[Option<bool>]) {
        let served = decision.served(self.models);
        if let Some(Some(satisfied)) = labels.get(served) {
            let s = if *satisfied { 1.0 } else { 0.0 };
            self.q_tracked = queue_update(self.q_tracked, self.cfg.alpha, s);
        }
        let mut labels = labels.to_vec();
        labels.resize(self.models, None);
        self.train(x, decision, &labels, true);
    }

    fn train(&mut self, x: &[f32], decision: Decision, labels: &[Option<bool>], feedback: bool) {
        match decision {
            Decision::Explore => self.predictor.train(x, labels),
            Decision::Serve(m) if self.cfg.train_on_feedback && feedback => {
                let mut only = vec![None; self.models];
                only[m] = labels.get(m).copied().flatten();
                if only[m].is_some() {
                    self.predictor.train(x, &only);
                }
            }
            // MESS+ never shadows; a shadow step teaches what it labelled, like exploration.
            Decision::Serve(_) => {}
            Decision::Shadow { .. } => self.predictor.train(x, labels),
        }
    }

    /// What this policy has learned, predictor aside.
    pub fn snapshot(&self) -> MessPlusSnapshot {
        MessPlusSnapshot {
            q: self.q,
            q_tracked: self.q_tracked,
            t: self.t,
            explored: self.explored,
            cost_sum: self.cost_sum.clone(),
            cost_n: self.cost_n.clone(),
            rng: RngSnapshot::capture(&self.rng),
        }
    }

    /// Continues from a snapshot taken of a policy over the same zoo.
    pub fn restore(&mut self, s: &MessPlusSnapshot) -> Result<(), RouterError> {
        let bad = |why: String| Err(RouterError::State(why));
        if s.cost_sum.len() != self.models || s.cost_n.len() != self.models {
            return bad(format!(
                "cost means for {} models, the zoo has {}",
                s.cost_sum.len(),
                self.models
            ));
        }
        let finite_non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !finite_non_negative(s.q)
            || !finite_non_negative(s.q_tracked)
            || !s.cost_sum.iter().all(|&c| finite_non_negative(c))
        {
            return bad("queues and costs must be finite and >= 0".into());
        }
        if s.explored > s.t {
            return bad(format!("{} explorations in {} requests", s.explored, s.t));
        }
        self.rng = s.rng.restore()?;
        self.q = s.q;
        self.q_tracked = s.q_tracked;
        self.t = s.t;
        self.explored = s.explored;
        self.cost_sum = s.cost_sum.clone();
        self.cost_n = s.cost_n.clone();
        self.last_scores.clear();
        Ok(())
    }
}

/// `min(1, c / t^(1/4))` for a 1-based request count `t`.
pub fn exploration_probability(c: f64, t: u64) -> f64 {
    (c / (t.max(1) as f64).powf(0.25)).min(1.0)
}

/// `max(0, q + alpha - s)`.
pub fn queue_update(q: f64, alpha: f64, satisfaction: f64) -> f64 {
    (q + alpha - satisfaction).max(0.0)
}

impl<P: Predictor> ZooPolicy for MessPlus<P> {
    fn name(&self) -> String {
        if self.cfg.train_on_feedback {
            "mess-plus-fb".into()
        } else {
            "mess-plus".into()
        }
    }

    fn decide(&mut self, x: &[f32]) -> Decision {
        let p = self.exploration_probability();
        self.t += 1;
        if self.rng.random::<f64>() < p {
            self.explored += 1;
            self.last_scores.clear();
            return Decision::Explore;
        }
        self.last_scores = self.predictor.predict(x);
        Decision::Serve(self.argmin(&self.last_scores))
    }

    fn predicted(&self) -> Option<Vec<f64>> {
        (!self.last_scores.is_empty()).then(|| self.last_scores.clone())
    }

    fn explorations(&self) -> u64 {
        self.explored
    }

    fn observe(&mut self, x: &[f32], decision: Decision, obs: &Observation) {
        self.record_costs(&obs.costs);
        let served = decision.served(self.models);
        let observed = obs.satisfied.get(served).copied().flatten();
        match (obs.feedback, observed) {
            (true, Some(s)) => {
                let s = if s { 1.0 } else { 0.0 };
                self.q = queue_update(self.q, self.cfg.alpha, s);
                self.q_tracked = queue_update(self.q_tracked, self.cfg.alpha, s);
            }
            _ => {
                // No feedback: Q follows the predictor's belief; Q_tracked waits for evidence.
                let s_hat = self.last_scores.get(served).copied();
                self.record_unjudged(s_hat);
            }
        }
        self.train(x, decision, &obs.satisfied, obs.feedback);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predictor::Fixed;
    use proptest::prelude::{prop_assert, proptest};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn cfg(alpha: f64, v: f64) -> MessPlusConfig {
        MessPlusConfig {
            alpha,
            v,
            c: 0.0,
            seed: 1,
            train_on_feedback: false,
        }
    }

    #[test]
    fn decision_rule_matches_hand_computation() {
        // Costs 1, 10, 100; predicted satisfaction 0.2, 0.6, 0.9; alpha 0.7, V 0.01.
        let mut m = MessPlus::new(cfg(0.7, 0.01), 3, Fixed(vec![0.2, 0.6, 0.9])).unwrap();
        for (i, c) in [1.0, 10.0, 100.0].into_iter().enumerate() {
            m.cost_sum[i] = c;
            m.cost_n[i] = 1;
        }
        // Q = 0: cost alone decides -> cheapest.
        assert_eq!(m.argmin(&[0.2, 0.6, 0.9]), 0);
        // Q = 2: scores 0.01+1.0=1.01, 0.1+0.2=0.3, 1.0-0.4=0.6 -> model 1.
        m.q_tracked = 2.0;
        assert_eq!(m.argmin(&[0.2, 0.6, 0.9]), 1);
        // Q = 10: 0.01+5=5.01, 0.1+1=1.1, 1-2=-1 -> model 2.
        m.q_tracked = 10.0;
        assert_eq!(m.argmin(&[0.2, 0.6, 0.9]), 2);
    }

    #[test]
    fn queues_move_as_specified() {
        let mut m = MessPlus::new(cfg(0.8, 0.0), 2, Fixed(vec![0.5, 0.5])).unwrap();
        let x = [0.0f32];
        let obs = |s: bool, feedback| Observation {
            costs: vec![Some(1.0), None],
            satisfied: vec![Some(s), None],
            feedback,
        };
        let d = m.decide(&x);
        assert_eq!(d, Decision::Serve(0));
        m.observe(&x, d, &obs(false, true));
        assert!((m.q() - 0.8).abs() < 1e-12 && (m.q_tracked() - 0.8).abs() < 1e-12);
        m.observe(&x, d, &obs(true, true));
        assert!((m.q() - 0.6).abs() < 1e-12);
        // Without feedback only Q moves, by the predicted 0.5.
        m.observe(&x, d, &obs(true, false));
        assert!((m.q() - 0.9).abs() < 1e-12);
        assert!((m.q_tracked() - 0.6).abs() < 1e-12);
    }

    #[test]
    fn snapshot_restores_queues_costs_and_coin_flips() {
        let run = |m: &mut MessPlus<Fixed>, from: usize, to: usize| -> Vec<Decision> {
            (from..to)
                .map(|i| {
                    let (d, s_hat) = m.decide_scored(&[0.0]);
                    let served = d.served(2);
                    let mut costs = vec![None, None];
                    costs[served] = Some(1.0 + served as f64 * 9.0);
                    m.record_costs(&costs);
                    m.record_unjudged(s_hat.get(served).copied());
                    if i.is_multiple_of(3) {
                        m.record_feedback(&[0.0], d, i.is_multiple_of(2));
                    }
                    d
                })
                .collect()
        };
        let c = MessPlusConfig {
            alpha: 0.7,
            v: 0.01,
            c: 1.0,
            seed: 5,
            train_on_feedback: true,
        };
        let mut a = MessPlus::new(c.clone(), 2, Fixed(vec![0.4, 0.9])).unwrap();
        run(&mut a, 0, 50);
        let json = serde_json::to_string(&a.snapshot()).unwrap();
        let mut b =
            MessPlus::new(MessPlusConfig { seed: 77, ..c }, 2, Fixed(vec![0.4, 0.9])).unwrap();
        b.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(run(&mut a, 50, 150), run(&mut b, 50, 150));
        assert_eq!(a.snapshot(), b.snapshot());
        let mut wrong_zoo = MessPlus::new(
            MessPlusConfig {
                alpha: 0.7,
                v: 0.01,
                c: 1.0,
                seed: 1,
                train_on_feedback: true,
            },
            3,
            Fixed(vec![0.4, 0.6, 0.9]),
        )
        .unwrap();
        assert!(wrong_zoo.restore(&a.snapshot()).is_err());
        let mut negative = a.snapshot();
        negative.q = -1.0;
        assert!(b.restore(&negative).is_err());
    }

    #[test]
    fn live_feedback_moves_only_q_tracked() {
        let mut m = MessPlus::new(cfg(0.8, 0.0), 2, Fixed(vec![0.5, 0.5])).unwrap();
        let (d, s_hat) = m.decide_scored(&[0.0]);
        assert_eq!(d, Decision::Serve(0));
        m.record_unjudged(s_hat.first().copied());
        assert!((m.q() - 0.3).abs() < 1e-12 && m.q_tracked() == 0.0);
        m.record_feedback(&[0.0], d, false);
        assert!((m.q() - 0.3).abs() < 1e-12 && (m.q_tracked() - 0.8).abs() < 1e-12);
    }

    /// A predictor that counts the labels it is trained on, per model.
    struct Counting(Vec<u32>);

    impl crate::predictor::Predictor for Counting {
        fn outputs(&self) -> usize {
            self.0.len()
        }
        fn predict(&mut self, _x: &[f32]) -> Vec<f64> {
            vec![0.5; self.0.len()]
        }
        fn train(&mut self, _x: &[f32], labels: &[Option<bool>]) {
            for (n, l) in self.0.iter_mut().zip(labels) {
                *n += u32::from(l.is_some());
            }
        }
    }

    #[test]
    fn judged_labels_of_an_exploration_step_train_every_model_and_move_q_tracked_once() {
        let mut m = MessPlus::new(cfg(0.8, 0.0), 3, Counting(vec![0; 3])).unwrap();
        // All three models answered; the judge could not grade the middle one.
        m.record_labels(&[0.0], Decision::Explore, &[Some(true), None, Some(false)]);
        assert_eq!(m.predictor().0, vec![1, 0, 1]);
        // The most capable served (explore): its label, `false`, moves Q_tracked by alpha.
        assert!((m.q_tracked() - 0.8).abs() < 1e-12);
        // A served answer's label trains nothing in the paper's `mess-plus`...
        m.record_labels(&[0.0], Decision::Serve(1), &[None, Some(true), None]);
        assert_eq!(m.predictor().0, vec![1, 0, 1]);
        assert!((m.q_tracked() - 0.6).abs() < 1e-12);
        // ...and labels without the served model's leave Q_tracked alone; a short slice is
        // read as the first models'.
        m.record_labels(&[0.0], Decision::Explore, &[Some(true)]);
        assert!((m.q_tracked() - 0.6).abs() < 1e-12);
        assert_eq!(m.predictor().0, vec![2, 0, 1]);
    }

    proptest! {
        #[test]
        fn queue_is_never_negative(q in 0.0f64..100.0, alpha in 0.0f64..1.0, s in 0.0f64..1.0) {
            prop_assert!(queue_update(q, alpha, s) >= 0.0);
        }

        #[test]
        fn exploration_probability_in_unit_interval_and_non_increasing(c in 0.001f64..10.0, t in 1u64..1_000_000) {
            let p = exploration_probability(c, t);
            prop_assert!(p > 0.0 && p <= 1.0);
            prop_assert!(exploration_probability(c, t + 1) <= p);
        }

        /// With alpha at or below the cheapest model's true rate and a predictor that knows the
        /// rates, MESS+ settles on the cheapest model.
        #[test]
        fn converges_to_the_cheapest_model_when_it_meets_alpha(rate in 0.5f64..0.95, seed in 0u64..1000) {
            let alpha = rate - 0.05;
            // V at the scale of the cost gaps (1, 10, 100): the queue must reach ~6 before the
            // next model pays off, which a queue with negative drift does not do for long.
            let mut m = MessPlus::new(MessPlusConfig { alpha, v: 0.3, c: 0.1, seed, train_on_feedback: false }, 3, Fixed(vec![rate, 0.97, 0.99])).unwrap();
            let mut rng = StdRng::seed_from_u64(seed ^ 0xabc);
            let mut late_small = 0;
            for i in 0..4000 {
                let d = m.decide(&[0.0]);
                let served = d.served(3);
                let p = [rate, 0.97, 0.99][served];
                let s = rng.random::<f64>() < p;
                let costs = match d {
                    Decision::Explore => vec![Some(1.0), Some(10.0), Some(100.0)],
                    Decision::Serve(k) | Decision::Shadow { serve: k, .. } => (0..3).map(|j| (j == k).then_some([1.0, 10.0, 100.0][j])).collect(),
                };
                let mut sat = vec![None; 3];
                sat[served] = Some(s);
                m.observe(&[0.0], d, &Observation { costs, satisfied: sat, feedback: true });
                if i >= 3000 && d == Decision::Serve(0) {
                    late_small += 1;
                }
            }
            prop_assert!(late_small > 900, "served the cheapest {late_small} times of the last 1000");
        }
    }
}
