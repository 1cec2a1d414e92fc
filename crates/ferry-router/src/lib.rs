//! Routing policies, free of I/O and seeded: the same structs run in ferryd, in `ferry replay`
//! and in unit tests, and a seeded run is bit-for-bit repeatable.
//!
//! A zoo policy is fed one request at a time: [`ZooPolicy::decide`] sees only the request's
//! features (its question embedding) and answers which model serves it, or that the request is
//! an exploration sample to be run on every model; [`ZooPolicy::observe`] then receives what was
//! actually observed (costs of the models that ran, satisfaction where feedback arrived).

pub mod baselines;
pub mod mess;
pub mod mixrank;
pub mod predictor;
pub mod rng;
pub mod tmo;

/// What a zoo policy decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run on every model, serve the most capable (last) one, learn from all of them.
    Explore,
    /// Run only this model (index into the zoo, ordered by ascending cost).
    Serve(usize),
    /// Run `serve` and serve its answer; run `learn` too, only to learn from its label
    /// (charged like any call, never served).
    Shadow { serve: usize, learn: usize },
}

impl Decision {
    /// The model whose answer is served, for a zoo of `n` models.
    pub fn served(self, n: usize) -> usize {
        match self {
            Decision::Explore => n - 1,
            Decision::Serve(m) | Decision::Shadow { serve: m, .. } => m,
        }
    }

    /// The models that run beside the served one, only to be learned from (zoo order).
    pub fn also_runs(self, n: usize) -> Vec<usize> {
        match self {
            Decision::Explore => (0..n.saturating_sub(1)).collect(),
            Decision::Serve(_) => Vec::new(),
            Decision::Shadow { serve, learn } => {
                if learn != serve && learn < n {
                    vec![learn]
                } else {
                    Vec::new()
                }
            }
        }
    }
}

/// What was observed after running a request as decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Cost of each model that ran (`None` for models that did not run).
    pub costs: Vec<Option<f64>>,
    /// Satisfaction of each model whose answer was judged (`None` when unknown).
    pub satisfied: Vec<Option<bool>>,
    /// Whether the user's feedback on the served answer arrived.
    pub feedback: bool,
}

/// What a policy may know about one request.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// Question embedding (empty when there is none).
    pub features: &'a [f32],
    /// The task the request names, if any (per-task satisfaction rates).
    pub task: Option<&'a str>,
    /// Whether a satisfaction label can come back; policies explore only on such requests.
    pub feedback_expected: bool,
    /// Whether an answer that is not served can be labelled too (a judge grades it, or the
    /// replayed data holds every model's label): only then may a policy run a model beside
    /// the served one just to learn it.
    pub label_unserved: bool,
    /// Length of the request's text in characters, where known: longer questions are often
    /// harder (or, in some streams, easier), and a router may learn which.
    pub text_chars: Option<usize>,
}

/// A model-selection policy over one tier's zoo.
pub trait ZooPolicy {
    /// Short name for reports.
    fn name(&self) -> String;
    /// Chooses for a request with features `x`.
    fn decide(&mut self, x: &[f32]) -> Decision;
    /// Chooses for a request with everything known about it (policies that read only the
    /// features keep the default).
    fn decide_for(&mut self, req: &RouteRequest) -> Decision {
        self.decide(req.features)
    }
    /// The satisfaction each model was predicted to have on the request just decided, where
    /// the policy predicts one (for calibration reports).
    fn predicted(&self) -> Option<Vec<f64>> {
        None
    }
    /// Requests on which the policy paid to learn (whole-zoo runs, or models tried while
    /// uncertain).
    fn explorations(&self) -> u64 {
        0
    }
    /// Learns from what happened to the request just decided.
    fn observe(&mut self, x: &[f32], decision: Decision, obs: &Observation);
}

/// Errors of router construction.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("invalid router parameter: {0}")]
    Invalid(String),
    #[error("predictor: {0}")]
    Predictor(String),
    /// A saved state that does not fit this policy (other zoo, other shapes, bad values).
    #[error("saved router state: {0}")]
    State(String),
}
