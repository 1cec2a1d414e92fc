//! The safetensors path: a llama checkpoint exported from the bundled GGUF must answer exactly as
//! the GGUF does, and a tiny randomly initialised Qwen2 checkpoint written here must load and
//! generate (wiring only; its text is noise). Needs `ferry models fetch`.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ferry_core::{ChatMessage, ModelManifest, Role, SamplingParams};
use ferry_engine::{adhoc_manifest, GenerateOptions, LoadedModel};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn gguf_path() -> PathBuf {
    let dir = std::env::var_os("FERRY_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/cache"));
    let p = dir.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} missing: run `cargo run -p ferry-cli -- models fetch`",
        p.display()
    );
    p
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> usize {
    ct.metadata[key].to_u32().unwrap() as usize
}

fn meta_f32(ct: &gguf_file::Content, key: &str) -> f64 {
    ct.metadata[key].to_f32().unwrap() as f64
}

/// llama.cpp stores q/k rows permuted for its RoPE layout; the HF layout is the inverse.
fn unpermute(w: Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, out / heads / 2, 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// Writes `dir/{model.safetensors, config.json, tokenizer.json, tokenizer_config.json}` from the
/// GGUF: dequantised weights in f16 under Hugging Face llama names.
fn export_llama(gguf: &Path, dir: &Path) {
    let mut f = std::fs::File::open(gguf).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let heads = meta_u32(&ct, "llama.attention.head_count");
    let kv_heads = meta_u32(&ct, "llama.attention.head_count_kv");
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let names: Vec<String> = ct.tensor_infos.keys().cloned().collect();
    for name in names {
        let t = ct
            .tensor(&mut f, &name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let hf = if let Some(rest) = name.strip_prefix("blk.") {
            let (layer, part) = rest.split_once('.').unwrap();
            let part = part.trim_end_matches(".weight");
            let (hf_part, t) = match part {
                "attn_q" => ("self_attn.q_proj", unpermute(t, heads)),
                "attn_k" => ("self_attn.k_proj", unpermute(t, kv_heads)),
                "attn_v" => ("self_attn.v_proj", t),
                "attn_output" => ("self_attn.o_proj", t),
                "attn_norm" => ("input_layernorm", t),
                "ffn_norm" => ("post_attention_layernorm", t),
                "ffn_gate" => ("mlp.gate_proj", t),
                "ffn_up" => ("mlp.up_proj", t),
                "ffn_down" => ("mlp.down_proj", t),
                other => panic!("unexpected tensor {other}"),
            };
            tensors.insert(
                format!("model.layers.{layer}.{hf_part}.weight"),
                t.to_dtype(DType::F16).unwrap(),
            );
            continue;
        } else {
            match name.as_str() {
                "token_embd.weight" => "model.embed_tokens.weight",
                "output_norm.weight" => "model.norm.weight",
                "output.weight" => "lm_head.weight",
                other => panic!("unexpected tensor {other}"),
            }
        };
        tensors.insert(hf.to_string(), t.to_dtype(DType::F16).unwrap());
    }
    let tied = !tensors.contains_key("lm_head.weight");
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let vocab = ct.metadata["tokenizer.ggml.tokens"].to_vec().unwrap().len();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta_u32(&ct, "llama.embedding_length"),
        "intermediate_size": meta_u32(&ct, "llama.feed_forward_length"),
        "num_hidden_layers": meta_u32(&ct, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": meta_f32(&ct, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta_f32(&ct, "llama.rope.freq_base"),
        "max_position_embeddings": meta_u32(&ct, "llama.context_length"),
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let template = ct.metadata["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .clone();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}).to_string(),
    )
    .unwrap();
    let tok = ferry_engine::tokenizer::from_gguf(&ct, gguf).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
}

fn answer(model: &LoadedModel, q: &str, n: u32) -> String {
    let ids = model
        .encode_chat(&[
            ChatMessage::text(Role::System, "You are a helpful assistant."),
            ChatMessage::text(Role::User, q),
        ])
        .unwrap();
    let mut sink = |_: &str| ControlFlow::Continue(());
    model
        .generate(
            &ids,
            &SamplingParams::greedy(n),
            GenerateOptions::default(),
            &mut sink,
        )
        .unwrap()
        .text
}

#[test]
fn llama_safetensors_export_answers_like_the_gguf() {
    let gguf = gguf_path();
    let dir = tempfile::tempdir().unwrap();
    export_llama(&gguf, dir.path());
    let st = LoadedModel::load(
        &adhoc_manifest(dir.path().to_str().unwrap()).unwrap(),
        Path::new("/unused"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(st.info().family, "llama");
    let gg = LoadedModel::load(
        &adhoc_manifest(gguf.to_str().unwrap()).unwrap(),
        Path::new("/unused"),
        &Device::Cpu,
    )
    .unwrap();
    // Same tokenizer, same template: same prompt ids.
    let msgs = [ChatMessage::text(Role::User, "Hi")];
    assert_eq!(
        st.encode_chat(&msgs).unwrap(),
        gg.encode_chat(&msgs).unwrap()
    );
    let a = answer(&st, "What is the capital of France?", 16);
    let b = answer(&gg, "What is the capital of France?", 16);
    assert_eq!(a, "The capital of France is Paris.");
    assert_eq!(a, b);
}

#[test]
fn tiny_random_qwen2_checkpoint_loads_and_generates() {
    let gguf = gguf_path();
    let dir = tempfile::tempdir().unwrap();
    // Reuse the bundled tokenizer so the checkpoint has a real vocabulary.
    let mut f = std::fs::File::open(&gguf).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let tok = ferry_engine::tokenizer::from_gguf(&ct, &gguf).unwrap();
    tok.save(dir.path().join("tokenizer.json"), false).unwrap();
    let vocab = tok.get_vocab_size(true);
    let config = serde_json::json!({
        "model_type": "qwen2", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "sliding_window": 256, "max_window_layers": 2,
        "tie_word_embeddings": true, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "use_sliding_window": false, "hidden_act": "silu", "eos_token_id": 2
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let cfg: candle_transformers::models::qwen2::Config = serde_json::from_value(config).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    candle_transformers::models::qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
    varmap.save(dir.path().join("model.safetensors")).unwrap();

    let mut manifest: ModelManifest = adhoc_manifest(dir.path().to_str().unwrap()).unwrap();
    manifest.id = "tiny-qwen2".into();
    let model = LoadedModel::load(&manifest, Path::new("/unused"), &Device::Cpu).unwrap();
    assert_eq!(model.info().family, "qwen2");
    assert_eq!(model.info().context_length, 256);
    let ids = model
        .encode_chat(&[ChatMessage::text(Role::User, "Hello")])
        .unwrap();
    let run = || {
        let mut sink = |_: &str| ControlFlow::Continue(());
        model
            .generate(
                &ids,
                &SamplingParams::greedy(8),
                GenerateOptions { ignore_eos: true },
                &mut sink,
            )
            .unwrap()
    };
    let (a, b) = (run(), run());
    assert_eq!(a.completion_tokens, 8);
    assert_eq!(a.text, b.text, "greedy decoding is deterministic");
}
