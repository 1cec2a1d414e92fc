//! A trained placement policy: the actor and critic networks (A2C, PPO) or the Q-network (DQN)
//! and what they were trained for, stored as safetensors with a metadata header.
//!
//! Header keys (all strings): `format` = `ferry-tmo-policy`, `version` = `1`, `algorithm`
//! (`a2c`, `ppo`, `dqn`), `history_protocol` (`logged`, `own`; absent = `own`), `variant` (`plain`, `rc`), `obs_size`, `actions`, `views`, `history`,
//! `hidden` (comma list), `device`, `network` (profile slugs), `latency_budget_s`,
//! `usd_budget`, `latency_scale_s`, `usd_scale` (budget feature scales), `tasks` (JSON list of
//! task category names, index = task feature), `seed`, `steps`, `test_dialogues` (comma list of
//! the dialogue ids held out for evaluation). Tensors (f32): `actor.{i}.weight`,
//! `actor.{i}.bias`, `critic.{i}.weight`, `critic.{i}.bias`; a DQN file has only `actor.*`,
//! its Q-network (ReLU between layers; the actor-critic networks use tanh).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::SafeTensors;

use super::nn::{Activation, Mlp};
use super::{
    feasible, Action, CallPrices, CostModel, EnvConfig, HistoryProtocol, Observation, TmoError,
    ACTIONS, HISTORY, OBS_DIM, OBS_DIM_RC, VIEWS,
};
#[cfg(any(test, feature = "train"))]
use crate::rng::PolicyRng;

const FORMAT: &str = "ferry-tmo-policy";
const VERSION: &str = "1";

/// The learning algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    A2c,
    Ppo,
    Dqn,
}

/// Plain, or resource-constrained (budgets observed, overdraw rewarded 0, hard mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    Plain,
    Constrained,
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Algorithm::A2c => "a2c",
            Algorithm::Ppo => "ppo",
            Algorithm::Dqn => "dqn",
        })
    }
}

impl std::str::FromStr for Algorithm {
    type Err = TmoError;
    fn from_str(s: &str) -> Result<Self, TmoError> {
        match s {
            "a2c" => Ok(Algorithm::A2c),
            "ppo" => Ok(Algorithm::Ppo),
            "dqn" => Ok(Algorithm::Dqn),
            _ => Err(TmoError::Invalid(format!(
                "algorithm `{s}` (a2c, ppo or dqn)"
            ))),
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Variant::Plain => "plain",
            Variant::Constrained => "rc",
        })
    }
}

impl std::str::FromStr for Variant {
    type Err = TmoError;
    fn from_str(s: &str) -> Result<Self, TmoError> {
        match s {
            "plain" => Ok(Variant::Plain),
            "rc" => Ok(Variant::Constrained),
            _ => Err(TmoError::Invalid(format!("variant `{s}` (plain or rc)"))),
        }
    }
}

/// Parses `a2c`, `ppo`, `dqn`, `rc-a2c`, `rc-ppo`, `rc-dqn`.
pub fn parse_algo(s: &str) -> Result<(Algorithm, Variant), TmoError> {
    let lower = s.to_ascii_lowercase();
    let parsed = match lower.strip_prefix("rc-") {
        Some(a) => a.parse().map(|a| (a, Variant::Constrained)),
        None => lower.parse().map(|a| (a, Variant::Plain)),
    };
    parsed.map_err(|_| {
        TmoError::Invalid(format!(
            "algorithm `{s}` (a2c, ppo, dqn, rc-a2c, rc-ppo or rc-dqn)"
        ))
    })
}

/// What a policy was trained for.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyMeta {
    pub algorithm: Algorithm,
    pub variant: Variant,
    /// Hidden layer widths.
    pub hidden: Vec<usize>,
    /// Device and network profile slugs.
    pub device: String,
    pub network: String,
    /// Evaluation budgets per dialogue.
    pub latency_budget_s: f64,
    pub usd_budget: f64,
    /// Divisors of the remaining-budget features (seconds, dollars).
    pub budget_scale: (f64, f64),
    /// Task category names; the task feature is the index.
    pub tasks: Vec<String>,
    pub seed: u64,
    pub steps: u64,
    /// Dialogue ids held out for evaluation (the split of `seed`).
    pub test_dialogues: Vec<u64>,
    /// The history its training observations carried.
    pub history: HistoryProtocol,
}

