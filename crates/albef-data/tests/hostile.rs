//! Hostile inputs written by independent producers (Python's tarfile, Pillow): each is read to
//! its end with the exact counts by reason, nothing mixed up.

use albef_config::TruncatedImages;
use albef_data::bad::{SkipCounts, SkipReason};
use albef_data::index::DatasetIndex;
use albef_data::loader::{InputLimits, LoaderOptions};
use albef_data::prepare::{Input, ResizeMode, Settings, prepare};
use albef_data::sources::{TarOptions, read_tar_samples, scan_tar};
mod common;

use common::{load_index, loader_options, synth_tokenizer};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn python(script: &str, args: &[&str]) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run make setup", python.display());
    let out = std::process::Command::new(python).arg(root.join("tests/python").join(script)).args(args).output();
    let out = out.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The keys delivered from `tar` read whole (the range its own scan gives), and the skips.
fn read_shard(tar: &[u8]) -> (Vec<String>, SkipCounts) {
    let (skips, mut keys) = (SkipCounts::default(), vec![]);
    let samples = scan_tar(tar).samples;
    let scan = read_tar_samples(tar, "s.tar", 0, 0..samples, &TarOptions::default(), &skips, |_, r| keys.push(r.key));
    assert!(scan.error.is_none(), "{scan:?}");
    (keys, skips)
}

fn long_header_shards(dir: &Path, name_bytes: u64) -> (PathBuf, serde_json::Value) {
    let expect = python("make_long_header_shards.py", &[dir.to_str().unwrap(), &name_bytes.to_string()]);
    (dir.to_path_buf(), expect)
}

/// A GNU long name and a PAX path of 1 MB, and a PAX comment of 1 MB: each such sample is
/// skipped as oversized_header, read no further than the bound, and the rest of the shard is
/// read, names over 100 bytes and non-ASCII PAX paths included; a read starting at any indexed
/// offset sees the same sample.
#[test]
fn huge_tar_header_extensions_are_bounded_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, expect) = long_header_shards(tmp.path(), 1 << 20);
    for (file, oversized, missing_image) in [("gnu.tar", 1, 0), ("pax.tar", 2, 1)] {
        let tar = std::fs::read(dir.join(file)).unwrap();
        let (keys, skips) = read_shard(&tar);
        let want: Vec<&str> = expect[file].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
        assert_eq!(keys, want, "{file}");
        assert_eq!(skips.get(SkipReason::OversizedHeader), oversized, "{file}: {}", skips.summary());
        assert_eq!(skips.get(SkipReason::MissingImage), missing_image, "{file}: {}", skips.summary());
        assert_eq!(skips.total(), oversized + missing_image, "{file}: {}", skips.summary());
        let examples = skips.examples();
        let example = examples.iter().find(|e| e.reason == "oversized_header").unwrap();
        assert!(example.key.len() < 300 && example.detail.contains("bytes (at most"), "{example:?}");
        let scan = scan_tar(&tar[..]);
        for (ordinal, &offset) in scan.offsets.iter().enumerate() {
            let (skips, mut first) = (SkipCounts::default(), None);
            let ordinal = ordinal as u64;
            let range = ordinal..ordinal + 1;
            read_tar_samples(&tar[offset as usize..], "s", ordinal, range, &TarOptions::default(), &skips, |_, r| {
                first = Some(r.key)
            });
            assert!(first.is_none_or(|k| want.contains(&k.as_str())), "{file} #{ordinal}");
            assert_eq!(skips.get(SkipReason::TruncatedShard), 0, "{file} #{ordinal}");
        }
    }
}

/// The rows a loader of the whole of `source` delivers within a deadline, and what it counted.
fn load_within_deadline(source: &Path, opts: LoaderOptions) -> (u64, Arc<SkipCounts>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let index = DatasetIndex::build(&[source.to_str().unwrap().to_string()], rt.handle(), &SkipCounts::default());
    let loading = (opts, synth_tokenizer());
    let loaded = load_index(index.unwrap(), 1, loading, rt.handle(), Duration::from_secs(120));
    rt.shutdown_background();
    let (keys, skips) = loaded.unwrap_or_else(|why| panic!("{why}"));
    (keys.len() as u64, skips)
}

