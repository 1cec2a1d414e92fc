//! The zoo router for `model: "auto"`: picks which model of a tier's zoo answers each request,
//! learns from the cost each model really had (joules locally, the cloud's own unit there) and
//! from the `Feedback` apps send, and keeps what it learned across restarts.
//!
//! The policies are pure and seeded in `ferry_router`: `mixrank` (the default) or the paper's
//! MESS+ (`mess-plus`, `mess-plus-fb`). This module owns what a daemon adds around them: the
//! sentence encoder that turns the question into features, the requests waiting for feedback,
//! the call-mix statistics for `Status`, and the state file.
//!
//! Live semantics (a replay has labels already; a daemon learns them late or never):
//! - mixrank: a request may try a model whose rate is still uncertain only when it can get
//!   feedback, which the app says with `expect_feedback` (or `router.feedback_share` of the
//!   other requests is assumed to). Costs are booked when the request finishes; the label, when
//!   feedback arrives, moves the SLA debt and the model's rate. Without feedback nothing moves.
//! - MESS+: when a request finishes, the costs of the models that ran are booked and `Q` moves
//!   by the satisfaction the predictor expected; when feedback arrives, `Q_tracked` (which
//!   decisions use) moves by the real label and the predictor trains. Its exploration runs the
//!   whole zoo, whether or not feedback will come.
//!
//! Only the first feedback on a request teaches the policy; a replacement is recorded, not
//! learned twice.
//!
//! State file: `<state.dir>/router-<tier>.json`, written atomically (temporary file, fsync,
//! rename, fsync of the directory) at most every `save_interval_ms` and on shutdown, so a
//! `kill -9` loses at most one interval of learning. A file that cannot be read as this version's
//! state is renamed aside (`.corrupt-<unix ms>`) with a warning and learning restarts; one written
//! for another zoo or encoder is renamed aside as `.stale-<unix ms>`. Neither stops the daemon.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use ferry_core::{Error, Result};
use ferry_engine::encoder::SentenceEncoder;
use ferry_router::mess::{MessPlus, MessPlusConfig, MessPlusSnapshot};
use ferry_router::mixrank::prior::DifficultyPrior;
use ferry_router::mixrank::{MixRank, MixRankConfig, MixRankSnapshot, ModelEstimate, Ticket};
use ferry_router::predictor::{MlpPredictor, MlpSnapshot, SgdConfig};
use ferry_router::{Decision, RouteRequest, ZooPolicy};

use crate::config::RouterConfig;
use crate::records::unix_ms;

/// Version of the state file layout; a file of another version is set aside.
pub const STATE_VERSION: u32 = 2;
const STATE_FORMAT: &str = "ferry-router-state";

/// Call mix and feedback counts since the state was created.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouterStats {
    /// Requests served by each zoo model (exploration steps count for the model that served).
    pub calls: Vec<u64>,
    /// Feedback received on routed requests, and how much of it said "satisfied".
    pub feedback: u64,
    pub satisfied: u64,
    /// Answers the judge graded (every model's, on a MESS+ exploration step), and how many it
    /// found satisfying: labels of the judge, not of the apps.
    #[serde(default)]
    pub judge_verdicts: u64,
    #[serde(default)]
    pub judge_satisfied: u64,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: String,
    version: u32,
    tier: String,
    policy: String,
    zoo: Vec<String>,
    encoder: String,
    saved_unix_ms: u64,
    /// The policy's learned state; which one matches `policy`.
    #[serde(default)]
    mess: Option<MessSaved>,
    #[serde(default)]
    mixrank: Option<MixRankSnapshot>,
    /// Version of the difficulty prior the state was learned with (0: none).
    #[serde(default)]
    prior: String,
    stats: RouterStats,
}

#[derive(Serialize, Deserialize)]
struct MessSaved {
    mess: MessPlusSnapshot,
    predictor: MlpSnapshot,
}

/// The policy a router runs.
enum Live {
    Mess(Box<MessPlus<MlpPredictor>>),
    MixRank(Box<MixRank>),
}

