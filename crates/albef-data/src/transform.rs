//! The image side of ALBEF's data pipeline: guarded decoding, the test transform (bicubic resize)
//! and the pretraining transform (RandomResizedCrop, horizontal flip, ALBEF's RandomAugment),
//! then CLIP normalisation.
//!
//! Every op reproduces the Pillow/torchvision operation ALBEF runs on PIL images, down to
//! Pillow's float rounding, so `tests/transform.rs` can compare them pixel for pixel. All
//! randomness comes from a caller-provided [`SplitMix64`], so a sample is the same on any thread.

use std::cell::RefCell;
use std::fmt;
use std::io::Cursor;

use fast_image_resize::images::{CroppedImage, Image, ImageRef};
use fast_image_resize::{FilterType, IntoImageView, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Rgb, RgbImage};

use crate::batch::normalize_rgb;
use crate::rng::SplitMix64;
use albef_config::TrainCrop;

/// Why an encoded image was skipped; [`DecodeError::reason`] is a stable label for skip counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// No bytes, or a header declaring a zero-sized image.
    Empty,
    /// The bytes are not in a format this build can decode.
    NotAnImage,
    /// A known format whose header or data does not decode.
    Corrupt(String),
    /// The header declares more pixels than allowed (a decompression bomb, or just too big).
    TooManyPixels { width: u32, height: u32, max_pixels: u64 },
    /// Decoded, the image would take more bytes than the memory budget lets a decoder hold.
    OverBudget { bytes: u64, budget: u64 },
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::NotAnImage => "not_an_image",
            DecodeError::Corrupt(_) => "corrupt_image",
            DecodeError::TooManyPixels { .. } => "too_many_pixels",
            DecodeError::OverBudget { .. } => "over_budget",
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty image"),
            DecodeError::NotAnImage => write!(f, "not an image in a supported format"),
            DecodeError::Corrupt(e) => write!(f, "corrupt image: {e}"),
            DecodeError::TooManyPixels { width, height, max_pixels } => {
                write!(f, "image of {width}x{height} exceeds {max_pixels} pixels")
            }
            DecodeError::OverBudget { bytes, budget } => {
                write!(f, "decoding takes {bytes} bytes, over the {budget} of data.memory_budget_mb for pixels")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes any supported format to 8-bit RGB. The header is read first and images over
/// `max_pixels` are refused before any pixel buffer is allocated.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    decode_rgb_reserving(bytes, max_pixels, |_| Ok(())).map(|(img, ())| img)
}

/// [`decode_rgb`], calling `reserve` with the bytes decoding will allocate (the decoder's pixels,
/// and the RGB copy where they are not RGB already) once the header is read and before any is;
/// what it returns (a memory grant) comes back with the image, its error instead of one.
pub fn decode_rgb_reserving<G>(
    bytes: &[u8],
    max_pixels: u64,
    reserve: impl FnOnce(u64) -> Result<G, DecodeError>,
) -> Result<(RgbImage, G), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if reader.format().is_none() {
        return Err(DecodeError::NotAnImage);
    }
    // A recognised signature of a format compiled out (GIF, TIFF, ...) is as unreadable as noise.
    let decoder = reader.into_decoder().map_err(|e| match e {
        ImageError::Unsupported(_) => DecodeError::NotAnImage,
        e => DecodeError::Corrupt(e.to_string()),
    })?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(DecodeError::Empty);
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(DecodeError::TooManyPixels { width, height, max_pixels });
    }
    let rgb_copy = if decoder.color_type() == image::ColorType::Rgb8 { 0 } else { pixels * 3 };
    let grant = reserve(decoder.total_bytes().saturating_add(rgb_copy))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| match e {
        ImageError::Limits(_) => DecodeError::TooManyPixels { width, height, max_pixels },
        e => DecodeError::Corrupt(e.to_string()),
    })?;
    // into_rgb8 reuses the buffer when the image already is RGB8 (the common JPEG case).
    Ok((img.into_rgb8(), grant))
}

