//! The bearer-token file: any text holds some tokens or names its first bad line, never a
//! panic.
#![no_main]

use ferry_daemon::auth::check_token_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(n) = check_token_file(text, std::path::Path::new("tokens")) {
            assert!(n <= text.lines().count());
        }
    }
});
