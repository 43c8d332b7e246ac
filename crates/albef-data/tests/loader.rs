//! The data path end to end on generated and deliberately broken datasets: index, plan, loader.

use albef_data::bad::{SkipCounts, SkipReason};
use albef_data::dataset::Dataset;
use albef_data::index::DatasetIndex;
use albef_data::loader::{ImageIds, InputLimits, Loader, LoaderOptions, RowNeeds};
use albef_data::mixture::Mixture;
use albef_data::plan::{PlanSpec, plan_rank};
use albef_data::rng::SplitMix64;
use albef_data::sources::TarOptions;
use albef_data::store::Location;
use albef_data::synth::{DatasetSpec, train_shards_pattern, write_dataset};
use albef_data::tokenizer::Tokenizer;
use albef_data::transform::TrainTransform;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

fn generate(dir: &Path, rt: &tokio::runtime::Runtime, train: u64, shards: u64) -> String {
    let spec = DatasetSpec { seed: 3, image_res: 48, train, test: 6, shards };
    write_dataset(&Location::open(dir.to_str().unwrap()).unwrap(), &spec, rt.handle()).unwrap();
    train_shards_pattern(dir.to_str().unwrap(), shards)
}

fn options(threads: usize) -> LoaderOptions {
    LoaderOptions {
        image_res: 32,
        threads,
        prefetch: 2,
        max_pixels: 10_000_000,
        augment: Some(TrainTransform { res: 32, ..TrainTransform::default() }),
        tar: TarOptions::default(),
        image_root: String::new(),
        path_rewrite: vec![],
        max_words: 30,
        seed: 9,
        needs: Default::default(),
        limits: InputLimits::default(),
    }
}

fn tokenizer(dir: &Path) -> Arc<Tokenizer> {
    Arc::new(Tokenizer::from_file(dir.join("vocab.txt")).unwrap())
}

/// (step, keys, images, ids) of every batch a loader yields.
type Seen = Vec<(u64, Vec<String>, Vec<f32>, Vec<i64>)>;

fn run(
    index: &Arc<DatasetIndex>,
    spec: &PlanSpec,
    rank: u64,
    from: u64,
    threads: usize,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
) -> (Seen, Arc<SkipCounts>) {
    let plan = plan_rank(&Mixture::by_size(index.counts()), spec, rank).unwrap();
    let skips = Arc::new(SkipCounts::default());
    let loader =
        Loader::start(index.clone(), plan, from, options(threads), tokenizer(dir), rt.handle().clone(), skips.clone());
    let seen = loader.map(|b| (b.step, b.batch.keys, b.batch.images, b.batch.input_ids)).collect();
    (seen, skips)
}

#[test]
fn ranks_cover_the_epoch_once_deterministically_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let pattern = generate(dir.path(), &rt, 70, 4);
    let skips = SkipCounts::default();
    let index = Arc::new(DatasetIndex::build(&[pattern], rt.handle(), &skips).unwrap());
    assert_eq!(index.sources.len(), 4);
    assert_eq!(index.total(), 70);
    assert!(index.sources.iter().all(|s| s.offsets.len() as u64 == s.samples), "scanned shards carry offsets");
    let sizes: BTreeSet<u64> = index.sources.iter().map(|s| s.samples).collect();
    assert!(sizes.len() > 1, "generated shards have uneven sizes");

    let spec = PlanSpec { seed: 1, epoch: 0, world_size: 2, batch_size: 4, window: 12 };
    let (rank0, s0) = run(&index, &spec, 0, 0, 2, dir.path(), &rt);
    let (rank1, _) = run(&index, &spec, 1, 0, 2, dir.path(), &rt);
    assert_eq!(s0.total(), 0, "{:?}", s0.snapshot());
    assert_eq!(rank0.len(), 8, "70 samples / (2 x 4) = 8 steps");
    assert_eq!(rank1.len(), 8);
    let mut keys = BTreeSet::new();
    for (i, (step, k, images, ids)) in rank0.iter().chain(&rank1).enumerate() {
        assert_eq!(*step, (i % 8) as u64);
        assert_eq!(k.len(), 4);
        assert_eq!(images.len(), 4 * 3 * 32 * 32);
        assert!(ids.len() >= 4 * 2);
        keys.extend(k.iter().cloned());
    }
    assert_eq!(keys.len(), 64, "no sample repeated across steps or ranks");

    let (again, _) = run(&index, &spec, 0, 0, 1, dir.path(), &rt);
    assert_eq!(again, rank0, "one thread or two, the same batches");
    let (resumed, _) = run(&index, &spec, 0, 5, 3, dir.path(), &rt);
    assert_eq!(resumed[..], rank0[5..], "a resumed loader continues exactly");

    let next_epoch = PlanSpec { epoch: 1, ..spec };
    let (other, _) = run(&index, &next_epoch, 0, 0, 2, dir.path(), &rt);
    assert_ne!(other[0].1, rank0[0].1, "each epoch has its own order");
}

