//! One offload call as the wire carries it: the messages with the images a placement chose,
//! the `OffloadRequest` for a model within a time budget, a call that no app streams run to its
//! end (an exploration step's other models, a judge), and how a failed call's status is named
//! and counted against its endpoint. The request path that streams an app's offload, retries
//! endpoints and falls back is `crate::pipeline::cloud`.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::{ChatMessage, Part, SamplingParams};
use ferry_proto::v1 as pb;
use ferry_router::tmo::Action;

use super::CloudPool;

/// The `OffloadRequest` for `model`, carrying the edge's request id and the app's sampling,
/// with `remaining` as both the cloud's own timeout and the call's gRPC deadline.
pub(crate) fn request(
    request_id: &str,
    model: &str,
    messages: Vec<pb::Message>,
    sampling: &SamplingParams,
    remaining: Duration,
) -> tonic::Request<pb::OffloadRequest> {
    let s = sampling;
    let timeout_ms = remaining.as_millis().clamp(1, u32::MAX as u128) as u32;
    let mut r = tonic::Request::new(pb::OffloadRequest {
        request_id: request_id.to_string(),
        model: model.to_string(),
        messages,
        max_tokens: Some(s.max_tokens),
        temperature: Some(s.temperature as f32),
        top_p: s.top_p.map(|p| p as f32),
        top_k: s.top_k.map(|k| k as u32),
        seed: Some(s.seed),
        stop: s.stop.clone(),
        timeout_ms: Some(timeout_ms),
    });
    r.set_timeout(remaining);
    r
}

/// The messages as sent to the cloud, with only the chosen images.
pub(crate) struct ChosenImages {
    pub messages: Vec<pb::Message>,
    /// Sources of the images sent.
    pub sources: Vec<String>,
    /// Bits of the views sent (image `i` < 3 is view `i`).
    pub views_mask: u8,
    /// Why images were left out, if any were.
    pub note: Option<String>,
}

impl ChosenImages {
    /// Keeps image `k` (in request order) when the model reads images and, under a placement
    /// action, the action sends view `k`.
    pub(crate) fn select(
        messages: &[ChatMessage],
        action: Option<Action>,
        image_capable: bool,
    ) -> Self {
        let mut k = 0usize;
        let mut sources = Vec::new();
        let mut mask = 0u8;
        let mut dropped = 0usize;
        let out = messages
            .iter()
            .map(|m| {
                let mut parts = Vec::with_capacity(m.parts.len());
                for p in &m.parts {
                    match p {
                        Part::Text(t) => parts.push(pb::ContentPart {
                            kind: Some(pb::content_part::Kind::Text(t.clone())),
                        }),
                        Part::Image(img) => {
                            let send = image_capable && action.is_none_or(|a| k < 3 && a.sends(k));
                            if send {
                                if k < 3 {
                                    mask |= 1 << k;
                                }
                                sources.push(img.source.clone());
                                parts.push(pb::ContentPart {
                                    kind: Some(pb::content_part::Kind::Image(pb::Image {
                                        data: img.data.clone(),
                                        mime_type: img.mime_type.clone(),
                                        source: img.source.clone(),
                                    })),
                                });
                            } else {
                                dropped += 1;
                            }
                            k += 1;
                        }
                    }
                }
                if parts.is_empty() {
                    // Every part was an image left out: keep the turn, say what was there.
                    parts.push(pb::ContentPart {
                        kind: Some(pb::content_part::Kind::Text("(image not sent)".into())),
                    });
                }
                pb::Message {
                    role: match m.role {
                        ferry_core::Role::System => pb::Role::System,
                        ferry_core::Role::User => pb::Role::User,
                        ferry_core::Role::Assistant => pb::Role::Assistant,
                    } as i32,
                    parts,
                }
            })
            .collect();
        let note = (dropped > 0).then(|| {
            if !image_capable {
                format!("{dropped} image(s) not sent: the cloud model is text-only")
            } else {
                format!("{dropped} image(s) not sent: the placement chose fewer views")
            }
        });
        ChosenImages {
            messages: out,
            sources,
            views_mask: mask,
            note,
        }
    }
}

/// Text-only messages as the cloud reads them (a judge's conversation).
pub(crate) fn text_messages(messages: &[ChatMessage]) -> Vec<pb::Message> {
    ChosenImages::select(messages, None, false).messages
}

