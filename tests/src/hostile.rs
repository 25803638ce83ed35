//! A corpus of hostile images, built in memory by code (never downloaded), for the vision
//! service's hardening tests and the fault suite. Each entry names the status a vision server
//! with default settings must answer `Classify` with; `OK` entries are inputs that look
//! dangerous (decompression bombs within the limits, EXIF rotation of a large photo, CMYK,
//! 16-bit, many GIF frames, a 20:1 panorama) and must be served with bounded memory.
//!
//! Deterministic: the same bytes on every call. `cargo run -p marquee-e2e --example
//! hostile-images -- DIR` writes them to files for other clients.
//!
//! Built by hand where the `image` crate cannot encode the case: PNG chunks, zlib streams of
//! zeros (a deflate "bomb" of any size in ~1/160 of it), baseline JPEGs of a flat colour with
//! any size and component count, EXIF and Adobe segments, GIF blocks.

use std::io::Cursor;

use tonic::Code;

/// One hostile input and the status a default vision server answers it with.
pub struct HostileImage {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    pub expect: Code,
}

/// Every hostile image, in a fixed order.
pub fn corpus() -> Vec<HostileImage> {
    let entry = |name, bytes, expect| HostileImage {
        name,
        bytes,
        expect,
    };
    use Code::{InvalidArgument as Invalid, Ok as Served, ResourceExhausted as Exhausted};
    vec![
        // The strip of issue 10: 31 KB that passes the pixel limit, then asked the resizer
        // for 256×4,096,000,000 pixels and aborted the process.
        entry(
            "png_1x16000000_gray",
            png_zeros(1, 16_000_000, 8, 0),
            Invalid,
        ),
        entry(
            "png_16000000x1_gray",
            png_zeros(16_000_000, 1, 8, 0),
            Invalid,
        ),
        entry(
            "png_65535x65535_tiny_idat",
            png(65_535, 65_535, 8, 2, &zlib_zeros(64)),
            Exhausted,
        ),
        // 100,000² declared, 100 MB of zeros behind it in about 600 KB.
        entry(
            "png_bomb_100000x100000",
            png(100_000, 100_000, 8, 0, &zlib_zeros(100_000_000)),
            Exhausted,
        ),
        // 40,000,000 pixels (the pixel limit) of 16-bit RGBA: 320 MB decoded, from 2 MB.
        entry(
            "png_rgba16_at_pixel_limit",
            png_zeros(8_000, 5_000, 16, 6),
            Exhausted,
        ),
        entry(
            "png_rgba16_2000x1500",
            png_zeros(2_000, 1_500, 16, 6),
            Served,
        ),
        entry(
            "png_gray_bomb_4000x4000",
            png_zeros(4_000, 4_000, 8, 0),
            Served,
        ),
        entry("png_panorama_20_to_1", png_zeros(4_000, 200, 8, 2), Served),
        entry("png_0x0", png(0, 0, 8, 0, &zlib_zeros(1)), Invalid),
        entry("png_truncated", truncated(encoded_png(64, 64), 2), Invalid),
        entry(
            "png_signature_then_garbage",
            [&PNG_SIGNATURE[..], &garbage(4096, 7)].concat(),
            Invalid,
        ),
        entry(
            "jpeg_65535x65535_declared",
            jpeg_headers_only(65_535, 65_535),
            Exhausted,
        ),
        entry(
            "jpeg_60000x16",
            jpeg_flat(60_000, 16, 3, None, false),
            Invalid,
        ),
        entry(
            "jpeg_cut_in_headers",
            jpeg_cut_in_headers(640, 480),
            Invalid,
        ),
        entry(
            "jpeg_truncated_scan",
            truncated(encoded_jpeg(64, 64), 3),
            Invalid,
        ),
        entry(
            "jpeg_cmyk_2000x2000",
            jpeg_flat(2_000, 2_000, 4, None, true),
            Served,
        ),
        entry(
            "jpeg_cmyk_5000x4000",
            jpeg_flat(5_000, 4_000, 4, None, true),
            Served,
        ),
        // EXIF orientation 6 (rotate 90°) on 12 megapixels.
        entry(
            "jpeg_exif_rotated_4000x3000",
            jpeg_flat(4_000, 3_000, 3, Some(6), false),
            Served,
        ),
        entry(
            "gif_frame_larger_than_screen",
            gif_frame_outside_screen(),
            Invalid,
        ),
        entry("gif_2000_frames", gif_many_frames(2_000), Served),
        entry(
            "gif_truncated",
            b"GIF89a\x10\x00\x10\x00\x80\x00".to_vec(),
            Invalid,
        ),
        entry(
            "webp_16383x16383_declared",
            webp_declared(16_383, 16_383),
            Exhausted,
        ),
        entry(
            "webp_truncated",
            truncated(encoded_webp(64, 64), 2),
            Invalid,
        ),
        entry("bmp_not_accepted", bmp_header(), Invalid),
        entry("empty", Vec::new(), Invalid),
        entry("garbage_4096", garbage(4096, 1), Invalid),
    ]
}

