//! A configured training dataset: sources from `data.train_file` (or a dataset generated into
//! the run directory), its index, the tokenizer, and loaders of planned epochs. The same code
//! serves `albef train`, the workers and (for the index) the coordinator.

use crate::bad::SkipCounts;
use crate::index::{DatasetIndex, INDEX_FILE, SourceKind};
use crate::loader::{InputLimits, Loader, LoaderOptions, RowNeeds};
use crate::mixture::Mixture;
use crate::plan::{PlanSpec, RankPlan, plan_rank, steps_per_epoch};
use crate::source_counts::SourceCounts;
use crate::sources::{TarOptions, annotation_image, annotation_image_root, parse_annotations, path_rewrites};
use crate::store::{Location, expand_braces, folder_of_source};
use crate::synth::{DatasetSpec, VOCAB_TXT, train_shards_pattern, write_dataset};
use crate::tokenizer::{Tokenizer, TokenizerOptions};
use crate::transform::TrainTransform;
use albef_config::{AlbefConfig, TrainSource};
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;
use std::sync::Arc;
use tokio::runtime::Handle;

/// Writes a generated dataset and its index; returns the shard pattern.
pub fn synthesize(out: &str, spec: &DatasetSpec, handle: &Handle) -> Result<String> {
    write_dataset(&Location::open(out)?, spec, handle)?;
    let pattern = train_shards_pattern(out, spec.shards);
    let skips = SkipCounts::default();
    let index = DatasetIndex::build(std::slice::from_ref(&pattern), handle, &skips)?;
    index.save(&source_folder(std::slice::from_ref(&pattern))?.join(INDEX_FILE), handle)?;
    Ok(pattern)
}

/// The folder of the first source a list of patterns names, where its index and vocabulary are
/// found by default (known without listing the store).
pub fn source_folder(patterns: &[String]) -> Result<Location> {
    let first = patterns.first().context("no source given")?;
    let url = expand_braces(first)?.into_iter().next().context("empty pattern")?;
    Location::open(&folder_of_source(&url)?)
}

/// The training sources of a configuration: `data.train_file`, or the generated dataset under
/// `<run>/data` (generated on first use).
pub fn training_sources(cfg: &AlbefConfig, run: &Path, handle: &Handle) -> Result<Vec<TrainSource>> {
    let d = &cfg.data;
    if !d.train_file.is_empty() {
        return Ok(d.train_file.clone());
    }
    let dir = run.join("data");
    let dir = dir.to_str().context("run directory is not UTF-8")?;
    let spec = DatasetSpec {
        seed: d.synth_seed,
        image_res: d.synth_image_res,
        train: d.synth_train,
        test: d.synth_test,
        shards: d.synth_shards,
    };
    if !Path::new(dir).join(INDEX_FILE).exists() {
        tracing::info!(dir, "generating a dataset (data.train_file is empty)");
        synthesize(dir, &spec, handle)?;
    }
    Ok(vec![TrainSource::plain(train_shards_pattern(dir, spec.shards))])
}

/// Where the index of `sources` lives: `data.index`, else beside the first source.
pub fn index_location(cfg: &AlbefConfig, sources: &[String]) -> Result<Location> {
    if cfg.data.index.is_empty() {
        Ok(source_folder(sources)?.join(INDEX_FILE))
    } else {
        Location::open(&cfg.data.index)
    }
}

/// The index of `sources` at `loc`, or built (and stored there when nothing is). An index at
/// `loc` of other sources (another dataset's in the same folder) is left alone: this run's is
/// built, which the coordinator and every worker do alike.
/// Reads may go `stall` without a byte (`data.read_timeout_s`).
pub fn open_index(
    loc: &Location,
    sources: &[String],
    handle: &Handle,
    skips: &SkipCounts,
    stall: std::time::Duration,
) -> Result<DatasetIndex> {
    let exists = handle.block_on(loc.exists())?;
    if exists {
        let index = DatasetIndex::load(loc, handle)?;
        if index.indexes(sources, handle)? {
            return Ok(index);
        }
        tracing::info!(index = %loc.url, "the index there is of other sources: indexing these for this run (data.index names one of their own)");
    } else {
        tracing::info!(index = %loc.url, "no dataset index yet: building it");
    }
    let index = DatasetIndex::build_within(sources, handle, skips, stall)?;
    if !exists {
        index.save(loc, handle)?;
    }
    Ok(index)
}

/// A training dataset: its index, mixture of sources, tokenizer and skip counters.
pub struct Dataset {
    pub index: Arc<DatasetIndex>,
    pub mixture: Arc<Mixture>,
    pub tokenizer: Arc<Tokenizer>,
    pub skips: Arc<SkipCounts>,
    image_root: String,
    path_rewrite: Vec<(String, String)>,
    /// What the task needs of each row besides image and text (it sets this after opening).
    pub needs: RowNeeds,
}