/// Whether `bytes` are a JPEG whose data ends before its end-of-image marker (a cut download).
/// The decoder fills what is missing with grey (128), as Pillow does with the reference's
/// `ImageFile.LOAD_TRUNCATED_IMAGES`; this tells such images apart so that they are counted.
/// Only a cut after a scan's header counts (one in the tables is corrupt: nothing decodes).
/// Walks the markers: segments by their length, entropy-coded data to the next marker (0xFF
/// followed by neither a stuffed 0x00 nor a restart marker).
pub fn is_truncated_jpeg(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let (mut at, mut in_scan) = (2, false);
    loop {
        // Fill bytes (0xFF) may precede a marker.
        while bytes.get(at) == Some(&0xFF) && bytes.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (bytes.get(at), bytes.get(at + 1)) else {
            // Cut here; or no marker where one belongs: corrupt, which the decoder reports.
            return in_scan && at + 1 >= bytes.len();
        };
        at += 2;
        match marker {
            0xD9 => return false,
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let Some(len) = bytes.get(at..at + 2).map(|l| usize::from(u16::from_be_bytes([l[0], l[1]]))) else {
            return in_scan;
        };
        at += len;
        if marker == 0xDA && at <= bytes.len() {
            in_scan = true;
            // The scan's data runs to the next marker that is not a restart.
            let next = bytes.get(at..).and_then(|data| {
                data.windows(2).position(|w| w[0] == 0xFF && w[1] != 0 && !(0xD0..=0xD7).contains(&w[1]))
            });
            match next {
                Some(i) => at += i,
                None => return true,
            }
        }
    }
}

thread_local! {
    // The resizer keeps scratch buffers; one per thread avoids reallocating them per image.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// torchvision's `F.resized_crop` on a PIL image: crop the box `(x, y, w, h)`, then Pillow
/// BICUBIC resize to `width` x `height`. The crop is a view, so the filter clamps at the box
/// edges exactly as resizing the cropped copy does.
pub fn resized_crop(img: &RgbImage, crop: (u32, u32, u32, u32), width: u32, height: u32) -> RgbImage {
    let (x, y, w, h) = crop;
    let src = ImageRef::new(img.width(), img.height(), img.as_raw(), PixelType::U8x3).expect("RgbImage buffer");
    let view = CroppedImage::new(&src, x, y, w, h).expect("crop box inside the image");
    // Catmull-Rom is the a = -0.5 cubic of Pillow's BICUBIC, with the same support scaling.
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    resize_view(&view, width, height, &options)
}

/// Resizes an RGB image, or a view of one, to `width` x `height` as `options` say (filter,
/// source box), with this thread's resizer.
pub fn resize_view(src: &impl IntoImageView, width: u32, height: u32, options: &ResizeOptions) -> RgbImage {
    let mut dst = Image::new(width, height, PixelType::U8x3);
    RESIZER.with_borrow_mut(|r| r.resize(src, &mut dst, options)).expect("U8x3 to U8x3 resize");
    RgbImage::from_raw(width, height, dst.into_vec()).expect("resizer output is width*height*3")
}

/// The test transform: bicubic resize of the whole image to `res` x `res`.
pub fn resize_exact(img: &RgbImage, res: u32) -> RgbImage {
    resized_crop(img, (0, 0, img.width(), img.height()), res, res)
}

/// torchvision's `RandomResizedCrop.get_params`, drawing from `rng`: returns `(x, y, w, h)`.
pub fn random_resized_crop_params(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut SplitMix64,
) -> (u32, u32, u32, u32) {
    let area = f64::from(width) * f64::from(height);
    let log_ratio = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale);
        let aspect = uniform(rng, log_ratio).exp();
        // Python's round() rounds half to even.
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if 0.0 < w && w <= f64::from(width) && 0.0 < h && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            // torchvision draws the row before the column.
            let y = rng.below((height - h + 1) as usize) as u32;
            let x = rng.below((width - w + 1) as usize) as u32;
            return (x, y, w, h);
        }
    }
    // Fallback: the largest centred crop whose aspect ratio is clamped into `ratio`.
    let in_ratio = f64::from(width) / f64::from(height);
    let (lo, hi) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (w, h) = if in_ratio < lo {
        (width, (f64::from(width) / lo).round_ties_even() as u32)
    } else if in_ratio > hi {
        ((f64::from(height) * hi).round_ties_even() as u32, height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

fn uniform(rng: &mut SplitMix64, (lo, hi): (f64, f64)) -> f64 {
    lo + (hi - lo) * rng.next_f64()
}

/// Pillow's `transpose(FLIP_LEFT_RIGHT)`, in place.
pub fn hflip_in_place(img: &mut RgbImage) {
    image::imageops::flip_horizontal_in_place(img);
}

/// Grey fill of ALBEF's geometric augmentations (`replace_value = (128, 128, 128)`).
pub const FILL: Rgb<u8> = Rgb([128, 128, 128]);

fn histograms(img: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for px in img.as_raw().chunks_exact(3) {
        for c in 0..3 {
            h[c][px[c] as usize] += 1;
        }
    }
    h
}

fn apply_luts(img: &RgbImage, luts: &[[u8; 256]; 3]) -> RgbImage {
    let mut out = img.clone();
    for px in out.chunks_exact_mut(3) {
        for c in 0..3 {
            px[c] = luts[c][px[c] as usize];
        }
    }
    out
}

const IDENTITY_LUT: [u8; 256] = {
    let mut lut = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        lut[i] = i as u8;
        i += 1;
    }
    lut
};

/// Pillow's `ImageOps.autocontrast` (cutoff 0): each channel's min..max stretched to 0..255;
/// a channel with a single value is left as is.
pub fn autocontrast(img: &RgbImage) -> RgbImage {
    let luts = histograms(img).map(|h| {
        let lo = h.iter().position(|&n| n > 0);
        let hi = h.iter().rposition(|&n| n > 0);
        match (lo, hi) {
            (Some(lo), Some(hi)) if hi > lo => {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                // `as u8` truncates toward zero and saturates, like Pillow's int() then clip.
                std::array::from_fn(|i| (i as f64 * scale + offset) as u8)
            }
            _ => IDENTITY_LUT,
        }
    });
    apply_luts(img, &luts)
}

/// Pillow's `ImageOps.equalize`: per-channel lookup table from the cumulative histogram.
pub fn equalize(img: &RgbImage) -> RgbImage {
    let luts = histograms(img).map(|h| {
        let last = h.iter().rposition(|&n| n > 0).map_or(0, |i| h[i]);
        let total: u64 = h.iter().sum();
        let step = (total - last) / 255;
        // One distinct value (all pixels in the last bin) also gives step 0.
        if step == 0 {
            return IDENTITY_LUT;
        }
        let mut n = step / 2;
        std::array::from_fn(|i| {
            let v = (n / step).min(255) as u8;
            n += h[i];
            v
        })
    });
    apply_luts(img, &luts)
}

/// Pillow's `Image.blend(a, b, alpha)`: `a + alpha * (b - a)` in f32, truncated (and clipped
/// when extrapolating).
fn blend(a: &[u8], b: &[u8], alpha: f32, out: &mut [u8]) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        let v = a as f32 + alpha * (b as i32 - a as i32) as f32;
        // `as u8` truncates and saturates: Pillow's clip-then-truncate for extrapolation, and a
        // no-op clip for interpolation, whose result is always in range.
        *o = v as u8;
    }
}

