//! Saving and restoring the trainer through `albef-checkpoint`: blocking calls for single-process
//! runs and tests, and a background [`Uploader`] for jobs, so that a step waits only for the
//! copy to host memory.

use crate::trainer::{SavedState, Snapshot, Trainer};
use albef_checkpoint::{FileEntry, Manifest, WriteOptions};
use albef_data::store::Location;
use anyhow::{Context, Result};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::runtime::Handle;

/// Encodes a snapshot and writes it as the checkpoint `dir` (manifest last).
async fn write_snapshot(
    dir: &Location,
    snapshot: Snapshot,
    opts: WriteOptions,
    after_file: &mut (dyn FnMut(&FileEntry) + Send),
) -> Result<Manifest> {
    let step = snapshot.step;
    let files = tokio::task::spawn_blocking(move || snapshot.encode()).await.context("encoding the checkpoint")??;
    let files = files.into_iter().map(|(name, bytes)| (name, Bytes::from(bytes))).collect();
    albef_checkpoint::write(dir, step, files, opts, after_file).await
}

/// Saves the trainer as the checkpoint `dir` and waits for it.
pub fn save(
    trainer: &Trainer,
    dir: &Location,
    world_size: u64,
    steps_per_epoch: u64,
    handle: &Handle,
) -> Result<Manifest> {
    let snapshot = trainer.snapshot(world_size, steps_per_epoch)?;
    handle.block_on(write_snapshot(dir, snapshot, WriteOptions::default(), &mut |_: &FileEntry| {}))
}

/// Every file of the checkpoint `dir`, each verified against the manifest.
pub async fn read_verified(dir: &Location) -> Result<(Manifest, BTreeMap<String, Bytes>)> {
    let manifest = albef_checkpoint::read_manifest(dir).await?;
    let mut files = BTreeMap::new();
    for f in &manifest.files {
        files.insert(f.name.clone(), albef_checkpoint::read_file(dir, &manifest, &f.name).await?);
    }
    Ok((manifest, files))
}

/// Restores the trainer from the checkpoint `dir`; on any error (missing, corrupt, wrong
/// shapes) the error names the file and the trainer is unchanged.
pub fn load(trainer: &mut Trainer, dir: &Location, handle: &Handle) -> Result<SavedState> {
    let (_, files) = handle.block_on(read_verified(dir))?;
    let mut read = |name: &str| -> Result<Vec<u8>> {
        files.get(name).map(|b| b.to_vec()).with_context(|| format!("{}: the checkpoint has no {name}", dir.url))
    };
    trainer.restore(&mut read, &dir.url)
}

/// What a background save produced.
pub struct Saved {
    pub step: u64,
    pub location: Location,
    pub manifest: Result<Manifest>,
    /// Encoding and upload time (the step did not wait for it).
    pub took: Duration,
}

enum Job {
    Save { run: Location, snapshot: Snapshot, done: Box<dyn FnOnce(Saved) + Send> },
    Flush(mpsc::Sender<()>),
}

/// Sees every stored file of every save: (step, file).
pub type AfterFile = Box<dyn FnMut(u64, &FileEntry) + Send>;

/// One background thread that encodes and uploads snapshots, one at a time: a new save waits
/// for the previous upload (so at most two snapshots are in memory), and before each save it
/// removes what failed saves left behind.
pub struct Uploader {
    jobs: Option<mpsc::SyncSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Uploader {
    /// `after_file` sees every stored file of every save (progress, fault injection).
    pub fn start(handle: Handle, opts: WriteOptions, mut after_file: AfterFile) -> Uploader {
        let (tx, rx) = mpsc::sync_channel::<Job>(0);
        let thread = std::thread::spawn(move || {
            for job in rx {
                match job {
                    Job::Flush(ack) => {
                        let _ = ack.send(());
                    }
                    Job::Save { run, snapshot, done } => {
                        let (step, started) = (snapshot.step, Instant::now());
                        let location = albef_checkpoint::folder(&run, step);
                        let manifest = handle.block_on(async {
                            let removed = albef_checkpoint::remove_incomplete(&run, Some(step)).await?;
                            if !removed.is_empty() {
                                tracing::info!(steps = ?removed, "removed checkpoint folders without a manifest");
                            }
                            write_snapshot(&location, snapshot, opts, &mut |f: &FileEntry| after_file(step, f)).await
                        });
                        done(Saved { step, location, manifest, took: started.elapsed() });
                    }
                }
            }
        });
        Uploader { jobs: Some(tx), thread: Some(thread) }
    }

    /// Queues a snapshot for `<run>/checkpoints/step-N`; blocks while the previous one uploads.
    /// `done` runs on the upload thread with the outcome.
    pub fn save(&self, run: &Location, snapshot: Snapshot, done: Box<dyn FnOnce(Saved) + Send>) {
        let job = Job::Save { run: run.clone(), snapshot, done };
        self.jobs.as_ref().expect("uploader running").send(job).expect("the upload thread is alive");
    }

    /// Waits until every queued save finished.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.jobs.as_ref().expect("uploader running").send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
