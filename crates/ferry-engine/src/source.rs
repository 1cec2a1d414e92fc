//! Finding a model's files: its local directory first, then the Hugging Face hub cache, then —
//! only with the `hub-download` feature — the hub itself. Offline, a missing file is an error
//! that names the file and how to get it.

use std::path::{Path, PathBuf};

use ferry_core::{Error, ModelFormat, ModelManifest, Result, Tier};

/// Where one model's files are looked up.
#[derive(Debug, Clone)]
pub struct ModelLocation {
    /// Model id (for messages).
    pub id: String,
    /// Local directory checked first.
    pub dir: PathBuf,
    /// Hub repo and revision, if the manifest names one.
    pub hub: Option<(String, String)>,
    /// Whether `ferry models fetch` knows how to install this model.
    pub fetchable: bool,
}

impl ModelLocation {
    /// The location of `manifest`'s files under the model cache directory `model_dir`.
    pub fn of(manifest: &ModelManifest, model_dir: &Path) -> Self {
        ModelLocation {
            id: manifest.id.clone(),
            dir: manifest.local_dir(model_dir),
            hub: manifest.hub.clone().map(|h| {
                let rev = manifest
                    .revision
                    .clone()
                    .unwrap_or_else(|| "main".to_string());
                (h, rev)
            }),
            fetchable: manifest.fetch.is_some(),
        }
    }

    /// True if `name` can be found without the network.
    pub fn has_local(&self, name: &str) -> bool {
        self.dir.join(name).is_file() || self.hub_cached(name).is_some()
    }

    fn hub_cached(&self, name: &str) -> Option<PathBuf> {
        let (repo, rev) = self.hub.as_ref()?;
        let repo = hf_hub::Repo::with_revision(repo.clone(), hf_hub::RepoType::Model, rev.clone());
        hf_hub::Cache::from_env().repo(repo).get(name)
    }