impl Dataset {
    /// Opens the configured dataset, or generates one into `<run>/data` when `data.train_file`
    /// is empty. The index is loaded from beside the data, or built and stored there.
    pub fn open(cfg: &AlbefConfig, run: &Path, handle: &Handle) -> Result<Self> {
        let d = &cfg.data;
        let entries = training_sources(cfg, run, handle)?;
        let sources = TrainSource::patterns(&entries);
        let folder = source_folder(&sources)?;
        let index_loc = index_location(cfg, &sources)?;
        // What the index leaves out (sources that are no tar or empty, junk members) is part of
        // this run's skip summary when the index is built here.
        let skips = Arc::new(SkipCounts::default());
        let index = open_index(&index_loc, &sources, handle, &skips, InputLimits::from_config(d).read_timeout)?;
        let mixture = Mixture::open(&index, &entries, handle)?;
        skips.count_by_source(Arc::new(SourceCounts::new(&index, &mixture)));
        let path_rewrite = path_rewrites(&d.path_rewrite)?;
        check_image_paths(&index, &d.image_root, &path_rewrite, handle)?;
        let tokenizer_loc = if d.tokenizer.is_empty() { folder.join(VOCAB_TXT) } else { Location::open(&d.tokenizer)? };
        let tokenizer = load_tokenizer(&tokenizer_loc, handle)?
            .with_options(TokenizerOptions { max_tokens: d.max_tokens, add_sep: d.add_sep })?;
        check_vocabulary(cfg, &tokenizer)?;
        Ok(Dataset {
            index: Arc::new(index),
            mixture: Arc::new(mixture),
            tokenizer: Arc::new(tokenizer),
            skips,
            image_root: d.image_root.clone(),
            path_rewrite,
            needs: RowNeeds::default(),
        })
    }

    pub fn steps_per_epoch(&self, world_size: u64, batch_size: u64) -> u64 {
        steps_per_epoch(self.mixture.total(), world_size, batch_size)
    }

    /// `rank`'s plan of `epoch` (the coordinator hands out the same plan in a distributed job).
    pub fn plan(&self, cfg: &AlbefConfig, epoch: u64, world_size: u64, rank: u64) -> Result<RankPlan> {
        let spec = PlanSpec {
            seed: cfg.train.seed,
            epoch,
            world_size,
            batch_size: cfg.train.batch_size_train as u64,
            window: cfg.data.shuffle_window,
        };
        plan_rank(&self.mixture, &spec, rank)
    }

    /// A loader of `plan`'s batches from step `from`, one of `sharing` loaders of this process
    /// (a rank's virtual ranks) that share `data.loader_threads` decoders.
    pub fn loader(&self, cfg: &AlbefConfig, plan: RankPlan, from: u64, sharing: usize, handle: &Handle) -> Loader {
        let d = &cfg.data;
        let threads = match d.loader_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(1).max(1),
            n => n,
        };
        let threads = (threads / sharing.max(1)).max(1);
        let opts = LoaderOptions {
            image_res: cfg.model.image_res as u32,
            threads,
            prefetch: d.prefetch,
            max_pixels: d.max_pixels,
            augment: Some(train_transform(cfg)),
            tar: TarOptions::from_config(d),
            image_root: self.image_root.clone(),
            path_rewrite: self.path_rewrite.clone(),
            max_words: d.max_words,
            seed: cfg.train.seed,
            needs: self.needs.clone(),
            limits: InputLimits::from_config(d),
        };
        Loader::start(self.index.clone(), plan, from, opts, self.tokenizer.clone(), handle.clone(), self.skips.clone())
    }
}

/// Fails when the image-path rule refuses every entry of a dataset of annotation files: the run
/// would skip every step. Annotation files are read until one entry passes (the first, in a
/// dataset that works).
fn check_image_paths(
    index: &DatasetIndex,
    image_root: &str,
    rewrites: &[(String, String)],
    handle: &Handle,
) -> Result<()> {
    if index.sources.iter().any(|s| s.kind == SourceKind::WebDataset) {
        return Ok(());
    }
    let (mut refused, mut example) = (0, None);
    for source in &index.sources {
        let bytes = handle.block_on(Location::open(&source.url)?.read_all())?;
        let root = Location::open(&annotation_image_root(&source.url, image_root))?;
        // Malformed entries are counted once, by the loader.
        for a in parse_annotations(&bytes, &source.url, &SkipCounts::default())?.into_iter().flatten() {
            let Err(why) = annotation_image(&root, &a.image, rewrites) else { return Ok(()) };
            example.get_or_insert(why);
            refused += 1;
        }
    }
    let Some(example) = example else { return Ok(()) };
    bail!(
        "all {refused} entries would be skipped as absolute_path (e.g. {example}): the reference's annotation files \
         name the authors' paths; set data.path_rewrite to map their prefix to your copy (e.g. --set \
         'data.path_rewrite=[/export/share/datasets/vision/coco/images/=coco/]'), or data.image_root to the \
         folder those absolute paths lie under"
    )
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
    // Without data.train_file the dataset is generated with its own small vocabulary, which the
    // compiled defaults (the base model, BERT's vocabulary) do not fit.
    let hint = match cfg.data.train_file.is_empty() {
        true => "; the generated dataset needs the small model: pass --config configs/small.yaml",
        false => "",
    };
    ensure!(
        tok.vocab_size() as i64 <= b.vocab_size,
        "the tokenizer has {} tokens but model.bert.vocab_size is {}{hint}",
        tok.vocab_size(),
        b.vocab_size
    );
    ensure!(
        (tok.pad_id(), tok.cls_id(), tok.mask_id()) == (b.pad_token_id, b.cls_token_id, b.mask_token_id),
        "model.bert pad/cls/mask ids ({}, {}, {}) differ from the tokenizer's ({}, {}, {}){hint}",
        b.pad_token_id,
        b.cls_token_id,
        b.mask_token_id,
        tok.pad_id(),
        tok.cls_id(),
        tok.mask_id()
    );
    Ok(())
}

/// The training augmentation the configuration asks for.
pub fn train_transform(cfg: &AlbefConfig) -> TrainTransform {
    let d = &cfg.data;
    TrainTransform {
        res: cfg.model.image_res as u32,
        crop: d.train_crop,
        scale: (d.crop_scale[0], d.crop_scale[1]),
        hflip_p: d.hflip_p,
        randaug_n: d.randaug_n,
        randaug_m: d.randaug_m,
        ..TrainTransform::default()
    }
}
