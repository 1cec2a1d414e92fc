//! Subcommands of the `ferry` binary that live outside `main.rs`, and the arguments several of
//! them share (where manifests and model files are, which encoder embeds questions).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use ferry_core::ModelManifest;

pub(crate) mod bench;
pub(crate) mod chat;
pub(crate) mod energy;
pub(crate) mod keys;
pub(crate) mod models;
pub(crate) mod replay;

#[derive(Args)]
pub(crate) struct Registry {
    /// Directory of model manifests.
    #[arg(long, env = "FERRY_MANIFEST_DIR", default_value = "models")]
    pub(crate) manifest_dir: PathBuf,
    /// Directory of model files.
    #[arg(long, env = "FERRY_MODEL_DIR", default_value = "models/cache")]
    pub(crate) model_dir: PathBuf,
}

/// The sentence encoder that turns questions into routing features, and its cache.
#[derive(Args)]
pub(crate) struct EmbedArgs {
    /// Encoder model id (manifest) for the question embeddings.
    #[arg(long, default_value = "all-minilm-l6-v2-q8")]
    pub(crate) encoder: String,
    /// Where question embeddings are cached between runs.
    #[arg(long, env = "FERRY_CACHE_DIR", default_value = ".cache")]
    pub(crate) cache_dir: PathBuf,
}

impl EmbedArgs {
    /// The encoder's manifest from the registry.
    pub(crate) fn manifest(&self, registry: &Registry) -> anyhow::Result<ModelManifest> {
        load_manifests(&registry.manifest_dir)?
            .into_iter()
            .find(|m| m.id == self.encoder)
            .with_context(|| format!("no encoder manifest `{}`", self.encoder))
    }
}

pub(crate) fn load_manifests(dir: &Path) -> anyhow::Result<Vec<ModelManifest>> {
    ModelManifest::load_dir(dir).with_context(|| format!("reading manifests in {}", dir.display()))
}

/// Runs an async command on a multi-threaded tokio runtime.
pub(crate) fn tokio_main<F: std::future::Future<Output = anyhow::Result<()>>>(
    f: F,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}
