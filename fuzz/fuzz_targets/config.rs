//! Both daemons' config files: any text parses to a config that passed validation, or is
//! refused with the reason, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let path = Path::new("fuzz.toml");
        let _ = ferry_edge::EdgeConfig::from_toml(text, path);
        let _ = ferry_cloud::CloudConfig::from_toml(text, path);
    }
});
