//! Turning a sample's encoded members into an RGB image, an RGB control map and a caption.
//!
//! Which member feeds which field is configurable by extension. A sample that lacks a field, whose image does not
//! decode, or whose caption is not UTF-8 is *bad*: the reason is returned as text and the loader skips it.

use std::io::Cursor;

use super::complete;
use image::{ColorType, ImageDecoder, ImageFormat, RgbImage};
use serde::{Deserialize, Serialize};

use super::group::RawSample;
use super::pool;

/// Which member extensions feed which field; the first extension present in a sample wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fields {
    /// The target image (ControlNet's `jpg`).
    pub image: Vec<String>,
    /// The control map (ControlNet's `hint`).
    pub control: Vec<String>,
    /// The caption (ControlNet's `txt`). When no caption member is present, a `json` member's `caption`,
    /// `prompt` or `text` string is used instead.
    pub caption: Vec<String>,
}

impl Default for Fields {
    fn default() -> Self {
        Fields {
            image: vec!["jpg".into(), "jpeg".into(), "webp".into()],
            control: vec!["png".into()],
            caption: vec!["txt".into()],
        }
    }
}

/// JSON fields a caption may be taken from when there is no text member.
const JSON_CAPTION_KEYS: [&str; 3] = ["caption", "prompt", "text"];

impl Fields {
    /// Whether a member with this extension must be read (the others are skipped over).
    pub fn wants(&self, ext: &str) -> bool {
        ext == "json" || self.image.iter().chain(&self.control).chain(&self.caption).any(|e| e == ext)
    }
}

/// A sample with its images decoded, not yet resized.
#[derive(Debug, Clone)]
pub struct DecodedSample {
    pub key: String,
    pub image: RgbImage,
    pub control: RgbImage,
    pub caption: String,
}

/// Decodes one sample; `Err` holds the reason it is bad (without the shard's name, which the caller adds).
pub fn decode_sample(raw: &RawSample, fields: &Fields) -> Result<DecodedSample, String> {
    if let Some(problem) = &raw.problem {
        return Err(problem.clone());
    }
    let (image_ext, image_bytes) = find(raw, &fields.image, "image")?;
    let (control_ext, control_bytes) = find(raw, &fields.control, "control map")?;
    let caption = caption(raw, fields)?;
    let image = decode_rgb(image_bytes).map_err(|e| format!("image '{}.{image_ext}' does not decode: {e}", raw.key))?;
    let control = match decode_rgb(control_bytes) {
        Ok(control) => control,
        Err(e) => {
            recycle_image(image);
            return Err(format!("control map '{}.{control_ext}' does not decode: {e}", raw.key));
        }
    };
    if let Err(e) = check_alignment(&image, &control) {
        recycle_image(image);
        recycle_image(control);
        return Err(e);
    }
    Ok(DecodedSample { key: raw.key.clone(), image, control, caption })
}

/// A control map with another aspect ratio than its image would be cropped differently and no longer line up.
/// (A different resolution with the same shape is fine: both are resized to the output size.)
fn check_alignment(image: &RgbImage, control: &RgbImage) -> Result<(), String> {
    let (iw, ih) = (image.width() as f64, image.height() as f64);
    let (cw, ch) = (control.width() as f64, control.height() as f64);
    if ((iw * ch) / (ih * cw) - 1.0).abs() > 0.01 {
        return Err(format!("control map is {cw}x{ch} but the image is {iw}x{ih}: aspect ratios differ"));
    }
    Ok(())
}

fn find<'a>(raw: &'a RawSample, exts: &'a [String], what: &str) -> Result<(&'a str, &'a [u8]), String> {
    exts.iter().find_map(|ext| raw.member(ext).map(|data| (ext.as_str(), data))).ok_or_else(|| {
        format!("no {what} member (wanted .{}; sample has {})", exts.join(" or ."), describe_exts(&raw.all_exts()))
    })
}

fn describe_exts(exts: &[&str]) -> String {
    if exts.is_empty() {
        "no members".into()
    } else {
        exts.iter().map(|e| format!(".{e}")).collect::<Vec<_>>().join(", ")
    }
}

