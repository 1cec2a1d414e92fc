//! GGUF files from others: any bytes give a header, metadata and tensor infos that fit the
//! file, or a refusal with the reason, never a panic (candle's own reader divides by a zero
//! alignment, for one; `read_checked` guards it).
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys's panic hook aborts on any panic, even one `read_checked` catches (candle
    // divides by a zero alignment); a quiet hook lets the caught ones through, while a panic
    // that escapes still aborts in libfuzzer-sys's own catch.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let _ = ferry_engine::gguf::read_checked(&mut Cursor::new(data), Path::new("fuzz.gguf"));
});
