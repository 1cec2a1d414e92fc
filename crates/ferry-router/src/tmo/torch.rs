//! TorchScript placement policies (the `torch` feature): a policy trained with PyTorch (e.g.
//! the TMO authors' Stable-Baselines3 code) and saved with `torch.jit.save`, served with the
//! same observation, action layout and mask as [`PlacementPolicy`](super::PlacementPolicy).
//!
//! The module must have
//! - `forward(obs)`: `obs` is a float32 `[N, obs_size]` batch of [`Observation::features`]
//!   (25 numbers, or 27 for the constrained variant: the last 5 turns `[previous action, 3
//!   views sent, task]` oldest first, then the remaining latency and dollar budgets divided by
//!   `latency_scale_s` / `usd_scale`); it returns `[N, 9]`: logits (default) or probabilities
//!   over the actions 0 = local, 1 = cloud text only, 2..=4 one view, 5..=7 two views, 8 all
//!   three;
//! - an exported method `ferry_meta() -> str` returning a JSON object: `variant` (`plain` or
//!   `rc`), `algorithm` (`a2c` or `ppo`), `device` and `network` (profile slugs: the budget
//!   mask's costs), `tasks` (the task category names, index = task feature), and optionally
//!   `latency_budget_s` and `usd_budget` (default 30 and 0.05), `latency_scale_s` and
//!   `usd_scale` (required for `rc`), `output` (`logits` or `probabilities`), `obs_size` and
//!   `actions` (checked when given), `hidden`, `seed`, `steps`. Other keys are ignored.
//!
//! Loading runs the module once on a zero observation and refuses it, with the reason, unless
//! it takes `[1, obs_size]` and returns `[1, 9]` finite numbers.

use std::path::Path;

use serde::Deserialize;
use tch::{CModule, IValue, Kind, Tensor};

use super::policy::Variant;
use super::policy::{masked_softmax, Serve};
use super::{
    Action, CostModel, Observation, PolicyMeta, TmoError, ACTIONS, LATENCY_BUDGET_S, USD_BUDGET,
};

/// What the module's `forward` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TorchOutput {
    /// Unnormalised log-probabilities (softmax over the allowed actions).
    Logits,
    /// Probabilities (renormalised over the allowed actions).
    Probabilities,
}

/// `ferry_meta()`'s JSON.
#[derive(Debug, Deserialize)]
struct TorchMeta {
    variant: String,
    algorithm: String,
    device: String,
    network: String,
    tasks: Vec<String>,
    latency_budget_s: Option<f64>,
    usd_budget: Option<f64>,
    latency_scale_s: Option<f64>,
    usd_scale: Option<f64>,
    output: Option<TorchOutput>,
    obs_size: Option<usize>,
    actions: Option<usize>,
    #[serde(default)]
    hidden: Vec<usize>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    steps: u64,
}

/// A TorchScript actor with what it was trained for.
#[derive(Debug)]
pub struct TorchPolicy {
    meta: PolicyMeta,
    costs: CostModel,
    output: TorchOutput,
    module: CModule,
}

fn bad(what: String) -> TmoError {
    TmoError::Policy(what)
}

