//! What the loader's integration tests share: plain options, and a whole index read through a
//! loader within a deadline.

use albef_data::bad::SkipCounts;
use albef_data::index::DatasetIndex;
use albef_data::loader::{InputLimits, Loader, LoaderOptions};
use albef_data::mixture::Mixture;
use albef_data::plan::{PlanSpec, plan_rank};
use albef_data::sources::TarOptions;
use albef_data::tokenizer::Tokenizer;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;

/// 32 px test-transform rows on two decode threads, under `limits`.
pub fn loader_options(limits: InputLimits) -> LoaderOptions {
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

/// The generated captions' vocabulary.
pub fn synth_tokenizer() -> Arc<Tokenizer> {
    let vocab = albef_data::synth::vocab_tokens();
    Arc::new(Tokenizer::from_vocab_tokens(vocab.iter().map(String::as_str)).unwrap())
}

/// The keys of the rows a loader of every sample of `index` delivers (one rank, batches of
/// `batch_size`), and what it counted; an error when the loader is still running after
/// `deadline` (the caller shuts its runtime down in the background and fails, instead of
/// hanging).
pub fn load_index(
    index: DatasetIndex,
    batch_size: u64,
    (opts, tokenizer): (LoaderOptions, Arc<Tokenizer>),
    handle: &Handle,
    deadline: Duration,
) -> Result<(Vec<String>, Arc<SkipCounts>), String> {
    let index = Arc::new(index);
    let spec = PlanSpec { seed: 0, epoch: 0, world_size: 1, batch_size, window: 64 };
    let plan = plan_rank(&Mixture::by_size(index.counts()), &spec, 0).unwrap();
    let skips = Arc::new(SkipCounts::default());
    let loader = Loader::start(index, plan, 0, opts, tokenizer, handle.clone(), skips.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(loader.flat_map(|b| b.batch.keys).collect::<Vec<_>>());
    });
    match rx.recv_timeout(deadline) {
        Ok(keys) => Ok((keys, skips)),
        Err(_) => Err(format!("the loader did not finish within {deadline:?}: {:?}", skips.snapshot())),
    }
}