/// Pillow's `ImageEnhance.Brightness(img).enhance(factor)`: a blend with black.
pub fn brightness(img: &RgbImage, factor: f64) -> RgbImage {
    // Each output byte depends on its input byte only: blend the 256 values once into a table.
    let mut lut = [0u8; 256];
    blend(&[0; 256], &IDENTITY_LUT, factor as f32, &mut lut);
    apply_luts(img, &[lut; 3])
}

/// Pillow's `ImageEnhance.Sharpness(img).enhance(factor)`: a blend with the image smoothed by
/// `ImageFilter.SMOOTH` ([[1,1,1],[1,5,1],[1,1,1]] / 13, border pixels copied unchanged).
pub fn sharpness(img: &RgbImage, factor: f64) -> RgbImage {
    let mut out = img.clone();
    blend(&smooth(img), img.as_raw(), factor as f32, &mut out);
    out
}

/// Pillow's 3x3 `ImagingFilter3x3` for SMOOTH, with its f32 kernel, summation order and +0.5
/// rounding bias, so results match bit for bit.
fn smooth(img: &RgbImage) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let mut out = src.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let (k1, k5) = (1.0f32 / 13.0, 5.0f32 / 13.0);
    let stride = w * 3;
    // Interior samples of a row; their left and right neighbours are 3 bytes away.
    let n = stride - 6;
    fn taps(row: &[u8], n: usize) -> [&[u8]; 3] {
        [&row[..n], &row[3..n + 3], &row[6..n + 6]]
    }
    for y in 1..h - 1 {
        // Pillow adds the row below first, then the centre row, then the row above.
        let below = taps(&src[(y + 1) * stride..(y + 2) * stride], n);
        let centre = taps(&src[y * stride..(y + 1) * stride], n);
        let above = taps(&src[(y - 1) * stride..y * stride], n);
        let out_row = &mut out[y * stride + 3..y * stride + 3 + n];
        // Slices of equal length n let the compiler drop the bounds checks.
        for i in 0..n {
            let line = |r: [&[u8]; 3], k: f32| r[0][i] as f32 * k1 + r[1][i] as f32 * k + r[2][i] as f32 * k1;
            let mut ss = 0.5f32;
            ss += line(below, k1);
            ss += line(centre, k5);
            ss += line(above, k1);
            out_row[i] = ss as u8;
        }
    }
    out
}

