//! The difficulty prior `g(x)`: a linear score on the unit question embedding, in logit units,
//! pretrained on public per-question labels of several models and shipped as a versioned JSON
//! file that says what trained it.
//!
//! Training fits the item-response model `P(m satisfies x) = σ(θ_{B,m} − g(x))` with one
//! ability per (benchmark B, model m), so the benchmarks' and models' overall levels go into the
//! abilities and `g` learns only which questions are harder than others *within* a benchmark:
//! the part that can transfer to a stream the prior never saw. The ridge strength is picked on
//! questions held out from the training benchmarks, never on the stream being evaluated.

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::predictor::F32s;
use crate::rng::seeded;
use crate::RouterError;

/// The file format's name and version.
pub const FORMAT: &str = "ferry-difficulty-prior";
pub const VERSION: u32 = 1;

/// A difficulty prior as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DifficultyPrior {
    pub format: String,
    pub version: u32,
    /// The sentence encoder whose embeddings it reads (manifest id).
    pub encoder: String,
    pub dim: usize,
    /// Weights on the unit-length embedding.
    pub weights: F32s,
    pub bias: f64,
    /// Data sets (benchmark names) it was trained on.
    pub trained_on: Vec<String>,
    /// Questions and labels it saw.
    pub questions: usize,
    pub labels: usize,
    /// The ridge strength chosen on held-out training questions, and the held-out log-loss
    /// with and without `g` (how much it knew about questions it had not seen).
    pub l2: f64,
    pub heldout_logloss: f64,
    pub heldout_logloss_without: f64,
    /// The command that produced it.
    pub command: String,
}

impl DifficultyPrior {
    /// `g(x)` for a unit embedding.
    pub fn score(&self, x: &[f32]) -> f64 {
        self.bias
            + self
                .weights
                .0
                .iter()
                .zip(x)
                .map(|(w, v)| f64::from(*w) * f64::from(*v))
                .sum::<f64>()
    }

    /// Parses and checks a prior file's text.
    pub fn from_json(text: &str) -> Result<Self, RouterError> {
        let p: DifficultyPrior = serde_json::from_str(text)
            .map_err(|e| RouterError::Invalid(format!("difficulty prior: {e}")))?;
        if p.format != FORMAT || p.version != VERSION {
            return Err(RouterError::Invalid(format!(
                "difficulty prior: format {} v{}, expected {FORMAT} v{VERSION}",
                p.format, p.version
            )));
        }
        if p.weights.0.len() != p.dim
            || !p.weights.0.iter().all(|w| w.is_finite())
            || !p.bias.is_finite()
        {
            return Err(RouterError::Invalid(format!(
                "difficulty prior: {} finite weights needed for dimension {}",
                p.weights.0.len(),
                p.dim
            )));
        }
        Ok(p)
    }

    /// Parses a prior file's text for a router whose questions are embedded by `encoder`; a
    /// prior trained on another encoder's embeddings is refused (the dimension is checked by
    /// [`super::MixRank::new`]).
    pub fn from_json_for(text: &str, encoder: &str) -> Result<Self, RouterError> {
        let p = Self::from_json(text)?;
        if p.encoder != encoder {
            return Err(RouterError::Invalid(format!(
                "difficulty prior trained on `{}` embeddings, the router uses `{encoder}`",
                p.encoder
            )));
        }
        Ok(p)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a prior serialises")
    }
}

/// One training question: its unit embedding, its benchmark, and each model's label.
#[derive(Debug, Clone)]
pub struct PriorExample {
    pub x: Vec<f32>,
    /// Benchmark index (abilities are per benchmark and model).
    pub benchmark: usize,
    /// `(model index, satisfied)`; model indices are per benchmark's zoo, any numbering.
    pub labels: Vec<(usize, bool)>,
}

/// Training settings.
#[derive(Debug, Clone)]
pub struct PriorTraining {
    pub encoder: String,
    pub benchmarks: Vec<String>,
    pub command: String,
    /// Ridge strengths tried (per question, on the weights).
    pub l2_grid: Vec<f64>,
    pub epochs: usize,
    pub seed: u64,
}

impl Default for PriorTraining {
    fn default() -> Self {
        PriorTraining {
            encoder: String::new(),
            benchmarks: Vec::new(),
            command: String::new(),
            l2_grid: vec![1e-4, 1e-3, 1e-2, 1e-1],
            epochs: 300,
            seed: 7,
        }
    }
}

/// The fitted parameters.
struct Fit {
    w: Vec<f64>,
    theta: Vec<f64>,
}

