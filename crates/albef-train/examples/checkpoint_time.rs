//! How long a checkpoint of a preset's full training state takes, split into what the step waits
//! for (the copy to host memory: the first into new buffers, the next into the same ones, then a
//! first one into buffers reserved at the start, as a worker's are) and what runs in the
//! background (encoding, hashing, upload):
//!
//!     cargo run --release -p albef-train --example checkpoint_time -- [albef-base|albef-small] [DIR]
//!
//! DIR is any run location (a path, s3://...); default: a temporary directory.

use albef_checkpoint::{FileEntry, WriteOptions};
use albef_config::{AlbefConfig, Preset};
use albef_data::store::Location;
use albef_train::Trainer;
use albef_train::checkpoint::{Saved, Uploader};
use std::sync::mpsc;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let preset: Preset = args.get(1).map_or("albef-base", String::as_str).parse()?;
    let tmp = tempfile::tempdir()?;
    let run = Location::open(args.get(2).map_or(tmp.path().to_str().unwrap(), String::as_str))?;
    let mut cfg = AlbefConfig::defaults(preset);
    cfg.train.device = albef_config::DeviceChoice::Cpu;
    let device = albef_model::device::resolve(cfg.train.device)?;
    let trainer = Trainer::new(&cfg, device)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let uploader = Uploader::start(rt.handle().clone(), WriteOptions::default(), Box::new(|_: u64, _: &FileEntry| {}));
    let save = |label: &str| -> anyhow::Result<Saved> {
        let started = Instant::now();
        let snapshot = trainer.snapshot(1, 1000)?;
        println!("{preset:?}: the step waits {:.2} s ({label})", started.elapsed().as_secs_f64());
        let (tx, rx) = mpsc::channel();
        uploader.save(&run, snapshot, Box::new(move |saved| tx.send(saved).unwrap()));
        Ok(rx.recv()?)
    };
    save("copy to host memory, new buffers")?;
    let saved = save("copy to host memory, the buffers of the previous checkpoint")?;
    let reserved = Trainer::new(&cfg, device)?;
    let started = Instant::now();
    reserved.reserve_snapshot_memory().join().map_err(|_| anyhow::anyhow!("the reservation panicked"))?;
    println!(
        "{preset:?}: reserving the host memory takes {:.2} s (in the background: a worker's first steps run meanwhile)",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    drop(reserved.snapshot(1, 1000)?);
    println!("{preset:?}: then the first snapshot waits {:.2} s", started.elapsed().as_secs_f64());
    let manifest = saved.manifest?;
    println!(
        "{preset:?}: {:.2} GB of state in {} files; encode + hash + upload in the background {:.2} s ({:.0} MB/s) to {}",
        manifest.total_bytes() as f64 / 1e9,
        manifest.files.len(),
        saved.took.as_secs_f64(),
        manifest.total_bytes() as f64 / 1e6 / saved.took.as_secs_f64(),
        saved.location.url
    );
    Ok(())
}
