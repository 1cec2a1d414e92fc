//! Local difficulty from similar past requests: a bounded memory of labelled answers keyed by
//! the question embedding, and the one-step Laplace estimate of how much harder (or easier)
//! than predicted the neighbourhood of a new question has been.
//!
//! The estimate for a question `x` is `δ(x) = −Σ w_j (s_j − p_j) / (Σ w_j p_j(1 − p_j) + τ)`
//! over its `k` most similar remembered answers `j` (weights from cosine similarity), where
//! `p_j` is what the current abilities and prior difficulty predict for that answer and `τ` the
//! precision of a Gaussian prior on the offset: with few or dissimilar neighbours it stays
//! near 0. It is learned from whichever model served each neighbour, since difficulty is
//! model-agnostic, and it is recomputed against the current abilities, so old answers do not
//! carry stale residuals.
//!
//! Beside it, each model's *lift* `δ_m(x)` is the same estimate over that model's own `k` most
//! similar answers, with `p_j` including the shared difficulty the entry's neighbourhood had
//! when it was decided: what is particular to the model there (a kind of question one model
//! fails and another does not), which a difficulty shared by the zoo cannot express. Its sign
//! is a bonus's: positive where the model did better than predicted.

use serde::{Deserialize, Serialize};

use crate::predictor::F32s;
use crate::RouterError;

/// One remembered labelled answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Zoo index of the model that answered.
    pub model: u16,
    /// Task slot of the request (see `Abilities`).
    pub task: u32,
    pub satisfied: bool,
    /// The prior difficulty score `g(x)` of the question.
    pub prior: f32,
    /// The question's standardised log length `ℓ(x)` (0 in memory saved before it was kept).
    #[serde(default)]
    pub length: f32,
    /// The question's own neighbourhood difficulty `δ(x)` when it was decided (0 in memory
    /// saved before it was kept): a model's lift is measured beyond it.
    #[serde(default)]
    pub neighbours: f32,
}

/// What the neighbours of a question say about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Offsets {
    /// `δ(x)`: how much harder than predicted the neighbourhood has been, learned from every
    /// model's answers (positive: harder).
    pub difficulty: f64,
    /// Per model, how much more often than predicted *its own* answers to the neighbours
    /// were satisfied (logits, positive: better), each over that model's `k` most similar
    /// answers. Where one model fails a neighbourhood and another does not, this is the
    /// difference a ranking needs, and a model-agnostic difficulty cannot hold it.
    pub lifts: Vec<f64>,
}

/// A ring buffer of unit-length embeddings with their labelled answers.
#[derive(Debug, Clone)]
pub struct Memory {
    dim: usize,
    capacity: usize,
    vectors: Vec<f32>,
    entries: Vec<Entry>,
    next: usize,
    scratch: Vec<(f32, u32)>,
}

/// A [`Memory`] as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemorySnapshot {
    pub dim: usize,
    pub capacity: usize,
    pub vectors: F32s,
    pub entries: Vec<Entry>,
    pub next: usize,
}