fn groups(data: &[PriorExample]) -> (usize, Vec<Vec<(usize, bool)>>) {
    let mut ids = std::collections::BTreeMap::new();
    let rows = data
        .iter()
        .map(|e| {
            e.labels
                .iter()
                .map(|&(m, s)| {
                    let n = ids.len();
                    (*ids.entry((e.benchmark, m)).or_insert(n), s)
                })
                .collect()
        })
        .collect();
    (ids.len(), rows)
}

/// Mean log-loss of `data` under weights `w` (abilities refitted on `data` when `refit`).
fn log_loss(data: &[PriorExample], w: Option<&[f64]>, epochs: usize) -> f64 {
    let dim = data.first().map_or(0, |e| e.x.len());
    let (ng, rows) = groups(data);
    let g: Vec<f64> = data
        .iter()
        .map(|e| w.map_or(0.0, |w| score(w, &e.x)))
        .collect();
    let theta = fit_abilities(ng, &rows, &g, epochs);
    let _ = dim;
    let (mut sum, mut n) = (0.0, 0usize);
    for (i, r) in rows.iter().enumerate() {
        for &(k, s) in r {
            let p = crate::mixrank::irt::sigmoid(theta[k] - g[i]).clamp(1e-9, 1.0 - 1e-9);
            sum -= if s { p.ln() } else { (1.0 - p).ln() };
            n += 1;
        }
    }
    sum / n.max(1) as f64
}

fn score(w: &[f64], x: &[f32]) -> f64 {
    w.iter().zip(x).map(|(a, b)| a * f64::from(*b)).sum()
}

/// Abilities for fixed difficulties, by Newton steps per group (a 1-parameter logistic fit
/// each, with a weak N(0, 3²) prior so that all-correct groups stay finite).
fn fit_abilities(ng: usize, rows: &[Vec<(usize, bool)>], g: &[f64], iters: usize) -> Vec<f64> {
    let mut theta = vec![0.0; ng];
    for _ in 0..iters.clamp(5, 25) {
        let mut grad = vec![0.0; ng];
        let mut hess = vec![1.0 / 9.0; ng];
        for k in 0..ng {
            grad[k] = -theta[k] / 9.0;
        }
        for (i, r) in rows.iter().enumerate() {
            for &(k, s) in r {
                let p = crate::mixrank::irt::sigmoid(theta[k] - g[i]);
                grad[k] += f64::from(u8::from(s)) - p;
                hess[k] += p * (1.0 - p);
            }
        }
        for k in 0..ng {
            theta[k] += grad[k] / hess[k];
        }
    }
    theta
}

/// Fits weights and abilities jointly: Adam on the weights (full batch), Newton on the
/// abilities, ridge `l2` per question.
fn fit(data: &[PriorExample], l2: f64, epochs: usize) -> Fit {
    let dim = data.first().map_or(0, |e| e.x.len());
    let (ng, rows) = groups(data);
    let n = data.len().max(1) as f64;
    let mut w = vec![0.0f64; dim];
    let (mut m1, mut m2) = (vec![0.0; dim], vec![0.0; dim]);
    let (lr, b1, b2) = (0.05, 0.9, 0.999);
    let mut theta = vec![0.0; ng];
    for epoch in 0..epochs {
        let g: Vec<f64> = data.iter().map(|e| score(&w, &e.x)).collect();
        if epoch % 10 == 0 {
            theta = fit_abilities(ng, &rows, &g, 8);
        }
        // d(mean loss)/dw: each label contributes (s − p)·x (the logit falls with g).
        let mut grad: Vec<f64> = w.iter().map(|wi| l2 * wi).collect();
        for (i, r) in rows.iter().enumerate() {
            let mut coef = 0.0;
            for &(k, s) in r {
                let p = crate::mixrank::irt::sigmoid(theta[k] - g[i]);
                coef += f64::from(u8::from(s)) - p;
            }
            if coef != 0.0 {
                for (gj, xj) in grad.iter_mut().zip(&data[i].x) {
                    *gj += coef * f64::from(*xj) / n;
                }
            }
        }
        let t = (epoch + 1) as i32;
        for j in 0..dim {
            m1[j] = b1 * m1[j] + (1.0 - b1) * grad[j];
            m2[j] = b2 * m2[j] + (1.0 - b2) * grad[j] * grad[j];
            let mh = m1[j] / (1.0 - b1.powi(t));
            let vh = m2[j] / (1.0 - b2.powi(t));
            w[j] -= lr * mh / (vh.sqrt() + 1e-8);
        }
    }
    Fit { w, theta }
}

