//! `ferry replay --format routellm`: MESS+ on RouteLLM's own evaluation labels, scored with
//! RouteLLM's metrics.
//!
//! Input: one of RouteLLM's `routellm/evals/<benchmark>` folders (lm-sys/RouteLLM; copied to
//! `../shared/data/routellm`, see its MANIFEST.md):
//! - MMLU: `mmlu_*.csv` with `prompt, mistralai/Mixtral-8x7B-Instruct-v0.1, gpt-4-1106-preview`
//!   (True/False: was that model's answer correct);
//! - GSM8K: `gsm8k_responses.csv`, the same plus both models' responses;
//! - MT-Bench: `question.jsonl` (80 two-turn questions) and `judgements.jsonl` (GPT-4 judge
//!   scores 1–10 per model, question and turn).
//!
//! Every folder's `contaminated_prompts.jsonl` lists prompts RouteLLM drops (their `eval_prompt`);
//! they are dropped here the same way: exact match on the prompt (MMLU, GSM8K), or on either
//! turn of an MT-Bench question.
//!
//! The zoo is weak → strong: Mixtral 8x7B, then GPT-4. MESS+ runs unchanged
//! ([`crate::replay::run_policy`]); a sweep over α gives one (strong-call %, performance) point per
//! α, and RouteLLM's metrics are computed on that curve as RouteLLM's `evaluate.py` does.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use ferry_core::{Error, Result};

use crate::replay::{run_policy, Dataset, PolicyKind, Record, ReplayOptions};

/// RouteLLM's weak model (zoo index 0).
pub const WEAK: &str = "mistralai/Mixtral-8x7B-Instruct-v0.1";
/// RouteLLM's strong model (zoo index 1).
pub const STRONG: &str = "gpt-4-1106-preview";

/// How per-request cost is derived (printed in the report and in `--help`).
pub const COST_BASIS: &str = "cost = blended price ($/M tokens) x tokens of the request: the \
stored prompt (MMLU and GSM8K without their 5-/8-shot examples, which the files do not hold) plus \
the stored answer of that model (GSM8K response; MT-Bench: both turns, turn 2 re-sending the \
conversation as a chat API bills it; MMLU: 1 token, the answer letter), counted with the \
bundled encoder's tokenizer (all-MiniLM-L6-v2 WordPiece, no truncation)";

/// Which RouteLLM benchmark a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Benchmark {
    Mmlu,
    Gsm8k,
    MtBench,
}

impl Benchmark {
    pub fn name(self) -> &'static str {
        match self {
            Benchmark::Mmlu => "MMLU",
            Benchmark::Gsm8k => "GSM8K",
            Benchmark::MtBench => "MT-Bench",
        }
    }

    /// The unit of "performance".
    pub fn unit(self) -> &'static str {
        match self {
            Benchmark::MtBench => "mean GPT-4 judge score (1-10) of the served answers",
            _ => "accuracy (%) of the served answers",
        }
    }
}

/// Prices in $ per million tokens, blended over input and output.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prices {
    pub weak_per_mtok: f64,
    pub strong_per_mtok: f64,
}

impl Default for Prices {
    /// RouteLLM's paper (§5.4): GPT-4 $24.7/M tokens, Mixtral 8x7B $0.24/M tokens.
    fn default() -> Self {
        Prices {
            weak_per_mtok: 0.24,
            strong_per_mtok: 24.7,
        }
    }
}

/// Loading settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    pub prices: Prices,
    /// MT-Bench: an answer satisfies (MESS+'s label) when the mean of its two turns' judge
    /// scores is at least this.
    pub mt_bench_threshold: f64,
    /// Each CSV file's requests name the file as their task (MMLU: its subject), for
    /// per-task satisfaction rates.
    pub task_per_file: bool,
}

