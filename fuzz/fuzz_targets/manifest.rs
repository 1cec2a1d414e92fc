//! Model manifests: any text is a manifest or an invalid-file error, never a panic.
#![no_main]

use ferry_core::manifest::ModelManifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ModelManifest::from_toml(text, std::path::Path::new("fuzz.toml"));
    }
});
