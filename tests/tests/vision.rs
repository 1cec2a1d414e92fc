//! The vision path of ferry-cloud's candle backend, with a real image.
//!
//! The test writes a tiny randomly initialised LLaVA-NeXT checkpoint in the layout of the
//! `llava-hf` repositories (`config.json`, `model.safetensors` with transformers' tensor names, a
//! Llama-style SentencePiece `tokenizer.json` with an `<image>` token, `tokenizer_config.json`,
//! `preprocessor_config.json`), points ferry-cloud at it as a candle model, and sends
//! `OffloadRequest`s carrying a real PNG of the easy-VQA dataset (the `easy-vqa` PyPI package,
//! fetched by `scripts/fetch-test-data`) over loopback gRPC. Nothing is mocked: the real loader,
//! candle's CLIP and llama modules, the real image decoder and preprocessing.
//!
//! Quality is not asserted (the weights are random). What is: the image was decoded, tiled and
//! its features took their place in the prompt — the usage's prompt tokens are the text tokens
//! plus the image's feature positions computed by hand below — and a completion streams; a bad
//! image is INVALID_ARGUMENT naming its field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use ferry_cloud::{CloudConfig, CloudServer};
use ferry_core::{ChatMessage, ImagePart, ModelManifest, Part, Role};
use ferry_engine::tokenizer::{sentencepiece_bpe, SpmVocab};
use ferry_engine::vision::{self, ImageProcessor, ImageProcessorConfig, ResizeTo, Tiling};
use ferry_engine::LoadedModel;
use ferry_integration::repo_root;
use ferry_proto::v1 as pb;
use futures::StreamExt;
use pb::offload_client::OffloadClient;
use tonic::transport::Channel;

const MODEL: &str = "tiny-llava-next";
/// Language model sizes.
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const INTERMEDIATE: usize = 128;
const LAYERS: usize = 2;
/// Vision tower sizes: 28-pixel views of 14-pixel patches, so 2x2 patches per view.
const V_HIDDEN: usize = 32;
const V_HEADS: usize = 2;
const V_INTERMEDIATE: usize = 64;
const V_LAYERS: usize = 2;
const IMAGE_PX: usize = 28;
const PATCH_PX: usize = 14;

/// Where `scripts/fetch-test-data` unpacked the easy-VQA test split.
fn easy_vqa_dir() -> PathBuf {
    let root = std::env::var_os("FERRY_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/test-data"));
    let dir = root.join("easy-vqa/test");
    assert!(
        dir.join("images/0.png").is_file(),
        "{} is missing: run scripts/fetch-test-data (scripts/test does this)",
        dir.display()
    );
    dir
}

/// Test image `n` of easy-VQA (a 64x64 RGB PNG) and its first question.
fn easy_vqa(n: u64) -> (Vec<u8>, String) {
    let dir = easy_vqa_dir();
    let png = std::fs::read(dir.join(format!("images/{n}.png"))).unwrap();
    let questions: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("questions.json")).unwrap()).unwrap();
    let question = questions
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q[2].as_u64() == Some(n))
        .and_then(|q| q[0].as_str())
        .unwrap()
        .to_string();
    (png, question)
}

/// SplitMix64: seeded, reproducible weights without depending on candle's unseedable CPU RNG.
struct SplitMix(u64);

impl SplitMix {
    fn next_unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Uniform in [-1, 1).
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.next_unit() * scale).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }
}

/// The tokenizer: Llama-style SentencePiece BPE (byte fallback, `▁` for spaces) with `<unk>`,
/// `<s>`, `</s>`, the 256 byte pieces, `▁` and the lower-case letters, and `<image>` last.
/// Returns (vocabulary size, id of `<image>`).
fn write_tokenizer(dir: &Path) -> (usize, u32) {
    // GGUF token types: 1 normal, 2 unknown, 3 control, 6 byte.
    let mut v = SpmVocab {
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        add_bos: true,
        add_space_prefix: true,
        ..Default::default()
    };
    let mut push = |t: String, score: f32, ty: u32| {
        v.tokens.push(t);
        v.scores.push(score);
        v.types.push(ty);
    };
    push("<unk>".into(), 0.0, 2);
    push("<s>".into(), 0.0, 3);
    push("</s>".into(), 0.0, 3);
    for b in 0..=255u8 {
        push(format!("<0x{b:02X}>"), 0.0, 6);
    }
    push("\u{2581}".into(), -1.0, 1);
    for (i, c) in ('a'..='z').enumerate() {
        push(c.to_string(), -2.0 - i as f32, 1);
    }
    push("<image>".into(), 0.0, 3);
    let image_id = (v.tokens.len() - 1) as u32;
    let size = v.tokens.len();
    sentencepiece_bpe(&v)
        .unwrap()
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
            .to_string(),
    )
    .unwrap();
    (size, image_id)
}

