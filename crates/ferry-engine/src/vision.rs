//! Image preprocessing for vision-language models.
//!
//! A request's image arrives as encoded bytes. [`decode`] turns PNG or JPEG bytes into RGB
//! pixels (size-limited, transparency composited on white as transformers' `convert_to_rgb`
//! does), and an [`ImageProcessor`] built from the checkpoint's `preprocessor_config.json`
//! prepares them the way the model was trained: resize and centre-crop (transformers' CLIP image
//! processor, LLaVA-1.5), or LLaVA-NeXT's "anyres" tiling — a downscaled view of the whole image
//! plus tiles of the image resized to the best of the model's grid resolutions. Every view is
//! rescaled to [0, 1] and normalised with the model's per-channel mean and standard deviation,
//! giving the `(views, 3, height, width)` pixel tensor the vision tower reads.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{Rgb, RgbImage};

/// Widest or tallest image accepted, in pixels (each side).
pub const MAX_IMAGE_SIDE_PX: u32 = 8192;

/// Most bytes the decoder may allocate for one image.
const MAX_DECODE_BYTES: u64 = 256 * 1024 * 1024;

/// The mean of OpenAI CLIP's training images per RGB channel (transformers' `OPENAI_CLIP_MEAN`),
/// the default when a preprocessor config names none.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// The standard deviation matching [`CLIP_MEAN`] (transformers' `OPENAI_CLIP_STD`).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Why an image could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// The bytes are not an image this build decodes.
    #[error("not a decodable PNG or JPEG image: {0}")]
    Decode(String),
    /// The image is larger than [`MAX_IMAGE_SIDE_PX`] on a side.
    #[error(
        "the image is {width_px}x{height_px} pixels; at most {max_px} pixels per side are accepted"
    )]
    TooLarge {
        width_px: u32,
        height_px: u32,
        max_px: u32,
    },
    /// The image has a zero width or height.
    #[error("the image has no pixels")]
    Empty,
    /// `preprocessor_config.json` asks for something this processor cannot do.
    #[error("{0}")]
    Config(String),
    /// Building the pixel tensor failed.
    #[error("building the pixel tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Decodes PNG or JPEG bytes (the format is read from the bytes, not from a declared MIME type)
/// into 8-bit RGB. Transparent pixels are composited over white.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, VisionError> {
    let mut reader = image::io::Reader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| VisionError::Decode(e.to_string()))?;
    if reader.format().is_none() {
        return Err(VisionError::Decode(
            "the bytes are not in a known image format".to_string(),
        ));
    }
    // The header alone gives the size: refuse huge images before allocating their pixels.
    let (width_px, height_px) = image::io::Reader::new(Cursor::new(bytes))
        .with_guessed_format()
        .and_then(|r| r.into_dimensions().map_err(std::io::Error::other))
        .map_err(|e| VisionError::Decode(e.to_string()))?;
    if width_px > MAX_IMAGE_SIDE_PX || height_px > MAX_IMAGE_SIDE_PX {
        return Err(VisionError::TooLarge {
            width_px,
            height_px,
            max_px: MAX_IMAGE_SIDE_PX,
        });
    }
    let mut limits = image::io::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| VisionError::Decode(e.to_string()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(VisionError::Empty);
    }
    if !img.color().has_alpha() {
        return Ok(img.to_rgb8());
    }
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(src[3]);
        let over_white = |c: u8| ((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8;
        *dst = Rgb([over_white(src[0]), over_white(src[1]), over_white(src[2])]);
    }
    Ok(out)
}

/// How a view is resized before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// The shorter side becomes this many pixels, keeping the aspect ratio.
    ShortestEdge(u32),
    /// Exactly this size.
    Exact { height_px: u32, width_px: u32 },
}

/// The settings of a transformers image processor (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub size: ResizeTo,
    /// Resampling filter (PIL's numbering in the file: 2 bilinear, 3 bicubic, 1 Lanczos).
    pub resample: FilterType,
    pub do_center_crop: bool,
    /// Crop size (height, width) in pixels.
    pub crop_hw_px: (u32, u32),
    pub do_rescale: bool,
    /// Multiplies 8-bit values (1/255 maps them to [0, 1]).
    pub rescale_factor: f32,
    pub do_normalize: bool,
    /// Per-channel mean subtracted after rescaling (RGB).
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean (RGB).
    pub image_std: [f32; 3],
}

