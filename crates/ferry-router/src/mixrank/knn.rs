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

    /// `δ(x)` for unit embedding `x`: `residual(entry)` gives each neighbour's `(s − p, p(1−p))`
    /// under the current model; `k` neighbours, prior precision `tau`.
    pub fn local_offset(
        &mut self,
        x: &[f32],
        k: usize,
        tau: f64,
        mut residual: impl FnMut(&Entry) -> (f64, f64),
    ) -> f64 {
        if self.entries.is_empty() || x.len() != self.dim || k == 0 {
            return 0.0;
        }
        self.scratch.clear();
        for (i, v) in self.vectors.chunks_exact(self.dim).enumerate() {
            let s = dot(x, v);
            if s > 0.0 {
                self.scratch.push((s, i as u32));
            }
        }
        let k = k.min(self.scratch.len());
        if k == 0 {
            return 0.0;
        }
        if k < self.scratch.len() {
            self.scratch
                .select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        }
        let (mut num, mut den) = (0.0, tau);
        for &(s, i) in &self.scratch[..k] {
            // Squared similarity: near-duplicates count, loosely related questions barely do.
            let w = f64::from(s) * f64::from(s);
            let (r, h) = residual(&self.entries[i as usize]);
            num += w * r;
            den += w * h;
        }
        -num / den
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
            usize::from(e.model) >= models || !e.prior.is_finite() || !e.length.is_finite()
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
        let hard = m.local_offset(&unit(&[1.0, 0.0]).unwrap(), 4, 1.0, res);
        let easy = m.local_offset(&unit(&[0.0, 1.0]).unwrap(), 4, 1.0, res);
        assert!(hard > 0.5 && easy < -0.5, "{hard} {easy}");
        // Nobody similar (negative cosine everywhere): no evidence, no offset.
        let none = m.local_offset(&unit(&[-1.0, -1.0]).unwrap(), 4, 1.0, res);
        assert_eq!(none, 0.0);
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