/// A RouteLLM benchmark as a two-model replay data set.
#[derive(Debug, Clone)]
pub struct RouteLlmData {
    pub benchmark: Benchmark,
    /// Models `[WEAK, STRONG]`; `Record::score` is RouteLLM's per-request performance.
    pub data: Dataset,
    /// Rows (MT-Bench: questions) before the contaminated ones were dropped.
    pub rows: usize,
    /// Rows dropped because RouteLLM lists them as contaminated.
    pub excluded: usize,
    /// Mean billed tokens per request, per model.
    pub mean_tokens: [f64; 2],
    /// The prices and label threshold it was loaded with.
    pub opts: LoadOptions,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("reading {}", path.display()), e)
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidFile {
        what: "RouteLLM data",
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| bad(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// The `eval_prompt`s of a folder's `contaminated_prompts.jsonl` (empty when there is none).
pub fn contaminated_prompts(dir: &Path) -> Result<HashSet<String>> {
    let path = dir.join("contaminated_prompts.jsonl");
    if !path.is_file() {
        return Ok(HashSet::new());
    }
    read_jsonl(&path)?
        .into_iter()
        .map(|v| {
            v.get("eval_prompt")
                .and_then(|p| p.as_str())
                .map(str::to_string)
                .ok_or_else(|| bad(&path, "a line without a string `eval_prompt`"))
        })
        .collect()
}

fn parse_bool(v: &str, path: &Path, row: usize) -> Result<bool> {
    match v.trim() {
        "True" | "true" | "1" | "1.0" => Ok(true),
        "False" | "false" | "0" | "0.0" => Ok(false),
        other => Err(bad(path, format!("row {row}: `{other}` is not True/False"))),
    }
}

/// Loads a RouteLLM benchmark folder (or one CSV file; its folder's contaminated list applies).
/// `count_tokens` counts the tokens of a text for the cost.
pub fn load(
    input: &Path,
    opts: &LoadOptions,
    count_tokens: &dyn Fn(&str) -> usize,
) -> Result<RouteLlmData> {
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        input.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let contaminated = contaminated_prompts(&dir)?;
    if input.is_dir() && dir.join("judgements.jsonl").is_file() {
        return load_mt_bench(&dir, &contaminated, opts, count_tokens);
    }
    let files: Vec<PathBuf> = if input.is_dir() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(input)
            .map_err(io_err(input))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("csv"))
            .collect();
        f.sort();
        f
    } else {
        vec![input.to_path_buf()]
    };
    if files.is_empty() {
        return Err(Error::invalid(
            "input",
            format!(
                "{}: no RouteLLM CSV files (mmlu_*.csv, gsm8k_responses.csv) or judgements.jsonl",
                input.display()
            ),
        ));
    }
    let mut records = Vec::new();
    let (mut rows, mut excluded) = (0, 0);
    let mut tokens = [0.0; 2];
    let mut benchmark = Benchmark::Mmlu;
    for path in &files {
        let mut rdr = csv::Reader::from_path(path).map_err(|e| bad(path, e.to_string()))?;
        let headers = rdr.headers().map_err(|e| bad(path, e.to_string()))?.clone();
        let col = |name: &str| headers.iter().position(|h| h == name);
        let (Some(p), Some(w), Some(s)) = (col("prompt"), col(WEAK), col(STRONG)) else {
            return Err(bad(
                path,
                format!("expected columns `prompt`, `{WEAK}`, `{STRONG}`"),
            ));
        };
        let responses = (
            col(&format!("{WEAK}_response")),
            col(&format!("{STRONG}_response")),
        );
        if responses.0.is_some() && responses.1.is_some() {
            benchmark = Benchmark::Gsm8k;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("routellm")
            .to_string();
        for (i, rec) in rdr.records().enumerate() {
            let rec = rec.map_err(|e| bad(path, e.to_string()))?;
            rows += 1;
            let prompt = rec.get(p).unwrap_or_default();
            if contaminated.contains(prompt) {
                excluded += 1;
                continue;
            }
            let ok = [
                parse_bool(rec.get(w).unwrap_or_default(), path, i + 1)?,
                parse_bool(rec.get(s).unwrap_or_default(), path, i + 1)?,
            ];
            let q = count_tokens(prompt);
            let answer = |c: Option<usize>| match c {
                Some(c) => count_tokens(rec.get(c).unwrap_or_default()),
                // MMLU: the answer is one letter.
                None => 1,
            };
            let t = [q + answer(responses.0), q + answer(responses.1)];
            tokens[0] += t[0] as f64;
            tokens[1] += t[1] as f64;
            records.push(Record {
                task: opts.task_per_file.then(|| stem.clone()),
                key: format!("{stem}/{i}"),
                text: prompt.to_string(),
                satisfied: ok.to_vec(),
                costs: cost(&opts.prices, t),
                score: ok.iter().map(|&c| if c { 100.0 } else { 0.0 }).collect(),
            });
        }
    }
    finish(benchmark, records, rows, excluded, tokens, opts)
}

fn cost(p: &Prices, tokens: [usize; 2]) -> Vec<f64> {
    vec![
        p.weak_per_mtok * tokens[0] as f64 / 1e6,
        p.strong_per_mtok * tokens[1] as f64 / 1e6,
    ]
}

fn finish(
    benchmark: Benchmark,
    records: Vec<Record>,
    rows: usize,
    excluded: usize,
    tokens: [f64; 2],
    opts: &LoadOptions,
) -> Result<RouteLlmData> {
    if records.is_empty() {
        return Err(Error::invalid("input", "no requests left to replay"));
    }
    let n = records.len() as f64;
    Ok(RouteLlmData {
        benchmark,
        data: Dataset {
            models: vec![WEAK.to_string(), STRONG.to_string()],
            records,
            duplicates: 0,
        },
        rows,
        excluded,
        mean_tokens: [tokens[0] / n, tokens[1] / n],
        opts: *opts,
    })
}

/// The assistant's answers in an MT-Bench multi-turn judge prompt, in turn order.
fn answers_in_judge_prompt(prompt: &str) -> Vec<&str> {
    const START: &str = "<|The Start of Assistant A's Conversation with User|>";
    const END: &str = "<|The End of Assistant A's Conversation with User|>";
    let Some(from) = prompt.find(START) else {
        return Vec::new();
    };
    let conv = &prompt[from + START.len()..];
    let conv = &conv[..conv.find(END).unwrap_or(conv.len())];
    conv.split("### Assistant A:")
        .skip(1)
        .map(|a| a.split("### User:").next().unwrap_or_default().trim())
        .collect()
}

fn load_mt_bench(
    dir: &Path,
    contaminated: &HashSet<String>,
    opts: &LoadOptions,
    count_tokens: &dyn Fn(&str) -> usize,
) -> Result<RouteLlmData> {
    let qpath = dir.join("question.jsonl");
    let jpath = dir.join("judgements.jsonl");
    // (question, model index) -> scores by turn; answers from the turn-2 judge prompt.
    let mut scores: HashMap<(i64, usize), Vec<(i64, f64)>> = HashMap::new();
    let mut answers: HashMap<(i64, usize), Vec<String>> = HashMap::new();
    for j in read_jsonl(&jpath)? {
        let model = match j.get("model").and_then(|m| m.as_str()) {
            Some(WEAK) => 0,
            Some(STRONG) => 1,
            _ => continue,
        };
        let (Some(q), Some(score)) = (
            j.get("question_id").and_then(|v| v.as_i64()),
            j.get("score").and_then(|v| v.as_f64()),
        ) else {
            return Err(bad(&jpath, "a judgement without question_id or score"));
        };
        let turn = j.get("turn").and_then(|v| v.as_i64()).unwrap_or(1);
        scores.entry((q, model)).or_default().push((turn, score));
        if turn == 2 {
            if let Some(p) = j.get("user_prompt").and_then(|v| v.as_str()) {
                answers.insert(
                    (q, model),
                    answers_in_judge_prompt(p)
                        .into_iter()
                        .map(str::to_string)
                        .collect(),
                );
            }
        }
    }
    let mut records = Vec::new();
    let (mut rows, mut excluded) = (0, 0);
    let mut tokens = [0.0; 2];
    for q in read_jsonl(&qpath)? {
        let id = q
            .get("question_id")
            .and_then(|v| v.as_i64())
            .ok_or_else(|| bad(&qpath, "a question without question_id"))?;
        let turns: Vec<&str> = q
            .get("turns")
            .and_then(|t| t.as_array())
            .map(|t| t.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        if turns.is_empty() {
            return Err(bad(&qpath, format!("question {id} has no turns")));
        }
        rows += 1;
        if turns.iter().any(|t| contaminated.contains(*t)) {
            excluded += 1;
            continue;
        }
        let mut score = Vec::new();
        let mut t = [0usize; 2];
        for m in 0..2 {
            let s = scores
                .get(&(id, m))
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    bad(
                        &jpath,
                        format!("no judgement of {} on question {id}", [WEAK, STRONG][m]),
                    )
                })?;
            // RouteLLM: the routed model answers every turn; performance = mean over turns.
            score.push(s.iter().map(|x| x.1).sum::<f64>() / s.len() as f64);
            // Billed tokens: each turn re-sends the conversation so far, then the answer.
            let ans = answers.get(&(id, m)).cloned().unwrap_or_default();
            let mut history = 0;
            for (k, turn) in turns.iter().enumerate() {
                history += count_tokens(turn);
                t[m] += history;
                let a = ans.get(k).map(|a| count_tokens(a)).unwrap_or(0);
                t[m] += a;
                history += a;
            }
        }
        tokens[0] += t[0] as f64;
        tokens[1] += t[1] as f64;
        records.push(Record {
            task: None,
            key: format!("mt_bench/{id}"),
            // RouteLLM routes on the first turn.
            text: turns[0].to_string(),
            satisfied: score
                .iter()
                .map(|&s| s >= opts.mt_bench_threshold)
                .collect(),
            costs: cost(&opts.prices, t),
            score,
        });
    }
    finish(Benchmark::MtBench, records, rows, excluded, tokens, opts)
}

