//! Datasets for `albef train` and the `albef data` commands.

use albef_config::AlbefConfig;
use albef_data::bad::SkipCounts;
use albef_data::index::{DatasetIndex, INDEX_FILE};
use albef_data::loader::{Loader, LoaderOptions};
use albef_data::plan::{PlanSpec, plan_rank, steps_per_epoch};
use albef_data::sources::CaptionSource;
use albef_data::store::{Location, expand_braces};
use albef_data::synth::{DatasetSpec, VOCAB_TXT, train_shards_pattern, write_dataset};
use albef_data::tokenizer::{Tokenizer, TokenizerOptions};
use anyhow::{Context, Result, ensure};
use clap::Subcommand;
use std::path::Path;
use std::sync::Arc;
use tokio::runtime::Handle;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write a generated, learnable image-text dataset (shards, annotation JSON, retrieval split,
    /// vocabulary) and its index.
    Synth {
        #[arg(long)]
        out: String,
        #[arg(long, default_value_t = 2048)]
        train: u64,
        #[arg(long, default_value_t = 200)]
        test: u64,
        #[arg(long, default_value_t = 8)]
        shards: u64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Side of the generated pictures.
        #[arg(long, default_value_t = 96)]
        image_res: usize,
    },
    /// Count the samples of every source (brace patterns allowed) and store the index.
    Index {
        /// Annotation JSON files and/or tar shards.
        #[arg(required = true)]
        sources: Vec<String>,
        /// Where to write the index (default: albef-index.json beside the first source).
        #[arg(long)]
        out: Option<String>,
    },
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the I/O runtime")
}

pub fn run(cmd: DataCommand) -> Result<()> {
    let rt = runtime()?;
    match cmd {
        DataCommand::Synth { out, train, test, shards, seed, image_res } => {
            let spec = DatasetSpec { seed, image_res, train, test, shards };
            let pattern = synthesize(&out, &spec, rt.handle())?;
            println!("wrote {train} training pairs in {shards} shards ({pattern}), {test} test images, {VOCAB_TXT}");
            Ok(())
        }
        DataCommand::Index { sources, out } => {
            let skips = SkipCounts::default();
            let index = DatasetIndex::build(&sources, rt.handle(), &skips)?;
            let out = match out {
                Some(o) => Location::open(&o)?,
                None => first_source(&sources)?.sibling(INDEX_FILE),
            };
            index.save(&out, rt.handle())?;
            println!("{} sources, {} samples -> {}", index.sources.len(), index.total(), out.url);
            if skips.total() > 0 {
                println!("problems: {:?}", skips.snapshot());
            }
            Ok(())
        }
    }
}

/// Writes a generated dataset and its index; returns the shard pattern.
fn synthesize(out: &str, spec: &DatasetSpec, handle: &Handle) -> Result<String> {
    write_dataset(&Location::open(out)?, spec, handle)?;
    let pattern = train_shards_pattern(out, spec.shards);
    let skips = SkipCounts::default();
    let index = DatasetIndex::build(std::slice::from_ref(&pattern), handle, &skips)?;
    index.save(&first_source(std::slice::from_ref(&pattern))?.sibling(INDEX_FILE), handle)?;
    Ok(pattern)
}

fn first_source(patterns: &[String]) -> Result<Location> {
    let first = patterns.first().context("no source given")?;
    let url = expand_braces(first)?.into_iter().next().context("empty pattern")?;
    Location::open(&url)
}

/// A training dataset: its index, tokenizer and skip counters.
pub struct Dataset {
    pub index: Arc<DatasetIndex>,
    pub tokenizer: Arc<Tokenizer>,
    pub skips: Arc<SkipCounts>,
    image_root: String,
}