// === PNG ===

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend(kind);
    out.extend(data);
    let mut crc = flate2::Crc::new();
    crc.update(&out[start..]);
    out.extend(crc.sum().to_be_bytes());
}

/// A PNG with the given header and `idat` as its only image data.
pub fn png(width: u32, height: u32, bit_depth: u8, color_type: u8, idat: &[u8]) -> Vec<u8> {
    let mut out = PNG_SIGNATURE.to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([bit_depth, color_type, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A complete, valid PNG of zeros (black, or transparent): every scanline is filter byte 0
/// and zero samples, so the image data is one zlib stream of zeros.
pub fn png_zeros(width: u32, height: u32, bit_depth: u8, color_type: u8) -> Vec<u8> {
    let channels: u64 = match color_type {
        0 => 1,
        2 => 3,
        4 => 2,
        6 => 4,
        _ => panic!("colour type {color_type} is not generated here"),
    };
    let row = 1 + (width as u64 * channels * bit_depth as u64).div_ceil(8);
    png(
        width,
        height,
        bit_depth,
        color_type,
        &zlib_zeros(row * height as u64),
    )
}

/// A zlib stream inflating to `n` zero bytes: one fixed-Huffman deflate block of a literal 0
/// and back-references of length 258 at distance 1 (13 bits for 258 bytes).
pub fn zlib_zeros(n: u64) -> Vec<u8> {
    let mut w = BitWriter::default();
    w.bits(1, 1); // BFINAL
    w.bits(1, 2); // BTYPE = 01, fixed Huffman
    let literal_zero = |w: &mut BitWriter| w.code(0x30, 8); // literals 0..=143: 0x30 + v, 8 bits
    let mut left = n;
    if left > 0 {
        literal_zero(&mut w);
        left -= 1;
    }
    while left >= 258 {
        w.code(0xC5, 8); // length symbol 285 (= 258): 0xC0 + (285 - 280), 8 bits
        w.code(0, 5); // distance code 0 (= 1), 5 bits
        left -= 258;
    }
    for _ in 0..left {
        literal_zero(&mut w);
    }
    w.code(0, 7); // end of block: symbol 256, 7 bits of 0
    let mut out = vec![0x78, 0x01];
    out.extend(w.finish());
    // Adler-32 of n zeros: a stays 1, b adds 1 per byte.
    let adler = (((n % 65_521) as u32) << 16) | 1;
    out.extend(adler.to_be_bytes());
    out
}

/// Deflate's bit order: values least significant bit first, Huffman codes most significant
/// bit first.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u32,
    n: u32,
}

impl BitWriter {
    fn bits(&mut self, value: u32, count: u32) {
        for i in 0..count {
            self.push((value >> i) & 1);
        }
    }

    fn code(&mut self, code: u32, len: u32) {
        for i in (0..len).rev() {
            self.push((code >> i) & 1);
        }
    }

    fn push(&mut self, bit: u32) {
        self.acc |= bit << self.n;
        self.n += 1;
        if self.n == 8 {
            self.out.push(self.acc as u8);
            self.acc = 0;
            self.n = 0;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

fn encoded_png(w: u32, h: u32) -> Vec<u8> {
    encode(gradient(w, h), image::ImageFormat::Png)
}

// === JPEG ===

/// A baseline JPEG of one flat colour, `components` 1 (grey), 3 (YCbCr) or 4 (CMYK, with an
/// Adobe segment when `adobe`), all sampled 1×1, optionally with an EXIF orientation. Every
/// 8×8 block is "DC unchanged, end of block", two one-bit codes, so any size costs
/// `w × h × components / 256` bytes.
pub fn jpeg_flat(
    width: u16,
    height: u16,
    components: u8,
    exif_orientation: Option<u16>,
    adobe: bool,
) -> Vec<u8> {
    let mut out = jpeg_header(width, height, components, exif_orientation, adobe);
    let blocks = (width as u64).div_ceil(8) * (height as u64).div_ceil(8) * components as u64;
    let bits = blocks * 2;
    // All codes are 0 bits; the last byte is padded with 1 bits, as the standard asks.
    out.extend(std::iter::repeat_n(0u8, (bits / 8) as usize));
    if !bits.is_multiple_of(8) {
        out.push(0xFFu8 >> (bits % 8));
    }
    out.extend([0xFF, 0xD9]);
    out
}

/// Every marker up to the scan, and nothing after it.
fn jpeg_headers_only(width: u16, height: u16) -> Vec<u8> {
    let mut out = jpeg_header(width, height, 3, None, false);
    out.extend([0xFF, 0xD9]);
    out
}

/// A JPEG that ends in the middle of its start-of-scan segment.
fn jpeg_cut_in_headers(width: u16, height: u16) -> Vec<u8> {
    let mut out = jpeg_header(width, height, 3, None, false);
    out.truncate(out.len() - 5);
    out
}

fn segment(out: &mut Vec<u8>, marker: u8, data: &[u8]) {
    out.extend([0xFF, marker]);
    out.extend(((data.len() + 2) as u16).to_be_bytes());
    out.extend(data);
}

fn jpeg_header(
    width: u16,
    height: u16,
    components: u8,
    exif_orientation: Option<u16>,
    adobe: bool,
) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    if let Some(o) = exif_orientation {
        // "Exif\0\0", a big-endian TIFF header, one IFD with one entry: Orientation (0x0112),
        // SHORT, count 1.
        let mut app1 = b"Exif\0\0MM\0\x2A\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
        app1.extend(o.to_be_bytes());
        app1.extend([0, 0, 0, 0, 0, 0]);
        segment(&mut out, 0xE1, &app1);
    }
    if adobe {
        // Version 100, no flags, transform 0: the samples are CMYK as they are.
        segment(&mut out, 0xEE, b"Adobe\0\x64\0\0\0\0\0");
    }
    let mut dqt = vec![0u8];
    dqt.extend([1u8; 64]);
    segment(&mut out, 0xDB, &dqt);
    let mut sof = vec![8];
    sof.extend(height.to_be_bytes());
    sof.extend(width.to_be_bytes());
    sof.push(components);
    for c in 1..=components {
        sof.extend([c, 0x11, 0]);
    }
    segment(&mut out, 0xC0, &sof);
    // DC table 0 and AC table 0, each one code of length 1 ("0"): DC difference category 0,
    // and AC end of block.
    for class in [0x00, 0x10] {
        let mut dht = vec![class, 1];
        dht.extend([0u8; 15]);
        dht.push(0);
        segment(&mut out, 0xC4, &dht);
    }
    let mut sos = vec![components];
    for c in 1..=components {
        sos.extend([c, 0x00]);
    }
    sos.extend([0, 63, 0]);
    segment(&mut out, 0xDA, &sos);
    out
}

fn encoded_jpeg(w: u32, h: u32) -> Vec<u8> {
    encode(gradient(w, h), image::ImageFormat::Jpeg)
}

// === GIF ===

/// A 1×1 logical screen whose first frame is 20,000×20,000.
fn gif_frame_outside_screen() -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend([1, 0, 1, 0, 0, 0, 0]);
    gif.push(0x2C);
    gif.extend([0, 0, 0, 0]);
    gif.extend(20_000u16.to_le_bytes());
    gif.extend(20_000u16.to_le_bytes());
    // Local table of 2 colours; LZW minimum code size 2; clear, 0, end; trailer.
    gif.extend([0x80, 0, 0, 0, 255, 255, 255, 2, 2, 0x44, 0x01, 0, 0x3B]);
    gif
}

/// An animated 16×16 GIF of `n` frames (only the first is classified).
fn gif_many_frames(n: u32) -> Vec<u8> {
    use image::codecs::gif::GifEncoder;
    let mut out = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut out);
        let frames = (0..n).map(|i| {
            image::Frame::new(image::RgbaImage::from_pixel(
                16,
                16,
                image::Rgba([i as u8, (i >> 8) as u8, 0, 255]),
            ))
        });
        enc.encode_frames(frames).expect("GIF encodes in memory");
    }
    out
}

// === WebP and others ===

fn encoded_webp(w: u32, h: u32) -> Vec<u8> {
    let img = gradient(w, h);
    let mut out = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut out)
        .encode(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .expect("WebP encodes in memory");
    out
}

/// A lossless WebP whose VP8L header declares `w×h` (at most 16383 each: image-webp 0.2 reads
/// 16384 as 0); the pixel data is
/// that of a 64×64 image.
fn webp_declared(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = encoded_webp(64, 64);
    // RIFF header (12), "VP8L" and its size (8), the 0x2F signature (1), then 14 bits of
    // width - 1 and 14 of height - 1, least significant first; keep the alpha/version bits.
    assert_eq!(&bytes[12..16], b"VP8L", "lossless WebP");
    let old = u32::from_le_bytes(bytes[21..25].try_into().unwrap());
    let dims = (w - 1) | ((h - 1) << 14) | (old & !((1 << 28) - 1));
    bytes[21..25].copy_from_slice(&dims.to_le_bytes());
    bytes
}

fn bmp_header() -> Vec<u8> {
    let mut b = b"BM".to_vec();
    b.extend([0u8; 60]);
    b
}

fn gradient(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 * 3, y as u8 * 3, 90]))
}

