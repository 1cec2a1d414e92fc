//! Local inference with candle.
//!
//! `ferry-engine` owns everything between a validated chat request and a stream of text: finding
//! a model's files (local directory or Hugging Face cache), loading GGUF (quantized llama) and
//! safetensors (llama, qwen2) weights, building the tokenizer (from `tokenizer.json` or from the
//! GGUF vocabulary), rendering the chat template, sampling, stop strings, UTF-8-safe
//! incremental detokenisation, and continuous batching of many generations of one model
//! ([`batch`]). Vision-language models (LLaVA-1.5, LLaVA-NeXT) also get their
//! images decoded and preprocessed ([`vision`]) and spliced into the prompt. It knows nothing
//! about gRPC; `ferryd` and `ferry bench` drive it.

pub mod batch;
pub mod encoder;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod sampling;
pub mod source;
pub mod stream;
pub mod template;
pub mod tokenizer;
pub mod vision;

mod engine;

pub use engine::{
    EngineStats, GenerateOptions, GenerationEvent, GenerationOutcome, LoadedModel, ModelInfo,
    MultimodalPrompt,
};
pub use source::{adhoc_manifest, ModelLocation};

/// Maps a candle error into ferry's error type.
pub(crate) fn candle_err(e: candle_core::Error) -> ferry_core::Error {
    ferry_core::Error::Engine(e.to_string())
}

pub use candle_core::Device;

/// The device models load on: the first CUDA GPU when built with `cuda` and one is present,
/// otherwise the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
        tracing::warn!("built with CUDA but no GPU is usable; running on the CPU");
    }
    Device::Cpu
}

/// A device in the words figures carry: `cpu`, `cuda:0`, `metal:0`.
pub fn device_label(device: &Device) -> String {
    use candle_core::DeviceLocation;
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
