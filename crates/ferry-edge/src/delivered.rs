//! What an app has received of a stream, and the error status that ends a stream after its first
//! token. Such a status carries the accounting in its metadata (`x-ferry-tier`, `x-ferry-model`,
//! `x-ferry-request-id`, `x-ferry-delivered-deltas`, `x-ferry-delivered-bytes`, and for the cloud
//! tier `x-ferry-endpoint`), so an app can tell how much of the text it holds, whichever tier
//! ran the request and however it ended (deadline, endpoint lost, shutdown, engine failure).

use tokio::time::Instant;

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

/// Deltas and bytes sent to the app so far.
#[derive(Debug, Default, Clone)]
pub(crate) struct Delivered {
    pub deltas: u64,
    pub bytes: u64,
    /// When the first delta went out, in ms since the request arrived.
    pub first_token_ms: Option<f64>,
    /// The text itself, kept only when asked (the judge will grade it).
    pub text: Option<String>,
}

impl Delivered {
    /// Books deltas, keeping their text too when `keep_text`.
    pub fn new(keep_text: bool) -> Self {
        Delivered {
            text: keep_text.then(String::new),
            ..Delivered::default()
        }
    }

    /// Books one delta sent to the app.
    pub fn push(&mut self, text: &str, arrived: Instant) {
        if self.first_token_ms.is_none() {
            self.first_token_ms = Some(arrived.elapsed().as_secs_f64() * 1e3);
        }
        self.deltas += 1;
        self.bytes += text.len() as u64;
        if let Some(t) = &mut self.text {
            t.push_str(text);
        }
    }

    /// The status that ends the stream, with the accounting. `endpoint` names the cloud
    /// endpoint for offloaded requests.
    pub fn status(
        &self,
        code: Code,
        message: String,
        tier: &str,
        model: &str,
        request_id: &str,
        endpoint: Option<&str>,
    ) -> Status {
        let mut md = MetadataMap::new();
        let mut put = |k: &'static str, v: String| {
            // Values that are not valid header text (an odd model id) are left out, not fatal.
            if let Ok(v) = v.parse() {
                md.insert(k, v);
            }
        };
        put("x-ferry-tier", tier.to_string());
        put("x-ferry-model", model.to_string());
        if let Some(e) = endpoint {
            put("x-ferry-endpoint", e.to_string());
        }
        put("x-ferry-request-id", request_id.to_string());
        put("x-ferry-delivered-deltas", self.deltas.to_string());
        put("x-ferry-delivered-bytes", self.bytes.to_string());
        Status::with_metadata(code, message, md)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_carries_what_was_delivered() {
        let mut d = Delivered::default();
        let t = Instant::now();
        d.push("Paris", t);
        d.push(" é", t);
        assert!(d.first_token_ms.is_some());
        let s = d.status(
            Code::DeadlineExceeded,
            "late".into(),
            "local",
            "m",
            "r1",
            None,
        );
        assert_eq!(s.code(), Code::DeadlineExceeded);
        let md = s.metadata();
        assert_eq!(md.get("x-ferry-delivered-deltas").unwrap(), "2");
        assert_eq!(md.get("x-ferry-delivered-bytes").unwrap(), "8");
        assert_eq!(md.get("x-ferry-tier").unwrap(), "local");
        assert!(md.get("x-ferry-endpoint").is_none());
        let bad = d.status(
            Code::Unavailable,
            "x".into(),
            "cloud",
            "a\nb",
            "r",
            Some("e"),
        );
        assert!(bad.metadata().get("x-ferry-model").is_none());
        assert_eq!(bad.metadata().get("x-ferry-endpoint").unwrap(), "e");
    }
}