/// The useful line of a libtorch error (TorchScript errors carry a traceback and a C++
/// backtrace; the last `...Error: ` line says what went wrong).
fn torch_error(e: tch::TchError) -> String {
    let text = e.to_string();
    let text = text.split("Exception raised from").next().unwrap_or("");
    text.lines()
        .rev()
        .find(|l| l.contains("Error: "))
        .or_else(|| text.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("unknown libtorch error")
        .trim()
        .to_string()
}

impl TorchPolicy {
    /// Loads a TorchScript file and checks it against the observation and action layout.
    pub fn load(path: &Path) -> Result<TorchPolicy, TmoError> {
        if !path.is_file() {
            return Err(bad(format!("{}: no such file", path.display())));
        }
        let mut module = CModule::load(path).map_err(|e| {
            bad(format!(
                "{} is not a TorchScript module ({})",
                path.display(),
                torch_error(e)
            ))
        })?;
        module.set_eval();
        Self::from_module(module)
    }

    /// Checks a loaded module (see the module docs).
    pub fn from_module(module: CModule) -> Result<TorchPolicy, TmoError> {
        let json = match module.method_is("ferry_meta", &[] as &[IValue]) {
            Ok(IValue::String(s)) => s,
            Ok(other) => {
                return Err(bad(format!(
                    "TorchScript `ferry_meta()` returned {other:?}, expected a JSON string"
                )))
            }
            Err(e) => {
                return Err(bad(format!(
                    "TorchScript module has no `ferry_meta() -> str` method (export one with \
                     @torch.jit.export returning the policy's JSON metadata): {}",
                    torch_error(e)
                )))
            }
        };
        let t: TorchMeta = serde_json::from_str(&json)
            .map_err(|e| bad(format!("TorchScript `ferry_meta()`: {e}")))?;
        let variant: Variant = t.variant.parse()?;
        let scale = match (t.latency_scale_s, t.usd_scale) {
            (Some(s), Some(u)) => (s, u),
            (None, None) if variant == Variant::Plain => (1.0, 1.0),
            _ => {
                return Err(bad(
                    "TorchScript `ferry_meta()`: the rc variant needs latency_scale_s and \
                     usd_scale (the divisors of the budget features)"
                        .into(),
                ))
            }
        };
        if !(scale.0 > 0.0 && scale.1 > 0.0 && scale.0.is_finite() && scale.1.is_finite()) {
            return Err(bad("budget scales must be positive".into()));
        }
        if t.tasks.is_empty() {
            return Err(bad("TorchScript `ferry_meta()`: no tasks".into()));
        }
        let meta = PolicyMeta {
            algorithm: t.algorithm.parse()?,
            variant,
            hidden: t.hidden,
            device: t.device,
            network: t.network,
            latency_budget_s: t.latency_budget_s.unwrap_or(LATENCY_BUDGET_S),
            usd_budget: t.usd_budget.unwrap_or(USD_BUDGET),
            budget_scale: scale,
            tasks: t.tasks,
            seed: t.seed,
            steps: t.steps,
            test_dialogues: Vec::new(),
            // Stable-Baselines3 training on the authors' environment replays the log.
            history: super::HistoryProtocol::Logged,
        };
        let obs = meta.obs_size();
        if let Some(n) = t.obs_size.filter(|&n| n != obs) {
            return Err(bad(format!(
                "obs_size {n} does not match variant {} ({obs})",
                meta.variant
            )));
        }
        if let Some(n) = t.actions.filter(|&n| n != ACTIONS) {
            return Err(bad(format!("actions = {n}, this build uses {ACTIONS}")));
        }
        let costs = CostModel::by_name(&meta.device, &meta.network)
            .map_err(|e| bad(format!("profile: {e}")))?;
        let p = TorchPolicy {
            meta,
            costs,
            output: t.output.unwrap_or(TorchOutput::Logits),
            module,
        };
        // One forward pass on a zero observation: the module must take [1, obs] and give [1, 9].
        let out = p.forward(&vec![0.0; obs]).map_err(|e| {
            bad(format!(
                "TorchScript policy does not fit the {} observation [1, {obs}] -> [1, {ACTIONS}] \
                 actions: {e}",
                p.meta.variant
            ))
        })?;
        if out.iter().any(|x| !x.is_finite()) {
            return Err(bad(format!(
                "TorchScript policy returns non-finite numbers for a zero observation: {out:?}"
            )));
        }
        Ok(p)
    }

    pub fn output(&self) -> TorchOutput {
        self.output
    }

    /// The module's raw output (logits or probabilities) for one observation vector.
    pub fn forward(&self, features: &[f32]) -> Result<Vec<f32>, String> {
        let x = Tensor::from_slice(features).reshape([1, features.len() as i64]);
        let y = tch::no_grad(|| self.module.forward_ts(&[x])).map_err(torch_error)?;
        if y.size() != [1, ACTIONS as i64] {
            return Err(format!(
                "output shape {:?}, expected [1, {ACTIONS}]",
                y.size()
            ));
        }
        Vec::<f32>::try_from(&y.to_kind(Kind::Float).reshape([ACTIONS as i64])).map_err(torch_error)
    }
}

impl Serve for TorchPolicy {
    /// Action probabilities over the actions `mask` allows.
    fn probabilities_masked(
        &self,
        obs: &Observation,
        mask: &[bool; ACTIONS],
    ) -> Result<[f64; ACTIONS], TmoError> {
        let out = self
            .forward(&self.features(obs))
            .map_err(|e| bad(format!("TorchScript forward: {e}")))?;
        let mask = *mask;
        match self.output {
            TorchOutput::Logits => Ok(masked_softmax(&out, &mask)),
            TorchOutput::Probabilities => {
                let mut p = [0.0; ACTIONS];
                for i in 0..ACTIONS {
                    if mask[i] {
                        p[i] = f64::from(out[i]).max(0.0);
                    }
                }
                let sum: f64 = p.iter().sum();
                if !(sum > 0.0 && sum.is_finite()) {
                    return Err(bad(format!(
                        "TorchScript policy gives the allowed actions no probability: {out:?}"
                    )));
                }
                p.iter_mut().for_each(|x| *x /= sum);
                Ok(p)
            }
        }
    }

    fn meta(&self) -> &PolicyMeta {
        &self.meta
    }

    fn costs(&self) -> &CostModel {
        &self.costs
    }
}

/// Run by scripts/test-torch-feature, which exports the modules with PyTorch and writes what
/// PyTorch computed to `$FERRY_TORCH_FIXTURES/fixture.json`.
#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::Value;

    use super::*;
    use crate::tmo::{DialogueState, PlacementPolicy, PolicyFormat, ServedPolicy};

    fn fixtures() -> (PathBuf, Value) {
        let dir = PathBuf::from(std::env::var("FERRY_TORCH_FIXTURES").expect(
            "FERRY_TORCH_FIXTURES is unset: the torch feature's tests run from \
             scripts/test-torch-feature",
        ));
        let json = std::fs::read_to_string(dir.join("fixture.json")).expect("fixture.json");
        (dir, serde_json::from_str(&json).expect("fixture JSON"))
    }

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    }

    #[test]
    fn outputs_and_masked_probabilities_match_pytorch() {
        let (dir, fx) = fixtures();
        let samples = fx["samples"].as_array().expect("samples");
        assert!(samples.len() >= 40);
        let mut worst = 0f64;
        for s in samples {
            let p = TorchPolicy::load(&dir.join(s["module"].as_str().unwrap())).unwrap();
            let x: Vec<f32> = floats(&s["features"]).iter().map(|&v| v as f32).collect();
            assert_eq!(x.len(), p.meta().obs_size());
            let out = p.forward(&x).unwrap();
            for (a, b) in out.iter().zip(floats(&s["out"])) {
                worst = worst.max((f64::from(*a) - b).abs());
            }
            let mut mask = [false; ACTIONS];
            for (m, v) in mask.iter_mut().zip(s["mask"].as_array().unwrap()) {
                *m = v.as_bool().unwrap();
            }
            let probs = match p.output() {
                TorchOutput::Logits => masked_softmax(&out, &mask),
                TorchOutput::Probabilities => {
                    let sum: f64 = (0..ACTIONS)
                        .filter(|&i| mask[i])
                        .map(|i| f64::from(out[i]))
                        .sum();
                    let mut q = [0.0; ACTIONS];
                    for i in (0..ACTIONS).filter(|&i| mask[i]) {
                        q[i] = f64::from(out[i]) / sum;
                    }
                    q
                }
            };
            for (a, b) in probs.iter().zip(floats(&s["probabilities"])) {
                worst = worst.max((a - b).abs());
            }
        }
        assert!(worst < 1e-5, "largest difference from PyTorch {worst}");
    }

    #[test]
    fn serves_what_the_safetensors_policy_with_the_same_weights_serves() {
        let (dir, fx) = fixtures();
        let mut masked_seen = 0;
        for pol in fx["policies"].as_array().unwrap() {
            let bytes = std::fs::read(dir.join(pol["safetensors"].as_str().unwrap())).unwrap();
            let native = PlacementPolicy::from_bytes(&bytes).unwrap();
            let path = dir.join(pol["torchscript"].as_str().unwrap());
            let torch = ServedPolicy::load(&path, PolicyFormat::from_path(&path)).unwrap();
            assert_eq!(torch.format(), PolicyFormat::Torchscript);
            assert_eq!(torch.meta().variant, native.meta().variant);
            assert_eq!(torch.meta().tasks, native.meta().tasks);
            assert_eq!(torch.meta().budget_scale, native.meta().budget_scale);
            // Live dialogues: a cloud turn with all views costs about 7 s and $0.0137, so the
            // budget mask of the constrained variant closes actions after a few turns.
            for (d, tasks) in [[0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
                .iter()
                .enumerate()
            {
                let mut s = DialogueState::new(30.0, 0.05);
                for (turn, &task) in tasks.iter().enumerate() {
                    let o = s.observe(task);
                    assert_eq!(torch.features(&o), native.features(&o));
                    let mask = torch.mask(&o);
                    assert_eq!(mask, native.mask(&o));
                    masked_seen += mask.iter().filter(|&&m| !m).count();
                    let (a, b) = (
                        torch.probabilities(&o).unwrap(),
                        native.probabilities(&o).unwrap(),
                    );
                    for i in 0..ACTIONS {
                        assert!(
                            (a[i] - b[i]).abs() < 1e-5,
                            "{pol} dialogue {d}: {a:?} {b:?}"
                        );
                        assert!(mask[i] || a[i] == 0.0);
                    }
                    let act = torch.act(&o);
                    assert!(mask[act.index()]);
                    // Alternate the policy's choice with an expensive cloud turn.
                    let done = if turn % 2 == 0 {
                        act
                    } else {
                        Action::cloud(0b111)
                    };
                    let (lat, usd) = if done.is_local() {
                        (3.0, 0.0)
                    } else {
                        (7.0, 0.0137)
                    };
                    s.record(task, done, lat, usd);
                }
            }
        }
        assert!(masked_seen > 0, "the walk never exercised the budget mask");
    }

    #[test]
    fn modules_that_do_not_fit_are_refused_with_the_reason() {
        let (dir, fx) = fixtures();
        for r in fx["refused"].as_array().unwrap() {
            let name = r["module"].as_str().unwrap();
            let e = TorchPolicy::load(&dir.join(name)).unwrap_err().to_string();
            let want = r["error"].as_str().unwrap();
            assert!(e.contains(want), "{name}: `{e}` lacks `{want}`");
            assert!(!e.contains("Exception raised from"), "{name}: {e}");
            eprintln!("{name}: {e}");
        }
        let e = TorchPolicy::load(&dir.join("missing.pt")).unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
    }
}