impl PolicyMeta {
    /// Observation length the networks take.
    pub fn obs_size(&self) -> usize {
        match self.variant {
            Variant::Plain => OBS_DIM,
            Variant::Constrained => OBS_DIM_RC,
        }
    }

    /// Short method name for reports, e.g. `RC-A2C`.
    pub fn method(&self) -> String {
        let a = self.algorithm.to_string().to_uppercase();
        match self.variant {
            Variant::Plain => a,
            Variant::Constrained => format!("RC-{a}"),
        }
    }

    /// The method and, when it is not the reference protocol, how it was trained, e.g.
    /// `RC-A2C` or `RC-A2C/own`: rows of an evaluation table.
    pub fn label(&self) -> String {
        match self.history {
            HistoryProtocol::Logged => self.method(),
            HistoryProtocol::Own => format!("{}/own", self.method()),
        }
    }
}

/// Actor (logits over the actions) and critic (state value); for DQN, the Q-network as the
/// actor (Q-values over the actions) and no critic.
#[derive(Debug)]
pub struct PlacementPolicy {
    meta: PolicyMeta,
    costs: CostModel,
    pub(crate) actor: Mlp,
    pub(crate) critic: Option<Mlp>,
}

/// Softmax of `logits` over the allowed actions (others get probability 0).
pub(crate) fn masked_softmax(logits: &[f32], mask: &[bool; ACTIONS]) -> [f64; ACTIONS] {
    let mut p = [0.0; ACTIONS];
    let max = logits
        .iter()
        .zip(mask)
        .filter(|(_, &ok)| ok)
        .map(|(&z, _)| f64::from(z))
        .fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for i in 0..ACTIONS {
        if mask[i] {
            p[i] = (f64::from(logits[i]) - max).exp();
            sum += p[i];
        }
    }
    p.iter_mut().for_each(|x| *x /= sum);
    p
}

/// The network input for `obs` under `meta` (the budget features only for the constrained
/// variant). Shared with the TorchScript policies, which take the same observation.
pub(crate) fn features_for(meta: &PolicyMeta, obs: &Observation) -> Vec<f32> {
    obs.features(match meta.variant {
        Variant::Plain => None,
        Variant::Constrained => Some(meta.budget_scale),
    })
}

/// Allowed actions under `meta`: all for the plain variant, the budget mask at `prices` for
/// the constrained one.
pub(crate) fn mask_for(
    meta: &PolicyMeta,
    prices: &CallPrices,
    obs: &Observation,
) -> [bool; ACTIONS] {
    match meta.variant {
        Variant::Plain => [true; ACTIONS],
        Variant::Constrained => feasible(obs, prices),
    }
}

/// The index of the highest of `values` among the allowed actions (the first on ties; local
/// when nothing else is allowed).
pub(crate) fn greedy(values: &[f32], mask: &[bool; ACTIONS]) -> usize {
    let mut best = 0;
    for i in 1..ACTIONS {
        if mask[i] && (!mask[best] || values[i] > values[best]) {
            best = i;
        }
    }
    best
}

/// The most probable action (the first on ties); local when the probabilities could not be
/// computed.
pub(crate) fn most_probable(p: Result<[f64; ACTIONS], TmoError>) -> Action {
    match p {
        Ok(p) => {
            let mut best = 0;
            for i in 1..ACTIONS {
                if p[i] > p[best] {
                    best = i;
                }
            }
            Action::from_index(best).expect("index in range")
        }
        Err(_) => Action::LOCAL,
    }
}

/// What every served placement policy (a ferry policy file, a TorchScript module, either one
/// behind [`super::ServedPolicy`]) answers: its metadata, its cost model, and its action
/// probabilities over an allowed set. The network input, the budget mask and the chosen
/// action follow from those the same way for all of them.
pub trait Serve {
    fn meta(&self) -> &PolicyMeta;

    /// The cost model of the policy's profiles (used by its budget mask).
    fn costs(&self) -> &CostModel;

    /// Action probabilities over the actions `mask` allows (masked actions have 0).
    fn probabilities_masked(
        &self,
        obs: &Observation,
        mask: &[bool; ACTIONS],
    ) -> Result<[f64; ACTIONS], TmoError>;

    /// The network input for `obs`.
    fn features(&self, obs: &Observation) -> Vec<f32> {
        features_for(self.meta(), obs)
    }

    /// Allowed actions: all for the plain variant, the budget mask at the profile's prices for
    /// the constrained one.
    fn mask(&self, obs: &Observation) -> [bool; ACTIONS] {
        mask_for(self.meta(), &self.costs().prices(), obs)
    }

