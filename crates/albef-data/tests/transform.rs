//! Image transforms against Pillow: every op runs on fixed images with fixed parameters here and
//! in `tests/python/pillow_ops.py`, and the outputs are compared pixel by pixel.

use std::path::{Path, PathBuf};
use std::process::Command;

use albef_data::batch::{MEAN, STD, normalize_rgb};
use albef_data::rng::SplitMix64;
use albef_data::transform::{
    FILL, TrainTransform, autocontrast, brightness, decode_rgb, equalize, hflip_in_place, random_resized_crop_params,
    resize_exact, resized_crop, rotate, sharpness, shear_x, shear_y, to_normalized_chw, translate_x, translate_y,
};
use image::{GrayImage, ImageBuffer, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};

fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run make setup", python.display());
    python
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python").join(name)
}

/// Gradients in R and G, shapes, and a constant B channel (autocontrast must leave it alone).
fn shapes() -> RgbImage {
    RgbImage::from_fn(64, 48, |x, y| {
        let (r, g) = if (10..30).contains(&x) && (8..20).contains(&y) {
            (200, 60)
        } else if (x as i32 - 45).pow(2) + (y as i32 - 30).pow(2) <= 100 {
            (20, 220)
        } else {
            (30 + 2 * x as u8, 40 + 3 * y as u8)
        };
        Rgb([r, g, 100])
    })
}

/// Smooth colour waves plus per-pixel noise, like a photo; odd size on purpose.
fn photo(width: u32, height: u32, seed: u64) -> RgbImage {
    let mut rng = SplitMix64::new(seed);
    RgbImage::from_fn(width, height, |x, y| {
        let (xf, yf) = (f64::from(x), f64::from(y));
        Rgb(std::array::from_fn(|c| {
            let phase = c as f64 * 1.3;
            let wave =
                60.0 * (xf * 0.21 + phase).sin() * (yf * 0.17 - phase).cos() + 30.0 * (xf * 0.05 + yf * 0.08).sin();
            let noise = (rng.next_f64() - 0.5) * 50.0;
            (128.0 + wave + noise).clamp(0.0, 255.0) as u8
        }))
    })
}

fn load(path: &Path) -> RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_rgb8()
}

/// (max, mean) absolute difference over all channels.
/// GIF (its first frame) and BMP as Pillow writes them are read by their content.
#[test]
fn gif_and_bmp_are_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let write = "import sys\nfrom PIL import Image\nd = sys.argv[1]\n\
                 red, blue = Image.new('RGB', (8, 6), (255, 0, 0)), Image.new('RGB', (8, 6), (0, 0, 255))\n\
                 red.save(d + '/two_frames.gif', save_all=True, append_images=[blue])\nred.save(d + '/red.bmp')";
    let status = Command::new(python()).args(["-c", write]).arg(dir.path()).status().unwrap();
    assert!(status.success());
    for name in ["two_frames.gif", "red.bmp"] {
        let img = decode_rgb(&std::fs::read(dir.path().join(name)).unwrap(), 1 << 26).unwrap();
        assert_eq!(img.dimensions(), (8, 6), "{name}");
        assert!(img.pixels().all(|p| p.0 == [255, 0, 0]), "{name}: the first frame, red");
    }
}

fn diff(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let d: Vec<u8> = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| x.abs_diff(y)).collect();
    (*d.iter().max().unwrap(), d.iter().map(|&v| f64::from(v)).sum::<f64>() / d.len() as f64)
}

type Op = fn(&RgbImage) -> RgbImage;

