//! Loader throughput (read shards + decode + train transform + tokenise + collate) with 1, 2 and
//! all decode threads, on a generated WebDataset of 320 px JPEGs cropped to 256 px.
//!
//! `cargo bench -p albef-data --bench loader`

use albef_data::bad::SkipCounts;
use albef_data::index::DatasetIndex;
use albef_data::loader::{InputLimits, Loader, LoaderOptions};
use albef_data::mixture::Mixture;
use albef_data::plan::{PlanSpec, plan_rank};
use albef_data::sources::TarOptions;
use albef_data::store::Location;
use albef_data::synth::{DatasetSpec, train_shards_pattern, write_dataset};
use albef_data::tokenizer::Tokenizer;
use albef_data::transform::TrainTransform;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let spec = DatasetSpec { seed: 1, image_res: 320, train: 512, test: 1, shards: 4 };
    let root = dir.path().to_str().unwrap();
    write_dataset(&Location::open(root).unwrap(), &spec, rt.handle()).unwrap();
    let index = Arc::new(
        DatasetIndex::build(&[train_shards_pattern(root, spec.shards)], rt.handle(), &SkipCounts::default()).unwrap(),
    );
    let tokenizer = Arc::new(Tokenizer::from_file(dir.path().join("vocab.txt")).unwrap());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{} samples, 320 px JPEGs -> 256 px train transform, batches of 32, {cores} cores", index.total());
    let mut counts = vec![1, 2, cores];
    counts.dedup();
    for threads in counts {
        let plan = plan_rank(
            &Mixture::by_size(index.counts()),
            &PlanSpec { seed: 0, epoch: 0, world_size: 1, batch_size: 32, window: 128 },
            0,
        )
        .unwrap();
        let opts = LoaderOptions {
            image_res: 256,
            threads,
            prefetch: 4,
            max_pixels: 100_000_000,
            augment: Some(TrainTransform::default()),
            tar: TarOptions::default(),
            image_root: String::new(),
            path_rewrite: vec![],
            max_words: 30,
            seed: 0,
            needs: Default::default(),
            limits: InputLimits::default(),
        };
        let start = Instant::now();
        let loader = Loader::start(
            index.clone(),
            plan,
            0,
            opts,
            tokenizer.clone(),
            rt.handle().clone(),
            Arc::new(SkipCounts::default()),
        );
        let images: usize = loader.map(|b| b.batch.batch_size).sum();
        let rate = images as f64 / start.elapsed().as_secs_f64();
        println!("loader, {threads} decode thread(s): {rate:.0} img/s");
    }
}
