//! Item-response satisfaction: `P(model m satisfies x) = σ(θ_m − b(x))`, with a per-model
//! ability `θ_m` and a model-agnostic difficulty `b(x)`.
//!
//! Every unknown here carries a Gaussian belief updated online, one labelled answer at a time,
//! by the Laplace (extended-Kalman) step for a logistic observation: precision grows by
//! `p(1−p)` along the observation's direction and the mean moves by the residual `s − p`
//! times the new variance. With a constant difficulty this is a Beta-like rate estimate on the
//! logit scale, with an interval that narrows as answers come in.

use serde::{Deserialize, Serialize};

/// The logistic function.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// `E[σ(z)]` for `z ~ N(mean, var)`, by the probit approximation (MacKay 1992): what a
/// Gaussian belief predicts, slightly pulled towards 1/2 by its uncertainty.
pub fn expected_sigmoid(mean: f64, var: f64) -> f64 {
    sigmoid(mean / (1.0 + std::f64::consts::PI * var.max(0.0) / 8.0).sqrt())
}

/// A Gaussian belief about one scalar.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Belief {
    pub mean: f64,
    pub var: f64,
}

impl Belief {
    pub fn new(mean: f64, sd: f64) -> Self {
        Belief { mean, var: sd * sd }
    }

    /// Standard deviation.
    pub fn sd(&self) -> f64 {
        self.var.max(0.0).sqrt()
    }

    /// One labelled answer whose logit is `self + offset` (the offset, e.g. `−b(x)`, taken as
    /// known): the Laplace step.
    pub fn observe(&mut self, offset: f64, satisfied: bool) {
        self.observe_along(offset, 1.0, satisfied);
    }

    /// One labelled answer whose logit is `offset + self · x`: the Laplace step for a
    /// coefficient on a known feature `x` (a feature of 0 teaches nothing).
    pub fn observe_along(&mut self, offset: f64, x: f64, satisfied: bool) {
        if x == 0.0 || !x.is_finite() {
            return;
        }
        let p = sigmoid(offset + self.mean * x);
        let h = (p * (1.0 - p)).max(1e-6) * x * x;
        self.var = 1.0 / (1.0 / self.var + h);
        self.mean += self.var * x * (f64::from(u8::from(satisfied)) - p);
    }

    /// Whether the numbers are usable (finite, variance > 0).
    pub fn is_valid(&self) -> bool {
        self.mean.is_finite() && self.var.is_finite() && self.var > 0.0
    }
}

/// A Gaussian belief about a 2-vector (the difficulty model's weights), full covariance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Belief2 {
    pub mean: [f64; 2],
    /// Row-major covariance.
    pub cov: [f64; 4],
}

impl Belief2 {
    pub fn new(mean: [f64; 2], sd: [f64; 2]) -> Self {
        Belief2 {
            mean,
            cov: [sd[0] * sd[0], 0.0, 0.0, sd[1] * sd[1]],
        }
    }

    /// `w · f`.
    pub fn dot(&self, f: [f64; 2]) -> f64 {
        self.mean[0] * f[0] + self.mean[1] * f[1]
    }

    /// One labelled answer whose logit is `offset − w·f`: the Laplace step (a rank-one
    /// covariance update along `f`).
    pub fn observe(&mut self, offset: f64, f: [f64; 2], satisfied: bool) {
        let p = sigmoid(offset - self.dot(f));
        let h = (p * (1.0 - p)).max(1e-6);
        let c = &self.cov;
        let cf = [c[0] * f[0] + c[1] * f[1], c[2] * f[0] + c[3] * f[1]];
        let fcf = f[0] * cf[0] + f[1] * cf[1];
        let k = h / (1.0 + h * fcf);
        self.cov = [
            c[0] - k * cf[0] * cf[0],
            c[1] - k * cf[0] * cf[1],
            c[2] - k * cf[1] * cf[0],
            c[3] - k * cf[1] * cf[1],
        ];
        // The logit falls with w·f, so a surprise success (s > p) lowers w along f.
        let r = f64::from(u8::from(satisfied)) - p;
        let g = [
            self.cov[0] * f[0] + self.cov[1] * f[1],
            self.cov[2] * f[0] + self.cov[3] * f[1],
        ];
        self.mean[0] -= g[0] * r;
        self.mean[1] -= g[1] * r;
    }

    pub fn is_valid(&self) -> bool {
        self.mean.iter().chain(&self.cov).all(|x| x.is_finite())
            && self.cov[0] > 0.0
            && self.cov[3] > 0.0
            && self.cov[0] * self.cov[3] - self.cov[1] * self.cov[2] > 0.0
    }
}

