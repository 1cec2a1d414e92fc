//! LLaVA-1.5 and LLaVA-NeXT (LLaVA-1.6) from Hugging Face checkpoints in the `llava-hf` layout
//! (`model_type` `llava` or `llava_next`): a CLIP vision tower, a projector of two linear layers
//! into the language model's embedding space, and a llama-architecture language model (Vicuna,
//! Mistral, Yi). The layers are candle-transformers' CLIP and llama modules; this file wires them
//! as transformers does:
//!
//! - the projector reads the vision tower's hidden state named by `vision_feature_layer`,
//!   counted as transformers counts hidden states (0 = embeddings, so -2 is the input of the last
//!   layer), without the CLS position for `vision_feature_select_strategy = "default"`;
//! - LLaVA-NeXT packs an image's overview features, then its tiles' features laid out as one
//!   feature map, cropped back to the image's aspect ratio, with the learned `image_newline`
//!   vector after every row;
//! - each image placeholder token of the prompt is replaced by that image's features.
//!
//! Weights are read from the legacy layout (`language_model.model.*`, `vision_tower.*`, as the
//! `llava-hf` repositories ship them) or the layout of transformers >= 4.52
//! (`model.language_model.*`, `model.vision_tower.*`, `lm_head.*`).

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Activation, Linear, VarBuilder};
use candle_transformers::models::clip::text_model::Activation as ClipActivation;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use candle_transformers::models::llama;

use crate::vision::PreparedImage;

/// Which LLaVA generation a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlavaVersion {
    /// `llava`: one 336-pixel view per image (LLaVA-1.5).
    V1_5,
    /// `llava_next`: "anyres" tiles plus an overview per image (LLaVA-1.6).
    Next,
}

/// A LLaVA checkpoint's `config.json`, checked and mapped onto candle's module configs.
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub version: LlavaVersion,
    /// Token id of the image placeholder (`image_token_index`).
    pub image_token_id: u32,
    pub llama: llama::Config,
    pub vision: ClipVisionConfig,
    /// Activation between the projector's two layers (`projector_hidden_act`).
    pub projector_act: Activation,
    /// The vision hidden state the projector reads, as transformers counts them (0 is the
    /// embeddings, 1 the first layer's output; negative counts from the end).
    pub feature_layer: isize,
    /// Keep the CLS position (`vision_feature_select_strategy = "full"`).
    pub keep_cls: bool,
    /// LLaVA-NeXT grid resolutions, (height, width) in pixels.
    pub pinpoints_hw_px: Vec<(u32, u32)>,
}

/// Inserts `value` under `key` unless the object has a non-null value there.
fn default_key(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    value: serde_json::Value,
) {
    if obj.get(key).is_none_or(|v| v.is_null()) {
        obj.insert(key.to_string(), value);
    }
}

