//! Chats with images, for vision-language models.
//!
//! [`LoadedModel::encode_multimodal`] decodes and preprocesses every image of a conversation
//! (a bad one is an `InvalidArgument` naming its field, `messages[i].parts[j].image`), renders
//! the chat template with each message's content as typed parts so that the template writes one
//! image placeholder token per image where the model's prompt format wants it, and tokenises.
//! [`LoadedModel::generate_multimodal`] runs the vision tower, splices each image's features in
//! at its placeholder, and streams the completion through the same generation loop and
//! [`GenerationEvent`] sink as text prompts.

use candle_core::Tensor;
use tokenizers::Tokenizer;

use super::LoadedModel;
use super::{json_template, read_json, GenerateOptions, GenerationEvent, GenerationOutcome};
use crate::model::{Backbone, Session};
use crate::source::ModelLocation;
use crate::vision::{
    self, ImageProcessor, ImageProcessorConfig, PreparedImage, Tiling, VisionError,
};
use crate::{candle_err, tokenizer};
use ferry_core::{ChatMessage, Error, Part, Result, SamplingParams};

/// What a vision-language model needs besides its weights: its image preprocessing and its
/// image placeholder token.
pub(super) struct VisionSupport {
    processor: ImageProcessor,
    /// The placeholder's text, as the chat template writes it (`<image>`).
    image_token: String,
    image_token_id: u32,
}

impl VisionSupport {
    /// The vision support of `backbone`, or `None` for a text-only model. Reads
    /// `preprocessor_config.json` and checks it against the vision tower.
    pub(super) fn load(
        backbone: &Backbone,
        loc: &ModelLocation,
        tokenizer: &Tokenizer,
    ) -> Result<Option<Self>> {
        let Some(model) = backbone.vision() else {
            return Ok(None);
        };
        let path = loc.file("preprocessor_config.json")?;
        let json = read_json(&path, "image preprocessor config")?;
        let bad = |reason: String| Error::InvalidFile {
            what: "image preprocessor config",
            path: path.clone(),
            reason,
        };
        let config = ImageProcessorConfig::from_json(&json).map_err(|e| bad(e.to_string()))?;
        let side = model.config.vision.image_size as u32;
        if config.crop_hw_px != (side, side) {
            return Err(bad(format!(
                "crop size {}x{} differs from the vision tower's {side}x{side} input",
                config.crop_hw_px.0, config.crop_hw_px.1
            )));
        }
        let tiling = match model.config.version {
            crate::model::llava::LlavaVersion::V1_5 => Tiling::Single,
            crate::model::llava::LlavaVersion::Next => Tiling::AnyRes {
                pinpoints_hw_px: model.config.pinpoints_hw_px.clone(),
            },
        };
        let processor = ImageProcessor::new(config, tiling).map_err(|e| bad(e.to_string()))?;
        let id = model.config.image_token_id;
        let image_token = tokenizer
            .id_to_token(id)
            .ok_or_else(|| Error::InvalidFile {
                what: "tokenizer",
                path: loc.dir.join("tokenizer.json"),
                reason: format!(
                    "has no token with the image placeholder id {id} (image_token_index)"
                ),
            })?;
        Ok(Some(VisionSupport {
            processor,
            image_token,
            image_token_id: id,
        }))
    }
}

/// The chat template a checkpoint's processor ships (`chat_template.jinja` or
/// `chat_template.json`), which transformers prefers for multimodal chats.
pub(super) fn processor_template(loc: &ModelLocation) -> Result<Option<String>> {
    if let Some(p) = loc.optional_file("chat_template.jinja")? {
        let text = std::fs::read_to_string(&p)
            .map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
        return Ok(Some(text));
    }
    match loc.optional_file("chat_template.json")? {
        Some(p) => Ok(json_template(
            read_json(&p, "chat template")?.get("chat_template"),
        )),
        None => Ok(None),
    }
}

/// The field of the first image of `messages`, if any.
fn first_image_field(messages: &[ChatMessage]) -> Option<String> {
    messages.iter().enumerate().find_map(|(i, m)| {
        m.parts
            .iter()
            .position(|p| matches!(p, Part::Image(_)))
            .map(|j| format!("messages[{i}].parts[{j}].image"))
    })
}

/// A conversation ready for a vision-language model: token ids with one placeholder per image,
/// and the images preprocessed for the vision tower.
#[derive(Debug, Clone)]
pub struct MultimodalPrompt {
    /// Token ids of the rendered chat; each image is one placeholder id here.
    pub tokens: Vec<u32>,
    images: Vec<PreparedImage>,
    image_positions: Vec<usize>,
}

impl MultimodalPrompt {
    /// Context positions the prompt fills: its text tokens, and each image's features in place
    /// of its placeholder. This is the prompt's token count in usage figures.
    pub fn positions(&self) -> usize {
        self.tokens.len() - self.images.len() + self.image_positions.iter().sum::<usize>()
    }

    /// Images in the prompt.
    pub fn image_count(&self) -> usize {
        self.images.len()
    }