// ---------------------------------------------------------------------------------------------
// RouteLLM's metrics

/// One point of a router's curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    /// Share of requests the strong model answered, in % (0..100).
    pub strong_pct: f64,
    pub performance: f64,
}

/// Performance gap recovered: `(perf − weak) / (strong − weak)`.
pub fn pgr(perf: f64, weak: f64, strong: f64) -> f64 {
    (perf - weak) / (strong - weak)
}

fn sorted(points: &[CurvePoint]) -> Vec<CurvePoint> {
    let mut p = points.to_vec();
    p.sort_by(|a, b| a.strong_pct.total_cmp(&b.strong_pct));
    p
}

fn trapz(points: &[CurvePoint], y: impl Fn(&CurvePoint) -> f64) -> f64 {
    points
        .windows(2)
        .map(|w| (w[1].strong_pct - w[0].strong_pct) / 100.0 * (y(&w[0]) + y(&w[1])) / 2.0)
        .sum()
}

/// The points plus RouteLLM's sweep endpoints: 0 % strong (the weak model's performance) and
/// 100 % strong (the strong model's).
pub fn with_endpoints(points: &[CurvePoint], weak: f64, strong: f64) -> Vec<CurvePoint> {
    let mut p = vec![CurvePoint {
        strong_pct: 0.0,
        performance: weak,
    }];
    p.extend_from_slice(points);
    p.push(CurvePoint {
        strong_pct: 100.0,
        performance: strong,
    });
    sorted(&p)
}

