//! `ferry bench`: the engine beside llama.cpp (default), and the `energy`, `requests`,
//! `router`, `offload` and `ttft` benchmarks, each beside its peer.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::energy::EnergyArgs;
use super::{load_manifests, tokio_main, EmbedArgs, Registry};
use ferry_lab::bench;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct BenchCmd {
    #[command(subcommand)]
    pub(crate) what: Option<BenchWhat>,
    #[command(flatten)]
    pub(crate) engine: BenchArgs,
}

#[derive(Subcommand)]
pub(crate) enum BenchWhat {
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
    /// Time to first token as an app sees it: the real ferryd on loopback with the local zoo,
    /// a short chat question streamed over the OpenAI API on `auto` (routing included) and on
    /// named models, the first request after start, ferryd's RSS; beside llama.cpp streaming the
    /// same question on the same GGUF in the same run.
    Ttft {
        #[command(flatten)]
        registry: Registry,
        /// Models ferryd loads (the zoo `auto` routes among).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "smollm2-135m-instruct,gemma3-270m-it"
        )]
        load: Vec<String>,
        /// What the requests name, in order: the first request after start is the first's.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "auto,smollm2-135m-instruct"
        )]
        targets: Vec<String>,
        /// Requests per target.
        #[arg(long, default_value_t = 21)]
        requests: usize,
        /// Tokens generated per request.
        #[arg(long, default_value_t = 8)]
        max_tokens: usize,
        /// Threads for llama.cpp.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// ferryd binary; default: next to this `ferry`.
        #[arg(long)]
        ferryd: Option<PathBuf>,
        #[arg(
            long,
            env = "FERRY_BENCH_PYTHON",
            default_value = ".venv-bench/bin/python"
        )]
        peer_python: PathBuf,
        #[arg(long, default_value = "bench/llama_cpp_ttft.py")]
        peer_script: PathBuf,
        /// Skip the llama.cpp peer (ferryd alone, no comparison).
        #[arg(long)]
        no_peer: bool,
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
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) registry: Registry,
    /// Model id from the manifests, or a path to a GGUF file or model directory.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub(crate) model: String,
    #[arg(long, default_value_t = 64)]
    pub(crate) prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub(crate) gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub(crate) repeats: usize,
    /// Threads for llama.cpp (candle uses every core).
    #[arg(long, default_value_t = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))]
    pub(crate) threads: usize,
    /// Python with llama-cpp-python installed (scripts/setup-bench-peer makes .venv-bench).
    #[arg(
        long,
        env = "FERRY_BENCH_PYTHON",
        default_value = ".venv-bench/bin/python"
    )]
    pub(crate) peer_python: PathBuf,
    /// The peer measurement script.
    #[arg(long, default_value = "bench/llama_cpp_peer.py")]
    pub(crate) peer_script: PathBuf,
    /// Concurrent streams for the batching table (each count on its own, through ferry's
    /// batcher, the counts in turn round after round; "vs 1" is the median of each round's
    /// ratio to that round's single stream; 0 for none).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub(crate) streams: Vec<usize>,
    /// Skip the llama.cpp peer.
    #[arg(long)]
    pub(crate) no_peer: bool,
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
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
        streams: args.streams.iter().copied().filter(|&n| n > 0).collect(),
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
    if !ours.batched.is_empty() {
        println!(
            "{:<22} {:>14} {:>14} {:>10} {:>10}",
            "ferry, streams at once", "aggregate tok/s", "per stream", "mean batch", "vs 1"
        );
        for b in &ours.batched {
            println!(
                "{:<22} {:>14.1} {:>14.1} {:>10.2} {:>10}",
                b.streams,
                b.aggregate_tok_s,
                b.per_stream_decode_tok_s,
                b.mean_batch,
                b.vs_one_stream
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_default()
            );
        }
        if let Some(p) = &peer {
            // llama-cpp-python's `Llama` decodes one sequence at a time, so its aggregate at
            // any number of streams is its single-stream decode.
            println!(
                "{:<22} {:>14.1}   (llama-cpp-python decodes one sequence at a time)",
                "llama.cpp, any", p.decode_tok_s
            );
        }
    }
    if let Some(bytes) = ours.resident_weight_bytes {
        let per_token_gb = bytes as f64 / 1e9;
        println!(
            "memory: {:.0} MB of weights read per decoded token{}; single-thread read bandwidth {:.1} GB/s \
             -> bandwidth-bound ceiling {:.0} tok/s; ferry reaches {:.1} GB/s",
            bytes as f64 / 1e6,
            model_bytes
                // The file also holds metadata and the tokenizer: only a clear excess means
                // weights were requantized at load.
                .filter(|&f| bytes > f + f / 20)
                .map(|f| format!(" (file {:.0} MB, requantized at load)", f as f64 / 1e6))
                .unwrap_or_default(),
            bandwidth,
            bandwidth / per_token_gb,
            ours.decode_tok_s * per_token_gb
        );
    }
    peer_failed()
}