#[test]
fn ops_match_pillow() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = [("shapes", shapes()), ("photo", photo(77, 59, 3))];
    for (name, img) in &inputs {
        img.save(dir.path().join(format!("{name}.png"))).unwrap();
    }
    let status = Command::new(python()).arg(script("pillow_ops.py")).arg(dir.path()).status().unwrap();
    assert!(status.success(), "pillow_ops.py failed");

    // Same fixed parameters as pillow_ops.py. Tolerances (max, mean abs diff):
    // - point ops, flip and the bilinear warps replicate Pillow's arithmetic: exact;
    // - bicubic resizes: fast_image_resize rounds its fixed-point weights differently from Pillow,
    //   so a value may be off by one: max <= 1 and mean <= 1.0.
    let ops: [(&str, Op, u8, f64); 13] = [
        ("autocontrast", autocontrast, 0, 0.0),
        ("equalize", equalize, 0, 0.0),
        ("brightness", |i| brightness(i, 1.36), 0, 0.0),
        ("sharpness", |i| sharpness(i, 1.36), 0, 0.0),
        ("shear_x", |i| shear_x(i, 0.21, FILL), 0, 0.0),
        ("shear_y", |i| shear_y(i, -0.21, FILL), 0, 0.0),
        ("translate_x", |i| translate_x(i, 7.0, FILL), 0, 0.0),
        ("translate_y", |i| translate_y(i, -7.0, FILL), 0, 0.0),
        ("rotate", |i| rotate(i, 21.0, FILL), 0, 0.0),
        ("rotate_neg", |i| rotate(i, -21.0, FILL), 0, 0.0),
        (
            "hflip",
            |i| {
                let mut out = i.clone();
                hflip_in_place(&mut out);
                out
            },
            0,
            0.0,
        ),
        ("resize", |i| resize_exact(i, 32), 1, 1.0),
        ("resized_crop", |i| resized_crop(i, (5, 7, 40, 30), 64, 64), 1, 1.0),
    ];
    let mut failures = Vec::new();
    for (name, img) in &inputs {
        for (op, f, max_tol, mean_tol) in ops {
            let pillow = load(&dir.path().join(format!("{name}__{op}.png")));
            let (max, mean) = diff(&f(img), &pillow);
            println!("{name:>6} {op:<13} max abs diff {max:>3}  mean abs diff {mean:.4}");
            if max > max_tol || mean > mean_tol {
                failures.push(format!("{name} {op}: max {max} > {max_tol} or mean {mean:.4} > {mean_tol}"));
            }
        }
    }
    assert!(failures.is_empty(), "ops differ from Pillow:\n{}", failures.join("\n"));
}

fn encode(img: &image::DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

fn reason(bytes: &[u8]) -> &'static str {
    decode_rgb(bytes, 1 << 26).unwrap_err().reason()
}

#[test]
fn bad_bytes_are_rejected_with_a_reason() {
    assert_eq!(reason(b""), "empty");
    assert_eq!(reason(b"<html>this is not an image</html>"), "not_an_image");
    // A recognised signature of a format this build does not decode (TIFF).
    assert_eq!(reason(b"II*\x00\x08\x00\x00\x00\x00\x00"), "not_an_image");

    let png = encode(&photo(64, 48, 1).into(), ImageFormat::Png);
    assert_eq!(reason(&png[..png.len() / 2]), "corrupt_image");
    let mut jpeg = encode(&photo(64, 48, 1).into(), ImageFormat::Jpeg);
    assert_eq!(reason(&jpeg[..40]), "corrupt_image");
    jpeg.truncate(4);
    jpeg.extend_from_slice(&[0x55; 64]);
    assert_eq!(reason(&jpeg), "corrupt_image");
}

/// CRC-32 (IEEE) as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A real 4x4 PNG whose IHDR (and its CRC) is patched to declare `width` x `height`.
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut png = encode(&RgbImage::new(4, 4).into(), ImageFormat::Png);
    // 8-byte signature, then IHDR: length (4), type (4) at 12..16, width and height at 16..24,
    // 5 more bytes of data, CRC over type + data at 29..33.
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[test]
fn decompression_bombs_are_rejected_from_the_header() {
    let err = decode_rgb(&png_declaring(100_000, 100_000), 1 << 26).unwrap_err();
    assert_eq!(err.reason(), "too_many_pixels", "{err}");
    // The pixel data is only 4x4: a decoder that got past the header would report it corrupt,
    // as it does once the limit allows the declared size.
    let bomb = png_declaring(3000, 3000);
    assert_eq!(decode_rgb(&bomb, 1_000_000).unwrap_err().reason(), "too_many_pixels");
    assert_eq!(decode_rgb(&bomb, 10_000_000).unwrap_err().reason(), "corrupt_image");
}

#[test]
fn any_colour_type_decodes_to_rgb8() {
    let gray = GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y) as u8]));
    let rgb = decode_rgb(&encode(&gray.clone().into(), ImageFormat::Png), 1 << 20).unwrap();
    assert_eq!(rgb.dimensions(), (5, 4));
    assert_eq!(rgb.get_pixel(3, 2), &Rgb([122, 122, 122]));

    let rgba = RgbaImage::from_pixel(3, 2, Rgba([10, 20, 30, 40]));
    let rgb = decode_rgb(&encode(&rgba.into(), ImageFormat::Png), 1 << 20).unwrap();
    assert_eq!(rgb.get_pixel(2, 1), &Rgb([10, 20, 30]));

    let deep: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_pixel(2, 2, Rgb([0, 0x8080, 0xffff]));
    let rgb = decode_rgb(&encode(&deep.into(), ImageFormat::Png), 1 << 20).unwrap();
    assert_eq!(rgb.get_pixel(1, 1), &Rgb([0, 128, 255]));

    let rgb = decode_rgb(&encode(&gray.into(), ImageFormat::Jpeg), 1 << 20).unwrap();
    assert_eq!(rgb.dimensions(), (5, 4));
    assert!(rgb.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
}

