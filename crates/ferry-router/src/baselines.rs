//! Baselines behind the same trait: always one model, the cheapest fixed random mix whose
//! expected satisfaction meets α (from the data's per-model means), and the per-request oracle.

use rand::Rng;

use crate::rng::{seeded, PolicyRng};

use crate::{Decision, Observation, ZooPolicy};

/// Always serve model `m`.
pub struct Always {
    pub model: usize,
    pub label: String,
}

impl ZooPolicy for Always {
    fn name(&self) -> String {
        format!("always:{}", self.label)
    }
    fn decide(&mut self, _x: &[f32]) -> Decision {
        Decision::Serve(self.model)
    }
    fn observe(&mut self, _x: &[f32], _d: Decision, _o: &Observation) {}
}

/// The cheapest probability mix over models with `Σ p_m s_m ≥ α`, given mean satisfaction `s`
/// and mean cost `c` per model. The optimum of this two-constraint linear program mixes at most
/// two models, so every single model and pair is checked. `None` if no model reaches α.
pub fn cheapest_mix(s: &[f64], c: &[f64], alpha: f64) -> Option<Vec<f64>> {
    let n = s.len();
    let mut best: Option<(f64, Vec<f64>)> = None;
    let mut consider = |p: Vec<f64>| {
        let cost: f64 = p.iter().zip(c).map(|(p, c)| p * c).sum();
        if best.as_ref().is_none_or(|(b, _)| cost < *b) {
            best = Some((cost, p));
        }
    };
    for i in 0..n {
        if s[i] >= alpha {
            let mut p = vec![0.0; n];
            p[i] = 1.0;
            consider(p);
        }
        for j in 0..n {
            // Mix a model below α with one above it so the mean lands exactly on α.
            if s[i] < alpha && s[j] > alpha {
                let w = (alpha - s[i]) / (s[j] - s[i]);
                let mut p = vec![0.0; n];
                p[i] = 1.0 - w;
                p[j] = w;
                consider(p);
            }
        }
    }
    best.map(|(_, p)| p)
}

/// Serve a model drawn from a fixed mix.
pub struct RandomMix {
    probs: Vec<f64>,
    rng: PolicyRng,
}

impl RandomMix {
    pub fn new(probs: Vec<f64>, seed: u64) -> Self {
        RandomMix {
            probs,
            rng: seeded(seed),
        }
    }
}

impl ZooPolicy for RandomMix {
    fn name(&self) -> String {
        "random-alpha".into()
    }
    fn decide(&mut self, _x: &[f32]) -> Decision {
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        for (m, p) in self.probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return Decision::Serve(m);
            }
        }
        Decision::Serve(self.probs.len() - 1)
    }
    fn observe(&mut self, _x: &[f32], _d: Decision, _o: &Observation) {}
}

/// The cheapest model that satisfies each request, known in hindsight (the cheapest model when
/// none does). A reference point, not a policy one can run.
pub fn oracle_choice(satisfied: &[bool]) -> usize {
    satisfied.iter().position(|&s| s).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cheapest_mix_hits_alpha_at_minimum_cost() {
        // s = 0.5, 0.7, 0.9; c = 1, 5, 20; alpha 0.6 -> half of model 0 and half of model 1.
        let p = cheapest_mix(&[0.5, 0.7, 0.9], &[1.0, 5.0, 20.0], 0.6).unwrap();
        assert!(
            (p[0] - 0.5).abs() < 1e-12 && (p[1] - 0.5).abs() < 1e-12 && p[2] == 0.0,
            "{p:?}"
        );
        // alpha 0.4: model 0 alone.
        assert_eq!(
            cheapest_mix(&[0.5, 0.7, 0.9], &[1.0, 5.0, 20.0], 0.4).unwrap(),
            vec![1.0, 0.0, 0.0]
        );
        assert!(cheapest_mix(&[0.5, 0.7], &[1.0, 2.0], 0.8).is_none());
        assert_eq!(oracle_choice(&[false, true, true]), 1);
        assert_eq!(oracle_choice(&[false, false]), 0);
    }
}
