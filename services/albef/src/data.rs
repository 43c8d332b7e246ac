//! Datasets for `albef train` and the `albef data` commands.

use albef_data::bad::SkipCounts;
use albef_data::dataset::{source_folder, synthesize};
use albef_data::index::{DatasetIndex, INDEX_FILE};
use albef_data::store::Location;
use albef_data::synth::{DatasetSpec, VOCAB_TXT};
use anyhow::{Context, Result};
use clap::Subcommand;

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
    /// Count the samples of every source (brace patterns and globs allowed) and store the index.
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
                None => source_folder(&sources)?.join(INDEX_FILE),
            };
            index.save(&out, rt.handle())?;
            println!("{} sources, {} samples -> {}", index.sources.len(), index.total(), out.url);
            let problems = skips.summary();
            if !problems.is_empty() {
                println!("problems:\n{problems}");
            }
            Ok(())
        }
    }
}