/// A JPEG cut inside its scan data (Pillow wrote it whole): decoded with the rows past the cut
/// grey, as Pillow with the reference's LOAD_TRUNCATED_IMAGES decodes them (the same rows, to
/// within one 16-row band of blocks), and counted as truncated_image; trained by default,
/// skipped with `data.truncated_images: skip`. A whole JPEG is not counted.
/// In a child process each (under a budget of 64 MiB): peak RSS under the budget and its own.
#[test]
fn a_truncated_jpeg_is_trained_grey_or_skipped_and_counted() {
    if let Ok(arg) = std::env::var(CHILD) {
        let (setting, dir) = arg.split_once(':').unwrap();
        let truncated_images = if setting == "skip" { TruncatedImages::Skip } else { TruncatedImages::Train };
        let limits = InputLimits { truncated_images, memory_budget: BUDGET, ..InputLimits::default() };
        return report_load(&Path::new(dir).join("ann.json"), loader_options(limits));
    }
    let tmp = tempfile::tempdir().unwrap();
    let pillow = python("make_truncated_jpeg.py", &[tmp.path().to_str().unwrap()]);
    let cut = std::fs::read(tmp.path().join("cut.jpg")).unwrap();
    let whole = std::fs::read(tmp.path().join("whole.jpg")).unwrap();
    assert!(albef_data::transform::is_truncated_jpeg(&cut));
    assert!(!albef_data::transform::is_truncated_jpeg(&whole));
    let img = albef_data::transform::decode_rgb(&cut, 1 << 20).unwrap();
    assert_eq!(u64::from(img.height()), pillow["height"].as_u64().unwrap());
    let row_is_grey = |y: u32| (0..img.width()).all(|x| img.get_pixel(x, y).0 == [128, 128, 128]);
    let grey_from = (0..img.height()).find(|&y| (y..img.height()).all(row_is_grey)).unwrap();
    let pillow_grey_from = pillow["grey_from"].as_u64().unwrap() as i64;
    assert!((i64::from(grey_from) - pillow_grey_from).abs() <= 16, "ours {grey_from}, Pillow {pillow_grey_from}");
    assert!(grey_from > 16, "the rows before the cut are decoded");

    let name = "a_truncated_jpeg_is_trained_grey_or_skipped_and_counted";
    for (setting, delivered) in [("train", 2), ("skip", 1)] {
        let arg = format!("{setting}:{}", tmp.path().display());
        check_child(name, &arg, delivered, serde_json::json!({"truncated_image": 1}), BUDGET + OWN);
    }
}

/// Set in the child process a peak-RSS test runs its loader in.
const CHILD: &str = "ALBEF_HOSTILE_CHILD";

/// Runs the test `name` of this binary in a child process (which sees [`CHILD`] = `arg`), within
/// a deadline; what it printed after "RESULT ".
fn in_child(name: &str, arg: &str) -> serde_json::Value {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, arg)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{name} did not end within 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
    let line = out.lines().find_map(|l| l.split_once("RESULT ").map(|(_, r)| r)).unwrap_or_else(|| panic!("{out}"));
    serde_json::from_str(line).unwrap()
}

/// The child's side: loads `source` and prints the rows, the counts and its peak RSS (VmHWM).
fn report_load(source: &Path, opts: LoaderOptions) {
    let (delivered, skips) = load_within_deadline(source, opts);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap();
    let hwm_kb: u64 = hwm.trim().trim_end_matches("kB").trim().parse().unwrap();
    let report = serde_json::json!({"delivered": delivered, "skips": skips.snapshot(), "peak_rss": hwm_kb << 10});
    println!("RESULT {report}");
}

/// Runs the test `name` in a child on `arg`: asserts the rows it delivered, its counts by
/// reason, and a peak RSS under `limit`.
fn check_child(name: &str, arg: &str, delivered: u64, skips: serde_json::Value, limit: u64) {
    let got = in_child(name, arg);
    assert_eq!(got["delivered"], delivered, "{got}");
    assert_eq!(got["skips"], skips, "{got}");
    let peak = got["peak_rss"].as_u64().unwrap();
    eprintln!("{name}: peak RSS {} MiB, at most {} MiB", peak / MIB, limit / MIB);
    assert!(peak < limit, "{name}: peak RSS {} MiB, over {} MiB", peak / MIB, limit / MIB);
}

const MIB: u64 = 1 << 20;
/// The loader's budget (`data.memory_budget_mb`) in the peak-RSS tests.
const BUDGET: u64 = 64 * MIB;
/// What a child process holds besides the loader's budget whatever its input: the test
/// harness, the runtime, the tokenizer, the allocator's arenas.
const OWN: u64 = 40 * MIB;

