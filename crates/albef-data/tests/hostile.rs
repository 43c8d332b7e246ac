//! Hostile inputs written by independent producers (Python's tarfile, Pillow): each is read to
//! its end with the exact counts by reason, nothing mixed up.

use albef_config::TruncatedImages;
use albef_data::bad::{SkipCounts, SkipReason};
use albef_data::index::DatasetIndex;
use albef_data::loader::{InputLimits, Loader, LoaderOptions};
use albef_data::mixture::Mixture;
use albef_data::plan::{PlanSpec, plan_rank};
use albef_data::sources::{TarOptions, read_tar_samples, scan_tar};
use albef_data::tokenizer::Tokenizer;
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

fn options(limits: InputLimits) -> LoaderOptions {
    LoaderOptions {
        image_res: 32,
        threads: 2,
        prefetch: 2,
        max_pixels: 10_000_000,
        augment: None,
        tar: TarOptions::default(),
        image_root: String::new(),
        path_rewrite: vec![],
        max_words: 30,
        seed: 0,
        needs: Default::default(),
        limits,
    }
}

/// The rows a loader of the whole of `source` delivers within a deadline (a loader that blocks
/// fails the test instead of hanging it), and what it counted.
fn load_within_deadline(source: &Path, opts: LoaderOptions) -> (u64, Arc<SkipCounts>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let index = DatasetIndex::build(&[source.to_str().unwrap().to_string()], rt.handle(), &SkipCounts::default());
    let index = Arc::new(index.unwrap());
    let spec = PlanSpec { seed: 0, epoch: 0, world_size: 1, batch_size: 1, window: 64 };
    let plan = plan_rank(&Mixture::by_size(index.counts()), &spec, 0).unwrap();
    let vocab = albef_data::synth::vocab_tokens();
    let tokenizer = Arc::new(Tokenizer::from_vocab_tokens(vocab.iter().map(String::as_str)).unwrap());
    let skips = Arc::new(SkipCounts::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let loader = Loader::start(index, plan, 0, opts, tokenizer, rt.handle().clone(), skips.clone());
    std::thread::spawn(move || {
        let _ = tx.send(loader.map(|b| b.batch.batch_size as u64).sum::<u64>());
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(delivered) => (delivered, skips),
        Err(_) => {
            rt.shutdown_background();
            panic!("the loader did not finish within 120 s: {:?}", skips.snapshot());
        }
    }
}

/// A JPEG cut inside its scan data (Pillow wrote it whole): decoded with the rows past the cut
/// grey, as Pillow with the reference's LOAD_TRUNCATED_IMAGES decodes them (the same rows, to
/// within one 16-row band of blocks), and counted as truncated_image; trained by default,
/// skipped with `data.truncated_images: skip`. A whole JPEG is not counted.
#[test]
fn a_truncated_jpeg_is_trained_grey_or_skipped_and_counted() {
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

    for (setting, delivered) in [(TruncatedImages::Train, 2), (TruncatedImages::Skip, 1)] {
        let limits = InputLimits { truncated_images: setting, ..InputLimits::default() };
        let (got, skips) = load_within_deadline(&tmp.path().join("ann.json"), options(limits));
        assert_eq!(got, delivered, "{setting:?}: {}", skips.summary());
        assert_eq!(skips.get(SkipReason::TruncatedImage), 1, "{setting:?}: {}", skips.summary());
        assert_eq!(skips.total(), 1, "{setting:?}: {}", skips.summary());
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

const MIB: u64 = 1 << 20;

/// 24 samples of 8 MiB members (under the member limit; zeros, so each is then counted
/// not_an_image) fill a window of 64 against a budget of 64 MiB, and one 40 MiB sample is more
/// than a sample may hold (a quarter): peak RSS stays under the budget plus the one member being
/// read (48 MiB at most) and the process's own 40 MiB; it took 230 MiB of window before.
#[test]
fn large_members_filling_the_window_stay_within_the_budget() {
    const BUDGET: u64 = 64 * MIB;
    const MAX_MEMBER: u64 = 48 * MIB;
    let limits = InputLimits { memory_budget: BUDGET, ..InputLimits::default() };
    let opts =
        LoaderOptions { tar: TarOptions { max_member_bytes: MAX_MEMBER, ..TarOptions::default() }, ..options(limits) };
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
    let got = in_child(name, path.to_str().unwrap());
    assert_eq!(got["delivered"], 0, "{got}");
    assert_eq!(got["skips"], serde_json::json!({"not_an_image": 24, "over_budget": 1}), "{got}");
    let peak = got["peak_rss"].as_u64().unwrap();
    eprintln!("peak RSS {} MiB with a budget of {} MiB", peak / MIB, BUDGET / MIB);
    assert!(peak < BUDGET + MAX_MEMBER + 40 * MIB, "peak RSS {} MiB", peak / MIB);
}