fn caption(raw: &RawSample, fields: &Fields) -> Result<String, String> {
    if let Some(ext) = fields.caption.iter().find(|ext| raw.member(ext).is_some()) {
        let bytes = raw.member(ext).unwrap_or_default();
        let text =
            std::str::from_utf8(bytes).map_err(|e| format!("caption '{}.{ext}' is not UTF-8 text: {e}", raw.key))?;
        return Ok(text.trim().to_string());
    }
    if let Some(bytes) = raw.member("json") {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("'{}.json' is not valid JSON: {e}", raw.key))?;
        if let Some(text) = JSON_CAPTION_KEYS.iter().find_map(|k| value.get(k).and_then(|v| v.as_str())) {
            return Ok(text.trim().to_string());
        }
    }
    Err(format!(
        "no caption member (wanted .{} or a .json with a {} string; sample has {})",
        fields.caption.join(" or ."),
        JSON_CAPTION_KEYS.join("/"),
        describe_exts(&raw.all_exts())
    ))
}

/// Largest decoded image accepted (the `image` crate's default allocation limit).
const MAX_DECODED_BYTES: usize = 512 << 20;

/// Decodes JPEG, PNG or WebP (recognised by content, not extension) to 8-bit RGB: grey is replicated, alpha is
/// dropped, 16-bit is scaled down. The pixels live in a pooled buffer: hand it back with [`recycle_image`].
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    let format = image::guess_format(bytes).map_err(|_| "unrecognised image format".to_string())?;
    if !matches!(format, ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) {
        return Err(format!("unsupported image format {format:?}"));
    }
    // A file cut short is refused as Pillow refuses it (webdataset's decoders, so NeMo's pipeline, skip it), where
    // the decoders here would fill the missing part with grey (JPEG) or refuse a complete image (PNG).
    match format {
        ImageFormat::Jpeg => complete::check_jpeg(bytes)?,
        ImageFormat::Png => {
            if let Some(fixed) = complete::png_with_end(bytes)? {
                return decode_known(&fixed, format).map_err(|e| {
                    format!("truncated PNG: the file ends at byte {} before its IEND chunk: {e}", bytes.len())
                });
            }
        }
        _ => {}
    }
    decode_known(bytes, format)
}

/// [`decode_rgb`] once the format is known and the file is complete.
fn decode_known(bytes: &[u8], format: ImageFormat) -> Result<RgbImage, String> {
    // The decoder API lets the pixels go straight into a reused buffer (see `pool`); the default size limits apply.
    let decoder =
        image::ImageReader::with_format(Cursor::new(bytes), format).into_decoder().map_err(|e| e.to_string())?;
    let (width, height) = decoder.dimensions();
    let color = decoder.color_type();
    let channels = match color {
        ColorType::Rgb8 => 3,
        ColorType::L8 => 1,
        ColorType::La8 => 2,
        ColorType::Rgba8 => 4,
        // Rare in datasets (16-bit PNG, float): take the general path.
        _ => {
            return image::load_from_memory_with_format(bytes, format).map(|i| i.into_rgb8()).map_err(|e| e.to_string())
        }
    };
    if width == 0 || height == 0 {
        return Err(format!("image is {width}x{height}"));
    }
    let pixels = width as usize * height as usize;
    // The header alone decides the allocation, so refuse absurd sizes before trusting it.
    if pixels * channels > MAX_DECODED_BYTES {
        return Err(format!(
            "image is {width}x{height}, larger than the {} MiB decoding limit",
            MAX_DECODED_BYTES >> 20
        ));
    }
    let mut raw = pool::take_bytes(pixels * channels);
    raw.resize(pixels * channels, 0);
    decoder.read_image(&mut raw).map_err(|e| e.to_string())?;
    let rgb = if channels == 3 {
        raw
    } else {
        let mut rgb = pool::take_bytes(pixels * 3);
        match channels {
            1 => rgb.extend(raw.iter().flat_map(|&v| [v, v, v])),
            2 => rgb.extend(raw.chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]])),
            _ => rgb.extend(raw.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]])),
        }
        pool::give_bytes(raw);
        rgb
    };
    RgbImage::from_raw(width, height, rgb).ok_or_else(|| "decoder returned too few pixels".to_string())
}

