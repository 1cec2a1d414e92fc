//! The M4A1 dialogue log (TMO's data) parsed from JSON text, and its seeded 80/20 split.
//!
//! Each logged turn becomes a [`Turn`]: the task category (index into the sorted task names),
//! the action the log took, the response score (zero when the answer is a refusal, as the
//! authors' preprocessing does), and the per-view association scores.

use rand::seq::SliceRandom;
use serde::Deserialize;

use super::{Action, TmoError, VIEWS};
use crate::rng::seeded;

/// Answers containing one of these are scored 0 (the authors' refusal filter; case-sensitive).
const REFUSALS: [&str; 3] = ["sorry", "I don't have", "can't"];

#[derive(Deserialize)]
struct RawDialogue {
    id: u64,
    interactions: Vec<RawTurn>,
    association_score: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
struct RawTurn {
    task_cat: String,
    action: u8,
    image_index: Option<Vec<usize>>,
    answer: String,
    score: f64,
}

/// One logged turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// Task category, index into [`Dataset::tasks`].
    pub task: usize,
    /// What the log did on this turn.
    pub action: Action,
    /// The logged response score (0 for refusals).
    pub score: f64,
    /// Prompt-to-image relevance of each camera view.
    pub association: [f64; VIEWS],
}

/// One dialogue: an episode.
#[derive(Debug, Clone, PartialEq)]
pub struct Dialogue {
    pub id: u64,
    pub turns: Vec<Turn>,
}

/// The whole log.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Task category names, sorted (the task feature is the index).
    pub tasks: Vec<String>,
    pub dialogues: Vec<Dialogue>,
}

impl Dataset {
    /// Parses M4A1.json text (the caller reads the file).
    pub fn parse(text: &str) -> Result<Self, TmoError> {
        let raw: Vec<RawDialogue> =
            serde_json::from_str(text).map_err(|e| TmoError::Data(format!("M4A1 JSON: {e}")))?;
        if raw.is_empty() {
            return Err(TmoError::Data("M4A1: no dialogues".into()));
        }
        let mut tasks: Vec<String> = raw
            .iter()
            .flat_map(|d| d.interactions.iter().map(|t| t.task_cat.clone()))
            .collect();
        tasks.sort();
        tasks.dedup();
        let mut dialogues = Vec::with_capacity(raw.len());
        for d in raw {
            let bad = |what: String| TmoError::Data(format!("M4A1 dialogue {}: {what}", d.id));
            if d.interactions.is_empty() {
                return Err(bad("no turns".into()));
            }
            if d.association_score.len() != d.interactions.len() {
                return Err(bad(format!(
                    "{} association rows for {} turns",
                    d.association_score.len(),
                    d.interactions.len()
                )));
            }
            let mut turns = Vec::with_capacity(d.interactions.len());
            for (i, (t, assoc)) in d.interactions.iter().zip(&d.association_score).enumerate() {
                if assoc.len() != VIEWS || !assoc.iter().all(|a| a.is_finite()) {
                    return Err(bad(format!(
                        "turn {i}: need {VIEWS} finite association scores"
                    )));
                }
                if !t.score.is_finite() {
                    return Err(bad(format!("turn {i}: score is not finite")));
                }
                let action = match (t.action, &t.image_index) {
                    (0, _) => Action::LOCAL,
                    (1, None) => Action::cloud(0),
                    (1, Some(views)) => {
                        let mut mask = 0u8;
                        for &v in views {
                            if v >= VIEWS {
                                return Err(bad(format!("turn {i}: view {v} out of range")));
                            }
                            mask |= 1 << v;
                        }
                        Action::cloud(mask)
                    }
                    (a, _) => return Err(bad(format!("turn {i}: action {a} is not 0 or 1"))),
                };
                let refusal = REFUSALS.iter().any(|r| t.answer.contains(r));
                turns.push(Turn {
                    task: tasks.binary_search(&t.task_cat).expect("collected above"),
                    action,
                    score: if refusal { 0.0 } else { t.score },
                    association: [assoc[0], assoc[1], assoc[2]],
                });
            }
            dialogues.push(Dialogue { id: d.id, turns });
        }
        Ok(Dataset { tasks, dialogues })
    }