impl LlavaConfig {
    /// Reads a parsed `config.json` of a `llava` or `llava_next` checkpoint. Keys transformers
    /// leaves out of `text_config` and `vision_config` take transformers' defaults (llama 7B,
    /// CLIP ViT-L/14 at 336 pixels for llava-hf's sub-configs). Errors are readable reasons.
    pub fn from_json(config: &serde_json::Value) -> std::result::Result<Self, String> {
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let version = match model_type {
            "llava" => LlavaVersion::V1_5,
            "llava_next" => LlavaVersion::Next,
            other => {
                return Err(format!(
                    "model_type `{other}` is not a LLaVA checkpoint (llava, llava_next)"
                ))
            }
        };
        let int = |v: &serde_json::Value, key: &str| v.get(key).and_then(|x| x.as_i64());
        let image_token_id = int(config, "image_token_index")
            .or_else(|| int(config, "image_token_id"))
            .unwrap_or(32000);
        let image_token_id = u32::try_from(image_token_id)
            .map_err(|_| format!("image_token_index {image_token_id} is not a token id"))?;

        // The language model: a llama-architecture config with transformers' defaults.
        let mut text = config
            .get("text_config")
            .and_then(|v| v.as_object())
            .cloned()
            .unwrap_or_default();
        let text_type = text
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("llama")
            .to_string();
        if !matches!(text_type.as_str(), "llama" | "mistral") {
            return Err(format!(
                "text_config.model_type `{text_type}` is not supported (llama, mistral)"
            ));
        }
        let vocab = text
            .get("vocab_size")
            .or_else(|| config.get("vocab_size"))
            .cloned()
            .unwrap_or(serde_json::json!(32000));
        default_key(&mut text, "vocab_size", vocab);
        default_key(&mut text, "hidden_size", serde_json::json!(4096));
        default_key(&mut text, "intermediate_size", serde_json::json!(11008));
        default_key(&mut text, "num_hidden_layers", serde_json::json!(32));
        default_key(&mut text, "num_attention_heads", serde_json::json!(32));
        default_key(&mut text, "rms_norm_eps", serde_json::json!(1e-6));
        default_key(
            &mut text,
            "max_position_embeddings",
            serde_json::json!(4096),
        );
        if let Some(tie) = config.get("tie_word_embeddings") {
            default_key(&mut text, "tie_word_embeddings", tie.clone());
        }
        // A Mistral sliding window only matters past its length (4096 for the 7B models),
        // which the context length of the checkpoint already bounds; llama has no such key.
        text.remove("sliding_window");
        let llama_cfg: llama::LlamaConfig = serde_json::from_value(serde_json::Value::Object(text))
            .map_err(|e| format!("text_config: {e}"))?;
        let llama = llama_cfg.into_config(false);
        if llama.num_attention_heads == 0
            || !llama.hidden_size.is_multiple_of(llama.num_attention_heads)
        {
            return Err(
                "text_config: hidden_size must be a multiple of num_attention_heads".into(),
            );
        }

        // The vision tower: CLIP with transformers' CLIPVisionConfig defaults.
        let vision_json = config
            .get("vision_config")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        let vsize = |key: &str, default: usize| {
            vision_json
                .get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(default)
        };
        let act = vision_json
            .get("hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            return Err(format!(
                "vision_config.hidden_act `{act}` is not supported (quick_gelu)"
            ));
        }
        let vision = ClipVisionConfig {
            embed_dim: vsize("hidden_size", 1024),
            activation: ClipActivation::QuickGelu,
            intermediate_size: vsize("intermediate_size", 4096),
            num_hidden_layers: vsize("num_hidden_layers", 24),
            num_attention_heads: vsize("num_attention_heads", 16),
            projection_dim: vsize("projection_dim", 768),
            num_channels: vsize("num_channels", 3),
            image_size: vsize("image_size", 336),
            patch_size: vsize("patch_size", 14),
        };
        if vision.patch_size == 0
            || !vision.image_size.is_multiple_of(vision.patch_size)
            || vision.num_attention_heads == 0
            || !vision.embed_dim.is_multiple_of(vision.num_attention_heads)
            || vision.num_channels != 3
        {
            return Err(
                "vision_config: image_size must be a multiple of patch_size, hidden_size of \
                 num_attention_heads, and num_channels 3"
                    .into(),
            );
        }

        let projector_act: Activation = match config.get("projector_hidden_act") {
            None => Activation::Gelu,
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|_| format!("projector_hidden_act {v} is not supported"))?,
        };
        let feature_layer = match config.get("vision_feature_layer") {
            None => -2,
            Some(v) => v.as_i64().map(|x| x as isize).ok_or_else(|| {
                format!("vision_feature_layer {v} is not supported (one layer index)")
            })?,
        };
        let keep_cls = match config
            .get("vision_feature_select_strategy")
            .and_then(|v| v.as_str())
            .unwrap_or("default")
        {
            "default" => false,
            "full" => true,
            other => {
                return Err(format!(
                    "vision_feature_select_strategy `{other}` is not supported (default, full)"
                ))
            }
        };
        let pinpoints_hw_px = match config.get("image_grid_pinpoints") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value::<Vec<(u32, u32)>>(v.clone())
                .map_err(|e| format!("image_grid_pinpoints: {e}"))?,
        };
        if version == LlavaVersion::Next {
            if pinpoints_hw_px.is_empty() {
                return Err("a llava_next config needs image_grid_pinpoints".into());
            }
            if keep_cls {
                return Err(
                    "llava_next tiles cannot keep the CLS position (strategy `full`)".into(),
                );
            }
        }
        let cfg = LlavaConfig {
            version,
            image_token_id,
            llama,
            vision,
            projector_act,
            feature_layer,
            keep_cls,
            pinpoints_hw_px,
        };
        cfg.hidden_state_index()?;
        Ok(cfg)
    }

    /// Index into candle's `output_hidden_states` (the outputs of layers 1..=n, then the pooled
    /// output) of the hidden state the projector reads.
    fn hidden_state_index(&self) -> std::result::Result<usize, String> {
        let n = self.vision.num_hidden_layers as isize;
        let k = if self.feature_layer < 0 {
            n + 1 + self.feature_layer
        } else {
            self.feature_layer
        };
        if k < 1 || k > n {
            return Err(format!(
                "vision_feature_layer {} is not the output of one of the {n} vision layers",
                self.feature_layer
            ));
        }
        Ok((k - 1) as usize)
    }

    /// Patches per side of one view.
    pub fn patches_per_side(&self) -> usize {
        self.vision.image_size / self.vision.patch_size
    }
}

