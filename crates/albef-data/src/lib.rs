//! ALBEF's training data, without libtorch: the coordinator links this crate too, for the dataset
//! index and the epoch plans.
//!
//! A sample's way to the trainer: `store::Location` (object storage: paths, file://, s3://, gs://,
//! az://, with `store::expand_pattern` for source patterns: braces, globs) -> `sources` (WebDataset / img2dataset
//! tar shards, plain or gzip-compressed, and ALBEF annotation JSON, read by sample ordinal) ->
//! `loader::Loader` (a reader thread streams the rank's planned ranges; decoder threads run
//! `transform`, guarded decoding and the Pillow-exact RandomResizedCrop, flip and RandAugment, then
//! `pre_caption` and the WordPiece `tokenizer`) -> `batch::HostBatch` (normalised images, token
//! ids, mask and sample keys), delivered in step order through a bounded prefetch queue.
//!
//! - `index::DatasetIndex`: the samples of every source (and each tar sample's byte offset), built
//!   once by `albef data index` and stored beside the data as `albef-index.json`.
//! - `mixture`: what an epoch draws from each `data.train_file` entry: each sample once, or a
//!   weighted entry's share (repeated or sampled), the epoch holding the sources' total.
//! - `plan`: an epoch's share of each rank as a pure function of (seed, epoch, mixture, world
//!   size, batch size, shuffle window): equal steps per rank, every drawn sample trained once.
//! - `dataset::Dataset`: the configured sources (or a generated dataset), their index, the
//!   tokenizer and the skip counters, and loaders of planned epochs; `albef train` and the workers
//!   use it.
//! - `bad`: bad input never stops training, and nothing goes missing unnoticed: every planned
//!   sample is delivered or counted once under a `bad::SkipReason` (`corrupt_image`,
//!   `missing_caption`, `oversized_member` for a tar member above `data.max_member_mb`,
//!   `truncated_shard`, ...). Sources that are no tar (`not_a_tar`), hold no sample
//!   (`empty_source`) or cannot be read (`unreadable_shard`) are left out of the index and named;
//!   macOS and Windows leftovers count as `junk_member`, not as samples. `bad::SkipCounts` keeps
//!   the counts and the first examples of each reason for the end-of-run summary, the metrics and
//!   `albefctl status`.
//! - `rng::SplitMix64`: every random draw of a sample derives from (seed, epoch, sample id), so a
//!   sample looks the same on any thread, on any rank and in a resumed run.
//! - `run_lock`: one coordinator per (local) run directory.
//! - `progress`: long work (generating, indexing, evaluating) reports its progress to whatever
//!   reporter the program installed.
//! - `prepare`: `albef data prepare`, image-caption pairs to WebDataset shards of resized JPEGs
//!   (img2dataset's resize modes) and their index, in parallel and resumable.
//! - `synth`: generated, learnable image-text datasets (shards, annotation JSON, a retrieval split,
//!   a vocabulary) for the demo and the tests.

pub mod bad;
pub mod batch;
pub mod budget;
pub mod caption;
pub mod dataset;
pub mod index;
pub mod loader;
pub mod mixture;
pub mod plan;
pub mod prepare;
pub mod progress;
pub mod rng;
pub mod run_lock;
pub mod source_counts;
pub mod sources;
pub mod store;
pub mod synth;
pub mod synth_grounding;
pub mod tar_entries;
pub mod tokenizer;
pub mod transform;

pub use batch::{HostBatch, Row, collate};
pub use caption::pre_caption;
pub use synth::{Pair, SynthSpec};
