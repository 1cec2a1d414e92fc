//! `ferry replay` (recorded per-request outcomes through a routing policy: the MESS+ format,
//! RouteLLM's labels, seeded synthetic zoos) and `ferry router train-prior`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{EmbedArgs, Registry};

#[derive(Args)]
#[command(after_long_help = "\
--format routellm reads one of RouteLLM's evaluation folders (routellm/evals/{mmlu,gsm8k,mt_bench}: \
True/False correctness of gpt-4-1106-preview and Mixtral-8x7B-Instruct per prompt, or GPT-4 judge \
scores for MT-Bench), drops the prompts in its contaminated_prompts.jsonl, runs MESS+ on the zoo \
weak -> strong for every --alpha, and prints RouteLLM's metrics: strong-call %, performance and PGR \
per alpha, APGR, CPT(50%), CPT(80%), beside RouteLLM's random router.

Cost per request (routellm) = blended price ($/M tokens; --price-strong, --price-weak; defaults are \
RouteLLM's paper: GPT-4 $24.7, Mixtral $0.24) x tokens of the stored prompt plus that model's \
stored answer (GSM8K responses; MT-Bench answers of both turns, turn 2 re-sending the conversation; \
MMLU: one answer token), counted with the --encoder's tokenizer.json (all-MiniLM-L6-v2 WordPiece, \
no truncation).")]
pub(crate) struct ReplayArgs {
    #[command(flatten)]
    pub(crate) registry: Registry,
    /// mess: the MESS+ per-request format; routellm: a RouteLLM evaluation folder (see below).
    #[arg(long, value_enum, default_value = "mess")]
    pub(crate) format: ReplayFormat,
    /// mess: CSV/JSON file or directory (read recursively) in the MESS+ per-request format.
    /// routellm: a RouteLLM folder, e.g. ../shared/data/routellm/mmlu (or one of its CSV files).
    #[arg(long, required_unless_present = "zoos")]
    pub(crate) input: Option<PathBuf>,
    /// synthetic: how many zoos (seeds from --zoo-offset).
    #[arg(long)]
    pub(crate) zoos: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub(crate) zoo_offset: u64,
    /// SLA target(s): fraction of requests that must be satisfied; a comma list sweeps α
    /// (e.g. 0.6,0.7,0.8). Required for --format mess; for routellm the default is 11 values
    /// from the weak model's satisfaction rate to the strong model's.
    #[arg(long, value_delimiter = ',')]
    pub(crate) alpha: Vec<f64>,
    /// Cost weight V, in the cost column's unit. Default: 0.1 / (mean cost of the most
    /// expensive model), so a queue of about one request of SLA debt balances the largest
    /// model's cost; this gives 5e-5..1e-4 on the MESS+ joules, inside the paper's range.
    #[arg(long)]
    pub(crate) v: Option<f64>,
    /// Multiplies the default V (ignored with --v): a sweep across data sets of different cost scales.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) v_scale: f64,
    /// Exploration constant c in p_t = min(1, c / t^(1/4)).
    #[arg(long, default_value_t = 0.1)]
    pub(crate) c: f64,
    #[arg(long, value_delimiter = ',', default_value = "42,43,44")]
    pub(crate) seeds: Vec<u64>,
    /// Zoo order (ascending cost); default: the label_* columns ordered by mean cost.
    #[arg(long, value_delimiter = ',')]
    pub(crate) models: Option<Vec<String>>,
    /// Cost columns are <prefix>_<model>.
    #[arg(long, default_value = "energy_consumption")]
    pub(crate) cost_prefix: String,
    /// mixrank (ferry's default router), mixrank-unranked (its mix controller alone, each
    /// request a coin: an online fixed split, what the ranking is measured against),
    /// mixrank-known-rates (mixrank told each model's rate over the whole stream: an oracle on
    /// the rates alone, splitting mixrank's cost into the price of learning the rates and the
    /// controller's own), mess-plus (the paper's), mess-plus-fb (ours: MESS+ that also learns
    /// from served answers), always:<model>, random-alpha, random-target:<T> or oracle.
    /// Default: mixrank; with --format routellm a comma list, default
    /// mixrank,mess-plus,mess-plus-fb.
    /// The data holds every model's label, so mixrank may run a shadow (a cheaper model beside
    /// the served one, charged to its cost) on any request; live that takes the judge.
    #[arg(long, value_delimiter = ',')]
    pub(crate) policy: Option<Vec<String>>,
    /// mixrank's difficulty prior (a `ferry router train-prior` file). Replaying a benchmark
    /// with a prior that saw it is refused: train one with `--exclude` it.
    #[arg(long)]
    pub(crate) prior: Option<PathBuf>,
    /// Read each request's task from this column (per-task satisfaction rates in mixrank).
    #[arg(long)]
    pub(crate) task_column: Option<String>,
    /// routellm: each CSV file is a task (MMLU: the request's subject), as an app that names
    /// its task would send it; mixrank keeps per-task satisfaction rates.
    #[arg(long)]
    pub(crate) task_per_file: bool,
    /// routellm: GPT-4-1106-preview's blended price, $ per million tokens (RouteLLM's paper: 24.7).
    #[arg(long, default_value_t = 24.7)]
    pub(crate) price_strong: f64,
    /// routellm: Mixtral-8x7B-Instruct's blended price, $ per million tokens (RouteLLM's paper: 0.24).
    #[arg(long, default_value_t = 0.24)]
    pub(crate) price_weak: f64,
    /// routellm, MT-Bench: an answer counts as satisfied (MESS+'s label) when the mean GPT-4 judge
    /// score of its two turns is at least this; performance stays the mean judge score.
    #[arg(long, default_value_t = 8.0)]
    pub(crate) mt_bench_threshold: f64,
    /// Write a PNG: running satisfaction and cumulative cost over requests for the policy and the
    /// baselines (first seed, first α), and with several --alpha an α-sweep row; with --format
    /// routellm, performance against strong-model calls (RouteLLM's figure).
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) embed: EmbedArgs,
    /// One JSON object (a list, one object per α, when --alpha has several values; one object
    /// for --format routellm).
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum RouterCommand {
    /// Train mixrank's difficulty prior on public per-question labels (the MESS+ authors'
    /// Llama data and RouteLLM's MMLU and GSM8K labels) and write it as a versioned JSON file.
    /// `--exclude` leaves benchmarks out (by family: every mmlu* is one), for leave-one-out
    /// evaluation: `ferry replay` refuses a prior that saw the benchmark it replays.
    TrainPrior {
        #[command(flatten)]
        registry: Registry,
        #[command(flatten)]
        embed: EmbedArgs,
        /// MESS+ per-request data, one folder per benchmark.
        #[arg(long, default_value = "../shared/data/mess-llama")]
        mess: PathBuf,
        /// RouteLLM's evaluation folders (mmlu, gsm8k).
        #[arg(long, default_value = "../shared/data/routellm")]
        routellm: PathBuf,
        /// Benchmarks (families) to leave out, e.g. gsm8k,mmlu.
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ReplayFormat {
    Mess,
    Routellm,
    /// Seeded random zoos (no --input): 2-11 models, any cost unit, alpha drawn per zoo.
    Synthetic,
}

pub(crate) fn run_replay(args: ReplayArgs) -> anyhow::Result<()> {
    use ferry_lab::{plot, replay, routellm};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    anyhow::ensure!(!args.seeds.is_empty(), "--seeds needs at least one seed");
    anyhow::ensure!(
        args.alpha.iter().all(|a| (0.0..=1.0).contains(a)),
        "--alpha must be in [0, 1]"
    );
    let policies: Vec<replay::PolicyKind> = match (&args.policy, args.format) {
        (Some(p), _) => p.iter().map(|p| p.parse()).collect::<Result<_, _>>()?,
        (None, ReplayFormat::Mess | ReplayFormat::Synthetic) => vec![replay::PolicyKind::MixRank],
        (None, ReplayFormat::Routellm) => vec![
            replay::PolicyKind::MixRank,
            replay::PolicyKind::MessPlus,
            replay::PolicyKind::MessPlusFb,
        ],
    };
    let needs_features = policies.iter().any(|p| p.needs_features());
    if args.format == ReplayFormat::Synthetic {
        let count = args.zoos.unwrap_or(30);
        let rows = ferry_lab::synthetic::evaluate(
            args.zoo_offset..args.zoo_offset + count,
            &policies[0],
            &args.seeds,
        )?;
        if args.json {
            println!("{}", serde_json::to_string(&rows)?);
            return Ok(());
        }
        let met = rows.iter().filter(|r| r.sla_met).count();
        let mut log_ratio = 0.0;
        for r in &rows {
            log_ratio += r.ratio.ln();
            println!(
                "zoo {:>3} {:<58} a={:.3} sat={:.4} min={:.4} {} ratio {:.3} (vs always-best {:.3}) explore {:.1}%",
                r.seed,
                r.about,
                r.alpha,
                r.satisfaction,
                r.satisfaction_min,
                if r.sla_met { "met   " } else { "MISSED" },
                r.ratio,
                r.cost_per_request / r.always_best_cost,
                100.0 * r.explore_fraction
            );
        }
        println!(
            "{}: alpha met on {met}/{} zoos; cost vs random-alpha: geometric mean {:.3}, worst {:.3}",
            policies[0].name(),
            rows.len(),
            (log_ratio / rows.len().max(1) as f64).exp(),
            rows.iter().map(|r| r.ratio).fold(0.0, f64::max)
        );
        // Zoos whose cheapest mix is a single model have nothing to rank: they count at 1.
        let ceiling: Vec<f64> = rows
            .iter()
            .map(|r| r.ranked_hindsight_ratio.unwrap_or(1.0))
            .collect();
        println!(
            "ranked-alpha-hindsight (the most a ranking on the zoo's question vectors could save): geometric mean {:.3} of random-alpha",
            (ceiling.iter().map(|c| c.ln()).sum::<f64>() / ceiling.len().max(1) as f64).exp()
        );
        return Ok(());
    }
    let input = args
        .input
        .clone()
        .context("--input is required for --format mess and routellm")?;
    let prior = match &args.prior {
        Some(path) => Some(ferry_lab::prior::load(
            path,
            args.embed.manifest(&args.registry)?.embedding_space(),
        )?),
        None => None,
    };
    // Question embeddings (cached under --cache-dir), for the policies that read them.
    let features = |texts: Vec<&str>| -> anyhow::Result<(Vec<Arc<Vec<f32>>>, usize)> {
        if !needs_features {
            return Ok((Vec::new(), 0));
        }
        let m = &args.embed.manifest(&args.registry)?;
        let (embeddings, encode_s) =
            replay::cached_embeddings(&texts, &m.id, &args.embed.cache_dir, |texts| {
                let enc = ferry_engine::encoder::SentenceEncoder::load(
                    m,
                    &args.registry.model_dir,
                    &ferry_engine::default_device(),
                )?;
                Ok((enc.embed(texts)?, enc.dim()))
            })?;
        match encode_s {
            Some(s) => eprintln!("embedded {} questions in {s:.1} s", texts.len()),
            None => eprintln!("embeddings of {} questions from the cache", texts.len()),
        }
        Ok(embeddings)
    };
    let trace_series = |name: &str, trace: &[(f64, f64)], cost: bool| plot::Series {
        name: name.to_string(),
        points: trace
            .iter()
            .enumerate()
            .map(|(i, &(s, c))| ((i + 1) as f64, if cost { c } else { s }))
            .collect(),
    };

    if args.format == ReplayFormat::Routellm {
        // Token counts for the cost: the encoder's own tokenizer.json, without its truncation.
        let m = args.embed.manifest(&args.registry)?;
        let tok_path = ferry_engine::source::ModelLocation::of(&m, &args.registry.model_dir)
            .file("tokenizer.json")?;
        let mut tok = ferry_engine::tokenizer::from_file(&tok_path)?;
        tok.with_truncation(None)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        let count = |t: &str| tok.encode(t, false).map(|e| e.len()).unwrap_or(0);
        let load = routellm::LoadOptions {
            prices: routellm::Prices {
                weak_per_mtok: args.price_weak,
                strong_per_mtok: args.price_strong,
            },
            mt_bench_threshold: args.mt_bench_threshold,
            task_per_file: args.task_per_file,
        };
        let d = routellm::load(&input, &load, &count)?;
        eprintln!(
            "RouteLLM {}: {} requests, {} of {} excluded as contaminated",
            d.benchmark.name(),
            d.data.records.len(),
            d.excluded,
            d.rows
        );
        let (features, dim) = features(d.data.records.iter().map(|r| r.text.as_str()).collect())?;
        let sweep = routellm::SweepOptions {
            policies,
            alphas: if args.alpha.is_empty() {
                routellm::default_alphas(&d)
            } else {
                args.alpha.clone()
            },
            v: args.v.unwrap_or_else(|| d.data.default_v() * args.v_scale),
            c: args.c,
            seeds: args.seeds.clone(),
            prior: prior.clone(),
        };
        if let Some(p) = &prior {
            ferry_lab::prior::refuse_if_trained_on(p, &[d.benchmark.name().to_string()])?;
        }
        let t = std::time::Instant::now();
        let report = routellm::evaluate(&d, &features, dim, &sweep)?;
        eprintln!(
            "swept {} alphas x {} policies x {} seeds in {:.1} s",
            sweep.alphas.len(),
            sweep.policies.len(),
            sweep.seeds.len(),
            t.elapsed().as_secs_f64()
        );
        if let Some(path) = &args.plot {
            let (w, s) = (report.weak.performance, report.strong.performance);
            let mut curves: Vec<plot::Series> = report
                .policies
                .iter()
                .map(|p| plot::Series {
                    name: format!("{} (APGR {:.3})", p.policy, p.apgr),
                    points: routellm::with_endpoints(
                        &p.sweep
                            .iter()
                            .map(|r| routellm::CurvePoint {
                                strong_pct: r.strong_pct,
                                performance: r.performance,
                            })
                            .collect::<Vec<_>>(),
                        w,
                        s,
                    )
                    .iter()
                    .map(|c| (c.strong_pct, c.performance))
                    .collect(),
                })
                .collect();
            let mut random: Vec<(f64, f64)> = report
                .random_router
                .sweep
                .iter()
                .map(|c| (c.strong_pct, c.performance))
                .collect();
            random.sort_by(|a, b| a.0.total_cmp(&b.0));
            curves.push(plot::Series {
                name: format!("random router (APGR {:.3})", report.random_router.apgr),
                points: random,
            });
            plot::draw_routellm(
                path,
                &format!(
                    "RouteLLM {}: MESS+ over an α sweep, {} requests",
                    report.benchmark.name(),
                    report.requests
                ),
                report.benchmark.unit(),
                &curves,
                w,
                s,
            )?;
            eprintln!("plot written to {}", path.display());
        }
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", routellm::render(&report));
        }
        return Ok(());
    }

    anyhow::ensure!(
        !args.alpha.is_empty(),
        "--alpha is required for --format mess"
    );
    anyhow::ensure!(
        policies.len() == 1,
        "--format mess replays one --policy at a time"
    );
    let data = replay::Dataset::load_with_task(
        &input,
        args.models.as_deref(),
        &args.cost_prefix,
        args.task_column.as_deref(),
    )?;
    if let Some(p) = &prior {
        ferry_lab::prior::refuse_if_trained_on(p, &ferry_lab::prior::benchmarks_of(&data, &input))?;
    }
    let mut opts = replay::ReplayOptions {
        alpha: args.alpha[0],
        v: args.v.unwrap_or_else(|| data.default_v() * args.v_scale),
        c: args.c,
        seeds: args.seeds.clone(),
        policy: policies[0].clone(),
        prior,
    };
    let (features, dim) = features(data.records.iter().map(|r| r.text.as_str()).collect())?;
    let t = std::time::Instant::now();
    let mut runs = Vec::new();
    for &alpha in &args.alpha {
        opts.alpha = alpha;
        runs.push(replay::replay(&data, &features, dim, &opts)?);
    }
    eprintln!(
        "replayed {} seeds x {} alphas in {:.1} s",
        opts.seeds.len(),
        args.alpha.len(),
        t.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.plot {
        let (first, main, baselines) = &runs[0];
        let named: Vec<(&str, &replay::RunSummary)> =
            std::iter::once((first.policy.as_str(), main))
                .chain(baselines.iter().map(|(k, v)| (k.as_str(), v)))
                .collect();
        let mut p = plot::ReplayPlot {
            title: format!(
                "ferry replay {}: {} vs baselines, {} requests (seed {})",
                input.display(),
                first.policy,
                first.requests,
                opts.seeds[0]
            ),
            cost_unit: args.cost_prefix.clone(),
            alpha: first.alpha,
            satisfaction: named
                .iter()
                .map(|(n, r)| trace_series(n, &r.trace, false))
                .collect(),
            cost: named
                .iter()
                .map(|(n, r)| trace_series(n, &r.trace, true))
                .collect(),
            ..Default::default()
        };
        if runs.len() > 1 {
            let mut sat: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            let mut cost: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for (r, _, _) in &runs {
                let rows = std::iter::once((r.policy.clone(), r.satisfaction, r.cost_total)).chain(
                    r.baselines
                        .iter()
                        .map(|(k, b)| (k.clone(), b.satisfaction, b.cost_total)),
                );
                for (name, s, c) in rows {
                    sat.entry(name.clone()).or_default().push((r.alpha, s));
                    cost.entry(name)
                        .or_default()
                        .push((r.alpha, c / r.requests as f64));
                }
            }
            // The policy first, so it gets the first colour as in the per-request panels.
            let order: Vec<String> = named.iter().map(|(n, _)| n.to_string()).collect();
            let series = |m: &BTreeMap<String, Vec<(f64, f64)>>| {
                order
                    .iter()
                    .filter_map(|n| {
                        m.get(n).map(|p| plot::Series {
                            name: n.clone(),
                            points: p.clone(),
                        })
                    })
                    .collect()
            };
            p.sweep_satisfaction = series(&sat);
            p.sweep_cost = series(&cost);
        }
        plot::draw_replay(path, &p)?;
        eprintln!("plot written to {}", path.display());
    }
    if args.json {
        if runs.len() == 1 {
            println!("{}", serde_json::to_string(&runs[0].0)?);
        } else {
            let reports: Vec<&replay::Report> = runs.iter().map(|r| &r.0).collect();
            println!("{}", serde_json::to_string(&reports)?);
        }
        return Ok(());
    }
    for (i, (report, _, _)) in runs.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print_replay_report(report);
    }
    fn print_replay_report(report: &ferry_lab::replay::Report) {
        println!(
        "{} requests ({} duplicates dropped) · models {:?} · alpha {} · V {:.3e} · c {} · seeds {:?}",
        report.requests, report.duplicates_dropped, report.models, report.alpha, report.v, report.c, report.seeds
    );
        println!(
            "{:<22} {:>12} {:>6} {:>14} {:>12}  calls",
            "policy", "satisfaction", "SLA", "cost total", "cost/request"
        );
        let calls = |c: &std::collections::BTreeMap<String, f64>| {
            report
                .models
                .iter()
                .map(|m| format!("{m} {:.0}%", 100.0 * c.get(m).copied().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "{:<22} {:>11.1}% {:>6} {:>14.0} {:>12.1}  {} (explore {:.1}%)",
            report.policy,
            100.0 * report.satisfaction,
            if report.sla_met_every_seed {
                "met"
            } else {
                "MISSED"
            },
            report.cost_total,
            report.cost_per_request,
            calls(&report.calls),
            100.0 * report.explore_fraction
        );
        for (name, b) in &report.baselines {
            let met =
                ferry_lab::replay::meets_sla(b.satisfaction, b.satisfaction_min, report.alpha);
            println!(
                "{:<22} {:>11.1}% {:>6} {:>14.0} {:>12.1}{}",
                name,
                100.0 * b.satisfaction,
                if met { "met" } else { "-" },
                b.cost_total,
                b.cost_total / report.requests as f64,
                b.target
                    .map(|t| format!("  (the mix aimed at {t:.3})"))
                    .unwrap_or_default()
            );
        }
        println!(
            "SLA \"met\": the seed mean reaches alpha and every seed is within 0.5 point of it; \
             random-alpha-met is the cheapest fixed split that does so on these seeds; \
             ranked-alpha-hindsight splits random-alpha's pair by a ridge of each request's gain \
             on its embedding and length, cross-fitted on the rest of the stream, at the share \
             that lands on alpha: the most a ranking on this encoder could save"
        );
    }
    Ok(())
}

pub(crate) fn train_prior(
    registry: Registry,
    embed: EmbedArgs,
    mess: &Path,
    routellm: &Path,
    exclude: &[String],
    out: &Path,
) -> anyhow::Result<()> {
    use ferry_lab::{prior, replay};
    let m = embed.manifest(&registry)?;
    let tok_path =
        ferry_engine::source::ModelLocation::of(&m, &registry.model_dir).file("tokenizer.json")?;
    let tok = ferry_engine::tokenizer::from_file(&tok_path)?;
    let count = |t: &str| tok.encode(t, false).map(|e| e.len()).unwrap_or(0);
    let sources = prior::sources(
        mess.is_dir().then_some(mess),
        routellm.is_dir().then_some(routellm),
        exclude,
        &count,
    )?;
    let mut encoder = None;
    let mut embed_texts = |texts: &[&str]| -> ferry_core::Result<replay::Embeddings> {
        let (e, secs) = replay::cached_embeddings(texts, &m.id, &embed.cache_dir, |texts| {
            if encoder.is_none() {
                encoder = Some(ferry_engine::encoder::SentenceEncoder::load(
                    &m,
                    &registry.model_dir,
                    &ferry_engine::default_device(),
                )?);
            }
            let enc = encoder.as_ref().expect("loaded above");
            Ok((enc.embed(texts)?, enc.dim()))
        })?;
        if let Some(s) = secs {
            eprintln!("embedded {} questions in {s:.1} s", texts.len());
        }
        Ok(e)
    };
    let mut command = String::from("ferry router train-prior");
    if !exclude.is_empty() {
        command.push_str(&format!(" --exclude {}", exclude.join(",")));
    }
    let t = std::time::Instant::now();
    let p = prior::train(&sources, m.embedding_space(), &command, &mut embed_texts)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, p.to_json()).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "prior trained on {} questions ({} labels) of {} in {:.1} s: l2 {}, held-out log-loss {:.4} (without the prior {:.4}) -> {}",
        p.questions,
        p.labels,
        p.trained_on.join(", "),
        t.elapsed().as_secs_f64(),
        p.l2,
        p.heldout_logloss,
        p.heldout_logloss_without,
        out.display()
    );
    Ok(())
}

/// Runs `ferry router …`.
pub(crate) fn router(cmd: RouterCommand) -> anyhow::Result<()> {
    match cmd {
        RouterCommand::TrainPrior {
            registry,
            embed,
            mess,
            routellm,
            exclude,
            out,
        } => train_prior(registry, embed, &mess, &routellm, &exclude, &out),
    }
}