impl Default for ImageProcessorConfig {
    /// transformers' `CLIPImageProcessor` defaults (224-pixel crops, bicubic, OpenAI CLIP
    /// statistics).
    fn default() -> Self {
        ImageProcessorConfig {
            do_resize: true,
            size: ResizeTo::ShortestEdge(224),
            resample: FilterType::CatmullRom,
            do_center_crop: true,
            crop_hw_px: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }
}

fn json_size(v: &serde_json::Value, what: &str) -> Result<(u32, u32), VisionError> {
    let side = |x: &serde_json::Value| x.as_u64().filter(|&n| n > 0 && n <= 65_536);
    if let Some(n) = side(v) {
        return Ok((n as u32, n as u32));
    }
    match (
        v.get("height").and_then(side),
        v.get("width").and_then(side),
    ) {
        (Some(h), Some(w)) => Ok((h as u32, w as u32)),
        _ => Err(VisionError::Config(format!(
            "`{what}` must be a positive number or {{\"height\", \"width\"}}, got {v}"
        ))),
    }
}

fn json_triple(v: &serde_json::Value, what: &str) -> Result<[f32; 3], VisionError> {
    let bad = || VisionError::Config(format!("`{what}` must be a number or three numbers"));
    if let Some(x) = v.as_f64() {
        return Ok([x as f32; 3]);
    }
    let list = v.as_array().ok_or_else(bad)?;
    match list.as_slice() {
        [r, g, b] => Ok([
            r.as_f64().ok_or_else(bad)? as f32,
            g.as_f64().ok_or_else(bad)? as f32,
            b.as_f64().ok_or_else(bad)? as f32,
        ]),
        _ => Err(bad()),
    }
}

impl ImageProcessorConfig {
    /// Reads the settings of a parsed `preprocessor_config.json`; absent keys keep
    /// [`ImageProcessorConfig::default`]'s values.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, VisionError> {
        let mut c = ImageProcessorConfig::default();
        let flag =
            |key: &str, default: bool| v.get(key).and_then(|x| x.as_bool()).unwrap_or(default);
        c.do_resize = flag("do_resize", c.do_resize);
        c.do_center_crop = flag("do_center_crop", c.do_center_crop);
        c.do_rescale = flag("do_rescale", c.do_rescale);
        c.do_normalize = flag("do_normalize", c.do_normalize);
        if let Some(size) = v.get("size") {
            c.size = match size.get("shortest_edge").and_then(|x| x.as_u64()) {
                Some(s) if s > 0 && s <= 65_536 => ResizeTo::ShortestEdge(s as u32),
                Some(s) => {
                    return Err(VisionError::Config(format!(
                        "`size.shortest_edge` of {s} pixels is out of range"
                    )))
                }
                None => {
                    let (h, w) = json_size(size, "size")?;
                    ResizeTo::Exact {
                        height_px: h,
                        width_px: w,
                    }
                }
            };
        }
        if let Some(crop) = v.get("crop_size") {
            c.crop_hw_px = json_size(crop, "crop_size")?;
        } else if !c.do_center_crop {
            // Processors without a crop (SigLIP-style) produce the resize target itself.
            if let ResizeTo::Exact {
                height_px,
                width_px,
            } = c.size
            {
                c.crop_hw_px = (height_px, width_px);
            }
        }
        if let Some(r) = v.get("resample") {
            c.resample = match r.as_u64() {
                Some(0) => FilterType::Nearest,
                Some(1) => FilterType::Lanczos3,
                Some(2) => FilterType::Triangle,
                Some(3) => FilterType::CatmullRom,
                other => {
                    return Err(VisionError::Config(format!(
                    "`resample` {} is not supported (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic)",
                    other
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| r.to_string())
                )))
                }
            };
        }
        if let Some(f) = v.get("rescale_factor") {
            c.rescale_factor = f.as_f64().ok_or_else(|| {
                VisionError::Config("`rescale_factor` must be a number".to_string())
            })? as f32;
        }
        if let Some(m) = v.get("image_mean") {
            c.image_mean = json_triple(m, "image_mean")?;
        }
        if let Some(s) = v.get("image_std") {
            c.image_std = json_triple(s, "image_std")?;
        }
        if c.image_std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(VisionError::Config(
                "`image_std` must be positive numbers".to_string(),
            ));
        }
        Ok(c)
    }
}

