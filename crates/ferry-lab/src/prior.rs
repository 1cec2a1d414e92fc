//! `ferry router train-prior`: the difficulty prior of mixrank, trained on public per-question
//! labels (the MESS+ authors' Llama measurements and RouteLLM's GPT-4/Mixtral labels), and the
//! checks that keep a prior away from the stream it is evaluated on.
//!
//! Benchmarks are named `mess-llama/<folder>` and `routellm/<benchmark>`; two names belong to
//! the same *family* when they hold the same questions (every `mmlu*` is one family: the MESS+
//! data's MMLU abstract algebra is a slice of RouteLLM's MMLU). Excluding a benchmark excludes
//! its family.

use std::path::{Path, PathBuf};

use ferry_core::{Error, Result};
use ferry_router::mixrank::knn::unit;
use ferry_router::mixrank::prior::{self, DifficultyPrior, PriorExample, PriorTraining};

use crate::replay::{Dataset, Embeddings};
use crate::routellm;

/// The family a benchmark name belongs to (see the module docs).
pub fn family(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase();
    if base.starts_with("mmlu") {
        "mmlu".into()
    } else {
        base
    }
}

/// Reads a prior file and checks that it reads the embeddings of `encoder`.
pub fn load(path: &Path, encoder: &str) -> Result<DifficultyPrior> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    DifficultyPrior::from_json_for(&text, encoder).map_err(|e| Error::InvalidFile {
        what: "difficulty prior",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Refuses a prior that saw any of `benchmarks` (by family): a prior must never have seen the
/// labels of the stream it is evaluated on.
pub fn refuse_if_trained_on(p: &DifficultyPrior, benchmarks: &[String]) -> Result<()> {
    for b in benchmarks {
        if let Some(seen) = p.trained_on.iter().find(|t| family(t) == family(b)) {
            return Err(Error::invalid(
                "prior",
                format!(
                    "it was trained on `{seen}`, the same questions as `{b}` being replayed; \
                     train one without them (ferry router train-prior --exclude {})",
                    family(b)
                ),
            ));
        }
    }
    Ok(())
}

/// The benchmark names in a replayed MESS+-format data set: the `benchmark_name` prefixes of
/// its request keys, or the input folder's name when rows carry none.
pub fn benchmarks_of(data: &Dataset, input: &Path) -> Vec<String> {
    let mut names: Vec<String> = data
        .records
        .iter()
        .filter_map(|r| r.key.split_once('/').map(|(b, _)| b.to_string()))
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        names.push(
            input
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    names
}

/// One labelled benchmark for training.
pub struct Source {
    pub name: String,
    pub data: Dataset,
}

/// The MESS+ benchmarks under `dir` (one folder each) and RouteLLM's MMLU and GSM8K under
/// `routellm_dir`, minus the excluded families. `count_tokens` prices RouteLLM's answers (the
/// prior reads only labels, so any counter will do).
pub fn sources(
    mess_dir: Option<&Path>,
    routellm_dir: Option<&Path>,
    exclude: &[String],
    count_tokens: &dyn Fn(&str) -> usize,
) -> Result<Vec<Source>> {
    let excluded: Vec<String> = exclude.iter().map(|e| family(e)).collect();
    let keep = |name: &str| !excluded.contains(&family(name));
    let mut out = Vec::new();
    if let Some(dir) = mess_dir {
        let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        folders.sort();
        for f in folders {
            let name = format!(
                "mess-llama/{}",
                f.file_name().unwrap_or_default().to_string_lossy()
            );
            if keep(&name) {
                out.push(Source {
                    data: Dataset::load(&f, None, "energy_consumption")?,
                    name,
                });
            }
        }
    }
    if let Some(dir) = routellm_dir {
        for b in ["mmlu", "gsm8k"] {
            let name = format!("routellm/{b}");
            if keep(&name) && dir.join(b).is_dir() {
                let d = routellm::load(
                    &dir.join(b),
                    &routellm::LoadOptions {
                        prices: routellm::Prices::default(),
                        mt_bench_threshold: 8.0,
                        task_per_file: false,
                    },
                    count_tokens,
                )?;
                out.push(Source { data: d.data, name });
            }
        }
    }
    if out.is_empty() {
        return Err(Error::invalid(
            "train-prior",
            "no benchmarks left to train on",
        ));
    }
    Ok(out)
}

/// Trains the prior on `sources`, embedding each benchmark's questions with `embed` (which
/// caches them).
pub fn train(
    sources: &[Source],
    encoder: &str,
    command: &str,
    embed: &mut dyn FnMut(&[&str]) -> Result<Embeddings>,
) -> Result<DifficultyPrior> {
    let mut examples = Vec::new();
    for (b, s) in sources.iter().enumerate() {
        let texts: Vec<&str> = s.data.records.iter().map(|r| r.text.as_str()).collect();
        let (vectors, _) = embed(&texts)?;
        for (r, v) in s.data.records.iter().zip(&vectors) {
            let Some(x) = unit(v) else { continue };
            examples.push(PriorExample {
                x,
                benchmark: b,
                labels: r.satisfied.iter().copied().enumerate().collect(),
            });
        }
    }
    let opts = PriorTraining {
        encoder: encoder.to_string(),
        benchmarks: sources.iter().map(|s| s.name.clone()).collect(),
        command: command.to_string(),
        ..PriorTraining::default()
    };
    prior::train(&examples, &opts).map_err(|e| Error::invalid("train-prior", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_group_the_same_questions() {
        assert_eq!(family("mess-llama/mmlu_abstract_algebra"), "mmlu");
        assert_eq!(family("routellm/mmlu"), "mmlu");
        assert_eq!(family("mess-llama/arc_easy"), "arc_easy");
        assert_ne!(family("arc_easy"), family("arc_challenge"));
    }
}
