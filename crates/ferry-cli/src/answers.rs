//! `ferry models check`: whether a local model answers short questions at all. Each question of
//! a fixture (`tests/fixtures/short-qa/questions.jsonl`: capitals, arithmetic, yes/no facts) is
//! asked alone, greedily, through the model's chat template; a reply is scored against the
//! accepted answers, and the reply's end is recorded — a model that never ends its turn streams
//! until `max_tokens`, which is what an app would get from it.

use std::ops::ControlFlow;
use std::path::Path;

use serde::{Deserialize, Serialize};

use ferry_core::{ChatMessage, Error, FinishReason, ModelManifest, Result, Role, SamplingParams};
use ferry_engine::source::ModelLocation;
use ferry_engine::{GenerateOptions, LoadedModel};

/// One question of the fixture.
#[derive(Debug, Clone, Deserialize)]
pub struct Question {
    pub question: String,
    /// Accepted answers (any one is right).
    pub answers: Vec<String>,
    /// `capital`, `arithmetic`, `yes/no`, ...: `yes/no` is scored by the first yes or no.
    pub kind: String,
}

/// Reads a JSON-lines fixture of questions.
pub fn load_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: Question = serde_json::from_str(line).map_err(|e| Error::InvalidFile {
            what: "question fixture",
            path: path.to_path_buf(),
            reason: format!("line {}: {e}", i + 1),
        })?;
        if q.answers.is_empty() {
            return Err(Error::InvalidFile {
                what: "question fixture",
                path: path.to_path_buf(),
                reason: format!("line {}: no accepted answer", i + 1),
            });
        }
        out.push(q);
    }
    Ok(out)
}

/// The words of `text`, lower-cased, split on anything that is not a letter or a digit.
fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Whether `reply` answers `q`: only the reply's first paragraph counts (a model that goes on to
/// write more questions and answers is judged on its own first answer). A yes/no question is
/// right when the first standalone yes or no is the expected one; any other when an accepted
/// answer appears as a whole word sequence.
pub fn score(q: &Question, reply: &str) -> bool {
    let first = reply.trim_start().split("\n\n").next().unwrap_or("");
    let mut got = words(first);
    // An echo of the question is not an answer ("... Answer yes or no." holds a "yes").
    let asked = words(&q.question);
    while !asked.is_empty() && got.starts_with(&asked) {
        got.drain(..asked.len());
    }
    let got: Vec<String> = got
        .join(" ")
        .replace("yes or no", " ")
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    if q.kind == "yes/no" {
        let want = q.answers[0].to_lowercase();
        return got
            .iter()
            .find(|w| *w == "yes" || *w == "no")
            .is_some_and(|w| *w == want);
    }
    q.answers.iter().any(|a| {
        let a = words(a);
        !a.is_empty() && got.windows(a.len()).any(|w| w == a.as_slice())
    })
}

/// One model's result over the fixture.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub model: String,
    /// `as shipped` (with the manifest's example turns, if it has any) or `no examples`.
    pub template: String,
    pub questions: usize,
    pub correct: usize,
    /// Replies that ended by the model's own end of turn (or a stop), not at `max_tokens`.
    pub ended_turn: usize,
    pub mean_completion_tokens: f64,
    /// A few replies, for the eye.
    pub samples: Vec<(String, String)>,
}

/// Asks every question of `questions` once, greedily, with at most `max_tokens` tokens.
pub fn check(
    model: &LoadedModel,
    questions: &[Question],
    max_tokens: u32,
    examples: bool,
) -> Result<CheckResult> {
    let params = SamplingParams::greedy(max_tokens);
    let (mut correct, mut ended, mut tokens) = (0, 0, 0u64);
    let mut samples = Vec::new();
    for q in questions {
        let prompt =
            model.encode_chat_with(&[ChatMessage::text(Role::User, &q.question)], examples)?;
        let out = model.generate(
            &prompt,
            &params,
            GenerateOptions::default(),
            &mut |_: &str| ControlFlow::Continue(()),
        )?;
        let reply = out.text;
        correct += usize::from(score(q, &reply));
        ended += usize::from(out.finish_reason != FinishReason::Length);
        tokens += out.completion_tokens as u64;
        if samples.len() < 3 {
            samples.push((q.question.clone(), reply));
        }
    }
    Ok(CheckResult {
        model: model.info().id.clone(),
        template: if examples {
            "as shipped"
        } else {
            "no examples"
        }
        .to_string(),
        questions: questions.len(),
        correct,
        ended_turn: ended,
        mean_completion_tokens: tokens as f64 / questions.len().max(1) as f64,
        samples,
    })
}

/// The models a check asks: `ids` (a manifest id, or a path or hub id for an ad-hoc model), or
/// every local text model whose weights are installed under `model_dir`.
pub fn choose_models(
    manifests: &[ModelManifest],
    ids: &[String],
    model_dir: &Path,
) -> Result<Vec<ModelManifest>> {
    if ids.is_empty() {
        return Ok(manifests
            .iter()
            .filter(|m| {
                m.tier == ferry_core::Tier::Local
                    && m.kind == ferry_core::ModelKind::Generator
                    && m.weights
                        .as_deref()
                        .is_some_and(|w| ModelLocation::of(m, model_dir).has_local(w))
            })
            .cloned()
            .collect());
    }
    ids.iter()
        .map(|id| match manifests.iter().find(|m| &m.id == id) {
            Some(m) => Ok(m.clone()),
            None => ferry_engine::adhoc_manifest(id),
        })
        .collect()
}