impl Live {
    fn family(policy: &str) -> &'static str {
        if policy == "mixrank" {
            "mixrank"
        } else {
            "mess-plus"
        }
    }

    fn t(&self) -> u64 {
        match self {
            Live::Mess(m) => m.t(),
            Live::MixRank(m) => m.t(),
        }
    }
}

/// A routed request: what the policy decided and why.
#[derive(Debug, Clone)]
pub struct Routed {
    pub decision: Decision,
    /// Index of the serving model in the zoo.
    pub served: usize,
    /// Id of the serving model.
    pub model: String,
    /// The predictor's satisfaction estimate for the served model (none when exploring).
    pub predicted: Option<f64>,
    /// The request's features, kept until its feedback arrives.
    pub features: Arc<Vec<f32>>,
    /// One line for the completion's placement reason.
    pub reason: String,
    /// Time spent embedding and deciding.
    pub route_ms: f64,
    /// The judge grades this request's answers (see `router.judge`).
    pub judge: bool,
    /// Zoo models that run beside the served one after the answer, only to be learned from
    /// (every other model on a MESS+ exploration step; one cheaper model on a mixrank shadow).
    pub also: Vec<usize>,
}

struct Pending {
    features: Arc<Vec<f32>>,
    decision: Decision,
    /// What mixrank learns the label against.
    ticket: Option<Ticket>,
    judged: bool,
}

struct Inner {
    policy: Live,
    stats: RouterStats,
    pending: HashMap<String, Pending>,
    order: VecDeque<String>,
    saved_unix_ms: Option<u64>,
}

/// What `Status` shows of a router.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterStatus {
    pub tier: String,
    pub policy: String,
    pub alpha: f64,
    /// MESS+ only: cost weight and its two virtual queues.
    pub v: f64,
    pub q: f64,
    pub q_tracked: f64,
    /// mixrank only: the SLA debt (requests; negative is surplus), each model's rate with its
    /// 95 % interval, and the difficulty prior (`trained_on` list) in use.
    pub debt: f64,
    pub estimates: Vec<Option<ModelEstimate>>,
    pub prior: Option<String>,
    pub requests: u64,
    pub explored: u64,
    pub exploration_probability: f64,
    pub zoo: Vec<String>,
    pub calls: Vec<u64>,
    /// Mean measured joules of each model (`None` before its first run).
    pub mean_cost_joules: Vec<Option<f64>>,
    pub feedback: u64,
    pub satisfied: u64,
    /// The judge's model (none: no judge) and its verdicts so far.
    pub judge_model: Option<String>,
    pub judge_verdicts: u64,
    pub judge_satisfied: u64,
    pub state_file: PathBuf,
    pub saved_unix_ms: Option<u64>,
}

/// A routing policy over one tier's zoo, ordered by ascending cost (the last model is the most
/// capable).
pub struct ZooRouter {
    tier: String,
    policy: String,
    prior: Option<DifficultyPrior>,
    zoo: Vec<String>,
    /// The encoder's embedding space (`ModelManifest::embedding_space`): saved state and a
    /// prior must have been made in it.
    encoder_id: String,
    encoder: Arc<SentenceEncoder>,
    cfg: RouterConfig,
    path: PathBuf,
    max_pending: usize,
    dirty: AtomicBool,
    inner: Mutex<Inner>,
}

fn fresh_policy(
    cfg: &RouterConfig,
    zoo: usize,
    dim: usize,
    prior: Option<&DifficultyPrior>,
) -> Result<Live> {
    let router_err = |e: ferry_router::RouterError| Error::invalid("router", e.to_string());
    if cfg.policy == "mixrank" {
        let policy = MixRank::new(
            MixRankConfig::new(cfg.alpha, cfg.seed),
            zoo,
            dim,
            prior.cloned(),
        )
        .map_err(router_err)?;
        return Ok(Live::MixRank(Box::new(policy)));
    }
    // Hidden width = input width, as in the MESS+ reference head.
    let predictor =
        MlpPredictor::new(dim, dim, zoo, SgdConfig::default(), cfg.seed).map_err(router_err)?;
    let mess = MessPlus::new(
        MessPlusConfig {
            alpha: cfg.alpha,
            v: cfg.v_per_joule,
            c: cfg.c,
            seed: cfg.seed,
            train_on_feedback: cfg.policy == "mess-plus-fb",
        },
        zoo,
        predictor,
    )
    .map_err(router_err)?;
    Ok(Live::Mess(Box::new(mess)))
}