/// How an image is split into views for the vision tower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tiling {
    /// One view: resize, then centre-crop (CLIP, LLaVA-1.5).
    Single,
    /// LLaVA-NeXT "anyres": a view of the whole image resized to the crop size, then the tiles
    /// of the image resized and padded to the best of these (height, width) resolutions.
    AnyRes { pinpoints_hw_px: Vec<(u32, u32)> },
}

/// An image ready for a vision tower.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// Normalised pixels, `(views, 3, height, width)`, f32.
    pub pixel_values: Tensor,
    /// Size of the decoded image, (height, width) in pixels.
    pub original_hw_px: (u32, u32),
    /// Tile grid (rows, columns) after the first view, with [`Tiling::AnyRes`].
    pub grid_rows_cols: Option<(u32, u32)>,
}

/// Prepares decoded images for one model.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub config: ImageProcessorConfig,
    pub tiling: Tiling,
}

/// The (height, width) of `resolutions` that shows `original_hw` with the most detail and the
/// least padding (LLaVA-NeXT's `select_best_resolution`).
pub fn select_best_resolution(original_hw: (u32, u32), resolutions: &[(u32, u32)]) -> (u32, u32) {
    let (oh, ow) = (f64::from(original_hw.0), f64::from(original_hw.1));
    let mut best = resolutions.first().copied().unwrap_or(original_hw);
    let mut max_effective = 0u64;
    let mut min_wasted = u64::MAX;
    for &(h, w) in resolutions {
        let scale = (f64::from(w) / ow).min(f64::from(h) / oh);
        let (dw, dh) = ((ow * scale) as u64, (oh * scale) as u64);
        let effective = (dw * dh).min(u64::from(original_hw.0) * u64::from(original_hw.1));
        let wasted = (u64::from(h) * u64::from(w)).saturating_sub(effective);
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            best = (h, w);
            max_effective = effective;
            min_wasted = wasted;
        }
    }
    best
}

/// The size (height, width) an image of `original_hw` is resized to before it is padded to
/// `target_hw`: as large as fits, aspect ratio kept.
fn fit_within(original_hw: (u32, u32), target_hw: (u32, u32)) -> (u32, u32) {
    let (oh, ow) = (f64::from(original_hw.0), f64::from(original_hw.1));
    let (th, tw) = target_hw;
    let scale_w = f64::from(tw) / ow;
    let scale_h = f64::from(th) / oh;
    if scale_w < scale_h {
        (((oh * scale_w).ceil() as u32).clamp(1, th), tw)
    } else {
        (th, ((ow * scale_h).ceil() as u32).clamp(1, tw))
    }
}

/// The (height, width) a shortest-edge resize gives (transformers' rounding: the long side is
/// truncated).
fn shortest_edge_hw(hw: (u32, u32), edge: u32) -> (u32, u32) {
    let (h, w) = hw;
    if w <= h {
        let long = (u64::from(edge) * u64::from(h) / u64::from(w)) as u32;
        (long.max(1), edge)
    } else {
        let long = (u64::from(edge) * u64::from(w) / u64::from(h)) as u32;
        (edge, long.max(1))
    }
}

fn resize(img: &RgbImage, hw: (u32, u32), filter: FilterType) -> RgbImage {
    image::imageops::resize(img, hw.1, hw.0, filter)
}

/// Crops the centre `hw` of `img`, padding with black where the image is smaller.
fn center_crop(img: &RgbImage, hw: (u32, u32)) -> RgbImage {
    if (img.height(), img.width()) == hw {
        return img.clone();
    }
    let top = (i64::from(img.height()) - i64::from(hw.0)).div_euclid(2);
    let left = (i64::from(img.width()) - i64::from(hw.1)).div_euclid(2);
    let mut out = RgbImage::new(hw.1, hw.0);
    image::imageops::replace(&mut out, img, -left, -top);
    out
}

impl ImageProcessor {
    /// A processor with these settings and tiling; checks that tiles fit the crop size.
    pub fn new(config: ImageProcessorConfig, tiling: Tiling) -> Result<Self, VisionError> {
        if let Tiling::AnyRes { pinpoints_hw_px } = &tiling {
            let (ch, cw) = config.crop_hw_px;
            if ch != cw {
                return Err(VisionError::Config(format!(
                    "anyres tiling needs a square crop_size, got {ch}x{cw}"
                )));
            }
            if pinpoints_hw_px.is_empty() {
                return Err(VisionError::Config(
                    "anyres tiling needs at least one grid resolution".to_string(),
                ));
            }
            if let Some((h, w)) = pinpoints_hw_px
                .iter()
                .find(|(h, w)| *h == 0 || *w == 0 || h % ch != 0 || w % ch != 0)
            {
                return Err(VisionError::Config(format!(
                    "grid resolution {h}x{w} is not a multiple of the {ch}-pixel tile"
                )));
            }
        }
        Ok(ImageProcessor { config, tiling })
    }

