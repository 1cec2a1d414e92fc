//! What ranking on the question could buy at best: the `ranked-alpha-hindsight` baseline of a
//! replay.
//!
//! random-α splits traffic between the two models of the cheapest mix meeting α by a coin. A
//! router can beat it only by sending the upper model the requests it helps most, so how much
//! a ranking can save is bounded by how well the question predicts that help. This baseline
//! measures it with every advantage an online policy lacks: the same pair of models, a ridge
//! regression of each request's gain (`s_hi − s_lo`, both labels known) on the question
//! embedding and log length, cross-fitted — each request's gain predicted by a fit on the other
//! four fifths of the stream, the ridge strength chosen inside those four fifths — and the
//! share set in hindsight so the stream's satisfaction lands exactly on α. A policy that must
//! learn the rates, the costs and the ranking online from its own answers will not reach it;
//! where it sits barely under random-α, no ranking on this encoder can pay for learning.
//! The same cross-fitted predictions score RouteLLM's threshold sweep
//! (`routellm::RouteLlmReport::ranked_hindsight`).

use std::sync::Arc;

use ferry_router::baselines::cheapest_mix;

use super::{Dataset, Record};

/// Folds of the cross-fitting, and of the inner choice of the ridge strength.
const FOLDS: usize = 5;
/// Ridge strengths tried (the features are a unit embedding and one standardised length).
const RIDGE_GRID: [f64; 5] = [1.0, 3.0, 10.0, 30.0, 100.0];

/// The baseline's outcome over the whole stream (the same on every seed: the ranking is static).
#[derive(Debug, Clone, PartialEq)]
pub struct Ceiling {
    /// Zoo indices of the pair split by the ranking (lower, upper).
    pub pair: (usize, usize),
    /// Share of requests sent to the upper model.
    pub upper_share: f64,
    pub satisfaction: f64,
    /// Mean score of the served answers (see `Record::score`).
    pub performance: f64,
    pub cost_total: f64,
}

/// Sums over one chunk of requests: `Σ z zᵀ`, `Σ z`, `Σ y`, `Σ y z`, count.
#[derive(Clone)]
struct Moments {
    zz: Vec<f64>,
    z: Vec<f64>,
    y: f64,
    yz: Vec<f64>,
    n: f64,
}

impl Moments {
    fn new(p: usize) -> Self {
        Moments {
            zz: vec![0.0; p * p],
            z: vec![0.0; p],
            y: 0.0,
            yz: vec![0.0; p],
            n: 0.0,
        }
    }

    fn add(&mut self, z: &[f64], y: f64) {
        let p = z.len();
        for i in 0..p {
            let row = &mut self.zz[i * p..(i + 1) * p];
            for (r, zj) in row.iter_mut().zip(z) {
                *r += z[i] * zj;
            }
            self.z[i] += z[i];
            self.yz[i] += y * z[i];
        }
        self.y += y;
        self.n += 1.0;
    }

    fn merge(&mut self, o: &Moments) {
        for (a, b) in self.zz.iter_mut().zip(&o.zz) {
            *a += b;
        }
        for (a, b) in self.z.iter_mut().zip(&o.z) {
            *a += b;
        }
        for (a, b) in self.yz.iter_mut().zip(&o.yz) {
            *a += b;
        }
        self.y += o.y;
        self.n += o.n;
    }

    /// The ridge fit `y ≈ ȳ + w·(z − z̄)` with penalty `lambda`: `(w, z̄, ȳ)`.
    fn fit(&self, lambda: f64) -> Option<(Vec<f64>, Vec<f64>, f64)> {
        let p = self.z.len();
        if self.n < 2.0 {
            return None;
        }
        let mean: Vec<f64> = self.z.iter().map(|v| v / self.n).collect();
        let ybar = self.y / self.n;
        let mut a = vec![0.0; p * p];
        for i in 0..p {
            for j in 0..p {
                a[i * p + j] = self.zz[i * p + j] - self.n * mean[i] * mean[j];
            }
            a[i * p + i] += lambda;
        }
        let b: Vec<f64> = (0..p)
            .map(|i| self.yz[i] - self.n * ybar * mean[i])
            .collect();
        let w = cholesky_solve(&mut a, p, b)?;
        Some((w, mean, ybar))
    }
}