#[test]
fn random_resized_crop_stays_within_bounds() {
    let (scale, ratio) = ((0.2, 1.0), (3.0 / 4.0, 4.0 / 3.0));
    for (width, height) in [(500, 375), (64, 48), (37, 301), (1000, 20)] {
        let total = f64::from(width * height);
        let mut fallbacks = 0;
        for seed in 0..2000 {
            let (x, y, w, h) = random_resized_crop_params(width, height, scale, ratio, &mut SplitMix64::new(seed));
            assert!(w > 0 && h > 0 && x + w <= width && y + h <= height, "{width}x{height}: {x},{y} {w}x{h}");
            // w and h are rounded, so area and aspect ratio may miss the bounds by half a pixel.
            let (wf, hf) = (f64::from(w), f64::from(h));
            let area_slack = (wf + hf) / 2.0 + 0.25;
            let in_area = wf * hf >= total * scale.0 - area_slack && wf * hf <= total * scale.1 + area_slack;
            let in_ratio = (wf + 0.5) / (hf - 0.5).max(0.5) >= ratio.0 && (wf - 0.5) / (hf + 0.5) <= ratio.1;
            if !(in_area && in_ratio) {
                // The fallback: a centred crop with the aspect ratio clamped into `ratio`.
                assert_eq!((x, y), ((width - w) / 2, (height - h) / 2), "{width}x{height}: {w}x{h}");
                fallbacks += 1;
            }
        }
        println!("{width}x{height}: {fallbacks} fallbacks in 2000");
        if width * 3 <= height * 4 && height * 3 <= width * 4 {
            assert_eq!(fallbacks, 0, "{width}x{height}");
        }
    }
    // A 1000x20 image never fits a 3:4..4:3 crop of 20% of its area: always the fallback,
    // 20 rows high and 4/3 as wide.
    assert_eq!(random_resized_crop_params(1000, 20, scale, ratio, &mut SplitMix64::new(1)), (486, 0, 27, 20));
}

#[test]
fn train_transform_is_sized_and_deterministic() {
    let img = photo(500, 375, 9);
    let t = TrainTransform::default();
    let a = t.apply(&img, &mut SplitMix64::for_item(42, 7));
    assert_eq!(a.dimensions(), (256, 256));
    assert_eq!(a, t.apply(&img, &mut SplitMix64::for_item(42, 7)));
    assert_ne!(a, t.apply(&img, &mut SplitMix64::for_item(42, 8)));
    assert_ne!(a, t.apply(&img, &mut SplitMix64::for_item(43, 7)));

    let small = TrainTransform { res: 32, ..TrainTransform::default() };
    assert_eq!(small.apply(&photo(20, 90, 1), &mut SplitMix64::new(0)).dimensions(), (32, 32));
}

#[test]
fn normalisation_is_chw_with_clip_statistics() {
    let img = RgbImage::from_fn(4, 4, |x, y| Rgb([(x * 60) as u8, (y * 60) as u8, 255]));
    let t = to_normalized_chw(&img);
    assert_eq!(t.len(), 3 * 16);
    // Pixel (x=2, y=1) in channel 0 (R), channel 1 (G) and channel 2 (B).
    let at = |c: usize| t[c * 16 + 4 + 2];
    assert!((at(0) - (120.0 / 255.0 - MEAN[0]) / STD[0]).abs() < 1e-6);
    assert!((at(1) - (60.0 / 255.0 - MEAN[1]) / STD[1]).abs() < 1e-6);
    assert!((at(2) - (1.0 - MEAN[2]) / STD[2]).abs() < 1e-6);

    // Bit for bit what batch::normalize_rgb computes.
    let img = photo(64, 64, 5);
    let mut expected = Vec::new();
    normalize_rgb(img.as_raw(), 64, &mut expected);
    assert_eq!(to_normalized_chw(&img), expected);
}