/// One axis of Pillow's bilinear sample (`BILINEAR_HEAD` in Geometry.c): the two neighbouring
/// indices, clamped to the image, and the weight of the second.
#[derive(Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    d: f64,
}

/// `None` outside `[0, size)`, where Pillow keeps the fill. Written so that NaN is outside too.
fn tap(coord: f64, size: usize) -> Option<Tap> {
    if !(coord >= 0.0 && coord < size as f64) {
        return None;
    }
    let s = coord - 0.5;
    // s >= -0.5: floor is truncation, minus one on [-0.5, 0).
    let i = s as isize - isize::from(s < 0.0);
    // Clamping the taps also covers Pillow's reuse of the top row when the one below is outside.
    Some(Tap { i0: i.max(0) as usize, i1: (i + 1).min(size as isize - 1) as usize, d: s - i as f64 })
}

/// Pillow's `Image.transform(size, AFFINE, coeffs, BILINEAR, fillcolor=fill)`: `coeffs` map an
/// output pixel centre to input coordinates; samples outside the image get `fill`.
pub fn affine(img: &RgbImage, coeffs: [f64; 6], fill: Rgb<u8>) -> RgbImage {
    let [a0, a1, a2, a3, a4, a5] = coeffs;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let stride = w * 3;
    let src = img.as_raw();
    let mut out = RgbImage::from_pixel(img.width(), img.height(), fill);
    // Products hoisted out of the loops; each coordinate is still Pillow's `a0*x + a1*y + a2`,
    // evaluated in the same order, so it is the same double.
    let (col_x, col_y): (Vec<f64>, Vec<f64>) = (0..w).map(|x| (a0 * (x as f64 + 0.5), a3 * (x as f64 + 0.5))).unzip();
    // When a1 == 0, a1 * y is zero for every y and x taps depend on the column only (shear_y,
    // translate_y); when a3 == 0, y taps depend on the row only (shear_x, translate_x).
    let col_taps: Option<Vec<Option<Tap>>> =
        (a1 == 0.0).then(|| col_x.iter().map(|&cx| tap(cx + a1 * 0.5 + a2, w)).collect());
    for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (row_x, row_y) = (a1 * (y as f64 + 0.5), a4 * (y as f64 + 0.5));
        let row_tap = (a3 == 0.0).then(|| tap(a3 * 0.5 + row_y + a5, h));
        for (x, px) in out_row.chunks_exact_mut(3).enumerate() {
            let tx = col_taps.as_ref().map_or_else(|| tap(col_x[x] + row_x + a2, w), |t| t[x]);
            let ty = row_tap.unwrap_or_else(|| tap(col_y[x] + row_y + a5, h));
            let (Some(tx), Some(ty)) = (tx, ty) else { continue };
            let (x0, x1) = (tx.i0 * 3, tx.i1 * 3);
            let (top, bottom) = (&src[ty.i0 * stride..][..stride], &src[ty.i1 * stride..][..stride]);
            // Pillow's lerp a + (b - a) * d is exactly a when d == 0: integer translations are
            // copies, and shears need one lerp per channel.
            if tx.d == 0.0 && ty.d == 0.0 {
                px.copy_from_slice(&top[x0..x0 + 3]);
                continue;
            }
            let lerp = |a: u8, b: u8, d: f64| if d == 0.0 { a as f64 } else { a as f64 + (b as f64 - a as f64) * d };
            for c in 0..3 {
                let v1 = lerp(top[x0 + c], top[x1 + c], tx.d);
                let v2 = if ty.d == 0.0 { v1 } else { lerp(bottom[x0 + c], bottom[x1 + c], tx.d) };
                px[c] = (v1 + (v2 - v1) * ty.d) as u8;
            }
        }
    }
    out
}

