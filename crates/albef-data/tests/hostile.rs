//! Hostile inputs written by independent producers (Python's tarfile, Pillow): each is read to
//! its end with the exact counts by reason, nothing mixed up.

use albef_data::bad::{SkipCounts, SkipReason};
use albef_data::sources::{TarOptions, read_tar_samples, scan_tar};
use std::path::{Path, PathBuf};

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