/// `kind`'s inputs, written by make_hostile_inputs.py into a temporary folder.
fn hostile_inputs(kind: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tests/python/make_hostile_inputs.py"))
        .args([kind, tmp.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tmp
}

/// The loader's options in the peak-RSS tests: the budget of [`BUDGET`], the rest defaults.
fn budgeted() -> LoaderOptions {
    loader_options(InputLimits { memory_budget: BUDGET, ..InputLimits::default() })
}

/// 24 samples of 8 MiB members (under the member limit; zeros, so each is then counted
/// not_an_image) fill a window of 64 against a budget of 64 MiB, and one 40 MiB sample is more
/// than a sample may hold (a quarter): peak RSS stays under the budget plus the one member being
/// read (48 MiB at most) and the process's own 40 MiB; it took 230 MiB of window before.
#[test]
fn large_members_filling_the_window_stay_within_the_budget() {
    const MAX_MEMBER: u64 = 48 * MIB;
    let limits = InputLimits { memory_budget: BUDGET, ..InputLimits::default() };
    let opts = LoaderOptions {
        tar: TarOptions { max_member_bytes: MAX_MEMBER, ..TarOptions::default() },
        ..loader_options(limits)
    };
    if let Ok(tar) = std::env::var(CHILD) {
        return report_load(Path::new(&tar), opts);
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("big.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut member = |name: String, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_mode(0o644);
        tar.append_data(&mut h, name, std::io::repeat(0).take(size)).unwrap();
    };
    for i in 0..24 {
        member(format!("{i:03}.jpg"), 8 * MIB);
        member(format!("{i:03}.txt"), 12);
    }
    member("huge.jpg".into(), 40 * MIB);
    member("huge.txt".into(), 12);
    tar.finish().unwrap();
    drop(tar);
    let name = "large_members_filling_the_window_stay_within_the_budget";
    let skips = serde_json::json!({"not_an_image": 24, "over_budget": 1});
    check_child(name, path.to_str().unwrap(), 0, skips, BUDGET + MAX_MEMBER + OWN);
}

/// An annotation naming a 512 MiB image (a sparse file of zeros) beside a small one: refused by
/// its size before a byte of it is read (`data.max_member_mb`, 64), counted oversized_member; it
/// was read whole and decoded before.
#[test]
fn a_512_mib_annotation_image_is_refused_by_its_size() {
    if let Ok(dir) = std::env::var(CHILD) {
        return report_load(&Path::new(&dir).join("ann.json"), budgeted());
    }
    let tmp = hostile_inputs("big_image");
    let name = "a_512_mib_annotation_image_is_refused_by_its_size";
    check_child(name, tmp.path().to_str().unwrap(), 1, serde_json::json!({"oversized_member": 1}), BUDGET + OWN);
}

/// Captions of 10 MiB without a space, ASCII and CJK (tar members under the member limit), are
/// cut in bytes before tokenization and trained: peak RSS within the budget, the one caption
/// being read and the process's own (10 MB reached the tokenizer before: 1.3 GB).
#[test]
fn captions_of_10_mib_without_spaces_are_cut_before_tokenization() {
    if let Ok(dir) = std::env::var(CHILD) {
        return report_load(&Path::new(&dir).join("captions.tar"), budgeted());
    }
    let tmp = hostile_inputs("captions");
    let name = "captions_of_10_mib_without_spaces_are_cut_before_tokenization";
    check_child(name, tmp.path().to_str().unwrap(), 3, serde_json::json!({}), BUDGET + 10 * MIB + OWN);
}

/// A GNU long name and a PAX header of 256 MiB each (their bodies sparse): each image is
/// counted oversized_header and its caption, under a name of its own, missing_image; the
/// samples around them are trained; the extensions are passed over, never held (a 256 MB name
/// cost 1 GB in the reader before).
#[test]
fn huge_tar_header_extensions_stay_within_the_budget() {
    if let Ok(dir) = std::env::var(CHILD) {
        return report_load(&Path::new(&dir).join("headers.tar"), budgeted());
    }
    let tmp = hostile_inputs("headers");
    let name = "huge_tar_header_extensions_stay_within_the_budget";
    let skips = serde_json::json!({"missing_image": 2, "oversized_header": 2});
    check_child(name, tmp.path().to_str().unwrap(), 2, skips, BUDGET + OWN);
}

/// Six real 3000x3000 PNGs (27 MB of pixels each) on four decode threads share half the budget
/// (32 MiB: one at a time), a real 9000x9000 one (243 MB, under max_pixels) is more than that
/// half ever holds (over_budget), and one whose header declares 10000x10000 is over max_pixels
/// (too_many_pixels): none is allocated beyond the budget, and a freed image's pages go back to
/// the system (each thread kept its largest before: 121 MiB with four threads).
#[test]
fn decoded_pixels_stay_within_their_share_of_the_budget() {
    let opts = LoaderOptions { threads: 4, max_pixels: albef_config::DataConfig::default().max_pixels, ..budgeted() };
    if let Ok(dir) = std::env::var(CHILD) {
        return report_load(&Path::new(&dir).join("ann.json"), opts);
    }
    let tmp = hostile_inputs("pixels");
    let name = "decoded_pixels_stay_within_their_share_of_the_budget";
    let skips = serde_json::json!({"over_budget": 1, "too_many_pixels": 1});
    check_child(name, tmp.path().to_str().unwrap(), 6, skips, BUDGET + OWN);
}

/// `albef data prepare` reads as the loader does: the 512 MiB image is dropped by its size,
/// unread (oversized_member; it was read whole and counted not_an_image before), the other
/// prepared.
#[test]
fn prepare_refuses_a_512_mib_image_by_its_size() {
    let tmp = hostile_inputs("big_image");
    let out = tmp.path().join("out");
    let files = vec![tmp.path().join("ann.json").to_str().unwrap().to_string()];
    let input = Input::Annotations { files, image_root: String::new() };
    let settings = Settings { image_size: 32, resize_mode: ResizeMode::KeepRatio, quality: 90, rows_per_shard: 10 };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let report = prepare(&input, out.to_str().unwrap(), &settings, 1, 10_000_000, rt.handle()).unwrap();
    assert_eq!(report.samples(), 1);
    assert_eq!(report.dropped(), [("oversized_member".to_string(), 1)].into(), "{:?}", report.examples);
}