    /// Action probabilities (masked actions have 0).
    fn probabilities(&self, obs: &Observation) -> Result<[f64; ACTIONS], TmoError> {
        self.probabilities_masked(obs, &self.mask(obs))
    }

    /// The placement for `obs`: the most probable allowed action. A forward pass cannot fail
    /// on the shapes a loaded policy guarantees; if it did, the answer is local (the cheap,
    /// always-allowed action).
    fn act(&self, obs: &Observation) -> Action {
        most_probable(self.probabilities(obs))
    }
}

impl Serve for PlacementPolicy {
    /// Action probabilities over the actions `mask` allows. A DQN policy is greedy: all the
    /// probability on the allowed action of the highest Q-value.
    fn probabilities_masked(
        &self,
        obs: &Observation,
        mask: &[bool; ACTIONS],
    ) -> Result<[f64; ACTIONS], TmoError> {
        let out = self.actor.forward1(&self.features(obs))?;
        if self.meta.algorithm != Algorithm::Dqn {
            return Ok(masked_softmax(&out, mask));
        }
        let mut p = [0.0; ACTIONS];
        p[greedy(&out, mask)] = 1.0;
        Ok(p)
    }

    fn meta(&self) -> &PolicyMeta {
        &self.meta
    }

    fn costs(&self) -> &CostModel {
        &self.costs
    }
}

impl PlacementPolicy {
    /// Freshly initialised networks, as SB3 initialises them: orthogonal for the actor-critic
    /// learners, PyTorch's default for DQN's Q-network.
    #[cfg(any(test, feature = "train"))]
    pub(crate) fn init(meta: PolicyMeta, rng: &mut PolicyRng) -> Result<Self, TmoError> {
        let costs = CostModel::by_name(&meta.device, &meta.network)?;
        let mut sizes = vec![meta.obs_size()];
        sizes.extend(&meta.hidden);
        let mut a = sizes.clone();
        a.push(ACTIONS);
        let mut c = sizes;
        c.push(1);
        let (actor, critic) = if meta.algorithm == Algorithm::Dqn {
            (Mlp::torch_default(&a, Activation::Relu, rng)?, None)
        } else {
            let gain = 2f64.sqrt();
            let actor = Mlp::new(&a, gain, 0.01, rng)?;
            (actor, Some(Mlp::new(&c, gain, 1.0, rng)?))
        };
        Ok(PlacementPolicy {
            meta,
            costs,
            actor,
            critic,
        })
    }

    /// The critic's value of `obs` (DQN: the highest allowed Q-value).
    pub fn value(&self, obs: &Observation) -> Result<f64, TmoError> {
        let f = self.features(obs);
        match &self.critic {
            Some(c) => Ok(f64::from(c.forward1(&f)?[0])),
            None => {
                let q = self.actor.forward1(&f)?;
                Ok(f64::from(q[greedy(&q, &self.mask(obs))]))
            }
        }
    }

    /// Fails unless the policy was trained for this environment's device and network.
    pub fn check_env(&self, cfg: &EnvConfig) -> Result<(), TmoError> {
        let m = &self.meta;
        if m.device != cfg.costs.device.slug || m.network != cfg.costs.network.slug {
            return Err(TmoError::Policy(format!(
                "trained for {} / {}, asked for {} / {}",
                m.device, m.network, cfg.costs.device.slug, cfg.costs.network.slug
            )));
        }
        Ok(())
    }