    /// The (height, width) of every view.
    pub fn view_hw_px(&self) -> (u32, u32) {
        self.config.crop_hw_px
    }

    /// Resize (if configured), then centre-crop to the crop size. With cropping off, the view
    /// is still brought to the crop size so that every view has the tower's input size.
    fn single_view(&self, img: &RgbImage) -> RgbImage {
        let c = &self.config;
        let hw = (img.height(), img.width());
        let resized = if c.do_resize {
            let target = match c.size {
                ResizeTo::ShortestEdge(edge) => shortest_edge_hw(hw, edge),
                ResizeTo::Exact {
                    height_px,
                    width_px,
                } => (height_px, width_px),
            };
            if target == hw {
                img.clone()
            } else {
                resize(img, target, c.resample)
            }
        } else {
            img.clone()
        };
        if c.do_center_crop {
            center_crop(&resized, c.crop_hw_px)
        } else if (resized.height(), resized.width()) != c.crop_hw_px {
            resize(&resized, c.crop_hw_px, c.resample)
        } else {
            resized
        }
    }

    /// Appends a view's rescaled, normalised pixels in channel-major order.
    fn push_normalized(&self, view: &RgbImage, out: &mut Vec<f32>) {
        let c = &self.config;
        let plane = (view.width() * view.height()) as usize;
        let start = out.len();
        out.resize(start + 3 * plane, 0.0);
        for (i, px) in view.pixels().enumerate() {
            for ch in 0..3 {
                let mut v = f32::from(px[ch]);
                if c.do_rescale {
                    v *= c.rescale_factor;
                }
                if c.do_normalize {
                    v = (v - c.image_mean[ch]) / c.image_std[ch];
                }
                out[start + ch * plane + i] = v;
            }
        }
    }

    /// The views of `img` (before normalisation) and the tile grid, if tiled.
    pub fn views(&self, img: &RgbImage) -> (Vec<RgbImage>, Option<(u32, u32)>) {
        match &self.tiling {
            Tiling::Single => (vec![self.single_view(img)], None),
            Tiling::AnyRes { pinpoints_hw_px } => {
                let hw = (img.height(), img.width());
                let best = select_best_resolution(hw, pinpoints_hw_px);
                let fitted = fit_within(hw, best);
                let resized = resize(img, fitted, self.config.resample);
                let mut padded = RgbImage::new(best.1, best.0);
                image::imageops::replace(
                    &mut padded,
                    &resized,
                    i64::from((best.1 - fitted.1) / 2),
                    i64::from((best.0 - fitted.0) / 2),
                );
                let tile = self.config.crop_hw_px.0;
                let (rows, cols) = (best.0 / tile, best.1 / tile);
                // The overview: the whole image squashed to the resize target.
                let overview_hw = match self.config.size {
                    ResizeTo::ShortestEdge(edge) => (edge, edge),
                    ResizeTo::Exact {
                        height_px,
                        width_px,
                    } => (height_px, width_px),
                };
                let mut views =
                    vec![self.single_view(&resize(img, overview_hw, self.config.resample))];
                for r in 0..rows {
                    for c in 0..cols {
                        let t = image::imageops::crop_imm(&padded, c * tile, r * tile, tile, tile)
                            .to_image();
                        views.push(self.single_view(&t));
                    }
                }
                (views, Some((rows, cols)))
            }
        }
    }