/// Writes the checkpoint into `dir`; returns the id of the image placeholder.
fn write_checkpoint(dir: &Path, seed: u64) -> u32 {
    std::fs::create_dir_all(dir).unwrap();
    let (vocab, image_id) = write_tokenizer(dir);
    let config = serde_json::json!({
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "image_token_index": image_id,
        "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56]],
        "projector_hidden_act": "gelu",
        "use_image_newline_parameter": true,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": vocab,
        "text_config": {
            "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": V_HIDDEN,
            "intermediate_size": V_INTERMEDIATE, "num_hidden_layers": V_LAYERS,
            "num_attention_heads": V_HEADS, "image_size": IMAGE_PX, "patch_size": PATCH_PX,
            "projection_dim": V_HIDDEN, "hidden_act": "quick_gelu"
        }
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": 2}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("preprocessor_config.json"),
        serde_json::json!({
            "image_processor_type": "LlavaNextImageProcessor",
            "crop_size": {"height": IMAGE_PX, "width": IMAGE_PX},
            "size": {"shortest_edge": IMAGE_PX},
            "do_center_crop": true, "do_convert_rgb": true, "do_normalize": true,
            "do_rescale": true, "do_resize": true, "resample": 3,
            "rescale_factor": 1.0 / 255.0,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56]]
        })
        .to_string(),
    )
    .unwrap();

    let mut rng = SplitMix(seed);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, shape: &[usize], rng: &mut SplitMix| {
        let value = if name.ends_with("norm.weight")
            || name.ends_with("layer_norm1.weight")
            || name.ends_with("layer_norm2.weight")
            || name.ends_with("layrnorm.weight")
        {
            Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).unwrap()
        } else {
            rng.tensor(shape, 0.1)
        };
        t.insert(name, value);
    };
    let v = "vision_tower.vision_model";
    let positions = (IMAGE_PX / PATCH_PX).pow(2) + 1;
    add(
        format!("{v}.embeddings.class_embedding"),
        &[V_HIDDEN],
        &mut rng,
    );
    add(
        format!("{v}.embeddings.patch_embedding.weight"),
        &[V_HIDDEN, 3, PATCH_PX, PATCH_PX],
        &mut rng,
    );
    add(
        format!("{v}.embeddings.position_embedding.weight"),
        &[positions, V_HIDDEN],
        &mut rng,
    );
    for norm in ["pre_layrnorm", "post_layernorm"] {
        add(format!("{v}.{norm}.weight"), &[V_HIDDEN], &mut rng);
        add(format!("{v}.{norm}.bias"), &[V_HIDDEN], &mut rng);
    }
    for i in 0..V_LAYERS {
        let l = format!("{v}.encoder.layers.{i}");
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(
                format!("{l}.self_attn.{p}.weight"),
                &[V_HIDDEN, V_HIDDEN],
                &mut rng,
            );
            add(format!("{l}.self_attn.{p}.bias"), &[V_HIDDEN], &mut rng);
        }
        for norm in ["layer_norm1", "layer_norm2"] {
            add(format!("{l}.{norm}.weight"), &[V_HIDDEN], &mut rng);
            add(format!("{l}.{norm}.bias"), &[V_HIDDEN], &mut rng);
        }
        add(
            format!("{l}.mlp.fc1.weight"),
            &[V_INTERMEDIATE, V_HIDDEN],
            &mut rng,
        );
        add(format!("{l}.mlp.fc1.bias"), &[V_INTERMEDIATE], &mut rng);
        add(
            format!("{l}.mlp.fc2.weight"),
            &[V_HIDDEN, V_INTERMEDIATE],
            &mut rng,
        );
        add(format!("{l}.mlp.fc2.bias"), &[V_HIDDEN], &mut rng);
    }
    add(
        "multi_modal_projector.linear_1.weight".into(),
        &[HIDDEN, V_HIDDEN],
        &mut rng,
    );
    add(
        "multi_modal_projector.linear_1.bias".into(),
        &[HIDDEN],
        &mut rng,
    );
    add(
        "multi_modal_projector.linear_2.weight".into(),
        &[HIDDEN, HIDDEN],
        &mut rng,
    );
    add(
        "multi_modal_projector.linear_2.bias".into(),
        &[HIDDEN],
        &mut rng,
    );
    add("image_newline".into(), &[HIDDEN], &mut rng);
    let lm = "language_model.model";
    let kv = KV_HEADS * HIDDEN / HEADS;
    add(
        format!("{lm}.embed_tokens.weight"),
        &[vocab, HIDDEN],
        &mut rng,
    );
    for i in 0..LAYERS {
        let l = format!("{lm}.layers.{i}");
        add(
            format!("{l}.self_attn.q_proj.weight"),
            &[HIDDEN, HIDDEN],
            &mut rng,
        );
        add(
            format!("{l}.self_attn.k_proj.weight"),
            &[kv, HIDDEN],
            &mut rng,
        );
        add(
            format!("{l}.self_attn.v_proj.weight"),
            &[kv, HIDDEN],
            &mut rng,
        );
        add(
            format!("{l}.self_attn.o_proj.weight"),
            &[HIDDEN, HIDDEN],
            &mut rng,
        );
        add(
            format!("{l}.mlp.gate_proj.weight"),
            &[INTERMEDIATE, HIDDEN],
            &mut rng,
        );
        add(
            format!("{l}.mlp.up_proj.weight"),
            &[INTERMEDIATE, HIDDEN],
            &mut rng,
        );
        add(
            format!("{l}.mlp.down_proj.weight"),
            &[HIDDEN, INTERMEDIATE],
            &mut rng,
        );
        add(format!("{l}.input_layernorm.weight"), &[HIDDEN], &mut rng);
        add(
            format!("{l}.post_attention_layernorm.weight"),
            &[HIDDEN],
            &mut rng,
        );
    }
    add(format!("{lm}.norm.weight"), &[HIDDEN], &mut rng);
    // A random model would end at once one time in `vocab` at greedy decoding; a zero row for
    // `</s>` keeps its logit at 0 while other logits spread both ways, so the test sees tokens.
    let mut head: Vec<f32> = rng
        .tensor(&[vocab, HIDDEN], 0.1)
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    head[2 * HIDDEN..3 * HIDDEN].fill(0.0);
    t.insert(
        "language_model.lm_head.weight".into(),
        Tensor::from_vec(head, (vocab, HIDDEN), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    image_id
}

fn manifest_text(dir: &Path) -> String {
    format!(
        "id = \"{MODEL}\"\nfamily = \"auto\"\nformat = \"safetensors\"\ntier = \"cloud\"\n\
         capabilities = [\"text\", \"image\"]\ndir = {:?}\n\
         description = \"tiny random LLaVA-NeXT written by tests/tests/vision.rs\"\n",
        dir.display().to_string()
    )
}

fn user(parts: Vec<Part>) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: Role::User,
        parts,
    }]
}