/// Trains a prior on `data` (unit embeddings). The ridge strength is chosen on a random tenth
/// of the questions held out, then the prior is refitted on everything; `g` is centred on the
/// training questions so that its mean level belongs to the abilities.
pub fn train(data: &[PriorExample], opts: &PriorTraining) -> Result<DifficultyPrior, RouterError> {
    let dim = data.first().map_or(0, |e| e.x.len());
    if data.len() < 20 || dim == 0 {
        return Err(RouterError::Invalid(format!(
            "difficulty prior: {} questions is too few to train on",
            data.len()
        )));
    }
    if data.iter().any(|e| e.x.len() != dim) {
        return Err(RouterError::Invalid(
            "difficulty prior: embeddings of different sizes".into(),
        ));
    }
    let mut idx: Vec<usize> = (0..data.len()).collect();
    idx.shuffle(&mut seeded(opts.seed));
    let cut = data.len() / 10;
    let held: Vec<PriorExample> = idx[..cut].iter().map(|&i| data[i].clone()).collect();
    let train_part: Vec<PriorExample> = idx[cut..].iter().map(|&i| data[i].clone()).collect();
    let without = log_loss(&held, None, 25);
    let mut best: Option<(f64, f64)> = None;
    for &l2 in &opts.l2_grid {
        let f = fit(&train_part, l2, opts.epochs);
        let loss = log_loss(&held, Some(&f.w), 25);
        if best.is_none_or(|(b, _)| loss < b) {
            best = Some((loss, l2));
        }
    }
    let (heldout, l2) = best.ok_or_else(|| RouterError::Invalid("empty l2 grid".into()))?;
    let f = fit(data, l2, opts.epochs);
    let _ = &f.theta;
    let mean_g = data.iter().map(|e| score(&f.w, &e.x)).sum::<f64>() / data.len() as f64;
    Ok(DifficultyPrior {
        format: FORMAT.into(),
        version: VERSION,
        encoder: opts.encoder.clone(),
        dim,
        weights: F32s(f.w.iter().map(|&v| v as f32).collect()),
        bias: -mean_g,
        trained_on: opts.benchmarks.clone(),
        questions: data.len(),
        labels: data.iter().map(|e| e.labels.len()).sum(),
        l2,
        heldout_logloss: heldout,
        heldout_logloss_without: without,
        command: opts.command.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixrank::irt::sigmoid;
    use rand::{Rng, SeedableRng};

    /// Questions whose difficulty is the first embedding coordinate (times 3), two benchmarks
    /// of different overall levels, three models.
    fn synthetic(n: usize, seed: u64) -> Vec<PriorExample> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let raw: Vec<f32> = (0..8).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
                let x = crate::mixrank::knn::unit(&raw).unwrap();
                let b = 3.0 * f64::from(x[0]);
                let bench = i % 2;
                let labels = (0..3)
                    .map(|m| {
                        let theta = m as f64 - 0.5 + bench as f64;
                        (m, rng.random::<f64>() < sigmoid(theta - b))
                    })
                    .collect();
                PriorExample {
                    x,
                    benchmark: bench,
                    labels,
                }
            })
            .collect()
    }

    #[test]
    fn learns_a_planted_difficulty_direction_and_round_trips() {
        let data = synthetic(1500, 1);
        let opts = PriorTraining {
            encoder: "test".into(),
            benchmarks: vec!["a".into(), "b".into()],
            epochs: 150,
            ..Default::default()
        };
        let p = train(&data, &opts).unwrap();
        assert!(
            p.heldout_logloss < p.heldout_logloss_without - 0.02,
            "{p:?}"
        );
        // The planted direction dominates the weights.
        let w = &p.weights.0;
        assert!(w[0] > 1.5, "{w:?}");
        assert!(w[1..].iter().all(|v| v.abs() < w[0] / 3.0), "{w:?}");
        let back = DifficultyPrior::from_json(&p.to_json()).unwrap();
        assert_eq!(back, p);
        let mut bad = p.clone();
        bad.weights.0.pop();
        assert!(DifficultyPrior::from_json(&bad.to_json()).is_err());
        let mut other = p;
        other.version = 99;
        assert!(DifficultyPrior::from_json(&other.to_json()).is_err());
    }

    #[test]
    fn too_little_data_is_refused() {
        assert!(train(&synthetic(5, 2), &PriorTraining::default()).is_err());
    }
}