/// APGR as RouteLLM's `evaluate.py` computes it: the trapezoid area under performance vs
/// strong-call fraction, normalised as `(AUC − weak_AUC) / (strong_AUC − weak_AUC)`, where the
/// weak and strong AUCs are those of constant lines over the same x range.
pub fn apgr(points: &[CurvePoint], weak: f64, strong: f64) -> f64 {
    let p = sorted(points);
    let auc = trapz(&p, |c| c.performance);
    let weak_auc = trapz(&p, |_| weak);
    let strong_auc = trapz(&p, |_| strong);
    (auc - weak_auc) / (strong_auc - weak_auc)
}

/// CPT(x): the strong-call % at which the curve first reaches `weak + x·(strong − weak)`,
/// interpolating linearly between points sorted by strong-call %. On a curve whose performance
/// rises with strong-call % this is exactly RouteLLM's `np.interp(target, performance,
/// strong_pct)`; where a sweep is not monotone `np.interp`'s answer is undefined and this takes
/// the first crossing (the paper's "minimum percentage of calls"). Clamped like `np.interp`: a
/// target at or below the first point gives its %, one never reached gives the last point's %.
pub fn cpt(points: &[CurvePoint], weak: f64, strong: f64, x: f64) -> f64 {
    let p = sorted(points);
    let Some(first) = p.first() else {
        return f64::NAN;
    };
    let target = weak + x * (strong - weak);
    if first.performance >= target {
        return first.strong_pct;
    }
    for w in p.windows(2) {
        let (a, b) = (w[0], w[1]);
        if b.performance >= target {
            let f = (target - a.performance) / (b.performance - a.performance);
            return a.strong_pct + f * (b.strong_pct - a.strong_pct);
        }
    }
    p[p.len() - 1].strong_pct
}

/// `np.quantile` with linear interpolation (pandas' `qcut` bin edges).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (pos - lo as f64) * (sorted[hi] - sorted[lo])
}

/// RouteLLM's threshold sweep of a scoring router: thresholds are the `num_results`-quantile
/// bin edges of the scores (`pd.qcut(..., retbins=True)`); at each edge but the last the strong
/// model answers requests with `score >= edge`, at the last `score > edge` — so the sweep runs
/// from 100 % to 0 % strong. `perf[i]` is request i's performance with `[weak, strong]`.
pub fn threshold_sweep(scores: &[f64], perf: &[[f64; 2]], num_results: usize) -> Vec<CurvePoint> {
    let mut s = scores.to_vec();
    s.sort_by(f64::total_cmp);
    let n = scores.len() as f64;
    (0..=num_results)
        .map(|i| {
            let edge = quantile(&s, i as f64 / num_results as f64);
            let last = i == num_results;
            let (mut strong, mut total) = (0usize, 0.0);
            for (x, p) in scores.iter().zip(perf) {
                let to_strong = if last { *x > edge } else { *x >= edge };
                strong += usize::from(to_strong);
                total += p[usize::from(to_strong)];
            }
            CurvePoint {
                strong_pct: 100.0 * strong as f64 / n,
                performance: total / n,
            }
        })
        .collect()
}

/// RouteLLM's metrics of one curve.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub apgr: f64,
    /// CPT(50 %), in % strong calls.
    pub cpt50: f64,
    /// CPT(80 %), in % strong calls.
    pub cpt80: f64,
}

impl Metrics {
    pub fn of(points: &[CurvePoint], weak: f64, strong: f64) -> Self {
        Metrics {
            apgr: apgr(points, weak, strong),
            cpt50: cpt(points, weak, strong, 0.5),
            cpt80: cpt(points, weak, strong, 0.8),
        }
    }
}

/// The random router (RouteLLM's baseline): a uniform random score per request, swept over
/// 10-quantile thresholds; metrics averaged over `seeds`.
#[derive(Debug, Clone, Serialize)]
pub struct RandomRouter {
    pub apgr: f64,
    pub apgr_std: f64,
    pub cpt50: f64,
    pub cpt80: f64,
    /// The first seed's sweep.
    pub sweep: Vec<CurvePoint>,
}

pub fn random_router(perf: &[[f64; 2]], seeds: &[u64], weak: f64, strong: f64) -> RandomRouter {
    let runs: Vec<(Metrics, Vec<CurvePoint>)> = seeds
        .iter()
        .map(|&seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let scores: Vec<f64> = perf.iter().map(|_| rng.random::<f64>()).collect();
            let sweep = threshold_sweep(&scores, perf, 10);
            (Metrics::of(&sweep, weak, strong), sweep)
        })
        .collect();
    let k = runs.len().max(1) as f64;
    let mean = |f: &dyn Fn(&Metrics) -> f64| runs.iter().map(|r| f(&r.0)).sum::<f64>() / k;
    let apgr = mean(&|m| m.apgr);
    RandomRouter {
        apgr,
        apgr_std: (runs.iter().map(|r| (r.0.apgr - apgr).powi(2)).sum::<f64>() / k).sqrt(),
        cpt50: mean(&|m| m.cpt50),
        cpt80: mean(&|m| m.cpt80),
        sweep: runs.into_iter().next().map(|r| r.1).unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------------
// The evaluation

/// One α of a policy's sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    pub alpha: f64,
    /// % of requests answered by the strong model (explorations included: they serve it).
    pub strong_pct: f64,
    pub performance: f64,
    pub pgr: f64,
    /// Share of satisfied requests (MESS+'s label) and whether it reached α.
    pub satisfaction: f64,
    pub sla_met: bool,
    /// $ per request, exploration calls to both models included.
    pub cost_per_request: f64,
    pub explore_fraction: f64,
}

