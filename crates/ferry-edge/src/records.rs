//! Request records and the feedback apps send about them.
//!
//! Every finished request leaves a record (model, tier, tokens, latency) kept in memory for
//! `Feedback` lookups, bounded to the most recent `max_records`. Feedback is appended, with its
//! record, to `feedback.jsonl` in the state directory so that routing policies can learn from it
//! (and a later replay can reproduce what they saw).

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use ferry_core::{Error, Result};

/// What ferryd remembers about a finished request.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub request_id: String,
    pub model: String,
    pub tier: &'static str,
    pub finish_reason: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_ms: f64,
    /// Unix time of completion, in milliseconds.
    pub finished_unix_ms: u64,
}

/// Feedback on one request.
#[derive(Debug, Clone, Serialize)]
pub struct Feedback {
    pub satisfied: bool,
    pub score: Option<f32>,
}

#[derive(Serialize)]
struct FeedbackLine<'a> {
    record: &'a RequestRecord,
    feedback: &'a Feedback,
    received_unix_ms: u64,
}

struct Inner {
    records: HashMap<String, (RequestRecord, Option<Feedback>)>,
    order: VecDeque<String>,
}

/// Bounded store of recent requests and their feedback.
pub struct RecordStore {
    inner: Mutex<Inner>,
    max_records: usize,
    log_path: Option<PathBuf>,
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RecordStore {
    /// A store logging feedback under `state_dir` (created if missing); `None` keeps it in memory.
    pub fn new(max_records: usize, state_dir: Option<&Path>) -> Result<Self> {
        let log_path = match state_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("creating state dir {}", dir.display()), e))?;
                Some(dir.join("feedback.jsonl"))
            }
            None => None,
        };
        Ok(RecordStore {
            inner: Mutex::new(Inner {
                records: HashMap::new(),
                order: VecDeque::new(),
            }),
            max_records: max_records.max(1),
            log_path,
        })
    }

    /// Whether a request id is already known (ids must be unique while remembered).
    pub fn contains(&self, request_id: &str) -> bool {
        self.inner.lock().records.contains_key(request_id)
    }

    /// Remembers a finished request, evicting the oldest beyond the bound.
    pub fn insert(&self, record: RequestRecord) {
        let mut inner = self.inner.lock();
        let id = record.request_id.clone();
        if inner.records.insert(id.clone(), (record, None)).is_none() {
            inner.order.push_back(id);
        }
        while inner.order.len() > self.max_records {
            if let Some(old) = inner.order.pop_front() {
                inner.records.remove(&old);
            }
        }
    }

    /// Attaches feedback to a request; returns whether earlier feedback was replaced.
    pub fn feedback(&self, request_id: &str, feedback: Feedback) -> Result<bool> {
        if let Some(s) = feedback.score {
            if !(0.0..=1.0).contains(&s) {
                return Err(Error::invalid("score", "must be in [0, 1]"));
            }
        }
        let (record, replaced) = {
            let mut inner = self.inner.lock();
            let entry = inner
                .records
                .get_mut(request_id)
                .ok_or_else(|| Error::RequestNotFound(request_id.to_string()))?;
            let replaced = entry.1.replace(feedback.clone()).is_some();
            (entry.0.clone(), replaced)
        };
        if let Some(path) = &self.log_path {
            let line = serde_json::to_string(&FeedbackLine {
                record: &record,
                feedback: &feedback,
                received_unix_ms: unix_ms(),
            })
            .expect("feedback serialises");
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            writeln!(f, "{line}")
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        Ok(replaced)
    }

    /// Feedback given for a request, if any.
    pub fn feedback_of(&self, request_id: &str) -> Option<Feedback> {
        self.inner
            .lock()
            .records
            .get(request_id)
            .and_then(|(_, f)| f.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> RequestRecord {
        RequestRecord {
            request_id: id.into(),
            model: "m".into(),
            tier: "local",
            finish_reason: "stop".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            total_ms: 1.0,
            finished_unix_ms: 0,
        }
    }

    #[test]
    fn a_panic_under_the_lock_leaves_the_store_usable() {
        let s = std::sync::Arc::new(RecordStore::new(4, None).unwrap());
        s.insert(rec("a"));
        let held = s.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = held.inner.lock();
            panic!("a bug while the records are locked");
        })
        .join();
        assert!(panicked.is_err());
        // A poisoning lock would now fail every later request that finishes or gets feedback.
        s.insert(rec("b"));
        assert!(s.contains("a") && s.contains("b"));
    }

    #[test]
    fn feedback_is_stored_logged_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = RecordStore::new(2, Some(dir.path())).unwrap();
        s.insert(rec("a"));
        s.insert(rec("b"));
        assert!(!s
            .feedback(
                "a",
                Feedback {
                    satisfied: true,
                    score: None
                }
            )
            .unwrap());
        assert!(s
            .feedback(
                "a",
                Feedback {
                    satisfied: false,
                    score: Some(0.5)
                }
            )
            .unwrap());
        assert!(matches!(
            s.feedback(
                "a",
                Feedback {
                    satisfied: true,
                    score: Some(2.0)
                }
            ),
            Err(Error::InvalidArgument { .. })
        ));
        s.insert(rec("c"));
        assert!(matches!(
            s.feedback(
                "a",
                Feedback {
                    satisfied: true,
                    score: None
                }
            ),
            Err(Error::RequestNotFound(_))
        ));
        let log = std::fs::read_to_string(dir.path().join("feedback.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 2);
        assert!(log.contains("\"satisfied\":false"));
    }
}