impl Dataset {
    /// Opens the configured dataset, or generates one into `<run>/data` when `data.train_file`
    /// is empty. The index is loaded from beside the data, or built and stored there.
    pub fn open(cfg: &AlbefConfig, run: &Path, handle: &Handle) -> Result<Self> {
        let d = &cfg.data;
        let sources = if d.train_file.is_empty() {
            let dir = run.join("data");
            let dir = dir.to_str().context("run directory is not UTF-8")?;
            let spec = DatasetSpec {
                seed: d.synth_seed,
                image_res: d.synth_image_res,
                train: d.synth_train,
                test: d.synth_test,
                shards: d.synth_shards,
            };
            let pattern = train_shards_pattern(dir, spec.shards);
            if !Path::new(dir).join(INDEX_FILE).exists() {
                tracing::info!(dir, "generating a dataset (data.train_file is empty)");
                synthesize(dir, &spec, handle)?;
            }
            vec![pattern]
        } else {
            d.train_file.clone()
        };
        let first = first_source(&sources)?;
        let index_loc = if d.index.is_empty() { first.sibling(INDEX_FILE) } else { Location::open(&d.index)? };
        let index = if handle.block_on(index_loc.exists())? {
            DatasetIndex::load(&index_loc, handle)?
        } else {
            tracing::info!(index = %index_loc.url, "no dataset index yet: building it");
            let skips = SkipCounts::default();
            let index = DatasetIndex::build(&sources, handle, &skips)?;
            index.save(&index_loc, handle)?;
            index
        };
        let tokenizer_loc =
            if d.tokenizer.is_empty() { first.sibling(VOCAB_TXT) } else { Location::open(&d.tokenizer)? };
        let tokenizer = load_tokenizer(&tokenizer_loc, handle)?
            .with_options(TokenizerOptions { max_tokens: d.max_tokens, add_sep: d.add_sep })?;
        check_vocabulary(cfg, &tokenizer)?;
        Ok(Dataset {
            index: Arc::new(index),
            tokenizer: Arc::new(tokenizer),
            skips: Arc::new(SkipCounts::default()),
            image_root: d.image_root.clone(),
        })
    }

    pub fn steps_per_epoch(&self, world_size: u64, batch_size: u64) -> u64 {
        steps_per_epoch(self.index.total(), world_size, batch_size)
    }

    /// The loader of `rank`'s batches of `epoch`, from step `from`.
    #[allow(clippy::too_many_arguments)]
    pub fn loader(
        &self,
        cfg: &AlbefConfig,
        epoch: u64,
        world_size: u64,
        rank: u64,
        batch_size: u64,
        from: u64,
        handle: &Handle,
    ) -> Result<Loader> {
        let d = &cfg.data;
        let spec = PlanSpec { seed: cfg.train.seed, epoch, world_size, batch_size, window: d.shuffle_window };
        let plan = plan_rank(&self.index.counts(), &spec, rank)?;
        let threads = match d.loader_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(1).max(1),
            n => n,
        };
        let opts = LoaderOptions {
            image_res: cfg.model.image_res as u32,
            threads,
            prefetch: d.prefetch,
            max_pixels: d.max_pixels,
            augment: true,
            caption: if d.caption_field.is_empty() {
                CaptionSource::Txt
            } else {
                CaptionSource::JsonField(d.caption_field.clone())
            },
            image_root: self.image_root.clone(),
            max_words: d.max_words,
            seed: cfg.train.seed,
        };
        Ok(Loader::start(
            self.index.clone(),
            plan,
            from,
            opts,
            self.tokenizer.clone(),
            handle.clone(),
            self.skips.clone(),
        ))
    }
}

/// Reads a vocabulary or tokenizer.json from any store (the tokenizers crate reads files).
fn load_tokenizer(loc: &Location, handle: &Handle) -> Result<Tokenizer> {
    let bytes = handle.block_on(loc.read_all()).with_context(|| format!("reading the tokenizer {}", loc.url))?;
    let name = loc.url.rsplit('/').next().unwrap_or(VOCAB_TXT);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(name);
    std::fs::write(&path, &bytes)?;
    Tokenizer::from_file(&path)
}

/// The model's token ids and vocabulary size must agree with the tokenizer's.
fn check_vocabulary(cfg: &AlbefConfig, tok: &Tokenizer) -> Result<()> {
    let b = &cfg.model.bert;
    ensure!(
        tok.vocab_size() as i64 <= b.vocab_size,
        "the tokenizer has {} tokens but model.bert.vocab_size is {}",
        tok.vocab_size(),
        b.vocab_size
    );
    ensure!(
        (tok.pad_id(), tok.cls_id(), tok.mask_id()) == (b.pad_token_id, b.cls_token_id, b.mask_token_id),
        "model.bert pad/cls/mask ids ({}, {}, {}) differ from the tokenizer's ({}, {}, {})",
        b.pad_token_id,
        b.cls_token_id,
        b.mask_token_id,
        tok.pad_id(),
        tok.cls_id(),
        tok.mask_id()
    );
    Ok(())
}
