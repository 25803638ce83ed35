//! Image decoding with limits, EXIF orientation, and the model's preprocessing
//! (colour → resize → center crop → scale → normalise) into a CHW f32 tensor.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader};
use marquee_core::model::Preprocess;

/// Limits on what we agree to decode.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
}

/// Why an image was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImageError {
    #[error("is empty; send JPEG, PNG, WebP or GIF bytes")]
    Empty,
    #[error("is {got} bytes; the limit (`vision.max_image_bytes`) is {limit} bytes")]
    TooManyBytes { got: usize, limit: usize },
    #[error("is not a supported image (JPEG, PNG, WebP, GIF): {0}")]
    UnknownFormat(String),
    #[error(
        "declares {width}×{height} = {pixels} pixels; the limit (`vision.max_pixels`) is {limit} pixels"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("cannot be decoded as {format}: {reason}")]
    Corrupt { format: String, reason: String },
}

impl ImageError {
    /// Over-size inputs are a resource limit; everything else is a bad argument.
    pub fn is_size_limit(&self) -> bool {
        matches!(self, Self::TooManyBytes { .. } | Self::TooManyPixels { .. })
    }
}

/// Decodes `bytes`, refusing oversized input before any pixel buffer is allocated.
pub fn decode(bytes: &[u8], limits: ImageLimits) -> Result<DynamicImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes {
            got: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .expect("reading from memory cannot fail, this is a bug")
    };
    let format = match reader().format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Gif)) => {
            f
        }
        Some(other) => {
            return Err(ImageError::UnknownFormat(format!(
                "{other:?} is not accepted"
            )));
        }
        None => return Err(ImageError::UnknownFormat("unrecognised signature".into())),
    };
    let corrupt = |e: image::ImageError| ImageError::Corrupt {
        format: format!("{format:?}").to_uppercase(),
        reason: e.to_string(),
    };
    // Header only: the declared size is checked before a pixel buffer exists, so a
    // decompression bomb costs us nothing.
    let (width, height) = reader().into_dimensions().map_err(corrupt)?;
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    let mut r = reader();
    let mut l = image::Limits::default();
    l.max_alloc = Some(limits.max_pixels * 16);
    r.limits(l);
    let mut decoder = r.into_decoder().map_err(corrupt)?;
    use image::ImageDecoder;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Applies `p` to a decoded image, producing `channels × crop_h × crop_w` floats.
pub fn preprocess(img: &DynamicImage, p: &Preprocess) -> Vec<f32> {
    let [crop_h, crop_w] = p.crop;
    let (w, h) = (img.width().max(1), img.height().max(1));
    let (rw, rh) = match p.resize_shorter {
        Some(s) if w <= h => (
            s,
            ((h as u64 * s as u64 + w as u64 / 2) / w as u64).max(crop_h as u64) as u32,
        ),
        Some(s) => (
            ((w as u64 * s as u64 + h as u64 / 2) / h as u64).max(crop_w as u64) as u32,
            s,
        ),
        None => (crop_w, crop_h),
    };
    let (rw, rh) = (rw.max(crop_w), rh.max(crop_h));
    let left = (rw - crop_w) / 2;
    let top = (rh - crop_h) / 2;
    let plane = (crop_h * crop_w) as usize;
    if p.color == "gray" {
        let g = img.to_luma8();
        let g = if (g.width(), g.height()) == (rw, rh) {
            g
        } else {
            image::imageops::resize(&g, rw, rh, FilterType::Triangle)
        };
        let mut out = Vec::with_capacity(plane);
        for y in 0..crop_h {
            for x in 0..crop_w {
                let v = g.get_pixel(left + x, top + y).0[0] as f32;
                out.push((v * p.scale - p.mean[0]) / p.std[0]);
            }
        }
        out
    } else {
        let rgb = img.to_rgb8();
        let rgb = if (rgb.width(), rgb.height()) == (rw, rh) {
            rgb
        } else {
            image::imageops::resize(&rgb, rw, rh, FilterType::Triangle)
        };
        let mut out = vec![0f32; 3 * plane];
        for y in 0..crop_h {
            for x in 0..crop_w {
                let px = rgb.get_pixel(left + x, top + y).0;
                let i = (y * crop_w + x) as usize;
                for c in 0..3 {
                    out[c * plane + i] = (px[c] as f32 * p.scale - p.mean[c]) / p.std[c];
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ImageLimits = ImageLimits {
        max_bytes: 1 << 20,
        max_pixels: 1 << 20,
    };

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn a_declared_bomb_is_refused_from_its_header() {
        // A valid PNG header declaring 50000×50000, with no pixel data behind it.
        let mut bytes = png(1, 1);
        bytes[16..20].copy_from_slice(&50_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&50_000u32.to_be_bytes());
        // Keep the header chunk's checksum valid so only the size is wrong.
        let crc = crc32fast::hash(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        match decode(&bytes, LIMITS) {
            Err(ImageError::TooManyPixels { pixels, .. }) => assert_eq!(pixels, 2_500_000_000),
            other => panic!("expected TooManyPixels, got {other:?}"),
        }
    }

    #[test]
    fn empty_truncated_and_foreign_bytes_are_named() {
        assert_eq!(decode(&[], LIMITS).unwrap_err(), ImageError::Empty);
        let full = png(64, 64);
        assert!(matches!(
            decode(&full[..full.len() / 2], LIMITS),
            Err(ImageError::Corrupt { .. })
        ));
        assert!(matches!(
            decode(b"hello world, not an image", LIMITS),
            Err(ImageError::UnknownFormat(_))
        ));
    }

    #[test]
    fn resize_crop_normalise_gives_chw_of_the_crop_size() {
        let img = decode(&png(40, 20), LIMITS).unwrap();
        let p = Preprocess {
            color: "rgb".into(),
            resize_shorter: Some(10),
            crop: [8, 8],
            scale: 1.0,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
        };
        let t = preprocess(&img, &p);
        assert_eq!(t.len(), 3 * 8 * 8);
        assert!(
            t[2 * 64..].iter().all(|v| (*v - 7.0).abs() < 0.5),
            "blue plane is constant 7"
        );
    }
}