fn png_part(data: Vec<u8>) -> Part {
    Part::Image(ImagePart {
        data,
        mime_type: "image/png".into(),
        source: "camera/front".into(),
    })
}

/// Positions one 64x64 image takes in this model's prompt, by hand. The 28x28 view has 2x2
/// patches: 4 overview positions. Of the grid resolutions (h x w) 28x56, 56x28 and 56x56, a
/// 64x64 image is shown with the most detail by 56x56 (3136 effective pixels against 784), so
/// it is tiled 2x2; the tiles' patches form a 4x4 feature map, square like the image, so no
/// padding rows or columns are cropped; each of the 4 rows gets the newline vector: 4 * (4 + 1).
const IMAGE_POSITIONS: usize = 4 + 4 * (4 + 1);

fn wire_text(text: &str) -> pb::ContentPart {
    pb::ContentPart {
        kind: Some(pb::content_part::Kind::Text(text.to_string())),
    }
}

fn wire_image(data: Vec<u8>) -> pb::ContentPart {
    pb::ContentPart {
        kind: Some(pb::content_part::Kind::Image(pb::Image {
            data,
            mime_type: "image/png".into(),
            source: "camera/front".into(),
        })),
    }
}

fn request(id: &str, parts: Vec<pb::ContentPart>) -> pb::OffloadRequest {
    pb::OffloadRequest {
        request_id: id.to_string(),
        model: MODEL.to_string(),
        messages: vec![pb::Message {
            role: pb::Role::User as i32,
            parts,
        }],
        max_tokens: Some(8),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// Runs a request to the end: (text, completion).
async fn run(
    client: &mut OffloadClient<Channel>,
    req: pb::OffloadRequest,
) -> Result<(String, pb::OffloadCompletion), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut text = String::new();
    let mut done = None;
    while let Some(item) = stream.next().await {
        match item?.event {
            Some(pb::offload_response::Event::Delta(d)) => {
                assert!(done.is_none(), "delta after the completion");
                text.push_str(&d.text);
            }
            Some(pb::offload_response::Event::Completion(c)) => done = Some(c),
            None => panic!("empty event"),
        }
    }
    Ok((text, done.expect("stream ended without a completion")))
}

/// The README's example manifest for a real checkpoint parses and names a vision model.
#[test]
fn the_example_llava_manifest_parses() {
    let m = ModelManifest::load(&repo_root().join("models/examples/llava-v1.6-mistral-7b-hf.toml"))
        .unwrap();
    assert!(m.accepts_images());
    assert_eq!(m.family, "llava_next");
    assert_eq!(m.hub.as_deref(), Some("llava-hf/llava-v1.6-mistral-7b-hf"));
}

#[test]
fn a_real_easy_vqa_png_preprocesses_into_normalised_llava_next_views() {
    let (png, _) = easy_vqa(0);
    let rgb = vision::decode(&png).unwrap();
    assert_eq!((rgb.width(), rgb.height()), (64, 64));
    let config = ImageProcessorConfig {
        size: ResizeTo::ShortestEdge(IMAGE_PX as u32),
        crop_hw_px: (IMAGE_PX as u32, IMAGE_PX as u32),
        ..Default::default()
    };
    let processor = ImageProcessor::new(
        config.clone(),
        Tiling::AnyRes {
            pinpoints_hw_px: vec![(28, 56), (56, 28), (56, 56)],
        },
    )
    .unwrap();
    let prepared = processor.prepare(&rgb, &Device::Cpu).unwrap();
    // The overview and a 2x2 grid of tiles.
    assert_eq!(prepared.pixel_values.dims(), &[5, 3, IMAGE_PX, IMAGE_PX]);
    assert_eq!(prepared.grid_rows_cols, Some((2, 2)));
    assert_eq!(prepared.original_hw_px, (64, 64));
    // Every value lies between what black and white normalise to, per channel; the image is a
    // shape on a white background, so white is present.
    for c in 0..3 {
        let plane: Vec<f32> = prepared
            .pixel_values
            .narrow(1, c, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let black = -config.image_mean[c] / config.image_std[c];
        let white = (1.0 - config.image_mean[c]) / config.image_std[c];
        let (lo, hi) = plane
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        assert!(lo >= black - 1e-4 && hi <= white + 1e-4, "{lo}..{hi}");
        assert!(
            (hi - white).abs() < 1e-4,
            "channel {c} has white: {hi} vs {white}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_llava_next_answers_a_real_png_over_loopback_grpc() {
    let (png, question) = easy_vqa(0);
    let (png2, _) = easy_vqa(1);
    let root = tempfile::tempdir().unwrap();
    let model_dir = root.path().join("models");
    let checkpoint = model_dir.join(MODEL);
    let image_id = write_checkpoint(&checkpoint, 0x11a7a);
    let manifest_dir = root.path().join("manifests");
    std::fs::create_dir_all(&manifest_dir).unwrap();
    let manifest_path = manifest_dir.join(format!("{MODEL}.toml"));
    std::fs::write(&manifest_path, manifest_text(&checkpoint)).unwrap();

    // The real loader, in process: what the prompt should count.
    let manifest = ModelManifest::load(&manifest_path).unwrap();
    let model = LoadedModel::load(&manifest, &model_dir, &Device::Cpu).unwrap();
    assert_eq!(model.info().family, "llava_next");
    assert!(model.accepts_images());
    let with_image = model
        .encode_multimodal(&user(vec![
            Part::Text(question.clone()),
            png_part(png.clone()),
        ]))
        .unwrap();
    assert_eq!(with_image.image_count(), 1);
    assert_eq!(with_image.image_positions(), IMAGE_POSITIONS);
    assert_eq!(
        with_image.tokens.iter().filter(|&&t| t == image_id).count(),
        1,
        "one placeholder"
    );
    assert_eq!(
        with_image.positions(),
        with_image.tokens.len() - 1 + IMAGE_POSITIONS
    );
    let text_only = model
        .encode_chat(&user(vec![Part::Text(question.clone())]))
        .unwrap();
    let two_images = model
        .encode_multimodal(&user(vec![
            png_part(png.clone()),
            Part::Text(question.clone()),
            png_part(png2.clone()),
        ]))
        .unwrap();
    assert_eq!(two_images.image_positions(), 2 * IMAGE_POSITIONS);
    drop(model);

    // ferry-cloud with the checkpoint as a candle model.
    let config = CloudConfig::from_toml(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_s = 5\n\
             [candle]\nmanifest_dir = {:?}\nmodel_dir = {:?}\n\
             [[models]]\nid = \"{MODEL}\"\nbackend = \"candle\"\n",
            manifest_dir.display().to_string(),
            model_dir.display().to_string()
        ),
        Path::new("vision-test.toml"),
    )
    .unwrap();
    let server = CloudServer::start(config)
        .await
        .expect("ferry-cloud starts");
    let addr = format!("http://{}", server.local_addr);
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = OffloadClient::connect(addr.clone()).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = client.expect("connects");

    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].family, "llava_next");
    assert_eq!(models[0].capabilities, vec!["text", "image"]);

    // Text and the real PNG: a completion with tokens, the image counted in the prompt.
    let (_, c) = run(
        &mut client,
        request("vqa-1", vec![wire_text(&question), wire_image(png.clone())]),
    )
    .await
    .unwrap();
    assert_eq!(c.backend, "candle");
    let usage = c.usage.unwrap();
    assert_eq!(usage.prompt_tokens as usize, with_image.positions());
    assert!(
        usage.completion_tokens >= 1 && usage.completion_tokens <= 8,
        "{usage:?}"
    );

    // The same model answers text alone.
    let (_, c) = run(&mut client, request("vqa-2", vec![wire_text(&question)]))
        .await
        .unwrap();
    assert_eq!(c.usage.unwrap().prompt_tokens as usize, text_only.len());

    // Two images: two placeholders, each replaced by its features.
    let (_, c) = run(
        &mut client,
        request(
            "vqa-3",
            vec![
                wire_image(png.clone()),
                wire_text(&question),
                wire_image(png2),
            ],
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        c.usage.unwrap().prompt_tokens as usize,
        two_images.positions()
    );

    // Images that do not decode: INVALID_ARGUMENT naming the part, no panic.
    for (id, bad) in [
        ("vqa-4", b"this is not a png".to_vec()),
        ("vqa-5", png[..png.len() / 2].to_vec()),
    ] {
        let err = run(
            &mut client,
            request(id, vec![wire_text(&question), wire_image(bad)]),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains("messages[0].parts[1].image"),
            "{}",
            err.message()
        );
    }
    // The server is still serving.
    let (_, c) = run(
        &mut client,
        request("vqa-6", vec![wire_text(&question), wire_image(png)]),
    )
    .await
    .unwrap();
    assert!(c.usage.unwrap().completion_tokens >= 1);

    server.shutdown(Duration::from_secs(5)).await;
}