    /// Number of turns over all dialogues.
    pub fn turns(&self) -> usize {
        self.dialogues.iter().map(|d| d.turns.len()).sum()
    }

    /// Seeded split by dialogue: `(train, test)`, the test part being `floor(n * test_fraction)`
    /// dialogues of a seeded shuffle (each part keeps the shuffled order).
    pub fn split(&self, seed: u64, test_fraction: f64) -> (Vec<Dialogue>, Vec<Dialogue>) {
        let mut order: Vec<usize> = (0..self.dialogues.len()).collect();
        // A stream of its own, so that the split does not move when training draws change.
        let mut rng = seeded(seed ^ 0x5151_7e57_0000_0000);
        order.shuffle(&mut rng);
        let n_test = (self.dialogues.len() as f64 * test_fraction.clamp(0.0, 1.0)) as usize;
        let pick = |ix: &[usize]| ix.iter().map(|&i| self.dialogues[i].clone()).collect();
        (pick(&order[n_test..]), pick(&order[..n_test]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const TINY: &str = r#"[
      {"id": 7, "image_paths": ["a","b","c"],
       "interactions": [
         {"question": "q", "task_cat": "Query", "action": 0, "image_index": null,
          "answer": "fine", "score": 1.5, "interaction_time": 1.0, "usage_cost": 0.0},
         {"question": "q", "task_cat": "Assistive System", "action": 1, "image_index": [2, 0],
          "answer": "I'm sorry", "score": 3.0, "interaction_time": 1.0, "usage_cost": 0.01}
       ],
       "association_score": [[0.2, 0.21, 0.22], [0.19, 0.2, 0.25]]}
    ]"#;

    #[test]
    fn parses_turns_tasks_actions_and_refusals() {
        let d = Dataset::parse(TINY).unwrap();
        assert_eq!(d.tasks, ["Assistive System", "Query"]);
        let t = &d.dialogues[0].turns;
        assert_eq!(t[0].task, 1);
        assert_eq!(t[0].action, Action::LOCAL);
        assert_eq!(t[0].score, 1.5);
        assert_eq!(t[1].action, Action::cloud(0b101));
        assert_eq!(t[1].score, 0.0, "refusal scores 0");
        assert_eq!(t[1].association, [0.19, 0.2, 0.25]);
    }

    #[test]
    fn malformed_logs_are_refused() {
        for bad in [
            "",
            "[]",
            "{}",
            &TINY.replace("[2, 0]", "[3]"),
            &TINY.replace("\"action\": 0", "\"action\": 2"),
            &TINY.replace("[0.19, 0.2, 0.25]", "[0.19, 0.2]"),
            &TINY.replace(", [0.19, 0.2, 0.25]", ""),
        ] {
            assert!(Dataset::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn split_is_seeded_disjoint_and_complete() {
        let text = format!(
            "[{}]",
            (0..10)
                .map(|i| {
                    let one = TINY.trim().trim_start_matches('[').trim_end_matches(']');
                    one.replace("\"id\": 7", &format!("\"id\": {i}"))
                })
                .collect::<Vec<_>>()
                .join(",")
        );
        let d = Dataset::parse(&text).unwrap();
        let (tr, te) = d.split(42, 0.2);
        assert_eq!((tr.len(), te.len()), (8, 2));
        let mut ids: Vec<u64> = tr.iter().chain(&te).map(|x| x.id).collect();
        ids.sort();
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
        assert_eq!(d.split(42, 0.2), (tr.clone(), te.clone()));
        assert_ne!(d.split(43, 0.2).1, te, "another seed, another split (here)");
    }
}
