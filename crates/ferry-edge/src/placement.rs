//! TMO placement in ferryd: for each request, a trained policy (`ferry policy train`) decides
//! whether it runs locally or in the cloud and which images go with it; the router then picks the
//! model within the chosen tier.
//!
//! The policy sees the live dialogue as it saw the simulated one (`ferry_router::tmo`'s
//! `DialogueState`): the previous placements and views of this `dialogue_id`, the turn's task
//! category (`GenerateRequest.task`, or `placement.default_task`), and the budgets left after the
//! latency and dollars this dialogue really spent. Requests without a `dialogue_id` are
//! one-turn dialogues.
//!
//! A cloud action offloads the request to the cloud tier (`[cloud]` endpoints) with the images
//! of the chosen views: view `i` is the request's `i`-th image. Without a cloud tier, a cloud
//! action is reported in the completion (`fallback: true`, the reason names the action) and the
//! request runs locally; so does an offload that fails before its first token. The dialogue
//! records what actually ran, so the budgets and the history stay true. The policy file is read
//! at start (a malformed file or one for another observation/action layout stops the daemon with
//! the reason) and again on SIGHUP (a bad file then keeps the running policy).
//!
//! The budget mask of a constrained policy judges the next call by what calls of its kind really
//! cost here (`ferry_router::tmo::LiveCosts`: the dearest of the recent ones plus their spread,
//! the profile until one is measured), not by the profile the policy was trained on; a local run is booked at its
//! measured energy times `placement.usd_per_kwh`. When those live prices rule out the call the
//! policy would have made at its profile's prices, the reason says so.
//!
//! The file is `ferry policy train`'s safetensors, or (`placement.policy_format =
//! "torchscript"`, or a `.pt`/`.pth`/`.ts` name) a TorchScript module exported from PyTorch,
//! which needs ferryd built with the `torch` feature (refused with that reason otherwise).

use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use ferry_core::{Error, Result};
use ferry_router::tmo::{Action, DialogueState, LiveCosts, PolicyFormat, Serve, ServedPolicy};

/// `[placement]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// A policy written by `ferry policy train`; unset: every request is placed locally.
    pub policy_file: Option<PathBuf>,
    /// `safetensors` or `torchscript` (needs the `torch` feature); unset: by the file's
    /// extension (`.pt`, `.pth`, `.ts`, `.jit`, `.torchscript` are TorchScript).
    pub policy_format: Option<PolicyFormat>,
    /// Budgets per dialogue; unset: the ones the policy was trained for (30 s, $0.05).
    pub latency_budget_s: Option<f64>,
    pub usd_budget: Option<f64>,
    /// Task category of requests that name none; unset: the policy's first task.
    pub default_task: Option<String>,
    /// Dialogues remembered (least recently used are forgotten); 0 means 10 000.
    pub max_dialogues: usize,
    /// Electricity price that books a local run's measured energy in dollars; unset: the
    /// profiles' 16.68 ¢/kWh.
    pub usd_per_kwh: Option<f64>,
}

impl PlacementConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<()> {
        let ok = |x: Option<f64>| x.is_none_or(|v| v.is_finite() && v >= 0.0);
        for (field, v) in [
            ("placement.latency_budget_s", self.latency_budget_s),
            ("placement.usd_budget", self.usd_budget),
            ("placement.usd_per_kwh", self.usd_per_kwh),
        ] {
            if !ok(v) {
                return Err(Error::invalid(field, "must be finite and >= 0"));
            }
        }
        Ok(())
    }

    /// Dollars a local run that used `joules` costs.
    pub fn local_usd(&self, joules: f64) -> f64 {
        let per_kwh = self
            .usd_per_kwh
            .unwrap_or(ferry_router::tmo::profiles::CENTS_PER_KWH / 100.0);
        if joules.is_finite() && joules > 0.0 {
            joules * per_kwh / 3.6e6
        } else {
            0.0
        }
    }
}

/// A placement decision for one request.
#[derive(Debug, Clone)]
pub struct Placement {
    /// What the policy chose.
    pub chosen: Action,
    /// What is attempted: the chosen action, or local when there is no cloud tier.
    pub executed: Action,
    pub task: usize,
    pub dialogue_id: Option<String>,
    /// For the completion's placement reason.
    pub reason: String,
    /// True when the chosen placement could not be honoured.
    pub fallback: bool,
}

struct Dialogues {
    states: HashMap<String, DialogueState>,
    order: VecDeque<String>,
}

/// The loaded policy and the live dialogues.
pub struct Placer {
    cfg: PlacementConfig,
    path: PathBuf,
    format: PolicyFormat,
    policy: RwLock<Arc<ServedPolicy>>,
    dialogues: Mutex<Dialogues>,
    /// What calls cost here, by kind (seeded from the running policy's profile).
    live: Mutex<LiveCosts>,
}