    /// Prepares a decoded image: its views as one normalised `(views, 3, h, w)` tensor.
    pub fn prepare(&self, img: &RgbImage, device: &Device) -> Result<PreparedImage, VisionError> {
        if img.width() == 0 || img.height() == 0 {
            return Err(VisionError::Empty);
        }
        let (views, grid) = self.views(img);
        let (h, w) = self.view_hw_px();
        let mut data = Vec::with_capacity(views.len() * 3 * (h * w) as usize);
        for v in &views {
            debug_assert_eq!((v.height(), v.width()), (h, w));
            self.push_normalized(v, &mut data);
        }
        let pixel_values =
            Tensor::from_vec(data, (views.len(), 3, h as usize, w as usize), device)?;
        Ok(PreparedImage {
            pixel_values,
            original_hw_px: (img.height(), img.width()),
            grid_rows_cols: grid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

    fn png(img: &RgbImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageOutputFormat::Png)
            .unwrap();
        out.into_inner()
    }

    /// A 6x4 (width x height) image whose pixel (x, y) is (10x, 20y, 200).
    fn gradient() -> RgbImage {
        RgbImage::from_fn(6, 4, |x, y| Rgb([10 * x as u8, 20 * y as u8, 200]))
    }

    #[test]
    fn decodes_png_and_refuses_garbage() {
        let img = gradient();
        let back = decode(&png(&img)).unwrap();
        assert_eq!(back, img);
        for bad in [&b"not an image at all"[..], &png(&img)[..40], &[][..]] {
            let err = decode(bad).unwrap_err();
            assert!(matches!(err, VisionError::Decode(_)), "{err}");
        }
    }

    /// CRC-32 (PNG's chunk checksum), bitwise: enough for a test that forges a header.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    /// `file` with its IHDR claiming `width` x `height` (checksum fixed, pixels unchanged).
    fn forged_size(mut file: Vec<u8>, width: u32, height: u32) -> Vec<u8> {
        // Signature (8), IHDR length (4), "IHDR" (4), width, height, 5 more bytes, CRC.
        file[16..20].copy_from_slice(&width.to_be_bytes());
        file[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&file[12..29]);
        file[29..33].copy_from_slice(&crc.to_be_bytes());
        file
    }

    #[test]
    fn a_png_that_claims_gigapixels_is_refused_before_its_pixels_are_allocated() {
        let small = png(&gradient());
        match decode(&forged_size(small.clone(), 100_000, 100_000)) {
            Err(VisionError::TooLarge { width_px, .. }) => assert_eq!(width_px, 100_000),
            other => panic!("{other:?}"),
        }
        // Within the side limit, 8192 x 8192 RGBA (268 MB) is over the 256 MB decode budget and
        // refused before allocation; a header that lies about a small image's size fails to
        // decode (its buffer, bounded by the budget, is freed).
        let real_rgba = {
            let img = image::RgbaImage::from_pixel(4, 4, image::Rgba([1, 2, 3, 4]));
            let mut out = Vec::new();
            image::DynamicImage::ImageRgba8(img)
                .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
                .unwrap();
            out
        };
        for forged in [
            forged_size(real_rgba, MAX_IMAGE_SIDE_PX, MAX_IMAGE_SIDE_PX),
            forged_size(small, 4000, 4000),
        ] {
            let err = decode(&forged).unwrap_err();
            assert!(matches!(err, VisionError::Decode(_)), "{err}");
        }
    }

    #[test]
    fn transparency_is_composited_on_white() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([0, 100, 200, 255]));
        let mut bytes = Cursor::new(Vec::new());
        rgba.write_to(&mut bytes, image::ImageOutputFormat::Png)
            .unwrap();
        let rgb = decode(bytes.get_ref()).unwrap();
        assert_eq!(rgb.get_pixel(0, 0), &Rgb([255, 255, 255]));
        assert_eq!(rgb.get_pixel(1, 0), &Rgb([0, 100, 200]));
    }

    #[test]
    fn reads_a_llava_next_preprocessor_config() {
        let v = serde_json::json!({
            "crop_size": {"height": 336, "width": 336},
            "do_center_crop": true,
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": 336}
        });
        let c = ImageProcessorConfig::from_json(&v).unwrap();
        assert_eq!(c.size, ResizeTo::ShortestEdge(336));
        assert_eq!(c.crop_hw_px, (336, 336));
        assert_eq!(c.resample, FilterType::CatmullRom);
        assert_eq!(c.image_mean, CLIP_MEAN);
        let bad = serde_json::json!({"image_std": [0.5, 0.0, 0.5]});
        assert!(ImageProcessorConfig::from_json(&bad).is_err());
        let bad = serde_json::json!({"resample": 7});
        assert!(ImageProcessorConfig::from_json(&bad).is_err());
    }