    /// The safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, TmoError> {
        let m = &self.meta;
        let join = |v: &[String]| v.join(",");
        let meta: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("version", VERSION.to_string()),
            ("algorithm", m.algorithm.to_string()),
            ("variant", m.variant.to_string()),
            ("obs_size", m.obs_size().to_string()),
            ("actions", ACTIONS.to_string()),
            ("views", VIEWS.to_string()),
            ("history", HISTORY.to_string()),
            (
                "hidden",
                join(&m.hidden.iter().map(|h| h.to_string()).collect::<Vec<_>>()),
            ),
            ("device", m.device.clone()),
            ("network", m.network.clone()),
            ("latency_budget_s", m.latency_budget_s.to_string()),
            ("usd_budget", m.usd_budget.to_string()),
            ("latency_scale_s", m.budget_scale.0.to_string()),
            ("usd_scale", m.budget_scale.1.to_string()),
            (
                "tasks",
                serde_json::to_string(&m.tasks).expect("strings serialise"),
            ),
            ("seed", m.seed.to_string()),
            ("steps", m.steps.to_string()),
            (
                "test_dialogues",
                join(
                    &m.test_dialogues
                        .iter()
                        .map(|h| h.to_string())
                        .collect::<Vec<_>>(),
                ),
            ),
            ("history_protocol", m.history.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let nets = [Some(&self.actor), self.critic.as_ref()];
        for (name, net) in ["actor", "critic"].into_iter().zip(nets) {
            let Some(net) = net else { continue };
            for (i, (w, b)) in net.layers.iter().enumerate() {
                tensors.push((format!("{name}.{i}.weight"), w.as_tensor().clone()));
                tensors.push((format!("{name}.{i}.bias"), b.as_tensor().clone()));
            }
        }
        safetensors::tensor::serialize(tensors, Some(meta))
            .map_err(|e| TmoError::Policy(format!("serialise: {e}")))
    }

    /// Reads a policy from safetensors bytes, checking the header and every tensor's shape.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TmoError> {
        let bad = |what: String| TmoError::Policy(what);
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let h = Header(
            header
                .metadata()
                .clone()
                .ok_or_else(|| bad("no metadata header (not a ferry TMO policy)".into()))?,
        );
        if h.get("format")? != FORMAT {
            return Err(bad(format!(
                "format `{}` is not `{FORMAT}`",
                h.get("format")?
            )));
        }
        if h.get("version")? != VERSION {
            return Err(bad(format!(
                "version {} (this build reads {VERSION})",
                h.get("version")?
            )));
        }
        for (k, want) in [("actions", ACTIONS), ("views", VIEWS), ("history", HISTORY)] {
            let got: usize = h.num(k)?;
            if got != want {
                return Err(bad(format!("{k} = {got}, this build uses {want}")));
            }
        }
        let hidden: Vec<usize> = h.list("hidden")?.into_iter().map(|x| x as usize).collect();
        if hidden.is_empty() || hidden.iter().any(|&x| x == 0 || x > 4096) {
            return Err(bad(format!("hidden widths {hidden:?}")));
        }
        let scale: (f64, f64) = (h.num("latency_scale_s")?, h.num("usd_scale")?);
        if !(scale.0 > 0.0 && scale.1 > 0.0 && scale.0.is_finite() && scale.1.is_finite()) {
            return Err(bad("budget scales must be positive".into()));
        }
        let m = PolicyMeta {
            algorithm: h.get("algorithm")?.parse()?,
            variant: h.get("variant")?.parse()?,
            hidden,
            device: h.get("device")?.to_string(),
            network: h.get("network")?.to_string(),
            latency_budget_s: h.num("latency_budget_s")?,
            usd_budget: h.num("usd_budget")?,
            budget_scale: scale,
            tasks: serde_json::from_str(h.get("tasks")?)
                .map_err(|e| bad(format!("metadata `tasks`: {e}")))?,
            seed: h.num("seed")?,
            steps: h.num("steps")?,
            test_dialogues: h.list("test_dialogues")?,
            // Files written before the key existed were all trained on their own history.
            history: match h.0.get("history_protocol") {
                Some(v) => v.parse()?,
                None => HistoryProtocol::Own,
            },
        };
        let obs: usize = h.num("obs_size")?;
        if obs != m.obs_size() {
            return Err(bad(format!(
                "obs_size {obs} does not match variant {} ({})",
                m.variant,
                m.obs_size()
            )));
        }
        let costs =
            CostModel::by_name(&m.device, &m.network).map_err(|e| bad(format!("profile: {e}")))?;
        let mut sizes = vec![obs];
        sizes.extend(&m.hidden);
        let expected = |out: usize| {
            let mut s = sizes.clone();
            s.push(out);
            s
        };
        let load = |name: &str, sizes: Vec<usize>| -> Result<Mlp, TmoError> {
            let mut layers = Vec::new();
            for (i, w) in sizes.windows(2).enumerate() {
                let mut pair = Vec::new();
                for (part, shape) in [("weight", vec![w[1], w[0]]), ("bias", vec![w[1]])] {
                    let key = format!("{name}.{i}.{part}");
                    let view = st
                        .tensor(&key)
                        .map_err(|_| bad(format!("tensor `{key}` missing")))?;
                    if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape {
                        return Err(bad(format!(
                            "tensor `{key}` is {:?} {:?}, expected F32 {shape:?}",
                            view.dtype(),
                            view.shape()
                        )));
                    }
                    let t = Tensor::from_raw_buffer(view.data(), DType::F32, &shape, &Device::Cpu)?;
                    let finite = t
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        .iter()
                        .all(|x| x.is_finite());
                    if !finite {
                        return Err(bad(format!("tensor `{key}` has non-finite values")));
                    }
                    pair.push(t);
                }
                let b = pair.pop().expect("two");
                let w = pair.pop().expect("two");
                layers.push((w, b));
            }
            let activation = if m.algorithm == Algorithm::Dqn {
                Activation::Relu
            } else {
                Activation::Tanh
            };
            Mlp::from_tensors(layers, activation)
        };
        let actor = load("actor", expected(ACTIONS))?;
        let critic = match m.algorithm {
            Algorithm::Dqn => None,
            _ => Some(load("critic", expected(1))?),
        };
        let n_tensors = 2 * sizes.len() * (1 + usize::from(critic.is_some()));
        if st.len() != n_tensors {
            return Err(bad(format!("{} tensors, expected {n_tensors}", st.len())));
        }
        Ok(PlacementPolicy {
            meta: m,
            costs,
            actor,
            critic,
        })
    }
}