/// With `data.image_root`, or without it: then the image paths are relative to the annotation
/// file's folder.
#[test]
fn annotation_files_load_with_their_image_root_or_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    generate(dir.path(), &rt, 20, 2);
    let skips = SkipCounts::default();
    let json = dir.path().join("train.json").to_str().unwrap().to_string();
    let index = Arc::new(DatasetIndex::build(&[json], rt.handle(), &skips).unwrap());
    assert_eq!(index.total(), 20);
    let plan = plan_rank(
        &Mixture::by_size(index.counts()),
        &PlanSpec { seed: 0, epoch: 0, world_size: 1, batch_size: 5, window: 8 },
        0,
    )
    .unwrap();
    for root in [dir.path().to_str().unwrap().to_string(), String::new()] {
        let opts = LoaderOptions { image_root: root.clone(), augment: None, ..options(2) };
        let skips = Arc::new(SkipCounts::default());
        let (index, plan) = (index.clone(), plan.clone());
        let loader = Loader::start(index, plan, 0, opts, tokenizer(dir.path()), rt.handle().clone(), skips.clone());
        let loaded: Vec<_> = loader.collect();
        assert_eq!(loaded.len(), 4, "image_root {root:?}: {}", skips.summary());
        assert!(loaded.iter().all(|b| b.batch.batch_size == 5), "image_root {root:?}: {}", skips.summary());
    }
}

/// What a task needs of each row: retrieval's image ids (rows of one image share an index, rows
/// without an `image_id` are skipped as missing_image_id), SNLI-VE's labels (a row whose label is
/// not a class is skipped as bad_label); the rest of the batch trains.
#[test]
fn rows_carry_what_the_task_needs_and_rows_without_it_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    generate(dir.path(), &rt, 4, 1);
    let image = |i: usize| format!("images/train/synth-{i:08}.jpg");
    let rows = serde_json::json!([
        {"image": image(0), "caption": "a", "image_id": 7, "sentence": "x", "label": "entailment"},
        {"image": image(0), "caption": "b", "image_id": 7, "label": "contradiction"},
        {"image": image(1), "caption": "c", "label": "neutral"},
        {"image": image(2), "caption": "d", "image_id": "coco-2", "label": "maybe"},
    ]);
    let json = dir.path().join("rows.json");
    std::fs::write(&json, rows.to_string()).unwrap();
    let index =
        Arc::new(DatasetIndex::build(&[json.to_str().unwrap().into()], rt.handle(), &SkipCounts::default()).unwrap());
    let spec = PlanSpec { seed: 0, epoch: 0, world_size: 1, batch_size: 4, window: 4 };
    let plan = plan_rank(&Mixture::by_size(index.counts()), &spec, 0).unwrap();
    let load = |needs: RowNeeds| {
        let opts = LoaderOptions { augment: None, needs, ..options(1) };
        let skips = Arc::new(SkipCounts::default());
        let loader = Loader::start(
            index.clone(),
            plan.clone(),
            0,
            opts,
            tokenizer(dir.path()),
            rt.handle().clone(),
            skips.clone(),
        );
        let mut batches: Vec<_> = loader.map(|b| b.batch).collect();
        (batches.pop().unwrap(), skips)
    };
    let (b, skips) = load(RowNeeds { image_ids: ImageIds::Annotated, ..RowNeeds::default() });
    assert_eq!((b.batch_size, skips.get(SkipReason::MissingImageId)), (3, 1), "{}", skips.summary());
    let by_key: Vec<(String, i64)> = b.keys.iter().cloned().zip(b.image_ids.iter().copied()).collect();
    let id_of = |caption_row: usize| {
        by_key.iter().filter(|(k, _)| k == &image(caption_row)).map(|(_, i)| *i).collect::<Vec<_>>()
    };
    assert_eq!(id_of(0).len(), 2);
    assert!(id_of(0)[0] == id_of(0)[1] && id_of(0)[0] != id_of(2)[0], "{by_key:?}");
    assert!(b.labels.is_empty());

    let classes = ["contradiction", "neutral", "entailment"].map(String::from).to_vec();
    let (b, skips) = load(RowNeeds { labels: classes, ..RowNeeds::default() });
    assert_eq!((b.batch_size, skips.get(SkipReason::BadLabel)), (3, 1), "{}", skips.summary());
    let mut labels = b.labels.clone();
    labels.sort();
    assert_eq!(labels, [0, 1, 2]);
    assert!(b.image_ids.is_empty());
}

fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn bad_input_is_skipped_counted_and_never_stops_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    generate(dir.path(), &rt, 12, 1);
    let good = std::fs::read(dir.path().join("train-000000.tar")).unwrap();
    let jpg = std::fs::read(dir.path().join("images/train/synth-00000000.jpg")).unwrap();
    let big = {
        let img = image::RgbImage::from_pixel(400, 400, image::Rgb([9, 9, 9]));
        let mut out = std::io::Cursor::new(vec![]);
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let t = |s: &str| s.as_bytes().to_vec();
    let bad = tar_of(&[
        ("ok1.jpg".into(), jpg.clone()),
        ("ok1.txt".into(), t("a red circle")),
        ("corrupt.jpg".into(), jpg[..jpg.len() / 3].to_vec()),
        ("corrupt.txt".into(), t("a blue square")),
        ("text.jpg".into(), t("this is not an image at all")),
        ("text.txt".into(), t("a red circle")),
        ("huge.png".into(), big),
        ("huge.txt".into(), t("a red circle")),
        ("noimage.txt".into(), t("a red circle")),
        ("nocaption.jpg".into(), jpg.clone()),
        ("blank.jpg".into(), jpg.clone()),
        ("blank.txt".into(), t(" \t\n")),
        ("utf.jpg".into(), jpg.clone()),
        ("utf.txt".into(), vec![0xC3, 0x28]),
        ("ok2.jpg".into(), jpg.clone()),
        ("ok2.txt".into(), t("a green triangle")),
    ]);
    std::fs::write(dir.path().join("bad.tar"), &bad).unwrap();
    // A truncated copy of a good shard, and a shard that disappears after indexing.
    std::fs::write(dir.path().join("cut.tar"), &good[..good.len() * 2 / 3]).unwrap();
    std::fs::write(dir.path().join("gone.tar"), &good).unwrap();
    std::fs::write(
        dir.path().join("types.json"),
        br#"[{"image": 1, "caption": "x"}, {"image": "images/train/synth-00000001.jpg", "caption": "a red circle"}]"#,
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let sources = vec![format!("{d}/{{bad,cut,gone}}.tar"), format!("{d}/missing.tar"), format!("{d}/types.json")];
    let index_skips = SkipCounts::default();
    let index = Arc::new(DatasetIndex::build(&sources, rt.handle(), &index_skips).unwrap());
    assert_eq!(index_skips.get(SkipReason::UnreadableShard), 1, "missing.tar is reported at indexing");
    assert_eq!(index_skips.get(SkipReason::TruncatedShard), 1);
    assert_eq!(index_skips.get(SkipReason::BadAnnotation), 1);
    std::fs::remove_file(dir.path().join("gone.tar")).unwrap();

    // Batches of one: drop_last drops nothing, so every good sample must arrive.
    let spec = PlanSpec { seed: 0, epoch: 0, world_size: 1, batch_size: 1, window: 64 };
    let plan = plan_rank(&Mixture::by_size(index.counts()), &spec, 0).unwrap();
    let skips = Arc::new(SkipCounts::default());
    let opts = LoaderOptions { max_pixels: 300 * 300, image_root: d.to_string(), ..options(2) };
    let batches: Vec<_> =
        Loader::start(index.clone(), plan.clone(), 0, opts, tokenizer(dir.path()), rt.handle().clone(), skips.clone())
            .collect();
    assert_eq!(batches.len() as u64, plan.steps, "every step is delivered");
    let keys: BTreeSet<String> = batches.iter().flat_map(|b| b.batch.keys.clone()).collect();
    for k in ["ok1", "ok2"] {
        assert!(keys.contains(k), "{k} lost among bad samples");
    }
    for bad in ["corrupt", "text", "huge", "noimage", "nocaption", "blank", "utf"] {
        assert!(!keys.contains(bad), "{bad} reached a batch");
    }
    let counts = skips.snapshot();
    println!("skipped: {counts:?}");
    for (reason, n) in [
        (SkipReason::CorruptImage, 1),
        (SkipReason::NotAnImage, 1),
        (SkipReason::TooManyPixels, 1),
        (SkipReason::MissingImage, 1),
        (SkipReason::MissingCaption, 1),
        (SkipReason::EmptyCaption, 1),
        (SkipReason::InvalidUtf8, 1),
    ] {
        assert_eq!(skips.get(reason), n, "{} in {counts:?}", reason.as_str());
    }
    assert_eq!(skips.get(SkipReason::UnreadableShard), 12, "gone.tar's samples are counted: {counts:?}");
    // Every planned sample arrived or was counted once (cut.tar's lost tail was reported by the
    // index, which holds only what is readable).
    let delivered: u64 = batches.iter().map(|b| b.batch.batch_size as u64).sum();
    assert_eq!(delivered + skips.total(), plan.len(), "{counts:?}");
}

/// Writes shard `i` of the property test: `n` samples keyed `k{i}_{j}`, the bad ones (by
/// `bad(i, j)`) without a caption or with bytes that are no image. Returns the bad keys.
fn property_shard(dir: &Path, i: usize, n: u64, png: &[u8], rng: &mut SplitMix64) -> BTreeSet<String> {
    let mut files = vec![];
    let mut bad = BTreeSet::new();
    for j in 0..n {
        let key = format!("k{i}_{j}");
        match rng.below(8) {
            0 => {
                files.push((format!("{key}.png"), png.to_vec()));
                bad.insert(key);
            }
            1 => {
                files.push((format!("{key}.png"), b"not an image".to_vec()));
                files.push((format!("{key}.txt"), b"a red circle".to_vec()));
                bad.insert(key);
            }
            _ => {
                files.push((format!("{key}.png"), png.to_vec()));
                files.push((format!("{key}.txt"), b"a red circle".to_vec()));
            }
        }
    }
    std::fs::write(dir.join(format!("p-{i}.tar")), tar_of(&files)).unwrap();
    bad
}

/// For random shard sizes, bad-sample positions, world sizes, batch sizes and shuffle windows
/// (batches larger than the window included), every sample of every rank's plan is trained
/// exactly once or counted once under a skip reason, and a loader resumed at any step delivers
/// exactly the rest of the uninterrupted one.
#[test]
fn every_planned_sample_is_trained_once_or_counted_once() {
    let rt = runtime();
    let png = {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]));
        let mut out = std::io::Cursor::new(vec![]);
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let synth = tempfile::tempdir().unwrap();
    generate(synth.path(), &rt, 8, 1); // for its vocabulary
    let mut rng = SplitMix64::new(2024);
    let mut cases = 0;
    while cases < 24 {
        let dir = tempfile::tempdir().unwrap();
        let shards = 1 + rng.below(4);
        let mut bad = BTreeSet::new();
        for i in 0..shards {
            bad.extend(property_shard(dir.path(), i, rng.below(16) as u64, &png, &mut rng));
        }
        let pattern = format!("{}/p-{{0..{}}}.tar", dir.path().display(), shards - 1);
        let Ok(index) = DatasetIndex::build(&[pattern], rt.handle(), &SkipCounts::default()) else { continue };
        let spec = PlanSpec {
            seed: rng.next_u64(),
            epoch: rng.below(3) as u64,
            world_size: 1 + rng.below(3) as u64,
            batch_size: 1 + rng.below(9) as u64,
            window: 1 + rng.below(12) as u64,
        };
        if index.total() < spec.world_size * spec.batch_size {
            continue;
        }
        cases += 1;
        let index = Arc::new(index);
        let key_of = |source: u32, ordinal: u64| {
            let url = &index.sources[source as usize].url;
            let shard = url.rsplit_once("p-").unwrap().1.trim_end_matches(".tar");
            format!("k{shard}_{ordinal}")
        };
        for rank in 0..spec.world_size {
            let plan = plan_rank(&Mixture::by_size(index.counts()), &spec, rank).unwrap();
            let planned: Vec<String> = (0..plan.len()).map(|p| plan.sample_at(p)).map(|(s, o)| key_of(s, o)).collect();
            let (seen, skips) = run(&index, &spec, rank, 0, 2, synth.path(), &rt);
            let case = format!("{spec:?} rank {rank}, shards {:?}", index.counts());
            assert_eq!(seen.len() as u64, plan.steps, "{case}");
            let trained: Vec<&String> = seen.iter().flat_map(|(_, keys, _, _)| keys).collect();
            let unique: BTreeSet<&String> = trained.iter().copied().collect();
            assert_eq!(unique.len(), trained.len(), "a sample trained twice: {case}");
            let expected_bad = planned.iter().filter(|k| bad.contains(*k)).count() as u64;
            assert!(trained.iter().all(|k| planned.contains(k) && !bad.contains(*k)), "{case}");
            assert_eq!(trained.len() as u64, plan.len() - expected_bad, "a good sample lost: {case}");
            assert_eq!(skips.total(), expected_bad, "{case}: {:?}", skips.snapshot());
            let from = rng.below(plan.steps as usize) as u64;
            let (resumed, _) = run(&index, &spec, rank, from, 1, synth.path(), &rt);
            assert_eq!(resumed[..], seen[from as usize..], "resumed at {from}: {case}");
        }
    }
}