/// `x / |x|`, or `None` for a zero or non-finite vector.
pub fn unit(x: &[f32]) -> Option<Vec<f32>> {
    let n = x
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt();
    if !(n.is_finite() && n > 0.0) {
        return None;
    }
    Some(x.iter().map(|v| (f64::from(*v) / n) as f32).collect())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise the loop.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

impl Memory {
    pub fn new(dim: usize, capacity: usize) -> Self {
        Memory {
            dim,
            capacity,
            vectors: Vec::new(),
            entries: Vec::new(),
            next: 0,
            scratch: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Remembers a labelled answer to the question with unit embedding `x`, replacing the
    /// oldest one when full.
    pub fn push(&mut self, x: &[f32], entry: Entry) {
        if self.capacity == 0 || x.len() != self.dim {
            return;
        }
        if self.entries.len() < self.capacity {
            self.vectors.extend_from_slice(x);
            self.entries.push(entry);
        } else {
            let at = self.next;
            self.vectors[at * self.dim..(at + 1) * self.dim].copy_from_slice(x);
            self.entries[at] = entry;
        }
        self.next = (self.next + 1) % self.capacity;
    }

    /// The neighbourhood of unit embedding `x`, over a zoo of `models`, from `k` neighbours
    /// with prior precision `tau`. Each remembered answer's `(s − p, p(1−p))` comes from
    /// `shared(entry)` for the difficulty (`p` predicted without any neighbourhood) and from
    /// `own(entry)` for the lifts (`p` predicted with the difficulty the entry's own
    /// neighbourhood had, so a lift holds only what differs between models).
    pub fn offsets(
        &mut self,
        x: &[f32],
        k: usize,
        tau: f64,
        models: usize,
        mut shared: impl FnMut(&Entry) -> (f64, f64),
        mut own: impl FnMut(&Entry) -> (f64, f64),
    ) -> Offsets {
        let mut out = Offsets {
            difficulty: 0.0,
            lifts: vec![0.0; models],
        };
        if self.entries.is_empty() || x.len() != self.dim || k == 0 {
            return out;
        }
        self.scratch.clear();
        for (i, v) in self.vectors.chunks_exact(self.dim).enumerate() {
            let s = dot(x, v);
            if s > 0.0 {
                self.scratch.push((s, i as u32));
            }
        }
        let entries = &self.entries;
        let shrunk = |near: &mut [(f32, u32)], residual: &mut dyn FnMut(&Entry) -> (f64, f64)| {
            let k = k.min(near.len());
            if k == 0 {
                return 0.0;
            }
            if k < near.len() {
                near.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            }
            let (mut num, mut den) = (0.0, tau);
            for &(s, i) in &near[..k] {
                // Squared similarity: near-duplicates count, loosely related questions barely do.
                let w = f64::from(s) * f64::from(s);
                let (r, h) = residual(&entries[i as usize]);
                num += w * r;
                den += w * h;
            }
            num / den
        };
        out.difficulty = -shrunk(&mut self.scratch, &mut shared);
        let mut mine: Vec<(f32, u32)> = Vec::new();
        for (m, lift) in out.lifts.iter_mut().enumerate() {
            mine.clear();
            mine.extend(
                self.scratch
                    .iter()
                    .filter(|&&(_, i)| usize::from(entries[i as usize].model) == m),
            );
            *lift = shrunk(&mut mine, &mut own);
        }
        out
    }

    pub fn snapshot(&self) -> MemorySnapshot {
        MemorySnapshot {
            dim: self.dim,
            capacity: self.capacity,
            vectors: F32s(self.vectors.clone()),
            entries: self.entries.clone(),
            next: self.next,
        }
    }

    /// A memory from a snapshot, checked against the zoo size `models`.
    pub fn restore(s: &MemorySnapshot, models: usize) -> Result<Self, RouterError> {
        let bad = |why: String| Err(RouterError::State(format!("difficulty memory: {why}")));
        if s.entries.len() > s.capacity || s.vectors.0.len() != s.entries.len() * s.dim {
            return bad(format!(
                "{} entries, {} floats for dimension {} and capacity {}",
                s.entries.len(),
                s.vectors.0.len(),
                s.dim,
                s.capacity
            ));
        }
        if s.next >= s.capacity.max(1) || !s.vectors.0.iter().all(|v| v.is_finite()) {
            return bad("position or vectors out of range".into());
        }
        if s.entries.iter().any(|e| {
            usize::from(e.model) >= models
                || !e.prior.is_finite()
                || !e.length.is_finite()
                || !e.neighbours.is_finite()
        }) {
            return bad(format!(
                "an entry names a model outside the zoo of {models}"
            ));
        }
        Ok(Memory {
            dim: s.dim,
            capacity: s.capacity,
            vectors: s.vectors.0.clone(),
            entries: s.entries.clone(),
            next: s.next,
            scratch: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(satisfied: bool) -> Entry {
        Entry {
            model: 0,
            task: 0,
            satisfied,
            prior: 0.0,
            length: 0.0,
            neighbours: 0.0,
        }
    }

    #[test]
    fn neighbours_that_failed_make_a_question_harder() {
        let mut m = Memory::new(2, 8);
        // Around (1, 0) everything failed; around (0, 1) everything succeeded.
        for _ in 0..4 {
            m.push(&unit(&[1.0, 0.05]).unwrap(), e(false));
            m.push(&unit(&[0.05, 1.0]).unwrap(), e(true));
        }
        let res = |en: &Entry| (f64::from(u8::from(en.satisfied)) - 0.5, 0.25);
        let hard = m.offsets(&unit(&[1.0, 0.0]).unwrap(), 4, 1.0, 1, res, res);
        let easy = m.offsets(&unit(&[0.0, 1.0]).unwrap(), 4, 1.0, 1, res, res);
        assert!(
            hard.difficulty > 0.5 && easy.difficulty < -0.5,
            "{hard:?} {easy:?}"
        );
        // The one model's own lift is the difficulty's mirror.
        assert_eq!(hard.lifts, vec![-hard.difficulty]);
        // Nobody similar (negative cosine everywhere): no evidence, no offset.
        let none = m.offsets(&unit(&[-1.0, -1.0]).unwrap(), 4, 1.0, 1, res, res);
        assert_eq!(none.difficulty, 0.0);
        assert_eq!(none.lifts, vec![0.0]);
    }

    #[test]
    fn each_model_is_lifted_by_its_own_answers_only() {
        let mut m = Memory::new(2, 64);
        // Around (1, 0) model 0 always failed and model 1 always succeeded; model 2 never
        // answered there.
        for _ in 0..8 {
            let x = unit(&[1.0, 0.02]).unwrap();
            m.push(&x, e(false));
            m.push(
                &x,
                Entry {
                    model: 1,
                    ..e(true)
                },
            );
        }
        let res = |en: &Entry| (f64::from(u8::from(en.satisfied)) - 0.5, 0.25);
        let o = m.offsets(&unit(&[1.0, 0.0]).unwrap(), 4, 1.0, 3, res, res);
        assert!(o.lifts[0] < -0.5 && o.lifts[1] > 0.5, "{o:?}");
        assert_eq!(o.lifts[2], 0.0);
        // The shared difficulty, from whichever answers are nearest, is no stronger than the
        // lifts.
        assert!(o.difficulty.abs() <= o.lifts[1].abs() + 1e-12, "{o:?}");
    }

    #[test]
    fn ring_buffer_keeps_the_newest_and_snapshot_round_trips() {
        let mut m = Memory::new(2, 3);
        for i in 0..5 {
            m.push(
                &[1.0, 0.0],
                Entry {
                    model: i % 2,
                    ..e(true)
                },
            );
        }
        assert_eq!(m.len(), 3);
        let s = m.snapshot();
        let json = serde_json::to_string(&s).unwrap();
        let back = Memory::restore(&serde_json::from_str(&json).unwrap(), 2).unwrap();
        assert_eq!(back.snapshot(), s);
        assert!(
            Memory::restore(&s, 1).is_err(),
            "entry for model 1 in a 1-model zoo"
        );
        let mut bad = s.clone();
        bad.vectors.0.pop();
        assert!(Memory::restore(&bad, 2).is_err());
    }
}
