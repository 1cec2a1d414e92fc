//! Router state files (mixrank's, what ferryd saves and restores): any bytes restore to a
//! policy that keeps deciding within its zoo, or are refused, never a panic.
#![no_main]

use ferry_router::mixrank::{MixRank, MixRankConfig, MixRankSnapshot};
use ferry_router::RouteRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(snap) = serde_json::from_slice::<MixRankSnapshot>(data) else {
        return;
    };
    let mut p = MixRank::new(MixRankConfig::new(0.7, 1), 3, 2, None).unwrap();
    if p.restore(&snap).is_err() {
        return;
    }
    let x = [0.6f32, 0.8];
    for i in 0..8u32 {
        let r = p.route(&RouteRequest {
            features: &x,
            task: Some(["a", "b"][i as usize % 2]),
            feedback_expected: true,
            label_unserved: true,
            text_chars: Some(10 + i as usize * 7),
        });
        assert!(r.model < 3);
        p.record_cost(r.model, 1.0 + r.model as f64);
        p.record_feedback(&r.ticket, i % 3 != 0);
    }
    for e in p.estimates() {
        assert!((0.0..=1.0).contains(&e.rate), "{e:?}");
    }
});
