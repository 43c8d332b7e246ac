//! The checkpoint ledger: rank 0's reports commit checkpoints (the next generation resumes from
//! the latest), old ones are evicted beyond job.keep_checkpoints, one a worker cannot read is
//! dropped, and the last step's finishes the job.

use super::types::{Checkpoint, Commit, Result, invalid};
use super::{Job, shown};
use std::time::Instant;
use tracing::{info, warn};

impl Job {
    pub fn checkpoints(&self) -> &[Checkpoint] {
        &self.checkpoints
    }

    /// A checkpoint `rank` finished writing (its manifest verified by the caller); rank 0's is
    /// committed: the next generation resumes from it. A report may come from a generation that
    /// has ended since the save began, or that rank 0 took as its generation ended (the state it
    /// holds is as good: every rank takes the same steps). Older checkpoints beyond
    /// `job.keep_checkpoints` are evicted.
    #[allow(clippy::too_many_arguments)]
    pub fn report_checkpoint(
        &mut self,
        generation: u64,
        rank: u32,
        step: u64,
        epoch: u64,
        step_in_epoch: u64,
        location: &str,
        now: Instant,
    ) -> Result<Commit> {
        match &self.current {
            Some(g) if g.number == generation => {
                self.current_checked(generation, rank)?;
            }
            _ if generation == 0 || generation > self.generation => {
                return invalid(format!("generation {generation} was never formed (latest {})", self.generation));
            }
            _ => {}
        }
        if rank != 0 {
            return Ok(Commit::default());
        }
        if let Some(last) = self.checkpoints.last() {
            if last.step == step && last.location == location {
                return Ok(Commit { committed: true, evicted: vec![] });
            }
            if step <= last.step {
                warn!(step, latest = last.step, location, "a checkpoint older than the latest one: not committed");
                return Ok(Commit::default());
            }
        }
        let committed_at = self.clock.1 + now.saturating_duration_since(self.clock.0).as_secs();
        info!(generation, step, epoch, step_in_epoch, location, "checkpoint committed");
        let location = location.to_string();
        self.checkpoints.push(Checkpoint { step, epoch, step_in_epoch, location, committed_at, best: false });
        self.counters.checkpoints_committed += 1;
        let evicted = self.evict();
        self.changed();
        self.finish_if_complete();
        self.scale_up(generation, now);
        Ok(Commit { committed: true, evicted })
    }

    /// Drops the oldest checkpoints beyond `job.keep_checkpoints`, never the best one (which
    /// does not count against the limit); returns their locations.
    fn evict(&mut self) -> Vec<String> {
        let keep = self.cfg.job.keep_checkpoints.max(1) as usize;
        let mut excess = self.checkpoints.iter().filter(|c| !c.best).count().saturating_sub(keep);
        let mut evicted = vec![];
        self.checkpoints.retain(|c| {
            let evict = excess > 0 && !c.best;
            if evict {
                excess -= 1;
                evicted.push(c.location.clone());
            }
            !evict
        });
        evicted
    }

    /// Marks the committed checkpoint at `location` as the best so far (rank 0 says so when it
    /// reports it); the one marked before becomes an ordinary checkpoint again.
    pub fn mark_best(&mut self, location: &str) {
        if !self.checkpoints.iter().any(|c| c.location == location) {
            return;
        }
        for c in &mut self.checkpoints {
            c.best = c.location == location;
        }
        info!(location, "the best checkpoint so far");
        self.changed();
    }

    /// Whether `c` is of the job's last step.
    pub(super) fn is_last(&self, c: &Checkpoint) -> bool {
        c.step >= self.total_steps()
    }

    /// With no generation running, a committed checkpoint of the job's last step finishes the
    /// job: the workers may have trained to the end while this coordinator was down (restarting)
    /// and left without anyone to tell they were done.
    pub(super) fn finish_if_complete(&mut self) {
        let Some(last) = self.checkpoints.last() else { return };
        if self.is_last(last) && !self.lifecycle.over() && self.current.is_none() {
            info!(
                step = last.step,
                location = last.location,
                "the latest checkpoint is the job's last step: the job is finished"
            );
            self.finish();
        }
    }

    /// A rank could not read the checkpoint it was told to resume from: it is dropped (returned
    /// for deletion when it was committed) and the generation ends, so that the next one resumes
    /// from the previous checkpoint.
    pub fn reject_checkpoint(
        &mut self,
        generation: u64,
        rank: u32,
        location: &str,
        reason: &str,
        now: Instant,
    ) -> Result<Option<String>> {
        if generation == 0 || generation > self.generation {
            return invalid(format!("generation {generation} was never formed (latest {})", self.generation));
        }
        let dropped = self.checkpoints.iter().position(|c| c.location == location).map(|i| {
            self.counters.rejected_checkpoints += 1;
            warn!(location, rank, reason = shown(reason), "checkpoint rejected: falling back to the previous one");
            self.checkpoints.remove(i).location
        });
        if self.current.as_ref().is_some_and(|g| g.number == generation) {
            let why = format!("rank {rank} cannot read {}: {}", shown(location), shown(reason));
            self.end_generation(&why, true, &[], now);
        }
        self.changed();
        Ok(dropped)
    }
}
