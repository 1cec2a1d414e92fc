//! The judge (`[router.judge]`): a model the operator trusts — the strongest they have, loaded
//! here or served by the cloud tier — that grades routed answers no app will send Feedback on,
//! so the routers learn on those requests too.
//!
//! What it grades: a share (`router.judge.share`) of the routed requests without
//! `expect_feedback` — mixrank may try an uncertain model on exactly these, since a label will
//! come — and every MESS+ exploration step, where each zoo model answered and the paper's
//! predictor wants all their labels (without a judge a live exploration step teaches only the
//! served model's label, from the app).
//!
//! How: after the app has its answer, in the background, the judge model answers a fixed
//! yes/no rubric over the question (the request's last user message) and one answer, greedily,
//! in at most `router.judge.max_tokens` tokens; its first "yes" or "no" is the verdict. A local
//! judge takes a generation slot like any request (a full queue skips the grading, it never
//! displaces an app), and its energy is booked to its model. A cloud judge is one offload.
//!
//! Its labels are counted apart from the apps' feedback (`ferry status`: "judge"), in the
//! metric `ferry_judge_verdicts_total{verdict}` (`yes`, `no`, `unparsed`, `failed`, `skipped`),
//! and they teach only a request that has no label yet (the first label wins, as for Feedback).

use std::ops::ControlFlow;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use ferry_core::{ChatMessage, Role, SamplingParams};
use ferry_engine::GenerationEvent;
use ferry_proto::v1 as pb;

use crate::router::ZooRouter;
use crate::state::AppState;

/// The rubric, as the judge's system message.
const RUBRIC: &str = "You grade answers to questions. Reply with one word: yes if the answer \
correctly and helpfully answers the question, no otherwise.";

/// The judge's name in admission, where apps take turns.
const JUDGE_APP: &str = "ferryd:judge";

/// Longest answer text shown to the judge (characters); a longer one is cut, and the grade
/// is of what the judge saw.
const MAX_ANSWER_CHARS: usize = 4000;

/// The judge's conversation for one question and answer.
pub(crate) fn messages(question: &str, answer: &str) -> Vec<ChatMessage> {
    let answer: String = answer.chars().take(MAX_ANSWER_CHARS).collect();
    vec![
        ChatMessage::text(Role::System, RUBRIC),
        ChatMessage::text(
            Role::User,
            format!(
                "Question:\n{question}\n\nAnswer:\n{answer}\n\nIs the answer correct and helpful? Reply yes or no."
            ),
        ),
    ]
}

/// The verdict in the judge's text: its first word that is "yes" or "no" (any case,
/// punctuation aside); `None` when it says neither.
pub(crate) fn verdict(text: &str) -> Option<bool> {
    text.split(|c: char| !c.is_alphanumeric())
        .find_map(|w| match w.to_ascii_lowercase().as_str() {
            "yes" => Some(true),
            "no" => Some(false),
            _ => None,
        })
}

/// Keeps the text of a generation that no app reads (a judge's verdict, an exploration step's
/// other answers) when `text` is `Some`, and stops at shutdown.
pub(crate) struct Collect {
    pub text: Option<String>,
    pub abort: CancellationToken,
}

impl GenerationEvent for Collect {
    fn text(&mut self, delta: &str) -> ControlFlow<()> {
        if let Some(t) = &mut self.text {
            t.push_str(delta);
        }
        ControlFlow::Continue(())
    }

    fn cancelled(&self) -> bool {
        self.abort.is_cancelled()
    }
}

/// One grading's outcome (the metric's label).
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Verdict(bool),
    Unparsed,
    /// The queue was full: grading never displaces an app's request.
    Skipped,
    Failed(String),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Verdict(true) => "yes",
            Outcome::Verdict(false) => "no",
            Outcome::Unparsed => "unparsed",
            Outcome::Skipped => "skipped",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// Grades `answers` (zoo index, text) of a routed request in the background and teaches
/// `router` the labels. Does nothing without a judge model.
pub(crate) fn spawn(
    state: Arc<AppState>,
    router: Arc<ZooRouter>,
    request_id: String,
    question: String,
    answers: Vec<(usize, String)>,
) {
    let Some(judge) = state.config.router.judge.model.clone() else {
        return;
    };
    if answers.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut labels = vec![None; router.zoo().len()];
        for (i, answer) in answers {
            let id = format!("{request_id}.judge.{i}");
            let outcome = grade(&state, &judge, &id, &question, &answer).await;
            metrics::counter!("ferry_judge_verdicts_total", "verdict" => outcome.label())
                .increment(1);
            match &outcome {
                Outcome::Verdict(v) => {
                    if let Some(l) = labels.get_mut(i) {
                        *l = Some(*v);
                    }
                }
                Outcome::Failed(why) => {
                    tracing::warn!(request_id = %request_id, judge = %judge, error = %why, "the judge could not grade an answer")
                }
                Outcome::Unparsed | Outcome::Skipped => {}
            }
            tracing::debug!(request_id = %request_id, judge = %judge, model = %router.zoo().get(i).map_or("?", |s| s.as_str()), verdict = outcome.label(), "judged");
        }
        let learned = router.judge_labels(&request_id, &labels);
        tracing::info!(request_id = %request_id, judge = %judge, labels = ?labels, learned, "judge labels");
    });
}