/// Solves `A w = b` for a symmetric positive definite `A` (overwritten by its Cholesky factor).
fn cholesky_solve(a: &mut [f64], p: usize, mut b: Vec<f64>) -> Option<Vec<f64>> {
    for j in 0..p {
        let mut d = a[j * p + j];
        for k in 0..j {
            d -= a[j * p + k] * a[j * p + k];
        }
        if !(d.is_finite() && d > 0.0) {
            return None;
        }
        let d = d.sqrt();
        a[j * p + j] = d;
        for i in j + 1..p {
            let mut s = a[i * p + j];
            for k in 0..j {
                s -= a[i * p + k] * a[j * p + k];
            }
            a[i * p + j] = s / d;
        }
    }
    for i in 0..p {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i * p + k] * b[k];
        }
        b[i] = s / a[i * p + i];
    }
    for i in (0..p).rev() {
        let mut s = b[i];
        for k in i + 1..p {
            s -= a[k * p + i] * b[k];
        }
        b[i] = s / a[i * p + i];
    }
    Some(b)
}

fn predict(fit: &(Vec<f64>, Vec<f64>, f64), z: &[f64]) -> f64 {
    let (w, mean, ybar) = fit;
    ybar + w
        .iter()
        .zip(z.iter().zip(mean))
        .map(|(w, (z, m))| w * (z - m))
        .sum::<f64>()
}

/// Each request's ridge features: its unit embedding (when every request has one) and its
/// standardised log length. `None` when the embeddings differ in size.
pub fn request_features(data: &Dataset, features: &[Arc<Vec<f32>>]) -> Option<Vec<Vec<f64>>> {
    let n = data.records.len();
    let lengths: Vec<f64> = data
        .records
        .iter()
        .map(|r| ((r.text.chars().count() + 1) as f64).ln())
        .collect();
    let lm = lengths.iter().sum::<f64>() / n.max(1) as f64;
    let ls = (lengths.iter().map(|l| (l - lm).powi(2)).sum::<f64>() / n.max(1) as f64)
        .sqrt()
        .max(1e-9);
    let with_embedding = features.len() == n && features.iter().all(|f| !f.is_empty());
    let z: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut v: Vec<f64> = if with_embedding {
                let e = &features[i];
                let norm = e.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
                e.iter().map(|x| f64::from(*x) / norm.max(1e-12)).collect()
            } else {
                Vec::new()
            };
            v.push((lengths[i] - lm) / ls);
            v
        })
        .collect();
    let p = z.first()?.len();
    z.iter().all(|v| v.len() == p).then_some(z)
}

/// Cross-fitted ridge predictions of `y` from `z`: each row's by a fit on the other four fifths
/// of the rows (in a fixed pseudo-random order), the ridge strength chosen by inner folds of
/// those. `None` with fewer than 25 rows.
pub fn cross_fitted(z: &[Vec<f64>], y: &[f64]) -> Option<Vec<f64>> {
    let n = z.len();
    if n < FOLDS * FOLDS || y.len() != n {
        return None;
    }
    let p = z[0].len();
    // Rows dealt into FOLDS × FOLDS chunks: outer fold i is chunks i·FOLDS.., inner fold j of it
    // chunk i·FOLDS + j.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut chunks = vec![Moments::new(p); FOLDS * FOLDS];
    let mut chunk = vec![0usize; n];
    for (rank, &i) in order.iter().enumerate() {
        chunk[i] = rank % (FOLDS * FOLDS);
        chunks[chunk[i]].add(&z[i], y[i]);
    }
    let sum_of = |keep: &dyn Fn(usize) -> bool| {
        let mut m = Moments::new(p);
        for (_, mo) in chunks.iter().enumerate().filter(|(c, _)| keep(*c)) {
            m.merge(mo);
        }
        m
    };
    let mut predicted = vec![0.0; n];
    for outer in 0..FOLDS {
        let in_outer = |c: usize| c / FOLDS == outer;
        // The ridge strength with the least squared error over the inner folds of the training part.
        let mut best = (f64::INFINITY, RIDGE_GRID[0]);
        for &lambda in &RIDGE_GRID {
            let mut sse = 0.0;
            for inner in 0..FOLDS {
                let held = |c: usize| !in_outer(c) && c % FOLDS == inner;
                let Some(fit) = sum_of(&|c| !in_outer(c) && !held(c)).fit(lambda) else {
                    continue;
                };
                sse += (0..n)
                    .filter(|&i| held(chunk[i]))
                    .map(|i| (predict(&fit, &z[i]) - y[i]).powi(2))
                    .sum::<f64>();
            }
            if sse < best.0 {
                best = (sse, lambda);
            }
        }
        let fit = sum_of(&|c| !in_outer(c)).fit(best.1)?;
        for i in (0..n).filter(|&i| in_outer(chunk[i])) {
            predicted[i] = predict(&fit, &z[i]);
        }
    }
    Some(predicted)
}

