//! The response-score imputer: for an (observation, action) pair, the inverse-distance
//! weighted mean score of the k nearest logged pairs (Euclidean), weights `1/(d + 1e-6)`.

use super::{Action, Dialogue, DialogueState, TmoError};

/// Inverse-distance weight offset (the authors').
const EPS: f64 = 1e-6;

/// k-nearest-neighbour regression over logged (observation ⊕ action) keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Knn {
    k: usize,
    dim: usize,
    /// Keys, row-major, sorted lexicographically (so ties break the same way on any input
    /// order).
    keys: Vec<f64>,
    scores: Vec<f64>,
}

impl Knn {
    /// Fits on raw keys and scores.
    pub fn fit(k: usize, keys: Vec<Vec<f64>>, scores: Vec<f64>) -> Result<Self, TmoError> {
        if k == 0 || keys.is_empty() || keys.len() != scores.len() {
            return Err(TmoError::Invalid(format!(
                "knn: k = {k} with {} keys and {} scores",
                keys.len(),
                scores.len()
            )));
        }
        let dim = keys[0].len();
        if keys.iter().any(|x| x.len() != dim) {
            return Err(TmoError::Invalid("knn: keys of different lengths".into()));
        }
        let mut rows: Vec<(Vec<f64>, f64)> = keys.into_iter().zip(scores).collect();
        rows.sort_by(|a, b| {
            a.0.iter()
                .zip(&b.0)
                .map(|(x, y)| x.total_cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.1.total_cmp(&b.1))
        });
        Ok(Knn {
            k,
            dim,
            keys: rows.iter().flat_map(|r| r.0.iter().copied()).collect(),
            scores: rows.iter().map(|r| r.1).collect(),
        })
    }

    /// Fits with k neighbours on the logged turns of `dialogues`: each turn's observation (its
    /// logged history) and logged action, with its logged score.
    pub fn from_log(k: usize, dialogues: &[Dialogue]) -> Result<Self, TmoError> {
        let mut keys = Vec::new();
        let mut scores = Vec::new();
        for d in dialogues {
            let mut s = DialogueState::new(0.0, 0.0);
            for t in &d.turns {
                keys.push(s.observe(t.task).knn_key(t.action));
                scores.push(t.score);
                s.record(t.task, t.action, 0.0, 0.0);
            }
        }
        Self::fit(k, keys, scores)
    }

    /// Number of stored pairs.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    /// The imputed score for `key`.
    pub fn predict(&self, key: &[f64]) -> f64 {
        debug_assert_eq!(key.len(), self.dim);
        // The k smallest (distance, index) pairs, kept sorted; k is small.
        let k = self.k.min(self.len());
        let mut best: Vec<(f64, usize)> = Vec::with_capacity(k + 1);
        for (i, row) in self.keys.chunks_exact(self.dim).enumerate() {
            let d2: f64 = row.iter().zip(key).map(|(a, b)| (a - b) * (a - b)).sum();
            if best.len() == k && d2 >= best[k - 1].0 {
                continue;
            }
            let at = best.partition_point(|&(d, _)| d <= d2);
            best.insert(at, (d2, i));
            best.truncate(k);
        }
        let (mut num, mut den) = (0.0, 0.0);
        for (d2, i) in best {
            let w = 1.0 / (d2.sqrt() + EPS);
            num += w * self.scores[i];
            den += w;
        }
        num / den
    }

    /// The imputed response score of action `a` for an observation's history.
    pub fn response(&self, obs: &super::Observation, a: Action) -> f64 {
        self.predict(&obs.knn_key(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_inverse_distance_mean() {
        // 1-D keys at 0, 1, 2, 4, 8, 9 with scores 10, 20, 30, 40, 50, 60; query 1.5, k = 5.
        let keys = [0.0, 1.0, 2.0, 4.0, 8.0, 9.0].map(|x| vec![x]).to_vec();
        let knn = Knn::fit(5, keys, vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0]).unwrap();
        // Neighbours: 1 (d 0.5), 2 (0.5), 0 (1.5), 4 (2.5), 8 (6.5); 9 is left out.
        let w = [0.5, 0.5, 1.5, 2.5, 6.5].map(|d: f64| 1.0 / (d + 1e-6));
        let s = [20.0, 30.0, 10.0, 40.0, 50.0];
        let want: f64 = w.iter().zip(&s).map(|(w, s)| w * s).sum::<f64>() / w.iter().sum::<f64>();
        assert!((knn.predict(&[1.5]) - want).abs() < 1e-12);
        // By hand: weights 2, 2, 2/3, 0.4, 2/13 → (40+60+6.667+16+7.692)/5.2205 ≈ 24.9705.
        assert!(
            (knn.predict(&[1.5]) - 24.9705).abs() < 1e-3,
            "{}",
            knn.predict(&[1.5])
        );
        // An exact match dominates.
        assert!((knn.predict(&[4.0]) - 40.0).abs() < 1e-4);
    }

    #[test]
    fn fit_order_does_not_matter() {
        let keys = vec![
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![1.0, 1.0],
            vec![0.0, 0.0],
        ];
        let a = Knn::fit(2, keys.clone(), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let mut rk = keys;
        rk.reverse();
        let b = Knn::fit(2, rk, vec![4.0, 3.0, 2.0, 1.0]).unwrap();
        assert_eq!(a, b);
        // Equidistant neighbours: ties break by the sorted order, the same for both.
        assert_eq!(a.predict(&[0.5, 0.5]), b.predict(&[0.5, 0.5]));
        assert!(Knn::fit(0, vec![vec![1.0]], vec![1.0]).is_err());
        assert!(Knn::fit(1, vec![vec![1.0], vec![1.0, 2.0]], vec![1.0, 2.0]).is_err());
    }
}
