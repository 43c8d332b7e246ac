//! Rank 0's checkpoints in a job: a snapshot copied to host memory at the step, encoded and
//! uploaded in the background, then reported to the coordinator for commit; and resuming a
//! generation from the checkpoint the coordinator names.

use crate::client::{self, Client};
use albef_checkpoint::best;
use albef_data::store::Location;
use albef_proto::v1::{RejectCheckpointRequest, ReportCheckpointRequest};
use albef_train::Trainer;
use albef_train::checkpoint::{Saved, Uploader};
use albef_train::task::Evaluation;
use albef_train::train_loop::{CheckpointSink, SaveReason};
use anyhow::Result;
use std::sync::Arc;
use std::time::Instant;
use tokio::runtime::Handle;

/// Reports a checkpoint this many times at most while the coordinator is unreachable.
const REPORT_TRIES: u32 = 8;

pub struct CoordinatorSink {
    pub uploader: Arc<Uploader>,
    pub run: Location,
    pub client: Client,
    pub handle: Handle,
    pub generation: u64,
    pub rank: u32,
    /// The data cursor's placement: virtual ranks and steps of an epoch.
    pub virtual_ranks: u64,
    pub steps_per_epoch: u64,
}

impl CheckpointSink for CoordinatorSink {
    /// Every checkpoint goes to `<run_dir>/checkpoints/step-N`, whatever it was taken for; a
    /// best one is recorded as such (`best.json`) before the coordinator hears of it.
    fn save(&mut self, trainer: &Trainer, _why: SaveReason, best: Option<&Evaluation>) -> Result<()> {
        let state = trainer.state().clone();
        let started = Instant::now();
        let snapshot = trainer.snapshot(self.virtual_ranks, self.steps_per_epoch)?;
        let copy_ms = started.elapsed().as_millis() as u64;
        tracing::info!(step = state.step, copy_ms, "checkpoint copied to host memory");
        let (handle, client, generation, rank) = (self.handle.clone(), self.client.clone(), self.generation, self.rank);
        let (run, best) = (self.run.clone(), best.cloned());
        let done = Box::new(move |saved: Saved| {
            let manifest = match saved.manifest {
                Ok(m) => m,
                Err(e) => return tracing::error!(step = saved.step, "checkpoint save failed: {e:#}"),
            };
            let (location, upload_ms) = (saved.location.url, saved.took.as_millis() as u64);
            tracing::info!(location, bytes = manifest.total_bytes(), upload_ms, "checkpoint stored");
            let best = best.and_then(|e| {
                let record = e.as_best(&location)?;
                let written = handle.block_on(best::write(&run, &record));
                written.map_err(|e| tracing::warn!(location, "the best checkpoint not recorded: {e:#}")).ok()
            });
            let req = ReportCheckpointRequest {
                generation,
                rank,
                step: saved.step,
                location: location.clone(),
                epoch: state.epoch,
                step_in_epoch: state.step_in_epoch,
                best: best.is_some(),
            };
            let report = || {
                let (mut c, req) = (client.clone(), req.clone());
                async move { c.report_checkpoint(req).await }
            };
            match client::retry(&handle, Some(REPORT_TRIES), report) {
                Ok(reply) if reply.committed => tracing::info!(location, "checkpoint committed"),
                Ok(_) => tracing::warn!(location, "the coordinator did not commit the checkpoint"),
                Err(s) if client::transient(&s) => {
                    tracing::warn!(location, "the coordinator stayed unreachable: checkpoint not committed")
                }
                Err(s) => tracing::warn!(location, "checkpoint report refused: {s}"),
            }
        });
        self.uploader.save(&self.run, snapshot, done);
        Ok(())
    }
}

/// Restores the checkpoint of the resume point; one that cannot be read is reported, so that
/// the coordinator falls back to the previous one.
pub fn resume(
    trainer: &mut Trainer,
    checkpoint: &str,
    (client, handle): (&Client, &Handle),
    (generation, rank): (u64, u32),
    virtual_ranks: u64,
) -> Result<()> {
    let loaded = Location::open(checkpoint).and_then(|dir| albef_train::checkpoint::load(trainer, &dir, handle));
    match loaded {
        Ok(saved) => {
            if saved.world_size != virtual_ranks && saved.position.step_in_epoch > 0 {
                tracing::warn!(
                    saved = saved.world_size,
                    now = virtual_ranks,
                    "resuming mid-epoch over another number of virtual ranks: the rest of this epoch is planned anew"
                );
            }
            tracing::info!(checkpoint, step = trainer.state().step, epoch = trainer.state().epoch, "resumed");
            Ok(())
        }
        Err(e) => {
            let reason = format!("{e:#}");
            tracing::error!(checkpoint, "cannot resume from the checkpoint: {reason}");
            let req = RejectCheckpointRequest { generation, rank, location: checkpoint.into(), reason };
            if let Err(s) = handle.block_on(client.clone().reject_checkpoint(req)) {
                tracing::warn!("reporting the unreadable checkpoint: {s}");
            }
            Err(e)
        }
    }
}