/// The metadata header of a policy file.
struct Header(HashMap<String, String>);

impl Header {
    fn get(&self, k: &str) -> Result<&str, TmoError> {
        self.0
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| TmoError::Policy(format!("metadata key `{k}` missing")))
    }

    fn num<T: std::str::FromStr>(&self, k: &str) -> Result<T, TmoError> {
        let v = self.get(k)?;
        v.parse()
            .map_err(|_| TmoError::Policy(format!("metadata `{k}` = `{v}` is not a number")))
    }

    fn list(&self, k: &str) -> Result<Vec<u64>, TmoError> {
        let v = self.get(k)?;
        if v.is_empty() {
            return Ok(Vec::new());
        }
        v.split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .map_err(|_| TmoError::Policy(format!("metadata `{k}` = `{v}`")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;
    use crate::tmo::DialogueState;

    pub(crate) fn meta(variant: Variant) -> PolicyMeta {
        PolicyMeta {
            algorithm: Algorithm::A2c,
            variant,
            hidden: vec![8, 8],
            device: "jetson-tx2".into(),
            network: "wired".into(),
            latency_budget_s: 30.0,
            usd_budget: 0.05,
            budget_scale: (35.0, 0.07),
            tasks: vec!["A".into(), "B".into()],
            seed: 5,
            steps: 0,
            test_dialogues: vec![3, 1],
            history: HistoryProtocol::Own,
        }
    }

    #[test]
    fn save_load_round_trip_acts_the_same() {
        for variant in [Variant::Plain, Variant::Constrained] {
            let p = PlacementPolicy::init(meta(variant), &mut seeded(2)).unwrap();
            let bytes = p.to_bytes().unwrap();
            let q = PlacementPolicy::from_bytes(&bytes).unwrap();
            assert_eq!(q.meta(), p.meta());
            let mut s = DialogueState::new(30.0, 0.05);
            for task in [0, 1, 1, 0] {
                let o = s.observe(task);
                assert_eq!(p.probabilities(&o).unwrap(), q.probabilities(&o).unwrap());
                assert_eq!(p.value(&o).unwrap(), q.value(&o).unwrap());
                let a = q.act(&o);
                s.record(task, a, 6.0, 0.0137);
            }
            // Re-saving keeps every tensor (the header's key order may differ).
            let again = q.to_bytes().unwrap();
            let (x, y) = (
                SafeTensors::deserialize(&bytes).unwrap(),
                SafeTensors::deserialize(&again).unwrap(),
            );
            let mut names = x.names();
            names.sort();
            for n in names {
                assert!(
                    x.tensor(n).unwrap().data() == y.tensor(n).unwrap().data(),
                    "{n}"
                );
            }
        }
    }

    #[test]
    fn a_header_that_lies_about_its_size_is_refused() {
        let p = PlacementPolicy::init(meta(Variant::Constrained), &mut seeded(2)).unwrap();
        let good = p.to_bytes().unwrap();
        // The first 8 bytes give the JSON header's length.
        for claimed in [u64::MAX, 1 << 40, good.len() as u64, 0, 1] {
            let mut b = good.clone();
            b[..8].copy_from_slice(&claimed.to_le_bytes());
            let e = PlacementPolicy::from_bytes(&b).unwrap_err().to_string();
            assert!(e.contains("not a safetensors"), "{claimed}: {e}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 500, ..Default::default() })]
        /// Any corruption of a valid policy file loads or is refused, never a panic, and what
        /// loads gives probabilities.
        #[test]
        fn corrupted_policy_files_never_panic(
            edits in proptest::collection::vec((0usize..1 << 16, proptest::prelude::any::<u8>()), 1..6),
        ) {
            let p = PlacementPolicy::init(meta(Variant::Constrained), &mut seeded(2)).unwrap();
            let mut b = p.to_bytes().unwrap();
            let n = b.len();
            for (at, byte) in edits {
                b[at % n] = byte;
            }
            if let Ok(q) = PlacementPolicy::from_bytes(&b) {
                let o = DialogueState::new(30.0, 0.05).observe(0);
                if let Ok(probs) = q.probabilities(&o) {
                    proptest::prop_assert_eq!(probs.len(), ACTIONS);
                }
            }
        }
    }

    #[test]
    fn malformed_or_mismatched_files_are_refused() {
        let p = PlacementPolicy::init(meta(Variant::Constrained), &mut seeded(2)).unwrap();
        let good = p.to_bytes().unwrap();
        let err = |b: &[u8]| PlacementPolicy::from_bytes(b).unwrap_err().to_string();
        assert!(err(b"").contains("not a safetensors"));
        assert!(err(&good[..good.len() - 7]).contains("not a safetensors"));
        // A header edit: rewrite one metadata value in place, keeping the length.
        let edit = |from: &str, to: &str| {
            assert_eq!(from.len(), to.len());
            let mut b = good.clone();
            let at = b
                .windows(from.len())
                .position(|w| w == from.as_bytes())
                .unwrap_or_else(|| panic!("{from} in header"));
            b[at..at + to.len()].copy_from_slice(to.as_bytes());
            b
        };
        let e = err(&edit("\"obs_size\":\"27\"", "\"obs_size\":\"25\""));
        assert!(e.contains("obs_size 25 does not match"), "{e}");
        let e = err(&edit("\"actions\":\"9\"", "\"actions\":\"7\""));
        assert!(e.contains("actions = 7"), "{e}");
        let e = err(&edit("ferry-tmo-policy", "ferry-mess-state"));
        assert!(e.contains("format"), "{e}");
        let e = err(&edit(
            "\"device\":\"jetson-tx2\"",
            "\"device\":\"jetson-tx9\"",
        ));
        assert!(e.contains("unknown device"), "{e}");
        // A plain policy's tensors under a constrained header: shapes do not fit.
        let plain = PlacementPolicy::init(meta(Variant::Plain), &mut seeded(2)).unwrap();
        let plain_bytes = plain.to_bytes().unwrap();
        let st = SafeTensors::deserialize(&plain_bytes).unwrap();
        let tensors: Vec<(String, Tensor)> = st
            .tensors()
            .into_iter()
            .map(|(k, v)| {
                let t = Tensor::from_raw_buffer(v.data(), DType::F32, v.shape(), &Device::Cpu);
                (k, t.unwrap())
            })
            .collect();
        let header = SafeTensors::read_metadata(&good).unwrap().1;
        let swapped =
            safetensors::tensor::serialize(tensors.clone(), header.metadata().clone()).unwrap();
        let e = err(&swapped);
        assert!(e.contains("actor.0.weight") && e.contains("[8, 27]"), "{e}");
        // A missing tensor.
        let fewer = safetensors::tensor::serialize(
            tensors.into_iter().filter(|(k, _)| k != "critic.2.bias"),
            SafeTensors::read_metadata(&plain_bytes)
                .unwrap()
                .1
                .metadata()
                .clone(),
        )
        .unwrap();
        assert!(err(&fewer).contains("tensor `critic.2.bias` missing"));
        // Another program's safetensors without our header.
        let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let other = safetensors::tensor::serialize([("w", t)], None).unwrap();
        assert!(err(&other).contains("no metadata header"));
        // A mismatched environment.
        let cfg = EnvConfig {
            costs: CostModel::by_name("jetson-orin-nx", "wired").unwrap(),
            ..EnvConfig::default()
        };
        assert!(p
            .check_env(&cfg)
            .unwrap_err()
            .to_string()
            .contains("trained for"));
        assert!(p.check_env(&EnvConfig::default()).is_ok());
    }
}
