//! Maps request sampling settings onto candle's logits processor.

use candle_transformers::generation::{LogitsProcessor, Sampling};
use ferry_core::SamplingParams;

/// A seeded sampler for one request; greedy when the temperature is 0.
pub fn logits_processor(params: &SamplingParams) -> LogitsProcessor {
    let sampling = if params.is_greedy() {
        Sampling::ArgMax
    } else {
        let temperature = params.temperature;
        match (params.top_k, params.top_p) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    };
    LogitsProcessor::from_sampling(params.seed, sampling)
}