    #[test]
    fn single_view_normalises_each_pixel_by_hand() {
        // No resize, crop to the middle 4x4: columns 1..5 of the 6x4 gradient.
        let config = ImageProcessorConfig {
            do_resize: false,
            crop_hw_px: (4, 4),
            ..Default::default()
        };
        let p = ImageProcessor::new(config, Tiling::Single).unwrap();
        let out = p.prepare(&gradient(), &Device::Cpu).unwrap();
        assert_eq!(out.pixel_values.dims(), &[1, 3, 4, 4]);
        assert_eq!(out.original_hw_px, (4, 6));
        assert_eq!(out.grid_rows_cols, None);
        // Output (row 2, column 0) is source pixel (x 1, y 2) = (10, 40, 200).
        let px: Vec<f32> = out
            .pixel_values
            .i((0, .., 2, 0))
            .unwrap()
            .to_vec1()
            .unwrap();
        let expect = [
            (10.0 / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0],
            (40.0 / 255.0 - CLIP_MEAN[1]) / CLIP_STD[1],
            (200.0 / 255.0 - CLIP_MEAN[2]) / CLIP_STD[2],
        ];
        for (got, want) in px.iter().zip(expect) {
            assert!((got - want).abs() < 1e-6, "{px:?} vs {expect:?}");
        }
    }

    #[test]
    fn shortest_edge_resize_and_centre_crop_give_the_crop_size() {
        let p = ImageProcessor::new(
            ImageProcessorConfig {
                size: ResizeTo::ShortestEdge(8),
                crop_hw_px: (8, 8),
                ..Default::default()
            },
            Tiling::Single,
        )
        .unwrap();
        assert_eq!(shortest_edge_hw((4, 6), 8), (8, 12));
        assert_eq!(shortest_edge_hw((30, 20), 8), (12, 8));
        let out = p.prepare(&gradient(), &Device::Cpu).unwrap();
        assert_eq!(out.pixel_values.dims(), &[1, 3, 8, 8]);
        // Centre crop of a smaller image pads with black (normalised zero is -mean/std).
        let small = center_crop(&RgbImage::from_pixel(2, 2, Rgb([9, 9, 9])), (4, 4));
        assert_eq!(small.get_pixel(0, 0), &Rgb([0, 0, 0]));
        assert_eq!(small.get_pixel(1, 1), &Rgb([9, 9, 9]));
        assert_eq!(small.get_pixel(2, 2), &Rgb([9, 9, 9]));
        assert_eq!(small.get_pixel(3, 3), &Rgb([0, 0, 0]));
    }

    #[test]
    fn best_resolution_matches_llava_next() {
        let grid = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];
        // A small image fits every grid without loss: the least padding wins (first of a tie).
        assert_eq!(select_best_resolution((64, 64), &grid), (336, 672));
        // A large square image wants the square grid.
        assert_eq!(select_best_resolution((800, 800), &grid), (672, 672));
        // A wide image: the wide grids.
        assert_eq!(select_best_resolution((300, 900), &grid), (336, 1008));
        assert_eq!(fit_within((300, 900), (336, 1008)), (336, 1008));
        assert_eq!(fit_within((300, 1000), (336, 1008)), (303, 1008));
    }

    #[test]
    fn anyres_gives_an_overview_and_row_major_tiles() {
        let config = ImageProcessorConfig {
            size: ResizeTo::ShortestEdge(4),
            crop_hw_px: (4, 4),
            resample: FilterType::Nearest,
            do_normalize: false,
            do_rescale: false,
            ..Default::default()
        };
        let p = ImageProcessor::new(
            config,
            Tiling::AnyRes {
                pinpoints_hw_px: vec![(4, 8), (8, 4), (8, 8)],
            },
        )
        .unwrap();
        // 4x8 (h x w) with the left half 50 and the right half 150.
        let img = RgbImage::from_fn(
            8,
            4,
            |x, _| {
                if x < 4 {
                    Rgb([50; 3])
                } else {
                    Rgb([150; 3])
                }
            },
        );
        let out = p.prepare(&img, &Device::Cpu).unwrap();
        assert_eq!(out.grid_rows_cols, Some((1, 2)));
        assert_eq!(out.pixel_values.dims(), &[3, 3, 4, 4]);
        let mean = |v: usize| -> f32 {
            out.pixel_values
                .i(v)
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert_eq!(mean(1), 50.0, "left tile first");
        assert_eq!(mean(2), 150.0, "then the right tile");
        assert!((mean(0) - 100.0).abs() < 1.0, "overview is the whole image");
        assert!(ImageProcessor::new(
            ImageProcessorConfig::default(),
            Tiling::AnyRes {
                pinpoints_hw_px: vec![(300, 336)]
            }
        )
        .is_err());
    }
}