/// A policy over the α sweep, with RouteLLM's metrics of its curve (endpoints included).
#[derive(Debug, Clone, Serialize)]
pub struct PolicySweep {
    pub policy: String,
    pub sweep: Vec<SweepRow>,
    pub apgr: f64,
    pub cpt50: f64,
    pub cpt80: f64,
    /// Running satisfaction and cumulative cost (first α, first seed), for plots.
    #[serde(skip)]
    pub trace: Vec<(f64, f64)>,
}

/// A model answering everything.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRow {
    pub model: String,
    pub performance: f64,
    pub satisfaction: f64,
    pub cost_per_request: f64,
    pub mean_tokens: f64,
}

/// The `--format routellm --json` report.
#[derive(Debug, Clone, Serialize)]
pub struct RouteLlmReport {
    pub format: &'static str,
    pub benchmark: Benchmark,
    pub requests: usize,
    pub rows: usize,
    pub excluded_contaminated: usize,
    pub performance_unit: &'static str,
    pub prices_usd_per_mtok: Prices,
    pub cost_basis: &'static str,
    /// MT-Bench only: satisfied = mean judge score of the two turns >= this.
    pub mt_bench_threshold: Option<f64>,
    pub v: f64,
    pub c: f64,
    pub seeds: Vec<u64>,
    pub weak: ModelRow,
    pub strong: ModelRow,
    pub policies: Vec<PolicySweep>,
    pub random_router: RandomRouter,
    /// RouteLLM's threshold sweep over a hindsight ranking: each request's score is a ridge
    /// regression of the strong model's gain on its embedding and log length, cross-fitted on
    /// the other four fifths of the requests ([`crate::replay::ceiling::cross_fitted`]) — the most a
    /// ranking on this encoder could reach. Absent without embeddings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranked_hindsight: Option<Metrics>,
}

/// The default α sweep: 11 values evenly spaced from the weak model's satisfaction rate to the
/// strong model's (rounded to 3 decimals).
pub fn default_alphas(d: &RouteLlmData) -> Vec<f64> {
    let s = d.data.mean_satisfaction();
    (0..=10)
        .map(|k| (1000.0 * (s[0] + k as f64 / 10.0 * (s[1] - s[0]))).round() / 1000.0)
        .collect()
}

/// What to sweep.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub policies: Vec<PolicyKind>,
    pub alphas: Vec<f64>,
    pub v: f64,
    pub c: f64,
    pub seeds: Vec<u64>,
    /// mixrank's difficulty prior.
    pub prior: Option<ferry_router::mixrank::prior::DifficultyPrior>,
}

/// Runs every policy over every α, and the reference rows.
pub fn evaluate(
    d: &RouteLlmData,
    features: &[std::sync::Arc<Vec<f32>>],
    dim: usize,
    o: &SweepOptions,
) -> Result<RouteLlmReport> {
    let (v, c, seeds) = (o.v, o.c, o.seeds.as_slice());
    let data = &d.data;
    let n = data.records.len() as f64;
    let perf = |m: usize| data.records.iter().map(|r| r.score[m]).sum::<f64>() / n;
    let (weak, strong) = (perf(0), perf(1));
    let sat = data.mean_satisfaction();
    let cost = data.mean_cost();
    let row = |m: usize| ModelRow {
        model: data.models[m].clone(),
        performance: perf(m),
        satisfaction: sat[m],
        cost_per_request: cost[m],
        mean_tokens: d.mean_tokens[m],
    };
    let mut out = Vec::new();
    for kind in &o.policies {
        let mut sweep = Vec::new();
        let mut trace = Vec::new();
        for (i, &alpha) in o.alphas.iter().enumerate() {
            let opts = ReplayOptions {
                alpha,
                v,
                c,
                seeds: seeds.to_vec(),
                policy: kind.clone(),
                prior: o.prior.clone(),
            };
            let r = run_policy(data, features, dim, kind, &opts)?;
            if i == 0 {
                trace = r.trace.clone();
            }
            sweep.push(SweepRow {
                alpha,
                strong_pct: 100.0 * r.calls.get(STRONG).copied().unwrap_or(0.0),
                performance: r.performance,
                pgr: pgr(r.performance, weak, strong),
                satisfaction: r.satisfaction,
                sla_met: r.satisfaction >= alpha,
                cost_per_request: r.cost_total / n,
                explore_fraction: r.explore_fraction,
            });
        }
        let points: Vec<CurvePoint> = sweep
            .iter()
            .map(|s| CurvePoint {
                strong_pct: s.strong_pct,
                performance: s.performance,
            })
            .collect();
        let m = Metrics::of(&with_endpoints(&points, weak, strong), weak, strong);
        out.push(PolicySweep {
            policy: kind.name(),
            sweep,
            apgr: m.apgr,
            cpt50: m.cpt50,
            cpt80: m.cpt80,
            trace,
        });
    }
    let perf_pairs: Vec<[f64; 2]> = data
        .records
        .iter()
        .map(|r| [r.score[0], r.score[1]])
        .collect();
    Ok(RouteLlmReport {
        format: "routellm",
        benchmark: d.benchmark,
        requests: data.records.len(),
        rows: d.rows,
        excluded_contaminated: d.excluded,
        performance_unit: d.benchmark.unit(),
        prices_usd_per_mtok: d.opts.prices,
        cost_basis: COST_BASIS,
        mt_bench_threshold: (d.benchmark == Benchmark::MtBench)
            .then_some(d.opts.mt_bench_threshold),
        v,
        c,
        seeds: seeds.to_vec(),
        weak: row(0),
        strong: row(1),
        policies: out,
        random_router: random_router(&perf_pairs, seeds, weak, strong),
        ranked_hindsight: ranked_hindsight(d, features, &perf_pairs, weak, strong),
    })
}