/// The rows and columns of a LLaVA-NeXT feature map of `map_hw` that show the image itself, not
/// the padding added to fit its grid resolution (transformers' `unpad_image`).
pub fn unpadded_range(
    original_hw_px: (u32, u32),
    map_hw: (usize, usize),
) -> (usize, usize, usize, usize) {
    let (oh, ow) = (f64::from(original_hw_px.0), f64::from(original_hw_px.1));
    let (ch, cw) = map_hw;
    // Python's int(round(x, 7)).
    let round7 = |x: f64| ((x * 1e7).round() / 1e7).trunc() as usize;
    if ow / oh > cw as f64 / ch as f64 {
        let new_h = round7(oh * (cw as f64 / ow)).min(ch);
        let pad = (ch - new_h) / 2;
        (pad, ch - pad, 0, cw)
    } else {
        let new_w = round7(ow * (ch as f64 / oh)).min(cw);
        let pad = (cw - new_w) / 2;
        (0, ch, pad, cw - pad)
    }
}

/// A loaded LLaVA model; its weights are shared by every request, each of which keeps its own
/// llama KV cache.
pub struct Llava {
    vision: ClipVisionTransformer,
    projector_in: Linear,
    projector_out: Linear,
    image_newline: Option<Tensor>,
    llama: llama::Llama,
    hidden_state: usize,
    /// The checkpoint's configuration.
    pub config: LlavaConfig,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Llava {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llava")
            .field("version", &self.config.version)
            .finish()
    }
}