/// Runs `tests/python/make_reference_annotations.py` into `dir`; its row counts.
fn reference_annotations(dir: &Path) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run make setup", python.display());
    let script = root.join("tests/python/make_reference_annotations.py");
    let out = std::process::Command::new(python).arg(script).arg(dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every row a loader of the whole of `json` delivers, within a deadline (a loader that blocks
/// fails the test instead of hanging it), and what it skipped.
fn load_within_deadline(json: &Path, opts: LoaderOptions, rt: tokio::runtime::Runtime) -> (u64, Arc<SkipCounts>) {
    let index = DatasetIndex::build(&[json.to_str().unwrap().to_string()], rt.handle(), &SkipCounts::default());
    let index = Arc::new(index.unwrap());
    let spec = PlanSpec { seed: 0, epoch: 0, world_size: 1, batch_size: 1, window: 8 };
    let plan = plan_rank(&Mixture::by_size(index.counts()), &spec, 0).unwrap();
    let vocab = albef_data::synth::vocab_tokens();
    let tokenizer = Arc::new(Tokenizer::from_vocab_tokens(vocab.iter().map(String::as_str)).unwrap());
    let skips = Arc::new(SkipCounts::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let loader = Loader::start(index, plan, 0, opts, tokenizer, rt.handle().clone(), skips.clone());
    std::thread::spawn(move || {
        let _ = tx.send(loader.map(|b| b.batch.batch_size as u64).sum::<u64>());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(delivered) => (delivered, skips),
        Err(_) => {
            rt.shutdown_background(); // its blocked read would keep the test from ending
            panic!("the loader did not finish within 60 s: {:?}", skips.snapshot());
        }
    }
}

/// A named pipe as an image path (os.mkfifo, nothing writing it) is skipped as not_a_file from
/// its metadata, never opened: opening it would wait for a writer forever.
#[test]
fn a_fifo_named_as_an_image_is_counted_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    let rows = reference_annotations(dir.path());
    let (delivered, skips) = load_within_deadline(&dir.path().join("fifo.json"), options(1), runtime());
    assert_eq!(delivered, rows["fifo_good"].as_u64().unwrap(), "{}", skips.summary());
    assert_eq!(skips.get(SkipReason::NotAFile), 1, "{}", skips.summary());
    assert_eq!(skips.total(), 1, "{}", skips.summary());
    assert!(skips.examples()[0].detail.contains("named pipe"), "{:?}", skips.examples());
}

/// An image file named by an annotation is held to `data.max_member_mb` as a tar member is: a
/// larger one is counted as oversized_member from its size, never read (it would have decoded:
/// what follows a JPEG's end is ignored).
#[test]
fn an_annotation_image_over_the_member_limit_is_counted_unread() {
    let dir = tempfile::tempdir().unwrap();
    reference_annotations(dir.path());
    let small = std::fs::read_dir(dir.path().join("coco/train2014")).unwrap().next().unwrap().unwrap().path();
    let mut big = std::fs::read(&small).unwrap();
    big.resize(2 << 20, 0);
    std::fs::write(dir.path().join("big.jpg"), &big).unwrap();
    let small = small.strip_prefix(dir.path()).unwrap().to_str().unwrap();
    let rows = serde_json::json!([
        {"image": "big.jpg", "caption": "a big picture"},
        {"image": small, "caption": "a small picture"},
    ]);
    let json = dir.path().join("big.json");
    std::fs::write(&json, rows.to_string()).unwrap();
    let mut opts = options(1);
    opts.tar.max_member_bytes = 1 << 20;
    let (delivered, skips) = load_within_deadline(&json, opts, runtime());
    assert_eq!((delivered, skips.get(SkipReason::OversizedMember), skips.total()), (1, 1, 1), "{}", skips.summary());
    assert!(skips.examples()[0].detail.contains("2097152 bytes"), "{:?}", skips.examples());
}

/// The reference's annotation files name the authors' absolute paths: without data.path_rewrite
/// every row is skipped as absolute_path (not missing_image) and the dataset is refused at start,
/// naming the setting; with it every row loads.
#[test]
fn the_reference_absolute_paths_load_with_path_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let rows = reference_annotations(dir.path())["absolute"].as_u64().unwrap();
    let vocab = albef_data::synth::vocab_tokens().join("\n");
    std::fs::write(dir.path().join("vocab.txt"), vocab).unwrap();
    let (d, json) = (dir.path().to_str().unwrap(), dir.path().join("absolute.json"));
    let image_root = || LoaderOptions { image_root: d.to_string(), ..options(1) };
    let (delivered, skips) = load_within_deadline(&json, image_root(), runtime());
    assert_eq!((delivered, skips.get(SkipReason::AbsolutePath)), (0, rows), "{}", skips.summary());
    assert_eq!(skips.total(), rows, "{}", skips.summary());

    let configured = |rewrite: &str| {
        let overrides = [
            format!("data.train_file={}", json.display()),
            format!("data.image_root={d}"),
            "train.batch_size_train=2".into(),
            rewrite.into(),
        ];
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/small.yaml");
        let overrides = overrides.into_iter().filter(|o| !o.is_empty()).collect();
        albef_config::load(&albef_config::ConfigSources { file: Some(config), overrides, environment: false }).unwrap()
    };
    let rt = runtime();
    let err = Dataset::open(&configured(""), dir.path(), rt.handle()).err().expect("refused at start");
    let err = format!("{err:#}");
    assert!(err.contains(&format!("all {rows} entries")) && err.contains("absolute_path"), "{err}");
    assert!(err.contains("data.path_rewrite") && err.contains("data.image_root"), "{err}");

    // The `--set` list syntax, as a user would write it.
    let cfg = configured("data.path_rewrite=[/export/share/datasets/vision/coco/images/=coco/]");
    let dataset = Dataset::open(&cfg, dir.path(), rt.handle()).unwrap();
    let plan = dataset.plan(&cfg, 0, 1, 0).unwrap();
    let delivered: u64 = dataset.loader(&cfg, plan, 0, 1, rt.handle()).map(|b| b.batch.batch_size as u64).sum();
    assert_eq!(delivered, rows, "{}", dataset.skips.summary());
    assert_eq!(dataset.skips.total(), 0, "{}", dataset.skips.summary());
}