    /// Context positions taken by image features, over all images.
    pub fn image_positions(&self) -> usize {
        self.image_positions.iter().sum()
    }
}

impl LoadedModel {
    /// True when the model reads images (a vision-language model).
    pub fn accepts_images(&self) -> bool {
        self.vision.is_some()
    }

    fn render_with_parts(
        &self,
        messages: &[ChatMessage],
        vision: &VisionSupport,
    ) -> Result<Vec<u32>> {
        let text = self
            .template
            .render_multimodal(messages, &vision.image_token)?;
        // Templates that write the BOS token themselves must not get a second one.
        let add_special = self.bos_token.is_empty() || !text.starts_with(&self.bos_token);
        tokenizer::encode_prompt(&self.tokenizer, &text, add_special)
    }

    /// [`LoadedModel::encode_chat`] of a vision-language model: the template sees content as
    /// parts, and images are refused (they need [`LoadedModel::encode_multimodal`]).
    pub(super) fn encode_multimodal_text(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let vision = self
            .vision
            .as_ref()
            .ok_or_else(|| Error::Engine("not a vision-language model".to_string()))?;
        if let Some(field) = first_image_field(messages) {
            return Err(Error::invalid(
                field,
                "this path takes text only; images go through encode_multimodal",
            ));
        }
        let tokens = self.render_with_parts(messages, vision)?;
        if tokens.contains(&vision.image_token_id) {
            return Err(Error::invalid(
                "messages",
                format!(
                    "the text contains the image placeholder `{}`",
                    vision.image_token
                ),
            ));
        }
        Ok(tokens)
    }

    /// Renders and tokenises a conversation that may carry images, and decodes and
    /// preprocesses its images. A text-only model gets [`LoadedModel::encode_chat`]'s tokens
    /// and refuses images; an image that does not decode is an `InvalidArgument` naming its
    /// field (`messages[i].parts[j].image`).
    pub fn encode_multimodal(&self, messages: &[ChatMessage]) -> Result<MultimodalPrompt> {
        let Some(vision) = &self.vision else {
            if let Some(field) = first_image_field(messages) {
                return Err(Error::invalid(
                    field,
                    format!("model `{}` does not accept images", self.info.id),
                ));
            }
            return Ok(MultimodalPrompt {
                tokens: self.encode_chat(messages)?,
                images: Vec::new(),
                image_positions: Vec::new(),
            });
        };
        let llava = self
            .backbone
            .vision()
            .ok_or_else(|| Error::Engine("vision support without a vision model".to_string()))?;
        let mut images = Vec::new();
        let mut image_positions = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            for (j, part) in m.parts.iter().enumerate() {
                let Part::Image(img) = part else { continue };
                let field = format!("messages[{i}].parts[{j}].image");
                let rgb = vision::decode(&img.data)
                    .map_err(|e| Error::invalid(field.clone(), e.to_string()))?;
                let prepared =
                    vision
                        .processor
                        .prepare(&rgb, &self.device)
                        .map_err(|e| match e {
                            VisionError::Tensor(e) => candle_err(e),
                            other => Error::invalid(field.clone(), other.to_string()),
                        })?;
                image_positions.push(llava.image_positions(&prepared));
                images.push(prepared);
            }
        }
        let tokens = self.render_with_parts(messages, vision)?;
        let placeholders = tokens
            .iter()
            .filter(|&&t| t == vision.image_token_id)
            .count();
        if placeholders != images.len() {
            return Err(Error::invalid(
                "messages",
                format!(
                    "the chat template of model `{}` placed {placeholders} image placeholders for {} images \
                     (images belong in user messages, and the text must not contain `{}`)",
                    self.info.id,
                    images.len(),
                    vision.image_token
                ),
            ));
        }
        Ok(MultimodalPrompt {
            tokens,
            images,
            image_positions,
        })
    }

    /// Generates a completion for a prompt from [`LoadedModel::encode_multimodal`]: the
    /// images' features (computed now, counted in `prefill_ms`) fill their placeholders, and
    /// text streams to `sink` as with [`LoadedModel::generate`]. `prompt_tokens` of the outcome
    /// is [`MultimodalPrompt::positions`].
    pub fn generate_multimodal(
        &self,
        prompt: &MultimodalPrompt,
        params: &SamplingParams,
        options: GenerateOptions,
        sink: &mut dyn GenerationEvent,
    ) -> Result<GenerationOutcome> {
        if prompt.images.is_empty() {
            return self.generate(&prompt.tokens, params, options, sink);
        }
        let llava = self.backbone.vision().ok_or_else(|| {
            Error::invalid(
                "messages",
                format!("model `{}` does not accept images", self.info.id),
            )
        })?;
        let mut prefill = |session: &mut Session| -> Result<Tensor> {
            let features = prompt
                .images
                .iter()
                .map(|img| llava.image_features(img).map_err(candle_err))
                .collect::<Result<Vec<_>>>()?;
            let embeds = llava
                .embed_prompt(&prompt.tokens, &features)
                .map_err(candle_err)?;
            session.forward_embeds(&embeds)
        };
        self.run_generation(prompt.positions(), &mut prefill, params, options, sink)
    }
}
