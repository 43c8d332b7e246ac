//! `albef data prepare` (the library's `prepare::prepare`) on images Pillow wrote: shards the
//! loader reads whole, images resized as img2dataset resizes them (checked with tarfile and
//! Pillow), drops counted under the loader's reasons, and a second run that keeps complete shards.

mod common;

use albef_data::bad::SkipCounts;
use albef_data::index::{DatasetIndex, INDEX_FILE};
use albef_data::loader::InputLimits;
use albef_data::prepare::{Input, PrepareReport, ResizeMode, Settings, prepare};
use albef_data::store::Location;
use common::{load_index, loader_options, synth_tokenizer};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

fn python(args: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run make setup", python.display());
    let out = Command::new(python).arg(root.join("tests/python/prepare_input.py")).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Every sample of the shards as Python's tarfile and Pillow read them (see prepare_input.py).
fn read_back(dir: &Path, out: &Path, size: u32, mode: &str, root: &Path) -> BTreeMap<String, Value> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    shards.sort();
    let json = dir.join(format!("read-{mode}.json"));
    let mut args =
        vec!["read".to_string(), json.display().to_string(), size.to_string(), mode.into(), root.display().to_string()];
    args.extend(shards.iter().map(|p| p.display().to_string()));
    python(&args.iter().map(String::as_str).collect::<Vec<_>>());
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

fn settings(mode: ResizeMode) -> Settings {
    Settings { image_size: 64, resize_mode: mode, quality: 95, rows_per_shard: 3 }
}

fn run(input: &Input, out: &Path, settings: &Settings, rt: &tokio::runtime::Runtime) -> PrepareReport {
    prepare(input, out.to_str().unwrap(), settings, 2, 10_000_000, rt.handle()).unwrap()
}

/// The keys the loader yields over the whole index, and what it skipped.
fn load_all(out: &Path, rt: &tokio::runtime::Runtime) -> (BTreeSet<String>, Arc<SkipCounts>) {
    let loc = Location::open(out.join(INDEX_FILE).to_str().unwrap()).unwrap();
    let index = DatasetIndex::load(&loc, rt.handle()).unwrap();
    // The captions' words are unknown to it: only the keys are compared.
    let loading = (loader_options(InputLimits::default()), synth_tokenizer());
    let (keys, skips) = load_index(index, 1, loading, rt.handle(), Duration::from_secs(120)).unwrap();
    (keys.into_iter().collect(), skips)
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn annotation_rows_become_resized_shards_the_loader_reads_and_a_second_run_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    python(&["write", d.to_str().unwrap()]);
    let rt = runtime();
    let input =
        Input::Annotations { files: vec![d.join("train.json").display().to_string()], image_root: String::new() };
    let out = d.join("shards");
    let report = run(&input, &out, &settings(ResizeMode::KeepRatio), &rt);

    // 8 rows in 3 shards: 7 pictures (the first with two captions: two samples) and the cut JPEG.
    assert_eq!((report.shards.len(), report.kept, report.rows_prepared), (3, 0, 8));
    assert_eq!(report.samples(), 8);
    assert_eq!(report.dropped(), BTreeMap::from([("corrupt_image".to_string(), 1)]));
    assert_eq!(report.shards[1].dropped.len(), 1, "the cut JPEG is row 3, in the second shard");
    assert_eq!(report.train_file, format!("{}/{{000000..000002}}.tar", out.display()));

    let (keys, skips) = load_all(&out, &rt);
    assert_eq!(skips.total(), 0, "{:?}", skips.snapshot());
    let expected: BTreeSet<String> =
        ["000000000_0", "000000000_1", "000000001", "000000002", "000000004", "000000005", "000000006", "000000007"]
            .map(String::from)
            .into();
    assert_eq!(keys, expected, "every sample but the corrupt one's, once");

    // The short side is 64, the ratio kept (albumentations' rounding), the pixels Pillow's BOX
    // (shrinking) or LANCZOS (enlarging) resize of the original within JPEG's noise.
    let samples = read_back(d, &out, 64, "keep_ratio", d);
    assert_eq!(samples.len(), 8);
    for (key, s) in &samples {
        let [w, h] = [0, 1].map(|i| s["original"][i].as_f64().unwrap());
        let scale = 64.0 / w.min(h);
        let want = [(w * scale).round_ties_even(), (h * scale).round_ties_even()];
        assert_eq!([0, 1].map(|i| s["size"][i].as_f64().unwrap()), want, "{key}: {s}");
        assert!(s["mean_abs_diff"].as_f64().unwrap() < 2.5, "{key}: {s}");
    }
    assert_eq!(samples["000000000_1"]["caption"], "a second caption");
    assert_eq!(samples["000000007"]["image_id"], "6", "rows keep their ids (the cut JPEG is row 3)");

    // A second run keeps complete shards; a shard whose tar went missing is written again, the same.
    let [tar0, tar1] = ["000000.tar", "000001.tar"].map(|n| out.join(n));
    let (before0, bytes1) = (modified(&tar0), std::fs::read(&tar1).unwrap());
    std::fs::remove_file(&tar1).unwrap();
    let again = run(&input, &out, &settings(ResizeMode::KeepRatio), &rt);
    assert_eq!((again.kept, again.rows_prepared, again.samples()), (2, 3, 8));
    assert_eq!(again.dropped(), report.dropped(), "kept shards' drops are still counted");
    assert_eq!(modified(&tar0), before0, "a complete shard is not rewritten");
    assert_eq!(std::fs::read(&tar1).unwrap(), bytes1);
    assert_eq!(load_all(&out, &rt).0, expected);

    // Other settings into the same folder would mix two datasets: refused.
    let other = Settings { quality: 80, ..settings(ResizeMode::KeepRatio) };
    let err = format!("{:#}", prepare(&input, out.to_str().unwrap(), &other, 1, 10_000_000, rt.handle()).unwrap_err());
    assert!(err.contains("prepare into another folder"), "{err}");

    // center_crop: the centre square of the same resize.
    let cropped = d.join("cropped");
    run(&input, &cropped, &settings(ResizeMode::CenterCrop), &rt);
    for (key, s) in read_back(d, &cropped, 64, "center_crop", d) {
        assert_eq!(s["size"], serde_json::json!([64, 64]), "{key}");
        assert!(s["mean_abs_diff"].as_f64().unwrap() < 2.5, "{key}: {s}");
    }
}

#[test]
fn a_folder_of_pairs_is_prepared_and_its_strays_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    python(&["write", d.to_str().unwrap()]);
    let rt = runtime();
    let out = d.join("shards");
    let report =
        run(&Input::Folder(d.join("pairs").display().to_string()), &out, &settings(ResizeMode::KeepRatio), &rt);
    assert_eq!(report.samples(), 2);
    let dropped: BTreeMap<String, u64> =
        [("junk_member", 1), ("missing_caption", 1), ("missing_image", 1)].map(|(r, n)| (r.to_string(), n)).into();
    assert_eq!(report.dropped(), dropped);
    let (keys, skips) = load_all(&out, &rt);
    assert_eq!((keys.len(), skips.total()), (2, 0));
    let samples = read_back(d, &out, 64, "keep_ratio", &d.join("pairs"));
    let by_image: BTreeMap<&str, (&Value, &Value)> =
        samples.values().map(|s| (s["image"].as_str().unwrap(), (&s["caption"], &s["size"]))).collect();
    assert_eq!(by_image["a.jpg"], (&"a pair in the folder\n".into(), &serde_json::json!([91, 64])));
    assert_eq!(by_image["sub/b.png"], (&"a pair in a subfolder".into(), &serde_json::json!([64, 91])));
}