fn load_policy(path: &Path, format: PolicyFormat) -> Result<ServedPolicy> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(Error::io(
            format!("reading placement policy {}", path.display()),
            e,
        ));
    }
    ServedPolicy::load(path, format).map_err(|e| Error::InvalidFile {
        what: "placement policy",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The chosen views as words, e.g. "views [0,2]" or "text only".
pub fn views(a: Action) -> String {
    let v: Vec<String> = (0..3)
        .filter(|&i| a.sends(i))
        .map(|i| i.to_string())
        .collect();
    if v.is_empty() {
        "text only".to_string()
    } else {
        format!("views [{}]", v.join(","))
    }
}

impl Placer {
    /// Loads the policy named by `cfg.policy_file`; `None` when placement is not configured.
    pub fn from_config(cfg: &PlacementConfig) -> Result<Option<Self>> {
        let Some(path) = &cfg.policy_file else {
            return Ok(None);
        };
        let format = cfg
            .policy_format
            .unwrap_or_else(|| PolicyFormat::from_path(path));
        let policy = load_policy(path, format)?;
        let live = Mutex::new(LiveCosts::new(policy.costs()));
        let placer = Placer {
            cfg: cfg.clone(),
            path: path.clone(),
            format,
            live,
            policy: RwLock::new(Arc::new(policy)),
            dialogues: Mutex::new(Dialogues {
                states: HashMap::new(),
                order: VecDeque::new(),
            }),
        };
        placer.check_default_task(&placer.policy())?;
        tracing::info!(
            path = %path.display(),
            %format,
            method = %placer.policy().meta().method(),
            tasks = ?placer.policy().meta().tasks,
            "placement policy loaded"
        );
        Ok(Some(placer))
    }

    fn check_default_task(&self, p: &ServedPolicy) -> Result<()> {
        if let Some(t) = &self.cfg.default_task {
            if !p.meta().tasks.iter().any(|x| x == t) {
                return Err(Error::invalid(
                    "placement.default_task",
                    format!(
                        "`{t}` is not one of the policy's tasks {:?}",
                        p.meta().tasks
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The running policy.
    pub fn policy(&self) -> Arc<ServedPolicy> {
        self.policy.read().clone()
    }

    /// Re-reads the policy file (SIGHUP). On error the running policy stays.
    pub fn reload(&self) -> Result<String> {
        let p = load_policy(&self.path, self.format)?;
        self.check_default_task(&p)?;
        let method = p.meta().method();
        // A policy for another profile starts from that profile; the same profile keeps what
        // was measured.
        if p.costs() != self.policy().costs() {
            *self.live.lock() = LiveCosts::new(p.costs());
        }
        *self.policy.write() = Arc::new(p);
        tracing::info!(path = %self.path.display(), %method, "placement policy reloaded");
        Ok(method)
    }

    fn budgets(&self, p: &ServedPolicy) -> (f64, f64) {
        (
            self.cfg
                .latency_budget_s
                .unwrap_or(p.meta().latency_budget_s),
            self.cfg.usd_budget.unwrap_or(p.meta().usd_budget),
        )
    }

    /// Places one request of `dialogue_id` with task category `task`; `cloud_tier` says whether
    /// a cloud tier is configured.
    pub fn decide(
        &self,
        dialogue_id: Option<&str>,
        task: Option<&str>,
        cloud_tier: bool,
    ) -> Result<Placement> {
        let p = self.policy();
        let tasks = &p.meta().tasks;
        let name = task
            .or(self.cfg.default_task.as_deref())
            .unwrap_or_else(|| tasks.first().map(String::as_str).unwrap_or(""));
        let task = tasks.iter().position(|t| t == name).ok_or_else(|| {
            Error::invalid(
                "task",
                format!("`{name}` is not a task of the placement policy; one of {tasks:?}"),
            )
        })?;
        let (latency, usd) = self.budgets(&p);
        let obs = match dialogue_id {
            Some(id) => {
                let d = self.dialogues.lock();
                d.states
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| DialogueState::new(latency, usd))
                    .observe(task)
            }
            None => DialogueState::new(latency, usd).observe(task),
        };
        let prices = self.live.lock().prices();
        let mask = p.mask_at(&obs, &prices);
        let chosen = p.act_masked(&obs, &mask);
        // The call the policy makes at its profile's prices, which these live ones ruled out.
        let ruled_out = Some(p.act(&obs)).filter(|a| !mask[a.index()]);
        let method = p.meta().method();
        let local = Action::from_index(0).expect("action 0 exists");
        let (executed, fallback, reason) = if chosen.is_local() {
            let why = match ruled_out {
                Some(a) => format!(
                    "; the budget mask forced it: cloud with {} costs about {:.1} s and ${:.4} \
                     here, with {:.1} s and ${:.4} left",
                    views(a),
                    prices.latency_s(a),
                    prices.usd(a),
                    obs.remaining_latency_s,
                    obs.remaining_usd
                ),
                None => String::new(),
            };
            (
                local,
                false,
                format!(
                    "tmo {method}: local (task {name}, turn {}){why}",
                    obs.turn + 1
                ),
            )
        } else if cloud_tier {
            (
                chosen,
                false,
                format!(
                    "tmo {method}: cloud with {} (task {name}, turn {})",
                    views(chosen),
                    obs.turn + 1
                ),
            )
        } else {
            (
                local,
                true,
                format!(
                    "tmo {method} chose cloud with {} (task {name}, turn {}); no cloud tier is configured, so it ran locally",
                    views(chosen),
                    obs.turn + 1
                ),
            )
        };
        if fallback {
            metrics::counter!("ferry_fallbacks_total", "from_tier" => "cloud", "reason" => "cloud_unavailable")
                .increment(1);
        }
        metrics::counter!("ferry_placements_total", "chosen" => if chosen.is_local() { "local" } else { "cloud" })
            .increment(1);
        Ok(Placement {
            chosen,
            executed,
            task,
            dialogue_id: dialogue_id.map(str::to_string),
            reason,
            fallback,
        })
    }

    /// Books what a placed request really ran (`executed`: the placement's action, or local
    /// after a fallback) and spent, so the dialogue's next turn and the live prices see it.
    pub fn record(&self, placement: &Placement, executed: Action, latency_s: f64, usd: f64) {
        self.live.lock().observe(executed, latency_s, usd);
        let Some(id) = &placement.dialogue_id else {
            return;
        };
        let p = self.policy();
        let (latency, budget_usd) = self.budgets(&p);
        let max = if self.cfg.max_dialogues == 0 {
            10_000
        } else {
            self.cfg.max_dialogues
        };
        let mut d = self.dialogues.lock();
        if !d.states.contains_key(id) {
            d.order.push_back(id.clone());
        }
        d.states
            .entry(id.clone())
            .or_insert_with(|| DialogueState::new(latency, budget_usd))
            .record(placement.task, executed, latency_s, usd);
        while d.order.len() > max {
            if let Some(old) = d.order.pop_front() {
                d.states.remove(&old);
            }
        }
    }

    /// Books a local run that used `joules` (none measured: free), at `placement.usd_per_kwh`.
    pub fn record_local(&self, placement: &Placement, latency_s: f64, joules: Option<f64>) {
        let usd = joules.map_or(0.0, |j| self.cfg.local_usd(j));
        self.record(placement, Action::LOCAL, latency_s, usd);
    }

    /// Seconds and dollars a dialogue has spent, and its budgets (for tests and status).
    pub fn spent(&self, dialogue_id: &str) -> Option<((f64, f64), (f64, f64))> {
        let d = self.dialogues.lock();
        d.states.get(dialogue_id).map(|s| (s.spent(), s.budgets()))
    }

    /// The prices the budget mask judges the next call by.
    pub fn live_prices(&self) -> ferry_router::tmo::CallPrices {
        self.live.lock().prices()
    }

    /// Turns taken so far in a dialogue (for tests and status).
    pub fn turns(&self, dialogue_id: &str) -> usize {
        self.dialogues
            .lock()
            .states
            .get(dialogue_id)
            .map(|s| s.observe(0).turn)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_runs_are_priced_by_their_energy_and_bad_prices_are_refused() {
        let c = PlacementConfig::default();
        // 3.6 MJ is one kWh at the profiles' 16.68 ¢.
        assert!((c.local_usd(3.6e6) - 0.1668).abs() < 1e-12);
        assert_eq!(c.local_usd(f64::NAN), 0.0);
        let c = PlacementConfig {
            usd_per_kwh: Some(0.30),
            ..Default::default()
        };
        assert!((c.local_usd(36.0) - 3e-6).abs() < 1e-15);
        assert!(c.validate().is_ok());
        for bad in [-0.1, f64::NAN, f64::INFINITY] {
            let c = PlacementConfig {
                usd_per_kwh: Some(bad),
                ..Default::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("placement.usd_per_kwh"), "{e}");
        }
        let c = PlacementConfig {
            latency_budget_s: Some(-1.0),
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn torchscript_is_chosen_by_extension_or_key_and_needs_the_torch_feature() {
        let dir = tempfile::tempdir().unwrap();
        let pt = dir.path().join("policy.pt");
        let bin = dir.path().join("policy.bin");
        for f in [&pt, &bin] {
            std::fs::write(f, b"not a policy").unwrap();
        }
        let err = |cfg: PlacementConfig| match Placer::from_config(&cfg) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        };
        let by_ext = err(PlacementConfig {
            policy_file: Some(pt),
            ..Default::default()
        });
        let by_key = err(PlacementConfig {
            policy_file: Some(bin.clone()),
            policy_format: Some(PolicyFormat::Torchscript),
            ..Default::default()
        });
        for e in [by_ext, by_key] {
            if ferry_router::tmo::TORCHSCRIPT_SUPPORTED {
                assert!(e.contains("not a TorchScript module"), "{e}");
            } else {
                assert!(e.contains("`torch` feature"), "{e}");
            }
        }
        let e = err(PlacementConfig {
            policy_file: Some(bin),
            ..Default::default()
        });
        assert!(e.contains("not a safetensors file"), "{e}");
    }
}
