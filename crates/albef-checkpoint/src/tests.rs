use super::*;
use std::sync::{Arc, Mutex};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn files() -> Vec<(String, Bytes)> {
    let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    vec![("model.safetensors".into(), Bytes::from(big)), ("trainer_state.json".into(), Bytes::from_static(b"{}"))]
}

const SMALL_PARTS: WriteOptions = WriteOptions { part_bytes: 4096, concurrency: 3 };

#[test]
fn a_written_checkpoint_reads_back_verified_and_lists_as_complete() {
    let (rt, dir) = (runtime(), tempfile::tempdir().unwrap());
    let run = Location::open(dir.path().to_str().unwrap()).unwrap();
    let mut seen = vec![];
    let manifest = rt
        .block_on(write(&folder(&run, 12), 12, files(), SMALL_PARTS, &mut |f: &FileEntry| seen.push(f.name.clone())))
        .unwrap();
    assert_eq!(seen, ["model.safetensors", "trainer_state.json"]);
    assert_eq!(manifest.total_bytes(), 100_002);
    assert_eq!(rt.block_on(check(&folder(&run, 12))).unwrap(), manifest);
    let back = rt.block_on(read_manifest(&folder(&run, 12))).unwrap();
    for (name, bytes) in files() {
        assert_eq!(rt.block_on(read_file(&folder(&run, 12), &back, &name)).unwrap(), bytes, "{name}");
    }
    let listed = rt.block_on(list(&run)).unwrap();
    assert_eq!(listed.iter().map(|l| (l.step, l.complete)).collect::<Vec<_>>(), [(12, true)]);
}

#[test]
fn corrupt_and_truncated_files_are_refused_with_their_name() {
    let (rt, dir) = (runtime(), tempfile::tempdir().unwrap());
    let run = Location::open(dir.path().to_str().unwrap()).unwrap();
    let ckpt = folder(&run, 3);
    let manifest = rt.block_on(write(&ckpt, 3, files(), WriteOptions::default(), &mut |_: &FileEntry| {})).unwrap();
    let model = dir.path().join("checkpoints/step-3/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[500] ^= 0x40;
    std::fs::write(&model, &bytes).unwrap();
    let err = format!("{:#}", rt.block_on(read_file(&ckpt, &manifest, "model.safetensors")).unwrap_err());
    assert!(err.contains("model.safetensors") && err.contains("SHA-256"), "{err}");
    std::fs::write(&model, &bytes[..1000]).unwrap();
    let err = format!("{:#}", rt.block_on(read_file(&ckpt, &manifest, "model.safetensors")).unwrap_err());
    assert!(err.contains("model.safetensors") && err.contains("1000 bytes"), "{err}");
    assert!(rt.block_on(check(&ckpt)).is_err(), "check sees the wrong size");
    // The manifest itself: unreadable means no checkpoint.
    std::fs::write(dir.path().join("checkpoints/step-3/manifest.json"), b"{not json").unwrap();
    let err = format!("{:#}", rt.block_on(read_manifest(&ckpt)).unwrap_err());
    assert!(err.contains("manifest"), "{err}");
}

#[test]
fn a_failed_save_leaves_nothing_and_leftovers_are_cleaned() {
    let (rt, dir) = (runtime(), tempfile::tempdir().unwrap());
    let run = Location::open(dir.path().to_str().unwrap()).unwrap();
    // The second name is invalid: the first file was stored, then the save fails.
    let mut bad = files();
    bad[1].0 = "sub/dir".into();
    assert!(rt.block_on(write(&folder(&run, 5), 5, bad, SMALL_PARTS, &mut |_: &FileEntry| {})).is_err());
    assert!(!dir.path().join("checkpoints/step-5/model.safetensors").exists(), "leftovers removed");
    assert!(!dir.path().join("checkpoints/step-5/manifest.json").exists());

    // A save killed mid-way (files without a manifest) next to a complete checkpoint.
    rt.block_on(write(&folder(&run, 4), 4, files(), SMALL_PARTS, &mut |_: &FileEntry| {})).unwrap();
    std::fs::create_dir_all(dir.path().join("checkpoints/step-8")).unwrap();
    std::fs::write(dir.path().join("checkpoints/step-8/model.safetensors"), b"half").unwrap();
    std::fs::create_dir_all(dir.path().join("checkpoints/step-9")).unwrap();
    std::fs::write(dir.path().join("checkpoints/step-9/model.safetensors"), b"in flight").unwrap();
    let listed = rt.block_on(list(&run)).unwrap();
    let complete: Vec<(u64, bool)> = listed.iter().map(|l| (l.step, l.complete)).filter(|l| l.0 != 5).collect();
    assert_eq!(complete, [(4, true), (8, false), (9, false)]);
    assert_eq!(rt.block_on(remove_incomplete(&run, Some(9))).unwrap(), [8]);
    assert!(!dir.path().join("checkpoints/step-8/model.safetensors").exists());
    assert!(dir.path().join("checkpoints/step-9/model.safetensors").exists(), "the save in flight is kept");
    assert!(rt.block_on(check(&folder(&run, 4))).is_ok(), "complete checkpoints are kept");
    rt.block_on(remove(&folder(&run, 4))).unwrap();
    assert!(rt.block_on(read_manifest(&folder(&run, 4))).is_err());
}

/// What the process's progress reporter saw: each piece of work's name, size, units and steps.
type Shown = Arc<Mutex<Vec<(String, u64, Units, Vec<u64>)>>>;

struct Recorder(Shown);

struct Steps(Shown, usize);

impl progress::Reporter for Recorder {
    fn start(&self, what: &str, total: u64, units: Units) -> Box<dyn progress::Meter> {
        let mut shown = self.0.lock().unwrap();
        shown.push((what.to_string(), total, units, vec![]));
        Box::new(Steps(self.0.clone(), shown.len() - 1))
    }
}

impl progress::Meter for Steps {
    fn advance(&mut self, units: u64) {
        self.0.lock().unwrap()[self.1].3.push(units);
    }
}

/// A save shows its bytes as they are stored, part by part: what a bar or the periodic lines of
/// an upload draw.
#[test]
fn a_save_shows_its_bytes_part_by_part() {
    let shown = Shown::default();
    assert!(progress::install(Box::new(Recorder(shown.clone()))), "the only test that installs a reporter");
    let (rt, dir) = (runtime(), tempfile::tempdir().unwrap());
    let run = Location::open(dir.path().to_str().unwrap()).unwrap();
    rt.block_on(write(&folder(&run, 7), 7, files(), SMALL_PARTS, &mut |_: &FileEntry| {})).unwrap();
    let what = format!("storing {}", folder(&run, 7).url);
    let shown = shown.lock().unwrap();
    let (_, total, units, steps) = shown.iter().find(|s| s.0 == what).expect("the save was shown");
    assert_eq!((*total, *units), (100_002, Units::Bytes));
    // 100,000 bytes in 4096-byte parts (24 whole, one of 1696), then the 2-byte state.
    let parts: std::collections::BTreeMap<u64, usize> = steps.iter().fold(Default::default(), |mut m, s| {
        *m.entry(*s).or_default() += 1;
        m
    });
    assert_eq!(parts, [(2, 1), (1696, 1), (4096, 24)].into());
    assert_eq!(steps.last(), Some(&2), "the state file is stored after the model");
}