fn encode(img: image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format)
        .expect("encodes in memory");
    out
}

/// The first `1/div` of `bytes`.
fn truncated(mut bytes: Vec<u8>, div: usize) -> Vec<u8> {
    bytes.truncate(bytes.len() / div);
    bytes
}

/// `n` pseudo-random bytes from a fixed seed (a 64-bit LCG's high bytes).
pub fn garbage(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (s >> 56) as u8
        })
        .collect()
}

// === memory of this process (servers started in process share it) ===

fn status_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resident memory of this process now (`VmRSS`), in bytes.
pub fn rss_bytes() -> u64 {
    status_kib("VmRSS:").expect("/proc/self/status has VmRSS") * 1024
}

/// Peak resident memory (`VmHWM`) since the process started or [`reset_peak_rss`], in bytes.
pub fn peak_rss_bytes() -> u64 {
    status_kib("VmHWM:").expect("/proc/self/status has VmHWM") * 1024
}

/// Resets `VmHWM` to the current RSS (Linux ≥ 4.0, writing 5 to `/proc/self/clear_refs`).
pub fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("/proc/self/clear_refs is writable");
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn zlib_zeros_inflates_to_exactly_n_zeros() {
        for n in [0u64, 1, 2, 257, 258, 259, 1000, 100_000] {
            let mut out = Vec::new();
            flate2::read::ZlibDecoder::new(&zlib_zeros(n)[..])
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out.len() as u64, n);
            assert!(out.iter().all(|b| *b == 0));
        }
    }

    #[test]
    fn generated_images_decode_as_declared() {
        let check = |bytes: &[u8], w: u32, h: u32| {
            let img = image::load_from_memory(bytes).unwrap();
            assert_eq!((img.width(), img.height()), (w, h));
        };
        check(&png_zeros(30, 20, 16, 6), 30, 20);
        check(&png_zeros(7, 3, 8, 0), 7, 3);
        check(&jpeg_flat(30, 20, 3, Some(6), false), 30, 20);
        check(&jpeg_flat(17, 9, 4, None, true), 17, 9);
        check(&jpeg_flat(16, 16, 1, None, false), 16, 16);
        check(&gif_many_frames(3), 16, 16);
    }

    #[test]
    fn the_corpus_is_deterministic_and_fits_a_request() {
        let (a, b) = (corpus(), corpus());
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((x.name, &x.bytes), (y.name, &y.bytes));
            assert!(
                x.bytes.len() <= 8 << 20,
                "{} is {} bytes",
                x.name,
                x.bytes.len()
            );
        }
    }
}
