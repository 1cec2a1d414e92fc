//! Request validation: any bytes a client sends as a `GenerateRequest` decode or are refused,
//! and a decoded one validates or is refused with INVALID_ARGUMENT, never a panic.
#![no_main]

use ferry_core::request::{RequestLimits, ValidatedRequest};
use ferry_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = pb::GenerateRequest::decode(data) {
        let limits = RequestLimits::default();
        if let Ok(v) = ValidatedRequest::from_proto(req, &limits, 7) {
            assert!(!v.messages.is_empty());
        }
    }
});