/// Per-model beliefs with a per-task offset on top: model m on task k has logit
/// `global[m] + tasks[k][m]` (both Gaussian, independent), so a new task starts from what the
/// model does everywhere and learns its own deviation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Levels {
    pub global: Vec<Belief>,
    pub tasks: Vec<Vec<Belief>>,
}

impl Levels {
    pub fn new(models: usize, sd: f64) -> Self {
        Levels {
            global: vec![Belief::new(0.0, sd); models],
            tasks: Vec::new(),
        }
    }

    /// Adds a task whose offsets have prior standard deviation `sd`; returns its slot.
    pub fn add_task(&mut self, sd: f64) -> u32 {
        self.tasks
            .push(vec![Belief::new(0.0, sd); self.global.len()]);
        (self.tasks.len() - 1) as u32
    }

    /// Logit mean and variance of model m on `task`.
    pub fn get(&self, m: usize, task: Option<u32>) -> (f64, f64) {
        let g = self.global[m];
        match task.and_then(|k| self.tasks.get(k as usize)) {
            Some(t) => (g.mean + t[m].mean, g.var + t[m].var),
            None => (g.mean, g.var),
        }
    }

    /// One labelled answer of model m on `task` whose logit is the belief plus `offset`.
    pub fn observe(&mut self, m: usize, task: Option<u32>, offset: f64, satisfied: bool) {
        let t = task.filter(|&k| (k as usize) < self.tasks.len());
        let own = t.map_or(0.0, |k| self.tasks[k as usize][m].mean);
        self.global[m].observe(own + offset, satisfied);
        if let Some(k) = t {
            let base = self.global[m].mean;
            self.tasks[k as usize][m].observe(base + offset, satisfied);
        }
    }

    /// Whether the shapes fit a zoo of `models` and every belief is usable.
    pub fn is_valid(&self, models: usize) -> bool {
        self.global.len() == models
            && self.tasks.iter().all(|t| t.len() == models)
            && self
                .global
                .iter()
                .chain(self.tasks.iter().flatten())
                .all(Belief::is_valid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn ability_learns_a_rate_with_a_narrowing_interval() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut b = Belief::new(0.0, 1.5);
        let mut last_sd = b.sd();
        for i in 0..2000 {
            b.observe(0.0, rng.random::<f64>() < 0.8);
            if i % 500 == 499 {
                assert!(b.sd() < last_sd);
                last_sd = b.sd();
            }
        }
        let rate = expected_sigmoid(b.mean, b.var);
        assert!((rate - 0.8).abs() < 0.03, "{rate}");
        assert!(b.sd() < 0.07);
    }

    #[test]
    fn a_slope_learns_a_planted_coefficient_and_ignores_a_zero_feature() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let mut v = Belief::new(0.0, 0.5);
        for _ in 0..5000 {
            let x: f64 = rng.random::<f64>() * 2.0 - 1.0;
            v.observe_along(0.5, x, rng.random::<f64>() < sigmoid(0.5 - 1.2 * x));
        }
        assert!((v.mean + 1.2).abs() < 0.15, "{v:?}");
        let before = v;
        v.observe_along(0.5, 0.0, false);
        assert_eq!(v, before);
    }

    #[test]
    fn difficulty_weights_learn_the_scale_of_a_true_signal() {
        // Labels from σ(1 − 2·g): the weight on g should approach 2, the unused one stay near 0.
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut w = Belief2::new([1.0, 0.0], [1.0, 1.0]);
        for _ in 0..5000 {
            let g: f64 = rng.random::<f64>() * 4.0 - 2.0;
            let noise: f64 = rng.random::<f64>() * 2.0 - 1.0;
            let s = rng.random::<f64>() < sigmoid(1.0 - 2.0 * g);
            w.observe(1.0, [g, noise], s);
        }
        assert!((w.mean[0] - 2.0).abs() < 0.25, "{w:?}");
        assert!(w.mean[1].abs() < 0.25, "{w:?}");
        assert!(w.is_valid());
    }

    proptest! {
        #[test]
        fn beliefs_stay_valid_and_predictions_in_unit_interval(
            labels in proptest::collection::vec(any::<bool>(), 1..300),
            offsets in proptest::collection::vec(-20.0f64..20.0, 300),
            f0 in proptest::collection::vec(-5.0f64..5.0, 300),
        ) {
            let mut b = Belief::new(0.0, 1.5);
            let mut w = Belief2::new([1.0, 1.0], [0.5, 0.5]);
            for (i, &s) in labels.iter().enumerate() {
                b.observe(offsets[i], s);
                w.observe(offsets[i], [f0[i], -f0[i] * 0.5], s);
                prop_assert!(b.is_valid() && w.is_valid());
                let p = expected_sigmoid(b.mean + offsets[i], b.var);
                prop_assert!((0.0..=1.0).contains(&p));
            }
        }
    }
}
