//! A weighted dataset through the loader: every draw of the epoch's plan is delivered once,
//! repeats included, and its batch's draw ids count it under its configured source.

use albef_data::dataset::Dataset;
use albef_data::store::Location;
use albef_data::synth::{DatasetSpec, write_dataset};
use std::collections::BTreeMap;
use std::path::Path;

#[test]
fn a_weighted_epoch_is_delivered_and_counted_by_source() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let d = dir.path().to_str().unwrap();
    let spec = DatasetSpec { seed: 3, image_res: 32, train: 60, test: 4, shards: 4 };
    write_dataset(&Location::open(d).unwrap(), &spec, rt.handle()).unwrap();
    // One shard (about a quarter of the pairs) weighted as much as the other three: it repeats.
    let (small, large) = (format!("{d}/train-000000.tar"), format!("{d}/train-{{000001..000003}}.tar"));
    let overrides = vec![
        format!("data.train_file=[{{source: \"{small}\", weight: 1}}, {{source: \"{large}\", weight: 1}}]"),
        "train.batch_size_train=4".into(),
        "data.shuffle_window=16".into(),
    ];
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/small.yaml");
    let sources = albef_config::ConfigSources { file: Some(config), overrides, environment: false };
    let cfg = albef_config::load(&sources).unwrap();
    let dataset = Dataset::open(&cfg, dir.path(), rt.handle()).unwrap();
    let plan = dataset.plan(&cfg, 0, 1, 0).unwrap();
    let mut planned = BTreeMap::<String, u64>::new();
    for pos in 0..plan.len() {
        let entry = dataset.mixture.entry_of(plan.draw_at(pos).source);
        *planned.entry(dataset.mixture.entries()[entry as usize].label.clone()).or_default() += 1;
    }
    assert!(plan.leases.iter().any(|l| l.pass > 0), "the small source repeats: {:?}", plan.leases);
    let mut keys = vec![];
    for b in dataset.loader(&cfg, plan.clone(), 0, 1, rt.handle()) {
        // As the training loop does once the step is applied.
        dataset.skips.trained(&b.batch.draws);
        keys.extend(b.batch.keys);
    }
    assert_eq!(keys.len() as u64, plan.len(), "every draw delivered: {}", dataset.skips.summary());
    let trained: BTreeMap<String, u64> =
        dataset.skips.by_source().into_iter().map(|(label, t)| (label, t.trained)).collect();
    assert_eq!(trained, planned);
    assert_eq!(trained[&small], trained[&large], "equal weights, equal shares: {trained:?}");
}