/// The ranking baseline for SLA target `alpha` (see the module docs). `None` when the
/// cheapest mix is a single model (nothing to rank) or no model meets α.
pub fn ranked_alpha_hindsight(
    data: &Dataset,
    features: &[Arc<Vec<f32>>],
    alpha: f64,
) -> Option<Ceiling> {
    let n = data.records.len();
    let mix = cheapest_mix(&data.mean_satisfaction(), &data.mean_cost(), alpha)?;
    let used: Vec<usize> = (0..mix.len()).filter(|&m| mix[m] > 0.0).collect();
    let &[lo, hi] = used.as_slice() else {
        return None;
    };
    let gain: Vec<f64> = data
        .records
        .iter()
        .map(|r| f64::from(u8::from(r.satisfied[hi])) - f64::from(u8::from(r.satisfied[lo])))
        .collect();
    let predicted = cross_fitted(&request_features(data, features)?, &gain)?;
    // The upper model takes the requests of highest predicted gain until α is met.
    let mut ranked: Vec<usize> = (0..n).collect();
    ranked.sort_by(|&a, &b| predicted[b].total_cmp(&predicted[a]));
    let recs = &data.records;
    let mut satisfied: f64 = recs
        .iter()
        .map(|r| f64::from(u8::from(r.satisfied[lo])))
        .sum();
    let mut cost: f64 = recs.iter().map(|r| r.costs[lo]).sum();
    let score = |r: &Record, m: usize| r.score.get(m).copied().unwrap_or(0.0);
    let mut performance: f64 = recs.iter().map(|r| score(r, lo)).sum();
    let need = alpha * n as f64;
    let mut upper = 0usize;
    for &i in &ranked {
        if satisfied >= need - 1e-9 {
            break;
        }
        satisfied += gain[i];
        cost += recs[i].costs[hi] - recs[i].costs[lo];
        performance += score(&recs[i], hi) - score(&recs[i], lo);
        upper += 1;
    }
    Some(Ceiling {
        pair: (lo, hi),
        upper_share: upper as f64 / n as f64,
        satisfaction: satisfied / n as f64,
        performance: performance / n as f64,
        cost_total: cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Two models (cheap at 40 % and 1 unit, dear at 80 % and 10 units) over `n` requests with
    /// 8-dimensional embeddings. With `signal`, the first embedding coordinate says which
    /// requests the dear model rescues; without, the embeddings are noise.
    fn stream(n: usize, signal: bool, seed: u64) -> (Dataset, Vec<Arc<Vec<f32>>>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut records = Vec::new();
        let mut features = Vec::new();
        for i in 0..n {
            // Half the requests are "hard" (cheap 10 %, dear 80 %), half "easy" (70 % / 80 %).
            let hard = rng.random::<bool>();
            let cheap = rng.random::<f64>() < if hard { 0.1 } else { 0.7 };
            let dear = rng.random::<f64>() < 0.8;
            let mut e: Vec<f32> = (0..8).map(|_| rng.random::<f32>() - 0.5).collect();
            if signal {
                e[0] = if hard { 1.0 } else { -1.0 };
            }
            records.push(Record {
                key: i.to_string(),
                text: "x".repeat(10 + rng.random_range(0..40)),
                satisfied: vec![cheap, dear],
                costs: vec![1.0, 10.0],
                score: vec![f64::from(u8::from(cheap)), f64::from(u8::from(dear))],
                task: None,
            });
            features.push(Arc::new(e));
        }
        let data = Dataset {
            models: vec!["cheap".into(), "dear".into()],
            records,
            duplicates: 0,
        };
        (data, features)
    }

    fn random_alpha_cost(data: &Dataset, alpha: f64) -> f64 {
        let mix = cheapest_mix(&data.mean_satisfaction(), &data.mean_cost(), alpha).unwrap();
        let c = data.mean_cost();
        data.records.len() as f64 * mix.iter().zip(&c).map(|(p, c)| p * c).sum::<f64>()
    }

    #[test]
    fn cholesky_solves_a_small_system() {
        // [[4, 2], [2, 3]] w = [2, 5] -> w = [-0.5, 2].
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let w = cholesky_solve(&mut a, 2, vec![2.0, 5.0]).unwrap();
        assert!(
            (w[0] + 0.5).abs() < 1e-12 && (w[1] - 2.0).abs() < 1e-12,
            "{w:?}"
        );
        let mut singular = vec![1.0, 1.0, 1.0, 1.0];
        assert!(cholesky_solve(&mut singular, 2, vec![1.0, 1.0]).is_none());
    }

    #[test]
    fn cross_fitting_recovers_a_planted_linear_signal_and_refuses_tiny_inputs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let z: Vec<Vec<f64>> = (0..500)
            .map(|_| (0..6).map(|_| rng.random::<f64>() - 0.5).collect())
            .collect();
        let truth: Vec<f64> = z.iter().map(|v| 2.0 * v[0] - v[3]).collect();
        let y: Vec<f64> = truth
            .iter()
            .map(|t| t + 0.3 * (rng.random::<f64>() - 0.5))
            .collect();
        let p = cross_fitted(&z, &y).unwrap();
        let err = p
            .iter()
            .zip(&truth)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            / 500.0;
        let var = truth.iter().map(|t| t * t).sum::<f64>() / 500.0;
        assert!(err < 0.05 * var, "mse {err} against signal variance {var}");
        assert!(cross_fitted(&z[..20], &y[..20]).is_none());
    }

    #[test]
    fn a_revealing_embedding_lowers_the_cost_and_alpha_is_met() {
        let (data, features) = stream(2000, true, 1);
        let alpha = 0.6;
        let c = ranked_alpha_hindsight(&data, &features, alpha).unwrap();
        assert_eq!(c.pair, (0, 1));
        assert!(c.satisfaction >= alpha, "{c:?}");
        // The coin needs (0.6 − 0.4) / (0.8 − 0.4) = 50 % dear calls (5.5 units a request);
        // on hard requests only, each dear call gains 0.7, so 0.2 / 0.7 ≈ 29 % (3.6 units).
        let ratio = c.cost_total / random_alpha_cost(&data, alpha);
        assert!(ratio < 0.8, "ranked / random-α = {ratio}");
    }

    #[test]
    fn a_silent_embedding_is_no_better_than_the_coin() {
        let (data, features) = stream(2000, false, 2);
        let alpha = 0.6;
        let c = ranked_alpha_hindsight(&data, &features, alpha).unwrap();
        assert!(c.satisfaction >= alpha, "{c:?}");
        let ratio = c.cost_total / random_alpha_cost(&data, alpha);
        assert!((0.9..1.1).contains(&ratio), "ranked / random-α = {ratio}");
    }

    #[test]
    fn one_model_meeting_alpha_alone_has_nothing_to_rank() {
        let (data, features) = stream(200, true, 3);
        // The cheap model alone meets a low α.
        assert!(ranked_alpha_hindsight(&data, &features, 0.2).is_none());
        // No model meets α.
        assert!(ranked_alpha_hindsight(&data, &features, 0.99).is_none());
    }
}