/// Loads `manifest`'s model and checks it as shipped, and also without its example turns when
/// `compare_examples` and it has some.
pub fn check_manifest(
    manifest: &ModelManifest,
    model_dir: &Path,
    questions: &[Question],
    max_tokens: u32,
    compare_examples: bool,
) -> Result<Vec<CheckResult>> {
    let model = LoadedModel::load(manifest, model_dir, &ferry_engine::default_device())?;
    let mut out = vec![check(&model, questions, max_tokens, true)?];
    if compare_examples && !manifest.example_turns.is_empty() {
        out.push(check(&model, questions, max_tokens, false)?);
    }
    Ok(out)
}

/// The results as the text table `ferry models check` prints, with a few replies under it.
pub fn table(results: &[CheckResult], questions: &Path, max_tokens: u32) -> String {
    let mut t = String::new();
    let n = results.first().map_or(0, |r| r.questions);
    t += &format!(
        "{n} questions from {} · greedy · at most {max_tokens} tokens\n",
        questions.display()
    );
    t += &format!(
        "{:<24} {:<12} {:>9} {:>12} {:>12}\n",
        "model", "template", "correct", "ended turn", "mean tokens"
    );
    for r in results {
        let share = |k: usize| 100.0 * k as f64 / r.questions.max(1) as f64;
        t += &format!(
            "{:<24} {:<12} {:>8.0}% {:>11.0}% {:>12.1}\n",
            r.model,
            r.template,
            share(r.correct),
            share(r.ended_turn),
            r.mean_completion_tokens
        );
    }
    for r in results {
        for (q, a) in &r.samples {
            t += &format!("  {} ({}): {q} -> {a:?}\n", r.model, r.template);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(kind: &str, answers: &[&str]) -> Question {
        Question {
            question: String::new(),
            answers: answers.iter().map(|s| s.to_string()).collect(),
            kind: kind.to_string(),
        }
    }

    #[test]
    fn scores_whole_words_in_the_first_paragraph() {
        let paris = q("capital", &["Paris"]);
        assert!(score(&paris, "The capital of France is Paris."));
        assert!(!score(&paris, "Parisian cafés are nice."));
        assert!(!score(
            &paris,
            "Lyon.\n\nWhat is the capital of France? Paris"
        ));
        let ba = q("capital", &["Buenos Aires"]);
        assert!(score(&ba, "It is Buenos Aires."));
        assert!(!score(&ba, "Buenos is not it."));
        let five = q("arithmetic", &["5"]);
        assert!(score(&five, "2 plus 3 is 5."));
        assert!(!score(&five, "It is 15."));
    }

    #[test]
    fn an_echo_of_the_question_is_not_an_answer() {
        let mut yes = q("yes/no", &["yes"]);
        yes.question = "Is the sun a star? Answer yes or no.".into();
        assert!(!score(
            &yes,
            "Is the sun a star? Answer yes or no. mendatang\nIs the sun a star?"
        ));
        assert!(score(&yes, "Yes."));
        let mut lima = q("capital", &["Lima"]);
        lima.question = "What is the capital of Peru?".into();
        assert!(!score(&lima, "What is the capital of Peru? quân"));
        assert!(score(&lima, "What is the capital of Peru? Lima."));
    }

    #[test]
    fn yes_no_goes_by_the_first_yes_or_no() {
        let yes = q("yes/no", &["yes"]);
        assert!(score(&yes, "Yes, it is."));
        assert!(!score(&yes, "No. Yes."));
        assert!(!score(&yes, "Maybe."));
        assert!(score(&yes, "Nobody knows, yes"), "`nobody` is not `no`");
    }

    #[test]
    fn the_table_gives_shares_per_model_and_format() {
        let r = CheckResult {
            model: "m".into(),
            template: "as shipped".into(),
            questions: 4,
            correct: 1,
            ended_turn: 3,
            mean_completion_tokens: 7.3,
            samples: vec![("Q?".into(), "A.".into())],
        };
        let t = table(&[r], Path::new("q.jsonl"), 48);
        assert!(t.starts_with("4 questions from q.jsonl"), "{t}");
        let row = t.lines().nth(2).unwrap();
        assert!(
            row.starts_with("m ") && row.contains("25%") && row.contains("75%"),
            "{row}"
        );
        assert!(row.trim_end().ends_with("7.3"), "{row}");
        assert!(t.contains("m (as shipped): Q? -> \"A.\""), "{t}");
    }

    #[test]
    fn the_shipped_fixture_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/short-qa/questions.jsonl");
        let qs = load_questions(&path).unwrap();
        assert!(qs.len() >= 50, "{}", qs.len());
        for q in &qs {
            assert!(!q.answers.is_empty());
        }
    }
}