impl Llava {
    /// Loads the weights of `config`'s model from `vb` (either tensor-name layout).
    pub fn load(config: LlavaConfig, vb: VarBuilder) -> Result<Self> {
        let hidden_state = config
            .hidden_state_index()
            .map_err(candle_core::Error::Msg)?;
        let new_layout = vb.contains_tensor("model.language_model.embed_tokens.weight");
        let (root, text) = if new_layout {
            let text = vb
                .clone()
                .rename_f(|name: &str| match name.strip_prefix("model.") {
                    Some(rest) => format!("model.language_model.{rest}"),
                    None => name.to_string(),
                });
            (vb.pp("model"), text)
        } else {
            (vb.clone(), vb.pp("language_model"))
        };
        let vision =
            ClipVisionTransformer::new(root.pp("vision_tower.vision_model"), &config.vision)?;
        let hidden = config.llama.hidden_size;
        let projector_in = candle_nn::linear(
            config.vision.embed_dim,
            hidden,
            root.pp("multi_modal_projector.linear_1"),
        )?;
        let projector_out =
            candle_nn::linear(hidden, hidden, root.pp("multi_modal_projector.linear_2"))?;
        let image_newline = match config.version {
            LlavaVersion::Next if root.contains_tensor("image_newline") => {
                Some(root.get(hidden, "image_newline")?)
            }
            _ => None,
        };
        // candle's llama loader unwraps each layer's weights: turn a missing tensor into an
        // error instead of a panic.
        let llama_cfg = config.llama.clone();
        let llama = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            llama::Llama::load(text, &llama_cfg)
        }))
        .map_err(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a layer failed to load".to_string());
            candle_core::Error::Msg(format!("language model: {why}"))
        })??;
        Ok(Llava {
            vision,
            projector_in,
            projector_out,
            image_newline,
            llama,
            hidden_state,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
        })
    }

    /// A fresh KV cache for one request.
    pub fn new_cache(&self, device: &Device) -> Result<llama::Cache> {
        llama::Cache::new(true, self.dtype, &self.config.llama, device)
    }

    /// Positions the features of `image` take in the prompt (without running the tower).
    pub fn image_positions(&self, image: &PreparedImage) -> usize {
        let side = self.config.patches_per_side();
        let per_view = side * side + usize::from(self.config.keep_cls);
        match (self.config.version, image.grid_rows_cols) {
            (LlavaVersion::Next, Some((rows, cols))) => {
                let map_hw = (rows as usize * side, cols as usize * side);
                let (r0, r1, c0, c1) = unpadded_range(image.original_hw_px, map_hw);
                let newline = usize::from(self.image_newline.is_some());
                per_view + (r1 - r0) * (c1 - c0 + newline)
            }
            _ => per_view * image.pixel_values.dims().first().copied().unwrap_or(1),
        }
    }

    /// The features that replace `image`'s placeholder: `(positions, hidden_size)`.
    pub fn image_features(&self, image: &PreparedImage) -> Result<Tensor> {
        let pixels = image
            .pixel_values
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let states = self.vision.output_hidden_states(&pixels)?;
        let mut features = states
            .get(self.hidden_state)
            .ok_or_else(|| candle_core::Error::Msg("vision tower has too few layers".into()))?
            .clone();
        if !self.config.keep_cls {
            features = features.i((.., 1..))?;
        }
        let features = self.projector_out.forward(
            &self
                .config
                .projector_act
                .forward(&self.projector_in.forward(&features)?)?,
        )?;
        let (views, per_view, hidden) = features.dims3()?;
        match (self.config.version, image.grid_rows_cols) {
            (LlavaVersion::Next, Some((rows, cols))) => {
                let (rows, cols) = (rows as usize, cols as usize);
                let side = self.config.patches_per_side();
                if views != 1 + rows * cols || per_view != side * side {
                    candle_core::bail!(
                        "{views} views of {per_view} positions do not make an overview and a {rows}x{cols} grid of {side}x{side} patches"
                    );
                }
                let overview = features.i(0)?;
                // (rows, cols, side, side, hidden) -> (hidden, rows * side, cols * side)
                let map = features
                    .i(1..)?
                    .reshape((rows, cols, side, side, hidden))?
                    .permute((4, 0, 2, 1, 3))?
                    .contiguous()?
                    .reshape((hidden, rows * side, cols * side))?;
                let (r0, r1, c0, c1) =
                    unpadded_range(image.original_hw_px, (rows * side, cols * side));
                let map = map.i((.., r0..r1, c0..c1))?;
                let map = match &self.image_newline {
                    Some(newline) => {
                        let (_, h, _) = map.dims3()?;
                        let column = newline
                            .reshape((hidden, 1, 1))?
                            .broadcast_as((hidden, h, 1))?;
                        Tensor::cat(&[&map, &column.contiguous()?], 2)?
                    }
                    None => map,
                };
                let map = map.flatten(1, 2)?.t()?;
                Tensor::cat(&[&overview, &map], 0)
            }
            _ => features.flatten(0, 1),
        }
    }

    /// The prompt's input embeddings, `(1, positions, hidden_size)`: token embeddings with each
    /// placeholder (`image_token_id`) replaced by the next image's features.
    pub fn embed_prompt(&self, tokens: &[u32], images: &[Tensor]) -> Result<Tensor> {
        let embed =
            |ids: &[u32]| -> Result<Tensor> { self.llama.embed(&Tensor::new(ids, &self.device)?) };
        let mut pieces = Vec::with_capacity(2 * images.len() + 1);
        let mut start = 0;
        let mut next = images.iter();
        for (i, &t) in tokens.iter().enumerate() {
            if t != self.config.image_token_id {
                continue;
            }
            if start < i {
                pieces.push(embed(&tokens[start..i])?);
            }
            let features = next.next().ok_or_else(|| {
                candle_core::Error::Msg("more image placeholders than images".into())
            })?;
            pieces.push(features.to_dtype(self.dtype)?);
            start = i + 1;
        }
        if next.next().is_some() {
            candle_core::bail!("more images than image placeholders");
        }
        if start < tokens.len() {
            pieces.push(embed(&tokens[start..])?);
        }
        Tensor::cat(&pieces, 0)?.unsqueeze(0)
    }

    /// Runs `embeds` (`(1, n, hidden)`) from position `pos`; returns the last position's logits.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        pos: usize,
        cache: &mut llama::Cache,
    ) -> Result<Tensor> {
        self.llama.forward_input_embed(embeds, pos, cache)
    }

    /// Runs token ids (`(1, n)`) from position `pos`; returns the last position's logits.
    pub fn forward_tokens(
        &self,
        input: &Tensor,
        pos: usize,
        cache: &mut llama::Cache,
    ) -> Result<Tensor> {
        self.llama.forward(input, pos, cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tiny_config(version: &str) -> serde_json::Value {
        serde_json::json!({
            "model_type": version,
            "image_token_index": 9,
            "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56]],
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "text_config": {
                "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "vocab_size": 12, "max_position_embeddings": 128, "rms_norm_eps": 1e-5
            },
            "vision_config": {
                "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                "num_attention_heads": 2, "image_size": 28, "patch_size": 14
            }
        })
    }

    #[test]
    fn reads_llava_hf_configs_with_transformers_defaults() {
        // llava-v1.6-vicuna-7b-hf leaves most of text_config to the llama defaults.
        let v = serde_json::json!({
            "model_type": "llava_next",
            "image_token_index": 32000,
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            "projector_hidden_act": "gelu",
            "text_config": {"model_type": "llama", "max_position_embeddings": 4096,
                            "pad_token_id": 0, "rms_norm_eps": 1e-05, "vocab_size": 32064},
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                              "model_type": "clip_vision_model", "num_attention_heads": 16,
                              "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "vocab_size": 32064
        });
        let c = LlavaConfig::from_json(&v).unwrap();
        assert_eq!(c.version, LlavaVersion::Next);
        assert_eq!(c.llama.hidden_size, 4096);
        assert_eq!(c.llama.num_hidden_layers, 32);
        assert_eq!(c.llama.vocab_size, 32064);
        assert_eq!(c.patches_per_side(), 24);
        // transformers' hidden_states[-2] is the 23rd layer's output: candle's index 22.
        assert_eq!(c.hidden_state_index().unwrap(), 22);
        let mut bad = v.clone();
        bad["text_config"]["model_type"] = "qwen2".into();
        assert!(LlavaConfig::from_json(&bad).unwrap_err().contains("qwen2"));
        let mut bad = v.clone();
        bad["vision_feature_layer"] = serde_json::json!(-30);
        assert!(LlavaConfig::from_json(&bad).is_err());
        assert!(LlavaConfig::from_json(&serde_json::json!({"model_type": "llama"})).is_err());
    }

    #[test]
    fn unpadding_keeps_the_image_area() {
        // Square image on a square map: nothing to remove.
        assert_eq!(unpadded_range((64, 64), (4, 4)), (0, 4, 0, 4));
        // A wide image on a square map: padding rows above and below are dropped.
        assert_eq!(unpadded_range((300, 900), (48, 48)), (16, 32, 0, 48));
        // A tall image: padding columns dropped.
        assert_eq!(unpadded_range((900, 300), (48, 48)), (0, 48, 16, 32));
    }

    /// The packed features of a random-weight LLaVA-NeXT have exactly the positions counted
    /// without running it, and the prompt embedding splices them in at the placeholder.
    #[test]
    fn next_features_match_the_position_count_and_fill_the_placeholder() {
        let cfg = LlavaConfig::from_json(&tiny_config("llava_next")).unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        // Creates every weight the loader asks for, with random values.
        vb.get(16, "image_newline").unwrap();
        let model = Llava::load(cfg, vb).unwrap();
        assert!(model.image_newline.is_some());
        let processor = crate::vision::ImageProcessor::new(
            crate::vision::ImageProcessorConfig {
                size: crate::vision::ResizeTo::ShortestEdge(28),
                crop_hw_px: (28, 28),
                ..Default::default()
            },
            crate::vision::Tiling::AnyRes {
                pinpoints_hw_px: model.config.pinpoints_hw_px.clone(),
            },
        )
        .unwrap();
        // 40x100 (h x w): the 28x56 grid, a 1x2 tile grid; rows of padding are cropped away.
        let img = image::RgbImage::from_pixel(100, 40, image::Rgb([120, 30, 200]));
        let prepared = processor.prepare(&img, &Device::Cpu).unwrap();
        assert_eq!(prepared.grid_rows_cols, Some((1, 2)));
        let features = model.image_features(&prepared).unwrap();
        let positions = model.image_positions(&prepared);
        // Overview: 2x2 patches. Tiles: a 2x4 map; the image is 1.6 map rows tall, which
        // leaves (2 - 1) / 2 = 0 padding rows to crop, so 2 rows of 4 columns + a newline each.
        assert_eq!(positions, 4 + 2 * (4 + 1));
        assert_eq!(features.dims(), &[positions, 16]);

        let tokens = [1u32, 2, 9, 3];
        let embeds = model
            .embed_prompt(&tokens, std::slice::from_ref(&features))
            .unwrap();
        assert_eq!(embeds.dims(), &[1, 3 + positions, 16]);
        let spliced: Vec<f32> = embeds.i((0, 2)).unwrap().to_vec1().unwrap();
        let first: Vec<f32> = features.i(0).unwrap().to_vec1().unwrap();
        assert_eq!(spliced, first);
        assert!(model.embed_prompt(&tokens, &[]).is_err());
        let mut cache = model.new_cache(&Device::Cpu).unwrap();
        let logits = model.forward_embeds(&embeds, 0, &mut cache).unwrap();
        assert_eq!(logits.dims(), &[1, 12]);
    }

    #[test]
    fn v1_5_features_are_one_view_of_patches() {
        let cfg = LlavaConfig::from_json(&tiny_config("llava")).unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = Llava::load(cfg, vb).unwrap();
        assert!(model.image_newline.is_none());
        let processor = crate::vision::ImageProcessor::new(
            crate::vision::ImageProcessorConfig {
                size: crate::vision::ResizeTo::ShortestEdge(28),
                crop_hw_px: (28, 28),
                ..Default::default()
            },
            crate::vision::Tiling::Single,
        )
        .unwrap();
        let img = image::RgbImage::from_pixel(50, 30, image::Rgb([1, 2, 3]));
        let prepared = processor.prepare(&img, &Device::Cpu).unwrap();
        let features = model.image_features(&prepared).unwrap();
        assert_eq!(features.dims(), &[4, 16]);
        assert_eq!(model.image_positions(&prepared), 4);
    }
}