/// Runs one offload that no app streams (an exploration step's other models, a judge) to its
/// completion within `cloud.request_timeout_ms`: the text when `keep_text` (else empty) and
/// the joules the cloud reports. `None` when no endpoint serves the model or the call fails.
pub(crate) async fn run_to_end(
    pool: &Arc<CloudPool>,
    abort: &tokio_util::sync::CancellationToken,
    request: pb::OffloadRequest,
    keep_text: bool,
) -> Option<(String, Option<f64>)> {
    let lease = pool.acquire(&request.model, &[]).ok()?;
    let budget = Duration::from_millis(pool.cfg.request_timeout_ms);
    let mut r = tonic::Request::new(pb::OffloadRequest {
        timeout_ms: Some(budget.as_millis().clamp(1, u32::MAX as u128) as u32),
        ..request
    });
    r.set_timeout(budget);
    let run = async {
        let mut s = lease.client().generate(r).await.ok()?.into_inner();
        let mut text = String::new();
        while let Ok(Some(m)) = s.message().await {
            match m.event {
                Some(pb::offload_response::Event::Delta(d)) if keep_text => text.push_str(&d.text),
                Some(pb::offload_response::Event::Completion(c)) => {
                    return Some((text, c.energy.and_then(|e| e.joules)));
                }
                _ => {}
            }
        }
        None
    };
    tokio::select! {
        j = tokio::time::timeout(budget, run) => j.ok().flatten(),
        _ = abort.cancelled() => None,
    }
}

/// Whether a failure status should count towards the endpoint's circuit: the endpoint or its
/// engine is broken, not merely busy or missing one model.
pub(crate) fn counts_against_endpoint(code: tonic::Code) -> bool {
    !matches!(
        code,
        tonic::Code::ResourceExhausted
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition
            | tonic::Code::Aborted
    )
}

/// Counts one offload attempt on `endpoint` by how it went.
pub(crate) fn attempt_metric(endpoint: &str, outcome: &'static str) {
    metrics::counter!("ferry_offload_attempts_total", "endpoint" => endpoint.to_string(), "outcome" => outcome)
        .increment(1);
}

/// The status code as gRPC spells it (`RESOURCE_EXHAUSTED`, `DEADLINE_EXCEEDED`).
pub(crate) fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, ch) in format!("{code:?}").chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(ch.to_ascii_uppercase());
    }
    name
}

/// The finish reason as records and logs spell it.
pub(crate) fn finish_name(f: pb::FinishReason) -> &'static str {
    match f {
        pb::FinishReason::Stop => "stop",
        pb::FinishReason::Length => "length",
        pb::FinishReason::StopSequence => "stop_sequence",
        pb::FinishReason::Unspecified => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::is_endpoint_failure;
    use ferry_core::{ImagePart, Role};

    fn image(source: &str) -> Part {
        Part::Image(ImagePart {
            data: vec![1, 2, 3],
            mime_type: "image/png".into(),
            source: source.into(),
        })
    }

    fn request() -> Vec<ChatMessage> {
        vec![
            ChatMessage::text(Role::System, "be brief"),
            ChatMessage {
                role: Role::User,
                parts: vec![
                    Part::Text("what is here?".into()),
                    image("camera/front"),
                    image("camera/left"),
                    image("camera/right"),
                ],
            },
        ]
    }

    fn images_of(m: &[pb::Message]) -> Vec<String> {
        m.iter()
            .flat_map(|m| &m.parts)
            .filter_map(|p| match &p.kind {
                Some(pb::content_part::Kind::Image(i)) => Some(i.source.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_action_picks_views_by_image_order() {
        let c = ChosenImages::select(&request(), Some(Action::cloud(0b101)), true);
        assert_eq!(images_of(&c.messages), vec!["camera/front", "camera/right"]);
        assert_eq!(c.sources, vec!["camera/front", "camera/right"]);
        assert_eq!(c.views_mask, 0b101);
        assert!(c.note.unwrap().contains("1 image(s) not sent"));
        assert_eq!(c.messages[0].role, pb::Role::System as i32);
    }

    #[test]
    fn text_only_models_get_no_images_and_image_only_turns_keep_a_placeholder() {
        let msgs = vec![ChatMessage {
            role: Role::User,
            parts: vec![image("cam")],
        }];
        let c = ChosenImages::select(&msgs, None, false);
        assert!(images_of(&c.messages).is_empty());
        assert_eq!(c.views_mask, 0);
        assert!(c.note.unwrap().contains("text-only"));
        assert_eq!(c.messages[0].parts.len(), 1, "the turn is kept");
    }

    #[test]
    fn without_a_placement_every_image_goes_to_an_image_model() {
        let c = ChosenImages::select(&request(), None, true);
        assert_eq!(images_of(&c.messages).len(), 3);
        assert_eq!(c.views_mask, 0b111);
        assert!(c.note.is_none());
    }

    #[test]
    fn status_codes_are_named_as_grpc_spells_them() {
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn only_broken_endpoints_trip_the_circuit() {
        assert!(counts_against_endpoint(tonic::Code::Unavailable));
        assert!(counts_against_endpoint(tonic::Code::DeadlineExceeded));
        assert!(counts_against_endpoint(tonic::Code::Internal));
        assert!(!counts_against_endpoint(tonic::Code::ResourceExhausted));
        assert!(!counts_against_endpoint(tonic::Code::NotFound));
        assert!(is_endpoint_failure(tonic::Code::Unavailable));
        assert!(!is_endpoint_failure(tonic::Code::InvalidArgument));
    }
}