    /// Resolves one file: local directory, then hub cache, then (feature `hub-download`) the hub.
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        let local = self.dir.join(name);
        if local.is_file() {
            return Ok(local);
        }
        if let Some(p) = self.hub_cached(name) {
            return Ok(p);
        }
        let fetch_hint = self
            .fetchable
            .then(|| format!("run `ferry models fetch {}` to install it", self.id));
        if let Some((repo, rev)) = &self.hub {
            #[cfg(feature = "hub-download")]
            {
                let api = hf_hub::api::sync::Api::new()
                    .map_err(|e| Error::Unavailable(format!("hub client: {e}")))?;
                let r =
                    hf_hub::Repo::with_revision(repo.clone(), hf_hub::RepoType::Model, rev.clone());
                return api.repo(r).get(name).map_err(|e| Error::MissingModelFile {
                    path: local.clone(),
                    hint: format!(
                        "downloading {repo}@{rev}/{name} from the hub failed: {e}{}",
                        fetch_hint.map(|h| format!("; or {h}")).unwrap_or_default()
                    ),
                });
            }
            #[cfg(not(feature = "hub-download"))]
            {
                let hub_hint = format!(
                    "it is not in the Hugging Face cache ({}) as {repo}@{rev}/{name} either; download it with \
                     `huggingface-cli download {repo} {name}`, or build with `--features hub-download` to let \
                     ferry fetch it when online",
                    hf_hub::Cache::from_env().path().display()
                );
                let hint = match fetch_hint {
                    Some(h) => format!("{h}; {hub_hint}"),
                    None => hub_hint,
                };
                return Err(Error::MissingModelFile { path: local, hint });
            }
        }
        let hint = fetch_hint.unwrap_or_else(|| {
            "place the model's files in that directory, or give the manifest a `hub` id".to_string()
        });
        Err(Error::MissingModelFile { path: local, hint })
    }

    /// Resolves an optional file: `Ok(None)` when it is nowhere to be found.
    pub fn optional_file(&self, name: &str) -> Result<Option<PathBuf>> {
        match self.file(name) {
            Ok(p) => Ok(Some(p)),
            Err(Error::MissingModelFile { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Builds a manifest for a model given only as a path or a hub id, so that `--model PATH` works
/// for any local GGUF file, safetensors directory, or `org/name[@rev]` hub id.
///
/// - `path/to/model.gguf`: a GGUF file; family read from its metadata at load time.
/// - `path/to/dir` with `config.json`: a safetensors checkpoint.
/// - `path/to/dir` with exactly one `.gguf`: that file.
/// - `org/name[@rev]` (not an existing path): a safetensors repo on the hub; append
///   `:file.gguf` to name one GGUF file of the repo instead.
pub fn adhoc_manifest(spec: &str) -> Result<ModelManifest> {
    let path = Path::new(spec);
    let base = |id: String, format: ModelFormat| ModelManifest {
        id,
        family: "auto".to_string(),
        format,
        kind: Default::default(),
        tier: Tier::Local,
        capabilities: vec!["text".to_string()],
        context_length: None,
        dir: None,
        hub: None,
        revision: None,
        weights: None,
        chat_template: None,
        eos_tokens: Vec::new(),
        example_turns: Vec::new(),
        stop: Vec::new(),
        cpu_repack_q4_1: true,
        cost: Default::default(),
        pooling: Default::default(),
        encoder_weights: Default::default(),
        embeds_like: None,
        fetch: None,
        description: None,
    };
    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".to_string())
    };
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            return Err(Error::invalid(
                "model",
                format!("{spec} is a file but not a .gguf file"),
            ));
        }
        let mut m = base(stem(path), ModelFormat::Gguf);
        m.dir = Some(abs(path.parent().unwrap_or(Path::new("."))));
        m.weights = Some(path.file_name().unwrap().to_string_lossy().into_owned());
        return Ok(m);
    }
    if path.is_dir() {
        let mut m = base(stem(path), ModelFormat::Safetensors);
        m.dir = Some(abs(path));
        if path.join("config.json").is_file() {
            return Ok(m);
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(format!("reading {spec}"), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("gguf"))
            .collect();
        return match ggufs.as_slice() {
            [one] => {
                m.format = ModelFormat::Gguf;
                m.weights = Some(one.file_name().unwrap().to_string_lossy().into_owned());
                Ok(m)
            }
            _ => Err(Error::invalid(
                "model",
                format!("{spec} has no config.json and not exactly one .gguf file"),
            )),
        };
    }
    let looks_like_hub =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
    if !looks_like_hub {
        return Err(Error::invalid(
            "model",
            format!("{spec} is neither an existing file or directory nor a hub id `org/name`"),
        ));
    }
    let (repo, file) = match spec.split_once(':') {
        Some((r, f)) => (r, Some(f.to_string())),
        None => (spec, None),
    };
    let (repo, rev) = match repo.split_once('@') {
        Some((r, v)) => (r.to_string(), Some(v.to_string())),
        None => (repo.to_string(), None),
    };
    let mut m = base(repo.replace('/', "--"), ModelFormat::Safetensors);
    m.hub = Some(repo);
    m.revision = rev;
    if let Some(f) = file {
        m.format = ModelFormat::Gguf;
        m.weights = Some(f);
    }
    // No local copy: resolution goes straight to the hub cache.
    m.dir = Some(PathBuf::from("/nonexistent-ferry-adhoc"));
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adhoc_specs_resolve_by_shape() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        std::fs::write(&gguf, b"x").unwrap();
        let m = adhoc_manifest(gguf.to_str().unwrap()).unwrap();
        assert_eq!(m.format, ModelFormat::Gguf);
        assert_eq!(m.weights.as_deref(), Some("tiny.gguf"));
        let m = adhoc_manifest(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(m.format, ModelFormat::Gguf);

        let m = adhoc_manifest("HuggingFaceTB/SmolLM2-135M-Instruct@main").unwrap();
        assert_eq!(
            m.hub.as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M-Instruct")
        );
        assert_eq!(m.revision.as_deref(), Some("main"));
        assert!(adhoc_manifest("./nope/nothing/here").is_err());
    }

    #[test]
    fn missing_file_error_names_path_and_remedy() {
        let dir = tempfile::tempdir().unwrap();
        let loc = ModelLocation {
            id: "m".into(),
            dir: dir.path().to_path_buf(),
            hub: Some(("org/absent-model-for-test".into(), "main".into())),
            fetchable: false,
        };
        let err = loc.file("model.gguf").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("model.gguf"), "{msg}");
        assert!(msg.contains("org/absent-model-for-test"), "{msg}");
        assert!(loc.optional_file("tokenizer.json").unwrap().is_none());
        let loc = ModelLocation {
            hub: None,
            fetchable: true,
            ..loc
        };
        assert!(loc
            .file("x.gguf")
            .unwrap_err()
            .to_string()
            .contains("ferry models fetch m"));
    }
}
