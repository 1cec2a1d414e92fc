//! The `grpc-timeout` header: any text parses to a duration within the spec's range or is
//! refused, never a panic.
#![no_main]

use ferry_daemon::deadline::parse_grpc_timeout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(d) = parse_grpc_timeout(text) {
            assert!(d.as_secs() <= 99_999_999 * 3600);
        }
    }
});
