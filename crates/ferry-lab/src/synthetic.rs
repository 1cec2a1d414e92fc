//! `ferry replay --format synthetic`: seeded random model zoos, for checking that a routing
//! policy's defaults hold on zoos and cost units nobody tuned them on.
//!
//! Each zoo draws: 2–11 models; a cost unit anywhere from 1e-7 to 1e3 (joules, dollars, or
//! seconds all look alike to the policy); base costs spread 3–300× and noisy per request;
//! abilities that mostly but not always grow with cost (so some models are dominated);
//! per-model discriminations and per-(model, topic) interactions, so the item-response model
//! the policies assume is only approximately true; questions in topics whose difficulty the
//! embedding reveals partly (topic centroids plus noise). Labels are drawn from the resulting
//! per-question probabilities; α is drawn between the cheapest and the best model's rate.
//! None of these numbers come from a real data set.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::replay::{Dataset, Record};

/// One generated zoo with its stream.
pub struct Zoo {
    pub data: Dataset,
    pub features: Vec<Arc<Vec<f32>>>,
    pub dim: usize,
    pub alpha: f64,
    /// A one-line description for reports.
    pub about: String,
}

fn normal(rng: &mut StdRng) -> f64 {
    // Box–Muller.
    let u: f64 = rng.random::<f64>().max(1e-12);
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The zoo for `seed`.
pub fn zoo(seed: u64) -> Zoo {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_2005);
    let k = rng.random_range(2..=11usize);
    let unit = 10f64.powf(rng.random_range(-7.0..3.0));
    let spread = 10f64.powf(rng.random_range(0.5..2.5));
    let mut base: Vec<f64> = (0..k)
        .map(|_| unit * spread.powf(rng.random::<f64>()))
        .collect();
    base.sort_by(f64::total_cmp);
    base[0] = unit;
    base[k - 1] = unit * spread;
    // Abilities rise with log cost plus noise: some models are dominated.
    let level = rng.random_range(-1.0..1.5);
    let slope = rng.random_range(0.5..3.0);
    let noise = rng.random_range(0.0..1.0);
    let theta: Vec<f64> = base
        .iter()
        .map(|c| level + slope * (c / unit).ln() / spread.ln() + noise * normal(&mut rng))
        .collect();
    let discr: Vec<f64> = (0..k).map(|_| (0.3 * normal(&mut rng)).exp()).collect();
    let topics = 30;
    let topic_sd = rng.random_range(0.0..1.2);
    let item_sd = rng.random_range(0.5..2.0);
    let inter_sd = rng.random_range(0.0..0.5);
    let dim = 32;
    let centroids: Vec<Vec<f64>> = (0..topics)
        .map(|_| (0..dim).map(|_| normal(&mut rng)).collect())
        .collect();
    let topic_b: Vec<f64> = (0..topics).map(|_| topic_sd * normal(&mut rng)).collect();
    let inter: Vec<Vec<f64>> = (0..topics)
        .map(|_| (0..k).map(|_| inter_sd * normal(&mut rng)).collect())
        .collect();
    let n = [600, 1500, 4000][rng.random_range(0..3usize)];
    let mut records = Vec::with_capacity(n);
    let mut features = Vec::with_capacity(n);
    for i in 0..n {
        let t = rng.random_range(0..topics);
        let b = topic_b[t] + item_sd * normal(&mut rng);
        let x: Vec<f32> = centroids[t]
            .iter()
            .map(|c| (c + 0.7 * normal(&mut rng)) as f32)
            .collect();
        features.push(Arc::new(x));
        let satisfied: Vec<bool> = (0..k)
            .map(|m| rng.random::<f64>() < sigmoid(discr[m] * (theta[m] - b) + inter[t][m]))
            .collect();
        let costs: Vec<f64> = base
            .iter()
            .map(|c| c * (0.25 * normal(&mut rng)).exp())
            .collect();
        records.push(Record {
            key: format!("synthetic-{seed}/{i}"),
            text: String::new(),
            score: satisfied.iter().map(|&s| f64::from(u8::from(s))).collect(),
            satisfied,
            costs,
            task: None,
        });
    }
    let data = Dataset {
        models: (0..k).map(|m| format!("m{m}")).collect(),
        records,
        duplicates: 0,
    };
    let rates = data.mean_satisfaction();
    let best = rates.iter().cloned().fold(0.0, f64::max);
    let alpha = (rates[0] + rng.random_range(0.1..0.9) * (best - rates[0]).max(0.0)).min(best);
    let alpha = (alpha * 1000.0).round() / 1000.0;
    Zoo {
        about: format!(
            "{k} models, costs {:.1e}..{:.1e}, rates {:.2}..{:.2}, {n} requests",
            base[0],
            base[k - 1],
            rates.iter().cloned().fold(1.0, f64::min),
            best
        ),
        data,
        features,
        dim,
        alpha,
    }
}

