//! Image decoding with limits, EXIF orientation, and the model's preprocessing
//! (colour → resize → orientation → center crop → scale → normalise) into a CHW f32 tensor.
//!
//! Every buffer this module allocates has a size derived from the image *header*, and the
//! header is checked against [`ImageLimits`] before any pixel buffer exists: the pixel count,
//! the aspect ratio, the decoded bytes (bytes per pixel count: 16-bit and CMYK inputs cost more
//! than 8-bit RGB), and the size the resize step will ask for. A 31 KB PNG of 1×16,000,000
//! pixels used to pass the pixel limit and then ask the resizer for a 256×4,096,000,000 image
//! (65 GB), which aborted the process; it is now refused from its header.

use std::io::Cursor;

use image::imageops::FilterType;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use marquee_core::model::Preprocess;

/// Decoded bytes allowed per pixel of `max_pixels`: an 8-bit RGBA image at the pixel limit.
/// A 16-bit or CMYK image decodes to more bytes a pixel, so it must have fewer pixels.
pub const DECODED_BYTES_PER_PIXEL: u64 = 4;

/// Limits on what we agree to decode.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
    /// Longer side ÷ shorter side, at most.
    pub max_aspect_ratio: u32,
}

impl ImageLimits {
    /// Bytes the decoder's output buffer may take: [`DECODED_BYTES_PER_PIXEL`] × `max_pixels`.
    pub fn max_decoded_bytes(&self) -> u64 {
        self.max_pixels.saturating_mul(DECODED_BYTES_PER_PIXEL)
    }

    /// The longest side any accepted image can have: the side of an image at the pixel limit
    /// with the widest accepted aspect ratio. Given to the decoders as a hard limit too.
    fn max_side(&self) -> u32 {
        let side = ((self.max_pixels as f64) * self.max_aspect_ratio as f64).sqrt();
        side.min(u32::MAX as f64) as u32 + 1
    }
}

/// Why an image was refused (or not finished).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImageError {
    #[error("is empty; send JPEG, PNG, WebP or GIF bytes")]
    Empty,
    #[error("is {got} bytes; the limit (`vision.max_image_bytes`) is {limit} bytes")]
    TooManyBytes { got: usize, limit: usize },
    #[error("is not a supported image (JPEG, PNG, WebP, GIF): {0}")]
    UnknownFormat(String),
    #[error("declares {width}×{height} pixels; an image needs a width and a height of at least 1")]
    ZeroSize { width: u32, height: u32 },
    #[error(
        "declares {width}×{height} = {pixels} pixels; the limit (`vision.max_pixels`) is {limit} pixels"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error(
        "declares {width}×{height}: aspect ratio {ratio}:1 is over the limit (`vision.max_aspect_ratio`) {limit}:1"
    )]
    AspectRatio {
        width: u32,
        height: u32,
        ratio: u64,
        limit: u32,
    },
    #[error(
        "declares {width}×{height} {color} = {bytes} decoded bytes; the limit is {limit} bytes ({per_pixel} bytes a pixel of `vision.max_pixels`)"
    )]
    TooManyDecodedBytes {
        width: u32,
        height: u32,
        color: String,
        bytes: u64,
        limit: u64,
        per_pixel: u64,
    },
    #[error(
        "declares {width}×{height}, which the model's preprocessing would resize to {resized_width}×{resized_height}; the limit (`vision.max_pixels`) is {limit} pixels"
    )]
    ResizeTooLarge {
        width: u32,
        height: u32,
        resized_width: u32,
        resized_height: u32,
        limit: u64,
    },
    #[error(
        "is a GIF whose first frame ({width}×{height} at {left},{top}) does not fit its {screen_width}×{screen_height} logical screen"
    )]
    GifFrameOutsideScreen {
        left: u16,
        top: u16,
        width: u16,
        height: u16,
        screen_width: u16,
        screen_height: u16,
    },
    #[error("cannot be decoded as {format}: {reason}")]
    Corrupt { format: String, reason: String },
    /// Not the image's fault: the caller left or its deadline passed, so the work stopped.
    #[error("was not decoded: the call was cancelled or its deadline passed")]
    Abandoned,
}

