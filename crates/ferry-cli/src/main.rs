//! `ferry`: the command-line client. Chat with a running ferryd, list and fetch models, and
//! benchmark the local engine against llama.cpp. This file only parses the command line and
//! hands each subcommand to its module under `commands/` (the reusable work is in the
//! `ferry_cli` library).

use clap::{Parser, Subcommand};

mod commands;

use commands::{bench, chat, energy, keys, models, replay, tokio_main};

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
    Chat(chat::ChatArgs),
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
    Models(models::ModelsCommand),
    /// Bearer tokens for ferryd's `auth.tokens_file`.
    #[command(subcommand)]
    Token(keys::TokenCommand),
    /// Certificates for mutual TLS between ferryd and ferry-cloud.
    #[command(subcommand)]
    Certs(keys::CertsCommand),
    /// Benchmarks: the engine (default) beside llama.cpp, or `energy` for the sampler's cost.
    Bench(bench::BenchCmd),
    /// Energy sources on this machine.
    #[command(subcommand)]
    Energy(energy::EnergyCommand),
    /// Replay recorded per-request outcomes through a routing policy (MESS+ data format).
    Replay(replay::ReplayArgs),
    /// TMO placement policies: train on the M4A1 dialogue log, evaluate beside the baselines.
    #[command(subcommand)]
    Policy(ferry_lab::policy::PolicyCommand),
    /// The zoo router (mixrank): its pretrained difficulty prior.
    #[command(subcommand)]
    Router(replay::RouterCommand),
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
        Command::Chat(args) => tokio_main(chat::chat(args, token)),
        Command::Status { addr, json } => tokio_main(chat::status(addr, json, token)),
        Command::Models(cmd) => models::run(cmd, token),
        Command::Token(cmd) => keys::token(cmd),
        Command::Certs(cmd) => keys::certs(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Energy(cmd) => energy::run(cmd),
        Command::Replay(args) => replay::run_replay(args),
        Command::Policy(cmd) => ferry_lab::policy::run(cmd),
        Command::Router(cmd) => replay::router(cmd),
    }
}