/// The hindsight ranking's metrics (see [`RouteLlmReport::ranked_hindsight`]).
fn ranked_hindsight(
    d: &RouteLlmData,
    features: &[std::sync::Arc<Vec<f32>>],
    perf: &[[f64; 2]],
    weak: f64,
    strong: f64,
) -> Option<Metrics> {
    if features.len() != perf.len() || features.iter().any(|f| f.is_empty()) {
        return None;
    }
    let z = crate::replay::ceiling::request_features(&d.data, features)?;
    let gain: Vec<f64> = perf.iter().map(|p| p[1] - p[0]).collect();
    let scores = crate::replay::ceiling::cross_fitted(&z, &gain)?;
    Some(Metrics::of(
        &threshold_sweep(&scores, perf, 10),
        weak,
        strong,
    ))
}

/// The human-readable report.
pub fn render(r: &RouteLlmReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let unit = if r.benchmark == Benchmark::MtBench {
        ""
    } else {
        "%"
    };
    let _ = writeln!(
        s,
        "RouteLLM {}: {} requests ({} of {} rows excluded as contaminated, RouteLLM's list) · seeds {:?} · V {:.3e} · c {}",
        r.benchmark.name(),
        r.requests,
        r.excluded_contaminated,
        r.rows,
        r.seeds,
        r.v,
        r.c
    );
    let _ = writeln!(
        s,
        "prices: {} ${}/M tokens, {} ${}/M tokens (blended; RouteLLM paper defaults are $24.7 and $0.24)",
        r.strong.model,
        r.prices_usd_per_mtok.strong_per_mtok,
        r.weak.model,
        r.prices_usd_per_mtok.weak_per_mtok
    );
    let _ = writeln!(s, "{}", r.cost_basis);
    let _ = writeln!(s, "performance: {}", r.benchmark.unit());
    if let Some(t) = r.mt_bench_threshold {
        let _ = writeln!(
            s,
            "MESS+ label (satisfied): mean judge score of the two turns >= {t}"
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<40} {:>12} {:>13} {:>14} {:>12}",
        "model", "performance", "satisfaction", "$/request", "tokens/req"
    );
    for m in [&r.weak, &r.strong] {
        let _ = writeln!(
            s,
            "{:<40} {:>11.2}{unit:1} {:>12.1}% {:>14.6} {:>12.0}",
            m.model,
            m.performance,
            100.0 * m.satisfaction,
            m.cost_per_request,
            m.mean_tokens
        );
    }
    for p in &r.policies {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<14} {:>7} {:>10} {:>12} {:>7} {:>13} {:>6} {:>12} {:>8}",
            p.policy,
            "alpha",
            "strong %",
            "performance",
            "PGR",
            "satisfaction",
            "SLA",
            "$/request",
            "explore"
        );
        for row in &p.sweep {
            let _ = writeln!(
                s,
                "{:<14} {:>7.3} {:>9.1}% {:>11.2}{unit:1} {:>7.3} {:>12.1}% {:>6} {:>12.6} {:>7.1}%",
                "",
                row.alpha,
                row.strong_pct,
                row.performance,
                row.pgr,
                100.0 * row.satisfaction,
                if row.sla_met { "met" } else { "missed" },
                row.cost_per_request,
                100.0 * row.explore_fraction
            );
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "RouteLLM's metrics (curve = the α sweep plus the 0 % and 100 % strong endpoints; APGR = normalised \
         trapezoid AUC; CPT = first crossing of weak + x·(strong − weak), = np.interp on a rising curve):"
    );
    let _ = writeln!(
        s,
        "{:<24} {:>8} {:>10} {:>10}",
        "router", "APGR", "CPT(50%)", "CPT(80%)"
    );
    for p in &r.policies {
        let _ = writeln!(
            s,
            "{:<24} {:>8.3} {:>9.2}% {:>9.2}%",
            p.policy, p.apgr, p.cpt50, p.cpt80
        );
    }
    let rr = &r.random_router;
    let _ = writeln!(
        s,
        "{:<24} {:>8.3} {:>9.2}% {:>9.2}%   (mean of {} seeds, APGR std {:.3})",
        "random (RouteLLM's)",
        rr.apgr,
        rr.cpt50,
        rr.cpt80,
        r.seeds.len(),
        rr.apgr_std
    );
    if let Some(h) = &r.ranked_hindsight {
        let _ = writeln!(
            s,
            "{:<24} {:>8.3} {:>9.2}% {:>9.2}%   (ridge on the embedding, cross-fitted: the ceiling)",
            "ranked in hindsight", h.apgr, h.cpt50, h.cpt80
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(strong_pct: f64, performance: f64) -> CurvePoint {
        CurvePoint {
            strong_pct,
            performance,
        }
    }

    #[test]
    fn pgr_apgr_cpt_match_hand_computation() {
        // weak 60, strong 80.
        assert!((pgr(70.0, 60.0, 80.0) - 0.5).abs() < 1e-12);
        assert!((pgr(60.0, 60.0, 80.0)).abs() < 1e-12);
        // The straight line (random router in expectation): APGR 0.5, CPT(x) = x.
        let line = with_endpoints(&[pt(50.0, 70.0)], 60.0, 80.0);
        assert_eq!(line.len(), 3);
        assert!((apgr(&line, 60.0, 80.0) - 0.5).abs() < 1e-12);
        assert!((cpt(&line, 60.0, 80.0, 0.5) - 50.0).abs() < 1e-12);
        assert!((cpt(&line, 60.0, 80.0, 0.8) - 80.0).abs() < 1e-12);
        // A concave curve: (0,60) (20,76) (100,80), given unsorted.
        // AUC = 0.2*(60+76)/2 + 0.8*(76+80)/2 = 13.6 + 62.4 = 76; weak AUC 60, strong AUC 80.
        // APGR = (76-60)/(80-60) = 0.8.
        let c = with_endpoints(&[pt(20.0, 76.0)], 60.0, 80.0);
        assert!((apgr(&c, 60.0, 80.0) - 0.8).abs() < 1e-12);
        // CPT(50%): target 70 on the first segment: 20 * (70-60)/(76-60) = 12.5.
        assert!((cpt(&c, 60.0, 80.0, 0.5) - 12.5).abs() < 1e-12);
        // CPT(80%): target 76, reached exactly at 20 %.
        assert!((cpt(&c, 60.0, 80.0, 0.8) - 20.0).abs() < 1e-12);
        // CPT(90%): target 78 on the second segment: 20 + 80 * (78-76)/(80-76) = 60.
        assert!((cpt(&c, 60.0, 80.0, 0.9) - 60.0).abs() < 1e-12);
        // APGR normalises over the curve's own x range (RouteLLM's code): without endpoints,
        // a flat curve at the strong level over [20, 40] % has APGR 1.
        assert!((apgr(&[pt(40.0, 80.0), pt(20.0, 80.0)], 60.0, 80.0) - 1.0).abs() < 1e-12);
        // A curve that overshoots then dips: CPT takes the first crossing.
        let dip = [
            pt(0.0, 60.0),
            pt(10.0, 90.0),
            pt(50.0, 65.0),
            pt(100.0, 80.0),
        ];
        assert!((cpt(&dip, 60.0, 80.0, 0.5) - 10.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn threshold_sweep_runs_from_all_strong_to_none() {
        // 4 requests; weak right on 0 and 1, strong right on all.
        let perf = [[100.0, 100.0], [100.0, 100.0], [0.0, 100.0], [0.0, 100.0]];
        let scores = [0.1, 0.2, 0.9, 0.8];
        let s = threshold_sweep(&scores, &perf, 2);
        // Edges: min 0.1, median 0.5, max 0.9.
        assert_eq!(s[0], pt(100.0, 100.0));
        assert_eq!(s[1], pt(50.0, 100.0));
        assert_eq!(s[2], pt(0.0, 50.0));
        // This router is perfect: APGR = (0.5*(50+100)/2 + 0.5*100 - 50) / 50 = 0.75.
        assert!((apgr(&s, 50.0, 100.0) - 0.75).abs() < 1e-12);
        assert!((quantile(&[1.0, 2.0, 3.0, 4.0], 0.5) - 2.5).abs() < 1e-12);
    }

    #[test]
    fn random_router_is_about_half() {
        let perf: Vec<[f64; 2]> = (0..4000)
            .map(|i| [if i % 3 == 0 { 100.0 } else { 0.0 }, 100.0])
            .collect();
        let r = random_router(&perf, &[1, 2, 3], 100.0 / 3.0, 100.0);
        assert!((r.apgr - 0.5).abs() < 0.03, "{}", r.apgr);
        assert!((r.cpt50 - 50.0).abs() < 5.0, "{}", r.cpt50);
        assert_eq!(r.sweep.len(), 11);
        assert_eq!(r.sweep[0].strong_pct, 100.0);
        assert_eq!(r.sweep[10].strong_pct, 0.0);
    }

    fn words(t: &str) -> usize {
        t.split_whitespace().count()
    }

    #[test]
    fn contaminated_prompts_are_excluded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("mmlu_x.csv"),
            format!(
                "prompt,{WEAK},{STRONG}\n\"q one\nA. a\",True,True\nq two,False,True\nq three,False,False\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("contaminated_prompts.jsonl"),
            "{\"train_prompt\":\"x\",\"eval_prompt\":\"q two\",\"eval_idx\":1}\n\
             {\"train_prompt\":\"y\",\"eval_prompt\":\"not in the data\",\"eval_idx\":9}\n",
        )
        .unwrap();
        let opts = LoadOptions {
            prices: Prices::default(),
            mt_bench_threshold: 8.0,
            task_per_file: false,
        };
        let d = load(dir.path(), &opts, &words).unwrap();
        assert_eq!(d.benchmark, Benchmark::Mmlu);
        assert_eq!((d.rows, d.excluded, d.data.records.len()), (3, 1, 2));
        assert!(d.data.records.iter().all(|r| r.task.is_none()));
        let per_file = LoadOptions {
            task_per_file: true,
            ..opts
        };
        let d = load(dir.path(), &per_file, &words).unwrap();
        let stems: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(String::from))
            .collect();
        assert!(d
            .data
            .records
            .iter()
            .all(|r| r.task.as_ref().is_some_and(|t| stems.contains(t))));
        assert!(d.data.records.iter().all(|r| r.text != "q two"));
        assert_eq!(d.data.records[0].satisfied, [true, true]);
        assert_eq!(d.data.records[1].score, [0.0, 0.0]);
        // "q one\nA. a" = 4 words + 1 answer token, at $0.24 and $24.7 per M tokens.
        assert!((d.data.records[0].costs[0] - 5.0 * 0.24e-6).abs() < 1e-15);
        assert!((d.data.records[0].costs[1] - 5.0 * 24.7e-6).abs() < 1e-15);
        // Without the list nothing is dropped.
        std::fs::remove_file(dir.path().join("contaminated_prompts.jsonl")).unwrap();
        let d = load(dir.path(), &opts, &words).unwrap();
        assert_eq!((d.excluded, d.data.records.len()), (0, 3));
    }

    #[test]
    fn mt_bench_questions_with_a_contaminated_turn_are_dropped_and_scored_by_mean() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("question.jsonl"),
            "{\"question_id\":1,\"category\":\"x\",\"turns\":[\"first q\",\"second q\"]}\n\
             {\"question_id\":2,\"category\":\"x\",\"turns\":[\"other q\",\"leaked turn\"]}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("contaminated_prompts.jsonl"),
            "{\"eval_prompt\":\"leaked turn\"}\n",
        )
        .unwrap();
        let conv = |a1: &str, a2: &str| {
            format!(
                "<|The Start of Assistant A's Conversation with User|>\\n\\n### User:\\nfirst q\\n\\n### Assistant A:\\n{a1}\\n\\n### User:\\nsecond q\\n\\n### Assistant A:\\n{a2}\\n\\n<|The End of Assistant A's Conversation with User|>"
            )
        };
        let mut j = String::new();
        for (q, m, turn, score, prompt) in [
            (1, WEAK, 1, 9.0, String::new()),
            (1, WEAK, 2, 6.0, conv("w one", "w two two")),
            (1, STRONG, 1, 10.0, String::new()),
            (1, STRONG, 2, 9.0, conv("s", "s s s s")),
            (2, WEAK, 1, 1.0, String::new()),
            (2, WEAK, 2, 1.0, String::new()),
            (2, STRONG, 1, 1.0, String::new()),
            (2, STRONG, 2, 1.0, String::new()),
        ] {
            j.push_str(&format!(
                "{{\"question_id\":{q},\"model\":\"{m}\",\"score\":{score},\"turn\":{turn},\"user_prompt\":\"{prompt}\"}}\n"
            ));
        }
        std::fs::write(dir.path().join("judgements.jsonl"), j).unwrap();
        let opts = LoadOptions {
            prices: Prices {
                weak_per_mtok: 1.0,
                strong_per_mtok: 10.0,
            },
            mt_bench_threshold: 8.0,
            task_per_file: false,
        };
        let d = load(dir.path(), &opts, &words).unwrap();
        assert_eq!(d.benchmark, Benchmark::MtBench);
        assert_eq!((d.rows, d.excluded, d.data.records.len()), (2, 1, 1));
        let r = &d.data.records[0];
        assert_eq!(r.text, "first q");
        assert_eq!(r.score, [7.5, 9.5]);
        assert_eq!(r.satisfied, [false, true]);
        // Weak tokens: turn 1 = q1 (2) + a1 (2); turn 2 = q1 + a1 + q2 (6) + a2 (3) -> 13.
        assert!((r.costs[0] - 13e-6).abs() < 1e-15, "{}", r.costs[0]);
        // Strong: 2 + 1, then 2 + 1 + 2 + 4 -> 12 tokens at $10/M.
        assert!((r.costs[1] - 120e-6).abs() < 1e-15, "{}", r.costs[1]);
    }
}
