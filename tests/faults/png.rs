//! The poison image of issue 10, item 2, generated here (never downloaded): a 1 × 16,000,000
//! greyscale PNG of about 31 KB. It passes the 40-megapixel limit, but resizing its shorter
//! side to 256 asks for a 256 × 4,096,000,000 image (65 GB): on a decoder without an aspect
//! ratio bound, the allocation aborts the process.

use std::io::Write;
use std::sync::OnceLock;

pub const POISON_WIDTH: u32 = 1;
pub const POISON_HEIGHT: u32 = 16_000_000;

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

/// A valid greyscale (8-bit) PNG of `width` × `height` black pixels, its rows (filter byte 0 +
/// pixels) zlib-compressed into one IDAT, streamed so the raw rows never exist at once.
pub fn black_png(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // depth 8, greyscale, deflate, no filter/interlace
    chunk(&mut out, b"IHDR", &ihdr);
    let row = vec![0u8; 1 + width as usize];
    let rows_per_write = (1 << 20) / row.len() + 1;
    let block = row.repeat(rows_per_write);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let mut left = height as usize;
    while left > 0 {
        let n = left.min(rows_per_write);
        z.write_all(&block[..n * row.len()]).unwrap();
        left -= n;
    }
    let idat = z.finish().unwrap();
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// The poison image (built once per test binary).
pub fn poison_png() -> Vec<u8> {
    static PNG: OnceLock<Vec<u8>> = OnceLock::new();
    PNG.get_or_init(|| black_png(POISON_WIDTH, POISON_HEIGHT))
        .clone()
}

#[test]
fn the_poison_png_is_small_and_declares_16_million_rows() {
    let png = poison_png();
    assert!(png.len() < 64 << 10, "{} bytes", png.len());
    let decoder = image::ImageReader::new(std::io::Cursor::new(&png))
        .with_guessed_format()
        .unwrap()
        .into_dimensions()
        .unwrap();
    assert_eq!(decoder, (POISON_WIDTH, POISON_HEIGHT));
    // A small image of the same construction decodes to what it says.
    let small = image::load_from_memory(&black_png(3, 5))
        .unwrap()
        .to_luma8();
    assert_eq!(small.dimensions(), (3, 5));
    assert!(small.pixels().all(|p| p.0 == [0]));
}
