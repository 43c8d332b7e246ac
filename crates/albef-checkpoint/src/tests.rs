use super::*;

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
