//! Maps request sampling settings onto candle's logits processor; greedy decoding reads the
//! logits where they lie.

use candle_core::{CpuStorage, Storage, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use ferry_core::SamplingParams;

use crate::model::cpu_ops::lanes_max;

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

/// One request's sampler: candle's logits processor, except that greedy decoding on the CPU
/// scans the logits in place in eight lanes. candle's argmax is one branchy chain over the
/// vocabulary; at eight streams it was 3 % of a step, on one core while the other waited.
pub struct Sampler {
    greedy: bool,
    processor: LogitsProcessor,
}

impl Sampler {
    /// The sampler `params` ask for, seeded by them.
    pub fn new(params: &SamplingParams) -> Self {
        Sampler {
            greedy: params.is_greedy(),
            processor: logits_processor(params),
        }
    }

    /// The next token from a vector of logits.
    pub fn sample(&mut self, logits: &Tensor) -> candle_core::Result<u32> {
        if self.greedy {
            let (storage, layout) = logits.storage_and_layout();
            if let (Storage::Cpu(CpuStorage::F32(all)), Some((start, end)), 1) =
                (&*storage, layout.contiguous_offsets(), layout.dims().len())
            {
                return Ok(first_max(&all[start..end]) as u32);
            }
        }
        self.processor.sample(logits)
    }
}

/// The index of the first largest value, exactly as candle's argmax picks it: it starts from
/// the first value and moves only to a strictly larger one, so a NaN is passed over, except a
/// NaN first, which nothing is larger than.
pub fn first_max(v: &[f32]) -> usize {
    if v.first().is_none_or(|x| x.is_nan()) {
        return 0;
    }
    let max = lanes_max(v);
    v.iter().position(|&x| x == max).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_what_candles_argmax_picks() {
        let device = candle_core::Device::Cpu;
        let cases: Vec<Vec<f32>> = vec![
            (0..49_152).map(|i| ((i as f32) * 0.731).sin()).collect(),
            vec![1.0, 3.0, 3.0, 2.0],
            vec![-5.0; 17],
            vec![f32::NAN, 0.5, 2.0, 2.0, f32::NAN],
            vec![0.5, f32::NAN, 2.0, 2.0, f32::NAN],
            vec![f32::NEG_INFINITY, f32::NEG_INFINITY],
            vec![0.0, -0.0, 0.0],
            vec![7.0],
        ];
        let params = SamplingParams::greedy(16);
        for v in cases {
            let t = Tensor::new(v.as_slice(), &device).unwrap();
            let want = t
                .argmax(candle_core::D::Minus1)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            assert_eq!(Sampler::new(&params).sample(&t).unwrap(), want, "{v:?}");
            assert_eq!(first_max(&v) as u32, want);
        }
        // A view into a larger buffer (a row of a batch's logits) reads its own values.
        let rows = Tensor::new(&[[1.0f32, 9.0, 2.0], [8.0, 0.0, 3.0]], &device).unwrap();
        let row = rows.get(1).unwrap();
        assert_eq!(Sampler::new(&params).sample(&row).unwrap(), 0);
    }
}
