//! Images and image-processor settings from others: any bytes decode to an image or are
//! refused, any JSON is a processor config or is refused, and a decoded image is cut into a
//! vision tower's views, never a panic.
#![no_main]

use ferry_engine::vision::{decode, ImageProcessor, ImageProcessorConfig, Tiling};
use libfuzzer_sys::fuzz_target;

/// A CLIP-style processor, small so that each run stays fast.
const CLIP: &str = r#"{"do_resize": true, "size": {"shortest_edge": 32}, "resample": 3,
    "do_center_crop": true, "crop_size": {"height": 32, "width": 32}, "do_rescale": true,
    "rescale_factor": 0.00392156862745098, "do_normalize": true,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}"#;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = ImageProcessorConfig::from_json(&v);
    }
    if let Ok(img) = decode(data) {
        let cfg = ImageProcessorConfig::from_json(&serde_json::from_str(CLIP).unwrap()).unwrap();
        for tiling in [
            Tiling::Single,
            Tiling::AnyRes {
                pinpoints_hw_px: vec![(32, 64), (64, 32), (64, 64)],
            },
        ] {
            let p = ImageProcessor::new(cfg.clone(), tiling).unwrap();
            let (views, _) = p.views(&img);
            assert!(!views.is_empty());
        }
    }
});