/// One zoo's result.
#[derive(Debug, Clone, Serialize)]
pub struct ZooRow {
    pub seed: u64,
    pub about: String,
    pub alpha: f64,
    pub satisfaction: f64,
    pub satisfaction_min: f64,
    pub sla_met: bool,
    pub cost_per_request: f64,
    pub random_alpha_cost: f64,
    pub always_best_cost: f64,
    pub ratio: f64,
    /// `ranked-alpha-hindsight` ([`crate::replay::ceiling`]) over random-α: the most a ranking on the
    /// zoo's question vectors could save (absent where the cheapest mix is one model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranked_hindsight_ratio: Option<f64>,
    pub explore_fraction: f64,
}

/// Runs `policy` on zoos `seeds` (3 stream seeds each) beside the random-α baseline.
pub fn evaluate(
    zoos: std::ops::Range<u64>,
    policy: &crate::replay::PolicyKind,
    seeds: &[u64],
) -> ferry_core::Result<Vec<ZooRow>> {
    use crate::replay::{run_policy, PolicyKind, ReplayOptions};
    let mut rows = Vec::new();
    for z in zoos {
        let zoo = zoo(z);
        let n = zoo.data.records.len() as f64;
        let opts = |p: PolicyKind| ReplayOptions {
            alpha: zoo.alpha,
            v: zoo.data.default_v(),
            c: 0.1,
            seeds: seeds.to_vec(),
            policy: p,
            prior: None,
        };
        let run =
            |p: PolicyKind| run_policy(&zoo.data, &zoo.features, zoo.dim, &p, &opts(p.clone()));
        let main = run(policy.clone())?;
        let random = run(PolicyKind::RandomAlpha)?;
        let best = zoo.data.models.len() - 1;
        let best_cost = zoo.data.mean_cost()[best];
        let cost = main.cost_total / n;
        let random_cost = random.cost_total / n;
        rows.push(ZooRow {
            seed: z,
            about: zoo.about.clone(),
            alpha: zoo.alpha,
            satisfaction: main.satisfaction,
            satisfaction_min: main.satisfaction_min,
            sla_met: crate::replay::meets_sla(main.satisfaction, main.satisfaction_min, zoo.alpha),
            cost_per_request: cost,
            random_alpha_cost: random_cost,
            always_best_cost: best_cost,
            ratio: cost / random_cost,
            ranked_hindsight_ratio: crate::replay::ceiling::ranked_alpha_hindsight(
                &zoo.data,
                &zoo.features,
                zoo.alpha,
            )
            .map(|c| c.cost_total / n / random_cost),
            explore_fraction: main.explore_fraction,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zoos_are_seeded_and_varied() {
        let a = zoo(1);
        let b = zoo(1);
        assert_eq!(a.data.records[5].satisfied, b.data.records[5].satisfied);
        assert_eq!(a.alpha, b.alpha);
        let sizes: std::collections::BTreeSet<usize> =
            (0..20).map(|s| zoo(s).data.models.len()).collect();
        assert!(sizes.len() > 4, "{sizes:?}");
        let z = zoo(3);
        let rates = z.data.mean_satisfaction();
        assert!(rates.iter().all(|r| (0.0..=1.0).contains(r)));
        assert!(z.alpha >= rates[0] - 1e-9);
    }
}