impl ImageError {
    /// Over-size inputs are a resource limit; everything else is a bad argument.
    pub fn is_size_limit(&self) -> bool {
        matches!(
            self,
            Self::TooManyBytes { .. }
                | Self::TooManyPixels { .. }
                | Self::TooManyDecodedBytes { .. }
                | Self::ResizeTooLarge { .. }
        )
    }
}

/// A decoder whose header passed every limit: nothing larger than the checked sizes will be
/// allocated for its pixels.
pub struct Checked<'a> {
    decoder: Box<dyn ImageDecoder + 'a>,
    format: ImageFormat,
    /// As stored, before orientation.
    width: u32,
    height: u32,
    orientation: Orientation,
}

impl Checked<'_> {
    /// Width and height once the EXIF orientation is applied.
    pub fn oriented_dimensions(&self) -> (u32, u32) {
        if swaps_sides(self.orientation) {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }
}

fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

fn format_name(format: ImageFormat) -> String {
    format!("{format:?}").to_uppercase()
}

/// Reads and checks the header of `bytes`; allocates nothing proportional to the pixels.
pub fn check(bytes: &[u8], limits: ImageLimits) -> Result<Checked<'_>, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes {
            got: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .expect("reading from memory cannot fail, this is a bug");
    let format = match reader.format() {
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
        format: format_name(format),
        reason: e.to_string(),
    };
    if format == ImageFormat::Gif {
        // The decoder allocates a frame-sized buffer for a frame that does not fit the logical
        // screen, and only the screen is checked below.
        gif_first_frame_fits(bytes)?;
    }
    // Header only. The decoders also get hard limits, as a second line: no side longer than
    // any accepted image can have, and their own allocations (PNG text chunks, GIF frames,
    // codec buffers) within twice the decoded-bytes limit, so an image just under our limit
    // is not refused by the codec's bookkeeping of its row buffers.
    let mut reader = reader;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side());
    decoder_limits.max_image_height = Some(limits.max_side());
    decoder_limits.max_alloc = Some(limits.max_decoded_bytes().saturating_mul(2));
    reader.limits(decoder_limits);
    let mut decoder: Box<dyn ImageDecoder + '_> = match reader.into_decoder() {
        Ok(d) => Box::new(d),
        // A hard limit fired (or the header is broken): if the declared size breaks one of
        // our limits, say which, like the checks below would.
        Err(e) => return Err(declared_too_large(bytes, limits).unwrap_or_else(|| corrupt(e))),
    };
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    let decoded = decoder.total_bytes();
    if decoded > limits.max_decoded_bytes() {
        return Err(ImageError::TooManyDecodedBytes {
            width,
            height,
            color: format!("{:?}", decoder.color_type()),
            bytes: decoded,
            limit: limits.max_decoded_bytes(),
            per_pixel: DECODED_BYTES_PER_PIXEL,
        });
    }
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    Ok(Checked {
        decoder,
        format,
        width,
        height,
        orientation,
    })
}

/// Pixel count first (a resource limit), then the aspect ratio (a malformed request).
fn check_dimensions(width: u32, height: u32, limits: ImageLimits) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSize { width, height });
    }
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    let (long, short) = (width.max(height) as u64, width.min(height) as u64);
    if long > short * limits.max_aspect_ratio as u64 {
        return Err(ImageError::AspectRatio {
            width,
            height,
            ratio: long / short,
            limit: limits.max_aspect_ratio,
        });
    }
    Ok(())
}