/// Returns a decoded image's pixel buffer to the pool.
pub fn recycle_image(image: RgbImage) {
    pool::give_bytes(image.into_raw());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(img: &RgbImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn raw(members: Vec<(&str, Vec<u8>)>) -> RawSample {
        RawSample {
            shard: "s.tar".into(),
            key: "k".into(),
            offset: 0,
            members: members.into_iter().map(|(e, d)| (e.to_string(), d)).collect(),
            other_exts: vec!["cls".into()],
            problem: None,
        }
    }

    #[test]
    fn decodes_all_three_fields() {
        let img = RgbImage::from_pixel(6, 4, image::Rgb([10, 20, 30]));
        let gray = image::GrayImage::from_pixel(6, 4, image::Luma([200]));
        let mut png = Cursor::new(Vec::new());
        gray.write_to(&mut png, ImageFormat::Png).unwrap();
        let sample = raw(vec![
            ("jpeg", encode(&img, ImageFormat::Jpeg)),
            ("png", png.into_inner()),
            ("txt", b" a cat \n".to_vec()),
        ]);
        let d = decode_sample(&sample, &Fields::default()).unwrap();
        assert_eq!((d.image.width(), d.image.height()), (6, 4));
        assert_eq!(d.control.get_pixel(2, 2).0, [200, 200, 200]);
        assert_eq!(d.caption, "a cat");
    }

    #[test]
    fn json_caption_fallback_and_webp_image() {
        let img = RgbImage::from_pixel(5, 5, image::Rgb([1, 2, 3]));
        let mut webp = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img.clone())
            .write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut webp))
            .unwrap();
        let sample = raw(vec![
            ("webp", webp.into_inner()),
            ("png", encode(&img, ImageFormat::Png)),
            ("json", br#"{"prompt": "red"}"#.to_vec()),
        ]);
        let d = decode_sample(&sample, &Fields::default()).unwrap();
        assert_eq!(d.caption, "red");
        assert_eq!(d.image.get_pixel(0, 0).0, [1, 2, 3]);
    }

    #[test]
    fn absurd_header_sizes_are_refused_before_allocating() {
        // A valid PNG claiming 100000 x 100000 RGB pixels, with no image data behind it.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut header = Vec::new();
        header.extend_from_slice(&100_000u32.to_be_bytes());
        header.extend_from_slice(&100_000u32.to_be_bytes());
        header.extend_from_slice(&[8, 2, 0, 0, 0]);
        for (kind, data) in [(b"IHDR", header), (b"IDAT", Vec::new()), (b"IEND", Vec::new())] {
            let mut body = kind.to_vec();
            body.extend_from_slice(&data);
            png.extend_from_slice(&(data.len() as u32).to_be_bytes());
            png.extend_from_slice(&body);
            png.extend_from_slice(&crc32(&body).to_be_bytes());
        }
        let err = decode_rgb(&png).unwrap_err();
        assert!(err.contains("image is 100000x100000, larger than the 512 MiB decoding limit"), "{err}");
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn bad_samples_give_reasons() {
        let img = RgbImage::from_pixel(4, 4, image::Rgb([0, 0, 0]));
        let png = encode(&img, ImageFormat::Png);
        let missing = decode_sample(&raw(vec![("png", png.clone()), ("txt", b"x".to_vec())]), &Fields::default());
        let err = missing.unwrap_err();
        assert!(err.contains("no image member") && err.contains(".png, .txt, .cls"), "{err}");
        let garbage =
            raw(vec![("jpg", b"\xff\xd8\xff\xe0garbage".to_vec()), ("png", png.clone()), ("txt", b"x".to_vec())]);
        let err = decode_sample(&garbage, &Fields::default()).unwrap_err();
        assert!(err.contains("image 'k.jpg' does not decode"), "{err}");
        let jpg = encode(&img, ImageFormat::Jpeg);
        let bad_text = raw(vec![("jpg", jpg.clone()), ("png", png), ("txt", vec![0xff, 0xfe])]);
        let err = decode_sample(&bad_text, &Fields::default()).unwrap_err();
        assert!(err.contains("caption 'k.txt' is not UTF-8"), "{err}");
        let wide = encode(&RgbImage::new(8, 4), ImageFormat::Png);
        let misaligned = raw(vec![("jpg", jpg), ("png", wide), ("txt", b"x".to_vec())]);
        let err = decode_sample(&misaligned, &Fields::default()).unwrap_err();
        assert!(err.contains("aspect ratios differ"), "{err}");
    }
}