/// The judge model's verdict on one answer: on a local model if `judge` is loaded here, else
/// on the cloud tier (as request `id`, unique per graded answer so the cloud's replay of a
/// finished request id never hands back another answer's verdict).
async fn grade(
    state: &Arc<AppState>,
    judge: &str,
    id: &str,
    question: &str,
    answer: &str,
) -> Outcome {
    let messages = messages(question, answer);
    let max_tokens = state.config.router.judge.max_tokens;
    let text = if let Some(model) = state.model(judge) {
        match run_local(state, model, messages, max_tokens).await {
            Ok(Some(t)) => t,
            Ok(None) => return Outcome::Skipped,
            Err(why) => return Outcome::Failed(why),
        }
    } else if let Some(pool) = state.cloud.clone() {
        let request = pb::OffloadRequest {
            request_id: id.to_string(),
            model: judge.to_string(),
            messages: crate::cloud::offload::text_messages(&messages),
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            top_p: None,
            top_k: None,
            seed: Some(0),
            stop: Vec::new(),
            timeout_ms: None,
        };
        match crate::cloud::offload::run_to_end(&pool, &state.abort, request, true).await {
            Some((t, _joules)) => t,
            None => return Outcome::Failed(format!("cloud model `{judge}` gave no answer")),
        }
    } else {
        return Outcome::Failed(format!(
            "`{judge}` is neither a loaded model nor on a cloud tier"
        ));
    };
    verdict(&text).map_or(Outcome::Unparsed, Outcome::Verdict)
}

/// Runs the judge on a local model in a generation slot; `Ok(None)` when the queue is full.
async fn run_local(
    state: &Arc<AppState>,
    model: Arc<ferry_engine::LoadedModel>,
    messages: Vec<ChatMessage>,
    max_tokens: u32,
) -> Result<Option<String>, String> {
    let prompt = model.encode_chat(&messages).map_err(|e| e.to_string())?;
    let context = model.info().context_length;
    if prompt.len() + max_tokens as usize >= context {
        return Err(format!(
            "the judge prompt is {} tokens, over the context of `{}` ({context})",
            prompt.len(),
            model.info().id
        ));
    }
    // The judge takes its turn as an app of its own, within its share of the queue.
    let Ok(ticket) = state.admission.admit_for(JUDGE_APP, None) else {
        return Ok(None);
    };
    let slot = tokio::select! {
        slot = ticket.run() => slot,
        _ = state.abort.cancelled() => return Err("ferryd is shutting down".into()),
    };
    let engine = state.engine().clone();
    let abort = state.abort.clone();
    tokio::task::spawn_blocking(move || {
        let sampling = SamplingParams::greedy(max_tokens);
        let mut sink = Collect {
            text: Some(String::new()),
            abort,
        };
        let (out, energy) = engine.generate_metered(&model, &prompt, &sampling, &mut sink);
        metrics::counter!("ferry_judge_energy_millijoules_total")
            .increment((energy.joules * 1e3).max(0.0) as u64);
        drop(slot);
        out.map(|_| sink.text)
            .map_err(|e| format!("the judge's generation failed: {e}"))
    })
    .await
    .map_err(|e| format!("the judge's thread failed: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_is_the_first_yes_or_no_word() {
        assert_eq!(verdict("Yes."), Some(true));
        assert_eq!(verdict(" no, it is wrong"), Some(false));
        assert_eq!(verdict("**YES**"), Some(true));
        assert_eq!(verdict("The answer is correct: yes. No doubt."), Some(true));
        // Words that only contain yes/no are not verdicts.
        assert_eq!(verdict("Nobody knows; yesterday"), None);
        assert_eq!(verdict(""), None);
    }

    #[test]
    fn the_judge_sees_the_rubric_the_question_and_a_bounded_answer() {
        let long = "x".repeat(MAX_ANSWER_CHARS + 100);
        let m = messages("What is 2+2?", &long);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, Role::System);
        let user = m[1].joined_text();
        assert!(user.contains("What is 2+2?"));
        assert!(user.matches('x').count() == MAX_ANSWER_CHARS, "answer cut");
    }
}