/// When a decoder refused the header on its own hard limits, reads the declared size with no
/// limits (header only) so the message names the limit it breaks; `None` if it breaks none of
/// ours (e.g. an oversized metadata chunk).
fn declared_too_large(bytes: &[u8], limits: ImageLimits) -> Option<ImageError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .expect("reading from memory cannot fail, this is a bug");
    reader.no_limits();
    let (w, h) = reader.into_dimensions().ok()?;
    check_dimensions(w, h, limits).err()
}

/// Walks a GIF's blocks to its first image descriptor and checks that the frame lies inside
/// the logical screen. Cost: one pass over the bytes, no allocation. A file that ends early is
/// left to the decoder, which names the truncation.
fn gif_first_frame_fits(b: &[u8]) -> Result<(), ImageError> {
    let u16_at = |i: usize| b.get(i..i + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let (Some(sw), Some(sh), Some(&flags)) = (u16_at(6), u16_at(8), b.get(10)) else {
        return Ok(());
    };
    let table = |flags: u8| {
        if flags & 0x80 != 0 {
            3usize << ((flags & 7) + 1)
        } else {
            0
        }
    };
    let mut i = 13 + table(flags);
    // Skips a run of data sub-blocks (length byte, data; a zero length ends the run).
    let skip_sub_blocks = |mut i: usize| -> Option<usize> {
        loop {
            let len = *b.get(i)? as usize;
            i += 1 + len;
            if len == 0 {
                return Some(i);
            }
        }
    };
    loop {
        match b.get(i) {
            Some(0x21) => match skip_sub_blocks(i + 2) {
                Some(next) => i = next,
                None => return Ok(()),
            },
            Some(0x2C) => {
                let (Some(left), Some(top), Some(width), Some(height)) =
                    (u16_at(i + 1), u16_at(i + 3), u16_at(i + 5), u16_at(i + 7))
                else {
                    return Ok(());
                };
                if left as u32 + width as u32 > sw as u32 || top as u32 + height as u32 > sh as u32
                {
                    return Err(ImageError::GifFrameOutsideScreen {
                        left,
                        top,
                        width,
                        height,
                        screen_width: sw,
                        screen_height: sh,
                    });
                }
                return Ok(());
            }
            // The trailer, junk, or the end: the decoder reports it.
            _ => return Ok(()),
        }
    }
}

/// The size `p` resizes an image of `w×h` to (before cropping), never smaller than the crop.
pub fn resized_dimensions(w: u32, h: u32, p: &Preprocess) -> (u32, u32) {
    let [crop_h, crop_w] = p.crop;
    let (w, h) = (w.max(1) as u64, h.max(1) as u64);
    let (rw, rh) = match p.resize_shorter {
        Some(s) if w <= h => (s as u64, ((h * s as u64 + w / 2) / w)),
        Some(s) => (((w * s as u64 + h / 2) / h), s as u64),
        None => (crop_w as u64, crop_h as u64),
    };
    let clamp = |v: u64, min: u32| v.max(min as u64).min(u32::MAX as u64) as u32;
    (clamp(rw, crop_w), clamp(rh, crop_h))
}

/// Decodes `bytes` and applies `p`, producing `channels × crop_h × crop_w` floats.
///
/// `keep_going` is asked before each expensive step (decode, colour conversion, resize); when
/// it returns false the work stops with [`ImageError::Abandoned`], so a caller that left or ran
/// out of time does not hold a decode worker for the rest of a large image.
pub fn to_tensor(
    bytes: &[u8],
    limits: ImageLimits,
    p: &Preprocess,
    keep_going: &dyn Fn() -> bool,
) -> Result<Vec<f32>, ImageError> {
    let checked = check(bytes, limits)?;
    let (ow, oh) = checked.oriented_dimensions();
    let (rw, rh) = resized_dimensions(ow, oh, p);
    // The resize is done before the rotation (on the stored orientation, to the swapped
    // size), so rotating costs a copy of the small resized image, not of the decoded one.
    let (sw, sh) = if swaps_sides(checked.orientation) {
        (rh, rw)
    } else {
        (rw, rh)
    };
    // The resizer's output is rw×rh, and its vertical pass an intermediate of
    // (stored width)×sh pixels at 16 bytes each: both are bounded like the decoded image.
    let limit = limits.max_pixels;
    if rw as u64 * rh as u64 > limit || checked.width as u64 * sh as u64 > limit {
        return Err(ImageError::ResizeTooLarge {
            width: ow,
            height: oh,
            resized_width: rw,
            resized_height: rh,
            limit,
        });
    }
    let format = checked.format;
    let orientation = checked.orientation;
    if !keep_going() {
        return Err(ImageError::Abandoned);
    }
    let img = DynamicImage::from_decoder(checked.decoder).map_err(|e| ImageError::Corrupt {
        format: format_name(format),
        reason: e.to_string(),
    })?;
    if !keep_going() {
        return Err(ImageError::Abandoned);
    }
    let [crop_h, crop_w] = p.crop;
    let left = (rw - crop_w) / 2;
    let top = (rh - crop_h) / 2;
    let plane = (crop_h * crop_w) as usize;
    // `into_*` converts in place of the decoded image where it can: the decoded buffer is
    // freed before the resize allocates.
    let img = if p.color == "gray" {
        DynamicImage::ImageLuma8(img.into_luma8())
    } else {
        DynamicImage::ImageRgb8(img.into_rgb8())
    };
    if !keep_going() {
        return Err(ImageError::Abandoned);
    }
    let mut img = if (img.width(), img.height()) == (sw, sh) {
        img
    } else {
        img.resize_exact(sw, sh, FilterType::Triangle)
    };
    img.apply_orientation(orientation);
    debug_assert_eq!((img.width(), img.height()), (rw, rh));
    if p.color == "gray" {
        let g = img.into_luma8();
        let mut out = Vec::with_capacity(plane);
        for y in 0..crop_h {
            for x in 0..crop_w {
                let v = g.get_pixel(left + x, top + y).0[0] as f32;
                out.push((v * p.scale - p.mean[0]) / p.std[0]);
            }
        }
        Ok(out)
    } else {
        let rgb = img.into_rgb8();
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
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ImageLimits = ImageLimits {
        max_bytes: 1 << 20,
        max_pixels: 1 << 20,
        max_aspect_ratio: 20,
    };

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    fn with_size(mut bytes: Vec<u8>, w: u32, h: u32) -> Vec<u8> {
        bytes[16..20].copy_from_slice(&w.to_be_bytes());
        bytes[20..24].copy_from_slice(&h.to_be_bytes());
        // Keep the header chunk's checksum valid so only the size is wrong.
        let crc = crc32fast::hash(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    fn rgb(resize_shorter: Option<u32>, crop: u32) -> Preprocess {
        Preprocess {
            color: "rgb".into(),
            resize_shorter,
            crop: [crop, crop],
            scale: 1.0,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
        }
    }

    fn tensor(bytes: &[u8], p: &Preprocess) -> Result<Vec<f32>, ImageError> {
        to_tensor(bytes, LIMITS, p, &|| true)
    }

    #[test]
    fn a_declared_bomb_is_refused_from_its_header() {
        let bytes = with_size(png(1, 1), 50_000, 50_000);
        match tensor(&bytes, &rgb(Some(8), 8)) {
            Err(ImageError::TooManyPixels { pixels, .. }) => assert_eq!(pixels, 2_500_000_000),
            other => panic!("expected TooManyPixels, got {other:?}"),
        }
    }

    #[test]
    fn a_thin_strip_is_refused_by_its_aspect_ratio() {
        let bytes = with_size(png(1, 1), 1, 1_000_000);
        let err = tensor(&bytes, &rgb(Some(256), 224)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "declares 1×1000000: aspect ratio 1000000:1 is over the limit (`vision.max_aspect_ratio`) 20:1"
        );
        assert!(!err.is_size_limit());
    }

    #[test]
    fn resize_is_bounded_even_with_a_loose_aspect_limit() {
        let loose = ImageLimits {
            max_aspect_ratio: 1_000_000,
            ..LIMITS
        };
        let bytes = with_size(png(1, 1), 1, 1_000_000);
        match to_tensor(&bytes, loose, &rgb(Some(256), 224), &|| true) {
            Err(ImageError::ResizeTooLarge {
                resized_width,
                resized_height,
                ..
            }) => assert_eq!((resized_width, resized_height), (256, 256_000_000)),
            other => panic!("expected ResizeTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn bytes_per_pixel_count_against_the_decoded_limit() {
        // 16-bit RGBA: 8 bytes a pixel, so 800×800 = 640,000 pixels (under 1 Mi pixels) decode
        // to 5,120,000 bytes, over 4 × 1 Mi.
        let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(
            800,
            800,
            image::Rgba([1, 2, 3, 4]),
        );
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        let err = tensor(&bytes, &rgb(Some(8), 8)).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::TooManyDecodedBytes {
                    bytes: 5_120_000,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.is_size_limit());
    }

    #[test]
    fn empty_zero_truncated_and_foreign_bytes_are_named() {
        assert_eq!(tensor(&[], &rgb(None, 8)).unwrap_err(), ImageError::Empty);
        let full = png(64, 64);
        assert!(matches!(
            tensor(&full[..full.len() / 2], &rgb(None, 8)),
            Err(ImageError::Corrupt { .. })
        ));
        assert!(matches!(
            tensor(b"hello world, not an image", &rgb(None, 8)),
            Err(ImageError::UnknownFormat(_))
        ));
        assert!(matches!(
            tensor(&with_size(png(1, 1), 0, 0), &rgb(None, 8)),
            Err(ImageError::Corrupt { .. } | ImageError::ZeroSize { .. })
        ));
    }

    #[test]
    fn a_gif_frame_outside_its_screen_is_refused() {
        // Screen 1×1, no global table; first frame 20000×20000 with a 2-colour local table.
        let mut gif = b"GIF89a".to_vec();
        gif.extend([1, 0, 1, 0, 0, 0, 0]);
        gif.extend([0x21, 0xF9, 4, 0, 0, 0, 0, 0]); // graphic control extension
        gif.push(0x2C);
        gif.extend([0, 0, 0, 0]);
        gif.extend(20_000u16.to_le_bytes());
        gif.extend(20_000u16.to_le_bytes());
        gif.extend([0x80, 0, 0, 0, 255, 255, 255, 2, 2, 0x44, 0x01, 0, 0x3B]);
        assert_eq!(
            tensor(&gif, &rgb(None, 8)).unwrap_err(),
            ImageError::GifFrameOutsideScreen {
                left: 0,
                top: 0,
                width: 20_000,
                height: 20_000,
                screen_width: 1,
                screen_height: 1
            }
        );
    }

    #[test]
    fn stopping_between_steps_abandons_the_image() {
        assert_eq!(
            to_tensor(&png(40, 20), LIMITS, &rgb(Some(10), 8), &|| false).unwrap_err(),
            ImageError::Abandoned
        );
    }

    #[test]
    fn resize_crop_normalise_gives_chw_of_the_crop_size() {
        let t = tensor(&png(40, 20), &rgb(Some(10), 8)).unwrap();
        assert_eq!(t.len(), 3 * 8 * 8);
        assert!(
            t[2 * 64..].iter().all(|v| (*v - 7.0).abs() < 0.5),
            "blue plane is constant 7"
        );
    }

    #[test]
    fn resized_dimensions_keep_the_aspect_and_cover_the_crop() {
        let p = rgb(Some(256), 224);
        assert_eq!(resized_dimensions(640, 480, &p), (341, 256));
        assert_eq!(resized_dimensions(480, 640, &p), (256, 341));
        assert_eq!(resized_dimensions(10, 10, &p), (256, 256));
        assert_eq!(resized_dimensions(640, 480, &rgb(None, 28)), (28, 28));
    }
}
