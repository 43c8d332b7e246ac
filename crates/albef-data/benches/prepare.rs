//! Images per second on one core of `albef data prepare` (the library's `prepare::prepare`:
//! read, decode, resize, JPEG re-encode, tar, index) against img2dataset's resizer
//! (`tests/python/bench_prepare.py`: its `Resizer`, OpenCV decode, resize and encode) on the
//! same JPEGs with the same settings, for both resize modes.
//!
//! `make bench-data` (installs img2dataset into target/bench-data/venv first), or
//! `IMG2DATASET_PYTHON=path/to/python cargo bench -p albef-data --bench prepare`

use albef_data::prepare::{Input, ResizeMode, Settings, prepare};
use albef_data::synth::photo;
use image::codecs::jpeg::JpegEncoder;
use std::path::{Path, PathBuf};
use std::process::Command;

const FILES: u64 = 64;
const PASSES: u64 = 5;
const SIZE: u32 = 256;
const QUALITY: u8 = 95;

fn write_pairs(dir: &Path) {
    for i in 0..FILES {
        let mut bytes = Vec::new();
        photo(i).write_with_encoder(JpegEncoder::new_with_quality(&mut bytes, 90)).unwrap();
        std::fs::write(dir.join(format!("{i:03}.jpg")), bytes).unwrap();
        std::fs::write(dir.join(format!("{i:03}.txt")), format!("photo number {i}")).unwrap();
    }
}

/// The fastest of PASSES runs into fresh folders, in images per second on one thread.
fn ours(dir: &Path, mode: ResizeMode, rt: &tokio::runtime::Runtime) -> f64 {
    let settings = Settings { image_size: SIZE, resize_mode: mode, quality: QUALITY, rows_per_shard: 1000 };
    let input = Input::Folder(dir.join("pairs").display().to_string());
    (0..=PASSES)
        .map(|pass| {
            let out = dir.join(format!("out-{pass}"));
            let report = prepare(&input, out.to_str().unwrap(), &settings, 1, 1 << 28, rt.handle()).unwrap();
            assert_eq!(report.samples(), FILES);
            std::fs::remove_dir_all(out).unwrap();
            report.rows_prepared as f64 / report.seconds
        })
        .skip(1) // warm-up
        .fold(0.0, f64::max)
}

fn img2dataset(dir: &Path, mode: &str) -> f64 {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = std::env::var_os("IMG2DATASET_PYTHON")
        .map_or_else(|| root.join("target/bench-data/venv/bin/python"), PathBuf::from);
    assert!(python.exists(), "{} is missing: run make bench-data", python.display());
    let out = Command::new(python)
        .arg(root.join("tests/python/bench_prepare.py"))
        .arg(dir.join("pairs"))
        .args(["--image-size", &SIZE.to_string(), "--resize-mode", mode, "--quality", &QUALITY.to_string()])
        .args(["--passes", &PASSES.to_string()])
        // One core; and no check for a newer albumentations over the network.
        .envs([("OMP_NUM_THREADS", "1"), ("OPENBLAS_NUM_THREADS", "1"), ("NO_ALBUMENTATIONS_UPDATE", "1")])
        .output()
        .unwrap();
    assert!(out.status.success(), "bench_prepare.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["img_per_s"].as_f64().unwrap()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pairs")).unwrap();
    write_pairs(&dir.path().join("pairs"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    println!("{FILES} JPEGs 500x375 q90 -> short side {SIZE}, JPEG q{QUALITY}, one thread, best of {PASSES} passes");
    for (mode, name) in [(ResizeMode::KeepRatio, "keep_ratio"), (ResizeMode::CenterCrop, "center_crop")] {
        let (rust, python) = (ours(dir.path(), mode, &rt), img2dataset(dir.path(), name));
        println!(
            "{name:<12} albef data prepare {rust:.1} img/s, img2dataset resizer {python:.1} img/s, ratio {:.2}x",
            rust / python
        );
    }
}