pub(crate) fn bench_requests(
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

pub(crate) fn bench_energy(
    args: EnergyArgs,
    seconds: f64,
    rates: &[f64],
    json: bool,
) -> anyhow::Result<()> {
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

pub(crate) fn bench_router(
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
            ferry_lab::bench::STREAM_WINDOW.min(r.stream_questions),
            r.stream_tokens_p50
        ),
        r.stream_p50_ms,
        r.stream_p99_ms
    );
    println!(
        "{:<44} {:>8.2}ms {:>8.2}ms",
        format!(
            "encoder, last {} of the first {}",
            ferry_lab::bench::STREAM_WINDOW.min(r.stream_questions),
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
            ferry_lab::bench::STREAM_WINDOW.min(r.stream_questions)
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

/// Runs `ferry bench …`.
pub(crate) fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    let Some(what) = cmd.what else {
        return run_bench(cmd.engine);
    };
    match what {
        BenchWhat::Energy {
            energy,
            seconds,
            rates,
            json,
        } => bench_energy(energy, seconds, &rates, json),
        BenchWhat::Requests {
            registry,
            model,
            requests,
            prompt_tokens,
            gen_tokens,
            sample_hz,
            json,
        } => bench_requests(
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
        BenchWhat::Router {
            registry,
            input,
            embed,
            peer_python,
            peer_script,
            json,
        } => bench_router(registry, input, embed, (peer_python, peer_script), json),
        BenchWhat::Ttft {
            registry,
            load,
            targets,
            requests,
            max_tokens,
            threads,
            ferryd,
            peer_python,
            peer_script,
            no_peer,
            json,
        } => {
            use ferry_cli::ttft_bench;
            // The peer runs the first named model (the one `auto` is compared with).
            let peer = if no_peer {
                None
            } else {
                let model = targets
                    .iter()
                    .find(|t| t.as_str() != "auto")
                    .or(load.first())
                    .cloned()
                    .unwrap_or_default();
                let manifests = load_manifests(&registry.manifest_dir)?;
                let manifest = manifests
                    .iter()
                    .find(|m| m.id == model)
                    .with_context(|| format!("no manifest `{model}` for the peer"))?;
                let gguf = bench::gguf_path(manifest, &registry.model_dir).with_context(|| {
                    format!("the peer needs `{model}`'s GGUF file (ferry models fetch)")
                })?;
                Some(ttft_bench::PeerOptions {
                    python: peer_python,
                    script: peer_script,
                    gguf,
                    model,
                    threads,
                })
            };
            let opts = ttft_bench::TtftBenchOptions {
                manifest_dir: registry.manifest_dir,
                model_dir: registry.model_dir,
                load,
                targets,
                requests,
                max_tokens,
                ferryd,
                peer,
            };
            tokio_main(async {
                let b = ttft_bench::run(&opts).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&b)?);
                } else {
                    print!("{}", ttft_bench::render(&b));
                }
                // A comparison whose peer did not run has failed.
                match &b.peer_error {
                    Some(why) => Err(anyhow::anyhow!(
                        "the peer (llama.cpp) did not run, so this benchmark has no comparison: {why} \
                         (--no-peer measures ferryd alone)"
                    )),
                    None => Ok(()),
                }
            })
        }
        BenchWhat::Offload {
            registry,
            model,
            requests,
            concurrency,
            seconds,
            ferryd,
            ferry_cloud,
            json,
        } => {
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
    }
}