/// `Image.transform` with `(1, factor, 0, 0, 1, 0)`: input x = x + factor * y.
pub fn shear_x(img: &RgbImage, factor: f64, fill: Rgb<u8>) -> RgbImage {
    affine(img, [1.0, factor, 0.0, 0.0, 1.0, 0.0], fill)
}

/// `Image.transform` with `(1, 0, 0, factor, 1, 0)`: input y = factor * x + y.
pub fn shear_y(img: &RgbImage, factor: f64, fill: Rgb<u8>) -> RgbImage {
    affine(img, [1.0, 0.0, 0.0, factor, 1.0, 0.0], fill)
}

/// `Image.transform` with `(1, 0, pixels, 0, 1, 0)`: positive `pixels` moves content left.
pub fn translate_x(img: &RgbImage, pixels: f64, fill: Rgb<u8>) -> RgbImage {
    affine(img, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], fill)
}

/// `Image.transform` with `(1, 0, 0, 0, 1, pixels)`: positive `pixels` moves content up.
pub fn translate_y(img: &RgbImage, pixels: f64, fill: Rgb<u8>) -> RgbImage {
    affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], fill)
}

/// Pillow's `Image.rotate(degrees, BILINEAR, fillcolor=fill)`: counter-clockwise about the
/// centre, same size; the matrix is built exactly as Pillow builds it.
pub fn rotate(img: &RgbImage, degrees: f64, fill: Rgb<u8>) -> RgbImage {
    let (cx, cy) = (f64::from(img.width()) / 2.0, f64::from(img.height()) / 2.0);
    let angle = -degrees.rem_euclid(360.0).to_radians();
    // Pillow rounds to 15 decimals so that multiples of 90 degrees give exact 0 and 1.
    let round15 = |v: f64| (v * 1e15).round() / 1e15;
    let (cos, sin) = (round15(angle.cos()), round15(angle.sin()));
    let (a, b, d, e) = (cos, sin, round15(-angle.sin()), cos);
    let c = a * -cx + b * -cy + cx;
    let f = d * -cx + e * -cy + cy;
    affine(img, [a, b, c, d, e, f], fill)
}

/// The ops of ALBEF's pretraining `RandomAugment(2, 7, isPIL=True, augs=[...])`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AugOp {
    Identity,
    AutoContrast,
    Equalize,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
}

/// ALBEF's `augs` list, in its order (np.random.choice draws an index into it).
pub const ALBEF_AUGS: [AugOp; 10] = [
    AugOp::Identity,
    AugOp::AutoContrast,
    AugOp::Equalize,
    AugOp::Brightness,
    AugOp::Sharpness,
    AugOp::ShearX,
    AugOp::ShearY,
    AugOp::TranslateX,
    AugOp::TranslateY,
    AugOp::Rotate,
];

/// ALBEF's `MAX_LEVEL` and `translate_const`.
const MAX_LEVEL: f64 = 10.0;
const TRANSLATE_CONST: f64 = 10.0;

