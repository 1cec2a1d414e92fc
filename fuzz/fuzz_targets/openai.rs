//! The OpenAI API: any body a client POSTs to `/v1/chat/completions` maps to a request or is
//! refused with INVALID_ARGUMENT, and a mapped one validates or is refused the same way, never
//! a panic.
#![no_main]

use ferry_core::openai::parse_chat_request;
use ferry_core::request::{RequestLimits, ValidatedRequest};
use ferry_core::ErrorKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_chat_request(data) {
        Ok(call) => {
            if let Err(e) = ValidatedRequest::from_proto(call.request, &RequestLimits::default(), 7)
            {
                assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
            }
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}"),
    }
});
