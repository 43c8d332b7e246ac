//! Datasets for `albef train` and the `albef data` commands.

use albef_data::bad::{SkipCounts, summarize};
use albef_data::dataset::{source_folder, synthesize};
use albef_data::index::{DatasetIndex, INDEX_FILE};
use albef_data::prepare::{self, Input, ResizeMode, Settings};
use albef_data::store::Location;
use albef_data::synth::{DatasetSpec, VOCAB_TXT};
use albef_data::synth_grounding::{GroundingSpec, write_grounding};
use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;

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
    /// Write generated grounding data in RefCOCO+'s files: pictures of two shapes, each a
    /// referring expression with its box; training rows, val and test expressions, refs,
    /// instances, proposal boxes and a vocabulary (`task: grounding` trains and evaluates on them).
    SynthGrounding {
        #[arg(long)]
        out: String,
        /// Pictures per split (two expressions each).
        #[arg(long, default_value_t = 1024)]
        train: u64,
        #[arg(long, default_value_t = 100)]
        val: u64,
        #[arg(long, default_value_t = 100)]
        test: u64,
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
    /// Resize image-caption pairs into WebDataset shards (img2dataset's resize modes, JPEG
    /// re-encoded), in parallel and resumable, and write their index.
    Prepare(PrepareArgs),
}

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// Annotation JSON files (the reference's: image, caption), or one folder of images with
    /// captions beside them (`a.jpg` + `a.txt`).
    #[arg(required = true)]
    inputs: Vec<String>,
    /// The folder of the shards, their reports and the index (a run there is resumed).
    #[arg(long)]
    out: String,
    /// Where annotation image paths start (default: each file's folder).
    #[arg(long, default_value = "")]
    image_root: String,
    #[arg(long, default_value_t = 256)]
    image_size: u32,
    /// keep_ratio (the short side to --image-size) or center_crop (then the centre square).
    #[arg(long, default_value = "keep_ratio")]
    resize_mode: ResizeMode,
    /// JPEG quality of the re-encoded images.
    #[arg(long, default_value_t = 95)]
    quality: u8,
    /// Input rows per shard (each thread holds one shard in memory).
    #[arg(long, default_value_t = 5000)]
    rows_per_shard: u64,
    /// 0: one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Also write the report (counts, throughput) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
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
        DataCommand::SynthGrounding { out, train, val, test, seed, image_res } => {
            let spec = GroundingSpec { seed, image_res, train, val, test };
            write_grounding(&Location::open(&out)?, &spec, rt.handle())?;
            println!("wrote {train} training, {val} val and {test} test pictures of two expressions each under {out}");
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
        DataCommand::Prepare(args) => prepare(args, rt.handle()),
    }
}

fn prepare(args: PrepareArgs, handle: &tokio::runtime::Handle) -> Result<()> {
    let folder = match args.inputs.as_slice() {
        [one] if std::path::Path::new(one).is_dir() => Some(one.clone()),
        _ => None,
    };
    let input = match folder {
        Some(dir) => Input::Folder(dir),
        None => Input::Annotations { files: args.inputs, image_root: args.image_root },
    };
    let settings = Settings {
        image_size: args.image_size,
        resize_mode: args.resize_mode,
        quality: args.quality,
        rows_per_shard: args.rows_per_shard,
    };
    let max_pixels = albef_config::DataConfig::default().max_pixels;
    let report = prepare::prepare(&input, &args.out, &settings, args.threads, max_pixels, handle)?;
    let dropped = report.dropped();
    let rows: u64 = report.shards.iter().map(|s| s.rows[1] - s.rows[0]).sum();
    println!(
        "{} shards ({} kept from an earlier run): {} samples from {rows} rows, {} dropped",
        report.shards.len(),
        report.kept,
        report.samples(),
        dropped.values().sum::<u64>()
    );
    for shard in report.shards.iter().filter(|s| !s.dropped.is_empty()) {
        let why: Vec<String> = shard.dropped.iter().map(|(r, n)| format!("{r} {n}")).collect();
        println!("  {}: {} samples, dropped {}", shard.shard, shard.samples, why.join(", "));
    }
    if !dropped.is_empty() {
        let counts: Vec<(String, u64)> = dropped.into_iter().collect();
        print!("dropped in all:\n{}", summarize(&counts, &report.examples));
    }
    let rate = report.rows_prepared as f64 / report.seconds.max(1e-9);
    println!(
        "{} rows in {:.1} s: {rate:.1} images/s on {} threads ({:.1} per thread)",
        report.rows_prepared,
        report.seconds,
        report.threads,
        rate / report.threads as f64
    );
    println!("index: {}\ndata.train_file: {}", report.index, report.train_file);
    if let Some(path) = args.json {
        let json = serde_json::json!({
            "shards": report.shards.len(), "kept": report.kept, "samples": report.samples(), "rows": rows,
            "dropped": report.dropped(), "rows_prepared": report.rows_prepared, "seconds": report.seconds,
            "threads": report.threads, "images_per_second": rate, "index": report.index,
            "train_file": report.train_file,
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