impl AugOp {
    /// Applies the op at `magnitude` (0..=10), drawing the sign of geometric ops from `rng` the
    /// way ALBEF's `*_level_to_args` do.
    pub fn apply(self, img: &RgbImage, magnitude: u32, rng: &mut SplitMix64) -> RgbImage {
        let level = f64::from(magnitude) / MAX_LEVEL;
        let mut sign = |negate: fn(f64) -> bool| if negate(rng.next_f64()) { -1.0 } else { 1.0 };
        // ALBEF negates shear and translate when random() > 0.5, rotation when random() < 0.5.
        match self {
            AugOp::Identity => img.clone(),
            AugOp::AutoContrast => autocontrast(img),
            AugOp::Equalize => equalize(img),
            AugOp::Brightness => brightness(img, level * 1.8 + 0.1),
            AugOp::Sharpness => sharpness(img, level * 1.8 + 0.1),
            AugOp::ShearX => shear_x(img, sign(|r| r > 0.5) * level * 0.3, FILL),
            AugOp::ShearY => shear_y(img, sign(|r| r > 0.5) * level * 0.3, FILL),
            AugOp::TranslateX => translate_x(img, sign(|r| r > 0.5) * level * TRANSLATE_CONST, FILL),
            AugOp::TranslateY => translate_y(img, sign(|r| r > 0.5) * level * TRANSLATE_CONST, FILL),
            AugOp::Rotate => rotate(img, sign(|r| r < 0.5) * level * 30.0, FILL),
        }
    }
}

/// ALBEF's pretraining transform, up to (not including) ToTensor/Normalize.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainTransform {
    pub res: u32,
    pub crop: TrainCrop,
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
    pub hflip_p: f64,
    pub randaug_n: usize,
    pub randaug_m: u32,
    pub randaug_p: f64,
}

impl Default for TrainTransform {
    fn default() -> Self {
        TrainTransform {
            res: 256,
            crop: TrainCrop::RandomResizedCrop,
            scale: (0.2, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip_p: 0.5,
            randaug_n: 2,
            randaug_m: 7,
            randaug_p: 0.5,
        }
    }
}

impl TrainTransform {
    /// RandomResizedCrop (bicubic; or a resize of the whole image), RandomHorizontalFlip,
    /// RandomAugment, in ALBEF's order.
    pub fn apply(&self, img: &RgbImage, rng: &mut SplitMix64) -> RgbImage {
        let mut out = match self.crop {
            TrainCrop::RandomResizedCrop => {
                let crop = random_resized_crop_params(img.width(), img.height(), self.scale, self.ratio, rng);
                resized_crop(img, crop, self.res, self.res)
            }
            TrainCrop::Resize => resize_exact(img, self.res),
        };
        if rng.next_f64() < self.hflip_p {
            hflip_in_place(&mut out);
        }
        // ALBEF picks all N ops first (with replacement), then flips a coin per op.
        let ops: Vec<AugOp> = (0..self.randaug_n).map(|_| *rng.pick(&ALBEF_AUGS)).collect();
        for op in ops {
            if rng.next_f64() > self.randaug_p {
                continue;
            }
            out = op.apply(&out, self.randaug_m, rng);
        }
        out
    }
}

/// ToTensor + Normalize: HWC u8 -> CHW f32 with the CLIP mean and std.
pub fn to_normalized_chw(img: &RgbImage) -> Vec<f32> {
    // `normalize_rgb` of a 16x16 image holding the 256 byte values is a per-channel table; a
    // lookup gives the same floats without a division per element.
    let ramp: Vec<u8> = (0..=255u8).flat_map(|v| [v; 3]).collect();
    let mut table = Vec::with_capacity(3 * 256);
    normalize_rgb(&ramp, 16, &mut table);
    let plane = img.as_raw().len() / 3;
    let mut out = vec![0.0; 3 * plane];
    for ((c, lut), out) in table.chunks_exact(256).enumerate().zip(out.chunks_exact_mut(plane)) {
        for (o, px) in out.iter_mut().zip(img.as_raw().chunks_exact(3)) {
            *o = lut[px[c] as usize];
        }
    }
    out
}