/// Reads `router.prior` for the router's encoder `encoder_id`.
pub fn load_prior(path: &Path, encoder_id: &str) -> Result<DifficultyPrior> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading router.prior {}", path.display()), e))?;
    DifficultyPrior::from_json_for(&text, encoder_id)
        .map_err(|e| Error::invalid("router.prior", format!("{}: {e}", path.display())))
}

fn prior_label(prior: Option<&DifficultyPrior>) -> String {
    prior.map_or_else(String::new, |p| {
        format!(
            "{} v{} trained on {}",
            p.format,
            p.version,
            p.trained_on.join(",")
        )
    })
}

/// Renames a state file out of the way; returns the new path.
fn set_aside(path: &Path, why: &str) -> Option<PathBuf> {
    let aside = path.with_extension(format!("json.{why}-{}", unix_ms()));
    match std::fs::rename(path, &aside) {
        Ok(()) => Some(aside),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not set the state file aside");
            None
        }
    }
}

impl ZooRouter {
    /// A router for `zoo` (ascending cost), restoring `<state_dir>/router-<tier>.json` when it
    /// holds state for the same zoo and encoder.
    pub fn new(
        tier: &str,
        zoo: Vec<String>,
        encoder_id: &str,
        encoder: Arc<SentenceEncoder>,
        cfg: &RouterConfig,
        state_dir: &Path,
        max_pending: usize,
    ) -> Result<Self> {
        if zoo.is_empty() {
            return Err(Error::invalid("router", "the zoo is empty"));
        }
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("creating state dir {}", state_dir.display()), e))?;
        let path = state_dir.join(format!("router-{tier}.json"));
        let prior = match (&cfg.prior, cfg.policy.as_str()) {
            (Some(p), "mixrank") => Some(load_prior(p, encoder_id)?),
            _ => None,
        };
        let mut policy = fresh_policy(cfg, zoo.len(), encoder.dim(), prior.as_ref())?;
        let mut stats = RouterStats {
            calls: vec![0; zoo.len()],
            ..RouterStats::default()
        };
        let mut saved_unix_ms = None;
        match std::fs::read(&path) {
            Ok(bytes) => match Self::parse_state(
                &bytes,
                tier,
                &zoo,
                encoder_id,
                cfg,
                &prior_label(prior.as_ref()),
                &mut policy,
            ) {
                Ok((s, saved)) => {
                    tracing::info!(
                        path = %path.display(),
                        requests = policy.t(),
                        "router state restored"
                    );
                    stats = s;
                    saved_unix_ms = Some(saved);
                }
                Err((kind, why)) => {
                    let aside = set_aside(&path, kind);
                    tracing::warn!(
                        path = %path.display(),
                        set_aside = ?aside,
                        reason = %why,
                        "router state not usable; learning restarts"
                    );
                    policy = fresh_policy(cfg, zoo.len(), encoder.dim(), prior.as_ref())?;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        }
        Ok(ZooRouter {
            tier: tier.to_string(),
            policy: cfg.policy.clone(),
            prior,
            zoo,
            encoder_id: encoder_id.to_string(),
            encoder,
            cfg: cfg.clone(),
            path,
            max_pending: max_pending.max(1),
            dirty: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                policy,
                stats,
                pending: HashMap::new(),
                order: VecDeque::new(),
                saved_unix_ms,
            }),
        })
    }

    /// Reads a state file into `mess`; on failure says whether it is corrupt or stale.
    fn parse_state(
        bytes: &[u8],
        tier: &str,
        zoo: &[String],
        encoder_id: &str,
        cfg: &RouterConfig,
        prior: &str,
        policy: &mut Live,
    ) -> std::result::Result<(RouterStats, u64), (&'static str, String)> {
        let file: StateFile =
            serde_json::from_slice(bytes).map_err(|e| ("corrupt", e.to_string()))?;
        if file.format != STATE_FORMAT || file.version != STATE_VERSION {
            return Err((
                "corrupt",
                format!(
                    "{} version {}, expected {STATE_FORMAT} version {STATE_VERSION}",
                    file.format, file.version
                ),
            ));
        }
        if file.tier != tier || file.zoo != zoo || file.encoder != encoder_id {
            return Err((
                "stale",
                format!(
                    "saved for tier {} zoo {:?} encoder {}; now tier {tier} zoo {zoo:?} encoder {encoder_id}",
                    file.tier, file.zoo, file.encoder
                ),
            ));
        }
        if Live::family(&file.policy) != Live::family(&cfg.policy) || file.prior != prior {
            return Err((
                "stale",
                format!(
                    "learned by {} with prior [{}]; now {} with prior [{prior}]",
                    file.policy, file.prior, cfg.policy
                ),
            ));
        }
        if file.policy != cfg.policy {
            tracing::info!(saved = %file.policy, now = %cfg.policy, "router policy changed; keeping what was learned");
        }
        if file.stats.calls.len() != zoo.len() || file.stats.satisfied > file.stats.feedback {
            return Err(("corrupt", "call statistics do not fit the zoo".into()));
        }
        let missing = || ("corrupt", format!("no state for policy {}", file.policy));
        match policy {
            Live::Mess(mess) => {
                let saved = file.mess.as_ref().ok_or_else(missing)?;
                mess.restore(&saved.mess)
                    .map_err(|e| ("corrupt", e.to_string()))?;
                mess.predictor_mut()
                    .restore(&saved.predictor)
                    .map_err(|e| ("corrupt", e.to_string()))?;
            }
            Live::MixRank(m) => {
                let saved = file.mixrank.as_ref().ok_or_else(missing)?;
                m.restore(saved).map_err(|e| ("corrupt", e.to_string()))?;
            }
        }
        Ok((file.stats, file.saved_unix_ms))
    }

    /// The zoo, ascending cost.
    pub fn zoo(&self) -> &[String] {
        &self.zoo
    }

    /// Chooses the model for a question (blocking: embeds the text on this thread). From here
    /// on the request waits for feedback, which may arrive before [`ZooRouter::finished`]
    /// (a MESS+ exploration step finishes only after the rest of the zoo ran).
    /// `expect_feedback`: the app said it will send Feedback on this request.
    /// `task` is the request's task (its `task` field), for mixrank's per-task rates.
    pub fn route(
        &self,
        request_id: &str,
        question: &str,
        task: Option<&str>,
        expect_feedback: bool,
    ) -> Result<Routed> {
        let started = Instant::now();
        // The judge grades a share of the requests no app said it will send Feedback on, fixed
        // by the request id (a retry stays in or out) with a coin of its own.
        // A MESS+ exploration step, where every model answers, is graded whole (below).
        let mut judge = self.cfg.judge.model.is_some()
            && !expect_feedback
            && share_coin(request_id, self.cfg.seed ^ JUDGE_SALT) < self.cfg.judge.share;
        let features = self
            .encoder
            .embed(&[question])?
            .pop()
            .ok_or_else(|| Error::Engine("the encoder returned no embedding".into()))?;
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let (decision, predicted, ticket, reason) = match &mut inner.policy {
            Live::Mess(mess) => {
                let p = mess.exploration_probability();
                let (decision, s_hat) = mess.decide_scored(&features);
                judge |= self.cfg.judge.model.is_some() && decision == Decision::Explore;
                let q = mess.q_tracked();
                let served = decision.served(self.zoo.len());
                let predicted = s_hat.get(served).copied();
                let reason = match decision {
                    Decision::Explore => format!(
                        "{} explore (p={p:.3}): every {} model runs, the most capable serves",
                        self.policy, self.tier
                    ),
                    Decision::Serve(_) | Decision::Shadow { .. } => format!(
                        "{} argmin V*E+Q*(alpha-s): predicted satisfaction {:.2}, Q {q:.2}, alpha {}",
                        self.policy,
                        predicted.unwrap_or(f64::NAN),
                        self.cfg.alpha
                    ),
                };
                (decision, predicted, None, reason)
            }
            Live::MixRank(m) => {
                // A share of the requests that did not say so may still be explored: apps that
                // send Feedback without setting expect_feedback.
                let share = self.cfg.feedback_share;
                let feedback_expected = expect_feedback
                    || judge
                    || (share > 0.0 && share_coin(request_id, self.cfg.seed) < share);
                let r = m.route(&RouteRequest {
                    features: &features,
                    task,
                    feedback_expected,
                    label_unserved: judge,
                    text_chars: Some(question.chars().count()),
                });
                let predicted = r.predicted.get(r.model).copied();
                let why = if r.probe {
                    "first run, to learn its cost".to_string()
                } else if r.explored {
                    "tried while its rate is uncertain".to_string()
                } else {
                    format!(
                        "predicted satisfaction {:.2}",
                        predicted.unwrap_or(f64::NAN)
                    )
                };
                let also = r.shadow.map_or(String::new(), |m| {
                    format!(
                        "; {} also runs, for the judge, to learn its rate",
                        self.zoo[m]
                    )
                });
                let reason = format!(
                    "mixrank: {why}, SLA debt {:.1}, alpha {}{also}",
                    r.debt, self.cfg.alpha
                );
                let decision = match r.shadow {
                    Some(learn) => Decision::Shadow {
                        serve: r.model,
                        learn,
                    },
                    None => Decision::Serve(r.model),
                };
                (decision, predicted, Some(r.ticket), reason)
            }
        };
        // The encoder already hands out a shared vector (also its cache entry): keep that.
        self.remember(inner, request_id, features.clone(), decision, ticket);
        drop(guard);
        self.dirty.store(true, Ordering::Release);
        let served = decision.served(self.zoo.len());
        Ok(Routed {
            decision,
            served,
            model: self.zoo[served].clone(),
            predicted,
            features,
            reason,
            route_ms: started.elapsed().as_secs_f64() * 1e3,
            judge,
            also: decision.also_runs(self.zoo.len()),
        })
    }

    /// Books a finished routed request: the joules of each zoo model that ran (zoo order),
    /// `Q`'s move by the predicted satisfaction, and the call.
    pub fn finished(&self, routed: &Routed, joules: &[Option<f64>]) {
        let mut inner = self.inner.lock();
        match &mut inner.policy {
            Live::Mess(mess) => {
                mess.record_costs(joules);
                mess.record_unjudged(routed.predicted);
            }
            Live::MixRank(m) => {
                for (model, cost) in joules.iter().enumerate() {
                    if let Some(c) = cost {
                        m.record_cost(model, *c);
                    }
                }
            }
        }
        if let Some(c) = inner.stats.calls.get_mut(routed.served) {
            *c += 1;
        }
        drop(inner);
        self.dirty.store(true, Ordering::Release);
    }

    fn remember(
        &self,
        inner: &mut Inner,
        request_id: &str,
        features: Arc<Vec<f32>>,
        decision: Decision,
        ticket: Option<Ticket>,
    ) {
        let fresh = Pending {
            features,
            decision,
            ticket,
            judged: false,
        };
        if inner
            .pending
            .insert(request_id.to_string(), fresh)
            .is_none()
        {
            inner.order.push_back(request_id.to_string());
        }
        while inner.order.len() > self.max_pending {
            if let Some(old) = inner.order.pop_front() {
                inner.pending.remove(&old);
            }
        }
    }

    /// Feedback on a request; true when the policy learned from it (a routed request still
    /// remembered, judged for the first time).
    pub fn feedback(&self, request_id: &str, satisfied: bool) -> bool {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let Some(p) = inner.pending.get_mut(request_id) else {
            return false;
        };
        if p.judged {
            return false;
        }
        p.judged = true;
        match &mut inner.policy {
            Live::Mess(mess) => mess.record_feedback(&p.features, p.decision, satisfied),
            Live::MixRank(m) => {
                if let Some(t) = &p.ticket {
                    m.record_feedback(t, satisfied);
                }
            }
        }
        inner.stats.feedback += 1;
        inner.stats.satisfied += u64::from(satisfied);
        drop(guard);
        self.dirty.store(true, Ordering::Release);
        true
    }

    /// The judge's grades of a request's answers (zoo order, `None` where a model did not run
    /// or the judge gave no verdict); true when the policy learned from them. Like Feedback,
    /// only a request with no label yet teaches: mixrank learns the served answer's grade (and
    /// a shadow model's, whoever labelled the served one), MESS+ every grade of an exploration
    /// step. Counted apart from the apps' feedback.
    pub fn judge_labels(&self, request_id: &str, labels: &[Option<bool>]) -> bool {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let verdicts = labels.iter().flatten().count() as u64;
        let yes = labels.iter().flatten().filter(|s| **s).count() as u64;
        inner.stats.judge_verdicts += verdicts;
        inner.stats.judge_satisfied += yes;
        let served_label = |d: Decision| labels.get(d.served(self.zoo.len())).copied().flatten();
        let learned = match inner.pending.get_mut(request_id) {
            Some(p) if verdicts > 0 => match &mut inner.policy {
                Live::Mess(mess) if !p.judged => {
                    p.judged = true;
                    mess.record_labels(&p.features, p.decision, labels);
                    true
                }
                // The app's feedback on the served answer came first: it keeps that answer's
                // label, the judge's grades of the others still train the predictor.
                Live::Mess(mess) if p.decision == Decision::Explore => {
                    let mut others = labels.to_vec();
                    if let Some(l) = others.get_mut(p.decision.served(self.zoo.len())) {
                        *l = None;
                    }
                    let any = others.iter().any(Option::is_some);
                    if any {
                        mess.record_labels(&p.features, p.decision, &others);
                    }
                    any
                }
                Live::Mess(_) => false,
                Live::MixRank(m) => match p.ticket.clone() {
                    None => false,
                    Some(t) => {
                        // A shadow's grade teaches its model's rate whoever labelled the served
                        // answer (the app's Feedback may have come first).
                        let mut learned = false;
                        if let Decision::Shadow { learn, .. } = p.decision {
                            if let Some(Some(s)) = labels.get(learn) {
                                let mut shadow = t.clone();
                                shadow.model = learn;
                                m.record_label(&shadow, *s, false);
                                learned = true;
                            }
                        }
                        if let (false, Some(s)) = (p.judged, served_label(p.decision)) {
                            p.judged = true;
                            m.record_feedback(&t, s);
                            learned = true;
                        }
                        learned
                    }
                },
            },
            _ => false,
        };
        drop(guard);
        self.dirty.store(true, Ordering::Release);
        learned
    }

    /// Forgets a routed request that its tier never served (it fell back to another tier, or
    /// the app left before an answer), so its feedback teaches this router nothing.
    pub fn abandon(&self, request_id: &str) {
        let mut inner = self.inner.lock();
        if inner.pending.remove(request_id).is_some() {
            inner.order.retain(|id| id != request_id);
        }
    }

    /// What `Status` shows.
    pub fn status(&self) -> RouterStatus {
        let inner = self.inner.lock();
        let n = self.zoo.len();
        let mut st = RouterStatus {
            tier: self.tier.clone(),
            policy: self.policy.clone(),
            alpha: self.cfg.alpha,
            v: 0.0,
            q: 0.0,
            q_tracked: 0.0,
            debt: 0.0,
            estimates: vec![None; n],
            prior: self.prior.as_ref().map(|p| prior_label(Some(p))),
            requests: inner.policy.t(),
            explored: 0,
            exploration_probability: 0.0,
            zoo: self.zoo.clone(),
            calls: inner.stats.calls.clone(),
            mean_cost_joules: vec![None; n],
            feedback: inner.stats.feedback,
            satisfied: inner.stats.satisfied,
            judge_model: self.cfg.judge.model.clone(),
            judge_verdicts: inner.stats.judge_verdicts,
            judge_satisfied: inner.stats.judge_satisfied,
            state_file: self.path.clone(),
            saved_unix_ms: inner.saved_unix_ms,
        };
        match &inner.policy {
            Live::Mess(mess) => {
                let snap = mess.snapshot();
                st.policy = mess.name();
                st.v = self.cfg.v_per_joule;
                st.q = mess.q();
                st.q_tracked = mess.q_tracked();
                st.explored = mess.explored();
                st.exploration_probability = mess.exploration_probability();
                st.mean_cost_joules = snap
                    .cost_sum
                    .iter()
                    .zip(&snap.cost_n)
                    .map(|(s, &n)| (n > 0).then(|| s / n as f64))
                    .collect();
            }
            Live::MixRank(m) => {
                let est = m.estimates();
                st.debt = m.debt();
                st.explored = m.explored();
                st.mean_cost_joules = est.iter().map(|e| e.cost).collect();
                st.estimates = est.into_iter().map(Some).collect();
            }
        }
        st
    }

    /// Saves when something changed since the last save; true if it wrote. Called once per
    /// `save_interval_ms` by the saver task, which is what bounds both the write rate and the
    /// learning a `kill -9` can lose to one interval.
    pub fn save_if_due(&self) -> Result<bool> {
        if !self.dirty.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.save()?;
        Ok(true)
    }

    /// Writes the state file now (write-temp, fsync, rename, fsync the directory).
    pub fn save(&self) -> Result<()> {
        let started = Instant::now();
        // Clear first: a change that lands while writing marks it dirty again.
        self.dirty.store(false, Ordering::Release);
        let saved_unix_ms = unix_ms();
        let bytes = {
            let inner = self.inner.lock();
            let file = StateFile {
                format: STATE_FORMAT.to_string(),
                version: STATE_VERSION,
                tier: self.tier.clone(),
                policy: self.policy.clone(),
                zoo: self.zoo.clone(),
                encoder: self.encoder_id.clone(),
                saved_unix_ms,
                mess: match &inner.policy {
                    Live::Mess(mess) => Some(MessSaved {
                        mess: mess.snapshot(),
                        predictor: mess
                            .predictor()
                            .snapshot()
                            .map_err(|e| Error::Engine(e.to_string()))?,
                    }),
                    Live::MixRank(_) => None,
                },
                mixrank: match &inner.policy {
                    Live::MixRank(m) => Some(m.snapshot()),
                    Live::Mess(_) => None,
                },
                prior: prior_label(self.prior.as_ref()),
                stats: inner.stats.clone(),
            };
            serde_json::to_vec(&file).map_err(|e| Error::Engine(format!("router state: {e}")))?
        };
        let result = write_atomically(&self.path, &bytes);
        if result.is_err() {
            self.dirty.store(true, Ordering::Release);
        } else {
            self.inner.lock().saved_unix_ms = Some(saved_unix_ms);
            tracing::debug!(
                path = %self.path.display(),
                bytes = bytes.len(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "router state saved"
            );
        }
        result
    }
}

/// Mixed into the seed for the judge's coin, so the judged share and `feedback_share` are
/// independent draws.
const JUDGE_SALT: u64 = 0x6a75_6467_6500_0000;

/// A uniform number in [0, 1) fixed by the request id and the seed: the same request is in or
/// out of `router.feedback_share` however often it is retried.
fn share_coin(request_id: &str, seed: u64) -> f64 {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in request_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Replaces `path` with `bytes` so that a crash at any point leaves either the old or the new
/// file, never a torn one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating a temporary for", e))?;
    f.write_all(bytes).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io("renaming into", e))?;
    if let Some(dir) = path.parent() {
        // The rename itself is durable only once the directory entry is.
        if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
