//! TMO placement policy files: any bytes load as a policy whose every tensor has its shape and
//! finite values, or are refused with the reason; a loaded policy places a turn within its
//! actions, never a panic.
#![no_main]

use ferry_router::tmo::{DialogueState, PlacementPolicy, Serve, ACTIONS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = PlacementPolicy::from_bytes(data) {
        let obs = DialogueState::new(30.0, 0.05).observe(0);
        assert!(p.act(&obs).index() < ACTIONS);
    }
});
